//! The client that opens sessions, the session handle, and the task that owns each socket.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use prompter_core::secret::Secret;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use super::events::{classify, learned_conversation_id, socket_error};
use super::{
    COMMAND_BUFFER, MAX_AUDIO_FRAME, STOP_REQUEST, SessionEnd, StartRequest, StreamingError,
    StreamingEvent, Ws,
};
use crate::auth::SymblAuth;
use crate::config::SymblConfig;

/// Which path the socket opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Endpoint {
    /// `/v1/streaming/{connectionId}` (current).
    #[default]
    Streaming,
    /// `/v1/realtime/insights/{connectionId}` (legacy, used by every SDK).
    RealtimeInsights,
}

/// Timing and buffering of sessions; the defaults suit a live call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamingOptions {
    /// Which path to open. Default [`Endpoint::Streaming`].
    pub endpoint: Endpoint,
    /// Interval of WebSocket pings; zero sends none. Default 30 s (as the Go SDK).
    pub ping_interval: Duration,
    /// Limit on the WebSocket handshake. Default 45 s (as the Go SDK).
    pub handshake_timeout: Duration,
    /// Limit on waiting for Symbl to acknowledge the `start_request`. Default 30 s.
    pub start_timeout: Duration,
    /// Limit on waiting for the end after the `stop_request`. Default 60 s.
    pub stop_timeout: Duration,
    /// Frames buffered for [`StreamingSession::next_event`] before the socket is no longer
    /// read. Default 256.
    pub event_buffer: usize,
}

impl Default for StreamingOptions {
    fn default() -> Self {
        StreamingOptions {
            endpoint: Endpoint::Streaming,
            ping_interval: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(45),
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(60),
            event_buffer: 256,
        }
    }
}

/// Opens Streaming API sessions for one Symbl app; cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamingClient {
    ws_base: String,
    auth: Arc<SymblAuth>,
    options: StreamingOptions,
}

impl StreamingClient {
    /// A client for `config`'s WebSocket base ([`SymblConfig::ws_base`]) with tokens from `auth`.
    pub fn new(config: &SymblConfig, auth: Arc<SymblAuth>) -> Self {
        StreamingClient {
            ws_base: config.ws_base(),
            auth,
            options: StreamingOptions::default(),
        }
    }

    /// The same client with other options.
    pub fn with_options(mut self, options: StreamingOptions) -> Self {
        self.options = options;
        self
    }

    /// The socket URL for `connection_id`, without the token.
    pub fn url(&self, connection_id: &str) -> String {
        let path = match self.options.endpoint {
            Endpoint::Streaming => "v1/streaming",
            Endpoint::RealtimeInsights => "v1/realtime/insights",
        };
        format!("{}/{path}/{}", self.ws_base, encode(connection_id))
    }

