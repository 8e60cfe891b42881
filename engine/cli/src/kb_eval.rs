//! `prompter kb eval`: how well each embedder finds the right knowledge-base row for labelled
//! queries: top-1 and top-3 accuracy, mean reciprocal rank, and what a query embedding costs.
//!
//! The labels CSV has a header and `query,expected` rows; a row of the knowledge base is right
//! for a query when its text starts with `expected` (case aside), so `expected` is usually the
//! label in front of the colon (`Budget Constraints`). The rank of a query is the position of the
//! first right row when every row is ranked by cosine similarity.
//!
//! A row with an empty `expected` is an unrelated query (small talk) that should find nothing:
//! it does not count in the accuracy, but the highest score such queries reach is reported
//! beside the lowest score of a right answer, which is the window for a `retrieve` stage's
//! `min_score`. With `--min-score`, each embedder also says how many labelled queries would
//! get their right row (right and scored at least that much) and how many unrelated ones would
//! get nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use prompter_core::resource::Embedder;
use prompter_plugin_retrieve::embedder::cosine;
use serde_json::json;

use crate::cli::{Stream, say};
use prompter_engine::registry::Registry;

/// Options of `prompter kb eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// The labelled queries: a header, then `query,expected` rows (`expected`: how the right
    /// row's text starts, such as its label).
    pub labels: PathBuf,
    /// The knowledge-base CSV the queries search (`text,data` rows, as `kb ingest` reads).
    #[arg(long)]
    pub kb: PathBuf,
    /// Also every embedder this engine config declares under `embedders:`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Only these embedders (names from --config; `lexical` is the built-in one).
    #[arg(long = "embedder", value_name = "NAME")]
    pub embedders: Vec<String>,
    /// Also a local sentence-transformers model from this folder (see scripts/get-model.sh).
    #[arg(long, value_name = "DIR")]
    pub model_dir: Vec<PathBuf>,
    /// Print the queries each embedder ranked wrong first.
    #[arg(long)]
    pub misses: bool,
    /// One JSON object per embedder instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also count answers at this minimum score (a `retrieve` stage's `min_score`): labelled
    /// queries whose right row scores at least this, unrelated ones whose best row does not.
    #[arg(long, value_name = "COSINE", allow_hyphen_values = true)]
    pub min_score: Option<f32>,
}

/// One labelled query.
struct Labelled {
    line: usize,
    query: String,
    /// As written; empty for an unrelated query that should find nothing.
    expected: String,
    /// Lowercased, for matching.
    prefix: String,
}

impl Labelled {
    fn unrelated(&self) -> bool {
        self.expected.is_empty()
    }
}

/// What one embedder scored.
struct Scores {
    name: String,
    id: String,
    top1: usize,
    top3: usize,
    mrr: f64,
    query_us: Vec<u64>,
    misses: Vec<(usize, String)>,
    /// The best row's score of each labelled query it ranked right.
    right_scores: Vec<f32>,
    /// The best row's score of each labelled query it ranked wrong.
    wrong_scores: Vec<f32>,
    /// The best row's score of each unrelated query.
    unrelated_scores: Vec<f32>,
}

fn read_labels(path: &Path) -> Result<Vec<Labelled>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| format!("`{}`: {e}", path.display()))?;
        let line = record.position().map_or(i + 2, |p| p.line() as usize);
        let field = |n: usize| record.get(n).map(str::trim).unwrap_or("");
        if field(0).is_empty() {
            return Err(format!(
                "{}:{line}: a row needs a query, then the expected row's start (`query,expected`; empty for a query that should find nothing)",
                path.display()
            ));
        }
        out.push(Labelled {
            line,
            query: field(0).to_owned(),
            expected: field(1).to_owned(),
            prefix: field(1).to_lowercase(),
        });
    }
    if out.iter().all(Labelled::unrelated) {
        return Err(format!(
            "`{}` has no labelled queries (rows with an expected row's start)",
            path.display()
        ));
    }
    Ok(out)
}

/// The short label of a row (before its colon), for messages.
fn label(row: &str) -> &str {
    row.split_once(':').map_or(row, |(l, _)| l).trim()
}

/// Vectors for `texts`, in the embedder's batches.
async fn embed_all(e: &dyn Embedder, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(e.max_batch().max(1)) {
        if let Some(local) = chunk
            .iter()
            .map(|t| e.embed_local(t))
            .collect::<Option<Vec<_>>>()
        {
            out.extend(local);
        } else {
            out.extend(e.embed(chunk).await.map_err(|x| x.to_string())?);
        }
    }
    Ok(out)
}

