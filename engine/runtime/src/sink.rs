//! Where outputs go: the [`Sink`] trait, and the bounded queue in front of every sink.
//!
//! The engine hands each delivered output (an upsert: a draft or final version, or a
//! withdrawal) to every sink's [`SinkQueue`] and goes on; one task per sink drains its queue.
//! So a slow or failing sink never holds back a conversation or another sink. A queue that
//! coalesces keeps only the latest version of each output id waiting (a card updated ten times
//! while a webhook is slow is sent once, at its latest version); when it is full it drops the
//! oldest waiting draft first, then the oldest output, and counts what it dropped: a dropped
//! final version or withdrawal is handed back to the sink ([`Sink::abandon`]: a notifier sink
//! dead-letters it), so no final card vanishes because a target was slow. A lossless
//! queue (stdout, files) keeps every version in order and makes the producer wait instead.
//!
//! It does not own what a sink does with an output (each sink does), nor stamping versions
//! (the engine does, before anything reaches a sink).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prompter_core::output::{Output, Status};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// Why a sink could not take an output.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
#[must_use]
pub struct SinkError {
    /// What went wrong.
    pub message: String,
}

/// How a sink's queue behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Outputs waiting at most.
    pub capacity: usize,
    /// Keep only the latest waiting version of each id, and drop rather than wait when full.
    pub coalesce: bool,
}

impl QueuePolicy {
    /// Every version, in order; the producer waits when the queue is full (stdout, files).
    pub const LOSSLESS: QueuePolicy = QueuePolicy {
        capacity: 16_384,
        coalesce: false,
    };
    /// Latest version per id; never makes the engine wait (network sinks).
    pub const COALESCING: QueuePolicy = QueuePolicy {
        capacity: 4_096,
        coalesce: true,
    };
}

/// A destination for outputs.
#[prompter_core::async_trait]
pub trait Sink: Send + 'static {
    /// Its name, for logs and counters.
    fn name(&self) -> &str;

    /// How its queue behaves. Default: [`QueuePolicy::COALESCING`].
    fn policy(&self) -> QueuePolicy {
        QueuePolicy::COALESCING
    }

    /// Takes one output: an upsert (`draft` or `final`: show this version of the id) or a
    /// withdrawal (`withdrawn`: remove the id).
    ///
    /// # Errors
    /// When the output could not be delivered; it is logged and counted, and the sink goes on
    /// with the next one (retrying is the sink's own business).
    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError>;

    /// Whether it wants to hear that a conversation was released (after the last of its
    /// outputs), as a [`released`] marker in its queue. Default: no.
    fn wants_release(&self) -> bool {
        false
    }

    /// Whether it wants agents' feedback on outputs, as [`feedback_note`]s in its queue.
    /// Default: no.
    fn wants_feedback(&self) -> bool {
        false
    }

    /// Which outputs it takes, asked once when it starts and checked before an output is
    /// queued, so its queue holds only its own. Default: every output.
    fn filter(&self) -> Option<Filter> {
        None
    }

    /// Takes an output that will not be delivered (the engine is stopping and the drain
    /// deadline passed, or the sink's queue was full): a sink that keeps dead letters records
    /// it there. Default: logged.
    async fn abandon(&mut self, output: Arc<Output>, reason: &str) {
        tracing::error!(sink = %self.name(), output = %output.id, version = output.version, reason, "An output was not delivered.");
    }

    /// Called once after the last output, before the engine stops.
    async fn close(&mut self) {}
}

/// The `kind` of the marker a sink that [`Sink::wants_release`] gets after a conversation's
/// last output: its run settled and the engine let the conversation go.
pub const RELEASED_KIND: &str = "conversation.released";

/// The `kind` of the note a sink that [`Sink::wants_feedback`] gets when an agent gives
/// feedback on an output; its `data` is the feedback record.
pub const FEEDBACK_KIND: &str = "feedback";

