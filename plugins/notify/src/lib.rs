//! The `notify` stage: turns a pipeline run into an [`Output`] and delivers it.
//!
//! It owns the shape of what the agent sees (kind, title, text, trigger, sources, timings) and
//! where it goes: the engine's output stream (`stdout: true`, which `prompter replay` prints as
//! JSON lines and `prompter demo` renders as cards) and, optionally, a JSONL file. Agent feed,
//! webhooks and Slack come later as further targets.
//!
//! ```yaml
//! - id: deliver
//!   plugin: notify
//!   config:
//!     kind: suggestion
//!     title: "{{ event.tracker.name }}"
//!     text: "{{ stages.answer.text }}"   # default: the latest earlier output's `text`
//!     sources: retrieve                  # default: the latest earlier output with `documents`
//!     key: "{{ event.tracker.name }}"    # optional: same key = a new version of the same output
//!     data: { crm_id: "{{ conversation.symbl_conversation_id }}" }  # optional extra fields
//!     jsonl: ../out/suggestions.jsonl    # optional; relative to this pipeline file
//! ```
//!
//! When an earlier `chat` stage streamed drafts (its output has `output: {id, version}`), this
//! stage delivers the complete answer as the next version of that output. When the answer is
//! degraded (an earlier output has `degraded`), the output says so in its `degraded` field.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::output::{Output, Status, Trigger};
use prompter_core::plugin::{
    BuildContext, BuildError, Flow, Plugin, PluginFactory, Reported, StageContext,
};
use prompter_core::template::Template;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// Configuration of a `notify` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// What the output is: `suggestion`, `alert`, `open_questions`, `summary`, ...
    pub kind: String,
    /// Optional title template.
    #[serde(default)]
    pub title: Option<String>,
    /// Text template. Default: the latest earlier stage output's `text`.
    #[serde(default)]
    pub text: Option<String>,
    /// The stage whose `documents` are the sources. Default: the latest earlier stage with
    /// documents (none when there is none).
    #[serde(default)]
    pub sources: Option<String>,
    /// Template of a key that makes later outputs *updates* of earlier ones: outputs of one
    /// conversation with the same key share an id and get increasing versions (a list card that
    /// grows). Default: none, every output is new.
    #[serde(default)]
    pub key: Option<String>,
    /// Extra fields for the output's `data`, each a template (rendered to a string).
    #[serde(default)]
    pub data: BTreeMap<String, String>,
    /// Deliver to the engine's output stream. Default true.
    #[serde(default = "yes")]
    pub stdout: bool,
    /// Also append each output as one JSON line to this file (relative to the pipeline file).
    #[serde(default)]
    pub jsonl: Option<PathBuf>,
}

fn yes() -> bool {
    true
}

/// Builds `notify` stages.
#[derive(Debug, Default)]
pub struct NotifyFactory;

impl PluginFactory for NotifyFactory {
    const NAME: &'static str = "notify";
    const DESCRIPTION: &'static str =
        "deliver an output (suggestion, alert, summary) to the output stream and files";
    type Config = NotifyConfig;

    fn build(
        &self,
        cfg: NotifyConfig,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        let title = cfg.title.as_deref().map(|t| cx.template("title", t));
        let text = cfg.text.as_deref().map(|t| cx.template("text", t));
        let key = cfg.key.as_deref().map(|t| cx.template("key", t));
        let data: Vec<(String, Option<Template>)> = cfg
            .data
            .iter()
            .map(|(k, t)| (k.clone(), cx.template(&format!("data.{k}"), t)))
            .collect();
        if let Some(id) = &cfg.sources {
            cx.check_stage_ref("sources", id);
        }
        if cfg.kind.trim().is_empty() {
            cx.report(BuildError::at("kind", "`kind` must not be empty"));
        }
        if !cfg.stdout && cfg.jsonl.is_none() {
            cx.report(
                BuildError::at("stdout", "this stage delivers nowhere")
                    .help("set `stdout: true` or a `jsonl:` file"),
            );
        }
        let jsonl = cfg.jsonl.map(|p| cx.base_dir.join(p));
        if cx.has_problems() {
            return Err(Reported);
        }
        Ok(Arc::new(Notify {
            kind: cfg.kind,
            title: title.flatten(),
            text: text.flatten(),
            key: key.flatten(),
            data: data
                .into_iter()
                .filter_map(|(k, t)| t.map(|t| (k, t)))
                .collect(),
            sources: cfg.sources,
            stdout: cfg.stdout,
            jsonl: jsonl.map(|path| JsonlFile {
                path,
                file: Mutex::new(None),
            }),
        }))
    }
}

