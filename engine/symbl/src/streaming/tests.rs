use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prompter_fakes::SymblFake;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

use super::events::{classify, learned_conversation_id};
use super::*;
use crate::auth::{Credentials, SymblAuth};
use crate::config::{SymblConfig, TrackerSpec};

/// A guard against a hung test, not a timing assertion.
const GUARD: Duration = Duration::from_secs(30);

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(GUARD, f).await.expect("the test hung")
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

async fn setup() -> (SymblFake, StreamingClient, Arc<SymblAuth>) {
    let fake = SymblFake::start("app", "s3cret").await;
    let config = SymblConfig {
        api_base: fake.api_base.clone(),
        ..SymblConfig::default()
    };
    let auth = auth_for(&config);
    (fake, StreamingClient::new(&config, auth.clone()), auth)
}

fn caller() -> Speaker {
    Speaker::new("+14155550100", "Caller")
}

/// Takes events until the session ends.
async fn drain(session: &mut StreamingSession) -> Vec<StreamingEvent> {
    let mut events = Vec::new();
    while let Some(e) = within(session.next_event()).await {
        events.push(e);
    }
    events
}

fn types(events: &[StreamingEvent]) -> Vec<&str> {
    events
        .iter()
        .map(|e| {
            e.message_type()
                .or_else(|| e.json()?.get("type")?.as_str())
                .unwrap_or("(malformed)")
        })
        .collect()
}

#[tokio::test]
async fn the_twilio_start_request_is_exactly_the_documented_json() {
    let start = StartRequest::twilio(caller())
        .meeting_title("Support call")
        .timezone_offset_minutes(480)
        .sentiment(true)
        .confidence_threshold(0.7)
        .trackers([TrackerSpec {
            name: "Budget Constraints".into(),
            vocabulary: vec!["too expensive".into(), "no budget".into()],
        }])
        .no_connection_timeout_secs(600)
        .disconnect_on_stop_request(true, Some(60));
    let expected = json!({
        "type": "start_request",
        "insightTypes": ["question", "action_item", "follow_up"],
        "config": {
            "confidenceThreshold": 0.7,
            "languageCode": "en-US",
            "speechRecognition": {"encoding": "MULAW", "sampleRateHertz": 8000},
            "meetingTitle": "Support call",
            "timezoneOffset": 480,
            "sentiment": true,
            "trackers": {"enableAllTrackers": true, "interimResults": true}
        },
        "trackers": [{"name": "Budget Constraints", "vocabulary": ["too expensive", "no budget"]}],
        "speaker": {"userId": "+14155550100", "name": "Caller"},
        "noConnectionTimeout": 600,
        "disconnectOnStopRequest": true,
        "disconnectOnStopRequestTimeout": 60
    });
    assert_eq!(start.to_json(), expected);

    let (fake, client, _) = setup().await;
    let session = within(client.start("call-1", &start)).await.unwrap();
    let socket = fake.streaming_socket("call-1").unwrap();
    assert_eq!(socket.start_request, Some(expected));
    assert!(socket.token_in_query && socket.token_in_header && !socket.legacy_path);
    within(session.finish()).await.unwrap();
}

#[tokio::test]
async fn audio_arrives_in_frames_of_at_most_8192_bytes_with_nothing_lost() {
    let (fake, client, _) = setup().await;
    let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    let audio: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    within(session.send_audio(&audio)).await.unwrap();
    within(session.send_audio(&[])).await.unwrap();
    within(session.stop()).await.unwrap();
    drain(&mut session).await;
    within(session.finish()).await.unwrap();

    let socket = fake.streaming_socket("call-1").unwrap();
    assert_eq!(socket.audio_bytes, 20_000);
    assert_eq!(socket.audio_frames, 3); // 8192 + 8192 + 3616
    assert_eq!(socket.max_audio_frame, MAX_AUDIO_FRAME);
    assert_eq!(socket.audio, audio);
    assert_eq!(socket.audio_bytes_before_start, 0);
}

