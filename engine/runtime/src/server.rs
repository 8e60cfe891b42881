//! The engine's one HTTP server (axum), configured by the engine config's `server:` section.
//!
//! Every HTTP surface of the engine mounts here: `GET /health` (alive) always, `GET /ready`
//! and `GET /metrics` ([`ready_routes`], [`metrics_routes`]), the Symbl source's control API
//! (`/connections`), the agent feed and console, and Twilio's webhooks and media socket. It
//! does not own what those routes do (each surface does).
//!
//! ```yaml
//! server:
//!   listen: 127.0.0.1:7070   # optional; `prompter run --listen ADDR` overrides it; port 0 picks one
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Deserialize;
use tokio::sync::watch;

use crate::stats::Stats;

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

/// `GET /metrics`: the engine's metrics in the Prometheus text format
/// ([`crate::metrics`]).
pub fn metrics_routes(stats: Arc<Stats>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        get(move || {
            let stats = stats.clone();
            async move {
                (
                    [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
                    stats.metrics.render(),
                )
            }
        }),
    )
}

/// One readiness check: its name, and what is wrong when it fails.
pub type Check = Box<dyn Fn() -> Result<String, String> + Send + Sync>;

/// `GET /ready`: 200 when every check passes, 503 otherwise; the body lists each check with
/// its detail or the reason it fails, as JSON
/// (`{"ready": false, "checks": [{"name": "sinks", "ok": false, "detail": "..."}]}`).
pub fn ready_routes(checks: Vec<(&'static str, Check)>) -> axum::Router {
    let checks = Arc::new(checks);
    axum::Router::new().route(
        "/ready",
        get(move || {
            let checks = checks.clone();
            async move {
                let mut ready = true;
                let list: Vec<serde_json::Value> = checks
                    .iter()
                    .map(|(name, check)| {
                        let (ok, detail) = match check() {
                            Ok(d) => (true, d),
                            Err(d) => (false, d),
                        };
                        ready &= ok;
                        serde_json::json!({"name": name, "ok": ok, "detail": detail})
                    })
                    .collect();
                let status = if ready {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (
                    status,
                    [(header::CONTENT_TYPE, "application/json")],
                    serde_json::json!({"ready": ready, "checks": list}).to_string(),
                )
                    .into_response()
            }
        }),
    )
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
