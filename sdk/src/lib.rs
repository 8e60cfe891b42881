//! # prompter-sdk: write Prompter pipeline stages in Rust, run them as WebAssembly components
//!
//! A Prompter pipeline is a list of *stages* that every matching Symbl event runs through
//! (`on: [message_response]`, ...). Besides the built-in plugins (`retrieve`, `prompt`, `chat`,
//! `notify`, ...), a stage can be your own code compiled to a WebAssembly component: the engine
//! loads it with `plugin: wasm`, sandboxes it (memory, time, network grants) and calls it once per
//! event. This crate is everything such a plugin needs: you implement one trait, [`Plugin`], and
//! write one macro line, [`export_plugin!`].
//!
//! The contract between the engine and a plugin is the WIT world `prompter:plugin/stage`, version
//! [`CONTRACT_VERSION`]; this crate hides its raw bindings behind ordinary Rust types.
//!
//! ## 1. Scaffold a crate
//!
//! ```text
//! prompter plugin new my-plugin
//! cd my-plugin
//! ```
//!
//! This creates a library crate with `crate-type = ["cdylib", "rlib"]` (the `cdylib` is the
//! component, the `rlib` lets `cargo test` run your logic natively), a dependency on
//! `prompter-sdk`, `serde` and `serde_json`, and a `src/lib.rs` like the one below. To set one up
//! by hand, that is all there is to it; the target is installed once with
//! `rustup target add wasm32-wasip2`.
//!
//! ## 2. Implement the trait
//!
//! ```
//! use prompter_sdk::prelude::*;
//! use serde_json::json;
//!
//! /// The stage's `config:` from the pipeline YAML, deserialized by the SDK.
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config {
//!     phrase: String,
//! }
//!
//! struct PhraseSpotter {
//!     cfg: Config,
//! }
//!
//! impl Plugin for PhraseSpotter {
//!     type Config = Config;
//!
//!     fn init(config: Config) -> Result<Self, Error> {
//!         if config.phrase.trim().is_empty() {
//!             return Err(Error::config_at("phrase", "must not be empty"));
//!         }
//!         Ok(PhraseSpotter { cfg: config })
//!     }
//!
//!     fn process(&mut self, event: &Event, conversation: &Conversation) -> Result<Outcome, Error> {
//!         let Some(text) = event.text() else {
//!             return Ok(Outcome::halt("no text"));
//!         };
//!         if !text.to_lowercase().contains(&self.cfg.phrase.to_lowercase()) {
//!             return Ok(Outcome::next(json!({ "found": false })));
//!         }
//!         let speaker = event.speaker().map_or("Someone", Speaker::label);
//!         Ok(Outcome::next(json!({ "found": true, "lines": conversation.transcript.len() }))
//!             .notify(Notice::alert("Phrase spotted", format!("{speaker} said \"{text}\""))))
//!     }
//! }
//!
//! export_plugin!(PhraseSpotter);
//! # fn main() {}
//! ```
//!
//! * [`Plugin::init`] runs once per instance with the stage's `config:`. A config that does not
//!   deserialize is rejected with [`ErrorKind::Config`] and the path of the bad field
//!   (`phrases.2`), so the engine can point at its line in the YAML; add your own checks with
//!   [`Error::config_at`].
//! * [`Plugin::process`] runs for each event that reaches the stage, with the
//!   [`Conversation`] so far (the transcript already includes the current sentence). Return
//!   [`Outcome::next`] with a JSON value (later stages read it as `stages.<id>`), or
//!   [`Outcome::halt`] to end the run quietly; attach [`Notice`]s to deliver alerts or cards.
//! * Talk to the engine through [`log`], [`kv`], [`http`], [`knowledge`] and [`llm`].
//!
//! ## 3. Test it natively
//!
//! Outside the engine (any target but `wasm32`), the host functions are test doubles: [`log`]
//! writes to stderr, [`kv`] is an in-memory map, and [`http`], [`knowledge`] and [`llm`] fail
//! with "not available outside the engine" unless a test installs a mock (see [`testing`]). So
//! plain `cargo test` works:
//!
//! ```
//! # use prompter_sdk::prelude::*;
//! # use serde_json::json;
//! # #[derive(serde::Deserialize)] struct Config { phrase: String }
//! # struct PhraseSpotter { cfg: Config }
//! # impl Plugin for PhraseSpotter {
//! #     type Config = Config;
//! #     fn init(cfg: Config) -> Result<Self, Error> { Ok(PhraseSpotter { cfg }) }
//! #     fn process(&mut self, e: &Event, _: &Conversation) -> Result<Outcome, Error> {
//! #         Ok(Outcome::next(json!({"found": e.text().is_some_and(|t| t.contains(&self.cfg.phrase))})))
//! #     }
//! # }
//! use prompter_sdk::testing::Harness;
//!
//! let mut h = Harness::<PhraseSpotter>::new(json!({ "phrase": "price" })).unwrap();
//! let out = h.say(1_000, "Jane", None, "What is the price?", Some(0.1)).unwrap();
//! assert_eq!(out.output(), Some(&json!({ "found": true })));
//! ```
//!
//! ## 4. Build the component
//!
//! ```text
//! cargo build --release --target wasm32-wasip2
//! ```
//!
//! The component is `target/wasm32-wasip2/release/my_plugin.wasm`. Try it against a recorded
//! conversation before wiring it in:
//!
//! ```text
//! prompter plugin test target/wasm32-wasip2/release/my_plugin.wasm \
//!     --config config.yaml --events recording.jsonl
//! ```
//!
//! ## 5. Wire it into a pipeline
//!
//! ```yaml
//! pipeline: phrase_alerts
//! on: [message_response]
//! stages:
//!   - id: spot
//!     plugin: wasm
//!     module: ../my-plugin/target/wasm32-wasip2/release/my_plugin.wasm # relative to this file
//!     config:                        # handed to Plugin::init as JSON
//!       phrase: price
//!     allow_hosts: [api.example.com] # hosts http::fetch may reach (`host:port`, `*.domain`);
//!                                    # none by default
//!     allow_knowledge: [sales]       # knowledge stores knowledge::search may query; none by default
//!     allow_llm: [nebula]            # LLM providers llm::chat may ask; none by default
//!     limits: { max_memory_mb: 32, max_output_kb: 256 }
//!     timeout_ms: 200                # per event; the instance is interrupted past it
//! ```
//!
//! `limits:` takes `max_memory_mb` (linear memory cap, default 64), `max_output_kb` (largest
//! output plus notices, default 256), `recycle_after_calls`, `recycle_memory_mb`,
//! `max_idle_instances` (the instance pool), `transcript_lines` (the latest transcript lines each
//! call receives, default 32) and `fuel` (a deterministic budget, for tests).
//! A config the plugin rejects is reported at the offending line of `config:`.
//!
//! ## Things to know
//!
//! * **Keep per-conversation state in [`kv`].** The engine pools instances and recycles them
//!   (after a trap, a timeout, or simply to bound memory), and one instance serves many
//!   conversations one after another. Fields of your plugin struct and statics live per
//!   *instance*: fine for compiled config, caches and counters you can afford to lose, wrong for
//!   "what happened in this call". [`kv`] is private to the stage and the current conversation,
//!   survives recycling and is dropped when the conversation ends.
//! * **Limits.** A stage runs under a memory cap (`limits.max_memory_mb`), a time budget
//!   (`timeout_ms`) and a size cap on what it returns (`limits.max_output_kb`). Running out of
//!   memory or time traps the instance; any failure makes the stage fail under its `on_error`
//!   policy, and a trapped instance is replaced by a fresh one (which runs `init` again) for the
//!   next event. A panic is a trap too: return an [`Error`] instead where you can.
//! * **Grants.** A plugin reaches nothing by itself: no files, no sockets, no clock beyond what
//!   WASI grants. [`http::fetch`] goes through the engine and only to hosts listed in the
//!   stage's `allow_hosts`; [`knowledge::search`] and [`llm::chat`] use the engine's configured
//!   stores and providers, only those listed in the stage's `allow_knowledge` and `allow_llm`,
//!   so keys and credentials never enter the plugin. A call to one the stage was not granted
//!   returns an error naming the missing grant (the plugin may carry on without it).

#![warn(missing_docs)]

/// Raw guest bindings generated from `wit/plugin.wit`. Use the SDK's types instead.
#[doc(hidden)]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "stage",
        pub_export_macro: true,
        default_bindings_module: "prompter_sdk::bindings",
        additional_derives: [Clone, PartialEq],
    });
}

