//! The e-mail sink: a post-call e-mail over SMTP that stands on its own, in text and HTML.
//!
//! ```yaml
//! sinks:
//!   recap_mail:
//!     type: email
//!     config:
//!       host: smtp.example.com
//!       port: 587
//!       security: starttls             # `tls` (implicit, 465), or `none` (loopback only)
//!       username_env: SMTP_USERNAME    # both optional; never sent in clear
//!       password_env: SMTP_PASSWORD
//!       from: "Prompter <prompter@example.com>"
//!       to: "{{ conversation_id }}@crm.example.com, team@example.com"
//!       subject: "Call recap: {{ summary.title }}"
//! ```
//!
//! The sink watches a call's outputs and, when its summary (`kind: summary`, final) arrives,
//! sends one message: the summary (with its action items, questions and topics), then every
//! suggestion the agent was shown (its latest version, why it came up, and whether a fallback
//! answered). `to` and `subject` are templates over `conversation_id`, `summary` and `cards`.
//! With `starttls`, the connection must upgrade before credentials are sent (no downgrade). An
//! SMTP server that is down or answers 4xx is retried; a 5xx answer (a refused recipient) is
//! dead-lettered with the server's reply.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use prompter_core::output::{Output, Status};
use prompter_core::template::Template;
use serde::Deserialize;

use super::{DeliveryPolicy, Sent, Target};

/// Calls whose cards are kept while waiting for their summary.
const CALLS_KEPT: usize = 4_096;
/// Cards kept per call.
const CARDS_KEPT: usize = 200;

/// How the SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// Plain connection upgraded with STARTTLS; refused if the server cannot upgrade.
    #[default]
    Starttls,
    /// TLS from the start (port 465).
    Tls,
    /// No encryption: only for a server on this machine.
    None,
}

/// An e-mail sink's `config:`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailConfig {
    /// The SMTP server.
    pub host: String,
    /// Its port. Default: 587, or 465 with `security: tls`.
    #[serde(default)]
    pub port: Option<u16>,
    /// How the connection is secured. Default `starttls`.
    #[serde(default)]
    pub security: Security,
    /// Variable holding the SMTP user name, when the server wants one.
    #[serde(default)]
    pub username_env: Option<String>,
    /// Variable holding the SMTP password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// The sender (`Name <address>`).
    pub from: String,
    /// Recipients, comma-separated: a template.
    pub to: String,
    /// The subject: a template. Default `Call recap: {{ conversation_id }}`.
    #[serde(default = "default_subject")]
    pub subject: String,
    /// Waits before each retry, in milliseconds. Default 5 s, 30 s, 2 min, 10 min.
    #[serde(default = "default_schedule")]
    pub retry_schedule_ms: Vec<u64>,
    /// Per-connection timeout. Default 20 s.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_subject() -> String {
    "Call recap: {{ conversation_id }}".into()
}
fn default_schedule() -> Vec<u64> {
    vec![5_000, 30_000, 120_000, 600_000]
}
fn default_timeout() -> u64 {
    20_000
}

impl EmailConfig {
    /// Pacing and retries.
    pub fn policy(&self) -> DeliveryPolicy {
        DeliveryPolicy::from_ms(0.0, &self.retry_schedule_ms)
    }
}

/// An SMTP server and the calls waiting for their summary.
pub struct Email {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Template,
    subject: Template,
    /// Per call, its cards by id (latest version), oldest call first.
    calls: HashMap<String, BTreeMap<String, Output>>,
    order: VecDeque<String>,
    /// Per call, the agents' feedback by output id (`useful`, `dismissed (already_handled)`).
    feedback: HashMap<String, BTreeMap<String, Vec<String>>>,
}

