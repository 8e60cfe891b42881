//! A fake Symbl: `POST /oauth2/token:generate`, the Subscribe WebSocket
//! (`/v1/subscribe/{connectionId}?access_token=...` or an `X-API-KEY` header), an integration
//! server's `/symbl/updates` feed, and (from their own modules) the Management, Conversation
//! and Streaming APIs.
//!
//! A test drives a "call" by pushing frames to a connection ([`SymblFake::push`]); every
//! subscriber of that connection receives them. Failure modes: 401 for wrong credentials or an
//! unknown token, scripted token statuses ([`SymblFake::fail_token_next`]), subscribers dropped
//! mid-call without a close frame ([`SymblFake::drop_subscribers`]), and redelivery of the
//! last frames to a subscriber that reconnects ([`SymblFake::set_redeliver_on_reconnect`]),
//! as an at-least-once service may do. Opt-in, for reconnection tests: subscribers closed with a
//! close frame ([`SymblFake::close_subscribers`]), subscribers that go silent while their TCP
//! connection stays open, as a half-open connection does ([`SymblFake::freeze_subscribers`]),
//! and handshakes that are accepted and closed at once ([`SymblFake::set_close_on_subscribe`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::lock;

/// How long a frozen subscriber ([`SymblFake::freeze_subscribers`]) holds its TCP connection.
const FROZEN_FOR: Duration = Duration::from_secs(600);

/// What a subscriber's socket task is told to do.
#[derive(Debug, Clone)]
enum SubMsg {
    Frame(String),
    /// Drop the TCP connection without a close frame.
    Kill,
    /// Send a close frame with this code and reason, then drop the connection.
    Close(u16, String),
    /// Stop reading and writing (no pongs either) but keep the TCP connection open.
    Freeze,
}

#[derive(Default)]
struct Connection {
    subscribers: Vec<mpsc::UnboundedSender<SubMsg>>,
    history: Vec<String>,
    subscribes: u32,
}

/// The fake's state; read it through [`SymblFake`].
pub struct SymblState {
    app_id: String,
    app_secret: String,
    expires_in: Mutex<f64>,
    token_calls: AtomicU32,
    token_script: Mutex<VecDeque<u16>>,
    tokens: Mutex<HashSet<String>>,
    connections: Mutex<HashMap<String, Connection>>,
    redeliver: AtomicUsize,
    close_on_subscribe: AtomicBool,
    updates: Mutex<Vec<mpsc::UnboundedSender<String>>>,
    active: Mutex<Vec<Value>>,
    /// The Management API's state.
    pub management: crate::symbl_manage::ManagementState,
    /// The Conversation API's state.
    pub conversations: crate::symbl_conversations::ConversationsState,
    /// The Streaming API's state.
    pub streaming: crate::symbl_streaming::StreamingState,
}

impl SymblState {
    /// Whether `token` was issued by this fake (REST calls check `Authorization: Bearer`).
    pub fn valid_token(&self, token: &str) -> bool {
        lock(&self.tokens).contains(token)
    }

    /// The token in `Authorization: Bearer ...` or `X-API-KEY`, if this fake issued it.
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let bearer = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
        bearer.or(key).is_some_and(|t| self.valid_token(t))
    }
}

/// The 401 Symbl answers for a missing or unknown token.
pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"message": "Token validation failed for provided token."})),
    )
        .into_response()
}

/// A running fake Symbl.
#[derive(Clone)]
pub struct SymblFake {
    /// REST base, `http://127.0.0.1:PORT`; the WebSockets are on the same port (`ws://`).
    pub api_base: String,
    /// The state, for the API modules and for assertions.
    pub state: Arc<SymblState>,
}

impl SymblFake {
    /// Starts a fake that accepts these credentials.
    pub async fn start(app_id: &str, app_secret: &str) -> Self {
        let state = Arc::new(SymblState {
            app_id: app_id.to_owned(),
            app_secret: app_secret.to_owned(),
            expires_in: Mutex::new(86_400.0),
            token_calls: AtomicU32::new(0),
            token_script: Mutex::default(),
            tokens: Mutex::default(),
            connections: Mutex::default(),
            redeliver: AtomicUsize::new(0),
            close_on_subscribe: AtomicBool::new(false),
            updates: Mutex::default(),
            active: Mutex::default(),
            management: Default::default(),
            conversations: Default::default(),
            streaming: Default::default(),
        });
        let app = axum::Router::new()
            .route("/oauth2/token:generate", post(token))
            .route("/v1/subscribe/{connection_id}", any(subscribe))
            .route("/symbl/updates", any(updates))
            .merge(crate::symbl_manage::routes())
            .merge(crate::symbl_conversations::routes())
            .merge(crate::symbl_streaming::routes())
            .with_state(state.clone());
        SymblFake {
            api_base: crate::serve(app).await,
            state,
        }
    }

