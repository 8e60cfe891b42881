//! Property tests of the configuration loader: the shipped engine config and pipelines, mutated
//! line by line (lines dropped, doubled, re-indented, swapped, a token replaced, characters
//! inserted), always load or fail with diagnostics that name a file and a position inside it.
//! Never a panic.

use std::path::Path;

use prompter_engine::config::{self, LoadRequest};
use prompter_engine::registry;
use proptest::prelude::*;

use crate::cli::{at, root};

/// What is done to one line.
#[derive(Debug, Clone)]
enum Edit {
    Drop,
    Double,
    Indent(usize),
    Dedent,
    SwapWithNext,
    /// Replace the token at this char position with this text.
    Token(usize, String),
    /// Insert this text at this char position.
    Insert(usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    let junk = prop_oneof![
        Just(String::new()),
        Just(":".to_owned()),
        Just("- ".to_owned()),
        Just("{".to_owned()),
        Just("[".to_owned()),
        Just("\"".to_owned()),
        Just("'".to_owned()),
        Just("&a".to_owned()),
        Just("*a".to_owned()),
        Just("!!int".to_owned()),
        Just("${UNSET_VARIABLE}".to_owned()),
        Just("{{ stages.".to_owned()),
        Just("{% for".to_owned()),
        Just("~".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("-1".to_owned()),
        Just("wasm".to_owned()),
        Just("\t".to_owned()),
        "\\PC{0,8}",
    ];
    prop_oneof![
        Just(Edit::Drop),
        Just(Edit::Double),
        (1usize..6).prop_map(Edit::Indent),
        Just(Edit::Dedent),
        Just(Edit::SwapWithNext),
        (0usize..60, junk.clone()).prop_map(|(c, s)| Edit::Token(c, s)),
        (0usize..60, junk).prop_map(|(c, s)| Edit::Insert(c, s)),
    ]
}

fn byte_at(line: &str, chars: usize) -> usize {
    line.char_indices()
        .nth(chars)
        .map_or(line.len(), |(i, _)| i)
}

fn apply(text: &str, edits: &[(proptest::sample::Index, Edit)]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for (which, e) in edits {
        if lines.is_empty() {
            break;
        }
        let i = which.index(lines.len());
        match e {
            Edit::Drop => {
                lines.remove(i);
            }
            Edit::Double => lines.insert(i, lines[i].clone()),
            Edit::Indent(n) => lines[i].insert_str(0, &" ".repeat(*n)),
            Edit::Dedent => lines[i] = lines[i].trim_start().to_owned(),
            Edit::SwapWithNext if i + 1 < lines.len() => lines.swap(i, i + 1),
            Edit::SwapWithNext => {}
            Edit::Token(c, s) => {
                let l = &lines[i];
                let start = byte_at(l, *c);
                let end = l[start..]
                    .find(|ch: char| ch.is_whitespace() || ch == ':')
                    .map_or(l.len(), |n| start + n.max(1).min(l.len() - start));
                lines[i] = format!("{}{s}{}", &l[..start], &l[end..]);
            }
            Edit::Insert(c, s) => {
                let b = byte_at(&lines[i], *c);
                lines[i].insert_str(b, s);
            }
        }
    }
    lines.join("\n") + "\n"
}

/// Loads `engine` (with `pipeline` beside it) in `dir`; a failure must say where.
fn load(dir: &Path, engine: &str, pipeline: &str) -> Result<(), TestCaseError> {
    std::fs::write(dir.join("prompter.yaml"), engine).unwrap();
    std::fs::write(dir.join("rta.yaml"), pipeline).unwrap();
    let config = dir.join("prompter.yaml");
    let env = |name: &str| (name == "PROMPTER_LLM").then(|| "offline".to_owned());
    let req = LoadRequest {
        config: Some(&config),
        files: &[],
        include_config_pipelines: true,
        env: &env,
        metrics: None,
    };
    if let Err(diags) = config::load(&req, &registry::builtin()) {
        prop_assert!(!diags.is_empty());
        let rendered = diags.render();
        prop_assert!(!rendered.trim().is_empty());
        for d in diags.items() {
            let name = d.file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let text = match name {
                "prompter.yaml" => engine,
                "rta.yaml" => pipeline,
                // A file the config names (the CSV, a module): reported by path.
                _ => continue,
            };
            if let Some(pos) = d.pos {
                // Positions are 1-based and inside the file (one past the end for "missing").
                prop_assert!(
                    pos.line >= 1 && pos.line <= text.lines().count() + 1,
                    "{rendered}"
                );
                prop_assert!(pos.col >= 1, "{rendered}");
            }
        }
    }
    Ok(())
}

/// The engine config and pipeline to mutate; the knowledge base is copied into `dir`, so the
/// text (and every case) is the same wherever the checkout is.
fn shipped(dir: &Path) -> (String, String) {
    std::fs::copy(
        at("pipelines/data/sales_objections.csv"),
        dir.join("sales.csv"),
    )
    .unwrap();
    let engine = "pipelines:\n  - rta.yaml\nknowledge:\n  sales:\n    store: embedded\n    config:\n      source: sales.csv\n      index: index.json\nllm:\n  offline:\n    provider: offline\nengine:\n  conversation_idle_secs: 1800\n  queue_capacity: 64\n".to_owned();
    let pipeline = std::fs::read_to_string(root().join("pipelines/rta.yaml")).unwrap();
    (engine, pipeline)
}

proptest! {
    #![proptest_config(ProptestConfig {
            cases: 256,
            // The same cases on every machine: CI never meets a case nobody ran here.
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5EED),
            ..ProptestConfig::default()
        })]

    #[test]
    fn mutated_pipelines_load_or_say_where(
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), edit()), 1..5)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (engine, pipeline) = shipped(dir.path());
        load(dir.path(), &engine, &apply(&pipeline, &edits))?;
    }

    #[test]
    fn mutated_engine_configs_load_or_say_where(
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), edit()), 1..5)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (engine, pipeline) = shipped(dir.path());
        load(dir.path(), &apply(&engine, &edits), &pipeline)?;
    }
}

#[test]
fn the_unmutated_files_load() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, pipeline) = shipped(dir.path());
    std::fs::write(dir.path().join("prompter.yaml"), &engine).unwrap();
    std::fs::write(dir.path().join("rta.yaml"), &pipeline).unwrap();
    let config = dir.path().join("prompter.yaml");
    let env = |_: &str| None;
    let req = LoadRequest {
        config: Some(&config),
        files: &[],
        include_config_pipelines: true,
        env: &env,
        metrics: None,
    };
    let loaded =
        config::load(&req, &registry::builtin()).unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(loaded.pipelines.len(), 1);
}
