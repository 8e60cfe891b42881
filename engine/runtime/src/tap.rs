//! The live tap: a running engine's events and outputs as they happen, for `prompter tap` (as
//! Vector's `tap`).
//!
//! [`Tap`] is both an [`Observer`] (each event once it is folded into its conversation) and a
//! [`Sink`] (each output version); [`Tap::routes`] serves them on `GET /tap` as a WebSocket of
//! JSON messages, `{"type": "event", "event": {...}}` and `{"type": "output", "output": {...}}`,
//! filtered on the server by `conversation`, `pipeline` (outputs of that pipeline only) and
//! `kind` (an event kind or an output kind). It carries transcripts, so it needs the admin
//! token (`Authorization: Bearer` or `?access_token=`).
//!
//! Nothing is serialized while nobody taps. Subscribers share one bounded broadcast; one that
//! falls behind is told how many messages it missed (`{"type": "lagged", "missed": n}`) and
//! goes on: a slow tap never holds back a call.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prompter_core::event::Event;
use prompter_core::output::Output;
use prompter_core::secret::Secret;
use tokio::sync::broadcast;

use crate::engine::Observer;
use crate::sink::{QueuePolicy, Sink, SinkError};

/// Messages a subscriber may fall behind before it is told it lagged.
pub const BACKLOG: usize = 4096;

/// One thing that happened, ready to send.
#[derive(Debug)]
struct Item {
    conversation: Arc<str>,
    kind: String,
    pipeline: Option<String>,
    json: String,
}

/// The tap; cheap to clone.
#[derive(Clone, Debug)]
pub struct Tap {
    tx: broadcast::Sender<Arc<Item>>,
}

impl Default for Tap {
    fn default() -> Self {
        Self::new()
    }
}

impl Tap {
    /// A tap nobody listens to yet.
    pub fn new() -> Self {
        Tap {
            tx: broadcast::channel(BACKLOG).0,
        }
    }

    fn listened(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    /// The sink to give the engine (its outputs).
    pub fn sink(&self) -> Box<dyn Sink> {
        Box::new(TapSink(self.clone()))
    }

    /// `GET /tap`, behind the admin `token` (without one the route answers 404: off).
    pub fn routes(&self, token: Option<Secret>) -> axum::Router {
        axum::Router::new()
            .route("/tap", get(subscribe))
            .with_state(Arc::new((self.clone(), token)))
    }
}

impl Observer for Tap {
    fn folded(&self, event: &Event) {
        if !self.listened() {
            return;
        }
        let json = serde_json::json!({"type": "event", "event": event}).to_string();
        let _ = self.tx.send(Arc::new(Item {
            conversation: event.conversation_id.clone(),
            kind: event.kind.as_str().to_owned(),
            pipeline: None,
            json,
        }));
    }
}

struct TapSink(Tap);

#[prompter_core::async_trait]
impl Sink for TapSink {
    fn name(&self) -> &str {
        "tap"
    }

    fn policy(&self) -> QueuePolicy {
        QueuePolicy::COALESCING
    }

    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError> {
        if self.0.listened() {
            let json = serde_json::json!({"type": "output", "output": &*output}).to_string();
            let _ = self.0.tx.send(Arc::new(Item {
                conversation: Arc::from(output.conversation_id.as_str()),
                kind: output.kind.clone(),
                pipeline: Some(output.pipeline.clone()),
                json,
            }));
        }
        Ok(())
    }
}

/// What a subscriber asked to see.
#[derive(Debug, Default)]
struct Wanted {
    conversation: Option<String>,
    pipeline: Option<String>,
    kind: Option<String>,
}

impl Wanted {
    fn takes(&self, item: &Item) -> bool {
        self.conversation
            .as_deref()
            .is_none_or(|c| *item.conversation == *c)
            && self
                .pipeline
                .as_deref()
                .is_none_or(|p| item.pipeline.as_deref() == Some(p))
            && self.kind.as_deref().is_none_or(|k| item.kind == k)
    }
}

type TapState = Arc<(Tap, Option<Secret>)>;

async fn subscribe(
    State(state): State<TapState>,
    Query(mut query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let (tap, token) = &*state;
    let Some(token) = token else {
        return (
            StatusCode::NOT_FOUND,
            "the tap is off: set the admin token's variable (PROMPTER_ADMIN_TOKEN)\n",
        )
            .into_response();
    };
    let in_query = query.get("access_token").map(String::as_str);
    if !crate::feed::http::presents(&headers, in_query, token) {
        return (
            StatusCode::UNAUTHORIZED,
            "a valid admin token is required\n",
        )
            .into_response();
    }
    let wanted = Wanted {
        conversation: query.remove("conversation").filter(|s| !s.is_empty()),
        pipeline: query.remove("pipeline").filter(|s| !s.is_empty()),
        kind: query.remove("kind").filter(|s| !s.is_empty()),
    };
    let rx = tap.tx.subscribe();
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .max_write_buffer_size(1 << 20)
        .max_message_size(4 * 1024)
        .on_upgrade(move |socket| serve(socket, rx, wanted))
}

async fn serve(mut socket: WebSocket, mut rx: broadcast::Receiver<Arc<Item>>, wanted: Wanted) {
    loop {
        tokio::select! {
            item = rx.recv() => {
                let text = match item {
                    Ok(item) if wanted.takes(&item) => item.json.clone(),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        serde_json::json!({"type": "lagged", "missed": n}).to_string()
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Close(_)) | Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_conversation_pipeline_and_kind() {
        let item = Item {
            conversation: Arc::from("c1"),
            kind: "suggestion".into(),
            pipeline: Some("rta".into()),
            json: String::new(),
        };
        assert!(Wanted::default().takes(&item));
        let w = |c: Option<&str>, p: Option<&str>, k: Option<&str>| Wanted {
            conversation: c.map(str::to_owned),
            pipeline: p.map(str::to_owned),
            kind: k.map(str::to_owned),
        };
        assert!(w(Some("c1"), Some("rta"), Some("suggestion")).takes(&item));
        assert!(!w(Some("c2"), None, None).takes(&item));
        assert!(!w(None, Some("recap"), None).takes(&item));
        assert!(!w(None, None, Some("tracker_response")).takes(&item));
        let event = Item {
            pipeline: None,
            kind: "tracker_response".into(),
            ..item
        };
        assert!(w(None, None, Some("tracker_response")).takes(&event));
        assert!(
            !w(None, Some("rta"), None).takes(&event),
            "a pipeline filter keeps outputs only"
        );
    }
}
