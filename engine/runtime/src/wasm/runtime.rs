//! The process-wide wasmtime engine: one `Engine` (pooling allocator, epoch interruption,
//! on-disk compilation cache), one `Linker`, compiled components cached by content, and the
//! instance slots every live instance holds (see `slots`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{CONTRACT_PACKAGE, CONTRACT_VERSION, Stage, StagePre};
use super::host::HostState;
use super::slots::Slots;

/// How often the epoch advances; stage deadlines are counted in these ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);
/// The largest linear memory any plugin may be given (`limits.max_memory_mb` is capped here).
pub(crate) const MAX_MEMORY_BYTES: usize = 512 << 20;
/// Concurrent instances the pooling allocator reserves room for; as many [`Slots`] bound the
/// live instances of the process, so a call waits for one rather than failing to instantiate.
pub(crate) const POOL_INSTANCES: u32 = 128;

/// A problem loading a module.
#[derive(Debug, thiserror::Error)]
#[must_use]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read module `{path}`: {source}")]
    Read {
        /// The module path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A core module, not a component.
    #[error(
        "`{0}` is a core WebAssembly module, not a component (build the plugin for the `wasm32-wasip2` target)"
    )]
    CoreModule(PathBuf),
    /// Not WebAssembly, or a component wasmtime cannot compile.
    #[error("cannot compile `{path}`: {message}")]
    Compile {
        /// The module path.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// Built against another version of the contract.
    #[error(
        "`{path}` was built for the plugin contract `{CONTRACT_PACKAGE}@{found}`, but this engine speaks `{CONTRACT_PACKAGE}@{CONTRACT_VERSION}`; rebuild it against prompter-sdk {CONTRACT_VERSION}"
    )]
    Version {
        /// The module path.
        path: PathBuf,
        /// The version it was built for.
        found: String,
    },
    /// Not a stage plugin.
    #[error("`{path}` is not a Prompter stage plugin: {message}")]
    NotAPlugin {
        /// The module path.
        path: PathBuf,
        /// What is missing.
        message: String,
    },
    /// The engine could not be created.
    #[error("the WebAssembly engine could not start: {0}")]
    Engine(String),
}

/// A compiled component: its content hash and whether it was compiled for fuel metering.
type CompiledKey = ([u8; 32], bool);

/// The process-wide WebAssembly runtime.
pub struct WasmRuntime {
    engine: Engine,
    linker: Linker<HostState>,
    fuel: OnceLock<Result<(Engine, Linker<HostState>), String>>,
    compiled: Mutex<HashMap<CompiledKey, StagePre<HostState>>>,
    /// One per live instance, of any stage. The fuel engine (tests) allocates on demand, but
    /// its instances take slots too: one bound for the whole process is simpler to reason about.
    pub(crate) slots: Slots,
    /// Whether the pooling allocator is in use (false when the machine refused its reservation).
    pub pooling: bool,
}

static RUNTIME: OnceLock<Result<Arc<WasmRuntime>, String>> = OnceLock::new();

/// The runtime, created on first use.
///
/// # Errors
/// When wasmtime cannot start on this machine.
pub fn runtime() -> Result<Arc<WasmRuntime>, LoadError> {
    RUNTIME
        .get_or_init(|| WasmRuntime::new().map(Arc::new))
        .clone()
        .map_err(LoadError::Engine)
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PROMPTER_WASM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("prompter-wasm-cache"))
}

fn base_config(fuel: bool) -> Config {
    let mut cfg = Config::new();
    cfg.wasm_component_model(true);
    cfg.epoch_interruption(true);
    cfg.consume_fuel(fuel);
    cfg.max_wasm_stack(1 << 20);
    // Compiled code is cached on disk, keyed by the module's content and the engine's settings,
    // so a restart does not recompile.
    let mut cache_cfg = wasmtime::CacheConfig::new();
    cache_cfg.with_directory(cache_dir());
    match wasmtime::Cache::new(cache_cfg) {
        Ok(cache) => {
            cfg.cache(Some(cache));
        }
        Err(e) => {
            tracing::warn!(error = %e, "The WebAssembly compilation cache is unavailable; modules compile at every start.")
        }
    }
    cfg
}

fn linker(engine: &Engine) -> Result<Linker<HostState>, String> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| e.to_string())?;
    Stage::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
        .map_err(|e| e.to_string())?;
    Ok(linker)
}

