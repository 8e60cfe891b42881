//! The engine config file: pipeline globs, `engine:` settings, `symbl:`, `server:`, and the
//! resources (`embedders:`, `knowledge:`, `llm:`) opened from their typed configs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use marked_yaml::Node;
use marked_yaml::types::MarkedMappingNode;
use prompter_core::diagnostic::did_you_mean;
use prompter_core::plugin::Resources;

use super::diagnostics::{Diagnostics, WithHelp};
use super::yaml::{self, EnvLookup};
use super::yaml::{
    check_keys, deserialize_at, expect_map, expect_scalar, expect_seq, opt_u64, required,
};
use super::{Settings, base_dir, read};
use crate::registry::{Kind, Registry};

/// The top-level sections of an engine config.
pub const ENGINE_KEYS: &[&str] = &[
    "pipelines",
    "embedders",
    "knowledge",
    "llm",
    "symbl",
    "server",
    "feed",
    "sinks",
    "twilio",
    "cluster",
    "engine",
];

/// Reads an engine config; returns the pipeline files it lists.
pub(super) fn engine_config(
    file: &Path,
    node: &Node,
    registry: &Registry,
    settings: &mut Settings,
    resources: &mut Resources,
    diags: &mut Diagnostics,
) -> Vec<PathBuf> {
    let Some(map) = expect_map(file, node, "the engine config", diags) else {
        return Vec::new();
    };
    check_keys(file, map, ENGINE_KEYS, "the engine config", diags);
    let base = base_dir(file);
    let mut files = Vec::new();
    if let Some(list) = map.get_node("pipelines") {
        let items: Vec<&Node> = match list {
            Node::Scalar(_) => vec![list],
            other => expect_seq(file, other, "`pipelines`", diags)
                .map(|s| s.iter().collect())
                .unwrap_or_default(),
        };
        for item in items {
            let Some(pattern) = expect_scalar(file, item, "a `pipelines` entry", diags) else {
                continue;
            };
            let full = base.join(pattern.as_str());
            let full_s = full.to_string_lossy().into_owned();
            match glob::glob(&full_s) {
                Ok(paths) => {
                    let mut matched: Vec<PathBuf> = paths.filter_map(Result::ok).collect();
                    matched.sort();
                    // A folder is not a pipeline file: say so here, where it is named.
                    let folders = matched.iter().filter(|p| p.is_dir()).count();
                    matched.retain(|p| !p.is_dir());
                    if folders > 0 && matched.is_empty() {
                        diags
                            .error_node(
                                file,
                                item,
                                format!(
                                    "`{}` names a folder, not pipeline files",
                                    pattern.as_str()
                                ),
                            )
                            .help(Some(format!(
                                "name the files, or a glob such as `{}/*.yaml`",
                                pattern.as_str().trim_end_matches('/')
                            )));
                    } else if matched.is_empty() {
                        diags.error_node(
                            file,
                            item,
                            format!("`{}` matches no file", pattern.as_str()),
                        );
                    }
                    files.extend(matched);
                }
                Err(e) => {
                    diags.error_node(file, item, format!("bad glob pattern: {e}"));
                }
            }
        }
    }
    if let Some(engine) = map
        .get_node("engine")
        .and_then(|n| expect_map(file, n, "`engine`", diags))
    {
        check_keys(
            file,
            engine,
            &[
                "conversation_idle_secs",
                "queue_capacity",
                "default_stage_timeout_ms",
                "sink_drain_ms",
                "overload",
            ],
            "`engine`",
            diags,
        );
        if let Some(v) = opt_u64(file, engine, "conversation_idle_secs", diags) {
            settings.conversation_idle = Duration::from_secs(v.max(1));
        }
        if let Some(v) = opt_u64(file, engine, "queue_capacity", diags) {
            settings.queue_capacity = usize::try_from(v).unwrap_or(usize::MAX).clamp(1, 1 << 20);
        }
        if let Some(v) = opt_u64(file, engine, "default_stage_timeout_ms", diags) {
            settings.default_stage_timeout = Duration::from_millis(v.max(1));
        }
        if let Some(v) = opt_u64(file, engine, "sink_drain_ms", diags) {
            settings.sink_drain = Duration::from_millis(v);
        }
        if let Some(o) = engine
            .get_node("overload")
            .and_then(|n| expect_map(file, n, "`engine.overload`", diags))
        {
            check_keys(file, o, &["max_runs", "policy"], "`engine.overload`", diags);
            if let Some(v) = opt_u64(file, o, "max_runs", diags) {
                settings.overload.max_runs =
                    usize::try_from(v).unwrap_or(usize::MAX).clamp(1, 1 << 24);
            }
            if let Some(n) = o.get_node("policy")
                && let Some(s) = expect_scalar(file, n, "`policy`", diags)
            {
                settings.overload.policy = match s.as_str() {
                    "backpressure" => super::OverloadPolicy::Backpressure,
                    "shed" => super::OverloadPolicy::Shed,
                    other => {
                        let help = did_you_mean(other, ["backpressure", "shed"])
                            .map(|s| format!("did you mean `{s}`?"))
                            .or_else(|| Some("use `backpressure` or `shed`".into()));
                        diags
                            .error_node(file, n, format!("unknown overload `policy` `{other}`"))
                            .help(help);
                        super::OverloadPolicy::Backpressure
                    }
                };
            }
        }
    }
    if let Some(symbl) = map.get_node("symbl")
        && let Some(cfg) = typed_config::<prompter_symbl::SymblConfig>(file, symbl, diags)
    {
        settings.symbl = Some(cfg);
    }
    if let Some(server) = map.get_node("server")
        && let Some(cfg) = typed_config::<crate::server::ServerConfig>(file, server, diags)
    {
        settings.server = cfg;
    }
    if let Some(feed) = map.get_node("feed")
        && let Some(mut cfg) = typed_config::<crate::feed::http::FeedConfig>(file, feed, diags)
    {
        // The feedback log is relative to the config's folder, like every path in it.
        cfg.feedback_log = cfg.feedback_log.map(|p| base.join(p));
        settings.feed = Some(cfg);
    }
    settings.sinks = super::sinks::sinks(file, map, &base, diags);
    if let Some(node) = map.get_node("twilio")
        && let Some(cfg) = typed_config::<crate::twilio::TwilioConfig>(file, node, diags)
    {
        for (path, problem) in cfg.problems() {
            // The deepest key of the path that is written in the file.
            let mut at = node;
            for key in &path {
                match at.as_mapping().and_then(|m| m.get_node(key)) {
                    Some(n) => at = n,
                    None => break,
                }
            }
            diags.error_node(file, at, format!("`twilio.{}`: {problem}", path.join(".")));
        }
        settings.twilio = Some(cfg);
    }
    if let Some(node) = map.get_node("cluster")
        && let Some(cfg) = typed_config::<super::cluster::ClusterConfig>(file, node, diags)
    {
        for (key, problem) in cfg.problems() {
            let at = node
                .as_mapping()
                .and_then(|m| m.get_node(key))
                .unwrap_or(node);
            diags.error_node(file, at, format!("`cluster.{key}`: {problem}"));
        }
        settings.cluster = Some(cfg);
    }
    // Agent actions deliver through declared sinks.
    if let (Some(feed), Some(node)) = (&settings.feed, map.get_node("feed")) {
        for a in &feed.actions {
            if !settings.sinks.iter().any(|s| s.name == a.sink) {
                let declared: Vec<String> = settings
                    .sinks
                    .iter()
                    .map(|s| format!("`{}`", s.name))
                    .collect();
                diags
                    .error_node(
                        file,
                        node,
                        format!(
                            "feed action `{}` sends through sink `{}`, which `sinks:` does not declare",
                            a.name, a.sink
                        ),
                    )
                    .help(Some(if declared.is_empty() {
                        "declare it under `sinks:`".to_owned()
                    } else {
                        format!("declared sinks: {}", declared.join(", "))
                    }));
            }
        }
    }
    // Embedders first: stores name theirs.
    open_embedders(
        file,
        map,
        &base,
        registry,
        resources,
        diags,
        &settings.metrics,
    );
    let section = |key, kind_key, what| Section {
        file,
        map,
        base: &base,
        key,
        kind_key,
        what,
    };
    section("knowledge", "store", "knowledge store").open(
        &registry.stores,
        resources,
        diags,
        |r, name, store| {
            r.knowledge.insert(name, store);
        },
    );
    let metrics = settings.metrics.clone();
    section("llm", "provider", "llm provider").open(
        &registry.providers,
        resources,
        diags,
        |r, name, provider| {
            r.chat
                .insert(name, crate::metered::MeteredChat::wrap(provider, &metrics));
        },
    );
    files
}

