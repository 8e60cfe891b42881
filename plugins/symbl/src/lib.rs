//! The `symbl_conversation` stage: what Symbl's Conversation API knows about a conversation
//! (summary, action items, questions, topics, analytics, detected trackers), as one output that
//! later stages and templates read (`stages.<id>.summary`, `stages.<id>.action_items`, ...).
//!
//! It suits a post-call pipeline (`on: [conversation_completed]`): Symbl's conversation id
//! arrives with that event and the engine keeps it in the conversation state. Credentials come
//! from environment variables (by name, as in the engine's `symbl:` section). With
//! `optional: true` a missing credential (or a missing conversation id) is not an error: the
//! stage outputs `{"available": false, "reason": "..."}` and the pipeline goes on, so a shipped
//! pipeline can use Symbl's insights when keys are present and still run without them.
//!
//! ```yaml
//! - id: insights
//!   plugin: symbl_conversation
//!   config:
//!     parts: [summary, action_items, questions, topics, analytics]   # the default; also `trackers`
//!     conversation_id: "{{ conversation.symbl_conversation_id }}"     # the default
//!     optional: true                                                  # default false
//!     # api_base: https://api.symbl.ai, app_id_env: SYMBL_APP_ID, app_secret_env: SYMBL_APP_SECRET
//! ```
//!
//! Output: `{"available": true, "conversation_id": "...", "summary": "sentences joined",
//! "text": <the same>, "action_items": [...], "questions": [...], "topics": [...],
//! "analytics": {...}}` with only the parts asked for. A part whose endpoint failed is empty and
//! its error is under `errors.<part>`; when every part fails the stage fails.
//!
//! It does not own the HTTP client or the wire format ([`prompter_symbl::conversation_api`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::plugin::{
    BuildContext, BuildError, Flow, Plugin, PluginFactory, Reported, StageContext,
};
use prompter_core::template::Template;
use prompter_symbl::auth::{AuthError, Credentials, SymblAuth};
use prompter_symbl::config::SymblConfig;
use prompter_symbl::conversation_api::{
    ConversationClient, ConversationError, ConversationParts, Part,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

/// Configuration of a `symbl_conversation` stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymblConversationConfig {
    /// The parts to read: `summary`, `action_items`, `questions`, `topics`, `analytics`,
    /// `trackers`. Default: all but `trackers`.
    #[serde(default = "default_parts")]
    pub parts: Vec<Part>,
    /// Template of Symbl's conversation id. Default
    /// `{{ conversation.symbl_conversation_id }}`.
    #[serde(default = "default_conversation_id")]
    pub conversation_id: String,
    /// REST base URL. Default `https://api.symbl.ai`.
    #[serde(default)]
    pub api_base: Option<String>,
    /// Environment variable with the app id. Default `SYMBL_APP_ID`.
    #[serde(default)]
    pub app_id_env: Option<String>,
    /// Environment variable with the app secret. Default `SYMBL_APP_SECRET`.
    #[serde(default)]
    pub app_secret_env: Option<String>,
    /// When true, missing credentials or a missing conversation id give
    /// `{"available": false, "reason": ...}` instead of an error. Default false.
    #[serde(default)]
    pub optional: bool,
}

fn default_parts() -> Vec<Part> {
    Part::DEFAULT.to_vec()
}

fn default_conversation_id() -> String {
    "{{ conversation.symbl_conversation_id }}".into()
}

/// Builds `symbl_conversation` stages.
#[derive(Default, Clone)]
pub struct SymblConversationFactory {
    /// Where credential variables are read: the process environment when `None`.
    env: Option<Arc<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for SymblConversationFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vars: Option<Vec<&String>> = self.env.as_ref().map(|m| m.keys().collect());
        f.debug_struct("SymblConversationFactory")
            .field("env_vars", &vars)
            .finish()
    }
}

impl SymblConversationFactory {
    /// A factory whose stages read credential variables from `vars` instead of the process
    /// environment (tests, and hosts that embed the engine with their own secrets).
    pub fn with_env<K: Into<String>, V: Into<String>>(
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        SymblConversationFactory {
            env: Some(Arc::new(
                vars.into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            )),
        }
    }
}

impl PluginFactory for SymblConversationFactory {
    const NAME: &'static str = "symbl_conversation";
    const DESCRIPTION: &'static str =
        "read a conversation's summary, action items, questions, topics and analytics from Symbl";
    type Config = SymblConversationConfig;

