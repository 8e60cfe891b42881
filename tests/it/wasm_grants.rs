//! The host side of knowledge and LLM grants, and waiting for an instance, against the real
//! hostile test component (`sdk/testing/hostile`: `search STORE`, `ask PROVIDER`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use prompter_core::async_trait;
use prompter_core::conversation::ConversationState;
use prompter_core::error::PluginError;
use prompter_core::plugin::{Flow, Resources};
use prompter_core::resource::{
    ChatProvider, ChatReply, ChatRequest, KnowledgeStore, ScoredDocument,
};
use prompter_core::test_util::run;
use prompter_engine::wasm::{Grants, WasmPlugin, WasmSpec};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::wasm::{said, spec};

/// A store that answers every query with one document naming itself.
struct Store(&'static str);

#[async_trait]
impl KnowledgeStore for Store {
    fn name(&self) -> &str {
        self.0
    }

    async fn search(&self, _query: &str, _k: usize) -> Result<Vec<ScoredDocument>, PluginError> {
        Ok(vec![ScoredDocument {
            id: "1".into(),
            text: format!("from {}", self.0),
            data: String::new(),
            score: 0.9,
        }])
    }
}

/// A provider that answers after `delay`, counting the calls in flight and the most at once.
struct Provider {
    name: &'static str,
    delay: Duration,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

impl Provider {
    fn new(name: &'static str, delay: Duration) -> Arc<Provider> {
        Arc::new(Provider {
            name,
            delay,
            in_flight: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }
}

#[async_trait]
impl ChatProvider for Provider {
    fn name(&self) -> &str {
        self.name
    }

    async fn chat(
        &self,
        _request: &ChatRequest,
        _tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(ChatReply {
            text: format!("hi from {}", self.name),
            provider: self.name.into(),
            model: None,
        })
    }
}

/// Stores `sales` and `hr`, providers `nebula` and `other`.
fn resources(nebula: Arc<Provider>) -> Resources {
    let mut r = Resources::default();
    for name in ["sales", "hr"] {
        r.knowledge.insert(
            name.into(),
            Arc::new(Store(name)) as Arc<dyn KnowledgeStore>,
        );
    }
    r.chat.insert("nebula".into(), nebula);
    r.chat.insert(
        "other".into(),
        Provider::new("other", Duration::ZERO) as Arc<dyn ChatProvider>,
    );
    r
}

async fn hostile(grants: Grants, nebula: Arc<Provider>, timeout: Duration) -> WasmPlugin {
    WasmPlugin::build_with_grants(
        WasmSpec {
            resources: resources(nebula),
            timeout,
            ..spec("grants", "hostile_plugin")
        },
        grants,
    )
    .await
    .unwrap()
}

async fn output(p: &WasmPlugin, text: &str) -> Value {
    let e = said("c1", text);
    let mut state = ConversationState::new("c1");
    state.apply(&e);
    match run(p, &e, &state, &[]).await.flow {
        Ok(Flow::Continue(v)) => v,
        other => panic!("`{text}`: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knowledge_and_llm_calls_need_a_grant() {
    let nebula = Provider::new("nebula", Duration::ZERO);
    let denied = |what: &str, name: &str, key: &str| {
        json!(format!(
            "stage `grants` has no grant for {what} `{name}`: add it to the stage's `{key}`"
        ))
    };

    // No grants (the default): every store and provider is refused, existing or not.
    let p = hostile(Grants::default(), nebula.clone(), Duration::from_secs(2)).await;
    let v = output(&p, "search sales").await;
    assert_eq!(v["searched"], false, "{v}");
    assert_eq!(
        v["error"],
        denied("knowledge store", "sales", "allow_knowledge")
    );
    let v = output(&p, "ask nebula").await;
    assert_eq!(v["asked"], false, "{v}");
    assert_eq!(v["error"], denied("llm provider", "nebula", "allow_llm"));
    let v = output(&p, "search nowhere").await;
    assert_eq!(
        v["error"],
        denied("knowledge store", "nowhere", "allow_knowledge")
    );
    assert_eq!(p.metrics.denied.get(), 3);
    assert_eq!(
        nebula.peak.load(Ordering::SeqCst),
        0,
        "a refused call never reaches the provider"
    );

    // Granted: those work; the others are still refused.
    let p = hostile(
        Grants {
            knowledge: vec!["sales".into()],
            llm: vec!["nebula".into()],
        },
        nebula.clone(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(
        output(&p, "search sales").await,
        json!({"searched": true, "texts": ["from sales"]})
    );
    assert_eq!(
        output(&p, "ask nebula").await,
        json!({"asked": true, "answer": "hi from nebula"})
    );
    let v = output(&p, "search hr").await;
    assert_eq!(
        v["error"],
        denied("knowledge store", "hr", "allow_knowledge")
    );
    let v = output(&p, "ask other").await;
    assert_eq!(v["error"], denied("llm provider", "other", "allow_llm"));
    assert_eq!(p.metrics.denied.get(), 2);
    // A refusal is the guest's to handle, not a failed call.
    assert!(p.metrics.errors().is_empty(), "{:?}", p.metrics.errors());
}

/// Set in the child process that runs the pool-filling test on its own.
const ALONE: &str = "PROMPTER_IT_FILL_THE_POOL";

#[test]
fn more_concurrent_calls_than_instances_wait_and_all_complete() {
    // This fills the process-wide instance pool for a second or two. The other Wasm tests of
    // this binary would then wait for instances too, and fail their short timeouts, so the test
    // runs in a process of its own: this test binary again, filtered to this test.
    if std::env::var_os(ALONE).is_none() {
        let name = "wasm_grants::more_concurrent_calls_than_instances_wait_and_all_complete";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads", "1", "--nocapture"])
            .env(ALONE, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(
            stdout.contains("1 passed"),
            "the child ran nothing: {stdout}"
        );
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(fill_the_pool());
}

async fn fill_the_pool() {
    // The engine allows 128 live instances in the process. Each call holds its instance while
    // the provider answers, so 160 calls at once cannot all have one: the rest must wait.
    const CALLS: usize = 160;
    let nebula = Provider::new("nebula", Duration::from_secs(1));
    let p = Arc::new(
        hostile(
            Grants {
                knowledge: vec![],
                llm: vec!["nebula".into()],
            },
            nebula.clone(),
            Duration::from_secs(30),
        )
        .await,
    );
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                let conv = format!("c{i}");
                let e = said(&conv, "ask nebula");
                let mut state = ConversationState::new(&conv);
                state.apply(&e);
                run(p.as_ref(), &e, &state, &[]).await.flow
            })
        })
        .collect();
    let mut answers: BTreeMap<String, usize> = BTreeMap::new();
    for call in calls {
        let answer = match call.await.unwrap() {
            Ok(Flow::Continue(v)) => v["answer"].to_string(),
            other => format!("{other:?}"),
        };
        *answers.entry(answer).or_default() += 1;
    }
    assert_eq!(
        answers,
        BTreeMap::from([("\"hi from nebula\"".to_owned(), CALLS)]),
        "every call completes"
    );
    let peak = nebula.peak.load(Ordering::SeqCst);
    assert!(
        (2..=128).contains(&peak),
        "at most 128 calls held an instance at once, got {peak}"
    );
    assert!(p.metrics.errors().is_empty(), "{:?}", p.metrics.errors());
}

#[test]
fn plugin_test_prints_the_refused_host_calls() {
    // `prompter plugin test` grants nothing, so both calls are refused; the guest carries on.
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let line = |offset_ms: u64, text: &str| {
        json!({"conversation": "c1", "offset_ms": offset_ms, "event": {"type": "message_response", "messages": [{"from": {"name": "Eve", "userId": "+15550100"}, "payload": {"content": text}}]}})
            .to_string()
    };
    let recording = [
        line(1000, "search sales"),
        line(2000, "ask nebula"),
        line(3000, "hello"),
    ]
    .join("\n");
    std::fs::write(&events, recording).unwrap();
    let module = crate::wasm::module("hostile_plugin");
    let r = crate::cli::prompter(&[
        "plugin",
        "test",
        module.to_str().unwrap(),
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("3 call(s), 0 error(s), 2 denied host call(s); mean"),
        "{}",
        r.stderr
    );
}
