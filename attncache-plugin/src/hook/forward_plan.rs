//! What the cache decided for each row of the batch being run, from layer 0 to the last.
//!
//! The decision is made once per input, at the first attention call of a forward (layer 0),
//! and followed by every later layer: a hit takes each layer's probabilities from the stored
//! entry; a recorded miss computes them exactly and keeps them (as f16) until the last layer,
//! when the entry is stored; an exact row computes attention as if there were no cache.
//! A near hit follows the cache's [`ReusePolicy`]: layers outside its set compute exactly,
//! and in the reused layers the rows it names are recomputed.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use mistralrs_core::HookRow;

use crate::cache::{AttnCache, Lookup};
use crate::reuse::maps::ReusePolicy;
use crate::storage::entry::{AttentionMaps, Entry, Payload};

/// The plan for one row.
#[derive(Debug)]
pub(crate) enum RowPlan {
    /// No cache for this row (flag off, wrong length, not admitted).
    Exact,
    /// Reuse these maps.
    Hit(HitPlan),
    /// Compute exactly and record every layer's maps (`[heads, L, L]`, f16).
    Record(Vec<Tensor>),
}

/// What a hit reuses.
#[derive(Debug)]
pub(crate) struct HitPlan {
    /// The stored maps.
    pub(crate) entry: Arc<Entry>,
    /// For a near hit, the policy it follows; `None` for identical tokens (every layer whole).
    policy: Option<Arc<ReusePolicy>>,
    /// Rows recomputed in every reused layer (sorted); `None` or empty: none.
    pub(crate) recompute: Option<Arc<[u32]>>,
    /// For each position, the stored position it takes (another length); `None`: itself.
    alignment: Option<Arc<[u32]>>,
}

impl HitPlan {
    /// Whether layer `layer` takes stored maps (otherwise it computes exactly).
    pub(crate) fn reuses(&self, layer: usize) -> bool {
        self.policy.as_ref().is_none_or(|p| p.reuses_layer(layer))
    }

    /// Layer `layer`'s probabilities for this input, `[1, heads, L, L]` f32: the stored
    /// maps, aligned when the stored input has another length (rows and columns taken at
    /// their source positions, each row renormalised to sum to 1).
    pub(crate) fn probs(&self, layer: usize) -> Result<Tensor> {
        let stored = stored_probs(&self.entry, layer)?;
        let Some(source) = &self.alignment else {
            return Ok(stored);
        };
        let idx = Tensor::from_slice(source, source.len(), stored.device())?;
        // [1, heads, L_stored, L_stored] -> [1, heads, L, L]
        let aligned = stored.index_select(&idx, 2)?.index_select(&idx, 3)?;
        let sums = aligned.sum_keepdim(3)?.clamp(1e-12f32, f32::MAX)?;
        aligned.broadcast_div(&sums)
    }

    /// The heads of reused layer `layer` that compute exactly (per-head partial reuse).
    pub(crate) fn fresh_heads(&self, layer: usize) -> Vec<usize> {
        self.policy.as_ref().map_or_else(Vec::new, |p| {
            p.fresh_heads(layer, self.entry.maps().map_or(0, |m| m.heads))
        })
    }

    /// Whether layer `layer` needs neither q nor k: stored maps for every head, no row
    /// recomputed.
    fn needs_no_qk(&self, layer: usize) -> bool {
        self.reuses(layer)
            && self.recompute.as_ref().is_none_or(|r| r.is_empty())
            && self.fresh_heads(layer).is_empty()
    }
}

/// The plan for one forward pass.
#[derive(Debug)]
pub(crate) struct ForwardPlan {
    seq_ids: Vec<usize>,
    tokens: Vec<Arc<[u32]>>,
    features: Vec<Arc<[f32]>>,
    /// Each row's scope (recorded entries go there).
    scopes: Vec<usize>,
    pub(crate) rows: Vec<RowPlan>,
    /// The layer the next attention call must be for.
    pub(crate) next_layer: usize,
    /// When layer 0's attention call arrived.
    pub(crate) started: std::time::Instant,
}

