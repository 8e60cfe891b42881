//! `prompter bench --live-calls N [--seconds S] [--speed X] [--json]`: the engine on N live
//! calls at a time, as deployed, with every event and output accounted for.
//!
//! The engine under test is a **child process**, the real `prompter run` (this same binary)
//! with `--listen 127.0.0.1:0`, on a config written to a temporary folder: the shipped live
//! Real-Time Assist pipeline (`pipelines/live/rta.yaml`: Nebula embeddings, Nebula's streamed
//! chat, a 1.5 s deadline and the offline fallback) and the offline `open_questions` and
//! `call_recap` pipelines, from the binary's bundle, with the sales knowledge base indexed by
//! `prompter kb ingest` (another child) through the fake Nebula. Symbl's Conversation API
//! summary (`pipelines/live/call_summary.yaml`) is left out.
//!
//! This process holds the fakes (module `fakes`), each on its own runtime thread so its CPU time is
//! reported apart: **Symbl** (`fake-symbl`: the token endpoint and the Subscribe API) and
//! **Nebula** (`fake-nebula`: embeddings after 30 ms; a streamed answer whose first words come
//! after 250 ms and the rest in 8 more pieces 40 ms apart).
//!
//! **Calls.** N call *slots* run at once, each placing calls back to back until the steady
//! window ends: a call is a Symbl connection `load-NNNNNN` announced to the engine on its
//! control API (`POST /connections/{id}`), which the engine follows on the Subscribe API; the
//! fake's socket then plays one of the four shipped recordings (slots rotate over them), each
//! frame at its recorded offset divided by the speed, with the recording's conversation id
//! replaced by the call's everywhere in the frame, and after `conversation_completed` closes
//! normally. The default speed (about 3.1x real time) makes a call send 2 frames per second
//! on average over the four recordings; calls then last 16 to 24 s. The slots' first calls
//! start spread over a mean call's length (about 19 s; `N / 500` seconds when longer), so the
//! calls in progress are at every point of their recordings rather than in step, and at most
//! 256 calls wait for their socket at once, so connects are paced.
//!
//! **Calibration.** Before the load, one call per recording runs alone; the final cards each
//! produces (its outputs whose latest version is `final`, named by pipeline and key, or by
//! trigger for outputs named after their event) are what every call of that recording must
//! produce under load.
//!
//! **Measured.** The child's `VmRSS` idle (before any call), after the calibration, and every
//! 500 ms of the steady window, which starts 2 s after every slot's first call went live and
//! lasts `--seconds`; `VmHWM` at the end; its CPU time (utime+stime) over the window. Per call:
//! (mean RSS in the window − idle RSS) / N. For every `final` output version: its **engine
//! time** (`timings.received_us − timings.waited_us`: from the trigger's receipt to the output,
//! less the time the run waited on the LLM and the embedder) and its **wall time** (from the
//! fake's send of the triggering frame to this process reading the output line). Accounting:
//! **events lost** (the events the frames sent make, counted with the engine's own parser,
//! against `prompter_events_received_total{source="symbl"}` scraped at the end), **outputs
//! duplicated** (an (id, version) printed twice), **outputs lost** (calibrated final cards a
//! call did not end with). Any loss, duplicate, failed call or engine failure exits 1.

mod fakes;
mod faults;
mod outputs;
mod report;
mod script;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};

use crate::bench_child::{
    Cpu, Engine, StderrLog, cpu_now, memory, raise_open_files_limit, run_command,
    single_thread_runtime, this_program,
};
use crate::cli::{Stream, say};
use fakes::{Call, NEBULA_KEY, NebulaSide, Stage, SymblSide, ns_since};
pub use faults::Fault;
use faults::{FAULT_AT, FaultSwitch, MIN_FAULT_WINDOW};
use outputs::OutputLog;
use script::{RECORDINGS, Script};

