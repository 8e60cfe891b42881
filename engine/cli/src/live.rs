//! `prompter run`: the engine on live calls. It follows Symbl connections on the Subscribe API
//! and routes their events through the configured pipelines until stopped (Ctrl-C or SIGTERM
//! stop it cleanly: sockets close, every accepted event is handled, every output is printed).
//!
//! It wires the library together: an [`Engine`] with a stdout sink, a
//! [`prompter_engine::source::symbl::SymblSource`] (connections from `--connection ID`, the
//! config, the control API on the engine's server at `--listen ADDR` or `server.listen`, and
//! an integration server's update feed at `--updates URL` or `symbl.updates`), and the signals
//! that stop it.
//!
//! Outputs are printed as JSON lines on stdout, like `prompter replay`; a streamed answer
//! appears as `draft` versions followed by its `final` version under the same id.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prompter_symbl::SymblAuth;
use tokio::sync::watch;

use crate::cli::{Stream, say};
use crate::console::FeedWiring;
use prompter_engine::engine::Engine;
use prompter_engine::registry::Registry;
use prompter_engine::reload::{ReloadReport, Reloader, newest_change, watched_files};
use prompter_engine::sink::JsonLines;
use prompter_engine::source::symbl::SymblSource;
use prompter_engine::source::{Notices, Source};
use prompter_engine::stats::Stats;
use prompter_engine::twilio::bridge::Bridge;

/// Options of `prompter run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Engine config [default: ./prompter.yaml].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Follow this Symbl connection id from the start (repeatable).
    #[arg(long = "connection", value_name = "ID")]
    pub connections: Vec<String>,
    /// Serve the HTTP control endpoint on this address (e.g. 127.0.0.1:7070; port 0 picks one).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Follow an integration server's update feed (e.g. wss://bridge.example.com/symbl/updates).
    #[arg(long, value_name = "URL")]
    pub updates: Option<String>,
    /// Reload the configuration when the config file or a pipeline file changes (checked every
    /// second). SIGHUP and `POST /admin/reload` reload it too.
    #[arg(long)]
    pub watch: bool,
    /// This process's part when the config has a `cluster:` section: `ingest` (live sources to
    /// the events stream), `engine` (pipelines on the partitions it owns), `sinks` (console,
    /// notifiers and stdout fed from the outputs stream). Default: everything, no cluster.
    #[arg(long, value_enum, default_value_t = crate::cluster_cli::Role::Standalone)]
    pub role: crate::cluster_cli::Role,
}

