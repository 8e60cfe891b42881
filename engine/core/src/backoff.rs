//! Retry pacing shared by every client of a remote service (Nebula, Symbl, OpenAI-compatible
//! servers): jittered exponential backoff, bounded, that honours a server's `Retry-After`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;

/// How a client retries: `base`, `2·base`, `4·base`, ... each with up to 50% random jitter
/// added, never more than `max`, at most `max_retries` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// First wait, in milliseconds. Default 200.
    #[serde(default = "default_base_ms")]
    pub base_ms: u64,
    /// Longest wait, in milliseconds, including a server's `Retry-After`. Default 5,000.
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    /// Retries after the first attempt. Default 3.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
}

fn default_base_ms() -> u64 {
    200
}
fn default_max_ms() -> u64 {
    5_000
}
fn default_max_retries() -> u32 {
    3
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base_ms: default_base_ms(),
            max_ms: default_max_ms(),
            max_retries: default_max_retries(),
        }
    }
}

impl Backoff {
    /// The wait before retry number `attempt + 1` (0-based `attempt`): the server's
    /// `retry_after` when it sent one, else the jittered exponential step; capped at `max_ms`.
    pub fn wait(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let cap = Duration::from_millis(self.max_ms);
        retry_after
            .unwrap_or_else(|| {
                let base = self.base_ms.max(1).saturating_mul(1 << attempt.min(16));
                Duration::from_millis(base.saturating_add(base * jitter_permille() / 2000))
            })
            .min(cap)
    }

    /// Whether another attempt is allowed after `attempt` (0-based) failed.
    pub fn allows_retry(&self, attempt: u32) -> bool {
        attempt < self.max_retries
    }
}

/// Parses a `Retry-After` header value given in seconds (the HTTP-date form is not used by the
/// services we call; it yields `None`, and the client falls back to its own backoff).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    v.parse::<u64>().ok().map(Duration::from_secs).or_else(|| {
        v.parse::<f64>()
            .ok()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(Duration::from_secs_f64)
    })
}

/// A pseudo-random number in 0..1000 from the clock; enough to spread retries of many clients.
fn jitter_permille() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Mix the bits so consecutive calls do not give neighbouring values.
    u64::from(nanos.wrapping_mul(2_654_435_761) % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_jitter_and_stay_under_the_cap() {
        let b = Backoff {
            base_ms: 100,
            max_ms: 1_000,
            max_retries: 3,
        };
        for attempt in 0..3 {
            let w = b.wait(attempt, None).as_millis() as u64;
            let base = 100 << attempt;
            assert!((base..=base + base / 2).contains(&w), "{attempt}: {w}");
        }
        assert_eq!(b.wait(10, None), Duration::from_millis(1_000));
        assert_eq!(
            b.wait(0, Some(Duration::from_secs(30))),
            Duration::from_millis(1_000)
        );
        assert_eq!(
            b.wait(0, Some(Duration::from_millis(300))),
            Duration::from_millis(300)
        );
        assert!(b.allows_retry(2));
        assert!(!b.allows_retry(3));
    }

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after(" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }
}
