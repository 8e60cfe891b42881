//! The webhook sink: every output version POSTed as JSON, signed as Standard Webhooks
//! specifies, so any receiver can check it came from this engine and was not replayed.
//!
//! ```yaml
//! sinks:
//!   crm:
//!     type: webhook
//!     config:
//!       url: https://hooks.example.com/prompter
//!       secret_env: PROMPTER_WEBHOOK_SECRET   # whsec_<base64>, 24 to 64 bytes
//! ```
//!
//! Each request carries `webhook-id` (`<output id>:<version>`: the receiver's idempotency key,
//! one per output version), `webhook-timestamp` (unix seconds) and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">`). The body is
//! `{"type": "output.upserted" | "output.withdrawn", "timestamp": RFC 3339, "data": <output>}`.
//! A 2xx is delivered; 410 Gone disables the endpoint; 408, 409, 425, 429, 3xx and 5xx, timeouts
//! and refused connections are retried on the spec's schedule (immediately, then 5 s, 5 min,
//! 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h, jittered, `Retry-After` honoured); any other 4xx
//! is dead-lettered at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use prompter_core::output::{Output, Status};
use serde::Deserialize;
use sha2::Sha256;

use super::{DeliveryPolicy, Sent, Target};

/// The spec's retry schedule, in seconds, after the immediate first attempt.
pub const STANDARD_SCHEDULE_S: &[u64] =
    &[5, 300, 1_800, 7_200, 18_000, 36_000, 50_400, 72_000, 86_400];

/// A webhook sink's `config:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where to POST.
    pub url: String,
    /// Environment variable holding the signing secret (`whsec_<base64>`).
    #[serde(default = "default_secret_env")]
    pub secret_env: String,
    /// Per-request timeout. Default 15 s.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Requests per second at most. Default 10.
    #[serde(default = "default_rate")]
    pub rate_per_sec: f64,
    /// Waits before each retry, in milliseconds. Default: the Standard Webhooks schedule.
    #[serde(default)]
    pub retry_schedule_ms: Option<Vec<u64>>,
}

fn default_secret_env() -> String {
    "PROMPTER_WEBHOOK_SECRET".into()
}
fn default_timeout_ms() -> u64 {
    15_000
}
fn default_rate() -> f64 {
    10.0
}

impl WebhookConfig {
    /// Pacing and retries for this webhook (dead letters are the sink's declaration's).
    pub fn policy(&self) -> DeliveryPolicy {
        match &self.retry_schedule_ms {
            Some(ms) => DeliveryPolicy::from_ms(self.rate_per_sec, ms),
            None => {
                let ms: Vec<u64> = STANDARD_SCHEDULE_S.iter().map(|s| s * 1_000).collect();
                DeliveryPolicy::from_ms(self.rate_per_sec, &ms)
            }
        }
    }
}

/// Why a webhook sink cannot start.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum WebhookError {
    /// The secret's variable is unset.
    #[error(
        "the webhook signing secret `{0}` is not set (a `whsec_` secret: `whsec_` and 24 to 64 random bytes in base64)"
    )]
    NoSecret(String),
    /// The secret is not `whsec_<base64>` of 24 to 64 bytes.
    #[error(
        "the webhook signing secret in `{0}` is not `whsec_` followed by 24 to 64 bytes in base64"
    )]
    BadSecret(String),
    /// The URL is not http(s).
    #[error("`{0}` is not an http:// or https:// URL")]
    BadUrl(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// A webhook signing key: the bytes of a `whsec_<base64>` secret. Never printed.
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

/// The signing key of a `whsec_<base64>` secret.
///
/// # Errors
/// When the secret is not of that form or its key is not 24 to 64 bytes.
pub fn signing_key(secret: &str) -> Result<SigningKey, BadSecret> {
    let b64 = secret.trim().strip_prefix("whsec_").ok_or(BadSecret)?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| BadSecret)?;
    if !(24..=64).contains(&key.len()) {
        return Err(BadSecret);
    }
    Ok(SigningKey(key))
}

/// A secret that is not `whsec_` and 24 to 64 bytes in base64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not `whsec_` followed by 24 to 64 bytes in base64")]
pub struct BadSecret;

/// The `webhook-signature` value for a message: `v1,<base64 HMAC-SHA256>` of
/// `<id>.<timestamp>.<body>` with `key`.
pub fn sign(key: &SigningKey, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0)
        .expect("invariant: HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// A webhook request's body.
#[derive(serde::Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: String,
    data: &'a Output,
}

/// A webhook endpoint.
pub struct Webhook {
    client: reqwest::Client,
    url: String,
    key: SigningKey,
}

impl Webhook {
    /// The endpoint `config` names, with its secret read through `env`.
    ///
    /// # Errors
    /// A missing or malformed secret, a URL that is not http(s), or no HTTP client.
    pub fn new(
        config: &WebhookConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, WebhookError> {
        if !(config.url.starts_with("http://") || config.url.starts_with("https://")) {
            return Err(WebhookError::BadUrl(config.url.clone()));
        }
        let secret = env(&config.secret_env)
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| WebhookError::NoSecret(config.secret_env.clone()))?;
        let key =
            signing_key(&secret).map_err(|_| WebhookError::BadSecret(config.secret_env.clone()))?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms.max(1)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| WebhookError::Client(e.to_string()))?;
        Ok(Webhook {
            client,
            url: config.url.clone(),
            key,
        })
    }
}

/// `t` as RFC 3339 in UTC, to the second (`2026-12-01T17:07:01Z`).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        (rem / 60) % 60,
        rem % 60
    )
}

#[prompter_core::async_trait]
impl Target for Webhook {
    async fn send(&mut self, output: &Output) -> Sent {
        let now = SystemTime::now();
        let kind = if output.status == Status::Withdrawn {
            "output.withdrawn"
        } else {
            "output.upserted"
        };
        // Serialized straight from the output (not through a JSON value), so numbers read
        // exactly as every other sink prints them.
        let body = Payload {
            kind,
            timestamp: rfc3339(now),
            data: output,
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => {
                return Sent::Permanent {
                    reason: format!("the output did not serialize: {e}"),
                };
            }
        };
        let id = format!("{}:{}", output.id, output.version);
        let ts = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let signature = sign(&self.key, &id, ts, &body);
        let sent = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return super::unanswered("the request to the webhook", &e),
        };
        let status = response.status().as_u16();
        let retry_after = super::retry_after(&response);
        match status {
            200..=299 => Sent::Done,
            410 => Sent::Disable {
                reason: "the webhook answered 410 Gone".into(),
            },
            300..=399 | 408 | 409 | 425 | 429 | 500..=599 => Sent::Transient {
                reason: format!("the webhook answered {status}"),
                retry_after,
            },
            _ => Sent::Permanent {
                reason: format!("the webhook answered {status}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_match_the_standard_webhooks_test_vector() {
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(format!("{key:?}"), "SigningKey(***)");
    }

    #[test]
    fn malformed_secrets_are_refused() {
        for bad in [
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "whsec_c2hvcnQ=",
        ] {
            assert!(signing_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_614_265_330);
        assert_eq!(rfc3339(t), "2021-02-25T15:02:10Z");
        let leap = UNIX_EPOCH + Duration::from_secs(1_709_164_800);
        assert_eq!(rfc3339(leap), "2024-02-29T00:00:00Z");
    }
}
