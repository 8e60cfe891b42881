//! Engine-owned per-conversation bookkeeping: output versions and delivery order, and the state
//! stages keep (dedupe keys, Wasm key-value scratch).
//!
//! Stages never keep per-conversation state in themselves: a reload, a restart or a move of the
//! conversation to another engine process would lose it (and re-fire suggestions). They reach
//! it through their [`StageContext`](crate::plugin::StageContext), which forwards to the
//! engine's [`Host`]; the engine keeps one [`Book`] per conversation, serializes it with the
//! conversation's snapshot and drops it when the conversation is released.
//!
//! It does not own where outputs go once stamped (the engine's sinks do).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::PluginError;
use crate::output::{Output, Status};

/// What the engine does for a running stage: deliver outputs, and keep stage state for the
/// conversation.
#[async_trait::async_trait]
pub trait Host: Send + Sync {
    /// Stamps `output` (its next version and the conversation's next sequence number) and hands
    /// it to the sinks; returns what was delivered.
    ///
    /// # Errors
    /// When the engine is stopping and takes no more outputs.
    async fn deliver(&self, output: Output) -> Result<Output, PluginError>;

    /// Claims `key` in `scope` for run `run` (see [`Book::claim`]).
    fn claim(&self, run: u64, scope: &str, key: &str, at_ms: u64, cooldown_ms: u64) -> bool;

    /// A value a stage kept for this conversation.
    fn get(&self, scope: &str, key: &str) -> Option<String>;

    /// Keeps (or with `None` forgets) a value for this conversation.
    fn set(&self, scope: &str, key: &str, value: Option<String>);
}

/// The version an output id reached and its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// The latest version delivered.
    pub version: u32,
    /// Its status.
    pub status: Status,
}

/// One conversation's bookkeeping. Serializable: it travels with the conversation's snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Book {
    /// Every output id delivered, with its latest version.
    pub outputs: HashMap<String, Versioned>,
    /// The last sequence number given.
    pub seq: u64,
    /// Committed stage state: scope (`pipeline/stage`) → key → value.
    pub stages: BTreeMap<String, BTreeMap<String, String>>,
    /// Open claims: `scope\u{1f}key` → (run, offset). Not serialized: a snapshot is taken with
    /// no run in flight.
    #[serde(skip)]
    claims: HashMap<String, (u64, u64)>,
    /// Outputs already stored by another process after this book was snapshotted (see
    /// [`Book::adopt`]): (id, version) → the sequence number they were stored with.
    #[serde(skip)]
    adopted: HashMap<(String, u32), u64>,
}

impl Book {
    /// Gives `output` its version (one more than the id's last) and the next sequence number.
    /// An output [adopted](Book::adopt) as already stored gets the number it was stored with.
    pub fn stamp(&mut self, output: &mut Output) {
        let v = self.outputs.entry(output.id.clone()).or_insert(Versioned {
            version: 0,
            status: output.status,
        });
        v.version += 1;
        v.status = output.status;
        output.version = v.version;
        if !self.adopted.is_empty()
            && let Some(seq) = self.adopted.remove(&(output.id.clone(), output.version))
        {
            output.seq = seq;
            return;
        }
        self.seq += 1;
        output.seq = self.seq;
    }

    /// Takes over a conversation whose outputs after this book's snapshot were already stored
    /// (by a process that then died): `stored` lists them as (id, version, seq). When the
    /// events after the snapshot are replayed, an output made again gets the sequence number it
    /// was stored with, and a new one a number after every stored one, so the stored sequence
    /// stays in order whatever order concurrent runs finish in this time.
    pub fn adopt(&mut self, stored: impl IntoIterator<Item = (String, u32, u64)>) {
        let base = self.seq;
        for (id, version, seq) in stored {
            if seq > base {
                self.adopted.insert((id, version), seq);
                self.seq = self.seq.max(seq);
            }
        }
    }

    /// Claims `key` for run `run` at call time `at_ms`: true when nothing holds it, that is no
    /// other run has an open claim on it and it was not committed less than `cooldown_ms` ago
    /// (with `cooldown_ms` 0, committed once holds it for the rest of the conversation). A
    /// claim becomes committed only when its run delivers ([`Book::settle`]); a run that fails
    /// releases it, so a later trigger is not suppressed by one that never reached the agent.
    pub fn claim(
        &mut self,
        run: u64,
        scope: &str,
        key: &str,
        at_ms: u64,
        cooldown_ms: u64,
    ) -> bool {
        let k = format!("{scope}\u{1f}{key}");
        if let Some(&(owner, _)) = self.claims.get(&k)
            && owner != run
        {
            return false;
        }
        if let Some(at) = self
            .stages
            .get(scope)
            .and_then(|m| m.get(key))
            .and_then(|v| v.parse::<u64>().ok())
            && (cooldown_ms == 0 || at_ms.saturating_sub(at) < cooldown_ms)
        {
            return false;
        }
        self.claims.insert(k, (run, at_ms));
        true
    }

    /// Ends run `run`'s claims: committed when it delivered, released otherwise.
    pub fn settle(&mut self, run: u64, delivered: bool) {
        let mine: Vec<String> = self
            .claims
            .iter()
            .filter(|(_, (owner, _))| *owner == run)
            .map(|(k, _)| k.clone())
            .collect();
        for k in mine {
            let Some((_, at)) = self.claims.remove(&k) else {
                continue;
            };
            if delivered && let Some((scope, key)) = k.split_once('\u{1f}') {
                self.stages
                    .entry(scope.to_owned())
                    .or_default()
                    .insert(key.to_owned(), at.to_string());
            }
        }
    }

