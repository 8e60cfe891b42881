//! The [`Plugin`] trait and the glue between it and the raw exports.

use std::cell::RefCell;
use std::thread::LocalKey;

use serde::de::DeserializeOwned;

use crate::bindings;
use crate::{Conversation, Error, Event, Outcome};

/// A pipeline stage implemented in Rust.
///
/// Implement it for your plugin type and export it with [`export_plugin!`](crate::export_plugin).
/// The engine calls [`init`](Plugin::init) once per instance, then
/// [`process`](Plugin::process) for every event that reaches the stage, one at a time.
pub trait Plugin: Sized + 'static {
    /// The stage's `config:` block. The SDK deserializes the config JSON into it with
    /// `serde_json`; use `#[serde(deny_unknown_fields)]` so typos are reported, and
    /// `#[serde(default)]` for optional fields. A stage without `config:` gets `{}`.
    type Config: DeserializeOwned;

    /// Builds the instance from its config; reject bad config here with [`Error::config_at`].
    ///
    /// # Errors
    /// Any [`Error`]; the engine refuses to start the pipeline on a config error.
    fn init(config: Self::Config) -> Result<Self, Error>;

    /// Handles one event of one conversation.
    ///
    /// The instance may serve many conversations in turn: keep per-conversation state in
    /// [`kv`](crate::kv), not in `self`.
    ///
    /// # Errors
    /// Any [`Error`]; the stage's `on_error` policy decides what the pipeline does next.
    fn process(&mut self, event: &Event, conversation: &Conversation) -> Result<Outcome, Error>;
}

/// Deserializes a stage config the way the engine-facing `init` does: an empty or `null`
/// config counts as `{}`, and a failure names the offending field as a dotted path.
pub(crate) fn parse_config<C: DeserializeOwned>(config_json: &str) -> Result<C, Error> {
    let trimmed = config_json.trim();
    let text = if trimmed.is_empty() || trimmed == "null" {
        "{}"
    } else {
        trimmed
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let mut field = dotted_path(e.path());
        let message = e.inner().to_string();
        // A `missing field` error is raised at the enclosing object, so the path stops short of
        // the field the message names; append it.
        if let Some(name) = named_field(&message) {
            field = Some(match field {
                Some(parent) => format!("{parent}.{name}"),
                None => name.to_owned(),
            });
        }
        Error {
            kind: crate::ErrorKind::Config,
            message: strip_position(&message),
            field,
        }
    })?;
    de.end()
        .map_err(|e| Error::config(format!("trailing characters after the config: {e}")))?;
    Ok(value)
}

fn dotted_path(path: &serde_path_to_error::Path) -> Option<String> {
    use serde_path_to_error::Segment;
    let parts: Vec<String> = path
        .iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join("."))
}

fn named_field(message: &str) -> Option<&str> {
    // (`unknown field` errors already have the key in the path.)
    let rest = message.strip_prefix("missing field `")?;
    rest.split('`').next().filter(|s| !s.is_empty())
}

/// serde_json appends " at line 1 column 17" to its messages: meaningless to someone who wrote
/// YAML, so drop it (the field path says where).
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) if message[i..].contains(" column ") => message[..i].to_owned(),
        _ => message.to_owned(),
    }
}

type Slot<P> = RefCell<Option<P>>;

/// The exported `init`: parses the config, builds the plugin and stores it in `slot`.
#[doc(hidden)]
pub fn init_instance<P: Plugin>(
    slot: &'static LocalKey<Slot<P>>,
    config_json: &str,
) -> Result<(), bindings::PluginError> {
    // A failed (re-)init leaves no instance behind.
    slot.with(|cell| cell.borrow_mut().take());
    let plugin = parse_config::<P::Config>(config_json)
        .and_then(P::init)
        .map_err(bindings::PluginError::from)?;
    slot.with(|cell| *cell.borrow_mut() = Some(plugin));
    Ok(())
}

/// The exported `process`: runs the stored plugin on one event.
#[doc(hidden)]
pub fn process_instance<P: Plugin>(
    slot: &'static LocalKey<Slot<P>>,
    event: &bindings::Event,
    conversation: &bindings::Conversation,
) -> Result<bindings::StageResult, bindings::PluginError> {
    slot.with(|cell| {
        let mut guard = cell.borrow_mut();
        let Some(plugin) = guard.as_mut() else {
            return Err(Error::internal("process was called before a successful init").into());
        };
        plugin
            .process(event, conversation)
            .map(bindings::StageResult::from)
            .map_err(bindings::PluginError::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        phrases: Vec<String>,
        #[serde(default)]
        nested: Option<Inner>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        limit: u32,
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = parse_config::<Cfg>(r#"{"phrases": ["a", "b", 3]}"#).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Config);
        assert_eq!(e.field.as_deref(), Some("phrases.2"));
        assert!(
            e.message.starts_with("invalid type: integer `3`"),
            "{}",
            e.message
        );

        let e = parse_config::<Cfg>(r#"{"phrases": [], "nested": {"limit": -1}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("nested.limit"));

        let e = parse_config::<Cfg>(r#"{"phrases": [], "nested": {}}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("nested.limit"));
        assert_eq!(e.message, "missing field `limit`");

        let e = parse_config::<Cfg>(r#"{"phrases": [], "phrase": 1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("phrase"));
        assert!(
            e.message.starts_with("unknown field `phrase`"),
            "{}",
            e.message
        );

        let e = parse_config::<Cfg>("null").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("phrases"));

        let e = parse_config::<Cfg>(r#"{"phrases": []} x"#).unwrap_err();
        assert_eq!(e.field, None);
    }

    struct Counter(u32);

    impl Plugin for Counter {
        type Config = Inner;
        fn init(config: Inner) -> Result<Self, Error> {
            Ok(Counter(config.limit))
        }
        fn process(&mut self, _: &Event, _: &Conversation) -> Result<Outcome, Error> {
            self.0 += 1;
            Ok(Outcome::next(serde_json::json!(self.0)))
        }
    }

    thread_local! {
        static SLOT: RefCell<Option<Counter>> = const { RefCell::new(None) };
    }

    #[test]
    fn instance_lifecycle() {
        let event = crate::testing::completed_event("c", 1);
        let conv = crate::testing::conversation(Vec::new());
        let e = process_instance(&SLOT, &event, &conv).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("before a successful init"));

        let e = init_instance(&SLOT, r#"{"limit": "x"}"#).unwrap_err();
        assert_eq!(
            (e.kind, e.field.as_deref()),
            (ErrorKind::Config, Some("limit"))
        );
        assert!(process_instance(&SLOT, &event, &conv).is_err());

        init_instance(&SLOT, r#"{"limit": 5}"#).unwrap();
        let r = process_instance(&SLOT, &event, &conv).unwrap();
        assert_eq!(
            r.flow,
            bindings::prompter::plugin::types::Flow::Continue("6".into())
        );
        assert!(init_instance(&SLOT, "[]").is_err());
        assert!(process_instance(&SLOT, &event, &conv).is_err());
    }

    #[test]
    fn empty_config_is_an_empty_object() {
        let v: serde_json::Value = parse_config("").unwrap();
        assert_eq!(v, serde_json::json!({}));
    }
}
