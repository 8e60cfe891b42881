//! `prompter bench`: events per second and per-event engine overhead on replayed calls.
//!
//! Each recording is replayed `iterations` times, each copy as its own conversation, all
//! interleaved by offset and run as fast as possible through the configured pipelines (the
//! offline LLM, so the figures are the engine's own cost, not a model's). Reported:
//! - throughput: events routed per second of wall time (reading the frames included);
//! - per-event engine time: the conversation task's own work per event, folding it into the
//!   state and starting the runs it triggers, p50/p99/max (the runs go on in their own tasks,
//!   so they are reported separately);
//! - per-suggestion pipeline time: the `total_us` that RTA outputs carry;
//! - per-run time of each pipeline: from a run's first stage to its end, p50/p99.
//!
//! With `--long-call 250,4000` it measures long calls instead ([`long_call`]): per
//! call length, a synthetic call of that many sentences followed by trackers that trigger the
//! RTA pipeline one at a time, so the per-suggestion cost at 4,000 sentences can be set against
//! the cost at 250.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prompter_core::event::{Detail, parse_frame};
use prompter_core::output::{Output, Status};

use crate::cli::{Stream, load_for_run, read_recordings, say};
use prompter_engine::engine::Engine;
use prompter_engine::recording::RecordedLine;
use prompter_engine::registry::Registry;
use prompter_engine::session::{self, Pace};
use prompter_engine::sink::FnSink;
use prompter_engine::stats::Stats;

/// Suggestions measured per call length in [`long_call`]: enough for a stable p99.
pub const LONG_CALL_SUGGESTIONS: usize = 1_000;

/// Suggestions of the unmeasured warm-up call that [`long_call`] runs first (caches, the
/// allocator's first pages), so the first size measured is not the one that pays for them.
const LONG_CALL_WARM_UP: usize = 100;

/// Runs the benchmark (or the long-call benchmark when `long_call` names call lengths).
pub async fn run(
    registry: &Registry,
    config: Option<PathBuf>,
    iterations: usize,
    recordings: Vec<PathBuf>,
    long_calls: &[usize],
    out: &Stream,
    err: &Stream,
) -> u8 {
    let config = config.unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    if !long_calls.is_empty() {
        let Some(recordings) = recordings_or_default(&config, recordings, err) else {
            return 1;
        };
        return long_call(registry, &config, &recordings, long_calls, out, err).await;
    }
    let Some(loaded) = load_for_run(registry, &config, err) else {
        return 1;
    };
    let Some(recordings) = recordings_or_default(&config, recordings, err) else {
        return 1;
    };
    let Some((lines, _)) = read_recordings(&recordings, err) else {
        return 1;
    };
    let iterations = iterations.max(1);
    let mut copies: Vec<RecordedLine> = Vec::with_capacity(lines.len() * iterations);
    for i in 0..iterations {
        for l in &lines {
            let mut c = l.clone();
            c.conversation = format!("{}#{i}", l.conversation).into();
            copies.push(c);
        }
    }
    copies.sort_by_key(|l| l.offset_ms);
    // The config's notifier sinks run too (none in the shipped config): a failing one must not
    // show in the engine's figures.
    let Some((sinks, notifiers)) = crate::cli::notifiers(&loaded, err) else {
        return 1;
    };
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
            if o.kind == "suggestion"
                && let Ok(mut v) = rta_sink.lock()
            {
                v.push(o.timings.total_us);
            }
        },
        sinks,
    )
    .await;
    crate::cli::report_notifiers(&notifiers, err);
    let mut samples = taken(stats.samples.as_ref());
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
            us(pct(&samples, 50.0)),
            us(pct(&samples, 99.0)),
            us(samples.last().copied().unwrap_or(0)),
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
    for (pipeline, runs) in runs_by_pipeline(&stats) {
        say(
            out,
            &format!(
                "per-run time, pipeline `{pipeline}`: p50 {:.1} us, p99 {:.1} us ({} runs)",
                us(pct(&runs, 50.0)),
                us(pct(&runs, 99.0)),
                runs.len()
            ),
        );
    }
    0
}

