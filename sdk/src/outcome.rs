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
    #[must_use]
    pub fn notify(mut self, notice: Notice) -> Self {
        self.notices.push(notice);
        self
    }

    /// Adds a notice when there is one.
    #[must_use]
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
            Flow::Continue(v) => bindings::prompter::plugin::types::Flow::Continue(to_json(&v)),
            Flow::Halt(r) => bindings::prompter::plugin::types::Flow::Halt(r),
        };
        bindings::StageResult {
            flow,
            notices: o.notices,
        }
    }
}

/// Serializes `value` into a string allocated at its exact size: sizing first keeps a large
/// output from doubling its buffer (and the peak memory) while it is written.
fn to_json(value: &Value) -> String {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    if serde_json::to_writer(&mut count, value).is_err() {
        return value.to_string();
    }
    let mut buf = Vec::with_capacity(count.0);
    match serde_json::to_writer(&mut buf, value) {
        // serde_json writes UTF-8 only.
        Ok(()) => String::from_utf8(buf).unwrap_or_else(|_| value.to_string()),
        Err(_) => value.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_to_the_contract_result() {
        let v = json!({"a": [1, "two", null], "b": "é\"x"});
        let r = bindings::StageResult::from(
            Outcome::next(v.clone()).notify(Notice::alert("T", "text").data(json!({"k": 1}))),
        );
        match r.flow {
            bindings::prompter::plugin::types::Flow::Continue(s) => {
                assert_eq!(s, v.to_string());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(r.notices[0].title.as_deref(), Some("T"));
        assert_eq!(r.notices[0].data_json.as_deref(), Some(r#"{"k":1}"#));
        let r = bindings::StageResult::from(Outcome::halt("no"));
        assert_eq!(
            r.flow,
            bindings::prompter::plugin::types::Flow::Halt("no".into())
        );
        assert!(Outcome::pass().output().unwrap().is_null());
    }
}
