//! Collecting positioned problems while loading, and rendering them for people.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use marked_yaml::{Marker, Node};
use prompter_core::diagnostic::{Diagnostic, Position};

/// Every problem found in one load, with the text of each file for rendering.
#[derive(Debug, Default)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
    sources: HashMap<PathBuf, String>,
}

impl Diagnostics {
    /// Remembers a file's text so problems in it can show the offending line.
    pub fn add_source(&mut self, file: &Path, text: &str) {
        self.sources.insert(file.to_path_buf(), text.to_owned());
    }

    /// Records a problem at `marker` (or at the file level when `None`).
    pub fn error(
        &mut self,
        file: &Path,
        marker: Option<&Marker>,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        let pos = marker.map(|m| Position {
            line: m.line(),
            col: m.column(),
        });
        self.error_at(file, pos, message)
    }

    /// Records a problem at a position.
    pub fn error_at(
        &mut self,
        file: &Path,
        pos: Option<Position>,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.items.push(Diagnostic {
            file: file.to_path_buf(),
            pos,
            message: message.into(),
            help: None,
        });
        let last = self.items.len() - 1;
        &mut self.items[last]
    }

    /// Records a problem at a node's start.
    pub fn error_node(
        &mut self,
        file: &Path,
        node: &Node,
        message: impl Into<String>,
    ) -> &mut Diagnostic {
        self.error(file, node.span().start(), message)
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many problems.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// The problems, sorted by file and position.
    pub fn items(&self) -> Vec<&Diagnostic> {
        let mut v: Vec<&Diagnostic> = self.items.iter().collect();
        v.sort_by(|a, b| (&a.file, a.pos).cmp(&(&b.file, b.pos)));
        v.dedup_by(|a, b| a == b);
        v
    }

    /// Renders every problem rustc-style: `file:line:col: error: message`, the line, a caret,
    /// and the hint.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in self.items() {
            let _ = writeln!(out, "{d}");
            if let (Some(pos), Some(text)) = (d.pos, self.sources.get(&d.file))
                && let Some(line) = text.lines().nth(pos.line.saturating_sub(1))
            {
                let num = pos.line.to_string();
                let pad = " ".repeat(num.len());
                let col = pos.col.max(1);
                let token_len = line
                    .chars()
                    .skip(col - 1)
                    .take_while(|c| !c.is_whitespace() && *c != ',' && *c != ']' && *c != '}')
                    .count()
                    .max(1);
                let _ = writeln!(out, "{pad} |");
                let _ = writeln!(out, "{num} | {line}");
                let _ = writeln!(
                    out,
                    "{pad} | {}{}",
                    " ".repeat(col - 1),
                    "^".repeat(token_len)
                );
            }
            if let Some(help) = &d.help {
                let width = d.pos.map(|p| p.line.to_string().len()).unwrap_or(1);
                let _ = writeln!(out, "{} = help: {help}", " ".repeat(width));
            }
        }
        out
    }
}

/// Adds a hint to a just-recorded diagnostic.
pub trait WithHelp {
    /// Sets the hint when there is one.
    fn help(&mut self, help: Option<String>);
}

impl WithHelp for Diagnostic {
    fn help(&mut self, help: Option<String>) {
        self.help = help;
    }
}
