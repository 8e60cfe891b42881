//! The REST plumbing of the Management ([`crate::management`]) and Conversation API
//! ([`crate::conversation_api`]) clients; see [`Rest`]. Crate-private: each client turns a
//! [`RestError`] into its own public error.

use std::sync::Arc;
use std::time::Duration;

use prompter_core::backoff::{Backoff, parse_retry_after};
use serde_json::Value;
use tokio::sync::Mutex;

use crate::auth::{AuthError, SymblAuth};
use crate::config::SymblConfig;

/// Per-attempt timeout of a REST call.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest piece of a service's error body quoted in an error message.
const MAX_MESSAGE_CHARS: usize = 300;

/// How a REST call failed, before the client names what it was doing.
#[derive(Debug)]
pub(crate) enum RestError {
    /// No token.
    Auth(AuthError),
    /// 401 to a fresh token.
    Unauthorized,
    /// A status that retrying will not fix.
    Status { status: u16, message: String },
    /// Retries exhausted, or an answer that is not JSON.
    Unavailable(String),
}

/// HTTP plumbing shared by the Management and Conversation API clients: the bearer token, one
/// fresh token after a 401, retries of 429 / 5xx / transport failures with backoff honouring
/// `Retry-After`, and, for APIs that allow one request at a time, a gate held for the whole
/// call.
#[derive(Clone)]
pub(crate) struct Rest {
    client: reqwest::Client,
    base: String,
    auth: Arc<SymblAuth>,
    pub(crate) retry: Backoff,
    pub(crate) app_id_env: String,
    gate: Option<Arc<Mutex<()>>>,
}

impl std::fmt::Debug for Rest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rest")
            .field("base", &self.base)
            .field("retry", &self.retry)
            .field("one_at_a_time", &self.gate.is_some())
            .finish_non_exhaustive()
    }
}

impl Rest {
    /// A client of `config`'s API base; `one_at_a_time` serialises its calls (and its clones').
    pub(crate) fn new(
        config: &SymblConfig,
        auth: Arc<SymblAuth>,
        retry: Backoff,
        one_at_a_time: bool,
    ) -> Result<Self, String> {
        let client = crate::http_client(REQUEST_TIMEOUT)
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Rest {
            client,
            base: config.api_base().to_owned(),
            auth,
            retry,
            app_id_env: config.app_id_env.clone(),
            gate: one_at_a_time.then(|| Arc::new(Mutex::new(()))),
        })
    }

    /// Sends one request (`path` starts with `/`); the JSON answer of a 2xx (`null` when
    /// empty).
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, RestError> {
        // Held across the retries and their waits: sending anything while we wait out a 429
        // would only earn another 429.
        let _turn = match &self.gate {
            Some(g) => Some(g.lock().await),
            None => None,
        };
        let url = format!("{}{path}", self.base);
        let mut attempt = 0;
        let mut refreshed = false;
        loop {
            let token = self.auth.token().await.map_err(RestError::Auth)?;
            let mut req = self
                .client
                .request(method.clone(), &url)
                .bearer_auth(token.expose())
                .header("Accept", "application/json");
            if let Some(b) = body {
                req = req
                    .header("Content-Type", "application/json")
                    .body(b.to_string());
            }
            let (retry_after, reason) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let bytes = resp.bytes().await;
                    match (status, bytes) {
                        (200..=299, Ok(b)) => return parse_json(&b),
                        (200..=299, Err(e)) => (None, format!("reading the answer failed: {e}")),
                        (401, _) if !refreshed => {
                            // The cached token may have been revoked: one fresh one, at once.
                            refreshed = true;
                            self.auth.invalidate().await;
                            continue;
                        }
                        (401, _) => return Err(RestError::Unauthorized),
                        (429, _) | (500..=599, _) => {
                            (retry_after, format!("Symbl answered {status}"))
                        }
                        (_, b) => {
                            let b = b.unwrap_or_default();
                            return Err(RestError::Status {
                                status,
                                message: error_message(status, &b),
                            });
                        }
                    }
                }
                Err(e) => (None, transport_reason(&e)),
            };
            if !self.retry.allows_retry(attempt) {
                return Err(RestError::Unavailable(format!(
                    "{reason} (after {} attempts)",
                    attempt + 1
                )));
            }
            let wait = self.retry.wait(attempt, retry_after);
            tracing::warn!(
                path,
                attempt = attempt + 1,
                wait_ms = wait.as_millis() as u64,
                error = %reason,
                "Symbl call failed; retrying."
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, RestError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes)
        .map_err(|e| RestError::Unavailable(format!("the answer is not JSON: {e}")))
}

/// Symbl's `message` (or `error`) from an error body, else the body's start, else what the
/// status means.
fn error_message(status: u16, body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        ["message", "error", "detail"]
            .iter()
            .find_map(|k| v.get(k).and_then(Value::as_str))
            .map(str::to_owned)
    });
    let text = from_json.unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    let mut text: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
    if text.is_empty() {
        text = match status {
            400 => "bad request",
            404 => "not found",
            409 => "a tracker with this name exists",
            413 => "the request is larger than Symbl's 1 MB limit",
            _ => "no explanation given",
        }
        .to_owned();
    }
    text
}

fn transport_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "the request timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect to Symbl".to_owned()
    } else {
        format!("the request failed: {e}")
    }
}
