//! `prompter plugin new` then `prompter plugin test`, as a plugin author would run them from a
//! clean checkout: the scaffold passes its own tests, builds as a component, and runs.

use std::path::Path;
use std::process::Command;

use crate::cli::{prompter, root};

fn cargo(dir: &Path, args: &[&str], target_dir: &Path) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args)
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(dir);
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn scaffolded_plugin_builds_passes_its_tests_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let r = prompter(&[
        "plugin",
        "new",
        "keyword-alert",
        "--dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let krate = dir.path().join("keyword-alert");
    // Shared target folders keep the dependencies compiled once across runs.
    cargo(
        &krate,
        &["test", "--quiet"],
        &root().join("target/scaffold"),
    );
    let wasm_target = root().join("target/wasm");
    cargo(
        &krate,
        &["build", "--release", "--quiet", "--target", "wasm32-wasip2"],
        &wasm_target,
    );
    let module = wasm_target.join("wasm32-wasip2/release/keyword_alert.wasm");
    let r = prompter(&[
        "plugin",
        "test",
        module.to_str().unwrap(),
        "--config",
        krate.join("config.yaml").to_str().unwrap(),
        "--events",
        krate.join("events.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<serde_json::Value> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let results: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["type"] == "continue").collect();
    assert_eq!(results.len(), 3, "{}", r.stdout);
    assert_eq!(
        results[1]["value"]["matched"],
        serde_json::json!(["cancel", "refund"])
    );
    let alerts: Vec<&str> = lines
        .iter()
        .filter(|l| l["type"] == "output")
        .map(|l| l["output"]["title"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        ["Customer said \"cancel\"", "Customer said \"refund\""]
    );
    assert!(r.stderr.contains("3 call(s), 0 error(s)"), "{}", r.stderr);
}
