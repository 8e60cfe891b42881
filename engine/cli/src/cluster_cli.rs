//! The cluster roles of `prompter run --role ...` and `prompter cluster ...`.
//!
//! - `--role ingest`: the usual live sources (Symbl connections, the Twilio bridge); every
//!   event goes to the cluster's events stream instead of local pipelines (wired in
//!   [`crate::live`]).
//! - `--role engine`: pulls the partitions this process owns, runs the pipelines, publishes
//!   every output version to the outputs stream.
//! - `--role sinks`: the console, notifiers and stdout, fed from the outputs stream
//!   (`run_sinks`).
//! - `prompter cluster publish`: recorded calls to the events stream, at their pace or as fast
//!   as possible (`publish`).
//! - `prompter cluster status`: members, partitions, pins, lag (`status`).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prompter_cluster::Cluster;
use prompter_cluster::ingest::Ingest;
use prompter_cluster::member::{Member, Tracker};
use prompter_cluster::outputs::Outputs;
use prompter_cluster::view::View;
use prompter_engine::config::Loaded;
use prompter_engine::engine::Engine;
use prompter_engine::registry::Registry;
use prompter_engine::sink::JsonLines;
use prompter_engine::source::Source;
use prompter_engine::source::recording::{Pace, RecordingSource};
use prompter_engine::stats::Stats;
use tokio::sync::watch;

use crate::cli::{Stream, say};

/// What a `prompter run` process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Role {
    /// Everything in one process, no cluster (the default).
    #[default]
    Standalone,
    /// Live sources to the cluster's events stream.
    Ingest,
    /// Pipelines on the partitions this process owns.
    Engine,
    /// Console, notifiers and stdout fed from the cluster's outputs stream.
    Sinks,
}

/// `prompter cluster ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Publish recorded calls to the cluster's events stream (an ingest process for recordings).
    Publish(PublishArgs),
    /// Run N engine processes on a local NATS server with a fault (kill, stop, server restart)
    /// and account for every output against a single-process run.
    Bench(crate::cluster_bench::BenchArgs),
    /// Show the cluster: members, each partition's pinned engine and lag, stream sizes.
    Status {
        /// Engine config with a `cluster:` section [default: ./prompter.yaml].
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the stored outputs as JSON lines, in the order the outputs stream stored them
    /// (each with its stream sequence as `stream_seq`).
    Outputs {
        /// Engine config with a `cluster:` section [default: ./prompter.yaml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only this conversation's.
        #[arg(long)]
        conversation: Option<String>,
    },
}

/// Options of `prompter cluster publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Engine config with a `cluster:` section [default: ./prompter.yaml].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Pace events by their `offset_ms` instead of as fast as possible.
    #[arg(long)]
    pub realtime: bool,
    /// Speed factor for --realtime (2 = twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Publish each recording this many times, as distinct calls (`<id>~2`, `<id>~3`, ...),
    /// their starts spread over the first 10 s.
    #[arg(long, default_value_t = 1)]
    pub copies: u32,
    /// Recording files (JSONL).
    #[arg(required = true)]
    pub recordings: Vec<PathBuf>,
}

/// Loads `config` and joins its cluster; `None` (said why) when either fails.
async fn join(
    registry: &Registry,
    config: &std::path::Path,
    err: &Stream,
) -> Option<(Loaded, Cluster)> {
    let loaded = crate::cli::load_for_run(registry, config, err)?;
    let Some(cfg) = loaded.settings.cluster.clone() else {
        say(
            err,
            &format!(
                "error: `{}` has no `cluster:` section (servers, partitions): a cluster role needs one",
                config.display()
            ),
        );
        return None;
    };
    match Cluster::join(&cfg).await {
        Ok(c) => Some((loaded, c)),
        Err(e) => {
            say(err, &format!("error: {e}"));
            None
        }
    }
}

