//! SMS sinks: Twilio's Messages API and Vonage's SMS API. Final versions only (a text message
//! cannot be edited or taken back), to a number rendered from a template and checked as E.164,
//! with a declared rule for texts longer than the limit.
//!
//! ```yaml
//! sinks:
//!   customer_sms:
//!     type: twilio_sms                     # or vonage_sms
//!     config:
//!       from: "+15550001111"
//!       to: "{{ output.data.customer_phone }}"
//!       body: "{{ output.title }}: {{ output.text }}"   # default: the output's text
//!       max_chars: 320                     # default 1600 (Twilio's limit)
//!       overflow: cut                      # or `split` into several messages, each (1/n)
//!     take: { kinds: [sms] }
//! ```
//!
//! Twilio: `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded `To`, `From`,
//! `Body`, basic auth with the account sid and auth token (`account_sid_env`,
//! `auth_token_env`; defaults `TWILIO_ACCOUNT_SID`, `TWILIO_AUTH_TOKEN`). 201 is accepted; 429
//! or error 20429 and 5xx are retried; any other error (21211 invalid `To`, 21610 unsubscribed,
//! 20003 authentication, ...) is dead-lettered with Twilio's code and message.
//!
//! Vonage: `POST /sms/json`, form-encoded `api_key`, `api_secret` (`api_key_env`,
//! `api_secret_env`; defaults `VONAGE_API_KEY`, `VONAGE_API_SECRET`), `from`, `to` (without
//! the `+`) and `text` (the field is `text`: seed 004's `message` is not one). An HTTP 200 can
//! still fail: each `messages[].status` tells; `1` (throttled) and `5` (internal error) are
//! retried, the others dead-lettered with Vonage's `error-text`.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use prompter_core::output::{Output, Status};
use prompter_core::secret::Secret;
use prompter_core::template::Template;
use serde::Deserialize;
use serde_json::Value;

use super::{DeliveryPolicy, Sent, Target};

/// Which SMS provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Twilio's Messages API.
    Twilio,
    /// Vonage's SMS API.
    Vonage,
}

/// What to do with a text longer than `max_chars`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Cut at a word boundary, ending with `…`.
    #[default]
    Cut,
    /// Several messages, each ending with `(i/n)`.
    Split,
}

/// An SMS sink's `config:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmsConfig {
    /// The sender (an E.164 number, or an alphanumeric sender id where allowed).
    pub from: String,
    /// The recipient: a template over `output`, rendering to an E.164 number.
    pub to: String,
    /// The text: a template over `output`. Default: the output's text.
    #[serde(default)]
    pub body: Option<String>,
    /// Longest text, in characters. Default 1600.
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
    /// What to do with a longer text.
    #[serde(default)]
    pub overflow: Overflow,
    /// Twilio: variable holding the account sid. Default `TWILIO_ACCOUNT_SID`.
    #[serde(default)]
    pub account_sid_env: Option<String>,
    /// Twilio: variable holding the auth token. Default `TWILIO_AUTH_TOKEN`.
    #[serde(default)]
    pub auth_token_env: Option<String>,
    /// Vonage: variable holding the API key. Default `VONAGE_API_KEY`.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Vonage: variable holding the API secret. Default `VONAGE_API_SECRET`.
    #[serde(default)]
    pub api_secret_env: Option<String>,
    /// The API's base URL. Default `https://api.twilio.com` or `https://rest.nexmo.com`.
    #[serde(default)]
    pub api_base: Option<String>,
    /// Messages per second at most. Default 1.
    #[serde(default = "default_rate")]
    pub rate_per_sec: f64,
    /// Waits before each retry, in milliseconds. Default 1 s, 5 s, 30 s, 2 min.
    #[serde(default = "default_schedule")]
    pub retry_schedule_ms: Vec<u64>,
    /// Per-request timeout. Default 10 s.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_max_chars() -> usize {
    1_600
}
fn default_rate() -> f64 {
    1.0
}
fn default_schedule() -> Vec<u64> {
    vec![1_000, 5_000, 30_000, 120_000]
}
fn default_timeout() -> u64 {
    10_000
}

