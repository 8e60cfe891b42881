//! `prompter bench --twilio-calls N [--seconds S]`: the Twilio bridge under load.
//!
//! The engine under test is a **child process**, the real `prompter run` (this same binary)
//! with `--listen 127.0.0.1:0`, on a config written to a temporary folder: the shipped offline
//! pipelines `open_questions` and `call_recap` (from the binary's embedded bundle, so the bench
//! runs outside the checkout too), `symbl.api_base` pointing at a fake Symbl, and a `twilio:`
//! section (`public_url: https://bridge.bench.local`). Its stdout (JSON lines) is drained and
//! counted; its stderr is kept for the report.
//!
//! This process holds the fakes, each on its own single-thread runtime so its CPU time can be
//! reported apart: **Symbl** (`fake-symbl`: the token endpoint and the Streaming API socket,
//! which acknowledges a `start_request` as Symbl does, sends one `message_response` every 2 s,
//! answers `stop_request` with `recognition_stopped`, `conversation_completed` and a close) and
//! **Twilio** (`fake-twilio`: `N` callers). Each caller does what Twilio does: it posts the
//! signed voice webhook, takes the `<Parameter>`s of the TwiML (the media token included),
//! opens the media socket with `X-Twilio-Signature`, sends `connected` and `start` (both
//! tracks), then every 20 ms one 160-byte μ-law frame per track for `S` seconds, then `stop`.
//! Calls start spread over the first [`STAGGER`], each at its own phase of the 20 ms frame
//! clock, as independent calls are.
//!
//! Every payload is stamped: bytes 0-7 hold the send time (nanoseconds since the bench's
//! epoch, one monotonic clock shared by both fakes), bytes 8-16 the call, the track and the
//! frame's number; the rest is μ-law silence (0xFF). The bridge forwards audio unchanged, so
//! the fake Symbl reads the stamp off each binary frame: **latency** is from the caller's send
//! to the fake Symbl's receipt (so it includes the fake caller's write and the fake Symbl's
//! wake-up, on loopback, on cores the engine shares), and every frame is accounted for (lost,
//! duplicated, reordered).
//!
//! The **steady window** starts [`SETTLE`] after the last call's first frame and ends when the
//! first call sends its last frame: every call is streaming throughout. Latency is reported
//! over the frames sent in it (and, apart, over the whole run: a call's first frames wait for
//! its Symbl sessions to open). The child's CPU (`/proc/<pid>/stat`, utime+stime) is read at
//! the window's ends; its `VmRSS` is read idle (engine up, no call) and every 500 ms in the
//! window; `VmHWM` at the end of the calls.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use prompter_engine::feed::http::url_encode;
use prompter_engine::twilio::{TOKEN_PARAMETER, signature};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::bench_child::{
    Cpu, Engine, Figures, SYMBL_TOKEN, StderrLog, clock_ticks, close_normally, cpu_now, memory,
    run_command, single_thread_runtime, spread, spread_text, token,
};
use crate::cli::{Stream, say};

/// Call length when `--seconds` is not given.
pub const DEFAULT_SECONDS: u64 = 30;
/// The calls' starts are spread over this.
pub const STAGGER: Duration = Duration::from_secs(2);
/// Left out of the steady window after the last call's first frame (its sessions opening).
pub const SETTLE: Duration = Duration::from_secs(2);
/// More calls than this would not fit the open-file limits of one machine anyway.
const MAX_CALLS: usize = 100_000;
/// The shortest call that leaves a steady window of a few seconds.
const MIN_SECONDS: u64 = 6;
/// One Twilio media frame: 20 ms of 8 kHz μ-law.
const FRAME: usize = 160;
const FRAME_EVERY: Duration = Duration::from_millis(20);
/// How often each fake Symbl socket sends a sentence.
const SENTENCE_EVERY: Duration = Duration::from_secs(2);
/// How long the Symbl sessions may take to end after the last caller's `stop`.
const END_WAIT: Duration = Duration::from_secs(30);
/// Sockets' buffers on the fakes' side (the defaults would hold 128 KiB per socket).
const BUFFER: usize = 8 * 1024;
/// Open files kept free besides three per call on each side.
const SPARE_FDS: u64 = 256;
const PUBLIC_URL: &str = "https://bridge.bench.local";
const TWILIO_TOKEN: &str = "twilio-auth-token-of-the-bench";
const CALLER_THREAD: &str = "fake-twilio";
const SYMBL_THREAD: &str = "fake-symbl";
/// The threads whose CPU time is read apart, in this order.
const THREADS: [&str; 2] = [CALLER_THREAD, SYMBL_THREAD];
/// The two tracks, in stamp order.
const TRACKS: [&str; 2] = ["inbound", "outbound"];

/// Options of the Twilio bench (`prompter bench --twilio-calls N ...`).
#[derive(Debug, Clone)]
pub struct TwilioBenchArgs {
    /// Simultaneous calls.
    pub calls: usize,
    /// Length of each call, in seconds.
    pub seconds: u64,
    /// Print the report as one JSON object instead of text.
    pub json: bool,
}