/// A feedback note for `conversation`, carrying `record` (see [`FEEDBACK_KIND`]).
pub fn feedback_note(conversation: &str, at_ms: u64, record: serde_json::Value) -> Output {
    Output {
        id: format!("{conversation}/~feedback-{at_ms}"),
        kind: FEEDBACK_KIND.to_owned(),
        conversation_id: conversation.to_owned(),
        data: record,
        ..Output::default()
    }
}

/// The release marker for `conversation` (see [`RELEASED_KIND`]).
pub fn released(conversation: &str) -> Output {
    Output {
        id: format!("{conversation}/~released"),
        kind: RELEASED_KIND.to_owned(),
        conversation_id: conversation.to_owned(),
        ..Output::default()
    }
}

/// Which outputs a sink takes (see [`Sink::filter`]).
pub type Filter = Arc<dyn Fn(&Output) -> bool + Send + Sync>;

/// A sink from a closure (replay printers, tests).
pub struct FnSink<F> {
    name: String,
    policy: QueuePolicy,
    f: F,
}

impl<F: FnMut(&Output) + Send + 'static> FnSink<F> {
    /// A lossless sink calling `f` for every output.
    pub fn new(name: &str, f: F) -> Self {
        FnSink {
            name: name.to_owned(),
            policy: QueuePolicy::LOSSLESS,
            f,
        }
    }

    /// The same with another queue policy.
    #[must_use]
    pub fn with_policy(mut self, policy: QueuePolicy) -> Self {
        self.policy = policy;
        self
    }
}

#[prompter_core::async_trait]
impl<F: FnMut(&Output) + Send + 'static> Sink for FnSink<F> {
    fn name(&self) -> &str {
        &self.name
    }
    fn policy(&self) -> QueuePolicy {
        self.policy
    }
    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError> {
        (self.f)(&output);
        Ok(())
    }
}

/// Outputs as JSON lines (stdout for `replay` and `run`), lossless and in order; counts what
/// it wrote.
pub struct JsonLines {
    write: Box<dyn Fn(&str) + Send>,
    written: Arc<AtomicU64>,
}

impl JsonLines {
    /// A sink handing each output's JSON line to `write`.
    pub fn new(write: impl Fn(&str) + Send + 'static) -> Self {
        JsonLines {
            write: Box::new(write),
            written: Arc::default(),
        }
    }

    /// How many lines it wrote, readable while it runs.
    pub fn written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }
}

#[prompter_core::async_trait]
impl Sink for JsonLines {
    fn name(&self) -> &str {
        "json-lines"
    }
    fn policy(&self) -> QueuePolicy {
        QueuePolicy::LOSSLESS
    }
    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError> {
        let line = serde_json::to_string(&*output).map_err(|e| SinkError {
            message: format!("output `{}` did not serialize: {e}", output.id),
        })?;
        (self.write)(&line);
        self.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Default)]
struct Waiting {
    order: VecDeque<Arc<Output>>,
    /// Coalescing queues: id → position-independent latest version waiting.
    latest: HashMap<String, Arc<Output>>,
    /// Final versions and withdrawals dropped from a full queue, to hand back to the sink
    /// (at most the queue's capacity; beyond that they are only counted).
    evicted: VecDeque<Arc<Output>>,
    closed: bool,
}

/// What a sink's task takes from its queue next.
enum Popped {
    /// An output to deliver.
    Deliver(Arc<Output>),
    /// A final version or withdrawal dropped because the queue was full.
    Dropped(Arc<Output>),
}

/// Why an output was handed back to its sink from a full queue.
pub const QUEUE_FULL: &str = "the sink's queue was full (the target could not keep up)";

/// The bounded queue in front of one sink.
pub struct SinkQueue {
    name: String,
    policy: QueuePolicy,
    waiting: Mutex<Waiting>,
    ready: Notify,
    space: Notify,
    /// Outputs dropped because the queue was full (coalescing queues only).
    pub dropped: AtomicU64,
    /// Versions replaced by a later one before the sink took them.
    pub coalesced: AtomicU64,
    /// Deliveries the sink failed.
    pub failed: AtomicU64,
}

