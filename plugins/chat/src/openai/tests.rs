use std::time::Duration;

use prompter_core::backoff::Backoff;
use prompter_core::error::ErrorKind;
use prompter_core::resource::{ChatMessage, ChatProvider, ChatReply, ChatRequest, Embedder, Role};
use prompter_fakes::openai::{EmbedQuirk, Endpoint, OpenAiFake};
use serde_json::json;
use tokio::sync::mpsc;

use super::client::{Class, classify, retry_after};
use super::stream::chunk_event;
use super::*;

const KEY: &str = "sk-test-0123456789";
const ANSWER: &str = "Offer the starter tier and a pilot, then follow up next week.";

async fn fake() -> OpenAiFake {
    let f = OpenAiFake::start_with_key(KEY).await;
    f.set_answer(ANSWER);
    f
}

fn config(base_url: &str, extra: serde_json::Value) -> OpenAiConfig {
    let mut cfg = json!({"base_url": base_url, "model": "gpt-4o-mini", "max_backoff_ms": 20});
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    serde_json::from_value(cfg).unwrap()
}

fn provider(base_url: &str, key: Option<&str>) -> OpenAiProvider {
    let extra = match key {
        Some(k) => json!({"api_key": k}),
        None => json!({}),
    };
    OpenAiProvider::new("gpt", config(base_url, extra)).unwrap()
}

fn embedder(base_url: &str, extra: serde_json::Value) -> OpenAiEmbedder {
    let mut cfg = json!({"base_url": base_url, "api_key": KEY,
        "model": "text-embedding-3-small", "max_backoff_ms": 20});
    cfg.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    OpenAiEmbedder::new("oai", serde_json::from_value(cfg).unwrap()).unwrap()
}

fn request() -> ChatRequest {
    ChatRequest {
        system_prompt: "Be brief.".into(),
        messages: vec![
            ChatMessage {
                role: Role::Human,
                text: "Budget Constraints".into(),
            },
            ChatMessage {
                role: Role::Assistant,
                text: "Which budget?".into(),
            },
            ChatMessage {
                role: Role::Human,
                text: "This quarter's.".into(),
            },
        ],
        context: vec![],
        max_new_tokens: 64,
        temperature: 0.2,
    }
}

fn texts(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn answers_and_sends_the_exact_request_body() {
    let f = fake().await;
    let reply = provider(&f.url, Some(KEY))
        .chat(&request(), None)
        .await
        .unwrap();
    assert_eq!(
        reply,
        ChatReply {
            text: ANSWER.into(),
            provider: "gpt".into(),
            model: Some("gpt-4o-mini".into()),
        }
    );
    let sent = f.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].authorization.as_deref(),
        Some("Bearer sk-test-0123456789")
    );
    assert_eq!(
        sent[0].body,
        json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Budget Constraints"},
                {"role": "assistant", "content": "Which budget?"},
                {"role": "user", "content": "This quarter's."},
            ],
            "max_tokens": 64,
            "temperature": 0.2,
            "stream": false,
        })
    );
}

#[tokio::test]
async fn config_sampling_overrides_the_request() {
    let f = fake().await;
    let cfg = config(
        &f.url,
        json!({"api_key": KEY, "max_tokens": 5, "temperature": 0.7, "top_p": 0.9}),
    );
    let reply = OpenAiProvider::new("gpt", cfg)
        .unwrap()
        .chat(&request(), None)
        .await
        .unwrap();
    // The fake cuts its answer at `max_tokens` words, as a real server cuts at tokens.
    assert_eq!(reply.text, "Offer the starter tier and");
    let body = &f.chat_requests()[0];
    assert_eq!(
        (&body["max_tokens"], &body["temperature"], &body["top_p"]),
        (&json!(5), &json!(0.7), &json!(0.9))
    );
}

#[tokio::test]
async fn retries_503_twice_then_succeeds() {
    let f = fake().await;
    f.fail_next(Endpoint::Chat, &[503, 503]);
    let p = provider(&f.url, Some(KEY));
    assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
    assert_eq!(f.calls(Endpoint::Chat), 3);
    let statuses: Vec<u16> = f.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
}

