//! Exact prefill attention with matrix multiplies: `softmax(scale·QKᵀ (softcapped) + mask)·V`.
//!
//! mistral.rs 0.8.1 runs CPU attention in scalar online-softmax loops (`run_flash_attn_cpu`);
//! on 2 cores that is about 3x slower than two GEMMs and a vectorised softmax. This module
//! is that faster path, and also the one that materialises the probability maps a cache can
//! record. Results match mistral.rs's kernel within 1e-5 (tests in `tests/exact_vs_stock.rs`).
//!
//! Grouped-query attention is handled without repeating K/V: the `groups` query heads that
//! share one kv head are stacked along the row axis, so one GEMM serves the whole group
//! (head `h` uses kv head `h / groups`, as mistral.rs's `repeat_kv` does).

use candle_core::{DType, Result, Tensor, D};

use crate::kernels::f16_maps::with_values;
use crate::kernels::softmax_rows::row_kernel;

/// Longest run of query rows computed at once; bounds the score matrix to
/// `b · heads · QUERY_CHUNK · L_kv` floats for long inputs.
pub const QUERY_CHUNK: usize = 512;

/// The attention parameters mistral.rs passes along with q, k and v.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    /// Multiplier of QKᵀ (usually `1/sqrt(head_dim)`).
    pub softmax_scale: f32,
    /// Logit soft-capping `cap·tanh(s/cap)`; `None` (or 0) for none.
    pub softcap: Option<f32>,
    /// Query heads per kv head.
    pub n_kv_groups: usize,
}

impl AttentionParams {
    /// Copies the fields this path uses from mistral.rs's parameters.
    pub fn from_sdpa(p: &mistralrs_core::SdpaParams) -> Self {
        Self {
            softmax_scale: p.softmax_scale,
            softcap: p.softcap,
            n_kv_groups: p.n_kv_groups,
        }
    }
}

/// Brings an additive mask to `[b, heads, L_q, L_kv]`-broadcastable rank 4, or `None` when
/// its shape is not one this path understands (the caller then leaves the work to mistral.rs).
pub fn normalize_mask(
    mask: &Tensor,
    b: usize,
    heads: usize,
    lq: usize,
    lk: usize,
) -> Option<Tensor> {
    let dims = mask.dims();
    let tail_ok = dims.len() >= 2 && dims[dims.len() - 2] == lq && dims[dims.len() - 1] == lk;
    if !tail_ok {
        return None;
    }
    let m = match dims.len() {
        2 => mask.reshape((1, 1, lq, lk)).ok()?,
        3 if dims[0] == b => mask.unsqueeze(1).ok()?,
        3 if dims[0] == heads => mask.unsqueeze(0).ok()?,
        3 if dims[0] == 1 => mask.unsqueeze(0).ok()?,
        4 if (dims[0] == 1 || dims[0] == b) && (dims[1] == 1 || dims[1] == heads) => mask.clone(),
        _ => return None,
    };
    Some(m)
}

