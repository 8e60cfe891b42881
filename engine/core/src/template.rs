//! The one expression and template language of Prompter (Jinja, via minijinja).
//!
//! Stage templates and pipeline `when:` filters are compiled once, at load time, into
//! self-contained [`Template`]s and [`Expr`]s, so a syntax error is a load-time diagnostic and
//! rendering costs no parsing. Every template sees the same context:
//!
//! - `event`: the triggering event (`kind`, `conversation_id`, `offset_ms`, `detail`, `raw`, and
//!   the shortcuts `tracker`, `message`, `insight`, `topic`, `caption`);
//! - `conversation`: the conversation state (`transcript`, `caption`, `trackers`, `insights`,
//!   `topics`, ...);
//! - `stages`: the outputs of the earlier stages of the pipeline, by stage id;
//! - `pipeline`: the pipeline name.
//!
//! Extra filters: `transcript` formats transcript lines as `Speaker: text` lines.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior, Value};

use crate::conversation::ConversationState;
use crate::error::PluginError;
use crate::event::{Detail, Event};

const NAME: &str = "t";

/// A fresh environment with Prompter's settings and filters.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // Chainable: `event.tracker.name` is empty (not an error) on a non-tracker event, which is
    // what filters like `when: event.tracker.name == "Budget"` want.
    env.set_undefined_behavior(UndefinedBehavior::Chainable);
    env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
    env.set_keep_trailing_newline(false);
    env.add_filter("transcript", transcript_filter);
    env
}

/// `{{ conversation.transcript[-6:] | transcript }}` → "Speaker: text" lines.
fn transcript_filter(lines: Value) -> Result<String, minijinja::Error> {
    let mut out = String::new();
    for line in lines.try_iter()? {
        let speaker = line.get_attr("speaker")?;
        let text = line.get_attr("text")?;
        if !out.is_empty() {
            out.push('\n');
        }
        if speaker.is_undefined() || speaker.is_none() {
            out.push_str(&text.to_string());
        } else {
            out.push_str(&format!("{speaker}: {text}"));
        }
    }
    Ok(out)
}

/// A compiled template.
#[derive(Debug)]
pub struct Template {
    env: Environment<'static>,
    source: String,
}

