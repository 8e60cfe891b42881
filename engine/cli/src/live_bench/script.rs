//! What the fake Symbl plays: the shipped recordings as Subscribe frames, each already
//! accounted for.
//!
//! Every recording line (`{"conversation", "offset_ms", "event"}`) becomes one [`Frame`]: the
//! `event` as JSON text with every `conversationId` and every string equal to the recording's
//! conversation replaced by [`MARKER`] (so each call sends it under its own id), sent at `offset_ms / speed` after the
//! call's Subscribe socket opened. Each frame is parsed once here, as the engine parses it
//! (`prompter_core::event::parse_frame`, after the Subscribe client's redelivery filter
//! `prompter_symbl::subscribe::Seen`), so the events the engine must count for a frame, and
//! the triggers an output may name, are known exactly before any call starts.

use std::time::Duration;

use prompter_core::event::parse_frame;
use prompter_core::output::{Trigger, fnv1a};
use prompter_symbl::identity::frame_identity;
use prompter_symbl::subscribe::Seen;
use serde_json::Value;

/// Stands for the call's conversation id in a frame's text.
pub(super) const MARKER: &str = "@@bench-conversation@@";
/// The recordings played, in rotation (paths in the binary's bundle).
pub(super) const RECORDINGS: [&str; 4] = [
    "pipelines/recordings/acme-discovery-call.jsonl",
    "pipelines/recordings/billing-dispute-call.jsonl",
    "pipelines/recordings/globex-renewal-call.jsonl",
    "pipelines/recordings/initech-demo-call.jsonl",
];
/// The pace the default speed gives a call, on average over the recordings.
pub(super) const FRAMES_PER_SECOND: f64 = 2.0;
/// The id frames are accounted under (any id gives the same counts: every frame of a call
/// carries the same one).
const ACCOUNTING_ID: &str = "load-accounting";

/// One frame of a recording, ready to send.
#[derive(Debug)]
pub(super) struct Frame {
    /// When to send it, after the call's first Subscribe socket opened.
    pub(super) at: Duration,
    /// The frame's JSON, the conversation id replaced by [`MARKER`].
    text: String,
    /// Events the engine makes of it (none for a frame it cannot parse or drops as a
    /// redelivery).
    pub(super) events: u32,
    /// The [`trigger_key`]s of those events.
    pub(super) triggers: Vec<u64>,
}

impl Frame {
    /// The frame as call `id` sends it.
    pub(super) fn text_for(&self, id: &str) -> String {
        self.text.replace(MARKER, id)
    }
}

/// One recording, as frames.
#[derive(Debug)]
pub(super) struct Recording {
    /// Its file name.
    pub(super) name: String,
    pub(super) frames: Vec<Frame>,
    /// The last frame's time (at the bench's speed).
    pub(super) length: Duration,
}

/// Every recording, at one speed.
#[derive(Debug)]
pub(super) struct Script {
    pub(super) recordings: Vec<Recording>,
    /// Times real time.
    pub(super) speed: f64,
}

/// What identifies an output's trigger within a call: its [`Trigger`] without the offset (the
/// engine stamps live events with its own clock), hashed.
pub(super) fn trigger_key(trigger: &Trigger) -> u64 {
    let mut t = trigger.clone();
    t.offset_ms = 0;
    fnv1a(serde_json::to_string(&t).unwrap_or_default().as_bytes())
}

impl Script {
    /// The bundled recordings at `speed` times real time, or by default at the speed that
    /// makes a call send [`FRAMES_PER_SECOND`] on average (every recording played once).
    ///
    /// # Errors
    /// When a recording is missing from the bundle or has a line that is not a recording line.
    pub(super) fn load(speed: Option<f64>) -> Result<Script, String> {
        let mut parsed = Vec::with_capacity(RECORDINGS.len());
        for rel in RECORDINGS {
            let text =
                crate::bundle::file(rel).ok_or_else(|| format!("`{rel}` is not in the bundle"))?;
            parsed.push((rel, lines(rel, text)?));
        }
        let frames: usize = parsed.iter().map(|(_, l)| l.len()).sum();
        let real_ms: u64 = parsed
            .iter()
            .map(|(_, l)| l.last().map_or(0, |(at, _)| *at))
            .sum();
        let speed = speed
            .unwrap_or(FRAMES_PER_SECOND * real_ms as f64 / 1000.0 / frames.max(1) as f64)
            .max(f64::MIN_POSITIVE);
        let recordings = parsed
            .into_iter()
            .map(|(rel, lines)| recording(rel, lines, speed))
            .collect();
        Ok(Script { recordings, speed })
    }

    /// A call's mean length, every recording played once.
    pub(super) fn mean_length(&self) -> Duration {
        let total: Duration = self.recordings.iter().map(|r| r.length).sum();
        total / self.recordings.len().max(1) as u32
    }

