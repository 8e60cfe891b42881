//! Prometheus metrics: what the engine did, for dashboards and alerts (`GET /metrics`).
//!
//! One [`Metrics`] per engine (in its [`Stats`](crate::stats::Stats)), so test engines never mix
//! their counts. Every label comes from a bounded set: event kinds and sources (enums),
//! pipeline, stage and plugin names (fixed by the config), outcomes and statuses (enums), sink
//! names. No conversation id, caller or text ever becomes a label; per-call detail is in the
//! logs' spans.
//!
//! On the hot path a record is an atomic add on a handle resolved once: stages and pipelines
//! keep theirs ([`StageMetrics`], [`PipelineMetrics`]), event counters are looked up by two
//! `&'static str` labels without allocating. Gauges of state the engine already keeps (live
//! conversations, sink queues, notifier deliveries, the Twilio bridge) are read at scrape time
//! by collectors, so nothing is counted twice.
//!
//! The exposition is the Prometheus text format (version 0.0.4): `promtool check metrics`
//! accepts it.

use std::sync::{Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Buckets of the latency histograms, in seconds: 0.5 ms to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    source: &'static str,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    pipeline: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PipelineLabels {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    pipeline: String,
    stage: String,
    plugin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageErrorLabels {
    pipeline: String,
    stage: String,
    error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutputLabels {
    pipeline: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderResultLabels {
    provider: String,
    kind: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    embedder: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageIdLabels {
    pipeline: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WasmErrorLabels {
    pipeline: String,
    stage: String,
    cause: &'static str,
}

/// How a pipeline run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// Every stage ran.
    Completed,
    /// A stage ended the run on purpose (a filter, `dedupe`).
    Halted,
    /// A stage failed with `on_error: stop`.
    Failed,
    /// A newer run of a `latest_wins` pipeline took over.
    Superseded,
}

impl RunOutcome {
    fn label(self) -> &'static str {
        match self {
            RunOutcome::Completed => "completed",
            RunOutcome::Halted => "halted",
            RunOutcome::Failed => "failed",
            RunOutcome::Superseded => "superseded",
        }
    }
}

/// A pipeline's handles: its runs by outcome, their duration, its outputs.
#[derive(Debug, Clone)]
pub struct PipelineMetrics {
    completed: Counter,
    halted: Counter,
    failed: Counter,
    superseded: Counter,
    duration: Histogram,
    outputs: [Counter; 5],
    output_latency: Histogram,
    degraded: Counter,
    shed: Counter,
}

impl PipelineMetrics {
    /// Counts a run shed by an overloaded engine.
    pub fn shed(&self) {
        self.shed.inc();
    }

    /// Counts a run that ended `outcome` after `seconds`.
    pub fn run(&self, outcome: RunOutcome, seconds: f64) {
        match outcome {
            RunOutcome::Completed => &self.completed,
            RunOutcome::Halted => &self.halted,
            RunOutcome::Failed => &self.failed,
            RunOutcome::Superseded => &self.superseded,
        }
        .inc();
        self.duration.observe(seconds);
    }

    /// Records an output version with `status`, delivered `seconds` after its trigger was
    /// received.
    pub fn output(&self, status: &str, degraded: bool, seconds: f64) {
        self.outputs[status_index(status)].inc();
        if status != "withdrawn" {
            self.output_latency.observe(seconds);
        }
        if degraded {
            self.degraded.inc();
        }
    }
}

/// A stage's handles: its duration, its errors and timeouts, its fallbacks.
#[derive(Debug, Clone)]
pub struct StageMetrics {
    duration: Histogram,
    errors: Counter,
    timeouts: Counter,
    /// Only `chat` stages have a fallback.
    fallbacks: Option<Counter>,
}

impl prompter_core::meter::StageMeter for StageMetrics {
    fn fallback(&self) {
        if let Some(c) = &self.fallbacks {
            c.inc();
        }
    }
}

/// A chat provider's handles (`kind="chat"`).
#[derive(Debug)]
pub struct ChatMetrics {
    pub(crate) ok: Counter,
    pub(crate) error: Counter,
    pub(crate) duration: Histogram,
    pub(crate) first_token: Histogram,
    pub(crate) retries: Counter,
    pub(crate) tokens_in: Counter,
    pub(crate) tokens_out: Counter,
}

/// An embedder's handles (`kind="embed"`): calls that reached the provider, and the cache.
#[derive(Debug)]
pub struct EmbedMetrics {
    pub(crate) ok: Counter,
    pub(crate) error: Counter,
    pub(crate) duration: Histogram,
    pub(crate) retries: Counter,
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
}

impl StageMetrics {
    /// Records one call of the stage.
    pub fn observe(&self, seconds: f64) {
        self.duration.observe(seconds);
    }

    /// Counts a failure (`timed_out`: it ran out of time).
    pub fn error(&self, timed_out: bool) {
        if timed_out {
            self.timeouts.inc();
        } else {
            self.errors.inc();
        }
    }
}

/// Every metric of one engine.
pub struct Metrics {
    registry: Mutex<Registry>,
    events: Family<EventLabels, Counter>,
    runs: Family<RunLabels, Counter>,
    run_seconds: Family<PipelineLabels, Histogram>,
    stage_seconds: Family<StageLabels, Histogram>,
    stage_errors: Family<StageErrorLabels, Counter>,
    outputs: Family<OutputLabels, Counter>,
    output_seconds: Family<PipelineLabels, Histogram>,
    degraded: Family<PipelineLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    fallbacks: Family<StageIdLabels, Counter>,
    provider_requests: Family<ProviderResultLabels, Counter>,
    provider_seconds: Family<ProviderLabels, Histogram>,
    first_token_seconds: Family<ProviderLabels, Histogram>,
    provider_retries: Family<ProviderLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    cache: Family<CacheLabels, Counter>,
    wasm_calls: Family<StageIdLabels, Counter>,
    wasm_errors: Family<WasmErrorLabels, Counter>,
    wasm_instances: Family<StageIdLabels, Counter>,
    wasm_denied: Family<StageIdLabels, Counter>,
    shed: Family<PipelineLabels, Counter>,
    overload_waits: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Output statuses, in the order of [`PipelineMetrics`]' output counters.
const STATUSES: [&str; 5] = ["draft", "final", "withdrawn", "incomplete", "other"];

fn status_index(status: &str) -> usize {
    STATUSES[..4].iter().position(|s| *s == status).unwrap_or(4)
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let events = Family::<EventLabels, Counter>::default();
        let runs = Family::<RunLabels, Counter>::default();
        let run_seconds = Family::<PipelineLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let stage_seconds = Family::<StageLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let stage_errors = Family::<StageErrorLabels, Counter>::default();
        let outputs = Family::<OutputLabels, Counter>::default();
        let output_seconds = Family::<PipelineLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let degraded = Family::<PipelineLabels, Counter>::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "prompter_events_received",
            "Events handed to the engine, by source and kind",
            events.clone(),
        );
        registry.register(
            "prompter_pipeline_runs",
            "Pipeline runs that passed their filter, by how they ended",
            runs.clone(),
        );
        registry.register(
            "prompter_pipeline_run_duration_seconds",
            "Time of a pipeline run, from its start to its last stage",
            run_seconds.clone(),
        );
        registry.register(
            "prompter_stage_duration_seconds",
            "Time of one stage call",
            stage_seconds.clone(),
        );
        registry.register(
            "prompter_stage_errors",
            "Stage failures, by error type (error, timeout)",
            stage_errors.clone(),
        );
        registry.register(
            "prompter_outputs",
            "Output versions delivered, by pipeline and status",
            outputs.clone(),
        );
        registry.register(
            "prompter_trigger_to_output_seconds",
            "Time from the triggering event's receipt to an output version's delivery",
            output_seconds.clone(),
        );
        registry.register(
            "prompter_degraded_outputs",
            "Output versions marked degraded (a fallback answered, a budget ran out)",
            degraded.clone(),
        );
        registry.register(
            "prompter_config_reloads",
            "Configuration reloads, by result (ok, rejected)",
            reloads.clone(),
        );
        let fallbacks = Family::<StageIdLabels, Counter>::default();
        registry.register(
            "prompter_chat_fallbacks",
            "Chat answers given by a stage's fallback provider instead of its primary",
            fallbacks.clone(),
        );
        let provider_requests = Family::<ProviderResultLabels, Counter>::default();
        registry.register(
            "prompter_provider_requests",
            "Calls to an LLM provider or embedder (kind chat or embed), by result (ok, error); \
             embedding calls answered wholly from the cache are not counted",
            provider_requests.clone(),
        );
        let provider_seconds = Family::<ProviderLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "prompter_provider_request_duration_seconds",
            "Total time of a provider call, retries included",
            provider_seconds.clone(),
        );
        let first_token_seconds = Family::<ProviderLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "prompter_provider_first_token_seconds",
            "Time from a streamed chat call's start to its first fragment of text",
            first_token_seconds.clone(),
        );
        let provider_retries = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "prompter_provider_retries",
            "Provider attempts that failed retryably and were tried again",
            provider_retries.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "prompter_provider_tokens",
            "Tokens the provider reported using, by direction (input, output)",
            tokens.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "prompter_embedding_cache_lookups",
            "Texts looked up in an embedder's cache, by result (hit, miss)",
            cache.clone(),
        );
        let wasm_calls = Family::<StageIdLabels, Counter>::default();
        registry.register(
            "prompter_wasm_calls",
            "Calls of a WebAssembly stage",
            wasm_calls.clone(),
        );
        let wasm_errors = Family::<WasmErrorLabels, Counter>::default();
        registry.register(
            "prompter_wasm_errors",
            "Failed calls of a WebAssembly stage, by cause (timeout, memory, fuel, trap, grant, \
             output, plugin_error, instantiate, busy)",
            wasm_errors.clone(),
        );
        let wasm_instances = Family::<StageIdLabels, Counter>::default();
        registry.register(
            "prompter_wasm_instances_created",
            "WebAssembly instances created for a stage",
            wasm_instances.clone(),
        );
        let wasm_denied = Family::<StageIdLabels, Counter>::default();
        registry.register(
            "prompter_wasm_host_calls_denied",
            "Host calls refused because the stage lacks the grant",
            wasm_denied.clone(),
        );
        let shed = Family::<PipelineLabels, Counter>::default();
        registry.register(
            "prompter_runs_shed",
            "Pipeline runs an overloaded engine dropped (engine.overload.policy: shed)",
            shed.clone(),
        );
        let overload_waits = Counter::default();
        registry.register(
            "prompter_overload_waits",
            "Times a conversation waited for a free run slot (engine.overload.policy: backpressure)",
            overload_waits.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            events,
            runs,
            run_seconds,
            stage_seconds,
            stage_errors,
            outputs,
            output_seconds,
            degraded,
            reloads,
            fallbacks,
            provider_requests,
            provider_seconds,
            first_token_seconds,
            provider_retries,
            tokens,
            cache,
            wasm_calls,
            wasm_errors,
            wasm_instances,
            wasm_denied,
            shed,
            overload_waits,
        }
    }

    /// Counts an event from `source` (`replay`, `symbl`, `twilio`, `feed`, ...).
    pub fn event(&self, source: &'static str, kind: &'static str) {
        self.events
            .get_or_create(&EventLabels { source, kind })
            .inc();
    }

    /// The handles of pipeline `name` (resolve once, keep them).
    pub fn pipeline(&self, name: &str) -> PipelineMetrics {
        let run = |outcome: RunOutcome| {
            self.runs
                .get_or_create(&RunLabels {
                    pipeline: name.to_owned(),
                    outcome: outcome.label(),
                })
                .clone()
        };
        let labels = PipelineLabels {
            pipeline: name.to_owned(),
        };
        PipelineMetrics {
            completed: run(RunOutcome::Completed),
            halted: run(RunOutcome::Halted),
            failed: run(RunOutcome::Failed),
            superseded: run(RunOutcome::Superseded),
            duration: self.run_seconds.get_or_create(&labels).clone(),
            outputs: STATUSES.map(|status| {
                self.outputs
                    .get_or_create(&OutputLabels {
                        pipeline: name.to_owned(),
                        status,
                    })
                    .clone()
            }),
            output_latency: self.output_seconds.get_or_create(&labels).clone(),
            degraded: self.degraded.get_or_create(&labels).clone(),
            shed: self.shed.get_or_create(&labels).clone(),
        }
    }

    /// The handles of stage `stage` (plugin `plugin`) of pipeline `pipeline`.
    pub fn stage(&self, pipeline: &str, stage: &str, plugin: &str) -> StageMetrics {
        let error = |error_type: &'static str| {
            self.stage_errors
                .get_or_create(&StageErrorLabels {
                    pipeline: pipeline.to_owned(),
                    stage: stage.to_owned(),
                    error_type,
                })
                .clone()
        };
        StageMetrics {
            duration: self
                .stage_seconds
                .get_or_create(&StageLabels {
                    pipeline: pipeline.to_owned(),
                    stage: stage.to_owned(),
                    plugin: plugin.to_owned(),
                })
                .clone(),
            errors: error("error"),
            timeouts: error("timeout"),
            fallbacks: (plugin == "chat").then(|| {
                self.fallbacks
                    .get_or_create(&StageIdLabels {
                        pipeline: pipeline.to_owned(),
                        stage: stage.to_owned(),
                    })
                    .clone()
            }),
        }
    }

    fn provider_result(&self, provider: &str, kind: &'static str, result: &'static str) -> Counter {
        self.provider_requests
            .get_or_create(&ProviderResultLabels {
                provider: provider.to_owned(),
                kind,
                result,
            })
            .clone()
    }

    /// The handles of chat provider `name`.
    pub fn chat(&self, name: &str) -> ChatMetrics {
        let labels = ProviderLabels {
            provider: name.to_owned(),
            kind: "chat",
        };
        let tokens = |direction| {
            self.tokens
                .get_or_create(&TokenLabels {
                    provider: name.to_owned(),
                    direction,
                })
                .clone()
        };
        ChatMetrics {
            ok: self.provider_result(name, "chat", "ok"),
            error: self.provider_result(name, "chat", "error"),
            duration: self.provider_seconds.get_or_create(&labels).clone(),
            first_token: self.first_token_seconds.get_or_create(&labels).clone(),
            retries: self.provider_retries.get_or_create(&labels).clone(),
            tokens_in: tokens("input"),
            tokens_out: tokens("output"),
        }
    }

    /// The handles of embedder `name`.
    pub fn embed(&self, name: &str) -> EmbedMetrics {
        let labels = ProviderLabels {
            provider: name.to_owned(),
            kind: "embed",
        };
        let cache = |result| {
            self.cache
                .get_or_create(&CacheLabels {
                    embedder: name.to_owned(),
                    result,
                })
                .clone()
        };
        EmbedMetrics {
            ok: self.provider_result(name, "embed", "ok"),
            error: self.provider_result(name, "embed", "error"),
            duration: self.provider_seconds.get_or_create(&labels).clone(),
            retries: self.provider_retries.get_or_create(&labels).clone(),
            hits: cache("hit"),
            misses: cache("miss"),
        }
    }

    /// The counters of WebAssembly stage `stage` of pipeline `pipeline`.
    pub fn wasm(&self, pipeline: &str, stage: &str) -> crate::wasm::Metrics {
        let labels = StageIdLabels {
            pipeline: pipeline.to_owned(),
            stage: stage.to_owned(),
        };
        crate::wasm::Metrics::with_counters(
            self.wasm_calls.get_or_create(&labels).clone(),
            crate::wasm::Cause::ALL.map(|cause| {
                self.wasm_errors
                    .get_or_create(&WasmErrorLabels {
                        pipeline: pipeline.to_owned(),
                        stage: stage.to_owned(),
                        cause: cause.name(),
                    })
                    .clone()
            }),
            self.wasm_instances.get_or_create(&labels).clone(),
            self.wasm_denied.get_or_create(&labels).clone(),
        )
    }

    /// Counts a conversation that waited for a run slot.
    pub fn overload_wait(&self) {
        self.overload_waits.inc();
    }

    /// Counts a configuration reload (`ok` or `rejected`).
    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                result: if ok { "ok" } else { "rejected" },
            })
            .inc();
    }

    /// Adds metrics read at scrape time.
    pub fn add_collector(&self, collector: Box<dyn Collector>) {
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .register_collector(collector);
    }

    /// The exposition, in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut open_metrics = String::with_capacity(16 * 1024);
        {
            let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
            // Writing to a String cannot fail.
            let _ =
                prometheus_client::encoding::text::encode_registry(&mut open_metrics, &registry);
        }
        to_prometheus_text(&open_metrics)
    }
}

