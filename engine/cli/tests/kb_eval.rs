#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! `prompter kb eval` on the shipped labelled queries: the local model (all-MiniLM-L6-v2,
//! fetched by `scripts/get-model.sh models`) against the built-in lexical embedder.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Whether the model is there (scripts/test.sh gets it; in CI it must be).
fn have_model() -> bool {
    if root().join("models/all-MiniLM-L6-v2").is_dir() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "no model: scripts/test.sh gets it with scripts/get-model.sh models"
    );
    eprintln!("skipped: no model (scripts/get-model.sh models)");
    false
}

/// `kb eval ARGS... --json`, which must succeed: one object per embedder.
fn eval_json(args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.push("--json");
    let (ok, stdout, stderr) = eval(&all);
    assert!(ok, "{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn eval(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(root())
        .args(["kb", "eval"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_local_model_finds_paraphrases_the_lexical_embedder_misses() {
    if !have_model() {
        return;
    }
    for (labels, kb) in [
        (
            "pipelines/data/sales_objections_eval.csv",
            "pipelines/data/sales_objections.csv",
        ),
        (
            "pipelines/data/alt_knowledge_eval.csv",
            "pipelines/data/alt_knowledge.csv",
        ),
    ] {
        let rows = eval_json(&[labels, "--kb", kb, "--model-dir", "models/all-MiniLM-L6-v2"]);
        let stdout = format!("{rows:#?}");
        assert_eq!(rows.len(), 2, "{stdout}");
        let (lexical, local) = (&rows[0], &rows[1]);
        assert_eq!(lexical["embedder"], "lexical");
        assert_eq!(local["embedder"], "all-MiniLM-L6-v2");
        eprintln!(
            "{labels}: top-1 lexical {} local {}; MRR lexical {} local {}",
            lexical["top1"], local["top1"], lexical["mrr"], local["mrr"]
        );
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
        // Clearly better: at least 25 points of top-1 and a higher mean reciprocal rank.
        assert!(
            f(local, "top1") >= f(lexical, "top1") + 0.25,
            "{labels}: {stdout}"
        );
        assert!(f(local, "mrr") > f(lexical, "mrr"), "{labels}: {stdout}");
        assert!(f(local, "top3") >= 0.8, "{labels}: {stdout}");
    }
}

/// The support articles behind knowledge assist, at the pipeline's `min_score` (0.35): most
/// questions get their article, small talk gets none, few get a wrong one.
#[test]
fn at_the_pipelines_min_score_questions_get_articles_and_small_talk_nothing() {
    if !have_model() {
        return;
    }
    let pipeline =
        std::fs::read_to_string(root().join("pipelines/local/knowledge_assist.yaml")).unwrap();
    assert!(pipeline.contains("min_score: ${PROMPTER_ASSIST_MIN_SCORE:-0.35}"));
    let rows = eval_json(&[
        "pipelines/data/support_articles_eval.csv",
        "--kb",
        "pipelines/data/support_articles.csv",
        "--model-dir",
        "models/all-MiniLM-L6-v2",
        "--min-score",
        "0.35",
    ]);
    let stdout = format!("{rows:#?}");
    let (lexical, local) = (&rows[0], &rows[1]);
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
    assert_eq!(
        (local["queries"].as_u64(), local["unrelated"].as_u64()),
        (Some(40), Some(12))
    );
    assert!(f(local, "top1") >= f(lexical, "top1") + 0.25, "{stdout}");
    assert!(f(local, "right_at_min_score") >= 0.75, "{stdout}");
    assert!(f(local, "wrong_at_min_score") <= 0.05, "{stdout}");
    assert!(
        (f(local, "unrelated_silent_at_min_score") - 1.0).abs() < 1e-9,
        "{stdout}"
    );
    // The window: small talk's best score stays under the pipeline's floor.
    assert!(f(local, "highest_unrelated_score") < 0.35, "{stdout}");
}

#[test]
fn unrelated_queries_count_apart_and_a_file_of_only_those_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.csv");
    std::fs::write(
        &labels,
        "query,expected\nit's too expensive,Budget Constraints\nhow was your weekend,\n",
    )
    .unwrap();
    let rows = eval_json(&[
        labels.to_str().unwrap(),
        "--kb",
        "pipelines/data/sales_objections.csv",
        "--min-score",
        "0.99",
    ]);
    let lexical = &rows[0];
    assert_eq!(lexical["queries"], 1);
    assert_eq!(lexical["unrelated"], 1);
    assert_eq!(lexical["top1"], 1.0);
    // Nothing scores 0.99: the right row is lost, the small talk silent.
    assert_eq!(lexical["right_at_min_score"], 0.0);
    assert_eq!(lexical["unrelated_silent_at_min_score"], 1.0);
    std::fs::write(&labels, "query,expected\nhow was your weekend,\n").unwrap();
    let (ok, _, stderr) = eval(&[
        labels.to_str().unwrap(),
        "--kb",
        "pipelines/data/sales_objections.csv",
    ]);
    assert!(!ok);
    assert!(stderr.contains("has no labelled queries"), "{stderr}");
}

#[test]
fn a_label_no_row_starts_with_is_an_error_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.csv");
    std::fs::write(
        &labels,
        "query,expected\nit's too expensive,Budget Constraints\nwhat now,Nonexistent Topic\n",
    )
    .unwrap();
    let (ok, _, stderr) = eval(&[
        labels.to_str().unwrap(),
        "--kb",
        "pipelines/data/sales_objections.csv",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("labels.csv:3: `Nonexistent Topic` is how no row"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Budget Constraints, Competitor Comparison"),
        "{stderr}"
    );
    std::fs::write(
        &labels,
        "query,expected\nit's too expensive,budget constraints\n",
    )
    .unwrap();
    let (ok, _, stderr) = eval(&[
        labels.to_str().unwrap(),
        "--kb",
        "pipelines/data/sales_objections.csv",
        "--embedder",
        "nebula",
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("no embedder `nebula`; there are: lexical"),
        "{stderr}"
    );
}

/// `prompter kb bench` measures what it says on a few texts (a smoke run; the figures in the
/// README come from a release build with the defaults).
#[test]
fn kb_bench_reports_latency_throughput_cost_and_engine_memory() {
    if !have_model() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let queries = dir.path().join("q.csv");
    std::fs::write(
        &queries,
        "query\nCan your tool talk to our CRM?\nHow much does it cost per person?\nIs there an iPhone app?\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(root())
        .args([
            "kb",
            "bench",
            "--rounds",
            "2",
            "--seconds",
            "0.3",
            "--batch",
            "4",
        ])
        .args(["--speed", "200", "--json", "--queries"])
        .arg(&queries)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    let f = |p: &str| r.pointer(p).and_then(Value::as_f64).unwrap();
    assert_eq!(r["texts"], 3);
    assert_eq!(r["single"]["count"], 6);
    assert!(f("/single/p50_ms") > 0.0 && f("/single/p50_ms") <= f("/single/p99_ms"));
    assert!(f("/batch/per_cpu_second") > 0.0, "{stdout}");
    assert!(f("/batch/usd_per_million") > 0.0, "{stdout}");
    // The model is ~90 MB of f32 weights: the process holds at least that once it is loaded.
    assert!(f("/model_rss_mib") > 80.0, "{stdout}");
    // The engine with the model replayed the help-desk call and printed its four cards; the
    // one without it has no knowledge assist and less memory.
    let engines = r["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2, "{stdout}");
    assert_eq!(engines[0]["knowledge_cards"], 4, "{stdout}");
    assert_eq!(engines[1]["knowledge_cards"], 0, "{stdout}");
    let rss = |e: &Value| e["peak_rss_mib"].as_f64().unwrap();
    assert!(rss(&engines[0]) > rss(&engines[1]) + 80.0, "{stdout}");
}

/// The default demo loads no model: in a folder with no `prompter.yaml` and no `models/` (its
/// embedded defaults), with no network, it plays the call and shows its cards.
#[test]
fn the_default_demo_runs_with_no_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(dir.path())
        .env_remove("PROMPTER_MODEL_DIR")
        .env("PROMPTER_LLM", "offline")
        .args(["demo", "--speed", "1000", "--no-color"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("Budget Constraints"), "{stdout}");
    assert!(!dir.path().join("models").exists());
}
