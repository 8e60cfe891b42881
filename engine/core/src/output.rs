//! What pipelines deliver: self-explaining outputs, and their lifecycle.
//!
//! Every [`Output`] says what it is (`kind`), for which conversation and pipeline, what triggered
//! it, which documents it came from and how long each stage took. Its `id` is stable and
//! URL-safe, derived from the conversation, the pipeline and what the output is about (see
//! [`output_id`]), so the same input gives the same id in any process. Its `version` grows with
//! every update and its [`Status`] says whether it is a `draft` (an answer still being written),
//! `final`, or `withdrawn` (superseded; sinks remove it). `seq` orders every delivery of one
//! conversation. The engine, not the stage, assigns `version` and `seq` when it delivers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Detail, Event};
use crate::resource::ScoredDocument;

/// One delivered output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Output {
    /// Stable, URL-safe id: `<conversation>/<pipeline>/<what>` (see [`output_id`]).
    pub id: String,
    /// Version of this output; 1 for the first. Assigned by the engine on delivery.
    pub version: u32,
    /// Draft, final or withdrawn.
    pub status: Status,
    /// Position among every delivery of this conversation (1, 2, ...). Assigned by the engine.
    pub seq: u64,
    /// What it is: `suggestion`, `open_questions`, `summary`, ...
    pub kind: String,
    /// The conversation it belongs to.
    pub conversation_id: String,
    /// The pipeline that produced it.
    pub pipeline: String,
    /// Optional title for cards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The text the agent sees.
    pub text: String,
    /// What triggered it.
    pub trigger: Trigger,
    /// The documents it was built from.
    pub sources: Vec<ScoredDocument>,
    /// How long each stage took.
    pub timings: Timings,
    /// The model that answered (`provider:model`, or the provider alone when it names no
    /// model); absent when no model took part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Extra structured data the pipeline chose to attach.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    /// Why the output is not what the pipeline normally delivers (the model failed or would
    /// have missed the deadline, so a fallback answered); absent when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// The configuration generation that produced it (1 for the config the engine started
    /// with, +1 per reload); set by the engine on delivery, absent when 0 (not delivered).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Where an output is in its lifecycle.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Still being written: a later version of the same id follows.
    Draft,
    /// Complete.
    #[default]
    Final,
    /// Taken back (superseded by a newer trigger): sinks remove it.
    Withdrawn,
}

impl Status {
    /// The name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Final => "final",
            Status::Withdrawn => "withdrawn",
        }
    }
}

/// The id of an output: `<conversation>/<pipeline>/<what>`, every part URL-safe.
///
/// `what` is the output's key made URL-safe ([`slug`]); keyed outputs (`k-...`) and outputs
/// named after their triggering event (`e-...`) never collide.
pub fn output_id(conversation: &str, pipeline: &str, what: &str) -> String {
    let mut id = String::with_capacity(conversation.len() + pipeline.len() + what.len() + 2);
    push_url_safe(&mut id, conversation);
    id.push('/');
    push_url_safe(&mut id, pipeline);
    id.push('/');
    id.push_str(what);
    id
}

/// A key as a URL-safe id part: `k-` then its lowercase letters and digits with runs of spaces,
/// `-` and `_` as one `-`, at most 48 of them (`Budget Constraints` → `k-budget-constraints`).
/// Keys are thus compared by their words, whatever the case and separators; when a key has
/// other characters or is cut short, a short hash of it follows so such keys stay distinct.
pub fn slug(key: &str) -> String {
    let mut out = String::with_capacity(key.len().min(64) + 2);
    out.push_str("k-");
    let mut dash = false;
    let mut n = 0;
    for c in key.chars() {
        if n >= 48 {
            break;
        }
        if c.is_ascii_alphanumeric() {
            if dash && n > 0 {
                out.push('-');
                n += 1;
            }
            dash = false;
            out.push(c.to_ascii_lowercase());
            n += 1;
        } else {
            dash = true;
        }
    }
    let plain = n < 48
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'-' | b'_'));
    if !plain {
        out.push_str(&format!("-{:08x}", fnv1a(key.as_bytes()) as u32));
    }
    out
}

/// The id part of an output named after its triggering event: `e-` and 16 hex digits.
pub fn event_part(identity: u64) -> String {
    format!("e-{identity:016x}")
}

/// FNV-1a, 64 bits: a stable hash (the same in every process and version), for ids.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn push_url_safe(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'#') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// What triggered an output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Trigger {
    /// The event kind (`tracker_response`, ...).
    pub event: String,
    /// Milliseconds since the call started.
    pub offset_ms: u64,
    /// For trackers: the tracker name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracker: Option<String>,
    /// For trackers: the matched phrases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phrases: Vec<String>,
    /// For trackers: whether the detection was final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_final: Option<bool>,
    /// For insights, messages and topics: their text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Trigger {
    /// Describes `event` as a trigger.
    pub fn from_event(event: &Event) -> Trigger {
        let mut t = Trigger {
            event: event.kind.as_str().to_owned(),
            offset_ms: event.offset_ms,
            ..Default::default()
        };
        match &event.detail {
            Detail::Tracker(hit) => {
                t.tracker = Some(hit.name.clone());
                t.phrases = hit.phrases();
                t.is_final = Some(hit.is_final);
            }
            Detail::Insight(i) => t.text = Some(i.text.clone()),
            Detail::Message(m) => t.text = Some(m.text.clone()),
            Detail::Topic(topic) => t.text = Some(topic.phrases.clone()),
            Detail::Caption(c) => t.text = Some(c.text.clone()),
            Detail::Feedback(f) => t.text = Some(f.action.clone()),
            _ => {}
        }
        t
    }
}

/// Per-stage durations in microseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Timings {
    /// Stage id → microseconds, for the stages that ran before the output was emitted.
    pub stages_us: BTreeMap<String, u64>,
    /// Microseconds from the start of the pipeline run to the emission.
    pub total_us: u64,
    /// Microseconds from the triggering event's receipt by the engine to the emission (the
    /// run's `total_us` plus the time the event waited for its run to start).
    #[serde(default)]
    pub received_us: u64,
    /// Microseconds the run's finished stages spent waiting on providers (LLM and embedder
    /// calls) before the emission: `received_us - waited_us` is the engine's own time.
    #[serde(default)]
    pub waited_us: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_url_safe_and_keys_never_collide_with_event_ids() {
        assert_eq!(
            output_id("acme-001", "rta", &slug("budget")),
            "acme-001/rta/k-budget"
        );
        let id = output_id("a b/c", "rta", &slug("Budget Constraints"));
        assert_eq!(id, "a%20b%2Fc/rta/k-budget-constraints");
        assert_eq!(
            slug("Budget"),
            slug("budget"),
            "the same words are the same card"
        );
        assert_ne!(slug("a/b"), slug("a b"));
        assert!(slug("a/b").starts_with("k-a-b-"));
        assert!(slug(&"x".repeat(1000)).len() < 64);
        assert!(event_part(7).starts_with("e-"));
    }
}
