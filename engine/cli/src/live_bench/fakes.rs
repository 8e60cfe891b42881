//! The services the engine under test calls, faked in the bench's process, each on its own
//! runtime thread: **Symbl** (the token endpoint and the Subscribe API, which plays each
//! call's recording over its socket) and **Nebula** (embeddings and the streamed chat, with a
//! realistic latency).
//!
//! Sockets on both sides use 8 KiB buffers (tungstenite's 128 KiB defaults would hold about
//! 135 KiB per connection), and the listeners a 4,096-deep backlog.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prompter_plugin_retrieve::embedder::HashingEmbedder;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::faults::{Fault, FaultSwitch, HALF_OPEN_HOLD, HANG, REPLAY};
use super::script::Script;
use crate::bench_child::close_normally;

/// The Nebula key the child is given (`NEBULA_API_KEY`) and the fake requires.
pub(super) const NEBULA_KEY: &str = "nebula-key-of-the-bench";
/// Socket buffers, read and write.
const BUFFER: usize = 8 * 1024;
/// Most bytes a socket may queue for writing before sends wait.
const MAX_WRITE_BUFFER: usize = 1024 * 1024;
/// Largest message a socket accepts.
const MAX_MESSAGE: usize = 1024 * 1024;
/// How long Nebula takes to embed a text.
pub(super) const EMBED_LATENCY: Duration = Duration::from_millis(30);
/// How long Nebula takes to stream the first words of an answer.
pub(super) const FIRST_DELTA: Duration = Duration::from_millis(250);
/// Time between the next pieces of the answer.
pub(super) const DELTA_EVERY: Duration = Duration::from_millis(40);
/// The answer, as streamed: one `delta` per piece.
const ANSWER: [&str; 9] = [
    "Acknowledge the concern ",
    "and ask what a good outcome ",
    "would look like for them. ",
    "Then offer a phased rollout ",
    "that starts with a small pilot, ",
    "priced to fit this quarter, ",
    "and share the results from ",
    "a similar customer ",
    "before you talk about the full plan.",
];
/// Nebula's embeddings have 1,024 dimensions.
const DIMS: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Nanoseconds since `epoch`.
pub(super) fn ns_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_nanos() as u64
}

/// Where a call is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Stage {
    /// Announced to the engine; no socket yet.
    Placed,
    /// Its Subscribe socket is open (the recording plays).
    Live,
    /// Its recording was sent whole.
    Done,
}

/// One simulated call: a Symbl connection whose Subscribe socket plays one recording.
pub(super) struct Call {
    /// Its connection id, which is also its conversation id: `load-NNNNNN`.
    pub(super) id: String,
    /// Which recording it plays.
    pub(super) recording: usize,
    /// When each frame went out, in nanoseconds since the bench's epoch (0: not sent).
    pub(super) sent_ns: Box<[AtomicU64]>,
    /// The next frame to send: a socket opened again resumes there, as Symbl would.
    next: AtomicUsize,
    /// When its first socket opened: the recording's time zero.
    opened: std::sync::OnceLock<tokio::time::Instant>,
    /// Sockets opened for it (more than one: the engine reconnected).
    pub(super) sockets: AtomicU32,
    stage: watch::Sender<Stage>,
}

impl Call {
    /// Call number `number`, playing `recording` (of `frames` frames).
    pub(super) fn new(number: u32, recording: usize, frames: usize) -> Call {
        Call {
            id: call_id(number),
            recording,
            sent_ns: (0..frames).map(|_| AtomicU64::new(0)).collect(),
            next: AtomicUsize::new(0),
            opened: std::sync::OnceLock::new(),
            sockets: AtomicU32::new(0),
            stage: watch::Sender::new(Stage::Placed),
        }
    }

    /// Waits until the call has reached `stage`.
    pub(super) async fn reached(&self, stage: Stage) {
        let _ = self.stage.subscribe().wait_for(|s| *s >= stage).await;
    }

    /// Whether its recording was sent whole.
    pub(super) fn done(&self) -> bool {
        *self.stage.borrow() == Stage::Done
    }

    fn advance(&self, stage: Stage) -> bool {
        self.stage.send_if_modified(|s| {
            let later = stage > *s;
            if later {
                *s = stage;
            }
            later
        })
    }
}

/// The connection and conversation id of call `number`.
pub(super) fn call_id(number: u32) -> String {
    format!("load-{number:06}")
}

/// The call number in a conversation id made by [`call_id`].
pub(super) fn call_number(id: &str) -> Option<u32> {
    id.strip_prefix("load-")?.parse().ok()
}

