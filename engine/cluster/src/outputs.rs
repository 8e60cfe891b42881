//! The engine's sink in a cluster: every output version to the outputs stream.
//!
//! Each version goes to `prefix.out.<conversation>` as JSON with
//! `Nats-Msg-Id = <output id>@<version>`. Ids and versions are derived from the input (the
//! conversation, the pipeline, what the output is about, and the conversation's book), so an
//! output made again after a takeover, or by a stalled engine that wakes up, is the same
//! message and the server keeps the first one within the outputs stream's duplicate window.
//! The queue is lossless (the engine waits rather than drop), and a delivery returns only once
//! the server has stored it: [`Outputs`] then tells the member, which acknowledges the inputs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;
use prompter_core::output::Output;
use prompter_engine::sink::{QueuePolicy, Sink, SinkError};

use crate::Cluster;
use crate::confirm::publish_confirmed;
use crate::names::token;

/// Hears that the outputs of a conversation up to `seq` are stored.
pub type OnStored = Arc<dyn Fn(&str, u64) + Send + Sync>;

/// What the outputs sink counted (shared with the metrics).
#[derive(Debug, Default)]
pub struct OutputCounters {
    /// Versions stored.
    pub stored: AtomicU64,
    /// Versions the server already had (made again after a takeover).
    pub duplicates: AtomicU64,
    /// Attempts that failed and were retried.
    pub retries: AtomicU64,
}

/// The sink.
pub struct Outputs {
    cluster: Cluster,
    on_stored: Option<OnStored>,
    counters: Arc<OutputCounters>,
}

impl Outputs {
    /// A sink to `cluster`'s outputs stream; `on_stored` hears each stored version.
    pub fn new(cluster: Cluster, on_stored: Option<OnStored>) -> Self {
        Outputs {
            cluster,
            on_stored,
            counters: Arc::default(),
        }
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<OutputCounters> {
        self.counters.clone()
    }
}

#[prompter_core::async_trait]
impl Sink for Outputs {
    fn name(&self) -> &str {
        "cluster"
    }

    fn policy(&self) -> QueuePolicy {
        QueuePolicy::LOSSLESS
    }

    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError> {
        let subject = self
            .cluster
            .subjects
            .outputs(&token(&output.conversation_id));
        let payload = Bytes::from(serde_json::to_vec(&*output).map_err(|e| SinkError {
            message: format!("output {} cannot be written as JSON: {e}", output.id),
        })?);
        let msg_id = format!("{}@{}", output.id, output.version);
        let message = || {
            Publish::build()
                .payload(payload.clone())
                .message_id(&msg_id)
        };
        let warn = |e: &str| {
            tracing::warn!(output = %msg_id, error = %e, "The outputs stream did not take an output; retrying (the engine's outputs wait).");
        };
        let ack = publish_confirmed(
            &self.cluster,
            &subject,
            message,
            &self.counters.retries,
            warn,
        )
        .await
        .map_err(|e| SinkError {
            message: format!("the outputs stream did not take {msg_id} for 2 minutes: {e}"),
        })?;
        let counter = if ack.duplicate {
            &self.counters.duplicates
        } else {
            &self.counters.stored
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = &self.on_stored {
            f(&output.conversation_id, output.seq);
        }
        Ok(())
    }
}
