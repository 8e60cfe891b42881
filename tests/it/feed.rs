//! The agent feed over real sockets: an engine replaying a recorded call into the feed, served
//! on 127.0.0.1, read by WebSocket and SSE clients as a console would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use prompter_cli::console::FeedWiring;
use prompter_core::output::Output;
use prompter_core::secret::Secret;
use prompter_engine::config::{self, LoadRequest};
use prompter_engine::engine::Engine;
use prompter_engine::feed::FeedHub;
use prompter_engine::feed::access::{FeedAccess, Scope};
use prompter_engine::feed::http::{ActionConfig, FeedConfig, FeedService};
use prompter_engine::registry;
use prompter_engine::sink::FnSink;
use prompter_engine::source::Source;
use prompter_engine::source::recording::{Pace, RecordingSource};
use prompter_engine::stats::Stats;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, http::HeaderValue};

use crate::cli::root;

const SECRET: &str = "a feed secret for tests, 32 bytes or more";
const OPERATOR: &str = "operator-token-for-tests";
const CALL: &str = "support-1";

/// A pipeline that answers every feedback event with a card, to show feedback is routed.
const FEEDBACK_PIPELINE: &str = "pipeline: feedback_seen
on: [feedback]
stages:
  - id: note
    plugin: notify
    config:
      kind: feedback_note
      text: \"{{ event.feedback.action }} on {{ event.feedback.output_id }} v{{ event.feedback.version }} ({{ event.feedback.pipeline }})\"
";

/// A sink that reports on calls: it asks for agents' feedback notes.
struct Reporter(Arc<Mutex<Vec<Value>>>);

#[prompter_core::async_trait]
impl prompter_engine::sink::Sink for Reporter {
    fn name(&self) -> &str {
        "reporter"
    }
    fn wants_feedback(&self) -> bool {
        true
    }
    fn filter(&self) -> Option<prompter_engine::sink::Filter> {
        // Outputs are not what it reports on here: only the notes.
        Some(Arc::new(|_: &Output| false))
    }
    async fn deliver(&mut self, o: Arc<Output>) -> Result<(), prompter_engine::sink::SinkError> {
        assert_eq!(o.kind, prompter_engine::sink::FEEDBACK_KIND);
        self.0.lock().unwrap().push(o.data.clone());
        Ok(())
    }
}

struct Served {
    notes: Arc<Mutex<Vec<Value>>>,
    http: String,
    ws: String,
    hub: Arc<FeedHub>,
    engine: Arc<Engine>,
    outputs: Arc<Mutex<Vec<Output>>>,
    _stop: watch::Sender<bool>,
    stop_rx: watch::Receiver<bool>,
    dir: tempfile::TempDir,
}

fn access() -> FeedAccess {
    FeedAccess::new(Secret::new(SECRET)).unwrap()
}

fn token(scope: Scope) -> String {
    access().mint(&scope, Duration::from_secs(300), SystemTime::now())
}

fn call_token() -> String {
    token(Scope::Conversation(CALL.into()))
}

/// The shipped configuration plus the feedback pipeline, with the feed on 127.0.0.1:0.
async fn serve() -> Served {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = dir.path().join("feedback_seen.yaml");
    std::fs::write(&pipeline, FEEDBACK_PIPELINE).unwrap();
    let config = root().join("prompter.yaml");
    let env = |_: &str| None;
    let files = [pipeline];
    let req = LoadRequest {
        config: Some(&config),
        files: &files,
        include_config_pipelines: true,
        env: &env,
        metrics: None,
    };
    let loaded =
        config::load(&req, &registry::builtin()).unwrap_or_else(|d| panic!("{}", d.render()));
    let wiring = FeedWiring::new();
    let notes: Arc<Mutex<Vec<Value>>> = Arc::default();
    let outputs: Arc<Mutex<Vec<Output>>> = Arc::default();
    let into = outputs.clone();
    let collect = FnSink::new("test", move |o: &Output| {
        into.lock().unwrap().push(o.clone())
    });
    let engine = Arc::new(
        Engine::new(
            loaded.pipelines,
            loaded.settings,
            vec![
                wiring.sink(),
                Box::new(collect),
                Box::new(Reporter(notes.clone())),
            ],
            Arc::new(Stats::default()),
        )
        .with_observer(wiring.observer()),
    );
    let (stop, stop_rx) = watch::channel(false);
    let cfg = FeedConfig {
        allowed_origins: vec!["https://agents.example.com".into()],
        feedback_log: Some(dir.path().join("feedback.jsonl")),
        heartbeat_ms: 300,
        actions: vec![ActionConfig {
            name: "text_customer".into(),
            label: "Text the customer the recap".into(),
            sink: "customer_sms".into(),
            text: "Thanks for calling. {{ summary.text if summary else 'We will follow up.' }}"
                .into(),
        }],
        ..FeedConfig::default()
    };
    let env = |name: &str| match name {
        "PROMPTER_FEED_SECRET" => Some(SECRET.to_owned()),
        "PROMPTER_OPERATOR_TOKEN" => Some(OPERATOR.to_owned()),
        _ => None,
    };
    let service = Arc::new(
        FeedService::new(
            &cfg,
            &env,
            wiring.hub.clone(),
            Some(engine.clone()),
            stop_rx.clone(),
        )
        .unwrap(),
    );
    let addr = prompter_engine::server::serve("127.0.0.1:0", service.routes(), stop_rx.clone())
        .await
        .unwrap();
    Served {
        notes,
        http: format!("http://{addr}"),
        ws: format!("ws://{addr}"),
        hub: wiring.hub.clone(),
        engine,
        outputs,
        _stop: stop,
        stop_rx,
        dir,
    }
}

