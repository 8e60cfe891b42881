//! An engine process's part in the cluster: membership, partitions, takeover, acks, snapshots.
//!
//! **Membership.** Every engine puts its name in the members bucket every third of
//! `member_ttl_ms`; the bucket forgets a name `member_ttl_ms` after its last put. Each
//! partition belongs to the live member with the highest rendezvous score
//! ([`crate::names::owner`]), so every engine computes the same owners, and a member joining
//! or leaving moves only the partitions it wins or held.
//!
//! **Pulling.** An engine pulls only the partitions it owns, each from its durable consumer
//! in the pinned priority group: the server delivers a partition to one puller at a time. A
//! partition given up is handed over at once: the engine stops pulling it, lets its
//! conversations' runs finish and unpins it. A dead engine's partitions go to the others once
//! its name has expired and its pin has timed out (`priority_timeout_ms`).
//!
//! **Order and takeover.** For each conversation the engine keeps the last stream sequence it
//! applied. The first delivery of a conversation it does not hold makes it rebuild the
//! conversation: restore the last snapshot from the snapshots bucket (if any), then replay, in
//! stream order, every stored event of the conversation after the snapshot (up to the newest,
//! whatever was delivered). Afterwards a delivery at or below the applied sequence is dropped:
//! redeliveries of a dead engine's unacknowledged events come in any order, and none is
//! applied twice or out of order. Outputs re-made by a replay have the ids and versions they
//! had, and the outputs stream drops them as duplicates.
//!
//! **Acks and snapshots.** An event is acknowledged once its conversation has settled after it
//! (folded, every run it started finished) and every output up to then is stored. A settled
//! conversation whose outputs are all stored is snapshotted at most every
//! `snapshot_every_secs`, so a takeover replays at most that much of a call.
//!
//! **A stalled engine** (SIGSTOP, a long GC-like pause of the host) notices on waking that it
//! was away longer than `member_ttl_ms`: it handles nothing more, forgets every conversation
//! and partition, and joins again as a newcomer.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use futures_util::StreamExt;
use prompter_core::book::Book;
use prompter_core::conversation::ConversationState;
use prompter_engine::engine::{ConversationSnapshot, Engine, Settled};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::names::{GROUP, owner};
use crate::{Cluster, ClusterError};

/// Snapshots larger than this are not kept (the server's default `max_payload` is 1 MiB); such
/// a call is rebuilt from its events alone.
const MAX_SNAPSHOT: usize = 1_000_000;

/// What the snapshots bucket holds for a conversation.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// The last event sequence folded into it.
    applied: u64,
    snapshot: ConversationSnapshot,
}

/// Counters of the cluster member (read by the metrics).
#[derive(Debug, Default)]
pub struct MemberCounters {
    /// Events dispatched from deliveries.
    pub delivered: AtomicU64,
    /// Deliveries that were redeliveries.
    pub redelivered: AtomicU64,
    /// Deliveries at or below their conversation's applied sequence, dropped.
    pub stale: AtomicU64,
    /// Conversations rebuilt with history (a snapshot, or earlier events than the delivery).
    pub takeovers: AtomicU64,
    /// Events replayed from the stream while rebuilding.
    pub replayed: AtomicU64,
    /// Longest rebuild, in microseconds.
    pub rebuild_max_us: AtomicU64,
    /// Snapshots written.
    pub snapshots: AtomicU64,
    /// Snapshots not written (too large, or the writer behind).
    pub snapshots_skipped: AtomicU64,
    /// Events acknowledged.
    pub acked: AtomicU64,
    /// Messages that could not be decoded (acknowledged and skipped).
    pub poison: AtomicU64,
    /// Partitions owned now.
    pub owned: AtomicU64,
    /// Live members seen now.
    pub members: AtomicU64,
    /// Times partitions were taken or given up.
    pub rebalances: AtomicU64,
    /// Times this engine found it had been away (stalled) and started over.
    pub away: AtomicU64,
}

/// One conversation held by this engine.
struct Track {
    partition: u32,
    token: String,
    /// The last event sequence dispatched.
    applied: u64,
    /// Everything at or below is acknowledged.
    acked: u64,
    /// The last settled report (mark, outputs) not yet acknowledged.
    settled: (u64, u64),
    /// The highest output sequence stored.
    stored: u64,
    /// Deliveries not yet acknowledged, by sequence.
    pending: VecDeque<(u64, jetstream::Message)>,
    last_snapshot: Option<Instant>,
    snapshot_mark: u64,
}

