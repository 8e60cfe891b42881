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
use std::time::Duration;

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::{CachedEmbedder, Embedder, KnowledgeStore, ScoredDocument};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::embedder::{HashingEmbedder, LocalEmbedder, MAX_DIMS, cosine_with_norms, norm};

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
    /// The embedder failed while a store embedded its rows on opening; nothing was written.
    #[error("embedding the rows of store `{store}` with `{embedder}` failed: {source}")]
    OpenEmbedding {
        /// The store.
        store: String,
        /// The embedder's id.
        embedder: String,
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
    /// The L2 norm of each document's embedding, computed once so a search does one pass per
    /// document, not three.
    norms: Vec<f32>,
    /// Lexical vectors of the documents and their norms, for remote embedders only: when the
    /// embedder fails or is too slow, the store still ranks by words (and says so).
    lexical: Option<(HashingEmbedder, Vec<Normed>)>,
}

/// A vector and its L2 norm.
type Normed = (Vec<f32>, f32);

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
                norms: norms(&indexed),
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
        // Rows already in the index keep their vectors; the others are embedded here when the
        // embedder needs no network, and take their place in CSV order, so the index is the
        // same either way.
        let mut slots: Vec<Option<Document>> = Vec::with_capacity(rows.len());
        let mut new_rows: Vec<(usize, String, String)> = Vec::new();
        let mut texts: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for (text, data) in rows {
            let id = document_id(&text, &data);
            // A row repeated in the CSV is one document (as `ingest` counts it).
            if !seen.insert(id.clone()) {
                continue;
            }
            let known = known.remove(&id);
            if known.is_none() {
                new_rows.push((slots.len(), id, data));
                texts.push(text);
            }
            slots.push(known);
        }
        let embedded = texts.len();
        if embedded > 0 {
            // A model takes milliseconds a row: say what the start is waiting on.
            let slow = !computes_in_place(embedder.as_ref());
            let started = std::time::Instant::now();
            if slow {
                tracing::info!(store = name, rows = embedded, embedder = %embedder_id, "Embedding the rows the index lacks.");
            }
            let vectors = match embedder.embed_offline(&texts) {
                Some(Ok(v)) if v.len() == embedded => v,
                Some(Ok(v)) => {
                    return Err(StoreError::OpenEmbedding {
                        store: name.to_owned(),
                        source: PluginError::internal(format!(
                            "{} vectors for {embedded} rows",
                            v.len()
                        )),
                        embedder: embedder_id,
                    });
                }
                Some(Err(source)) => {
                    return Err(StoreError::OpenEmbedding {
                        store: name.to_owned(),
                        embedder: embedder_id,
                        source,
                    });
                }
                None => {
                    return Err(StoreError::NotIngested {
                        store: name.to_owned(),
                        source_file: source,
                        missing: embedded,
                        total: slots.len(),
                        embedder: embedder_id,
                    });
                }
            };
            if slow {
                tracing::info!(
                    store = name,
                    rows = embedded,
                    ms = started.elapsed().as_millis() as u64,
                    "Embedded the new rows."
                );
            }
            for ((slot, id, data), (text, embedding)) in
                new_rows.into_iter().zip(texts.into_iter().zip(vectors))
            {
                slots[slot] = Some(Document {
                    id,
                    text,
                    data,
                    embedding,
                });
            }
        }
        let documents: Vec<Document> = slots.into_iter().flatten().collect();
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
            norms: norms(&documents),
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
        let vectors = self
            .documents
            .iter()
            .zip(&self.norms)
            .map(|(d, n)| (d.embedding.as_slice(), *n));
        self.rank_by(q, vectors, k)
    }

    /// Ranks the documents by the cosine of `q` with their `(vector, norm)`, in document order.
    fn rank_by<'a>(
        &self,
        q: &[f32],
        vectors: impl Iterator<Item = (&'a [f32], f32)>,
        k: usize,
    ) -> Vec<ScoredDocument> {
        let q_norm = norm(q);
        if k == 0 || q_norm == 0.0 {
            return Vec::new();
        }
        let mut scored: Vec<(usize, f32)> = vectors
            .enumerate()
            .map(|(i, (v, n))| (i, cosine_with_norms(q, q_norm, v, n)))
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
        // call: its vector still lands in the embedder's cache for the next time. The wait is
        // reported to the stage from here (the spawned task is outside the stage's scope),
        // also when the budget ends it.
        let embedder = self.embedder.clone();
        let texts = vec![query.to_owned()];
        let waiting = prompter_core::meter::Waiting::start();
        let embedded = tokio::spawn(async move { embedder.embed(&texts).await }).await;
        drop(waiting);
        let q = embedded
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
        let docs = self.rank_by(&q, vectors.iter().map(|(v, n)| (v.as_slice(), *n)), k);
        Ok((
            docs,
            Some(format!("{why}; documents ranked by shared words")),
        ))
    }
}

/// The L2 norm of every document's embedding, in order.
fn norms(documents: &[Document]) -> Vec<f32> {
    documents.iter().map(|d| norm(&d.embedding)).collect()
}

/// Lexical vectors of `documents`, with their norms, when `embedder` is remote (local ones never
/// fail).
fn lexical_index(
    embedder: &dyn Embedder,
    documents: &[Document],
) -> Option<(HashingEmbedder, Vec<Normed>)> {
    if computes_in_place(embedder) {
        return None;
    }
    let lexical = HashingEmbedder::default();
    let vectors = documents
        .iter()
        .map(|d| {
            let v = lexical.embed(&d.text);
            let n = norm(&v);
            (v, n)
        })
        .collect();
    Some((lexical, vectors))
}

/// Whether `embedder` answers on the caller's thread at no real cost (`embed_local`, the
/// lexical embedder), unlike a model or a remote service.
fn computes_in_place(embedder: &dyn Embedder) -> bool {
    embedder.embed_local("probe").is_some()
}

/// Reads and validates a knowledge-base CSV.
pub fn read_csv(path: &Path) -> Result<Vec<(String, String)>, StoreError> {
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

mod ingest;
#[cfg(test)]
mod tests;

pub use ingest::{IngestOptions, IngestReport, ingest};
