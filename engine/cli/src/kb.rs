//! `prompter kb ingest`: embeds a knowledge-base CSV into a named store of the engine config,
//! in batches with bounded concurrency, with a progress bar, re-embedding only what changed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prompter_core::resource::Embedder;
use prompter_plugin_retrieve::{EmbeddedStore, EmbeddedStoreConfig, IngestOptions};

use crate::cli::{Stream, say};
use prompter_engine::config::{self, diagnostics::Diagnostics};
use prompter_engine::registry::Registry;

/// What to ingest where.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestArgs {
    /// The knowledge-base CSV: a header, then `text,data` rows (objection, guidance).
    pub file: PathBuf,
    /// The store, by its name under the engine config's `knowledge:`.
    #[arg(long)]
    pub store: String,
    /// Engine config [default: ./prompter.yaml].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Texts per embedding call (capped by the embedder's maximum).
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Embedding calls in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Keep documents already in the store that this file does not have.
    #[arg(long)]
    pub append: bool,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long)]
    pub quiet: bool,
    /// Atlas stores: also create the Vector Search index (otherwise its definition is printed,
    /// to create it in the Atlas UI).
    #[arg(long)]
    pub create_index: bool,
}

/// Runs `prompter kb ingest`; returns the exit code.
pub async fn ingest(registry: &Registry, args: IngestArgs, out: &Stream, err: &Stream) -> u8 {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("prompter.yaml"));
    if !config.exists() {
        say(
            err,
            &format!(
                "error: engine config `{}` not found (pass --config FILE)",
                config.display()
            ),
        );
        return 1;
    }
    let decl = match config::store_decl(&config, &args.store, &|n| std::env::var(n).ok(), registry)
    {
        Ok(d) => d,
        Err(diags) => return report(&diags, err),
    };
    match decl.kind.as_str() {
        "embedded" => {}
        "atlas" => return ingest_atlas(&decl, &args, &config, out, err).await,
        other => {
            say(
                err,
                &format!(
                    "error: knowledge store `{}` is a `{other}` store; `kb ingest` fills `embedded` and `atlas` stores",
                    args.store
                ),
            );
            return 1;
        }
    }
    let mut diags = Diagnostics::default();
    let Some(cfg) =
        config::typed_config::<EmbeddedStoreConfig>(&decl.file, &decl.config, &mut diags)
    else {
        return report(&diags, err);
    };
    let embedder: Arc<dyn Embedder> = match &cfg.embedder {
        Some(name) => match decl.resources.embedders.get(name) {
            Some(e) => e.clone(),
            None => {
                say(
                    err,
                    &format!(
                        "error: store `{}` names embedder `{name}`, which `{}` does not declare under `embedders:`",
                        args.store,
                        config.display()
                    ),
                );
                return 1;
            }
        },
        None => EmbeddedStore::local_embedder(cfg.dims),
    };
    let file = absolute(&args.file);
    // A store with `source:` serves that CSV: ingesting another file without `--append` would
    // replace the embeddings it needs. Refuse before anything is lost.
    if let Some(source) = &cfg.source
        && absolute(&decl.base.join(source)) != file
        && !args.append
    {
        say(
            err,
            &format!(
                "error: store `{}` serves `{}` (its `source:`); ingest that file, add `--append` to add these rows beside it, or remove `source:` to serve what is ingested",
                args.store,
                source.display()
            ),
        );
        return 1;
    }
    let bar = progress_bar(args.quiet);
    let bar2 = bar.clone();
    let options = IngestOptions {
        batch_size: args.batch_size.max(1),
        concurrency: args.concurrency.max(1),
        append: args.append,
    };
    let result = prompter_plugin_retrieve::ingest(
        &args.store,
        &cfg,
        &decl.base,
        embedder.clone(),
        &file,
        options,
        &move |done, total| {
            bar2.set_length(total as u64);
            bar2.set_position(done as u64);
        },
    )
    .await;
    bar.finish_and_clear();
    match result {
        Ok(r) => {
            say(
                out,
                &format!(
                    "ingested `{}` into `{}` with `{}`: {} row(s), {} embedded, {} unchanged, {} removed; {} document(s) in `{}`",
                    args.file.display(),
                    args.store,
                    embedder.id(),
                    r.rows,
                    r.embedded,
                    r.reused,
                    r.removed,
                    r.documents,
                    r.index.display()
                ),
            );
            0
        }
        Err(e) => {
            say(
                err,
                &format!("error: ingesting into `{}` failed: {e}", args.store),
            );
            1
        }
    }
}

