//! Blend reuse (CacheBlend's idea on a bidirectional encoder): take a stored neighbour's
//! per-layer K/V and recompute only the positions that deviate.
//!
//! A blend entry ([`crate::storage::entry::BlendStates`]) keeps, for every token, each layer's K
//! (before RoPE) and V, the hidden states after the *check layer* and after the last layer.
//! For a new input whose neighbour is stored, the model runs every layer up to the check
//! layer exactly, on every position. There the hidden states are compared with the
//! neighbour's ([`deviations`]); the positions whose token differs and those whose state
//! deviates more than [`BlendPolicy::max_deviation`] form the set S ([`select`]). If S is no
//! larger than [`BlendPolicy::max_recompute_share`] of the input, the remaining layers run on
//! S's rows only: S's queries attend over the neighbour's K/V with S's fresh rows put in
//! ([`attend`], RoPE applied at the true positions, so a neighbour with an insertion is
//! re-rotated), and after the last layer S's states are put into the neighbour's final
//! states, which pooling then reads. Otherwise the hit is refused and the forward simply
//! continues exactly: a refusal costs no work.
//!
//! **Escalation.** With a resume layer ([`BlendPolicy::resume_layer`]) and an entry that kept
//! its states after that layer, a hit the rule above refuses is *escalated* instead: S is the
//! differing positions plus the largest deviations up to [`BlendPolicy::escalate_share`]
//! ([`escalation`]); the layers up to the resume layer run on S only, then S's rows are put
//! into the stored states after the resume layer and the remaining layers run on every
//! position. The positions outside S are stale only up to the resume layer, and the later
//! layers (two of EmbeddingGemma's global layers among them) correct them: faithful where the
//! fast rule could not tell, at a smaller saving.

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;
use crate::kernels::exact_attention::{self, AttentionParams};
use crate::storage::layer_kv::{KvFormat, LayerKv};

/// What the cache reuses on a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReuseKind {
    /// Attention maps (AttnCache): a hit skips q/k, QKᵀ and softmax in reused layers.
    #[default]
    Maps,
    /// Per-layer K/V and hidden states: a hit recomputes only the positions that deviate.
    Blend,
}

impl std::str::FromStr for ReuseKind {
    type Err = AttnCacheError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "maps" => Ok(Self::Maps),
            "blend" => Ok(Self::Blend),
            other => Err(AttnCacheError::InvalidSetting {
                name: "reuse",
                value: other.to_string(),
                expected: "maps or blend",
            }),
        }
    }
}

impl std::fmt::Display for ReuseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Maps => "maps",
            Self::Blend => "blend",
        })
    }
}

