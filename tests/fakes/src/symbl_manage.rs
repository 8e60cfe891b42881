//! A fake of Symbl's Management API for trackers (reference §4.1), on [`SymblFake`]'s port:
//!
//! - `GET /v1/manage/trackers[?name=...]` → `{"trackers": [{id, name, vocabulary}]}`
//!   (or the docs' single-object form, see [`SymblFake::set_trackers_list_single_object`]);
//! - `POST /v1/manage/tracker` with `{"name", "vocabulary"}` → `201 {"tracker": {...}}`;
//! - `POST /v1/manage/trackers` with `[{name, vocabulary}]` → `201 {"trackers": [...]}`;
//! - `GET|PUT|DELETE /v1/manage/tracker/{id}` → `{"tracker": {...}}` /
//!   `{"id", "type": "tracker", "deleted": true}`.
//!
//! Symbl's rules are enforced: names are unique, case-sensitive (**409**); no duplicate
//! phrases, only `.` and `'` as punctuation, at least one phrase (**400**); bodies up to 1 MB
//! (**413**); at most 500 trackers; unknown ids **404**; a missing or unknown token **401**.
//! The API allows one request at a time: every request is held in flight for a few
//! milliseconds ([`SymblFake::set_manage_hold`]) and a request that arrives meanwhile gets
//! **429** with `Retry-After` and is counted ([`SymblFake::manage_overlaps`]). Scripted
//! statuses ([`SymblFake::fail_manage_next`]) come on top.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::lock;
use crate::symbl::{SymblFake, SymblState, unauthorized};

/// Symbl's per-account tracker limit.
const MAX_TRACKERS: usize = 500;
/// Symbl's body limit.
const MAX_BODY_BYTES: usize = 1_000_000;
/// The first id handed out (Symbl's ids are 16-digit numeric strings).
const FIRST_ID: u64 = 4_476_908_732_794_496;

/// A stored tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeTracker {
    /// Its id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its phrases.
    pub vocabulary: Vec<String>,
}

impl FakeTracker {
    fn json(&self) -> Value {
        json!({"id": self.id, "name": self.name, "vocabulary": self.vocabulary})
    }
}

/// State of the fake Management API; read and script it through [`SymblFake`].
#[derive(Debug, Default)]
pub struct ManagementState {
    trackers: Mutex<Vec<FakeTracker>>,
    issued: AtomicU64,
    in_flight: AtomicU32,
    overlaps: AtomicU32,
    requests: AtomicU32,
    /// Milliseconds a request stays in flight; `None` = the default.
    hold_ms: Mutex<Option<u64>>,
    /// `Retry-After` seconds on a 429; `None` = 1.
    retry_after_s: Mutex<Option<u32>>,
    script: Mutex<VecDeque<u16>>,
    list_single_object: AtomicBool,
    log: Mutex<Vec<String>>,
}

const DEFAULT_HOLD_MS: u64 = 10;

/// The routes of the fake Management API.
pub(crate) fn routes() -> axum::Router<Arc<SymblState>> {
    axum::Router::new()
        .route("/v1/manage/trackers", get(list).post(create_bulk))
        .route("/v1/manage/tracker", post(create))
        .route(
            "/v1/manage/tracker/{id}",
            get(get_one).put(update).delete(delete),
        )
}

impl SymblFake {
    /// The trackers the fake holds, in creation order.
    pub fn trackers(&self) -> Vec<FakeTracker> {
        lock(&self.state.management.trackers).clone()
    }

    /// Stores a tracker directly (no request, no rules); returns its id.
    pub fn add_tracker(&self, name: &str, vocabulary: &[&str]) -> String {
        let m = &self.state.management;
        let id = m.next_id();
        lock(&m.trackers).push(FakeTracker {
            id: id.clone(),
            name: name.to_owned(),
            vocabulary: vocabulary.iter().map(|s| (*s).to_owned()).collect(),
        });
        id
    }

    /// The next Management API requests answer these statuses, in order (a 429 with
    /// `Retry-After`), before any other check but the concurrency limit.
    pub fn fail_manage_next(&self, statuses: &[u16]) {
        lock(&self.state.management.script).extend(statuses.iter().copied());
    }

    /// How long each Management API request stays in flight (default 10 ms); requests that
    /// arrive meanwhile are answered 429.
    pub fn set_manage_hold(&self, hold: Duration) {
        *lock(&self.state.management.hold_ms) = Some(hold.as_millis() as u64);
    }

    /// The `Retry-After` (seconds) sent with a 429 (default 1).
    pub fn set_manage_retry_after(&self, secs: u32) {
        *lock(&self.state.management.retry_after_s) = Some(secs);
    }