/// Runs `prompter run`; returns the exit code.
pub async fn run(registry: &Registry, args: RunArgs, out: &Stream, err: &Stream) -> u8 {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    use crate::cluster_cli::Role;
    match args.role {
        Role::Engine => {
            return crate::cluster_cli::run_engine(registry, config, args.listen.clone(), err)
                .await;
        }
        Role::Sinks => {
            return crate::cluster_cli::run_sinks(registry, config, args.listen.clone(), out, err)
                .await;
        }
        Role::Standalone | Role::Ingest => {}
    }
    let Some(loaded) = crate::cli::load_for_run(registry, &config, err) else {
        return 1;
    };
    let ingest = if args.role == Role::Ingest {
        let Some(i) = crate::cluster_cli::ingest(&loaded, err).await else {
            return 1;
        };
        Some(i)
    } else {
        None
    };
    let mut symbl = loaded.settings.symbl.clone().unwrap_or_default();
    // `twilio.public_url: ${TWILIO_PUBLIC_URL:-}` left empty means "no bridge".
    let loaded_twilio = loaded
        .settings
        .twilio
        .clone()
        .filter(|t| !t.public_url.trim().is_empty());
    // `${VAR:-}` left empty means "not set".
    symbl.updates = symbl.updates.filter(|u| !u.trim().is_empty());
    symbl.connections.extend(args.connections.iter().cloned());
    if args.updates.is_some() {
        symbl.updates = args.updates.clone();
    }
    // The server's address: the flag, else `server.listen`, else the older `symbl.listen`.
    let listen = args
        .listen
        .clone()
        .or_else(|| loaded.settings.server.address().map(str::to_owned))
        .or_else(|| symbl.listen.clone().filter(|l| !l.trim().is_empty()));
    if symbl.connections.is_empty() && listen.is_none() && symbl.updates.is_none() {
        say(
            err,
            "error: nothing to follow: pass --connection ID, --listen ADDR or --updates URL (or set `connections` or `updates` under `symbl:`, or `listen` under `server:`)",
        );
        return 2;
    }
    let auth = match SymblAuth::shared(&symbl) {
        Ok(a) => a,
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };
    // Fail fast on bad credentials rather than on the first connection.
    if let Err(e) = auth.token().await {
        say(err, &format!("error: {e}"));
        return 1;
    }

    // The console lives on the engine's server: without one, there is nothing to serve it on.
    let feed_config = loaded.settings.feed.clone().filter(|_| {
        if listen.is_none() {
            say(
                err,
                "note: the agent console is off: it is served on the engine's server (set `listen` under `server:` or pass --listen ADDR)",
            );
        }
        listen.is_some()
    });
    let stats = Arc::new(Stats::with_metrics(loaded.settings.metrics.clone()));
    let printer_out = out.clone();
    let printer = JsonLines::new(move |line| say(&printer_out, line));
    let printed = printer.written();
    let feed = feed_config.as_ref().map(|_| FeedWiring::new());
    let Some((notifier_sinks, notifiers)) = crate::cli::notifiers(&loaded, err) else {
        return 1;
    };
    let mut sinks: Vec<Box<dyn prompter_engine::sink::Sink>> = vec![Box::new(printer)];
    sinks.extend(notifier_sinks);
    if let Some(feed) = &feed {
        sinks.push(feed.sink());
    }
    let engine_pipelines = loaded.pipelines.len();
    // The live tap (`prompter tap`): outputs as a sink, events as an observer.
    let tap = prompter_engine::tap::Tap::new();
    sinks.push(tap.sink());
    let mut engine = Engine::new(loaded.pipelines, loaded.settings, sinks, stats.clone())
        .with_observer(Arc::new(tap.clone()));
    if let Some(i) = &ingest {
        engine = engine.with_forwarder(i.clone());
    }
    if let Some(feed) = &feed {
        engine = engine.with_observer(feed.observer());
    }
    let engine = Arc::new(engine);
    let notices_err = err.clone();
    let notices: Notices = Arc::new(move |m: &str| say(&notices_err, m));
    let trackers = symbl.trackers.clone();
    let reconnect = symbl.reconnect;
    let streaming = prompter_symbl::streaming::StreamingClient::new(&symbl, auth.clone());
    let source = SymblSource::new(symbl, auth, notices.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut routes = source.routes();
    if let (Some(feed), Some(config)) = (&feed, &feed_config) {
        match feed.service(config, engine.clone(), shutdown_rx.clone()) {
            Ok(service) => routes = routes.merge(service.routes()),
            Err(e) => {
                say(err, &format!("error: {e}"));
                return 1;
            }
        }
    }
    let mut bridge_source = None;
    if let Some(twilio) = loaded_twilio {
        if listen.is_none() {
            say(
                err,
                "note: Twilio's webhooks are off: they are served on the engine's server (set `listen` under `server:` or pass --listen ADDR)",
            );
        } else {
            let env = |name: &str| std::env::var(name).ok();
            match bridge(
                twilio, &env, streaming, trackers, reconnect, &engine, notices,
            ) {
                Ok((twilio_routes, b)) => {
                    routes = routes.merge(twilio_routes);
                    bridge_source = Some(b);
                }
                Err(e) => {
                    say(err, &format!("error: {e}"));
                    return 1;
                }
            }
        }
    }
    // Metrics and readiness: notifier deliveries and the bridge are read at scrape time.
    register_collectors(&stats, &notifiers, bridge_source.as_ref());
    let pipelines = engine_pipelines;
    let mut checks: Vec<(&'static str, prompter_engine::server::Check)> = vec![(
        "config",
        Box::new(move || Ok(format!("{pipelines} pipeline(s) loaded"))),
    )];
    if !notifiers.is_empty() {
        let sinks = notifiers.clone();
        checks.push(("sinks", Box::new(move || sinks_ready(&sinks))));
    }
    if let Some(b) = bridge_source.clone() {
        checks.push((
            "twilio",
            Box::new(move || Ok(format!("{} call(s) bridged now", b.live_calls()))),
        ));
    }
    // Hot reload: SIGHUP, --watch, and the admin API when its token is set.
    let reloader = Arc::new(Reloader::new(engine.clone(), config.clone()));
    let admin_token = std::env::var(ADMIN_TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(prompter_core::secret::Secret::new);
    routes = routes
        .merge(prompter_engine::server::metrics_routes(stats.clone()))
        .merge(prompter_engine::server::ready_routes(checks))
        .merge(tap.routes(admin_token.clone()))
        .merge(reloader.clone().routes(admin_token));
    if let Some(addr) = &listen {
        match prompter_engine::server::serve(addr, routes, shutdown_rx.clone()).await {
            Ok(bound) => {
                say(
                    err,
                    &format!("control endpoint listening on http://{bound}"),
                );
                if feed.is_some() {
                    say(
                        err,
                        &format!(
                            "agent console on http://{bound}/console/ (an access link: prompter console-token --conversation ID --url http://{bound})"
                        ),
                    );
                }
            }
            Err(e) => {
                say(err, &format!("error: cannot listen on `{addr}`: {e}"));
                return 1;
            }
        }
    }
    let bridge_task = bridge_source
        .clone()
        .map(|b| tokio::spawn(Box::new(b).run(engine.clone(), shutdown_rx.clone())));
    let source = tokio::spawn(Box::new(source).run(engine.clone(), shutdown_rx));

    let mut sigterm = terminate_signal();
    let mut sighup = hangup_signal();
    let mut watching = args.watch.then(|| {
        let mut i = tokio::time::interval(std::time::Duration::from_secs(1));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    let mut seen = newest_change(&watched_files(&config, &engine));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = wait_terminate(&mut sigterm) => break,
            () = wait_terminate(&mut sighup) => {
                say_reload(err, "SIGHUP", &reloader.reload().await);
                seen = newest_change(&watched_files(&config, &engine));
            }
            () = tick(watching.as_mut()) => {
                let now = newest_change(&watched_files(&config, &engine));
                if now != seen {
                    seen = now;
                    say_reload(err, "a file changed", &reloader.reload().await);
                    seen = newest_change(&watched_files(&config, &engine)).max(seen);
                }
            }
        }
    }
    let _ = shutdown_tx.send(true);
    // Every frame already received is handed to its conversation before the engine drains.
    match source.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => say(err, &format!("error: {e}")),
        Err(e) => tracing::error!(error = %e, "The Symbl source panicked."),
    }
    // Every call's last events are handed over and each bridged call completed.
    if let Some(task) = bridge_task {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => say(err, &format!("error: {e}")),
            Err(e) => tracing::error!(error = %e, "The Twilio bridge panicked."),
        }
    }
    engine.finish().await;
    say(
        err,
        &format!(
            "stopped: {} event(s), {} output(s), {} stage error(s)",
            stats.events.load(Ordering::Relaxed),
            printed.load(Ordering::Relaxed),
            stats.stage_errors.load(Ordering::Relaxed)
        ),
    );
    crate::cli::report_notifiers(&notifiers, err);
    if let Some(i) = &ingest {
        crate::cluster_cli::report_ingest(i, err);
    }
    if let Some(b) = &bridge_source {
        let s = b.stats();
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        say(
            err,
            &format!(
                "twilio bridge: {} call(s), {} audio frame(s) ({} bytes), {} dropped, {} malformed, {} refused stream(s), {} Symbl reconnect(s)",
                n(&s.calls),
                n(&s.frames),
                n(&s.bytes),
                n(&s.dropped),
                n(&s.malformed),
                n(&s.refused),
                n(&s.reconnects)
            ),
        );
    }
    0
}

