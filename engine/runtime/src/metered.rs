//! The engine's wrappers around configured chat providers and embedders: each call runs inside a
//! [`prompter_core::meter::scope`], so its retries, first token and token usage reach the
//! engine's metrics, and its result and duration are counted here.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::meter::{self, Meter};
use prompter_core::resource::{CachedEmbedder, ChatProvider, ChatReply, ChatRequest, Embedder};
use tokio::sync::mpsc;

use crate::metrics::{ChatMetrics, EmbedMetrics, Metrics};

/// One chat call's meter.
struct ChatCall {
    metrics: Arc<ChatMetrics>,
    start: Instant,
    first: Cell<bool>,
}

impl Meter for ChatCall {
    fn retry(&self) {
        self.metrics.retries.inc();
    }
    fn first_token(&self) {
        if !self.first.replace(true) {
            self.metrics
                .first_token
                .observe(self.start.elapsed().as_secs_f64());
        }
    }
    fn tokens(&self, input: u64, output: u64) {
        self.metrics.tokens_in.inc_by(input);
        self.metrics.tokens_out.inc_by(output);
    }
}

/// A chat provider whose calls are counted in the engine's metrics.
pub struct MeteredChat {
    inner: Arc<dyn ChatProvider>,
    metrics: Arc<ChatMetrics>,
}

impl MeteredChat {
    /// Wraps `inner`, counting into `metrics`' handles for its name.
    pub fn wrap(inner: Arc<dyn ChatProvider>, metrics: &Metrics) -> Arc<dyn ChatProvider> {
        let metrics = Arc::new(metrics.chat(inner.name()));
        Arc::new(MeteredChat { inner, metrics })
    }
}

#[async_trait]
impl ChatProvider for MeteredChat {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError> {
        let start = Instant::now();
        let call = ChatCall {
            metrics: self.metrics.clone(),
            start,
            first: Cell::new(false),
        };
        let mut ended = Ended::new(start, &self.metrics.duration, &self.metrics.error);
        let result = meter::scope(Box::new(call), self.inner.chat(request, tokens)).await;
        ended.with(if result.is_ok() {
            &self.metrics.ok
        } else {
            &self.metrics.error
        });
        result
    }
}

/// Records a provider call when it ends: its duration, its result, and the time the stage
/// waited on it ([`meter::waited`]). A call cut short (a deadline dropped it mid-wait) is
/// recorded when it is dropped, as an error, so its wait is still taken out of the output's
/// own time.
struct Ended<'a> {
    start: Instant,
    duration: &'a Histogram,
    /// The counter to bump: the error one until the call says otherwise.
    result: &'a Counter,
}

impl<'a> Ended<'a> {
    fn new(start: Instant, duration: &'a Histogram, cut: &'a Counter) -> Self {
        Ended {
            start,
            duration,
            result: cut,
        }
    }

    /// The call ended, counted under `result`.
    fn with(&mut self, result: &'a Counter) {
        self.result = result;
    }
}

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        let took = self.start.elapsed();
        meter::waited(took);
        self.duration.observe(took.as_secs_f64());
        self.result.inc();
    }
}

/// One embedding call's meter.
struct EmbedCall(Arc<EmbedMetrics>);

impl Meter for EmbedCall {
    fn retry(&self) {
        self.0.retries.inc();
    }
    fn first_token(&self) {}
    fn tokens(&self, _input: u64, _output: u64) {}
}

/// An embedder whose calls to the provider are counted in the engine's metrics. It sits under
/// the cache ([`metered_embedder`]), so it sees only the texts the cache missed.
struct MeteredEmbedder {
    inner: Arc<dyn Embedder>,
    metrics: Arc<EmbedMetrics>,
}

/// `inner` behind the engine's embedding cache, with the provider's calls and the cache's hits
/// and misses counted in `metrics`.
pub fn metered_embedder(inner: Arc<dyn Embedder>, metrics: &Metrics) -> Arc<dyn Embedder> {
    let handles = Arc::new(metrics.embed(inner.name()));
    let counted = handles.clone();
    let metered: Arc<dyn Embedder> = Arc::new(MeteredEmbedder {
        inner,
        metrics: handles,
    });
    Arc::new(
        CachedEmbedder::new(metered).observed(Box::new(move |hits, misses| {
            counted.hits.inc_by(hits);
            counted.misses.inc_by(misses);
        })),
    )
}

