//! `prompter trackers sync [--config FILE] [--dry-run]`: brings the Symbl account's trackers in
//! line with the engine config's `symbl.trackers`, one line per tracker, and warns about
//! trackers that no knowledge-base row answers (a tracker that fires with nothing to suggest
//! is noise for the agent).
//!
//! It owns the command's output; the Management API client and the sync logic are
//! `prompter_symbl::management`, loading the config is [`prompter_engine::config`].

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use prompter_core::resource::KnowledgeStore;
use prompter_symbl::SymblConfig;
use prompter_symbl::auth::SymblAuth;
use prompter_symbl::management::{SyncEntry, SyncOutcome, SyncReport, TrackersClient};

/// A top search result scoring at least this covers a tracker even when its text does not
/// name the tracker (the row is about the same thing in other words).
const COVERING_SCORE: f32 = 0.5;

/// Syncs `symbl.trackers` (or, with `dry_run`, says what it would do), writes one line per
/// tracker and a warning per tracker no knowledge store covers, and returns whether every
/// tracker synced.
///
/// # Errors
/// A credential variable is unset, or the existing trackers cannot be listed (nothing was
/// changed then); also a failed write to `out`.
pub(crate) async fn sync(
    symbl: &SymblConfig,
    knowledge: &BTreeMap<String, Arc<dyn KnowledgeStore>>,
    dry_run: bool,
    out: &mut dyn Write,
) -> Result<bool, String> {
    let io = |e: std::io::Error| format!("cannot write the report: {e}");
    if symbl.trackers.is_empty() {
        writeln!(
            out,
            "no trackers declared under `symbl.trackers`: nothing to sync"
        )
        .map_err(io)?;
        return Ok(true);
    }
    // Checked first: it needs no network, and its warnings are worth having even when Symbl
    // cannot be reached.
    let warnings = coverage_warnings(symbl, knowledge).await;
    let report = sync_report(symbl, dry_run).await;
    if let Ok(report) = &report {
        for entry in &report.entries {
            writeln!(out, "{}", line(entry, report.dry_run)).map_err(io)?;
        }
        writeln!(out, "{}", totals(report)).map_err(io)?;
    }
    for w in &warnings {
        writeln!(out, "warning: {w}").map_err(io)?;
    }
    report.map(|r| r.all_ok())
}

async fn sync_report(symbl: &SymblConfig, dry_run: bool) -> Result<SyncReport, String> {
    let auth = SymblAuth::shared(symbl).map_err(|e| format!("cannot sync trackers: {e}"))?;
    let client =
        TrackersClient::new(symbl, auth).map_err(|e| format!("cannot sync trackers: {e}"))?;
    let report = if dry_run {
        client.sync_dry_run(&symbl.trackers).await
    } else {
        client.sync(&symbl.trackers).await
    };
    report.map_err(|e| format!("cannot sync trackers: {e}"))
}

/// `created   Budget Constraints (id 4476908732794496)`, `would update  Timing (+1 −2 phrases)`.
fn line(entry: &SyncEntry, dry_run: bool) -> String {
    let name = &entry.name;
    let verb = |done: &str, planned: &str| if dry_run { planned } else { done }.to_owned();
    match &entry.outcome {
        SyncOutcome::Created { id: Some(id) } => {
            format!("{:<13} {name} (id {id})", verb("created", "would create"))
        }
        SyncOutcome::Created { id: None } => {
            format!("{:<13} {name}", verb("created", "would create"))
        }
        SyncOutcome::Updated { added, removed, .. } => format!(
            "{:<13} {name} (+{} -{} phrases)",
            verb("updated", "would update"),
            added.len(),
            removed.len()
        ),
        SyncOutcome::Unchanged { .. } => format!("{:<13} {name}", "unchanged"),
        SyncOutcome::Failed { error } => format!("{:<13} {name}: {error}", "failed"),
    }
}

fn totals(report: &SyncReport) -> String {
    let mut n = [0usize; 4];
    for e in &report.entries {
        let i = match e.outcome {
            SyncOutcome::Created { .. } => 0,
            SyncOutcome::Updated { .. } => 1,
            SyncOutcome::Unchanged { .. } => 2,
            SyncOutcome::Failed { .. } => 3,
        };
        n[i] += 1;
    }
    let (created, updated) = if report.dry_run {
        ("to create", "to update")
    } else {
        ("created", "updated")
    };
    format!(
        "{} trackers: {} {created}, {} {updated}, {} unchanged, {} failed{}",
        report.entries.len(),
        n[0],
        n[1],
        n[2],
        n[3],
        if report.dry_run {
            " (dry run: nothing changed)"
        } else {
            ""
        }
    )
}

