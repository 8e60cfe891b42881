//! The feed on the engine's server: the agent console's page, its WebSocket and SSE streams,
//! feedback, and the operator's token API.
//!
//! | Route | What |
//! |---|---|
//! | `GET /console/` (+ `app.js`, `app.css`) | the console page, embedded in the binary |
//! | `GET /feed/v1/conversations/{id}/ws` | one call's feed over WebSocket |
//! | `GET /feed/v1/conversations/{id}/sse` | the same over Server-Sent Events |
//! | `GET /feed/v1/all/ws`, `GET /feed/v1/all/sse` | every call (supervisor tokens only) |
//! | `POST /feed/v1/conversations/{id}/feedback` | an agent's feedback on a card |
//! | `GET /feed/v1/whoami` | what a token opens (the console asks after a refused socket) |
//! | `POST /feed/v1/session` | a token as an `HttpOnly` cookie, for `EventSource` |
//! | `POST /feed/v1/tokens` | mint a token (operator token required) |
//! | `GET /feed/v1/feedback/summary` | feedback counts by pipeline, model and action |
//!
//! **Access.** Every feed route wants a token (see [`access`](super::access)): in the
//! WebSocket subprotocol list as `bearer.<token>` next to `prompter.feed.v1` (browsers cannot
//! set headers on a WebSocket), as `Authorization: Bearer <token>`, or (SSE in a browser) as the
//! `prompter_feed` cookie set by `/feed/v1/session`. Never in a URL, which proxies log. A
//! missing, forged or expired token gets 401, a token for another conversation 403, both before
//! any upgrade. A browser (`Origin` header) from an origin that is neither this server's nor in
//! `allowed_origins` gets 403. Tokens are never logged.
//!
//! **Streams.** The messages of [`FeedHub`] as JSON: WebSocket text frames, or SSE events
//! whose `event` is the message type and whose `id` is the message id (so `Last-Event-ID`
//! resumes). A client resumes with `?since=<last id>` (or `Last-Event-ID`) and gets exactly the
//! gap, or a snapshot marked `resync`. A `heartbeat` every 15 s lets both sides notice a dead
//! connection. A client too slow for the live buffer is resumed from its last message, never
//! left with a silent gap.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::Stream;
use prompter_core::event::{Detail, Event, EventKind, Feedback};
use prompter_core::secret::Secret;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, watch};

use super::access::{Denied, FeedAccess, Scope};
use super::{FeedHub, FeedMessage, Subscription, now_ms};
use crate::engine::Engine;

/// The WebSocket subprotocol of this feed.
pub const PROTOCOL: &str = "prompter.feed.v1";
/// The cookie `/feed/v1/session` sets.
const COOKIE: &str = "prompter_feed";
/// Longest token lifetime the token API grants.
const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Feedback records queued for the log file at most (a full queue answers 503: retry).
const FEEDBACK_QUEUE: usize = 4_096;
/// Socket buffers: the feed sends small JSON messages and reads almost nothing.
const WS_READ_BUFFER: usize = 4 * 1024;
const WS_WRITE_BUFFER: usize = 8 * 1024;
/// Largest message a client may send (it sends nothing the server reads but pings).
const WS_MAX_INCOMING: usize = 16 * 1024;

/// The `feed:` section of the engine config.
///
/// ```yaml
/// feed:
///   secret_env: PROMPTER_FEED_SECRET            # signs access tokens (at least 32 bytes)
///   operator_token_env: PROMPTER_OPERATOR_TOKEN # enables POST /feed/v1/tokens when set
///   allowed_origins: [https://agents.example.com]
///   feedback_log: feedback.jsonl                # relative to the config's folder
///   token_ttl_s: 3600                           # default lifetime of minted tokens
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    /// Environment variable holding the token-signing secret.
    #[serde(default = "default_secret_env")]
    pub secret_env: String,
    /// Environment variable holding the operator's token for the token API; unset disables it.
    #[serde(default = "default_operator_env")]
    pub operator_token_env: String,
    /// Browser origins allowed besides this server's own (`https://host[:port]`).
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Append every feedback record to this JSONL file.
    #[serde(default)]
    pub feedback_log: Option<PathBuf>,
    /// Default lifetime of minted tokens, in seconds.
    #[serde(default = "default_ttl")]
    pub token_ttl_s: u64,
    /// Heartbeat interval, in milliseconds.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// What an agent can do from a call's report (text the customer, e-mail a colleague):
    /// each delivered through a named sink, its text prefilled from a template over the call.
    #[serde(default)]
    pub actions: Vec<ActionConfig>,
}

