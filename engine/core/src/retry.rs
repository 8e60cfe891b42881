//! The retry loop shared by every client of a remote service (Nebula, OpenAI-compatible servers,
//! Symbl REST and auth): run an attempt, and on a retryable failure wait as [`Backoff`] says
//! (honouring the server's `Retry-After`) and try again, a bounded number of times.
//!
//! It owns the loop only. Deciding what is retryable (429, 5xx, a refused connection, a timed-out
//! attempt) and reading `Retry-After` from a response stay with each client, which knows its HTTP
//! library and its service: this crate depends on no HTTP client. Per-attempt timeouts are the
//! attempt's business too (wrap it in `tokio::time::timeout`).

use std::future::Future;
use std::time::Duration;

use crate::backoff::Backoff;

/// How one attempt ended, as the client classifies it.
///
/// `E` is the final error; `R` (by default the same type) what a retryable failure carries, e.g.
/// a short reason kept for the message given when the retries run out.
#[derive(Debug)]
#[must_use]
pub enum Attempt<T, E, R = E> {
    /// It worked.
    Done(T),
    /// A failure that may pass (429, 5xx, a connection failure, a timeout): wait and try again,
    /// unless the retries are used up.
    Retry {
        /// What went wrong this time.
        error: R,
        /// The wait the server asked for (`Retry-After`), if any; still capped by
        /// [`Backoff::max_ms`].
        retry_after: Option<Duration>,
    },
    /// A failure that retrying cannot fix (401, another 4xx, a malformed answer): stop now.
    Fail(E),
}

impl<T, E, R> Attempt<T, E, R> {
    /// A retryable failure without a server-requested wait.
    pub fn retry(error: R) -> Self {
        Attempt::Retry {
            error,
            retry_after: None,
        }
    }
}

/// Why [`retry`] gave up.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[must_use]
pub enum RetryError<E, R = E> {
    /// An attempt failed in a way retrying cannot fix ([`Attempt::Fail`]).
    #[error("{0}")]
    Final(E),
    /// Every allowed attempt failed retryably; `last` is the last attempt's error.
    #[error("{last} (after {attempts} attempts)")]
    Exhausted {
        /// The last attempt's error.
        last: R,
        /// How many attempts were made: `max_retries + 1`.
        attempts: u32,
    },
}

/// What [`retry_notify`] reports before waiting for the next attempt.
#[derive(Debug)]
pub struct Retrying<'a, R> {
    /// The attempt that failed, 1-based.
    pub attempt: u32,
    /// How long the loop now waits.
    pub wait: Duration,
    /// Why the attempt failed.
    pub error: &'a R,
}

/// Runs `attempt` (given the 0-based attempt number) until it is [`Attempt::Done`] or
/// [`Attempt::Fail`], or until `backoff` allows no more retries. Between attempts it sleeps
/// [`Backoff::wait`]: the server's `retry_after` when given, else the jittered exponential step,
/// never more than `max_ms`.
///
/// # Errors
/// [`RetryError::Final`] when an attempt fails for good; [`RetryError::Exhausted`] with the last
/// error when `max_retries + 1` attempts all failed retryably.
///
/// # Examples
/// ```
/// use prompter_core::backoff::Backoff;
/// use prompter_core::retry::{Attempt, RetryError, retry};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let backoff = Backoff { base_ms: 1, max_ms: 10, max_retries: 2 };
/// let answer: Result<u16, RetryError<String>> = retry(&backoff, |attempt| async move {
///     // Two 503s, then a 200.
///     if attempt < 2 {
///         Attempt::retry(format!("answered 503 (attempt {attempt})"))
///     } else {
///         Attempt::Done(200)
///     }
/// })
/// .await;
/// assert_eq!(answer, Ok(200));
/// # }
/// ```
pub async fn retry<T, E, R, F, Fut>(backoff: &Backoff, attempt: F) -> Result<T, RetryError<E, R>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt<T, E, R>>,
{
    retry_notify(backoff, attempt, |_| {}).await
}