    /// Opens a session on `connection_id` (sockets sharing it join one conversation, one per
    /// speaker), sends `start` and waits until Symbl acknowledges it (`started_listening`,
    /// `recognition_started` or `conversation_created`). The frames received meanwhile are the
    /// session's first events.
    ///
    /// A 401/403 on the handshake is retried once with a freshly fetched token.
    ///
    /// # Errors
    /// [`StreamingError::InvalidStart`] before any network use; [`StreamingError::Auth`],
    /// [`StreamingError::TokenRejected`], [`StreamingError::HandshakeRefused`],
    /// [`StreamingError::Connect`], [`StreamingError::HandshakeTimedOut`] for the handshake;
    /// [`StreamingError::StartRefused`], [`StreamingError::ClosedBeforeStart`],
    /// [`StreamingError::StartTimedOut`] for the start.
    pub async fn start(
        &self,
        connection_id: &str,
        start: &StartRequest,
    ) -> Result<StreamingSession, StreamingError> {
        start.validate()?;
        if connection_id.trim().is_empty() {
            return Err(StreamingError::EmptyConnectionId);
        }
        let url = self.url(connection_id);
        let mut ws = match self.handshake(&url).await {
            Err(StreamingError::TokenRejected { status, .. }) => {
                tracing::warn!(
                    status,
                    connection_id,
                    "Symbl rejected the token on the Streaming API; retrying with a new one."
                );
                self.auth.invalidate().await;
                self.handshake(&url).await?
            }
            other => other?,
        };
        ws.send(Message::text(start.to_json().to_string()))
            .await
            .map_err(socket_error)?;

        let after = self.options.start_timeout;
        let deadline = Instant::now() + after;
        let mut early = VecDeque::new();
        let mut conversation_id = None;
        loop {
            let msg = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| StreamingError::StartTimedOut { after })?;
            let text = match msg {
                None => {
                    return Err(StreamingError::ClosedBeforeStart {
                        code: None,
                        reason: String::new(),
                    });
                }
                Some(Err(e)) => {
                    return Err(match socket_error(e) {
                        StreamingError::Dropped => StreamingError::ClosedBeforeStart {
                            code: None,
                            reason: String::new(),
                        },
                        e => e,
                    });
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(StreamingError::ClosedBeforeStart {
                        code: frame.as_ref().map(|f| u16::from(f.code)),
                        reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                    });
                }
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
            };
            let event = classify(text.as_str());
            if let StreamingEvent::Error(e) = event {
                return Err(StreamingError::StartRefused(e));
            }
            if let Some(v) = event.json() {
                conversation_id = learned_conversation_id(v).or(conversation_id);
            }
            let acknowledged = matches!(
                event.message_type(),
                Some("started_listening" | "recognition_started" | "conversation_created")
            );
            early.push_back(event);
            if acknowledged {
                break;
            }
        }
        tracing::info!(connection_id, url = %url, "Symbl streaming session started.");

        let (commands_tx, commands) = mpsc::channel(COMMAND_BUFFER);
        let (events_tx, events) = mpsc::channel(self.options.event_buffer.max(1));
        let (conversation_tx, conversation) = watch::channel(conversation_id);
        let driver = Driver {
            ws,
            commands,
            events: Some(events_tx),
            pending: early,
            conversation: conversation_tx,
            ping_interval: self.options.ping_interval,
            stop_timeout: self.options.stop_timeout,
            connection_id: connection_id.to_owned(),
        };
        Ok(StreamingSession {
            audio: AudioSender {
                commands: commands_tx,
                stopping: Arc::new(AtomicBool::new(false)),
            },
            events,
            conversation,
            connection_id: connection_id.to_owned(),
            task: tokio::spawn(driver.run()),
        })
    }

    async fn handshake(&self, url: &str) -> Result<Ws, StreamingError> {
        let token = self.auth.token().await?;
        let after = self.options.handshake_timeout;
        tokio::time::timeout(after, connect(url, &token))
            .await
            .map_err(|_| StreamingError::HandshakeTimedOut {
                url: url.to_owned(),
                after,
            })?
    }
}

/// Opens `url` with the token both as `?access_token=` and as `X-API-KEY` (reference §8.2).
async fn connect(url: &str, token: &Secret) -> Result<Ws, StreamingError> {
    // wss:// needs a rustls provider; installing twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let failed = |e: tungstenite::Error| StreamingError::Connect {
        url: url.to_owned(),
        source: Box::new(e),
    };
    let mut request = format!("{url}?access_token={}", encode(token.expose()))
        .into_client_request()
        .map_err(failed)?;
    let mut key = tungstenite::http::HeaderValue::from_str(token.expose())
        .map_err(|e| failed(tungstenite::Error::HttpFormat(e.into())))?;
    key.set_sensitive(true);
    request.headers_mut().insert("X-API-KEY", key);
    match tokio_tungstenite::connect_async_with_config(request, Some(socket_config()), true).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let url = url.to_owned();
            Err(if matches!(status, 401 | 403) {
                StreamingError::TokenRejected { status, url }
            } else {
                StreamingError::HandshakeRefused { status, url }
            })
        }
        Err(e) => Err(failed(e)),
    }
}

