//! The stage plugin API: factories that build stages from typed config, and the stages
//! themselves.
//!
//! A *factory* exists once per plugin type (`retrieve`, `prompt`, ...). The engine hands each
//! stage's `config:` to the factory named by `plugin:`, which deserializes it into its typed
//! `Config` and builds an `Arc<dyn Plugin>`. Built-in plugins and (later) the Wasm adapter both
//! implement [`Plugin`]; the engine only ever sees the trait.
//!
//! A pipeline run calls its stages in order with a [`StageContext`]: the triggering event, the
//! conversation state, and the outputs of the earlier stages by id. A stage returns
//! [`Flow::Continue`] with its output (a JSON value templates can read as `stages.<id>`),
//! [`Flow::Output`] with a [`StageOutput`] that may also carry a well-known value typed
//! ([`Typed`]: documents, a chat request, a reply), or [`Flow::Halt`] to end the run quietly (a
//! filter or a dedupe hit). Later stages read well-known values through the typed accessors of
//! [`StageContext`] ([`StageContext::documents`], [`StageContext::chat_request`], ...), which take
//! the typed value when there is one and read the JSON otherwise.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::book::Host;
use crate::conversation::ConversationState;
use crate::diagnostic::{Position, did_you_mean};
use crate::error::PluginError;
use crate::event::Event;
use crate::output::{Output, Status, Timings, output_id, slug};
use crate::resource::{ChatProvider, ChatRequest, Embedder, KnowledgeStore, ScoredDocument};
use crate::template::{Template, conversation_value, event_value};

mod stage_output;
pub use stage_output::{Drafted, Outputs, StageOutput, Typed};

/// What a stage tells the pipeline after it ran.
#[derive(Debug, Clone, PartialEq)]
pub enum Flow {
    /// Go on; the value is this stage's output, readable as `stages.<id>`.
    Continue(serde_json::Value),
    /// Go on with an output that may carry a well-known value typed, so later stages read it
    /// without parsing JSON; templates read its JSON form as `stages.<id>`.
    Output(StageOutput),
    /// Stop this run quietly, with a reason for the logs.
    Halt(String),
}

impl Flow {
    /// The stage's output in JSON form (built now for a typed output); `None` for a halt.
    pub fn json(&self) -> Option<&serde_json::Value> {
        match self {
            Flow::Continue(v) => Some(v),
            Flow::Output(o) => Some(o.value()),
            Flow::Halt(_) => None,
        }
    }

    /// The stage's output; `None` for a halt.
    pub fn into_output(self) -> Option<StageOutput> {
        match self {
            Flow::Continue(v) => Some(StageOutput::json(v)),
            Flow::Output(o) => Some(o),
            Flow::Halt(_) => None,
        }
    }
}

/// The outputs of a context with no earlier stages.
static NO_OUTPUTS: Outputs = Outputs::new();

/// One stage of a pipeline, ready to run.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Handles one pipeline run. Re-entrant: different conversations call it concurrently, so
    /// mutable state goes behind the plugin's own lock.
    ///
    /// # Errors
    /// A classified [`PluginError`]; the stage's `on_error` policy decides what happens next.
    async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError>;

    /// Called once when the engine releases a conversation (completed or idle), so the stage can
    /// drop whatever it cached for it (per-conversation state proper lives in the engine: see
    /// [`StageContext::state_set`]).
    fn conversation_ended(&self, _conversation_id: &str) {}
}

