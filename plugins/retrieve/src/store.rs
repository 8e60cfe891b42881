//! The embedded knowledge store: documents and their embeddings in process, persisted to an
//! index file.
//!
//! It owns reading knowledge-base CSVs, embedding their rows with the store's [`Embedder`],
//! persisting the embeddings (so a restart re-embeds nothing) and answering similarity
//! searches. It does not own deciding what to search for (the `retrieve` stage).
//!
//! Two ways to fill a store:
//! - `source: kb.csv` in its config: the store serves exactly that CSV's rows. With a local
//!   embedder (the default lexical one) rows missing from the index are embedded when the store
//!   opens; with a remote one (Nebula, OpenAI) opening never calls the network, and rows not yet
//!   embedded are an error that says to run `prompter kb ingest`.
//! - no `source`: the store serves what `prompter kb ingest FILE.csv --store NAME` put in its
//!   index ([`ingest`]).
//!
//! The index is a JSON file of documents keyed by a hash of their content (text and data) and
//! tagged with the embedder's id: a re-ingest embeds only new or changed rows, and an index
//! built by another embedder is never mixed in. Writes go to a temporary file that is renamed
//! over the index, so a reader never sees half an index.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::{CachedEmbedder, Embedder, KnowledgeStore, ScoredDocument};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::embedder::{HashingEmbedder, LocalEmbedder, MAX_DIMS, cosine};

/// Version of the index file layout; part of the validity check.
const INDEX_FORMAT: u32 = 2;
/// During an ingest, the index is saved at least this often, so an interrupted run loses at
/// most this much work (a re-run resumes from the saved rows).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Configuration of an `embedded` knowledge store (`knowledge.<name>.config`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedStoreConfig {
    /// The knowledge-base CSV the store serves: a header row, then one document per row; the
    /// first column is the text that is embedded and searched (the objection), the second the
    /// data returned with it (the guidance). Relative paths resolve against the engine config's
    /// folder. Without it, the store serves what `prompter kb ingest` put in its index.
    #[serde(default)]
    pub source: Option<PathBuf>,
    /// Where the index is persisted. Default: `.prompter/index/<store name>.json` in the engine
    /// config's folder.
    #[serde(default)]
    pub index: Option<PathBuf>,
    /// The embedder, by its name in the engine config's `embedders:`. Default: the local
    /// lexical embedder with `dims` dimensions.
    #[serde(default)]
    pub embedder: Option<String>,
    /// Dimensions of the default local embedder, 1 to 65536. Default 1024.
    #[serde(default = "default_dims")]
    pub dims: usize,
}

fn default_dims() -> usize {
    HashingEmbedder::DEFAULT_DIMS
}

impl EmbeddedStoreConfig {
    /// A config serving `source` with the default embedder.
    pub fn with_source(source: impl Into<PathBuf>) -> Self {
        EmbeddedStoreConfig {
            source: Some(source.into()),
            index: None,
            embedder: None,
            dims: default_dims(),
        }
    }

    /// The index file of store `name`, with relative paths resolved against `base_dir`.
    pub fn index_path(&self, name: &str, base_dir: &Path) -> PathBuf {
        match &self.index {
            Some(p) => base_dir.join(p),
            None => base_dir
                .join(".prompter")
                .join("index")
                .join(format!("{}.json", file_stem(name))),
        }
    }
}

