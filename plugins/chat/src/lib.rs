//! The `chat` stage and the chat providers that need no network.
//!
//! The stage sends the [`ChatRequest`] built by an earlier `prompt` stage to a named LLM
//! provider (a resource declared in the engine config's `llm:`), and outputs the answer. The
//! provider interface ([`ChatProvider`]) fits Nebula chat (with streamed tokens) and
//! OpenAI-compatible servers; this crate ships the `offline` provider, which answers with the
//! retrieved guidance verbatim so the engine is useful with no keys and no network, and the
//! `nebula` provider ([`nebula`]) for Symbl's Nebula chat, streamed or not.
//!
//! ```yaml
//! - id: answer
//!   plugin: chat
//!   config:
//!     llm: offline        # a provider from the engine config's `llm:`
//!     prompt: render      # the stage that built the request (default: the latest)
//! ```
//!
//! Output: `{"text": "...", "provider": "offline", "model": null}`.

use std::sync::Arc;

pub mod nebula;
pub use nebula::{NebulaConfig, NebulaProvider};

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::plugin::{BuildContext, Flow, Plugin, PluginFactory, Reported, StageContext};
use prompter_core::resource::{ChatProvider, ChatReply, ChatRequest};
use serde::Deserialize;
use tokio::sync::mpsc;

/// Configuration of a `chat` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatConfig {
    /// The provider, by its name in the engine config's `llm:`.
    pub llm: String,
    /// The stage whose output is the chat request. Default: the latest earlier stage that
    /// produced one (it has a `system_prompt`).
    #[serde(default)]
    pub prompt: Option<String>,
}

/// Builds `chat` stages.
#[derive(Debug, Default)]
pub struct ChatFactory;

impl PluginFactory for ChatFactory {
    const NAME: &'static str = "chat";
    const DESCRIPTION: &'static str =
        "ask an LLM provider (offline, Nebula, OpenAI-compatible) for an answer";
    type Config = ChatConfig;

    fn build(
        &self,
        cfg: ChatConfig,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        let provider = cx.chat_provider("llm", &cfg.llm);
        if let Some(id) = &cfg.prompt {
            cx.check_stage_ref("prompt", id);
        }
        match provider {
            Some(provider) if !cx.has_problems() => Ok(Arc::new(Chat {
                provider,
                prompt: cfg.prompt,
            })),
            _ => Err(Reported),
        }
    }
}

/// A built `chat` stage.
pub struct Chat {
    provider: Arc<dyn ChatProvider>,
    prompt: Option<String>,
}

#[async_trait]
impl Plugin for Chat {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let value = match &self.prompt {
            Some(id) => cx.output(id),
            None => cx.latest_with("system_prompt").map(|(_, v)| v),
        }
        .ok_or_else(|| {
            PluginError::input("no earlier stage produced a chat request (add a `prompt` stage)")
        })?;
        let request: ChatRequest = serde_json::from_value(value.clone()).map_err(|e| {
            PluginError::input("the prompt stage output is not a chat request").with_source(e)
        })?;
        let reply = self.provider.chat(&request, None).await?;
        let value = serde_json::to_value(&reply)
            .map_err(|e| PluginError::internal("chat reply did not serialize").with_source(e))?;
        Ok(Flow::Continue(value))
    }
}

/// Configuration of the `offline` provider.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineConfig {
    /// How many retrieved documents the answer repeats (best first). Default 1.
    #[serde(default = "default_documents")]
    pub documents: usize,
}

fn default_documents() -> usize {
    1
}

/// The provider that needs no model: it answers with the retrieved guidance verbatim.
#[derive(Debug, Clone)]
pub struct OfflineProvider {
    name: String,
    documents: usize,
}

impl OfflineProvider {
    /// A provider named `name`.
    pub fn new(name: &str, config: OfflineConfig) -> Self {
        OfflineProvider {
            name: name.to_owned(),
            documents: config.documents.max(1),
        }
    }
}

