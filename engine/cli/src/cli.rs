//! The `prompter` command line: `validate`, `run`, `replay`, `demo`, `bench`, `kb`, `plugins`,
//! `plugin`.
//!
//! [`main`] takes its arguments and output streams as parameters so tests run the real command
//! in process and read exactly what a user would see.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use clap::{Parser, Subcommand};

use prompter_engine::config::{self, LoadRequest, Loaded};
use prompter_engine::recording;
use prompter_engine::registry::{self, Registry};
use prompter_engine::session::{self, Pace};
use prompter_engine::stats::Stats;

/// A shared output stream.
pub type Stream = Arc<Mutex<Box<dyn Write + Send>>>;

/// Writes one line to a shared stream (a closed pipe is not worth a panic).
pub fn say(stream: &Stream, text: &str) {
    if let Ok(mut w) = stream.lock() {
        let _ = writeln!(w, "{text}");
        let _ = w.flush();
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "prompter",
    version,
    about = "Event-processing engine for live conversations: Symbl events in, pipelines of plugins, suggestions out."
)]
struct Cli {
    /// More logs on stderr (repeat for more). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check pipeline files and engine configs; print every problem as file:line:col.
    Validate {
        /// Engine config that declares the resources pipelines use [default: ./prompter.yaml if it exists].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Pipeline files and/or engine configs.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run recorded calls through the configured pipelines; print outputs as JSON lines.
    Replay {
        /// Engine config [default: ./prompter.yaml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Pace events by their `offset_ms` instead of as fast as possible.
        #[arg(long)]
        realtime: bool,
        /// Speed factor for --realtime (2 = twice as fast).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Recording files (JSONL).
        #[arg(required = true)]
        recordings: Vec<PathBuf>,
    },
    /// Run the engine on live calls (Symbl Subscribe API) until stopped with Ctrl-C.
    Run(crate::live::RunArgs),
    /// Run the pipeline tests (`*.test.yaml`) offline; show each failure as a readable diff.
    Test(crate::pipeline_test::TestArgs),
    /// Watch a running engine's events and outputs live, as JSON lines (needs PROMPTER_ADMIN_TOKEN).
    Tap(crate::tap::TapArgs),
    /// Play a bundled sales call through Real-Time Assist, in real time, as the agent would see it.
    Demo {
        /// Engine config [default: ./prompter.yaml, else the embedded defaults].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Recording to play [default: the bundled discovery call].
        #[arg(long)]
        call: Option<PathBuf>,
        /// Speed factor (2 = twice as fast).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Never use colors.
        #[arg(long)]
        no_color: bool,
        /// Serve the agent console and play the call into it; prints the link to open.
        #[arg(long)]
        console: bool,
        /// Where the console listens (with --console; port 0 picks one).
        #[arg(
            long,
            value_name = "ADDR",
            default_value = "127.0.0.1:7070",
            requires = "console"
        )]
        listen: String,
        /// Append the console's feedback to this JSONL file (with --console).
        #[arg(long, value_name = "FILE", requires = "console")]
        feedback_log: Option<PathBuf>,
        /// Stop when the call ends instead of serving until Ctrl-C (with --console).
        #[arg(long, requires = "console")]
        exit_at_end: bool,
    },
    /// Mint an agent-console access link (or token) from the feed secret in the environment.
    ConsoleToken(crate::console::TokenArgs),
    /// Measure events per second and per-event engine overhead on replayed calls.
    #[command(group(
        clap::ArgGroup::new("load").args(["feed_clients", "twilio_calls", "live_calls"])
    ))]
    #[command(group(clap::ArgGroup::new("paced").args(["feed_clients", "live_calls"])))]
    #[command(group(clap::ArgGroup::new("timed").args(["twilio_calls", "live_calls"])))]
    Bench {
        /// Engine config [default: ./prompter.yaml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// How many copies of each recording to run (each copy is its own conversation).
        #[arg(long, default_value_t = 200)]
        iterations: usize,
        /// Recordings [default: pipelines/recordings/*.jsonl next to the config].
        recordings: Vec<PathBuf>,
        /// Instead, measure suggestions on calls this many sentences long (e.g. `250,4000`).
        #[arg(
            long,
            value_delimiter = ',',
            value_name = "SENTENCES",
            conflicts_with = "feed_clients"
        )]
        long_call: Vec<usize>,
        /// Instead, measure the agent feed's fan-out: this many WebSocket clients on loopback
        /// during a real-time replay (0: the engine and feed alone, a baseline).
        #[arg(long, value_name = "N", conflicts_with = "iterations")]
        feed_clients: Option<usize>,
        /// Calls replayed by the feed bench [default: 1000].
        #[arg(long, value_name = "M", requires = "feed_clients")]
        calls: Option<usize>,
        /// Replay speed of the feed bench, times real time [default: 2]; of the live bench
        /// [default: 1].
        #[arg(long, value_name = "S", requires = "paced")]
        speed: Option<f64>,
        /// Instead, measure the Twilio bridge: this many simulated calls (both tracks, real
        /// time) through a child `prompter run`, between a fake Twilio and a fake Symbl.
        #[arg(
            long,
            value_name = "N",
            conflicts_with_all = ["iterations", "long_call", "recordings", "config", "calls", "speed"]
        )]
        twilio_calls: Option<usize>,
        /// Instead, measure the engine on live calls: this many simulated calls at a time,
        /// back to back (the shipped recordings over Symbl's Subscribe API, the live RTA
        /// pipeline against a fake Nebula), through a child `prompter run`.
        #[arg(
            long,
            value_name = "N",
            conflicts_with_all = ["iterations", "long_call", "recordings", "config", "twilio_calls", "feed_clients", "calls"]
        )]
        live_calls: Option<usize>,
        /// Live bench: an interim caption every this many words of speech besides the
        /// recordings' own frames, as Symbl sends them (about 2 frames per second per call at
        /// real time); 0: the recordings' frames only.
        #[arg(long, value_name = "WORDS", requires = "live_calls")]
        interim_words: Option<usize>,
        /// Live bench: inject this fault 5 s into the steady window (a window of at least
        /// 30 s) and account for what it did.
        #[arg(long, value_enum, value_name = "KIND", requires = "live_calls")]
        fault: Option<crate::live_bench::Fault>,
        /// Length of each call of the Twilio bench [default: 30], or of the live bench's steady
        /// window [default: 60], in seconds.
        #[arg(long, value_name = "S", requires = "timed")]
        seconds: Option<u64>,
        /// Print the feed, Twilio or live bench's report as one JSON object.
        #[arg(long, requires = "load")]
        json: bool,
    },
    /// List the built-in plugins, knowledge-store kinds, LLM provider and embedder kinds.
    Plugins,
    /// Manage the Symbl trackers declared under `symbl.trackers`.
    Trackers {
        #[command(subcommand)]
        command: TrackersCommand,
    },
    /// Scale-out on NATS JetStream: publish recordings to the cluster, show its state.
    Cluster {
        #[command(subcommand)]
        command: crate::cluster_cli::ClusterCommand,
    },
    /// Fill knowledge stores.
    Kb {
        #[command(subcommand)]
        command: KbCommand,
    },
    /// Write and test WebAssembly plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TrackersCommand {
    /// Create missing trackers and update changed ones through Symbl's Management API; warn
    /// about trackers that no knowledge-base row covers.
    Sync {
        /// Engine config [default: ./prompter.yaml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KbCommand {
    /// Embed a CSV's rows into a store (only new or changed rows are embedded).
    Ingest(crate::kb::IngestArgs),
    /// Compare embedders on labelled queries: top-1 and top-3 accuracy, mean reciprocal rank,
    /// the cost of a query embedding.
    Eval(crate::kb_eval::EvalArgs),
    /// What the local embedder costs here: query latency p50/p99, texts per second and per
    /// core, cost per million, the engine's memory with the model loaded.
    Bench(crate::kb_bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Scaffold a plugin crate that builds and passes its own tests.
    New {
        /// Crate name (lowercase, `-` allowed).
        name: String,
        /// Folder to create it in [default: the current folder].
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The prompter-sdk crate to depend on [default: this checkout's sdk/].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a plugin component over a recording; print its results as JSON lines.
    Test(crate::plugin_cli::TestOptions),
    /// Measure the per-call cost of a Wasm stage against the same logic built in.
    Bench {
        /// The echo component [default: target/wasm/wasm32-wasip2/release/echo_plugin.wasm].
        #[arg(long)]
        module: Option<PathBuf>,
        /// Calls to measure on each side.
        #[arg(long, default_value_t = 20_000)]
        iterations: usize,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main(
    args: Vec<OsString>,
    stdout: Box<dyn Write + Send>,
    stderr: Box<dyn Write + Send>,
) -> u8 {
    let out: Stream = Arc::new(Mutex::new(stdout));
    let err: Stream = Arc::new(Mutex::new(stderr));
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let stream = if e.use_stderr() { &err } else { &out };
            say(stream, e.render().to_string().trim_end());
            return code;
        }
    };
    // rustls needs one process-wide crypto provider for HTTPS (Nebula, plugin HTTP, the OTLP
    // exporter's client, built by `init_logging`).
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Held to the end: with the `otlp` feature, dropping it exports the spans still queued.
    let _logging = init_logging(cli.verbose, &err);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            say(&err, &format!("error: cannot start the async runtime: {e}"));
            return 1;
        }
    };
    let registry = registry::builtin();
    match cli.command {
        Command::Validate { config, files } => validate(&registry, config, &files, &out, &err),
        Command::Replay {
            config,
            realtime,
            speed,
            recordings,
        } => {
            let pace = if realtime {
                Pace::Realtime(speed)
            } else {
                Pace::Fast
            };
            runtime.block_on(replay(&registry, config, &recordings, pace, &out, &err))
        }
        Command::Test(args) => {
            runtime.block_on(crate::pipeline_test::run(&registry, args, &out, &err))
        }
        Command::Demo {
            config,
            call,
            speed,
            no_color,
            console,
            listen,
            feedback_log,
            exit_at_end,
        } => {
            let console = console.then_some(crate::console::DemoConsole {
                listen,
                feedback_log,
                speed,
                exit_at_end,
            });
            runtime.block_on(crate::demo::run(
                &registry, config, call, speed, no_color, console, &out, &err,
            ))
        }
        Command::ConsoleToken(args) => crate::console::token(&registry, args, &out, &err),
        Command::Bench {
            live_calls: Some(calls),
            seconds,
            speed,
            interim_words,
            fault,
            json,
            ..
        } => {
            let args = crate::live_bench::LiveBenchArgs {
                calls,
                seconds: seconds.unwrap_or(crate::live_bench::DEFAULT_SECONDS),
                speed: speed.unwrap_or(1.0),
                interim_words: interim_words.unwrap_or(crate::live_bench::DEFAULT_INTERIM_WORDS),
                fault,
                json,
            };
            runtime.block_on(crate::live_bench::run(args, &out, &err))
        }
        Command::Bench {
            twilio_calls: Some(calls),
            seconds,
            json,
            ..
        } => {
            let args = crate::twilio_bench::TwilioBenchArgs {
                calls,
                seconds: seconds.unwrap_or(crate::twilio_bench::DEFAULT_SECONDS),
                json,
            };
            runtime.block_on(crate::twilio_bench::run(args, &out, &err))
        }
        Command::Bench {
            config,
            recordings,
            feed_clients: Some(clients),
            calls,
            speed,
            json,
            ..
        } => {
            let args = crate::feed_bench::FeedBenchArgs {
                config,
                recordings,
                clients,
                calls: calls.unwrap_or(crate::feed_bench::DEFAULT_CALLS),
                speed: speed.unwrap_or(crate::feed_bench::DEFAULT_SPEED),
                json,
            };
            runtime.block_on(crate::feed_bench::run(&registry, args, &out, &err))
        }
        Command::Bench {
            config,
            iterations,
            recordings,
            long_call,
            ..
        } => runtime.block_on(crate::bench::run(
            &registry, config, iterations, recordings, &long_call, &out, &err,
        )),
        Command::Plugin {
            command: PluginCommand::New { name, dir, sdk },
        } => {
            let sdk = sdk.unwrap_or_else(crate::plugin_cli::default_sdk);
            crate::plugin_cli::new(&name, &dir, &sdk, &out, &err)
        }
        Command::Plugin {
            command: PluginCommand::Test(opts),
        } => runtime.block_on(crate::plugin_cli::test(opts, &out, &err)),
        Command::Plugin {
            command: PluginCommand::Bench { module, iterations },
        } => {
            let module = module.unwrap_or_else(|| {
                PathBuf::from("target/wasm/wasm32-wasip2/release/echo_plugin.wasm")
            });
            runtime.block_on(crate::bench::wasm(module, iterations, &out, &err))
        }
        Command::Run(args) => runtime.block_on(crate::live::run(&registry, args, &out, &err)),
        Command::Tap(args) => runtime.block_on(crate::tap::run(args, &out, &err)),
        Command::Trackers {
            command: TrackersCommand::Sync { config, dry_run },
        } => runtime.block_on(trackers_sync(&registry, config, dry_run, &out, &err)),
        Command::Cluster { command } => match command {
            crate::cluster_cli::ClusterCommand::Publish(args) => {
                runtime.block_on(crate::cluster_cli::publish(&registry, args, &err))
            }
            crate::cluster_cli::ClusterCommand::Bench(args) => {
                runtime.block_on(crate::cluster_bench::run(&registry, args, &out, &err))
            }
            crate::cluster_cli::ClusterCommand::Status { config } => {
                runtime.block_on(crate::cluster_cli::status(&registry, config, &out, &err))
            }
            crate::cluster_cli::ClusterCommand::Outputs {
                config,
                conversation,
            } => runtime.block_on(crate::cluster_cli::outputs(
                &registry,
                config,
                conversation,
                &out,
                &err,
            )),
        },
        Command::Kb {
            command: KbCommand::Ingest(args),
        } => runtime.block_on(crate::kb::ingest(&registry, args, &out, &err)),
        Command::Kb {
            command: KbCommand::Eval(args),
        } => runtime.block_on(crate::kb_eval::eval(&registry, args, &out, &err)),
        Command::Kb {
            command: KbCommand::Bench(args),
        } => runtime.block_on(crate::kb_bench::bench(args, &out, &err)),
        Command::Plugins => {
            say(&out, "stage plugins (`plugin:` in a pipeline stage):");
            for p in registry.plugins() {
                say(&out, &format!("  {:<18} {}", p.name(), p.description()));
            }
            say(
                &out,
                &format!(
                    "  {:<18} a WebAssembly component (`module:`), see `prompter plugin new`",
                    registry::WASM
                ),
            );
            say(&out, "knowledge stores (`store:` under `knowledge:`):");
            for s in &registry.stores {
                say(&out, &format!("  {:<18} {}", s.name, s.description));
            }
            say(&out, "llm providers (`provider:` under `llm:`):");
            for p in &registry.providers {
                say(&out, &format!("  {:<18} {}", p.name, p.description));
            }
            say(&out, "embedders (`provider:` under `embedders:`):");
            for e in &registry.embedders {
                say(&out, &format!("  {:<18} {}", e.name, e.description));
            }
            0
        }
    }
}

async fn trackers_sync(
    registry: &Registry,
    config: Option<PathBuf>,
    dry_run: bool,
    out: &Stream,
    err: &Stream,
) -> u8 {
    let config = config.unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let Some(loaded) = load_for_run(registry, &config, err) else {
        return 1;
    };
    let Some(symbl) = loaded.settings.symbl.as_ref() else {
        say(
            err,
            &format!(
                "error: `{}` has no `symbl:` section with `trackers:`",
                config.display()
            ),
        );
        return 1;
    };
    // Written to a buffer first, so no lock on the output is held across an await.
    let mut buf = Vec::new();
    let result =
        crate::trackers_cli::sync(symbl, &loaded.resources.knowledge, dry_run, &mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    if !text.trim().is_empty() {
        say(out, text.trim_end());
    }
    match result {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            say(err, &format!("error: {e}"));
            1
        }
    }
}

/// Log targets capped below trace, where they would print request headers.
const SECRET_BEARING_TARGETS: &[&str] = &[
    "tungstenite=info",
    "tokio_tungstenite=info",
    "hyper=info",
    "hyper_util=info",
    "reqwest=info",
    "h2=info",
];

/// The variables that turn OTLP trace export on (the `otlp` feature), as OpenTelemetry names
/// them.
const OTLP_ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// What `init_logging` set up that must live until the process exits.
#[must_use]
struct LoggingGuard {
    /// Exports the spans still queued when dropped.
    #[cfg(feature = "otlp")]
    _otlp: Option<crate::otlp::OtlpGuard>,
}

/// The stderr log (`-v`, `RUST_LOG`) and, with the `otlp` feature and an OTLP endpoint in the
/// environment, the span exporter beside it, with its own filter.
fn init_logging(verbose: u8, err: &Stream) -> LoggingGuard {
    let otlp_endpoint = OTLP_ENDPOINT_VARS
        .into_iter()
        .find(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()));
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // At trace level these libraries log whole requests, headers included: the Symbl token
    // (`X-API-KEY`, `?access_token=`) and API keys must never reach a log, whatever RUST_LOG says.
    let filter = SECRET_BEARING_TARGETS
        .iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, tracing_subscriber::EnvFilter::add_directive);
    #[cfg(feature = "otlp")]
    if otlp_endpoint.is_some() && !tracing::dispatcher::has_been_set() {
        use tracing_subscriber::Layer as _;
        // The filter above is the log's alone: the exporter has its own (see `otlp`).
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .with_filter(filter);
        return LoggingGuard {
            _otlp: crate::otlp::install(log, err),
        };
    }
    #[cfg(not(feature = "otlp"))]
    if let Some(var) = otlp_endpoint {
        say(
            err,
            &format!(
                "warning: {var} is set, but this build of prompter has no OTLP exporter: no spans \
                 are exported (rebuild with `--features otlp`)"
            ),
        );
    }
    // A second call in the same process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    LoggingGuard {
        #[cfg(feature = "otlp")]
        _otlp: None,
    }
}

fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The engine config to use: the flag, else `./prompter.yaml` when it exists.
fn default_config(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| {
        let p = PathBuf::from("prompter.yaml");
        p.exists().then_some(p)
    })
}

fn validate(
    registry: &Registry,
    config: Option<PathBuf>,
    files: &[PathBuf],
    out: &Stream,
    err: &Stream,
) -> u8 {
    let config = default_config(config);
    // A config also named among the files is checked in full, pipelines included.
    let listed = config
        .as_ref()
        .is_some_and(|c| files.iter().any(|f| same(f, c)));
    let req = LoadRequest {
        config: config.as_deref(),
        files,
        include_config_pipelines: listed,
        env: &env_lookup,
        metrics: None,
    };
    match config::load(&req, registry) {
        Ok(loaded) => {
            let names: Vec<&str> = loaded.pipelines.iter().map(|p| p.name.as_str()).collect();
            say(
                out,
                &format!(
                    "ok: {} file(s) valid; pipelines: {}; knowledge stores: {}; llm providers: {}",
                    files.len(),
                    if names.is_empty() {
                        "none".to_owned()
                    } else {
                        names.join(", ")
                    },
                    list(loaded.resources.knowledge.keys()),
                    list(loaded.resources.chat.keys()),
                ),
            );
            0
        }
        Err(diags) => {
            say(err, diags.render().trim_end());
            say(
                err,
                &format!("error: {} problem(s) found", diags.items().len()),
            );
            1
        }
    }
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none".to_owned()
    } else {
        v.join(", ")
    }
}

