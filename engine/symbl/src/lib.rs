//! Clients of Symbl.ai's APIs, as the engine uses them on live calls.
//!
//! It owns speaking Symbl's wire formats (see `../shared/reference/...` in the docs): getting
//! and refreshing the OAuth token, following a live conversation on the Subscribe WebSocket,
//! streaming audio on the Streaming WebSocket, managing trackers and reading a finished
//! conversation. It does not own what happens to the events (the engine and
//! pipelines).
//!
//! # Layout
//! - [`config`]: the engine config's `symbl:` section.
//! - [`auth`]: the token, cached and refreshed before it expires.
//! - [`subscribe`]: the Subscribe WebSocket client, reconnecting with jittered backoff and
//!   dropping redelivered frames.
//! - [`identity`]: what a frame is (its ids, else its canonical JSON), to recognise redeliveries.
//! - [`updates`]: an integration server's `/symbl/updates` feed of live connections.
//! - `socket` (crate-private): the reconnecting WebSocket loop those two share (backoff, retry
//!   budget, pings, half-open detection, stop); its pacing is [`SocketOptions`].
//! - [`streaming`]: the Streaming API client (audio in, events out).
//! - [`management`]: trackers through the Management API.
//! - [`conversation_api`]: a conversation's summary, action items, questions, topics, analytics.
//! - `rest` (crate-private): the HTTP plumbing those two share (token, retries honouring
//!   `Retry-After`, one request at a time where the API demands it).

pub mod auth;
pub mod config;
pub mod conversation_api;
pub mod identity;
pub mod management;
mod rest;
mod socket;
pub mod streaming;
pub mod subscribe;
pub mod updates;

pub use auth::{AuthError, Credentials, SymblAuth};
pub use config::SymblConfig;
pub use socket::SocketOptions;

/// An HTTP client with the process-wide rustls provider installed (reqwest panics without one).
///
/// # Errors
/// When the TLS backend cannot be initialised.
pub fn http_client(timeout: std::time::Duration) -> Result<reqwest::Client, reqwest::Error> {
    // Installing twice is harmless; the first install wins.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().timeout(timeout).build()
}
