#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! Notifier sinks declared in the engine config, on a replayed call: the real `prompter replay`
//! delivering to a local webhook receiver that checks every Standard Webhooks signature and
//! answers with the failures a real endpoint has (500, 429 with `Retry-After`, 410).

mod support;

use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use support::*;

/// The receiver's secret (`whsec_` + base64 of 32 bytes).
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYqrTw==";

/// What the receiver saw: (webhook-id, body) of every request, and whether each signature held.
#[derive(Default)]
struct Seen {
    requests: Vec<(String, Value)>,
    bad_signatures: usize,
    /// Status codes to answer with, in order; then 204.
    script: Vec<(u16, Option<&'static str>)>,
}

/// Checks a request's signature as a receiver would, independently of the engine's code:
/// HMAC-SHA256 over `id.timestamp.body` with the secret's key, base64, `v1,` prefix.
fn verifies(headers: &HeaderMap, body: &[u8]) -> bool {
    let key = base64::engine::general_purpose::STANDARD
        .decode(SECRET.trim_start_matches("whsec_"))
        .unwrap();
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", h("webhook-id"), h("webhook-timestamp")).as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    h("webhook-signature").split(' ').any(|s| s == expected)
}

async fn receiver(seen: Arc<Mutex<Seen>>) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let mut s = seen.lock().unwrap();
                if !verifies(&headers, &body) {
                    s.bad_signatures += 1;
                }
                let id = headers["webhook-id"].to_str().unwrap().to_owned();
                s.requests
                    .push((id, serde_json::from_slice(&body).unwrap()));
                let (code, retry_after) = if s.script.is_empty() {
                    (204, None)
                } else {
                    s.script.remove(0)
                };
                let mut r = axum::response::Response::new(axum::body::Body::empty());
                *r.status_mut() = StatusCode::from_u16(code).unwrap();
                if let Some(ra) = retry_after {
                    r.headers_mut().insert("retry-after", ra.parse().unwrap());
                }
                r
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hook")
}

/// The shipped `prompter.yaml`, its paths made absolute so it can live in a test's folder.
fn shipped_config() -> String {
    let root = root();
    std::fs::read_to_string(root.join("prompter.yaml"))
        .unwrap()
        .replace("pipelines/", &format!("{}/pipelines/", root.display()))
}

