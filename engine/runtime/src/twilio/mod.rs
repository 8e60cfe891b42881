//! The Twilio bridge: a phone call from Twilio's first webhook to events in the engine, in one
//! process.
//!
//! - This module: the `twilio:` section, Twilio's voice webhooks on the engine's server (the
//!   TwiML that forks a call's audio to the media socket, the status callback), every request
//!   checked against `X-Twilio-Signature`.
//! - [`bridge`]: the Media Streams socket; per call, one Symbl Streaming session per track,
//!   reconnected with the audio kept meanwhile, and the sessions' events straight into the
//!   engine as one conversation keyed by the call.
//! - [`updates`]: `/symbl/updates`, the integration server's feed of live connections.
//!
//! ```yaml
//! twilio:
//!   public_url: https://bridge.example.com   # the base URL as Twilio calls it (behind a proxy)
//!   auth_token_env: TWILIO_AUTH_TOKEN
//!   media_path: /twilio/media                # where <Stream> points (wss://<host><path>)
//!   then: '<Dial><Conference startConferenceOnEnter="true">support</Conference></Dial>'
//! ```
//!
//! `POST /twilio/voice` answers with `<Start><Stream track="both_tracks">` to the media socket,
//! passing the call's `From`, `To` and `CallSid` and the call's media token as `<Parameter>`s,
//! then the operator's TwiML (`then`: dial an agent, a conference). `POST /twilio/status` takes
//! call status callbacks. A request whose signature does not match (HMAC-SHA1 with the
//! account's auth token over the URL as Twilio sees it and the sorted form parameters, compared
//! in constant time) gets 403.

pub mod bridge;
pub mod updates;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use prompter_core::secret::Secret;
use serde::Deserialize;
use sha1::Sha1;

/// The `twilio:` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TwilioConfig {
    /// The base URL Twilio calls (`https://bridge.example.com`): signatures are over the URL as
    /// Twilio sees it, which behind a proxy is not the one the engine is bound to.
    pub public_url: String,
    /// Environment variable holding the account's auth token. Default `TWILIO_AUTH_TOKEN`.
    #[serde(default = "default_token_env")]
    pub auth_token_env: String,
    /// The media socket's path. Default `/twilio/media`.
    #[serde(default = "default_media_path")]
    pub media_path: String,
    /// TwiML verbs after the fork (dial the agent, a conference). Default: keep the call up
    /// with a long pause.
    #[serde(default = "default_then")]
    pub then: String,
    /// How the media socket tells Twilio's streams from anyone else's. Default `token`.
    #[serde(default)]
    pub media_auth: MediaAuth,
    /// Who speaks on each track.
    #[serde(default)]
    pub speakers: Speakers,
    /// What each Streaming API session asks Symbl for.
    #[serde(default)]
    pub streaming: StreamingSettings,
    /// Audio kept per track while its Symbl socket reconnects, in milliseconds of 20 ms
    /// frames; older audio is sent first once the socket is back, audio beyond it is dropped
    /// (and counted). Default 30,000.
    #[serde(default = "default_outage_ms")]
    pub outage_buffer_ms: u64,
    /// Where the feed of live connections is served (`connection_started`, ...). Default
    /// `/symbl/updates`.
    #[serde(default = "default_updates_path")]
    pub updates_path: String,
    /// Environment variable holding a token the update feed's subscribers must present
    /// (`?access_token=` or `Authorization: Bearer`). Default: none (as Symbl's server, which
    /// then shows callers' numbers to anyone who can reach it: keep it on a private network).
    #[serde(default)]
    pub updates_token_env: Option<String>,
}

impl TwilioConfig {
    /// The defaults for a bridge reached at `public_url`.
    pub fn new(public_url: impl Into<String>) -> Self {
        TwilioConfig {
            public_url: public_url.into(),
            auth_token_env: default_token_env(),
            media_path: default_media_path(),
            then: default_then(),
            media_auth: MediaAuth::default(),
            speakers: Speakers::default(),
            streaming: StreamingSettings::default(),
            outage_buffer_ms: default_outage_ms(),
            updates_path: default_updates_path(),
            updates_token_env: None,
        }
    }