/// A session's socket buffers: those of every socket to Symbl (tungstenite's 128 KiB defaults
/// would cost about 270 KiB per call with two tracks).
fn socket_config() -> WebSocketConfig {
    crate::socket::config()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum Command {
    Audio(Bytes),
    Stop,
}

/// Sends a session's audio from another task; cheap to clone.
#[derive(Debug, Clone)]
pub struct AudioSender {
    commands: mpsc::Sender<Command>,
    stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Audio(a) => write!(f, "Audio({} bytes)", a.len()),
            Command::Stop => f.write_str("Stop"),
        }
    }
}

impl AudioSender {
    /// Queues `audio` (raw samples in the session's encoding) as binary frames of at most
    /// [`MAX_AUDIO_FRAME`] bytes; waits while the queue is full. Empty audio sends nothing.
    ///
    /// # Errors
    /// [`StreamingError::AudioAfterStop`] after [`StreamingSession::stop`];
    /// [`StreamingError::SessionEnded`] when the socket is gone.
    pub async fn send(&self, audio: &[u8]) -> Result<(), StreamingError> {
        for chunk in audio.chunks(MAX_AUDIO_FRAME) {
            self.send_chunk(Bytes::copy_from_slice(chunk)).await?;
        }
        Ok(())
    }

    /// Queues one chunk of at most [`MAX_AUDIO_FRAME`] bytes as one binary frame, without
    /// copying it (longer chunks are split, still without copying). Cancel-safe: when the
    /// future is dropped before it completes, nothing was queued.
    ///
    /// # Errors
    /// As [`AudioSender::send`].
    pub async fn send_chunk(&self, chunk: Bytes) -> Result<(), StreamingError> {
        if chunk.len() > MAX_AUDIO_FRAME {
            let mut rest = chunk;
            while !rest.is_empty() {
                let part = rest.split_to(rest.len().min(MAX_AUDIO_FRAME));
                Box::pin(self.send_chunk(part)).await?;
            }
            return Ok(());
        }
        if chunk.is_empty() {
            return Ok(());
        }
        if self.stopping.load(Ordering::SeqCst) {
            return Err(StreamingError::AudioAfterStop);
        }
        self.commands
            .send(Command::Audio(chunk))
            .await
            .map_err(|_| StreamingError::SessionEnded)
    }
}

/// A started Streaming API session. Dropping it (and every [`AudioSender`] taken from it) sends
/// the `stop_request` and lets the socket close in the background, within
/// [`StreamingOptions::stop_timeout`]; [`StreamingSession::finish`] does the same and says how
/// the session ended.
#[derive(Debug)]
pub struct StreamingSession {
    audio: AudioSender,
    events: mpsc::Receiver<StreamingEvent>,
    conversation: watch::Receiver<Option<String>>,
    connection_id: String,
    task: JoinHandle<Ended>,
}

/// How a session's task ended, and the audio it had been given but had not written when its
/// socket failed.
#[derive(Debug)]
struct Ended {
    result: Result<SessionEnd, StreamingError>,
    unsent: Vec<Bytes>,
}

impl StreamingSession {
    /// The connection id the session was opened on.
    pub fn connection_id(&self) -> &str {
        &self.connection_id
    }

    /// The Symbl conversation id, once Symbl has sent it (`conversation_created` or
    /// `recognition_started`).
    pub fn conversation_id(&self) -> Option<String> {
        self.conversation.borrow().clone()
    }

