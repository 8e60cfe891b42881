//! Host bindings generated from the one WIT contract in `sdk/wit/`.

#![allow(unreachable_pub, missing_docs, reason = "generated code")]

wasmtime::component::bindgen!({
    path: "../../sdk/wit",
    world: "stage",
    imports: { default: async },
    exports: { default: async },
});

pub use prompter::plugin::host;
pub use prompter::plugin::types;

/// The contract version these bindings speak (the WIT package version).
pub const CONTRACT_VERSION: &str = "0.1.0";
/// The WIT package the host speaks.
pub const CONTRACT_PACKAGE: &str = "prompter:plugin";
