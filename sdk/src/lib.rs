//! The Rust SDK for Prompter WebAssembly plugins.
//!
//! Status: not yet implemented. The WIT contract (`sdk/wit/`), the guest bindings, the
//! `Plugin` trait for guests and the export macro are the subject of the Wasm plugins issue;
//! until then this crate only reserves the name and the place in the workspace. Built-in plugins
//! are written against `prompter-core` today.

/// The version of the plugin contract this SDK will target.
pub const CONTRACT_VERSION: &str = "0.1.0";