/// One agent action (`feed.actions`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// Its name (in URLs and records).
    pub name: String,
    /// The button's label.
    pub label: String,
    /// The sink (`sinks:`) that delivers it.
    pub sink: String,
    /// The prefilled text: a template over `conversation_id`, `summary` (the call's summary
    /// card, if any) and `cards` (its live cards).
    pub text: String,
}

/// The `kind` of the output an agent action sends; only the sink it names takes it.
pub const AGENT_ACTION_KIND: &str = "agent_action";
/// Longest text an agent may send with an action.
const ACTION_TEXT_MAX: usize = 4_000;

fn default_secret_env() -> String {
    "PROMPTER_FEED_SECRET".into()
}
fn default_operator_env() -> String {
    "PROMPTER_OPERATOR_TOKEN".into()
}
fn default_ttl() -> u64 {
    3600
}
fn default_heartbeat() -> u64 {
    15_000
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            secret_env: default_secret_env(),
            operator_token_env: default_operator_env(),
            allowed_origins: Vec::new(),
            feedback_log: None,
            token_ttl_s: default_ttl(),
            heartbeat_ms: default_heartbeat(),
            actions: Vec::new(),
        }
    }
}

/// Why the feed could not start.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum FeedSetupError {
    /// The secret's variable is unset or empty.
    #[error(
        "the agent feed needs a token-signing secret in `{0}` (at least 32 random bytes, e.g. `openssl rand -hex 32`)"
    )]
    NoSecret(String),
    /// The secret is too short.
    #[error("the secret in `{env}` is too weak: {source}")]
    Weak {
        /// The variable.
        env: String,
        /// Why.
        source: super::access::WeakSecret,
    },
    /// An action's text template does not compile.
    #[error("feed action `{name}`: bad `text` template: {message}")]
    Action {
        /// The action.
        name: String,
        /// Why.
        message: String,
    },
    /// The feedback log cannot be opened.
    #[error("cannot open the feedback log `{path}`: {source}")]
    Log {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What the feed's routes share.
pub struct FeedService {
    hub: Arc<FeedHub>,
    access: FeedAccess,
    operator: Option<Secret>,
    origins: Vec<String>,
    ttl: Duration,
    heartbeat: Duration,
    engine: Option<Arc<Engine>>,
    feedback: FeedbackLog,
    shutdown: watch::Receiver<bool>,
    actions: Vec<(ActionConfig, prompter_core::template::Template)>,
}

impl std::fmt::Debug for FeedService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeedService")
            .field("origins", &self.origins)
            .finish_non_exhaustive()
    }
}

impl FeedService {
    /// The feed for `hub`, configured by `config` with secrets read through `env`.
    /// Feedback events are dispatched to `engine` when given. Streams close when `shutdown`
    /// turns true.
    ///
    /// # Errors
    /// A missing or weak secret, or a feedback log that cannot be opened.
    pub fn new(
        config: &FeedConfig,
        env: &dyn Fn(&str) -> Option<String>,
        hub: Arc<FeedHub>,
        engine: Option<Arc<Engine>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, FeedSetupError> {
        let secret = env(&config.secret_env)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| FeedSetupError::NoSecret(config.secret_env.clone()))?;
        let access =
            FeedAccess::new(Secret::new(secret)).map_err(|source| FeedSetupError::Weak {
                env: config.secret_env.clone(),
                source,
            })?;
        let operator = env(&config.operator_token_env)
            .filter(|s| !s.trim().is_empty())
            .map(Secret::new);
        let feedback = FeedbackLog::open(config.feedback_log.clone())?;
        let mut actions = Vec::with_capacity(config.actions.len());
        for a in &config.actions {
            let t = prompter_core::template::Template::compile(&a.text).map_err(|e| {
                FeedSetupError::Action {
                    name: a.name.clone(),
                    message: e.to_string(),
                }
            })?;
            actions.push((a.clone(), t));
        }
        Ok(FeedService {
            hub,
            access,
            operator,
            origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
            ttl: Duration::from_secs(config.token_ttl_s.max(1)).min(MAX_TTL),
            heartbeat: Duration::from_millis(config.heartbeat_ms.max(10)),
            engine,
            feedback,
            shutdown,
            actions,
        })
    }

    /// A token for `scope` with the configured lifetime (for `prompter demo`, which prints a
    /// console link).
    pub fn mint(&self, scope: &Scope) -> String {
        self.access.mint(scope, self.ttl, SystemTime::now())
    }

    /// Feedback counts so far.
    pub fn feedback_counts(&self) -> Vec<FeedbackCount> {
        self.feedback.counts()
    }

