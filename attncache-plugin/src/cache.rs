//! [`AttnCache`]: the store plus the policy around it — which requests use the cache, when
//! a miss is recorded, and the counters a deployment scrapes.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use dashmap::DashMap;

use crate::access_trace::{AccessTrace, TraceOp};
use crate::blend::ReuseKind;
use crate::config::CacheConfig;
use crate::entry::MapEntry;
use crate::error::AttnCacheError;
use crate::error_gate::ErrorGate;
use crate::features::FeatureExtractor;
use crate::index::SimilarityIndex;
use crate::reuse::{align, ReusePolicy};
use crate::store::{token_key, MapStore, StoreConfig};
use crate::tier_sizing::{CostModel, SizingDecision};

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
        /// Positions whose token differs from the neighbour's.
        differing: usize,
        /// Rows to recompute in every reused layer (sorted); `None`: reuse whole maps.
        recompute: Option<Arc<[u32]>>,
        /// Where each input position takes its row and column from, when the neighbour has
        /// another length or a shifted middle; `None`: position by position.
        alignment: Option<Arc<[u32]>>,
        /// The error gate's predicted `1 − cosine`, when a gate decided.
        predicted_loss: Option<f64>,
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

/// Counters of cache decisions (the store keeps its own, see [`crate::store::StoreStats`]).
#[derive(Debug, Default)]
struct Counters {
    lookups: AtomicU64,
    not_cached: AtomicU64,
    hits: AtomicU64,
    near_hits: AtomicU64,
    misses: AtomicU64,
    recorded: AtomicU64,
    lookup_ns: AtomicU64,
    forward_ns: AtomicU64,
    forward_inputs: AtomicU64,
    blend_hits: AtomicU64,
    blend_refused: AtomicU64,
    recomputed_tokens: AtomicU64,
}

/// A snapshot of the cache's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounts {
    /// Inputs looked up.
    pub lookups: u64,
    /// Inputs outside the cached lengths (computed exactly, not looked up, not recorded).
    pub not_cached: u64,
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
    /// Hits read from the cold tier (disk, or Redis with a shared backend).
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
    /// Cold-tier writes that failed (full disk, quota, permissions); the entry stayed hot.
    pub cold_write_failures: u64,
    /// Partitions whose cold directory could not be opened (they keep maps in RAM only).
    pub cold_unavailable: u64,
    /// Calls to the shared (Redis) tier that failed or timed out.
    pub shared_errors: u64,
    /// Calls to the shared tier skipped because it was marked down.
    pub shared_skipped: u64,
    /// Partitions whose shared tier is marked down (0: all reachable, or none configured).
    pub shared_down: u64,
    /// Entries other replicas stored that this one indexed.
    pub announced: u64,
    /// Blend hits (exact and near) that recomputed only part of the positions.
    pub blend_hits: u64,
    /// Blend candidates refused at the check layer (computed exactly instead).
    pub blend_refused: u64,
    /// Positions recomputed by blend hits, summed.
    pub recomputed_tokens: u64,
}

/// One isolated partition: its own tiers, similarity index and admission counts.
#[derive(Debug)]
struct Partition {
    store: MapStore,
    index: SimilarityIndex,
    sightings: moka::sync::Cache<u64, u32>,
}

/// The attention-map cache.
#[derive(Debug)]
pub struct AttnCache {
    config: CacheConfig,
    features: FeatureExtractor,
    enabled_by_default: AtomicBool,
    partitions: Vec<Partition>,
    cold_unavailable: u64,
    threshold_bits: AtomicU32,
    reuse: RwLock<Arc<ReusePolicy>>,
    blend: RwLock<Arc<crate::blend::BlendPolicy>>,
    gate: RwLock<Option<Arc<ErrorGate>>>,
    admission: AtomicBool,
    last: std::sync::Mutex<Option<Decision>>,
    flags: DashMap<usize, bool>,
    decisions: DashMap<usize, Decision>,
    request_scopes: DashMap<usize, usize>,
    counters: Counters,
    sizing: std::sync::Mutex<Sizing>,
    trace: Option<AccessTrace>,
}

