//! WebAssembly stage plugins: components of the `prompter:plugin` world (`sdk/wit/`), run in a
//! sandboxed wasmtime host.
//!
//! It owns the host side of the contract; it does not own the guest SDK (`sdk/`).
//!
//! # Layout
//! - `bindings`: generated from the one WIT file.
//! - [`runtime`]: the process-wide engine (pooling allocator, epoch interruption, disk cache),
//!   component loading and the contract-version check.
//! - [`host`]: the store's data and the host functions (log, kv, http, knowledge, chat).
//! - [`plugin`]: [`WasmPlugin`], the stage: instance pool, deadlines, limits, error mapping,
//!   metrics.

mod bindings;
pub mod host;
pub mod plugin;
pub mod runtime;

pub use bindings::CONTRACT_VERSION;
pub use plugin::{Cause, InitError, Limits, Metrics, WasmPlugin, WasmSpec};
