//! The Streaming API client: audio in, Symbl's JSON frames out, on one WebSocket per speaker
//! (`wss://api.symbl.ai/v1/streaming/{connectionId}`, wire-format reference §2).
//!
//! A session goes through three steps, and the types make them happen in order:
//! 1. [`StreamingClient::start`] validates the [`StartRequest`] locally (MULAW only at 8000 Hz,
//!    …), opens the socket with the token as `?access_token=` *and* the `X-API-KEY` header,
//!    sends the `start_request` and waits until Symbl acknowledges it. Only then does it return
//!    a [`StreamingSession`], so audio cannot be sent before the start.
//! 2. [`StreamingSession::send_audio`] sends binary frames of at most [`MAX_AUDIO_FRAME`] bytes;
//!    [`StreamingSession::next_event`] hands over every text frame, parsed
//!    ([`StreamingEvent`]), for `prompter_core::event::parse_frame`. A WebSocket ping goes out
//!    every 30 s.
//! 3. [`StreamingSession::stop`] sends `{"type":"stop_request"}`; the events continue until
//!    Symbl sends `conversation_completed` or closes the socket, then
//!    [`StreamingSession::finish`] says how the session ended ([`SessionEnd`]).
//!
//! It owns the socket and the session's lifecycle; it does not own what the frames mean
//! (`prompter_core::event`) nor where the audio comes from (the Twilio bridge).
//!
//! One task per session owns the socket: it writes the queued audio and control messages,
//! pings, and reads frames into a bounded channel. When that channel is full it stops reading
//! the socket (TCP pushes back on Symbl) but keeps writing audio, so a slow reader of events
//! never stalls the audio.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prompter_core::secret::Secret;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message, client::IntoClientRequest};

use crate::auth::{AuthError, SymblAuth};
use crate::config::{SymblConfig, TrackerSpec};

/// The largest binary audio message the Streaming API accepts (reference §2.1); larger buffers
/// are split.
pub const MAX_AUDIO_FRAME: usize = 8_192;

/// The `stop_request`, as JSON (the Python SDK's `str(dict)` is not JSON; reference §2.3).
const STOP_REQUEST: &str = r#"{"type":"stop_request"}"#;
/// Audio chunks queued towards the socket task; at 8 KiB each, about half a second of 8 kHz
/// μ-law per slot, so a short burst never blocks the caller.
const COMMAND_BUFFER: usize = 64;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

// ---------------------------------------------------------------------------------------------
// start_request
// ---------------------------------------------------------------------------------------------

/// An audio encoding the Streaming API accepts (`config.speechRecognition.encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioEncoding {
    /// 16-bit signed little-endian PCM, 8000–48000 Hz.
    Linear16,
    /// FLAC, 16000 Hz or more.
    Flac,
    /// G.711 μ-law, 8000 Hz only (Twilio Media Streams).
    Mulaw,
    /// Opus, 16000–48000 Hz.
    Opus,
}

impl AudioEncoding {
    /// The name on the wire (`LINEAR16`, `FLAC`, `MULAW`, `Opus`).
    pub fn as_str(self) -> &'static str {
        match self {
            AudioEncoding::Linear16 => "LINEAR16",
            AudioEncoding::Flac => "FLAC",
            AudioEncoding::Mulaw => "MULAW",
            AudioEncoding::Opus => "Opus",
        }
    }

    /// The sample rates Symbl accepts for this encoding, for messages.
    fn allowed_rates(self) -> (&'static str, std::ops::RangeInclusive<u32>) {
        match self {
            AudioEncoding::Linear16 => ("8000–48000 Hz", 8_000..=48_000),
            AudioEncoding::Flac => ("16000 Hz or more", 16_000..=u32::MAX),
            AudioEncoding::Mulaw => ("8000 Hz", 8_000..=8_000),
            AudioEncoding::Opus => ("16000–48000 Hz", 16_000..=48_000),
        }
    }
}

