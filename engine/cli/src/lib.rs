//! The `prompter` command: every subcommand, as thin wrappers around the `prompter-engine`
//! library. [`cli::main`] is the whole program (the binary calls it; tests call it in process).
//!
//! # Layout
//! - [`cli`]: argument parsing and the small commands (`validate`, `replay`, `plugins`).
//! - [`live`]: `prompter run`, the engine on live Symbl connections.
//! - [`demo`]: `prompter demo`, with its embedded defaults in [`bundle`].
//! - [`console`]: the agent console's wiring (`run` with `feed:`, `demo --console`) and
//!   `prompter console-token`.
//! - [`bench`](mod@bench): `prompter bench` and `prompter plugin bench`; [`feed_bench`]:
//!   `prompter bench --feed-clients N`, the agent feed's fan-out under load; [`twilio_bench`]:
//!   `prompter bench --twilio-calls N`, the Twilio bridge under load (a child `prompter run`
//!   between a fake Twilio and a fake Symbl); [`live_bench`]: `prompter bench --live-calls N`,
//!   the engine on N live calls at a time (a child `prompter run` between a fake Symbl
//!   Subscribe API and a fake Nebula), every event and output accounted for; `bench_child`:
//!   what these two share (the child process, `/proc` figures, report spreads).
//! - [`pipeline_test`]: `prompter test`, pipeline tests in YAML (`*.test.yaml`) run offline,
//!   failures shown as a readable diff.
//! - [`tap`](mod@tap): `prompter tap`, a running engine's events and outputs, live.
//! - [`kb`]: `prompter kb ingest`; [`plugin_cli`]: `prompter plugin new|test`;
//!   `trackers_cli`: `prompter trackers sync`.
//! - `otlp` (the `otlp` feature): the engine's spans exported to an OpenTelemetry collector.

pub mod bench;
mod bench_child;
pub mod bundle;
pub mod cli;
pub mod cluster_bench;
pub mod cluster_cli;
pub mod console;
pub mod demo;
pub mod feed_bench;
pub mod kb;
pub mod kb_bench;
pub mod kb_eval;
pub mod live;
pub mod live_bench;
#[cfg(feature = "otlp")]
mod otlp;
pub mod pipeline_test;
pub mod plugin_cli;
pub mod tap;
mod trackers_cli;
pub mod twilio_bench;
