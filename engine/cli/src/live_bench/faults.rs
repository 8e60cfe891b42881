//! Faults the live bench injects into a run (`prompter bench --live-calls N --fault KIND`), and
//! the switch the fakes read to play them.
//!
//! A fault starts [`FAULT_AT`] into the steady window, lasts [`Fault::lasts`], and is then
//! cleared; the window goes on long enough for the engine to recover, and the run is accounted
//! for as any other (every event, every output version, every final card), plus what the
//! fault did and what the engine says it did about it (reconnects, retries, fallbacks, dead
//! letters), read from its metrics.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

/// When the fault starts, after the steady window began.
pub(super) const FAULT_AT: Duration = Duration::from_secs(5);
/// The shortest window a fault run takes: the fault, then time to recover.
pub(super) const MIN_FAULT_WINDOW: u64 = 30;
/// How long a frozen (half-open) Subscribe socket is held before the fake lets it go.
pub(super) const HALF_OPEN_HOLD: Duration = Duration::from_secs(15);
/// Frames a dropped Subscribe socket sends again on the next socket of its call, as Symbl
/// may redeliver around a reconnect (the engine must drop them).
pub(super) const REPLAY: usize = 2;
/// How long a faulty model request is held before it is answered (longer than the bench
/// config's 5 s per-attempt timeout: the engine gives up first).
pub(super) const HANG: Duration = Duration::from_secs(30);

/// A fault the live bench can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// Every open Subscribe socket is dropped at once (no close frame); the fake sends the
    /// last 2 frames of each call again on its next socket.
    SubscribeDrop,
    /// Every open Subscribe socket goes silent and deaf (no frames, no pongs) but stays open:
    /// the engine must notice (the bench's config pings every second and drops a socket
    /// silent for 4 s) and reconnect.
    HalfOpen,
    /// Every Subscribe socket is dropped and the token they used is revoked (401), while the
    /// token endpoint answers 503 for the fault's length: a reconnect storm against a failing
    /// auth service.
    TokenStorm,
    /// Nebula's chat answers 503 to every request.
    #[value(name = "llm-5xx")]
    Llm5xx,
    /// Nebula's chat takes every request and never answers in time.
    LlmTimeout,
    /// Nebula's chat streams the first words of each answer, then stalls.
    LlmStall,
    /// Nebula's embeddings answer 503.
    #[value(name = "embed-5xx")]
    Embed5xx,
    /// Nebula's embeddings never answer in time.
    EmbedTimeout,
    /// The webhook sink's receiver stops answering (requests time out) for the fault's length.
    SinkStall,
    /// The engine is paused (SIGSTOP) for the fault's length, then resumed (SIGCONT).
    Pause,
    /// The engine is told to stop (SIGTERM) under load (1 s after the last call was placed):
    /// it must close its sockets, handle every event it accepted, finish every output it
    /// began and exit 0.
    Terminate,
}

impl Fault {
    /// How long the fault lasts once started (a drop or a signal is instantaneous).
    pub(super) fn lasts(self) -> Duration {
        match self {
            Fault::SubscribeDrop | Fault::HalfOpen => Duration::ZERO,
            // Calls stop being placed, then SIGTERM once the last ones placed are live.
            Fault::Terminate => Duration::from_secs(1),
            Fault::TokenStorm => Duration::from_secs(8),
            Fault::Pause => Duration::from_secs(5),
            _ => Duration::from_secs(10),
        }
    }

    /// Its name on the command line.
    pub(super) fn name(self) -> &'static str {
        match self {
            Fault::SubscribeDrop => "subscribe-drop",
            Fault::HalfOpen => "half-open",
            Fault::TokenStorm => "token-storm",
            Fault::Llm5xx => "llm-5xx",
            Fault::LlmTimeout => "llm-timeout",
            Fault::LlmStall => "llm-stall",
            Fault::Embed5xx => "embed-5xx",
            Fault::EmbedTimeout => "embed-timeout",
            Fault::SinkStall => "sink-stall",
            Fault::Pause => "pause",
            Fault::Terminate => "terminate",
        }
    }

    /// What the fault does, for the report.
    pub(super) fn what(self) -> &'static str {
        match self {
            Fault::SubscribeDrop => {
                "every open Subscribe socket dropped at once (no close frame); each call's last 2 frames sent again on its next socket"
            }
            Fault::HalfOpen => {
                "every open Subscribe socket silent and deaf (no frames, no pongs) but left open for 15 s"
            }
            Fault::TokenStorm => {
                "every Subscribe socket dropped, its token revoked (401), the token endpoint answering 503 for 8 s"
            }
            Fault::Llm5xx => "Nebula chat answering 503 to every request for 10 s",
            Fault::LlmTimeout => "Nebula chat holding every request unanswered for 10 s",
            Fault::LlmStall => {
                "Nebula chat streaming the first words of each answer, then stalling, for 10 s"
            }
            Fault::Embed5xx => {
                "Nebula embeddings answering 503 for 10 s (retrieval queries made new to the embedding cache: tracker name and call id)"
            }
            Fault::EmbedTimeout => {
                "Nebula embeddings holding every request unanswered for 10 s (retrieval queries made new to the embedding cache)"
            }
            Fault::SinkStall => "the webhook receiver holding every request unanswered for 10 s",
            Fault::Pause => "the engine stopped (SIGSTOP) for 5 s, then continued (SIGCONT)",
            Fault::Terminate => {
                "no new call placed, then 1 s later the engine told to stop (SIGTERM) in the middle of the load"
            }
        }
    }

    /// Whether the fakes' sockets need the fast keepalive (the half-open fault must be noticed
    /// within the window).
    pub(super) fn fast_keepalive(self) -> bool {
        self == Fault::HalfOpen
    }

    /// Whether each call's retrieval queries are made new to the embedding cache (else the
    /// tracker names, which repeat, would be answered from it and the embedder never asked).
    pub(super) fn uncached_queries(self) -> bool {
        matches!(self, Fault::Embed5xx | Fault::EmbedTimeout)
    }

    /// Whether the engine's config gets the webhook sink.
    pub(super) fn needs_webhook(self) -> bool {
        self == Fault::SinkStall
    }
}