#[tokio::test]
async fn stop_request_then_conversation_completed_ends_the_session() {
    let (fake, client, _) = setup().await;
    let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    within(session.stop()).await.unwrap();
    within(session.stop()).await.unwrap(); // idempotent
    let events = drain(&mut session).await;
    assert_eq!(
        types(&events),
        [
            "started_listening",
            "recognition_started",
            "conversation_created",
            "recognition_stopped",
            "conversation_completed"
        ]
    );
    let id = fake.streaming_conversation_id("call-1");
    assert!(id.is_some());
    assert_eq!(
        within(session.finish()).await.unwrap(),
        SessionEnd::Completed {
            conversation_id: id
        }
    );
    let socket = fake.streaming_socket("call-1").unwrap();
    assert_eq!(socket.control, [json!({"type": "stop_request"})]);
    assert!(socket.stop_requested && socket.closed);
}

#[tokio::test]
async fn the_conversation_id_is_learned_and_shared_by_the_sockets_of_a_connection() {
    let (fake, client, _) = setup().await;
    let agent = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    let id = within(agent.wait_conversation_id()).await;
    assert_eq!(id, fake.streaming_conversation_id("call-1"));
    assert_eq!(agent.conversation_id(), id);
    assert_eq!(agent.connection_id(), "call-1");

    let start = StartRequest::twilio(Speaker::new("+14155550199", "Agent"));
    let other = within(client.start("call-1", &start)).await.unwrap();
    assert_eq!(within(other.wait_conversation_id()).await, id);
    within(agent.finish()).await.unwrap();
    within(other.finish()).await.unwrap();
}

#[tokio::test]
async fn a_rejected_token_is_a_clear_error_without_the_token() {
    // Tokens from one fake are unknown to another.
    let issuer = SymblFake::start("app", "s3cret").await;
    let other = SymblFake::start("app", "s3cret").await;
    let config = SymblConfig {
        api_base: issuer.api_base.clone(),
        ws_base: Some(other.ws_base()),
        ..SymblConfig::default()
    };
    let client = StreamingClient::new(&config, auth_for(&config));
    let err = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        StreamingError::TokenRejected { status: 401, .. }
    ));
    let msg = err.to_string();
    assert_eq!(
        msg,
        format!(
            "Symbl rejected the access token on the Streaming API handshake to `{}/v1/streaming/call-1` (HTTP 401); check the app id and secret",
            other.ws_base()
        )
    );
    assert!(!msg.contains("fake-jwt") && !format!("{err:?}").contains("fake-jwt"));
    // Retried once with a fresh token.
    assert_eq!(issuer.token_calls(), 2);
    assert_eq!(other.streaming_rejected(), 2);
}

#[tokio::test]
async fn an_invalid_start_is_refused_locally_with_a_clear_error() {
    let err = StartRequest::new(AudioEncoding::Mulaw, 16_000).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`MULAW` audio must be sampled at 8000 Hz, not 16000 Hz"
    );
    assert!(StartRequest::new(AudioEncoding::Opus, 8_000).is_err());
    assert!(StartRequest::new(AudioEncoding::Linear16, 16_000).is_ok());

    let (fake, client, _) = setup().await;
    let start = StartRequest::twilio(caller()).confidence_threshold(0.3);
    let err = within(client.start("call-1", &start)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid `start_request`: `confidenceThreshold` must be between 0.5 and 1.0, not 0.3"
    );
    let start = StartRequest::twilio(caller()).no_connection_timeout_secs(3_600);
    let err = within(client.start("call-1", &start)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid `start_request`: `noConnectionTimeout` must be between 0 and 1800 seconds, not 3600"
    );
    let start = StartRequest::twilio(caller()).trackers([TrackerSpec {
        name: "Empty".into(),
        vocabulary: vec![],
    }]);
    assert!(within(client.start("call-1", &start)).await.is_err());
    let err = within(client.start(" ", &StartRequest::twilio(caller())))
        .await
        .unwrap_err();
    assert!(matches!(err, StreamingError::EmptyConnectionId));
    assert_eq!(fake.streaming_handshakes(), 0);
}

#[tokio::test]
async fn a_start_refused_by_symbl_names_symbls_message() {
    let (fake, client, _) = setup().await;
    fake.refuse_next_streaming_start("sampleRateHertz must be a valid number.");
    let err = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Symbl refused the `start_request`: sampleRateHertz must be a valid number. (No additional details available.)"
    );
}

