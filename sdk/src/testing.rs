//! Helpers for testing plugins natively with `cargo test`.
//!
//! Build events and conversations, run a plugin through the same config parsing the engine's
//! `init` uses, and mock the host services. Outside the engine the host functions are doubles
//! (see the crate docs); the state here is thread-local, so tests run in parallel safely.
//!
//! ```
//! use prompter_sdk::prelude::*;
//! use prompter_sdk::testing::{self, Harness};
//! use serde_json::json;
//!
//! struct Echo;
//! impl Plugin for Echo {
//!     type Config = serde_json::Value;
//!     fn init(_: serde_json::Value) -> Result<Self, Error> { Ok(Echo) }
//!     fn process(&mut self, e: &Event, c: &Conversation) -> Result<Outcome, Error> {
//!         Ok(Outcome::next(json!({ "text": e.text(), "lines": c.transcript.len() })))
//!     }
//! }
//!
//! // One-shot:
//! let event = testing::message_event("c1", 1_500, "Jane", Some("jane@example.com"), "Hi", None);
//! let conv = testing::conversation(vec![testing::line("Jane", "Hi")]);
//! let out = testing::run::<Echo>(json!({}), &event, &conv).unwrap();
//! assert_eq!(out.output(), Some(&json!({ "text": "Hi", "lines": 1 })));
//!
//! // A whole call, the transcript growing as in the engine:
//! let mut h = Harness::<Echo>::new(json!({})).unwrap();
//! h.say(1_000, "Agent", Some("agent@acme.com"), "Hello!", None).unwrap();
//! let out = h.say(2_000, "Jane", None, "Hi", Some(0.4)).unwrap();
//! assert_eq!(out.output(), Some(&json!({ "text": "Hi", "lines": 2 })));
//! ```

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::double;
use crate::http::{Request, Response};
use crate::kinds;
use crate::knowledge::Document;
use crate::llm::ChatMessage;
use crate::log::Level;
use crate::plugin::parse_config;
use crate::{
    Conversation, Detail, Error, Event, Insight, Message, Outcome, Plugin, Speaker, Tracker,
    TrackerMatch, TranscriptLine,
};

/// The conversation id [`conversation`] and [`Harness`] use.
pub const CONVERSATION_ID: &str = "test-conversation";

/// An event of `kind` with `detail`; `raw_json` is a minimal frame naming the kind.
pub fn event(kind: &str, conversation_id: &str, offset_ms: u64, detail: Detail) -> Event {
    Event {
        kind: kind.to_owned(),
        conversation_id: conversation_id.to_owned(),
        offset_ms,
        detail,
        raw_json: json!({ "type": kind }).to_string(),
    }
}

fn speaker(name: &str, user_id: Option<&str>) -> Speaker {
    Speaker {
        name: (!name.is_empty()).then(|| name.to_owned()),
        user_id: user_id.map(str::to_owned),
    }
}

/// A `message_response` event: a finalized sentence by `speaker_name` (empty for none) with
/// an optional user id and sentiment. `raw_json` is the Symbl frame it would come from.
pub fn message_event(
    conversation_id: &str,
    offset_ms: u64,
    speaker_name: &str,
    user_id: Option<&str>,
    text: &str,
    sentiment: Option<f64>,
) -> Event {
    let mut e = event(
        kinds::MESSAGE_RESPONSE,
        conversation_id,
        offset_ms,
        Detail::Message(Message {
            id: None,
            speaker: speaker(speaker_name, user_id),
            text: text.to_owned(),
            sentiment,
            is_final: true,
        }),
    );
    let mut from = serde_json::Map::new();
    if !speaker_name.is_empty() {
        from.insert("name".into(), speaker_name.into());
    }
    if let Some(u) = user_id {
        from.insert("userId".into(), u.into());
    }
    let mut message =
        json!({ "from": from, "payload": { "content": text, "contentType": "text/plain" } });
    if let Some(s) = sentiment {
        message["sentiment"] = json!({ "polarity": { "score": s } });
    }
    e.raw_json = json!({ "type": "message_response", "messages": [message] }).to_string();
    e
}

