#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! `prompter bench --live-calls` end to end at a tiny scale: the real binary, its child
//! `prompter run` and `prompter kb ingest`, the fakes, three calls at a time at 30x real time
//! for a 1 s window; every event and output accounted for, and the report's fields present.
//! Then every `--fault`, each on its own small bench, all at once (about a minute).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Starts `prompter bench` with `args` (plus `--json`).
fn bench(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_prompter"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The bench's report once it ended (killed after `limit`), asserting it exited 0; and its
/// stderr.
fn report(mut child: std::process::Child, limit: Duration, what: &str) -> (Value, String) {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("{what}: the bench did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    (serde_json::from_str(stdout.trim()).unwrap(), stderr)
}

#[test]
fn three_live_calls_lose_and_duplicate_nothing() {
    let child = bench(&["--live-calls", "3", "--seconds", "1", "--speed", "30"]);
    let (r, stderr) = report(child, Duration::from_secs(120), "no fault");
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

/// Every fault, each on its own bench at once (4 calls at 20x real time, the shortest fault
/// window): each run accounts for every event and output (the bench exits 0 only then), and
/// the fault was felt where it should be.
#[test]
fn every_fault_is_injected_and_accounted_for() {
    let faults = [
        "subscribe-drop",
        "half-open",
        "token-storm",
        "llm-5xx",
        "llm-timeout",
        "llm-stall",
        "embed-5xx",
        "embed-timeout",
        "sink-stall",
        "pause",
        "terminate",
    ];
    let children: Vec<_> = faults
        .iter()
        .map(|f| {
            let args = [
                "--live-calls",
                "4",
                "--speed",
                "20",
                "--seconds",
                "30",
                "--fault",
                f,
            ];
            (*f, bench(&args))
        })
        .collect();
    for (fault, child) in children {
        let (r, _) = report(child, Duration::from_secs(240), fault);
        assert_eq!(r["ok"], true, "{fault}: {r:#}");
        let f = &r["fault"];
        assert_eq!(f["kind"], fault);
        let n = |p: &str| f.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        let felt = match fault {
            "subscribe-drop" | "half-open" => {
                n("/injected/sockets_dropped_or_frozen") > 0
                    && r["calls"]["reconnects"].as_u64().unwrap_or(0) > 0
            }
            "token-storm" => {
                n("/injected/token_requests_refused") > 0 && n("/injected/subscribes_refused") > 0
            }
            "llm-5xx" | "llm-timeout" | "llm-stall" => {
                n("/injected/requests_failed_held_or_stalled") > 0
                    && n("/engine_says/chat_fallbacks") > 0
            }
            "embed-5xx" | "embed-timeout" => {
                n("/injected/requests_failed_held_or_stalled") > 0
                    && n("/engine_says/outputs_degraded") > 0
            }
            "sink-stall" => {
                n("/injected/requests_failed_held_or_stalled") > 0
                    && n("/sink/missing") == 0
                    && n("/sink/outputs_final") > 0
                    && n("/sink/delivered") > 0
            }
            "pause" => f["lasted_s"].as_f64().is_some_and(|s| s >= 4.5),
            "terminate" => {
                f["stopped"]["outputs_printed"] == f["stopped"]["outputs_read"]
                    && f["stopped"]["events"] == r["events"]["expected"]
            }
            _ => unreachable!(),
        };
        assert!(felt, "{fault}: the fault was not felt: {f:#}");
    }
}
