//! `prompter plugin new` (scaffold a plugin crate) and `prompter plugin test` (run a component
//! over a recording and print what it produced).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use prompter_core::book::LocalHost;
use prompter_core::conversation::ConversationState;
use prompter_core::output::{event_part, output_id};
use prompter_core::plugin::{Flow, Plugin, Resources, Run, RunScope, StageContext};

use crate::cli::{Stream, read_recordings, say};
use prompter_engine::config::diagnostics::Diagnostics;
use prompter_engine::config::wasm::node_to_json;
use prompter_engine::config::yaml;
use prompter_engine::recording;
use prompter_engine::wasm::{Limits, WasmPlugin, WasmSpec};

/// Options of `prompter plugin test`.
#[derive(Debug, clap::Args)]
pub struct TestOptions {
    /// The component (`.wasm`, built for wasm32-wasip2).
    pub module: PathBuf,
    /// YAML file with the plugin's config (a stage's `config:` body).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The recording (JSONL).
    #[arg(long)]
    pub events: PathBuf,
    /// Only these event kinds reach the plugin (repeatable) [default: all].
    #[arg(long)]
    pub on: Vec<String>,
    /// Per-call deadline.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Hosts the plugin may reach over HTTP (repeatable).
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Memory cap per instance.
    #[arg(long, default_value_t = 64)]
    pub max_memory_mb: u64,
}

/// Runs a plugin over a recording; prints one JSON line per call result and per notice.
pub async fn test(opts: TestOptions, out: &Stream, err: &Stream) -> u8 {
    let config_json = match &opts.config {
        None => "{}".to_owned(),
        Some(path) => {
            let mut diags = Diagnostics::default();
            let text = match std::fs::read_to_string(path) {
                Ok(t) => t,
                Err(e) => {
                    say(
                        err,
                        &format!("error: cannot read `{}`: {e}", path.display()),
                    );
                    return 1;
                }
            };
            let value = if text.trim().is_empty() {
                Some(serde_json::json!({}))
            } else {
                yaml::parse(path, &text, &mut diags).map(|n| node_to_json(&n))
            };
            match value {
                Some(v) if diags.is_empty() => v.to_string(),
                _ => {
                    say(err, diags.render().trim_end());
                    return 1;
                }
            }
        }
    };
    let spec = WasmSpec {
        metrics: Default::default(),
        stage: opts
            .module
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into()),
        module: opts.module.clone(),
        config_json,
        allow_hosts: opts.allow_hosts.clone(),
        limits: Limits {
            max_memory_mb: opts.max_memory_mb,
            ..Limits::default()
        },
        timeout: Duration::from_millis(opts.timeout_ms.max(1)),
        resources: Resources::default(),
    };
    let plugin = match WasmPlugin::build(spec).await {
        Ok(p) => p,
        Err(e) => {
            let field = e
                .field
                .map(|f| format!(" (field `{f}`)"))
                .unwrap_or_default();
            say(err, &format!("error: {}{field}", e.message));
            return 1;
        }
    };
    let paths = vec![opts.events.clone()];
    let Some((lines, _)) = read_recordings(&paths, err) else {
        return 1;
    };
    // Notices are printed right after the call that raised them, so the output reads in order.
    let mut states: HashMap<String, ConversationState> = HashMap::new();
    let mut hosts: HashMap<String, LocalHost> = HashMap::new();
    let mut run_id = 0u64;
    let (mut calls, mut failures) = (0u64, 0u64);
    for line in &lines {
        let events = match recording::events(line, &opts.events) {
            Ok(e) => e,
            Err(p) => {
                say(err, &format!("warning: {p}"));
                continue;
            }
        };
        for event in events {
            let state = states
                .entry(line.conversation.to_string())
                .or_insert_with(|| ConversationState::new(&line.conversation));
            state.apply(&event);
            if !opts.on.is_empty() && !opts.on.iter().any(|k| k == event.kind.as_str()) {
                continue;
            }
            let host = hosts.entry(line.conversation.to_string()).or_default();
            run_id += 1;
            let out_id = output_id(
                &event.conversation_id,
                "plugin-test",
                &event_part(event.identity()),
            );
            let run = Run::new(run_id, out_id);
            let scope = RunScope::new(Arc::new(event.clone()), Arc::new(state.clone()));
            let cx = StageContext::alone("plugin-test", "plugin", &scope, &run, host);
            calls += 1;
            let t0 = Instant::now();
            let result = plugin.process(&cx).await;
            let us = t0.elapsed().as_micros() as u64;
            let head = serde_json::json!({"line": line.line, "conversation": line.conversation, "offset_ms": event.offset_ms, "event": event.kind.as_str(), "us": us});
            let mut obj = head.as_object().cloned().unwrap_or_default();
            match result {
                Ok(Flow::Continue(v)) => {
                    obj.insert("type".into(), "continue".into());
                    obj.insert("value".into(), v);
                }
                Ok(Flow::Output(o)) => {
                    obj.insert("type".into(), "continue".into());
                    obj.insert("value".into(), o.into_value());
                }
                Ok(Flow::Halt(reason)) => {
                    obj.insert("type".into(), "halt".into());
                    obj.insert("reason".into(), reason.into());
                }
                Err(e) => {
                    failures += 1;
                    obj.insert("type".into(), "error".into());
                    obj.insert("kind".into(), e.kind.to_string().into());
                    obj.insert("error".into(), e.message.into());
                }
            }
            if let Ok(text) = serde_json::to_string(&obj) {
                say(out, &text);
            }
            for o in host.take() {
                if let Ok(line) =
                    serde_json::to_string(&serde_json::json!({"type": "output", "output": o}))
                {
                    say(out, &line);
                }
            }
        }
    }
    for conv in states.keys() {
        plugin.conversation_ended(conv);
    }
    let m = &plugin.metrics;
    let n = m.calls.get().max(1);
    let errors: Vec<String> = m
        .errors()
        .into_iter()
        .map(|(c, n)| format!("{c}={n}"))
        .collect();
    say(
        err,
        &format!(
            "{} call(s), {failures} error(s){}, {} denied host call(s); mean {:.1} us, max {:.1} us per call; {} instance(s) created",
            calls,
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join(", "))
            },
            m.denied.get(),
            m.total_ns.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0,
            m.max_ns.load(Ordering::Relaxed) as f64 / 1000.0,
            m.instances.get()
        ),
    );
    0
}

