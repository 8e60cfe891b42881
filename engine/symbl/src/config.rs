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
    /// Trackers that `prompter trackers sync` creates or updates.
    #[serde(default)]
    pub trackers: Vec<TrackerSpec>,
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