/// Steady window when `--seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 60;
/// Interim captions every this many words when `--interim-words` is not given.
pub const DEFAULT_INTERIM_WORDS: usize = script::INTERIM_WORDS;
/// More calls than this would not fit one machine's open files anyway.
const MAX_CALLS: usize = 50_000;
const MAX_SECONDS: u64 = 3_600;
const MAX_INTERIM_WORDS: usize = 1_000;
/// The slots' first calls start at this rate at most (and spread over at least a mean call's
/// length).
const STARTS_PER_SECOND: usize = 500;
/// Calls placed and waiting for their socket, at most.
const IN_FLIGHT: usize = 256;
/// Left out of the steady window after the last slot's first call went live.
const SETTLE: Duration = Duration::from_secs(2);
/// How long the engine may take to subscribe once told to follow a call.
const CONNECT_WAIT: Duration = Duration::from_secs(20);
/// How much longer than its recording a call may take.
const CALL_GRACE: Duration = Duration::from_secs(30);
/// Outputs are settled when none came for this long (a streamed answer ends within the RTA
/// pipeline's 1.5 s deadline)...
const QUIET: Duration = Duration::from_secs(2);
/// ... or after this, whatever comes.
const QUIET_CAP: Duration = Duration::from_secs(30);
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Open files needed besides one socket per call, in this process and in the engine (its
/// Nebula connections, the control API, files).
const SPARE_FDS: u64 = 1_024;
/// Call errors quoted in the report.
const FIRST_ERRORS: usize = 5;
const SYMBL_THREAD: &str = "fake-symbl";
const NEBULA_THREAD: &str = "fake-nebula";
/// The threads whose CPU time is read apart, in this order (the last reads the child's
/// outputs: see [`crate::bench_child::Engine::spawn`]).
const THREADS: [&str; 3] = [SYMBL_THREAD, NEBULA_THREAD, "engine-stdout"];
/// The pipelines the child runs (bundle paths), and the knowledge base.
const PIPELINES: [&str; 3] = [
    "pipelines/live/rta.yaml",
    "pipelines/open_questions.yaml",
    "pipelines/call_recap.yaml",
];
const KNOWLEDGE: &str = "pipelines/data/sales_objections.csv";
/// The webhook sink's secret (for the sink-stall fault): its variable and value.
const WEBHOOK_SECRET_ENV: &str = "PROMPTER_BENCH_WEBHOOK_SECRET";
const WEBHOOK_SECRET: &str = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQtb2YtdGhlLWxvYWQ=";
/// The webhook sink's dead letters, in the run's folder.
const DEAD_LETTERS: &str = "dead-letters-hook.jsonl";

/// Options of the live bench (`prompter bench --live-calls N ...`).
#[derive(Debug, Clone)]
pub struct LiveBenchArgs {
    /// Calls at a time.
    pub calls: usize,
    /// Length of the steady window, in seconds.
    pub seconds: u64,
    /// Replay speed, times real time.
    pub speed: f64,
    /// An interim caption every this many words of speech (0: only the recordings' frames).
    pub interim_words: usize,
    /// The fault to inject, if any.
    pub fault: Option<Fault>,
    /// Print the report as one JSON object instead of text.
    pub json: bool,
}

/// Runs the live bench; prints its report on `out`. Exit code 1 when an event or output was
/// lost or duplicated, a call failed or the engine failed.
pub async fn run(args: LiveBenchArgs, out: &Stream, err: &Stream) -> u8 {
    match bench(&args, out, err).await {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            say(err, &format!("error: {e}"));
            1
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn bench(args: &LiveBenchArgs, out: &Stream, err: &Stream) -> Result<bool, String> {
    let n = args.calls;
    if !(1..=MAX_CALLS).contains(&n) {
        return Err(format!("--live-calls must be between 1 and {MAX_CALLS}"));
    }
    if !(1..=MAX_SECONDS).contains(&args.seconds) {
        return Err(format!("--seconds must be between 1 and {MAX_SECONDS}"));
    }
    if !(1.0..=100.0).contains(&args.speed) {
        return Err("--speed must be between 1 and 100".into());
    }
    if args.fault.is_some() && args.seconds < MIN_FAULT_WINDOW {
        return Err(format!(
            "a fault run needs a window of at least {MIN_FAULT_WINDOW} s (--seconds): the fault starts {} s in, lasts up to 10 s, and the engine must recover",
            FAULT_AT.as_secs()
        ));
    }
    if args.interim_words > MAX_INTERIM_WORDS {
        return Err(format!(
            "--interim-words must be between 0 (none) and {MAX_INTERIM_WORDS}"
        ));
    }
    let open_files = raise_open_files_limit();
    let need = n as u64 + SPARE_FDS;
    if let Some(limit) = open_files
        && limit < need
    {
        return Err(format!(
            "{n} calls need about {need} open files in this process and in the engine (a socket per call on each side), but the limit is {limit}: raise it with `ulimit -n {need}`"
        ));
    }
    let script = Arc::new(Script::load(args.speed, args.interim_words)?);
    let symbl_rt = single_thread_runtime(SYMBL_THREAD)?;
    let nebula_rt = single_thread_runtime(NEBULA_THREAD)?;
    let epoch = Instant::now();
    let switch = Arc::new(FaultSwitch::new(args.fault));
    let symbl = Arc::new(SymblSide::new(epoch, script.clone(), switch.clone()));
    let nebula = Arc::new(NebulaSide {
        fault: switch,
        ..NebulaSide::default()
    });
    let measured = measure(args, &script, &symbl, &nebula, (&symbl_rt, &nebula_rt), err).await;
    symbl_rt.shutdown_background();
    nebula_rt.shutdown_background();
    let mut run = measured?;
    run.open_files = open_files;
    let (report, ok) = report::figures(&run, &script, &symbl, &nebula);
    if args.json {
        say(out, &report.to_string());
    } else {
        for l in report::text(&report) {
            say(out, &l);
        }
    }
    Ok(ok)
}

/// What a run measured, before it is reduced to figures.
struct Run {
    calls: usize,
    seconds: u64,
    interim_words: usize,
    stagger: Duration,
    pid: u32,
    startup_s: f64,
    ingest_s: f64,
    open_files: Option<u64>,
    /// The steady window, in nanoseconds since the epoch, and its length.
    window: (u64, u64),
    window_s: f64,
    cpu: (Cpu, Cpu),
    engine_cpu_total: u64,
    rss_idle: u64,
    rss_warm: u64,
    rss_samples: Vec<u64>,
    /// Calls live at each sample.
    live_samples: Vec<u64>,
    hwm: u64,
    /// Every call placed, by number (the first [`RECORDINGS`]`.len()` are the calibration).
    placed: Vec<Arc<Call>>,
    /// Per recording: the final cards its calibration call ended with, and their count by
    /// pipeline.
    expected: Vec<HashSet<u64>>,
    calibration: Vec<Vec<(String, usize)>>,
    errors: Errors,
    /// What the engine's metrics said at the end, or why they could not be read.
    scraped: Result<Scraped, String>,
    exit: Result<std::process::ExitStatus, String>,
    stderr: StderrLog,
    outputs: OutputLog,
    fault: Option<Fault>,
    /// When the fault started and ended, in nanoseconds since the epoch.
    fault_ns: Option<(u64, u64)>,
    /// Stopped by SIGTERM under load (the `terminate` fault).
    terminated: bool,
    /// The webhook sink's dead letters: (output id, version).
    dead_letters: Vec<(String, u32)>,
}

/// Call failures: how many, and the first few.
#[derive(Debug, Default)]
struct Errors {
    count: u64,
    first: Vec<String>,
}

/// Places calls: tells the engine to follow them and waits for their recordings to end.
struct Placer {
    http: reqwest::Client,
    /// `http://ADDR` of the engine's server.
    control: String,
    side: Arc<SymblSide>,
    script: Arc<Script>,
    calls: Mutex<Vec<Arc<Call>>>,
    /// Cleared when the steady window ends: the slots then place no more calls.
    placing: AtomicBool,
    in_flight: Semaphore,
    errors: Mutex<Errors>,
    /// Slots whose first call went live (or failed).
    ramp: watch::Sender<usize>,
}

impl Placer {
    /// Announces a new call playing `recording`; returns it once its socket is open.
    async fn start(&self, recording: usize) -> Result<Arc<Call>, String> {
        let call = {
            let mut calls = lock(&self.calls);
            let number = u32::try_from(calls.len()).map_err(|_| "too many calls")?;
            let frames = self.script.recordings[recording].frames.len();
            let call = Arc::new(Call::new(number, recording, frames));
            calls.push(call.clone());
            call
        };
        let _permit = self
            .in_flight
            .acquire()
            .await
            .map_err(|_| "the bench is stopping")?;
        self.side.expect(call.clone());
        let opened = self.follow(&call).await;
        if opened.is_err() {
            self.side.forget(&call.id);
        }
        opened.map(|()| call)
    }

    async fn follow(&self, call: &Call) -> Result<(), String> {
        let id = &call.id;
        let url = format!("{}/connections/{id}", self.control);
        let answer = self
            .http
            .post(&url)
            .send()
            .await
            .map_err(|e| format!("{id}: the control API failed: {e}"))?;
        let status = answer.status();
        if status != reqwest::StatusCode::ACCEPTED {
            let body = answer.text().await.unwrap_or_default();
            return Err(format!(
                "{id}: the control API answered {status}: {}",
                body.trim()
            ));
        }
        tokio::time::timeout(CONNECT_WAIT, call.reached(Stage::Live))
            .await
            .map_err(|_| {
                format!(
                    "{id}: the engine did not subscribe within {} s",
                    CONNECT_WAIT.as_secs()
                )
            })
    }

    /// Waits for `call`'s recording to be sent whole.
    async fn finish(&self, call: &Call) -> Result<(), String> {
        let limit = self.script.recordings[call.recording].length + CALL_GRACE;
        let done = tokio::time::timeout(limit, call.reached(Stage::Done)).await;
        if done.is_err() {
            self.side.forget(&call.id);
            return Err(format!(
                "{}: its recording was not over {} s after it started (the socket dropped?)",
                call.id,
                limit.as_secs()
            ));
        }
        Ok(())
    }

    /// One call, start to end.
    async fn call(&self, recording: usize) -> Result<(), String> {
        let call = self.start(recording).await?;
        self.finish(&call).await
    }

    fn failed(&self, error: String) {
        let mut e = lock(&self.errors);
        e.count += 1;
        if e.first.len() < FIRST_ERRORS {
            e.first.push(error);
        }
    }
}

/// One slot: calls back to back (rotating over the recordings) until placing stops, or one
/// fails.
async fn slot(p: Arc<Placer>, slot: usize, start_at: tokio::time::Instant) {
    tokio::time::sleep_until(start_at).await;
    let mut round = 0;
    while p.placing.load(Ordering::Relaxed) {
        let recording = (slot + round) % RECORDINGS.len();
        let started = p.start(recording).await;
        if round == 0 {
            p.ramp.send_modify(|n| *n += 1);
        }
        let ended = match started {
            Ok(call) => p.finish(&call).await,
            Err(e) => Err(e),
        };
        if let Err(e) = ended {
            p.failed(e);
            return;
        }
        round += 1;
    }
}

/// The child's config, in a temporary folder with the bundled pipelines and knowledge base.
fn write_config(
    dir: &Path,
    symbl: std::net::SocketAddr,
    nebula: std::net::SocketAddr,
    fault: Option<Fault>,
) -> Result<PathBuf, String> {
    for rel in PIPELINES.iter().chain([&KNOWLEDGE]) {
        crate::bundle::write(dir, rel).map_err(|e| format!("cannot write `{rel}`: {e}"))?;
    }
    if fault.is_some_and(Fault::uncached_queries) {
        // Tracker names repeat, so the embedding cache would answer nearly every query and the
        // embedder's failure would not be felt: each call's queries are made new to it.
        let rta = dir.join(PIPELINES[0]);
        let text = std::fs::read_to_string(&rta)
            .map_err(|e| format!("cannot read {}: {e}", rta.display()))?;
        let patched = text.replace(
            "query: \"{{ event.tracker.name }}\"",
            "query: \"{{ event.tracker.name }} {{ event.conversation_id }}\"",
        );
        if patched == text {
            return Err(format!(
                "{}: no retrieval query to make uncached",
                rta.display()
            ));
        }
        std::fs::write(&rta, patched)
            .map_err(|e| format!("cannot write {}: {e}", rta.display()))?;
    }
    let index = dir.join("index").join("sales-nebula.json");
    std::fs::create_dir_all(dir.join("index"))
        .map_err(|e| format!("cannot make the index folder: {e}"))?;
    let pipelines: String = PIPELINES.iter().map(|p| format!("  - {p}\n")).collect();
    let keepalive = if fault.is_some_and(Fault::fast_keepalive) {
        "  keepalive: { ping_ms: 1000, idle_timeout_ms: 4000 }\n"
    } else {
        ""
    };
    let sinks = if fault.is_some_and(Fault::needs_webhook) {
        format!(
            r#"sinks:
  hook:
    type: webhook
    config:
      url: http://{nebula}/hooks
      secret_env: {WEBHOOK_SECRET_ENV}
      timeout_ms: 2000
      rate_per_sec: 1000
      retry_schedule_ms: [1000, 2000, 4000]
    take: {{ statuses: [final] }}
    dead_letter: {dead}
"#,
            dead = dir.join(DEAD_LETTERS).display()
        )
    } else {
        String::new()
    };
    let yaml = format!(
        r#"# Written by `prompter bench --live-calls`: the shipped live pipelines against the bench's fakes.
pipelines:
{pipelines}symbl:
  api_base: http://{symbl}
{keepalive}{sinks}embedders:
  nebula:
    provider: nebula
    config:
      api_key: ${{NEBULA_API_KEY}}
      base_url: http://{nebula}
knowledge:
  sales:
    store: embedded
    config:
      source: {KNOWLEDGE}
      embedder: nebula
      index: {index}
llm:
  nebula:
    provider: nebula
    config:
      api_key: ${{NEBULA_API_KEY}}
      base_url: http://{nebula}
      max_new_tokens: 256
      top_p: 0.95
      top_k: 1
      repetition_penalty: 1.2
      timeout_ms: 5000
  offline:
    provider: offline
engine:
  conversation_idle_secs: 1800
  queue_capacity: 64
"#,
        index = index.display()
    );
    let config = dir.join("bench.yaml");
    std::fs::write(&config, yaml).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    Ok(config)
}

/// `prompter kb ingest` of the knowledge base into the config's store (through the fake
/// Nebula); its duration.
async fn ingest(dir: &Path, config: &Path) -> Result<f64, String> {
    let mut command = std::process::Command::new(this_program()?);
    command
        .args(["kb", "ingest"])
        .arg(dir.join(KNOWLEDGE))
        .args(["--store", "sales", "--quiet", "--config"])
        .arg(config)
        .env("NEBULA_API_KEY", NEBULA_KEY)
        .env(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| format!("`kb ingest` did not run: {e}"))?
        .map_err(|e| format!("cannot run `kb ingest`: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "`kb ingest` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(started.elapsed().as_secs_f64())
}

/// What the bench reads of the engine's metrics at the end.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scraped {
    /// `prompter_events_received_total{source="symbl"}`, summed over kinds.
    events: u64,
    /// `prompter_overload_waits_total`: runs that waited for one of the engine's run slots.
    overload_waits: u64,
    /// `prompter_runs_shed_total`, summed over pipelines.
    runs_shed: u64,
    /// What the engine says it did about failures ([`OUTCOME_METRICS`]), by name.
    outcomes: Vec<(&'static str, u64)>,
}

/// The engine's own account of failures, read for every run: (name in the report, metric,
/// label the samples must carry).
const OUTCOME_METRICS: [(&str, &str, &str); 10] = [
    (
        "runs_failed",
        "prompter_pipeline_runs_total",
        "outcome=\"failed\"",
    ),
    ("stage_errors", "prompter_stage_errors_total", ""),
    ("outputs_degraded", "prompter_degraded_outputs_total", ""),
    ("chat_fallbacks", "prompter_chat_fallbacks_total", ""),
    (
        "provider_errors",
        "prompter_provider_requests_total",
        "result=\"error\"",
    ),
    ("provider_retries", "prompter_provider_retries_total", ""),
    ("sink_deliveries", "prompter_sink_deliveries_total", ""),
    ("sink_retries", "prompter_sink_retries_total", ""),
    ("sink_dead_letters", "prompter_sink_dead_letters_total", ""),
    ("sink_dropped", "prompter_sink_dropped_total", ""),
];

/// The samples of metric `name` in a Prometheus text page whose labels contain `label`,
/// summed.
fn metric_sum(page: &str, name: &str, label: &str) -> u64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn scraped(page: &str) -> Scraped {
    Scraped {
        events: metric_sum(page, "prompter_events_received_total", "source=\"symbl\""),
        overload_waits: metric_sum(page, "prompter_overload_waits_total", ""),
        runs_shed: metric_sum(page, "prompter_runs_shed_total", ""),
        outcomes: OUTCOME_METRICS
            .iter()
            .map(|(key, name, label)| (*key, metric_sum(page, name, label)))
            .collect(),
    }
}

/// What an engine stopped by SIGTERM says last on stderr (`stopped: N event(s), M output(s),
/// K stage error(s)`): its events and outputs.
fn stopped_counts(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("stopped: ")?;
    let mut numbers = rest
        .split(", ")
        .map(|part| part.split(' ').next()?.parse::<u64>().ok());
    Some((numbers.next()??, numbers.next()??))
}

async fn scrape(http: &reqwest::Client, control: &str) -> Result<Scraped, String> {
    let page = async {
        let answer = http.get(format!("{control}/metrics")).send().await?;
        answer.error_for_status()?.text().await
    };
    let page = page
        .await
        .map_err(|e| format!("cannot read the engine's metrics: {e}"))?;
    Ok(scraped(&page))
}

/// Waits until the child printed nothing for [`QUIET`] (at most [`QUIET_CAP`]).
async fn outputs_settled(engine: &Engine) {
    let started = Instant::now();
    let (mut last, mut since) = (engine.stdout_lines(), Instant::now());
    while started.elapsed() < QUIET_CAP && since.elapsed() < QUIET {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = engine.stdout_lines();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}

/// When slot `i` of `n` places its first call.
fn start_offset(i: usize, n: usize, stagger: Duration) -> Duration {
    stagger.mul_f64(i as f64 / n as f64)
}

/// Progress lines on stderr, every [`PROGRESS_EVERY`] while the bench waits.
struct Progress<'a> {
    err: &'a Stream,
    t0: Instant,
    next: Instant,
}

impl Progress<'_> {
    fn say(&mut self, what: &str, p: &Placer, engine: &Engine) {
        self.next = Instant::now() + PROGRESS_EVERY;
        say(
            self.err,
            &format!(
                "live bench: {:.0} s, {what}: {} call(s) live, {} placed, {} completed, {} failed; {} output line(s); engine RSS {:.1} MiB",
                self.t0.elapsed().as_secs_f64(),
                p.side.counts.live.load(Ordering::Relaxed),
                lock(&p.calls).len(),
                p.side.counts.completed.load(Ordering::Relaxed),
                lock(&p.errors).count,
                engine.stdout_lines(),
                memory(engine.pid).0 as f64 / 1024.0
            ),
        );
    }

    /// `fut`'s output, saying where the calls are while it runs.
    async fn during<F: std::future::Future>(
        &mut self,
        what: &str,
        p: &Placer,
        engine: &Engine,
        fut: F,
    ) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return out,
                () = tokio::time::sleep_until(self.next.into()) => self.say(what, p, engine),
            }
        }
    }
}

/// The child started on the fakes: the config written, the knowledge base ingested.
struct Started {
    engine: Engine,
    /// Holds the config and the index until the run ends.
    _dir: tempfile::TempDir,
    /// `http://ADDR` of its server.
    control: String,
    startup_s: f64,
    ingest_s: f64,
}

async fn start_engine(
    symbl: &Arc<SymblSide>,
    nebula: &Arc<NebulaSide>,
    (symbl_rt, nebula_rt): (&tokio::runtime::Runtime, &tokio::runtime::Runtime),
    log: &Arc<Mutex<OutputLog>>,
) -> Result<Started, String> {
    let symbl_addr =
        crate::bench_child::serve(symbl_rt, fakes::symbl_app(symbl.clone()), "Symbl").await?;
    let nebula_addr =
        crate::bench_child::serve(nebula_rt, fakes::nebula_app(nebula.clone()), "Nebula").await?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let config = write_config(dir.path(), symbl_addr, nebula_addr, symbl.fault.fault)?;
    let ingest_s = ingest(dir.path(), &config).await?;
    let mut command = run_command(&config)?;
    command
        .env("NEBULA_API_KEY", NEBULA_KEY)
        .env(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET);
    let reader_log = log.clone();
    let epoch = symbl.epoch;
    let spawned = Instant::now();
    let mut engine = Engine::spawn(command, move |line| {
        let read_ns = ns_since(epoch);
        lock(&reader_log).read(line, read_ns);
    })?;
    let addr = engine.address().await?;
    Ok(Started {
        engine,
        _dir: dir,
        control: format!("http://{addr}"),
        startup_s: spawned.elapsed().as_secs_f64(),
        ingest_s,
    })
}

/// Per recording: the final cards of its calibration call (calls 0 to 3, one per recording,
/// run together before the load), and their count by pipeline.
type Calibration = (Vec<HashSet<u64>>, Vec<Vec<(String, usize)>>);

async fn calibrate(
    placer: &Placer,
    engine: &Engine,
    log: &Mutex<OutputLog>,
    progress: &mut Progress<'_>,
) -> Result<Calibration, String> {
    let calls = futures_util::future::join_all((0..RECORDINGS.len()).map(|r| placer.call(r)));
    for e in progress
        .during("calibrating", placer, engine, calls)
        .await
        .into_iter()
        .filter_map(Result::err)
    {
        placer.failed(format!("calibration: {e}"));
    }
    outputs_settled(engine).await;
    let log = lock(log);
    let cards = log.final_cards();
    let numbers = 0..RECORDINGS.len() as u32;
    let expected: Vec<HashSet<u64>> = numbers
        .clone()
        .map(|c| cards.get(&c).cloned().unwrap_or_default())
        .collect();
    if let Some(r) = expected.iter().position(HashSet::is_empty) {
        return Err(format!(
            "the calibration call of `{}` ended with no final output: nothing to compare the load with\n{}",
            RECORDINGS[r],
            engine.stderr().first_complaints.join("\n")
        ));
    }
    let by_pipeline = numbers.map(|c| log.final_cards_by_pipeline(c)).collect();
    Ok((expected, by_pipeline))
}

/// What the steady window measured.
struct Window {
    /// In nanoseconds since the epoch.
    ns: (u64, u64),
    /// When the fault started and ended, in nanoseconds since the epoch.
    fault_ns: Option<(u64, u64)>,
    /// The engine was stopped by the fault (SIGTERM) and the window cut there.
    terminated: bool,
    secs: f64,
    cpu: (Cpu, Cpu),
    rss_samples: Vec<u64>,
    live_samples: Vec<u64>,
}

/// The load: N slots, their first calls spread over `stagger`; the steady window once every
/// slot's first call is live; then the calls in progress end.
async fn load(
    placer: &Arc<Placer>,
    engine: &Engine,
    n: usize,
    (stagger, window): (Duration, Duration),
    progress: &mut Progress<'_>,
) -> Result<Window, String> {
    let start = tokio::time::Instant::now();
    let mut slots = tokio::task::JoinSet::new();
    for i in 0..n {
        slots.spawn(slot(placer.clone(), i, start + start_offset(i, n, stagger)));
    }
    let mut ramp = placer.ramp.subscribe();
    let ramped = progress.during(
        "starting",
        placer,
        engine,
        tokio::time::timeout(stagger + CONNECT_WAIT * 2, ramp.wait_for(|s| *s >= n)),
    );
    if !matches!(ramped.await, Ok(Ok(_))) {
        placer.placing.store(false, Ordering::Relaxed);
        return Err("the calls did not all start in time".into());
    }
    tokio::time::sleep(SETTLE).await;
    progress.say("every slot live; measuring", placer, engine);
    let (t, ns) = (Instant::now(), ns_since(placer.side.epoch));
    let cpu0 = cpu_now(engine.pid, &THREADS);
    let (mut rss_samples, mut live_samples) = (Vec::new(), Vec::new());
    let switch = placer.side.fault.clone();
    let mut injector = switch.fault.map(|f| Injector::new(f, engine.pid));
    let epoch = placer.side.epoch;
    while t.elapsed() < window {
        let next_sample = SAMPLE_EVERY.min(window.saturating_sub(t.elapsed()));
        let next = injector
            .as_ref()
            .and_then(|i| i.next_step(t.elapsed()))
            .map_or(next_sample, |d| d.min(next_sample));
        tokio::time::sleep(next).await;
        if let Some(i) = injector.as_mut() {
            i.step(t.elapsed(), &switch, epoch, progress, placer, engine);
            if i.terminated() {
                break;
            }
        }
        rss_samples.push(memory(engine.pid).0);
        live_samples.push(placer.side.counts.live.load(Ordering::Relaxed));
        if Instant::now() >= progress.next {
            progress.say("measuring", placer, engine);
        }
    }
    let cpu1 = cpu_now(engine.pid, &THREADS);
    let terminated = injector.as_ref().is_some_and(Injector::terminated);
    let measured = Window {
        terminated,
        fault_ns: injector.as_ref().and_then(|i| i.span),
        ns: (ns, ns_since(placer.side.epoch)),
        secs: t.elapsed().as_secs_f64(),
        cpu: (cpu0, cpu1),
        rss_samples,
        live_samples,
    };
    placer.placing.store(false, Ordering::Relaxed);
    if terminated {
        // The engine is going: the calls in progress end with it, not with their recordings.
        slots.abort_all();
        progress.say("engine stopping; calls cut", placer, engine);
        return Ok(measured);
    }
    progress.say("window over; the calls in progress end", placer, engine);
    let ending = async { while slots.join_next().await.is_some() {} };
    progress.during("ending", placer, engine, ending).await;
    Ok(measured)
}

/// Plays the run's fault: starts it [`FAULT_AT`] into the window, ends it after its length.
struct Injector {
    fault: Fault,
    pid: u32,
    /// Steps taken: 0 none, 1 started, 2 ended.
    done: u8,
    /// When it started and ended, in nanoseconds since the epoch.
    span: Option<(u64, u64)>,
}

impl Injector {
    fn new(fault: Fault, pid: u32) -> Injector {
        Injector {
            fault,
            pid,
            done: 0,
            span: None,
        }
    }

    fn terminated(&self) -> bool {
        self.fault == Fault::Terminate && self.done > 1
    }

    /// Time until the next step, `elapsed` into the window.
    fn next_step(&self, elapsed: Duration) -> Option<Duration> {
        let at = match self.done {
            0 => FAULT_AT,
            1 => FAULT_AT + self.fault.lasts(),
            _ => return None,
        };
        Some(at.saturating_sub(elapsed))
    }

    fn step(
        &mut self,
        elapsed: Duration,
        switch: &FaultSwitch,
        epoch: Instant,
        progress: &mut Progress<'_>,
        placer: &Placer,
        engine: &Engine,
    ) {
        if self.next_step(elapsed).is_none_or(|d| !d.is_zero()) {
            return;
        }
        let now = ns_since(epoch);
        let signal = |sig| crate::bench_child::signal(self.pid, sig);
        let (sent, what) = if self.done == 0 {
            self.span = Some((now, now));
            let sent = match self.fault {
                Fault::Pause => signal("-STOP"),
                // No new call from now on; the signal comes when the fault "ends", once the
                // calls being placed are live.
                Fault::Terminate => {
                    placer.placing.store(false, Ordering::Relaxed);
                    true
                }
                _ => {
                    switch.start();
                    true
                }
            };
            (sent, "on")
        } else {
            if let Some((start, _)) = self.span {
                self.span = Some((start, now));
            }
            switch.stop();
            let sent = match self.fault {
                Fault::Pause => signal("-CONT"),
                Fault::Terminate => signal("-TERM"),
                _ => true,
            };
            (sent, "off")
        };
        if !sent {
            placer.failed(format!(
                "cannot signal the engine for `{}`",
                self.fault.name()
            ));
        }
        let name = self.fault.name();
        progress.say(&format!("fault `{name}` {what}"), placer, engine);
        self.done += 1;
    }
}

async fn measure(
    args: &LiveBenchArgs,
    script: &Arc<Script>,
    symbl: &Arc<SymblSide>,
    nebula: &Arc<NebulaSide>,
    runtimes: (&tokio::runtime::Runtime, &tokio::runtime::Runtime),
    err: &Stream,
) -> Result<Run, String> {
    let n = args.calls;
    let t0 = Instant::now();
    let log = Arc::new(Mutex::new(OutputLog::default()));
    let Started {
        mut engine,
        _dir,
        control,
        startup_s,
        ingest_s,
    } = start_engine(symbl, nebula, runtimes, &log).await?;
    let stagger = script
        .mean_length()
        .max(Duration::from_secs_f64(n as f64 / STARTS_PER_SECOND as f64));
    say(
        err,
        &format!(
            "live bench: engine pid {} listening on {control} (up in {startup_s:.2} s, knowledge base ingested in {ingest_s:.2} s); speed {:.2}x; calibration, then {n} call slot(s) starting over {:.0} s, then a {} s window",
            engine.pid,
            script.speed,
            stagger.as_secs_f64(),
            args.seconds
        ),
    );
    tokio::time::sleep(SAMPLE_EVERY).await;
    let (rss_idle, _) = memory(engine.pid);
    let placer = Arc::new(Placer {
        http: reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?,
        control: control.clone(),
        side: symbl.clone(),
        script: script.clone(),
        calls: Mutex::new(Vec::new()),
        placing: AtomicBool::new(true),
        in_flight: Semaphore::new(IN_FLIGHT),
        errors: Mutex::new(Errors::default()),
        ramp: watch::Sender::new(0),
    });
    let mut progress = Progress {
        err,
        t0,
        next: Instant::now() + PROGRESS_EVERY,
    };
    let (expected, calibration) = calibrate(&placer, &engine, &log, &mut progress).await?;
    let (rss_warm, _) = memory(engine.pid);
    let window = Duration::from_secs(args.seconds);
    let measured = load(&placer, &engine, n, (stagger, window), &mut progress).await?;
    let (_, hwm) = memory(engine.pid);
    let (scraped, engine_cpu_total, exit);
    if measured.terminated {
        // Stopped under load by the fault: what it handled is what it says last.
        engine_cpu_total = cpu_now(engine.pid, &[]).child;
        say(
            err,
            "live bench: waiting for the engine to stop (SIGTERM sent)",
        );
        exit = engine.terminate().await;
        scraped = engine
            .stderr()
            .stopped
            .as_deref()
            .and_then(stopped_counts)
            .map(|(events, _)| Scraped {
                events,
                overload_waits: 0,
                runs_shed: 0,
                outcomes: Vec::new(),
            })
            .ok_or_else(|| "the engine stopped without its `stopped:` line".to_owned());
    } else {
        outputs_settled(&engine).await;
        scraped = scrape(&placer.http, &control).await;
        engine_cpu_total = cpu_now(engine.pid, &[]).child;
        say(err, "live bench: stopping the engine (SIGTERM)");
        exit = engine.terminate().await;
    }
    let dead_letters = read_dead_letters(&_dir.path().join(DEAD_LETTERS));
    let outputs = std::mem::take(&mut *lock(&log));
    let placed = std::mem::take(&mut *lock(&placer.calls));
    let errors = std::mem::take(&mut *lock(&placer.errors));
    Ok(Run {
        calls: n,
        seconds: args.seconds,
        interim_words: args.interim_words,
        stagger,
        pid: engine.pid,
        startup_s,
        ingest_s,
        open_files: None,
        window: measured.ns,
        window_s: measured.secs,
        cpu: measured.cpu,
        engine_cpu_total,
        rss_idle,
        rss_warm,
        rss_samples: measured.rss_samples,
        live_samples: measured.live_samples,
        hwm,
        placed,
        expected,
        calibration,
        errors,
        scraped,
        exit,
        stderr: engine.stderr(),
        outputs,
        fault: args.fault,
        fault_ns: measured.fault_ns,
        terminated: measured.terminated,
        dead_letters,
    })
}

/// The (output id, version) of every line of a dead-letter file (none when there is no
/// file); a line that is not a dead letter counts as `("", 0)`, so it is still seen.
fn read_dead_letters(path: &Path) -> Vec<(String, u32)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            let id = v["output"]["id"].as_str().unwrap_or_default().to_owned();
            let version = v["output"]["version"].as_u64().unwrap_or(0) as u32;
            (id, version)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_symbl_events_are_summed() {
        let page = "# HELP prompter_events_received_total Events.\n\
            prompter_events_received_total{source=\"symbl\",kind=\"tracker_response\"} 12\n\
            prompter_events_received_total{kind=\"message_response\",source=\"symbl\"} 30\n\
            prompter_events_received_total{source=\"twilio\",kind=\"message_response\"} 7\n\
            prompter_events_received_total_created{source=\"symbl\"} 1700000000.5\n\
            prompter_overload_waits_total 3\n\
            prompter_runs_shed_total{pipeline=\"rta_live\"} 2\n\
            prompter_runs_shed_total{pipeline=\"open_questions\"} 1\n";
        let s = scraped(page);
        assert_eq!((s.events, s.overload_waits, s.runs_shed), (42, 3, 3));
        assert_eq!(scraped("").events, 0);
        let outcomes = scraped(
            "prompter_pipeline_runs_total{pipeline=\"rta_live\",outcome=\"failed\"} 2\n\
             prompter_pipeline_runs_total{pipeline=\"rta_live\",outcome=\"completed\"} 9\n\
             prompter_chat_fallbacks_total{pipeline=\"rta_live\",stage=\"answer\"} 4\n",
        )
        .outcomes;
        assert!(outcomes.contains(&("runs_failed", 2)));
        assert!(outcomes.contains(&("chat_fallbacks", 4)));
        assert!(outcomes.contains(&("sink_dead_letters", 0)));
    }

    #[test]
    fn the_stopped_line_gives_events_and_outputs() {
        assert_eq!(
            stopped_counts("stopped: 1200 event(s), 340 output(s), 0 stage error(s)"),
            Some((1200, 340))
        );
        assert_eq!(stopped_counts("stopping: closing sockets"), None);
        assert_eq!(stopped_counts("stopped: many event(s)"), None);
    }

    #[test]
    fn slots_start_spread_over_the_stagger() {
        let s = Duration::from_secs(20);
        assert_eq!(start_offset(0, 10_000, s), Duration::ZERO);
        assert_eq!(start_offset(5_000, 10_000, s), Duration::from_secs(10));
        assert!(start_offset(9_999, 10_000, s) < s);
    }
}
