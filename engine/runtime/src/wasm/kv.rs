//! A Wasm stage's key-value space (`kv-get`/`kv-set`/`kv-delete`), kept in the engine.
//!
//! The values live in the conversation's engine-owned stage state
//! ([`StageContext::state_get`]), scoped to the pipeline and stage, so they survive instance
//! recycling and reloads, travel with the conversation's snapshot and go when the engine
//! releases the conversation. The whole space is one state value (a JSON object), so the limits
//! below can be checked without listing keys.
//!
//! A wasmtime store holds only `'static` data, and a call's [`StageContext`] borrows the engine,
//! so a call works on a [`Kv`]: the space as the call started plus the call's own writes. The
//! writes reach the engine when the guest returns ([`Kv::commit`]); a call that traps, times
//! out or is cancelled leaves the space as it was. Two runs of one pipeline for the same
//! conversation in flight at once (`concurrency: parallel`) each see the space as their call
//! started; their writes are merged key by key, the last one winning.
//!
//! It does not own the engine's state itself (`prompter_core::book`).

use std::collections::BTreeMap;

use prompter_core::plugin::StageContext;

/// The stage-state key that holds the space.
const STATE_KEY: &str = "kv";
/// At most this many keys per stage and conversation.
const MAX_KEYS: usize = 256;
/// Longest key, bytes: keys are names, not data.
const MAX_KEY_BYTES: usize = 1024;
/// Largest value, bytes.
const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Keys and values together, bytes per stage and conversation. The space is loaded on every
/// call that uses it and carried in every snapshot of the conversation, so it stays small
/// next to what a call may do.
const MAX_TOTAL_BYTES: usize = 1024 * 1024;

type Map = BTreeMap<String, String>;

/// One call's view of the stage's space: what the engine held when the call started, with the
/// call's writes applied, and those writes to hand back.
#[derive(Debug, Default)]
pub(crate) struct Kv {
    map: Map,
    /// Keys written by this call: `None` deletes.
    writes: BTreeMap<String, Option<String>>,
}

impl Kv {
    /// The space of `cx`'s stage and conversation, as the engine holds it now.
    pub(crate) fn load(cx: &StageContext<'_>) -> Kv {
        Kv {
            map: stored(cx),
            writes: BTreeMap::new(),
        }
    }

    /// The value under `key`, this call's writes included.
    pub(crate) fn get(&self, key: &str) -> Option<String> {
        self.map.get(key).cloned()
    }

    /// Sets `key`, within the limits.
    ///
    /// # Errors
    /// The reason handed to the guest when the key or value is too large or the space is full.
    pub(crate) fn set(&mut self, key: String, value: String) -> Result<(), String> {
        if key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "a key of {} bytes is too long; the limit is {MAX_KEY_BYTES}",
                key.len()
            ));
        }
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "value for `{key}` is {} bytes; the limit is {MAX_VALUE_BYTES}",
                value.len()
            ));
        }
        let old = self.map.get(&key).map(|v| key.len() + v.len());
        if old.is_none() && self.map.len() >= MAX_KEYS {
            return Err(format!(
                "kv full: at most {MAX_KEYS} keys per stage and conversation"
            ));
        }
        let total = bytes(&self.map) - old.unwrap_or(0) + key.len() + value.len();
        if total > MAX_TOTAL_BYTES {
            return Err(format!(
                "kv full: setting `{key}` would make it {total} bytes; the limit is {MAX_TOTAL_BYTES} per stage and conversation"
            ));
        }
        self.map.insert(key.clone(), value.clone());
        self.writes.insert(key, Some(value));
        Ok(())
    }

    /// Removes `key`.
    pub(crate) fn delete(&mut self, key: String) {
        self.map.remove(&key);
        self.writes.insert(key, None);
    }

    /// Hands this call's writes to the engine, merged into what it holds now (a parallel run
    /// may have written since this call started). When that merge would break the limits (only
    /// parallel runs together can do that), this call's writes are dropped, all of them.
    pub(crate) fn commit(self, cx: &StageContext<'_>, stage: &str) {
        if self.writes.is_empty() {
            return;
        }
        let mut map = stored(cx);
        for (k, v) in self.writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        if map.len() > MAX_KEYS || bytes(&map) > MAX_TOTAL_BYTES {
            tracing::warn!(
                stage,
                conversation = %cx.event().conversation_id,
                "Dropped a plugin call's kv writes: with those of a parallel run they overfill the stage's kv; use `concurrency: queue`."
            );
            return;
        }
        let value = if map.is_empty() {
            None
        } else {
            // A map of strings always serializes.
            serde_json::to_string(&map).ok()
        };
        cx.state_set(STATE_KEY, value);
    }
}

/// What the engine holds for `cx`'s stage and conversation.
fn stored(cx: &StageContext<'_>) -> Map {
    let Some(text) = cx.state_get(STATE_KEY) else {
        return Map::new();
    };
    serde_json::from_str(&text).unwrap_or_else(|error| {
        // Only the host writes it; an unreadable value (a hand-edited snapshot) starts over
        // rather than failing every later call of the conversation.
        tracing::warn!(
            stage = cx.stage,
            conversation = %cx.event().conversation_id,
            error = %error,
            "Plugin kv state is not a JSON object of strings; starting it empty."
        );
        Map::new()
    })
}

