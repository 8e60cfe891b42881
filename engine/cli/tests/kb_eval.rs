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
    if !root().join("models/all-MiniLM-L6-v2").is_dir() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no model: scripts/test.sh gets it with scripts/get-model.sh models"
        );
        eprintln!("skipped: no model (scripts/get-model.sh models)");
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
        let (ok, stdout, stderr) = eval(&[
            labels,
            "--kb",
            kb,
            "--model-dir",
            "models/all-MiniLM-L6-v2",
            "--json",
        ]);
        assert!(ok, "{stderr}");
        let rows: Vec<Value> = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
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
