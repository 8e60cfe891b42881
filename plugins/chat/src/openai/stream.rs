//! Reading a streamed chat completion: what each `chat.completion.chunk` (the `data:` of one
//! Server-Sent Event, see [`super::sse`]) says, and the answer the chunks add up to.

use prompter_core::error::PluginError;
use tokio::sync::mpsc;

/// What one chunk says.
#[derive(Debug, Default, PartialEq)]
pub(super) struct ChunkEvent {
    /// New text (`choices[0].delta.content`), when non-empty.
    pub(super) delta: Option<String>,
    /// `choices[0].finish_reason`, when set.
    pub(super) finish_reason: Option<String>,
    /// The chunk's `model`.
    pub(super) model: Option<String>,
    /// An `{"error": ...}` sent inside the stream.
    pub(super) error: Option<String>,
    /// The token usage (the last chunk when `stream_options.include_usage` was asked).
    pub(super) usage: Option<Usage>,
}

/// Token usage, as the server reports it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub(super) struct Usage {
    #[serde(default)]
    pub(super) prompt_tokens: u64,
    #[serde(default)]
    pub(super) completion_tokens: u64,
}

/// Reads the JSON `data` of one event. Undecodable data gives `None`; so do chunks without
/// content, such as the role-only first one.
pub(super) fn chunk_event(data: &str) -> Option<ChunkEvent> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    if let Some(e) = v.get("error") {
        let message = e
            .as_str()
            .or_else(|| e.get("message").and_then(|m| m.as_str()))
            .unwrap_or("unspecified error");
        return Some(ChunkEvent {
            error: Some(message.to_owned()),
            ..ChunkEvent::default()
        });
    }
    let usage = v
        .get("usage")
        .and_then(|u| serde_json::from_value::<Usage>(u.clone()).ok());
    let choices = v.get("choices").and_then(|c| c.as_array());
    if usage.is_some() && choices.is_none_or(|c| c.is_empty()) {
        return Some(ChunkEvent {
            usage,
            ..ChunkEvent::default()
        });
    }
    let choice = choices?.iter().find(|c| {
        c.get("index")
            .and_then(serde_json::Value::as_u64)
            .is_none_or(|i| i == 0)
    })?;
    let event = ChunkEvent {
        delta: choice
            .get("delta")
            .and_then(|d| d.get("content"))
            .and_then(|c| c.as_str())
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        finish_reason: choice
            .get("finish_reason")
            .and_then(|f| f.as_str())
            .map(str::to_owned),
        model: v.get("model").and_then(|m| m.as_str()).map(str::to_owned),
        error: None,
        usage,
    };
    (event.delta.is_some() || event.finish_reason.is_some() || event.usage.is_some())
        .then_some(event)
}

/// The answer gathered from a stream so far.
#[derive(Debug, Default)]
pub(super) struct StreamedReply {
    pub(super) text: String,
    pub(super) model: Option<String>,
    pub(super) finish_reason: Option<String>,
    /// `data: [DONE]` has arrived.
    pub(super) done: bool,
}

impl StreamedReply {
    /// Takes in the `data` of one event, passing new text on to `tokens`.
    pub(super) async fn take(
        &mut self,
        who: &str,
        data: &str,
        tokens: &mpsc::Sender<String>,
    ) -> Result<(), PluginError> {
        let Some(event) = chunk_event(data) else {
            return Ok(());
        };
        if let Some(message) = event.error {
            return Err(PluginError::external(format!(
                "{who}: the server reported an error mid-stream after {} characters: {message}",
                self.text.chars().count()
            )));
        }
        if self.model.is_none() {
            self.model = event.model;
        }
        if event.finish_reason.is_some() {
            self.finish_reason = event.finish_reason;
        }
        if let Some(u) = event.usage {
            prompter_core::meter::tokens(u.prompt_tokens, u.completion_tokens);
        }
        if let Some(delta) = event.delta {
            if self.text.is_empty() {
                prompter_core::meter::first_token();
            }
            self.text.push_str(&delta);
            // A closed receiver only means nobody is watching the stream.
            let _ = tokens.send(delta).await;
        }
        Ok(())
    }
}