/// How a blend hit chooses the positions it recomputes, and when it is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlendPolicy {
    /// The layer after which S is chosen (layers up to it run on every position).
    pub check_layer: usize,
    /// Largest relative deviation `‖h − h_stored‖ / ‖h_stored‖` of a position's state after
    /// the check layer that may be left outside S.
    pub max_deviation: f32,
    /// Largest share of the input's positions S may hold; a hit that needs more is refused.
    pub max_recompute_share: f32,
    /// Smallest share of the positions S holds when the input's states moved at all: the
    /// positions of largest deviation are added up to it (CacheBlend's fixed ratio, scaled
    /// down by [`BlendPolicy::dilution`] when only part of the input moved; 1.0 recomputes
    /// every position, the exact output, whatever the dilution).
    pub min_recompute_share: f32,
    /// Stored inputs up to this many tokens longer or shorter are candidates (aligned).
    pub length_slack: usize,
    /// Largest deviation of the input as a whole after the check layer that a hit may take
    /// (default 2.0, the largest `1 − cos` can be: no bound; see `--blend-max-pooled-deviation`):
    /// `1 − cos` between the mean of its positions' RMS-normalised states and the stored
    /// input's ([`pooled_deviation`]). Over it the hit is refused before any layer is
    /// skipped. The per-position deviation says which positions to recompute but not
    /// whether the stored final states of the others are still close: in an independent
    /// NumPy EmbeddingGemma on 40 SpamAssassin pairs the per-position deviation ranked a
    /// blend hit's final error with Spearman 0.27, the pooled deviation with 0.77. Not yet
    /// calibrated for the served path (in `make blend-eval` bounds of 3e-6 to 1.2e-5 accepted
    /// 0–5% of the pairs, far fewer than in NumPy), hence no bound by default.
    pub max_pooled_deviation: f32,
    /// How a recorded blend entry keeps its K/V (`--blend-kv`): f16, or int8 with a scale per
    /// token, layer and head (39% fewer bytes on EmbeddingGemma). Entries of either format are
    /// read whatever this says.
    pub kv_format: KvFormat,
    /// The layer after which an escalated hit runs every position again (`None`: no
    /// escalation, a hit the fast rule refuses is computed exactly). Recorded entries keep
    /// their states after this layer (4 bytes per token and hidden unit more).
    pub resume_layer: Option<usize>,
    /// Share of the positions an escalated hit recomputes up to the resume layer (the
    /// differing positions, then the largest check-layer deviations).
    pub escalate_share: f32,
    /// How the fast rule's bounds follow the share `w` of the input whose states moved at
    /// the check layer (a differing token, or a deviation above 0). An edit to a long input
    /// moves only the positions within the sliding window of it (exactly 0 elsewhere: 528 of
    /// 1024 on EmbeddingGemma for a 16-token edit), and pooling averages the stale positions'
    /// error over the whole input, so with `w < 1` the per-position bound is
    /// `max_deviation / w^dilution` and the smallest share `min_recompute_share · w^dilution`
    /// of the input. 0: the bounds ignore `w`; every input that moved everywhere (`w = 1`,
    /// such as the calibration pairs at 256 tokens) is treated the same whatever this is. Nor
    /// is an input aligned with a shift (an insertion or deletion: the relative positions
    /// across it change in every global layer, unseen by the sliding check layer).
    /// The default 3 is `make blend-eval`'s choice (the fastest of 0–3 whose calibration
    /// documents at 512–2048 tokens kept the fidelity targets; held out, 1024-token documents
    /// recomputed 8% at fidelity ≥ 0.999).
    pub dilution: f32,
    /// Inputs of at least this many tokens, alone in their batch, look up their neighbour
    /// (and read its entry, from the cold tier if need be) on a thread of their own while
    /// layer 0 runs, and wait for it at the check layer; `None` (the default): every lookup
    /// comes before layer 0. A blend entry is large (EmbeddingGemma: 34 KB a token, 69 MB
    /// at 2048 tokens, ~135 ms from Redis on loopback) and layer 0 of a long input takes
    /// longer than reading it, but on 2 cores the thread competes with layer 0: measured
    /// (blend-eval `--overlap-reps`), 1.06x / 1.08x per Redis hit at 1024 / 2048 tokens,
    /// 0.94–1.04x from disk, 0.95x at 256–512 tokens from RAM.
    pub lookup_overlap_from: Option<usize>,
}

/// The defaults are the policy `make blend-eval` chose on EmbeddingGemma-300M (calibration
/// half of 40 real SpamAssassin near-duplicate pairs at 256 tokens; the fastest of its sweep
/// whose calibration hits kept fidelity mean ≥ 0.997 and min ≥ 0.99: escalation after layer 11
/// with 10% of the positions; held out: every pair a hit, half of them escalated, fidelity
/// mean 0.9977 / min 0.9936, `benches/results/blend.md`), and the dilution its second stage
/// chose on long documents. A model with fewer than 13 layers never escalates (no layer 11
/// before its last).
impl Default for BlendPolicy {
    fn default() -> Self {
        Self {
            check_layer: 0,
            max_deviation: 0.005,
            max_recompute_share: 0.5,
            min_recompute_share: 0.4,
            length_slack: 8,
            max_pooled_deviation: 2.0,
            kv_format: KvFormat::F16,
            resume_layer: Some(11),
            escalate_share: 0.1,
            dilution: 3.0,
            lookup_overlap_from: None,
        }
    }
}

