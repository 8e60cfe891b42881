//! The agent console from the command line: wiring the feed into an engine (`prompter run` with
//! a `feed:` section, `prompter demo --console`), and `prompter console-token`, which mints an
//! access link from the secret in the environment.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prompter_engine::config::Loaded;
use prompter_engine::engine::{Engine, Observer};
use prompter_engine::feed::access::{FeedAccess, Scope};
use prompter_engine::feed::http::{FeedConfig, FeedService, url_encode};
use prompter_engine::feed::{FeedHub, FeedSink};
use prompter_engine::recording::RecordedLine;
use prompter_engine::sink::{FnSink, Sink};
use prompter_engine::source::Source;
use prompter_engine::source::recording::{Pace, RecordingSource};
use prompter_engine::stats::Stats;
use tokio::sync::watch;

use crate::cli::{Stream, say};
use crate::demo::Style;

/// The feed's pieces for an engine: the hub, the sink and observer that fill it.
pub struct FeedWiring {
    /// The hub.
    pub hub: Arc<FeedHub>,
}

impl FeedWiring {
    /// A fresh hub.
    pub fn new() -> Self {
        FeedWiring {
            hub: Arc::new(FeedHub::new()),
        }
    }

    /// The sink to give the engine.
    pub fn sink(&self) -> Box<dyn Sink> {
        Box::new(FeedSink(self.hub.clone()))
    }

    /// The observer to give the engine.
    pub fn observer(&self) -> Arc<dyn Observer> {
        self.hub.clone()
    }

    /// The feed's service over this hub, with secrets from the process environment.
    ///
    /// # Errors
    /// A missing or weak secret, or a feedback log that cannot be opened (the message says
    /// which and how to fix it).
    pub fn service(
        &self,
        config: &FeedConfig,
        engine: Arc<Engine>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<FeedService>, String> {
        self.service_with_secret(config, None, engine, shutdown)
    }

    /// [`FeedWiring::service`], with `secret` as the token-signing secret when given (a demo or
    /// a bench that made one for its run); other secrets still from the environment.
    ///
    /// # Errors
    /// As [`FeedWiring::service`].
    pub fn service_with_secret(
        &self,
        config: &FeedConfig,
        secret: Option<String>,
        engine: Arc<Engine>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Arc<FeedService>, String> {
        let secret_env = config.secret_env.clone();
        let env = move |name: &str| match &secret {
            Some(s) if name == secret_env => Some(s.clone()),
            _ => std::env::var(name).ok(),
        };
        FeedService::new(config, &env, self.hub.clone(), Some(engine), shutdown)
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }
}

impl Default for FeedWiring {
    fn default() -> Self {
        FeedWiring::new()
    }
}

/// 32 random bytes as hex: a token-signing secret for a run that has none (the demo, the
/// feed bench).
pub(crate) fn random_secret() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for a feed secret: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Options of `prompter demo --console`.
pub struct DemoConsole {
    /// Where to listen.
    pub listen: String,
    /// Append feedback here.
    pub feedback_log: Option<PathBuf>,
    /// Playback speed.
    pub speed: f64,
    /// Stop when the call ends instead of serving until Ctrl-C.
    pub exit_at_end: bool,
}

/// Plays `lines` in real time into the console served on `opts.listen`; prints the link,
/// the transcript and the cards on the terminal as the plain demo does. Serves until Ctrl-C
/// (or the end of the call with `exit_at_end`).
#[allow(clippy::too_many_arguments, reason = "the demo's parts, flat")]
pub async fn demo(
    loaded: Loaded,
    lines: Vec<RecordedLine>,
    paths: Vec<PathBuf>,
    opts: DemoConsole,
    style: Style,
    out: &Stream,
    err: &Stream,
) -> u8 {
    let mut config = loaded.settings.feed.clone().unwrap_or_default();
    if opts.feedback_log.is_some() {
        config.feedback_log = opts.feedback_log.clone();
    }
    // The demo needs no set-up: without a secret in the environment it makes one for this run.
    let env_secret = std::env::var(&config.secret_env)
        .ok()
        .filter(|s| !s.trim().is_empty());
    let secret = match env_secret {
        Some(s) => s,
        None => match random_secret() {
            Ok(s) => s,
            Err(e) => {
                say(err, &format!("error: {e}"));
                return 1;
            }
        },
    };
    let wiring = FeedWiring::new();
    let cards_out = out.clone();
    let printer = FnSink::new("terminal", move |o: &prompter_core::output::Output| {
        say(&cards_out, &crate::demo::card(o, style));
    });
    let engine = Arc::new(
        Engine::new(
            loaded.pipelines,
            loaded.settings.clone(),
            vec![Box::new(printer), wiring.sink()],
            Arc::new(Stats::with_metrics(loaded.settings.metrics)),
        )
        .with_observer(wiring.observer()),
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let service = match wiring.service_with_secret(
        &config,
        Some(secret),
        engine.clone(),
        shutdown_rx.clone(),
    ) {
        Ok(s) => s,
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };
    let token = service.mint(&Scope::Supervisor);
    let routes = service
        .clone()
        .routes()
        .merge(prompter_engine::server::metrics_routes(
            engine.stats().clone(),
        ));
    let bound = match prompter_engine::server::serve(&opts.listen, routes, shutdown_rx.clone())
        .await
    {
        Ok(b) => b,
        Err(e) => {
            say(
                err,
                &format!(
                    "error: cannot listen on `{}`: {e} (pick another with --listen 127.0.0.1:0)",
                    opts.listen
                ),
            );
            return 1;
        }
    };
    let call = lines
        .first()
        .map(|l| l.conversation.clone())
        .unwrap_or_default();
    say(
        out,
        &style.bold("Prompter demo: the agent console, on a recorded sales call"),
    );
    say(
        out,
        &format!(
            "console: http://{bound}/console/#token={token}&c={}",
            url_encode(&call)
        ),
    );
    say(
        out,
        &style.dim(&format!(
            "all calls: http://{bound}/console/#token={token}  (the link holds a supervisor token valid for {} min; keep it private)",
            config.token_ttl_s / 60
        )),
    );
    say(out, "");
    let events_out = out.clone();
    let source =
        RecordingSource::new(lines, paths, Pace::Realtime(opts.speed)).on_event(move |e| {
            if let Some(line) = crate::demo::transcript_line(e, style) {
                say(&events_out, &line);
            }
        });
    let played = tokio::spawn(Box::new(source).run(engine.clone(), shutdown_rx.clone()));
    tokio::select! {
        r = played => {
            if let Ok(Err(e)) = r {
                say(err, &format!("error: {e}"));
            }
            if !opts.exit_at_end {
                say(out, &style.dim("end of call; the console stays open. Ctrl-C to stop."));
                crate::live::stop_requested().await;
            }
        }
        () = crate::live::stop_requested() => {}
    }
    let _ = shutdown_tx.send(true);
    engine.finish().await;
    let counts = service.feedback_counts();
    if !counts.is_empty() {
        let total: u64 = counts.iter().map(|c| c.count).sum();
        say(out, &style.dim(&format!("feedback received: {total}")));
    }
    0
}

/// Options of `prompter console-token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Engine config (for `feed.secret_env` and `server.listen`) [default: ./prompter.yaml if it exists].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// A token for this conversation's feed.
    #[arg(
        long,
        value_name = "ID",
        conflicts_with = "supervisor",
        required_unless_present = "supervisor"
    )]
    pub conversation: Option<String>,
    /// A token for every conversation (the supervisor view).
    #[arg(long)]
    pub supervisor: bool,
    /// Lifetime in seconds [default: `feed.token_ttl_s`, else 3600; at most 86400].
    #[arg(long, value_name = "SECS")]
    pub ttl: Option<u64>,
    /// The console's base URL for the printed link [default: http://<server.listen>].
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Print only the token.
    #[arg(long)]
    pub token_only: bool,
}