/// The conversations this engine holds, shared by the pullers, the engine's [`Settled`] hook
/// and the outputs sink. Give it to [`Engine::with_settled`] and to
/// [`crate::outputs::Outputs::new`] (as [`Tracker::on_stored`]) before [`Member::start`].
pub struct Tracker {
    tracks: Mutex<HashMap<Arc<str>, Track>>,
    acks: mpsc::Sender<Vec<jetstream::Message>>,
    acks_rx: Mutex<Option<mpsc::Receiver<Vec<jetstream::Message>>>>,
    snapshots: mpsc::Sender<(String, bytes::Bytes)>,
    snapshots_rx: Mutex<Option<mpsc::Receiver<(String, bytes::Bytes)>>>,
    snapshot_every: Duration,
    /// The counters.
    pub counters: MemberCounters,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Tracker {
    /// A tracker snapshotting settled conversations at most every `snapshot_every`.
    pub fn new(snapshot_every: Duration) -> Arc<Self> {
        let (acks, acks_rx) = mpsc::channel(4_096);
        let (snapshots, snapshots_rx) = mpsc::channel(1_024);
        Arc::new(Tracker {
            tracks: Mutex::default(),
            acks,
            acks_rx: Mutex::new(Some(acks_rx)),
            snapshots,
            snapshots_rx: Mutex::new(Some(snapshots_rx)),
            snapshot_every,
            counters: MemberCounters::default(),
        })
    }

    /// The hook for [`crate::outputs::Outputs`]: outputs of `conversation` up to `seq` are
    /// stored.
    pub fn on_stored(self: &Arc<Self>) -> crate::outputs::OnStored {
        let me = self.clone();
        Arc::new(move |conversation: &str, seq: u64| {
            let mut tracks = lock(&me.tracks);
            if let Some(t) = tracks.get_mut(conversation) {
                t.stored = t.stored.max(seq);
                let (mark, outputs) = t.settled;
                if mark > t.acked && t.stored >= outputs {
                    me.release(t, mark);
                }
            }
        })
    }

    /// Acknowledges the deliveries of `t` up to `mark`.
    fn release(&self, t: &mut Track, mark: u64) {
        t.acked = t.acked.max(mark);
        let mut batch = Vec::new();
        while t.pending.front().is_some_and(|(seq, _)| *seq <= mark) {
            if let Some((_, m)) = t.pending.pop_front() {
                batch.push(m);
            }
        }
        if batch.is_empty() {
            return;
        }
        if let Err(
            mpsc::error::TrySendError::Full(back) | mpsc::error::TrySendError::Closed(back),
        ) = self.acks.try_send(batch)
        {
            // The acker is behind: keep them for the next release (a redelivery is harmless).
            for m in back.into_iter().rev() {
                let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                t.pending.push_front((seq, m));
            }
        }
    }

    /// Holds `msg` (sequence `seq`) of `conversation` until it can be acknowledged.
    fn hold(&self, t: &mut Track, seq: u64, msg: jetstream::Message) {
        if seq <= t.acked {
            let _ = self.acks.try_send(vec![msg]);
            return;
        }
        // Deliveries mostly come in order: insert from the back.
        let at = t
            .pending
            .iter()
            .rposition(|(s, _)| *s <= seq)
            .map_or(0, |i| i + 1);
        t.pending.insert(at, (seq, msg));
    }
}

impl Settled for Tracker {
    fn settled(
        &self,
        conversation: &str,
        mark: u64,
        outputs: u64,
        snapshot: &dyn Fn() -> ConversationSnapshot,
    ) {
        let due = {
            let mut tracks = lock(&self.tracks);
            let Some(t) = tracks.get_mut(conversation) else {
                return;
            };
            t.settled = (mark, outputs);
            if t.stored < outputs {
                return;
            }
            self.release(t, mark);
            let due = mark > t.snapshot_mark
                && t.last_snapshot
                    .is_none_or(|at| at.elapsed() >= self.snapshot_every);
            if due {
                t.last_snapshot = Some(Instant::now());
                t.snapshot_mark = mark;
                Some(t.token.clone())
            } else {
                None
            }
        };
        let Some(token) = due else {
            return;
        };
        let snap = Snapshot {
            applied: mark,
            snapshot: snapshot(),
        };
        match serde_json::to_vec(&snap) {
            Ok(bytes) if bytes.len() <= MAX_SNAPSHOT => {
                if self.snapshots.try_send((token, bytes.into())).is_err() {
                    self.counters
                        .snapshots_skipped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(bytes) => {
                let n = self
                    .counters
                    .snapshots_skipped
                    .fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(
                        conversation,
                        bytes = bytes.len(),
                        "A conversation's snapshot is over 1 MB and is not kept; a takeover replays its events from the start."
                    );
                }
            }
            Err(e) => {
                tracing::error!(conversation, error = %e, "A conversation's snapshot cannot be written.");
            }
        }
    }
}

/// A partition's puller: its stop signal and task.
type Puller = (watch::Sender<bool>, JoinHandle<()>);

/// A running member.
pub struct Member {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

struct Inner {
    cluster: Cluster,
    engine: Arc<Engine>,
    tracker: Arc<Tracker>,
    events: jetstream::stream::Stream,
    outputs: jetstream::stream::Stream,
    snapshots: kv::Store,
    members: kv::Store,
    consumers: Vec<consumer::PullConsumer>,
    /// Milliseconds since `epoch` of the watchdog's last tick; a puller that finds it older
    /// than the member TTL stops (the engine was stalled).
    last_tick: AtomicU64,
    /// Set by the watchdog when it woke up later than the member TTL: the engine was stalled
    /// and its partitions may have moved. Cleared once it has started over.
    stalled: std::sync::atomic::AtomicBool,
    epoch: Instant,
    /// Partition → (stop signal, puller).
    pullers: tokio::sync::Mutex<HashMap<u32, Puller>>,
    /// Lag per owned partition, read each heartbeat.
    lag: Mutex<Vec<(u32, u64)>>,
    /// Members seen at the last heartbeat.
    seen: Mutex<Vec<String>>,
}

impl Member {
    /// Joins as an engine: heartbeats, takes the partitions it owns, and feeds their events to
    /// `engine` (built with `tracker` as its [`Settled`] hook and an
    /// [`Outputs`](crate::outputs::Outputs) sink reporting to it). Counters and lag go to the
    /// engine's metrics.
    ///
    /// # Errors
    /// When the stream, the consumers or the buckets cannot be opened.
    pub async fn start(
        cluster: Cluster,
        engine: Arc<Engine>,
        tracker: Arc<Tracker>,
    ) -> Result<Member, ClusterError> {
        let events = cluster.events().await?;
        let mut consumers = Vec::new();
        for p in 0..cluster.config.partitions {
            let name = cluster.subjects.consumer(p);
            let c: consumer::PullConsumer = events
                .get_consumer(&name)
                .await
                .map_err(|e| ClusterError::JetStream(format!("consumer `{name}`: {e}")))?;
            consumers.push(c);
        }
        let cluster_outputs = cluster.outputs().await?;
        let inner = Arc::new(Inner {
            snapshots: cluster.snapshots().await?,
            members: cluster.members().await?,
            cluster,
            engine,
            tracker,
            events,
            outputs: cluster_outputs,
            consumers,
            last_tick: AtomicU64::new(0),
            stalled: std::sync::atomic::AtomicBool::new(false),
            epoch: Instant::now(),
            pullers: tokio::sync::Mutex::default(),
            lag: Mutex::default(),
            seen: Mutex::default(),
        });
        register_metrics(&inner);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        if let Some(rx) = lock(&inner.tracker.acks_rx).take() {
            tasks.push(tokio::spawn(acker(rx, inner.clone())));
        }
        if let Some(rx) = lock(&inner.tracker.snapshots_rx).take() {
            tasks.push(tokio::spawn(snapshot_writer(rx, inner.clone())));
        }
        tasks.push(tokio::spawn(beat(inner.clone())));
        tasks.push(tokio::spawn(ownership(inner.clone(), stop_rx)));
        tasks.push(tokio::spawn(watchdog(inner.clone())));
        Ok(Member { inner, stop, tasks })
    }

