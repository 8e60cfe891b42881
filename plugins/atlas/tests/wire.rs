//! Wire-level tests: the `atlas` store and the real MongoDB driver against MockupDB, a MongoDB
//! wire-protocol server in Python (the tool MongoDB's driver teams test with), asserting the
//! exact commands the driver sends and what the store makes of the answers.
//!
//! `tests/mockupdb_server.py` prints every command it receives as BSON (hex), so the assertions
//! compare types and key order too. It needs `python3` on PATH with MockupDB installed:
//! `python3 -m pip install mockupdb==1.8.1`. Without them these tests FAIL and say so.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::{Bson, Document, doc};
use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::{Embedder, KnowledgeStore, ScoredDocument};
use prompter_core::secret::Secret;
use prompter_store_atlas::{
    AtlasConfig, AtlasError, AtlasStore, IngestOptions, create_search_indexes_command, document_id,
    index_definition, ingest_document, vector_search_pipeline,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

const INSTALL: &str = "install it with `python3 -m pip install mockupdb==1.8.1`";

/// A running `mockupdb_server.py` and the commands it has received.
struct Mock {
    port: u16,
    commands: Arc<Mutex<Vec<Document>>>,
    // Dropping these closes the server's stdin (it exits) and kills it if it does not.
    _stdin: ChildStdin,
    _child: Child,
}

impl Mock {
    async fn start() -> Mock {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mockupdb_server.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `python3` for the MongoDB wire tests ({e}): install Python 3 and put `python3` on PATH, then {INSTALL}")
            });
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("MockupDB did not start within 30 s")
            .expect("reading MockupDB's output");
        let port = match first.as_deref().map(|l| l.split_once(' ')) {
            Some(Some(("READY", port))) => port.parse().expect("a port number"),
            Some(Some(("MISSING", what))) => {
                panic!("MockupDB is not installed for `python3` ({what}): {INSTALL}")
            }
            other => panic!("unexpected first line from MockupDB: {other:?}; {INSTALL}"),
        };
        let commands = Arc::new(Mutex::new(Vec::new()));
        let sink = commands.clone();
        // Ends when the server exits (its stdout closes).
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(rest) = line.strip_prefix("COMMAND ") else {
                    continue;
                };
                let hex = rest.split(' ').next().unwrap_or_default();
                let bytes: Vec<u8> = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect();
                let d = Document::from_reader(bytes.as_slice()).expect("a BSON document");
                sink.lock().expect("the command log").push(d);
            }
        });
        Mock {
            port,
            commands,
            _stdin: stdin,
            _child: child,
        }
    }

    fn config(&self) -> AtlasConfig {
        let uri = format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=5000",
            self.port
        );
        AtlasConfig::new(Secret::new(uri), "rta", "guidance", "test")
    }

    /// The commands named `name` received so far, waiting up to 5 s for at least `at_least`
    /// (the server prints a command before answering it, but the reader may lag).
    async fn commands(&self, name: &str, at_least: usize) -> Vec<Document> {
        for _ in 0..100 {
            let found: Vec<Document> = self
                .commands
                .lock()
                .expect("the command log")
                .iter()
                .filter(|d| d.keys().next().is_some_and(|k| k == name))
                .cloned()
                .collect();
            if found.len() >= at_least {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("MockupDB received fewer than {at_least} `{name}` commands");
    }

    fn clear(&self) {
        self.commands.lock().expect("the command log").clear();
    }
}

/// Without the session id (random per client), which the driver adds to most commands.
fn without_session(mut d: Document) -> Document {
    d.remove("lsid");
    d
}

/// A deterministic embedder: `[1, len % 7, 0.5]`, exactly representable in f32 and f64; counts
/// texts and can fail after a number of them.
struct TestEmbedder {
    id: &'static str,
    max_batch: usize,
    texts: AtomicUsize,
    fail_after: Option<usize>,
}

impl TestEmbedder {
    fn new(id: &'static str) -> Arc<TestEmbedder> {
        Arc::new(TestEmbedder {
            id,
            max_batch: 2,
            texts: AtomicUsize::new(0),
            fail_after: None,
        })
    }

    fn vector(text: &str) -> Vec<f32> {
        vec![1.0, (text.len() % 7) as f32, 0.5]
    }
}

#[async_trait]
impl Embedder for TestEmbedder {
    fn name(&self) -> &str {
        "test"
    }
    fn id(&self) -> String {
        self.id.into()
    }
    fn dims(&self) -> Option<usize> {
        None
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        let before = self.texts.fetch_add(texts.len(), Ordering::SeqCst);
        if self.fail_after.is_some_and(|n| before + texts.len() > n) {
            return Err(PluginError::external("embedding service answered 503"));
        }
        Ok(texts.iter().map(|t| Self::vector(t)).collect())
    }
}

#[tokio::test]
async fn search_sends_exactly_the_vector_search_aggregation_and_maps_the_results() {
    let mock = Mock::start().await;
    let config = mock.config();
    let store = AtlasStore::open("sales", config.clone(), TestEmbedder::new("test-v1")).unwrap();

    let docs = store.search("Budget Constraints", 2).await.unwrap();
    assert_eq!(
        docs,
        [
            ScoredDocument {
                id: "3f2a9c1b7d4e".into(),
                text: "Budget Constraints: it's too expensive".into(),
                data: "Quantify the cost of the current process and offer a phased rollout.".into(),
                score: 0.9375,
            },
            // Written by another tool: ObjectId, no text, structured data.
            ScoredDocument {
                id: "65f1c0ffee00000000000001".into(),
                text: String::new(),
                data: r#"{"tip":"Offer a pilot","weeks":4}"#.into(),
                score: 0.5,
            },
        ]
    );

    let sent = mock.commands("aggregate", 1).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    let pipeline: Vec<Bson> =
        vector_search_pipeline(&config, &TestEmbedder::vector("Budget Constraints"), 2)
            .into_iter()
            .map(Bson::Document)
            .collect();
    assert_eq!(
        without_session(sent[0].clone()),
        doc! {
            "aggregate": "guidance",
            "pipeline": pipeline,
            "cursor": {},
            "$db": "rta",
        }
    );
    let vs = sent[0].get_array("pipeline").unwrap()[0]
        .as_document()
        .unwrap()
        .get_document("$vectorSearch")
        .unwrap();
    assert_eq!(
        vs,
        &doc! {
            "index": "vector_index",
            "path": "embedding",
            "queryVector": [1.0_f64, 4.0_f64, 0.5_f64],
            "numCandidates": 100_i32,
            "limit": 2_i32,
        }
    );

    // The store's one client, built by the first search, serves the next.
    assert!(format!("{store:?}").contains("connected: true"));
    store.search("Timing", 1).await.unwrap();
    assert_eq!(mock.commands("aggregate", 2).await.len(), 2);
}

#[tokio::test]
async fn create_index_sends_create_search_indexes_with_the_vector_definition() {
    let mock = Mock::start().await;
    let store = AtlasStore::open("sales", mock.config(), TestEmbedder::new("test-v1")).unwrap();

    let created = store.create_index().await.unwrap();
    let definition = index_definition("embedding", 3, prompter_store_atlas::Similarity::Cosine);
    assert_eq!(created.name, "vector_index");
    assert_eq!(created.definition, definition);
    assert!(!created.already_existed);

    let create = mock.commands("create", 1).await;
    assert_eq!(
        without_session(create[0].clone()),
        doc! { "create": "guidance", "$db": "rta" }
    );
    let sent = mock.commands("createSearchIndexes", 1).await;
    let mut expected = create_search_indexes_command("guidance", "vector_index", definition);
    expected.insert("$db", "rta");
    assert_eq!(without_session(sent[0].clone()), expected);
    assert_eq!(
        sent[0].get_array("indexes").unwrap()[0]
            .as_document()
            .unwrap()
            .get_document("definition")
            .unwrap(),
        &doc! { "fields": [{ "type": "vector", "path": "embedding", "numDimensions": 3_i32, "similarity": "cosine" }] }
    );

    let status = store
        .wait_until_queryable(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(status.queryable);
    assert_eq!(status.status, "READY");
    let listed = mock.commands("aggregate", 1).await;
    assert_eq!(
        listed[0].get_array("pipeline").unwrap()[0],
        Bson::Document(doc! { "$listSearchIndexes": { "name": "vector_index" } })
    );
}

const KB: &str = "objection,guidance\n\
\"Budget Constraints: we don't have the budget this quarter\",\"Quantify the cost of the current process and offer a phased rollout.\"\n\
\"Competitor Comparison: another vendor quoted us lower\",\"Compare total cost of ownership, not license price.\"\n\
\"Security Concerns: where is our data stored\",\"Share the security whitepaper.\"\n\
\"Timing: call me back next quarter\",\"Agree on a concrete follow-up date.\"\n";

fn sequential() -> IngestOptions {
    IngestOptions {
        batch_size: 32,
        concurrency: 1,
        append: false,
    }
}

#[tokio::test]
async fn ingest_writes_documents_with_embeddings_and_reruns_embed_only_changes() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("kb.csv");
    std::fs::write(&csv, KB).unwrap();
    let config = mock.config();
    let embedder = TestEmbedder::new("test-v1");
    let store = AtlasStore::open("sales", config.clone(), embedder.clone()).unwrap();

    // First run: everything embedded, in batches of the embedder's max_batch (2).
    let seen = Mutex::new(Vec::new());
    let options = IngestOptions {
        batch_size: 32,
        concurrency: 2,
        append: false,
    };
    let report = store
        .ingest(&csv, options, &|d, t| seen.lock().unwrap().push((d, t)))
        .await
        .unwrap();
    assert_eq!(
        (
            report.rows,
            report.embedded,
            report.reused,
            report.removed,
            report.documents
        ),
        (4, 4, 0, 0, 4)
    );
    assert_eq!(report.dims, Some(3));
    assert_eq!(report.namespace, "rta.guidance");
    assert_eq!(*seen.lock().unwrap(), [(0, 4), (2, 4), (4, 4)]);

    // Only `_id` and `embedder` of the CSV's rows are read back.
    let rows = prompter_store_atlas::read_csv(&csv).unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let find = mock.commands("find", 1).await;
    assert_eq!(
        find[0].get_document("filter").unwrap(),
        &doc! { "_id": { "$in": ids.clone() } }
    );
    assert_eq!(
        find[0].get_document("projection").unwrap(),
        &doc! { "_id": 1_i32, "embedder": 1_i32 }
    );
    // Two inserts of two documents each, exactly as `ingest_document` builds them.
    let inserts = mock.commands("insert", 2).await;
    let mut written: Vec<Document> = inserts
        .iter()
        .flat_map(|i| i.get_array("documents").unwrap().clone())
        .map(|b| b.as_document().unwrap().clone())
        .collect();
    written.sort_by_key(|d| ids.iter().position(|id| Ok(*id) == d.get_str("_id")));
    let expected: Vec<Document> = rows
        .iter()
        .map(|r| {
            ingest_document(
                &config,
                &r.id,
                &r.text,
                &r.data,
                &TestEmbedder::vector(&r.text),
                "test-v1",
                "kb.csv",
            )
        })
        .collect();
    assert_eq!(written, expected);
    assert_eq!(
        written[0],
        doc! {
            "_id": document_id(&rows[0].text, &rows[0].data),
            "text": "Budget Constraints: we don't have the budget this quarter",
            "data": "Quantify the cost of the current process and offer a phased rollout.",
            "embedding": [1.0_f64, 1.0_f64, 0.5_f64],
            "embedder": "test-v1",
            "source": "kb.csv",
        }
    );
    assert!(inserts.iter().all(|i| i.get_bool("ordered") == Ok(false)));
    // Removal is limited to documents this command wrote (they have `source`).
    let delete = mock.commands("delete", 1).await;
    assert_eq!(
        delete[0].get_array("deletes").unwrap()[0]
            .as_document()
            .unwrap()
            .get_document("q")
            .unwrap(),
        &doc! { "source": { "$exists": true }, "_id": { "$nin": ids.clone() } }
    );

    // Unchanged CSV: nothing embedded, nothing written.
    mock.clear();
    let again = store.ingest(&csv, sequential(), &|_, _| {}).await.unwrap();
    assert_eq!(
        (again.embedded, again.reused, again.removed, again.documents),
        (0, 4, 0, 4)
    );
    assert_eq!(embedder.texts.load(Ordering::SeqCst), 4);
    assert!(
        mock.commands
            .lock()
            .unwrap()
            .iter()
            .all(|c| !c.contains_key("insert"))
    );

    // A document another tool wrote is never removed.
    let client = mongodb::Client::with_uri_str(config.uri.expose())
        .await
        .unwrap();
    let coll = client.database("rta").collection::<Document>("guidance");
    coll.insert_one(
        doc! { "_id": "seed-row", "data": "From the seed script.", "embedding": [0.1] },
    )
    .await
    .unwrap();

    // One row edited: one embedded, the old one removed; the seed's row stays.
    std::fs::write(&csv, KB.replace("phased rollout", "starter package")).unwrap();
    let edited = store.ingest(&csv, sequential(), &|_, _| {}).await.unwrap();
    assert_eq!(
        (
            edited.embedded,
            edited.reused,
            edited.removed,
            edited.documents
        ),
        (1, 3, 1, 4)
    );
    assert_eq!(embedder.texts.load(Ordering::SeqCst), 5);
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 5);

    // Another embedder: every row is embedded again and replaced in place (upsert).
    mock.clear();
    let other = TestEmbedder::new("test-v2");
    let store2 = AtlasStore::open("sales", config.clone(), other.clone()).unwrap();
    let r = store2.ingest(&csv, sequential(), &|_, _| {}).await.unwrap();
    assert_eq!((r.embedded, r.reused, r.removed, r.documents), (4, 0, 0, 4));
    let updates = mock.commands("update", 4).await;
    let first = updates[0].get_array("updates").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(first.get_bool("upsert"), Ok(true));
    assert_eq!(
        first.get_document("u").unwrap().get_str("embedder"),
        Ok("test-v2")
    );
    assert_eq!(
        first.get_document("q").unwrap(),
        &doc! { "_id": first.get_document("u").unwrap().get_str("_id").unwrap() }
    );

    // Append another file: the old rows stay; without append they go.
    let b = dir.path().join("b.csv");
    std::fs::write(&b, "q,a\nPricing: too high,Show the ROI.\n").unwrap();
    let append = IngestOptions {
        append: true,
        ..sequential()
    };
    let r = store2.ingest(&b, append, &|_, _| {}).await.unwrap();
    assert_eq!((r.embedded, r.removed, r.documents), (1, 0, 5));
    let r = store2.ingest(&b, sequential(), &|_, _| {}).await.unwrap();
    assert_eq!((r.embedded, r.removed, r.documents), (0, 4, 1));
    assert_eq!(coll.count_documents(doc! {}).await.unwrap(), 2);
    assert_eq!(
        coll.find_one(doc! { "_id": "seed-row" })
            .await
            .unwrap()
            .unwrap()
            .get_str("data"),
        Ok("From the seed script.")
    );
}