async fn score(
    e: &dyn Embedder,
    rows: &[String],
    right: &[Vec<bool>],
    labels: &[Labelled],
) -> Result<Scores, String> {
    let docs = embed_all(e, rows).await?;
    let mut s = Scores {
        name: e.name().to_owned(),
        id: e.id(),
        top1: 0,
        top3: 0,
        mrr: 0.0,
        query_us: Vec::with_capacity(labels.len()),
        misses: Vec::new(),
        right_scores: Vec::new(),
        wrong_scores: Vec::new(),
        unrelated_scores: Vec::new(),
    };
    for (l, right) in labels.iter().zip(right) {
        let started = Instant::now();
        let q = embed_all(e, std::slice::from_ref(&l.query))
            .await?
            .pop()
            .unwrap_or_default();
        s.query_us.push(started.elapsed().as_micros() as u64);
        let mut ranked: Vec<(usize, f32)> = docs
            .iter()
            .enumerate()
            .map(|(i, d)| (i, cosine(&q, d)))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let best = ranked.first().map_or(f32::MIN, |r| r.1);
        if l.unrelated() {
            s.unrelated_scores.push(best);
            continue;
        }
        let rank = ranked
            .iter()
            .position(|(i, _)| right[*i])
            .map_or(rows.len() + 1, |p| p + 1);
        if rank == 1 {
            s.top1 += 1;
            s.right_scores.push(best);
        } else {
            s.wrong_scores.push(best);
            let top = ranked.first().map_or("", |(i, _)| label(&rows[*i]));
            s.misses.push((
                l.line,
                format!(
                    "{:?}: got `{top}`, wanted `{}` (rank {rank})",
                    l.query, l.expected
                ),
            ));
        }
        if rank <= 3 {
            s.top3 += 1;
        }
        s.mrr += 1.0 / rank as f64;
    }
    s.mrr /= labels.iter().filter(|l| !l.unrelated()).count().max(1) as f64;
    Ok(s)
}

/// The nearest-rank percentile of microseconds, in milliseconds.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    crate::bench::pct(sorted, p) as f64 / 1000.0
}

/// The embedders to compare: the built-in lexical one, the config's, the model folders'.
fn embedders(registry: &Registry, args: &EvalArgs) -> Result<Vec<Arc<dyn Embedder>>, String> {
    let mut all: Vec<Arc<dyn Embedder>> =
        vec![Arc::new(prompter_plugin_retrieve::LocalEmbedder::new(
            "lexical",
            prompter_plugin_retrieve::HashingEmbedder::default(),
        ))];
    if let Some(config) = &args.config {
        let resources = prompter_engine::config::declared_embedders(
            config,
            &|n| std::env::var(n).ok(),
            registry,
        )
        .map_err(|d| {
            format!(
                "{}\n{} problem(s) in `{}`",
                d.render().trim_end(),
                d.len(),
                config.display()
            )
        })?;
        all.extend(resources.embedders.into_values());
    }
    for dir in &args.model_dir {
        let name = dir
            .file_name()
            .map_or_else(|| "local".into(), |n| n.to_string_lossy().into_owned());
        let model = prompter_plugin_local_embed::LocalModel::load(dir, None)?;
        all.push(Arc::new(
            prompter_plugin_local_embed::LocalModelEmbedder::new(&name, model, 32, 1),
        ));
    }
    if !args.embedders.is_empty() {
        let known: Vec<String> = all.iter().map(|e| e.name().to_owned()).collect();
        if let Some(unknown) = args.embedders.iter().find(|n| !known.contains(n)) {
            return Err(format!(
                "no embedder `{unknown}`; there are: {}",
                known.join(", ")
            ));
        }
        all.retain(|e| args.embedders.iter().any(|n| n == e.name()));
    }
    Ok(all)
}

/// Runs `prompter kb eval`; returns the exit code.
pub async fn eval(registry: &Registry, args: EvalArgs, out: &Stream, err: &Stream) -> u8 {
    match run(registry, &args, out).await {
        Ok(()) => 0,
        Err(e) => {
            say(err, &format!("error: {e}"));
            1
        }
    }
}

