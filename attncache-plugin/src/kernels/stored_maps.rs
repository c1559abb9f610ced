//! Attention from stored maps: `P·V` where `P` is a stored prompt's causal attention
//! probabilities (packed f16 lower triangles, as
//! [`super::causal_attention::causal_attention_recorded`] records them), read at the source
//! positions an alignment gives, instead of `softmax(QKᵀ)`.
//!
//! Row `i` of the new prompt takes the stored row `source[i]` at the columns
//! `source[0..=i]`, renormalised to sum to 1 (a row the alignment stretches takes some
//! stored columns twice, or leaves some out). Where `source` is the identity (the shared
//! prefix of two prompts) the stored row is copied as it is, through the CPU's F16C
//! conversion; the rest is gathered. One task per (head, block of rows), as the causal
//! kernel: each block's `P·V` is one single-threaded GEMM.

use candle_core::{DType, Device, Result, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::causal_attention::{packed_len, packed_row, probs_times_v, CAUSAL_BLOCK};
use super::f16_maps::with_values;

/// A stored prompt's maps for one layer: `heads` packed lower triangles of `len` rows.
#[derive(Clone, Copy, Debug)]
pub struct StoredLayer<'a> {
    /// `heads · packed_len(len)` probabilities.
    pub maps: &'a [f16],
    /// Query heads.
    pub heads: usize,
    /// The stored prompt's length.
    pub len: usize,
}

/// Whether `source` can be followed over a stored prompt of `stored_len` tokens: every entry
/// in range and never decreasing (so a row's columns are all visible from its source row).
pub fn valid_alignment(source: &[u32], stored_len: usize) -> bool {
    source.iter().all(|&s| (s as usize) < stored_len) && source.windows(2).all(|w| w[0] <= w[1])
}

/// `P·V` for the positions `rows` of a prompt aligned to a stored one by `source` (one
/// stored position per position, [`valid_alignment`]): `[1, heads, rows.len(), d_v]` f32.
///
/// `v`: `[1, kv_heads, L, d_v]` f32 on the CPU with `L == source.len()`; query head `h`
/// reads kv head `h / (heads / kv_heads)`.
pub fn attend_stored(
    stored: StoredLayer<'_>,
    source: &[u32],
    rows: std::ops::Range<usize>,
    v: &Tensor,
) -> Result<Tensor> {
    let (vb, kv_heads, len, dv) = v.dims4()?;
    let heads = stored.heads;
    if vb != 1
        || kv_heads == 0
        || !heads.is_multiple_of(kv_heads)
        || len != source.len()
        || rows.start > rows.end
        || rows.end > len
    {
        candle_core::bail!(
            "stored maps: v {:?} does not fit {heads} heads over {} positions (rows {rows:?})",
            v.dims(),
            source.len()
        );
    }
    if stored.maps.len() != heads * packed_len(stored.len) || !valid_alignment(source, stored.len) {
        candle_core::bail!("stored maps: the alignment does not fit the stored prompt");
    }
    let v = v.to_dtype(DType::F32)?;
    let groups = heads / kv_heads;
    // columns [0, identity) read the stored rows as they are
    let identity = source
        .iter()
        .enumerate()
        .take_while(|(i, s)| **s as usize == *i)
        .count();
    let (first, n_rows) = (rows.start, rows.len());
    let compute = |vv: &[f32]| {
        let mut out = vec![0f32; heads * n_rows * dv];
        if n_rows == 0 {
            return out;
        }
        out.par_chunks_mut(n_rows * dv)
            .enumerate()
            .for_each(|(h, head_out)| {
                let g = h / groups;
                let maps =
                    &stored.maps[h * packed_len(stored.len)..(h + 1) * packed_len(stored.len)];
                let vg = &vv[g * len * dv..(g + 1) * len * dv];
                head_out
                    .par_chunks_mut(CAUSAL_BLOCK * dv)
                    .enumerate()
                    .for_each(|(bi, block_out)| {
                        let start = first + bi * CAUSAL_BLOCK;
                        let n = block_out.len() / dv;
                        block(maps, source, identity, start, n, vg, dv, block_out);
                    });
            });
        out
    };
    let out = with_values::<f32, _>(&v, compute)?
        .ok_or_else(|| candle_core::Error::Msg("stored maps: v is not on the CPU".into()))?;
    Tensor::from_vec(out, (1, heads, n_rows, dv), &Device::Cpu)
}

