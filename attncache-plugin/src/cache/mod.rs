//! [`AttnCache`]: the store plus the policy around it — which requests use the cache, when
//! a miss is recorded, and the counters a deployment scrapes.
//!
//! Owns: the registry of requests (each owned by its [`RequestTicket`]), the similarity index per scope, the decision of each
//! lookup, the counters. May call: `storage` (the store), `lookup` (features, index, gate),
//! `reuse` (policies), `tiering` (sizing, access trace). Called by the hook and the server.

mod counters;
mod lookup;
mod record;
mod requests;
mod sizing;

pub use counters::CacheCounts;
use counters::Counters;
pub use requests::RequestTicket;
pub use sizing::HotTierSizing;
use sizing::Sizing;

use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use crate::config::CacheConfig;
use crate::error::AttnCacheError;
use crate::lookup::error_gate::ErrorGate;
use crate::lookup::features::FeatureExtractor;
use crate::lookup::index::SimilarityIndex;
use crate::lookup::span_index::SpanIndex;
use crate::reuse::blend::ReuseKind;
use crate::reuse::maps::{align, ReusePolicy};
use crate::storage::entry::Entry;
use crate::storage::store::{token_key, MapStore, StoreConfig};
use crate::tiering::access_trace::{AccessTrace, TraceOp};
use crate::tiering::sizing::{CostModel, SharedSampler, SizingDecision, STORE_SAMPLED_KEYS};

/// What a lookup found for one input.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Stored maps for exactly these tokens.
    Hit(Arc<Entry>),
    /// Stored maps of another input of the same length whose feature lies within the
    /// similarity threshold.
    Near {
        /// The neighbour's entry.
        entry: Arc<Entry>,
        /// L2 distance between the two features.
        distance: f32,
        /// Positions whose token differs from the neighbour's.
        differing: usize,
        /// Rows to recompute in every reused layer (sorted); `None`: reuse whole maps.
        recompute: Option<Arc<[u32]>>,
        /// Where each input position takes its row and column from, when the neighbour has
        /// another length or a shifted middle; `None`: position by position. With `spans`,
        /// positions in `entry` then `spans` laid end to end.
        alignment: Option<Arc<[u32]>>,
        /// Further stored inputs the alignment takes runs of tokens from (blend reuse aligned
        /// by content across several stored inputs); empty otherwise.
        spans: Vec<Arc<Entry>>,
        /// The error gate's predicted `1 − cosine`, when a gate decided.
        predicted_loss: Option<f64>,
    },
    /// Nothing stored; `record` says whether this miss should record its maps.
    Miss {
        /// Admitted by the admission policy.
        record: bool,
    },
}

/// What a lookup decided, as kept for the request ([`RequestTicket::take_decision`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The outcome.
    pub outcome: Outcome,
    /// Feature distance to the entry used (0 for an exact hit), if any.
    pub distance: Option<f32>,
    /// Tokens of the input.
    pub tokens: usize,
    /// Positions whose token differs from the entry used (near hits; 0 for exact hits).
    pub differing: Option<u32>,
    /// The error gate's predicted `1 − cosine` of the near hit, when a gate decided.
    pub predicted_loss: Option<f32>,
    /// Attention rows recomputed per reused layer (selective recompute).
    pub recomputed_rows: u32,
    /// Time the lookup took (hashing, index search, tier read and decode), nanoseconds.
    pub lookup_ns: u64,
    /// Blend hits: the largest check-layer deviation left outside the recomputed positions.
    pub residual_deviation: Option<f32>,
    /// Escalated blend hits: the layer after which every position was computed again.
    pub resumed_after_layer: Option<u32>,
    /// Blend candidates: what the check layer saw of the S taken (or, when refused, of the
    /// last S the fidelity gate turned down).
    pub check: Option<crate::reuse::blend::CheckSignals>,
    /// Near hits: how many stored inputs the hit takes positions from (more than one: blend
    /// aligned by content across several stored inputs).
    pub stored_inputs: Option<u32>,
}

/// Outcome of one lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Identical token ids were stored.
    ExactHit,
    /// A similar input's maps are used.
    NearHit,
    /// Nothing usable: computed exactly.
    Miss,
    /// Outside the cached lengths (`min_tokens..=max_tokens`): computed exactly, neither
    /// looked up nor recorded.
    NotCached,
}

