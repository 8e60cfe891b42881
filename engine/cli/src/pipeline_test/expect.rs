//! Expectations: which outputs a block of a test file matches, and, when the count is wrong, a
//! readable diff against the closest actual outputs.
//!
//! An expectation is a list of checks on the fields of the [`Output`] JSON (`pipeline`, `kind`,
//! `title`, `text`, `sources`, `degraded`, `trigger`, ...). It is matched against the *current*
//! outputs of a run: the last version of each output id (a card that grew is judged as it ended;
//! a withdrawn card is `status: withdrawn`). Without `count` at least one output must pass every
//! check; with `count: N` exactly N must.
//!
//! This module does not read test files (that is `spec`) nor run the engine.

use std::fmt::Write as _;

use prompter_core::output::{Output, Status};

/// Which lifecycle state an expectation accepts (`status:`); `final` unless said otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatusFilter {
    /// Only this status.
    Is(Status),
    /// Any status (`status: any`).
    Any,
}

/// What `degraded:` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Degraded {
    /// `degraded: false`: the output carries no `degraded` reason.
    No,
    /// `degraded: true`: it carries one.
    Yes,
    /// `degraded: "some words"`: it carries one containing these words.
    Containing(String),
}

/// One check of an expectation, named after the key that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Check {
    /// `id`: the output id, exactly.
    Id(String),
    /// `conversation_id`: exactly.
    ConversationId(String),
    /// `pipeline`: exactly.
    Pipeline(String),
    /// `kind`: exactly.
    Kind(String),
    /// `status`: final (the default), draft, withdrawn or any.
    Status(StatusFilter),
    /// `version`: exactly.
    Version(u32),
    /// `title`: exactly (surrounding whitespace ignored).
    Title(String),
    /// `title_contains`: every one of these.
    TitleContains(Vec<String>),
    /// `text`: exactly (surrounding whitespace ignored).
    Text(String),
    /// `text_contains`: every one of these.
    TextContains(Vec<String>),
    /// `text_not_contains`: none of these.
    TextNotContains(Vec<String>),
    /// `sources`: each names a source (its id, or words of its text).
    Sources(Vec<String>),
    /// `top_source`: the best-ranked source is this one (its id, or words of its text).
    TopSource(String),
    /// `degraded`.
    Degraded(Degraded),
    /// `model`: exactly (`offline`, `nebula:...`).
    Model(String),
    /// `trigger.event`: the triggering event kind.
    TriggerEvent(String),
    /// `trigger.tracker`: the tracker name, exactly.
    TriggerTracker(String),
    /// `trigger.offset_ms`: exactly.
    TriggerOffset(u64),
    /// `trigger.is_final`.
    TriggerIsFinal(bool),
    /// `trigger.phrases`: each is among the matched phrases.
    TriggerPhrases(Vec<String>),
    /// `trigger.text_contains`: the trigger's text has every one of these.
    TriggerTextContains(Vec<String>),
}

/// One `expect:` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expectation {
    /// Where it is written: `file:line:col`.
    pub(crate) at: String,
    /// `count`: exactly this many outputs pass; `None`: at least one.
    pub(crate) count: Option<usize>,
    /// The checks, in the order written (the status check first).
    pub(crate) checks: Vec<Check>,
}

/// Candidates shown under a failed expectation.
const CLOSEST_SHOWN: usize = 2;
/// Lines of an output's text shown in a diff, and characters per line.
const TEXT_LINES: usize = 8;
const LINE_CHARS: usize = 300;

/// A string as JSON quotes it (escapes visible, never ambiguous).
pub(crate) fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

fn q_all(items: &[String]) -> String {
    items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
}

/// `s` cut to `n` characters, with an ellipsis when cut.
fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut c: String = s.chars().take(n).collect();
        c.push('…');
        c
    }
}

fn status_name(f: StatusFilter) -> &'static str {
    match f {
        StatusFilter::Is(s) => s.as_str(),
        StatusFilter::Any => "any",
    }
}

/// Whether a source is the one `want` names: its id, or words of its text.
fn names_source(want: &str, id: &str, text: &str) -> bool {
    id == want || text.contains(want)
}