impl std::fmt::Display for AudioEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An insight type to ask for (`insightTypes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsightType {
    /// `question`.
    Question,
    /// `action_item`.
    ActionItem,
    /// `follow_up`.
    FollowUp,
    /// `topic` (the Go SDK asks for it; topics also come without it).
    Topic,
}

impl InsightType {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            InsightType::Question => "question",
            InsightType::ActionItem => "action_item",
            InsightType::FollowUp => "follow_up",
            InsightType::Topic => "topic",
        }
    }
}

/// Who speaks on this socket (`speaker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speaker {
    /// `userId`: an email address or, on a phone call, the caller's number.
    pub user_id: String,
    /// `name`: a display name.
    pub name: String,
}

impl Speaker {
    /// A speaker.
    pub fn new(user_id: impl Into<String>, name: impl Into<String>) -> Self {
        Speaker {
            user_id: user_id.into(),
            name: name.into(),
        }
    }
}

/// Why a [`StartRequest`] cannot be sent; found before anything goes on the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[must_use]
pub enum StartRequestError {
    /// The sample rate does not fit the encoding (MULAW is 8000 Hz only).
    #[error("`{encoding}` audio must be sampled at {allowed}, not {hz} Hz")]
    SampleRate {
        /// The encoding.
        encoding: AudioEncoding,
        /// The rate asked for.
        hz: u32,
        /// The rates Symbl accepts for the encoding.
        allowed: &'static str,
    },
    /// `confidenceThreshold` is outside 0.5–1.0.
    #[error("`confidenceThreshold` must be between 0.5 and 1.0, not {0}")]
    ConfidenceThreshold(f64),
    /// `languageCode` is empty.
    #[error("`languageCode` must not be empty (e.g. `en-US`)")]
    EmptyLanguageCode,
    /// A timeout is outside 0–1800 seconds.
    #[error("`{field}` must be between 0 and 1800 seconds, not {secs}")]
    Timeout {
        /// `noConnectionTimeout` or `disconnectOnStopRequestTimeout`.
        field: &'static str,
        /// The value asked for.
        secs: u32,
    },
    /// An ad-hoc tracker has no name or no phrase.
    #[error("tracker #{index} (`{name}`) needs a name and at least one vocabulary phrase")]
    Tracker {
        /// Its position in `trackers`, from 0.
        index: usize,
        /// Its name (possibly empty).
        name: String,
    },
}

/// The `start_request` message: what to recognise and which results to send (reference §2.2).
///
/// Built with [`StartRequest::new`] or [`StartRequest::twilio`] and the setters; it is checked
/// again in full by [`StartRequest::validate`] before it is sent.
///
/// # Examples
/// ```
/// use prompter_symbl::streaming::{Speaker, StartRequest};
/// let start = StartRequest::twilio(Speaker::new("+14155550100", "Caller"))
///     .meeting_title("Support call");
/// let json = start.to_json();
/// assert_eq!(json["config"]["speechRecognition"]["encoding"], "MULAW");
/// assert_eq!(json["config"]["speechRecognition"]["sampleRateHertz"], 8000);
/// assert_eq!(json["config"]["trackers"]["interimResults"], true);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StartRequest {
    insight_types: Vec<InsightType>,
    confidence_threshold: f64,
    language_code: String,
    encoding: AudioEncoding,
    sample_rate_hertz: u32,
    meeting_title: Option<String>,
    timezone_offset_minutes: Option<i32>,
    sentiment: Option<bool>,
    enable_all_trackers: bool,
    interim_results: bool,
    trackers: Vec<TrackerSpec>,
    speaker: Option<Speaker>,
    no_connection_timeout_secs: Option<u32>,
    disconnect_on_stop_request: Option<bool>,
    disconnect_on_stop_request_timeout_secs: Option<u32>,
}

impl StartRequest {
    /// A request for `encoding` at `sample_rate_hertz`, with Symbl's defaults: questions,
    /// action items and follow-ups, confidence 0.5, `en-US`, all account trackers, final
    /// tracker results only.
    ///
    /// # Errors
    /// [`StartRequestError::SampleRate`] when the rate does not fit the encoding (MULAW is
    /// 8000 Hz only; LINEAR16 8000–48000; FLAC ≥ 16000; Opus 16000–48000).
    pub fn new(encoding: AudioEncoding, sample_rate_hertz: u32) -> Result<Self, StartRequestError> {
        let (allowed, range) = encoding.allowed_rates();
        if !range.contains(&sample_rate_hertz) {
            return Err(StartRequestError::SampleRate {
                encoding,
                hz: sample_rate_hertz,
                allowed,
            });
        }
        Ok(Self::with_defaults(encoding, sample_rate_hertz))
    }

    /// A request for a Twilio Media Stream: 8 kHz μ-law (`MULAW`/8000), tracker results as soon
    /// as they are detected (`interimResults: true`), and `speaker` for the socket's audio.
    pub fn twilio(speaker: Speaker) -> Self {
        StartRequest {
            interim_results: true,
            speaker: Some(speaker),
            ..Self::with_defaults(AudioEncoding::Mulaw, 8_000)
        }
    }

    /// Symbl's defaults, for a rate already checked.
    fn with_defaults(encoding: AudioEncoding, sample_rate_hertz: u32) -> Self {
        StartRequest {
            insight_types: vec![
                InsightType::Question,
                InsightType::ActionItem,
                InsightType::FollowUp,
            ],
            confidence_threshold: 0.5,
            language_code: "en-US".to_owned(),
            encoding,
            sample_rate_hertz,
            meeting_title: None,
            timezone_offset_minutes: None,
            sentiment: None,
            enable_all_trackers: true,
            interim_results: false,
            trackers: Vec::new(),
            speaker: None,
            no_connection_timeout_secs: None,
            disconnect_on_stop_request: None,
            disconnect_on_stop_request_timeout_secs: None,
        }
    }

    /// `insightTypes` (an empty list asks for none).
    pub fn insight_types(mut self, types: impl IntoIterator<Item = InsightType>) -> Self {
        self.insight_types = types.into_iter().collect();
        self
    }

    /// `config.confidenceThreshold`, 0.5–1.0.
    pub fn confidence_threshold(mut self, threshold: f64) -> Self {
        self.confidence_threshold = threshold;
        self
    }

    /// `config.languageCode` (BCP-47).
    pub fn language_code(mut self, code: impl Into<String>) -> Self {
        self.language_code = code.into();
        self
    }

    /// `config.meetingTitle`.
    pub fn meeting_title(mut self, title: impl Into<String>) -> Self {
        self.meeting_title = Some(title.into());
        self
    }

    /// `config.timezoneOffset`, in minutes.
    pub fn timezone_offset_minutes(mut self, minutes: i32) -> Self {
        self.timezone_offset_minutes = Some(minutes);
        self
    }

