//! Who may read a feed: short-lived tokens scoped to one conversation or to the supervisor view,
//! signed with a secret that only the engine holds (HMAC-SHA256).
//!
//! A token is `<payload hex>.<mac hex>`, the payload `c:<conversation>|<expiry unix secs>` or
//! `s|<expiry>`. It carries no vendor key and nothing secret; it is checked in constant time and
//! never logged. Minting is for an operator-authenticated API or a CLI command; this module only
//! signs and checks.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use prompter_core::secret::Secret;
use sha2::Sha256;

/// The shortest secret accepted, in bytes: a guessable key would make every token forgeable.
pub const MIN_SECRET_BYTES: usize = 32;

/// What a token lets its holder read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One conversation's feed.
    Conversation(String),
    /// Every conversation (the supervisor view).
    Supervisor,
}

/// Why a token does not let its holder in (a 401 or a 403).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[must_use]
pub enum Denied {
    /// No token was presented (401).
    #[error("no feed token")]
    Missing,
    /// The token is malformed or its signature is wrong (401).
    #[error("the feed token is not valid")]
    Invalid,
    /// The token has expired (401).
    #[error("the feed token has expired")]
    Expired,
    /// The token is valid for another conversation (403).
    #[error("the feed token is for another conversation")]
    OtherConversation,
}

impl Denied {
    /// True for a 403 (a valid token without access), false for a 401.
    pub fn forbidden(&self) -> bool {
        matches!(self, Denied::OtherConversation)
    }
}

/// Why feed access could not be set up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[must_use]
#[error("the feed secret must be at least {MIN_SECRET_BYTES} bytes (it is {0})")]
pub struct WeakSecret(pub usize);

/// Signs and checks feed tokens.
pub struct FeedAccess {
    key: Secret,
}

impl std::fmt::Debug for FeedAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FeedAccess(***)")
    }
}

type HmacSha256 = Hmac<Sha256>;

impl FeedAccess {
    /// Access signed with `secret`.
    ///
    /// # Errors
    /// When the secret is shorter than [`MIN_SECRET_BYTES`].
    pub fn new(secret: Secret) -> Result<Self, WeakSecret> {
        let n = secret.expose().len();
        if n < MIN_SECRET_BYTES {
            return Err(WeakSecret(n));
        }
        Ok(FeedAccess { key: secret })
    }

    fn mac(&self) -> HmacSha256 {
        <HmacSha256 as Mac>::new_from_slice(self.key.expose().as_bytes())
            .expect("invariant: HMAC accepts keys of any length")
    }

    /// A token for `scope`, valid for `ttl` from `now`.
    pub fn mint(&self, scope: &Scope, ttl: Duration, now: SystemTime) -> String {
        let exp = unix(now).saturating_add(ttl.as_secs().max(1));
        let payload = match scope {
            Scope::Conversation(c) => format!("c:{c}|{exp}"),
            Scope::Supervisor => format!("s|{exp}"),
        };
        let mut mac = self.mac();
        mac.update(payload.as_bytes());
        format!(
            "{}.{}",
            hex(payload.as_bytes()),
            hex(&mac.finalize().into_bytes())
        )
    }

    /// The scope of `token` if it is genuine and unexpired at `now`.
    ///
    /// # Errors
    /// [`Denied`] saying why not.
    pub fn check(&self, token: Option<&str>, now: SystemTime) -> Result<Scope, Denied> {
        let token = token
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(Denied::Missing)?;
        let (payload, tag) = token.split_once('.').ok_or(Denied::Invalid)?;
        let payload = unhex(payload).ok_or(Denied::Invalid)?;
        let tag = unhex(tag).ok_or(Denied::Invalid)?;
        let mut mac = self.mac();
        mac.update(&payload);
        // Constant time: the comparison does not tell how much of a forged tag was right.
        mac.verify_slice(&tag).map_err(|_| Denied::Invalid)?;
        let payload = String::from_utf8(payload).map_err(|_| Denied::Invalid)?;
        let (scope, exp) = payload.rsplit_once('|').ok_or(Denied::Invalid)?;
        let exp: u64 = exp.parse().map_err(|_| Denied::Invalid)?;
        if unix(now) >= exp {
            return Err(Denied::Expired);
        }
        match scope.split_once(':') {
            Some(("c", c)) => Ok(Scope::Conversation(c.to_owned())),
            None if scope == "s" => Ok(Scope::Supervisor),
            _ => Err(Denied::Invalid),
        }
    }