#[tokio::test]
async fn error_frames_and_garbage_are_events_never_panics() {
    let (fake, client, _) = setup().await;
    let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    within(session.wait_conversation_id()).await;
    fake.push_streaming(
        "call-1",
        json!({"type": "error", "details": "Too many streams.", "message": "Rate limited."}),
    );
    fake.push_streaming(
        "call-1",
        json!({"type": "message", "message": {"type": "error", "message": "Audio decode failed."}}),
    );
    fake.push_streaming_text("call-1", "not json {");
    let tracker = json!({"type": "tracker_response", "isFinal": false, "trackers": [
        {"name": "Budget Constraints", "matches": [{"type": "vocabulary", "value": "too expensive",
         "messageRefs": [{"id": "m1", "text": "That is too expensive.", "offset": 8}], "insightRefs": []}]}]});
    fake.push_streaming("call-1", tracker.clone());
    within(session.stop()).await.unwrap();
    let events = drain(&mut session).await;
    assert_eq!(events.len(), 9, "{events:?}");
    let StreamingEvent::Error(top) = &events[3] else {
        panic!("{:?}", events[3])
    };
    assert_eq!(top.to_string(), "Rate limited. (Too many streams.)");
    let StreamingEvent::Error(nested) = &events[4] else {
        panic!("{:?}", events[4])
    };
    assert_eq!(nested.message, "Audio decode failed.");
    assert_eq!(nested.details, None);
    assert!(matches!(&events[5], StreamingEvent::Malformed { text, .. } if text == "not json {"));
    assert_eq!(events[6], StreamingEvent::Frame(tracker));
    // Every JSON frame, errors included, can go to the engine's parser.
    for e in &events {
        if let Some(v) = e.json() {
            prompter_core::event::parse_frame("call-1", 0, v.clone()).unwrap();
        }
    }
    within(session.finish()).await.unwrap();
}