    /// The WebSocket base, `ws://127.0.0.1:PORT`.
    pub fn ws_base(&self) -> String {
        self.api_base.replacen("http://", "ws://", 1)
    }

    /// The lifetime of tokens issued from now on, in seconds.
    pub fn set_token_lifetime(&self, secs: f64) {
        *lock(&self.state.expires_in) = secs;
    }

    /// The next token requests answer these statuses, in order.
    pub fn fail_token_next(&self, statuses: &[u16]) {
        lock(&self.state.token_script).extend(statuses.iter().copied());
    }

    /// Token requests received.
    pub fn token_calls(&self) -> u32 {
        self.state.token_calls.load(Ordering::SeqCst)
    }

    /// Sends `frame` to every subscriber of `connection_id` (and keeps it for redelivery).
    pub fn push(&self, connection_id: &str, frame: Value) {
        self.push_text(connection_id, &frame.to_string());
    }

    /// Sends `text` as it is (any spacing or key order, or not JSON at all) to every subscriber
    /// of `connection_id`, and keeps it for redelivery.
    pub fn push_text(&self, connection_id: &str, text: &str) {
        let text = text.to_owned();
        let mut conns = lock(&self.state.connections);
        let c = conns.entry(connection_id.to_owned()).or_default();
        c.history.push(text.clone());
        c.subscribers
            .retain(|tx| tx.send(SubMsg::Frame(text.clone())).is_ok());
    }

    /// Drops every subscriber of `connection_id` abruptly (no close frame), as a network failure
    /// would.
    pub fn drop_subscribers(&self, connection_id: &str) {
        if let Some(c) = lock(&self.state.connections).get_mut(connection_id) {
            for tx in c.subscribers.drain(..) {
                let _ = tx.send(SubMsg::Kill);
            }
        }
    }

    /// A subscriber that connects again gets the last `n` frames of the connection again first.
    pub fn set_redeliver_on_reconnect(&self, n: usize) {
        self.state.redeliver.store(n, Ordering::SeqCst);
    }

    /// Closes every subscriber of `connection_id` with a close frame (`code`, `reason`), as Symbl
    /// does when it ends a socket itself (1000 = normal closure).
    pub fn close_subscribers(&self, connection_id: &str, code: u16, reason: &str) {
        if let Some(c) = lock(&self.state.connections).get_mut(connection_id) {
            for tx in c.subscribers.drain(..) {
                let _ = tx.send(SubMsg::Close(code, reason.to_owned()));
            }
        }
    }

    /// Makes every subscriber of `connection_id` go silent: nothing is sent or read (pings go
    /// unanswered) but the TCP connection stays open, as a half-open connection behind a dead
    /// NAT or proxy does. The frozen sockets no longer count as subscribers.
    pub fn freeze_subscribers(&self, connection_id: &str) {
        if let Some(c) = lock(&self.state.connections).get_mut(connection_id) {
            for tx in c.subscribers.drain(..) {
                let _ = tx.send(SubMsg::Freeze);
            }
        }
    }

    /// While `on`, subscribe handshakes are accepted (and counted by
    /// [`SymblFake::subscribes`]) and the socket is dropped at once, without a frame.
    pub fn set_close_on_subscribe(&self, on: bool) {
        self.state.close_on_subscribe.store(on, Ordering::SeqCst);
    }

    /// Current subscribers of `connection_id`.
    pub fn subscribers(&self, connection_id: &str) -> usize {
        lock(&self.state.connections)
            .get(connection_id)
            .map_or(0, |c| {
                c.subscribers.iter().filter(|t| !t.is_closed()).count()
            })
    }

    /// Subscribe handshakes accepted for `connection_id` so far.
    pub fn subscribes(&self, connection_id: &str) -> u32 {
        lock(&self.state.connections)
            .get(connection_id)
            .map_or(0, |c| c.subscribes)
    }

