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
