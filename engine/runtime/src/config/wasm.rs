//! `plugin: wasm` stages: `module:`, the grants (`allow_hosts:`, `allow_knowledge:`,
//! `allow_llm:`), `limits:` and the `config:` handed to the component's `init` (run in the
//! sandbox at load time, so bad config is reported with its position like any other).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use marked_yaml::Node;
use marked_yaml::types::MarkedMappingNode;
use prompter_core::diagnostic::did_you_mean;
use prompter_core::plugin::{Plugin, Resources};

use super::diagnostics::{Diagnostics, WithHelp};
use super::yaml::{check_keys, expect_map, expect_scalar, expect_seq, locate, opt_u64, required};
use crate::wasm::{Grants, Limits, WasmPlugin, WasmSpec};

/// Keys only `plugin: wasm` stages take.
pub(crate) const WASM_KEYS: &[&str] = &[
    "module",
    "allow_hosts",
    "allow_knowledge",
    "allow_llm",
    "limits",
];

const LIMIT_KEYS: &[&str] = &[
    "max_memory_mb",
    "max_output_kb",
    "recycle_after_calls",
    "recycle_memory_mb",
    "max_idle_instances",
    "transcript_lines",
    "fuel",
];

/// Everything needed to build one wasm stage.
pub(crate) struct WasmStageInput<'a> {
    pub(crate) file: &'a Path,
    pub(crate) stage: &'a MarkedMappingNode,
    pub(crate) config: Option<&'a Node>,
    pub(crate) id: &'a str,
    pub(crate) base: &'a Path,
    pub(crate) resources: &'a Resources,
    pub(crate) timeout: Duration,
    /// Where the stage counts its calls and errors.
    pub(crate) metrics: Arc<crate::wasm::Metrics>,
}

/// Builds a wasm stage, reporting problems at their positions.
pub(crate) fn build(input: WasmStageInput<'_>, diags: &mut Diagnostics) -> Option<Arc<dyn Plugin>> {
    let WasmStageInput {
        file,
        stage,
        config,
        id,
        base,
        resources,
        timeout,
        metrics,
    } = input;
    let before = diags.len();
    let module_node = required(file, stage, "module", "a `plugin: wasm` stage", diags);
    let module = module_node
        .and_then(|n| expect_scalar(file, n, "`module`", diags))
        .map(|s| base.join(s.as_str()));
    let mut allow_hosts = Vec::new();
    if let Some(n) = stage.get_node("allow_hosts") {
        for item in expect_seq(file, n, "`allow_hosts`", diags)
            .into_iter()
            .flat_map(|s| s.iter())
        {
            if let Some(s) = expect_scalar(file, item, "an `allow_hosts` entry", diags) {
                let h = s.as_str().trim();
                if h.is_empty() || h.contains('/') || h.contains("://") {
                    diags.error_node(file, item, format!("`{h}` is not a host name (write `api.example.com`, `host:port` or `*.example.com`)"));
                } else {
                    allow_hosts.push(h.to_owned());
                }
            }
        }
    }
    let grants = Grants {
        knowledge: granted_names(
            file,
            stage,
            Grant {
                key: "allow_knowledge",
                what: "knowledge store",
                section: "knowledge",
            },
            resources.knowledge.keys().map(String::as_str),
            resources,
            diags,
        ),
        llm: granted_names(
            file,
            stage,
            Grant {
                key: "allow_llm",
                what: "llm provider",
                section: "llm",
            },
            resources.chat.keys().map(String::as_str),
            resources,
            diags,
        ),
    };
    let mut limits = Limits::default();
    if let Some(lnode) = stage.get_node("limits")
        && let Some(lmap) = expect_map(file, lnode, "`limits`", diags)
    {
        check_keys(file, lmap, LIMIT_KEYS, "`limits`", diags);
        if let Some(v) = opt_u64(file, lmap, "max_memory_mb", diags) {
            if v == 0 || v > 512 {
                diags.error_node(
                    file,
                    lmap.get_node("max_memory_mb").unwrap_or(lnode),
                    "`max_memory_mb` must be between 1 and 512",
                );
            }
            limits.max_memory_mb = v.clamp(1, 512);
        }
        if let Some(v) = opt_u64(file, lmap, "max_output_kb", diags) {
            limits.max_output_kb = v.max(1);
        }
        if let Some(v) = opt_u64(file, lmap, "recycle_after_calls", diags) {
            limits.recycle_after_calls = v.max(1);
        }
        limits.recycle_memory_mb = opt_u64(file, lmap, "recycle_memory_mb", diags);
        if let Some(v) = opt_u64(file, lmap, "max_idle_instances", diags) {
            limits.max_idle_instances = usize::try_from(v).unwrap_or(64).min(64);
        }
        limits.fuel = opt_u64(file, lmap, "fuel", diags);
        if let Some(v) = opt_u64(file, lmap, "transcript_lines", diags) {
            limits.transcript_lines = usize::try_from(v).unwrap_or(usize::MAX);
        }
    }
    let config_json = config
        .map(node_to_json)
        .unwrap_or_else(|| serde_json::json!({}))
        .to_string();
    let (Some(module), Some(module_node)) = (module, module_node) else {
        return None;
    };
    if diags.len() > before {
        return None;
    }
    if !module.exists() {
        diags
            .error_node(
                file,
                module_node,
                format!("module `{}` not found", module.display()),
            )
            .help(Some(
                "build the plugin first, e.g. `bash scripts/build-plugins.sh` for the SDK examples"
                    .into(),
            ));
        return None;
    }
    let spec = WasmSpec {
        stage: id.to_owned(),
        module,
        config_json,
        allow_hosts,
        limits,
        timeout,
        resources: resources.clone(),
        metrics,
    };
    match block_on(WasmPlugin::build_with_grants(spec, grants)) {
        Ok(Ok(plugin)) => Some(Arc::new(plugin)),
        Ok(Err(e)) => {
            // Point at the field the plugin blamed when it named one, else at `config:` (or the
            // module when the component itself is the problem).
            let pos = match (&e.field, config) {
                (Some(field), Some(cfg)) => {
                    locate(cfg, &field.replace('[', ".").replace(']', ""), "")
                }
                (None, Some(cfg)) if e.message.contains("rejected its config") => {
                    locate(cfg, "", "")
                }
                _ => None,
            };
            let pos = pos.or_else(|| {
                module_node
                    .span()
                    .start()
                    .map(|m| prompter_core::diagnostic::Position {
                        line: m.line(),
                        col: m.column(),
                    })
            });
            diags.error_at(file, pos, e.message);
            None
        }
        Err(msg) => {
            diags.error_node(file, module_node, msg);
            None
        }
    }
}

