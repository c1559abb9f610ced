//! What the cache decided for each row of the batch being run, from layer 0 to the last.
//!
//! The decision is made once per input, at the first attention call of a forward (layer 0),
//! and followed by every later layer: a hit takes each layer's probabilities from the stored
//! entry; a recorded miss computes them exactly and keeps them (as f16) until the last layer,
//! when the entry is stored; an exact row computes attention as if there were no cache.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use mistralrs_core::HookRow;

use crate::cache::{AttnCache, Lookup};
use crate::entry::MapEntry;

/// The plan for one row.
#[derive(Debug)]
pub(crate) enum RowPlan {
    /// No cache for this row (flag off, wrong length, not admitted).
    Exact,
    /// Reuse these maps.
    Hit(Arc<MapEntry>),
    /// Compute exactly and record every layer's maps (`[heads, L, L]`, f16).
    Record(Vec<Tensor>),
}

/// The plan for one forward pass.
#[derive(Debug)]
pub(crate) struct ForwardPlan {
    seq_ids: Vec<usize>,
    tokens: Vec<Arc<[u32]>>,
    features: Vec<Arc<[f32]>>,
    /// Each row's partition (recorded entries go there).
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
                    Lookup::Hit(e) | Lookup::Near { entry: e, .. }
                        if e.layers.len() == n_layers =>
                    {
                        RowPlan::Hit(e)
                    }
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

    /// Every row is a hit: q and k need not be computed at all.
    pub(crate) fn all_hit(&self) -> bool {
        self.rows.iter().all(|r| matches!(r, RowPlan::Hit(_)))
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
    /// partition. `feature_id` names the computation that produced the features.
    pub(crate) fn into_entries(self, n_layers: usize, feature_id: u32) -> Vec<(usize, MapEntry)> {
        self.rows
            .into_iter()
            .zip(self.tokens)
            .zip(self.features)
            .zip(self.scopes)
            .filter_map(|(((plan, tokens), feature), scope)| match plan {
                RowPlan::Record(layers) if layers.len() == n_layers => {
                    let heads = layers.first()?.dim(0).ok()?;
                    let entry = MapEntry {
                        tokens,
                        heads,
                        layers,
                        feature,
                        feature_id,
                    };
                    Some((scope, entry))
                }
                _ => None,
            })
            .collect()
    }
}

/// Probabilities of a stored layer as `[1, heads, L, L]` f32.
pub(crate) fn stored_probs(entry: &MapEntry, layer: usize) -> Result<Tensor> {
    match entry.layers.get(layer) {
        Some(maps) => crate::f16_maps::to_f32(maps)?.unsqueeze(0),
        None => candle_core::bail!("stored entry has no layer {layer}"),
    }
}
