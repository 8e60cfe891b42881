//! The fast path for live captions (`message` / `recognition_result`): most of a live call's
//! frames, each carrying a timing for every word heard so far. Building their JSON tree (a map
//! per word and per time) cost more than everything else the engine did with a frame, so a
//! caption in the usual shape is read straight into its [`Caption`] and the few fields its
//! identity needs, skipping the words but the first one's start and the last one's end; its
//! text is kept as a [`RawFrame`] and parsed whole only if a template or a plugin reads
//! `event.raw`.
//!
//! Anything unusual (another frame kind, a field of an unexpected type, a repeated key) gives
//! `None` and the caller takes the general path. Both paths give the same event and the same
//! [`CaptionKey`] for every frame the fast one takes (tested below on the shipped recordings
//! and on mutated frames).

use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use serde_json::value::RawValue;

use super::{Caption, Detail, Event, EventKind, RawFrame, parse_speaker};

/// What identifies a caption frame (`prompter_symbl::identity` hashes it), as the JSON values
/// found in the frame (`Some(Null)` for an explicit `null`, `None` for a missing field).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CaptionKey {
    /// `sequenceNumber` of the frame, else of `message`.
    pub sequence: Option<Value>,
    /// `message.isFinal`.
    pub is_final: Option<Value>,
    /// `message.punctuated.transcript`, else `message.payload.raw.alternatives[0].transcript`.
    pub transcript: Option<Value>,
    /// `message.user`.
    pub user: Option<Value>,
    /// The first word's `startTime` and the last word's `endTime`
    /// (`message.payload.raw.alternatives[0].words`): two captions of the same words said at
    /// different times are different frames.
    pub span: (Option<Value>, Option<Value>),
}

impl CaptionKey {
    /// The key of a caption frame's JSON tree; `None` when `frame` is not a
    /// `message`/`recognition_result`.
    pub fn of_tree(frame: &Value) -> Option<CaptionKey> {
        let message = frame.get("message")?;
        if frame.get("type")? != "message" || message.get("type")? != "recognition_result" {
            return None;
        }
        let first = message.pointer("/payload/raw/alternatives/0");
        let words = first.and_then(|a| a.get("words")).and_then(Value::as_array);
        Some(CaptionKey {
            sequence: frame
                .get("sequenceNumber")
                .or_else(|| message.get("sequenceNumber"))
                .cloned(),
            is_final: message.get("isFinal").cloned(),
            transcript: message
                .get("punctuated")
                .and_then(|p| p.get("transcript"))
                .or_else(|| first.and_then(|a| a.get("transcript")))
                .cloned(),
            user: message.get("user").cloned(),
            span: (
                words
                    .and_then(|w| w.first())
                    .and_then(|w| w.get("startTime"))
                    .cloned(),
                words
                    .and_then(|w| w.last())
                    .and_then(|w| w.get("endTime"))
                    .cloned(),
            ),
        })
    }
}

/// A caption frame read on the fast path.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptionFrame {
    /// What identifies it.
    pub key: CaptionKey,
    caption: Caption,
    raw: Arc<RawFrame>,
}

