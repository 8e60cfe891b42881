//! The one explicit list of everything built in: stage plugins, knowledge-store kinds, LLM
//! provider kinds and embedder kinds. No linker magic, no global registries: adding a plugin is one line here.

use std::sync::Arc;

use prompter_core::plugin::ErasedFactory;
use prompter_core::resource::{ChatProvider, Embedder, KnowledgeStore};

use crate::config::OpenCx;
use crate::config::diagnostics::WithHelp;

/// Opens a named resource from its `config:` node, reporting problems in the context.
pub type OpenFn<T> = fn(&mut OpenCx<'_>) -> Option<Arc<T>>;

/// The `plugin:` name of WebAssembly stages (built by `config::wasm`, not by a factory).
pub const WASM: &str = "wasm";

/// A kind of named resource: what `store:` (knowledge) or `provider:` (llm, embedders) names.
pub struct Kind<T: ?Sized> {
    /// The name used in the engine config.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// Opens one.
    pub open: OpenFn<T>,
}

/// A kind of knowledge store (`store:` under `knowledge:`).
pub type StoreKind = Kind<dyn KnowledgeStore>;
/// A kind of LLM provider (`provider:` under `llm:`).
pub type ProviderKind = Kind<dyn ChatProvider>;
/// A kind of embedder (`provider:` under `embedders:`).
pub type EmbedderKind = Kind<dyn Embedder>;

/// Everything the engine can build by name.
pub struct Registry {
    plugins: Vec<Box<dyn ErasedFactory>>,
    /// Knowledge-store kinds.
    pub stores: Vec<StoreKind>,
    /// LLM provider kinds.
    pub providers: Vec<ProviderKind>,
    /// Embedder kinds.
    pub embedders: Vec<EmbedderKind>,
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
            Box::new(prompter_plugin_symbl::SymblConversationFactory::default()),
        ],
        stores: vec![
            StoreKind {
                name: "embedded",
                description: "in-process store persisted to an index file; any embedder (default: local lexical)",
                open: open_embedded,
            },
            StoreKind {
                name: "atlas",
                description: "MongoDB Atlas Vector Search (`$vectorSearch`), one pooled client; fill with `kb ingest`",
                open: open_atlas,
            },
        ],
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
            ProviderKind {
                name: "openai",
                description: "OpenAI-compatible chat (OpenAI, Ollama, vLLM, llama.cpp; `base_url`, optional `api_key: ${OPENAI_API_KEY}`), streamed when asked, with retries",
                open: open_openai,
            },
        ],
        embedders: vec![
            EmbedderKind {
                name: "hashing",
                description: "local lexical feature hashing (no model, no network; matches words, not meaning)",
                open: open_hashing,
            },
            EmbedderKind {
                name: "local",
                description: "a sentence-transformers BERT model (all-MiniLM-L6-v2) in-process on the CPU (`model_dir`; no network; matches meaning)",
                open: open_local_embedder,
            },
            EmbedderKind {
                name: "nebula",
                description: "Symbl Nebula embeddings (`/v1/model/embed`, 1024-d), with retries",
                open: open_nebula_embedder,
            },
            EmbedderKind {
                name: "openai",
                description: "OpenAI-compatible embeddings (`/embeddings`, batched up to `max_batch`), with retries",
                open: open_openai_embedder,
            },
        ],
    }
}

/// The embedder `name` from the engine config's `embedders:`, reported at the store's
/// `embedder` key when there is none.
fn embedder_named(cx: &mut OpenCx<'_>, name: &str, or_else: &str) -> Option<Arc<dyn Embedder>> {
    if let Some(e) = cx.resources.embedders.get(name) {
        return Some(e.clone());
    }
    let names: Vec<&str> = cx.resources.embedders.keys().map(String::as_str).collect();
    let help = prompter_core::diagnostic::did_you_mean(name, names.iter().copied())
        .map(|s| format!("did you mean `{s}`?"))
        .unwrap_or_else(|| format!("declare it under the engine config's `embedders:`{or_else}"));
    cx.error_at("embedder", format!("unknown embedder `{name}`"))
        .help(Some(help));
    None
}

fn open_embedded(cx: &mut OpenCx<'_>) -> Option<Arc<dyn KnowledgeStore>> {
    use prompter_plugin_retrieve::{EmbeddedStore, EmbeddedStoreConfig};
    let cfg: EmbeddedStoreConfig = cx.typed()?;
    let embedder = match &cfg.embedder {
        Some(name) => embedder_named(cx, name, " (or omit `embedder` for the local lexical one)")?,
        None => EmbeddedStore::local_embedder(cfg.dims),
    };
    match EmbeddedStore::open(cx.name, cfg, cx.base, embedder) {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            // Most failures are about the CSV: point at `source` when it is there.
            let name = cx.name.to_owned();
            cx.error_at(
                "source",
                format!("cannot open knowledge store `{name}`: {e}"),
            );
            None
        }
    }
}