/// The shipped `prompter.yaml` plus a webhook sink taking the final suggestions.
fn config(dir: &std::path::Path, url: &str) -> String {
    let shipped = shipped_config();
    let yaml = format!(
        "{shipped}
sinks:
  hook:
    type: webhook
    config:
      url: \"{url}\"
      secret_env: TEST_WEBHOOK_SECRET
      retry_schedule_ms: [50, 50, 50]
    take:
      kinds: [suggestion]
      statuses: [final]
    dead_letter: dead/hook.jsonl
"
    );
    let path = dir.join("prompter.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

fn replay(config: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .args([
            "replay",
            "--config",
            config,
            &root()
                .join("tests/fixtures/recordings/support-call.jsonl")
                .display()
                .to_string(),
        ])
        .env("TEST_WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn final_suggestions(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "suggestion" && v["status"] == "final")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_call_reaches_the_webhook_signed_once_per_version_through_500_and_429() {
    let seen = Arc::new(Mutex::new(Seen {
        script: vec![(500, None), (429, Some("1"))],
        ..Seen::default()
    }));
    let url = receiver(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || replay(&cfg))
        .await
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    let wanted = final_suggestions(&stdout);
    assert_eq!(wanted.len(), 2, "{stdout}");
    let s = seen.lock().unwrap();
    assert_eq!(s.bad_signatures, 0, "every signature verifies");
    // The first card was tried three times (500, 429, then accepted): same id each time.
    let ids: Vec<&str> = s.requests.iter().map(|(id, _)| id.as_str()).collect();
    let first = format!(
        "{}:{}",
        wanted[0]["id"].as_str().unwrap(),
        wanted[0]["version"]
    );
    let second = format!(
        "{}:{}",
        wanted[1]["id"].as_str().unwrap(),
        wanted[1]["version"]
    );
    assert_eq!(ids, [&first, &first, &first, &second], "{ids:?}");
    for (_, body) in &s.requests {
        assert_eq!(body["type"], "output.upserted");
        assert_eq!(body["data"]["kind"], "suggestion");
        assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(s.requests[3].1["data"], wanted[1], "the output as printed");
    assert!(
        stderr.contains("sink hook: 2 delivered, 2 retried, 0 dead-lettered"),
        "{stderr}"
    );
    assert!(!dir.path().join("dead/hook.jsonl").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gone_endpoint_is_disabled_and_what_it_missed_is_dead_lettered_with_reasons() {
    let seen = Arc::new(Mutex::new(Seen {
        script: vec![(410, None)],
        ..Seen::default()
    }));
    let url = receiver(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &url);
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || replay(&cfg))
        .await
        .unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        seen.lock().unwrap().requests.len(),
        1,
        "nothing after the 410"
    );
    let dead: Vec<Value> = std::fs::read_to_string(dir.path().join("dead/hook.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let wanted = final_suggestions(&stdout);
    assert_eq!(dead.len(), wanted.len());
    assert_eq!(dead[0]["reason"], "the webhook answered 410 Gone");
    assert_eq!(
        dead[1]["reason"],
        "the target is disabled: the webhook answered 410 Gone"
    );
    assert_eq!(dead[1]["output"], wanted[1]);
    assert!(
        stderr.contains("sink hook: 0 delivered, 0 retried, 2 dead-lettered (disabled"),
        "{stderr}"
    );
}

#[test]
fn validate_points_at_unknown_sinks_types_and_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("prompter.yaml");
    std::fs::write(
        &cfg,
        "pipelines: [p.yaml]\nsinks:\n  hook:\n    type: webhok\n  crm:\n    type: webhook\n    config: { url: \"http://127.0.0.1:1/\" }\n    take: { statuses: [done] }\nfeed:\n  actions: [{ name: text, label: Text, sink: nowhere, text: hi }]\nllm:\n  offline: { provider: offline }\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "pipeline: p\non: [message_response]\nsinks: [crn]\nstages:\n  - id: out\n    plugin: notify\n    config: { kind: note, text: hi }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(dir.path())
        .args(["validate", "--config", "prompter.yaml", "p.yaml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("prompter.yaml:4:11: error: unknown sink type `webhok`"),
        "{text}"
    );
    assert!(text.contains("did you mean `webhook`?"), "{text}");
    assert!(
        text.contains("prompter.yaml:8:24: error: unknown status `done`"),
        "{text}"
    );
    assert!(
        text.contains("p.yaml:3:9: error: unknown sink `crn`"),
        "{text}"
    );
    assert!(text.contains("did you mean `crm`?"), "{text}");
    assert!(
        text.contains("error: feed action `text` sends through sink `nowhere`, which `sinks:` does not declare"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_webhook_is_down_exits_within_the_drain_deadline_and_dead_letters_all() {
    let f = fakes().await;
    // Nothing listens here: every attempt is refused, and the next retry is a minute away.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", closed.local_addr().unwrap());
    drop(closed);
    let root = root();
    let live = std::fs::read_to_string(root.join("prompter-live.yaml"))
        .unwrap()
        .replace("pipelines/", &format!("{}/pipelines/", root.display()))
        .replacen("engine:\n", "engine:\n  sink_drain_ms: 700\n", 1);
    let cfg = f.dir.path().join("live.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{live}
sinks:
  hook:
    type: webhook
    config: {{ url: \"{url}\", secret_env: TEST_WEBHOOK_SECRET, retry_schedule_ms: [60000] }}
    take: {{ kinds: [suggestion], statuses: [final] }}
    dead_letter: {}
",
            f.dir.path().join("dead.jsonl").display()
        ),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let ingest = f
        .command(&[
            "kb",
            "ingest",
            "pipelines/data/sales_objections.csv",
            "--store",
            "sales",
            "--config",
            &cfg,
        ])
        .output()
        .unwrap();
    assert!(ingest.status.success(), "{ingest:?}");
    let mut cmd = f.command(&["run", "--config", &cfg, "--connection", "conn-d"]);
    cmd.env("TEST_WEBHOOK_SECRET", SECRET);
    let engine = Engine::spawn(cmd);
    assert!(
        f.symbl.wait_subscribed("conn-d", 1, WAIT).await,
        "{}",
        engine.stderr()
    );
    f.symbl
        .push("conn-d", tracker("Budget Constraints", "too expensive", 1));
    f.symbl.push("conn-d", tracker("Timing", "next quarter", 2));
    for title in ["Budget Constraints", "Timing"] {
        engine
            .output(title, |v| v["title"] == title && v["status"] == "final")
            .await;
    }
    let stopped = std::time::Instant::now();
    let (code, stderr, outputs) = engine.signal("TERM");
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(5),
        "stopped within the drain deadline: {:?}",
        stopped.elapsed()
    );
    let finals: Vec<&Value> = outputs
        .iter()
        .filter(|v| v["kind"] == "suggestion" && v["status"] == "final")
        .collect();
    let dead: Vec<Value> = std::fs::read_to_string(f.dir.path().join("dead.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut dead_ids: Vec<&str> = dead
        .iter()
        .map(|d| d["output"]["id"].as_str().unwrap())
        .collect();
    let mut final_ids: Vec<&str> = finals.iter().map(|v| v["id"].as_str().unwrap()).collect();
    dead_ids.sort_unstable();
    final_ids.sort_unstable();
    assert_eq!(
        dead_ids, final_ids,
        "every undelivered output is in the dead-letter file"
    );
    assert!(
        dead.iter()
            .all(|d| d["reason"] == "the engine stopped and the sink's drain deadline passed"),
        "{dead:?}"
    );
    assert!(stderr.contains("sink hook: 0 delivered"), "{stderr}");
}

/// What the Slack fake saw: (method, when, body).
type SlackCalls = Arc<Mutex<Vec<(String, std::time::Instant, Value)>>>;

/// A fake of Slack's Web API (`chat.postMessage`, `chat.update`, `chat.delete`): checks the bot
/// token, answers the first call 429 with `Retry-After: 1`, then `ok: true` with a `ts`.
async fn slack(calls: SlackCalls) -> String {
    let app = axum::Router::new().route(
        "/api/{method}",
        axum::routing::post(
            move |axum::extract::Path(method): axum::extract::Path<String>,
                  headers: HeaderMap,
                  body: axum::body::Bytes| {
                let calls = calls.clone();
                async move {
                    let ok_auth = headers
                        .get("authorization")
                        .is_some_and(|v| v == "Bearer xoxb-test-token");
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let mut c = calls.lock().unwrap();
                    let first = c.is_empty();
                    c.push((method.clone(), std::time::Instant::now(), body.clone()));
                    if first {
                        let mut r = axum::response::Response::new(axum::body::Body::empty());
                        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                        r.headers_mut().insert("retry-after", "1".parse().unwrap());
                        return r;
                    }
                    let answer = if !ok_auth {
                        serde_json::json!({"ok": false, "error": "invalid_auth"})
                    } else {
                        let ts = body["ts"]
                            .as_str()
                            .map_or_else(|| format!("1700000000.{:06}", c.len()), str::to_owned);
                        serde_json::json!({"ok": true, "channel": body["channel"], "ts": ts})
                    };
                    axum::Json(answer).into_response()
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/api")
}

/// A call where the same tracker fires twice with another phrase: one card, two versions.
/// Played in real time (x4) so the first answer is complete before the tracker fires again.
const REFIRED: &str = r#"{"conversation": "s-1", "offset_ms": 1000, "event": {"type": "message_response", "sequenceNumber": 0, "messages": [{"from": {"id": "c", "name": "Elena"}, "payload": {"content": "My order still hasn't arrived.", "contentType": "text/plain"}, "id": "m1"}]}}
{"conversation": "s-1", "offset_ms": 1500, "event": {"type": "tracker_response", "isFinal": true, "trackers": [{"name": "Late Delivery", "matches": [{"type": "vocabulary", "value": "hasn't arrived", "messageRefs": [{"id": "m1", "text": "My order still hasn't arrived.", "offset": 15}], "insightRefs": []}]}], "sequenceNumber": 1}}
{"conversation": "s-1", "offset_ms": 4000, "event": {"type": "message_response", "sequenceNumber": 2, "messages": [{"from": {"id": "c", "name": "Elena"}, "payload": {"content": "It is a week late now.", "contentType": "text/plain"}, "id": "m2"}]}}
{"conversation": "s-1", "offset_ms": 4500, "event": {"type": "tracker_response", "isFinal": true, "trackers": [{"name": "Late Delivery", "matches": [{"type": "vocabulary", "value": "a week late", "messageRefs": [{"id": "m2", "text": "It is a week late now.", "offset": 6}], "insightRefs": []}]}], "sequenceNumber": 3}}
{"conversation": "s-1", "offset_ms": 6000, "event": {"type": "message", "message": {"type": "conversation_completed", "data": {"conversationId": "s-1"}}}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_gets_one_message_per_card_posted_once_then_updated_in_place_at_most_once_a_second() {
    let calls: SlackCalls = Arc::default();
    let api = slack(calls.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let shipped = shipped_config();
    let cfg = dir.path().join("prompter.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{shipped}
sinks:
  team:
    type: slack
    config: {{ channel: C0TEAM, token_env: TEST_SLACK_TOKEN, api_base: \"{api}\" }}
    take: {{ kinds: [suggestion] }}
"
        ),
    )
    .unwrap();
    let call = dir.path().join("refired.jsonl");
    std::fs::write(&call, REFIRED).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_prompter"))
            .args([
                "replay",
                "--realtime",
                "--speed",
                "4",
                "--config",
                &cfg.display().to_string(),
                &call.display().to_string(),
            ])
            .env("TEST_SLACK_TOKEN", "xoxb-test-token")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    let versions: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "suggestion")
        .collect();
    assert_eq!(versions.len(), 2, "one card, two versions: {stdout}");
    assert_eq!(versions[0]["id"], versions[1]["id"]);

    let calls = calls.lock().unwrap().clone();
    let methods: Vec<&str> = calls.iter().map(|(m, _, _)| m.as_str()).collect();
    // The 429, its retry after `Retry-After`, then the second version edits the same message.
    assert_eq!(
        methods,
        ["chat.postMessage", "chat.postMessage", "chat.update"],
        "{calls:#?}"
    );
    assert!(
        calls[1].1 - calls[0].1 >= std::time::Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert!(
        calls[2].1 - calls[1].1 >= std::time::Duration::from_millis(990),
        "one call a second"
    );
    let (post, update) = (&calls[1].2, &calls[2].2);
    assert_eq!(post["channel"], "C0TEAM");
    assert_eq!(
        update["ts"], "1700000000.000002",
        "the posted message is the one edited"
    );
    assert_eq!(post["metadata"]["event_payload"]["id"], versions[0]["id"]);
    let why = update["blocks"][2]["elements"][0]["text"].as_str().unwrap();
    assert!(
        why.contains("Late Delivery heard \u{201c}a week late\u{201d}"),
        "{why}"
    );
    assert!(why.contains("rta · offline"), "{why}");
    assert!(
        stderr.contains("sink team: 2 delivered, 1 retried, 0 dead-lettered"),
        "{stderr}"
    );
}

/// What an SMS fake saw: (path, authorization header, form fields).
type SmsCalls = Arc<Mutex<Vec<(String, String, Vec<(String, String)>)>>>;

fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(bytes[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    };
    std::str::from_utf8(body)
        .unwrap()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// Fakes of Twilio's Messages API (429 with error 20429 first, then 201) and Vonage's SMS API.
async fn sms_fakes(calls: SmsCalls) -> String {
    let twilio_calls = calls.clone();
    let app = axum::Router::new()
        .route(
            "/2010-04-01/Accounts/{sid}/Messages.json",
            axum::routing::post(
                move |axum::extract::Path(sid): axum::extract::Path<String>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| {
                    let calls = twilio_calls.clone();
                    async move {
                        let auth = headers["authorization"].to_str().unwrap().to_owned();
                        let mut c = calls.lock().unwrap();
                        let first = !c.iter().any(|call| call.0.starts_with("twilio/"));
                        c.push((format!("twilio/{sid}"), auth, parse_form(&body)));
                        if first {
                            return (
                                StatusCode::TOO_MANY_REQUESTS,
                                axum::Json(serde_json::json!({"code": 20429, "message": "Too Many Requests", "status": 429})),
                            )
                                .into_response();
                        }
                        (
                            StatusCode::CREATED,
                            axum::Json(serde_json::json!({"sid": format!("SM{}", c.len()), "status": "queued", "error_code": null})),
                        )
                            .into_response()
                    }
                },
            ),
        )
        .route(
            "/sms/json",
            axum::routing::post(move |body: axum::body::Bytes| {
                let calls = calls.clone();
                async move {
                    let form = parse_form(&body);
                    calls.lock().unwrap().push(("vonage".into(), String::new(), form));
                    axum::Json(serde_json::json!({"message-count": "1", "messages": [{"to": "15550002222", "message-id": "m1", "status": "0"}]}))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recap_reaches_the_customer_by_twilio_split_to_the_limit_and_by_vonage_cut() {
    let calls: SmsCalls = Arc::default();
    let base = sms_fakes(calls.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let root = root();
    let shipped = shipped_config();
    let cfg = dir.path().join("prompter.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{shipped}
sinks:
  twilio:
    type: twilio_sms
    config:
      from: \"+15550001111\"
      to: \"+15550002222\"
      body: \"{{{{ output.title }}}}: {{{{ output.text }}}}\"
      max_chars: 160
      overflow: split
      api_base: \"{base}\"
      retry_schedule_ms: [50]
    take: {{ kinds: [summary] }}
  vonage:
    type: vonage_sms
    config: {{ from: \"+15550001111\", to: \"+15550002222\", max_chars: 120, api_base: \"{base}\" }}
    take: {{ kinds: [summary] }}
  bad_number:
    type: twilio_sms
    config: {{ from: \"+15550001111\", to: \"555-0102\", api_base: \"{base}\" }}
    take: {{ kinds: [summary] }}
    dead_letter: dead/bad.jsonl
"
        ),
    )
    .unwrap();
    let recording = root.join("tests/fixtures/recordings/support-call.jsonl");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_prompter"))
            .args([
                "replay",
                "--config",
                &cfg.display().to_string(),
                &recording.display().to_string(),
            ])
            .env("TWILIO_ACCOUNT_SID", "AC123")
            .env("TWILIO_AUTH_TOKEN", "twilio-token")
            .env("VONAGE_API_KEY", "vkey")
            .env("VONAGE_API_SECRET", "vsecret")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let recap: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["kind"] == "summary")
        .unwrap();
    let calls = calls.lock().unwrap().clone();
    let twilio: Vec<_> = calls.iter().filter(|c| c.0 == "twilio/AC123").collect();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("AC123:twilio-token")
    );
    assert!(
        twilio.iter().all(|c| c.1 == basic),
        "basic auth with the sid and token"
    );
    let field = |form: &[(String, String)], k: &str| {
        form.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    // The first part was refused with 20429 and sent again; then every part once, in order.
    let bodies: Vec<String> = twilio.iter().map(|c| field(&c.2, "Body")).collect();
    assert_eq!(bodies[0], bodies[1], "the throttled part was retried");
    let parts = &bodies[1..];
    assert!(parts.len() >= 2, "{parts:?}");
    for (i, p) in parts.iter().enumerate() {
        assert!(p.chars().count() <= 160, "{p}");
        assert!(p.ends_with(&format!("({}/{})", i + 1, parts.len())), "{p}");
    }
    let whole: Vec<&str> = parts
        .iter()
        .map(|p| p.rsplit_once(" (").unwrap().0)
        .collect();
    let sent = whole.join(" ");
    let expected = format!(
        "{}: {}",
        recap["title"].as_str().unwrap(),
        recap["text"].as_str().unwrap()
    );
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(
        squash(&sent),
        squash(&expected),
        "nothing lost between the parts"
    );
    assert_eq!(field(&twilio[1].2, "To"), "+15550002222");
    assert_eq!(field(&twilio[1].2, "From"), "+15550001111");
    // Vonage: the documented `text` field, numbers without `+`, the text cut to its limit.
    let vonage: Vec<_> = calls.iter().filter(|c| c.0 == "vonage").collect();
    assert_eq!(vonage.len(), 1);
    let form = &vonage[0].2;
    assert_eq!(field(form, "api_key"), "vkey");
    assert_eq!(field(form, "to"), "15550002222");
    assert!(
        form.iter().all(|(k, _)| k != "message"),
        "Vonage's field is `text`"
    );
    let text = field(form, "text");
    assert!(text.chars().count() <= 120 && text.ends_with('…'), "{text}");
    // A number that is not E.164 is never sent; it is dead-lettered with the reason.
    let dead = std::fs::read_to_string(dir.path().join("dead/bad.jsonl")).unwrap();
    assert!(dead.contains("`555-0102` is not an E.164 number"), "{dead}");
    assert!(
        stderr.contains("sink twilio: 1 delivered, 1 retried, 0 dead-lettered"),
        "{stderr}"
    );
    assert!(
        stderr.contains("sink bad_number: 0 delivered, 0 retried, 1 dead-lettered"),
        "{stderr}"
    );
}

/// A free loopback port (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real SMTP server (aiosmtpd) storing what it receives in a maildir; stopped when dropped.
struct Smtp {
    child: std::process::Child,
    port: u16,
}

impl Drop for Smtp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn smtp(maildir: &std::path::Path) -> Smtp {
    let port = free_port();
    let child = Command::new("python3")
        .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
        .args(["-c", "aiosmtpd.handlers.Mailbox"])
        .arg(maildir)
        .spawn()
        .expect("python3 with aiosmtpd (scripts/test.sh installs it)");
    let deadline = std::time::Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "aiosmtpd did not start (pip install aiosmtpd)"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Smtp { child, port }
}

/// A received message's headers and decoded MIME parts, read with Python's `email` package.
fn parse_mail(path: &std::path::Path) -> Value {
    let script = r#"
import email, json, sys
from email import policy
m = email.message_from_binary_file(open(sys.argv[1], 'rb'), policy=policy.default)
parts = [{"type": p.get_content_type(), "body": p.get_content()} for p in m.walk() if not p.is_multipart()]
print(json.dumps({"subject": m["subject"], "to": m["to"], "from": m["from"], "type": m.get_content_type(), "parts": parts}))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_post_call_email_reaches_a_real_smtp_server_with_the_summary_and_the_cards() {
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("mail");
    let server = smtp(&maildir);
    let down = free_port();
    let root = root();
    let shipped = shipped_config();
    let cfg = dir.path().join("prompter.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{shipped}
sinks:
  recap_mail:
    type: email
    config:
      host: 127.0.0.1
      port: {port}
      security: none
      from: \"Prompter <prompter@example.com>\"
      to: \"agent-{{{{ conversation_id }}}}@example.com, team@example.com\"
      subject: \"{{{{ summary.title }}}} ({{{{ conversation_id }}}}, {{{{ cards | length }}}} cards)\"
  down_mail:
    type: email
    config: {{ host: 127.0.0.1, port: {down}, security: none, from: prompter@example.com, to: team@example.com, retry_schedule_ms: [50] }}
    dead_letter: dead/mail.jsonl
",
            port = server.port
        ),
    )
    .unwrap();
    let recording = root.join("tests/fixtures/recordings/support-call.jsonl");
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_prompter"))
            .args([
                "replay",
                "--config",
                &cfg.display().to_string(),
                &recording.display().to_string(),
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let outputs: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary = outputs.iter().find(|v| v["kind"] == "summary").unwrap();

    let files: Vec<_> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "one e-mail per call");
    let mail = parse_mail(&files[0]);
    assert_eq!(mail["type"], "multipart/alternative");
    assert_eq!(mail["subject"], "Call recap (support-1, 3 cards)");
    assert_eq!(mail["to"], "agent-support-1@example.com, team@example.com");
    let part = |t: &str| {
        mail["parts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["type"] == t)
            .unwrap()["body"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (text, html) = (part("text/plain"), part("text/html"));
    // The summary itself, with its action items, questions and topics.
    for line in summary["text"].as_str().unwrap().lines() {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    assert!(
        text.contains("Action items:") && text.contains("Topics: order delivery"),
        "{text}"
    );
    // And every suggestion shown, with why.
    for card in outputs.iter().filter(|v| v["kind"] == "suggestion") {
        let title = card["title"].as_str().unwrap();
        assert!(text.contains(title), "{title} missing from:\n{text}");
        assert!(html.contains(title), "{title} missing from the HTML");
    }
    assert!(
        text.contains("why: Late Delivery, heard \"hasn't arrived\""),
        "{text}"
    );
    assert!(html.contains("<h3>Suggestions shown (3)</h3>"), "{html}");

    // The server that is down: retried, then dead-lettered with the reason.
    let dead = std::fs::read_to_string(dir.path().join("dead/mail.jsonl")).unwrap();
    let dead: Value = serde_json::from_str(dead.lines().next().unwrap()).unwrap();
    assert_eq!(dead["output"]["kind"], "summary");
    assert!(
        dead["reason"].as_str().unwrap().starts_with("SMTP: "),
        "{dead}"
    );
    assert!(
        dead["reason"]
            .as_str()
            .unwrap()
            .ends_with("(gave up after 2 attempts)"),
        "{dead}"
    );
    assert!(
        stderr.contains("sink recap_mail: 1 delivered, 0 retried, 0 dead-lettered"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replayed_call_feeds_slack_a_webhook_an_email_and_an_sms_at_once() {
    let hooks = Arc::new(Mutex::new(Seen::default()));
    let hook_url = receiver(hooks.clone()).await;
    let slack_calls: SlackCalls = Arc::default();
    let slack_api = slack(slack_calls.clone()).await;
    let sms_calls: SmsCalls = Arc::default();
    let sms_base = sms_fakes(sms_calls.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let maildir = dir.path().join("mail");
    let server = smtp(&maildir);
    let shipped = shipped_config();
    let cfg = dir.path().join("prompter.yaml");
    std::fs::write(
        &cfg,
        format!(
            "{shipped}
sinks:
  hook:
    type: webhook
    config: {{ url: \"{hook_url}\", secret_env: TEST_WEBHOOK_SECRET }}
    take: {{ kinds: [suggestion] }}
  team:
    type: slack
    config: {{ channel: C0TEAM, token_env: TEST_SLACK_TOKEN, api_base: \"{slack_api}\" }}
    take: {{ kinds: [suggestion] }}
  recap_mail:
    type: email
    config: {{ host: 127.0.0.1, port: {port}, security: none, from: prompter@example.com, to: team@example.com }}
  customer_sms:
    type: twilio_sms
    config: {{ from: \"+15550001111\", to: \"+15550002222\", max_chars: 160, overflow: split, api_base: \"{sms_base}\", retry_schedule_ms: [50] }}
    take: {{ kinds: [summary] }}
",
            port = server.port
        ),
    )
    .unwrap();
    let call = dir.path().join("refired.jsonl");
    std::fs::write(&call, REFIRED).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_prompter"))
            .args(["replay", "--realtime", "--speed", "4", "--config"])
            .arg(&cfg)
            .arg(&call)
            .env("TEST_WEBHOOK_SECRET", SECRET)
            .env("TEST_SLACK_TOKEN", "xoxb-test-token")
            .env("TWILIO_ACCOUNT_SID", "AC123")
            .env("TWILIO_AUTH_TOKEN", "twilio-token")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for sink in ["hook", "team", "recap_mail", "customer_sms"] {
        assert!(
            stderr.contains(&format!("sink {sink}: 1 delivered"))
                || stderr.contains(&format!("sink {sink}: 2 delivered")),
            "{sink}: {stderr}"
        );
        assert!(
            !stderr.contains(&format!("sink {sink}: 0 delivered")),
            "{stderr}"
        );
    }
    assert!(
        !stderr.contains("dead-lettered (") && stderr.matches("0 dead-lettered").count() == 4,
        "{stderr}"
    );
    // Slack: one message for the card, posted once (after a 429) and updated in place.
    let methods: Vec<String> = slack_calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.0.clone())
        .collect();
    assert_eq!(
        methods,
        ["chat.postMessage", "chat.postMessage", "chat.update"]
    );
    // The webhook: every version once, every signature good.
    let h = hooks.lock().unwrap();
    assert_eq!(h.bad_signatures, 0);
    let ids: Vec<&str> = h.requests.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        ["s-1/rta/k-late-delivery:1", "s-1/rta/k-late-delivery:2"]
    );
    // The e-mail with the recap, and the SMS within its limit.
    let files: Vec<_> = std::fs::read_dir(maildir.join("new"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1);
    let mail = parse_mail(&files[0]);
    assert!(
        mail["parts"][0]["body"]
            .as_str()
            .unwrap()
            .contains("Objections: Late Delivery"),
        "{mail}"
    );
    let sms = sms_calls.lock().unwrap();
    assert!(!sms.is_empty());
    for (_, _, form) in sms.iter() {
        let body = &form.iter().find(|(k, _)| k == "Body").unwrap().1;
        assert!(body.chars().count() <= 160, "{body}");
    }
}
