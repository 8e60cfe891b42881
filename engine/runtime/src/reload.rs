//! Hot reload: a new configuration, loaded and validated off the hot path, swapped in without
//! stopping a call ([`Engine::reload`]).
//!
//! [`Reloader::reload`] reads the engine config again (pipelines, and the knowledge stores,
//! models and embedders they use), validates it like `prompter validate`, builds everything
//! (Wasm components compiled, stores opened) on a blocking thread, and only then hands the new
//! pipelines to the engine. An invalid config changes nothing: the old one keeps serving and
//! the report carries the diagnostics (file:line:col). One reload runs at a time.
//!
//! Triggers (the CLI wires them): SIGHUP, `--watch`, and `POST /admin/reload`
//! ([`Reloader::routes`], bearer token), which answers with the [`ReloadReport`] as JSON.
//! Settings outside the pipelines (server, sinks, sources, feed) take effect at the next start.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use prompter_core::secret::Secret;
use serde::Serialize;

use crate::config::{self, LoadRequest};
use crate::engine::Engine;

/// What a reload did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// The new configuration is in force.
    pub ok: bool,
    /// The generation in force after the attempt (unchanged when refused).
    pub generation: u64,
    /// Pipelines in the new configuration (0 when refused).
    pub pipelines: usize,
    /// Why it was refused: each problem, rendered with its position.
    pub diagnostics: Vec<String>,
}

/// Reloads one engine from its config file.
pub struct Reloader {
    engine: Arc<Engine>,
    config: PathBuf,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    /// A reloader of `engine` from `config`.
    pub fn new(engine: Arc<Engine>, config: PathBuf) -> Self {
        Reloader {
            engine,
            config,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// The config file.
    pub fn config(&self) -> &std::path::Path {
        &self.config
    }

    /// Loads, validates and builds the config, then switches the engine to it; or, when it is
    /// invalid, keeps the old one and says why. Logged either way.
    pub async fn reload(&self) -> ReloadReport {
        let _one = self.one_at_a_time.lock().await;
        let path = self.config.clone();
        let engine_metrics = self.engine.stats().metrics.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let registry = crate::registry::builtin();
            let metrics = Some(engine_metrics);
            let env = |name: &str| std::env::var(name).ok();
            let req = LoadRequest {
                config: Some(&path),
                files: &[],
                include_config_pipelines: true,
                env: &env,
                metrics,
            };
            config::load(&req, &registry).map_err(|d| {
                d.render()
                    .trim_end()
                    .split("\n\n")
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
        })
        .await
        .unwrap_or_else(|e| Err(vec![format!("the reload task failed: {e}")]));
        match loaded {
            Ok(loaded) => {
                let pipelines = loaded.pipelines.len();
                let generation = self.engine.reload(loaded.pipelines);
                tracing::info!(
                    generation,
                    pipelines,
                    config = %self.config.display(),
                    "Configuration reloaded."
                );
                ReloadReport {
                    ok: true,
                    generation,
                    pipelines,
                    diagnostics: Vec::new(),
                }
            }
            Err(diagnostics) => {
                self.engine.stats().metrics.reload(false);
                tracing::error!(
                    config = %self.config.display(),
                    problems = %diagnostics.join("\n"),
                    "The new configuration is invalid; the one in force keeps serving."
                );
                ReloadReport {
                    ok: false,
                    generation: self.engine.generation(),
                    pipelines: 0,
                    diagnostics,
                }
            }
        }
    }

    /// `POST /admin/reload` with `Authorization: Bearer <token>`: 200 with the report when the
    /// new config is in force, 422 with its diagnostics when it is refused, 401 without the
    /// token. Without a token configured the route answers 404 (the admin API is off).
    pub fn routes(self: Arc<Self>, token: Option<Secret>) -> axum::Router {
        let state = Arc::new((self, token));
        axum::Router::new()
            .route("/admin/reload", post(admin_reload))
            .with_state(state)
    }
}

type AdminState = Arc<(Arc<Reloader>, Option<Secret>)>;

async fn admin_reload(State(state): State<AdminState>, headers: HeaderMap) -> Response {
    let (reloader, token) = &*state;
    let Some(token) = token else {
        return (
            StatusCode::NOT_FOUND,
            "the admin API is off: set the admin token's variable (PROMPTER_ADMIN_TOKEN)\n",
        )
            .into_response();
    };
    if !crate::feed::http::presents(&headers, None, token) {
        return (
            StatusCode::UNAUTHORIZED,
            "a valid admin token is required\n",
        )
            .into_response();
    }
    let report = reloader.reload().await;
    let status = if report.ok {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&report).unwrap_or_default(),
    )
        .into_response()
}

/// The newest modification time among `paths` (missing files count as none), for `--watch`.
pub fn newest_change(paths: &[PathBuf]) -> Option<SystemTime> {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
}

/// The files a reload reads: the config and the pipeline files of the generation in force.
pub fn watched_files(config: &std::path::Path, engine: &Engine) -> Vec<PathBuf> {
    let mut files = vec![config.to_path_buf()];
    files.extend(engine.pipeline_files());
    files
}
