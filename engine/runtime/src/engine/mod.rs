//! The engine: events in, outputs out, one ordered task per live conversation.
//!
//! [`Engine::dispatch`] hands an event to its conversation's task (started on first sight), which
//! folds it into the conversation state strictly in order and starts a run for every pipeline
//! that reacts to it. Runs read a snapshot of the state taken at their event (a cheap clone, see
//! [`ConversationState`]) and go on in their own tasks: the fold never waits for a run, and
//! runs overlap as their pipeline's `concurrency` says (`parallel`, `queue`, `latest_wins`).
//! Outputs are stamped (version, sequence) by the conversation's [`Book`] and handed to every
//! sink's queue ([`crate::sink`]).
//!
//! Per-conversation state (the fold, stage state, output versions) belongs to the engine: it can
//! be snapshotted ([`Engine::snapshot`]) and restored into another engine ([`Engine::restore`]),
//! and is released when the conversation completes or has been idle for `conversation_idle`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prompter_core::book::{Book, Host};
use prompter_core::conversation::ConversationState;
use prompter_core::error::PluginError;
use prompter_core::event::{Event, EventKind};
use prompter_core::output::{Output, Status};
use prompter_core::plugin::{Run, RunScope};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tracing::debug;

use crate::config::{OverloadPolicy, Settings};
use crate::pipeline::{Concurrency, Pipeline, Priority};
use crate::sink::{Outlets, Sink};
use crate::stats::Stats;

/// Released conversations whose books (output versions, stage state) are kept, so a
/// conversation that comes back (late events, a call followed again) continues its cards'
/// versions instead of starting them over. The oldest is forgotten first, one at a time.
const RELEASED_BOOKS: usize = 4_096;

/// Sees every event once it is folded into its conversation's state (the agent feed takes its
/// transcript from here). Called on the conversation's task, in order: it must be quick and
/// never wait.
pub trait Observer: Send + Sync + 'static {
    /// `event` was just folded into its conversation.
    fn folded(&self, event: &Event);

    /// `conversation` was released (completed, or idle for `conversation_idle`), after its
    /// last run settled. What an observer keeps for it may be let go.
    fn released(&self, conversation: &str) {
        let _ = conversation;
    }
}

/// Takes events instead of the engine's own conversation tasks: an ingest process hands every
/// event its sources accept to a durable log (the NATS cluster's events stream) and runs no
/// pipeline itself. [`Engine::dispatch_from`] waits until the forwarder has taken the event.
#[prompter_core::async_trait]
pub trait Forward: Send + Sync + 'static {
    /// Takes `event` from `source`; returns once it is stored (or given up on, and said so).
    async fn forward(&self, source: &'static str, event: Event);
}

/// Hears when a conversation has settled: every event dispatched with a mark up to `mark` is
/// folded, every run those events started has finished, and every output they delivered has
/// been handed to the sinks' queues. Called on the conversation's task: it must be quick.
/// The cluster source acknowledges its inputs and snapshots conversations from here.
pub trait Settled: Send + Sync + 'static {
    /// `conversation` settled at `mark` (the last mark dispatched to it), having delivered
    /// `outputs` outputs so far (its book's sequence). `snapshot` builds its whole state (it
    /// costs a copy of the transcript: call it only when a snapshot is due).
    fn settled(
        &self,
        conversation: &str,
        mark: u64,
        outputs: u64,
        snapshot: &dyn Fn() -> ConversationSnapshot,
    );
}

/// A conversation's whole state: what was folded and what the engine keeps for it. Taken with
/// no run in flight, so restoring it and feeding the rest of the call gives exactly the outputs
/// of an uninterrupted run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationSnapshot {
    /// The folded state.
    pub state: ConversationState,
    /// Output versions, sequence, stage state.
    pub book: Book,
}

/// Why a snapshot or restore could not be done.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum EngineError {
    /// No live conversation has that id.
    #[error("no live conversation `{0}`")]
    UnknownConversation(String),
    /// The conversation is live already: restoring would fork it.
    #[error("conversation `{0}` is already live in this engine")]
    AlreadyLive(String),
    /// The engine has finished.
    #[error("the engine has finished")]
    Finished,
}

