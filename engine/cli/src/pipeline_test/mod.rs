//! `prompter test [PATH...]`: pipeline tests written in YAML next to the pipelines
//! (`*.test.yaml`), run offline on the engine config's own providers, failures shown as a
//! readable diff. The format and the output are described in `docs/pipeline-tests.md`.
//!
//! Every test gets a fresh engine: the engine config is loaded again (so each test starts with
//! no conversation state, no dedupe keys, no card versions), its call (a recording and/or inline
//! Symbl frames) is replayed as fast as possible, exactly as `prompter replay` does, and its
//! expectations are checked against the current outputs: the last version of each output id.
//! The config's notifier sinks (`sinks:`) are not started: a test delivers nowhere.
//!
//! All test files are read first; a problem in any of them (unknown key, missing recording, a
//! frame the engine cannot read) is reported as `file:line:col` and nothing runs (exit 2).
//!
//! # Layout
//! - `spec`: the file format, read with positions.
//! - `expect`: matching expectations against outputs, and the diff of a failed one.
//! - this file: the command: finding the files, running each test, reporting.

mod expect;
mod spec;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prompter_core::output::Output;
use prompter_engine::config::diagnostics::Diagnostics;
use prompter_engine::config::{self, LoadRequest};
use prompter_engine::recording::{self, RecordedLine};
use prompter_engine::registry::Registry;
use prompter_engine::session::{self, Pace};
use prompter_engine::stats::Stats;
use serde::Serialize;

use crate::cli::{Stream, say};

/// Where tests are looked for when no path is given.
pub const DEFAULT_PATH: &str = "pipelines";

/// The longest a test's call may take to replay: a stage that hangs fails its test instead of
/// the whole command. Replays run in virtual time, so a shipped call takes milliseconds.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Indentation of the lines under a test's `FAIL` line (the width of `FAIL `).
const INDENT: &str = "     ";

/// `prompter test` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TestArgs {
    /// Test files, or folders searched (recursively) for `*.test.yaml` [default: pipelines/].
    pub paths: Vec<PathBuf>,
    /// Run only the tests whose name contains this text.
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,
    /// Print one JSON report on stdout instead of a line per test.
    #[arg(long)]
    pub json: bool,
}

/// How a test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Verdict {
    Ok,
    Fail,
    Skip,
    /// It could not run (its engine config does not load, a recording cannot be read).
    Error,
}

/// One failed expectation.
#[derive(Debug, Serialize)]
struct Failure {
    /// `file:line:col` of the expectation (or of the test, for a run that went wrong).
    at: String,
    /// The readable diff, line by line (the first says what was expected and found).
    lines: Vec<String>,
}

/// One test's result, as printed and as `--json` reports it.
#[derive(Debug, Serialize)]
struct TestReport {
    file: String,
    name: String,
    result: Verdict,
    /// Distinct outputs (ids) at the end of the call.
    outputs: usize,
    elapsed_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    failures: Vec<Failure>,
}

#[derive(Debug, Default, Serialize)]
struct Totals {
    passed: usize,
    failed: usize,
    skipped: usize,
    not_run: usize,
    tests: Vec<TestReport>,
}

/// Runs the tests under `args.paths`; returns the exit code: 0 when every test passed, 1 when
/// one failed, 2 when a test file has problems or a test could not run.
pub async fn run(registry: &Registry, args: TestArgs, out: &Stream, err: &Stream) -> u8 {
    let roots = if args.paths.is_empty() {
        vec![PathBuf::from(DEFAULT_PATH)]
    } else {
        args.paths.clone()
    };
    let mut files = Vec::new();
    for root in &roots {
        if root.is_dir() {
            find(root, &mut files);
        } else if root.is_file() {
            files.push(root.clone());
        } else {
            say(err, &format!("error: `{}` not found", root.display()));
            return 2;
        }
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    if files.is_empty() {
        let where_ = roots
            .iter()
            .map(|r| format!("`{}`", r.display()))
            .collect::<Vec<_>>()
            .join(", ");
        say(
            err,
            &format!("error: no test files (`*.test.yaml`) under {where_}"),
        );
        return 2;
    }

    let mut diags = Diagnostics::default();
    let mut parsed = Vec::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(text) => parsed.extend(spec::parse(f, &text, &mut diags)),
            Err(e) => {
                diags.error(f, None, format!("cannot read file: {e}"));
            }
        }
    }
    if !diags.is_empty() {
        say(err, diags.render().trim_end());
        say(
            err,
            &format!(
                "error: {} problem(s) in the test files; no test was run",
                diags.items().len()
            ),
        );
        return 2;
    }
    let selected = |name: &str| args.filter.as_deref().is_none_or(|f| name.contains(f));
    if let Some(f) = &args.filter
        && !parsed
            .iter()
            .flat_map(|t| &t.tests)
            .any(|t| selected(&t.name))
    {
        say(err, &format!("error: no test name contains `{f}`"));
        return 2;
    }

    let started = Instant::now();
    let mut totals = Totals::default();
    for file in &parsed {
        run_file(registry, file, &selected, &mut totals, !args.json, out, err).await;
    }
    if args.json {
        match serde_json::to_string_pretty(&totals) {
            Ok(s) => say(out, &s),
            Err(e) => say(err, &format!("error: the report did not serialize: {e}")),
        }
    } else {
        let mut summary = format!("{} passed, {} failed", totals.passed, totals.failed);
        if totals.skipped > 0 {
            summary.push_str(&format!(", {} skipped", totals.skipped));
        }
        if totals.not_run > 0 {
            summary.push_str(&format!(", {} could not run", totals.not_run));
        }
        summary.push_str(&format!(" ({:.2} s)", started.elapsed().as_secs_f64()));
        say(out, &summary);
    }
    if totals.not_run > 0 {
        2
    } else if totals.failed > 0 {
        1
    } else {
        0
    }
}

