//! The agent feed's core: per conversation, one ordered stream of feed messages (transcript
//! lines, the live caption, card upserts and withdrawals, the end of the call), numbered, with a
//! bounded history so a client that reconnects gets exactly what it missed.
//!
//! Every message of a conversation has an id `<epoch>-<seq>`: `seq` grows by one per message,
//! `epoch` names this hub's life for the conversation (a restarted engine starts a new epoch,
//! so a client can tell that its position means nothing here). [`FeedHub::subscribe`] with the
//! last id a client saw returns the gap from the ring when the ring still holds it, or a fresh
//! `snapshot` (the transcript tail, the caption and every live card) when it does not, then the
//! live messages; the backlog and the live stream are taken under one lock, so a client never
//! misses or repeats a message. A live receiver that falls behind the broadcast buffer gets
//! `Lagged` and must subscribe again from its last id (never a silent gap).
//!
//! The hub is fed by the engine: [`FeedHub`] is an [`Observer`](crate::engine::Observer) of
//! folded events (transcript, caption, end of call) and, through [`FeedSink`], a
//! [`Sink`] of outputs. It does not own transports (WebSocket, SSE), access
//! tokens or the console page: those serve what it returns.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prompter_core::event::{Detail, Event, EventKind};
use prompter_core::output::{Output, Status};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::sink::{QueuePolicy, Sink, SinkError};

pub mod access;
pub mod http;

/// Messages a conversation's ring keeps for resuming clients.
pub const RING: usize = 1_024;
/// Final transcript lines a snapshot carries.
pub const TRANSCRIPT_TAIL: usize = 200;
/// Live messages buffered per conversation for slow clients before they lag.
const BROADCAST: usize = 256;
/// Ended conversations whose feed is kept for late or reconnecting clients.
const ENDED_KEPT: usize = 1_024;
/// Live messages buffered for supervisor clients (every conversation) before they lag.
const SUPERVISOR_BROADCAST: usize = 4_096;

/// One message of a conversation's feed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeedMessage {
    /// `<epoch>-<seq>` (empty for the supervisor stream's own messages, which do not resume).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The conversation.
    pub conversation_id: String,
    /// Position in the conversation's feed (1, 2, ...).
    #[serde(skip)]
    pub seq: u64,
    /// When the hub produced it (unix milliseconds).
    pub at_ms: u64,
    /// What it says.
    #[serde(flatten)]
    pub body: FeedBody,
    /// Its JSON, made once however many clients it is sent to.
    #[serde(skip)]
    json: JsonCache,
}

impl FeedMessage {
    /// A message; its id is `<epoch>-<seq>` (or empty for the supervisor stream's own).
    pub fn new(id: String, conversation_id: String, seq: u64, body: FeedBody) -> Self {
        FeedMessage {
            id,
            conversation_id,
            seq,
            at_ms: now_ms(),
            body,
            json: JsonCache::default(),
        }
    }

    /// The message as JSON text (serialized on first use, then shared).
    pub fn json(&self) -> axum::extract::ws::Utf8Bytes {
        self.json
            .0
            .get_or_init(|| {
                serde_json::to_string(self)
                    .unwrap_or_else(|e| {
                        format!("{{\"type\":\"error\",\"error\":\"unserializable: {e}\"}}")
                    })
                    .into()
            })
            .clone()
    }

    /// The message's `type`.
    pub fn kind(&self) -> &'static str {
        match &self.body {
            FeedBody::Snapshot { .. } => "snapshot",
            FeedBody::Final(_) => "transcript.final",
            FeedBody::Partial(_) => "transcript.partial",
            FeedBody::Upsert { .. } => "output.upsert",
            FeedBody::Withdraw { .. } => "output.withdraw",
            FeedBody::Ended => "conversation.ended",
            FeedBody::Calls { .. } => "calls",
            FeedBody::CallStarted { .. } => "call.started",
        }
    }
}

