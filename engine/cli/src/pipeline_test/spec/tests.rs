#![allow(clippy::unwrap_used, reason = "tests")]

use super::*;

fn parse_text(dir: &Path, text: &str) -> (Option<TestFile>, String) {
    let path = dir.join("t.test.yaml");
    std::fs::write(&path, text).unwrap();
    let mut diags = Diagnostics::default();
    let parsed = parse(&path, text, &mut diags);
    (parsed, diags.render())
}

fn sandbox() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prompter.yaml"), "pipelines: []\n").unwrap();
    std::fs::write(dir.path().join("call.jsonl"), "").unwrap();
    dir
}

#[test]
fn reads_a_full_file() {
    let dir = sandbox();
    let (file, problems) = parse_text(
        dir.path(),
        r#"
env: { PROMPTER_LLM: offline }
tests:
  - name: recorded
    recording: call.jsonl
    expect:
      - { pipeline: rta, count: 2, text_contains: budget, degraded: false }
      - kind: summary
        status: any
        trigger: { event: conversation_completed, is_final: true, phrases: [a, b] }
  - name: inline
    conversation: c-1
    events:
      - offset_ms: 1000
        event: { type: tracker_response, isFinal: true, trackers: [{ name: Timing, matches: [{ value: "not now" }] }] }
      - event: { type: message, message: { type: conversation_completed } }
    expect:
      - { degraded: "would have missed", count: 0 }
"#,
    );
    assert_eq!(problems, "");
    let file = file.unwrap();
    assert_eq!(
        file.config.canonicalize().unwrap(),
        dir.path().join("prompter.yaml").canonicalize().unwrap()
    );
    assert_eq!(file.env.get("PROMPTER_LLM").unwrap(), "offline");
    let [recorded, inline] = &file.tests[..] else {
        panic!("two tests")
    };
    assert_eq!(recorded.recordings, [dir.path().join("call.jsonl")]);
    assert_eq!(recorded.expect[0].count, Some(2));
    assert_eq!(
        recorded.expect[0].checks,
        [
            Check::Status(StatusFilter::Is(Status::Final)),
            Check::Pipeline("rta".into()),
            Check::TextContains(vec!["budget".into()]),
            Check::Degraded(Degraded::No),
        ]
    );
    assert_eq!(
        recorded.expect[1].checks,
        [
            Check::Status(StatusFilter::Any),
            Check::Kind("summary".into()),
            Check::TriggerEvent("conversation_completed".into()),
            Check::TriggerIsFinal(true),
            Check::TriggerPhrases(vec!["a".into(), "b".into()]),
        ]
    );
    assert!(recorded.expect[0].at.ends_with("t.test.yaml:7:11"));
    assert!(recorded.expect[1].at.ends_with("t.test.yaml:8:9"));
    assert_eq!(inline.events.len(), 2);
    assert_eq!(&*inline.events[0].conversation, "c-1");
    assert_eq!(
        inline.events[1].offset_ms, 1000,
        "an event without offset_ms keeps the last"
    );
    assert_eq!(
        inline.events[0].frame["isFinal"],
        serde_json::Value::Bool(true)
    );
    assert_eq!(
        inline.expect[0].checks[1],
        Check::Degraded(Degraded::Containing("would have missed".into()))
    );
}

#[test]
fn every_problem_is_positioned() {
    let dir = sandbox();
    let (file, problems) = parse_text(
        dir.path(),
        "tests:\n  - name: a\n    recording: missing.jsonl\n    expect:\n      - { pipline: rta, count: x }\n  - name: a\n    events:\n      - { offset_ms: 5, event: { type: nonsense } }\n    expect: [{ status: done }]\n",
    );
    assert!(file.is_none());
    for want in [
        "t.test.yaml:3:16: error: recording `",
        "t.test.yaml:5:11: error: unknown key `pipline` in an expectation",
        "= help: did you mean `pipeline`?",
        "t.test.yaml:5:32: error: `count` must be a whole number, found `x`",
        "t.test.yaml:6:11: error: duplicate test name `a`",
        "t.test.yaml:8:32: error: not a Symbl frame the engine reads: unknown event type `nonsense`",
        "t.test.yaml:9:24: error: unknown status `done`",
    ] {
        assert!(problems.contains(want), "{want}\n---\n{problems}");
    }
}

#[test]
fn scalars_become_the_json_a_recording_would_carry() {
    let mut d = Diagnostics::default();
    let node = yaml::parse(
        Path::new("f"),
        "a: 1\nb: -2.5\nc: \"3\"\nd: true\ne: ~\nf: text\ng: 'false'\nh: [1, x]\ni: 1e3\nj: .inf\n",
        &mut d,
    )
    .unwrap();
    assert_eq!(
        to_json(&node),
        serde_json::json!({"a": 1, "b": -2.5, "c": "3", "d": true, "e": null, "f": "text",
                "g": "false", "h": [1, "x"], "i": 1000.0, "j": ".inf"})
    );
}

#[test]
fn the_config_is_the_nearest_one_up_unless_named() {
    let dir = sandbox();
    let nested = dir.path().join("pipelines/tests");
    std::fs::create_dir_all(&nested).unwrap();
    let (file, problems) = parse_text(
        &nested,
        "tests:\n  - { name: a, events: [{ event: { type: message_response, messages: [] } }], expect: [{}] }\n",
    );
    assert_eq!(problems, "");
    assert_eq!(
        file.unwrap().config.canonicalize().unwrap(),
        dir.path().join("prompter.yaml").canonicalize().unwrap()
    );
    let (_, problems) = parse_text(
        &nested,
        "config: ../nope.yaml\ntests:\n  - { name: a, events: [{ event: { type: message_response } }], expect: [{}] }\n",
    );
    assert!(
        problems.contains("t.test.yaml:1:9: error: engine config `"),
        "{problems}"
    );
}
