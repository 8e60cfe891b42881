//! `escalation-gate`: a Prompter stage that alerts a supervisor when the customer stays negative
//! for several sentences in a row.
//!
//! For each finalized customer sentence that carries a sentiment, a per-conversation streak
//! (in kv) grows when the sentiment is below `threshold` and resets otherwise. When it reaches
//! `window`, the stage raises one `alert` per conversation quoting the customer's last `window`
//! lines. Speakers whose user id or name contains `agent_pattern` are agents; everyone else is
//! the customer.

use prompter_sdk::prelude::*;
use serde::Deserialize;
use serde_json::json;

const STREAK_KEY: &str = "negative_streak";
const ALERTED_KEY: &str = "escalation_alerted";

/// The stage config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Consecutive negative customer sentences that trigger the alert. Default 3.
    #[serde(default = "default_window")]
    pub window: u32,
    /// Sentiment polarity (-1..1) below which a sentence is negative. Default -0.3.
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// A speaker whose user id or name contains this is an agent. Default `@`.
    #[serde(default = "default_agent_pattern")]
    pub agent_pattern: String,
}

fn default_window() -> u32 {
    3
}

fn default_threshold() -> f64 {
    -0.3
}

fn default_agent_pattern() -> String {
    "@".to_owned()
}

/// The stage.
#[derive(Debug)]
pub struct EscalationGate {
    cfg: Config,
}

impl EscalationGate {
    fn is_agent(&self, speaker: &Speaker) -> bool {
        speaker.matches(&self.cfg.agent_pattern)
    }

    fn alert(&self, speaker: &Speaker, streak: u32, conversation: &Conversation) -> Notice {
        let window = self.cfg.window as usize;
        let customer_lines: Vec<&TranscriptLine> = conversation
            .transcript
            .iter()
            .filter(|l| !l.is_from(&self.cfg.agent_pattern))
            .collect();
        let quoted = &customer_lines[customer_lines.len().saturating_sub(window)..];
        let name = speaker.label();
        let sentences = if streak == 1 { "sentence" } else { "sentences" };
        let mut text = format!(
            "{name} has been negative for {streak} {sentences} in a row. Consider stepping in."
        );
        for line in quoted {
            text.push_str(&format!("\n> {}", line.text));
        }
        Notice::alert("Escalate: customer frustrated", text).data(json!({
            "speaker": name,
            "user_id": speaker.user_id,
            "streak": streak,
            "threshold": self.cfg.threshold,
            "lines": quoted.iter().map(|l| &l.text).collect::<Vec<_>>(),
        }))
    }
}

impl Plugin for EscalationGate {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if config.window == 0 {
            return Err(Error::config_at("window", "must be at least 1"));
        }
        if !(-1.0..=1.0).contains(&config.threshold) {
            return Err(Error::config_at(
                "threshold",
                format!("{} is outside the sentiment range -1..1", config.threshold),
            ));
        }
        if config.agent_pattern.is_empty() {
            return Err(Error::config_at(
                "agent_pattern",
                "must not be empty (it would make everyone an agent)",
            ));
        }
        Ok(EscalationGate { cfg: config })
    }

    fn process(&mut self, event: &Event, conversation: &Conversation) -> Result<Outcome, Error> {
        let streak: u32 = kv::get_json(STREAK_KEY).unwrap_or(0);
        let customer_sentiment = event
            .message()
            .filter(|m| event.is(kinds::MESSAGE_RESPONSE) && !self.is_agent(&m.speaker))
            .and_then(|m| m.sentiment.map(|s| (m, s)));
        let Some((message, sentiment)) = customer_sentiment else {
            return Ok(Outcome::next(json!({ "streak": streak })));
        };

        let streak = if sentiment < self.cfg.threshold {
            streak + 1
        } else {
            0
        };
        kv::set_json(STREAK_KEY, &streak).map_err(Error::external)?;

        let mut alerted = kv::flag(ALERTED_KEY);
        let mut notice = None;
        if streak >= self.cfg.window && !alerted {
            kv::set_flag(ALERTED_KEY).map_err(Error::external)?;
            alerted = true;
            log::info(format!("escalating: {streak} negative customer sentences"));
            notice = Some(self.alert(&message.speaker, streak, conversation));
        }
        Ok(Outcome::next(json!({ "streak": streak, "alerted": alerted })).notify_opt(notice))
    }
}

