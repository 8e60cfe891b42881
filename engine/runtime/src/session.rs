//! Running recordings through the engine: the shared driver behind `replay`, `demo` and `bench`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prompter_core::event::Event;
use prompter_core::output::Output;

use crate::config::Loaded;
use crate::engine::Engine;
use crate::recording::{self, LineProblem, RecordedLine};
use crate::sink::FnSink;
use crate::stats::Stats;

/// How to pace a replay.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as possible (virtual time).
    Fast,
    /// Follow `offset_ms`, sped up by the factor (1.0 = real time).
    Realtime(f64),
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Events routed.
    pub events: u64,
    /// Distinct conversations.
    pub conversations: u64,
    /// Outputs delivered.
    pub outputs: u64,
    /// Lines skipped.
    pub skipped_lines: u64,
    /// Stage failures.
    pub stage_errors: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `lines` (already merged by offset) through the loaded pipelines.
///
/// `on_event` sees each event just before it is routed (the demo prints transcript lines from
/// it); `on_problem` gets each line that is skipped; `on_output` runs on a separate task for
/// each output as it is delivered.
#[allow(
    clippy::too_many_arguments,
    reason = "a driver with three observers reads best flat"
)]
pub async fn run(
    loaded: Loaded,
    lines: Vec<RecordedLine>,
    paths: &[PathBuf],
    pace: Pace,
    stats: Arc<Stats>,
    mut on_event: impl FnMut(&Event),
    mut on_problem: impl FnMut(&LineProblem),
    mut on_output: impl FnMut(Output) + Send + 'static,
) -> Summary {
    let started = Instant::now();
    let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = delivered.clone();
    let printer = FnSink::new("output", move |o: &Output| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        on_output(o.clone());
    });
    let router = Engine::new(
        loaded.pipelines,
        loaded.settings,
        vec![Box::new(printer)],
        stats.clone(),
    );
    let mut skipped = 0u64;
    let mut conversations = std::collections::HashSet::new();
    for line in &lines {
        if let Pace::Realtime(speed) = pace {
            let due = started
                + Duration::from_secs_f64(line.offset_ms as f64 / 1000.0 / speed.max(0.001));
            tokio::time::sleep_until(due.into()).await;
        }
        match recording::events(line, &paths[line.file]) {
            Ok(events) => {
                conversations.insert(line.conversation.clone());
                for e in events {
                    on_event(&e);
                    router.dispatch(e).await;
                }
            }
            Err(p) => {
                skipped += 1;
                on_problem(&p);
            }
        }
    }
    router.finish().await;
    let outputs = delivered.load(std::sync::atomic::Ordering::Relaxed);
    Summary {
        events: stats.events.load(std::sync::atomic::Ordering::Relaxed),
        conversations: conversations.len() as u64,
        outputs,
        skipped_lines: skipped,
        stage_errors: stats
            .stage_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}
