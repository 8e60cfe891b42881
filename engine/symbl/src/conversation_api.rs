//! A finished (or running) conversation through Symbl's Conversation API: the conversation
//! itself, its summary, action items, questions, topics, analytics and detected trackers.
//!
//! Every endpoint is a `GET /v1/conversations/{conversationId}/<part>` with
//! `Authorization: Bearer <token>` (reference §4.2). Answers are parsed defensively: missing
//! fields become empty, ids and numbers are accepted as strings or numbers, an entry that makes
//! no sense is skipped rather than failing the whole part, and the trackers endpoint's bare
//! array is accepted (reference §8.8). A 429, a 5xx or a network failure is retried with
//! backoff that honours `Retry-After`; a 401 gets one fresh token; a 404 is "conversation not
//! found".
//!
//! [`ConversationClient::fetch`] reads several parts at once and keeps each part's result on
//! its own, so one failing endpoint does not lose the others. This module does not own what
//! is done with the parts (the `symbl_conversation` stage).

use std::sync::Arc;

use prompter_core::backoff::Backoff;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::auth::{AuthError, SymblAuth};
use crate::config::SymblConfig;
use crate::management::{encode_segment, id_string};
use crate::rest::{Rest, RestError};

/// A part of a conversation that [`ConversationClient::fetch`] can read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// `/summary`.
    Summary,
    /// `/action-items`.
    ActionItems,
    /// `/questions`.
    Questions,
    /// `/topics`.
    Topics,
    /// `/analytics`.
    Analytics,
    /// `/trackers-detected`.
    Trackers,
}

impl Part {
    /// The parts a post-call summary usually wants (all but `trackers`).
    pub const DEFAULT: [Part; 5] = [
        Part::Summary,
        Part::ActionItems,
        Part::Questions,
        Part::Topics,
        Part::Analytics,
    ];

    /// The snake_case name (as in config and outputs).
    pub fn name(self) -> &'static str {
        match self {
            Part::Summary => "summary",
            Part::ActionItems => "action_items",
            Part::Questions => "questions",
            Part::Topics => "topics",
            Part::Analytics => "analytics",
            Part::Trackers => "trackers",
        }
    }

    /// The URL path segment after the conversation id.
    pub fn path(self) -> &'static str {
        match self {
            Part::Summary => "summary",
            Part::ActionItems => "action-items",
            Part::Questions => "questions",
            Part::Topics => "topics",
            Part::Analytics => "analytics",
            Part::Trackers => "trackers-detected",
        }
    }
}

/// Why a Conversation API call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[must_use]
pub enum ConversationError {
    /// Symbl answered 404.
    #[error("conversation `{conversation_id}` not found")]
    NotFound {
        /// The id asked for.
        conversation_id: String,
    },
    /// No access token could be had.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Symbl answered 401 to a freshly fetched token too.
    #[error(
        "{action}: Symbl rejected the access token even after fetching a new one (401); check that the app in `{app_id_env}` may use the Conversation API"
    )]
    Unauthorized {
        /// What was being read.
        action: String,
        /// The variable holding the app id.
        app_id_env: String,
    },
    /// Symbl refused the request (400, 403, ...).
    #[error("{action}: Symbl answered {status}: {message}")]
    Rejected {
        /// What was being read.
        action: String,
        /// The HTTP status.
        status: u16,
        /// Symbl's explanation.
        message: String,
    },
    /// Network failures, 429s or 5xx answers outlasted the retries, or the answer made no sense.
    #[error("{action}: {reason}")]
    Unavailable {
        /// What was being read.
        action: String,
        /// What went wrong.
        reason: String,
    },
}

/// Someone in a conversation (`from`, `assignee`, `members`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Person {
    /// Symbl's id.
    pub id: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// Email, when known.
    pub email: Option<String>,
    /// The caller's own id (phone number, CRM id).
    pub user_id: Option<String>,
}

