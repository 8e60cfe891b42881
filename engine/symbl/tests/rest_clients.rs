//! The Management (trackers) and Conversation API clients, over real HTTP against the fake
//! Symbl of `prompter-fakes` (on 127.0.0.1, no internet).

#![allow(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use std::sync::Arc;

use prompter_core::backoff::Backoff;
use prompter_fakes::SymblFake;
use prompter_fakes::symbl_conversations::sample_conversation;
use prompter_symbl::auth::{Credentials, SymblAuth};
use prompter_symbl::config::{SymblConfig, TrackerSpec};
use prompter_symbl::conversation_api::{ConversationClient, ConversationError, Part};
use prompter_symbl::management::{ManagementError, SyncOutcome, TrackersClient, Upsert};

const SECRET: &str = "app-secret-value";

/// Short waits, so retried tests stay quick (a server's `Retry-After` is still honoured up to
/// `max_ms`).
const FAST: Backoff = Backoff {
    base_ms: 5,
    max_ms: 2_000,
    max_retries: 4,
};

async fn setup() -> (SymblFake, SymblConfig, Arc<SymblAuth>) {
    let fake = SymblFake::start("app-id", SECRET).await;
    let config = SymblConfig {
        api_base: fake.api_base.clone(),
        ..SymblConfig::default()
    };
    let creds = Credentials::from_lookup(&config, |v| match v {
        "SYMBL_APP_ID" => Some("app-id".into()),
        "SYMBL_APP_SECRET" => Some(SECRET.into()),
        _ => None,
    })
    .unwrap();
    let auth = Arc::new(SymblAuth::new(&config, creds).unwrap());
    (fake, config, auth)
}

async fn trackers_client() -> (SymblFake, TrackersClient) {
    let (fake, config, auth) = setup().await;
    let client = TrackersClient::new(&config, auth).unwrap().with_retry(FAST);
    (fake, client)
}

fn spec(name: &str, vocabulary: &[&str]) -> TrackerSpec {
    TrackerSpec {
        name: name.into(),
        vocabulary: vocabulary.iter().map(|s| (*s).to_owned()).collect(),
    }
}

#[tokio::test]
async fn create_sends_the_documented_shape() {
    let (fake, client) = trackers_client().await;
    let made = client
        .create(&spec(
            "Budget Constraints",
            &["too expensive", " no budget "],
        ))
        .await
        .unwrap();
    let Upsert::Created(t) = made else {
        panic!("{made:?}")
    };
    assert_eq!(t.name, "Budget Constraints");
    assert_eq!(t.vocabulary, ["too expensive", "no budget"]);
    let stored = fake.trackers();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, t.id);
    assert_eq!(stored[0].vocabulary, ["too expensive", "no budget"]);
    assert_eq!(fake.manage_log(), ["POST /v1/manage/tracker"]);
}

#[tokio::test]
async fn a_409_on_create_updates_the_existing_tracker() {
    let (fake, client) = trackers_client().await;
    let id = fake.add_tracker("Timing", &["next quarter"]);
    let made = client
        .create(&spec("Timing", &["next quarter", "not this year"]))
        .await
        .unwrap();
    let Upsert::Updated { tracker, previous } = made else {
        panic!("{made:?}")
    };
    assert_eq!(tracker.id, id);
    assert_eq!(previous, ["next quarter"]);
    assert_eq!(
        fake.trackers()[0].vocabulary,
        ["next quarter", "not this year"]
    );
    assert_eq!(
        fake.manage_log(),
        [
            "POST /v1/manage/tracker".to_owned(),
            "GET /v1/manage/trackers".to_owned(),
            format!("PUT /v1/manage/tracker/{id}"),
        ]
    );
}