    /// Checks that `token` lets its holder read `conversation` (or, with `None`, the supervisor
    /// view of every conversation).
    ///
    /// # Errors
    /// [`Denied`]: 401 for a missing, invalid or expired token, 403 for another scope.
    pub fn allows(
        &self,
        token: Option<&str>,
        conversation: Option<&str>,
        now: SystemTime,
    ) -> Result<(), Denied> {
        match (self.check(token, now)?, conversation) {
            (Scope::Supervisor, _) => Ok(()),
            (Scope::Conversation(c), Some(wanted)) if c == wanted => Ok(()),
            (Scope::Conversation(_), _) => Err(Denied::OtherConversation),
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 4096 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> FeedAccess {
        FeedAccess::new(Secret::new("a feed secret of at least 32 bytes!!")).unwrap()
    }

    #[test]
    fn a_conversation_token_opens_that_conversation_only_and_expires() {
        let a = access();
        let now = SystemTime::now();
        let t = a.mint(
            &Scope::Conversation("call-7".into()),
            Duration::from_secs(60),
            now,
        );
        assert_eq!(a.allows(Some(&t), Some("call-7"), now), Ok(()));
        let other = a.allows(Some(&t), Some("call-8"), now).unwrap_err();
        assert_eq!(other, Denied::OtherConversation);
        assert!(other.forbidden());
        assert_eq!(
            a.allows(Some(&t), None, now),
            Err(Denied::OtherConversation),
            "no supervisor view with a conversation token"
        );
        let later = now + Duration::from_secs(61);
        assert_eq!(
            a.allows(Some(&t), Some("call-7"), later),
            Err(Denied::Expired)
        );
    }

    #[test]
    fn a_supervisor_token_opens_every_conversation() {
        let a = access();
        let now = SystemTime::now();
        let t = a.mint(&Scope::Supervisor, Duration::from_secs(60), now);
        assert_eq!(a.allows(Some(&t), Some("any"), now), Ok(()));
        assert_eq!(a.allows(Some(&t), None, now), Ok(()));
    }

    #[test]
    fn missing_forged_and_foreign_tokens_are_refused_as_401() {
        let a = access();
        let now = SystemTime::now();
        assert_eq!(a.allows(None, Some("c"), now), Err(Denied::Missing));
        assert_eq!(a.allows(Some(" "), Some("c"), now), Err(Denied::Missing));
        let t = a.mint(
            &Scope::Conversation("c".into()),
            Duration::from_secs(60),
            now,
        );
        // Another conversation written into a genuine token's payload.
        let (_, tag) = t.split_once('.').unwrap();
        let forged = format!("{}.{tag}", hex(b"s|99999999999"));
        assert_eq!(a.check(Some(&forged), now), Err(Denied::Invalid));
        // Signed with another secret.
        let other = FeedAccess::new(Secret::new("another secret, also 32 bytes long")).unwrap();
        let foreign = other.mint(&Scope::Supervisor, Duration::from_secs(60), now);
        assert_eq!(a.check(Some(&foreign), now), Err(Denied::Invalid));
        for junk in ["x", "zz.zz", "00.", ".00", "abc.def"] {
            let denied = a.check(Some(junk), now).unwrap_err();
            assert!(!denied.forbidden(), "{junk}: {denied:?}");
        }
    }

    #[test]
    fn a_short_secret_is_refused_and_none_is_ever_printed() {
        assert_eq!(
            FeedAccess::new(Secret::new("short")).unwrap_err(),
            WeakSecret(5)
        );
        assert_eq!(format!("{:?}", access()), "FeedAccess(***)");
    }
}
