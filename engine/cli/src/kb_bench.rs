//! `prompter kb bench`: what the local embedder costs on this machine.
//!
//! Three measurements, in this order, each reported with the command's settings:
//! 1. **Query latency**: every query text embedded alone, uncached, the way a `retrieve` stage
//!    pays for a new sentence (through the embedder's blocking-thread path), for `--rounds`
//!    rounds over the texts: p50, p99 and max.
//! 2. **Throughput**: the texts in batches of `--batch`, for `--seconds`: texts per second of
//!    wall time, and texts per CPU-second of the process (per core, whatever the number of
//!    threads candle uses; `RAYON_NUM_THREADS=1` pins it to one), and from that the cost of a
//!    million embeddings at `--core-hour-usd`.
//! 3. **Engine memory**: `prompter replay` of a call as a child process, once with the engine
//!    config that loads the model (`--config`, default `prompter-local.yaml`) and once with the
//!    one that does not (`--baseline`, default `prompter.yaml`); the peak resident set of each
//!    (`VmHWM`, read from `/proc` while it runs), and the engine time of each knowledge-assist
//!    card the replay printed.
//!
//! It is a command, not a test: the figures depend on the machine and what else runs on it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prompter_core::resource::Embedder;
use prompter_plugin_local_embed::{LocalModel, LocalModelEmbedder};
use serde_json::{Value, json};

use crate::bench::{pct, procfs};
use crate::cli::{Stream, say};

/// Options of `prompter kb bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The model folder (see scripts/get-model.sh).
    #[arg(long, default_value = "models/all-MiniLM-L6-v2", value_name = "DIR")]
    pub model_dir: PathBuf,
    /// CSV files whose first column holds the query texts (a header row first)
    /// [default: pipelines/data/*_eval.csv].
    #[arg(long = "queries", value_name = "CSV")]
    pub queries: Vec<PathBuf>,
    /// Rounds of single-query embeddings over the texts.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Texts per model call in the throughput pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Length of the throughput pass, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Price of one core-hour, in US dollars, for the cost per million embeddings [default:
    /// an on-demand cloud vCPU, about $0.09 an hour for two].
    #[arg(long, default_value_t = 0.045)]
    pub core_hour_usd: f64,
    /// Engine config that loads the model, for the memory run (nothing to compare: `none`).
    #[arg(long, default_value = "prompter-local.yaml")]
    pub config: PathBuf,
    /// Engine config without the model, for the memory run's comparison.
    #[arg(long, default_value = "prompter.yaml")]
    pub baseline: PathBuf,
    /// The call the memory runs replay.
    #[arg(
        long,
        default_value = "pipelines/recordings/local/helpdesk-questions-call.jsonl"
    )]
    pub call: PathBuf,
    /// Replay speed of the memory runs (the call's length divided by this is how long each
    /// engine runs).
    #[arg(long, default_value_t = 20.0)]
    pub speed: f64,
    /// One JSON object instead of the report.
    #[arg(long)]
    pub json: bool,
}

/// Runs `prompter kb bench`; returns the exit code.
pub async fn bench(args: BenchArgs, out: &Stream, err: &Stream) -> u8 {
    match run(&args, out, err).await {
        Ok(()) => 0,
        Err(e) => {
            say(err, &format!("error: {e}"));
            1
        }
    }
}

/// Query texts: the first column of each CSV, header skipped, duplicates dropped.
fn read_queries(files: &[PathBuf]) -> Result<Vec<String>, String> {
    let mut texts: Vec<String> = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).map_err(|e| format!("cannot read `{}`: {e}", f.display()))?;
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .from_reader(bytes.as_slice());
        for record in reader.records() {
            let record = record.map_err(|e| format!("`{}`: {e}", f.display()))?;
            let text = record.get(0).map(str::trim).unwrap_or("");
            if !text.is_empty() && !texts.iter().any(|t| t == text) {
                texts.push(text.to_owned());
            }
        }
    }
    if texts.is_empty() {
        return Err("no query texts in the --queries files".into());
    }
    Ok(texts)
}

