//! `WasmPlugin`: a pipeline stage backed by a component instance pool.
//!
//! Each call takes a warm instance (or waits for a free slot, bounded by its deadline, and
//! instantiates one from the pre-linked component and runs its `init`), sets the call's epoch
//! deadline, runs `process` with the stage's kv for the conversation (read from the engine,
//! written back when the guest returns), and maps whatever happened to a result or a stage error
//! that names the plugin and the cause. An instance that trapped is dropped; a healthy one goes
//! back to the pool until it has served `recycle_after_calls` calls or its memory passed
//! `recycle_memory_mb`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prompter_core::async_trait;
use prompter_core::conversation::ConversationState;
use prompter_core::error::{ErrorKind, PluginError};
use prompter_core::event::{Detail, Event, Speaker};
use prompter_core::output::{Output, Status, Trigger};
use prompter_core::plugin::{Flow, Plugin, Resources, StageContext};
use wasmtime::{Store, Trap};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use super::bindings::types;
use super::bindings::{Stage, StagePre};
use super::host::{CallInfo, HostState, Limiter, STDERR_CAPACITY};
use super::kv::Kv;
use super::runtime::{EPOCH_TICK, MAX_MEMORY_BYTES, WasmRuntime, runtime};
use super::slots::{IdlePool, Slot};

/// Resource limits of a Wasm stage (`limits:` in YAML).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Linear memory cap per instance, MiB. Default 64.
    pub max_memory_mb: u64,
    /// Largest result (output JSON plus notices) a call may return, KiB. Default 256.
    pub max_output_kb: u64,
    /// Recycle an instance after this many calls. Default 10,000.
    pub recycle_after_calls: u64,
    /// Recycle an instance once its memory grew past this, MiB. Default: 3/4 of the cap.
    pub recycle_memory_mb: Option<u64>,
    /// Warm instances kept per stage. Default 4.
    pub max_idle_instances: usize,
    /// Deterministic fuel budget per call (tests); off by default.
    pub fuel: Option<u64>,
    /// How many of the latest transcript lines a call receives (each line crosses the boundary
    /// on every call, so this bounds per-call cost on long calls). Default 32.
    pub transcript_lines: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory_mb: 64,
            max_output_kb: 256,
            recycle_after_calls: 10_000,
            recycle_memory_mb: None,
            max_idle_instances: 4,
            fuel: None,
            transcript_lines: 32,
        }
    }
}

/// What a Wasm stage may use of the engine's resources (`allow_knowledge:`, `allow_llm:`);
/// nothing by default. Hosts are granted separately, by [`WasmSpec::allow_hosts`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Knowledge stores `knowledge-search` may query.
    pub knowledge: Vec<String>,
    /// LLM providers `chat` may ask.
    pub llm: Vec<String>,
}

/// Why calls failed, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Ran past `timeout_ms`.
    Timeout,
    /// Hit `max_memory_mb`.
    Memory,
    /// Ran out of fuel.
    Fuel,
    /// Any other trap (a panic, an unreachable).
    Trap,
    /// Tried to reach a host it was not granted.
    Grant,
    /// Returned more than `max_output_kb`.
    Output,
    /// Returned a plugin error.
    Plugin,
    /// Could not be instantiated or initialized.
    Instantiate,
    /// No instance slot became free within `timeout_ms`.
    Busy,
}

impl Cause {
    /// Every cause, in the order of [`Metrics`]' error counters.
    pub const ALL: [Cause; 9] = [
        Cause::Timeout,
        Cause::Memory,
        Cause::Fuel,
        Cause::Trap,
        Cause::Grant,
        Cause::Output,
        Cause::Plugin,
        Cause::Instantiate,
        Cause::Busy,
    ];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Cause::Timeout => "timeout",
            Cause::Memory => "memory",
            Cause::Fuel => "fuel",
            Cause::Trap => "trap",
            Cause::Grant => "grant",
            Cause::Output => "output",
            Cause::Plugin => "plugin_error",
            Cause::Instantiate => "instantiate",
            Cause::Busy => "busy",
        }
    }
}