#[async_trait]
impl Embedder for MeteredEmbedder {
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
        // Local embedders compute in place: counted as calls, without retries to report.
        let start = Instant::now();
        let v = self.inner.embed_local(text);
        if v.is_some() {
            self.metrics.ok.inc();
            self.metrics.duration.observe(start.elapsed().as_secs_f64());
        }
        v
    }
    fn embed_offline(&self, texts: &[String]) -> Option<Result<Vec<Vec<f32>>, PluginError>> {
        // Start-up work, outside any run: not counted as the engine's embedding calls.
        self.inner.embed_offline(texts)
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        let start = Instant::now();
        let call = Box::new(EmbedCall(self.metrics.clone()));
        let mut ended = Ended::new(start, &self.metrics.duration, &self.metrics.error);
        let result = meter::scope(call, self.inner.embed(texts)).await;
        ended.with(if result.is_ok() {
            &self.metrics.ok
        } else {
            &self.metrics.error
        });
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::resource::{ChatMessage, Role};

    struct Flaky;

    #[async_trait]
    impl ChatProvider for Flaky {
        fn name(&self) -> &str {
            "flaky"
        }
        async fn chat(
            &self,
            request: &ChatRequest,
            tokens: Option<mpsc::Sender<String>>,
        ) -> Result<ChatReply, PluginError> {
            meter::retry();
            meter::first_token();
            meter::first_token();
            meter::tokens(12, 3);
            if let Some(t) = tokens {
                let _ = t.send("hi".into()).await;
            }
            if request.messages.is_empty() {
                return Err(PluginError::external("no messages"));
            }
            Ok(ChatReply {
                text: "hi".into(),
                provider: "flaky".into(),
                model: None,
            })
        }
    }

    fn request(messages: Vec<ChatMessage>) -> ChatRequest {
        ChatRequest {
            system_prompt: String::new(),
            messages,
            context: Vec::new(),
            max_new_tokens: 10,
            temperature: 0.0,
        }
    }

    #[tokio::test]
    async fn a_chat_call_counts_its_result_retries_first_token_and_tokens() {
        let metrics = Metrics::new();
        let chat = MeteredChat::wrap(Arc::new(Flaky), &metrics);
        let said = vec![ChatMessage {
            role: Role::Human,
            text: "hello".into(),
        }];
        chat.chat(&request(said), None).await.unwrap();
        assert!(chat.chat(&request(Vec::new()), None).await.is_err());
        let text = metrics.render();
        for line in [
            r#"prompter_provider_requests_total{provider="flaky",kind="chat",result="ok"} 1"#,
            r#"prompter_provider_requests_total{provider="flaky",kind="chat",result="error"} 1"#,
            r#"prompter_provider_retries_total{provider="flaky",kind="chat"} 2"#,
            r#"prompter_provider_tokens_total{provider="flaky",direction="input"} 24"#,
            r#"prompter_provider_tokens_total{provider="flaky",direction="output"} 6"#,
            r#"prompter_provider_first_token_seconds_count{provider="flaky",kind="chat"} 2"#,
            r#"prompter_provider_request_duration_seconds_count{provider="flaky",kind="chat"} 2"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
    }

    /// Never answers.
    struct Stuck;

    #[async_trait]
    impl ChatProvider for Stuck {
        fn name(&self) -> &str {
            "stuck"
        }
        async fn chat(
            &self,
            _request: &ChatRequest,
            _tokens: Option<mpsc::Sender<String>>,
        ) -> Result<ChatReply, PluginError> {
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_call_cut_by_a_deadline_still_counts_as_waited_and_failed() {
        let metrics = Metrics::new();
        let chat = MeteredChat::wrap(Arc::new(Stuck), &metrics);
        use std::sync::atomic::{AtomicU64, Ordering};
        let stage = Arc::new(AtomicU64::new(0));
        struct Counting(Arc<AtomicU64>);
        impl prompter_core::meter::StageMeter for Counting {
            fn fallback(&self) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let ((), waited) = meter::stage_scope(Arc::new(Counting(stage)), async {
            let cut = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                chat.chat(&request(Vec::new()), None),
            )
            .await;
            assert!(cut.is_err());
        })
        .await;
        assert!(waited >= std::time::Duration::from_millis(50), "{waited:?}");
        let text = metrics.render();
        let line =
            r#"prompter_provider_requests_total{provider="stuck",kind="chat",result="error"} 1"#;
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}
