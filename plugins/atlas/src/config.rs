//! The `atlas` store's configuration (`knowledge.<name>.config`) and its checks.
//!
//! It owns what a user may write under `config:` and which values cannot work. It does not own
//! looking the embedder up by name (the engine does that, it holds the embedders) nor connecting.

use std::fmt;

use mongodb::options::ConnectionString;
use prompter_core::secret::Secret;
use serde::Deserialize;

use crate::error::Scrubber;

/// Atlas caps `numCandidates` (and `limit`) of `$vectorSearch` at 10 000.
pub const MAX_NUM_CANDIDATES: u32 = 10_000;

/// Configuration of an `atlas` knowledge store.
///
/// ```yaml
/// knowledge:
///   sales:
///     store: atlas
///     config: { uri: "${MONGODB_URI}", database: rta, collection: guidance, index: vector_index, embedder: nebula }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AtlasConfig {
    /// The connection string, e.g. `"${MONGODB_URI}"` (Atlas: Connect > Drivers). It holds the
    /// password, so it is never printed: not in logs, not in errors.
    pub uri: Secret,
    /// The database that holds the collection.
    pub database: String,
    /// The collection of documents (one per knowledge-base row) and their embeddings.
    pub collection: String,
    /// The name of the Atlas Vector Search index over `path`. Default `vector_index`.
    #[serde(default = "default_index")]
    pub index: String,
    /// The field that holds each document's embedding. Default `embedding`.
    #[serde(default = "default_path")]
    pub path: String,
    /// The embedder, by its name in the engine config's `embedders:`. Required: Atlas compares
    /// real embeddings, and queries must be embedded by the same model as the documents.
    pub embedder: String,
    /// How many nearest neighbours Atlas considers before keeping the best `limit` (the
    /// retrieve stage's `top_k`); more is more accurate and slower. 1 to 10000, default 100.
    /// A query asking for more than this many documents raises it to that number.
    #[serde(default = "default_num_candidates")]
    pub num_candidates: u32,
    /// The similarity the index is created with: `cosine`, `euclidean` or `dotProduct`.
    /// Default `cosine`.
    #[serde(default)]
    pub similarity: Similarity,
    /// The field that holds the searched text (the objection). Default `text`.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// The field that holds the data returned with it (the guidance). Default `data`.
    #[serde(default = "default_data_field")]
    pub data_field: String,
}

fn default_index() -> String {
    "vector_index".into()
}
fn default_path() -> String {
    "embedding".into()
}
fn default_num_candidates() -> u32 {
    100
}
fn default_text_field() -> String {
    "text".into()
}
fn default_data_field() -> String {
    "data".into()
}

/// The vector similarity function of an Atlas Vector Search index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Similarity {
    /// Cosine of the angle; the usual choice for text embeddings.
    #[default]
    #[serde(rename = "cosine")]
    Cosine,
    /// Euclidean distance.
    #[serde(rename = "euclidean")]
    Euclidean,
    /// Dot product; needs unit-length vectors.
    #[serde(rename = "dotProduct")]
    DotProduct,
}

impl Similarity {
    /// The name Atlas uses in an index definition.
    pub fn as_str(self) -> &'static str {
        match self {
            Similarity::Cosine => "cosine",
            Similarity::Euclidean => "euclidean",
            Similarity::DotProduct => "dotProduct",
        }
    }
}

impl fmt::Display for Similarity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A config value that cannot work, with the key it sits under (so the engine can point at it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key in the store's `config:` map.
    pub key: &'static str,
    /// What is wrong: lowercase, identifiers in backticks.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl AtlasConfig {
    /// A config with the defaults for everything but the required keys.
    pub fn new(
        uri: Secret,
        database: impl Into<String>,
        collection: impl Into<String>,
        embedder: impl Into<String>,
    ) -> Self {
        AtlasConfig {
            uri,
            database: database.into(),
            collection: collection.into(),
            index: default_index(),
            path: default_path(),
            embedder: embedder.into(),
            num_candidates: default_num_candidates(),
            similarity: Similarity::default(),
            text_field: default_text_field(),
            data_field: default_data_field(),
        }
    }

    /// Every problem of this config, empty when it can work. Offline: the URI is parsed, not
    /// resolved (an `mongodb+srv://` host is looked up at the first search).
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |key, message: String| out.push(ConfigProblem { key, message });
        if self.uri.is_empty() {
            bad(
                "uri",
                "`uri` is empty: set it to the cluster's connection string, e.g. `\"${MONGODB_URI}\"` with `MONGODB_URI` exported".into(),
            );
        } else if let Err(e) = ConnectionString::parse(self.uri.expose()) {
            let scrub = Scrubber::new(self.uri.expose());
            bad(
                "uri",
                format!(
                    "`uri` is not a MongoDB connection string: {}",
                    scrub.clean(&e.to_string())
                ),
            );
        }
        // Names the server would refuse: say so at load time, next to the key.
        if self.database.is_empty()
            || self.database.len() > 63
            || self
                .database
                .contains(['/', '\\', '.', ' ', '"', '$', '\0'])
        {
            bad(
                "database",
                format!(
                    "`database` must be 1 to 63 characters without `/\\. \"$`, got `{}`",
                    self.database
                ),
            );
        }
        if self.collection.is_empty()
            || self.collection.contains(['$', '\0'])
            || self.collection.starts_with("system.")
        {
            bad(
                "collection",
                format!(
                    "`collection` must be non-empty, without `$`, and not start with `system.`, got `{}`",
                    self.collection
                ),
            );
        }
        if self.index.trim().is_empty() {
            bad("index", "`index` must name the Vector Search index".into());
        }
        if self.embedder.trim().is_empty() {
            bad(
                "embedder",
                "`embedder` must name an embedder of the engine config's `embedders:`".into(),
            );
        }
        if !(1..=MAX_NUM_CANDIDATES).contains(&self.num_candidates) {
            bad(
                "num_candidates",
                format!(
                    "`num_candidates` must be between 1 and {MAX_NUM_CANDIDATES}, got {}",
                    self.num_candidates
                ),
            );
        }
        for (key, value) in [
            ("path", &self.path),
            ("text_field", &self.text_field),
            ("data_field", &self.data_field),
        ] {
            if let Some(message) = field_problem(key, value) {
                bad(key, message);
            }
        }
        if self.text_field == self.data_field {
            bad(
                "data_field",
                format!(
                    "`data_field` must differ from `text_field` (both are `{}`)",
                    self.data_field
                ),
            );
        }
        for (key, value) in [
            ("text_field", &self.text_field),
            ("data_field", &self.data_field),
        ] {
            if *value == self.path {
                bad(
                    key,
                    format!("`{key}` must differ from `path` (both are `{value}`)"),
                );
            }
        }
        out
    }
}

