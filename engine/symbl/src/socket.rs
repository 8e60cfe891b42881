//! The reconnecting WebSocket loop that the Subscribe follower ([`crate::subscribe`]) and the
//! update-feed follower ([`crate::updates`]) share.
//!
//! [`run`] opens a socket, relays its text frames to a [`Peer`], pings every
//! [`SocketOptions::ping_every`], takes a socket on which nothing arrived for
//! [`SocketOptions::idle_timeout`] for half-open and drops it, and reconnects after a drop with
//! jittered exponential backoff (`prompter_core::backoff`). The retry budget restarts only after
//! a socket that delivered a frame or stayed up [`SocketOptions::stable_after`]. When a watch
//! channel turns true it stops: an open socket is closed politely (a close frame), and the
//! frames the far end sent before it saw the close are still relayed until its own close
//! frame comes (at most [`CLOSE_GRACE`]), so nothing the far end counted as sent is lost.
//!
//! It does not own what a frame means, how to authenticate, which closes or refusals are final
//! or what to tell the engine about a drop: the [`Peer`] decides those.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prompter_core::backoff::Backoff;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How a followed socket is paced and watched (the Subscribe socket's
/// [`FollowOptions`](crate::subscribe::FollowOptions) and the update feed's
/// [`FeedOptions`](crate::updates::FeedOptions)). The defaults ping every 30 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// Ping period that keeps idle sockets open through proxies (the Go SDK uses 30 s).
    pub ping_every: Duration,
    /// A socket on which nothing at all (frame, pong, ping) arrived for this long is taken for
    /// half-open: it is dropped and reconnected. Default: 2 × `ping_every` + 15 s.
    pub idle_timeout: Duration,
    /// A socket that stayed up this long (or delivered a frame) worked: its drop starts a fresh
    /// retry budget (the backoff restarts from its first step). Default 30 s.
    pub stable_after: Duration,
    /// A connection attempt that takes longer than this has failed. Default 20 s.
    pub handshake_timeout: Duration,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions::with_ping_every(Duration::from_secs(30))
    }
}

impl SocketOptions {
    /// The defaults, with pings every `ping_every` and the idle timeout that goes with it
    /// (2 × `ping_every` + 15 s).
    pub fn with_ping_every(ping_every: Duration) -> Self {
        SocketOptions {
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

/// How long a socket being closed on stop waits for the far end's close frame, relaying the
/// frames that come before it.
pub(crate) const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// An open client WebSocket.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why a handshake did not give a socket.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// The connection or the handshake failed (an HTTP answer other than 101 is
    /// `tungstenite::Error::Http`, carrying the status).
    #[error("cannot connect: {0}")]
    Connect(#[source] tokio_tungstenite::tungstenite::Error),
    /// No handshake within the timeout.
    #[error("no handshake within {}", secs(*.0))]
    TimedOut(Duration),
}

/// Opens a socket, giving up after `timeout`.
pub(crate) async fn open(request: Request, timeout: Duration) -> Result<Ws, OpenError> {
    // Boxed: the handshake's state (about 11 KiB) lives only while it runs, instead of inside
    // every followed connection's task for the whole call.
    let connect = Box::pin(tokio_tungstenite::connect_async_with_config(
        request,
        Some(config()),
        true,
    ));
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(e)) => Err(OpenError::Connect(e)),
        Err(_) => Err(OpenError::TimedOut(timeout)),
    }
}

/// Read and write buffer of every socket to Symbl (Subscribe, Streaming, the update feed).
pub(crate) const SOCKET_BUFFER: usize = 8 * 1024;
/// The largest frame or message taken from Symbl, and the most output buffered.
pub(crate) const MAX_INCOMING: usize = 4 << 20;

/// The sockets' settings: 8 KiB buffers each way instead of tungstenite's 128 KiB (about 135 KiB
/// per connection, 1.3 GiB for 10,000 followed calls; 8 KiB is plenty for Symbl's small JSON
/// frames, and a larger message is still read whole), and messages, frames and unsent output
/// capped at 4 MiB, so a peer cannot make the engine buffer without bound.
pub(crate) fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_write_buffer_size(MAX_INCOMING)
        .max_message_size(Some(MAX_INCOMING))
        .max_frame_size(Some(MAX_INCOMING))
}

/// A peer's judgement of a failure.
pub(crate) enum Verdict {
    /// Retrying cannot help (a normal closure, a refused handshake, rejected credentials).
    Final(String),
    /// Worth retrying.
    Retry(String),
}

/// How the far end hung up.
pub(crate) enum Hangup<'a> {
    /// It sent a close frame, with a code and reason when it carried them.
    Close(Option<&'a CloseFrame>),
    /// The stream ended without a close frame.
    Eof,
}