impl ForwardPlan {
    /// Decides every row of a prefill batch whose sequence length is `len`; `features`
    /// (one per row, when the model offers its layer-0 input) enable similarity lookups and
    /// are stored with recorded entries.
    pub(crate) fn decide(
        cache: &AttnCache,
        rows: &[HookRow],
        len: usize,
        n_layers: usize,
        features: Option<Vec<Vec<f32>>>,
    ) -> Self {
        let features: Vec<Arc<[f32]>> = match features {
            Some(f) if f.len() == rows.len() => f.into_iter().map(Arc::from).collect(),
            _ => vec![Arc::from(Vec::new()); rows.len()],
        };
        let plans = rows
            .iter()
            .zip(&features)
            .map(|(r, feature)| {
                if !r.is_prompt || r.tokens.len() != len || !cache.enabled_for(r.request_id) {
                    return RowPlan::Exact;
                }
                let feature = (!feature.is_empty()).then_some(&feature[..]);
                match cache.lookup_for(r.request_id, &r.tokens, feature) {
                    Lookup::Hit(entry) if entry.map_layers().len() == n_layers => {
                        RowPlan::Hit(HitPlan {
                            entry,
                            policy: None,
                            recompute: None,
                            alignment: None,
                        })
                    }
                    Lookup::Near {
                        entry,
                        recompute,
                        alignment,
                        ..
                    } if entry.map_layers().len() == n_layers => RowPlan::Hit(HitPlan {
                        entry,
                        policy: Some(cache.reuse_policy()),
                        recompute,
                        alignment,
                    }),
                    Lookup::Hit(_) | Lookup::Near { .. } => RowPlan::Exact,
                    Lookup::Miss { record: true } => RowPlan::Record(Vec::with_capacity(n_layers)),
                    Lookup::Miss { record: false } => RowPlan::Exact,
                }
            })
            .collect();
        Self {
            seq_ids: rows.iter().map(|r| r.seq_id).collect(),
            tokens: rows
                .iter()
                .map(|r| Arc::from(r.tokens.as_slice()))
                .collect(),
            features,
            scopes: rows
                .iter()
                .map(|r| cache.scope_of(r.request_id).unwrap_or(0))
                .collect(),
            rows: plans,
            next_layer: 0,
            started: std::time::Instant::now(),
        }
    }

    /// Whether this plan was made for `rows`.
    pub(crate) fn is_for(&self, rows: &[HookRow]) -> bool {
        self.seq_ids.len() == rows.len()
            && self.seq_ids.iter().zip(rows).all(|(id, r)| *id == r.seq_id)
    }

    /// Every row reuses layer `layer`'s stored maps whole: q and k need not be computed.
    pub(crate) fn needs_no_qk(&self, layer: usize) -> bool {
        self.rows
            .iter()
            .all(|r| matches!(r, RowPlan::Hit(h) if h.needs_no_qk(layer)))
    }

    /// Some row uses the cache (hit or record).
    pub(crate) fn uses_cache(&self) -> bool {
        self.rows.iter().any(|r| !matches!(r, RowPlan::Exact))
    }

    /// Stops recording every row (used when a layer cannot be recorded).
    pub(crate) fn abandon_records(&mut self) {
        for r in &mut self.rows {
            if matches!(r, RowPlan::Record(_)) {
                *r = RowPlan::Exact;
            }
        }
    }

    /// The entries recorded by this forward, complete for `n_layers` layers, each with its
    /// scope. `feature_id` names the computation that produced the features.
    pub(crate) fn into_entries(self, n_layers: usize, feature_id: u32) -> Vec<(usize, Entry)> {
        self.rows
            .into_iter()
            .zip(self.tokens)
            .zip(self.features)
            .zip(self.scopes)
            .filter_map(|(((plan, tokens), feature), scope)| match plan {
                RowPlan::Record(layers) if layers.len() == n_layers => {
                    let heads = layers.first()?.dim(0).ok()?;
                    let entry = Entry {
                        tokens,
                        feature,
                        feature_id,
                        payload: Payload::Maps(AttentionMaps { heads, layers }),
                    };
                    Some((scope, entry))
                }
                _ => None,
            })
            .collect()
    }
}

/// Probabilities of a stored layer as `[1, heads, L, L]` f32.
pub(crate) fn stored_probs(entry: &Entry, layer: usize) -> Result<Tensor> {
    match entry.map_layers().get(layer) {
        Some(maps) => crate::kernels::f16_maps::to_f32(maps)?.unsqueeze(0),
        None => candle_core::bail!("stored entry has no layer {layer}"),
    }
}
