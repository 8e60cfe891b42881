//! The HTTP side shared by chat and embeddings: one POST with its timeout, retries with backoff
//! honouring `Retry-After`, and errors that name the resource but never the key.

use std::time::Duration;

use prompter_core::backoff::{Backoff, parse_retry_after};
use prompter_core::error::PluginError;
use prompter_core::retry::{Attempt, RetryError, retry_notify};
use prompter_core::secret::Secret;
use serde::Serialize;

use super::config::key_of;

/// What a successful attempt yields: the whole body, or the response whose body is a stream.
pub(super) enum Answer {
    Body(Vec<u8>),
    Stream(reqwest::Response),
}

/// Why an attempt failed retryably: what to say if it was the last one, and the cause.
struct Failure {
    why: String,
    source: Option<reqwest::Error>,
}

impl Failure {
    fn new(why: String, source: Option<reqwest::Error>) -> Attempt<Answer, PluginError, Self> {
        Attempt::retry(Failure { why, source })
    }
}

/// How one attempt ended.
type Outcome = Attempt<Answer, PluginError, Failure>;

/// What to do with a non-2xx status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// 401/403: the key is wrong or missing.
    Auth,
    /// 408, 429, 5xx: try again.
    Retry,
    /// Any other 4xx: the request itself is wrong; retrying cannot help.
    Reject,
}

pub(super) fn classify(status: u16) -> Class {
    match status {
        401 | 403 => Class::Auth,
        408 | 429 | 500.. => Class::Retry,
        _ => Class::Reject,
    }
}

/// The server's requested wait: OpenAI's `retry-after-ms`, else `Retry-After` in seconds.
pub(super) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| header("retry-after").and_then(parse_retry_after))
}

/// The innermost cause of an error ("Connection refused (os error 111)"), which says more than
/// reqwest's "error sending request for url (...)".
pub(super) fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The HTTP side shared by chat and embeddings: base URL, optional key, timeout and retries.
#[derive(Debug, Clone)]
pub(super) struct OpenAiClient {
    /// The resource name, for errors and logs.
    pub(super) name: String,
    /// `llm` or `embedder`, for errors.
    section: &'static str,
    base_url: String,
    /// `host[:port]` of `base_url`, for errors.
    host: String,
    api_key: Option<Secret>,
    pub(super) timeout: Duration,
    retry: Backoff,
    client: reqwest::Client,
}

