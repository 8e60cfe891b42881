//! The `nebula` chat provider: Symbl's Nebula chat API (`/v1/model/chat`), and its streamed
//! variant (`/v1/model/chat/streaming`, Server-Sent Events with `delta` chunks) when the caller
//! wants tokens as they arrive.
//!
//! Calls have a timeout; 429 and 5xx answers (and connection failures) are retried with jittered
//! exponential backoff that honours `Retry-After`, a bounded number of times. Errors say which
//! call failed and why. The API key travels only in the `ApiKey` header; it is never logged.
//!
//! ```yaml
//! llm:
//!   nebula:
//!     provider: nebula
//!     config:
//!       api_key: ${NEBULA_API_KEY}
//!       max_new_tokens: 256
//! ```

use std::time::Duration;

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::{ChatProvider, ChatReply, ChatRequest, Role};
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

/// A Nebula chat provider.
#[derive(Debug, Clone)]
pub struct NebulaProvider {
    name: String,
    config: NebulaConfig,
    client: reqwest::Client,
}

impl NebulaProvider {
    /// A provider named `name`.
    ///
    /// # Errors
    /// An empty API key (an unset `${NEBULA_API_KEY:-}`).
    pub fn new(name: &str, config: NebulaConfig) -> Result<Self, PluginError> {
        if config.api_key.is_empty() {
            return Err(PluginError::config(format!(
                "llm `{name}`: `api_key` is empty (set NEBULA_API_KEY)"
            )));
        }
        // reqwest panics without a process-wide rustls crypto provider; installing twice is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .build()
            .map_err(|e| PluginError::internal("cannot build the HTTP client").with_source(e))?;
        Ok(NebulaProvider {
            name: name.to_owned(),
            config,
            client,
        })
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

    /// POSTs `body` to `path`, retrying 429/5xx/connection failures; returns the 2xx response.
    async fn post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<reqwest::Response, PluginError> {
        let url = format!("{}{path}", self.config.base_url.trim_end_matches('/'));
        let payload = serde_json::to_vec(body)
            .map_err(|e| PluginError::internal("request did not serialize").with_source(e))?;
        let mut attempt = 0u32;
        loop {
            let sent = self
                .client
                .post(&url)
                .header("ApiKey", self.config.api_key.expose())
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
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .map(Duration::from_secs);
                    let text = resp.text().await.unwrap_or_default();
                    let detail: String = text.chars().take(200).collect();
                    if status == 401 || status == 403 {
                        return Err(PluginError::config(format!(
                            "Nebula rejected the API key of llm `{}` ({status}); check the key in its `api_key`",
                            self.name
                        )));
                    }
                    if status != 429 && status < 500 {
                        return Err(PluginError::input(format!(
                            "Nebula `{path}` answered {status}: {detail}"
                        )));
                    }
                    (retry_after, format!("{status}: {detail}"))
                }
                Err(e) if e.is_timeout() => (
                    None,
                    format!("no answer within {} ms", self.config.timeout_ms),
                ),
                Err(e) => (None, format!("request failed: {e}")),
            };
            if attempt >= self.config.max_retries {
                return Err(PluginError::external(format!(
                    "Nebula `{path}` failed after {} attempt(s): {why}",
                    attempt + 1
                )));
            }
            let wait = retry_after
                .unwrap_or_else(|| backoff(attempt))
                .min(Duration::from_millis(self.config.max_backoff_ms));
            tracing::warn!(llm = %self.name, attempt = attempt + 1, wait_ms = wait.as_millis() as u64, error = %why, "Nebula call failed; retrying.");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// 200 ms, 400 ms, 800 ms, ... with up to 50% jitter.
fn backoff(attempt: u32) -> Duration {
    let base = 200u64.saturating_mul(1 << attempt.min(10));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Duration::from_millis(base + base * u64::from(nanos % 500) / 1000)
}

#[async_trait]
impl ChatProvider for NebulaProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError> {
        let body = self.body(request);
        let Some(tokens) = tokens else {
            let resp = self.post("/v1/model/chat", &body).await?;
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
                provider: self.name.clone(),
                model: v.get("model").and_then(|m| m.as_str()).map(str::to_owned),
            });
        };
        let mut resp = self.post("/v1/model/chat/streaming", &body).await?;
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
            provider: self.name.clone(),
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
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use prompter_core::resource::ChatMessage;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake Nebula: `script` lists the status of each successive chat call (200 = answer).
    #[derive(Clone)]
    struct Fake {
        calls: Arc<AtomicU32>,
        script: Arc<Vec<u16>>,
    }

