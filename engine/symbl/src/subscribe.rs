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

    #[test]
    fn default_options_ping_every_30_s_and_give_up_on_silence_after_75_s() {
        let o = FollowOptions::default();
        assert_eq!(o.ping_every, Duration::from_secs(30));
        assert_eq!(o.idle_timeout, Duration::from_secs(75));
        assert_eq!(o.stable_after, Duration::from_secs(30));
        assert_eq!(secs(o.idle_timeout), "75 s");
        assert_eq!(secs(Duration::from_millis(2_500)), "2.5 s");
    }

    /// `follow` against the fake Symbl, over real WebSockets.
    mod against_the_fake {
        use prompter_fakes::SymblFake;
        use serde_json::{Value, json};

        use super::*;
        use crate::auth::Credentials;

        /// Every wait is bounded by this; exceeding it fails the test loudly.
        const WAIT: Duration = Duration::from_secs(20);
        const ID: &str = "6d1d1b3e-conn";

        fn tiny_backoff() -> Backoff {
            Backoff {
                base_ms: 5,
                max_ms: 20,
                max_retries: 3,
            }
        }

        fn line(n: u32) -> Value {
            json!({"type": "message_response", "messages": [{"payload": {"content": format!("line {n}")}}]})
        }

        fn completed() -> Value {
            json!({"type": "message", "message": {"type": "conversation_completed"}})
        }

        fn auth_for(config: &SymblConfig) -> Arc<SymblAuth> {
            let creds = Credentials::from_lookup(config, |v| match v {
                "SYMBL_APP_ID" => Some("app".into()),
                "SYMBL_APP_SECRET" => Some("s3cret".into()),
                _ => None,
            })
            .unwrap();
            Arc::new(SymblAuth::new(config, creds).unwrap())
        }

        struct Harness {
            fake: SymblFake,
            rx: mpsc::Receiver<Update>,
            stop: watch::Sender<bool>,
            task: tokio::task::JoinHandle<()>,
        }

        /// Follows `ID` on `fake` (tokens from `fake`, the socket on `config.ws_base` when set);
        /// with `options`, through `follow_with`, else through `follow`.
        fn follow_on(
            fake: SymblFake,
            config: SymblConfig,
            options: Option<FollowOptions>,
        ) -> Harness {
            let auth = auth_for(&config);
            let (tx, rx) = mpsc::channel(256);
            let (stop, stop_rx) = watch::channel(false);
            let id: Arc<str> = Arc::from(ID);
            let task = tokio::spawn(async move {
                match options {
                    Some(o) => follow_with(o, &config, auth, id, tx, stop_rx).await,
                    None => follow(&config, auth, id, tx, stop_rx).await,
                }
            });
            Harness {
                fake,
                rx,
                stop,
                task,
            }
        }

        async fn start(reconnect: Backoff, options: Option<FollowOptions>) -> Harness {
            let fake = SymblFake::start("app", "s3cret").await;
            let config = SymblConfig {
                api_base: fake.api_base.clone(),
                reconnect,
                ..SymblConfig::default()
            };
            follow_on(fake, config, options)
        }

        impl Harness {
            async fn next(&mut self) -> Update {
                tokio::time::timeout(WAIT, self.rx.recv())
                    .await
                    .expect("no update within the bound")
                    .expect("follow stopped without sending Ended")
            }

            /// Expects `Connected { reconnects }` and waits until the fake has the subscriber.
            async fn connected(&mut self, reconnects: u32) {
                match self.next().await {
                    Update::Connected {
                        connection_id,
                        reconnects: r,
                    } => {
                        assert_eq!(&*connection_id, ID);
                        assert_eq!(r, reconnects);
                    }
                    other => {
                        panic!("expected Connected {{ reconnects: {reconnects} }}, got {other:?}")
                    }
                }
                assert!(
                    self.fake.wait_subscribed(ID, reconnects + 1, WAIT).await,
                    "the fake never saw subscriber {}",
                    reconnects + 1
                );
            }

            async fn frame(&mut self) -> Value {
                match self.next().await {
                    Update::Frame {
                        connection_id,
                        frame,
                    } => {
                        assert_eq!(&*connection_id, ID);
                        frame
                    }
                    other => panic!("expected a Frame, got {other:?}"),
                }
            }

            async fn dropped(&mut self) -> (String, Duration) {
                match self.next().await {
                    Update::Dropped {
                        reason, retry_in, ..
                    } => (reason, retry_in),
                    other => panic!("expected Dropped, got {other:?}"),
                }
            }

            /// Expects `Ended` next; checks that `follow` returned and sent nothing after it.
            async fn ended(mut self) -> (EndReason, SymblFake) {
                let reason = match self.next().await {
                    Update::Ended {
                        connection_id,
                        reason,
                    } => {
                        assert_eq!(&*connection_id, ID);
                        reason
                    }
                    other => panic!("expected Ended, got {other:?}"),
                };
                tokio::time::timeout(WAIT, self.task)
                    .await
                    .expect("follow did not return after Ended")
                    .expect("follow panicked");
                assert_eq!(self.rx.recv().await, None, "an update after Ended");
                (reason, self.fake)
            }
        }

        #[tokio::test]
        async fn frames_arrive_in_order_and_conversation_completed_ends() {
            let mut h = start(SymblConfig::default().reconnect, None).await;
            h.connected(0).await;
            for n in 1..=5 {
                h.fake.push(ID, line(n));
            }
            h.fake.push(ID, completed());
            for n in 1..=5 {
                assert_eq!(h.frame().await, line(n));
            }
            assert_eq!(h.frame().await, completed());
            let (reason, fake) = h.ended().await;
            assert_eq!(reason, EndReason::Completed);
            assert_eq!(fake.subscribes(ID), 1);
        }

        #[tokio::test]
        async fn a_socket_dropped_mid_call_reconnects_without_duplicating_redeliveries() {
            let mut h = start(tiny_backoff(), None).await;
            h.fake.set_redeliver_on_reconnect(3);
            h.connected(0).await;
            for n in 1..=3 {
                h.fake.push(ID, line(n));
            }
            for n in 1..=3 {
                assert_eq!(h.frame().await, line(n));
            }
            h.fake.drop_subscribers(ID);
            h.dropped().await;
            // The fake sends lines 1-3 again first; they must not come through.
            h.connected(1).await;
            h.fake.push(ID, line(4));
            h.fake.push(ID, completed());
            assert_eq!(h.frame().await, line(4));
            assert_eq!(h.frame().await, completed());
            let (reason, fake) = h.ended().await;
            assert_eq!(reason, EndReason::Completed);
            assert_eq!(fake.subscribes(ID), 2);
        }

        #[tokio::test]
        async fn stopping_during_the_backoff_ends_at_once() {
            let slow = Backoff {
                base_ms: 600_000,
                max_ms: 600_000,
                max_retries: 5,
            };
            let mut h = start(slow, None).await;
            h.connected(0).await;
            h.fake.drop_subscribers(ID);
            let (_, retry_in) = h.dropped().await;
            assert!(retry_in >= Duration::from_secs(600), "{retry_in:?}");
            h.stop.send(true).unwrap();
            // `ended` waits at most WAIT, far less than the 10-minute backoff.
            let (reason, fake) = h.ended().await;
            assert_eq!(reason, EndReason::Stopped);
            assert_eq!(fake.subscribes(ID), 1);
        }

        #[tokio::test]
        async fn a_server_that_accepts_then_closes_is_given_up_on_after_max_retries() {
            let mut h = start(tiny_backoff(), None).await;
            h.fake.set_close_on_subscribe(true);
            let (mut connects, mut drops) = (0, 0);
            // Bounded as a whole: a client that retries forever fails here, loudly.
            let reason = tokio::time::timeout(WAIT, async {
                loop {
                    match h.next().await {
                        Update::Connected { reconnects, .. } => {
                            assert_eq!(reconnects, connects);
                            connects += 1;
                        }
                        Update::Dropped { .. } => drops += 1,
                        Update::Ended { reason, .. } => break reason,
                        Update::Frame { frame, .. } => panic!("unexpected frame {frame}"),
                    }
                }
            })
            .await
            .expect("still reconnecting: the retry budget was never exhausted");
            // The first attempt and max_retries (3) more, each opened and closed at once.
            assert_eq!((connects, drops), (4, 3));
            match reason {
                EndReason::GaveUp(why) => {
                    assert!(why.contains("gave up after 4 attempts"), "{why}");
                }
                other => panic!("expected GaveUp, got {other:?}"),
            }
            assert_eq!(h.fake.subscribes(ID), 4);
            tokio::time::timeout(WAIT, h.task)
                .await
                .expect("follow did not return")
                .unwrap();
        }

        #[tokio::test]
        async fn a_normal_closure_is_final() {
            let mut h = start(tiny_backoff(), None).await;
            h.connected(0).await;
            h.fake.push(ID, line(1));
            assert_eq!(h.frame().await, line(1));
            h.fake.close_subscribers(ID, 1000, "conversation over");
            let (reason, fake) = h.ended().await;
            match reason {
                EndReason::GaveUp(why) => {
                    assert!(why.contains("1000"), "{why}");
                    assert!(why.contains("conversation over"), "{why}");
                    assert!(!why.contains("gave up after"), "{why}");
                }
                other => panic!("expected GaveUp, got {other:?}"),
            }
            assert_eq!(fake.subscribes(ID), 1);
        }

        #[tokio::test]
        async fn other_close_codes_are_retried() {
            let mut h = start(tiny_backoff(), None).await;
            h.connected(0).await;
            h.fake.close_subscribers(ID, 1011, "internal error");
            let (why, _) = h.dropped().await;
            assert!(why.contains("1011"), "{why}");
            h.connected(1).await;
            h.stop.send(true).unwrap();
            assert_eq!(h.ended().await.0, EndReason::Stopped);
        }

        #[tokio::test]
        async fn a_404_handshake_is_final() {
            let fake = SymblFake::start("app", "s3cret").await;
            let config = SymblConfig {
                api_base: fake.api_base.clone(),
                // No such route on the fake: every handshake is answered 404.
                ws_base: Some(format!("{}/nowhere", fake.ws_base())),
                reconnect: tiny_backoff(),
                ..SymblConfig::default()
            };
            let h = follow_on(fake, config, None);
            let (reason, fake) = h.ended().await;
            match reason {
                EndReason::GaveUp(why) => {
                    assert!(why.contains("404"), "{why}");
                    assert!(!why.contains("gave up after"), "{why}");
                }
                other => panic!("expected GaveUp, got {other:?}"),
            }
            assert_eq!(fake.token_calls(), 1);
        }

        #[tokio::test]
        async fn a_401_handshake_gets_a_new_token_and_is_retried_a_bounded_number_of_times() {
            let tokens = SymblFake::start("app", "s3cret").await;
            // A second Symbl that knows none of the first one's tokens: every handshake is 401.
            let other = SymblFake::start("app", "s3cret").await;
            let config = SymblConfig {
                api_base: tokens.api_base.clone(),
                ws_base: Some(other.ws_base()),
                reconnect: tiny_backoff(),
                ..SymblConfig::default()
            };
            let mut h = follow_on(tokens, config, None);
            for _ in 0..3 {
                let (why, _) = h.dropped().await;
                assert!(why.contains("401"), "{why}");
            }
            let (reason, tokens) = h.ended().await;
            match reason {
                EndReason::GaveUp(why) => {
                    assert!(why.contains("401"), "{why}");
                    assert!(why.contains("gave up after 4 attempts"), "{why}");
                    assert!(!why.contains("fake-jwt"), "{why}");
                }
                other => panic!("expected GaveUp, got {other:?}"),
            }
            // Each 401 dropped the cached token: one fresh token per attempt.
            assert_eq!(tokens.token_calls(), 4);
            assert_eq!(other.subscribes(ID), 0);
        }

        #[tokio::test]
        async fn a_silent_half_open_socket_is_dropped_and_reconnected() {
            let options = FollowOptions {
                ping_every: Duration::from_millis(200),
                idle_timeout: Duration::from_secs(3),
                ..FollowOptions::default()
            };
            let mut h = start(tiny_backoff(), Some(options)).await;
            h.connected(0).await;
            // No frames for longer than the idle timeout: the pongs keep the socket alive.
            tokio::time::sleep(Duration::from_secs(4)).await;
            assert!(
                h.rx.try_recv().is_err(),
                "a socket answering pings was dropped"
            );
            assert_eq!(h.fake.subscribes(ID), 1);
            // Now the socket goes silent with its TCP connection open.
            h.fake.freeze_subscribers(ID);
            let (why, _) = h.dropped().await;
            assert_eq!(why, "no data for 3 s");
            h.connected(1).await;
            h.fake.push(ID, line(1));
            assert_eq!(h.frame().await, line(1));
            h.stop.send(true).unwrap();
            assert_eq!(h.ended().await.0, EndReason::Stopped);
        }
    }
}
