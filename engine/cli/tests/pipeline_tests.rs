#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! `prompter test`, the real binary: the shipped pipeline tests pass on the shipped pipelines;
//! a knowledge-base row changed under them fails with a readable diff; a malformed test file is
//! reported with its position and nothing runs; the docs' examples are real, passing test files.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `prompter ARGS` in `dir`, with none of the variables the shipped configs read set, so the
/// shell running the tests cannot change what they see.
fn prompter(dir: &Path, args: &[&str]) -> Ran {
    let out = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(dir)
        .args(args)
        .env_remove("PROMPTER_LLM")
        .env_remove("PROMPTER_KNOWLEDGE")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// The shipped engine configs and `pipelines/` (pipelines, knowledge bases, recordings, tests)
/// in a fresh folder. The Wasm plugins are not there (they live under `target/`), so the Wasm
/// tests are skipped in it, and so are the local model's (no `models/`).
fn checkout_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "prompter.yaml",
        "prompter-plugins.yaml",
        "prompter-local.yaml",
    ] {
        std::fs::copy(root().join(f), dir.path().join(f)).unwrap();
    }
    copy_dir(&root().join("pipelines"), &dir.path().join("pipelines"));
    dir
}

/// `file:line:col` of the first expectation written as `- <first>` followed by `<second>` (a
/// block mapping: the position is its first key's).
fn expectation_at(file: &str, text: &str, first: &str, second: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let i = lines
        .windows(2)
        .position(|w| w[0].trim_start() == format!("- {first}") && w[1].trim() == second)
        .unwrap_or_else(|| panic!("no `- {first}` then `{second}` in {file}"));
    let col = lines[i].find("- ").unwrap() + 3;
    format!("{file}:{}:{col}", i + 1)
}

#[test]
fn the_shipped_tests_pass_on_the_shipped_pipelines() {
    let r = prompter(&root(), &["test", "pipelines/"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let summary = r.stdout.lines().last().unwrap();
    assert!(summary.contains(" passed, 0 failed"), "{summary}");
    for line in [
        "ok   pipelines/tests/rta.test.yaml: the discovery call gets one card per objection, each with its guidance row (5 outputs, ",
        "ok   pipelines/tests/rta.test.yaml: the matched phrase picks the right row among a tracker's rows (2 outputs, ",
        "ok   pipelines/tests/open_questions.test.yaml: the discovery call's two questions end up on one card, in the order asked (5 outputs, ",
        "ok   pipelines/tests/open_questions.test.yaml: only questions are listed, each once, with who asked (1 output, ",
        "ok   pipelines/tests/call_recap.test.yaml: the renewal call's recap lists objections, the question, the action item and topics (5 outputs, ",
        "ok   pipelines/tests/call_recap.test.yaml: a short call gets a recap only once it completes (2 outputs, ",
        "ok   pipelines/tests/support_knowledge.test.yaml: a support call's late delivery and refund request get the support guidance (2 outputs, ",
    ] {
        assert!(r.stdout.contains(line), "{line}\n---\n{}", r.stdout);
    }
    // The Wasm pipelines' tests run when their components are built, and say why when not.
    let wasm_built = root()
        .join("target/wasm/wasm32-wasip2/release/escalation_gate.wasm")
        .exists();
    let wasm_line = if wasm_built {
        "ok   pipelines/tests/wasm.test.yaml: the billing dispute raises one escalation and one compliance alert (5 outputs, "
    } else {
        "skip pipelines/tests/wasm.test.yaml: the billing dispute raises one escalation and one compliance alert (missing `"
    };
    assert!(r.stdout.contains(wasm_line), "{}", r.stdout);
    // Knowledge assist runs when the local model is there (scripts/test.sh gets it; CI must).
    let model = root()
        .join("models/all-MiniLM-L6-v2/model.safetensors")
        .exists();
    assert!(model || std::env::var_os("CI").is_none(), "no model in CI");
    let assist_line = if model {
        "ok   pipelines/tests/knowledge_assist.test.yaml: a help-desk call's four questions get their four articles, small talk and repeats nothing ("
    } else {
        "skip pipelines/tests/knowledge_assist.test.yaml: a help-desk call's four questions get their four articles, small talk and repeats nothing (missing `"
    };
    assert!(r.stdout.contains(assist_line), "{}", r.stdout);
}

#[test]
fn every_shipped_offline_pipeline_has_a_test() {
    let mut tests = String::new();
    for e in std::fs::read_dir(root().join("pipelines/tests")).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".test.yaml") {
            tests.push_str(&std::fs::read_to_string(p).unwrap());
        }
    }
    // pipelines/live/ needs Nebula and Symbl (the test files say why); everything else runs
    // offline on prompter.yaml, prompter-plugins.yaml or prompter-local.yaml (the local model).
    for dir in ["pipelines", "pipelines/wasm", "pipelines/local"] {
        for e in std::fs::read_dir(root().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("pipeline: "))
                .unwrap()
                .trim();
            assert!(
                tests.contains(&format!("pipeline: {name}\n"))
                    || tests.contains(&format!("pipeline: {name},")),
                "no expectation names pipeline `{name}` ({})",
                p.display()
            );
        }
    }
}

