//! Structured logging into the engine's logs, tagged with the stage and the conversation.
//!
//! Outside the engine the lines go to stderr (and [`testing::logs`](crate::testing::logs)).

use std::fmt;

/// A log level.
pub use crate::bindings::prompter::plugin::host::LogLevel as Level;

impl Level {
    /// The level's name (`info`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }
}

/// Logs `message` at `level`.
pub fn log(level: Level, message: impl fmt::Display) {
    let message = message.to_string();
    crate::sys::log(level, &message);
}

/// Logs at `trace`.
pub fn trace(message: impl fmt::Display) {
    log(Level::Trace, message);
}

/// Logs at `debug`.
pub fn debug(message: impl fmt::Display) {
    log(Level::Debug, message);
}

/// Logs at `info`.
pub fn info(message: impl fmt::Display) {
    log(Level::Info, message);
}

/// Logs at `warn`.
pub fn warn(message: impl fmt::Display) {
    log(Level::Warn, message);
}

/// Logs at `error`.
pub fn error(message: impl fmt::Display) {
    log(Level::Error, message);
}