impl WasmRuntime {
    fn new() -> Result<WasmRuntime, String> {
        let mut cfg = base_config(false);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(POOL_INSTANCES)
            .total_core_instances(POOL_INSTANCES * 4)
            .total_memories(POOL_INSTANCES * 2)
            .total_tables(POOL_INSTANCES * 4)
            .max_memories_per_component(4)
            .max_memory_size(MAX_MEMORY_BYTES);
        cfg.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let (engine, pooling) = match Engine::new(&cfg) {
            Ok(e) => (e, true),
            Err(e) => {
                tracing::warn!(error = %e, "The pooling allocator is unavailable here; instances are allocated on demand.");
                (
                    Engine::new(&base_config(false)).map_err(|e| e.to_string())?,
                    false,
                )
            }
        };
        let linker = linker(&engine)?;
        start_epoch_ticker(engine.clone());
        Ok(WasmRuntime {
            engine,
            linker,
            fuel: OnceLock::new(),
            compiled: Mutex::default(),
            slots: Slots::new(POOL_INSTANCES as usize),
            pooling,
        })
    }

    fn fuel_parts(&self) -> Result<(Engine, Linker<HostState>), LoadError> {
        // Fuel metering slows every call, so it lives in a second engine that only stages asking
        // for deterministic limits (tests) use.
        self.fuel
            .get_or_init(|| {
                let engine = Engine::new(&base_config(true)).map_err(|e| e.to_string())?;
                let linker = linker(&engine)?;
                start_epoch_ticker(engine.clone());
                Ok((engine, linker))
            })
            .clone()
            .map_err(LoadError::Engine)
    }

    /// Compiles (or finds already compiled) the component at `path` and checks it is a stage
    /// plugin of our contract version.
    ///
    /// # Errors
    /// See [`LoadError`].
    pub fn load(&self, path: &Path, fuel: bool) -> Result<StagePre<HostState>, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0] {
            return Err(LoadError::CoreModule(path.to_path_buf()));
        }
        let key: [u8; 32] = Sha256::digest(&bytes).into();
        if let Some(pre) = self
            .compiled
            .lock()
            .ok()
            .and_then(|m| m.get(&(key, fuel)).cloned())
        {
            return Ok(pre);
        }
        let (engine, linker) = if fuel {
            self.fuel_parts()?
        } else {
            (self.engine.clone(), self.linker.clone())
        };
        let component = Component::new(&engine, &bytes).map_err(|e| LoadError::Compile {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        })?;
        check_contract(&engine, &component, path)?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(StagePre::new)
            .map_err(|e| LoadError::NotAPlugin {
                path: path.to_path_buf(),
                message: format!("{e:#}"),
            })?;
        if let Ok(mut m) = self.compiled.lock() {
            m.insert((key, fuel), pre.clone());
        }
        Ok(pre)
    }
}

/// Refuses components built for another contract version, with a message that says so
/// (instead of wasmtime's "import not found").
fn check_contract(engine: &Engine, component: &Component, path: &Path) -> Result<(), LoadError> {
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix(&format!("{CONTRACT_PACKAGE}/")) {
            let version = rest
                .split_once('@')
                .map(|(_, v)| v)
                .unwrap_or("(unversioned)");
            if !compatible(version) {
                return Err(LoadError::Version {
                    path: path.to_path_buf(),
                    found: version.to_owned(),
                });
            }
        }
    }
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_owned()).collect();
    for needed in ["init", "process"] {
        if !exports.iter().any(|e| e == needed) {
            return Err(LoadError::NotAPlugin {
                path: path.to_path_buf(),
                message: format!(
                    "it does not export `{needed}` (exports: {})",
                    if exports.is_empty() {
                        "none".into()
                    } else {
                        exports.join(", ")
                    }
                ),
            });
        }
    }
    Ok(())
}

/// 0.x versions are compatible within the same minor version (semver).
fn compatible(found: &str) -> bool {
    let mut ours = CONTRACT_VERSION.split('.');
    let mut theirs = found.split('.');
    ours.next() == theirs.next() && ours.next() == theirs.next()
}

fn start_epoch_ticker(engine: Engine) {
    // One thread per engine for the life of the process: it only advances the epoch that
    // per-call deadlines are measured against.
    let spawned = std::thread::Builder::new()
        .name("prompter-wasm-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "Cannot start the WebAssembly epoch thread; plugin deadlines will not be enforced.");
    }
}

#[cfg(test)]
mod tests {
    use super::compatible;

    #[test]
    fn contract_versions() {
        assert!(compatible("0.1.0"));
        assert!(compatible("0.1.7"));
        assert!(!compatible("0.2.0"));
        assert!(!compatible("1.1.0"));
    }
}
