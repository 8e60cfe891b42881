//! `prompter bench`: events per second and per-event engine overhead on replayed calls.
//!
//! Each recording is replayed `iterations` times, each copy as its own conversation, all
//! interleaved by offset and run as fast as possible through the configured pipelines (the
//! offline LLM, so the figures are the engine's own cost, not a model's). Reported:
//! - throughput: events routed per second of wall time;
//! - per-event engine time: from the conversation task taking the event to every pipeline
//!   having finished with it (state update, filters, stages, delivery), p50/p99/max;
//! - per-suggestion pipeline time: the `total_us` that RTA outputs carry.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::cli::{Stream, load_for_run, read_recordings, say};
use crate::recording::RecordedLine;
use crate::registry::Registry;
use crate::session::{self, Pace};
use crate::stats::Stats;

/// Runs the benchmark.
pub async fn run(
    registry: &Registry,
    config: Option<PathBuf>,
    iterations: usize,
    recordings: Vec<PathBuf>,
    out: &Stream,
    err: &Stream,
) -> u8 {
    let config = config.unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let Some(loaded) = load_for_run(registry, &config, err) else {
        return 1;
    };
    let recordings = if recordings.is_empty() {
        let dir = config
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join("pipelines/recordings/*.jsonl");
        let mut found: Vec<PathBuf> = glob::glob(&dir.to_string_lossy())
            .map(|g| g.filter_map(Result::ok).collect())
            .unwrap_or_default();
        found.sort();
        found
    } else {
        recordings
    };
    if recordings.is_empty() {
        say(
            err,
            "error: no recordings to run (pass some, or keep pipelines/recordings/*.jsonl next to the config)",
        );
        return 1;
    }
    let Some((lines, _)) = read_recordings(&recordings, err) else {
        return 1;
    };
    let iterations = iterations.max(1);
    let mut copies: Vec<RecordedLine> = Vec::with_capacity(lines.len() * iterations);
    for i in 0..iterations {
        for l in &lines {
            let mut c = l.clone();
            c.conversation = format!("{}#{i}", l.conversation);
            copies.push(c);
        }
    }
    copies.sort_by_key(|l| l.offset_ms);
    let stats = Arc::new(Stats::sampling());
    let rta_us: Arc<Mutex<Vec<u64>>> = Arc::default();
    let rta_sink = rta_us.clone();
    let summary = session::run(
        loaded,
        copies,
        &recordings,
        Pace::Fast,
        stats.clone(),
        |_| {},
        |_| {},
        move |o| {
            if o.kind == "suggestion" {
                if let Ok(mut v) = rta_sink.lock() {
                    v.push(o.timings.total_us);
                }
            }
        },
    )
    .await;
    let mut samples = stats
        .samples
        .as_ref()
        .and_then(|s| s.lock().ok().map(|v| v.clone()))
        .unwrap_or_default();
    samples.sort_unstable();
    let mut rta = rta_us.lock().map(|v| v.clone()).unwrap_or_default();
    rta.sort_unstable();
    let secs = summary.elapsed.as_secs_f64().max(1e-9);
    say(
        out,
        &format!(
            "bench: {} recording(s) x {iterations} = {} events, {} conversations, {} outputs, {} stage errors",
            recordings.len(),
            summary.events,
            stats.conversations_opened.load(Ordering::Relaxed),
            summary.outputs,
            summary.stage_errors
        ),
    );
    say(
        out,
        &format!(
            "throughput: {:.0} events/s ({:.3} s wall, {} cores)",
            summary.events as f64 / secs,
            secs,
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        ),
    );
    say(
        out,
        &format!(
            "per-event engine time: p50 {:.1} us, p99 {:.1} us, max {:.1} us ({} events)",
            pct(&samples, 50.0) as f64 / 1000.0,
            pct(&samples, 99.0) as f64 / 1000.0,
            samples.last().copied().unwrap_or(0) as f64 / 1000.0,
            samples.len()
        ),
    );
    say(
        out,
        &format!(
            "per-suggestion RTA pipeline time: p50 {} us, p99 {} us ({} suggestions)",
            pct(&rta, 50.0),
            pct(&rta, 99.0),
            rta.len()
        ),
    );
    0
}

