//! The embedded default embedder: local, deterministic, LEXICAL feature hashing.
//!
//! It owns turning a text into a fixed-size, L2-normalized vector from the words and spellings
//! the text contains; it does not capture meaning (synonyms with no shared words or letters score
//! near zero). Semantic embeddings come from a model provider (Nebula) later.
//!
//! Features, each hashed into one of `dims` buckets with a hash-chosen sign:
//! - lowercased word unigrams (weight 1.0) and bigrams of adjacent words (weight 0.7), so a
//!   tracker name like "Budget Constraints" matches the row that starts with it;
//! - character trigrams of each word padded with spaces (weight 0.3: `" budget "` gives
//!   `" bu"`, `"bud"`, ..., `"et "`), so inflections and typos ("budgets", "budgte") still
//!   overlap.
//!
//! Punctuation is stripped and a tiny English stopword list is skipped. A feature seen `n` times
//! counts `1 + ln n` (sublinear), so one repeated word cannot dominate a short text.

use std::collections::BTreeMap;

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::Embedder;
use serde::Deserialize;

/// Words skipped for every feature. Their character trigrams are skipped too: they would make
/// every pair of English sentences look alike.
const STOPWORDS: &[&str] = &[
    "a", "an", "the", "to", "of", "and", "or", "is", "are", "we", "i", "you", "it", "this", "that",
    "for", "in", "on", "our", "your", "be", "with", "do", "don't", "not",
];

const UNIGRAM_WEIGHT: f32 = 1.0;
const BIGRAM_WEIGHT: f32 = 0.7;
const TRIGRAM_WEIGHT: f32 = 0.3;

/// A lexical embedder by feature hashing; see the module docs.
///
/// # Examples
/// ```
/// use prompter_plugin_retrieve::embedder::{HashingEmbedder, cosine};
///
/// let e = HashingEmbedder::default();
/// let budget = e.embed("Budget Constraints: it's too expensive");
/// assert!(cosine(&budget, &e.embed("budget constraints")) > cosine(&budget, &e.embed("security review")));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingEmbedder {
    dims: usize,
}

impl Default for HashingEmbedder {
    fn default() -> Self {
        HashingEmbedder::new(Self::DEFAULT_DIMS)
    }
}

impl HashingEmbedder {
    /// The default number of dimensions.
    pub const DEFAULT_DIMS: usize = 1024;

    /// An embedder producing `dims`-dimensional vectors (zero is treated as one).
    pub fn new(dims: usize) -> Self {
        HashingEmbedder { dims: dims.max(1) }
    }

    /// The number of dimensions of the vectors.
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// Names the algorithm, its version and its parameters (`hashing-v1-1024`): an index built
    /// by an embedder with another id must be rebuilt.
    pub fn id(&self) -> String {
        format!("hashing-v1-{}", self.dims)
    }

    /// The L2-normalized embedding of `text`; all zeros when the text has no features (empty,
    /// punctuation or stopwords only).
    pub fn embed(&self, text: &str) -> Vec<f32> {
        // Keyed by hash in a BTreeMap so buckets are summed in the same order on every run:
        // embeddings are bit-for-bit reproducible.
        let mut features: BTreeMap<u64, (f32, u32)> = BTreeMap::new();
        let mut add = |kind: u8, feature: &str, weight: f32| {
            let entry = features
                .entry(feature_hash(kind, feature))
                .or_insert((weight, 0));
            entry.1 += 1;
        };
        let words = words(text);
        // One buffer for every trigram and bigram: the hashes are of the same bytes as before,
        // without a String per feature.
        let mut feature = String::new();
        for w in &words {
            add(b'u', w, UNIGRAM_WEIGHT);
            let padded: Vec<char> = std::iter::once(' ')
                .chain(w.chars())
                .chain(std::iter::once(' '))
                .collect();
            for tri in padded.windows(3) {
                feature.clear();
                feature.extend(tri);
                add(b'c', &feature, TRIGRAM_WEIGHT);
            }
        }
        for pair in words.windows(2) {
            feature.clear();
            feature.push_str(&pair[0]);
            feature.push(' ');
            feature.push_str(&pair[1]);
            add(b'b', &feature, BIGRAM_WEIGHT);
        }

        let mut v = vec![0.0f32; self.dims];
        for (hash, (weight, count)) in features {
            let value = weight * (1.0 + (count as f32).ln());
            // The low bits pick the bucket, the top bit the sign, so colliding features tend to
            // cancel out instead of piling up.
            let bucket = (hash % self.dims as u64) as usize;
            if hash >> 63 == 1 {
                v[bucket] -= value;
            } else {
                v[bucket] += value;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            for x in &mut v {
                *x /= norm;
            }
        }
        v
    }
}

/// Largest accepted `dims`: beyond it the index grows with no gain for short texts.
pub const MAX_DIMS: usize = 65_536;

/// Configuration of a `hashing` embedder (`embedders.<name>.config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashingConfig {
    /// Dimensions of the vectors, 1 to 65536. Default 1024.
    #[serde(default = "default_dims")]
    pub dims: usize,
}

fn default_dims() -> usize {
    HashingEmbedder::DEFAULT_DIMS
}

/// The [`HashingEmbedder`] as a named [`Embedder`] resource.
#[derive(Debug, Clone)]
pub struct LocalEmbedder {
    name: String,
    inner: HashingEmbedder,
}