/// Attention probabilities `softmax(scale·QKᵀ + mask)` for one block of query rows.
///
/// `q`: `[b, heads, L_q, d]`, `k`: `[b, kv_heads, L_kv, d]`, `mask`: rank 4, broadcastable
/// to `[b, heads, L_q, L_kv]`. Returns `[b, heads, L_q, L_kv]` in f32.
pub fn probabilities(
    q: &Tensor,
    k: &Tensor,
    mask: Option<&Tensor>,
    p: &AttentionParams,
) -> Result<Tensor> {
    let (b, heads, lq, d) = q.dims4()?;
    let (_, kv_heads, lk, _) = k.dims4()?;
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?;
    // [b, kv_heads, groups·L_q, d] @ [b, kv_heads, d, L_kv] -> [b, kv_heads, groups·L_q, L_kv]
    let q = q.reshape((b, kv_heads, (heads / kv_heads) * lq, d))?;
    let scores = q.matmul(&k.t()?)?;
    // [b, heads, L_q, L_kv]
    let scores = scores.reshape((b, heads, lq, lk))?;
    let softcap = p.softcap.filter(|c| *c != 0.0);
    if softcap.is_none() {
        if let Some(probs) = fused_softmax(&scores, p.softmax_scale, mask)? {
            return Ok(probs);
        }
    }
    let mut scores = (scores * f64::from(p.softmax_scale))?;
    if let Some(cap) = softcap {
        scores = ((scores / f64::from(cap))?.tanh()? * f64::from(cap))?;
    }
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// `softmax(scale·scores + mask)` over the last dimension in one pass per row, rows spread
/// over rayon's threads and each row's loops vectorised: the arithmetic of scaling, adding
/// the mask and `softmax_last_dim` one after another (each a full pass, the first two
/// single-threaded, the exponentials libm calls), without the two intermediate tensors.
/// The probabilities agree with that unfused path within a few ulps, and a masked key's is
/// exactly 0 in both (tested).
///
/// `scores`: `[b, heads, L_q, L_kv]` f32 on the CPU; `mask`: rank 4, broadcastable to it.
/// `None` when the inputs are not of that kind (the caller then takes the unfused path).
pub fn fused_softmax(scores: &Tensor, scale: f32, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    let (b, heads, lq, lk) = scores.dims4()?;
    if scores.dtype() != DType::F32 || lk == 0 {
        return Ok(None);
    }
    let Some(mask) = mask else {
        return with_values(scores, |s| softmax_rows(s, lk, scale, None))?
            .map(|out| Tensor::from_vec(out, (b, heads, lq, lk), scores.device()))
            .transpose();
    };
    let (mb, mh, mq, mk) = mask.dims4()?;
    let fits = |d: usize, n: usize| d == 1 || d == n;
    if mask.dtype() != DType::F32 || !(fits(mb, b) && fits(mh, heads) && fits(mq, lq) && mk == lk) {
        return Ok(None);
    }
    // row r of the scores, r = ((bi · heads) + hi) · L_q + qi, takes this mask row (broadcast)
    let mask_row = |r: usize| {
        let (qi, bh) = (r % lq, r / lq);
        let (hi, bi) = (bh % heads, bh / heads);
        ((bi % mb) * mh + (hi % mh)) * mq + (qi % mq)
    };
    let out = match with_values(scores, |s| {
        with_values(mask, |m| softmax_rows(s, lk, scale, Some((m, &mask_row))))
    })? {
        Some(inner) => inner?,
        None => None,
    };
    out.map(|out| Tensor::from_vec(out, (b, heads, lq, lk), scores.device()))
        .transpose()
}

/// A mask's values and, for each score row, which mask row it takes.
type MaskRows<'a> = (&'a [f32], &'a (dyn Fn(usize) -> usize + Sync));

/// The rows (of `lk` values) of `scores` through `softmax(scale·s + mask row)`, in parallel;
/// `mask` is the mask's values and which of its rows each score row takes.
fn softmax_rows(scores: &[f32], lk: usize, scale: f32, mask: Option<MaskRows<'_>>) -> Vec<f32> {
    use rayon::prelude::*;
    let kernel = row_kernel();
    let mut out = vec![0f32; scores.len()];
    out.par_chunks_mut(lk)
        .zip(scores.par_chunks(lk))
        .enumerate()
        .for_each(|(row, (dst, s))| {
            let m = mask.map(|(m, mask_row)| {
                let r = mask_row(row);
                &m[r * lk..(r + 1) * lk]
            });
            kernel(dst, s, m, scale);
        });
    out
}

/// `P·V` for probabilities `[b, heads, L_q, L_kv]` and `v`: `[b, kv_heads, L_kv, d_v]`;
/// returns `[b, heads, L_q, d_v]` in f32.
pub fn apply_probabilities(probs: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, heads, lq, lk) = probs.dims4()?;
    let (_, kv_heads, _, dv) = v.dims4()?;
    let v = v.to_dtype(DType::F32)?;
    // [b, kv_heads, groups·L_q, L_kv] @ [b, kv_heads, L_kv, d_v]
    let probs = probs.to_dtype(DType::F32)?.contiguous()?;
    let probs = probs.reshape((b, kv_heads, (heads / kv_heads) * lq, lk))?;
    probs.matmul(&v.contiguous()?)?.reshape((b, heads, lq, dv))
}

/// Query rows per block on inputs longer than this with a mask: each block then multiplies
/// only against the keys its rows can see (a sliding window's band, a causal mask's
/// triangle), so a 2048-token sliding layer with EmbeddingGemma's window of 257 does about
/// 38% of the full QKᵀ and P·V work, and a causal 800-token prompt about 65%.
pub const BAND_QUERY_CHUNK: usize = 256;

/// The keys `[first, end)` that any row of `mask` (rank 4, `[.., .., rows, L_kv]`) leaves
/// visible, i.e. has a finite value for. Keys outside get probability exactly 0, so leaving
/// them out of QKᵀ and P·V changes nothing but the work. `None` when every key is masked
/// (the caller then keeps them all, as the full softmax would).
pub fn visible_keys(mask: &Tensor) -> Result<Option<(usize, usize)>> {
    let lk = mask.dim(D::Minus1)?;
    let scan = |values: &[f32]| {
        let (mut first, mut end) = (lk, 0);
        for row in values.chunks(lk) {
            if let Some(j) = row.iter().position(|x| x.is_finite()) {
                first = first.min(j);
            }
            if let Some(j) = row.iter().rposition(|x| x.is_finite()) {
                end = end.max(j + 1);
            }
        }
        (first < end).then_some((first, end))
    };
    // a block of rows of the model's f32 mask is read in place; anything else is converted
    match with_values(mask, scan)? {
        Some(range) => Ok(range),
        None => with_values(
            &mask
                .to_dtype(DType::F32)?
                .to_device(&candle_core::Device::Cpu)?,
            scan,
        )
        .map(Option::flatten),
    }
}

