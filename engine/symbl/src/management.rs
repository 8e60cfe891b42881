//! Trackers through Symbl's Management API: list them, create or update one, and bring the
//! account in line with the `symbl.trackers` of the engine config ([`TrackersClient::sync`]).
//!
//! Wire format (reference §4.1): `GET /v1/manage/trackers` → `{"trackers": [...]}` (the docs'
//! example shows a single `tracker` object, so both are accepted), `POST /v1/manage/tracker`
//! with `{"name", "vocabulary"}` → `{"tracker": {"id", "name", "vocabulary"}}`,
//! `PUT /v1/manage/tracker/{id}`; all with `Authorization: Bearer <token>`.
//!
//! The API allows **one request at a time** per account and answers 429 to the next one, so a
//! client (and its clones) never has two requests out: each call holds a gate for its whole
//! life, retries and waits included. A 429 or a 5xx is retried with backoff that honours
//! `Retry-After`; a 401 gets one fresh token, then a clear error. Vocabulary is checked
//! locally before anything is sent (only `.` and `'` as punctuation, no duplicate phrases), so
//! a typo is an error naming the tracker and the phrase rather than a bare 400.
//!
//! The HTTP plumbing (token, retries, the one-at-a-time gate) is the crate-private `rest`
//! module, shared with the Conversation API client ([`crate::conversation_api`]). This module
//! does not own where the tracker list comes from (the engine config) or how the result is
//! shown (`prompter trackers sync`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use prompter_core::backoff::Backoff;
use serde_json::{Value, json};

use crate::auth::{AuthError, SymblAuth};
use crate::config::{SymblConfig, TrackerSpec};
use crate::rest::{Rest, RestError};

/// Symbl refuses bodies above 1 MB with a 413; checked before sending.
const MAX_BODY_BYTES: usize = 1_000_000;

/// How the Management client retries by default: one request at a time makes 429s likely when
/// another tool of the same account is busy, so it waits longer and more often than the
/// defaults.
pub const DEFAULT_RETRY: Backoff = Backoff {
    base_ms: 250,
    max_ms: 10_000,
    max_retries: 5,
};

/// A tracker as Symbl stores it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tracker {
    /// Symbl's id (a numeric string).
    pub id: String,
    /// The name (case-sensitive, unique per account).
    pub name: String,
    /// The phrases that trigger it.
    pub vocabulary: Vec<String>,
}

/// Why a Management API call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[must_use]
pub enum ManagementError {
    /// The tracker was refused locally, before anything was sent.
    #[error("tracker `{tracker}`: {problem}")]
    Invalid {
        /// The tracker's name.
        tracker: String,
        /// Every problem found, `; `-separated.
        problem: String,
    },
    /// No access token could be had.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Symbl answered 401 to a freshly fetched token too.
    #[error(
        "{action}: Symbl rejected the access token even after fetching a new one (401); check that the app in `{app_id_env}` may use the Management API"
    )]
    Unauthorized {
        /// What was being done (`listing trackers`).
        action: String,
        /// The variable holding the app id.
        app_id_env: String,
    },
    /// Symbl refused the request (400, 404, 409, 413, ...).
    #[error("{action}: Symbl answered {status}: {message}")]
    Rejected {
        /// What was being done (`creating tracker `Budget``).
        action: String,
        /// The HTTP status.
        status: u16,
        /// Symbl's explanation, or what the status means.
        message: String,
    },
    /// Network failures, 429s or 5xx answers outlasted the retries, or the answer made no sense.
    #[error("{action}: {reason}")]
    Unavailable {
        /// What was being done.
        action: String,
        /// What went wrong.
        reason: String,
    },
}

impl ManagementError {
    fn from_rest(action: String, e: RestError, app_id_env: &str) -> Self {
        match e {
            RestError::Auth(e) => ManagementError::Auth(e),
            RestError::Unauthorized => ManagementError::Unauthorized {
                action,
                app_id_env: app_id_env.to_owned(),
            },
            RestError::Status { status, message } => ManagementError::Rejected {
                action,
                status,
                message,
            },
            RestError::Unavailable(reason) => ManagementError::Unavailable { action, reason },
        }
    }