#[async_trait]
impl ChatProvider for OfflineProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError> {
        if request.context.is_empty() {
            return Err(PluginError::input(
                "the offline provider answers with retrieved guidance, and no document was retrieved",
            ));
        }
        let text = request
            .context
            .iter()
            .take(self.documents)
            .map(|d| d.data.trim())
            .collect::<Vec<_>>()
            .join("\n");
        if let Some(tx) = tokens {
            // A closed receiver only means nobody is watching the stream.
            let _ = tx.send(text.clone()).await;
        }
        Ok(ChatReply {
            text,
            provider: self.name.clone(),
            model: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::conversation::ConversationState;
    use prompter_core::plugin::Resources;
    use prompter_core::resource::{ChatMessage, Role, ScoredDocument};
    use prompter_core::test_util::{build, build_errors, event, run};
    use serde_json::json;

    fn resources() -> Resources {
        let mut r = Resources::default();
        r.chat.insert(
            "offline".into(),
            Arc::new(OfflineProvider::new("offline", OfflineConfig::default())),
        );
        r
    }

    fn request(docs: Vec<ScoredDocument>) -> serde_json::Value {
        serde_json::to_value(ChatRequest {
            system_prompt: "s".into(),
            messages: vec![ChatMessage {
                role: Role::Human,
                text: "Budget".into(),
            }],
            context: docs,
            max_new_tokens: 10,
            temperature: 0.0,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn offline_answers_with_the_top_guidance_verbatim() {
        let stage = build(&ChatFactory, "llm: offline", &resources(), &["render"]).unwrap();
        let docs = vec![
            ScoredDocument {
                id: "a".into(),
                text: "t".into(),
                data: "Offer a pilot.".into(),
                score: 0.9,
            },
            ScoredDocument {
                id: "b".into(),
                text: "t".into(),
                data: "Other.".into(),
                score: 0.2,
            },
        ];
        let e = event(
            "c",
            0,
            json!({"type": "message", "message": {"type": "started_listening"}}),
        );
        let r = run(
            stage.as_ref(),
            &e,
            &ConversationState::new("c"),
            &[("render".into(), request(docs))],
        )
        .await;
        assert_eq!(
            r.flow.unwrap(),
            Flow::Continue(json!({"text": "Offer a pilot.", "provider": "offline", "model": null}))
        );
    }

    #[tokio::test]
    async fn offline_without_documents_is_an_input_error() {
        let stage = build(&ChatFactory, "llm: offline", &resources(), &["render"]).unwrap();
        let e = event(
            "c",
            0,
            json!({"type": "message", "message": {"type": "started_listening"}}),
        );
        let r = run(
            stage.as_ref(),
            &e,
            &ConversationState::new("c"),
            &[("render".into(), request(vec![]))],
        )
        .await;
        assert_eq!(
            r.flow.unwrap_err().kind,
            prompter_core::error::ErrorKind::Input
        );
    }

    #[test]
    fn unknown_provider_gets_a_hint() {
        let errs = build_errors(
            &ChatFactory,
            "llm: ofline\nprompt: rendr",
            &resources(),
            &["render"],
        );
        assert_eq!(errs[0].path, "llm");
        assert_eq!(errs[0].message, "unknown llm provider `ofline`");
        assert_eq!(errs[0].help.as_deref(), Some("did you mean `offline`?"));
        assert_eq!(errs[1].path, "prompt");
    }

    #[tokio::test]
    async fn streams_tokens_when_asked() {
        let p = OfflineProvider::new("offline", OfflineConfig { documents: 2 });
        let (tx, mut rx) = mpsc::channel(4);
        let req: ChatRequest = serde_json::from_value(request(vec![
            ScoredDocument {
                id: "a".into(),
                text: "t".into(),
                data: "One.".into(),
                score: 0.9,
            },
            ScoredDocument {
                id: "b".into(),
                text: "t".into(),
                data: "Two.".into(),
                score: 0.5,
            },
        ]))
        .unwrap();
        let reply = p.chat(&req, Some(tx)).await.unwrap();
        assert_eq!(reply.text, "One.\nTwo.");
        assert_eq!(rx.recv().await.unwrap(), "One.\nTwo.");
    }
}