/// Opens the engine config's `embedders:`, each behind a cache, counted in `metrics`.
fn open_embedders(
    file: &Path,
    map: &MarkedMappingNode,
    base: &Path,
    registry: &Registry,
    resources: &mut Resources,
    diags: &mut Diagnostics,
    metrics: &crate::metrics::Metrics,
) {
    let section = Section {
        file,
        map,
        base,
        key: "embedders",
        kind_key: "provider",
        what: "embedder",
    };
    section.open(&registry.embedders, resources, diags, |r, name, e| {
        r.embedders
            .insert(name, crate::metered::metered_embedder(e, metrics));
    });
}

/// A resource section of the engine config (`embedders:`, `knowledge:`, `llm:`): named
/// entries, each `{ <kind_key>: KIND, config: {...} }`, opened by the registry's kind.
struct Section<'a> {
    file: &'a Path,
    map: &'a MarkedMappingNode,
    base: &'a Path,
    /// The section's key (`knowledge`).
    key: &'a str,
    /// The key naming an entry's kind (`store`, `provider`).
    kind_key: &'a str,
    /// What an entry is, for messages (`knowledge store`).
    what: &'a str,
}

impl Section<'_> {
    /// Opens every entry with its kind; hands each opened resource to `insert`.
    fn open<T: ?Sized>(
        &self,
        kinds: &[Kind<T>],
        resources: &mut Resources,
        diags: &mut Diagnostics,
        mut insert: impl FnMut(&mut Resources, String, Arc<T>),
    ) {
        let file = self.file;
        let Some(entries) = self
            .map
            .get_node(self.key)
            .and_then(|n| expect_map(file, n, &format!("`{}`", self.key), diags))
        else {
            return;
        };
        for (name, decl) in entries.iter() {
            let unopened = format!("{}/{}", self.key, name.as_str());
            let Some((kind, kind_node, config)) =
                resource_decl(file, decl, self.kind_key, self.what, diags)
            else {
                resources.unopened.insert(unopened);
                continue;
            };
            let Some(factory) = kinds.iter().find(|k| k.name == kind) else {
                unknown_kind(
                    file,
                    kind_node,
                    &format!("{} kind", self.what),
                    &kind,
                    kinds.iter().map(|k| k.name),
                    diags,
                );
                resources.unopened.insert(unopened);
                continue;
            };
            let mut cx = OpenCx {
                name: name.as_str(),
                config,
                base: self.base,
                file,
                diags,
                resources,
                anchor: kind_node,
            };
            match (factory.open)(&mut cx) {
                Some(opened) => insert(resources, name.as_str().to_owned(), opened),
                None => {
                    resources.unopened.insert(unopened);
                }
            }
        }
    }
}

