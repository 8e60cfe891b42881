//! What the engine remembers about one conversation while it is live.
//!
//! [`ConversationState`] is folded from the conversation's events in order: the finalized
//! transcript from `message_response`, the live caption from `recognition_result`, and the
//! trackers, insights and topics seen so far. Templates read it as `conversation`.
//!
//! It does not own *when* state is released (completion, idle timeout): the engine does.
//!
//! The growing parts (transcript, insights, topics) are persistent vectors, so a snapshot that a
//! pipeline run reads while the conversation goes on is a clone that costs the same at the
//! first sentence and at the four-thousandth; folding an event costs the same too (repeats are
//! found through hash sets, not by scanning).

use std::sync::Arc;

use imbl::{HashSet, Vector};
use serde::{Deserialize, Serialize};

use crate::event::{Caption, Detail, Event, EventKind, Insight, Topic};

/// One finalized transcript line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptLine {
    /// Symbl's message id, when sent.
    pub id: Option<String>,
    /// Speaker label (name, else user id).
    pub speaker: String,
    /// Speaker user id (e-mail or phone), when sent.
    pub user_id: Option<String>,
    /// The sentence.
    pub text: String,
    /// ISO-8601 start time, when sent.
    pub start_time: Option<String>,
    /// ISO-8601 end time, when sent.
    pub end_time: Option<String>,
    /// Milliseconds since the call started when the line arrived.
    pub offset_ms: u64,
    /// Sentiment polarity (-1..1), when sent.
    pub sentiment: Option<f64>,
}

/// A tracker seen in this conversation (final and interim results are merged by name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrackerSeen {
    /// Tracker name.
    pub name: String,
    /// The phrases matched so far.
    pub phrases: Vec<String>,
    /// How many detections (interim and final) arrived.
    pub count: u32,
    /// When it was first detected.
    pub first_offset_ms: u64,
}

/// Everything known about one conversation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConversationState {
    /// The engine's id for it (the recording's `conversation` or the connection id).
    pub id: String,
    /// Symbl's conversation id, once `conversation_created` (or similar) said it.
    pub symbl_conversation_id: Option<String>,
    /// Finalized transcript, oldest first. Lines are shared: a snapshot and the live state
    /// hold the same lines, and adding one copies pointers, never sentences.
    pub transcript: Vector<Arc<TranscriptLine>>,
    /// The latest live caption, cleared when a finalized line arrives.
    pub caption: Option<Caption>,
    /// Trackers seen, in order of first detection.
    pub trackers: Vector<TrackerSeen>,
    /// Insights (questions, action items, follow-ups), in order.
    pub insights: Vector<Arc<Insight>>,
    /// Topics, without repeats of the same phrase.
    pub topics: Vector<Arc<Topic>>,
    /// Offset of the latest event.
    pub last_offset_ms: u64,
    /// Events folded so far.
    pub events_seen: u64,
    /// True once `conversation_completed` arrived.
    pub completed: bool,
    /// Ids of the insights kept, to drop repeats in constant time (persistent, like the vectors:
    /// a snapshot's clone does not copy it).
    #[serde(skip_serializing, default)]
    insight_ids: HashSet<String>,
    /// Lowercased topic phrases kept, to drop repeats in constant time.
    #[serde(skip_serializing, default)]
    topic_keys: HashSet<String>,
}

impl ConversationState {
    /// A fresh state for conversation `id`.
    pub fn new(id: &str) -> Self {
        ConversationState {
            id: id.to_owned(),
            ..Default::default()
        }
    }

    /// Folds one event into the state.
    pub fn apply(&mut self, event: &Event) {
        self.events_seen += 1;
        self.last_offset_ms = self.last_offset_ms.max(event.offset_ms);
        match &event.detail {
            Detail::Message(m) => {
                self.caption = None;
                self.transcript.push_back(Arc::new(TranscriptLine {
                    id: m.id.clone(),
                    speaker: m.speaker.label().to_owned(),
                    user_id: m.speaker.user_id.clone(),
                    text: m.text.clone(),
                    start_time: m.start_time.clone(),
                    end_time: m.end_time.clone(),
                    offset_ms: event.offset_ms,
                    sentiment: m.sentiment,
                }));
            }
            Detail::Caption(c) => self.caption = Some(c.clone()),
            Detail::Tracker(t) => {
                let phrases = t.phrases();
                // Found by reading first: a mutable walk would copy every node a snapshot
                // shares, even when the tracker is new.
                let known = self.trackers.iter().position(|s| s.name == t.name);
                match known.and_then(|i| self.trackers.get_mut(i)) {
                    Some(seen) => {
                        seen.count += 1;
                        for p in phrases {
                            if !seen.phrases.contains(&p) {
                                seen.phrases.push(p);
                            }
                        }
                    }
                    None => self.trackers.push_back(TrackerSeen {
                        name: t.name.clone(),
                        phrases,
                        count: 1,
                        first_offset_ms: event.offset_ms,
                    }),
                }
            }
            Detail::Insight(i) => {
                let first = match &i.id {
                    Some(id) => self.insight_ids.insert(id.clone()).is_none(),
                    None => true,
                };
                if first {
                    self.insights.push_back(Arc::new(i.clone()));
                }
            }
            Detail::Topic(t) => {
                if self.topic_keys.insert(t.phrases.to_lowercase()).is_none() {
                    self.topics.push_back(Arc::new(t.clone()));
                }
            }
            Detail::Lifecycle {
                symbl_conversation_id,
                ..
            } => {
                if let Some(id) = symbl_conversation_id {
                    self.symbl_conversation_id = Some(id.clone());
                }
                if event.kind == EventKind::ConversationCompleted {
                    self.completed = true;
                }
            }
            Detail::Entity(_) | Detail::Feedback(_) | Detail::Error { .. } | Detail::None => {}
        }
    }

