//! The attention of a batch that follows a map plan ([`ForwardPlan`]): stored probabilities
//! for hits (with selective rows or heads recomputed), exact maps kept for recorded misses,
//! exact attention for the other rows; and the all-hit case where q/k are never projected.

use std::sync::atomic::Ordering;

use candle_core::{Result, Tensor};
use mistralrs_core::{AttentionCall, KnownMapsCall};

use super::{AttnCacheHook, CacheRuntime};
use crate::hook::forward_plan::{ForwardPlan, RowPlan};
use crate::kernels::exact_attention::{self, AttentionParams};

impl AttnCacheHook {
    /// Attention row by row following `plan` (some row hits or records).
    pub(super) fn planned(
        &self,
        plan: &mut ForwardPlan,
        call: &AttentionCall<'_>,
    ) -> Result<Tensor> {
        let (b, heads, lq, _) = call.q.dims4()?;
        let mask = match call.mask {
            Some(m) => match exact_attention::normalize_mask(m, b, heads, lq, lq) {
                Some(m) => Some(m),
                None => {
                    plan.abandon_records(); // this layer's maps cannot be computed here
                    None
                }
            },
            None => None,
        };
        let params = AttentionParams::from_sdpa(call.params);
        let mut outs = Vec::with_capacity(b);
        for (i, row) in plan.rows.iter_mut().enumerate() {
            // one row: [1, heads, L, d], [1, kv_heads, L, d]
            let (q, k, v) = (
                call.q.narrow(0, i, 1)?,
                call.k.narrow(0, i, 1)?,
                call.v.narrow(0, i, 1)?,
            );
            // this row's mask, where the mask has a batch dimension
            let mask = row_of(mask.as_ref(), i, b)?;
            let raw_mask = row_of(call.mask, i, b)?;
            let out = match row {
                RowPlan::Hit(hit) if hit.reuses(call.layer_idx) => {
                    // [1, heads, L, L]
                    let probs = hit.probs(call.layer_idx)?;
                    let rows = hit.recompute.as_deref().filter(|r| !r.is_empty());
                    let fresh_heads = hit.fresh_heads(call.layer_idx);
                    let probs = if (rows.is_some() || !fresh_heads.is_empty())
                        && call.mask.is_some()
                        && mask.is_none()
                    {
                        None // nothing can be recomputed here: exact instead
                    } else {
                        let probs = if fresh_heads.is_empty() {
                            probs
                        } else {
                            recompute_heads(&probs, &fresh_heads, &q, &k, mask.as_ref(), &params)?
                        };
                        match rows {
                            Some(rows) => Some(recompute_rows(
                                &probs,
                                rows,
                                &q,
                                &k,
                                mask.as_ref(),
                                &params,
                            )?),
                            None => Some(probs),
                        }
                    };
                    match probs {
                        Some(p) => exact_attention::apply_probabilities(&p, &v)?,
                        None => {
                            self.exact_row(&q, &k, &v, mask.as_ref(), raw_mask.as_ref(), call)?
                        }
                    }
                }
                RowPlan::Record(maps) => {
                    // [1, heads, L, L]
                    let probs = exact_attention::probabilities(&q, &k, mask.as_ref(), &params)?;
                    maps.push(crate::kernels::f16_maps::to_f16(&probs.squeeze(0)?)?);
                    exact_attention::apply_probabilities(&probs, &v)?
                }
                // exact rows, and the layers a near hit does not reuse
                RowPlan::Exact | RowPlan::Hit(_) => {
                    self.exact_row(&q, &k, &v, mask.as_ref(), raw_mask.as_ref(), call)?
                }
            };
            outs.push(out.to_dtype(call.q.dtype())?);
        }
        Tensor::cat(&outs, 0)
    }