#[tokio::test]
async fn a_429_is_retried() {
    let f = fake().await;
    f.fail_next(Endpoint::Chat, &[429]);
    let p = provider(&f.url, Some(KEY));
    assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
    assert_eq!(f.calls(Endpoint::Chat), 2);
}

#[test]
fn retry_after_is_read_and_statuses_are_classified() {
    let mut h = reqwest::header::HeaderMap::new();
    assert_eq!(retry_after(&h), None);
    h.insert("retry-after", "1".parse().unwrap());
    assert_eq!(retry_after(&h), Some(Duration::from_secs(1)));
    h.insert("retry-after-ms", "250".parse().unwrap());
    assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
    let b = Backoff {
        base_ms: 200,
        max_ms: 5_000,
        max_retries: 3,
    };
    // The server's wait wins over the exponential step, up to `max_backoff_ms`.
    assert_eq!(
        b.wait(0, Some(Duration::from_secs(1))),
        Duration::from_secs(1)
    );
    assert_eq!(
        [401, 403, 408, 429, 500, 503, 400, 404, 422].map(classify),
        [
            Class::Auth,
            Class::Auth,
            Class::Retry,
            Class::Retry,
            Class::Retry,
            Class::Retry,
            Class::Reject,
            Class::Reject,
            Class::Reject
        ]
    );
}

#[tokio::test]
async fn gives_up_after_the_retry_budget_and_says_why() {
    let f = fake().await;
    f.set_down(true);
    let err = provider(&f.url, Some(KEY))
        .chat(&request(), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::External);
    let host = f.url.trim_start_matches("http://").trim_end_matches("/v1");
    assert_eq!(
        err.message,
        format!(
            "llm `gpt`: `POST /chat/completions` on `{host}` failed after 4 attempt(s): 503: \
             The engine is currently overloaded, please try again later"
        )
    );
    assert_eq!(f.calls(Endpoint::Chat), 4);
}

