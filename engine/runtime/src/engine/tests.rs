use super::*;
use crate::pipeline::{OnError, Stage};
use crate::sink::FnSink;
use prompter_core::async_trait;
use prompter_core::output::Trigger;
use prompter_core::plugin::{Flow, Plugin, StageContext};
use prompter_core::template::Template;
use prompter_core::test_util::event;
use serde_json::json;
use std::time::Duration;
use tokio::sync::Notify;

/// What the test stage does with a message whose text is ...
/// - `a1`: waits until conversation `b` was handled (only finishes if conversations run in
///   parallel), then delivers;
/// - `slow ...`: drafts, waits 5 s, then delivers;
/// - `fail ...`: drafts, then fails;
/// - anything else: delivers at once.
///
/// Every delivery's text is the message's text and the transcript length it saw.
#[derive(Default)]
struct Probe {
    b_done: Notify,
    ended: Mutex<Vec<String>>,
}

#[async_trait]
impl Plugin for Probe {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let e = cx.event();
        let text = match &e.detail {
            prompter_core::event::Detail::Message(m) => m.text.clone(),
            _ => String::new(),
        };
        let seen = format!("{text} ({} lines)", cx.conversation().transcript.len());
        if text == "a1" {
            self.b_done.notified().await;
        }
        if text.starts_with("slow") || text.starts_with("fail") {
            cx.emit(output(cx, &format!("draft of {seen}"), Status::Draft))
                .await?;
            if text.starts_with("fail") {
                return Err(PluginError::external("the model is down"));
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        cx.emit(output(cx, &seen, Status::Final)).await?;
        if &*e.conversation_id == "b" {
            self.b_done.notify_one();
        }
        Ok(Flow::Continue(json!({})))
    }
    fn conversation_ended(&self, id: &str) {
        self.ended.lock().unwrap().push(id.to_owned());
    }
}

/// A first stage that lets every run through at once (as a `dedupe` does for a new trigger).
struct Pass;

#[async_trait]
impl Plugin for Pass {
    async fn process(&self, _: &StageContext<'_>) -> Result<Flow, PluginError> {
        Ok(Flow::Continue(json!({})))
    }
}

fn output(cx: &StageContext<'_>, text: &str, status: Status) -> Output {
    Output {
        id: cx.output_id(),
        status,
        kind: "probe".into(),
        conversation_id: cx.event().conversation_id.to_string(),
        pipeline: cx.pipeline.into(),
        text: text.into(),
        trigger: Trigger::from_event(cx.event()),
        ..Output::default()
    }
}

fn pipeline(probe: Arc<Probe>, concurrency: Concurrency, key: Option<&str>) -> Pipeline {
    Pipeline {
        name: "p".into(),
        description: None,
        file: "p.yaml".into(),
        on: vec![EventKind::MessageResponse],
        when: None,
        stages: vec![
            Arc::new(Stage {
                id: "pass".into(),
                plugin_name: "pass".into(),
                plugin: Arc::new(Pass),
                timeout: Duration::from_secs(30),
                on_error: OnError::Stop,
                metrics: Default::default(),
                fingerprint: 0,
            }),
            Arc::new(Stage {
                id: "probe".into(),
                plugin_name: "probe".into(),
                plugin: probe,
                timeout: Duration::from_secs(30),
                on_error: OnError::Stop,
                metrics: Default::default(),
                fingerprint: 0,
            }),
        ],
        deadline: None,
        concurrency,
        priority: Default::default(),
        key: key.map(|k| Template::compile(k).unwrap()),
        supersede: None,
        sinks: Vec::new(),
        metrics: Default::default(),
    }
}

type Seen = Arc<Mutex<Vec<Output>>>;

fn engine_with(pipelines: Vec<Pipeline>, idle: Duration) -> (Engine, Seen) {
    let seen: Seen = Arc::default();
    let sink_seen = seen.clone();
    let sink = FnSink::new("test", move |o: &Output| {
        sink_seen.lock().unwrap().push(o.clone())
    });
    let settings = Settings {
        conversation_idle: idle,
        ..Settings::default()
    };
    let engine = Engine::new(
        pipelines,
        settings,
        vec![Box::new(sink)],
        Arc::new(Stats::default()),
    );
    (engine, seen)
}

fn said(conv: &str, offset: u64, text: &str) -> Event {
    event(
        conv,
        offset,
        json!({"type": "message_response", "messages": [{"from": {"name": "X"}, "payload": {"content": text}}]}),
    )
}

fn texts(seen: &Seen, conv: &str) -> Vec<String> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|o| o.conversation_id == conv)
        .map(|o| o.text.clone())
        .collect()
}

