//! A loaded pipeline and how one run of it goes: call the stages in order, timing each,
//! applying its timeout and error policy.
//!
//! It does not own when runs start, how they overlap, or closing what a run leaves open (the
//! conversation task in [`crate::engine`] does).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prompter_core::book::Host;
use prompter_core::event::{Event, EventKind};
use prompter_core::output::{event_part, output_id, slug};
use prompter_core::plugin::{Flow, Outputs, Plugin, Run, RunScope, StageContext, StageOutput};
use prompter_core::template::{Expr, Template};
use tracing::{Instrument, debug, debug_span, warn};

use crate::metrics::{PipelineMetrics, RunOutcome, StageMetrics};
use crate::stats::Stats;

/// What to do when a stage fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// End this run (default).
    Stop,
    /// Go on; the stage's output is `null`.
    Continue,
}

/// Which runs an overloaded engine sheds first (`priority:` of a pipeline; see
/// [`crate::config::Overload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Shed first: when half the engine's run slots are taken (under `overload: shed`).
    Low,
    /// Shed when every run slot is taken (default).
    #[default]
    Normal,
    /// Never shed: runs even past the limit.
    High,
}

impl Priority {
    /// Its name in configs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// How runs of one pipeline in one conversation overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Concurrency {
    /// Each trigger runs at once, beside the runs still in flight (default).
    #[default]
    Parallel,
    /// Runs go one after another, in the order of their triggers.
    Queue,
    /// A newer trigger with the same `supersede` key cancels the run in flight (its drafts are
    /// withdrawn).
    LatestWins,
}

/// One stage, built.
pub struct Stage {
    /// Its id.
    pub id: String,
    /// The plugin name.
    pub plugin_name: String,
    /// The built plugin.
    pub plugin: Arc<dyn Plugin>,
    /// Its timeout.
    pub timeout: Duration,
    /// Its error policy.
    pub on_error: OnError,
    /// Its metric handles, resolved on first use.
    pub metrics: OnceLock<Arc<StageMetrics>>,
    /// What it is: a hash of its plugin, its definition in the pipeline file and the file's
    /// folder. A reload keeps a conversation's state for this stage only while it is equal.
    pub fingerprint: u64,
}

/// One pipeline, built.
pub struct Pipeline {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: Option<String>,
    /// The file it came from.
    pub file: PathBuf,
    /// The event kinds it reacts to.
    pub on: Vec<EventKind>,
    /// The filter.
    pub when: Option<Expr>,
    /// The stages, in order.
    pub stages: Vec<Arc<Stage>>,
    /// When the run's answer is due, counted from the event's receipt (`deadline_ms`).
    pub deadline: Option<Duration>,
    /// How runs overlap.
    pub concurrency: Concurrency,
    /// Which of its runs an overloaded engine sheds (`priority:`).
    pub priority: Priority,
    /// What the run's card is about (`key`): runs with the same key update one output.
    pub key: Option<Template>,
    /// Which runs a newer one supersedes under `latest_wins` (`supersede`; default: `key`).
    pub supersede: Option<Template>,
    /// Named sinks (the engine config's `sinks:`) this pipeline's outputs go to.
    pub sinks: Vec<String>,
    /// Its metric handles, resolved on first use.
    pub metrics: OnceLock<PipelineMetrics>,
}

impl Pipeline {
    /// Its metric handles (in `stats`' registry).
    pub fn metrics(&self, stats: &Stats) -> &PipelineMetrics {
        self.metrics
            .get_or_init(|| stats.metrics.pipeline(&self.name))
    }

    /// Whether this pipeline reacts to `kind`.
    pub fn accepts(&self, kind: EventKind) -> bool {
        self.on.contains(&kind)
    }

    /// Whether the `when` filter lets `scope`'s event through (a failing filter does not).
    pub fn admits(&self, scope: &RunScope, stats: &Stats) -> bool {
        let Some(when) = &self.when else { return true };
        match when.is_true(&scope.template_context(&self.name, &Outputs::new())) {
            Ok(pass) => pass,
            Err(error) => {
                stats.stage_errors.fetch_add(1, Ordering::Relaxed);
                warn!(pipeline = %self.name, conversation = %scope.event.conversation_id, error = %error, "The `when` filter failed; skipping the run.");
                false
            }
        }
    }

