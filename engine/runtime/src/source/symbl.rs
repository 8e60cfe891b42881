//! Live Symbl connections as a source: each connection followed on the Subscribe API is one
//! conversation.
//!
//! Connections to follow are learned from the command line and the config
//! (`symbl.connections`), the HTTP control API mounted on the engine's server
//! ([`SymblSource::routes`]: `POST /connections/{id}` follows, `DELETE /connections/{id}` ends,
//! `GET /connections` lists), and an integration server's update feed (`symbl.updates`:
//! `connection_started` / `connection_exists` follow, `connection_stopped` ends).
//!
//! Each connection has its own forwarder, so a conversation whose queue is full holds back only
//! its own socket, never the others or the control loop. A connection that stops without
//! Symbl's `conversation_completed` is completed by the engine itself (post-call pipelines run),
//! before the source returns.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use futures_util::FutureExt;
use prompter_core::event::parse_frame;
use prompter_symbl::subscribe::{self, EndReason, Update};
use prompter_symbl::updates::{self, ConnectionChange};
use prompter_symbl::{SymblAuth, SymblConfig};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use super::{Notices, Source, SourceError};
use crate::engine::Engine;

/// Control requests queued at most (HTTP and the update feed wait when it is full).
const CONTROL_QUEUE: usize = 256;

/// What the control API and the update feed ask of the source.
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

/// The answer to a control request.
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
    completed: Arc<AtomicBool>,
    /// An end was requested (connection_stopped, DELETE); the conversation ends when the
    /// subscription does.
    stopping: bool,
    /// Symbl's conversation id, from the update feed (the events also carry it).
    conversation_id: Option<String>,
}

/// Live Symbl connections.
pub struct SymblSource {
    config: SymblConfig,
    auth: Arc<SymblAuth>,
    connections: Vec<String>,
    notices: Notices,
    control_tx: mpsc::Sender<Control>,
    control_rx: mpsc::Receiver<Control>,
}

impl SymblSource {
    /// A source following `config`'s connections (and `updates` feed), with `auth`; notices
    /// for the operator (connections followed, dropped, ended) go to `notices`.
    pub fn new(config: SymblConfig, auth: Arc<SymblAuth>, notices: Notices) -> Self {
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        SymblSource {
            connections: config.connections.clone(),
            config,
            auth,
            notices,
            control_tx,
            control_rx,
        }
    }

    /// The control API, to mount on the engine's server.
    pub fn routes(&self) -> axum::Router {
        axum::Router::new()
            .route("/connections", get(list))
            .route("/connections/{id}", post(follow).delete(stop))
            .with_state(self.control_tx.clone())
    }
}

/// The source's running state: followed connections, their forwarders, and the dispatches of
/// completions the engine makes itself.
struct Running {
    config: SymblConfig,
    auth: Arc<SymblAuth>,
    engine: Arc<Engine>,
    notices: Notices,
    followed: HashMap<Arc<str>, Followed>,
    forwarders: JoinSet<()>,
    completions: JoinSet<()>,
    life_tx: mpsc::UnboundedSender<Update>,
}

#[prompter_core::async_trait]
impl Source for SymblSource {
    fn name(&self) -> &str {
        "symbl"
    }

    async fn run(
        self: Box<Self>,
        engine: Arc<Engine>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), SourceError> {
        let SymblSource {
            config,
            auth,
            connections,
            notices,
            control_tx,
            mut control_rx,
        } = *self;
        // Lifecycle news from the forwarders (connected, dropped, ended): few, and never
        // allowed to block a forwarder, so unbounded.
        let (life_tx, mut life_rx) = mpsc::unbounded_channel::<Update>();
        if let Some(url) = config.updates.clone().filter(|u| !u.trim().is_empty()) {
            let (tx, mut rx) = mpsc::channel::<ConnectionChange>(64);
            tokio::spawn(updates::watch_updates(
                url.clone(),
                config.reconnect,
                tx,
                shutdown.clone(),
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
            notices(&format!(
                "following the update feed {}",
                without_secrets(&url)
            ));
        }
        drop(control_tx);
        let mut running = Running {
            config,
            auth,
            engine,
            notices,
            followed: HashMap::new(),
            forwarders: JoinSet::new(),
            completions: JoinSet::new(),
            life_tx,
        };
        // Followed directly, not through the control queue: any number of them, none waits.
        for id in connections {
            running.follow(id, None);
        }
        loop {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                Some(control) = control_rx.recv() => running.control(control),
                Some(update) = life_rx.recv() => running.lifecycle(update),
            }
        }
        running.stop().await;
        Ok(())
    }
}

impl Running {
    fn follow(&mut self, id: String, conversation_id: Option<String>) -> Reply {
        if !valid_connection_id(&id) {
            (self.notices)(&format!(
                "error: refusing to follow `{}`: not a connection id",
                id.escape_debug()
            ));
            return Reply::Invalid;
        }
        if let Some(f) = self.followed.get_mut(id.as_str()) {
            f.conversation_id = f.conversation_id.take().or(conversation_id);
            return if f.stopping {
                Reply::Stopping
            } else {
                Reply::AlreadyFollowed
            };
        }
        let id: Arc<str> = Arc::from(id.as_str());
        let (stop_tx, stop_rx) = watch::channel(false);
        let completed = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        self.followed.insert(
            id.clone(),
            Followed {
                stop: stop_tx,
                started,
                connected: false,
                completed: completed.clone(),
                stopping: false,
                conversation_id,
            },
        );
        (self.notices)(&format!("following connection {id}"));
        // The follower feeds its own forwarder: a conversation whose queue is full holds back
        // only its own socket, never the others or the control loop. Both run in one task (a
        // frame wakes no other task on its way to the conversation's queue); a follower that
        // panics ends its forwarder, which reports the connection lost.
        let (tx, rx) = mpsc::channel::<Update>(256);
        let follower = {
            let symbl = self.config.clone();
            let auth = self.auth.clone();
            let id = id.clone();
            async move {
                let follow = subscribe::follow(&symbl, auth, id, tx, stop_rx);
                if std::panic::AssertUnwindSafe(follow)
                    .catch_unwind()
                    .await
                    .is_err()
                {
                    tracing::error!("A subscription task panicked.");
                }
            }
        };
        let forwarder = forward(
            id,
            rx,
            self.engine.clone(),
            self.life_tx.clone(),
            started,
            completed,
        );
        self.forwarders.spawn(async move {
            tokio::join!(follower, forwarder);
        });
        Reply::Accepted
    }

