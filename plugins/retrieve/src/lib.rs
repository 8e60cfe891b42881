//! The `retrieve` stage and the `embedded` knowledge store.
//!
//! It owns searching a knowledge store for the documents that match an event (a tracker's name
//! and phrases, a transcript sentence), and the in-process store that the engine config's
//! `knowledge:` section opens with `store: embedded`. It does not own building prompts or calling
//! models (the `prompt` and `chat` stages).
//!
//! The default embedder is LEXICAL: it matches shared words and spellings, not meaning. "Budget
//! Constraints" finds the row that starts with "Budget Constraints", but "too pricey" does not
//! find "expensive". Semantic embedders are named in the engine config's `embedders:` (a local
//! model, `provider: local`; Nebula; an OpenAI-compatible server); the store and the stage do
//! not change shape with them.
//!
//! ```yaml
//! - id: retrieve
//!   plugin: retrieve
//!   config:
//!     knowledge: sales                    # a store from the engine config's `knowledge:`
//!     query: "{{ event.tracker.name }}"   # search text template (default: see below)
//!     top_k: 3                            # 1 to 50, default 3
//!     min_score: 0.1                      # optional: drop documents scoring below
//!     budget_ms: 400                      # optional: longest wait for a remote embedder
//!     halt_if_empty: true                 # optional: no document left = the run stops
//! ```
//!
//! When the store's embedder fails or exceeds `budget_ms`, the embedded store ranks by shared
//! words instead and the output carries `degraded: "why"` (the `notify` stage reports it).
//!
//! The default query is the tracker's name and matched phrases for tracker events, and the
//! text for message, insight, caption and topic events. The stage's output is
//! `{"query": "...", "documents": [{"id", "text", "data", "score"}, ...]}`, best first; the list
//! may be empty (later stages decide). An empty query halts the run.
//!
//! # Layout
//! - [`embedder`]: [`HashingEmbedder`], the local, deterministic lexical embedder.
//! - [`store`]: [`EmbeddedStore`], a CSV embedded in process with a persisted index.
//! - this file: [`RetrieveFactory`] and the [`Retrieve`] stage.

pub mod embedder;
pub mod store;

use std::sync::Arc;

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::plugin::{
    BuildContext, BuildError, Flow, Plugin, PluginFactory, Reported, StageContext, StageOutput,
    Typed,
};
use prompter_core::resource::KnowledgeStore;
use prompter_core::template::Template;
use serde::Deserialize;

pub use embedder::{HashingEmbedder, LocalEmbedder};
pub use store::{
    EmbeddedStore, EmbeddedStoreConfig, IngestOptions, IngestReport, StoreError, ingest,
};

/// The default search text: a tracker's name and matched phrases, or the text of a message,
/// insight, caption or topic. Only one of the parts is defined for any event (the others render
/// empty).
pub const DEFAULT_QUERY: &str = "{{ event.tracker.name }} \
{{ event.tracker.matches | map(attribute='value') | join(' ') }} \
{{ event.message.text }}{{ event.insight.text }}{{ event.caption.text }}{{ event.topic.phrases }}";

/// Largest accepted `top_k`: prompts have no room for more, and the store scores every document
/// anyway.
const MAX_TOP_K: usize = 50;

/// Configuration of a `retrieve` stage.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrieveConfig {
    /// Name of the knowledge store to search, from the engine config's `knowledge:`.
    pub knowledge: String,
    /// Template of the search text. Default: the tracker's name and phrases, or the event's
    /// text ([`DEFAULT_QUERY`]).
    #[serde(default = "default_query")]
    pub query: String,
    /// How many documents to return, best first: 1 to 50. Default 3.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// Documents scoring below this (cosine, -1 to 1) are dropped. Default: none dropped.
    #[serde(default)]
    pub min_score: Option<f32>,
    /// Longest wait for the store's embedder, in milliseconds; past it (or when the embedder
    /// fails) a store that can rank by words does so, and the output says it is degraded.
    /// Default: no limit but the stage's `timeout_ms`.
    #[serde(default)]
    pub budget_ms: Option<u64>,
    /// Stop the run when no document is left (none scored `min_score`): for pipelines that
    /// offer a document or nothing. Default false: the list may be empty, later stages decide.
    #[serde(default)]
    pub halt_if_empty: bool,
}

fn default_query() -> String {
    DEFAULT_QUERY.to_owned()
}
fn default_top_k() -> usize {
    3
}

/// Builds `retrieve` stages.
#[derive(Debug, Default)]
pub struct RetrieveFactory;

impl PluginFactory for RetrieveFactory {
    const NAME: &'static str = "retrieve";
    const DESCRIPTION: &'static str =
        "search a knowledge store for the documents matching the event (tracker, message)";
    type Config = RetrieveConfig;