    /// [`AttentionHook::known_maps`] once the batch's map plan is in hand: when every row
    /// hits, attention is the stored maps times v (q/k were never projected).
    pub(super) fn known_maps_planned(
        &self,
        rt: &CacheRuntime,
        slot: &mut Option<ForwardPlan>,
        call: &KnownMapsCall<'_>,
        len: usize,
    ) -> Result<Option<Tensor>> {
        let Some(plan) = rt.plan_for(slot, call.rows, call.layer_idx, len, Some(call.xs)) else {
            return Ok(None);
        };
        if !plan.needs_no_qk(call.layer_idx) {
            return Ok(None);
        }
        let v = (call.v)()?; // [b, kv_heads, L, d]
        let mut outs = Vec::with_capacity(plan.rows.len());
        for (i, row) in plan.rows.iter().enumerate() {
            let RowPlan::Hit(hit) = row else {
                candle_core::bail!("row {i} of an all-hit plan is not a hit")
            };
            let out = exact_attention::apply_probabilities(
                &hit.probs(call.layer_idx)?,
                &v.narrow(0, i, 1)?,
            )?;
            outs.push(out.to_dtype(v.dtype())?);
        }
        rt.finish_layer(slot, call.layer_idx);
        self.stats.qk_skipped_calls.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Tensor::cat(&outs, 0)?))
    }
}

/// Stored probabilities `[1, heads, L, L]` with the query rows `rows` recomputed exactly
/// from this input's `q` `[1, heads, L, d]` and `k` `[1, kv_heads, L, d]` (selective
/// recompute); `mask` is rank 4, broadcastable to `[1, heads, L, L]`.
fn recompute_rows(
    probs: &Tensor,
    rows: &[u32],
    q: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    params: &AttentionParams,
) -> Result<Tensor> {
    let idx = Tensor::from_slice(rows, rows.len(), q.device())?;
    // [1, heads, r, d]
    let q_rows = q.contiguous()?.index_select(&idx, 2)?;
    // [1, 1|heads, r, L] (a mask broadcast over rows stays as it is)
    let mask_rows = match mask {
        Some(m) if m.dim(2)? == 1 => Some(m.clone()),
        Some(m) => Some(m.contiguous()?.index_select(&idx, 2)?),
        None => None,
    };
    // [1, heads, r, L]
    let fresh = exact_attention::probabilities(&q_rows, k, mask_rows.as_ref(), params)?;
    let stale = probs.index_select(&idx, 2)?;
    // rows `rows` of probs become `fresh`
    probs.index_add(&idx, &(fresh - stale)?, 2)
}

/// Stored probabilities `[1, heads, L, L]` with the maps of `heads` (sorted) computed
/// exactly from this input's `q` `[1, heads, L, d]` and `k` `[1, kv_heads, L, d]`
/// (per-head partial reuse); `mask` is rank 4, broadcastable to `[1, heads, L, L]`.
fn recompute_heads(
    probs: &Tensor,
    heads: &[usize],
    q: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    params: &AttentionParams,
) -> Result<Tensor> {
    let n_heads = q.dim(1)?;
    let groups = (n_heads / k.dim(1)?).max(1);
    let fresh = heads
        .iter()
        .map(|&h| {
            let q_h = q.narrow(1, h, 1)?;
            let k_h = k.narrow(1, h / groups, 1)?;
            let mask_h = match mask {
                Some(m) if m.dim(1)? == n_heads => Some(m.narrow(1, h, 1)?),
                other => other.cloned(),
            };
            // [1, 1, L, L]
            exact_attention::probabilities(&q_h, &k_h, mask_h.as_ref(), params)
        })
        .collect::<Result<Vec<_>>>()?;
    let fresh = Tensor::cat(&fresh, 1)?;
    let idx: Vec<u32> = heads.iter().map(|&h| h as u32).collect();
    let idx = Tensor::from_slice(&idx, idx.len(), q.device())?;
    let stale = probs.index_select(&idx, 1)?;
    probs.index_add(&idx, &(fresh - stale)?, 1)
}

/// Row `i` of a mask whose first dimension is the batch (`b > 1`); other masks broadcast.
fn row_of(mask: Option<&Tensor>, i: usize, b: usize) -> Result<Option<Tensor>> {
    match mask {
        Some(m) if b > 1 && m.rank() >= 3 && m.dim(0)? == b => Ok(Some(m.narrow(0, i, 1)?)),
        other => Ok(other.cloned()),
    }
}