    /// The routes, to merge into the engine's server.
    pub fn routes(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/", get(|| async { Redirect::to("/console/") }))
            .route("/console", get(|| async { Redirect::to("/console/") }))
            .route("/console/", get(console_page))
            .route("/console/app.js", get(console_js))
            .route("/console/app.css", get(console_css))
            .route("/feed/v1/conversations/{id}/ws", get(conversation_ws))
            .route("/feed/v1/conversations/{id}/sse", get(conversation_sse))
            .route("/feed/v1/conversations/{id}/feedback", post(feedback))
            .route("/feed/v1/all/ws", get(all_ws))
            .route("/feed/v1/all/sse", get(all_sse))
            .route("/feed/v1/whoami", get(whoami))
            .route("/feed/v1/session", post(session))
            .route("/feed/v1/tokens", post(tokens))
            .route("/feed/v1/feedback/summary", get(feedback_summary))
            .route("/feed/v1/conversations/{id}/actions", get(list_actions))
            .route(
                "/feed/v1/conversations/{id}/actions/{name}",
                post(run_action),
            )
            .with_state(self)
    }

    /// Checks the request's origin and token for `conversation` (`None`: the supervisor view).
    fn admit(&self, parts: &Credentials, conversation: Option<&str>) -> Result<Scope, Refusal> {
        self.check_origin(parts)?;
        let token = parts.token.as_ref().map(Secret::expose);
        let now = SystemTime::now();
        let scope = self.access.check(token, now).map_err(Refusal::Denied)?;
        self.access
            .allows(token, conversation, now)
            .map_err(Refusal::Denied)?;
        Ok(scope)
    }

    fn check_origin(&self, parts: &Credentials) -> Result<(), Refusal> {
        let Some(origin) = &parts.origin else {
            // Not a browser: the token alone decides.
            return Ok(());
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        let same = parts.host.as_deref().is_some_and(|host| {
            let host = host.to_ascii_lowercase();
            origin == format!("http://{host}") || origin == format!("https://{host}")
        });
        if same || self.origins.contains(&origin) {
            Ok(())
        } else {
            Err(Refusal::Origin(origin))
        }
    }
}

/// What a request presents: its token (never logged), origin and host.
struct Credentials {
    token: Option<Secret>,
    origin: Option<String>,
    host: Option<String>,
    /// The client offered the feed's subprotocol (WebSocket).
    offered_protocol: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for Credentials {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(credentials(&parts.headers))
    }
}

fn credentials(headers: &HeaderMap) -> Credentials {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut offered_protocol = false;
    let mut token = None;
    for value in headers.get_all(header::SEC_WEBSOCKET_PROTOCOL) {
        for p in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if p == PROTOCOL {
                offered_protocol = true;
            } else if let Some(t) = p.strip_prefix("bearer.") {
                token = Some(t.to_owned());
            }
        }
    }
    if token.is_none() {
        token = text(header::AUTHORIZATION).and_then(|a| {
            a.strip_prefix("Bearer ")
                .or_else(|| a.strip_prefix("bearer "))
                .map(|t| t.trim().to_owned())
        });
    }
    if token.is_none() {
        token = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| *k == COOKIE)
            .map(|(_, v)| v.to_owned());
    }
    Credentials {
        token: token.map(Secret::new),
        origin: text(header::ORIGIN).filter(|o| o != "null"),
        host: text(header::HOST),
        offered_protocol,
    }
}

/// Why a request is refused.
enum Refusal {
    Denied(Denied),
    Origin(String),
    Unknown(String),
    Bad(String),
    Busy,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Refusal::Denied(d) => (
                if d.forbidden() {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::UNAUTHORIZED
                },
                d.to_string(),
            ),
            Refusal::Origin(o) => (
                StatusCode::FORBIDDEN,
                format!(
                    "origin `{o}` is not allowed to read the feed (add it to `feed.allowed_origins`)"
                ),
            ),
            Refusal::Unknown(m) => (StatusCode::NOT_FOUND, m),
            Refusal::Bad(m) => (StatusCode::BAD_REQUEST, m),
            Refusal::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the feedback log is behind; retry shortly".to_owned(),
            ),
        };
        let mut r = (status, Json(serde_json::json!({ "error": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"prompter-feed\""),
            );
        }
        r
    }
}

type Shared = State<Arc<FeedService>>;

// ---------------------------------------------------------------------------------------------
// The console page.

