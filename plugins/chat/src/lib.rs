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
//!     llm: nebula         # a provider from the engine config's `llm:`
//!     prompt: render      # the stage that built the request (default: the latest)
//!     stream:             # optional: drafts while the answer is generated
//!       kind: suggestion
//!       title: "{{ event.tracker.name }}"
//!     fallback: offline   # optional: answers when `llm` fails or would miss `deadline_ms`
//! ```
//!
//! Output (typed, a [`Typed::Reply`]; templates read it as JSON):
//! `{"text": "...", "provider": "nebula", "model": null}`, plus `degraded: "why"` when
//! the fallback answered and `output: {id, version}` when drafts were delivered (the `notify`
//! stage then completes that output instead of starting a new one).
//!
//! With `stream`, the first words go out as a `draft` output as soon as they arrive, then at
//! most every `every_ms` as more arrive. When the pipeline declares `deadline_ms`, the provider
//! gets the time left minus `reserve_ms`; if it fails or runs out of time, the fallback answers
//! and the output says why it is degraded.

use std::sync::Arc;

pub mod nebula;
pub mod openai;
pub use nebula::{NebulaConfig, NebulaEmbedConfig, NebulaEmbedder, NebulaProvider};
pub use openai::{OpenAiConfig, OpenAiEmbedConfig, OpenAiEmbedder, OpenAiProvider};

use std::time::{Duration, Instant};

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::output::{Output, Status, Trigger};
use prompter_core::plugin::{
    BuildContext, BuildError, Drafted, Flow, Plugin, PluginFactory, Reported, StageContext,
    StageOutput, Typed,
};
use prompter_core::resource::{ChatProvider, ChatReply, ChatRequest};
use prompter_core::template::Template;
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
    /// Deliver the answer while it is generated: `draft` versions of one output, completed by
    /// the `notify` stage under the same id. Default: off.
    #[serde(default)]
    pub stream: Option<StreamConfig>,
    /// A provider that answers when `llm` fails or would miss the pipeline's `deadline_ms`
    /// (e.g. `offline`, the retrieved guidance verbatim); its answer is marked degraded.
    #[serde(default)]
    pub fallback: Option<String>,
    /// Time kept for the fallback before the deadline, in milliseconds. Default 100.
    #[serde(default = "default_reserve_ms")]
    pub reserve_ms: u64,
}

/// How streamed drafts look and how often they are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The drafts' kind; use the `notify` stage's. Default `suggestion`.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Title template of the drafts; use the `notify` stage's.
    #[serde(default)]
    pub title: Option<String>,
    /// Least time between two drafts, in milliseconds (the first words go out at once).
    /// Default 150.
    #[serde(default = "default_every_ms")]
    pub every_ms: u64,
}

fn default_reserve_ms() -> u64 {
    100
}
fn default_kind() -> String {
    "suggestion".into()
}
fn default_every_ms() -> u64 {
    150
}

/// Builds `chat` stages.
#[derive(Debug, Default)]
pub struct ChatFactory;

impl PluginFactory for ChatFactory {
    const NAME: &'static str = "chat";
    const DESCRIPTION: &'static str = "ask an LLM provider (offline, Nebula, OpenAI-compatible) for an answer, streamed, with a fallback";
    type Config = ChatConfig;

    fn build(
        &self,
        cfg: ChatConfig,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        let provider = cx.chat_provider("llm", &cfg.llm);
        let fallback = cfg
            .fallback
            .as_deref()
            .map(|f| cx.chat_provider("fallback", f));
        if let Some(id) = &cfg.prompt {
            cx.check_stage_ref("prompt", id);
        }
        let stream = cfg.stream.map(|s| {
            let title = s.title.as_deref().map(|t| cx.template("stream.title", t));
            if s.kind.trim().is_empty() {
                cx.report(BuildError::at("stream.kind", "`kind` must not be empty"));
            }
            (s, title)
        });
        if cfg.fallback.as_deref() == Some(cfg.llm.as_str()) {
            cx.report(
                BuildError::at("fallback", "the fallback is the provider itself")
                    .help("name another provider, e.g. `offline`"),
            );
        }
        match provider {
            Some(provider) if !cx.has_problems() => Ok(Arc::new(Chat {
                provider,
                prompt: cfg.prompt,
                fallback: fallback.flatten(),
                reserve: Duration::from_millis(cfg.reserve_ms),
                stream: stream.map(|(s, title)| Drafts {
                    kind: s.kind,
                    title: title.flatten(),
                    every: Duration::from_millis(s.every_ms),
                }),
            })),
            _ => Err(Reported),
        }
    }
}