impl BlendPolicy {
    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> std::result::Result<(), AttnCacheError> {
        let bad = |name, value: String, expected| {
            Err(AttnCacheError::InvalidSetting {
                name,
                value,
                expected,
            })
        };
        if !(self.max_deviation.is_finite() && self.max_deviation >= 0.0) {
            return bad(
                "blend.max_deviation",
                self.max_deviation.to_string(),
                "a deviation of 0 or more",
            );
        }
        if !(self.max_recompute_share > 0.0 && self.max_recompute_share <= 1.0) {
            return bad(
                "blend.max_recompute_share",
                self.max_recompute_share.to_string(),
                "a share in (0, 1]",
            );
        }
        if self.max_pooled_deviation.is_nan() || self.max_pooled_deviation < 0.0 {
            return bad(
                "blend.max_pooled_deviation",
                self.max_pooled_deviation.to_string(),
                "a deviation of 0 or more",
            );
        }
        if !(self.escalate_share > 0.0 && self.escalate_share <= 1.0) {
            return bad(
                "blend.escalate_share",
                self.escalate_share.to_string(),
                "a share in (0, 1]",
            );
        }
        if !(self.dilution.is_finite() && self.dilution >= 0.0) {
            return bad(
                "blend.dilution",
                self.dilution.to_string(),
                "an exponent of 0 or more",
            );
        }
        if let Some(r) = self.resume_layer.filter(|r| *r <= self.check_layer) {
            return bad(
                "blend.resume_layer",
                r.to_string(),
                "a layer after the check layer",
            );
        }
        if !(0.0..=self.max_recompute_share).contains(&self.min_recompute_share) {
            return bad(
                "blend.min_recompute_share",
                self.min_recompute_share.to_string(),
                "a share in [0, max_recompute_share]",
            );
        }
        Ok(())
    }
}

/// What [`select`] decided for one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Recompute these positions (sorted); the largest deviation left outside is `residual`.
    Accept {
        /// S, sorted.
        positions: Vec<u32>,
        /// Largest deviation of a position outside S (0 when S holds every position).
        residual: f32,
    },
    /// S would need `needed` positions, more than the policy allows.
    Refuse {
        /// Positions S would need.
        needed: usize,
    },
    /// The input as a whole moved too far from the stored one ([`pooled_deviation`]).
    TooFar {
        /// Its pooled deviation.
        pooled: f32,
    },
}

/// S for an input of `deviation.len()` positions: every `differing` position plus every
/// position whose deviation exceeds the policy's bound — the smallest S whose largest
/// remaining deviation is within it — unless that is more than the policy's largest share;
/// then, if any state moved, the positions of largest deviation up to its smallest share.
/// Both bounds are relaxed by the share of the input that moved ([`BlendPolicy::dilution`]).
///
/// `pooled` is the input's [`pooled_deviation`]; over the policy's bound (or NaN) the hit is
/// refused whatever S would be.
pub fn select(
    deviation: &[f32],
    pooled: f32,
    differing: &[usize],
    policy: &BlendPolicy,
) -> Selection {
    if pooled.is_nan() || pooled > policy.max_pooled_deviation {
        return Selection::TooFar { pooled };
    }
    let len = deviation.len();
    let mut in_s = vec![false; len];
    for &i in differing {
        if let Some(x) = in_s.get_mut(i) {
            *x = true;
        }
    }
    // the share of the input whose state moved (a NaN counts: it is not trusted)
    let moved = (0..len)
        .filter(|&i| in_s[i] || deviation[i] > 0.0 || deviation[i].is_nan())
        .count();
    let scale = match len {
        0 => 1.0,
        _ => (moved as f64 / len as f64).powf(f64::from(policy.dilution)),
    };
    let bound = match scale > 0.0 {
        true => (f64::from(policy.max_deviation) / scale) as f32,
        false => policy.max_deviation,
    };
    let mut residual = 0f32;
    for (i, &d) in deviation.iter().enumerate() {
        // a NaN deviation is not trusted: recompute that position
        if d.is_nan() || d > bound {
            in_s[i] = true;
        } else if !in_s[i] {
            residual = residual.max(d);
        }
    }
    let needed = in_s.iter().filter(|x| **x).count();
    let cap = (policy.max_recompute_share as f64 * len as f64).floor() as usize;
    if needed > cap.max(usize::from(len > 0 && policy.max_recompute_share >= 1.0)) {
        return Selection::Refuse { needed };
    }
    // (an f32 share such as 0.2 is 0.2000000003: not one position more for its rounding)
    // (a smallest share of 1 is every position, the exact output, whatever the dilution)
    let scale_floor = if policy.min_recompute_share >= 1.0 {
        1.0
    } else {
        scale
    };
    let floor =
        (f64::from(policy.min_recompute_share) * scale_floor * len as f64 - 1e-6).ceil() as usize;
    if moved > 0 && needed < floor {
        let mut rest: Vec<usize> = (0..len).filter(|&i| !in_s[i]).collect();
        rest.sort_by(|&a, &b| deviation[b].total_cmp(&deviation[a]).then(a.cmp(&b)));
        for &i in rest.iter().take(floor - needed) {
            in_s[i] = true;
        }
        residual = (0..len)
            .filter(|&i| !in_s[i])
            .map(|i| deviation[i])
            .fold(0f32, f32::max);
    }
    let positions: Vec<u32> = (0..len).filter(|&i| in_s[i]).map(|i| i as u32).collect();
    Selection::Accept {
        positions,
        residual,
    }
}

