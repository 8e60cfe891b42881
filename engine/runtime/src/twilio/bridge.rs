//! The Media Streams socket and the calls it carries: Twilio's audio to Symbl's Streaming API,
//! Symbl's events straight into the engine.
//!
//! Twilio opens the socket the voice webhook's `<Stream>` names and sends `connected`, `start`
//! (call sid, tracks, the `<Parameter>`s), then `media` frames (base64 μ-law, per track),
//! `dtmf`, `mark` and `stop` (wire-format reference §6.1). For each call:
//!
//! - **One task reads Twilio's socket** (8 KiB buffers, frames capped at 64 KiB). It checks the
//!   call's media token in `start` ([`super::MediaAuth`]), decodes each `media` payload and
//!   hands it, without waiting, to its track's queue. A malformed frame is logged with its
//!   number and skipped; the call goes on.
//! - **One task per track** (`inbound` is the customer, `outbound` the agent; names and ids
//!   from [`super::Speakers`]) holds one Symbl Streaming session. Both sessions share one
//!   fresh connection id, so Symbl makes them one conversation. The audio goes to Symbl
//!   unchanged, one binary frame per Twilio frame. When the session's socket drops, the track
//!   reconnects with backoff; the audio that arrives meanwhile waits in the track's queue
//!   (bounded by `outage_buffer_ms`) and the audio the dead socket had not written is sent
//!   first, so nothing the caller says is lost to a short outage.
//! - **One task takes the sessions' events** into the engine as one conversation keyed by the
//!   call sid, in the order each track received them. A frame both sockets receive is handed
//!   over once; a sentence or caption without a speaker gets its track's speaker. When both
//!   tracks have ended it completes the conversation once (`conversation_completed` with
//!   Symbl's conversation id), so post-call pipelines run.
//!
//! Calls share nothing but the engine: a silent call, a slow Symbl socket or a malformed frame
//! holds back only its own call. `/symbl/updates` ([`super::updates`]) hears of each call's
//! connection as Symbl's integration server would tell it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use bytes::Bytes;
use prompter_core::backoff::Backoff;
use prompter_core::event::parse_frame;
use prompter_core::secret::Secret;
use prompter_core::template::Template;
use prompter_symbl::config::TrackerSpec;
use prompter_symbl::identity::frame_identity;
use prompter_symbl::streaming::{
    InsightType, Speaker, StartRequest, StreamingClient, StreamingError, StreamingEvent,
    StreamingOptions,
};
use prompter_symbl::subscribe::Seen;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::updates::Updates;
use super::{MediaAuth, TOKEN_PARAMETER, TwilioConfig, call_token};
use crate::engine::Engine;
use crate::source::{Notices, Source, SourceError};

/// Twilio's frames are a few hundred bytes; anything over this is not Twilio.
const MAX_TWILIO_FRAME: usize = 64 * 1024;
/// Read and write buffers of a Twilio socket.
const SOCKET_BUFFER: usize = 8 * 1024;
/// How long a new socket may take to send `start`.
const START_WAIT: Duration = Duration::from_secs(10);
/// Events queued from a call's tracks towards the engine.
const NEWS_BUFFER: usize = 256;
/// Audio chunks a track takes from its queue ahead of the session (the rest waits in the
/// queue, which is the outage buffer).
const CARRY: usize = 16;
/// Twilio's frame length, to size the outage buffer in frames.
const FRAME_MS: u64 = 20;
/// How long a new session's conversation id may take to arrive.
const CONVERSATION_WAIT: Duration = Duration::from_secs(2);
/// How long a session may take to end after its `stop_request` (Symbl's completion).
const STOP_WAIT: Duration = Duration::from_secs(10);

