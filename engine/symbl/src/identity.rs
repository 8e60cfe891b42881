//! What a Symbl frame *is*, as a 64-bit key, so a frame redelivered after a reconnect is
//! recognised however it is spelled (spacing, key order, a new `sequenceNumber`).
//!
//! [`frame_identity`] derives the key from the fields that identify a frame (the ids Symbl
//! gives messages, insights and topics; a tracker's name, matches and `isFinal`; a platform
//! message's type and sequence number) and, for a frame without such fields, from its
//! canonical JSON ([`canonical_json`]: keys sorted, no whitespace). It does not own remembering
//! keys (the Subscribe follower keeps a bounded window of them).
//!
//! The key is an FNV-1a hash: stable across processes and Rust versions, so it may be stored.
//! Keys derived from identifying fields and keys derived from canonical JSON never share an
//! input (the former start with a byte JSON text cannot contain).

use std::io::{self, Write};

use prompter_core::event::{CaptionKey, Received};
use serde_json::Value;

/// The identity of a Subscribe/Streaming frame: equal for two deliveries of the same frame,
/// different for frames that say different things.
///
/// - `message_response`: the ids of its messages (`messages[].id`).
/// - `insight_response`: the ids of its insights (`insights[].id`).
/// - `topic_response`: the ids of its topics with the ids of the messages each refers to
///   (`messageReferences[].id`), so a topic re-sent with a new reference counts as new.
/// - `tracker_response`: each tracker's `name`/`id` with its matches (`type`, `value`,
///   `messageRefs[].id`, `insightRefs[].id`), and `isFinal` (an interim result and the final
///   one are different frames).
/// - `message` / `recognition_result` (live captions): the sequence number (on the frame or on
///   `message`) when there is one, `isFinal`, the transcript, the speaker, and the start of
///   its first word and the end of its last (interim captions of one utterance may share a
///   number; the same words said twice are said at different times). The per-word timings in
///   between are not part of it: reading them was most of the cost of a caption.
/// - Other `message` frames with a `sequenceNumber` (on the frame or on `message`):
///   `message.type` and that number.
/// - Anything else (including a frame of the above kinds missing one of its ids, legacy
///   insights without ids, errors): the hash of its canonical JSON, so only spacing and key
///   order are ignored.
///
/// Lists of ids are compared as sets (their order does not matter).
///
/// # Examples
/// ```
/// use prompter_symbl::identity::frame_identity;
///
/// let a: serde_json::Value = serde_json::from_str(
///     r#"{"type":"message_response","messages":[{"id":"m1","payload":{"content":"Hi."}}]}"#,
/// ).unwrap();
/// let b: serde_json::Value = serde_json::from_str(
///     r#"{ "messages": [ { "payload": { "content": "Hi." }, "id": "m1" } ],
///          "sequenceNumber": 7, "type": "message_response" }"#,
/// ).unwrap();
/// assert_eq!(frame_identity(&a), frame_identity(&b));
/// ```
pub fn frame_identity(frame: &Value) -> u64 {
    identified(frame).unwrap_or_else(|| canonical_hash(frame))
}

/// [`frame_identity`] of a frame as a source received it: a caption read on the fast path
/// gets the same identity its JSON tree would.
pub fn received_identity(frame: &Received) -> u64 {
    match frame {
        Received::Caption(c) => caption_identity(&c.key),
        Received::Tree(v) => frame_identity(v),
    }
}

/// A live caption's identity: its sequence number (when an identifier), finality, transcript,
/// speaker and the times of its first and last words.
fn caption_identity(key: &CaptionKey) -> u64 {
    let mut k = Key::new("caption");
    k.part_opt(key.sequence.as_ref().filter(|v| is_id(v)))
        .part_opt(key.is_final.as_ref())
        .part_opt(key.transcript.as_ref())
        .part_opt(key.user.as_ref())
        .part_opt(key.span.0.as_ref())
        .part_opt(key.span.1.as_ref());
    k.finish()
}

/// `value` as canonical JSON: object keys sorted (by their UTF-8 bytes), no whitespace,
/// strings and numbers as `serde_json` writes them.
///
/// Sorting is done here rather than left to `serde_json::Map`: with serde_json's
/// `preserve_order` feature (which any crate in the build may turn on) maps keep the order the
/// keys arrived in.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = write_canonical(&mut out, value);
    String::from_utf8(out).expect("invariant: serde_json writes UTF-8")
}

/// The FNV-1a hash of `value`'s canonical JSON.
fn canonical_hash(value: &Value) -> u64 {
    let mut h = Fnv::new();
    // Writing to the hasher cannot fail.
    let _ = write_canonical(&mut h, value);
    h.finish()
}

fn write_canonical<W: Write>(w: &mut W, value: &Value) -> io::Result<()> {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => {
            serde_json::to_writer(&mut *w, value).map_err(io::Error::other)
        }
        Value::Array(items) => {
            w.write_all(b"[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    w.write_all(b",")?;
                }
                write_canonical(w, item)?;
            }
            w.write_all(b"]")
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            w.write_all(b"{")?;
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    w.write_all(b",")?;
                }
                serde_json::to_writer(&mut *w, key).map_err(io::Error::other)?;
                w.write_all(b":")?;
                write_canonical(w, item)?;
            }
            w.write_all(b"}")
        }
    }
}