const CONSOLE_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/app.js");
const CONSOLE_CSS: &str = include_str!("../console/app.css");
const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
                   style-src 'self'; script-src 'self'; frame-ancestors 'self'; base-uri 'none'; \
                   form-action 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn console_page() -> Response {
    asset(CONSOLE_HTML, "text/html; charset=utf-8")
}
async fn console_js() -> Response {
    asset(CONSOLE_JS, "text/javascript; charset=utf-8")
}
async fn console_css() -> Response {
    asset(CONSOLE_CSS, "text/css; charset=utf-8")
}

// ---------------------------------------------------------------------------------------------
// Streams.

#[derive(Debug, Default, Deserialize)]
struct Since {
    since: Option<String>,
}

/// Which stream a client reads.
#[derive(Clone)]
enum Target {
    Conversation(String),
    All,
}

impl Target {
    fn subscribe(&self, hub: &FeedHub, since: Option<&str>) -> Subscription {
        match self {
            Target::Conversation(c) => hub.subscribe(c, since),
            Target::All => hub.subscribe_all(),
        }
    }
}

async fn conversation_ws(
    State(svc): Shared,
    Path(id): Path<String>,
    Query(q): Query<Since>,
    creds: Credentials,
    ws: WebSocketUpgrade,
) -> Response {
    open_ws(svc, Target::Conversation(id), q.since, creds, ws)
}

async fn all_ws(State(svc): Shared, creds: Credentials, ws: WebSocketUpgrade) -> Response {
    open_ws(svc, Target::All, None, creds, ws)
}

fn open_ws(
    svc: Arc<FeedService>,
    target: Target,
    since: Option<String>,
    creds: Credentials,
    ws: WebSocketUpgrade,
) -> Response {
    let conversation = match &target {
        Target::Conversation(c) => Some(c.as_str()),
        Target::All => None,
    };
    if let Err(r) = svc.admit(&creds, conversation) {
        return r.into_response();
    }
    let ws = ws
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .max_write_buffer_size(WS_WRITE_BUFFER.max(256 * 1024))
        .max_message_size(WS_MAX_INCOMING)
        .max_frame_size(WS_MAX_INCOMING);
    // Echo the feed's subprotocol only when offered (browsers fail a handshake that selects one
    // they did not offer); never echo the bearer entry.
    let ws = if creds.offered_protocol {
        ws.protocols([PROTOCOL])
    } else {
        ws
    };
    ws.on_upgrade(move |socket| serve_ws(svc, target, since, socket))
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

fn heartbeat_json() -> String {
    format!("{{\"type\":\"heartbeat\",\"at_ms\":{}}}", now_ms())
}

async fn serve_ws(
    svc: Arc<FeedService>,
    target: Target,
    since: Option<String>,
    mut socket: WebSocket,
) {
    let mut shutdown = svc.shutdown.clone();
    let mut last = since;
    let mut sub = target.subscribe(&svc.hub, last.as_deref());
    let mut beat =
        tokio::time::interval_at(tokio::time::Instant::now() + svc.heartbeat, svc.heartbeat);
    loop {
        // The backlog first (a gap, or a snapshot), then live messages.
        for msg in std::mem::take(&mut sub.backlog) {
            if send_ws(&mut socket, &msg, &mut last).await.is_err() {
                return;
            }
        }
        tokio::select! {
            got = sub.live.recv() => match got {
                Ok(msg) => {
                    if send_ws(&mut socket, &msg, &mut last).await.is_err() {
                        return;
                    }
                }
                // Too slow for the live buffer: resume from the last message sent (the exact
                // gap from the ring, or a resync snapshot). Never a silent gap.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    sub = target.subscribe(&svc.hub, last.as_deref());
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = beat.tick() => {
                if socket.send(Message::Text(heartbeat_json().into())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                // Pings are answered by the socket; nothing else from the client is read.
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            () = stopped(&mut shutdown) => {
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: 1001,
                        reason: Utf8Bytes::from_static("the engine is stopping"),
                    })))
                    .await;
                return;
            }
        }
    }
}

async fn send_ws(
    socket: &mut WebSocket,
    msg: &FeedMessage,
    last: &mut Option<String>,
) -> Result<(), axum::Error> {
    socket.send(Message::Text(msg.json())).await?;
    if !msg.id.is_empty() {
        *last = Some(msg.id.clone());
    }
    Ok(())
}

async fn conversation_sse(
    State(svc): Shared,
    Path(id): Path<String>,
    Query(q): Query<Since>,
    headers: HeaderMap,
    creds: Credentials,
) -> Response {
    if let Err(r) = svc.admit(&creds, Some(&id)) {
        return r.into_response();
    }
    let since = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(q.since);
    sse(svc, Target::Conversation(id), since).into_response()
}