/// The ingest forwarder for `prompter run --role ingest`, or `None` (said why).
pub(crate) async fn ingest(loaded: &Loaded, err: &Stream) -> Option<Arc<Ingest>> {
    let Some(cfg) = loaded.settings.cluster.clone() else {
        say(
            err,
            "error: --role ingest needs a `cluster:` section in the engine config",
        );
        return None;
    };
    match Cluster::join(&cfg).await {
        Ok(c) => {
            say(
                err,
                &format!(
                    "cluster: ingest {} publishing to `{}` ({} partitions)",
                    c.member, cfg.events_stream, cfg.partitions
                ),
            );
            Some(Arc::new(Ingest::new(c)))
        }
        Err(e) => {
            say(err, &format!("error: {e}"));
            None
        }
    }
}

/// Says what an ingest process published.
pub(crate) fn report_ingest(ingest: &Ingest, err: &Stream) {
    say(
        err,
        &format!(
            "cluster: {} event(s) stored, {} already stored (re-sent), {} publish retries, {} given up",
            ingest.published.load(Ordering::Relaxed),
            ingest.duplicates.load(Ordering::Relaxed),
            ingest.retries.load(Ordering::Relaxed),
            ingest.lost.load(Ordering::Relaxed)
        ),
    );
}

/// `prompter run --role engine`.
pub(crate) async fn run_engine(
    registry: &Registry,
    config: PathBuf,
    listen: Option<String>,
    err: &Stream,
) -> u8 {
    let Some((loaded, cluster)) = join(registry, &config, err).await else {
        return 1;
    };
    let stats = Arc::new(Stats::with_metrics(loaded.settings.metrics.clone()));
    let tracker = Tracker::new(std::time::Duration::from_secs(
        cluster.config.snapshot_every_secs.max(1),
    ));
    let outputs = Outputs::new(cluster.clone(), Some(tracker.on_stored()));
    let counters = outputs.counters();
    let tap = prompter_engine::tap::Tap::new();
    let sinks: Vec<Box<dyn prompter_engine::sink::Sink>> = vec![Box::new(outputs), tap.sink()];
    let pipelines = loaded.pipelines.len();
    let engine = Arc::new(
        Engine::new(loaded.pipelines, loaded.settings, sinks, stats.clone())
            .with_settled(tracker.clone())
            .with_observer(Arc::new(tap.clone())),
    );
    let member = match Member::start(cluster.clone(), engine.clone(), tracker.clone()).await {
        Ok(m) => m,
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };
    say(
        err,
        &format!(
            "cluster: engine {} joined ({} pipeline(s), {} partitions in `{}`)",
            member.name(),
            pipelines,
            cluster.config.partitions,
            cluster.config.events_stream
        ),
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(addr) = &listen {
        let admin = std::env::var(crate::live::ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .map(prompter_core::secret::Secret::new);
        let checks: Vec<(&'static str, prompter_engine::server::Check)> = vec![(
            "config",
            Box::new(move || Ok(format!("{pipelines} pipeline(s) loaded"))),
        )];
        let routes = prompter_engine::server::metrics_routes(stats.clone())
            .merge(prompter_engine::server::ready_routes(checks))
            .merge(tap.routes(admin));
        match prompter_engine::server::serve(addr, routes, shutdown_rx).await {
            Ok(bound) => say(
                err,
                &format!("control endpoint listening on http://{bound}"),
            ),
            Err(e) => {
                say(err, &format!("error: cannot listen on `{addr}`: {e}"));
                return 1;
            }
        }
    }
    crate::live::stop_requested().await;
    say(
        err,
        "cluster: leaving (partitions handed over, runs finishing)",
    );
    member.leave().await;
    engine.finish().await;
    let _ = shutdown_tx.send(true);
    let c = &tracker.counters;
    say(
        err,
        &format!(
            "stopped: {} event(s), {} output(s) stored, {} already stored (made again), {} takeover(s), {} event(s) replayed, {} stale deliveries dropped, {} redeliveries",
            stats.events.load(Ordering::Relaxed),
            counters.stored.load(Ordering::Relaxed),
            counters.duplicates.load(Ordering::Relaxed),
            c.takeovers.load(Ordering::Relaxed),
            c.replayed.load(Ordering::Relaxed),
            c.stale.load(Ordering::Relaxed),
            c.redelivered.load(Ordering::Relaxed),
        ),
    );
    0
}

/// `prompter run --role sinks`.
pub(crate) async fn run_sinks(
    registry: &Registry,
    config: PathBuf,
    listen: Option<String>,
    out: &Stream,
    err: &Stream,
) -> u8 {
    let Some((loaded, cluster)) = join(registry, &config, err).await else {
        return 1;
    };
    let stats = Arc::new(Stats::with_metrics(loaded.settings.metrics.clone()));
    let printer_out = out.clone();
    let printer = JsonLines::new(move |line| say(&printer_out, line));
    let printed = printer.written();
    let Some((notifier_sinks, notifiers)) = crate::cli::notifiers(&loaded, err) else {
        return 1;
    };
    let feed_config = loaded.settings.feed.clone().filter(|_| listen.is_some());
    let feed = feed_config
        .as_ref()
        .map(|_| crate::console::FeedWiring::new());
    let mut sinks: Vec<Box<dyn prompter_engine::sink::Sink>> = vec![Box::new(printer)];
    sinks.extend(notifier_sinks);
    if let Some(f) = &feed {
        sinks.push(f.sink());
    }
    // No pipelines: this engine only folds the transcript and feeds its sinks.
    // What the console adds (an agent's feedback) goes to the events stream, for the engine
    // that owns the call; the call's events come back from there (`View`), unforwarded.
    let mut engine = Engine::new(Vec::new(), loaded.settings, sinks, stats.clone())
        .with_forwarder(Arc::new(Ingest::new(cluster.clone())));
    if let Some(f) = &feed {
        engine = engine.with_observer(f.observer());
    }
    let engine = Arc::new(engine);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    if let Some(addr) = &listen {
        let mut routes = prompter_engine::server::metrics_routes(stats.clone());
        if let (Some(f), Some(cfg)) = (&feed, &feed_config) {
            match f.service(cfg, engine.clone(), shutdown_rx.clone()) {
                Ok(service) => routes = routes.merge(service.routes()),
                Err(e) => {
                    say(err, &format!("error: {e}"));
                    return 1;
                }
            }
        }
        match prompter_engine::server::serve(addr, routes, shutdown_rx.clone()).await {
            Ok(bound) => say(err, &format!("sinks endpoint listening on http://{bound}")),
            Err(e) => {
                say(err, &format!("error: cannot listen on `{addr}`: {e}"));
                return 1;
            }
        }
    }
    let view = Arc::new(View::new(cluster.clone(), engine.clone()));
    let counters = view.counters.clone();
    let mut task = {
        let view = view.clone();
        let rx = shutdown_rx.clone();
        let with_events = feed.is_some();
        tokio::spawn(async move { view.run(with_events, rx).await })
    };
    say(
        err,
        &format!(
            "cluster: sinks {} reading `{}`",
            cluster.member, cluster.config.outputs_stream
        ),
    );
    let early = tokio::select! {
        () = crate::live::stop_requested() => None,
        r = &mut task => Some(r),
    };
    let _ = shutdown_tx.send(true);
    let ended = match early {
        Some(r) => r,
        None => task.await,
    };
    let mut code = 0;
    match ended {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            say(err, &format!("error: {e}"));
            code = 1;
        }
        Err(e) => {
            tracing::error!(error = %e, "The cluster view panicked.");
            code = 1;
        }
    }
    engine.finish().await;
    crate::cli::report_notifiers(&notifiers, err);
    say(
        err,
        &format!(
            "stopped: {} output(s) from the cluster, {} printed, {} unreadable",
            counters.outputs.load(Ordering::Relaxed),
            printed.load(Ordering::Relaxed),
            counters.unreadable.load(Ordering::Relaxed)
        ),
    );
    code
}

