//! `prompter kb ingest` into the embedded store with Nebula embeddings (a local fake Nebula),
//! then a replay that retrieves from what was ingested.

use std::path::Path;

use prompter_core::output::Output;
use prompter_fakes::NebulaFake;
use prompter_fakes::nebula::Endpoint;

use crate::cli::{at, prompter};

fn config(dir: &Path, nebula: &str) -> String {
    let path = dir.join("prompter.yaml");
    let yaml = format!(
        "pipelines: [{rta}]\n\
embedders:\n  nebula:\n    provider: nebula\n    config: {{ api_key: test-key, base_url: \"{nebula}\", max_backoff_ms: 20 }}\n\
knowledge:\n  sales:\n    store: embedded\n    config: {{ embedder: nebula, index: index/sales.json }}\n\
llm:\n  offline: {{ provider: offline }}\n",
        rta = at("pipelines/rta.yaml"),
    );
    std::fs::write(&path, yaml).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn kb_ingest_then_replay_retrieves_from_the_ingested_store() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fake = rt.block_on(NebulaFake::start("test-key"));
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &fake.url);
    let support = at("tests/fixtures/recordings/support-call.jsonl");
    let csv = at("pipelines/data/alt_knowledge.csv");
    let rows = std::fs::read_to_string(&csv).unwrap().lines().count() - 1;

    // Before any ingest the store is empty, and the error says what to run.
    let r = prompter(&["replay", "--config", &cfg, &support]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("run `prompter kb ingest FILE.csv --store sales`"),
        "{}",
        r.stderr
    );

    // One embed call per row (Nebula embeds one text per call); a 503 on the way is retried.
    fake.fail_next(Endpoint::Embed, &[503]);
    let r = prompter(&[
        "kb", "ingest", &csv, "--store", "sales", "--config", &cfg, "--quiet",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!(
            "{rows} row(s), {rows} embedded, 0 unchanged, 0 removed"
        )),
        "{}",
        r.stdout
    );
    assert_eq!(fake.embedded_texts().len(), rows);
    assert_eq!(
        fake.embed_attempts() as usize,
        rows + 1,
        "the 503 was retried"
    );

    // Idempotent: a second run embeds nothing.
    let r = prompter(&[
        "kb", "ingest", &csv, "--store", "sales", "--config", &cfg, "--quiet",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains(&format!("0 embedded, {rows} unchanged")),
        "{}",
        r.stdout
    );
    assert_eq!(fake.embedded_texts().len(), rows);

    // The replay retrieves the ingested support guidance, embedding each query through Nebula.
    let r = prompter(&["replay", "--config", &cfg, &support]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let outs: Vec<Output> = r
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let suggestions: Vec<&Output> = outs.iter().filter(|o| o.kind == "suggestion").collect();
    assert_eq!(suggestions.len(), 2, "{outs:?}");
    let kb = std::fs::read_to_string(&csv).unwrap();
    for s in suggestions {
        let tracker = s.trigger.tracker.as_deref().unwrap();
        assert!(
            s.sources[0].text.starts_with(tracker),
            "{tracker} retrieved {:?}",
            s.sources[0].text
        );
        assert!(kb.contains(&s.text), "not ingested guidance: {}", s.text);
    }
    assert_eq!(
        fake.embedded_texts().len(),
        rows + 2,
        "one query embedding per tracker"
    );
    drop(rt);
}