impl SinkQueue {
    /// The sink's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Outputs waiting for the sink now.
    pub fn depth(&self) -> usize {
        let w = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        w.order.len() + w.latest.len()
    }

    fn new(name: &str, policy: QueuePolicy) -> Self {
        SinkQueue {
            name: name.to_owned(),
            policy,
            waiting: Mutex::default(),
            ready: Notify::new(),
            space: Notify::new(),
            dropped: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues `output`. A lossless queue waits for room; a coalescing one never waits.
    pub async fn push(&self, output: Arc<Output>) {
        loop {
            let space = self.space.notified();
            {
                let mut w = self.lock();
                if self.policy.coalesce {
                    self.push_coalescing(&mut w, output);
                    break;
                }
                if w.order.len() < self.policy.capacity || w.closed {
                    w.order.push_back(output);
                    break;
                }
            }
            space.await;
        }
        self.ready.notify_one();
    }

    fn push_coalescing(&self, w: &mut Waiting, output: Arc<Output>) {
        if let Some(slot) = w.latest.get_mut(&output.id) {
            // A version of this id is already waiting: the sink will take this one instead.
            *slot = output;
            self.coalesced.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if w.latest.len() >= self.policy.capacity {
            let victim = w
                .order
                .iter()
                .position(|o| {
                    w.latest
                        .get(&o.id)
                        .is_some_and(|l| l.status == Status::Draft)
                })
                .unwrap_or(0);
            if let Some(gone) = w.order.remove(victim) {
                let gone = w.latest.remove(&gone.id).unwrap_or(gone);
                let n = self.dropped.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::error!(sink = %self.name, dropped = n + 1, "A sink's queue is full; outputs were dropped (final versions are handed back to it).");
                }
                if gone.status != Status::Draft && w.evicted.len() < self.policy.capacity {
                    w.evicted.push_back(gone);
                }
            }
        }
        w.latest.insert(output.id.clone(), output.clone());
        w.order.push_back(output);
    }

    /// The next output to deliver; `None` once closed and empty.
    async fn pop(&self) -> Option<Popped> {
        loop {
            let ready = self.ready.notified();
            {
                let mut w = self.lock();
                if let Some(o) = w.evicted.pop_front() {
                    return Some(Popped::Dropped(o));
                }
                if let Some(o) = w.order.pop_front() {
                    let o = if self.policy.coalesce {
                        w.latest.remove(&o.id).unwrap_or(o)
                    } else {
                        o
                    };
                    drop(w);
                    self.space.notify_one();
                    return Some(Popped::Deliver(o));
                }
                if w.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
        self.space.notify_waiters();
    }
}

/// Every sink of an engine, each behind its queue and drained by its own task.
pub struct Outlets {
    queues: Vec<Arc<SinkQueue>>,
    /// Each queue's filter (same order).
    filters: Vec<Option<Filter>>,
    /// The queues of sinks that want release markers.
    release_to: Vec<Arc<SinkQueue>>,
    /// The queues of sinks that want feedback notes.
    feedback_to: Vec<Arc<SinkQueue>>,
    tasks: Mutex<JoinSet<()>>,
    /// Turns true when the drain deadline passes: sinks abandon what is left.
    give_up: tokio::sync::watch::Sender<bool>,
}

/// Why outputs still queued at the drain deadline are abandoned.
pub const DRAIN_DEADLINE_PASSED: &str = "the engine stopped and the sink's drain deadline passed";

impl Outlets {
    /// Starts one task per sink.
    pub fn start(sinks: Vec<Box<dyn Sink>>) -> Self {
        let mut tasks = JoinSet::new();
        let mut queues = Vec::with_capacity(sinks.len());
        let mut filters = Vec::with_capacity(sinks.len());
        let mut release_to = Vec::new();
        let mut feedback_to = Vec::new();
        let (give_up, _) = tokio::sync::watch::channel(false);
        for mut sink in sinks {
            let q = Arc::new(SinkQueue::new(sink.name(), sink.policy()));
            queues.push(q.clone());
            filters.push(sink.filter());
            if sink.wants_release() {
                release_to.push(q.clone());
            }
            if sink.wants_feedback() {
                feedback_to.push(q.clone());
            }
            let mut deadline = give_up.subscribe();
            tasks.spawn(async move {
                while let Some(popped) = q.pop().await {
                    let o = match popped {
                        Popped::Deliver(o) => o,
                        Popped::Dropped(o) => {
                            sink.abandon(o, QUEUE_FULL).await;
                            continue;
                        }
                    };
                    tokio::select! {
                        r = sink.deliver(o.clone()) => {
                            if let Err(e) = r {
                                q.failed.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(sink = %q.name, error = %e, "A sink failed to deliver an output.");
                            }
                        }
                        () = async { let _ = deadline.wait_for(|g| *g).await; } => {
                            // Out of time: this output and every one still queued are handed
                            // back to the sink to record, not dropped silently.
                            sink.abandon(o, DRAIN_DEADLINE_PASSED).await;
                            while let Some(rest) = q.pop().await {
                                let (Popped::Deliver(rest) | Popped::Dropped(rest)) = rest;
                                sink.abandon(rest, DRAIN_DEADLINE_PASSED).await;
                            }
                            break;
                        }
                    }
                }
                sink.close().await;
            });
        }
        Outlets {
            queues,
            filters,
            release_to,
            feedback_to,
            tasks: Mutex::new(tasks),
            give_up,
        }
    }

    /// Hands `output` to every sink's queue.
    pub async fn push(&self, output: Arc<Output>) {
        for (q, filter) in self.queues.iter().zip(&self.filters) {
            if filter.as_ref().is_none_or(|f| f(&output)) {
                q.push(output.clone()).await;
            }
        }
    }

    /// Tells the sinks that want it that `conversation` was released, after its outputs.
    pub async fn released(&self, conversation: &str) {
        if self.release_to.is_empty() {
            return;
        }
        let marker = Arc::new(released(conversation));
        for q in &self.release_to {
            q.push(marker.clone()).await;
        }
    }

    /// Hands a feedback note (see [`feedback_note`]) to the sinks that want it.
    pub async fn feedback(&self, note: Output) {
        if self.feedback_to.is_empty() {
            return;
        }
        let note = Arc::new(note);
        for q in &self.feedback_to {
            q.push(note.clone()).await;
        }
    }

    /// The queues, for counters.
    pub fn queues(&self) -> &[Arc<SinkQueue>] {
        &self.queues
    }

    /// Lets every sink take what is queued, then stops them. A sink still busy after `drain`
    /// abandons what it has left ([`Sink::abandon`]: dead letters), then stops.
    pub async fn close(&self, drain: std::time::Duration) {
        for q in &self.queues {
            q.close();
        }
        let mut tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let deadline = tokio::time::Instant::now() + drain;
        loop {
            let next = tokio::select! {
                r = tasks.join_next() => r,
                () = tokio::time::sleep_until(deadline), if !*self.give_up.borrow() => {
                    let _ = self.give_up.send(true);
                    continue;
                }
            };
            match next {
                None => break,
                Some(Err(e)) => tracing::error!(error = %e, "A sink task panicked."),
                Some(Ok(())) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn out(id: &str, version: u32, status: Status) -> Arc<Output> {
        Arc::new(Output {
            id: id.into(),
            version,
            status,
            ..Output::default()
        })
    }

    /// A sink that takes `delay` per output and records (id, version).
    struct Slow {
        delay: Duration,
        seen: Arc<Mutex<Vec<(String, u32)>>>,
        policy: QueuePolicy,
    }

    #[prompter_core::async_trait]
    impl Sink for Slow {
        fn name(&self) -> &str {
            "slow"
        }
        fn policy(&self) -> QueuePolicy {
            self.policy
        }
        async fn deliver(&mut self, o: Arc<Output>) -> Result<(), SinkError> {
            tokio::time::sleep(self.delay).await;
            self.seen.lock().unwrap().push((o.id.clone(), o.version));
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_sink_gets_the_latest_version_and_never_holds_back_another() {
        let slow_seen = Arc::new(Mutex::new(Vec::new()));
        let fast_seen = Arc::new(Mutex::new(Vec::new()));
        let outlets = Outlets::start(vec![
            Box::new(Slow {
                delay: Duration::from_secs(10),
                seen: slow_seen.clone(),
                policy: QueuePolicy::COALESCING,
            }),
            Box::new(Slow {
                delay: Duration::ZERO,
                seen: fast_seen.clone(),
                policy: QueuePolicy::LOSSLESS,
            }),
        ]);
        let t0 = tokio::time::Instant::now();
        outlets.push(out("a", 1, Status::Draft)).await;
        tokio::task::yield_now().await;
        for v in 2..=5 {
            outlets.push(out("a", v, Status::Draft)).await;
        }
        outlets.push(out("a", 6, Status::Final)).await;
        outlets.push(out("b", 1, Status::Final)).await;
        assert!(
            t0.elapsed() < Duration::from_millis(1),
            "pushing never waits"
        );
        // Three deliveries of 10 s each: within a 60 s drain deadline.
        outlets.close(Duration::from_secs(60)).await;
        assert_eq!(
            fast_seen.lock().unwrap().len(),
            7,
            "the lossless sink saw every version"
        );
        let slow = slow_seen.lock().unwrap().clone();
        assert_eq!(
            slow,
            [("a".into(), 1), ("a".into(), 6), ("b".into(), 1)],
            "the slow sink got v1, then only the latest version of `a`"
        );
    }

    #[tokio::test]
    async fn a_full_coalescing_queue_drops_drafts_first() {
        let q = SinkQueue::new(
            "q",
            QueuePolicy {
                capacity: 2,
                coalesce: true,
            },
        );
        q.push(out("final", 1, Status::Final)).await;
        q.push(out("draft", 1, Status::Draft)).await;
        q.push(out("new", 1, Status::Final)).await;
        assert_eq!(q.dropped.load(Ordering::Relaxed), 1);
        // Only finals waiting: the oldest is dropped, and handed back to the sink first.
        q.push(out("newer", 1, Status::Final)).await;
        assert_eq!(q.dropped.load(Ordering::Relaxed), 2);
        q.close();
        let mut popped = Vec::new();
        while let Some(p) = q.pop().await {
            popped.push(match p {
                Popped::Deliver(o) => format!("deliver {}", o.id),
                Popped::Dropped(o) => format!("dropped {}", o.id),
            });
        }
        assert_eq!(popped, ["dropped final", "deliver new", "deliver newer"]);
    }

    /// A sink whose target never answers; records what it had to abandon.
    struct Down {
        abandoned: Arc<Mutex<Vec<(String, String)>>>,
    }

    #[prompter_core::async_trait]
    impl Sink for Down {
        fn name(&self) -> &str {
            "down"
        }
        async fn deliver(&mut self, _: Arc<Output>) -> Result<(), SinkError> {
            std::future::pending().await
        }
        async fn abandon(&mut self, o: Arc<Output>, reason: &str) {
            self.abandoned
                .lock()
                .unwrap()
                .push((o.id.clone(), reason.to_owned()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_drain_deadline_a_stuck_sink_abandons_everything_it_holds_and_stops() {
        let abandoned = Arc::new(Mutex::new(Vec::new()));
        let outlets = Outlets::start(vec![Box::new(Down {
            abandoned: abandoned.clone(),
        })]);
        for id in ["a", "b", "c"] {
            outlets.push(out(id, 1, Status::Final)).await;
        }
        tokio::task::yield_now().await;
        let t0 = tokio::time::Instant::now();
        outlets.close(Duration::from_secs(5)).await;
        assert_eq!(
            t0.elapsed(),
            Duration::from_secs(5),
            "stopped at the deadline"
        );
        let got = abandoned.lock().unwrap().clone();
        let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(
            ids,
            ["a", "b", "c"],
            "the one in flight, then the queued ones"
        );
        assert!(got.iter().all(|(_, why)| why == DRAIN_DEADLINE_PASSED));
    }
}