/// Host-side metrics of one Wasm stage. The counters are the engine's Prometheus counters when
/// the stage was built by a config load with metrics ([`crate::metrics::Metrics::wasm`]), so
/// they survive reloads; standalone ones otherwise.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Calls made.
    pub calls: Counter,
    errors: [Counter; 9],
    /// Total call time, ns.
    pub total_ns: AtomicU64,
    /// Slowest call, ns.
    pub max_ns: AtomicU64,
    /// Instances created.
    pub instances: Counter,
    /// Host calls refused because the stage lacks the grant (`allow_knowledge`, `allow_llm`).
    /// The guest gets an error and may go on, so these are not call errors.
    pub denied: Counter,
    /// Whether a refusal was already logged at warn (later ones are logged at debug).
    warned_denial: AtomicBool,
}

impl Metrics {
    /// Metrics counting into the given counters (errors in the order of [`Cause::ALL`]).
    pub fn with_counters(
        calls: Counter,
        errors: [Counter; 9],
        instances: Counter,
        denied: Counter,
    ) -> Self {
        Metrics {
            calls,
            errors,
            instances,
            denied,
            ..Default::default()
        }
    }

    fn error(&self, cause: Cause) {
        if let Some(i) = Cause::ALL.iter().position(|c| *c == cause) {
            self.errors[i].inc();
        }
    }

    /// Counts a refused host call; true for the stage's first one (log it loudly).
    pub(crate) fn grant_denied(&self) -> bool {
        self.denied.inc();
        !self.warned_denial.swap(true, Ordering::Relaxed)
    }

