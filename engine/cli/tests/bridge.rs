#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! The Twilio bridge as an operator runs it: the real `prompter run` on the shipped
//! `prompter-live.yaml`, a fake Twilio that answers the voice webhook's TwiML by streaming real
//! speech (`tests/fixtures/audio`, made by `scripts/make-test-audio.sh` with espeak-ng and
//! sox) on both tracks at real-time pace, the Symbl fake recording every byte per socket and
//! answering with scripted events.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use prompter_engine::twilio::signature;
use serde_json::{Value, json};
use support::{Engine, Fakes, WAIT, fakes, root};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const AUTH_TOKEN: &str = "twilio-auth-token-of-the-bridge-tests";
const PUBLIC: &str = "https://bridge.example.com";
const FROM: &str = "+14155550100";
const TO: &str = "+18005550199";
const FRAME: usize = 160;

fn audio(track: &str) -> Vec<u8> {
    std::fs::read(root().join(format!("tests/fixtures/audio/{track}.ulaw"))).unwrap()
}

fn start_bridge(f: &Fakes) -> Engine {
    let _ = rustls::crypto::ring::default_provider().install_default();
    f.run(
        &["--listen", "127.0.0.1:0"],
        &[
            ("TWILIO_PUBLIC_URL", PUBLIC),
            ("TWILIO_AUTH_TOKEN", AUTH_TOKEN),
        ],
    )
}

async fn address(engine: &Engine) -> String {
    let line = engine.said("control endpoint listening on http://").await;
    line.rsplit("http://").next().unwrap().trim().to_owned()
}

