//! What a provider call reports about itself while it runs: retries, its first streamed token,
//! the tokens the provider says it used; and what a stage reports: that a fallback answered.
//!
//! The engine wraps every configured chat provider and embedder so that each call runs inside a
//! [`scope`] holding a [`Meter`] for that provider, and runs each stage inside a
//! [`stage_scope`]; the places that know these facts (the shared retry loop, a provider's
//! stream reader, the chat stage) call the free functions here, which report to the innermost
//! scope and do nothing outside one. So providers and plugins need
//! no handle to the engine's metrics, and a provider used outside the engine (a unit test,
//! `prompter kb`) costs nothing.

use std::future::Future;
use std::time::Duration;

/// Receives one provider call's facts. Methods take `&self`: a meter keeps its per-call state in
/// cells; it lives in one task.
pub trait Meter: Send + 'static {
    /// An attempt failed retryably and another follows.
    fn retry(&self);
    /// The first streamed fragment of the answer arrived.
    fn first_token(&self);
    /// The provider reported its token usage (prompt, completion).
    fn tokens(&self, input: u64, output: u64);
}

/// Receives what a stage call reports.
pub trait StageMeter: Send + Sync + 'static {
    /// The stage's fallback answered in place of its primary provider.
    fn fallback(&self);
}

/// One stage call's scope: its meter, and the time it spent waiting on providers.
struct StageScope {
    meter: std::sync::Arc<dyn StageMeter>,
    waited_ns: std::cell::Cell<u64>,
}

tokio::task_local! {
    static METER: Box<dyn Meter>;
    static STAGE: StageScope;
}

/// Runs a stage call `f` with `meter` receiving what the stage reports; returns its output and
/// the time it spent waiting on providers (what [`waited`] reported inside it).
pub async fn stage_scope<F: Future>(
    meter: std::sync::Arc<dyn StageMeter>,
    f: F,
) -> (F::Output, Duration) {
    let scope = StageScope {
        meter,
        waited_ns: std::cell::Cell::new(0),
    };
    let mut call = std::pin::pin!(STAGE.scope(scope, f));
    let out = call.as_mut().await;
    let waited = call.as_mut().take_value().map_or(0, |s| s.waited_ns.get());
    (out, Duration::from_nanos(waited))
}

/// Reports to the current stage that its fallback answered.
pub fn fallback() {
    let _ = STAGE.try_with(|s| s.meter.fallback());
}

/// Reports to the current stage a wait on a provider (an LLM or embedder call): the engine
/// subtracts it from an output's time to tell its own time (`Timings::waited_us`).
///
/// [`Timings::waited_us`]: crate::output::Timings::waited_us
pub fn waited(d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let _ = STAGE.try_with(|s| s.waited_ns.set(s.waited_ns.get().saturating_add(ns)));
}

/// A wait on a provider that is reported to the current stage ([`waited`]) when it ends,
/// however it ends: dropped by a deadline or a budget mid-wait included. For a call that runs
/// outside the stage's task (spawned), where the provider's own report cannot reach the stage.
#[must_use = "the wait is reported when this is dropped"]
pub struct Waiting(std::time::Instant);

impl Waiting {
    /// A wait starting now.
    pub fn start() -> Self {
        Waiting(std::time::Instant::now())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        waited(self.0.elapsed());
    }
}

/// Runs `f` with `meter` receiving what happens inside it.
pub async fn scope<F: Future>(meter: Box<dyn Meter>, f: F) -> F::Output {
    METER.scope(meter, f).await
}

/// [`scope`] for synchronous code.
pub fn sync_scope<R>(meter: Box<dyn Meter>, f: impl FnOnce() -> R) -> R {
    METER.sync_scope(meter, f)
}

/// Reports a retry to the current scope, if any.
pub fn retry() {
    let _ = METER.try_with(|m| m.retry());
}

/// Reports the first streamed fragment (later calls in the same scope are ignored by meters).
pub fn first_token() {
    let _ = METER.try_with(|m| m.first_token());
}

/// Reports the provider's token usage.
pub fn tokens(input: u64, output: u64) {
    let _ = METER.try_with(|m| m.tokens(input, output));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Counting(Arc<AtomicU64>);

    impl Meter for Counting {
        fn retry(&self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn first_token(&self) {
            self.0.fetch_add(10, Ordering::Relaxed);
        }
        fn tokens(&self, input: u64, output: u64) {
            self.0.fetch_add(100 * (input + output), Ordering::Relaxed);
        }
    }

    impl StageMeter for Counting {
        fn fallback(&self) {
            self.0.fetch_add(10_000, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn reports_reach_the_innermost_scope_and_nothing_outside_one() {
        retry(); // no scope: ignored, no panic
        let outer = Arc::new(AtomicU64::new(0));
        let inner = Arc::new(AtomicU64::new(0));
        scope(Box::new(Counting(outer.clone())), async {
            retry();
            scope(Box::new(Counting(inner.clone())), async {
                first_token();
                tokens(1, 2);
            })
            .await;
            fallback(); // no stage scope: ignored
        })
        .await;
        let stage = Arc::new(AtomicU64::new(0));
        let ((), waited_for) = stage_scope(Arc::new(Counting(stage.clone())), async {
            scope(Box::new(Counting(inner.clone())), async {
                fallback();
                waited(Duration::from_millis(3));
            })
            .await;
            waited(Duration::from_millis(4));
        })
        .await;
        assert_eq!(stage.load(Ordering::Relaxed), 10_000);
        assert_eq!(waited_for, Duration::from_millis(7));
        assert_eq!(outer.load(Ordering::Relaxed), 1);
        assert_eq!(inner.load(Ordering::Relaxed), 310);
        sync_scope(Box::new(Counting(inner.clone())), retry);
        assert_eq!(inner.load(Ordering::Relaxed), 311);
    }
}
