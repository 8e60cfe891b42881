//! Loading and validating configuration: the engine config (`prompter.yaml`) and pipeline files.
//!
//! Loading is one pass that collects *every* problem as a positioned [`Diagnostic`] (syntax,
//! unknown keys, wrong types, unknown plugins, unknown stage ids, unknown event kinds, bad
//! expressions, resources that cannot be opened) and only succeeds when there is none.
//!
//! Engine config:
//! ```yaml
//! pipelines: [pipelines/*.yaml]      # files or globs, relative to this file
//! knowledge:                         # named knowledge stores
//!   sales: { store: embedded, config: { source: pipelines/data/sales_objections.csv } }
//! llm:                               # named chat providers
//!   offline: { provider: offline }
//! engine: { conversation_idle_secs: 1800, queue_capacity: 64 }
//! ```
//!
//! Pipeline file:
//! ```yaml
//! pipeline: rta
//! description: Real-Time Assist
//! on: [tracker_response]
//! when: "event.tracker.name != ''"
//! deadline_ms: 1500                  # optional: answer due 1.5 s after the event (chat falls back)
//! concurrency: parallel               # parallel (default) | queue | latest_wins
//! key: "{{ event.tracker.name }}"     # optional: runs with the same key update one card
//! stages:
//!   - { id: kb, plugin: retrieve, config: { knowledge: sales }, timeout_ms: 500, on_error: stop }
//! ```
//!
//! [`Diagnostic`]: prompter_core::diagnostic::Diagnostic

pub mod diagnostics;
pub mod wasm;
pub mod yaml;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use marked_yaml::Node;
use marked_yaml::types::MarkedMappingNode;
use prompter_core::diagnostic::did_you_mean;
use prompter_core::event::EventKind;
use prompter_core::plugin::{BuildContext, Resources};
use prompter_core::template::{Expr, Template};

use crate::pipeline::{Concurrency, OnError, Pipeline, Stage};
use crate::registry::{Kind, Registry};
use diagnostics::{Diagnostics, WithHelp};
use yaml::{
    EnvLookup, check_keys, deserialize_at, expect_map, expect_scalar, expect_seq, opt_u64, required,
};

/// Engine-wide settings (`engine:` in the engine config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// A conversation with no event for this long is released. Default 1800 s.
    pub conversation_idle: Duration,
    /// Events queued per conversation before the source waits. Default 64.
    pub queue_capacity: usize,
    /// Stage timeout when a stage sets no `timeout_ms`. Default 10 s.
    pub default_stage_timeout: Duration,
    /// The `symbl:` section (credentials by variable name, live sources, trackers), when given.
    pub symbl: Option<prompter_symbl::SymblConfig>,
    /// The `server:` section: the engine's one HTTP server.
    pub server: crate::server::ServerConfig,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            conversation_idle: Duration::from_secs(1800),
            queue_capacity: 64,
            default_stage_timeout: Duration::from_secs(10),
            symbl: None,
            server: crate::server::ServerConfig::default(),
        }
    }
}

/// A loaded, valid configuration: pipelines ready to run.
pub struct Loaded {
    /// The engine config file, when there was one.
    pub config_file: Option<PathBuf>,
    /// The pipelines, in file order.
    pub pipelines: Vec<Pipeline>,
    /// The shared resources.
    pub resources: Resources,
    /// Engine settings.
    pub settings: Settings,
}

/// What to load.
pub struct LoadRequest<'a> {
    /// The engine config file (resources, settings, pipeline globs).
    pub config: Option<&'a Path>,
    /// Extra files given on the command line: pipeline files, or engine configs.
    pub files: &'a [PathBuf],
    /// Whether to load the pipelines the engine config lists.
    pub include_config_pipelines: bool,
    /// Environment lookup for `${NAME}`.
    pub env: EnvLookup<'a>,
}