impl Email {
    /// The server `config` names, credentials read through `env`.
    ///
    /// # Errors
    /// A bad sender, template or host, or credentials half given.
    pub fn new(config: &EmailConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let from: Mailbox = config
            .from
            .parse()
            .map_err(|e| format!("`from` `{}` is not an address: {e}", config.from))?;
        let template = |src: &str, what: &str| {
            Template::compile(src).map_err(|e| format!("bad `{what}` template: {e}"))
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        let host = config.host.trim();
        let mut builder = match config.security {
            Security::Starttls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                .port(config.port.unwrap_or(587))
                .tls(Tls::Required(
                    TlsParameters::new(host.to_owned()).map_err(|e| format!("TLS: {e}"))?,
                )),
            Security::Tls => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                .port(config.port.unwrap_or(465))
                .tls(Tls::Wrapper(
                    TlsParameters::new(host.to_owned()).map_err(|e| format!("TLS: {e}"))?,
                )),
            Security::None => {
                if !matches!(host, "localhost" | "127.0.0.1" | "::1") {
                    return Err(format!(
                        "`security: none` sends mail in clear: only for a server on this machine, not `{host}`"
                    ));
                }
                AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                    .port(config.port.unwrap_or(25))
            }
        }
        .timeout(Some(Duration::from_millis(config.timeout_ms.max(1))));
        let read = |name: &Option<String>| name.as_deref().and_then(env).filter(|v| !v.is_empty());
        match (read(&config.username_env), read(&config.password_env)) {
            (Some(u), Some(p)) => builder = builder.credentials(Credentials::new(u, p)),
            (None, None) => {}
            _ => {
                return Err(
                    "SMTP credentials need both `username_env` and `password_env` set".to_owned(),
                );
            }
        }
        Ok(Email {
            transport: builder.build(),
            from,
            to: template(&config.to, "to")?,
            subject: template(&config.subject, "subject")?,
            calls: HashMap::new(),
            order: VecDeque::new(),
            feedback: HashMap::new(),
        })
    }

    /// Keeps `output` (its latest version) among its call's cards.
    fn keep(&mut self, output: &Output) {
        let call = &output.conversation_id;
        if !self.calls.contains_key(call) {
            if self.order.len() >= CALLS_KEPT
                && let Some(oldest) = self.order.pop_front()
            {
                self.calls.remove(&oldest);
                self.feedback.remove(&oldest);
            }
            self.order.push_back(call.clone());
        }
        let cards = self.calls.entry(call.clone()).or_default();
        if cards.len() < CARDS_KEPT || cards.contains_key(&output.id) {
            cards.insert(output.id.clone(), output.clone());
        }
    }
}

impl Email {
    /// `call`'s e-mail from what was kept for it; `None` when it has no summary. A template or
    /// an address that fails is a permanent failure.
    fn message(&self, call: &str) -> Result<Option<Message>, Sent> {
        let Some(kept) = self.calls.get(call) else {
            return Ok(None);
        };
        let Some(summary) = kept
            .values()
            .find(|c| c.kind == "summary" && c.status == Status::Final)
        else {
            return Ok(None);
        };
        let mut cards: Vec<&Output> = kept.values().filter(|c| c.kind != "summary").collect();
        cards.sort_by_key(|c| c.trigger.offset_ms);
        let ctx = prompter_core::minijinja::context! {
            conversation_id => call,
            summary => prompter_core::minijinja::Value::from_serialize(summary),
            cards => prompter_core::minijinja::Value::from_serialize(&cards),
        };
        let (to, subject) = match (self.to.render(&ctx), self.subject.render(&ctx)) {
            (Ok(t), Ok(s)) => (t, s),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Sent::Permanent {
                    reason: format!("a template failed: {e}"),
                });
            }
        };
        let mut message = Message::builder()
            .from(self.from.clone())
            .subject(subject.trim());
        let mut recipients = 0;
        for addr in to.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let m = addr.parse::<Mailbox>().map_err(|e| Sent::Permanent {
                reason: format!("`{addr}` is not an e-mail address: {e}"),
            })?;
            message = message.to(m);
            recipients += 1;
        }
        if recipients == 0 {
            return Err(Sent::Permanent {
                reason: "the `to` template gave no recipient".into(),
            });
        }
        let empty = BTreeMap::new();
        let feedback = self.feedback.get(call).unwrap_or(&empty);
        let (text, html) = compose(summary, &cards, feedback);
        message
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map(Some)
            .map_err(|e| Sent::Permanent {
                reason: format!("the message could not be built: {e}"),
            })
    }

    /// Lets go of what was kept for `call`.
    fn forget(&mut self, call: &str) {
        self.calls.remove(call);
        self.feedback.remove(call);
        self.order.retain(|c| c != call);
    }
}

