//! `compliance-checker`: a Prompter stage that alerts when the agent has not given the recording
//! disclosure early enough.
//!
//! When an agent's finalized sentence contains one of `phrases` (case-insensitive, whitespace
//! normalized), the conversation is marked disclosed (in kv). On every event, if the call is
//! past `within_secs` and no disclosure was heard, the stage raises one `alert` per
//! conversation. Speakers whose user id or name contains `agent_pattern` are agents.

use prompter_sdk::prelude::*;
use serde::Deserialize;
use serde_json::json;

const DISCLOSED_KEY: &str = "disclosed";
const ALERTED_KEY: &str = "alerted";

/// The stage config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Any one of these satisfies the requirement. Default: "this call is recorded", "this call
    /// may be recorded".
    #[serde(default = "default_phrases")]
    pub phrases: Vec<String>,
    /// How long into the call the agent has to say it. Default 30.
    #[serde(default = "default_within_secs")]
    pub within_secs: u64,
    /// A speaker whose user id or name contains this is an agent. Default `@`.
    #[serde(default = "default_agent_pattern")]
    pub agent_pattern: String,
}

fn default_phrases() -> Vec<String> {
    vec![
        "this call is recorded".to_owned(),
        "this call may be recorded".to_owned(),
    ]
}

fn default_within_secs() -> u64 {
    30
}

fn default_agent_pattern() -> String {
    "@".to_owned()
}

/// Lower case, runs of whitespace collapsed to one space, trimmed.
pub fn normalize(text: &str) -> String {
    text.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The stage.
#[derive(Debug)]
pub struct ComplianceChecker {
    cfg: Config,
    /// `cfg.phrases`, normalized.
    phrases: Vec<String>,
}

impl ComplianceChecker {
    fn discloses(&self, text: &str) -> bool {
        let text = normalize(text);
        self.phrases.iter().any(|p| text.contains(p.as_str()))
    }

    fn alert(&self, offset_ms: u64) -> Notice {
        let wanted = self
            .cfg
            .phrases
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(" or ");
        Notice::alert(
            "Compliance: recording disclosure missing",
            format!(
                "The agent has not said a required phrase ({wanted}) within the first {} s.",
                self.cfg.within_secs
            ),
        )
        .data(json!({
            "phrases": self.cfg.phrases,
            "within_secs": self.cfg.within_secs,
            "offset_ms": offset_ms,
        }))
    }
}

impl Plugin for ComplianceChecker {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if config.phrases.is_empty() {
            return Err(Error::config_at("phrases", "list at least one phrase"));
        }
        let phrases: Vec<String> = config.phrases.iter().map(|p| normalize(p)).collect();
        if let Some(i) = phrases.iter().position(String::is_empty) {
            return Err(Error::config_at(
                format!("phrases.{i}"),
                "must not be empty",
            ));
        }
        if config.agent_pattern.is_empty() {
            return Err(Error::config_at(
                "agent_pattern",
                "must not be empty (it would make everyone an agent)",
            ));
        }
        Ok(ComplianceChecker {
            cfg: config,
            phrases,
        })
    }

    fn process(&mut self, event: &Event, _conversation: &Conversation) -> Result<Outcome, Error> {
        let mut disclosed = kv::flag(DISCLOSED_KEY);
        let agent_disclosure = event
            .message()
            .filter(|_| event.is(kinds::MESSAGE_RESPONSE))
            .is_some_and(|m| m.speaker.matches(&self.cfg.agent_pattern) && self.discloses(&m.text));
        if !disclosed && agent_disclosure {
            kv::set_flag(DISCLOSED_KEY).map_err(Error::external)?;
            disclosed = true;
        }

        let mut alerted = kv::flag(ALERTED_KEY);
        let mut notice = None;
        let deadline_ms = self.cfg.within_secs.saturating_mul(1000);
        if !disclosed && !alerted && event.offset_ms > deadline_ms {
            kv::set_flag(ALERTED_KEY).map_err(Error::external)?;
            alerted = true;
            log::warn(format!(
                "no recording disclosure within {} s",
                self.cfg.within_secs
            ));
            notice = Some(self.alert(event.offset_ms));
        }
        Ok(Outcome::next(json!({ "disclosed": disclosed, "alerted": alerted })).notify_opt(notice))
    }
}

export_plugin!(ComplianceChecker);

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_sdk::testing::{self, Harness};

    const AGENT: Option<&str> = Some("sam@acme.com");

    fn checker() -> Harness<ComplianceChecker> {
        Harness::new(json!({})).unwrap()
    }

    fn state(out: &Outcome) -> (bool, bool, usize) {
        let o = out.output().unwrap();
        (
            o["disclosed"].as_bool().unwrap(),
            o["alerted"].as_bool().unwrap(),
            out.notices().len(),
        )
    }

    #[test]
    fn a_timely_disclosure_prevents_the_alert() {
        let mut h = checker();
        let out = h
            .say(
                2_000,
                "Sam",
                AGENT,
                "Hi, before we start:   THIS call\tis Recorded.",
                None,
            )
            .unwrap();
        assert_eq!(state(&out), (true, false, 0));
        let out = h.say(45_000, "Jane", None, "Fine.", None).unwrap();
        assert_eq!(state(&out), (true, false, 0));
        let out = h.process(&testing::completed_event("c", 90_000)).unwrap();
        assert_eq!(state(&out), (true, false, 0));
    }

    #[test]
    fn alerts_once_when_the_deadline_passes() {
        let mut h = checker();
        let out = h
            .say(5_000, "Sam", AGENT, "Hello, how can I help?", None)
            .unwrap();
        assert_eq!(state(&out), (false, false, 0));
        // The customer saying it does not count.
        let out = h
            .say(29_000, "Jane", None, "Is this call recorded?", None)
            .unwrap();
        assert_eq!(state(&out), (false, false, 0));
        let out = h.say(30_500, "Jane", None, "Hello?", None).unwrap();
        assert_eq!(state(&out), (false, true, 1));
        let n = &out.notices()[0];
        assert_eq!(n.kind, "alert");
        assert_eq!(
            n.title.as_deref(),
            Some("Compliance: recording disclosure missing")
        );
        assert_eq!(
            n.text,
            "The agent has not said a required phrase (\"this call is recorded\" or \"this call may be recorded\") within the first 30 s."
        );
        h.recycle().unwrap();
        let out = h.process(&testing::completed_event("c", 60_000)).unwrap();
        assert_eq!(state(&out), (false, true, 0));
    }

    #[test]
    fn the_completion_event_also_triggers() {
        let mut h = Harness::<ComplianceChecker>::new(
            json!({"phrases": ["recorded line"], "within_secs": 10, "agent_pattern": "Agent"}),
        )
        .unwrap();
        h.say(1_000, "Agent", None, "Hi.", None).unwrap();
        let out = h.process(&testing::completed_event("c", 12_000)).unwrap();
        assert_eq!(state(&out), (false, true, 1));
        assert!(
            out.notices()[0]
                .text
                .contains("(\"recorded line\") within the first 10 s.")
        );
    }

    #[test]
    fn config_errors() {
        let e = testing::init::<ComplianceChecker>(json!({"phrases": []})).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_deref()),
            (ErrorKind::Config, Some("phrases"))
        );
        let e = testing::init::<ComplianceChecker>(json!({"phrases": ["ok", "  "]})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("phrases.1"));
        let e = testing::init::<ComplianceChecker>(json!({"phrases": ["ok", 2]})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("phrases.1"));
        let e = testing::init::<ComplianceChecker>(json!({"within_secs": "soon"})).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("within_secs"));
    }
}
