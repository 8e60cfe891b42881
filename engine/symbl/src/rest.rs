//! The REST plumbing of the Management ([`crate::management`]) and Conversation API
//! ([`crate::conversation_api`]) clients; see [`Rest`]. Crate-private: each client turns a
//! [`RestError`] into its own public error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prompter_core::backoff::{Backoff, parse_retry_after};
use prompter_core::retry::{Attempt, RetryError, retry_notify};
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
        // One fresh token per call, not per attempt: a second 401 is final.
        let refreshed = AtomicBool::new(false);
        let (method, url, refreshed) = (&method, &url, &refreshed);
        let outcome = retry_notify(
            &self.retry,
            |_| async move {
                loop {
                    match self.attempt(method, url, body).await {
                        Sent::Unauthorized if !refreshed.swap(true, Ordering::Relaxed) => {
                            // The cached token may have been revoked: one fresh one, at once,
                            // without using up an attempt.
                            self.auth.invalidate().await;
                        }
                        Sent::Unauthorized => return Attempt::Fail(RestError::Unauthorized),
                        Sent::Outcome(outcome) => return outcome,
                    }
                }
            },
            |r| {
                tracing::warn!(
                    path,
                    attempt = r.attempt,
                    wait_ms = u64::try_from(r.wait.as_millis()).unwrap_or(u64::MAX),
                    error = %r.error,
                    "Symbl call failed; retrying."
                );
            },
        )
        .await;
        match outcome {
            Ok(value) => Ok(value),
            Err(RetryError::Final(e)) => Err(e),
            Err(RetryError::Exhausted { last, attempts }) => Err(RestError::Unavailable(format!(
                "{last} (after {attempts} attempts)"
            ))),
        }
    }

    /// One request with a current token, its answer classified (a 401 is left to the caller,
    /// which may fetch a fresh token and send it again).
    async fn attempt(&self, method: &reqwest::Method, url: &str, body: Option<&Value>) -> Sent {
        let token = match self.auth.token().await {
            Ok(token) => token,
            Err(e) => return Sent::Outcome(Attempt::Fail(RestError::Auth(e))),
        };
        let mut req = self
            .client
            .request(method.clone(), url)
            .bearer_auth(token.expose())
            .header("Accept", "application/json");
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/json")
                .body(b.to_string());
        }
        let resp = match req.send().await {
            Ok(resp) => resp,
            Err(e) => return Sent::Outcome(Attempt::retry(transport_reason(&e))),
        };
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let bytes = resp.bytes().await;
        Sent::Outcome(match (status, bytes) {
            (200..=299, Ok(b)) => match parse_json(&b) {
                Ok(value) => Attempt::Done(value),
                Err(e) => Attempt::Fail(e),
            },
            (200..=299, Err(e)) => Attempt::retry(format!("reading the answer failed: {e}")),
            (401, _) => return Sent::Unauthorized,
            (429, _) | (500..=599, _) => Attempt::Retry {
                error: format!("Symbl answered {status}"),
                retry_after,
            },
            (_, b) => {
                let b = b.unwrap_or_default();
                Attempt::Fail(RestError::Status {
                    status,
                    message: error_message(status, &b),
                })
            }
        })
    }
}

/// What one request came to.
enum Sent {
    /// A 401: the token was refused.
    Unauthorized,
    /// Anything else, classified for the retry loop (a retryable failure carries its reason).
    Outcome(Attempt<Value, RestError, String>),
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