/// `prompter console-token`: mints an access link from the secret in the environment.
pub fn token(
    registry: &prompter_engine::registry::Registry,
    args: TokenArgs,
    out: &Stream,
    err: &Stream,
) -> u8 {
    let config_file = args
        .config
        .clone()
        .or_else(|| Some(PathBuf::from("prompter.yaml")).filter(|p| p.exists()));
    let (feed, listen) = match &config_file {
        Some(file) => {
            let Some(loaded) = crate::cli::load_for_run(registry, file, err) else {
                return 1;
            };
            (
                loaded.settings.feed.clone().unwrap_or_default(),
                loaded.settings.server.address().map(str::to_owned),
            )
        }
        None => (FeedConfig::default(), None),
    };
    let Some(secret) = std::env::var(&feed.secret_env)
        .ok()
        .filter(|s| !s.trim().is_empty())
    else {
        say(
            err,
            &format!(
                "error: no token-signing secret: set `{}` to the engine's secret (at least 32 random bytes, e.g. `openssl rand -hex 32`)",
                feed.secret_env
            ),
        );
        return 1;
    };
    let access = match FeedAccess::new(prompter_core::secret::Secret::new(secret)) {
        Ok(a) => a,
        Err(e) => {
            say(err, &format!("error: `{}`: {e}", feed.secret_env));
            return 1;
        }
    };
    let scope = match &args.conversation {
        Some(c) => Scope::Conversation(c.clone()),
        None => Scope::Supervisor,
    };
    let ttl = Duration::from_secs(args.ttl.unwrap_or(feed.token_ttl_s).clamp(1, 86_400));
    let token = access.mint(&scope, ttl, SystemTime::now());
    let base = args
        .url
        .clone()
        .or_else(|| listen.map(|l| format!("http://{l}")));
    match (base, args.token_only) {
        (Some(base), false) => {
            let base = base.trim_end_matches('/');
            let link = match &scope {
                Scope::Conversation(c) => {
                    format!("{base}/console/#token={token}&c={}", url_encode(c))
                }
                Scope::Supervisor => format!("{base}/console/#token={token}"),
            };
            say(out, &link);
        }
        _ => say(out, &token),
    }
    say(
        err,
        &format!(
            "valid for {} s; {}",
            ttl.as_secs(),
            match &scope {
                Scope::Conversation(c) => format!("opens conversation `{c}` only"),
                Scope::Supervisor => "opens every conversation (supervisor)".to_owned(),
            }
        ),
    );
    0
}
