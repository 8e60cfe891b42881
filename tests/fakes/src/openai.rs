//! A fake OpenAI-compatible server (the OpenAI v1 API as OpenAI, Ollama, vLLM and llama.cpp serve
//! it under `/v1`): `POST /v1/chat/completions` (plain, or Server-Sent Events with
//! `chat.completion.chunk` deltas and a final `data: [DONE]` when `"stream": true`),
//! `POST /v1/embeddings` and `GET /v1/models`.
//!
//! It checks what OpenAI checks: the `Authorization: Bearer` key when started with one
//! ([`OpenAiFake::start_with_key`]; [`OpenAiFake::start`] is a keyless local server), a known
//! `model`, well-formed `messages`, no unknown request fields, sampling values in range. Errors
//! have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
//!
//! Failure modes: scripted statuses for the next calls ([`OpenAiFake::fail_next`]; 429 comes
//! with `Retry-After: 1`), down for good ([`OpenAiFake::set_down`], every call 503), slow answers
//! ([`OpenAiFake::set_delay`]: a streamed answer sends its first words at once and the rest after
//! the delay), streams cut before `[DONE]` ([`OpenAiFake::set_stream_cut`]), streams delivered in
//! tiny fragments that split lines and UTF-8 characters ([`OpenAiFake::set_stream_fragmented`]),
//! and embedding lists out of order or one short ([`OpenAiFake::set_embed_quirk`]).
//!
//! Embeddings are [`crate::nebula::embedding`] vectors (1024 dimensions), truncated and
//! renormalized to `dimensions` when the request asks, as OpenAI's `text-embedding-3-*` do.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::lock;

/// The chat model the fake serves (any model in [`OpenAiFake::set_models`] is accepted).
pub const CHAT_MODEL: &str = "gpt-4o-mini";
/// The embedding model the fake serves.
pub const EMBED_MODEL: &str = "text-embedding-3-small";
/// Dimensions of the fake's embeddings when the request names none.
pub const DIMS: usize = crate::nebula::DIMS;
/// The default answer.
pub const DEFAULT_ANSWER: &str =
    "Acknowledge the concern, then offer a phased rollout that starts with a small pilot.";

/// Which calls a scripted failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`, streamed or not.
    Chat,
    /// `POST /v1/embeddings`.
    Embeddings,
}

/// How the embeddings answer misbehaves (servers may answer out of order; a broken proxy may
/// lose an item).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbedQuirk {
    /// In order, one item per input.
    #[default]
    None,
    /// All items, in reverse order (each keeps its correct `index`).
    Reversed,
    /// The last item is missing.
    DropLast,
}

/// One request the fake received.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Which endpoint.
    pub endpoint: Endpoint,
    /// The `Authorization` header, verbatim, when sent.
    pub authorization: Option<String>,
    /// The JSON body (`null` when it was not JSON).
    pub body: Value,
    /// The status the fake answered.
    pub status: u16,
}

/// The fake's state; read and script it through [`OpenAiFake`].
#[derive(Default)]
pub struct OpenAiState {
    api_key: Option<String>,
    models: Mutex<Vec<String>>,
    chat_script: Mutex<VecDeque<u16>>,
    embed_script: Mutex<VecDeque<u16>>,
    down: AtomicBool,
    delay_ms: AtomicU32,
    stream_cut: AtomicBool,
    stream_fragmented: AtomicBool,
    embed_quirk: Mutex<EmbedQuirk>,
    answer: Mutex<Option<String>>,
    chat_calls: AtomicU32,
    embed_calls: AtomicU32,
    requests: Mutex<Vec<Recorded>>,
}

/// A running fake OpenAI-compatible server.
#[derive(Clone)]
pub struct OpenAiFake {
    /// The base URL to configure, `http://127.0.0.1:PORT/v1` (as `base_url` for OpenAI clients).
    pub url: String,
    state: Arc<OpenAiState>,
}