/// The switch the fakes read: which fault, whether it is on, and what it did.
#[derive(Debug)]
pub(super) struct FaultSwitch {
    pub(super) fault: Option<Fault>,
    on: AtomicBool,
    /// Bumped to drop (or freeze) every open Subscribe socket.
    pub(super) sockets: watch::Sender<u64>,
    /// The token generation the fake Symbl accepts (bumped by the token storm).
    token_generation: AtomicU64,
    /// What the fault did: sockets dropped or frozen, requests answered with an error, held,
    /// or stalled, token requests refused.
    pub(super) sockets_hit: AtomicU64,
    pub(super) requests_hit: AtomicU64,
    pub(super) tokens_refused: AtomicU64,
    pub(super) tokens_issued: AtomicU64,
    /// Frames sent a second time after a drop.
    pub(super) frames_replayed: AtomicU64,
}

impl Default for FaultSwitch {
    fn default() -> Self {
        FaultSwitch::new(None)
    }
}

impl FaultSwitch {
    pub(super) fn new(fault: Option<Fault>) -> FaultSwitch {
        FaultSwitch {
            fault,
            on: AtomicBool::new(false),
            sockets: watch::Sender::new(0),
            token_generation: AtomicU64::new(0),
            sockets_hit: AtomicU64::new(0),
            requests_hit: AtomicU64::new(0),
            tokens_refused: AtomicU64::new(0),
            tokens_issued: AtomicU64::new(0),
            frames_replayed: AtomicU64::new(0),
        }
    }

    /// Whether `fault` is the one injected and it is on now.
    pub(super) fn active(&self, fault: Fault) -> bool {
        self.fault == Some(fault) && self.on.load(Ordering::Relaxed)
    }

    /// Turns the fault on: sockets are dropped or frozen at once, the token rotated.
    pub(super) fn start(&self) {
        self.on.store(true, Ordering::Relaxed);
        if matches!(
            self.fault,
            Some(Fault::SubscribeDrop | Fault::HalfOpen | Fault::TokenStorm)
        ) {
            if self.fault == Some(Fault::TokenStorm) {
                self.token_generation.fetch_add(1, Ordering::Relaxed);
            }
            self.sockets.send_modify(|g| *g += 1);
        }
    }

    pub(super) fn stop(&self) {
        self.on.store(false, Ordering::Relaxed);
    }

    /// The access token the fake Symbl accepts now.
    pub(super) fn token(&self) -> String {
        match self.token_generation.load(Ordering::Relaxed) {
            0 => crate::bench_child::SYMBL_TOKEN.to_owned(),
            g => format!("{}-{g}", crate::bench_child::SYMBL_TOKEN),
        }
    }

    pub(super) fn hit(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The output ids (hashed as the bench's output log hashes them) of the `webhook-id`s the
/// receiver kept (`<output id>:<version>`).
pub(super) fn delivered_ids(
    kept: &std::sync::Mutex<std::collections::HashSet<String>>,
) -> std::collections::HashSet<u64> {
    let kept = kept
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    kept.iter()
        .map(|w| {
            let id = w.rsplit_once(':').map_or(w.as_str(), |(id, _)| id);
            prompter_core::output::fnv1a(id.as_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_storm_revokes_the_token_and_the_switch_tells_fakes_apart() {
        let s = FaultSwitch::new(Some(Fault::TokenStorm));
        let before = s.token();
        assert!(!s.active(Fault::TokenStorm));
        let sockets = s.sockets.subscribe();
        s.start();
        assert!(s.active(Fault::TokenStorm));
        assert!(!s.active(Fault::Llm5xx));
        assert_ne!(s.token(), before);
        assert!(sockets.has_changed().unwrap());
        s.stop();
        assert!(!s.active(Fault::TokenStorm));
        // The new token stays valid after the storm.
        assert_ne!(s.token(), before);
        let none = FaultSwitch::new(None);
        none.start();
        assert!(!none.active(Fault::Pause));
        assert_eq!(none.token(), crate::bench_child::SYMBL_TOKEN);
    }

    #[test]
    fn webhook_ids_are_read_as_output_ids() {
        let kept = std::sync::Mutex::new(
            [
                "load-000001/rta_live/k-budget:3",
                "load-000002/call_recap/e-00ff:1",
            ]
            .map(str::to_owned)
            .into_iter()
            .collect(),
        );
        let ids = delivered_ids(&kept);
        assert!(ids.contains(&prompter_core::output::fnv1a(
            b"load-000001/rta_live/k-budget"
        )));
        assert_eq!(ids.len(), 2);
    }

    #[test]
    fn every_fault_has_a_name_a_description_and_a_length_the_window_holds() {
        use clap::ValueEnum;
        for f in Fault::value_variants() {
            assert_eq!(
                f.to_possible_value().map(|v| v.get_name().to_owned()),
                Some(f.name().to_owned())
            );
            assert!(!f.what().is_empty());
            assert!(
                FAULT_AT + f.lasts() + Duration::from_secs(15)
                    <= Duration::from_secs(MIN_FAULT_WINDOW)
            );
        }
    }
}
