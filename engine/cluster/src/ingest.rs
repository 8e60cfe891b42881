//! Ingest: events to the events stream.
//!
//! An ingest process runs the usual sources (Symbl connections, the Twilio bridge,
//! recordings) on an engine with this forwarder: every event is published to
//! `prefix.ev.<conversation>` with the frame it came from as the payload and
//! `Nats-Msg-Id = <conversation>:<event identity>`, so a re-sent event within the stream's
//! duplicate window is stored once. The publish is confirmed (PubAck) before the source goes
//! on; while the server is away it is retried, and the source waits.

use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage as Publish;
use bytes::Bytes;
use prompter_core::event::{Detail, Event, EventKind, Feedback, RawFrame, Received};
use prompter_engine::engine::Forward;

use crate::Cluster;
use crate::confirm::publish_confirmed;
use crate::names::{CONVERSATION, EVENT, KIND, OFFSET, token};

/// The forwarder of an ingest process.
pub struct Ingest {
    cluster: Cluster,
    /// Events stored.
    pub published: AtomicU64,
    /// Events the server already had (re-sent within the duplicate window).
    pub duplicates: AtomicU64,
    /// Publish attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Events given up on after two minutes without the server.
    pub lost: AtomicU64,
}

impl Ingest {
    /// A forwarder to `cluster`'s events stream.
    pub fn new(cluster: Cluster) -> Self {
        Ingest {
            cluster,
            published: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    /// Publishes `event`; true once the server has it.
    pub async fn publish(&self, event: &Event) -> bool {
        let conv = token(&event.conversation_id);
        let identity = format!("{:016x}", event.identity());
        let subject = self.cluster.subjects.ingest(&conv);
        let payload = Bytes::from(event.raw.json().into_owned());
        let mut headers = HeaderMap::new();
        headers.insert(CONVERSATION, &*event.conversation_id);
        headers.insert(OFFSET, event.offset_ms.to_string().as_str());
        headers.insert(EVENT, identity.as_str());
        if event.kind == EventKind::Feedback {
            headers.insert(KIND, "feedback");
        }
        let msg_id = format!("{conv}:{identity}");
        let message = || {
            Publish::build()
                .payload(payload.clone())
                .headers(headers.clone())
                .message_id(&msg_id)
        };
        let warn = |e: &str| {
            tracing::warn!(conversation = %event.conversation_id, error = %e, "The events stream did not take an event; retrying (the source waits).");
        };
        match publish_confirmed(&self.cluster, &subject, message, &self.retries, warn).await {
            Ok(ack) => {
                let counter = if ack.duplicate {
                    &self.duplicates
                } else {
                    &self.published
                };
                counter.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(conversation = %event.conversation_id, error = %e, "The events stream did not take an event for 2 minutes; it is not stored.");
                false
            }
        }
    }
}

#[prompter_core::async_trait]
impl Forward for Ingest {
    async fn forward(&self, _source: &'static str, event: Event) {
        self.publish(&event).await;
    }
}

/// The event a stored message carries: its frame parsed in its conversation at its offset,
/// and the event of that frame with the identity in the headers (or, for a console's
/// feedback, the feedback record).
///
/// # Errors
/// When a header is missing or the frame does not hold that event.
pub fn decode(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<Event, String> {
    let header = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
            .ok_or_else(|| format!("the message has no `{name}` header"))
    };
    let conversation = header(CONVERSATION)?;
    let offset: u64 = header(OFFSET)?
        .parse()
        .map_err(|_| format!("`{OFFSET}` is not a number"))?;
    let identity = u64::from_str_radix(&header(EVENT)?, 16)
        .map_err(|_| format!("`{EVENT}` is not 16 hex digits"))?;
    let text = std::str::from_utf8(payload).map_err(|_| "the frame is not UTF-8".to_owned())?;
    if headers
        .and_then(|h| h.get(KIND))
        .is_some_and(|k| k.as_str() == "feedback")
    {
        return decode_feedback(&conversation, offset, identity, text);
    }
    let frame = Received::parse(text).map_err(|e| format!("the frame is not JSON: {e}"))?;
    let events = frame
        .into_events(&conversation, offset)
        .map_err(|e| format!("the frame does not parse: {e}"))?;
    let n = events.len();
    events
        .into_iter()
        .find(|e| e.identity() == identity)
        .ok_or_else(|| format!("none of the frame's {n} event(s) has identity {identity:016x}"))
}

/// A console's feedback: the record the console sent (the feedback and its conversation).
fn decode_feedback(
    conversation: &str,
    offset_ms: u64,
    identity: u64,
    text: &str,
) -> Result<Event, String> {
    let raw: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the feedback is not JSON: {e}"))?;
    let feedback: Feedback = serde_json::from_value(raw.clone())
        .map_err(|e| format!("the feedback does not parse: {e}"))?;
    let event = Event {
        conversation_id: std::sync::Arc::from(conversation),
        offset_ms,
        kind: EventKind::Feedback,
        detail: Detail::Feedback(feedback),
        raw: std::sync::Arc::new(RawFrame::tree(std::sync::Arc::new(raw))),
        received: std::time::Instant::now(),
    };
    if event.identity() == identity {
        Ok(event)
    } else {
        Err(format!(
            "the feedback's identity is not {identity:016x} (the message was altered)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_frame_gives_back_each_of_its_events() {
        let frame = r#"{"type":"message_response","messages":[
            {"id":"m1","payload":{"content":"Hello there.","contentType":"text/plain"},"from":{"name":"Ann","userId":"ann@x.com"}},
            {"id":"m2","payload":{"content":"Hi.","contentType":"text/plain"},"from":{"name":"Bo","userId":"bo@x.com"}}]}"#;
        let events = Received::parse(frame)
            .expect("json")
            .into_events("call 1", 1234)
            .expect("events");
        assert_eq!(events.len(), 2);
        for e in &events {
            let mut h = HeaderMap::new();
            h.insert(CONVERSATION, "call 1");
            h.insert(OFFSET, "1234");
            h.insert(EVENT, format!("{:016x}", e.identity()).as_str());
            let back = decode(Some(&h), frame.as_bytes()).expect("decodes");
            assert_eq!(back.identity(), e.identity());
            assert_eq!(&*back.conversation_id, "call 1");
            assert_eq!(back.offset_ms, 1234);
        }
        let mut h = HeaderMap::new();
        h.insert(CONVERSATION, "call 1");
        h.insert(OFFSET, "1234");
        h.insert(EVENT, "00000000000000ff");
        let err = decode(Some(&h), frame.as_bytes()).expect_err("no such event");
        assert!(err.contains("none of the frame's 2 event(s)"), "{err}");
        assert!(decode(None, frame.as_bytes()).is_err());
    }

    #[test]
    fn a_consoles_feedback_travels_as_its_record() {
        let record = serde_json::json!({"conversation_id": "call 1", "output_id": "o-1",
            "version": 2, "action": "dismissed", "reason": "wrong", "pipeline": "rta",
            "kind": "suggestion", "at_ms": 1_700_000_000_000u64});
        let feedback: Feedback = serde_json::from_value(record.clone()).expect("feedback");
        let event = Event {
            conversation_id: std::sync::Arc::from("call 1"),
            offset_ms: 4200,
            kind: EventKind::Feedback,
            detail: Detail::Feedback(feedback.clone()),
            raw: std::sync::Arc::new(RawFrame::tree(std::sync::Arc::new(record))),
            received: std::time::Instant::now(),
        };
        let payload = event.raw.json().into_owned();
        let mut h = HeaderMap::new();
        h.insert(CONVERSATION, "call 1");
        h.insert(OFFSET, "4200");
        h.insert(EVENT, format!("{:016x}", event.identity()).as_str());
        // Without the kind header the record is read as a Symbl frame, which it is not.
        assert!(decode(Some(&h), payload.as_bytes()).is_err());
        h.insert(KIND, "feedback");
        let back = decode(Some(&h), payload.as_bytes()).expect("decodes");
        assert_eq!(back.kind, EventKind::Feedback);
        assert_eq!(back.detail, Detail::Feedback(feedback));
        assert_eq!(back.identity(), event.identity());
        h.insert(EVENT, "00000000000000ff");
        let err = decode(Some(&h), payload.as_bytes()).expect_err("altered");
        assert!(err.contains("identity"), "{err}");
    }
}
