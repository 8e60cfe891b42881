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
                Duration::from_millis(step_ms(self.base_ms, attempt, jitter_permille()))
            })
            .min(cap)
    }

    /// Whether another attempt is allowed after `attempt` (0-based) failed.
    pub fn allows_retry(&self, attempt: u32) -> bool {
        attempt < self.max_retries
    }
}

/// The un-capped wait before retry `attempt + 1`: `base_ms · 2^attempt` (the exponent capped at
/// 16) plus `permille / 2000` of it (up to 50% jitter). Saturates instead of overflowing, so any
/// configured `base_ms` is safe.
fn step_ms(base_ms: u64, attempt: u32, permille: u64) -> u64 {
    let base = base_ms.max(1).saturating_mul(1 << attempt.min(16));
    // In u128 the product cannot overflow, and the quotient is at most `base / 2`.
    let jitter = u128::from(base) * u128::from(permille.min(999)) / 2000;
    base.saturating_add(u64::try_from(jitter).unwrap_or(u64::MAX))
}

/// The longest `Retry-After` [`parse_retry_after`] returns; longer (or absurd) values are
/// clamped to it. Callers cap the wait further with [`Backoff::max_ms`].
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(86_400);

/// Parses a `Retry-After` header value given in seconds (the HTTP-date form is not used by the
/// services we call; it yields `None`, and the client falls back to its own backoff).
///
/// The value comes from a remote server, so it never panics: a huge number (`1e20`,
/// `99999999999999999999`) is clamped to [`MAX_RETRY_AFTER`]; a negative, NaN or non-numeric
/// one yields `None`.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let secs = v.parse::<f64>().ok().filter(|s| !s.is_nan() && *s >= 0.0)?;
            // Fails only for values too large for a `Duration` (or infinite): clamp those.
            Duration::try_from_secs_f64(secs).unwrap_or(MAX_RETRY_AFTER)
        }
    };
    Some(d.min(MAX_RETRY_AFTER))
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
        assert_eq!(parse_retry_after("-0.5"), None);
        assert_eq!(parse_retry_after("NaN"), None);
        assert_eq!(parse_retry_after(""), None);
    }

    #[test]
    fn huge_retry_after_values_are_clamped_not_panics() {
        for v in [
            "1e20",
            "99999999999999999999",
            "18446744073709551615",
            "1.8446744073709552e19",
            "1e308",
            "inf",
            "+Infinity",
            "123456789012",
        ] {
            assert_eq!(parse_retry_after(v), Some(MAX_RETRY_AFTER), "{v}");
        }
        assert_eq!(
            parse_retry_after("86400"),
            Some(Duration::from_secs(86_400))
        );
        // And a clamped value is capped by the backoff as any other.
        let b = Backoff::default();
        assert_eq!(
            b.wait(0, parse_retry_after("1e20")),
            Duration::from_millis(b.max_ms)
        );
    }

    #[test]
    fn huge_bases_saturate_instead_of_overflowing() {
        assert_eq!(step_ms(u64::MAX, 0, 999), u64::MAX);
        assert_eq!(step_ms(u64::MAX, 16, 999), u64::MAX);
        assert_eq!(step_ms(u64::MAX / 2, 1, 500), u64::MAX);
        // Just past where `base * 999` used to overflow, the jitter is still exact.
        let base = u64::MAX / 999 + 1;
        assert_eq!(
            step_ms(base, 0, 999),
            base + base / 2000 * 999 + base % 2000 * 999 / 2000
        );
        assert_eq!(step_ms(0, 0, 0), 1);
        assert_eq!(step_ms(100, 2, 999), 400 + 199);
        for (base_ms, max_ms) in [(u64::MAX, u64::MAX), (u64::MAX, 1_000), (1 << 60, u64::MAX)] {
            let b = Backoff {
                base_ms,
                max_ms,
                max_retries: 100,
            };
            for attempt in [0, 1, 15, 16, 17, 63, 64, u32::MAX] {
                assert!(b.wait(attempt, None) <= Duration::from_millis(max_ms));
            }
        }
    }
}
