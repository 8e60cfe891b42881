//! `prompter bench --feed-clients N`: the agent feed's fan-out under load.
//!
//! One process holds everything: the engine on the configured pipelines (the shipped
//! `prompter.yaml` uses the offline LLM: no model, no network) with the agent feed wired in,
//! the feed served on `127.0.0.1:0`, and `N` WebSocket clients over loopback. The replay is
//! `M` calls, copies of the recordings each under its own conversation id, played at `S` times
//! real time ([`Pace::Realtime`]); call `i` starts `i * STAGGER_MS / M` ms of call time after the
//! first, so the calls overlap the way a contact centre's do instead of starting in lockstep.
//! Client `i` reads call `i mod M`'s feed with a conversation token minted by the feed service;
//! every client is connected (its first message, the snapshot, received) before the replay
//! starts.
//!
//! Measured:
//! - **latency**, from an output version's creation to its receipt by a client (an
//!   `output.upsert` message read off the socket), over every (client, version) receipt.
//!   "Created" is the earliest moment a sink task took the version: a lossless stamping sink
//!   listed first among the engine's sinks, or the feed's own sink (which is wrapped to stamp
//!   it too), whichever ran first. Both run a few microseconds after the engine queued the
//!   version for its sinks: the wake-up of that first sink task is the only part of the path
//!   not counted. The clock is one monotonic [`Instant`] shared by the engine and the clients
//!   (same process). A second figure starts at the feed's sink instead (hub, server, socket and
//!   client read only).
//! - **completeness**: every client must receive the last version of every output of its call
//!   (an upsert, a withdrawal, or a card in a resync snapshot); drafts may be coalesced away.
//! - **the process's CPU and memory**: user+sys time over the replay (from `/proc/self/stat`),
//!   as a share of one core; the feed clients run on their own runtime thread (`feed-client`),
//!   whose CPU time is read from `/proc/self/task/*/stat` and reported apart, so the engine's
//!   share (engine, feed hub and server) is the process's minus the clients'. Peak RSS is
//!   `VmHWM` from `/proc/self/status` and covers the clients' sockets and buffers too; run with
//!   `--feed-clients 0` for the engine alone (the feed and its server are still wired in).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prompter_core::output::Output;
use prompter_engine::engine::Engine;
use prompter_engine::feed::FeedSink;
use prompter_engine::feed::access::Scope;
use prompter_engine::feed::http::{PROTOCOL, url_encode};
use prompter_engine::recording::RecordedLine;
use prompter_engine::registry::Registry;
use prompter_engine::sink::{FnSink, QueuePolicy, Sink, SinkError};
use prompter_engine::source::Source;
use prompter_engine::source::recording::{Pace, RecordingSource};
use prompter_engine::stats::Stats;
use serde::Deserialize;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::bench::{pct, recordings_or_default};
use crate::cli::{Stream, load_for_run, read_recordings, say};
use crate::console::FeedWiring;

/// Call time (ms) over which the calls' starts are spread: call `i` of `M` starts
/// `i * STAGGER_MS / M` ms of call time after the first.
pub const STAGGER_MS: u64 = 20_000;
/// Calls replayed when `--calls` is not given.
pub const DEFAULT_CALLS: usize = 1_000;
/// Replay speed when `--speed` is not given: the recordings last 49-75 s, so with the stagger
/// a run takes about 48 s of wall time.
pub const DEFAULT_SPEED: f64 = 2.0;
/// Name of the feed clients' runtime thread (its CPU time is reported apart).
const CLIENT_THREAD: &str = "feed-client";
/// Clients connecting at once.
const CONNECTING: usize = 64;
/// Client socket buffers: the feed's messages are small, and 1,000 clients with the default
/// 128 KiB read buffer would hold 128 MiB for nothing.
const CLIENT_READ_BUFFER: usize = 8 * 1024;
const CLIENT_WRITE_BUFFER: usize = 4 * 1024;
/// File descriptors kept free besides two per client (one per side of each socket).
const SPARE_FDS: u64 = 256;
/// After the engine finished, the clients are done once no message arrived for this long...
const QUIET: Duration = Duration::from_secs(1);
/// ...or at the latest after this.
const DRAIN_MAX: Duration = Duration::from_secs(30);
/// Linux reports CPU time in `/proc` in ticks of `USER_HZ`, 100 on every Linux architecture
/// this runs on.
const USER_HZ: f64 = 100.0;