#[tokio::test]
async fn sync_creates_updates_and_leaves_equal_trackers_alone() {
    let (fake, client) = trackers_client().await;
    let same = fake.add_tracker("Same", &["a", "b"]);
    let diff = fake.add_tracker("Diff", &["old", "kept"]);
    let specs = [
        spec("Same", &["b", "a"]),
        spec("Diff", &["kept", "new"]),
        spec("Bad", &["a-b"]),
        spec("New", &["fresh phrase"]),
    ];

    let plan = client.sync_dry_run(&specs).await.unwrap();
    assert!(plan.dry_run);
    assert_eq!(fake.manage_log(), ["GET /v1/manage/trackers"]);
    assert_eq!(plan.entries[3].outcome, SyncOutcome::Created { id: None });

    let report = client.sync(&specs).await.unwrap();
    let outcomes: Vec<&SyncOutcome> = report.entries.iter().map(|e| &e.outcome).collect();
    assert_eq!(outcomes[0], &SyncOutcome::Unchanged { id: same });
    assert_eq!(
        outcomes[1],
        &SyncOutcome::Updated {
            id: diff.clone(),
            added: vec!["new".into()],
            removed: vec!["old".into()],
        }
    );
    let SyncOutcome::Failed { error } = outcomes[2] else {
        panic!("{:?}", outcomes[2])
    };
    assert!(
        error
            .to_string()
            .starts_with("tracker `Bad`: phrase `a-b` contains `-`")
    );
    assert!(matches!(outcomes[3], SyncOutcome::Created { id: Some(_) }));
    assert!(!report.all_ok());
    // The invalid tracker was never sent; the equal one was not touched.
    assert_eq!(
        fake.manage_log()[1..],
        [
            "GET /v1/manage/trackers".to_owned(),
            format!("PUT /v1/manage/tracker/{diff}"),
            "POST /v1/manage/tracker".to_owned(),
        ]
    );
    let names: Vec<String> = fake.trackers().into_iter().map(|t| t.name).collect();
    assert_eq!(names, ["Same", "Diff", "New"]);

    // Run again: everything valid is now unchanged.
    let again = client.sync(&specs[..2]).await.unwrap();
    assert!(again.all_ok());
    assert!(
        again
            .entries
            .iter()
            .all(|e| matches!(e.outcome, SyncOutcome::Unchanged { .. }))
    );
}

#[tokio::test]
async fn a_429_is_waited_out_honouring_retry_after() {
    let (fake, client) = trackers_client().await;
    fake.fail_manage_next(&[429]);
    assert!(client.list().await.unwrap().is_empty());
    assert_eq!(fake.manage_requests(), 2);
}

#[tokio::test]
async fn a_5xx_is_retried() {
    let (fake, client) = trackers_client().await;
    fake.add_tracker("A", &["x"]);
    fake.fail_manage_next(&[503, 502]);
    assert_eq!(client.list().await.unwrap()[0].name, "A");
    assert_eq!(fake.manage_requests(), 3);
}

#[tokio::test]
async fn one_request_at_a_time_even_when_called_concurrently() {
    let (fake, client) = trackers_client().await;
    let (c2, c3, c4) = (client.clone(), client.clone(), client.clone());
    let (one, two, three) = (
        spec("One", &["one"]),
        spec("Two", &["two"]),
        spec("Three", &["three"]),
    );
    let (a, b, c, d, e) = tokio::join!(
        client.create(&one),
        c2.create(&two),
        c3.list(),
        c4.create(&three),
        client.list(),
    );
    assert!(a.is_ok() && b.is_ok() && c.is_ok() && d.is_ok() && e.is_ok());
    assert_eq!(fake.manage_requests(), 5);
    assert_eq!(fake.manage_overlaps(), 0);
    assert_eq!(fake.trackers().len(), 3);
}

#[tokio::test]
async fn separate_clients_colliding_are_answered_429_and_retry() {
    // Two clients do not share a gate (two processes, say): the fake refuses the overlapping
    // request with 429 + Retry-After, and that client waits and succeeds.
    let (fake, config, auth) = setup().await;
    let a = TrackersClient::new(&config, auth.clone())
        .unwrap()
        .with_retry(FAST);
    let b = TrackersClient::new(&config, auth).unwrap().with_retry(FAST);
    let (left, right) = (spec("Left", &["left"]), spec("Right", &["right"]));
    let (x, y) = tokio::join!(a.create(&left), b.create(&right));
    assert!(x.is_ok() && y.is_ok(), "{x:?} {y:?}");
    assert_eq!(fake.trackers().len(), 2);
}

#[tokio::test]
async fn invalid_vocabulary_is_refused_before_sending() {
    let (fake, client) = trackers_client().await;
    let err = client
        .create(&spec("Pricing", &["price?", "cost", "Cost"]))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tracker `Pricing`: phrase `price?` contains `?`: Symbl allows only `.` and `'` as punctuation; phrase `Cost` appears more than once"
    );
    assert_eq!(fake.manage_requests(), 0);
}

#[tokio::test]
async fn a_400_names_the_tracker() {
    let (fake, client) = trackers_client().await;
    fake.fail_manage_next(&[400]);
    let err = client
        .create(&spec("Pricing", &["cost"]))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert_eq!(
        err.to_string(),
        "creating tracker `Pricing`: Symbl answered 400: scripted failure"
    );
}

#[tokio::test]
async fn a_401_gets_one_fresh_token_then_a_clear_error_naming_nothing_secret() {
    let (fake, client) = trackers_client().await;
    fake.fail_manage_next(&[401]);
    assert!(client.list().await.is_ok());
    assert_eq!(fake.token_calls(), 2);

    fake.fail_manage_next(&[401, 401]);
    let err = client.list().await.unwrap_err();
    assert!(matches!(err, ManagementError::Unauthorized { .. }));
    let msg = err.to_string();
    assert_eq!(
        msg,
        "listing trackers: Symbl rejected the access token even after fetching a new one (401); check that the app in `SYMBL_APP_ID` may use the Management API"
    );
    assert!(!msg.contains(SECRET) && !msg.contains("fake-jwt") && !msg.contains("app-id"));
    assert!(!format!("{client:?} {err:?}").contains(SECRET));
}