/// S of an escalated hit: every `differing` position, then the positions of largest
/// `deviation` (a NaN first) until S holds `share` of the input (rounded up), sorted.
pub fn escalation(deviation: &[f32], differing: &[usize], share: f32) -> Vec<u32> {
    let len = deviation.len();
    let mut in_s = vec![false; len];
    for &i in differing {
        if let Some(x) = in_s.get_mut(i) {
            *x = true;
        }
    }
    let want = (f64::from(share) * len as f64 - 1e-6).ceil() as usize;
    let have = in_s.iter().filter(|x| **x).count();
    if have < want {
        let key = |d: f32| if d.is_nan() { f32::INFINITY } else { d };
        let mut rest: Vec<usize> = (0..len).filter(|&i| !in_s[i]).collect();
        rest.sort_by(|&a, &b| {
            key(deviation[b])
                .total_cmp(&key(deviation[a]))
                .then(a.cmp(&b))
        });
        for &i in rest.iter().take(want - have) {
            in_s[i] = true;
        }
    }
    (0..len).filter(|&i| in_s[i]).map(|i| i as u32).collect()
}

/// Relative deviation of each position's state `xs` `[L, hidden]` (f32) from the stored
/// states `stored` `[L, hidden]` (already aligned to the input's positions).
pub fn deviations(xs: &[f32], stored: &[f32], hidden: usize) -> Vec<f32> {
    xs.chunks_exact(hidden)
        .zip(stored.chunks_exact(hidden))
        .map(|(x, s)| {
            let (mut diff, mut norm) = (0f64, 0f64);
            for (a, b) in x.iter().zip(s) {
                let d = f64::from(*a) - f64::from(*b);
                diff += d * d;
                norm += f64::from(*b) * f64::from(*b);
            }
            (diff.sqrt() / norm.sqrt().max(1e-12)) as f32
        })
        .collect()
}

/// `1 − cos` between the mean of the RMS-normalised rows of `xs` and of `stored` (both
/// `[L, hidden]` f32, aligned to the input's positions): how far the input as a whole moved,
/// with every position weighing the same (as mean pooling after the model's final norm).
pub fn pooled_deviation(xs: &[f32], stored: &[f32], hidden: usize) -> f32 {
    let pool = |rows: &[f32]| {
        let mut sum = vec![0f64; hidden];
        for row in rows.chunks_exact(hidden) {
            let ms = row.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / hidden as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for (s, x) in sum.iter_mut().zip(row) {
                *s += f64::from(*x) * inv;
            }
        }
        sum
    };
    let (a, b) = (pool(xs), pool(stored));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        return 0.0;
    }
    (1.0 - dot / (na * nb).max(1e-300)).clamp(0.0, 2.0) as f32
}

