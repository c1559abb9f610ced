//! Exact causal attention for a decoder's prompt, one task per (query head, block of query
//! rows) on rayon's threads, each task's two products single-threaded.
//!
//! [`super::exact_attention::attention_general`] multiplies whole heads (or bands of 256 rows) with
//! gemm spreading every product over the threads: for SmolLM2's small heads (64 dims) that is
//! thousands of short multiplies a forward, each a fork and join, and a score matrix as wide
//! as the band's last row. Here each task multiplies its block of rows only against the keys
//! its last row can see, applies the softmax to each row's own visible keys (a row's later
//! keys get exactly 0, as the mask's −∞ gives them), and multiplies by V; the tasks keep both
//! threads busy without a join inside a task.
//!
//! Used only where the mask is exactly the causal one (`0` on and below the diagonal, shifted
//! by the positions already in the cache, and a large negative value above): anything else
//! (a sliding window, padding, softcapping) stays on the general path. The result equals the
//! general path's up to the order of float sums (tested within 1e-5).

use candle_core::{DType, Device, Result, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::f16_maps::with_values;
use super::softmax_rows::softmax_rows_visible;

/// Query rows per task.
pub const CAUSAL_BLOCK: usize = 64;

/// A mask value at or below this is a masked key (mistral.rs writes −∞ or the dtype's
/// lowest value); after scaling, the general path's softmax gives such a key exactly 0.
const MASKED: f32 = -1e30;

/// The number of keys before the first query row when `mask` (`[1, 1, L_q, L_kv]`, f32 on
/// the CPU) is the causal mask: row `r` sees keys `0..=offset + r` (value 0) and no other
/// (value ≤ −1e30), with `offset = L_kv − L_q`. `None` for any other mask.
pub fn causal_offset(mask: &Tensor) -> Result<Option<usize>> {
    let (mb, mh, lq, lk) = mask.dims4()?;
    if mb != 1 || mh != 1 || lk < lq || mask.dtype() != DType::F32 || !mask.device().is_cpu() {
        return Ok(None);
    }
    let offset = lk - lq;
    let scan = |m: &[f32]| -> Option<usize> {
        let causal = m.chunks_exact(lk).enumerate().all(|(r, row)| {
            let (seen, unseen) = row.split_at(offset + r + 1);
            seen.iter().all(|&x| x == 0.0) && unseen.iter().all(|&x| x <= MASKED)
        });
        causal.then_some(offset)
    };
    Ok(with_values(mask, scan)?.flatten())
}

/// A nested [`with_values`]'s answer, flattened.
fn flat<T>(r: Result<Option<Result<Option<T>>>>) -> Result<Option<T>> {
    Ok(r?.transpose()?.flatten())
}

/// `softmax(scale·QKᵀ + causal mask)·V` `[1, heads, L_q, d_v]` (f32) when `mask` is the
/// causal mask and the inputs are this path's case (one sequence, f32 on the CPU, no
/// `softcap`); `None` otherwise, for the general path.
///
/// `q`: `[1, heads, L_q, d]`, `k`: `[1, kv_heads, L_kv, d]`, `v`: `[1, kv_heads, L_kv, d_v]`;
/// query head `h` reads kv head `h / (heads / kv_heads)`.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
    softcap: Option<f32>,
) -> Result<Option<Tensor>> {
    Ok(causal(q, k, v, mask, scale, softcap, false)?.map(|(out, _)| out))
}

/// [`causal_attention`] of a whole prompt (no cached prefix) that also returns its attention
/// probabilities, packed lower triangles per head ([`packed_len`] values each, row `i`'s
/// `i + 1` visible keys at [`packed_row`]), as f16: the maps a decoder's map reuse stores.
/// `None` where [`causal_attention`] would decline, or with keys before the first row.
pub fn causal_attention_recorded(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
) -> Result<Option<(Tensor, Vec<f16>)>> {
    if q.dim(2)? != k.dim(2)? {
        return Ok(None);
    }
    Ok(causal(q, k, v, mask, scale, None, true)?.and_then(|(out, maps)| maps.map(|m| (out, m))))
}

/// Values in one head's packed lower triangle of `len` rows.
pub fn packed_len(len: usize) -> usize {
    len * (len + 1) / 2
}

/// Where row `i` starts in a packed lower triangle (its `i + 1` values follow).
pub fn packed_row(i: usize) -> usize {
    i * (i + 1) / 2
}

/// Splits one head's packed triangle into the segments of its blocks of [`CAUSAL_BLOCK`]
/// rows, in order.
pub(crate) fn block_segments<T>(mut head: &mut [T], rows: usize) -> Vec<&mut [T]> {
    let mut segments = Vec::with_capacity(rows.div_ceil(CAUSAL_BLOCK));
    for start in (0..rows).step_by(CAUSAL_BLOCK) {
        let end = (start + CAUSAL_BLOCK).min(rows);
        let (segment, rest) = head.split_at_mut(packed_row(end) - packed_row(start));
        segments.push(segment);
        head = rest;
    }
    segments
}

