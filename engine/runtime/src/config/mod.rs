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

pub mod cluster;
pub mod diagnostics;
mod engine_file;
mod pipeline_file;
pub mod sinks;
pub mod wasm;
pub mod yaml;

use engine_file::engine_config;
pub use engine_file::{
    ENGINE_KEYS, OpenCx, StoreDecl, declared_embedders, store_decl, typed_config,
};
use pipeline_file::pipeline;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use marked_yaml::Node;
use prompter_core::plugin::Resources;

use crate::pipeline::Pipeline;
use crate::registry::Registry;
use diagnostics::{Diagnostics, WithHelp};
use yaml::EnvLookup;

/// Engine-wide settings (`engine:` in the engine config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// A conversation with no event for this long is released. Default 1800 s.
    pub conversation_idle: Duration,
    /// Events queued per conversation before the source waits. Default 64.
    pub queue_capacity: usize,
    /// Stage timeout when a stage sets no `timeout_ms`. Default 10 s.
    pub default_stage_timeout: Duration,
    /// On shutdown, how long sinks may take to deliver what is queued before the rest is
    /// dead-lettered (`engine.sink_drain_ms`). Default 10 s.
    pub sink_drain: Duration,
    /// The `symbl:` section (credentials by variable name, live sources, trackers), when given.
    pub symbl: Option<prompter_symbl::SymblConfig>,
    /// The `server:` section: the engine's one HTTP server.
    pub server: crate::server::ServerConfig,
    /// The `feed:` section: the agent feed and console, when given.
    pub feed: Option<crate::feed::http::FeedConfig>,
    /// The `sinks:` section: notifier sinks, by name.
    pub sinks: Vec<sinks::SinkDecl>,
    /// The `twilio:` section: Twilio's voice webhooks, when given.
    pub twilio: Option<crate::twilio::TwilioConfig>,
    /// The `cluster:` section: scale-out on NATS JetStream, when given.
    pub cluster: Option<cluster::ClusterConfig>,
    /// What the engine does when pipeline runs pile up (`engine.overload`).
    pub overload: Overload,
    /// Where the loaded providers, embedders and Wasm stages count their calls: the engine's
    /// metrics when the load request gave them (hand them to the engine's
    /// [`Stats`](crate::stats::Stats)), else fresh ones.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            conversation_idle: Duration::from_secs(1800),
            queue_capacity: 64,
            default_stage_timeout: Duration::from_secs(10),
            sink_drain: Duration::from_secs(10),
            symbl: None,
            server: crate::server::ServerConfig::default(),
            feed: None,
            sinks: Vec::new(),
            twilio: None,
            cluster: None,
            overload: Overload::default(),
            metrics: std::sync::Arc::default(),
        }
    }
}

/// What an overloaded engine does (`engine.overload`): runs in flight across every
/// conversation are bounded by `max_runs`; events are always folded into their conversation (the
/// transcript is never shed), only the runs they trigger wait or are shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overload {
    /// Pipeline runs in flight at most (`max_runs`). Default 20,000.
    pub max_runs: usize,
    /// What happens to a run that finds no free slot.
    pub policy: OverloadPolicy,
}

impl Default for Overload {
    fn default() -> Self {
        Overload {
            max_runs: 20_000,
            policy: OverloadPolicy::Backpressure,
        }
    }
}

/// What happens to a run that finds no free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverloadPolicy {
    /// The conversation waits for a slot before starting its runs (after folding the event), so
    /// its queue fills and its source slows: nothing is dropped (default).
    Backpressure,
    /// Runs are dropped, lowest priority first: `low` pipelines once half the slots are taken,
    /// `normal` ones when all are, `high` ones never. Counted in `prompter_runs_shed_total`.
    Shed,
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
    /// The metrics of the engine the config is for (a reload passes the running engine's, so
    /// counters carry on); `None` for fresh ones, in [`Settings::metrics`].
    pub metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
}

/// Loads everything; every problem is in the returned diagnostics.
///
/// # Errors
/// [`Diagnostics`] with at least one problem.
pub fn load(req: &LoadRequest<'_>, registry: &Registry) -> Result<Loaded, Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut settings = Settings {
        metrics: req.metrics.clone().unwrap_or_default(),
        ..Settings::default()
    };
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

pub(super) fn read(file: &Path, env: EnvLookup<'_>, diags: &mut Diagnostics) -> Option<Node> {
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

pub(super) fn base_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}
