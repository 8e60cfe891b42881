//! What a session yields and how it ends: the events (text frames, sorted by `classify`),
//! the outcomes and the errors.

use std::time::Duration;

use serde_json::Value;
use tokio_tungstenite::tungstenite;

use super::StartRequestError;
use crate::auth::AuthError;

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
    ///
    /// [`StreamingSession::stop`]: super::StreamingSession::stop
    #[error("audio was sent after the `stop_request`")]
    AudioAfterStop,
    /// The session has ended (the socket is gone); [`StreamingSession::finish`] says why.
    ///
    /// [`StreamingSession::finish`]: super::StreamingSession::finish
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

pub(super) fn socket_error(e: tungstenite::Error) -> StreamingError {
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
/// Sorts a text frame into a [`StreamingEvent`]; never panics.
pub(super) fn classify(text: &str) -> StreamingEvent {
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
pub(super) fn learned_conversation_id(frame: &Value) -> Option<String> {
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
