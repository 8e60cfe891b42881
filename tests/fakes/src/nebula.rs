//! A fake Nebula (`https://api-nebula.symbl.ai`): `POST /v1/model/embed`, `/v1/model/chat` and
//! `/v1/model/chat/streaming` (SSE `data: {"delta": ...}` lines), `ApiKey` header auth.
//!
//! Failure modes: scripted statuses for the next calls ([`NebulaFake::fail_next`]; 429 comes with
//! `Retry-After: 1`), down for good ([`NebulaFake::set_down`], every call 503), slow answers
//! ([`NebulaFake::set_chat_delay`]: the streamed answer sends its first words at once and the
//! rest after the delay), and 401 for a wrong key. Opt-in stream shapes: fragmented
//! ([`NebulaFake::set_stream_fragmented`]: 5-byte pieces, cutting lines and UTF-8 characters)
//! and paced ([`NebulaFake::set_stream_interval`]: a pause before every chunk after the first).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

use crate::lock;

/// Dimensions of the fake's embeddings, as Nebula's.
pub const DIMS: usize = 1024;
/// The model name Nebula reports for embeddings.
pub const EMBED_MODEL: &str = "nebula-text-embedding-large";

/// Which calls a scripted failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/model/chat` and `/v1/model/chat/streaming`.
    Chat,
    /// `/v1/model/embed`.
    Embed,
}

/// The fake's state; read it through [`NebulaFake`].
#[derive(Default)]
pub struct NebulaState {
    api_key: String,
    chat_script: Mutex<VecDeque<u16>>,
    embed_script: Mutex<VecDeque<u16>>,
    down: AtomicBool,
    chat_delay_ms: AtomicU32,
    stream_fragmented: AtomicBool,
    stream_interval_ms: AtomicU32,
    answer: Mutex<Option<String>>,
    chat_attempts: AtomicU32,
    embed_attempts: AtomicU32,
    chat_requests: Mutex<Vec<Value>>,
    embedded: Mutex<Vec<String>>,
    completions: Mutex<Vec<std::time::Instant>>,
    streams_cut: AtomicU32,
}

/// A running fake Nebula.
#[derive(Clone)]
pub struct NebulaFake {
    /// Base URL, `http://127.0.0.1:PORT`.
    pub url: String,
    state: Arc<NebulaState>,
}

impl NebulaFake {
    /// Starts a fake that accepts `api_key`.
    pub async fn start(api_key: &str) -> Self {
        let state = Arc::new(NebulaState {
            api_key: api_key.to_owned(),
            ..NebulaState::default()
        });
        let app = axum::Router::new()
            .route("/v1/model/embed", post(embed))
            .route("/v1/model/chat", post(chat))
            .route("/v1/model/chat/streaming", post(chat_streaming))
            .with_state(state.clone());
        NebulaFake {
            url: crate::serve(app).await,
            state,
        }
    }

    /// The next calls to `endpoint` answer these statuses, in order (then normal answers).
    pub fn fail_next(&self, endpoint: Endpoint, statuses: &[u16]) {
        let script = match endpoint {
            Endpoint::Chat => &self.state.chat_script,
            Endpoint::Embed => &self.state.embed_script,
        };
        lock(script).extend(statuses.iter().copied());
    }

    /// While down, every call answers 503.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// How long a chat answer takes to complete (the streamed one sends its first words first).
    pub fn set_chat_delay(&self, delay: Duration) {
        self.state
            .chat_delay_ms
            .store(delay.as_millis() as u32, Ordering::SeqCst);
    }

    /// While set, the streamed answer's bytes go out in pieces of [`FRAGMENT_BYTES`], a few
    /// milliseconds apart, so SSE lines and multi-byte UTF-8 characters are cut across network
    /// chunks. Off by default.
    pub fn set_stream_fragmented(&self, fragmented: bool) {
        self.state
            .stream_fragmented
            .store(fragmented, Ordering::SeqCst);
    }