export_plugin!(EscalationGate);

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_sdk::testing::{self, Harness};

    const AGENT: Option<&str> = Some("sam@acme.com");

    fn gate() -> Harness<EscalationGate> {
        Harness::new(json!({})).unwrap()
    }

    fn customer(h: &mut Harness<EscalationGate>, at: u64, text: &str, s: f64) -> Outcome {
        h.say(at, "Jane", Some("+14155550123"), text, Some(s))
            .unwrap()
    }

    #[test]
    fn alerts_once_after_three_negative_customer_sentences() {
        let mut h = gate();
        h.say(
            500,
            "Sam",
            AGENT,
            "Thanks for calling, how can I help?",
            Some(0.6),
        )
        .unwrap();
        let out = customer(&mut h, 1_000, "My internet has been down for a week.", -0.5);
        assert_eq!(out.output(), Some(&json!({"streak": 1, "alerted": false})));
        // The agent's sentences neither count nor reset.
        let out = h
            .say(1_500, "Sam", AGENT, "I'm sorry to hear that.", Some(-0.8))
            .unwrap();
        assert_eq!(out.output(), Some(&json!({"streak": 1})));
        customer(&mut h, 2_000, "Nobody called me back.", -0.6);
        let out = customer(&mut h, 3_000, "This is ridiculous.", -0.9);
        assert_eq!(out.output(), Some(&json!({"streak": 3, "alerted": true})));
        let [notice] = out.notices() else {
            panic!("one notice: {out:?}")
        };
        assert_eq!(notice.kind, "alert");
        assert_eq!(
            notice.title.as_deref(),
            Some("Escalate: customer frustrated")
        );
        assert!(
            notice
                .text
                .starts_with("Jane has been negative for 3 sentences in a row.")
        );
        assert!(notice.text.contains("> My internet has been down for a week.\n> Nobody called me back.\n> This is ridiculous."), "{}", notice.text);
        assert!(!notice.text.contains("sorry"));
        assert_eq!(notice.data_value().unwrap()["streak"], 3);

        // Still negative: no second alert.
        let out = customer(&mut h, 4_000, "Unbelievable.", -0.9);
        assert_eq!(out.output(), Some(&json!({"streak": 4, "alerted": true})));
        assert!(out.notices().is_empty());
    }

    #[test]
    fn a_neutral_sentence_resets_and_state_survives_recycling() {
        let mut h = gate();
        customer(&mut h, 1_000, "Bad.", -0.5);
        customer(&mut h, 2_000, "Worse.", -0.5);
        h.recycle().unwrap();
        let out = customer(&mut h, 3_000, "OK, fine.", 0.0);
        assert_eq!(out.output(), Some(&json!({"streak": 0, "alerted": false})));
        customer(&mut h, 4_000, "Bad.", -0.5);
        customer(&mut h, 5_000, "Bad.", -0.5);
        h.recycle().unwrap();
        let out = customer(&mut h, 6_000, "Bad.", -0.31);
        assert_eq!(out.notices().len(), 1);
        assert_eq!(
            testing::kv_contents().get(STREAK_KEY).map(String::as_str),
            Some("3")
        );
    }

    #[test]
    fn sentences_without_sentiment_and_other_events_only_report() {
        let mut h = gate();
        customer(&mut h, 1_000, "Bad.", -0.5);
        let out = h.say(2_000, "Jane", None, "Hmm.", None).unwrap();
        assert_eq!(out.output(), Some(&json!({"streak": 1})));
        let out = h
            .process(&testing::tracker_event(
                "c",
                3_000,
                "Churn",
                "cancel",
                &["I will cancel"],
            ))
            .unwrap();
        assert_eq!(out.output(), Some(&json!({"streak": 1})));
    }

    #[test]
    fn custom_window_threshold_and_pattern() {
        let mut h = Harness::<EscalationGate>::new(
            json!({"window": 1, "threshold": 0.0, "agent_pattern": "Agent"}),
        )
        .unwrap();
        let out = h
            .say(1_000, "Agent Smith", None, "Hello.", Some(-0.9))
            .unwrap();
        assert!(out.notices().is_empty());
        let out = h
            .say(2_000, "", Some("caller@example.com"), "Meh.", Some(-0.1))
            .unwrap();
        assert_eq!(out.notices().len(), 1);
        assert!(
            out.notices()[0]
                .text
                .starts_with("caller@example.com has been negative for 1 sentence ")
        );
    }

    #[test]
    fn config_errors() {
        let e = testing::init::<EscalationGate>(json!({"window": 0})).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_deref()),
            (ErrorKind::Config, Some("window"))
        );
        let e = testing::init::<EscalationGate>(json!({"window": -1})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("window"));
        let e = testing::init::<EscalationGate>(json!({"threshold": 2})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("threshold"));
        let e = testing::init::<EscalationGate>(json!({"agent_pattern": ""})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("agent_pattern"));
        let e = testing::init::<EscalationGate>(json!({"windw": 2})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("windw"));
    }
}