#[tokio::test]
async fn the_docs_single_object_list_is_accepted() {
    let (fake, client) = trackers_client().await;
    fake.add_tracker("Promotion Mention", &["We have a sale right now on"]);
    fake.set_trackers_list_single_object(true);
    let list = client.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].vocabulary, ["We have a sale right now on"]);
}

async fn conversation_client() -> (SymblFake, ConversationClient) {
    let (fake, config, auth) = setup().await;
    let client = ConversationClient::new(&config, auth)
        .unwrap()
        .with_retry(FAST);
    (fake, client)
}

#[tokio::test]
async fn reads_a_conversation_and_all_its_parts() {
    let (fake, client) = conversation_client().await;
    fake.add_conversation("6150000000000001", sample_conversation("6150000000000001"));
    let c = client.conversation("6150000000000001").await.unwrap();
    assert_eq!(c.kind.as_deref(), Some("meeting"));
    assert_eq!(c.members[1].name.as_deref(), Some("Sam Buyer"));

    let all = [
        Part::Summary,
        Part::ActionItems,
        Part::Questions,
        Part::Topics,
        Part::Analytics,
        Part::Trackers,
    ];
    let parts = client.fetch("6150000000000001", &all).await;
    assert!(parts.errors().is_empty());
    let summary = parts.summary.unwrap().unwrap();
    assert_eq!(summary[0].message_refs, ["msg-3", "msg-4"]);
    let items = parts.action_items.unwrap().unwrap();
    assert_eq!(
        items[0].assignee.as_ref().unwrap().email.as_deref(),
        Some("dana@example.com")
    );
    assert_eq!(items[0].definitive, Some(true));
    let questions = parts.questions.unwrap().unwrap();
    assert_eq!(questions[1].text, "Is there a free trial?");
    let topics = parts.topics.unwrap().unwrap();
    assert_eq!(topics[0].sentiment, Some(-0.2));
    assert_eq!(topics[0].parent_refs, ["commercials"]);
    let analytics = parts.analytics.unwrap().unwrap();
    assert_eq!(analytics.metrics.len(), 3);
    assert_eq!(analytics.members[0].overlap_seconds, Some(12.4));
    assert_eq!(
        analytics.members[0].talk_time.as_ref().unwrap().seconds,
        Some(531.6)
    );
    let trackers = parts.trackers.unwrap().unwrap();
    assert_eq!(trackers[0].matches[0].value, "no budget");
    assert_eq!(
        trackers[0].matches[0].messages,
        ["We have no budget left this quarter."]
    );
}

#[tokio::test]
async fn an_unknown_conversation_is_not_found_in_every_part() {
    let (_fake, client) = conversation_client().await;
    let parts = client.fetch("nope", &Part::DEFAULT).await;
    let errors = parts.errors();
    assert_eq!(errors.len(), 5);
    for (_, e) in errors {
        assert_eq!(e.to_string(), "conversation `nope` not found");
    }
}

#[tokio::test]
async fn one_part_failing_keeps_the_others() {
    let (fake, client) = conversation_client().await;
    fake.add_conversation("c-9", sample_conversation("c-9"));
    // Five 500s outlast the four retries; a 429 on questions is waited out.
    fake.fail_conversation_next("topics", &[500, 500, 500, 500, 500]);
    fake.fail_conversation_next("questions", &[429]);
    let parts = client.fetch("c-9", &Part::DEFAULT).await;
    let errors = parts.errors();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].0, Part::Topics);
    assert!(matches!(errors[0].1, ConversationError::Unavailable { .. }));
    assert_eq!(
        errors[0].1.to_string(),
        "reading the topics of conversation `c-9`: Symbl answered 500 (after 5 attempts)"
    );
    assert_eq!(parts.questions.unwrap().unwrap().len(), 2);
    assert_eq!(parts.summary.unwrap().unwrap().len(), 2);
}

#[tokio::test]
async fn missing_fields_and_odd_types_do_not_fail_a_part() {
    let (fake, client) = conversation_client().await;
    fake.add_conversation(
        "odd",
        serde_json::json!({
            "questions": [{"id": 5, "text": "Why?", "score": "0.7"}, {"id": "no-text"}, 42],
            "topics": "not a list"
        }),
    );
    let q = client.questions("odd").await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!((q[0].id.as_str(), q[0].score), ("5", Some(0.7)));
    assert!(client.topics("odd").await.unwrap().is_empty());
    assert!(client.summary("odd").await.unwrap().is_empty());
}
