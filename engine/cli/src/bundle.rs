//! The embedded defaults: the shipped engine config, pipelines, sample knowledge base and a
//! recorded call, compiled into the binary so `prompter demo` runs anywhere, with no files, keys
//! or network.

use std::path::{Path, PathBuf};

/// (path relative to the bundle root, contents).
pub const FILES: &[(&str, &str)] = &[
    ("prompter.yaml", include_str!("../../../prompter.yaml")),
    (
        "pipelines/rta.yaml",
        include_str!("../../../pipelines/rta.yaml"),
    ),
    (
        "pipelines/open_questions.yaml",
        include_str!("../../../pipelines/open_questions.yaml"),
    ),
    (
        "pipelines/call_recap.yaml",
        include_str!("../../../pipelines/call_recap.yaml"),
    ),
    (
        "pipelines/data/sales_objections.csv",
        include_str!("../../../pipelines/data/sales_objections.csv"),
    ),
    (
        DEMO_CALL,
        include_str!("../../../pipelines/recordings/acme-discovery-call.jsonl"),
    ),
];

/// The recorded call the demo plays.
pub const DEMO_CALL: &str = "pipelines/recordings/acme-discovery-call.jsonl";

/// What the live load bench (`prompter bench --live-calls`) takes besides [`FILES`]: the live
/// Real-Time Assist pipeline and every shipped recording. Not part of [`extract`] (the demo
/// needs none of them).
pub const LOAD_FILES: &[(&str, &str)] = &[
    (
        "pipelines/live/rta.yaml",
        include_str!("../../../pipelines/live/rta.yaml"),
    ),
    (
        DEMO_CALL,
        include_str!("../../../pipelines/recordings/acme-discovery-call.jsonl"),
    ),
    (
        "pipelines/recordings/billing-dispute-call.jsonl",
        include_str!("../../../pipelines/recordings/billing-dispute-call.jsonl"),
    ),
    (
        "pipelines/recordings/globex-renewal-call.jsonl",
        include_str!("../../../pipelines/recordings/globex-renewal-call.jsonl"),
    ),
    (
        "pipelines/recordings/initech-demo-call.jsonl",
        include_str!("../../../pipelines/recordings/initech-demo-call.jsonl"),
    ),
];

/// The bundled file at `rel` (from [`FILES`] or [`LOAD_FILES`]).
pub fn file(rel: &str) -> Option<&'static str> {
    FILES
        .iter()
        .chain(LOAD_FILES)
        .find(|(p, _)| *p == rel)
        .map(|(_, text)| *text)
}

/// Writes the bundled file at `rel` under `dir` (folders included); returns its path.
///
/// # Errors
/// When the bundle has no such file (`NotFound`) or it cannot be written.
pub fn write(dir: &Path, rel: &str) -> std::io::Result<PathBuf> {
    let text = file(rel).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("`{rel}` is not in the bundle"),
        )
    })?;
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Writes the bundle under `dir`; returns the engine config's path.
///
/// # Errors
/// When a file cannot be written.
pub fn extract(dir: &Path) -> std::io::Result<PathBuf> {
    for (rel, text) in FILES {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
    }
    Ok(dir.join("prompter.yaml"))
}
