//! Following one live conversation on Symbl's Subscribe API
//! (`wss://api.symbl.ai/v1/subscribe/{connectionId}`), listen-only.
//!
//! [`follow`] connects with the access token (as `?access_token=` and `X-API-KEY`, as the SDKs
//! do), hands every text frame to the engine as parsed JSON, and when the socket drops it
//! reconnects with jittered exponential backoff (the crate's `socket` loop). Frames are
//! delivered at most once: a frame whose identity ([`crate::identity::frame_identity`]: its
//! message, insight or topic ids, its tracker matches, else its canonical JSON) is one of the
//! last [`DEDUP_WINDOW`] is a redelivery around a reconnect and is dropped, however it is
//! spaced or its keys ordered, so a reconnect never produces a duplicate suggestion. It pings
//! every 30 s and takes a socket on which nothing at all arrived for 2 × 30 s + 15 s for
//! half-open: it drops it and reconnects. It ends when the conversation completes
//! (`conversation_completed`), when told to stop, when Symbl closes the socket normally (code
//! 1000) or refuses it (403/404), or when reconnecting fails `reconnect.max_retries` times in a
//! row (the count restarts only after a socket that delivered a frame or stayed up 30 s).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use prompter_core::backoff::Backoff;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::{AuthError, SymblAuth};
use crate::config::SymblConfig;
use crate::identity::received_identity;
use crate::socket::{self, Budget, End, Hangup, OpenError, Peer, Step, Verdict, Ws};
use prompter_core::event::Received;

/// Frame identities remembered per connection to drop redeliveries (8 bytes each, twice).
pub const DEDUP_WINDOW: usize = 2048;

/// How [`follow_with`] paces and watches a socket; [`follow`] uses the defaults (pings every
/// 30 s, a socket silent for 75 s is dropped, a fresh retry budget after 30 s up, 20 s for a
/// handshake).
pub type FollowOptions = socket::SocketOptions;

/// What [`follow`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A frame of the conversation, parsed as JSON (not yet as an event).
    Frame {
        /// The connection it came from.
        connection_id: Arc<str>,
        /// The frame: a caption read on the fast path, or a JSON tree.
        frame: Received,
    },
    /// The socket is (re)connected; `attempt` is 0 for the first connection.
    Connected {
        /// The connection.
        connection_id: Arc<str>,
        /// How many reconnections this was (0 = first connection).
        reconnects: u32,
    },
    /// The socket dropped; a reconnection follows after `retry_in`.
    Dropped {
        /// The connection.
        connection_id: Arc<str>,
        /// Why.
        reason: String,
        /// When the next attempt is made.
        retry_in: Duration,
    },
    /// Following ended; no more frames come from this connection.
    Ended {
        /// The connection.
        connection_id: Arc<str>,
        /// Why.
        reason: EndReason,
    },
}

/// Why following a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// Symbl sent `conversation_completed`.
    Completed,
    /// The engine asked to stop (the connection stopped, or shutdown).
    Stopped,
    /// Reconnecting failed too many times; the message says why.
    GaveUp(String),
}

