//! The embedded knowledge store: a CSV embedded in process, its index persisted to a file.
//!
//! It owns reading the knowledge-base CSV, embedding its rows with [`HashingEmbedder`],
//! persisting the embeddings (so a restart does not re-embed an unchanged CSV) and answering
//! similarity searches. It does not own deciding what to search for (that is the `retrieve`
//! stage) nor semantic embeddings (a model provider, later).
//!
//! The index is a JSON file keyed by a content hash (sha256 of the CSV bytes and the embedder
//! id): editing the CSV or changing `dims` rebuilds it; a missing, corrupt or foreign index is
//! rebuilt too, never an error.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::{KnowledgeStore, ScoredDocument};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::embedder::{HashingEmbedder, cosine};

/// Query embeddings kept before the cache is cleared; tracker names repeat, so a small cache
/// catches nearly every query.
const QUERY_CACHE_CAPACITY: usize = 1024;
/// Largest accepted `dims`: beyond it the index grows with no gain for short texts.
pub const MAX_DIMS: usize = 65_536;
/// Version of the index file layout; part of the validity check.
const INDEX_FORMAT: u32 = 1;

/// Configuration of an `embedded` knowledge store (`knowledge.<name>.config`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedStoreConfig {
    /// The knowledge-base CSV: a header row, then one document per row; the first column is the
    /// text that is embedded and searched (the objection), the second the data returned with it
    /// (the guidance). Relative paths resolve against the engine config's folder.
    pub source: PathBuf,
    /// Where the built index is persisted. Default: `.prompter/index/<store name>.json` in the
    /// engine config's folder.
    #[serde(default)]
    pub index: Option<PathBuf>,
    /// Dimensions of the embeddings, 1 to 65536. Default 1024.
    #[serde(default = "default_dims")]
    pub dims: usize,
}

fn default_dims() -> usize {
    HashingEmbedder::DEFAULT_DIMS
}

/// Why an embedded store could not be opened.
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
    content_hash: String,
    embedder: String,
    documents: Vec<Document>,
}

/// An in-process knowledge store over a CSV; see the module docs.
#[derive(Debug)]
pub struct EmbeddedStore {
    name: String,
    embedder: HashingEmbedder,
    documents: Vec<Document>,
    index_path: PathBuf,
    rebuilt: bool,
    query_cache: Mutex<HashMap<String, Arc<[f32]>>>,
}

