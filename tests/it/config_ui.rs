//! Config diagnostics: the shipped files validate; each file in fixtures/config/invalid gives
//! exactly the error text in its sibling `.err` snapshot (BLESS=1 rewrites the snapshots).

use crate::cli::{at, prompter, root};

#[test]
fn shipped_pipelines_and_engine_config_validate() {
    let mut args = vec![
        "validate".to_string(),
        "--config".into(),
        at("prompter.yaml"),
    ];
    let mut files: Vec<String> = std::fs::read_dir(root().join("pipelines"))
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    files.sort();
    args.extend(files);
    args.push(at("prompter.yaml"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = prompter(&argv);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.stderr, "");
    // Three pipeline files and the engine config; pipelines in the order the config's glob
    // lists them.
    assert_eq!(
        r.stdout,
        "ok: 4 file(s) valid; pipelines: call_recap, open_questions, rta; \
         knowledge stores: sales; llm providers: offline\n"
    );
}

#[test]
fn invalid_configs_match_their_snapshots() {
    // Paths are printed as given; run from the test crate's folder with relative paths so the
    // snapshots do not depend on where the checkout lives.
    let dir = root().join("tests/fixtures/config/invalid");
    let mut checked = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let rel = format!("fixtures/config/invalid/{name}");
        let r = prompter(&["validate", "--config", &at("prompter.yaml"), &rel]);
        assert_eq!(r.code, 1, "{name} should be invalid");
        assert_eq!(r.stdout, "", "{name}");
        let snapshot = path.with_extension("err");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&snapshot, &r.stderr).unwrap();
        }
        let expected = std::fs::read_to_string(&snapshot).unwrap_or_else(|_| {
            panic!("missing snapshot {} (run with BLESS=1)", snapshot.display())
        });
        assert_eq!(r.stderr, expected, "diagnostics for {name} changed");
        checked.push(name);
    }
    assert_eq!(
        checked,
        [
            "bad_references.yaml",
            "cluster_values.yaml",
            "duplicate_key.yaml",
            "empty.yaml",
            "engine_config_errors.yaml",
            "missing_env.yaml",
            "misspelt_plugin.yaml",
            "schema_errors.yaml",
            "syntax_error.yaml",
            "twilio_errors.yaml",
        ]
    );
}

#[test]
fn misspelt_plugin_and_unknown_key_are_both_reported_with_positions() {
    let rta = std::fs::read_to_string(root().join("pipelines/rta.yaml")).unwrap();
    let broken = rta.replace("plugin: retrieve", "plugin: retreive").replace(
        "    timeout_ms: 500\n",
        "    timeout_ms: 500\n    retries: 3\n",
    );
    assert_ne!(broken, rta);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rta.yaml");
    std::fs::write(&file, &broken).unwrap();
    let r = prompter(&[
        "validate",
        "--config",
        &at("prompter.yaml"),
        file.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stdout, "");
    let f = file.display().to_string();
    let line_of = |needle: &str| broken.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let plugin_line = line_of("plugin: retreive");
    let retries_line = line_of("retries: 3");
    // Both problems, each with its position, source line, caret and hint; then the count.
    let expected = format!(
        "{f}:{plugin_line}:13: error: unknown plugin `retreive`
   |
{plugin_line} |     plugin: retreive
   |             ^^^^^^^^
   = help: did you mean `retrieve`?
{f}:{retries_line}:5: error: unknown key `retries` in a stage
   |
{retries_line} |     retries: 3
   |     ^^^^^^^^
   = help: a stage accepts: `id`, `plugin`, `config`, `timeout_ms`, `on_error`, `module`, \
`allow_hosts`, `allow_knowledge`, `allow_llm`, `limits`
error: 2 problem(s) found
"
    );
    assert_eq!(r.stderr, expected);
}