    /// The id of the output a run for `scope`'s event is about: the `key` template when the
    /// pipeline has one; for a tracker, its name (a tracker that fires again updates its card
    /// instead of stacking another); otherwise named after the event itself.
    pub fn output_id(&self, scope: &RunScope) -> String {
        let e: &Event = &scope.event;
        let key = match (&self.key, e.tracker()) {
            (Some(t), _) => t
                .render(&scope.template_context(&self.name, &Outputs::new()))
                .map(|k| k.trim().to_owned())
                .ok()
                .filter(|k| !k.is_empty()),
            (None, Some(hit)) => Some(hit.name.clone()),
            (None, None) => None,
        };
        let what = match key {
            Some(k) => slug(&k),
            None => event_part(e.identity()),
        };
        output_id(&e.conversation_id, &self.name, &what)
    }

    /// The key under which a `latest_wins` run supersedes older ones: `supersede` when set,
    /// else the run's output id.
    pub fn supersede_key(&self, scope: &RunScope, output_id: &str) -> String {
        self.supersede
            .as_ref()
            .and_then(|t| {
                t.render(&scope.template_context(&self.name, &Outputs::new()))
                    .ok()
            })
            .map(|k| k.trim().to_owned())
            .unwrap_or_else(|| output_id.to_owned())
    }

    /// Runs the stages in order; returns why the run ended early, if it did. `first_done` is
    /// dropped once the first stage has finished (the engine lets the next run of this
    /// pipeline start then, so first stages such as `dedupe` decide in trigger order).
    pub async fn run(
        &self,
        scope: &RunScope,
        run: &Run,
        host: &dyn Host,
        stats: &Stats,
        mut first_done: Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Option<String> {
        stats.runs.fetch_add(1, Ordering::Relaxed);
        let event = &scope.event;
        let started = Instant::now();
        let metrics = self.metrics(stats);
        // Outputs are counted, with the time since their trigger was received, on their way out.
        let host = &Metered {
            inner: host,
            metrics,
            received: event.received,
        };
        let end = |outcome| metrics.run(outcome, started.elapsed().as_secs_f64());
        let mut outputs = Outputs::new();
        let mut timings: Vec<(String, u64)> = Vec::with_capacity(self.stages.len());
        let mut waited_us = 0u64;
        for stage in &self.stages {
            let stage_metrics = stage.metrics.get_or_init(|| {
                Arc::new(
                    stats
                        .metrics
                        .stage(&self.name, &stage.id, &stage.plugin_name),
                )
            });
            let t0 = Instant::now();
            let result = {
                let cx = StageContext {
                    pipeline: &self.name,
                    stage: &stage.id,
                    scope,
                    outputs: &outputs,
                    stage_timings: &timings,
                    waited_us,
                    started,
                    deadline: self.deadline.map(|d| event.received + d),
                    run,
                    host,
                };
                let span = debug_span!("stage", pipeline = %self.name, stage = %stage.id, plugin = %stage.plugin_name, conversation = %event.conversation_id);
                // What the stage reports (a fallback answered) reaches its metrics.
                let meter: Arc<dyn prompter_core::meter::StageMeter> = stage_metrics.clone();
                let call = prompter_core::meter::stage_scope(meter, stage.plugin.process(&cx));
                match tokio::time::timeout(stage.timeout, call)
                    .instrument(span)
                    .await
                {
                    Ok((result, waited)) => {
                        waited_us += waited.as_micros() as u64;
                        Ok(result)
                    }
                    Err(elapsed) => Err(elapsed),
                }
            };
            let took = t0.elapsed();
            timings.push((stage.id.clone(), took.as_micros() as u64));
            stage_metrics.observe(took.as_secs_f64());
            drop(first_done.take());
            let error = match result {
                Ok(Ok(Flow::Continue(v))) => {
                    outputs.push(stage.id.as_str(), StageOutput::json(v));
                    continue;
                }
                Ok(Ok(Flow::Output(o))) => {
                    // The stage's context (and any `stages` template value) is gone by now, so
                    // the push shares the earlier outputs instead of copying them.
                    outputs.push(stage.id.as_str(), o);
                    continue;
                }
                Ok(Ok(Flow::Halt(reason))) => {
                    debug!(pipeline = %self.name, stage = %stage.id, conversation = %event.conversation_id, reason = %reason, "Run halted.");
                    end(RunOutcome::Halted);
                    return Some(format!("stage `{}` ended the run: {reason}", stage.id));
                }
                Ok(Err(e)) => {
                    stage_metrics.error(false);
                    format!("{} error: {}", e.kind, error_chain(&e))
                }
                Err(_) => {
                    stage_metrics.error(true);
                    format!("timed out after {} ms", stage.timeout.as_millis())
                }
            };
            stats.stage_errors.fetch_add(1, Ordering::Relaxed);
            warn!(pipeline = %self.name, stage = %stage.id, plugin = %stage.plugin_name, conversation = %event.conversation_id, error = %error, "Stage failed.");
            match stage.on_error {
                OnError::Stop => {
                    end(RunOutcome::Failed);
                    return Some(format!("stage `{}` failed: {error}", stage.id));
                }
                OnError::Continue => {
                    outputs.push(
                        stage.id.as_str(),
                        StageOutput::json(serde_json::Value::Null),
                    );
                }
            }
        }
        end(RunOutcome::Completed);
        None
    }
}

/// The engine's host as a run's stages see it: it counts each output delivered (status,
/// degraded, time since the trigger was received) in the pipeline's metrics.
struct Metered<'a> {
    inner: &'a dyn Host,
    metrics: &'a PipelineMetrics,
    received: Instant,
}

