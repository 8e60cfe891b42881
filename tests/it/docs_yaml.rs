//! Every YAML example in the docs loads through the real config loader, so the docs and the code
//! cannot drift apart.
//!
//! The blocks are every ```` ```yaml ```` fence of README.md and docs/*.md, and of the doc
//! comments (`//!`, `///`) of the engine, plugin and SDK sources. Each is loaded as what its shape
//! says it is:
//! - an engine config (`pipelines:` at the top): on its own, with the pipelines it lists;
//! - an engine config fragment (only engine sections such as `knowledge:` or `symbl:`): as a
//!   further engine config after the shared resources ([`RESOURCES`]);
//! - a pipeline (`pipeline:`, `on:` or `stages:` at the top): with the shared resources, which are
//!   the shipped `prompter.yaml`'s (the `sales` store, the `offline` provider) plus
//!   `prompter-live.yaml`'s Nebula embedder and provider;
//! - stages (`- id: ... plugin: ...`): in a pipeline whose earlier stages carry the ids the
//!   examples refer to ([`PREAMBLE`]);
//! - a stage's `config:` (or its bare keys): as the config of the plugin named just above the
//!   block (`` **`chat`**: ... ``), in the same pipeline.
//!
//! A block that is none of these, or cannot be loaded here, is listed in [`NOT_VALIDATED`] with
//! the reason; one that needs what a test cannot have (an ingested remote index) is loaded with
//! the change listed in [`ADJUSTED`]; one that fails because of a known bug is listed in
//! [`EXPECTED_TO_FAIL`] (empty today) until the fix lands. Any other block that does not load fails the test,
//! and so does a list entry that no longer matches exactly one block (so the lists cannot go
//! stale).

use std::path::{Path, PathBuf};

use marked_yaml::Node;
use prompter_engine::config::{self, LoadRequest};

use crate::cli::root;

/// A block the test does not load, and why.
struct NotValidated {
    /// The file, relative to the workspace root.
    file: &'static str,
    /// Text only that block contains.
    contains: &'static str,
    reason: &'static str,
}

const NOT_VALIDATED: &[NotValidated] = &[
    NotValidated {
        file: "docs/plugins.md",
        contains: "../plugins/keyword_alert.wasm",
        reason: "the module is the reader's own plugin, built earlier in the guide; no such \
                 component exists in this checkout",
    },
    NotValidated {
        file: "sdk/src/lib.rs",
        contains: "../my-plugin/target/wasm32-wasip2/release/my_plugin.wasm",
        reason: "the module is the reader's own plugin from the SDK walkthrough; no such \
                 component exists in this checkout",
    },
];

/// A block that loads only after a change, because it needs something a test cannot have: the
/// change is made to the block's text before loading.
struct Adjusted {
    file: &'static str,
    /// Text only that block contains, replaced by `with`.
    replace: &'static str,
    with: &'static str,
    reason: &'static str,
}

const ADJUSTED: &[Adjusted] = &[Adjusted {
    file: "README.md",
    replace: "      embedder: nebula                              # optional; default: the local lexical one\n",
    with: "",
    reason: "an embedded store with a remote embedder opens only after `prompter kb ingest` has \
             embedded its CSV (which needs Nebula); without `embedder:` it uses the local one",
}];

/// A block that is right as documented but fails today because of a known bug: remove the
/// entry with the fix (the test fails once the block loads, to say so).
struct ExpectedToFail {
    file: &'static str,
    contains: &'static str,
    /// Text the loader's diagnostics must contain.
    error: &'static str,
    reason: &'static str,
}

const EXPECTED_TO_FAIL: &[ExpectedToFail] = &[];

/// Stages ahead of every example stage: the ids the docs' examples refer to (`documents:
/// retrieve`, `transcript_from: redact`, `prompt: render`, `stages.answer.text`). An example
/// stage with one of these ids takes that stage's place.
const PREAMBLE: &[(&str, &str)] = &[
    ("once", "  - { id: once, plugin: dedupe }\n"),
    (
        "retrieve",
        "  - { id: retrieve, plugin: retrieve, config: { knowledge: sales } }\n",
    ),
    (
        "redact",
        "  - id: redact\n    plugin: wasm\n    module: ../../target/wasm/wasm32-wasip2/release/pii_redactor.wasm\n",
    ),
    (
        "prompt",
        "  - { id: prompt, plugin: prompt, config: { documents: retrieve, transcript_from: redact } }\n",
    ),
    (
        "render",
        "  - { id: render, plugin: prompt, config: { documents: retrieve } }\n",
    ),
    (
        "answer",
        "  - { id: answer, plugin: chat, config: { llm: offline, prompt: prompt } }\n",
    ),
];