/// A message's serialized form, not part of what it is (equal whatever it holds).
#[derive(Debug, Clone, Default)]
struct JsonCache(std::sync::OnceLock<axum::extract::ws::Utf8Bytes>);

impl PartialEq for JsonCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The content of a feed message (`type` in JSON).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type")]
pub enum FeedBody {
    /// The whole current state: sent on subscribe when no gap can be replayed.
    #[serde(rename = "snapshot")]
    Snapshot {
        /// True when the client asked to resume but its position was too old (or from another
        /// epoch): what it showed must be replaced by this.
        resync: bool,
        /// The last final transcript lines, oldest first.
        transcript: Vec<Arc<TranscriptLine>>,
        /// The live caption, if any.
        caption: Option<Caption>,
        /// Every live card (latest version, withdrawn ones excluded), by id.
        cards: Vec<Arc<Output>>,
        /// True once the call has ended.
        ended: bool,
    },
    /// A final transcript sentence.
    #[serde(rename = "transcript.final")]
    Final(Arc<TranscriptLine>),
    /// The live caption (interim words).
    #[serde(rename = "transcript.partial")]
    Partial(Caption),
    /// A card's new version (draft or final).
    #[serde(rename = "output.upsert")]
    Upsert {
        /// The output.
        output: Arc<Output>,
        /// Milliseconds from the trigger's words in the call (the call's start plus
        /// `trigger.offset_ms`) to this version reaching the feed; `None` when the call's clock
        /// is unknown or runs faster than real time (a fast replay).
        delay_ms: Option<u64>,
    },
    /// A card taken back.
    #[serde(rename = "output.withdraw")]
    Withdraw {
        /// The output's id.
        output_id: String,
        /// The withdrawing version.
        version: u32,
        /// Why (`superseded by a newer trigger`, ...).
        reason: String,
    },
    /// The call has ended.
    #[serde(rename = "conversation.ended")]
    Ended,
    /// Supervisor stream: every conversation the hub holds (sent first, and again on resume).
    #[serde(rename = "calls")]
    Calls {
        /// Live calls first, newest first.
        calls: Vec<CallSummary>,
    },
    /// Supervisor stream: a conversation's first event.
    #[serde(rename = "call.started")]
    CallStarted {
        /// The call's start (unix milliseconds), estimated from its first event.
        started_at_ms: u64,
    },
}

/// One call in the supervisor's list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallSummary {
    /// The conversation.
    pub conversation_id: String,
    /// True once the call has ended.
    pub ended: bool,
    /// Live cards (withdrawn ones excluded).
    pub cards: usize,
    /// Final transcript lines so far.
    pub lines: u64,
    /// The last final line.
    pub last_line: Option<Arc<TranscriptLine>>,
    /// The call's start (unix milliseconds), when an event has been seen.
    pub started_at_ms: Option<u64>,
}

/// A final transcript line as the feed shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TranscriptLine {
    /// Speaker label.
    pub speaker: String,
    /// The sentence.
    pub text: String,
    /// Milliseconds since the call started.
    pub offset_ms: u64,
    /// Symbl's message id, when sent (cards' triggers point at it).
    pub message_id: Option<String>,
    /// Sentiment polarity (-1..1), when sent.
    pub sentiment: Option<f64>,
}

/// The live caption.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Caption {
    /// Speaker label, when known.
    pub speaker: Option<String>,
    /// The words so far.
    pub text: String,
}

/// What a subscriber gets: the messages it missed (or a snapshot), then the live stream.
pub struct Subscription {
    /// To send first, in order.
    pub backlog: Vec<Arc<FeedMessage>>,
    /// The live messages after the backlog.
    pub live: broadcast::Receiver<Arc<FeedMessage>>,
}

