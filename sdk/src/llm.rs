//! Asks one of the engine's LLM providers (the ones under `llm:` in the engine config) that the
//! stage was granted (`allow_llm: [nebula]`); keys stay in the engine.
//!
//! ```no_run
//! use prompter_sdk::llm::{self, ChatMessage};
//!
//! let answer = llm::chat(
//!     "default",
//!     "You answer in one short sentence.",
//!     &[ChatMessage::human("What is a good reply to 'it is too expensive'?")],
//! )?;
//! # let _ = answer;
//! # Ok::<(), String>(())
//! ```

/// One chat turn: `role` (`human` or `assistant`) and `text`.
pub use crate::bindings::prompter::plugin::host::ChatMessage;

impl ChatMessage {
    /// A `human` turn.
    pub fn human(text: impl Into<String>) -> Self {
        ChatMessage {
            role: "human".to_owned(),
            text: text.into(),
        }
    }

    /// An `assistant` turn.
    pub fn assistant(text: impl Into<String>) -> Self {
        ChatMessage {
            role: "assistant".to_owned(),
            text: text.into(),
        }
    }
}

/// Sends `messages` with `system_prompt` to `provider`; returns the answer text.
///
/// # Errors
/// The engine's reason: a provider the stage has no grant for (the message names the missing
/// `allow_llm` entry), a provider failure, a timeout, ...
pub fn chat(
    provider: &str,
    system_prompt: &str,
    messages: &[ChatMessage],
) -> Result<String, String> {
    crate::sys::chat(provider, system_prompt, messages)
}

/// One question, one answer.
///
/// # Errors
/// As [`chat`].
pub fn ask(provider: &str, system_prompt: &str, question: &str) -> Result<String, String> {
    chat(provider, system_prompt, &[ChatMessage::human(question)])
}
