//! The `prompt` stage: renders a system prompt and a chat message list from templates.
//!
//! It owns turning the event, the conversation and the retrieved documents into a
//! [`ChatRequest`]; it does not call any model (that is the `chat` stage).
//!
//! ```yaml
//! - id: render
//!   plugin: prompt
//!   config:
//!     documents: retrieve          # stage whose `documents` are the context (default: the latest)
//!     transcript_lines: 8          # how many transcript lines `transcript` holds
//!     transcript_from: redact      # optional: a stage whose `transcript` output replaces the state's
//!     max_line_chars: 1000         # longest `Speaker: text` line; longer ones are cut, ending in `…`
//!     system: "Be brief. Context: {% for d in documents %}{{ d.data }} {% endfor %}"
//!     messages:
//!       - { role: human, text: "{{ event.tracker.name }}" }
//!     max_new_tokens: 1024
//!     temperature: 0
//! ```
//!
//! Templates see the usual context (`event`, `conversation`, `stages`, `pipeline`) plus
//! `documents` (the context documents) and `transcript` (the last `transcript_lines` lines as
//! `Speaker: text`, each at most `max_line_chars` characters, so one runaway sentence cannot fill
//! the model's context). The defaults are the Real-Time Assist prompt of Symbl's RTA guide.

use std::sync::Arc;

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::minijinja;
use prompter_core::plugin::{
    BuildContext, BuildError, Flow, Plugin, PluginFactory, Reported, StageContext, StageOutput,
    Typed,
};
use prompter_core::resource::{ChatMessage, ChatRequest, Role};
use prompter_core::template::Template;
use serde::Deserialize;

/// The RTA guide's system prompt, with the retrieved guidance and the live transcript as context.
pub const DEFAULT_SYSTEM: &str = "You are assisting a support agent. Based on the following context, \
provide information to the agent, to convey to the user - one step at a time. Be very brief and \
concise in your instructions. Do not generate information on your own. Context: \
{% for d in documents %}{{ d.data }}\n{% endfor %}Transcript:\n{{ transcript }}";

/// Configuration of a `prompt` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptConfig {
    /// System prompt template. Default: the RTA guide's prompt.
    #[serde(default = "default_system")]
    pub system: String,
    /// Message templates, in order. Default: the RTA guide's three messages, the last being the
    /// tracker name.
    #[serde(default = "default_messages")]
    pub messages: Vec<MessageTemplate>,
    /// Stage whose `documents` are the context. Default: the latest earlier stage with documents.
    #[serde(default)]
    pub documents: Option<String>,
    /// Take the transcript from this earlier stage's `transcript` output (a list of
    /// `{speaker, text}`) instead of the conversation state; e.g. a PII redactor's output, so no
    /// raw transcript reaches the model. Default: the conversation state.
    #[serde(default)]
    pub transcript_from: Option<String>,
    /// How many recent transcript lines `transcript` holds. Default 8.
    #[serde(default = "default_transcript_lines")]
    pub transcript_lines: usize,
    /// Longest line `transcript` holds, in characters, `Speaker: ` included; a longer line keeps
    /// its beginning and ends with `…` (cut on a character boundary). At least 2. Default 1000.
    #[serde(default = "default_max_line_chars")]
    pub max_line_chars: usize,
    /// Maximum tokens the model may generate. Default 1024.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: u32,
    /// Sampling temperature. Default 0.
    #[serde(default)]
    pub temperature: f64,
}

/// One message template.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageTemplate {
    /// `human` or `assistant`.
    pub role: Role,
    /// The text template.
    pub text: String,
}

fn default_system() -> String {
    DEFAULT_SYSTEM.to_owned()
}
fn default_messages() -> Vec<MessageTemplate> {
    vec![
        MessageTemplate {
            role: Role::Human,
            text: "Hi. I am a support agent. I want to help my customer based on the context."
                .into(),
        },
        MessageTemplate {
            role: Role::Assistant,
            text: "Hi, I am a conversation expert agent. I would be happy to help you".into(),
        },
        MessageTemplate {
            role: Role::Human,
            text: "{{ event.tracker.name or event.insight.text or event.message.text }}".into(),
        },
    ]
}
fn default_transcript_lines() -> usize {
    8
}
fn default_max_line_chars() -> usize {
    1000
}
fn default_max_new_tokens() -> u32 {
    1024
}

/// Builds `prompt` stages.
#[derive(Debug, Default)]
pub struct PromptFactory;

impl PluginFactory for PromptFactory {
    const NAME: &'static str = "prompt";
    const DESCRIPTION: &'static str = "render a system prompt and chat messages from templates";
    type Config = PromptConfig;

