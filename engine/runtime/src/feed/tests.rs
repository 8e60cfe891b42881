use super::*;
use crate::engine::{Engine, Observer};
use crate::stats::Stats;
use prompter_core::test_util::event;
use serde_json::json;

fn said(conv: &str, offset: u64, text: &str) -> Event {
    event(
        conv,
        offset,
        json!({"type": "message_response", "messages": [{"id": format!("m{offset}"),
            "from": {"name": "Customer"}, "payload": {"content": text}}]}),
    )
}

fn caption(conv: &str, text: &str) -> Event {
    event(
        conv,
        0,
        json!({"type": "message", "message": {"type": "recognition_result", "isFinal": false,
            "punctuated": {"transcript": text}}}),
    )
}

fn card(conv: &str, id: &str, version: u32, status: Status, text: &str) -> Arc<Output> {
    Arc::new(Output {
        id: format!("{conv}/rta/{id}"),
        version,
        status,
        conversation_id: conv.into(),
        text: text.into(),
        degraded: (status == Status::Withdrawn).then(|| "superseded by a newer trigger".into()),
        ..Output::default()
    })
}

/// Feeds one step of a call: a sentence, a caption, a draft and its final version, and now and
/// then a withdrawal.
fn step(hub: &FeedHub, i: u64) {
    hub.folded(&caption("c", &format!("words {i}")));
    hub.folded(&said("c", i * 1000, &format!("sentence {i}")));
    let id = format!("k-{}", i % 3);
    hub.output(card("c", &id, 2 * i as u32 + 1, Status::Draft, "drafting"));
    if i % 5 == 4 {
        hub.output(card(
            "c",
            &id,
            2 * i as u32 + 2,
            Status::Withdrawn,
            "drafting",
        ));
    } else {
        hub.output(card("c", &id, 2 * i as u32 + 2, Status::Final, "done"));
    }
}

fn drain(live: &mut broadcast::Receiver<Arc<FeedMessage>>) -> Vec<Arc<FeedMessage>> {
    let mut out = Vec::new();
    while let Ok(m) = live.try_recv() {
        out.push(m);
    }
    out
}

fn ids(msgs: &[Arc<FeedMessage>]) -> Vec<String> {
    msgs.iter().map(|m| m.id.clone()).collect()
}

#[test]
fn a_client_that_reconnects_with_its_last_id_ends_with_exactly_what_an_uninterrupted_one_got() {
    let hub = FeedHub::new();
    let mut steady = hub.subscribe("c", None);
    let mut got_steady = steady.backlog.clone();
    let mut flaky = hub.subscribe("c", None);
    let mut got_flaky = flaky.backlog.clone();
    for i in 0..10 {
        step(&hub, i);
    }
    got_steady.extend(drain(&mut steady.live));
    got_flaky.extend(drain(&mut flaky.live));
    // The flaky client drops its socket; the call goes on without it.
    drop(flaky);
    for i in 10..30 {
        step(&hub, i);
        got_steady.extend(drain(&mut steady.live));
    }
    let last = got_flaky.last().unwrap().id.clone();
    let mut again = hub.subscribe("c", Some(&last));
    assert!(
        !matches!(again.backlog[0].body, FeedBody::Snapshot { .. }),
        "the gap is in the ring: it is replayed, not a snapshot"
    );
    got_flaky.extend(again.backlog.clone());
    for i in 30..35 {
        step(&hub, i);
        got_steady.extend(drain(&mut steady.live));
    }
    got_flaky.extend(drain(&mut again.live));
    assert_eq!(ids(&got_flaky), ids(&got_steady), "no gap, no duplicate");
    assert_eq!(got_flaky, got_steady);
    // Every id is the next one: 1, 2, 3, ... after the first snapshot.
    let seqs: Vec<u64> = got_steady.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (0..=seqs.len() as u64 - 1).collect::<Vec<_>>());
}