/// Files named `*.test.yaml` (or `.test.yml`) under `dir`, in name order; hidden folders are
/// not searched.
fn find(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<std::fs::DirEntry> = entries.flatten().collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for e in entries {
        let name = e.file_name();
        let name = name.to_string_lossy();
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            if !name.starts_with('.') {
                find(&path, out);
            }
        } else if (name.ends_with(".test.yaml") || name.ends_with(".test.yml")) && path.is_file() {
            out.push(path);
        }
    }
}

#[allow(
    clippy::too_many_arguments,
    reason = "the command's state, passed flat rather than bundled for one caller"
)]
async fn run_file(
    registry: &Registry,
    file: &spec::TestFile,
    selected: &dyn Fn(&str) -> bool,
    totals: &mut Totals,
    lines: bool,
    out: &Stream,
    err: &Stream,
) {
    let display = file.path.display().to_string();
    let missing: Vec<&str> = file
        .requires
        .iter()
        .filter(|(p, _)| !p.exists())
        .map(|(_, shown)| shown.as_str())
        .collect();
    let missing = match missing.as_slice() {
        [] => None,
        [one] => Some(format!("missing `{one}`")),
        [first, rest @ ..] => Some(format!("missing `{first}` and {} more", rest.len())),
    };
    let mut config_broken = false;
    for test in file.tests.iter().filter(|t| selected(&t.name)) {
        let mut report = TestReport {
            file: display.clone(),
            name: test.name.clone(),
            result: Verdict::Ok,
            outputs: 0,
            elapsed_ms: 0,
            reason: None,
            failures: Vec::new(),
        };
        let skip = test.skip.clone().or_else(|| missing.clone());
        if let Some(reason) = skip {
            report.result = Verdict::Skip;
            report.reason = Some(reason);
        } else if config_broken {
            report.result = Verdict::Error;
            report.reason = Some(format!(
                "engine config `{}` did not load",
                file.config.display()
            ));
        } else {
            let started = Instant::now();
            match run_one(registry, file, test).await {
                Ok(run) => {
                    report.outputs = run.outputs.len();
                    for p in &run.problems {
                        say(err, &format!("warning: {p}"));
                    }
                    for e in &test.expect {
                        if let Some(diff) = e.evaluate(&run.outputs) {
                            report.failures.push(Failure {
                                at: e.at.clone(),
                                lines: diff,
                            });
                        }
                    }
                    if let Some(why) = run.unfinished {
                        report.failures.push(Failure {
                            at: display.clone(),
                            lines: vec![why],
                        });
                    }
                    if !report.failures.is_empty() {
                        report.result = Verdict::Fail;
                        if run.stage_errors > 0 {
                            report.failures.push(Failure {
                                at: display.clone(),
                                lines: vec![format!(
                                    "note: {} stage error(s) during the call (`prompter -v test` logs them)",
                                    run.stage_errors
                                )],
                            });
                        }
                    }
                }
                Err(RunError::Config(diags)) => {
                    say(err, diags.render().trim_end());
                    say(
                        err,
                        &format!(
                            "error: {} problem(s) in engine config `{}` or its pipelines; the tests of `{display}` did not run",
                            diags.items().len(),
                            file.config.display()
                        ),
                    );
                    config_broken = true;
                    report.result = Verdict::Error;
                    report.reason = Some(format!(
                        "engine config `{}` did not load",
                        file.config.display()
                    ));
                }
                Err(RunError::Recording(why)) => {
                    say(err, &format!("error: {why}"));
                    report.result = Verdict::Error;
                    report.reason = Some(why);
                }
            }
            report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        }
        match report.result {
            Verdict::Ok => totals.passed += 1,
            Verdict::Fail => totals.failed += 1,
            Verdict::Skip => totals.skipped += 1,
            Verdict::Error => totals.not_run += 1,
        }
        if lines {
            print_report(&report, out);
        }
        totals.tests.push(report);
    }
}

