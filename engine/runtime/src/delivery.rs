//! Delivery to remote targets (webhooks, Slack, e-mail, SMS): what every notifier sink shares.
//!
//! A [`Target`] knows one service: how to send an output and how to read the answer as
//! delivered, failed for now (`Transient`, with the server's `Retry-After` when it gave one) or
//! failed for good (`Permanent`, or `Disable` when the endpoint says it is gone). [`Delivery`]
//! wraps a target into a [`Sink`]: it paces requests to the target's rate, retries transient
//! failures on the target's schedule with jitter (honouring `Retry-After`), and writes what it
//! could not deliver to a dead-letter JSONL file with the reason, counting everything. The
//! engine puts a bounded queue in front of it (coalescing: a card updated while the target is
//! slow is sent once, at its latest version), so a failing target never slows a pipeline or
//! another sink. On shutdown the queue drains up to the engine's deadline and the rest is
//! dead-lettered: nothing is dropped silently.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prompter_core::output::Output;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::sink::{QueuePolicy, Sink, SinkError};

pub mod email;
pub mod slack;
pub mod sms;
pub mod webhook;

use crate::config::sinks::{SinkDecl, SinkSpec};

/// `target` delivered as `decl` says, dead letters included.
fn delivery<T: Target>(
    decl: &SinkDecl,
    target: T,
    mut policy: DeliveryPolicy,
    filter: crate::sink::Filter,
) -> BuiltSink {
    policy.dead_letter = Some(decl.dead_letter.clone());
    let d = Delivery::new(&decl.name, target, policy).with_filter(filter);
    let stats = d.stats();
    (Box::new(d), stats)
}

/// A built notifier sink and its counters.
pub type BuiltSink = (Box<dyn Sink>, Arc<DeliveryStats>);

/// Builds the sinks the engine config declares (`sinks:`), each taking what its `take:` and the
/// pipelines naming it say, with secrets read through `env`.
///
/// # Errors
/// A sink that cannot start (a missing secret, a bad URL), naming it.
pub fn build_sinks(
    decls: &[SinkDecl],
    pipelines: &[crate::pipeline::Pipeline],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<BuiltSink>, String> {
    let mut out: Vec<BuiltSink> = Vec::with_capacity(decls.len());
    for decl in decls {
        let mut take = decl.take.clone();
        let named_by = pipelines
            .iter()
            .filter(|p| p.sinks.contains(&decl.name))
            .map(|p| p.name.clone());
        take.pipelines.extend(named_by);
        let take = Arc::new(take);
        let name = decl.name.clone();
        // An agent action goes to the sink it names, and only there.
        let filter: crate::sink::Filter = Arc::new(move |o: &Output| {
            if o.kind == crate::feed::http::AGENT_ACTION_KIND {
                o.data["sink"] == name.as_str()
            } else {
                take.accepts(o)
            }
        });
        let fail = |e: String| format!("sink `{}`: {e}", decl.name);
        let built = match &decl.spec {
            SinkSpec::Webhook(cfg) => {
                let target = webhook::Webhook::new(cfg, env).map_err(|e| fail(e.to_string()))?;
                delivery(decl, target, cfg.policy(), filter)
            }
            SinkSpec::Slack(cfg) => {
                let target = slack::Slack::new(cfg, env).map_err(fail)?;
                delivery(decl, target, cfg.policy(), filter)
            }
            SinkSpec::SlackWebhook(cfg) => {
                let target = slack::SlackWebhook::new(cfg, env).map_err(fail)?;
                delivery(decl, target, cfg.policy(), filter)
            }
            SinkSpec::Email(cfg) => {
                let target = email::Email::new(cfg, env).map_err(fail)?;
                delivery(decl, target, cfg.policy(), filter)
            }
            SinkSpec::Sms(provider, cfg) => {
                let target = sms::Sms::new(*provider, cfg, env).map_err(fail)?;
                delivery(decl, target, cfg.policy(), filter)
            }
        };
        out.push(built);
    }
    Ok(out)
}

/// How a send ended, as the target reads the service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Sent {
    /// Delivered.
    Done,
    /// Nothing to send for this output (a draft for a sink of final versions, a card kept for
    /// a later e-mail); not counted as delivered.
    Skipped,
    /// A failure that may pass (429, 5xx, a timeout, a refused connection).
    Transient {
        /// What went wrong.
        reason: String,
        /// The wait the service asked for.
        retry_after: Option<Duration>,
    },
    /// A failure retrying cannot fix (a 4xx, a rejected number).
    Permanent {
        /// What went wrong.
        reason: String,
    },
    /// The target is gone for good (a webhook's 410): this and every later output is
    /// dead-lettered without a request.
    Disable {
        /// What the service said.
        reason: String,
    },
}

