//! Recorded calls as a source: lines already merged by offset, dispatched as fast as possible
//! or at the call's own pace.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prompter_core::event::Event;
use tokio::sync::watch;

use super::{Source, SourceError};
use crate::engine::Engine;
use crate::recording::{self, LineProblem, RecordedLine};

/// How to pace a replay.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// As fast as possible (virtual time).
    Fast,
    /// Follow `offset_ms`, sped up by the factor (1.0 = real time).
    Realtime(f64),
}

/// What a recording source did.
#[derive(Debug, Default, Clone)]
pub struct RecordingReport {
    /// Distinct conversations.
    pub conversations: u64,
    /// Lines skipped (each was reported).
    pub skipped_lines: u64,
}

type EventObserver = Box<dyn FnMut(&Event) + Send>;
type ProblemObserver = Box<dyn FnMut(&LineProblem) + Send>;

/// Recorded lines (merged by offset) as a source.
pub struct RecordingSource {
    lines: Vec<RecordedLine>,
    paths: Vec<PathBuf>,
    pace: Pace,
    on_event: EventObserver,
    on_problem: ProblemObserver,
    report: Arc<Mutex<RecordingReport>>,
}

impl RecordingSource {
    /// A source over `lines`, which came from `paths` (a line's `file` indexes it).
    pub fn new(lines: Vec<RecordedLine>, paths: Vec<PathBuf>, pace: Pace) -> Self {
        RecordingSource {
            lines,
            paths,
            pace,
            on_event: Box::new(|_| {}),
            on_problem: Box::new(|_| {}),
            report: Arc::default(),
        }
    }

    /// Calls `f` with each event just before it is dispatched (the demo prints transcript
    /// lines from it).
    #[must_use]
    pub fn on_event(mut self, f: impl FnMut(&Event) + Send + 'static) -> Self {
        self.on_event = Box::new(f);
        self
    }

    /// Calls `f` with each line that is skipped.
    #[must_use]
    pub fn on_problem(mut self, f: impl FnMut(&LineProblem) + Send + 'static) -> Self {
        self.on_problem = Box::new(f);
        self
    }

    /// What the source did, filled in as it runs.
    pub fn report(&self) -> Arc<Mutex<RecordingReport>> {
        self.report.clone()
    }
}

#[prompter_core::async_trait]
impl Source for RecordingSource {
    fn name(&self) -> &str {
        "recording"
    }

    async fn run(
        mut self: Box<Self>,
        engine: Arc<Engine>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let started = Instant::now();
        let mut conversations: HashSet<&str> = HashSet::new();
        let mut skipped = 0u64;
        for line in &self.lines {
            if *shutdown.borrow() {
                break;
            }
            if let Pace::Realtime(speed) = self.pace {
                let due = started
                    + Duration::from_secs_f64(line.offset_ms as f64 / 1000.0 / speed.max(0.001));
                tokio::time::sleep_until(due.into()).await;
            }
            let Some(path) = self.paths.get(line.file) else {
                continue;
            };
            match recording::events(line, path) {
                Ok(events) => {
                    conversations.insert(&line.conversation);
                    for e in events {
                        (self.on_event)(&e);
                        engine.dispatch_from("replay", e).await;
                    }
                }
                Err(p) => {
                    skipped += 1;
                    (self.on_problem)(&p);
                }
            }
        }
        let mut r = self
            .report
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.conversations = conversations.len() as u64;
        r.skipped_lines = skipped;
        Ok(())
    }
}