    /// Answer `GET /v1/manage/trackers` in the docs' example form, a single `{"tracker": {...}}`
    /// (the first tracker), instead of `{"trackers": [...]}`.
    pub fn set_trackers_list_single_object(&self, on: bool) {
        self.state
            .management
            .list_single_object
            .store(on, Ordering::SeqCst);
    }

    /// Management API requests received (all of them, refused ones included).
    pub fn manage_requests(&self) -> u32 {
        self.state.management.requests.load(Ordering::SeqCst)
    }

    /// Requests that arrived while another was in flight (each was answered 429).
    pub fn manage_overlaps(&self) -> u32 {
        self.state.management.overlaps.load(Ordering::SeqCst)
    }

    /// `METHOD /path` of every Management API request, in arrival order.
    pub fn manage_log(&self) -> Vec<String> {
        lock(&self.state.management.log).clone()
    }
}

impl ManagementState {
    fn next_id(&self) -> String {
        (FIRST_ID + self.issued.fetch_add(1, Ordering::SeqCst)).to_string()
    }

    fn too_many(&self) -> Response {
        let secs = lock(&self.retry_after_s).unwrap_or(1);
        let mut r = (
            StatusCode::TOO_MANY_REQUESTS,
            Json(json!({"message": "Too many requests: the Management API allows one request at a time."})),
        )
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            r.headers_mut().insert("retry-after", v);
        }
        r
    }
}

/// A request's hold on the one in-flight slot; released when the handler returns.
struct InFlight(Arc<SymblState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.management.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Admits a request: logs it, enforces the one-at-a-time limit, holds it in flight for a
/// moment (so an overlapping request can be caught), then applies a scripted failure and the
/// token check.
async fn admit(
    s: &Arc<SymblState>,
    headers: &HeaderMap,
    what: String,
) -> Result<InFlight, Response> {
    let m = &s.management;
    m.requests.fetch_add(1, Ordering::SeqCst);
    lock(&m.log).push(what);
    let before = m.in_flight.fetch_add(1, Ordering::SeqCst);
    let slot = InFlight(s.clone());
    if before > 0 {
        m.overlaps.fetch_add(1, Ordering::SeqCst);
        return Err(m.too_many());
    }
    let hold = lock(&m.hold_ms).unwrap_or(DEFAULT_HOLD_MS);
    tokio::time::sleep(Duration::from_millis(hold)).await;
    if let Some(status) = lock(&m.script).pop_front() {
        if status == 429 {
            return Err(m.too_many());
        }
        return Err(error(status, "scripted failure"));
    }
    if !s.authorized(headers) {
        return Err(unauthorized());
    }
    Ok(slot)
}

fn error(status: u16, message: &str) -> Response {
    Refused(status, message.to_owned()).into_response()
}

/// A refusal (status and Symbl-style message), small enough to pass around in `Result`s.
struct Refused(u16, String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        (
            StatusCode::from_u16(self.0).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(json!({"message": self.1})),
        )
            .into_response()
    }
}

fn refuse(status: u16, message: impl Into<String>) -> Refused {
    Refused(status, message.into())
}

/// `{"name", "vocabulary"}` checked against Symbl's rules.
fn parse_spec(v: &Value) -> Result<(String, Vec<String>), Refused> {
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.trim().is_empty())
        .ok_or_else(|| refuse(400, "`name` is required"))?;
    let vocabulary: Vec<String> = match v.get("vocabulary") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| p.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| refuse(400, "`vocabulary` must be a list of strings"))?,
        _ => return Err(refuse(400, "`vocabulary` is required")),
    };
    if vocabulary.is_empty() {
        return Err(refuse(400, "`vocabulary` must not be empty"));
    }
    for (i, phrase) in vocabulary.iter().enumerate() {
        if phrase.trim().is_empty() {
            return Err(refuse(400, "a vocabulary phrase is empty"));
        }
        if let Some(c) = phrase
            .chars()
            .find(|c| !(c.is_alphanumeric() || c.is_whitespace() || *c == '.' || *c == '\''))
        {
            return Err(refuse(
                400,
                format!("Invalid character '{c}' in vocabulary: only '.' and ''' are allowed"),
            ));
        }
        if vocabulary[..i].contains(phrase) {
            return Err(refuse(
                400,
                format!("Duplicate vocabulary phrase: {phrase}"),
            ));
        }
    }
    Ok((name.to_owned(), vocabulary))
}

fn json_body(body: &Bytes) -> Result<Value, Refused> {
    if body.len() > MAX_BODY_BYTES {
        return Err(refuse(413, "Request entity too large"));
    }
    serde_json::from_slice(body).map_err(|_| refuse(400, "the body is not JSON"))
}

