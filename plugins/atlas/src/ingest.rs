//! Filling an `atlas` store from a knowledge-base CSV (`prompter kb ingest FILE --store NAME`).
//!
//! Same contract as the embedded store's ingest: idempotent by row content (a re-run embeds
//! only new or changed rows, and rows embedded by another embedder), batches of at most the
//! embedder's `max_batch`, bounded concurrency, progress after each batch, and, unless
//! `append`, the store ends up holding exactly the CSV's rows. Each batch is written as soon as
//! it is embedded, so an interrupted run resumes where it stopped.
//!
//! "The store" is the documents this command wrote (they carry a `source` field); documents
//! some other tool put in the same collection are never removed.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use mongodb::Collection;
use mongodb::bson::{Bson, Document, doc};
use mongodb::error::ErrorKind as MongoErrorKind;
use prompter_core::error::PluginError;
use prompter_core::resource::{Embedder, KnowledgeStore};
pub use prompter_plugin_retrieve::IngestOptions;

use crate::config::AtlasConfig;
use crate::error::AtlasError;
use crate::pipeline::{EMBEDDER_FIELD, SOURCE_FIELD, ingest_document};
use crate::rows::{Row, read_csv};
use crate::store::AtlasStore;

/// The server's code for a duplicate `_id`.
const DUPLICATE_KEY: i32 = 11_000;

/// What an ingest did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AtlasIngestReport {
    /// Distinct rows in the CSV.
    pub rows: usize,
    /// Rows embedded and written by this run.
    pub embedded: usize,
    /// Rows already stored with an embedding by this embedder.
    pub reused: usize,
    /// Documents removed because the CSV no longer has them (or, with `append`, because
    /// another embedder made them).
    pub removed: usize,
    /// Documents in the collection embedded by this embedder now.
    pub documents: usize,
    /// Length of the vectors written (known when something was embedded or the embedder says):
    /// the index's `numDimensions`.
    pub dims: Option<usize>,
    /// `database.collection`.
    pub namespace: String,
}

/// Opens store `name` and ingests `csv` into it: [`AtlasStore::open`] then
/// [`AtlasStore::ingest`].
///
/// # Errors
/// As those two.
pub async fn ingest_atlas(
    name: &str,
    config: AtlasConfig,
    embedder: Arc<dyn Embedder>,
    csv: &Path,
    options: IngestOptions,
    progress: &(dyn Fn(usize, usize) + Send + Sync),
) -> Result<AtlasIngestReport, AtlasError> {
    AtlasStore::open(name, config, embedder)?
        .ingest(csv, options, progress)
        .await
}