    /// What is wrong with the section, each problem with the path of the key it is about
    /// (`["speakers", "customer", "name"]`), for `validate` to point at.
    pub fn problems(&self) -> Vec<(Vec<&'static str>, String)> {
        let mut out = Vec::new();
        let url = self.public_url.trim();
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            out.push((
                vec!["public_url"],
                format!("`{url}` is not an http(s) URL (the base URL Twilio calls, e.g. https://bridge.example.com)"),
            ));
        }
        for (key, path) in [
            ("media_path", &self.media_path),
            ("updates_path", &self.updates_path),
        ] {
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                out.push((
                    vec![key],
                    format!("`{path}` is not a path (it starts with `/`, without a query)"),
                ));
            }
        }
        for (who, field, source) in [
            ("customer", "name", &self.speakers.customer.name),
            ("customer", "user_id", &self.speakers.customer.user_id),
            ("agent", "name", &self.speakers.agent.name),
            ("agent", "user_id", &self.speakers.agent.user_id),
        ] {
            if let Err(e) = prompter_core::template::Template::compile(source) {
                out.push((vec!["speakers", who, field], format!("template error: {e}")));
            }
        }
        for t in &self.streaming.insight_types {
            if !matches!(
                t.as_str(),
                "question" | "action_item" | "follow_up" | "topic"
            ) {
                out.push((
                    vec!["streaming", "insight_types"],
                    format!(
                        "unknown insight type `{t}`: one of question, action_item, follow_up, topic"
                    ),
                ));
            }
        }
        if !(0.5..=1.0).contains(&self.streaming.confidence_threshold) {
            out.push((
                vec!["streaming", "confidence_threshold"],
                format!(
                    "{} is out of range: Symbl takes 0.5 to 1.0",
                    self.streaming.confidence_threshold
                ),
            ));
        }
        out
    }

    /// The media socket's URL as Twilio opens it (`wss://` + host + `media_path`).
    pub fn media_url(&self) -> String {
        let base = self.public_url.trim_end_matches('/');
        let ws = base
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        format!("{ws}{}", self.media_path)
    }
}

/// How the media socket authenticates a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaAuth {
    /// The stream's `start` must carry the `prompter_token` parameter the voice webhook put in
    /// the TwiML (an HMAC of the call sid with the auth token): a stream for a call the
    /// webhook did not answer is refused before any Symbl session opens. An upgrade request
    /// carrying `X-Twilio-Signature` must also match it.
    #[default]
    Token,
    /// Any stream is taken (a bridge only this machine can reach).
    None,
}

/// Who speaks on each track: minijinja templates over the stream's custom parameters (the
/// `<Parameter>`s: `From`, `To`, `CallSid`, and whatever the operator's TwiML adds).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Speakers {
    /// The caller, on the `inbound` track. Default: name `Customer`, id `{{ From }}`.
    #[serde(default = "default_customer")]
    pub customer: SpeakerTemplate,
    /// The agent, on the `outbound` track. Default: name `Agent`, id `{{ To }}`.
    #[serde(default = "default_agent")]
    pub agent: SpeakerTemplate,
}

impl Default for Speakers {
    fn default() -> Self {
        Speakers {
            customer: default_customer(),
            agent: default_agent(),
        }
    }
}

/// One speaker's name and user id, as templates.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeakerTemplate {
    /// The name Symbl and the agent see.
    pub name: String,
    /// The user id (a phone number, an e-mail).
    pub user_id: String,
}

fn default_customer() -> SpeakerTemplate {
    SpeakerTemplate {
        name: "{{ CustomerName or 'Customer' }}".into(),
        user_id: "{{ From }}".into(),
    }
}
fn default_agent() -> SpeakerTemplate {
    SpeakerTemplate {
        name: "{{ AgentName or 'Agent' }}".into(),
        user_id: "{{ AgentId or To }}".into(),
    }
}