impl LocalEmbedder {
    /// A local embedder named `name`.
    ///
    /// # Errors
    /// `dims` out of range, as a message for the config's `dims`.
    pub fn from_config(name: &str, config: &HashingConfig) -> Result<Self, String> {
        if !(1..=MAX_DIMS).contains(&config.dims) {
            return Err(format!(
                "`dims` must be between 1 and {MAX_DIMS}, got {}",
                config.dims
            ));
        }
        Ok(Self::new(name, HashingEmbedder::new(config.dims)))
    }

    /// Wraps `inner` under `name`.
    pub fn new(name: &str, inner: HashingEmbedder) -> Self {
        LocalEmbedder {
            name: name.to_owned(),
            inner,
        }
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> String {
        self.inner.id()
    }
    fn dims(&self) -> Option<usize> {
        Some(self.inner.dims())
    }
    fn max_batch(&self) -> usize {
        1024
    }
    fn embed_local(&self, text: &str) -> Option<Vec<f32>> {
        Some(self.inner.embed(text))
    }
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, PluginError> {
        Ok(texts.iter().map(|t| self.inner.embed(t)).collect())
    }
}

/// Cosine similarity of two vectors (0 when either is all zeros or their lengths differ).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    cosine_with_norms(a, norm(a), b, norm(b))
}

/// [`cosine`] with the vectors' L2 norms known already (a store computes its documents' once).
pub fn cosine_with_norms(a: &[f32], norm_a: f32, b: &[f32], norm_b: f32) -> f32 {
    if a.len() != b.len() || norm_a == 0.0 || norm_b == 0.0 {
        0.0
    } else {
        dot(a, b) / (norm_a * norm_b)
    }
}

/// The L2 norm of `v`.
pub fn norm(v: &[f32]) -> f32 {
    dot(v, v).sqrt()
}

/// Lanes of [`dot`]'s accumulator.
const LANES: usize = 8;

/// The dot product, summed in [`LANES`] independent lanes: one running sum is a chain of
/// dependent float additions the compiler may not reorder, so it cannot use SIMD; eight lanes
/// let it (retrieval ranks every document per query, so this is its inner loop).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += ca[i] * cb[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Lowercased words without punctuation or stopwords. Apostrophes inside words are dropped after
/// the stopword check, so "don't" is a stopword and "we're" becomes "were".
fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .replace('\u{2019}', "'")
        .split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\''))
        .filter(|w| !w.is_empty() && !STOPWORDS.contains(w))
        .map(|w| w.replace('\'', ""))
        .collect()
}

/// FNV-1a 64 over a kind tag and the feature, then a murmur3 finalizer: stable across Rust
/// versions and platforms (unlike std's `DefaultHasher`), and well mixed in every bit.
fn feature_hash(kind: u8, feature: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for &byte in std::iter::once(&kind).chain(feature.as_bytes()) {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_deterministic_and_normalized() {
        let e = HashingEmbedder::default();
        let a = e.embed("Budget Constraints: we don't have the budget");
        assert_eq!(a, e.embed("Budget Constraints: we don't have the budget"));
        assert_eq!(a.len(), 1024);
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn hash_is_stable() {
        // Pinned so a change of hash (which would silently invalidate every persisted index
        // without changing the embedder id) fails here.
        assert_eq!(feature_hash(b'u', "budget"), 0x2143_8d24_2435_c86f);
        assert_eq!(feature_hash(b'c', " bu"), 0x80e2_8145_7aab_17e4);
        let e = HashingEmbedder::new(16);
        let v = e.embed("budget");
        let nonzero: Vec<usize> = (0..16).filter(|&i| v[i] != 0.0).collect();
        assert!(!nonzero.is_empty());
        assert_eq!(v, HashingEmbedder::new(16).embed("BUDGET!"));
    }

    #[test]
    fn similar_texts_score_higher_than_unrelated_ones() {
        let e = HashingEmbedder::default();
        let q = e.embed("Budget Constraints seems expensive");
        let budget = e.embed("Budget Constraints: it's too expensive for us right now");
        let security = e.embed("Security Concerns: where is our data stored and who can see it");
        let timing = e.embed("Timing: call me back next quarter");
        assert!(cosine(&q, &budget) > cosine(&q, &security));
        assert!(cosine(&q, &budget) > cosine(&q, &timing));
        assert!(cosine(&q, &budget) > 0.3, "{}", cosine(&q, &budget));
        // Spellings overlap through character trigrams.
        let typo = e.embed("budgets");
        assert!(cosine(&typo, &e.embed("budget")) > cosine(&typo, &e.embed("security")));
    }

    #[test]
    fn dims_are_respected_and_named_in_the_id() {
        let e = HashingEmbedder::new(64);
        assert_eq!(e.embed("hello world").len(), 64);
        assert_eq!(e.id(), "hashing-v1-64");
        assert_eq!(HashingEmbedder::default().id(), "hashing-v1-1024");
        assert_eq!(HashingEmbedder::new(0).dims(), 1);
    }

    #[test]
    fn stopwords_and_punctuation_are_skipped() {
        assert_eq!(
            words("We don't know; it's the BUDGET, you see!"),
            ["know", "its", "budget", "see"]
        );
        let e = HashingEmbedder::default();
        assert!(e.embed("the, and... of!").iter().all(|x| *x == 0.0));
        assert_eq!(cosine(&e.embed(""), &e.embed("budget")), 0.0);
    }
}
