//! The test-file format (`*.test.yaml`), read with positions: every problem in every file is
//! reported as `file:line:col` with the line and a caret, the way `prompter validate` reports
//! pipelines (the same YAML reader and [`Diagnostics`]). Unknown keys are errors, with a "did you
//! mean" hint.
//!
//! It owns the file's shape and its meaning (paths resolved against the file, inline Symbl frames
//! checked by the engine's own frame parser); it does not run anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use prompter_core::marked_yaml::Node;
use prompter_core::marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use prompter_core::output::Status;
use prompter_engine::config::diagnostics::{Diagnostics, WithHelp};
use prompter_engine::config::yaml;

use super::expect::{Check, Degraded, Expectation, StatusFilter};

/// Top-level keys of a test file.
pub(crate) const FILE_KEYS: &[&str] = &["config", "env", "requires", "tests"];
/// Keys of one test.
pub(crate) const TEST_KEYS: &[&str] = &[
    "name",
    "recording",
    "events",
    "conversation",
    "expect",
    "skip",
];
/// Keys of one inline event (a recording line's).
pub(crate) const EVENT_KEYS: &[&str] = &["conversation", "offset_ms", "event"];
/// Keys of one expectation.
pub(crate) const EXPECT_KEYS: &[&str] = &[
    "count",
    "id",
    "conversation_id",
    "pipeline",
    "kind",
    "status",
    "version",
    "title",
    "title_contains",
    "text",
    "text_contains",
    "text_not_contains",
    "sources",
    "top_source",
    "degraded",
    "model",
    "trigger",
];
/// Keys of an expectation's `trigger:`.
pub(crate) const TRIGGER_KEYS: &[&str] = &[
    "event",
    "tracker",
    "offset_ms",
    "is_final",
    "phrases",
    "text_contains",
];

/// The conversation id of inline events when neither the event nor the test names one.
pub(crate) const DEFAULT_CONVERSATION: &str = "test-call";

/// The engine config looked for when a file names none.
const CONFIG_NAME: &str = "prompter.yaml";

/// One test file.
#[derive(Debug)]
pub(crate) struct TestFile {
    /// The file, as found.
    pub(crate) path: PathBuf,
    /// The engine config its tests run on.
    pub(crate) config: PathBuf,
    /// `env:`: values for `${NAME}` in the engine config and pipelines, ahead of the process
    /// environment.
    pub(crate) env: BTreeMap<String, String>,
    /// `requires:`: files the tests need (built plugins), as resolved and as shown; a missing
    /// one skips the file's tests.
    pub(crate) requires: Vec<(PathBuf, String)>,
    /// The tests, in file order.
    pub(crate) tests: Vec<TestCase>,
}

/// One test: a call, and what must come out of it.
#[derive(Debug)]
pub(crate) struct TestCase {
    /// `name`: unique in its file.
    pub(crate) name: String,
    /// Recordings, resolved against the test file.
    pub(crate) recordings: Vec<PathBuf>,
    /// Inline events.
    pub(crate) events: Vec<InlineEvent>,
    /// The expectations, in file order.
    pub(crate) expect: Vec<Expectation>,
    /// `skip`: why the test does not run, when it does not.
    pub(crate) skip: Option<String>,
}

/// One inline event: a recording line written in YAML.
#[derive(Debug)]
pub(crate) struct InlineEvent {
    /// Its line in the test file (replay problems name it).
    pub(crate) line: usize,
    /// Conversation id.
    pub(crate) conversation: Arc<str>,
    /// Milliseconds since the call started.
    pub(crate) offset_ms: u64,
    /// The Symbl frame, as JSON.
    pub(crate) frame: Arc<serde_json::Value>,
}

