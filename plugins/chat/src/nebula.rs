//! The `nebula` chat provider: Symbl's Nebula chat API (`/v1/model/chat`), and its streamed
//! variant (`/v1/model/chat/streaming`, Server-Sent Events with `delta` chunks) when the caller
//! wants tokens as they arrive.
//!
//! Calls have a timeout; 429 and 5xx answers (and connection failures) are retried with jittered
//! exponential backoff that honours `Retry-After`, a bounded number of times. Errors say which
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
    /// Per-attempt timeout. Default 10,000 ms.
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

/// The HTTP side shared by Nebula chat and embeddings: base URL, key, timeout and retries.
#[derive(Debug, Clone)]
struct NebulaClient {
    /// The resource name, for errors and logs.
    name: String,
    /// `llm` or `embedder`, for errors.
    section: &'static str,
    base_url: String,
    api_key: Secret,
    timeout_ms: u64,
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
        // reqwest panics without a process-wide rustls crypto provider; installing twice is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(timeout_ms.max(1)))
            .build()
            .map_err(|e| PluginError::internal("cannot build the HTTP client").with_source(e))?;
        Ok(NebulaClient {
            name: name.to_owned(),
            section,
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key,
            timeout_ms,
            retry,
            client,
        })
    }

    /// POSTs `body` to `path`, retrying 429/5xx/connection failures; returns the 2xx response.
    async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, PluginError> {
        let url = format!("{}{path}", self.base_url);
        let payload = serde_json::to_vec(body)
            .map_err(|e| PluginError::internal("request did not serialize").with_source(e))?;
        let mut attempt = 0u32;
        loop {
            let sent = self
                .client
                .post(&url)
                .header("ApiKey", self.api_key.expose())
                .header("Content-Type", "application/json")
                .header("Accept", "application/json")
                .body(payload.clone())
                .send()
                .await;
            let (retry_after, why) = match sent {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_retry_after);
                    let text = resp.text().await.unwrap_or_default();
                    let detail: String = text.chars().take(200).collect();
                    if status == 401 || status == 403 {
                        return Err(PluginError::config(format!(
                            "Nebula rejected the API key of {} `{}` ({status}); check the key in its `api_key`",
                            self.section, self.name
                        )));
                    }
                    if status != 429 && status < 500 {
                        return Err(PluginError::input(format!(
                            "Nebula `{path}` answered {status}: {detail}"
                        )));
                    }
                    (retry_after, format!("{status}: {detail}"))
                }
                Err(e) if e.is_timeout() => {
                    (None, format!("no answer within {} ms", self.timeout_ms))
                }
                Err(e) => (None, format!("request failed: {e}")),
            };
            if !self.retry.allows_retry(attempt) {
                return Err(PluginError::external(format!(
                    "Nebula `{path}` failed after {} attempt(s): {why}",
                    attempt + 1
                )));
            }
            let wait = self.retry.wait(attempt, retry_after);
            tracing::warn!(resource = %self.name, call = path, attempt = attempt + 1, wait_ms = wait.as_millis() as u64, error = %why, "Nebula call failed; retrying.");
            tokio::time::sleep(wait).await;
            attempt += 1;
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
    /// Per-attempt timeout. Default 5,000 ms.
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
        let resp = self.http.post("/v1/model/embed", &body).await?;
        let bytes = resp.bytes().await.map_err(|e| {
            PluginError::external(format!("reading the Nebula embedding failed: {e}"))
        })?;
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
            let resp = self.http.post("/v1/model/chat", &body).await?;
            let bytes = resp.bytes().await.map_err(|e| {
                PluginError::external(format!("reading the Nebula chat answer failed: {e}"))
            })?;
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
        let mut resp = self.http.post("/v1/model/chat/streaming", &body).await?;
        let mut text = String::new();
        let mut pending = String::new();
        loop {
            let chunk = resp
                .chunk()
                .await
                .map_err(|e| PluginError::external(format!("Nebula stream broke: {e}")))?;
            let Some(chunk) = chunk else { break };
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(nl) = pending.find('\n') {
                let line: String = pending.drain(..=nl).collect();
                if let Some(delta) = sse_delta(&line) {
                    text.push_str(&delta);
                    // A closed receiver only means nobody is watching the stream.
                    let _ = tokens.send(delta).await;
                }
            }
        }
        if let Some(delta) = sse_delta(&pending) {
            text.push_str(&delta);
            let _ = tokens.send(delta).await;
        }
        Ok(ChatReply {
            text,
            provider: self.http.name.clone(),
            model: None,
        })
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
mod tests {
    use super::*;
    use prompter_core::resource::ChatMessage;
    use prompter_fakes::nebula::{Endpoint, NebulaFake};

    const ANSWER: &str = "Offer the starter tier and a pilot.";

    async fn fake() -> NebulaFake {
        let f = NebulaFake::start("test-key").await;
        f.set_answer(ANSWER);
        f
    }

