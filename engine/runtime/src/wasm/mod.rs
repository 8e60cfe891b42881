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
//! - `kv`: a call's view of the stage's key-value space, which the engine keeps per
//!   conversation (limits, read-your-writes, committed when the guest returns).
//! - [`plugin`]: [`WasmPlugin`], the stage: instance pool, deadlines, limits, grants, error
//!   mapping, metrics.
//! - `slots`: the process-wide bound on live instances; a call waits (until its deadline) for a
//!   free one.

mod bindings;
pub mod host;
mod kv;
pub mod plugin;
pub mod runtime;
mod slots;

pub use bindings::CONTRACT_VERSION;
pub use plugin::{Cause, Grants, InitError, Limits, Metrics, WasmPlugin, WasmSpec};