    /// Forgets everything kept for `scope` (`pipeline/stage`): a stage whose configuration
    /// changed, or that is gone, starts over.
    pub fn forget_scope(&mut self, scope: &str) {
        self.stages.remove(scope);
        let prefix = format!("{scope}\u{1f}");
        self.claims.retain(|k, _| !k.starts_with(&prefix));
    }

    /// A stage value.
    pub fn get(&self, scope: &str, key: &str) -> Option<String> {
        self.stages.get(scope).and_then(|m| m.get(key)).cloned()
    }

    /// Sets or removes a stage value.
    pub fn set(&mut self, scope: &str, key: &str, value: Option<String>) {
        match value {
            Some(v) => {
                self.stages
                    .entry(scope.to_owned())
                    .or_default()
                    .insert(key.to_owned(), v);
            }
            None => {
                if let Some(m) = self.stages.get_mut(scope) {
                    m.remove(key);
                }
            }
        }
    }
}

/// A [`Host`] for one conversation outside an engine (tools such as `prompter plugin test`, and
/// tests): keeps its [`Book`] and collects what is delivered. Claims commit at once.
#[derive(Default)]
pub struct LocalHost {
    book: std::sync::Mutex<Book>,
    delivered: std::sync::Mutex<Vec<Output>>,
}

impl LocalHost {
    /// Takes the outputs delivered so far.
    pub fn take(&self) -> Vec<Output> {
        std::mem::take(&mut *lock(&self.delivered))
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[async_trait::async_trait]
impl Host for LocalHost {
    async fn deliver(&self, mut output: Output) -> Result<Output, PluginError> {
        lock(&self.book).stamp(&mut output);
        lock(&self.delivered).push(output.clone());
        Ok(output)
    }
    fn claim(&self, run: u64, scope: &str, key: &str, at_ms: u64, cooldown_ms: u64) -> bool {
        let mut b = lock(&self.book);
        let ok = b.claim(run, scope, key, at_ms, cooldown_ms);
        b.settle(run, true);
        ok
    }
    fn get(&self, scope: &str, key: &str) -> Option<String> {
        lock(&self.book).get(scope, key)
    }
    fn set(&self, scope: &str, key: &str, value: Option<String>) {
        lock(&self.book).set(scope, key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_commit_only_when_their_run_delivers() {
        let mut b = Book::default();
        assert!(b.claim(1, "rta/once", "budget", 1000, 0));
        assert!(!b.claim(2, "rta/once", "budget", 1200, 0), "held by run 1");
        b.settle(1, false);
        assert!(
            b.claim(3, "rta/once", "budget", 1800, 0),
            "released: run 1 failed"
        );
        b.settle(3, true);
        assert!(
            !b.claim(4, "rta/once", "budget", 60_000, 0),
            "committed for good"
        );
        assert!(b.claim(4, "rta/once", "timing", 60_000, 0));
        // With a cooldown, the key is free again once it has passed.
        let mut b = Book::default();
        assert!(b.claim(1, "s", "k", 1000, 5000));
        b.settle(1, true);
        assert!(!b.claim(2, "s", "k", 4000, 5000));
        assert!(b.claim(2, "s", "k", 6000, 5000));
    }

    #[test]
    fn versions_grow_per_id_and_seq_per_conversation() {
        let mut b = Book::default();
        let mut o = Output {
            id: "c/p/k-x".into(),
            ..Output::default()
        };
        b.stamp(&mut o);
        assert_eq!((o.version, o.seq), (1, 1));
        b.stamp(&mut o);
        assert_eq!((o.version, o.seq), (2, 2));
        let mut other = Output {
            id: "c/p/k-y".into(),
            ..Output::default()
        };
        b.stamp(&mut other);
        assert_eq!((other.version, other.seq), (1, 3));
        let restored: Book = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(restored.outputs["c/p/k-x"].version, 2);
        assert_eq!(restored.seq, 3);
    }

    #[test]
    fn a_taken_over_book_keeps_the_stored_order_whatever_order_runs_finish_in() {
        // Snapshot at seq 1; the dead process then stored a@1 as 2 and b@1 as 3.
        let mut b = Book::default();
        let mut first = Output {
            id: "c/p/k-first".into(),
            ..Output::default()
        };
        b.stamp(&mut first);
        b.adopt([
            ("c/p/a".into(), 1, 2),
            ("c/p/b".into(), 1, 3),
            ("c/p/old".into(), 1, 1),
        ]);
        // This time b finishes first: it keeps 3, a keeps 2, and a new output comes after both.
        let mut ob = Output {
            id: "c/p/b".into(),
            ..Output::default()
        };
        b.stamp(&mut ob);
        let mut oa = Output {
            id: "c/p/a".into(),
            ..Output::default()
        };
        b.stamp(&mut oa);
        let mut new = Output {
            id: "c/p/n".into(),
            ..Output::default()
        };
        b.stamp(&mut new);
        assert_eq!((ob.version, ob.seq), (1, 3));
        assert_eq!((oa.version, oa.seq), (1, 2));
        assert_eq!((new.version, new.seq), (1, 4));
        // A second version of a was never stored: it is new.
        b.stamp(&mut oa);
        assert_eq!((oa.version, oa.seq), (2, 5));
    }
}
