//! The echo stage behind `prompter plugin bench`: returns the event's sentence and the length of
//! the transcript, exactly what the engine's built-in benchmark twin (`NativeEcho` in
//! `engine/cli/src/bench.rs`) computes, so the difference between the two is the cost of
//! the Wasm boundary.

use prompter_sdk::prelude::*;
use serde_json::json;

/// The echo stage (config `{}`).
pub struct Echo;

impl Plugin for Echo {
    type Config = serde_json::Value;

    fn init(_config: serde_json::Value) -> Result<Self, Error> {
        Ok(Echo)
    }

    fn process(&mut self, event: &Event, conversation: &Conversation) -> Result<Outcome, Error> {
        let text = event.message().map(|m| m.text.clone()).unwrap_or_default();
        Ok(Outcome::next(
            json!({"echo": text, "lines": conversation.transcript.len()}),
        ))
    }
}

export_plugin!(Echo);

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_sdk::testing;

    #[test]
    fn echoes_the_sentence_and_counts_lines() {
        let mut p: Echo = testing::init(json!({})).unwrap();
        let e = testing::message_event("c", 0, "Sam", None, "Hello.", None);
        let convo = testing::conversation(vec![testing::line("Sam", "Hello.")]);
        let out = p.process(&e, &convo).unwrap();
        assert_eq!(out.output(), Some(&json!({"echo": "Hello.", "lines": 1})));
    }
}
