//! The engine config's `sinks:` section: notifier sinks declared once, by name, each with its
//! type, its config (secrets by environment variable name), which outputs it takes, and where
//! its dead letters go. Pipelines send to them with `sinks: [name, ...]`.
//!
//! ```yaml
//! sinks:
//!   crm:
//!     type: webhook
//!     config: { url: "https://hooks.example.com/prompter", secret_env: PROMPTER_WEBHOOK_SECRET }
//!     take:                          # optional; every output by default
//!       kinds: [suggestion, summary]
//!       pipelines: [rta]             # besides the pipelines that name this sink
//!       statuses: [final, withdrawn]
//!       when: "output.sources | length > 0"
//!     dead_letter: dead-letters/crm.jsonl   # default: .prompter/dead-letters/<name>.jsonl
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use marked_yaml::types::MarkedMappingNode;
use prompter_core::output::{Output, Status};
use prompter_core::template::Expr;

use super::diagnostics::{Diagnostics, WithHelp};
use super::yaml::{check_keys, expect_map, expect_scalar, expect_seq, required};
use crate::delivery::email::EmailConfig;
use crate::delivery::slack::{SlackConfig, SlackWebhookConfig};
use crate::delivery::sms::{Provider, SmsConfig};
use crate::delivery::webhook::WebhookConfig;

/// The sink types, for hints.
pub const SINK_TYPES: &[&str] = &[
    "webhook",
    "slack",
    "slack_webhook",
    "twilio_sms",
    "vonage_sms",
    "email",
];

/// One declared sink.
#[derive(Debug, Clone)]
pub struct SinkDecl {
    /// Its name.
    pub name: String,
    /// What it is.
    pub spec: SinkSpec,
    /// Which outputs it takes.
    pub take: Take,
    /// Where what it cannot deliver is written.
    pub dead_letter: PathBuf,
}

/// A sink's type and config.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkSpec {
    /// `type: webhook`.
    Webhook(WebhookConfig),
    /// `type: slack` (the Web API, with a bot token).
    Slack(SlackConfig),
    /// `type: slack_webhook` (an incoming webhook).
    SlackWebhook(SlackWebhookConfig),
    /// `type: twilio_sms` or `vonage_sms`.
    Sms(Provider, SmsConfig),
    /// `type: email` (SMTP).
    Email(EmailConfig),
}

/// Which outputs a sink takes (`take:`); every output when empty.
#[derive(Debug, Clone, Default)]
pub struct Take {
    /// Output kinds (`suggestion`, ...); any when empty.
    pub kinds: Vec<String>,
    /// Pipelines; any when empty (pipelines naming the sink are added when it is built).
    pub pipelines: Vec<String>,
    /// Statuses; any when empty.
    pub statuses: Vec<Status>,
    /// A filter expression over `output`.
    pub when: Option<Arc<Expr>>,
}

impl Take {
    /// True when the sink takes `output`.
    pub fn accepts(&self, output: &Output) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&output.kind))
            && (self.pipelines.is_empty() || self.pipelines.contains(&output.pipeline))
            && (self.statuses.is_empty() || self.statuses.contains(&output.status))
            && self.when.as_ref().is_none_or(|w| {
                let ctx = prompter_core::minijinja::context! { output => prompter_core::minijinja::Value::from_serialize(output) };
                w.is_true(&ctx).unwrap_or_else(|e| {
                    tracing::warn!(output = %output.id, error = %e, when = w.source(), "A sink's `when` failed; the output is not sent to it.");
                    false
                })
            })
    }
}