/// A problem found while building a stage, positioned by a path inside the stage's `config:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    /// Dotted path inside `config:` (`messages.1.text`); empty for the whole config.
    pub path: String,
    /// Exact position when the deserializer knew it.
    pub pos: Option<Position>,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl BuildError {
    /// A problem at `path`.
    pub fn at(path: &str, message: impl Into<String>) -> Self {
        BuildError {
            path: path.to_owned(),
            pos: None,
            message: message.into(),
            help: None,
        }
    }
    /// Adds a hint.
    #[must_use]
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

/// Marker returned by a factory whose problems were already recorded in the [`BuildContext`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reported;

/// The shared resources stages may use, by name.
#[derive(Default, Clone)]
pub struct Resources {
    /// Knowledge stores from the engine config's `knowledge:`.
    pub knowledge: BTreeMap<String, Arc<dyn KnowledgeStore>>,
    /// Chat providers from the engine config's `llm:`.
    pub chat: BTreeMap<String, Arc<dyn ChatProvider>>,
    /// Embedders from the engine config's `embedders:`, each behind a [`CachedEmbedder`].
    ///
    /// [`CachedEmbedder`]: crate::resource::CachedEmbedder
    pub embedders: BTreeMap<String, Arc<dyn Embedder>>,
    /// Entries the engine config declares but that could not be opened, as `section/name`
    /// (`knowledge/sales`). Their problem is already reported where they are declared, so a
    /// stage naming one reports nothing more: one root cause, one error.
    pub unopened: BTreeSet<String>,
}

impl Resources {
    /// True when the engine config declares `name` under `section` but it failed to open.
    pub fn is_unopened(&self, section: &str, name: &str) -> bool {
        self.unopened
            .iter()
            .any(|e| e.split_once('/') == Some((section, name)))
    }
}

/// What a factory gets while building a stage: resources, template compilation, and a place to
/// report every problem it finds.
pub struct BuildContext<'a> {
    /// The pipeline's name.
    pub pipeline: &'a str,
    /// The stage's id.
    pub stage: &'a str,
    /// Folder of the file that declared the stage; relative paths resolve against it.
    pub base_dir: &'a Path,
    /// Ids of the stages before this one.
    pub earlier_stages: &'a [String],
    resources: &'a Resources,
    problems: Vec<BuildError>,
}

impl<'a> BuildContext<'a> {
    /// A context for stage `stage` of `pipeline`.
    pub fn new(
        pipeline: &'a str,
        stage: &'a str,
        base_dir: &'a Path,
        earlier_stages: &'a [String],
        resources: &'a Resources,
    ) -> Self {
        BuildContext {
            pipeline,
            stage,
            base_dir,
            earlier_stages,
            resources,
            problems: Vec::new(),
        }
    }

    /// Records a problem.
    pub fn report(&mut self, problem: BuildError) {
        self.problems.push(problem);
    }

    /// The problems recorded so far.
    pub fn into_problems(self) -> Vec<BuildError> {
        self.problems
    }

    /// True when a problem was recorded.
    pub fn has_problems(&self) -> bool {
        !self.problems.is_empty()
    }

    /// Looks up a knowledge store; reports an unknown name (with a hint) at `path`.
    pub fn knowledge(&mut self, path: &str, name: &str) -> Option<Arc<dyn KnowledgeStore>> {
        let found = self.resources.knowledge.get(name).cloned();
        if found.is_none() {
            let names = self.resources.knowledge.keys().map(String::as_str);
            self.unknown(path, "knowledge store", name, names, "knowledge");
        }
        found
    }

    /// Looks up a chat provider; reports an unknown name (with a hint) at `path`.
    pub fn chat_provider(&mut self, path: &str, name: &str) -> Option<Arc<dyn ChatProvider>> {
        let found = self.resources.chat.get(name).cloned();
        if found.is_none() {
            let names = self.resources.chat.keys().map(String::as_str);
            self.unknown(path, "llm provider", name, names, "llm");
        }
        found
    }

    /// Looks up an embedder; reports an unknown name (with a hint) at `path`.
    pub fn embedder(&mut self, path: &str, name: &str) -> Option<Arc<dyn Embedder>> {
        let found = self.resources.embedders.get(name).cloned();
        if found.is_none() {
            let names = self.resources.embedders.keys().map(String::as_str);
            self.unknown(path, "embedder", name, names, "embedders");
        }
        found
    }

