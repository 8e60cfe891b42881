//! The harness of the `prompter run` tests: local fakes of Symbl and Nebula, the real binary
//! on the shipped `prompter-live.yaml`, its outputs as they are printed.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prompter_fakes::{NebulaFake, SymblFake};
use serde_json::{Value, json};

pub(crate) const WAIT: Duration = Duration::from_secs(20);
/// The feed's token-signing secret the engine under test gets.
pub(crate) const FEED_SECRET: &str = "the feed secret of the tests, 32 bytes+";

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

pub(crate) struct Fakes {
    pub(crate) symbl: SymblFake,
    pub(crate) nebula: NebulaFake,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) async fn fakes() -> Fakes {
    Fakes {
        symbl: SymblFake::start("app-id", "app-secret-value").await,
        nebula: NebulaFake::start("nebula-key-value").await,
        dir: tempfile::tempdir().unwrap(),
    }
}

impl Fakes {
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_prompter"));
        c.current_dir(root())
            .args(args)
            .env("SYMBL_APP_ID", "app-id")
            .env("SYMBL_APP_SECRET", "app-secret-value")
            .env("SYMBL_API_BASE", &self.symbl.api_base)
            .env("NEBULA_API_KEY", "nebula-key-value")
            .env("NEBULA_BASE_URL", &self.nebula.url)
            .env("PROMPTER_INDEX", self.dir.path().join("sales.json"))
            .env("PROMPTER_FEED_SECRET", FEED_SECRET)
            .env(
                "PROMPTER_FEEDBACK_LOG",
                self.dir.path().join("feedback.jsonl"),
            )
            .env_remove("SYMBL_UPDATES_URL")
            .env_remove("PROMPTER_LISTEN")
            .env("RUST_LOG", "warn");
        c
    }

    /// `prompter kb ingest` of the shipped knowledge base into the live store.
    pub(crate) fn ingest(&self) -> String {
        let out = self
            .command(&[
                "kb",
                "ingest",
                "pipelines/data/sales_objections.csv",
                "--store",
                "sales",
                "--config",
                "prompter-live.yaml",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    }

    pub(crate) fn run(&self, extra: &[&str], env: &[(&str, &str)]) -> Engine {
        self.run_with_config(Path::new("prompter-live.yaml"), extra, env)
    }

    /// `prompter run` on another engine config.
    pub(crate) fn run_with_config(
        &self,
        config: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Engine {
        let config = config.to_string_lossy().into_owned();
        let mut args = vec!["run", "--config", config.as_str()];
        args.extend_from_slice(extra);
        let mut cmd = self.command(&args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Engine::spawn(cmd)
    }
}

/// A running `prompter run`: its outputs as they are printed (with when they were read), and
/// its stderr.
pub(crate) struct Engine {
    child: Child,
    outputs: Arc<Mutex<Vec<(Instant, Value)>>>,
    stderr: Arc<Mutex<String>>,
}

impl Engine {
    pub(crate) fn spawn(mut cmd: Command) -> Engine {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let outputs = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (o, e) = (outputs.clone(), stderr.clone());
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let line = line.unwrap();
                let v: Value = serde_json::from_str(&line).expect("stdout is JSON lines");
                o.lock().unwrap().push((Instant::now(), v));
            }
        });
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let mut s = e.lock().unwrap();
                s.push_str(&line.unwrap());
                s.push('\n');
            }
        });
        Engine {
            child,
            outputs,
            stderr,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits until an output matches `pred`; returns it with when it was read.
    pub(crate) async fn output(
        &self,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(found) = self
                .outputs
                .lock()
                .unwrap()
                .iter()
                .find(|(_, v)| pred(v))
                .cloned()
            {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "no output {what} within {WAIT:?}; stderr:\n{}\noutputs:\n{:#?}",
                self.stderr(),
                self.outputs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until stderr contains `text`.
    pub(crate) async fn said(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stderr();
            if let Some(line) = s.lines().find(|l| l.contains(text)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "stderr never said {text:?}:\n{s}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn outputs(&self) -> Vec<Value> {
        self.outputs
            .lock()
            .unwrap()
            .iter()
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Sends SIGINT (Ctrl-C) and waits for the exit; returns the exit code.
    pub(crate) fn interrupt(self) -> (i32, String, Vec<Value>) {
        self.signal("INT")
    }

    /// Sends `signal` (`INT`, `TERM`) and waits for the exit; returns the exit code.
    pub(crate) fn signal(mut self, signal: &str) -> (i32, String, Vec<Value>) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + WAIT;
        let code = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code().unwrap_or(-1);
            }
            assert!(Instant::now() < deadline, "did not stop on SIG{signal}");
            std::thread::sleep(Duration::from_millis(20));
        };
        // Let the reader threads take the last lines.
        std::thread::sleep(Duration::from_millis(100));
        (code, self.stderr(), self.outputs())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

pub(crate) fn tracker(name: &str, phrase: &str, seq: u64) -> Value {
    json!({"type": "tracker_response", "sequenceNumber": seq, "isFinal": true, "trackers": [{
        "name": name,
        "matches": [{"type": "vocabulary", "value": phrase,
            "messageRefs": [{"id": format!("m{seq}"), "text": format!("Well, {phrase}."), "offset": 6}],
            "insightRefs": []}]}]})
}

pub(crate) fn said(who: &str, text: &str, seq: u64) -> Value {
    json!({"type": "message_response", "sequenceNumber": seq, "messages": [{
        "from": {"id": format!("{who}-id"), "name": who, "userId": format!("{who}@example.com")},
        "payload": {"content": text, "contentType": "text/plain"},
        "duration": {"startTime": "2026-11-22T10:00:00Z", "endTime": "2026-11-22T10:00:02Z"}}]})
}

pub(crate) fn question(text: &str, seq: u64) -> Value {
    json!({"type": "insight_response", "sequenceNumber": seq, "insights": [{
        "id": format!("q{seq}"), "confidence": 0.9, "type": "question",
        "payload": {"content": text, "contentType": "text/plain"},
        "from": {"id": "c-id", "name": "Customer", "userId": "customer@example.com"}}]})
}

pub(crate) fn is(v: &Value, conv: &str, pipeline: &str) -> bool {
    v["conversation_id"] == conv && v["pipeline"] == pipeline
}

pub(crate) fn complete(v: &Value) -> bool {
    v["status"] == "final"
}

/// Raw HTTP/1.1 request to the control endpoint (no client library needed for one request).
pub(crate) async fn http(method: &str, addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp
}