mod double;
/// Where host calls go: the engine's imports on `wasm32`, the test doubles elsewhere.
#[cfg(target_arch = "wasm32")]
use bindings::prompter::plugin::host as sys;
#[cfg(not(target_arch = "wasm32"))]
use double as sys;
mod error;
pub mod http;
pub mod knowledge;
pub mod kv;
pub mod llm;
pub mod log;
mod outcome;
mod plugin;
pub mod testing;
mod types;

pub use error::{Error, ErrorKind};
pub use outcome::{Flow, Notice, Outcome};
pub use plugin::Plugin;
pub use types::{
    Conversation, Detail, Event, Insight, Message, Speaker, Tracker, TrackerMatch, TranscriptLine,
    kinds,
};

/// The version of the WIT contract (`prompter:plugin@0.1.0`) this SDK implements.
pub const CONTRACT_VERSION: &str = "0.1.0";

/// Everything a plugin usually needs: `use prompter_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Conversation, Detail, Error, ErrorKind, Event, Flow, Insight, Message, Notice, Outcome,
        Plugin, Speaker, Tracker, TrackerMatch, TranscriptLine, export_plugin, http, kinds,
        knowledge, kv, llm, log,
    };
}

/// Support code for [`export_plugin!`]; not part of the public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::plugin::{init_instance, process_instance};
}