/// One resource grant key of a wasm stage, for messages.
struct Grant {
    /// The stage key (`allow_knowledge`).
    key: &'static str,
    /// What an entry names (`knowledge store`).
    what: &'static str,
    /// The engine config section declaring them (`knowledge`).
    section: &'static str,
}

/// The names listed under `grant.key`, each checked against what the engine config declares
/// (an unknown name is reported at its position with a "did you mean" hint).
fn granted_names<'a>(
    file: &Path,
    stage: &MarkedMappingNode,
    grant: Grant,
    declared: impl Iterator<Item = &'a str> + Clone,
    resources: &Resources,
    diags: &mut Diagnostics,
) -> Vec<String> {
    let Some(node) = stage.get_node(grant.key) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    let what = format!("an `{}` entry", grant.key);
    for item in expect_seq(file, node, &format!("`{}`", grant.key), diags)
        .into_iter()
        .flat_map(|s| s.iter())
    {
        let Some(s) = expect_scalar(file, item, &what, diags) else {
            continue;
        };
        let name = s.as_str().trim();
        // A declared entry that failed to open is reported where it is declared; do not repeat it.
        if declared.clone().any(|d| d == name) || resources.is_unopened(grant.section, name) {
            names.push(name.to_owned());
            continue;
        }
        let help = match did_you_mean(name, declared.clone()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => {
                let all: Vec<String> = declared.clone().map(|n| format!("`{n}`")).collect();
                if all.is_empty() {
                    format!("the engine config declares no `{}:` entries", grant.section)
                } else {
                    format!(
                        "declared in the engine config's `{}:`: {}",
                        grant.section,
                        all.join(", ")
                    )
                }
            }
        };
        diags
            .error_node(file, item, format!("unknown {} `{name}`", grant.what))
            .help(Some(help));
    }
    names
}

/// Runs a future to completion on a private runtime in a scoped thread, so loading works both
/// inside and outside an async context.
fn block_on<F>(fut: F) -> Result<F::Output, String>
where
    F: std::future::Future + Send,
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(fut))
                .map_err(|e| format!("cannot start a runtime to load the plugin: {e}"))
        })
        .join()
        .unwrap_or_else(|_| Err("loading the plugin panicked".into()))
    })
}

/// YAML to JSON with YAML's plain-scalar typing (numbers, booleans, null); quoted scalars stay
/// strings.
pub fn node_to_json(node: &Node) -> serde_json::Value {
    use serde_json::Value;
    match node {
        Node::Scalar(s) => {
            let text = s.as_str();
            if !s.may_coerce() {
                return Value::String(text.to_owned());
            }
            match text {
                "true" | "True" | "TRUE" => return Value::Bool(true),
                "false" | "False" | "FALSE" => return Value::Bool(false),
                "null" | "Null" | "NULL" | "~" => return Value::Null,
                _ => {}
            }
            if let Ok(i) = text.parse::<i64>() {
                return Value::from(i);
            }
            if let Ok(f) = text.parse::<f64>()
                && f.is_finite()
            {
                return Value::from(f);
            }
            Value::String(text.to_owned())
        }
        Node::Sequence(seq) => Value::Array(seq.iter().map(node_to_json).collect()),
        Node::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().to_owned(), node_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_to_json_types_plain_scalars_only() {
        let mut d = Diagnostics::default();
        let n = super::super::yaml::parse(
            Path::new("f"),
            "a: 3\nb: -0.5\nc: true\nd: \"3\"\ne: [x, ~]\nf: text\n",
            &mut d,
        )
        .unwrap();
        assert_eq!(
            node_to_json(&n),
            serde_json::json!({"a": 3, "b": -0.5, "c": true, "d": "3", "e": ["x", null], "f": "text"})
        );
    }
}