/// Why an embedded store could not be opened or filled.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("cannot {action} `{}`: {source}", path.display())]
    Io {
        /// What was being done ("read", "write the index to").
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CSV is malformed.
    #[error("`{}` line {line}: {message}", path.display())]
    Csv {
        /// The CSV file.
        path: PathBuf,
        /// The 1-based line of the CSV where the problem is.
        line: u64,
        /// What is wrong.
        message: String,
        /// The parser's error, when the parser found it.
        #[source]
        source: Option<csv::Error>,
    },
    /// The CSV has a header but no rows.
    #[error("`{}` has no documents: add rows below the header", path.display())]
    EmptyKnowledgeBase {
        /// The CSV file.
        path: PathBuf,
    },
    /// `dims` is out of range.
    #[error("`dims` must be between 1 and {MAX_DIMS}, got {0}")]
    InvalidDims(usize),
    /// Rows of the source are not embedded yet, and the embedder is remote.
    #[error(
        "{missing} of {total} rows of `{}` are not embedded by `{embedder}` yet: run `prompter kb ingest {} --store {store}`",
        source_file.display(), source_file.display()
    )]
    NotIngested {
        /// The store.
        store: String,
        /// Its CSV.
        source_file: PathBuf,
        /// Rows without an embedding.
        missing: usize,
        /// All rows.
        total: usize,
        /// The embedder's id.
        embedder: String,
    },
    /// The store has no source and nothing was ingested.
    #[error(
        "knowledge store `{store}` is empty: no index at `{}` built by `{embedder}`; run `prompter kb ingest FILE.csv --store {store}`",
        index.display()
    )]
    NotIngestedYet {
        /// The store.
        store: String,
        /// Its index file.
        index: PathBuf,
        /// The embedder's id.
        embedder: String,
    },
    /// The embedder failed during an ingest; what was embedded before is saved.
    #[error("embedding failed after {saved} new rows were saved (a re-run resumes): {source}")]
    Embedding {
        /// Rows embedded and saved before the failure.
        saved: usize,
        /// The embedder's error.
        #[source]
        source: PluginError,
    },
    /// The embedder answered vectors of different lengths.
    #[error(
        "the embedder `{embedder}` answered {got}-dimensional vectors where {want} were expected"
    )]
    DimsMismatch {
        /// The embedder's id.
        embedder: String,
        /// Expected length.
        want: usize,
        /// Received length.
        got: usize,
    },
}

/// One document of the store, with its embedding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Document {
    id: String,
    text: String,
    data: String,
    embedding: Vec<f32>,
}

/// The persisted index.
#[derive(Debug, Serialize, Deserialize)]
struct IndexFile {
    format: u32,
    embedder: String,
    documents: Vec<Document>,
}

/// A knowledge store held in process; see the module docs.
pub struct EmbeddedStore {
    name: String,
    embedder: Arc<dyn Embedder>,
    documents: Vec<Document>,
    index_path: PathBuf,
    embedded_on_open: usize,
    /// Lexical vectors of the documents, for remote embedders only: when the embedder fails or
    /// is too slow, the store still ranks by words (and says so).
    lexical: Option<(HashingEmbedder, Vec<Vec<f32>>)>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("name", &self.name)
            .field("embedder", &self.embedder.id())
            .field("documents", &self.documents.len())
            .field("index_path", &self.index_path)
            .finish()
    }
}

impl EmbeddedStore {
    /// The default embedder of a store that names none: the local lexical one, cached.
    pub fn local_embedder(dims: usize) -> Arc<dyn Embedder> {
        let local = LocalEmbedder::new("hashing", HashingEmbedder::new(dims.clamp(1, MAX_DIMS)));
        Arc::new(CachedEmbedder::new(Arc::new(local)))
    }