    /// A pause before every `data:` line of the streamed answer after the first (on top of
    /// [`NebulaFake::set_chat_delay`]): an answer that takes long in total but keeps coming.
    /// Default zero.
    pub fn set_stream_interval(&self, interval: Duration) {
        self.state.stream_interval_ms.store(
            u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
            Ordering::SeqCst,
        );
    }

    /// The assistant's answer. Default: a fixed coaching sentence.
    pub fn set_answer(&self, answer: &str) {
        *lock(&self.state.answer) = Some(answer.to_owned());
    }

    /// Chat calls received (both endpoints, failures included).
    pub fn chat_attempts(&self) -> u32 {
        self.state.chat_attempts.load(Ordering::SeqCst)
    }

    /// Embed calls received (failures included).
    pub fn embed_attempts(&self) -> u32 {
        self.state.embed_attempts.load(Ordering::SeqCst)
    }

    /// The bodies of the chat requests answered 200, in order.
    pub fn chat_requests(&self) -> Vec<Value> {
        lock(&self.state.chat_requests).clone()
    }

    /// When each chat answer was complete (the last streamed chunk sent, or the plain answer
    /// ready), in order: the engine's outputs can be ordered against them.
    pub fn completions(&self) -> Vec<std::time::Instant> {
        lock(&self.state.completions).clone()
    }

    /// Streamed answers whose client went away before the answer was complete (the engine
    /// cancelled the call).
    pub fn streams_cut(&self) -> u32 {
        self.state.streams_cut.load(Ordering::SeqCst)
    }

    /// The texts embedded (answered 200), in order.
    pub fn embedded_texts(&self) -> Vec<String> {
        lock(&self.state.embedded).clone()
    }
}

/// The size of the pieces a fragmented stream is cut into ([`NebulaFake::set_stream_fragmented`]).
pub const FRAGMENT_BYTES: usize = 5;

/// The default answer.
pub const DEFAULT_ANSWER: &str =
    "Acknowledge the concern, then offer a phased rollout that starts with a small pilot.";

/// The status the next call to an endpoint gets: 401 for a bad key, 503 when down, else the
/// script's next entry, else 200.
fn gate(s: &NebulaState, headers: &HeaderMap, endpoint: Endpoint) -> Option<Response> {
    let (attempts, script) = match endpoint {
        Endpoint::Chat => (&s.chat_attempts, &s.chat_script),
        Endpoint::Embed => (&s.embed_attempts, &s.embed_script),
    };
    attempts.fetch_add(1, Ordering::SeqCst);
    if headers.get("ApiKey").and_then(|v| v.to_str().ok()) != Some(s.api_key.as_str()) {
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                Json(json!({"message": "Token validation failed for provided token."})),
            )
                .into_response(),
        );
    }
    let status = if s.down.load(Ordering::SeqCst) {
        503
    } else {
        lock(script).pop_front().unwrap_or(200)
    };
    match status {
        200 => None,
        429 => Some(
            (
                StatusCode::TOO_MANY_REQUESTS,
                [("Retry-After", "1")],
                Json(json!({"message": "Too many requests"})),
            )
                .into_response(),
        ),
        code => Some(
            (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Json(json!({"message": "Service temporarily unavailable"})),
            )
                .into_response(),
        ),
    }
}

use axum::Json;

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"message": message}))).into_response()
}

async fn embed(State(s): State<Arc<NebulaState>>, headers: HeaderMap, body: String) -> Response {
    if let Some(r) = gate(&s, &headers, Endpoint::Embed) {
        return r;
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return bad_request("body is not JSON");
    };
    let Some(text) = req.get("text").and_then(Value::as_str) else {
        return bad_request("`text` is required");
    };
    lock(&s.embedded).push(text.to_owned());
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(EMBED_MODEL);
    Json(json!({"model": model, "embedding": embedding(text)})).into_response()
}