/// The identities ([`frame_identity`](crate::identity::frame_identity)) of the last [`DEDUP_WINDOW`] frames seen, to drop a
/// frame delivered twice (after a reconnect, or by two sockets of one conversation).
#[derive(Debug)]
pub struct Seen {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl Default for Seen {
    fn default() -> Self {
        Self::new()
    }
}

impl Seen {
    /// An empty window. It grows with the frames seen, up to [`DEDUP_WINDOW`]: allocated whole
    /// up front it would cost about 53 KiB per followed call, most calls never filling it.
    pub fn new() -> Self {
        Seen {
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    /// True the first time `identity` is seen (within the window).
    pub fn first_time(&mut self, identity: u64) -> bool {
        if !self.set.insert(identity) {
            return false;
        }
        self.order.push_back(identity);
        if self.order.len() > DEDUP_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

/// Follows `connection_id` until it completes, `stop` turns true, or reconnecting gives up;
/// sends every frame, connection change and the end to `tx`. Uses the default
/// [`FollowOptions`].
pub async fn follow(
    config: &SymblConfig,
    auth: Arc<SymblAuth>,
    connection_id: Arc<str>,
    tx: mpsc::Sender<Update>,
    stop: watch::Receiver<bool>,
) {
    follow_with(
        config.keepalive.options(),
        config,
        auth,
        connection_id,
        tx,
        stop,
    )
    .await;
}

/// [`follow`] with explicit pacing.
///
/// Retries: a dropped socket, a handshake answered 401 (after forgetting the cached token), 429
/// or 5xx, and a connection error are retried with `config.reconnect` pacing; the retry budget
/// starts afresh only after a socket that delivered a frame or stayed up
/// [`FollowOptions::stable_after`], so a server that accepts and closes at once is not retried
/// forever. Final at once (`Ended { reason: GaveUp(..) }`, no retry): a close frame with code
/// 1000 (normal closure), a handshake refused with 403 or 404, credentials Symbl rejects.
pub async fn follow_with(
    options: FollowOptions,
    config: &SymblConfig,
    auth: Arc<SymblAuth>,
    connection_id: Arc<str>,
    tx: mpsc::Sender<Update>,
    mut stop: watch::Receiver<bool>,
) {
    let retry: Backoff = config.reconnect;
    let mut subscriber = Subscriber {
        url: format!("{}/v1/subscribe/{connection_id}", config.ws_base()),
        auth: &auth,
        connection_id: &connection_id,
        tx: &tx,
        seen: Seen::new(),
    };
    let end = socket::run(&mut subscriber, &options, retry, Budget::Bounded, &mut stop).await;
    let reason = match end {
        End::Completed => EndReason::Completed,
        End::Stopped => EndReason::Stopped,
        End::Final(reason) => {
            tracing::warn!(connection = %connection_id, reason = %reason, "Subscribe socket ended for good; not reconnecting.");
            EndReason::GaveUp(reason)
        }
        End::GaveUp(reason) => EndReason::GaveUp(reason),
    };
    let _ = tx
        .send(Update::Ended {
            connection_id,
            reason,
        })
        .await;
}

/// The Subscribe API as a [`Peer`] of the reconnecting loop; lives as long as the following,
/// so the redelivery window spans reconnections.
struct Subscriber<'a> {
    /// `{ws_base}/v1/subscribe/{connection_id}`, without the token.
    url: String,
    auth: &'a SymblAuth,
    connection_id: &'a Arc<str>,
    tx: &'a mpsc::Sender<Update>,
    seen: Seen,
}

impl Peer for Subscriber<'_> {
    async fn connect(&mut self, handshake_timeout: Duration) -> Result<Ws, Verdict> {
        // Boxed, as the handshake: a token fetch's state is not kept for the whole call.
        let token = match Box::pin(self.auth.token()).await {
            Ok(t) => t,
            Err(e @ (AuthError::Rejected { .. } | AuthError::MissingCredential { .. })) => {
                return Err(Verdict::Final(e.to_string()));
            }
            Err(e) => return Err(Verdict::Retry(e.to_string())),
        };
        let mut request = format!("{}?access_token={}", self.url, token.expose())
            .into_client_request()
            .map_err(|e| Verdict::Final(format!("bad subscribe URL: {e}")))?;
        if let Ok(v) = token.expose().parse() {
            request.headers_mut().insert("X-API-KEY", v);
        }
        match socket::open(request, handshake_timeout).await {
            Ok(ws) => Ok(ws),
            Err(OpenError::Connect(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status();
                let why = format!("the subscribe handshake was refused ({status})");
                Err(match status.as_u16() {
                    401 => {
                        // The token may have been revoked or expired early: a new one next time.
                        self.auth.invalidate_token(&token).await;
                        Verdict::Retry(why)
                    }
                    403 | 404 => Verdict::Final(why),
                    _ => Verdict::Retry(why),
                })
            }
            Err(e) => Err(Verdict::Retry(e.to_string())),
        }
    }

    async fn opened(&mut self, reconnects: u32) {
        tracing::info!(connection = %self.connection_id, reconnects, "Subscribed.");
        let _ = self
            .tx
            .send(Update::Connected {
                connection_id: self.connection_id.clone(),
                reconnects,
            })
            .await;
    }

    async fn text(&mut self, text: &str) -> Step {
        let frame = match Received::parse(text) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(connection = %self.connection_id, error = %e, "Skipped a subscribe frame that is not JSON.");
                return Step::Skipped;
            }
        };
        if !self.seen.first_time(received_identity(&frame)) {
            tracing::debug!(connection = %self.connection_id, "Dropped a redelivered frame.");
            return Step::Skipped;
        }
        let completed = matches!(&frame, Received::Tree(v) if is_completed(v));
        let update = Update::Frame {
            connection_id: self.connection_id.clone(),
            frame,
        };
        if self.tx.send(update).await.is_err() {
            Step::Stop
        } else if completed {
            Step::Complete
        } else {
            Step::Delivered
        }
    }

    fn hangup(&self, how: Hangup<'_>) -> Verdict {
        match how {
            Hangup::Close(Some(f)) if f.code == CloseCode::Normal => Verdict::Final(format!(
                "closed by Symbl (1000 normal closure{})",
                if f.reason.is_empty() {
                    String::new()
                } else {
                    format!(": {}", f.reason)
                }
            )),
            Hangup::Close(Some(f)) => {
                Verdict::Retry(format!("closed by Symbl ({}: {})", f.code, f.reason))
            }
            Hangup::Close(None) => Verdict::Retry("closed by Symbl".into()),
            Hangup::Eof => Verdict::Retry("the socket closed".into()),
        }
    }

    fn clean(&self, text: &str) -> String {
        redact(text)
    }

    fn silent(&self, idle: Duration) {
        tracing::warn!(connection = %self.connection_id, idle_s = idle.as_secs_f64(), "Nothing heard on the subscribe socket; taking it for dead.");
    }

    async fn retrying(&mut self, reason: &str, wait: Duration) {
        tracing::warn!(connection = %self.connection_id, error = %reason, retry_in_ms = wait.as_millis() as u64, "Subscribe socket dropped; reconnecting.");
        let _ = self
            .tx
            .send(Update::Dropped {
                connection_id: self.connection_id.clone(),
                reason: reason.to_owned(),
                retry_in: wait,
            })
            .await;
    }
}

/// `{"type":"message","message":{"type":"conversation_completed"}}`.
fn is_completed(frame: &serde_json::Value) -> bool {
    frame.get("type").and_then(|t| t.as_str()) == Some("message")
        && frame
            .get("message")
            .and_then(|m| m.get("type"))
            .and_then(|t| t.as_str())
            == Some("conversation_completed")
}

/// Removes an `access_token=...` value from an error text.
fn redact(text: &str) -> String {
    match text.find("access_token=") {
        Some(i) => {
            let start = i + "access_token=".len();
            let end = text[start..]
                .find(['&', ' ', '"'])
                .map_or(text.len(), |j| start + j);
            format!("{}***{}", &text[..start], &text[end..])
        }
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests;