/// `recordings`, else `pipelines/recordings/*.jsonl` next to the config; `None` (said on
/// `err`) when there are none.
pub(crate) fn recordings_or_default(
    config: &Path,
    recordings: Vec<PathBuf>,
    err: &Stream,
) -> Option<Vec<PathBuf>> {
    if !recordings.is_empty() {
        return Some(recordings);
    }
    let dir = config
        .parent()
        .unwrap_or(Path::new("."))
        .join("pipelines/recordings/*.jsonl");
    let mut found: Vec<PathBuf> = glob::glob(&dir.to_string_lossy())
        .map(|g| g.filter_map(Result::ok).collect())
        .unwrap_or_default();
    found.sort();
    if found.is_empty() {
        say(
            err,
            "error: no recordings to run (pass some, or keep pipelines/recordings/*.jsonl next to the config)",
        );
        return None;
    }
    Some(found)
}

/// The samples collected so far (empty when sampling is off).
fn taken<T: Clone>(samples: Option<&Mutex<Vec<T>>>) -> Vec<T> {
    samples
        .and_then(|s| s.lock().ok().map(|v| v.clone()))
        .unwrap_or_default()
}

/// Per-run times by pipeline, each sorted, pipelines by name.
fn runs_by_pipeline(stats: &Stats) -> std::collections::BTreeMap<String, Vec<u64>> {
    let mut by: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for (pipeline, nanos) in taken(stats.run_samples.as_ref()) {
        by.entry(pipeline).or_default().push(nanos);
    }
    for v in by.values_mut() {
        v.sort_unstable();
    }
    by
}

/// Nanoseconds as microseconds.
fn us(nanos: u64) -> f64 {
    nanos as f64 / 1000.0
}

/// The sentences and tracker detections of the recordings, the material of synthetic calls.
struct Material {
    /// (speaker, sentence).
    sentences: Vec<(String, String)>,
    /// (tracker name, matched phrase).
    trackers: Vec<(String, String)>,
}

