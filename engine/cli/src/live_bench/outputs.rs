//! The engine's outputs as the bench reads them off the child's stdout, one JSON line per
//! output version, each stamped with the moment it was read.
//!
//! Kept compactly (a run of 10,000 calls prints about a million lines): every (id, version)
//! pair as a hash, to find duplicates; every output id's latest version and status (its
//! *card*); and for each `final` version, what the latency figures need.
//!
//! A card is named as the calibration compares it: the pipeline and, for keyed outputs (a
//! tracker's card, the questions list), the key part of the id; for outputs named after their
//! triggering event (`e-…`, whose hash includes the engine's own clock), the trigger instead.

use std::collections::{HashMap, HashSet};

use prompter_core::output::{Status, Trigger, fnv1a};
use serde::Deserialize;

use super::fakes::call_number;
use super::script::trigger_key;

/// The fields of an output line the bench reads.
#[derive(Deserialize)]
struct Line {
    id: String,
    version: u32,
    status: Status,
    conversation_id: String,
    pipeline: String,
    trigger: Trigger,
    timings: LineTimings,
}

#[derive(Deserialize)]
struct LineTimings {
    #[serde(default)]
    received_us: u64,
    #[serde(default)]
    waited_us: u64,
}

/// One `final` output version.
#[derive(Debug, Clone, Copy)]
pub(super) struct Final {
    pub(super) call: u32,
    /// Index into [`OutputLog::pipelines`].
    pub(super) pipeline: usize,
    /// The [`trigger_key`] of its trigger.
    pub(super) trigger: u64,
    /// When the bench read it, in nanoseconds since the epoch.
    pub(super) read_ns: u64,
    /// `timings.received_us - timings.waited_us`: from the trigger's receipt by the engine to
    /// the output, less the time spent waiting on the LLM and the embedder.
    pub(super) engine_us: u64,
}

/// The latest version of one output id.
#[derive(Debug, Clone, Copy)]
struct Card {
    call: u32,
    pipeline: usize,
    name: u64,
    version: u32,
    status: Status,
}

/// Everything read off the child's stdout.
#[derive(Debug, Default)]
pub(super) struct OutputLog {
    pub(super) lines: u64,
    /// Lines that are not output JSON.
    pub(super) unreadable: u64,
    /// Outputs of a conversation that is not a bench call.
    pub(super) foreign: u64,
    pub(super) drafts: u64,
    pub(super) withdrawn: u64,
    /// (id, version) pairs printed more than once.
    pub(super) duplicates: u64,
    pub(super) finals: Vec<Final>,
    /// Pipeline names, in order of first appearance.
    pub(super) pipelines: Vec<String>,
    versions: HashSet<(u64, u32)>,
    cards: HashMap<u64, Card>,
    /// Output ids (hashed) that had a `final` version.
    finalized: HashSet<u64>,
}

/// The name a card is compared by (see the module docs).
fn card_name(pipeline: &str, id: &str, trigger: &Trigger) -> u64 {
    let what = id.rsplit('/').next().unwrap_or(id);
    if what.starts_with("e-") {
        fnv1a(format!("{pipeline}/trigger/{:016x}", trigger_key(trigger)).as_bytes())
    } else {
        fnv1a(format!("{pipeline}/{what}").as_bytes())
    }
}

impl OutputLog {
    /// Takes one stdout line, read at `read_ns`.
    pub(super) fn read(&mut self, line: &str, read_ns: u64) {
        self.lines += 1;
        let Ok(o) = serde_json::from_str::<Line>(line) else {
            self.unreadable += 1;
            return;
        };
        let Some(call) = call_number(&o.conversation_id) else {
            self.foreign += 1;
            return;
        };
        let id = fnv1a(o.id.as_bytes());
        if !self.versions.insert((id, o.version)) {
            self.duplicates += 1;
            return;
        }
        let pipeline = match self.pipelines.iter().position(|p| *p == o.pipeline) {
            Some(i) => i,
            None => {
                self.pipelines.push(o.pipeline.clone());
                self.pipelines.len() - 1
            }
        };
        let card = Card {
            call,
            pipeline,
            name: card_name(&o.pipeline, &o.id, &o.trigger),
            version: o.version,
            status: o.status,
        };
        self.cards
            .entry(id)
            .and_modify(|c| {
                if c.version < card.version {
                    *c = card;
                }
            })
            .or_insert(card);
        if o.status == Status::Final {
            self.finalized.insert(id);
        }
        match o.status {
            Status::Draft => self.drafts += 1,
            Status::Withdrawn => self.withdrawn += 1,
            Status::Final => self.finals.push(Final {
                call,
                pipeline,
                trigger: trigger_key(&o.trigger),
                read_ns,
                engine_us: o.timings.received_us.saturating_sub(o.timings.waited_us),
            }),
        }
    }

