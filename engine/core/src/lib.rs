//! The plugin API of Prompter, the event-processing engine for live conversations.
//!
//! This crate is what built-in plugins (and, through an adapter, Wasm plugins) depend on. It owns
//! the vocabulary shared by the engine and its plugins; it does not own loading configuration,
//! routing events or running pipelines (that is `prompter-engine`).
//!
//! # Layout
//! - [`event`]: Symbl frames parsed into typed events, one item per event.
//! - [`conversation`]: per-conversation state folded from events.
//! - [`plugin`]: the [`plugin::Plugin`] and [`plugin::PluginFactory`] traits, build and stage
//!   contexts.
//! - [`resource`]: knowledge stores, chat providers and embedders that stages share.
//! - [`backoff`]: retry pacing for clients of remote services.
//! - [`retry`]: the retry loop those clients share, paced by [`backoff`].
//! - [`output`]: what pipelines deliver, and output ids.
//! - [`book`]: engine-owned per-conversation bookkeeping (versions, stage state) and the
//!   [`book::Host`] stages reach it through.
//! - [`secret`]: API keys that never reach logs or plugins.
//! - [`template`]: the Jinja templates and filter expressions.
//! - [`error`], [`diagnostic`]: classified stage errors; positioned config problems.
//! - [`test_util`]: helpers to drive a plugin in tests.

pub mod backoff;
pub mod book;
pub mod conversation;
pub mod diagnostic;
pub mod error;
pub mod event;
pub mod meter;
pub mod output;
pub mod plugin;
pub mod resource;
pub mod retry;
pub mod secret;
pub mod template;
pub mod test_util;

pub use async_trait::async_trait;
pub use marked_yaml;
pub use minijinja;
pub use tokio_util;
