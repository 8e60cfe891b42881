//! The `openai` chat provider and embedder: the OpenAI v1 API (`POST /chat/completions`,
//! streamed as Server-Sent Events when the caller wants tokens as they arrive, and
//! `POST /embeddings`), as served by OpenAI and by local servers such as Ollama, vLLM and
//! llama.cpp under `/v1`.
//!
//! Calls have a per-attempt timeout; 408, 429 and 5xx answers (and connection failures) are
//! retried with jittered exponential backoff that honours `Retry-After` (and OpenAI's
//! `retry-after-ms`), a bounded number of times. A streamed answer is retried only until it
//! starts: once tokens have gone out, a broken or stalled stream is an error. The API key travels
//! only in the `Authorization: Bearer` header (left out when no key is configured, as local
//! servers need none); it never reaches a log or an error message, not even the masked form
//! OpenAI echoes in its 401 answers.
//!
//! It does not own the `chat` stage (see the crate root) nor the wiring of `provider: openai`
//! (the engine's registry).
//!
//! ```yaml
//! llm:
//!   gpt:
//!     provider: openai
//!     config:
//!       api_key: ${OPENAI_API_KEY}
//!       model: gpt-4o-mini
//!       max_tokens: 256          # overrides the prompt stage's `max_new_tokens`
//!   local:                       # Ollama (vLLM: http://localhost:8000/v1; llama.cpp: :8080/v1)
//!     provider: openai
//!     config:
//!       base_url: http://localhost:11434/v1
//!       model: llama3.2
//! embedders:
//!   oai:
//!     provider: openai
//!     config:
//!       api_key: ${OPENAI_API_KEY}
//!       model: text-embedding-3-small
//!       dimensions: 512          # optional; sent to the server and used as the known length
//!   local:
//!     provider: openai
//!     config: { base_url: "http://localhost:11434/v1", model: nomic-embed-text }
//! ```

use std::fmt;
use std::time::Duration;

use prompter_core::async_trait;
use prompter_core::backoff::{Backoff, parse_retry_after};
use prompter_core::error::PluginError;
use prompter_core::resource::{ChatProvider, ChatReply, ChatRequest, Embedder, Role};
use prompter_core::secret::Secret;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Configuration of an `openai` chat provider (`llm.<name>.config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// API root, up to and including `/v1`. Default `https://api.openai.com/v1`; Ollama serves
    /// `http://localhost:11434/v1`, vLLM `http://localhost:8000/v1`, llama.cpp
    /// `http://localhost:8080/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// The API key (use `${OPENAI_API_KEY}`; never write it in the file). Optional for local
    /// servers; when unset or empty no `Authorization` header is sent.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// The model, e.g. `gpt-4o-mini` (on Ollama: `llama3.2`). Required.
    pub model: String,
    /// Maximum tokens to generate; overrides the prompt stage's `max_new_tokens` when set.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Sampling temperature (0 to 2); overrides the prompt stage's `temperature` when set.
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus sampling (0 to 1); not sent when unset (the server's default applies).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Per-attempt timeout: until the answer is complete, or for a streamed answer until it
    /// starts and then between two pieces of it. Default 10,000 ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after a 408, a 429, a 5xx or a connection failure. Default 3.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Longest wait between attempts, including `Retry-After`. Default 5,000 ms.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

/// Configuration of an `openai` embedder (`embedders.<name>.config`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiEmbedConfig {
    /// API root, up to and including `/v1`. Default `https://api.openai.com/v1`.
    #[serde(default = "default_base_url")]
    pub base_url: String,
    /// The API key (use `${OPENAI_API_KEY}`). Optional for local servers.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// The embedding model, e.g. `text-embedding-3-small` (on Ollama: `nomic-embed-text`).
    /// Required.
    pub model: String,
    /// The vector length. When set it is sent as `dimensions` (OpenAI's `text-embedding-3-*`
    /// shorten their vectors to it), every answer is checked against it, and it names the
    /// vector space (`openai:{model}@{dimensions}`). Unset: the model's own length.
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// Most texts per call (1 to 2048, OpenAI's limit). Default 64.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Per-attempt timeout. Default 10,000 ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Retries after a 408, a 429, a 5xx or a connection failure. Default 3.
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    /// Longest wait between attempts, including `Retry-After`. Default 5,000 ms.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
}

fn default_base_url() -> String {
    "https://api.openai.com/v1".into()
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
fn default_max_batch() -> usize {
    64
}

/// OpenAI's limit on texts per embeddings call.
const MAX_BATCH_LIMIT: usize = 2048;

/// A config value that cannot work, with the key it sits under (so the engine can point at it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key in the provider's `config:` map.
    pub key: &'static str,
    /// What is wrong: lowercase, identifiers in backticks.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl OpenAiConfig {
    /// Every problem of this config, empty when it can work.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut out = common_problems(&self.base_url, self.api_key.as_ref(), &self.model);
        let mut bad = |key, message: String| out.push(ConfigProblem { key, message });
        if self.max_tokens == Some(0) {
            bad("max_tokens", "`max_tokens` must be at least 1".into());
        }
        if self.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            bad(
                "temperature",
                "`temperature` must be between 0 and 2".into(),
            );
        }
        if self.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            bad("top_p", "`top_p` must be between 0 and 1".into());
        }
        if self.timeout_ms == 0 {
            bad("timeout_ms", "`timeout_ms` must be at least 1".into());
        }
        out
    }
}