/// Ready unless every notifier sink is failing: disabled by its target, or dead-lettering
/// without having delivered anything.
fn sinks_ready(sinks: &[crate::cli::Notifier]) -> Result<String, String> {
    let failing: Vec<&str> = sinks
        .iter()
        .filter(|(_, s)| {
            s.disabled.load(Ordering::Relaxed) > 0
                || (s.dead_lettered.load(Ordering::Relaxed) > 0
                    && s.delivered.load(Ordering::Relaxed) == 0)
        })
        .map(|(name, _)| name.as_str())
        .collect();
    if failing.len() == sinks.len() {
        Err(format!(
            "every notifier sink is failing: {}",
            failing.join(", ")
        ))
    } else if failing.is_empty() {
        Ok(format!("{} notifier sink(s) delivering", sinks.len()))
    } else {
        Ok(format!("failing: {}", failing.join(", ")))
    }
}

/// The notifier sinks' deliveries and the Twilio bridge's counts, read at scrape time.
fn register_collectors(stats: &Stats, notifiers: &[crate::cli::Notifier], bridge: Option<&Bridge>) {
    use prompter_engine::metrics::{FnCollector, Reading, single};
    let sinks = notifiers.to_vec();
    stats.metrics.add_collector(Box::new(FnCollector(move || {
        let per =
            |name, help, f: &dyn Fn(&prompter_engine::delivery::DeliveryStats) -> u64| Reading {
                name,
                help,
                counter: true,
                samples: sinks
                    .iter()
                    .map(|(sink, s)| (vec![("sink", sink.clone())], f(s)))
                    .collect(),
            };
        vec![
            per(
                "prompter_sink_deliveries",
                "Deliveries a notifier sink completed",
                &|s| s.delivered.load(Ordering::Relaxed),
            ),
            per(
                "prompter_sink_retries",
                "Delivery attempts a notifier sink retried",
                &|s| s.retries.load(Ordering::Relaxed),
            ),
            per(
                "prompter_sink_dead_letters",
                "Deliveries a notifier sink gave up on (dead-lettered)",
                &|s| s.dead_lettered.load(Ordering::Relaxed),
            ),
        ]
    })));
    if let Some(b) = bridge.cloned() {
        stats.metrics.add_collector(Box::new(FnCollector(move || {
            let s = b.stats();
            let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            vec![
                single(
                    "prompter_twilio_calls_live",
                    "Calls the Twilio bridge carries now",
                    false,
                    b.live_calls() as u64,
                ),
                single(
                    "prompter_twilio_calls",
                    "Calls whose media stream started",
                    true,
                    n(&s.calls),
                ),
                single(
                    "prompter_twilio_audio_frames",
                    "Audio frames taken from Twilio",
                    true,
                    n(&s.frames),
                ),
                single(
                    "prompter_twilio_audio_frames_dropped",
                    "Audio frames dropped (a track's outage buffer was full)",
                    true,
                    n(&s.dropped),
                ),
                single(
                    "prompter_twilio_malformed_frames",
                    "Media Streams frames that were not valid",
                    true,
                    n(&s.malformed),
                ),
                single(
                    "prompter_twilio_refused_streams",
                    "Media streams refused (signature, token, no start)",
                    true,
                    n(&s.refused),
                ),
                single(
                    "prompter_twilio_symbl_reconnects",
                    "Symbl Streaming sessions re-opened after a drop",
                    true,
                    n(&s.reconnects),
                ),
            ]
        })));
    }
}

