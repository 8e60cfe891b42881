//! A bounded fuzz run of whole recordings and configurations through the real binary: the
//! shipped files, mutated with a seeded generator (the same cases on every run), and the
//! regression corpus in `tests/fixtures/fuzz/` (inputs that once broke something, or would break
//! a careless reader: binary junk, nesting thousands deep, a YAML alias bomb). Every run must end
//! by itself with a verdict (exit 0 or 1, never a panic's 101 or a signal), say nothing about a
//! panic, and name the line of a bad recording line.
//!
//! `PROMPTER_FUZZ_CASES` raises the number of mutated cases per shipped file (default 12).

#![allow(
    clippy::unwrap_used,
    reason = "integration tests fail loudly on broken invariants"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// xorshift64*: small, seeded, the same sequence everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const JUNK: &[&str] = &[
    "",
    "{",
    "}",
    "[",
    "]",
    ":",
    ",",
    "\"",
    "null",
    "true",
    "-1",
    "1e400",
    "18446744073709551616",
    "\\u0000",
    "\u{feff}",
    "\u{1F600}",
    "{\"type\":",
    "\"type\": \"tracker_response\"",
    "\"trackers\": [{}]",
    "- ",
    "&a",
    "*a",
    "${UNSET}",
    "{{",
    "{%",
    "\t",
    "\n",
];

/// Applies 1 to 4 mutations: a byte flipped, junk inserted, a line dropped, doubled, cut or
/// swapped with another.
fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for _ in 0..=rng.below(4) {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let i = rng.below(lines.len());
        let char_at = |l: &str, rng: &mut Rng| {
            let n = l.chars().count();
            l.char_indices()
                .nth(rng.below(n + 1))
                .map_or(l.len(), |(b, _)| b)
        };
        match rng.below(7) {
            0 => {
                let at = char_at(&lines[i], rng);
                let junk = JUNK[rng.below(JUNK.len())];
                lines[i].insert_str(at, junk);
            }
            1 => {
                lines.remove(i);
            }
            2 => lines.insert(i, lines[i].clone()),
            3 => {
                let at = char_at(&lines[i], rng);
                lines[i].truncate(at);
            }
            4 => {
                let j = rng.below(lines.len());
                lines.swap(i, j);
            }
            5 => {
                // A byte replaced by another ASCII byte (kept valid UTF-8).
                let at = char_at(&lines[i], rng);
                if at < lines[i].len() {
                    let c = char::from(b' ' + (rng.below(95) as u8));
                    let end = at + lines[i][at..].chars().next().map_or(0, char::len_utf8);
                    lines[i].replace_range(at..end, &c.to_string());
                }
            }
            _ => {
                let at = char_at(&lines[i], rng);
                let digits = "9".repeat(1 + rng.below(30));
                lines[i].insert_str(at, &digits);
            }
        }
    }
    lines.join("\n") + "\n"
}

struct Verdict {
    code: Option<i32>,
    stderr: String,
}

/// Runs the binary with `args` in `dir`; kills it after a minute (a hang is a failure too).
fn run(dir: &Path, args: &[&str]) -> Verdict {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(dir)
        .args(args)
        .env_remove("PROMPTER_LLM")
        .env_remove("PROMPTER_KNOWLEDGE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`prompter {}` did not finish within 60 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Verdict {
        code: status.code(),
        stderr: reader.join().unwrap(),
    }
}

fn assert_clean(v: &Verdict, what: &str, input: &str) {
    assert!(
        matches!(v.code, Some(0 | 1)) && !v.stderr.contains("panicked"),
        "{what}: exit {:?}\n--- stderr\n{}\n--- input\n{input}",
        v.code,
        v.stderr
    );
}

fn cases() -> usize {
    std::env::var("PROMPTER_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

fn replay(dir: &Path, recording: &Path) -> Verdict {
    let config = root().join("prompter.yaml");
    run(
        dir,
        &[
            "replay",
            "--config",
            config.to_str().unwrap(),
            recording.to_str().unwrap(),
        ],
    )
}

#[test]
fn mutated_recordings_replay_or_name_their_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5EED_0001);
    let recordings = root().join("pipelines/recordings");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&recordings)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for case in 0..cases() {
            let mutated = mutate(&text, &mut rng);
            let path = dir.path().join(format!("case-{case}.jsonl"));
            std::fs::write(&path, &mutated).unwrap();
            let v = replay(dir.path(), &path);
            assert_clean(&v, &format!("{} case {case}", file.display()), &mutated);
            // A skipped line is reported with its number.
            for l in v
                .stderr
                .lines()
                .filter(|l| l.contains("skipped malformed line"))
            {
                let at = format!("case-{case}.jsonl:");
                let line_no = l.split(&at).nth(1).and_then(|r| r.split(':').next());
                assert!(
                    line_no.is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n >= 1)),
                    "{l}"
                );
            }
        }
    }
}

#[test]
fn mutated_configs_validate_or_say_where() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(0x5EED_0002);
    // The knowledge base is copied beside the config, so the text mutated (and so every case)
    // is the same wherever the checkout is.
    std::fs::copy(
        root().join("pipelines/data/sales_objections.csv"),
        dir.path().join("sales.csv"),
    )
    .unwrap();
    let engine = std::fs::read_to_string(root().join("prompter.yaml"))
        .unwrap()
        .replace(
            "${PROMPTER_KNOWLEDGE:-pipelines/data/sales_objections.csv}",
            "sales.csv",
        )
        .replace("pipelines/*.yaml", "pipelines.yaml");
    let pipeline = std::fs::read_to_string(root().join("pipelines/rta.yaml")).unwrap();
    for case in 0..cases() * 4 {
        let (e, p) = if case % 2 == 0 {
            (mutate(&engine, &mut rng), pipeline.clone())
        } else {
            (engine.clone(), mutate(&pipeline, &mut rng))
        };
        std::fs::write(dir.path().join("prompter.yaml"), &e).unwrap();
        std::fs::write(dir.path().join("pipelines.yaml"), &p).unwrap();
        let v = run(dir.path(), &["validate", "prompter.yaml"]);
        assert_clean(
            &v,
            &format!("config case {case}"),
            &format!("{e}\n---\n{p}"),
        );
        if v.code == Some(1) {
            // Every problem points into a file, at a line.
            assert!(
                v.stderr.contains("prompter.yaml:") || v.stderr.contains("pipelines.yaml:"),
                "{}",
                v.stderr
            );
        }
    }
}

#[test]
fn the_regression_corpus_is_handled() {
    let corpus = root().join("tests/fixtures/fuzz");
    let dir = tempfile::tempdir().unwrap();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    assert!(!entries.is_empty());
    for path in entries {
        let input = std::fs::read_to_string(&path).unwrap_or_default();
        let v = match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") => replay(dir.path(), &path),
            Some("yaml") => run(dir.path(), &["validate", path.to_str().unwrap()]),
            _ => continue,
        };
        assert_clean(&v, &path.display().to_string(), &input);
    }
}