/// The `start_request` of each session (beyond the audio format, MULAW/8000, the speaker and
/// the trackers of `symbl.trackers`, which the bridge sets).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamingSettings {
    /// `insightTypes`. Default `[question, action_item, follow_up]`.
    #[serde(default = "default_insights")]
    pub insight_types: Vec<String>,
    /// `config.trackers.interimResults`: trackers as soon as Symbl hears them. Default true.
    #[serde(default = "yes")]
    pub interim_results: bool,
    /// `config.trackers.enableAllTrackers`: the account's trackers too. Default true.
    #[serde(default = "yes")]
    pub enable_all_trackers: bool,
    /// `config.sentiment`. Default true.
    #[serde(default = "yes")]
    pub sentiment: bool,
    /// `config.languageCode`. Default `en-US`.
    #[serde(default = "default_language")]
    pub language_code: String,
    /// `config.confidenceThreshold` (0.5 to 1.0). Default 0.5.
    #[serde(default = "default_confidence")]
    pub confidence_threshold: f64,
}

impl Default for StreamingSettings {
    fn default() -> Self {
        StreamingSettings {
            insight_types: default_insights(),
            interim_results: true,
            enable_all_trackers: true,
            sentiment: true,
            language_code: default_language(),
            confidence_threshold: default_confidence(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_insights() -> Vec<String> {
    vec!["question".into(), "action_item".into(), "follow_up".into()]
}
fn default_language() -> String {
    "en-US".into()
}
fn default_confidence() -> f64 {
    0.5
}
fn default_outage_ms() -> u64 {
    30_000
}
fn default_updates_path() -> String {
    "/symbl/updates".into()
}

/// The media token of a call: what the voice webhook passes as the `prompter_token`
/// `<Parameter>` and the media socket expects in the stream's `start` (URL-safe base64 of
/// HMAC-SHA256 over the call sid, keyed with the auth token).
pub fn call_token(auth_token: &str, call_sid: &str) -> String {
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(auth_token.as_bytes())
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(b"prompter-media:");
    mac.update(call_sid.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

fn default_token_env() -> String {
    "TWILIO_AUTH_TOKEN".into()
}
fn default_media_path() -> String {
    "/twilio/media".into()
}
fn default_then() -> String {
    "<Pause length=\"3600\"/>".into()
}

/// The name of the `<Parameter>` carrying the call's media token.
pub const TOKEN_PARAMETER: &str = "prompter_token";

/// The `X-Twilio-Signature` of a request to `url` with form `params` (repeated names allowed),
/// as Twilio computes it: base64 HMAC-SHA1 over the URL followed by each parameter's name and
/// value, sorted by name (a repeated name's values de-duplicated and sorted).
pub fn signature(auth_token: &str, url: &str, params: &[(String, String)]) -> String {
    let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in params {
        by_name.entry(k).or_default().push(v);
    }
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(auth_token.as_bytes())
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(url.as_bytes());
    for (name, mut values) in by_name {
        values.sort_unstable();
        values.dedup();
        for v in values {
            mac.update(name.as_bytes());
            mac.update(v.as_bytes());
        }
    }
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// `url` with its default port written out, or without it when written: Twilio's libraries
/// accept either form.
fn other_port_form(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme {
        "https" | "wss" => "443",
        "http" | "ws" => "80",
        _ => return None,
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once(':') {
        Some((host, port)) if port == default => Some(format!("{scheme}://{host}{path}")),
        Some(_) => None,
        None => Some(format!("{scheme}://{authority}:{default}{path}")),
    }
}

/// True when `presented` is the signature of the request (constant-time comparison; the URL
/// with or without its default port).
pub fn valid(auth_token: &str, url: &str, params: &[(String, String)], presented: &str) -> bool {
    let presented = presented.trim().as_bytes();
    let matches = |u: &str| {
        crate::feed::http::constant_time_eq(signature(auth_token, u, params).as_bytes(), presented)
    };
    matches(url) || other_port_form(url).is_some_and(|u| matches(&u))
}

/// `application/x-www-form-urlencoded` pairs, in order.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
            {
                out.push(v);
                i += 3;
                continue;
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    std::str::from_utf8(body)
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// XML-escapes an attribute value.
fn attr(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The webhooks' shared state.
pub struct TwilioHooks {
    config: TwilioConfig,
    token: Secret,
    /// Status callbacks received (by `CallStatus`), for logs and tests.
    statuses: std::sync::Mutex<Vec<(String, String)>>,
}

impl TwilioHooks {
    /// The webhooks for `config`, the auth token read through `env`.
    ///
    /// # Errors
    /// The token is not set, or `public_url` is not an http(s) URL.
    pub fn new(config: TwilioConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let token = env(&config.auth_token_env)
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                format!(
                    "the Twilio auth token is not set: put it in `{}`",
                    config.auth_token_env
                )
            })?;
        if !(config.public_url.starts_with("https://") || config.public_url.starts_with("http://"))
        {
            return Err(format!(
                "`twilio.public_url` `{}` is not an http(s) URL",
                config.public_url
            ));
        }
        Ok(TwilioHooks {
            config,
            token: Secret::new(token),
            statuses: std::sync::Mutex::default(),
        })
    }

    /// The routes, to merge into the engine's server.
    pub fn routes(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/twilio/voice", post(voice))
            .route("/twilio/status", post(status))
            .with_state(self)
    }

    /// The account's auth token (it signs webhooks and keys call tokens).
    pub fn auth_token(&self) -> &Secret {
        &self.token
    }

    /// The configuration.
    pub fn config(&self) -> &TwilioConfig {
        &self.config
    }

    /// The status callbacks received: (`CallSid`, `CallStatus`).
    pub fn statuses(&self) -> Vec<(String, String)> {
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The request's form if its signature is Twilio's.
    fn verify(
        &self,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Option<Vec<(String, String)>> {
        let params = form_pairs(body);
        let url = format!("{}{path}", self.config.public_url.trim_end_matches('/'));
        let presented = headers
            .get("x-twilio-signature")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if valid(self.token.expose(), &url, &params, presented) {
            Some(params)
        } else {
            tracing::warn!(
                path,
                "A Twilio webhook without a valid signature was refused."
            );
            None
        }
    }

    /// The TwiML for a new call: fork both tracks to the media socket, then the operator's verbs.
    pub fn twiml(&self, params: &[(String, String)]) -> String {
        let get = |k: &str| {
            params
                .iter()
                .find(|(n, _)| n == k)
                .map_or("", |(_, v)| v.as_str())
        };
        let mut xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response>\n  <Start>\n    <Stream url=\"{}\" track=\"both_tracks\">\n",
            attr(&self.config.media_url()),
        );
        for name in ["CallSid", "From", "To"] {
            xml.push_str(&format!(
                "      <Parameter name=\"{name}\" value=\"{}\"/>\n",
                attr(get(name))
            ));
        }
        if self.config.media_auth == MediaAuth::Token {
            xml.push_str(&format!(
                "      <Parameter name=\"{TOKEN_PARAMETER}\" value=\"{}\"/>\n",
                call_token(self.token.expose(), get("CallSid"))
            ));
        }
        xml.push_str("    </Stream>\n  </Start>\n  ");
        xml.push_str(self.config.then.trim());
        xml.push_str("\n</Response>\n");
        xml
    }
}

type Hooks = State<Arc<TwilioHooks>>;

/// The answer to a request whose signature is not Twilio's.
fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        "the X-Twilio-Signature header does not match this request (is twilio.public_url the URL Twilio calls?)",
    )
        .into_response()
}

async fn voice(State(hooks): Hooks, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    match hooks.verify("/twilio/voice", &headers, &body) {
        Some(params) => (
            [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
            hooks.twiml(&params),
        )
            .into_response(),
        None => forbidden(),
    }
}

async fn status(State(hooks): Hooks, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    match hooks.verify("/twilio/status", &headers, &body) {
        Some(params) => {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(n, _)| n == k)
                    .map_or(String::new(), |(_, v)| v.clone())
            };
            let (sid, state) = (get("CallSid"), get("CallStatus"));
            tracing::info!(call = %sid, status = %state, "Twilio call status.");
            hooks
                .statuses
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((sid, state));
            StatusCode::NO_CONTENT.into_response()
        }
        None => forbidden(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector_params() -> Vec<(String, String)> {
        [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675309"),
            ("Digits", "1234"),
            ("From", "+14158675309"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
    }

    #[test]
    fn signatures_match_twilios_documented_vector() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        assert_eq!(
            signature("12345", url, &vector_params()),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        );
        assert!(valid(
            "12345",
            url,
            &vector_params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        // The parameters' order on the wire does not matter; their values do.
        let mut shuffled = vector_params();
        shuffled.reverse();
        assert!(valid(
            "12345",
            url,
            &shuffled,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        let mut changed = vector_params();
        changed[2].1 = "9999".into();
        assert!(!valid(
            "12345",
            url,
            &changed,
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!valid(
            "54321",
            url,
            &vector_params(),
            "RSOYDt4T1cUTdK1PDd93/VVr8B8="
        ));
        assert!(!valid("12345", url, &vector_params(), ""));
    }

    #[test]
    fn a_url_with_or_without_its_default_port_and_repeated_parameters_verify() {
        let params = vec![
            ("To".to_owned(), "+18005551212".to_owned()),
            ("Tag".to_owned(), "b".to_owned()),
            ("Tag".to_owned(), "a".to_owned()),
            ("Tag".to_owned(), "a".to_owned()),
        ];
        let with_port = signature(
            "tok",
            "https://bridge.example.com:443/twilio/voice",
            &params,
        );
        assert!(valid(
            "tok",
            "https://bridge.example.com/twilio/voice",
            &params,
            &with_port
        ));
        let without = signature("tok", "https://bridge.example.com/twilio/voice", &params);
        assert!(valid(
            "tok",
            "https://bridge.example.com:443/twilio/voice",
            &params,
            &without
        ));
        // Another port is another URL.
        let other = signature(
            "tok",
            "https://bridge.example.com:8443/twilio/voice",
            &params,
        );
        assert!(!valid(
            "tok",
            "https://bridge.example.com/twilio/voice",
            &params,
            &other
        ));
        // Repeated values: de-duplicated and sorted, whatever their order.
        let reordered = vec![params[1].clone(), params[0].clone(), params[2].clone()];
        assert!(valid(
            "tok",
            "https://bridge.example.com/twilio/voice",
            &reordered,
            &without
        ));
    }

    #[test]
    fn the_twiml_forks_both_tracks_with_the_calls_parameters_then_the_operators_verbs() {
        let hooks = TwilioHooks::new(
            TwilioConfig {
                auth_token_env: "T".into(),
                then: "<Dial>+15550001111</Dial>".into(),
                ..TwilioConfig::new("https://bridge.example.com/")
            },
            &|_| Some("tok".into()),
        )
        .unwrap();
        let xml = hooks.twiml(&[
            ("CallSid".into(), "CA1".into()),
            ("From".into(), "+1555\"<x>".into()),
        ]);
        assert!(
            xml.contains(
                "<Stream url=\"wss://bridge.example.com/twilio/media\" track=\"both_tracks\">"
            ),
            "{xml}"
        );
        assert!(
            xml.contains("<Parameter name=\"CallSid\" value=\"CA1\"/>"),
            "{xml}"
        );
        assert!(
            xml.contains("<Parameter name=\"From\" value=\"+1555&quot;&lt;x&gt;\"/>"),
            "{xml}"
        );
        assert!(
            xml.contains("</Start>\n  <Dial>+15550001111</Dial>\n</Response>"),
            "{xml}"
        );
        assert!(
            TwilioHooks::new(TwilioConfig::new("bridge.example.com"), &|_| Some(
                "tok".into()
            ))
            .is_err()
        );
    }
}
