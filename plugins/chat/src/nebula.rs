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
use prompter_core::secret::Secret;
use serde::Deserialize;
use tokio::sync::mpsc;

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
    pub top_p: f32,
    /// Top-k sampling. Default 1.
    #[serde(default = "default_top_k")]
    pub top_k: u32,
    /// Repetition penalty (the RTA guide uses 1.2); not sent when unset.
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
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
fn default_top_p() -> f32 {
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

/// How one attempt ended.
enum Outcome {
    Done(Answer),
    Fatal(PluginError),
    Retry {
        after: Option<Duration>,
        why: String,
    },
}

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
        let mut attempt = 0u32;
        loop {
            let outcome = match tokio::time::timeout(
                self.timeout,
                self.attempt(&url, path, &payload, stream),
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Retry {
                    after: None,
                    why: format!("no answer within {} ms", self.timeout.as_millis()),
                },
            };
            let (retry_after, why) = match outcome {
                Outcome::Done(answer) => return Ok(answer),
                Outcome::Fatal(e) => return Err(e),
                Outcome::Retry { after, why } => (after, why),
            };
            if !self.retry.allows_retry(attempt) {
                return Err(PluginError::external(format!(
                    "Nebula `{path}` failed after {} attempt(s): {why}",
                    attempt + 1
                )));
            }
            let wait = self.retry.wait(attempt, retry_after);
            tracing::warn!(
                resource = %self.name,
                call = path,
                attempt = attempt + 1,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                error = %why,
                "Nebula call failed; retrying."
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
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
                return Outcome::Retry {
                    after: None,
                    why: format!("no answer within {} ms", self.timeout.as_millis()),
                };
            }
            Err(e) => {
                return Outcome::Retry {
                    after: None,
                    why: format!("request failed: {e}"),
                };
            }
        };
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            if stream {
                return Outcome::Done(Answer::Stream(resp));
            }
            return match resp.bytes().await {
                Ok(bytes) => Outcome::Done(Answer::Body(bytes.to_vec())),
                Err(e) => Outcome::Retry {
                    after: None,
                    why: format!("reading the answer failed: {e}"),
                },
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
            return Outcome::Fatal(PluginError::config(format!(
                "Nebula rejected the API key of {} `{}` ({status}); check the key in its `api_key`",
                self.section, self.name
            )));
        }
        if status != 429 && status < 500 {
            return Outcome::Fatal(PluginError::input(format!(
                "Nebula `{path}` answered {status}: {detail}"
            )));
        }
        Outcome::Retry {
            after: retry_after,
            why: format!("{status}: {detail}"),
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
        let mut resp = self.http.post_stream(path, body).await?;
        let mut text = String::new();
        let mut lines = SseLines::default();
        loop {
            let chunk = match tokio::time::timeout(self.http.timeout, resp.chunk()).await {
                Err(_) => {
                    return Err(PluginError::external(format!(
                        "Nebula `{path}`: the answer stream stalled after {} characters \
                         (nothing for {} ms)",
                        text.chars().count(),
                        self.http.timeout.as_millis()
                    )));
                }
                Ok(Err(e)) => {
                    return Err(PluginError::external(format!(
                        "Nebula `{path}`: the answer stream broke after {} characters: {e}",
                        text.chars().count()
                    )));
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            for line in lines.push(&chunk) {
                take_line(&line, &mut text, tokens).await;
            }
        }
        if let Some(line) = lines.rest() {
            take_line(&line, &mut text, tokens).await;
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

/// Adds the `delta` of one SSE line, if any, to `text` and passes it on to `tokens`.
async fn take_line(line: &str, text: &mut String, tokens: &mpsc::Sender<String>) {
    if let Some(delta) = sse_delta(line).filter(|d| !d.is_empty()) {
        text.push_str(&delta);
        // A closed receiver only means nobody is watching the stream.
        let _ = tokens.send(delta).await;
    }
}

/// Splits an SSE byte stream into lines, however the network cut it (mid-line, mid-character):
/// bytes are buffered and only complete lines are decoded.
#[derive(Debug, Default)]
struct SseLines {
    pending: Vec<u8>,
}

impl SseLines {
    /// The complete lines in `pending` + `chunk`; keeps the unfinished tail.
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let Some(last_newline) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        complete
            .split(|b| *b == b'\n')
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    /// The unfinished last line, when the stream ended without a newline.
    fn rest(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then(|| String::from_utf8_lossy(&rest).into_owned())
    }
}

/// The `delta` of one SSE line (`data: {"delta": "..."}`); anything else (comments, `[DONE]`,
/// undecodable lines) is ignored, as the format beyond `delta` is unconfirmed.
fn sse_delta(line: &str) -> Option<String> {
    let data = line.trim().strip_prefix("data:")?.trim();
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    v.get("delta").and_then(|d| d.as_str()).map(str::to_owned)
}

#[cfg(test)]
mod tests;
