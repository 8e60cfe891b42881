//! Following one live conversation on Symbl's Subscribe API
//! (`wss://api.symbl.ai/v1/subscribe/{connectionId}`), listen-only.
//!
//! [`follow`] connects with the access token (as `?access_token=` and `X-API-KEY`, as the SDKs
//! do), hands every text frame to the engine as parsed JSON, and when the socket drops it
//! reconnects with jittered exponential backoff. Frames are delivered at most once: a frame
//! identical to one of the last [`DEDUP_WINDOW`] (a redelivery around a reconnect) is dropped,
//! so a reconnect never produces a duplicate suggestion. It ends when the conversation
//! completes (`conversation_completed`), when told to stop, or when reconnecting fails
//! `reconnect.max_retries` times in a row.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prompter_core::backoff::Backoff;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::auth::SymblAuth;
use crate::config::SymblConfig;

/// Frames remembered per connection to drop redeliveries.
pub const DEDUP_WINDOW: usize = 2048;
/// Ping period that keeps idle sockets open through proxies (the Go SDK uses 30 s).
const PING_EVERY: Duration = Duration::from_secs(30);
/// A connection attempt that takes longer than this has failed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

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
/// sends every frame, connection change and the end to `tx`.
pub async fn follow(
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
        let outcome = tokio::select! {
            o = session(&url, &auth, &connection_id, &tx, &mut seen, reconnects) => o,
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
            Outcome::Dropped { reason, was_open } => {
                if was_open {
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
                    failures + 1
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
        failures += 1;
        reconnects += 1;
    }
}

enum Outcome {
    Completed,
    Stopped,
    Dropped { reason: String, was_open: bool },
}

/// One socket's life: connect, relay frames until it ends.
async fn session(
    url: &str,
    auth: &SymblAuth,
    connection_id: &Arc<str>,
    tx: &mpsc::Sender<Update>,
    seen: &mut Seen,
    reconnects: u32,
) -> Outcome {
    let dropped = |reason: String, was_open| Outcome::Dropped { reason, was_open };
    let token = match auth.token().await {
        Ok(t) => t,
        Err(e) => return dropped(e.to_string(), false),
    };
    let mut request = match format!("{url}?access_token={}", token.expose()).into_client_request() {
        Ok(r) => r,
        Err(e) => {
            return dropped(
                format!("bad subscribe URL: {}", redact(&e.to_string())),
                false,
            );
        }
    };
    if let Ok(v) = token.expose().parse() {
        request.headers_mut().insert("X-API-KEY", v);
    }
    let connected =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_tungstenite::connect_async(request)).await;
    let mut socket = match connected {
        Ok(Ok((socket, _))) => socket,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            if resp.status().as_u16() == 401 {
                // The token may have been revoked or expired early: get a new one next time.
                auth.invalidate().await;
            }
            return dropped(
                format!("the subscribe handshake was refused ({})", resp.status()),
                false,
            );
        }
        Ok(Err(e)) => return dropped(format!("cannot connect: {}", redact(&e.to_string())), false),
        Err(_) => {
            return dropped(
                format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs()),
                false,
            );
        }
    };
    tracing::info!(connection = %connection_id, reconnects, "Subscribed.");
    let _ = tx
        .send(Update::Connected {
            connection_id: connection_id.clone(),
            reconnects,
        })
        .await;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            _ = ping.tick() => {
                if let Err(e) = socket.send(Message::Ping(Vec::new().into())).await {
                    return dropped(format!("ping failed: {e}"), true);
                }
            }
            msg = socket.next() => match msg {
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
                    if completed {
                        let _ = socket.close(None).await;
                        return Outcome::Completed;
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let why = frame.map(|f| format!("closed by Symbl ({}: {})", f.code, f.reason)).unwrap_or_else(|| "closed by Symbl".into());
                    return dropped(why, true);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return dropped(format!("socket error: {}", redact(&e.to_string())), true),
                None => return dropped("the socket closed".into(), true),
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
mod tests {
    use super::*;

    #[test]
    fn redeliveries_are_dropped_within_the_window() {
        let mut seen = Seen::new();
        assert!(seen.first_time("a"));
        assert!(!seen.first_time("a"));
        for i in 0..DEDUP_WINDOW {
            assert!(seen.first_time(&i.to_string()));
        }
        // "a" fell out of the window.
        assert!(seen.first_time("a"));
        assert!(seen.set.len() <= DEDUP_WINDOW);
    }

    #[test]
    fn tokens_are_redacted_from_errors() {
        assert_eq!(
            redact("GET ws://h/v1/subscribe/x?access_token=abc.def failed"),
            "GET ws://h/v1/subscribe/x?access_token=*** failed"
        );
        assert_eq!(redact("plain"), "plain");
    }
}