/// The fake Symbl's state.
pub(super) struct SymblSide {
    pub(super) epoch: Instant,
    script: Arc<Script>,
    pub(super) fault: Arc<FaultSwitch>,
    /// Calls placed and not yet done, by connection id.
    calls: Mutex<HashMap<String, Arc<Call>>>,
    pub(super) counts: SymblCounts,
}

/// What the fake Symbl counted.
#[derive(Default)]
pub(super) struct SymblCounts {
    /// Sockets opened.
    pub(super) sockets: AtomicU64,
    /// Calls with an open socket whose recording is not over.
    pub(super) live: AtomicU64,
    /// Handshakes refused for a wrong token, or for an unknown connection.
    pub(super) refused: AtomicU64,
    pub(super) unknown: AtomicU64,
    /// Calls whose recording was sent whole.
    pub(super) completed: AtomicU64,
    /// Sockets that ended before their recording did.
    pub(super) dropped: AtomicU64,
}

impl SymblSide {
    pub(super) fn new(epoch: Instant, script: Arc<Script>, fault: Arc<FaultSwitch>) -> SymblSide {
        SymblSide {
            epoch,
            script,
            fault,
            calls: Mutex::new(HashMap::new()),
            counts: SymblCounts::default(),
        }
    }

    /// Makes `call` known to the Subscribe API (before the engine is told to follow it).
    pub(super) fn expect(&self, call: Arc<Call>) {
        lock(&self.calls).insert(call.id.clone(), call);
    }

    /// Forgets `id` (its recording is over, or the engine never came for it).
    pub(super) fn forget(&self, id: &str) {
        lock(&self.calls).remove(id);
    }
}

/// The fake Symbl's routes.
pub(super) fn symbl_app(side: Arc<SymblSide>) -> axum::Router {
    axum::Router::new()
        .route("/oauth2/token:generate", post(token))
        .route("/v1/subscribe/{connection_id}", get(subscribe))
        .with_state(side)
}

/// `POST /oauth2/token:generate`: the token the Subscribe API accepts now, for the bench's
/// app; 503 while the token storm lasts.
async fn token(State(s): State<Arc<SymblSide>>, body: axum::body::Bytes) -> Response {
    if s.fault.active(Fault::TokenStorm) {
        FaultSwitch::hit(&s.fault.tokens_refused);
        let message = json!({"message": "Service Unavailable"});
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(message)).into_response();
    }
    crate::bench_child::token_answer(&body, || {
        FaultSwitch::hit(&s.fault.tokens_issued);
        s.fault.token()
    })
}