    /// Opens store `name`: loads its index, and with a `source`, checks that every row of the
    /// CSV is embedded (embedding missing rows right away when the embedder is local). Relative
    /// paths resolve against `base_dir`. Synchronous and offline: it runs once, at engine start.
    ///
    /// # Errors
    /// The CSV cannot be read or is malformed (naming the file and line), has no rows, `dims`
    /// is out of range, rows are not embedded and the embedder is remote, the store has no
    /// source and no index, or the index cannot be written.
    pub fn open(
        name: &str,
        config: EmbeddedStoreConfig,
        base_dir: &Path,
        embedder: Arc<dyn Embedder>,
    ) -> Result<EmbeddedStore, StoreError> {
        if config.embedder.is_none() && !(1..=MAX_DIMS).contains(&config.dims) {
            return Err(StoreError::InvalidDims(config.dims));
        }
        let index_path = config.index_path(name, base_dir);
        let embedder_id = embedder.id();
        let indexed = load_index(&index_path, &embedder_id);
        let Some(source) = &config.source else {
            if indexed.is_empty() {
                return Err(StoreError::NotIngestedYet {
                    store: name.to_owned(),
                    index: index_path,
                    embedder: embedder_id,
                });
            }
            let lexical = lexical_index(embedder.as_ref(), &indexed);
            return Ok(EmbeddedStore {
                name: name.to_owned(),
                embedder,
                documents: indexed,
                index_path,
                embedded_on_open: 0,
                lexical,
            });
        };
        let source = base_dir.join(source);
        let rows = read_csv(&source)?;
        let mut known: HashMap<String, Document> =
            indexed.into_iter().map(|d| (d.id.clone(), d)).collect();
        let mut documents = Vec::with_capacity(rows.len());
        let mut missing = 0;
        let mut embedded = 0;
        let mut seen = HashSet::new();
        for (text, data) in rows {
            let id = document_id(&text, &data);
            // A row repeated in the CSV is one document (as `ingest` counts it).
            if !seen.insert(id.clone()) {
                continue;
            }
            if let Some(d) = known.remove(&id) {
                documents.push(d);
            } else if let Some(embedding) = embedder.embed_local(&text) {
                embedded += 1;
                documents.push(Document {
                    id,
                    text,
                    data,
                    embedding,
                });
            } else {
                missing += 1;
            }
        }
        if missing > 0 {
            return Err(StoreError::NotIngested {
                store: name.to_owned(),
                source_file: source,
                missing,
                total: documents.len() + missing,
                embedder: embedder_id,
            });
        }
        check_dims(&documents, &embedder_id)?;
        // Rewrite the index when rows were added or dropped, so the next start is a pure load.
        if embedded > 0 || !known.is_empty() {
            write_atomically(
                &index_path,
                &IndexFile {
                    format: INDEX_FORMAT,
                    embedder: embedder_id,
                    documents: documents.clone(),
                },
            )?;
        }
        let lexical = lexical_index(embedder.as_ref(), &documents);
        Ok(EmbeddedStore {
            name: name.to_owned(),
            embedder,
            documents,
            index_path,
            embedded_on_open: embedded,
            lexical,
        })
    }

    /// The number of documents.
    pub fn len(&self) -> usize {
        self.documents.len()
    }

    /// True when the store has no documents (never, for an opened store).
    pub fn is_empty(&self) -> bool {
        self.documents.is_empty()
    }

    /// How many rows [`EmbeddedStore::open`] had to embed (0 when the index had them all).
    pub fn embedded_on_open(&self) -> usize {
        self.embedded_on_open
    }

    /// Whether [`EmbeddedStore::open`] had to embed rows.
    pub fn rebuilt(&self) -> bool {
        self.embedded_on_open > 0
    }

    /// Where the index is persisted.
    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// The `k` documents most similar to the query vector, best first, ties in index order.
    fn rank(&self, q: &[f32], k: usize) -> Vec<ScoredDocument> {
        let vectors = self.documents.iter().map(|d| d.embedding.as_slice());
        self.rank_by(q, vectors, k)
    }

    fn rank_by<'a>(
        &self,
        q: &[f32],
        vectors: impl Iterator<Item = &'a [f32]>,
        k: usize,
    ) -> Vec<ScoredDocument> {
        if k == 0 || q.iter().all(|x| *x == 0.0) {
            return Vec::new();
        }
        let mut scored: Vec<(usize, f32)> = vectors
            .enumerate()
            .map(|(i, v)| (i, cosine(q, v)))
            .collect();
        // A stable sort keeps CSV order among equal scores.
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored
            .into_iter()
            .take(k)
            .map(|(i, score)| {
                let d = &self.documents[i];
                ScoredDocument {
                    id: d.id.clone(),
                    text: d.text.clone(),
                    data: d.data.clone(),
                    score,
                }
            })
            .collect()
    }

    /// The `k` documents most similar to `query`, for local embedders (nothing otherwise, and
    /// nothing when the query has no searchable words). The synchronous core of
    /// [`KnowledgeStore::search`].
    pub fn top_k(&self, query: &str, k: usize) -> Vec<ScoredDocument> {
        match self.embedder.embed_local(query) {
            Some(q) => self.rank(&q, k),
            None => Vec::new(),
        }
    }
}