/// One isolated scope: its own tiers, similarity index and admission counts.
#[derive(Debug)]
struct ScopeCache {
    store: MapStore,
    /// The store's sampled reuse distances, for hot-tier sizing.
    reuse: Arc<SharedSampler>,
    index: SimilarityIndex,
    /// Runs of tokens of the stored inputs, under blend reuse (content alignment across
    /// stored inputs).
    spans: Option<SpanIndex>,
    sightings: moka::sync::Cache<u64, u32>,
}

/// The attention-map cache.
#[derive(Debug)]
pub struct AttnCache {
    config: CacheConfig,
    features: FeatureExtractor,
    enabled_by_default: AtomicBool,
    scopes: Vec<ScopeCache>,
    cold_unavailable: u64,
    threshold_bits: AtomicU32,
    reuse: RwLock<Arc<ReusePolicy>>,
    blend: RwLock<Arc<crate::reuse::blend::BlendPolicy>>,
    gate: RwLock<Option<Arc<ErrorGate>>>,
    admission: AtomicBool,
    /// Registered requests ([`AttnCache::ticket`]), by mistral.rs request id.
    requests: DashMap<usize, Arc<requests::RequestState>>,
    counters: Counters,
    sizing: parking_lot::Mutex<Sizing>,
    trace: Option<AccessTrace>,
}

impl AttnCache {
    /// Opens the cache for the model with `fingerprint` (entries of other models are ignored).
    ///
    /// Loads the feature computation (a projector must have been trained for this model).
    /// Without a `similarity_threshold`, a projector's calibrated threshold applies, if
    /// `attncache calibrate` recorded one; otherwise only identical token ids hit.
    /// Stored entries whose features came from another computation serve exact matches only.
    pub fn open(config: CacheConfig, fingerprint: u64) -> Result<Self, AttnCacheError> {
        config.validate()?;
        let features = FeatureExtractor::load_accepting(
            &config.features,
            fingerprint,
            config.legacy_fingerprint,
        )?;
        let threshold = config.similarity_threshold.or_else(|| {
            features
                .projector()
                .and_then(|p| p.config().calibrated_threshold)
        });
        let n = config.scope_count();
        let mut scopes = Vec::with_capacity(n);
        let mut cold_unavailable = 0;
        let mut foreign = 0usize;
        let mut legacy_files = 0u64;
        for i in 0..n {
            let cold_dir = config
                .cold_dir
                .as_ref()
                .map(|d| match config.scopes.get(i) {
                    Some(name) => d.join(format!("scope-{name}")),
                    None => d.clone(),
                });
            let redis = config.redis.clone();
            let store_config = StoreConfig {
                hot_bytes: config.hot_bytes / n as u64,
                cold_dir,
                cold_bytes: config.cold_bytes / n as u64,
                fingerprint,
                redis,
                scope: config
                    .scopes
                    .get(i)
                    .map_or_else(|| "global".to_string(), |s| format!("scope-{s}")),
            };
            let store = match MapStore::open(store_config.clone()) {
                Ok(store) => store,
                Err(e) => {
                    // an unreadable or unwritable directory must not take the server down
                    cold_unavailable += 1;
                    tracing::warn!(
                        dir = ?store_config.cold_dir,
                        "cold tier unavailable, keeping maps in RAM only: {e}"
                    );
                    MapStore::open(StoreConfig {
                        cold_dir: None,
                        redis: None,
                        ..store_config
                    })
                    .map_err(|e| AttnCacheError::Io {
                        what: "opening the hot tier",
                        source: e,
                    })?
                }
            };
            if let Some(legacy) = config.legacy_fingerprint.filter(|l| *l != fingerprint) {
                legacy_files += store.legacy_entries(legacy);
            }
            let index = SimilarityIndex::default();
            let spans = (config.reuse_kind == ReuseKind::Blend).then(SpanIndex::default);
            foreign += index_entries(&index, spans.as_ref(), store.take_scanned(), features.id());
            let reuse = Arc::new(SharedSampler::new(STORE_SAMPLED_KEYS));
            store.observe_accesses(reuse.clone());
            scopes.push(ScopeCache {
                store,
                reuse,
                index,
                spans,
                sightings: moka::sync::Cache::new(1 << 16),
            });
        }
        if legacy_files > 0 {
            tracing::warn!(
                entries = legacy_files,
                dir = ?config.cold_dir,
                "cold-tier entries filed under the key scheme of earlier builds are not used \
                 (misses; they are left in place: delete their directory, named after the old \
                 fingerprint {:016x}, to reclaim the space)",
                config.legacy_fingerprint.unwrap_or_default()
            );
        }
        if foreign > 0 {
            tracing::warn!(
                entries = foreign,
                features = %features.describe(),
                "stored entries have features of another computation: exact matches only for them"
            );
        }
        let trace = config
            .access_trace
            .as_deref()
            .map(AccessTrace::create)
            .transpose()?;
        Ok(Self {
            trace,
            scopes,
            cold_unavailable,
            features,
            threshold_bits: AtomicU32::new(threshold_to_bits(threshold)),
            reuse: RwLock::new(Arc::new(config.reuse.clone())),
            blend: RwLock::new(Arc::new(config.blend.clone())),
            gate: RwLock::new(config.error_gate.clone().map(Arc::new)),
            admission: AtomicBool::new(true),
            enabled_by_default: AtomicBool::new(config.enabled_by_default),
            config,
            requests: DashMap::new(),
            counters: Counters::default(),
            sizing: parking_lot::Mutex::new(Sizing::default()),
        })
    }

