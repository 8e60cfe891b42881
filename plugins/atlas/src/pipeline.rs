//! The exact documents the store sends to Atlas and reads back, as pure functions.
//!
//! It owns the `$vectorSearch` aggregation pipeline, the Vector Search index definition and its
//! `createSearchIndexes` command, the shape of an ingested document and the mapping of a search
//! result to a [`ScoredDocument`]. It does not own sending them (see `store` and `ingest`), so
//! every byte Atlas sees can be checked by a unit test without a server.

use mongodb::SearchIndexModel;
use mongodb::SearchIndexType;
use mongodb::bson::{Bson, Document, doc};
use prompter_core::resource::ScoredDocument;

use crate::config::{AtlasConfig, MAX_NUM_CANDIDATES, Similarity};

/// The field that records which embedder (by [`Embedder::id`]) made a document's embedding.
///
/// [`Embedder::id`]: prompter_core::resource::Embedder::id
pub const EMBEDDER_FIELD: &str = "embedder";
/// The field that records the file a document was ingested from; documents without it were not
/// written by `prompter kb ingest` and are never removed by it.
pub const SOURCE_FIELD: &str = "source";
/// The field the pipeline projects the search score into.
pub const SCORE_FIELD: &str = "score";

/// The aggregation pipeline of a search for the `limit` documents nearest to `query_vector`:
///
/// ```json
/// [{"$vectorSearch": {"index", "path", "queryVector", "numCandidates", "limit"}},
///  {"$project": {"_id": 1, <text_field>: 1, <data_field>: 1, "score": {"$meta": "vectorSearchScore"}}}]
/// ```
///
/// `numCandidates` is the config's, raised to `limit` when a query asks for more (Atlas
/// requires `numCandidates >= limit`); both are capped at Atlas's 10 000. Numbers are 32-bit
/// integers, the vector's components doubles.
///
/// # Examples
/// ```
/// use prompter_core::secret::Secret;
/// use prompter_store_atlas::{AtlasConfig, vector_search_pipeline};
/// let cfg = AtlasConfig::new(Secret::new("mongodb://h"), "rta", "guidance", "nebula");
/// let p = vector_search_pipeline(&cfg, &[0.5, 0.25], 3);
/// assert_eq!(p[0].get_document("$vectorSearch").unwrap().get_i32("limit"), Ok(3));
/// ```
pub fn vector_search_pipeline(
    config: &AtlasConfig,
    query_vector: &[f32],
    limit: usize,
) -> Vec<Document> {
    let limit = to_i32(limit.min(MAX_NUM_CANDIDATES as usize));
    let num_candidates = to_i32(config.num_candidates.min(MAX_NUM_CANDIDATES) as usize).max(limit);
    let query: Vec<Bson> = query_vector
        .iter()
        .map(|x| Bson::Double(f64::from(*x)))
        .collect();
    let mut project = Document::new();
    project.insert("_id", 1_i32);
    project.insert(config.text_field.as_str(), 1_i32);
    project.insert(config.data_field.as_str(), 1_i32);
    project.insert(SCORE_FIELD, doc! { "$meta": "vectorSearchScore" });
    vec![
        doc! {
            "$vectorSearch": {
                "index": config.index.as_str(),
                "path": config.path.as_str(),
                "queryVector": query,
                "numCandidates": num_candidates,
                "limit": limit,
            }
        },
        doc! { "$project": project },
    ]
}

/// The definition of a Vector Search index over `path`:
/// `{"fields": [{"type": "vector", "path", "numDimensions", "similarity"}]}`, what the Atlas
/// UI's JSON editor takes (print it with [`to_json`]).
///
/// # Examples
/// ```
/// use prompter_store_atlas::{Similarity, index_definition, to_json};
/// let d = index_definition("embedding", 1024, Similarity::Cosine);
/// assert_eq!(
///     to_json(&d).to_string(),
///     r#"{"fields":[{"type":"vector","path":"embedding","numDimensions":1024,"similarity":"cosine"}]}"#
/// );
/// ```
pub fn index_definition(path: &str, dims: usize, similarity: Similarity) -> Document {
    doc! {
        "fields": [{
            "type": "vector",
            "path": path,
            "numDimensions": to_i32(dims),
            "similarity": similarity.as_str(),
        }]
    }
}

/// The driver's model of the Vector Search index `name` with `definition`
/// (`type: "vectorSearch"`), for `Collection::create_search_index`.
pub fn search_index_model(name: &str, definition: Document) -> SearchIndexModel {
    SearchIndexModel::builder()
        .name(name.to_owned())
        .index_type(SearchIndexType::VectorSearch)
        .definition(definition)
        .build()
}