/// A deterministic 1024-d unit vector from the text's lowercased words: texts sharing words
/// are close, like a (very) poor semantic model.
pub fn embedding(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; DIMS];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
    {
        let w = word.to_lowercase();
        let h = w.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        v[(h % DIMS as u64) as usize] += 1.0;
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Whether a chat request has the documented shape; the 400 to answer when not.
fn check_chat(req: &Value) -> Result<(), Box<Response>> {
    let ok = req
        .get("messages")
        .and_then(Value::as_array)
        .is_some_and(|m| {
            !m.is_empty()
                && m.iter().all(|m| {
                    matches!(
                        m.get("role").and_then(Value::as_str),
                        Some("human" | "assistant")
                    ) && m.get("text").is_some_and(Value::is_string)
                })
        });
    if ok {
        Ok(())
    } else {
        Err(Box::new(bad_request(
            "`messages` must be a non-empty list of {role: human|assistant, text}",
        )))
    }
}

async fn chat(State(s): State<Arc<NebulaState>>, headers: HeaderMap, body: String) -> Response {
    if let Some(r) = gate(&s, &headers, Endpoint::Chat) {
        return r;
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return bad_request("body is not JSON");
    };
    if let Err(r) = check_chat(&req) {
        return *r;
    }
    lock(&s.chat_requests).push(req.clone());
    let delay = Duration::from_millis(u64::from(s.chat_delay_ms.load(Ordering::SeqCst)));
    tokio::time::sleep(delay).await;
    let answer = lock(&s.answer)
        .clone()
        .unwrap_or_else(|| DEFAULT_ANSWER.into());
    lock(&s.completions).push(std::time::Instant::now());
    let mut messages = req["messages"].as_array().cloned().unwrap_or_default();
    messages.push(json!({"role": "assistant", "text": answer}));
    Json(json!({"messages": messages})).into_response()
}

async fn chat_streaming(
    State(s): State<Arc<NebulaState>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(r) = gate(&s, &headers, Endpoint::Chat) {
        return r;
    }
    let Ok(req) = serde_json::from_str::<Value>(&body) else {
        return bad_request("body is not JSON");
    };
    if let Err(r) = check_chat(&req) {
        return *r;
    }
    lock(&s.chat_requests).push(req);
    let delay = Duration::from_millis(u64::from(s.chat_delay_ms.load(Ordering::SeqCst)));
    let answer = lock(&s.answer)
        .clone()
        .unwrap_or_else(|| DEFAULT_ANSWER.into());
    // The first three words at once, the rest after the delay in a few chunks.
    let words: Vec<&str> = answer.split_inclusive(' ').collect();
    let (first, rest) = words.split_at(words.len().min(3));
    let first = first.concat();
    let rest: Vec<String> = rest.chunks(4).map(<[&str]>::concat).collect();
    let fragmented = s.stream_fragmented.load(Ordering::SeqCst);
    let interval = Duration::from_millis(u64::from(s.stream_interval_ms.load(Ordering::SeqCst)));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        // One `data:` line, whole or in pieces; false once the client has gone.
        let send = |d: String| {
            let tx = tx.clone();
            async move {
                let line = format!("data: {}\n\n", json!({"delta": d})).into_bytes();
                if !fragmented {
                    return tx.send(Ok(line)).await.is_ok();
                }
                for piece in line.chunks(FRAGMENT_BYTES) {
                    if tx.send(Ok(piece.to_vec())).await.is_err() {
                        return false;
                    }
                    // Let each piece leave on its own before the next one.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                true
            }
        };
        let cut = || {
            s.streams_cut.fetch_add(1, Ordering::SeqCst);
        };
        if !send(first).await {
            return cut();
        }
        tokio::time::sleep(delay).await;
        for chunk in rest {
            if !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            if !send(chunk).await {
                return cut();
            }
        }
        lock(&s.completions).push(std::time::Instant::now());
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}