/// `prompter cluster publish`.
pub(crate) async fn publish(registry: &Registry, args: PublishArgs, err: &Stream) -> u8 {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let Some((_, cluster)) = join(registry, &config, err).await else {
        return 1;
    };
    let Some((lines, _)) = crate::cli::read_recordings(&args.recordings, err) else {
        return 1;
    };
    let all = crate::cluster_bench::copies(&lines, args.copies);
    let pace = if args.realtime {
        Pace::Realtime(args.speed)
    } else {
        Pace::Fast
    };
    let ingest = Arc::new(Ingest::new(cluster));
    let stats = Arc::new(Stats::default());
    let engine = Arc::new(
        Engine::new(
            Vec::new(),
            prompter_engine::config::Settings::default(),
            Vec::new(),
            stats,
        )
        .with_forwarder(ingest.clone()),
    );
    let err2 = err.clone();
    let source = RecordingSource::new(all, args.recordings.clone(), pace)
        .on_problem(move |p| say(&err2, &format!("warning: {p}")));
    let report = source.report();
    let (_stop_tx, stop_rx) = watch::channel(false);
    let started = std::time::Instant::now();
    if let Err(e) = Box::new(source).run(engine.clone(), stop_rx).await {
        say(err, &format!("error: {e}"));
        return 1;
    }
    let r = report
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    say(
        err,
        &format!(
            "published {} conversation(s) in {:.3} s",
            r.conversations,
            started.elapsed().as_secs_f64()
        ),
    );
    report_ingest(&ingest, err);
    u8::from(ingest.lost.load(Ordering::Relaxed) > 0)
}

