//! The router: one task per live conversation, so a conversation's events are handled in order
//! while different conversations proceed in parallel.
//!
//! Each conversation task owns its [`ConversationState`]: it folds each event in, then runs every
//! pipeline that reacts to the event's kind. The task ends, releasing the state and telling the
//! stages, when the conversation completes or has been idle for `conversation_idle`. Its queue
//! is bounded, so a slow conversation applies backpressure to its source instead of growing
//! memory without limit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prompter_core::conversation::ConversationState;
use prompter_core::event::{Event, EventKind};
use prompter_core::output::Output;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;

use crate::config::Settings;
use crate::pipeline::{Pipeline, RunEnv};
use crate::stats::Stats;

/// Routes events to conversation tasks. Shared by reference (`&self` everywhere), so several
/// sources can dispatch at once: a source waits only when *its* conversation's queue is full,
/// never behind another conversation.
pub struct Router {
    pipelines: Arc<Vec<Pipeline>>,
    settings: Settings,
    sink: mpsc::Sender<Output>,
    stats: Arc<Stats>,
    conversations: Mutex<HashMap<Arc<str>, mpsc::Sender<Event>>>,
    tasks: Mutex<JoinSet<()>>,
    /// Set by [`Router::finish`]: no conversation starts after it.
    finished: std::sync::atomic::AtomicBool,
    /// The last output number of each released conversation, so a conversation that comes
    /// back (late events, a call followed again) continues its numbering instead of reusing
    /// output ids that sinks already show. Bounded by [`LAST_SEQ_CAPACITY`].
    last_seq: Arc<Mutex<HashMap<Arc<str>, u64>>>,
}

/// Released conversations whose output numbering is remembered.
const LAST_SEQ_CAPACITY: usize = 65_536;

impl Router {
    /// A router over `pipelines`, delivering outputs to `sink`.
    pub fn new(
        pipelines: Vec<Pipeline>,
        settings: Settings,
        sink: mpsc::Sender<Output>,
        stats: Arc<Stats>,
    ) -> Self {
        Router {
            pipelines: Arc::new(pipelines),
            settings,
            sink,
            stats,
            conversations: Mutex::new(HashMap::new()),
            tasks: Mutex::new(JoinSet::new()),
            finished: std::sync::atomic::AtomicBool::new(false),
            last_seq: Arc::default(),
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Hands `event` to its conversation's task, starting one if needed. Waits when that
    /// conversation's queue is full.
    pub async fn dispatch(&self, event: Event) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        let mut event = event;
        loop {
            let Some(tx) = self.sender(&event.conversation_id) else {
                tracing::error!(conversation = %event.conversation_id, kind = %event.kind, "An event arrived after the engine finished; it is not handled.");
                return;
            };
            match tx.send(event).await {
                Ok(()) => return,
                // The task ended (completed or idle) between events: start a fresh one.
                Err(mpsc::error::SendError(back)) => {
                    let mut map = lock(&self.conversations);
                    if map
                        .get(&back.conversation_id)
                        .is_some_and(mpsc::Sender::is_closed)
                    {
                        map.remove(&back.conversation_id);
                    }
                    event = back;
                }
            }
        }
    }

    /// The queue of conversation `id`, opening its task when there is none.
    fn sender(&self, id: &Arc<str>) -> Option<mpsc::Sender<Event>> {
        let mut map = lock(&self.conversations);
        if self.finished.load(Ordering::SeqCst) {
            return None;
        }
        if let Some(tx) = map.get(id)
            && !tx.is_closed()
        {
            return Some(tx.clone());
        }
        // Drop the senders of tasks that have ended, so the map only holds live conversations.
        if map.len() >= 64 {
            map.retain(|_, tx| !tx.is_closed());
        }
        let mut tasks = lock(&self.tasks);
        while let Some(res) = tasks.try_join_next() {
            if let Err(e) = res {
                tracing::error!(error = %e, "A conversation task panicked.");
            }
        }
        let (tx, rx) = mpsc::channel(self.settings.queue_capacity);
        map.insert(id.clone(), tx.clone());
        self.stats
            .conversations_opened
            .fetch_add(1, Ordering::Relaxed);
        let task = ConversationTask {
            state: ConversationState::new(id),
            pipelines: self.pipelines.clone(),
            sink: self.sink.clone(),
            stats: self.stats.clone(),
            idle: self.settings.conversation_idle,
            output_seq: AtomicU64::new(lock(&self.last_seq).remove(id).unwrap_or(0)),
            last_seq: self.last_seq.clone(),
        };
        tasks.spawn(task.run(rx));
        Some(tx)
    }

    /// Closes every conversation queue and waits until all queued events are handled. Events
    /// dispatched afterwards are not handled (and logged as errors).
    pub async fn finish(&self) {
        {
            let mut map = lock(&self.conversations);
            self.finished.store(true, Ordering::SeqCst);
            map.clear();
        }
        let mut tasks = std::mem::take(&mut *lock(&self.tasks));
        while let Some(res) = tasks.join_next().await {
            if let Err(e) = res {
                tracing::error!(error = %e, "A conversation task panicked.");
            }
        }
    }
}

/// Locks a mutex; a poisoned one is still consistent here (every update is one insert/remove).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct ConversationTask {
    state: ConversationState,
    pipelines: Arc<Vec<Pipeline>>,
    sink: mpsc::Sender<Output>,
    stats: Arc<Stats>,
    idle: std::time::Duration,
    output_seq: AtomicU64,
    last_seq: Arc<Mutex<HashMap<Arc<str>, u64>>>,
}

