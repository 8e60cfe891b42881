//! Helpers to run the `prompter` command in process and read what it printed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A writer that keeps what was written.
#[derive(Clone, Default)]
pub(crate) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// What a command run produced.
pub(crate) struct Run {
    pub(crate) code: u8,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `prompter ARGS...`.
pub(crate) fn prompter(args: &[&str]) -> Run {
    let out = Capture::default();
    let err = Capture::default();
    let mut argv: Vec<std::ffi::OsString> = vec!["prompter".into()];
    argv.extend(args.iter().map(|a| a.into()));
    let code = prompter_cli::cli::main(argv, Box::new(out.clone()), Box::new(err.clone()));
    Run {
        code,
        stdout: out.text(),
        stderr: err.text(),
    }
}

/// The workspace root.
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A path under the workspace root, as a string.
pub(crate) fn at(rel: &str) -> String {
    root().join(rel).to_string_lossy().into_owned()
}

#[test]
fn plugins_lists_every_builtin() {
    let r = prompter(&["plugins"]);
    assert_eq!(r.code, 0);
    assert_eq!(r.stderr, "");
    // Each section's heading, then one `  <name padded to 18> <description>` line per entry.
    let mut sections: Vec<(&str, Vec<&str>)> = Vec::new();
    for line in r.stdout.lines() {
        match line.strip_prefix("  ") {
            Some(entry) => {
                let (name, description) = entry.split_at(18.min(entry.len()));
                assert!(
                    !description.trim().is_empty() && description.starts_with(' '),
                    "entry without a description: {line:?}"
                );
                sections.last_mut().unwrap().1.push(name.trim_end());
            }
            None => sections.push((line, Vec::new())),
        }
    }
    assert_eq!(
        sections,
        [
            (
                "stage plugins (`plugin:` in a pipeline stage):",
                vec![
                    "dedupe",
                    "retrieve",
                    "prompt",
                    "chat",
                    "notify",
                    "symbl_conversation",
                    "wasm"
                ]
            ),
            (
                "knowledge stores (`store:` under `knowledge:`):",
                vec!["embedded", "atlas"]
            ),
            (
                "llm providers (`provider:` under `llm:`):",
                vec!["offline", "nebula", "openai"]
            ),
            (
                "embedders (`provider:` under `embedders:`):",
                vec!["hashing", "local", "nebula", "openai"]
            ),
        ]
    );
}

#[test]
fn bad_arguments_exit_2_with_usage() {
    let r = prompter(&["replay"]);
    assert_eq!(r.code, 2);
    assert_eq!(r.stdout, "");
    assert_eq!(
        r.stderr,
        "error: the following required arguments were not provided:
  <RECORDINGS>...

Usage: prompter replay <RECORDINGS>...

For more information, try '--help'.
"
    );
}