/// One knowledge store's declaration, for commands that fill a store rather than open it
/// (`prompter kb ingest`): opening would refuse a store that is not ingested yet.
pub struct StoreDecl {
    /// The store kind (`embedded`, ...).
    pub kind: String,
    /// Its `config:` node.
    pub config: Node,
    /// The engine config's folder.
    pub base: PathBuf,
    /// The engine config file.
    pub file: PathBuf,
    /// The embedders the config declares (nothing else is opened).
    pub resources: Resources,
}

/// Reads store `name`'s declaration from engine config `file`, opening only the embedders.
///
/// # Errors
/// Problems in the file, an unknown store name (with a hint) or a failing embedder.
pub fn store_decl(
    file: &Path,
    name: &str,
    env: EnvLookup<'_>,
    registry: &Registry,
) -> Result<StoreDecl, Diagnostics> {
    let mut diags = Diagnostics::default();
    let Some(node) = read(file, env, &mut diags) else {
        return Err(diags);
    };
    let Some(map) = expect_map(file, &node, "the engine config", &mut diags) else {
        return Err(diags);
    };
    let (base, resources) = only_embedders(file, map, registry, &mut diags);
    let stores = map.get_node("knowledge").and_then(|n| n.as_mapping());
    let decl = stores.and_then(|m| m.get_node(name));
    let Some(decl) = decl else {
        let names: Vec<&str> = stores
            .map(|m| m.keys().map(|k| k.as_str()).collect())
            .unwrap_or_default();
        let help = did_you_mean(name, names.iter().copied())
            .map(|s| format!("did you mean `{s}`?"))
            .unwrap_or_else(|| {
                if names.is_empty() {
                    "the config declares no `knowledge:` stores".to_owned()
                } else {
                    format!("declared stores: {}", names.join(", "))
                }
            });
        diags
            .error(
                file,
                None,
                format!("no knowledge store `{name}` in this config"),
            )
            .help(Some(help));
        return Err(diags);
    };
    let found = resource_decl(file, decl, "store", "knowledge store", &mut diags)
        .map(|(kind, _, config)| (kind, config.clone()));
    match found {
        Some((kind, config)) if diags.is_empty() => Ok(StoreDecl {
            kind,
            config,
            base,
            file: file.to_path_buf(),
            resources,
        }),
        _ => Err(diags),
    }
}

/// The embedders engine config `file` declares, opened (nothing else is); for commands that
/// compare embedders (`prompter kb eval`).
///
/// # Errors
/// Problems in the file or a failing embedder.
pub fn declared_embedders(
    file: &Path,
    env: EnvLookup<'_>,
    registry: &Registry,
) -> Result<Resources, Diagnostics> {
    let mut diags = Diagnostics::default();
    let Some(node) = read(file, env, &mut diags) else {
        return Err(diags);
    };
    let Some(map) = expect_map(file, &node, "the engine config", &mut diags) else {
        return Err(diags);
    };
    let (_, resources) = only_embedders(file, map, registry, &mut diags);
    if diags.is_empty() {
        Ok(resources)
    } else {
        Err(diags)
    }
}