/// `GET /v1/subscribe/{connectionId}` with the token as `?access_token=` or `X-API-KEY`.
async fn subscribe(
    State(s): State<Arc<SymblSide>>,
    Path(connection_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let token = q
        .get("access_token")
        .map(String::as_str)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    if token != Some(s.fault.token().as_str()) {
        s.counts.refused.fetch_add(1, Ordering::Relaxed);
        let message = json!({"message": "Token validation failed for provided token."});
        return (StatusCode::UNAUTHORIZED, axum::Json(message)).into_response();
    }
    let Some(call) = lock(&s.calls).get(&connection_id).cloned() else {
        s.counts.unknown.fetch_add(1, Ordering::Relaxed);
        return (StatusCode::NOT_FOUND, "no such connection").into_response();
    };
    ws.read_buffer_size(BUFFER)
        .write_buffer_size(BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| play(s, call, socket))
}

/// One Subscribe socket: the call's frames at their times, then a normal close.
async fn play(s: Arc<SymblSide>, call: Arc<Call>, mut socket: WebSocket) {
    let counts = &s.counts;
    counts.sockets.fetch_add(1, Ordering::Relaxed);
    if call.sockets.fetch_add(1, Ordering::Relaxed) == 0 {
        counts.live.fetch_add(1, Ordering::Relaxed);
    }
    let t0 = *call.opened.get_or_init(tokio::time::Instant::now);
    call.advance(Stage::Live);
    let frames = &s.script.recordings[call.recording].frames;
    let mut fault = s.fault.sockets.subscribe();
    fault.mark_unchanged();
    // One timer and one fault signal for the socket's life (a frame resets the timer), not
    // one of each registered per frame.
    // Fused: a completed signal (it cannot fail while the bench holds the switch) is never
    // polled again.
    let faulted = futures_util::FutureExt::fuse(fault.changed());
    tokio::pin!(faulted);
    let timer = tokio::time::sleep_until(t0);
    tokio::pin!(timer);
    loop {
        let i = call.next.load(Ordering::Relaxed);
        let Some(frame) = frames.get(i) else { break };
        if timer.deadline() != t0 + frame.at {
            timer.as_mut().reset(t0 + frame.at);
        }
        tokio::select! {
            () = &mut timer => {}
            Ok(()) = &mut faulted => {
                // Dropped (or frozen) by the fault: the next socket sends the last frames again.
                FaultSwitch::hit(&s.fault.sockets_hit);
                let replay = i.min(REPLAY);
                call.next.store(i - replay, Ordering::Relaxed);
                s.fault.frames_replayed.fetch_add(replay as u64, Ordering::Relaxed);
                counts.dropped.fetch_add(1, Ordering::Relaxed);
                if s.fault.fault == Some(Fault::HalfOpen) {
                    // Silent and deaf: no frames, no pongs, until the hold ends.
                    tokio::time::sleep(HALF_OPEN_HOLD).await;
                }
                return;
            }
            msg = socket.recv() => match msg {
                // Pings are answered by the socket itself; the engine sends nothing else.
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    counts.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => continue,
            },
        }
        let text = frame.text_for(&call.id);
        let sent = &call.sent_ns[i];
        // A frame sent again after a drop keeps its first time.
        let first = sent
            .compare_exchange(0, ns_since(s.epoch), Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if socket.send(Message::Text(text.into())).await.is_err() {
            // Not sent: a socket opened again sends it.
            if first {
                sent.store(0, Ordering::Relaxed);
            }
            counts.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        call.next.store(i + 1, Ordering::Relaxed);
    }
    // The last frame was `conversation_completed`: Symbl closes normally.
    close_normally(&mut socket).await;
    if call.advance(Stage::Done) {
        counts.completed.fetch_add(1, Ordering::Relaxed);
        counts.live.fetch_sub(1, Ordering::Relaxed);
    }
    s.forget(&call.id);
}

/// The fake Nebula's counts.
#[derive(Default)]
pub(super) struct NebulaSide {
    pub(super) embeds: AtomicU64,
    pub(super) chats: AtomicU64,
    /// Answers streamed whole, and cut short (the engine stopped reading).
    pub(super) streamed: AtomicU64,
    pub(super) cut: AtomicU64,
    /// Requests refused: a wrong key, or a body of the wrong shape.
    pub(super) refused: AtomicU64,
    pub(super) malformed: AtomicU64,
    pub(super) fault: Arc<FaultSwitch>,
    /// What the webhook receiver took: each output version's `webhook-id`
    /// (`<output id>:<version>`), once.
    pub(super) webhook: Mutex<std::collections::HashSet<String>>,
}

/// The fake Nebula's routes.
pub(super) fn nebula_app(side: Arc<NebulaSide>) -> axum::Router {
    axum::Router::new()
        .route("/v1/model/embed", post(embed))
        .route("/v1/model/chat/streaming", post(chat_streaming))
        .route("/hooks", post(webhook))
        .with_state(side)
}

/// The body as JSON, if the key is right and it is JSON; else the answer to give.
fn admit(s: &NebulaSide, headers: &HeaderMap, body: &[u8]) -> Result<Value, Box<Response>> {
    if headers.get("ApiKey").and_then(|v| v.to_str().ok()) != Some(NEBULA_KEY) {
        s.refused.fetch_add(1, Ordering::Relaxed);
        let message = json!({"message": "Token validation failed for provided token."});
        return Err(Box::new(
            (StatusCode::UNAUTHORIZED, axum::Json(message)).into_response(),
        ));
    }
    serde_json::from_slice(body).map_err(|_| Box::new(bad_request(s, "body is not JSON")))
}

fn bad_request(s: &NebulaSide, message: &str) -> Response {
    s.malformed.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::BAD_REQUEST,
        axum::Json(json!({"message": message})),
    )
        .into_response()
}

/// `POST /v1/model/embed` (`{"model", "text"}` → `{"model", "embedding": [1024 floats]}`):
/// a lexical embedding, so the knowledge base still ranks by shared words.
async fn embed(
    State(s): State<Arc<NebulaSide>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req = match admit(&s, &headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Some(text) = req.get("text").and_then(Value::as_str) else {
        return bad_request(&s, "`text` is required");
    };
    s.embeds.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = faulty(&s, Fault::Embed5xx, Fault::EmbedTimeout).await {
        return r;
    }
    tokio::time::sleep(EMBED_LATENCY).await;
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("nebula-text-embedding-large");
    let embedding = HashingEmbedder::new(DIMS).embed(text);
    axum::Json(json!({"model": model, "embedding": embedding})).into_response()
}

/// The answer a request gets while `error` (503 at once) or `hang` (held for [`HANG`], then
/// 503) is on; `None` when neither is.
async fn faulty(s: &NebulaSide, error: Fault, hang: Fault) -> Option<Response> {
    let held = s.fault.active(hang);
    if !held && !s.fault.active(error) {
        return None;
    }
    FaultSwitch::hit(&s.fault.requests_hit);
    if held {
        tokio::time::sleep(HANG).await;
    }
    let message = json!({"message": "Service Unavailable"});
    Some((StatusCode::SERVICE_UNAVAILABLE, axum::Json(message)).into_response())
}

/// `POST /hooks`: the webhook sink's receiver. It keeps each output version's `webhook-id`
/// and answers 204; while the sink stall lasts it holds every request unanswered for
/// [`HANG`] (the sink times out first), and a request it held is not kept.
async fn webhook(State(s): State<Arc<NebulaSide>>, headers: HeaderMap) -> Response {
    if s.fault.active(Fault::SinkStall) {
        FaultSwitch::hit(&s.fault.requests_hit);
        tokio::time::sleep(HANG).await;
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) else {
        return bad_request(&s, "no `webhook-id`");
    };
    lock(&s.webhook).insert(id.to_owned());
    StatusCode::NO_CONTENT.into_response()
}

/// Counts a streamed answer as cut short unless it was marked whole before it is dropped.
struct StreamEnd {
    side: Arc<NebulaSide>,
    whole: bool,
}

impl StreamEnd {
    fn complete(&mut self) {
        self.whole = true;
    }
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        let counter = if self.whole {
            &self.side.streamed
        } else {
            &self.side.cut
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// What Nebula's chat takes: the system prompt apart, the conversation as `human` and
/// `assistant` turns.
#[derive(serde::Deserialize)]
struct ChatBody {
    messages: Vec<ChatTurn>,
}

#[derive(serde::Deserialize)]
#[expect(dead_code, reason = "deserialized only to check the request's shape")]
struct ChatTurn {
    role: ChatRole,
    text: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum ChatRole {
    Human,
    Assistant,
}

/// `POST /v1/model/chat/streaming`: Server-Sent Events `data: {"delta": "..."}`, the first
/// after [`FIRST_DELTA`], the rest [`DELTA_EVERY`] apart; the stream ends with the answer.
async fn chat_streaming(
    State(s): State<Arc<NebulaSide>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let req = match admit(&s, &headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let well_formed = serde_json::from_value::<ChatBody>(req).is_ok_and(|b| !b.messages.is_empty());
    if !well_formed {
        return bad_request(
            &s,
            "`messages` must be a non-empty list of {role: human|assistant, text}",
        );
    }
    s.chats.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = faulty(&s, Fault::Llm5xx, Fault::LlmTimeout).await {
        return r;
    }
    let stall = s.fault.active(Fault::LlmStall);
    if stall {
        FaultSwitch::hit(&s.fault.requests_hit);
    }
    let end = StreamEnd {
        side: s.clone(),
        whole: false,
    };
    // Lazily: each piece is made when the server asks for it, so a slow reader holds the
    // stream back instead of piling pieces up.
    let pieces = futures_util::stream::unfold((0usize, end), move |(i, mut end)| async move {
        let Some(delta) = ANSWER.get(i) else {
            end.complete();
            return None;
        };
        let pause = match i {
            0 => FIRST_DELTA,
            // Stalled after the first words: nothing more until the engine gives up.
            _ if stall => HANG,
            _ => DELTA_EVERY,
        };
        tokio::time::sleep(pause).await;
        let line = format!("data: {}\n\n", json!({"delta": delta}));
        Some((Ok::<_, Infallible>(line), (i + 1, end)))
    });
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        axum::body::Body::from_stream(pieces),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_ids_round_trip() {
        assert_eq!(call_id(42), "load-000042");
        assert_eq!(call_number("load-000042"), Some(42));
        assert_eq!(call_number("load-1234567"), Some(1_234_567));
        assert_eq!(call_number("acme-001"), None);
    }

    #[test]
    fn the_answer_streams_in_about_the_time_a_model_takes() {
        let total = FIRST_DELTA + DELTA_EVERY * (ANSWER.len() as u32 - 1);
        assert_eq!(total, Duration::from_millis(570));
        assert!(ANSWER.concat().len() > 100);
    }
}