/// Reads the `sinks:` section of engine config `file` (relative paths against `base`).
pub(super) fn sinks(
    file: &Path,
    map: &MarkedMappingNode,
    base: &Path,
    diags: &mut Diagnostics,
) -> Vec<SinkDecl> {
    let Some(entries) = map
        .get_node("sinks")
        .and_then(|n| expect_map(file, n, "`sinks`", diags))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, decl) in entries.iter() {
        let what = format!("sink `{}`", name.as_str());
        let Some(decl) = expect_map(file, decl, &format!("`{what}`"), diags) else {
            continue;
        };
        check_keys(
            file,
            decl,
            &["type", "config", "take", "dead_letter"],
            &format!("`{what}`"),
            diags,
        );
        let Some(kind_node) = required(file, decl, "type", &what, diags) else {
            continue;
        };
        let Some(kind) = expect_scalar(file, kind_node, "`type`", diags) else {
            continue;
        };
        let config = decl
            .get_node("config")
            .unwrap_or(&super::engine_file::EMPTY_MAP);
        let spec = match kind.as_str() {
            "webhook" => super::engine_file::typed_config::<WebhookConfig>(file, config, diags)
                .map(SinkSpec::Webhook),
            "slack" => super::engine_file::typed_config::<SlackConfig>(file, config, diags)
                .map(SinkSpec::Slack),
            "email" => super::engine_file::typed_config::<EmailConfig>(file, config, diags)
                .map(SinkSpec::Email),
            "twilio_sms" => super::engine_file::typed_config::<SmsConfig>(file, config, diags)
                .map(|c| SinkSpec::Sms(Provider::Twilio, c)),
            "vonage_sms" => super::engine_file::typed_config::<SmsConfig>(file, config, diags)
                .map(|c| SinkSpec::Sms(Provider::Vonage, c)),
            "slack_webhook" => {
                super::engine_file::typed_config::<SlackWebhookConfig>(file, config, diags)
                    .map(SinkSpec::SlackWebhook)
            }
            other => {
                let hint =
                    prompter_core::diagnostic::did_you_mean(other, SINK_TYPES.iter().copied())
                        .map_or_else(
                            || format!("sink types: {}", SINK_TYPES.join(", ")),
                            |s| format!("did you mean `{s}`?"),
                        );
                diags
                    .error_node(file, kind_node, format!("unknown sink type `{other}`"))
                    .help(Some(hint));
                None
            }
        };
        let take = decl
            .get_node("take")
            .map(|n| take(file, n, diags))
            .unwrap_or_default();
        let dead_letter = decl
            .get_node("dead_letter")
            .and_then(|n| expect_scalar(file, n, "`dead_letter`", diags))
            .map_or_else(
                || {
                    base.join(".prompter/dead-letters")
                        .join(format!("{}.jsonl", name.as_str()))
                },
                |p| base.join(p.as_str()),
            );
        if let Some(spec) = spec {
            out.push(SinkDecl {
                name: name.as_str().to_owned(),
                spec,
                take,
                dead_letter,
            });
        }
    }
    out
}

fn take(file: &Path, node: &marked_yaml::Node, diags: &mut Diagnostics) -> Take {
    let mut take = Take::default();
    let Some(map) = expect_map(file, node, "`take`", diags) else {
        return take;
    };
    check_keys(
        file,
        map,
        &["kinds", "pipelines", "statuses", "when"],
        "`take`",
        diags,
    );
    let list = |key: &str, diags: &mut Diagnostics| -> Vec<(String, marked_yaml::Node)> {
        map.get_node(key)
            .and_then(|n| expect_seq(file, n, &format!("`{key}`"), diags))
            .into_iter()
            .flat_map(|s| s.iter())
            .filter_map(|item| {
                expect_scalar(file, item, &format!("a `{key}` entry"), diags)
                    .map(|s| (s.as_str().trim().to_owned(), item.clone()))
            })
            .collect()
    };
    take.kinds = list("kinds", diags).into_iter().map(|(s, _)| s).collect();
    take.pipelines = list("pipelines", diags)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    for (s, item) in list("statuses", diags) {
        match s.as_str() {
            "draft" => take.statuses.push(Status::Draft),
            "final" => take.statuses.push(Status::Final),
            "withdrawn" => take.statuses.push(Status::Withdrawn),
            other => {
                diags
                    .error_node(file, &item, format!("unknown status `{other}`"))
                    .help(Some("statuses: draft, final, withdrawn".into()));
            }
        }
    }
    if let Some(n) = map.get_node("when")
        && let Some(s) = expect_scalar(file, n, "`when`", diags)
    {
        match Expr::compile(s.as_str()) {
            Ok(e) => take.when = Some(Arc::new(e)),
            Err(e) => {
                let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
                diags.error_node(
                    file,
                    n,
                    format!("bad `when` expression: {}{detail}", e.kind()),
                );
            }
        }
    }
    take
}
