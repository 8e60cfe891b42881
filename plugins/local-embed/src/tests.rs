#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use super::*;

/// The folder of the model the tests run (see [`model`]).
fn model_dir() -> PathBuf {
    std::env::var_os("PROMPTER_TEST_MODEL").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2"),
        PathBuf::from,
    )
}

/// The model the tests run: `PROMPTER_TEST_MODEL`, else `models/all-MiniLM-L6-v2` at the
/// workspace root (`scripts/get-model.sh models` puts it there; `scripts/test.sh` runs it).
fn model() -> Option<LocalModel> {
    let dir = model_dir();
    if !dir.is_dir() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no model at `{}`: scripts/test.sh gets it with scripts/get-model.sh",
            dir.display()
        );
        eprintln!(
            "skipped: no model at `{}` (scripts/get-model.sh models)",
            dir.display()
        );
        return None;
    }
    Some(LocalModel::load(&dir, None).unwrap())
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (n(a) * n(b))
}

fn texts(t: &[&str]) -> Vec<String> {
    t.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn gives_the_reference_vector_of_all_minilm_l6_v2() {
    let Some(m) = model() else { return };
    assert_eq!(m.dims(), 384);
    assert_eq!(m.pooling(), Pooling::Mean);
    assert_eq!(m.max_tokens(), 256);
    let v = m
        .embed_blocking(&texts(&["This is an example sentence"]))
        .unwrap()
        .remove(0);
    // sentence-transformers' own output for this sentence (its documentation's example).
    let reference = [
        0.067_656_9,
        0.063_495_99,
        0.048_713_16,
        0.079_304_98,
        0.037_448_03,
    ];
    for (got, want) in v.iter().zip(reference) {
        assert!((got - want).abs() < 1e-4, "{:?} vs {reference:?}", &v[..5]);
    }
    let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "normalized as modules.json says");
}

#[test]
fn padding_does_not_change_a_vector() {
    let Some(m) = model() else { return };
    let short = "can your tool talk to our CRM?";
    let long = "we have been evaluating three vendors over the last quarter and the finance team wants a detailed breakdown of every cost line before anything is signed";
    let alone = m.embed_blocking(&texts(&[short])).unwrap().remove(0);
    let padded = m.embed_blocking(&texts(&[long, short])).unwrap().remove(1);
    let worst = alone
        .iter()
        .zip(&padded)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "padding changed the vector by up to {worst}");
}

#[test]
fn paraphrases_find_their_row_where_words_differ() {
    let Some(m) = model() else { return };
    let rows = texts(&[
        "Budget Constraints: the customer says it is too expensive or there is no budget",
        "Integrations: connecting the product to Salesforce, HubSpot and other CRM systems",
        "Security Review: the customer's security team must approve new vendors",
    ]);
    let queries = texts(&[
        "we simply don't have the money right now",
        "can your tool talk to our CRM?",
        "our infosec people have to sign off first",
    ]);
    let r = m.embed_blocking(&rows).unwrap();
    let q = m.embed_blocking(&queries).unwrap();
    for (i, qv) in q.iter().enumerate() {
        let scores: Vec<f32> = r.iter().map(|rv| cos(qv, rv)).collect();
        let best = (0..scores.len())
            .max_by(|a, b| scores[*a].total_cmp(&scores[*b]))
            .unwrap();
        assert_eq!(best, i, "{:?} scored {scores:?}", queries[i]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedder_batches_off_the_runtime_and_keeps_order() {
    let Some(m) = model() else { return };
    let all = texts(&["one", "two words", "three words here", "four", "five five"]);
    let direct = m.embed_blocking(&all).unwrap();
    let e = LocalModelEmbedder::new("minilm", m, 2, 1);
    assert_eq!(e.max_batch(), 2);
    assert_eq!(e.dims(), Some(384));
    assert!(e.id().starts_with("local:all-MiniLM-L6-v2:"), "{}", e.id());
    assert!(e.embed_local("x").is_none(), "never on the caller's thread");
    let got = e.embed(&all).await.unwrap();
    assert_eq!(got.len(), 5);
    for (a, b) in got.iter().zip(&direct) {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5));
    }
    assert!(e.embed(&[]).await.unwrap().is_empty());
}

#[test]
fn a_missing_or_foreign_folder_says_what_and_how_to_get_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let missing = LocalModel::load(&dir.path().join("nope"), None).unwrap_err();
    assert!(missing.contains("does not exist"), "{missing}");
    assert!(missing.contains("scripts/get-model.sh"), "{missing}");

    let empty = LocalModel::load(dir.path(), None).unwrap_err();
    assert!(empty.contains("holds no `config.json`"), "{empty}");

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "gpt2", "n_embd": 768}"#,
    )
    .unwrap();
    let gpt = LocalModel::load(dir.path(), None).unwrap_err();
    assert!(gpt.contains("holds a `gpt2` model"), "{gpt}");
    assert!(gpt.contains("BERT-family"), "{gpt}");

    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "hidden_act": "gelu",
            "max_position_embeddings": 16, "type_vocab_size": 2, "hidden_dropout_prob": 0.1,
            "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}"#,
    )
    .unwrap();
    let no_tokenizer = LocalModel::load(dir.path(), None).unwrap_err();
    assert!(
        no_tokenizer.contains("holds no `tokenizer.json`"),
        "{no_tokenizer}"
    );

    // The real model's tokenizer, with weights that are not whole.
    let real = model_dir();
    if real.is_dir() {
        std::fs::copy(
            real.join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let no_weights = LocalModel::load(dir.path(), None).unwrap_err();
        assert!(
            no_weights.contains("holds no `model.safetensors`"),
            "{no_weights}"
        );
        let weights = std::fs::read(real.join("model.safetensors")).unwrap();
        let cut = dir.path().join("model.safetensors");
        std::fs::write(&cut, &weights[..weights.len() / 2]).unwrap();
        let truncated = LocalModel::load(dir.path(), None).unwrap_err();
        assert!(truncated.contains("is it truncated?"), "{truncated}");
        std::fs::write(&cut, b"not a safetensors file at all").unwrap();
        let garbage = LocalModel::load(dir.path(), None).unwrap_err();
        assert!(garbage.contains("not a safetensors file"), "{garbage}");
        // Headers whose numbers would overflow: errors, not a panic or a huge allocation.
        let file = |header: &str| {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.extend_from_slice(&[0u8; 8]);
            std::fs::write(&cut, bytes).unwrap();
            LocalModel::load(dir.path(), None).unwrap_err()
        };
        let max = u64::MAX;
        let far = file(&format!(
            r#"{{"w":{{"dtype":"F32","shape":[2],"data_offsets":[0,{max}]}}}}"#
        ));
        assert!(far.contains("outside the file"), "{far}");
        let huge = file(&format!(
            r#"{{"w":{{"dtype":"F32","shape":[{max},{max}],"data_offsets":[0,8]}}}}"#
        ));
        assert!(huge.contains("impossible shape"), "{huge}");
        let wrong = file(r#"{"w":{"dtype":"I64","shape":[3],"data_offsets":[0,8]}}"#);
        assert!(wrong.contains("8 bytes for shape [3]"), "{wrong}");
    }

    let bad = LocalModelConfig {
        model_dir: "nope".into(),
        max_batch: 0,
        threads: 1,
        max_tokens: None,
    };
    let (key, message) = LocalModelEmbedder::open("e", &bad, dir.path()).unwrap_err();
    assert_eq!(key, "max_batch", "{message}");
}
