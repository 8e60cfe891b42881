//! A fake of Symbl's Conversation API (reference §4.2), on [`SymblFake`]'s port: every
//! `GET /v1/conversations/{conversationId}[/<part>]` in Symbl's exact shapes:
//!
//! | path | answer |
//! |---|---|
//! | `` | `{id, type: "meeting", name, startTime, endTime, members, metadata}` |
//! | `/messages` | `{"messages": [...]}` |
//! | `/summary` | `{"summary": [{id, text, messageRefs: [{id}]}]}` |
//! | `/action-items` | `{"actionItems": [...]}` |
//! | `/follow-ups` | `{"followUps": [...]}` |
//! | `/questions` | `{"questions": [...]}` |
//! | `/topics` | `{"topics": [...]}` |
//! | `/entities` | `{"entities": [...]}` |
//! | `/analytics` | `{"metrics": [...], "members": [...]}` |
//! | `/trackers-detected`, `/trackers` | a **bare array** `[{id, name, matches}]` |
//!
//! A test stores a conversation with [`SymblFake::add_conversation`] (the parts it leaves out
//! answer empty lists); [`sample_conversation`] is a ready-made one. Unknown conversations
//! answer 404, a missing or unknown token 401, and scripted statuses per part
//! ([`SymblFake::fail_conversation_next`]) come first (a 429 with `Retry-After`).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};

use crate::lock;
use crate::symbl::{SymblFake, SymblState, unauthorized};

/// State of the fake Conversation API; read and script it through
/// [`SymblFake`].
#[derive(Debug, Default)]
pub struct ConversationsState {
    conversations: Mutex<HashMap<String, Value>>,
    /// Part path (`summary`, `action-items`, `` for the conversation) → statuses to answer.
    script: Mutex<HashMap<String, VecDeque<u16>>>,
    requests: AtomicU32,
    log: Mutex<Vec<String>>,
}

/// The routes of the fake Conversation API.
pub(crate) fn routes() -> axum::Router<Arc<SymblState>> {
    axum::Router::new()
        .route("/v1/conversations/{id}", get(conversation))
        .route("/v1/conversations/{id}/{part}", get(part))
}

impl SymblFake {
    /// Stores conversation `id`. `data` is an object whose keys are Symbl's response keys:
    /// `conversation` (the conversation object), `messages`, `summary`, `actionItems`,
    /// `followUps`, `questions`, `topics`, `entities`, `trackers` (the detected-trackers array)
    /// and `analytics` (`{metrics, members}`). Missing keys answer empty.
    pub fn add_conversation(&self, id: &str, data: Value) {
        lock(&self.state.conversations.conversations).insert(id.to_owned(), data);
    }

    /// The next requests for `part` (its URL segment: `summary`, `action-items`,
    /// `trackers-detected`, ...; `""` for the conversation itself) answer these statuses, in
    /// order.
    pub fn fail_conversation_next(&self, part: &str, statuses: &[u16]) {
        lock(&self.state.conversations.script)
            .entry(part.to_owned())
            .or_default()
            .extend(statuses.iter().copied());
    }

    /// Conversation API requests received (refused ones included).
    pub fn conversation_requests(&self) -> u32 {
        self.state.conversations.requests.load(Ordering::SeqCst)
    }

    /// The paths of the Conversation API requests, in arrival order.
    pub fn conversation_log(&self) -> Vec<String> {
        lock(&self.state.conversations.log).clone()
    }
}

