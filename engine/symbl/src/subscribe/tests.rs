//! Tests of the parent module.
use super::*;
use crate::socket::secs;

#[test]
fn redeliveries_are_dropped_within_the_window() {
    let mut seen = Seen::new();
    let a = u64::MAX;
    assert!(seen.first_time(a));
    assert!(!seen.first_time(a));
    for i in 0..DEDUP_WINDOW as u64 {
        assert!(seen.first_time(i));
    }
    // `a` fell out of the window.
    assert!(seen.first_time(a));
    assert!(seen.set.len() <= DEDUP_WINDOW);
    assert!(seen.order.len() <= DEDUP_WINDOW);
}

#[test]
fn tokens_are_redacted_from_errors() {
    assert_eq!(
        redact("GET ws://h/v1/subscribe/x?access_token=abc.def failed"),
        "GET ws://h/v1/subscribe/x?access_token=*** failed"
    );
    assert_eq!(redact("plain"), "plain");
}

#[test]
fn default_options_ping_every_30_s_and_give_up_on_silence_after_75_s() {
    let o = FollowOptions::default();
    assert_eq!(o.ping_every, Duration::from_secs(30));
    assert_eq!(o.idle_timeout, Duration::from_secs(75));
    assert_eq!(o.stable_after, Duration::from_secs(30));
    assert_eq!(secs(o.idle_timeout), "75 s");
    assert_eq!(secs(Duration::from_millis(2_500)), "2.5 s");
}

/// `follow` against the fake Symbl, over real WebSockets.
mod against_the_fake {
    use prompter_fakes::SymblFake;
    use serde_json::{Value, json};

    use super::*;
    use crate::auth::Credentials;

    /// Every wait is bounded by this; exceeding it fails the test loudly.
    const WAIT: Duration = Duration::from_secs(20);
    const ID: &str = "6d1d1b3e-conn";

    fn tiny_backoff() -> Backoff {
        Backoff {
            base_ms: 5,
            max_ms: 20,
            max_retries: 3,
        }
    }

    fn line(n: u32) -> Value {
        json!({"type": "message_response", "messages": [{"payload": {"content": format!("line {n}")}}]})
    }

    fn completed() -> Value {
        json!({"type": "message", "message": {"type": "conversation_completed"}})
    }

    fn auth_for(config: &SymblConfig) -> Arc<SymblAuth> {
        let creds = Credentials::from_lookup(config, |v| match v {
            "SYMBL_APP_ID" => Some("app".into()),
            "SYMBL_APP_SECRET" => Some("s3cret".into()),
            _ => None,
        })
        .unwrap();
        Arc::new(SymblAuth::new(config, creds).unwrap())
    }

    struct Harness {
        fake: SymblFake,
        rx: mpsc::Receiver<Update>,
        stop: watch::Sender<bool>,
        task: tokio::task::JoinHandle<()>,
    }

    /// Follows `ID` on `fake` (tokens from `fake`, the socket on `config.ws_base` when set);
    /// with `options`, through `follow_with`, else through `follow`.
    fn follow_on(fake: SymblFake, config: SymblConfig, options: Option<FollowOptions>) -> Harness {
        let auth = auth_for(&config);
        let (tx, rx) = mpsc::channel(256);
        let (stop, stop_rx) = watch::channel(false);
        let id: Arc<str> = Arc::from(ID);
        let task = tokio::spawn(async move {
            match options {
                Some(o) => follow_with(o, &config, auth, id, tx, stop_rx).await,
                None => follow(&config, auth, id, tx, stop_rx).await,
            }
        });
        Harness {
            fake,
            rx,
            stop,
            task,
        }
    }

    async fn start(reconnect: Backoff, options: Option<FollowOptions>) -> Harness {
        let fake = SymblFake::start("app", "s3cret").await;
        let config = SymblConfig {
            api_base: fake.api_base.clone(),
            reconnect,
            ..SymblConfig::default()
        };
        follow_on(fake, config, options)
    }

    impl Harness {
        async fn next(&mut self) -> Update {
            tokio::time::timeout(WAIT, self.rx.recv())
                .await
                .expect("no update within the bound")
                .expect("follow stopped without sending Ended")
        }

