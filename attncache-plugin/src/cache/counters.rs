//! The counters a deployment scrapes, as one snapshot.

use super::*;

/// Counters of cache decisions (the store keeps its own, see [`crate::storage::store::StoreStats`]).
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub(super) lookups: AtomicU64,
    pub(super) not_cached: AtomicU64,
    pub(super) hits: AtomicU64,
    pub(super) near_hits: AtomicU64,
    pub(super) misses: AtomicU64,
    pub(super) recorded: AtomicU64,
    pub(super) lookup_ns: AtomicU64,
    pub(super) forward_ns: AtomicU64,
    pub(super) forward_inputs: AtomicU64,
    pub(super) blend_candidates: AtomicU64,
    pub(super) blend_hits: AtomicU64,
    pub(super) blend_refused: AtomicU64,
    pub(super) blend_unprofitable: AtomicU64,
    pub(super) blend_gate_refused: AtomicU64,
    pub(super) blend_escalated: AtomicU64,
    pub(super) recomputed_tokens: AtomicU64,
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
    /// Scopes whose cold directory could not be opened (they keep maps in RAM only).
    pub cold_unavailable: u64,
    /// Calls to the shared (Redis) tier that failed or timed out.
    pub shared_errors: u64,
    /// Calls to the shared tier skipped because it was marked down.
    pub shared_skipped: u64,
    /// Scopes whose shared tier is marked down (0: all reachable, or none configured).
    pub shared_down: u64,
    /// Entries other replicas stored that this one indexed.
    pub announced: u64,
    /// Blend candidates found by lookups (each settled later as a blend hit or a refusal;
    /// until then it is neither a hit nor a miss).
    pub blend_candidates: u64,
    /// Blend hits (exact and near) that recomputed only some of the positions.
    pub blend_hits: u64,
    /// Blend candidates refused at the check layer (computed exactly instead).
    pub blend_refused: u64,
    /// Of those, candidates refused because their predicted speed-up was under the policy's
    /// smallest (`--blend-min-gain`).
    pub blend_unprofitable: u64,
    /// Of those, candidates whose every rule the fidelity gate refused (`--blend-gate`).
    pub blend_gate_refused: u64,
    /// Blend hits that were escalated: S only up to the resume layer, every position after it
    /// (counted among `blend_hits` too).
    pub blend_escalated: u64,
    /// Positions recomputed by blend hits, summed.
    pub recomputed_tokens: u64,
}

impl AttnCache {
    /// Current counters of the cache and both tiers (summed over scopes).
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
            blend_candidates: load(&c.blend_candidates),
            blend_hits: load(&c.blend_hits),
            blend_refused: load(&c.blend_refused),
            blend_unprofitable: load(&c.blend_unprofitable),
            blend_gate_refused: load(&c.blend_gate_refused),
            blend_escalated: load(&c.blend_escalated),
            recomputed_tokens: load(&c.recomputed_tokens),
            cold_unavailable: self.cold_unavailable,
            ..CacheCounts::default()
        };
        for scope_cache in &self.scopes {
            let s = scope_cache.store.stats();
            let (hot_entries, hot_bytes) = scope_cache.store.hot_usage();
            let (cold_entries, cold_bytes) = scope_cache.store.cold_usage();
            counts.indexed += scope_cache.index.len() as u64;
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
            if let Some(h) = scope_cache.store.shared_health() {
                counts.shared_errors += h.errors;
                counts.shared_skipped += h.skipped;
                counts.shared_down += u64::from(h.down);
                counts.announced += h.announced;
            }
        }
        counts
    }
}