impl OpenAiFake {
    /// Starts a fake that needs no key, like a local Ollama, vLLM or llama.cpp server.
    pub async fn start() -> Self {
        Self::start_inner(None).await
    }

    /// Starts a fake that requires `Authorization: Bearer {api_key}`, like OpenAI.
    pub async fn start_with_key(api_key: &str) -> Self {
        Self::start_inner(Some(api_key.to_owned())).await
    }

    async fn start_inner(api_key: Option<String>) -> Self {
        let state = Arc::new(OpenAiState {
            api_key,
            models: Mutex::new(vec![CHAT_MODEL.into(), EMBED_MODEL.into()]),
            ..OpenAiState::default()
        });
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .with_state(state.clone());
        OpenAiFake {
            url: format!("{}/v1", crate::serve(app).await),
            state,
        }
    }

    /// The models the fake accepts (default [`CHAT_MODEL`] and [`EMBED_MODEL`]); others get 404
    /// `model_not_found`, as on OpenAI.
    pub fn set_models(&self, models: &[&str]) {
        *lock(&self.state.models) = models.iter().map(|m| (*m).to_owned()).collect();
    }

    /// The next calls to `endpoint` answer these statuses, in order (then normal answers).
    pub fn fail_next(&self, endpoint: Endpoint, statuses: &[u16]) {
        let script = match endpoint {
            Endpoint::Chat => &self.state.chat_script,
            Endpoint::Embeddings => &self.state.embed_script,
        };
        lock(script).extend(statuses.iter().copied());
    }

    /// While down, every call answers 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// How long a chat answer takes to complete (a streamed one sends its first words first).
    pub fn set_delay(&self, delay: Duration) {
        let ms = u32::try_from(delay.as_millis()).unwrap_or(u32::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// When set, streamed answers stop after their first words: no more chunks, no `[DONE]`.
    pub fn set_stream_cut(&self, cut: bool) {
        self.state.stream_cut.store(cut, Ordering::SeqCst);
    }

    /// When set, streamed answers arrive a few bytes at a time, splitting lines, JSON and
    /// multi-byte characters across network chunks.
    pub fn set_stream_fragmented(&self, fragmented: bool) {
        self.state
            .stream_fragmented
            .store(fragmented, Ordering::SeqCst);
    }

    /// How the embeddings answer misbehaves.
    pub fn set_embed_quirk(&self, quirk: EmbedQuirk) {
        *lock(&self.state.embed_quirk) = quirk;
    }

    /// The assistant's answer. Default: [`DEFAULT_ANSWER`].
    pub fn set_answer(&self, answer: &str) {
        *lock(&self.state.answer) = Some(answer.to_owned());
    }

    /// Calls received by `endpoint`, failures included.
    pub fn calls(&self, endpoint: Endpoint) -> u32 {
        match endpoint {
            Endpoint::Chat => self.state.chat_calls.load(Ordering::SeqCst),
            Endpoint::Embeddings => self.state.embed_calls.load(Ordering::SeqCst),
        }
    }

    /// Every request received, in order, with the status it got.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.state.requests).clone()
    }

    /// The bodies of the chat requests answered 200, in order.
    pub fn chat_requests(&self) -> Vec<Value> {
        self.answered(Endpoint::Chat)
    }

    /// The `input` lists of the embedding requests answered 200, in order (one per call).
    pub fn embed_inputs(&self) -> Vec<Vec<String>> {
        self.answered(Endpoint::Embeddings)
            .iter()
            .map(|b| inputs(&b["input"]).unwrap_or_default())
            .collect()
    }

    fn answered(&self, endpoint: Endpoint) -> Vec<Value> {
        lock(&self.state.requests)
            .iter()
            .filter(|r| r.endpoint == endpoint && r.status == 200)
            .map(|r| r.body.clone())
            .collect()
    }
}

/// An OpenAI-shaped error answer, `{"error": {"message", "type", "param", "code"}}`.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": null, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

fn error(
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: &str,
) -> Response {
    ApiError {
        status,
        kind,
        code,
        message: message.to_owned(),
    }
    .into_response()
}

/// A 400 `invalid_request_error`.
fn invalid(message: &str) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        kind: "invalid_request_error",
        code: None,
        message: message.to_owned(),
    }
}

