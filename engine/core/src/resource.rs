//! Named resources that stages share: knowledge stores and chat (LLM) providers.
//!
//! The engine builds them from the engine config's `knowledge:` and `llm:` sections and hands
//! them to stages through the build context. Keys for real providers live inside the provider;
//! a stage (and later a Wasm plugin) only ever sees the trait.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::PluginError;

/// A document returned by a knowledge-store search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredDocument {
    /// Stable id (for the embedded store: the row's content hash).
    pub id: String,
    /// The text that was embedded (the CSV's first column).
    pub text: String,
    /// The data returned with it (the CSV's second column: the guidance).
    pub data: String,
    /// Similarity to the query (cosine, higher is closer).
    pub score: f32,
}

/// A store of documents searchable by similarity.
///
/// Implementations: the embedded store (in process, persisted to a file); MongoDB Atlas later.
/// The store owns its embedder, so it can cache query embeddings (tracker names repeat).
#[async_trait]
pub trait KnowledgeStore: Send + Sync + 'static {
    /// The resource name from the engine config.
    fn name(&self) -> &str;

    /// The `k` documents most similar to `query`, best first.
    ///
    /// # Errors
    /// When the embedder or the store's backend fails.
    async fn search(&self, query: &str, k: usize) -> Result<Vec<ScoredDocument>, PluginError>;
}

/// Who says a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The user (Nebula's `human`).
    Human,
    /// The model.
    Assistant,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who says it.
    pub role: Role,
    /// What is said.
    pub text: String,
}

/// A chat request in the shape Nebula and OpenAI-compatible servers both map onto.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The system prompt.
    pub system_prompt: String,
    /// The conversation with the model.
    pub messages: Vec<ChatMessage>,
    /// Documents the prompt was built from (the offline provider answers with them).
    #[serde(default)]
    pub context: Vec<ScoredDocument>,
    /// Sampling: maximum tokens to generate.
    pub max_new_tokens: u32,
    /// Sampling temperature.
    pub temperature: f32,
}

/// A chat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatReply {
    /// The model's text.
    pub text: String,
    /// The provider that answered.
    pub provider: String,
    /// The model, when the provider names one.
    pub model: Option<String>,
}

/// An LLM chat provider.
///
/// Implementations: `offline` (answers with the retrieved guidance); Nebula and
/// OpenAI-compatible servers later.
#[async_trait]
pub trait ChatProvider: Send + Sync + 'static {
    /// The resource name from the engine config.
    fn name(&self) -> &str;

    /// Answers `request`. When `tokens` is given, text fragments are sent to it as they arrive
    /// (a closed receiver is not an error); the full text is returned at the end either way.
    ///
    /// # Errors
    /// When the provider fails.
    async fn chat(
        &self,
        request: &ChatRequest,
        tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError>;
}