struct Drafts {
    kind: String,
    title: Option<Template>,
    every: Duration,
}

/// A built `chat` stage.
pub struct Chat {
    provider: Arc<dyn ChatProvider>,
    prompt: Option<String>,
    fallback: Option<Arc<dyn ChatProvider>>,
    reserve: Duration,
    stream: Option<Drafts>,
}

/// The draft output of a streamed answer, as delivered so far.
struct Draft {
    output: Output,
}

impl Chat {
    /// The request: shared as the `prompt` stage built it, or read from an earlier stage's
    /// JSON (a Wasm or user stage that writes requests).
    fn request(&self, cx: &StageContext<'_>) -> Result<Arc<ChatRequest>, PluginError> {
        cx.chat_request(self.prompt.as_deref())?.ok_or_else(|| {
            PluginError::input("no earlier stage produced a chat request (add a `prompt` stage)")
        })
    }

    /// Asks the primary provider, delivering drafts as tokens arrive when streaming.
    async fn ask(
        &self,
        cx: &StageContext<'_>,
        request: &ChatRequest,
        draft: &mut Option<Draft>,
    ) -> Result<ChatReply, PluginError> {
        let Some(stream) = &self.stream else {
            return self.provider.chat(request, None).await;
        };
        let (tx, mut rx) = mpsc::channel::<String>(64);
        let call = self.provider.chat(request, Some(tx));
        tokio::pin!(call);
        let mut text = String::new();
        let mut last_sent: Option<Instant> = None;
        let mut unsent = false;
        loop {
            tokio::select! {
                reply = &mut call => {
                    // Tokens sent just before the reply are part of it; the reply has them all.
                    return reply;
                }
                token = rx.recv() => {
                    let Some(token) = token else {
                        // The provider dropped its sender: only the reply is left to wait for.
                        return call.await;
                    };
                    text.push_str(&token);
                    unsent = true;
                    let due = last_sent.is_none_or(|t| t.elapsed() >= stream.every);
                    if due && !text.trim().is_empty() {
                        self.send_draft(cx, stream, draft, &text).await?;
                        last_sent = Some(Instant::now());
                        unsent = false;
                    }
                }
                // Coalesced tokens go out when the interval passes even if no new token comes.
                () = sleep_until_due(last_sent, stream.every), if unsent => {
                    self.send_draft(cx, stream, draft, &text).await?;
                    last_sent = Some(Instant::now());
                    unsent = false;
                }
            }
        }
    }

    async fn send_draft(
        &self,
        cx: &StageContext<'_>,
        stream: &Drafts,
        draft: &mut Option<Draft>,
        text: &str,
    ) -> Result<(), PluginError> {
        let d = match draft {
            Some(d) => {
                d.output.text = text.trim().to_owned();
                d.output.timings = cx.timings();
                d
            }
            None => {
                let title = match &stream.title {
                    Some(t) => Some(cx.render(t)?.trim().to_owned()).filter(|t| !t.is_empty()),
                    None => None,
                };
                let event = cx.event();
                draft.insert(Draft {
                    output: Output {
                        id: cx.output_id(),
                        version: 0,
                        status: Status::Draft,
                        seq: 0,
                        kind: stream.kind.clone(),
                        conversation_id: event.conversation_id.to_string(),
                        pipeline: cx.pipeline.to_owned(),
                        title,
                        text: text.trim().to_owned(),
                        trigger: Trigger::from_event(event),
                        sources: cx.documents(None)?.to_vec(),
                        timings: cx.timings(),
                        // The model is known once it answers; the provider is known now.
                        model: Some(self.provider.name().to_owned()),
                        data: serde_json::Value::Null,
                        degraded: None,
                        generation: 0,
                    },
                })
            }
        };
        d.output = cx.emit(d.output.clone()).await?;
        Ok(())
    }
}

async fn sleep_until_due(last: Option<Instant>, every: Duration) {
    match last {
        Some(t) => tokio::time::sleep_until((t + every).into()).await,
        None => std::future::pending().await,
    }
}