async fn all_sse(State(svc): Shared, creds: Credentials) -> Response {
    if let Err(r) = svc.admit(&creds, None) {
        return r.into_response();
    }
    sse(svc, Target::All, None).into_response()
}

/// An SSE stream: the same loop as the WebSocket's, as a stream of events.
fn sse(
    svc: Arc<FeedService>,
    target: Target,
    since: Option<String>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    struct St {
        svc: Arc<FeedService>,
        target: Target,
        last: Option<String>,
        sub: Subscription,
        beat: tokio::time::Interval,
        shutdown: watch::Receiver<bool>,
    }
    let sub = target.subscribe(&svc.hub, since.as_deref());
    let beat = tokio::time::interval_at(tokio::time::Instant::now() + svc.heartbeat, svc.heartbeat);
    let shutdown = svc.shutdown.clone();
    let mut st = St {
        svc,
        target,
        last: since,
        sub,
        beat,
        shutdown,
    };
    st.sub.backlog.reverse(); // popped from the end, oldest first
    enum Next {
        Send(Arc<FeedMessage>),
        Resume,
        Beat,
        Stop,
    }
    let stream = futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(msg) = st.sub.backlog.pop() {
                let e = sse_event(&msg, &mut st.last);
                return Some((Ok(e), st));
            }
            let next = tokio::select! {
                got = st.sub.live.recv() => match got {
                    Ok(msg) => Next::Send(msg),
                    Err(broadcast::error::RecvError::Lagged(_)) => Next::Resume,
                    Err(broadcast::error::RecvError::Closed) => Next::Stop,
                },
                _ = st.beat.tick() => Next::Beat,
                () = stopped(&mut st.shutdown) => Next::Stop,
            };
            match next {
                Next::Send(msg) => {
                    let e = sse_event(&msg, &mut st.last);
                    return Some((Ok(e), st));
                }
                Next::Resume => {
                    st.sub = st.target.subscribe(&st.svc.hub, st.last.as_deref());
                    st.sub.backlog.reverse();
                }
                Next::Beat => {
                    let e = SseEvent::default()
                        .event("heartbeat")
                        .data(heartbeat_json());
                    return Some((Ok(e), st));
                }
                Next::Stop => return None,
            }
        }
    });
    Sse::new(stream)
}

fn sse_event(msg: &FeedMessage, last: &mut Option<String>) -> SseEvent {
    let mut e = SseEvent::default()
        .event(msg.kind())
        .data(msg.json().as_str());
    if !msg.id.is_empty() {
        e = e.id(msg.id.as_str());
        *last = Some(msg.id.clone());
    }
    e
}

// ---------------------------------------------------------------------------------------------
// Tokens.