/// Loads everything; every problem is in the returned diagnostics.
///
/// # Errors
/// [`Diagnostics`] with at least one problem.
pub fn load(req: &LoadRequest<'_>, registry: &Registry) -> Result<Loaded, Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut settings = Settings::default();
    let mut resources = Resources::default();
    let mut pipeline_files: Vec<PathBuf> = Vec::new();

    // Files named on the command line may be engine configs themselves.
    let mut configs: Vec<PathBuf> = req.config.map(Path::to_path_buf).into_iter().collect();
    let mut extra: Vec<(PathBuf, Node)> = Vec::new();
    for f in req.files {
        let Some(node) = read(f, req.env, &mut diags) else {
            continue;
        };
        if is_pipeline(&node) {
            extra.push((f.clone(), node));
        } else if !configs.iter().any(|c| same_file(c, f)) {
            configs.push(f.clone());
        }
    }
    for (i, cfg) in configs.iter().enumerate() {
        let Some(node) = read(cfg, req.env, &mut diags) else {
            continue;
        };
        let listed = engine_config(
            cfg,
            &node,
            registry,
            &mut settings,
            &mut resources,
            &mut diags,
        );
        // The first config's pipelines run only when asked; configs given as files are checked.
        if req.include_config_pipelines || i > 0 || req.config.is_none() {
            pipeline_files.extend(listed);
        }
    }

    let mut pipelines = Vec::new();
    let mut seen_files: BTreeSet<PathBuf> = BTreeSet::new();
    let mut names: BTreeMap<String, (PathBuf, usize)> = BTreeMap::new();
    let from_configs = pipeline_files.into_iter().filter_map(|f| {
        let node = read(&f, req.env, &mut diags)?;
        Some((f, node))
    });
    let all: Vec<(PathBuf, Node)> = from_configs
        .collect::<Vec<_>>()
        .into_iter()
        .chain(extra)
        .collect();
    for (file, node) in all {
        let key = file.canonicalize().unwrap_or_else(|_| file.clone());
        if !seen_files.insert(key) {
            continue;
        }
        if let Some(p) = pipeline(&file, &node, registry, &resources, &settings, &mut diags) {
            let marker = node
                .as_mapping()
                .and_then(|m| m.get_node("pipeline"))
                .and_then(|n| n.span().start().copied());
            let line = marker.map(|m| m.line()).unwrap_or(1);
            if let Some((first, first_line)) = names.get(&p.name) {
                diags
                    .error(
                        &file,
                        marker.as_ref(),
                        format!("duplicate pipeline name `{}`", p.name),
                    )
                    .help(Some(format!(
                        "first defined at {}:{first_line}",
                        first.display()
                    )));
            } else {
                names.insert(p.name.clone(), (file.clone(), line));
            }
            pipelines.push(p);
        }
    }
    if diags.is_empty() {
        Ok(Loaded {
            config_file: configs.first().cloned(),
            pipelines,
            resources,
            settings,
        })
    } else {
        Err(diags)
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn read(file: &Path, env: EnvLookup<'_>, diags: &mut Diagnostics) -> Option<Node> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            diags.error(file, None, format!("cannot read file: {e}"));
            return None;
        }
    };
    if text.trim().is_empty() {
        diags.error(file, None, "the file is empty");
        return None;
    }
    let mut node = yaml::parse(file, &text, diags)?;
    let before = diags.len();
    yaml::interpolate(file, &mut node, env, diags);
    // A value left as `${NAME}` would only cause follow-on errors; stop at the real one.
    (diags.len() == before).then_some(node)
}

fn is_pipeline(node: &Node) -> bool {
    node.as_mapping()
        .is_some_and(|m| m.get_node("pipeline").is_some() || m.get_node("stages").is_some())
}

fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

const ENGINE_KEYS: &[&str] = &[
    "pipelines",
    "embedders",
    "knowledge",
    "llm",
    "symbl",
    "server",
    "engine",
];

/// Reads an engine config; returns the pipeline files it lists.
fn engine_config(
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
                    if matched.is_empty() {
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
    // Embedders first: stores name theirs.
    open_embedders(file, map, &base, registry, resources, diags);
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
    section("llm", "provider", "llm provider").open(
        &registry.providers,
        resources,
        diags,
        |r, name, provider| {
            r.chat.insert(name, provider);
        },
    );
    files
}

/// Opens the engine config's `embedders:`, each behind a cache.
fn open_embedders(
    file: &Path,
    map: &MarkedMappingNode,
    base: &Path,
    registry: &Registry,
    resources: &mut Resources,
    diags: &mut Diagnostics,
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
        let cached: Arc<dyn prompter_core::resource::Embedder> =
            Arc::new(prompter_core::resource::CachedEmbedder::new(e));
        r.embedders.insert(name, cached);
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
            let Some((kind, kind_node, config)) =
                resource_decl(file, decl, self.kind_key, self.what, diags)
            else {
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
            if let Some(opened) = (factory.open)(&mut cx) {
                insert(resources, name.as_str().to_owned(), opened);
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
    let base = base_dir(file);
    let mut resources = Resources::default();
    let Some(map) = expect_map(file, &node, "the engine config", &mut diags) else {
        return Err(diags);
    };
    open_embedders(file, map, &base, registry, &mut resources, &mut diags);
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

static EMPTY_MAP: std::sync::LazyLock<Node> = std::sync::LazyLock::new(|| {
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

const PIPELINE_KEYS: &[&str] = &[
    "pipeline",
    "description",
    "on",
    "when",
    "deadline_ms",
    "concurrency",
    "key",
    "supersede",
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

fn pipeline(
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
    if let (Some(n), Some(node)) = (&name, map.get_node("pipeline")) {
        if !valid_id(n) {
            diags.error_node(
                file,
                node,
                format!("pipeline name `{n}` must use only a-z, 0-9, `_` and `-`"),
            );
        }
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
    if supersede.is_some() && concurrency != Concurrency::LatestWins {
        if let Some(n) = map.get_node("supersede") {
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
                };
                if let Some(plugin) = wasm::build(input, diags) {
                    stages.push(Stage {
                        id: id.clone(),
                        plugin_name: "wasm".into(),
                        plugin,
                        timeout,
                        on_error,
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
        key,
        supersede,
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
