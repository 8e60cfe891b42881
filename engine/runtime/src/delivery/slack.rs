//! The Slack sink: a card per output in one channel, posted once and then edited in place.
//!
//! ```yaml
//! sinks:
//!   team:
//!     type: slack
//!     config:
//!       channel: C0123456789
//!       token_env: SLACK_BOT_TOKEN   # a bot token (xoxb-...) with chat:write
//!       on_withdraw: strike          # or `delete`
//! ```
//!
//! A new output is posted with `chat.postMessage`; its later versions edit that message with
//! `chat.update` (the engine's coalescing queue and this sink's pace, one call per second by
//! default as Slack allows per channel, mean intermediate drafts are skipped, never queued); a
//! withdrawn one is struck through (or deleted with `chat.delete`). Cards are Block Kit: the title,
//! the text, and a context line with why the card is there (trigger, phrase, sources, pipeline,
//! model, engine time) and a fallback's reason. Slack answers errors as HTTP 200 with
//! `ok: false`: `ratelimited`, `internal_error`, `fatal_error`, `request_timeout` and
//! `service_unavailable` are retried, any other error (`channel_not_found`, `not_in_channel`,
//! `invalid_auth`, `msg_too_long`, ...) is dead-lettered with Slack's code; HTTP 429 is retried
//! after its `Retry-After`.
//!
//! `type: slack_webhook` posts to an incoming webhook (`url_env`: the variable holding its
//! secret URL) for teams without a bot token: final versions only, posted once, never edited
//! (an incoming webhook returns no message to edit).

use std::collections::HashMap;
use std::time::Duration;

use prompter_core::output::{Output, Status};
use prompter_core::secret::Secret;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{DeliveryPolicy, Sent, Target};

/// A `type: slack` sink's `config:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackConfig {
    /// The channel id (`C0123456789`).
    pub channel: String,
    /// Environment variable holding the bot token. Default `SLACK_BOT_TOKEN`.
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// What a withdrawn card becomes: `strike` (default) or `delete`.
    #[serde(default)]
    pub on_withdraw: OnWithdraw,
    /// Web API base URL. Default `https://slack.com/api`.
    #[serde(default = "default_api_base")]
    pub api_base: String,
    /// Calls per second at most. Default 1 (Slack's per-channel pace).
    #[serde(default = "default_rate")]
    pub rate_per_sec: f64,
    /// Waits before each retry, in milliseconds. Default 1 s, 2 s, 5 s, 10 s, 30 s.
    #[serde(default = "default_schedule")]
    pub retry_schedule_ms: Vec<u64>,
    /// Per-request timeout. Default 10 s.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

/// A `type: slack_webhook` sink's `config:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackWebhookConfig {
    /// Environment variable holding the incoming webhook's URL. Default `SLACK_WEBHOOK_URL`.
    #[serde(default = "default_url_env")]
    pub url_env: String,
    /// Posts per second at most. Default 1.
    #[serde(default = "default_rate")]
    pub rate_per_sec: f64,
    /// Waits before each retry, in milliseconds.
    #[serde(default = "default_schedule")]
    pub retry_schedule_ms: Vec<u64>,
    /// Per-request timeout. Default 10 s.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

/// What a withdrawn card becomes in Slack.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnWithdraw {
    /// Edited: title and text struck through, with the reason.
    #[default]
    Strike,
    /// Deleted.
    Delete,
}

fn default_token_env() -> String {
    "SLACK_BOT_TOKEN".into()
}
fn default_url_env() -> String {
    "SLACK_WEBHOOK_URL".into()
}
fn default_api_base() -> String {
    "https://slack.com/api".into()
}
fn default_rate() -> f64 {
    1.0
}
fn default_schedule() -> Vec<u64> {
    vec![1_000, 2_000, 5_000, 10_000, 30_000]
}
fn default_timeout() -> u64 {
    10_000
}

impl SlackConfig {
    /// Pacing and retries.
    pub fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy::from_ms(self.rate_per_sec, &self.retry_schedule_ms)
    }
}

impl SlackWebhookConfig {
    /// Pacing and retries.
    pub fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy::from_ms(self.rate_per_sec, &self.retry_schedule_ms)
    }
}

/// Slack `ok: false` errors that may pass.
const TRANSIENT: &[&str] = &[
    "ratelimited",
    "rate_limited",
    "internal_error",
    "fatal_error",
    "request_timeout",
    "service_unavailable",
];

fn client(timeout_ms: u64) -> Result<reqwest::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(Duration::from_millis(timeout_ms.max(1)))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// `ms` as `mm:ss`.
fn clock(ms: u64) -> String {
    format!("{:02}:{:02}", ms / 60_000, (ms / 1000) % 60)
}

