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

mod events;
mod session;
mod start_request;
#[cfg(test)]
mod tests;

pub use events::{ServiceError, SessionEnd, StreamingError, StreamingEvent};
pub use session::{AudioSender, Endpoint, StreamingClient, StreamingOptions, StreamingSession};
pub use start_request::{AudioEncoding, InsightType, Speaker, StartRequest, StartRequestError};

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
