//! The `dedupe` stage: suppresses repeats of the same trigger within one conversation.
//!
//! Symbl sends a tracker detection first as an interim result and then as a final one; the agent
//! should see one suggestion. The stage computes a key per event (a template) and halts the run
//! when the same key was already seen *in the same conversation* (the same tracker in another
//! call is not a repeat). With `cooldown_secs`, a key may fire again once that much call time has
//! passed. Time is the event's offset in the call, so replays behave exactly like live calls.
//!
//! The keys seen live in the engine's per-conversation state, not in the stage, so a reload or a
//! move of the conversation to another engine keeps them. A key counts as seen only once the run
//! that claimed it delivers: if that run fails (the model is down), the next trigger with the
//! same key is not suppressed; while it is in flight, a repeat is.
//!
//! ```yaml
//! - id: once
//!   plugin: dedupe
//!   config:
//!     key: "{{ event.tracker.name }}"   # default: tracker name + matched phrases, else the text
//!     cooldown_secs: 300                 # default: 0 = once per conversation
//! ```
//!
//! Output: `{"key": "...", "first": true}`.

use std::sync::Arc;

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::plugin::{BuildContext, Flow, Plugin, PluginFactory, Reported, StageContext};
use prompter_core::template::Template;
use serde::Deserialize;

/// The default key: a tracker's name and sorted matched phrases (so an interim and a final
/// result for the same match collide), or an insight's, topic's or message's text.
pub const DEFAULT_KEY: &str = "{{ event.kind }}|{% if event.tracker %}{{ event.tracker.name }}|\
{{ event.tracker.matches | map(attribute='value') | map('lower') | unique | sort | join(',') }}\
{% else %}{{ event.insight.text or event.topic.phrases or event.message.text or event.caption.text }}{% endif %}";

/// Configuration of a `dedupe` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupeConfig {
    /// Template for the key that identifies "the same trigger".
    #[serde(default = "default_key")]
    pub key: String,
    /// Seconds of call time after which a key may fire again; 0 means once per conversation.
    #[serde(default)]
    pub cooldown_secs: u64,
}

fn default_key() -> String {
    DEFAULT_KEY.to_owned()
}

/// Builds `dedupe` stages.
#[derive(Debug, Default)]
pub struct DedupeFactory;

impl PluginFactory for DedupeFactory {
    const NAME: &'static str = "dedupe";
    const DESCRIPTION: &'static str =
        "suppress repeats of the same trigger within one conversation";
    type Config = DedupeConfig;

    fn build(
        &self,
        cfg: DedupeConfig,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        let key = cx.template("key", &cfg.key).ok_or(Reported)?;
        Ok(Arc::new(Dedupe {
            key,
            cooldown_ms: cfg.cooldown_secs.saturating_mul(1000),
        }))
    }
}

/// A built `dedupe` stage.
#[derive(Debug)]
pub struct Dedupe {
    key: Template,
    cooldown_ms: u64,
}

#[async_trait]
impl Plugin for Dedupe {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let key = cx.render(&self.key)?;
        if cx.claim(&key, self.cooldown_ms) {
            Ok(Flow::Continue(
                serde_json::json!({"key": key, "first": true}),
            ))
        } else {
            Ok(Flow::Halt(format!("repeat of `{key}`")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::conversation::ConversationState;
    use prompter_core::plugin::Resources;
    use prompter_core::test_util::{TestHost, build, event, run_on};
    use serde_json::json;
    use std::collections::HashMap;

    fn tracker(conv: &str, at: u64, fin: bool, phrase: &str) -> prompter_core::event::Event {
        event(
            conv,
            at,
            json!({"type": "tracker_response", "isFinal": fin, "trackers": [
            {"name": "Budget Constraints", "matches": [{"type": "vocabulary", "value": phrase, "messageRefs": []}]}]}),
        )
    }

    /// One engine-owned state per conversation, as the engine keeps them.
    #[derive(Default)]
    struct Engine(HashMap<String, TestHost>);

    impl Engine {
        async fn passes(&mut self, stage: &dyn Plugin, e: &prompter_core::event::Event) -> bool {
            let host = self.0.entry(e.conversation_id.to_string()).or_default();
            let state = ConversationState::new(&e.conversation_id);
            let r = run_on(host, stage, e, &state, &[], None).await;
            matches!(r.flow.unwrap(), Flow::Continue(_))
        }
    }

    #[tokio::test]
    async fn interim_then_final_is_one_trigger_per_conversation() {
        let s = build(&DedupeFactory, "", &Resources::default(), &[]).unwrap();
        let mut engine = Engine::default();
        let s = s.as_ref();
        assert!(
            engine
                .passes(s, &tracker("a", 1000, false, "seems expensive"))
                .await
        );
        assert!(
            !engine
                .passes(s, &tracker("a", 1800, true, "Seems expensive"))
                .await
        );
        // Same tracker in another conversation is not a repeat.
        assert!(
            engine
                .passes(s, &tracker("b", 1900, true, "seems expensive"))
                .await
        );
        // A distinct match of the same tracker is a new trigger.
        assert!(
            engine
                .passes(s, &tracker("a", 30_000, true, "over our budget"))
                .await
        );
        // Forgotten once the conversation (and its engine-owned state) is released.
        engine.0.remove("a");
        assert!(
            engine
                .passes(s, &tracker("a", 40_000, true, "seems expensive"))
                .await
        );
    }

    #[tokio::test]
    async fn cooldown_uses_call_time() {
        let s = build(
            &DedupeFactory,
            "key: \"{{ event.tracker.name }}\"\ncooldown_secs: 60",
            &Resources::default(),
            &[],
        )
        .unwrap();
        let mut engine = Engine::default();
        let s = s.as_ref();
        assert!(engine.passes(s, &tracker("a", 0, true, "x")).await);
        assert!(!engine.passes(s, &tracker("a", 59_999, true, "y")).await);
        assert!(engine.passes(s, &tracker("a", 60_000, true, "z")).await);
    }
}