/// OpenMetrics (what the encoder writes) names a counter's family without `_total` in its
/// `# HELP` and `# TYPE` lines; the Prometheus text format names them as its samples are.
fn to_prometheus_text(open_metrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = open_metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(open_metrics.len() + 16 * counters.len());
    for line in open_metrics.lines() {
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Values read at scrape time: a name, help, and samples (label pairs, value).
pub struct Reading {
    /// The metric's name (counters end in `_total` on the wire).
    pub name: &'static str,
    /// What it counts.
    pub help: &'static str,
    /// Counter (true) or gauge.
    pub counter: bool,
    /// The samples.
    pub samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

/// A collector from a closure returning [`Reading`]s.
pub struct FnCollector<F>(pub F);

impl<F> std::fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnCollector")
    }
}

impl<F: Fn() -> Vec<Reading> + Send + Sync + 'static> Collector for FnCollector<F> {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for reading in (self.0)() {
            let kind = if reading.counter {
                MetricType::Counter
            } else {
                MetricType::Gauge
            };
            let mut family = encoder.encode_descriptor(reading.name, reading.help, None, kind)?;
            for (labels, value) in &reading.samples {
                let sample = family.encode_family(labels)?;
                if reading.counter {
                    ConstCounter::new(*value).encode(sample)?;
                } else {
                    ConstGauge::new(i64::try_from(*value).unwrap_or(i64::MAX)).encode(sample)?;
                }
            }
        }
        Ok(())
    }
}