impl Template {
    /// Compiles `source`.
    ///
    /// # Errors
    /// A syntax error, with minijinja's line and byte range inside the template.
    pub fn compile(source: &str) -> Result<Template, minijinja::Error> {
        let mut env = environment();
        env.add_template_owned(NAME, source.to_owned())?;
        Ok(Template {
            env,
            source: source.to_owned(),
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders with `ctx`.
    ///
    /// # Errors
    /// A runtime template error (a failing filter, say).
    pub fn render(&self, ctx: &Value) -> Result<String, PluginError> {
        let t = self.env.get_template(NAME)?;
        Ok(t.render(ctx)?)
    }

    /// The stage ids this template reads through `stages.<id>`.
    pub fn stage_refs(&self) -> BTreeSet<String> {
        match self.env.get_template(NAME) {
            Ok(t) => stage_refs(t.undeclared_variables(true)),
            Err(_) => BTreeSet::new(),
        }
    }
}

/// A compiled filter expression (`when:`), true or false for an event.
#[derive(Debug)]
pub struct Expr {
    env: Environment<'static>,
    source: String,
}

impl Expr {
    /// Compiles `source`.
    ///
    /// # Errors
    /// A syntax error.
    pub fn compile(source: &str) -> Result<Expr, minijinja::Error> {
        let mut env = environment();
        // Validate as an expression first so errors read as expression errors.
        env.compile_expression(source)?;
        env.add_template_owned(NAME, format!("{{% if ({source}) %}}1{{% endif %}}"))?;
        Ok(Expr {
            env,
            source: source.to_owned(),
        })
    }

    /// The source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates to Jinja truthiness.
    ///
    /// # Errors
    /// A runtime error (comparing incompatible values, say).
    pub fn is_true(&self, ctx: &Value) -> Result<bool, PluginError> {
        let t = self.env.get_template(NAME)?;
        Ok(t.render(ctx)? == "1")
    }

    /// The stage ids the expression reads.
    pub fn stage_refs(&self) -> BTreeSet<String> {
        self.env
            .compile_expression(&self.source)
            .map(|e| stage_refs(e.undeclared_variables(true)))
            .unwrap_or_default()
    }
}

fn stage_refs(vars: std::collections::HashSet<String>) -> BTreeSet<String> {
    vars.iter()
        .filter_map(|v| v.strip_prefix("stages."))
        .map(|rest| rest.split('.').next().unwrap_or(rest).to_owned())
        .collect()
}

/// The `event` seen by templates: the event's fields plus a shortcut per detail kind
/// (`event.tracker`, `event.message`, `event.insight`, `event.topic`, `event.caption`).
pub fn event_value(event: &Event) -> Value {
    let mut map = serde_json::Map::new();
    map.insert("kind".into(), event.kind.as_str().into());
    map.insert(
        "conversation_id".into(),
        event.conversation_id.as_ref().into(),
    );
    map.insert("offset_ms".into(), event.offset_ms.into());
    let (key, detail) = match &event.detail {
        Detail::Tracker(t) => ("tracker", serde_json::to_value(t)),
        Detail::Message(m) => ("message", serde_json::to_value(m)),
        Detail::Insight(i) => ("insight", serde_json::to_value(i)),
        Detail::Topic(t) => ("topic", serde_json::to_value(t)),
        Detail::Caption(c) => ("caption", serde_json::to_value(c)),
        Detail::Entity(e) => ("entity", Ok(e.clone())),
        Detail::Error { message, details } => (
            "error",
            Ok(serde_json::json!({"message": message, "details": details})),
        ),
        Detail::Lifecycle {
            symbl_conversation_id,
            summary_url,
        } => (
            "lifecycle",
            Ok(
                serde_json::json!({"symbl_conversation_id": symbl_conversation_id, "summary_url": summary_url}),
            ),
        ),
        Detail::None => ("none", Ok(serde_json::Value::Null)),
    };
    map.insert(key.into(), detail.unwrap_or(serde_json::Value::Null));
    let base = Value::from_serialize(&map);
    minijinja::context! { raw => Value::from_serialize(event.raw.as_ref()), ..base }
}

/// The `conversation` seen by templates.
pub fn conversation_value(state: &ConversationState) -> Value {
    Value::from_serialize(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::context;

    #[test]
    fn renders_and_lists_stage_refs() {
        let t = Template::compile(
            "{{ stages.kb.documents[0].data }} / {{ conversation.transcript[-2:] | transcript }}",
        )
        .unwrap();
        assert_eq!(
            t.stage_refs().into_iter().collect::<Vec<_>>(),
            vec!["kb".to_string()]
        );
        let ctx = context! {
            stages => context!{ kb => context!{ documents => vec![context!{ data => "Offer a pilot." }] } },
            conversation => context!{ transcript => vec![
                context!{ speaker => "A", text => "one" },
                context!{ speaker => "B", text => "two" },
                context!{ speaker => "C", text => "three" }] },
        };
        assert_eq!(t.render(&ctx).unwrap(), "Offer a pilot. / B: two\nC: three");
    }

    #[test]
    fn expressions_use_jinja_truthiness_and_chain_undefined() {
        let e = Expr::compile("event.tracker.name == 'Budget' and event.tracker.is_final").unwrap();
        let yes = context! { event => context!{ tracker => context!{ name => "Budget", is_final => true } } };
        let no = context! { event => context!{ kind => "message_response" } };
        assert!(e.is_true(&yes).unwrap());
        assert!(!e.is_true(&no).unwrap());
        assert!(Expr::compile("event.kind == ").is_err());
        assert!(Template::compile("{{ x(").is_err());
    }
}