    /// `config.sentiment`: sentiment on messages and topics.
    pub fn sentiment(mut self, on: bool) -> Self {
        self.sentiment = Some(on);
        self
    }

    /// `config.trackers.enableAllTrackers`: use every tracker of the account.
    pub fn enable_all_trackers(mut self, on: bool) -> Self {
        self.enable_all_trackers = on;
        self
    }

    /// `config.trackers.interimResults`: tracker results before the transcript is final.
    pub fn interim_results(mut self, on: bool) -> Self {
        self.interim_results = on;
        self
    }

    /// The top-level `trackers`: ad-hoc trackers for this stream only.
    pub fn trackers(mut self, trackers: impl IntoIterator<Item = TrackerSpec>) -> Self {
        self.trackers = trackers.into_iter().collect();
        self
    }

    /// `speaker`: whose audio this socket carries.
    pub fn speaker(mut self, speaker: Speaker) -> Self {
        self.speaker = Some(speaker);
        self
    }

    /// `noConnectionTimeout`, 0–1800 seconds (an integer on the wire, not the Go SDK's bool).
    pub fn no_connection_timeout_secs(mut self, secs: u32) -> Self {
        self.no_connection_timeout_secs = Some(secs);
        self
    }

    /// `disconnectOnStopRequest` (default true: Symbl closes the socket after the stop) and,
    /// when given, `disconnectOnStopRequestTimeout` in seconds (0–1800).
    pub fn disconnect_on_stop_request(mut self, on: bool, timeout_secs: Option<u32>) -> Self {
        self.disconnect_on_stop_request = Some(on);
        self.disconnect_on_stop_request_timeout_secs = timeout_secs;
        self
    }

    /// The audio encoding.
    pub fn encoding(&self) -> AudioEncoding {
        self.encoding
    }

    /// The sample rate, in Hz.
    pub fn sample_rate_hertz(&self) -> u32 {
        self.sample_rate_hertz
    }