#[test]
fn a_position_too_old_or_from_another_epoch_gets_a_snapshot_marked_as_a_resync() {
    let hub = FeedHub::new();
    let first = hub.subscribe("c", None);
    let old = first.backlog[0].id.clone();
    // More than the ring holds.
    for i in 0..(RING as u64 / 4 + 10) {
        step(&hub, i);
    }
    let resumed = hub.subscribe("c", Some(&old));
    assert_eq!(resumed.backlog.len(), 1);
    let FeedBody::Snapshot {
        resync,
        transcript,
        caption,
        cards,
        ended,
    } = &resumed.backlog[0].body
    else {
        panic!("expected a snapshot, got {:?}", resumed.backlog[0]);
    };
    assert!(*resync);
    assert!(!*ended);
    assert_eq!(transcript.len(), TRANSCRIPT_TAIL);
    assert_eq!(
        transcript.last().unwrap().text,
        format!("sentence {}", RING / 4 + 9)
    );
    assert!(caption.is_none(), "a final sentence clears the caption");
    // k-0, k-1 and k-2 were last touched at steps 264, 265, 263: 264 was withdrawn.
    let live: Vec<(&str, u32)> = cards.iter().map(|c| (c.id.as_str(), c.version)).collect();
    assert_eq!(live, [("c/rta/k-1", 532), ("c/rta/k-2", 528)]);
    // The snapshot's id is the position it stands for: resuming from it replays nothing.
    let from_snapshot = hub.subscribe("c", Some(&resumed.backlog[0].id));
    assert!(from_snapshot.backlog.is_empty());
    // Another epoch (a restarted engine) or garbage: a snapshot.
    for stale in ["0-3", "nonsense", ""] {
        let s = hub.subscribe("c", Some(stale));
        assert!(matches!(
            s.backlog[0].body,
            FeedBody::Snapshot { resync: true, .. }
        ));
    }
    // A fresh client gets a snapshot that is not a resync.
    assert!(matches!(
        hub.subscribe("c", None).backlog[0].body,
        FeedBody::Snapshot { resync: false, .. }
    ));
}

#[test]
fn versions_only_grow_and_the_end_of_the_call_is_announced_once() {
    let hub = FeedHub::new();
    let mut sub = hub.subscribe("c", None);
    hub.output(card("c", "k-a", 2, Status::Final, "newer"));
    hub.output(card("c", "k-a", 1, Status::Draft, "older, late"));
    let end = event(
        "c",
        9000,
        json!({"type": "message", "message": {"type": "conversation_completed"}}),
    );
    hub.folded(&end);
    hub.folded(&end);
    let got = drain(&mut sub.live);
    let kinds: Vec<&str> = got
        .iter()
        .map(|m| match &m.body {
            FeedBody::Upsert { .. } => "upsert",
            FeedBody::Ended => "ended",
            _ => "other",
        })
        .collect();
    assert_eq!(kinds, ["upsert", "ended"]);
    assert_eq!(hub.conversations(), [("c".to_owned(), true)]);
    let json = serde_json::to_value(&*got[0]).unwrap();
    assert_eq!(json["type"], "output.upsert");
    assert_eq!(json["output"]["text"], "newer");
    assert_eq!(json["conversation_id"], "c");
}

#[tokio::test]
async fn the_engine_feeds_transcript_and_outputs_in_one_order_per_conversation() {
    let hub = Arc::new(FeedHub::new());
    let engine = Engine::new(
        Vec::new(),
        crate::config::Settings::default(),
        vec![Box::new(FeedSink(hub.clone()))],
        Arc::new(Stats::default()),
    )
    .with_observer(hub.clone());
    let mut sub = hub.subscribe("x", None);
    engine.dispatch(caption("x", "It seems")).await;
    engine
        .dispatch(said("x", 1000, "It seems expensive."))
        .await;
    engine.finish().await;
    let got = drain(&mut sub.live);
    let json: Vec<serde_json::Value> = got
        .iter()
        .map(|m| serde_json::to_value(&**m).unwrap())
        .collect();
    assert_eq!(json[0]["type"], "transcript.partial");
    assert_eq!(json[0]["text"], "It seems");
    assert_eq!(json[1]["type"], "transcript.final");
    assert_eq!(json[1]["speaker"], "Customer");
    assert_eq!(json[1]["text"], "It seems expensive.");
    assert_eq!(json[1]["message_id"], "m1000");
    assert!(json[1]["id"].as_str().unwrap().ends_with("-2"));
}

#[test]
fn a_conversation_released_idle_is_let_go_like_an_ended_one_and_supervisors_see_calls() {
    let hub = FeedHub::new();
    let mut all = hub.subscribe_all();
    hub.folded(&said("idle", 1000, "Hello?"));
    assert!(!hub.ended("idle"));
    hub.released("idle");
    assert!(hub.ended("idle"), "a released call takes no more feedback");
    // Still readable, until 1,024 newer calls have ended.
    assert!(matches!(
        hub.subscribe("idle", None).backlog[0].body,
        FeedBody::Snapshot { ended: true, .. }
    ));
    for i in 0..1_024 {
        hub.released(&format!("never-seen-{i}"));
        let c = format!("c{i}");
        hub.folded(&said(&c, 1000, "Hi"));
        hub.released(&c);
    }
    assert!(hub.conversations().iter().all(|(c, _)| c != "idle"));
    // Supervisors got the list, then each call's start and lines.
    assert!(matches!(all.backlog[0].body, FeedBody::Calls { .. }));
    let first: Vec<&str> = drain(&mut all.live)
        .iter()
        .take(2)
        .map(|m| m.kind())
        .collect();
    assert_eq!(first, ["call.started", "transcript.final"]);
}