#[test]
fn odd_frames_are_classified_without_panicking() {
    for text in [
        "",
        "null",
        "[]",
        "42",
        r#"{"type": 5}"#,
        r#"{"type": "message"}"#,
        r#"{"type": "message", "message": "x"}"#,
        r#"{"type": "message", "message": {"type": ["x"]}}"#,
    ] {
        let e = classify(text);
        assert!(!matches!(e, StreamingEvent::Error(_)), "{text}: {e:?}");
        assert_eq!(e.json().and_then(learned_conversation_id), None);
    }
    let StreamingEvent::Error(e) = classify(r#"{"type": "error"}"#) else {
        panic!()
    };
    assert_eq!(e.to_string(), "(no message)");
    let StreamingEvent::Error(e) =
        classify(r#"{"type":"message","message":{"type":"error","message":{"code":1}}}"#)
    else {
        panic!()
    };
    assert_eq!(e.message, r#"{"code":1}"#);

    let id = |v: Value| learned_conversation_id(&v);
    assert_eq!(
        id(
            json!({"type": "message", "message": {"type": "conversation_completed", "conversationId": "42"}})
        ),
        Some("42".into())
    );
    assert_eq!(
        id(
            json!({"type": "message", "message": {"type": "recognition_started", "data": {"conversationId": 42}}})
        ),
        Some("42".into())
    );
    assert_eq!(
        id(
            json!({"type": "message", "message": {"type": "recognition_result", "data": {"conversationId": "42"}}})
        ),
        None
    );
}

#[tokio::test]
async fn pings_keep_the_socket_alive() {
    let (fake, client, _) = setup().await;
    let client = client.with_options(StreamingOptions {
        ping_interval: Duration::from_millis(20),
        ..StreamingOptions::default()
    });
    let session = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    within(async {
        while fake.streaming_socket("call-1").unwrap().pings < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within(session.finish()).await.unwrap();
}

#[tokio::test]
async fn the_legacy_path_is_available() {
    let (fake, client, _) = setup().await;
    let client = client.with_options(StreamingOptions {
        endpoint: Endpoint::RealtimeInsights,
        ..StreamingOptions::default()
    });
    assert!(client.url("a b").ends_with("/v1/realtime/insights/a%20b"));
    let session = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    assert!(fake.streaming_socket("call-1").unwrap().legacy_path);
    within(session.finish()).await.unwrap();
}

#[tokio::test]
async fn audio_after_stop_is_an_error_and_dropping_a_session_stops_it() {
    let (fake, client, _) = setup().await;
    let session = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    let audio = session.audio_sender();
    within(session.stop()).await.unwrap();
    let err = within(audio.send(&[0xFF; 160])).await.unwrap_err();
    assert!(matches!(err, StreamingError::AudioAfterStop), "{err}");
    assert!(matches!(
        within(session.finish()).await.unwrap(),
        SessionEnd::Completed { .. }
    ));
    assert_eq!(
        within(audio.send(&[0xFF; 160]))
            .await
            .unwrap_err()
            .to_string(),
        "audio was sent after the `stop_request`"
    );

    let session = within(client.start("call-2", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    drop(session);
    within(async {
        while !fake.streaming_socket("call-2").unwrap().closed {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(fake.streaming_socket("call-2").unwrap().stop_requested);
}

#[tokio::test]
async fn a_dropped_socket_ends_the_session_with_an_error() {
    let (fake, client, _) = setup().await;
    let mut session = within(client.start("call-1", &StartRequest::twilio(caller())))
        .await
        .unwrap();
    within(session.wait_conversation_id()).await;
    fake.drop_streaming("call-1");
    drain(&mut session).await;
    let err = within(session.send_audio(&[0; 10])).await.unwrap_err();
    assert!(matches!(err, StreamingError::SessionEnded), "{err}");
    let err = within(session.finish()).await.unwrap_err();
    assert!(matches!(err, StreamingError::Dropped), "{err}");
}

/// The fake itself, driven by a raw WebSocket: what the client never sends.
#[tokio::test]
async fn the_fake_ignores_early_audio_and_refuses_a_bad_first_frame() {
    let (fake, client, auth) = setup().await;
    let token = auth.token().await.unwrap();
    let url = client.url("raw");

    let err = within(tokio_tungstenite::connect_async(url.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, tungstenite::Error::Http(r) if r.status() == 401),
        "{err}"
    );

    let with_token = format!("{url}?access_token={}", token.expose());
    let (mut ws, _) = within(tokio_tungstenite::connect_async(with_token.clone()))
        .await
        .unwrap();
    ws.send(Message::binary(vec![0u8; 100])).await.unwrap();
    let bad = StartRequest::twilio(caller()).to_json();
    let mut bad = bad;
    bad["config"]["speechRecognition"]["sampleRateHertz"] = json!(16_000);
    ws.send(Message::text(bad.to_string())).await.unwrap();
    let Some(Ok(Message::Text(reply))) = within(ws.next()).await else {
        panic!("no error frame")
    };
    let reply: Value = serde_json::from_str(reply.as_str()).unwrap();
    assert_eq!(
        reply,
        json!({"type": "error", "details": "No additional details available.",
               "message": "sampleRateHertz 16000 is not supported for MULAW audio."})
    );
    assert!(matches!(
        within(ws.next()).await,
        Some(Ok(Message::Close(_)))
    ));
    let socket = fake.streaming_socket("raw").unwrap();
    assert_eq!(socket.audio_bytes_before_start, 100);
    assert_eq!(socket.start_request, None);

    let (mut ws, _) = within(tokio_tungstenite::connect_async(with_token))
        .await
        .unwrap();
    ws.send(Message::binary(vec![0u8; 50])).await.unwrap();
    let good = StartRequest::twilio(caller()).to_json();
    ws.send(Message::text(good.to_string())).await.unwrap();
    for expected in [
        "started_listening",
        "recognition_started",
        "conversation_created",
    ] {
        let Some(Ok(Message::Text(t))) = within(ws.next()).await else {
            panic!("no {expected}")
        };
        assert_eq!(classify(t.as_str()).message_type(), Some(expected));
    }
    ws.send(Message::binary(vec![1u8; 30])).await.unwrap();
    ws.send(Message::text(STOP_REQUEST)).await.unwrap();
    while let Some(Ok(_)) = within(ws.next()).await {}
    let socket = fake.streaming_socket("raw").unwrap();
    assert_eq!(socket.audio_bytes_before_start, 50);
    assert_eq!((socket.audio_bytes, socket.audio), (30, vec![1u8; 30]));
    assert_eq!(socket.start_request, Some(good));
    assert!(!socket.token_in_header && socket.token_in_query);
}