thread_local! {
    /// A task's probabilities, reused across tasks on the same thread.
    static PROBS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One task: rows `start..start + n` of one head (`n ≤ CAUSAL_BLOCK`). The stored rows are
/// read unnormalised; `P·V` is taken on them and each output row then divided by its row's
/// sum (the same result as normalising the `keys`-wide row first, for `dv` divisions instead
/// of `keys`).
#[allow(clippy::too_many_arguments)]
fn block(
    maps: &[f16],
    source: &[u32],
    identity: usize,
    start: usize,
    n: usize,
    v: &[f32],
    dv: usize,
    out: &mut [f32],
) {
    let keys = start + n;
    PROBS.with(|probs| {
        let mut probs = probs.borrow_mut();
        // every value is written by `read_rows` (the ones a row does not see set to 0)
        probs.resize(n * keys, 0.0);
        let mut scales = [1f32; CAUSAL_BLOCK];
        read_rows()(
            &mut probs[..n * keys],
            maps,
            source,
            identity,
            start,
            &mut scales[..n],
        );
        probs_times_v(&probs, v, n, keys, dv, out);
        for (row, &scale) in out.chunks_mut(dv).zip(&scales[..n]) {
            row.iter_mut().for_each(|x| *x *= scale);
        }
    });
}

/// Reads a block's stored rows into `probs` and their reciprocal sums into `scales`.
type ReadRows = fn(&mut [f32], &[f16], &[u32], usize, usize, &mut [f32]);

/// [`read_rows_into`] compiled for the widest vector unit this CPU has.
fn read_rows() -> ReadRows {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return |p, m, s, id, st, sc| unsafe { read_rows_avx2(p, m, s, id, st, sc) };
        }
    }
    read_rows_into
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn read_rows_avx2(
    probs: &mut [f32],
    maps: &[f16],
    source: &[u32],
    identity: usize,
    start: usize,
    scales: &mut [f32],
) {
    read_rows_into(probs, maps, source, identity, start, scales);
}

/// Lanes of the partial sums (a single running sum is a serial chain; these vectorise).
const LANES: usize = 16;

