//! Running recordings through the engine: the shared driver behind `replay`, `demo` and `bench`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prompter_core::event::Event;
use prompter_core::output::Output;

use crate::config::Loaded;
use crate::engine::Engine;
use crate::recording::{LineProblem, RecordedLine};
use crate::sink::FnSink;
use crate::source::Source;
use crate::source::recording::RecordingSource;
use crate::stats::Stats;

pub use crate::source::recording::Pace;

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
/// each output as it is delivered. `sinks` (the engine config's notifiers) get the outputs too.
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
    on_event: impl FnMut(&Event) + Send + 'static,
    on_problem: impl FnMut(&LineProblem) + Send + 'static,
    mut on_output: impl FnMut(&Output) + Send + 'static,
    sinks: Vec<Box<dyn crate::sink::Sink>>,
) -> Summary {
    let started = Instant::now();
    let delivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = delivered.clone();
    let printer = FnSink::new("output", move |o: &Output| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        on_output(o);
    });
    let mut all: Vec<Box<dyn crate::sink::Sink>> = vec![Box::new(printer)];
    all.extend(sinks);
    let engine = Arc::new(Engine::new(
        loaded.pipelines,
        loaded.settings,
        all,
        stats.clone(),
    ));
    let source = RecordingSource::new(lines, paths.to_vec(), pace)
        .on_event(on_event)
        .on_problem(on_problem);
    let report = source.report();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    // On the runtime's workers, like every other task: the thread that called this only waits,
    // so the workers are not competing with a third busy thread for the cores.
    match tokio::spawn(Box::new(source).run(engine.clone(), shutdown)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "The recording source stopped."),
        Err(e) => tracing::error!(error = %e, "The recording source panicked."),
    }
    engine.finish().await;
    let outputs = delivered.load(std::sync::atomic::Ordering::Relaxed);
    let report = report.lock().map(|r| r.clone()).unwrap_or_default();
    let (conversations, skipped) = (report.conversations, report.skipped_lines);
    Summary {
        events: stats.events.load(std::sync::atomic::Ordering::Relaxed),
        conversations,
        outputs,
        skipped_lines: skipped,
        stage_errors: stats
            .stage_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        elapsed: started.elapsed(),
    }
}