/// `GET /v1/conversations/{id}`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Conversation {
    /// The id.
    pub id: String,
    /// `meeting`, ...
    pub kind: Option<String>,
    /// Its name.
    pub name: Option<String>,
    /// ISO start time.
    pub start_time: Option<String>,
    /// ISO end time.
    pub end_time: Option<String>,
    /// The participants.
    pub members: Vec<Person>,
    /// Whatever metadata was attached, as sent.
    pub metadata: Value,
}

/// One sentence of `/summary`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SummaryItem {
    /// Its id.
    pub id: String,
    /// The sentence.
    pub text: String,
    /// Ids of the messages it summarises.
    pub message_refs: Vec<String>,
}

/// One of `/action-items`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ActionItem {
    /// Its id.
    pub id: String,
    /// What is to be done.
    pub text: String,
    /// Confidence.
    pub score: Option<f64>,
    /// The messages it comes from.
    pub message_ids: Vec<String>,
    /// Who said it.
    pub from: Option<Person>,
    /// Who is to do it.
    pub assignee: Option<Person>,
    /// Whether it was stated as certain.
    pub definitive: Option<bool>,
    /// Entities (dates, people) found in it, as sent.
    pub entities: Vec<Value>,
}

/// One of `/questions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Question {
    /// Its id.
    pub id: String,
    /// The question.
    pub text: String,
    /// Confidence.
    pub score: Option<f64>,
    /// The messages it comes from.
    pub message_ids: Vec<String>,
    /// Who asked.
    pub from: Option<Person>,
}

/// One of `/topics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Topic {
    /// Its id.
    pub id: String,
    /// The topic.
    pub text: String,
    /// Relevance.
    pub score: Option<f64>,
    /// The messages it comes from.
    pub message_ids: Vec<String>,
    /// Sentiment polarity score (with `?sentiment=true`).
    pub sentiment: Option<f64>,
    /// Broader topics it belongs to (with `?parentRefs=true`).
    pub parent_refs: Vec<String>,
}

/// `/analytics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Analytics {
    /// Conversation-wide metrics.
    pub metrics: Vec<Metric>,
    /// Per-member figures.
    pub members: Vec<MemberAnalytics>,
}

/// One conversation-wide metric.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metric {
    /// `total_silence`, `total_talk_time`, `total_overlap`.
    pub kind: String,
    /// Share of the conversation.
    pub percent: Option<f64>,
    /// Seconds.
    pub seconds: Option<f64>,
}

/// A share of time, in percent and seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimeShare {
    /// Percentage.
    pub percentage: Option<f64>,
    /// Seconds.
    pub seconds: Option<f64>,
}

/// One member's analytics.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemberAnalytics {
    /// Who.
    pub member: Person,
    /// Words per minute.
    pub pace_wpm: Option<f64>,
    /// Talking time.
    pub talk_time: Option<TimeShare>,
    /// Listening time.
    pub listen_time: Option<TimeShare>,
    /// Seconds spoken over others.
    pub overlap_seconds: Option<f64>,
    /// Whom they spoke over.
    pub overlapping_members: Vec<Person>,
}

/// One tracker detected in a conversation (`/trackers-detected`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DetectedTracker {
    /// The tracker's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// What matched.
    pub matches: Vec<TrackerMatch>,
}

/// One match of a detected tracker.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrackerMatch {
    /// `vocabulary`, ...
    pub kind: String,
    /// The phrase that matched.
    pub value: String,
    /// Texts of the messages it matched in.
    pub messages: Vec<String>,
}

/// The parts [`ConversationClient::fetch`] read: `None` when not asked for, otherwise that
/// part's own result.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConversationParts {
    /// `/summary`.
    pub summary: Option<Result<Vec<SummaryItem>, ConversationError>>,
    /// `/action-items`.
    pub action_items: Option<Result<Vec<ActionItem>, ConversationError>>,
    /// `/questions`.
    pub questions: Option<Result<Vec<Question>, ConversationError>>,
    /// `/topics`.
    pub topics: Option<Result<Vec<Topic>, ConversationError>>,
    /// `/analytics`.
    pub analytics: Option<Result<Analytics, ConversationError>>,
    /// `/trackers-detected`.
    pub trackers: Option<Result<Vec<DetectedTracker>, ConversationError>>,
}

