//! Tests of the parent module.
use super::*;
use prompter_core::resource::ChatMessage;
use prompter_fakes::nebula::{Endpoint, NebulaFake};

const ANSWER: &str = "Offer the starter tier and a pilot.";

async fn fake() -> NebulaFake {
    let f = NebulaFake::start("test-key").await;
    f.set_answer(ANSWER);
    f
}

fn provider(base_url: &str, key: &str) -> NebulaProvider {
    let cfg: NebulaConfig = serde_json::from_value(serde_json::json!({
        "api_key": key, "base_url": base_url, "max_backoff_ms": 50, "timeout_ms": 2000}))
    .unwrap();
    NebulaProvider::new("nebula", cfg).unwrap()
}

/// A provider with a 200 ms timeout and no retries.
fn impatient(base_url: &str) -> NebulaProvider {
    let cfg: NebulaConfig = serde_json::from_value(serde_json::json!({
        "api_key": "test-key", "base_url": base_url, "timeout_ms": 200, "max_retries": 0}))
    .unwrap();
    NebulaProvider::new("nebula", cfg).unwrap()
}

fn embedder(base_url: &str) -> NebulaEmbedder {
    let cfg: NebulaEmbedConfig = serde_json::from_value(serde_json::json!({
        "api_key": "test-key", "base_url": base_url, "max_backoff_ms": 50}))
    .unwrap();
    NebulaEmbedder::new("nebula", cfg).unwrap()
}

fn request() -> ChatRequest {
    ChatRequest {
        system_prompt: "Be brief.".into(),
        messages: vec![ChatMessage {
            role: Role::Human,
            text: "Budget Constraints".into(),
        }],
        context: vec![],
        max_new_tokens: 64,
        temperature: 0.0,
    }
}

#[tokio::test]
async fn answers_with_the_last_message_and_sends_the_seed_parameters() {
    let f = fake().await;
    let reply = provider(&f.url, "test-key")
        .chat(&request(), None)
        .await
        .unwrap();
    assert_eq!(reply.text, ANSWER);
    assert_eq!(f.chat_attempts(), 1);
    let sent = &f.chat_requests()[0];
    assert_eq!(sent["messages"][0]["role"], "human");
    assert_eq!(sent["system_prompt"], "Be brief.");
    assert_eq!(
        (sent["top_k"].as_u64(), sent["max_new_tokens"].as_u64()),
        (Some(1), Some(64))
    );
}

#[tokio::test]
async fn retries_503_twice_then_succeeds_and_honours_retry_after() {
    let f = fake().await;
    f.fail_next(Endpoint::Chat, &[503, 503]);
    let p = provider(&f.url, "test-key");
    assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
    assert_eq!(f.chat_attempts(), 3);
    f.fail_next(Endpoint::Chat, &[429]);
    assert_eq!(p.chat(&request(), None).await.unwrap().text, ANSWER);
    assert_eq!(f.chat_attempts(), 5);
}

#[tokio::test]
async fn gives_up_after_the_retry_budget_and_says_why() {
    let f = fake().await;
    f.set_down(true);
    let err = provider(&f.url, "test-key")
        .chat(&request(), None)
        .await
        .unwrap_err();
    assert_eq!(
        err.message,
        r#"Nebula `/v1/model/chat` failed after 4 attempt(s): 503: {"message":"Service temporarily unavailable"}"#
    );
    assert_eq!(f.chat_attempts(), 4);
}

#[tokio::test]
async fn a_bad_key_is_a_config_error_that_never_shows_the_key() {
    let f = fake().await;
    let p = provider(&f.url, "wrong-secret-value");
    let err = p.chat(&request(), None).await.unwrap_err();
    assert_eq!(err.kind, prompter_core::error::ErrorKind::Config);
    assert!(err.message.contains("(401)"), "{}", err.message);
    assert!(!format!("{err} {err:?} {p:?}").contains("wrong-secret-value"));
}

#[tokio::test]
async fn streams_deltas_as_they_arrive() {
    let f = fake().await;
    let (tx, mut rx) = mpsc::channel(8);
    let reply = provider(&f.url, "test-key")
        .chat(&request(), Some(tx))
        .await
        .unwrap();
    assert_eq!(reply.text, ANSWER);
    assert_eq!(rx.recv().await.unwrap(), "Offer the starter ");
    assert_eq!(rx.recv().await.unwrap(), "tier and a pilot.");
}