/// Why `value` cannot be a document field path, if it cannot.
fn field_problem(key: &str, value: &str) -> Option<String> {
    if value.is_empty() || value.split('.').any(str::is_empty) {
        return Some(format!(
            "`{key}` must be a field name (dots for nested fields), got `{value}`"
        ));
    }
    if value.starts_with('$') || value.contains('\0') {
        return Some(format!("`{key}` must not start with `$`, got `{value}`"));
    }
    // `_id` holds the row's id and `score` is the projected search score.
    if matches!(value, "_id" | "score" | "embedder" | "source") {
        return Some(format!(
            "`{key}` must not be `{value}`: the store uses that field itself"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC_EXAMPLE: &str = r#"{ "uri": "mongodb+srv://u:p@cluster0.example.mongodb.net/", "database": "rta",
        "collection": "guidance", "index": "vector_index", "embedder": "nebula" }"#;

    fn example() -> AtlasConfig {
        serde_json::from_str(DOC_EXAMPLE).unwrap()
    }

    #[test]
    fn the_doc_example_parses_with_defaults() {
        let cfg = example();
        assert_eq!(
            cfg,
            AtlasConfig::new(
                Secret::new("mongodb+srv://u:p@cluster0.example.mongodb.net/"),
                "rta",
                "guidance",
                "nebula"
            )
        );
        assert_eq!(cfg.path, "embedding");
        assert_eq!(cfg.num_candidates, 100);
        assert_eq!(cfg.similarity, Similarity::Cosine);
        assert_eq!(
            (cfg.text_field.as_str(), cfg.data_field.as_str()),
            ("text", "data")
        );
        assert!(cfg.problems().is_empty(), "{:?}", cfg.problems());
        // The URI never shows in Debug.
        assert!(!format!("{cfg:?}").contains("u:p@"));
    }

    #[test]
    fn unknown_keys_and_similarities_are_rejected_and_dot_product_is_camel_case() {
        let with = |extra: &str| {
            serde_json::from_str::<AtlasConfig>(
                &DOC_EXAMPLE.replace("\"embedder\"", &format!("{extra}, \"embedder\"")),
            )
        };
        assert!(with(r#""num_candiates": 10"#).is_err());
        assert!(with(r#""similarity": "dot_product""#).is_err());
        assert!(with(r#""similarity": "cosine ""#).is_err());
        let cfg = with(r#""similarity": "dotProduct""#).unwrap();
        assert_eq!(cfg.similarity, Similarity::DotProduct);
        assert_eq!(cfg.similarity.to_string(), "dotProduct");
        assert!(serde_json::from_str::<AtlasConfig>(r#"{"uri": "mongodb://h"}"#).is_err());
    }

    #[test]
    fn problems_point_at_their_keys_and_never_show_the_password() {
        let mut cfg = example();
        cfg.uri = Secret::new("");
        cfg.database = "a.b".into();
        cfg.collection = "system.views".into();
        cfg.index = " ".into();
        cfg.embedder = String::new();
        cfg.num_candidates = 0;
        cfg.path = "$emb".into();
        cfg.text_field = "score".into();
        cfg.data_field = "score".into();
        let keys: Vec<&str> = cfg.problems().iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "uri",
                "database",
                "collection",
                "index",
                "embedder",
                "num_candidates",
                "path",
                "text_field",
                "data_field",
                "data_field"
            ]
        );
        assert!(cfg.problems()[0].message.contains("MONGODB_URI"));

        let mut cfg = example();
        cfg.num_candidates = 10_001;
        cfg.path = "a..b".into();
        cfg.text_field = "a..b".into();
        cfg.data_field = "doc.guidance".into();
        let keys: Vec<&str> = cfg.problems().iter().map(|p| p.key).collect();
        assert_eq!(keys, ["num_candidates", "path", "text_field", "text_field"]);

        for uri in [
            "http://user:hunter2secret@host/",
            "mongodb://user:hunter2secret@",
            "mongodb://user:hunter2secret@host:notaport/",
        ] {
            let mut cfg = example();
            cfg.uri = Secret::new(uri);
            let problems = cfg.problems();
            assert_eq!(problems.len(), 1, "{uri}: {problems:?}");
            assert_eq!(problems[0].key, "uri");
            assert!(
                !problems[0].message.contains("hunter2secret"),
                "{}",
                problems[0].message
            );
        }
    }
}