fn default_queries() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir("pipelines/data")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.to_string_lossy().ends_with("_eval.csv"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// This process's CPU time (user + system), from `/proc/self/stat` at 100 ticks a second.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| procfs::stat_ticks(&s))
        .map_or(0.0, |(_, ticks)| ticks as f64 / 100.0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// What one engine child process used.
struct EngineRun {
    peak_kib: u64,
    card_us: Vec<u64>,
    cards: usize,
    wall: Duration,
}

/// Replays `call` with `config` in a child `prompter replay`, reading its memory every 20 ms.
async fn engine_run(config: &Path, call: &Path, speed: f64) -> Result<EngineRun, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .arg("replay")
        .arg("--config")
        .arg(config)
        .args(["--realtime", "--speed", &speed.to_string()])
        .arg(call)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start `prompter replay`: {e}"))?;
    let pid = child.id().map(|p| p.to_string()).unwrap_or_default();
    // Both pipes are drained while the child runs, so neither fills and stalls it.
    let drain = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
        tokio::spawn(async move {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                use tokio::io::AsyncReadExt;
                let _ = p.read_to_string(&mut text).await;
            }
            text
        })
    };
    let stdout_reader = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr_reader = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let mut peak = 0;
    let status = loop {
        let (_, hwm) = procfs::memory_kib(&pid);
        peak = peak.max(hwm);
        match tokio::time::timeout(Duration::from_millis(20), child.wait()).await {
            Ok(status) => break status.map_err(|e| e.to_string())?,
            Err(_) => continue,
        }
    };
    let wall = started.elapsed();
    let stdout = stdout_reader.await.unwrap_or_default();
    let stderr = stderr_reader.await.unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "`prompter replay --config {}` failed: {}",
            config.display(),
            stderr.trim()
        ));
    }
    let outputs: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut card_us: Vec<u64> = outputs
        .iter()
        .filter(|o| o["pipeline"] == "knowledge_assist")
        .filter_map(|o| o["timings"]["total_us"].as_u64())
        .collect();
    card_us.sort_unstable();
    Ok(EngineRun {
        peak_kib: peak,
        cards: card_us.len(),
        card_us,
        wall,
    })
}

