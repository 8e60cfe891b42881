//! A fake of the Streaming API WebSocket: `/v1/streaming/{connectionId}` and the legacy
//! `/v1/realtime/insights/{connectionId}` (wire-format reference §2).
//!
//! What it checks and answers, as Symbl does:
//! - the token (`?access_token=` or `X-API-KEY`) before the upgrade: 401 when unknown;
//! - the first text frame must be a valid `start_request` (types, the sample rate per encoding,
//!   `noConnectionTimeout` an integer, …); otherwise a top-level
//!   `{"type":"error","message","details"}` frame, then a close (whether Symbl closes too is
//!   undocumented: closing is the stricter choice);
//! - a valid start is answered with `started_listening`, `recognition_started` and
//!   `conversation_created` (`message.data.conversationId`; sockets on one connection id share
//!   one conversation);
//! - binary frames are audio: counted (bytes, frames, largest frame, the first MiB kept);
//!   audio before the start is ignored but counted;
//! - `stop_request` is answered with `recognition_stopped` and `conversation_completed`, then
//!   a close (unless `disconnectOnStopRequest: false`); `modify_request` with
//!   `session_modified`.
//!
//! A test reads what a socket received through [`SymblFake::streaming_socket`], pushes result
//! frames ([`SymblFake::push_streaming`]), scripts a refused start
//! ([`SymblFake::refuse_next_streaming_start`]) or drops the sockets
//! ([`SymblFake::drop_streaming`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::lock;
use crate::symbl::{SymblFake, SymblState, unauthorized};

/// Audio kept per socket for assertions; the rest is only counted.
const KEPT_AUDIO: usize = 1 << 20;
/// Where the conversation ids start (the docs' example id).
const FIRST_CONVERSATION_ID: u64 = 5_093_011_103_940_608;

/// What one Streaming API socket received, in connection order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamingSocket {
    /// The connection id in the path.
    pub connection_id: String,
    /// Opened on `/v1/realtime/insights/…` rather than `/v1/streaming/…`.
    pub legacy_path: bool,
    /// A valid token came as `?access_token=`.
    pub token_in_query: bool,
    /// A valid token came as the `X-API-KEY` header.
    pub token_in_header: bool,
    /// The accepted `start_request`, as received.
    pub start_request: Option<Value>,
    /// Audio bytes received after the start (and before the stop).
    pub audio_bytes: usize,
    /// Binary frames received after the start (and before the stop).
    pub audio_frames: usize,
    /// The largest binary frame, in bytes (all binary frames).
    pub max_audio_frame: usize,
    /// The first MiB of the audio received after the start.
    pub audio: Vec<u8>,
    /// Audio bytes received before the start (ignored, as Symbl does).
    pub audio_bytes_before_start: usize,
    /// Audio bytes received after the `stop_request`.
    pub audio_bytes_after_stop: usize,
    /// Text frames after the accepted start (`stop_request`, `modify_request`, …); a frame that
    /// is not JSON is kept as a JSON string.
    pub control: Vec<Value>,
    /// WebSocket pings received.
    pub pings: u32,
    /// Whether a `stop_request` was received.
    pub stop_requested: bool,
    /// Whether the socket has ended.
    pub closed: bool,
}

/// What a socket's task is told to do.
#[derive(Debug)]
enum Push {
    Text(String),
    /// Drop the TCP connection without a close frame.
    Kill,
}

/// State of the fake Streaming API; read it through the `streaming_*` methods of
/// [`SymblFake`].
#[derive(Debug, Default)]
pub struct StreamingState {
    handshakes: AtomicU32,
    rejected: AtomicU32,
    sockets: Mutex<Vec<StreamingSocket>>,
    /// Sockets whose start was accepted, by connection id, for pushes.
    live: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Push>>>>,
    /// The conversation id of each connection id.
    conversations: Mutex<HashMap<String, String>>,
    next_conversation: AtomicU64,
    /// Messages to refuse the next starts with.
    refusals: Mutex<VecDeque<String>>,
    /// Handshakes still to answer 503 (Symbl unreachable for a while).
    unavailable: AtomicU32,
    /// Started sockets by connection id and speaker `userId`, for pushes to one socket.
    by_speaker: Mutex<HashMap<(String, String), mpsc::UnboundedSender<Push>>>,
}

impl StreamingState {
    fn update(&self, index: usize, f: impl FnOnce(&mut StreamingSocket)) {
        if let Some(s) = lock(&self.sockets).get_mut(index) {
            f(s);
        }
    }

