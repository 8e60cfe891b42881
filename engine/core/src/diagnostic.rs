//! Positioned problems found while loading configuration, and "did you mean" hints.
//!
//! The engine collects every [`Diagnostic`] of a load in one pass and renders them as
//! `file:line:col: error: message` with the offending line and a caret.

use std::fmt;
use std::path::PathBuf;

/// A position in a configuration file (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// Where in it, when known.
    pub pos: Option<Position>,
    /// What is wrong: lowercase, identifiers in backticks.
    pub message: String,
    /// How to fix it ("did you mean `retrieve`?").
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pos {
            Some(p) => write!(
                f,
                "{}:{}:{}: error: {}",
                self.file.display(),
                p.line,
                p.col,
                self.message
            ),
            None => write!(f, "{}: error: {}", self.file.display(), self.message),
        }
    }
}

/// The closest candidate to `input` when one is close enough to be a likely typo.
///
/// # Examples
/// ```
/// assert_eq!(prompter_core::diagnostic::did_you_mean("retreive", ["retrieve", "prompt"]), Some("retrieve"));
/// assert_eq!(prompter_core::diagnostic::did_you_mean("zzz", ["retrieve", "prompt"]), None);
/// ```
pub fn did_you_mean<'a>(
    input: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let input_l = input.to_ascii_lowercase();
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&input_l, &c.to_ascii_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
