//! Local fakes of the services Prompter talks to, for tests and local demos: small axum servers
//! on `127.0.0.1:0` that speak the exact wire formats of
//! `symbl-nebula-twilio-wire-formats.md`, including their failure modes (401, 429 with
//! `Retry-After`, 5xx, slow answers, a WebSocket dropped mid-call).
//!
//! Nothing here is a mock of Prompter's own code: the engine talks to these servers over real
//! HTTP and real WebSockets, exactly as it talks to Symbl and Nebula.
//!
//! # Layout
//! - [`nebula`]: embed, chat and streamed chat.
//! - [`openai`]: an OpenAI-compatible server: chat completions (streamed or not), embeddings.
//! - [`symbl`]: token, Subscribe WebSocket, an integration server's `/symbl/updates` feed.
//! - [`symbl_manage`]: the Management API (trackers).
//! - [`symbl_conversations`]: the Conversation API.
//! - [`symbl_streaming`]: the Streaming API WebSocket.

pub mod nebula;
pub mod openai;
pub mod symbl;
pub mod symbl_conversations;
pub mod symbl_manage;
pub mod symbl_streaming;

pub use nebula::NebulaFake;
pub use symbl::SymblFake;

/// Serves `app` on an ephemeral loopback port; returns `http://127.0.0.1:PORT`.
///
/// # Panics
/// When no loopback port can be bound (the test cannot run at all then).
pub async fn serve(app: axum::Router) -> String {
    #[allow(
        clippy::expect_used,
        reason = "a fake that cannot bind cannot serve any test"
    )]
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    #[allow(clippy::expect_used, reason = "as above")]
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// Locks a mutex, ignoring poisoning (a panicking test thread must not hide the fake's state).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