impl AtlasStore {
    /// Embeds the rows of `csv` into the collection; see the module docs.
    /// `progress(done, to_embed)` is called before the first batch and after each.
    ///
    /// Each document is `{_id: <row id>, <text_field>, <data_field>, <path>: [embedding],
    /// embedder: <Embedder::id>, source: <CSV file name>}`.
    ///
    /// # Errors
    /// The CSV is unreadable or malformed (naming file and line), the embedder fails or answers
    /// vectors of varying length (rows written so far stay), or a MongoDB operation fails.
    pub async fn ingest(
        &self,
        csv: &Path,
        options: IngestOptions,
        progress: &(dyn Fn(usize, usize) + Send + Sync),
    ) -> Result<AtlasIngestReport, AtlasError> {
        let rows = read_csv(csv)?;
        let source = csv.file_name().map_or_else(
            || csv.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let embedder = self.embedder().clone();
        let embedder_id = embedder.id();
        let coll = self.collection().await?;

        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let stored = self.stored_embedders(&coll, &ids).await?;
        let todo: Vec<&Row> = rows
            .iter()
            .filter(|r| stored.get(&r.id) != Some(&embedder_id))
            .collect();
        let reused = rows.len() - todo.len();
        let total = todo.len();
        let batch = options.batch_size.clamp(1, embedder.max_batch().max(1));
        progress(0, total);

        // 0 = not known yet; the first vector fixes it.
        let dims = AtomicUsize::new(embedder.dims().unwrap_or(0));
        let written = AtomicUsize::new(0);
        let mut calls = futures_util::stream::iter(todo.chunks(batch).map(|chunk| {
            let texts: Vec<String> = chunk.iter().map(|r| r.text.clone()).collect();
            let (embedder, embedder_id) = (&embedder, &embedder_id);
            let (coll, stored, source, dims, written) = (&coll, &stored, &source, &dims, &written);
            async move {
                let vectors = embedder.embed(&texts).await.and_then(|v| {
                    if v.len() == chunk.len() {
                        Ok(v)
                    } else {
                        Err(PluginError::external(format!(
                            "the embedder answered {} vectors for {} texts",
                            v.len(),
                            chunk.len()
                        )))
                    }
                });
                let vectors = vectors.map_err(|source| AtlasError::Embedding {
                    store: self.name().to_owned(),
                    saved: written.load(Ordering::SeqCst),
                    source,
                })?;
                let mut fresh = Vec::new();
                let mut stale = Vec::new();
                for (row, v) in chunk.iter().zip(&vectors) {
                    let want =
                        match dims.compare_exchange(0, v.len(), Ordering::SeqCst, Ordering::SeqCst)
                        {
                            Ok(_) => v.len(),
                            Err(known) => known,
                        };
                    if v.len() != want || v.is_empty() {
                        return Err(AtlasError::DimsMismatch {
                            embedder: embedder_id.clone(),
                            want: want.max(1),
                            got: v.len(),
                        });
                    }
                    let d = ingest_document(
                        self.config(),
                        &row.id,
                        &row.text,
                        &row.data,
                        v,
                        embedder_id,
                        source,
                    );
                    if stored.contains_key(&row.id) {
                        stale.push(d);
                    } else {
                        fresh.push(d);
                    }
                }
                self.write(coll, fresh, stale).await?;
                written.fetch_add(chunk.len(), Ordering::SeqCst);
                Ok(chunk.len())
            }
        }))
        .buffer_unordered(options.concurrency.max(1));
        let mut embedded = 0;
        while let Some(result) = calls.next().await {
            embedded += result?;
            progress(embedded, total);
        }
        drop(calls);

        let removed = self
            .remove_others(&coll, &ids, &embedder_id, options.append)
            .await?;
        let documents = coll
            .count_documents(doc! { EMBEDDER_FIELD: embedder_id.as_str() })
            .await
            .map_err(|e| self.mongo("counting documents", &e))?;
        let dims = dims.into_inner();
        Ok(AtlasIngestReport {
            rows: rows.len(),
            embedded,
            reused,
            removed,
            documents: usize::try_from(documents).unwrap_or(usize::MAX),
            dims: (dims > 0).then_some(dims),
            namespace: self.namespace(),
        })
    }

    /// `_id → embedder id` of the rows already in the collection (only those two fields are
    /// fetched).
    async fn stored_embedders(
        &self,
        coll: &Collection<Document>,
        ids: &[&str],
    ) -> Result<HashMap<String, String>, AtlasError> {
        let op = "reading the ids already stored";
        let mut cursor = coll
            .find(doc! { "_id": { "$in": ids } })
            .projection(doc! { "_id": 1_i32, EMBEDDER_FIELD: 1_i32 })
            .await
            .map_err(|e| self.mongo(op, &e))?;
        let mut out = HashMap::new();
        while cursor.advance().await.map_err(|e| self.mongo(op, &e))? {
            let d = cursor
                .deserialize_current()
                .map_err(|e| self.mongo(op, &e))?;
            if let Ok(id) = d.get_str("_id") {
                let embedder = d.get_str(EMBEDDER_FIELD).unwrap_or_default();
                out.insert(id.to_owned(), embedder.to_owned());
            }
        }
        Ok(out)
    }

    /// Inserts `fresh` documents in one round trip and replaces `stale` ones (stored by another
    /// embedder). A fresh one that appeared meanwhile (another ingest) is replaced too.
    async fn write(
        &self,
        coll: &Collection<Document>,
        fresh: Vec<Document>,
        mut stale: Vec<Document>,
    ) -> Result<(), AtlasError> {
        let op = "writing documents";
        if !fresh.is_empty()
            && let Err(e) = coll.insert_many(&fresh).ordered(false).await
        {
            let duplicates = match e.kind.as_ref() {
                MongoErrorKind::InsertMany(m) if m.write_concern_error.is_none() => m
                    .write_errors
                    .as_deref()
                    .filter(|w| w.iter().all(|w| w.code == DUPLICATE_KEY))
                    .map(|w| w.iter().map(|w| w.index).collect::<HashSet<_>>()),
                _ => None,
            };
            let Some(duplicates) = duplicates else {
                return Err(self.mongo(op, &e));
            };
            stale.extend(
                fresh
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| duplicates.contains(i))
                    .map(|(_, d)| d),
            );
        }
        for d in stale {
            let id = d.get("_id").cloned().unwrap_or(Bson::Null);
            coll.replace_one(doc! { "_id": id }, &d)
                .upsert(true)
                .await
                .map_err(|e| self.mongo(op, &e))?;
        }
        Ok(())
    }

    /// Removes the documents this command wrote that the CSV does not have; with `append`,
    /// only those another embedder made (their vectors are not comparable).
    async fn remove_others(
        &self,
        coll: &Collection<Document>,
        ids: &[&str],
        embedder_id: &str,
        append: bool,
    ) -> Result<usize, AtlasError> {
        let mut filter = doc! {
            SOURCE_FIELD: { "$exists": true },
            "_id": { "$nin": ids },
        };
        if append {
            filter.insert(EMBEDDER_FIELD, doc! { "$ne": embedder_id });
        }
        let r = coll
            .delete_many(filter)
            .await
            .map_err(|e| self.mongo("removing rows the CSV no longer has", &e))?;
        Ok(usize::try_from(r.deleted_count).unwrap_or(usize::MAX))
    }
}