fn print_report(r: &TestReport, out: &Stream) {
    let outputs = if r.outputs == 1 {
        "1 output".to_owned()
    } else {
        format!("{} outputs", r.outputs)
    };
    let head = format!("{}: {}", r.file, r.name);
    match r.result {
        Verdict::Ok => say(
            out,
            &format!("ok   {head} ({outputs}, {} ms)", r.elapsed_ms),
        ),
        Verdict::Skip => say(
            out,
            &format!("skip {head} ({})", r.reason.as_deref().unwrap_or("skipped")),
        ),
        Verdict::Error => say(
            out,
            &format!(
                "err  {head} (not run: {})",
                r.reason.as_deref().unwrap_or("error")
            ),
        ),
        Verdict::Fail => {
            let mut text = format!("FAIL {head} ({outputs}, {} ms)", r.elapsed_ms);
            for f in &r.failures {
                for l in &f.lines {
                    text.push('\n');
                    text.push_str(INDENT);
                    text.push_str(l);
                }
            }
            text.push('\n');
            say(out, &text);
        }
    }
}

/// What one test's call produced.
struct Run {
    /// The current outputs: the last version of each id.
    outputs: Vec<Output>,
    stage_errors: u64,
    /// Lines of a recording that were skipped.
    problems: Vec<String>,
    /// Why the call did not finish, when it did not.
    unfinished: Option<String>,
}

enum RunError {
    Config(Diagnostics),
    Recording(String),
}

/// One test on a fresh engine.
async fn run_one(
    registry: &Registry,
    file: &spec::TestFile,
    test: &spec::TestCase,
) -> Result<Run, RunError> {
    let env = |name: &str| {
        file.env
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
    };
    let req = LoadRequest {
        config: Some(&file.config),
        files: &[],
        include_config_pipelines: true,
        env: &env,
        metrics: None,
    };
    let loaded = config::load(&req, registry).map_err(RunError::Config)?;
    let (mut lines, problems) = recording::read_all(&test.recordings).map_err(|(p, e)| {
        RunError::Recording(format!("cannot read recording `{}`: {e}", p.display()))
    })?;
    // Inline events are lines of one more "recording": the test file itself.
    let mut paths = test.recordings.clone();
    paths.push(file.path.clone());
    let inline = paths.len() - 1;
    lines.extend(test.events.iter().map(|e| RecordedLine {
        file: inline,
        line: e.line,
        conversation: e.conversation.clone(),
        offset_ms: e.offset_ms,
        frame: e.frame.clone(),
    }));
    lines.sort_by_key(|l| l.offset_ms);

    let delivered: Arc<Mutex<Vec<Output>>> = Arc::default();
    let sink = delivered.clone();
    let skipped: Arc<Mutex<Vec<String>>> = Arc::default();
    let skipped_sink = skipped.clone();
    let mut problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    let replay = session::run(
        loaded,
        lines,
        &paths,
        Pace::Fast,
        Arc::new(Stats::default()),
        |_| {},
        move |p| {
            if let Ok(mut v) = skipped_sink.lock() {
                v.push(p.to_string());
            }
        },
        move |o| {
            if let Ok(mut v) = sink.lock() {
                v.push(o.clone());
            }
        },
        Vec::new(),
    );
    let (stage_errors, unfinished) = match tokio::time::timeout(TEST_TIMEOUT, replay).await {
        Ok(summary) => (summary.stage_errors, None),
        Err(_) => (
            0,
            Some(format!(
                "the call did not finish within {} s; outputs so far were checked",
                TEST_TIMEOUT.as_secs()
            )),
        ),
    };
    problems.extend(skipped.lock().map(|v| v.clone()).unwrap_or_default());
    let delivered = delivered.lock().map(|v| v.clone()).unwrap_or_default();
    Ok(Run {
        outputs: expect::current(delivered),
        stage_errors,
        problems,
        unfinished,
    })
}

/// The keys a test file accepts at each level, for the docs and for tests of them.
pub fn format_keys() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        ("file", spec::FILE_KEYS),
        ("test", spec::TEST_KEYS),
        ("event", spec::EVENT_KEYS),
        ("expectation", spec::EXPECT_KEYS),
        ("trigger", spec::TRIGGER_KEYS),
    ])
}