async fn run(registry: &Registry, args: &EvalArgs, out: &Stream) -> Result<(), String> {
    let labels = read_labels(&args.labels)?;
    let rows: Vec<String> = prompter_plugin_retrieve::store::read_csv(&args.kb)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(text, _)| text)
        .collect();
    let lower: Vec<String> = rows.iter().map(|r| r.to_lowercase()).collect();
    let right: Vec<Vec<bool>> = labels
        .iter()
        .map(|l| {
            lower
                .iter()
                .map(|r| !l.unrelated() && r.starts_with(&l.prefix))
                .collect()
        })
        .collect();
    if let Some((l, _)) = labels
        .iter()
        .zip(&right)
        .find(|(l, r)| !l.unrelated() && !r.iter().any(|x| *x))
    {
        let mut starts: Vec<&str> = rows.iter().map(|r| label(r)).collect();
        starts.dedup();
        return Err(format!(
            "{}:{}: `{}` is how no row of `{}` starts (rows start with: {})",
            args.labels.display(),
            l.line,
            l.expected,
            args.kb.display(),
            starts.join(", ")
        ));
    }
    let embedders = embedders(registry, args)?;
    let labelled = labels.iter().filter(|l| !l.unrelated()).count();
    let unrelated = labels.len() - labelled;
    if !args.json {
        say(
            out,
            &format!(
                "{labelled} labelled queries{} against {} rows of `{}`",
                if unrelated > 0 {
                    format!(" and {unrelated} unrelated ones")
                } else {
                    String::new()
                },
                rows.len(),
                args.kb.display()
            ),
        );
        let at = args
            .min_score
            .map(|m| {
                format!(
                    " {:>9} {:>9} {:>9}",
                    format!("right@{m}"),
                    format!("wrong@{m}"),
                    format!("none@{m}")
                )
            })
            .unwrap_or_default();
        say(
            out,
            &format!(
                "{:<16} {:>7} {:>7} {:>6} {:>9} {:>9}{at} {:>9} {:>9}  id",
                "embedder", "top-1", "top-3", "MRR", "low right", "high none", "p50 ms", "p99 ms"
            ),
        );
    }
    let n = labelled as f64;
    for e in embedders {
        let mut s = score(e.as_ref(), &rows, &right, &labels)
            .await
            .map_err(|m| format!("embedder `{}`: {m}", e.name()))?;
        s.query_us.sort_unstable();
        let (p50, p99) = (percentile(&s.query_us, 50.0), percentile(&s.query_us, 99.0));
        let low_right = s.right_scores.iter().copied().reduce(f32::min);
        let high_none = s.unrelated_scores.iter().copied().reduce(f32::max);
        // At `--min-score`: right rows that pass it, wrong rows that pass it (a wrong card),
        // unrelated queries that nothing passes.
        let at = args.min_score.map(|m| {
            (
                s.right_scores.iter().filter(|x| **x >= m).count() as f64 / n,
                s.wrong_scores.iter().filter(|x| **x >= m).count() as f64 / n,
                s.unrelated_scores.iter().filter(|x| **x < m).count() as f64
                    / unrelated.max(1) as f64,
            )
        });
        if args.json {
            say(
                out,
                &json!({
                    "embedder": s.name, "id": s.id, "queries": labelled, "unrelated": unrelated,
                    "top1": s.top1 as f64 / n, "top3": s.top3 as f64 / n, "mrr": s.mrr,
                    "lowest_right_score": low_right, "highest_unrelated_score": high_none,
                    "min_score": args.min_score,
                    "right_at_min_score": at.map(|a| a.0),
                    "wrong_at_min_score": at.map(|a| a.1),
                    "unrelated_silent_at_min_score": at.filter(|_| unrelated > 0).map(|a| a.2),
                    "query_p50_ms": p50, "query_p99_ms": p99,
                    "misses": s.misses.iter().map(|(line, m)| json!({"line": line, "miss": m})).collect::<Vec<_>>(),
                })
                .to_string(),
            );
        } else {
            let score = |x: Option<f32>| x.map_or_else(|| "-".to_owned(), |v| format!("{v:.3}"));
            let at = at
                .map(|(r, w, q)| {
                    let silent = if unrelated > 0 {
                        format!("{:.1}%", 100.0 * q)
                    } else {
                        "-".into()
                    };
                    let pct = |x: f64| format!("{:.1}%", 100.0 * x);
                    format!(" {:>9} {:>9} {silent:>9}", pct(r), pct(w))
                })
                .unwrap_or_default();
            say(
                out,
                &format!(
                    "{:<16} {:>6.1}% {:>6.1}% {:>6.3} {:>9} {:>9}{at} {:>9.2} {:>9.2}  {}",
                    s.name,
                    100.0 * s.top1 as f64 / n,
                    100.0 * s.top3 as f64 / n,
                    s.mrr,
                    score(low_right),
                    score(high_none),
                    p50,
                    p99,
                    s.id
                ),
            );
            if args.misses {
                for (line, m) in &s.misses {
                    say(out, &format!("    {}:{line}: {m}", args.labels.display()));
                }
            }
        }
    }
    Ok(())
}