#[allow(
    clippy::large_enum_variant,
    reason = "events are the traffic; boxing each would cost an allocation per event for the rare snapshot"
)]
enum Msg {
    /// An event, with its source's mark (0: none).
    Event(Event, u64),
    Snapshot(oneshot::Sender<ConversationSnapshot>),
    /// End the conversation here and forget it (another process owns it now); answered once
    /// its runs have finished.
    Evict(oneshot::Sender<()>),
}

/// The engine. Shared by reference (`&self` everywhere): several sources may dispatch at once,
/// and a source waits only when *its* conversation's queue is full.
pub struct Engine {
    /// The pipelines in force; a reload sends a new set, which each conversation takes at its
    /// next event.
    pipelines: watch::Sender<Arc<PipelineSet>>,
    settings: crate::config::Settings,
    outlets: Arc<Outlets>,
    stats: Arc<Stats>,
    conversations: Mutex<HashMap<Arc<str>, mpsc::Sender<Msg>>>,
    tasks: Mutex<JoinSet<()>>,
    finished: AtomicBool,
    run_ids: Arc<AtomicU64>,
    released: Arc<Mutex<ReleasedBooks>>,
    observers: Arc<Vec<Arc<dyn Observer>>>,
    /// One permit per pipeline run in flight, across conversations (`engine.overload`).
    slots: Arc<Slots>,
    /// Where events go instead of conversation tasks (an ingest process).
    forward: Option<Arc<dyn Forward>>,
    /// Who hears that conversations settled (the cluster source).
    settled: Option<Arc<dyn Settled>>,
}

/// The engine's run slots and what to do when they run out.
struct Slots {
    permits: Arc<tokio::sync::Semaphore>,
    overload: crate::config::Overload,
}

impl Slots {
    fn new(overload: crate::config::Overload) -> Self {
        Slots {
            permits: Arc::new(tokio::sync::Semaphore::new(overload.max_runs)),
            overload,
        }
    }

    /// Runs in flight that hold a slot.
    fn in_flight(&self) -> usize {
        self.overload
            .max_runs
            .saturating_sub(self.permits.available_permits())
    }

    /// A slot for a run of a `priority` pipeline: `Ok(None)` runs without one (a `high` run past
    /// the limit), `Err` sheds it. Under back-pressure, waits for a slot.
    async fn admit(
        &self,
        priority: Priority,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ()> {
        let permits = &self.permits;
        match self.overload.policy {
            OverloadPolicy::Backpressure => {
                if let Ok(p) = permits.clone().try_acquire_owned() {
                    return Ok(Some(p));
                }
                metrics.overload_wait();
                Ok(permits.clone().acquire_owned().await.ok())
            }
            OverloadPolicy::Shed => {
                let free = permits.available_permits();
                let allowed = match priority {
                    Priority::High => true,
                    Priority::Normal => free > 0,
                    Priority::Low => free > self.overload.max_runs / 2,
                };
                match permits.clone().try_acquire_owned() {
                    Ok(p) if allowed => Ok(Some(p)),
                    Err(_) if priority == Priority::High => Ok(None),
                    _ => Err(()),
                }
            }
        }
    }
}

/// The pipelines of one configuration generation.
pub struct PipelineSet {
    /// 1 for the engine's first configuration, +1 per reload.
    pub generation: u64,
    /// The pipelines.
    pub pipelines: Vec<Arc<Pipeline>>,
}

impl PipelineSet {
    fn stage_fingerprints(&self) -> HashMap<String, u64> {
        self.pipelines
            .iter()
            .flat_map(|p| {
                p.stages
                    .iter()
                    .map(move |s| (format!("{}/{}", p.name, s.id), s.fingerprint))
            })
            .collect()
    }
}

#[derive(Default)]
struct ReleasedBooks {
    order: VecDeque<Arc<str>>,
    books: HashMap<Arc<str>, Book>,
}

impl Engine {
    /// An engine over `pipelines`, delivering to `sinks` (each behind its own queue).
    pub fn new(
        pipelines: Vec<Pipeline>,
        settings: Settings,
        sinks: Vec<Box<dyn Sink>>,
        stats: Arc<Stats>,
    ) -> Self {
        let outlets = Arc::new(Outlets::start(sinks));
        let settings_overload = settings.overload;
        let slots = Arc::new(Slots::new(settings_overload));
        stats
            .metrics
            .add_collector(Box::new(engine_collector(&stats, &outlets, &slots)));
        Engine {
            pipelines: watch::channel(Arc::new(PipelineSet {
                generation: 1,
                pipelines: pipelines.into_iter().map(Arc::new).collect(),
            }))
            .0,
            settings,
            outlets,
            stats,
            conversations: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            finished: AtomicBool::new(false),
            run_ids: Arc::new(AtomicU64::new(0)),
            released: Arc::default(),
            observers: Arc::default(),
            slots,
            forward: None,
            settled: None,
        }
    }

