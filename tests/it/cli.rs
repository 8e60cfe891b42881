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
    let code = prompter_engine::cli::main(argv, Box::new(out.clone()), Box::new(err.clone()));
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
    for name in [
        "dedupe", "retrieve", "prompt", "chat", "notify", "embedded", "offline",
    ] {
        assert!(
            r.stdout.contains(&format!("  {name} ")),
            "{name} missing from:\n{}",
            r.stdout
        );
    }
}

#[test]
fn bad_arguments_exit_2_with_usage() {
    let r = prompter(&["replay"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("Usage"), "{}", r.stderr);
}
