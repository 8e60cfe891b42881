//! The engine config's `symbl:` section: credentials (by environment variable name), where the
//! APIs are, which live connections to follow, and the trackers to keep in sync.
//!
//! ```yaml
//! symbl:
//!   # The credentials are read from these environment variables (the defaults shown); the
//!   # values never appear in a file, a log or an error.
//!   app_id_env: SYMBL_APP_ID
//!   app_secret_env: SYMBL_APP_SECRET
//!   api_base: https://api.symbl.ai          # REST base; the WebSockets use its ws(s) twin
//!   connections: [6d1d1b3e-8f4a-4c39-9a53-2f7d0f0c9a11]   # follow these from the start
//!   updates: wss://bridge.example.com/symbl/updates     # an integration server's feed
//!   listen: 127.0.0.1:7070                  # HTTP: POST /connections/{connectionId}
//!   reconnect: { base_ms: 250, max_ms: 10000, max_retries: 20 }
//!   keepalive: { ping_ms: 30000, idle_timeout_ms: 75000 }   # half-open sockets dropped
//!   trackers:
//!     - name: Budget Constraints
//!       vocabulary: [too expensive, no budget, over our budget]
//! ```

use prompter_core::backoff::Backoff;
use serde::Deserialize;

/// The default environment variable holding the Symbl app id.
pub const DEFAULT_APP_ID_ENV: &str = "SYMBL_APP_ID";
/// The default environment variable holding the Symbl app secret.
pub const DEFAULT_APP_SECRET_ENV: &str = "SYMBL_APP_SECRET";
/// Symbl's REST base URL.
pub const DEFAULT_API_BASE: &str = "https://api.symbl.ai";

/// The `symbl:` section; see the module docs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymblConfig {
    /// Environment variable with the app id. Default `SYMBL_APP_ID`.
    #[serde(default = "default_app_id_env")]
    pub app_id_env: String,
    /// Environment variable with the app secret. Default `SYMBL_APP_SECRET`.
    #[serde(default = "default_app_secret_env")]
    pub app_secret_env: String,
    /// REST base URL. Default `https://api.symbl.ai`.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// WebSocket base URL. Default: `api_base` with `http` replaced by `ws`.
    #[serde(default)]
    pub ws_base: Option<String>,
    /// Connection ids to follow from the start.
    #[serde(default)]
    pub connections: Vec<String>,
    /// An integration server's update feed (`connection_started` / `connection_exists` /
    /// `connection_stopped`), e.g. `wss://bridge.example.com/symbl/updates`.
    #[serde(default)]
    pub updates: Option<String>,
    /// Address of the engine's HTTP control endpoint (`POST /connections/{connectionId}`).
    #[serde(default)]
    pub listen: Option<String>,
    /// Reconnection pacing for dropped sockets. Default: 250 ms doubling to 10 s, 20 retries.
    #[serde(default = "default_reconnect")]
    pub reconnect: Backoff,
    /// How Subscribe sockets are kept alive and watched. Default: a ping every 30 s; a socket
    /// on which nothing arrived for 75 s is taken for half-open, dropped and reconnected.
    #[serde(default)]
    pub keepalive: Keepalive,
    /// Trackers that `prompter trackers sync` creates or updates.
    #[serde(default)]
    pub trackers: Vec<TrackerSpec>,
}

/// The `symbl.keepalive` section: how often Subscribe sockets are pinged, and how long one may
/// stay silent before it is taken for half-open (dropped and reconnected, resuming the
/// conversation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Keepalive {
    /// Ping period. Default 30,000 ms (the Go SDK's).
    #[serde(default = "default_ping_ms")]
    pub ping_ms: u64,
    /// Silence after which a socket is dropped. Default: 2 × `ping_ms` + 15,000 ms.
    #[serde(default)]
    pub idle_timeout_ms: Option<u64>,
}

fn default_ping_ms() -> u64 {
    30_000
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            ping_ms: default_ping_ms(),
            idle_timeout_ms: None,
        }
    }
}

impl Keepalive {
    /// The socket options these settings give (pings of at least 100 ms; a silence limit
    /// longer than the ping period).
    pub fn options(&self) -> crate::socket::SocketOptions {
        let ping = std::time::Duration::from_millis(self.ping_ms.max(100));
        let mut o = crate::socket::SocketOptions::with_ping_every(ping);
        if let Some(idle) = self.idle_timeout_ms {
            o.idle_timeout = std::time::Duration::from_millis(idle).max(ping + ping / 2);
        }
        o
    }
}

/// A tracker as declared in YAML and as the Management API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerSpec {
    /// Its name (case-sensitive, unique per account).
    pub name: String,
    /// The phrases that trigger it.
    pub vocabulary: Vec<String>,
}

fn default_app_id_env() -> String {
    DEFAULT_APP_ID_ENV.into()
}
fn default_app_secret_env() -> String {
    DEFAULT_APP_SECRET_ENV.into()
}
fn default_api_base() -> String {
    DEFAULT_API_BASE.into()
}
fn default_reconnect() -> Backoff {
    Backoff {
        base_ms: 250,
        max_ms: 10_000,
        max_retries: 20,
    }
}

impl Default for SymblConfig {
    fn default() -> Self {
        SymblConfig {
            app_id_env: default_app_id_env(),
            app_secret_env: default_app_secret_env(),
            api_base: default_api_base(),
            ws_base: None,
            connections: Vec::new(),
            updates: None,
            listen: None,
            reconnect: default_reconnect(),
            keepalive: Keepalive::default(),
            trackers: Vec::new(),
        }
    }
}

impl SymblConfig {
    /// The REST base without a trailing slash.
    pub fn api_base(&self) -> &str {
        self.api_base.trim_end_matches('/')
    }

    /// The WebSocket base: `ws_base`, or `api_base` with its scheme swapped (`https` → `wss`).
    pub fn ws_base(&self) -> String {
        match &self.ws_base {
            Some(ws) => ws.trim_end_matches('/').to_owned(),
            None => {
                let api = self.api_base();
                if let Some(rest) = api.strip_prefix("https://") {
                    format!("wss://{rest}")
                } else if let Some(rest) = api.strip_prefix("http://") {
                    format!("ws://{rest}")
                } else {
                    api.to_owned()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_ws_base() {
        let c: SymblConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, SymblConfig::default());
        assert_eq!(c.ws_base(), "wss://api.symbl.ai");
        let c: SymblConfig =
            serde_json::from_str(r#"{"api_base": "http://127.0.0.1:9/"}"#).unwrap();
        assert_eq!(c.ws_base(), "ws://127.0.0.1:9");
        assert!(serde_json::from_str::<SymblConfig>(r#"{"app_id": "x"}"#).is_err());
    }
}