    /// Errors by cause (only causes that happened).
    pub fn errors(&self) -> Vec<(&'static str, u64)> {
        Cause::ALL
            .iter()
            .zip(&self.errors)
            .map(|(c, n)| (c.name(), n.get()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

struct Instance {
    store: Store<HostState>,
    stage: Stage,
    calls: u64,
    /// Declared after `store` so the store (and its pooling allocator slot) is gone before the
    /// slot is handed to a waiter.
    _slot: Slot,
}

/// A stage's idle instances. The process-wide slots may take one back for a waiting call of any
/// stage.
#[derive(Default)]
struct Idle(Mutex<Vec<Instance>>);

impl IdlePool for Idle {
    fn evict_one(&self) -> bool {
        let evicted = self.0.lock().ok().and_then(|mut idle| idle.pop());
        evicted.is_some()
    }
}

/// What a Wasm stage needs to be built. Its knowledge and LLM grants go beside it, to
/// [`WasmPlugin::build_with_grants`].
pub struct WasmSpec {
    /// The stage id.
    pub stage: String,
    /// The component file.
    pub module: PathBuf,
    /// The stage's `config:` as JSON.
    pub config_json: String,
    /// Hosts `http-fetch` may reach.
    pub allow_hosts: Vec<String>,
    /// Limits.
    pub limits: Limits,
    /// Per-call deadline.
    pub timeout: Duration,
    /// Shared resources the host calls use.
    pub resources: Resources,
    /// Where the stage counts its calls and errors (`Default::default()` for standalone ones).
    pub metrics: Arc<Metrics>,
}

/// A Wasm stage.
pub struct WasmPlugin {
    stage: Arc<str>,
    module: PathBuf,
    runtime: Arc<WasmRuntime>,
    pre: StagePre<HostState>,
    config_json: String,
    allow_hosts: Arc<Vec<String>>,
    grants: Arc<Grants>,
    limits: Limits,
    timeout: Duration,
    resources: Resources,
    http: reqwest::Client,
    idle: Arc<Idle>,
    /// Host-side metrics.
    pub metrics: Arc<Metrics>,
}

/// A failure while building a Wasm stage: a message, and the config field the plugin blamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitError {
    /// What is wrong.
    pub message: String,
    /// The field path inside `config:` the plugin named, if any.
    pub field: Option<String>,
}

impl WasmPlugin {
    /// Loads the component and runs `init` with the config in the sandbox, so bad config is
    /// found at load time. The stage may use no knowledge store and no LLM provider.
    ///
    /// # Errors
    /// The module cannot be loaded, or its `init` rejected the config.
    pub async fn build(spec: WasmSpec) -> Result<WasmPlugin, InitError> {
        Self::build_with_grants(spec, Grants::default()).await
    }

    /// As [`WasmPlugin::build`], with the knowledge stores and LLM providers the stage may use.
    /// Names are not checked against `spec.resources` here (config loading does that, with
    /// positions); a granted name that is missing is "unknown" to the guest at call time.
    ///
    /// # Errors
    /// The module cannot be loaded, or its `init` rejected the config.
    pub async fn build_with_grants(
        spec: WasmSpec,
        grants: Grants,
    ) -> Result<WasmPlugin, InitError> {
        let plain = |message: String| InitError {
            message,
            field: None,
        };
        let rt = runtime().map_err(|e| plain(e.to_string()))?;
        let pre = rt
            .load(&spec.module, spec.limits.fuel.is_some())
            .map_err(|e| plain(e.to_string()))?;
        let idle = Arc::new(Idle::default());
        let as_pool: Arc<dyn IdlePool> = idle.clone();
        rt.slots.register(Arc::downgrade(&as_pool));
        let plugin = WasmPlugin {
            stage: Arc::from(spec.stage.as_str()),
            module: spec.module,
            runtime: rt,
            pre,
            config_json: spec.config_json,
            allow_hosts: Arc::new(spec.allow_hosts),
            grants: Arc::new(grants),
            limits: spec.limits,
            timeout: spec.timeout,
            resources: spec.resources,
            http: http_client(),
            idle,
            metrics: spec.metrics,
        };
        let deadline = Instant::now() + plugin.timeout;
        let instance = plugin
            .instantiate(deadline)
            .await
            .map_err(|(e, field)| InitError {
                message: e.message,
                field,
            })?;
        plugin.give_back(instance);
        Ok(plugin)
    }

    /// The module file.
    pub fn module(&self) -> &std::path::Path {
        &self.module
    }

    fn memory_cap(&self) -> usize {
        usize::try_from(self.limits.max_memory_mb.saturating_mul(1 << 20))
            .unwrap_or(MAX_MEMORY_BYTES)
            .min(MAX_MEMORY_BYTES)
    }

    /// Epoch ticks left until `deadline` (at least one).
    fn ticks_until(deadline: Instant) -> u64 {
        let left = deadline.saturating_duration_since(Instant::now());
        (left.as_micros() / EPOCH_TICK.as_micros()).max(1) as u64
    }

    /// A fresh instance with `init` run, once a slot is free (waiting until `deadline` at most);
    /// on failure the error and the config field blamed.
    async fn instantiate(
        &self,
        deadline: Instant,
    ) -> Result<Instance, (PluginError, Option<String>)> {
        // Stop waiting a moment before the deadline, so this error (which says why) wins over
        // the pipeline's own timeout of the stage, which started a little earlier.
        let wait_until = deadline.checked_sub(EPOCH_TICK).unwrap_or(deadline);
        let slot = match self.runtime.slots.acquire(wait_until).await {
            Ok(slot) => slot,
            Err(busy) => {
                self.metrics.error(Cause::Busy);
                let msg = format!(
                    "plugin `{}` got no WebAssembly instance within its `timeout_ms` of {} ms: all {} instances the engine allows are in use",
                    self.stage,
                    self.timeout.as_millis(),
                    busy.capacity
                );
                return Err((PluginError::timeout(msg), None));
            }
        };
        self.metrics.instances.inc();
        let stderr = MemoryOutputPipe::new(STDERR_CAPACITY);
        // No environment, arguments, files, clocks beyond WASI defaults, or sockets: the only
        // way out is the host interface.
        let wasi = WasiCtxBuilder::new()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        let state = HostState {
            wasi,
            table: Default::default(),
            limiter: Limiter {
                max_bytes: self.memory_cap(),
                peak_bytes: 0,
                denied: false,
            },
            stderr,
            stderr_mark: 0,
            stage: self.stage.clone(),
            kv: None,
            allow_hosts: self.allow_hosts.clone(),
            grants: self.grants.clone(),
            metrics: self.metrics.clone(),
            resources: self.resources.clone(),
            http: self.http.clone(),
            call: CallInfo::default(),
            violation: None,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(Self::ticks_until(deadline));
        if let Some(fuel) = self.limits.fuel {
            let _ = store.set_fuel(fuel);
        }
        let stage = match self.pre.instantiate_async(&mut store).await {
            Ok(s) => s,
            Err(e) => {
                self.metrics.error(Cause::Instantiate);
                let (_, err) = self.classify(&store, &e, "instantiating it");
                return Err((err, None));
            }
        };
        match stage.call_init(&mut store, &self.config_json).await {
            Ok(Ok(())) => Ok(Instance {
                store,
                stage,
                calls: 0,
                _slot: slot,
            }),
            Ok(Err(pe)) => {
                self.metrics.error(Cause::Instantiate);
                let msg = format!(
                    "plugin `{}` rejected its config: {}",
                    self.stage, pe.message
                );
                Err((PluginError::config(msg), pe.field))
            }
            Err(e) => {
                self.metrics.error(Cause::Instantiate);
                let (_, err) = self.classify(&store, &e, "running `init`");
                Err((err, None))
            }
        }
    }

    fn give_back(&self, instance: Instance) {
        let recycle_mb = self
            .limits
            .recycle_memory_mb
            .unwrap_or(self.limits.max_memory_mb * 3 / 4);
        let peak = instance.store.data().limiter.peak_bytes as u64;
        if instance.calls >= self.limits.recycle_after_calls
            || peak > recycle_mb.saturating_mul(1 << 20)
        {
            return;
        }
        // Checked under the pool's lock, so a call that starts waiting for a slot either sees
        // this instance idle (and takes its slot) or makes it free its slot here.
        let dropped = match self.idle.0.lock() {
            Ok(mut idle)
                if idle.len() < self.limits.max_idle_instances
                    && !self.runtime.slots.contended() =>
            {
                idle.push(instance);
                None
            }
            _ => Some(instance),
        };
        drop(dropped);
    }

    /// Names the cause of a failed call.
    fn classify(
        &self,
        store: &Store<HostState>,
        e: &wasmtime::Error,
        during: &str,
    ) -> (Cause, PluginError) {
        let name = &self.stage;
        let state = store.data();
        let (cause, kind, message) = if let Some(v) = &state.violation {
            (
                Cause::Grant,
                ErrorKind::Input,
                format!("plugin `{name}` {v}"),
            )
        } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            (
                Cause::Timeout,
                ErrorKind::Timeout,
                format!(
                    "plugin `{name}` exceeded its `timeout_ms` of {} ms while {during}",
                    self.timeout.as_millis()
                ),
            )
        } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
            (
                Cause::Fuel,
                ErrorKind::Timeout,
                format!(
                    "plugin `{name}` ran out of fuel ({} units) while {during}",
                    self.limits.fuel.unwrap_or(0)
                ),
            )
        } else if state.limiter.denied {
            (
                Cause::Memory,
                ErrorKind::Internal,
                format!(
                    "plugin `{name}` exceeded its memory limit of {} MiB while {during}",
                    self.limits.max_memory_mb
                ),
            )
        } else {
            let all = state.stderr.contents();
            let stderr = String::from_utf8_lossy(all.get(state.stderr_mark..).unwrap_or_default())
                .trim()
                .to_owned();
            let trap = e
                .downcast_ref::<Trap>()
                .map(|t| t.to_string())
                .unwrap_or_else(|| format!("{e}"));
            let detail = if stderr.is_empty() {
                String::new()
            } else {
                format!(": {}", last_lines(&stderr, 3))
            };
            (
                Cause::Trap,
                ErrorKind::Internal,
                format!("plugin `{name}` trapped while {during} ({trap}){detail}"),
            )
        };
        self.metrics.error(cause);
        (cause, PluginError::new(kind, message))
    }

    async fn call(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        // Waiting for an instance counts against the stage's `timeout_ms`, like the pipeline's
        // own timeout of the stage does.
        let deadline = Instant::now() + self.timeout;
        let taken = self.idle.0.lock().ok().and_then(|mut p| p.pop());
        let mut inst = match taken {
            Some(i) => i,
            None => self.instantiate(deadline).await.map_err(|(e, _)| e)?,
        };
        let event = wit_event(cx.event());
        let conversation = wit_conversation(cx.conversation(), self.limits.transcript_lines);
        {
            let data = inst.store.data_mut();
            data.call = CallInfo {
                conversation: cx.event().conversation_id.to_string(),
                deadline: Some(deadline),
            };
            data.kv = Some(Kv::load(cx));
            data.violation = None;
            data.limiter.denied = false;
            data.stderr_mark = data.stderr.contents().len();
        }
        inst.store.set_epoch_deadline(Self::ticks_until(deadline));
        if let Some(fuel) = self.limits.fuel {
            let _ = inst.store.set_fuel(fuel);
        }
        inst.calls += 1;
        let result = inst
            .stage
            .call_process(&mut inst.store, &event, &conversation)
            .await;
        let result = match result {
            Err(e) => {
                // A trapped instance is never reused.
                let (_, err) = self.classify(&inst.store, &e, "processing an event");
                return Err(err);
            }
            Ok(r) => r,
        };
        // The guest returned: its kv writes reach the engine (a trapped call's go with its
        // instance). Taken out of the store, so an idle instance holds no conversation's data.
        if let Some(kv) = inst.store.data_mut().kv.take() {
            kv.commit(cx, &self.stage);
        }
        if let Some(v) = inst.store.data().violation.clone() {
            self.metrics.error(Cause::Grant);
            self.give_back(inst);
            return Err(PluginError::input(format!("plugin `{}` {v}", self.stage)));
        }
        self.give_back(inst);
        let result = result.map_err(|pe| {
            self.metrics.error(Cause::Plugin);
            let kind = match pe.kind {
                types::ErrorKind::Config => ErrorKind::Config,
                types::ErrorKind::Input => ErrorKind::Input,
                types::ErrorKind::External => ErrorKind::External,
                types::ErrorKind::Internal => ErrorKind::Internal,
            };
            PluginError::new(
                kind,
                format!("plugin `{}` failed: {}", self.stage, pe.message),
            )
        })?;
        let size = result_size(&result);
        let max = self.limits.max_output_kb.saturating_mul(1024);
        if size as u64 > max {
            self.metrics.error(Cause::Output);
            return Err(PluginError::input(format!(
                "plugin `{}` returned {} KiB, more than its `max_output_kb` of {}",
                self.stage,
                size / 1024,
                self.limits.max_output_kb
            )));
        }
        for (i, n) in result.notices.into_iter().enumerate() {
            let data = match n
                .data_json
                .as_deref()
                .map(serde_json::from_str::<serde_json::Value>)
            {
                Some(Ok(v)) => v,
                Some(Err(e)) => {
                    return Err(PluginError::input(format!(
                        "plugin `{}` returned a notice whose data is not JSON: {e}",
                        self.stage
                    )));
                }
                None => serde_json::Value::Null,
            };
            let output = Output {
                // One card per call; further notices of the same call get their own ids.
                id: if i == 0 {
                    cx.output_id()
                } else {
                    format!("{}-{i}", cx.output_id())
                },
                version: 0,
                status: Status::Final,
                seq: 0,
                kind: n.kind,
                conversation_id: cx.event().conversation_id.to_string(),
                pipeline: cx.pipeline.to_owned(),
                title: n.title,
                text: n.text,
                trigger: Trigger::from_event(cx.event()),
                sources: Vec::new(),
                timings: cx.timings(),
                model: cx.model(),
                data,
                degraded: None,
                generation: 0,
            };
            cx.emit(output).await?;
        }
        match result.flow {
            types::Flow::Continue(json) => {
                let v = if json.trim().is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_str(&json).map_err(|e| {
                        PluginError::input(format!(
                            "plugin `{}` returned an output that is not JSON: {e}",
                            self.stage
                        ))
                    })?
                };
                Ok(Flow::Continue(v))
            }
            types::Flow::Halt(reason) => Ok(Flow::Halt(reason)),
        }
    }
}

#[async_trait]
impl Plugin for WasmPlugin {
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
        let t0 = Instant::now();
        self.metrics.calls.inc();
        let r = self.call(cx).await;
        let ns = t0.elapsed().as_nanos() as u64;
        self.metrics.total_ns.fetch_add(ns, Ordering::Relaxed);
        self.metrics.max_ns.fetch_max(ns, Ordering::Relaxed);
        r
    }
}