/// A realistic conversation for `id`, for [`SymblFake::add_conversation`]: a
/// two-sentence summary, one action item, two questions, two topics, analytics for two
/// members and one detected tracker.
pub fn sample_conversation(id: &str) -> Value {
    json!({
        "conversation": {
            "id": id, "type": "meeting", "name": "Acme discovery call",
            "startTime": "2024-05-02T16:00:00.000Z", "endTime": "2024-05-02T16:21:40.000Z",
            "members": [
                {"id": "m-1", "name": "Dana Agent", "email": "dana@example.com"},
                {"id": "m-2", "name": "Sam Buyer", "email": "sam@acme.example"}
            ],
            "metadata": {}
        },
        "summary": [
            {"id": "s-1", "text": "Sam asked about pricing for 40 seats and raised a budget concern.",
             "messageRefs": [{"id": "msg-3"}, {"id": "msg-4"}]},
            {"id": "s-2", "text": "Dana will send a pilot proposal by Friday.",
             "messageRefs": [{"id": "msg-9"}]}
        ],
        "actionItems": [
            {"id": "a-1", "text": "Dana will send a pilot proposal by Friday.", "type": "action_item",
             "score": 0.92, "messageIds": ["msg-9"],
             "entities": [{"type": "datetime", "text": "friday", "offset": 33, "value": "2024-05-03"}],
             "phrases": [], "from": {"id": "m-1", "name": "Dana Agent", "userId": "dana@example.com"},
             "definitive": true, "assignee": {"name": "Dana Agent", "email": "dana@example.com"}}
        ],
        "questions": [
            {"id": "q-1", "text": "How much is it for 40 seats?", "type": "question", "score": 0.98,
             "messageIds": ["msg-3"], "from": {"id": "m-2", "name": "Sam Buyer", "userId": "sam@acme.example"}},
            {"id": "q-2", "text": "Is there a free trial?", "type": "question", "score": 0.95,
             "messageIds": ["msg-6"], "from": {"id": "m-2", "name": "Sam Buyer", "userId": "sam@acme.example"}}
        ],
        "topics": [
            {"id": "t-1", "text": "pricing", "type": "topic", "score": 0.87, "messageIds": ["msg-3"],
             "sentiment": {"polarity": {"score": -0.2}, "suggested": "neutral"},
             "parentRefs": [{"type": "topic", "text": "commercials"}]},
            {"id": "t-2", "text": "pilot", "type": "topic", "score": 0.64, "messageIds": ["msg-9"]}
        ],
        "analytics": {
            "metrics": [
                {"type": "total_silence", "percent": 8.1, "seconds": 105.3},
                {"type": "total_talk_time", "percent": 91.9, "seconds": 1194.7},
                {"type": "total_overlap", "percent": 2.4, "seconds": 31.2}
            ],
            "members": [
                {"id": "m-1", "name": "Dana Agent", "userId": "dana@example.com", "pace": {"wpm": 152},
                 "talkTime": {"percentage": 44.5, "seconds": 531.6},
                 "listenTime": {"percentage": 55.5, "seconds": 663.1},
                 "overlap": {"overlapDuration": 12.4, "overlappingMembers": [
                     {"id": "m-2", "name": "Sam Buyer", "userId": "sam@acme.example", "percent": 1.0, "seconds": 12.4}]}},
                {"id": "m-2", "name": "Sam Buyer", "userId": "sam@acme.example", "pace": {"wpm": 138},
                 "talkTime": {"percentage": 55.5, "seconds": 663.1},
                 "listenTime": {"percentage": 44.5, "seconds": 531.6}}
            ]
        },
        "trackers": [
            {"id": "4476908732794496", "name": "Budget Constraints", "matches": [
                {"type": "vocabulary", "value": "no budget",
                 "messageRefs": [{"id": "msg-4", "text": "We have no budget left this quarter.", "offset": 8}],
                 "insightRefs": []}]}
        ]
    })
}

async fn conversation(
    State(s): State<Arc<SymblState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    answer(&s, &headers, &id, "")
}

async fn part(
    State(s): State<Arc<SymblState>>,
    Path((id, part)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    answer(&s, &headers, &id, &part)
}

fn error(status: u16, message: &str) -> Response {
    let mut r = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(json!({"message": message})),
    )
        .into_response();
    if status == 429 {
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
    }
    r
}

fn answer(s: &SymblState, headers: &HeaderMap, id: &str, part: &str) -> Response {
    let c = &s.conversations;
    c.requests.fetch_add(1, Ordering::SeqCst);
    lock(&c.log).push(if part.is_empty() {
        format!("/v1/conversations/{id}")
    } else {
        format!("/v1/conversations/{id}/{part}")
    });
    let scripted = lock(&c.script).get_mut(part).and_then(VecDeque::pop_front);
    if let Some(status) = scripted {
        return error(status, "scripted failure");
    }
    if !s.authorized(headers) {
        return unauthorized();
    }
    let data = match lock(&c.conversations).get(id) {
        Some(d) => d.clone(),
        None => return error(404, "Conversation not found"),
    };
    let list = |key: &str| data.get(key).cloned().unwrap_or_else(|| json!([]));
    let body = match part {
        "" => data.get("conversation").cloned().unwrap_or_else(|| {
            json!({"id": id, "type": "meeting", "name": "Meeting", "members": [], "metadata": {}})
        }),
        "messages" => json!({ "messages": list("messages") }),
        "summary" => json!({ "summary": list("summary") }),
        "action-items" => json!({ "actionItems": list("actionItems") }),
        "follow-ups" => json!({ "followUps": list("followUps") }),
        "questions" => json!({ "questions": list("questions") }),
        "topics" => json!({ "topics": list("topics") }),
        "entities" => json!({ "entities": list("entities") }),
        "analytics" => data
            .get("analytics")
            .cloned()
            .unwrap_or_else(|| json!({"metrics": [], "members": []})),
        // The one endpoint that answers a bare array (reference §8.8).
        "trackers-detected" | "trackers" => list("trackers"),
        _ => return error(404, "Not Found"),
    };
    Json(body).into_response()
}
