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

mod client;
mod config;
mod embedder;
mod provider;
/// Shared with [`crate::nebula`]; see the module's note on where it belongs.
pub(crate) mod sse;
mod stream;
#[cfg(test)]
mod tests;

pub use config::{ConfigProblem, OpenAiConfig, OpenAiEmbedConfig};
pub use embedder::OpenAiEmbedder;
pub use provider::OpenAiProvider;