    fn build(
        &self,
        cfg: SymblConversationConfig,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        let template = cx.template("conversation_id", &cfg.conversation_id);
        if cfg.parts.is_empty() {
            cx.report(
                BuildError::at("parts", "`parts` is empty: the stage would read nothing")
                    .help("list some of `summary`, `action_items`, `questions`, `topics`, `analytics`, `trackers`, or leave `parts` out for the default"),
            );
        }
        let mut symbl = SymblConfig::default();
        if let Some(base) = cfg.api_base {
            if !(base.starts_with("http://") || base.starts_with("https://")) {
                cx.report(BuildError::at(
                    "api_base",
                    format!("`api_base` must be an http(s) URL, not `{base}`"),
                ));
            }
            symbl.api_base = base;
        }
        for (path, value, slot) in [
            ("app_id_env", cfg.app_id_env, &mut symbl.app_id_env),
            (
                "app_secret_env",
                cfg.app_secret_env,
                &mut symbl.app_secret_env,
            ),
        ] {
            if let Some(v) = value {
                if v.trim().is_empty() {
                    cx.report(BuildError::at(path, format!("`{path}` is empty")));
                }
                *slot = v;
            }
        }
        let mut parts = cfg.parts;
        parts.sort();
        parts.dedup();
        match template {
            Some(conversation_id) if !cx.has_problems() => Ok(Arc::new(SymblConversation {
                symbl,
                parts,
                conversation_id,
                optional: cfg.optional,
                env: self.env.clone(),
                client: OnceCell::new(),
                said_unavailable: AtomicBool::new(false),
            })),
            _ => Err(Reported),
        }
    }
}

/// A built `symbl_conversation` stage.
pub struct SymblConversation {
    symbl: SymblConfig,
    parts: Vec<Part>,
    conversation_id: Template,
    optional: bool,
    env: Option<Arc<BTreeMap<String, String>>>,
    /// Made on the first run that finds credentials, so validating a pipeline needs none.
    client: OnceCell<ConversationClient>,
    /// Whether "unavailable" was logged at info already (then only at debug).
    said_unavailable: AtomicBool,
}

impl SymblConversation {
    async fn client(&self) -> Result<&ConversationClient, ConversationError> {
        self.client
            .get_or_try_init(|| async {
                let auth = match &self.env {
                    None => SymblAuth::shared(&self.symbl)?,
                    Some(vars) => {
                        let creds =
                            Credentials::from_lookup(&self.symbl, |v| vars.get(v).cloned())?;
                        Arc::new(SymblAuth::new(&self.symbl, creds)?)
                    }
                };
                ConversationClient::new(&self.symbl, auth)
            })
            .await
    }

    fn unavailable(&self, stage: &str, reason: String) -> Flow {
        if !self.said_unavailable.swap(true, Ordering::Relaxed) {
            tracing::info!(stage, reason = %reason, "Symbl conversation insights are unavailable; continuing without them.");
        } else {
            tracing::debug!(stage, reason = %reason, "Symbl conversation insights are unavailable.");
        }
        Flow::Continue(json!({"available": false, "reason": reason}))
    }
}

#[async_trait]
impl Plugin for SymblConversation {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let client = match self.client().await {
            Ok(c) => c,
            Err(ConversationError::Auth(e @ AuthError::MissingCredential { .. }))
                if self.optional =>
            {
                return Ok(self.unavailable(cx.stage, e.to_string()));
            }
            Err(e) => return Err(to_plugin_error(e)),
        };
        let id = cx.render(&self.conversation_id)?;
        let id = id.trim();
        // An unset id renders as nothing, or as `None` through a plain `{{ ... }}`.
        if id.is_empty() || id.eq_ignore_ascii_case("none") {
            let reason = "no Symbl conversation id: `conversation_id` rendered empty (the call's `conversation_completed` carried none)";
            if self.optional {
                return Ok(self.unavailable(cx.stage, reason.to_owned()));
            }
            return Err(PluginError::input(reason));
        }
        let parts = client.fetch(id, &self.parts).await;
        let errors = parts.errors();
        if errors.len() == parts.requested()
            && let Some((_, first)) = errors.first()
        {
            let more = errors.len() - 1;
            let mut err = to_plugin_error((*first).clone());
            if more > 0 && !matches!(first, ConversationError::NotFound { .. }) {
                err.message = format!("{} (and {more} more parts failed)", err.message);
            }
            return Err(err);
        }
        for (part, e) in &errors {
            tracing::warn!(stage = cx.stage, part = part.name(), error = %e, "Symbl conversation part failed; continuing without it.");
        }
        Ok(Flow::Continue(output(id, &parts)))
    }
}

fn to_plugin_error(e: ConversationError) -> PluginError {
    let message = e.to_string();
    let err = match &e {
        ConversationError::Auth(AuthError::Unavailable { .. })
        | ConversationError::Rejected { .. }
        | ConversationError::Unavailable { .. } => PluginError::external(message),
        ConversationError::Auth(_) | ConversationError::Unauthorized { .. } => {
            PluginError::config(message)
        }
        ConversationError::NotFound { .. } => PluginError::input(message),
    };
    err.with_source(e)
}