impl Check {
    /// Whether the output passes.
    pub(crate) fn holds(&self, o: &Output) -> bool {
        let has_all = |hay: &str, needles: &[String]| needles.iter().all(|n| hay.contains(n));
        match self {
            Check::Id(v) => o.id == *v,
            Check::ConversationId(v) => o.conversation_id == *v,
            Check::Pipeline(v) => o.pipeline == *v,
            Check::Kind(v) => o.kind == *v,
            Check::Status(StatusFilter::Any) => true,
            Check::Status(StatusFilter::Is(s)) => o.status == *s,
            Check::Version(v) => o.version == *v,
            Check::Title(v) => o.title.as_deref().map(str::trim) == Some(v.trim()),
            Check::TitleContains(n) => o.title.as_deref().is_some_and(|t| has_all(t, n)),
            Check::Text(v) => o.text.trim() == v.trim(),
            Check::TextContains(n) => has_all(&o.text, n),
            Check::TextNotContains(n) => !n.iter().any(|x| o.text.contains(x)),
            Check::Sources(want) => want
                .iter()
                .all(|w| o.sources.iter().any(|s| names_source(w, &s.id, &s.text))),
            Check::TopSource(w) => o
                .sources
                .first()
                .is_some_and(|s| names_source(w, &s.id, &s.text)),
            Check::Degraded(Degraded::No) => o.degraded.is_none(),
            Check::Degraded(Degraded::Yes) => o.degraded.is_some(),
            Check::Degraded(Degraded::Containing(w)) => o
                .degraded
                .as_deref()
                .is_some_and(|d| d.contains(w.as_str())),
            Check::Model(v) => o.model.as_deref() == Some(v.as_str()),
            Check::TriggerEvent(v) => o.trigger.event == *v,
            Check::TriggerTracker(v) => o.trigger.tracker.as_deref() == Some(v.as_str()),
            Check::TriggerOffset(v) => o.trigger.offset_ms == *v,
            Check::TriggerIsFinal(v) => o.trigger.is_final == Some(*v),
            Check::TriggerPhrases(want) => want.iter().all(|w| o.trigger.phrases.contains(w)),
            Check::TriggerTextContains(n) => {
                o.trigger.text.as_deref().is_some_and(|t| has_all(t, n))
            }
        }
    }