impl ConversationTask {
    /// Folds `event` in and runs the pipelines; true when the conversation completed.
    async fn handle(&mut self, event: Event) -> bool {
        let t0 = Instant::now();
        self.state.apply(&event);
        let env = RunEnv {
            sink: &self.sink,
            output_seq: &self.output_seq,
            stats: &self.stats,
        };
        for p in self.pipelines.iter().filter(|p| p.accepts(event.kind)) {
            p.run(&event, &self.state, &env).await;
        }
        self.stats.sample(t0.elapsed().as_nanos() as u64);
        event.kind == EventKind::ConversationCompleted
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        loop {
            match tokio::time::timeout(self.idle, rx.recv()).await {
                Ok(Some(event)) => {
                    if self.handle(event).await {
                        debug!(conversation = %self.state.id, "Conversation completed; releasing its state.");
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    debug!(conversation = %self.state.id, "Conversation idle; releasing its state.");
                    break;
                }
            }
        }
        // Refuse new events (the router starts a fresh task for late ones), but handle every
        // event already accepted into the queue: nothing accepted is dropped.
        rx.close();
        while let Some(event) = rx.recv().await {
            self.handle(event).await;
        }
        self.stats
            .conversations_released
            .fetch_add(1, Ordering::Relaxed);
        let seq = self.output_seq.load(Ordering::Relaxed);
        if seq > 0 {
            let mut last = lock(&self.last_seq);
            if last.len() >= LAST_SEQ_CAPACITY {
                last.clear();
            }
            last.insert(Arc::from(&*self.state.id), seq);
        }
        for p in self.pipelines.iter() {
            for s in &p.stages {
                s.plugin.conversation_ended(&self.state.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{OnError, Stage};
    use prompter_core::async_trait;
    use prompter_core::error::PluginError;
    use prompter_core::plugin::{Flow, Plugin, StageContext};
    use prompter_core::test_util::event;
    use serde_json::json;
    use std::sync::Mutex;
    use std::time::Duration;
    use tokio::sync::Notify;

    /// Records (conversation, text) of every message it sees. For message `a1` it first waits
    /// until conversation `b` has been handled: that only finishes if conversations run in
    /// parallel.
    #[derive(Default)]
    struct Probe {
        seen: Mutex<Vec<(String, String)>>,
        b_done: Notify,
        ended: Mutex<Vec<String>>,
        /// The output id each run would give its output.
        ids: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Plugin for Probe {
        async fn process(&self, cx: &StageContext<'_>) -> Result<Flow, PluginError> {
            let e = cx.event();
            let text = cx
                .conversation()
                .transcript
                .last()
                .map(|l| l.text.clone())
                .unwrap_or_default();
            if text == "a1" {
                self.b_done.notified().await;
            }
            self.ids.lock().unwrap().push(cx.next_output_id());
            self.seen
                .lock()
                .unwrap()
                .push((e.conversation_id.to_string(), text));
            if &*e.conversation_id == "b" {
                self.b_done.notify_one();
            }
            Ok(Flow::Continue(json!({})))
        }
        fn conversation_ended(&self, id: &str) {
            self.ended.lock().unwrap().push(id.to_owned());
        }
    }

    fn router_with(probe: Arc<Probe>, idle: Duration) -> (Router, mpsc::Receiver<Output>) {
        let pipeline = Pipeline {
            name: "p".into(),
            description: None,
            file: "p.yaml".into(),
            on: vec![EventKind::MessageResponse],
            when: None,
            stages: vec![Arc::new(Stage {
                id: "probe".into(),
                plugin_name: "probe".into(),
                plugin: probe,
                timeout: Duration::from_secs(30),
                on_error: OnError::Stop,
            })],
            deadline: None,
        };
        let settings = Settings {
            conversation_idle: idle,
            ..Settings::default()
        };
        let (tx, rx) = mpsc::channel(16);
        (
            Router::new(vec![pipeline], settings, tx, Arc::new(Stats::default())),
            rx,
        )
    }

    fn said(conv: &str, text: &str) -> Event {
        event(
            conv,
            0,
            json!({"type": "message_response", "messages": [{"from": {"name": "X"}, "payload": {"content": text}}]}),
        )
    }

    #[tokio::test]
    async fn conversations_run_in_parallel_and_each_in_order() {
        let probe = Arc::new(Probe::default());
        let (router, _rx) = router_with(probe.clone(), Duration::from_secs(60));
        router.dispatch(said("a", "a1")).await;
        router.dispatch(said("a", "a2")).await;
        router.dispatch(said("b", "b1")).await;
        // `a1` blocks until `b1` is handled: a router that serialized conversations would hang.
        tokio::time::timeout(Duration::from_secs(10), router.finish())
            .await
            .expect("conversations did not run in parallel");
        let seen = probe.seen.lock().unwrap().clone();
        assert_eq!(seen[0], ("b".to_string(), "b1".to_string()));
        let a: Vec<&str> = seen
            .iter()
            .filter(|(c, _)| c == "a")
            .map(|(_, t)| t.as_str())
            .collect();
        assert_eq!(a, ["a1", "a2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_completed_conversations_are_released() {
        let probe = Arc::new(Probe::default());
        let (router, _rx) = router_with(probe.clone(), Duration::from_secs(30));
        router.dispatch(said("b", "hello")).await;
        router
            .dispatch(event(
                "c",
                0,
                json!({"type": "message", "message": {"type": "conversation_completed"}}),
            ))
            .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            *probe.ended.lock().unwrap(),
            ["c"],
            "completed conversation released at once"
        );
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(
            *probe.ended.lock().unwrap(),
            ["c", "b"],
            "idle conversation released after 30 s"
        );
        // A late event for a released conversation starts it afresh; nothing is lost.
        router.dispatch(said("b", "again")).await;
        router.finish().await;
        assert_eq!(
            probe.seen.lock().unwrap().last().unwrap(),
            &("b".to_string(), "again".to_string())
        );
        assert_eq!(router_stats(&probe), 2);
        // The returning conversation continues its output numbering: no id is reused.
        assert_eq!(*probe.ids.lock().unwrap(), ["b/p/1", "b/p/2"]);
    }

    fn router_stats(probe: &Probe) -> usize {
        probe
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, _)| c == "b")
            .count()
    }
}
