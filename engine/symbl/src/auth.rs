//! Symbl authentication: an access token from the app id and secret
//! (`POST /oauth2/token:generate`), cached and refreshed before it expires.
//!
//! The credentials come from environment variables named in the config; their values are held
//! as [`Secret`]s and never reach a log or an error message. A 401 is an error that names the
//! variables, so the operator knows what to fix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prompter_core::backoff::{Backoff, parse_retry_after};
use prompter_core::retry::{Attempt, RetryError, retry_notify};
use prompter_core::secret::Secret;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::config::SymblConfig;

/// A token is refreshed when less than this share of its lifetime is left (or 60 s, if more).
const REFRESH_FRACTION: f64 = 0.1;
const MIN_REFRESH_MARGIN: Duration = Duration::from_secs(60);
const TOKEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[must_use]
pub enum AuthError {
    /// A credential variable is unset or empty.
    #[error("the Symbl credential variable `{var}` is not set (export {var}=...)")]
    MissingCredential {
        /// The variable's name.
        var: String,
    },
    /// Symbl refused the app id and secret.
    #[error(
        "Symbl rejected the app id and secret ({status}): check `{app_id_env}` and `{app_secret_env}`"
    )]
    Rejected {
        /// The HTTP status (401, or 400/403).
        status: u16,
        /// The variable holding the app id.
        app_id_env: String,
        /// The variable holding the app secret.
        app_secret_env: String,
    },
    /// The token endpoint failed (network, 5xx, 429, malformed answer) after the retries.
    #[error("Symbl token request to `{url}` failed: {reason}")]
    Unavailable {
        /// The token URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// The app id and secret, with the names of the variables they came from.
#[derive(Clone)]
pub struct Credentials {
    app_id: Secret,
    app_secret: Secret,
    app_id_env: String,
    app_secret_env: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("app_id_env", &self.app_id_env)
            .field("app_secret_env", &self.app_secret_env)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads the variables named by `config` through `lookup` (the process environment in the
    /// engine, a map in tests).
    ///
    /// # Errors
    /// [`AuthError::MissingCredential`] naming the first unset or empty variable.
    pub fn from_lookup(
        config: &SymblConfig,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, AuthError> {
        let read = |var: &str| {
            lookup(var)
                .filter(|v| !v.trim().is_empty())
                .map(Secret::new)
                .ok_or_else(|| AuthError::MissingCredential {
                    var: var.to_owned(),
                })
        };
        Ok(Credentials {
            app_id: read(&config.app_id_env)?,
            app_secret: read(&config.app_secret_env)?,
            app_id_env: config.app_id_env.clone(),
            app_secret_env: config.app_secret_env.clone(),
        })
    }

    /// Reads the variables named by `config` from the process environment.
    ///
    /// # Errors
    /// [`AuthError::MissingCredential`] naming the first unset or empty variable.
    pub fn from_env(config: &SymblConfig) -> Result<Self, AuthError> {
        Self::from_lookup(config, |v| std::env::var(v).ok())
    }
}

struct Token {
    value: Secret,
    refresh_at: Instant,
}

/// A source of access tokens for one Symbl app; cheap to share behind an `Arc`.
pub struct SymblAuth {
    client: reqwest::Client,
    url: String,
    credentials: Credentials,
    retry: Backoff,
    token: Mutex<Option<Token>>,
}

impl std::fmt::Debug for SymblAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SymblAuth")
            .field("url", &self.url)
            .field("credentials", &self.credentials)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<f64>,
}

impl SymblAuth {
    /// A token source for `credentials` against `config.api_base`.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(config: &SymblConfig, credentials: Credentials) -> Result<Self, AuthError> {
        let url = format!("{}/oauth2/token:generate", config.api_base());
        let client = crate::http_client(TOKEN_TIMEOUT).map_err(|e| AuthError::Unavailable {
            url: url.clone(),
            reason: format!("cannot build the HTTP client: {e}"),
        })?;
        Ok(SymblAuth {
            client,
            url,
            credentials,
            retry: Backoff::default(),
            token: Mutex::new(None),
        })
    }

    /// The process-wide token source for `config`'s API base and credential variables, created
    /// on first use, so every client of one Symbl app (sources, stages, commands) shares one
    /// cached token.
    ///
    /// # Errors
    /// A credential variable is unset ([`AuthError::MissingCredential`]).
    pub fn shared(config: &SymblConfig) -> Result<Arc<SymblAuth>, AuthError> {
        /// (API base, app id variable, app secret variable).
        type Key = (String, String, String);
        static SHARED: std::sync::LazyLock<
            std::sync::Mutex<std::collections::HashMap<Key, Arc<SymblAuth>>>,
        > = std::sync::LazyLock::new(Default::default);
        let key = (
            config.api_base().to_owned(),
            config.app_id_env.clone(),
            config.app_secret_env.clone(),
        );
        let mut map = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(a) = map.get(&key) {
            return Ok(a.clone());
        }
        let auth = Arc::new(SymblAuth::new(config, Credentials::from_env(config)?)?);
        map.insert(key, auth.clone());
        Ok(auth)
    }

    /// A valid access token: the cached one, or a new one when none is cached or the cached one
    /// is close to expiry. Concurrent callers share one request.
    ///
    /// # Errors
    /// [`AuthError::Rejected`] on 401/403 (naming the variables), [`AuthError::Unavailable`]
    /// after the retries.
    pub async fn token(&self) -> Result<Secret, AuthError> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref()
            && Instant::now() < t.refresh_at
        {
            return Ok(t.value.clone());
        }
        let fresh = self.fetch().await?;
        let value = fresh.value.clone();
        *guard = Some(fresh);
        Ok(value)
    }

    /// Forgets the cached token (after a service answered 401 to it), so the next call to
    /// [`SymblAuth::token`] fetches a new one.
    pub async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    /// Forgets the cached token if it is still `refused` (a service answered 401 to it). When
    /// a thousand sockets are refused the same old token at once, the first refusal makes the
    /// next caller fetch a new token and the others leave that new one alone, instead of each
    /// forgetting the token the one before fetched.
    pub async fn invalidate_token(&self, refused: &Secret) {
        let mut guard = self.token.lock().await;
        if guard
            .as_ref()
            .is_some_and(|t| t.value.expose() == refused.expose())
        {
            *guard = None;
        }
    }

    async fn fetch(&self) -> Result<Token, AuthError> {
        let body = serde_json::json!({
            "type": "application",
            "appId": self.credentials.app_id.expose(),
            "appSecret": self.credentials.app_secret.expose(),
        });
        let body = &body;
        let outcome = retry_notify(
            &self.retry,
            |_| async move { self.attempt(body).await },
            |r| {
                tracing::warn!(
                    attempt = r.attempt,
                    wait_ms = u64::try_from(r.wait.as_millis()).unwrap_or(u64::MAX),
                    error = %r.error,
                    "Symbl token request failed; retrying."
                );
            },
        )
        .await;
        match outcome {
            Ok(token) => Ok(token),
            Err(RetryError::Final(e)) => Err(e),
            Err(RetryError::Exhausted { last, attempts }) => {
                Err(self.unavailable(format!("{last} (after {attempts} attempts)")))
            }
        }
    }

    /// One token request, its answer classified; a retryable failure carries its reason.
    async fn attempt(&self, body: &serde_json::Value) -> Attempt<Token, AuthError, String> {
        let sent = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .body(body.to_string())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => return Attempt::retry(e.to_string()),
        };
        let status = resp.status().as_u16();
        if resp.status().is_success() {
            return match self.token_of(resp).await {
                Ok(token) => Attempt::Done(token),
                Err(e) => Attempt::Fail(e),
            };
        }
        if matches!(status, 400 | 401 | 403) {
            return Attempt::Fail(AuthError::Rejected {
                status,
                app_id_env: self.credentials.app_id_env.clone(),
                app_secret_env: self.credentials.app_secret_env.clone(),
            });
        }
        let retry_after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if status != 429 && status < 500 {
            return Attempt::Fail(self.unavailable(format!("answered {status}")));
        }
        Attempt::Retry {
            error: format!("answered {status}"),
            retry_after,
        }
    }

    /// The token in a 2xx answer, with the time to refresh it.
    async fn token_of(&self, resp: reqwest::Response) -> Result<Token, AuthError> {
        let issued = Instant::now();
        let bytes = resp.bytes().await.map_err(|e| self.unavailable(e))?;
        let t: TokenResponse = serde_json::from_slice(&bytes)
            .map_err(|e| self.unavailable(format!("the answer is not a token: {e}")))?;
        if t.access_token.is_empty() {
            return Err(self.unavailable("the answer has an empty `accessToken`"));
        }
        let lifetime = Duration::from_secs_f64(
            t.expires_in
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or(86_400.0)
                .min(1.0e9),
        );
        let margin = lifetime
            .mul_f64(REFRESH_FRACTION)
            .max(MIN_REFRESH_MARGIN)
            .min(lifetime / 2);
        tracing::debug!(
            expires_in_s = lifetime.as_secs(),
            "Got a Symbl access token."
        );
        Ok(Token {
            value: Secret::new(t.access_token),
            refresh_at: issued + (lifetime - margin),
        })
    }

    fn unavailable(&self, reason: impl std::fmt::Display) -> AuthError {
        AuthError::Unavailable {
            url: self.url.clone(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use axum::Json;
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;

    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: AtomicU32,
        /// Statuses to answer before succeeding.
        fail_first: Vec<u16>,
        expires_in: f64,
    }

    async fn token(
        State(f): State<Arc<Fake>>,
        Json(body): Json<serde_json::Value>,
    ) -> (StatusCode, Json<serde_json::Value>) {
        let n = f.calls.fetch_add(1, Ordering::SeqCst) as usize;
        if let Some(s) = f.fail_first.get(n) {
            return (
                StatusCode::from_u16(*s).unwrap(),
                Json(serde_json::json!({"message": "nope"})),
            );
        }
        if body["type"] != "application" || body["appSecret"] != "s3cret" {
            return (
                StatusCode::UNAUTHORIZED,
                Json(
                    serde_json::json!({"message": "Combination of appId and appSecret is not valid."}),
                ),
            );
        }
        (
            StatusCode::OK,
            Json(serde_json::json!({"accessToken": format!("jwt-{n}"), "expiresIn": f.expires_in})),
        )
    }

    async fn serve(fake: Fake) -> (SymblConfig, Arc<Fake>) {
        let fake = Arc::new(fake);
        let app = axum::Router::new()
            .route("/oauth2/token:generate", post(token))
            .with_state(fake.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        let config = SymblConfig {
            api_base: format!("http://{addr}"),
            ..SymblConfig::default()
        };
        (config, fake)
    }

    fn creds(config: &SymblConfig, secret: &str) -> Credentials {
        let secret = secret.to_owned();
        Credentials::from_lookup(config, move |v| match v {
            "SYMBL_APP_ID" => Some("app".into()),
            "SYMBL_APP_SECRET" => Some(secret.clone()),
            _ => None,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn the_token_is_cached_until_close_to_expiry() {
        let (config, fake) = serve(Fake {
            expires_in: 86_400.0,
            ..Fake::default()
        })
        .await;
        let auth = SymblAuth::new(&config, creds(&config, "s3cret")).unwrap();
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-0");
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-0");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        auth.invalidate().await;
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-1");
    }

    #[tokio::test]
    async fn many_refusals_of_one_old_token_fetch_one_new_token() {
        let (config, fake) = serve(Fake {
            expires_in: 86_400.0,
            ..Fake::default()
        })
        .await;
        let auth = SymblAuth::new(&config, creds(&config, "s3cret")).unwrap();
        let old = auth.token().await.unwrap();
        auth.invalidate_token(&old).await;
        let new = auth.token().await.unwrap();
        assert_eq!(new.expose(), "jwt-1");
        // Sockets refused the old token later leave the new one alone.
        for _ in 0..100 {
            auth.invalidate_token(&old).await;
        }
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-1");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        // A refusal of the new one forgets it.
        auth.invalidate_token(&new).await;
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-2");
    }

    #[tokio::test]
    async fn a_short_lived_token_is_refreshed_before_it_expires() {
        // 2 s lifetime: refreshed after 1 s (margin capped at half the lifetime).
        let (config, fake) = serve(Fake {
            expires_in: 2.0,
            ..Fake::default()
        })
        .await;
        let auth = SymblAuth::new(&config, creds(&config, "s3cret")).unwrap();
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-0");
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-1");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_401_names_the_variables_never_the_values() {
        let (config, _fake) = serve(Fake::default()).await;
        let auth = SymblAuth::new(&config, creds(&config, "wrong-secret-value")).unwrap();
        let err = auth.token().await.unwrap_err();
        let msg = err.to_string();
        assert_eq!(
            msg,
            "Symbl rejected the app id and secret (401): check `SYMBL_APP_ID` and `SYMBL_APP_SECRET`"
        );
        assert!(!msg.contains("wrong-secret-value") && !format!("{auth:?}").contains("wrong"));
    }

    #[tokio::test]
    async fn a_503_and_a_429_are_retried() {
        let (config, fake) = serve(Fake {
            fail_first: vec![503, 429],
            expires_in: 100.0,
            ..Fake::default()
        })
        .await;
        let auth = SymblAuth::new(&config, creds(&config, "s3cret")).unwrap();
        assert_eq!(auth.token().await.unwrap().expose(), "jwt-2");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn a_missing_variable_is_named() {
        let err = Credentials::from_lookup(&SymblConfig::default(), |v| {
            (v == "SYMBL_APP_ID").then(|| "app".to_owned())
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the Symbl credential variable `SYMBL_APP_SECRET` is not set (export SYMBL_APP_SECRET=...)"
        );
    }
}