    /// The settings the cache was opened with.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The feature computation in force.
    pub fn features(&self) -> &FeatureExtractor {
        &self.features
    }

    /// The similarity threshold in force (`None`: exact token matches only).
    pub fn similarity_threshold(&self) -> Option<f32> {
        let bits = self.threshold_bits.load(Ordering::Relaxed);
        (bits != NO_THRESHOLD).then(|| f32::from_bits(bits))
    }

    /// Changes the similarity threshold (`None`: exact token matches only).
    pub fn set_similarity_threshold(&self, threshold: Option<f32>) {
        self.threshold_bits
            .store(threshold_to_bits(threshold), Ordering::Relaxed);
    }

    /// What a near hit reuses.
    pub fn reuse_policy(&self) -> Arc<ReusePolicy> {
        self.reuse.read().clone()
    }

    /// Changes what near hits reuse (takes effect at the next forward's decisions).
    pub fn set_reuse_policy(&self, policy: ReusePolicy) -> Result<(), AttnCacheError> {
        policy.validate()?;
        *self.reuse.write() = Arc::new(policy);
        Ok(())
    }

    /// How blend hits choose what they recompute (`--reuse blend`).
    pub fn blend_policy(&self) -> Arc<crate::reuse::blend::BlendPolicy> {
        self.blend.read().clone()
    }

    /// Changes the blend policy (takes effect at the next forward's decisions).
    pub fn set_blend_policy(
        &self,
        policy: crate::reuse::blend::BlendPolicy,
    ) -> Result<(), AttnCacheError> {
        policy.validate()?;
        *self.blend.write() = Arc::new(policy);
        Ok(())
    }

    /// The predicted-error gate in force, if any.
    pub fn error_gate(&self) -> Option<Arc<ErrorGate>> {
        self.gate.read().clone()
    }

    /// Sets (or with `None` removes) the predicted-error gate. With a gate, near hits are
    /// decided by it and the similarity threshold is not used.
    pub fn set_error_gate(&self, gate: Option<ErrorGate>) -> Result<(), AttnCacheError> {
        if let Some(g) = &gate {
            g.validate()?;
        }
        *self.gate.write() = gate.map(Arc::new);
        Ok(())
    }

    /// Turns recording of misses on or off (calibration measures without growing the store).
    pub fn set_admission(&self, on: bool) {
        self.admission.store(on, Ordering::Relaxed);
    }

    /// The cold tier's kind ("disk", "redis"), if there is one.
    pub fn cold_kind(&self) -> Option<&'static str> {
        self.scopes.first()?.store.cold_kind()
    }
}

const NO_THRESHOLD: u32 = u32::MAX;
/// Neighbours a similarity lookup considers.
const NEIGHBOURS: usize = 8;

/// Adds the entries whose features come from the computation `feature_id` to `index`, and
/// every entry's tokens to `spans`; returns how many carry features of another computation
/// (no similarity lookup for them).
fn index_entries(
    index: &SimilarityIndex,
    spans: Option<&SpanIndex>,
    entries: Vec<crate::storage::store::Indexed>,
    feature_id: u32,
) -> usize {
    let mut foreign = 0;
    for found in entries {
        if let Some(spans) = spans {
            spans.insert(found.key, found.tokens.clone());
        }
        if found.feature_id == feature_id {
            index.insert(found.key, found.tokens.clone(), &found.feature);
        } else if !found.feature.is_empty() {
            foreign += 1;
        }
    }
    foreign
}

fn threshold_to_bits(t: Option<f32>) -> u32 {
    t.filter(|t| t.is_finite() || *t == f32::INFINITY)
        .map_or(NO_THRESHOLD, f32::to_bits)
}