    /// Hands every dispatched event to `forward` instead of running pipelines on it (an ingest
    /// process of a cluster).
    #[must_use]
    pub fn with_forwarder(mut self, forward: Arc<dyn Forward>) -> Self {
        self.forward = Some(forward);
        self
    }

    /// Tells `settled` whenever a conversation settles after marked events (see
    /// [`Engine::dispatch_marked`]).
    #[must_use]
    pub fn with_settled(mut self, settled: Arc<dyn Settled>) -> Self {
        self.settled = Some(settled);
        self
    }

    /// Adds an observer of folded events (before the first event is dispatched).
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn Observer>) -> Self {
        let mut all: Vec<Arc<dyn Observer>> = self.observers.iter().cloned().collect();
        all.push(observer);
        self.observers = Arc::new(all);
        self
    }

    /// The files the pipelines in force were loaded from.
    pub fn pipeline_files(&self) -> Vec<std::path::PathBuf> {
        self.pipelines
            .borrow()
            .pipelines
            .iter()
            .map(|p| p.file.clone())
            .collect()
    }

    /// The configuration generation in force (1 until the first reload).
    pub fn generation(&self) -> u64 {
        self.pipelines.borrow().generation
    }

    /// Switches to `pipelines` (built and validated by the caller, off the hot path); returns
    /// the new generation. Nothing stops: each conversation takes the new set when it dequeues
    /// its next event, and that whole event runs on it; runs already started finish on the set
    /// they started with. Stage state (the conversation's book) is kept for every stage whose
    /// pipeline, id and configuration are unchanged, and dropped for the others.
    pub fn reload(&self, pipelines: Vec<Pipeline>) -> u64 {
        let mut generation = 0;
        self.pipelines.send_modify(|set| {
            generation = set.generation + 1;
            *set = Arc::new(PipelineSet {
                generation,
                pipelines: pipelines.into_iter().map(Arc::new).collect(),
            });
        });
        self.stats.metrics.reload(true);
        generation
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The sinks' queues (for their counters).
    pub fn outlets(&self) -> &Outlets {
        &self.outlets
    }

    /// Hands `event` to its conversation's task, starting one if needed. Waits when that
    /// conversation's queue is full.
    pub async fn dispatch(&self, event: Event) {
        self.dispatch_from("other", event).await;
    }

    /// [`Engine::dispatch`], counting the event under `source` in the metrics (`replay`,
    /// `symbl`, `twilio`, `feed`, ...).
    pub async fn dispatch_from(&self, source: &'static str, event: Event) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        self.stats.metrics.event(source, event.kind.as_str());
        if let Some(f) = &self.forward {
            f.forward(source, event).await;
            return;
        }
        self.enqueue(event, 0).await;
    }

    /// [`Engine::dispatch_from`] with a mark (a position in the source, such as a stream
    /// sequence; increasing per conversation, never 0): the [`Settled`] hook hears the last
    /// mark a conversation has wholly handled. Never forwarded.
    pub async fn dispatch_marked(&self, source: &'static str, event: Event, mark: u64) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        self.stats.metrics.event(source, event.kind.as_str());
        self.enqueue(event, mark).await;
    }

    async fn enqueue(&self, event: Event, mark: u64) {
        let id = event.conversation_id.clone();
        let mut msg = Msg::Event(event, mark);
        loop {
            let Some(tx) = self.sender(&id, None) else {
                tracing::error!(conversation = %id, "An event arrived after the engine finished; it is not handled.");
                return;
            };
            match tx.send(msg).await {
                Ok(()) => return,
                // The task ended (completed or idle) between events: start a fresh one.
                Err(mpsc::error::SendError(back)) => {
                    let mut map = lock(&self.conversations);
                    if map.get(&id).is_some_and(mpsc::Sender::is_closed) {
                        map.remove(&id);
                    }
                    msg = back;
                }
            }
        }
    }

    /// The whole state of live conversation `id`, taken once the events queued before this call
    /// are folded and every run they started has finished.
    ///
    /// # Errors
    /// When no live conversation has that id.
    pub async fn snapshot(&self, id: &str) -> Result<ConversationSnapshot, EngineError> {
        let tx = lock(&self.conversations)
            .get(id)
            .filter(|tx| !tx.is_closed())
            .cloned()
            .ok_or_else(|| EngineError::UnknownConversation(id.to_owned()))?;
        let (reply, rx) = oneshot::channel();
        tx.send(Msg::Snapshot(reply))
            .await
            .map_err(|_| EngineError::UnknownConversation(id.to_owned()))?;
        rx.await
            .map_err(|_| EngineError::UnknownConversation(id.to_owned()))
    }

    /// Ends live conversation `id` in this engine without keeping anything of it (its runs
    /// finish and deliver first): another process owns it now, and whoever handles it here
    /// next starts from a [`Engine::restore`]. Returns false when it was not live.
    pub async fn evict(&self, id: &str) -> bool {
        let tx = lock(&self.conversations).remove(id);
        take_released(&self.released, id);
        let Some(tx) = tx.filter(|tx| !tx.is_closed()) else {
            return false;
        };
        let (reply, rx) = oneshot::channel();
        if tx.send(Msg::Evict(reply)).await.is_err() {
            return false;
        }
        rx.await.is_ok()
    }

    /// Makes `snapshot`'s conversation live in this engine, to be continued by its next events.
    ///
    /// # Errors
    /// When the conversation is already live here, or the engine has finished.
    pub fn restore(&self, snapshot: ConversationSnapshot) -> Result<(), EngineError> {
        let id: Arc<str> = Arc::from(snapshot.state.id.as_str());
        if lock(&self.conversations)
            .get(&id)
            .is_some_and(|tx| !tx.is_closed())
        {
            return Err(EngineError::AlreadyLive(id.to_string()));
        }
        self.sender(&id, Some(snapshot))
            .map(|_| ())
            .ok_or(EngineError::Finished)
    }

    /// The queue of conversation `id`, opening its task (from `restored` when given) when there
    /// is none.
    fn sender(
        &self,
        id: &Arc<str>,
        restored: Option<ConversationSnapshot>,
    ) -> Option<mpsc::Sender<Msg>> {
        let mut map = lock(&self.conversations);
        if self.finished.load(Ordering::SeqCst) {
            return None;
        }
        if restored.is_none()
            && let Some(tx) = map.get(id)
            && !tx.is_closed()
        {
            return Some(tx.clone());
        }
        // Drop the senders of tasks that have ended, so the map only holds live conversations.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, tx| !tx.is_closed());
        }
        let mut tasks = lock(&self.tasks);
        while let Some(res) = tasks.try_join_next() {
            if let Err(e) = res {
                tracing::error!(error = %e, "A conversation task panicked.");
            }
        }
        let (tx, rx) = mpsc::channel(self.settings.queue_capacity);
        map.insert(id.clone(), tx.clone());
        self.stats
            .conversations_opened
            .fetch_add(1, Ordering::Relaxed);
        let (state, book) = match restored {
            Some(mut s) => {
                s.state.reindex();
                (s.state, s.book)
            }
            None => (
                ConversationState::new(id),
                take_released(&self.released, id).unwrap_or_default(),
            ),
        };
        let mut pipelines_rx = self.pipelines.subscribe();
        let pipelines = pipelines_rx.borrow_and_update().clone();
        let shared = Arc::new(Shared {
            book: Mutex::new(book),
            delivery: tokio::sync::Mutex::new(()),
            outlets: self.outlets.clone(),
            stats: self.stats.clone(),
            generation: AtomicU64::new(pipelines.generation),
        });
        let task = Conversation {
            state,
            shared,
            pipelines,
            pipelines_rx,
            stats: self.stats.clone(),
            idle: self.settings.conversation_idle,
            run_ids: self.run_ids.clone(),
            runs: JoinSet::new(),
            queued: HashMap::new(),
            latest: HashMap::new(),
            released: self.released.clone(),
            observers: self.observers.clone(),
            slots: self.slots.clone(),
            settled: self.settled.clone(),
            mark: 0,
            reported: (0, 0),
            evicted: false,
        };
        tasks.spawn(task.run(rx));
        Some(tx)
    }