    /// The last `n` transcript lines, oldest first.
    /// Costs O(log n) whatever the length of the call.
    pub fn last_lines(&self, n: usize) -> Vector<Arc<TranscriptLine>> {
        let start = self.transcript.len().saturating_sub(n);
        self.transcript.skip(start)
    }

    /// Rebuilds the indexes a restored state needs (they are not serialized: they follow from
    /// the insights and topics).
    pub fn reindex(&mut self) {
        self.insight_ids = self.insights.iter().filter_map(|i| i.id.clone()).collect();
        self.topic_keys = self
            .topics
            .iter()
            .map(|t| t.phrases.to_lowercase())
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_frame;
    use serde_json::json;

    fn fold(state: &mut ConversationState, offset: u64, frame: serde_json::Value) {
        for e in parse_frame("c1", offset, frame).unwrap() {
            state.apply(&e);
        }
    }

    #[test]
    fn folds_transcript_caption_trackers_insights_topics() {
        let mut s = ConversationState::new("c1");
        fold(
            &mut s,
            0,
            json!({"type": "message", "message": {"type": "conversation_created", "data": {"conversationId": "999"}}}),
        );
        fold(
            &mut s,
            100,
            json!({"type": "message", "message": {"type": "recognition_result", "isFinal": false, "punctuated": {"transcript": "It seems"}}}),
        );
        assert_eq!(s.caption.as_ref().unwrap().text, "It seems");
        fold(
            &mut s,
            900,
            json!({"type": "message_response", "messages": [
            {"from": {"name": "Customer"}, "payload": {"content": "It seems expensive."}},
            {"from": {"name": "Agent"}, "payload": {"content": "I hear you."}}]}),
        );
        assert!(s.caption.is_none());
        for fin in [false, true] {
            fold(
                &mut s,
                1000,
                json!({"type": "tracker_response", "isFinal": fin, "trackers": [
                {"name": "Budget", "matches": [{"value": "seems expensive", "messageRefs": []}]}]}),
            );
        }
        fold(
            &mut s,
            1100,
            json!({"type": "insight_response", "insights": [{"id": "q1", "type": "question", "payload": {"content": "Is there a discount?"}}]}),
        );
        fold(
            &mut s,
            1200,
            json!({"type": "insight_response", "insights": [{"id": "q1", "type": "question", "payload": {"content": "Is there a discount?"}}]}),
        );
        fold(
            &mut s,
            1300,
            json!({"type": "topic_response", "topics": [{"phrases": "pricing"}, {"phrases": "Pricing"}]}),
        );
        assert_eq!(s.symbl_conversation_id.as_deref(), Some("999"));
        assert_eq!(s.transcript.len(), 2);
        assert_eq!(s.last_lines(1)[0].speaker, "Agent");
        let mut restored: ConversationState =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        restored.reindex();
        fold(
            &mut restored,
            1250,
            json!({"type": "insight_response", "insights": [{"id": "q1", "type": "question", "payload": {"content": "Is there a discount?"}}]}),
        );
        assert_eq!(
            restored.insights.len(),
            1,
            "a restored state still drops repeats"
        );
        assert_eq!(s.last_lines(10).len(), 2);
        assert_eq!(s.trackers.len(), 1);
        assert_eq!(s.trackers[0].count, 2);
        assert_eq!(s.insights.len(), 1);
        assert_eq!(s.topics.len(), 1);
        assert!(!s.completed);
        fold(
            &mut s,
            2000,
            json!({"type": "message", "message": {"type": "conversation_completed"}}),
        );
        assert!(s.completed);
        assert_eq!(s.last_offset_ms, 2000);
    }
}