/// The hot-tier sizing state: the measured costs and the last decision of each partition.
#[derive(Debug, Default)]
struct Sizing {
    cost: Option<CostModel>,
    decisions: Vec<SizingDecision>,
    count: u64,
}

/// What [`AttnCache::hot_tier_sizing`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct HotTierSizing {
    /// The measured costs in use, if any.
    pub cost: Option<CostModel>,
    /// The hot tier's current budget (all partitions), bytes.
    pub budget_bytes: u64,
    /// The latest decision of each partition (empty before the first).
    pub decisions: Vec<SizingDecision>,
    /// Decisions taken since start (one per partition per round).
    pub count: u64,
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
        let n = config.partitions();
        let mut partitions = Vec::with_capacity(n);
        let mut cold_unavailable = 0;
        let mut foreign = 0usize;
        let mut legacy_files = 0usize;
        for i in 0..n {
            let cold_dir = config
                .cold_dir
                .as_ref()
                .map(|d| match config.scopes.get(i) {
                    Some(name) => d.join(format!("scope-{name}")),
                    None => d.clone(),
                });
            let redis = config
                .redis
                .as_ref()
                .map(|r| r.tier_config(config.scopes.get(i)));
            if let (Some(dir), None, Some(legacy)) = (&cold_dir, &redis, config.legacy_fingerprint)
            {
                if legacy != fingerprint {
                    legacy_files += crate::disk_tier::entry_files(dir, legacy);
                }
            }
            let store_config = StoreConfig {
                hot_bytes: config.hot_bytes / n as u64,
                cold_dir,
                cold_bytes: config.cold_bytes / n as u64,
                fingerprint,
                redis,
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
            let index = SimilarityIndex::default();
            foreign += index_entries(&index, store.take_scanned(), features.id());
            partitions.push(Partition {
                store,
                index,
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
            partitions,
            cold_unavailable,
            features,
            threshold_bits: AtomicU32::new(threshold_to_bits(threshold)),
            reuse: RwLock::new(Arc::new(config.reuse.clone())),
            blend: RwLock::new(Arc::new(config.blend.clone())),
            gate: RwLock::new(config.error_gate.clone().map(Arc::new)),
            admission: AtomicBool::new(true),
            last: std::sync::Mutex::new(None),
            enabled_by_default: AtomicBool::new(config.enabled_by_default),
            config,
            flags: DashMap::new(),
            decisions: DashMap::new(),
            request_scopes: DashMap::new(),
            counters: Counters::default(),
            sizing: std::sync::Mutex::new(Sizing::default()),
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
        self.reuse.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes what near hits reuse (takes effect at the next forward's decisions).
    pub fn set_reuse_policy(&self, policy: ReusePolicy) -> Result<(), AttnCacheError> {
        policy.validate()?;
        *self.reuse.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(())
    }

    /// How blend hits choose what they recompute (`--reuse blend`).
    pub fn blend_policy(&self) -> Arc<crate::blend::BlendPolicy> {
        self.blend.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes the blend policy (takes effect at the next forward's decisions).
    pub fn set_blend_policy(
        &self,
        policy: crate::blend::BlendPolicy,
    ) -> Result<(), AttnCacheError> {
        policy.validate()?;
        *self.blend.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        Ok(())
    }

    /// The predicted-error gate in force, if any.
    pub fn error_gate(&self) -> Option<Arc<ErrorGate>> {
        self.gate.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets (or with `None` removes) the predicted-error gate. With a gate, near hits are
    /// decided by it and the similarity threshold is not used.
    pub fn set_error_gate(&self, gate: Option<ErrorGate>) -> Result<(), AttnCacheError> {
        if let Some(g) = &gate {
            g.validate()?;
        }
        *self.gate.write().unwrap_or_else(|e| e.into_inner()) = gate.map(Arc::new);
        Ok(())
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

    /// Forgets the flag, scope (and any unclaimed decision) of a finished request.
    pub fn clear_request_flag(&self, request_id: usize) {
        self.flags.remove(&request_id);
        self.decisions.remove(&request_id);
        self.request_scopes.remove(&request_id);
    }

    /// Assigns `request_id` to the partition `scope` (an index into
    /// [`CacheConfig::scopes`]). With scopes configured, a request without one never uses
    /// the cache.
    pub fn set_request_scope(&self, request_id: usize, scope: usize) -> Result<(), AttnCacheError> {
        if scope >= self.config.scopes.len() {
            return Err(AttnCacheError::InvalidSetting {
                name: "scope",
                value: scope.to_string(),
                expected: "an index into the configured scopes",
            });
        }
        self.request_scopes.insert(request_id, scope);
        Ok(())
    }

    /// The partition `request_id` uses: its assigned scope, the single shared partition
    /// when no scopes are configured, `None` when scopes are configured and it has none.
    pub fn scope_of(&self, request_id: usize) -> Option<usize> {
        match self.request_scopes.get(&request_id) {
            Some(s) => Some(*s),
            None => self.config.scopes.is_empty().then_some(0),
        }
    }

    /// The decision taken for the input of `request_id`, once (kept only for requests
    /// whose flag was set with [`AttnCache::set_request_flag`]).
    pub fn take_decision(&self, request_id: usize) -> Option<Decision> {
        self.decisions.remove(&request_id).map(|(_, d)| d)
    }

    /// [`AttnCache::lookup`] on behalf of `request_id`, keeping its decision for
    /// [`AttnCache::take_decision`] when the request set a flag.
    /// A request without a partition (see [`AttnCache::scope_of`]) is a miss that is not
    /// recorded.
    pub fn lookup_for(&self, request_id: usize, tokens: &[u32], feature: Option<&[f32]>) -> Lookup {
        let Some(scope) = self.scope_of(request_id) else {
            return Lookup::Miss { record: false };
        };
        let (found, decision) = self.decide(scope, tokens, feature);
        if self.flags.contains_key(&request_id) {
            self.decisions.insert(request_id, decision);
        }
        found
    }

    /// Whether `request_id` uses the cache (never without a partition, see
    /// [`AttnCache::scope_of`]).
    pub fn enabled_for(&self, request_id: usize) -> bool {
        self.scope_of(request_id).is_some()
            && self
                .flags
                .get(&request_id)
                .map_or_else(|| self.enabled_by_default.load(Ordering::Relaxed), |f| *f)
    }

    /// Looks `tokens` up — exactly, then (with a feature and a threshold) the nearest stored
    /// input of the same length; counts the decision and its time. Uses the first partition.
    pub fn lookup(&self, tokens: &[u32], feature: Option<&[f32]>) -> Lookup {
        self.decide(0, tokens, feature).0
    }

    fn decide(&self, scope: usize, tokens: &[u32], feature: Option<&[f32]>) -> (Lookup, Decision) {
        let part = &self.partitions[scope];
        let started = Instant::now();
        let announced = part.store.take_announced();
        if !announced.is_empty() {
            let foreign = index_entries(&part.index, announced, self.features.id());
            if foreign > 0 {
                tracing::debug!(
                    entries = foreign,
                    "other replicas stored entries with features of another computation"
                );
            }
        }
        let miss = Decision {
            outcome: Outcome::Miss,
            distance: None,
            tokens: tokens.len(),
            differing: None,
            predicted_loss: None,
            recomputed_rows: 0,
            lookup_ns: 0,
            residual_deviation: None,
        };
        if !self.cacheable(tokens.len()) {
            self.counters.not_cached.fetch_add(1, Ordering::Relaxed);
            let decision = Decision {
                outcome: Outcome::NotCached,
                ..miss
            };
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision);
            return (Lookup::Miss { record: false }, decision);
        }
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let blend = self.config.reuse_kind == ReuseKind::Blend;
        let found = part
            .store
            .get(tokens)
            .filter(|e| e.is_blend() == blend) // the other kind is a miss
            .map(Lookup::Hit)
            .or_else(|| match blend {
                true => self.near_blend(part, tokens, feature?),
                false => self.near(part, tokens, feature?),
            });
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
                let record = self.admit(part, tokens);
                Lookup::Miss { record }
            }
        };
        let lookup_ns = started.elapsed().as_nanos() as u64;
        if let Some(trace) = &self.trace {
            match &result {
                Lookup::Hit(e) | Lookup::Near { entry: e, .. } => {
                    trace.record(TraceOp::Hit, scope, token_key(&e.tokens), e.bytes() as u64)
                }
                Lookup::Miss { .. } => trace.record(TraceOp::Miss, scope, 0, 0),
            }
        }
        let miss = Decision { lookup_ns, ..miss };
        let decision = match &result {
            Lookup::Hit(_) => Decision {
                outcome: Outcome::ExactHit,
                distance: Some(0.0),
                differing: Some(0),
                ..miss
            },
            Lookup::Near {
                distance,
                differing,
                recompute,
                predicted_loss,
                ..
            } => Decision {
                outcome: Outcome::NearHit,
                distance: Some(*distance),
                differing: Some(*differing as u32),
                predicted_loss: predicted_loss.map(|l| l as f32),
                recomputed_rows: recompute.as_ref().map_or(0, |r| r.len() as u32),
                ..miss
            },
            Lookup::Miss { .. } => miss,
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision);
        self.counters
            .lookup_ns
            .fetch_add(lookup_ns, Ordering::Relaxed);
        (result, decision)
    }

    /// A near hit for `tokens`: with an error gate, the best-ranked neighbour (fewest
    /// differing positions, then nearest feature) if its predicted error is within the
    /// target; without one, the nearest neighbour within the similarity threshold.
    fn near(&self, part: &Partition, tokens: &[u32], feature: &[f32]) -> Option<Lookup> {
        let len = tokens.len();
        let gate = self.error_gate();
        let threshold = self.similarity_threshold();
        if gate.is_none() && threshold.is_none() {
            return None;
        }
        let policy = self.reuse_policy();
        // same length first, then up to `length_slack` tokens shorter and longer
        let slack = if gate.is_some() {
            policy.length_slack
        } else {
            0
        };
        let lengths = (len.saturating_sub(slack)..=len + slack).filter(|l| *l > 0);
        let mut found: Vec<(crate::reuse::Alignment, crate::index::Neighbour)> = lengths
            .flat_map(|l| part.index.nearest(l, feature, NEIGHBOURS))
            .map(|n| (align(tokens, &n.tokens), n))
            .collect();
        let use_neighbour = |a: &crate::reuse::Alignment, n: &crate::index::Neighbour| {
            let recompute = policy.rows_to_recompute(len, &a.differing).ok()?;
            let entry = part.store.get_by_key(n.key, n.tokens.len())?;
            let alignment = (!a.identity).then(|| Arc::from(a.source.as_slice()));
            Some((entry, recompute.map(Arc::from), alignment))
        };
        let (best, (entry, recompute, alignment), predicted_loss) = match &gate {
            Some(gate) => {
                found.sort_by(|a, b| {
                    (a.0.differing.len().cmp(&b.0.differing.len()))
                        .then(a.1.distance.total_cmp(&b.1.distance))
                });
                let best = found.first()?;
                let loss = gate.predict(best.1.distance, best.0.differing.len(), len);
                if loss > gate.max_loss {
                    return None;
                }
                (best, use_neighbour(&best.0, &best.1)?, Some(loss))
            }
            None => {
                let t = threshold?;
                found.sort_by(|a, b| a.1.distance.total_cmp(&b.1.distance));
                found
                    .iter()
                    .take_while(|(_, n)| n.distance <= t)
                    .find_map(|c| Some((c, use_neighbour(&c.0, &c.1)?, None)))?
            }
        };
        Some(Lookup::Near {
            entry,
            distance: best.1.distance,
            differing: best.0.differing.len(),
            recompute,
            alignment,
            predicted_loss,
        })
    }

    /// A blend candidate for `tokens`: among the nearest stored inputs (same length, then up
    /// to `length_slack` shorter and longer), the one with the fewest differing positions
    /// after alignment, then the nearest feature, if no more than the policy's share of the
    /// positions differ. Whether it is used is decided at the check layer.
    fn near_blend(&self, part: &Partition, tokens: &[u32], feature: &[f32]) -> Option<Lookup> {
        let len = tokens.len();
        let policy = self.blend_policy();
        let lengths = (len.saturating_sub(policy.length_slack)..=len + policy.length_slack)
            .filter(|l| *l > 0);
        let mut found: Vec<(crate::reuse::Alignment, crate::index::Neighbour)> = lengths
            .flat_map(|l| part.index.nearest(l, feature, NEIGHBOURS))
            .map(|n| (align(tokens, &n.tokens), n))
            .collect();
        found.sort_by(|a, b| {
            (a.0.differing.len().cmp(&b.0.differing.len()))
                .then(a.1.distance.total_cmp(&b.1.distance))
        });
        let cap = (f64::from(policy.max_recompute_share) * len as f64).floor() as usize;
        let (a, n, entry) = found
            .into_iter()
            .take_while(|(a, _)| a.differing.len() <= cap)
            .find_map(|(a, n)| {
                let entry = part
                    .store
                    .get_by_key(n.key, n.tokens.len())
                    .filter(|e| e.is_blend())?;
                Some((a, n, entry))
            })?;
        let differing: Vec<u32> = a.differing.iter().map(|&i| i as u32).collect();
        Some(Lookup::Near {
            entry,
            distance: n.distance,
            differing: a.differing.len(),
            recompute: Some(Arc::from(differing)),
            alignment: (!a.identity).then(|| Arc::from(a.source.as_slice())),
            predicted_loss: None,
        })
    }

    /// Settles a blend hit of `request_id` at the check layer: `Some((recomputed, residual))`
    /// when it was used, `None` when it was refused (then it counts as a miss, and the
    /// request's decision says so).
    pub fn settle_blend(&self, request_id: usize, used: Option<(usize, f32)>) {
        let c = &self.counters;
        match used {
            Some((recomputed, _)) => {
                c.blend_hits.fetch_add(1, Ordering::Relaxed);
                c.recomputed_tokens
                    .fetch_add(recomputed as u64, Ordering::Relaxed);
            }
            None => {
                c.blend_refused.fetch_add(1, Ordering::Relaxed);
                // the lookup counted a hit: it is a miss after all
                let _ = c
                    .hits
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
                c.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        let amend = |d: &mut Decision| match used {
            Some((recomputed, residual)) => {
                d.recomputed_rows = recomputed as u32;
                d.residual_deviation = Some(residual);
            }
            None => {
                if d.outcome == Outcome::NearHit {
                    let _ = c
                        .near_hits
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
                }
                d.outcome = Outcome::Miss;
                d.distance = None;
                d.differing = None;
            }
        };
        if let Some(mut d) = self.decisions.get_mut(&request_id) {
            amend(&mut d);
        }
        if let Some(d) = self.last.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            amend(d);
        }
    }

    /// Whether a miss of `tokens` in partition `scope` should be recorded (used when a
    /// refused blend hit turns into a miss).
    pub fn admits(&self, scope: usize, tokens: &[u32]) -> bool {
        self.cacheable(tokens.len())
            && self
                .partitions
                .get(scope)
                .is_some_and(|p| self.admit(p, tokens))
    }

    /// Whether inputs of `len` tokens are cached at all (`min_tokens..=max_tokens`).
    fn cacheable(&self, len: usize) -> bool {
        (self.config.min_tokens..=self.config.max_tokens).contains(&len)
    }

    fn admit(&self, part: &Partition, tokens: &[u32]) -> bool {
        if !self.admission.load(Ordering::Relaxed) {
            return false;
        }
        if self.config.admit_after <= 1 {
            return true;
        }
        let key = token_key(tokens);
        let seen = part.sightings.get(&key).unwrap_or(0) + 1;
        part.sightings.insert(key, seen);
        seen >= self.config.admit_after
    }

    /// Predicted miss ratio of the hot tier at a quarter, half, one and two times its
    /// budget: `(bytes, share of re-accesses that would have to read the cold tier or
    /// recompute)`, from sampled reuse distances (see [`crate::tier_sizing`]). With several
    /// partitions, the sizes are totals and the ratio is the partitions' mean.
    pub fn hot_tier_curve(&self) -> Vec<(u64, f64)> {
        let n = self.partitions.len() as u64;
        let per_part: Vec<u64> = [1, 2, 4, 8]
            .iter()
            .map(|m| self.config.hot_bytes / n * m / 4)
            .collect();
        let mut mean = vec![0.0; per_part.len()];
        for part in &self.partitions {
            for (m, r) in mean.iter_mut().zip(part.store.hot_miss_ratios(&per_part)) {
                *m += r / n as f64;
            }
        }
        per_part.into_iter().map(|b| b * n).zip(mean).collect()
    }

    /// Sets the measured tier costs the hot-tier sizing uses (see [`crate::tier_costs`]).
    /// Without a cold tier (neither a directory nor Redis) a hot-tier miss is a
    /// recomputation, so the cold-hit cost is raised to the miss cost.
    pub fn set_tier_costs(&self, mut cost: CostModel) {
        if self.cold_kind().is_none() || self.cold_unavailable > 0 {
            cost.cold_hit_ns = cost.cold_hit_ns.max(cost.miss_ns);
        }
        self.sizing.lock().unwrap_or_else(|e| e.into_inner()).cost = Some(cost);
    }

    /// Notes a prefill forward pass of `inputs` inputs that took `ns` (layer 0's attention
    /// to the last layer's), the per-input time hot-tier sizing weighs a slowdown against.
    pub fn note_forward(&self, ns: u64, inputs: usize) {
        self.counters.forward_ns.fetch_add(ns, Ordering::Relaxed);
        self.counters
            .forward_inputs
            .fetch_add(inputs as u64, Ordering::Relaxed);
    }

    /// Mean observed forward time per input, ns (0 before the first).
    pub fn forward_ns_per_input(&self) -> f64 {
        let c = &self.counters;
        c.forward_ns.load(Ordering::Relaxed) as f64
            / c.forward_inputs.load(Ordering::Relaxed).max(1) as f64
    }

    /// Re-decides every partition's hot-tier budget — the smallest (up to its configured
    /// share of `hot_bytes`) whose predicted slowdown against everything hot stays within
    /// `target_loss` — and resizes the tiers. `None` until tier costs are set.
    pub fn resize_hot_tier(&self, target_loss: f64) -> Option<Vec<SizingDecision>> {
        let measured = self.sizing.lock().unwrap_or_else(|e| e.into_inner()).cost?;
        // a slowdown is a share of the whole forward pass, as observed
        let cost = CostModel {
            request_ns: self.forward_ns_per_input(),
            ..measured
        };
        let c = &self.counters;
        let hit_ratio =
            c.hits.load(Ordering::Relaxed) as f64 / c.lookups.load(Ordering::Relaxed).max(1) as f64;
        let max = self.config.hot_bytes / self.partitions.len() as u64;
        let decisions: Vec<SizingDecision> = self
            .partitions
            .iter()
            .map(|part| {
                let d = part.store.size_hot(&cost, hit_ratio, target_loss, max);
                let before = part.store.hot_capacity();
                part.store.resize_hot(d.hot_bytes);
                if before != d.hot_bytes {
                    tracing::info!(
                        from_mib = before >> 20,
                        to_mib = d.hot_bytes >> 20,
                        predicted_slowdown = d.predicted_slowdown,
                        predicted_miss_ratio = d.predicted_miss_ratio,
                        hit_ratio = d.hit_ratio,
                        accesses = d.accesses,
                        "hot tier resized"
                    );
                }
                d
            })
            .collect();
        let mut sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        sizing.count += decisions.len() as u64;
        sizing.decisions = decisions.clone();
        Some(decisions)
    }

    /// The cold tier's kind ("disk", "redis"), if there is one.
    pub fn cold_kind(&self) -> Option<&'static str> {
        self.partitions.first()?.store.cold_kind()
    }

    /// Measures the tier costs for `shape` with cold hits read from this cache's own cold
    /// tier (the first partition's: partitions share one backend). `None` without a cold
    /// tier; an error when it cannot be read now (a shared tier that is down).
    pub fn measure_tier_costs(
        &self,
        shape: &crate::tier_costs::EntryShape,
        reps: usize,
    ) -> Option<Result<crate::tier_costs::MeasuredCosts, AttnCacheError>> {
        let tier = self.partitions.first()?.store.cold_tier()?;
        Some(crate::tier_costs::measure(
            shape,
            crate::tier_costs::ColdSource::Tier(tier),
            reps,
        ))
    }

    /// Forces the hot tier's budget to `bytes` (split equally between partitions, at least
    /// 1 MiB each), keeping the most recently used entries that fit.
    pub fn set_hot_bytes(&self, bytes: u64) {
        let each = bytes / self.partitions.len() as u64;
        for part in &self.partitions {
            part.store.resize_hot(each);
        }
    }

    /// The hot tier's sizing: costs, current budget and the latest decisions.
    pub fn hot_tier_sizing(&self) -> HotTierSizing {
        let sizing = self.sizing.lock().unwrap_or_else(|e| e.into_inner());
        HotTierSizing {
            cost: sizing.cost,
            budget_bytes: self.partitions.iter().map(|p| p.store.hot_capacity()).sum(),
            decisions: sizing.decisions.clone(),
            count: sizing.count,
        }
    }

    /// Waits until every recorded entry queued for the cold tier is on disk (and writes
    /// the access trace's buffered records).
    pub fn flush(&self) {
        if let Some(trace) = &self.trace {
            trace.flush();
        }
        for part in &self.partitions {
            part.store.flush();
        }
    }

    /// Stores the maps recorded for one input in the first partition.
    pub fn record(&self, entry: MapEntry) {
        self.record_in(0, entry);
    }

    /// Stores the maps recorded for one input in partition `scope` (ignored when there is
    /// no such partition).
    pub fn record_in(&self, scope: usize, entry: MapEntry) {
        let Some(part) = self.partitions.get(scope) else {
            return;
        };
        part.sightings.invalidate(&token_key(&entry.tokens));
        self.counters.recorded.fetch_add(1, Ordering::Relaxed);
        if entry.feature_id == self.features.id() {
            part.index.insert(
                token_key(&entry.tokens),
                entry.tokens.clone(),
                &entry.feature,
            );
        }
        if let Some(trace) = &self.trace {
            let (key, bytes) = (token_key(&entry.tokens), entry.bytes() as u64);
            trace.record(TraceOp::Insert, scope, key, bytes);
        }
        part.store.insert(entry);
    }

    /// Current counters of the cache and both tiers (summed over partitions).
    pub fn counts(&self) -> CacheCounts {
        let c = &self.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let mut counts = CacheCounts {
            lookups: load(&c.lookups),
            not_cached: load(&c.not_cached),
            hits: load(&c.hits),
            near_hits: load(&c.near_hits),
            misses: load(&c.misses),
            recorded: load(&c.recorded),
            lookup_ns: load(&c.lookup_ns),
            blend_hits: load(&c.blend_hits),
            blend_refused: load(&c.blend_refused),
            recomputed_tokens: load(&c.recomputed_tokens),
            cold_unavailable: self.cold_unavailable,
            ..CacheCounts::default()
        };
        for part in &self.partitions {
            let s = part.store.stats();
            let (hot_entries, hot_bytes) = part.store.hot_usage();
            let (cold_entries, cold_bytes) = part.store.cold_usage();
            counts.indexed += part.index.len() as u64;
            counts.hot_hits += load(&s.hot_hits);
            counts.cold_hits += load(&s.cold_hits);
            counts.hot_entries += hot_entries;
            counts.hot_bytes += hot_bytes;
            counts.cold_entries += cold_entries;
            counts.cold_bytes += cold_bytes;
            counts.cold_evictions += load(&s.cold_evictions);
            counts.hot_evictions += load(&s.hot_evictions);
            counts.corrupt += load(&s.corrupt);
            counts.cold_writes_skipped += load(&s.cold_writes_skipped);
            counts.cold_write_failures += load(&s.cold_write_failures);
            counts.shared_errors += load(&s.shared_errors);
            counts.shared_skipped += load(&s.shared_skipped);
            counts.shared_down += u64::from(s.shared_down.load(Ordering::Relaxed));
            counts.announced += load(&s.announced);
        }
        counts
    }
}

const NO_THRESHOLD: u32 = u32::MAX;
/// Neighbours a similarity lookup considers.
const NEIGHBOURS: usize = 8;

/// Adds the entries whose features come from the computation `feature_id` to `index`;
/// returns how many carry features of another computation (exact matches only for them).
fn index_entries(
    index: &SimilarityIndex,
    entries: Vec<crate::store::Indexed>,
    feature_id: u32,
) -> usize {
    let mut foreign = 0;
    for found in entries {
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
