//! Subjects, keys and partitions.
//!
//! A conversation id becomes one subject token (and KV key): letters, digits, `-` and `_` are
//! kept, every other byte is written `=XX` (hex), so `call.42 a` is `call=2E42=20a`. The
//! server maps `prefix.ev.<token>` to `prefix.p.<partition>.<token>` with
//! `partition(P, 1)`: FNV-1a (32 bits) of the token, modulo P ([`partition`] gives the same).

use std::fmt::Write as _;

/// The priority group every engine pulls in.
pub const GROUP: &str = "engines";

/// Header: the conversation id, as sent.
pub const CONVERSATION: &str = "Prompter-Conversation";
/// Header: the event's offset in its conversation, in milliseconds.
pub const OFFSET: &str = "Prompter-Offset";
/// Header: the event's identity (16 hex digits), which picks it among its frame's events.
pub const EVENT: &str = "Prompter-Event";
/// Header: `feedback` when the payload is an agent's feedback from a console (not a Symbl
/// frame).
pub const KIND: &str = "Prompter-Kind";

/// `id` as one subject token (see the module docs).
pub fn token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            out.push(b as char);
        } else {
            let _ = write!(out, "={b:02X}");
        }
    }
    if out.is_empty() {
        out.push_str("=00");
    }
    out
}

/// FNV-1a, 32 bits: the hash of the server's `partition()` subject transform.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The partition of a conversation's token among `partitions`.
pub fn partition(token: &str, partitions: u32) -> u32 {
    fnv1a32(token.as_bytes()) % partitions.max(1)
}

/// Which live member owns `partition`: the highest rendezvous score. Every member computes the
/// same answer from the same member list, and a member joining or leaving moves only the
/// partitions it wins or held.
pub fn owner(partition: u32, members: &[String]) -> Option<&str> {
    members
        .iter()
        .max_by_key(|m| {
            let mut key = Vec::with_capacity(m.len() + 8);
            key.extend_from_slice(m.as_bytes());
            key.push(b'#');
            key.extend_from_slice(partition.to_string().as_bytes());
            // Mix the 32-bit hash so nearby inputs spread (FNV's low bits are weak).
            let h = u64::from(fnv1a32(&key));
            (h.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16, m.as_str())
        })
        .map(String::as_str)
}

/// The subjects of one cluster.
#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    /// Partitions of the events stream.
    pub partitions: u32,
}

impl Subjects {
    /// The subjects under `prefix`, with `partitions` partitions.
    pub fn new(prefix: &str, partitions: u32) -> Self {
        Subjects {
            prefix: prefix.to_owned(),
            partitions,
        }
    }
    /// Where ingest publishes a conversation's events: `prefix.ev.<token>`.
    pub fn ingest(&self, token: &str) -> String {
        format!("{}.ev.{token}", self.prefix)
    }
    /// Every ingest subject.
    pub fn ingest_all(&self) -> String {
        format!("{}.ev.*", self.prefix)
    }
    /// The server's transform destination.
    pub fn transform_destination(&self) -> String {
        format!(
            "{}.p.{{{{partition({},1)}}}}.{{{{wildcard(1)}}}}",
            self.prefix, self.partitions
        )
    }
    /// A partition's events: `prefix.p.<n>.*`.
    pub fn partition_filter(&self, p: u32) -> String {
        format!("{}.p.{p}.*", self.prefix)
    }
    /// Every stored event.
    pub fn events_all(&self) -> String {
        format!("{}.p.>", self.prefix)
    }
    /// A conversation's outputs: `prefix.out.<token>`.
    pub fn outputs(&self, token: &str) -> String {
        format!("{}.out.{token}", self.prefix)
    }
    /// Every output.
    pub fn outputs_all(&self) -> String {
        format!("{}.out.*", self.prefix)
    }
    /// A partition's durable consumer.
    pub fn consumer(&self, p: u32) -> String {
        format!("{}-p{p}", self.prefix)
    }
    /// The members bucket.
    pub fn members_bucket(&self) -> String {
        format!("{}_members", self.prefix)
    }
    /// The snapshots bucket.
    pub fn snapshots_bucket(&self) -> String {
        format!("{}_snapshots", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_one_subject_token_and_distinct() {
        assert_eq!(token("acme-call_1"), "acme-call_1");
        assert_eq!(token("call.42 a"), "call=2E42=20a");
        assert_eq!(token("a*b>c"), "a=2Ab=3Ec");
        assert_ne!(token("a.b"), token("a=2Eb"));
        assert_eq!(token(""), "=00");
    }

    #[test]
    fn fnv1a32_matches_the_reference_values() {
        // Published FNV-1a 32-bit test vectors.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn ownership_is_shared_and_moves_only_what_it_must() {
        let three: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut counts = std::collections::HashMap::new();
        for p in 0..64 {
            *counts.entry(owner(p, &three).unwrap_or("")).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3, "{counts:?}");
        assert!(counts.values().all(|&n| n >= 10), "{counts:?}");
        // `c` leaves: only its partitions move.
        let two: Vec<String> = ["a", "b"].map(String::from).to_vec();
        for p in 0..64 {
            let before = owner(p, &three);
            if before != Some("c") {
                assert_eq!(owner(p, &two), before);
            }
        }
        assert_eq!(owner(0, &[]), None);
    }
}