/// One warning per tracker that no knowledge store covers, and per store that could not be
/// searched.
async fn coverage_warnings(
    symbl: &SymblConfig,
    knowledge: &BTreeMap<String, Arc<dyn KnowledgeStore>>,
) -> Vec<String> {
    if knowledge.is_empty() {
        return vec![
            "no knowledge store is declared (`knowledge:`), so no tracker has guidance to suggest"
                .to_owned(),
        ];
    }
    let mut warnings = Vec::new();
    for spec in &symbl.trackers {
        let mut covered = false;
        for (store_name, store) in knowledge {
            match store.search(&spec.name, 1).await {
                Ok(docs) => {
                    if docs
                        .first()
                        .is_some_and(|d| covers(&spec.name, &d.text, d.score))
                    {
                        covered = true;
                        break;
                    }
                }
                Err(e) => warnings.push(format!(
                    "cannot search knowledge `{store_name}` for tracker `{}`: {e}",
                    spec.name
                )),
            }
        }
        if !covered {
            let stores: Vec<String> = knowledge.keys().map(|k| format!("`{k}`")).collect();
            warnings.push(format!(
                "tracker `{}` is not covered by any knowledge-base row (searched {}): add a row whose text names it",
                spec.name,
                stores.join(", ")
            ));
        }
    }
    warnings
}

/// A row covers a tracker when its text names the tracker (ignoring case) or it scores at
/// least [`COVERING_SCORE`].
fn covers(tracker: &str, text: &str, score: f32) -> bool {
    score >= COVERING_SCORE || text.to_lowercase().contains(&tracker.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prompter_core::async_trait;
    use prompter_core::error::PluginError;
    use prompter_core::resource::ScoredDocument;
    use prompter_symbl::config::TrackerSpec;

    /// Answers every query with one fixed row.
    struct OneRow(&'static str, f32);

    #[async_trait]
    impl KnowledgeStore for OneRow {
        fn name(&self) -> &str {
            "kb"
        }
        async fn search(
            &self,
            _query: &str,
            _k: usize,
        ) -> Result<Vec<ScoredDocument>, PluginError> {
            Ok(vec![ScoredDocument {
                id: "r1".into(),
                text: self.0.into(),
                data: "guidance".into(),
                score: self.1,
            }])
        }
    }

    fn config(names: &[&str]) -> SymblConfig {
        SymblConfig {
            app_id_env: "PROMPTER_SURELY_UNSET_SYMBL_ID_4b1e".into(),
            app_secret_env: "PROMPTER_SURELY_UNSET_SYMBL_SECRET_4b1e".into(),
            trackers: names
                .iter()
                .map(|n| TrackerSpec {
                    name: (*n).into(),
                    vocabulary: vec!["x".into()],
                })
                .collect(),
            ..SymblConfig::default()
        }
    }

    #[test]
    fn coverage_by_name_or_score() {
        assert!(covers("Budget", "budget constraints", 0.1));
        assert!(covers("Budget", "pricing", 0.5));
        assert!(!covers("Budget", "pricing", 0.49));
    }

    #[tokio::test]
    async fn warns_about_uncovered_trackers_and_names_a_missing_variable() {
        let mut kb: BTreeMap<String, Arc<dyn KnowledgeStore>> = BTreeMap::new();
        kb.insert("kb".into(), Arc::new(OneRow("Budget Constraints", 0.2)));
        let mut out = Vec::new();
        let err = sync(
            &config(&["Budget Constraints", "Timing"]),
            &kb,
            true,
            &mut out,
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("`PROMPTER_SURELY_UNSET_SYMBL_ID_4b1e`"),
            "{err}"
        );
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "warning: tracker `Timing` is not covered by any knowledge-base row (searched `kb`): add a row whose text names it\n"
        );
    }

    #[tokio::test]
    async fn no_trackers_is_nothing_to_do() {
        let mut out = Vec::new();
        assert!(
            sync(&config(&[]), &BTreeMap::new(), false, &mut out)
                .await
                .unwrap()
        );
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("no trackers declared")
        );
    }

    #[test]
    fn lines_read_as_a_report() {
        let entry = |name: &str, outcome| SyncEntry {
            name: name.into(),
            outcome,
        };
        let report = SyncReport {
            dry_run: false,
            entries: vec![
                entry(
                    "A",
                    SyncOutcome::Created {
                        id: Some("1".into()),
                    },
                ),
                entry(
                    "B",
                    SyncOutcome::Updated {
                        id: "2".into(),
                        added: vec!["x".into()],
                        removed: vec![],
                    },
                ),
                entry("C", SyncOutcome::Unchanged { id: "3".into() }),
            ],
        };
        let lines: Vec<String> = report.entries.iter().map(|e| line(e, false)).collect();
        assert_eq!(
            lines,
            [
                "created       A (id 1)",
                "updated       B (+1 -0 phrases)",
                "unchanged     C"
            ]
        );
        assert_eq!(
            totals(&report),
            "3 trackers: 1 created, 1 updated, 1 unchanged, 0 failed"
        );
        assert_eq!(
            line(&entry("A", SyncOutcome::Created { id: None }), true),
            "would create  A"
        );
    }
}