/// One remote service a sink delivers to.
#[prompter_core::async_trait]
pub trait Target: Send + 'static {
    /// Sends one output (an upsert or a withdrawal) once; never retries itself.
    async fn send(&mut self, output: &Output) -> Sent;

    /// Whether it wants a conversation's release marker ([`crate::sink::released`]) after the
    /// conversation's last output. Default: no.
    fn wants_release(&self) -> bool {
        false
    }

    /// Whether it wants agents' feedback notes ([`crate::sink::feedback_note`]). Default: no.
    fn wants_feedback(&self) -> bool {
        false
    }

    /// Whether `output`, abandoned at the drain deadline, is a delivery lost (and so a dead
    /// letter). Default: yes. The e-mail sink only keeps a call's cards for its e-mail: losing
    /// one of those is not a lost delivery, losing the summary is.
    fn lost_if_abandoned(&self, output: &Output) -> bool {
        let _ = output;
        true
    }

    /// What a dead letter for `output` should hold, when not `output` itself (the e-mail sink
    /// sends a call's summary when it sees the call's release marker). Default: `None`.
    fn dead_letter_subject(&self, output: &Output) -> Option<Output> {
        let _ = output;
        None
    }
}

/// How a [`Delivery`] paces and retries.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPolicy {
    /// Requests per second to the target at most (0: no limit).
    pub rate_per_sec: f64,
    /// Waits before each retry (the first attempt is immediate); its length is the number of
    /// retries. Each wait is jittered by ±10 %, and a longer `Retry-After` wins.
    pub retry_schedule: Vec<Duration>,
    /// The dead-letter file (JSONL), when any.
    pub dead_letter: Option<PathBuf>,
}

impl DeliveryPolicy {
    /// A policy of `rate_per_sec` (negative: no limit) and retry waits in milliseconds, with no
    /// dead-letter file yet (the sink's declaration gives it).
    pub fn from_ms(rate_per_sec: f64, retry_schedule_ms: &[u64]) -> Self {
        DeliveryPolicy {
            rate_per_sec: rate_per_sec.max(0.0),
            retry_schedule: retry_schedule_ms
                .iter()
                .map(|m| Duration::from_millis(*m))
                .collect(),
            dead_letter: None,
        }
    }
}

/// A sink's secret, read through `env` from the variable `name`; `what` names it in the error.
pub(crate) fn secret(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
    what: &str,
) -> Result<prompter_core::secret::Secret, String> {
    env(name)
        .filter(|s| !s.trim().is_empty())
        .map(prompter_core::secret::Secret::new)
        .ok_or_else(|| format!("{what} is not set: put it in `{name}`"))
}

/// What a [`Delivery`] has done, for logs and metrics.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Outputs delivered.
    pub delivered: AtomicU64,
    /// Retries made.
    pub retries: AtomicU64,
    /// Outputs dead-lettered (failed for good, out of retries, target disabled or shutdown).
    pub dead_lettered: AtomicU64,
    /// 1 once the target was disabled.
    pub disabled: AtomicU64,
}

/// One line of a dead-letter file.
#[derive(Debug, Serialize)]
struct DeadLetter<'a> {
    sink: &'a str,
    reason: &'a str,
    attempts: u32,
    at_ms: u64,
    output: &'a Output,
}

/// A [`Target`] as a [`Sink`]: pacing, retries, dead letters and counters.
pub struct Delivery<T> {
    name: String,
    target: T,
    policy: DeliveryPolicy,
    next_send: Instant,
    disabled: Option<String>,
    dead_letters: Option<tokio::fs::File>,
    stats: Arc<DeliveryStats>,
    filter: Option<crate::sink::Filter>,
}

impl<T: Target> Delivery<T> {
    /// Delivery to `target` as the sink `name`.
    pub fn new(name: &str, target: T, policy: DeliveryPolicy) -> Self {
        Delivery {
            name: name.to_owned(),
            target,
            policy,
            next_send: Instant::now(),
            disabled: None,
            dead_letters: None,
            stats: Arc::default(),
            filter: None,
        }
    }

    /// Takes only the outputs `filter` accepts.
    #[must_use]
    pub fn with_filter(mut self, filter: crate::sink::Filter) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Its counters.
    pub fn stats(&self) -> Arc<DeliveryStats> {
        self.stats.clone()
    }

    /// Waits for the target's rate.
    async fn pace(&mut self) {
        let now = Instant::now();
        if self.next_send > now {
            tokio::time::sleep_until(self.next_send.into()).await;
        }
        if self.policy.rate_per_sec > 0.0 {
            let gap = Duration::from_secs_f64(1.0 / self.policy.rate_per_sec);
            self.next_send = Instant::now().max(self.next_send) + gap;
        }
    }

