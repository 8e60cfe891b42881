//! Tests of the parent module.
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
    assert!(serde_json::from_str::<EmbeddedStoreConfig>(r#"{"source": "a", "dim": 3}"#).is_err());
}

/// A remote-like embedder (no local embedding) that counts what it embeds and can fail
/// after a number of texts.
struct Remote {
    inner: HashingEmbedder,
    calls: AtomicU64,
    texts: AtomicU64,
    fail_after: Option<u64>,
    /// Milliseconds each call takes.
    delay_ms: AtomicU64,
}

impl Remote {
    fn new(fail_after: Option<u64>) -> Arc<Remote> {
        Arc::new(Remote {
            inner: HashingEmbedder::default(),
            calls: AtomicU64::new(0),
            texts: AtomicU64::new(0),
            fail_after,
            delay_ms: AtomicU64::new(0),
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
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
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
    let err = EmbeddedStore::open("sales", cfg.clone(), dir.path(), remote.clone()).unwrap_err();
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
    let partial = EmbeddedStore::open("sales", cfg.clone(), dir.path(), Remote::new(None)).unwrap();
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
    let err = EmbeddedStore::open("sales", cfg.clone(), dir.path(), Remote::new(None)).unwrap_err();
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

/// The stage meter of a test: nothing to count but the wait.
struct NoMeter;

impl prompter_core::meter::StageMeter for NoMeter {
    fn fallback(&self) {}
}

#[tokio::test]
async fn a_query_embedding_cut_by_the_budget_still_counts_as_the_stage_waiting() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("kb.csv"), KB).unwrap();
    let cfg = config("kb.csv");
    let remote = Remote::new(None);
    let csv = dir.path().join("kb.csv");
    ingest(
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
    let store = EmbeddedStore::open("sales", cfg, dir.path(), remote.clone()).unwrap();
    remote.delay_ms.store(400, Ordering::SeqCst);
    let budget = std::time::Duration::from_millis(100);
    let (found, waited) = prompter_core::meter::stage_scope(
        Arc::new(NoMeter),
        store.search_within("Timing: a fresh query", 1, Some(budget)),
    )
    .await;
    let (docs, degraded) = found.unwrap();
    assert_eq!(docs.len(), 1);
    assert!(degraded.is_some(), "ranked by words after the budget");
    // The embedding ran in its own task; the stage still waited for it, up to the budget.
    assert!(waited >= budget, "{waited:?}");
    assert!(waited < std::time::Duration::from_millis(400), "{waited:?}");
}

/// A model that runs on this machine but not per query on an async thread: it answers only
/// `embed_offline` (counted) and `embed`, never `embed_local`.
struct Offline {
    inner: HashingEmbedder,
    offline_texts: AtomicU64,
    fail: bool,
}

#[async_trait]
impl Embedder for Offline {
    fn name(&self) -> &str {
        "model"
    }
    fn id(&self) -> String {
        "model-v1".into()
    }
    fn dims(&self) -> Option<usize> {
        Some(1024)
    }
    fn embed_offline(&self, texts: &[String]) -> Option<Result<Vec<Vec<f32>>, PluginError>> {
        self.offline_texts
            .fetch_add(texts.len() as u64, Ordering::SeqCst);
        if self.fail {
            return Some(Err(PluginError::internal(
                "running the model: out of memory",
            )));
        }
        Some(Ok(texts.iter().map(|t| self.inner.embed(t)).collect()))
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        Ok(texts.iter().map(|t| self.inner.embed(t)).collect())
    }
}

#[tokio::test]
async fn a_local_model_store_embeds_new_rows_when_it_opens_and_keeps_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("kb.csv");
    fs::write(&csv, KB).unwrap();
    let model = Arc::new(Offline {
        inner: HashingEmbedder::default(),
        offline_texts: AtomicU64::new(0),
        fail: false,
    });
    let store = EmbeddedStore::open("sales", config("kb.csv"), dir.path(), model.clone()).unwrap();
    assert_eq!(store.len(), 4);
    assert_eq!(model.offline_texts.load(Ordering::SeqCst), 4);
    let docs = store.search("Security Concerns", 1).await.unwrap();
    assert!(docs[0].text.starts_with("Security Concerns:"), "{docs:?}");

    // One row edited in the middle: only it is embedded on the next start, and the rows keep
    // the CSV's order (equal scores rank in CSV order).
    let edited = KB.replace("phased rollout", "starter package");
    fs::write(&csv, &edited).unwrap();
    let store = EmbeddedStore::open("sales", config("kb.csv"), dir.path(), model.clone()).unwrap();
    assert_eq!(model.offline_texts.load(Ordering::SeqCst), 5);
    let order: Vec<String> = store.documents.iter().map(|d| d.data.clone()).collect();
    assert!(order[0].contains("starter package"), "{order:?}");
    assert!(order[3].starts_with("Ask what changes"), "{order:?}");

    // A model that fails while the store opens: the error says so; nothing half-written.
    fs::write(
        &csv,
        format!("{edited}\"Authority: I need to ask my boss\",\"Offer a deck.\"\n"),
    )
    .unwrap();
    let failing = Arc::new(Offline {
        inner: HashingEmbedder::default(),
        offline_texts: AtomicU64::new(0),
        fail: true,
    });
    let err = EmbeddedStore::open("sales", config("kb.csv"), dir.path(), failing).unwrap_err();
    assert_eq!(
        err.to_string(),
        "embedding the rows of store `sales` with `model-v1` failed: running the model: out of memory"
    );
    let store = EmbeddedStore::open("sales", config("kb.csv"), dir.path(), model.clone()).unwrap();
    assert_eq!(store.len(), 5);
    assert_eq!(model.offline_texts.load(Ordering::SeqCst), 6);
}