/// The `createSearchIndexes` command that creates Vector Search index `name` on `collection`,
/// exactly as the driver sends it for [`search_index_model`] (minus `$db` and session fields):
/// `{"createSearchIndexes": collection, "indexes": [{"definition", "name", "type": "vectorSearch"}]}`.
pub fn create_search_indexes_command(
    collection: &str,
    name: &str,
    definition: Document,
) -> Document {
    doc! {
        "createSearchIndexes": collection,
        "indexes": [{ "definition": definition, "name": name, "type": "vectorSearch" }],
    }
}

/// The document an ingest writes for one knowledge-base row: `_id` (the row's id), the text and
/// data under the configured fields, the embedding under `path` (an array of doubles, as the
/// index expects), the embedder's id and the source file's name. Dotted field names become
/// nested documents.
pub fn ingest_document(
    config: &AtlasConfig,
    id: &str,
    text: &str,
    data: &str,
    embedding: &[f32],
    embedder_id: &str,
    source: &str,
) -> Document {
    let mut d = doc! { "_id": id };
    set_path(&mut d, &config.text_field, Bson::String(text.to_owned()));
    set_path(&mut d, &config.data_field, Bson::String(data.to_owned()));
    let vector: Vec<Bson> = embedding
        .iter()
        .map(|x| Bson::Double(f64::from(*x)))
        .collect();
    set_path(&mut d, &config.path, Bson::Array(vector));
    d.insert(EMBEDDER_FIELD, embedder_id);
    d.insert(SOURCE_FIELD, source);
    d
}

/// A search result (a `$project`ed document) as a [`ScoredDocument`]: `_id` as a string
/// (an ObjectId as its hex), text and data as strings (other values as relaxed extended JSON,
/// missing ones empty, as in collections filled by other tools), and the score.
pub fn scored_document(d: &Document, text_field: &str, data_field: &str) -> ScoredDocument {
    let score = match d.get(SCORE_FIELD) {
        Some(Bson::Double(x)) => *x as f32,
        Some(Bson::Int32(x)) => *x as f32,
        Some(Bson::Int64(x)) => *x as f32,
        _ => 0.0,
    };
    ScoredDocument {
        id: d.get("_id").map(bson_text).unwrap_or_default(),
        text: get_path(d, text_field).map(bson_text).unwrap_or_default(),
        data: get_path(d, data_field).map(bson_text).unwrap_or_default(),
        score,
    }
}

/// A BSON document as plain JSON (relaxed extended JSON), e.g. to print an index definition.
pub fn to_json(d: &Document) -> serde_json::Value {
    Bson::Document(d.clone()).into_relaxed_extjson()
}

