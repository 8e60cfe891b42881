//! What a stage returns: the flow decision plus notices.

use std::fmt;

use serde_json::Value;

use crate::bindings;

/// Something to deliver to the agent or a supervisor (an alert, a card): `kind`, optional
/// `title`, `text` and optional structured `data_json`.
///
/// ```
/// use prompter_sdk::Notice;
/// let n = Notice::new("suggestion", "Offer the annual plan")
///     .title("Pricing")
///     .data(serde_json::json!({ "discount": 20 }));
/// assert_eq!(n.data_json.as_deref(), Some(r#"{"discount":20}"#));
/// ```
pub use bindings::prompter::plugin::types::Notice;

impl Notice {
    /// A notice of `kind` (`alert`, `suggestion`, ...) with `text`.
    pub fn new(kind: impl Into<String>, text: impl Into<String>) -> Self {
        Notice {
            kind: kind.into(),
            title: None,
            text: text.into(),
            data_json: None,
        }
    }

    /// An `alert` with a title.
    pub fn alert(title: impl Into<String>, text: impl Into<String>) -> Self {
        Notice::new("alert", text).title(title)
    }

    /// A `suggestion`.
    pub fn suggestion(text: impl Into<String>) -> Self {
        Notice::new("suggestion", text)
    }

    /// Sets the title.
    #[must_use]
    pub fn title(mut self, title: impl Into<String>) -> Self {
        self.title = Some(title.into());
        self
    }

    /// Attaches structured data.
    #[must_use]
    pub fn data(mut self, data: Value) -> Self {
        self.data_json = Some(data.to_string());
        self
    }

    /// The attached data, parsed.
    pub fn data_value(&self) -> Option<Value> {
        self.data_json
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
    }
}

/// What the pipeline does after this stage.
#[derive(Debug, Clone, PartialEq)]
pub enum Flow {
    /// Go on; the value is this stage's output, readable as `stages.<id>`.
    Continue(Value),
    /// Stop this run quietly, with a reason for the logs.
    Halt(String),
}

/// The result of processing one event: a [`Flow`] and the [`Notice`]s to deliver, in order.
///
/// ```
/// use prompter_sdk::{Notice, Outcome};
/// use serde_json::json;
///
/// let out = Outcome::next(json!({ "score": 0.9 }))
///     .notify(Notice::alert("Escalate", "The customer asked for a manager"));
/// assert_eq!(out.output(), Some(&json!({ "score": 0.9 })));
/// assert_eq!(out.notices().len(), 1);
/// assert!(Outcome::halt("not for me").is_halt());
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Outcome {
    /// Continue (with an output) or halt.
    pub flow: Flow,
    /// Delivered as outputs, in order.
    pub notices: Vec<Notice>,
}

impl Outcome {
    /// Go on, with `output` as this stage's output (`stages.<id>` in later templates).
    pub fn next(output: Value) -> Self {
        Outcome {
            flow: Flow::Continue(output),
            notices: Vec::new(),
        }
    }

    /// Go on, with no output (`null`).
    pub fn pass() -> Self {
        Outcome::next(Value::Null)
    }

    /// Stop this pipeline run quietly; `reason` goes to the logs.
    pub fn halt(reason: impl fmt::Display) -> Self {
        Outcome {
            flow: Flow::Halt(reason.to_string()),
            notices: Vec::new(),
        }
    }

    /// Adds a notice to deliver.
    pub fn notify(mut self, notice: Notice) -> Self {
        self.notices.push(notice);
        self
    }

    /// Adds a notice when there is one.
    pub fn notify_opt(mut self, notice: Option<Notice>) -> Self {
        self.notices.extend(notice);
        self
    }

    /// The output, when the flow continues.
    pub fn output(&self) -> Option<&Value> {
        match &self.flow {
            Flow::Continue(v) => Some(v),
            Flow::Halt(_) => None,
        }
    }

    /// The reason, when the flow halts.
    pub fn halt_reason(&self) -> Option<&str> {
        match &self.flow {
            Flow::Continue(_) => None,
            Flow::Halt(r) => Some(r),
        }
    }

    /// True when the flow halts.
    pub fn is_halt(&self) -> bool {
        matches!(self.flow, Flow::Halt(_))
    }

    /// The notices, in order.
    pub fn notices(&self) -> &[Notice] {
        &self.notices
    }
}

impl From<Outcome> for bindings::StageResult {
    fn from(o: Outcome) -> Self {
        let flow = match o.flow {
            Flow::Continue(v) => bindings::prompter::plugin::types::Flow::Continue(v.to_string()),
            Flow::Halt(r) => bindings::prompter::plugin::types::Flow::Halt(r),
        };
        bindings::StageResult {
            flow,
            notices: o.notices,
        }
    }
}