/// What a stamped payload says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    sent_ns: u64,
    call: u32,
    track: u8,
    seq: u32,
}

fn stamped(s: Stamp) -> [u8; FRAME] {
    let mut p = [0xFF; FRAME];
    p[0..8].copy_from_slice(&s.sent_ns.to_le_bytes());
    p[8..12].copy_from_slice(&s.call.to_le_bytes());
    p[12] = s.track;
    p[13..17].copy_from_slice(&s.seq.to_le_bytes());
    p
}

fn read_stamp(p: &[u8]) -> Option<Stamp> {
    if p.len() != FRAME || p[12] > 1 {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let mut ns = [0u8; 8];
    ns.copy_from_slice(&p[0..8]);
    Some(Stamp {
        sent_ns: u64::from_le_bytes(ns),
        call: u32_at(8),
        track: p[12],
        seq: u32_at(13),
    })
}

/// Standard base64 with padding (the crate is only a dev-dependency here).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let b = |i: usize| u32::from(c.get(i).copied().unwrap_or(0));
        let n = (b(0) << 16) | (b(1) << 8) | b(2);
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn ns_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// One audio frame as the fake Symbl received it.
struct Receipt {
    stamp: Stamp,
    recv_ns: u64,
}

/// The fake Symbl's state.
struct SymblSide {
    epoch: Instant,
    receipts: Mutex<Vec<Receipt>>,
    /// Binary frames that carried no stamp (or came before the `start_request`).
    unstamped: AtomicU64,
    sessions: AtomicU64,
    stopped: AtomicU64,
    closed: AtomicU64,
    sentences: AtomicU64,
    refused: AtomicU64,
}

async fn streaming(
    State(s): State<Arc<SymblSide>>,
    UrlPath(connection_id): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
    ws: WebSocketUpgrade,
) -> Response {
    if q.get("access_token").map(String::as_str) != Some(SYMBL_TOKEN) {
        s.refused.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::UNAUTHORIZED, "unknown token").into_response();
    }
    ws.read_buffer_size(BUFFER)
        .write_buffer_size(BUFFER)
        .on_upgrade(move |socket| symbl_socket(s, connection_id, socket))
}

async fn send_json(socket: &mut WebSocket, v: Value) -> bool {
    socket
        .send(WsMessage::Text(v.to_string().into()))
        .await
        .is_ok()
}

/// One Streaming API socket: the start, audio receipts, a sentence every 2 s, the stop.
async fn symbl_socket(s: Arc<SymblSide>, connection_id: String, mut socket: WebSocket) {
    let served = serve_symbl(&s, &connection_id, &mut socket).await;
    if served == Some(true) {
        s.stopped.fetch_add(1, Ordering::Relaxed);
        close_normally(&mut socket).await;
    }
    s.closed.fetch_add(1, Ordering::Relaxed);
}