/// The SDK next to this binary's sources, when the binary was built from a checkout.
pub fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk")
}

/// Scaffolds a plugin crate `name` under `parent`.
pub fn new(name: &str, parent: &Path, sdk: &Path, out: &Stream, err: &Stream) -> u8 {
    let valid = !name.is_empty()
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !valid {
        say(
            err,
            &format!(
                "error: `{name}` is not a valid crate name (lowercase letters, digits, `-` and `_`, starting with a letter)"
            ),
        );
        return 2;
    }
    let dir = parent.join(name);
    if dir.exists() {
        say(
            err,
            &format!(
                "error: `{}` already exists; choose another name or folder",
                dir.display()
            ),
        );
        return 1;
    }
    let sdk = match sdk.canonicalize() {
        Ok(p) if p.join("Cargo.toml").exists() => p,
        _ => {
            say(
                err,
                &format!(
                    "error: the SDK was not found at `{}` (pass --sdk PATH to the checkout's sdk/ folder)",
                    sdk.display()
                ),
            );
            return 1;
        }
    };
    let lib = name.replace('-', "_");
    let files: Vec<(PathBuf, String)> = vec![
        (
            dir.join("Cargo.toml"),
            CARGO_TOML
                .replace("{name}", name)
                .replace("{sdk}", &sdk.to_string_lossy()),
        ),
        (dir.join("src/lib.rs"), LIB_RS.to_owned()),
        (dir.join("config.yaml"), CONFIG_YAML.to_owned()),
        (dir.join("events.jsonl"), EVENTS_JSONL.to_owned()),
        (
            dir.join("README.md"),
            README_MD.replace("{name}", name).replace("{lib}", &lib),
        ),
        (dir.join(".gitignore"), "/target\n".to_owned()),
    ];
    for (path, text) in &files {
        if let Some(p) = path.parent()
            && let Err(e) = std::fs::create_dir_all(p)
        {
            say(err, &format!("error: cannot create `{}`: {e}", p.display()));
            return 1;
        }
        if let Err(e) = std::fs::write(path, text) {
            say(
                err,
                &format!("error: cannot write `{}`: {e}", path.display()),
            );
            return 1;
        }
    }
    // Build with the versions the SDK is tested with.
    let _ = std::fs::copy(sdk.join("Cargo.lock"), dir.join("Cargo.lock"));
    say(
        out,
        &format!("created plugin crate `{name}` in {}", dir.display()),
    );
    say(out, "next:");
    say(out, &format!("  cd {}", dir.display()));
    say(
        out,
        "  cargo test                                         # the plugin's own tests, natively",
    );
    say(
        out,
        "  cargo build --release --target wasm32-wasip2       # the component",
    );
    say(
        out,
        &format!(
            "  prompter plugin test target/wasm32-wasip2/release/{lib}.wasm --config config.yaml --events events.jsonl"
        ),
    );
    0
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

[lib]
crate-type = ["cdylib", "rlib"]

[dependencies]
prompter-sdk = { path = "{sdk}" }
serde = { version = "1", features = ["derive"] }
serde_json = "1"

[profile.release]
opt-level = "s"
lto = true
strip = true

# A standalone crate, not a member of any enclosing workspace.
[workspace]
"#;

const LIB_RS: &str = r#"//! A Prompter stage plugin: raises an alert when the customer says one of the configured
//! keywords (once per keyword and conversation).
//!
//! Build: `cargo build --release --target wasm32-wasip2`

use prompter_sdk::prelude::*;
use serde::Deserialize;
use serde_json::json;

/// The stage's `config:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Words or phrases to watch for (case-insensitive).
    pub keywords: Vec<String>,
    /// A speaker whose name or user id contains this is the agent (not watched).
    #[serde(default = "default_agent_pattern")]
    pub agent_pattern: String,
}