/// Opens the embedders of config `map` (nothing else) for a command without an engine: their
/// metrics are their own, and unread. Returns the config's folder and the embedders.
fn only_embedders(
    file: &Path,
    map: &MarkedMappingNode,
    registry: &Registry,
    diags: &mut Diagnostics,
) -> (PathBuf, Resources) {
    let base = base_dir(file);
    let mut resources = Resources::default();
    let metrics = crate::metrics::Metrics::new();
    open_embedders(file, map, &base, registry, &mut resources, diags, &metrics);
    (base, resources)
}

/// What opening a named resource (store, provider, embedder) gets.
pub struct OpenCx<'a> {
    /// The resource's name (its key in the engine config).
    pub name: &'a str,
    /// Its `config:` node (an empty map when absent).
    pub config: &'a Node,
    /// The engine config's folder; relative paths resolve against it.
    pub base: &'a Path,
    /// The engine config file, for diagnostics.
    pub file: &'a Path,
    /// Where problems go.
    pub diags: &'a mut Diagnostics,
    /// The resources opened so far (stores find their embedder here).
    pub resources: &'a Resources,
    /// Where to point when the problem has no place of its own (no `config:` at all): the
    /// declaration's kind (`provider: openai`).
    pub anchor: &'a Node,
}

impl OpenCx<'_> {
    /// The typed config, or `None` after reporting why not.
    pub fn typed<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        match marked_yaml::from_node::<T>(self.config) {
            Ok(v) => Some(v),
            Err(e) => {
                let mut problem = prompter_core::plugin::config_problem(e);
                if problem.pos.is_none() && self.config.span().start().is_none() {
                    problem.pos =
                        self.anchor
                            .span()
                            .start()
                            .map(|m| prompter_core::diagnostic::Position {
                                line: m.line(),
                                col: m.column(),
                            });
                    problem.message =
                        format!("`{}`: {} in its `config`", self.name, problem.message);
                }
                yaml::report_build_error(self.file, self.config, &problem, self.diags);
                None
            }
        }
    }

    /// Reports `message` at the config's key `key` (or the whole config when absent).
    pub fn error_at(
        &mut self,
        key: &str,
        message: impl Into<String>,
    ) -> &mut prompter_core::diagnostic::Diagnostic {
        let at = self
            .config
            .as_mapping()
            .and_then(|m| m.get_node(key))
            .unwrap_or(self.config);
        self.diags.error_node(self.file, at, message)
    }
}

/// `{ <kind_key>: NAME, config: {...} }` → (kind, its node, config node).
fn resource_decl<'n>(
    file: &Path,
    decl: &'n Node,
    kind_key: &str,
    what: &str,
    diags: &mut Diagnostics,
) -> Option<(String, &'n Node, &'n Node)> {
    let map = expect_map(file, decl, &format!("a {what}"), diags)?;
    check_keys(
        file,
        map,
        &[kind_key, "config"],
        &format!("a {what}"),
        diags,
    );
    let kind_node = required(file, map, kind_key, &format!("a {what}"), diags)?;
    let kind = expect_scalar(file, kind_node, &format!("`{kind_key}`"), diags)?;
    let config = map.get_node("config").unwrap_or(&EMPTY_MAP);
    Some((kind.as_str().to_owned(), kind_node, config))
}

pub(super) static EMPTY_MAP: std::sync::LazyLock<Node> = std::sync::LazyLock::new(|| {
    Node::Mapping(MarkedMappingNode::new_empty(marked_yaml::Span::new_blank()))
});

fn unknown_kind<'a>(
    file: &Path,
    node: &Node,
    what: &str,
    got: &str,
    names: impl Iterator<Item = &'a str> + Clone,
    diags: &mut Diagnostics,
) {
    let help = did_you_mean(got, names.clone())
        .map(|s| format!("did you mean `{s}`?"))
        .unwrap_or_else(|| {
            format!(
                "available: {}",
                names
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        });
    diags
        .error_node(file, node, format!("unknown {what} `{got}`"))
        .help(Some(help));
}

/// Opens a resource from its typed config, reporting problems with positions.
pub fn typed_config<T: serde::de::DeserializeOwned>(
    file: &Path,
    config: &Node,
    diags: &mut Diagnostics,
) -> Option<T> {
    // An absent `config:` arrives as `EMPTY_MAP`, so all-default configs need none.
    deserialize_at(file, config, diags)
}
