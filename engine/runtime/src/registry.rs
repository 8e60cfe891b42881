//! The one explicit list of everything built in: stage plugins, knowledge-store kinds and LLM
//! provider kinds. No linker magic, no global registries: adding a plugin is one line here.

use std::path::Path;
use std::sync::Arc;

use marked_yaml::Node;
use prompter_core::plugin::ErasedFactory;
use prompter_core::resource::{ChatProvider, KnowledgeStore};

use crate::config::diagnostics::Diagnostics;
use crate::config::typed_config;

/// Opens a named resource from its `config:` node (name, config, base dir, file, diagnostics).
pub type OpenFn<T> = fn(&str, &Node, &Path, &Path, &mut Diagnostics) -> Option<Arc<T>>;

/// The `plugin:` name of WebAssembly stages (built by `config::wasm`, not by a factory).
pub const WASM: &str = "wasm";

/// A kind of knowledge store (`store:` in the engine config).
pub struct StoreKind {
    /// The name used as `store:`.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Opens one.
    pub open: OpenFn<dyn KnowledgeStore>,
}

/// A kind of LLM provider (`provider:` in the engine config).
pub struct ProviderKind {
    /// The name used as `provider:`.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Opens one.
    pub open: OpenFn<dyn ChatProvider>,
}

/// Everything the engine can build by name.
pub struct Registry {
    plugins: Vec<Box<dyn ErasedFactory>>,
    /// Knowledge-store kinds.
    pub stores: Vec<StoreKind>,
    /// LLM provider kinds.
    pub providers: Vec<ProviderKind>,
}

impl Registry {
    /// The stage plugin called `name`.
    pub fn plugin(&self, name: &str) -> Option<&dyn ErasedFactory> {
        self.plugins
            .iter()
            .find(|p| p.name() == name)
            .map(|b| b.as_ref())
    }

    /// The names of all stage plugins.
    pub fn plugin_names(&self) -> impl Iterator<Item = &'static str> + Clone + '_ {
        self.plugins
            .iter()
            .map(|p| p.name())
            .chain(std::iter::once(WASM))
    }

    /// The stage plugins.
    pub fn plugins(&self) -> impl Iterator<Item = &dyn ErasedFactory> {
        self.plugins.iter().map(|b| b.as_ref())
    }
}

/// Every built-in plugin, store kind and provider kind.
pub fn builtin() -> Registry {
    Registry {
        plugins: vec![
            Box::new(prompter_plugin_dedupe::DedupeFactory),
            Box::new(prompter_plugin_retrieve::RetrieveFactory),
            Box::new(prompter_plugin_prompt::PromptFactory),
            Box::new(prompter_plugin_chat::ChatFactory),
            Box::new(prompter_plugin_notify::NotifyFactory),
        ],
        stores: vec![StoreKind {
            name: "embedded",
            description: "in-process store over a CSV, persisted to an index file, local lexical embedder",
            open: open_embedded,
        }],
        providers: vec![
            ProviderKind {
                name: "offline",
                description: "answers with the retrieved guidance verbatim (no model, no network)",
                open: open_offline,
            },
            ProviderKind {
                name: "nebula",
                description: "Symbl Nebula chat (`api_key: ${NEBULA_API_KEY}`), streamed when asked, with retries",
                open: open_nebula,
            },
        ],
    }
}

fn open_embedded(
    name: &str,
    config: &Node,
    base: &Path,
    file: &Path,
    diags: &mut Diagnostics,
) -> Option<Arc<dyn KnowledgeStore>> {
    use prompter_plugin_retrieve::{EmbeddedStore, EmbeddedStoreConfig};
    let cfg: EmbeddedStoreConfig = typed_config(file, config, diags)?;
    match EmbeddedStore::open(name, cfg, base) {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            // Most failures are about the CSV: point at `source` when it is there.
            let at = config
                .as_mapping()
                .and_then(|m| m.get_node("source"))
                .unwrap_or(config);
            diags.error_node(
                file,
                at,
                format!("cannot open knowledge store `{name}`: {e}"),
            );
            None
        }
    }
}

fn open_offline(
    name: &str,
    config: &Node,
    _base: &Path,
    file: &Path,
    diags: &mut Diagnostics,
) -> Option<Arc<dyn ChatProvider>> {
    use prompter_plugin_chat::{OfflineConfig, OfflineProvider};
    let cfg: OfflineConfig = typed_config(file, config, diags)?;
    Some(Arc::new(OfflineProvider::new(name, cfg)))
}

fn open_nebula(
    name: &str,
    config: &Node,
    _base: &Path,
    file: &Path,
    diags: &mut Diagnostics,
) -> Option<Arc<dyn ChatProvider>> {
    use prompter_plugin_chat::{NebulaConfig, NebulaProvider};
    let cfg: NebulaConfig = typed_config(file, config, diags)?;
    match NebulaProvider::new(name, cfg) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            let at = config
                .as_mapping()
                .and_then(|m| m.get_node("api_key"))
                .unwrap_or(config);
            diags.error_node(file, at, e.message);
            None
        }
    }
}