impl ConversationParts {
    /// The parts that failed, with their errors.
    pub fn errors(&self) -> Vec<(Part, &ConversationError)> {
        fn err<T>(
            part: Part,
            r: &Option<Result<T, ConversationError>>,
        ) -> Option<(Part, &ConversationError)> {
            match r {
                Some(Err(e)) => Some((part, e)),
                _ => None,
            }
        }
        [
            err(Part::Summary, &self.summary),
            err(Part::ActionItems, &self.action_items),
            err(Part::Questions, &self.questions),
            err(Part::Topics, &self.topics),
            err(Part::Analytics, &self.analytics),
            err(Part::Trackers, &self.trackers),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// How many parts were asked for.
    pub fn requested(&self) -> usize {
        [
            self.summary.is_some(),
            self.action_items.is_some(),
            self.questions.is_some(),
            self.topics.is_some(),
            self.analytics.is_some(),
            self.trackers.is_some(),
        ]
        .into_iter()
        .filter(|b| *b)
        .count()
    }
}

/// A client of the Conversation API; cheap to clone.
#[derive(Debug, Clone)]
pub struct ConversationClient {
    rest: Rest,
}

impl ConversationClient {
    /// A client for `config`'s API base, with tokens from `auth` (see [`SymblAuth::shared`]).
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(config: &SymblConfig, auth: Arc<SymblAuth>) -> Result<Self, ConversationError> {
        let rest = Rest::new(config, auth, Backoff::default(), false).map_err(|reason| {
            ConversationError::Unavailable {
                action: "building the Conversation API client".into(),
                reason,
            }
        })?;
        Ok(ConversationClient { rest })
    }

    /// The same client with other retry pacing.
    #[must_use]
    pub fn with_retry(mut self, retry: Backoff) -> Self {
        self.rest.retry = retry;
        self
    }

    async fn get(&self, id: &str, part: &str, what: &str) -> Result<Value, ConversationError> {
        let path = if part.is_empty() {
            format!("/v1/conversations/{}", encode_segment(id))
        } else {
            format!("/v1/conversations/{}/{part}", encode_segment(id))
        };
        let action = format!("reading {what} of conversation `{id}`");
        self.rest
            .call(reqwest::Method::GET, &path, None)
            .await
            .map_err(|e| match e {
                RestError::Status { status: 404, .. } => ConversationError::NotFound {
                    conversation_id: id.to_owned(),
                },
                RestError::Auth(e) => ConversationError::Auth(e),
                RestError::Unauthorized => ConversationError::Unauthorized {
                    action,
                    app_id_env: self.rest.app_id_env.clone(),
                },
                RestError::Status { status, message } => ConversationError::Rejected {
                    action,
                    status,
                    message,
                },
                RestError::Unavailable(reason) => ConversationError::Unavailable { action, reason },
            })
    }

    /// The conversation itself.
    ///
    /// # Errors
    /// See [`ConversationError`].
    pub async fn conversation(&self, id: &str) -> Result<Conversation, ConversationError> {
        let v = self.get(id, "", "the details").await?;
        Ok(Conversation {
            id: text(&v, "id").unwrap_or_else(|| id.to_owned()),
            kind: text(&v, "type"),
            name: text(&v, "name"),
            start_time: text(&v, "startTime"),
            end_time: text(&v, "endTime"),
            members: items(&v, "members").filter_map(person).collect(),
            metadata: v.get("metadata").cloned().unwrap_or(Value::Null),
        })
    }

    /// The summary sentences.
    ///
    /// # Errors
    /// See [`ConversationError`].
    pub async fn summary(&self, id: &str) -> Result<Vec<SummaryItem>, ConversationError> {
        let v = self.get(id, Part::Summary.path(), "the summary").await?;
        Ok(items(&v, "summary")
            .filter_map(|s| {
                Some(SummaryItem {
                    id: text(s, "id").unwrap_or_default(),
                    text: text(s, "text")?,
                    message_refs: items(s, "messageRefs")
                        .filter_map(|r| text(r, "id").or_else(|| id_string(r)))
                        .collect(),
                })
            })
            .collect())
    }

    /// The action items.
    ///
    /// # Errors
    /// See [`ConversationError`].
    pub async fn action_items(&self, id: &str) -> Result<Vec<ActionItem>, ConversationError> {
        let v = self
            .get(id, Part::ActionItems.path(), "the action items")
            .await?;
        Ok(items(&v, "actionItems")
            .filter_map(|a| {
                Some(ActionItem {
                    id: text(a, "id").unwrap_or_default(),
                    text: text(a, "text")?,
                    score: number(a, "score"),
                    message_ids: ids(a, "messageIds"),
                    from: a.get("from").and_then(person),
                    assignee: a.get("assignee").and_then(person),
                    definitive: a.get("definitive").and_then(Value::as_bool),
                    entities: items(a, "entities").cloned().collect(),
                })
            })
            .collect())
    }

    /// The questions asked.
    ///
    /// # Errors
    /// See [`ConversationError`].
    pub async fn questions(&self, id: &str) -> Result<Vec<Question>, ConversationError> {
        let v = self
            .get(id, Part::Questions.path(), "the questions")
            .await?;
        Ok(items(&v, "questions")
            .filter_map(|q| {
                Some(Question {
                    id: text(q, "id").unwrap_or_default(),
                    text: text(q, "text")?,
                    score: number(q, "score"),
                    message_ids: ids(q, "messageIds"),
                    from: q.get("from").and_then(person),
                })
            })
            .collect())
    }

    /// The topics discussed (with sentiment and parent topics when Symbl sends them).
    ///
    /// # Errors
    /// See [`ConversationError`].
    pub async fn topics(&self, id: &str) -> Result<Vec<Topic>, ConversationError> {
        let v = self.get(id, Part::Topics.path(), "the topics").await?;
        Ok(items(&v, "topics")
            .filter_map(|t| {
                Some(Topic {
                    id: text(t, "id").unwrap_or_default(),
                    text: text(t, "text")?,
                    score: number(t, "score"),
                    message_ids: ids(t, "messageIds"),
                    sentiment: t
                        .get("sentiment")
                        .and_then(|s| s.get("polarity"))
                        .and_then(|p| number(p, "score")),
                    parent_refs: items(t, "parentRefs")
                        .filter_map(|p| text(p, "text"))
                        .collect(),
                })
            })
            .collect())
    }

    /// Talk-time and pace analytics.
    ///
    /// # Errors
    /// See [`ConversationError`].
    pub async fn analytics(&self, id: &str) -> Result<Analytics, ConversationError> {
        let v = self
            .get(id, Part::Analytics.path(), "the analytics")
            .await?;
        let share = |m: &Value, k: &str| {
            m.get(k).filter(|s| s.is_object()).map(|s| TimeShare {
                percentage: number(s, "percentage"),
                seconds: number(s, "seconds"),
            })
        };
        Ok(Analytics {
            metrics: items(&v, "metrics")
                .filter_map(|m| {
                    Some(Metric {
                        kind: text(m, "type")?,
                        percent: number(m, "percent"),
                        seconds: number(m, "seconds"),
                    })
                })
                .collect(),
            members: items(&v, "members")
                .filter_map(|m| {
                    let overlap = m.get("overlap");
                    Some(MemberAnalytics {
                        member: person(m)?,
                        pace_wpm: m.get("pace").and_then(|p| number(p, "wpm")),
                        talk_time: share(m, "talkTime"),
                        listen_time: share(m, "listenTime"),
                        overlap_seconds: overlap.and_then(|o| number(o, "overlapDuration")),
                        overlapping_members: overlap
                            .map(|o| items(o, "overlappingMembers").filter_map(person).collect())
                            .unwrap_or_default(),
                    })
                })
                .collect(),
        })
    }

    /// The trackers detected (the endpoint answers a bare array).
    ///
    /// # Errors
    /// See [`ConversationError`].
    pub async fn trackers(&self, id: &str) -> Result<Vec<DetectedTracker>, ConversationError> {
        let v = self
            .get(id, Part::Trackers.path(), "the detected trackers")
            .await?;
        // A bare array per the docs; `{"trackers": [...]}` accepted too.
        let list: Box<dyn Iterator<Item = &Value>> = match &v {
            Value::Array(a) => Box::new(a.iter()),
            other => Box::new(items(other, "trackers")),
        };
        Ok(list
            .filter_map(|t| {
                Some(DetectedTracker {
                    id: text(t, "id").unwrap_or_default(),
                    name: text(t, "name")?,
                    matches: items(t, "matches")
                        .map(|m| TrackerMatch {
                            kind: text(m, "type").unwrap_or_default(),
                            value: text(m, "value").unwrap_or_default(),
                            messages: items(m, "messageRefs")
                                .filter_map(|r| text(r, "text"))
                                .collect(),
                        })
                        .collect(),
                })
            })
            .collect())
    }

    /// Reads `parts` of conversation `id` concurrently; each part keeps its own result.
    pub async fn fetch(&self, id: &str, parts: &[Part]) -> ConversationParts {
        let want = |p: Part| parts.contains(&p);
        async fn maybe<T, F: Future<Output = T>>(yes: bool, f: F) -> Option<T> {
            if yes { Some(f.await) } else { None }
        }
        let (summary, action_items, questions, topics, analytics, trackers) = tokio::join!(
            maybe(want(Part::Summary), self.summary(id)),
            maybe(want(Part::ActionItems), self.action_items(id)),
            maybe(want(Part::Questions), self.questions(id)),
            maybe(want(Part::Topics), self.topics(id)),
            maybe(want(Part::Analytics), self.analytics(id)),
            maybe(want(Part::Trackers), self.trackers(id)),
        );
        ConversationParts {
            summary,
            action_items,
            questions,
            topics,
            analytics,
            trackers,
        }
    }
}

/// The list at `v[key]` (nothing when absent or not a list).
fn items<'a>(v: &'a Value, key: &str) -> std::slice::Iter<'a, Value> {
    match v.get(key) {
        Some(Value::Array(a)) => a.iter(),
        _ => [].iter(),
    }
}