    async fn chat(
        State(f): State<Fake>,
        headers: HeaderMap,
        body: String,
    ) -> axum::response::Response {
        let n = f.calls.fetch_add(1, Ordering::SeqCst) as usize;
        if headers.get("ApiKey").and_then(|v| v.to_str().ok()) != Some("test-key") {
            return (
                StatusCode::UNAUTHORIZED,
                r#"{"message": "Token validation failed for provided token."}"#,
            )
                .into_response();
        }
        let req: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(req["messages"][0]["role"], "human");
        assert!(req["system_prompt"].is_string());
        match f.script.get(n).copied().unwrap_or(200) {
            200 => {
                let answer = serde_json::json!({"messages": [
                    {"role": "human", "text": req["messages"][0]["text"]},
                    {"role": "assistant", "text": "Offer the starter tier."}]});
                (StatusCode::OK, answer.to_string()).into_response()
            }
            429 => (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "1")],
                "slow down",
            )
                .into_response(),
            code => (StatusCode::from_u16(code).unwrap(), "upstream trouble").into_response(),
        }
    }

    async fn stream(State(f): State<Fake>) -> impl IntoResponse {
        f.calls.fetch_add(1, Ordering::SeqCst);
        let body = "data: {\"delta\": \"Offer the\"}\n\n: a comment\ndata: {\"delta\": \" starter tier.\"}\n\ndata: [DONE]\n\n";
        ([("content-type", "text/event-stream")], body)
    }

    async fn fake(script: Vec<u16>) -> (String, Arc<AtomicU32>) {
        let calls = Arc::new(AtomicU32::new(0));
        let state = Fake {
            calls: calls.clone(),
            script: Arc::new(script),
        };
        let app = axum::Router::new()
            .route("/v1/model/chat", post(chat))
            .route("/v1/model/chat/streaming", post(stream))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}"), calls)
    }

    fn provider(base_url: &str, key: &str) -> NebulaProvider {
        let cfg: NebulaConfig = serde_json::from_value(serde_json::json!({
            "api_key": key, "base_url": base_url, "max_backoff_ms": 50, "timeout_ms": 2000}))
        .unwrap();
        NebulaProvider::new("nebula", cfg).unwrap()
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
    async fn answers_with_the_last_message() {
        let (url, calls) = fake(vec![200]).await;
        let reply = provider(&url, "test-key")
            .chat(&request(), None)
            .await
            .unwrap();
        assert_eq!(reply.text, "Offer the starter tier.");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_503_twice_then_succeeds_and_honours_retry_after() {
        let (url, calls) = fake(vec![503, 503, 200]).await;
        assert_eq!(
            provider(&url, "test-key")
                .chat(&request(), None)
                .await
                .unwrap()
                .text,
            "Offer the starter tier."
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        let (url, calls) = fake(vec![429, 200]).await;
        assert_eq!(
            provider(&url, "test-key")
                .chat(&request(), None)
                .await
                .unwrap()
                .text,
            "Offer the starter tier."
        );
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn gives_up_after_the_retry_budget_and_says_why() {
        let (url, calls) = fake(vec![503; 10]).await;
        let err = provider(&url, "test-key")
            .chat(&request(), None)
            .await
            .unwrap_err();
        assert_eq!(
            err.message,
            "Nebula `/v1/model/chat` failed after 4 attempt(s): 503: upstream trouble"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_bad_key_is_a_config_error_that_never_shows_the_key() {
        let (url, _) = fake(vec![200]).await;
        let p = provider(&url, "wrong-secret-value");
        let err = p.chat(&request(), None).await.unwrap_err();
        assert_eq!(err.kind, prompter_core::error::ErrorKind::Config);
        assert!(err.message.contains("(401)"), "{}", err.message);
        assert!(!format!("{err} {err:?} {p:?}").contains("wrong-secret-value"));
    }

    #[tokio::test]
    async fn streams_deltas_as_they_arrive() {
        let (url, _) = fake(vec![]).await;
        let (tx, mut rx) = mpsc::channel(8);
        let reply = provider(&url, "test-key")
            .chat(&request(), Some(tx))
            .await
            .unwrap();
        assert_eq!(reply.text, "Offer the starter tier.");
        assert_eq!(rx.recv().await.unwrap(), "Offer the");
        assert_eq!(rx.recv().await.unwrap(), " starter tier.");
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
