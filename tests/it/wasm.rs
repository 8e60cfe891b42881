//! The Wasm host against real components built from `sdk/` (see build.rs): hostile plugins are
//! stopped with clear stage errors and the next event is served normally.

use std::path::PathBuf;
use std::time::Duration;

use prompter_core::conversation::ConversationState;
use prompter_core::error::ErrorKind;
use prompter_core::plugin::{Flow, Resources};
use prompter_core::test_util::{TestHost, event, run_on};
use prompter_engine::wasm::{Limits, WasmPlugin, WasmSpec};
use serde_json::json;

pub(crate) fn module(name: &str) -> PathBuf {
    PathBuf::from(env!("PROMPTER_WASM_DIR")).join(format!("{name}.wasm"))
}

/// A spec for `module_name` with the defaults the tests start from.
pub(crate) fn spec(stage: &str, module_name: &str) -> WasmSpec {
    WasmSpec {
        metrics: Default::default(),
        stage: stage.into(),
        module: module(module_name),
        config_json: "{}".into(),
        allow_hosts: vec![],
        limits: Limits::default(),
        timeout: Duration::from_millis(100),
        resources: Resources::default(),
    }
}

async fn hostile(
    config: serde_json::Value,
    limits: Limits,
) -> Result<WasmPlugin, prompter_engine::wasm::InitError> {
    WasmPlugin::build(WasmSpec {
        config_json: config.to_string(),
        allow_hosts: vec!["allowed.example".into()],
        limits,
        timeout: Duration::from_millis(200),
        ..spec("hostile", "hostile_plugin")
    })
    .await
}

pub(crate) fn said(conv: &str, text: &str) -> prompter_core::event::Event {
    event(
        conv,
        1000,
        json!({"type": "message_response", "messages": [{"from": {"name": "Eve", "userId": "+15550100"}, "payload": {"content": text}}]}),
    )
}

async fn call(
    p: &WasmPlugin,
    conv: &str,
    text: &str,
) -> Result<Flow, prompter_core::error::PluginError> {
    call_on(&TestHost::default(), p, conv, text).await
}

/// A call in the conversation whose engine-owned state `host` keeps.
async fn call_on(
    host: &TestHost,
    p: &WasmPlugin,
    conv: &str,
    text: &str,
) -> Result<Flow, prompter_core::error::PluginError> {
    let e = said(conv, text);
    let mut state = ConversationState::new(conv);
    state.apply(&e);
    run_on(host, p, &e, &state, &[], None).await.flow
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_plugins_are_stopped_and_the_next_event_is_served() {
    let p = hostile(
        json!({}),
        Limits {
            max_memory_mb: 64,
            max_output_kb: 64,
            ..Limits::default()
        },
    )
    .await
    .unwrap();
    let ok = |r: Result<Flow, _>| match r {
        Ok(Flow::Continue(v)) => assert_eq!(v["ok"], true, "{v}"),
        other => panic!("the next event was not served normally: {other:?}"),
    };
    ok(call(&p, "c1", "hello").await);

    let e = call(&p, "c1", "loop").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert_eq!(
        e.message,
        "plugin `hostile` exceeded its `timeout_ms` of 200 ms while processing an event"
    );
    ok(call(&p, "c1", "hello").await);

    let e = call(&p, "c1", "memory").await.unwrap_err();
    assert_eq!(
        e.message,
        "plugin `hostile` exceeded its memory limit of 64 MiB while processing an event"
    );
    ok(call(&p, "c1", "hello").await);

    let e = call(&p, "c1", "trap").await.unwrap_err();
    assert!(
        e.message
            .starts_with("plugin `hostile` trapped while processing an event"),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("hostile plugin trapped on purpose"),
        "the panic message is kept: {}",
        e.message
    );
    ok(call(&p, "c1", "hello").await);

    let e = call(&p, "c1", "http").await.unwrap_err();
    assert_eq!(
        e.message,
        "plugin `hostile` called forbidden.example, which is not in `allow_hosts`"
    );
    ok(call(&p, "c1", "hello").await);

    let e = call(&p, "c1", "huge").await.unwrap_err();
    assert!(
        e.message
            .starts_with("plugin `hostile` returned 8192 KiB, more than its `max_output_kb` of 64"),
        "{}",
        e.message
    );
    ok(call(&p, "c1", "hello").await);

    let errors: std::collections::BTreeMap<_, _> = p.metrics.errors().into_iter().collect();
    for cause in ["timeout", "memory", "trap", "grant", "output"] {
        assert_eq!(errors.get(cause), Some(&1), "metrics: {errors:?}");
    }
    assert_eq!(p.metrics.calls.get(), 11);
}

#[tokio::test]
async fn kv_lives_in_the_engine_per_conversation_and_survives_recycling_and_reloads() {
    // Recycle after every call: the count must still grow, because kv lives in the engine's
    // per-conversation state (one host per conversation, as the engine keeps one book each).
    let limits = Limits {
        recycle_after_calls: 1,
        ..Limits::default()
    };
    let p = hostile(json!({}), limits.clone()).await.unwrap();
    let count = |r: Result<Flow, _>| match r {
        Ok(Flow::Continue(v)) => v["count"].as_u64().unwrap(),
        other => panic!("{other:?}"),
    };
    let (a, b) = (TestHost::default(), TestHost::default());
    assert_eq!(count(call_on(&a, &p, "a", "kv").await), 1);
    assert_eq!(count(call_on(&a, &p, "a", "kv").await), 2);
    assert_eq!(count(call_on(&b, &p, "b", "kv").await), 1);
    assert!(p.metrics.instances.get() >= 3);
    // A reload builds a new plugin from the same module: the conversation's count goes on.
    drop(p);
    let reloaded = hostile(json!({}), limits).await.unwrap();
    assert_eq!(count(call_on(&a, &reloaded, "a", "kv").await), 3);
    assert_eq!(count(call_on(&b, &reloaded, "b", "kv").await), 2);
    // A released conversation's state goes with its book: a fresh one starts over.
    assert_eq!(
        count(call_on(&TestHost::default(), &reloaded, "a", "kv").await),
        1
    );
    // A trapped call (its instance discarded) does not disturb it.
    assert!(call_on(&a, &reloaded, "a", "trap").await.is_err());
    assert_eq!(count(call_on(&a, &reloaded, "a", "kv").await), 4);
}

#[tokio::test]
async fn init_rejects_config_naming_the_field() {
    let err = hostile(json!({"reject": true}), Limits::default())
        .await
        .err()
        .unwrap();
    assert_eq!(err.field.as_deref(), Some("mode"));
    assert!(
        err.message
            .starts_with("plugin `hostile` rejected its config:"),
        "{}",
        err.message
    );
}

#[tokio::test]
async fn non_components_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let junk = dir.path().join("junk.wasm");
    std::fs::write(&junk, b"not wasm at all").unwrap();
    for (path, expected) in [
        (core, "is a core WebAssembly module, not a component"),
        (junk, "cannot compile"),
    ] {
        let err = WasmPlugin::build(WasmSpec {
            module: path,
            ..spec("x", "hostile_plugin")
        })
        .await
        .err()
        .unwrap();
        assert!(err.message.contains(expected), "{}", err.message);
    }
}

