#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! The agent console end to end in a real browser: `prompter run` on the shipped live config
//! against local fakes of Symbl and Nebula (Nebula streaming its answers), the console page
//! opened in headless Debian Chromium through chromedriver, driven with fantoccini.
//!
//! Needs `chromium` and `chromium-driver` (Debian); `scripts/test.sh` installs them. Screenshots
//! go to `target/test-artifacts/console/`.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use fantoccini::{Client, ClientBuilder, Locator};
use prompter_core::secret::Secret;
use prompter_engine::feed::access::{FeedAccess, Scope};
use serde_json::{Value, json};
use support::*;

const CALL: &str = "conn-ui";

/// A chromedriver on a free loopback port, stopped when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromedriver() -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start chromedriver ({e}): install Debian's `chromium` and \
                 `chromium-driver` (scripts/test.sh does)"
            )
        });
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut args = vec![
        "--headless=new".to_owned(),
        "--no-sandbox".to_owned(),
        "--disable-gpu".to_owned(),
        "--disable-dev-shm-usage".to_owned(),
        // This machine's network is closed: no background calls to Google's hosts.
        "--disable-background-networking".to_owned(),
        "--disable-component-update".to_owned(),
        "--disable-sync".to_owned(),
        "--no-first-run".to_owned(),
        "--window-size=1280,900".to_owned(),
        "--force-device-scale-factor=1".to_owned(),
    ];
    args.push(format!("--user-data-dir={}", profile.display()));
    let mut options = json!({ "args": args });
    if std::path::Path::new("/usr/bin/chromium").exists() {
        options["binary"] = json!("/usr/bin/chromium");
    }
    let mut caps = serde_json::Map::new();
    caps.insert("goog:chromeOptions".into(), options);
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

fn artifacts() -> PathBuf {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root().join("target"), PathBuf::from)
        .join("test-artifacts/console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    std::fs::write(artifacts().join(name), png).unwrap();
}

