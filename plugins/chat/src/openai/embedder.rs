//! The embedder: `POST /embeddings`, in batches of at most `max_batch` texts.

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::Embedder;
use serde::{Deserialize, Serialize};

use super::client::{Answer, OpenAiClient};
use super::config::{OpenAiEmbedConfig, first_problem};

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