/// The causal kernel; with `record`, also the packed probabilities (see
/// [`causal_attention_recorded`]).
#[allow(clippy::type_complexity)]
fn causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
    softcap: Option<f32>,
    record: bool,
) -> Result<Option<(Tensor, Option<Vec<f16>>)>> {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if softcap.is_some_and(|c| c != 0.0) || !f32_cpu(q) || !f32_cpu(k) || !f32_cpu(v) {
        return Ok(None);
    }
    let (b, heads, lq, d) = q.dims4()?;
    let (kb, kv_heads, lk, kd) = k.dims4()?;
    let (vb, v_heads, v_len, dv) = v.dims4()?;
    if b != 1 || kb != 1 || vb != 1 || kd != d || v_heads != kv_heads || v_len != lk {
        return Ok(None);
    }
    if kv_heads == 0 || heads % kv_heads != 0 || lq == 0 || mask.dims4()? != (1, 1, lq, lk) {
        return Ok(None);
    }
    let Some(offset) = causal_offset(mask)? else {
        return Ok(None);
    };
    if record && offset != 0 {
        return Ok(None);
    }
    let groups = heads / kv_heads;
    let compute = |qv: &[f32], kv: &[f32], vv: &[f32]| {
        let mut out = vec![0f32; heads * lq * dv];
        let mut maps = if record {
            vec![f16::ZERO; heads * packed_len(lq)]
        } else {
            Vec::new()
        };
        let mut head_maps: Vec<Option<&mut [f16]>> = if record {
            maps.chunks_mut(packed_len(lq)).map(Some).collect()
        } else {
            (0..heads).map(|_| None).collect()
        };
        out.par_chunks_mut(lq * dv)
            .zip(head_maps.par_iter_mut())
            .enumerate()
            .for_each(|(h, (head_out, head_map))| {
                let g = h / groups;
                let qh = &qv[h * lq * d..(h + 1) * lq * d];
                let kg = &kv[g * lk * d..(g + 1) * lk * d];
                let vg = &vv[g * lk * dv..(g + 1) * lk * dv];
                let segments: Vec<Option<&mut [f16]>> = match head_map.take() {
                    Some(m) => block_segments(m, lq).into_iter().map(Some).collect(),
                    None => (0..lq.div_ceil(CAUSAL_BLOCK)).map(|_| None).collect(),
                };
                head_out
                    .par_chunks_mut(CAUSAL_BLOCK * dv)
                    .zip(segments.into_par_iter())
                    .enumerate()
                    .for_each(|(bi, (block_out, segment))| {
                        let start = bi * CAUSAL_BLOCK;
                        let rows = block_out.len() / dv;
                        let block = Block {
                            rows,
                            keys: offset + start + rows,
                            first_visible: offset + start + 1,
                            d,
                            dv,
                        };
                        let q_rows = &qh[start * d..(start + rows) * d];
                        block.run(q_rows, kg, vg, scale, block_out, segment);
                    });
            });
        (out, record.then_some(maps))
    };
    let out = flat(with_values::<f32, _>(q, |qv| {
        flat(with_values::<f32, _>(k, |kv| {
            with_values::<f32, _>(v, |vv| compute(qv, kv, vv))
        }))
    }))?;
    let Some((out, maps)) = out else {
        return Ok(None);
    };
    Ok(Some((
        Tensor::from_vec(out, (1, heads, lq, dv), &Device::Cpu)?,
        maps,
    )))
}

/// One task: `rows` query rows whose first sees `first_visible` keys and whose last sees
/// `keys` (one more each row).
struct Block {
    rows: usize,
    keys: usize,
    first_visible: usize,
    d: usize,
    dv: usize,
}