/// Exact attention output `[b, heads, L_q, d_v]` in the dtype of `q`.
///
/// `mask` must already be rank 4 (see [`normalize_mask`]). Query rows are processed in
/// blocks of [`QUERY_CHUNK`], so memory stays bounded for long inputs; with a mask, blocks of
/// [`BAND_QUERY_CHUNK`] each over only the keys they can see ([`visible_keys`]).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    p: &AttentionParams,
) -> Result<Tensor> {
    // a decoder's prompt under the plain causal mask: one task per head and block of rows
    if let (Some(m), 1) = (mask, q.dim(0)?) {
        if let Some(out) = crate::kernels::causal_attention::causal_attention(
            q,
            k,
            v,
            m,
            p.softmax_scale,
            p.softcap,
        )? {
            return out.to_dtype(q.dtype());
        }
    }
    attention_general(q, k, v, mask, p)
}

/// [`attention`] for any mask: query rows in blocks (banded over the keys a block can see),
/// each product spread over the threads; a batch one sequence at a time (through
/// [`attention`], so a causal sequence still takes the causal kernel).
pub fn attention_general(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    p: &AttentionParams,
) -> Result<Tensor> {
    let (_, heads, lq, _) = q.dims4()?;
    let (_, kv_heads, lk, _) = k.dims4()?;
    if kv_heads == 0 || heads % kv_heads != 0 || heads / kv_heads != p.n_kv_groups.max(1) {
        candle_core::bail!(
            "attention: {heads} query heads do not split into {kv_heads} kv heads × {} groups",
            p.n_kv_groups
        );
    }
    // a batch one sequence at a time: each block's scores and probabilities then stay a few
    // MiB (reused from the heap) instead of b times that (16 × 800-token prompts: ~120 MB
    // per block, fresh pages from the kernel every time, page faults ~20% of the forward)
    let b = q.dim(0)?;
    if b > 1 {
        let mut outs = Vec::with_capacity(b);
        for bi in 0..b {
            let m = match mask {
                Some(m) if m.dim(0)? == b => Some(m.narrow(0, bi, 1)?),
                Some(m) => Some(m.clone()),
                None => None,
            };
            let one = |t: &Tensor| t.narrow(0, bi, 1);
            outs.push(attention(&one(q)?, &one(k)?, &one(v)?, m.as_ref(), p)?);
        }
        return Tensor::cat(&outs, 0);
    }
    // with a mask, blocks of BAND_QUERY_CHUNK rows as soon as there are two: a causal
    // decoder's 512-token prompt then skips a quarter of QKᵀ and P·V
    let banded = mask.is_some() && lq > BAND_QUERY_CHUNK;
    let chunk = if banded {
        BAND_QUERY_CHUNK
    } else {
        QUERY_CHUNK
    };
    let mut blocks = Vec::with_capacity(lq.div_ceil(chunk));
    for start in (0..lq).step_by(chunk) {
        let len = chunk.min(lq - start);
        let (q_blk, m_blk) = if len == lq {
            (q.clone(), mask.cloned())
        } else {
            let m = match mask {
                Some(m) if m.dim(2)? == 1 => Some(m.clone()),
                Some(m) => Some(m.narrow(2, start, len)?),
                None => None,
            };
            (q.narrow(2, start, len)?, m)
        };
        let keys = match (&m_blk, banded) {
            (Some(m), true) => visible_keys(m)?.filter(|&(a, e)| e - a < lk),
            _ => None,
        };
        let out = match keys {
            // [b, kv_heads, e - a, d] keys and values, the mask's columns a..e
            Some((a, e)) => {
                let k_band = k.narrow(2, a, e - a)?.contiguous()?;
                let v_band = v.narrow(2, a, e - a)?;
                let m_band = m_blk.as_ref().map(|m| m.narrow(3, a, e - a)).transpose()?;
                let probs = probabilities(&q_blk, &k_band, m_band.as_ref(), p)?;
                apply_probabilities(&probs, &v_band)?
            }
            None => {
                let probs = probabilities(&q_blk, k, m_blk.as_ref(), p)?;
                apply_probabilities(&probs, v)?
            }
        };
        blocks.push(out);
    }
    let out = if blocks.len() == 1 {
        blocks.pop().expect("one block")
    } else {
        Tensor::cat(&blocks, D::Minus2)?
    };
    out.to_dtype(q.dtype())
}
