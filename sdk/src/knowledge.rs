//! Top-k search in the engine's knowledge stores (the ones under `knowledge:` in the engine
//! config) that the stage was granted (`allow_knowledge: [sales]`); the engine embeds the query,
//! so no model runs in the plugin.
//!
//! ```no_run
//! use prompter_sdk::knowledge;
//!
//! for doc in knowledge::search("sales", "annual plan discount", 3)? {
//!     println!("{:.2} {}", doc.score, doc.text);
//! }
//! # Ok::<(), String>(())
//! ```

/// One search hit: `id`, `text`, `data` and `score`.
pub use crate::bindings::prompter::plugin::host::Document;

impl Document {
    /// A document (for mocks).
    pub fn new(id: impl Into<String>, text: impl Into<String>, score: f32) -> Self {
        Document {
            id: id.into(),
            text: text.into(),
            data: String::new(),
            score,
        }
    }
}

/// The `k` documents of `store` closest to `query`, best first.
///
/// # Errors
/// The engine's reason: a store the stage has no grant for (the message names the missing
/// `allow_knowledge` entry), an embedding failure, ...
pub fn search(store: &str, query: &str, k: u32) -> Result<Vec<Document>, String> {
    crate::sys::knowledge_search(store, query, k)
}
