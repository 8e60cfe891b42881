//! Named resources that stages share: knowledge stores, chat (LLM) providers and embedders.
//!
//! The engine builds them from the engine config's `knowledge:` and `llm:` sections and hands
//! them to stages through the build context. Keys for real providers live inside the provider;
//! a stage (and later a Wasm plugin) only ever sees the trait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

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

    /// Like [`KnowledgeStore::search`] within `budget`; a store that can still rank when its
    /// embedder fails or is too slow (by words, say) does so and returns why the result is
    /// degraded. The default waits for [`KnowledgeStore::search`] and never degrades.
    ///
    /// # Errors
    /// When no result can be had at all.
    async fn search_within(
        &self,
        query: &str,
        k: usize,
        budget: Option<std::time::Duration>,
    ) -> Result<(Vec<ScoredDocument>, Option<String>), PluginError> {
        let search = self.search(query, k);
        match budget {
            None => search.await.map(|d| (d, None)),
            Some(b) => match tokio::time::timeout(b, search).await {
                Ok(r) => r.map(|d| (d, None)),
                Err(_) => Err(PluginError::timeout(format!(
                    "knowledge store `{}` did not answer within {} ms",
                    self.name(),
                    b.as_millis()
                ))),
            },
        }
    }
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
    /// Sampling temperature. `f64`, like the JSON number it becomes: `0.7` goes out as `0.7`
    /// (an `f32` would be widened to `0.699999988079071`).
    pub temperature: f64,
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

/// Turns texts into vectors for similarity search.
///
/// Implementations: the local lexical `hashing` embedder, Nebula (`/v1/model/embed`) and
/// OpenAI-compatible servers (`/v1/embeddings`). The engine wraps every configured embedder in a
/// [`CachedEmbedder`], so a repeated text (a tracker name) is embedded once per process.
#[async_trait]
pub trait Embedder: Send + Sync + 'static {
    /// The resource name from the engine config.
    fn name(&self) -> &str;

    /// Names the vector space, e.g. `nebula:nebula-text-embedding-large`: vectors with the same
    /// id are comparable; an index built under another id must be rebuilt.
    fn id(&self) -> String;

    /// The length of the vectors, when known without a call.
    fn dims(&self) -> Option<usize>;

    /// The most texts one call to [`Embedder::embed`] should carry. Default 1.
    fn max_batch(&self) -> usize {
        1
    }

    /// Embeds without waiting, for embedders that compute locally (no network); `None` for
    /// remote ones. Lets a store embed at start-up, synchronously.
    fn embed_local(&self, _text: &str) -> Option<Vec<f32>> {
        None
    }

    /// Embeds on the calling thread, blocking it as long as it takes, for embedders that need
    /// no network but too much CPU to run per query on an async thread (a local model); `None`
    /// for remote ones. Lets a store embed its knowledge base when it opens (at engine start
    /// or on a reload's blocking thread), with no separate ingest step.
    ///
    /// The default is [`Embedder::embed_local`] text by text, when that answers.
    fn embed_offline(&self, texts: &[String]) -> Option<Result<Vec<Vec<f32>>, PluginError>> {
        texts
            .iter()
            .map(|t| self.embed_local(t))
            .collect::<Option<Vec<_>>>()
            .map(Ok)
    }

    /// One vector per text, in order.
    ///
    /// # Errors
    /// When the embedding service fails; the error says which call and why.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError>;
}

/// Texts kept per generation of the [`CachedEmbedder`]; it holds at most twice this many.
pub const EMBEDDING_CACHE_CAPACITY: usize = 4096;

/// An [`Embedder`] that remembers the vectors of recent texts (bounded, least recently used
/// first out), so repeated tracker names and queries cost one embedding call per process.
pub struct CachedEmbedder {
    inner: Arc<dyn Embedder>,
    capacity: usize,
    cache: Mutex<Generations>,
    observer: Option<LookupObserver>,
}

/// Told (texts answered from the cache, texts sent to the embedder) after each lookup.
pub type LookupObserver = Box<dyn Fn(u64, u64) + Send + Sync>;

/// Two generations: lookups promote from `old` to `new`; when `new` is full, `old` is dropped
/// and `new` becomes `old`. Bounded at twice the capacity, O(1) per operation.
#[derive(Default)]
struct Generations {
    new: HashMap<String, Arc<[f32]>>,
    old: HashMap<String, Arc<[f32]>>,
}

impl CachedEmbedder {
    /// Wraps `inner` with a cache of [`EMBEDDING_CACHE_CAPACITY`] texts per generation.
    pub fn new(inner: Arc<dyn Embedder>) -> Self {
        Self::with_capacity(inner, EMBEDDING_CACHE_CAPACITY)
    }

    /// Wraps `inner` with a cache of `capacity` texts per generation (at least 1).
    pub fn with_capacity(inner: Arc<dyn Embedder>, capacity: usize) -> Self {
        CachedEmbedder {
            inner,
            capacity: capacity.max(1),
            cache: Mutex::new(Generations::default()),
            observer: None,
        }
    }