    /// Waits until the conversation id is known; `None` when the session ended without one.
    pub async fn wait_conversation_id(&self) -> Option<String> {
        let mut rx = self.conversation.clone();
        let found = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|id| id.clone());
        found.or_else(|| rx.borrow().clone())
    }

    /// Sends audio; see [`AudioSender::send`].
    ///
    /// # Errors
    /// As [`AudioSender::send`].
    pub async fn send_audio(&self, audio: &[u8]) -> Result<(), StreamingError> {
        self.audio.send(audio).await
    }

    /// A handle to send audio from another task.
    pub fn audio_sender(&self) -> AudioSender {
        self.audio.clone()
    }

    /// The next frame from Symbl; `None` once the session has ended (then call
    /// [`StreamingSession::finish`]). Keep calling it: when events are not taken, the socket
    /// is no longer read.
    pub async fn next_event(&mut self) -> Option<StreamingEvent> {
        self.events.recv().await
    }

    /// Sends `{"type":"stop_request"}` after the audio already queued; idempotent. The events
    /// continue until Symbl completes the conversation or closes the socket.
    ///
    /// # Errors
    /// [`StreamingError::SessionEnded`] when the socket is already gone.
    pub async fn stop(&self) -> Result<(), StreamingError> {
        if self.audio.stopping.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.audio
            .commands
            .send(Command::Stop)
            .await
            .map_err(|_| StreamingError::SessionEnded)
    }

    /// Stops (if not done yet), drops the events not yet taken and waits for the end.
    ///
    /// # Errors
    /// [`StreamingError::Dropped`] or [`StreamingError::Socket`] when the socket failed,
    /// [`StreamingError::StopTimedOut`] when Symbl did not end the conversation in time.
    pub async fn finish(self) -> Result<SessionEnd, StreamingError> {
        self.finish_with_unsent().await.0
    }

    /// [`StreamingSession::finish`], also handing back the audio queued with
    /// [`AudioSender::send_chunk`] that was never written because the socket failed (in the
    /// order it was queued), so that a reconnected session can send it: nothing the caller
    /// queued is lost to a dropped socket. Empty when the session ended normally.
    pub async fn finish_with_unsent(self) -> (Result<SessionEnd, StreamingError>, Vec<Bytes>) {
        let StreamingSession {
            audio,
            events,
            task,
            ..
        } = self;
        drop(events);
        if !audio.stopping.swap(true, Ordering::SeqCst) {
            // A send error means the task is over; its result says why.
            let _ = audio.commands.send(Command::Stop).await;
        }
        drop(audio);
        match task.await {
            Ok(Ended { result, unsent }) => (result, unsent),
            Err(_) => (Err(StreamingError::TaskPanicked), Vec::new()),
        }
    }
}

/// The task that owns a session's socket.
struct Driver {
    ws: Ws,
    commands: mpsc::Receiver<Command>,
    /// `None` once the session no longer takes events (they are then dropped).
    events: Option<mpsc::Sender<StreamingEvent>>,
    /// Frames read but not yet taken; the socket is read only when this is empty.
    pending: VecDeque<StreamingEvent>,
    conversation: watch::Sender<Option<String>>,
    ping_interval: Duration,
    stop_timeout: Duration,
    connection_id: String,
}

impl Driver {
    async fn run(mut self) -> Ended {
        let mut failed_chunk = None;
        let result = self.drive(&mut failed_chunk).await;
        match &result {
            Ok(end) => {
                tracing::info!(connection_id = %self.connection_id, end = ?end, "Symbl streaming session ended.");
            }
            Err(e) => {
                tracing::warn!(connection_id = %self.connection_id, error = %e, "Symbl streaming session failed.");
            }
        }
        // The audio not written: the chunk whose write failed, then what is still queued.
        let mut unsent = Vec::new();
        if result.is_err() {
            unsent.extend(failed_chunk);
            self.commands.close();
            while let Ok(command) = self.commands.try_recv() {
                if let Command::Audio(chunk) = command {
                    unsent.push(chunk);
                }
            }
        }
        Ended { result, unsent }
    }

