//! What pipelines deliver: self-explaining outputs.
//!
//! Every [`Output`] says what it is (`kind`), for which conversation and pipeline, what triggered
//! it, which documents it came from and how long each stage took, and has an `id` and `version`
//! so a later version of the same suggestion can update it at the sinks: a streamed answer is
//! delivered as `partial` drafts, then completed under the same id.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Detail, Event};
use crate::resource::ScoredDocument;

/// One delivered output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Stable id: `<conversation>/<pipeline>/<n>`.
    pub id: String,
    /// Version of this output; 1 for the first.
    pub version: u32,
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
    /// Extra structured data the pipeline chose to attach.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
    /// True for a draft that a later version of the same `id` completes (an answer still being
    /// generated); absent when the output is complete.
    #[serde(default, skip_serializing_if = "is_false")]
    pub partial: bool,
    /// Why the output is not what the pipeline normally delivers (the model failed or would
    /// have missed the deadline, so a fallback answered); absent when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
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
}