fn open_atlas(cx: &mut OpenCx<'_>) -> Option<Arc<dyn KnowledgeStore>> {
    use prompter_store_atlas::{AtlasConfig, AtlasStore};
    let cfg: AtlasConfig = cx.typed()?;
    let problems = cfg.problems();
    let embedder = embedder_named(cx, &cfg.embedder, "");
    if !problems.is_empty() {
        let name = cx.name.to_owned();
        for p in problems {
            cx.error_at(p.key, format!("knowledge store `{name}`: {}", p.message));
        }
        return None;
    }
    match AtlasStore::open(cx.name, cfg, embedder?) {
        Ok(store) => Some(Arc::new(store)),
        Err(e) => {
            cx.error_at(e.config_key().unwrap_or("uri"), e.to_string());
            None
        }
    }
}

fn open_offline(cx: &mut OpenCx<'_>) -> Option<Arc<dyn ChatProvider>> {
    use prompter_plugin_chat::{OfflineConfig, OfflineProvider};
    let cfg: OfflineConfig = cx.typed()?;
    Some(Arc::new(OfflineProvider::new(cx.name, cfg)))
}

fn open_nebula(cx: &mut OpenCx<'_>) -> Option<Arc<dyn ChatProvider>> {
    use prompter_plugin_chat::{NebulaConfig, NebulaProvider};
    let cfg: NebulaConfig = cx.typed()?;
    match NebulaProvider::new(cx.name, cfg) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            cx.error_at("api_key", e.message);
            None
        }
    }
}

fn open_hashing(cx: &mut OpenCx<'_>) -> Option<Arc<dyn Embedder>> {
    use prompter_plugin_retrieve::embedder::{HashingConfig, LocalEmbedder};
    let cfg: HashingConfig = cx.typed()?;
    match LocalEmbedder::from_config(cx.name, &cfg) {
        Ok(e) => Some(Arc::new(e)),
        Err(message) => {
            cx.error_at("dims", message);
            None
        }
    }
}

fn open_local_embedder(cx: &mut OpenCx<'_>) -> Option<Arc<dyn Embedder>> {
    use prompter_plugin_local_embed::{LocalModelConfig, LocalModelEmbedder};
    let cfg: LocalModelConfig = cx.typed()?;
    let name = cx.name;
    match LocalModelEmbedder::open(name, &cfg, cx.base) {
        Ok(e) => Some(Arc::new(e)),
        Err((key, message)) => {
            cx.error_at(key, format!("embedder `{name}`: {message}"));
            None
        }
    }
}

fn open_nebula_embedder(cx: &mut OpenCx<'_>) -> Option<Arc<dyn Embedder>> {
    use prompter_plugin_chat::{NebulaEmbedConfig, NebulaEmbedder};
    let cfg: NebulaEmbedConfig = cx.typed()?;
    match NebulaEmbedder::new(cx.name, cfg) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            cx.error_at("api_key", e.message);
            None
        }
    }
}

fn open_openai(cx: &mut OpenCx<'_>) -> Option<Arc<dyn ChatProvider>> {
    use prompter_plugin_chat::{OpenAiConfig, OpenAiProvider};
    let cfg: OpenAiConfig = cx.typed()?;
    let name = cx.name;
    let problems = cfg.problems();
    if !problems.is_empty() {
        for p in problems {
            cx.error_at(p.key, format!("llm `{name}`: {}", p.message));
        }
        return None;
    }
    match OpenAiProvider::new(name, cfg) {
        Ok(p) => Some(Arc::new(p)),
        Err(e) => {
            cx.error_at("base_url", e.message);
            None
        }
    }
}

fn open_openai_embedder(cx: &mut OpenCx<'_>) -> Option<Arc<dyn Embedder>> {
    use prompter_plugin_chat::{OpenAiEmbedConfig, OpenAiEmbedder};
    let cfg: OpenAiEmbedConfig = cx.typed()?;
    let name = cx.name;
    let problems = cfg.problems();
    if !problems.is_empty() {
        for p in problems {
            cx.error_at(p.key, format!("embedder `{name}`: {}", p.message));
        }
        return None;
    }
    match OpenAiEmbedder::new(name, cfg) {
        Ok(e) => Some(Arc::new(e)),
        Err(e) => {
            cx.error_at("base_url", e.message);
            None
        }
    }
}