impl SmsConfig {
    /// Pacing and retries.
    pub fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy::from_ms(self.rate_per_sec, &self.retry_schedule_ms)
    }
}

/// True for an E.164 number: `+`, then 7 to 15 digits, the first not 0.
pub fn is_e164(n: &str) -> bool {
    let Some(digits) = n.strip_prefix('+') else {
        return false;
    };
    (7..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

/// `text` within `max` characters, by `rule`: one part cut at a word boundary with `…`, or
/// several parts each ending with ` (i/n)`.
pub fn fit(text: &str, max: usize, rule: Overflow) -> Vec<String> {
    let max = max.max(20);
    if text.chars().count() <= max {
        return vec![text.to_owned()];
    }
    match rule {
        Overflow::Cut => vec![cut(text, max - 1) + "…"],
        Overflow::Split => {
            // Room for " (ii/nn)".
            let room = max - 8;
            let mut parts = Vec::new();
            let mut rest = text.trim();
            while !rest.is_empty() {
                let part = cut(rest, room);
                let used = part.len();
                parts.push(part);
                rest = rest[used..].trim_start();
            }
            let n = parts.len();
            parts
                .into_iter()
                .enumerate()
                .map(|(i, p)| format!("{p} ({}/{n})", i + 1))
                .collect()
        }
    }
}

/// The longest prefix of `text` within `max` characters, ending at a space when one is near.
fn cut(text: &str, max: usize) -> String {
    let end = text.char_indices().nth(max).map_or(text.len(), |(i, _)| i);
    if end == text.len() {
        return text.to_owned();
    }
    let head = &text[..end];
    if text[end..].starts_with(char::is_whitespace) {
        // The cut falls between two words already.
        return head.trim_end().to_owned();
    }
    match head.rfind(' ') {
        Some(space) if space > end / 2 => head[..space].trim_end().to_owned(),
        _ => head.to_owned(),
    }
}

/// An SMS provider account.
pub struct Sms {
    provider: Provider,
    client: reqwest::Client,
    base: String,
    from: String,
    to: Template,
    body: Option<Template>,
    max_chars: usize,
    overflow: Overflow,
    user: Secret,
    password: Secret,
    /// Parts already sent of a split message (output id and version → count), so a retry
    /// does not send them twice.
    sent_parts: HashMap<(String, u32), usize>,
}

impl Sms {
    /// The account `config` names for `provider`, its credentials read through `env`.
    ///
    /// # Errors
    /// Missing credentials, a bad template, a sender that is not E.164 (for Vonage, or a
    /// `+` number), or no HTTP client.
    pub fn new(
        provider: Provider,
        config: &SmsConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let read = |name: &str, what: &str| super::secret(env, name, what);
        let (user, password, base) = match provider {
            Provider::Twilio => (
                read(
                    config
                        .account_sid_env
                        .as_deref()
                        .unwrap_or("TWILIO_ACCOUNT_SID"),
                    "the Twilio account sid",
                )?,
                read(
                    config
                        .auth_token_env
                        .as_deref()
                        .unwrap_or("TWILIO_AUTH_TOKEN"),
                    "the Twilio auth token",
                )?,
                config
                    .api_base
                    .clone()
                    .unwrap_or_else(|| "https://api.twilio.com".into()),
            ),
            Provider::Vonage => (
                read(
                    config.api_key_env.as_deref().unwrap_or("VONAGE_API_KEY"),
                    "the Vonage API key",
                )?,
                read(
                    config
                        .api_secret_env
                        .as_deref()
                        .unwrap_or("VONAGE_API_SECRET"),
                    "the Vonage API secret",
                )?,
                config
                    .api_base
                    .clone()
                    .unwrap_or_else(|| "https://rest.nexmo.com".into()),
            ),
        };
        if config.from.starts_with('+') && !is_e164(&config.from) {
            return Err(format!("`from` `{}` is not an E.164 number", config.from));
        }
        let template = |src: &str, what: &str| {
            Template::compile(src).map_err(|e| format!("bad `{what}` template: {e}"))
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Sms {
            provider,
            client,
            base: base.trim_end_matches('/').to_owned(),
            from: config.from.clone(),
            to: template(&config.to, "to")?,
            body: config
                .body
                .as_deref()
                .map(|b| template(b, "body"))
                .transpose()?,
            max_chars: config.max_chars,
            overflow: config.overflow,
            user,
            password,
            sent_parts: HashMap::new(),
        })
    }

    async fn send_one(&self, to: &str, text: &str) -> Sent {
        let form = match self.provider {
            Provider::Twilio => form(&[("To", to), ("From", &self.from), ("Body", text)]),
            Provider::Vonage => form(&[
                ("api_key", self.user.expose()),
                ("api_secret", self.password.expose()),
                ("from", self.from.trim_start_matches('+')),
                ("to", to.trim_start_matches('+')),
                ("text", text),
            ]),
        };
        let request = match self.provider {
            Provider::Twilio => {
                let auth = base64::engine::general_purpose::STANDARD.encode(format!(
                    "{}:{}",
                    self.user.expose(),
                    self.password.expose()
                ));
                self.client
                    .post(format!(
                        "{}/2010-04-01/Accounts/{}/Messages.json",
                        self.base,
                        self.user.expose()
                    ))
                    .header("authorization", format!("Basic {auth}"))
            }
            Provider::Vonage => self.client.post(format!("{}/sms/json", self.base)),
        };
        let sent = request
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await;
        let r = match sent {
            Ok(r) => r,
            Err(e) => return super::unanswered("the SMS request", &e),
        };
        let status = r.status().as_u16();
        let retry_after = super::retry_after(&r);
        let body: Value =
            serde_json::from_slice(&r.bytes().await.unwrap_or_default()).unwrap_or(Value::Null);
        match self.provider {
            Provider::Twilio => twilio_outcome(status, &body, retry_after),
            Provider::Vonage => vonage_outcome(status, &body, retry_after),
        }
    }
}

/// Reads Twilio's answer.
fn twilio_outcome(status: u16, body: &Value, retry_after: Option<Duration>) -> Sent {
    let code = body["code"].as_u64();
    if (200..300).contains(&status) {
        return Sent::Done;
    }
    let reason = format!(
        "Twilio answered {status}{}: {}",
        code.map(|c| format!(" (error {c})")).unwrap_or_default(),
        body["message"].as_str().unwrap_or("no message")
    );
    if status == 429 || code == Some(20429) || status >= 500 {
        Sent::Transient {
            reason,
            retry_after,
        }
    } else {
        Sent::Permanent { reason }
    }
}

/// Reads Vonage's answer: every part's `status` must be `"0"`.
fn vonage_outcome(status: u16, body: &Value, retry_after: Option<Duration>) -> Sent {
    if status == 429 || status >= 500 {
        return Sent::Transient {
            reason: format!("Vonage answered {status}"),
            retry_after,
        };
    }
    let Some(messages) = body["messages"].as_array().filter(|m| !m.is_empty()) else {
        return Sent::Permanent {
            reason: format!("Vonage answered {status} without `messages`"),
        };
    };
    for m in messages {
        let s = m["status"].as_str().unwrap_or("?");
        if s == "0" {
            continue;
        }
        let reason = format!(
            "Vonage status {s}: {}",
            m["error-text"].as_str().unwrap_or("no error text")
        );
        return if s == "1" || s == "5" {
            Sent::Transient {
                reason,
                retry_after,
            }
        } else {
            Sent::Permanent { reason }
        };
    }
    Sent::Done
}

/// `application/x-www-form-urlencoded`.
fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                crate::feed::http::url_encode(k),
                crate::feed::http::url_encode(v)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[prompter_core::async_trait]
impl Target for Sms {
    async fn send(&mut self, output: &Output) -> Sent {
        // A text message cannot be edited or taken back: final versions only.
        if output.status != Status::Final {
            return Sent::Skipped;
        }
        let ctx = prompter_core::minijinja::context! {
            output => prompter_core::minijinja::Value::from_serialize(output)
        };
        let to = match self.to.render(&ctx) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                return Sent::Permanent {
                    reason: format!("the `to` template failed: {e}"),
                };
            }
        };
        if !is_e164(&to) {
            return Sent::Permanent {
                reason: format!("`{to}` is not an E.164 number (+ and 7 to 15 digits)"),
            };
        }
        let text = match &self.body {
            Some(t) => match t.render(&ctx) {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    return Sent::Permanent {
                        reason: format!("the `body` template failed: {e}"),
                    };
                }
            },
            None => output.text.trim().to_owned(),
        };
        let parts = fit(&text, self.max_chars, self.overflow);
        let key = (output.id.clone(), output.version);
        let done = self.sent_parts.get(&key).copied().unwrap_or(0);
        for (i, part) in parts.iter().enumerate().skip(done) {
            match self.send_one(&to, part).await {
                Sent::Done => {
                    self.sent_parts.insert(key.clone(), i + 1);
                }
                other => return other,
            }
        }
        self.sent_parts.remove(&key);
        Sent::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_numbers_are_checked() {
        for good in ["+15550001111", "+447700900123", "+4930123456"] {
            assert!(is_e164(good), "{good}");
        }
        for bad in [
            "15550001111",
            "+0555000111",
            "+1 555 000 1111",
            "+123",
            "+1234567890123456",
            "",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }

    #[test]
    fn long_texts_are_cut_or_split_by_the_declared_rule() {
        let text = "Thanks for calling Acme. Your refund of 42 dollars is on its way and should reach your card within five working days.";
        assert_eq!(fit(text, 200, Overflow::Cut), [text]);
        let cut = &fit(text, 40, Overflow::Cut)[0];
        assert!(cut.chars().count() <= 40 && cut.ends_with('…'), "{cut}");
        assert_eq!(cut, "Thanks for calling Acme. Your refund of…");
        let parts = fit(text, 50, Overflow::Split);
        assert!(parts.len() > 1);
        for p in &parts {
            assert!(p.chars().count() <= 50, "{p}");
        }
        assert!(parts[0].ends_with(&format!("(1/{})", parts.len())));
        let joined: Vec<&str> = parts
            .iter()
            .map(|p| p.rsplit_once(" (").unwrap().0)
            .collect();
        assert_eq!(joined.join(" "), text, "nothing lost between parts");
    }

    #[test]
    fn provider_answers_are_classified() {
        let twilio = |s: u16, b: Value| twilio_outcome(s, &b, None);
        assert_eq!(twilio(201, serde_json::json!({"sid": "SM1"})), Sent::Done);
        assert!(matches!(
            twilio(400, serde_json::json!({"code": 21211, "message": "Invalid 'To' Phone Number"})),
            Sent::Permanent { reason } if reason == "Twilio answered 400 (error 21211): Invalid 'To' Phone Number"
        ));
        assert!(matches!(
            twilio(429, serde_json::json!({"code": 20429})),
            Sent::Transient { .. }
        ));
        assert!(matches!(twilio(503, Value::Null), Sent::Transient { .. }));
        let vonage = |b: Value| vonage_outcome(200, &b, None);
        assert_eq!(
            vonage(serde_json::json!({"messages": [{"status": "0"}, {"status": "0"}]})),
            Sent::Done
        );
        assert!(matches!(
            vonage(
                serde_json::json!({"messages": [{"status": "1", "error-text": "Throughput Rate Exceeded"}]})
            ),
            Sent::Transient { .. }
        ));
        assert!(matches!(
            vonage(serde_json::json!({"messages": [{"status": "2", "error-text": "Missing to param"}]})),
            Sent::Permanent { reason } if reason == "Vonage status 2: Missing to param"
        ));
    }
}