    fn control(&mut self, control: Control) {
        match control {
            Control::Follow(id, conversation_id, reply) => {
                let answer = self.follow(id, conversation_id);
                if let Some(reply) = reply {
                    let _ = reply.send(answer);
                }
            }
            Control::Stop(id, reply) => {
                let answer = match self.followed.get_mut(id.as_str()) {
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
                let _ = reply.send(self.followed.keys().map(|k| k.to_string()).collect());
            }
        }
    }

    fn lifecycle(&mut self, update: Update) {
        let say = &self.notices;
        match update {
            Update::Frame { .. } => {}
            Update::Connected {
                connection_id,
                reconnects,
            } => {
                if let Some(f) = self.followed.get_mut(&connection_id) {
                    f.connected = true;
                }
                if reconnects > 0 {
                    say(&format!("reconnected to connection {connection_id}"));
                }
            }
            Update::Dropped {
                connection_id,
                reason,
                retry_in,
            } => {
                say(&format!(
                    "connection {connection_id} dropped ({reason}); reconnecting in {} ms",
                    retry_in.as_millis()
                ));
            }
            Update::Ended {
                connection_id,
                reason,
            } => {
                let Some(f) = self.followed.remove(&connection_id) else {
                    return;
                };
                match &reason {
                    EndReason::GaveUp(why) => {
                        say(&format!("error: lost connection {connection_id}: {why}"));
                    }
                    EndReason::Completed | EndReason::Stopped => {
                        say(&format!("connection {connection_id} ended"));
                    }
                }
                // A call that stopped without Symbl's `conversation_completed` still ends:
                // post-call pipelines run and the conversation's state is released. Not for a
                // connection that never connected (a wrong id), nor at shutdown.
                let completed = f.completed.load(Ordering::SeqCst);
                if f.connected
                    && !completed
                    && (f.stopping || matches!(reason, EndReason::GaveUp(_)))
                {
                    self.complete(&connection_id, &f);
                }
            }
        }
    }

    /// Ends `connection_id`'s conversation as Symbl would have: a `conversation_completed`
    /// carrying the conversation id the feed announced. Dispatched on its own task (the
    /// forwarder already handed over every frame of the connection) so the control loop stays
    /// free if that queue is full; [`Running::stop`] waits for it, so it always reaches the
    /// engine before the engine finishes.
    fn complete(&mut self, connection_id: &str, f: &Followed) {
        let offset = f.started.elapsed().as_millis() as u64;
        let mut frame =
            serde_json::json!({"type": "message", "message": {"type": "conversation_completed"}});
        if let Some(conv) = &f.conversation_id {
            frame["message"]["data"] = serde_json::json!({"conversationId": conv});
        }
        if let Ok(events) = parse_frame(connection_id, offset, frame) {
            let engine = self.engine.clone();
            self.completions.spawn(async move {
                for e in events {
                    engine.dispatch_from("symbl", e).await;
                }
            });
        }
        while self.completions.try_join_next().is_some() {}
    }

    /// Closes every socket and waits until every frame received and every completion is
    /// dispatched.
    async fn stop(mut self) {
        (self.notices)("stopping: closing sockets and finishing accepted events");
        for f in self.followed.values() {
            let _ = f.stop.send(true);
        }
        while self.forwarders.join_next().await.is_some() {}
        while self.completions.join_next().await.is_some() {}
    }
}

/// One connection's forwarder: parses its frames in order and hands them to the engine
/// (waiting only on this conversation's queue); lifecycle news goes to the control loop. When
/// the follower stops without saying why (it panicked), the connection is reported as lost.
async fn forward(
    connection_id: Arc<str>,
    mut rx: mpsc::Receiver<Update>,
    engine: Arc<Engine>,
    life: mpsc::UnboundedSender<Update>,
    started: Instant,
    completed: Arc<AtomicBool>,
) {
    let mut ended = false;
    while let Some(update) = rx.recv().await {
        match update {
            Update::Frame { frame, .. } => {
                let offset = started.elapsed().as_millis() as u64;
                match frame.into_events(&connection_id, offset) {
                    Ok(events) => {
                        for e in events {
                            if e.kind == prompter_core::event::EventKind::ConversationCompleted {
                                completed.store(true, Ordering::SeqCst);
                            }
                            engine.dispatch_from("symbl", e).await;
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
pub(crate) fn without_secrets(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if scheme.is_empty() {
        rest.to_owned()
    } else {
        format!("{scheme}://{rest}")
    }
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