        /// Expects `Connected { reconnects }` and waits until the fake has the subscriber.
        async fn connected(&mut self, reconnects: u32) {
            match self.next().await {
                Update::Connected {
                    connection_id,
                    reconnects: r,
                } => {
                    assert_eq!(&*connection_id, ID);
                    assert_eq!(r, reconnects);
                }
                other => {
                    panic!("expected Connected {{ reconnects: {reconnects} }}, got {other:?}")
                }
            }
            assert!(
                self.fake.wait_subscribed(ID, reconnects + 1, WAIT).await,
                "the fake never saw subscriber {}",
                reconnects + 1
            );
        }

        async fn frame(&mut self) -> Value {
            match self.next().await {
                Update::Frame {
                    connection_id,
                    frame,
                } => {
                    assert_eq!(&*connection_id, ID);
                    frame.value().clone()
                }
                other => panic!("expected a Frame, got {other:?}"),
            }
        }

        async fn dropped(&mut self) -> (String, Duration) {
            match self.next().await {
                Update::Dropped {
                    reason, retry_in, ..
                } => (reason, retry_in),
                other => panic!("expected Dropped, got {other:?}"),
            }
        }

        /// Expects `Ended` next; checks that `follow` returned and sent nothing after it.
        async fn ended(mut self) -> (EndReason, SymblFake) {
            let reason = match self.next().await {
                Update::Ended {
                    connection_id,
                    reason,
                } => {
                    assert_eq!(&*connection_id, ID);
                    reason
                }
                other => panic!("expected Ended, got {other:?}"),
            };
            tokio::time::timeout(WAIT, self.task)
                .await
                .expect("follow did not return after Ended")
                .expect("follow panicked");
            assert_eq!(self.rx.recv().await, None, "an update after Ended");
            (reason, self.fake)
        }
    }

    #[tokio::test]
    async fn frames_arrive_in_order_and_conversation_completed_ends() {
        let mut h = start(SymblConfig::default().reconnect, None).await;
        h.connected(0).await;
        for n in 1..=5 {
            h.fake.push(ID, line(n));
        }
        h.fake.push(ID, completed());
        for n in 1..=5 {
            assert_eq!(h.frame().await, line(n));
        }
        assert_eq!(h.frame().await, completed());
        let (reason, fake) = h.ended().await;
        assert_eq!(reason, EndReason::Completed);
        assert_eq!(fake.subscribes(ID), 1);
    }

    #[tokio::test]
    async fn a_socket_dropped_mid_call_reconnects_without_duplicating_redeliveries() {
        let mut h = start(tiny_backoff(), None).await;
        h.fake.set_redeliver_on_reconnect(3);
        h.connected(0).await;
        for n in 1..=3 {
            h.fake.push(ID, line(n));
        }
        for n in 1..=3 {
            assert_eq!(h.frame().await, line(n));
        }
        h.fake.drop_subscribers(ID);
        h.dropped().await;
        // The fake sends lines 1-3 again first; they must not come through.
        h.connected(1).await;
        h.fake.push(ID, line(4));
        h.fake.push(ID, completed());
        assert_eq!(h.frame().await, line(4));
        assert_eq!(h.frame().await, completed());
        let (reason, fake) = h.ended().await;
        assert_eq!(reason, EndReason::Completed);
        assert_eq!(fake.subscribes(ID), 2);
    }

    /// A finished sentence as Symbl sends it: with a message id.
    fn sentence(id: &str, text: &str) -> Value {
        json!({"type": "message_response", "sequenceNumber": 0,
               "messages": [{"id": id, "payload": {"content": text, "contentType": "text/plain"}}]})
    }