    fn provider(base_url: &str, key: &str) -> NebulaProvider {
        let cfg: NebulaConfig = serde_json::from_value(serde_json::json!({
            "api_key": key, "base_url": base_url, "max_backoff_ms": 50, "timeout_ms": 2000}))
        .unwrap();
        NebulaProvider::new("nebula", cfg).unwrap()
    }

    fn embedder(base_url: &str) -> NebulaEmbedder {
        let cfg: NebulaEmbedConfig = serde_json::from_value(serde_json::json!({
            "api_key": "test-key", "base_url": base_url, "max_backoff_ms": 50}))
        .unwrap();
        NebulaEmbedder::new("nebula", cfg).unwrap()
    }

    fn request() -> ChatRequest {
        ChatRequest {
            system_prompt: "Be brief.".into(),
            messages: vec![ChatMessage {
                role: Role::Human,
                text: "Budget Constraints".into(),
            }],
            context: vec![],
            max_new_tokens: 64,
            temperature: 0.0,
        }
    }

    #[tokio::test]
    async fn answers_with_the_last_message_and_sends_the_seed_parameters() {
        let f = fake().await;
        let reply = provider(&f.url, "test-key")
            .chat(&request(), None)
            .await
            .unwrap();
        assert_eq!(reply.text, ANSWER);
        assert_eq!(f.chat_attempts(), 1);
        let sent = &f.chat_requests()[0];
        assert_eq!(sent["messages"][0]["role"], "human");
        assert_eq!(sent["system_prompt"], "Be brief.");
        assert_eq!(
            (sent["top_k"].as_u64(), sent["max_new_tokens"].as_u64()),
            (Some(1), Some(64))
        );
    }

    #[tokio::test]
    async fn retries_503_twice_then_succeeds_and_honours_retry_after() {
        let f = fake().await;
        f.fail_next(Endpoint::Chat, &[503, 503]);
        let p = provider(&f.url, "test-key");
        assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
        assert_eq!(f.chat_attempts(), 3);
        f.fail_next(Endpoint::Chat, &[429]);
        assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
        assert_eq!(f.chat_attempts(), 5);
    }

    #[tokio::test]
    async fn gives_up_after_the_retry_budget_and_says_why() {
        let f = fake().await;
        f.set_down(true);
        let err = provider(&f.url, "test-key")
            .chat(&request(), None)
            .await
            .unwrap_err();
        assert_eq!(
            err.message,
            r#"Nebula `/v1/model/chat` failed after 4 attempt(s): 503: {"message":"Service temporarily unavailable"}"#
        );
        assert_eq!(f.chat_attempts(), 4);
    }

    #[tokio::test]
    async fn a_bad_key_is_a_config_error_that_never_shows_the_key() {
        let f = fake().await;
        let p = provider(&f.url, "wrong-secret-value");
        let err = p.chat(&request(), None).await.unwrap_err();
        assert_eq!(err.kind, prompter_core::error::ErrorKind::Config);
        assert!(err.message.contains("(401)"), "{}", err.message);
        assert!(!format!("{err} {err:?} {p:?}").contains("wrong-secret-value"));
    }

    #[tokio::test]
    async fn streams_deltas_as_they_arrive() {
        let f = fake().await;
        let (tx, mut rx) = mpsc::channel(8);
        let reply = provider(&f.url, "test-key")
            .chat(&request(), Some(tx))
            .await
            .unwrap();
        assert_eq!(reply.text, ANSWER);
        assert_eq!(rx.recv().await.unwrap(), "Offer the starter ");
        assert_eq!(rx.recv().await.unwrap(), "tier and a pilot.");
    }

    #[tokio::test]
    async fn embeds_one_text_per_call_with_retries() {
        let f = fake().await;
        f.fail_next(Endpoint::Embed, &[503]);
        let e = embedder(&f.url);
        assert_eq!(e.id(), "nebula:nebula-text-embedding-large");
        assert_eq!(e.dims(), Some(1024));
        let v = e
            .embed(&["Budget Constraints".into(), "Timing".into()])
            .await
            .unwrap();
        assert_eq!((v.len(), v[0].len()), (2, 1024));
        assert_eq!(
            v[0],
            prompter_fakes::nebula::embedding("Budget Constraints")
        );
        assert_eq!(f.embed_attempts(), 3);
        assert_eq!(f.embedded_texts(), ["Budget Constraints", "Timing"]);
    }

    #[test]
    fn sse_lines_are_parsed_defensively() {
        assert_eq!(
            sse_delta("data: {\"delta\": \"hi\"}\n").as_deref(),
            Some("hi")
        );
        assert_eq!(
            sse_delta("data:{\"delta\":\"x\",\"other\":1}").as_deref(),
            Some("x")
        );
        assert_eq!(sse_delta("data: [DONE]"), None);
        assert_eq!(sse_delta(": keep-alive"), None);
        assert_eq!(sse_delta("data: {\"text\": \"no delta\"}"), None);
    }
}
