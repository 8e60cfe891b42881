//! Replaying recorded calls through the shipped pipelines.

use std::collections::BTreeMap;

use prompter_core::output::Output;

use crate::cli::{at, prompter, root};

fn outputs(stdout: &str) -> Vec<Output> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l}: {e}")))
        .collect()
}

fn suggestions_by_conversation(outs: &[Output]) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for o in outs.iter().filter(|o| o.kind == "suggestion") {
        m.entry(o.conversation_id.clone())
            .or_default()
            .push(o.trigger.tracker.clone().unwrap());
    }
    for v in m.values_mut() {
        v.sort();
    }
    m
}

#[test]
fn two_interleaved_calls_give_one_suggestion_per_distinct_tracker_match() {
    let r = prompter(&[
        "replay",
        "--config",
        &at("prompter.yaml"),
        &at("tests/fixtures/recordings/two-calls-interleaved.jsonl"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The malformed line is reported with its line number, and the rest still ran.
    assert!(
        r.stderr
            .contains("two-calls-interleaved.jsonl:11: skipped malformed line"),
        "{}",
        r.stderr
    );
    let outs = outputs(&r.stdout);
    let by_conv = suggestions_by_conversation(&outs);
    assert_eq!(by_conv["conv-a"], ["Budget Constraints", "Timing"]);
    assert_eq!(
        by_conv["conv-b"],
        ["Budget Constraints", "Competitor Comparison"]
    );
    for s in outs.iter().filter(|o| o.kind == "suggestion") {
        let tracker = s.trigger.tracker.as_deref().unwrap();
        assert_eq!(s.pipeline, "rta");
        assert_eq!(s.trigger.event, "tracker_response");
        assert!(!s.trigger.phrases.is_empty());
        assert!(!s.sources.is_empty(), "suggestion without sources: {s:?}");
        // The top source is the knowledge-base row for this tracker, and the offline LLM
        // answers with its guidance.
        assert!(
            s.sources[0].text.starts_with(tracker),
            "{tracker}: top source {:?}",
            s.sources[0].text
        );
        assert_eq!(s.text, s.sources[0].data.trim());
        for stage in ["once", "retrieve", "prompt", "answer"] {
            assert!(
                s.timings.stages_us.contains_key(stage),
                "missing timing for {stage}: {:?}",
                s.timings
            );
        }
        assert!(s.id.starts_with(&format!("{}/rta/", s.conversation_id)));
    }
    // The other pipelines ran too: questions and the recap, per conversation.
    for conv in ["conv-a", "conv-b"] {
        assert!(
            outs.iter()
                .any(|o| o.kind == "open_questions" && o.conversation_id == conv)
        );
        assert_eq!(
            outs.iter()
                .filter(|o| o.kind == "summary" && o.conversation_id == conv)
                .count(),
            1
        );
    }
    assert!(
        r.stderr.contains("1 malformed line(s) skipped"),
        "{}",
        r.stderr
    );
}

/// An engine config in a temp folder using the shipped RTA pipeline over `knowledge_csv`.
fn config_with_knowledge(dir: &std::path::Path, knowledge_csv: &str) -> String {
    let cfg = format!(
        "pipelines: [\"{}\"]\nknowledge:\n  sales:\n    store: embedded\n    config:\n      source: \"{}\"\nllm:\n  offline:\n    provider: offline\n",
        at("pipelines/rta.yaml"),
        knowledge_csv
    );
    let path = dir.join("prompter.yaml");
    std::fs::write(&path, cfg).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn another_knowledge_base_changes_the_suggestions() {
    let dir = tempfile::tempdir().unwrap();
    let support = at("tests/fixtures/recordings/support-call.jsonl");
    let alt = config_with_knowledge(dir.path(), &at("pipelines/data/alt_knowledge.csv"));
    let r = prompter(&["replay", "--config", &alt, &support]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let outs = outputs(&r.stdout);
    let alt_csv = std::fs::read_to_string(root().join("pipelines/data/alt_knowledge.csv")).unwrap();
    let sugg: Vec<&Output> = outs.iter().filter(|o| o.kind == "suggestion").collect();
    assert_eq!(sugg.len(), 2, "{outs:?}");
    for s in &sugg {
        let tracker = s.trigger.tracker.as_deref().unwrap();
        assert!(
            s.sources[0].text.starts_with(tracker),
            "{tracker} retrieved {:?}",
            s.sources[0].text
        );
        assert!(
            alt_csv.contains(&s.text),
            "suggestion text not from the support knowledge base: {}",
            s.text
        );
    }

    // The same call over the sales knowledge base gets different (sales) guidance.
    let dir2 = tempfile::tempdir().unwrap();
    let sales = config_with_knowledge(dir2.path(), &at("pipelines/data/sales_objections.csv"));
    let r2 = prompter(&["replay", "--config", &sales, &support]);
    let sales_texts: Vec<String> = outputs(&r2.stdout)
        .into_iter()
        .filter(|o| o.kind == "suggestion")
        .map(|o| o.text)
        .collect();
    for s in &sugg {
        assert!(!sales_texts.contains(&s.text));
    }

    // Editing the knowledge base in place is picked up on the next run (the index is rebuilt).
    let kb = dir.path().join("kb.csv");
    let write_kb = |refund: &str| {
        let text = format!(
            "objection,guidance\n\"Refund Request: I want my money back\",\"{refund}\"\n\"Late Delivery: my order has not arrived\",\"Check the carrier status.\"\n"
        );
        std::fs::write(&kb, text).unwrap();
    };
    let cfg = config_with_knowledge(dir.path(), kb.to_str().unwrap());
    write_kb("Offer store credit first.");
    let first = outputs(&prompter(&["replay", "--config", &cfg, &support]).stdout);
    write_kb("Refund to the original card today.");
    let second = outputs(&prompter(&["replay", "--config", &cfg, &support]).stdout);
    let refund = |outs: &[Output]| {
        outs.iter()
            .find(|o| o.trigger.tracker.as_deref() == Some("Refund Request"))
            .map(|o| o.text.clone())
    };
    assert_eq!(refund(&first).as_deref(), Some("Offer store credit first."));
    assert_eq!(
        refund(&second).as_deref(),
        Some("Refund to the original card today.")
    );
}

#[test]
fn shipped_calls_replay_cleanly() {
    let r = prompter(&[
        "replay",
        "--config",
        &at("prompter.yaml"),
        &at("pipelines/recordings/acme-discovery-call.jsonl"),
        &at("pipelines/recordings/globex-renewal-call.jsonl"),
        &at("pipelines/recordings/initech-demo-call.jsonl"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("0 malformed line(s) skipped, 0 stage error(s)"),
        "{}",
        r.stderr
    );
    let outs = outputs(&r.stdout);
    let by_conv = suggestions_by_conversation(&outs);
    assert_eq!(
        by_conv["acme-001"],
        [
            "Budget Constraints",
            "Competitor Comparison",
            "Decision Maker"
        ]
    );
    assert_eq!(
        by_conv["globex-042"],
        ["Contract Terms", "Security Concerns", "Timing"]
    );
    assert_eq!(
        by_conv["initech-7"],
        [
            "Data Migration",
            "Implementation Effort",
            "Integration Questions"
        ]
    );
    // The legacy insight shape (`text`, no payload) still reaches the questions list.
    let initech_q = outs
        .iter()
        .rfind(|o| o.kind == "open_questions" && o.conversation_id == "initech-7")
        .unwrap();
    assert!(initech_q.text.contains("Salesforce"), "{}", initech_q.text);
    // Versions of the questions card grow in order within a conversation.
    let versions: Vec<u32> = outs
        .iter()
        .filter(|o| o.kind == "open_questions" && o.conversation_id == "acme-001")
        .map(|o| o.version)
        .collect();
    assert_eq!(versions, (1..=versions.len() as u32).collect::<Vec<_>>());
}

#[test]
fn demo_shows_transcript_and_cards() {
    let r = prompter(&[
        "demo",
        "--config",
        &at("prompter.yaml"),
        "--speed",
        "500",
        "--no-color",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("] Sam Rivera:") || r.stdout.contains("]"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("SUGGESTION | Budget Constraints"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("why: tracker Budget Constraints matched"),
        "{}",
        r.stdout
    );
    assert!(
        r.stdout.contains("CALL RECAP") || r.stdout.contains("SUMMARY"),
        "{}",
        r.stdout
    );
}

#[test]
fn bench_reports_throughput_and_percentiles() {
    let r = prompter(&[
        "bench",
        "--config",
        &at("prompter.yaml"),
        "--iterations",
        "3",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("events/s"), "{}", r.stdout);
    assert!(
        r.stdout.contains("per-event engine time: p50"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("0 stage errors"), "{}", r.stdout);
}