impl Material {
    fn from_recordings(lines: &[RecordedLine]) -> Material {
        let mut sentences = Vec::new();
        let mut trackers = Vec::new();
        for line in lines {
            let frame = line.frame.as_ref().clone();
            for e in parse_frame("material", 0, frame).unwrap_or_default() {
                match &e.detail {
                    Detail::Message(m) => {
                        sentences.push((m.speaker.label().to_owned(), m.text.clone()));
                    }
                    Detail::Tracker(t) if t.is_final => {
                        for p in t.phrases() {
                            if !trackers.contains(&(t.name.clone(), p.clone())) {
                                trackers.push((t.name.clone(), p));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        Material {
            sentences,
            trackers,
        }
    }

    /// Sentence `i` of a synthetic call, as a `message_response` frame.
    fn sentence(&self, i: usize) -> serde_json::Value {
        let (speaker, text) = &self.sentences[i % self.sentences.len()];
        serde_json::json!({"type": "message_response", "messages": [{
            "id": format!("m{i}"),
            "from": {"name": speaker},
            "payload": {"content": text, "contentType": "text/plain"}}]})
    }

    /// Detection `j` of a synthetic call: a recorded tracker with a phrase made distinct (so
    /// the RTA pipeline's dedupe lets every one through), as a final `tracker_response` frame.
    fn tracker(&self, j: usize) -> serde_json::Value {
        let (name, phrase) = &self.trackers[j % self.trackers.len()];
        serde_json::json!({"type": "tracker_response", "isFinal": true, "trackers": [{
            "name": name,
            "matches": [{"type": "vocabulary", "value": format!("{phrase} ({j})"),
                "messageRefs": []}]}]})
    }
}

/// What one long call measured.
struct LongCall {
    sentences: usize,
    /// Sorted `total_us` of the suggestions.
    suggestion_us: Vec<u64>,
    /// Sorted per-event engine time of the sentences, in nanoseconds.
    sentence_ns: Vec<u64>,
    /// Suggestions that did not arrive.
    missing: usize,
}

/// The long-call benchmark: for each size, one call of that many sentences, then
/// [`LONG_CALL_SUGGESTIONS`] trackers sent one at a time (each waits for its suggestion, so a
/// suggestion's time is its own, not a queue's), through the configured pipelines.
pub async fn long_call(
    registry: &Registry,
    config: &Path,
    recordings: &[PathBuf],
    sizes: &[usize],
    out: &Stream,
    err: &Stream,
) -> u8 {
    let Some((lines, _)) = read_recordings(recordings, err) else {
        return 1;
    };
    let material = Material::from_recordings(&lines);
    if material.sentences.is_empty() || material.trackers.is_empty() {
        say(
            err,
            "error: the long-call bench needs recordings with sentences and final tracker detections",
        );
        return 1;
    }
    let Some(loaded) = load_for_run(registry, config, err) else {
        return 1;
    };
    let warm_up = sizes.first().copied().unwrap_or(0).min(100);
    let mut warm = LiveCall::start(loaded, &material, warm_up).await;
    for j in 0..LONG_CALL_WARM_UP {
        warm.suggest(&material, j).await;
    }
    warm.finish().await;
    // Every size's call is built first, then their suggestions alternate (one for each size,
    // then the next), so a drift in the machine's speed weighs on every size alike.
    let mut live = Vec::with_capacity(sizes.len());
    for &n in sizes {
        let Some(loaded) = load_for_run(registry, config, err) else {
            return 1;
        };
        live.push(LiveCall::start(loaded, &material, n).await);
    }
    for j in 0..LONG_CALL_SUGGESTIONS {
        for call in &mut live {
            call.suggest(&material, j).await;
        }
    }
    let mut calls = Vec::with_capacity(live.len());
    for call in live {
        calls.push(call.finish().await);
    }
    for c in &calls {
        say(
            out,
            &format!(
                "long call, {} sentences: per-suggestion engine time p50 {} us, p99 {} us ({} suggestions, {} missing); per-sentence engine time p50 {:.1} us, p99 {:.1} us",
                c.sentences,
                pct(&c.suggestion_us, 50.0),
                pct(&c.suggestion_us, 99.0),
                c.suggestion_us.len(),
                c.missing,
                us(pct(&c.sentence_ns, 50.0)),
                us(pct(&c.sentence_ns, 99.0)),
            ),
        );
    }
    if let (Some(short), Some(long)) = (calls.first(), calls.last())
        && calls.len() > 1
    {
        let ratio = |p: f64| {
            pct(&long.suggestion_us, p) as f64 / pct(&short.suggestion_us, p).max(1) as f64
        };
        say(
            out,
            &format!(
                "long-call ratio, {} vs {} sentences: p50 {:.2}x, p99 {:.2}x",
                long.sentences,
                short.sentences,
                ratio(50.0),
                ratio(99.0)
            ),
        );
    }
    if calls.iter().any(|c| c.missing > 0) {
        return 1;
    }
    0
}

/// One synthetic call under way: its sentences folded, its suggestions measured one by one.
struct LiveCall {
    engine: Engine,
    stats: Arc<Stats>,
    rx: tokio::sync::mpsc::UnboundedReceiver<u64>,
    id: String,
    sentences: usize,
    suggestion_us: Vec<u64>,
    missing: usize,
}

impl LiveCall {
    /// A call of `sentences` sentences, folded.
    async fn start(
        loaded: prompter_engine::config::Loaded,
        material: &Material,
        sentences: usize,
    ) -> LiveCall {
        let stats = Arc::new(Stats::sampling());
        // At most one suggestion is in flight (each tracker waits for its own), so the channel
        // holds at most one value.
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
        let sink = FnSink::new("bench", move |o: &Output| {
            if o.kind == "suggestion" && o.status == Status::Final {
                let _ = tx.send(o.timings.total_us);
            }
        });
        let engine = Engine::new(
            loaded.pipelines,
            loaded.settings,
            vec![Box::new(sink)],
            stats.clone(),
        );
        let id = format!("long-call-{sentences}");
        for i in 0..sentences {
            for e in parse_frame(&id, i as u64 * 4_000, material.sentence(i)).unwrap_or_default() {
                engine.dispatch_from("replay", e).await;
            }
        }
        LiveCall {
            engine,
            stats,
            rx,
            id,
            sentences,
            suggestion_us: Vec::with_capacity(LONG_CALL_SUGGESTIONS),
            missing: 0,
        }
    }

    /// Sends tracker `j` and waits for its suggestion.
    async fn suggest(&mut self, material: &Material, j: usize) {
        let offset = self.sentences as u64 * 4_000 + j as u64 * 1_000;
        for e in parse_frame(&self.id, offset, material.tracker(j)).unwrap_or_default() {
            self.engine.dispatch_from("replay", e).await;
        }
        match tokio::time::timeout(Duration::from_secs(5), self.rx.recv()).await {
            Ok(Some(t)) => self.suggestion_us.push(t),
            _ => self.missing += 1,
        }
    }

    async fn finish(mut self) -> LongCall {
        self.engine.finish().await;
        // One conversation, folded in order: the first samples are the sentences'.
        let mut sentence_ns = taken(self.stats.samples.as_ref());
        sentence_ns.truncate(self.sentences);
        sentence_ns.sort_unstable();
        self.suggestion_us.sort_unstable();
        LongCall {
            sentences: self.sentences,
            suggestion_us: self.suggestion_us,
            sentence_ns,
            missing: self.missing,
        }
    }
}

/// The `p`th percentile (nearest rank) of sorted `v`; 0 when empty.
pub(crate) fn pct(v: &[u64], p: f64) -> u64 {
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

    let spec = prompter_engine::wasm::WasmSpec {
        metrics: Default::default(),
        stage: "echo".into(),
        module: module.clone(),
        config_json: "{}".into(),
        allow_hosts: vec![],
        limits: prompter_engine::wasm::Limits::default(),
        timeout: Duration::from_millis(1000),
        resources: Resources::default(),
    };
    let wasm = match prompter_engine::wasm::WasmPlugin::build(spec).await {
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
            prompter_engine::wasm::runtime::runtime()
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

/// A process's `/proc` figures, for the load benches (`feed_bench`, `twilio_bench`,
/// `live_bench`).
pub(crate) mod procfs {
    /// User+sys clock ticks of a `/proc/.../stat` line, and the task's name.
    pub(crate) fn stat_ticks(stat: &str) -> Option<(String, u64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let comm = stat.get(open + 1..close)?.to_owned();
        let rest: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
        // After the comm: state is field 3, utime field 14, stime field 15.
        let utime: u64 = rest.get(11)?.parse().ok()?;
        let stime: u64 = rest.get(12)?.parse().ok()?;
        Some((comm, utime + stime))
    }

    /// `VmRSS` and `VmHWM` of process `pid` (`self` for this one), in KiB.
    pub(crate) fn memory_kib(pid: &str) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (kib("VmRSS:"), kib("VmHWM:"))
    }

    /// The soft limit on open files, when it can be read (`None` also for unlimited).
    pub(crate) fn open_files_limit() -> Option<u64> {
        open_files_limits().0
    }

    /// The soft and hard limits on open files (`None`: unlimited or unreadable).
    pub(crate) fn open_files_limits() -> (Option<u64>, Option<u64>) {
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
            return (None, None);
        };
        let mut values = line
            .trim_start_matches("Max open files")
            .split_whitespace()
            .map(|v| v.parse::<u64>().ok());
        (values.next().flatten(), values.next().flatten())
    }
}