/// Reads one test file; `None` when it has problems (all of them are in `diags`).
pub(crate) fn parse(path: &Path, text: &str, diags: &mut Diagnostics) -> Option<TestFile> {
    let before = diags.len();
    if text.trim().is_empty() {
        diags.error(path, None, "the file is empty (a test file needs `tests:`)");
        return None;
    }
    let root = yaml::parse(path, text, diags)?;
    let map = yaml::expect_map(path, &root, "a test file", diags)?;
    yaml::check_keys(path, map, FILE_KEYS, "a test file", diags);
    let dir = base_dir(path);
    let mut r = Reader { file: path, diags };

    let config = match map.get_node("config") {
        Some(node) => r.path(&dir, node, "`config`").and_then(|p| {
            if p.is_file() {
                Some(p)
            } else {
                r.diags
                    .error_node(
                        path,
                        node,
                        format!("engine config `{}` not found", p.display()),
                    )
                    .help(Some(
                        "`config:` is relative to this file's folder".to_owned(),
                    ));
                None
            }
        }),
        None => {
            let found = nearest_config(&dir);
            if found.is_none() {
                r.diags.error(
                    path,
                    map.span().start(),
                    format!(
                        "no `config:` and no `{CONFIG_NAME}` in this file's folder or above it"
                    ),
                );
            }
            found
        }
    };
    let env = map.get_node("env").map(|n| r.env(n)).unwrap_or_default();
    let requires = match map.get_node("requires") {
        Some(node) => r
            .strings(node, "`requires`")
            .unwrap_or_default()
            .iter()
            .map(|s| {
                let p = dir.join(s);
                let shown = lexical(&p).display().to_string();
                (p, shown)
            })
            .collect(),
        None => Vec::new(),
    };
    let tests = match yaml::required(path, map, "tests", "a test file", r.diags) {
        Some(node) => r.tests(&dir, node),
        None => Vec::new(),
    };
    if diags.len() > before {
        return None;
    }
    Some(TestFile {
        path: path.to_path_buf(),
        config: config?,
        env,
        requires,
        tests,
    })
}

struct Reader<'a> {
    file: &'a Path,
    diags: &'a mut Diagnostics,
}

