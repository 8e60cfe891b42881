//! The `config:` maps of the `openai` provider and embedder, with their defaults and the checks
//! that refuse a config that cannot work.

use std::fmt;

use prompter_core::error::PluginError;
use prompter_core::secret::Secret;
use serde::Deserialize;

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
    pub temperature: Option<f64>,
    /// Nucleus sampling (0 to 1); not sent when unset (the server's default applies).
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Ask a streamed answer to end with its token usage (`stream_options.include_usage`), for
    /// the `prompter_provider_tokens_total` metric. Default true; set false for a server that
    /// rejects `stream_options`.
    #[serde(default = "default_true")]
    pub stream_usage: bool,
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
fn default_true() -> bool {
    true
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
pub(super) fn key_of(api_key: Option<&Secret>) -> Option<&Secret> {
    api_key.filter(|k| !k.is_empty())
}

pub(super) fn first_problem(
    section: &str,
    name: &str,
    problems: Vec<ConfigProblem>,
) -> Result<(), PluginError> {
    match problems.into_iter().next() {
        Some(p) => Err(PluginError::config(format!("{section} `{name}`: {p}"))),
        None => Ok(()),
    }
}
