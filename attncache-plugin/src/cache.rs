//! [`AttnCache`]: the store plus the policy around it — which requests use the cache, when
//! a miss is recorded, and the counters a deployment scrapes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use crate::config::CacheConfig;
use crate::entry::MapEntry;
use crate::error::AttnCacheError;
use crate::features::FeatureExtractor;
use crate::index::SimilarityIndex;
use crate::store::{token_key, MapStore, StoreConfig};

/// What a lookup found for one input.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Stored maps for exactly these tokens.
    Hit(Arc<MapEntry>),
    /// Stored maps of another input of the same length whose feature lies within the
    /// similarity threshold.
    Near {
        /// The neighbour's entry.
        entry: Arc<MapEntry>,
        /// L2 distance between the two features.
        distance: f32,
    },
    /// Nothing stored; `record` says whether this miss should record its maps.
    Miss {
        /// Admitted by the admission policy.
        record: bool,
    },
}

/// What a lookup decided, as reported by [`AttnCache::last_decision`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    /// The outcome.
    pub outcome: Outcome,
    /// Feature distance to the entry used (0 for an exact hit), if any.
    pub distance: Option<f32>,
    /// Tokens of the input.
    pub tokens: usize,
    /// Time the lookup took (hashing, index search, tier read and decode), nanoseconds.
    pub lookup_ns: u64,
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
}

/// Counters of cache decisions (the store keeps its own, see [`crate::store::StoreStats`]).
#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    hits: AtomicU64,
    near_hits: AtomicU64,
    misses: AtomicU64,
    recorded: AtomicU64,
    lookup_ns: AtomicU64,
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    /// Inputs looked up.
    pub lookups: u64,
    /// Inputs whose maps came from the store (exact and near).
    pub hits: u64,
    /// Of those, inputs that took a similar input's maps.
    pub near_hits: u64,
    /// Entries in the similarity index.
    pub indexed: u64,
    /// Inputs computed exactly.
    pub misses: u64,
    /// Inputs whose maps were recorded.
    pub recorded: u64,
    /// Total lookup time (hashing, tier reads, decoding), nanoseconds.
    pub lookup_ns: u64,
    /// Hits served from RAM.
    pub hot_hits: u64,
    /// Hits read from disk.
    pub cold_hits: u64,
    /// Entries (and bytes) in the hot tier.
    pub hot_entries: u64,
    /// Bytes in the hot tier.
    pub hot_bytes: u64,
    /// Entries in the cold tier.
    pub cold_entries: u64,
    /// Bytes in the cold tier.
    pub cold_bytes: u64,
    /// Cold files removed to stay within budget.
    pub cold_evictions: u64,
    /// Hot entries evicted to stay within the hot budget.
    pub hot_evictions: u64,
    /// Corrupt, truncated or foreign files found (each a miss plus a warning).
    pub corrupt: u64,
    /// Cold-tier copies skipped because the background writer was behind.
    pub cold_writes_skipped: u64,
}

