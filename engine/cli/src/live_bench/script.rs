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
/// Interim captions added every this many words by default (see [`with_interims`]): at real
/// time a call then sends about 2 frames per second, as the issue of a live call does.
pub(super) const INTERIM_WORDS: usize = 1;
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
    /// The bundled recordings at `speed` times real time, with an interim caption every
    /// `interim_words` words (0: only the recordings' own frames).
    ///
    /// # Errors
    /// When a recording is missing from the bundle or has a line that is not a recording line.
    pub(super) fn load(speed: f64, interim_words: usize) -> Result<Script, String> {
        let mut parsed = Vec::with_capacity(RECORDINGS.len());
        for rel in RECORDINGS {
            let text =
                crate::bundle::file(rel).ok_or_else(|| format!("`{rel}` is not in the bundle"))?;
            parsed.push((rel, lines(rel, text, interim_words)?));
        }
        let speed = speed.max(f64::MIN_POSITIVE);
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

/// A recording's lines: (offset in ms, event text with the [`MARKER`]), with an interim
/// caption added every `interim_words` words of speech (0: none added; see [`with_interims`]).
fn lines(rel: &str, text: &str, interim_words: usize) -> Result<Vec<(u64, String)>, String> {
    let mut events = Vec::new();
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
        if event.to_string().matches(MARKER).count() != count_marked(&event) {
            return Err(bad("the frame already contains the bench's marker"));
        }
        events.push((at, event));
    }
    Ok(with_interims(events, interim_words)
        .into_iter()
        .map(|(at, event)| (at, event.to_string()))
        .collect())
}

/// The words of a `recognition_result` caption: `payload.raw.alternatives[0].words`.
fn caption_words(event: &Value) -> Option<&Vec<Value>> {
    let message = event.get("message")?;
    if message.get("type")?.as_str()? != "recognition_result" {
        return None;
    }
    message
        .pointer("/payload/raw/alternatives/0/words")?
        .as_array()
}

/// A word's `endTime` (`{"seconds": "1", "nanos": "433000000"}`, strings as Symbl sends
/// them), in milliseconds.
fn word_end_ms(word: &Value) -> Option<u64> {
    let t = word.get("endTime")?;
    let field = |k: &str| match t.get(k)? {
        Value::String(s) => s.parse::<u64>().ok(),
        v => v.as_u64(),
    };
    Some(field("seconds")? * 1000 + field("nanos")? / 1_000_000)
}

/// `caption` cut to its first `k` words: its word list, its raw and its punctuated transcript,
/// and never final.
fn cut_caption(caption: &Value, k: usize) -> Value {
    let mut c = caption.clone();
    let first_words = |s: &str| s.split_whitespace().take(k).collect::<Vec<_>>().join(" ");
    if let Some(m) = c.get_mut("message") {
        m["isFinal"] = Value::Bool(false);
        if let Some(alt) = m.pointer_mut("/payload/raw/alternatives/0") {
            if let Some(words) = alt.get_mut("words").and_then(Value::as_array_mut) {
                words.truncate(k);
            }
            if let Some(Value::String(t)) = alt.get_mut("transcript") {
                *t = first_words(t);
            }
        }
        if let Some(Value::String(t)) = m.pointer_mut("/punctuated/transcript") {
            *t = first_words(t);
        }
    }
    c
}

