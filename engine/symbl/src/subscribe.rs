//! Following one live conversation on Symbl's Subscribe API
//! (`wss://api.symbl.ai/v1/subscribe/{connectionId}`), listen-only.
//!
//! [`follow`] connects with the access token (as `?access_token=` and `X-API-KEY`, as the SDKs
//! do), hands every text frame to the engine as parsed JSON, and when the socket drops it
//! reconnects with jittered exponential backoff. Frames are delivered at most once: a frame
//! identical to one of the last [`DEDUP_WINDOW`] (a redelivery around a reconnect) is dropped,
//! so a reconnect never produces a duplicate suggestion. It pings every 30 s and takes a socket
//! on which nothing at all arrived for 2 × 30 s + 15 s for half-open: it drops it and
//! reconnects. It ends when the conversation completes (`conversation_completed`), when told to
//! stop, when Symbl closes the socket normally (code 1000) or refuses it (403/404), or when
//! reconnecting fails `reconnect.max_retries` times in a row (the count restarts only after a
//! socket that delivered a frame or stayed up 30 s).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prompter_core::backoff::Backoff;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::auth::{AuthError, SymblAuth};
use crate::config::SymblConfig;

/// Frames remembered per connection to drop redeliveries.
pub const DEDUP_WINDOW: usize = 2048;

/// How [`follow_with`] paces and watches a socket; [`follow`] uses the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowOptions {
    /// Ping period that keeps idle sockets open through proxies (the Go SDK uses 30 s).
    pub ping_every: Duration,
    /// A socket on which nothing at all (frame, pong, ping) arrived for this long is taken for
    /// half-open: it is dropped and reconnected. Default: 2 × `ping_every` + 15 s.
    pub idle_timeout: Duration,
    /// A socket that stayed up this long (or delivered a frame) worked: its drop starts a fresh
    /// retry budget. Default 30 s.
    pub stable_after: Duration,
    /// A connection attempt that takes longer than this has failed. Default 20 s.
    pub handshake_timeout: Duration,
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions::with_ping_every(Duration::from_secs(30))
    }
}

impl FollowOptions {
    /// The defaults, with pings every `ping_every` and the idle timeout that goes with it
    /// (2 × `ping_every` + 15 s).
    pub fn with_ping_every(ping_every: Duration) -> Self {
        FollowOptions {
            ping_every,
            idle_timeout: ping_every
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(15)),
            stable_after: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(20),
        }
    }
}

