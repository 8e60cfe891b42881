//! Engine counters, and optional per-event latency samples for `prompter bench`.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

/// Counters shared by the router and the pipeline runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events routed.
    pub events: AtomicU64,
    /// Pipeline runs that passed their filter.
    pub runs: AtomicU64,
    /// Stage failures and timeouts.
    pub stage_errors: AtomicU64,
    /// Conversations opened.
    pub conversations_opened: AtomicU64,
    /// Conversations released (completed or idle).
    pub conversations_released: AtomicU64,
    /// Per-event handling time in nanoseconds, when sampling is on.
    pub samples: Option<Mutex<Vec<u64>>>,
}

impl Stats {
    /// Counters that also sample per-event handling time.
    pub fn sampling() -> Self {
        Stats {
            samples: Some(Mutex::new(Vec::new())),
            ..Default::default()
        }
    }

    /// Records one per-event handling time.
    pub fn sample(&self, nanos: u64) {
        if let Some(s) = &self.samples {
            if let Ok(mut v) = s.lock() {
                v.push(nanos);
            }
        }
    }
}