    /// Outputs whose latest version is still a `draft`: begun and never finished.
    pub(super) fn unfinished(&self) -> u64 {
        self.cards
            .values()
            .filter(|c| c.status == Status::Draft)
            .count() as u64
    }

    /// How many outputs that had a `final` version pass `reached` (given the hashed id).
    pub(super) fn count_finalized(&self, reached: impl Fn(u64) -> bool) -> usize {
        self.finalized.iter().filter(|id| reached(**id)).count()
    }

    /// How many outputs had a `final` version.
    pub(super) fn finalized(&self) -> usize {
        self.finalized.len()
    }

    /// Per call, the names of its cards whose latest version is `final`.
    pub(super) fn final_cards(&self) -> HashMap<u32, HashSet<u64>> {
        let mut out: HashMap<u32, HashSet<u64>> = HashMap::new();
        for c in self.cards.values() {
            if c.status == Status::Final {
                out.entry(c.call).or_default().insert(c.name);
            }
        }
        out
    }

    /// Call `call`'s cards whose latest version is `final`, counted by pipeline.
    pub(super) fn final_cards_by_pipeline(&self, call: u32) -> Vec<(String, usize)> {
        let mut by = vec![0usize; self.pipelines.len()];
        for c in self.cards.values() {
            if c.call == call && c.status == Status::Final {
                by[c.pipeline] += 1;
            }
        }
        self.pipelines.iter().cloned().zip(by).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(id: &str, version: u32, status: &str, trigger: &str) -> String {
        format!(
            r#"{{"id":"{id}","version":{version},"status":"{status}","seq":1,"kind":"suggestion","conversation_id":"load-000003","pipeline":"rta_live","text":"x","trigger":{trigger},"sources":[],"timings":{{"stages_us":{{}},"total_us":900,"received_us":1000,"waited_us":700}}}}"#
        )
    }

    #[test]
    fn versions_cards_duplicates_and_engine_time_are_read() {
        let tracker =
            r#"{"event":"tracker_response","offset_ms":5,"tracker":"Budget","is_final":true}"#;
        let mut log = OutputLog::default();
        log.read(
            &line("load-000003/rta_live/k-budget", 1, "draft", tracker),
            10,
        );
        log.read(
            &line("load-000003/rta_live/k-budget", 2, "final", tracker),
            20,
        );
        log.read(
            &line("load-000003/rta_live/k-budget", 2, "final", tracker),
            30,
        );
        log.read("not json", 40);
        assert_eq!(log.lines, 4);
        assert_eq!((log.drafts, log.duplicates, log.unreadable), (1, 1, 1));
        assert_eq!(log.finals.len(), 1);
        assert_eq!(log.finals[0].engine_us, 300);
        assert_eq!(log.finals[0].read_ns, 20);
        assert_eq!(log.final_cards()[&3].len(), 1);
        assert_eq!(log.unfinished(), 0);
        let budget = fnv1a(b"load-000003/rta_live/k-budget");
        assert_eq!(log.count_finalized(|id| id == budget), 1);
        assert_eq!(log.finalized(), 1);
        log.read(
            &line("load-000003/rta_live/k-other", 1, "draft", tracker),
            45,
        );
        assert_eq!(log.unfinished(), 1);
        assert_eq!(
            log.final_cards_by_pipeline(3),
            vec![("rta_live".to_owned(), 1)]
        );
        // A later withdrawal takes the card back.
        log.read(
            &line("load-000003/rta_live/k-budget", 3, "withdrawn", tracker),
            50,
        );
        assert!(!log.final_cards().contains_key(&3));
    }

    #[test]
    fn cards_named_after_their_event_are_compared_by_trigger_not_by_id() {
        let t = Trigger {
            event: "conversation_completed".into(),
            offset_ms: 1,
            ..Trigger::default()
        };
        let later = Trigger {
            offset_ms: 99,
            ..t.clone()
        };
        assert_eq!(
            card_name("call_recap", "c/call_recap/e-0000000000000001", &t),
            card_name("call_recap", "c/call_recap/e-00000000000000ff", &later)
        );
        assert_ne!(
            card_name("rta_live", "c/rta_live/k-budget", &t),
            card_name("rta_live", "c/rta_live/k-timing", &t)
        );
    }
}