/// What the bridge has done, for the operator and the benches.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Calls whose stream started (token accepted).
    pub calls: AtomicU64,
    /// Streams refused: no `start`, or a missing or wrong media token.
    pub refused: AtomicU64,
    /// Media frames taken from Twilio.
    pub frames: AtomicU64,
    /// Audio bytes taken from Twilio.
    pub bytes: AtomicU64,
    /// Media frames dropped because a track's outage buffer was full (or its session gave up).
    pub dropped: AtomicU64,
    /// Frames from Twilio that were not valid Media Streams messages.
    pub malformed: AtomicU64,
    /// Symbl sessions re-opened after a drop.
    pub reconnects: AtomicU64,
    /// Frames received by both of a call's sessions, handed to the engine once.
    pub duplicates: AtomicU64,
    /// DTMF digits received.
    pub dtmf: AtomicU64,
}

/// The Media Streams endpoint and its calls; cheap to clone.
#[derive(Clone)]
pub struct Bridge(Arc<Shared>);

struct Shared {
    media_url: String,
    media_path: String,
    media_auth: MediaAuth,
    token: Secret,
    client: StreamingClient,
    /// The start request of every session, without its speaker.
    start: StartRequest,
    customer: (Template, Template),
    agent: (Template, Template),
    reconnect: Backoff,
    outage_frames: usize,
    engine: Arc<Engine>,
    updates: Arc<Updates>,
    notices: Notices,
    /// Turns true when the engine stops: calls end their bridging.
    stop: watch::Sender<bool>,
    /// Calls being bridged.
    live: watch::Sender<usize>,
    stats: BridgeStats,
}

/// A call's track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `inbound`: the caller.
    Customer,
    /// `outbound`: what the caller hears, the agent.
    Agent,
}

impl Role {
    fn from_track(track: &str) -> Option<Role> {
        match track {
            "inbound" | "inbound_track" => Some(Role::Customer),
            "outbound" | "outbound_track" => Some(Role::Agent),
            _ => None,
        }
    }

    fn index(self) -> usize {
        match self {
            Role::Customer => 0,
            Role::Agent => 1,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Agent => "agent",
        }
    }
}

/// What a track tells its call's events task.
enum News {
    /// A session is up (again).
    Started(Option<String>),
    /// A frame from Symbl on `Role`'s session.
    Frame(Role, StreamingEvent),
}