/// Live captions as Symbl sends them while a sentence is spoken: the recordings keep one
/// interim `recognition_result` every few seconds; this adds, before each, the captions of the
/// same utterance (same first word) every `every` words since the previous one, each at the
/// time its last word was heard (as late after it as the recorded caption is after its own),
/// never before the frame before it. `every == 0` adds nothing.
fn with_interims(events: Vec<(u64, Value)>, every: usize) -> Vec<(u64, Value)> {
    if every == 0 {
        return events;
    }
    let mut out: Vec<(u64, Value)> = Vec::with_capacity(events.len() * 3);
    // The utterance the last caption belonged to (its first word's start) and its words.
    let mut last: Option<(Value, usize)> = None;
    for (at, event) in events {
        if let Some(words) = caption_words(&event) {
            let start = words.first().and_then(|w| w.get("startTime")).cloned();
            let from = match (&last, &start) {
                (Some((s, n)), Some(start)) if s == start => *n,
                _ => 0,
            };
            let lag = words
                .last()
                .and_then(word_end_ms)
                .map(|end| at.saturating_sub(end));
            let floor = out.last().map_or(0, |(t, _)| *t);
            for k in (from + every..words.len()).step_by(every) {
                let heard = lag.and_then(|lag| Some(word_end_ms(&words[k - 1])? + lag));
                let when = heard.unwrap_or(at).max(floor).min(at);
                out.push((when, cut_caption(&event, k)));
            }
            last = start.map(|s| (s, words.len()));
        }
        out.push((at, event));
    }
    out
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
        let script = Script::load(1.0, INTERIM_WORDS).unwrap();
        assert_eq!(script.recordings.len(), RECORDINGS.len());
        let pace = script.frames_per_second();
        assert!((1.8..2.3).contains(&pace), "{pace}");
        let mean = script.mean_length().as_secs_f64();
        assert!((58.0..59.0).contains(&mean), "{mean}");
        let bare = Script::load(1.0, 0).unwrap();
        assert!((0.6..0.7).contains(&bare.frames_per_second()));

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
    fn interim_captions_grow_word_by_word_between_the_recorded_frames() {
        let bare = Script::load(1.0, 0).unwrap();
        let full = Script::load(1.0, INTERIM_WORDS).unwrap();
        for (b, f) in bare.recordings.iter().zip(&full.recordings) {
            // Every recorded frame is still sent, at its own time, in order.
            let kept: Vec<_> = f
                .frames
                .iter()
                .filter(|x| b.frames.iter().any(|y| y.text == x.text))
                .collect();
            assert_eq!(kept.len(), b.frames.len(), "{}", b.name);
            assert!(f.frames.windows(2).all(|w| w[0].at <= w[1].at));
            assert_eq!(f.length, b.length);
            let added: Vec<Value> = f
                .frames
                .iter()
                .filter(|x| !b.frames.iter().any(|y| y.text == x.text))
                .map(|x| serde_json::from_str(&x.text).unwrap())
                .collect();
            // Captions are added where the recording has word timings (not billing-dispute's).
            let timed = b.frames.iter().any(|x| {
                let v: Value = serde_json::from_str(&x.text).unwrap();
                caption_words(&v).is_some_and(|w| !w.is_empty())
            });
            assert_eq!(!added.is_empty(), timed, "{}", b.name);
            for a in &added {
                let words = caption_words(a).unwrap();
                assert_eq!(a["message"]["isFinal"], false);
                let shown = a["message"]["punctuated"]["transcript"].as_str().unwrap();
                assert_eq!(shown.split_whitespace().count(), words.len(), "{shown}");
            }
            // Each makes one event the engine counts, with no trigger of a pipeline's.
            assert!(f.frames.iter().all(|x| x.events == 1));
        }
    }

    #[test]
    fn a_caption_is_cut_to_its_first_words() {
        let caption = serde_json::json!({"type": "message", "message": {
            "type": "recognition_result", "isFinal": true,
            "payload": {"raw": {"alternatives": [{"words": [
                {"word": "Hi", "endTime": {"seconds": "1", "nanos": "433000000"}},
                {"word": "Robert", "endTime": {"seconds": "1", "nanos": "666000000"}},
                {"word": "thanks", "endTime": {"seconds": "1", "nanos": "900000000"}}],
                "transcript": "hi robert thanks"}]}},
            "punctuated": {"transcript": "Hi Robert, thanks"}}});
        let cut = cut_caption(&caption, 2);
        assert_eq!(cut["message"]["isFinal"], false);
        assert_eq!(cut["message"]["punctuated"]["transcript"], "Hi Robert,");
        assert_eq!(caption_words(&cut).unwrap().len(), 2);
        assert_eq!(
            word_end_ms(&caption_words(&caption).unwrap()[0]),
            Some(1433)
        );
        let events = vec![(2000, caption.clone())];
        let with = with_interims(events, 1);
        // Two captions added, each at its last word's end plus the recorded lag (100 ms).
        let times: Vec<u64> = with.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, vec![1533, 1766, 2000]);
    }

    #[test]
    fn an_output_trigger_matches_its_frame_whatever_the_offset() {
        let script = Script::load(1.0, 0).unwrap();
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