    async fn dead_letter(&mut self, output: &Output, reason: &str, attempts: u32) {
        let subject = self.target.dead_letter_subject(output);
        let output = subject.as_ref().unwrap_or(output);
        self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(sink = %self.name, output = %output.id, version = output.version, reason, "An output was not delivered; dead-lettered.");
        let Some(path) = self.policy.dead_letter.clone() else {
            return;
        };
        let line = DeadLetter {
            sink: &self.name,
            reason,
            attempts,
            at_ms: crate::feed::now_ms(),
            output,
        };
        let mut text = serde_json::to_string(&line).unwrap_or_default();
        text.push('\n');
        if let Err(e) = self.append(&path, text.as_bytes()).await {
            tracing::error!(sink = %self.name, file = %path.display(), error = %e, "Cannot write the dead-letter file; the output is only in this log.");
        }
    }

    async fn append(&mut self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        if self.dead_letters.is_none() {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(dir).await?;
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await?;
            self.dead_letters = Some(f);
        }
        if let Some(f) = &mut self.dead_letters {
            f.write_all(bytes).await?;
            f.flush().await?;
        }
        Ok(())
    }
}

/// A request that got no answer (a timeout, a refused connection): a failure that may pass.
pub(crate) fn unanswered(what: &str, e: &reqwest::Error) -> Sent {
    let how = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    Sent::Transient {
        reason: format!("{what} {how}"),
        retry_after: None,
    }
}

/// The wait a response asks for (`Retry-After`), when it gives a valid one.
pub(crate) fn retry_after(r: &reqwest::Response) -> Option<Duration> {
    r.headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(prompter_core::backoff::parse_retry_after)
}

/// `d` jittered by up to ±10 %.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    // A factor in [0.9, 1.1), from the clock's low bits: enough to spread retries apart.
    let factor = 0.9 + f64::from(nanos % 1_000) / 5_000.0;
    d.mul_f64(factor)
}