#[derive(Debug, Serialize)]
struct WhoAmI {
    scope: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct WhoAmIQuery {
    conversation: Option<String>,
}

/// What a token opens: 200 with its scope, 401 or 403 (with `?conversation=` for another
/// conversation) saying why.
async fn whoami(State(svc): Shared, Query(q): Query<WhoAmIQuery>, creds: Credentials) -> Response {
    let scope = match q.conversation.as_deref() {
        Some(c) => svc.admit(&creds, Some(c)),
        None => svc.check_origin(&creds).and_then(|()| {
            svc.access
                .check(creds.token.as_ref().map(Secret::expose), SystemTime::now())
                .map_err(Refusal::Denied)
        }),
    };
    match scope {
        Ok(Scope::Supervisor) => Json(WhoAmI {
            scope: "supervisor",
            conversation_id: None,
        })
        .into_response(),
        Ok(Scope::Conversation(c)) => Json(WhoAmI {
            scope: "conversation",
            conversation_id: Some(c),
        })
        .into_response(),
        Err(r) => r.into_response(),
    }
}

/// Sets the presented token as an `HttpOnly` cookie for the feed's paths, so a browser's
/// `EventSource` (which cannot send headers) carries it.
async fn session(State(svc): Shared, creds: Credentials) -> Response {
    if let Err(r) = svc.check_origin(&creds).and_then(|()| {
        svc.access
            .check(creds.token.as_ref().map(Secret::expose), SystemTime::now())
            .map_err(Refusal::Denied)
    }) {
        return r.into_response();
    }
    let token = creds.token.as_ref().map(Secret::expose).unwrap_or_default();
    let cookie = format!(
        "{COOKIE}={token}; Path=/feed/v1; HttpOnly; SameSite=Strict; Max-Age={}",
        svc.ttl.as_secs()
    );
    match HeaderValue::from_str(&cookie) {
        Ok(v) => (StatusCode::NO_CONTENT, [(header::SET_COOKIE, v)]).into_response(),
        Err(_) => Refusal::Denied(Denied::Invalid).into_response(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    conversation_id: Option<String>,
    #[serde(default)]
    supervisor: bool,
    #[serde(default)]
    ttl_s: Option<u64>,
}

#[derive(Debug, Serialize)]
struct TokenReply {
    token: String,
    scope: &'static str,
    expires_at_ms: u64,
    /// The console link (append to the server's base URL); the token is in the fragment,
    /// which browsers never send to a server.
    console_path: String,
}

/// Mints a token: operator-authenticated (`Authorization: Bearer <operator token>`).
async fn tokens(
    State(svc): Shared,
    headers: HeaderMap,
    body: Result<Json<TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Some(operator) = &svc.operator else {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "the token API is off: set the operator token's environment variable (`feed.operator_token_env`)"})),
        )
            .into_response();
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|a| a.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(presented.trim().as_bytes(), operator.expose().as_bytes()) {
        return Refusal::Denied(Denied::Invalid).into_response();
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return Refusal::Bad(e.body_text()).into_response(),
    };
    let scope = match (req.conversation_id, req.supervisor) {
        (Some(c), false) if !c.trim().is_empty() => Scope::Conversation(c),
        (None, true) => Scope::Supervisor,
        _ => {
            return Refusal::Bad("give either `conversation_id` or `supervisor: true`".to_owned())
                .into_response();
        }
    };
    let ttl = req
        .ttl_s
        .map_or(svc.ttl, |s| Duration::from_secs(s.max(1)))
        .min(MAX_TTL);
    let now = SystemTime::now();
    let token = svc.access.mint(&scope, ttl, now);
    let console_path = match &scope {
        Scope::Conversation(c) => format!("/console/#token={token}&c={}", url_encode(c)),
        Scope::Supervisor => format!("/console/#token={token}"),
    };
    Json(TokenReply {
        scope: match scope {
            Scope::Conversation(_) => "conversation",
            Scope::Supervisor => "supervisor",
        },
        token,
        expires_at_ms: now_ms().saturating_add(ttl.as_millis() as u64),
        console_path,
    })
    .into_response()
}

/// Compares without telling, by its timing, how much of `a` matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a request presents `expected`, as `Authorization: Bearer <token>` or, when the
/// route accepts one (WebSockets from browsers and CLIs), a query token; compared in constant
/// time. The operator surfaces (reload, tap, the update feed) use it.
pub(crate) fn presents(headers: &HeaderMap, query: Option<&str>, expected: &Secret) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let presented = query.or(bearer).unwrap_or("");
    constant_time_eq(presented.trim().as_bytes(), expected.expose().as_bytes())
}

/// Percent-encodes everything but unreserved characters (for URL fragments and paths).
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Feedback.

/// The feedback actions a console sends.
pub const ACTIONS: &[&str] = &["useful", "not_useful", "dismissed", "copied"];
/// The reasons a dismissal may give.
pub const REASONS: &[&str] = &[
    "not_relevant",
    "already_handled",
    "wrong",
    "too_late",
    "other",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackRequest {
    output_id: String,
    version: u32,
    action: String,
    #[serde(default)]
    reason: Option<String>,
}

/// One line of the feedback log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FeedbackRecord {
    /// The conversation.
    pub conversation_id: String,
    /// The feedback, with the output's pipeline, kind and model.
    #[serde(flatten)]
    pub feedback: Feedback,
}

/// Feedback counted by pipeline, model and action.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FeedbackCount {
    /// The pipeline.
    pub pipeline: String,
    /// The model (`-` when none).
    pub model: String,
    /// The action.
    pub action: String,
    /// How many.
    pub count: u64,
}

type CountKey = (String, String, String);

/// Where feedback is recorded: counters, and a JSONL file written by its own task.
struct FeedbackLog {
    counts: Mutex<BTreeMap<CountKey, u64>>,
    file: Option<mpsc::Sender<String>>,
    recorded: AtomicU64,
}