/// What a text frame did.
pub(crate) enum Step {
    /// Nothing for the engine (a redelivery, not JSON, of no interest): no proof the socket
    /// works.
    Skipped,
    /// Handed to the engine: the socket works.
    Delivered,
    /// The last frame: close the socket politely and end ([`End::Completed`]).
    Complete,
    /// The engine stopped listening: end ([`End::Stopped`]) without reconnecting.
    Stop,
}

/// Why [`run`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// A frame ended it ([`Step::Complete`]).
    Completed,
    /// Told to stop, or the engine stopped listening.
    Stopped,
    /// A failure the peer judged final.
    Final(String),
    /// The retry budget ran out; the reason ends with "(gave up after N attempts)".
    GaveUp(String),
}

/// Whether [`run`] gives up after `max_retries` failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Budget {
    /// Give up after the backoff's `max_retries` failed reconnections in a row.
    Bounded,
    /// Retry for as long as the engine runs (the backoff's `max_retries` is ignored).
    Forever,
}

/// One user of the loop: how to connect and what frames and hang-ups mean.
///
/// Every text a peer produces for a drop (and every error text of the loop) goes through
/// [`Peer::clean`] before it is logged or reported.
pub(crate) trait Peer {
    /// Opens one socket (authenticating as needed, bounded by `handshake_timeout`, best through
    /// [`open`]), or judges why not.
    async fn connect(&mut self, handshake_timeout: Duration) -> Result<Ws, Verdict>;

    /// The socket is open; `reconnects` is 0 for the first one.
    async fn opened(&mut self, reconnects: u32);

    /// A text frame arrived.
    async fn text(&mut self, text: &str) -> Step;

    /// The far end hung up.
    fn hangup(&self, how: Hangup<'_>) -> Verdict;

    /// `text` fit for logs and reports (tokens removed).
    fn clean(&self, text: &str) -> String;

    /// Nothing arrived for `idle`: the socket is about to be dropped.
    fn silent(&self, _idle: Duration) {}

    /// The socket dropped (`reason`, cleaned); the next attempt follows after `wait`.
    async fn retrying(&mut self, reason: &str, wait: Duration);

    /// True when nobody listens any more: after a drop, [`run`] ends ([`End::Stopped`]) instead
    /// of reconnecting.
    fn abandoned(&self) -> bool {
        false
    }
}

/// Connects `peer` and keeps it connected until it completes, the peer fails for good,
/// `budget` runs out, or `stop` turns true (or its sender is gone).
///
/// Failures are retried with `retry` pacing; the retry count restarts after a socket that
/// delivered a frame or stayed up [`SocketOptions::stable_after`].
pub(crate) async fn run<P: Peer>(
    peer: &mut P,
    options: &SocketOptions,
    retry: Backoff,
    budget: Budget,
    stop: &mut watch::Receiver<bool>,
) -> End {
    let mut failures = 0u32;
    let mut reconnects = 0u32;
    loop {
        let stop_now = *stop.borrow();
        if stop_now {
            return End::Stopped;
        }
        let life = life(peer, options, reconnects, stop).await;
        let reason = match life {
            Life::Completed => return End::Completed,
            Life::Stopped => return End::Stopped,
            Life::Final(_) | Life::Dropped { .. } if peer.abandoned() => return End::Stopped,
            Life::Final(reason) => return End::Final(peer.clean(&reason)),
            Life::Dropped { reason, worked } => {
                if worked {
                    // It worked for a while: a fresh drop starts a fresh retry budget.
                    failures = 0;
                }
                peer.clean(&reason)
            }
        };
        if budget == Budget::Bounded && !retry.allows_retry(failures) {
            return End::GaveUp(format!(
                "{reason} (gave up after {} attempts)",
                failures.saturating_add(1)
            ));
        }
        // The backoff caps its exponent at 16 anyway; capping here keeps that explicit for a
        // feed retried forever.
        let wait = retry.wait(failures.min(16), None);
        peer.retrying(&reason, wait).await;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(stop) => return End::Stopped,
        }
        failures = failures.saturating_add(1);
        reconnects = reconnects.saturating_add(1);
    }
}

/// How one socket's life ended.
enum Life {
    Completed,
    Stopped,
    Final(String),
    /// Worth retrying; `worked` when the socket delivered a frame or stayed up long enough.
    Dropped {
        reason: String,
        worked: bool,
    },
}