    fn conversation_id(&self, connection_id: &str) -> String {
        lock(&self.conversations)
            .entry(connection_id.to_owned())
            .or_insert_with(|| {
                let n = self.next_conversation.fetch_add(1, Ordering::SeqCst);
                (FIRST_CONVERSATION_ID + n).to_string()
            })
            .clone()
    }
}

/// The routes of the fake Streaming API.
pub(crate) fn routes() -> axum::Router<Arc<SymblState>> {
    axum::Router::new()
        .route("/v1/streaming/{connection_id}", any(streaming))
        .route("/v1/realtime/insights/{connection_id}", any(legacy))
}

async fn streaming(
    State(s): State<Arc<SymblState>>,
    Path(connection_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(s, connection_id, false, &q, &headers, ws)
}

async fn legacy(
    State(s): State<Arc<SymblState>>,
    Path(connection_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(s, connection_id, true, &q, &headers, ws)
}

fn upgrade(
    s: Arc<SymblState>,
    connection_id: String,
    legacy_path: bool,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    s.streaming.handshakes.fetch_add(1, Ordering::SeqCst);
    if s.streaming
        .unavailable
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "Service Unavailable",
        )
            .into_response();
    }
    let token_in_query = query.get("access_token").is_some_and(|t| s.valid_token(t));
    let token_in_header = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| s.valid_token(t));
    if !token_in_query && !token_in_header {
        s.streaming.rejected.fetch_add(1, Ordering::SeqCst);
        return unauthorized();
    }
    let record = StreamingSocket {
        connection_id,
        legacy_path,
        token_in_query,
        token_in_header,
        ..StreamingSocket::default()
    };
    ws.on_upgrade(move |socket| serve_socket(s, record, socket))
}

async fn serve_socket(s: Arc<SymblState>, record: StreamingSocket, mut socket: WebSocket) {
    let connection_id = record.connection_id.clone();
    let index = {
        let mut sockets = lock(&s.streaming.sockets);
        sockets.push(record);
        sockets.len() - 1
    };
    let st = &s.streaming;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut started = false;
    let mut stopped = false;
    loop {
        tokio::select! {
            push = rx.recv() => match push {
                Some(Push::Text(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        break;
                    }
                }
                // Returning drops the socket: the TCP connection closes without a close frame.
                Some(Push::Kill) | None => break,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(Message::Ping(_))) => st.update(index, |r| r.pings += 1),
                Some(Ok(Message::Pong(_))) => {}
                Some(Ok(Message::Binary(audio))) => st.update(index, |r| {
                    let n = audio.len();
                    r.max_audio_frame = r.max_audio_frame.max(n);
                    if !started {
                        r.audio_bytes_before_start += n;
                    } else if stopped {
                        r.audio_bytes_after_stop += n;
                    } else {
                        r.audio_bytes += n;
                        r.audio_frames += 1;
                        let room = KEPT_AUDIO.saturating_sub(r.audio.len());
                        r.audio.extend_from_slice(&audio[..n.min(room)]);
                    }
                }),
                Some(Ok(Message::Text(text))) if !started => {
                    let refusal = lock(&st.refusals).pop_front();
                    let checked = match refusal {
                        Some(message) => Err((message, NO_DETAILS.to_owned())),
                        None => check_start_request(text.as_str()),
                    };
                    match checked {
                        Ok(start) => {
                            started = true;
                            st.update(index, |r| r.start_request = Some(start));
                            let id = st.conversation_id(&connection_id);
                            let greeting = [
                                json!({"type": "message", "message": {"type": "started_listening"}}),
                                json!({"type": "message", "message": {"type": "recognition_started", "data": {"conversationId": id}}}),
                                json!({"type": "message", "message": {"type": "conversation_created", "data": {"conversationId": id}}}),
                            ];
                            // Registered before the greeting goes out, so a test reacting to
                            // the greeting can push at once (pushes queue behind it).
                            lock(&st.live).entry(connection_id.clone()).or_default().push(tx.clone());
                            if let Some(user) = lock(&st.sockets)
                                .get(index)
                                .and_then(|r| r.start_request.as_ref())
                                .and_then(|r| r.pointer("/speaker/userId"))
                                .and_then(Value::as_str)
                            {
                                lock(&st.by_speaker)
                                    .insert((connection_id.clone(), user.to_owned()), tx.clone());
                            }
                            if !send_all(&mut socket, &greeting).await {
                                break;
                            }
                        }
                        Err((message, details)) => {
                            let error = json!({"type": "error", "details": details, "message": message});
                            if send_all(&mut socket, &[error]).await {
                                close(&mut socket, 1008).await;
                            }
                            break;
                        }
                    }
                }
                Some(Ok(Message::Text(text))) => {
                    let msg: Value = serde_json::from_str(text.as_str())
                        .unwrap_or_else(|_| Value::String(text.to_string()));
                    st.update(index, |r| r.control.push(msg.clone()));
                    match msg.get("type").and_then(Value::as_str) {
                        Some("stop_request") if !stopped => {
                            stopped = true;
                            st.update(index, |r| r.stop_requested = true);
                            let id = st.conversation_id(&connection_id);
                            let bye = [
                                json!({"type": "message", "message": {"type": "recognition_stopped"}}),
                                json!({"type": "message", "message": {"type": "conversation_completed", "data": {"conversationId": id}}}),
                            ];
                            if !send_all(&mut socket, &bye).await {
                                break;
                            }
                            let disconnect = lock(&st.sockets)
                                .get(index)
                                .and_then(|r| r.start_request.as_ref())
                                .and_then(|r| r.get("disconnectOnStopRequest"))
                                .and_then(Value::as_bool)
                                .unwrap_or(true);
                            if disconnect {
                                close(&mut socket, 1000).await;
                                break;
                            }
                        }
                        Some("stop_request") => {}
                        Some("modify_request") => {
                            let ack = json!({"type": "message", "message": {"type": "session_modified"}});
                            if !send_all(&mut socket, &[ack]).await {
                                break;
                            }
                        }
                        _ => {
                            let error = json!({"type": "error", "details": NO_DETAILS,
                                "message": "Unsupported message type."});
                            if !send_all(&mut socket, &[error]).await {
                                break;
                            }
                        }
                    }
                }
            },
        }
    }
    st.update(index, |r| r.closed = true);
    if let Some(senders) = lock(&st.live).get_mut(&connection_id) {
        senders.retain(|t| !t.same_channel(&tx));
    }
}