    /// Checks every field against the documented limits.
    ///
    /// # Errors
    /// The first [`StartRequestError`] found.
    pub fn validate(&self) -> Result<(), StartRequestError> {
        let (allowed, range) = self.encoding.allowed_rates();
        if !range.contains(&self.sample_rate_hertz) {
            return Err(StartRequestError::SampleRate {
                encoding: self.encoding,
                hz: self.sample_rate_hertz,
                allowed,
            });
        }
        if !(0.5..=1.0).contains(&self.confidence_threshold) {
            return Err(StartRequestError::ConfidenceThreshold(
                self.confidence_threshold,
            ));
        }
        if self.language_code.trim().is_empty() {
            return Err(StartRequestError::EmptyLanguageCode);
        }
        for (field, secs) in [
            ("noConnectionTimeout", self.no_connection_timeout_secs),
            (
                "disconnectOnStopRequestTimeout",
                self.disconnect_on_stop_request_timeout_secs,
            ),
        ] {
            if let Some(secs) = secs.filter(|s| *s > 1_800) {
                return Err(StartRequestError::Timeout { field, secs });
            }
        }
        for (index, t) in self.trackers.iter().enumerate() {
            let blank = t.vocabulary.iter().all(|p| p.trim().is_empty());
            if t.name.trim().is_empty() || blank {
                return Err(StartRequestError::Tracker {
                    index,
                    name: t.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// The message as sent: `type`, `insightTypes`, `config` (`confidenceThreshold`,
    /// `languageCode`, `speechRecognition`, `meetingTitle`, `timezoneOffset`, `sentiment`,
    /// `trackers`), `trackers`, `speaker`, `noConnectionTimeout`, `disconnectOnStopRequest`,
    /// `disconnectOnStopRequestTimeout`. Unset optional fields are left out.
    pub fn to_json(&self) -> Value {
        let mut config = json!({
            "confidenceThreshold": self.confidence_threshold,
            "languageCode": self.language_code,
            "speechRecognition": {
                "encoding": self.encoding.as_str(),
                "sampleRateHertz": self.sample_rate_hertz,
            },
            "trackers": {
                "enableAllTrackers": self.enable_all_trackers,
                "interimResults": self.interim_results,
            },
        });
        if let Some(t) = &self.meeting_title {
            config["meetingTitle"] = json!(t);
        }
        if let Some(m) = self.timezone_offset_minutes {
            config["timezoneOffset"] = json!(m);
        }
        if let Some(s) = self.sentiment {
            config["sentiment"] = json!(s);
        }
        let insight_types: Vec<&str> = self.insight_types.iter().map(|t| t.as_str()).collect();
        let mut msg = json!({
            "type": "start_request",
            "insightTypes": insight_types,
            "config": config,
        });
        if !self.trackers.is_empty() {
            msg["trackers"] = Value::Array(
                self.trackers
                    .iter()
                    .map(|t| json!({"name": t.name, "vocabulary": t.vocabulary}))
                    .collect(),
            );
        }
        if let Some(s) = &self.speaker {
            msg["speaker"] = json!({"userId": s.user_id, "name": s.name});
        }
        if let Some(secs) = self.no_connection_timeout_secs {
            msg["noConnectionTimeout"] = json!(secs);
        }
        if let Some(on) = self.disconnect_on_stop_request {
            msg["disconnectOnStopRequest"] = json!(on);
        }
        if let Some(secs) = self.disconnect_on_stop_request_timeout_secs {
            msg["disconnectOnStopRequestTimeout"] = json!(secs);
        }
        msg
    }
}

// ---------------------------------------------------------------------------------------------
// Events, outcomes, errors
// ---------------------------------------------------------------------------------------------

/// An error Symbl reported in a frame: top-level `{"type":"error","message","details"}` or
/// nested `{"type":"message","message":{"type":"error",…}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceError {
    /// Symbl's `message` (`"(no message)"` when absent).
    pub message: String,
    /// Symbl's `details`, when present.
    pub details: Option<String>,
    /// The whole frame, e.g. for `prompter_core::event::parse_frame`.
    pub frame: Value,
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match &self.details {
            Some(d) if d != &self.message => write!(f, " ({d})"),
            _ => Ok(()),
        }
    }
}

impl std::error::Error for ServiceError {}

/// A text frame from the Streaming API.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamingEvent {
    /// A JSON frame (results and lifecycle messages), as Symbl sent it.
    Frame(Value),
    /// An error frame (top-level or nested).
    Error(ServiceError),
    /// A text frame that is not JSON.
    Malformed {
        /// The text.
        text: String,
        /// Why it is not JSON.
        reason: String,
    },
}

impl StreamingEvent {
    /// The frame's JSON (error frames included), for `prompter_core::event::parse_frame`.
    pub fn json(&self) -> Option<&Value> {
        match self {
            StreamingEvent::Frame(v) => Some(v),
            StreamingEvent::Error(e) => Some(&e.frame),
            StreamingEvent::Malformed { .. } => None,
        }
    }

    /// The frame's JSON by value; see [`StreamingEvent::json`].
    pub fn into_json(self) -> Option<Value> {
        match self {
            StreamingEvent::Frame(v) => Some(v),
            StreamingEvent::Error(e) => Some(e.frame),
            StreamingEvent::Malformed { .. } => None,
        }
    }

    /// `message.type` of a `{"type":"message"}` frame (`started_listening`,
    /// `conversation_completed`, …).
    pub fn message_type(&self) -> Option<&str> {
        self.json().and_then(message_type)
    }
}

/// How a session ended without a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// Symbl sent `conversation_completed` (after the `stop_request`, or on its own idle
    /// timeout).
    Completed {
        /// The Symbl conversation id, when Symbl sent one.
        conversation_id: Option<String>,
    },
    /// Symbl closed the socket with a close frame, without `conversation_completed`.
    ClosedByServer {
        /// The close code, when given.
        code: Option<u16>,
        /// The close reason (often empty).
        reason: String,
        /// The Symbl conversation id, when Symbl sent one.
        conversation_id: Option<String>,
    },
}

/// Why a Streaming API session could not start or did not end cleanly. Never carries the token.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum StreamingError {
    /// The `start_request` breaks a documented limit; nothing was sent.
    #[error("invalid `start_request`: {0}")]
    InvalidStart(#[from] StartRequestError),
    /// The connection id is empty.
    #[error("the Streaming API connection id must not be empty")]
    EmptyConnectionId,
    /// No token could be had.
    #[error("no Symbl access token for the Streaming API: {0}")]
    Auth(#[from] AuthError),
    /// The upgrade was answered 401/403, even with a freshly fetched token.
    #[error(
        "Symbl rejected the access token on the Streaming API handshake to `{url}` (HTTP {status}); check the app id and secret"
    )]
    TokenRejected {
        /// The HTTP status.
        status: u16,
        /// The URL, without the token.
        url: String,
    },
    /// The upgrade was answered with another HTTP status.
    #[error("Symbl refused the Streaming API handshake to `{url}` with HTTP {status}")]
    HandshakeRefused {
        /// The HTTP status.
        status: u16,
        /// The URL, without the token.
        url: String,
    },
    /// The socket could not be opened (DNS, TCP, TLS, a bad URL).
    #[error("cannot open the Streaming API WebSocket `{url}`: {source}")]
    Connect {
        /// The URL, without the token.
        url: String,
        /// What failed.
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// The handshake took too long.
    #[error("the Streaming API handshake to `{url}` did not finish within {after:?}")]
    HandshakeTimedOut {
        /// The URL, without the token.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// Symbl answered the `start_request` with an error frame.
    #[error("Symbl refused the `start_request`: {0}")]
    StartRefused(ServiceError),
    /// The socket closed before Symbl acknowledged the `start_request`.
    #[error(
        "the Streaming API socket closed before Symbl acknowledged the `start_request`{}",
        close_note(*.code, .reason)
    )]
    ClosedBeforeStart {
        /// The close code, when there was a close frame.
        code: Option<u16>,
        /// The close reason.
        reason: String,
    },
    /// Symbl did not acknowledge the `start_request` in time.
    #[error("Symbl did not acknowledge the `start_request` within {after:?}")]
    StartTimedOut {
        /// The limit.
        after: Duration,
    },
    /// Audio was sent after [`StreamingSession::stop`].
    #[error("audio was sent after the `stop_request`")]
    AudioAfterStop,
    /// The session has ended (the socket is gone); [`StreamingSession::finish`] says why.
    #[error("the Streaming API session has ended; `finish` tells why")]
    SessionEnded,
    /// The socket dropped mid-session without a close frame.
    #[error("the Streaming API socket dropped without a close frame")]
    Dropped,
    /// Reading or writing the socket failed mid-session.
    #[error("the Streaming API socket failed: {source}")]
    Socket {
        /// What failed.
        #[source]
        source: Box<tungstenite::Error>,
    },
    /// Symbl neither completed the conversation nor closed the socket after the stop.
    #[error("Symbl did not end the conversation within {after:?} of the `stop_request`")]
    StopTimedOut {
        /// The limit.
        after: Duration,
    },
    /// The session task panicked (a bug).
    #[error("the Streaming API session task panicked")]
    TaskPanicked,
}