struct ConversationFeed {
    epoch: String,
    seq: u64,
    ring: VecDeque<Arc<FeedMessage>>,
    transcript: VecDeque<Arc<TranscriptLine>>,
    lines: u64,
    caption: Option<Caption>,
    cards: BTreeMap<String, Arc<Output>>,
    /// The last version of each withdrawn card (feedback may still name it).
    retired: HashMap<String, Arc<Output>>,
    ended: bool,
    /// The call's start on the wall clock (unix ms), estimated from its first folded event.
    started_at_ms: Option<u64>,
    live: broadcast::Sender<Arc<FeedMessage>>,
    /// The supervisor stream (shared by every conversation).
    all: broadcast::Sender<Arc<FeedMessage>>,
}

impl ConversationFeed {
    fn new(epoch: String, all: broadcast::Sender<Arc<FeedMessage>>) -> Self {
        ConversationFeed {
            epoch,
            seq: 0,
            ring: VecDeque::with_capacity(64),
            transcript: VecDeque::new(),
            lines: 0,
            caption: None,
            cards: BTreeMap::new(),
            retired: HashMap::new(),
            ended: false,
            started_at_ms: None,
            live: broadcast::channel(BROADCAST).0,
            all,
        }
    }

    fn push(&mut self, conversation: &str, body: FeedBody) {
        self.seq += 1;
        let to_supervisors = !matches!(body, FeedBody::Partial(_));
        let msg = Arc::new(FeedMessage::new(
            format!("{}-{}", self.epoch, self.seq),
            conversation.to_owned(),
            self.seq,
            body,
        ));
        if self.ring.len() >= RING {
            self.ring.pop_front();
        }
        self.ring.push_back(msg.clone());
        // No receiver is not an error: nobody is watching this call right now. Supervisors see
        // everything but the live caption (which changes several times a second per call).
        if to_supervisors && self.all.receiver_count() > 0 {
            let _ = self.all.send(msg.clone());
        }
        let _ = self.live.send(msg);
    }

    fn summary(&self, conversation: &str) -> CallSummary {
        CallSummary {
            conversation_id: conversation.to_owned(),
            ended: self.ended,
            cards: self.cards.len(),
            lines: self.lines,
            last_line: self.transcript.back().cloned(),
            started_at_ms: self.started_at_ms,
        }
    }

    fn snapshot(&self, conversation: &str, resync: bool) -> Arc<FeedMessage> {
        Arc::new(FeedMessage::new(
            format!("{}-{}", self.epoch, self.seq),
            conversation.to_owned(),
            self.seq,
            FeedBody::Snapshot {
                resync,
                transcript: self.transcript.iter().cloned().collect(),
                caption: self.caption.clone(),
                cards: self.cards.values().cloned().collect(),
                ended: self.ended,
            },
        ))
    }
}

#[derive(Default)]
struct Feeds {
    live: HashMap<String, ConversationFeed>,
    ended: VecDeque<String>,
}

impl Feeds {
    /// An ended conversation's feed stays readable until `ENDED_KEPT` newer ones have ended.
    fn retire(&mut self, conversation: &str) {
        self.ended.push_back(conversation.to_owned());
        if self.ended.len() > ENDED_KEPT
            && let Some(oldest) = self.ended.pop_front()
        {
            self.live.remove(&oldest);
        }
    }
}

/// Every conversation's feed.
pub struct FeedHub {
    /// Prefix of this hub's epochs (random per process), so positions from another process or
    /// an earlier run never resume here by accident.
    epoch: String,
    feeds: Mutex<Feeds>,
    all: broadcast::Sender<Arc<FeedMessage>>,
}

impl Default for FeedHub {
    fn default() -> Self {
        FeedHub::new()
    }
}