    /// Closes every conversation queue, waits until all queued events are handled and every
    /// run has finished, then lets the sinks take every output. Events dispatched afterwards
    /// are not handled (and logged as errors).
    pub async fn finish(&self) {
        {
            let mut map = lock(&self.conversations);
            self.finished.store(true, Ordering::SeqCst);
            map.clear();
        }
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "A conversation task panicked.");
            }
        }
        self.outlets.close(self.settings.sink_drain).await;
    }
}

/// What the metrics read from the engine at scrape time: conversations and sink queues.
fn engine_collector(
    stats: &Arc<Stats>,
    outlets: &Arc<Outlets>,
    slots: &Arc<Slots>,
) -> crate::metrics::FnCollector<impl Fn() -> Vec<crate::metrics::Reading> + Send + Sync + 'static>
{
    use crate::metrics::{Reading, single};
    // Weak: the registry lives in the stats, which must not keep themselves alive.
    let stats = Arc::downgrade(stats);
    let outlets = Arc::downgrade(outlets);
    let slots = Arc::downgrade(slots);
    crate::metrics::FnCollector(move || {
        let mut out = Vec::new();
        if let Some(s) = slots.upgrade() {
            out.push(single(
                "prompter_runs_in_flight",
                "Pipeline runs holding one of the engine's run slots (engine.overload.max_runs)",
                false,
                s.in_flight() as u64,
            ));
        }
        if let Some(s) = stats.upgrade() {
            let opened = s.conversations_opened.load(Ordering::Relaxed);
            let released = s.conversations_released.load(Ordering::Relaxed);
            out.push(single(
                "prompter_conversations_active",
                "Conversations the engine holds state for",
                false,
                opened.saturating_sub(released),
            ));
            out.push(single(
                "prompter_conversations_opened",
                "Conversations started",
                true,
                opened,
            ));
            out.push(single(
                "prompter_conversations_released",
                "Conversations released (completed or idle)",
                true,
                released,
            ));
        }
        if let Some(o) = outlets.upgrade() {
            let per_sink =
                |name, help, counter, f: &dyn Fn(&crate::sink::SinkQueue) -> u64| Reading {
                    name,
                    help,
                    counter,
                    samples: o
                        .queues()
                        .iter()
                        .map(|q| (vec![("sink", q.name().to_owned())], f(q)))
                        .collect(),
                };
            out.push(per_sink(
                "prompter_sink_queue_depth",
                "Outputs waiting in a sink's queue",
                false,
                &|q| q.depth() as u64,
            ));
            out.push(per_sink(
                "prompter_sink_dropped",
                "Outputs dropped because a sink's queue was full",
                true,
                &|q| q.dropped.load(Ordering::Relaxed),
            ));
            out.push(per_sink(
                "prompter_sink_coalesced",
                "Output versions replaced by a later one before their sink took them",
                true,
                &|q| q.coalesced.load(Ordering::Relaxed),
            ));
            out.push(per_sink(
                "prompter_sink_failures",
                "Deliveries a sink failed",
                true,
                &|q| q.failed.load(Ordering::Relaxed),
            ));
        }
        out
    })
}

