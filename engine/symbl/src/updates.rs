//! An integration server's update feed (`/symbl/updates`), as Symbl's Twilio integration
//! server sends it: one JSON text frame per event, `connection_started` when a call's Symbl
//! connection is up, `connection_exists` (to a new subscriber, once per live connection) and
//! `connection_stopped` when the call completes.
//!
//! [`watch_updates`] keeps the feed open (reconnecting with jittered backoff, forever, until
//! told to stop) and reports each connection change.

use std::time::Duration;

use futures_util::StreamExt;
use prompter_core::backoff::Backoff;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

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

/// Follows the feed at `url` until `stop` turns true, reconnecting after drops with `retry`
/// pacing (its `max_retries` is ignored: the feed is retried for as long as the engine runs).
pub async fn watch_updates(
    url: String,
    retry: Backoff,
    tx: mpsc::Sender<ConnectionChange>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let reason = tokio::select! {
            r = feed(&url, &tx, &mut failures) => r,
            () = stopped(&mut stop) => return,
        };
        if tx.is_closed() {
            return;
        }
        let wait = retry.wait(failures.min(16), None);
        tracing::warn!(feed = %url, error = %reason, retry_in_ms = wait.as_millis() as u64, "Update feed dropped; reconnecting.");
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stopped(&mut stop) => return,
        }
        failures = failures.saturating_add(1);
    }
}

async fn feed(url: &str, tx: &mpsc::Sender<ConnectionChange>, failures: &mut u32) -> String {
    let connected = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::connect_async(url),
    )
    .await;
    let mut socket = match connected {
        Ok(Ok((s, _))) => s,
        Ok(Err(e)) => return format!("cannot connect: {e}"),
        Err(_) => return "no handshake within 20 s".into(),
    };
    tracing::info!(feed = %url, "Following the update feed.");
    *failures = 0;
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                let Ok(frame) = serde_json::from_str::<Value>(&text) else {
                    tracing::warn!(feed = %url, "Skipped an update that is not JSON.");
                    continue;
                };
                if let Some(change) = parse_update(&frame)
                    && tx.send(change).await.is_err()
                {
                    return "the engine stopped listening".into();
                }
            }
            Some(Ok(Message::Close(_))) | None => return "the feed closed".into(),
            Some(Ok(_)) => {}
            Some(Err(e)) => return format!("socket error: {e}"),
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
}