/// Options of the feed bench (`prompter bench --feed-clients N ...`).
#[derive(Debug, Clone)]
pub struct FeedBenchArgs {
    /// Engine config [default: ./prompter.yaml].
    pub config: Option<PathBuf>,
    /// Recordings [default: pipelines/recordings/*.jsonl next to the config].
    pub recordings: Vec<PathBuf>,
    /// WebSocket clients (0: the engine and the feed without readers, for a baseline).
    pub clients: usize,
    /// Calls replayed.
    pub calls: usize,
    /// Replay speed (2 = twice real time).
    pub speed: f64,
    /// Print the report as one JSON object instead of text.
    pub json: bool,
}

/// When each output version was created, and when the feed's sink handed it to the hub.
#[derive(Default)]
struct Ledger {
    /// (output id, version) → stamps.
    versions: HashMap<(String, u32), Stamp>,
    /// Output id → (conversation, last version).
    last: HashMap<String, (String, u32)>,
}

#[derive(Clone, Copy)]
struct Stamp {
    created: Instant,
    hub: Option<Instant>,
}

type SharedLedger = Arc<Mutex<Ledger>>;

fn ledger(l: &SharedLedger) -> std::sync::MutexGuard<'_, Ledger> {
    l.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ledger {
    fn created(&mut self, o: &Output, at: Instant) {
        self.versions
            .entry((o.id.clone(), o.version))
            .and_modify(|s| s.created = s.created.min(at))
            .or_insert(Stamp {
                created: at,
                hub: None,
            });
        let last = self
            .last
            .entry(o.id.clone())
            .or_insert_with(|| (o.conversation_id.clone(), o.version));
        last.1 = last.1.max(o.version);
    }

    fn reached_feed(&mut self, o: &Output, at: Instant) {
        self.created(o, at);
        if let Some(s) = self.versions.get_mut(&(o.id.clone(), o.version)) {
            s.hub = Some(at);
        }
    }
}

/// The feed's own sink, stamping each version as it takes it (same name and queue policy).
struct StampedFeedSink {
    inner: FeedSink,
    ledger: SharedLedger,
}

#[prompter_core::async_trait]
impl Sink for StampedFeedSink {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn policy(&self) -> QueuePolicy {
        self.inner.policy()
    }
    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError> {
        ledger(&self.ledger).reached_feed(&output, Instant::now());
        self.inner.deliver(output).await
    }
}

/// What a client was given: an upsert, a withdrawal, or a card of a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Got {
    Upsert,
    Withdraw,
    Snapshot,
}

/// One output version a client received.
struct Receipt {
    got: Got,
    id: String,
    version: u32,
    at: Instant,
}

/// What one client saw.
#[derive(Default)]
struct ClientReport {
    receipts: Vec<Receipt>,
    messages: u64,
    bytes: u64,
    resyncs: u64,
    /// The call's end was received (a stream closing after it is not an error: the hub lets
    /// the oldest ended calls go).
    ended: bool,
    error: Option<String>,
}

/// Counters the clients share with the progress display.
#[derive(Default)]
struct Live {
    upserts: AtomicU64,
    messages: AtomicU64,
}

/// The parts of a feed message a client looks at.
#[derive(Deserialize)]
struct FeedMsg {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    output: Option<OutputRef>,
    #[serde(default)]
    output_id: Option<String>,
    #[serde(default)]
    version: Option<u32>,
    #[serde(default)]
    cards: Vec<OutputRef>,
    #[serde(default)]
    resync: bool,
}

#[derive(Deserialize)]
struct OutputRef {
    id: String,
    version: u32,
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER)
        .write_buffer_size(CLIENT_WRITE_BUFFER)
        .max_write_buffer_size(64 * 1024)
}

/// Opens `url` with `token` the way the console does (subprotocols `prompter.feed.v1` and
/// `bearer.<token>`).
async fn open(url: &str, token: &str) -> Result<Ws, String> {
    let mut req = url
        .into_client_request()
        .map_err(|e| format!("bad request for `{url}`: {e}"))?;
    let protocols = HeaderValue::from_str(&format!("{PROTOCOL}, bearer.{token}"))
        .map_err(|e| format!("bad token header: {e}"))?;
    req.headers_mut()
        .insert(header::SEC_WEBSOCKET_PROTOCOL, protocols);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(ws_config()), true)
        .await
        .map_err(|e| format!("cannot connect to `{url}`: {e}"))?;
    Ok(ws)
}