/// The key from the identifying fields, or `None` when the frame has none (or lacks some).
fn identified(frame: &Value) -> Option<u64> {
    if let Some(key) = CaptionKey::of_tree(frame) {
        return Some(caption_identity(&key));
    }
    match frame.get("type")?.as_str()? {
        kind @ ("message_response" | "insight_response") => {
            let list = if kind == "message_response" {
                "messages"
            } else {
                "insights"
            };
            let ids = non_empty(frame.get(list))?
                .iter()
                .map(|item| id_of(item).map(canonical_hash))
                .collect::<Option<Vec<_>>>()?;
            Some(Key::new(kind).set(ids).finish())
        }
        "topic_response" => {
            let topics = non_empty(frame.get("topics"))?
                .iter()
                .map(|topic| {
                    let id = id_of(topic)?;
                    let refs = ref_ids(topic.get("messageReferences"));
                    Some(Key::new("topic").part(id).set(refs).finish())
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Key::new("topic_response").set(topics).finish())
        }
        "tracker_response" => tracker_identity(frame),
        "message" => platform_identity(frame),
        _ => None,
    }
}

/// `tracker_response`: trackers (name/id and matches) and `isFinal`.
fn tracker_identity(frame: &Value) -> Option<u64> {
    let trackers = non_empty(frame.get("trackers"))?
        .iter()
        .map(|tracker| {
            let name = tracker.get("name").filter(|v| is_id(v));
            let id = id_of(tracker);
            if name.is_none() && id.is_none() {
                return None;
            }
            let matches = tracker
                .get("matches")
                .and_then(Value::as_array)
                .map(|ms| {
                    ms.iter()
                        .map(|m| {
                            Key::new("match")
                                .part_opt(m.get("type"))
                                .part_opt(m.get("value"))
                                .set(ref_ids(m.get("messageRefs")))
                                .set(ref_ids(m.get("insightRefs")))
                                .finish()
                        })
                        .collect()
                })
                .unwrap_or_default();
            Some(
                Key::new("tracker")
                    .part_opt(name)
                    .part_opt(id)
                    .part_opt(tracker.get("isFinal"))
                    .set(matches)
                    .finish(),
            )
        })
        .collect::<Option<Vec<_>>>()?;
    Some(
        Key::new("tracker_response")
            .part_opt(frame.get("isFinal"))
            .set(trackers)
            .finish(),
    )
}

/// `{"type":"message","message":{"type":..}}` with a sequence number.
fn platform_identity(frame: &Value) -> Option<u64> {
    let message = frame.get("message")?;
    let kind = message.get("type").filter(|v| v.is_string())?;
    let seq = frame
        .get("sequenceNumber")
        .or_else(|| message.get("sequenceNumber"))
        .filter(|v| is_id(v))?;
    let mut key = Key::new("message");
    key.part(kind).part(seq);
    if kind == "recognition_result" {
        let transcript = message
            .get("punctuated")
            .and_then(|p| p.get("transcript"))
            .or_else(|| {
                message
                    .get("payload")
                    .and_then(|p| p.get("raw"))
                    .and_then(|r| r.get("alternatives"))
                    .and_then(|a| a.get(0))
                    .and_then(|a| a.get("transcript"))
            });
        key.part_opt(message.get("isFinal"))
            .part_opt(transcript)
            .part_opt(message.get("user"));
    }
    Some(key.finish())
}

/// The array at `v`, when it is one with at least one element.
fn non_empty(v: Option<&Value>) -> Option<&Vec<Value>> {
    v.and_then(Value::as_array).filter(|a| !a.is_empty())
}

/// An identifier: a non-empty string or a number.
fn is_id(v: &Value) -> bool {
    match v {
        Value::String(s) => !s.is_empty(),
        Value::Number(_) => true,
        _ => false,
    }
}

/// `item.id`, when it is an identifier.
fn id_of(item: &Value) -> Option<&Value> {
    item.get("id").filter(|v| is_id(v))
}

/// The keys of a list of references (`[{"id": ..}, ..]`): each one's id, or the whole
/// reference when it has none. Empty when the list is absent.
fn ref_ids(refs: Option<&Value>) -> Vec<u64> {
    refs.and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .map(|r| canonical_hash(id_of(r).unwrap_or(r)))
                .collect()
        })
        .unwrap_or_default()
}

/// An identity key under construction: a tag, then parts, each self-delimiting.
struct Key(Fnv);

/// Never appears in UTF-8 (so never in JSON text): marks the start of an identity key and
/// ends each part, so no two sequences of parts feed the hasher the same bytes.
const MARK: u8 = 0xff;
/// Stands for an absent field (also not UTF-8).
const ABSENT: u8 = 0xfe;

impl Key {
    fn new(tag: &str) -> Self {
        let mut h = Fnv::new();
        h.bytes(&[MARK]);
        h.bytes(tag.as_bytes());
        h.bytes(&[MARK]);
        Key(h)
    }

    /// Adds a value (as canonical JSON).
    fn part(&mut self, v: &Value) -> &mut Self {
        let _ = write_canonical(&mut self.0, v);
        self.0.bytes(&[MARK]);
        self
    }

    /// Adds a value that may be absent (absent and `null` differ).
    fn part_opt(&mut self, v: Option<&Value>) -> &mut Self {
        match v {
            Some(v) => self.part(v),
            None => {
                self.0.bytes(&[ABSENT, MARK]);
                self
            }
        }
    }

    /// Adds a set of keys (sorted, so their order does not matter).
    fn set(&mut self, mut keys: Vec<u64>) -> &mut Self {
        keys.sort_unstable();
        self.0.bytes(&(keys.len() as u64).to_le_bytes());
        for k in keys {
            self.0.bytes(&k.to_le_bytes());
        }
        self.0.bytes(&[MARK]);
        self
    }

    fn finish(&self) -> u64 {
        self.0.finish()
    }
}

/// 64-bit FNV-1a: tiny, no dependency, stable. Not collision-resistant against an adversary,
/// which a frame from Symbl is not; at 64 bits a chance collision within a window of a few
/// thousand frames is about one in 10^12.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

impl Write for Fnv {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;