/// What the docs' examples name that `prompter.yaml` does not declare, as `prompter-live.yaml`
/// declares it. (prompter-live.yaml itself cannot be the base: its `sales` store refuses to open
/// until `prompter kb ingest` has embedded the CSV with Nebula.)
const RESOURCES: &str = "\
embedders:
  nebula: { provider: nebula, config: { api_key: \"${NEBULA_API_KEY}\" } }
llm:
  nebula: { provider: nebula, config: { api_key: \"${NEBULA_API_KEY}\" } }
";

/// The top-level keys of an engine config (the engine's own list, so the two cannot drift).
const ENGINE_SECTIONS: &[&str] = prompter_engine::config::ENGINE_KEYS;

/// One ```` ```yaml ```` block.
struct Block {
    /// The file, relative to the workspace root.
    file: String,
    /// 1-based line of the opening fence.
    line: usize,
    text: String,
    /// The plugin the prose just above names (`**`chat`**`), for bare `config:` blocks.
    plugin: Option<String>,
}

impl Block {
    fn label(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// What a block is, by its shape.
enum Shape {
    EngineConfig,
    EngineFragment,
    Pipeline,
    /// The ids of its stages.
    Stages(Vec<String>),
    /// A `config:` map (`wrapped`) or its bare keys.
    Config {
        wrapped: bool,
    },
    Other(&'static str),
}

fn shape(node: &Node) -> Shape {
    if let Some(seq) = node.as_sequence() {
        let ids: Option<Vec<String>> = seq
            .iter()
            .map(|item| {
                let m = item.as_mapping()?;
                m.get_node("plugin")?;
                Some(m.get_node("id")?.as_scalar()?.as_str().to_owned())
            })
            .collect();
        return match ids {
            Some(ids) if !ids.is_empty() => Shape::Stages(ids),
            _ => Shape::Other("a list whose items are not `- id: ... plugin: ...` stages"),
        };
    }
    let Some(map) = node.as_mapping() else {
        return Shape::Other("neither a map nor a list");
    };
    let keys: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
    if keys.contains(&"pipelines") {
        Shape::EngineConfig
    } else if keys
        .iter()
        .any(|k| ["pipeline", "on", "stages"].contains(k))
    {
        Shape::Pipeline
    } else if !keys.is_empty() && keys.iter().all(|k| ENGINE_SECTIONS.contains(k)) {
        Shape::EngineFragment
    } else if keys == ["config"] {
        Shape::Config { wrapped: true }
    } else {
        Shape::Config { wrapped: false }
    }
}

/// The ```` ```yaml ```` blocks of `lines` (1-based line, text; `None` for a line outside any
/// doc comment, which ends an open block).
fn fenced(file: &str, lines: &[(usize, Option<&str>)]) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    let mut other_fence = false;
    let mut plugin: Option<String> = None;
    for &(no, line) in lines {
        let Some(line) = line else {
            open = None;
            continue;
        };
        let fence = line.trim();
        if let Some(mut block) = open.take() {
            if fence == "```" {
                blocks.push(block);
            } else {
                block.text.push_str(line);
                block.text.push('\n');
                open = Some(block);
            }
        } else if fence == "```yaml" && !other_fence {
            open = Some(Block {
                file: file.to_owned(),
                line: no,
                text: String::new(),
                plugin: plugin.clone(),
            });
        } else if fence.starts_with("```") {
            other_fence = !other_fence;
        } else if !other_fence {
            if line.starts_with('#') {
                plugin = None;
            }
            // The last `**`name`**` of the prose names the plugin a bare config belongs to.
            if let Some((_, rest)) = line.rsplit_once("**`")
                && let Some((name, _)) = rest.split_once("`**")
            {
                plugin = Some(name.to_owned());
            }
        }
    }
    blocks
}

fn markdown_blocks(rel: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    let lines: Vec<(usize, Option<&str>)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, Some(l)))
        .collect();
    fenced(rel, &lines)
}

fn rust_doc_blocks(rel: &str) -> Vec<Block> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    let lines: Vec<(usize, Option<&str>)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let t = l.trim_start();
            let doc = t.strip_prefix("//!").or_else(|| t.strip_prefix("///"));
            (i + 1, doc.map(|d| d.strip_prefix(' ').unwrap_or(d)))
        })
        .collect();
    fenced(rel, &lines)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Every block of README.md, docs/*.md and the engine, plugin and SDK sources, in file order.
fn all_blocks() -> Vec<Block> {
    let root = root();
    let mut blocks = markdown_blocks("README.md");
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    let mut sources = Vec::new();
    for dir in ["engine", "plugins"] {
        for krate in std::fs::read_dir(root.join(dir)).unwrap() {
            rust_files(&krate.unwrap().path().join("src"), &mut sources);
        }
    }
    rust_files(&root.join("sdk/src"), &mut sources);
    docs.sort();
    sources.sort();
    let rel = |p: &Path| {
        p.strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    for d in &docs {
        blocks.extend(markdown_blocks(&rel(d)));
    }
    for s in &sources {
        blocks.extend(rust_doc_blocks(&rel(s)));
    }
    blocks
}

/// Where the examples are written: `pipelines/` and `target/` link to the checkout's, so paths
/// relative to an engine config (here) or a pipeline (two folders down) mean what they say.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        for name in ["pipelines", "target"] {
            std::os::unix::fs::symlink(root().join(name), dir.path().join(name)).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("docs/examples")).unwrap();
        std::fs::write(dir.path().join("resources.yaml"), RESOURCES).unwrap();
        Sandbox { dir }
    }

    fn env(name: &str) -> Option<String> {
        match name {
            "NEBULA_API_KEY" => Some("doc-example-key".into()),
            "OPENAI_API_KEY" => Some("doc-example-key".into()),
            "MONGODB_URI" => Some("mongodb://127.0.0.1:27017/".into()),
            _ => None,
        }
    }

    /// Loads `files` after the shared resources; the rendered diagnostics on failure.
    fn load_with_resources(&self, files: &[PathBuf]) -> Result<(), String> {
        let mut all = vec![self.dir.path().join("resources.yaml")];
        all.extend_from_slice(files);
        self.load(Some(&root().join("prompter.yaml")), &all)
    }

    /// Loads `files` (after the engine config `config`); the rendered diagnostics on failure.
    fn load(&self, config: Option<&Path>, files: &[PathBuf]) -> Result<(), String> {
        let env = Sandbox::env;
        let req = LoadRequest {
            config,
            files,
            include_config_pipelines: false,
            env: &env,
            metrics: None,
        };
        config::load(&req, &prompter_engine::registry::builtin())
            .map(|_| ())
            .map_err(|d| d.render())
    }

    fn write(&self, rel: String, text: &str) -> PathBuf {
        let path = self.dir.path().join(rel);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Loads one block as what its shape says; `Err` carries what went wrong.
    fn validate(&self, block: &Block, n: usize) -> Result<&'static str, String> {
        let node = parse(&block.text).map_err(|e| format!("not YAML: {e}"))?;
        let example = format!("docs/examples/example{n}.yaml");
        match shape(&node) {
            Shape::EngineConfig => {
                let file = self.write(format!("example{n}.yaml"), &block.text);
                self.load(None, &[file]).map(|()| "an engine config")
            }
            Shape::EngineFragment => {
                let file = self.write(format!("example{n}.yaml"), &block.text);
                self.load_with_resources(&[file])
                    .map(|()| "an engine config fragment")
            }
            Shape::Pipeline => {
                let file = self.write(example, &block.text);
                self.load_with_resources(&[file]).map(|()| "a pipeline")
            }
            Shape::Stages(ids) => {
                let pipeline = wrap(&ids, &indent(&block.text, 2));
                let file = self.write(example, &pipeline);
                self.load_with_resources(&[file])
                    .map(|()| "stages")
                    .map_err(|e| format!("{e}\nin the pipeline:\n{pipeline}"))
            }
            Shape::Config { wrapped } => {
                let Some(plugin) = &block.plugin else {
                    return Err("a stage config, but no **`plugin`** above it says whose".into());
                };
                let id = PREAMBLE
                    .iter()
                    .find(|(_, text)| text.contains(&format!("plugin: {plugin}")))
                    .map_or(plugin.as_str(), |(id, _)| id);
                let config = if wrapped {
                    indent(&block.text, 4)
                } else {
                    format!("    config:\n{}", indent(&block.text, 6))
                };
                let stage = format!("  - id: {id}\n    plugin: {plugin}\n{config}");
                let pipeline = wrap(&[id.to_owned()], &stage);
                let file = self.write(example, &pipeline);
                self.load_with_resources(&[file])
                    .map(|()| "a stage config")
                    .map_err(|e| format!("{e}\nin the pipeline:\n{pipeline}"))
            }
            Shape::Other(what) => Err(format!("not Prompter configuration: {what}")),
        }
    }
}

/// A map or, failing that, a list (of stages).
fn parse(text: &str) -> Result<Node, marked_yaml::LoadError> {
    use marked_yaml::{LoadError, LoaderOptions};
    let strict = || LoaderOptions::default().error_on_duplicate_keys(true);
    match marked_yaml::parse_yaml_with_options(0, text, strict()) {
        Err(LoadError::TopLevelMustBeMapping(_)) => {
            marked_yaml::parse_yaml_with_options(0, text, strict().toplevel_sequence())
        }
        other => other,
    }
}

fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// A pipeline with the [`PREAMBLE`] and `stages` (the YAML of stages with these `ids`): in the
/// place of the preamble stage with the first id, else after the preamble.
fn wrap(ids: &[String], stages: &str) -> String {
    let mut out = String::from("pipeline: doc_example\non: [tracker_response]\nstages:\n");
    let at = PREAMBLE.iter().position(|(id, _)| *id == ids[0]);
    let mut placed = false;
    for (i, (id, text)) in PREAMBLE.iter().enumerate() {
        if Some(i) == at {
            out.push_str(stages);
            placed = true;
        } else if !ids.iter().any(|x| x == id) {
            out.push_str(text);
        }
    }
    if !placed {
        out.push_str(stages);
    }
    out
}

#[test]
fn every_yaml_example_in_the_docs_validates() {
    let mut blocks = all_blocks();
    let sandbox = Sandbox::new();
    let mut problems = Vec::new();
    for a in ADJUSTED {
        let mut hits = blocks
            .iter_mut()
            .filter(|b| b.file == a.file && b.text.contains(a.replace));
        match (hits.next(), hits.next()) {
            (Some(b), None) => b.text = b.text.replace(a.replace, a.with),
            _ => problems.push(format!(
                "ADJUSTED entry in {} does not match exactly 1 block ({})",
                a.file, a.reason
            )),
        }
    }
    let matching = |file: &str, contains: &str| -> Vec<usize> {
        (0..blocks.len())
            .filter(|&i| blocks[i].file == file && blocks[i].text.contains(contains))
            .collect()
    };
    let mut skipped = Vec::new();
    for e in NOT_VALIDATED {
        match matching(e.file, e.contains).as_slice() {
            [i] => skipped.push(*i),
            other => problems.push(format!(
                "NOT_VALIDATED entry `{}` in {} ({}) matches {} blocks, not 1",
                e.contains,
                e.file,
                e.reason,
                other.len()
            )),
        }
    }
    for e in EXPECTED_TO_FAIL {
        let [i] = matching(e.file, e.contains)[..] else {
            problems.push(format!(
                "EXPECTED_TO_FAIL entry `{}` in {} does not match exactly 1 block",
                e.contains, e.file
            ));
            continue;
        };
        skipped.push(i);
        match sandbox.validate(&blocks[i], i) {
            Err(err) if err.contains(e.error) => {}
            Err(err) => problems.push(format!(
                "{}: expected to fail with `{}` ({}), failed with:\n{err}",
                blocks[i].label(),
                e.error,
                e.reason
            )),
            Ok(_) => problems.push(format!(
                "{}: now validates; remove its EXPECTED_TO_FAIL entry ({})",
                blocks[i].label(),
                e.reason
            )),
        }
    }
    let mut validated: Vec<String> = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        if skipped.contains(&i) {
            continue;
        }
        match sandbox.validate(block, i) {
            Ok(what) => validated.push(format!("{} ({what})", block.label())),
            Err(err) => problems.push(format!("{}: {err}\n{}", block.label(), block.text)),
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) with YAML examples in the docs:\n\n{}",
        problems.len(),
        problems.join("\n\n")
    );
    // The extraction works: every kind of block is among those that validated.
    for kind in [
        "(an engine config)",
        "(an engine config fragment)",
        "(a pipeline)",
        "(stages)",
        "(a stage config)",
    ] {
        assert!(
            validated.iter().any(|v| v.ends_with(kind)),
            "no block validated as {kind}: {validated:#?}"
        );
    }
}