impl FeedHub {
    /// An empty hub with a fresh epoch.
    pub fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        FeedHub {
            epoch: format!("{:x}", (nanos as u64) ^ u64::from(std::process::id())),
            feeds: Mutex::default(),
            all: broadcast::channel(SUPERVISOR_BROADCAST).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Feeds> {
        self.feeds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn with_feed(&self, conversation: &str, f: impl FnOnce(&mut ConversationFeed)) {
        let mut feeds = self.lock();
        f(self.feed(&mut feeds, conversation));
    }

    /// `conversation`'s feed, opened (in this hub's epoch) on first sight.
    fn feed<'f>(&self, feeds: &'f mut Feeds, conversation: &str) -> &'f mut ConversationFeed {
        feeds
            .live
            .entry(conversation.to_owned())
            .or_insert_with(|| ConversationFeed::new(self.epoch.clone(), self.all.clone()))
    }

    /// Subscribes to `conversation`, resuming after `last_id` (`<epoch>-<seq>`) when given.
    /// The backlog is the exact gap when the ring still holds it (empty when nothing was
    /// missed); otherwise one snapshot, with `resync` set when a resume was asked for.
    pub fn subscribe(&self, conversation: &str, last_id: Option<&str>) -> Subscription {
        let mut feeds = self.lock();
        let feed = self.feed(&mut feeds, conversation);
        let live = feed.live.subscribe();
        let position = last_id.and_then(|id| {
            let (e, s) = id.rsplit_once('-')?;
            (e == feed.epoch).then(|| s.parse::<u64>().ok()).flatten()
        });
        let oldest = feed.ring.front().map_or(feed.seq + 1, |m| m.seq);
        let backlog = match position {
            // Nothing missed, or the gap is still in the ring.
            Some(seq) if seq <= feed.seq && seq + 1 >= oldest => {
                feed.ring.iter().filter(|m| m.seq > seq).cloned().collect()
            }
            _ => vec![feed.snapshot(conversation, last_id.is_some())],
        };
        Subscription { backlog, live }
    }

    /// Subscribes to every conversation (the supervisor view): a `calls` list, then every
    /// conversation's messages but the live caption, as they happen. This stream does not
    /// resume: a reconnecting supervisor gets a fresh list.
    pub fn subscribe_all(&self) -> Subscription {
        let feeds = self.lock();
        let live = self.all.subscribe();
        let mut calls: Vec<CallSummary> = feeds.live.iter().map(|(id, f)| f.summary(id)).collect();
        calls.sort_by(|a, b| {
            a.ended
                .cmp(&b.ended)
                .then_with(|| b.started_at_ms.cmp(&a.started_at_ms))
                .then_with(|| a.conversation_id.cmp(&b.conversation_id))
        });
        let list = Arc::new(FeedMessage::new(
            String::new(),
            String::new(),
            0,
            FeedBody::Calls { calls },
        ));
        Subscription {
            backlog: vec![list],
            live,
        }
    }

    /// `conversation`'s live cards (latest versions), oldest first.
    pub fn cards(&self, conversation: &str) -> Vec<Arc<Output>> {
        let feeds = self.lock();
        let Some(feed) = feeds.live.get(conversation) else {
            return Vec::new();
        };
        let mut cards: Vec<Arc<Output>> = feed.cards.values().cloned().collect();
        cards.sort_by_key(|c| c.seq);
        cards
    }

    /// The latest version of `conversation`'s output `id`, live or withdrawn, if the hub holds
    /// it.
    pub fn card(&self, conversation: &str, id: &str) -> Option<Arc<Output>> {
        let feeds = self.lock();
        let feed = feeds.live.get(conversation)?;
        feed.cards.get(id).or_else(|| feed.retired.get(id)).cloned()
    }

    /// Delivers an output to its conversation's feed: an upsert, or a withdrawal.
    pub fn output(&self, output: Arc<Output>) {
        let conversation = output.conversation_id.clone();
        self.with_feed(&conversation, |feed| {
            if output.status == Status::Withdrawn {
                if let Some(last) = feed.cards.remove(&output.id) {
                    feed.retired.insert(output.id.clone(), last);
                }
                let body = FeedBody::Withdraw {
                    output_id: output.id.clone(),
                    version: output.version,
                    reason: output
                        .degraded
                        .clone()
                        .unwrap_or_else(|| "withdrawn".into()),
                };
                feed.push(&conversation, body);
            } else {
                // Versions only grow: an older version arriving late changes nothing.
                if feed
                    .cards
                    .get(&output.id)
                    .is_some_and(|c| c.version >= output.version)
                {
                    return;
                }
                feed.cards.insert(output.id.clone(), output.clone());
                let delay_ms = feed.started_at_ms.and_then(|start| {
                    now_ms().checked_sub(start.saturating_add(output.trigger.offset_ms))
                });
                feed.push(&conversation, FeedBody::Upsert { output, delay_ms });
            }
        });
    }

