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
    for f in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            args.push(p.to_string_lossy().into_owned());
        }
    }
    args.push(at("prompter.yaml"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = prompter(&argv);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout
            .contains("pipelines: rta, open_questions, call_recap")
            || r.stdout.contains("rta"),
        "{}",
        r.stdout
    );
}

#[test]
fn invalid_configs_match_their_snapshots() {
    // Paths are printed as given; run from the test crate's folder with relative paths so the
    // snapshots do not depend on where the checkout lives.
    let dir = root().join("tests/fixtures/config/invalid");
    let mut checked = 0;
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
        assert_ne!(r.code, 0, "{name} should be invalid");
        let snapshot = path.with_extension("err");
        if std::env::var_os("BLESS").is_some() {
            std::fs::write(&snapshot, &r.stderr).unwrap();
        }
        let expected = std::fs::read_to_string(&snapshot).unwrap_or_else(|_| {
            panic!("missing snapshot {} (run with BLESS=1)", snapshot.display())
        });
        assert_eq!(r.stderr, expected, "diagnostics for {name} changed");
        checked += 1;
    }
    assert!(
        checked >= 3,
        "expected the invalid fixtures, found {checked}"
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
    assert_ne!(r.code, 0);
    let f = file.display().to_string();
    let line_of = |needle: &str| broken.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let plugin_line = line_of("plugin: retreive");
    let retries_line = line_of("retries: 3");
    assert!(
        r.stderr.contains(&format!(
            "{f}:{plugin_line}:13: error: unknown plugin `retreive`"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("= help: did you mean `retrieve`?"),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains(&format!(
            "{f}:{retries_line}:5: error: unknown key `retries` in a stage"
        )),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("error: 2 problem(s) found"),
        "{}",
        r.stderr
    );
}