    /// Frames a call sends per second on average, every recording played once.
    pub(super) fn frames_per_second(&self) -> f64 {
        let frames: usize = self.recordings.iter().map(|r| r.frames.len()).sum();
        let secs: f64 = self.recordings.iter().map(|r| r.length.as_secs_f64()).sum();
        frames as f64 / secs.max(1e-9)
    }
}

/// A recording's lines: (offset in ms, event text with the [`MARKER`]).
fn lines(rel: &str, text: &str) -> Result<Vec<(u64, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| format!("{rel}:{}: {why}", i + 1);
        let v: Value = serde_json::from_str(line).map_err(|e| bad(&e.to_string()))?;
        let conversation = v["conversation"]
            .as_str()
            .ok_or_else(|| bad("no `conversation`"))?;
        let at = v["offset_ms"]
            .as_u64()
            .ok_or_else(|| bad("no `offset_ms`"))?;
        let mut event = v.get("event").cloned().ok_or_else(|| bad("no `event`"))?;
        replace_strings(&mut event, conversation);
        let text = event.to_string();
        if text.matches(MARKER).count() != count_marked(&event) {
            return Err(bad("the frame already contains the bench's marker"));
        }
        out.push((at, text));
    }
    Ok(out)
}

/// Replaces with the [`MARKER`] every `conversationId` string and every string equal to `id`
/// (the recording's conversation), anywhere in `v`: a recording's frames may carry Symbl's id
/// for the conversation rather than the recording's name for it.
fn replace_strings(v: &mut Value, id: &str) {
    match v {
        Value::String(s) if s == id => *s = MARKER.to_owned(),
        Value::Array(items) => items.iter_mut().for_each(|i| replace_strings(i, id)),
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(s) if key == "conversationId" => *s = MARKER.to_owned(),
                    _ => replace_strings(value, id),
                }
            }
        }
        _ => {}
    }
}

fn count_marked(v: &Value) -> usize {
    match v {
        Value::String(s) => usize::from(s == MARKER),
        Value::Array(items) => items.iter().map(count_marked).sum(),
        Value::Object(map) => map.values().map(count_marked).sum(),
        _ => 0,
    }
}

/// The frames of one recording, each accounted for as the engine will see it.
fn recording(rel: &str, lines: Vec<(u64, String)>, speed: f64) -> Recording {
    let mut seen = Seen::new();
    let frames: Vec<Frame> = lines
        .into_iter()
        .map(|(at_ms, text)| {
            let frame: Value =
                serde_json::from_str(&text.replace(MARKER, ACCOUNTING_ID)).unwrap_or_default();
            let mut events = Vec::new();
            if seen.first_time(frame_identity(&frame)) {
                events = parse_frame(ACCOUNTING_ID, 0, frame).unwrap_or_default();
            }
            Frame {
                at: Duration::from_secs_f64(at_ms as f64 / 1000.0 / speed),
                text,
                events: events.len() as u32,
                triggers: events
                    .iter()
                    .map(|e| trigger_key(&Trigger::from_event(e)))
                    .collect(),
            }
        })
        .collect();
    Recording {
        name: rel.rsplit('/').next().unwrap_or(rel).to_owned(),
        length: frames.last().map_or(Duration::ZERO, |f| f.at),
        frames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_recording_loads_with_its_ids_marked_and_every_frame_accounted_for() {
        let script = Script::load(None).unwrap();
        assert_eq!(script.recordings.len(), RECORDINGS.len());
        assert!((script.frames_per_second() - FRAMES_PER_SECOND).abs() < 1e-6);
        let mean = script.mean_length().as_secs_f64();
        assert!((18.0..20.0).contains(&mean), "{mean}");
        for r in &script.recordings {
            let last = r.frames.last().unwrap();
            // The last frame completes the call and names it.
            assert!(last.text.contains("conversation_completed"), "{}", r.name);
            assert!(last.text_for("load-000007").contains("\"load-000007\""));
            assert!(!last.text_for("load-000007").contains(MARKER));
            assert!(r.frames.iter().all(|f| f.events >= 1), "{}", r.name);
            assert!(r.frames.windows(2).all(|w| w[0].at <= w[1].at));
        }
    }

    #[test]
    fn an_output_trigger_matches_its_frame_whatever_the_offset() {
        let script = Script::load(Some(1.0)).unwrap();
        let frame = script.recordings[0]
            .frames
            .iter()
            .find(|f| f.text.contains("tracker_response"))
            .unwrap();
        let event = parse_frame("x", 12_345, serde_json::from_str(&frame.text).unwrap())
            .unwrap()
            .remove(0);
        let trigger = Trigger::from_event(&event);
        assert_eq!(trigger.offset_ms, 12_345);
        assert_eq!(frame.triggers[0], trigger_key(&trigger));
    }
}