fn take_released(released: &Mutex<ReleasedBooks>, id: &str) -> Option<Book> {
    let mut r = lock(released);
    let book = r.books.remove(id)?;
    r.order.retain(|k| &**k != id);
    Some(book)
}

/// Locks a mutex; a poisoned one is still consistent here (every update is one insert/remove).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a conversation's runs share: its book and the way to the sinks.
struct Shared {
    book: Mutex<Book>,
    /// Held while an output is stamped and queued, so sinks see one conversation's outputs in
    /// sequence order.
    delivery: tokio::sync::Mutex<()>,
    outlets: Arc<Outlets>,
    stats: Arc<Stats>,
    /// The generation of the conversation's pipeline set, for outputs not stamped by a run.
    generation: AtomicU64,
}

#[prompter_core::async_trait]
impl Host for Shared {
    async fn deliver(&self, mut output: Output) -> Result<Output, PluginError> {
        let _order = self.delivery.lock().await;
        if output.generation == 0 {
            output.generation = self.generation.load(Ordering::Relaxed);
        }
        lock(&self.book).stamp(&mut output);
        self.stats.outputs.fetch_add(1, Ordering::Relaxed);
        let delivered = Arc::new(output);
        self.outlets.push(delivered.clone()).await;
        Ok(Arc::unwrap_or_clone(delivered))
    }
    fn claim(&self, run: u64, scope: &str, key: &str, at_ms: u64, cooldown_ms: u64) -> bool {
        lock(&self.book).claim(run, scope, key, at_ms, cooldown_ms)
    }
    fn get(&self, scope: &str, key: &str) -> Option<String> {
        lock(&self.book).get(scope, key)
    }
    fn set(&self, scope: &str, key: &str, value: Option<String>) {
        lock(&self.book).set(scope, key, value);
    }
}