#[test]
fn a_changed_knowledge_base_row_fails_with_a_readable_diff() {
    let dir = checkout_copy();
    let csv = dir.path().join("pipelines/data/sales_objections.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let old = "Offer a smaller starter package or a phased rollout and ask which budget cycle a purchase like this would fit into.";
    let new = "Offer a 30% discount if they sign this week.";
    assert!(text.contains(old));
    std::fs::write(&csv, text.replace(old, new)).unwrap();

    let r = prompter(dir.path(), &["test", "pipelines/"]);
    assert_eq!(r.code, 1, "{}\n{}", r.stdout, r.stderr);
    let rta = std::fs::read_to_string(dir.path().join("pipelines/tests/rta.test.yaml")).unwrap();
    let at = expectation_at(
        "pipelines/tests/rta.test.yaml",
        &rta,
        "pipeline: rta",
        "title: Budget Constraints",
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    let fail = lines
        .iter()
        .position(|l| l.starts_with("FAIL "))
        .unwrap_or_else(|| panic!("no FAIL line:\n{}", r.stdout));
    assert!(
        lines[fail].starts_with(
            "FAIL pipelines/tests/rta.test.yaml: the discovery call gets one card per objection, each with its guidance row (5 outputs, "
        ),
        "{}",
        r.stdout
    );
    let block: Vec<&str> = lines[fail + 1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .copied()
        .collect();
    let expected = [
        format!("     {at}: expected exactly 1 matching output, found 0"),
        "       want: pipeline \"rta\", title \"Budget Constraints\", text contains \"put a number on the cost of the current manual process\", \"smaller starter package or a phased rollout\", top source \"Budget Constraints: we don't have the budget for a new platform\", trigger.event \"tracker_response\", trigger.tracker \"Budget Constraints\", trigger.phrases include \"don't have the budget\", model \"offline\", not degraded".to_owned(),
        "       closest (1 of 5): acme-001/rta/k-budget-constraints (v1 final; rta suggestion \"Budget Constraints\")".to_owned(),
        "         same: status, pipeline, title, top_source, trigger.event, trigger.tracker, trigger.phrases, model, degraded".to_owned(),
        "         - expected text to contain \"smaller starter package or a phased rollout\"".to_owned(),
        format!("         + actual text: \"Acknowledge the constraint, then put a number on the cost of the current manual process (hours per week times loaded salary) so the price is weighed against real savings. {new}\""),
    ];
    assert_eq!(block, expected, "\n{}", r.stdout);
    // Only that test depends on the row; the Wasm tests (3) and knowledge assist's (5, no
    // model) cannot run in the copy.
    let summary = lines.last().unwrap();
    assert!(
        summary.starts_with("13 passed, 1 failed, 8 skipped ("),
        "{summary}"
    );
    assert!(r.stdout.contains(
        "skip pipelines/tests/wasm.test.yaml: an agent who gives the disclosure in time raises no compliance alert (missing `target/wasm/wasm32-wasip2/release/pii_redactor.wasm` and 2 more)\n"
    ), "{}", r.stdout);

    // The same failure as JSON.
    let r = prompter(
        dir.path(),
        &["test", "--json", "pipelines/tests/rta.test.yaml"],
    );
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(report["passed"], 5);
    assert_eq!(report["failed"], 1);
    let failed = &report["tests"][0];
    assert_eq!(failed["result"], "fail");
    assert_eq!(failed["outputs"], 5);
    assert_eq!(failed["failures"][0]["at"], at.as_str());
    assert_eq!(
        failed["failures"][0]["lines"][4],
        "    - expected text to contain \"smaller starter package or a phased rollout\""
    );
    assert_eq!(report["tests"][1]["result"], "ok");
}

#[test]
fn a_malformed_test_file_is_reported_with_its_position_and_nothing_runs() {
    let dir = checkout_copy();
    let bad = "\
config: ../../prompter.yaml
tests:
  - name: budget
    recording: ../recordings/acme-discovery-call.jsonl
    expect:
      - pipeline: rta
        text_contain: budget
  - name: inline
    events:
      - { offset_ms: 10, event: { type: tracker_respons } }
    expect: [{ count: many }]
";
    std::fs::write(dir.path().join("pipelines/tests/bad.test.yaml"), bad).unwrap();
    let r = prompter(dir.path(), &["test", "pipelines/"]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "", "no test runs");
    for want in [
        "pipelines/tests/bad.test.yaml:7:9: error: unknown key `text_contain` in an expectation\n  |\n7 |         text_contain: budget\n  |         ^^^^^^^^^^^^^\n  = help: did you mean `text_contains`?\n",
        "pipelines/tests/bad.test.yaml:10:33: error: not a Symbl frame the engine reads: unknown event type `tracker_respons`\n",
        "pipelines/tests/bad.test.yaml:11:23: error: `count` must be a whole number, found `many`\n",
        "error: 3 problem(s) in the test files; no test was run\n",
    ] {
        assert!(r.stderr.contains(want), "{want}\n---\n{}", r.stderr);
    }

    // A file that is fine but whose engine config does not load: its tests cannot run (2).
    std::fs::remove_file(dir.path().join("pipelines/tests/bad.test.yaml")).unwrap();
    std::fs::write(
        dir.path().join("pipelines/rta.yaml"),
        std::fs::read_to_string(root().join("pipelines/rta.yaml"))
            .unwrap()
            .replace("plugin: retrieve", "plugin: retreive"),
    )
    .unwrap();
    let r = prompter(dir.path(), &["test", "pipelines/tests/rta.test.yaml"]);
    assert_eq!(r.code, 2, "{}\n{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("pipelines/rta.yaml:20:13: error: unknown plugin `retreive`"),
        "{}",
        r.stderr
    );
    assert!(r.stdout.contains("err  pipelines/tests/rta.test.yaml: the discovery call gets one card per objection, each with its guidance row (not run: engine config `prompter.yaml` did not load)"), "{}", r.stdout);
    let summary = r.stdout.lines().last().unwrap();
    assert!(
        summary.starts_with("0 passed, 0 failed, 6 could not run ("),
        "{summary}"
    );
}

/// The docs' test-file examples (```` ```yml ```` blocks of docs/pipeline-tests.md) are real test
/// files that pass on the shipped pipelines, and the docs name every key the format accepts.
#[test]
fn the_docs_examples_run_and_every_key_is_documented() {
    let docs = std::fs::read_to_string(root().join("docs/pipeline-tests.md")).unwrap();
    for (level, keys) in prompter_cli::pipeline_test::format_keys() {
        for key in keys {
            assert!(
                docs.contains(&format!("`{key}`")),
                "docs/pipeline-tests.md does not describe the {level} key `{key}`"
            );
        }
    }
    let dir = checkout_copy();
    let tests = dir.path().join("pipelines/tests");
    for e in std::fs::read_dir(&tests).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let mut blocks = 0;
    let mut open: Option<String> = None;
    for line in docs.lines() {
        match (&mut open, line.trim_end()) {
            (None, "```yml") => open = Some(String::new()),
            (Some(text), "```") => {
                blocks += 1;
                std::fs::write(tests.join(format!("example-{blocks}.test.yaml")), text).unwrap();
                open = None;
            }
            (Some(text), l) => {
                text.push_str(l);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(blocks >= 3, "only {blocks} examples");
    let r = prompter(dir.path(), &["test", "pipelines/tests"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert!(r.stdout.contains(" 0 failed"), "{}", r.stdout);
}
