//! Hot reload under load: 100 reloads, alternating two valid configurations and an invalid
//! one, while 1,000 calls replay through the engine. Every event is handled exactly once,
//! every invalid reload is refused with its diagnostics while the old config keeps serving,
//! and every output comes from the configuration its conversation was on.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prompter_core::event::Event;
use prompter_core::output::Output;
use prompter_engine::config::{self, LoadRequest};
use prompter_engine::engine::{Engine, Observer};
use prompter_engine::recording;
use prompter_engine::registry;
use prompter_engine::reload::Reloader;
use prompter_engine::sink::{FnSink, QueuePolicy};
use prompter_engine::stats::Stats;

use crate::cli::root;

const CALLS: usize = 1_000;
const RELOADS: usize = 100;

/// Counts the events each conversation folded.
#[derive(Default)]
struct Folded(Mutex<HashMap<String, usize>>);

impl Observer for Folded {
    fn folded(&self, event: &Event) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(event.conversation_id.to_string())
            .or_default() += 1;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Variant {
    /// The shipped pipelines.
    A,
    /// The recap's title changed (a stage's config), a pipeline added.
    B,
    /// The added pipeline names a plugin that does not exist.
    Invalid,
}

const EXTRA_B: &str = "pipeline: extra\non: [conversation_completed]\nstages:\n  - id: note\n    plugin: notify\n    config:\n      kind: note\n      text: \"extra from B\"\n";
const EXTRA_INVALID: &str =
    "pipeline: extra\non: [conversation_completed]\nstages:\n  - id: note\n    plugin: notiffy\n";

fn write_variant(dir: &Path, v: Variant) {
    let recap = std::fs::read_to_string(root().join("pipelines/call_recap.yaml")).unwrap();
    let extra = dir.join("pipelines/extra.yaml");
    match v {
        Variant::A => {
            std::fs::write(dir.join("pipelines/call_recap.yaml"), recap).unwrap();
            let _ = std::fs::remove_file(&extra);
        }
        Variant::B => {
            let b = recap.replace("title: \"Call recap\"", "title: \"Call recap (B)\"");
            assert_ne!(b, recap);
            std::fs::write(dir.join("pipelines/call_recap.yaml"), b).unwrap();
            std::fs::write(&extra, EXTRA_B).unwrap();
        }
        Variant::Invalid => std::fs::write(&extra, EXTRA_INVALID).unwrap(),
    }
}

/// The 4 shipped recordings, 250 times each, every copy its own conversation.
fn calls() -> Vec<Vec<Event>> {
    let dir = root().join("pipelines/recordings");
    let mut originals = Vec::new();
    for name in [
        "acme-discovery-call.jsonl",
        "billing-dispute-call.jsonl",
        "globex-renewal-call.jsonl",
        "initech-demo-call.jsonl",
    ] {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let (lines, problems) = recording::parse(&path, 0, &text);
        assert!(problems.is_empty());
        let events: Vec<Event> = lines
            .iter()
            .flat_map(|l| recording::events(l, &path).unwrap())
            .collect();
        originals.push(events);
    }
    (0..CALLS)
        .map(|i| {
            let id: Arc<str> = Arc::from(format!("call-{i:04}"));
            originals[i % originals.len()]
                .iter()
                .map(|e| {
                    let mut e = e.clone();
                    e.conversation_id = id.clone();
                    e
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_nothing_repeat_nothing_and_switch_each_call_at_an_event() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pipelines/data")).unwrap();
    for f in ["rta.yaml", "open_questions.yaml", "call_recap.yaml"] {
        std::fs::copy(
            root().join("pipelines").join(f),
            dir.path().join("pipelines").join(f),
        )
        .unwrap();
    }
    std::fs::copy(
        root().join("pipelines/data/sales_objections.csv"),
        dir.path().join("pipelines/data/sales_objections.csv"),
    )
    .unwrap();
    let config = dir.path().join("prompter.yaml");
    std::fs::copy(root().join("prompter.yaml"), &config).unwrap();
    write_variant(dir.path(), Variant::A);

    let env = |_: &str| None;
    let loaded = config::load(
        &LoadRequest {
            config: Some(&config),
            files: &[],
            include_config_pipelines: true,
            env: &env,
            metrics: None,
        },
        &registry::builtin(),
    )
    .unwrap_or_else(|d| panic!("{}", d.render()));
    let outputs: Arc<Mutex<Vec<Output>>> = Arc::default();
    let into = outputs.clone();
    // A lossless sink: every version is kept.
    let sink = FnSink::new("test", move |o: &Output| {
        into.lock().unwrap().push(o.clone())
    })
    .with_policy(QueuePolicy {
        capacity: 4096,
        coalesce: false,
    });
    let folded = Arc::new(Folded::default());
    let stats = Arc::new(Stats::default());
    let engine = Arc::new(
        Engine::new(
            loaded.pipelines,
            loaded.settings,
            vec![Box::new(sink)],
            stats.clone(),
        )
        .with_observer(folded.clone()),
    );
    let reloader = Reloader::new(engine.clone(), config.clone());

    let calls = calls();
    let expected: HashMap<String, usize> = calls
        .iter()
        .map(|c| (c[0].conversation_id.to_string(), c.len()))
        .collect();
    let total: usize = expected.values().sum();
    // Calls start at different steps, so they end (and get their recap) all along the reloads.
    let start = |i: usize| i % 37;
    let steps = calls
        .iter()
        .enumerate()
        .map(|(i, c)| start(i) + c.len())
        .max()
        .unwrap();

    // The replay, event by event across all calls, keeping pace with the reloads so that they
    // happen all along it.
    let reloads_done = Arc::new(AtomicUsize::new(0));
    let replay = {
        let engine = engine.clone();
        let done = reloads_done.clone();
        tokio::spawn(async move {
            for step in 0..steps {
                while done.load(Ordering::SeqCst) * steps < step * RELOADS {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                for (i, call) in calls.iter().enumerate() {
                    if let Some(e) = step.checked_sub(start(i)).and_then(|s| call.get(s)) {
                        engine.dispatch(e.clone()).await;
                    }
                }
            }
        })
    };

    // Generation 1 is variant A; each valid reload's generation, its variant.
    let mut variant_of: HashMap<u64, Variant> = HashMap::from([(1, Variant::A)]);
    let mut refused = 0;
    for i in 0..RELOADS {
        let v = [Variant::B, Variant::Invalid, Variant::A][i % 3];
        write_variant(dir.path(), v);
        let before = engine.generation();
        let report = reloader.reload().await;
        if v == Variant::Invalid {
            refused += 1;
            assert!(!report.ok, "{report:?}");
            assert_eq!(report.generation, before, "the old config keeps serving");
            assert_eq!(engine.generation(), before);
            let text = report.diagnostics.join("\n");
            assert!(
                text.contains("extra.yaml:5:13: error: unknown plugin `notiffy`"),
                "{text}"
            );
        } else {
            assert!(report.ok, "{report:?}");
            assert_eq!(report.generation, before + 1);
            variant_of.insert(report.generation, v);
        }
        reloads_done.fetch_add(1, Ordering::SeqCst);
    }
    replay.await.unwrap();
    engine.finish().await;

    // Every event exactly once.
    assert_eq!(stats.events.load(Ordering::Relaxed) as usize, total);
    assert_eq!(*folded.0.lock().unwrap(), expected);
    assert_eq!(refused, RELOADS / 3);
    assert!(
        stats
            .metrics
            .render()
            .contains("prompter_config_reloads_total{result=\"rejected\"} 33")
    );

    // Every output from the config its conversation was on, generations never going back.
    let outputs = outputs.lock().unwrap();
    let mut last: HashMap<&str, (u64, u64)> = HashMap::new();
    let mut recaps = HashMap::<Variant, usize>::new();
    for o in outputs.iter() {
        let v = variant_of
            .get(&o.generation)
            .copied()
            .unwrap_or_else(|| panic!("output from unknown generation {}: {o:?}", o.generation));
        let (gen_before, seq_before) = last
            .get(o.conversation_id.as_str())
            .copied()
            .unwrap_or((0, 0));
        assert!(o.seq > seq_before);
        assert!(
            o.generation >= gen_before,
            "{} went back from generation {gen_before} to {}",
            o.conversation_id,
            o.generation
        );
        last.insert(o.conversation_id.as_str(), (o.generation, o.seq));
        match o.pipeline.as_str() {
            "call_recap" => {
                let want = if v == Variant::B {
                    "Call recap (B)"
                } else {
                    "Call recap"
                };
                assert_eq!(
                    o.title.as_deref(),
                    Some(want),
                    "generation {}",
                    o.generation
                );
                *recaps.entry(v).or_default() += 1;
            }
            "extra" => assert_eq!(v, Variant::B, "{o:?}"),
            _ => {}
        }
    }
    // Calls switched mid-call many times over.
    let generations: std::collections::HashSet<u64> =
        outputs.iter().map(|o| o.generation).collect();
    assert!(generations.len() > 20, "{generations:?}");
    // Each call completed once, with one recap; both configurations served some of them.
    assert_eq!(recaps.values().sum::<usize>(), CALLS);
    assert!(
        recaps.get(&Variant::A).copied().unwrap_or(0) > 0,
        "{recaps:?}"
    );
    assert!(
        recaps.get(&Variant::B).copied().unwrap_or(0) > 0,
        "{recaps:?}"
    );
}