/// The stage's output: the parts asked for (failed ones empty) and `errors` when any failed.
fn output(id: &str, parts: &ConversationParts) -> Value {
    fn list<T: serde::Serialize>(r: &Result<Vec<T>, ConversationError>) -> Value {
        match r {
            Ok(items) => serde_json::to_value(items).unwrap_or_else(|_| json!([])),
            Err(_) => json!([]),
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("available".into(), json!(true));
    out.insert("conversation_id".into(), json!(id));
    if let Some(r) = &parts.summary {
        let text = match r {
            Ok(items) => items
                .iter()
                .map(|s| s.text.trim())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
                .join(" "),
            Err(_) => String::new(),
        };
        out.insert("summary".into(), json!(text));
        out.insert("text".into(), json!(text));
    }
    if let Some(r) = &parts.action_items {
        out.insert("action_items".into(), list(r));
    }
    if let Some(r) = &parts.questions {
        out.insert("questions".into(), list(r));
    }
    if let Some(r) = &parts.topics {
        out.insert("topics".into(), list(r));
    }
    if let Some(r) = &parts.analytics {
        let v = match r {
            Ok(a) => serde_json::to_value(a).unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        out.insert("analytics".into(), v);
    }
    if let Some(r) = &parts.trackers {
        out.insert("trackers".into(), list(r));
    }
    let errors: serde_json::Map<String, Value> = parts
        .errors()
        .into_iter()
        .map(|(p, e)| (p.name().to_owned(), json!(e.to_string())))
        .collect();
    if !errors.is_empty() {
        out.insert("errors".into(), Value::Object(errors));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::conversation::ConversationState;
    use prompter_core::error::ErrorKind;
    use prompter_core::plugin::Resources;
    use prompter_core::test_util::{build, build_errors, event, run};
    use prompter_fakes::SymblFake;
    use prompter_fakes::symbl_conversations::sample_conversation;

    const ID_VAR: &str = "PROMPTER_TEST_SYMBL_ID";
    const SECRET_VAR: &str = "PROMPTER_TEST_SYMBL_SECRET";

    fn completed(symbl_id: &str) -> (prompter_core::event::Event, ConversationState) {
        let e = event(
            "call-1",
            60_000,
            json!({"type": "message", "message": {"type": "conversation_completed", "data": {"conversationId": symbl_id}}}),
        );
        let mut state = ConversationState::new("call-1");
        state.apply(&e);
        (e, state)
    }

    async fn fake_and_factory() -> (SymblFake, SymblConversationFactory) {
        let fake = SymblFake::start("app-id", "app-secret").await;
        let factory =
            SymblConversationFactory::with_env([(ID_VAR, "app-id"), (SECRET_VAR, "app-secret")]);
        (fake, factory)
    }

    fn yaml(fake: &SymblFake, extra: &str) -> String {
        format!(
            "api_base: {}\napp_id_env: {ID_VAR}\napp_secret_env: {SECRET_VAR}\n{extra}",
            fake.api_base
        )
    }

    #[test]
    fn the_doc_example_builds_without_credentials() {
        let yaml = "parts: [summary, action_items, questions, topics, analytics]\nconversation_id: \"{{ conversation.symbl_conversation_id }}\"\noptional: true\n";
        build(
            &SymblConversationFactory::default(),
            yaml,
            &Resources::default(),
            &[],
        )
        .unwrap();
        build(
            &SymblConversationFactory::default(),
            "",
            &Resources::default(),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn config_mistakes_are_reported_at_their_key() {
        let f = SymblConversationFactory::default();
        let errs = build_errors(
            &f,
            "parts: []\napi_base: ftp://x",
            &Resources::default(),
            &[],
        );
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["parts", "api_base"]);
        let errs = build_errors(&f, "part: [summary]", &Resources::default(), &[]);
        assert_eq!(errs[0].help.as_deref(), Some("did you mean `parts`?"));
        let errs = build_errors(&f, "parts: [sumary]", &Resources::default(), &[]);
        assert!(errs[0].message.contains("sumary"), "{:?}", errs[0]);
    }

    #[tokio::test]
    async fn optional_without_credentials_continues_unavailable() {
        let stage = build(
            &SymblConversationFactory::default(),
            "app_id_env: PROMPTER_SURELY_UNSET_SYMBL_ID_7f3c\napp_secret_env: PROMPTER_SURELY_UNSET_SYMBL_SECRET_7f3c\noptional: true",
            &Resources::default(),
            &[],
        )
        .unwrap();
        let (e, state) = completed("123");
        let r = run(stage.as_ref(), &e, &state, &[]).await;
        let Ok(Flow::Continue(v)) = r.flow else {
            panic!("{:?}", r.flow)
        };
        assert_eq!(v["available"], false);
        assert!(
            v["reason"]
                .as_str()
                .unwrap()
                .contains("PROMPTER_SURELY_UNSET_SYMBL_ID_7f3c")
        );
    }

    #[tokio::test]
    async fn without_credentials_and_not_optional_it_fails_naming_the_variable() {
        let stage = build(
            &SymblConversationFactory::with_env([("OTHER", "x")]),
            "app_id_env: MISSING_ID\napp_secret_env: MISSING_SECRET",
            &Resources::default(),
            &[],
        )
        .unwrap();
        let (e, state) = completed("123");
        let err = run(stage.as_ref(), &e, &state, &[]).await.flow.unwrap_err();
        assert_eq!(err.kind, ErrorKind::Config);
        assert!(err.message.contains("`MISSING_ID`"), "{}", err.message);
    }

    #[tokio::test]
    async fn reads_every_part_of_a_finished_conversation() {
        let (fake, factory) = fake_and_factory().await;
        fake.add_conversation("6150000000000001", sample_conversation("6150000000000001"));
        let stage = build(&factory, &yaml(&fake, ""), &Resources::default(), &[]).unwrap();
        let (e, state) = completed("6150000000000001");
        let r = run(stage.as_ref(), &e, &state, &[]).await;
        let Ok(Flow::Continue(v)) = r.flow else {
            panic!("{:?}", r.flow)
        };
        assert_eq!(v["available"], true);
        assert_eq!(v["conversation_id"], "6150000000000001");
        assert_eq!(
            v["summary"],
            "Sam asked about pricing for 40 seats and raised a budget concern. Dana will send a pilot proposal by Friday."
        );
        assert_eq!(v["text"], v["summary"]);
        assert_eq!(v["action_items"][0]["assignee"]["name"], "Dana Agent");
        assert_eq!(v["questions"].as_array().unwrap().len(), 2);
        assert_eq!(v["topics"][0]["text"], "pricing");
        assert_eq!(v["analytics"]["metrics"][0]["kind"], "total_silence");
        assert_eq!(v["analytics"]["members"][0]["pace_wpm"], 152.0);
        assert!(v.get("trackers").is_none() && v.get("errors").is_none());
        let mut paths = fake.conversation_log();
        paths.sort();
        assert_eq!(paths.len(), 5, "{paths:?}");
    }

    #[tokio::test]
    async fn one_failing_part_does_not_lose_the_others() {
        let (fake, factory) = fake_and_factory().await;
        fake.add_conversation("c-2", sample_conversation("c-2"));
        fake.fail_conversation_next("topics", &[400]);
        let stage = build(
            &factory,
            &yaml(
                &fake,
                "parts: [summary, topics, trackers]\nconversation_id: c-2",
            ),
            &Resources::default(),
            &[],
        )
        .unwrap();
        let (e, state) = completed("ignored");
        let Ok(Flow::Continue(v)) = run(stage.as_ref(), &e, &state, &[]).await.flow else {
            panic!("expected an output")
        };
        assert_eq!(v["topics"], json!([]));
        assert_eq!(
            v["errors"]["topics"],
            "reading the topics of conversation `c-2`: Symbl answered 400: scripted failure"
        );
        assert_eq!(v["trackers"][0]["name"], "Budget Constraints");
        assert!(v["summary"].as_str().unwrap().starts_with("Sam asked"));
    }

    #[tokio::test]
    async fn an_unknown_conversation_is_named() {
        let (fake, factory) = fake_and_factory().await;
        let stage = build(&factory, &yaml(&fake, ""), &Resources::default(), &[]).unwrap();
        let (e, state) = completed("nope-42");
        let err = run(stage.as_ref(), &e, &state, &[]).await.flow.unwrap_err();
        assert_eq!(err.message, "conversation `nope-42` not found");
        assert_eq!(err.kind, ErrorKind::Input);
    }

    #[tokio::test]
    async fn a_missing_conversation_id_is_unavailable_when_optional() {
        let (fake, factory) = fake_and_factory().await;
        let e = event(
            "call-3",
            0,
            json!({"type": "message", "message": {"type": "conversation_completed"}}),
        );
        let state = ConversationState::new("call-3");
        let strict = build(&factory, &yaml(&fake, ""), &Resources::default(), &[]).unwrap();
        let err = run(strict.as_ref(), &e, &state, &[])
            .await
            .flow
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Input);
        assert!(
            err.message.starts_with("no Symbl conversation id"),
            "{}",
            err.message
        );
        let lenient = build(
            &factory,
            &yaml(&fake, "optional: true"),
            &Resources::default(),
            &[],
        )
        .unwrap();
        let r = run(lenient.as_ref(), &e, &state, &[]).await;
        let Ok(Flow::Continue(v)) = r.flow else {
            panic!("{:?}", r.flow)
        };
        assert_eq!(v["available"], false);
        assert_eq!(fake.conversation_requests(), 0);
    }
}