/// `kb ingest` into a MongoDB Atlas store: the same row rules, then the Vector Search index
/// (created with `--create-index`, else printed).
async fn ingest_atlas(
    decl: &config::StoreDecl,
    args: &IngestArgs,
    config: &Path,
    out: &Stream,
    err: &Stream,
) -> u8 {
    use prompter_store_atlas::{AtlasConfig, AtlasStore, to_json};
    let mut diags = Diagnostics::default();
    let Some(cfg) = config::typed_config::<AtlasConfig>(&decl.file, &decl.config, &mut diags)
    else {
        return report(&diags, err);
    };
    let problems = cfg.problems();
    if !problems.is_empty() {
        for p in problems {
            say(
                err,
                &format!("error: `{}` `{}`: {}", args.store, p.key, p.message),
            );
        }
        return 1;
    }
    let Some(embedder) = decl.resources.embedders.get(&cfg.embedder).cloned() else {
        say(
            err,
            &format!(
                "error: store `{}` names embedder `{}`, which `{}` does not declare under `embedders:`",
                args.store,
                cfg.embedder,
                config.display()
            ),
        );
        return 1;
    };
    let store = match AtlasStore::open(&args.store, cfg, embedder.clone()) {
        Ok(s) => s,
        Err(e) => {
            say(err, &format!("error: {e}"));
            return 1;
        }
    };
    let bar = progress_bar(args.quiet);
    let bar2 = bar.clone();
    let options = IngestOptions {
        batch_size: args.batch_size.max(1),
        concurrency: args.concurrency.max(1),
        append: args.append,
    };
    let result = store
        .ingest(&absolute(&args.file), options, &move |done, total| {
            bar2.set_length(total as u64);
            bar2.set_position(done as u64);
        })
        .await;
    bar.finish_and_clear();
    let r = match result {
        Ok(r) => r,
        Err(e) => {
            say(
                err,
                &format!("error: ingesting into `{}` failed: {e}", args.store),
            );
            return 1;
        }
    };
    say(
        out,
        &format!(
            "ingested `{}` into `{}` with `{}`: {} row(s), {} embedded, {} unchanged, {} removed; {} document(s) in `{}`",
            args.file.display(),
            args.store,
            embedder.id(),
            r.rows,
            r.embedded,
            r.reused,
            r.removed,
            r.documents,
            r.namespace
        ),
    );
    if args.create_index {
        match store.create_index().await {
            Ok(created) => say(
                out,
                &format!(
                    "vector search index `{}` {}: {}",
                    created.name,
                    if created.already_existed {
                        "already exists"
                    } else {
                        "created (Atlas builds it in the background)"
                    },
                    to_json(&created.definition)
                ),
            ),
            Err(e) => {
                say(err, &format!("error: creating the index failed: {e}"));
                return 1;
            }
        }
    } else {
        match store.index_definition().await {
            Ok(def) => say(
                out,
                &format!(
                    "vector search index definition (create it in Atlas, or re-run with --create-index): {}",
                    to_json(&def)
                ),
            ),
            Err(e) => {
                say(err, &format!("error: {e}"));
                return 1;
            }
        }
    }
    0
}

fn report(diags: &Diagnostics, err: &Stream) -> u8 {
    say(err, diags.render().trim_end());
    say(
        err,
        &format!("error: {} problem(s) found", diags.items().len()),
    );
    1
}

fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "embedding {bar:30} {pos}/{len} rows ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}
