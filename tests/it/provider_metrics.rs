//! The metrics of what stages call: an OpenAI-compatible provider (retries, fallback, time to
//! first token, tokens), a declared embedder behind the cache, and a Wasm stage; counted by a
//! real engine on a recorded call and checked against what the fakes saw.

use std::sync::Arc;

use prompter_core::output::{Output, Status};
use prompter_engine::metrics::Metrics;
use prompter_fakes::openai::{CHAT_MODEL, Endpoint, OpenAiFake};

use crate::cli::{at, root};
use crate::engine_api::{engine_on, metric, recorded};
use crate::wasm::module;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_embedder_and_wasm_calls_are_counted_as_the_fakes_saw_them() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = OpenAiFake::start().await;
    // The first answer fails three times: two retries, then the fallback answers (the runs
    // queue, so the second one meets none of these failures).
    fake.fail_next(Endpoint::Chat, &[503, 503, 503]);
    let dir = tempfile::tempdir().unwrap();
    let ask = "pipeline: ask\non: [tracker_response]\nconcurrency: queue\nstages:\n\
        \x20 - { id: retrieve, plugin: retrieve, config: { knowledge: sales, query: \"{{ event.tracker.name }}\", top_k: 1 } }\n\
        \x20 - { id: prompt, plugin: prompt, config: { documents: retrieve } }\n\
        \x20 - { id: answer, plugin: chat, config: { llm: gpt, prompt: prompt, fallback: offline, stream: { every_ms: 1 } } }\n\
        \x20 - { id: deliver, plugin: notify, config: { kind: suggestion, title: \"{{ event.tracker.name }}\", text: \"{{ stages.answer.text }}\" } }\n";
    std::fs::write(dir.path().join("ask.yaml"), ask).unwrap();
    let redacted = std::fs::read_to_string(root().join("pipelines/wasm/rta_redacted.yaml"))
        .unwrap()
        .replace(
            "../../target/wasm/wasm32-wasip2/release/pii_redactor.wasm",
            module("pii_redactor").to_str().unwrap(),
        );
    std::fs::write(dir.path().join("rta_redacted.yaml"), redacted).unwrap();
    let cfg = format!(
        "pipelines: [ask.yaml, rta_redacted.yaml]\n\
         embedders:\n  lexical: {{ provider: hashing }}\n\
         knowledge:\n  sales:\n    store: embedded\n    config: {{ source: \"{}\", embedder: lexical }}\n\
         llm:\n  offline: {{ provider: offline }}\n  \
         gpt: {{ provider: openai, config: {{ base_url: \"{}\", model: {CHAT_MODEL}, max_retries: 2, max_backoff_ms: 5 }} }}\n",
        at("pipelines/data/sales_objections.csv"),
        fake.url
    );
    let config = dir.path().join("prompter.yaml");
    std::fs::write(&config, cfg).unwrap();

    let metrics = Arc::new(Metrics::new());
    let (engine, seen) = engine_on(&config, metrics.clone());
    let events = recorded("billing-dispute-call.jsonl");
    let trackers = events
        .iter()
        .filter(|e| e.kind.as_str() == "tracker_response")
        .count() as f64;
    assert!(trackers >= 2.0);
    for e in events {
        engine.dispatch(e).await;
    }
    engine.finish().await;
    let text = metrics.render();

    // The provider: every tracker asked it once; the first ask failed three times.
    let chat_calls = f64::from(fake.calls(Endpoint::Chat));
    assert_eq!(chat_calls, trackers + 2.0, "{text}");
    let gpt = |m: &str| metric(&text, &format!("{m}{{provider=\"gpt\",kind=\"chat\"}}"));
    let result = |r: &str| {
        metric(
            &text,
            &format!(
                "prompter_provider_requests_total{{provider=\"gpt\",kind=\"chat\",result=\"{r}\"}}"
            ),
        )
    };
    assert_eq!(result("ok"), trackers - 1.0, "{text}");
    assert_eq!(result("error"), 1.0, "{text}");
    assert_eq!(gpt("prompter_provider_retries_total"), 2.0, "{text}");
    assert_eq!(
        gpt("prompter_provider_request_duration_seconds_count"),
        trackers
    );
    // Streamed answers: one first token per answered call.
    assert_eq!(
        gpt("prompter_provider_first_token_seconds_count"),
        trackers - 1.0,
        "{text}"
    );
    // Tokens as the server reported them in the stream's usage chunk.
    let asked: Vec<serde_json::Value> = fake.chat_requests();
    assert!(
        asked
            .iter()
            .all(|r| r["stream_options"]["include_usage"] == true)
    );
    let output_tokens = metric(
        &text,
        "prompter_provider_tokens_total{provider=\"gpt\",direction=\"output\"}",
    );
    assert!(output_tokens > 0.0, "{text}");
    assert!(
        metric(
            &text,
            "prompter_provider_tokens_total{provider=\"gpt\",direction=\"input\"}"
        ) > output_tokens
    );
    assert_eq!(
        metric(
            &text,
            "prompter_chat_fallbacks_total{pipeline=\"ask\",stage=\"answer\"}"
        ),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, "prompter_degraded_outputs_total{pipeline=\"ask\"}") >= 1.0,
        "{text}"
    );

    // The declared embedder: the store's rows at start-up, then each query; a query met again
    // (the same tracker) is a hit.
    let cache = |r: &str| {
        metric(
            &text,
            &format!(
                "prompter_embedding_cache_lookups_total{{embedder=\"lexical\",result=\"{r}\"}}"
            ),
        )
    };
    assert!(cache("miss") > 0.0, "{text}");
    assert_eq!(
        cache("miss"),
        metric(
            &text,
            "prompter_provider_requests_total{provider=\"lexical\",kind=\"embed\",result=\"ok\"}"
        ),
        "every miss reached the embedder: {text}"
    );
    assert!(cache("hit") + cache("miss") >= 2.0 * trackers, "{text}");

    // The Wasm stage ran once per run that passed `dedupe`, without an error.
    let wasm_calls = metric(
        &text,
        "prompter_wasm_calls_total{pipeline=\"rta_redacted\",stage=\"redact\"}",
    );
    assert!(wasm_calls >= 1.0, "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("prompter_wasm_errors_total") && !l.ends_with(" 0")),
        "{text}"
    );
    assert!(
        metric(
            &text,
            "prompter_wasm_instances_created_total{pipeline=\"rta_redacted\",stage=\"redact\"}"
        ) >= 1.0
    );
    // Each answer's time is split into the engine's own and the providers': the fake's
    // streamed answers and the retries' waits are providers' time.
    let finals: Vec<Output> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|o| o.pipeline == "ask" && o.status == Status::Final)
        .cloned()
        .collect();
    assert_eq!(finals.len() as f64, trackers);
    for o in &finals {
        let t = &o.timings;
        assert!(t.waited_us > 0, "{t:?}");
        assert!(
            t.waited_us <= t.total_us && t.total_us <= t.received_us,
            "{t:?}"
        );
    }
    // No label carries the conversation.
    assert!(!text.contains("billing"), "{text}");
}
