//! `prompter run`: the engine on live calls. It follows Symbl connections on the Subscribe API
//! and routes their events through the configured pipelines until stopped (Ctrl-C or SIGTERM
//! stop it cleanly: sockets close, every accepted event is handled, every output is printed).
//!
//! Connections to follow are learned from any of:
//! - the command line (`--connection ID`, repeatable) and the config's `symbl.connections`;
//! - the engine's HTTP control endpoint (`--listen ADDR` or `symbl.listen`):
//!   `POST /connections/{id}` follows, `DELETE /connections/{id}` ends, `GET /connections`
//!   lists, `GET /health` answers `ok`;
//! - an integration server's update feed (`--updates URL` or `symbl.updates`):
//!   `connection_started` / `connection_exists` follow, `connection_stopped` ends.
//!
//! Outputs are printed as JSON lines on stdout, like `prompter replay`; a streamed answer
//! appears as `partial` drafts followed by its complete version under the same id.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use prompter_core::event::parse_frame;
use prompter_core::output::Output;
use prompter_symbl::SymblAuth;
use prompter_symbl::subscribe::{self, EndReason, Update};
use prompter_symbl::updates::{self, ConnectionChange};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::cli::{Stream, say};
use crate::engine::Engine as Router;
use crate::registry::Registry;
use crate::sink::FnSink;
use crate::stats::Stats;

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
}

/// What the sources ask of the engine.
#[derive(Debug)]
enum Control {
    /// Follow a connection; Symbl's conversation id when the source knows it; where to say
    /// whether it was accepted (HTTP).
    Follow(String, Option<String>, Option<oneshot::Sender<Reply>>),
    /// End a connection.
    Stop(String, Option<oneshot::Sender<Reply>>),
    /// The connections followed.
    List(oneshot::Sender<Vec<String>>),
}

/// The engine's answer to a control request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    Accepted,
    AlreadyFollowed,
    Stopping,
    Unknown,
    Invalid,
}

struct Followed {
    stop: watch::Sender<bool>,
    started: Instant,
    /// The subscription was established at least once.
    connected: bool,
    /// Symbl sent `conversation_completed` (the forwarder saw it).
    completed: Arc<std::sync::atomic::AtomicBool>,
    /// An end was requested (connection_stopped, DELETE); the conversation ends when the
    /// subscription does.
    stopping: bool,
    /// Symbl's conversation id, from the update feed (the events also carry it).
    conversation_id: Option<String>,
}

