//! What the load benches ([`crate::twilio_bench`], [`crate::live_bench`]) share: the engine
//! under test as a child process (`prompter run` of this same binary, its stdout and stderr
//! read on their own threads), the Symbl credentials it is given and the fake token endpoint
//! that accepts them, the fakes' servers and runtimes, the `/proc` figures, and the latency
//! spreads of the reports.
//!
//! It owns no fake's protocol (each bench fakes its own services) and no report.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::bench::pct;

/// The Symbl app the child is given (`SYMBL_APP_ID`) and the fake token endpoint accepts.
pub(crate) const APP_ID: &str = "bench-app";
/// Its secret (`SYMBL_APP_SECRET`).
pub(crate) const APP_SECRET: &str = "bench-app-secret";
/// The access token the fake token endpoint issues and the fake sockets require.
pub(crate) const SYMBL_TOKEN: &str = "symbl-access-token-of-the-bench";
/// How long the child may take to print its address.
const PORT_WAIT: Duration = Duration::from_secs(20);
/// How long the child may take to exit after SIGTERM.
const EXIT_WAIT: Duration = Duration::from_secs(30);
/// Stderr lines kept for the report; the rest are only counted (a run of many calls prints a
/// few notices per call).
const STDERR_KEPT: usize = 100_000;
/// Warning and error lines quoted in a report.
const FIRST_COMPLAINTS: usize = 5;
/// Listen backlog of the fakes' servers: tokio's `TcpListener::bind` uses 128, too few for
/// thousands of connects in a burst (`net.core.somaxconn` caps it).
const BACKLOG: u32 = 4096;

/// Symbl's token endpoint (`POST /oauth2/token:generate`): a token for the bench's app, 401
/// with Symbl's message for anything else.
pub(crate) async fn token(body: axum::body::Bytes) -> Response {
    token_answer(&body, || SYMBL_TOKEN.to_owned())
}

/// The token endpoint's answer to `body`: `issue()`'s token for the bench's app, 401 with
/// Symbl's message for anything else (nothing is issued then).
pub(crate) fn token_answer(body: &[u8], issue: impl FnOnce() -> String) -> Response {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    if v["type"] == "application" && v["appId"] == APP_ID && v["appSecret"] == APP_SECRET {
        axum::Json(json!({"accessToken": issue(), "expiresIn": 86_400})).into_response()
    } else {
        let message = json!({"message": "Combination of appId and appSecret is not valid."});
        (StatusCode::UNAUTHORIZED, axum::Json(message)).into_response()
    }
}

/// Sends `signal` (`-STOP`, `-TERM`, ...) to process `pid` with `kill`; whether it was sent.
pub(crate) fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

/// This program (the child is this same binary).
///
/// # Errors
/// When the running executable cannot be found.
pub(crate) fn this_program() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))
}

/// `prompter run --config CONFIG --listen 127.0.0.1:0` of this binary, with the bench's Symbl
/// credentials and `RUST_LOG=warn`; the bench adds its own environment.
///
/// # Errors
/// When the running executable cannot be found.
pub(crate) fn run_command(config: &Path) -> Result<Command, String> {
    let mut command = Command::new(this_program()?);
    command
        .args(["run", "--config"])
        .arg(config)
        .args(["--listen", "127.0.0.1:0"])
        .env("SYMBL_APP_ID", APP_ID)
        .env("SYMBL_APP_SECRET", APP_SECRET)
        .env("RUST_LOG", "warn");
    Ok(command)
}

/// What the engine printed on stderr: its first [`STDERR_KEPT`] lines, and counts over all.
#[derive(Debug, Clone, Default)]
pub(crate) struct StderrLog {
    /// The first lines.
    pub(crate) lines: Vec<String>,
    /// Every line.
    pub(crate) total: u64,
    /// Warning and error lines.
    pub(crate) complaints: u64,
    /// The first few of them.
    pub(crate) first_complaints: Vec<String>,
    /// The engine's last word when it stops (`stopped: N event(s), ...`), wherever it comes.
    pub(crate) stopped: Option<String>,
}

impl StderrLog {
    fn push(&mut self, line: String) {
        self.total += 1;
        if line.starts_with("stopped: ") {
            self.stopped = Some(line.clone());
        }
        let complaint =
            line.contains(" WARN ") || line.contains(" ERROR ") || line.starts_with("error");
        if complaint {
            self.complaints += 1;
            if self.first_complaints.len() < FIRST_COMPLAINTS {
                self.first_complaints.push(line.clone());
            }
        }
        if self.lines.len() < STDERR_KEPT {
            self.lines.push(line);
        }
    }

    /// The rest of the first kept line that contains `what`, from `what` on.
    pub(crate) fn find(&self, what: &str) -> Option<String> {
        self.lines
            .iter()
            .find_map(|l| l.find(what).map(|i| l[i..].to_owned()))
    }
}

