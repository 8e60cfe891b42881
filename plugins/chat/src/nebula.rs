//! The `nebula` chat provider: Symbl's Nebula chat API (`/v1/model/chat`), and its streamed
//! variant (`/v1/model/chat/streaming`, Server-Sent Events with `delta` chunks) when the caller
//! wants tokens as they arrive.
//!
//! Each attempt has a timeout (`timeout_ms`: for the response headers, and for the whole body when
//! not streaming); a streamed answer may take as long as it needs while its chunks keep coming,
//! but a gap of `timeout_ms` between two chunks ends it with an error. 429 and 5xx answers,
//! connection failures and timed-out attempts are retried with jittered exponential backoff that
//! honours `Retry-After`, a bounded number of times, but only until a stream has started. Errors say which
//! call failed and why. The API key travels only in the `ApiKey` header; it is never logged.
//!
//! It also owns the `nebula` embedder ([`NebulaEmbedder`], `/v1/model/embed`), which shares the
//! same client, timeouts and retries.
//!
//! ```yaml
//! llm:
//!   nebula:
//!     provider: nebula
//!     config:
//!       api_key: ${NEBULA_API_KEY}
//!       max_new_tokens: 256
//! embedders:
//!   nebula:
//!     provider: nebula
//!     config: { api_key: "${NEBULA_API_KEY}" }
//! ```

use std::time::Duration;

use prompter_core::async_trait;
use prompter_core::backoff::{Backoff, parse_retry_after};
use prompter_core::error::PluginError;
use prompter_core::resource::{ChatProvider, ChatReply, ChatRequest, Embedder, Role};
use prompter_core::retry::{Attempt, RetryError, retry_notify};
use prompter_core::secret::Secret;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::openai::sse::{SseError, SseMessage, SseReader};

/// Configuration of a `nebula` provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NebulaConfig {
    /// The Nebula API key (use `${NEBULA_API_KEY}`; never write it in the file).
    pub api_key: Secret,
    /// API base URL. Default `https://api-nebula.symbl.ai`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// Maximum tokens to generate; overrides the prompt stage's value when set.
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
    /// Nucleus sampling. Default 0.95.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Top-k sampling. Default 1.
    #[serde(default = "default_top_k")]
    pub top_k: u32,
    /// Repetition penalty (the RTA guide uses 1.2); not sent when unset.
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Timeout of one attempt, in ms, never of a whole streamed answer. Connecting and the
    /// response headers must come within it (and, not streaming, the whole answer body);
    /// otherwise the attempt fails and is retried. Once a stream has started it may last any
    /// length, but a gap of `timeout_ms` between two chunks ends it with an error (not retried:
    /// tokens have already been passed on). Default 10,000 ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after a 429, a 5xx or a connection failure. Default 3.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Longest wait between attempts, including `Retry-After`. Default 5,000 ms.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_base_url() -> String {
    "https://api-nebula.symbl.ai".into()
}
fn default_top_p() -> f64 {
    0.95
}
fn default_top_k() -> u32 {
    1
}
fn default_timeout_ms() -> u64 {
    10_000
}
fn default_retries() -> u32 {
    3
}
fn default_max_backoff_ms() -> u64 {
    5_000
}

/// What a successful attempt yields: the whole body, or the response whose body is a stream.
enum Answer {
    Body(Vec<u8>),
    Stream(reqwest::Response),
}

/// How one attempt ended; a retryable failure carries what to say if it was the last one.
type Outcome = Attempt<Answer, PluginError, String>;

/// The HTTP side shared by Nebula chat and embeddings: base URL, key, timeout and retries.
#[derive(Debug, Clone)]
struct NebulaClient {
    /// The resource name, for errors and logs.
    name: String,
    /// `llm` or `embedder`, for errors.
    section: &'static str,
    base_url: String,
    api_key: Secret,
    /// One attempt's budget (see [`NebulaConfig::timeout_ms`]); also the longest gap allowed
    /// between two chunks of a streamed answer.
    timeout: Duration,
    retry: Backoff,
    client: reqwest::Client,
}