/// `base` `[1, h, L, d]` with the rows `rows` (along dimension 2) replaced by `fresh`
/// `[1, h, |rows|, d]`, exactly (values copied, f32).
pub fn put_rows(base: &Tensor, rows: &[u32], fresh: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = base.dims4()?;
    let n = rows.len();
    if fresh.dims4()? != (b, h, n, d) || b != 1 {
        candle_core::bail!(
            "put_rows: base {:?}, fresh {:?}, {n} rows",
            base.dims(),
            fresh.dims()
        );
    }
    let mut out = base.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let fresh = fresh
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for head in 0..h {
        for (k, &r) in rows.iter().enumerate() {
            let r = r as usize;
            if r >= l {
                candle_core::bail!("put_rows: row {r} of {l}");
            }
            let dst = (head * l + r) * d;
            let src = (head * n + k) * d;
            out[dst..dst + d].copy_from_slice(&fresh[src..src + d]);
        }
    }
    Tensor::from_vec(out, (1, h, l, d), base.device())
}

/// An additive mask `[1, 1, |rows|, len]` that lets query position `i` see keys with
/// `|i − j| < window` (the model's bidirectional sliding window).
pub fn window_mask(rows: &[u32], len: usize, window: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; rows.len() * len];
    for (k, &i) in rows.iter().enumerate() {
        let i = i as usize;
        let lo = i.saturating_sub(window.saturating_sub(1));
        let hi = (i + window).min(len);
        m[k * len + lo..k * len + hi].fill(0.0);
    }
    Tensor::from_vec(m, (1, 1, rows.len(), len), device)
}

/// The stored `[2, kv_heads, L_stored, d]` K/V (f16 or int8) of one layer as two f32 tensors
/// `[1, kv_heads, L, d]` at the input's positions (`source[i]`: the stored position input
/// position `i` takes; `None`: itself).
pub fn stored_kv(kv: &LayerKv, source: Option<&[u32]>) -> Result<(Tensor, Tensor)> {
    let kv = kv.to_f32()?;
    let kv = match source {
        Some(src) => {
            let idx = Tensor::from_slice(src, src.len(), kv.device())?;
            kv.index_select(&idx, 2)?
        }
        None => kv,
    };
    Ok((kv.narrow(0, 0, 1)?, kv.narrow(0, 1, 1)?))
}

/// One blended layer's attention `[1, heads, |S|, d]`: S's queries `q` (before RoPE) over
/// every key, the stored `k_stored`/`v_stored` (`[1, kv_heads, L, d]`, before RoPE, at the
/// input's positions) with S's fresh rows `k`/`v` put in; RoPE at the true positions.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    positions: &[u32],
    k_stored: &Tensor,
    v_stored: &Tensor,
    rope: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    sliding_window: Option<usize>,
    params: &AttentionParams,
) -> Result<Tensor> {
    let len = k_stored.dim(2)?;
    let device = q.device();
    let k_full = put_rows(k_stored, positions, k)?.to_dtype(k.dtype())?;
    let v_full = put_rows(v_stored, positions, v)?.to_dtype(v.dtype())?;
    let all: Vec<u32> = (0..len as u32).collect();
    let all = Tensor::from_vec(all, len, device)?;
    let s = Tensor::from_slice(positions, positions.len(), device)?;
    let k_rot = rope(&k_full, &all)?;
    let q_rot = rope(q, &s)?;
    let mask = match sliding_window {
        Some(w) if w < len => Some(window_mask(positions, len, w, device)?),
        _ => None,
    };
    exact_attention::attention(&q_rot, &k_rot, &v_full, mask.as_ref(), params)
}