    async fn drive(
        &mut self,
        failed_chunk: &mut Option<Bytes>,
    ) -> Result<SessionEnd, StreamingError> {
        let mut ping = (!self.ping_interval.is_zero()).then(|| {
            let mut i =
                tokio::time::interval_at(Instant::now() + self.ping_interval, self.ping_interval);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let mut stop_deadline: Option<Instant> = None;
        let mut commands_open = true;
        let mut completed = false;
        loop {
            if self.events.is_none() {
                self.pending.clear();
            }
            if completed && self.pending.is_empty() {
                close(&mut self.ws).await;
                return Ok(SessionEnd::Completed {
                    conversation_id: self.conversation.borrow().clone(),
                });
            }
            tokio::select! {
                permit = reserve(self.events.clone()), if !self.pending.is_empty() => {
                    let delivered = match (permit, self.pending.pop_front()) {
                        (Some(permit), Some(event)) => {
                            permit.send(event);
                            true
                        }
                        _ => false,
                    };
                    if !delivered {
                        self.events = None;
                    }
                }
                command = self.commands.recv(), if commands_open => match command {
                    Some(Command::Audio(chunk)) if stop_deadline.is_none() => {
                        // A cheap handle kept until the write is done: if it fails, the chunk
                        // goes back to the caller unsent.
                        *failed_chunk = Some(chunk.clone());
                        self.ws.send(Message::Binary(chunk)).await.map_err(socket_error)?;
                        *failed_chunk = None;
                    }
                    Some(Command::Audio(_)) => {
                        tracing::debug!("Dropped audio queued after the stop_request.");
                    }
                    // A dropped session stops the conversation, so Symbl finalises it.
                    Some(Command::Stop) | None => {
                        commands_open = command.is_some();
                        if stop_deadline.is_none() {
                            self.ws.send(Message::text(STOP_REQUEST)).await.map_err(socket_error)?;
                            stop_deadline = Some(Instant::now() + self.stop_timeout);
                            tracing::debug!(connection_id = %self.connection_id, "Sent the stop_request.");
                        }
                    }
                },
                () = tick(ping.as_mut()) => {
                    self.ws.send(Message::Ping(Vec::new().into())).await.map_err(socket_error)?;
                }
                () = sleep_until(stop_deadline) => {
                    close(&mut self.ws).await;
                    return Err(StreamingError::StopTimedOut { after: self.stop_timeout });
                }
                msg = self.ws.next(), if self.pending.is_empty() => match msg {
                    None => return Err(StreamingError::Dropped),
                    Some(Err(e)) => return Err(socket_error(e)),
                    Some(Ok(Message::Text(text))) => {
                        let event = classify(text.as_str());
                        match &event {
                            StreamingEvent::Error(e) => {
                                tracing::warn!(connection_id = %self.connection_id, error = %e, "Symbl sent an error frame.");
                            }
                            StreamingEvent::Malformed { reason, .. } => {
                                tracing::debug!(connection_id = %self.connection_id, error = %reason, "Symbl sent a text frame that is not JSON.");
                            }
                            StreamingEvent::Frame(_) => {}
                        }
                        if let Some(id) = event.json().and_then(learned_conversation_id) {
                            self.conversation.send_if_modified(|c| {
                                let changed = c.as_deref() != Some(id.as_str());
                                *c = Some(id);
                                changed
                            });
                        }
                        completed |= event.message_type() == Some("conversation_completed");
                        self.pending.push_back(event);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        close(&mut self.ws).await;
                        return Ok(SessionEnd::ClosedByServer {
                            code: frame.as_ref().map(|f| u16::from(f.code)),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                            conversation_id: self.conversation.borrow().clone(),
                        });
                    }
                    // Pongs, pings (answered by tungstenite) and binary frames carry nothing.
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}

/// Room for one event (an owned permit, so that `select!` holds no borrow of the sender).
async fn reserve(
    events: Option<mpsc::Sender<StreamingEvent>>,
) -> Option<mpsc::OwnedPermit<StreamingEvent>> {
    events?.reserve_owned().await.ok()
}

async fn tick(ping: Option<&mut tokio::time::Interval>) {
    match ping {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Closes the socket politely, waiting briefly for the peer's close frame.
async fn close(ws: &mut Ws) {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}
