//! Reading a streamed chat completion: Server-Sent Events lines, however the network cut them,
//! and the answer they add up to.

use prompter_core::error::PluginError;
use tokio::sync::mpsc;

/// Splits an SSE byte stream into lines, however the network cut it (mid-line, mid-character).
#[derive(Debug, Default)]
pub(super) struct SseLines {
    pending: Vec<u8>,
}

impl SseLines {
    /// The complete lines in `pending` + `chunk`; keeps the unfinished tail.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(chunk);
        let Some(last_newline) = self.pending.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let complete: Vec<u8> = self.pending.drain(..=last_newline).collect();
        complete
            .split(|b| *b == b'\n')
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }

    /// The unfinished last line, when the stream ended without a newline.
    pub(super) fn rest(&mut self) -> Option<String> {
        let rest = std::mem::take(&mut self.pending);
        (!rest.is_empty()).then(|| String::from_utf8_lossy(&rest).into_owned())
    }
}

/// What one SSE line says.
#[derive(Debug, Default, PartialEq)]
pub(super) struct SseEvent {
    /// New text (`choices[0].delta.content`), when non-empty.
    pub(super) delta: Option<String>,
    /// `choices[0].finish_reason`, when set.
    pub(super) finish_reason: Option<String>,
    /// The chunk's `model`.
    pub(super) model: Option<String>,
    /// `data: [DONE]`.
    pub(super) done: bool,
    /// An `{"error": ...}` sent inside the stream.
    pub(super) error: Option<String>,
}

/// Reads one SSE line. Comments (`: keep-alive`), blank lines, other fields (`event:`, `id:`)
/// and undecodable data give `None`; so do chunks without content, such as the role-only first
/// one.
pub(super) fn sse_event(line: &str) -> Option<SseEvent> {
    let data = line.trim().strip_prefix("data:")?.trim();
    if data == "[DONE]" {
        return Some(SseEvent {
            done: true,
            ..SseEvent::default()
        });
    }
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    if let Some(e) = v.get("error") {
        let message = e
            .as_str()
            .or_else(|| e.get("message").and_then(|m| m.as_str()))
            .unwrap_or("unspecified error");
        return Some(SseEvent {
            error: Some(message.to_owned()),
            ..SseEvent::default()
        });
    }
    let choice = v.get("choices")?.as_array()?.iter().find(|c| {
        c.get("index")
            .and_then(serde_json::Value::as_u64)
            .is_none_or(|i| i == 0)
    })?;
    let event = SseEvent {
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
        done: false,
        error: None,
    };
    (event.delta.is_some() || event.finish_reason.is_some()).then_some(event)
}

/// The answer gathered from a stream so far.
#[derive(Debug, Default)]
pub(super) struct StreamedReply {
    pub(super) text: String,
    pub(super) model: Option<String>,
    pub(super) finish_reason: Option<String>,
    pub(super) done: bool,
}

impl StreamedReply {
    /// Takes in one line, passing new text on to `tokens`.
    pub(super) async fn take(
        &mut self,
        who: &str,
        line: &str,
        tokens: &mpsc::Sender<String>,
    ) -> Result<(), PluginError> {
        let Some(event) = sse_event(line) else {
            return Ok(());
        };
        if let Some(message) = event.error {
            return Err(PluginError::external(format!(
                "{who}: the server reported an error mid-stream after {} characters: {message}",
                self.text.chars().count()
            )));
        }
        self.done |= event.done;
        if self.model.is_none() {
            self.model = event.model;
        }
        if event.finish_reason.is_some() {
            self.finish_reason = event.finish_reason;
        }
        if let Some(delta) = event.delta {
            self.text.push_str(&delta);
            // A closed receiver only means nobody is watching the stream.
            let _ = tokens.send(delta).await;
        }
        Ok(())
    }
}