/// Slack mrkdwn with its three control characters escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Why the card is there, on one line.
fn why(o: &Output) -> String {
    let t = &o.trigger;
    let mut parts = vec![match (&t.tracker, t.phrases.first()) {
        (Some(tr), Some(p)) => format!(
            "{} heard \u{201c}{}\u{201d} at {}",
            escape(tr),
            escape(p),
            clock(t.offset_ms)
        ),
        (Some(tr), None) => format!("{} at {}", escape(tr), clock(t.offset_ms)),
        _ => format!("{} at {}", t.event.replace('_', " "), clock(t.offset_ms)),
    }];
    if !o.sources.is_empty() {
        let s: Vec<String> = o
            .sources
            .iter()
            .take(3)
            .map(|d| {
                let title = d.text.split(": ").next().unwrap_or(&d.text);
                format!("{} ({:.2})", escape(title), d.score)
            })
            .collect();
        parts.push(format!("sources: {}", s.join(", ")));
    }
    let mut engine = escape(&o.pipeline);
    if let Some(m) = &o.model {
        engine.push_str(&format!(" · {}", escape(m)));
    }
    engine.push_str(&format!(" · {} ms", o.timings.total_us / 1000));
    parts.push(engine);
    parts.join(" · ")
}

/// The Block Kit blocks and notification text of a card.
pub fn card(o: &Output) -> (Vec<Value>, String) {
    let title = o.title.clone().unwrap_or_else(|| o.kind.replace('_', " "));
    let withdrawn = o.status == Status::Withdrawn;
    let (title_md, text_md) = if withdrawn {
        (
            format!("~{}~", escape(&title)),
            format!(
                "~{}~\n_Withdrawn: {}_",
                escape(o.text.trim()),
                escape(o.degraded.as_deref().unwrap_or("taken back"))
            ),
        )
    } else {
        (format!("*{}*", escape(&title)), escape(o.text.trim()))
    };
    let mut context = vec![json!({"type": "mrkdwn", "text": why(o)})];
    if let (Some(d), false) = (&o.degraded, withdrawn) {
        context
            .push(json!({"type": "mrkdwn", "text": format!(":warning: Fallback: {}", escape(d))}));
    }
    if o.status == Status::Draft {
        context.push(json!({"type": "mrkdwn", "text": "_being written…_"}));
    }
    // Slack caps a section's text at 3,000 characters.
    let body: String = text_md.chars().take(2_900).collect();
    let blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": title_md}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": if body.is_empty() { " ".to_owned() } else { body }}}),
        json!({"type": "context", "elements": context}),
    ];
    let fallback = format!("{title}: {}", o.text.trim());
    (blocks, fallback.chars().take(3_000).collect())
}

/// Reads Slack's answer: HTTP status, `Retry-After`, then `ok` and `error`.
async fn read(sent: Result<reqwest::Response, reqwest::Error>, call: &str) -> Result<Value, Sent> {
    let r = sent.map_err(|e| super::unanswered(&format!("{call}: the request"), &e))?;
    let status = r.status().as_u16();
    let retry_after = super::retry_after(&r);
    if status == 429 || status >= 500 {
        return Err(Sent::Transient {
            reason: format!("{call}: Slack answered {status}"),
            retry_after,
        });
    }
    let bytes = r.bytes().await.unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).map_err(|_| Sent::Transient {
        reason: format!("{call}: Slack answered {status} without JSON"),
        retry_after: None,
    })?;
    if body["ok"] == true {
        return Ok(body);
    }
    let code = body["error"].as_str().unwrap_or("unknown_error").to_owned();
    let reason = format!("{call}: Slack answered ok=false, error `{code}`");
    if TRANSIENT.contains(&code.as_str()) {
        Err(Sent::Transient {
            reason,
            retry_after,
        })
    } else {
        Err(Sent::Permanent { reason })
    }
}

/// A channel, through the Web API.
pub struct Slack {
    client: reqwest::Client,
    config: SlackConfig,
    token: Secret,
    /// Output id → the message's `ts`, for the cards posted so far.
    posted: HashMap<String, String>,
}

impl Slack {
    /// The channel `config` names, with its token read through `env`.
    ///
    /// # Errors
    /// A missing token or no HTTP client.
    pub fn new(config: &SlackConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        Ok(Slack {
            client: client(config.timeout_ms)?,
            token: super::secret(env, &config.token_env, "the Slack bot token")?,
            config: config.clone(),
            posted: HashMap::new(),
        })
    }

    async fn call(&self, method: &str, body: &Value) -> Result<Value, Sent> {
        let url = format!("{}/{method}", self.config.api_base.trim_end_matches('/'));
        let sent = self
            .client
            .post(url)
            .bearer_auth(self.token.expose())
            .header("content-type", "application/json; charset=utf-8")
            .body(body.to_string())
            .send()
            .await;
        read(sent, method).await
    }
}

