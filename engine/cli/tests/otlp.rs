#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! OpenTelemetry export, on the real binary. With the `otlp` feature (`cargo test -p
//! prompter-cli --features otlp --test otlp`, as `scripts/test.sh` runs it): a `prompter replay`
//! of a shipped recording, pointed at a fake OTLP/HTTP collector, sends it the `run` and `stage`
//! spans of the call, with the conversation's id, batched and flushed at exit, and logs none of
//! the exporter's headers. Without it: setting the endpoint says once that this build exports
//! nothing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf()
}

/// `prompter replay` of the shipped Acme call (conversation `acme-001`) on the shipped
/// `prompter.yaml`: no network (but the test's collector).
const REPLAY: &[&str] = &[
    "replay",
    "--config",
    "prompter.yaml",
    "pipelines/recordings/acme-discovery-call.jsonl",
];

/// The real binary, from the repository's root, with no OpenTelemetry settings but `env`.
fn prompter(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prompter"));
    cmd.current_dir(root()).args(args).env("RUST_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied()).output().unwrap()
}

#[cfg(feature = "otlp")]
mod exported {
    use std::process::Output;
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes;
    use axum::http::{HeaderMap, Uri};

    use super::{REPLAY, prompter};

    /// One POST the collector took: its path, headers and protobuf body.
    struct Request {
        path: String,
        headers: HeaderMap,
        body: Bytes,
    }

    type Seen = Arc<Mutex<Vec<Request>>>;

    /// A fake OTLP/HTTP collector on loopback: records every POST and answers 200 with an empty
    /// `ExportTraceServiceResponse` (an empty protobuf message). Returns its base URL.
    async fn collector(seen: Seen) -> String {
        let app = axum::Router::new().fallback(axum::routing::post(
            move |uri: Uri, headers: HeaderMap, body: Bytes| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(Request {
                        path: uri.path().to_owned(),
                        headers,
                        body,
                    });
                    ([("content-type", "application/x-protobuf")], Bytes::new())
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    /// [`REPLAY`](super::REPLAY), with `env`.
    async fn replay(env: Vec<(&'static str, String)>) -> Output {
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            prompter(REPLAY, &env)
        })
        .await
        .unwrap()
    }

    /// A protobuf length-delimited field (`field` of wire type 2) holding `bytes`, as OTLP's
    /// messages encode their strings; lengths here stay below 128 (one-byte varints).
    fn field(field: u8, bytes: &[u8]) -> Vec<u8> {
        assert!(bytes.len() < 128 && field < 16);
        let mut out = vec![(field << 3) | 2, bytes.len() as u8];
        out.extend_from_slice(bytes);
        out
    }

    /// `Span.name` (field 5).
    fn span_name(name: &str) -> Vec<u8> {
        field(5, name.as_bytes())
    }

    /// A `KeyValue` whose value is a string: `key` (field 1), then `value` (field 2), an
    /// `AnyValue` whose `string_value` is field 1.
    fn string_attribute(key: &str, value: &str) -> Vec<u8> {
        let mut kv = field(1, key.as_bytes());
        kv.extend(field(2, &field(1, value.as_bytes())));
        kv
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| w == &needle)
            .count()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_exports_its_run_and_stage_spans_with_the_conversation() {
        let seen = Seen::default();
        let base = collector(seen.clone()).await;
        let out = replay(vec![("OTEL_EXPORTER_OTLP_ENDPOINT", base)]).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!out.stdout.is_empty(), "the replay printed no output");
        // The log stays at `warn` and quiet: the exporter's filter is its own.
        assert!(!stderr.contains("OTLP"), "{stderr}");

        // Everything was sent before the process exited: the guard flushed the last batch.
        let seen = seen.lock().unwrap();
        assert!(
            !seen.is_empty(),
            "the collector got nothing; stderr:\n{stderr}"
        );
        let mut body = Vec::new();
        for r in seen.iter() {
            assert_eq!(r.path, "/v1/traces");
            assert_eq!(r.headers["content-type"], "application/x-protobuf");
            body.extend_from_slice(&r.body);
        }
        let runs = count(&body, &span_name("run"));
        let stages = count(&body, &span_name("stage"));
        assert!(runs > 0, "no `run` span was exported");
        assert!(stages >= runs, "{stages} `stage` span(s) for {runs} run(s)");
        // Every run and stage span carries the conversation.
        assert_eq!(
            count(&body, &string_attribute("conversation", "acme-001")),
            runs + stages
        );
        // The run spans name their pipeline and event kind too.
        assert!(count(&body, &field(1, b"pipeline")) >= runs + stages);
        assert!(count(&body, &field(1, b"event")) >= runs);
        // The service is named `prompter` when OTEL_SERVICE_NAME is not set.
        assert!(count(&body, &string_attribute("service.name", "prompter")) > 0);
        // Ids, not what was said: `Run halted.` (a debug event) quotes the repeated tracker
        // sentence ("... don't have the budget ..."), and it stays out of the trace.
        assert_eq!(count(&body, b"budget"), 0);
        // Nothing from the libraries underneath (their spans are not exported).
        assert_eq!(count(&body, b"hyper"), 0);
        assert_eq!(count(&body, b"reqwest"), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_traces_endpoint_headers_and_service_name_are_read_and_the_headers_never_logged() {
        let seen = Seen::default();
        let base = collector(seen.clone()).await;
        let token = "otlp-token-that-must-never-be-logged";
        let out = replay(vec![
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("{base}/ingest/traces"),
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                format!("authorization=Bearer%20{token}"),
            ),
            ("OTEL_SERVICE_NAME", "prompter-eu".to_owned()),
            // Everything the log can say, exporter and HTTP client included.
            ("RUST_LOG", "trace".to_owned()),
        ])
        .await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(!stderr.contains(token), "a header reached the log");
        assert!(
            stderr.contains("OTLP: exporting spans as service `prompter-eu`"),
            "{stderr}"
        );

        let seen = seen.lock().unwrap();
        assert!(!seen.is_empty(), "the collector got nothing");
        for r in seen.iter() {
            // The traces endpoint is used as it is (nothing appended).
            assert_eq!(r.path, "/ingest/traces");
            assert_eq!(r.headers["authorization"], format!("Bearer {token}"));
            assert!(count(&r.body, &string_attribute("service.name", "prompter-eu")) > 0);
        }
        let body: Vec<u8> = seen.iter().flat_map(|r| r.body.to_vec()).collect();
        assert!(count(&body, &span_name("run")) > 0);
    }
}

#[cfg(not(feature = "otlp"))]
#[test]
fn without_the_feature_an_endpoint_gets_one_warning_and_nothing_else_changes() {
    let out = prompter(
        REPLAY,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!out.stdout.is_empty(), "the replay printed no output");
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].starts_with("warning:") && warnings[0].contains("--features otlp"),
        "{stderr}"
    );
}