impl OpenAiEmbedConfig {
    /// Every problem of this config, empty when it can work.
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut out = common_problems(&self.base_url, self.api_key.as_ref(), &self.model);
        let mut bad = |key, message: String| out.push(ConfigProblem { key, message });
        if self.dimensions == Some(0) {
            bad("dimensions", "`dimensions` must be at least 1".into());
        }
        if !(1..=MAX_BATCH_LIMIT).contains(&self.max_batch) {
            bad(
                "max_batch",
                format!("`max_batch` must be between 1 and {MAX_BATCH_LIMIT}"),
            );
        }
        if self.timeout_ms == 0 {
            bad("timeout_ms", "`timeout_ms` must be at least 1".into());
        }
        out
    }
}

fn common_problems(base_url: &str, api_key: Option<&Secret>, model: &str) -> Vec<ConfigProblem> {
    let mut out = Vec::new();
    match reqwest::Url::parse(base_url) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host_str().is_some() => {
            let path = url.path().trim_end_matches('/');
            if path.ends_with("/chat/completions") || path.ends_with("/embeddings") {
                out.push(ConfigProblem {
                    key: "base_url",
                    message: "`base_url` is the API root (e.g. `https://api.openai.com/v1`), \
                              without `/chat/completions` or `/embeddings`"
                        .into(),
                });
            }
            if url.host_str() == Some("api.openai.com") && key_of(api_key).is_none() {
                out.push(ConfigProblem {
                    key: "api_key",
                    message: "`api_key` is unset or empty, and `api.openai.com` needs one \
                              (set OPENAI_API_KEY and use `api_key: ${OPENAI_API_KEY}`)"
                        .into(),
                });
            }
        }
        _ => out.push(ConfigProblem {
            key: "base_url",
            message: format!("`base_url` is not an http(s) URL: `{base_url}`"),
        }),
    }
    if model.trim().is_empty() {
        out.push(ConfigProblem {
            key: "model",
            message: "`model` is empty; name the model, e.g. `gpt-4o-mini`".into(),
        });
    }
    out
}

/// The key to send: none when unset or empty (an unset `${OPENAI_API_KEY:-}`).
fn key_of(api_key: Option<&Secret>) -> Option<&Secret> {
    api_key.filter(|k| !k.is_empty())
}

fn first_problem(
    section: &str,
    name: &str,
    problems: Vec<ConfigProblem>,
) -> Result<(), PluginError> {
    match problems.into_iter().next() {
        Some(p) => Err(PluginError::config(format!("{section} `{name}`: {p}"))),
        None => Ok(()),
    }
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
        source: Option<reqwest::Error>,
    },
}

/// What to do with a non-2xx status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// 401/403: the key is wrong or missing.
    Auth,
    /// 408, 429, 5xx: try again.
    Retry,
    /// Any other 4xx: the request itself is wrong; retrying cannot help.
    Reject,
}

fn classify(status: u16) -> Class {
    match status {
        401 | 403 => Class::Auth,
        408 | 429 | 500.. => Class::Retry,
        _ => Class::Reject,
    }
}

/// The server's requested wait: OpenAI's `retry-after-ms`, else `Retry-After` in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| header("retry-after").and_then(parse_retry_after))
}

/// The innermost cause of an error ("Connection refused (os error 111)"), which says more than
/// reqwest's "error sending request for url (...)".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The HTTP side shared by chat and embeddings: base URL, optional key, timeout and retries.
#[derive(Debug, Clone)]
struct OpenAiClient {
    /// The resource name, for errors and logs.
    name: String,
    /// `llm` or `embedder`, for errors.
    section: &'static str,
    base_url: String,
    /// `host[:port]` of `base_url`, for errors.
    host: String,
    api_key: Option<Secret>,
    timeout: Duration,
    retry: Backoff,
    client: reqwest::Client,
}

