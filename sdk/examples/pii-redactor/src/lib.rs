//! `pii-redactor`: a Prompter stage that masks payment card numbers, phone numbers and e-mail
//! addresses in the conversation transcript, so later stages (an LLM prompt, a webhook) never
//! see them.
//!
//! On any event it outputs
//! `{"transcript": [{"speaker", "text", "offset_ms"}, ...], "redactions": N, "text": ...}`:
//! the whole transcript with every match replaced by the mask, how many matches were masked,
//! and the event's own text (sentence, caption, insight, topic) redacted when it has one.
//! `redactions` counts the transcript's matches plus, for events whose text is not a transcript
//! line (captions, insights, topics), the text's.

pub mod redact;

use prompter_sdk::prelude::*;
use serde::Deserialize;
use serde_json::json;

pub use redact::{Kind, Redactor};

/// The stage config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What replaces each match. Default `[redacted]`.
    #[serde(default = "default_mask")]
    pub mask: String,
    /// What to look for. Default: all of `card`, `phone`, `email`.
    #[serde(default = "default_kinds")]
    pub kinds: Vec<Kind>,
}

fn default_mask() -> String {
    "[redacted]".to_owned()
}

fn default_kinds() -> Vec<Kind> {
    vec![Kind::Card, Kind::Phone, Kind::Email]
}

/// The stage.
#[derive(Debug)]
pub struct PiiRedactor {
    redactor: Redactor,
}

impl Plugin for PiiRedactor {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if config.kinds.is_empty() {
            return Err(Error::config_at(
                "kinds",
                "list at least one of `card`, `phone`, `email` (or leave `kinds` out for all)",
            ));
        }
        Ok(PiiRedactor {
            redactor: Redactor::new(&config.mask, &config.kinds),
        })
    }

    fn process(&mut self, event: &Event, conversation: &Conversation) -> Result<Outcome, Error> {
        let mut redactions = 0;
        let transcript: Vec<_> = conversation
            .transcript
            .iter()
            .map(|line| {
                let (text, n) = self.redactor.redact(&line.text);
                redactions += n;
                json!({ "speaker": line.speaker, "text": text, "offset_ms": line.offset_ms })
            })
            .collect();
        let mut output = json!({ "transcript": transcript });
        if let Some(text) = event.text() {
            let (text, n) = self.redactor.redact(text);
            // A message_response's sentence is already the transcript's last line.
            if event.message().is_none() {
                redactions += n;
            }
            output["text"] = text.into();
        }
        output["redactions"] = redactions.into();
        Ok(Outcome::next(output))
    }
}

export_plugin!(PiiRedactor);

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_sdk::testing::{self, Harness};

    #[test]
    fn redacts_the_whole_transcript_and_the_event_text() {
        let mut h = Harness::<PiiRedactor>::new(json!({})).unwrap();
        h.say(
            1_000,
            "Agent",
            Some("agent@acme.com"),
            "How can I help?",
            None,
        )
        .unwrap();
        h.say(2_000, "Jane", None, "My email is jane@example.com.", None)
            .unwrap();
        let out = h
            .say(
                3_000,
                "Jane",
                None,
                "Card 4111 1111 1111 1111, phone (415) 555-0123.",
                None,
            )
            .unwrap();
        let out = out.output().unwrap();
        assert_eq!(
            out["transcript"],
            json!([
                {"speaker": "Agent", "text": "How can I help?", "offset_ms": 1000},
                {"speaker": "Jane", "text": "My email is [redacted].", "offset_ms": 2000},
                {"speaker": "Jane", "text": "Card [redacted], phone [redacted].", "offset_ms": 3000},
            ])
        );
        assert_eq!(out["redactions"], 3);
        assert_eq!(out["text"], "Card [redacted], phone [redacted].");
    }

    #[test]
    fn captions_count_and_lifecycle_events_have_no_text() {
        let mut h =
            Harness::<PiiRedactor>::new(json!({ "mask": "***", "kinds": ["phone"] })).unwrap();
        let out = h
            .process(&testing::caption_event(
                "c",
                10,
                "Jane",
                "it's 415.555.0123",
                false,
            ))
            .unwrap();
        assert_eq!(
            out.output().unwrap(),
            &json!({"transcript": [], "text": "it's ***", "redactions": 1})
        );
        let out = h.process(&testing::completed_event("c", 20)).unwrap();
        assert_eq!(
            out.output().unwrap(),
            &json!({"transcript": [], "redactions": 0})
        );
    }

    #[test]
    fn config_errors() {
        let e = testing::init::<PiiRedactor>(json!({ "kinds": ["card", "ssn"] })).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("kinds.1"));
        assert!(e.message.contains("unknown variant `ssn`"), "{}", e.message);
        let e = testing::init::<PiiRedactor>(json!({ "kinds": [] })).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("kinds"));
        let e = testing::init::<PiiRedactor>(json!({ "mask": 3 })).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("mask"));
    }
}
