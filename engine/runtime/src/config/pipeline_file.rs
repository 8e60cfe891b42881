//! A pipeline file: its keys, its filter and run settings, and its stages built by their
//! factories, every problem positioned.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use marked_yaml::Node;
use prompter_core::diagnostic::did_you_mean;
use prompter_core::event::EventKind;
use prompter_core::plugin::{BuildContext, Resources};
use prompter_core::template::{Expr, Template};

use super::diagnostics::{Diagnostics, WithHelp};
use super::yaml;
use super::yaml::{check_keys, expect_map, expect_scalar, expect_seq, opt_u64, required};
use super::{Settings, base_dir, wasm};
use crate::pipeline::{Concurrency, OnError, Pipeline, Priority, Stage};
use crate::registry::Registry;

use super::engine_file::EMPTY_MAP;

const PIPELINE_KEYS: &[&str] = &[
    "pipeline",
    "description",
    "on",
    "when",
    "deadline_ms",
    "concurrency",
    "priority",
    "key",
    "supersede",
    "sinks",
    "stages",
];
const STAGE_KEYS: &[&str] = &[
    "id",
    "plugin",
    "config",
    "timeout_ms",
    "on_error",
    "module",
    "allow_hosts",
    "allow_knowledge",
    "allow_llm",
    "limits",
];