struct JsonlFile {
    path: PathBuf,
    /// Opened on first write, so validating a pipeline creates no files.
    file: Mutex<Option<tokio::fs::File>>,
}

impl JsonlFile {
    async fn append(&self, line: &str) -> std::io::Result<()> {
        let mut guard = self.file.lock().await;
        if guard.is_none() {
            if let Some(dir) = self.path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .await?;
            *guard = Some(f);
        }
        let f = guard
            .as_mut()
            .ok_or_else(|| std::io::Error::other("invariant: file opened above"))?;
        f.write_all(line.as_bytes()).await?;
        f.write_all(b"\n").await?;
        f.flush().await
    }
}

/// A built `notify` stage.
pub struct Notify {
    kind: String,
    title: Option<Template>,
    text: Option<Template>,
    key: Option<Template>,
    data: Vec<(String, Template)>,
    sources: Option<String>,
    stdout: bool,
    jsonl: Option<JsonlFile>,
}

#[async_trait]
impl Plugin for Notify {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let text = match &self.text {
            Some(t) => cx.render(t)?,
            None => cx.latest_text().unwrap_or_default().to_owned(),
        };
        let text = text.trim().to_owned();
        if text.is_empty() {
            return Ok(Flow::Halt("nothing to deliver: the text is empty".into()));
        }
        let title = match &self.title {
            Some(t) => Some(cx.render(t)?.trim().to_owned()).filter(|t| !t.is_empty()),
            None => None,
        };
        let sources = cx.documents(self.sources.as_deref())?.to_vec();
        let event = cx.event();
        let id = match (cx.drafted(), &self.key) {
            // A streamed answer was delivered as drafts: this is its complete version.
            (Some(id), _) => id.to_owned(),
            (None, None) => cx.output_id(),
            (None, Some(k)) => cx.keyed_output_id(cx.render(k)?.trim()),
        };
        let output = Output {
            id,
            version: 0,
            status: Status::Final,
            seq: 0,
            kind: self.kind.clone(),
            conversation_id: event.conversation_id.to_string(),
            pipeline: cx.pipeline.to_owned(),
            title,
            text,
            trigger: Trigger::from_event(event),
            sources,
            timings: cx.timings(),
            model: cx.model(),
            data: if self.data.is_empty() {
                serde_json::Value::Null
            } else {
                let mut map = serde_json::Map::new();
                for (k, t) in &self.data {
                    map.insert(k.clone(), serde_json::Value::String(cx.render(t)?));
                }
                serde_json::Value::Object(map)
            },
            degraded: cx.degraded(),
            generation: 0,
        };
        // Delivered through the engine, which gives it its version; a file-only output (no
        // `stdout`) is written as it is.
        let output = if self.stdout {
            cx.emit(output).await?
        } else {
            output
        };
        if let Some(file) = &self.jsonl {
            let line = serde_json::to_string(&output)
                .map_err(|e| PluginError::internal("output did not serialize").with_source(e))?;
            file.append(&line).await.map_err(|e| {
                PluginError::external(format!("cannot append to `{}`", file.path.display()))
                    .with_source(e)
            })?;
        }
        Ok(Flow::Continue(
            serde_json::json!({ "id": output.id, "version": output.version }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::conversation::ConversationState;
    use prompter_core::output::{event_part, output_id};
    use prompter_core::plugin::{Drafted, Outputs, Resources, StageOutput, Typed};
    use prompter_core::resource::{ChatReply, ScoredDocument};
    use prompter_core::test_util::{
        TestHost, build, build_errors, event, run, run_on, run_with_outputs,
    };

    /// The id a run gives an unkeyed output: named after its triggering event.
    fn cx_id(e: &prompter_core::event::Event) -> String {
        output_id(&e.conversation_id, "test", &event_part(e.identity()))
    }
    use serde_json::json;

    #[tokio::test]
    async fn builds_a_self_explaining_output_and_appends_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/s.jsonl");
        let yaml = format!(
            "kind: suggestion\ntitle: \"{{{{ event.tracker.name }}}}\"\njsonl: {}\n",
            path.display()
        );
        let stage = build(
            &NotifyFactory,
            &yaml,
            &Resources::default(),
            &["kb", "answer"],
        )
        .unwrap();
        let e = event(
            "call-9",
            4200,
            json!({"type": "tracker_response", "isFinal": true, "trackers": [
            {"name": "Timing", "matches": [{"type": "vocabulary", "value": "next quarter", "messageRefs": []}]}]}),
        );
        let outputs = vec![
            (
                "kb".to_string(),
                json!({"documents": [{"id": "d1", "text": "Timing", "data": "Ask what changes next quarter.", "score": 0.7}]}),
            ),
            (
                "answer".to_string(),
                json!({"text": " Ask what changes next quarter. "}),
            ),
        ];
        let r = run(
            stage.as_ref(),
            &e,
            &ConversationState::new("call-9"),
            &outputs,
        )
        .await;
        assert!(matches!(r.flow, Ok(Flow::Continue(_))));
        let o = &r.emitted[0];
        assert_eq!(o.id, cx_id(&e));
        assert_eq!((o.version, o.status), (1, Status::Final));
        assert_eq!(o.kind, "suggestion");
        assert_eq!(o.title.as_deref(), Some("Timing"));
        assert_eq!(o.text, "Ask what changes next quarter.");
        assert_eq!(o.trigger.tracker.as_deref(), Some("Timing"));
        assert_eq!(o.trigger.phrases, ["next quarter"]);
        assert_eq!(o.sources[0].id, "d1");
        let written: Output =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        assert_eq!(&written, o);
    }

    #[tokio::test]
    async fn empty_text_delivers_nothing() {
        let stage = build(
            &NotifyFactory,
            "kind: suggestion\ntext: \"{{ stages.answer.text }}\"",
            &Resources::default(),
            &["answer"],
        )
        .unwrap();
        let e = event(
            "c",
            0,
            json!({"type": "message", "message": {"type": "started_listening"}}),
        );
        let r = run(
            stage.as_ref(),
            &e,
            &ConversationState::new("c"),
            &[("answer".into(), json!({"text": ""}))],
        )
        .await;
        assert!(matches!(r.flow, Ok(Flow::Halt(_))));
        assert!(r.emitted.is_empty());
    }

    #[tokio::test]
    async fn keyed_outputs_are_versions_of_one_card() {
        let stage = build(
            &NotifyFactory,
            "kind: open_questions\nkey: questions\ntext: \"{{ event.insight.text }}\"",
            &Resources::default(),
            &[],
        )
        .unwrap();
        let q = |text: &str| {
            event(
                "c7",
                0,
                json!({"type": "insight_response", "insights": [{"type": "question", "payload": {"content": text}}]}),
            )
        };
        // Versions are the engine's: one host stands for one conversation in one engine.
        let host = TestHost::default();
        let state = ConversationState::new("c7");
        let a = run_on(
            &host,
            stage.as_ref(),
            &q("Is there a trial?"),
            &state,
            &[],
            None,
        )
        .await;
        let b = run_on(&host, stage.as_ref(), &q("Who signs?"), &state, &[], None).await;
        assert_eq!(
            (a.emitted[0].id.as_str(), a.emitted[0].version),
            ("c7/test/k-questions", 1)
        );
        assert_eq!(
            (b.emitted[0].id.as_str(), b.emitted[0].version),
            ("c7/test/k-questions", 2)
        );
        // A released conversation's state is gone with it: a new host starts over.
        let c = run_on(
            &TestHost::default(),
            stage.as_ref(),
            &q("Again?"),
            &state,
            &[],
            None,
        )
        .await;
        assert_eq!(c.emitted[0].version, 1);
    }

    /// A degraded retrieval and a streamed, degraded answer: typed as the built-in stages give
    /// them, and as JSON as a Wasm or user stage would.
    fn earlier_typed() -> Outputs {
        let mut o = Outputs::new();
        o.push(
            "kb",
            StageOutput::typed(Typed::Documents {
                query: "Timing".into(),
                documents: vec![ScoredDocument {
                    id: "d1".into(),
                    text: "Timing".into(),
                    data: "Ask what changes next quarter.".into(),
                    score: 0.7,
                }]
                .into(),
                degraded: Some("ranked by words".into()),
            }),
        );
        o.push(
            "answer",
            StageOutput::typed(Typed::Reply {
                reply: ChatReply {
                    text: " Ask what changes next quarter. ".into(),
                    provider: "offline".into(),
                    model: None,
                },
                degraded: Some("`nebula` failed".into()),
                drafted: Some(Drafted {
                    id: "call-9/rta/t-timing".into(),
                    version: 2,
                }),
            }),
        );
        o
    }

    #[tokio::test]
    async fn typed_and_json_outputs_complete_the_drafted_output_alike() {
        let e = event(
            "call-9",
            4200,
            json!({"type": "tracker_response", "isFinal": true, "trackers": [
            {"name": "Timing", "matches": []}]}),
        );
        let typed = earlier_typed();
        let json: Outputs = typed
            .as_slice()
            .iter()
            .map(|(k, o)| (k.clone(), StageOutput::json(o.value().clone())))
            .collect();
        for yaml in [
            "kind: suggestion\nsources: kb",
            "kind: suggestion\ntitle: \"{{ stages.kb.query }}\"\ntext: \"{{ stages.answer.text }}\"\ndata: { provider: \"{{ stages.answer.provider }}\" }",
        ] {
            let stage = build(
                &NotifyFactory,
                yaml,
                &Resources::default(),
                &["kb", "answer"],
            )
            .unwrap();
            let mut delivered = Vec::new();
            for earlier in [&typed, &json] {
                let r = run_with_outputs(
                    &TestHost::default(),
                    stage.as_ref(),
                    &e,
                    &ConversationState::new("call-9"),
                    earlier,
                    None,
                )
                .await;
                assert!(matches!(r.flow, Ok(Flow::Continue(_))), "{:?}", r.flow);
                let mut o = r.emitted.into_iter().next().unwrap();
                o.timings.total_us = 0;
                o.timings.received_us = 0;
                delivered.push(o);
            }
            let o = &delivered[0];
            assert_eq!(o.id, "call-9/rta/t-timing");
            assert_eq!(o.text, "Ask what changes next quarter.");
            assert_eq!(o.sources[0].id, "d1");
            assert_eq!(
                o.degraded.as_deref(),
                Some("ranked by words; `nebula` failed")
            );
            assert_eq!(delivered[0], delivered[1], "{yaml}");
        }
    }

    #[test]
    fn delivering_nowhere_is_a_config_error() {
        let errs = build_errors(
            &NotifyFactory,
            "kind: alert\nstdout: false",
            &Resources::default(),
            &[],
        );
        assert_eq!(errs[0].path, "stdout");
    }
}