#[tokio::test]
async fn multibyte_characters_cut_across_chunks_arrive_intact() {
    // The fake's 5-byte pieces cut several of these characters in two.
    let answer = "The client’s café budget — déjà vu: ’é— again, naïve résumé.";
    let f = fake().await;
    f.set_answer(answer);
    f.set_stream_fragmented(true);
    let (tx, mut rx) = mpsc::channel(64);
    let reply = provider(&f.url, "test-key")
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
async fn a_stream_longer_than_the_timeout_succeeds_while_chunks_keep_coming() {
    let answer = "Start with a pilot team of five people ".repeat(8);
    let answer = answer.trim_end();
    let f = fake().await;
    f.set_answer(answer);
    // 15 lines after the first, 50 ms apart: 750 ms in all against a 200 ms timeout.
    f.set_stream_interval(Duration::from_millis(50));
    let (tx, _rx) = mpsc::channel(64);
    let started = std::time::Instant::now();
    let reply = impatient(&f.url).chat(&request(), Some(tx)).await.unwrap();
    assert!(started.elapsed() > Duration::from_millis(200));
    assert_eq!(reply.text, answer);
    assert_eq!(f.chat_attempts(), 1);
}

#[tokio::test]
async fn a_stalled_stream_and_a_slow_answer_fail_clearly() {
    let f = fake().await;
    // The streamed answer sends "Offer the starter " at once, then nothing for a second.
    f.set_chat_delay(Duration::from_secs(1));
    let p = impatient(&f.url);
    let (tx, mut rx) = mpsc::channel(8);
    let err = p.chat(&request(), Some(tx)).await.unwrap_err();
    assert_eq!(err.kind, prompter_core::error::ErrorKind::External);
    assert_eq!(
        err.message,
        "Nebula `/v1/model/chat/streaming`: the answer stream stalled after 18 characters \
         (nothing for 200 ms)"
    );
    assert_eq!(rx.recv().await.as_deref(), Some("Offer the starter "));
    let err = p.chat(&request(), None).await.unwrap_err();
    assert_eq!(
        err.message,
        "Nebula `/v1/model/chat` failed after 1 attempt(s): no answer within 200 ms"
    );
}

#[tokio::test]
async fn a_stream_without_text_is_an_error() {
    let f = fake().await;
    f.set_answer("");
    let (tx, mut rx) = mpsc::channel(8);
    let err = provider(&f.url, "test-key")
        .chat(&request(), Some(tx))
        .await
        .unwrap_err();
    assert_eq!(err.kind, prompter_core::error::ErrorKind::External);
    assert!(
        err.message.starts_with("Nebula streamed no text"),
        "{}",
        err.message
    );
    assert_eq!(rx.recv().await, None);
}

#[tokio::test]
async fn embeds_one_text_per_call_with_retries() {
    let f = fake().await;
    f.fail_next(Endpoint::Embed, &[503]);
    let e = embedder(&f.url);
    assert_eq!(e.id(), "nebula:nebula-text-embedding-large");
    assert_eq!(e.dims(), Some(1024));
    let v = e
        .embed(&["Budget Constraints".into(), "Timing".into()])
        .await
        .unwrap();
    assert_eq!((v.len(), v[0].len()), (2, 1024));
    assert_eq!(
        v[0],
        prompter_fakes::nebula::embedding("Budget Constraints")
    );
    assert_eq!(f.embed_attempts(), 3);
    assert_eq!(f.embedded_texts(), ["Budget Constraints", "Timing"]);
}

#[test]
fn deltas_are_read_defensively() {
    // Cutting the stream into lines and `data:` payloads is `crate::openai::sse`'s (tested there).
    assert_eq!(delta_of("{\"delta\": \"’é\"}").as_deref(), Some("’é"));
    assert_eq!(
        delta_of("{\"delta\":\"x\",\"other\":1}").as_deref(),
        Some("x")
    );
    assert_eq!(delta_of("[DONE]"), None);
    assert_eq!(delta_of("{not json"), None);
    assert_eq!(delta_of("{\"text\": \"no delta\"}"), None);
}

#[test]
fn sampling_parameters_are_sent_exactly() {
    let cfg: NebulaConfig = serde_json::from_value(serde_json::json!({
        "api_key": "test-key", "repetition_penalty": 1.2}))
    .unwrap();
    let p = NebulaProvider::new("nebula", cfg).unwrap();
    let mut req = request();
    req.temperature = 0.7;
    let body = serde_json::to_string(&p.body(&req)).unwrap();
    // The number as written in the body: not `0.949999988079071` (an f32 widened to f64).
    let raw = |key: &str| {
        let start = body.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
        let len = body[start..].find([',', '}']).unwrap();
        body[start..start + len].to_owned()
    };
    assert_eq!(
        (raw("top_p"), raw("repetition_penalty"), raw("temperature")),
        ("0.95".into(), "1.2".into(), "0.7".into()),
        "{body}"
    );
}

#[tokio::test]
async fn the_server_receives_top_p_0_95() {
    let f = fake().await;
    provider(&f.url, "test-key")
        .chat(&request(), None)
        .await
        .unwrap();
    let sent = &f.chat_requests()[0];
    assert_eq!(sent["top_p"], serde_json::json!(0.95));
}