/// Exports a [`Plugin`] implementation as the component's `stage` world.
///
/// Write it once, at the crate root, with your plugin type:
///
/// ```
/// # use prompter_sdk::prelude::*;
/// # struct MyPlugin;
/// # impl Plugin for MyPlugin {
/// #     type Config = serde_json::Value;
/// #     fn init(_: serde_json::Value) -> Result<Self, Error> { Ok(MyPlugin) }
/// #     fn process(&mut self, _: &Event, _: &Conversation) -> Result<Outcome, Error> {
/// #         Ok(Outcome::next(serde_json::Value::Null))
/// #     }
/// # }
/// prompter_sdk::export_plugin!(MyPlugin);
/// # fn main() {}
/// ```
///
/// The instance built by [`Plugin::init`] lives in a thread-local slot of the component
/// instance; `process` before a successful `init` fails with an internal error.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            ::std::thread_local! {
                static __PROMPTER_INSTANCE: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            struct __PrompterStage;

            impl $crate::bindings::Guest for __PrompterStage {
                fn init(
                    config_json: ::std::string::String,
                ) -> ::core::result::Result<(), $crate::bindings::PluginError> {
                    $crate::__private::init_instance::<$plugin>(&__PROMPTER_INSTANCE, &config_json)
                }

                fn process(
                    event: $crate::bindings::Event,
                    conversation: $crate::bindings::Conversation,
                ) -> ::core::result::Result<
                    $crate::bindings::StageResult,
                    $crate::bindings::PluginError,
                > {
                    $crate::__private::process_instance::<$plugin>(
                        &__PROMPTER_INSTANCE,
                        &event,
                        &conversation,
                    )
                }
            }

    $crate::bindings::export!(__PrompterStage with_types_in $crate::bindings);
        };
    };
}
