//! `prompter demo`: a recorded sales call played in real time through the shipped pipelines,
//! shown as the agent would see it: transcript lines with speakers, and suggestion cards with
//! their trigger, sources and engine time.

use std::path::PathBuf;
use std::sync::Arc;

use prompter_core::event::{Detail, Event};
use prompter_core::output::{Output, Status};

use crate::bundle;
use crate::cli::{Stream, load_for_run, read_recordings, say};
use prompter_engine::registry::Registry;
use prompter_engine::session::{self, Pace};
use prompter_engine::stats::Stats;

const WIDTH: usize = 78;

/// Terminal styling, off when not a terminal or with `--no-color`/`NO_COLOR`.
#[derive(Debug, Clone, Copy)]
pub struct Style {
    color: bool,
}

impl Style {
    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
    pub(crate) fn dim(self, t: &str) -> String {
        self.paint("2", t)
    }
    pub(crate) fn bold(self, t: &str) -> String {
        self.paint("1", t)
    }
    fn accent(self, t: &str) -> String {
        self.paint("1;36", t)
    }
    fn speaker(self, t: &str) -> String {
        self.paint("33", t)
    }
}

/// Runs the demo.
#[allow(clippy::too_many_arguments, reason = "the command's options, flat")]
pub async fn run(
    registry: &Registry,
    config: Option<PathBuf>,
    call: Option<PathBuf>,
    speed: f64,
    no_color: bool,
    console: Option<crate::console::DemoConsole>,
    out: &Stream,
    err: &Stream,
) -> u8 {
    // Embedded defaults when there is no config here: the demo runs from any folder.
    let mut bundle_dir = None;
    let config = match config
        .or_else(|| Some(PathBuf::from("prompter.yaml")).filter(|p| p.exists()))
    {
        Some(c) => c,
        None => match tempfile::tempdir().and_then(|d| bundle::extract(d.path()).map(|c| (d, c))) {
            Ok((dir, cfg)) => {
                bundle_dir = Some(dir);
                cfg
            }
            Err(e) => {
                say(
                    err,
                    &format!("error: cannot unpack the embedded defaults: {e}"),
                );
                return 1;
            }
        },
    };
    let call = call.unwrap_or_else(|| {
        config
            .parent()
            .unwrap_or(std::path::Path::new("."))
            .join(bundle::DEMO_CALL)
    });
    let call = if call.exists() {
        call
    } else {
        match tempfile::tempdir().and_then(|d| bundle::extract(d.path()).map(|_| d)) {
            Ok(dir) => {
                let p = dir.path().join(bundle::DEMO_CALL);
                bundle_dir = Some(dir);
                p
            }
            Err(e) => {
                say(err, &format!("error: cannot unpack the bundled call: {e}"));
                return 1;
            }
        }
    };
    let Some(loaded) = load_for_run(registry, &config, err) else {
        return 1;
    };
    let paths = vec![call.clone()];
    let Some((lines, _)) = read_recordings(&paths, err) else {
        return 1;
    };
    use std::io::IsTerminal;
    let style = Style {
        color: !no_color
            && std::env::var_os("NO_COLOR").is_none()
            && std::io::stdout().is_terminal(),
    };
    if let Some(opts) = console {
        let code = crate::console::demo(loaded, lines, paths, opts, style, out, err).await;
        drop(bundle_dir);
        return code;
    }
    let duration_s = lines.last().map(|l| l.offset_ms / 1000).unwrap_or(0);
    say(
        out,
        &style.bold("Prompter demo: Real-Time Assist on a recorded sales call"),
    );
    say(
        out,
        &style.dim(&format!(
            "call {} ({} s, played at {speed}x) | pipelines: {} | knowledge: {} | llm: {}",
            call.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            duration_s,
            loaded
                .pipelines
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            loaded
                .resources
                .knowledge
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            loaded
                .resources
                .chat
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        )),
    );
    say(out, "");
    let Some((sinks, notifiers)) = crate::cli::notifiers(&loaded, err) else {
        return 1;
    };
    let out_events = out.clone();
    let out_cards = out.clone();
    let err2 = err.clone();
    let stats = Arc::new(Stats::with_metrics(loaded.settings.metrics.clone()));
    let summary = session::run(
        loaded,
        lines,
        &paths,
        Pace::Realtime(speed),
        stats,
        move |e| {
            if let Some(line) = transcript_line(e, style) {
                say(&out_events, &line);
            }
        },
        move |p| say(&err2, &format!("warning: {p}")),
        move |o| say(&out_cards, &card(o, style)),
        sinks,
    )
    .await;
    crate::cli::report_notifiers(&notifiers, err);
    let replay_hint = if bundle_dir.is_some() {
        String::new()
    } else {
        format!(" Replay it as JSON: prompter replay {}", call.display())
    };
    say(
        out,
        &style.dim(&format!(
            "end of call: {} events, {} outputs, {} stage errors.{replay_hint}",
            summary.events, summary.outputs, summary.stage_errors
        )),
    );
    0
}