#[prompter_core::async_trait]
impl Host for Metered<'_> {
    async fn deliver(
        &self,
        output: prompter_core::output::Output,
    ) -> Result<prompter_core::output::Output, prompter_core::error::PluginError> {
        let delivered = self.inner.deliver(output).await?;
        self.metrics.output(
            delivered.status.as_str(),
            delivered.degraded.is_some(),
            self.received.elapsed().as_secs_f64(),
        );
        Ok(delivered)
    }
    fn claim(&self, run: u64, scope: &str, key: &str, at_ms: u64, cooldown_ms: u64) -> bool {
        self.inner.claim(run, scope, key, at_ms, cooldown_ms)
    }
    fn get(&self, scope: &str, key: &str) -> Option<String> {
        self.inner.get(scope, key)
    }
    fn set(&self, scope: &str, key: &str, value: Option<String>) {
        self.inner.set(scope, key, value);
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::async_trait;
    use prompter_core::book::LocalHost;
    use prompter_core::conversation::ConversationState;
    use prompter_core::error::PluginError;
    use prompter_core::output::{Output, Status, Trigger};
    use prompter_core::plugin::Typed;
    use prompter_core::resource::ScoredDocument;
    use prompter_core::test_util::event;
    use serde_json::json;

    enum Behaviour {
        Sleep,
        Fail,
        /// Emits an output whose text lists the earlier stages' outputs.
        Report,
        /// Emits a `draft` output, as a streaming chat stage does.
        Draft,
        /// Outputs documents, typed, as the `retrieve` stage does.
        Documents,
        /// Emits an output saying whether the documents reached it typed, and what a template
        /// reads of them.
        ReadDocuments,
    }

    struct Fake(Behaviour);

    #[async_trait]
    impl Plugin for Fake {
        async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
            match self.0 {
                Behaviour::Sleep => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(Flow::Continue(json!("slept")))
                }
                Behaviour::Fail => Err(PluginError::external("upstream said 503")),
                Behaviour::Draft => {
                    let mut o = report(cx, "Acknowledge the".into());
                    o.status = Status::Draft;
                    cx.emit(o).await?;
                    Ok(Flow::Continue(json!({})))
                }
                Behaviour::Documents => Ok(Flow::Output(StageOutput::typed(Typed::Documents {
                    query: "budget".into(),
                    documents: vec![ScoredDocument {
                        id: "d1".into(),
                        text: "Budget".into(),
                        data: "Offer a pilot.".into(),
                        score: 0.5,
                    }]
                    .into(),
                    degraded: None,
                }))),
                Behaviour::ReadDocuments => {
                    let typed = cx.stage_output("kb").and_then(StageOutput::as_typed);
                    let docs = cx.documents(None)?;
                    let t = Template::compile("{{ stages.kb.documents[0].data }}").unwrap();
                    let text = format!(
                        "typed: {}, {} document(s), template: {}",
                        matches!(typed, Some(Typed::Documents { .. })),
                        docs.len(),
                        cx.render(&t)?
                    );
                    cx.emit(report(cx, text)).await?;
                    Ok(Flow::Continue(json!({})))
                }
                Behaviour::Report => {
                    let text = serde_json::to_string(cx.outputs.as_slice()).unwrap_or_default();
                    cx.emit(report(cx, text)).await?;
                    Ok(Flow::Continue(json!({})))
                }
            }
        }
    }

    fn report(cx: &StageContext<'_>, text: String) -> Output {
        Output {
            id: cx.output_id(),
            version: 0,
            status: Status::Final,
            seq: 0,
            kind: "report".into(),
            conversation_id: cx.event().conversation_id.to_string(),
            pipeline: cx.pipeline.into(),
            title: None,
            text,
            trigger: Trigger::from_event(cx.event()),
            sources: vec![],
            timings: cx.timings(),
            model: None,
            data: serde_json::Value::Null,
            degraded: None,
            generation: 0,
        }
    }

    fn stage(id: &str, b: Behaviour, on_error: OnError) -> Arc<Stage> {
        Arc::new(Stage {
            id: id.into(),
            plugin_name: "fake".into(),
            plugin: Arc::new(Fake(b)),
            timeout: Duration::from_millis(100),
            on_error,
            metrics: Default::default(),
            fingerprint: 0,
        })
    }

    async fn run(p: &Pipeline) -> (Vec<Output>, u64) {
        run_ended(p).await.0
    }

    /// Runs `p` once on a message; what it delivered, its stage errors, and why it ended early.
    async fn run_ended(p: &Pipeline) -> ((Vec<Output>, u64), Option<String>, Run) {
        let e = Arc::new(event(
            "c",
            0,
            json!({"type": "message_response", "messages": [{"payload": {"content": "hi"}}]}),
        ));
        let mut state = ConversationState::new("c");
        state.apply(&e);
        let scope = RunScope::new(e, Arc::new(state));
        let host = LocalHost::default();
        let stats = Stats::default();
        let run = Run::new(1, p.output_id(&scope));
        let ended = if p.admits(&scope, &stats) {
            p.run(&scope, &run, &host, &stats, None).await
        } else {
            None
        };
        (
            (host.take(), stats.stage_errors.load(Ordering::Relaxed)),
            ended,
            run,
        )
    }

    fn pipeline(when: Option<&str>, stages: Vec<Arc<Stage>>) -> Pipeline {
        Pipeline {
            name: "p".into(),
            description: None,
            file: "p.yaml".into(),
            on: vec![EventKind::MessageResponse],
            when: when.map(|w| Expr::compile(w).unwrap()),
            stages,
            deadline: None,
            concurrency: Concurrency::Parallel,
            priority: Default::default(),
            key: None,
            supersede: None,
            sinks: Vec::new(),
            metrics: Default::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_and_failures_follow_the_error_policy() {
        let cont = pipeline(
            None,
            vec![
                stage("slow", Behaviour::Sleep, OnError::Continue),
                stage("flaky", Behaviour::Fail, OnError::Continue),
                stage("out", Behaviour::Report, OnError::Stop),
            ],
        );
        let (outs, errors) = run(&cont).await;
        assert_eq!(errors, 2);
        assert_eq!(outs[0].text, r#"[["slow",null],["flaky",null]]"#);
        assert!(outs[0].timings.stages_us.contains_key("slow"));

        let stop = pipeline(
            None,
            vec![
                stage("flaky", Behaviour::Fail, OnError::Stop),
                stage("out", Behaviour::Report, OnError::Stop),
            ],
        );
        let (outs, errors) = run(&stop).await;
        assert_eq!((outs.len(), errors), (0, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_that_fails_after_a_draft_says_why_and_leaves_it_open_for_the_engine() {
        let p = pipeline(
            None,
            vec![
                stage("answer", Behaviour::Draft, OnError::Stop),
                stage("slow", Behaviour::Sleep, OnError::Stop),
            ],
        );
        let ((outs, _), ended, run) = run_ended(&p).await;
        assert_eq!(outs.len(), 1, "{outs:?}");
        assert_eq!((outs[0].status, outs[0].version), (Status::Draft, 1));
        assert_eq!(
            ended.as_deref(),
            Some("stage `slow` failed: timed out after 100 ms")
        );
        assert!(!run.delivered());
        let open = run.take_open_drafts();
        assert_eq!(open.len(), 1, "the engine closes this draft");
        assert_eq!(open[0].text, "Acknowledge the");
    }

    #[tokio::test]
    async fn a_typed_output_reaches_later_stages_typed_and_templates_as_json() {
        let p = pipeline(
            None,
            vec![
                stage("kb", Behaviour::Documents, OnError::Stop),
                stage("out", Behaviour::ReadDocuments, OnError::Stop),
            ],
        );
        let (outs, errors) = run(&p).await;
        assert_eq!(errors, 0);
        assert_eq!(
            outs[0].text,
            "typed: true, 1 document(s), template: Offer a pilot."
        );
    }

    #[tokio::test]
    async fn when_filters_runs() {
        let yes = pipeline(
            Some("event.message.text == 'hi'"),
            vec![stage("out", Behaviour::Report, OnError::Stop)],
        );
        let no = pipeline(
            Some("event.message.text == 'bye'"),
            vec![stage("out", Behaviour::Report, OnError::Stop)],
        );
        assert_eq!(run(&yes).await.0.len(), 1);
        assert_eq!(run(&no).await.0.len(), 0);
    }
}