impl FeedbackLog {
    fn open(path: Option<PathBuf>) -> Result<Self, FeedSetupError> {
        let file = match path {
            None => None,
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| FeedSetupError::Log {
                        path: path.clone(),
                        source,
                    })?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| FeedSetupError::Log {
                        path: path.clone(),
                        source,
                    })?;
                let (tx, mut rx) = mpsc::channel::<String>(FEEDBACK_QUEUE);
                let mut f = tokio::fs::File::from_std(f);
                tokio::spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    while let Some(line) = rx.recv().await {
                        let written = async {
                            f.write_all(line.as_bytes()).await?;
                            f.flush().await
                        };
                        if let Err(e) = written.await {
                            tracing::error!(file = %path.display(), error = %e, "Cannot append to the feedback log.");
                        }
                    }
                });
                Some(tx)
            }
        };
        Ok(FeedbackLog {
            counts: Mutex::default(),
            file,
            recorded: AtomicU64::new(0),
        })
    }

    fn record(&self, record: &FeedbackRecord) -> Result<(), Refusal> {
        if let Some(tx) = &self.file {
            let mut line = serde_json::to_string(record).unwrap_or_default();
            line.push('\n');
            tx.try_send(line).map_err(|_| Refusal::Busy)?;
        }
        let f = &record.feedback;
        let key = (
            f.pipeline.clone(),
            f.model.clone().unwrap_or_else(|| "-".into()),
            f.action.clone(),
        );
        *self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(key)
            .or_default() += 1;
        self.recorded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn counts(&self) -> Vec<FeedbackCount> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|((pipeline, model, action), count)| FeedbackCount {
                pipeline: pipeline.clone(),
                model: model.clone(),
                action: action.clone(),
                count: *count,
            })
            .collect()
    }
}

/// Records an agent's feedback on a card, and hands it to the engine as a `feedback` event
/// while the call is live (pipelines route it with `on: [feedback]`).
async fn feedback(
    State(svc): Shared,
    Path(conversation): Path<String>,
    creds: Credentials,
    body: Result<Json<FeedbackRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = svc.admit(&creds, Some(&conversation)) {
        return r.into_response();
    }
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return Refusal::Bad(e.body_text()).into_response(),
    };
    if !ACTIONS.contains(&req.action.as_str()) {
        return Refusal::Bad(format!(
            "unknown action `{}`; one of: {}",
            req.action,
            ACTIONS.join(", ")
        ))
        .into_response();
    }
    let reason = req.reason.filter(|r| !r.trim().is_empty());
    if let Some(r) = &reason
        && (req.action != "dismissed" || !REASONS.contains(&r.as_str()))
    {
        return Refusal::Bad(format!(
            "a reason is only for `dismissed`, one of: {}",
            REASONS.join(", ")
        ))
        .into_response();
    }
    let Some(card) = svc.hub.card(&conversation, &req.output_id) else {
        return Refusal::Unknown(format!(
            "conversation `{conversation}` has no output `{}`",
            req.output_id
        ))
        .into_response();
    };
    if req.version == 0 || req.version > card.version {
        return Refusal::Bad(format!(
            "output `{}` has no version {} (latest: {})",
            req.output_id, req.version, card.version
        ))
        .into_response();
    }
    let record = FeedbackRecord {
        conversation_id: conversation.clone(),
        feedback: Feedback {
            output_id: req.output_id,
            version: req.version,
            action: req.action,
            reason,
            pipeline: card.pipeline.clone(),
            kind: card.kind.clone(),
            model: card.model.clone(),
            at_ms: now_ms(),
        },
    };
    if let Err(r) = svc.feedback.record(&record) {
        return r.into_response();
    }
    // Sinks that report on calls (the post-call e-mail) hear it too.
    if let Some(engine) = &svc.engine {
        let note = crate::sink::feedback_note(
            &conversation,
            record.feedback.at_ms,
            serde_json::to_value(&record).unwrap_or_default(),
        );
        engine.outlets().feedback(note).await;
    }
    let live = !svc.hub.ended(&conversation);
    let routed = match (&svc.engine, live) {
        (Some(engine), true) => {
            engine
                .dispatch_from("feed", feedback_event(&record, &card))
                .await;
            true
        }
        _ => false,
    };
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "recorded": true, "routed": routed })),
    )
        .into_response()
}

/// The `feedback` event for `record`, at the call position of the card's trigger.
fn feedback_event(record: &FeedbackRecord, card: &prompter_core::output::Output) -> Event {
    let raw = serde_json::to_value(record).unwrap_or_default();
    Event {
        conversation_id: Arc::from(record.conversation_id.as_str()),
        offset_ms: card.trigger.offset_ms,
        kind: EventKind::Feedback,
        detail: Detail::Feedback(record.feedback.clone()),
        raw: Arc::new(prompter_core::event::RawFrame::tree(Arc::new(raw))),
        received: std::time::Instant::now(),
    }
}