/// The engine under test, killed if still running when dropped.
pub(crate) struct Engine {
    child: Child,
    /// Its process id.
    pub(crate) pid: u32,
    stderr: Arc<Mutex<StderrLog>>,
    stdout_lines: Arc<AtomicU64>,
    readers: Vec<std::thread::JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Engine {
    /// Starts `command` with piped output: each stdout line is counted and handed to
    /// `on_stdout` (on the `engine-stdout` thread, so its CPU time can be told apart); stderr
    /// goes to a [`StderrLog`].
    ///
    /// # Errors
    /// When the process cannot be started.
    pub(crate) fn spawn(
        mut command: Command,
        mut on_stdout: impl FnMut(&str) + Send + 'static,
    ) -> Result<Engine, String> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                let program = Path::new(command.get_program());
                format!("cannot start `{}`: {e}", program.display())
            })?;
        let stderr = Arc::new(Mutex::new(StderrLog::default()));
        let stdout_lines = Arc::new(AtomicU64::new(0));
        let mut readers = Vec::new();
        let thread = |name: &str| std::thread::Builder::new().name(name.to_owned());
        if let Some(out) = child.stdout.take() {
            let n = stdout_lines.clone();
            let reader = thread("engine-stdout").spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    on_stdout(&line);
                    n.fetch_add(1, Ordering::Relaxed);
                }
            });
            readers.extend(reader.ok());
        }
        if let Some(err) = child.stderr.take() {
            let log = stderr.clone();
            let reader = thread("engine-stderr").spawn(move || {
                for line in BufReader::new(err).lines().map_while(Result::ok) {
                    lock(&log).push(line);
                }
            });
            readers.extend(reader.ok());
        }
        if readers.len() < 2 {
            let _ = child.kill();
            let _ = child.wait();
            return Err("cannot start the threads that read the engine's output".into());
        }
        Ok(Engine {
            pid: child.id(),
            child,
            stderr,
            stdout_lines,
            readers,
            exited: None,
        })
    }

    /// What the engine printed on stderr so far.
    pub(crate) fn stderr(&self) -> StderrLog {
        lock(&self.stderr).clone()
    }

    /// Lines printed on stdout so far.
    pub(crate) fn stdout_lines(&self) -> u64 {
        self.stdout_lines.load(Ordering::Relaxed)
    }

    /// The server's address, once printed.
    ///
    /// # Errors
    /// When the engine exits first or prints nothing within [`PORT_WAIT`].
    pub(crate) async fn address(&mut self) -> Result<String, String> {
        let deadline = Instant::now() + PORT_WAIT;
        loop {
            if let Some(l) = lock(&self.stderr).find("control endpoint listening on http://") {
                return Ok(l.rsplit("http://").next().unwrap_or("").trim().to_owned());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                self.join_readers().await;
                return Err(format!(
                    "the engine exited ({status}) before listening:\n{}",
                    self.stderr().lines.join("\n")
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the engine printed no address within {} s:\n{}",
                    PORT_WAIT.as_secs(),
                    self.stderr().lines.join("\n")
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn join_readers(&mut self) {
        let readers = std::mem::take(&mut self.readers);
        let _ = tokio::task::spawn_blocking(move || {
            for r in readers {
                let _ = r.join();
            }
        })
        .await;
    }

    /// SIGTERM, then waits for the exit and for the last of its output to be read; the exit
    /// status, or why there is none.
    pub(crate) async fn terminate(&mut self) -> Result<ExitStatus, String> {
        if !signal(self.pid, "-TERM") {
            let _ = self.child.kill();
        }
        let deadline = Instant::now() + EXIT_WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exited = Some(status);
                    self.join_readers().await;
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    return Err(format!(
                        "the engine did not exit within {} s of SIGTERM (killed)",
                        EXIT_WAIT.as_secs()
                    ));
                }
                Err(e) => return Err(format!("cannot wait for the engine: {e}")),
            }
        }
    }
}

/// CPU clock ticks (user+sys) of the child, of this whole process, and of this process's
/// threads with the names asked for (in their order; threads sharing a name add up).
#[derive(Debug, Clone, Default)]
pub(crate) struct Cpu {
    pub(crate) child: u64,
    pub(crate) bench: u64,
    pub(crate) threads: Vec<u64>,
}

/// The CPU ticks of process `pid`, of this process and of its threads named `threads`.
pub(crate) fn cpu_now(pid: u32, threads: &[&str]) -> Cpu {
    let ticks = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| crate::bench::procfs::stat_ticks(&s))
            .map_or(0, |(_, t)| t)
    };
    let mut cpu = Cpu {
        child: ticks(&format!("/proc/{pid}/stat")),
        bench: ticks("/proc/self/stat"),
        threads: vec![0; threads.len()],
    };
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            if let Some((comm, n)) = std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| crate::bench::procfs::stat_ticks(&s))
                && let Some(i) = threads.iter().position(|name| *name == comm)
            {
                cpu.threads[i] += n;
            }
        }
    }
    cpu
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
pub(crate) fn memory(pid: u32) -> (u64, u64) {
    crate::bench::procfs::memory_kib(&pid.to_string())
}