fn insert(m: &ManagementState, name: String, vocabulary: Vec<String>) -> Result<Value, Refused> {
    let mut trackers = lock(&m.trackers);
    if trackers.iter().any(|t| t.name == name) {
        return Err(refuse(
            409,
            format!("Tracker with name '{name}' already exists"),
        ));
    }
    if trackers.len() >= MAX_TRACKERS {
        return Err(refuse(400, "The maximum of 500 trackers is reached"));
    }
    let t = FakeTracker {
        id: m.next_id(),
        name,
        vocabulary,
    };
    let v = t.json();
    trackers.push(t);
    Ok(v)
}

#[derive(serde::Deserialize)]
struct NameQuery {
    name: Option<String>,
}

async fn list(
    State(s): State<Arc<SymblState>>,
    Query(q): Query<NameQuery>,
    headers: HeaderMap,
) -> Response {
    let _slot = match admit(&s, &headers, "GET /v1/manage/trackers".into()).await {
        Ok(slot) => slot,
        Err(r) => return r,
    };
    let m = &s.management;
    let all: Vec<Value> = lock(&m.trackers)
        .iter()
        .filter(|t| q.name.as_ref().is_none_or(|n| &t.name == n))
        .map(FakeTracker::json)
        .collect();
    if m.list_single_object.load(Ordering::SeqCst) {
        return match all.into_iter().next() {
            Some(t) => Json(json!({ "tracker": t })).into_response(),
            None => Json(json!({})).into_response(),
        };
    }
    Json(json!({ "trackers": all })).into_response()
}

async fn create(State(s): State<Arc<SymblState>>, headers: HeaderMap, body: Bytes) -> Response {
    let _slot = match admit(&s, &headers, "POST /v1/manage/tracker".into()).await {
        Ok(slot) => slot,
        Err(r) => return r,
    };
    let created = json_body(&body)
        .and_then(|v| parse_spec(&v))
        .and_then(|(name, vocabulary)| insert(&s.management, name, vocabulary));
    match created {
        Ok(t) => (StatusCode::CREATED, Json(json!({ "tracker": t }))).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn create_bulk(
    State(s): State<Arc<SymblState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _slot = match admit(&s, &headers, "POST /v1/manage/trackers".into()).await {
        Ok(slot) => slot,
        Err(r) => return r,
    };
    let specs = match json_body(&body) {
        Ok(Value::Array(a)) => a,
        Ok(_) => return error(400, "the body must be a list of trackers"),
        Err(r) => return r.into_response(),
    };
    let mut parsed = Vec::new();
    for v in &specs {
        match parse_spec(v) {
            Ok(p) => parsed.push(p),
            Err(r) => return r.into_response(),
        }
    }
    let mut created = Vec::new();
    for (name, vocabulary) in parsed {
        match insert(&s.management, name, vocabulary) {
            Ok(t) => created.push(t),
            Err(r) => return r.into_response(),
        }
    }
    (StatusCode::CREATED, Json(json!({ "trackers": created }))).into_response()
}

async fn get_one(
    State(s): State<Arc<SymblState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let _slot = match admit(&s, &headers, format!("GET /v1/manage/tracker/{id}")).await {
        Ok(slot) => slot,
        Err(r) => return r,
    };
    match lock(&s.management.trackers).iter().find(|t| t.id == id) {
        Some(t) => Json(json!({ "tracker": t.json() })).into_response(),
        None => not_found(&id),
    }
}

fn not_found(id: &str) -> Response {
    error(404, &format!("Tracker with id '{id}' not found"))
}

async fn update(
    State(s): State<Arc<SymblState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _slot = match admit(&s, &headers, format!("PUT /v1/manage/tracker/{id}")).await {
        Ok(slot) => slot,
        Err(r) => return r,
    };
    let (name, vocabulary) = match json_body(&body).and_then(|v| parse_spec(&v)) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let mut trackers = lock(&s.management.trackers);
    if trackers.iter().any(|t| t.name == name && t.id != id) {
        return error(409, &format!("Tracker with name '{name}' already exists"));
    }
    match trackers.iter_mut().find(|t| t.id == id) {
        Some(t) => {
            t.name = name;
            t.vocabulary = vocabulary;
            Json(json!({ "tracker": t.json() })).into_response()
        }
        None => not_found(&id),
    }
}

async fn delete(
    State(s): State<Arc<SymblState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let _slot = match admit(&s, &headers, format!("DELETE /v1/manage/tracker/{id}")).await {
        Ok(slot) => slot,
        Err(r) => return r,
    };
    let mut trackers = lock(&s.management.trackers);
    let before = trackers.len();
    trackers.retain(|t| t.id != id);
    if trackers.len() == before {
        return not_found(&id);
    }
    Json(json!({"id": id, "type": "tracker", "deleted": true})).into_response()
}
