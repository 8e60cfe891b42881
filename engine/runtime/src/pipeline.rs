//! A loaded pipeline and how one run of it goes: check the filter, then call the stages in
//! order, timing each, applying its timeout and error policy.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prompter_core::conversation::ConversationState;
use prompter_core::event::{Event, EventKind};
use prompter_core::output::Output;
use prompter_core::plugin::{Drafts, Flow, Plugin, RunScope, StageContext};
use prompter_core::template::Expr;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, debug_span, warn};

use crate::stats::Stats;

/// What to do when a stage fails or times out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// End this run (default).
    Stop,
    /// Go on; the stage's output is `null`.
    Continue,
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
}

/// Where a run's outputs and counters go.
pub struct RunEnv<'a> {
    /// Outputs.
    pub sink: &'a mpsc::Sender<Output>,
    /// Per-conversation output counter.
    pub output_seq: &'a AtomicU64,
    /// Engine counters.
    pub stats: &'a Stats,
}

impl Pipeline {
    /// Whether this pipeline reacts to `kind`.
    pub fn accepts(&self, kind: EventKind) -> bool {
        self.on.contains(&kind)
    }

    /// Runs the pipeline once for `event` (already folded into `state`).
    pub async fn run(&self, event: &Event, state: &ConversationState, env: &RunEnv<'_>) {
        let scope = RunScope::new(event, state);
        if let Some(when) = &self.when {
            match when.is_true(&scope.template_context(&self.name, &[])) {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => {
                    env.stats.stage_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(pipeline = %self.name, conversation = %event.conversation_id, error = %error, "The `when` filter failed; skipping the run.");
                    return;
                }
            }
        }
        env.stats.runs.fetch_add(1, Ordering::Relaxed);
        let drafts = Drafts::default();
        let ended = self.stages(event, &scope, env, &drafts).await;
        close_drafts(&drafts, ended, env.sink).await;
    }

    /// Runs the stages in order; returns why the run ended early, if it did.
    async fn stages(
        &self,
        event: &Event,
        scope: &RunScope<'_>,
        env: &RunEnv<'_>,
        drafts: &Drafts,
    ) -> Option<String> {
        let started = Instant::now();
        let mut outputs: Vec<(String, serde_json::Value)> = Vec::with_capacity(self.stages.len());
        let mut timings: Vec<(String, u64)> = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            let t0 = Instant::now();
            let result = {
                let cx = StageContext {
                    pipeline: &self.name,
                    stage: &stage.id,
                    scope,
                    outputs: &outputs,
                    stage_timings: &timings,
                    started,
                    sink: env.sink,
                    output_seq: env.output_seq,
                    deadline: self.deadline.map(|d| event.received + d),
                    drafts: Some(drafts),
                };
                let span = debug_span!("stage", pipeline = %self.name, stage = %stage.id, plugin = %stage.plugin_name, conversation = %event.conversation_id);
                tokio::time::timeout(stage.timeout, stage.plugin.process(&cx))
                    .instrument(span)
                    .await
            };
            timings.push((stage.id.clone(), t0.elapsed().as_micros() as u64));
            let error = match result {
                Ok(Ok(Flow::Continue(v))) => {
                    outputs.push((stage.id.clone(), v));
                    continue;
                }
                Ok(Ok(Flow::Halt(reason))) => {
                    debug!(pipeline = %self.name, stage = %stage.id, conversation = %event.conversation_id, reason = %reason, "Run halted.");
                    return Some(format!("stage `{}` ended the run: {reason}", stage.id));
                }
                Ok(Err(e)) => format!("{} error: {}", e.kind, error_chain(&e)),
                Err(_) => format!("timed out after {} ms", stage.timeout.as_millis()),
            };
            env.stats.stage_errors.fetch_add(1, Ordering::Relaxed);
            warn!(pipeline = %self.name, stage = %stage.id, plugin = %stage.plugin_name, conversation = %event.conversation_id, error = %error, "Stage failed.");
            match stage.on_error {
                OnError::Stop => return Some(format!("stage `{}` failed: {error}", stage.id)),
                OnError::Continue => outputs.push((stage.id.clone(), serde_json::Value::Null)),
            }
        }
        None
    }
}

