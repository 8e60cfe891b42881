//! The engine's one HTTP server (axum), configured by the engine config's `server:` section.
//!
//! Every HTTP surface of the engine mounts here: `GET /health` always, the Symbl source's
//! control API (`/connections`), and later the agent feed and console, metrics and Twilio's
//! webhooks and media socket. It does not own what those routes do (each surface does).
//!
//! ```yaml
//! server:
//!   listen: 127.0.0.1:7070   # optional; `prompter run --listen ADDR` overrides it; port 0 picks one
//! ```

use std::net::SocketAddr;

use axum::routing::get;
use serde::Deserialize;
use tokio::sync::watch;

/// The `server:` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Where to listen (`host:port`). Default: no server. An empty value (`${VAR:-}` unset)
    /// means none too.
    #[serde(default)]
    pub listen: Option<String>,
}

impl ServerConfig {
    /// The address to listen on, when one is set.
    pub fn address(&self) -> Option<&str> {
        self.listen
            .as_deref()
            .map(str::trim)
            .filter(|a| !a.is_empty())
    }
}

/// Binds `addr` and serves `routes` (plus `GET /health`) until `shutdown` turns true; returns the
/// bound address (useful with port 0).
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(
    addr: &str,
    routes: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = routes.route("/health", get(|| async { "ok" }));
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "The HTTP server stopped.");
        }
    });
    Ok(bound)
}
