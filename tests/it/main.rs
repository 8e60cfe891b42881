#![allow(
    clippy::unwrap_used,
    reason = "integration tests fail loudly on broken invariants"
)]
//! Integration tests: the real `prompter` command run in process, on the shipped configuration,
//! pipelines, knowledge bases and recordings.

mod cli;
mod config_ui;
#[cfg(unix)] // The examples sandbox links `pipelines/` and `target/` into a temp folder.
mod docs_yaml;
mod engine_api;
mod feed;
mod fuzz_config;
mod kb;
mod overload;
mod plugin_tool;
mod provider_metrics;
mod reload;
mod replay;
mod twilio;
mod wasm;
mod wasm_config;
mod wasm_grants;
mod wasm_pipelines;