/// Completes every draft the run left open (the stage that would have completed it failed,
/// timed out or halted): its last text, no longer `partial`, `degraded` with the reason, so no
/// sink keeps showing a card that is still "being written".
async fn close_drafts(drafts: &Drafts, ended: Option<String>, sink: &mpsc::Sender<Output>) {
    let open: Vec<Output> = drafts
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .drain()
        .map(|(_, o)| o)
        .collect();
    for mut o in open {
        o.version += 1;
        o.partial = false;
        let why = ended
            .clone()
            .unwrap_or_else(|| "no stage delivered the complete answer".into());
        o.degraded = Some(format!("the answer is incomplete: {why}"));
        // A closed sink means the engine is stopping; nothing is left to tell.
        let _ = sink.send(o).await;
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
    use prompter_core::error::PluginError;
    use prompter_core::output::Trigger;
    use prompter_core::test_util::event;
    use serde_json::json;

    enum Behaviour {
        Sleep,
        Fail,
        /// Emits an output whose text lists the earlier stages' outputs.
        Report,
        /// Emits a `partial` draft, as a streaming chat stage does.
        Draft,
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
                    o.partial = true;
                    cx.emit(o).await?;
                    Ok(Flow::Continue(json!({})))
                }
                Behaviour::Report => {
                    let text = serde_json::to_string(cx.outputs).unwrap_or_default();
                    cx.emit(report(cx, text)).await?;
                    Ok(Flow::Continue(json!({})))
                }
            }
        }
    }

    fn report(cx: &StageContext<'_>, text: String) -> Output {
        Output {
            id: cx.next_output_id(),
            version: 1,
            kind: "report".into(),
            conversation_id: cx.event().conversation_id.to_string(),
            pipeline: cx.pipeline.into(),
            title: None,
            text,
            trigger: Trigger::from_event(cx.event()),
            sources: vec![],
            timings: cx.timings(),
            data: serde_json::Value::Null,
            partial: false,
            degraded: None,
        }
    }

    fn stage(id: &str, b: Behaviour, on_error: OnError) -> Arc<Stage> {
        Arc::new(Stage {
            id: id.into(),
            plugin_name: "fake".into(),
            plugin: Arc::new(Fake(b)),
            timeout: Duration::from_millis(100),
            on_error,
        })
    }

    async fn run(p: &Pipeline) -> (Vec<Output>, u64) {
        let e = event(
            "c",
            0,
            json!({"type": "message_response", "messages": [{"payload": {"content": "hi"}}]}),
        );
        let mut state = ConversationState::new("c");
        state.apply(&e);
        let (tx, mut rx) = mpsc::channel(8);
        let seq = AtomicU64::new(0);
        let stats = Stats::default();
        p.run(
            &e,
            &state,
            &RunEnv {
                sink: &tx,
                output_seq: &seq,
                stats: &stats,
            },
        )
        .await;
        drop(tx);
        let mut outs = Vec::new();
        while let Some(o) = rx.recv().await {
            outs.push(o);
        }
        (outs, stats.stage_errors.load(Ordering::Relaxed))
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
    async fn a_draft_left_open_by_a_failing_stage_is_closed_as_incomplete() {
        let p = pipeline(
            None,
            vec![
                stage("answer", Behaviour::Draft, OnError::Stop),
                stage("slow", Behaviour::Sleep, OnError::Stop),
            ],
        );
        let (outs, _) = run(&p).await;
        assert_eq!(outs.len(), 2, "{outs:?}");
        assert!(outs[0].partial);
        assert_eq!(
            (outs[1].id.as_str(), outs[1].version),
            (outs[0].id.as_str(), 2)
        );
        assert!(!outs[1].partial);
        assert_eq!(outs[1].text, "Acknowledge the");
        assert_eq!(
            outs[1].degraded.as_deref(),
            Some("the answer is incomplete: stage `slow` failed: timed out after 100 ms")
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