impl CaptionFrame {
    /// `text` read as a caption frame, when it is one in the usual shape (see the module
    /// docs); `None` sends it down the general path.
    pub fn parse(text: &str) -> Option<CaptionFrame> {
        // Most other frames are turned away before any parse.
        if !text.contains("recognition_result") {
            return None;
        }
        let f: FrameIn<'_> = serde_json::from_str(text).ok()?;
        if f.kind != "message" || f.message.kind != "recognition_result" {
            return None;
        }
        let m = f.message;
        let alt = m
            .payload
            .and_then(|p| p.raw)
            .and_then(|r| r.alternatives)
            .and_then(|a| a.first);
        let (alt_transcript, words) = match alt {
            Some(a) => (a.transcript, a.words),
            None => (None, None),
        };
        let punctuated = m.punctuated.as_ref().and_then(|p| p.get("transcript"));
        let text_of = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let caption = Caption {
            speaker: m.user.as_ref().map(parse_speaker),
            text: text_of(punctuated)
                .or_else(|| text_of(alt_transcript.as_ref()))
                .unwrap_or_default(),
            is_final: m
                .is_final
                .as_ref()
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        let time = |raw: Option<&RawValue>| -> Option<Option<Value>> {
            match raw {
                None => Some(None),
                Some(r) => serde_json::from_str::<Value>(r.get()).ok().map(Some),
            }
        };
        let (start, end) = words.map_or((None, None), |w| (w.start, w.end));
        let key = CaptionKey {
            sequence: f.sequence.or(m.sequence),
            is_final: m.is_final,
            transcript: punctuated.cloned().or(alt_transcript),
            user: m.user,
            span: (time(start)?, time(end)?),
        };
        Some(CaptionFrame {
            key,
            caption,
            raw: Arc::new(RawFrame::text(text)),
        })
    }

    /// The frame, kept for `event.raw`.
    pub fn raw(&self) -> &RawFrame {
        &self.raw
    }

    /// Its event, in conversation `conversation_id` at `offset_ms`.
    pub fn into_event(self, conversation_id: Arc<str>, offset_ms: u64) -> Event {
        Event {
            conversation_id,
            offset_ms,
            kind: EventKind::RecognitionResult,
            detail: Detail::Caption(self.caption),
            raw: self.raw,
            received: std::time::Instant::now(),
        }
    }
}

/// A field that is there, `null` included (`Some(Null)`), as the tree's `get` sees it; a
/// missing one is `None` (`#[serde(default)]`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// [`present`] for a field kept unparsed.
fn present_raw<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<&'a RawValue>, D::Error> {
    <&'a RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct FrameIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    message: MessageIn<'a>,
    #[serde(rename = "sequenceNumber", default, deserialize_with = "present")]
    sequence: Option<Value>,
}

#[derive(Deserialize)]
struct MessageIn<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(rename = "isFinal", default, deserialize_with = "present")]
    is_final: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    punctuated: Option<Value>,
    #[serde(default, borrow)]
    payload: Option<PayloadIn<'a>>,
    #[serde(default, deserialize_with = "present")]
    user: Option<Value>,
    #[serde(rename = "sequenceNumber", default, deserialize_with = "present")]
    sequence: Option<Value>,
}

#[derive(Deserialize)]
struct PayloadIn<'a> {
    #[serde(default, borrow)]
    raw: Option<RawIn<'a>>,
}

#[derive(Deserialize)]
struct RawIn<'a> {
    #[serde(default, borrow)]
    alternatives: Option<Alternatives<'a>>,
}

/// `alternatives`: the first is read, the others skipped.
struct Alternatives<'a> {
    first: Option<AlternativeIn<'a>>,
}

#[derive(Deserialize)]
struct AlternativeIn<'a> {
    #[serde(default, deserialize_with = "present")]
    transcript: Option<Value>,
    #[serde(default, borrow)]
    words: Option<Words<'a>>,
}

