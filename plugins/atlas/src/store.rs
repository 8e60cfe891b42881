//! [`AtlasStore`]: a knowledge store answered by MongoDB Atlas Vector Search.
//!
//! It owns the store's one pooled `mongodb::Client`, embedding queries with the store's
//! embedder, running the `$vectorSearch` aggregation, and creating or inspecting the Vector
//! Search index. It does not own the documents' shape on the wire (see `pipeline`) nor filling
//! the collection (see `ingest`).
//!
//! Opening is synchronous and offline, because the engine opens stores while it loads and
//! validates its config, possibly outside any async runtime: the URI is parsed, not resolved.
//! The client is built at the first operation (that is when a `mongodb+srv://` name is looked
//! up; connections are then made lazily by the driver and pooled), and reused after that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mongodb::bson::{Bson, Document, doc};
use mongodb::error::ErrorKind as MongoErrorKind;
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection};
use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::{Embedder, KnowledgeStore, ScoredDocument};
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::config::AtlasConfig;
use crate::error::{AtlasError, OP_CONNECT, Scrubber};
use crate::pipeline::{
    index_definition, scored_document, search_index_model, vector_search_pipeline,
};

/// The server's code for "an index with this name already exists".
const INDEX_ALREADY_EXISTS: i32 = 68;
/// The server's code for "the collection already exists".
const NAMESPACE_EXISTS: i32 = 48;
/// How often [`AtlasStore::wait_until_queryable`] asks Atlas about the index.
const POLL_EVERY: Duration = Duration::from_secs(5);

/// A knowledge store in a MongoDB Atlas collection, searched with `$vectorSearch`.
///
/// Share it (it is `Send + Sync`; the engine holds it in an `Arc`): it builds one pooled client
/// at its first operation and reuses it. The driver runs that client's monitoring tasks on the
/// Tokio runtime of that first operation, so use a store from one runtime (the engine's).
pub struct AtlasStore {
    name: String,
    config: AtlasConfig,
    embedder: Arc<dyn Embedder>,
    scrub: Scrubber,
    client: OnceCell<Client>,
}

impl std::fmt::Debug for AtlasStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config's `uri` is a `Secret`, so printing the config is safe.
        f.debug_struct("AtlasStore")
            .field("name", &self.name)
            .field("config", &self.config)
            .field("embedder", &self.embedder.id())
            .field("connected", &self.client.initialized())
            .finish()
    }
}

/// What Atlas says about a Vector Search index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexStatus {
    /// The index name.
    pub name: String,
    /// Atlas's status: `PENDING`, `BUILDING`, `READY`, `FAILED`, ...
    pub status: String,
    /// Whether `$vectorSearch` can use it.
    pub queryable: bool,
}

/// What [`AtlasStore::create_index`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexCreated {
    /// The index name.
    pub name: String,
    /// The definition that was sent.
    pub definition: Document,
    /// True when an index of that name existed already (it was left as it is).
    pub already_existed: bool,
}

impl AtlasStore {
    /// Opens store `name` with `embedder` (the engine's embedder named by `config.embedder`).
    /// Offline and synchronous: no network, no runtime needed; see the module docs.
    ///
    /// # Errors
    /// [`AtlasError::Config`] for the first of [`AtlasConfig::problems`] (report them all with
    /// that method first, to point at every bad key).
    pub fn open(
        name: &str,
        config: AtlasConfig,
        embedder: Arc<dyn Embedder>,
    ) -> Result<AtlasStore, AtlasError> {
        if let Some(p) = config.problems().into_iter().next() {
            return Err(AtlasError::Config {
                store: name.to_owned(),
                key: p.key,
                message: p.message,
            });
        }
        Ok(AtlasStore {
            name: name.to_owned(),
            scrub: Scrubber::new(config.uri.expose()),
            config,
            embedder,
            client: OnceCell::new(),
        })
    }

    /// The store's config.
    pub fn config(&self) -> &AtlasConfig {
        &self.config
    }