    /// The key that wrote it (`trigger.tracker` for nested ones).
    pub(crate) fn key(&self) -> &'static str {
        match self {
            Check::Id(_) => "id",
            Check::ConversationId(_) => "conversation_id",
            Check::Pipeline(_) => "pipeline",
            Check::Kind(_) => "kind",
            Check::Status(_) => "status",
            Check::Version(_) => "version",
            Check::Title(_) => "title",
            Check::TitleContains(_) => "title_contains",
            Check::Text(_) => "text",
            Check::TextContains(_) => "text_contains",
            Check::TextNotContains(_) => "text_not_contains",
            Check::Sources(_) => "sources",
            Check::TopSource(_) => "top_source",
            Check::Degraded(_) => "degraded",
            Check::Model(_) => "model",
            Check::TriggerEvent(_) => "trigger.event",
            Check::TriggerTracker(_) => "trigger.tracker",
            Check::TriggerOffset(_) => "trigger.offset_ms",
            Check::TriggerIsFinal(_) => "trigger.is_final",
            Check::TriggerPhrases(_) => "trigger.phrases",
            Check::TriggerTextContains(_) => "trigger.text_contains",
        }
    }

    /// How much passing this check makes an output "the one meant": what a card is (its
    /// pipeline, kind, title, tracker, id) counts more than what it says.
    fn weight(&self) -> u32 {
        match self {
            Check::Id(_) | Check::Title(_) | Check::TriggerTracker(_) => 4,
            Check::Pipeline(_) | Check::Kind(_) | Check::ConversationId(_) => 3,
            Check::TitleContains(_) | Check::TriggerEvent(_) => 2,
            _ => 1,
        }
    }

    /// What the check asks, for the summary of an expectation.
    pub(crate) fn describe(&self) -> String {
        match self {
            Check::Id(v) => format!("id {}", q(v)),
            Check::ConversationId(v) => format!("conversation_id {}", q(v)),
            Check::Pipeline(v) => format!("pipeline {}", q(v)),
            Check::Kind(v) => format!("kind {}", q(v)),
            Check::Status(f) => format!("status {}", status_name(*f)),
            Check::Version(v) => format!("version {v}"),
            Check::Title(v) => format!("title {}", q(v)),
            Check::TitleContains(n) => format!("title contains {}", q_all(n)),
            Check::Text(v) => format!("text {}", q(&cut(v.trim(), 80))),
            Check::TextContains(n) => format!("text contains {}", q_all(n)),
            Check::TextNotContains(n) => format!("text does not contain {}", q_all(n)),
            Check::Sources(n) => format!("sources include {}", q_all(n)),
            Check::TopSource(v) => format!("top source {}", q(v)),
            Check::Degraded(Degraded::No) => "not degraded".to_owned(),
            Check::Degraded(Degraded::Yes) => "degraded".to_owned(),
            Check::Degraded(Degraded::Containing(w)) => format!("degraded with {}", q(w)),
            Check::Model(v) => format!("model {}", q(v)),
            Check::TriggerEvent(v) => format!("trigger.event {}", q(v)),
            Check::TriggerTracker(v) => format!("trigger.tracker {}", q(v)),
            Check::TriggerOffset(v) => format!("trigger.offset_ms {v}"),
            Check::TriggerIsFinal(v) => format!("trigger.is_final {v}"),
            Check::TriggerPhrases(n) => format!("trigger.phrases include {}", q_all(n)),
            Check::TriggerTextContains(n) => format!("trigger text contains {}", q_all(n)),
        }
    }

    /// For an output that fails the check: `- expected ...` lines, then `+ actual ...` lines.
    pub(crate) fn diff(&self, o: &Output) -> Vec<String> {
        let mut lines = Vec::new();
        let missing = |hay: Option<&str>, needles: &[String]| -> Vec<String> {
            needles
                .iter()
                .filter(|n| !hay.is_some_and(|h| h.contains(n.as_str())))
                .cloned()
                .collect()
        };
        match self {
            Check::Id(v) => pair(&mut lines, format!("id {}", q(v)), "id", q(&o.id)),
            Check::ConversationId(v) => pair(
                &mut lines,
                format!("conversation_id {}", q(v)),
                "conversation_id",
                q(&o.conversation_id),
            ),
            Check::Pipeline(v) => pair(
                &mut lines,
                format!("pipeline {}", q(v)),
                "pipeline",
                q(&o.pipeline),
            ),
            Check::Kind(v) => pair(&mut lines, format!("kind {}", q(v)), "kind", q(&o.kind)),
            Check::Status(f) => pair(
                &mut lines,
                format!("status {}", status_name(*f)),
                "status",
                o.status.as_str().to_owned(),
            ),
            Check::Version(v) => pair(
                &mut lines,
                format!("version {v}"),
                "version",
                o.version.to_string(),
            ),
            Check::Title(v) => pair(&mut lines, format!("title {}", q(v)), "title", title(o)),
            Check::TitleContains(n) => {
                for m in missing(o.title.as_deref(), n) {
                    lines.push(format!("- expected title to contain {}", q(&m)));
                }
                lines.push(format!("+ actual title: {}", title(o)));
            }
            Check::Text(v) => {
                block(&mut lines, "- expected text: ", v.trim());
                block(&mut lines, "+ actual text: ", o.text.trim());
            }
            Check::TextContains(n) => {
                for m in missing(Some(&o.text), n) {
                    lines.push(format!("- expected text to contain {}", q(&m)));
                }
                block(&mut lines, "+ actual text: ", o.text.trim());
            }
            Check::TextNotContains(n) => {
                for m in n.iter().filter(|m| o.text.contains(m.as_str())) {
                    lines.push(format!("- expected text not to contain {}", q(m)));
                }
                block(&mut lines, "+ actual text: ", o.text.trim());
            }
            Check::Sources(want) => {
                for w in want
                    .iter()
                    .filter(|w| !o.sources.iter().any(|s| names_source(w, &s.id, &s.text)))
                {
                    lines.push(format!("- expected a source matching {}", q(w)));
                }
                sources(&mut lines, "+ actual sources: ", o, usize::MAX);
            }
            Check::TopSource(w) => {
                lines.push(format!("- expected the top source to match {}", q(w)));
                sources(&mut lines, "+ actual top source: ", o, 1);
            }
            Check::Degraded(_) => {
                lines.push(format!("- expected {}", self.describe()));
                lines.push(match &o.degraded {
                    Some(why) => format!("+ actual degraded: {}", q(why)),
                    None => "+ actual: not degraded".to_owned(),
                });
            }
            Check::Model(v) => pair(
                &mut lines,
                format!("model {}", q(v)),
                "model",
                o.model.as_deref().map_or_else(|| "(none)".to_owned(), q),
            ),
            Check::TriggerEvent(v) => pair(
                &mut lines,
                format!("trigger.event {}", q(v)),
                "trigger.event",
                q(&o.trigger.event),
            ),
            Check::TriggerTracker(v) => pair(
                &mut lines,
                format!("trigger.tracker {}", q(v)),
                "trigger.tracker",
                o.trigger
                    .tracker
                    .as_deref()
                    .map_or_else(|| "(none)".to_owned(), q),
            ),
            Check::TriggerOffset(v) => pair(
                &mut lines,
                format!("trigger.offset_ms {v}"),
                "trigger.offset_ms",
                o.trigger.offset_ms.to_string(),
            ),
            Check::TriggerIsFinal(v) => pair(
                &mut lines,
                format!("trigger.is_final {v}"),
                "trigger.is_final",
                o.trigger
                    .is_final
                    .map_or_else(|| "(none)".to_owned(), |b| b.to_string()),
            ),
            Check::TriggerPhrases(want) => {
                for w in want.iter().filter(|w| !o.trigger.phrases.contains(w)) {
                    lines.push(format!("- expected trigger phrase {}", q(w)));
                }
                lines.push(format!(
                    "+ actual trigger.phrases: [{}]",
                    q_all(&o.trigger.phrases)
                ));
            }
            Check::TriggerTextContains(n) => {
                for m in missing(o.trigger.text.as_deref(), n) {
                    lines.push(format!("- expected trigger text to contain {}", q(&m)));
                }
                block(
                    &mut lines,
                    "+ actual trigger text: ",
                    o.trigger.text.as_deref().unwrap_or("(none)"),
                );
            }
        }
        lines
    }
}

