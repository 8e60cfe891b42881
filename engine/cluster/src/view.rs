//! Sinks fed from the cluster: the console, notifiers and stdout of a `sinks` process get every
//! output version from the outputs stream (and the console its transcript from the events
//! stream), whichever engine handled the call.
//!
//! Outputs come through a durable consumer named after the process's member name, so a sinks
//! process that restarts resumes where it stopped (nothing is lost for its notifiers); a new
//! one starts with what is stored from then on. They are pushed, in stream order, into a
//! pipeline-less engine's sink queues, then acknowledged. Events come through an ordered
//! consumer from the time it starts and are folded into that engine's conversations, which
//! the console's transcript observes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer;
use futures_util::StreamExt;
use prompter_core::output::Output;
use prompter_engine::engine::Engine;
use tokio::sync::watch;

use crate::{Cluster, ClusterError};

/// What a view counted.
#[derive(Debug, Default)]
pub struct ViewCounters {
    /// Output versions handed to the local sinks.
    pub outputs: AtomicU64,
    /// Events folded for the console.
    pub events: AtomicU64,
    /// Messages that could not be read.
    pub unreadable: AtomicU64,
}

/// Feeds `engine`'s sinks and observers from the cluster until `shutdown`.
pub struct View {
    cluster: Cluster,
    engine: Arc<Engine>,
    /// The counters.
    pub counters: Arc<ViewCounters>,
}

impl View {
    /// A view of `cluster` into `engine` (an engine with no pipelines, holding the local sinks
    /// and the console's observer).
    pub fn new(cluster: Cluster, engine: Arc<Engine>) -> Self {
        View {
            cluster,
            engine,
            counters: Arc::default(),
        }
    }

    /// Runs until `shutdown` turns true. `with_events`: also fold the events (the console's
    /// transcript).
    ///
    /// # Errors
    /// When the streams or the consumer cannot be opened.
    pub async fn run(
        &self,
        with_events: bool,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), ClusterError> {
        let outputs = self.cluster.outputs().await?;
        let name = format!(
            "{}-view-{}",
            self.cluster.config.subject_prefix, self.cluster.member
        );
        let durable: consumer::PullConsumer = outputs
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.cluster.subjects.outputs_all(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    deliver_policy: consumer::DeliverPolicy::New,
                    inactive_threshold: Duration::from_secs(24 * 3600),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| ClusterError::JetStream(format!("consumer `{name}`: {e}")))?;
        let events_task = if with_events {
            let events = self.cluster.events().await?;
            let ordered = events
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: self.cluster.subjects.events_all(),
                    deliver_policy: consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| ClusterError::JetStream(format!("events for the console: {e}")))?;
            let engine = self.engine.clone();
            let counters = self.counters.clone();
            let mut stop = shutdown.clone();
            Some(tokio::spawn(async move {
                let Ok(mut messages) = ordered.messages().await else {
                    return;
                };
                loop {
                    let next = tokio::select! {
                        _ = stop.changed() => return,
                        m = messages.next() => m,
                    };
                    match next {
                        Some(Ok(m)) => {
                            match crate::ingest::decode(m.headers.as_ref(), &m.payload) {
                                Ok(event) => {
                                    counters.events.fetch_add(1, Ordering::Relaxed);
                                    // Marked, so never forwarded: a sinks engine forwards
                                    // only what its console adds (feedback).
                                    let seq = m.info().map(|i| i.stream_sequence).unwrap_or(0);
                                    engine.dispatch_marked("cluster", event, seq).await;
                                }
                                Err(_) => {
                                    counters.unreadable.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "Reading events for the console.")
                        }
                        None => return,
                    }
                }
            }))
        } else {
            None
        };
        let mut wait = Duration::from_millis(100);
        'outer: loop {
            let mut messages = match durable
                .stream()
                .expires(Duration::from_secs(2))
                .max_messages_per_batch(512)
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot read the outputs stream; retrying.");
                    tokio::select! {
                        _ = shutdown.changed() => break 'outer,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            wait = Duration::from_millis(100);
            loop {
                let next = tokio::select! {
                    _ = shutdown.changed() => break 'outer,
                    m = messages.next() => m,
                };
                match next {
                    Some(Ok(m)) => {
                        match serde_json::from_slice::<Output>(&m.payload) {
                            Ok(o) => {
                                self.counters.outputs.fetch_add(1, Ordering::Relaxed);
                                self.engine.outlets().push(Arc::new(o)).await;
                            }
                            Err(e) => {
                                self.counters.unreadable.fetch_add(1, Ordering::Relaxed);
                                tracing::error!(subject = %m.subject, error = %e, "A stored output cannot be read; it is skipped.");
                            }
                        }
                        if let Err(e) = m.ack().await {
                            tracing::debug!(error = %e, "An output's acknowledgement failed; it comes again.");
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "Reading the outputs stream; reading again.");
                        break;
                    }
                    None => break,
                }
            }
        }
        if let Some(t) = events_task {
            t.abort();
        }
        Ok(())
    }
}