    #[tokio::test]
    async fn a_frame_redelivered_with_other_spacing_and_key_order_is_delivered_once() {
        let mut h = start(tiny_backoff(), None).await;
        // The fake also replays the last frame verbatim on reconnecting.
        h.fake.set_redeliver_on_reconnect(1);
        h.connected(0).await;
        h.fake.push(ID, sentence("m1", "Hello world."));
        assert_eq!(h.frame().await, sentence("m1", "Hello world."));
        h.fake.drop_subscribers(ID);
        h.dropped().await;
        h.connected(1).await;
        // After the reconnect Symbl sends the same sentence again, spelled differently (and
        // with another sequence number), then a new one.
        h.fake.push_text(
            ID,
            r#"{
  "messages" : [ { "payload" : { "contentType" : "text/plain", "content" : "Hello world." },
                   "id" : "m1" } ],
  "sequenceNumber" : 1,
  "type" : "message_response"
}"#,
        );
        h.fake.push(ID, sentence("m2", "Hello world."));
        h.fake.push(ID, completed());
        // The redelivery is skipped: the next frame is the new sentence (same words, new id).
        assert_eq!(h.frame().await, sentence("m2", "Hello world."));
        assert_eq!(h.frame().await, completed());
        let (reason, fake) = h.ended().await;
        assert_eq!(reason, EndReason::Completed);
        assert_eq!(fake.subscribes(ID), 2);
    }

    #[tokio::test]
    async fn interim_captions_that_differ_all_come_through() {
        let mut h = start(tiny_backoff(), None).await;
        h.connected(0).await;
        let caption = |text: &str| {
            json!({"type": "message", "message": {"type": "recognition_result", "isFinal": false,
                   "punctuated": {"transcript": text}}})
        };
        for text in ["Hel", "Hello", "Hello wor", "Hello world."] {
            h.fake.push(ID, caption(text));
        }
        h.fake.push(ID, completed());
        for text in ["Hel", "Hello", "Hello wor", "Hello world."] {
            assert_eq!(h.frame().await, caption(text));
        }
        assert_eq!(h.frame().await, completed());
        assert_eq!(h.ended().await.0, EndReason::Completed);
    }

    #[tokio::test]
    async fn stopping_during_the_backoff_ends_at_once() {
        let slow = Backoff {
            base_ms: 600_000,
            max_ms: 600_000,
            max_retries: 5,
        };
        let mut h = start(slow, None).await;
        h.connected(0).await;
        h.fake.drop_subscribers(ID);
        let (_, retry_in) = h.dropped().await;
        assert!(retry_in >= Duration::from_secs(600), "{retry_in:?}");
        h.stop.send(true).unwrap();
        // `ended` waits at most WAIT, far less than the 10-minute backoff.
        let (reason, fake) = h.ended().await;
        assert_eq!(reason, EndReason::Stopped);
        assert_eq!(fake.subscribes(ID), 1);
    }

    #[tokio::test]
    async fn a_server_that_accepts_then_closes_is_given_up_on_after_max_retries() {
        let mut h = start(tiny_backoff(), None).await;
        h.fake.set_close_on_subscribe(true);
        let (mut connects, mut drops) = (0, 0);
        // Bounded as a whole: a client that retries forever fails here, loudly.
        let reason = tokio::time::timeout(WAIT, async {
            loop {
                match h.next().await {
                    Update::Connected { reconnects, .. } => {
                        assert_eq!(reconnects, connects);
                        connects += 1;
                    }
                    Update::Dropped { .. } => drops += 1,
                    Update::Ended { reason, .. } => break reason,
                    Update::Frame { frame, .. } => panic!("unexpected frame {}", frame.value()),
                }
            }
        })
        .await
        .expect("still reconnecting: the retry budget was never exhausted");
        // The first attempt and max_retries (3) more, each opened and closed at once.
        assert_eq!((connects, drops), (4, 3));
        match reason {
            EndReason::GaveUp(why) => {
                assert!(why.contains("gave up after 4 attempts"), "{why}");
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
        assert_eq!(h.fake.subscribes(ID), 4);
        tokio::time::timeout(WAIT, h.task)
            .await
            .expect("follow did not return")
            .unwrap();
    }

    #[tokio::test]
    async fn a_normal_closure_is_final() {
        let mut h = start(tiny_backoff(), None).await;
        h.connected(0).await;
        h.fake.push(ID, line(1));
        assert_eq!(h.frame().await, line(1));
        h.fake.close_subscribers(ID, 1000, "conversation over");
        let (reason, fake) = h.ended().await;
        match reason {
            EndReason::GaveUp(why) => {
                assert!(why.contains("1000"), "{why}");
                assert!(why.contains("conversation over"), "{why}");
                assert!(!why.contains("gave up after"), "{why}");
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
        assert_eq!(fake.subscribes(ID), 1);
    }

    #[tokio::test]
    async fn other_close_codes_are_retried() {
        let mut h = start(tiny_backoff(), None).await;
        h.connected(0).await;
        h.fake.close_subscribers(ID, 1011, "internal error");
        let (why, _) = h.dropped().await;
        assert!(why.contains("1011"), "{why}");
        h.connected(1).await;
        h.stop.send(true).unwrap();
        assert_eq!(h.ended().await.0, EndReason::Stopped);
    }

    #[tokio::test]
    async fn a_404_handshake_is_final() {
        let fake = SymblFake::start("app", "s3cret").await;
        let config = SymblConfig {
            api_base: fake.api_base.clone(),
            // No such route on the fake: every handshake is answered 404.
            ws_base: Some(format!("{}/nowhere", fake.ws_base())),
            reconnect: tiny_backoff(),
            ..SymblConfig::default()
        };
        let h = follow_on(fake, config, None);
        let (reason, fake) = h.ended().await;
        match reason {
            EndReason::GaveUp(why) => {
                assert!(why.contains("404"), "{why}");
                assert!(!why.contains("gave up after"), "{why}");
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
        assert_eq!(fake.token_calls(), 1);
    }

    #[tokio::test]
    async fn a_401_handshake_gets_a_new_token_and_is_retried_a_bounded_number_of_times() {
        let tokens = SymblFake::start("app", "s3cret").await;
        // A second Symbl that knows none of the first one's tokens: every handshake is 401.
        let other = SymblFake::start("app", "s3cret").await;
        let config = SymblConfig {
            api_base: tokens.api_base.clone(),
            ws_base: Some(other.ws_base()),
            reconnect: tiny_backoff(),
            ..SymblConfig::default()
        };
        let mut h = follow_on(tokens, config, None);
        for _ in 0..3 {
            let (why, _) = h.dropped().await;
            assert!(why.contains("401"), "{why}");
        }
        let (reason, tokens) = h.ended().await;
        match reason {
            EndReason::GaveUp(why) => {
                assert!(why.contains("401"), "{why}");
                assert!(why.contains("gave up after 4 attempts"), "{why}");
                assert!(!why.contains("fake-jwt"), "{why}");
            }
            other => panic!("expected GaveUp, got {other:?}"),
        }
        // Each 401 dropped the cached token: one fresh token per attempt.
        assert_eq!(tokens.token_calls(), 4);
        assert_eq!(other.subscribes(ID), 0);
    }

    #[tokio::test]
    async fn a_silent_half_open_socket_is_dropped_and_reconnected() {
        let options = FollowOptions {
            ping_every: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(3),
            ..FollowOptions::default()
        };
        let mut h = start(tiny_backoff(), Some(options)).await;
        h.connected(0).await;
        // No frames for longer than the idle timeout: the pongs keep the socket alive.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(
            h.rx.try_recv().is_err(),
            "a socket answering pings was dropped"
        );
        assert_eq!(h.fake.subscribes(ID), 1);
        // Now the socket goes silent with its TCP connection open.
        h.fake.freeze_subscribers(ID);
        let (why, _) = h.dropped().await;
        assert_eq!(why, "no data for 3 s");
        h.connected(1).await;
        h.fake.push(ID, line(1));
        assert_eq!(h.frame().await, line(1));
        h.stop.send(true).unwrap();
        assert_eq!(h.ended().await.0, EndReason::Stopped);
    }
}

/// Every followed call holds one follower task for its whole length: its state must stay
/// small (the handshake and a token fetch are boxed, alive only while they run; inline they
/// made it 16 KiB per call).
#[test]
fn a_followed_connection_costs_a_few_kib_of_task_state() {
    let config = SymblConfig::default();
    let credentials = crate::auth::Credentials::from_lookup(&config, |_| Some("x".into())).unwrap();
    let auth = Arc::new(SymblAuth::new(&config, credentials).unwrap());
    let (tx, _rx) = mpsc::channel(1);
    let (_stop_tx, stop_rx) = watch::channel(false);
    let follower = follow(&config, auth, Arc::from("x"), tx, stop_rx);
    assert!(
        size_of_val(&follower) < 8 * 1024,
        "{}",
        size_of_val(&follower)
    );
    // A queued frame stays small (a caption is boxed): 56 bytes, 88 when serde_json keeps key
    // order (bson turns that on in the whole workspace's build).
    assert!(size_of::<Update>() <= 96, "{}", size_of::<Update>());
}