fn clock(ms: u64) -> String {
    format!("{:02}:{:02}", ms / 60_000, (ms / 1000) % 60)
}

/// A transcript line for finalized sentences; nothing for other events.
pub fn transcript_line(e: &Event, style: Style) -> Option<String> {
    match &e.detail {
        Detail::Message(m) => Some(format!(
            "{} {} {}",
            style.dim(&format!("[{}]", clock(e.offset_ms))),
            style.speaker(&format!("{}:", m.speaker.label())),
            m.text
        )),
        _ => None,
    }
}

/// A card for an output.
pub fn card(o: &Output, style: Style) -> String {
    let mut heading = o.kind.replace('_', " ").to_uppercase();
    if let Some(t) = &o.title {
        heading = format!("{heading} | {t}");
    }
    match o.status {
        Status::Withdrawn => heading = format!("{heading} (withdrawn: superseded)"),
        Status::Draft => heading = format!("{heading} (being written)"),
        Status::Final if o.version > 1 => heading = format!("{heading} (update {})", o.version),
        Status::Final => {}
    }
    let rule = |left: &str| {
        let used = left.chars().count();
        format!("{left}{}", "-".repeat(WIDTH.saturating_sub(used)))
    };
    let mut lines = vec![style.accent(&rule(&format!("    +-- {heading} ")))];
    for para in o.text.lines() {
        for l in wrap(para, WIDTH - 8) {
            lines.push(format!("    | {l}"));
        }
    }
    let mut why = format!("at {} on {}", clock(o.trigger.offset_ms), o.trigger.event);
    if let Some(t) = &o.trigger.tracker {
        let phrases = o
            .trigger
            .phrases
            .iter()
            .map(|p| format!("\"{p}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let state = if o.trigger.is_final == Some(false) {
            "interim"
        } else {
            "final"
        };
        why = format!(
            "tracker {t} matched {phrases} ({state}) at {}",
            clock(o.trigger.offset_ms)
        );
    }
    lines.push(style.dim(&format!("    | why: {why}")));
    for s in &o.sources {
        let text: String = s.text.chars().take(48).collect();
        let more = if s.text.chars().count() > 48 {
            "..."
        } else {
            ""
        };
        lines.push(style.dim(&format!(
            "    | source {} ({:.2}): {text}{more}",
            s.id, s.score
        )));
    }
    let stages = o
        .timings
        .stages_us
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    let stages = if stages.is_empty() {
        String::new()
    } else {
        format!(" ({stages})")
    };
    lines.push(style.dim(&format!(
        "    | engine time {} us{stages}",
        o.timings.total_us
    )));
    lines.push(style.accent(&rule("    +")));
    lines.join("\n")
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > width {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_on_words() {
        assert_eq!(wrap("one two three four", 9), ["one two", "three", "four"]);
        assert!(wrap("", 9).is_empty());
    }
}
