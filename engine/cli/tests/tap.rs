#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! `prompter tap` against a running `prompter run`: a live call's events and outputs, filtered,
//! and refused without the admin token.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{WAIT, fakes, tracker};

const ADMIN: &str = "admin-token-of-the-tap-tests";

/// A running `prompter tap`, its stdout lines as they come.
struct Tapping {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<Value>>>,
    connected: Arc<std::sync::atomic::AtomicBool>,
}

impl Tapping {
    fn start(url: &str, filters: &[&str], token: Option<&str>) -> Tapping {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_prompter"));
        cmd.args(["tap", "--url", url])
            .args(filters)
            .env_remove("PROMPTER_ADMIN_TOKEN")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            cmd.env("PROMPTER_ADMIN_TOKEN", t);
        }
        let mut child = cmd.spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let into = lines.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let v: Value = serde_json::from_str(&line.unwrap()).expect("JSON lines");
                into.lock().unwrap().push(v);
            }
        });
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = connected.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                if line.unwrap().starts_with("tapping ") {
                    flag.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        Tapping {
            child,
            lines,
            connected,
        }
    }

    async fn connected(&self) {
        let deadline = Instant::now() + WAIT;
        while !self.connected.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the tap never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !self.lines.lock().unwrap().iter().any(&pred) {
            assert!(
                Instant::now() < deadline,
                "the tap never showed {what}: {:#?}",
                self.lines.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Tapping {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_shows_a_live_calls_events_and_outputs_filtered_and_needs_the_admin_token() {
    let f = fakes().await;
    f.ingest();
    let engine = f.run(
        &["--listen", "127.0.0.1:0", "--connection", "conn-tap"],
        &[("PROMPTER_ADMIN_TOKEN", ADMIN)],
    );
    let line = engine.said("control endpoint listening on http://").await;
    let url = format!("http://{}", line.rsplit("http://").next().unwrap().trim());
    assert!(
        f.symbl
            .wait_subscribed("conn-tap", 1, Duration::from_secs(10))
            .await
    );

    // Without the token, or with a wrong one: refused, saying why.
    let none = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .args(["tap", "--url", &url])
        .env_remove("PROMPTER_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&none.stderr).contains("PROMPTER_ADMIN_TOKEN"));
    let wrong = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .args(["tap", "--url", &url])
        .env("PROMPTER_ADMIN_TOKEN", "wrong")
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("refused the admin token"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    let everything = Tapping::start(&url, &["--conversation", "conn-tap"], Some(ADMIN));
    let cards = Tapping::start(&url, &["--pipeline", "rta_live"], Some(ADMIN));
    let other = Tapping::start(&url, &["--conversation", "another-call"], Some(ADMIN));
    // The taps are connected before the call speaks.
    for t in [&everything, &cards, &other] {
        t.connected().await;
    }
    f.symbl.push(
        "conn-tap",
        tracker("Budget Constraints", "too expensive", 1),
    );
    everything
        .wait_for("the tracker event", |v| {
            v["type"] == "event"
                && v["event"]["kind"] == "tracker_response"
                && v["event"]["conversation_id"] == "conn-tap"
        })
        .await;
    everything
        .wait_for("the suggestion", |v| {
            v["type"] == "output"
                && v["output"]["pipeline"] == "rta_live"
                && v["output"]["status"] == "final"
        })
        .await;
    cards
        .wait_for("the suggestion", |v| {
            v["type"] == "output" && v["output"]["status"] == "final"
        })
        .await;
    assert!(
        cards
            .lines
            .lock()
            .unwrap()
            .iter()
            .all(|v| v["type"] == "output" && v["output"]["pipeline"] == "rta_live"),
        "a pipeline filter shows that pipeline's outputs only"
    );
    assert!(other.lines.lock().unwrap().is_empty());
    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
}