#[tokio::test]
async fn conversations_run_in_parallel_and_each_folds_in_order() {
    let probe = Arc::new(Probe::default());
    let p = pipeline(probe.clone(), Concurrency::Queue, None);
    let (engine, seen) = engine_with(vec![p], Duration::from_secs(60));
    engine.dispatch(said("a", 0, "a1")).await;
    engine.dispatch(said("a", 1, "a2")).await;
    engine.dispatch(said("b", 0, "b1")).await;
    // `a1` blocks until `b1` is handled: an engine that serialized conversations would hang.
    tokio::time::timeout(Duration::from_secs(10), engine.finish())
        .await
        .expect("conversations did not run in parallel");
    assert_eq!(texts(&seen, "b"), ["b1 (1 lines)"]);
    // Each run saw the state as it was at its event, though `a2` was folded before `a1` ran.
    assert_eq!(texts(&seen, "a"), ["a1 (1 lines)", "a2 (2 lines)"]);
    let seqs: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|o| o.conversation_id == "a")
        .map(|o| o.seq)
        .collect();
    assert_eq!(
        seqs,
        [1, 2],
        "every delivery of a conversation is numbered in order"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_run_never_holds_back_the_fold_or_a_later_run() {
    let probe = Arc::new(Probe::default());
    let (engine, seen) = engine_with(
        vec![pipeline(probe, Concurrency::Parallel, None)],
        Duration::from_secs(60),
    );
    engine.dispatch(said("a", 0, "slow one")).await;
    engine.dispatch(said("a", 100, "quick two")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        texts(&seen, "a"),
        ["draft of slow one (1 lines)", "quick two (2 lines)"],
        "the second run completed while the first still waits"
    );
    engine.finish().await;
    assert_eq!(texts(&seen, "a").last().unwrap(), "slow one (1 lines)");
}

#[tokio::test(start_paused = true)]
async fn queued_runs_go_one_after_another_in_trigger_order() {
    let probe = Arc::new(Probe::default());
    let (engine, seen) = engine_with(
        vec![pipeline(probe, Concurrency::Queue, None)],
        Duration::from_secs(60),
    );
    engine.dispatch(said("a", 0, "slow one")).await;
    engine.dispatch(said("a", 100, "quick two")).await;
    engine.finish().await;
    assert_eq!(
        texts(&seen, "a"),
        [
            "draft of slow one (1 lines)",
            "slow one (1 lines)",
            "quick two (2 lines)"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn latest_wins_withdraws_the_superseded_draft_and_completes_the_newer_run() {
    let probe = Arc::new(Probe::default());
    let (engine, seen) = engine_with(
        vec![pipeline(probe, Concurrency::LatestWins, Some("card"))],
        Duration::from_secs(60),
    );
    engine.dispatch(said("a", 0, "slow one")).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    engine.dispatch(said("a", 100, "slow two")).await;
    engine.finish().await;
    let got: Vec<(String, u32, Status, String)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|o| (o.id.clone(), o.version, o.status, o.text.clone()))
        .collect();
    let id = "a/p/k-card".to_string();
    assert_eq!(
        got,
        [
            (
                id.clone(),
                1,
                Status::Draft,
                "draft of slow one (1 lines)".into()
            ),
            (
                id.clone(),
                2,
                Status::Withdrawn,
                "draft of slow one (1 lines)".into()
            ),
            (
                id.clone(),
                3,
                Status::Draft,
                "draft of slow two (2 lines)".into()
            ),
            (id.clone(), 4, Status::Final, "slow two (2 lines)".into()),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_draft_left_open_by_a_failing_run_is_closed_as_incomplete() {
    let probe = Arc::new(Probe::default());
    let (engine, seen) = engine_with(
        vec![pipeline(probe, Concurrency::Parallel, None)],
        Duration::from_secs(60),
    );
    engine.dispatch(said("a", 0, "fail now")).await;
    engine.finish().await;
    let outs = seen.lock().unwrap().clone();
    assert_eq!(outs.len(), 2, "{outs:?}");
    assert_eq!(
        (outs[1].id.as_str(), outs[1].version),
        (outs[0].id.as_str(), 2)
    );
    assert_eq!(outs[1].status, Status::Final);
    assert_eq!(outs[1].text, "draft of fail now (1 lines)");
    assert_eq!(
        outs[1].degraded.as_deref(),
        Some("the answer is incomplete: stage `probe` failed: external error: the model is down")
    );
}

#[tokio::test(start_paused = true)]
async fn idle_and_completed_conversations_are_released_and_a_returning_one_continues_its_cards() {
    let probe = Arc::new(Probe::default());
    let (engine, seen) = engine_with(
        vec![pipeline(probe.clone(), Concurrency::Parallel, Some("card"))],
        Duration::from_secs(30),
    );
    engine.dispatch(said("b", 0, "hello")).await;
    engine
        .dispatch(event(
            "c",
            0,
            json!({"type": "message", "message": {"type": "conversation_completed"}}),
        ))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        *probe.ended.lock().unwrap(),
        ["c"],
        "completed: released at once"
    );
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(
        *probe.ended.lock().unwrap(),
        ["c", "b"],
        "idle: released after 30 s"
    );
    // A late event for a released conversation starts it afresh; nothing is lost, and its
    // card continues at the next version instead of starting over.
    engine.dispatch(said("b", 40_000, "again")).await;
    engine.finish().await;
    let b: Vec<(String, u32, String)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|o| (o.id.clone(), o.version, o.text.clone()))
        .collect();
    assert_eq!(
        b,
        [
            ("b/p/k-card".into(), 1, "hello (1 lines)".into()),
            ("b/p/k-card".into(), 2, "again (1 lines)".into()),
        ]
    );
}

fn two_pipelines(probe: &Arc<Probe>) -> Vec<Pipeline> {
    vec![
        pipeline(probe.clone(), Concurrency::Queue, Some("card")),
        Pipeline {
            name: "each".into(),
            ..pipeline(probe.clone(), Concurrency::Parallel, None)
        },
    ]
}

/// Feeds a call to an engine; after event `move_after`, snapshots the conversation, stops that
/// engine and continues in a fresh one restored from the snapshot (through JSON).
async fn feed(calls: &[Event], move_after: Option<usize>) -> Vec<Output> {
    let probe = Arc::new(Probe::default());
    let (mut engine, mut seen) = engine_with(two_pipelines(&probe), Duration::from_secs(60));
    let mut all = Vec::new();
    for (i, e) in calls.iter().enumerate() {
        engine.dispatch(e.clone()).await;
        if move_after == Some(i) {
            let snap = engine.snapshot("a").await.unwrap();
            let text = serde_json::to_string(&snap).unwrap();
            engine.finish().await;
            all.extend(std::mem::take(&mut *seen.lock().unwrap()));
            let (fresh, fresh_seen) = engine_with(two_pipelines(&probe), Duration::from_secs(60));
            fresh.restore(serde_json::from_str(&text).unwrap()).unwrap();
            (engine, seen) = (fresh, fresh_seen);
        }
    }
    engine.finish().await;
    all.extend(std::mem::take(&mut *seen.lock().unwrap()));
    all
}

#[tokio::test]
async fn a_snapshot_restored_into_another_engine_continues_exactly() {
    let calls = [
        said("a", 0, "one"),
        said("a", 100, "two"),
        said("a", 200, "three"),
        said("a", 300, "four"),
    ];
    let key = |o: &Output| (o.id.clone(), o.version, o.status, o.text.clone(), o.seq);
    let mut whole: Vec<_> = feed(&calls, None).await.iter().map(key).collect();
    let mut moved: Vec<_> = feed(&calls, Some(1)).await.iter().map(key).collect();
    // Parallel runs may deliver in either order; compare as sets of (id, version, text, seq).
    whole.sort();
    moved.sort();
    assert_eq!(whole.len(), 8);
    assert_eq!(whole, moved);
    let engine = engine_with(vec![], Duration::from_secs(1)).0;
    assert!(matches!(
        engine.snapshot("nobody").await,
        Err(EngineError::UnknownConversation(_))
    ));
}

/// A first stage that is slow for "slow ..." messages and records the order it decided in.
#[derive(Default)]
struct Decider(Mutex<Vec<String>>);

#[async_trait]
impl Plugin for Decider {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let text = match &cx.event().detail {
            prompter_core::event::Detail::Message(m) => m.text.clone(),
            _ => String::new(),
        };
        if text.starts_with("slow") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.0.lock().unwrap().push(text);
        Ok(Flow::Continue(json!({})))
    }
}

#[tokio::test(start_paused = true)]
async fn first_stages_decide_in_trigger_order_even_when_runs_overlap() {
    let decider = Arc::new(Decider::default());
    let probe = Arc::new(Probe::default());
    let mut p = pipeline(probe, Concurrency::Parallel, None);
    p.stages[0] = Arc::new(Stage {
        id: "decide".into(),
        plugin_name: "decider".into(),
        plugin: decider.clone(),
        timeout: Duration::from_secs(30),
        on_error: OnError::Stop,
        metrics: Default::default(),
        fingerprint: 0,
    });
    let (engine, seen) = engine_with(vec![p], Duration::from_secs(60));
    engine.dispatch(said("a", 0, "slow first")).await;
    engine.dispatch(said("a", 10, "quick second")).await;
    engine.dispatch(said("a", 20, "slow third")).await;
    engine.finish().await;
    assert_eq!(
        *decider.0.lock().unwrap(),
        ["slow first", "quick second", "slow third"]
    );
    // Past their first stage, runs overlap: the second stage of "slow first" drafts and waits
    // 5 s, and the others complete meanwhile.
    assert_eq!(texts(&seen, "a").len(), 5);
}
