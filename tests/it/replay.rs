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

/// `text` with every number (`12`, `0.068`) replaced by `#`, for lines that carry timings. Digits
/// that end a word (`p50`) are part of it, not numbers.
fn masked(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_number = false;
    let mut in_word = false;
    for c in text.chars() {
        let number = !in_word && (c.is_ascii_digit() || (in_number && c == '.'));
        if !number {
            out.push(c);
        } else if !in_number {
            out.push('#');
        }
        in_number = number;
        in_word = c.is_alphanumeric() && !number;
    }
    out
}

/// `line` with the wall time of a replay summary (`in 0.020 s:`) masked.
fn wall_masked(line: &str) -> String {
    match line
        .split_once(" in ")
        .and_then(|(head, rest)| Some((head, rest.split_once(" s: ")?.1)))
    {
        Some((head, tail)) => format!("{head} in # s: {tail}"),
        None => line.to_owned(),
    }
}

/// The replay summary line on stderr, its wall time masked.
fn summary_line(events: usize, conversations: usize, outputs: usize, malformed: usize) -> String {
    format!(
        "replayed {events} event(s) from {conversations} conversation(s) in # s: {outputs} \
         output(s), {malformed} malformed line(s) skipped, 0 stage error(s)"
    )
}

#[test]
fn two_interleaved_calls_give_one_suggestion_per_distinct_tracker_match() {
    let recording = at("tests/fixtures/recordings/two-calls-interleaved.jsonl");
    let r = prompter(&["replay", "--config", &at("prompter.yaml"), &recording]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The malformed line is reported with its line number, and the rest still ran.
    let stderr: Vec<String> = r.stderr.lines().map(wall_masked).collect();
    assert_eq!(
        stderr,
        [
            format!(
                "warning: {recording}:11: skipped malformed line: EOF while parsing a string at \
                 line 1 column 77"
            ),
            summary_line(28, 2, 8, 1),
        ]
    );
    let outs = outputs(&r.stdout);
    assert_eq!(outs.len(), 8, "{outs:#?}");
    let by_conv = suggestions_by_conversation(&outs);
    assert_eq!(by_conv["conv-a"], ["Budget Constraints", "Timing"]);
    assert_eq!(
        by_conv["conv-b"],
        ["Budget Constraints", "Competitor Comparison"]
    );
    let mut seen: Vec<(&str, &str, Vec<String>)> = Vec::new();
    for s in outs.iter().filter(|o| o.kind == "suggestion") {
        let tracker = s.trigger.tracker.as_deref().unwrap();
        assert_eq!(s.pipeline, "rta");
        assert_eq!(s.version, 1);
        assert_eq!(s.title.as_deref(), Some(tracker));
        assert_eq!(s.trigger.event, "tracker_response");
        seen.push((s.id.as_str(), tracker, s.trigger.phrases.clone()));
        // `top_k: 2` in rta.yaml; the top source is the knowledge-base row for this tracker,
        // and the offline LLM answers with its guidance.
        assert_eq!(s.sources.len(), 2, "{s:?}");
        assert!(
            s.sources[0].text.starts_with(tracker),
            "{tracker}: top source {:?}",
            s.sources[0].text
        );
        assert_eq!(s.text, s.sources[0].data.trim());
        let stages: Vec<&str> = s.timings.stages_us.keys().map(String::as_str).collect();
        assert_eq!(stages, ["answer", "once", "prompt", "retrieve"]);
    }
    seen.sort();
    let phrases = |p: &str| vec![p.to_owned()];
    assert_eq!(
        seen,
        [
            (
                "conv-a/rta/k-budget-constraints",
                "Budget Constraints",
                phrases("too expensive")
            ),
            (
                "conv-a/rta/k-timing",
                "Timing",
                phrases("not until next quarter")
            ),
            (
                "conv-b/rta/k-budget-constraints",
                "Budget Constraints",
                phrases("more than we budgeted")
            ),
            (
                "conv-b/rta/k-competitor-comparison",
                "Competitor Comparison",
                phrases("also comparing you with")
            ),
        ]
    );
    // The other pipelines ran too: one questions card and one recap per conversation.
    let texts = |conv: &str, kind: &str| -> Vec<&str> {
        outs.iter()
            .filter(|o| o.kind == kind && o.conversation_id == conv)
            .map(|o| o.text.as_str())
            .collect()
    };
    assert_eq!(
        texts("conv-a", "open_questions"),
        ["- What budget range do you have in mind for this project? (Maya Chen)"]
    );
    assert_eq!(
        texts("conv-b", "open_questions"),
        ["- Hi Aisha, how does our proposal compare to what you use today? (Jordan Patel)"]
    );
    assert_eq!(
        texts("conv-a", "summary"),
        ["4 sentences, 24 s.\n\
          Objections: Budget Constraints (\"too expensive\"); Timing (\"not until next quarter\")\n\
          Questions:\n\
          - What budget range do you have in mind for this project?\n\
          Topics: project budget"]
    );
    assert_eq!(
        texts("conv-b", "summary"),
        ["3 sentences, 22 s.\n\
          Objections: Budget Constraints (\"more than we budgeted\"); Competitor Comparison \
          (\"also comparing you with\")\n\
          Questions:\n\
          - Hi Aisha, how does our proposal compare to what you use today?\n\
          Topics: proposal pricing"]
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
    assert_eq!(r2.code, 0, "{}", r2.stderr);
    let sales_texts: Vec<String> = outputs(&r2.stdout)
        .into_iter()
        .filter(|o| o.kind == "suggestion")
        .map(|o| o.text)
        .collect();
    assert_eq!(sales_texts.len(), 2, "{sales_texts:?}");
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
    assert_eq!(wall_masked(&r.stderr), summary_line(128, 3, 16, 0) + "\n");
    let outs = outputs(&r.stdout);
    assert_eq!(outs.len(), 16, "{outs:#?}");
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
    let initech_q: Vec<&str> = outs
        .iter()
        .filter(|o| o.kind == "open_questions" && o.conversation_id == "initech-7")
        .map(|o| o.text.as_str())
        .collect();
    assert_eq!(
        initech_q,
        ["- Does it integrate with Salesforce and our Snowflake warehouse?"]
    );
    // Versions of the questions card grow in order within a conversation.
    let versions: Vec<u32> = outs
        .iter()
        .filter(|o| o.kind == "open_questions" && o.conversation_id == "acme-001")
        .map(|o| o.version)
        .collect();
    assert_eq!(versions, [1, 2]);
}

/// The demo's lines: the header, transcript lines, card lines (engine times masked) and the
/// last line, each group in order. Transcript lines and cards come from different tasks, so
/// how they interleave depends on timing; within each group the order is the call's.
fn demo_parts(stdout: &str) -> [Vec<String>; 3] {
    let mut parts: [Vec<String>; 3] = Default::default();
    for line in stdout.lines() {
        let group = if line.starts_with('[') {
            1
        } else if line.starts_with("    ") {
            2
        } else {
            0
        };
        let line = if line.trim_start().starts_with("| engine time ") {
            masked(line)
        } else {
            line.to_owned()
        };
        // The checkout's folder differs from machine to machine.
        let line = line.replace(&root().display().to_string(), "<checkout>");
        parts[group].push(line);
    }
    parts
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
    assert_eq!(r.stderr, "");
    // tests/fixtures/demo/acme-discovery-call.txt is what the demo printed (engine times
    // masked); BLESS=1 rewrites it.
    let snapshot = root().join("tests/fixtures/demo/acme-discovery-call.txt");
    if std::env::var_os("BLESS").is_some() {
        let text: String = r
            .stdout
            .lines()
            .map(|l| {
                {
                    if l.trim_start().starts_with("| engine time ") {
                        masked(l)
                    } else {
                        l.to_owned()
                    }
                }
                .replace(&root().display().to_string(), "<checkout>")
                    + "\n"
            })
            .collect();
        std::fs::write(&snapshot, text).unwrap();
    }
    let expected = std::fs::read_to_string(&snapshot).unwrap();
    let [header, transcript, cards] = demo_parts(&r.stdout);
    let [want_header, want_transcript, want_cards] = demo_parts(&expected);
    assert_eq!(header, want_header);
    assert_eq!(transcript, want_transcript);
    assert_eq!(cards, want_cards);
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
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 7, "{}", r.stdout);
    // The counts are exact; the timings vary from run to run.
    assert_eq!(
        lines[0],
        "bench: 4 recording(s) x 3 = 447 events, 12 conversations, 54 outputs, 0 stage errors"
    );
    assert_eq!(
        masked(lines[1]),
        "throughput: # events/s (# s wall, # cores)"
    );
    assert_eq!(
        masked(lines[2]),
        "per-event engine time: p50 # us, p99 # us, max # us (# events)"
    );
    assert!(lines[2].ends_with(" (447 events)"), "{}", lines[2]);
    assert_eq!(
        masked(lines[3]),
        "per-suggestion RTA pipeline time: p50 # us, p99 # us (# suggestions)"
    );
    assert!(lines[3].ends_with(" (30 suggestions)"), "{}", lines[3]);
    for (line, pipeline, runs) in [
        (lines[4], "call_recap", 12),
        (lines[5], "open_questions", 12),
        (lines[6], "rta", 51),
    ] {
        assert_eq!(
            masked(line),
            format!("per-run time, pipeline `{pipeline}`: p50 # us, p99 # us (# runs)")
        );
        assert!(line.ends_with(&format!(" ({runs} runs)")), "{line}");
    }
}

#[test]
fn a_tracker_response_without_a_usable_tracker_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("trackers.jsonl");
    let frame = |offset: u64, trackers: &str| {
        format!(
            "{{\"conversation\": \"c\", \"offset_ms\": {offset}, \"event\": {{\"type\": \
             \"tracker_response\", \"isFinal\": true, \"trackers\": {trackers}}}}}\n"
        )
    };
    let budget = r#"{"name": "Budget Constraints", "matches": [{"type": "vocabulary", "value": "too expensive", "messageRefs": []}]}"#;
    let nameless = r#"{"matches": [{"type": "vocabulary", "value": "next quarter"}]}"#;
    let text = frame(1000, &format!("[{nameless}, {nameless}]"))
        + &frame(2000, &format!("[{nameless}, {budget}]"));
    std::fs::write(&recording, text).unwrap();
    let r = prompter(&[
        "replay",
        "--config",
        &at("prompter.yaml"),
        recording.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let stderr: Vec<String> = r.stderr.lines().map(wall_masked).collect();
    assert_eq!(
        stderr,
        [
            format!(
                "warning: {}:1: skipped malformed line: `tracker_response` has no usable \
                 tracker: `trackers[0]` has no string `name` field, and 1 more is malformed",
                recording.display()
            ),
            // The second frame's readable tracker still ran (its nameless one was dropped with a
            // log warning): one suggestion.
            summary_line(1, 1, 1, 1),
        ]
    );
    let by_conv = suggestions_by_conversation(&outputs(&r.stdout));
    assert_eq!(by_conv["c"], ["Budget Constraints"]);
}

#[test]
fn bench_long_call_measures_every_suggestion_at_each_size() {
    let r = prompter(&[
        "bench",
        "--config",
        &at("prompter.yaml"),
        "--long-call",
        "5,40",
    ]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    for (line, n) in [(lines[0], 5), (lines[1], 40)] {
        assert_eq!(
            masked(line),
            "long call, # sentences: per-suggestion engine time p50 # us, p99 # us (# suggestions, # missing); per-sentence engine time p50 # us, p99 # us"
        );
        assert!(
            line.starts_with(&format!("long call, {n} sentences:")),
            "{line}"
        );
        assert!(line.contains("(1000 suggestions, 0 missing)"), "{line}");
    }
    assert_eq!(
        masked(lines[2]),
        "long-call ratio, # vs # sentences: p50 #x, p99 #x"
    );
    assert!(lines[2].starts_with("long-call ratio, 40 vs 5 sentences:"));
}