#[tokio::test]
async fn a_failed_ingest_keeps_what_was_written_and_a_rerun_resumes() {
    let mock = Mock::start().await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("kb.csv");
    std::fs::write(&csv, KB).unwrap();
    let failing = Arc::new(TestEmbedder {
        id: "test-v1",
        max_batch: 2,
        texts: AtomicUsize::new(0),
        fail_after: Some(2),
    });
    let store = AtlasStore::open("sales", mock.config(), failing).unwrap();
    let err = store
        .ingest(&csv, sequential(), &|_, _| {})
        .await
        .unwrap_err();
    assert!(
        matches!(err, AtlasError::Embedding { saved: 2, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "knowledge store `sales`: embedding failed after 2 new rows were saved (a re-run resumes): embedding service answered 503"
    );
    // Nothing is removed after a failure.
    assert!(
        mock.commands
            .lock()
            .unwrap()
            .iter()
            .all(|c| !c.contains_key("delete"))
    );

    let embedder = TestEmbedder::new("test-v1");
    let store = AtlasStore::open("sales", mock.config(), embedder.clone()).unwrap();
    let r = store.ingest(&csv, sequential(), &|_, _| {}).await.unwrap();
    assert_eq!((r.embedded, r.reused, r.documents), (2, 2, 4));
    assert_eq!(embedder.texts.load(Ordering::SeqCst), 2);

    // A malformed CSV names the file and line, before any network call.
    std::fs::write(&csv, "objection,guidance\nonly one column\n").unwrap();
    let err = store
        .ingest(&csv, sequential(), &|_, _| {})
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "`{}` line 2: expected 2 columns (text, data), found 1; quote fields that contain commas",
            csv.display()
        )
    );
}
