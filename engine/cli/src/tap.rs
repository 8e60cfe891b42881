//! `prompter tap`: a running engine's events and outputs as they happen, one JSON object per
//! line on stdout (the engine's `GET /tap`, [`prompter_engine::tap`]), until Ctrl-C or the
//! engine stops.

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::cli::{Stream, say};

/// Options of `prompter tap`.
#[derive(Debug, Clone, clap::Args)]
pub struct TapArgs {
    /// The engine's server [default: http://127.0.0.1:7070].
    #[arg(long, default_value = "http://127.0.0.1:7070")]
    pub url: String,
    /// Only this conversation (a Symbl connection id, a Twilio call sid, a recording's id).
    #[arg(long, value_name = "ID")]
    pub conversation: Option<String>,
    /// Only the outputs of this pipeline (events are left out).
    #[arg(long, value_name = "NAME")]
    pub pipeline: Option<String>,
    /// Only this event kind (`tracker_response`, ...) or output kind (`suggestion`, ...).
    #[arg(long, value_name = "KIND")]
    pub kind: Option<String>,
}

/// The variable holding the admin token the tap presents.
const TOKEN_ENV: &str = crate::live::ADMIN_TOKEN_ENV;

/// Runs `prompter tap`; returns the exit code.
pub async fn run(args: TapArgs, out: &Stream, err: &Stream) -> u8 {
    let Some(token) = std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty())
    else {
        say(
            err,
            &format!("error: the tap needs the engine's admin token: put it in `{TOKEN_ENV}`"),
        );
        return 2;
    };
    let base = args.url.trim_end_matches('/');
    let ws_base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        say(
            err,
            &format!("error: `--url {base}` is not an http(s) URL (e.g. http://127.0.0.1:7070)"),
        );
        return 2;
    };
    let mut query = Vec::new();
    for (name, value) in [
        ("conversation", &args.conversation),
        ("pipeline", &args.pipeline),
        ("kind", &args.kind),
    ] {
        if let Some(v) = value {
            query.push(format!(
                "{name}={}",
                prompter_engine::feed::http::url_encode(v)
            ));
        }
    }
    let url = if query.is_empty() {
        format!("{ws_base}/tap")
    } else {
        format!("{ws_base}/tap?{}", query.join("&"))
    };
    let mut request = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => {
            say(err, &format!("error: `{url}`: {e}"));
            return 2;
        }
    };
    match format!("Bearer {token}").parse() {
        Ok(v) => {
            request.headers_mut().insert("authorization", v);
        }
        Err(_) => {
            say(
                err,
                &format!("error: `{TOKEN_ENV}` is not a valid header value"),
            );
            return 2;
        }
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = WebSocketConfig::default()
        .read_buffer_size(64 * 1024)
        .write_buffer_size(4 * 1024);
    let mut ws = match tokio_tungstenite::connect_async_with_config(request, Some(config), true)
        .await
    {
        Ok((ws, _)) => ws,
        Err(tungstenite::Error::Http(r)) => {
            let why = match r.status().as_u16() {
                401 => format!("the engine refused the admin token in `{TOKEN_ENV}`"),
                404 => "the engine's tap is off (start it with PROMPTER_ADMIN_TOKEN set)".into(),
                s => format!("the engine answered HTTP {s}"),
            };
            say(err, &format!("error: cannot tap {base}: {why}"));
            return 1;
        }
        Err(e) => {
            say(err, &format!("error: cannot tap {base}: {e}"));
            return 1;
        }
    };
    say(err, &format!("tapping {base} (Ctrl-C to stop)"));
    loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = tokio::signal::ctrl_c() => return 0,
        };
        match msg {
            Some(Ok(Message::Text(t))) => say(out, t.as_str()),
            Some(Ok(Message::Close(_))) | None => {
                say(err, "the engine closed the tap");
                return 0;
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                say(err, &format!("error: the tap broke: {e}"));
                return 1;
            }
        }
    }
}