/// Runs `prompter run`; returns the exit code.
pub async fn run(registry: &Registry, args: RunArgs, out: &Stream, err: &Stream) -> u8 {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    let Some(loaded) = crate::cli::load_for_run(registry, &config, err) else {
        return 1;
    };
    let mut symbl = loaded.settings.symbl.clone().unwrap_or_default();
    // `${VAR:-}` left empty means "not set".
    symbl.updates = symbl.updates.filter(|u| !u.trim().is_empty());
    symbl.listen = symbl.listen.filter(|l| !l.trim().is_empty());
    symbl.connections.extend(args.connections.iter().cloned());
    if args.listen.is_some() {
        symbl.listen = args.listen.clone();
    }
    if args.updates.is_some() {
        symbl.updates = args.updates.clone();
    }
    if symbl.connections.is_empty() && symbl.listen.is_none() && symbl.updates.is_none() {
        say(
            err,
            "error: nothing to follow: pass --connection ID, --listen ADDR or --updates URL (or set `connections`, `listen` or `updates` under `symbl:`)",
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

    let stats = Arc::new(Stats::default());
    let printed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = printed.clone();
    let printer_out = out.clone();
    let printer = FnSink::new("stdout", move |o: &Output| {
        counter.fetch_add(1, Ordering::Relaxed);
        match serde_json::to_string(o) {
            Ok(line) => say(&printer_out, &line),
            Err(e) => tracing::error!(error = %e, "An output did not serialize."),
        }
    });
    let router = Arc::new(Router::new(
        loaded.pipelines,
        loaded.settings,
        vec![Box::new(printer)],
        stats.clone(),
    ));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(256);
    // Lifecycle news from the forwarders (connected, dropped, ended): few, and never allowed
    // to block a forwarder, so unbounded.
    let (life_tx, mut life_rx) = mpsc::unbounded_channel::<Update>();

    if let Some(url) = symbl.updates.clone() {
        let (tx, mut rx) = mpsc::channel::<ConnectionChange>(64);
        tokio::spawn(updates::watch_updates(
            url.clone(),
            symbl.reconnect,
            tx,
            shutdown_rx.clone(),
        ));
        let control = control_tx.clone();
        tokio::spawn(async move {
            while let Some(change) = rx.recv().await {
                let c = match change {
                    ConnectionChange::Live {
                        connection_id,
                        conversation_id,
                        ..
                    } => Control::Follow(connection_id, conversation_id, None),
                    ConnectionChange::Stopped { connection_id, .. } => {
                        Control::Stop(connection_id, None)
                    }
                };
                if control.send(c).await.is_err() {
                    return;
                }
            }
        });
        say(
            err,
            &format!("following the update feed {}", without_secrets(&url)),
        );
    }
    if let Some(addr) = symbl.listen.clone() {
        match serve_control(&addr, control_tx.clone(), shutdown_rx.clone()).await {
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
    for id in &symbl.connections {
        let _ = control_tx
            .send(Control::Follow(id.clone(), None, None))
            .await;
    }
    drop(control_tx);

    let mut followed: HashMap<Arc<str>, Followed> = HashMap::new();
    let mut forwarders = JoinSet::new();
    let mut sigterm = terminate_signal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = &mut ctrl_c => break,
            () = wait_terminate(&mut sigterm) => break,
            Some(control) = control_rx.recv() => match control {
                Control::Follow(id, conversation_id, reply) => {
                    let answer = if !valid_connection_id(&id) {
                        say(err, &format!("error: refusing to follow `{}`: not a connection id", id.escape_debug()));
                        Reply::Invalid
                    } else if let Some(f) = followed.get_mut(id.as_str()) {
                        f.conversation_id = f.conversation_id.take().or(conversation_id);
                        if f.stopping { Reply::Stopping } else { Reply::AlreadyFollowed }
                    } else {
                        let id: Arc<str> = Arc::from(id.as_str());
                        let (stop_tx, stop_rx) = watch::channel(false);
                        let completed = Arc::new(std::sync::atomic::AtomicBool::new(false));
                        let started = Instant::now();
                        followed.insert(id.clone(), Followed {
                            stop: stop_tx,
                            started,
                            connected: false,
                            completed: completed.clone(),
                            stopping: false,
                            conversation_id,
                        });
                        say(err, &format!("following connection {id}"));
                        // The follower feeds its own forwarder: a conversation whose queue is
                        // full holds back only its own socket, never the others or this loop.
                        let (tx, rx) = mpsc::channel::<Update>(256);
                        tokio::spawn({
                            let symbl = symbl.clone();
                            let auth = auth.clone();
                            let id = id.clone();
                            async move { subscribe::follow(&symbl, auth, id, tx, stop_rx).await }
                        });
                        forwarders.spawn(forward(id, rx, router.clone(), life_tx.clone(), started, completed));
                        Reply::Accepted
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(answer);
                    }
                }
                Control::Stop(id, reply) => {
                    let answer = match followed.get_mut(id.as_str()) {
                        Some(f) => {
                            f.stopping = true;
                            let _ = f.stop.send(true);
                            Reply::Accepted
                        }
                        None => Reply::Unknown,
                    };
                    if let Some(reply) = reply {
                        let _ = reply.send(answer);
                    }
                }
                Control::List(reply) => {
                    let _ = reply.send(followed.keys().map(|k| k.to_string()).collect());
                }
            },
            Some(update) = life_rx.recv() => match update {
                Update::Frame { .. } => {}
                Update::Connected { connection_id, reconnects } => {
                    if let Some(f) = followed.get_mut(&connection_id) {
                        f.connected = true;
                    }
                    if reconnects > 0 {
                        say(err, &format!("reconnected to connection {connection_id}"));
                    }
                }
                Update::Dropped { connection_id, reason, retry_in } => {
                    say(err, &format!("connection {connection_id} dropped ({reason}); reconnecting in {} ms", retry_in.as_millis()));
                }
                Update::Ended { connection_id, reason } => {
                    let Some(f) = followed.remove(&connection_id) else { continue };
                    match &reason {
                        EndReason::GaveUp(why) => say(err, &format!("error: lost connection {connection_id}: {why}")),
                        EndReason::Completed | EndReason::Stopped => say(err, &format!("connection {connection_id} ended")),
                    }
                    // A call that stopped without Symbl's `conversation_completed` still ends:
                    // post-call pipelines run and the conversation's state is released. Not for
                    // a connection that never connected (a wrong id), nor at shutdown.
                    let completed = f.completed.load(std::sync::atomic::Ordering::SeqCst);
                    if f.connected && !completed && (f.stopping || matches!(reason, EndReason::GaveUp(_))) {
                        let offset = f.started.elapsed().as_millis() as u64;
                        let mut frame = serde_json::json!({"type": "message", "message": {"type": "conversation_completed"}});
                        if let Some(conv) = &f.conversation_id {
                            frame["message"]["data"] = serde_json::json!({"conversationId": conv});
                        }
                        if let Ok(events) = parse_frame(&connection_id, offset, frame) {
                            // The forwarder already handed over every frame of this connection;
                            // a spawned dispatch keeps this loop free if that queue is full.
                            let router = router.clone();
                            tokio::spawn(async move {
                                for e in events {
                                    router.dispatch(e).await;
                                }
                            });
                        }
                    }
                }
            },
        }
    }
    say(
        err,
        "stopping: closing sockets and finishing accepted events",
    );
    let _ = shutdown_tx.send(true);
    for f in followed.values() {
        let _ = f.stop.send(true);
    }
    // Every frame already received is handed to its conversation before the router drains.
    while forwarders.join_next().await.is_some() {}
    router.finish().await;
    drop(router);
    let outputs = printed.load(Ordering::Relaxed);
    say(
        err,
        &format!(
            "stopped: {} event(s), {} output(s), {} stage error(s)",
            stats.events.load(Ordering::Relaxed),
            outputs,
            stats.stage_errors.load(Ordering::Relaxed)
        ),
    );
    0
}

/// One connection's forwarder: parses its frames in order and hands them to the router
/// (waiting only on this conversation's queue); lifecycle news goes to the control loop. When
/// the follower stops without saying why (it panicked), the connection is reported as lost.
async fn forward(
    connection_id: Arc<str>,
    mut rx: mpsc::Receiver<Update>,
    router: Arc<Router>,
    life: mpsc::UnboundedSender<Update>,
    started: Instant,
    completed: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut ended = false;
    while let Some(update) = rx.recv().await {
        match update {
            Update::Frame { frame, .. } => {
                let offset = started.elapsed().as_millis() as u64;
                match parse_frame(&connection_id, offset, frame) {
                    Ok(events) => {
                        for e in events {
                            if e.kind == prompter_core::event::EventKind::ConversationCompleted {
                                completed.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            router.dispatch(e).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(connection = %connection_id, error = %e, "Skipped a frame.");
                    }
                }
            }
            other => {
                ended |= matches!(other, Update::Ended { .. });
                let _ = life.send(other);
            }
        }
    }
    if !ended {
        let _ = life.send(Update::Ended {
            connection_id,
            reason: EndReason::GaveUp("the subscription task stopped unexpectedly".into()),
        });
    }
}

/// `url` without user info or query (they may carry credentials), for messages.
fn without_secrets(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if scheme.is_empty() {
        rest.to_owned()
    } else {
        format!("{scheme}://{rest}")
    }
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

/// Serves the control endpoint; returns the bound address.
async fn serve_control(
    addr: &str,
    control: mpsc::Sender<Control>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/health", get(|| async { "ok" }))
        .route("/connections", get(list))
        .route("/connections/{id}", post(follow).delete(stop))
        .with_state(control);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|s| *s).await;
            })
            .await;
    });
    Ok(bound)
}