    /// This member's name.
    pub fn name(&self) -> &str {
        &self.inner.cluster.member
    }

    /// Leaves the cluster: stops pulling, lets every held conversation's runs finish, unpins
    /// its partitions and removes its name, so the others take over at once.
    pub async fn leave(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks[2..] {
            t.abort();
        }
        // Gone from the members first: the others start pulling (and wait for the pins) while
        // this engine hands each partition over.
        let _ = self.inner.members.delete(&self.inner.cluster.member).await;
        let owned: Vec<u32> = self.inner.pullers.lock().await.keys().copied().collect();
        for p in owned {
            self.inner.give_up(p).await;
        }
        // The acker and snapshot writer finish what is queued.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for t in &self.tasks[..2] {
            t.abort();
        }
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the engine may handle deliveries: not stalled (the watchdog ticked recently and
    /// saw no stall that is not yet dealt with).
    fn awake(&self) -> bool {
        !self.stalled.load(Ordering::SeqCst)
            && self
                .now_ms()
                .saturating_sub(self.last_tick.load(Ordering::SeqCst))
                <= self.cluster.config.member_ttl_ms / 2
    }

    async fn take(self: &Arc<Self>, p: u32) {
        let (stop, stop_rx) = watch::channel(false);
        let me = self.clone();
        let task = tokio::spawn(async move { me.pull(p, stop_rx).await });
        self.pullers.lock().await.insert(p, (stop, task));
    }

    /// Stops pulling `p`, ends its conversations here (their runs finish and deliver), and
    /// unpins it for its new owner.
    async fn give_up(&self, p: u32) {
        let Some((stop, task)) = self.pullers.lock().await.remove(&p) else {
            return;
        };
        let _ = stop.send(true);
        let _ = task.await;
        let held: Vec<Arc<str>> = lock(&self.tracker.tracks)
            .iter()
            .filter(|(_, t)| t.partition == p)
            .map(|(k, _)| k.clone())
            .collect();
        // Their runs finish at once, not one conversation after another.
        futures_util::future::join_all(held.iter().map(|id| self.engine.evict(id))).await;
        {
            let mut tracks = lock(&self.tracker.tracks);
            for id in &held {
                tracks.remove(id);
            }
        }
        let name = self.cluster.subjects.consumer(p);
        if let Err(e) = self.events.unpin_consumer(&name, GROUP).await {
            tracing::debug!(partition = p, error = %e, "Unpinning a partition given up failed; its new owner waits for the pin to time out.");
        }
    }

    /// Pulls partition `p` until told to stop.
    async fn pull(self: Arc<Self>, p: u32, mut stop: watch::Receiver<bool>) {
        let Some(consumer) = self.consumers.get(p as usize) else {
            return;
        };
        let mut wait = Duration::from_millis(100);
        loop {
            let messages = consumer
                .stream()
                .group(GROUP)
                .expires(self.cluster.config.pull_expiry())
                .max_messages_per_batch(512)
                .heartbeat(self.cluster.config.pull_expiry() / 2)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "Cannot pull a partition; retrying.");
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            wait = Duration::from_millis(100);
            loop {
                let next = tokio::select! {
                    _ = stop.changed() => return,
                    m = messages.next() => m,
                };
                match next {
                    Some(Ok(msg)) => {
                        // A late watchdog (a busy machine) is waited for; a stall means the
                        // partition may have moved: this engine starts over (its conversations
                        // are rebuilt from the stream, this message with them).
                        while !self.awake() {
                            if self.stalled.load(Ordering::SeqCst) {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        self.handle(p, msg).await;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(partition = p, error = %e, "Pulling a partition: {e}; pulling again.");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    /// Applies one delivery.
    async fn handle(&self, p: u32, msg: jetstream::Message) {
        let Ok(info) = msg.info() else {
            return;
        };
        let seq = info.stream_sequence;
        if info.delivered > 1 {
            self.tracker
                .counters
                .redelivered
                .fetch_add(1, Ordering::Relaxed);
        }
        let conversation = match msg
            .headers
            .as_ref()
            .and_then(|h| h.get(crate::names::CONVERSATION))
        {
            Some(c) => Arc::<str>::from(c.as_str()),
            None => {
                self.poison(&msg, "no conversation header");
                return;
            }
        };
        let subject = msg.subject.to_string();
        let held = lock(&self.tracker.tracks).contains_key(&conversation);
        if !held && let Err(e) = self.rebuild(p, &conversation, &subject).await {
            tracing::warn!(conversation = %conversation, error = %e, "Cannot rebuild a conversation; its event is left for redelivery.");
            return;
        }
        let fresh = {
            let mut tracks = lock(&self.tracker.tracks);
            let Some(t) = tracks.get_mut(&conversation) else {
                return;
            };
            let fresh = seq > t.applied;
            if fresh {
                t.applied = seq;
            } else {
                self.tracker.counters.stale.fetch_add(1, Ordering::Relaxed);
            }
            fresh
        };
        if !fresh {
            let mut tracks = lock(&self.tracker.tracks);
            if let Some(t) = tracks.get_mut(&conversation) {
                self.tracker.hold(t, seq, msg);
            }
            return;
        }
        let event = crate::ingest::decode(msg.headers.as_ref(), &msg.payload);
        {
            let mut tracks = lock(&self.tracker.tracks);
            if let Some(t) = tracks.get_mut(&conversation) {
                self.tracker.hold(t, seq, msg);
            }
        }
        match event {
            Ok(event) => {
                self.tracker
                    .counters
                    .delivered
                    .fetch_add(1, Ordering::Relaxed);
                self.engine.dispatch_marked("cluster", event, seq).await;
            }
            Err(e) => {
                self.tracker.counters.poison.fetch_add(1, Ordering::Relaxed);
                tracing::error!(conversation = %conversation, seq, error = %e, "A stored event cannot be read; it is skipped.");
            }
        }
    }

    fn poison(&self, msg: &jetstream::Message, why: &str) {
        self.tracker.counters.poison.fetch_add(1, Ordering::Relaxed);
        tracing::error!(subject = %msg.subject, why, "A stored event cannot be read; it is skipped.");
        let _ = self.tracker.acks.try_send(vec![msg.clone()]);
    }

    /// Makes `conversation` live here as it stands in the cluster: its last snapshot, then
    /// every stored event after it, in order.
    async fn rebuild(&self, p: u32, conversation: &Arc<str>, subject: &str) -> Result<(), String> {
        let t0 = Instant::now();
        let token = subject.rsplit('.').next().unwrap_or_default().to_owned();
        self.engine.evict(conversation).await;
        let stored = self
            .snapshots
            .get(token.as_str())
            .await
            .map_err(|e| format!("reading its snapshot: {e}"))?;
        let (applied, snapshot, restored) = match stored
            .as_deref()
            .map(serde_json::from_slice::<Snapshot>)
        {
            Some(Ok(s)) => (s.applied, s.snapshot, true),
            Some(Err(e)) => {
                tracing::warn!(conversation = %conversation, error = %e, "A snapshot cannot be read; the conversation is rebuilt from its events.");
                (0, empty(conversation), false)
            }
            None => (0, empty(conversation), false),
        };
        let mut snapshot = snapshot;
        // Outputs a dead owner stored after the snapshot keep their place when made again.
        let stored = crate::view::stored_versions(&self.cluster, &self.outputs, &token).await?;
        snapshot.book.adopt(stored);
        let outputs = snapshot.book.seq;
        self.engine
            .restore(snapshot)
            .map_err(|e| format!("restoring: {e}"))?;
        lock(&self.tracker.tracks).insert(
            conversation.clone(),
            Track {
                partition: p,
                token,
                applied,
                acked: applied,
                settled: (applied, outputs),
                stored: outputs,
                pending: VecDeque::new(),
                last_snapshot: restored.then(Instant::now),
                snapshot_mark: applied,
            },
        );
        // Every stored event after the snapshot, up to the newest now, one direct get each (a
        // new call has only the delivered one).
        let mut replay = Vec::new();
        crate::view::for_each_of_subject(&self.events, subject, applied + 1, |m| {
            replay.push(m);
        })
        .await?;
        let mut replayed = 0u64;
        for m in replay {
            let seq = m.sequence;
            match crate::ingest::decode(Some(&m.headers), &m.payload) {
                Ok(event) => {
                    if let Some(t) = lock(&self.tracker.tracks).get_mut(conversation) {
                        t.applied = seq;
                    }
                    self.engine.dispatch_marked("cluster", event, seq).await;
                    replayed += 1;
                }
                Err(e) => {
                    self.tracker.counters.poison.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(conversation = %conversation, seq, error = %e, "A stored event cannot be read; it is skipped.");
                }
            }
        }
        let c = &self.tracker.counters;
        c.replayed.fetch_add(replayed, Ordering::Relaxed);
        if restored || replayed > 1 {
            c.takeovers.fetch_add(1, Ordering::Relaxed);
            let us = t0.elapsed().as_micros() as u64;
            c.rebuild_max_us.fetch_max(us, Ordering::Relaxed);
            tracing::info!(conversation = %conversation, partition = p, snapshot = restored, replayed, ms = us / 1000, "Took over a conversation.");
        }
        Ok(())
    }

    /// Forgets every conversation and partition (after a stall).
    async fn start_over(&self) {
        let owned: Vec<u32> = self.pullers.lock().await.keys().copied().collect();
        for p in owned {
            self.give_up(p).await;
        }
        let rest: Vec<Arc<str>> = lock(&self.tracker.tracks).keys().cloned().collect();
        futures_util::future::join_all(rest.iter().map(|id| self.engine.evict(id))).await;
        lock(&self.tracker.tracks).clear();
    }
}

fn empty(conversation: &str) -> ConversationSnapshot {
    ConversationSnapshot {
        state: ConversationState::new(conversation),
        book: Book::default(),
    }
}

/// Watches the members, takes and gives up partitions, starts over after a stall, reads the
/// lag.
async fn ownership(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let ttl = inner.cluster.config.member_ttl();
    let tick = ttl / 3;
    let me = inner.cluster.member.clone();
    let partitions = inner.cluster.config.partitions;
    let mut logged: Option<(usize, Vec<String>)> = None;
    let mut rounds = 0u64;
    loop {
        let last = Instant::now();
        if inner.stalled.load(Ordering::SeqCst) {
            inner.tracker.counters.away.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(member = %me, "This engine was stalled longer than the member TTL; its partitions may have moved: it forgets its conversations and joins again.");
            inner.start_over().await;
            inner.stalled.store(false, Ordering::SeqCst);
            logged = None;
        }
        let mut members: Vec<String> = match inner.members.keys().await {
            Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
            Err(e) => {
                tracing::debug!(error = %e, "Cannot list the members.");
                Vec::new()
            }
        };
        if !members.is_empty() {
            if !members.contains(&me) {
                members.push(me.clone());
            }
            members.sort();
            let owned: BTreeSet<u32> = (0..partitions)
                .filter(|p| owner(*p, &members) == Some(me.as_str()))
                .collect();
            let running: BTreeSet<u32> = inner.pullers.lock().await.keys().copied().collect();
            let lost: Vec<u32> = running.difference(&owned).copied().collect();
            let gained: Vec<u32> = owned.difference(&running).copied().collect();
            if !lost.is_empty() || !gained.is_empty() {
                inner
                    .tracker
                    .counters
                    .rebalances
                    .fetch_add(1, Ordering::Relaxed);
            }
            for p in lost {
                inner.give_up(p).await;
            }
            for p in gained {
                inner.take(p).await;
            }
            let c = &inner.tracker.counters;
            c.owned.store(owned.len() as u64, Ordering::Relaxed);
            c.members.store(members.len() as u64, Ordering::Relaxed);
            if logged.as_ref() != Some(&(owned.len(), members.clone())) {
                tracing::info!(member = %me, owned = owned.len(), partitions, members = %members.join(","), "cluster: this engine owns {} of {} partitions; members: {}", owned.len(), partitions, members.join(", "));
                logged = Some((owned.len(), members.clone()));
            }
            *lock(&inner.seen) = members;
            // Reading a consumer's pending count costs the server a scan of its subjects:
            // every fifth round is enough for a gauge.
            rounds += 1;
            if rounds % 5 == 1 {
                let mut lag = Vec::new();
                for p in owned {
                    if let Some(c) = inner.consumers.get(p as usize)
                        && let Ok(info) = c.get_info().await
                    {
                        lag.push((p, info.num_pending));
                    }
                }
                *lock(&inner.lag) = lag;
            }
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(tick.saturating_sub(last.elapsed())) => {}
        }
    }
}

/// Says this engine is alive every third of the member TTL, on its own task so that nothing
/// the ownership loop waits for (a hand-over, a slow server) delays it; not while a stall is
/// being dealt with.
async fn beat(inner: Arc<Inner>) {
    let tick = inner.cluster.config.member_ttl() / 3;
    let me = inner.cluster.member.clone();
    loop {
        if !inner.stalled.load(Ordering::SeqCst)
            && let Err(e) = inner
                .members
                .put(&me, inner.now_ms().to_string().into())
                .await
        {
            tracing::debug!(error = %e, "Heartbeat not stored.");
        }
        tokio::time::sleep(tick).await;
    }
}

/// Ticks every tenth of the member TTL; waking up later than the TTL means the process was
/// stalled (SIGSTOP, a frozen VM): it says so to the heartbeat and the pullers.
async fn watchdog(inner: Arc<Inner>) {
    let ttl = inner.cluster.config.member_ttl();
    let tick = (ttl / 10).max(Duration::from_millis(20));
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        if last.elapsed() > ttl {
            inner.stalled.store(true, Ordering::SeqCst);
        }
        last = Instant::now();
        inner.last_tick.store(inner.now_ms(), Ordering::SeqCst);
    }
}

/// Acknowledges batches of deliveries.
async fn acker(mut rx: mpsc::Receiver<Vec<jetstream::Message>>, inner: Arc<Inner>) {
    while let Some(batch) = rx.recv().await {
        for m in batch {
            if m.ack().await.is_ok() {
                inner.tracker.counters.acked.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes snapshots in the order they were taken.
async fn snapshot_writer(mut rx: mpsc::Receiver<(String, bytes::Bytes)>, inner: Arc<Inner>) {
    while let Some((key, bytes)) = rx.recv().await {
        match inner.snapshots.put(&key, bytes).await {
            Ok(_) => {
                inner
                    .tracker
                    .counters
                    .snapshots
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                inner
                    .tracker
                    .counters
                    .snapshots_skipped
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(key, error = %e, "A snapshot was not stored.");
            }
        }
    }
}

fn register_metrics(inner: &Arc<Inner>) {
    use prompter_engine::metrics::{FnCollector, Reading, single};
    let weak = Arc::downgrade(inner);
    inner
        .engine
        .stats()
        .metrics
        .add_collector(Box::new(FnCollector(move || {
            let Some(i) = weak.upgrade() else {
                return Vec::new();
            };
            let c = &i.tracker.counters;
            let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
            vec![
                single(
                    "prompter_cluster_members",
                    "Live engines this one sees",
                    false,
                    get(&c.members),
                ),
                single(
                    "prompter_cluster_partitions_owned",
                    "Partitions this engine pulls",
                    false,
                    get(&c.owned),
                ),
                Reading {
                    name: "prompter_cluster_lag",
                    help: "Events stored but not yet delivered, per owned partition",
                    counter: false,
                    samples: lock(&i.lag)
                        .iter()
                        .map(|(p, n)| (vec![("partition", p.to_string())], *n))
                        .collect(),
                },
                single(
                    "prompter_cluster_delivered",
                    "Events applied from deliveries",
                    true,
                    get(&c.delivered),
                ),
                single(
                    "prompter_cluster_redeliveries",
                    "Deliveries that were redeliveries",
                    true,
                    get(&c.redelivered),
                ),
                single(
                    "prompter_cluster_stale_dropped",
                    "Deliveries at or below their conversation's applied sequence, dropped",
                    true,
                    get(&c.stale),
                ),
                single(
                    "prompter_cluster_takeovers",
                    "Conversations rebuilt here from a snapshot and the stream",
                    true,
                    get(&c.takeovers),
                ),
                single(
                    "prompter_cluster_replayed_events",
                    "Events replayed from the stream while rebuilding",
                    true,
                    get(&c.replayed),
                ),
                single(
                    "prompter_cluster_rebuild_max_microseconds",
                    "Longest conversation rebuild",
                    false,
                    get(&c.rebuild_max_us),
                ),
                single(
                    "prompter_cluster_snapshots",
                    "Conversation snapshots stored",
                    true,
                    get(&c.snapshots),
                ),
                single(
                    "prompter_cluster_snapshots_skipped",
                    "Snapshots not stored (too large, or the writer behind)",
                    true,
                    get(&c.snapshots_skipped),
                ),
                single(
                    "prompter_cluster_acked",
                    "Events acknowledged (settled, outputs stored)",
                    true,
                    get(&c.acked),
                ),
                single(
                    "prompter_cluster_poison",
                    "Stored events that could not be read",
                    true,
                    get(&c.poison),
                ),
                single(
                    "prompter_cluster_rebalances",
                    "Times partitions were taken or given up",
                    true,
                    get(&c.rebalances),
                ),
                single(
                    "prompter_cluster_stalls",
                    "Times this engine found it had been stalled and started over",
                    true,
                    get(&c.away),
                ),
            ]
        })));
}