fn default_agent_pattern() -> String {
    "@".to_owned()
}

/// The plugin.
pub struct KeywordAlert {
    config: Config,
}

impl Plugin for KeywordAlert {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if config.keywords.is_empty() {
            return Err(Error::config_at("keywords", "list at least one keyword"));
        }
        Ok(KeywordAlert { config })
    }

    fn process(&mut self, event: &Event, _conversation: &Conversation) -> Result<Outcome, Error> {
        let Some(message) = event.message() else { return Ok(Outcome::next(json!({"matched": []}))) };
        if message.speaker.matches(&self.config.agent_pattern) {
            return Ok(Outcome::next(json!({"matched": []})));
        }
        let text = message.text.to_lowercase();
        let mut outcome_matches = Vec::new();
        let mut notices = Vec::new();
        for keyword in &self.config.keywords {
            if text.contains(&keyword.to_lowercase()) {
                outcome_matches.push(keyword.clone());
                // Per-conversation state lives in kv, kept by the engine (instances are pooled).
                let key = format!("alerted:{keyword}");
                if kv::get(&key).is_none() {
                    let _ = kv::set(&key, "1");
                    notices.push(Notice::alert(
                        format!("Customer said \"{keyword}\""),
                        format!("{}: {}", message.speaker.label(), message.text),
                    ));
                }
            }
        }
        let mut outcome = Outcome::next(json!({ "matched": outcome_matches }));
        for n in notices {
            outcome = outcome.notify(n);
        }
        Ok(outcome)
    }
}

export_plugin!(KeywordAlert);

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_sdk::testing;

    #[test]
    fn alerts_once_per_keyword_and_ignores_the_agent() {
        testing::reset();
        let mut p: KeywordAlert = testing::init(json!({"keywords": ["cancel"]})).unwrap();
        let convo = testing::conversation(vec![]);
        let customer = testing::message_event("c1", 1000, "Sam", Some("+15550100"), "I want to cancel my plan.", None);
        let first = p.process(&customer, &convo).unwrap();
        assert_eq!(first.notices().len(), 1);
        let again = p.process(&customer, &convo).unwrap();
        assert!(again.notices().is_empty(), "one alert per keyword and conversation");
        let agent = testing::message_event("c1", 2000, "Ann", Some("ann@acme.example"), "You can cancel anytime.", None);
        assert!(p.process(&agent, &convo).unwrap().notices().is_empty());
    }

    #[test]
    fn rejects_an_empty_keyword_list() {
        let err = testing::init::<KeywordAlert>(json!({"keywords": []})).err().unwrap();
        assert_eq!(err.field.as_deref(), Some("keywords"));
    }
}
"#;

const CONFIG_YAML: &str = "# The stage's `config:` (what `init` receives).\nkeywords: [cancel, refund]\nagent_pattern: \"@\"\n";

const EVENTS_JSONL: &str = concat!(
    r#"{"conversation": "demo-1", "offset_ms": 1000, "event": {"type": "message_response", "messages": [{"from": {"name": "Ann", "userId": "ann@acme.example"}, "payload": {"content": "Thanks for calling, how can I help?"}}]}}"#,
    "\n",
    r#"{"conversation": "demo-1", "offset_ms": 5000, "event": {"type": "message_response", "messages": [{"from": {"name": "Sam", "userId": "+15550100"}, "payload": {"content": "I want to cancel and get a refund."}}]}}"#,
    "\n",
    r#"{"conversation": "demo-1", "offset_ms": 9000, "event": {"type": "message_response", "messages": [{"from": {"name": "Sam", "userId": "+15550100"}, "payload": {"content": "Really, cancel it."}}]}}"#,
    "\n",
);

const README_MD: &str = r#"# {name}

A Prompter stage plugin (WebAssembly component), scaffolded by `prompter plugin new`.

```sh
cargo test                                            # unit tests, natively
cargo build --release --target wasm32-wasip2          # the component
prompter plugin test target/wasm32-wasip2/release/{lib}.wasm --config config.yaml --events events.jsonl
```

Use it in a pipeline:

```yaml
- id: keywords
  plugin: wasm
  module: path/to/target/wasm32-wasip2/release/{lib}.wasm
  timeout_ms: 50
  config:
    keywords: [cancel, refund]
```
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_bad_names_and_existing_folders() {
        let out: Stream = Arc::new(std::sync::Mutex::new(Box::new(std::io::sink())));
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(new("Bad Name", dir.path(), &default_sdk(), &out, &out), 2);
        std::fs::create_dir(dir.path().join("taken")).expect("mkdir");
        assert_eq!(new("taken", dir.path(), &default_sdk(), &out, &out), 1);
        assert_eq!(
            new("fresh-plugin", dir.path(), &default_sdk(), &out, &out),
            0
        );
        let cargo = std::fs::read_to_string(dir.path().join("fresh-plugin/Cargo.toml"))
            .expect("Cargo.toml");
        assert!(cargo.contains("name = \"fresh-plugin\""));
    }
}