/// `Some(true)` after a `stop_request` was answered; `Some(false)` when the socket ended first;
/// `None` when no valid start came.
async fn serve_symbl(s: &SymblSide, connection_id: &str, socket: &mut WebSocket) -> Option<bool> {
    let start: Value = loop {
        match socket.recv().await? {
            Ok(WsMessage::Text(t)) => break serde_json::from_str(t.as_str()).unwrap_or_default(),
            Ok(WsMessage::Binary(_)) => {
                s.unstamped.fetch_add(1, Ordering::Relaxed);
            }
            Ok(WsMessage::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    };
    if start["type"] != "start_request" {
        let error =
            json!({"type": "error", "message": "The first message must be a start_request."});
        send_json(socket, error).await;
        return None;
    }
    s.sessions.fetch_add(1, Ordering::Relaxed);
    let speaker = start
        .pointer("/speaker/userId")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let conversation = format!("bench-{connection_id}");
    for m in [
        "started_listening",
        "recognition_started",
        "conversation_created",
    ] {
        let frame = json!({"type": "message", "message": {"type": m,
            "data": {"conversationId": conversation}}});
        if !send_json(socket, frame).await {
            return Some(false);
        }
    }
    let mut sentences =
        tokio::time::interval_at(tokio::time::Instant::now() + SENTENCE_EVERY, SENTENCE_EVERY);
    sentences.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut n = 0u64;
    loop {
        tokio::select! {
            msg = socket.recv() => {
                let recv_ns = ns_since(s.epoch);
                match msg {
                    Some(Ok(WsMessage::Binary(audio))) => match read_stamp(&audio) {
                        Some(stamp) => s
                            .receipts
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(Receipt { stamp, recv_ns }),
                        None => {
                            s.unstamped.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Some(Ok(WsMessage::Text(t))) if t.as_str().contains("stop_request") => {
                        for m in ["recognition_stopped", "conversation_completed"] {
                            let frame = json!({"type": "message", "message": {"type": m,
                                "data": {"conversationId": conversation}}});
                            if !send_json(socket, frame).await {
                                return Some(false);
                            }
                        }
                        return Some(true);
                    }
                    Some(Ok(WsMessage::Close(_)) | Err(_)) | None => return Some(false),
                    Some(Ok(_)) => {}
                }
            }
            _ = sentences.tick() => {
                n += 1;
                let frame = json!({"type": "message_response", "sequenceNumber": n,
                    "messages": [{"id": format!("{connection_id}-{speaker}-{n}"),
                        "payload": {"content": format!("This is sentence {n} of the bench on this track."),
                            "contentType": "text/plain"},
                        "duration": {"startTime": "2026-01-01T10:00:00Z",
                            "endTime": "2026-01-01T10:00:02Z"}}]});
                if !send_json(socket, frame).await {
                    return Some(false);
                }
                s.sentences.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Where the callers are, for the measuring task.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    /// Calls whose first media frame went out.
    started: usize,
    /// Calls that failed before their first frame.
    failed: usize,
    /// Calls that sent their last media frame.
    streamed: usize,
    /// Calls over (their socket closed, or failed).
    ended: usize,
}

/// What one caller did.
#[derive(Default)]
struct CallReport {
    sent: [u64; 2],
    /// How late each 20 ms tick fired, in microseconds (the bench keeping pace).
    lag_us: Vec<u64>,
    error: Option<String>,
}

struct Callers {
    addr: String,
    http: reqwest::Client,
    epoch: Instant,
    frames: u32,
    progress: watch::Sender<Progress>,
}

/// One fake Twilio call; never fails, says what went wrong in its report.
async fn caller(c: Arc<Callers>, call: u32, start_at: tokio::time::Instant) -> CallReport {
    tokio::time::sleep_until(start_at).await;
    let mut report = CallReport {
        lag_us: Vec::with_capacity(c.frames as usize),
        ..CallReport::default()
    };
    let mut started = false;
    if let Err(e) = place_call(&c, call, &mut report, &mut started).await {
        report.error = Some(format!("call {call}: {e}"));
    }
    c.progress.send_modify(|p| {
        p.ended += 1;
        if !started {
            p.failed += 1;
        }
    });
    report
}

async fn place_call(
    c: &Callers,
    call: u32,
    report: &mut CallReport,
    started: &mut bool,
) -> Result<(), String> {
    let call_sid = format!("CA{call:032}");
    let stream_sid = format!("MZ{call:032}");
    let params = voice_webhook(c, &call_sid, &format!("+1415{call:07}")).await?;
    let mut req = format!("ws://{}/twilio/media", c.addr)
        .into_client_request()
        .map_err(|e| e.to_string())?;
    let sig = signature(TWILIO_TOKEN, &format!("wss://{}/twilio/media", host()), &[]);
    req.headers_mut().insert(
        "x-twilio-signature",
        sig.parse().map_err(|_| "bad signature header")?,
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(BUFFER)
        .write_buffer_size(BUFFER)
        .max_write_buffer_size(64 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true)
        .await
        .map_err(|e| format!("cannot open the media socket: {e}"))?;
    let lost = |e: tokio_tungstenite::tungstenite::Error| format!("the media socket failed: {e}");
    ws.send(Message::text(
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(),
    ))
    .await
    .map_err(lost)?;
    let start = json!({"event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
        "start": {"accountSid": "AC0000", "streamSid": stream_sid, "callSid": call_sid,
            "tracks": TRACKS,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            "customParameters": params}});
    ws.send(Message::text(start.to_string()))
        .await
        .map_err(lost)?;
    let mut tick = tokio::time::interval(FRAME_EVERY);
    // Burst: a late tick is made up at once, as a real-time source does with the audio it
    // buffered meanwhile; how late each tick fired is reported.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut seq = 2u64;
    for i in 0..c.frames {
        let scheduled = loop {
            tokio::select! {
                biased;
                t = tick.tick() => break t,
                msg = ws.next() => match msg {
                    Some(Ok(Message::Close(_)) | Err(_)) | None => {
                        return Err("the bridge closed the media socket mid-call".into());
                    }
                    Some(Ok(_)) => {}
                },
            }
        };
        report.lag_us.push(scheduled.elapsed().as_micros() as u64);
        for (track, name) in TRACKS.iter().enumerate() {
            let payload = stamped(Stamp {
                sent_ns: ns_since(c.epoch),
                call,
                track: track as u8,
                seq: i,
            });
            let frame = format!(
                r#"{{"event":"media","sequenceNumber":"{seq}","media":{{"track":"{name}","chunk":"{}","timestamp":"{}","payload":"{}"}},"streamSid":"{stream_sid}"}}"#,
                i + 1,
                u64::from(i) * 20,
                base64(&payload)
            );
            seq += 1;
            ws.send(Message::text(frame)).await.map_err(lost)?;
            report.sent[track] += 1;
        }
        if !*started {
            *started = true;
            c.progress.send_modify(|p| p.started += 1);
        }
    }
    c.progress.send_modify(|p| p.streamed += 1);
    let stop = json!({"event": "stop", "sequenceNumber": seq.to_string(), "streamSid": stream_sid,
        "stop": {"accountSid": "AC0000", "callSid": call_sid}});
    ws.send(Message::text(stop.to_string()))
        .await
        .map_err(lost)?;
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    Ok(())
}

fn host() -> &'static str {
    PUBLIC_URL.trim_start_matches("https://")
}

/// What Twilio does first: the signed voice webhook; returns the TwiML's `<Parameter>`s.
async fn voice_webhook(c: &Callers, call_sid: &str, from: &str) -> Result<Value, String> {
    let params: Vec<(String, String)> = [
        ("AccountSid", "AC0000"),
        ("CallSid", call_sid),
        ("From", from),
        ("To", "+18005550199"),
        ("CallStatus", "ringing"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let body: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", url_encode(k), url_encode(v)))
        .collect();
    let sig = signature(TWILIO_TOKEN, &format!("{PUBLIC_URL}/twilio/voice"), &params);
    let r = c
        .http
        .post(format!("http://{}/twilio/voice", c.addr))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(body.join("&"))
        .send()
        .await
        .map_err(|e| format!("the voice webhook failed: {e}"))?;
    let status = r.status();
    let twiml = r.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("the voice webhook answered {status}: {twiml}"));
    }
    let mut out = serde_json::Map::new();
    for part in twiml.split("<Parameter name=\"").skip(1) {
        if let Some((name, rest)) = part.split_once("\" value=\"") {
            let value = rest.split('"').next().unwrap_or("");
            let value = value
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            out.insert(name.to_owned(), Value::String(value));
        }
    }
    if !out.contains_key(TOKEN_PARAMETER) {
        return Err(format!("the TwiML carries no `{TOKEN_PARAMETER}`: {twiml}"));
    }
    Ok(Value::Object(out))
}

/// Frames per track: received (distinct), duplicated, out of order.
#[derive(Debug, Default, Clone, Copy)]
struct TrackTally {
    received: u64,
    duplicates: u64,
    reordered: u64,
}

/// Accounts for every receipt; the latencies (µs) sorted, of the window and of the whole run.
fn tally(
    receipts: &[Receipt],
    calls: usize,
    frames: u32,
    window: (u64, u64),
) -> ([TrackTally; 2], Vec<u64>, Vec<u64>) {
    let mut seen = vec![false; calls * 2 * frames as usize];
    let mut last: HashMap<(u32, u8), u32> = HashMap::new();
    let mut tracks = [TrackTally::default(); 2];
    let (mut steady, mut all) = (Vec::new(), Vec::with_capacity(receipts.len()));
    for r in receipts {
        let s = r.stamp;
        let t = &mut tracks[usize::from(s.track)];
        let idx = (s.call as usize * 2 + usize::from(s.track)) * frames as usize + s.seq as usize;
        match seen.get_mut(idx) {
            Some(true) => {
                t.duplicates += 1;
                continue;
            }
            Some(slot) => {
                *slot = true;
                t.received += 1;
            }
            None => continue,
        }
        let prev = last.entry((s.call, s.track)).or_insert(s.seq);
        if s.seq < *prev {
            t.reordered += 1;
        }
        *prev = (*prev).max(s.seq);
        let us = r.recv_ns.saturating_sub(s.sent_ns) / 1000;
        all.push(us);
        if (window.0..=window.1).contains(&s.sent_ns) {
            steady.push(us);
        }
    }
    steady.sort_unstable();
    all.sort_unstable();
    (tracks, steady, all)
}

/// The child's config, in a temporary folder with the bundled offline pipelines.
fn write_config(dir: &Path, symbl: std::net::SocketAddr) -> Result<std::path::PathBuf, String> {
    let pipelines = ["pipelines/open_questions.yaml", "pipelines/call_recap.yaml"];
    for rel in pipelines {
        crate::bundle::write(dir, rel).map_err(|e| format!("cannot write `{rel}`: {e}"))?;
    }
    let config = dir.join("bench.yaml");
    let yaml = format!(
        "# Written by `prompter bench --twilio-calls`.\npipelines:\n  - {}\n  - {}\nsymbl:\n  api_base: http://{symbl}\ntwilio:\n  public_url: {PUBLIC_URL}\n",
        pipelines[0], pipelines[1]
    );
    std::fs::write(&config, yaml).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    Ok(config)
}

/// Runs the Twilio bench; prints its report on `out`. Exit code 1 when a frame was lost, a call
/// or the engine failed.
pub async fn run(args: TwilioBenchArgs, out: &Stream, err: &Stream) -> u8 {
    match bench(&args, out, err).await {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            say(err, &format!("error: {e}"));
            1
        }
    }
}

async fn bench(args: &TwilioBenchArgs, out: &Stream, err: &Stream) -> Result<bool, String> {
    let n = args.calls;
    if !(1..=MAX_CALLS).contains(&n) {
        return Err(format!("--twilio-calls must be between 1 and {MAX_CALLS}"));
    }
    if args.seconds < MIN_SECONDS {
        return Err(format!(
            "--seconds must be at least {MIN_SECONDS}: the steady window starts {} s after the last call started, and the calls start over {} s",
            SETTLE.as_secs(),
            STAGGER.as_secs()
        ));
    }
    let need = 3 * n as u64 + SPARE_FDS;
    if let Some(limit) = crate::bench::procfs::open_files_limit()
        && limit < need
    {
        return Err(format!(
            "{n} calls need about {need} open files in this process and in the engine (three sockets per call), but the limit is {limit}: raise it with `ulimit -n {need}`"
        ));
    }
    let frames = u32::try_from(args.seconds * 1000 / FRAME_EVERY.as_millis() as u64)
        .map_err(|_| "--seconds is too large")?;
    let symbl_rt = single_thread_runtime(SYMBL_THREAD)?;
    let caller_rt = single_thread_runtime(CALLER_THREAD)?;
    let side = Arc::new(SymblSide {
        epoch: Instant::now(),
        receipts: Mutex::new(Vec::with_capacity(n * 2 * frames as usize)),
        unstamped: AtomicU64::new(0),
        sessions: AtomicU64::new(0),
        stopped: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        sentences: AtomicU64::new(0),
        refused: AtomicU64::new(0),
    });
    let measured = measure(args, frames, &side, &symbl_rt, &caller_rt, err).await;
    symbl_rt.shutdown_background();
    caller_rt.shutdown_background();
    let (report, ok) = figures(measured?, &side);
    if args.json {
        say(out, &report.to_string());
    } else {
        for l in text(&report) {
            say(out, &l);
        }
    }
    Ok(ok)
}

/// What a run measured, before it is reduced to figures.
struct Run {
    calls: usize,
    seconds: u64,
    frames: u32,
    pid: u32,
    startup_s: f64,
    /// The steady window, in nanoseconds since the epoch, and its length.
    window: (u64, u64),
    window_s: f64,
    cpu: (Cpu, Cpu),
    engine_cpu_total: u64,
    rss_idle: u64,
    rss_samples: Vec<u64>,
    hwm: u64,
    reports: Vec<CallReport>,
    exit: Result<std::process::ExitStatus, String>,
    stderr: StderrLog,
    outputs: u64,
}

/// The fake Symbl on its runtime; its address.
async fn start_symbl(
    rt: &tokio::runtime::Runtime,
    side: &Arc<SymblSide>,
) -> Result<std::net::SocketAddr, String> {
    let app = axum::Router::new()
        .route("/oauth2/token:generate", post(token))
        .route("/v1/streaming/{connection_id}", get(streaming))
        .with_state(side.clone());
    crate::bench_child::serve(rt, app, "Symbl").await
}

/// When call `i` of `n` starts: spread over [`STAGGER`], each at its own phase of the 20 ms
/// frame clock (golden-ratio steps), so the calls' frames do not all fall on the same instant
/// as they would if `STAGGER / n` were a multiple of 20 ms.
fn start_offset(i: usize, n: usize) -> Duration {
    let phase = (i as f64 * 0.618_033_988_749_895).fract();
    STAGGER.mul_f64(i as f64 / n as f64) + FRAME_EVERY.mul_f64(phase)
}

async fn measure(
    args: &TwilioBenchArgs,
    frames: u32,
    side: &Arc<SymblSide>,
    symbl_rt: &tokio::runtime::Runtime,
    caller_rt: &tokio::runtime::Runtime,
    err: &Stream,
) -> Result<Run, String> {
    let n = args.calls;
    let symbl_addr = start_symbl(symbl_rt, side).await?;
    let dir = tempfile::tempdir().map_err(|e| format!("cannot make a temporary folder: {e}"))?;
    let config = write_config(dir.path(), symbl_addr)?;
    let spawned = Instant::now();
    let mut command = run_command(&config)?;
    command.env("TWILIO_AUTH_TOKEN", TWILIO_TOKEN);
    let mut engine = Engine::spawn(command, |_| {})?;
    let addr = engine.address().await?;
    let startup_s = spawned.elapsed().as_secs_f64();
    say(
        err,
        &format!(
            "twilio bench: engine pid {} listening on {addr} (up in {startup_s:.2} s); {n} call(s) of {} s starting over {} s",
            engine.pid,
            args.seconds,
            STAGGER.as_secs()
        ),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_idle, _) = memory(engine.pid);

    let (progress, mut progress_rx) = watch::channel(Progress::default());
    let callers = Arc::new(Callers {
        addr,
        http: reqwest::Client::new(),
        epoch: side.epoch,
        frames,
        progress,
    });
    let t0 = tokio::time::Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| caller_rt.spawn(caller(callers.clone(), i as u32, t0 + start_offset(i, n))))
        .collect();

    // The steady window: from SETTLE after the last call's first frame to the first call's end.
    let all_started = tokio::time::timeout(STAGGER + Duration::from_secs(30), async {
        progress_rx
            .wait_for(|p| p.started + p.failed >= n)
            .await
            .is_ok()
    })
    .await;
    if all_started.is_err() {
        say(
            err,
            "warning: some calls had not started 30 s after the last was placed",
        );
    }
    tokio::time::sleep(SETTLE).await;
    let (start, start_ns) = (Instant::now(), ns_since(side.epoch));
    let cpu0 = cpu_now(engine.pid, &THREADS);
    let over = |p: &Progress| p.streamed > 0 || p.ended > 0;
    if over(&progress_rx.borrow()) {
        return Err(
            "a call ended before the steady window began: no window to measure (a call failed, or --seconds is too short)".into(),
        );
    }
    say(
        err,
        "twilio bench: every call streaming; measuring the steady window",
    );
    let mut rss_samples = Vec::new();
    loop {
        tokio::select! {
            _ = progress_rx.wait_for(over) => break,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                rss_samples.push(memory(engine.pid).0);
            }
        }
    }
    let cpu1 = cpu_now(engine.pid, &THREADS);
    let window = (start_ns, ns_since(side.epoch));
    let window_s = start.elapsed().as_secs_f64();

    // The rest of the calls, then their Symbl sessions' ends.
    let mut reports = Vec::with_capacity(n);
    for h in handles {
        let failed = |e: String| CallReport {
            error: Some(e),
            ..CallReport::default()
        };
        reports.push(
            match tokio::time::timeout(Duration::from_secs(args.seconds + 60), h).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => failed(format!("a caller task failed: {e}")),
                Err(_) => failed("a caller did not finish in time".into()),
            },
        );
    }
    let calls_done = Instant::now();
    while side.closed.load(Ordering::Relaxed) < side.sessions.load(Ordering::Relaxed)
        && calls_done.elapsed() < END_WAIT
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, hwm) = memory(engine.pid);
    let engine_cpu_total = cpu_now(engine.pid, &[]).child;
    say(
        err,
        "twilio bench: calls over; stopping the engine (SIGTERM)",
    );
    let exit = engine.terminate().await;
    Ok(Run {
        calls: n,
        seconds: args.seconds,
        frames,
        pid: engine.pid,
        startup_s,
        window,
        window_s,
        cpu: (cpu0, cpu1),
        engine_cpu_total,
        rss_idle,
        rss_samples,
        hwm,
        reports,
        exit,
        stderr: engine.stderr(),
        outputs: engine.stdout_lines(),
    })
}

/// The report, as one JSON object, and whether the run passed: every frame received once,
/// every call and session ended cleanly, one recap per call, the engine exited with 0.
fn figures(mut run: Run, side: &SymblSide) -> (Value, bool) {
    let n = run.calls;
    let receipts = std::mem::take(
        &mut *side
            .receipts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let (tracks, steady, all) = tally(&receipts, n, run.frames, run.window);
    let mut sent = [0u64; 2];
    let mut lag = Vec::with_capacity(n * run.frames as usize);
    let mut errors: Vec<String> = Vec::new();
    for r in &mut run.reports {
        sent[0] += r.sent[0];
        sent[1] += r.sent[1];
        lag.append(&mut r.lag_us);
        errors.extend(r.error.take());
    }
    lag.sort_unstable();
    let lost = [0, 1].map(|i| sent[i].saturating_sub(tracks[i].received));
    let samples = run.rss_samples.len().max(1) as u64;
    let rss_loaded = run.rss_samples.iter().sum::<u64>() / samples;
    let rss_max = run.rss_samples.iter().copied().max().unwrap_or(0);
    let (hz, hz_read) = clock_ticks();
    let secs = |ticks: u64| ticks as f64 / hz;
    let share = |ticks: u64| 100.0 * secs(ticks) / run.window_s.max(1e-9);
    let (c0, c1) = &run.cpu;
    let engine_cpu = c1.child.saturating_sub(c0.child);
    let find = |what: &str| run.stderr.find(what);
    // Counted over the kept lines: a run of more calls than the log keeps lines undercounts.
    let ended_by_stop = run
        .stderr
        .lines
        .iter()
        .filter(|l| l.contains(": ended (the call's stream stopped)"))
        .count();
    let stopped = side.stopped.load(Ordering::Relaxed);
    let exit_ok = run.exit.as_ref().is_ok_and(|s| s.code() == Some(0));
    let ok = exit_ok
        && errors.is_empty()
        && lost == [0, 0]
        && tracks.iter().all(|t| t.duplicates == 0)
        && stopped == 2 * n as u64
        && run.outputs >= n as u64;
    let track = |i: usize| {
        json!({"sent": sent[i], "received": tracks[i].received, "lost": lost[i],
            "duplicates": tracks[i].duplicates, "out_of_order": tracks[i].reordered})
    };
    // Split in parts: one `json!` this size exceeds the macro recursion limit.
    let setup = json!({"calls": n, "seconds": run.seconds, "frames_per_track_per_call": run.frames,
        "stagger_s": STAGGER.as_secs_f64(), "settle_s": SETTLE.as_secs_f64(),
        "window_s": run.window_s, "cores": std::thread::available_parallelism().map_or(1, |c| c.get()),
        "clock_ticks_per_s": hz, "clock_ticks_assumed": !hz_read});
    let symbl = json!({"sessions": side.sessions.load(Ordering::Relaxed),
        "stopped_cleanly": stopped, "refused": side.refused.load(Ordering::Relaxed),
        "sentences_sent": side.sentences.load(Ordering::Relaxed),
        "unstamped_frames": side.unstamped.load(Ordering::Relaxed)});
    let cpu = json!({"window_s": secs(engine_cpu), "pct_of_core": share(engine_cpu),
        "pct_of_core_per_call": share(engine_cpu) / n as f64,
        "whole_run_s": secs(run.engine_cpu_total)});
    let rss = json!({"idle_kib": run.rss_idle, "loaded_mean_kib": rss_loaded,
        "loaded_max_kib": rss_max, "vmhwm_kib": run.hwm,
        "per_call_kib": rss_loaded.saturating_sub(run.rss_idle) as f64 / n as f64});
    let exit = match &run.exit {
        Ok(s) => s.to_string(),
        Err(e) => e.clone(),
    };
    let engine = json!({"pid": run.pid, "startup_s": run.startup_s, "cpu": cpu, "rss": rss,
        "outputs": run.outputs, "calls_ended_by_stop": ended_by_stop, "exit": exit,
        "bridge_line": find("twilio bridge:"), "stopped_line": find("stopped:"),
        "warnings": run.stderr.complaints,
        "first_warnings": run.stderr.first_complaints});
    let bench = json!({"cpu_pct_of_core": share(c1.bench.saturating_sub(c0.bench)),
        "fake_twilio_cpu_pct_of_core": share(c1.threads[0].saturating_sub(c0.threads[0])),
        "fake_symbl_cpu_pct_of_core": share(c1.threads[1].saturating_sub(c0.threads[1])),
        "caller_tick_lag": spread(&lag), "caller_errors": errors.len(),
        "first_caller_error": errors.first()});
    let report = json!({"setup": setup,
        "latency": {"steady": spread(&steady), "whole_run": spread(&all)},
        "tracks": {"inbound": track(0), "outbound": track(1)},
        "symbl": symbl, "engine": engine, "bench": bench, "ok": ok});
    (report, ok)
}

/// The report as text, one line per figure.
fn text(r: &Value) -> Vec<String> {
    let v = Figures(r);
    let n = v.u("/setup/calls");
    let mut lines = vec![
        format!(
            "twilio bench: {n} call(s) of {} s ({} frames of 20 ms per track, both tracks), starts spread over {} s; engine = child `prompter run` (pid {}), up in {:.2} s",
            v.u("/setup/seconds"),
            v.u("/setup/frames_per_track_per_call"),
            v.f("/setup/stagger_s"),
            v.u("/engine/pid"),
            v.f("/engine/startup_s")
        ),
        format!(
            "steady window: {:.1} s (from {} s after the last call's first frame to the first call's last frame)",
            v.f("/setup/window_s"),
            v.f("/setup/settle_s")
        ),
        format!(
            "latency, caller's send -> fake Symbl's receipt, steady window: {}",
            spread_text(&r["latency"]["steady"], "frames")
        ),
        format!(
            "  whole run (incl. each call's sessions opening): {}",
            spread_text(&r["latency"]["whole_run"], "frames")
        ),
    ];
    for track in TRACKS {
        let t = |k: &str| v.u(&format!("/tracks/{track}/{k}"));
        lines.push(format!(
            "frames {track}: {} sent, {} received, {} lost, {} duplicated, {} out of order",
            t("sent"),
            t("received"),
            t("lost"),
            t("duplicates"),
            t("out_of_order")
        ));
    }
    lines.extend([
        format!(
            "Symbl sessions: {} opened, {} stopped cleanly (stop_request answered), {} refused; {} sentences sent; {} unstamped frame(s)",
            v.u("/symbl/sessions"),
            v.u("/symbl/stopped_cleanly"),
            v.u("/symbl/refused"),
            v.u("/symbl/sentences_sent"),
            v.u("/symbl/unstamped_frames")
        ),
        format!(
            "engine CPU over the window: {:.2} s user+sys = {:.1}% of one core, {:.2}% per call ({} ticks/s, {})",
            v.f("/engine/cpu/window_s"),
            v.f("/engine/cpu/pct_of_core"),
            v.f("/engine/cpu/pct_of_core_per_call"),
            v.f("/setup/clock_ticks_per_s"),
            if r["setup"]["clock_ticks_assumed"] == true {
                "assumed: getconf CLK_TCK failed"
            } else {
                "from getconf CLK_TCK"
            }
        ),
        format!(
            "engine memory: RSS {:.1} MiB idle, {:.1} MiB mean / {:.1} MiB max in the window -> {:.0} KiB per call; peak (VmHWM) {:.1} MiB",
            v.mib("/engine/rss/idle_kib"),
            v.mib("/engine/rss/loaded_mean_kib"),
            v.mib("/engine/rss/loaded_max_kib"),
            v.f("/engine/rss/per_call_kib"),
            v.mib("/engine/rss/vmhwm_kib")
        ),
        format!(
            "bench process CPU over the window: {:.1}% of one core (fake Twilio thread {:.1}%, fake Symbl thread {:.1}%); {} cores shared with the engine",
            v.f("/bench/cpu_pct_of_core"),
            v.f("/bench/fake_twilio_cpu_pct_of_core"),
            v.f("/bench/fake_symbl_cpu_pct_of_core"),
            v.u("/setup/cores")
        ),
        format!(
            "caller pacing, how late each 20 ms tick fired: {}",
            spread_text(&r["bench"]["caller_tick_lag"], "ticks")
        ),
        format!(
            "engine: {}; {} output line(s) on stdout; {}/{n} call(s) ended by their stream's stop; {} warning/error line(s) on stderr",
            v.s("/engine/exit"),
            v.u("/engine/outputs"),
            v.u("/engine/calls_ended_by_stop"),
            v.u("/engine/warnings")
        ),
    ]);
    for key in ["bridge_line", "stopped_line"] {
        if let Some(l) = r["engine"][key].as_str() {
            lines.push(format!("  {l}"));
        }
    }
    for w in r["engine"]["first_warnings"]
        .as_array()
        .into_iter()
        .flatten()
    {
        lines.push(format!("  stderr: {}", w.as_str().unwrap_or("")));
    }
    if v.u("/bench/caller_errors") > 0 {
        lines.push(format!(
            "caller errors: {} (first: {})",
            v.u("/bench/caller_errors"),
            v.s("/bench/first_caller_error")
        ));
    }
    if r["ok"] != true {
        lines.push(
            "FAILED: see lost or duplicated frames, caller errors, Symbl sessions, outputs or the engine's exit above".into(),
        );
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_the_rest_is_silence() {
        let s = Stamp {
            sent_ns: 1_234_567_890_123,
            call: 77,
            track: 1,
            seq: 1499,
        };
        let p = stamped(s);
        assert_eq!(read_stamp(&p), Some(s));
        assert!(p[17..].iter().all(|b| *b == 0xFF));
        assert_eq!(read_stamp(&p[..100]), None);
    }

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(&[0, 1, 2, 255]), "AAEC/w==");
        assert_eq!(base64(b"Man"), "TWFu");
        assert_eq!(base64(b"Ma"), "TWE=");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(&[0xFF; FRAME]).len(), 216);
    }

    #[test]
    fn the_tally_counts_losses_duplicates_and_reordering() {
        let r = |call, track, seq, sent_ns, recv_ns| Receipt {
            stamp: Stamp {
                sent_ns,
                call,
                track,
                seq,
            },
            recv_ns,
        };
        let receipts = vec![
            r(0, 0, 0, 1_000, 2_000_000),
            r(0, 0, 2, 3_000, 4_000_000),
            r(0, 0, 1, 2_000, 5_000_000),
            r(0, 0, 1, 2_000, 6_000_000),
            r(1, 1, 0, 10_000_000, 11_000_000),
        ];
        let (tracks, steady, all) = tally(&receipts, 2, 3, (0, 5_000));
        assert_eq!(tracks[0].received, 3);
        assert_eq!(tracks[0].duplicates, 1);
        assert_eq!(tracks[0].reordered, 1);
        assert_eq!(tracks[1].received, 1);
        assert_eq!(steady.len(), 3);
        assert_eq!(all.len(), 4);
        assert_eq!(all.last(), Some(&4_998));
    }

    #[test]
    fn calls_start_within_the_stagger_each_at_its_own_phase_of_the_frame_clock() {
        let n = 100;
        let mut phases: Vec<u128> = (0..n)
            .map(|i| start_offset(i, n).as_micros() % FRAME_EVERY.as_micros())
            .collect();
        assert!((0..n).all(|i| start_offset(i, n) < STAGGER + FRAME_EVERY));
        phases.sort_unstable();
        phases.dedup();
        assert_eq!(phases.len(), n, "{phases:?}");
        // Spread over the whole 20 ms, not bunched: no gap wider than 1 ms.
        assert!(phases.windows(2).all(|w| w[1] - w[0] < 1_000), "{phases:?}");
    }

    #[test]
    fn cpu_ticks_read_past_a_comm_with_spaces_and_parens() {
        let stat = "4242 (fake (twilio) x) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 3";
        assert_eq!(
            crate::bench::procfs::stat_ticks(stat),
            Some(("fake (twilio) x".to_owned(), 300))
        );
    }
}