/// Plays the support call at `speed` times real time; resolves when every event is handed over.
fn play(s: &Served, speed: f64) -> tokio::task::JoinHandle<()> {
    let path = root().join("tests/fixtures/recordings/support-call.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let (lines, problems) = prompter_engine::recording::parse(&path, 0, &text);
    assert!(problems.is_empty());
    let source = RecordingSource::new(lines, vec![path], Pace::Realtime(speed));
    let engine = s.engine.clone();
    let stop = s.stop_rx.clone();
    tokio::spawn(async move {
        Box::new(source).run(engine, stop).await.unwrap();
    })
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `path` as a browser would: the token in the subprotocol list, with an origin.
async fn open(
    s: &Served,
    path: &str,
    token: Option<&str>,
    origin: Option<&str>,
) -> Result<Socket, u16> {
    let mut req = format!("{}{path}", s.ws).into_client_request().unwrap();
    let protocols = match token {
        Some(t) => format!("prompter.feed.v1, bearer.{t}"),
        None => "prompter.feed.v1".to_owned(),
    };
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&protocols).unwrap(),
    );
    if let Some(o) = origin {
        req.headers_mut()
            .insert("origin", HeaderValue::from_str(o).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((socket, response)) => {
            assert_eq!(
                response.headers()["sec-websocket-protocol"],
                "prompter.feed.v1",
                "the feed's subprotocol is echoed, never the bearer entry"
            );
            Ok(socket)
        }
        Err(tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// The next feed message (heartbeats are counted, not returned).
async fn next(socket: &mut Socket, beats: &mut usize) -> Value {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s")
            .expect("the socket stays open")
            .unwrap();
        if let tungstenite::Message::Text(t) = frame {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "heartbeat" {
                *beats += 1;
                continue;
            }
            return v;
        }
    }
}

/// The id of the last message of the call's feed (once everything is delivered).
fn last_id(hub: &FeedHub) -> String {
    hub.subscribe(CALL, None).backlog[0].id.clone()
}

/// Reads until the message with id `last`; returns what was read.
async fn read_to(socket: &mut Socket, last: &str, got: &mut Vec<Value>, beats: &mut usize) {
    while got.last().is_none_or(|m| m["id"] != last) {
        got.push(next(socket, beats).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_call_and_resumed_ends_with_what_an_uninterrupted_client_got() {
    let s = serve().await;
    let t = call_token();
    let path = format!("/feed/v1/conversations/{CALL}/ws");
    let mut steady = open(&s, &path, Some(&t), None).await.unwrap();
    let mut flaky = open(&s, &path, Some(&t), None).await.unwrap();
    let (mut beats, mut flaky_beats) = (0, 0);
    let mut seen: Vec<Value> = vec![next(&mut steady, &mut beats).await];
    let mut flaky_seen: Vec<Value> = vec![next(&mut flaky, &mut flaky_beats).await];
    assert_eq!(
        seen[0]["type"], "snapshot",
        "a new client starts with the state"
    );
    assert_eq!(seen[0]["resync"], false);

    let played = play(&s, 8.0);
    // The flaky client reads part of the call, then its connection dies without a close.
    while flaky_seen.len() < 12 {
        flaky_seen.push(next(&mut flaky, &mut flaky_beats).await);
    }
    let resume_from = flaky_seen.last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(flaky);
    tokio::time::sleep(Duration::from_millis(700)).await;

    played.await.unwrap();
    s.engine.finish().await;
    let last = last_id(&s.hub);
    let mut flaky = open(&s, &format!("{path}?since={resume_from}"), Some(&t), None)
        .await
        .unwrap();
    let resumed_at = flaky_seen.len();
    read_to(&mut flaky, &last, &mut flaky_seen, &mut flaky_beats).await;
    read_to(&mut steady, &last, &mut seen, &mut beats).await;

    assert!(
        flaky_seen[resumed_at..]
            .iter()
            .all(|m| m["type"] != "snapshot"),
        "the gap was replayed, not a snapshot"
    );
    assert_eq!(flaky_seen.len(), seen.len(), "no gap and no duplicate");
    // Each client's first snapshot is made when it subscribes: only its time differs.
    seen[0]["at_ms"] = json!(0);
    flaky_seen[0]["at_ms"] = json!(0);
    assert_eq!(flaky_seen, seen, "the same messages, in the same order");
    let types: Vec<&str> = seen.iter().filter_map(|m| m["type"].as_str()).collect();
    for t in [
        "transcript.partial",
        "transcript.final",
        "output.upsert",
        "conversation.ended",
    ] {
        assert!(types.contains(&t), "{t} in {types:?}");
    }
    let line = seen
        .iter()
        .find(|m| m["type"] == "transcript.final")
        .unwrap();
    assert!(line["speaker"].is_string() && line["text"].is_string());
    let card = seen.iter().find(|m| m["type"] == "output.upsert").unwrap();
    assert!(
        card["output"]["id"]
            .as_str()
            .unwrap()
            .starts_with("support-1/")
    );
    assert!(beats > 0, "heartbeats flow while the call plays");

    // A position from another epoch (an engine restarted since) gets a snapshot marked resync.
    let mut stale = open(&s, &format!("{path}?since=0000-5"), Some(&t), None)
        .await
        .unwrap();
    let first = next(&mut stale, &mut beats).await;
    assert_eq!(first["type"], "snapshot");
    assert_eq!(first["resync"], true);
    assert_eq!(first["ended"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_forged_expired_and_foreign_tokens_and_foreign_origins_are_refused() {
    let s = serve().await;
    let path = format!("/feed/v1/conversations/{CALL}/ws");
    let expired = access().mint(
        &Scope::Conversation(CALL.into()),
        Duration::from_secs(5),
        SystemTime::now() - Duration::from_secs(60),
    );
    let other = FeedAccess::new(Secret::new("another secret that is 32 bytes long"))
        .unwrap()
        .mint(
            &Scope::Supervisor,
            Duration::from_secs(60),
            SystemTime::now(),
        );
    let elsewhere = token(Scope::Conversation("another-call".into()));
    assert_eq!(
        open(&s, &path, None, None).await.err(),
        Some(401),
        "missing"
    );
    assert_eq!(
        open(&s, &path, Some("00ff.00ff"), None).await.err(),
        Some(401)
    );
    assert_eq!(open(&s, &path, Some(&other), None).await.err(), Some(401));
    assert_eq!(open(&s, &path, Some(&expired), None).await.err(), Some(401));
    assert_eq!(
        open(&s, &path, Some(&elsewhere), None).await.err(),
        Some(403),
        "a token for another conversation"
    );
    let t = call_token();
    assert_eq!(
        open(&s, &path, Some(&t), Some("https://evil.example.com"))
            .await
            .err(),
        Some(403),
        "a page on another origin cannot use a stolen token"
    );
    assert!(
        open(&s, &path, Some(&t), Some("https://agents.example.com"))
            .await
            .is_ok()
    );
    assert!(open(&s, &path, Some(&t), Some(&s.http)).await.is_ok());
    // The supervisor stream takes supervisor tokens only.
    assert_eq!(
        open(&s, "/feed/v1/all/ws", Some(&t), None).await.err(),
        Some(403)
    );
    let mut all = open(&s, "/feed/v1/all/ws", Some(&token(Scope::Supervisor)), None)
        .await
        .unwrap();
    let mut beats = 0;
    assert_eq!(next(&mut all, &mut beats).await["type"], "calls");

    // Over HTTP the same answers, with a body that says why; the token is never echoed.
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/feed/v1/whoami?conversation={CALL}", s.http))
        .bearer_auth(&expired)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "the feed token has expired"})
    );
    let r = http
        .get(format!("{}/feed/v1/whoami", s.http))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"scope": "conversation", "conversation_id": CALL})
    );
    // Tokens are minted by the operator only.
    let mint = |auth: &str| {
        http.post(format!("{}/feed/v1/tokens", s.http))
            .bearer_auth(auth)
            .json(&json!({"conversation_id": CALL, "ttl_s": 60}))
            .send()
    };
    assert_eq!(mint("wrong").await.unwrap().status(), 401);
    assert_eq!(
        mint(&t).await.unwrap().status(),
        401,
        "a feed token is not an operator's"
    );
    let minted: Value = mint(OPERATOR).await.unwrap().json().await.unwrap();
    assert_eq!(minted["scope"], "conversation");
    let console = minted["console_path"].as_str().unwrap();
    assert!(console.starts_with("/console/#token="), "{console}");
    assert!(
        open(&s, &path, minted["token"].as_str(), None)
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_from_last_event_id_with_exactly_the_gap() {
    let s = serve().await;
    play(&s, 50.0).await.unwrap();
    s.engine.finish().await;
    let last = last_id(&s.hub);
    let (epoch, seq) = last.rsplit_once('-').unwrap();
    let seq: u64 = seq.parse().unwrap();
    let r = reqwest::Client::new()
        .get(format!("{}/feed/v1/conversations/{CALL}/sse", s.http))
        .bearer_auth(call_token())
        .header("last-event-id", format!("{epoch}-{}", seq - 3))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut r = r;
    let mut text = String::new();
    while !text.contains(&format!("id: {last}\n")) {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    let want: Vec<String> = (seq - 2..=seq).map(|n| format!("{epoch}-{n}")).collect();
    assert_eq!(ids, want, "exactly the three missed messages:\n{text}");
    assert!(
        text.contains("event: output.upsert\n") || text.contains("event: conversation.ended\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_is_recorded_with_pipeline_and_model_and_routed_to_pipelines() {
    let s = serve().await;
    let played = play(&s, 4.0);
    let card_id = "support-1/rta/k-late-delivery";
    let card = loop {
        if let Some(c) = s.hub.card(CALL, card_id) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let http = reqwest::Client::new();
    let send = |token: String, body: Value| {
        http.post(format!("{}/feed/v1/conversations/{CALL}/feedback", s.http))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let useful = json!({"output_id": card_id, "version": card.version, "action": "useful"});
    let r = send(call_token(), useful.clone()).await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"recorded": true, "routed": true})
    );
    let dismissed = json!({"output_id": card_id, "version": card.version, "action": "dismissed", "reason": "already_handled"});
    assert_eq!(send(call_token(), dismissed).await.unwrap().status(), 202);

    // Refusals say why and record nothing.
    let cases = [
        (
            call_token(),
            json!({"output_id": "support-1/rta/k-nope", "version": 1, "action": "useful"}),
            404,
        ),
        (
            call_token(),
            json!({"output_id": card_id, "version": 1, "action": "loved"}),
            400,
        ),
        (
            call_token(),
            json!({"output_id": card_id, "version": 99, "action": "useful"}),
            400,
        ),
        (
            call_token(),
            json!({"output_id": card_id, "version": 1, "action": "useful", "reason": "wrong"}),
            400,
        ),
        ("nope".to_owned(), useful.clone(), 401),
        (
            token(Scope::Conversation("another".into())),
            useful.clone(),
            403,
        ),
    ];
    for (t, body, status) in cases {
        let r = send(t, body.clone()).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    }

    played.await.unwrap();
    s.engine.finish().await;
    // The log has both, each with what the output was.
    let log = std::fs::read_to_string(s.dir.path().join("feedback.jsonl")).unwrap();
    let records: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{log}");
    assert_eq!(records[0]["conversation_id"], CALL);
    assert_eq!(records[0]["output_id"], card_id);
    assert_eq!(records[0]["version"], card.version);
    assert_eq!(records[0]["action"], "useful");
    assert_eq!(records[0]["pipeline"], "rta");
    assert_eq!(records[0]["kind"], "suggestion");
    assert_eq!(records[0]["model"], json!(card.model), "{log}");
    assert!(
        card.model.is_some(),
        "the card names the model that answered"
    );
    assert_eq!(records[1]["action"], "dismissed");
    assert_eq!(records[1]["reason"], "already_handled");
    // Sinks that report on calls (the post-call e-mail) got both as notes.
    let notes = s.notes.lock().unwrap().clone();
    let actions: Vec<&str> = notes
        .iter()
        .map(|n| n["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["useful", "dismissed"]);
    assert_eq!(notes[1]["reason"], "already_handled");
    assert_eq!(notes[0]["output_id"], card_id);
    // A pipeline on `feedback` saw both.
    let notes: Vec<String> = s
        .outputs
        .lock()
        .unwrap()
        .iter()
        .filter(|o| o.kind == "feedback_note")
        .map(|o| o.text.clone())
        .collect();
    assert_eq!(
        notes,
        [
            format!("useful on {card_id} v{} (rta)", card.version),
            format!("dismissed on {card_id} v{} (rta)", card.version),
        ]
    );
    // And the counts, for a supervisor.
    let summary: Value = http
        .get(format!("{}/feed/v1/feedback/summary", s.http))
        .bearer_auth(token(Scope::Supervisor))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(summary["recorded"], 2);
    assert_eq!(
        summary["counts"][1],
        json!({"pipeline": "rta", "model": card.model, "action": "useful", "count": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_is_served_self_contained_with_a_strict_policy() {
    let s = serve().await;
    let http = reqwest::Client::new();
    for (path, kind) in [
        ("/console/", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/app.css", "text/css"),
    ] {
        let r = http.get(format!("{}{path}", s.http)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(kind));
        assert!(
            h["content-security-policy"]
                .to_str()
                .unwrap()
                .starts_with("default-src 'self'")
        );
        let body = r.text().await.unwrap();
        assert!(!body.is_empty(), "{path}");
        // Nothing is fetched from the internet.
        for outside in ["http://", "https://", "//cdn", "googleapis"] {
            assert!(!body.contains(outside), "{path} mentions {outside}");
        }
    }
    // The socket needs the feed's subprotocol echoed; the plain WebSocket upgrade without it
    // still works for non-browser clients using Authorization.
    let mut req = format!("{}/feed/v1/conversations/{CALL}/ws", s.ws)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {}", call_token())).unwrap(),
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let first = socket.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"type\":\"snapshot\""));
    socket.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_action_sends_the_edited_text_through_its_sink_and_is_recorded() {
    let s = serve().await;
    let played = play(&s, 20.0);
    // The call's recap arrives at its end.
    let summary = loop {
        if let Some(c) = s.hub.cards(CALL).into_iter().find(|c| c.kind == "summary") {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    played.await.unwrap();
    let http = reqwest::Client::new();
    let listed: Value = http
        .get(format!("{}/feed/v1/conversations/{CALL}/actions", s.http))
        .bearer_auth(call_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["name"], "text_customer");
    assert_eq!(listed[0]["sink"], "customer_sms");
    let prefilled = listed[0]["text"].as_str().unwrap();
    assert_eq!(
        prefilled,
        format!("Thanks for calling. {}", summary.text.trim())
    );
    // The agent edits it and sends it.
    let send = |name: &str, body: Value, token: String| {
        http.post(format!(
            "{}/feed/v1/conversations/{CALL}/actions/{name}",
            s.http
        ))
        .bearer_auth(token)
        .json(&body)
        .send()
    };
    let r = send(
        "text_customer",
        json!({"text": "Your refund is on its way."}),
        call_token(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 202);
    let sent: Value = r.json().await.unwrap();
    assert_eq!(sent["sink"], "customer_sms");
    assert_eq!(
        send("nope", json!({}), call_token())
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        send("text_customer", json!({"text": ""}), call_token())
            .await
            .unwrap()
            .status(),
        400
    );
    let other = token(Scope::Conversation("another".into()));
    assert_eq!(
        send("text_customer", json!({}), other)
            .await
            .unwrap()
            .status(),
        403
    );
    s.engine.finish().await;
    // Delivered as an output for that sink...
    let out = s
        .outputs
        .lock()
        .unwrap()
        .iter()
        .find(|o| o.kind == "agent_action")
        .cloned()
        .expect("the action's output");
    assert_eq!(out.id, sent["output_id"]);
    assert_eq!(out.text, "Your refund is on its way.");
    assert_eq!(out.data["sink"], "customer_sms");
    assert_eq!(out.title.as_deref(), Some("Text the customer the recap"));
    // ...and recorded like feedback.
    let log = std::fs::read_to_string(s.dir.path().join("feedback.jsonl")).unwrap();
    let record: Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    assert_eq!(record["action"], "action:text_customer");
    assert_eq!(record["output_id"], out.id);
}