/// The `p`th percentile (nearest rank) of sorted `v`; 0 when empty.
fn pct(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// The built-in twin of the echo plugin (`sdk/testing/echo`): the same logic, natively.
struct NativeEcho;

#[prompter_core::async_trait]
impl prompter_core::plugin::Plugin for NativeEcho {
    async fn process(
        &self,
        cx: &prompter_core::plugin::StageContext<'_>,
    ) -> Result<prompter_core::plugin::Flow, prompter_core::error::PluginError> {
        let text = match &cx.event().detail {
            prompter_core::event::Detail::Message(m) => m.text.clone(),
            _ => String::new(),
        };
        let lines = cx.conversation().transcript.len();
        Ok(prompter_core::plugin::Flow::Continue(
            serde_json::json!({"echo": text, "lines": lines}),
        ))
    }
}

/// `prompter plugin bench`: per-call cost of a Wasm stage against the same logic built in.
pub async fn wasm(module: PathBuf, iterations: usize, out: &Stream, err: &Stream) -> u8 {
    use prompter_core::conversation::ConversationState;
    use prompter_core::plugin::{Plugin, Resources, RunScope, StageContext};
    use std::time::{Duration, Instant};

    let spec = crate::wasm::WasmSpec {
        stage: "echo".into(),
        module: module.clone(),
        config_json: "{}".into(),
        allow_hosts: vec![],
        limits: crate::wasm::Limits::default(),
        timeout: Duration::from_millis(1000),
        resources: Resources::default(),
    };
    let wasm = match crate::wasm::WasmPlugin::build(spec).await {
        Ok(p) => p,
        Err(e) => {
            say(err, &format!("error: {}", e.message));
            return 1;
        }
    };
    // A mid-call conversation: 20 transcript lines, then a customer sentence.
    let mut state = ConversationState::new("bench");
    let mut event = None;
    let n_lines: u64 = std::env::var("PROMPTER_BENCH_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(21);
    for i in 0..n_lines {
        let frame = serde_json::json!({"type": "message_response", "messages": [{
            "from": {"name": if i % 2 == 0 { "Customer" } else { "Agent" }, "userId": "+15550100"},
            "payload": {"content": format!("Sentence number {i} of a realistic sales call, about pricing and timing.")},
            "sentiment": {"polarity": {"score": 0.1}}}]});
        let mut events =
            prompter_core::event::parse_frame("bench", i * 4000, frame).unwrap_or_default();
        if let Some(e) = events.pop() {
            state.apply(&e);
            event = Some(e);
        }
    }
    let Some(event) = event else { return 1 };
    let host = prompter_core::book::LocalHost::default();
    let run = prompter_core::plugin::Run::new(1, "bench/echo/e-0".into());
    let (event, state) = (Arc::new(event), Arc::new(state));
    let iterations = iterations.max(100);
    let measure = async |plugin: &dyn Plugin| -> Result<Vec<u64>, String> {
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..iterations + iterations / 10 {
            let scope = RunScope::new(event.clone(), state.clone());
            let cx = StageContext::alone("bench", "echo", &scope, &run, &host);
            let t0 = Instant::now();
            plugin.process(&cx).await.map_err(|e| e.message)?;
            // The first tenth warms caches and the instance pool.
            if i >= iterations / 10 {
                samples.push(t0.elapsed().as_nanos() as u64);
            }
        }
        samples.sort_unstable();
        Ok(samples)
    };
    let native = match measure(&NativeEcho).await {
        Ok(s) => s,
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };
    let guest = match measure(&wasm).await {
        Ok(s) => s,
        Err(e) => {
            say(err, &format!("error: the plugin failed: {e}"));
            return 1;
        }
    };
    let us = |v: u64| v as f64 / 1000.0;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64 / 1000.0;
    say(
        out,
        &format!(
            "plugin bench: {} calls each, event with a 21-line conversation, pooling allocator: {}",
            iterations,
            crate::wasm::runtime::runtime()
                .map(|r| r.pooling)
                .unwrap_or(false)
        ),
    );
    say(
        out,
        &format!(
            "built-in stage: p50 {:.2} us, p99 {:.2} us, mean {:.2} us",
            us(pct(&native, 50.0)),
            us(pct(&native, 99.0)),
            mean(&native)
        ),
    );
    say(
        out,
        &format!(
            "wasm stage:     p50 {:.2} us, p99 {:.2} us, mean {:.2} us",
            us(pct(&guest, 50.0)),
            us(pct(&guest, 99.0)),
            mean(&guest)
        ),
    );
    let p50_overhead = us(pct(&guest, 50.0)) - us(pct(&native, 50.0));
    say(
        out,
        &format!(
            "wasm overhead per call: {:.2} us at p50 ({:.1}x the built-in stage's time)",
            p50_overhead,
            pct(&guest, 50.0) as f64 / pct(&native, 50.0).max(1) as f64
        ),
    );
    0
}

#[cfg(test)]
mod tests {
    use super::pct;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(pct(&v, 50.0), 50);
        assert_eq!(pct(&v, 99.0), 99);
        assert_eq!(pct(&[7], 99.0), 7);
        assert_eq!(pct(&[], 50.0), 0);
    }
}
