#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! How runs of live calls overlap, against local fakes of Symbl and Nebula (Nebula answering
//! in 700 ms, the shipped 1.5 s deadline): the real `prompter run` on `prompter-live.yaml`.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// Starts the engine following `conn` with Nebula streaming its answers in 700 ms.
async fn live(conn: &str) -> (Fakes, Engine) {
    let f = fakes().await;
    f.ingest();
    f.nebula.set_chat_delay(Duration::from_millis(700));
    let engine = f.run(&["--connection", conn], &[]);
    assert!(
        f.symbl.wait_subscribed(conn, 1, WAIT).await,
        "{}",
        engine.stderr()
    );
    (f, engine)
}

fn final_suggestions(outputs: &[Value]) -> Vec<&Value> {
    outputs
        .iter()
        .filter(|v| v["pipeline"] == "rta_live" && complete(v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_trackers_300_ms_apart_all_complete_and_a_question_card_is_not_held_back() {
    let (f, engine) = live("conn-r").await;
    let c = "conn-r";
    f.symbl
        .push(c, tracker("Budget Constraints", "too expensive", 1));
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.symbl.push(c, question("Can we start with a pilot?", 2));
    tokio::time::sleep(Duration::from_millis(200)).await;
    f.symbl.push(c, tracker("Timing", "next quarter", 3));
    tokio::time::sleep(Duration::from_millis(300)).await;
    f.symbl
        .push(c, tracker("Competitor Comparison", "comparing you with", 4));

    let (question_at, _) = engine
        .output("the questions card", |v| {
            is(v, c, "open_questions") && complete(v)
        })
        .await;
    let (first_answer_at, _) = engine
        .output("the first tracker's answer", |v| {
            is(v, c, "rta_live") && complete(v) && v["title"] == "Budget Constraints"
        })
        .await;
    assert!(
        question_at < first_answer_at,
        "the question card waited for the first tracker's answer"
    );
    engine
        .output("the third tracker's answer", |v| {
            is(v, c, "rta_live") && complete(v) && v["title"] == "Competitor Comparison"
        })
        .await;
    let (code, stderr, outputs) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    let finals = final_suggestions(&outputs);
    let mut titles: Vec<&str> = finals
        .iter()
        .map(|v| v["title"].as_str().unwrap())
        .collect();
    titles.sort_unstable();
    assert_eq!(
        titles,
        ["Budget Constraints", "Competitor Comparison", "Timing"],
        "{outputs:#?}"
    );
    for v in &finals {
        assert!(v.get("degraded").is_none(), "degraded: {v}");
        assert_eq!(v["text"], prompter_fakes::nebula::DEFAULT_ANSWER);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracker_that_fires_again_while_its_answer_streams_takes_over_its_card() {
    let (f, engine) = live("conn-l").await;
    let c = "conn-l";
    f.symbl
        .push(c, tracker("Budget Constraints", "too expensive", 1));
    let (_, first) = engine
        .output("the first draft", |v| {
            is(v, c, "rta_live") && v["status"] == "draft"
        })
        .await;
    // The same tracker again, another phrase, while the first answer is still streaming.
    f.symbl
        .push(c, tracker("Budget Constraints", "no budget", 2));
    let (_, done) = engine
        .output("the newer answer", |v| is(v, c, "rta_live") && complete(v))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, stderr, outputs) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    let card: Vec<(u64, String, Vec<Value>)> = outputs
        .iter()
        .filter(|v| v["id"] == first["id"])
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["status"].as_str().unwrap().to_owned(),
                v["trigger"]["phrases"].as_array().unwrap().clone(),
            )
        })
        .collect();
    // One card: the first draft, withdrawn when the newer trigger had words to show, then the
    // newer answer's drafts and its final version; versions 1, 2, 3, ... in order.
    let (last, newer) = card.split_last().unwrap();
    assert_eq!(
        newer[..2],
        [
            (1, "draft".into(), vec![json!("too expensive")]),
            (2, "withdrawn".into(), vec![json!("too expensive")]),
        ],
        "{outputs:#?}"
    );
    assert!(newer.len() >= 3, "the newer answer was drafted: {card:?}");
    for (i, (version, status, phrases)) in newer.iter().enumerate().skip(2) {
        assert_eq!(
            (*version, status.as_str(), phrases.as_slice()),
            (i as u64 + 1, "draft", [json!("no budget")].as_slice())
        );
    }
    assert_eq!(
        last,
        &(card.len() as u64, "final".into(), vec![json!("no budget")])
    );
    assert_eq!(done["id"], first["id"]);
    assert!(done.get("degraded").is_none(), "{done}");
    assert_eq!(
        f.nebula.streams_cut(),
        1,
        "the first answer's stream was closed early"
    );
    assert_eq!(final_suggestions(&outputs).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_redelivered_with_other_spacing_is_counted_once() {
    let (f, engine) = live("conn-d").await;
    let c = "conn-d";
    let q = question("Is there a discount for two years?", 1);
    f.symbl.push(c, q.clone());
    engine
        .output("the questions card", |v| is(v, c, "open_questions"))
        .await;
    // The same frame again, pretty-printed with its keys in another order.
    let mut respaced = serde_json::to_string_pretty(&q).unwrap();
    respaced = respaced.replace("\"type\": \"insight_response\",", "");
    respaced = respaced.replacen('{', "{\n  \"type\":   \"insight_response\",", 1);
    assert_ne!(respaced, q.to_string());
    f.symbl.push_text(c, &respaced);
    f.symbl.push(c, question("Who signs the contract?", 2));
    f.symbl.push(
        c,
        json!({"type": "message", "message": {"type": "conversation_completed"}}),
    );
    let (_, recap) = engine.output("the recap", |v| is(v, c, "call_recap")).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(300) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, stderr, outputs) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    let text = recap["text"].as_str().unwrap();
    assert_eq!(
        text.matches("Is there a discount for two years?").count(),
        1,
        "{text}"
    );
    let cards: Vec<(u64, String)> = outputs
        .iter()
        .filter(|v| is(v, c, "open_questions"))
        .map(|v| {
            (
                v["version"].as_u64().unwrap(),
                v["title"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        cards,
        [
            (1, "Questions asked (1)".to_owned()),
            (2, "Questions asked (2)".to_owned())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_connections_given_at_start_are_all_followed() {
    let f = fakes().await;
    f.ingest();
    let ids: Vec<String> = (0..300).map(|i| format!("conn-{i:03}")).collect();
    let mut args: Vec<&str> = Vec::new();
    for id in &ids {
        args.extend(["--connection", id.as_str()]);
    }
    let engine = f.run(&args, &[]);
    engine.said("following connection conn-299").await;
    assert!(
        f.symbl.wait_subscribed("conn-299", 1, WAIT).await,
        "{}",
        engine.stderr()
    );
    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    let followed = stderr
        .lines()
        .filter(|l| l.starts_with("following connection "))
        .count();
    assert_eq!(followed, 300, "{stderr}");
}