impl NebulaClient {
    fn new(
        name: &str,
        section: &'static str,
        api_key: Secret,
        base_url: &str,
        timeout_ms: u64,
        retry: Backoff,
    ) -> Result<Self, PluginError> {
        if api_key.is_empty() {
            return Err(PluginError::config(format!(
                "{section} `{name}`: `api_key` is empty (set NEBULA_API_KEY)"
            )));
        }
        let timeout = Duration::from_millis(timeout_ms.max(1));
        // reqwest panics without a process-wide rustls crypto provider; installing twice is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // No client-wide timeout: a streamed answer may take longer than one attempt's budget as
        // long as it keeps coming; attempts and stream reads are timed one by one instead.
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .build()
            .map_err(|e| PluginError::internal("cannot build the HTTP client").with_source(e))?;
        Ok(NebulaClient {
            name: name.to_owned(),
            section,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            timeout,
            retry,
            client,
        })
    }

    /// POSTs `body` to `path` and reads the whole 2xx answer, each attempt (headers and body)
    /// within the timeout; retries 429/5xx/connection failures/timeouts.
    async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Vec<u8>, PluginError> {
        match self.call(path, body, false).await? {
            Answer::Body(bytes) => Ok(bytes),
            Answer::Stream(_) => Err(PluginError::internal(
                "invariant: a non-streamed call answered a stream",
            )),
        }
    }

    /// POSTs `body` to `path` and returns as soon as a 2xx status arrives (within the timeout,
    /// with retries as [`Self::post`]); the caller reads the body as a stream.
    async fn post_stream(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, PluginError> {
        match self.call(path, body, true).await? {
            Answer::Stream(resp) => Ok(resp),
            Answer::Body(_) => Err(PluginError::internal(
                "invariant: a streamed call answered a whole body",
            )),
        }
    }

    async fn call(
        &self,
        path: &str,
        body: &serde_json::Value,
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
                    Err(_) => {
                        Outcome::retry(format!("no answer within {} ms", self.timeout.as_millis()))
                    }
                }
            },
            |r| {
                tracing::warn!(
                    resource = %self.name,
                    call = path,
                    attempt = r.attempt,
                    wait_ms = u64::try_from(r.wait.as_millis()).unwrap_or(u64::MAX),
                    error = %r.error,
                    "Nebula call failed; retrying."
                );
            },
        )
        .await;
        match answer {
            Ok(answer) => Ok(answer),
            Err(RetryError::Final(e)) => Err(e),
            Err(RetryError::Exhausted { last, attempts }) => Err(PluginError::external(format!(
                "Nebula `{path}` failed after {attempts} attempt(s): {last}"
            ))),
        }
    }

    /// One attempt: the request, its status and, unless streaming, its whole body.
    async fn attempt(&self, url: &str, path: &str, payload: &[u8], stream: bool) -> Outcome {
        let accept = if stream {
            "text/event-stream"
        } else {
            "application/json"
        };
        let sent = self
            .client
            .post(url)
            .header("ApiKey", self.api_key.expose())
            .header("Content-Type", "application/json")
            .header("Accept", accept)
            .body(payload.to_vec())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) if e.is_timeout() => {
                return Outcome::retry(format!("no answer within {} ms", self.timeout.as_millis()));
            }
            Err(e) => return Outcome::retry(format!("request failed: {e}")),
        };
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            if stream {
                return Outcome::Done(Answer::Stream(resp));
            }
            return match resp.bytes().await {
                Ok(bytes) => Outcome::Done(Answer::Body(bytes.to_vec())),
                Err(e) => Outcome::retry(format!("reading the answer failed: {e}")),
            };
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let text = resp.text().await.unwrap_or_default();
        let detail: String = text.chars().take(200).collect();
        if status == 401 || status == 403 {
            return Outcome::Fail(PluginError::config(format!(
                "Nebula rejected the API key of {} `{}` ({status}); check the key in its `api_key`",
                self.section, self.name
            )));
        }
        if status != 429 && status < 500 {
            return Outcome::Fail(PluginError::input(format!(
                "Nebula `{path}` answered {status}: {detail}"
            )));
        }
        Outcome::Retry {
            error: format!("{status}: {detail}"),
            retry_after,
        }
    }
}