    fn build(
        &self,
        cfg: RetrieveConfig,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        let store = cx.knowledge("knowledge", &cfg.knowledge);
        let query = cx.template("query", &cfg.query);
        if !(1..=MAX_TOP_K).contains(&cfg.top_k) {
            cx.report(
                BuildError::at(
                    "top_k",
                    format!(
                        "`top_k` must be between 1 and {MAX_TOP_K}, got {}",
                        cfg.top_k
                    ),
                )
                .help("3 is a good start: the prompt quotes every document"),
            );
        }
        if let Some(min) = cfg.min_score
            && !(-1.0..=1.0).contains(&min)
        {
            cx.report(BuildError::at(
                "min_score",
                format!("`min_score` is a cosine similarity between -1 and 1, got {min}"),
            ));
        }
        if cx.has_problems() {
            return Err(Reported);
        }
        let (Some(store), Some(query)) = (store, query) else {
            return Err(Reported);
        };
        Ok(Arc::new(Retrieve {
            store,
            query,
            top_k: cfg.top_k,
            min_score: cfg.min_score,
            budget: cfg.budget_ms.map(std::time::Duration::from_millis),
            halt_if_empty: cfg.halt_if_empty,
        }))
    }
}

/// A built `retrieve` stage.
pub struct Retrieve {
    store: Arc<dyn KnowledgeStore>,
    query: Template,
    top_k: usize,
    min_score: Option<f32>,
    budget: Option<std::time::Duration>,
    halt_if_empty: bool,
}

impl std::fmt::Debug for Retrieve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retrieve")
            .field("store", &self.store.name())
            .field("query", &self.query.source())
            .field("top_k", &self.top_k)
            .field("min_score", &self.min_score)
            .finish()
    }
}

#[async_trait]
impl Plugin for Retrieve {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let rendered = cx.render(&self.query)?;
        let query = rendered.trim();
        if query.is_empty() {
            return Ok(Flow::Halt("empty retrieval query".into()));
        }
        let (mut documents, degraded) = self
            .store
            .search_within(query, self.top_k, self.budget)
            .await?;
        if let Some(min) = self.min_score {
            documents.retain(|d| d.score >= min);
        }
        if self.halt_if_empty && documents.is_empty() {
            // The reason is logged: it names the floor, not the customer's words.
            return Ok(Flow::Halt(match self.min_score {
                Some(min) => format!("no document scored {min} or more"),
                None => "no document".to_owned(),
            }));
        }
        // Typed: the prompt and notify stages take the documents as they are; the JSON form is
        // built only if a template reads `stages.<id>`.
        Ok(Flow::Output(StageOutput::typed(Typed::Documents {
            query: query.to_owned(),
            documents: documents.into(),
            degraded,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::conversation::ConversationState;
    use prompter_core::event::Event;
    use prompter_core::plugin::Resources;
    use prompter_core::resource::ScoredDocument;
    use prompter_core::test_util::{build, build_errors, event, run};
    use serde_json::json;

    const KB: &str = "objection,guidance\n\
\"Budget Constraints: it seems expensive, we don't have the budget\",\"Offer a phased rollout.\"\n\
\"Security Concerns: who can access our data\",\"Share the security whitepaper.\"\n\
\"Timing: not a good time, call back next quarter\",\"Agree on a follow-up date.\"\n";

    fn resources(dir: &std::path::Path) -> Resources {
        std::fs::write(dir.join("kb.csv"), KB).unwrap();
        let cfg = EmbeddedStoreConfig::with_source("kb.csv");
        let store =
            EmbeddedStore::open("sales", cfg, dir, EmbeddedStore::local_embedder(1024)).unwrap();
        let mut r = Resources::default();
        r.knowledge.insert("sales".into(), Arc::new(store));
        r
    }

    fn tracker_event(name: &str) -> Event {
        event(
            "c1",
            5000,
            json!({"type": "tracker_response", "isFinal": true, "trackers": [{"name": name,
                "matches": [{"type": "vocabulary", "value": "seems expensive", "messageRefs": []}]}]}),
        )
    }

    async fn continue_value(plugin: &dyn Plugin, ev: &Event) -> serde_json::Value {
        let state = ConversationState::new("c1");
        match run(plugin, ev, &state, &[]).await.flow {
            Ok(Flow::Output(o)) => {
                assert!(matches!(o.as_typed(), Some(Typed::Documents { .. })));
                o.into_value()
            }
            other => panic!("expected an output, got {other:?}"),
        }
    }

    fn documents(v: &serde_json::Value) -> Vec<ScoredDocument> {
        serde_json::from_value(v["documents"].clone()).unwrap()
    }

    #[tokio::test]
    async fn the_doc_example_builds_and_retrieves_for_a_tracker() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let yaml =
            "knowledge: sales\nquery: \"{{ event.tracker.name }}\"\ntop_k: 2\nmin_score: 0.1\n";
        let p = build(&RetrieveFactory, yaml, &res, &[]).unwrap();
        let v = continue_value(p.as_ref(), &tracker_event("Budget Constraints")).await;
        assert_eq!(v["query"], "Budget Constraints");
        let docs = documents(&v);
        assert!(!docs.is_empty() && docs.len() <= 2, "{docs:?}");
        assert!(docs[0].text.starts_with("Budget Constraints:"));
        assert_eq!(docs[0].data, "Offer a phased rollout.");
        assert!(docs.iter().all(|d| d.score >= 0.1));
    }

    #[tokio::test]
    async fn the_default_query_serves_tracker_and_message_events() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let p = build(&RetrieveFactory, "knowledge: sales", &res, &[]).unwrap();
        let v = continue_value(p.as_ref(), &tracker_event("Budget Constraints")).await;
        assert_eq!(v["query"], "Budget Constraints seems expensive");
        let docs = documents(&v);
        assert_eq!(docs.len(), 3);
        assert!(docs[0].text.starts_with("Budget Constraints:"));
        assert!(docs[0].score >= docs[1].score && docs[1].score >= docs[2].score);

        let message = event(
            "c1",
            6000,
            json!({"type": "message_response", "messages": [
                {"from": {"name": "Dana"}, "payload": {"content": "Who can access our data?"}}]}),
        );
        let v = continue_value(p.as_ref(), &message).await;
        assert_eq!(v["query"], "Who can access our data?");
        assert!(documents(&v)[0].text.starts_with("Security Concerns:"));
    }

    #[tokio::test]
    async fn an_empty_query_halts_and_a_high_min_score_gives_no_documents() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());
        let p = build(
            &RetrieveFactory,
            "knowledge: sales\nquery: \"{{ event.tracker.name }}\"\n",
            &res,
            &[],
        )
        .unwrap();
        let started = event(
            "c1",
            0,
            json!({"type": "message", "message": {"type": "started_listening"}}),
        );
        let r = run(p.as_ref(), &started, &ConversationState::new("c1"), &[]).await;
        assert_eq!(r.flow.unwrap(), Flow::Halt("empty retrieval query".into()));

        let p = build(
            &RetrieveFactory,
            "knowledge: sales\nmin_score: 0.99",
            &res,
            &[],
        )
        .unwrap();
        let v = continue_value(p.as_ref(), &tracker_event("Budget Constraints")).await;
        assert_eq!(v["documents"], json!([]));

        // With `halt_if_empty`, nothing left stops the run (and says why); a match goes on.
        let strict = "knowledge: sales\nquery: \"{{ event.tracker.name }}\"\nhalt_if_empty: true\nmin_score: ";
        let p = build(&RetrieveFactory, &format!("{strict}0.99"), &res, &[]).unwrap();
        let ev = tracker_event("Budget Constraints");
        let r = run(p.as_ref(), &ev, &ConversationState::new("c1"), &[]).await;
        assert_eq!(
            r.flow.unwrap(),
            Flow::Halt("no document scored 0.99 or more".into())
        );
        let p = build(&RetrieveFactory, &format!("{strict}0.1"), &res, &[]).unwrap();
        let v = continue_value(p.as_ref(), &ev).await;
        assert!(
            v["documents"][0]["text"]
                .as_str()
                .unwrap()
                .starts_with("Budget Constraints:")
        );
    }