/// Records what message `text` (received at `at`) carries.
fn take(report: &mut ClientReport, live: &Live, text: &Utf8Bytes, at: Instant) {
    report.messages += 1;
    report.bytes += text.len() as u64;
    live.messages.fetch_add(1, Ordering::Relaxed);
    let Ok(msg) = serde_json::from_str::<FeedMsg>(text.as_str()) else {
        report
            .error
            .get_or_insert_with(|| format!("unparsable message: {}", text.as_str()));
        return;
    };
    match msg.kind.as_str() {
        "output.upsert" => {
            if let Some(o) = msg.output {
                live.upserts.fetch_add(1, Ordering::Relaxed);
                report.receipts.push(Receipt {
                    got: Got::Upsert,
                    id: o.id,
                    version: o.version,
                    at,
                });
            }
        }
        "output.withdraw" => {
            if let (Some(id), Some(version)) = (msg.output_id, msg.version) {
                report.receipts.push(Receipt {
                    got: Got::Withdraw,
                    id,
                    version,
                    at,
                });
            }
        }
        "snapshot" => {
            if msg.resync {
                report.resyncs += 1;
            }
            for c in msg.cards {
                report.receipts.push(Receipt {
                    got: Got::Snapshot,
                    id: c.id,
                    version: c.version,
                    at,
                });
            }
        }
        "conversation.ended" => report.ended = true,
        _ => {}
    }
}

/// One feed client: connects (at most [`CONNECTING`] at once), says it is ready once its first
/// message (the snapshot) arrived, then reads until the server closes the stream.
async fn client(
    url: String,
    token: String,
    gate: Arc<Semaphore>,
    live: Arc<Live>,
    ready: oneshot::Sender<Result<(), String>>,
) -> ClientReport {
    let mut report = ClientReport::default();
    let opened = async {
        let _permit = gate.acquire().await.map_err(|e| e.to_string())?;
        let mut ws = open(&url, &token).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                take(&mut report, &live, &t, Instant::now());
                Ok(ws)
            }
            other => Err(format!("no snapshot from `{url}`: {other:?}")),
        }
    }
    .await;
    let mut ws = match opened {
        Ok(ws) => {
            let _ = ready.send(Ok(()));
            ws
        }
        Err(e) => {
            report.error = Some(e.clone());
            let _ = ready.send(Err(e));
            return report;
        }
    };
    while let Some(msg) = ws.next().await {
        let at = Instant::now();
        match msg {
            Ok(Message::Text(t)) => take(&mut report, &live, &t, at),
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(e) => {
                if !report.ended {
                    report.error = Some(format!("read failed before the call ended: {e}"));
                }
                break;
            }
        }
    }
    report
}

/// CPU time so far: the whole process's, and the feed clients' thread's.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    process: f64,
    clients: f64,
}

/// User+sys seconds of a `/proc/.../stat` line.
fn stat_seconds(stat: &str) -> Option<(String, f64)> {
    crate::bench::procfs::stat_ticks(stat).map(|(comm, ticks)| (comm, ticks as f64 / USER_HZ))
}

fn cpu_now() -> Cpu {
    let process = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| stat_seconds(&s))
        .map_or(0.0, |(_, s)| s);
    let mut clients = 0.0;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Some((comm, s)) = std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| stat_seconds(&s))
                && comm == CLIENT_THREAD
            {
                clients += s;
            }
        }
    }
    Cpu { process, clients }
}

/// `VmHWM` and `VmRSS` in bytes.
fn memory() -> (u64, u64) {
    let (rss, hwm) = crate::bench::procfs::memory_kib("self");
    (hwm * 1024, rss * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// `n` with thousands separators.
fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// p50, p90, p99 and max of sorted microseconds.
fn spread(v: &[u64]) -> serde_json::Value {
    serde_json::json!({
        "count": v.len(),
        "p50_ms": ms(pct(v, 50.0)),
        "p90_ms": ms(pct(v, 90.0)),
        "p99_ms": ms(pct(v, 99.0)),
        "max_ms": ms(v.last().copied().unwrap_or(0)),
    })
}

fn spread_text(v: &[u64]) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(pct(v, 50.0)),
        ms(pct(v, 90.0)),
        ms(pct(v, 99.0)),
        ms(v.last().copied().unwrap_or(0))
    )
}

