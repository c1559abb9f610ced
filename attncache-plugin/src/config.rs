//! [`CacheConfig`]: every setting of the attention-map cache in one serde struct.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{bad, AttnCacheError};
pub use crate::storage::redis_settings::RedisSettings;

/// Settings of the attention-map cache.
///
/// A request uses the cache when it asks to, or when it does not say and
/// `enabled_by_default` is set. Lookups match an input's token ids exactly; every layer's
/// maps of a stored input are reused on a hit (fidelity is that of f16 maps). An input is
/// recorded on its `admit_after`-th miss, so one-off inputs do not churn the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Use the cache for requests that do not say (the deployment default).
    pub enabled_by_default: bool,
    /// Hot tier (RAM) budget in bytes of maps.
    pub hot_bytes: u64,
    /// Cold tier directory (files read through mmap); `None` keeps the cache in RAM only.
    pub cold_dir: Option<PathBuf>,
    /// Cold tier budget in bytes; least recently used files are removed past it (with
    /// `redis`: the budget of the shared entries, which every replica should give alike).
    pub cold_bytes: u64,
    /// Keep the cold tier in a Redis server shared by replicas instead of `cold_dir`.
    pub redis: Option<RedisSettings>,
    /// Record an input's maps on its n-th miss (1: on the first).
    pub admit_after: u32,
    /// Inputs with fewer tokens are never cached (their attention is cheap anyway).
    pub min_tokens: usize,
    /// Inputs with more tokens are never cached: an entry grows with the square of the
    /// length (EmbeddingGemma: 151 MB at 1024 tokens, 604 MB at 2048).
    pub max_tokens: usize,
    /// Largest feature distance at which a *different* input of the same length counts as
    /// a hit; `None` (the default) reuses maps of identical token ids only. Set it from
    /// `attncache calibrate`, which measures the fidelity each distance gives.
    pub similarity_threshold: Option<f32>,
    /// How input features are computed.
    pub features: crate::lookup::features::FeatureKind,
    /// What a near hit reuses: which layers, and which rows are recomputed.
    pub reuse: crate::reuse::maps::ReusePolicy,
    /// What a hit reuses: attention maps, or per-layer K/V with the deviating positions
    /// recomputed (blend; see [`crate::reuse::blend`]). One kind per cache: entries of the other
    /// kind are misses (and are replaced when recorded again).
    pub reuse_kind: crate::reuse::blend::ReuseKind,
    /// How a blend hit selects the positions it recomputes and when it is refused.
    pub blend: crate::reuse::blend::BlendPolicy,
    /// Decide near hits by the calibrated predicted error of reusing the neighbour's maps
    /// (its `max_loss` is the target `1 − cosine`); replaces `similarity_threshold`.
    pub error_gate: Option<crate::lookup::error_gate::ErrorGate>,
    /// Isolated scopes (tenants). Empty: one cache shared by every request. Otherwise
    /// one scope per name, each with an equal share of `hot_bytes` and `cold_bytes`, its
    /// own similarity index, admission counts and cold sub-directory `scope-<name>`: a
    /// request of one scope never hits, evicts or times another scope's entries.
    /// Names are 1–64 characters of `[0-9a-z_-]` (the server derives them from a hash of
    /// each API key, never the key itself).
    pub scopes: Vec<String>,
    /// Write every lookup outcome and stored entry to this CSV file (`op,scope,key,bytes`,
    /// no input content) for `attncache size --trace`; `None`: no trace.
    pub access_trace: Option<PathBuf>,
    /// The model's fingerprint as builds before the stable hashes computed it (std's
    /// `DefaultHasher`, see [`crate::storage::stable_hash`]): a projector stamped with it is still
    /// loaded, and cold-tier entries filed under it are reported once (and left alone: they
    /// are misses, never corrupt). `None`: not known.
    pub legacy_fingerprint: Option<u64>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled_by_default: false,
            hot_bytes: 512 << 20,
            cold_dir: None,
            cold_bytes: 8 << 30,
            redis: None,
            admit_after: 1,
            min_tokens: 1,
            max_tokens: 1024,
            similarity_threshold: None,
            features: crate::lookup::features::FeatureKind::MeanPool,
            reuse: crate::reuse::maps::ReusePolicy::default(),
            reuse_kind: crate::reuse::blend::ReuseKind::Maps,
            blend: crate::reuse::blend::BlendPolicy::default(),
            error_gate: None,
            scopes: Vec::new(),
            access_trace: None,
            legacy_fingerprint: None,
        }
    }
}

impl CacheConfig {
    /// Rejects settings that cannot work, with a message naming the setting.
    pub fn validate(&self) -> Result<(), AttnCacheError> {
        if self.hot_bytes < 1 << 20 {
            return bad(
                "hot_bytes",
                self.hot_bytes.to_string(),
                "at least 1 MiB (1048576)",
            );
        }
        if self.cold_dir.is_some() && self.cold_bytes < self.hot_bytes {
            return bad(
                "cold_bytes",
                self.cold_bytes.to_string(),
                "at least hot_bytes when a cold_dir is set",
            );
        }
        if let Some(r) = &self.redis {
            r.validate()?;
            if self.cold_dir.is_some() {
                return bad(
                    "cold_dir",
                    format!("{:?}", self.cold_dir),
                    "unset when the cold tier is in Redis",
                );
            }
        }
        if self.cold_bytes < self.hot_bytes && self.redis.is_some() {
            return bad(
                "cold_bytes",
                self.cold_bytes.to_string(),
                "at least hot_bytes when the cold tier is in Redis",
            );
        }
        if self.admit_after == 0 {
            return bad("admit_after", "0".into(), "1 or more");
        }
        if let Some(t) = self.similarity_threshold {
            if t.is_nan() || t < 0.0 {
                return bad(
                    "similarity_threshold",
                    t.to_string(),
                    "a distance of 0 or more",
                );
            }
        }
        self.reuse.validate()?;
        self.blend.validate()?;
        if let Some(g) = &self.error_gate {
            g.validate()?;
        }
        if self.min_tokens == 0 {
            return bad("min_tokens", "0".into(), "1 or more");
        }
        if self.max_tokens < self.min_tokens {
            return bad(
                "max_tokens",
                self.max_tokens.to_string(),
                "at least min_tokens",
            );
        }
        let mut names = std::collections::HashSet::new();
        for name in &self.scopes {
            let ok = (1..=64).contains(&name.len())
                && name.bytes().all(|b| {
                    b.is_ascii_digit() || b.is_ascii_lowercase() || b == b'_' || b == b'-'
                });
            if !ok || !names.insert(name) {
                return bad(
                    "scopes",
                    name.clone(),
                    "unique names of 1-64 characters from [0-9a-z_-]",
                );
            }
        }
        if self.hot_bytes / (self.scope_count() as u64) < 1 << 20 {
            return bad(
                "hot_bytes",
                self.hot_bytes.to_string(),
                "at least 1 MiB per scope",
            );
        }
        Ok(())
    }

    /// Number of isolated scopes (1 when `scopes` is empty).
    pub fn scope_count(&self) -> usize {
        self.scopes.len().max(1)
    }
}