/// Counts the call; answers 401 for a bad key, 503 when down, else the script's next status;
/// `None` means "answer normally".
fn gate(s: &OpenAiState, endpoint: Endpoint, headers: &HeaderMap) -> Option<Response> {
    let (calls, script) = match endpoint {
        Endpoint::Chat => (&s.chat_calls, &s.chat_script),
        Endpoint::Embeddings => (&s.embed_calls, &s.embed_script),
    };
    calls.fetch_add(1, Ordering::SeqCst);
    if let Some(r) = check_key(s, authorization(headers).as_deref()) {
        return Some(r);
    }
    let status = if s.down.load(Ordering::SeqCst) {
        503
    } else {
        lock(script).pop_front().unwrap_or(200)
    };
    scripted(status)
}

fn authorization(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Records a request with the status it got.
fn record(s: &OpenAiState, endpoint: Endpoint, headers: &HeaderMap, body: Value, status: u16) {
    lock(&s.requests).push(Recorded {
        endpoint,
        authorization: authorization(headers),
        body,
        status,
    });
}

fn check_key(s: &OpenAiState, authorization: Option<&str>) -> Option<Response> {
    let expected = s.api_key.as_deref()?;
    let given = authorization.and_then(|a| a.strip_prefix("Bearer "));
    match given {
        Some(k) if k == expected => None,
        Some(k) => {
            // OpenAI echoes a masked key; the provider must never pass this on.
            let head: String = k.chars().take(3).collect();
            let tail: String = k
                .chars()
                .rev()
                .take(2)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Some(error(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                &format!(
                    "Incorrect API key provided: {head}***{tail}. You can find your API key at https://platform.openai.com/account/api-keys."
                ),
            ))
        }
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )),
    }
}

fn scripted(status: u16) -> Option<Response> {
    match status {
        200 => None,
        429 => {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                Some("rate_limit_exceeded"),
                "Rate limit reached for requests. Please try again in 1s.",
            );
            r.headers_mut()
                .insert("retry-after", axum::http::HeaderValue::from_static("1"));
            Some(r)
        }
        500 => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The server had an error while processing your request. Sorry about that!",
        )),
        503 => Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            None,
            "The engine is currently overloaded, please try again later",
        )),
        code => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let kind = if code < 500 {
                "invalid_request_error"
            } else {
                "server_error"
            };
            Some(error(
                status,
                kind,
                None,
                &format!("Scripted failure {code}"),
            ))
        }
    }
}

/// Request fields of `/v1/chat/completions`; OpenAI rejects others.
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
];

/// Checks the model; 404 `model_not_found` like OpenAI for an unknown one.
fn check_model(s: &OpenAiState, req: &Value) -> Result<String, ApiError> {
    let Some(model) = req.get("model").and_then(Value::as_str) else {
        return Err(invalid("you must provide a model parameter"));
    };
    if !lock(&s.models).iter().any(|m| m == model) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            message: format!("The model `{model}` does not exist or you do not have access to it."),
        });
    }
    Ok(model.to_owned())
}