/// Waits until `script` (a JS expression) is truthy; returns its value.
async fn until(c: &Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = c
            .execute(&format!("return ({script});"), vec![])
            .await
            .unwrap();
        if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what} ({script})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records every status and version each card takes, even for an instant (a mutation's old
/// value is kept), so a draft replaced within one frame still shows in the log.
const RECORDER: &str = r#"
window.__cards = [];
const note = (el, attr, value) => window.__cards.push([el.dataset.id, attr, value]);
new MutationObserver((records) => {
  for (const r of records) {
    if (r.type === 'attributes' && r.target.matches('article.card')) {
      note(r.target, r.attributeName, r.oldValue);
      note(r.target, r.attributeName, r.target.getAttribute(r.attributeName));
    }
    for (const n of r.addedNodes || []) {
      if (n.nodeType === 1 && n.matches('article.card')) {
        note(n, 'data-status', n.dataset.status);
        note(n, 'data-version', n.dataset.version);
      }
    }
  }
}).observe(document.body, { subtree: true, childList: true, attributes: true,
  attributeOldValue: true, attributeFilter: ['data-status', 'data-version'] });
return true;
"#;

/// The statuses the card `id` took, in order, without repeats.
async fn statuses(c: &Client, id: &str) -> Vec<String> {
    let log = c.execute("return window.__cards;", vec![]).await.unwrap();
    let mut out: Vec<String> = Vec::new();
    for e in log.as_array().unwrap() {
        if e[0] == id
            && e[1] == "data-status"
            && let Some(s) = e[2].as_str()
            && out.last().map(String::as_str) != Some(s)
        {
            out.push(s.to_owned());
        }
    }
    out
}

/// The shipped live configuration, except that Real-Time Assist shows one suggestion at a
/// time: every tracker shares one `supersede` key, so a newer tracker withdraws an older answer
/// still being written (the shipped pipeline lets different trackers' answers run side by side,
/// and a tracker only takes over its own card, which shows as that card's next version).
fn one_card_at_a_time(f: &Fakes) -> String {
    let root = root();
    let rta = std::fs::read_to_string(root.join("pipelines/live/rta.yaml")).unwrap();
    let rta = rta.replacen(
        "concurrency: latest_wins\n",
        "concurrency: latest_wins\nsupersede: one-suggestion-at-a-time\n",
        1,
    );
    assert!(rta.contains("supersede:"));
    let rta_path = f.dir.path().join("rta_live.yaml");
    std::fs::write(&rta_path, rta).unwrap();
    let live = std::fs::read_to_string(root.join("prompter-live.yaml")).unwrap();
    let live = live
        .replacen(
            "  - pipelines/live/*.yaml\n",
            &format!("  - {}\n", rta_path.display()),
            1,
        )
        .replace("pipelines/", &format!("{}/pipelines/", root.display()))
        // After the call, the agent can text the customer (through a webhook sink here).
        .replacen(
            "feed:\n",
            "feed:\n  actions:\n    - { name: text_customer, label: Text the customer, sink: customer_sms, text: \"Thanks for calling. {{ summary.text }}\" }\n",
            1,
        );
    let live = format!(
        "{live}\nsinks:\n  customer_sms:\n    type: webhook\n    config: {{ url: \"http://127.0.0.1:9/sms\", secret_env: TEST_WEBHOOK_SECRET, retry_schedule_ms: [] }}\n    dead_letter: {}\n",
        f.dir.path().join("dead.jsonl").display()
    );
    let path = f.dir.path().join("console.yaml");
    std::fs::write(&path, live).unwrap();
    path.display().to_string()
}

fn card(id: &str) -> String {
    format!("document.querySelector('article.card[data-id=\"{id}\"]')")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cards_stream_update_withdraw_explain_themselves_and_take_feedback_in_chromium() {
    let f = fakes().await;
    let config = one_card_at_a_time(&f);
    let ingest = f
        .command(&[
            "kb",
            "ingest",
            "pipelines/data/sales_objections.csv",
            "--store",
            "sales",
            "--config",
            &config,
        ])
        .output()
        .unwrap();
    assert!(ingest.status.success(), "{ingest:?}");
    f.nebula.set_chat_delay(Duration::from_millis(700));
    let mut run = f.command(&[
        "run",
        "--config",
        &config,
        "--connection",
        CALL,
        "--listen",
        "127.0.0.1:0",
    ]);
    run.env(
        "TEST_WEBHOOK_SECRET",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    );
    let engine = Engine::spawn(run);
    assert!(
        f.symbl.wait_subscribed(CALL, 1, WAIT).await,
        "{}",
        engine.stderr()
    );
    let line = engine.said("agent console on http://").await;
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .trim_end_matches("/console/")
        .to_owned();
    let access = FeedAccess::new(Secret::new(FEED_SECRET)).unwrap();
    let token = access.mint(
        &Scope::Conversation(CALL.into()),
        Duration::from_secs(600),
        SystemTime::now(),
    );

    let driver = chromedriver();
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&driver, profile.path()).await;
    c.goto(&format!("{base}/console/#token={token}&c={CALL}"))
        .await
        .unwrap();
    until(
        &c,
        "the feed is live",
        "document.querySelector('#conn')?.dataset.state === 'live'",
    )
    .await;
    // The token left the address bar (it stays in the tab's session storage).
    let url = c.current_url().await.unwrap();
    assert!(!url.as_str().contains("token="), "{url}");
    c.execute(RECORDER, vec![]).await.unwrap();

    // A few lines of the call, then the customer objects; the tracker fires; Nebula streams
    // the answer in 700 ms.
    let lines = [
        (
            "Maya Chen",
            "Thanks for joining, Robert. How is reporting going for your team?",
            0.4,
        ),
        (
            "Robert Alvarez",
            "Slowly. We rebuild the same spreadsheets every Monday.",
            -0.3,
        ),
        (
            "Maya Chen",
            "That is exactly what the scheduled reports replace.",
            0.5,
        ),
        (
            "Robert Alvarez",
            "Honestly this is too expensive for us right now.",
            -0.6,
        ),
    ];
    for (i, (who, text, sentiment)) in lines.into_iter().enumerate() {
        let mut line = said(who, text, 100 + i as u64);
        line["messages"][0]["sentiment"] = json!({"polarity": {"score": sentiment}});
        f.symbl.push(CALL, line);
    }
    until(
        &c,
        "the transcript line",
        "[...document.querySelectorAll('li.line')].some(l => l.textContent.includes('too expensive for us'))",
    )
    .await;
    f.symbl
        .push(CALL, tracker("Budget Constraints", "too expensive", 2));
    let id = format!("{CALL}/rta_live/k-budget-constraints");
    until(
        &c,
        "a card streaming in",
        &format!("{}?.dataset.status === 'draft'", card(&id)),
    )
    .await;
    // Let its entrance settle for the picture.
    tokio::time::sleep(Duration::from_millis(300)).await;
    screenshot(&c, "console-streaming.png").await;
    until(
        &c,
        "the complete card",
        &format!("{}?.dataset.status === 'final'", card(&id)),
    )
    .await;
    let text = c
        .execute(&format!("return {}.textContent;", card(&id)), vec![])
        .await
        .unwrap();
    assert!(
        text.as_str()
            .unwrap()
            .contains(prompter_fakes::nebula::DEFAULT_ANSWER),
        "{text}"
    );
    let streamed = statuses(&c, &id).await;
    assert_eq!(
        streamed,
        ["draft", "final"],
        "the answer streamed into one card"
    );

    // The same tracker again with another phrase: the same card, updated in place.
    c.execute(
        &format!("{}.__first = true; return true;", card(&id)),
        vec![],
    )
    .await
    .unwrap();
    let v1: u64 = until(
        &c,
        "the version",
        &format!("Number({}.dataset.version)", card(&id)),
    )
    .await
    .as_u64()
    .unwrap();
    f.symbl
        .push(CALL, tracker("Budget Constraints", "no budget", 3));
    until(
        &c,
        "a newer final version",
        &format!(
            "Number({0}.dataset.version) > {v1} && {0}.dataset.status === 'final'",
            card(&id)
        ),
    )
    .await;
    let same = c
        .execute(
            &format!(
                "return {}.__first === true && document.querySelectorAll('article.card[data-id=\"{id}\"]').length === 1;",
                card(&id)
            ),
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(same, json!(true), "updated in place, not stacked");

    // It fires again, and while that answer is still being written another tracker fires:
    // the older draft is withdrawn (its card fades) and the newer tracker's card takes focus.
    f.symbl
        .push(CALL, tracker("Budget Constraints", "over our budget", 4));
    until(
        &c,
        "the next draft",
        &format!("{}.dataset.status === 'draft'", card(&id)),
    )
    .await;
    f.symbl.push(CALL, tracker("Timing", "not a good time", 5));
    let timing = format!("{CALL}/rta_live/k-timing");
    until(
        &c,
        "the older draft withdrawn",
        &format!("{}.dataset.status === 'withdrawn'", card(&id)),
    )
    .await;
    until(
        &c,
        "the newer tracker's answer",
        &format!("{}?.dataset.status === 'final'", card(&timing)),
    )
    .await;
    let faded = c
        .execute(
            &format!(
                "const el = {}; return [getComputedStyle(el).opacity, el.querySelector('.card-note')?.textContent ?? ''];",
                card(&id)
            ),
            vec![],
        )
        .await
        .unwrap();
    let opacity: f64 = faded[0].as_str().unwrap().parse().unwrap();
    assert!(opacity < 1.0, "a withdrawn card fades: {faded}");
    assert!(
        faded[1]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("withdrawn"),
        "{faded}"
    );
    let lifecycle = statuses(&c, &id).await;
    assert_eq!(
        lifecycle.last().map(String::as_str),
        Some("withdrawn"),
        "{lifecycle:?}"
    );

    // A question comes in: the questions card.
    f.symbl
        .push(CALL, question("Can we start with a pilot first?", 6));
    until(
        &c,
        "the questions card",
        "document.querySelector('article.card[data-kind=\"open_questions\"]')?.textContent.includes('pilot')",
    )
    .await;

    // Why is the card there: the trigger, the sources with their scores, the pipeline.
    let id = timing;
    c.find(Locator::Css(&format!(
        "article.card[data-id=\"{id}\"] button.why-toggle"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let why = until(
        &c,
        "the why panel with sources",
        &format!(
            "(() => {{ const w = {}.querySelector('.why'); return w && w.offsetParent !== null && w.querySelectorAll('li.source').length > 0 && w.textContent; }})()",
            card(&id)
        ),
    )
    .await;
    let why = why.as_str().unwrap();
    assert!(why.contains("Timing"), "{why}");
    assert!(why.contains("rta_live"), "{why}");
    assert!(why.contains("not a good time"), "{why}");
    screenshot(&c, "console-why.png").await;
    c.set_window_size(420, 900).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    screenshot(&c, "console-narrow.png").await;
    c.set_window_size(1280, 900).await.unwrap();

    // Feedback: a click reaches the engine's feedback log, with the pipeline and model.
    let version = c
        .execute(
            &format!("return Number({}.dataset.version);", card(&id)),
            vec![],
        )
        .await
        .unwrap();
    c.find(Locator::Css(&format!(
        "article.card[data-id=\"{id}\"] button[data-feedback=\"useful\"]"
    )))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    let log = f.dir.path().join("feedback.jsonl");
    let deadline = Instant::now() + WAIT;
    let record = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(l) = text.lines().next() {
            break serde_json::from_str::<Value>(l).unwrap();
        }
        assert!(Instant::now() < deadline, "no feedback logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record["output_id"], id);
    assert_eq!(record["version"], version);
    assert_eq!(record["action"], "useful");
    assert_eq!(record["pipeline"], "rta_live");
    assert!(
        record["model"].as_str().unwrap().starts_with("nebula"),
        "{record}"
    );
    until(
        &c,
        "the button shows it was sent",
        &format!(
            "{}.querySelector('button[data-feedback=\"useful\"]').getAttribute('aria-pressed') === 'true'",
            card(&id)
        ),
    )
    .await;

    // The call ends: the report offers the operator's action, prefilled; the agent edits and
    // sends it, and it is recorded like feedback.
    f.symbl.push(
        CALL,
        json!({"type": "message", "message": {"type": "conversation_completed"}}),
    );
    let action =
        "article.card[data-kind=\"summary\"] button.action-btn[data-action=\"text_customer\"]";
    until(
        &c,
        "the report's action",
        &format!("document.querySelector('{action}')"),
    )
    .await;
    c.find(Locator::Css(action))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let prefilled = until(
        &c,
        "the prefilled text",
        "document.querySelector('article.card[data-kind=\"summary\"] textarea.action-text')?.value",
    )
    .await;
    assert!(
        prefilled
            .as_str()
            .unwrap()
            .starts_with("Thanks for calling. "),
        "{prefilled}"
    );
    c.execute(
        "document.querySelector('textarea.action-text').value = 'Your budget question is answered in the recap we just sent.'; return true;",
        vec![],
    )
    .await
    .unwrap();
    screenshot(&c, "console-report.png").await;
    c.find(Locator::Css(
        "article.card[data-kind=\"summary\"] button.action-send",
    ))
    .await
    .unwrap()
    .click()
    .await
    .unwrap();
    until(
        &c,
        "the action was sent",
        "document.querySelector('.action-status')?.textContent === 'Sent'",
    )
    .await;
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("\"action\":\"action:text_customer\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the action was not recorded:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Sent through its sink (the webhook is down here: it is dead-lettered, not lost).
    let deadline = Instant::now() + WAIT;
    loop {
        let dead = std::fs::read_to_string(f.dir.path().join("dead.jsonl")).unwrap_or_default();
        if dead.contains("Your budget question is answered") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the action never reached its sink"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A supervisor sees the call in the list of live calls.
    let supervisor = access.mint(
        &Scope::Supervisor,
        Duration::from_secs(600),
        SystemTime::now(),
    );
    c.goto("about:blank").await.unwrap();
    c.goto(&format!("{base}/console/#token={supervisor}"))
        .await
        .unwrap();
    until(
        &c,
        "the call in the list",
        &format!("document.querySelector('a.call[data-conversation=\"{CALL}\"]')"),
    )
    .await;
    screenshot(&c, "console-calls.png").await;

    // An expired link says so instead of showing an empty console.
    let expired = access.mint(
        &Scope::Conversation(CALL.into()),
        Duration::from_secs(1),
        SystemTime::now() - Duration::from_secs(60),
    );
    c.goto("about:blank").await.unwrap();
    c.goto(&format!("{base}/console/#token={expired}&c={CALL}"))
        .await
        .unwrap();
    until(
        &c,
        "the console says the link expired",
        "document.querySelector('#conn')?.dataset.state === 'denied' && document.body.textContent.toLowerCase().includes('expired')",
    )
    .await;

    c.close().await.unwrap();
    let (code, stderr, _) = engine.interrupt();
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains(&token), "a token reached the log");
}

/// One HTTP/1.1 request with headers; the whole response as text.
async fn request(addr: &str, head: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("{head}\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_plays_its_call_into_the_console_and_prints_a_working_link() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_prompter"))
        .current_dir(dir.path())
        .args([
            "demo",
            "--console",
            "--listen",
            "127.0.0.1:0",
            "--speed",
            "15",
            "--exit-at-end",
            "--no-color",
        ])
        .env_remove("PROMPTER_FEED_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The link comes first, before the call plays.
    let link = loop {
        let line = lines.next().expect("a console link").unwrap();
        if let Some(l) = line.strip_prefix("console: ") {
            break l.to_owned();
        }
    };
    let rest = link.strip_prefix("http://").unwrap();
    let (addr, fragment) = rest.split_once("/console/#token=").unwrap();
    let (token, call) = fragment.split_once("&c=").unwrap();
    assert_eq!(call, "acme-001");
    let page = request(addr, "GET /console/ HTTP/1.1").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let who = request(
        addr,
        &format!("GET /feed/v1/whoami HTTP/1.1\r\nAuthorization: Bearer {token}"),
    )
    .await;
    assert!(who.starts_with("HTTP/1.1 200"), "{who}");
    assert!(who.ends_with("{\"scope\":\"supervisor\"}"), "{who}");
    let refused = request(addr, "GET /feed/v1/whoami HTTP/1.1").await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    // The call plays on the terminal too, then the demo ends by itself.
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = child.wait().unwrap();
    assert!(status.success());
    let text = rest.join("\n");
    assert!(text.contains("SUGGESTION"), "{text}");
    assert!(text.contains("[00:"), "{text}");
}