#[tokio::test]
async fn connection_failures_are_retried_and_explained() {
    // A port that was just free: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let cfg = config(
        &format!("http://127.0.0.1:{port}/v1"),
        json!({"max_retries": 1}),
    );
    let err = OpenAiProvider::new("local", cfg)
        .unwrap()
        .chat(&request(), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::External);
    assert!(
        err.message.starts_with(&format!(
            "llm `local`: `POST /chat/completions` on `127.0.0.1:{port}` failed after 2 \
             attempt(s): cannot connect: "
        )),
        "{}",
        err.message
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[tokio::test]
async fn a_bad_key_is_a_config_error_that_never_shows_the_key() {
    let f = fake().await;
    let p = provider(&f.url, Some("sk-wrong-secret-value"));
    let err = p.chat(&request(), None).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(err.message.starts_with("llm `gpt`: "), "{}", err.message);
    assert!(err.message.contains("(401)"), "{}", err.message);
    let shown = format!("{err} {err:?} {p:?}");
    // Neither the key nor the masked form OpenAI echoes (`sk-***ue`).
    assert!(!shown.contains("sk-wrong-secret-value"), "{shown}");
    assert!(!shown.contains("***ue"), "{shown}");
    assert_eq!(f.calls(Endpoint::Chat), 1, "a 401 is not retried");
}

#[tokio::test]
async fn a_missing_key_says_so() {
    let f = fake().await;
    let err = provider(&f.url, None)
        .chat(&request(), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(
        err.message.contains("requires an API key (401)"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn other_client_errors_are_input_errors_with_the_servers_reason() {
    let f = fake().await;
    let cfg = config(&f.url, json!({"api_key": KEY, "model": "gpt-9"}));
    let err = OpenAiProvider::new("gpt", cfg)
        .unwrap()
        .chat(&request(), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Input);
    assert!(
        err.message.contains(
            "answered 404: The model `gpt-9` does not exist or you do not have access to it.; \
             check `model` and `base_url`"
        ),
        "{}",
        err.message
    );
    assert_eq!(f.calls(Endpoint::Chat), 1, "a 404 is not retried");
}

#[tokio::test]
async fn streams_deltas_in_order_and_returns_the_full_text() {
    let f = fake().await;
    let (tx, mut rx) = mpsc::channel(32);
    let reply = provider(&f.url, Some(KEY))
        .chat(&request(), Some(tx))
        .await
        .unwrap();
    assert_eq!(reply.text, ANSWER);
    assert_eq!(reply.model.as_deref(), Some("gpt-4o-mini"));
    let mut deltas = Vec::new();
    while let Some(d) = rx.recv().await {
        deltas.push(d);
    }
    assert_eq!(
        deltas,
        [
            "Offer the starter ",
            "tier and a ",
            "pilot, then follow ",
            "up next week."
        ]
    );
    assert_eq!(f.chat_requests()[0]["stream"], json!(true));
}

#[tokio::test]
async fn streams_cut_mid_line_and_mid_character_are_reassembled() {
    let f = fake().await;
    let answer = "Café naïve — déjà vu, 東京 ✓ done.";
    f.set_answer(answer);
    f.set_stream_fragmented(true);
    let (tx, mut rx) = mpsc::channel(32);
    let reply = provider(&f.url, Some(KEY))
        .chat(&request(), Some(tx))
        .await
        .unwrap();
    assert_eq!(reply.text, answer);
    let mut joined = String::new();
    while let Some(d) = rx.recv().await {
        joined.push_str(&d);
    }
    assert_eq!(joined, answer);
}

#[tokio::test]
async fn a_stream_that_ends_before_done_is_an_error() {
    let f = fake().await;
    f.set_stream_cut(true);
    let (tx, mut rx) = mpsc::channel(32);
    let err = provider(&f.url, Some(KEY))
        .chat(&request(), Some(tx))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::External);
    assert!(
        err.message
            .contains("ended before `[DONE]` after 18 characters"),
        "{}",
        err.message
    );
    assert_eq!(rx.recv().await.as_deref(), Some("Offer the starter "));
}

#[tokio::test]
async fn streamed_calls_are_retried_until_the_stream_starts() {
    let f = fake().await;
    f.fail_next(Endpoint::Chat, &[500, 429]);
    let (tx, _rx) = mpsc::channel(32);
    let reply = provider(&f.url, Some(KEY))
        .chat(&request(), Some(tx))
        .await
        .unwrap();
    assert_eq!(reply.text, ANSWER);
    assert_eq!(f.calls(Endpoint::Chat), 3);
}

#[tokio::test]
async fn slow_answers_and_stalled_streams_time_out() {
    let f = fake().await;
    f.set_delay(Duration::from_secs(60));
    let cfg = config(
        &f.url,
        json!({"api_key": KEY, "timeout_ms": 300, "max_retries": 0}),
    );
    let p = OpenAiProvider::new("gpt", cfg).unwrap();
    let err = p.chat(&request(), None).await.unwrap_err();
    assert!(
        err.message
            .ends_with("failed after 1 attempt(s): no answer within 300 ms"),
        "{}",
        err.message
    );
    let (tx, _rx) = mpsc::channel(32);
    let err = p.chat(&request(), Some(tx)).await.unwrap_err();
    assert!(
        err.message
            .contains("stalled: nothing for 300 ms after 18 characters"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn no_authorization_header_without_a_key() {
    let f = OpenAiFake::start().await;
    f.set_answer(ANSWER);
    // An unset `${OPENAI_API_KEY:-}` arrives as an empty key: also no header.
    for key in [None, Some("")] {
        let p = provider(&f.url, key);
        assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
    }
    let sent = f.requests();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|r| r.authorization.is_none()), "{sent:?}");
}

#[tokio::test]
async fn embeds_in_batches_of_max_batch_keeping_order() {
    let f = fake().await;
    f.fail_next(Endpoint::Embeddings, &[503]);
    f.set_embed_quirk(EmbedQuirk::Reversed);
    let e = embedder(&f.url, json!({"max_batch": 2, "dimensions": 256}));
    assert_eq!(e.id(), "openai:text-embedding-3-small@256");
    assert_eq!((e.dims(), e.max_batch()), (Some(256), 2));
    let input = texts(&[
        "Budget",
        "Timing",
        "Competitor pricing",
        "Security review",
        "Pilot",
    ]);
    let v = e.embed(&input).await.unwrap();
    assert_eq!(v.len(), 5);
    for (vector, text) in v.iter().zip(&input) {
        assert_eq!(*vector, prompter_fakes::openai::embedding(text, Some(256)));
    }
    assert_eq!(
        f.embed_inputs(),
        [
            texts(&["Budget", "Timing"]),
            texts(&["Competitor pricing", "Security review"]),
            texts(&["Pilot"]),
        ]
    );
    assert_eq!(f.calls(Endpoint::Embeddings), 4, "3 batches and 1 retry");
    let body = f.requests().last().unwrap().body.clone();
    assert_eq!(
        body,
        json!({"model": "text-embedding-3-small", "input": ["Pilot"], "dimensions": 256})
    );
}

#[tokio::test]
async fn embeddings_without_dimensions_use_the_models_length() {
    let f = fake().await;
    let e = embedder(&f.url, json!({}));
    assert_eq!(
        (e.id(), e.dims(), e.max_batch()),
        ("openai:text-embedding-3-small".into(), None, 64)
    );
    let v = e.embed(&texts(&["Budget", "Timing"])).await.unwrap();
    assert_eq!(v[1].len(), prompter_fakes::openai::DIMS);
    assert!(f.requests()[0].body.get("dimensions").is_none());
    assert!(e.embed(&[]).await.unwrap().is_empty());
    assert_eq!(f.calls(Endpoint::Embeddings), 1);
}

#[tokio::test]
async fn a_wrong_embedding_count_is_an_error() {
    let f = fake().await;
    f.set_embed_quirk(EmbedQuirk::DropLast);
    let err = embedder(&f.url, json!({}))
        .embed(&texts(&["Budget", "Timing", "Pilot"]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::External);
    assert_eq!(
        err.message,
        "embedder `oai`: `POST /embeddings` answered 2 embeddings for 3 texts"
    );
}

#[test]
fn configs_have_defaults_and_refuse_what_cannot_work() {
    let cfg: OpenAiConfig = serde_json::from_value(json!({"model": "gpt-4o-mini",
        "api_key": "sk-1"}))
    .unwrap();
    assert_eq!(cfg.base_url, "https://api.openai.com/v1");
    assert_eq!(
        (cfg.timeout_ms, cfg.max_retries, cfg.max_backoff_ms),
        (10_000, 3, 5_000)
    );
    assert!(cfg.problems().is_empty());
    let unknown = serde_json::from_value::<OpenAiConfig>(json!({"model": "m", "modle": "m"}));
    assert!(unknown.is_err());
    assert!(
        serde_json::from_value::<OpenAiConfig>(json!({})).is_err(),
        "model is required"
    );

    let bad: OpenAiConfig = serde_json::from_value(json!({"model": " ", "top_p": 1.5,
        "base_url": "https://api.openai.com/v1/chat/completions", "api_key": ""}))
    .unwrap();
    let keys: Vec<&str> = bad.problems().iter().map(|p| p.key).collect();
    assert_eq!(keys, ["base_url", "api_key", "model", "top_p"]);
    let err = OpenAiProvider::new("gpt", bad).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Config);
    assert!(
        err.message
            .starts_with("llm `gpt`: `base_url` is the API root")
    );

    let local: OpenAiConfig = serde_json::from_value(json!({"model": "llama3.2",
        "base_url": "http://localhost:11434/v1"}))
    .unwrap();
    assert!(local.problems().is_empty(), "local servers need no key");
    let bad_url: OpenAiConfig =
        serde_json::from_value(json!({"model": "m", "base_url": "localhost:11434"})).unwrap();
    assert_eq!(bad_url.problems()[0].key, "base_url");

    let e: OpenAiEmbedConfig = serde_json::from_value(json!({"model": "nomic-embed-text",
        "base_url": "http://localhost:11434/v1"}))
    .unwrap();
    assert_eq!(
        (e.max_batch, e.timeout_ms, e.dimensions),
        (64, 10_000, None)
    );
    assert!(e.problems().is_empty());
    let e: OpenAiEmbedConfig = serde_json::from_value(json!({"model": "m",
        "base_url": "http://localhost:11434/v1", "max_batch": 0, "dimensions": 0}))
    .unwrap();
    let keys: Vec<&str> = e.problems().iter().map(|p| p.key).collect();
    assert_eq!(keys, ["dimensions", "max_batch"]);
}

#[test]
fn stream_chunks_are_parsed_defensively() {
    // Cutting the stream into lines, `data:` payloads and `[DONE]` is `super::sse`'s (tested
    // there); this is what one payload says.
    let chunk = |delta: &str, finish: &str| {
        format!(
            r#"{{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#
        )
    };
    let text = chunk_event(&chunk(r#"{"content":"Hi"}"#, "null")).unwrap();
    assert_eq!(
        (text.delta.as_deref(), text.model.as_deref()),
        (Some("Hi"), Some("m"))
    );
    // The role-only first chunk and empty contents carry nothing.
    assert_eq!(chunk_event(&chunk(r#"{"role":"assistant"}"#, "null")), None);
    assert_eq!(chunk_event(&chunk(r#"{"content":""}"#, "null")), None);
    let last = chunk_event(&chunk("{}", r#""stop""#)).unwrap();
    assert_eq!(
        (last.delta, last.finish_reason.as_deref()),
        (None, Some("stop"))
    );
    for ignored in ["", "[DONE]", "{not json", "{}"] {
        assert_eq!(chunk_event(ignored), None, "{ignored}");
    }
    let err = chunk_event(r#"{"error": {"message": "overloaded", "type": "server_error"}}"#);
    assert_eq!(err.unwrap().error.as_deref(), Some("overloaded"));
    // `stream_options.include_usage`: a last chunk with no choices and the usage.
    let usage = chunk_event(
        r#"{"object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":31,"completion_tokens":7,"total_tokens":38}}"#,
    )
    .unwrap();
    assert_eq!(
        (usage.delta, usage.usage),
        (
            None,
            Some(super::stream::Usage {
                prompt_tokens: 31,
                completion_tokens: 7
            })
        )
    );
}

#[tokio::test]
async fn sampling_parameters_are_sent_exactly() {
    let f = fake().await;
    let cfg = config(&f.url, json!({"api_key": KEY, "top_p": 0.95}));
    let p = OpenAiProvider::new("gpt", cfg).unwrap();
    let mut req = request();
    req.temperature = 0.7;
    // The exact bytes: not `0.949999988079071` (an f32 widened to f64).
    let body = serde_json::to_string(&p.body(&req, false)).unwrap();
    assert!(
        body.contains(r#""temperature":0.7,"top_p":0.95,"#),
        "{body}"
    );
    p.chat(&req, None).await.unwrap();
    let sent = &f.chat_requests()[0];
    assert_eq!(
        (&sent["temperature"], &sent["top_p"]),
        (&json!(0.7), &json!(0.95))
    );
}

#[test]
fn error_details_are_short_and_key_free() {
    let p = provider("http://localhost:1/v1", Some(KEY));
    assert_eq!(
        p.http
            .detail(r#"{"error": {"message": "bad  thing\n happened", "type": "x"}}"#),
        "bad thing happened"
    );
    assert_eq!(
        p.http.detail(r#"{"error": "model not loaded"}"#),
        "model not loaded"
    );
    assert_eq!(p.http.detail(&format!("echo {KEY} back")), "echo *** back");
    assert_eq!(p.http.detail(""), "(empty body)");
    assert_eq!(p.http.detail(&"x".repeat(500)).chars().count(), 201);
}