#[prompter_core::async_trait]
impl<T: Target> Sink for Delivery<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn policy(&self) -> QueuePolicy {
        QueuePolicy::COALESCING
    }

    fn filter(&self) -> Option<crate::sink::Filter> {
        self.filter.clone()
    }

    fn wants_release(&self) -> bool {
        self.target.wants_release()
    }

    fn wants_feedback(&self) -> bool {
        self.target.wants_feedback()
    }

    async fn deliver(&mut self, output: Arc<Output>) -> Result<(), SinkError> {
        if let Some(why) = self.disabled.clone() {
            self.dead_letter(&output, &format!("the target is disabled: {why}"), 0)
                .await;
            return Ok(());
        }
        let mut attempt = 0u32;
        loop {
            self.pace().await;
            attempt += 1;
            let (reason, retry_after) = match self.target.send(&output).await {
                Sent::Done => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Sent::Skipped => return Ok(()),
                Sent::Permanent { reason } => {
                    self.dead_letter(&output, &reason, attempt).await;
                    return Ok(());
                }
                Sent::Disable { reason } => {
                    tracing::error!(sink = %self.name, reason = %reason, "The target is gone; the sink is disabled and dead-letters from now on.");
                    self.stats.disabled.store(1, Ordering::Relaxed);
                    self.disabled = Some(reason.clone());
                    self.dead_letter(&output, &reason, attempt).await;
                    return Ok(());
                }
                Sent::Transient {
                    reason,
                    retry_after,
                } => (reason, retry_after),
            };
            let Some(step) = self
                .policy
                .retry_schedule
                .get(attempt as usize - 1)
                .copied()
            else {
                let why = format!("{reason} (gave up after {attempt} attempts)");
                self.dead_letter(&output, &why, attempt).await;
                return Ok(());
            };
            let wait = retry_after.map_or(jitter(step), |ra| ra.max(jitter(step)));
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(sink = %self.name, output = %output.id, attempt, wait_ms = wait.as_millis() as u64, reason = %reason, "Delivery failed; retrying.");
            tokio::time::sleep(wait).await;
        }
    }

    async fn abandon(&mut self, output: Arc<Output>, reason: &str) {
        if self.target.lost_if_abandoned(&output) {
            self.dead_letter(&output, reason, 0).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    /// Answers from a script; records what it was sent and when.
    struct Scripted {
        answers: VecDeque<Sent>,
        sent: Log,
    }

    #[prompter_core::async_trait]
    impl Target for Scripted {
        async fn send(&mut self, output: &Output) -> Sent {
            self.sent
                .lock()
                .unwrap()
                .push((output.id.clone(), Instant::now()));
            self.answers.pop_front().unwrap_or(Sent::Done)
        }
    }

    fn output(id: &str) -> Arc<Output> {
        Arc::new(Output {
            id: id.into(),
            version: 1,
            text: "hello".into(),
            ..Output::default()
        })
    }

    type Log = Arc<Mutex<Vec<(String, Instant)>>>;

    fn delivery(answers: Vec<Sent>, dir: &Path, rate: f64) -> (Delivery<Scripted>, Log) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let d = Delivery::new(
            "hook",
            Scripted {
                answers: answers.into(),
                sent: sent.clone(),
            },
            DeliveryPolicy {
                rate_per_sec: rate,
                retry_schedule: vec![Duration::from_millis(10), Duration::from_millis(20)],
                dead_letter: Some(dir.join("dead.jsonl")),
            },
        );
        (d, sent)
    }

    fn dead(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("dead.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn transient_failures_are_retried_honouring_retry_after_then_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, sent) = delivery(
            vec![
                Sent::Transient {
                    reason: "429".into(),
                    retry_after: Some(Duration::from_millis(120)),
                },
                Sent::Transient {
                    reason: "503".into(),
                    retry_after: None,
                },
            ],
            dir.path(),
            0.0,
        );
        d.deliver(output("a")).await.unwrap();
        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 3);
        assert!(
            sent[1].1 - sent[0].1 >= Duration::from_millis(120),
            "Retry-After honoured"
        );
        assert_eq!(d.stats().delivered.load(Ordering::Relaxed), 1);
        assert_eq!(d.stats().retries.load(Ordering::Relaxed), 2);
        assert!(dead(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn out_of_retries_and_permanent_failures_are_dead_lettered_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let busy = || Sent::Transient {
            reason: "answered 500".into(),
            retry_after: None,
        };
        let (mut d, _) = delivery(
            vec![
                busy(),
                busy(),
                busy(),
                Sent::Permanent {
                    reason: "answered 400: bad payload".into(),
                },
            ],
            dir.path(),
            0.0,
        );
        d.deliver(output("a")).await.unwrap();
        d.deliver(output("b")).await.unwrap();
        let dead = dead(dir.path());
        assert_eq!(dead.len(), 2);
        assert_eq!(dead[0]["sink"], "hook");
        assert_eq!(dead[0]["reason"], "answered 500 (gave up after 3 attempts)");
        assert_eq!(dead[0]["attempts"], 3);
        assert_eq!(dead[0]["output"]["id"], "a");
        assert_eq!(dead[1]["reason"], "answered 400: bad payload");
        assert_eq!(d.stats().dead_lettered.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_gone_target_is_disabled_and_later_outputs_are_dead_lettered_without_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, sent) = delivery(
            vec![Sent::Disable {
                reason: "answered 410 Gone".into(),
            }],
            dir.path(),
            0.0,
        );
        d.deliver(output("a")).await.unwrap();
        d.deliver(output("b")).await.unwrap();
        assert_eq!(sent.lock().unwrap().len(), 1, "no request after the 410");
        let dead = dead(dir.path());
        assert_eq!(
            dead[1]["reason"],
            "the target is disabled: answered 410 Gone"
        );
        assert_eq!(d.stats().disabled.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_sink_takes_what_its_take_says_and_agent_actions_addressed_to_it_only() {
        let decl = crate::config::sinks::SinkDecl {
            name: "sms".into(),
            spec: crate::config::sinks::SinkSpec::Webhook(webhook::WebhookConfig {
                url: "http://127.0.0.1:1/".into(),
                secret_env: "S".into(),
                timeout_ms: 100,
                rate_per_sec: 0.0,
                retry_schedule_ms: None,
            }),
            take: crate::config::sinks::Take {
                kinds: vec!["summary".into()],
                ..Default::default()
            },
            dead_letter: "dead.jsonl".into(),
        };
        let env = |_: &str| Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_owned());
        let built = build_sinks(&[decl], &[], &env).unwrap();
        let filter = built[0].0.filter().unwrap();
        let kind = |k: &str, sink: &str| Output {
            kind: k.into(),
            data: serde_json::json!({"sink": sink}),
            ..Output::default()
        };
        assert!(filter(&kind("summary", "")));
        assert!(!filter(&kind("suggestion", "")));
        assert!(filter(&kind("agent_action", "sms")));
        assert!(
            !filter(&kind("agent_action", "mail")),
            "another sink's action"
        );
    }

    #[tokio::test]
    async fn requests_are_paced_to_the_targets_rate() {
        let dir = tempfile::tempdir().unwrap();
        let (mut d, sent) = delivery(vec![], dir.path(), 20.0);
        for id in ["a", "b", "c", "d"] {
            d.deliver(output(id)).await.unwrap();
        }
        let sent = sent.lock().unwrap().clone();
        let span = sent[3].1 - sent[0].1;
        assert!(
            span >= Duration::from_millis(149),
            "4 sends at 20/s: {span:?}"
        );
    }
}
