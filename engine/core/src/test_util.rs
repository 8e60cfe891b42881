//! Helpers to drive a plugin in tests without an engine: build it from YAML, run it on an event.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::book::LocalHost;
use crate::conversation::ConversationState;
use crate::error::PluginError;
use crate::event::{Event, parse_frame};
use crate::output::{Output, event_part, output_id};
use crate::plugin::{
    BuildContext, BuildError, ErasedFactory, Flow, Outputs, Plugin, Resources, Run, RunScope,
    StageContext,
};

/// Builds a stage from a YAML `config:` body, as the engine would, with `earlier` stage ids.
///
/// # Errors
/// Every problem the factory reported.
pub fn build(
    factory: &dyn ErasedFactory,
    yaml: &str,
    resources: &Resources,
    earlier: &[&str],
) -> Result<Arc<dyn Plugin>, Vec<BuildError>> {
    let node = if yaml.trim().is_empty() {
        marked_yaml::parse_yaml(0, "{}")
    } else {
        marked_yaml::parse_yaml(0, yaml)
    }
    .map_err(|e| vec![BuildError::at("", e.to_string())])?;
    let earlier: Vec<String> = earlier.iter().map(|s| s.to_string()).collect();
    let mut cx = BuildContext::new("test", "stage", Path::new("."), &earlier, resources);
    let built = factory.build_from_node(&node, &mut cx);
    let problems = cx.into_problems();
    match built {
        Ok(p) if problems.is_empty() => Ok(p),
        _ => Err(problems),
    }
}

/// One event built from a Symbl frame (the first item of it).
///
/// # Panics
/// When the frame does not parse: test input is expected to be valid.
pub fn event(conversation: &str, offset_ms: u64, frame: serde_json::Value) -> Event {
    parse_frame(conversation, offset_ms, frame)
        .expect("invariant: test frames are valid")
        .remove(0)
}

/// What a stage run produced.
#[derive(Debug)]
pub struct RunResult {
    /// The stage's flow decision.
    pub flow: Result<Flow, PluginError>,
    /// Outputs it emitted.
    pub emitted: Vec<Output>,
}

/// Runs `plugin` once on `event` with `state` and earlier `outputs` (JSON, as a Wasm plugin or a
/// user stage gives them; [`run_with_outputs`] takes typed ones).
pub async fn run(
    plugin: &dyn Plugin,
    event: &Event,
    state: &ConversationState,
    outputs: &[(String, serde_json::Value)],
) -> RunResult {
    run_with_deadline(plugin, event, state, outputs, None).await
}

/// Runs `plugin` like [`run`], in a pipeline whose answer is due at `deadline`.
pub async fn run_with_deadline(
    plugin: &dyn Plugin,
    event: &Event,
    state: &ConversationState,
    outputs: &[(String, serde_json::Value)],
    deadline: Option<Instant>,
) -> RunResult {
    run_on(
        &TestHost::default(),
        plugin,
        event,
        state,
        outputs,
        deadline,
    )
    .await
}

/// Runs `plugin` like [`run_with_deadline`] against `host`, so several runs share one
/// conversation's engine-owned state (dedupe keys, output versions), as in an engine.
pub async fn run_on(
    host: &TestHost,
    plugin: &dyn Plugin,
    event: &Event,
    state: &ConversationState,
    outputs: &[(String, serde_json::Value)],
    deadline: Option<Instant>,
) -> RunResult {
    run_with_outputs(
        host,
        plugin,
        event,
        state,
        &Outputs::from(outputs),
        deadline,
    )
    .await
}

/// Runs `plugin` like [`run_on`] with earlier `outputs` as the engine holds them, typed values
/// included (what the built-in stages return).
pub async fn run_with_outputs(
    host: &TestHost,
    plugin: &dyn Plugin,
    event: &Event,
    state: &ConversationState,
    outputs: &Outputs,
    deadline: Option<Instant>,
) -> RunResult {
    let scope = RunScope::new(Arc::new(event.clone()), Arc::new(state.clone()));
    let run = Run::new(
        1,
        output_id(
            &event.conversation_id,
            "test",
            &event_part(event.identity()),
        ),
    );
    let cx = StageContext {
        pipeline: "test",
        stage: "stage",
        scope: &scope,
        outputs,
        stage_timings: &[],
        waited_us: 0,
        started: Instant::now(),
        deadline,
        run: &run,
        host,
    };
    let flow = plugin.process(&cx).await;
    RunResult {
        flow,
        emitted: host.take(),
    }
}

/// An engine stand-in for tests (see [`LocalHost`]).
pub type TestHost = LocalHost;

/// The problems reported when building a stage from `yaml`.
///
/// # Panics
/// When the stage builds fine: the test expected problems.
pub fn build_errors(
    factory: &dyn ErasedFactory,
    yaml: &str,
    resources: &Resources,
    earlier: &[&str],
) -> Vec<BuildError> {
    match build(factory, yaml, resources, earlier) {
        Ok(_) => panic!("expected build problems, the stage built fine"),
        Err(problems) => problems,
    }
}
