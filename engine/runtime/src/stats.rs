//! Engine counters, and optional latency samples for `prompter bench`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Counters shared by the engine, its conversation tasks and the pipeline runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events routed.
    pub events: AtomicU64,
    /// Pipeline runs that passed their filter.
    pub runs: AtomicU64,
    /// Stage failures and timeouts.
    pub stage_errors: AtomicU64,
    /// Outputs delivered (every version and withdrawal).
    pub outputs: AtomicU64,
    /// Conversations opened.
    pub conversations_opened: AtomicU64,
    /// Conversations released (completed or idle).
    pub conversations_released: AtomicU64,
    /// Per-event engine time in nanoseconds (fold and starting the runs), when sampling is on.
    pub samples: Option<Mutex<Vec<u64>>>,
    /// Per-run time in nanoseconds by pipeline name, when sampling is on.
    pub run_samples: Option<Mutex<Vec<(String, u64)>>>,
    /// The Prometheus metrics (`GET /metrics`).
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Stats {
    /// Counters reporting to `metrics` (a loaded config's [`Settings::metrics`], so its
    /// providers and Wasm stages count into the same exposition).
    ///
    /// [`Settings::metrics`]: crate::config::Settings::metrics
    pub fn with_metrics(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        Stats {
            metrics,
            ..Default::default()
        }
    }

    /// Counters that also sample per-event and per-run times.
    pub fn sampling() -> Self {
        Stats {
            samples: Some(Mutex::new(Vec::new())),
            run_samples: Some(Mutex::new(Vec::new())),
            ..Default::default()
        }
    }

    /// Records one per-event handling time.
    pub fn sample(&self, nanos: u64) {
        if let Some(s) = &self.samples
            && let Ok(mut v) = s.lock()
        {
            v.push(nanos);
        }
    }

    /// Records one run's time.
    pub fn sample_run(&self, pipeline: &str, nanos: u64) {
        if let Some(s) = &self.run_samples
            && let Ok(mut v) = s.lock()
        {
            v.push((pipeline.to_owned(), nanos));
        }
    }
}