impl Bridge {
    /// The bridge for `config`: sessions opened with `client`, asking for `trackers`,
    /// reconnected per `reconnect`; events into `engine`; connections told to `updates`.
    ///
    /// # Errors
    /// A speaker template that does not compile, an unknown insight type, a confidence
    /// threshold out of range: the message names the setting.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &TwilioConfig,
        token: Secret,
        client: StreamingClient,
        trackers: Vec<TrackerSpec>,
        reconnect: Backoff,
        engine: Arc<Engine>,
        updates: Arc<Updates>,
        notices: Notices,
    ) -> Result<Bridge, String> {
        let compile = |what: &str, source: &str| {
            Template::compile(source).map_err(|e| format!("`twilio.speakers.{what}`: {e}"))
        };
        let s = &config.speakers;
        let customer = (
            compile("customer.name", &s.customer.name)?,
            compile("customer.user_id", &s.customer.user_id)?,
        );
        let agent = (
            compile("agent.name", &s.agent.name)?,
            compile("agent.user_id", &s.agent.user_id)?,
        );
        let st = &config.streaming;
        let mut insights = Vec::new();
        for t in &st.insight_types {
            insights.push(match t.as_str() {
                "question" => InsightType::Question,
                "action_item" => InsightType::ActionItem,
                "follow_up" => InsightType::FollowUp,
                "topic" => InsightType::Topic,
                other => {
                    return Err(format!(
                        "`twilio.streaming.insight_types`: `{other}` is not one of question, action_item, follow_up, topic"
                    ));
                }
            });
        }
        let start = StartRequest::twilio(Speaker::new("", ""))
            .insight_types(insights)
            .interim_results(st.interim_results)
            .enable_all_trackers(st.enable_all_trackers)
            .sentiment(st.sentiment)
            .language_code(st.language_code.clone())
            .confidence_threshold(st.confidence_threshold)
            .trackers(trackers);
        start
            .validate()
            .map_err(|e| format!("`twilio.streaming`: {e}"))?;
        let client = client.with_options(StreamingOptions {
            stop_timeout: STOP_WAIT,
            ..StreamingOptions::default()
        });
        Ok(Bridge(Arc::new(Shared {
            media_url: config.media_url(),
            media_path: config.media_path.clone(),
            media_auth: config.media_auth,
            token,
            client,
            start,
            customer,
            agent,
            reconnect,
            outage_frames: usize::try_from(config.outage_buffer_ms / FRAME_MS)
                .unwrap_or(usize::MAX)
                .max(CARRY),
            engine,
            updates,
            notices,
            stop: watch::channel(false).0,
            live: watch::channel(0).0,
            stats: BridgeStats::default(),
        })))
    }

    /// The media socket's route, to merge into the engine's server.
    pub fn routes(&self) -> axum::Router {
        axum::Router::new()
            .route(&self.0.media_path, get(media))
            .with_state(self.clone())
    }

    /// What the bridge has done so far.
    pub fn stats(&self) -> &BridgeStats {
        &self.0.stats
    }

    /// Calls being bridged now.
    pub fn live_calls(&self) -> usize {
        *self.0.live.borrow()
    }

    fn say(&self, message: &str) {
        (self.0.notices)(message);
    }

    /// The speaker of `role` for a call with these parameters.
    fn speaker(&self, role: Role, params: &BTreeMap<String, String>) -> Speaker {
        let (name, id) = match role {
            Role::Customer => &self.0.customer,
            Role::Agent => &self.0.agent,
        };
        let ctx = prompter_core::minijinja::Value::from_serialize(params);
        let render = |t: &Template, fallback: &str| match t.render(&ctx) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
            Ok(_) => fallback.to_owned(),
            Err(e) => {
                tracing::warn!(template = t.source(), error = %e, "A speaker template failed; using the default.");
                fallback.to_owned()
            }
        };
        let default_name = match role {
            Role::Customer => "Customer",
            Role::Agent => "Agent",
        };
        Speaker::new(render(id, ""), render(name, default_name))
    }

    /// Bridges one call: the media socket's task. `_live` counts it until it returns.
    async fn call(self, mut socket: WebSocket, _live: LiveCall) {
        let stats = &self.0.stats;
        let mut frame_no = 0u64;
        let mut stopping = self.0.stop.subscribe();
        let waited = tokio::select! {
            w = tokio::time::timeout(START_WAIT, wait_start(&mut socket, &mut frame_no, stats)) => w,
            _ = stopping.wait_for(|s| *s) => Ok(None),
        };
        let start = match waited {
            Ok(Some(start)) => start,
            Ok(None) => return,
            Err(_) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("A media stream sent no start within 10 s; closed.");
                close(&mut socket, 1008, "no start").await;
                return;
            }
        };
        if self.0.media_auth == MediaAuth::Token {
            let expected = call_token(self.0.token.expose(), &start.call_sid);
            let presented = start.params.get(TOKEN_PARAMETER).map_or("", String::as_str);
            if !crate::feed::http::constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                self.say(&format!(
                    "error: refused a media stream for call {}: its `{TOKEN_PARAMETER}` parameter is missing or wrong (was the call answered by this bridge's /twilio/voice?)",
                    start.call_sid.escape_debug()
                ));
                close(&mut socket, 1008, "not a call this bridge answered").await;
                return;
            }
        }
        stats.calls.fetch_add(1, Ordering::Relaxed);
        let call: Arc<str> = Arc::from(start.call_sid.as_str());
        let connection_id: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
        let customer = self.speaker(Role::Customer, &start.params);
        let agent = self.speaker(Role::Agent, &start.params);
        let roles: Vec<Role> = {
            let mut r: Vec<Role> = start
                .tracks
                .iter()
                .filter_map(|t| Role::from_track(t))
                .collect();
            if r.is_empty() {
                r = vec![Role::Customer, Role::Agent];
            }
            // One session per track, whatever the list repeats.
            r.sort_by_key(|role| role.index());
            r.dedup();
            r
        };
        self.say(&format!(
            "call {call}: bridging {} to Symbl connection {connection_id}",
            roles
                .iter()
                .map(|r| r.label())
                .collect::<Vec<_>>()
                .join(" and ")
        ));
        let (news_tx, news_rx) = mpsc::channel(NEWS_BUFFER);
        let events = tokio::spawn(self.clone().events(
            call.clone(),
            connection_id.clone(),
            [customer.clone(), agent.clone()],
            news_rx,
        ));
        let mut audio: [Option<mpsc::Sender<Bytes>>; 2] = [None, None];
        let mut tracks = Vec::new();
        for role in roles {
            let speaker = match role {
                Role::Customer => customer.clone(),
                Role::Agent => agent.clone(),
            };
            let (tx, rx) = mpsc::channel(self.0.outage_frames);
            audio[role.index()] = Some(tx);
            tracks.push(tokio::spawn(self.clone().track(
                role,
                speaker,
                call.clone(),
                connection_id.clone(),
                rx,
                news_tx.clone(),
            )));
        }
        drop(news_tx);

        let mut stopping = self.0.stop.subscribe();
        let mut last_drop_warning: Option<Instant> = None;
        let why = loop {
            let msg = tokio::select! {
                _ = stopping.wait_for(|s| *s) => break "the engine is stopping",
                msg = socket.recv() => msg,
            };
            let text = match msg {
                None | Some(Err(_)) => break "Twilio's socket closed without a stop",
                Some(Ok(Message::Close(_))) => break "Twilio closed the socket",
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
            };
            frame_no += 1;
            match parse(text.as_str()) {
                Ok(Twilio::Media { role, payload }) => {
                    stats.frames.fetch_add(1, Ordering::Relaxed);
                    stats
                        .bytes
                        .fetch_add(payload.len() as u64, Ordering::Relaxed);
                    let Some(tx) = &audio[role.index()] else {
                        continue;
                    };
                    if tx.try_send(payload).is_err() {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                        if last_drop_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            last_drop_warning = Some(Instant::now());
                            tracing::warn!(call = %call, track = role.label(), "Dropped audio: the track's Symbl session is down for longer than the outage buffer holds.");
                        }
                    }
                }
                Ok(Twilio::Stop) => break "the call's stream stopped",
                Ok(Twilio::Dtmf(digit)) => {
                    stats.dtmf.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(call = %call, digit, "DTMF.");
                }
                Ok(Twilio::Other) => {}
                Err(why) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(call = %call, frame = frame_no, error = %why, "Skipped a Media Streams frame.");
                }
            }
        };
        tracing::info!(call = %call, why, "The call's audio ended.");
        // The tracks send what they hold, stop their sessions and hand over the last events.
        drop(audio);
        for t in tracks {
            let _ = t.await;
        }
        let _ = events.await;
        self.say(&format!("call {call}: ended ({why})"));
    }

    /// One track: its Symbl session, reconnected when it drops, fed from `audio`.
    async fn track(
        self,
        role: Role,
        speaker: Speaker,
        call: Arc<str>,
        connection_id: Arc<str>,
        mut audio: mpsc::Receiver<Bytes>,
        news: mpsc::Sender<News>,
    ) {
        let start = self.0.start.clone().speaker(speaker);
        let mut carry: VecDeque<Bytes> = VecDeque::with_capacity(CARRY);
        let mut audio_done = false;
        let mut attempt = 0u32;
        let mut sessions = 0u32;
        loop {
            let mut session = match self.0.client.start(&connection_id, &start).await {
                Ok(s) => s,
                Err(e) => {
                    let permanent = matches!(
                        e,
                        StreamingError::InvalidStart(_)
                            | StreamingError::StartRefused(_)
                            | StreamingError::Auth(_)
                    );
                    if permanent || attempt >= self.0.reconnect.max_retries {
                        self.say(&format!(
                            "error: call {call}: the {} track's Symbl session cannot be opened ({e}); its audio is no longer transcribed",
                            role.label()
                        ));
                        return;
                    }
                    let wait = self.0.reconnect.wait(attempt, None);
                    attempt += 1;
                    tracing::warn!(call = %call, track = role.label(), error = %e, retry_in_ms = wait.as_millis() as u64, "Symbl session failed to open; retrying.");
                    let mut stopping = self.0.stop.subscribe();
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = stopping.wait_for(|s| *s) => return,
                    }
                    continue;
                }
            };
            if sessions > 0 {
                self.0.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                self.say(&format!(
                    "call {call}: the {} track's Symbl socket is back; sending the {} ms of audio kept meanwhile",
                    role.label(),
                    (carry.len() + audio.len()) as u64 * FRAME_MS
                ));
            }
            // Symbl names the conversation right after acknowledging the start; the update
            // feed announces the connection with it (the audio waits in the queue meanwhile).
            let conversation_id = match session.conversation_id() {
                Some(id) => Some(id),
                None if sessions == 0 => {
                    tokio::time::timeout(CONVERSATION_WAIT, session.wait_conversation_id())
                        .await
                        .ok()
                        .flatten()
                }
                None => None,
            };
            sessions += 1;
            attempt = 0;
            if news.send(News::Started(conversation_id)).await.is_err() {
                return;
            }
            let sender = session.audio_sender();
            let mut pending: Option<StreamingEvent> = None;
            let mut stop_sent = false;
            let mut dead = false;
            loop {
                if audio_done && carry.is_empty() && !stop_sent && !dead {
                    stop_sent = true;
                    let _ = session.stop().await;
                }
                tokio::select! {
                    biased;
                    permit = news.reserve(), if pending.is_some() => {
                        // An error: the events task is gone (it never goes first).
                        if let (Ok(p), Some(e)) = (permit, pending.take()) {
                            p.send(News::Frame(role, e));
                        }
                    }
                    sent = sender.send_chunk(carry.front().cloned().unwrap_or_default()),
                        if !carry.is_empty() && !stop_sent && !dead =>
                    {
                        match sent {
                            Ok(()) => {
                                carry.pop_front();
                            }
                            // The socket is gone: the end of the events says why.
                            Err(_) => dead = true,
                        }
                    }
                    chunk = audio.recv(), if !audio_done && carry.len() < CARRY => match chunk {
                        Some(c) => carry.push_back(c),
                        None => audio_done = true,
                    },
                    event = session.next_event(), if pending.is_none() => match event {
                        Some(e) => pending = Some(e),
                        None => break,
                    },
                }
            }
            if let Some(e) = pending.take() {
                let _ = news.send(News::Frame(role, e)).await;
            }
            let (result, unsent) = session.finish_with_unsent().await;
            for chunk in unsent.into_iter().rev() {
                carry.push_front(chunk);
            }
            let why = match result {
                Ok(_) if stop_sent => return,
                Ok(end) => format!("Symbl ended the session mid-call: {end:?}"),
                Err(e) if stop_sent => {
                    tracing::warn!(call = %call, track = role.label(), error = %e, "The Symbl session did not end cleanly.");
                    return;
                }
                Err(e) => e.to_string(),
            };
            if *self.0.stop.borrow() {
                return;
            }
            self.say(&format!(
                "call {call}: the {} track's Symbl socket dropped ({why}); reconnecting, the audio is kept",
                role.label()
            ));
        }
    }

    /// The call's events into the engine, then its completion.
    async fn events(
        self,
        call: Arc<str>,
        connection_id: Arc<str>,
        [customer, agent]: [Speaker; 2],
        mut news: mpsc::Receiver<News>,
    ) {
        let started = Instant::now();
        let mut seen = Seen::new();
        let mut symbl_id: Option<String> = None;
        let mut announced = false;
        let speakers = [speaker_json(&customer), speaker_json(&agent)];
        while let Some(n) = news.recv().await {
            match n {
                News::Started(id) => {
                    if symbl_id.is_none() {
                        symbl_id = id;
                    }
                    if !announced {
                        announced = true;
                        self.0.updates.started(
                            &connection_id,
                            symbl_id.as_deref(),
                            &customer.user_id,
                            &customer.name,
                        );
                    }
                }
                News::Frame(role, event) => {
                    let Some(mut frame) = event.into_json() else {
                        tracing::warn!(call = %call, "Symbl sent a text frame that is not JSON; skipped.");
                        continue;
                    };
                    let inner = frame
                        .get("message")
                        .and_then(|m| m.get("type"))
                        .and_then(Value::as_str);
                    if let Some("conversation_completed" | "recognition_stopped") = inner {
                        // Each session ends with these; the call completes once, below.
                        if symbl_id.is_none() {
                            symbl_id = conversation_id_of(&frame);
                        }
                        continue;
                    }
                    if !seen.first_time(frame_identity(&frame)) {
                        self.0.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    attribute(&mut frame, &speakers[role.index()]);
                    let offset = started.elapsed().as_millis() as u64;
                    match parse_frame(&call, offset, frame) {
                        Ok(events) => {
                            for e in events {
                                self.0.engine.dispatch_from("twilio", e).await;
                            }
                        }
                        Err(e) => {
                            tracing::warn!(call = %call, error = %e, "Skipped a Symbl frame.");
                        }
                    }
                }
            }
        }
        if announced {
            let mut frame =
                json!({"type": "message", "message": {"type": "conversation_completed"}});
            if let Some(id) = &symbl_id {
                frame["message"]["data"] = json!({ "conversationId": id });
            }
            let offset = started.elapsed().as_millis() as u64;
            if let Ok(events) = parse_frame(&call, offset, frame) {
                for e in events {
                    self.0.engine.dispatch_from("twilio", e).await;
                }
            }
            self.0.updates.stopped(&connection_id);
        }
    }
}

