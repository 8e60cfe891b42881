//! Recordings: JSONL files of Symbl events, one per line:
//! `{"conversation": "<id>", "offset_ms": <ms since the call started>, "event": <Symbl frame>}`.
//!
//! Reading never stops at a bad line: each malformed line becomes a [`LineProblem`] naming the
//! file and line number, and every good line is kept.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prompter_core::event::{Event, parse_shared_frame};
use serde::Deserialize;

/// One good line of a recording.
#[derive(Debug, Clone)]
pub struct RecordedLine {
    /// Which file (index into the files read).
    pub file: usize,
    /// 1-based line number.
    pub line: usize,
    /// Conversation id (shared by the line's events).
    pub conversation: Arc<str>,
    /// Milliseconds since the call started.
    pub offset_ms: u64,
    /// The Symbl frame (shared by the line's events as their `raw`, so replaying a line copies
    /// no JSON).
    pub frame: Arc<serde_json::Value>,
}

/// A line that was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    /// The file.
    pub file: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: skipped malformed line: {}",
            self.file.display(),
            self.line,
            self.message
        )
    }
}

#[derive(Deserialize)]
struct Line {
    conversation: String,
    offset_ms: u64,
    event: serde_json::Value,
}

/// Parses a recording's text; `file` is the index recorded in each line.
pub fn parse(path: &Path, file: usize, text: &str) -> (Vec<RecordedLine>, Vec<LineProblem>) {
    let mut lines = Vec::new();
    let mut problems = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let problem = |message: String| LineProblem {
            file: path.to_path_buf(),
            line: line_no,
            message,
        };
        match serde_json::from_str::<Line>(raw) {
            Ok(l) if l.conversation.trim().is_empty() => {
                problems.push(problem("`conversation` is empty".into()))
            }
            Ok(l) if !l.event.is_object() => {
                problems.push(problem("`event` is not a JSON object".into()))
            }
            Ok(l) => lines.push(RecordedLine {
                file,
                line: line_no,
                conversation: l.conversation.into(),
                offset_ms: l.offset_ms,
                frame: Arc::new(l.event),
            }),
            Err(e) => problems.push(problem(e.to_string())),
        }
    }
    (lines, problems)
}

/// Reads recordings and merges their lines by `offset_ms` (stable: ties keep file order), as a
/// replay interleaves them.
///
/// # Errors
/// A file that cannot be read at all; malformed lines are problems, not errors.
pub fn read_all(
    paths: &[PathBuf],
) -> Result<(Vec<RecordedLine>, Vec<LineProblem>), (PathBuf, std::io::Error)> {
    let mut all = Vec::new();
    let mut problems = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let text = std::fs::read_to_string(p).map_err(|e| (p.clone(), e))?;
        let (lines, probs) = parse(p, i, &text);
        all.extend(lines);
        problems.extend(probs);
    }
    all.sort_by_key(|l| l.offset_ms);
    Ok((all, problems))
}

/// Turns a line into events; an unrecognizable Symbl frame is a problem for that line.
///
/// # Errors
/// The frame's [`prompter_core::event::ParseError`], as a [`LineProblem`].
pub fn events(line: &RecordedLine, path: &Path) -> Result<Vec<Event>, LineProblem> {
    parse_shared_frame(
        line.conversation.clone(),
        line.offset_ms,
        line.frame.clone(),
    )
    .map_err(|e| LineProblem {
        file: path.to_path_buf(),
        line: line.line,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_good_lines_and_names_bad_ones() {
        let text = concat!(
            r#"{"conversation": "a", "offset_ms": 5, "event": {"type": "message", "message": {"type": "started_listening"}}}"#,
            "\n",
            "\n",
            r#"{"conversation": "a", "offset_ms": 9000, "event": {"type": "message_resp"#,
            "\n",
            r#"{"conversation": "", "offset_ms": 1, "event": {}}"#,
            "\n",
            r#"{"conversation": "b", "offset_ms": -1, "event": {}}"#,
            "\n",
            r#"{"conversation": "b", "offset_ms": 2, "event": [1]}"#,
            "\n",
            r#"{"conversation": "b", "offset_ms": 3, "event": {"type": "x"}, "note": "extra keys are fine"}"#,
            "\n",
        );
        let (lines, problems) = parse(Path::new("r.jsonl"), 0, text);
        assert_eq!(lines.iter().map(|l| l.line).collect::<Vec<_>>(), [1, 7]);
        assert_eq!(
            problems.iter().map(|p| p.line).collect::<Vec<_>>(),
            [3, 4, 5, 6]
        );
        assert!(
            problems[0]
                .to_string()
                .starts_with("r.jsonl:3: skipped malformed line: EOF while parsing")
        );
        let err = events(&lines[1], Path::new("r.jsonl")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "r.jsonl:7: skipped malformed line: unknown event type `x`"
        );
    }
}

/// Property tests: any recording text is read, and every line is accepted or named.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SHIPPED: &str = include_str!("../../../pipelines/recordings/acme-discovery-call.jsonl");

    /// Every line is a kept line or a problem with its number, never both, never lost.
    fn check(text: &str) -> Result<(), TestCaseError> {
        let path = Path::new("fuzz.jsonl");
        let (lines, problems) = parse(path, 0, text);
        let non_empty = text.lines().filter(|l| !l.trim().is_empty()).count();
        prop_assert_eq!(lines.len() + problems.len(), non_empty);
        let total = text.lines().count();
        for p in &problems {
            prop_assert!(p.line >= 1 && p.line <= total);
        }
        for l in &lines {
            // Turning a kept line into events fails only as a problem naming the line.
            if let Err(p) = events(l, path) {
                prop_assert_eq!(p.line, l.line);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 512,
            // The same cases on every machine: CI never meets a case nobody ran here.
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5EED),
            ..ProptestConfig::default()
        })]

        #[test]
        fn any_text_is_read_line_by_line(text in "(\\PC{0,60}\n){0,12}") {
            check(&text)?;
        }

        #[test]
        fn shipped_lines_cut_spliced_or_doubled_are_accounted_for(
            cuts in proptest::collection::vec((any::<proptest::sample::Index>(), 0usize..400, 0usize..3), 1..6)
        ) {
            let mut lines: Vec<String> = SHIPPED.lines().map(str::to_owned).collect();
            for (which, at, how) in cuts {
                let i = which.index(lines.len());
                let l = &lines[i];
                let at = (0..=at.min(l.len())).rev().find(|c| l.is_char_boundary(*c)).unwrap_or(0);
                match how {
                    0 => lines[i].truncate(at),
                    1 => {
                        let (a, b) = l.split_at(at);
                        lines[i] = format!("{b}{a}");
                    }
                    _ => {
                        let copy = lines[i].clone();
                        lines.insert(i, copy);
                    }
                }
            }
            check(&lines.join("\n"))?;
        }
    }
}