impl OpenAiClient {
    pub(super) fn new(
        name: &str,
        section: &'static str,
        base_url: &str,
        api_key: Option<&Secret>,
        timeout_ms: u64,
        max_retries: u32,
        max_backoff_ms: u64,
    ) -> Result<Self, PluginError> {
        let host = reqwest::Url::parse(base_url)
            .ok()
            .and_then(|u| {
                let host = u.host_str()?.to_owned();
                Some(match u.port() {
                    Some(port) => format!("{host}:{port}"),
                    None => host,
                })
            })
            .unwrap_or_else(|| base_url.to_owned());
        let timeout = Duration::from_millis(timeout_ms.max(1));
        // reqwest panics without a process-wide rustls crypto provider; installing twice is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // No client-wide timeout: a streamed answer may take longer than one attempt's budget as
        // long as it keeps coming; attempts and stream reads are timed one by one instead.
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|e| PluginError::internal("cannot build the HTTP client").with_source(e))?;
        Ok(OpenAiClient {
            name: name.to_owned(),
            section,
            base_url: base_url.trim_end_matches('/').to_owned(),
            host,
            api_key: key_of(api_key).cloned(),
            timeout,
            retry: Backoff {
                base_ms: 200,
                max_ms: max_backoff_ms,
                max_retries,
            },
            client,
        })
    }

    /// `llm `gpt``: how every error of this resource starts.
    pub(super) fn who(&self) -> String {
        format!("{} `{}`", self.section, self.name)
    }

    /// POSTs `body` to `path`, retrying 408/429/5xx/connection failures and timeouts. With
    /// `stream`, returns as soon as a 2xx status arrives; else reads the whole body.
    pub(super) async fn call(
        &self,
        path: &str,
        body: &impl Serialize,
        stream: bool,
    ) -> Result<Answer, PluginError> {
        let url = format!("{}{path}", self.base_url);
        let payload = serde_json::to_vec(body)
            .map_err(|e| PluginError::internal("request did not serialize").with_source(e))?;
        let (url, payload) = (&url, &payload);
        let answer = retry_notify(
            &self.retry,
            |_| async move {
                match tokio::time::timeout(self.timeout, self.attempt(url, path, payload, stream))
                    .await
                {
                    Ok(outcome) => outcome,
                    Err(_) => Failure::new(
                        format!("no answer within {} ms", self.timeout.as_millis()),
                        None,
                    ),
                }
            },
            |r| {
                tracing::warn!(
                    resource = %self.name,
                    call = path,
                    attempt = r.attempt,
                    wait_ms = u64::try_from(r.wait.as_millis()).unwrap_or(u64::MAX),
                    error = %r.error.why,
                    "OpenAI-compatible call failed; retrying."
                );
            },
        )
        .await;
        match answer {
            Ok(answer) => Ok(answer),
            Err(RetryError::Final(e)) => Err(e),
            Err(RetryError::Exhausted { last, attempts }) => {
                let err = PluginError::external(format!(
                    "{}: `POST {path}` on `{}` failed after {attempts} attempt(s): {}",
                    self.who(),
                    self.host,
                    last.why
                ));
                Err(match last.source {
                    Some(s) => err.with_source(s),
                    None => err,
                })
            }
        }
    }

    async fn attempt(&self, url: &str, path: &str, payload: &[u8], stream: bool) -> Outcome {
        let accept = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, accept)
            .body(payload.to_vec());
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key.expose());
        }
        let resp = match request.send().await {
            Ok(resp) => resp,
            Err(e) => {
                let what = if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                return Failure::new(format!("{what}: {}", root_cause(&e)), Some(e));
            }
        };
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            if stream {
                return Outcome::Done(Answer::Stream(resp));
            }
            return match resp.bytes().await {
                Ok(bytes) => Outcome::Done(Answer::Body(bytes.to_vec())),
                Err(e) => Failure::new(
                    format!("reading the answer failed: {}", root_cause(&e)),
                    Some(e),
                ),
            };
        }
        let after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        match classify(status) {
            // The body is left out on purpose: OpenAI's 401 echoes part of the key.
            Class::Auth => Outcome::Fail(PluginError::config(match self.api_key {
                Some(_) => format!(
                    "{}: `{}` rejected the API key ({status}); check its `api_key`",
                    self.who(),
                    self.host
                ),
                None => format!(
                    "{}: `{}` requires an API key ({status}) and none is configured; set its \
                     `api_key` (e.g. `${{OPENAI_API_KEY}}`)",
                    self.who(),
                    self.host
                ),
            })),
            Class::Retry => Outcome::Retry {
                error: Failure {
                    why: format!("{status}: {}", self.detail(&text)),
                    source: None,
                },
                retry_after: after,
            },
            Class::Reject => {
                let hint = if status == 404 {
                    "; check `model` and `base_url` (the API root, e.g. ending in `/v1`)"
                } else {
                    ""
                };
                Outcome::Fail(PluginError::input(format!(
                    "{}: `POST {path}` on `{}` answered {status}: {}{hint}",
                    self.who(),
                    self.host,
                    self.detail(&text)
                )))
            }
        }
    }

    /// A short, key-free account of an error body: OpenAI's `error.message` (also the
    /// `{"error": "..."}` form some servers use), else the start of the text.
    pub(super) fn detail(&self, body: &str) -> String {
        let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
        let message = parsed.as_ref().and_then(|v| {
            let e = v.get("error")?;
            e.as_str().or_else(|| e.get("message")?.as_str())
        });
        let mut text = message
            .unwrap_or(body)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if let Some(key) = &self.api_key {
            text = text.replace(key.expose(), "***");
        }
        if text.is_empty() {
            return "(empty body)".into();
        }
        if text.chars().count() > 200 {
            text = text.chars().take(200).collect::<String>() + "…";
        }
        text
    }
}