/// The calls: `calls` copies of the recordings' conversations, round robin, each under its own
/// id (`<recorded id>.<i>`).
fn calls(lines: &[RecordedLine], calls: usize) -> Vec<(String, Vec<RecordedLine>)> {
    let mut recorded: Vec<(Arc<str>, Vec<RecordedLine>)> = Vec::new();
    for l in lines {
        match recorded.iter_mut().find(|(c, _)| *c == l.conversation) {
            Some((_, v)) => v.push(l.clone()),
            None => recorded.push((l.conversation.clone(), vec![l.clone()])),
        }
    }
    if recorded.is_empty() {
        return Vec::new();
    }
    (0..calls)
        .map(|i| {
            let (original, lines) = &recorded[i % recorded.len()];
            let id = format!("{original}.{i}");
            let shared: Arc<str> = Arc::from(id.as_str());
            let copy = lines
                .iter()
                .map(|l| {
                    let mut c = l.clone();
                    c.conversation = shared.clone();
                    c
                })
                .collect();
            (id, copy)
        })
        .collect()
}

fn bar(len: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}

/// Runs the feed bench; prints its report on `out`. Exit code 1 when a client failed or missed
/// an output's last version.
pub async fn run(registry: &Registry, args: FeedBenchArgs, out: &Stream, err: &Stream) -> u8 {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let speed = args.speed;
    if !(speed.is_finite() && speed > 0.0) {
        say(err, "error: --speed must be a positive number");
        return 1;
    }
    if args.calls == 0 {
        say(err, "error: --calls must be at least 1");
        return 1;
    }
    let need = 2 * args.clients as u64 + SPARE_FDS;
    if let Some(limit) = crate::bench::procfs::open_files_limit()
        && args.clients > 0
        && limit < need
    {
        say(
            err,
            &format!(
                "error: {} feed clients need about {need} open files (both ends of each socket, in this one process), but the limit is {limit}: raise it with `ulimit -n {need}`",
                args.clients
            ),
        );
        return 1;
    }
    let Some(loaded) = load_for_run(registry, &config, err) else {
        return 1;
    };
    let Some(recordings) = recordings_or_default(&config, args.recordings.clone(), err) else {
        return 1;
    };
    let Some((lines, _)) = read_recordings(&recordings, err) else {
        return 1;
    };
    let calls = calls(&lines, args.calls);
    if calls.is_empty() {
        say(err, "error: the recordings hold no lines to replay");
        return 1;
    }
    let recorded = lines
        .iter()
        .map(|l| &l.conversation)
        .collect::<HashSet<_>>()
        .len();
    let longest_ms = lines.iter().map(|l| l.offset_ms).max().unwrap_or(0);
    let secret = match crate::console::random_secret() {
        Ok(s) => s,
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };

    // The engine, with the feed wired in as `prompter run` wires it, plus the stamping sink.
    let mut feed_config = loaded.settings.feed.clone().unwrap_or_default();
    feed_config.feedback_log = None;
    let wiring = FeedWiring::new();
    let book: SharedLedger = Arc::default();
    let stamps = book.clone();
    let stamp = FnSink::new("bench-stamp", move |o: &Output| {
        ledger(&stamps).created(o, Instant::now());
    });
    let feed_sink = StampedFeedSink {
        inner: FeedSink(wiring.hub.clone()),
        ledger: book.clone(),
    };
    let stats = Arc::new(Stats::default());
    let engine = Arc::new(
        Engine::new(
            loaded.pipelines,
            loaded.settings,
            vec![Box::new(stamp), Box::new(feed_sink)],
            stats.clone(),
        )
        .with_observer(wiring.observer()),
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let service = match wiring.service_with_secret(
        &feed_config,
        Some(secret),
        engine.clone(),
        shutdown_rx.clone(),
    ) {
        Ok(s) => s,
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };
    let bound = match prompter_engine::server::serve(
        "127.0.0.1:0",
        service.clone().routes(),
        shutdown_rx.clone(),
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            say(err, &format!("error: cannot listen on 127.0.0.1:0: {e}"));
            return 1;
        }
    };

    // The clients, on their own runtime thread, all connected before the replay.
    let client_rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(CLIENT_THREAD)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            say(
                err,
                &format!("error: cannot start the clients' runtime: {e}"),
            );
            return 1;
        }
    };
    let (_, rss_start) = memory();
    let live = Arc::new(Live::default());
    let gate = Arc::new(Semaphore::new(CONNECTING));
    let connecting = bar(
        args.clients as u64,
        "connecting {bar:30} {pos}/{len} clients",
    );
    let started_connecting = Instant::now();
    let mut clients = Vec::with_capacity(args.clients);
    let mut readies = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let conversation = calls[i % calls.len()].0.clone();
        let token = service.mint(&Scope::Conversation(conversation.clone()));
        let url = format!(
            "ws://{bound}/feed/v1/conversations/{}/ws",
            url_encode(&conversation)
        );
        let (tx, rx) = oneshot::channel();
        let handle = client_rt.spawn(client(url, token, gate.clone(), live.clone(), tx));
        clients.push((conversation, handle));
        readies.push(rx);
    }
    let mut refused = None;
    for rx in readies {
        match rx.await {
            Ok(Ok(())) => connecting.inc(1),
            Ok(Err(e)) => {
                refused.get_or_insert(e);
            }
            Err(_) => {
                refused.get_or_insert_with(|| "a client task ended early".to_owned());
            }
        }
    }
    connecting.finish_and_clear();
    let connect_secs = started_connecting.elapsed().as_secs_f64();
    if let Some(e) = refused {
        say(err, &format!("error: a feed client could not connect: {e}"));
        let _ = shutdown_tx.send(true);
        client_rt.shutdown_background();
        engine.finish().await;
        return 1;
    }
    let (_, rss_connected) = memory();

    // The replay: one recording source per call, started at its staggered offset.
    let cpu0 = cpu_now();
    let t0 = Instant::now();
    let m = calls.len() as u64;
    let expected_ms = (STAGGER_MS as f64 + longest_ms as f64) / speed;
    let mut sources = Vec::with_capacity(calls.len());
    for (i, (_, lines)) in calls.into_iter().enumerate() {
        let start =
            t0 + Duration::from_secs_f64(i as f64 * STAGGER_MS as f64 / m as f64 / 1000.0 / speed);
        let source = RecordingSource::new(lines, recordings.clone(), Pace::Realtime(speed));
        let engine = engine.clone();
        let shutdown = shutdown_rx.clone();
        sources.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            Box::new(source).run(engine, shutdown).await
        }));
    }
    let replaying = bar(
        expected_ms as u64,
        "replay {bar:30} {elapsed_precise} {msg}",
    );
    let progress = {
        let (replaying, stats, book, live) =
            (replaying.clone(), stats.clone(), book.clone(), live.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                replaying.set_position(t0.elapsed().as_millis() as u64);
                let versions = ledger(&book).versions.len() as u64;
                replaying.set_message(format!(
                    "{} events, {} output versions, {} upserts received",
                    count(stats.events.load(Ordering::Relaxed)),
                    count(versions),
                    count(live.upserts.load(Ordering::Relaxed))
                ));
            }
        })
    };
    let mut source_errors = 0u64;
    for s in sources {
        match s.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                source_errors += 1;
                tracing::error!(error = %e, "A recording source stopped.");
            }
            Err(e) => {
                source_errors += 1;
                tracing::error!(error = %e, "A recording source panicked.");
            }
        }
    }
    let replay_secs = t0.elapsed().as_secs_f64();
    engine.finish().await;
    progress.abort();
    replaying.finish_and_clear();
    // The clients take what is still on its way; done when nothing arrived for a while.
    let draining = Instant::now();
    if args.clients > 0 {
        let mut seen = live.messages.load(Ordering::Relaxed);
        let mut quiet_since = Instant::now();
        while draining.elapsed() < DRAIN_MAX {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = live.messages.load(Ordering::Relaxed);
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= QUIET {
                break;
            }
        }
    }
    let wall_secs = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_now();
    let (hwm, rss_end) = memory();
    let _ = shutdown_tx.send(true);
    let mut reports = Vec::with_capacity(clients.len());
    for (conversation, handle) in clients {
        let report = match tokio::time::timeout(Duration::from_secs(10), handle).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => ClientReport {
                error: Some(format!("client task failed: {e}")),
                ..ClientReport::default()
            },
            Err(_) => ClientReport {
                error: Some("client did not see the stream close".to_owned()),
                ..ClientReport::default()
            },
        };
        reports.push((conversation, report));
    }
    client_rt.shutdown_background();

    // The figures.
    let record = ledger(&book);
    let mut expected: HashMap<&str, Vec<(&str, u32)>> = HashMap::new();
    for (id, (conversation, version)) in &record.last {
        expected
            .entry(conversation.as_str())
            .or_default()
            .push((id.as_str(), *version));
    }
    let mut latency_us = Vec::new();
    let mut fanout_us = Vec::new();
    let (mut unstamped, mut missing, mut complete, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let (mut messages, mut bytes, mut resyncs) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    for (conversation, r) in &reports {
        messages += r.messages;
        bytes += r.bytes;
        resyncs += r.resyncs;
        if let Some(e) = &r.error {
            errors += 1;
            first_error.get_or_insert_with(|| e.clone());
        }
        let mut got: HashSet<(&str, u32)> = HashSet::with_capacity(r.receipts.len());
        for rc in &r.receipts {
            got.insert((rc.id.as_str(), rc.version));
            if rc.got != Got::Upsert {
                continue;
            }
            match record.versions.get(&(rc.id.clone(), rc.version)) {
                Some(s) => {
                    latency_us.push(rc.at.saturating_duration_since(s.created).as_micros() as u64);
                    if let Some(hub) = s.hub {
                        fanout_us.push(rc.at.saturating_duration_since(hub).as_micros() as u64);
                    }
                }
                None => unstamped += 1,
            }
        }
        let lacking = expected
            .get(conversation.as_str())
            .map_or(0, |v| v.iter().filter(|k| !got.contains(*k)).count() as u64);
        missing += lacking;
        if lacking == 0 && r.error.is_none() {
            complete += 1;
        }
    }
    latency_us.sort_unstable();
    fanout_us.sort_unstable();
    let versions = record.versions.len() as u64;
    let to_hub = record.versions.values().filter(|s| s.hub.is_some()).count() as u64;
    let outputs = record.last.len() as u64;
    // The sinks' queues are in the order given: the stamping sink's, then the feed's.
    let feed_queue = engine.outlets().queues().get(1);
    let (coalesced, dropped) = feed_queue.map_or((0, 0), |q| {
        (
            q.coalesced.load(Ordering::Relaxed),
            q.dropped.load(Ordering::Relaxed),
        )
    });
    let events = stats.events.load(Ordering::Relaxed);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let process_cpu = cpu1.process - cpu0.process;
    let clients_cpu = cpu1.clients - cpu0.clients;
    let engine_cpu = (process_cpu - clients_cpu).max(0.0);
    let share = |s: f64| 100.0 * s / wall_secs.max(1e-9);
    let n = args.clients;

    if args.json {
        let report = serde_json::json!({
            "clients": n,
            "calls": m,
            "recordings": recorded,
            "speed": speed,
            "stagger_ms": STAGGER_MS,
            "connect_s": connect_secs,
            "replay_s": replay_secs,
            "measured_s": wall_secs,
            "events": events,
            "events_per_s": events as f64 / replay_secs.max(1e-9),
            "outputs": outputs,
            "output_versions": versions,
            "versions_to_feed": to_hub,
            "feed_queue_coalesced": coalesced,
            "feed_queue_dropped": dropped,
            "latency_created_to_client": spread(&latency_us),
            "latency_feed_sink_to_client": spread(&fanout_us),
            "unstamped_receipts": unstamped,
            "clients_complete": complete,
            "missing_last_versions": missing,
            "client_errors": errors,
            "first_client_error": first_error,
            "messages_received": messages,
            "bytes_received": bytes,
            "resyncs": resyncs,
            "source_errors": source_errors,
            "cores": cores,
            "cpu_process_s": process_cpu,
            "cpu_clients_s": clients_cpu,
            "cpu_engine_s": engine_cpu,
            "cpu_process_pct_of_core": share(process_cpu),
            "cpu_clients_pct_of_core": share(clients_cpu),
            "cpu_engine_pct_of_core": share(engine_cpu),
            "rss_before_clients_bytes": rss_start,
            "rss_connected_bytes": rss_connected,
            "rss_end_bytes": rss_end,
            "rss_peak_bytes": hwm,
        });
        say(out, &report.to_string());
    } else {
        let lines = [
            format!(
                "feed bench: {} calls ({recorded} recording(s), copied round robin) at {speed}x real time, starts spread over the first {} s of call time; {} WebSocket feed client(s) on loopback{}",
                count(m),
                STAGGER_MS / 1000,
                count(n as u64),
                if n == 0 {
                    String::new()
                } else {
                    format!(
                        " ({}; client i reads call i mod {m}), all connected before the replay (in {connect_secs:.1} s)",
                        if (n as u64).is_multiple_of(m) {
                            format!("{} per call", n as u64 / m)
                        } else if (n as u64) < m {
                            format!("one on each of the first {n} calls")
                        } else {
                            format!("{:.2} per call on average", n as f64 / m as f64)
                        }
                    )
                }
            ),
            format!(
                "replay: {replay_secs:.1} s wall, {} events ({:.0} events/s), {} outputs in {} versions, {} versions reached the feed ({} coalesced, {} dropped), {} source error(s)",
                count(events),
                events as f64 / replay_secs.max(1e-9),
                count(outputs),
                count(versions),
                count(to_hub),
                count(coalesced),
                count(dropped),
                source_errors
            ),
            if n == 0 {
                "latency: no clients (baseline run)".to_owned()
            } else {
                format!(
                    "latency, output version created -> received by a client ({} output.upsert receipts): {}",
                    count(latency_us.len() as u64),
                    spread_text(&latency_us)
                )
            },
            if n == 0 {
                String::new()
            } else {
                format!(
                    "  of which feed sink -> client (hub, server, socket, client read): {}",
                    spread_text(&fanout_us)
                )
            },
            if n == 0 {
                String::new()
            } else {
                format!(
                    "completeness: {}/{} clients received the last version of every output of their call; missing: {missing}; client errors: {errors}{}; resyncs: {resyncs}; {} messages ({:.1} MiB) received",
                    count(complete),
                    count(n as u64),
                    first_error
                        .as_ref()
                        .map(|e| format!(" (first: {e})"))
                        .unwrap_or_default(),
                    count(messages),
                    mib(bytes)
                )
            },
            format!(
                "CPU over {wall_secs:.1} s (replay and drain): process {process_cpu:.2} s user+sys = {:.1}% of one core ({cores} cores); feed clients' thread {clients_cpu:.2} s = {:.1}%; engine, feed and server (process minus clients) {engine_cpu:.2} s = {:.1}%",
                share(process_cpu),
                share(clients_cpu),
                share(engine_cpu)
            ),
            format!(
                "memory: peak RSS (VmHWM) {:.1} MiB; RSS {:.1} MiB with the engine and server up, {:.1} MiB with the clients connected, {:.1} MiB at the end of the replay",
                mib(hwm),
                mib(rss_start),
                mib(rss_connected),
                mib(rss_end)
            ),
            "note: the clients live in the engine's process, on their own runtime thread; its CPU is reported apart, but the memory figures include the clients' side of every socket. 'Created' is the earliest sink task's take of the version, a few us after the engine emitted it.".to_owned(),
        ];
        for l in lines.iter().filter(|l| !l.is_empty()) {
            say(out, l);
        }
    }
    if missing > 0 || errors > 0 || unstamped > 0 {
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_read_past_a_comm_with_spaces_and_parens() {
        let stat = "4242 (feed (client) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3";
        let (comm, secs) = stat_seconds(stat).expect("parsed");
        assert_eq!(comm, "feed (client) x");
        assert!((secs - 3.0).abs() < 1e-9, "{secs}");
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(37_250), "37,250");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn calls_are_copies_round_robin_each_under_its_own_id() {
        let line = |c: &str, offset_ms| RecordedLine {
            file: 0,
            line: 1,
            conversation: Arc::from(c),
            offset_ms,
            frame: Arc::new(serde_json::json!({})),
        };
        let lines = vec![line("a", 0), line("b", 0), line("a", 10)];
        let made = calls(&lines, 5);
        let ids: Vec<&str> = made.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["a.0", "b.1", "a.2", "b.3", "a.4"]);
        assert_eq!(made[2].1.len(), 2);
        assert!(made[2].1.iter().all(|l| &*l.conversation == "a.2"));
        assert!(calls(&[], 3).is_empty());
    }
}