    /// True when `conversation`'s call has ended (or its feed is no longer held).
    pub fn ended(&self, conversation: &str) -> bool {
        self.lock().live.get(conversation).is_none_or(|f| f.ended)
    }

    /// The conversations with a feed, live ones first.
    pub fn conversations(&self) -> Vec<(String, bool)> {
        let feeds = self.lock();
        let mut all: Vec<(String, bool)> = feeds
            .live
            .iter()
            .map(|(id, f)| (id.clone(), f.ended))
            .collect();
        all.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        all
    }
}

/// Now, in unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl crate::engine::Observer for FeedHub {
    /// One lock per folded event, whatever it is.
    fn folded(&self, event: &Event) {
        let conversation: &str = &event.conversation_id;
        let mut feeds = self.lock();
        let feed = self.feed(&mut feeds, conversation);
        if feed.started_at_ms.is_none() {
            // The call's start on the wall clock, from its first event; supervisors are told.
            let started_at_ms = now_ms().saturating_sub(event.offset_ms);
            feed.started_at_ms = Some(started_at_ms);
            if self.all.receiver_count() > 0 {
                let _ = self.all.send(Arc::new(FeedMessage::new(
                    String::new(),
                    conversation.to_owned(),
                    0,
                    FeedBody::CallStarted { started_at_ms },
                )));
            }
        }
        match &event.detail {
            Detail::Message(m) => {
                let line = Arc::new(TranscriptLine {
                    speaker: m.speaker.label().to_owned(),
                    text: m.text.clone(),
                    offset_ms: event.offset_ms,
                    message_id: m.id.clone(),
                    sentiment: m.sentiment,
                });
                feed.caption = None;
                if feed.transcript.len() >= TRANSCRIPT_TAIL {
                    feed.transcript.pop_front();
                }
                feed.transcript.push_back(line.clone());
                feed.lines += 1;
                feed.push(conversation, FeedBody::Final(line));
            }
            Detail::Caption(c) => {
                let caption = Caption {
                    speaker: c.speaker.as_ref().map(|s| s.label().to_owned()),
                    text: c.text.clone(),
                };
                feed.caption = Some(caption.clone());
                feed.push(conversation, FeedBody::Partial(caption));
            }
            _ if event.kind == EventKind::ConversationCompleted && !feed.ended => {
                feed.ended = true;
                feed.caption = None;
                feed.push(conversation, FeedBody::Ended);
                feeds.retire(conversation);
            }
            _ => {}
        }
    }

    /// A conversation released without its end (idle) joins the ended ones, so its feed is
    /// let go in turn (it stays readable until then).
    fn released(&self, conversation: &str) {
        let mut feeds = self.lock();
        let Some(feed) = feeds.live.get_mut(conversation) else {
            return;
        };
        if feed.ended {
            return;
        }
        feed.ended = true;
        feed.caption = None;
        feeds.retire(conversation);
    }
}

/// The sink that feeds outputs to a [`FeedHub`]. Coalescing: a card updated faster than the hub
/// takes it is sent at its latest version.
pub struct FeedSink(pub Arc<FeedHub>);

#[prompter_core::async_trait]
impl Sink for FeedSink {
    fn name(&self) -> &str {
        "feed"
    }
    fn policy(&self) -> QueuePolicy {
        QueuePolicy::COALESCING
    }
    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError> {
        self.0.output(output);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