/// `prompter cluster status`.
pub(crate) async fn status(
    registry: &Registry,
    config: Option<PathBuf>,
    out: &Stream,
    err: &Stream,
) -> u8 {
    use futures_util::StreamExt;
    let config = config.unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let Some((_, cluster)) = join(registry, &config, err).await else {
        return 1;
    };
    let members: Vec<String> = match cluster.members().await {
        Ok(kv) => match kv.keys().await {
            Ok(keys) => keys.filter_map(|k| async move { k.ok() }).collect().await,
            Err(_) => Vec::new(),
        },
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };
    let mut members = members;
    members.sort();
    say(
        out,
        &format!("members ({}): {}", members.len(), members.join(", ")),
    );
    for p in 0..cluster.config.partitions {
        let owner = prompter_cluster::names::owner(p, &members).unwrap_or("-");
        match cluster.partition_info(p).await {
            Ok(i) => {
                let pinned = i
                    .priority_groups
                    .iter()
                    .find_map(|g| g.pinned_client_id.clone())
                    .unwrap_or_else(|| "-".into());
                say(
                    out,
                    &format!(
                        "partition {p:>3}: owner {owner}, pinned {pinned}, pending {}, unacknowledged {}, redelivered {}",
                        i.num_pending, i.num_ack_pending, i.num_redelivered
                    ),
                );
            }
            Err(e) => say(out, &format!("partition {p:>3}: {e}")),
        }
    }
    0
}

/// `prompter cluster outputs`.
pub(crate) async fn outputs(
    registry: &Registry,
    config: Option<PathBuf>,
    conversation: Option<String>,
    out: &Stream,
    err: &Stream,
) -> u8 {
    let config = config.unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let Some((_, cluster)) = join(registry, &config, err).await else {
        return 1;
    };
    let mut n = 0u64;
    let printed =
        prompter_cluster::view::dump_outputs(&cluster, conversation.as_deref(), |seq, mut o| {
            if let Some(map) = o.as_object_mut() {
                map.insert("stream_seq".into(), seq.into());
            }
            n += 1;
            say(out, &o.to_string());
        })
        .await;
    match printed {
        Ok(()) => {
            say(err, &format!("{n} output(s)"));
            0
        }
        Err(e) => {
            say(err, &format!("error: {e}"));
            1
        }
    }
}