thread_local! {
    /// A task's scores and probabilities, reused across tasks on the same thread (fresh
    /// pages for every task would fault them in each time).
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

impl Block {
    /// Writes the block's output rows (`rows × dv`) into `out`.
    fn run(
        &self,
        q_rows: &[f32],
        k: &[f32],
        v: &[f32],
        scale: f32,
        out: &mut [f32],
        record: Option<&mut [f16]>,
    ) {
        let (rows, keys, d, dv) = (self.rows, self.keys, self.d, self.dv);
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let (scores, probs) = &mut *scratch;
            scores.resize(rows * keys, 0.0);
            probs.resize(rows * keys, 0.0);
            // SAFETY: dst = scores, rows·keys row-major (cs 1, rs keys); lhs = the block's
            // query rows, rows·d row-major (cs 1, rs d); rhs = Kᵀ over the first `keys` keys,
            // read from K's keys·d row-major values (cs d, rs 1); every slice is that long.
            unsafe {
                gemm::gemm(
                    rows,
                    keys,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    q_rows.as_ptr(),
                    1,
                    d as isize,
                    k.as_ptr(),
                    d as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            softmax_rows_visible(probs, scores, keys, self.first_visible, scale);
            if let Some(record) = record {
                // row r sees first_visible + r keys; the packed rows follow one another
                let mut at = 0;
                for (r, row) in probs.chunks(keys).enumerate() {
                    let n = self.first_visible + r;
                    record[at..at + n].convert_from_f32_slice(&row[..n]);
                    at += n;
                }
            }
            probs_times_v(probs, v, rows, keys, dv, out);
        });
    }
}

/// `out = P·V[..keys]`: `rows × keys` probabilities (row-major) times the first `keys` rows
/// of `v` (`keys × dv`, row-major), into `out` (`rows × dv`), single-threaded (the callers'
/// tasks already keep the threads busy).
pub(crate) fn probs_times_v(
    probs: &[f32],
    v: &[f32],
    rows: usize,
    keys: usize,
    dv: usize,
    out: &mut [f32],
) {
    assert!(
        probs.len() >= rows * keys && v.len() >= keys * dv && out.len() >= rows * dv,
        "P·V: slices shorter than {rows}×{keys}, {keys}×{dv} and {rows}×{dv}"
    );
    // SAFETY: dst = out, rows·dv row-major; lhs = probs, rows·keys row-major; rhs = V's
    // first `keys` rows, keys·dv row-major; every slice is at least that long (asserted).
    unsafe {
        gemm::gemm(
            rows,
            dv,
            keys,
            out.as_mut_ptr(),
            1,
            dv as isize,
            false,
            probs.as_ptr(),
            1,
            keys as isize,
            v.as_ptr(),
            1,
            dv as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The causal mask of the last `rows` of `len` positions, `[1, 1, rows, len]`: 0 where a row
/// sees a key, −∞ after (what [`causal_attention`] takes for rows after `len − rows` cached
/// or computed otherwise).
pub fn causal_mask(rows: usize, len: usize) -> Result<Tensor> {
    let offset = len.saturating_sub(rows);
    let values: Vec<f32> = (0..rows)
        .flat_map(|r| {
            (0..len).map(move |c| {
                if c <= offset + r {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(values, (1, 1, rows, len), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::exact_attention::{attention_general, normalize_mask, AttentionParams};

    /// mistral.rs's prompt mask: `[L_q, L_kv]`, 0 where a row sees a key, −∞ above.
    fn causal_mask(lq: usize, lk: usize, masked: f32) -> Tensor {
        let offset = lk - lq;
        let values: Vec<f32> = (0..lq)
            .flat_map(|r| (0..lk).map(move |c| if c <= offset + r { 0.0 } else { masked }))
            .collect();
        Tensor::from_vec(values, (lq, lk), &Device::Cpu).unwrap()
    }

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 33) as f32 / (1u64 << 31) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn equals_the_general_path_with_and_without_a_cached_prefix() {
        let p = AttentionParams {
            softmax_scale: 0.125,
            softcap: None,
            n_kv_groups: 3,
        };
        // a whole prompt (several blocks, the last partial) and one after a 150-token prefix
        for (lq, lk, masked) in [
            (200, 200, f32::NEG_INFINITY),
            (70, 220, f32::MIN),
            (1, 9, f32::NEG_INFINITY),
        ] {
            let q = random((1, 9, lq, 64), 1);
            let k = random((1, 3, lk, 64), 2);
            let v = random((1, 3, lk, 64), 3);
            let mask = causal_mask(lq, lk, masked);
            let mask = normalize_mask(&mask, 1, 9, lq, lk).unwrap();
            let ours = causal_attention(&q, &k, &v, &mask, p.softmax_scale, p.softcap)
                .unwrap()
                .expect("causal");
            let general = attention_general(&q, &k, &v, Some(&mask), &p).unwrap();
            let diff = (ours - general).unwrap().abs().unwrap().max_all().unwrap();
            let diff = diff.to_scalar::<f32>().unwrap();
            assert!(diff <= 1e-5, "{lq}/{lk}: {diff}");
        }
    }

    #[test]
    fn any_other_mask_or_input_is_left_to_the_general_path() {
        let p = AttentionParams {
            softmax_scale: 0.125,
            softcap: None,
            n_kv_groups: 1,
        };
        let (q, k, v) = (
            random((1, 2, 8, 4), 1),
            random((1, 2, 8, 4), 2),
            random((1, 2, 8, 4), 3),
        );
        let norm = |m: &Tensor| normalize_mask(m, 1, 2, 8, 8).unwrap();
        // a sliding window of 4: a row does not see its early keys
        let mut window = causal_mask(8, 8, f32::NEG_INFINITY)
            .to_vec2::<f32>()
            .unwrap();
        window[7][0] = f32::NEG_INFINITY;
        let window = Tensor::new(window, &Device::Cpu).unwrap();
        assert!(causal_attention(&q, &k, &v, &norm(&window), 0.125, None)
            .unwrap()
            .is_none());
        // bidirectional (all zeros)
        let zeros = Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(causal_attention(&q, &k, &v, &norm(&zeros), 0.125, None)
            .unwrap()
            .is_none());
        // softcapping
        let capped = AttentionParams {
            softcap: Some(30.0),
            ..p
        };
        let causal = norm(&causal_mask(8, 8, f32::NEG_INFINITY));
        assert!(causal_attention(&q, &k, &v, &causal, 0.125, capped.softcap)
            .unwrap()
            .is_none());
        // the plain causal mask is taken
        assert!(causal_attention(&q, &k, &v, &causal, 0.125, None)
            .unwrap()
            .is_some());
    }
}