#[async_trait]
impl KnowledgeStore for EmbeddedStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn search(&self, query: &str, k: usize) -> Result<Vec<ScoredDocument>, PluginError> {
        if let Some(q) = self.embedder.embed_local(query) {
            return Ok(self.rank(&q, k));
        }
        // Spawned, so a caller that stops waiting (a retrieval budget) does not cancel the
        // call: its vector still lands in the embedder's cache for the next time.
        let embedder = self.embedder.clone();
        let texts = vec![query.to_owned()];
        let q = tokio::spawn(async move { embedder.embed(&texts).await })
            .await
            .map_err(|e| PluginError::internal("the embedding task failed").with_source(e))??
            .pop()
            .unwrap_or_default();
        let want = self.documents.first().map_or(0, |d| d.embedding.len());
        if q.len() != want {
            return Err(PluginError::external(format!(
                "embedder `{}` answered a {}-dimensional query vector, but the index of store `{}` holds {want}-dimensional ones; re-run `prompter kb ingest`",
                self.embedder.name(),
                q.len(),
                self.name
            )));
        }
        Ok(self.rank(&q, k))
    }

    async fn search_within(
        &self,
        query: &str,
        k: usize,
        budget: Option<Duration>,
    ) -> Result<(Vec<ScoredDocument>, Option<String>), PluginError> {
        let search = self.search(query, k);
        let why = match budget {
            None => match search.await {
                Ok(d) => return Ok((d, None)),
                Err(e) => format!("`{}` failed: {}", self.embedder.name(), e.message),
            },
            Some(b) => match tokio::time::timeout(b, search).await {
                Ok(Ok(d)) => return Ok((d, None)),
                Ok(Err(e)) => format!("`{}` failed: {}", self.embedder.name(), e.message),
                Err(_) => format!(
                    "`{}` did not embed the query within {} ms",
                    self.embedder.name(),
                    b.as_millis()
                ),
            },
        };
        let Some((lexical, vectors)) = &self.lexical else {
            return Err(PluginError::external(why));
        };
        tracing::warn!(store = %self.name, reason = %why, "Ranking by words: the embedder is unavailable.");
        let q = lexical.embed(query);
        let docs = self.rank_by(&q, vectors.iter().map(Vec::as_slice), k);
        Ok((
            docs,
            Some(format!("{why}; documents ranked by shared words")),
        ))
    }
}

/// Lexical vectors of `documents` when `embedder` is remote (local ones never fail).
fn lexical_index(
    embedder: &dyn Embedder,
    documents: &[Document],
) -> Option<(HashingEmbedder, Vec<Vec<f32>>)> {
    if embedder.embed_local("probe").is_some() {
        return None;
    }
    let lexical = HashingEmbedder::default();
    let vectors = documents.iter().map(|d| lexical.embed(&d.text)).collect();
    Some((lexical, vectors))
}

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

/// Reads and validates a knowledge-base CSV.
fn read_csv(path: &Path) -> Result<Vec<(String, String)>, StoreError> {
    let bytes = fs::read(path).map_err(|e| StoreError::Io {
        action: "read",
        path: path.to_owned(),
        source: e,
    })?;
    read_rows(path, &bytes)
}

/// Every document must have the length of the first.
fn check_dims(documents: &[Document], embedder: &str) -> Result<(), StoreError> {
    let Some(first) = documents.first() else {
        return Ok(());
    };
    let want = first.embedding.len();
    match documents.iter().find(|d| d.embedding.len() != want) {
        Some(d) => Err(StoreError::DimsMismatch {
            embedder: embedder.to_owned(),
            want,
            got: d.embedding.len(),
        }),
        None => Ok(()),
    }
}

/// The documents of the index at `path` when it was built by `embedder`; empty when it is
/// missing, unreadable, corrupt, of another format or another embedder (then it is rebuilt).
fn load_index(path: &Path, embedder: &str) -> Vec<Document> {
    let Ok(bytes) = fs::read(path) else {
        return Vec::new();
    };
    match serde_json::from_slice::<IndexFile>(&bytes) {
        Ok(index) if index.format == INDEX_FORMAT && index.embedder == embedder => index.documents,
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!(index = %path.display(), error = %e, "Ignoring an unreadable index; it will be rebuilt.");
            Vec::new()
        }
    }
}