#[tokio::test]
async fn fuel_gives_a_deterministic_budget() {
    let p = hostile(
        json!({}),
        Limits {
            fuel: Some(5_000_000),
            ..Limits::default()
        },
    )
    .await
    .unwrap();
    let e = call(&p, "c1", "loop").await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Timeout);
    assert_eq!(
        e.message,
        "plugin `hostile` ran out of fuel (5000000 units) while processing an event"
    );
    match call(&p, "c1", "hello").await {
        Ok(Flow::Continue(v)) => assert_eq!(v["ok"], true),
        other => panic!("{other:?}"),
    }
}

/// A one-shot HTTP server on 127.0.0.1 that answers every request with `body`.
fn local_http(body: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn granted_hosts_are_reached_through_the_host_and_others_are_refused() {
    let port = local_http("hello from the granted host");
    let p = WasmPlugin::build(WasmSpec {
        allow_hosts: vec![format!("127.0.0.1:{port}")],
        timeout: Duration::from_millis(2000),
        ..spec("fetcher", "hostile_plugin")
    })
    .await
    .unwrap();
    match call(&p, "c1", &format!("fetch http://127.0.0.1:{port}/status")).await {
        Ok(Flow::Continue(v)) => {
            assert_eq!(v["fetched"], true, "{v}");
            assert_eq!(v["status"], 200);
            assert_eq!(v["body"], "hello from the granted host");
        }
        other => panic!("{other:?}"),
    }
    // Same host, another port: not granted.
    let e = call(&p, "c1", "fetch http://127.0.0.1:1/")
        .await
        .unwrap_err();
    assert_eq!(
        e.message,
        "plugin `fetcher` called 127.0.0.1, which is not in `allow_hosts`"
    );
}

#[tokio::test]
async fn a_component_built_for_another_contract_version_is_refused_clearly() {
    let err = WasmPlugin::build(spec("future", "future_contract_plugin"))
        .await
        .err()
        .unwrap();
    assert!(
        err.message.ends_with(
            "was built for the plugin contract `prompter:plugin@0.2.0`, but this engine speaks `prompter:plugin@0.1.0`; rebuild it against prompter-sdk 0.1.0"
        ),
        "{}",
        err.message
    );
}