fn pair(lines: &mut Vec<String>, expected: String, field: &str, actual: String) {
    lines.push(format!("- expected {expected}"));
    lines.push(format!("+ actual {field}: {actual}"));
}

fn title(o: &Output) -> String {
    o.title.as_deref().map_or_else(|| "(none)".to_owned(), q)
}

/// A possibly multi-line text: one quoted line each, aligned under the first, at most
/// [`TEXT_LINES`] of them.
fn block(lines: &mut Vec<String>, label: &str, text: &str) {
    let pad = " ".repeat(label.chars().count());
    let all: Vec<&str> = text.lines().collect();
    if all.is_empty() {
        lines.push(format!("{label}\"\""));
        return;
    }
    for (i, l) in all.iter().take(TEXT_LINES).enumerate() {
        let lead = if i == 0 { label } else { pad.as_str() };
        lines.push(format!("{lead}{}", q(&cut(l, LINE_CHARS))));
    }
    if all.len() > TEXT_LINES {
        lines.push(format!("{pad}… ({} more lines)", all.len() - TEXT_LINES));
    }
}

fn sources(lines: &mut Vec<String>, label: &str, o: &Output, max: usize) {
    if o.sources.is_empty() {
        lines.push(format!("{label}(none)"));
        return;
    }
    let pad = " ".repeat(label.chars().count());
    for (i, s) in o.sources.iter().take(max).enumerate() {
        let lead = if i == 0 { label } else { pad.as_str() };
        lines.push(format!("{lead}{} {}", s.id, q(&cut(&s.text, 100))));
    }
}

/// One line naming an output: id, version and status, pipeline, kind and title.
pub(crate) fn headline(o: &Output) -> String {
    let mut s = format!(
        "{} (v{} {}; {} {}",
        o.id,
        o.version,
        o.status.as_str(),
        o.pipeline,
        o.kind
    );
    if let Some(t) = &o.title {
        let _ = write!(s, " {}", q(t));
    }
    s.push(')');
    s
}

impl Expectation {
    /// Whether the output passes every check.
    pub(crate) fn matches(&self, o: &Output) -> bool {
        self.checks.iter().all(|c| c.holds(o))
    }