fn close_note(code: Option<u16>, reason: &str) -> String {
    match (code, reason.is_empty()) {
        (None, _) => " (no close frame)".to_owned(),
        (Some(c), true) => format!(" (close code {c})"),
        (Some(c), false) => format!(" (close code {c}: {reason})"),
    }
}

fn socket_error(e: tungstenite::Error) -> StreamingError {
    match e {
        tungstenite::Error::ConnectionClosed
        | tungstenite::Error::AlreadyClosed
        | tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => StreamingError::Dropped,
        e => StreamingError::Socket {
            source: Box::new(e),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

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
    match tokio_tungstenite::connect_async(request).await {
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

/// Sorts a text frame into a [`StreamingEvent`]; never panics.
fn classify(text: &str) -> StreamingEvent {
    let frame: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return StreamingEvent::Malformed {
                text: text.to_owned(),
                reason: e.to_string(),
            };
        }
    };
    let error_fields = if frame.get("type").and_then(Value::as_str) == Some("error") {
        Some(&frame)
    } else if message_type(&frame) == Some("error") {
        frame.get("message")
    } else {
        None
    };
    match error_fields {
        Some(fields) => {
            let text_of = |v: Option<&Value>| match v {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            };
            let message = text_of(fields.get("message"))
                .or_else(|| text_of(fields.pointer("/data/message")))
                .unwrap_or_else(|| "(no message)".to_owned());
            let details = text_of(fields.get("details"));
            StreamingEvent::Error(ServiceError {
                message,
                details,
                frame,
            })
        }
        None => StreamingEvent::Frame(frame),
    }
}

fn message_type(frame: &Value) -> Option<&str> {
    if frame.get("type").and_then(Value::as_str) != Some("message") {
        return None;
    }
    frame.pointer("/message/type").and_then(Value::as_str)
}

/// The conversation id of `conversation_created`, `recognition_started` or
/// `conversation_completed`, at `message.data.conversationId` or `message.conversationId`.
fn learned_conversation_id(frame: &Value) -> Option<String> {
    if !matches!(
        message_type(frame),
        Some("conversation_created" | "recognition_started" | "conversation_completed")
    ) {
        return None;
    }
    let id = frame
        .pointer("/message/data/conversationId")
        .or_else(|| frame.pointer("/message/conversationId"))?;
    match id {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------------

enum Command {
    Audio(Vec<u8>),
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
            if self.stopping.load(Ordering::SeqCst) {
                return Err(StreamingError::AudioAfterStop);
            }
            self.commands
                .send(Command::Audio(chunk.to_vec()))
                .await
                .map_err(|_| StreamingError::SessionEnded)?;
        }
        Ok(())
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
    task: JoinHandle<Result<SessionEnd, StreamingError>>,
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
        task.await.map_err(|_| StreamingError::TaskPanicked)?
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
    async fn run(mut self) -> Result<SessionEnd, StreamingError> {
        let result = self.drive().await;
        match &result {
            Ok(end) => {
                tracing::info!(connection_id = %self.connection_id, end = ?end, "Symbl streaming session ended.");
            }
            Err(e) => {
                tracing::warn!(connection_id = %self.connection_id, error = %e, "Symbl streaming session failed.");
            }
        }
        result
    }

    async fn drive(&mut self) -> Result<SessionEnd, StreamingError> {
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
                        self.ws.send(Message::binary(chunk)).await.map_err(socket_error)?;
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

#[cfg(test)]
mod tests {
    use prompter_fakes::SymblFake;

    use super::*;
    use crate::auth::Credentials;

    /// A guard against a hung test, not a timing assertion.
    const GUARD: Duration = Duration::from_secs(30);

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(GUARD, f).await.expect("the test hung")
    }

    fn auth_for(config: &SymblConfig) -> Arc<SymblAuth> {
        let creds = Credentials::from_lookup(config, |v| match v {
            "SYMBL_APP_ID" => Some("app".into()),
            "SYMBL_APP_SECRET" => Some("s3cret".into()),
            _ => None,
        })
        .unwrap();
        Arc::new(SymblAuth::new(config, creds).unwrap())
    }

    async fn setup() -> (SymblFake, StreamingClient, Arc<SymblAuth>) {
        let fake = SymblFake::start("app", "s3cret").await;
        let config = SymblConfig {
            api_base: fake.api_base.clone(),
            ..SymblConfig::default()
        };
        let auth = auth_for(&config);
        (fake, StreamingClient::new(&config, auth.clone()), auth)
    }

    fn caller() -> Speaker {
        Speaker::new("+14155550100", "Caller")
    }

    /// Takes events until the session ends.
    async fn drain(session: &mut StreamingSession) -> Vec<StreamingEvent> {
        let mut events = Vec::new();
        while let Some(e) = within(session.next_event()).await {
            events.push(e);
        }
        events
    }

    fn types(events: &[StreamingEvent]) -> Vec<&str> {
        events
            .iter()
            .map(|e| {
                e.message_type()
                    .or_else(|| e.json()?.get("type")?.as_str())
                    .unwrap_or("(malformed)")
            })
            .collect()
    }

    #[tokio::test]
    async fn the_twilio_start_request_is_exactly_the_documented_json() {
        let start = StartRequest::twilio(caller())
            .meeting_title("Support call")
            .timezone_offset_minutes(480)
            .sentiment(true)
            .confidence_threshold(0.7)
            .trackers([TrackerSpec {
                name: "Budget Constraints".into(),
                vocabulary: vec!["too expensive".into(), "no budget".into()],
            }])
            .no_connection_timeout_secs(600)
            .disconnect_on_stop_request(true, Some(60));
        let expected = json!({
            "type": "start_request",
            "insightTypes": ["question", "action_item", "follow_up"],
            "config": {
                "confidenceThreshold": 0.7,
                "languageCode": "en-US",
                "speechRecognition": {"encoding": "MULAW", "sampleRateHertz": 8000},
                "meetingTitle": "Support call",
                "timezoneOffset": 480,
                "sentiment": true,
                "trackers": {"enableAllTrackers": true, "interimResults": true}
            },
            "trackers": [{"name": "Budget Constraints", "vocabulary": ["too expensive", "no budget"]}],
            "speaker": {"userId": "+14155550100", "name": "Caller"},
            "noConnectionTimeout": 600,
            "disconnectOnStopRequest": true,
            "disconnectOnStopRequestTimeout": 60
        });
        assert_eq!(start.to_json(), expected);

        let (fake, client, _) = setup().await;
        let session = within(client.start("call-1", &start)).await.unwrap();
        let socket = fake.streaming_socket("call-1").unwrap();
        assert_eq!(socket.start_request, Some(expected));
        assert!(socket.token_in_query && socket.token_in_header && !socket.legacy_path);
        within(session.finish()).await.unwrap();
    }

    #[tokio::test]
    async fn audio_arrives_in_frames_of_at_most_8192_bytes_with_nothing_lost() {
        let (fake, client, _) = setup().await;
        let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        let audio: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        within(session.send_audio(&audio)).await.unwrap();
        within(session.send_audio(&[])).await.unwrap();
        within(session.stop()).await.unwrap();
        drain(&mut session).await;
        within(session.finish()).await.unwrap();

        let socket = fake.streaming_socket("call-1").unwrap();
        assert_eq!(socket.audio_bytes, 20_000);
        assert_eq!(socket.audio_frames, 3); // 8192 + 8192 + 3616
        assert_eq!(socket.max_audio_frame, MAX_AUDIO_FRAME);
        assert_eq!(socket.audio, audio);
        assert_eq!(socket.audio_bytes_before_start, 0);
    }

    #[tokio::test]
    async fn stop_request_then_conversation_completed_ends_the_session() {
        let (fake, client, _) = setup().await;
        let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        within(session.stop()).await.unwrap();
        within(session.stop()).await.unwrap(); // idempotent
        let events = drain(&mut session).await;
        assert_eq!(
            types(&events),
            [
                "started_listening",
                "recognition_started",
                "conversation_created",
                "recognition_stopped",
                "conversation_completed"
            ]
        );
        let id = fake.streaming_conversation_id("call-1");
        assert!(id.is_some());
        assert_eq!(
            within(session.finish()).await.unwrap(),
            SessionEnd::Completed {
                conversation_id: id
            }
        );
        let socket = fake.streaming_socket("call-1").unwrap();
        assert_eq!(socket.control, [json!({"type": "stop_request"})]);
        assert!(socket.stop_requested && socket.closed);
    }

    #[tokio::test]
    async fn the_conversation_id_is_learned_and_shared_by_the_sockets_of_a_connection() {
        let (fake, client, _) = setup().await;
        let agent = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        let id = within(agent.wait_conversation_id()).await;
        assert_eq!(id, fake.streaming_conversation_id("call-1"));
        assert_eq!(agent.conversation_id(), id);
        assert_eq!(agent.connection_id(), "call-1");

        let start = StartRequest::twilio(Speaker::new("+14155550199", "Agent"));
        let other = within(client.start("call-1", &start)).await.unwrap();
        assert_eq!(within(other.wait_conversation_id()).await, id);
        within(agent.finish()).await.unwrap();
        within(other.finish()).await.unwrap();
    }

    #[tokio::test]
    async fn a_rejected_token_is_a_clear_error_without_the_token() {
        // Tokens from one fake are unknown to another.
        let issuer = SymblFake::start("app", "s3cret").await;
        let other = SymblFake::start("app", "s3cret").await;
        let config = SymblConfig {
            api_base: issuer.api_base.clone(),
            ws_base: Some(other.ws_base()),
            ..SymblConfig::default()
        };
        let client = StreamingClient::new(&config, auth_for(&config));
        let err = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            StreamingError::TokenRejected { status: 401, .. }
        ));
        let msg = err.to_string();
        assert_eq!(
            msg,
            format!(
                "Symbl rejected the access token on the Streaming API handshake to `{}/v1/streaming/call-1` (HTTP 401); check the app id and secret",
                other.ws_base()
            )
        );
        assert!(!msg.contains("fake-jwt") && !format!("{err:?}").contains("fake-jwt"));
        // Retried once with a fresh token.
        assert_eq!(issuer.token_calls(), 2);
        assert_eq!(other.streaming_rejected(), 2);
    }

    #[tokio::test]
    async fn an_invalid_start_is_refused_locally_with_a_clear_error() {
        let err = StartRequest::new(AudioEncoding::Mulaw, 16_000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`MULAW` audio must be sampled at 8000 Hz, not 16000 Hz"
        );
        assert!(StartRequest::new(AudioEncoding::Opus, 8_000).is_err());
        assert!(StartRequest::new(AudioEncoding::Linear16, 16_000).is_ok());

        let (fake, client, _) = setup().await;
        let start = StartRequest::twilio(caller()).confidence_threshold(0.3);
        let err = within(client.start("call-1", &start)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `start_request`: `confidenceThreshold` must be between 0.5 and 1.0, not 0.3"
        );
        let start = StartRequest::twilio(caller()).no_connection_timeout_secs(3_600);
        let err = within(client.start("call-1", &start)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid `start_request`: `noConnectionTimeout` must be between 0 and 1800 seconds, not 3600"
        );
        let start = StartRequest::twilio(caller()).trackers([TrackerSpec {
            name: "Empty".into(),
            vocabulary: vec![],
        }]);
        assert!(within(client.start("call-1", &start)).await.is_err());
        let err = within(client.start(" ", &StartRequest::twilio(caller())))
            .await
            .unwrap_err();
        assert!(matches!(err, StreamingError::EmptyConnectionId));
        assert_eq!(fake.streaming_handshakes(), 0);
    }

    #[tokio::test]
    async fn a_start_refused_by_symbl_names_symbls_message() {
        let (fake, client, _) = setup().await;
        fake.refuse_next_streaming_start("sampleRateHertz must be a valid number.");
        let err = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Symbl refused the `start_request`: sampleRateHertz must be a valid number. (No additional details available.)"
        );
    }

    #[tokio::test]
    async fn error_frames_and_garbage_are_events_never_panics() {
        let (fake, client, _) = setup().await;
        let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        within(session.wait_conversation_id()).await;
        fake.push_streaming(
            "call-1",
            json!({"type": "error", "details": "Too many streams.", "message": "Rate limited."}),
        );
        fake.push_streaming(
            "call-1",
            json!({"type": "message", "message": {"type": "error", "message": "Audio decode failed."}}),
        );
        fake.push_streaming_text("call-1", "not json {");
        let tracker = json!({"type": "tracker_response", "isFinal": false, "trackers": [
            {"name": "Budget Constraints", "matches": [{"type": "vocabulary", "value": "too expensive",
             "messageRefs": [{"id": "m1", "text": "That is too expensive.", "offset": 8}], "insightRefs": []}]}]});
        fake.push_streaming("call-1", tracker.clone());
        within(session.stop()).await.unwrap();
        let events = drain(&mut session).await;
        assert_eq!(events.len(), 9, "{events:?}");
        let StreamingEvent::Error(top) = &events[3] else {
            panic!("{:?}", events[3])
        };
        assert_eq!(top.to_string(), "Rate limited. (Too many streams.)");
        let StreamingEvent::Error(nested) = &events[4] else {
            panic!("{:?}", events[4])
        };
        assert_eq!(nested.message, "Audio decode failed.");
        assert_eq!(nested.details, None);
        assert!(
            matches!(&events[5], StreamingEvent::Malformed { text, .. } if text == "not json {")
        );
        assert_eq!(events[6], StreamingEvent::Frame(tracker));
        // Every JSON frame, errors included, can go to the engine's parser.
        for e in &events {
            if let Some(v) = e.json() {
                prompter_core::event::parse_frame("call-1", 0, v.clone()).unwrap();
            }
        }
        within(session.finish()).await.unwrap();
    }

    #[test]
    fn odd_frames_are_classified_without_panicking() {
        for text in [
            "",
            "null",
            "[]",
            "42",
            r#"{"type": 5}"#,
            r#"{"type": "message"}"#,
            r#"{"type": "message", "message": "x"}"#,
            r#"{"type": "message", "message": {"type": ["x"]}}"#,
        ] {
            let e = classify(text);
            assert!(!matches!(e, StreamingEvent::Error(_)), "{text}: {e:?}");
            assert_eq!(e.json().and_then(learned_conversation_id), None);
        }
        let StreamingEvent::Error(e) = classify(r#"{"type": "error"}"#) else {
            panic!()
        };
        assert_eq!(e.to_string(), "(no message)");
        let StreamingEvent::Error(e) =
            classify(r#"{"type":"message","message":{"type":"error","message":{"code":1}}}"#)
        else {
            panic!()
        };
        assert_eq!(e.message, r#"{"code":1}"#);

        let id = |v: Value| learned_conversation_id(&v);
        assert_eq!(
            id(
                json!({"type": "message", "message": {"type": "conversation_completed", "conversationId": "42"}})
            ),
            Some("42".into())
        );
        assert_eq!(
            id(
                json!({"type": "message", "message": {"type": "recognition_started", "data": {"conversationId": 42}}})
            ),
            Some("42".into())
        );
        assert_eq!(
            id(
                json!({"type": "message", "message": {"type": "recognition_result", "data": {"conversationId": "42"}}})
            ),
            None
        );
    }

    #[tokio::test]
    async fn pings_keep_the_socket_alive() {
        let (fake, client, _) = setup().await;
        let client = client.with_options(StreamingOptions {
            ping_interval: Duration::from_millis(20),
            ..StreamingOptions::default()
        });
        let session = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        within(async {
            while fake.streaming_socket("call-1").unwrap().pings < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        within(session.finish()).await.unwrap();
    }

    #[tokio::test]
    async fn the_legacy_path_is_available() {
        let (fake, client, _) = setup().await;
        let client = client.with_options(StreamingOptions {
            endpoint: Endpoint::RealtimeInsights,
            ..StreamingOptions::default()
        });
        assert!(client.url("a b").ends_with("/v1/realtime/insights/a%20b"));
        let session = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        assert!(fake.streaming_socket("call-1").unwrap().legacy_path);
        within(session.finish()).await.unwrap();
    }

    #[tokio::test]
    async fn audio_after_stop_is_an_error_and_dropping_a_session_stops_it() {
        let (fake, client, _) = setup().await;
        let session = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        let audio = session.audio_sender();
        within(session.stop()).await.unwrap();
        let err = within(audio.send(&[0xFF; 160])).await.unwrap_err();
        assert!(matches!(err, StreamingError::AudioAfterStop), "{err}");
        assert!(matches!(
            within(session.finish()).await.unwrap(),
            SessionEnd::Completed { .. }
        ));
        assert_eq!(
            within(audio.send(&[0xFF; 160]))
                .await
                .unwrap_err()
                .to_string(),
            "audio was sent after the `stop_request`"
        );

        let session = within(client.start("call-2", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        drop(session);
        within(async {
            while !fake.streaming_socket("call-2").unwrap().closed {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(fake.streaming_socket("call-2").unwrap().stop_requested);
    }

    #[tokio::test]
    async fn a_dropped_socket_ends_the_session_with_an_error() {
        let (fake, client, _) = setup().await;
        let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
            .await
            .unwrap();
        within(session.wait_conversation_id()).await;
        fake.drop_streaming("call-1");
        drain(&mut session).await;
        let err = within(session.send_audio(&[0; 10])).await.unwrap_err();
        assert!(matches!(err, StreamingError::SessionEnded), "{err}");
        let err = within(session.finish()).await.unwrap_err();
        assert!(matches!(err, StreamingError::Dropped), "{err}");
    }

    /// The fake itself, driven by a raw WebSocket: what the client never sends.
    #[tokio::test]
    async fn the_fake_ignores_early_audio_and_refuses_a_bad_first_frame() {
        let (fake, client, auth) = setup().await;
        let token = auth.token().await.unwrap();
        let url = client.url("raw");

        let err = within(tokio_tungstenite::connect_async(url.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, tungstenite::Error::Http(r) if r.status() == 401),
            "{err}"
        );

        let with_token = format!("{url}?access_token={}", token.expose());
        let (mut ws, _) = within(tokio_tungstenite::connect_async(with_token.clone()))
            .await
            .unwrap();
        ws.send(Message::binary(vec![0u8; 100])).await.unwrap();
        let bad = StartRequest::twilio(caller()).to_json();
        let mut bad = bad;
        bad["config"]["speechRecognition"]["sampleRateHertz"] = json!(16_000);
        ws.send(Message::text(bad.to_string())).await.unwrap();
        let Some(Ok(Message::Text(reply))) = within(ws.next()).await else {
            panic!("no error frame")
        };
        let reply: Value = serde_json::from_str(reply.as_str()).unwrap();
        assert_eq!(
            reply,
            json!({"type": "error", "details": "No additional details available.",
                   "message": "sampleRateHertz 16000 is not supported for MULAW audio."})
        );
        assert!(matches!(
            within(ws.next()).await,
            Some(Ok(Message::Close(_)))
        ));
        let socket = fake.streaming_socket("raw").unwrap();
        assert_eq!(socket.audio_bytes_before_start, 100);
        assert_eq!(socket.start_request, None);

        let (mut ws, _) = within(tokio_tungstenite::connect_async(with_token))
            .await
            .unwrap();
        ws.send(Message::binary(vec![0u8; 50])).await.unwrap();
        let good = StartRequest::twilio(caller()).to_json();
        ws.send(Message::text(good.to_string())).await.unwrap();
        for expected in [
            "started_listening",
            "recognition_started",
            "conversation_created",
        ] {
            let Some(Ok(Message::Text(t))) = within(ws.next()).await else {
                panic!("no {expected}")
            };
            assert_eq!(classify(t.as_str()).message_type(), Some(expected));
        }
        ws.send(Message::binary(vec![1u8; 30])).await.unwrap();
        ws.send(Message::text(STOP_REQUEST)).await.unwrap();
        while let Some(Ok(_)) = within(ws.next()).await {}
        let socket = fake.streaming_socket("raw").unwrap();
        assert_eq!(socket.audio_bytes_before_start, 50);
        assert_eq!((socket.audio_bytes, socket.audio), (30, vec![1u8; 30]));
        assert_eq!(socket.start_request, Some(good));
        assert!(!socket.token_in_header && socket.token_in_query);
    }
}