/// Stored states `[L_stored, hidden]` (f32; the final ones, or those after the resume layer)
/// at the input's positions with S's fresh states `xs_s` `[|S|, hidden]` put in: `[L, hidden]`
/// in `xs_s`'s dtype.
pub fn final_states(
    last: &Tensor,
    source: Option<&[u32]>,
    positions: &[u32],
    xs_s: &Tensor,
) -> Result<Tensor> {
    let last = last.to_dtype(DType::F32)?;
    let last = match source {
        Some(src) => last.index_select(&Tensor::from_slice(src, src.len(), last.device())?, 0)?,
        None => last,
    };
    if positions.is_empty() {
        return last.to_dtype(xs_s.dtype());
    }
    let base = last.unsqueeze(0)?.unsqueeze(0)?; // [1, 1, L, hidden]
    let fresh = xs_s.unsqueeze(0)?.unsqueeze(0)?; // [1, 1, |S|, hidden]
    put_rows(&base, positions, &fresh)?
        .squeeze(0)?
        .squeeze(0)?
        .to_dtype(xs_s.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain rule (no dilution: these inputs' zero deviations would relax it).
    fn policy(max_deviation: f32, share: f32) -> BlendPolicy {
        BlendPolicy {
            max_deviation,
            max_recompute_share: share,
            min_recompute_share: 0.0,
            dilution: 0.0,
            ..BlendPolicy::default()
        }
    }

    #[test]
    fn escalation_takes_differing_then_largest_deviations() {
        let dev = [0.01, 0.2, f32::NAN, 0.5, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0];
        // 30% of 10: the differing 6, then NaN (2) and 0.5 (3)
        assert_eq!(escalation(&dev, &[6], 0.3), vec![2, 3, 6]);
        // more differing positions than the share: all of them, nothing added
        assert_eq!(escalation(&dev, &[0, 4, 8, 9], 0.2), vec![0, 4, 8, 9]);
        assert_eq!(escalation(&dev, &[], 1.0).len(), 10);
        let p = BlendPolicy {
            resume_layer: Some(0),
            ..BlendPolicy::default()
        };
        assert!(p.validate().is_err(), "resume layer at the check layer");
        let p = BlendPolicy {
            escalate_share: 0.0,
            ..BlendPolicy::default()
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn select_takes_differing_and_deviating_positions() {
        let dev = [0.01, 0.2, 0.03, 0.5, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0];
        match select(&dev, 0.0, &[6], &policy(0.05, 0.5)) {
            Selection::Accept {
                positions,
                residual,
            } => {
                assert_eq!(positions, vec![1, 3, 6]);
                assert_eq!(residual, 0.04);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn select_refuses_past_the_cap() {
        let dev = [0.5; 10];
        assert_eq!(
            select(&dev, 0.0, &[], &policy(0.05, 0.3)),
            Selection::Refuse { needed: 10 }
        );
        // a NaN deviation is recomputed, never trusted
        let dev = [f32::NAN, 0.0, 0.0, 0.0];
        assert!(matches!(
            select(&dev, 0.0, &[], &policy(0.05, 0.25)),
            Selection::Accept { positions, .. } if positions == vec![0]
        ));
    }

    #[test]
    fn share_one_allows_every_position() {
        let dev = [0.5; 4];
        assert!(matches!(
            select(&dev, 0.0, &[], &policy(0.0, 1.0)),
            Selection::Accept { positions, residual } if positions.len() == 4 && residual == 0.0
        ));
    }

    #[test]
    fn dilution_relaxes_the_bounds_when_part_of_the_input_moved() {
        // 20 positions, the first 10 moved (w = 0.5); three of them over 0.05, one over 0.1
        let mut dev = [0.0f32; 20];
        dev[..10].copy_from_slice(&[0.2, 0.06, 0.07, 0.01, 0.02, 0.03, 0.01, 0.01, 0.02, 0.01]);
        let p = |dilution| BlendPolicy {
            min_recompute_share: 0.4,
            dilution,
            ..policy(0.05, 0.5)
        };
        let positions = |d| match select(&dev, 0.0, &[], &p(d)) {
            Selection::Accept { positions, .. } => positions,
            other => panic!("{other:?}"),
        };
        // no dilution: 3 over the bound, padded to 40% of 20
        assert_eq!(positions(0.0).len(), 8);
        // w^1 = 0.5: bound 0.1 (one position over it), padded to 20% of 20
        assert_eq!(positions(1.0), vec![0, 1, 2, 5]);
        // w^2 = 0.25: bound 0.2 (none over it: 0.2 is within), padded to 10% of 20
        assert_eq!(positions(2.0), vec![0, 2]);
        // an input that moved everywhere is treated the same whatever the exponent
        let everywhere = [0.06f32, 0.01, 0.02, 0.2, 0.01, 0.03, 0.01, 0.01, 0.02, 0.01];
        assert_eq!(
            select(&everywhere, 0.0, &[], &p(0.0)),
            select(&everywhere, 0.0, &[], &p(3.0))
        );
        // a differing position counts as moved even with no deviation
        let mut dev = [0.0f32; 10];
        dev[0] = 0.01;
        match select(&dev, 0.0, &[9], &p(1.0)) {
            // w = 0.2: padded to 0.4 · 0.2 · 10 = 0.8, one position: the differing one
            Selection::Accept { positions, .. } => assert_eq!(positions, vec![9]),
            other => panic!("{other:?}"),
        }
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(p(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_smallest_share_adds_the_largest_deviations() {
        let dev = [0.01, 0.02, 0.0, 0.03, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let p = BlendPolicy {
            min_recompute_share: 0.2,
            ..policy(0.05, 0.5)
        };
        assert_eq!(
            select(&dev, 0.0, &[], &p),
            Selection::Accept {
                positions: vec![1, 3],
                residual: 0.01
            }
        );
        // states that did not move at all (an identical input): nothing is added
        assert_eq!(
            select(&[0.0; 10], 0.0, &[], &p),
            Selection::Accept {
                positions: vec![],
                residual: 0.0
            }
        );
        let all = BlendPolicy {
            min_recompute_share: 1.0,
            dilution: 3.0,
            ..policy(0.05, 1.0)
        };
        assert!(
            matches!(select(&dev, 0.0, &[], &all), Selection::Accept { positions, .. } if positions.len() == 10)
        );
        assert!(BlendPolicy {
            min_recompute_share: 0.6,
            ..policy(0.05, 0.5)
        }
        .validate()
        .is_err());
    }

    #[test]
    fn put_rows_replaces_exactly_the_rows() {
        let base = Tensor::zeros((1, 2, 4, 3), DType::F32, &Device::Cpu).unwrap();
        let fresh = Tensor::ones((1, 2, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let out = put_rows(&base, &[1, 3], &fresh).unwrap();
        let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for head in 0..2 {
            for row in 0..4 {
                let want = if row == 1 || row == 3 { 1.0 } else { 0.0 };
                assert!(v[(head * 4 + row) * 3..(head * 4 + row + 1) * 3]
                    .iter()
                    .all(|x| *x == want));
            }
        }
        assert!(put_rows(&base, &[4, 0], &fresh).is_err());
    }

    #[test]
    fn window_mask_is_the_bidirectional_band() {
        let m = window_mask(&[0, 5], 8, 3, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let visible = |r: usize| -> Vec<usize> { (0..8).filter(|j| v[r * 8 + j] == 0.0).collect() };
        assert_eq!(visible(0), vec![0, 1, 2]);
        assert_eq!(visible(1), vec![3, 4, 5, 6, 7]);
    }

    /// RoPE tables for positions 0..64 (rotate-half, as EmbeddingGemma's).
    fn rope_fn() -> impl Fn(&Tensor, &Tensor) -> Result<Tensor> {
        let d = 8usize;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in 0..64 {
            for f in &inv {
                cos.push((p as f32 * f).cos());
                sin.push((p as f32 * f).sin());
            }
        }
        let cos = Tensor::from_vec(cos, (64, d / 2), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(sin, (64, d / 2), &Device::Cpu).unwrap();
        move |x: &Tensor, p: &Tensor| {
            candle_nn::rotary_emb::rope(
                &x.contiguous()?,
                &cos.index_select(p, 0)?,
                &sin.index_select(p, 0)?,
            )
        }
    }

    fn f16_rounded(t: Tensor) -> Tensor {
        crate::kernels::f16_maps::to_f32(&crate::kernels::f16_maps::to_f16(&t).unwrap()).unwrap()
    }

    /// S's attention over a neighbour's K/V that sits one position later (a token was
    /// removed before it), re-rotated to the input's positions, with a sliding window, equals
    /// the rows S of the full attention computed from scratch.
    #[test]
    fn attend_over_shifted_stored_keys_equals_full_attention() {
        let (l, d, window) = (12usize, 8usize, 3usize);
        let dev = Device::Cpu;
        let q = f16_rounded(Tensor::randn(0f32, 1.0, (1, 2, l, d), &dev).unwrap());
        let k = f16_rounded(Tensor::randn(0f32, 1.0, (1, 1, l, d), &dev).unwrap());
        let v = f16_rounded(Tensor::randn(0f32, 1.0, (1, 1, l, d), &dev).unwrap());
        let rope = rope_fn();
        let params = AttentionParams {
            softmax_scale: 1.0 / (d as f32).sqrt(),
            softcap: None,
            n_kv_groups: 2,
        };
        // reference: every position, RoPE at 0..L, the bidirectional band
        let all: Vec<u32> = (0..l as u32).collect();
        let all_t = Tensor::from_slice(&all, l, &dev).unwrap();
        let mask = window_mask(&all, l, window, &dev).unwrap();
        let full = exact_attention::attention(
            &rope(&q, &all_t).unwrap(),
            &rope(&k, &all_t).unwrap(),
            &v,
            Some(&mask),
            &params,
        )
        .unwrap();
        // the stored input had one more token at position 5: input i >= 5 is stored i + 1
        let junk = Tensor::full(9f32, (1, 1, 1, d), &dev).unwrap();
        let stored = |t: &Tensor| {
            Tensor::cat(
                &[
                    &t.narrow(2, 0, 5).unwrap(),
                    &junk,
                    &t.narrow(2, 5, l - 5).unwrap(),
                ],
                2,
            )
            .unwrap()
        };
        let kv = Tensor::cat(&[stored(&k), stored(&v)], 0).unwrap(); // [2, 1, L + 1, d]
        let kv = LayerKv::encode(&kv, KvFormat::F16).unwrap();
        let source: Vec<u32> = (0..l as u32)
            .map(|i| if i < 5 { i } else { i + 1 })
            .collect();
        let (k_stored, v_stored) = stored_kv(&kv, Some(&source)).unwrap();
        let s = [0u32, 4, 5, 11];
        let idx = Tensor::from_slice(&s, s.len(), &dev).unwrap();
        let pick = |t: &Tensor| t.index_select(&idx, 2).unwrap();
        let out = attend(
            &pick(&q),
            &pick(&k),
            &pick(&v),
            &s,
            &k_stored,
            &v_stored,
            &rope,
            Some(window),
            &params,
        )
        .unwrap();
        let diff = (out - pick(&full))
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff <= 1e-5, "max |diff| {diff}");
    }

    #[test]
    fn the_pooled_gate_refuses_an_input_that_moved_as_a_whole() {
        let same = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5];
        assert_eq!(pooled_deviation(&same, &same, 3), 0.0);
        // a row scaled as a whole does not move (RMS-normalised), a changed row does
        let scaled = [2.0f32, 4.0, 6.0, 4.0, -1.0, 0.5];
        assert!(pooled_deviation(&scaled, &same, 3) < 1e-9);
        let moved = [1.0f32, 2.0, 3.0, -4.0, 1.0, 0.5];
        let d = pooled_deviation(&moved, &same, 3);
        assert!(d > 0.01, "{d}");
        let p = BlendPolicy {
            max_pooled_deviation: d / 2.0,
            ..policy(0.05, 0.5)
        };
        assert_eq!(
            select(&[0.0; 2], d, &[], &p),
            Selection::TooFar { pooled: d }
        );
        assert!(matches!(
            select(&[0.0; 2], d / 4.0, &[], &p),
            Selection::Accept { .. }
        ));
        assert!(matches!(
            select(&[0.0; 2], f32::NAN, &[], &p),
            Selection::TooFar { .. }
        ));
        assert!(BlendPolicy {
            max_pooled_deviation: -1.0,
            ..BlendPolicy::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn deviations_are_relative() {
        let d = deviations(&[1.0, 0.0, 2.0, 2.0], &[1.0, 0.0, 1.0, 1.0], 2);
        assert_eq!(d[0], 0.0);
        assert!((d[1] - 1.0).abs() < 1e-6);
    }
}