fn same(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Loads the engine config and its pipelines for running; prints problems on failure.
pub(crate) fn load_for_run(registry: &Registry, config: &Path, err: &Stream) -> Option<Loaded> {
    if !config.exists() {
        say(
            err,
            &format!(
                "error: engine config `{}` not found (pass --config FILE)",
                config.display()
            ),
        );
        return None;
    }
    let req = LoadRequest {
        config: Some(config),
        files: &[],
        include_config_pipelines: true,
        env: &env_lookup,
        metrics: None,
    };
    match config::load(&req, registry) {
        Ok(l) => Some(l),
        Err(diags) => {
            say(err, diags.render().trim_end());
            say(
                err,
                &format!(
                    "error: {} problem(s) in the configuration; nothing was run",
                    diags.items().len()
                ),
            );
            None
        }
    }
}

/// Reads recordings, printing each skipped line on `err`; `None` (after saying why) when a file
/// cannot be read at all.
/// Also returns how many lines were skipped.
pub(crate) fn read_recordings(
    paths: &[PathBuf],
    err: &Stream,
) -> Option<(Vec<recording::RecordedLine>, u64)> {
    match recording::read_all(paths) {
        Ok((lines, problems)) => {
            for p in &problems {
                say(err, &format!("warning: {p}"));
            }
            Some((lines, problems.len() as u64))
        }
        Err((p, e)) => {
            say(
                err,
                &format!("error: cannot read recording `{}`: {e}", p.display()),
            );
            None
        }
    }
}

/// The notifier sinks the engine config declares (`sinks:`), secrets from the environment; an
/// error (printed) when one cannot start. Also returns each one's name and counters.
pub(crate) fn notifiers(
    loaded: &prompter_engine::config::Loaded,
    err: &Stream,
) -> Option<(Sinks, Vec<Notifier>)> {
    let env = |name: &str| std::env::var(name).ok();
    match prompter_engine::delivery::build_sinks(&loaded.settings.sinks, &loaded.pipelines, &env) {
        Ok(built) => {
            let mut sinks = Vec::with_capacity(built.len());
            let mut named = Vec::with_capacity(built.len());
            for (sink, stats) in built {
                named.push((sink.name().to_owned(), stats));
                sinks.push(sink);
            }
            Some((sinks, named))
        }
        Err(e) => {
            say(err, &format!("error: {e}"));
            None
        }
    }
}

/// Sinks for an engine.
pub(crate) type Sinks = Vec<Box<dyn prompter_engine::sink::Sink>>;

/// A notifier sink's name and counters.
pub(crate) type Notifier = (String, Arc<prompter_engine::delivery::DeliveryStats>);

/// One line per notifier sink: what it delivered, retried and dead-lettered.
pub(crate) fn report_notifiers(notifiers: &[Notifier], err: &Stream) {
    use std::sync::atomic::Ordering::Relaxed;
    for (name, s) in notifiers {
        let disabled = if s.disabled.load(Relaxed) > 0 {
            " (disabled: the target is gone)"
        } else {
            ""
        };
        say(
            err,
            &format!(
                "sink {name}: {} delivered, {} retried, {} dead-lettered{disabled}",
                s.delivered.load(Relaxed),
                s.retries.load(Relaxed),
                s.dead_lettered.load(Relaxed)
            ),
        );
    }
}

async fn replay(
    registry: &Registry,
    config: Option<PathBuf>,
    paths: &[PathBuf],
    pace: Pace,
    out: &Stream,
    err: &Stream,
) -> u8 {
    let config = config.unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let Some(loaded) = load_for_run(registry, &config, err) else {
        return 1;
    };
    let Some((lines, skipped)) = read_recordings(paths, err) else {
        return 1;
    };
    let Some((sinks, notifiers)) = notifiers(&loaded, err) else {
        return 1;
    };
    let printer = out.clone();
    let err2 = err.clone();
    let stats = Arc::new(Stats::with_metrics(loaded.settings.metrics.clone()));
    let summary = session::run(
        loaded,
        lines,
        paths,
        pace,
        stats,
        |_| {},
        move |p| say(&err2, &format!("warning: {p}")),
        move |o| match serde_json::to_string(&o) {
            Ok(line) => say(&printer, &line),
            Err(e) => tracing::error!(error = %e, "An output did not serialize."),
        },
        sinks,
    )
    .await;
    report_notifiers(&notifiers, err);
    say(
        err,
        &format!(
            "replayed {} event(s) from {} conversation(s) in {:.3} s: {} output(s), {} malformed line(s) skipped, {} stage error(s)",
            summary.events,
            summary.conversations,
            summary.elapsed.as_secs_f64(),
            summary.outputs,
            summary.skipped_lines + skipped,
            summary.stage_errors
        ),
    );
    0
}