struct Conversation {
    state: ConversationState,
    shared: Arc<Shared>,
    pipelines: Arc<PipelineSet>,
    pipelines_rx: watch::Receiver<Arc<PipelineSet>>,
    stats: Arc<Stats>,
    idle: std::time::Duration,
    run_ids: Arc<AtomicU64>,
    runs: JoinSet<()>,
    /// Per pipeline: the signal that the latest run started has finished (`queue`) or passed
    /// its first stage (the others).
    queued: HashMap<usize, oneshot::Receiver<()>>,
    /// `latest_wins` pipelines: (pipeline, supersede key) → the latest run started.
    latest: HashMap<(usize, String), Arc<Run>>,
    released: Arc<Mutex<ReleasedBooks>>,
    observers: Arc<Vec<Arc<dyn Observer>>>,
    slots: Arc<Slots>,
    settled: Option<Arc<dyn Settled>>,
    /// The last mark dispatched to this conversation.
    mark: u64,
    /// The (mark, outputs) last reported as settled.
    reported: (u64, u64),
    /// Ended by [`Engine::evict`]: nothing of it is kept.
    evicted: bool,
}

impl Conversation {
    /// Tells the [`Settled`] hook, if any, when no run is in flight and something new was
    /// handled since the last report.
    fn report_settled(&mut self) {
        let Some(hook) = &self.settled else {
            return;
        };
        if self.mark == 0 || !self.runs.is_empty() {
            return;
        }
        let outputs = lock(&self.shared.book).seq;
        if self.reported == (self.mark, outputs) {
            return;
        }
        self.reported = (self.mark, outputs);
        let state = &self.state;
        let book = &self.shared.book;
        hook.settled(&self.state.id, self.mark, outputs, &|| {
            ConversationSnapshot {
                state: state.clone(),
                book: lock(book).clone(),
            }
        });
    }

    /// Takes a new pipeline set, if a reload sent one: at an event boundary, so every event
    /// runs wholly on one set.
    fn switch(&mut self) {
        if !self.pipelines_rx.has_changed().unwrap_or(false) {
            return;
        }
        let new = self.pipelines_rx.borrow_and_update().clone();
        if new.generation == self.pipelines.generation {
            return;
        }
        let old = std::mem::replace(&mut self.pipelines, new);
        // Runs chain per pipeline (by name): re-key what is pending to the new positions.
        let position = |name: &str| self.pipelines.pipelines.iter().position(|p| p.name == name);
        let queued = std::mem::take(&mut self.queued);
        for (i, rx) in queued {
            if let Some(j) = old.pipelines.get(i).and_then(|p| position(&p.name)) {
                self.queued.insert(j, rx);
            }
        }
        let latest = std::mem::take(&mut self.latest);
        for ((i, key), run) in latest {
            if let Some(j) = old.pipelines.get(i).and_then(|p| position(&p.name)) {
                self.latest.insert((j, key), run);
            }
        }
        // Stage state survives only where the stage is the same.
        let kept = self.pipelines.stage_fingerprints();
        {
            let mut book = lock(&self.shared.book);
            for (scope, fingerprint) in old.stage_fingerprints() {
                if kept.get(&scope) != Some(&fingerprint) {
                    book.forget_scope(&scope);
                }
            }
        }
        for p in &old.pipelines {
            for s in &p.stages {
                s.plugin.conversation_ended(&self.state.id);
            }
        }
        self.shared
            .generation
            .store(self.pipelines.generation, Ordering::Relaxed);
        debug!(conversation = %self.state.id, generation = self.pipelines.generation, "Switched to a reloaded configuration.");
    }