    /// The store's embedder.
    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }

    /// `database.collection`.
    pub fn namespace(&self) -> String {
        format!("{}.{}", self.config.database, self.config.collection)
    }

    /// The store's client, built at the first call.
    async fn client(&self) -> Result<&Client, AtlasError> {
        self.client
            .get_or_try_init(|| async {
                let mut options = ClientOptions::parse(self.config.uri.expose())
                    .await
                    .map_err(|e| self.mongo(OP_CONNECT, &e))?;
                if options.app_name.is_none() {
                    options.app_name = Some("prompter".into());
                }
                Client::with_options(options).map_err(|e| self.mongo(OP_CONNECT, &e))
            })
            .await
    }

    /// The store's collection.
    pub(crate) async fn collection(&self) -> Result<Collection<Document>, AtlasError> {
        Ok(self
            .client()
            .await?
            .database(&self.config.database)
            .collection(&self.config.collection))
    }

    /// A driver error as an [`AtlasError::Mongo`], credentials scrubbed.
    pub(crate) fn mongo(&self, operation: &str, e: &mongodb::error::Error) -> AtlasError {
        AtlasError::Mongo {
            store: self.name.clone(),
            operation: operation.to_owned(),
            message: self.scrub.clean(&e.kind.to_string()),
        }
    }

    /// Connects now and checks that the cluster answers (`ping`), instead of at the first
    /// search. Optional: a warm-up for a live engine, or a check for a CLI.
    ///
    /// # Errors
    /// When the cluster cannot be reached or refuses the credentials.
    pub async fn ping(&self) -> Result<(), AtlasError> {
        let client = self.client().await?;
        client
            .database(&self.config.database)
            .run_command(doc! { "ping": 1_i32 })
            .await
            .map_err(|e| self.mongo("`ping`", &e))?;
        Ok(())
    }

    /// The `k` documents nearest to `query`: the query embedded with the store's embedder,
    /// then the [`vector_search_pipeline`] aggregation. Empty when `k` is 0.
    ///
    /// # Errors
    /// When the embedder fails, or the aggregation fails (no index, wrong dimensions,
    /// unreachable cluster), naming the store and the operation.
    pub async fn nearest(&self, query: &str, k: usize) -> Result<Vec<ScoredDocument>, AtlasError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let vector = self
            .embedder
            .embed(&[query.to_owned()])
            .await
            .and_then(|v| {
                v.into_iter()
                    .next()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        PluginError::external("the embedder answered no vector for the query")
                    })
            })
            .map_err(|source| AtlasError::QueryEmbedding {
                store: self.name.clone(),
                embedder: self.embedder.name().to_owned(),
                source,
            })?;
        let pipeline = vector_search_pipeline(&self.config, &vector, k);
        let op = "the `$vectorSearch` aggregation";
        let coll = self.collection().await?;
        let mut cursor = coll
            .aggregate(pipeline)
            .await
            .map_err(|e| self.mongo(op, &e))?;
        let mut out = Vec::with_capacity(k);
        while cursor.advance().await.map_err(|e| self.mongo(op, &e))? {
            let d = cursor
                .deserialize_current()
                .map_err(|e| self.mongo(op, &e))?;
            out.push(scored_document(
                &d,
                &self.config.text_field,
                &self.config.data_field,
            ));
        }
        Ok(out)
    }

    /// The length of the store's vectors: the embedder's [`Embedder::dims`], or the length of
    /// a probe text's embedding when the embedder does not say.
    ///
    /// # Errors
    /// When the embedder must be asked and fails.
    pub async fn dims(&self) -> Result<usize, AtlasError> {
        if let Some(d) = self.embedder.dims() {
            return Ok(d);
        }
        let v = self
            .embedder
            .embed(&["dimension probe".to_owned()])
            .await
            .map_err(|source| AtlasError::QueryEmbedding {
                store: self.name.clone(),
                embedder: self.embedder.name().to_owned(),
                source,
            })?;
        match v.first().map(Vec::len) {
            Some(d) if d > 0 => Ok(d),
            got => Err(AtlasError::DimsMismatch {
                embedder: self.embedder.id(),
                want: 1,
                got: got.unwrap_or(0),
            }),
        }
    }

    /// The store's Vector Search index definition ([`index_definition`] with the store's
    /// `path`, `similarity` and [`AtlasStore::dims`]), e.g. to print for the Atlas UI.
    ///
    /// # Errors
    /// As [`AtlasStore::dims`].
    pub async fn index_definition(&self) -> Result<Document, AtlasError> {
        let dims = self.dims().await?;
        Ok(index_definition(
            &self.config.path,
            dims,
            self.config.similarity,
        ))
    }

    /// Creates the store's Vector Search index (`createSearchIndexes` with
    /// `type: "vectorSearch"`), creating the collection first when it does not exist. An index
    /// of the same name is left as it is. Atlas builds the index in the background: see
    /// [`AtlasStore::wait_until_queryable`].
    ///
    /// # Errors
    /// As [`AtlasStore::dims`], or when the cluster refuses (not Atlas, no rights).
    pub async fn create_index(&self) -> Result<IndexCreated, AtlasError> {
        let definition = self.index_definition().await?;
        let client = self.client().await?;
        let db = client.database(&self.config.database);
        if let Err(e) = db.create_collection(&self.config.collection).await
            && command_code(&e) != Some(NAMESPACE_EXISTS)
        {
            return Err(self.mongo("creating the collection", &e));
        }
        let name = &self.config.index;
        let model = search_index_model(name, definition.clone());
        let already_existed = match db
            .collection::<Document>(&self.config.collection)
            .create_search_index(model)
            .await
        {
            Ok(_) => false,
            Err(e) if command_code(&e) == Some(INDEX_ALREADY_EXISTS) => true,
            Err(e) => {
                return Err(self.mongo(&format!("creating Vector Search index `{name}`"), &e));
            }
        };
        tracing::info!(store = %self.name, index = %name, already_existed, "Vector Search index requested.");
        Ok(IndexCreated {
            name: name.clone(),
            definition,
            already_existed,
        })
    }

    /// What Atlas says about the store's Vector Search index; `None` when it does not exist.
    ///
    /// # Errors
    /// When the cluster cannot list search indexes (not Atlas, unreachable).
    pub async fn index_status(&self) -> Result<Option<IndexStatus>, AtlasError> {
        let op = "listing search indexes";
        let coll = self.collection().await?;
        let mut cursor = coll
            .list_search_indexes()
            .name(self.config.index.clone())
            .await
            .map_err(|e| self.mongo(op, &e))?;
        while cursor.advance().await.map_err(|e| self.mongo(op, &e))? {
            let d = cursor
                .deserialize_current()
                .map_err(|e| self.mongo(op, &e))?;
            if d.get_str("name").is_ok_and(|n| n == self.config.index) {
                return Ok(Some(IndexStatus {
                    name: self.config.index.clone(),
                    status: d.get_str("status").unwrap_or("UNKNOWN").to_owned(),
                    queryable: matches!(d.get("queryable"), Some(Bson::Boolean(true))),
                }));
            }
        }
        Ok(None)
    }

    /// Waits until the store's Vector Search index is queryable, asking every 5 s.
    ///
    /// # Errors
    /// [`AtlasError::IndexNotReady`] after `timeout`, or when the index failed; or as
    /// [`AtlasStore::index_status`].
    pub async fn wait_until_queryable(&self, timeout: Duration) -> Result<IndexStatus, AtlasError> {
        let start = Instant::now();
        loop {
            let status = self.index_status().await?;
            let failed = status.as_ref().is_some_and(|s| s.status == "FAILED");
            match status {
                Some(s) if s.queryable => return Ok(s),
                s if failed || start.elapsed() >= timeout => {
                    return Err(AtlasError::IndexNotReady {
                        store: self.name.clone(),
                        index: self.config.index.clone(),
                        waited_secs: start.elapsed().as_secs(),
                        status: s.map_or_else(|| "missing".to_owned(), |s| s.status),
                    });
                }
                _ => tokio::time::sleep(POLL_EVERY.min(timeout)).await,
            }
        }
    }

    /// Drops the store's collection with its documents and search indexes (tear-down of
    /// throwaway stores, as in tests).
    ///
    /// # Errors
    /// When the cluster refuses.
    pub async fn drop_collection(&self) -> Result<(), AtlasError> {
        self.collection()
            .await?
            .drop()
            .await
            .map_err(|e| self.mongo("dropping the collection", &e))
    }
}

