//! An integration server's update feed (`/symbl/updates`), as Symbl's Twilio integration
//! server sends it: one JSON text frame per event, `connection_started` when a call's Symbl
//! connection is up, `connection_exists` (to a new subscriber, once per live connection) and
//! `connection_stopped` when the call completes.
//!
//! [`watch_updates`] keeps the feed open (reconnecting with jittered backoff, forever, until
//! told to stop; the loop is the crate's `socket` module, shared with [`crate::subscribe`])
//! and reports each connection change. It pings the feed every 30 s and takes a feed on which
//! nothing arrived for 2 × 30 s + 15 s for half-open (dropped and reconnected).
//! The feed URL may carry a token; logs and errors show it as `scheme://host/path` only
//! ([`redact_url`]).

use std::time::Duration;

use prompter_core::backoff::Backoff;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::socket::{self, Budget, Hangup, Peer, Step, Verdict, Ws};

/// A change in the set of live connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionChange {
    /// A connection is live (`connection_started` or `connection_exists`): follow it.
    Live {
        /// The Symbl connection id (the Subscribe API's key).
        connection_id: String,
        /// The Symbl conversation id, when sent.
        conversation_id: Option<String>,
        /// The speaker's name (`Agent`, `Customer`, ...), when sent.
        speaker: Option<String>,
    },
    /// A connection stopped (`connection_stopped`): the call is over.
    Stopped {
        /// The Symbl connection id.
        connection_id: String,
        /// The Symbl conversation id, when sent.
        conversation_id: Option<String>,
    },
}

/// Parses one feed frame; `None` for frames of other types or without a `connectionId`.
pub fn parse_update(frame: &Value) -> Option<ConnectionChange> {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
    let connection_id = s(frame.get("connectionId")).filter(|c| !c.is_empty())?;
    let conversation_id = s(frame.get("conversationId"));
    match frame.get("type").and_then(Value::as_str)? {
        "connection_started" | "connection_exists" => Some(ConnectionChange::Live {
            connection_id,
            conversation_id,
            speaker: s(frame.get("speaker").and_then(|sp| sp.get("name"))),
        }),
        "connection_stopped" => Some(ConnectionChange::Stopped {
            connection_id,
            conversation_id,
        }),
        _ => None,
    }
}

/// How [`watch_updates_with`] paces and watches the feed; [`watch_updates`] uses the defaults
/// (pings every 30 s, a feed silent for 75 s is dropped, the backoff restarts after 30 s up,
/// 20 s for a handshake). The same settings as the Subscribe socket's
/// [`FollowOptions`](crate::subscribe::FollowOptions).
pub type FeedOptions = socket::SocketOptions;

/// `url` fit for a log or a message: `scheme://host[:port]/path`, without user-info, query or
/// fragment (any of which may carry a token).
pub fn redact_url(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    // Up to the query or fragment, which may hold a token.
    let rest = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    // User-info (`user:token@`) ends at the last `@` of the authority.
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

/// `text` (an error message) with every occurrence of `url` replaced by its redacted form.
fn scrub(text: &str, url: &str) -> String {
    let url = url.trim();
    if url.is_empty() {
        text.to_owned()
    } else {
        text.replace(url, &redact_url(url))
    }
}

/// Follows the feed at `url` until `stop` turns true, reconnecting after drops with `retry`
/// pacing (its `max_retries` is ignored: the feed is retried for as long as the engine runs).
/// Uses the default [`FeedOptions`].
pub async fn watch_updates(
    url: String,
    retry: Backoff,
    tx: mpsc::Sender<ConnectionChange>,
    stop: watch::Receiver<bool>,
) {
    watch_updates_with(FeedOptions::default(), url, retry, tx, stop).await;
}

/// [`watch_updates`] with explicit pacing. The feed is pinged every
/// [`FeedOptions::ping_every`] and reconnected when nothing arrived for
/// [`FeedOptions::idle_timeout`]. `url` may carry a token (query or user-info): it is logged
/// as `scheme://host/path` only.
pub async fn watch_updates_with(
    options: FeedOptions,
    url: String,
    retry: Backoff,
    tx: mpsc::Sender<ConnectionChange>,
    mut stop: watch::Receiver<bool>,
) {
    let mut feed = Feed {
        shown: redact_url(&url),
        url,
        tx: &tx,
    };
    // The feed never ends by itself: only `stop` (or the engine dropping `tx`) ends this.
    let _ = socket::run(&mut feed, &options, retry, Budget::Forever, &mut stop).await;
}

/// The update feed as a [`Peer`] of the reconnecting loop.
struct Feed<'a> {
    url: String,
    /// `url` without anything that may carry a token.
    shown: String,
    tx: &'a mpsc::Sender<ConnectionChange>,
}