/// The `(text, data)` rows of the CSV, trimmed.
fn read_rows(path: &Path, bytes: &[u8]) -> Result<Vec<(String, String)>, StoreError> {
    let csv_error = |line: u64, message: String, source: Option<csv::Error>| StoreError::Csv {
        path: path.to_owned(),
        line,
        message,
        source,
    };
    let parse_error = |e: csv::Error| {
        let line = e.position().map_or(1, csv::Position::line);
        csv_error(line, format!("malformed CSV: {e}"), Some(e))
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let header = reader.headers().map_err(parse_error)?;
    if header.len() < 2 {
        return Err(csv_error(
            1,
            format!(
                "expected a header with at least 2 columns (`objection,guidance`), found {}",
                header.len()
            ),
            None,
        ));
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(parse_error)?;
        let line = record.position().map_or(0, csv::Position::line);
        let text = record.get(0).unwrap_or_default();
        let data = record.get(1);
        match data {
            None => {
                return Err(csv_error(
                    line,
                    format!(
                        "expected 2 columns (text, data), found {}; quote fields that contain commas",
                        record.len()
                    ),
                    None,
                ));
            }
            Some(_) if text.is_empty() => {
                return Err(csv_error(
                    line,
                    "the first column (text) is empty".into(),
                    None,
                ));
            }
            Some(data) => rows.push((text.to_owned(), data.to_owned())),
        }
    }
    if rows.is_empty() {
        return Err(StoreError::EmptyKnowledgeBase {
            path: path.to_owned(),
        });
    }
    Ok(rows)
}

/// Writes `index` to a temporary file in the target's folder, then renames it over the target,
/// so a reader (another engine starting at the same time) never sees a half-written index.
fn write_atomically(path: &Path, index: &IndexFile) -> Result<(), StoreError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| StoreError::Io {
            action: "write the index to",
            path,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let bytes = serde_json::to_vec(index).map_err(|e| io(path)(std::io::Error::other(e)))?;
    let file_name = path
        .file_name()
        .map_or_else(|| "index".into(), |n| n.to_string_lossy());
    let tmp = dir.join(format!(
        ".{file_name}.{}.{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        // Best effort: the temporary file may not even exist.
        let _ = fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    Ok(())
}

/// A stable id for a row: the first 12 hex characters of sha256 of its text and data, so ids
/// survive reordering the CSV.
fn document_id(text: &str, data: &str) -> String {
    let mut h = Sha256::new();
    h.update(text.as_bytes());
    // A separator that cannot appear in trimmed CSV text, so ("ab", "c") and ("a", "bc") differ.
    h.update([0x1f]);
    h.update(data.as_bytes());
    let mut id = hex(&h.finalize());
    id.truncate(12);
    id
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A file name for the store's default index: the store name with anything unusual replaced.
fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KB: &str = "objection,guidance\n\
\"Budget Constraints: we don't have the budget this quarter, it's too expensive\",\"Quantify the cost of the current process and offer a phased rollout.\"\n\
\"Competitor Comparison: another vendor quoted us lower\",\"Compare total cost of ownership, not license price.\"\n\
\"Security Concerns: where is our data stored and who can access it\",\"Share the security whitepaper and offer a call with the security team.\"\n\
\"Timing: call me back next quarter, now is not a good time\",\"Ask what changes next quarter and agree on a concrete follow-up date.\"\n";

    fn config(source: &str) -> EmbeddedStoreConfig {
        EmbeddedStoreConfig::with_source(source)
    }

    fn open_with(
        name: &str,
        cfg: EmbeddedStoreConfig,
        dir: &Path,
    ) -> Result<EmbeddedStore, StoreError> {
        let e = EmbeddedStore::local_embedder(cfg.dims);
        EmbeddedStore::open(name, cfg, dir, e)
    }

    fn open_kb(dir: &Path, csv: &str) -> Result<EmbeddedStore, StoreError> {
        fs::write(dir.join("kb.csv"), csv).unwrap();
        open_with("sales", config("kb.csv"), dir)
    }

    #[test]
    fn tracker_queries_find_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_kb(dir.path(), KB).unwrap();
        assert_eq!(store.len(), 4);
        assert!(!store.is_empty());
        for (query, prefix) in [
            ("Budget Constraints", "Budget Constraints:"),
            ("Budget Constraints: seems expensive", "Budget Constraints:"),
            ("Competitor Comparison", "Competitor Comparison:"),
            ("Security Concerns", "Security Concerns:"),
            ("Timing", "Timing:"),
        ] {
            let docs = store.top_k(query, 2);
            assert_eq!(docs.len(), 2);
            assert!(docs[0].text.starts_with(prefix), "{query}: {docs:?}");
            assert!(docs[0].score > docs[1].score, "{query}: {docs:?}");
        }
        let budget = &store.top_k("Budget Constraints", 1)[0];
        assert!(budget.data.starts_with("Quantify the cost"));
        assert_eq!(budget.id.len(), 12);
        assert!(store.top_k("the and of", 3).is_empty());
        assert!(store.top_k("budget", 0).is_empty());
        assert_eq!(store.top_k("budget", 50).len(), 4);
    }

    #[test]
    fn ties_keep_csv_order_and_ids_survive_reordering() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_kb(dir.path(), "q,a\nsame words,first\nsame words,second\n").unwrap();
        let docs = store.top_k("same words", 2);
        assert_eq!(docs[0].data, "first");
        assert_eq!(docs[0].score, docs[1].score);
        let id_first = docs[0].id.clone();
        let reordered = open_kb(dir.path(), "q,a\nsame words,second\nsame words,first\n").unwrap();
        let docs = reordered.top_k("same words", 2);
        assert_eq!(docs[1].id, id_first);
        assert_ne!(docs[0].id, docs[1].id);
    }

    #[test]
    fn index_is_persisted_reused_and_rebuilt_when_the_csv_changes() {
        let dir = tempfile::tempdir().unwrap();
        let first = open_kb(dir.path(), KB).unwrap();
        assert!(first.rebuilt());
        let index = dir.path().join(".prompter/index/sales.json");
        assert_eq!(first.index_path(), index);
        assert!(index.is_file());

        let second = open_kb(dir.path(), KB).unwrap();
        assert!(!second.rebuilt());
        assert_eq!(second.documents, first.documents);

        let edited = KB.replace("phased rollout", "starter package");
        let third = open_kb(dir.path(), &edited).unwrap();
        // Only the edited row is embedded again.
        assert_eq!(third.embedded_on_open(), 1);
        assert!(
            third.top_k("Budget Constraints", 1)[0]
                .data
                .contains("starter package")
        );

        // Other dims: another embedder id, so the index is rebuilt.
        let mut cfg = config("kb.csv");
        cfg.dims = 256;
        let fourth = open_with("sales", cfg, dir.path()).unwrap();
        assert!(fourth.rebuilt());
        assert_eq!(fourth.documents[0].embedding.len(), 256);

        // No temporary files are left behind.
        let leftovers: Vec<_> = fs::read_dir(index.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, [std::ffi::OsString::from("sales.json")]);
    }

    #[test]
    fn a_corrupt_index_is_rebuilt_and_a_custom_path_is_used() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("kb.csv"), KB).unwrap();
        let mut cfg = config("kb.csv");
        cfg.index = Some("custom/idx.json".into());
        let index = dir.path().join("custom/idx.json");
        fs::create_dir_all(index.parent().unwrap()).unwrap();
        fs::write(&index, "{ not json").unwrap();
        let store = open_with("sales", cfg.clone(), dir.path()).unwrap();
        assert!(store.rebuilt());
        let again = open_with("sales", cfg, dir.path()).unwrap();
        assert!(!again.rebuilt());
    }

    #[test]
    fn malformed_csvs_are_errors_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_kb(
            dir.path(),
            "objection,guidance\n\"Budget: too expensive\",\"Offer a pilot.\"\nonly one column\n",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Csv { line: 3, .. }), "{err:?}");
        assert!(msg.contains("kb.csv` line 3: expected 2 columns"), "{msg}");

        let err = open_kb(dir.path(), "objection,guidance\n\"\",\"Offer a pilot.\"\n").unwrap_err();
        assert!(matches!(err, StoreError::Csv { line: 2, .. }), "{err:?}");

        let err = open_kb(dir.path(), "objection\nBudget\n").unwrap_err();
        assert!(
            err.to_string().contains("line 1: expected a header"),
            "{err}"
        );

        let err = open_kb(dir.path(), "objection,guidance\n").unwrap_err();
        assert!(
            matches!(err, StoreError::EmptyKnowledgeBase { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("kb.csv` has no documents"),
            "{err}"
        );

        let err = open_with("sales", config("missing.csv"), dir.path()).unwrap_err();
        assert!(err.to_string().starts_with("cannot read `"), "{err}");
        assert!(err.to_string().contains("missing.csv"), "{err}");

        let mut cfg = config("kb.csv");
        cfg.dims = 0;
        let err = open_with("sales", cfg, dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::InvalidDims(0)));
    }

    #[test]
    fn a_repeated_row_is_one_document_and_reopening_embeds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let csv = "q,a\nBudget: too expensive,Offer a pilot.\nBudget: too expensive,Offer a pilot.\nTiming: later,Agree a date.\n";
        let first = open_kb(dir.path(), csv).unwrap();
        assert_eq!((first.len(), first.embedded_on_open()), (2, 2));
        let again = open_kb(dir.path(), csv).unwrap();
        assert_eq!((again.len(), again.embedded_on_open()), (2, 0));
        assert_eq!(again.top_k("Budget", 2)[1].text, "Timing: later");
    }

    #[test]
    fn any_two_column_header_is_accepted_and_extra_columns_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_kb(
            dir.path(),
            "question,answer,notes\n\"Refund Request: money back\",\"Confirm the policy.\",x\n",
        )
        .unwrap();
        assert_eq!(
            store.top_k("Refund Request", 1)[0].data,
            "Confirm the policy."
        );
    }

    #[test]
    fn config_rejects_unknown_fields_and_defaults_dims() {
        let cfg: EmbeddedStoreConfig = serde_json::from_str(r#"{"source": "kb.csv"}"#).unwrap();
        assert_eq!(cfg.embedder, None);
        assert_eq!(cfg, config("kb.csv"));
        assert!(
            serde_json::from_str::<EmbeddedStoreConfig>(r#"{"source": "a", "dim": 3}"#).is_err()
        );
    }

    /// A remote-like embedder (no local embedding) that counts what it embeds and can fail
    /// after a number of texts.
    struct Remote {
        inner: HashingEmbedder,
        calls: AtomicU64,
        texts: AtomicU64,
        fail_after: Option<u64>,
    }

    impl Remote {
        fn new(fail_after: Option<u64>) -> Arc<Remote> {
            Arc::new(Remote {
                inner: HashingEmbedder::default(),
                calls: AtomicU64::new(0),
                texts: AtomicU64::new(0),
                fail_after,
            })
        }
    }

    #[async_trait]
    impl Embedder for Remote {
        fn name(&self) -> &str {
            "remote"
        }
        fn id(&self) -> String {
            "remote-v1".into()
        }
        fn dims(&self) -> Option<usize> {
            Some(1024)
        }
        fn max_batch(&self) -> usize {
            2
        }
        async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
            let before = self.texts.fetch_add(texts.len() as u64, Ordering::SeqCst);
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self
                .fail_after
                .is_some_and(|n| before + texts.len() as u64 > n)
            {
                return Err(PluginError::external(
                    "Nebula `/v1/model/embed` failed: 503",
                ));
            }
            Ok(texts.iter().map(|t| self.inner.embed(t)).collect())
        }
    }

    fn sequential() -> IngestOptions {
        IngestOptions {
            batch_size: 32,
            concurrency: 1,
            append: false,
        }
    }

    #[tokio::test]
    async fn a_remote_store_needs_an_ingest_then_serves_it_and_reingests_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("kb.csv"), KB).unwrap();
        let cfg = config("kb.csv");
        let remote = Remote::new(None);
        let err =
            EmbeddedStore::open("sales", cfg.clone(), dir.path(), remote.clone()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "4 of 4 rows of `{0}` are not embedded by `remote-v1` yet: run `prompter kb ingest {0} --store sales`",
                dir.path().join("kb.csv").display()
            )
        );
        assert_eq!(
            remote.calls.load(Ordering::SeqCst),
            0,
            "opening never calls the embedder"
        );

        let seen = std::sync::Mutex::new(Vec::new());
        let csv = dir.path().join("kb.csv");
        let report = ingest(
            "sales",
            &cfg,
            dir.path(),
            remote.clone(),
            &csv,
            IngestOptions::default(),
            &|d, t| {
                seen.lock().unwrap().push((d, t));
            },
        )
        .await
        .unwrap();
        assert_eq!(
            (report.rows, report.embedded, report.reused, report.removed),
            (4, 4, 0, 0)
        );
        // max_batch 2: two calls, progress after each.
        assert_eq!(remote.calls.load(Ordering::SeqCst), 2);
        assert_eq!(*seen.lock().unwrap(), [(0, 4), (2, 4), (4, 4)]);

        let store = EmbeddedStore::open("sales", cfg.clone(), dir.path(), remote.clone()).unwrap();
        assert_eq!(store.len(), 4);
        let docs = store.search("Timing", 1).await.unwrap();
        assert!(docs[0].text.starts_with("Timing:"), "{docs:?}");

        // Unchanged: nothing embedded. One row edited: one embedded, the old one removed.
        let again = ingest(
            "sales",
            &cfg,
            dir.path(),
            remote.clone(),
            &csv,
            sequential(),
            &|_, _| {},
        )
        .await
        .unwrap();
        assert_eq!((again.embedded, again.reused, again.removed), (0, 4, 0));
        fs::write(&csv, KB.replace("phased rollout", "starter package")).unwrap();
        let edited = ingest(
            "sales",
            &cfg,
            dir.path(),
            remote.clone(),
            &csv,
            sequential(),
            &|_, _| {},
        )
        .await
        .unwrap();
        assert_eq!(
            (
                edited.embedded,
                edited.reused,
                edited.removed,
                edited.documents
            ),
            (1, 3, 1, 4)
        );
        // 4 rows, the "Timing" query, the edited row.
        assert_eq!(remote.texts.load(Ordering::SeqCst), 6);
    }

    #[tokio::test]
    async fn a_failed_ingest_keeps_what_was_embedded_and_a_rerun_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("kb.csv");
        fs::write(&csv, KB).unwrap();
        let mut cfg = config("kb.csv");
        cfg.source = None;
        let failing = Remote::new(Some(2));
        let err = ingest(
            "sales",
            &cfg,
            dir.path(),
            failing,
            &csv,
            sequential(),
            &|_, _| {},
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, StoreError::Embedding { saved: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("a re-run resumes"), "{err}");
        let partial =
            EmbeddedStore::open("sales", cfg.clone(), dir.path(), Remote::new(None)).unwrap();
        assert_eq!(partial.len(), 2);

        let remote = Remote::new(None);
        let report = ingest(
            "sales",
            &cfg,
            dir.path(),
            remote.clone(),
            &csv,
            sequential(),
            &|_, _| {},
        )
        .await
        .unwrap();
        assert_eq!((report.embedded, report.reused), (2, 2));
        assert_eq!(remote.texts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_store_without_source_or_index_says_to_ingest_and_append_keeps_old_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config("kb.csv");
        cfg.source = None;
        let err =
            EmbeddedStore::open("sales", cfg.clone(), dir.path(), Remote::new(None)).unwrap_err();
        assert!(
            err.to_string()
                .contains("run `prompter kb ingest FILE.csv --store sales`"),
            "{err}"
        );

        let a = dir.path().join("a.csv");
        let b = dir.path().join("b.csv");
        fs::write(&a, "q,a\nBudget: too expensive,Offer a pilot.\n").unwrap();
        fs::write(&b, "q,a\nTiming: next quarter,Agree on a date.\n").unwrap();
        let remote = Remote::new(None);
        ingest(
            "sales",
            &cfg,
            dir.path(),
            remote.clone(),
            &a,
            sequential(),
            &|_, _| {},
        )
        .await
        .unwrap();
        let append = IngestOptions {
            append: true,
            ..sequential()
        };
        let r = ingest(
            "sales",
            &cfg,
            dir.path(),
            remote.clone(),
            &b,
            append,
            &|_, _| {},
        )
        .await
        .unwrap();
        assert_eq!((r.documents, r.removed), (2, 0));
        let r = ingest(
            "sales",
            &cfg,
            dir.path(),
            remote,
            &b,
            sequential(),
            &|_, _| {},
        )
        .await
        .unwrap();
        assert_eq!((r.documents, r.removed), (1, 1));
    }
}