fn bytes(map: &Map) -> usize {
    map.iter().map(|(k, v)| k.len() + v.len()).sum()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prompter_core::book::{Host, LocalHost};
    use prompter_core::conversation::ConversationState;
    use prompter_core::plugin::{Run, RunScope, StageContext};
    use prompter_core::test_util::event;
    use serde_json::json;

    use super::*;

    fn scope() -> RunScope {
        let e = event(
            "c1",
            1000,
            json!({"type": "message_response", "messages": [{"from": {"name": "Eve"}, "payload": {"content": "hi"}}]}),
        );
        RunScope::new(Arc::new(e), Arc::new(ConversationState::new("c1")))
    }

    #[test]
    fn a_call_reads_its_own_writes_and_the_engine_sees_them_after_it() {
        let (host, scope, run) = (LocalHost::default(), scope(), Run::new(1, "o".into()));
        let cx = StageContext::alone("p", "gate", &scope, &run, &host);
        let mut kv = Kv::load(&cx);
        assert_eq!(kv.get("n"), None);
        kv.set("n".into(), "1".into()).unwrap();
        kv.set("gone".into(), "x".into()).unwrap();
        kv.delete("gone".into());
        assert_eq!(kv.get("n").as_deref(), Some("1"));
        assert_eq!(kv.get("gone"), None);
        assert_eq!(
            host.get("p/gate", STATE_KEY),
            None,
            "not before the call ends"
        );
        kv.commit(&cx, "gate");
        assert_eq!(
            host.get("p/gate", STATE_KEY).as_deref(),
            Some(r#"{"n":"1"}"#)
        );
        assert_eq!(Kv::load(&cx).get("n").as_deref(), Some("1"));
        // Another stage of the same conversation has its own space.
        let other = StageContext::alone("p", "other", &scope, &run, &host);
        assert_eq!(Kv::load(&other).get("n"), None);
        // Emptied, the state value goes.
        let mut kv = Kv::load(&cx);
        kv.delete("n".into());
        kv.commit(&cx, "gate");
        assert_eq!(host.get("p/gate", STATE_KEY), None);
    }

    #[test]
    fn parallel_calls_merge_key_by_key() {
        let (host, scope, run) = (LocalHost::default(), scope(), Run::new(1, "o".into()));
        let cx = StageContext::alone("p", "s", &scope, &run, &host);
        let mut a = Kv::load(&cx);
        let mut b = Kv::load(&cx);
        a.set("a".into(), "1".into()).unwrap();
        b.set("b".into(), "2".into()).unwrap();
        a.commit(&cx, "s");
        b.commit(&cx, "s");
        let kv = Kv::load(&cx);
        assert_eq!(
            (kv.get("a").as_deref(), kv.get("b").as_deref()),
            (Some("1"), Some("2"))
        );
    }

    #[test]
    fn limits_hold_against_what_the_engine_holds() {
        let (host, scope, run) = (LocalHost::default(), scope(), Run::new(1, "o".into()));
        let cx = StageContext::alone("p", "s", &scope, &run, &host);
        let full: Map = (0..MAX_KEYS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        host.set(
            "p/s",
            STATE_KEY,
            Some(serde_json::to_string(&full).unwrap()),
        );
        let mut kv = Kv::load(&cx);
        assert_eq!(
            kv.set("new".into(), "1".into()).unwrap_err(),
            "kv full: at most 256 keys per stage and conversation"
        );
        kv.set("k0".into(), "overwriting is fine".into()).unwrap();

        let mut kv = Kv::default();
        assert!(
            kv.set("k".repeat(MAX_KEY_BYTES + 1), String::new())
                .is_err()
        );
        assert_eq!(
            kv.set("v".into(), "x".repeat(MAX_VALUE_BYTES + 1))
                .unwrap_err(),
            "value for `v` is 65537 bytes; the limit is 65536"
        );
        for i in 0..15 {
            kv.set(format!("{i:02}"), "x".repeat(MAX_VALUE_BYTES))
                .unwrap();
        }
        let err = kv
            .set("15".into(), "x".repeat(MAX_VALUE_BYTES))
            .unwrap_err();
        assert!(
            err.starts_with("kv full: setting `15` would make it"),
            "{err}"
        );
        // Replacing a value counts the old one out.
        kv.set("00".into(), "x".repeat(MAX_VALUE_BYTES)).unwrap();
    }

    #[test]
    fn unreadable_state_starts_empty() {
        let (host, scope, run) = (LocalHost::default(), scope(), Run::new(1, "o".into()));
        let cx = StageContext::alone("p", "s", &scope, &run, &host);
        host.set("p/s", STATE_KEY, Some("not json".into()));
        assert_eq!(Kv::load(&cx).get("anything"), None);
    }
}