pub(super) fn pipeline(
    file: &Path,
    node: &Node,
    registry: &Registry,
    resources: &Resources,
    settings: &Settings,
    diags: &mut Diagnostics,
) -> Option<Pipeline> {
    let before = diags.len();
    let map = expect_map(file, node, "a pipeline file", diags)?;
    check_keys(file, map, PIPELINE_KEYS, "a pipeline", diags);
    let name = required(file, map, "pipeline", "a pipeline", diags)
        .and_then(|n| expect_scalar(file, n, "`pipeline`", diags))
        .map(|s| s.as_str().to_owned());
    if let (Some(n), Some(node)) = (&name, map.get_node("pipeline"))
        && !valid_id(n)
    {
        diags.error_node(
            file,
            node,
            format!("pipeline name `{n}` must use only a-z, 0-9, `_` and `-`"),
        );
    }
    let description = map
        .get_node("description")
        .and_then(|n| expect_scalar(file, n, "`description`", diags))
        .map(|s| s.as_str().to_owned());

    let mut on = Vec::new();
    if let Some(on_node) = required(file, map, "on", "a pipeline", diags) {
        let items: Vec<&Node> = match on_node {
            Node::Scalar(_) => vec![on_node],
            other => expect_seq(file, other, "`on`", diags)
                .map(|s| s.iter().collect())
                .unwrap_or_default(),
        };
        if items.is_empty() {
            diags.error_node(file, on_node, "`on` must name at least one event kind");
        }
        for item in items {
            let Some(s) = expect_scalar(file, item, "an `on` entry", diags) else {
                continue;
            };
            match EventKind::from_name(s.as_str()) {
                Some(k) => on.push(k),
                None => {
                    let help = did_you_mean(s.as_str(), EventKind::names())
                        .map(|n| format!("did you mean `{n}`?"))
                        .unwrap_or_else(|| {
                            format!(
                                "event kinds: {}",
                                EventKind::names().collect::<Vec<_>>().join(", ")
                            )
                        });
                    diags
                        .error_node(file, item, format!("unknown event kind `{}`", s.as_str()))
                        .help(Some(help));
                }
            }
        }
    }

    let deadline =
        opt_u64(file, map, "deadline_ms", diags).map(|ms| Duration::from_millis(ms.max(1)));

    let concurrency = match map
        .get_node("concurrency")
        .and_then(|n| expect_scalar(file, n, "`concurrency`", diags).map(|s| (n, s)))
    {
        None => Concurrency::Parallel,
        Some((n, s)) => match s.as_str() {
            "parallel" => Concurrency::Parallel,
            "queue" => Concurrency::Queue,
            "latest_wins" => Concurrency::LatestWins,
            other => {
                let help = did_you_mean(other, ["parallel", "queue", "latest_wins"])
                    .map(|s| format!("did you mean `{s}`?"))
                    .or_else(|| Some("use `parallel`, `queue` or `latest_wins`".into()));
                diags
                    .error_node(file, n, format!("unknown `concurrency` `{other}`"))
                    .help(help);
                Concurrency::Parallel
            }
        },
    };
    let priority = match map
        .get_node("priority")
        .and_then(|n| expect_scalar(file, n, "`priority`", diags).map(|s| (n, s)))
    {
        None => Priority::Normal,
        Some((n, s)) => match s.as_str() {
            "low" => Priority::Low,
            "normal" => Priority::Normal,
            "high" => Priority::High,
            other => {
                let help = did_you_mean(other, ["low", "normal", "high"])
                    .map(|s| format!("did you mean `{s}`?"))
                    .or_else(|| Some("use `low`, `normal` or `high`".into()));
                diags
                    .error_node(file, n, format!("unknown `priority` `{other}`"))
                    .help(help);
                Priority::Normal
            }
        },
    };
    let mut run_template = |key: &str| {
        let n = map.get_node(key)?;
        let s = expect_scalar(file, n, &format!("`{key}`"), diags)?;
        match Template::compile(s.as_str()) {
            Ok(t) => {
                if let Some(id) = t.stage_refs().into_iter().next() {
                    diags.error_node(
                        file,
                        n,
                        format!(
                            "`{key}` reads `stages.{id}`, but it is decided before any stage runs"
                        ),
                    );
                }
                Some(t)
            }
            Err(e) => {
                let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
                diags.error_node(
                    file,
                    n,
                    format!("bad `{key}` template: {}{detail}", e.kind()),
                );
                None
            }
        }
    };
    let key = run_template("key");
    let supersede = run_template("supersede");
    if supersede.is_some()
        && concurrency != Concurrency::LatestWins
        && let Some(n) = map.get_node("supersede")
    {
        diags
            .error_node(
                file,
                n,
                "`supersede` only applies with `concurrency: latest_wins`",
            )
            .help(Some(
                "add `concurrency: latest_wins`, or remove `supersede`".into(),
            ));
    }

    // Named sinks this pipeline's outputs go to, each one the engine config declares.
    let mut sinks = Vec::new();
    if let Some(n) = map.get_node("sinks") {
        for item in expect_seq(file, n, "`sinks`", diags)
            .into_iter()
            .flat_map(|s| s.iter())
        {
            let Some(s) = expect_scalar(file, item, "a `sinks` entry", diags) else {
                continue;
            };
            let name = s.as_str().trim();
            if settings.sinks.iter().any(|d| d.name == name) {
                sinks.push(name.to_owned());
                continue;
            }
            let declared = settings.sinks.iter().map(|d| d.name.as_str());
            let hint = did_you_mean(name, declared.clone()).map_or_else(
                || {
                    let all: Vec<String> = declared.map(|d| format!("`{d}`")).collect();
                    if all.is_empty() {
                        "the engine config declares no `sinks:`".to_owned()
                    } else {
                        format!(
                            "declared in the engine config's `sinks:`: {}",
                            all.join(", ")
                        )
                    }
                },
                |s| format!("did you mean `{s}`?"),
            );
            diags
                .error_node(file, item, format!("unknown sink `{name}`"))
                .help(Some(hint));
        }
    }

    let when = map
        .get_node("when")
        .and_then(|n| expect_scalar(file, n, "`when`", diags).map(|s| (n, s)))
        .and_then(|(n, s)| match Expr::compile(s.as_str()) {
            Ok(expr) => {
                for id in expr.stage_refs() {
                    diags.error_node(
                        file,
                        n,
                        format!("`when` reads `stages.{id}`, but it runs before any stage"),
                    );
                }
                Some(expr)
            }
            Err(e) => {
                let detail = e.detail().map(|d| format!(": {d}")).unwrap_or_default();
                diags.error_node(
                    file,
                    n,
                    format!("bad `when` expression: {}{detail}", e.kind()),
                );
                None
            }
        });

    let pipeline_name = name.clone().unwrap_or_default();
    let base = base_dir(file);
    let mut stages: Vec<Stage> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    let mut id_lines: BTreeMap<String, usize> = BTreeMap::new();
    if let Some(stages_node) = required(file, map, "stages", "a pipeline", diags) {
        let list = expect_seq(file, stages_node, "`stages`", diags);
        if list.is_some_and(|l| l.is_empty()) {
            diags.error_node(file, stages_node, "a pipeline needs at least one stage");
        }
        for (i, st) in list.into_iter().flat_map(|l| l.iter()).enumerate() {
            let Some(smap) = expect_map(file, st, "a stage", diags) else {
                continue;
            };
            check_keys(file, smap, STAGE_KEYS, "a stage", diags);
            let id = required(file, smap, "id", "a stage", diags)
                .and_then(|n| expect_scalar(file, n, "`id`", diags).map(|s| (n, s)));
            let id = match id {
                Some((n, s)) => {
                    let id = s.as_str().to_owned();
                    if !valid_stage_id(&id) {
                        diags.error_node(
                            file,
                            n,
                            format!("stage id `{id}` must use only a-z, 0-9 and `_`"),
                        );
                    }
                    let line = n.span().start().map(|m| m.line()).unwrap_or(0);
                    if let Some(first) = id_lines.get(&id) {
                        diags
                            .error_node(file, n, format!("duplicate stage id `{id}`"))
                            .help(Some(format!("first defined at line {first}")));
                    } else {
                        id_lines.insert(id.clone(), line);
                    }
                    id
                }
                None => format!("stage{i}"),
            };
            let timeout = opt_u64(file, smap, "timeout_ms", diags)
                .map(Duration::from_millis)
                .unwrap_or(settings.default_stage_timeout);
            let on_error = match smap
                .get_node("on_error")
                .and_then(|n| expect_scalar(file, n, "`on_error`", diags).map(|s| (n, s)))
            {
                None => OnError::Stop,
                Some((n, s)) => {
                    match s.as_str() {
                        "stop" => OnError::Stop,
                        "continue" => OnError::Continue,
                        other => {
                            let help = did_you_mean(other, ["stop", "continue"])
                                .map(|s| format!("did you mean `{s}`?"));
                            diags.error_node(file, n, format!("unknown `on_error` policy `{other}` (use `stop` or `continue`)")).help(help);
                            OnError::Stop
                        }
                    }
                }
            };
            let plugin_node = required(file, smap, "plugin", "a stage", diags)
                .and_then(|n| expect_scalar(file, n, "`plugin`", diags).map(|s| (n, s)));
            let config_node = smap.get_node("config").unwrap_or(&EMPTY_MAP);
            if let Some(c) = smap.get_node("config") {
                expect_map(file, c, "`config`", diags);
            }
            let is_wasm = plugin_node.is_some_and(|(_, p)| p.as_str() == "wasm");
            if !is_wasm && plugin_node.is_some() {
                for key in wasm::WASM_KEYS {
                    if let Some(k) = smap.keys().find(|k| k.as_str() == *key) {
                        diags.error(
                            file,
                            k.span().start(),
                            format!("`{key}` is only for `plugin: wasm` stages"),
                        );
                    }
                }
            }
            if is_wasm {
                let input = wasm::WasmStageInput {
                    file,
                    stage: smap,
                    config: smap.get_node("config"),
                    id: &id,
                    base: &base,
                    resources,
                    timeout,
                    metrics: Arc::new(settings.metrics.wasm(&pipeline_name, &id)),
                };
                if let Some(plugin) = wasm::build(input, diags) {
                    stages.push(Stage {
                        id: id.clone(),
                        plugin_name: "wasm".into(),
                        plugin,
                        timeout,
                        on_error,
                        metrics: Default::default(),
                        fingerprint: fingerprint(st, &base),
                    });
                }
            } else if let Some((pnode, pname)) = plugin_node {
                match registry.plugin(pname.as_str()) {
                    Some(factory) => {
                        let mut cx = BuildContext::new(&pipeline_name, &id, &base, &ids, resources);
                        let built = factory.build_from_node(config_node, &mut cx);
                        for problem in cx.into_problems() {
                            // Problems inside `config:` get the config's positions; a stage
                            // without `config:` points at its plugin.
                            let anchor = if config_node.span().start().is_some() {
                                config_node
                            } else {
                                pnode
                            };
                            yaml::report_build_error(file, anchor, &problem, diags);
                        }
                        if let Ok(plugin) = built {
                            stages.push(Stage {
                                id: id.clone(),
                                plugin_name: factory.name().to_owned(),
                                plugin,
                                timeout,
                                on_error,
                                metrics: Default::default(),
                                fingerprint: fingerprint(st, &base),
                            });
                        }
                    }
                    None => {
                        let help = did_you_mean(pname.as_str(), registry.plugin_names())
                            .map(|s| format!("did you mean `{s}`?"))
                            .unwrap_or_else(|| {
                                format!(
                                    "built-in plugins: {}",
                                    registry
                                        .plugin_names()
                                        .map(|n| format!("`{n}`"))
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )
                            });
                        diags
                            .error_node(file, pnode, format!("unknown plugin `{}`", pname.as_str()))
                            .help(Some(help));
                    }
                }
            }
            ids.push(id);
        }
    }
    if diags.len() > before {
        return None;
    }
    Some(Pipeline {
        name: name?,
        description,
        file: file.to_path_buf(),
        on,
        when,
        stages: stages.into_iter().map(Arc::new).collect(),
        deadline,
        concurrency,
        priority,
        key,
        supersede,
        sinks,
        metrics: Default::default(),
    })
}

fn valid_stage_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A stage's identity for reloads: its definition (plugin, config, timeout, error policy: the
/// whole stage node, as JSON with sorted keys) and the folder its paths are relative to.
fn fingerprint(stage: &Node, base: &Path) -> u64 {
    let definition = prompter_symbl::identity::canonical_json(&super::wasm::node_to_json(stage));
    // FNV-1a: stable across processes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in definition
        .as_bytes()
        .iter()
        .chain(base.to_string_lossy().as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