/// The attention-map cache.
#[derive(Debug)]
pub struct AttnCache {
    config: CacheConfig,
    features: FeatureExtractor,
    enabled_by_default: AtomicBool,
    store: MapStore,
    index: SimilarityIndex,
    threshold_bits: AtomicU32,
    admission: AtomicBool,
    last: std::sync::Mutex<Option<Decision>>,
    flags: DashMap<usize, bool>,
    decisions: DashMap<usize, Decision>,
    sightings: moka::sync::Cache<u64, u32>,
    counters: Counters,
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
        let features = FeatureExtractor::load(&config.features, fingerprint)?;
        let threshold = config.similarity_threshold.or_else(|| {
            features
                .projector()
                .and_then(|p| p.config().calibrated_threshold)
        });
        let store = MapStore::open(StoreConfig {
            hot_bytes: config.hot_bytes,
            cold_dir: config.cold_dir.clone(),
            cold_bytes: config.cold_bytes,
            fingerprint,
        })
        .map_err(|e| AttnCacheError::Io {
            what: "opening the cold tier",
            source: e,
        })?;
        let index = SimilarityIndex::default();
        let mut foreign = 0usize;
        for found in store.take_scanned() {
            if found.feature_id == features.id() {
                index.insert(found.len, found.key, &found.feature);
            } else if !found.feature.is_empty() {
                foreign += 1;
            }
        }
        if foreign > 0 {
            tracing::warn!(
                entries = foreign,
                features = %features.describe(),
                "stored entries have features of another computation: exact matches only for them"
            );
        }
        Ok(Self {
            index,
            features,
            threshold_bits: AtomicU32::new(threshold_to_bits(threshold)),
            admission: AtomicBool::new(true),
            last: std::sync::Mutex::new(None),
            enabled_by_default: AtomicBool::new(config.enabled_by_default),
            config,
            store,
            flags: DashMap::new(),
            decisions: DashMap::new(),
            sightings: moka::sync::Cache::new(1 << 16),
            counters: Counters::default(),
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

    /// Turns recording of misses on or off (calibration measures without growing the store).
    pub fn set_admission(&self, on: bool) {
        self.admission.store(on, Ordering::Relaxed);
    }

    /// The most recent lookup's decision (for tools that send one input at a time).
    pub fn last_decision(&self) -> Option<Decision> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether requests that do not say use the cache.
    pub fn enabled_by_default(&self) -> bool {
        self.enabled_by_default.load(Ordering::Relaxed)
    }

    /// Sets whether requests that do not say use the cache.
    pub fn set_enabled_by_default(&self, on: bool) {
        self.enabled_by_default.store(on, Ordering::Relaxed);
    }

    /// Sets whether the request `request_id` uses the cache (overrides the default).
    pub fn set_request_flag(&self, request_id: usize, on: bool) {
        self.flags.insert(request_id, on);
    }

    /// Forgets the flag (and any unclaimed decision) of a finished request.
    pub fn clear_request_flag(&self, request_id: usize) {
        self.flags.remove(&request_id);
        self.decisions.remove(&request_id);
    }

    /// The decision taken for the input of `request_id`, once (kept only for requests
    /// whose flag was set with [`AttnCache::set_request_flag`]).
    pub fn take_decision(&self, request_id: usize) -> Option<Decision> {
        self.decisions.remove(&request_id).map(|(_, d)| d)
    }

    /// [`AttnCache::lookup`] on behalf of `request_id`, keeping its decision for
    /// [`AttnCache::take_decision`] when the request set a flag.
    pub fn lookup_for(&self, request_id: usize, tokens: &[u32], feature: Option<&[f32]>) -> Lookup {
        let (found, decision) = self.decide(tokens, feature);
        if self.flags.contains_key(&request_id) {
            self.decisions.insert(request_id, decision);
        }
        found
    }

    /// Whether `request_id` uses the cache.
    pub fn enabled_for(&self, request_id: usize) -> bool {
        self.flags
            .get(&request_id)
            .map_or_else(|| self.enabled_by_default.load(Ordering::Relaxed), |f| *f)
    }

    /// Looks `tokens` up — exactly, then (with a feature and a threshold) the nearest stored
    /// input of the same length; counts the decision and its time.
    pub fn lookup(&self, tokens: &[u32], feature: Option<&[f32]>) -> Lookup {
        self.decide(tokens, feature).0
    }

    fn decide(&self, tokens: &[u32], feature: Option<&[f32]>) -> (Lookup, Decision) {
        let started = Instant::now();
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let cacheable = (self.config.min_tokens..=self.config.max_tokens).contains(&tokens.len());
        let found = if !cacheable {
            None
        } else {
            self.store
                .get(tokens)
                .map(Lookup::Hit)
                .or_else(|| self.near(tokens.len(), feature?))
        };
        let result = match found {
            Some(hit) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                if matches!(hit, Lookup::Near { .. }) {
                    self.counters.near_hits.fetch_add(1, Ordering::Relaxed);
                }
                hit
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                let record = cacheable && self.admit(tokens);
                Lookup::Miss { record }
            }
        };
        let lookup_ns = started.elapsed().as_nanos() as u64;
        let decision = match &result {
            Lookup::Hit(_) => Decision {
                outcome: Outcome::ExactHit,
                distance: Some(0.0),
                tokens: tokens.len(),
                lookup_ns,
            },
            Lookup::Near { distance, .. } => Decision {
                outcome: Outcome::NearHit,
                distance: Some(*distance),
                tokens: tokens.len(),
                lookup_ns,
            },
            Lookup::Miss { .. } => Decision {
                outcome: Outcome::Miss,
                distance: None,
                tokens: tokens.len(),
                lookup_ns,
            },
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision);
        self.counters
            .lookup_ns
            .fetch_add(lookup_ns, Ordering::Relaxed);
        (result, decision)
    }

    fn near(&self, len: usize, feature: &[f32]) -> Option<Lookup> {
        let threshold = self.similarity_threshold()?;
        self.index
            .nearest(len, feature, 4)
            .into_iter()
            .take_while(|(_, d)| *d <= threshold)
            .find_map(|(key, distance)| {
                let entry = self.store.get_by_key(key, len)?;
                Some(Lookup::Near { entry, distance })
            })
    }

    fn admit(&self, tokens: &[u32]) -> bool {
        if !self.admission.load(Ordering::Relaxed) {
            return false;
        }
        if self.config.admit_after <= 1 {
            return true;
        }
        let key = token_key(tokens);
        let seen = self.sightings.get(&key).unwrap_or(0) + 1;
        self.sightings.insert(key, seen);
        seen >= self.config.admit_after
    }

    /// Predicted miss ratio of the hot tier at a quarter, half, one and two times its
    /// budget: `(bytes, share of re-accesses that would have to read the cold tier or
    /// recompute)`, from sampled reuse distances (see [`crate::tier_sizing`]).
    pub fn hot_tier_curve(&self) -> Vec<(u64, f64)> {
        let sizes: Vec<u64> = [1, 2, 4, 8]
            .iter()
            .map(|m| self.config.hot_bytes * m / 4)
            .collect();
        let ratios = self.store.hot_miss_ratios(&sizes);
        sizes.into_iter().zip(ratios).collect()
    }

    /// Waits until every recorded entry queued for the cold tier is on disk.
    pub fn flush(&self) {
        self.store.flush();
    }

    /// Stores the maps recorded for one input.
    pub fn record(&self, entry: MapEntry) {
        self.sightings.invalidate(&token_key(&entry.tokens));
        self.counters.recorded.fetch_add(1, Ordering::Relaxed);
        if entry.feature_id == self.features.id() {
            self.index
                .insert(entry.len(), token_key(&entry.tokens), &entry.feature);
        }
        self.store.insert(entry);
    }

    /// Current counters of the cache and both tiers.
    pub fn counts(&self) -> CacheCounts {
        let c = &self.counters;
        let s = self.store.stats();
        let (hot_entries, hot_bytes) = self.store.hot_usage();
        let (cold_entries, cold_bytes) = self.store.cold_usage();
        CacheCounts {
            lookups: c.lookups.load(Ordering::Relaxed),
            hits: c.hits.load(Ordering::Relaxed),
            near_hits: c.near_hits.load(Ordering::Relaxed),
            indexed: self.index.len() as u64,
            misses: c.misses.load(Ordering::Relaxed),
            recorded: c.recorded.load(Ordering::Relaxed),
            lookup_ns: c.lookup_ns.load(Ordering::Relaxed),
            hot_hits: s.hot_hits.load(Ordering::Relaxed),
            cold_hits: s.cold_hits.load(Ordering::Relaxed),
            hot_entries,
            hot_bytes,
            cold_entries,
            cold_bytes,
            cold_evictions: s.cold_evictions.load(Ordering::Relaxed),
            hot_evictions: s.hot_evictions.load(Ordering::Relaxed),
            corrupt: s.corrupt.load(Ordering::Relaxed),
            cold_writes_skipped: s.cold_writes_skipped.load(Ordering::Relaxed),
        }
    }
}

const NO_THRESHOLD: u32 = u32::MAX;

fn threshold_to_bits(t: Option<f32>) -> u32 {
    t.filter(|t| t.is_finite() || *t == f32::INFINITY)
        .map_or(NO_THRESHOLD, f32::to_bits)
}