fn check_chat(req: &Value) -> Result<(), ApiError> {
    let Some(obj) = req.as_object() else {
        return Err(invalid("the body must be a JSON object"));
    };
    if let Some(k) = obj.keys().find(|k| !CHAT_FIELDS.contains(&k.as_str())) {
        return Err(invalid(&format!(
            "Unrecognized request argument supplied: {k}"
        )));
    }
    let messages_ok = req
        .get("messages")
        .and_then(Value::as_array)
        .is_some_and(|m| {
            !m.is_empty()
                && m.iter().all(|m| {
                    matches!(
                        m.get("role").and_then(Value::as_str),
                        Some("system" | "developer" | "user" | "assistant")
                    ) && m.get("content").is_some_and(Value::is_string)
                })
        });
    if !messages_ok {
        return Err(invalid(
            "'messages' must be a non-empty array of {role: system|developer|user|assistant, content: string}",
        ));
    }
    let in_range = |key: &str, max: f64| {
        req.get(key)
            .is_none_or(|v| v.as_f64().is_some_and(|x| (0.0..=max).contains(&x)))
    };
    if !in_range("temperature", 2.0) {
        return Err(invalid("'temperature' must be a number between 0 and 2"));
    }
    if !in_range("top_p", 1.0) {
        return Err(invalid("'top_p' must be a number between 0 and 1"));
    }
    if req
        .get("max_tokens")
        .is_some_and(|v| v.as_u64().is_none_or(|n| n == 0))
    {
        return Err(invalid("'max_tokens' must be a positive integer"));
    }
    if req.get("stream").is_some_and(|v| !v.is_boolean()) {
        return Err(invalid("'stream' must be a boolean"));
    }
    Ok(())
}

fn parse_body(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The answer, cut to `max_tokens` words (the fake's "tokens"), and its finish reason.
fn answer_for(s: &OpenAiState, req: &Value) -> (String, &'static str) {
    let answer = lock(&s.answer)
        .clone()
        .unwrap_or_else(|| DEFAULT_ANSWER.into());
    let limit = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
    let words: Vec<&str> = answer.split_inclusive(' ').collect();
    if words.len() > limit {
        (words[..limit].concat().trim_end().to_owned(), "length")
    } else {
        (answer, "stop")
    }
}

fn word_count(v: &Value) -> usize {
    v.get("messages").and_then(Value::as_array).map_or(0, |m| {
        m.iter()
            .filter_map(|m| m.get("content").and_then(Value::as_str))
            .map(|t| t.split_whitespace().count())
            .sum()
    })
}

async fn chat(State(s): State<Arc<OpenAiState>>, headers: HeaderMap, body: String) -> Response {
    let req = parse_body(&body);
    let r = chat_answer(&s, &headers, &req).await;
    record(&s, Endpoint::Chat, &headers, req, r.status().as_u16());
    r
}

async fn chat_answer(s: &OpenAiState, headers: &HeaderMap, req: &Value) -> Response {
    if let Some(r) = gate(s, Endpoint::Chat, headers) {
        return r;
    }
    if req.is_null() {
        return invalid("We could not parse the JSON body of your request.").into_response();
    }
    let model = match check_model(s, req).and_then(|m| check_chat(req).map(|()| m)) {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    let (answer, finish) = answer_for(s, req);
    let id = format!("chatcmpl-fake{}", s.chat_calls.load(Ordering::SeqCst));
    let delay = Duration::from_millis(u64::from(s.delay_ms.load(Ordering::SeqCst)));
    let prompt_tokens = word_count(req);
    let completion_tokens = answer.split_whitespace().count();
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        // OpenAI ends the stream with a usage chunk (empty `choices`) when asked.
        let usage = (req.pointer("/stream_options/include_usage") == Some(&json!(true)))
            .then_some((prompt_tokens, completion_tokens));
        return stream(s, id, model, answer, finish, delay, usage);
    }
    tokio::time::sleep(delay).await;
    Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer, "refusal": null},
            "logprobs": null,
            "finish_reason": finish,
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }))
    .into_response()
}