/// [`retry`], calling `on_retry` before each wait (clients log there, with their own fields).
///
/// # Errors
/// As [`retry`].
pub async fn retry_notify<T, E, R, F, Fut>(
    backoff: &Backoff,
    mut attempt: F,
    mut on_retry: impl FnMut(Retrying<'_, R>),
) -> Result<T, RetryError<E, R>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Attempt<T, E, R>>,
{
    let mut n = 0u32;
    loop {
        let (error, retry_after) = match attempt(n).await {
            Attempt::Done(value) => return Ok(value),
            Attempt::Fail(error) => return Err(RetryError::Final(error)),
            Attempt::Retry { error, retry_after } => (error, retry_after),
        };
        if !backoff.allows_retry(n) {
            return Err(RetryError::Exhausted {
                last: error,
                attempts: n.saturating_add(1),
            });
        }
        let wait = backoff.wait(n, retry_after);
        crate::meter::retry();
        on_retry(Retrying {
            attempt: n.saturating_add(1),
            wait,
            error: &error,
        });
        tokio::time::sleep(wait).await;
        n = n.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    const B: Backoff = Backoff {
        base_ms: 100,
        max_ms: 1_000,
        max_retries: 3,
    };

    /// A fake server answering `statuses` in turn (then 200), classified as the clients do.
    fn server(statuses: &[u16]) -> impl FnMut(u32) -> std::future::Ready<Attempt<u16, String>> {
        let mut left = statuses.iter().copied();
        move |_| {
            std::future::ready(match left.next().unwrap_or(200) {
                200 => Attempt::Done(200),
                s @ (429 | 500..) => Attempt::retry(format!("answered {s}")),
                s => Attempt::Fail(format!("answered {s}")),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_503_twice_then_a_200() {
        let started = Instant::now();
        let mut seen = Vec::new();
        let got = retry_notify(&B, server(&[503, 503]), |r| {
            seen.push((r.attempt, r.error.clone()));
            assert!(r.wait >= Duration::from_millis(100 << (r.attempt - 1)));
        })
        .await;
        assert_eq!(got, Ok(200));
        assert_eq!(
            seen,
            [
                (1, "answered 503".to_owned()),
                (2, "answered 503".to_owned())
            ]
        );
        // 100..150 ms, then 200..300 ms of jittered waits.
        let waited = started.elapsed();
        assert!(
            (Duration::from_millis(300)..=Duration::from_millis(450)).contains(&waited),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_and_capped() {
        let calls = Mutex::new(Vec::new());
        let got: Result<(), RetryError<&str>> = retry(&B, |n| {
            calls.lock().unwrap().push(Instant::now());
            let retry_after = match n {
                0 => Some(Duration::from_millis(700)),
                1 => Some(Duration::from_secs(30)),
                _ => return std::future::ready(Attempt::Done(())),
            };
            std::future::ready(Attempt::Retry {
                error: "answered 429",
                retry_after,
            })
        })
        .await;
        assert_eq!(got, Ok(()));
        let calls = calls.into_inner().unwrap();
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        // The server's 700 ms wins over the 100 ms step; its 30 s is cut to `max_ms`.
        assert_eq!(
            gaps,
            [Duration::from_millis(700), Duration::from_millis(1_000)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_final_error_is_not_retried() {
        let started = Instant::now();
        let mut attempts = 0;
        let mut next = server(&[401, 503]);
        let got = retry(&B, |n| {
            attempts += 1;
            next(n)
        })
        .await;
        assert_eq!(got, Err(RetryError::Final("answered 401".to_owned())));
        assert_eq!(attempts, 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let mut attempts = Vec::new();
        let mut next = server(&[503; 10]);
        let got = retry(&B, |n| {
            attempts.push(n);
            next(n)
        })
        .await;
        let err = got.unwrap_err();
        assert_eq!(err.to_string(), "answered 503 (after 4 attempts)");
        assert_eq!(
            err,
            RetryError::Exhausted {
                last: "answered 503".to_owned(),
                attempts: 4
            }
        );
        assert_eq!(attempts, [0, 1, 2, 3]);

        // No retries at all: one attempt, no wait.
        let none = Backoff {
            max_retries: 0,
            ..B
        };
        let started = Instant::now();
        let got = retry(&none, server(&[503])).await;
        assert!(matches!(
            got,
            Err(RetryError::Exhausted { attempts: 1, .. })
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
