//! The `atlas` store against a real Atlas cluster: runs only when `MONGODB_URI` is set (an Atlas
//! connection string whose user may create collections and search indexes), and otherwise
//! prints that it was skipped and why.
//!
//! It ingests a 3-row CSV into a throwaway collection (`prompter_test_<pid>_<time>` in the
//! database `MONGODB_TEST_DATABASE`, default `prompter_test`) with the deterministic local
//! lexical embedder, creates the Vector Search index, waits until it is queryable, searches,
//! and drops the collection, whatever happened.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prompter_core::resource::{Embedder, KnowledgeStore};
use prompter_core::secret::Secret;
use prompter_plugin_retrieve::{HashingEmbedder, LocalEmbedder};
use prompter_store_atlas::{AtlasConfig, AtlasError, AtlasStore, IngestOptions};

const KB: &str = "objection,guidance\n\
\"Budget Constraints: we don't have the budget this quarter, it's too expensive\",\"Quantify the cost of the current process and offer a phased rollout.\"\n\
\"Security Concerns: where is our data stored and who can access it\",\"Share the security whitepaper and offer a call with the security team.\"\n\
\"Timing: call me back next quarter, now is not a good time\",\"Ask what changes next quarter and agree on a concrete follow-up date.\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_atlas_cluster_ingests_indexes_and_searches() {
    let Ok(uri) = std::env::var("MONGODB_URI") else {
        // Written to the real stderr (not `eprintln!`, which the test harness captures), so
        // the skip shows in every test log.
        let _ = writeln!(
            std::io::stderr(),
            "skipped a_real_atlas_cluster_ingests_indexes_and_searches: MONGODB_URI is not set; \
             it needs a real MongoDB Atlas cluster (set MONGODB_URI to its connection string)"
        );
        return;
    };
    let database =
        std::env::var("MONGODB_TEST_DATABASE").unwrap_or_else(|_| "prompter_test".into());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let collection = format!("prompter_test_{}_{nanos}", std::process::id());
    let config = AtlasConfig::new(Secret::new(uri), database, collection, "hashing");
    let embedder: Arc<dyn Embedder> =
        Arc::new(LocalEmbedder::new("hashing", HashingEmbedder::new(256)));
    let store = AtlasStore::open("live", config, embedder).unwrap();

    let outcome = run(&store).await;
    let dropped = store.drop_collection().await;
    outcome.unwrap();
    dropped.unwrap();
}

async fn run(store: &AtlasStore) -> Result<(), AtlasError> {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let csv = dir.path().join("kb.csv");
    std::fs::write(&csv, KB).expect("writing the CSV");

    let report = store
        .ingest(&csv, IngestOptions::default(), &|_, _| {})
        .await?;
    assert_eq!((report.rows, report.embedded, report.documents), (3, 3, 3));
    let again = store
        .ingest(&csv, IngestOptions::default(), &|_, _| {})
        .await?;
    assert_eq!((again.embedded, again.reused), (0, 3));

    let created = store.create_index().await?;
    assert!(!created.already_existed);
    store.wait_until_queryable(Duration::from_secs(600)).await?;

    // Documents are indexed shortly after the index is; ask until they show up.
    let start = Instant::now();
    loop {
        let docs = store
            .search("Budget Constraints", 2)
            .await
            .map_err(|e| AtlasError::Mongo {
                store: "live".into(),
                operation: "search".into(),
                message: e.to_string(),
            })?;
        if docs.len() == 2 {
            assert!(docs[0].text.starts_with("Budget Constraints:"), "{docs:?}");
            assert!(docs[0].data.starts_with("Quantify the cost"), "{docs:?}");
            assert_eq!(docs[0].id.len(), 12);
            assert!(docs[0].score >= docs[1].score, "{docs:?}");
            return Ok(());
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the ingested documents were not searchable within 120 s: {docs:?}"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
}
