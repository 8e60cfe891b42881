#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! `prompter bench --live-calls` end to end at a tiny scale: the real binary, its child
//! `prompter run` and `prompter kb ingest`, the fakes, three calls at a time at 30x real time
//! for a 1 s window; every event and output accounted for, and the report's fields present.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn three_live_calls_lose_and_duplicate_nothing() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .args([
            "bench",
            "--live-calls",
            "3",
            "--seconds",
            "1",
            "--speed",
            "30",
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("the bench did not end within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let r: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["calls"]["failed"], 0, "{r:#}");
    let placed = r["calls"]["placed"].as_u64().unwrap();
    // Four calibration calls, then at least one call per slot.
    assert!(placed >= 7, "{r:#}");
    assert_eq!(r["calls"]["completed"].as_u64(), Some(placed), "{r:#}");
    let events = &r["events"];
    assert!(events["expected"].as_u64().unwrap() > 0);
    assert_eq!(events["received"], events["expected"], "{r:#}");
    assert_eq!(events["lost"], 0);
    let outputs = &r["outputs"];
    assert_eq!(outputs["duplicated"], 0, "{r:#}");
    assert_eq!(outputs["cards"]["lost"], 0, "{r:#}");
    assert!(outputs["cards"]["expected"].as_u64().unwrap() >= placed);
    for pointer in [
        "/latency/engine/steady/p99_ms",
        "/latency/engine/whole_run/p50_ms",
        "/latency/wall/whole_run/max_ms",
        "/latency/by_pipeline/call_recap/wall/whole_run/count",
        "/engine/rss/idle_kib",
        "/engine/rss/loaded_mean_kib",
        "/engine/rss/vmhwm_kib",
        "/engine/rss/per_call_kib",
        "/engine/cpu/pct_of_core",
        "/setup/open_files_limit",
        "/nebula/chats",
    ] {
        assert!(r.pointer(pointer).is_some(), "no {pointer} in {r:#}");
    }
    // Every call ended with a recap, and the streamed answers came from the fake Nebula.
    assert!(r["nebula"]["chats"].as_u64().unwrap() > 0, "{r:#}");
    assert!(
        r["latency"]["by_pipeline"]["call_recap"]["engine"]["whole_run"]["count"]
            .as_u64()
            .unwrap()
            >= placed
    );
    assert!(
        stderr.contains("live bench: stopping the engine"),
        "{stderr}"
    );
}
