//! `/symbl/updates`: the feed of live connections Symbl's integration server publishes
//! (wire-format reference §7), so consumers written for it keep working with the bridge.
//!
//! One JSON text frame per change: `connection_started` when a call's Symbl connection is up,
//! `connection_stopped` when the call ends, and to a subscriber that joins late one
//! `connection_exists` per call already live. Every frame carries `connectionId` (the Symbl
//! connection both tracks share), `conversationId` (Symbl's) and `speaker` (the caller).
//!
//! It owns the feed and the list of live connections, not the calls (the bridge tells it).
//! Subscribers share one bounded broadcast; one that falls more than [`BACKLOG`] frames behind
//! is closed with 1013 ("try again later") and gets the live connections again as
//! `connection_exists` when it reconnects, so a slow consumer never holds back the bridge.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prompter_core::secret::Secret;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// Frames a subscriber may fall behind before it is dropped.
pub const BACKLOG: usize = 1024;
/// Socket buffers of a subscriber: the frames are a few hundred bytes.
const SOCKET_BUFFER: usize = 4 * 1024;

/// The feed of live connections.
#[derive(Debug)]
pub struct Updates {
    tx: broadcast::Sender<Arc<str>>,
    /// The `connection_started` frame of each live connection, by connection id.
    live: Mutex<BTreeMap<String, Value>>,
    token: Option<Secret>,
}

impl Updates {
    /// A feed; subscribers must present `token` when one is given.
    pub fn new(token: Option<Secret>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(BACKLOG);
        Arc::new(Updates {
            tx,
            live: Mutex::default(),
            token,
        })
    }

    /// Publishes `connection_started` for a call's connection and remembers it as live.
    pub fn started(
        &self,
        connection_id: &str,
        conversation_id: Option<&str>,
        user_id: &str,
        name: &str,
    ) {
        let frame = json!({
            "type": "connection_started",
            "speaker": {"userId": user_id, "name": name},
            "connectionId": connection_id,
            "conversationId": conversation_id,
        });
        let text: Arc<str> = Arc::from(frame.to_string());
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(connection_id.to_owned(), frame);
        // No subscriber is not an error.
        let _ = self.tx.send(text);
    }

    /// Publishes `connection_stopped` for a connection and forgets it.
    pub fn stopped(&self, connection_id: &str) {
        let Some(mut frame) = self
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(connection_id)
        else {
            return;
        };
        frame["type"] = json!("connection_stopped");
        let _ = self.tx.send(Arc::from(frame.to_string()));
    }

    /// The connections live now, as their `connection_started` frames.
    pub fn live(&self) -> Vec<Value> {
        self.live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// The feed's route at `path`, to merge into the engine's server.
    pub fn routes(self: Arc<Self>, path: &str) -> axum::Router {
        axum::Router::new()
            .route(path, get(subscribe))
            .with_state(self)
    }

    fn admits(&self, query: &BTreeMap<String, String>, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let in_query = query.get("access_token").map(String::as_str);
        crate::feed::http::presents(headers, in_query, token)
    }
}

async fn subscribe(
    State(updates): State<Arc<Updates>>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if !updates.admits(&query, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            "the update feed needs its token (?access_token= or Authorization: Bearer)\n",
        )
            .into_response();
    }
    ws.read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .max_write_buffer_size(64 * 1024)
        .max_message_size(SOCKET_BUFFER)
        .max_frame_size(SOCKET_BUFFER)
        .on_upgrade(move |socket| serve(updates, socket))
}

async fn serve(updates: Arc<Updates>, mut socket: WebSocket) {
    // Subscribed before the snapshot: a change between the two is sent (twice at worst:
    // consumers take a repeated `connection_started` as a connection already followed).
    let mut rx = updates.tx.subscribe();
    for mut frame in updates.live() {
        frame["type"] = json!("connection_exists");
        if socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_err()
        {
            return;
        }
    }
    loop {
        tokio::select! {
            change = rx.recv() => match change {
                Ok(text) => {
                    if socket.send(Message::Text(text.as_ref().into())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "An update-feed subscriber fell behind; closing it so it resubscribes.");
                    let frame = CloseFrame { code: 1013, reason: "fell behind: resubscribe".into() };
                    let _ = socket.send(Message::Close(Some(frame))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