/// Row `r` of `probs` (`probs.len() / scales.len()` wide) becomes the stored row
/// `source[start + r]` at the columns `source[0..=start + r]` (the first `identity` copied
/// through F16C, the rest gathered), 0 after; `scales[r]` its reciprocal sum (1 for a row
/// summing to 0 or to a non-finite value, which is then left as it is).
#[inline(always)]
fn read_rows_into(
    probs: &mut [f32],
    maps: &[f16],
    source: &[u32],
    identity: usize,
    start: usize,
    scales: &mut [f32],
) {
    let keys = probs.len() / scales.len().max(1);
    for (r, (dst, scale)) in probs.chunks_mut(keys).zip(scales.iter_mut()).enumerate() {
        let i = start + r;
        let s = source[i] as usize;
        let row = &maps[packed_row(s)..packed_row(s) + s + 1];
        let same = (i + 1).min(identity);
        let (seen, unseen) = dst.split_at_mut(i + 1);
        row[..same].convert_to_f32_slice(&mut seen[..same]);
        for (d, &j) in seen[same..].iter_mut().zip(&source[same..=i]) {
            *d = row[j as usize].to_f32();
        }
        unseen.fill(0.0);
        let mut lanes = [0f32; LANES];
        let mut chunks = seen.chunks_exact(LANES);
        for c in &mut chunks {
            for (l, &x) in lanes.iter_mut().zip(c) {
                *l += x;
            }
        }
        let sum: f32 = chunks.remainder().iter().chain(&lanes).sum();
        *scale = if sum > 0.0 && sum.is_finite() {
            1.0 / sum
        } else {
            1.0
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::causal_attention::{
        causal_attention, causal_attention_recorded, causal_mask,
    };

    fn random(shape: (usize, usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(7);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn recorded_maps_give_back_the_output_and_are_its_probabilities() {
        let len = 150; // several blocks, the last partial
        let (q, k, v) = (
            random((1, 6, len, 32), 1),
            random((1, 2, len, 32), 2),
            random((1, 2, len, 32), 3),
        );
        let mask = causal_mask(len, len).unwrap();
        let exact = causal_attention(&q, &k, &v, &mask, 0.2, None)
            .unwrap()
            .unwrap();
        let (out, maps) = causal_attention_recorded(&q, &k, &v, &mask, 0.2)
            .unwrap()
            .unwrap();
        assert_eq!(max_diff(&out, &exact), 0.0);
        assert_eq!(maps.len(), 6 * packed_len(len));
        // each packed row sums to 1
        for h in 0..6 {
            for i in [0, 1, 63, 64, 149] {
                let at = h * packed_len(len) + packed_row(i);
                let sum: f32 = maps[at..at + i + 1].iter().map(|x| x.to_f32()).sum();
                assert!((sum - 1.0).abs() < 5e-3, "head {h} row {i}: {sum}");
            }
        }
        // the maps read back at the identity give the output, within f16's rounding
        let source: Vec<u32> = (0..len as u32).collect();
        let stored = StoredLayer {
            maps: &maps,
            heads: 6,
            len,
        };
        let again = attend_stored(stored, &source, 0..len, &v).unwrap();
        assert!(
            max_diff(&again, &exact) < 2e-3,
            "{}",
            max_diff(&again, &exact)
        );
        // the first rows only
        let first = attend_stored(stored, &source, 0..70, &v).unwrap();
        assert!(max_diff(&first, &exact.narrow(2, 0, 70).unwrap()) < 2e-3);
        // rows after a head computed elsewhere (a prefix reused): the same rows (blocked
        // from another start, so summed in another order)
        let tail = attend_stored(stored, &source, 70..len, &v).unwrap();
        assert_eq!(tail.dims(), &[1, 6, len - 70, 32]);
        let whole = Tensor::cat(&[&first, &tail], 2).unwrap();
        assert!(
            max_diff(&whole, &again) < 1e-5,
            "{}",
            max_diff(&whole, &again)
        );
        // no rows: nothing computed
        let none = attend_stored(stored, &source, 0..0, &v).unwrap();
        assert_eq!(none.dims(), &[1, 6, 0, 32]);
    }

    #[test]
    fn an_aligned_row_sees_only_its_visible_columns_and_sums_to_one() {
        // a stored prompt of 5 positions; a new one of 7 stretched over it
        let (heads, stored_len, len) = (1, 5, 7);
        let mut maps = vec![f16::ZERO; packed_len(stored_len)];
        for i in 0..stored_len {
            for j in 0..=i {
                maps[packed_row(i) + j] = f16::from_f32(1.0 / (i + 1) as f32);
            }
        }
        let source = [0u32, 1, 2, 2, 3, 3, 4];
        assert!(valid_alignment(&source, stored_len));
        // v = one-hot positions, so the output row is the probability row itself
        let eye: Vec<f32> = (0..len * len)
            .map(|x| if x / len == x % len { 1.0 } else { 0.0 })
            .collect();
        let v = Tensor::from_vec(eye, (1, 1, len, len), &Device::Cpu).unwrap();
        let stored = StoredLayer {
            maps: &maps,
            heads,
            len: stored_len,
        };
        let out = attend_stored(stored, &source, 0..len, &v).unwrap();
        let rows = out.squeeze(0).unwrap().squeeze(0).unwrap();
        let rows = rows.to_vec2::<f32>().unwrap();
        for (i, row) in rows.iter().enumerate() {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {i}: {sum}");
            assert!(row[i + 1..].iter().all(|&x| x == 0.0), "row {i} sees ahead");
        }
        // an alignment that decreases or leaves the stored prompt is refused
        assert!(!valid_alignment(&[0, 2, 1], stored_len));
        assert!(!valid_alignment(&[0, 1, 5], stored_len));
        assert!(attend_stored(stored, &[0, 2, 1, 3, 4, 4, 4], 0..len, &v).is_err());
    }
}