fn retry_policy(max_retries: u32, max_backoff_ms: u64) -> Backoff {
    Backoff {
        base_ms: 200,
        max_ms: max_backoff_ms,
        max_retries,
    }
}

/// A Nebula chat provider.
#[derive(Debug, Clone)]
pub struct NebulaProvider {
    config: NebulaConfig,
    http: NebulaClient,
}

impl NebulaProvider {
    /// A provider named `name`.
    ///
    /// # Errors
    /// An empty API key (an unset `${NEBULA_API_KEY:-}`).
    pub fn new(name: &str, config: NebulaConfig) -> Result<Self, PluginError> {
        let http = NebulaClient::new(
            name,
            "llm",
            config.api_key.clone(),
            &config.base_url,
            config.timeout_ms,
            retry_policy(config.max_retries, config.max_backoff_ms),
        )?;
        Ok(NebulaProvider { config, http })
    }

    fn body(&self, request: &ChatRequest) -> serde_json::Value {
        let messages: Vec<serde_json::Value> = request
            .messages
            .iter()
            .map(|m| {
                let role = match m.role {
                    Role::Human => "human",
                    Role::Assistant => "assistant",
                };
                serde_json::json!({"role": role, "text": m.text})
            })
            .collect();
        let mut body = serde_json::json!({
            "max_new_tokens": self.config.max_new_tokens.unwrap_or(request.max_new_tokens),
            "top_p": self.config.top_p,
            "top_k": self.config.top_k,
            "temperature": request.temperature,
            "system_prompt": request.system_prompt,
            "messages": messages,
        });
        if let Some(rp) = self.config.repetition_penalty {
            body["repetition_penalty"] = serde_json::json!(rp);
        }
        body
    }
}

/// Configuration of a `nebula` embedder (`embedders.<name>.config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NebulaEmbedConfig {
    /// The Nebula API key (use `${NEBULA_API_KEY}`).
    pub api_key: Secret,
    /// API base URL. Default `https://api-nebula.symbl.ai`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// The embedding model. Default `nebula-text-embedding-large` (1024 dimensions).
    #[serde(default = "default_embed_model")]
    pub model: String,
    /// Timeout of one attempt, in ms: connecting, the response headers and the whole answer
    /// body must come within it; otherwise the attempt fails and is retried. Default 5,000 ms.
    #[serde(default = "default_embed_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after a 429, a 5xx or a connection failure. Default 3.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Longest wait between attempts, including `Retry-After`. Default 5,000 ms.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_embed_model() -> String {
    "nebula-text-embedding-large".into()
}
fn default_embed_timeout_ms() -> u64 {
    5_000
}

/// Nebula embeddings (`POST /v1/model/embed`, one text per call).
#[derive(Debug, Clone)]
pub struct NebulaEmbedder {
    model: String,
    http: NebulaClient,
}

impl NebulaEmbedder {
    /// An embedder named `name`.
    ///
    /// # Errors
    /// An empty API key.
    pub fn new(name: &str, config: NebulaEmbedConfig) -> Result<Self, PluginError> {
        let http = NebulaClient::new(
            name,
            "embedder",
            config.api_key,
            &config.base_url,
            config.timeout_ms,
            retry_policy(config.max_retries, config.max_backoff_ms),
        )?;
        Ok(NebulaEmbedder {
            model: config.model,
            http,
        })
    }