/// Counts a call as live from its upgrade request until its task ends (or the upgrade fails),
/// so that [`Source::run`] never returns while a call it could not see yet is starting.
struct LiveCall(Arc<Shared>);

impl LiveCall {
    /// Counts a call in, unless the bridge is stopping (checked after counting: a stop that
    /// raced past the check waits for this call).
    fn enter(shared: &Arc<Shared>) -> Option<Self> {
        shared.live.send_modify(|n| *n += 1);
        let guard = LiveCall(shared.clone());
        (!*shared.stop.borrow()).then_some(guard)
    }
}

impl Drop for LiveCall {
    fn drop(&mut self) {
        self.0.live.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn speaker_json(s: &Speaker) -> Value {
    json!({"name": s.name, "userId": s.user_id})
}

/// Gives a sentence or a caption without a speaker the speaker of the track it came on.
fn attribute(frame: &mut Value, speaker: &Value) {
    match frame.get("type").and_then(Value::as_str) {
        Some("message_response") => {
            if let Some(messages) = frame.get_mut("messages").and_then(Value::as_array_mut) {
                for m in messages {
                    if let Some(m) = m.as_object_mut()
                        && !m.get("from").is_some_and(has_name)
                    {
                        m.insert("from".into(), speaker.clone());
                    }
                }
            }
        }
        Some("message") => {
            if let Some(m) = frame.get_mut("message").and_then(Value::as_object_mut)
                && m.get("type").and_then(Value::as_str) == Some("recognition_result")
                && !m.get("user").is_some_and(has_name)
            {
                m.insert("user".into(), speaker.clone());
            }
        }
        _ => {}
    }
}

fn has_name(v: &Value) -> bool {
    v.get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.trim().is_empty())
}

fn conversation_id_of(frame: &Value) -> Option<String> {
    let m = frame.get("message")?;
    m.pointer("/data/conversationId")
        .or_else(|| m.get("conversationId"))
        .and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
}

/// A stream's `start`.
#[derive(Debug)]
struct Start {
    call_sid: String,
    tracks: Vec<String>,
    params: BTreeMap<String, String>,
}

/// Reads frames until `start`; `None` when the socket ends first.
async fn wait_start(
    socket: &mut WebSocket,
    frame_no: &mut u64,
    stats: &BridgeStats,
) -> Option<Start> {
    #[derive(Deserialize)]
    struct Frame {
        event: String,
        start: Option<StartBody>,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct StartBody {
        call_sid: String,
        #[serde(default)]
        tracks: Vec<String>,
        #[serde(default)]
        custom_parameters: BTreeMap<String, Value>,
    }
    loop {
        let text = match socket.recv().await? {
            Ok(Message::Text(text)) => text,
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        };
        *frame_no += 1;
        match serde_json::from_str::<Frame>(text.as_str()) {
            Ok(Frame {
                event,
                start: Some(s),
            }) if event == "start" => {
                let mut params: BTreeMap<String, String> = s
                    .custom_parameters
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect();
                params
                    .entry("CallSid".into())
                    .or_insert_with(|| s.call_sid.clone());
                return Some(Start {
                    call_sid: s.call_sid,
                    tracks: s.tracks,
                    params,
                });
            }
            Ok(_) => {}
            Err(e) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(frame = *frame_no, error = %e, "Skipped a Media Streams frame before the start.");
            }
        }
    }
}

/// A Media Streams frame after the start.
#[derive(Debug, PartialEq)]
enum Twilio {
    Media { role: Role, payload: Bytes },
    Dtmf(String),
    Stop,
    Other,
}

/// Parses a frame; the error says what is wrong with it.
fn parse(text: &str) -> Result<Twilio, String> {
    #[derive(Deserialize)]
    struct Frame<'a> {
        #[serde(borrow)]
        event: std::borrow::Cow<'a, str>,
        #[serde(borrow, default)]
        media: Option<Media<'a>>,
        #[serde(default)]
        dtmf: Option<Dtmf>,
    }
    #[derive(Deserialize)]
    struct Media<'a> {
        #[serde(borrow)]
        track: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        payload: std::borrow::Cow<'a, str>,
    }
    #[derive(Deserialize)]
    struct Dtmf {
        #[serde(default)]
        digit: String,
    }
    let frame: Frame<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match frame.event.as_ref() {
        "media" => {
            let media = frame.media.ok_or("a media frame without `media`")?;
            let role = Role::from_track(&media.track)
                .ok_or_else(|| format!("unknown track `{}`", media.track.escape_debug()))?;
            let payload = base64::engine::general_purpose::STANDARD
                .decode(media.payload.as_bytes())
                .map_err(|e| format!("the payload is not base64: {e}"))?;
            Ok(Twilio::Media {
                role,
                payload: Bytes::from(payload),
            })
        }
        "dtmf" => Ok(Twilio::Dtmf(
            frame.dtmf.map(|d| d.digit).unwrap_or_default(),
        )),
        "stop" => Ok(Twilio::Stop),
        "connected" | "start" | "mark" => Ok(Twilio::Other),
        other => Err(format!("unknown event `{}`", other.escape_debug())),
    }
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