/// A `recognition_result` event: a live caption.
pub fn caption_event(
    conversation_id: &str,
    offset_ms: u64,
    speaker_name: &str,
    text: &str,
    is_final: bool,
) -> Event {
    let mut e = event(
        kinds::RECOGNITION_RESULT,
        conversation_id,
        offset_ms,
        Detail::Caption(Message {
            id: None,
            speaker: speaker(speaker_name, None),
            text: text.to_owned(),
            sentiment: None,
            is_final,
        }),
    );
    e.raw_json = json!({ "type": "message", "message": { "type": "recognition_result",
        "isFinal": is_final, "punctuated": { "transcript": text } } })
    .to_string();
    e
}

/// A final `tracker_response` event: tracker `name` matched `value` in `message_texts`.
pub fn tracker_event(
    conversation_id: &str,
    offset_ms: u64,
    name: &str,
    value: &str,
    message_texts: &[&str],
) -> Event {
    let mut e = event(
        kinds::TRACKER_RESPONSE,
        conversation_id,
        offset_ms,
        Detail::Tracker(Tracker {
            name: name.to_owned(),
            is_final: true,
            matches: vec![TrackerMatch {
                value: value.to_owned(),
                message_texts: message_texts.iter().map(|t| (*t).to_owned()).collect(),
            }],
        }),
    );
    let refs: Vec<Value> = message_texts.iter().map(|t| json!({ "text": t })).collect();
    e.raw_json = json!({ "type": "tracker_response", "isFinal": true, "trackers": [
        { "name": name, "matches": [{ "value": value, "messageRefs": refs }] }] })
    .to_string();
    e
}

/// An `insight_response` event of `kind` (`question`, `action_item`, `follow_up`).
pub fn insight_event(conversation_id: &str, offset_ms: u64, kind: &str, text: &str) -> Event {
    let mut e = event(
        kinds::INSIGHT_RESPONSE,
        conversation_id,
        offset_ms,
        Detail::Insight(Insight {
            kind: kind.to_owned(),
            text: text.to_owned(),
            speaker: None,
        }),
    );
    e.raw_json = json!({ "type": "insight_response", "insights": [
        { "type": kind, "payload": { "content": text } }] })
    .to_string();
    e
}

/// A `topic_response` event.
pub fn topic_event(conversation_id: &str, offset_ms: u64, phrase: &str) -> Event {
    let mut e = event(
        kinds::TOPIC_RESPONSE,
        conversation_id,
        offset_ms,
        Detail::Topic(phrase.to_owned()),
    );
    e.raw_json = json!({ "type": "topic_response", "topics": [{ "phrases": phrase }] }).to_string();
    e
}

/// A `conversation_completed` event.
pub fn completed_event(conversation_id: &str, offset_ms: u64) -> Event {
    let mut e = event(
        kinds::CONVERSATION_COMPLETED,
        conversation_id,
        offset_ms,
        Detail::None,
    );
    e.raw_json =
        json!({ "type": "message", "message": { "type": "conversation_completed" } }).to_string();
    e
}

/// A transcript line by `speaker` at offset 0; refine it with [`TranscriptLine::with_user_id`],
/// [`TranscriptLine::at`] and [`TranscriptLine::with_sentiment`].
pub fn line(speaker: &str, text: &str) -> TranscriptLine {
    TranscriptLine {
        speaker: speaker.to_owned(),
        user_id: None,
        text: text.to_owned(),
        offset_ms: 0,
        sentiment: None,
    }
}

impl TranscriptLine {
    /// Sets the user id.
    #[must_use]
    pub fn with_user_id(mut self, user_id: &str) -> Self {
        self.user_id = Some(user_id.to_owned());
        self
    }

    /// Sets the offset.
    #[must_use]
    pub fn at(mut self, offset_ms: u64) -> Self {
        self.offset_ms = offset_ms;
        self
    }

    /// Sets the sentiment.
    #[must_use]
    pub fn with_sentiment(mut self, sentiment: f64) -> Self {
        self.sentiment = Some(sentiment);
        self
    }
}

/// A conversation [`CONVERSATION_ID`] with `lines` as its transcript and a matching
/// `state_json`.
pub fn conversation(lines: Vec<TranscriptLine>) -> Conversation {
    let mut c = Conversation {
        id: CONVERSATION_ID.to_owned(),
        transcript: lines,
        state_json: String::new(),
    };
    c.state_json = state_json(&c);
    c
}

/// The same shape the engine sends: the state without the transcript (which has its own field).
fn state_json(c: &Conversation) -> String {
    let last = c.transcript.last().map_or(0, |l| l.offset_ms);
    json!({ "id": c.id, "symbl_conversation_id": null, "caption": null, "trackers": [],
            "insights": [], "topics": [], "last_offset_ms": last, "completed": false })
    .to_string()
}