    fn unknown<'n>(
        &mut self,
        path: &str,
        what: &str,
        name: &str,
        names: impl Iterator<Item = &'n str> + Clone,
        section: &str,
    ) {
        if self.resources.is_unopened(section, name) {
            return;
        }
        let help = match did_you_mean(name, names.clone()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => {
                let all: Vec<String> = names.map(|n| format!("`{n}`")).collect();
                if all.is_empty() {
                    format!("the engine config declares no `{section}:` entries")
                } else {
                    format!(
                        "declared in the engine config's `{section}:`: {}",
                        all.join(", ")
                    )
                }
            }
        };
        self.report(BuildError::at(path, format!("unknown {what} `{name}`")).help(help));
    }

    /// Compiles a template found at `path`, and checks that every `stages.<id>` it reads is an
    /// earlier stage.
    pub fn template(&mut self, path: &str, source: &str) -> Option<Template> {
        match Template::compile(source) {
            Ok(t) => {
                for id in t.stage_refs() {
                    self.check_stage_ref(path, &id);
                }
                Some(t)
            }
            Err(e) => {
                self.report(BuildError::at(
                    path,
                    format!("bad template: {}", first_line(&e)),
                ));
                None
            }
        }
    }

    /// Checks that `id` names an earlier stage; reports it at `path` otherwise.
    pub fn check_stage_ref(&mut self, path: &str, id: &str) -> bool {
        if self.earlier_stages.iter().any(|s| s == id) {
            return true;
        }
        let mut err = if id == self.stage {
            BuildError::at(path, format!("stage `{id}` refers to its own output"))
        } else {
            BuildError::at(
                path,
                format!("unknown stage `{id}`: no earlier stage has this id"),
            )
        };
        if let Some(s) = did_you_mean(id, self.earlier_stages.iter().map(String::as_str)) {
            err = err.help(format!("did you mean `{s}`?"));
        }
        self.report(err);
        false
    }
}

fn first_line(e: &minijinja::Error) -> String {
    let mut msg = e.kind().to_string();
    if let Some(detail) = e.detail() {
        msg = format!("{msg}: {detail}");
    }
    if let Some(line) = e.line() {
        msg = format!("{msg} (template line {line})");
    }
    msg
}

/// A plugin type: names itself, has a typed config, builds stages.
pub trait PluginFactory: Send + Sync + 'static {
    /// The name used as `plugin:` in YAML (snake_case).
    const NAME: &'static str;
    /// One-line description, shown by `prompter plugins`.
    const DESCRIPTION: &'static str;
    /// The stage's typed `config:`; use `#[serde(deny_unknown_fields)]`.
    type Config: DeserializeOwned;

    /// Builds a stage from its config.
    ///
    /// # Errors
    /// [`Reported`] after recording every problem in `cx`.
    fn build(
        &self,
        config: Self::Config,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported>;
}

/// The object-safe face of [`PluginFactory`] that the engine's registry stores.
pub trait ErasedFactory: Send + Sync + 'static {
    /// The `plugin:` name.
    fn name(&self) -> &'static str;
    /// One-line description.
    fn description(&self) -> &'static str;
    /// Deserializes `config` (a YAML node with positions) and builds the stage.
    ///
    /// # Errors
    /// [`Reported`] after recording every problem in `cx`.
    fn build_from_node(
        &self,
        config: &marked_yaml::Node,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported>;
}

impl<F: PluginFactory> ErasedFactory for F {
    fn name(&self) -> &'static str {
        F::NAME
    }
    fn description(&self) -> &'static str {
        F::DESCRIPTION
    }
    fn build_from_node(
        &self,
        config: &marked_yaml::Node,
        cx: &mut BuildContext<'_>,
    ) -> Result<Arc<dyn Plugin>, Reported> {
        match marked_yaml::from_node::<F::Config>(config) {
            Ok(cfg) => self.build(cfg, cx),
            Err(e) => {
                cx.report(config_problem(e));
                Err(Reported)
            }
        }
    }
}

/// Turns a config deserialization error into a [`BuildError`]: position and path when known,
/// lowercase message, and for an unknown key a "did you mean" hint (serde lists the expected
/// keys).
pub fn config_problem(e: marked_yaml::FromNodeError) -> BuildError {
    let pos = e.start_mark().map(|m| Position {
        line: m.line(),
        col: m.column(),
    });
    let path = e.path().unwrap_or_default().to_owned();
    config_error(path, pos, e.into_inner().to_string())
}