/// The e-mail's text and HTML for `summary`, the call's `cards` and the agents' `feedback` on
/// them (by output id).
pub fn compose(
    summary: &Output,
    cards: &[&Output],
    feedback: &BTreeMap<String, Vec<String>>,
) -> (String, String) {
    let title = summary.title.as_deref().unwrap_or("Call recap");
    let mut text = format!("{title}\n\n{}\n", summary.text.trim());
    let mut html = format!(
        "<!doctype html><html><body style=\"font-family:system-ui,sans-serif;max-width:40em\">\
         <h2>{}</h2><pre style=\"white-space:pre-wrap;font-family:inherit\">{}</pre>",
        esc(title),
        esc(summary.text.trim())
    );
    if !cards.is_empty() {
        text.push_str(&format!("\nSuggestions shown ({}):\n", cards.len()));
        html.push_str(&format!("<h3>Suggestions shown ({})</h3><ol>", cards.len()));
        for c in cards {
            let name = c.title.as_deref().unwrap_or(&c.kind);
            let why = match (&c.trigger.tracker, c.trigger.phrases.first()) {
                (Some(t), Some(p)) => format!("{t}, heard \"{p}\""),
                (Some(t), None) => t.clone(),
                _ => c.trigger.event.replace('_', " "),
            };
            let state = match (c.status, &c.degraded) {
                (Status::Withdrawn, _) => " (withdrawn)".to_owned(),
                (_, Some(d)) => format!(" (fallback: {d})"),
                _ => String::new(),
            };
            let at = format!(
                "{:02}:{:02}",
                c.trigger.offset_ms / 60_000,
                (c.trigger.offset_ms / 1000) % 60
            );
            let said = feedback
                .get(&c.id)
                .map(|f| f.join(", "))
                .unwrap_or_else(|| "none".to_owned());
            text.push_str(&format!(
                "- [{at}] {name}{state}: {}\n  why: {why}\n  agent feedback: {said}\n",
                c.text.trim()
            ));
            html.push_str(&format!(
                "<li><p><b>{}</b>{} <small>at {at}</small></p><p>{}</p><p><small>Why: {}<br>Agent feedback: {}</small></p></li>",
                esc(name),
                esc(&state),
                esc(c.text.trim()),
                esc(&why),
                esc(&said)
            ));
        }
        html.push_str("</ol>");
    }
    html.push_str("<p><small>Sent by Prompter.</small></p></body></html>");
    (text, html)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[prompter_core::async_trait]
impl Target for Email {
    fn wants_release(&self) -> bool {
        true
    }

    fn wants_feedback(&self) -> bool {
        true
    }

    fn lost_if_abandoned(&self, output: &Output) -> bool {
        // The summary (its marker may not come now), or the marker of a call with a summary.
        (output.kind == "summary" && output.status == Status::Final)
            || self.dead_letter_subject(output).is_some()
    }

    fn dead_letter_subject(&self, output: &Output) -> Option<Output> {
        if output.kind != crate::sink::RELEASED_KIND {
            return None;
        }
        self.calls
            .get(&output.conversation_id)?
            .values()
            .find(|c| c.kind == "summary")
            .cloned()
    }

    /// Keeps the call's outputs; once the call is released (its last run settled, so no card
    /// comes later), sends the e-mail if a summary came.
    async fn send(&mut self, output: &Output) -> Sent {
        if output.kind == crate::sink::FEEDBACK_KIND {
            let d = &output.data;
            if let Some(id) = d["output_id"].as_str() {
                let mut said = d["action"].as_str().unwrap_or("?").replace('_', " ");
                if let Some(r) = d["reason"].as_str() {
                    said.push_str(&format!(" ({})", r.replace('_', " ")));
                }
                self.feedback
                    .entry(output.conversation_id.clone())
                    .or_default()
                    .entry(id.to_owned())
                    .or_default()
                    .push(said);
            }
            return Sent::Skipped;
        }
        if output.kind != crate::sink::RELEASED_KIND {
            self.keep(output);
            return Sent::Skipped;
        }
        let call = output.conversation_id.as_str();
        let message = match self.message(call) {
            Ok(Some(m)) => m,
            // No summary for this call: nothing to send.
            Ok(None) => {
                self.forget(call);
                return Sent::Skipped;
            }
            Err(sent) => return sent,
        };
        match self.transport.send(message).await {
            Ok(_) => {
                self.forget(call);
                Sent::Done
            }
            Err(e) if e.is_permanent() => Sent::Permanent {
                reason: format!("the SMTP server refused the message: {e}"),
            },
            Err(e) => Sent::Transient {
                reason: format!("SMTP: {e}"),
                retry_after: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(kind: &str) -> Output {
        Output {
            id: format!("c/{kind}"),
            kind: kind.into(),
            conversation_id: "c".into(),
            status: Status::Final,
            ..Output::default()
        }
    }

    #[test]
    fn at_shutdown_only_a_summary_not_yet_mailed_is_a_lost_delivery() {
        let config = EmailConfig {
            host: "127.0.0.1".into(),
            port: Some(1),
            security: Security::None,
            username_env: None,
            password_env: None,
            from: "prompter@example.com".into(),
            to: "team@example.com".into(),
            subject: default_subject(),
            retry_schedule_ms: vec![],
            timeout_ms: 100,
        };
        let mut email = Email::new(&config, &|_| None).unwrap();
        let card = output("suggestion");
        assert!(
            !email.lost_if_abandoned(&card),
            "a card only waits for the e-mail"
        );
        assert!(email.lost_if_abandoned(&output("summary")));
        let marker = crate::sink::released("c");
        assert!(
            !email.lost_if_abandoned(&marker),
            "no summary: nothing to send"
        );
        email.keep(&output("summary"));
        assert!(email.lost_if_abandoned(&marker));
        assert_eq!(email.dead_letter_subject(&marker).unwrap().kind, "summary");
        // Plain SMTP only to this machine.
        let remote = EmailConfig {
            host: "smtp.example.com".into(),
            ..config
        };
        let refused = Email::new(&remote, &|_| None).err().unwrap();
        assert!(
            refused.contains("only for a server on this machine"),
            "{refused}"
        );
    }

    #[test]
    fn the_email_shows_what_the_agent_said_of_each_card() {
        let summary = output("summary");
        let mut card = output("suggestion");
        card.title = Some("Budget".into());
        let mut feedback = BTreeMap::new();
        feedback.insert(
            card.id.clone(),
            vec![
                "useful".to_owned(),
                "dismissed (already handled)".to_owned(),
            ],
        );
        let (text, html) = compose(&summary, &[&card], &feedback);
        assert!(
            text.contains("agent feedback: useful, dismissed (already handled)"),
            "{text}"
        );
        assert!(
            html.contains("Agent feedback: useful, dismissed (already handled)"),
            "{html}"
        );
        let (text, _) = compose(&summary, &[&card], &BTreeMap::new());
        assert!(text.contains("agent feedback: none"), "{text}");
    }
}