    /// Folds `event` in and starts the runs it triggers; true when the conversation completed.
    /// The event is folded first, whatever the load: only its runs wait for a slot (or are
    /// shed).
    async fn handle(&mut self, event: Event, mark: u64) -> bool {
        if mark != 0 {
            self.mark = mark;
        }
        self.switch();
        let t0 = Instant::now();
        self.state.apply(&event);
        for o in self.observers.iter() {
            o.folded(&event);
        }
        let completed = event.kind == EventKind::ConversationCompleted;
        if self
            .pipelines
            .pipelines
            .iter()
            .any(|p| p.accepts(event.kind))
        {
            let event = Arc::new(event);
            // One snapshot for every run of this event: a clone whose cost does not grow with
            // the call.
            let snapshot = Arc::new(self.state.clone());
            for i in 0..self.pipelines.pipelines.len() {
                if self.pipelines.pipelines[i].accepts(event.kind) {
                    self.start(i, &event, &snapshot).await;
                }
            }
        }
        while let Some(r) = self.runs.try_join_next() {
            if let Err(e) = r {
                tracing::error!(error = %e, "A pipeline run panicked.");
            }
        }
        self.stats.sample(t0.elapsed().as_nanos() as u64);
        self.report_settled();
        completed
    }

    async fn start(&mut self, i: usize, event: &Arc<Event>, snapshot: &Arc<ConversationState>) {
        let pipeline = self.pipelines.pipelines[i].clone();
        let scope = RunScope::new(event.clone(), snapshot.clone());
        if !pipeline.admits(&scope, &self.stats) {
            return;
        }
        let Ok(slot) = self
            .slots
            .admit(pipeline.priority, &self.stats.metrics)
            .await
        else {
            pipeline.metrics(&self.stats).shed();
            debug!(conversation = %event.conversation_id, pipeline = %pipeline.name, "Overloaded: run shed.");
            return;
        };
        let id = self.run_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let run = Arc::new(Run::new(id, pipeline.output_id(&scope)));
        // Runs of one pipeline start in trigger order: each waits for the one before it, to
        // finish (`queue`) or to have passed its first stage (the others), so a first stage such
        // as `dedupe` decides in the order of the triggers and the same call always gives the
        // same outputs.
        let (tx, rx) = oneshot::channel();
        let after = self.queued.insert(i, rx);
        let (done, first_done) = match pipeline.concurrency {
            Concurrency::Queue => (Some(tx), None),
            Concurrency::Parallel => (None, Some(tx)),
            Concurrency::LatestWins => {
                let key = pipeline.supersede_key(&scope, &run.output_id);
                // Finished runs cancel their own token on the way out: forget them.
                self.latest.retain(|_, r| !r.cancel.is_cancelled());
                if let Some(older) = self.latest.insert((i, key), run.clone()) {
                    run.supersede(older);
                }
                (None, Some(tx))
            }
        };
        let shared = self.shared.clone();
        let stats = self.stats.clone();
        // One span per run, named after its event, so one suggestion's path (the run, then its
        // stages' spans) can be followed in the logs; its fields are computed only when the
        // span is enabled.
        let span = tracing::debug_span!(
            "run",
            conversation = %event.conversation_id,
            event = %format_args!("{:016x}", event.identity()),
            kind = event.kind.as_str(),
            pipeline = %pipeline.name,
            generation = self.pipelines.generation,
            run = id,
        );
        self.runs.spawn(tracing::Instrument::instrument(async move {
            if let Some(prev) = after {
                // A closed channel means the previous run ended (or panicked): go on either way.
                let _ = prev.await;
            }
            let t0 = Instant::now();
            let ended = tokio::select! {
                biased;
                () = run.cancel.cancelled() => {
                    pipeline
                        .metrics(&stats)
                        .run(crate::metrics::RunOutcome::Superseded, t0.elapsed().as_secs_f64());
                    Ended::Superseded
                }
                why = pipeline.run(&scope, &run, &*shared, &stats, first_done) => Ended::Ran(why),
            };
            close_open_drafts(&run, &*shared, ended).await;
            lock(&shared.book).settle(run.id, run.delivered());
            stats.sample_run(&pipeline.name, t0.elapsed().as_nanos() as u64);
            run.cancel.cancel();
            drop(slot);
            drop(done);
        }, span));
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut evicted = None;
        loop {
            let msg = if self.settled.is_some() && !self.runs.is_empty() {
                // A cluster source waits to hear when the runs in flight have finished.
                tokio::select! {
                    m = tokio::time::timeout(self.idle, rx.recv()) => m,
                    Some(r) = self.runs.join_next() => {
                        if let Err(e) = r {
                            tracing::error!(error = %e, "A pipeline run panicked.");
                        }
                        self.report_settled();
                        continue;
                    }
                }
            } else {
                tokio::time::timeout(self.idle, rx.recv()).await
            };
            match msg {
                Ok(Some(Msg::Event(event, mark))) => {
                    if self.handle(event, mark).await {
                        debug!(conversation = %self.state.id, "Conversation completed; releasing its state.");
                        break;
                    }
                }
                Ok(Some(Msg::Snapshot(reply))) => self.snapshot(reply).await,
                Ok(Some(Msg::Evict(reply))) => {
                    evicted = Some(reply);
                    break;
                }
                Ok(None) => break,
                // Idle: runs still in flight are waited for below, before the release.
                Err(_) => {
                    debug!(conversation = %self.state.id, "Conversation idle; releasing its state.");
                    break;
                }
            }
        }
        // Refuse new events (the engine starts a fresh task for late ones), but handle every
        // event already accepted into the queue: nothing accepted is dropped.
        rx.close();
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Event(event, mark) => {
                    self.handle(event, mark).await;
                }
                Msg::Snapshot(reply) => self.snapshot(reply).await,
                Msg::Evict(reply) => evicted = Some(reply),
            }
        }
        self.settle_runs().await;
        self.report_settled();
        self.evicted = evicted.is_some();
        self.stats
            .conversations_released
            .fetch_add(1, Ordering::Relaxed);
        let id: Arc<str> = Arc::from(self.state.id.as_str());
        let book = std::mem::take(&mut *lock(&self.shared.book));
        if !self.evicted {
            let mut r = lock(&self.released);
            if r.order.len() >= RELEASED_BOOKS
                && let Some(oldest) = r.order.pop_front()
            {
                r.books.remove(&oldest);
            }
            r.order.push_back(id.clone());
            r.books.insert(id, book);
        }
        for p in self.pipelines.pipelines.iter() {
            for s in &p.stages {
                s.plugin.conversation_ended(&self.state.id);
            }
        }
        for o in self.observers.iter() {
            o.released(&self.state.id);
        }
        self.shared.outlets.released(&self.state.id).await;
        if let Some(reply) = evicted {
            let _ = reply.send(());
        }
    }

    /// Answers a snapshot request once every run in flight has finished.
    async fn snapshot(&mut self, reply: oneshot::Sender<ConversationSnapshot>) {
        self.settle_runs().await;
        // The requester may have gone away; nothing is lost by not answering it.
        let _ = reply.send(ConversationSnapshot {
            state: self.state.clone(),
            book: lock(&self.shared.book).clone(),
        });
    }

    /// Waits for every run in flight.
    async fn settle_runs(&mut self) {
        while let Some(r) = self.runs.join_next().await {
            if let Err(e) = r {
                tracing::error!(error = %e, "A pipeline run panicked.");
            }
        }
        self.latest.clear();
        self.queued.clear();
    }
}

enum Ended {
    /// The stages ran; why they stopped early, if they did.
    Ran(Option<String>),
    /// A newer trigger superseded the run.
    Superseded,
}

/// Closes every draft a run left open, so no sink keeps showing a card "being written": a
/// superseded run's drafts are withdrawn; otherwise the last text becomes final, `degraded`
/// with why the run stopped.
async fn close_open_drafts(run: &Run, host: &dyn Host, ended: Ended) {
    for mut o in run.take_open_drafts() {
        match &ended {
            Ended::Superseded => {
                o.status = Status::Withdrawn;
                o.degraded = Some("superseded by a newer trigger".into());
            }
            Ended::Ran(why) => {
                o.status = Status::Final;
                let why = why
                    .clone()
                    .unwrap_or_else(|| "no stage delivered the complete answer".into());
                o.degraded = Some(format!("the answer is incomplete: {why}"));
            }
        }
        // A failure means the engine is stopping; nothing is left to tell.
        let _ = host.deliver(o).await;
    }
}

#[cfg(test)]
mod tests;
