//! An overloaded engine (`engine.overload`): runs in flight are bounded; under `shed` the
//! low-priority pipeline's runs are dropped first and counted, the high-priority one's never;
//! under `backpressure` nothing is dropped and the bound holds; every event is folded into its
//! conversation either way.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use prompter_core::event::parse_frame;
use prompter_core::output::{Output, Status};
use prompter_engine::metrics::Metrics;
use prompter_fakes::openai::{CHAT_MODEL, OpenAiFake};
use serde_json::json;

use crate::engine_api::{engine_on, metric};

const CALLS: usize = 8;
const SAID: usize = 3;
const MAX_RUNS: usize = 4;

fn pipeline(name: &str, priority: &str) -> String {
    format!(
        "pipeline: {name}\non: [message_response]\npriority: {priority}\nstages:\n\
         \x20 - {{ id: prompt, plugin: prompt, config: {{}} }}\n\
         \x20 - {{ id: answer, plugin: chat, timeout_ms: 30000, config: {{ llm: gpt, prompt: prompt }} }}\n\
         \x20 - {{ id: deliver, plugin: notify, config: {{ kind: suggestion, title: \"{name}\", text: \"{{{{ stages.answer.text }}}}\" }} }}\n"
    )
}

struct Outcome {
    outputs: Vec<Output>,
    text: String,
    max_in_flight: f64,
    transcript_lines: Vec<usize>,
}

async fn overload(policy: &str) -> Outcome {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = OpenAiFake::start().await;
    // Each answer takes 150 ms: runs pile up behind the slots.
    fake.set_delay(Duration::from_millis(150));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("low.yaml"), pipeline("low", "low")).unwrap();
    std::fs::write(dir.path().join("high.yaml"), pipeline("high", "high")).unwrap();
    let cfg = format!(
        "pipelines: [low.yaml, high.yaml]\n\
         llm:\n  gpt: {{ provider: openai, config: {{ base_url: \"{}\", model: {CHAT_MODEL} }} }}\n\
         engine:\n  overload: {{ max_runs: {MAX_RUNS}, policy: {policy} }}\n",
        fake.url
    );
    let config = dir.path().join("prompter.yaml");
    std::fs::write(&config, cfg).unwrap();
    let metrics = Arc::new(Metrics::new());
    let (engine, seen) = engine_on(&config, metrics.clone());
    let engine = Arc::new(engine);
    // Watch the slots while the calls run.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, peak, metrics) = (stop.clone(), peak.clone(), metrics.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = metric(&metrics.render(), "prompter_runs_in_flight") as usize;
                peak.fetch_max(n, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut feeders = Vec::new();
    for call in 0..CALLS {
        let engine = engine.clone();
        feeders.push(tokio::spawn(async move {
            for i in 0..SAID {
                let frame = json!({"type": "message_response", "messages": [{
                    "id": format!("m{call}-{i}"), "payload": {"content": format!("sentence {i}")},
                    "from": {"name": "Customer"}}]});
                for e in parse_frame(&format!("call-{call}"), 1000 * i as u64, frame).unwrap() {
                    engine.dispatch(e).await;
                }
            }
        }));
    }
    for f in feeders {
        f.await.unwrap();
    }
    let mut transcript_lines = Vec::new();
    for call in 0..CALLS {
        let snapshot = engine.snapshot(&format!("call-{call}")).await.unwrap();
        transcript_lines.push(snapshot.state.transcript.len());
    }
    engine.finish().await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let outputs = seen.lock().unwrap().clone();
    Outcome {
        outputs,
        text: metrics.render(),
        max_in_flight: peak.load(Ordering::Relaxed) as f64,
        transcript_lines,
    }
}

fn finals(o: &Outcome, pipeline: &str) -> f64 {
    o.outputs
        .iter()
        .filter(|x| x.pipeline == pipeline && x.status == Status::Final)
        .count() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shedding_drops_low_priority_runs_first_and_never_the_transcript() {
    let o = overload("shed").await;
    let runs = (CALLS * SAID) as f64;
    let shed = |p: &str| {
        metric(
            &o.text,
            &format!("prompter_runs_shed_total{{pipeline=\"{p}\"}}"),
        )
    };
    assert_eq!(finals(&o, "high"), runs, "{}", o.text);
    assert_eq!(shed("high"), 0.0);
    assert!(shed("low") > 0.0, "{}", o.text);
    assert_eq!(finals(&o, "low") + shed("low"), runs, "{}", o.text);
    assert_eq!(o.transcript_lines, vec![SAID; CALLS]);
    assert_eq!(metric(&o.text, "prompter_overload_waits_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_drops_nothing_and_keeps_the_bound() {
    let o = overload("backpressure").await;
    let runs = (CALLS * SAID) as f64;
    assert_eq!(finals(&o, "high"), runs, "{}", o.text);
    assert_eq!(finals(&o, "low"), runs, "{}", o.text);
    assert!(
        !o.text
            .lines()
            .any(|l| l.starts_with("prompter_runs_shed_total") && !l.ends_with(" 0"))
    );
    assert!(
        metric(&o.text, "prompter_overload_waits_total") > 0.0,
        "{}",
        o.text
    );
    assert!(o.max_in_flight <= MAX_RUNS as f64, "{}", o.max_in_flight);
    assert_eq!(o.max_in_flight, MAX_RUNS as f64, "the slots were all used");
    assert_eq!(o.transcript_lines, vec![SAID; CALLS]);
}
