//! Classified plugin errors.

use std::fmt;

use crate::bindings;

/// What went wrong, as the engine classifies it (the WIT `error-kind`).
pub use bindings::prompter::plugin::types::ErrorKind;

/// A plugin failure: a kind, a message and, for config errors, the offending field.
///
/// The engine logs it and applies the stage's `on_error` policy; a [`ErrorKind::Config`] error
/// from [`Plugin::init`](crate::Plugin::init) stops the pipeline from loading and points at
/// `field` in the YAML.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    /// The classification.
    pub kind: ErrorKind,
    /// What happened, for people.
    pub message: String,
    /// For config errors: the dotted path of the offending field (`phrases.2`).
    pub field: Option<String>,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        Error {
            kind,
            message: message.to_string(),
            field: None,
        }
    }

    /// The stage config is wrong (as a whole).
    pub fn config(message: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    /// The stage config is wrong at `field`, a dotted path (`phrases.2`, `limits.window`).
    pub fn config_at(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Error {
            field: Some(field.into()),
            ..Error::config(message)
        }
    }

    /// The event is not what the plugin needs.
    pub fn input(message: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Input, message)
    }

    /// A service the plugin called (HTTP, knowledge store, LLM, kv) failed.
    pub fn external(message: impl fmt::Display) -> Self {
        Error::new(ErrorKind::External, message)
    }

    /// A bug in the plugin.
    pub fn internal(message: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Internal, message)
    }

    /// The kind's name as the contract spells it (`config`, `input`, ...).
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ErrorKind::Config => "config",
            ErrorKind::Input => "input",
            ErrorKind::External => "external",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error", self.kind_name())?;
        if let Some(field) = &self.field {
            write!(f, " at `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for Error {}

impl From<Error> for bindings::PluginError {
    fn from(e: Error) -> Self {
        bindings::PluginError {
            kind: e.kind,
            message: e.message,
            field: e.field,
        }
    }
}

impl From<bindings::PluginError> for Error {
    fn from(e: bindings::PluginError) -> Self {
        Error {
            kind: e.kind,
            message: e.message,
            field: e.field,
        }
    }
}
