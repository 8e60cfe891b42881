//! The example Wasm plugins inside real pipelines (`prompter-plugins.yaml`).

use prompter_core::output::Output;

use crate::cli::{at, prompter, root};
use crate::wasm::module;

fn outputs(stdout: &str) -> Vec<Output> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad output line {l}: {e}")))
        .collect()
}

#[test]
fn shipped_wasm_pipelines_validate() {
    let r = prompter(&["validate", &at("prompter-plugins.yaml")]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        r.stdout,
        "ok: 1 file(s) valid; pipelines: call_recap, open_questions, rta, compliance, escalation, \
         rta_redacted; knowledge stores: sales; llm providers: offline\n"
    );
}

#[test]
fn the_redactor_keeps_pii_out_of_the_prompt_and_the_rest_intact() {
    // The shipped pipeline, with the prompt the chat stage receives copied into the output.
    let shipped = std::fs::read_to_string(root().join("pipelines/wasm/rta_redacted.yaml")).unwrap();
    let pipeline = shipped
        .replace("../../target/wasm/wasm32-wasip2/release/pii_redactor.wasm", module("pii_redactor").to_str().unwrap())
        .replace(
            "      sources: retrieve\n",
            "      sources: retrieve\n      data:\n        prompt: \"{{ stages.prompt.system_prompt }}\\n{{ stages.prompt.messages | map(attribute='text') | join('\\n') }}\"\n",
        );
    assert!(
        pipeline.contains("data:") && pipeline.contains(module("pii_redactor").to_str().unwrap())
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rta_redacted.yaml"), pipeline).unwrap();
    let cfg = format!(
        "pipelines: [rta_redacted.yaml]\nknowledge:\n  sales:\n    store: embedded\n    config:\n      source: \"{}\"\nllm:\n  offline:\n    provider: offline\n",
        at("pipelines/data/sales_objections.csv")
    );
    std::fs::write(dir.path().join("prompter.yaml"), cfg).unwrap();
    let config = dir.path().join("prompter.yaml");
    let r = prompter(&[
        "replay",
        "--config",
        config.to_str().unwrap(),
        &at("pipelines/recordings/billing-dispute-call.jsonl"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let outs = outputs(&r.stdout);
    assert_eq!(outs.len(), 1, "{outs:?}");
    let prompt = outs[0].data["prompt"].as_str().unwrap();
    for pii in [
        "4111",
        "1111-1111",
        "tom.becker@example.org",
        "415 555 0187",
        "example.org",
    ] {
        assert!(
            !prompt.contains(pii),
            "`{pii}` reached the prompt:\n{prompt}"
        );
    }
    for intact in [
        "Tom Becker: It's [redacted], and you can call me back on [redacted] if this drops.",
        "Tom Becker: The charge was on my card [redacted] and it's too expensive to pay twice.",
        "Tom Becker: I was charged twice this month and nobody answered my last three emails.",
        "Priya Shah: Thanks for calling Acme billing, this is Priya, how can I help?",
        "Acknowledge the constraint",
        "Budget Constraints",
    ] {
        assert!(
            prompt.contains(intact),
            "`{intact}` missing from the prompt:\n{prompt}"
        );
    }
    // The suggestion itself is the retrieved guidance, as without the redactor.
    assert_eq!(
        outs[0].trigger.tracker.as_deref(),
        Some("Budget Constraints")
    );
}

#[test]
fn escalation_and_compliance_plugins_alert_once_each() {
    let r = prompter(&[
        "replay",
        "--config",
        &at("prompter-plugins.yaml"),
        &at("pipelines/recordings/billing-dispute-call.jsonl"),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("0 stage error(s)"), "{}", r.stderr);
    let outs = outputs(&r.stdout);
    let mut alerts: Vec<(&str, u64)> = outs
        .iter()
        .filter(|o| o.kind == "alert")
        .map(|o| (o.pipeline.as_str(), o.trigger.offset_ms))
        .collect();
    // Different pipelines run side by side: their outputs may interleave either way.
    alerts.sort_by_key(|a| a.1);
    assert_eq!(
        alerts,
        [("escalation", 28_000), ("compliance", 35_000)],
        "{outs:#?}"
    );
    let alert = |pipeline: &str| {
        let o = outs.iter().find(|o| o.pipeline == pipeline).unwrap();
        (o.title.as_deref().unwrap(), o.text.as_str())
    };
    assert_eq!(
        alert("escalation"),
        (
            "Escalate: customer frustrated",
            "Tom Becker has been negative for 3 sentences in a row. Consider stepping in.\n\
             > I was charged twice this month and nobody answered my last three emails.\n\
             > It's tom.becker@example.org, and you can call me back on +1 415 555 0187 if this \
             drops.\n\
             > Honestly this is ridiculous, I've been a customer for six years."
        )
    );
    assert_eq!(
        alert("compliance"),
        (
            "Compliance: recording disclosure missing",
            "The agent has not said a required phrase (\"this call is recorded\" or \"this call may \
             be recorded\" or \"this call is being recorded\") within the first 30 s."
        )
    );
}

#[test]
fn a_plugin_rejecting_its_config_is_reported_at_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("compliance.yaml");
    let yaml = format!(
        "pipeline: compliance_bad\non: [message_response]\nstages:\n  - id: disclosure\n    plugin: wasm\n    module: {}\n    config:\n      phrases: [\"ok\", 3]\n",
        module("compliance_checker").display()
    );
    std::fs::write(&file, yaml).unwrap();
    let r = prompter(&[
        "validate",
        "--config",
        &at("prompter.yaml"),
        file.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "");
    let f = file.display().to_string();
    assert_eq!(
        r.stderr,
        format!(
            "{f}:8:23: error: plugin `disclosure` rejected its config: invalid type: integer `3`, \
             expected a string
  |
8 |       phrases: [\"ok\", 3]
  |                       ^
error: 1 problem(s) found
"
        )
    );
}