/// Symbl's `details` when it has none to give.
const NO_DETAILS: &str = "No additional details available.";

async fn send_all(socket: &mut WebSocket, frames: &[Value]) -> bool {
    for f in frames {
        if socket
            .send(Message::Text(f.to_string().into()))
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

/// Sends a close frame and waits briefly for the client's.
async fn close(socket: &mut WebSocket, code: u16) {
    let frame = CloseFrame {
        code,
        reason: "".into(),
    };
    if socket.send(Message::Close(Some(frame))).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Checks a first text frame as the Streaming API does (reference §2.2); the accepted
/// request, or Symbl's `(message, details)`.
fn check_start_request(text: &str) -> Result<Value, (String, String)> {
    let fail = |m: &str| Err((m.to_owned(), NO_DETAILS.to_owned()));
    let Ok(req) = serde_json::from_str::<Value>(text) else {
        return fail("Invalid JSON in the start_request.");
    };
    if req.get("type").and_then(Value::as_str) != Some("start_request") {
        return fail("The first message must be a start_request.");
    }
    if let Some(types) = req.get("insightTypes") {
        let known = ["question", "action_item", "follow_up", "topic"];
        let ok = types.as_array().is_some_and(|a| {
            a.iter()
                .all(|t| t.as_str().is_some_and(|t| known.contains(&t)))
        });
        if !ok {
            return fail("insightTypes must be a list of question, action_item, follow_up.");
        }
    }
    let config = req.get("config").cloned().unwrap_or_else(|| json!({}));
    if !config.is_object() {
        return fail("config must be an object.");
    }
    let speech = config
        .get("speechRecognition")
        .cloned()
        .unwrap_or_else(|| json!({}));
    let encoding = match speech.get("encoding") {
        None => "LINEAR16",
        Some(e) => match e.as_str() {
            Some(e @ ("LINEAR16" | "FLAC" | "MULAW" | "Opus")) => e,
            _ => return fail("encoding must be one of LINEAR16, FLAC, MULAW, Opus."),
        },
    };
    let rate = match speech.get("sampleRateHertz") {
        None => 16_000,
        Some(r) => match r.as_u64() {
            Some(r) => r,
            None => return fail("sampleRateHertz must be a valid number."),
        },
    };
    let rate_ok = match encoding {
        "LINEAR16" => (8_000..=48_000).contains(&rate),
        "FLAC" => rate >= 16_000,
        "MULAW" => rate == 8_000,
        _ => (16_000..=48_000).contains(&rate),
    };
    if !rate_ok {
        return Err((
            format!("sampleRateHertz {rate} is not supported for {encoding} audio."),
            NO_DETAILS.to_owned(),
        ));
    }
    if let Some(c) = config.get("confidenceThreshold")
        && !c.as_f64().is_some_and(|c| (0.5..=1.0).contains(&c))
    {
        return fail("confidenceThreshold must be a number between 0.5 and 1.0.");
    }
    if let Some(l) = config.get("languageCode")
        && l.as_str().is_none_or(str::is_empty)
    {
        return fail("languageCode must be a valid BCP-47 code.");
    }
    if let Some(t) = config.get("timezoneOffset")
        && !t.is_i64()
    {
        return fail("timezoneOffset must be an integer.");
    }
    for key in ["sentiment", "detectEntities"] {
        if config.get(key).is_some_and(|v| !v.is_boolean()) {
            return Err((format!("{key} must be a boolean."), NO_DETAILS.to_owned()));
        }
    }
    if let Some(t) = config.get("trackers") {
        let ok = t.as_object().is_some_and(|o| {
            ["enableAllTrackers", "interimResults"]
                .iter()
                .all(|k| o.get(*k).is_none_or(Value::is_boolean))
        });
        if !ok {
            return fail(
                "config.trackers must hold the booleans enableAllTrackers and interimResults.",
            );
        }
    }
    if let Some(t) = req.get("trackers") {
        let tracker_ok = |t: &Value| {
            t.get("name")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty())
                && t.get("vocabulary")
                    .and_then(Value::as_array)
                    .is_some_and(|v| !v.is_empty() && v.iter().all(Value::is_string))
        };
        if !t.as_array().is_some_and(|a| a.iter().all(tracker_ok)) {
            return fail("trackers must be a list of {name, vocabulary}.");
        }
    }
    if let Some(s) = req.get("speaker") {
        let ok = s.is_object()
            && ["userId", "name"]
                .iter()
                .all(|k| s.get(*k).is_none_or(Value::is_string));
        if !ok {
            return fail("speaker must be an object with the strings userId and name.");
        }
    }
    for key in ["noConnectionTimeout", "disconnectOnStopRequestTimeout"] {
        if let Some(v) = req.get(key)
            && v.as_u64().is_none_or(|v| v > 1_800)
        {
            return Err((
                format!("{key} must be an integer between 0 and 1800."),
                NO_DETAILS.to_owned(),
            ));
        }
    }
    if req
        .get("disconnectOnStopRequest")
        .is_some_and(|v| !v.is_boolean())
    {
        return fail("disconnectOnStopRequest must be a boolean.");
    }
    Ok(req)
}

impl SymblFake {
    /// Every Streaming API socket accepted so far, in connection order.
    pub fn streaming_sockets(&self) -> Vec<StreamingSocket> {
        lock(&self.state.streaming.sockets).clone()
    }

    /// The last Streaming API socket opened on `connection_id`.
    pub fn streaming_socket(&self, connection_id: &str) -> Option<StreamingSocket> {
        lock(&self.state.streaming.sockets)
            .iter()
            .rev()
            .find(|s| s.connection_id == connection_id)
            .cloned()
    }

    /// Streaming API handshakes attempted (accepted and rejected).
    pub fn streaming_handshakes(&self) -> u32 {
        self.state.streaming.handshakes.load(Ordering::SeqCst)
    }

    /// Streaming API handshakes answered 401.
    pub fn streaming_rejected(&self) -> u32 {
        self.state.streaming.rejected.load(Ordering::SeqCst)
    }

    /// The conversation id the fake gave `connection_id`, once a start was accepted on it.
    pub fn streaming_conversation_id(&self, connection_id: &str) -> Option<String> {
        lock(&self.state.streaming.conversations)
            .get(connection_id)
            .cloned()
    }

    /// Sends `frame` (a `tracker_response`, say) to every started socket on `connection_id`.
    pub fn push_streaming(&self, connection_id: &str, frame: Value) {
        self.push_streaming_text(connection_id, &frame.to_string());
    }

    /// Sends a raw text frame (not necessarily JSON) to every started socket on
    /// `connection_id`.
    pub fn push_streaming_text(&self, connection_id: &str, text: &str) {
        if let Some(senders) = lock(&self.state.streaming.live).get_mut(connection_id) {
            senders.retain(|tx| tx.send(Push::Text(text.to_owned())).is_ok());
        }
    }

    /// Sends `frame` to the started socket on `connection_id` whose `start_request` named the
    /// speaker `user_id` (the last one opened); false when there is none.
    pub fn push_streaming_to(&self, connection_id: &str, user_id: &str, frame: &Value) -> bool {
        let key = (connection_id.to_owned(), user_id.to_owned());
        lock(&self.state.streaming.by_speaker)
            .get(&key)
            .is_some_and(|tx| tx.send(Push::Text(frame.to_string())).is_ok())
    }

    /// Drops the started socket on `connection_id` whose speaker is `user_id`, without a close
    /// frame, as a network failure would; false when there is none.
    pub fn drop_streaming_speaker(&self, connection_id: &str, user_id: &str) -> bool {
        let key = (connection_id.to_owned(), user_id.to_owned());
        lock(&self.state.streaming.by_speaker)
            .remove(&key)
            .is_some_and(|tx| tx.send(Push::Kill).is_ok())
    }

    /// Answers the next `n` Streaming handshakes with 503, as while Symbl is unreachable.
    pub fn fail_streaming_handshakes(&self, n: u32) {
        self.state.streaming.unavailable.store(n, Ordering::SeqCst);
    }

    /// Drops every started socket on `connection_id` without a close frame, as a network
    /// failure would.
    pub fn drop_streaming(&self, connection_id: &str) {
        if let Some(senders) = lock(&self.state.streaming.live).remove(connection_id) {
            for tx in senders {
                let _ = tx.send(Push::Kill);
            }
        }
    }

    /// The next `start_request` is answered with an error frame carrying `message`, as if it
    /// were invalid.
    pub fn refuse_next_streaming_start(&self, message: &str) {
        lock(&self.state.streaming.refusals).push_back(message.to_owned());
    }

    /// Waits until a start was accepted on `connection_id` (at most `timeout`); true when one
    /// was.
    pub async fn wait_streaming_started(&self, connection_id: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.streaming_conversation_id(connection_id).is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twilio_start() -> Value {
        json!({
            "type": "start_request",
            "insightTypes": ["question", "action_item", "follow_up"],
            "config": {
                "confidenceThreshold": 0.5,
                "languageCode": "en-US",
                "speechRecognition": {"encoding": "MULAW", "sampleRateHertz": 8000},
                "trackers": {"enableAllTrackers": true, "interimResults": true}
            },
            "trackers": [{"name": "Budget", "vocabulary": ["too expensive"]}],
            "speaker": {"userId": "+14155550100", "name": "Caller"},
            "noConnectionTimeout": 600
        })
    }

    fn check(v: &Value) -> Result<Value, String> {
        check_start_request(&v.to_string()).map_err(|(m, _)| m)
    }

    #[test]
    fn a_documented_start_request_is_accepted() {
        assert_eq!(check(&twilio_start()), Ok(twilio_start()));
        assert!(check(&json!({"type": "start_request"})).is_ok());
    }

    #[test]
    fn bad_start_requests_get_symbls_messages() {
        let with = |pointer: &str, value: Value| {
            let mut v = twilio_start();
            *v.pointer_mut(pointer).unwrap() = value;
            check(&v).unwrap_err()
        };
        assert_eq!(
            with("/config/speechRecognition/sampleRateHertz", json!(16000)),
            "sampleRateHertz 16000 is not supported for MULAW audio."
        );
        assert_eq!(
            with("/config/speechRecognition/sampleRateHertz", json!("8000")),
            "sampleRateHertz must be a valid number."
        );
        assert_eq!(
            with("/noConnectionTimeout", json!(true)),
            "noConnectionTimeout must be an integer between 0 and 1800."
        );
        assert_eq!(
            with("/type", json!("stop_request")),
            "The first message must be a start_request."
        );
        assert_eq!(
            with("/trackers/0/vocabulary", json!([])),
            "trackers must be a list of {name, vocabulary}."
        );
        assert_eq!(
            check_start_request("{'type': 'start_request'}").unwrap_err(),
            (
                "Invalid JSON in the start_request.".to_owned(),
                NO_DETAILS.to_owned()
            )
        );
    }
}