    fn build(
        &self,
        cfg: PromptConfig,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        let system = cx.template("system", &cfg.system);
        let messages: Vec<Option<(Role, Template)>> = cfg
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                cx.template(&format!("messages.{i}.text"), &m.text)
                    .map(|t| (m.role, t))
            })
            .collect();
        if let Some(id) = &cfg.documents {
            cx.check_stage_ref("documents", id);
        }
        if let Some(id) = &cfg.transcript_from {
            cx.check_stage_ref("transcript_from", id);
        }
        if cfg.max_line_chars < MIN_LINE_CHARS {
            cx.report(BuildError::at(
                "max_line_chars",
                format!(
                    "`max_line_chars` must be at least {MIN_LINE_CHARS} (a character and the `…`)"
                ),
            ));
        }
        if cfg.messages.is_empty() {
            cx.report(BuildError::at(
                "messages",
                "a prompt needs at least one message",
            ));
        }
        if cx.has_problems() {
            return Err(Reported);
        }
        let (Some(system), Some(messages)) =
            (system, messages.into_iter().collect::<Option<Vec<_>>>())
        else {
            return Err(Reported);
        };
        Ok(Arc::new(Prompt {
            system,
            messages,
            documents: cfg.documents,
            transcript_from: cfg.transcript_from,
            transcript_lines: cfg.transcript_lines,
            max_line_chars: cfg.max_line_chars,
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
        }))
    }
}

/// A built `prompt` stage.
#[derive(Debug)]
pub struct Prompt {
    system: Template,
    messages: Vec<(Role, Template)>,
    documents: Option<String>,
    transcript_from: Option<String>,
    transcript_lines: usize,
    max_line_chars: usize,
    max_new_tokens: u32,
    temperature: f64,
}

/// The smallest useful `max_line_chars`: one character of the line and the ellipsis.
const MIN_LINE_CHARS: usize = 2;

/// What ends a line that was cut.
const ELLIPSIS: char = '…';

/// `speaker: text`, cut to at most `max_chars` characters (the ellipsis included).
///
/// Walks characters, not bytes, so the cut falls on a char boundary, and stops at the limit, so
/// a megabyte-long sentence costs no more than a short one.
fn bounded_line(speaker: &str, text: &str, max_chars: usize) -> String {
    let mut chars = speaker.chars().chain(": ".chars()).chain(text.chars());
    let mut line = String::new();
    for _ in 0..max_chars.saturating_sub(1) {
        match chars.next() {
            Some(c) => line.push(c),
            None => return line,
        }
    }
    match (chars.next(), chars.next()) {
        (None, _) => {}
        (Some(last), None) => line.push(last),
        (Some(_), Some(_)) => line.push(ELLIPSIS),
    }
    line
}