fn http_client() -> reqwest::Client {
    // rustls needs a process-wide crypto provider; installing it twice is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn result_size(r: &types::StageResult) -> usize {
    let flow = match &r.flow {
        types::Flow::Continue(s) | types::Flow::Halt(s) => s.len(),
    };
    flow + r
        .notices
        .iter()
        .map(|n| {
            n.kind.len()
                + n.text.len()
                + n.title.as_ref().map_or(0, String::len)
                + n.data_json.as_ref().map_or(0, String::len)
        })
        .sum::<usize>()
}

fn wit_speaker(s: &Speaker) -> types::Speaker {
    types::Speaker {
        name: s.name.clone(),
        user_id: s.user_id.clone(),
    }
}

/// The event as the contract types it.
pub fn wit_event(e: &Event) -> types::Event {
    let detail = match &e.detail {
        Detail::Caption(c) => types::Detail::Caption(types::Message {
            id: None,
            speaker: c
                .speaker
                .as_ref()
                .map(wit_speaker)
                .unwrap_or(types::Speaker {
                    name: None,
                    user_id: None,
                }),
            text: c.text.clone(),
            sentiment: None,
            is_final: c.is_final,
        }),
        Detail::Message(m) => types::Detail::Message(types::Message {
            id: m.id.clone(),
            speaker: wit_speaker(&m.speaker),
            text: m.text.clone(),
            sentiment: m.sentiment,
            is_final: true,
        }),
        Detail::Tracker(t) => types::Detail::Tracker(types::Tracker {
            name: t.name.clone(),
            is_final: t.is_final,
            matches: t
                .matches
                .iter()
                .map(|m| types::TrackerMatch {
                    value: m.value.clone(),
                    message_texts: m
                        .message_refs
                        .iter()
                        .filter_map(|r| r.text.clone())
                        .collect(),
                })
                .collect(),
        }),
        Detail::Insight(i) => types::Detail::Insight(types::Insight {
            kind: i.kind.clone(),
            text: i.text.clone(),
            speaker: i.from.as_ref().map(wit_speaker),
        }),
        Detail::Topic(t) => types::Detail::Topic(t.phrases.clone()),
        // The contract has no variant for these; a plugin reads them from `raw-json` (a
        // feedback event's raw JSON is the feedback record).
        Detail::Entity(_)
        | Detail::Feedback(_)
        | Detail::Lifecycle { .. }
        | Detail::Error { .. }
        | Detail::None => types::Detail::None,
    };
    types::Event {
        kind: e.kind.as_str().to_owned(),
        conversation_id: e.conversation_id.to_string(),
        offset_ms: e.offset_ms,
        detail,
        raw_json: e.raw.json().into_owned(),
    }
}

/// The conversation state as the contract types it.
pub fn wit_conversation(s: &ConversationState, last_lines: usize) -> types::Conversation {
    let transcript = s
        .last_lines(last_lines)
        .iter()
        .map(|l| types::TranscriptLine {
            speaker: l.speaker.clone(),
            user_id: l.user_id.clone(),
            text: l.text.clone(),
            offset_ms: l.offset_ms,
            sentiment: l.sentiment,
        })
        .collect();
    let state_json = serde_json::json!({
        "id": s.id,
        "symbl_conversation_id": s.symbl_conversation_id,
        "caption": s.caption,
        "trackers": s.trackers,
        "insights": s.insights,
        "topics": s.topics,
        "last_offset_ms": s.last_offset_ms,
        "completed": s.completed,
    })
    .to_string();
    types::Conversation {
        id: s.id.clone(),
        transcript,
        state_json,
    }
}
