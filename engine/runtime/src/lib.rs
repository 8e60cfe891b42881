//! The Prompter engine as a library: loads and validates configuration, runs the [`Engine`] (one
//! ordered fold per conversation, pipeline runs that never block it, engine-owned state),
//! feeds it from [`source`]s and delivers to [`sink`]s. The `prompter` binary (the
//! `prompter-cli` crate) wraps it; this crate carries no command-line code, so other programs can
//! embed the engine.
//!
//! It does not own the plugin API (that is `prompter-core`) nor the built-in plugins (the
//! `prompter-plugin-*` crates, listed once in [`registry::builtin`]).
//!
//! # Layout
//! - [`config`]: engine config and pipeline files, with positioned diagnostics.
//! - [`registry`]: the explicit list of built-in plugins, stores and providers.
//! - [`engine`]: the [`Engine`]: one ordered fold per conversation, runs that never block it,
//!   engine-owned conversation state, snapshots.
//! - [`pipeline`]: one pipeline run: stages, timeouts, error policy; how runs overlap.
//! - [`source`]: the [`source::Source`] trait: recordings, live Symbl connections.
//! - [`feed`]: the agent feed's core: numbered, resumable per-conversation streams.
//! - [`sink`]: the [`sink::Sink`] trait and the bounded, coalescing queue in front of each sink.
//! - [`server`]: the one HTTP server.
//! - [`recording`], [`session`]: recordings and the replay driver.
//! - [`wasm`]: the WebAssembly component host.
//! - [`stats`]: counters and latency samples.
//!
//! [`Engine`]: engine::Engine

pub mod config;
pub mod delivery;
pub mod engine;
pub mod feed;
pub mod metered;
pub mod metrics;
pub mod pipeline;
pub mod recording;
pub mod registry;
pub mod reload;
pub mod server;
pub mod session;
pub mod sink;
pub mod source;
pub mod stats;
pub mod tap;
pub mod twilio;
pub mod wasm;