    /// Waits until `connection_id` has `n` subscribe handshakes and a live subscriber (at most
    /// `timeout`); true when it does.
    pub async fn wait_subscribed(&self, connection_id: &str, n: u32, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.subscribes(connection_id) >= n && self.subscribers(connection_id) > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Announces a live connection on the updates feed (`connection_started`), as Symbl's Twilio
    /// integration server does when a call starts.
    pub fn start_connection(&self, connection_id: &str, conversation_id: &str, speaker: &str) {
        let event = json!({
            "type": "connection_started",
            "speaker": {"userId": "+14155550100", "name": speaker},
            "connectionId": connection_id,
            "conversationId": conversation_id,
        });
        lock(&self.state.active).push(event.clone());
        self.broadcast_update(&event);
    }

    /// Announces the end of a connection (`connection_stopped`).
    pub fn stop_connection(&self, connection_id: &str, conversation_id: &str) {
        lock(&self.state.active).retain(|e| e["connectionId"] != connection_id);
        self.broadcast_update(&json!({
            "type": "connection_stopped",
            "speaker": {"userId": "+14155550100", "name": "Agent"},
            "connectionId": connection_id,
            "conversationId": conversation_id,
        }));
    }

    /// Current subscribers of the updates feed.
    pub fn update_subscribers(&self) -> usize {
        lock(&self.state.updates)
            .iter()
            .filter(|t| !t.is_closed())
            .count()
    }

    fn broadcast_update(&self, event: &Value) {
        let text = event.to_string();
        lock(&self.state.updates).retain(|tx| tx.send(text.clone()).is_ok());
    }
}

async fn token(State(s): State<Arc<SymblState>>, body: String) -> Response {
    let n = s.token_calls.fetch_add(1, Ordering::SeqCst);
    if let Some(status) = lock(&s.token_script).pop_front() {
        let mut r = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(json!({"message": "scripted failure"})),
        )
            .into_response();
        if status == 429 {
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        return r;
    }
    let req: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    if req["type"] != "application"
        || req["appId"] != s.app_id.as_str()
        || req["appSecret"] != s.app_secret.as_str()
    {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"message": "Combination of appId and appSecret is not valid."})),
        )
            .into_response();
    }
    let token = format!("fake-jwt-{n}");
    lock(&s.tokens).insert(token.clone());
    let expires_in = *lock(&s.expires_in);
    Json(json!({"accessToken": token, "expiresIn": expires_in})).into_response()
}

async fn subscribe(
    State(s): State<Arc<SymblState>>,
    Path(connection_id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let by_query = q.get("access_token").is_some_and(|t| s.valid_token(t));
    if !by_query && !s.authorized(&headers) {
        return unauthorized();
    }
    ws.on_upgrade(move |socket| subscriber(s, connection_id, socket))
}

async fn subscriber(s: Arc<SymblState>, connection_id: String, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let close_at_once = s.close_on_subscribe.load(Ordering::SeqCst);
    let replay: Vec<String> = {
        let mut conns = lock(&s.connections);
        let c = conns.entry(connection_id).or_default();
        c.subscribes += 1;
        if close_at_once {
            // Returning drops the socket: the TCP connection closes without a close frame.
            return;
        }
        c.subscribers.push(tx);
        let n = s.redeliver.load(Ordering::SeqCst);
        if c.subscribes > 1 {
            c.history[c.history.len().saturating_sub(n)..].to_vec()
        } else {
            Vec::new()
        }
    };
    for text in replay {
        if socket.send(Message::Text(text.into())).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(SubMsg::Frame(text)) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                // Returning drops the socket: the TCP connection closes without a close frame.
                Some(SubMsg::Kill) | None => return,
                Some(SubMsg::Close(code, reason)) => {
                    let frame = axum::extract::ws::CloseFrame { code, reason: reason.into() };
                    let _ = socket.send(Message::Close(Some(frame))).await;
                    // Drain until the client answers or goes: closing with unread data would
                    // reset the connection, and the close frame could be lost.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(m)) = socket.recv().await {
                            if matches!(m, Message::Close(_)) {
                                break;
                            }
                        }
                    })
                    .await;
                    return;
                }
                Some(SubMsg::Freeze) => {
                    // Hold the socket without polling it; a test's runtime ends the wait.
                    tokio::time::sleep(FROZEN_FOR).await;
                    return;
                }
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn updates(State(s): State<Arc<SymblState>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| updates_subscriber(s, socket))
}

async fn updates_subscriber(s: Arc<SymblState>, mut socket: WebSocket) {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    // A new subscriber first hears of every connection already live, as `connection_exists`.
    let existing: Vec<Value> = lock(&s.active).clone();
    lock(&s.updates).push(tx);
    for mut e in existing {
        e["type"] = json!("connection_exists");
        if socket
            .send(Message::Text(e.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(text) => {
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