fn valid_connection_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '=' | '+'))
}

async fn follow(
    State(control): State<mpsc::Sender<Control>>,
    Path(id): Path<String>,
) -> (StatusCode, String) {
    if !valid_connection_id(&id) {
        return (
            StatusCode::BAD_REQUEST,
            "a connection id is 1-256 characters of a-z, A-Z, 0-9, -, _, ., =, +\n".into(),
        );
    }
    let (tx, rx) = oneshot::channel();
    if control
        .send(Control::Follow(id.clone(), None, Some(tx)))
        .await
        .is_err()
    {
        return stopping();
    }
    match rx.await {
        Ok(Reply::Accepted) => (StatusCode::ACCEPTED, format!("following {id}\n")),
        Ok(Reply::AlreadyFollowed) => (StatusCode::OK, format!("already following {id}\n")),
        Ok(Reply::Stopping) => (
            StatusCode::CONFLICT,
            format!("{id} is ending; follow it again once it has ended\n"),
        ),
        Ok(Reply::Invalid) => (StatusCode::BAD_REQUEST, "not a connection id\n".into()),
        Ok(Reply::Unknown) | Err(_) => stopping(),
    }
}

async fn stop(
    State(control): State<mpsc::Sender<Control>>,
    Path(id): Path<String>,
) -> (StatusCode, String) {
    let (tx, rx) = oneshot::channel();
    if control
        .send(Control::Stop(id.clone(), Some(tx)))
        .await
        .is_err()
    {
        return stopping();
    }
    match rx.await {
        Ok(Reply::Unknown) => (StatusCode::NOT_FOUND, format!("not following {id}\n")),
        Ok(_) => (StatusCode::ACCEPTED, format!("ending {id}\n")),
        Err(_) => stopping(),
    }
}

fn stopping() -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the engine is stopping\n".into(),
    )
}

async fn list(State(control): State<mpsc::Sender<Control>>) -> (StatusCode, String) {
    let (tx, rx) = oneshot::channel();
    if control.send(Control::List(tx)).await.is_err() {
        return stopping();
    }
    match rx.await {
        Ok(ids) => (
            StatusCode::OK,
            serde_json::json!({ "connections": ids }).to_string(),
        ),
        Err(_) => stopping(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        assert_eq!(
            without_secrets("wss://user:pw@bridge.example.com/symbl/updates?token=abc"),
            "wss://bridge.example.com/symbl/updates"
        );
        assert_eq!(without_secrets("ws://127.0.0.1:9/x"), "ws://127.0.0.1:9/x");
    }

    #[test]
    fn connection_ids_are_checked() {
        assert!(valid_connection_id("6d1d1b3e-8f4a-4c39-9a53-2f7d0f0c9a11"));
        assert!(!valid_connection_id(""));
        assert!(!valid_connection_id("a/b"));
        assert!(!valid_connection_id(&"x".repeat(257)));
    }
}