/// The server's error code of a command failure.
pub(crate) fn command_code(e: &mongodb::error::Error) -> Option<i32> {
    match e.kind.as_ref() {
        MongoErrorKind::Command(c) => Some(c.code),
        _ => None,
    }
}

#[async_trait]
impl KnowledgeStore for AtlasStore {
    fn name(&self) -> &str {
        &self.name
    }

    async fn search(&self, query: &str, k: usize) -> Result<Vec<ScoredDocument>, PluginError> {
        let span =
            tracing::debug_span!("atlas.search", store = %self.name, k, otel.kind = "client");
        self.nearest(query, k)
            .instrument(span)
            .await
            .map_err(PluginError::from)
    }
}

#[cfg(test)]
mod tests {
    use prompter_core::secret::Secret;

    use super::*;

    struct Fixed(Option<usize>);

    #[async_trait]
    impl Embedder for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn id(&self) -> String {
            "fixed-v1".into()
        }
        fn dims(&self) -> Option<usize> {
            self.0
        }
        async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
            Ok(texts.iter().map(|_| vec![1.0, 0.0, 0.0]).collect())
        }
    }

    fn config(uri: &str) -> AtlasConfig {
        AtlasConfig::new(Secret::new(uri), "rta", "guidance", "fixed")
    }

    #[test]
    fn opening_is_offline_and_needs_no_runtime() {
        // Not even a resolvable host: nothing is looked up until the first operation.
        let store = AtlasStore::open(
            "sales",
            config("mongodb+srv://app:hunter2secret@cluster0.invalid/"),
            Arc::new(Fixed(Some(3))),
        )
        .unwrap();
        assert_eq!(store.name(), "sales");
        assert_eq!(store.namespace(), "rta.guidance");
        let debug = format!("{store:?}");
        assert!(debug.contains("connected: false"), "{debug}");
        assert!(!debug.contains("hunter2secret"), "{debug}");

        let err = AtlasStore::open("sales", config(""), Arc::new(Fixed(None))).unwrap_err();
        assert_eq!(err.config_key(), Some("uri"));
        assert!(
            err.to_string()
                .starts_with("knowledge store `sales`: `uri` is empty")
        );
    }

    #[tokio::test]
    async fn dims_come_from_the_embedder_or_a_probe_and_k_zero_asks_nobody() {
        let store =
            AtlasStore::open("s", config("mongodb://127.0.0.1:9/"), Arc::new(Fixed(None))).unwrap();
        assert_eq!(store.dims().await.unwrap(), 3);
        assert_eq!(
            store.index_definition().await.unwrap(),
            index_definition("embedding", 3, crate::Similarity::Cosine)
        );
        assert!(store.nearest("Budget", 0).await.unwrap().is_empty());
        assert!(!store.client.initialized());
    }

    #[tokio::test]
    async fn connection_failures_name_the_store_and_operation_but_not_the_password() {
        // Port 9 (discard) on loopback: refused at once; a short selection timeout.
        let store = AtlasStore::open(
            "sales",
            config("mongodb://app:hunter2secret@127.0.0.1:9/?serverSelectionTimeoutMS=200&connectTimeoutMS=200"),
            Arc::new(Fixed(Some(3))),
        )
        .unwrap();
        let err = store.search("Budget", 3).await.unwrap_err();
        assert_eq!(err.kind, prompter_core::error::ErrorKind::External);
        assert!(
            err.message
                .starts_with("knowledge store `sales`: the `$vectorSearch` aggregation failed: "),
            "{}",
            err.message
        );
        assert!(!err.message.contains("hunter2secret"), "{}", err.message);
        let chain = std::iter::successors(Some(&err as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(" / ");
        assert!(!chain.contains("hunter2secret"), "{chain}");
    }
}