    /// Reports every lookup's hits and misses to `observer` (the engine's metrics).
    #[must_use]
    pub fn observed(mut self, observer: LookupObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    fn report(&self, hits: u64, misses: u64) {
        if let Some(o) = &self.observer {
            o(hits, misses);
        }
    }

    fn get(&self, text: &str) -> Option<Arc<[f32]>> {
        let mut g = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = g.new.get(text) {
            return Some(Arc::clone(v));
        }
        let v = g.old.remove(text)?;
        self.insert_locked(&mut g, text.to_owned(), Arc::clone(&v));
        Some(v)
    }

    fn insert(&self, text: String, v: Arc<[f32]>) {
        let mut g = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        self.insert_locked(&mut g, text, v);
    }

    fn insert_locked(&self, g: &mut Generations, text: String, v: Arc<[f32]>) {
        if g.new.len() >= self.capacity {
            g.old = std::mem::take(&mut g.new);
        }
        g.new.insert(text, v);
    }
}

#[async_trait]
impl Embedder for CachedEmbedder {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn id(&self) -> String {
        self.inner.id()
    }
    fn dims(&self) -> Option<usize> {
        self.inner.dims()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn embed_local(&self, text: &str) -> Option<Vec<f32>> {
        if let Some(v) = self.get(text) {
            self.report(1, 0);
            return Some(v.to_vec());
        }
        self.report(0, 1);
        let v = self.inner.embed_local(text)?;
        self.insert(text.to_owned(), v.clone().into());
        Some(v)
    }
    fn embed_offline(&self, texts: &[String]) -> Option<Result<Vec<Vec<f32>>, PluginError>> {
        // Start-up work (a knowledge base's rows): not worth caching.
        self.inner.embed_offline(texts)
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        let mut out: Vec<Option<Vec<f32>>> = texts
            .iter()
            .map(|t| self.get(t).map(|v| v.to_vec()))
            .collect();
        // Each distinct missing text is sent once, even when it repeats within the batch.
        let mut missing: Vec<String> = Vec::new();
        for (t, v) in texts.iter().zip(&out) {
            if v.is_none() && !missing.contains(t) {
                missing.push(t.clone());
            }
        }
        let hits = texts.len() - out.iter().filter(|v| v.is_none()).count();
        self.report(hits as u64, missing.len() as u64);
        if !missing.is_empty() {
            let vectors = self.inner.embed(&missing).await?;
            if vectors.len() != missing.len() {
                return Err(PluginError::external(format!(
                    "embedder `{}` returned {} vectors for {} texts",
                    self.inner.name(),
                    vectors.len(),
                    missing.len()
                )));
            }
            for (text, v) in missing.into_iter().zip(vectors) {
                for (slot, t) in out.iter_mut().zip(texts) {
                    if slot.is_none() && *t == text {
                        *slot = Some(v.clone());
                    }
                }
                self.insert(text, v.into());
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Counts calls; the vector of a text is `[len]`.
    #[derive(Default)]
    struct Counting {
        calls: AtomicU64,
        texts: AtomicU64,
    }

    #[async_trait]
    impl Embedder for Counting {
        fn name(&self) -> &str {
            "counting"
        }
        fn id(&self) -> String {
            "counting".into()
        }
        fn dims(&self) -> Option<usize> {
            Some(1)
        }
        async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.texts.fetch_add(texts.len() as u64, Ordering::Relaxed);
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn repeated_texts_are_embedded_once() {
        let inner = Arc::new(Counting::default());
        let cached = CachedEmbedder::new(inner.clone());
        let seen = Arc::new(Mutex::new((0, 0)));
        let counts = seen.clone();
        let cached = cached.observed(Box::new(move |h, m| {
            let mut s = counts.lock().unwrap();
            s.0 += h;
            s.1 += m;
        }));
        let a = cached
            .embed(&strings(&["Budget", "Timing", "Budget"]))
            .await
            .unwrap();
        assert_eq!(a, [vec![6.0], vec![6.0], vec![6.0]]);
        let b = cached.embed(&strings(&["Timing", "Budget"])).await.unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(inner.calls.load(Ordering::Relaxed), 1);
        assert_eq!(inner.texts.load(Ordering::Relaxed), 2);
        // (hits, misses) as the engine's metrics see them.
        assert_eq!(*seen.lock().unwrap(), (2, 2));
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_keeps_recently_used_texts() {
        let inner = Arc::new(Counting::default());
        let cached = CachedEmbedder::with_capacity(inner.clone(), 2);
        for t in ["a", "b", "c", "a", "d", "e"] {
            cached.embed(&strings(&[t])).await.unwrap();
        }
        // "a" was used again after "c", so it survived; "b" is gone.
        let before = inner.texts.load(Ordering::Relaxed);
        cached.embed(&strings(&["e"])).await.unwrap();
        assert_eq!(inner.texts.load(Ordering::Relaxed), before);
        cached.embed(&strings(&["b"])).await.unwrap();
        assert_eq!(inner.texts.load(Ordering::Relaxed), before + 1);
        let g = cached.cache.lock().unwrap();
        assert!(g.new.len() + g.old.len() <= 4);
    }
}