/// Twilio's webhooks, the media socket and `/symbl/updates`, and the bridge as a source.
fn bridge(
    config: prompter_engine::twilio::TwilioConfig,
    env: &dyn Fn(&str) -> Option<String>,
    streaming: prompter_symbl::streaming::StreamingClient,
    trackers: Vec<prompter_symbl::config::TrackerSpec>,
    reconnect: prompter_core::backoff::Backoff,
    engine: &Arc<Engine>,
    notices: Notices,
) -> Result<(axum::Router, Bridge), String> {
    use prompter_engine::twilio::{TwilioHooks, updates::Updates};
    let updates_token = match &config.updates_token_env {
        Some(name) => Some(
            env(name)
                .filter(|t| !t.trim().is_empty())
                .map(prompter_core::secret::Secret::new)
                .ok_or_else(|| format!("the update feed's token is not set: put it in `{name}`"))?,
        ),
        None => None,
    };
    let updates = Updates::new(updates_token);
    let updates_path = config.updates_path.clone();
    let hooks = TwilioHooks::new(config, env)?;
    let bridge = Bridge::new(
        hooks.config(),
        hooks.auth_token().clone(),
        streaming,
        trackers,
        reconnect,
        engine.clone(),
        updates.clone(),
        notices,
    )?;
    let routes = Arc::new(hooks)
        .routes()
        .merge(bridge.routes())
        .merge(updates.routes(&updates_path));
    Ok((routes, bridge))
}

/// The variable holding the admin API's bearer token (`POST /admin/reload`); unset: no API.
pub const ADMIN_TOKEN_ENV: &str = "PROMPTER_ADMIN_TOKEN";

/// Tells the operator what a reload did.
fn say_reload(err: &Stream, why: &str, report: &ReloadReport) {
    if report.ok {
        say(
            err,
            &format!(
                "reloaded ({why}): generation {}, {} pipeline(s); each call switches at its next event",
                report.generation, report.pipelines
            ),
        );
    } else {
        say(err, &report.diagnostics.join("\n"));
        say(
            err,
            &format!(
                "error: reload ({why}) refused: {} problem(s); generation {} keeps serving",
                report.diagnostics.len(),
                report.generation
            ),
        );
    }
}

async fn tick(i: Option<&mut tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(unix)]
fn hangup_signal() -> Terminate {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_signal() -> Terminate {
    None
}

#[cfg(unix)]
type Terminate = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Terminate = Option<()>;

#[cfg(unix)]
fn terminate_signal() -> Terminate {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok()
}
#[cfg(not(unix))]
fn terminate_signal() -> Terminate {
    None
}

#[cfg(unix)]
async fn wait_terminate(s: &mut Terminate) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn wait_terminate(_: &mut Terminate) {
    std::future::pending().await
}

/// Waits for Ctrl-C or SIGTERM (`docker stop`, systemd): a process that is a container's PID 1
/// gets no default action for either, so both are handled.
pub(crate) async fn stop_requested() {
    let mut sigterm = terminate_signal();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = wait_terminate(&mut sigterm) => {}
    }
}