async fn media(State(bridge): State<Bridge>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let Some(live) = LiveCall::enter(&bridge.0) else {
        return (StatusCode::SERVICE_UNAVAILABLE, "the engine is stopping\n").into_response();
    };
    // Twilio signs the upgrade over the wss:// URL with no parameters; a request that carries a
    // signature must carry the right one.
    if bridge.0.media_auth == MediaAuth::Token
        && let Some(presented) = headers.get("x-twilio-signature")
    {
        let presented = presented.to_str().unwrap_or("");
        if !super::valid(bridge.0.token.expose(), &bridge.0.media_url, &[], presented) {
            bridge.0.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("A media socket with a wrong X-Twilio-Signature was refused.");
            return (
                StatusCode::FORBIDDEN,
                "the X-Twilio-Signature header does not match this socket's URL\n",
            )
                .into_response();
        }
    }
    ws.read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(MAX_TWILIO_FRAME)
        .max_frame_size(MAX_TWILIO_FRAME)
        .on_upgrade(move |socket| bridge.call(socket, live))
}

#[prompter_core::async_trait]
impl Source for Bridge {
    fn name(&self) -> &str {
        "twilio"
    }

    /// Serves calls (through [`Bridge::routes`]) until `shutdown`; then ends every call's
    /// bridging (the sessions send what they hold and stop) and returns once every event
    /// received is dispatched and every call completed.
    async fn run(
        self: Box<Self>,
        _engine: Arc<Engine>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let _ = shutdown.wait_for(|s| *s).await;
        self.0.stop.send_replace(true);
        let mut live = self.0.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_frames_parse_and_bad_ones_say_why() {
        let f = r#"{"event":"media","sequenceNumber":"3","media":{"track":"inbound","chunk":"1","timestamp":"5","payload":"AAEC/w=="},"streamSid":"MZ1"}"#;
        assert_eq!(
            parse(f),
            Ok(Twilio::Media {
                role: Role::Customer,
                payload: Bytes::from_static(&[0, 1, 2, 255])
            })
        );
        let out = r#"{"event":"media","media":{"track":"outbound","payload":"/w=="}}"#;
        assert!(matches!(
            parse(out),
            Ok(Twilio::Media {
                role: Role::Agent,
                ..
            })
        ));
        assert_eq!(
            parse(r#"{"event":"stop","stop":{"callSid":"CA1"}}"#),
            Ok(Twilio::Stop)
        );
        assert_eq!(
            parse(r#"{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"1"}}"#),
            Ok(Twilio::Dtmf("1".into()))
        );
        assert_eq!(
            parse(r#"{"event":"mark","mark":{"name":"x"}}"#),
            Ok(Twilio::Other)
        );
        assert!(parse("not json").is_err());
        assert_eq!(
            parse(r#"{"event":"media","media":{"track":"inbound","payload":"***"}}"#)
                .unwrap_err()
                .split(':')
                .next(),
            Some("the payload is not base64")
        );
        assert_eq!(
            parse(r#"{"event":"media","media":{"track":"sideways","payload":"AA=="}}"#),
            Err("unknown track `sideways`".into())
        );
        assert_eq!(
            parse(r#"{"event":"media"}"#),
            Err("a media frame without `media`".into())
        );
    }

    #[test]
    fn sentences_and_captions_without_a_speaker_get_the_tracks() {
        let who = json!({"name": "Customer", "userId": "+15550001111"});
        let mut sentence = json!({"type": "message_response", "messages": [
            {"payload": {"content": "Hi."}},
            {"from": {"name": "Dana", "userId": "d"}, "payload": {"content": "Hello."}}
        ]});
        attribute(&mut sentence, &who);
        assert_eq!(sentence["messages"][0]["from"], who);
        assert_eq!(sentence["messages"][1]["from"]["name"], "Dana");
        let mut caption = json!({"type": "message", "message": {"type": "recognition_result", "isFinal": false, "punctuated": {"transcript": "Hi"}}});
        attribute(&mut caption, &who);
        assert_eq!(caption["message"]["user"], who);
        let mut tracker = json!({"type": "tracker_response", "trackers": []});
        attribute(&mut tracker, &who);
        assert_eq!(tracker, json!({"type": "tracker_response", "trackers": []}));
    }
}