#[async_trait]
impl Plugin for Chat {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let request = self.request(cx)?;
        let mut draft = None;
        // With a deadline, the primary gets the time left minus the fallback's reserve.
        let budget = cx.deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .saturating_sub(if self.fallback.is_some() {
                    self.reserve
                } else {
                    Duration::ZERO
                })
        });
        let name = self.provider.name();
        let primary = match budget {
            Some(b) if b.is_zero() => Err(PluginError::timeout(format!(
                "no time left for `{name}` before the deadline"
            ))),
            Some(b) => match tokio::time::timeout(b, self.ask(cx, &request, &mut draft)).await {
                Ok(r) => r,
                Err(_) => Err(PluginError::timeout(format!(
                    "`{name}` would have missed the deadline (no answer within {} ms)",
                    b.as_millis()
                ))),
            },
            None => self.ask(cx, &request, &mut draft).await,
        };
        let (reply, degraded) = match primary {
            Ok(reply) => (reply, None),
            Err(e) => {
                let Some(fallback) = &self.fallback else {
                    close_draft(cx, draft, &describe(name, &e)).await;
                    return Err(e);
                };
                let why = describe(name, &e);
                tracing::warn!(pipeline = %cx.pipeline, stage = %cx.stage, conversation = %cx.event().conversation_id, reason = %why, fallback = %fallback.name(), "Chat falls back.");
                prompter_core::meter::fallback();
                match fallback.chat(&request, None).await {
                    Ok(reply) => (reply, Some(why)),
                    Err(f) => {
                        let why = format!(
                            "{why}; the fallback failed too: {}",
                            describe(fallback.name(), &f)
                        );
                        close_draft(cx, draft, &why).await;
                        return Err(PluginError::external(why));
                    }
                }
            }
        };
        Ok(Flow::Output(StageOutput::typed(Typed::Reply {
            reply,
            degraded,
            // The notify stage completes the drafted output under the same id.
            drafted: draft.map(|d| Drafted {
                id: d.output.id,
                version: d.output.version,
            }),
        })))
    }
}

/// When no answer completes a drafted output, its last version is re-sent as `final`
/// with what was said so far and why it stops there, so no sink keeps waiting.
async fn close_draft(cx: &StageContext<'_>, draft: Option<Draft>, why: &str) {
    let Some(mut d) = draft else { return };
    d.output.status = Status::Final;
    d.output.degraded = Some(format!("the answer is incomplete: {why}"));
    d.output.timings = cx.timings();
    // A closed output channel means the engine is stopping; nothing is left to tell.
    let _ = cx.emit(d.output).await;
}