impl Peer for Feed<'_> {
    async fn connect(&mut self, handshake_timeout: Duration) -> Result<Ws, Verdict> {
        let request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| Verdict::Retry(format!("cannot connect: {e}")))?;
        socket::open(request, handshake_timeout)
            .await
            .map_err(|e| Verdict::Retry(e.to_string()))
    }

    async fn opened(&mut self, _reconnects: u32) {
        tracing::info!(feed = %self.shown, "Following the update feed.");
    }

    async fn text(&mut self, text: &str) -> Step {
        let Ok(frame) = serde_json::from_str::<Value>(text) else {
            tracing::warn!(feed = %self.shown, "Skipped an update that is not JSON.");
            return Step::Skipped;
        };
        match parse_update(&frame) {
            Some(change) => {
                if self.tx.send(change).await.is_err() {
                    Step::Stop
                } else {
                    Step::Delivered
                }
            }
            // Frames of other types do not show that the feed works.
            None => Step::Skipped,
        }
    }

    fn hangup(&self, _how: Hangup<'_>) -> Verdict {
        // Even a normal closure is retried: the feed is followed for as long as the engine runs.
        Verdict::Retry("the feed closed".into())
    }

    fn clean(&self, text: &str) -> String {
        scrub(text, &self.url)
    }

    async fn retrying(&mut self, reason: &str, wait: Duration) {
        tracing::warn!(feed = %self.shown, error = %reason, retry_in_ms = wait.as_millis() as u64, "Update feed dropped; reconnecting.");
    }

    fn abandoned(&self) -> bool {
        self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_integration_servers_events_parse() {
        let started = json!({"type": "connection_started", "speaker": {"userId": "+14155550100", "name": "Agent"},
            "connectionId": "6d1d", "conversationId": "5093"});
        assert_eq!(
            parse_update(&started),
            Some(ConnectionChange::Live {
                connection_id: "6d1d".into(),
                conversation_id: Some("5093".into()),
                speaker: Some("Agent".into())
            })
        );
        let exists = json!({"type": "connection_exists", "connectionId": "6d1d"});
        assert!(matches!(
            parse_update(&exists),
            Some(ConnectionChange::Live { .. })
        ));
        let stopped =
            json!({"type": "connection_stopped", "connectionId": "6d1d", "conversationId": "5093"});
        assert_eq!(
            parse_update(&stopped),
            Some(ConnectionChange::Stopped {
                connection_id: "6d1d".into(),
                conversation_id: Some("5093".into())
            })
        );
        assert_eq!(parse_update(&json!({"type": "connection_started"})), None);
        assert_eq!(
            parse_update(&json!({"type": "other", "connectionId": "x"})),
            None
        );
        assert_eq!(parse_update(&json!([1, 2])), None);
    }

    #[test]
    fn feed_urls_are_redacted_to_scheme_host_and_path() {
        assert_eq!(
            redact_url("wss://user:t0ken@bridge.example.com:8443/symbl/updates?token=abc#frag"),
            "wss://bridge.example.com:8443/symbl/updates"
        );
        assert_eq!(
            redact_url("ws://127.0.0.1:9/symbl/updates"),
            "ws://127.0.0.1:9/symbl/updates"
        );
        assert_eq!(redact_url("wss://h?access_token=abc"), "wss://h");
        assert_eq!(redact_url("wss://a:b@h"), "wss://h");
        assert_eq!(redact_url("wss://u@h/p@q?x=y"), "wss://h/p@q");
        assert_eq!(redact_url("bridge/feed?token=abc"), "bridge/feed");
        let url = "wss://u:pw@h/feed?token=abc";
        let text = scrub(&format!("cannot connect to {url}: refused"), url);
        assert_eq!(text, "cannot connect to wss://h/feed: refused");
    }

    #[test]
    fn default_feed_options_match_the_subscribe_socket() {
        let o = FeedOptions::default();
        assert_eq!(o.ping_every, Duration::from_secs(30));
        assert_eq!(o.idle_timeout, Duration::from_secs(75));
    }

    #[tokio::test]
    async fn the_feed_reports_existing_then_started_and_stopped_connections() {
        const WAIT: Duration = Duration::from_secs(20);
        let fake = prompter_fakes::SymblFake::start("app", "s3cret").await;
        fake.start_connection("c1", "conv1", "Agent");
        let (tx, mut rx) = mpsc::channel(16);
        let (stop, stop_rx) = watch::channel(false);
        let options = FeedOptions {
            // Pings flow while the test runs; the fake answers them.
            ping_every: Duration::from_millis(50),
            ..FeedOptions::default()
        };
        // A token in the query string is sent as given (the logs show the URL without it).
        let url = format!("{}/symbl/updates?token=s3cret", fake.ws_base());
        let retry = Backoff {
            base_ms: 5,
            max_ms: 20,
            max_retries: 3,
        };
        let task = tokio::spawn(watch_updates_with(options, url, retry, tx, stop_rx));
        let mut next = async || {
            tokio::time::timeout(WAIT, rx.recv())
                .await
                .expect("no update within the bound")
                .expect("the feed stopped")
        };
        // Already live when the feed connected: `connection_exists`.
        assert_eq!(
            next().await,
            ConnectionChange::Live {
                connection_id: "c1".into(),
                conversation_id: Some("conv1".into()),
                speaker: Some("Agent".into()),
            }
        );
        fake.start_connection("c2", "conv2", "Customer");
        assert_eq!(
            next().await,
            ConnectionChange::Live {
                connection_id: "c2".into(),
                conversation_id: Some("conv2".into()),
                speaker: Some("Customer".into()),
            }
        );
        // Long enough for several pings and pongs.
        tokio::time::sleep(Duration::from_millis(300)).await;
        fake.stop_connection("c1", "conv1");
        assert_eq!(
            next().await,
            ConnectionChange::Stopped {
                connection_id: "c1".into(),
                conversation_id: Some("conv1".into()),
            }
        );
        stop.send(true).unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("watch_updates did not stop")
            .unwrap();
        // No reconnection happened (it would have repeated `connection_exists` for c2).
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_silent_half_open_feed_is_dropped_and_reconnected() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU32, Ordering};
        const WAIT: Duration = Duration::from_secs(20);
        // A feed server that completes the handshake and then never reads or writes again (no
        // pongs), holding the TCP connection open: a half-open connection, as far as the
        // client can tell.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        tokio::spawn({
            let accepted = accepted.clone();
            async move {
                let mut held = Vec::new();
                while let Ok((stream, _)) = listener.accept().await {
                    if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        held.push(ws);
                    }
                }
            }
        });
        let options = FeedOptions {
            ping_every: Duration::from_millis(50),
            idle_timeout: Duration::from_millis(500),
            ..FeedOptions::default()
        };
        let retry = Backoff {
            base_ms: 5,
            max_ms: 20,
            max_retries: 0,
        };
        let (tx, _rx) = mpsc::channel(16);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_updates_with(
            options,
            format!("ws://{addr}/symbl/updates"),
            retry,
            tx,
            stop_rx,
        ));
        let reconnected = tokio::time::timeout(WAIT, async {
            while accepted.load(Ordering::SeqCst) < 3 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            reconnected.is_ok(),
            "the silent feed was not dropped and reconnected ({} connections)",
            accepted.load(Ordering::SeqCst)
        );
        stop.send(true).unwrap();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("watch_updates did not stop")
            .unwrap();
    }
}