#[prompter_core::async_trait]
impl Target for Slack {
    async fn send(&mut self, output: &Output) -> Sent {
        let ts = self.posted.get(&output.id).cloned();
        let channel = &self.config.channel;
        let result = match (output.status, ts) {
            // Never posted: nothing to take back.
            (Status::Withdrawn, None) => return Sent::Skipped,
            (Status::Withdrawn, Some(ts)) if self.config.on_withdraw == OnWithdraw::Delete => {
                let r = self
                    .call("chat.delete", &json!({"channel": channel, "ts": ts}))
                    .await;
                if r.is_ok() {
                    self.posted.remove(&output.id);
                }
                r
            }
            (_, Some(ts)) => {
                let (blocks, text) = card(output);
                self.call(
                    "chat.update",
                    &json!({"channel": channel, "ts": ts, "text": text, "blocks": blocks}),
                )
                .await
            }
            (_, None) => {
                let (blocks, text) = card(output);
                let r = self
                    .call(
                        "chat.postMessage",
                        &json!({"channel": channel, "text": text, "blocks": blocks,
                            "metadata": {"event_type": "prompter_output",
                                "event_payload": {"id": output.id, "version": output.version}}}),
                    )
                    .await;
                if let Ok(body) = &r {
                    match body["ts"].as_str() {
                        Some(ts) => {
                            self.posted.insert(output.id.clone(), ts.to_owned());
                        }
                        None => {
                            return Sent::Permanent {
                                reason: "chat.postMessage: Slack answered ok without a `ts`".into(),
                            };
                        }
                    }
                }
                r
            }
        };
        match result {
            Ok(_) => Sent::Done,
            Err(sent) => sent,
        }
    }
}

/// An incoming webhook: final versions posted once.
pub struct SlackWebhook {
    client: reqwest::Client,
    url: Secret,
}

impl SlackWebhook {
    /// The incoming webhook `config` names, its URL read through `env`.
    ///
    /// # Errors
    /// A missing URL or no HTTP client.
    pub fn new(
        config: &SlackWebhookConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let url = super::secret(env, &config.url_env, "the Slack incoming webhook URL")?;
        if !url.expose().starts_with("https://") && !url.expose().starts_with("http://") {
            return Err(format!("`{}` does not hold an http(s) URL", config.url_env));
        }
        Ok(SlackWebhook {
            client: client(config.timeout_ms)?,
            url,
        })
    }
}

#[prompter_core::async_trait]
impl Target for SlackWebhook {
    async fn send(&mut self, output: &Output) -> Sent {
        // Post only, final only: an incoming webhook's message cannot be edited later.
        if output.status != Status::Final {
            return Sent::Skipped;
        }
        let (blocks, text) = card(output);
        let sent = self
            .client
            .post(self.url.expose())
            .header("content-type", "application/json")
            .body(json!({"text": text, "blocks": blocks}).to_string())
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => return super::unanswered("the incoming webhook request", &e),
        };
        let status = r.status().as_u16();
        match status {
            200..=299 => Sent::Done,
            429 | 500..=599 => Sent::Transient {
                reason: format!("the incoming webhook answered {status}"),
                retry_after: super::retry_after(&r),
            },
            404 | 410 => Sent::Disable {
                reason: format!("the incoming webhook answered {status} (removed or disabled)"),
            },
            _ => Sent::Permanent {
                reason: format!(
                    "the incoming webhook answered {status}: {}",
                    r.text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect::<String>()
                ),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::output::Trigger;

    #[test]
    fn a_card_says_why_it_is_there_and_escapes_what_slack_would_read_as_markup() {
        let o = Output {
            id: "c/rta/k-budget".into(),
            version: 2,
            status: Status::Final,
            kind: "suggestion".into(),
            pipeline: "rta".into(),
            title: Some("Budget <Constraints>".into()),
            text: "Ask what & why".into(),
            trigger: Trigger {
                event: "tracker_response".into(),
                offset_ms: 62_000,
                tracker: Some("Budget Constraints".into()),
                phrases: vec!["too expensive".into()],
                ..Trigger::default()
            },
            model: Some("nebula:llama".into()),
            degraded: Some("answered from the knowledge base".into()),
            ..Output::default()
        };
        let (blocks, text) = card(&o);
        assert_eq!(blocks[0]["text"]["text"], "*Budget &lt;Constraints&gt;*");
        assert_eq!(blocks[1]["text"]["text"], "Ask what &amp; why");
        let why = blocks[2]["elements"][0]["text"].as_str().unwrap();
        assert!(
            why.starts_with("Budget Constraints heard \u{201c}too expensive\u{201d} at 01:02"),
            "{why}"
        );
        assert!(why.contains("rta · nebula:llama"), "{why}");
        assert!(
            blocks[2]["elements"][1]["text"]
                .as_str()
                .unwrap()
                .contains("Fallback")
        );
        assert_eq!(text, "Budget <Constraints>: Ask what & why");
        let gone = Output {
            status: Status::Withdrawn,
            degraded: Some("superseded by a newer trigger".into()),
            ..o
        };
        let (blocks, _) = card(&gone);
        assert_eq!(blocks[0]["text"]["text"], "~Budget &lt;Constraints&gt;~");
        assert!(
            blocks[1]["text"]["text"]
                .as_str()
                .unwrap()
                .contains("_Withdrawn: superseded by a newer trigger_")
        );
    }
}