/// Feedback counts (operator or supervisor token).
async fn feedback_summary(State(svc): Shared, creds: Credentials) -> Response {
    let operator = svc.operator.as_ref().is_some_and(|op| {
        creds
            .token
            .as_ref()
            .is_some_and(|t| constant_time_eq(t.expose().as_bytes(), op.expose().as_bytes()))
    });
    if !operator && let Err(r) = svc.admit(&creds, None) {
        return r.into_response();
    }
    Json(serde_json::json!({
        "recorded": svc.feedback.recorded.load(Ordering::Relaxed),
        "counts": svc.feedback.counts(),
    }))
    .into_response()
}

// ---------------------------------------------------------------------------------------------
// Agent actions.

#[derive(Debug, Serialize)]
struct ActionView {
    name: String,
    label: String,
    sink: String,
    text: String,
}

impl FeedService {
    /// `conversation`'s cards, its summary first when it has one.
    fn call_context(&self, conversation: &str) -> prompter_core::minijinja::Value {
        let cards = self.hub.cards(conversation);
        let summary = cards.iter().find(|c| c.kind == "summary").cloned();
        prompter_core::minijinja::context! {
            conversation_id => conversation,
            summary => prompter_core::minijinja::Value::from_serialize(summary.as_deref()),
            cards => prompter_core::minijinja::Value::from_serialize(&cards),
        }
    }
}

/// The call's actions, each with its text prefilled from the call as it is now.
async fn list_actions(
    State(svc): Shared,
    Path(conversation): Path<String>,
    creds: Credentials,
) -> Response {
    if let Err(r) = svc.admit(&creds, Some(&conversation)) {
        return r.into_response();
    }
    let ctx = svc.call_context(&conversation);
    let mut views = Vec::with_capacity(svc.actions.len());
    for (a, t) in &svc.actions {
        let text = match t.render(&ctx) {
            Ok(text) => text.trim().to_owned(),
            Err(e) => {
                tracing::warn!(action = %a.name, error = %e, "An action's text template failed; it is offered empty.");
                String::new()
            }
        };
        views.push(ActionView {
            name: a.name.clone(),
            label: a.label.clone(),
            sink: a.sink.clone(),
            text,
        });
    }
    Json(views).into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    #[serde(default)]
    text: Option<String>,
}

/// Runs an action: its text (as the agent edited it, or prefilled) goes to its sink as an
/// `agent_action` output, and the action is recorded like feedback.
async fn run_action(
    State(svc): Shared,
    Path((conversation, name)): Path<(String, String)>,
    creds: Credentials,
    body: Result<Json<ActionRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(r) = svc.admit(&creds, Some(&conversation)) {
        return r.into_response();
    }
    let Some((action, template)) = svc.actions.iter().find(|(a, _)| a.name == name) else {
        let names: Vec<&str> = svc.actions.iter().map(|(a, _)| a.name.as_str()).collect();
        return Refusal::Unknown(format!(
            "no action `{name}` (configured: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ))
        .into_response();
    };
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => return Refusal::Bad(e.body_text()).into_response(),
    };
    let text = match req.text.map(|t| t.trim().to_owned()) {
        Some(t) => t,
        None => match template.render(&svc.call_context(&conversation)) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                return Refusal::Bad(format!("the action's text template failed: {e}"))
                    .into_response();
            }
        },
    };
    if text.is_empty() || text.chars().count() > ACTION_TEXT_MAX {
        return Refusal::Bad(format!(
            "the text must be 1 to {ACTION_TEXT_MAX} characters"
        ))
        .into_response();
    }
    let Some(engine) = &svc.engine else {
        return Refusal::Unknown("this server has no engine to deliver actions".into())
            .into_response();
    };
    let at_ms = now_ms();
    let output = prompter_core::output::Output {
        id: format!(
            "{}/console/a-{}-{at_ms}",
            url_encode(&conversation),
            url_encode(&action.name)
        ),
        version: 1,
        status: prompter_core::output::Status::Final,
        kind: AGENT_ACTION_KIND.to_owned(),
        conversation_id: conversation.clone(),
        pipeline: "console".to_owned(),
        title: Some(action.label.clone()),
        text,
        data: serde_json::json!({"action": action.name, "sink": action.sink}),
        ..Default::default()
    };
    let record = FeedbackRecord {
        conversation_id: conversation.clone(),
        feedback: Feedback {
            output_id: output.id.clone(),
            version: 1,
            action: format!("action:{}", action.name),
            reason: None,
            pipeline: "console".to_owned(),
            kind: AGENT_ACTION_KIND.to_owned(),
            model: None,
            at_ms,
        },
    };
    if let Err(r) = svc.feedback.record(&record) {
        return r.into_response();
    }
    let id = output.id.clone();
    engine.outlets().push(Arc::new(output)).await;
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "sent": true, "output_id": id, "sink": action.sink })),
    )
        .into_response()
}