    /// The HTTP status Symbl answered, for [`ManagementError::Rejected`].
    pub fn status(&self) -> Option<u16> {
        match self {
            ManagementError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What [`TrackersClient::create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upsert {
    /// A new tracker.
    Created(Tracker),
    /// The name existed (409): that tracker got the new vocabulary.
    Updated {
        /// The tracker as it is now.
        tracker: Tracker,
        /// Its vocabulary before.
        previous: Vec<String>,
    },
    /// The name existed with this very vocabulary; nothing was sent.
    Unchanged(Tracker),
}

/// A client of the Management API's trackers; clones share the token and the one-request gate.
#[derive(Debug, Clone)]
pub struct TrackersClient {
    rest: Rest,
}

impl TrackersClient {
    /// A client for `config`'s API base, with tokens from `auth` (see [`SymblAuth::shared`]).
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(config: &SymblConfig, auth: Arc<SymblAuth>) -> Result<Self, ManagementError> {
        let rest = Rest::new(config, auth, DEFAULT_RETRY, true).map_err(|reason| {
            ManagementError::Unavailable {
                action: "building the Management API client".into(),
                reason,
            }
        })?;
        Ok(TrackersClient { rest })
    }

    /// The same client with other retry pacing.
    #[must_use]
    pub fn with_retry(mut self, retry: Backoff) -> Self {
        self.rest.retry = retry;
        self
    }

    /// Every tracker of the account (`GET /v1/manage/trackers`).
    ///
    /// # Errors
    /// See [`ManagementError`].
    pub async fn list(&self) -> Result<Vec<Tracker>, ManagementError> {
        let action = "listing trackers";
        let v = self
            .rest
            .call(reqwest::Method::GET, "/v1/manage/trackers", None)
            .await
            .map_err(|e| self.error(action.into(), e))?;
        parse_trackers(&v).map_err(|reason| ManagementError::Unavailable {
            action: action.into(),
            reason,
        })
    }

    /// The tracker named exactly `name`, if any.
    ///
    /// # Errors
    /// See [`ManagementError`].
    pub async fn find(&self, name: &str) -> Result<Option<Tracker>, ManagementError> {
        // The whole list rather than `?name=`: at most 500 trackers, and an exact,
        // case-sensitive match does not depend on how the server filters.
        Ok(self.list().await?.into_iter().find(|t| t.name == name))
    }

    /// Creates a tracker (`POST /v1/manage/tracker`). When the name exists already (409), the
    /// existing tracker gets `spec`'s vocabulary instead (or is left alone when it has it).
    ///
    /// # Errors
    /// [`ManagementError::Invalid`] before sending when `spec` breaks Symbl's rules; otherwise
    /// see [`ManagementError`].
    pub async fn create(&self, spec: &TrackerSpec) -> Result<Upsert, ManagementError> {
        let body = checked_body(spec)?;
        let action = format!("creating tracker `{}`", spec.name);
        match self
            .rest
            .call(reqwest::Method::POST, "/v1/manage/tracker", Some(&body))
            .await
        {
            Ok(v) => Ok(Upsert::Created(answered_tracker(&v, None, spec))),
            Err(RestError::Status { status: 409, .. }) => {
                let existing =
                    self.find(&spec.name)
                        .await?
                        .ok_or_else(|| {
                            ManagementError::Unavailable {
                        action: action.clone(),
                        reason:
                            "Symbl answered 409 (the name exists) but lists no tracker of that name"
                                .into(),
                    }
                        })?;
                if same_vocabulary(&existing.vocabulary, &spec.vocabulary) {
                    return Ok(Upsert::Unchanged(existing));
                }
                let tracker = self.update(&existing.id, spec).await?;
                Ok(Upsert::Updated {
                    tracker,
                    previous: existing.vocabulary,
                })
            }
            Err(e) => Err(self.error(action, e)),
        }
    }

    /// Replaces tracker `id`'s name and vocabulary with `spec`'s
    /// (`PUT /v1/manage/tracker/{id}`).
    ///
    /// # Errors
    /// [`ManagementError::Invalid`] before sending when `spec` breaks Symbl's rules; otherwise
    /// see [`ManagementError`].
    pub async fn update(&self, id: &str, spec: &TrackerSpec) -> Result<Tracker, ManagementError> {
        let body = checked_body(spec)?;
        let path = format!("/v1/manage/tracker/{}", encode_segment(id));
        let v = self
            .rest
            .call(reqwest::Method::PUT, &path, Some(&body))
            .await
            .map_err(|e| self.error(format!("updating tracker `{}`", spec.name), e))?;
        Ok(answered_tracker(&v, Some(id), spec))
    }

    /// Brings the account in line with `specs`: creates the missing trackers, updates those
    /// whose vocabulary differs (compared as sets), leaves equal ones alone. One tracker failing
    /// does not stop the others; the report says what happened to each, in `specs` order.
    ///
    /// # Errors
    /// Only when the existing trackers cannot be listed (then nothing was changed).
    pub async fn sync(&self, specs: &[TrackerSpec]) -> Result<SyncReport, ManagementError> {
        self.run_sync(specs, false).await
    }

    /// What [`TrackersClient::sync`] would do, changing nothing (only the list is read).
    ///
    /// # Errors
    /// When the existing trackers cannot be listed.
    pub async fn sync_dry_run(&self, specs: &[TrackerSpec]) -> Result<SyncReport, ManagementError> {
        self.run_sync(specs, true).await
    }

    async fn run_sync(
        &self,
        specs: &[TrackerSpec],
        dry_run: bool,
    ) -> Result<SyncReport, ManagementError> {
        let existing = self.list().await?;
        let by_name: HashMap<&str, &Tracker> =
            existing.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut declared = HashSet::new();
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            let outcome = if !declared.insert(spec.name.as_str()) {
                SyncOutcome::Failed {
                    error: ManagementError::Invalid {
                        tracker: spec.name.clone(),
                        problem: "declared more than once in `symbl.trackers`".into(),
                    },
                }
            } else if let Err(error) = validate(spec) {
                SyncOutcome::Failed { error }
            } else {
                self.sync_one(spec, by_name.get(spec.name.as_str()).copied(), dry_run)
                    .await
            };
            if let SyncOutcome::Failed { error } = &outcome {
                tracing::warn!(tracker = %spec.name, error = %error, "Tracker sync failed.");
            }
            entries.push(SyncEntry {
                name: spec.name.clone(),
                outcome,
            });
        }
        Ok(SyncReport { dry_run, entries })
    }

    async fn sync_one(
        &self,
        spec: &TrackerSpec,
        existing: Option<&Tracker>,
        dry_run: bool,
    ) -> SyncOutcome {
        match existing {
            Some(t) if same_vocabulary(&t.vocabulary, &spec.vocabulary) => {
                SyncOutcome::Unchanged { id: t.id.clone() }
            }
            Some(t) => {
                let (added, removed) = vocabulary_diff(&t.vocabulary, &spec.vocabulary);
                if dry_run {
                    return SyncOutcome::Updated {
                        id: t.id.clone(),
                        added,
                        removed,
                    };
                }
                match self.update(&t.id, spec).await {
                    Ok(_) => SyncOutcome::Updated {
                        id: t.id.clone(),
                        added,
                        removed,
                    },
                    Err(error) => SyncOutcome::Failed { error },
                }
            }
            None if dry_run => SyncOutcome::Created { id: None },
            None => match self.create(spec).await {
                Ok(Upsert::Created(t)) => SyncOutcome::Created { id: Some(t.id) },
                Ok(Upsert::Updated { tracker, previous }) => {
                    let (added, removed) = vocabulary_diff(&previous, &tracker.vocabulary);
                    SyncOutcome::Updated {
                        id: tracker.id,
                        added,
                        removed,
                    }
                }
                Ok(Upsert::Unchanged(t)) => SyncOutcome::Unchanged { id: t.id },
                Err(error) => SyncOutcome::Failed { error },
            },
        }
    }

    fn error(&self, action: String, e: RestError) -> ManagementError {
        ManagementError::from_rest(action, e, &self.rest.app_id_env)
    }
}

/// What [`TrackersClient::sync`] did (or, in a dry run, would do).
#[derive(Debug, Clone, PartialEq)]
pub struct SyncReport {
    /// True when nothing was changed.
    pub dry_run: bool,
    /// One entry per declared tracker, in declaration order.
    pub entries: Vec<SyncEntry>,
}

impl SyncReport {
    /// True when no tracker failed.
    pub fn all_ok(&self) -> bool {
        !self
            .entries
            .iter()
            .any(|e| matches!(e.outcome, SyncOutcome::Failed { .. }))
    }
}

/// What happened to one declared tracker.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncEntry {
    /// The tracker's name.
    pub name: String,
    /// The outcome.
    pub outcome: SyncOutcome,
}

/// The outcome for one tracker.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncOutcome {
    /// Created (in a dry run: would be; no id then).
    Created {
        /// Symbl's id of the new tracker.
        id: Option<String>,
    },
    /// Its vocabulary was replaced (in a dry run: would be).
    Updated {
        /// Symbl's id.
        id: String,
        /// Phrases that were not there before, sorted.
        added: Vec<String>,
        /// Phrases that are gone, sorted.
        removed: Vec<String>,
    },
    /// Symbl has it with this very vocabulary.
    Unchanged {
        /// Symbl's id.
        id: String,
    },
    /// It could not be synced.
    Failed {
        /// Why.
        error: ManagementError,
    },
}

/// Checks `spec` against Symbl's rules: a non-empty name, at least one phrase, phrases made
/// of letters, digits, spaces and only `.` and `'` as punctuation, no phrase twice (ignoring
/// case and surrounding spaces), and a request body under 1 MB.
///
/// # Errors
/// [`ManagementError::Invalid`] naming the tracker and listing every problem.
pub fn validate(spec: &TrackerSpec) -> Result<(), ManagementError> {
    let mut problems = Vec::new();
    if spec.name.trim().is_empty() {
        problems.push("the name is empty".to_owned());
    }
    if spec.vocabulary.is_empty() {
        problems.push("the vocabulary is empty (give at least one phrase)".to_owned());
    }
    let mut seen = HashSet::new();
    for (i, phrase) in spec.vocabulary.iter().enumerate() {
        let trimmed = phrase.trim();
        if trimmed.is_empty() {
            problems.push(format!("phrase {} is empty", i + 1));
            continue;
        }
        let bad: BTreeSet<char> = trimmed.chars().filter(|c| !allowed_char(*c)).collect();
        if !bad.is_empty() {
            let list: Vec<String> = bad.iter().map(|c| format!("`{c}`")).collect();
            let hint = if bad.contains(&'\u{2019}') {
                " (use a straight `'` for `’`)"
            } else {
                ""
            };
            problems.push(format!(
                "phrase `{trimmed}` contains {}: Symbl allows only `.` and `'` as punctuation{hint}",
                list.join(", ")
            ));
        }
        if !seen.insert(trimmed.to_lowercase()) {
            problems.push(format!("phrase `{trimmed}` appears more than once"));
        }
    }
    if problems.is_empty() && body(spec).to_string().len() > MAX_BODY_BYTES {
        problems.push("the request would exceed Symbl's 1 MB limit".to_owned());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ManagementError::Invalid {
            tracker: spec.name.clone(),
            problem: problems.join("; "),
        })
    }
}

fn allowed_char(c: char) -> bool {
    c.is_alphanumeric() || c.is_whitespace() || c == '.' || c == '\''
}

/// The request body for `spec` (phrases trimmed, as they are compared).
fn body(spec: &TrackerSpec) -> Value {
    let vocabulary: Vec<&str> = spec.vocabulary.iter().map(|p| p.trim()).collect();
    json!({ "name": spec.name, "vocabulary": vocabulary })
}

fn checked_body(spec: &TrackerSpec) -> Result<Value, ManagementError> {
    validate(spec)?;
    Ok(body(spec))
}

fn phrase_set(vocabulary: &[String]) -> BTreeSet<&str> {
    vocabulary.iter().map(|p| p.trim()).collect()
}

/// Whether two vocabularies hold the same phrases (order and surrounding spaces ignored).
pub fn same_vocabulary(a: &[String], b: &[String]) -> bool {
    phrase_set(a) == phrase_set(b)
}

/// Phrases of `new` missing from `old`, and of `old` missing from `new`, each sorted.
fn vocabulary_diff(old: &[String], new: &[String]) -> (Vec<String>, Vec<String>) {
    let (old, new) = (phrase_set(old), phrase_set(new));
    (
        new.difference(&old).map(|s| (*s).to_owned()).collect(),
        old.difference(&new).map(|s| (*s).to_owned()).collect(),
    )
}

/// Trackers from a list answer: `{"trackers": [...]}` (trusted), a single `{"tracker": {...}}`
/// (the docs' example), or a bare array. Entries without an id or a name are skipped.
fn parse_trackers(v: &Value) -> Result<Vec<Tracker>, String> {
    let items: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        Value::Null => Vec::new(),
        Value::Object(o) => match (o.get("trackers"), o.get("tracker")) {
            (Some(Value::Array(a)), _) | (None, Some(Value::Array(a))) => a.iter().collect(),
            (None, Some(t @ Value::Object(_))) => vec![t],
            (None, None) => Vec::new(),
            _ => return Err("the answer's `trackers` is not a list".into()),
        },
        _ => return Err("the answer is not a tracker list".into()),
    };
    let total = items.len();
    let trackers: Vec<Tracker> = items.into_iter().filter_map(tracker_from).collect();
    if trackers.len() < total {
        tracing::debug!(
            skipped = total - trackers.len(),
            "Skipped tracker entries without an id or a name."
        );
    }
    Ok(trackers)
}

fn tracker_from(v: &Value) -> Option<Tracker> {
    Some(Tracker {
        id: id_string(v.get("id")?)?,
        name: v.get("name")?.as_str()?.to_owned(),
        vocabulary: v
            .get("vocabulary")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The tracker in a create/update answer (`{"tracker": {...}}`, or the object itself); when
/// the answer carries none, what was sent (with `id` when known).
fn answered_tracker(v: &Value, id: Option<&str>, spec: &TrackerSpec) -> Tracker {
    let inner = v.get("tracker").unwrap_or(v);
    tracker_from(inner).unwrap_or_else(|| Tracker {
        id: id
            .map(str::to_owned)
            .or_else(|| inner.get("id").and_then(id_string))
            .unwrap_or_default(),
        name: spec.name.clone(),
        vocabulary: spec
            .vocabulary
            .iter()
            .map(|p| p.trim().to_owned())
            .collect(),
    })
}

/// An id sent as a string or a number.
pub(crate) fn id_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Percent-encodes a URL path segment (ids are numeric, but a stray `/` must not change the
/// path).
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, vocabulary: &[&str]) -> TrackerSpec {
        TrackerSpec {
            name: name.into(),
            vocabulary: vocabulary.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn vocabulary_rules_name_the_tracker_and_the_phrase() {
        assert!(
            validate(&spec(
                "Budget",
                &["too expensive", "can't afford it.", "Q3 2025"]
            ))
            .is_ok()
        );
        let err = validate(&spec(
            "Budget",
            &["too-expensive", "no budget", "No Budget "],
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracker `Budget`: phrase `too-expensive` contains `-`: Symbl allows only `.` and `'` as punctuation; phrase `No Budget` appears more than once"
        );
        let err = validate(&spec(" ", &[])).unwrap_err().to_string();
        assert!(
            err.contains("the name is empty") && err.contains("vocabulary is empty"),
            "{err}"
        );
        let err = validate(&spec("T", &["can’t"])).unwrap_err().to_string();
        assert!(err.contains("straight `'`"), "{err}");
    }

    #[test]
    fn lists_are_parsed_defensively() {
        let list = json!({"trackers": [
            {"id": "1", "name": "A", "vocabulary": ["x"]},
            {"id": 2, "name": "B"},
            {"name": "no id"}
        ]});
        let t = parse_trackers(&list).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!((t[1].id.as_str(), t[1].vocabulary.len()), ("2", 0));
        let single = json!({"tracker": {"id": "9", "name": "C", "vocabulary": ["y"]}});
        assert_eq!(parse_trackers(&single).unwrap()[0].name, "C");
        assert_eq!(
            parse_trackers(&json!([{"id": "3", "name": "D"}]))
                .unwrap()
                .len(),
            1
        );
        assert!(parse_trackers(&json!({})).unwrap().is_empty());
        assert!(parse_trackers(&json!("nope")).is_err());
    }

    #[test]
    fn vocabularies_compare_as_sets() {
        let a = vec!["x".to_owned(), "y".to_owned()];
        let b = vec!["y ".to_owned(), "x".to_owned()];
        assert!(same_vocabulary(&a, &b));
        let c = vec!["x".to_owned(), "z".to_owned()];
        assert_eq!(
            vocabulary_diff(&a, &c),
            (vec!["z".to_owned()], vec!["y".to_owned()])
        );
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(encode_segment("4476908732794496"), "4476908732794496");
        assert_eq!(encode_segment("a/b c"), "a%2Fb%20c");
    }
}
