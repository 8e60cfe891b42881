#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! `prompter run` as an operator runs it: the real binary, the shipped `prompter-live.yaml`,
//! keys in the environment, against local fakes of Symbl and Nebula that speak their wire
//! formats over real HTTP and WebSockets. Stopped with SIGINT, as Ctrl-C does.

mod support;

use std::time::{Duration, Instant};

use prompter_fakes::nebula::{DEFAULT_ANSWER, Endpoint};
use prompter_fakes::symbl_conversations::sample_conversation;
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_calls_stream_suggestions_survive_a_dropped_socket_and_embed_each_tracker_once() {
    let f = fakes().await;
    let ingested = f.ingest();
    assert!(ingested.contains("17 row(s), 17 embedded"), "{ingested}");
    assert_eq!(f.nebula.embed_attempts(), 17);
    f.nebula.set_chat_delay(Duration::from_millis(300));

    let updates = format!("{}/symbl/updates", f.symbl.ws_base());
    let engine = f.run(
        &["--listen", "127.0.0.1:0"],
        &[("SYMBL_UPDATES_URL", &updates)],
    );
    let control = engine.said("control endpoint listening on http://").await;
    let control = control.rsplit("http://").next().unwrap().trim().to_owned();
    // The integration server announces a call; the engine subscribes to it.
    let deadline = Instant::now() + WAIT;
    while f.symbl.update_subscribers() == 0 {
        assert!(Instant::now() < deadline, "{}", engine.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f.symbl
        .start_connection("conn-1", "5093011103940608", "Agent");
    assert!(
        f.symbl.wait_subscribed("conn-1", 1, WAIT).await,
        "{}",
        engine.stderr()
    );

    let c = "conn-1";
    f.symbl.push(
        c,
        json!({"type": "message", "message": {"type": "started_listening"}}),
    );
    f.symbl.push(
        c,
        said("Customer", "Honestly it is too expensive for us.", 1),
    );
    f.symbl.push(c, question("Is there a cheaper plan?", 2));
    f.symbl
        .push(c, tracker("Budget Constraints", "too expensive", 3));

    // The first words arrive as a draft before Nebula has finished the answer.
    let (draft_at, draft) = engine
        .output("draft", |v| is(v, c, "rta_live") && v["status"] == "draft")
        .await;
    assert_eq!(draft["text"], "Acknowledge the concern,");
    assert_eq!(draft["title"], "Budget Constraints");
    let (final_at, done) = engine
        .output("final", |v| {
            is(v, c, "rta_live") && complete(v) && v["title"] == "Budget Constraints"
        })
        .await;
    let completed_at = f.nebula.completions()[0];
    // Informational (not asserted): how much earlier the agent saw the first words.
    eprintln!(
        "first words on stdout {} ms before the complete answer (Nebula fake: 300 ms between them)",
        final_at.duration_since(draft_at).as_millis()
    );
    assert!(draft_at < completed_at && completed_at <= final_at);
    assert_eq!(done["id"], draft["id"]);
    assert!(done["version"].as_u64() > draft["version"].as_u64());
    assert_eq!(done["text"], DEFAULT_ANSWER);
    assert!(done.get("degraded").is_none());
    assert!(
        done["sources"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Budget Constraints")
    );
    // One embedding for the tracker name; the prompt carried the retrieved guidance.
    assert_eq!(f.nebula.embed_attempts(), 18);
    let prompt = f.nebula.chat_requests()[0].to_string();
    assert!(prompt.contains("phased rollout"), "{prompt}");

    // The socket drops mid-call; on reconnect the fake redelivers the last 3 frames.
    f.symbl.set_redeliver_on_reconnect(3);
    f.symbl.drop_subscribers(c);
    assert!(
        f.symbl.wait_subscribed(c, 2, WAIT).await,
        "{}",
        engine.stderr()
    );
    engine.said("reconnected to connection conn-1").await;
    f.symbl.push(c, question("Who else uses it?", 4));
    f.symbl
        .push(c, tracker("Competitor Comparison", "another vendor", 5));
    engine
        .output("a suggestion after the reconnect", |v| {
            is(v, c, "rta_live") && complete(v) && v["title"] == "Competitor Comparison"
        })
        .await;
    let (_, questions) = engine
        .output("the questions card, version 2", |v| {
            is(v, c, "open_questions") && v["version"] == 2
        })
        .await;
    assert_eq!(
        questions["text"],
        "- Is there a cheaper plan? (Customer)\n- Who else uses it? (Customer)"
    );
    assert_eq!(f.nebula.embed_attempts(), 19);

    // A second call, added through the HTTP control endpoint, raises the same tracker: its
    // embedding is cached, so Nebula embeds nothing more.
    let resp = http("POST", &control, "/connections/conn-2").await;
    assert!(resp.starts_with("HTTP/1.1 202"), "{resp}");
    assert!(f.symbl.wait_subscribed("conn-2", 1, WAIT).await);
    f.symbl.push(
        "conn-2",
        tracker("Budget Constraints", "over our budget", 1),
    );
    engine
        .output("conn-2's suggestion", |v| {
            is(v, "conn-2", "rta_live") && complete(v)
        })
        .await;
    assert_eq!(f.nebula.embed_attempts(), 19);

    // The call ends on the update feed: the recap runs once, and Symbl's own summary is read
    // from the Conversation API with the conversation id the feed announced.
    f.symbl
        .add_conversation("5093011103940608", sample_conversation("5093011103940608"));
    f.symbl.stop_connection(c, "5093011103940608");
    let (_, summary) = engine
        .output("Symbl's summary", |v| is(v, c, "call_summary"))
        .await;
    assert_eq!(
        summary["text"],
        "Sam asked about pricing for 40 seats and raised a budget concern. Dana will send a pilot proposal by Friday.\nAction items:\n- Dana will send a pilot proposal by Friday."
    );
    let (_, recap) = engine.output("recap", |v| is(v, c, "call_recap")).await;
    let recap = recap["text"].as_str().unwrap();
    assert!(recap.contains("Budget Constraints"), "{recap}");
    // The sentence Symbl redelivered after the reconnect was not counted twice.
    assert!(recap.starts_with("1 sentences"), "{recap}");

    // The control endpoint lists, ends and refuses what it does not know.
    let listed = http("GET", &control, "/connections").await;
    assert!(
        listed.ends_with(r#"{"connections":["conn-2"]}"#),
        "{listed}"
    );
    let unknown = http("DELETE", &control, "/connections/nope").await;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    let ended = http("DELETE", &control, "/connections/conn-2").await;
    assert!(ended.starts_with("HTTP/1.1 202"), "{ended}");
    engine
        .output("conn-2's recap", |v| is(v, "conn-2", "call_recap"))
        .await;

    let (code, stderr, outputs) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("stopped: "), "{stderr}");
    // No suggestion, question card version or recap is duplicated.
    let finals: Vec<(String, String)> = outputs
        .iter()
        .filter(|v| is(v, c, "rta_live") && complete(v))
        .map(|v| (v["id"].to_string(), v["title"].to_string()))
        .collect();
    assert_eq!(finals.len(), 2, "{finals:?}");
    assert_ne!(finals[0].0, finals[1].0);
    let cards = outputs
        .iter()
        .filter(|v| is(v, c, "open_questions"))
        .count();
    assert_eq!(cards, 2);
    assert_eq!(outputs.iter().filter(|v| is(v, c, "call_recap")).count(), 1);
    // The keys never reach the logs.
    assert!(!stderr.contains("app-secret-value") && !stderr.contains("nebula-key-value"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nebula_retries_then_answers_and_when_down_the_fallback_arrives_within_the_deadline() {
    let f = fakes().await;
    f.ingest();
    // At trace level, with every library logging: still no token or key in the logs.
    let engine = f.run(
        &["--connection", "conn-a", "--connection", "conn-b"],
        &[("RUST_LOG", "trace")],
    );
    assert!(
        f.symbl.wait_subscribed("conn-a", 1, WAIT).await,
        "{}",
        engine.stderr()
    );
    assert!(
        f.symbl.wait_subscribed("conn-b", 1, WAIT).await,
        "{}",
        engine.stderr()
    );

    // 503, 503, then 200: the suggestion arrives, not degraded.
    f.nebula.fail_next(Endpoint::Chat, &[503, 503]);
    f.symbl.push("conn-a", tracker("Timing", "next quarter", 1));
    let (_, ok) = engine
        .output("the retried answer", |v| {
            is(v, "conn-a", "rta_live") && complete(v)
        })
        .await;
    assert_eq!(ok["text"], DEFAULT_ANSWER);
    assert!(ok.get("degraded").is_none(), "{ok}");
    assert_eq!(f.nebula.chat_attempts(), 3);

    // Nebula down: the retrieval-only card, marked degraded, within the 1.5 s deadline.
    f.nebula.set_down(true);
    f.symbl
        .push("conn-b", tracker("Budget Constraints", "too expensive", 1));
    let (_, fallback) = engine
        .output("the fallback", |v| {
            is(v, "conn-b", "rta_live") && complete(v)
        })
        .await;
    // Both the query embedding and the chat failed; the card says so.
    let why = fallback["degraded"].as_str().expect("marked degraded");
    assert!(why.contains("documents ranked by shared words"), "{why}");
    assert!(
        why.contains("`nebula` failed") || why.contains("would have missed the deadline"),
        "{why}"
    );
    assert!(
        fallback["text"]
            .as_str()
            .unwrap()
            .starts_with("Acknowledge the constraint")
    );
    // The engine's own clock: emitted less than 1.5 s after the pipeline started.
    assert!(
        fallback["timings"]["total_us"].as_u64().unwrap() < 1_500_000,
        "{fallback}"
    );

    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("DEBUG"), "verbose logging was on");
    for secret in ["fake-jwt-", "app-secret-value", "nebula-key-value"] {
        assert!(!stderr.contains(secret), "{secret} in the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_name_the_variables_and_nothing_to_follow_is_refused() {
    let f = fakes().await;
    f.ingest();
    let out = f
        .command(&["run", "--config", "prompter-live.yaml", "--connection", "x"])
        .env("SYMBL_APP_SECRET", "wrong-secret-value")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Symbl rejected the app id and secret (401): check `SYMBL_APP_ID` and `SYMBL_APP_SECRET`"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-secret-value"));

    let out = f
        .command(&["run", "--config", "prompter-live.yaml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to follow"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trackers_sync_creates_then_updates_only_what_changed() {
    let f = fakes().await;
    f.ingest();
    // One tracker already exists with other phrases; the rest are new.
    f.symbl.add_tracker("Timing", &["not now"]);
    let sync = |dry: bool| {
        let mut args = vec!["trackers", "sync", "--config", "prompter-live.yaml"];
        if dry {
            args.push("--dry-run");
        }
        f.command(&args).output().unwrap()
    };
    let dry = sync(true);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    assert_eq!(f.symbl.trackers().len(), 1, "a dry run changes nothing");

    let first = sync(false);
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let names: Vec<String> = f.symbl.trackers().iter().map(|t| t.name.clone()).collect();
    for name in [
        "Budget Constraints",
        "Competitor Comparison",
        "Timing",
        "Security Concerns",
    ] {
        assert!(
            names.contains(&name.to_owned()),
            "{name} missing: {names:?}\n{stdout}"
        );
    }
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        stdout.contains("4 trackers: 3 created, 1 updated, 0 unchanged, 0 failed"),
        "{stdout}"
    );
    assert_eq!(f.symbl.manage_overlaps(), 0, "one request at a time");

    // Nothing changed: a second run updates nothing.
    let second = sync(false);
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{stdout}");
    assert!(
        stdout.contains("4 trackers: 0 created, 0 updated, 4 unchanged, 0 failed"),
        "{stdout}"
    );
}