impl EmbeddedStore {
    /// Opens store `name`: reads and validates the CSV, then loads the persisted index when it
    /// matches the CSV, or embeds every row and persists a new index. Relative paths resolve
    /// against `base_dir`. Synchronous: it runs once, at engine start.
    ///
    /// # Errors
    /// The CSV cannot be read or is malformed (naming the file and line), has no rows, `dims`
    /// is out of range, or the index cannot be written.
    pub fn open(
        name: &str,
        config: EmbeddedStoreConfig,
        base_dir: &Path,
    ) -> Result<EmbeddedStore, StoreError> {
        if !(1..=MAX_DIMS).contains(&config.dims) {
            return Err(StoreError::InvalidDims(config.dims));
        }
        let embedder = HashingEmbedder::new(config.dims);
        let source = base_dir.join(&config.source);
        let index_path = match &config.index {
            Some(p) => base_dir.join(p),
            None => base_dir
                .join(".prompter")
                .join("index")
                .join(format!("{}.json", file_stem(name))),
        };

        let bytes = fs::read(&source).map_err(|e| StoreError::Io {
            action: "read",
            path: source.clone(),
            source: e,
        })?;
        let rows = read_rows(&source, &bytes)?;
        let content_hash = {
            let mut h = Sha256::new();
            h.update(&bytes);
            h.update([0]);
            h.update(embedder.id().as_bytes());
            hex(&h.finalize())
        };

        let (documents, rebuilt) = match load_index(&index_path, &content_hash, &embedder, &rows) {
            Some(documents) => (documents, false),
            None => {
                let documents: Vec<Document> = rows
                    .into_iter()
                    .map(|(text, data)| Document {
                        id: document_id(&text, &data),
                        embedding: embedder.embed(&text),
                        text,
                        data,
                    })
                    .collect();
                let index = IndexFile {
                    format: INDEX_FORMAT,
                    content_hash,
                    embedder: embedder.id(),
                    documents,
                };
                write_atomically(&index_path, &index)?;
                (index.documents, true)
            }
        };
        Ok(EmbeddedStore {
            name: name.to_owned(),
            embedder,
            documents,
            index_path,
            rebuilt,
            query_cache: Mutex::new(HashMap::new()),
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

    /// Whether [`EmbeddedStore::open`] had to embed the rows (no valid index matched the CSV).
    pub fn rebuilt(&self) -> bool {
        self.rebuilt
    }

    /// Where the index is persisted.
    pub fn index_path(&self) -> &Path {
        &self.index_path
    }

    /// The embedder of this store.
    pub fn embedder(&self) -> &HashingEmbedder {
        &self.embedder
    }

    /// The `k` documents most similar to `query`, best first, ties in CSV order; nothing when
    /// the query has no searchable words. The synchronous core of [`KnowledgeStore::search`].
    pub fn top_k(&self, query: &str, k: usize) -> Vec<ScoredDocument> {
        if k == 0 {
            return Vec::new();
        }
        let q = self.query_embedding(query);
        if q.iter().all(|x| *x == 0.0) {
            return Vec::new();
        }
        let mut scored: Vec<(usize, f32)> = self
            .documents
            .iter()
            .enumerate()
            .map(|(i, d)| (i, cosine(&q, &d.embedding)))
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

    fn query_embedding(&self, query: &str) -> Arc<[f32]> {
        // A poisoned cache is still a valid cache: every entry was inserted whole.
        let mut cache = self
            .query_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = cache.get(query) {
            return Arc::clone(v);
        }
        if cache.len() >= QUERY_CACHE_CAPACITY {
            cache.clear();
        }
        let v: Arc<[f32]> = self.embedder.embed(query).into();
        cache.insert(query.to_owned(), Arc::clone(&v));
        v
    }
}

#[async_trait]
impl KnowledgeStore for EmbeddedStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn search(&self, query: &str, k: usize) -> Result<Vec<ScoredDocument>, PluginError> {
        Ok(self.top_k(query, k))
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

/// The persisted documents when the index at `path` was built from these exact rows by this
/// embedder; `None` (rebuild) when it is missing, unreadable, corrupt or stale.
fn load_index(
    path: &Path,
    content_hash: &str,
    embedder: &HashingEmbedder,
    rows: &[(String, String)],
) -> Option<Vec<Document>> {
    let bytes = fs::read(path).ok()?;
    let index: IndexFile = serde_json::from_slice(&bytes).ok()?;
    let valid = index.format == INDEX_FORMAT
        && index.content_hash == content_hash
        && index.embedder == embedder.id()
        && index.documents.len() == rows.len()
        && index.documents.iter().zip(rows).all(|(d, (text, data))| {
            d.text == *text && d.data == *data && d.embedding.len() == embedder.dims()
        });
    valid.then_some(index.documents)
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
        EmbeddedStoreConfig {
            source: source.into(),
            index: None,
            dims: 1024,
        }
    }

    fn open_kb(dir: &Path, csv: &str) -> Result<EmbeddedStore, StoreError> {
        fs::write(dir.join("kb.csv"), csv).unwrap();
        EmbeddedStore::open("sales", config("kb.csv"), dir)
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
        assert!(third.rebuilt());
        assert!(
            third.top_k("Budget Constraints", 1)[0]
                .data
                .contains("starter package")
        );

        // Other dims: another embedder id, so the index is rebuilt.
        let mut cfg = config("kb.csv");
        cfg.dims = 256;
        let fourth = EmbeddedStore::open("sales", cfg, dir.path()).unwrap();
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
        let store = EmbeddedStore::open("sales", cfg.clone(), dir.path()).unwrap();
        assert!(store.rebuilt());
        let again = EmbeddedStore::open("sales", cfg, dir.path()).unwrap();
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

        let err = EmbeddedStore::open("sales", config("missing.csv"), dir.path()).unwrap_err();
        assert!(err.to_string().starts_with("cannot read `"), "{err}");
        assert!(err.to_string().contains("missing.csv"), "{err}");

        let mut cfg = config("kb.csv");
        cfg.dims = 0;
        let err = EmbeddedStore::open("sales", cfg, dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::InvalidDims(0)));
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
        assert_eq!(cfg, config("kb.csv"));
        assert!(
            serde_json::from_str::<EmbeddedStoreConfig>(r#"{"source": "a", "dim": 3}"#).is_err()
        );
    }
}