/// What Twilio does when the call comes in: POST the voice webhook (signed), read the
/// `<Parameter>`s of the TwiML's `<Stream>`.
async fn voice_webhook(addr: &str, call_sid: &str) -> Value {
    let params = vec![
        ("AccountSid".to_owned(), "AC0000".to_owned()),
        ("CallSid".to_owned(), call_sid.to_owned()),
        ("From".to_owned(), FROM.to_owned()),
        ("To".to_owned(), TO.to_owned()),
        ("CallStatus".to_owned(), "ringing".to_owned()),
    ];
    let body: Vec<String> = params
        .iter()
        .map(|(k, v)| {
            format!(
                "{}={}",
                prompter_engine::feed::http::url_encode(k),
                prompter_engine::feed::http::url_encode(v)
            )
        })
        .collect();
    let sig = signature(AUTH_TOKEN, &format!("{PUBLIC}/twilio/voice"), &params);
    let r = reqwest::Client::new()
        .post(format!("http://{addr}/twilio/voice"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(body.join("&"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let twiml = r.text().await.unwrap();
    assert!(
        twiml.contains(
            "<Stream url=\"wss://bridge.example.com/twilio/media\" track=\"both_tracks\">"
        ),
        "{twiml}"
    );
    assert!(
        twiml.contains("<Dial><Queue>support</Queue></Dial>"),
        "{twiml}"
    );
    let mut out = serde_json::Map::new();
    for part in twiml.split("<Parameter name=\"").skip(1) {
        let (name, rest) = part.split_once("\" value=\"").unwrap();
        let value = rest.split('"').next().unwrap();
        out.insert(name.to_owned(), json!(value.replace("&amp;", "&")));
    }
    Value::Object(out)
}

/// A fake Twilio Media Stream: both tracks of the fixture, one 20 ms frame per track every
/// 20 ms, as Twilio sends them; can pause (a test's window to drop a socket between frames).
struct Caller {
    sent_frames: Arc<AtomicUsize>,
    paused: Arc<AtomicBool>,
    done: tokio::task::JoinHandle<()>,
}

impl Caller {
    async fn call(addr: &str, call_sid: &str, params: Value) -> Caller {
        let mut req = format!("ws://{addr}/twilio/media")
            .into_client_request()
            .unwrap();
        let sig = signature(AUTH_TOKEN, "wss://bridge.example.com/twilio/media", &[]);
        req.headers_mut()
            .insert("x-twilio-signature", sig.parse().unwrap());
        let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
        let stream_sid = "MZ0000000000000000000000000000000";
        ws.send(Message::text(
            json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string(),
        ))
        .await
        .unwrap();
        ws.send(Message::text(
            json!({"event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
                "start": {"accountSid": "AC0000", "streamSid": stream_sid, "callSid": call_sid,
                    "tracks": ["inbound", "outbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                    "customParameters": params}})
            .to_string(),
        ))
        .await
        .unwrap();
        let sent_frames = Arc::new(AtomicUsize::new(0));
        let paused = Arc::new(AtomicBool::new(false));
        let (sent, pause) = (sent_frames.clone(), paused.clone());
        let done = tokio::spawn(async move {
            let tracks = [("inbound", audio("customer")), ("outbound", audio("agent"))];
            let frames = tracks[0].1.len() / FRAME;
            let mut seq = 2u64;
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut i = 0;
            while i < frames {
                tick.tick().await;
                if pause.load(Ordering::SeqCst) {
                    continue;
                }
                for (track, bytes) in &tracks {
                    let payload = base64::engine::general_purpose::STANDARD
                        .encode(&bytes[i * FRAME..(i + 1) * FRAME]);
                    let frame = json!({"event": "media", "sequenceNumber": seq.to_string(),
                        "media": {"track": track, "chunk": (i + 1).to_string(),
                            "timestamp": (i * 20).to_string(), "payload": payload},
                        "streamSid": stream_sid});
                    seq += 1;
                    // A refused stream is closed by the bridge: the caller stops there.
                    if ws.send(Message::text(frame.to_string())).await.is_err() {
                        return;
                    }
                }
                // A malformed frame now and then: skipped, the call goes on.
                if i == 100
                    && ws
                        .send(Message::text("{\"event\": \"media\", \"media\": {"))
                        .await
                        .is_err()
                {
                    return;
                }
                i += 1;
                sent.store(i, Ordering::SeqCst);
            }
            let stop = json!({"event": "stop", "sequenceNumber": seq.to_string(),
                "streamSid": stream_sid, "stop": {"accountSid": "AC0000", "callSid": "x"}});
            let _ = ws.send(Message::text(stop.to_string())).await;
            let _ = ws.close(None).await;
        });
        Caller {
            sent_frames,
            paused,
            done,
        }
    }

    /// Waits until `n` frames per track were sent.
    async fn sent(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.sent_frames.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "the caller stalled");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The update feed's next frame.
async fn next_update(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("an update")
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

fn sentence(text: &str, id: &str) -> Value {
    // No `from`: the bridge names the speaker after the track the sentence came on.
    json!({"type": "message_response", "sequenceNumber": 0, "messages": [{
        "id": id, "payload": {"content": text, "contentType": "text/plain"},
        "duration": {"startTime": "2026-12-01T10:00:00Z", "endTime": "2026-12-01T10:00:03Z"}}]})
}

fn budget_tracker() -> Value {
    json!({"type": "tracker_response", "isFinal": true, "sequenceNumber": 1, "trackers": [{
        "name": "Budget Constraints", "matches": [{"type": "vocabulary", "value": "no budget",
            "messageRefs": [{"id": "m-customer-1", "text": "we have no budget this year.", "offset": 5}],
            "insightRefs": []}]}]})
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_the_bridge_reaches_symbl_byte_for_byte_and_its_trackers_become_cards() {
    let f = fakes().await;
    f.ingest();
    let engine = start_bridge(&f);
    let addr = address(&engine).await;
    let (mut updates, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/symbl/updates"))
        .await
        .unwrap();

    let call_sid = "CA11111111111111111111111111111111";
    let params = voice_webhook(&addr, call_sid).await;
    assert_eq!(params["From"], FROM);
    let caller = Caller::call(&addr, call_sid, params).await;

    // Both tracks' sessions open on one connection id, announced on the update feed.
    let started = next_update(&mut updates).await;
    assert_eq!(started["type"], "connection_started", "{started}");
    assert_eq!(
        started["speaker"],
        json!({"userId": FROM, "name": "Customer"})
    );
    let conn = started["connectionId"].as_str().unwrap().to_owned();
    assert_eq!(
        started["conversationId"].as_str(),
        f.symbl.streaming_conversation_id(&conn).as_deref()
    );
    // A late subscriber hears of the live call.
    let (mut late, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/symbl/updates"))
        .await
        .unwrap();
    let exists = next_update(&mut late).await;
    assert_eq!(exists["type"], "connection_exists");
    assert_eq!(exists["connectionId"], conn.as_str());

    let symbl = &f.symbl;
    wait_for("both sessions", || {
        symbl
            .streaming_sockets()
            .iter()
            .filter(|s| s.connection_id == conn && s.start_request.is_some())
            .count()
            == 2
    })
    .await;
    // What Symbl "hears": the customer's sentence on the inbound socket, the agent's answer on
    // the outbound one, then the final tracker (after the answer on the same socket, so the
    // prompt has both; the next test sends a tracker on both sockets).
    caller.sent(250).await;
    assert!(symbl.push_streaming_to(
        &conn,
        FROM,
        &sentence(
            "Honestly, it is too expensive, we have no budget this year.",
            "m-customer-1"
        )
    ));
    caller.sent(420).await;
    assert!(symbl.push_streaming_to(
        &conn,
        TO,
        &sentence(
            "I understand. Let me look at the options we have for a smaller plan.",
            "m-agent-1"
        )
    ));
    assert!(symbl.push_streaming_to(&conn, TO, &budget_tracker()));
    caller.done.await.unwrap();

    // The call ends: one completion, post-call pipelines, connection_stopped.
    let (_, recap) = engine
        .output("the call's recap", |v| {
            v["conversation_id"] == call_sid && v["pipeline"] == "call_recap"
        })
        .await;
    assert!(
        recap["text"].as_str().unwrap().starts_with("2 sentences"),
        "{recap}"
    );
    let stopped = next_update(&mut updates).await;
    assert_eq!(stopped["type"], "connection_stopped", "{stopped}");
    assert_eq!(stopped["connectionId"], conn.as_str());

    // Byte for byte, in order, on the right connection.
    let sockets: Vec<_> = symbl
        .streaming_sockets()
        .into_iter()
        .filter(|s| s.connection_id == conn)
        .collect();
    assert_eq!(sockets.len(), 2);
    for (user, track) in [(FROM, "customer"), (TO, "agent")] {
        let s = sockets
            .iter()
            .find(|s| s.start_request.as_ref().unwrap()["speaker"]["userId"] == user)
            .unwrap_or_else(|| panic!("no socket for {user}"));
        let start = s.start_request.as_ref().unwrap();
        let name = if track == "customer" {
            "Customer"
        } else {
            "Agent"
        };
        assert_eq!(start["speaker"]["name"], name);
        assert_eq!(
            start["config"]["speechRecognition"],
            json!({"encoding": "MULAW", "sampleRateHertz": 8000})
        );
        assert_eq!(start["config"]["trackers"]["interimResults"], true);
        let trackers: Vec<&str> = start["trackers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert!(trackers.contains(&"Budget Constraints"), "{start}");
        assert!(
            s.audio == audio(track),
            "the {track} audio Symbl received differs from what was sent"
        );
        assert_eq!(s.max_audio_frame, FRAME);
        assert_eq!(s.audio_bytes_before_start, 0);
        assert!(s.stop_requested && s.closed);
    }

    // The tracker made one card, for this call; the prompt names
    // the customer and the agent after their tracks (Symbl's sentences named no one).
    let outputs = engine.outputs();
    let cards: Vec<&Value> = outputs
        .iter()
        .filter(|v| v["pipeline"] == "rta_live" && v["status"] == "final")
        .collect();
    assert_eq!(cards.len(), 1, "{outputs:#?}");
    assert_eq!(cards[0]["conversation_id"], call_sid);
    assert!(
        cards[0]["text"]
            .as_str()
            .unwrap()
            .contains("Acknowledge the concern"),
        "{}",
        cards[0]
    );
    let prompts = f.nebula.chat_requests();
    let prompt = prompts.last().unwrap().to_string();
    assert!(
        prompt.contains("Customer: Honestly, it is too expensive"),
        "{prompt}"
    );
    assert!(prompt.contains("Agent: I understand."), "{prompt}");
    // Operations see the call: readiness and metrics on the same server.
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://{addr}/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let ready: Value = serde_json::from_str(&ready.text().await.unwrap()).unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
    let metrics = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for sample in [
        "prompter_twilio_calls_total 1",
        "prompter_twilio_audio_frames_total 1100",
        "prompter_events_received_total{source=\"twilio\",kind=\"tracker_response\"} 1",
        "prompter_outputs_total{pipeline=\"rta_live\",status=\"final\"} 1",
    ] {
        assert!(metrics.contains(sample), "{sample} not in\n{metrics}");
    }
    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    // Symbl's greeting once (both sessions got it), two sentences, the tracker, the end.
    assert!(stderr.contains("stopped: 7 event(s)"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "call {call_sid}: ended (the call's stream stopped)"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("twilio bridge: 1 call(s), 1100 audio frame(s) (176000 bytes), 0 dropped, 1 malformed, 0 refused stream(s), 0 Symbl reconnect(s)"),
        "{stderr}"
    );
    assert!(!stderr.contains(AUTH_TOKEN), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symbl_socket_dropped_mid_call_reconnects_and_sends_the_audio_kept_meanwhile() {
    let f = fakes().await;
    f.ingest();
    let engine = start_bridge(&f);
    let addr = address(&engine).await;
    let call_sid = "CA22222222222222222222222222222222";
    let params = voice_webhook(&addr, call_sid).await;
    let caller = Caller::call(&addr, call_sid, params).await;
    let line = engine.said(&format!("call {call_sid}: bridging")).await;
    let conn = line.rsplit(' ').next().unwrap().to_owned();
    let symbl = &f.symbl;
    wait_for("both sessions", || {
        symbl
            .streaming_sockets()
            .iter()
            .filter(|s| s.connection_id == conn && s.start_request.is_some())
            .count()
            == 2
    })
    .await;
    caller.sent(150).await;
    assert!(symbl.push_streaming_to(
        &conn,
        FROM,
        &sentence("Hi, I am calling about our renewal.", "m-1")
    ));

    // Between two frames, the customer's socket drops and Symbl stays unreachable for three
    // attempts (about 1.75 s of backoff) while the caller goes on talking.
    caller.paused.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    symbl.fail_streaming_handshakes(3);
    assert!(symbl.drop_streaming_speaker(&conn, FROM));
    engine
        .said(&format!(
            "call {call_sid}: the customer track's Symbl socket dropped"
        ))
        .await;
    caller.paused.store(false, Ordering::SeqCst);
    let back = engine
        .said(&format!(
            "call {call_sid}: the customer track's Symbl socket is back"
        ))
        .await;
    let kept_ms: u64 = back
        .split("sending the ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{back}"));
    assert!(kept_ms >= 500, "{back}");
    // After the outage: the tracker (on both sockets) and the rest of the call.
    symbl.push_streaming(&conn, budget_tracker());
    assert!(symbl.push_streaming_to(
        &conn,
        FROM,
        &sentence(
            "Honestly, it is too expensive, we have no budget this year.",
            "m-customer-1"
        )
    ));
    caller.done.await.unwrap();
    let (_, recap) = engine
        .output("the call's recap", |v| {
            v["conversation_id"] == call_sid && v["pipeline"] == "call_recap"
        })
        .await;
    // Both sentences once, the tracker once: nothing lost, nothing twice.
    let text = recap["text"].as_str().unwrap();
    assert!(text.starts_with("2 sentences"), "{recap}");
    assert_eq!(text.matches("Budget Constraints").count(), 1, "{recap}");
    let outputs = engine.outputs();
    let cards = outputs
        .iter()
        .filter(|v| v["pipeline"] == "rta_live" && v["status"] == "final")
        .count();
    assert_eq!(cards, 1, "{outputs:#?}");

    // The customer's audio arrived whole, in order, over the two sockets; the agent's over one.
    let sockets: Vec<_> = symbl
        .streaming_sockets()
        .into_iter()
        .filter(|s| s.connection_id == conn && s.start_request.is_some())
        .collect();
    let of = |user: &str| -> Vec<_> {
        sockets
            .iter()
            .filter(|s| s.start_request.as_ref().unwrap()["speaker"]["userId"] == user)
            .collect()
    };
    let customer = of(FROM);
    assert_eq!(customer.len(), 2, "the customer's socket reconnected once");
    let mut heard = customer[0].audio.clone();
    heard.extend_from_slice(&customer[1].audio);
    let sent = audio("customer");
    assert_eq!(heard.len(), sent.len());
    assert!(heard == sent, "the customer's audio differs");
    let agent = of(TO);
    assert_eq!(agent.len(), 1);
    assert!(agent[0].audio == audio("agent"));
    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("0 dropped, 1 malformed, 0 refused stream(s), 1 Symbl reconnect(s)"),
        "{stderr}"
    );
    // Every event once: Symbl's greeting (3 frames, which each of the three sessions got),
    // the two sentences, the tracker (which both sockets got) and the completion.
    assert!(stderr.contains("stopped: 7 event(s)"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_the_calls_token_or_with_a_wrong_signature_is_refused() {
    let f = fakes().await;
    f.ingest();
    let engine = start_bridge(&f);
    let addr = address(&engine).await;
    // A wrong signature on the upgrade: 403 before any socket.
    let mut req = format!("ws://{addr}/twilio/media")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("x-twilio-signature", "bm90IGl0".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {other:?}"),
    }
    // A stream whose token is for another call: closed, no Symbl session.
    let other = voice_webhook(&addr, "CA33333333333333333333333333333333").await;
    let caller = Caller::call(&addr, "CA44444444444444444444444444444444", other).await;
    engine
        .said("error: refused a media stream for call CA44444444444444444444444444444444")
        .await;
    let _ = caller.done.await;
    assert_eq!(f.symbl.streaming_handshakes(), 0);
    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    // The wrong signature and the wrong token.
    assert!(stderr.contains("2 refused stream(s)"), "{stderr}");
}
