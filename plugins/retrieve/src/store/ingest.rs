//! Filling an embedded store's index from a CSV: only new or changed rows are embedded, in
//! batches with bounded concurrency, saved as it goes.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use prompter_core::error::PluginError;
use prompter_core::resource::Embedder;

use super::{
    CHECKPOINT_EVERY, Document, EmbeddedStoreConfig, INDEX_FORMAT, IndexFile, StoreError,
    document_id, load_index, read_csv, write_atomically,
};

/// How [`ingest`] goes about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestOptions {
    /// Texts per embedding call (capped by the embedder's own maximum). Default 32.
    pub batch_size: usize,
    /// Embedding calls in flight at once. Default 4.
    pub concurrency: usize,
    /// Keep documents already in the index that are not in the CSV. Default false: the store
    /// ends up holding exactly the CSV's rows.
    pub append: bool,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            batch_size: 32,
            concurrency: 4,
            append: false,
        }
    }
}

/// What an ingest did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IngestReport {
    /// Distinct rows in the CSV.
    pub rows: usize,
    /// Rows embedded by this run.
    pub embedded: usize,
    /// Rows whose embedding was already in the index.
    pub reused: usize,
    /// Documents dropped from the index because the CSV no longer has them.
    pub removed: usize,
    /// The documents in the index now.
    pub documents: usize,
    /// The index file.
    pub index: PathBuf,
}

/// Embeds the rows of `csv` into store `name`'s index: only rows not already embedded by this
/// embedder (by content), in batches with bounded concurrency, saving progress as it goes so an
/// interrupted run resumes. `progress(done, to_embed)` is called after each batch.
///
/// # Errors
/// The CSV is unreadable or malformed, the embedder fails (what was embedded is saved), or the
/// index cannot be written.
pub async fn ingest(
    name: &str,
    config: &EmbeddedStoreConfig,
    base_dir: &Path,
    embedder: Arc<dyn Embedder>,
    csv: &Path,
    options: IngestOptions,
    progress: &(dyn Fn(usize, usize) + Send + Sync),
) -> Result<IngestReport, StoreError> {
    let index_path = config.index_path(name, base_dir);
    let embedder_id = embedder.id();
    let rows = read_csv(csv)?;
    let previous = load_index(&index_path, &embedder_id);
    let mut done: HashMap<String, Document> =
        previous.iter().map(|d| (d.id.clone(), d.clone())).collect();

    // The CSV's distinct rows, in order, and those still to embed.
    let mut seen = HashSet::new();
    let rows: Vec<(String, String, String)> = rows
        .into_iter()
        .filter_map(|(text, data)| {
            let id = document_id(&text, &data);
            seen.insert(id.clone()).then_some((id, text, data))
        })
        .collect();
    let todo: Vec<&(String, String, String)> = rows
        .iter()
        .filter(|(id, _, _)| !done.contains_key(id))
        .collect();
    let reused = rows.len() - todo.len();
    let batch = options.batch_size.clamp(1, embedder.max_batch().max(1));
    let total = todo.len();
    progress(0, total);

    let order = |done: &HashMap<String, Document>| -> Vec<Document> {
        // CSV rows first (in CSV order), then, when appending, older documents.
        let mut out: Vec<Document> = rows
            .iter()
            .filter_map(|(id, _, _)| done.get(id).cloned())
            .collect();
        if options.append {
            out.extend(previous.iter().filter(|d| !seen.contains(&d.id)).cloned());
        }
        out
    };
    let save = |docs: Vec<Document>| {
        write_atomically(
            &index_path,
            &IndexFile {
                format: INDEX_FORMAT,
                embedder: embedder_id.clone(),
                documents: docs,
            },
        )
    };

    let mut calls = futures_util::stream::iter(todo.chunks(batch).map(|chunk| {
        let embedder = embedder.clone();
        let texts: Vec<String> = chunk.iter().map(|(_, t, _)| t.clone()).collect();
        let chunk: Vec<(String, String, String)> = chunk.iter().map(|r| (*r).clone()).collect();
        async move { (chunk, embedder.embed(&texts).await) }
    }))
    .buffer_unordered(options.concurrency.max(1));
    let mut embedded = 0;
    let mut last_save = Instant::now();
    let mut dims = done.values().next().map(|d| d.embedding.len());
    while let Some((chunk, result)) = calls.next().await {
        let result = result.and_then(|v| {
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
        let vectors = match result {
            Ok(v) => v,
            Err(source) => {
                drop(calls);
                // Keep what was embedded so far; the embedding error is the one to report.
                let _ = save(order(&done));
                return Err(StoreError::Embedding {
                    saved: embedded,
                    source,
                });
            }
        };
        for ((id, text, data), embedding) in chunk.into_iter().zip(vectors) {
            let want = *dims.get_or_insert(embedding.len());
            if embedding.len() != want || want == 0 {
                drop(calls);
                let _ = save(order(&done));
                return Err(StoreError::DimsMismatch {
                    embedder: embedder_id.clone(),
                    want,
                    got: embedding.len(),
                });
            }
            done.insert(
                id.clone(),
                Document {
                    id,
                    text,
                    data,
                    embedding,
                },
            );
            embedded += 1;
        }
        progress(embedded, total);
        if last_save.elapsed() >= CHECKPOINT_EVERY {
            save(order(&done))?;
            last_save = Instant::now();
        }
    }
    drop(calls);
    let documents = order(&done);
    let kept: HashSet<&str> = documents.iter().map(|d| d.id.as_str()).collect();
    let removed = previous
        .iter()
        .filter(|d| !kept.contains(d.id.as_str()))
        .count();
    let count = documents.len();
    if embedded > 0 || removed > 0 || previous.len() != count {
        save(documents)?;
    }
    Ok(IngestReport {
        rows: rows.len(),
        embedded,
        reused,
        removed,
        documents: count,
        index: index_path,
    })
}
