//! The hot tier's sizing: measured tier costs, the miss-ratio curve, and resizing within a
//! slowdown target.

use super::*;

/// The hot-tier sizing state: the measured costs and the last decision of each scope.
#[derive(Debug, Default)]
pub(super) struct Sizing {
    pub(super) cost: Option<CostModel>,
    pub(super) decisions: Vec<SizingDecision>,
    pub(super) count: u64,
}

/// What [`AttnCache::hot_tier_sizing`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct HotTierSizing {
    /// The measured costs in use, if any.
    pub cost: Option<CostModel>,
    /// The hot tier's current budget (all scopes), bytes.
    pub budget_bytes: u64,
    /// The latest decision of each scope (empty before the first).
    pub decisions: Vec<SizingDecision>,
    /// Decisions taken since start (one per scope per round).
    pub count: u64,
}

impl AttnCache {
    /// Predicted miss ratio of the hot tier at a quarter, half, one and two times its
    /// budget: `(bytes, share of re-accesses that would have to read the cold tier or
    /// recompute)`, from sampled reuse distances (see [`crate::tiering::sizing`]). With several
    /// scopes, the sizes are totals and the ratio is the scopes' mean.
    pub fn hot_tier_curve(&self) -> Vec<(u64, f64)> {
        let n = self.scopes.len() as u64;
        let per_part: Vec<u64> = [1, 2, 4, 8]
            .iter()
            .map(|m| self.config.hot_bytes / n * m / 4)
            .collect();
        let mut mean = vec![0.0; per_part.len()];
        for scope_cache in &self.scopes {
            for (m, r) in mean
                .iter_mut()
                .zip(scope_cache.reuse.miss_ratios(&per_part))
            {
                *m += r / n as f64;
            }
        }
        per_part.into_iter().map(|b| b * n).zip(mean).collect()
    }

    /// Sets the measured tier costs the hot-tier sizing uses (see [`crate::tiering::costs`]).
    /// Without a cold tier (neither a directory nor Redis) a hot-tier miss is a
    /// recomputation, so the cold-hit cost is raised to the miss cost.
    pub fn set_tier_costs(&self, mut cost: CostModel) {
        if self.cold_kind().is_none() || self.cold_unavailable > 0 {
            cost.cold_hit_ns = cost.cold_hit_ns.max(cost.miss_ns);
        }
        self.sizing.lock().cost = Some(cost);
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

    /// Re-decides every scope's hot-tier budget — the smallest (up to its configured
    /// share of `hot_bytes`) whose predicted slowdown against everything hot stays within
    /// `target_loss` — and resizes the tiers. `None` until tier costs are set.
    pub fn resize_hot_tier(&self, target_loss: f64) -> Option<Vec<SizingDecision>> {
        let measured = self.sizing.lock().cost?;
        // a slowdown is a share of the whole forward pass, as observed
        let cost = CostModel {
            request_ns: self.forward_ns_per_input(),
            ..measured
        };
        let c = &self.counters;
        let hit_ratio =
            c.hits.load(Ordering::Relaxed) as f64 / c.lookups.load(Ordering::Relaxed).max(1) as f64;
        let max = self.config.hot_bytes / self.scopes.len() as u64;
        let decisions: Vec<SizingDecision> = self
            .scopes
            .iter()
            .map(|scope_cache| {
                let d = scope_cache
                    .reuse
                    .size_hot(&cost, hit_ratio, target_loss, max);
                let before = scope_cache.store.hot_capacity();
                scope_cache.store.resize_hot(d.hot_bytes);
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
        let mut sizing = self.sizing.lock();
        sizing.count += decisions.len() as u64;
        sizing.decisions = decisions.clone();
        Some(decisions)
    }

    /// Measures the tier costs for `shape` with cold hits read from this cache's own cold
    /// tier (the first scope's: scopes share one backend). `None` without a cold
    /// tier; an error when it cannot be read now (a shared tier that is down).
    pub fn measure_tier_costs(
        &self,
        shape: &crate::tiering::costs::EntryShape,
        reps: usize,
    ) -> Option<Result<crate::tiering::costs::MeasuredCosts, AttnCacheError>> {
        let tier = self.scopes.first()?.store.cold_tier()?;
        Some(crate::tiering::costs::measure(
            shape,
            crate::tiering::costs::ColdSource::Tier(tier),
            reps,
        ))
    }

    /// Forces the hot tier's budget to `bytes` (split equally between scopes, at least
    /// 1 MiB each), keeping the most recently used entries that fit.
    pub fn set_hot_bytes(&self, bytes: u64) {
        let each = bytes / self.scopes.len() as u64;
        for scope_cache in &self.scopes {
            scope_cache.store.resize_hot(each);
        }
    }

    /// The hot tier's sizing: costs, current budget and the latest decisions.
    pub fn hot_tier_sizing(&self) -> HotTierSizing {
        let sizing = self.sizing.lock();
        HotTierSizing {
            cost: sizing.cost,
            budget_bytes: self.scopes.iter().map(|p| p.store.hot_capacity()).sum(),
            decisions: sizing.decisions.clone(),
            count: sizing.count,
        }
    }
}