/// Builds a plugin from a config value exactly as the engine's `init` would (same parsing, same
/// field paths in errors).
///
/// # Errors
/// The config error or whatever [`Plugin::init`] returned.
pub fn init<P: Plugin>(config: Value) -> Result<P, Error> {
    parse_config::<P::Config>(&config.to_string()).and_then(P::init)
}

/// `init` then `process` one event.
///
/// # Errors
/// As [`init`] and [`Plugin::process`].
pub fn run<P: Plugin>(
    config: Value,
    event: &Event,
    conversation: &Conversation,
) -> Result<Outcome, Error> {
    init::<P>(config)?.process(event, conversation)
}

/// A plugin instance plus a growing conversation, for testing a whole call.
///
/// [`Harness::new`] resets the native doubles (kv, logs, mocks) of the current thread.
pub struct Harness<P: Plugin> {
    config: Value,
    plugin: P,
    conversation: Conversation,
}

impl<P: Plugin> Harness<P> {
    /// Resets the doubles and builds the plugin from `config`.
    ///
    /// # Errors
    /// As [`init`].
    pub fn new(config: Value) -> Result<Self, Error> {
        reset();
        let plugin = init::<P>(config.clone())?;
        Ok(Harness {
            config,
            plugin,
            conversation: conversation(Vec::new()),
        })
    }

    /// The plugin.
    pub fn plugin(&mut self) -> &mut P {
        &mut self.plugin
    }

    /// The conversation so far.
    pub fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    /// Appends a line to the transcript (without running the plugin).
    pub fn push_line(&mut self, line: TranscriptLine) {
        self.conversation.transcript.push(line);
        self.conversation.state_json = state_json(&self.conversation);
    }

    /// Someone says `text` at `offset_ms`: the line joins the transcript (as the engine does
    /// before running pipelines), then the plugin processes the `message_response` event.
    ///
    /// # Errors
    /// Whatever [`Plugin::process`] returned.
    pub fn say(
        &mut self,
        offset_ms: u64,
        speaker_name: &str,
        user_id: Option<&str>,
        text: &str,
        sentiment: Option<f64>,
    ) -> Result<Outcome, Error> {
        let event = message_event(
            &self.conversation.id,
            offset_ms,
            speaker_name,
            user_id,
            text,
            sentiment,
        );
        let label = if speaker_name.is_empty() {
            user_id.unwrap_or("Unknown")
        } else {
            speaker_name
        };
        self.push_line(TranscriptLine {
            speaker: label.to_owned(),
            user_id: user_id.map(str::to_owned),
            text: text.to_owned(),
            offset_ms,
            sentiment,
        });
        self.process(&event)
    }

    /// The plugin processes `event` with the current conversation.
    ///
    /// # Errors
    /// Whatever [`Plugin::process`] returned.
    pub fn process(&mut self, event: &Event) -> Result<Outcome, Error> {
        self.plugin.process(event, &self.conversation)
    }

    /// Replaces the instance with a fresh one built from the same config, keeping kv, as the
    /// engine does when it recycles an instance mid-call.
    ///
    /// # Errors
    /// As [`init`].
    pub fn recycle(&mut self) -> Result<(), Error> {
        self.plugin = init::<P>(self.config.clone())?;
        Ok(())
    }
}

/// Clears the native kv, captured logs and mocks of the current thread.
pub fn reset() {
    double::reset();
}

/// The current kv contents of the native double.
pub fn kv_contents() -> HashMap<String, String> {
    double::kv_snapshot()
}

/// Takes the log lines captured so far by the native double.
pub fn logs() -> Vec<(Level, String)> {
    double::take_logs()
}

/// Answers [`http::fetch`](crate::http::fetch) with `handler` (native only).
pub fn mock_http(handler: impl FnMut(&Request) -> Result<Response, String> + 'static) {
    double::set_http(Some(Box::new(handler)));
}

/// Answers [`knowledge::search`](crate::knowledge::search) with `handler(store, query, k)`
/// (native only).
pub fn mock_knowledge(
    handler: impl FnMut(&str, &str, u32) -> Result<Vec<Document>, String> + 'static,
) {
    double::set_knowledge(Some(Box::new(handler)));
}