    #[test]
    fn config_problems_are_reported_at_their_paths() {
        let dir = tempfile::tempdir().unwrap();
        let res = resources(dir.path());

        let errs = build_errors(&RetrieveFactory, "knowledge: sals", &res, &[]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "knowledge");
        assert_eq!(errs[0].message, "unknown knowledge store `sals`");
        assert_eq!(errs[0].help.as_deref(), Some("did you mean `sales`?"));

        let errs = build_errors(&RetrieveFactory, "knowledge: sales\ntop_k: 0", &res, &[]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].path, "top_k");
        assert!(errs[0].message.contains("between 1 and 50"), "{errs:?}");
        let errs = build_errors(&RetrieveFactory, "knowledge: sales\ntop_k: 51", &res, &[]);
        assert_eq!(errs[0].path, "top_k");

        let errs = build_errors(
            &RetrieveFactory,
            "knowledge: sales\nmin_score: 2",
            &res,
            &[],
        );
        assert_eq!(errs[0].path, "min_score");

        let errs = build_errors(&RetrieveFactory, "knowledge: sales\ntpo_k: 3", &res, &[]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].message, "unknown key `tpo_k` in `config`");
        assert_eq!(errs[0].help.as_deref(), Some("did you mean `top_k`?"));

        // Every problem at once, and stage references are checked.
        let errs = build_errors(
            &RetrieveFactory,
            "knowledge: nope\nquery: \"{{ stages.kb.x }}\"\ntop_k: 0",
            &res,
            &[],
        );
        let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["knowledge", "query", "top_k"]);

        let errs = build_errors(&RetrieveFactory, "query: x", &res, &[]);
        assert!(errs[0].message.contains("knowledge"), "{errs:?}");
    }
}
