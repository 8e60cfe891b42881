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
    assert_eq!(r.stdout, "");
    let dir_path = dir.path().display();
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "{dir_path}/prompter.yaml:9:13: error: cannot open knowledge store `sales`: knowledge \
             store `sales` is empty: no index at `{dir_path}/index/sales.json` built by \
             `nebula:nebula-text-embedding-large`; run `prompter kb ingest FILE.csv --store sales`"
        ),
        "{}",
        r.stderr
    );
    // One root cause, one error: the pipeline's `knowledge: sales` is not reported again.
    assert_eq!(
        lines.last().copied(),
        Some("error: 1 problem(s) in the configuration; nothing was run"),
        "{}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("unknown knowledge store"),
        "{}",
        r.stderr
    );

    // One embed call per row (Nebula embeds one text per call); a 503 on the way is retried.
    fake.fail_next(Endpoint::Embed, &[503]);
    let r = prompter(&[
        "kb", "ingest", &csv, "--store", "sales", "--config", &cfg, "--quiet",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let ingested = |embedded: usize, unchanged: usize| {
        format!(
            "ingested `{csv}` into `sales` with `nebula:nebula-text-embedding-large`: {rows} \
             row(s), {embedded} embedded, {unchanged} unchanged, 0 removed; {rows} document(s) in \
             `{}/index/sales.json`\n",
            dir.path().display()
        )
    };
    assert_eq!(r.stdout, ingested(rows, 0));
    assert_eq!(r.stderr, "");
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
    assert_eq!(r.stdout, ingested(0, rows));
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
        assert_eq!(s.sources.len(), 2, "`top_k: 2` in rta.yaml: {s:?}");
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
