//! The `atlas` knowledge store: documents and their embeddings in a MongoDB Atlas collection,
//! searched with Atlas Vector Search (`$vectorSearch`).
//!
//! It owns connecting to the cluster (one pooled client per store), embedding queries with the
//! store's embedder, the search aggregation, filling the collection from a knowledge-base CSV
//! (`prompter kb ingest`) and the Vector Search index definition (created through the driver,
//! or printed for the Atlas UI). It does not own deciding what to search for (the `retrieve`
//! stage) nor the embedders (the engine's `embedders:`).
//!
//! ```yaml
//! knowledge:
//!   sales:
//!     store: atlas
//!     config: { uri: "${MONGODB_URI}", database: rta, collection: guidance, index: vector_index, embedder: nebula }
//! ```
//!
//! Each knowledge-base row becomes one document, the guidance data with its embedding, as in
//! the RTA guide: `{_id: <row id>, text, data, embedding: [..], embedder, source}`. The row id is
//! the embedded store's (a hash of text and data), so a re-ingest embeds only new or changed
//! rows. The index over `embedding` is
//! `{"fields": [{"type": "vector", "path": "embedding", "numDimensions": <embedder dims>, "similarity": "cosine"}]}`.
//!
//! # Layout
//! - [`config`]: [`AtlasConfig`] and its checks.
//! - [`pipeline`]: the exact documents sent to Atlas, as pure functions.
//! - [`store`]: [`AtlasStore`], the [`KnowledgeStore`](prompter_core::resource::KnowledgeStore)
//!   and the index operations.
//! - [`ingest`]: filling the collection from a CSV.
//! - [`rows`]: reading the CSV, row ids.
//! - [`error`]: [`AtlasError`], and keeping credentials out of messages.

pub mod config;
pub mod error;
pub mod ingest;
pub mod pipeline;
pub mod rows;
pub mod store;

pub use config::{AtlasConfig, ConfigProblem, MAX_NUM_CANDIDATES, Similarity};
pub use error::AtlasError;
pub use ingest::{AtlasIngestReport, IngestOptions, ingest_atlas};
pub use pipeline::{
    create_search_indexes_command, index_definition, ingest_document, scored_document,
    search_index_model, to_json, vector_search_pipeline,
};
pub use rows::{Row, document_id, read_csv};
pub use store::{AtlasStore, IndexCreated, IndexStatus};