    async fn embed_one(&self, text: &str) -> Result<Vec<f32>, PluginError> {
        #[derive(Deserialize)]
        struct Answer {
            embedding: Vec<f32>,
        }
        let body = serde_json::json!({"model": self.model, "text": text});
        let bytes = self.http.post("/v1/model/embed", &body).await?;
        let a: Answer = serde_json::from_slice(&bytes).map_err(|e| {
            PluginError::external(format!(
                "Nebula `/v1/model/embed` answer has no float list `embedding`: {e}"
            ))
        })?;
        if a.embedding.is_empty() {
            return Err(PluginError::external(
                "Nebula `/v1/model/embed` answered an empty embedding",
            ));
        }
        Ok(a.embedding)
    }
}

#[async_trait]
impl Embedder for NebulaEmbedder {
    fn name(&self) -> &str {
        &self.http.name
    }

    fn id(&self) -> String {
        format!("nebula:{}", self.model)
    }

    fn dims(&self) -> Option<usize> {
        (self.model == "nebula-text-embedding-large").then_some(1024)
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        let mut out = Vec::with_capacity(texts.len());
        for t in texts {
            out.push(self.embed_one(t).await?);
        }
        Ok(out)
    }
}

#[async_trait]
impl ChatProvider for NebulaProvider {
    fn name(&self) -> &str {
        &self.http.name
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError> {
        let body = self.body(request);
        let Some(tokens) = tokens else {
            let bytes = self.http.post("/v1/model/chat", &body).await?;
            let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
                PluginError::external(format!("Nebula chat answer is not JSON: {e}"))
            })?;
            let text = v
                .get("messages")
                .and_then(|m| m.as_array())
                .and_then(|m| m.last())
                .and_then(|m| m.get("text"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| {
                    PluginError::external("Nebula chat answer has no `messages[-1].text`")
                })?;
            return Ok(ChatReply {
                text: text.to_owned(),
                provider: self.http.name.clone(),
                model: v.get("model").and_then(|m| m.as_str()).map(str::to_owned),
            });
        };
        self.stream(&body, &tokens).await
    }
}

impl NebulaProvider {
    /// The streamed call: deltas go to `tokens` as they arrive. No retries once the stream has
    /// started; a gap of `timeout` between chunks is an error, however long the whole answer.
    async fn stream(
        &self,
        body: &serde_json::Value,
        tokens: &mpsc::Sender<String>,
    ) -> Result<ChatReply, PluginError> {
        let path = "/v1/model/chat/streaming";
        let resp = self.http.post_stream(path, body).await?;
        let mut text = String::new();
        let mut events = SseReader::new(resp, self.http.timeout);
        loop {
            let data = match events.next().await {
                Ok(Some(SseMessage::Data(data))) => data,
                // Nebula is not known to send `[DONE]`; when a server does, the answer is over.
                Ok(Some(SseMessage::Done) | None) => break,
                Err(SseError::Stalled) => {
                    return Err(PluginError::external(format!(
                        "Nebula `{path}`: the answer stream stalled after {} characters \
                         (nothing for {} ms)",
                        text.chars().count(),
                        self.http.timeout.as_millis()
                    )));
                }
                Err(SseError::Broken(e)) => {
                    return Err(PluginError::external(format!(
                        "Nebula `{path}`: the answer stream broke after {} characters: {e}",
                        text.chars().count()
                    )));
                }
            };
            if let Some(delta) = delta_of(&data).filter(|d| !d.is_empty()) {
                if text.is_empty() {
                    prompter_core::meter::first_token();
                }
                text.push_str(&delta);
                // A closed receiver only means nobody is watching the stream.
                let _ = tokens.send(delta).await;
            }
        }
        if text.is_empty() {
            return Err(PluginError::external(format!(
                "Nebula streamed no text: the answer stream of `{path}` ended without a `delta`"
            )));
        }
        Ok(ChatReply {
            text,
            provider: self.http.name.clone(),
            model: None,
        })
    }
}

/// The `delta` of one event's data (`{"delta": "..."}`); anything else (undecodable data, other
/// shapes) is ignored, as the format beyond `delta` is unconfirmed.
fn delta_of(data: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    v.get("delta").and_then(|d| d.as_str()).map(str::to_owned)
}

#[cfg(test)]
mod tests;