/// `words`: the first word's `startTime` and the last word's `endTime`, unparsed; the rest
/// skipped.
#[derive(Default)]
struct Words<'a> {
    start: Option<&'a RawValue>,
    end: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WordIn<'a> {
    #[serde(
        rename = "startTime",
        default,
        borrow,
        deserialize_with = "present_raw"
    )]
    start: Option<&'a RawValue>,
    #[serde(rename = "endTime", default, borrow, deserialize_with = "present_raw")]
    end: Option<&'a RawValue>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Alternatives<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Alternatives<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of alternatives")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let first = seq.next_element::<AlternativeIn<'a>>()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Alternatives { first })
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Words<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Words<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of words")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Words::default();
                let mut first = true;
                while let Some(w) = seq.next_element::<WordIn<'a>>()? {
                    if first {
                        out.start = w.start;
                        first = false;
                    }
                    out.end = w.end;
                }
                Ok(out)
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_frame;
    use serde_json::json;

    /// Every caption frame of the shipped recordings, as text.
    fn shipped() -> Vec<String> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines/recordings");
        let mut out = Vec::new();
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(path).unwrap();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line).unwrap();
                if v["event"]["message"]["type"] == "recognition_result" {
                    out.push(v["event"].to_string());
                }
            }
        }
        out
    }

    /// The fast path agrees with the general one on `text`, when it takes it; whether it did.
    fn agrees(text: &str) -> bool {
        let tree: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(_) => {
                assert!(CaptionFrame::parse(text).is_none(), "{text}");
                return false;
            }
        };
        let Some(fast) = CaptionFrame::parse(text) else {
            return false;
        };
        assert_eq!(Some(fast.key.clone()), CaptionKey::of_tree(&tree), "{text}");
        let slow = parse_frame("c", 7, tree.clone()).unwrap().remove(0);
        let fast = fast.into_event(Arc::from("c"), 7);
        assert_eq!(fast.kind, slow.kind, "{text}");
        assert_eq!(fast.detail, slow.detail, "{text}");
        assert_eq!(fast.raw.value(), &tree, "{text}");
        assert_eq!(fast.raw.json(), text);
        true
    }

    #[test]
    fn every_shipped_caption_takes_the_fast_path_with_the_same_event_and_key() {
        let frames = shipped();
        assert!(frames.len() > 50, "{}", frames.len());
        for f in &frames {
            assert!(agrees(f), "not taken: {f}");
        }
    }

    #[test]
    fn unusual_captions_agree_or_take_the_general_path() {
        let base: Value = serde_json::from_str(&shipped()[0]).unwrap();
        let variants: Vec<(&str, Value)> = vec![
            ("/message/isFinal", json!(null)),
            ("/message/isFinal", json!("yes")),
            ("/message/user", json!(null)),
            ("/message/user", json!("someone")),
            ("/message/punctuated", json!(null)),
            ("/message/punctuated", json!({"transcript": 5})),
            ("/message/punctuated", json!([1, 2])),
            ("/message/payload", json!(null)),
            ("/message/payload", json!(3)),
            ("/message/payload/raw", json!(null)),
            ("/message/payload/raw/alternatives", json!([])),
            (
                "/message/payload/raw/alternatives",
                json!({"0": {"transcript": "x"}}),
            ),
            ("/message/payload/raw/alternatives/0/words", json!([])),
            ("/message/payload/raw/alternatives/0/words", json!("w")),
            ("/message/payload/raw/alternatives/0/words/0", json!("w")),
            (
                "/message/payload/raw/alternatives/0/words/0/startTime",
                json!(null),
            ),
            (
                "/message/payload/raw/alternatives/0/transcript",
                json!(null),
            ),
            ("/message/sequenceNumber", json!(4)),
            ("/sequenceNumber", json!(null)),
            ("/message/type", json!("recognition_resultX")),
            ("/type", json!("messages")),
            ("/message", json!("recognition_result")),
        ];
        let mut taken = 0;
        for (pointer, value) in variants {
            let mut v = base.clone();
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            match v.pointer_mut(parent) {
                Some(Value::Object(m)) => {
                    m.insert(key.to_owned(), value);
                }
                Some(Value::Array(a)) => {
                    let i: usize = key.parse().unwrap();
                    if i < a.len() {
                        a[i] = value;
                    }
                }
                _ => continue,
            }
            taken += usize::from(agrees(&v.to_string()));
            // The same frame spelled with other spacing and escapes agrees too.
            let pretty = serde_json::to_string_pretty(&v)
                .unwrap()
                .replace('é', "\\u00e9");
            agrees(&pretty);
        }
        assert!(taken >= 10, "{taken}");
        // A repeated key: the general path (the last wins there).
        let text = shipped()[0].replacen("{", r#"{"type":"other","#, 1);
        assert!(CaptionFrame::parse(&text).is_none());
        // Not JSON, or not a caption.
        assert!(!agrees(
            r#"{"type":"message","message":{"type":"recognition_result""#
        ));
        assert!(CaptionFrame::parse(r#"{"type":"message_response","messages":[]}"#).is_none());
    }

    #[test]
    fn the_same_words_at_other_times_are_another_caption() {
        let base: Value = serde_json::from_str(&shipped()[0]).unwrap();
        let mut later = base.clone();
        later["message"]["payload"]["raw"]["alternatives"][0]["words"][0]["startTime"] =
            json!({"seconds": "99", "nanos": "0"});
        let a = CaptionFrame::parse(&base.to_string()).unwrap().key;
        let b = CaptionFrame::parse(&later.to_string()).unwrap().key;
        assert_ne!(a, b);
        assert_eq!(a.transcript, b.transcript);
    }
}