/// Why a provider did not answer, for the `degraded` field.
fn describe(provider: &str, e: &PluginError) -> String {
    if e.kind == prompter_core::error::ErrorKind::Timeout {
        e.message.clone()
    } else {
        format!("`{provider}` failed: {}", e.message)
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
            prompter_core::meter::first_token();
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
            r.flow.unwrap().json(),
            Some(&json!({"text": "Offer a pilot.", "provider": "offline", "model": null}))
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

    mod live {
        use super::*;
        use crate::nebula::{NebulaConfig, NebulaProvider};
        use prompter_core::plugin::Outputs;
        use prompter_core::test_util::{TestHost, run_with_deadline, run_with_outputs};
        use prompter_fakes::nebula::{DEFAULT_ANSWER, Endpoint, NebulaFake};
        use std::time::{Duration, Instant};

        async fn setup() -> (NebulaFake, Resources) {
            let fake = NebulaFake::start("k").await;
            let mut r = resources();
            let cfg: NebulaConfig = serde_json::from_value(json!({
                "api_key": "k", "base_url": fake.url, "max_backoff_ms": 50, "max_retries": 2}))
            .unwrap();
            r.chat.insert(
                "nebula".into(),
                Arc::new(NebulaProvider::new("nebula", cfg).unwrap()),
            );
            (fake, r)
        }

        fn tracker() -> prompter_core::event::Event {
            event(
                "c",
                1000,
                json!({"type": "tracker_response", "isFinal": true, "trackers": [{"name": "Budget Constraints", "matches": []}]}),
            )
        }

        fn earlier() -> Vec<(String, serde_json::Value)> {
            let docs = vec![ScoredDocument {
                id: "d".into(),
                text: "Budget Constraints".into(),
                data: "Offer a phased rollout.".into(),
                score: 0.8,
            }];
            vec![
                ("kb".into(), json!({"documents": docs})),
                ("render".into(), request(docs)),
            ]
        }

        #[tokio::test]
        async fn streamed_answers_arrive_as_drafts_of_one_output() {
            let (fake, r) = setup().await;
            fake.set_chat_delay(Duration::from_millis(300));
            let yaml = "llm: nebula\nstream: { title: \"{{ event.tracker.name }}\" }";
            let stage = build(&ChatFactory, yaml, &r, &["kb", "render"]).unwrap();
            let out = run(
                stage.as_ref(),
                &tracker(),
                &ConversationState::new("c"),
                &earlier(),
            )
            .await;
            let Some(v) = out.flow.as_ref().ok().and_then(Flow::json) else {
                panic!("{:?}", out.flow)
            };
            assert_eq!(v["text"], DEFAULT_ANSWER);
            let first = &out.emitted[0];
            // The first three words went out while the rest was still being generated.
            assert_eq!(first.text, "Acknowledge the concern,");
            assert!(first.status == Status::Draft && first.version == 1);
            assert_eq!(first.title.as_deref(), Some("Budget Constraints"));
            assert_eq!(first.sources[0].data, "Offer a phased rollout.");
            assert!(
                out.emitted
                    .iter()
                    .all(|d| d.id == first.id && d.status == Status::Draft)
            );
            let last = out.emitted.last().unwrap();
            assert_eq!(
                v["output"],
                json!({"id": first.id, "version": last.version})
            );
            assert!(v.get("degraded").is_none());
        }

        #[tokio::test]
        async fn a_down_provider_falls_back_and_says_why() {
            let (fake, r) = setup().await;
            fake.set_down(true);
            let stage = build(
                &ChatFactory,
                "llm: nebula\nfallback: offline",
                &r,
                &["kb", "render"],
            )
            .unwrap();
            let out = run(
                stage.as_ref(),
                &tracker(),
                &ConversationState::new("c"),
                &earlier(),
            )
            .await;
            let Some(v) = out.flow.as_ref().ok().and_then(Flow::json) else {
                panic!("{:?}", out.flow)
            };
            assert_eq!(v["text"], "Offer a phased rollout.");
            assert_eq!(v["provider"], "offline");
            assert_eq!(
                v["degraded"],
                "`nebula` failed: Nebula `/v1/model/chat` failed after 3 attempt(s): 503: {\"message\":\"Service temporarily unavailable\"}"
            );
            assert_eq!(fake.chat_attempts(), 3);
        }

        #[tokio::test]
        async fn a_slow_provider_is_cut_at_the_deadline_minus_the_reserve() {
            let (fake, r) = setup().await;
            fake.set_chat_delay(Duration::from_secs(30));
            let yaml = "llm: nebula\nfallback: offline\nreserve_ms: 100\nstream: {}";
            let stage = build(&ChatFactory, yaml, &r, &["kb", "render"]).unwrap();
            let deadline = Instant::now() + Duration::from_millis(600);
            let out = run_with_deadline(
                stage.as_ref(),
                &tracker(),
                &ConversationState::new("c"),
                &earlier(),
                Some(deadline),
            )
            .await;
            let Some(v) = out.flow.as_ref().ok().and_then(Flow::json) else {
                panic!("{:?}", out.flow)
            };
            let why = v["degraded"].as_str().unwrap();
            assert!(
                why.starts_with("`nebula` would have missed the deadline (no answer within "),
                "{why}"
            );
            assert_eq!(v["provider"], "offline");
            // The first words were drafted before the cut; the fallback completes that output.
            assert_eq!(out.emitted[0].text, "Acknowledge the concern,");
            assert_eq!(v["output"]["id"], json!(out.emitted[0].id));
        }

        #[tokio::test]
        async fn a_503_twice_then_200_is_not_degraded_and_no_fallback_means_an_error() {
            let (fake, r) = setup().await;
            fake.fail_next(Endpoint::Chat, &[503, 503]);
            let stage = build(
                &ChatFactory,
                "llm: nebula\nfallback: offline",
                &r,
                &["kb", "render"],
            )
            .unwrap();
            let out = run(
                stage.as_ref(),
                &tracker(),
                &ConversationState::new("c"),
                &earlier(),
            )
            .await;
            let Some(v) = out.flow.as_ref().ok().and_then(Flow::json) else {
                panic!("{:?}", out.flow)
            };
            assert_eq!(
                (v["text"].as_str(), v.get("degraded")),
                (Some(DEFAULT_ANSWER), None)
            );

            fake.set_down(true);
            let plain = build(&ChatFactory, "llm: nebula", &r, &["kb", "render"]).unwrap();
            let out = run(
                plain.as_ref(),
                &tracker(),
                &ConversationState::new("c"),
                &earlier(),
            )
            .await;
            let err = out.flow.unwrap_err();
            assert_eq!(err.kind, prompter_core::error::ErrorKind::External);
            assert!(
                err.message
                    .starts_with("Nebula `/v1/model/chat` failed after 3 attempt(s)"),
                "{err}"
            );
        }

        #[tokio::test]
        async fn a_draft_that_no_answer_completes_is_closed_as_incomplete() {
            let (fake, r) = setup().await;
            fake.set_chat_delay(Duration::from_secs(30));
            let stage = build(
                &ChatFactory,
                "llm: nebula\nstream: {}",
                &r,
                &["kb", "render"],
            )
            .unwrap();
            let deadline = Instant::now() + Duration::from_millis(400);
            let out = run_with_deadline(
                stage.as_ref(),
                &tracker(),
                &ConversationState::new("c"),
                &earlier(),
                Some(deadline),
            )
            .await;
            assert_eq!(
                out.flow.unwrap_err().kind,
                prompter_core::error::ErrorKind::Timeout
            );
            let (first, last) = (&out.emitted[0], out.emitted.last().unwrap());
            assert_eq!(first.status, Status::Draft);
            assert_eq!(
                (last.id.as_str(), last.status),
                (first.id.as_str(), Status::Final)
            );
            assert_eq!(last.text, "Acknowledge the concern,");
            let why = last.degraded.as_deref().unwrap();
            assert!(
                why.starts_with(
                    "the answer is incomplete: `nebula` would have missed the deadline"
                ),
                "{why}"
            );
        }

        #[tokio::test]
        async fn a_typed_request_goes_out_exactly_and_the_reply_comes_back_typed() {
            let (fake, r) = setup().await;
            let docs = vec![ScoredDocument {
                id: "d".into(),
                text: "Budget Constraints".into(),
                data: "Offer a phased rollout.".into(),
                score: 0.8,
            }];
            let mut req: ChatRequest = serde_json::from_value(request(docs.clone())).unwrap();
            req.temperature = 0.7;
            let mut earlier = Outputs::new();
            earlier.push(
                "kb",
                StageOutput::typed(Typed::Documents {
                    query: "Budget".into(),
                    documents: docs.into(),
                    degraded: None,
                }),
            );
            earlier.push("render", StageOutput::typed(Typed::ChatRequest(req.into())));
            let stage = build(
                &ChatFactory,
                "llm: nebula\nstream: {}",
                &r,
                &["kb", "render"],
            )
            .unwrap();
            let out = run_with_outputs(
                &TestHost::default(),
                stage.as_ref(),
                &tracker(),
                &ConversationState::new("c"),
                &earlier,
                None,
            )
            .await;
            // The body carries the number as written: 0.7, not 0.699999988079071.
            assert_eq!(fake.chat_requests()[0]["temperature"], json!(0.7));
            let Ok(Flow::Output(o)) = out.flow else {
                panic!("{:?}", out.flow)
            };
            let Some(Typed::Reply {
                reply,
                degraded: None,
                drafted: Some(d),
            }) = o.as_typed()
            else {
                panic!("{o:?}")
            };
            assert_eq!(reply.text, DEFAULT_ANSWER);
            let last = out.emitted.last().unwrap();
            assert_eq!((d.id.as_str(), d.version), (last.id.as_str(), last.version));
            assert_eq!(last.sources[0].data, "Offer a phased rollout.");
            assert_eq!(o.value()["output"]["id"], json!(last.id));
        }

        #[test]
        fn a_fallback_to_itself_or_unknown_is_a_config_error() {
            let r = resources();
            let errs = build_errors(&ChatFactory, "llm: offline\nfallback: offline", &r, &[]);
            assert_eq!(errs[0].path, "fallback");
            let errs = build_errors(&ChatFactory, "llm: offline\nfallback: ofline", &r, &[]);
            assert_eq!(errs[0].help.as_deref(), Some("did you mean `offline`?"));
        }
    }
}