/// Calls `each` with every stored output (its stream sequence and JSON), in stream order, or
/// only `conversation`'s; returns once it has read up to the last one stored when it began.
///
/// # Errors
/// When the stream cannot be read.
pub async fn dump_outputs(
    cluster: &Cluster,
    conversation: Option<&str>,
    mut each: impl FnMut(u64, serde_json::Value),
) -> Result<(), ClusterError> {
    let mut stream = cluster.outputs().await?;
    let filter = match conversation {
        Some(c) => cluster.subjects.outputs(&crate::names::token(c)),
        None => cluster.subjects.outputs_all(),
    };
    read_subject(
        &mut stream,
        &filter,
        conversation.is_some(),
        |seq, _, _, payload| {
            each(
                seq,
                serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
            );
        },
    )
    .await
    .map_err(ClusterError::JetStream)
}

/// Calls `each` with every stored output's stream sequence, store time (Unix nanoseconds)
/// and JSON, in stream order.
///
/// # Errors
/// When the stream cannot be read.
pub async fn dump_outputs_timed(
    cluster: &Cluster,
    mut each: impl FnMut(u64, i128, serde_json::Value),
) -> Result<(), ClusterError> {
    let mut stream = cluster.outputs().await?;
    read_subject(
        &mut stream,
        &cluster.subjects.outputs_all(),
        false,
        |seq, at, _, payload| {
            each(
                seq,
                at,
                serde_json::from_slice(payload).unwrap_or(serde_json::Value::Null),
            );
        },
    )
    .await
    .map_err(ClusterError::JetStream)
}

/// Calls `each` with every stored event's conversation, offset (ms) and store time (Unix
/// nanoseconds), in stream order.
///
/// # Errors
/// When the stream cannot be read.
pub async fn dump_event_times(
    cluster: &Cluster,
    mut each: impl FnMut(&str, u64, i128),
) -> Result<(), ClusterError> {
    let mut stream = cluster.events().await?;
    read_subject(
        &mut stream,
        &cluster.subjects.events_all(),
        false,
        |_, at, headers, _| {
            let h = |name| {
                headers
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
            };
            if let (Some(c), Some(o)) = (h(crate::names::CONVERSATION), h(crate::names::OFFSET))
                && let Ok(o) = o.parse()
            {
                each(&c, o, at);
            }
        },
    )
    .await
    .map_err(ClusterError::JetStream)
}

/// The (id, version, seq) of every output stored for the conversation with subject token
/// `token`, in stream order: one direct get per output (no consumer is made; a call with none
/// costs one request).
pub(crate) async fn stored_versions(
    cluster: &Cluster,
    outputs: &async_nats::jetstream::stream::Stream,
    token: &str,
) -> Result<Vec<(String, u32, u64)>, String> {
    #[derive(serde::Deserialize)]
    struct Stamp {
        id: String,
        version: u32,
        seq: u64,
    }
    let mut out = Vec::new();
    let subject = cluster.subjects.outputs(token);
    for_each_of_subject(outputs, &subject, 1, |m| {
        if let Ok(s) = serde_json::from_slice::<Stamp>(&m.payload) {
            out.push((s.id, s.version, s.seq));
        }
    })
    .await?;
    Ok(out)
}

/// Calls `each` with every message of `stream` on `subject` from
/// sequence `from` up to the last one stored now, in order, with direct gets (the stream
/// allows them): no consumer is made. Returns the last sequence read (0: none).
pub(crate) async fn for_each_of_subject(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
    from: u64,
    mut each: impl FnMut(async_nats::jetstream::message::StreamMessage),
) -> Result<u64, String> {
    use async_nats::jetstream::stream::DirectGetErrorKind;
    let last = match stream.direct_get_last_for_subject(subject).await {
        Ok(m) => m.sequence,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("reading `{subject}`: {e}")),
    };
    let mut at = from.max(1);
    let mut read = 0;
    while at <= last {
        let m = match stream.direct_get_next_for_subject(subject, Some(at)).await {
            Ok(m) => m,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(format!("reading `{subject}`: {e}")),
        };
        if m.sequence > last {
            break;
        }
        read = m.sequence;
        at = m.sequence + 1;
        each(m);
    }
    Ok(read)
}

/// Reads the messages of `stream` under `filter` in order, up to the last one stored now.
/// `one_subject`: `filter` is a single subject (its last message bounds the read).
async fn read_subject(
    stream: &mut async_nats::jetstream::stream::Stream,
    filter: &str,
    one_subject: bool,
    mut each: impl FnMut(u64, i128, Option<&async_nats::HeaderMap>, &[u8]),
) -> Result<(), String> {
    let last = if one_subject {
        match stream.get_last_raw_message_by_subject(filter).await {
            Ok(m) => m.sequence,
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                return Ok(());
            }
            Err(e) => return Err(format!("reading `{filter}`: {e}")),
        }
    } else {
        let info = stream
            .info()
            .await
            .map_err(|e| format!("reading `{filter}`: {e}"))?;
        if info.state.messages == 0 {
            return Ok(());
        }
        info.state.last_sequence
    };
    let ordered = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.to_owned(),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("reading `{filter}`: {e}"))?;
    let mut messages = ordered
        .messages()
        .await
        .map_err(|e| format!("reading `{filter}`: {e}"))?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| format!("reading `{filter}`: {e}"))?;
        let info = m.info().map_err(|e| format!("reading `{filter}`: {e}"))?;
        let seq = info.stream_sequence;
        let pending = info.pending;
        let at = info.published.unix_timestamp_nanos();
        each(seq, at, m.headers.as_ref(), &m.payload);
        if seq >= last || pending == 0 {
            break;
        }
    }
    Ok(())
}
