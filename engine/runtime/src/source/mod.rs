//! Where events come from: the [`Source`] trait and the engine's sources.
//!
//! A source feeds events to an [`Engine`] until it runs out (a recording) or the engine stops
//! (live connections). Sources never touch conversation state or outputs: they dispatch events
//! and the engine does the rest, so the same engine runs replays, live Symbl calls and (later)
//! the Twilio bridge and NATS alike.
//!
//! - [`recording`]: recorded calls, as fast as possible or at their own pace.
//! - [`symbl`]: live Symbl connections on the Subscribe API, learned from the command line, the
//!   HTTP control API ([`symbl::SymblSource::routes`]) or an integration server's update feed.

pub mod recording;
pub mod symbl;

use std::sync::Arc;

use tokio::sync::watch;

use crate::engine::Engine;

/// Why a source stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
#[error("source `{source_name}`: {message}")]
#[must_use]
pub struct SourceError {
    /// The source's name.
    pub source_name: String,
    /// What went wrong.
    pub message: String,
}

/// Something that feeds events to the engine.
#[prompter_core::async_trait]
pub trait Source: Send + 'static {
    /// Its name, for logs.
    fn name(&self) -> &str;

    /// Dispatches events to `engine` until the source has no more or `shutdown` turns true;
    /// every event it accepted is dispatched before it returns (nothing accepted is lost).
    ///
    /// # Errors
    /// When the source cannot go on (it is logged; the engine keeps what it dispatched).
    async fn run(
        self: Box<Self>,
        engine: Arc<Engine>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError>;
}

/// Where a source's notices for the operator go (the CLI prints them on stderr).
pub type Notices = Arc<dyn Fn(&str) + Send + Sync>;
