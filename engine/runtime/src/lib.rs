//! The Prompter engine: loads and validates configuration, routes Symbl events to conversation
//! tasks, runs pipelines of stages, and replays recorded calls. The `prompter` binary is
//! [`cli::main`].
//!
//! It does not own the plugin API (that is `prompter-core`) nor the built-in plugins (the
//! `prompter-plugin-*` crates, listed once in [`registry::builtin`]).
//!
//! # Layout
//! - [`config`]: engine config and pipeline files, with positioned diagnostics.
//! - [`registry`]: the explicit list of built-in plugins, stores and providers.
//! - [`pipeline`]: one pipeline run: filter, stages, timeouts, error policy.
//! - [`engine`]: the [`engine::Engine`]: one ordered fold per conversation, runs that never
//!   block it, engine-owned conversation state, snapshots.
//! - [`sink`]: the [`sink::Sink`] trait and the bounded, coalescing queue in front of each sink.
//! - [`recording`], [`session`]: recordings and the replay driver.
//! - [`live`]: `prompter run`, the engine on live Symbl connections.
//! - [`cli`], [`demo`], [`bench`](mod@bench), [`kb`]: the commands.

pub mod bench;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod demo;
pub mod engine;
pub mod kb;
pub mod live;
pub mod pipeline;
pub mod plugin_cli;
pub mod recording;
pub mod registry;
pub mod server;
pub mod session;
pub mod sink;
pub mod source;
pub mod stats;
mod trackers_cli;
pub mod wasm;
