//! The engine as a library, on the shipped configuration: snapshots that move a live
//! conversation to another engine, and cards that a re-fired tracker updates.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prompter_core::event::{Event, parse_frame};
use prompter_core::output::{Output, Status};
use prompter_engine::config::{self, LoadRequest};
use prompter_engine::engine::Engine;
use prompter_engine::metrics::Metrics;
use prompter_engine::recording;
use prompter_engine::registry;
use prompter_engine::sink::FnSink;
use prompter_engine::stats::Stats;
use serde_json::json;

use crate::cli::root;

/// What a test engine delivered, in order.
pub(crate) type Delivered = Arc<Mutex<Vec<Output>>>;

/// A fresh engine on the shipped `prompter.yaml` (offline LLM), collecting what it delivers.
fn shipped_engine() -> (Engine, Delivered) {
    engine_on(&root().join("prompter.yaml"), Arc::new(Metrics::new()))
}

/// A fresh engine on engine config `config` (no environment), counting into `metrics` (its
/// providers and Wasm stages too) and collecting what it delivers.
pub(crate) fn engine_on(config: &Path, metrics: Arc<Metrics>) -> (Engine, Delivered) {
    let env = |_: &str| None;
    let req = LoadRequest {
        config: Some(config),
        files: &[],
        include_config_pipelines: true,
        env: &env,
        metrics: Some(metrics.clone()),
    };
    let loaded =
        config::load(&req, &registry::builtin()).unwrap_or_else(|d| panic!("{}", d.render()));
    let seen: Delivered = Arc::default();
    let into = seen.clone();
    let sink = FnSink::new("test", move |o: &Output| {
        into.lock().unwrap().push(o.clone())
    });
    let engine = Engine::new(
        loaded.pipelines,
        loaded.settings,
        vec![Box::new(sink)],
        Arc::new(Stats::with_metrics(metrics)),
    );
    (engine, seen)
}

/// The value of `sample` (a full series name with its labels) in a metrics exposition; 0 when
/// absent.
pub(crate) fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

/// The events of a shipped recording, in order.
pub(crate) fn recorded(name: &str) -> Vec<Event> {
    let path = root().join("pipelines/recordings").join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    let (lines, problems) = recording::parse(&path, 0, &text);
    assert!(problems.is_empty());
    lines
        .iter()
        .flat_map(|l| recording::events(l, Path::new(&path)).unwrap())
        .collect()
}

/// What a sink shows and how it got there: (id, version, status, text, seq), in a stable order.
fn delivered(outputs: &[Output]) -> Vec<(String, u32, Status, String, u64)> {
    let mut v: Vec<_> = outputs
        .iter()
        .map(|o| (o.id.clone(), o.version, o.status, o.text.clone(), o.seq))
        .collect();
    v.sort();
    v
}

/// Feeds `events`; after event `move_after`, snapshots the conversation, stops the engine and
/// goes on in a fresh one restored from the snapshot (through JSON, as it would travel).
async fn feed(events: &[Event], conversation: &str, move_after: Option<usize>) -> Vec<Output> {
    let (mut engine, mut seen) = shipped_engine();
    let mut all = Vec::new();
    for (i, e) in events.iter().enumerate() {
        engine.dispatch(e.clone()).await;
        if move_after == Some(i) {
            let snapshot = engine.snapshot(conversation).await.unwrap();
            let json = serde_json::to_string(&snapshot).unwrap();
            engine.finish().await;
            all.extend(std::mem::take(&mut *seen.lock().unwrap()));
            let (fresh, fresh_seen) = shipped_engine();
            fresh.restore(serde_json::from_str(&json).unwrap()).unwrap();
            (engine, seen) = (fresh, fresh_seen);
        }
    }
    engine.finish().await;
    all.extend(std::mem::take(&mut *seen.lock().unwrap()));
    all
}

#[tokio::test]
async fn a_call_moved_mid_way_to_another_engine_gives_exactly_the_outputs_of_one_run() {
    let events = recorded("acme-discovery-call.jsonl");
    let whole = feed(&events, "acme-001", None).await;
    assert_eq!(whole.len(), 6, "{whole:#?}");
    // Move it at several points, including between the two questions of the growing card.
    for at in [5, events.len() / 2, events.len() - 3] {
        let moved = feed(&events, "acme-001", Some(at)).await;
        assert_eq!(
            delivered(&moved),
            delivered(&whole),
            "moved after event {at}"
        );
    }
}

fn budget(offset_ms: u64, phrase: &str) -> Event {
    parse_frame(
        "call-7",
        offset_ms,
        json!({"type": "tracker_response", "isFinal": true, "trackers": [{
            "name": "Budget Constraints",
            "matches": [{"type": "vocabulary", "value": phrase, "messageRefs": []}]}]}),
    )
    .unwrap()
    .remove(0)
}

#[tokio::test]
async fn the_same_tracker_raised_twice_with_different_phrases_is_one_card_with_two_versions() {
    let (engine, seen) = shipped_engine();
    engine.dispatch(budget(10_000, "too expensive")).await;
    // Let the first answer complete, as when the customer comes back to it later in the call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    engine.dispatch(budget(95_000, "no budget this year")).await;
    // The same detection again (an interim then final result, say) adds nothing.
    engine.dispatch(budget(95_400, "no budget this year")).await;
    engine.finish().await;
    let outputs = seen.lock().unwrap().clone();
    let card: Vec<(&str, u32, Status, Vec<String>, u64)> = outputs
        .iter()
        .filter(|o| o.pipeline == "rta")
        .map(|o| {
            (
                o.id.as_str(),
                o.version,
                o.status,
                o.trigger.phrases.clone(),
                o.trigger.offset_ms,
            )
        })
        .collect();
    assert_eq!(
        card,
        [
            (
                "call-7/rta/k-budget-constraints",
                1,
                Status::Final,
                vec!["too expensive".to_owned()],
                10_000
            ),
            (
                "call-7/rta/k-budget-constraints",
                2,
                Status::Final,
                vec!["no budget this year".to_owned()],
                95_000
            ),
        ]
    );
}
