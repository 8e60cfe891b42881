//! Wasm stage keys in real pipeline files: `limits.transcript_lines` validates and bounds what
//! the plugin receives; `allow_knowledge` / `allow_llm` name resources of the engine config.

use std::path::Path;

use prompter_core::output::Output;

use crate::cli::{at, prompter};
use crate::wasm::module;

/// An engine config with the `sales` store and the `offline` provider, listing `pipeline`.
fn workspace(pipeline: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), pipeline).unwrap();
    let cfg = format!(
        "pipelines: [p.yaml]\nknowledge:\n  sales:\n    store: embedded\n    config:\n      source: \"{}\"\nllm:\n  offline:\n    provider: offline\n",
        at("pipelines/data/sales_objections.csv")
    );
    std::fs::write(dir.path().join("prompter.yaml"), cfg).unwrap();
    dir
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// The echo plugin (returns `lines`, the transcript length it received) then a card with it.
fn echo_pipeline(stage_keys: &str) -> String {
    format!(
        "pipeline: lines\non: [message_response]\nstages:\n  - id: echo\n    plugin: wasm\n    module: \"{}\"\n    timeout_ms: 1000\n{stage_keys}  - id: card\n    plugin: notify\n    config:\n      kind: lines\n      text: \"{{{{ stages.echo.lines }}}}\"\n",
        module("echo_plugin").display()
    )
}

#[test]
fn transcript_lines_validates_and_bounds_the_lines_a_call_receives() {
    // The README's example line, with fewer lines than the recording has messages.
    let dir = workspace(&echo_pipeline(
        "    limits: { max_memory_mb: 32, max_output_kb: 256, recycle_after_calls: 10000, transcript_lines: 2 }\n",
    ));
    let config = path(dir.path(), "prompter.yaml");
    let r = prompter(&["validate", &config]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    let r = prompter(&[
        "replay",
        "--config",
        &config,
        &at("pipelines/recordings/billing-dispute-call.jsonl"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<u64> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str::<Output>(l).unwrap())
        .map(|o| o.text.parse().unwrap())
        .collect();
    // Every message adds a transcript line, so without the limit the later calls would get
    // many more than two.
    assert!(lines.len() > 4, "{lines:?}");
    assert_eq!(lines.iter().max(), Some(&2), "{lines:?}");
    assert_eq!(lines.last(), Some(&2), "{lines:?}");
}

#[test]
fn declared_grants_validate() {
    let dir = workspace(&echo_pipeline(
        "    allow_knowledge: [sales]\n    allow_llm: [offline]\n",
    ));
    let r = prompter(&["validate", &path(dir.path(), "prompter.yaml")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn unknown_grants_are_reported_at_their_position_with_a_hint() {
    let pipeline = echo_pipeline(
        "    allow_knowledge: [sales, sale]\n    allow_llm:\n      - nebula\n      - offlin\n",
    );
    let dir = workspace(&pipeline);
    let r = prompter(&["validate", &path(dir.path(), "prompter.yaml")]);
    assert_ne!(r.code, 0);
    let f = path(dir.path(), "p.yaml");
    let line_of = |needle: &str| pipeline.lines().position(|l| l.contains(needle)).unwrap() + 1;
    for expected in [
        format!(
            "{f}:{}:30: error: unknown knowledge store `sale`",
            line_of("allow_knowledge")
        ),
        "= help: did you mean `sales`?".to_owned(),
        format!(
            "{f}:{}:9: error: unknown llm provider `nebula`",
            line_of("- nebula")
        ),
        "= help: declared in the engine config's `llm:`: `offline`".to_owned(),
        format!(
            "{f}:{}:9: error: unknown llm provider `offlin`",
            line_of("- offlin")
        ),
        "= help: did you mean `offline`?".to_owned(),
        "error: 3 problem(s) found".to_owned(),
    ] {
        assert!(
            r.stderr.contains(&expected),
            "no `{expected}` in:\n{}",
            r.stderr
        );
    }
}

#[test]
fn grants_are_only_for_wasm_stages() {
    let dir = workspace(
        "pipeline: p\non: [message_response]\nstages:\n  - id: card\n    plugin: notify\n    allow_llm: [offline]\n    config: { kind: x, text: y }\n",
    );
    let r = prompter(&["validate", &path(dir.path(), "prompter.yaml")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("error: `allow_llm` is only for `plugin: wasm` stages"),
        "{}",
        r.stderr
    );
}