/// Turns serde's message into ours: lowercase first letter, and a "did you mean" hint for
/// unknown fields (serde lists the expected ones).
fn config_error(path: String, pos: Option<Position>, message: String) -> BuildError {
    let mut message = lowercase_first(&message);
    let mut help = None;
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or_default().to_owned();
        let expected: Vec<&str> = rest
            .split_once("expected")
            .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default();
        help = Some(match did_you_mean(&field, expected.iter().copied()) {
            Some(s) => format!("did you mean `{s}`?"),
            None => format!(
                "expected one of {}",
                expected
                    .iter()
                    .map(|e| format!("`{e}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
        message = format!("unknown key `{field}` in `config`");
    } else if !path.is_empty() && !message.starts_with("missing field") {
        message = format!("invalid `{path}`: {message}");
    }
    BuildError {
        path,
        pos,
        message,
        help,
    }
}

fn lowercase_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Values computed once per pipeline run and shared by its stages.
///
/// The run owns (shares) the event and the conversation snapshot it was started with, so it may
/// outlive the moment the conversation task handed it over: the conversation goes on folding
/// events while the run reads the state as it was when the event arrived.
pub struct RunScope {
    /// The triggering event.
    pub event: Arc<Event>,
    /// The conversation state after the event was folded in.
    pub conversation: Arc<ConversationState>,
    event_value: OnceLock<minijinja::Value>,
    conversation_value: OnceLock<minijinja::Value>,
}

impl RunScope {
    /// A scope for one run.
    pub fn new(event: Arc<Event>, conversation: Arc<ConversationState>) -> Self {
        RunScope {
            event,
            conversation,
            event_value: OnceLock::new(),
            conversation_value: OnceLock::new(),
        }
    }

    /// The template context: `event`, `conversation`, `stages`, `pipeline`. The event and the
    /// conversation are lazy objects: a template pays only for the fields it reads, so the
    /// cost does not grow with the length of the call.
    ///
    /// `stages` is lazy too ([`Outputs::template_value`]): each output is converted once per
    /// run, when a template first reads it.
    pub fn template_context(&self, pipeline: &str, outputs: &Outputs) -> minijinja::Value {
        let event = self
            .event_value
            .get_or_init(|| event_value(&self.event))
            .clone();
        let conversation = self
            .conversation_value
            .get_or_init(|| conversation_value(&self.conversation))
            .clone();
        minijinja::context! {
            event => event,
            conversation => conversation,
            stages => outputs.template_value(),
            pipeline => pipeline,
        }
    }
}

/// One run of a pipeline as the engine tracks it: its id, the id of the output it is about, a
/// cancellation token (a newer trigger may supersede it), and the drafts it left open.
pub struct Run {
    /// Unique within the engine process; claims ([`StageContext::claim`]) are made in its name.
    pub id: u64,
    /// The id of this run's card: the pipeline's `key` when it has one (a tracker's name by
    /// default for tracker triggers, so a tracker that fires again updates its card), else
    /// derived from the triggering event's identity.
    pub output_id: String,
    /// Cancelled when a newer trigger supersedes this run (`concurrency: latest_wins`) or the
    /// engine stops. Long stages (a chat call) watch it; the engine drops the run's future.
    pub cancel: tokio_util::sync::CancellationToken,
    drafts: std::sync::Mutex<HashMap<String, Output>>,
    delivered: AtomicBool,
    /// The older run this one supersedes once it has something to deliver.
    supersedes: std::sync::Mutex<Option<Arc<Run>>>,
}

impl Run {
    /// A run with id `id` whose card is `output_id`.
    pub fn new(id: u64, output_id: String) -> Self {
        Run {
            id,
            output_id,
            cancel: tokio_util::sync::CancellationToken::new(),
            drafts: std::sync::Mutex::default(),
            delivered: AtomicBool::new(false),
            supersedes: std::sync::Mutex::default(),
        }
    }

    /// Makes this run supersede `older` (`concurrency: latest_wins`) as soon as it delivers its
    /// first output: then `older` is cancelled and its open drafts withdrawn. Until then the
    /// older run goes on, so a newer trigger that ends quietly (a dedupe repeat) or fails before
    /// it has anything to show takes nothing away from the agent.
    pub fn supersede(&self, older: Arc<Run>) {
        *self
            .supersedes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(older);
    }

    /// True once the run delivered a final output.
    pub fn delivered(&self) -> bool {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Takes the drafts the run delivered and never completed, by id.
    pub fn take_open_drafts(&self) -> Vec<Output> {
        let mut d = self
            .drafts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut open: Vec<Output> = d.drain().map(|(_, o)| o).collect();
        open.sort_by_key(|o| o.seq);
        open
    }

    fn track(&self, output: &Output) {
        let mut d = self
            .drafts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match output.status {
            Status::Draft => {
                d.insert(output.id.clone(), output.clone());
            }
            Status::Final => {
                d.remove(&output.id);
                self.delivered.store(true, Ordering::Relaxed);
            }
            Status::Withdrawn => {
                d.remove(&output.id);
            }
        }
    }
}

/// Everything a stage sees while it runs.
pub struct StageContext<'a> {
    /// The pipeline's name.
    pub pipeline: &'a str,
    /// This stage's id.
    pub stage: &'a str,
    /// Shared per-run values (event, conversation).
    pub scope: &'a RunScope,
    /// The outputs of the earlier stages, in order.
    pub outputs: &'a Outputs,
    /// Durations of the earlier stages in microseconds.
    pub stage_timings: &'a [(String, u64)],
    /// Microseconds the run's earlier stages spent waiting on providers.
    pub waited_us: u64,
    /// When the run started.
    pub started: Instant,
    /// When the pipeline's answer is due (its `deadline_ms` after the event was received), if
    /// it declares one. Stages that can degrade (the chat stage's fallback) plan around it.
    pub deadline: Option<Instant>,
    /// The run.
    pub run: &'a Run,
    /// The engine: delivery and per-conversation stage state.
    pub host: &'a dyn Host,
}

impl<'a> StageContext<'a> {
    /// A context for a stage called on its own (no earlier stages), as tools and tests do.
    pub fn alone(
        pipeline: &'a str,
        stage: &'a str,
        scope: &'a RunScope,
        run: &'a Run,
        host: &'a dyn Host,
    ) -> Self {
        StageContext {
            pipeline,
            stage,
            scope,
            outputs: &NO_OUTPUTS,
            stage_timings: &[],
            waited_us: 0,
            started: Instant::now(),
            deadline: None,
            run,
            host,
        }
    }

    /// The triggering event.
    pub fn event(&self) -> &Event {
        &self.scope.event
    }

    /// The conversation state.
    pub fn conversation(&self) -> &ConversationState {
        &self.scope.conversation
    }

    /// The output of earlier stage `id`, in JSON form.
    pub fn output(&self, id: &str) -> Option<&serde_json::Value> {
        self.outputs.get(id).map(StageOutput::value)
    }

    /// The output of earlier stage `id`, typed when the stage gave a typed value.
    pub fn stage_output(&self, id: &str) -> Option<&StageOutput> {
        self.outputs.get(id)
    }

    /// The most recent earlier output that has field `field`, with its stage id.
    pub fn latest_with(&self, field: &str) -> Option<(&str, &serde_json::Value)> {
        self.outputs.latest_with(field).map(|(k, o)| (k, o.value()))
    }

    /// The documents output by stage `id`, or by the latest earlier stage that output
    /// documents when `id` is `None`; empty when there is none. Shared, not copied, when the
    /// stage gave them typed.
    ///
    /// # Errors
    /// When that stage's `documents` is not a list of documents.
    pub fn documents(&self, id: Option<&str>) -> Result<Arc<[ScoredDocument]>, PluginError> {
        let found = match id {
            Some(id) => self.outputs.get(id),
            None => self.outputs.latest_with("documents").map(|(_, o)| o),
        };
        match found {
            Some(o) => Ok(o.documents()?.unwrap_or_else(|| Arc::new([]))),
            None => Ok(Arc::new([])),
        }
    }

    /// The chat request output by stage `id`, or by the latest earlier stage that output one
    /// (it has a `system_prompt`) when `id` is `None`; `None` when there is no such stage.
    ///
    /// # Errors
    /// When that stage's output is not a chat request.
    pub fn chat_request(&self, id: Option<&str>) -> Result<Option<Arc<ChatRequest>>, PluginError> {
        let found = match id {
            Some(id) => self.outputs.get(id),
            None => self.outputs.latest_with("system_prompt").map(|(_, o)| o),
        };
        found.map(StageOutput::chat_request).transpose()
    }

    /// The `text` of the latest earlier output that has one (a reply's answer), if it is a
    /// string.
    pub fn latest_text(&self) -> Option<&str> {
        self.outputs.latest_with("text")?.1.text()
    }

    /// The id of the output that an earlier stage (a streaming `chat`) delivered drafts of, so
    /// this run completes it instead of starting another.
    pub fn drafted(&self) -> Option<&str> {
        self.outputs.latest_with("output")?.1.drafted()
    }

    /// The model of the latest earlier answer (`provider:model`), if a model answered.
    pub fn model(&self) -> Option<String> {
        self.outputs.latest_with("provider")?.1.model_label()
    }

    /// Every earlier stage's `degraded` reason, in stage order, joined by `; `; `None` when
    /// none degraded.
    pub fn degraded(&self) -> Option<String> {
        let reasons: Vec<&str> = self
            .outputs
            .as_slice()
            .iter()
            .filter_map(|(_, o)| o.degraded())
            .collect();
        (!reasons.is_empty()).then(|| reasons.join("; "))
    }

    /// Renders `template` with the run's context.
    ///
    /// # Errors
    /// A runtime template error.
    pub fn render(&self, template: &Template) -> Result<String, PluginError> {
        template.render(&self.template_context())
    }

    /// The run's template context (`event`, `conversation`, `stages`, `pipeline`); a stage may
    /// extend it with values of its own before rendering.
    pub fn template_context(&self) -> minijinja::Value {
        self.scope.template_context(self.pipeline, self.outputs)
    }

    /// The timings so far.
    pub fn timings(&self) -> Timings {
        Timings {
            stages_us: self.stage_timings.iter().cloned().collect(),
            total_us: self.started.elapsed().as_micros() as u64,
            received_us: self.scope.event.received.elapsed().as_micros() as u64,
            waited_us: self.waited_us,
        }
    }

    /// The id of this run's output (see [`Run::output_id`]).
    pub fn output_id(&self) -> String {
        self.run.output_id.clone()
    }

    /// The id of an output of this conversation and pipeline named by `key`: outputs with the
    /// same key are versions of one card.
    pub fn keyed_output_id(&self, key: &str) -> String {
        output_id(&self.scope.event.conversation_id, self.pipeline, &slug(key))
    }

    /// Delivers an output to the engine's sinks; the engine gives it its version and sequence
    /// number, and returns it as delivered.
    ///
    /// # Errors
    /// When the engine is shutting down and no longer takes outputs.
    pub async fn emit(&self, output: Output) -> Result<Output, PluginError> {
        let older = self
            .run
            .supersedes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(older) = older {
            // Silence the older run first, so none of its drafts follow the withdrawal.
            older.cancel.cancel();
            for mut draft in older.take_open_drafts() {
                draft.status = Status::Withdrawn;
                draft.degraded = Some("superseded by a newer trigger".into());
                self.host.deliver(draft).await?;
            }
        }
        if self.run.cancel.is_cancelled() {
            return Err(PluginError::internal(
                "this run was superseded by a newer trigger",
            ));
        }
        let delivered = self.host.deliver(output).await?;
        self.run.track(&delivered);
        Ok(delivered)
    }

    /// Claims `key` for this run within this stage's per-conversation state: false when an
    /// earlier run already delivered under it (less than `cooldown_ms` of call time ago, or at
    /// all with 0) or a run in flight holds it. The claim is committed only when this run
    /// delivers a final output; if the run fails, it is released.
    pub fn claim(&self, key: &str, cooldown_ms: u64) -> bool {
        let scope = self.state_scope();
        self.host.claim(
            self.run.id,
            &scope,
            key,
            self.event().offset_ms,
            cooldown_ms,
        )
    }

    /// A value this stage kept for this conversation.
    pub fn state_get(&self, key: &str) -> Option<String> {
        self.host.get(&self.state_scope(), key)
    }

    /// Keeps (or with `None` forgets) a value for this conversation; the engine owns it, so
    /// it survives a reload and travels with the conversation's snapshot.
    pub fn state_set(&self, key: &str, value: Option<String>) {
        self.host.set(&self.state_scope(), key, value);
    }

    fn state_scope(&self) -> String {
        format!("{}/{}", self.pipeline, self.stage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_field_gets_a_hint() {
        let e = config_error(
            String::new(),
            None,
            "Unknown field `tpo_k`, expected one of `top_k`, `query`, or `knowledge`".into(),
        );
        assert_eq!(e.message, "unknown key `tpo_k` in `config`");
        assert_eq!(e.help.as_deref(), Some("did you mean `top_k`?"));
        let e = config_error(
            String::new(),
            None,
            "Unknown field `zzz`, expected `a` or `b`".into(),
        );
        assert_eq!(e.help.as_deref(), Some("expected one of `a`, `b`"));
    }
}