/// A reading with one unlabelled sample.
pub fn single(name: &'static str, help: &'static str, counter: bool, value: u64) -> Reading {
    Reading {
        name,
        help,
        counter,
        samples: vec![(Vec::new(), value)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_render_with_bounded_labels_and_explicit_buckets() {
        let m = Metrics::new();
        m.event("replay", "tracker_response");
        m.event("replay", "tracker_response");
        let p = m.pipeline("rta");
        p.run(RunOutcome::Completed, 0.002);
        p.run(RunOutcome::Halted, 0.0001);
        m.stage("rta", "retrieve", "retrieve").observe(0.001);
        m.stage("rta", "retrieve", "retrieve").error(true);
        p.output("final", true, 0.003);
        p.output("final", false, 0.004);
        m.reload(false);
        m.add_collector(Box::new(FnCollector(|| {
            vec![single(
                "prompter_conversations_active",
                "Live conversations",
                false,
                3,
            )]
        })));
        let text = m.render();
        for line in [
            "prompter_events_received_total{source=\"replay\",kind=\"tracker_response\"} 2",
            "prompter_pipeline_runs_total{pipeline=\"rta\",outcome=\"completed\"} 1",
            "prompter_pipeline_runs_total{pipeline=\"rta\",outcome=\"halted\"} 1",
            "prompter_stage_errors_total{pipeline=\"rta\",stage=\"retrieve\",error_type=\"timeout\"} 1",
            "prompter_outputs_total{pipeline=\"rta\",status=\"final\"} 2",
            "prompter_degraded_outputs_total{pipeline=\"rta\"} 1",
            "prompter_trigger_to_output_seconds_bucket{le=\"0.005\",pipeline=\"rta\"} 2",
            "prompter_config_reloads_total{result=\"rejected\"} 1",
            "prompter_conversations_active 3",
            "# TYPE prompter_stage_duration_seconds histogram",
            "# TYPE prompter_events_received_total counter",
            "# HELP prompter_events_received_total Events handed to the engine, by source and kind.",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