impl OpenAiClient {
    fn new(
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
    fn who(&self) -> String {
        format!("{} `{}`", self.section, self.name)
    }

    /// POSTs `body` to `path`, retrying 408/429/5xx/connection failures and timeouts. With
    /// `stream`, returns as soon as a 2xx status arrives; else reads the whole body.
    async fn call(
        &self,
        path: &str,
        body: &impl Serialize,
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
                    source: None,
                },
            };
            let (after, why, source) = match outcome {
                Outcome::Done(answer) => return Ok(answer),
                Outcome::Fatal(e) => return Err(e),
                Outcome::Retry { after, why, source } => (after, why, source),
            };
            if !self.retry.allows_retry(attempt) {
                let err = PluginError::external(format!(
                    "{}: `POST {path}` on `{}` failed after {} attempt(s): {why}",
                    self.who(),
                    self.host,
                    attempt + 1
                ));
                return Err(match source {
                    Some(s) => err.with_source(s),
                    None => err,
                });
            }
            let wait = self.retry.wait(attempt, after);
            tracing::warn!(
                resource = %self.name,
                call = path,
                attempt = attempt + 1,
                wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                error = %why,
                "OpenAI-compatible call failed; retrying."
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
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
                return Outcome::Retry {
                    after: None,
                    why: format!("{what}: {}", root_cause(&e)),
                    source: Some(e),
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
                    why: format!("reading the answer failed: {}", root_cause(&e)),
                    source: Some(e),
                },
            };
        }
        let after = retry_after(resp.headers());
        let text = resp.text().await.unwrap_or_default();
        match classify(status) {
            // The body is left out on purpose: OpenAI's 401 echoes part of the key.
            Class::Auth => Outcome::Fatal(PluginError::config(match self.api_key {
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
                after,
                why: format!("{status}: {}", self.detail(&text)),
                source: None,
            },
            Class::Reject => {
                let hint = if status == 404 {
                    "; check `model` and `base_url` (the API root, e.g. ending in `/v1`)"
                } else {
                    ""
                };
                Outcome::Fatal(PluginError::input(format!(
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
    fn detail(&self, body: &str) -> String {
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

/// One message on the wire.
#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

/// The body of `POST /chat/completions`.
#[derive(Debug, Serialize)]
struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    /// Left out when zero (the server's default then applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    stream: bool,
}

/// An OpenAI-compatible chat provider.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    config: OpenAiConfig,
    http: OpenAiClient,
}

impl OpenAiProvider {
    /// A provider named `name`.
    ///
    /// # Errors
    /// A config with problems ([`OpenAiConfig::problems`]: a bad `base_url`, an empty `model`,
    /// no key for `api.openai.com`, values out of range); the first one is reported.
    pub fn new(name: &str, config: OpenAiConfig) -> Result<Self, PluginError> {
        first_problem("llm", name, config.problems())?;
        let http = OpenAiClient::new(
            name,
            "llm",
            &config.base_url,
            config.api_key.as_ref(),
            config.timeout_ms,
            config.max_retries,
            config.max_backoff_ms,
        )?;
        Ok(OpenAiProvider { config, http })
    }

    fn body<'a>(&'a self, request: &'a ChatRequest, stream: bool) -> ChatBody<'a> {
        let system = request.system_prompt.trim();
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        if !system.is_empty() {
            messages.push(WireMessage {
                role: "system",
                content: &request.system_prompt,
            });
        }
        messages.extend(request.messages.iter().map(|m| WireMessage {
            role: match m.role {
                Role::Human => "user",
                Role::Assistant => "assistant",
            },
            content: &m.text,
        }));
        ChatBody {
            model: &self.config.model,
            messages,
            max_tokens: self
                .config
                .max_tokens
                .or(Some(request.max_new_tokens))
                .filter(|n| *n > 0),
            temperature: self.config.temperature.unwrap_or(request.temperature),
            top_p: self.config.top_p,
            stream,
        }
    }

    #[tracing::instrument(name = "llm_chat.request", skip_all, fields(model = %self.config.model, otel.kind = "client"), err(level = tracing::Level::INFO))]
    async fn complete(&self, request: &ChatRequest) -> Result<ChatReply, PluginError> {
        #[derive(Deserialize)]
        struct Completion {
            model: Option<String>,
            #[serde(default)]
            choices: Vec<Choice>,
        }
        #[derive(Deserialize)]
        struct Choice {
            message: Option<Message>,
            finish_reason: Option<String>,
        }
        #[derive(Deserialize)]
        struct Message {
            content: Option<String>,
            refusal: Option<String>,
        }
        let path = "/chat/completions";
        let bytes = match self
            .http
            .call(path, &self.body(request, false), false)
            .await?
        {
            Answer::Body(bytes) => bytes,
            Answer::Stream(_) => {
                return Err(PluginError::internal(
                    "invariant: a non-streamed call answered a stream",
                ));
            }
        };
        let completion: Completion = serde_json::from_slice(&bytes).map_err(|e| {
            PluginError::external(format!(
                "{}: the answer of `POST {path}` is not a chat completion: {e}",
                self.http.who()
            ))
            .with_source(e)
        })?;
        let choice = completion.choices.into_iter().next();
        let finish = choice.as_ref().and_then(|c| c.finish_reason.clone());
        let message = choice.and_then(|c| c.message);
        let text = match message {
            Some(Message {
                content: Some(text),
                ..
            }) => text,
            Some(Message {
                refusal: Some(refusal),
                ..
            }) => {
                return Err(PluginError::external(format!(
                    "{}: the model refused: {refusal}",
                    self.http.who()
                )));
            }
            _ => {
                return Err(PluginError::external(format!(
                    "{}: the answer of `POST {path}` has no `choices[0].message.content` \
                     (finish_reason: {})",
                    self.http.who(),
                    finish.as_deref().unwrap_or("none")
                )));
            }
        };
        if finish.as_deref() == Some("length") {
            tracing::debug!(resource = %self.http.name, "Answer cut at `max_tokens`.");
        }
        Ok(ChatReply {
            text,
            provider: self.http.name.clone(),
            model: completion.model.or_else(|| Some(self.config.model.clone())),
        })
    }

    #[tracing::instrument(name = "llm_chat.request", skip_all, fields(model = %self.config.model, otel.kind = "client", stream = true), err(level = tracing::Level::INFO))]
    async fn stream(
        &self,
        request: &ChatRequest,
        tokens: mpsc::Sender<String>,
    ) -> Result<ChatReply, PluginError> {
        let path = "/chat/completions";
        let mut resp = match self
            .http
            .call(path, &self.body(request, true), true)
            .await?
        {
            Answer::Stream(resp) => resp,
            Answer::Body(_) => {
                return Err(PluginError::internal(
                    "invariant: a streamed call answered a whole body",
                ));
            }
        };
        let who = self.http.who();
        let mut lines = SseLines::default();
        let mut reply = StreamedReply::default();
        while !reply.done {
            let chunk = match tokio::time::timeout(self.http.timeout, resp.chunk()).await {
                Err(_) => {
                    return Err(PluginError::external(format!(
                        "{who}: the answer stream of `POST {path}` stalled: nothing for {} ms \
                         after {} characters",
                        self.http.timeout.as_millis(),
                        reply.text.chars().count()
                    )));
                }
                Ok(Err(e)) => {
                    return Err(PluginError::external(format!(
                        "{who}: the answer stream of `POST {path}` broke after {} characters: {}",
                        reply.text.chars().count(),
                        root_cause(&e)
                    ))
                    .with_source(e));
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            for line in lines.push(&chunk) {
                reply.take(&who, &line, &tokens).await?;
            }
        }
        if !reply.done {
            if let Some(line) = lines.rest() {
                reply.take(&who, &line, &tokens).await?;
            }
        }
        if !reply.done && reply.finish_reason.is_none() {
            return Err(PluginError::external(format!(
                "{who}: the answer stream of `POST {path}` ended before `[DONE]` after {} \
                 characters",
                reply.text.chars().count()
            )));
        }
        Ok(ChatReply {
            text: reply.text,
            provider: self.http.name.clone(),
            model: reply.model.or_else(|| Some(self.config.model.clone())),
        })
    }
}

#[async_trait]
impl ChatProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.http.name
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError> {
        match tokens {
            Some(tokens) => self.stream(request, tokens).await,
            None => self.complete(request).await,
        }
    }
}

/// Splits an SSE byte stream into lines, however the network cut it (mid-line, mid-character).
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

/// What one SSE line says.
#[derive(Debug, Default, PartialEq)]
struct SseEvent {
    /// New text (`choices[0].delta.content`), when non-empty.
    delta: Option<String>,
    /// `choices[0].finish_reason`, when set.
    finish_reason: Option<String>,
    /// The chunk's `model`.
    model: Option<String>,
    /// `data: [DONE]`.
    done: bool,
    /// An `{"error": ...}` sent inside the stream.
    error: Option<String>,
}

/// Reads one SSE line. Comments (`: keep-alive`), blank lines, other fields (`event:`, `id:`)
/// and undecodable data give `None`; so do chunks without content, such as the role-only first
/// one.
fn sse_event(line: &str) -> Option<SseEvent> {
    let data = line.trim().strip_prefix("data:")?.trim();
    if data == "[DONE]" {
        return Some(SseEvent {
            done: true,
            ..SseEvent::default()
        });
    }
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    if let Some(e) = v.get("error") {
        let message = e
            .as_str()
            .or_else(|| e.get("message").and_then(|m| m.as_str()))
            .unwrap_or("unspecified error");
        return Some(SseEvent {
            error: Some(message.to_owned()),
            ..SseEvent::default()
        });
    }
    let choice = v.get("choices")?.as_array()?.iter().find(|c| {
        c.get("index")
            .and_then(serde_json::Value::as_u64)
            .is_none_or(|i| i == 0)
    })?;
    let event = SseEvent {
        delta: choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .and_then(|c| c.as_str())
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        finish_reason: choice
            .get("finish_reason")
            .and_then(|f| f.as_str())
            .map(str::to_owned),
        model: v.get("model").and_then(|m| m.as_str()).map(str::to_owned),
        done: false,
        error: None,
    };
    (event.delta.is_some() || event.finish_reason.is_some()).then_some(event)
}

/// The answer gathered from a stream so far.
#[derive(Debug, Default)]
struct StreamedReply {
    text: String,
    model: Option<String>,
    finish_reason: Option<String>,
    done: bool,
}

impl StreamedReply {
    /// Takes in one line, passing new text on to `tokens`.
    async fn take(
        &mut self,
        who: &str,
        line: &str,
        tokens: &mpsc::Sender<String>,
    ) -> Result<(), PluginError> {
        let Some(event) = sse_event(line) else {
            return Ok(());
        };
        if let Some(message) = event.error {
            return Err(PluginError::external(format!(
                "{who}: the server reported an error mid-stream after {} characters: {message}",
                self.text.chars().count()
            )));
        }
        self.done |= event.done;
        if self.model.is_none() {
            self.model = event.model;
        }
        if event.finish_reason.is_some() {
            self.finish_reason = event.finish_reason;
        }
        if let Some(delta) = event.delta {
            self.text.push_str(&delta);
            // A closed receiver only means nobody is watching the stream.
            let _ = tokens.send(delta).await;
        }
        Ok(())
    }
}

/// The body of `POST /embeddings`.
#[derive(Debug, Serialize)]
struct EmbedBody<'a> {
    model: &'a str,
    input: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
}

/// OpenAI-compatible embeddings (`POST /embeddings`, up to `max_batch` texts per call).
#[derive(Debug, Clone)]
pub struct OpenAiEmbedder {
    model: String,
    dimensions: Option<usize>,
    max_batch: usize,
    http: OpenAiClient,
}

impl OpenAiEmbedder {
    /// An embedder named `name`.
    ///
    /// # Errors
    /// A config with problems ([`OpenAiEmbedConfig::problems`]); the first one is reported.
    pub fn new(name: &str, config: OpenAiEmbedConfig) -> Result<Self, PluginError> {
        first_problem("embedder", name, config.problems())?;
        let http = OpenAiClient::new(
            name,
            "embedder",
            &config.base_url,
            config.api_key.as_ref(),
            config.timeout_ms,
            config.max_retries,
            config.max_backoff_ms,
        )?;
        Ok(OpenAiEmbedder {
            model: config.model,
            dimensions: config.dimensions,
            max_batch: config.max_batch.max(1),
            http,
        })
    }

    #[tracing::instrument(name = "embed.request", skip_all, fields(model = %self.model, texts = texts.len(), otel.kind = "client"), err(level = tracing::Level::INFO))]
    async fn embed_batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        #[derive(Deserialize)]
        struct List {
            data: Vec<Item>,
        }
        #[derive(Deserialize)]
        struct Item {
            /// Position in the input; servers that leave it out answer in input order.
            #[serde(default)]
            index: Option<usize>,
            embedding: Vec<f32>,
        }
        let path = "/embeddings";
        let who = self.http.who();
        let body = EmbedBody {
            model: &self.model,
            input: texts,
            dimensions: self.dimensions,
        };
        let bytes = match self.http.call(path, &body, false).await? {
            Answer::Body(bytes) => bytes,
            Answer::Stream(_) => {
                return Err(PluginError::internal(
                    "invariant: a non-streamed call answered a stream",
                ));
            }
        };
        let list: List = serde_json::from_slice(&bytes).map_err(|e| {
            PluginError::external(format!(
                "{who}: the answer of `POST {path}` is not a list of float embeddings: {e}"
            ))
            .with_source(e)
        })?;
        let items = list.data;
        if items.len() != texts.len() {
            return Err(PluginError::external(format!(
                "{who}: `POST {path}` answered {} embeddings for {} texts",
                items.len(),
                texts.len()
            )));
        }
        let mut items: Vec<(usize, Vec<f32>)> = items
            .into_iter()
            .enumerate()
            .map(|(n, i)| (i.index.unwrap_or(n), i.embedding))
            .collect();
        items.sort_by_key(|(index, _)| *index);
        if items.iter().enumerate().any(|(n, (index, _))| *index != n) {
            return Err(PluginError::external(format!(
                "{who}: `POST {path}` answered indexes that are not 0 to {} once each",
                texts.len() - 1
            )));
        }
        let expected = self
            .dimensions
            .unwrap_or_else(|| items.first().map_or(0, |(_, v)| v.len()));
        if let Some((_, bad)) = items
            .iter()
            .find(|(_, v)| v.is_empty() || v.len() != expected)
        {
            return Err(PluginError::external(format!(
                "{who}: `POST {path}` answered a vector of length {} where {expected} was expected",
                bad.len()
            )));
        }
        Ok(items.into_iter().map(|(_, v)| v).collect())
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn name(&self) -> &str {
        &self.http.name
    }

    fn id(&self) -> String {
        match self.dimensions {
            Some(d) => format!("openai:{}@{d}", self.model),
            None => format!("openai:{}", self.model),
        }
    }

    fn dims(&self) -> Option<usize> {
        self.dimensions
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(self.max_batch) {
            out.extend(self.embed_batch(batch).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::error::ErrorKind;
    use prompter_core::resource::ChatMessage;
    use prompter_fakes::openai::{EmbedQuirk, Endpoint, OpenAiFake};
    use serde_json::json;

    const KEY: &str = "sk-test-0123456789";
    const ANSWER: &str = "Offer the starter tier and a pilot, then follow up next week.";

    async fn fake() -> OpenAiFake {
        let f = OpenAiFake::start_with_key(KEY).await;
        f.set_answer(ANSWER);
        f
    }

    fn config(base_url: &str, extra: serde_json::Value) -> OpenAiConfig {
        let mut cfg = json!({"base_url": base_url, "model": "gpt-4o-mini", "max_backoff_ms": 20});
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(cfg).unwrap()
    }

    fn provider(base_url: &str, key: Option<&str>) -> OpenAiProvider {
        let extra = match key {
            Some(k) => json!({"api_key": k}),
            None => json!({}),
        };
        OpenAiProvider::new("gpt", config(base_url, extra)).unwrap()
    }

    fn embedder(base_url: &str, extra: serde_json::Value) -> OpenAiEmbedder {
        let mut cfg = json!({"base_url": base_url, "api_key": KEY,
            "model": "text-embedding-3-small", "max_backoff_ms": 20});
        cfg.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        OpenAiEmbedder::new("oai", serde_json::from_value(cfg).unwrap()).unwrap()
    }

    fn request() -> ChatRequest {
        ChatRequest {
            system_prompt: "Be brief.".into(),
            messages: vec![
                ChatMessage {
                    role: Role::Human,
                    text: "Budget Constraints".into(),
                },
                ChatMessage {
                    role: Role::Assistant,
                    text: "Which budget?".into(),
                },
                ChatMessage {
                    role: Role::Human,
                    text: "This quarter's.".into(),
                },
            ],
            context: vec![],
            max_new_tokens: 64,
            temperature: 0.2,
        }
    }

    fn texts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn answers_and_sends_the_exact_request_body() {
        let f = fake().await;
        let reply = provider(&f.url, Some(KEY))
            .chat(&request(), None)
            .await
            .unwrap();
        assert_eq!(
            reply,
            ChatReply {
                text: ANSWER.into(),
                provider: "gpt".into(),
                model: Some("gpt-4o-mini".into()),
            }
        );
        let sent = f.requests();
        assert_eq!(sent.len(), 1);
        assert_eq!(
            sent[0].authorization.as_deref(),
            Some("Bearer sk-test-0123456789")
        );
        assert_eq!(
            sent[0].body,
            json!({
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Budget Constraints"},
                    {"role": "assistant", "content": "Which budget?"},
                    {"role": "user", "content": "This quarter's."},
                ],
                "max_tokens": 64,
                "temperature": 0.2,
                "stream": false,
            })
        );
    }

    #[tokio::test]
    async fn config_sampling_overrides_the_request() {
        let f = fake().await;
        let cfg = config(
            &f.url,
            json!({"api_key": KEY, "max_tokens": 5, "temperature": 0.7, "top_p": 0.9}),
        );
        let reply = OpenAiProvider::new("gpt", cfg)
            .unwrap()
            .chat(&request(), None)
            .await
            .unwrap();
        // The fake cuts its answer at `max_tokens` words, as a real server cuts at tokens.
        assert_eq!(reply.text, "Offer the starter tier and");
        let body = &f.chat_requests()[0];
        assert_eq!(
            (&body["max_tokens"], &body["temperature"], &body["top_p"]),
            (&json!(5), &json!(0.7), &json!(0.9))
        );
    }

    #[tokio::test]
    async fn retries_503_twice_then_succeeds() {
        let f = fake().await;
        f.fail_next(Endpoint::Chat, &[503, 503]);
        let p = provider(&f.url, Some(KEY));
        assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
        assert_eq!(f.calls(Endpoint::Chat), 3);
        let statuses: Vec<u16> = f.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 503, 200]);
    }

    #[tokio::test]
    async fn a_429_is_retried() {
        let f = fake().await;
        f.fail_next(Endpoint::Chat, &[429]);
        let p = provider(&f.url, Some(KEY));
        assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
        assert_eq!(f.calls(Endpoint::Chat), 2);
    }

    #[test]
    fn retry_after_is_read_and_statuses_are_classified() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "1".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(1)));
        h.insert("retry-after-ms", "250".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        let b = Backoff {
            base_ms: 200,
            max_ms: 5_000,
            max_retries: 3,
        };
        // The server's wait wins over the exponential step, up to `max_backoff_ms`.
        assert_eq!(
            b.wait(0, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            [401, 403, 408, 429, 500, 503, 400, 404, 422].map(classify),
            [
                Class::Auth,
                Class::Auth,
                Class::Retry,
                Class::Retry,
                Class::Retry,
                Class::Retry,
                Class::Reject,
                Class::Reject,
                Class::Reject
            ]
        );
    }

    #[tokio::test]
    async fn gives_up_after_the_retry_budget_and_says_why() {
        let f = fake().await;
        f.set_down(true);
        let err = provider(&f.url, Some(KEY))
            .chat(&request(), None)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::External);
        let host = f.url.trim_start_matches("http://").trim_end_matches("/v1");
        assert_eq!(
            err.message,
            format!(
                "llm `gpt`: `POST /chat/completions` on `{host}` failed after 4 attempt(s): 503: \
                 The engine is currently overloaded, please try again later"
            )
        );
        assert_eq!(f.calls(Endpoint::Chat), 4);
    }

    #[tokio::test]
    async fn connection_failures_are_retried_and_explained() {
        // A port that was just free: nothing listens there.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let cfg = config(
            &format!("http://127.0.0.1:{port}/v1"),
            json!({"max_retries": 1}),
        );
        let err = OpenAiProvider::new("local", cfg)
            .unwrap()
            .chat(&request(), None)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::External);
        assert!(
            err.message.starts_with(&format!(
                "llm `local`: `POST /chat/completions` on `127.0.0.1:{port}` failed after 2 \
                 attempt(s): cannot connect: "
            )),
            "{}",
            err.message
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    #[tokio::test]
    async fn a_bad_key_is_a_config_error_that_never_shows_the_key() {
        let f = fake().await;
        let p = provider(&f.url, Some("sk-wrong-secret-value"));
        let err = p.chat(&request(), None).await.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert!(err.message.starts_with("llm `gpt`: "), "{}", err.message);
        assert!(err.message.contains("(401)"), "{}", err.message);
        let shown = format!("{err} {err:?} {p:?}");
        // Neither the key nor the masked form OpenAI echoes (`sk-***ue`).
        assert!(!shown.contains("sk-wrong-secret-value"), "{shown}");
        assert!(!shown.contains("***ue"), "{shown}");
        assert_eq!(f.calls(Endpoint::Chat), 1, "a 401 is not retried");
    }

    #[tokio::test]
    async fn a_missing_key_says_so() {
        let f = fake().await;
        let err = provider(&f.url, None)
            .chat(&request(), None)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert!(
            err.message.contains("requires an API key (401)"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn other_client_errors_are_input_errors_with_the_servers_reason() {
        let f = fake().await;
        let cfg = config(&f.url, json!({"api_key": KEY, "model": "gpt-9"}));
        let err = OpenAiProvider::new("gpt", cfg)
            .unwrap()
            .chat(&request(), None)
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Input);
        assert!(
            err.message.contains(
                "answered 404: The model `gpt-9` does not exist or you do not have access to it.; \
                 check `model` and `base_url`"
            ),
            "{}",
            err.message
        );
        assert_eq!(f.calls(Endpoint::Chat), 1, "a 404 is not retried");
    }

    #[tokio::test]
    async fn streams_deltas_in_order_and_returns_the_full_text() {
        let f = fake().await;
        let (tx, mut rx) = mpsc::channel(32);
        let reply = provider(&f.url, Some(KEY))
            .chat(&request(), Some(tx))
            .await
            .unwrap();
        assert_eq!(reply.text, ANSWER);
        assert_eq!(reply.model.as_deref(), Some("gpt-4o-mini"));
        let mut deltas = Vec::new();
        while let Some(d) = rx.recv().await {
            deltas.push(d);
        }
        assert_eq!(
            deltas,
            [
                "Offer the starter ",
                "tier and a ",
                "pilot, then follow ",
                "up next week."
            ]
        );
        assert_eq!(f.chat_requests()[0]["stream"], json!(true));
    }

    #[tokio::test]
    async fn streams_cut_mid_line_and_mid_character_are_reassembled() {
        let f = fake().await;
        let answer = "Café naïve — déjà vu, 東京 ✓ done.";
        f.set_answer(answer);
        f.set_stream_fragmented(true);
        let (tx, mut rx) = mpsc::channel(32);
        let reply = provider(&f.url, Some(KEY))
            .chat(&request(), Some(tx))
            .await
            .unwrap();
        assert_eq!(reply.text, answer);
        let mut joined = String::new();
        while let Some(d) = rx.recv().await {
            joined.push_str(&d);
        }
        assert_eq!(joined, answer);
    }

    #[tokio::test]
    async fn a_stream_that_ends_before_done_is_an_error() {
        let f = fake().await;
        f.set_stream_cut(true);
        let (tx, mut rx) = mpsc::channel(32);
        let err = provider(&f.url, Some(KEY))
            .chat(&request(), Some(tx))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::External);
        assert!(
            err.message
                .contains("ended before `[DONE]` after 18 characters"),
            "{}",
            err.message
        );
        assert_eq!(rx.recv().await.as_deref(), Some("Offer the starter "));
    }

    #[tokio::test]
    async fn streamed_calls_are_retried_until_the_stream_starts() {
        let f = fake().await;
        f.fail_next(Endpoint::Chat, &[500, 429]);
        let (tx, _rx) = mpsc::channel(32);
        let reply = provider(&f.url, Some(KEY))
            .chat(&request(), Some(tx))
            .await
            .unwrap();
        assert_eq!(reply.text, ANSWER);
        assert_eq!(f.calls(Endpoint::Chat), 3);
    }

    #[tokio::test]
    async fn slow_answers_and_stalled_streams_time_out() {
        let f = fake().await;
        f.set_delay(Duration::from_secs(60));
        let cfg = config(
            &f.url,
            json!({"api_key": KEY, "timeout_ms": 300, "max_retries": 0}),
        );
        let p = OpenAiProvider::new("gpt", cfg).unwrap();
        let err = p.chat(&request(), None).await.unwrap_err();
        assert!(
            err.message
                .ends_with("failed after 1 attempt(s): no answer within 300 ms"),
            "{}",
            err.message
        );
        let (tx, _rx) = mpsc::channel(32);
        let err = p.chat(&request(), Some(tx)).await.unwrap_err();
        assert!(
            err.message
                .contains("stalled: nothing for 300 ms after 18 characters"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn no_authorization_header_without_a_key() {
        let f = OpenAiFake::start().await;
        f.set_answer(ANSWER);
        // An unset `${OPENAI_API_KEY:-}` arrives as an empty key: also no header.
        for key in [None, Some("")] {
            let p = provider(&f.url, key);
            assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
        }
        let sent = f.requests();
        assert_eq!(sent.len(), 2);
        assert!(sent.iter().all(|r| r.authorization.is_none()), "{sent:?}");
    }

    #[tokio::test]
    async fn embeds_in_batches_of_max_batch_keeping_order() {
        let f = fake().await;
        f.fail_next(Endpoint::Embeddings, &[503]);
        f.set_embed_quirk(EmbedQuirk::Reversed);
        let e = embedder(&f.url, json!({"max_batch": 2, "dimensions": 256}));
        assert_eq!(e.id(), "openai:text-embedding-3-small@256");
        assert_eq!((e.dims(), e.max_batch()), (Some(256), 2));
        let input = texts(&[
            "Budget",
            "Timing",
            "Competitor pricing",
            "Security review",
            "Pilot",
        ]);
        let v = e.embed(&input).await.unwrap();
        assert_eq!(v.len(), 5);
        for (vector, text) in v.iter().zip(&input) {
            assert_eq!(*vector, prompter_fakes::openai::embedding(text, Some(256)));
        }
        assert_eq!(
            f.embed_inputs(),
            [
                texts(&["Budget", "Timing"]),
                texts(&["Competitor pricing", "Security review"]),
                texts(&["Pilot"]),
            ]
        );
        assert_eq!(f.calls(Endpoint::Embeddings), 4, "3 batches and 1 retry");
        let body = f.requests().last().unwrap().body.clone();
        assert_eq!(
            body,
            json!({"model": "text-embedding-3-small", "input": ["Pilot"], "dimensions": 256})
        );
    }

    #[tokio::test]
    async fn embeddings_without_dimensions_use_the_models_length() {
        let f = fake().await;
        let e = embedder(&f.url, json!({}));
        assert_eq!(
            (e.id(), e.dims(), e.max_batch()),
            ("openai:text-embedding-3-small".into(), None, 64)
        );
        let v = e.embed(&texts(&["Budget", "Timing"])).await.unwrap();
        assert_eq!(v[1].len(), prompter_fakes::openai::DIMS);
        assert!(f.requests()[0].body.get("dimensions").is_none());
        assert!(e.embed(&[]).await.unwrap().is_empty());
        assert_eq!(f.calls(Endpoint::Embeddings), 1);
    }

    #[tokio::test]
    async fn a_wrong_embedding_count_is_an_error() {
        let f = fake().await;
        f.set_embed_quirk(EmbedQuirk::DropLast);
        let err = embedder(&f.url, json!({}))
            .embed(&texts(&["Budget", "Timing", "Pilot"]))
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::External);
        assert_eq!(
            err.message,
            "embedder `oai`: `POST /embeddings` answered 2 embeddings for 3 texts"
        );
    }

    #[test]
    fn configs_have_defaults_and_refuse_what_cannot_work() {
        let cfg: OpenAiConfig = serde_json::from_value(json!({"model": "gpt-4o-mini",
            "api_key": "sk-1"}))
        .unwrap();
        assert_eq!(cfg.base_url, "https://api.openai.com/v1");
        assert_eq!(
            (cfg.timeout_ms, cfg.max_retries, cfg.max_backoff_ms),
            (10_000, 3, 5_000)
        );
        assert!(cfg.problems().is_empty());
        let unknown = serde_json::from_value::<OpenAiConfig>(json!({"model": "m", "modle": "m"}));
        assert!(unknown.is_err());
        assert!(
            serde_json::from_value::<OpenAiConfig>(json!({})).is_err(),
            "model is required"
        );

        let bad: OpenAiConfig = serde_json::from_value(json!({"model": " ", "top_p": 1.5,
            "base_url": "https://api.openai.com/v1/chat/completions", "api_key": ""}))
        .unwrap();
        let keys: Vec<&str> = bad.problems().iter().map(|p| p.key).collect();
        assert_eq!(keys, ["base_url", "api_key", "model", "top_p"]);
        let err = OpenAiProvider::new("gpt", bad).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert!(
            err.message
                .starts_with("llm `gpt`: `base_url` is the API root")
        );

        let local: OpenAiConfig = serde_json::from_value(json!({"model": "llama3.2",
            "base_url": "http://localhost:11434/v1"}))
        .unwrap();
        assert!(local.problems().is_empty(), "local servers need no key");
        let bad_url: OpenAiConfig =
            serde_json::from_value(json!({"model": "m", "base_url": "localhost:11434"})).unwrap();
        assert_eq!(bad_url.problems()[0].key, "base_url");

        let e: OpenAiEmbedConfig = serde_json::from_value(json!({"model": "nomic-embed-text",
            "base_url": "http://localhost:11434/v1"}))
        .unwrap();
        assert_eq!(
            (e.max_batch, e.timeout_ms, e.dimensions),
            (64, 10_000, None)
        );
        assert!(e.problems().is_empty());
        let e: OpenAiEmbedConfig = serde_json::from_value(json!({"model": "m",
            "base_url": "http://localhost:11434/v1", "max_batch": 0, "dimensions": 0}))
        .unwrap();
        let keys: Vec<&str> = e.problems().iter().map(|p| p.key).collect();
        assert_eq!(keys, ["dimensions", "max_batch"]);
    }

    #[test]
    fn sse_lines_are_parsed_defensively() {
        let chunk = |delta: &str, finish: &str| {
            format!(
                r#"data: {{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#
            )
        };
        let text = sse_event(&chunk(r#"{"content":"Hi"}"#, "null")).unwrap();
        assert_eq!(
            (text.delta.as_deref(), text.model.as_deref()),
            (Some("Hi"), Some("m"))
        );
        // The role-only first chunk and empty contents carry nothing.
        assert_eq!(sse_event(&chunk(r#"{"role":"assistant"}"#, "null")), None);
        assert_eq!(sse_event(&chunk(r#"{"content":""}"#, "null")), None);
        let last = sse_event(&chunk("{}", r#""stop""#)).unwrap();
        assert_eq!(
            (last.delta, last.finish_reason.as_deref()),
            (None, Some("stop"))
        );
        assert!(sse_event("data: [DONE]\r").unwrap().done);
        assert!(sse_event("data:[DONE]").unwrap().done);
        for ignored in [
            ": keep-alive",
            "",
            "event: ping",
            "data: {not json",
            "data: {}",
        ] {
            assert_eq!(sse_event(ignored), None, "{ignored}");
        }
        let err =
            sse_event(r#"data: {"error": {"message": "overloaded", "type": "server_error"}}"#);
        assert_eq!(err.unwrap().error.as_deref(), Some("overloaded"));

        let mut lines = SseLines::default();
        let bytes = "data: é\n\ndata: [DO".as_bytes();
        // Split inside the two-byte `é`.
        assert!(lines.push(&bytes[..7]).is_empty());
        assert_eq!(lines.push(&bytes[7..]), ["data: é", "", ""]);
        assert_eq!(lines.push(b"NE]").len(), 0);
        assert_eq!(lines.rest().as_deref(), Some("data: [DONE]"));
    }

    #[test]
    fn error_details_are_short_and_key_free() {
        let p = provider("http://localhost:1/v1", Some(KEY));
        assert_eq!(
            p.http
                .detail(r#"{"error": {"message": "bad  thing\n happened", "type": "x"}}"#),
            "bad thing happened"
        );
        assert_eq!(
            p.http.detail(r#"{"error": "model not loaded"}"#),
            "model not loaded"
        );
        assert_eq!(p.http.detail(&format!("echo {KEY} back")), "echo *** back");
        assert_eq!(p.http.detail(""), "(empty body)");
        assert_eq!(p.http.detail(&"x".repeat(500)).chars().count(), 201);
    }
}
