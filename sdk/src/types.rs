//! The values that cross the boundary, with convenience methods.
//!
//! These are the contract's own records (generated from the WIT), so they are the same on
//! `wasm32` and in native tests.

use serde_json::Value;

use crate::bindings::prompter::plugin::types as wit;

/// One event of one conversation (`kind`, `conversation_id`, `offset_ms`, `detail`, `raw_json`).
pub use wit::Event;

/// The typed content of an event; anything else is in [`Event::raw_json`].
pub use wit::Detail;

/// A finalized sentence (`message_response`) or a live caption (`recognition_result`).
pub use wit::Message;

/// One tracker detection.
pub use wit::Tracker;

/// One match of a tracker.
pub use wit::TrackerMatch;

/// A question, action item or follow-up.
pub use wit::Insight;

/// Read access to the conversation state: its id, finalized transcript and the rest as JSON.
pub use wit::Conversation;

/// One finalized transcript line.
pub use wit::TranscriptLine;

/// Who said something.
pub use wit::Speaker;

/// Event kind names, as in pipeline `on:` lists.
pub mod kinds {
    /// A finalized transcript sentence.
    pub const MESSAGE_RESPONSE: &str = "message_response";
    /// A live (possibly interim) caption.
    pub const RECOGNITION_RESULT: &str = "recognition_result";
    /// One tracker detection.
    pub const TRACKER_RESPONSE: &str = "tracker_response";
    /// One question, action item or follow-up.
    pub const INSIGHT_RESPONSE: &str = "insight_response";
    /// One topic.
    pub const TOPIC_RESPONSE: &str = "topic_response";
    /// One detected entity (only in `raw_json`).
    pub const ENTITY_RESPONSE: &str = "entity_response";
    /// The conversation is over.
    pub const CONVERSATION_COMPLETED: &str = "conversation_completed";
    /// Symbl created the conversation.
    pub const CONVERSATION_CREATED: &str = "conversation_created";
    /// Symbl started listening.
    pub const STARTED_LISTENING: &str = "started_listening";
    /// Recognition started.
    pub const RECOGNITION_STARTED: &str = "recognition_started";
    /// Recognition stopped.
    pub const RECOGNITION_STOPPED: &str = "recognition_stopped";
    /// The session's settings changed.
    pub const SESSION_MODIFIED: &str = "session_modified";
    /// An error frame.
    pub const ERROR: &str = "error";
}

impl Event {
    /// True when the event is of `kind` (`"message_response"`, see [`kinds`]).
    pub fn is(&self, kind: &str) -> bool {
        self.kind == kind
    }

    /// The finalized sentence of a `message_response` event.
    pub fn message(&self) -> Option<&Message> {
        match &self.detail {
            Detail::Message(m) => Some(m),
            _ => None,
        }
    }

    /// The live caption of a `recognition_result` event.
    pub fn caption(&self) -> Option<&Message> {
        match &self.detail {
            Detail::Caption(m) => Some(m),
            _ => None,
        }
    }

    /// The detection of a `tracker_response` event.
    pub fn tracker(&self) -> Option<&Tracker> {
        match &self.detail {
            Detail::Tracker(t) => Some(t),
            _ => None,
        }
    }

    /// The insight of an `insight_response` event.
    pub fn insight(&self) -> Option<&Insight> {
        match &self.detail {
            Detail::Insight(i) => Some(i),
            _ => None,
        }
    }

    /// The phrase of a `topic_response` event.
    pub fn topic(&self) -> Option<&str> {
        match &self.detail {
            Detail::Topic(t) => Some(t),
            _ => None,
        }
    }

    /// The event's own text: the sentence, caption, insight text or topic phrase.
    pub fn text(&self) -> Option<&str> {
        match &self.detail {
            Detail::Message(m) | Detail::Caption(m) => Some(&m.text),
            Detail::Insight(i) => Some(&i.text),
            Detail::Topic(t) => Some(t),
            Detail::Tracker(_) | Detail::None => None,
        }
    }

    /// Who spoke (messages, captions) or raised the insight.
    pub fn speaker(&self) -> Option<&Speaker> {
        match &self.detail {
            Detail::Message(m) | Detail::Caption(m) => Some(&m.speaker),
            Detail::Insight(i) => i.speaker.as_ref(),
            _ => None,
        }
    }

    /// The sentiment polarity (-1..1) of a message or caption, when Symbl sent one.
    pub fn sentiment(&self) -> Option<f64> {
        match &self.detail {
            Detail::Message(m) | Detail::Caption(m) => m.sentiment,
            _ => None,
        }
    }

    /// The Symbl frame the event came from, parsed (`Value::Null` if it is not JSON).
    pub fn raw(&self) -> Value {
        serde_json::from_str(&self.raw_json).unwrap_or(Value::Null)
    }
}

impl Speaker {
    /// The best human-readable label: the name, else the user id, else `"Unknown"` (the same
    /// label the engine puts in transcript lines).
    pub fn label(&self) -> &str {
        self.name
            .as_deref()
            .or(self.user_id.as_deref())
            .unwrap_or("Unknown")
    }

    /// True when the name or the user id contains `pattern` (for example `"@acme.com"` to
    /// recognize agents).
    pub fn matches(&self, pattern: &str) -> bool {
        [&self.name, &self.user_id]
            .into_iter()
            .flatten()
            .any(|s| s.contains(pattern))
    }
}

impl Tracker {
    /// The matched vocabulary phrases.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.matches.iter().map(|m| m.value.as_str())
    }
}

impl TranscriptLine {
    /// True when the speaker label or the user id contains `pattern`.
    pub fn is_from(&self, pattern: &str) -> bool {
        self.speaker.contains(pattern)
            || self.user_id.as_deref().is_some_and(|u| u.contains(pattern))
    }
}

impl Conversation {
    /// The last `n` finalized lines (fewer if the transcript is shorter), oldest first.
    pub fn last_lines(&self, n: usize) -> &[TranscriptLine] {
        let start = self.transcript.len().saturating_sub(n);
        &self.transcript[start..]
    }

    /// The last line, if any.
    pub fn last_line(&self) -> Option<&TranscriptLine> {
        self.transcript.last()
    }

    /// The rest of the conversation state (trackers, insights, topics, caption, ...) parsed from
    /// `state_json`; `Value::Null` if the engine sent nothing parsable.
    pub fn state(&self) -> Value {
        serde_json::from_str(&self.state_json).unwrap_or(Value::Null)
    }

    /// The transcript as `Speaker: text` lines, oldest first.
    pub fn transcript_text(&self) -> String {
        self.transcript
            .iter()
            .map(|l| format!("{}: {}", l.speaker, l.text))
            .collect::<Vec<_>>()
            .join("\n")
    }
}
