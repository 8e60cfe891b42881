//! Twilio's voice webhooks on the engine's server: requests signed by Twilio's own helper
//! library (`twilio` on npm, run with the machine's Node.js; `scripts/test.sh` installs it in
//! `tests/twilio-node`) are accepted, unsigned or wrongly signed ones get 403.

use std::process::Command;
use std::sync::Arc;

use prompter_engine::twilio::{TwilioConfig, TwilioHooks};
use serde_json::{Value, json};

use crate::cli::root;

const TOKEN: &str = "twilio-auth-token-for-tests";

/// The signature Twilio's library computes for `url` and `params`.
fn twilio_signs(url: &str, params: &Value) -> String {
    let dir = root().join("tests/twilio-node");
    let out = Command::new("node")
        .current_dir(&dir)
        .args(["sign.js", TOKEN, url, &params.to_string()])
        .output()
        .expect("node (scripts/test.sh installs the twilio package)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `params` as a form body (a list value repeats its name).
fn form(params: &Value) -> String {
    let enc = |s: &str| prompter_engine::feed::http::url_encode(s);
    let mut parts = Vec::new();
    for (k, v) in params.as_object().unwrap() {
        match v {
            Value::Array(vs) => {
                for v in vs {
                    parts.push(format!("{}={}", enc(k), enc(v.as_str().unwrap())));
                }
            }
            v => parts.push(format!("{}={}", enc(k), enc(v.as_str().unwrap()))),
        }
    }
    parts.join("&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_signed_by_twilios_library_are_answered_and_others_get_403() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    // The URL Twilio calls: behind a proxy, with an explicit port.
    let public = "https://bridge.example.com:8443";
    let hooks = Arc::new(
        TwilioHooks::new(
            TwilioConfig {
                auth_token_env: "TOKEN".into(),
                then: "<Dial><Conference>support</Conference></Dial>".into(),
                ..TwilioConfig::new(public)
            },
            &|_| Some(TOKEN.to_owned()),
        )
        .unwrap(),
    );
    let addr = prompter_engine::server::serve("127.0.0.1:0", hooks.clone().routes(), stop_rx)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |path: &str, body: String, signature: Option<String>| {
        let mut r = http
            .post(format!("http://{addr}{path}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(s) = signature {
            r = r.header("x-twilio-signature", s);
        }
        r.send()
    };

    let call = json!({"CallSid": "CA42", "AccountSid": "AC1", "From": "+14155550100",
        "To": "+18005551212", "CallStatus": "ringing", "Direction": "inbound"});
    let signed = twilio_signs(&format!("{public}/twilio/voice"), &call);
    let r = post("/twilio/voice", form(&call), Some(signed.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/xml")
    );
    let xml = r.text().await.unwrap();
    assert!(
        xml.contains(
            "<Stream url=\"wss://bridge.example.com:8443/twilio/media\" track=\"both_tracks\">"
        ),
        "{xml}"
    );
    assert!(
        xml.contains("<Parameter name=\"From\" value=\"+14155550100\"/>"),
        "{xml}"
    );
    assert!(
        xml.contains("<Dial><Conference>support</Conference></Dial>"),
        "{xml}"
    );

    // Unsigned, signed for another body, signed with another token: 403.
    let r = post("/twilio/voice", form(&call), None).await.unwrap();
    assert_eq!(r.status(), 403);
    let mut forged = call.clone();
    forged["From"] = json!("+19995550000");
    let r = post("/twilio/voice", form(&forged), Some(signed))
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        post(
            "/twilio/voice",
            form(&call),
            Some("RSOYDt4T1cUTdK1PDd93/VVr8B8=".into())
        )
        .await
        .unwrap()
        .status(),
        403
    );

    // A status callback with a repeated parameter, signed by Twilio's library.
    let status = json!({"CallSid": "CA42", "CallStatus": "completed",
        "StirVerstat": ["TN-Validation-Passed-A", "No-TN-Validation"]});
    let signed = twilio_signs(&format!("{public}/twilio/status"), &status);
    let r = post("/twilio/status", form(&status), Some(signed))
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        hooks.statuses(),
        [("CA42".to_owned(), "completed".to_owned())]
    );
}