/// The SSE answer: a role-only chunk, the content in chunks of up to three words, a chunk with
/// the finish reason and an empty delta, then `data: [DONE]`.
fn stream(
    s: &OpenAiState,
    id: String,
    model: String,
    answer: String,
    finish: &'static str,
    delay: Duration,
    usage: Option<(usize, usize)>,
) -> Response {
    let created = now_secs();
    let chunk = |delta: Value, finish: Option<&str>| {
        let c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        format!("data: {c}\n\n")
    };
    let words: Vec<&str> = answer.split_inclusive(' ').collect();
    let mut parts = words
        .chunks(3)
        .map(|w| chunk(json!({"content": w.concat()}), None));
    let first = format!(
        "{}{}",
        chunk(json!({"role": "assistant", "content": ""}), None),
        parts.next().unwrap_or_default()
    );
    let cut = s.stream_cut.load(Ordering::SeqCst);
    let mut rest: Vec<String> = if cut { Vec::new() } else { parts.collect() };
    if !cut {
        rest.push(chunk(json!({}), Some(finish)));
        if let Some((p, c)) = usage {
            let u = json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [],
                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
            });
            rest.push(format!("data: {u}\n\n"));
        }
        rest.push("data: [DONE]\n\n".into());
    }
    let fragmented = s.stream_fragmented.load(Ordering::SeqCst);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        let send = |text: String| {
            let tx = tx.clone();
            async move {
                let pieces: Vec<Vec<u8>> = if fragmented {
                    text.as_bytes().chunks(5).map(<[u8]>::to_vec).collect()
                } else {
                    vec![text.into_bytes()]
                };
                for p in pieces {
                    if tx.send(Ok(p)).await.is_err() {
                        return false;
                    }
                    if fragmented {
                        // Give the client a chance to read each piece on its own.
                        tokio::task::yield_now().await;
                    }
                }
                true
            }
        };
        if !send(first).await {
            return;
        }
        tokio::time::sleep(delay).await;
        for text in rest {
            if !send(text).await {
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// The texts of an `input` (a string or a list of strings).
fn inputs(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect(),
        _ => None,
    }
}

/// [`crate::nebula::embedding`] cut to `dims` and renormalized.
pub fn embedding(text: &str, dims: Option<usize>) -> Vec<f32> {
    let mut v = crate::nebula::embedding(text);
    if let Some(d) = dims {
        v.truncate(d);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
    }
    v
}

async fn embeddings(
    State(s): State<Arc<OpenAiState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let req = parse_body(&body);
    let r = embed_answer(&s, &headers, &req);
    record(&s, Endpoint::Embeddings, &headers, req, r.status().as_u16());
    r
}

fn embed_answer(s: &OpenAiState, headers: &HeaderMap, req: &Value) -> Response {
    if let Some(r) = gate(s, Endpoint::Embeddings, headers) {
        return r;
    }
    let checked = check_model(s, req).and_then(|model| {
        let texts = inputs(req.get("input").unwrap_or(&Value::Null))
            .filter(|t| !t.is_empty() && t.len() <= 2048)
            .ok_or_else(|| invalid("'input' must be a string or a list of 1 to 2048 strings"))?;
        if texts.iter().any(String::is_empty) {
            return Err(invalid("'input' cannot contain an empty string"));
        }
        let dims = match req.get("dimensions") {
            None => None,
            Some(d) => match d.as_u64().and_then(|d| usize::try_from(d).ok()) {
                Some(d) if (1..=DIMS).contains(&d) => Some(d),
                _ => {
                    return Err(invalid(&format!(
                        "'dimensions' must be between 1 and {DIMS}"
                    )));
                }
            },
        };
        Ok((model, texts, dims))
    });
    let (model, texts, dims) = match checked {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let mut data: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": embedding(t, dims)}))
        .collect();
    match *lock(&s.embed_quirk) {
        EmbedQuirk::None => {}
        EmbedQuirk::Reversed => data.reverse(),
        EmbedQuirk::DropLast => {
            data.pop();
        }
    }
    let tokens: usize = texts.iter().map(|t| t.split_whitespace().count()).sum();
    Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn models(State(s): State<Arc<OpenAiState>>, headers: HeaderMap) -> Response {
    if let Some(r) = check_key(
        &s,
        headers.get("authorization").and_then(|v| v.to_str().ok()),
    ) {
        return r;
    }
    let data: Vec<Value> = lock(&s.models)
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "prompter-fakes"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}
