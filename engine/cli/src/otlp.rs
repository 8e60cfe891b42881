//! The OpenTelemetry trace exporter (the `otlp` feature): the engine's spans, one `run` per
//! pipeline run (with its conversation, event, kind and pipeline) and one `stage` per stage call
//! inside it (with its conversation), sent to an OTLP collector over HTTP with protobuf bodies.
//!
//! Configured the OpenTelemetry way, from the environment, which the SDK reads itself:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` is appended) or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is), `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME` (default `prompter`, here),
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`; and `OTEL_SDK_DISABLED=true`
//! turns the export off. Spans are batched on the SDK's own thread, which posts them with a
//! blocking client: nothing runs on the engine's runtime. The exporter has its own filter,
//! independent of the log's `RUST_LOG`/`-v`: a `prompter run` logging at `warn` still exports its
//! debug-level `run` and `stage` spans.

use std::time::Duration;

use opentelemetry::InstrumentationScope;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::{Level, Metadata};
use tracing_subscriber::filter::{LevelFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

use crate::cli::{Stream, say};

/// The service name when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
const DEFAULT_SERVICE_NAME: &str = "prompter";

/// How long the exit may wait for the last batch to reach the collector.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The only OTLP protocol this build speaks.
const PROTOCOL: &str = "http/protobuf";

/// Holds the tracer provider; dropping it exports the spans still queued (within
/// [`SHUTDOWN_TIMEOUT`]) and stops the export thread. Kept by [`crate::cli::main`] until it
/// returns, which it does on every way out, `prompter run`'s Ctrl-C and SIGTERM included.
#[must_use = "dropping the guard stops the export"]
pub(crate) struct OtlpGuard {
    provider: SdkTracerProvider,
}

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            tracing::warn!("OTLP: spans may be lost at exit: {e}");
        }
    }
}

/// Installs the process's subscriber: `log` (the stderr log, with its own filter) and the OTLP
/// layer. Returns `None`, with a warning on `err` and the log alone installed, when the exporter
/// cannot be built (an endpoint that is not a URL, say).
pub(crate) fn install<L>(log: L, err: &Stream) -> Option<OtlpGuard>
where
    L: Layer<Registry> + Send + Sync + 'static,
{
    if std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        let _ = tracing_subscriber::registry().with(log).try_init();
        return None;
    }
    let exporter = match SpanExporter::builder().with_http().build() {
        Ok(e) => e,
        Err(e) => {
            say(err, &format!("warning: no OTLP trace export: {e}"));
            let _ = tracing_subscriber::registry().with(log).try_init();
            return None;
        }
    };
    let resource = resource();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource.clone())
        .with_batch_exporter(exporter)
        .build();
    let scope = InstrumentationScope::builder("prompter")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer_with_scope(scope))
        .with_filter(filter_fn(exported).with_max_level_hint(LevelFilter::DEBUG));
    // The caller checked that no subscriber is set yet; should one have been set since, this
    // one is dropped, and the provider, left with no spans to export, stops with the guard.
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(otel)
        .try_init();
    if let Some(protocol) = requested_protocol().filter(|p| p != PROTOCOL) {
        tracing::warn!(
            "OTLP: protocol `{protocol}` is not built in; spans are sent as `{PROTOCOL}`"
        );
    }
    let service = resource
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .map(|v| v.to_string())
        .unwrap_or_default();
    tracing::info!("OTLP: exporting spans as service `{service}`");
    Some(OtlpGuard { provider })
}

/// What the exporter sees: the spans of Prompter's own crates at debug and above (`run` and
/// `stage` are debug spans), and their events at info and above, which become span events (an
/// error event marks its span as failed). Debug events stay in the log: some quote the call
/// (`Run halted.` gives the repeated sentence as its reason, `Plugin log.` what a plugin said),
/// and a trace carries ids, not what was said. Nothing from the libraries underneath (hyper,
/// reqwest, the OpenTelemetry SDK itself): their spans would be noise, and the exporter's own
/// requests would trace themselves.
fn exported(meta: &Metadata<'_>) -> bool {
    let most_verbose = if meta.is_span() {
        Level::DEBUG
    } else {
        Level::INFO
    };
    meta.target().starts_with("prompter") && *meta.level() <= most_verbose
}

/// The SDK's resource (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, the SDK's own
/// attributes), named `prompter` unless the environment names the service: the SDK's fallback,
/// `unknown_service:<executable>`, says nothing a collector can group by.
fn resource() -> Resource {
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|v| !v.as_str().starts_with("unknown_service"));
    if named {
        detected
    } else {
        Resource::builder()
            .with_service_name(DEFAULT_SERVICE_NAME)
            .build()
    }
}

/// The protocol the environment asks for, if any (the traces variable first, as the SDK reads
/// them).
fn requested_protocol() -> Option<String> {
    [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok())
    .map(|p| p.trim().to_ascii_lowercase())
    .filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_prompter_spans_at_debug_and_events_at_info_are_exported() {
        use tracing::callsite::Identifier;
        use tracing::field::FieldSet;
        use tracing::metadata::Kind;

        struct Cs;
        impl tracing::Callsite for Cs {
            fn set_interest(&self, _: tracing::subscriber::Interest) {}
            fn metadata(&self) -> &Metadata<'_> {
                unreachable!("not registered")
            }
        }
        static CS: Cs = Cs;
        let meta = |target: &'static str, level: Level, kind: Kind| {
            Metadata::new(
                "m",
                target,
                level,
                None,
                None,
                None,
                FieldSet::new(&[], Identifier(&CS)),
                kind,
            )
        };
        let cases = [
            ("prompter_engine::engine", Level::DEBUG, Kind::SPAN, true),
            ("prompter_engine::pipeline", Level::TRACE, Kind::SPAN, false),
            ("prompter_engine::engine", Level::DEBUG, Kind::EVENT, false),
            ("prompter_engine::engine", Level::INFO, Kind::EVENT, true),
            ("prompter_plugin_chat", Level::WARN, Kind::EVENT, true),
            ("hyper_util::client", Level::DEBUG, Kind::SPAN, false),
            ("opentelemetry_sdk", Level::ERROR, Kind::EVENT, false),
        ];
        for (target, level, kind, want) in cases {
            assert_eq!(
                exported(&meta(target, level, kind.clone())),
                want,
                "{target} {level} {kind:?}"
            );
        }
    }
}