/// `75 s`, or `0.3 s` for the short periods tests use.
pub(crate) fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// What [`follow`] reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A frame of the conversation, parsed as JSON (not yet as an event).
    Frame {
        /// The connection it came from.
        connection_id: Arc<str>,
        /// The frame.
        frame: serde_json::Value,
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

/// The last frames seen, to drop redeliveries.
struct Seen {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl Seen {
    fn new() -> Self {
        Seen {
            order: VecDeque::with_capacity(DEDUP_WINDOW),
            set: HashSet::with_capacity(DEDUP_WINDOW),
        }
    }

    /// True the first time `text` is seen (within the window).
    fn first_time(&mut self, text: &str) -> bool {
        let h = fnv(text.as_bytes());
        if !self.set.insert(h) {
            return false;
        }
        self.order.push_back(h);
        if self.order.len() > DEDUP_WINDOW
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
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
        FollowOptions::default(),
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
    let url = format!("{}/v1/subscribe/{connection_id}", config.ws_base());
    let retry: Backoff = config.reconnect;
    let mut seen = Seen::new();
    let mut failures = 0u32;
    let mut reconnects = 0u32;
    let end = |reason| Update::Ended {
        connection_id: connection_id.clone(),
        reason,
    };
    loop {
        let stop_now = *stop.borrow();
        if stop_now {
            let _ = tx.send(end(EndReason::Stopped)).await;
            return;
        }
        let session = Session {
            options: &options,
            url: &url,
            auth: &auth,
            connection_id: &connection_id,
            tx: &tx,
        };
        let outcome = tokio::select! {
            o = session.run(&mut seen, reconnects) => o,
            () = stopped(&mut stop) => Outcome::Stopped,
        };
        let reason = match outcome {
            Outcome::Completed => {
                let _ = tx.send(end(EndReason::Completed)).await;
                return;
            }
            Outcome::Stopped => {
                let _ = tx.send(end(EndReason::Stopped)).await;
                return;
            }
            Outcome::Final(reason) => {
                tracing::warn!(connection = %connection_id, reason = %reason, "Subscribe socket ended for good; not reconnecting.");
                let _ = tx.send(end(EndReason::GaveUp(reason))).await;
                return;
            }
            Outcome::Dropped { reason, worked } => {
                if worked {
                    // It worked for a while: a fresh drop starts a fresh retry budget.
                    failures = 0;
                }
                reason
            }
        };
        if !retry.allows_retry(failures) {
            let _ = tx
                .send(end(EndReason::GaveUp(format!(
                    "{reason} (gave up after {} attempts)",
                    failures.saturating_add(1)
                ))))
                .await;
            return;
        }
        let wait = retry.wait(failures, None);
        tracing::warn!(connection = %connection_id, error = %reason, retry_in_ms = wait.as_millis() as u64, "Subscribe socket dropped; reconnecting.");
        let _ = tx
            .send(Update::Dropped {
                connection_id: connection_id.clone(),
                reason,
                retry_in: wait,
            })
            .await;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => {
                let _ = tx.send(end(EndReason::Stopped)).await;
                return;
            }
        }
        failures = failures.saturating_add(1);
        reconnects = reconnects.saturating_add(1);
    }
}

enum Outcome {
    Completed,
    Stopped,
    /// Retrying cannot help (normal closure, 403/404, rejected credentials).
    Final(String),
    /// Worth retrying; `worked` when the socket delivered a frame or stayed up long enough.
    Dropped {
        reason: String,
        worked: bool,
    },
}

/// What one socket's life needs.
struct Session<'a> {
    options: &'a FollowOptions,
    url: &'a str,
    auth: &'a SymblAuth,
    connection_id: &'a Arc<str>,
    tx: &'a mpsc::Sender<Update>,
}

impl Session<'_> {
    /// One socket's life: connect, relay frames until it ends.
    async fn run(&self, seen: &mut Seen, reconnects: u32) -> Outcome {
        let Session {
            options,
            url,
            auth,
            connection_id,
            tx,
        } = *self;
        let failed = |reason: String| Outcome::Dropped {
            reason,
            worked: false,
        };
        let token = match auth.token().await {
            Ok(t) => t,
            Err(e @ (AuthError::Rejected { .. } | AuthError::MissingCredential { .. })) => {
                return Outcome::Final(e.to_string());
            }
            Err(e) => return failed(e.to_string()),
        };
        let mut request = match format!("{url}?access_token={}", token.expose())
            .into_client_request()
        {
            Ok(r) => r,
            Err(e) => {
                return Outcome::Final(format!("bad subscribe URL: {}", redact(&e.to_string())));
            }
        };
        if let Ok(v) = token.expose().parse() {
            request.headers_mut().insert("X-API-KEY", v);
        }
        let connected = tokio::time::timeout(
            options.handshake_timeout,
            tokio_tungstenite::connect_async(request),
        )
        .await;
        let mut socket = match connected {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
                let status = resp.status();
                let why = format!("the subscribe handshake was refused ({status})");
                return match status.as_u16() {
                    401 => {
                        // The token may have been revoked or expired early: a new one next time.
                        auth.invalidate().await;
                        failed(why)
                    }
                    403 | 404 => Outcome::Final(why),
                    _ => failed(why),
                };
            }
            Ok(Err(e)) => return failed(format!("cannot connect: {}", redact(&e.to_string()))),
            Err(_) => {
                return failed(format!(
                    "no handshake within {}",
                    secs(options.handshake_timeout)
                ));
            }
        };
        tracing::info!(connection = %connection_id, reconnects, "Subscribed.");
        let _ = tx
            .send(Update::Connected {
                connection_id: connection_id.clone(),
                reconnects,
            })
            .await;
        let opened = Instant::now();
        let mut delivered = false;
        let dropped = |reason: String, delivered: bool| Outcome::Dropped {
            reason,
            worked: delivered || opened.elapsed() >= options.stable_after,
        };
        let mut ping = tokio::time::interval_at(opened + options.ping_every, options.ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_heard = opened;
        let no_data = || format!("no data for {}", secs(options.idle_timeout));
        loop {
            let idle_at = last_heard + options.idle_timeout;
            tokio::select! {
                // Read first: a frame already waiting must not lose to the idle timer after a
                // slow hand-off to the engine.
                biased;
                msg = socket.next() => {
                    last_heard = Instant::now();
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            if !seen.first_time(&text) {
                                tracing::debug!(connection = %connection_id, "Dropped a redelivered frame.");
                                continue;
                            }
                            let frame: serde_json::Value = match serde_json::from_str(&text) {
                                Ok(v) => v,
                                Err(e) => {
                                    tracing::warn!(connection = %connection_id, error = %e, "Skipped a subscribe frame that is not JSON.");
                                    continue;
                                }
                            };
                            let completed = is_completed(&frame);
                            if tx.send(Update::Frame { connection_id: connection_id.clone(), frame }).await.is_err() {
                                return Outcome::Stopped;
                            }
                            delivered = true;
                            if completed {
                                let _ = socket.close(None).await;
                                return Outcome::Completed;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            return match frame {
                                Some(f) if f.code == CloseCode::Normal => Outcome::Final(format!(
                                    "closed by Symbl (1000 normal closure{})",
                                    if f.reason.is_empty() { String::new() } else { format!(": {}", f.reason) }
                                )),
                                Some(f) => dropped(format!("closed by Symbl ({}: {})", f.code, f.reason), delivered),
                                None => dropped("closed by Symbl".into(), delivered),
                            };
                        }
                        // Pings (answered by tungstenite), pongs, binary: proof of life only.
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return dropped(format!("socket error: {}", redact(&e.to_string())), delivered),
                        None => return dropped("the socket closed".into(), delivered),
                    }
                }
                _ = ping.tick() => {
                    // A half-open socket may never finish a send: bound it by the idle timer.
                    match tokio::time::timeout_at(idle_at, socket.send(Message::Ping(Vec::new().into()))).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return dropped(format!("ping failed: {}", redact(&e.to_string())), delivered),
                        Err(_) => return dropped(no_data(), delivered),
                    }
                }
                () = tokio::time::sleep_until(idle_at) => {
                    tracing::warn!(connection = %connection_id, idle_s = options.idle_timeout.as_secs_f64(), "Nothing heard on the subscribe socket; taking it for dead.");
                    return dropped(no_data(), delivered);
                }
            }
        }
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

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped at once: it must not live across an await.
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests;