#[async_trait]
impl Plugin for Prompt {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let documents = cx.documents(self.documents.as_deref())?;
        let transcript = match &self.transcript_from {
            Some(id) => {
                let lines = cx
                    .output(id)
                    .and_then(|v| v.get("transcript"))
                    .and_then(|t| t.as_array())
                    .ok_or_else(|| {
                        PluginError::input(format!(
                            "stage `{id}` did not output a `transcript` list"
                        ))
                    })?;
                let start = lines.len().saturating_sub(self.transcript_lines);
                lines[start..]
                    .iter()
                    .map(|l| {
                        let speaker = l
                            .get("speaker")
                            .and_then(|v| v.as_str())
                            .unwrap_or("Unknown");
                        let text = l.get("text").and_then(|v| v.as_str()).unwrap_or_default();
                        bounded_line(speaker, text, self.max_line_chars)
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            None => cx
                .conversation()
                .last_lines(self.transcript_lines)
                .iter()
                .map(|l| bounded_line(&l.speaker, &l.text, self.max_line_chars))
                .collect::<Vec<_>>()
                .join("\n"),
        };
        let base = cx.template_context();
        let ctx = minijinja::context! {
            documents => minijinja::Value::from_serialize(&*documents),
            transcript => transcript,
            ..base
        };
        let system_prompt = self.system.render(&ctx)?;
        let mut messages = Vec::with_capacity(self.messages.len());
        for (role, t) in &self.messages {
            messages.push(ChatMessage {
                role: *role,
                text: t.render(&ctx)?,
            });
        }
        let request = ChatRequest {
            system_prompt,
            messages,
            context: documents.to_vec(),
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
        };
        // Typed: the chat stage takes the request as it is (no JSON round trip).
        Ok(Flow::Output(StageOutput::typed(Typed::ChatRequest(
            Arc::new(request),
        ))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::conversation::ConversationState;
    use prompter_core::plugin::{Outputs, Resources};
    use prompter_core::resource::ScoredDocument;
    use prompter_core::test_util::{TestHost, build, build_errors, event, run, run_with_outputs};
    use serde_json::json;

    fn tracker_event() -> prompter_core::event::Event {
        event(
            "c1",
            5000,
            json!({"type": "tracker_response", "isFinal": true, "trackers": [
            {"name": "Budget Constraints", "matches": [{"type": "vocabulary", "value": "seems expensive", "messageRefs": []}]}]}),
        )
    }

    #[tokio::test]
    async fn default_prompt_is_the_rta_prompt_with_guidance_and_transcript() {
        let p = build(&PromptFactory, "", &Resources::default(), &["kb"]).unwrap();
        let mut state = ConversationState::new("c1");
        state.apply(&event(
            "c1",
            4000,
            json!({"type": "message_response", "messages": [
            {"from": {"name": "Dana"}, "payload": {"content": "Honestly it seems expensive."}}]}),
        ));
        let docs = json!({"documents": [{"id": "d1", "text": "Budget", "data": "Offer the starter tier.", "score": 0.8}]});
        let r = run(p.as_ref(), &tracker_event(), &state, &[("kb".into(), docs)]).await;
        let Ok(Flow::Output(out)) = r.flow else {
            panic!("{:?}", r.flow)
        };
        let Some(Typed::ChatRequest(typed)) = out.as_typed() else {
            panic!("{out:?}")
        };
        // Its JSON form (what templates read) is the same request.
        let req: ChatRequest = serde_json::from_value(out.value().clone()).unwrap();
        assert_eq!(req, **typed);
        assert!(
            req.system_prompt
                .starts_with("You are assisting a support agent.")
        );
        assert!(req.system_prompt.contains("Offer the starter tier."));
        assert!(
            req.system_prompt
                .contains("Dana: Honestly it seems expensive.")
        );
        assert_eq!(req.messages.len(), 3);
        assert_eq!(req.messages[2].text, "Budget Constraints");
        assert_eq!(req.messages[1].role, Role::Assistant);
        assert_eq!(req.context[0].id, "d1");
    }

    #[test]
    fn reports_bad_templates_and_unknown_stages() {
        let errs = build_errors(
            &PromptFactory,
            "documents: retreive\nsystem: \"{{ stages.nope.x }}\"\nmessages:\n  - { role: human, text: \"{{ oops(\" }\n",
            &Resources::default(),
            &["retrieve"],
        );
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["system", "messages.0.text", "documents"]);
        assert_eq!(errs[2].help.as_deref(), Some("did you mean `retrieve`?"));
        assert!(errs[1].message.starts_with("bad template: syntax error"));
    }

    #[tokio::test]
    async fn transcript_can_come_from_an_earlier_stage() {
        let p = build(
            &PromptFactory,
            "transcript_from: redact",
            &Resources::default(),
            &["kb", "redact"],
        )
        .unwrap();
        let mut state = ConversationState::new("c1");
        state.apply(&event("c1", 4000, json!({"type": "message_response", "messages": [
            {"from": {"name": "Dana"}, "payload": {"content": "My card is 4111 1111 1111 1111."}}]})));
        let redacted =
            json!({"transcript": [{"speaker": "Dana", "text": "My card is [redacted]."}]});
        let r = run(
            p.as_ref(),
            &tracker_event(),
            &state,
            &[("redact".into(), redacted)],
        )
        .await;
        let Some(v) = r.flow.as_ref().ok().and_then(Flow::json) else {
            panic!("{:?}", r.flow)
        };
        let system = v["system_prompt"].as_str().unwrap();
        assert!(system.contains("Dana: My card is [redacted]."), "{system}");
        assert!(!system.contains("4111"), "{system}");
        let r = run(p.as_ref(), &tracker_event(), &state, &[]).await;
        assert!(
            r.flow
                .unwrap_err()
                .message
                .contains("stage `redact` did not output a `transcript` list")
        );
    }

    fn said(text: &str) -> prompter_core::event::Event {
        event(
            "c1",
            4000,
            json!({"type": "message_response", "messages": [
            {"from": {"name": "Dana"}, "payload": {"content": text}}]}),
        )
    }

    fn system_prompt(r: prompter_core::test_util::RunResult) -> String {
        let Some(v) = r.flow.as_ref().ok().and_then(Flow::json) else {
            panic!("{:?}", r.flow)
        };
        v["system_prompt"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_one_megabyte_sentence_is_cut_to_max_line_chars() {
        let p = build(
            &PromptFactory,
            "system: \"{{ transcript }}\"",
            &Resources::default(),
            &["kb"],
        )
        .unwrap();
        let mut state = ConversationState::new("c1");
        state.apply(&said("Short one."));
        state.apply(&said(&"blah ".repeat(200_000)));
        state.apply(&said("After it."));
        let docs = json!({"documents": []});
        let prompt =
            system_prompt(run(p.as_ref(), &tracker_event(), &state, &[("kb".into(), docs)]).await);
        let lines: Vec<&str> = prompt.lines().collect();
        assert_eq!(lines.len(), 3, "{}", &prompt[..200]);
        assert_eq!(lines[0], "Dana: Short one.");
        let expected = format!("Dana: {}…", &"blah ".repeat(200)[..993]);
        assert_eq!(lines[1], expected);
        assert_eq!(lines[1].chars().count(), 1000);
        assert_eq!(lines[2], "Dana: After it.");
    }

    #[tokio::test]
    async fn lines_from_an_earlier_stage_are_bounded_too() {
        let p = build(
            &PromptFactory,
            "transcript_from: redact\nmax_line_chars: 12\nsystem: \"{{ transcript }}\"",
            &Resources::default(),
            &["kb", "redact"],
        )
        .unwrap();
        let state = ConversationState::new("c1");
        let redacted = json!({"transcript": [
            {"speaker": "Dana", "text": "Ça coûte très cher."},
            {"speaker": "Al", "text": "Pas à ça"},
            {"speaker": "Al", "text": "Pas à ça!"}]});
        let prompt = system_prompt(
            run(
                p.as_ref(),
                &tracker_event(),
                &state,
                &[
                    ("kb".into(), json!({"documents": []})),
                    ("redact".into(), redacted),
                ],
            )
            .await,
        );
        // 12 characters (not bytes) each; a line of exactly 12 is kept whole.
        assert_eq!(prompt, "Dana: Ça co…\nAl: Pas à ça\nAl: Pas à ç…");
    }

    #[test]
    fn bounded_line_counts_characters_and_keeps_short_lines() {
        assert_eq!(bounded_line("A", "hi", 1000), "A: hi");
        assert_eq!(bounded_line("A", "hi", 5), "A: hi");
        assert_eq!(bounded_line("A", "hi!", 5), "A: h…");
        assert_eq!(bounded_line("A", "😀😀😀", 5), "A: 😀…");
        assert_eq!(bounded_line("A", "", 2), "A…");
    }

    #[test]
    fn max_line_chars_below_two_is_a_config_error() {
        let errs = build_errors(
            &PromptFactory,
            "max_line_chars: 1",
            &Resources::default(),
            &[],
        );
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "max_line_chars");
        assert_eq!(
            errs[0].message,
            "`max_line_chars` must be at least 2 (a character and the `…`)"
        );
    }

    #[tokio::test]
    async fn documents_pass_typed_from_retrieve_and_the_temperature_stays_exact() {
        let p = build(
            &PromptFactory,
            "documents: kb
temperature: 0.7
system: \"{% for d in documents %}{{ d.data }}{% endfor %}\"",
            &Resources::default(),
            &["kb"],
        )
        .unwrap();
        let docs: Arc<[ScoredDocument]> = vec![ScoredDocument {
            id: "d1".into(),
            text: "Budget".into(),
            data: "Offer the starter tier.".into(),
            score: 0.8,
        }]
        .into();
        let mut earlier = Outputs::new();
        earlier.push(
            "kb",
            StageOutput::typed(Typed::Documents {
                query: "Budget".into(),
                documents: docs.clone(),
                degraded: None,
            }),
        );
        let r = run_with_outputs(
            &TestHost::default(),
            p.as_ref(),
            &tracker_event(),
            &ConversationState::new("c1"),
            &earlier,
            None,
        )
        .await;
        let Ok(Flow::Output(out)) = r.flow else {
            panic!("{:?}", r.flow)
        };
        let req = out.chat_request().unwrap();
        assert_eq!(req.system_prompt, "Offer the starter tier.");
        assert_eq!(req.context, *docs);
        assert_eq!(req.temperature, 0.7);
        // The request's JSON carries exactly 0.7, not the f32 widening 0.699999988079071.
        let json = serde_json::to_string(out.value()).unwrap();
        assert!(json.contains(r#""temperature":0.7"#), "{json}");
    }

    #[test]
    fn rejects_unknown_roles() {
        let errs = build_errors(
            &PromptFactory,
            "messages:\n  - { role: robot, text: hi }\n",
            &Resources::default(),
            &[],
        );
        assert!(errs[0].message.contains("robot"), "{errs:?}");
    }
}