async fn run(args: &BenchArgs, out: &Stream, err: &Stream) -> Result<(), String> {
    if !(1..=1024).contains(&args.batch) {
        return Err(format!(
            "--batch must be between 1 and 1024, got {}",
            args.batch
        ));
    }
    if !(1..=1000).contains(&args.rounds) {
        return Err(format!(
            "--rounds must be between 1 and 1000, got {}",
            args.rounds
        ));
    }
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        return Err(format!(
            "--seconds must be more than 0 and at most 3600, got {}",
            args.seconds
        ));
    }
    if !(args.speed > 0.0 && args.speed <= 1e6) {
        return Err(format!("--speed must be more than 0, got {}", args.speed));
    }
    let files = if args.queries.is_empty() {
        default_queries()
    } else {
        args.queries.clone()
    };
    let texts = read_queries(&files)?;
    let threads = prompter_plugin_local_embed::compute_threads();
    let (rss_before, _) = procfs::memory_kib("self");
    let loading = Instant::now();
    let model = LocalModel::load(&args.model_dir, None)?;
    let load_ms = loading.elapsed().as_secs_f64() * 1000.0;
    let (rss_model, _) = procfs::memory_kib("self");
    let name = args
        .model_dir
        .file_name()
        .map_or_else(|| "local".into(), |n| n.to_string_lossy().into_owned());
    let embedder = Arc::new(LocalModelEmbedder::new(&name, model, args.batch, 1));
    if !args.json {
        say(
            out,
            &format!(
                "{name}: loaded in {load_ms:.0} ms, +{:.1} MiB resident; candle uses {threads} thread(s) (RAYON_NUM_THREADS)",
                mib(rss_model.saturating_sub(rss_before))
            ),
        );
    }

    // 1. One query at a time, as a retrieve stage meets a new sentence. One unmeasured round
    // first (the allocator's first pages, the kernels' first use).
    for t in texts.iter().take(8) {
        embedder
            .embed(std::slice::from_ref(t))
            .await
            .map_err(|e| e.to_string())?;
    }
    let mut latency_us = Vec::with_capacity(texts.len() * args.rounds);
    let cpu_single = cpu_seconds();
    let single_started = Instant::now();
    for _ in 0..args.rounds {
        for t in &texts {
            let started = Instant::now();
            embedder
                .embed(std::slice::from_ref(t))
                .await
                .map_err(|e| e.to_string())?;
            latency_us.push(started.elapsed().as_micros() as u64);
        }
    }
    let single_wall = single_started.elapsed().as_secs_f64();
    let single_cpu = cpu_seconds() - cpu_single;
    latency_us.sort_unstable();
    let singles = latency_us.len() as f64;
    if !args.json {
        say(
            out,
            &format!(
                "single queries ({} texts x {} rounds = {}): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {:.0} texts/s, {:.1} ms CPU per text",
                texts.len(),
                args.rounds,
                latency_us.len(),
                ms(pct(&latency_us, 50.0)),
                ms(pct(&latency_us, 99.0)),
                ms(latency_us.last().copied().unwrap_or(0)),
                singles / single_wall,
                1000.0 * single_cpu / singles
            ),
        );
    }

    // 2. Batches, for as long as asked.
    let budget = Duration::from_secs_f64(args.seconds);
    let cpu_batch = cpu_seconds();
    let batch_started = Instant::now();
    let mut done = 0usize;
    let mut cursor = 0usize;
    while batch_started.elapsed() < budget {
        let batch: Vec<String> = (0..args.batch)
            .map(|i| texts[(cursor + i) % texts.len()].clone())
            .collect();
        cursor = (cursor + args.batch) % texts.len();
        embedder.embed(&batch).await.map_err(|e| e.to_string())?;
        done += batch.len();
    }
    let batch_wall = batch_started.elapsed().as_secs_f64();
    let batch_cpu = (cpu_seconds() - cpu_batch).max(0.01);
    let per_core = done as f64 / batch_cpu;
    let usd_per_million = 1e6 / per_core / 3600.0 * args.core_hour_usd;
    let (now_self, peak_self) = procfs::memory_kib("self");
    if !args.json {
        say(
            out,
            &format!(
                "batches of {} for {:.1} s: {done} texts, {:.0} texts/s wall, {:.0} texts per CPU-second (per core), {:.2} ms CPU per text; ${usd_per_million:.3} per million texts at ${}/core-hour",
                args.batch,
                batch_wall,
                done as f64 / batch_wall,
                per_core,
                1000.0 / per_core,
                args.core_hour_usd
            ),
        );
        say(
            out,
            &format!(
                "this process: {:.1} MiB resident now, peak {:.1} MiB",
                mib(now_self),
                mib(peak_self)
            ),
        );
    }

    // 3. The engine's own memory, with and without the model.
    let mut engines = Vec::new();
    if args.config.as_os_str() != "none" {
        drop(embedder);
        for (label, config) in [
            ("with the model", &args.config),
            ("without", &args.baseline),
        ] {
            let r = engine_run(config, &args.call, args.speed).await?;
            if !args.json {
                let cards = if r.cards > 0 {
                    format!(
                        "; {} knowledge cards, engine time p50 {:.1} ms, max {:.1} ms",
                        r.cards,
                        ms(pct(&r.card_us, 50.0)),
                        ms(r.card_us.last().copied().unwrap_or(0))
                    )
                } else {
                    String::new()
                };
                say(
                    out,
                    &format!(
                        "engine {label} (`prompter replay --config {}`, {:.1} s): peak {:.1} MiB resident{cards}",
                        config.display(),
                        r.wall.as_secs_f64(),
                        mib(r.peak_kib)
                    ),
                );
            }
            engines.push(json!({
                "config": config, "peak_rss_mib": mib(r.peak_kib), "wall_s": r.wall.as_secs_f64(),
                "knowledge_cards": r.cards,
                "card_engine_p50_ms": ms(pct(&r.card_us, 50.0)),
                "card_engine_max_ms": ms(r.card_us.last().copied().unwrap_or(0)),
            }));
        }
    } else if !args.json {
        say(err, "engine memory runs skipped (--config none)");
    }
    if args.json {
        say(
            out,
            &json!({
                "model": name, "threads": threads, "texts": texts.len(), "load_ms": load_ms,
                "model_rss_mib": mib(rss_model.saturating_sub(rss_before)),
                "single": {
                    "count": latency_us.len(), "p50_ms": ms(pct(&latency_us, 50.0)),
                    "p99_ms": ms(pct(&latency_us, 99.0)),
                    "max_ms": ms(latency_us.last().copied().unwrap_or(0)),
                    "per_second": singles / single_wall, "cpu_ms_per_text": 1000.0 * single_cpu / singles,
                },
                "batch": {
                    "size": args.batch, "texts": done, "seconds": batch_wall,
                    "per_second": done as f64 / batch_wall, "per_cpu_second": per_core,
                    "cpu_ms_per_text": 1000.0 / per_core, "usd_per_million": usd_per_million,
                    "core_hour_usd": args.core_hour_usd,
                },
                "bench_rss_mib": mib(now_self), "bench_peak_rss_mib": mib(peak_self),
                "engines": engines,
            })
            .to_string(),
        );
    }
    Ok(())
}