/// Clock ticks per second (`getconf CLK_TCK`), and whether it was read rather than assumed.
pub(crate) fn clock_ticks() -> (f64, bool) {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .map_or((100.0, false), |t| (t, true))
}

/// Raises this process's soft limit on open files to its hard limit (children started later
/// inherit it), with util-linux's `prlimit`; the soft limit after, or `None` when unlimited
/// or unreadable.
pub(crate) fn raise_open_files_limit() -> Option<u64> {
    let (soft, hard) = crate::bench::procfs::open_files_limits();
    if let (Some(s), Some(h)) = (soft, hard)
        && s < h
    {
        // A failure leaves the limit as it was, which the caller checks.
        let _ = Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={h}:{h}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    crate::bench::procfs::open_files_limit()
}

/// p50, p90, p99 and max of sorted microseconds, in milliseconds.
pub(crate) fn spread(v: &[u64]) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({"count": v.len(), "p50_ms": ms(pct(v, 50.0)), "p90_ms": ms(pct(v, 90.0)),
        "p99_ms": ms(pct(v, 99.0)), "max_ms": ms(v.last().copied().unwrap_or(0))})
}

/// A [`spread`] as text: `p50 … ms, p90 …, p99 …, max … (N what)`.
pub(crate) fn spread_text(s: &Value, what: &str) -> String {
    let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} {what})",
        f("p50_ms"),
        f("p90_ms"),
        f("p99_ms"),
        f("max_ms"),
        s["count"]
    )
}

/// Closes a fake's socket as a server does when it is done: a close frame with code 1000,
/// then up to 2 s for the peer's close frame.
pub(crate) async fn close_normally(socket: &mut axum::extract::ws::WebSocket) {
    use axum::extract::ws::{CloseFrame, Message};
    let close = CloseFrame {
        code: 1000,
        reason: "".into(),
    };
    if socket.send(Message::Close(Some(close))).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(m)) = socket.recv().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Reads a report's figures by JSON pointer, for its text form: 0 or "" when absent.
pub(crate) struct Figures<'a>(pub(crate) &'a Value);

impl Figures<'_> {
    pub(crate) fn f(&self, pointer: &str) -> f64 {
        self.0
            .pointer(pointer)
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    }

    pub(crate) fn u(&self, pointer: &str) -> u64 {
        self.0.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
    }

    pub(crate) fn s(&self, pointer: &str) -> String {
        self.0
            .pointer(pointer)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    }

    /// A figure in KiB, in MiB.
    pub(crate) fn mib(&self, pointer: &str) -> f64 {
        self.f(pointer) / 1024.0
    }
}

/// A runtime of one worker thread named `name`, so its CPU time can be read apart.
///
/// # Errors
/// When the runtime cannot be built.
pub(crate) fn single_thread_runtime(name: &str) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the `{name}` runtime: {e}"))
}

/// Serves `app` on `127.0.0.1`, an ephemeral port, with a [`BACKLOG`]-deep listen queue, on
/// `rt`; its address.
///
/// # Errors
/// When the socket cannot be bound.
pub(crate) async fn serve(
    rt: &tokio::runtime::Runtime,
    app: axum::Router,
    what: &str,
) -> Result<SocketAddr, String> {
    let listening = rt.spawn(async move {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(BACKLOG)?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok::<_, std::io::Error>(addr)
    });
    listening
        .await
        .map_err(|e| format!("the fake {what} did not start: {e}"))?
        .map_err(|e| format!("the fake {what} cannot listen: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stderr_log_counts_every_line_and_complaint_but_keeps_a_bounded_few() {
        let mut log = StderrLog::default();
        for i in 0..STDERR_KEPT + 10 {
            log.push(format!("line {i}"));
        }
        log.push("2026-01-01T00:00:00Z  WARN prompter: Retrying call.".into());
        log.push("error: lost connection x".into());
        assert_eq!(log.total, STDERR_KEPT as u64 + 12);
        assert_eq!(log.lines.len(), STDERR_KEPT);
        assert_eq!(log.complaints, 2);
        assert_eq!(log.first_complaints.len(), 2);
        assert_eq!(log.find("line 7").as_deref(), Some("line 7"));
    }

    #[test]
    fn spreads_read_as_milliseconds() {
        let s = spread(&[1_000, 2_000, 3_000]);
        assert_eq!(s["count"], 3);
        assert_eq!(s["max_ms"], 3.0);
        assert!(spread_text(&s, "outputs").ends_with("max 3.00 ms (3 outputs)"));
    }
}