impl Reader<'_> {
    fn error(&mut self, node: &Node, message: String) {
        self.diags.error_node(self.file, node, message);
    }

    /// A single value (a string, number or boolean written as text).
    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        let s = yaml::expect_scalar(self.file, node, what, self.diags)?;
        Some(s.as_str().to_owned())
    }

    /// A non-empty single value.
    fn text(&mut self, node: &Node, what: &str) -> Option<String> {
        let s = self.string(node, what)?;
        if s.trim().is_empty() {
            self.error(node, format!("{what} is empty"));
            return None;
        }
        Some(s)
    }

    /// One value or a list of values, none empty.
    fn strings(&mut self, node: &Node, what: &str) -> Option<Vec<String>> {
        if node.as_scalar().is_some() {
            return self.text(node, what).map(|s| vec![s]);
        }
        let seq = yaml::expect_seq(self.file, node, what, self.diags)?;
        if seq.is_empty() {
            self.error(node, format!("{what} is an empty list"));
            return None;
        }
        let mut out = Vec::with_capacity(seq.len());
        for item in seq.iter() {
            out.push(self.text(item, &format!("an item of {what}"))?);
        }
        Some(out)
    }

    fn number(&mut self, node: &Node, what: &str) -> Option<u64> {
        let s = yaml::expect_scalar(self.file, node, what, self.diags)?;
        match s.as_str().trim().parse::<u64>() {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(
                    node,
                    format!("{what} must be a whole number, found `{}`", s.as_str()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        let s = yaml::expect_scalar(self.file, node, what, self.diags)?;
        match s.as_str() {
            "true" => Some(true),
            "false" => Some(false),
            other => {
                self.error(
                    node,
                    format!("{what} must be `true` or `false`, found `{other}`"),
                );
                None
            }
        }
    }

    fn path(&mut self, dir: &Path, node: &Node, what: &str) -> Option<PathBuf> {
        self.text(node, what).map(|s| tidy(&dir.join(s)))
    }

    fn env(&mut self, node: &Node) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(map) = yaml::expect_map(self.file, node, "`env`", self.diags) else {
            return out;
        };
        for (k, v) in map.iter() {
            let name = k.as_str();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                self.diags.error(
                    self.file,
                    k.span().start(),
                    format!("invalid environment variable name `{name}`"),
                );
                continue;
            }
            if let Some(value) = self.string(v, &format!("`env.{name}`")) {
                out.insert(name.to_owned(), value);
            }
        }
        out
    }

    fn tests(&mut self, dir: &Path, node: &Node) -> Vec<TestCase> {
        let Some(seq) = yaml::expect_seq(self.file, node, "`tests`", self.diags) else {
            return Vec::new();
        };
        if seq.is_empty() {
            self.error(node, "`tests` is an empty list".to_owned());
        }
        let mut names: BTreeSet<String> = BTreeSet::new();
        let mut out = Vec::new();
        for item in seq.iter() {
            let Some(test) = self.test(dir, item) else {
                continue;
            };
            if !names.insert(test.name.clone()) {
                let at = item
                    .as_mapping()
                    .and_then(|m| m.get_node("name"))
                    .unwrap_or(item);
                self.error(at, format!("duplicate test name `{}`", test.name));
            }
            out.push(test);
        }
        out
    }

    fn test(&mut self, dir: &Path, node: &Node) -> Option<TestCase> {
        let map = yaml::expect_map(self.file, node, "a test", self.diags)?;
        yaml::check_keys(self.file, map, TEST_KEYS, "a test", self.diags);
        let name = yaml::required(self.file, map, "name", "a test", self.diags)
            .and_then(|n| self.text(n, "`name`"));
        let conversation: Arc<str> = match map.get_node("conversation") {
            Some(n) => self.text(n, "`conversation`")?.into(),
            None => DEFAULT_CONVERSATION.into(),
        };
        let mut recordings = Vec::new();
        if let Some(n) = map.get_node("recording") {
            for (item, s) in self.located_strings(n, "`recording`") {
                let p = tidy(&dir.join(&s));
                if p.is_file() {
                    recordings.push(p);
                } else {
                    self.diags
                        .error_node(
                            self.file,
                            item,
                            format!("recording `{}` not found", p.display()),
                        )
                        .help(Some(
                            "`recording:` is relative to this file's folder".to_owned(),
                        ));
                }
            }
        }
        let events = match map.get_node("events") {
            Some(n) => self.events(n, &conversation),
            None => Vec::new(),
        };
        if map.get_node("recording").is_none() && map.get_node("events").is_none() {
            self.diags.error(
                self.file,
                map.span().start(),
                "a test needs a call: `recording:` (a recorded call) and/or `events:` (inline Symbl frames)",
            );
        }
        let expect = match yaml::required(self.file, map, "expect", "a test", self.diags) {
            Some(n) => self.expectations(n),
            None => Vec::new(),
        };
        let skip = match map.get_node("skip") {
            Some(n) => Some(self.text(n, "`skip` (the reason the test does not run)")?),
            None => None,
        };
        Some(TestCase {
            name: name?,
            recordings,
            events,
            expect,
            skip,
        })
    }

    /// One value or a list, each with its node (for positions).
    fn located_strings<'n>(&mut self, node: &'n Node, what: &str) -> Vec<(&'n Node, String)> {
        if node.as_scalar().is_some() {
            return self
                .text(node, what)
                .map(|s| (node, s))
                .into_iter()
                .collect();
        }
        let Some(seq) = yaml::expect_seq(self.file, node, what, self.diags) else {
            return Vec::new();
        };
        if seq.is_empty() {
            self.error(node, format!("{what} is an empty list"));
        }
        seq.iter()
            .filter_map(|item| {
                let s = self.text(item, &format!("an item of {what}"))?;
                Some((item, s))
            })
            .collect()
    }

    fn events(&mut self, node: &Node, conversation: &Arc<str>) -> Vec<InlineEvent> {
        let Some(seq) = yaml::expect_seq(self.file, node, "`events`", self.diags) else {
            return Vec::new();
        };
        if seq.is_empty() {
            self.error(node, "`events` is an empty list".to_owned());
        }
        let mut out = Vec::new();
        let mut last_offset = 0;
        for item in seq.iter() {
            let Some(map) = yaml::expect_map(
                self.file,
                item,
                "an event (`{offset_ms, event}`)",
                self.diags,
            ) else {
                continue;
            };
            yaml::check_keys(self.file, map, EVENT_KEYS, "an event", self.diags);
            let conv: Arc<str> = match map.get_node("conversation") {
                Some(n) => match self.text(n, "`conversation`") {
                    Some(c) => c.into(),
                    None => continue,
                },
                None => conversation.clone(),
            };
            let offset_ms = match map.get_node("offset_ms") {
                Some(n) => match self.number(n, "`offset_ms`") {
                    Some(v) => v,
                    None => continue,
                },
                None => last_offset,
            };
            last_offset = offset_ms;
            let Some(frame_node) = yaml::required(self.file, map, "event", "an event", self.diags)
            else {
                continue;
            };
            if frame_node.as_mapping().is_none() {
                self.error(
                    frame_node,
                    format!(
                        "`event` must be a Symbl frame (a mapping), found {}",
                        yaml::type_name(frame_node)
                    ),
                );
                continue;
            }
            let frame = Arc::new(to_json(frame_node));
            // The engine's own frame parser: an event it would skip is a mistake in the test.
            if let Err(e) =
                prompter_core::event::parse_shared_frame(conv.clone(), offset_ms, frame.clone())
            {
                self.error(
                    frame_node,
                    format!("not a Symbl frame the engine reads: {e}"),
                );
                continue;
            }
            out.push(InlineEvent {
                line: item.span().start().map(|m| m.line()).unwrap_or(0),
                conversation: conv,
                offset_ms,
                frame,
            });
        }
        out
    }

    fn expectations(&mut self, node: &Node) -> Vec<Expectation> {
        let Some(seq) = yaml::expect_seq(self.file, node, "`expect`", self.diags) else {
            return Vec::new();
        };
        if seq.is_empty() {
            self.error(node, "`expect` is an empty list".to_owned());
        }
        seq.iter()
            .filter_map(|item| self.expectation(item))
            .collect()
    }

    fn expectation(&mut self, node: &Node) -> Option<Expectation> {
        let map = yaml::expect_map(self.file, node, "an expectation", self.diags)?;
        yaml::check_keys(self.file, map, EXPECT_KEYS, "an expectation", self.diags);
        let before = self.diags.len();
        // A block mapping's own mark is its first colon: point at its first key instead.
        let first = map
            .keys()
            .next()
            .and_then(|k| k.span().start())
            .or(node.span().start());
        let at = match first {
            Some(m) => format!("{}:{}:{}", self.file.display(), m.line(), m.column()),
            None => self.file.display().to_string(),
        };
        let mut count = None;
        let mut status = StatusFilter::Is(Status::Final);
        let mut checks = Vec::new();
        for (k, v) in map.iter() {
            let key = k.as_str();
            let what = format!("`{key}`");
            let check = match key {
                "count" => {
                    count = self.number(v, &what).and_then(|n| usize::try_from(n).ok());
                    None
                }
                "status" => {
                    if let Some(s) = self.status(v) {
                        status = s;
                    }
                    None
                }
                "id" => self.text(v, &what).map(Check::Id),
                "conversation_id" => self.text(v, &what).map(Check::ConversationId),
                "pipeline" => self.text(v, &what).map(Check::Pipeline),
                "kind" => self.text(v, &what).map(Check::Kind),
                "version" => self
                    .number(v, &what)
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Check::Version),
                "title" => self.string(v, &what).map(Check::Title),
                "title_contains" => self.strings(v, &what).map(Check::TitleContains),
                "text" => self.string(v, &what).map(Check::Text),
                "text_contains" => self.strings(v, &what).map(Check::TextContains),
                "text_not_contains" => self.strings(v, &what).map(Check::TextNotContains),
                "sources" => self.strings(v, &what).map(Check::Sources),
                "top_source" => self.text(v, &what).map(Check::TopSource),
                "degraded" => self.degraded(v).map(Check::Degraded),
                "model" => self.text(v, &what).map(Check::Model),
                "trigger" => {
                    checks.extend(self.trigger(v));
                    None
                }
                _ => None, // reported by check_keys
            };
            checks.extend(check);
        }
        checks.insert(0, Check::Status(status));
        if self.diags.len() > before {
            return None;
        }
        Some(Expectation { at, count, checks })
    }

    fn status(&mut self, node: &Node) -> Option<StatusFilter> {
        let s = self.string(node, "`status`")?;
        match s.as_str() {
            "final" => Some(StatusFilter::Is(Status::Final)),
            "draft" => Some(StatusFilter::Is(Status::Draft)),
            "withdrawn" => Some(StatusFilter::Is(Status::Withdrawn)),
            "any" => Some(StatusFilter::Any),
            other => {
                self.diags
                    .error_node(self.file, node, format!("unknown status `{other}`"))
                    .help(Some(
                        "`status` is one of: `final` (the default), `draft`, `withdrawn`, `any`"
                            .to_owned(),
                    ));
                None
            }
        }
    }

    fn degraded(&mut self, node: &Node) -> Option<Degraded> {
        let s: &MarkedScalarNode = yaml::expect_scalar(self.file, node, "`degraded`", self.diags)?;
        Some(match s.as_bool() {
            Some(false) => Degraded::No,
            Some(true) => Degraded::Yes,
            None if s.as_str().trim().is_empty() => {
                self.error(node, "`degraded` is empty".to_owned());
                return None;
            }
            None => Degraded::Containing(s.as_str().to_owned()),
        })
    }

    fn trigger(&mut self, node: &Node) -> Vec<Check> {
        let Some(map): Option<&MarkedMappingNode> =
            yaml::expect_map(self.file, node, "`trigger`", self.diags)
        else {
            return Vec::new();
        };
        yaml::check_keys(self.file, map, TRIGGER_KEYS, "`trigger`", self.diags);
        let mut out = Vec::new();
        for (k, v) in map.iter() {
            let what = format!("`trigger.{}`", k.as_str());
            let check = match k.as_str() {
                "event" => self.text(v, &what).map(Check::TriggerEvent),
                "tracker" => self.text(v, &what).map(Check::TriggerTracker),
                "offset_ms" => self.number(v, &what).map(Check::TriggerOffset),
                "is_final" => self.boolean(v, &what).map(Check::TriggerIsFinal),
                "phrases" => self.strings(v, &what).map(Check::TriggerPhrases),
                "text_contains" => self.strings(v, &what).map(Check::TriggerTextContains),
                _ => None,
            };
            out.extend(check);
        }
        out
    }
}

