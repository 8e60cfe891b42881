#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! Hot reload of a running `prompter run`: the admin endpoint (bearer token, JSON report, 422
//! with the diagnostics for an invalid config), SIGHUP, and `--watch`.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{fakes, root};

const ADMIN: &str = "admin-token-of-the-reload-tests";

fn note(text: &str) -> String {
    format!(
        "pipeline: note\non: [conversation_completed]\nstages:\n  - id: say\n    plugin: {text}\n    config:\n      kind: note\n      text: hello\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_engine_reloads_on_request_on_sighup_and_on_change_and_refuses_a_bad_config() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let f = fakes().await;
    f.ingest();
    // The shipped live config, plus a folder of extra pipelines this test edits.
    let dir = tempfile::tempdir().unwrap();
    let extra = dir.path().join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("note.yaml"), note("notify")).unwrap();
    let live = std::fs::read_to_string(root().join("prompter-live.yaml"))
        .unwrap()
        .replace(
            "  - pipelines/call_recap.yaml",
            &format!(
                "  - pipelines/call_recap.yaml\n  - {}/*.yaml",
                extra.display()
            ),
        )
        .replace("pipelines/", &format!("{}/pipelines/", root().display()));
    let config = dir.path().join("prompter.yaml");
    std::fs::write(&config, live).unwrap();
    let engine = f.run_with_config(
        &config,
        &["--listen", "127.0.0.1:0", "--watch"],
        &[("PROMPTER_ADMIN_TOKEN", ADMIN)],
    );
    let line = engine.said("control endpoint listening on http://").await;
    let addr = line.rsplit("http://").next().unwrap().trim().to_owned();
    let http = reqwest::Client::new();
    let reload = |token: Option<&str>| {
        let mut r = http.post(format!("http://{addr}/admin/reload"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };

    assert_eq!(reload(None).await.unwrap().status(), 401);
    assert_eq!(reload(Some("wrong")).await.unwrap().status(), 401);
    let ok = reload(Some(ADMIN)).await.unwrap();
    assert_eq!(ok.status(), 200);
    let report: Value = serde_json::from_str(&ok.text().await.unwrap()).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["generation"], 2);

    // An invalid config: refused with where and why; the old one keeps serving.
    std::fs::write(extra.join("note.yaml"), note("notiffy")).unwrap();
    let bad = reload(Some(ADMIN)).await.unwrap();
    assert_eq!(bad.status(), 422);
    let report: Value = serde_json::from_str(&bad.text().await.unwrap()).unwrap();
    assert_eq!(report["ok"], false);
    assert_eq!(report["generation"], 2);
    let problems = report["diagnostics"].to_string();
    assert!(
        problems.contains("note.yaml:5:13: error: unknown plugin `notiffy`"),
        "{problems}"
    );
    // --watch saw the same change and refused it too (or will): say it, never apply it.
    engine.said("error: reload (a file changed) refused").await;

    // Fixed: --watch applies it.
    std::fs::write(extra.join("note.yaml"), note("notify")).unwrap();
    engine.said("reloaded (a file changed): generation 3").await;
    // SIGHUP.
    let status = std::process::Command::new("kill")
        .args(["-HUP", &engine.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    engine.said("reloaded (SIGHUP): generation 4").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let metrics = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("prompter_config_reloads_total{result=\"ok\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("prompter_config_reloads_total{result=\"rejected\"} 2"),
        "{metrics}"
    );
    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains(ADMIN), "{stderr}");
}