    /// What it asks, in one line (the default `status final` left out).
    pub(crate) fn want(&self) -> String {
        let parts: Vec<String> = self
            .checks
            .iter()
            .filter(|c| **c != Check::Status(StatusFilter::Is(Status::Final)))
            .map(Check::describe)
            .collect();
        if parts.is_empty() {
            "any final output".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// `None` when the outputs satisfy it; otherwise what went wrong, as the lines of a
    /// readable diff (the first line says what was expected and what was found).
    pub(crate) fn evaluate(&self, outputs: &[Output]) -> Option<Vec<String>> {
        let (hits, misses): (Vec<&Output>, Vec<&Output>) =
            outputs.iter().partition(|o| self.matches(o));
        let found = hits.len();
        let ok = match self.count {
            Some(n) => found == n,
            None => found > 0,
        };
        if ok {
            return None;
        }
        let mut lines = Vec::new();
        let wanted = match self.count {
            None => "at least one matching output".to_owned(),
            Some(0) => "no matching output".to_owned(),
            Some(1) => "exactly 1 matching output".to_owned(),
            Some(n) => format!("exactly {n} matching outputs"),
        };
        lines.push(format!("{}: expected {wanted}, found {found}", self.at));
        lines.push(format!("  want: {}", self.want()));
        if self.count.is_some_and(|n| found > n) {
            // Too many: the ones that matched are the news.
            for o in &hits {
                lines.push(format!("  matched: {}", headline(o)));
                let mut text = Vec::new();
                block(&mut text, "    text: ", o.text.trim());
                lines.extend(text.into_iter().take(2));
            }
            return Some(lines);
        }
        for o in &hits {
            lines.push(format!("  matched: {}", headline(o)));
        }
        if misses.is_empty() {
            lines.push(if outputs.is_empty() {
                "  closest: none (the run delivered no outputs)".to_owned()
            } else {
                "  closest: none (every output matched)".to_owned()
            });
            return Some(lines);
        }
        let ranked = self.closest(&misses);
        let best = ranked.first().map_or(0, |(score, _)| *score);
        for (rank, (score, o)) in ranked.iter().enumerate() {
            // A runner-up only when it is as close as the best: otherwise it is noise.
            if rank > 0 && *score < best {
                break;
            }
            let label = if rank == 0 { "closest" } else { "as close" };
            lines.push(format!(
                "  {label} ({} of {}): {}",
                rank + 1,
                outputs.len(),
                headline(o)
            ));
            let same: Vec<&str> = self
                .checks
                .iter()
                .filter(|c| c.holds(o))
                .map(Check::key)
                .collect();
            if !same.is_empty() {
                lines.push(format!("    same: {}", same.join(", ")));
            }
            for c in self.checks.iter().filter(|c| !c.holds(o)) {
                lines.extend(c.diff(o).into_iter().map(|l| format!("    {l}")));
            }
        }
        Some(lines)
    }

    /// The outputs most like the one meant, with their closeness: by the weight of the checks
    /// they pass, then in call order; at most [`CLOSEST_SHOWN`].
    fn closest<'o>(&self, candidates: &[&'o Output]) -> Vec<(u32, &'o Output)> {
        let score = |o: &Output| -> u32 {
            self.checks
                .iter()
                .filter(|c| c.holds(o))
                .map(Check::weight)
                .sum()
        };
        let mut ranked: Vec<(u32, usize, &Output)> = candidates
            .iter()
            .enumerate()
            .map(|(i, o)| (score(o), i, *o))
            .collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        ranked
            .into_iter()
            .take(CLOSEST_SHOWN)
            .map(|(score, _, o)| (score, o))
            .collect()
    }
}

/// The current outputs of a run: the last version of each id, ordered by conversation, then
/// by where in the call their trigger was (delivery order across pipelines varies from run to
/// run; the trigger's place in the call does not).
pub(crate) fn current(delivered: Vec<Output>) -> Vec<Output> {
    let mut latest: std::collections::HashMap<String, Output> = std::collections::HashMap::new();
    for o in delivered {
        match latest.get(&o.id) {
            Some(prev) if prev.version >= o.version => {}
            _ => {
                latest.insert(o.id.clone(), o);
            }
        }
    }
    let mut out: Vec<Output> = latest.into_values().collect();
    out.sort_by(|a, b| {
        (&a.conversation_id, a.trigger.offset_ms, &a.pipeline, &a.id).cmp(&(
            &b.conversation_id,
            b.trigger.offset_ms,
            &b.pipeline,
            &b.id,
        ))
    });
    out
}

#[cfg(test)]
mod tests;