/// A YAML node as the JSON a recording line would carry: plain scalars read as YAML's core
/// schema does (`null`/`~`, `true`/`false`, numbers), quoted ones stay strings.
pub(crate) fn to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match node {
        Node::Mapping(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        Node::Sequence(s) => Value::Array(s.iter().map(to_json).collect()),
        Node::Scalar(s) => {
            let text = s.as_str();
            if !s.may_coerce() {
                return Value::String(text.to_owned());
            }
            match text {
                "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
                _ => {}
            }
            if let Some(b) = s.as_bool() {
                return Value::Bool(b);
            }
            if let Ok(i) = text.parse::<i64>() {
                return Value::from(i);
            }
            if let Ok(u) = text.parse::<u64>() {
                return Value::from(u);
            }
            let numeric = text
                .chars()
                .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
            if numeric
                && let Ok(f) = text.parse::<f64>()
                && let Some(n) = serde_json::Number::from_f64(f)
            {
                return Value::Number(n);
            }
            Value::String(text.to_owned())
        }
    }
}

fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `prompter.yaml` in `dir` or the nearest of its ancestors that has one (relative to the
/// current folder when it is inside it, as paths in messages are).
fn nearest_config(dir: &Path) -> Option<PathBuf> {
    let abs = dir.canonicalize().ok()?;
    let found = abs
        .ancestors()
        .map(|d| d.join(CONFIG_NAME))
        .find(|p| p.is_file())?;
    let cwd = std::env::current_dir().and_then(|c| c.canonicalize()).ok();
    Some(
        cwd.and_then(|c| found.strip_prefix(&c).ok().map(Path::to_path_buf))
            .unwrap_or(found),
    )
}

/// `a/b/../c` as `a/c` when both name the same file (so messages show short paths); the path
/// unchanged otherwise (a symbolic link in between, or a file that does not exist).
fn tidy(path: &Path) -> PathBuf {
    let out = lexical(path);
    match (out.canonicalize(), path.canonicalize()) {
        (Ok(a), Ok(b)) if a == b => out,
        _ => path.to_path_buf(),
    }
}

/// `a/b/../c` as `a/c`, by the text alone (for showing a path).
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

#[cfg(test)]
mod tests;