fn bson_text(b: &Bson) -> String {
    match b {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(o) => o.to_hex(),
        Bson::Null | Bson::Undefined => String::new(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

fn get_path<'a>(d: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut parts = path.split('.');
    let mut cur = d.get(parts.next()?)?;
    for p in parts {
        cur = cur.as_document()?.get(p)?;
    }
    Some(cur)
}

fn set_path(d: &mut Document, path: &str, value: Bson) {
    match path.split_once('.') {
        None => {
            d.insert(path, value);
        }
        Some((head, rest)) => {
            if !matches!(d.get(head), Some(Bson::Document(_))) {
                d.insert(head, Document::new());
            }
            if let Some(Bson::Document(inner)) = d.get_mut(head) {
                set_path(inner, rest, value);
            }
        }
    }
}

fn to_i32(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod tests {
    use mongodb::bson::oid::ObjectId;
    use prompter_core::secret::Secret;

    use super::*;

    fn config() -> AtlasConfig {
        AtlasConfig::new(Secret::new("mongodb://h"), "rta", "guidance", "nebula")
    }

    #[test]
    fn the_pipeline_is_exactly_vector_search_then_project() {
        let p = vector_search_pipeline(&config(), &[0.5, -0.25, 0.1], 3);
        let expected = vec![
            doc! {
                "$vectorSearch": {
                    "index": "vector_index",
                    "path": "embedding",
                    "queryVector": [0.5_f64, -0.25_f64, f64::from(0.1_f32)],
                    "numCandidates": 100_i32,
                    "limit": 3_i32,
                }
            },
            doc! {
                "$project": {
                    "_id": 1_i32,
                    "text": 1_i32,
                    "data": 1_i32,
                    "score": { "$meta": "vectorSearchScore" },
                }
            },
        ];
        assert_eq!(p, expected);
        // Key order is part of "exactly": BSON documents are ordered.
        let keys: Vec<&String> = p[0].get_document("$vectorSearch").unwrap().keys().collect();
        assert_eq!(
            keys,
            ["index", "path", "queryVector", "numCandidates", "limit"]
        );
        assert_eq!(
            to_json(&p[1]).to_string(),
            r#"{"$project":{"_id":1,"text":1,"data":1,"score":{"$meta":"vectorSearchScore"}}}"#
        );
    }

    #[test]
    fn the_pipeline_follows_the_config_and_keeps_num_candidates_at_least_limit() {
        let mut cfg = config();
        cfg.index = "kb_idx".into();
        cfg.path = "vec".into();
        cfg.text_field = "objection".into();
        cfg.data_field = "guidance".into();
        cfg.num_candidates = 10;
        let p = vector_search_pipeline(&cfg, &[1.0], 25);
        let vs = p[0].get_document("$vectorSearch").unwrap();
        assert_eq!(vs.get_str("index"), Ok("kb_idx"));
        assert_eq!(vs.get_str("path"), Ok("vec"));
        assert_eq!(vs.get_i32("numCandidates"), Ok(25));
        assert_eq!(vs.get_i32("limit"), Ok(25));
        let keys: Vec<&String> = p[1].get_document("$project").unwrap().keys().collect();
        assert_eq!(keys, ["_id", "objection", "guidance", "score"]);
        let p = vector_search_pipeline(&cfg, &[1.0], 50_000);
        let vs = p[0].get_document("$vectorSearch").unwrap();
        assert_eq!(vs.get_i32("numCandidates"), Ok(10_000));
        assert_eq!(vs.get_i32("limit"), Ok(10_000));
    }

    #[test]
    fn the_index_definition_and_its_command_are_exact() {
        let def = index_definition("embedding", 1024, Similarity::Cosine);
        assert_eq!(
            def,
            doc! { "fields": [{ "type": "vector", "path": "embedding", "numDimensions": 1024_i32, "similarity": "cosine" }] }
        );
        assert_eq!(
            index_definition("v", 3, Similarity::DotProduct),
            doc! { "fields": [{ "type": "vector", "path": "v", "numDimensions": 3_i32, "similarity": "dotProduct" }] }
        );
        assert_eq!(
            index_definition("v", 3, Similarity::Euclidean)
                .get_array("fields")
                .unwrap()[0]
                .as_document()
                .unwrap()
                .get_str("similarity"),
            Ok("euclidean")
        );
        let cmd = create_search_indexes_command("guidance", "vector_index", def.clone());
        assert_eq!(
            to_json(&cmd).to_string(),
            r#"{"createSearchIndexes":"guidance","indexes":[{"definition":{"fields":[{"type":"vector","path":"embedding","numDimensions":1024,"similarity":"cosine"}]},"name":"vector_index","type":"vectorSearch"}]}"#
        );
        // The driver serializes the model into the same `indexes` entry.
        let model = search_index_model("vector_index", def);
        let entry = mongodb::bson::to_document(&model).unwrap();
        assert_eq!(Bson::Document(entry), cmd.get_array("indexes").unwrap()[0]);
    }

    #[test]
    fn ingested_documents_carry_guidance_embedding_embedder_and_source() {
        let d = ingest_document(
            &config(),
            "0123456789ab",
            "Budget: too expensive",
            "Offer a pilot.",
            &[0.5, 1.0],
            "nebula:large",
            "kb.csv",
        );
        assert_eq!(
            d,
            doc! {
                "_id": "0123456789ab",
                "text": "Budget: too expensive",
                "data": "Offer a pilot.",
                "embedding": [0.5_f64, 1.0_f64],
                "embedder": "nebula:large",
                "source": "kb.csv",
            }
        );
        let mut cfg = config();
        cfg.text_field = "kb.objection".into();
        cfg.data_field = "kb.guidance".into();
        cfg.path = "vectors.nebula".into();
        let d = ingest_document(&cfg, "id", "t", "g", &[1.0], "e", "s");
        assert_eq!(
            d,
            doc! {
                "_id": "id",
                "kb": { "objection": "t", "guidance": "g" },
                "vectors": { "nebula": [1.0_f64] },
                "embedder": "e",
                "source": "s",
            }
        );
        let back = scored_document(&d, "kb.objection", "kb.guidance");
        assert_eq!((back.text.as_str(), back.data.as_str()), ("t", "g"));
    }

    #[test]
    fn results_map_to_scored_documents_whatever_wrote_them() {
        let ours = doc! { "_id": "0123456789ab", "text": "Timing", "data": "Agree on a date.", "score": 0.875_f64 };
        assert_eq!(
            scored_document(&ours, "text", "data"),
            ScoredDocument {
                id: "0123456789ab".into(),
                text: "Timing".into(),
                data: "Agree on a date.".into(),
                score: 0.875,
            }
        );
        // A document written by the seed's Python script: ObjectId, no text, structured data.
        let oid = ObjectId::parse_str("65f1c0ffee00000000000001").unwrap();
        let theirs = doc! { "_id": oid, "data": { "tip": "Ask", "n": 2_i32 }, "score": 1_i32 };
        let s = scored_document(&theirs, "text", "data");
        assert_eq!(s.id, "65f1c0ffee00000000000001");
        assert_eq!(s.text, "");
        assert_eq!(s.data, r#"{"tip":"Ask","n":2}"#);
        assert_eq!(s.score, 1.0);
        assert_eq!(scored_document(&doc! {}, "text", "data").score, 0.0);
    }
}
