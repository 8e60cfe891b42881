//! The `cluster:` section: scale-out on NATS JetStream (the `prompter-cluster` crate does the
//! work; this is the configuration it reads, checked with the rest of the engine config).
//!
//! ```yaml
//! cluster:
//!   servers: [nats://127.0.0.1:4222]
//!   token_env: NATS_TOKEN          # credentials come from the environment, by variable name
//!   partitions: 64                 # fixed for the events stream's life
//! ```

use std::time::Duration;

use serde::Deserialize;

/// The `cluster:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// NATS server URLs (`nats://host:port`); the client reconnects to any of them.
    pub servers: Vec<String>,
    /// The variable holding the NATS user name (with `password_env`).
    #[serde(default)]
    pub user_env: Option<String>,
    /// The variable holding the NATS password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The variable holding a NATS token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// The variable holding the path of a NATS credentials (`.creds`) file.
    #[serde(default)]
    pub creds_file_env: Option<String>,
    /// This process's name among the engines; default `<host>-<pid>`. Two live processes must
    /// not share one.
    #[serde(default)]
    pub member: Option<String>,
    /// First token of every subject (`prompter.ev.<conversation>`, ...). Default `prompter`.
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// The events stream. Default `PROMPTER_EVENTS`.
    #[serde(default = "default_events")]
    pub events_stream: String,
    /// The outputs stream. Default `PROMPTER_OUTPUTS`.
    #[serde(default = "default_outputs")]
    pub outputs_stream: String,
    /// Partitions of the events stream (1 to 1024). Default 64. Fixed for the stream's life:
    /// changing it means a new stream.
    #[serde(default = "default_partitions")]
    pub partitions: u32,
    /// How long events and outputs are kept, in hours. Default 24.
    #[serde(default = "default_max_age_hours")]
    pub max_age_hours: u64,
    /// Redelivery of an event not acknowledged this long after delivery. Default 30,000 ms.
    #[serde(default = "default_ack_wait")]
    pub ack_wait_ms: u64,
    /// A partition's engine that stops pulling for this long loses it to another. Default
    /// 6,000 ms. Failover takes about this long.
    #[serde(default = "default_priority_timeout")]
    pub priority_timeout_ms: u64,
    /// An engine that has not said it is alive for this long is taken as gone. Default
    /// 3,000 ms (it says so every third of it).
    #[serde(default = "default_member_ttl")]
    pub member_ttl_ms: u64,
    /// How long one pull request waits for events. Default 2,000 ms; below
    /// `priority_timeout_ms`.
    #[serde(default = "default_pull_expiry")]
    pub pull_expiry_ms: u64,
    /// A settled conversation is snapshotted at most this often. Default 10 s.
    #[serde(default = "default_snapshot_every")]
    pub snapshot_every_secs: u64,
    /// Re-published outputs within this window are dropped by the server. Default 600 s; it
    /// must cover a snapshot interval plus a takeover.
    #[serde(default = "default_duplicate_window")]
    pub outputs_duplicate_window_secs: u64,
}

fn default_prefix() -> String {
    "prompter".into()
}
fn default_events() -> String {
    "PROMPTER_EVENTS".into()
}
fn default_outputs() -> String {
    "PROMPTER_OUTPUTS".into()
}
fn default_partitions() -> u32 {
    64
}
fn default_max_age_hours() -> u64 {
    24
}
fn default_ack_wait() -> u64 {
    30_000
}
fn default_priority_timeout() -> u64 {
    6_000
}
fn default_member_ttl() -> u64 {
    3_000
}
fn default_pull_expiry() -> u64 {
    2_000
}
fn default_snapshot_every() -> u64 {
    10
}
fn default_duplicate_window() -> u64 {
    600
}

impl ClusterConfig {
    /// A config for `servers` with every default.
    pub fn new(servers: Vec<String>) -> Self {
        ClusterConfig {
            servers,
            user_env: None,
            password_env: None,
            token_env: None,
            creds_file_env: None,
            member: None,
            subject_prefix: default_prefix(),
            events_stream: default_events(),
            outputs_stream: default_outputs(),
            partitions: default_partitions(),
            max_age_hours: default_max_age_hours(),
            ack_wait_ms: default_ack_wait(),
            priority_timeout_ms: default_priority_timeout(),
            member_ttl_ms: default_member_ttl(),
            pull_expiry_ms: default_pull_expiry(),
            snapshot_every_secs: default_snapshot_every(),
            outputs_duplicate_window_secs: default_duplicate_window(),
        }
    }