/// Answers [`llm::chat`](crate::llm::chat) with `handler(provider, system_prompt, messages)`
/// (native only).
pub fn mock_chat(
    handler: impl FnMut(&str, &str, &[ChatMessage]) -> Result<String, String> + 'static,
) {
    double::set_chat(Some(Box::new(handler)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http, knowledge, kv, llm, log};

    #[test]
    fn events_have_typed_details_and_symbl_frames() {
        let e = message_event("c", 5, "Jane", Some("j@x.com"), "Hello", Some(-0.5));
        assert!(e.is("message_response"));
        assert_eq!(e.text(), Some("Hello"));
        assert_eq!(e.speaker().map(Speaker::label), Some("Jane"));
        assert_eq!(e.sentiment(), Some(-0.5));
        assert_eq!(e.raw()["messages"][0]["from"]["userId"], "j@x.com");
        let t = tracker_event("c", 5, "Budget", "too expensive", &["It is too expensive"]);
        assert_eq!(
            t.tracker().unwrap().values().collect::<Vec<_>>(),
            ["too expensive"]
        );
        assert_eq!(t.text(), None);
        assert_eq!(
            insight_event("c", 1, "question", "Why?").text(),
            Some("Why?")
        );
        assert_eq!(topic_event("c", 1, "pricing").topic(), Some("pricing"));
        assert_eq!(
            caption_event("c", 1, "A", "It se", false)
                .caption()
                .unwrap()
                .text,
            "It se"
        );
        assert!(completed_event("c", 9).is(kinds::CONVERSATION_COMPLETED));
        let anon = message_event("c", 5, "", Some("+14155550123"), "Hi", None);
        assert_eq!(anon.speaker().unwrap().label(), "+14155550123");
    }

    #[test]
    fn conversation_helpers() {
        let c = conversation(vec![
            line("A", "one"),
            line("B", "two").at(10),
            line("C", "three"),
        ]);
        assert_eq!(c.last_lines(2).len(), 2);
        assert_eq!(c.last_lines(2)[0].text, "two");
        assert_eq!(c.last_lines(10).len(), 3);
        assert_eq!(c.state()["last_offset_ms"], 0);
        assert_eq!(c.state()["id"], CONVERSATION_ID);
        assert_eq!(c.transcript_text(), "A: one\nB: two\nC: three");
        assert!(
            line("Agent", "x")
                .with_user_id("a@acme.com")
                .is_from("@acme")
        );
    }

    #[test]
    fn doubles_work_and_reset() {
        reset();
        assert_eq!(kv::get("a"), None);
        kv::set("a", "1").unwrap();
        kv::set_json("b", &vec![1, 2]).unwrap();
        assert_eq!(kv::get_json::<Vec<u32>>("b"), Some(vec![1, 2]));
        assert!(!kv::flag("f"));
        kv::set_flag("f").unwrap();
        assert!(kv::flag("f"));
        kv::delete("a");
        assert_eq!(kv::get("a"), None);
        assert_eq!(kv_contents().len(), 2);
        log::info("hello");
        assert_eq!(logs(), vec![(Level::Info, "hello".to_owned())]);

        let err = http::get("https://x.example/").unwrap_err();
        assert!(err.starts_with("not available outside the engine"), "{err}");
        assert!(knowledge::search("s", "q", 3).is_err());
        assert!(llm::ask("p", "s", "q").is_err());

        mock_http(|r| Ok(Response::new(200, format!("{} {}", r.method, r.url))));
        assert_eq!(
            http::get("https://x.example/").unwrap().text(),
            "GET https://x.example/"
        );
        mock_knowledge(|_, q, _| Ok(vec![Document::new("1", q, 0.5)]));
        assert_eq!(knowledge::search("s", "q", 1).unwrap()[0].text, "q");
        mock_chat(|_, _, m| Ok(m.len().to_string()));
        assert_eq!(llm::ask("p", "s", "q").unwrap(), "1");

        reset();
        assert!(kv_contents().is_empty());
        assert!(http::get("https://x.example/").is_err());
    }

    #[test]
    fn request_builder() {
        let r = Request::post("https://x.example/")
            .header("a", "b")
            .json(&json!({"k": 1}));
        assert_eq!(r.body.as_deref(), Some(&br#"{"k":1}"#[..]));
        assert_eq!(r.headers.len(), 2);
        let resp = Response::new(201, r#"{"ok":true}"#).with_header("Content-Type", "x");
        assert!(resp.is_success());
        assert_eq!(resp.header("content-type"), Some("x"));
        assert_eq!(resp.json::<Value>().unwrap(), json!({"ok": true}));
    }
}