/// One socket's life: connect, relay frames until it ends. Told to stop, it closes the socket
/// politely and relays what still comes until the far end's close (at most [`CLOSE_GRACE`]).
async fn life<P: Peer>(
    peer: &mut P,
    options: &SocketOptions,
    reconnects: u32,
    stop: &mut watch::Receiver<bool>,
) -> Life {
    let connected = tokio::select! {
        c = peer.connect(options.handshake_timeout) => c,
        () = stopped(stop) => return Life::Stopped,
    };
    let mut socket = match connected {
        Ok(socket) => socket,
        Err(Verdict::Final(reason)) => return Life::Final(reason),
        Err(Verdict::Retry(reason)) => {
            return Life::Dropped {
                reason,
                worked: false,
            };
        }
    };
    peer.opened(reconnects).await;
    let opened = Instant::now();
    let mut delivered = false;
    let dropped = |reason: String, delivered: bool| Life::Dropped {
        reason,
        worked: delivered || opened.elapsed() >= options.stable_after,
    };
    let mut ping = tokio::time::interval_at(opened + options.ping_every, options.ping_every);
    ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = opened;
    let no_data = || format!("no data for {}", secs(options.idle_timeout));
    // Set once told to stop: the close frame is sent, the far end's is awaited until then.
    let mut closing = false;
    // One timer and one stop signal for the socket's whole life, not one per frame: a frame
    // only moves `last_heard`, and the timer, when it fires early, is set again from it. When
    // closing, the same timer bounds the wait for the far end's close.
    let timer = tokio::time::sleep_until(last_heard + options.idle_timeout);
    tokio::pin!(timer);
    let stop_signal = stopped(stop);
    tokio::pin!(stop_signal);
    loop {
        tokio::select! {
            // Read first: a frame already waiting must not lose to the idle timer after a slow
            // hand-off to the engine.
            biased;
            msg = socket.next() => {
                last_heard = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => match peer.text(text.as_str()).await {
                        Step::Skipped => {}
                        Step::Delivered => delivered = true,
                        Step::Complete => {
                            let _ = socket.close(None).await;
                            return Life::Completed;
                        }
                        Step::Stop => return Life::Stopped,
                    },
                    Some(Ok(Message::Close(_))) | None if closing => return Life::Stopped,
                    Some(Err(_)) if closing => return Life::Stopped,
                    Some(Ok(Message::Close(frame))) => {
                        return match peer.hangup(Hangup::Close(frame.as_ref())) {
                            Verdict::Final(reason) => Life::Final(reason),
                            Verdict::Retry(reason) => dropped(reason, delivered),
                        };
                    }
                    // Pings (answered by tungstenite), pongs, binary: proof of life only.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return dropped(format!("socket error: {e}"), delivered),
                    None => {
                        return match peer.hangup(Hangup::Eof) {
                            Verdict::Final(reason) => Life::Final(reason),
                            Verdict::Retry(reason) => dropped(reason, delivered),
                        };
                    }
                }
            }
            () = &mut stop_signal, if !closing => {
                let by = Instant::now() + CLOSE_GRACE;
                closing = true;
                timer.as_mut().reset(by);
                // A half-open socket may never take the close frame: bound the send too.
                if !matches!(tokio::time::timeout_at(by, socket.close(None)).await, Ok(Ok(()))) {
                    return Life::Stopped;
                }
            }
            _ = ping.tick(), if !closing => {
                // A half-open socket may never finish a send: bound it by the idle timer.
                let idle_at = last_heard + options.idle_timeout;
                match tokio::time::timeout_at(idle_at, socket.send(Message::Ping(Vec::new().into()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return dropped(format!("ping failed: {e}"), delivered),
                    Err(_) => return dropped(no_data(), delivered),
                }
            }
            () = &mut timer => {
                if closing {
                    return Life::Stopped;
                }
                let idle_at = last_heard + options.idle_timeout;
                if idle_at > Instant::now() {
                    // Something arrived since the timer was set: wait from then.
                    timer.as_mut().reset(idle_at);
                    continue;
                }
                peer.silent(options.idle_timeout);
                return dropped(no_data(), delivered);
            }
        }
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
    fn default_options_ping_every_30_s_and_drop_silent_sockets_after_75_s() {
        let o = SocketOptions::default();
        assert_eq!(o.ping_every, Duration::from_secs(30));
        assert_eq!(o.idle_timeout, Duration::from_secs(75));
        assert_eq!(o.stable_after, Duration::from_secs(30));
        assert_eq!(o.handshake_timeout, Duration::from_secs(20));
        let fast = SocketOptions::with_ping_every(Duration::from_millis(100));
        assert_eq!(fast.idle_timeout, Duration::from_millis(15_200));
    }

    #[test]
    fn durations_read_as_seconds() {
        assert_eq!(secs(Duration::from_secs(75)), "75 s");
        assert_eq!(secs(Duration::from_millis(2_500)), "2.5 s");
        assert_eq!(
            OpenError::TimedOut(Duration::from_secs(20)).to_string(),
            "no handshake within 20 s"
        );
    }
}