    /// `ack_wait_ms` as a duration.
    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms)
    }
    /// `priority_timeout_ms` as a duration.
    pub fn priority_timeout(&self) -> Duration {
        Duration::from_millis(self.priority_timeout_ms)
    }
    /// `member_ttl_ms` as a duration.
    pub fn member_ttl(&self) -> Duration {
        Duration::from_millis(self.member_ttl_ms)
    }
    /// `pull_expiry_ms` as a duration.
    pub fn pull_expiry(&self) -> Duration {
        Duration::from_millis(self.pull_expiry_ms)
    }

    /// What is wrong with the values, each with the path of its key.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.servers.is_empty() {
            out.push((
                "servers",
                "name at least one NATS server (`nats://host:4222`)".to_owned(),
            ));
        }
        for s in &self.servers {
            let t = s.trim();
            if t.is_empty() || t.contains(char::is_whitespace) {
                out.push((
                    "servers",
                    format!("`{s}` is not a server URL (`nats://host:4222`)"),
                ));
            }
        }
        if !(1..=1024).contains(&self.partitions) {
            out.push((
                "partitions",
                format!("{} is out of range: 1 to 1024", self.partitions),
            ));
        }
        if !is_token(&self.subject_prefix) {
            out.push((
                "subject_prefix",
                format!(
                    "`{}` is not one subject token (letters, digits, `-`, `_`)",
                    self.subject_prefix
                ),
            ));
        }
        for (key, name) in [
            ("events_stream", &self.events_stream),
            ("outputs_stream", &self.outputs_stream),
        ] {
            if !is_token(name) {
                out.push((
                    key,
                    format!("`{name}` is not a stream name (letters, digits, `-`, `_`)"),
                ));
            }
        }
        if self.events_stream == self.outputs_stream {
            out.push((
                "outputs_stream",
                "the outputs stream must differ from the events stream".to_owned(),
            ));
        }
        if let Some(m) = &self.member
            && !is_token(m)
        {
            out.push((
                "member",
                format!("`{m}` is not a member name (letters, digits, `-`, `_`)"),
            ));
        }
        if self.pull_expiry_ms == 0 || self.pull_expiry_ms >= self.priority_timeout_ms {
            out.push((
                "pull_expiry_ms",
                format!(
                    "{} ms must be above 0 and below `priority_timeout_ms` ({} ms): a pinned engine must pull again before it loses its partitions",
                    self.pull_expiry_ms, self.priority_timeout_ms
                ),
            ));
        }
        if self.member_ttl_ms < 300 || self.member_ttl_ms > self.priority_timeout_ms {
            out.push((
                "member_ttl_ms",
                format!(
                    "{} ms must be at least 300 and at most `priority_timeout_ms` ({} ms): a paused engine must be seen as gone before its partitions move",
                    self.member_ttl_ms, self.priority_timeout_ms
                ),
            ));
        }
        if self.ack_wait_ms < 1000 {
            out.push((
                "ack_wait_ms",
                format!("{} ms is too short (at least 1,000)", self.ack_wait_ms),
            ));
        }
        if self.snapshot_every_secs == 0
            || self.outputs_duplicate_window_secs
                < 2 * self.snapshot_every_secs + self.priority_timeout_ms / 1000
        {
            out.push((
                "outputs_duplicate_window_secs",
                format!(
                    "{} s must cover twice `snapshot_every_secs` ({} s) plus a takeover (`priority_timeout_ms`): outputs re-made after a takeover are dropped as duplicates only within it",
                    self.outputs_duplicate_window_secs, self.snapshot_every_secs
                ),
            ));
        }
        for (key, var) in [
            ("user_env", &self.user_env),
            ("password_env", &self.password_env),
            ("token_env", &self.token_env),
            ("creds_file_env", &self.creds_file_env),
        ] {
            if let Some(v) = var
                && (v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
            {
                out.push((
                    key,
                    format!(
                        "`{v}` is not an environment variable name (the value is read from it)"
                    ),
                ));
            }
        }
        // Named on the one that is set (the missing one has no position to point at).
        match (&self.user_env, &self.password_env) {
            (Some(_), None) => out.push((
                "user_env",
                "`user_env` needs `password_env` beside it (both are variable names)".to_owned(),
            )),
            (None, Some(_)) => out.push((
                "password_env",
                "`password_env` needs `user_env` beside it (both are variable names)".to_owned(),
            )),
            _ => {}
        }
        out
    }
}

/// Letters, digits, `-` and `_`, not empty.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_consistent_and_bad_values_name_their_key() {
        let ok = ClusterConfig::new(vec!["nats://127.0.0.1:4222".into()]);
        assert_eq!(ok.problems(), vec![]);
        let mut bad = ok.clone();
        bad.partitions = 0;
        bad.pull_expiry_ms = 9_000;
        bad.events_stream = "a.b".into();
        bad.user_env = Some("NATS_USER".into());
        let keys: Vec<&str> = bad.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            vec!["partitions", "events_stream", "pull_expiry_ms", "user_env"]
        );
    }
}
