//! A key-value scratch space private to this stage and the current conversation.
//!
//! The engine keeps it with the conversation's state: it survives instance recycling and
//! reloads, travels with the conversation's snapshot when a call moves to another engine, and is
//! dropped when the conversation ends, which makes it the place for per-conversation state
//! (counters, "already alerted" flags, ...). A call's writes are applied when the call returns.
//! Writes fail when the stage's space is full. A plugin that keeps state across calls belongs in
//! a pipeline with `concurrency: queue`, so its runs see each other's writes in order.
//!
//! Outside the engine it is an in-memory, thread-local map; [`reset`] clears it.
//!
//! ```
//! use prompter_sdk::kv;
//!
//! kv::reset();
//! let n: u32 = kv::get_json("count").unwrap_or(0);
//! kv::set_json("count", &(n + 1)).unwrap();
//! assert_eq!(kv::get("count").as_deref(), Some("1"));
//! ```

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::sys;

/// The value stored under `key`.
pub fn get(key: &str) -> Option<String> {
    sys::kv_get(key)
}

/// Stores `value` under `key`.
///
/// # Errors
/// The engine's reason when the stage's scratch space is full.
pub fn set(key: &str, value: &str) -> Result<(), String> {
    sys::kv_set(key, value)
}

/// Removes `key`.
pub fn delete(key: &str) {
    sys::kv_delete(key);
}

/// The value under `key` parsed as JSON; `None` when it is missing or does not parse as `T`.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Option<T> {
    get(key).and_then(|v| serde_json::from_str(&v).ok())
}

/// Stores `value` as JSON under `key`.
///
/// # Errors
/// The engine's reason when the space is full, or the serialization error.
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), String> {
    let text = serde_json::to_string(value).map_err(|e| e.to_string())?;
    set(key, &text)
}

/// True when `key` holds `"true"` (a flag set with [`set_flag`]).
pub fn flag(key: &str) -> bool {
    get_json::<bool>(key).unwrap_or(false)
}

/// Sets the flag `key` to true.
///
/// # Errors
/// The engine's reason when the space is full.
pub fn set_flag(key: &str) -> Result<(), String> {
    set(key, "true")
}

/// Clears the native in-memory store (for tests). In the engine this does nothing: the engine
/// drops a conversation's keys when the conversation ends.
pub fn reset() {
    crate::double::kv_reset();
}
