//! The error type every stage returns, classified so the engine can decide what to do.

use std::fmt;

/// What kind of failure a [`PluginError`] is; the engine's error policy and metrics read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The stage's configuration is wrong (should have been caught by validation).
    Config,
    /// The event or an earlier stage's output is not what the stage needs.
    Input,
    /// A service the stage calls failed (network, 5xx, rate limit).
    External,
    /// The stage ran out of its `timeout_ms`.
    Timeout,
    /// A bug or an invariant broken inside the plugin.
    Internal,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::Config => "config",
            ErrorKind::Input => "input",
            ErrorKind::External => "external",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        })
    }
}

/// A stage failure: a kind, a message, and the underlying cause when there is one.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
#[must_use]
pub struct PluginError {
    /// The classification.
    pub kind: ErrorKind,
    /// Lowercase, no trailing period, identifiers in backticks.
    pub message: String,
    /// The cause, kept for the error chain.
    #[source]
    pub source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl PluginError {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        PluginError {
            kind,
            message: message.into(),
            source: None,
        }
    }
    /// Bad configuration.
    pub fn config(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Config, message)
    }
    /// Bad input.
    pub fn input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Input, message)
    }
    /// An external service failed.
    pub fn external(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::External, message)
    }
    /// A deadline passed.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, message)
    }
    /// A bug.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

impl From<minijinja::Error> for PluginError {
    fn from(e: minijinja::Error) -> Self {
        if e.kind() == minijinja::ErrorKind::OutOfFuel {
            return PluginError::input(format!(
                "template failed: it ran past its budget of {} instructions (a loop over a loop?)",
                crate::template::FUEL
            ))
            .with_source(e);
        }
        PluginError::input(format!("template failed: {e}")).with_source(e)
    }
}