/// A non-empty string (or a number, as text) at `v[key]`.
fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(id_string)
}

/// A number, or a numeric string, at `v[key]`.
fn number(v: &Value, key: &str) -> Option<f64> {
    match v.get(key)? {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn ids(v: &Value, key: &str) -> Vec<String> {
    items(v, key).filter_map(id_string).collect()
}

/// A person; `None` unless it has at least a name, an id, an email or a user id.
fn person(v: &Value) -> Option<Person> {
    let p = Person {
        id: text(v, "id"),
        name: text(v, "name"),
        email: text(v, "email"),
        user_id: text(v, "userId"),
    };
    (p.id.is_some() || p.name.is_some() || p.email.is_some() || p.user_id.is_some()).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn helpers_read_loose_shapes() {
        let v = json!({"score": "0.5", "n": 3, "id": 77, "xs": "no", "p": {"name": "Ann"}});
        assert_eq!(number(&v, "score"), Some(0.5));
        assert_eq!(text(&v, "id").as_deref(), Some("77"));
        assert_eq!(items(&v, "xs").count(), 0);
        assert_eq!(person(&v["p"]).and_then(|p| p.name).as_deref(), Some("Ann"));
        assert!(person(&json!({})).is_none());
    }

    #[test]
    fn part_names_and_paths() {
        assert_eq!(Part::ActionItems.path(), "action-items");
        assert_eq!(Part::Trackers.path(), "trackers-detected");
        let p: Vec<Part> = serde_json::from_value(json!(["action_items", "summary"])).unwrap();
        assert_eq!(p, [Part::ActionItems, Part::Summary]);
    }
}
