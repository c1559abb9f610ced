//! One softmax row, vectorised: `softmax(scale·s + mask)` in one pass per row, the loops
//! written without branches so that they vectorise under the widest vector unit the CPU has
//! (chosen once per call, [`row_kernel`]). Shared by the general exact attention (rows in
//! parallel) and the causal kernel (each task's rows, over each row's visible keys).

use crate::kernels::layer_kernels::exp;

/// Causal rows of `lk` scores, one thread: row `r` through `softmax(scale·s)` over its first
/// `first_visible + r` values (at most `lk`) into `probs`, its later values set to exactly 0
/// (what a −∞ mask gives them).
pub(crate) fn softmax_rows_visible(
    probs: &mut [f32],
    scores: &[f32],
    lk: usize,
    first_visible: usize,
    scale: f32,
) {
    let kernel = row_kernel();
    for (r, (dst, s)) in probs.chunks_mut(lk).zip(scores.chunks(lk)).enumerate() {
        let visible = (first_visible + r).min(lk);
        let (seen, unseen) = dst.split_at_mut(visible);
        kernel(seen, &s[..visible], None, scale);
        unseen.fill(0.0);
    }
}

/// One softmax row: `dst = softmax(scale·s + m)`.
pub(crate) type RowKernel = fn(&mut [f32], &[f32], Option<&[f32]>, f32);

/// [`softmax_row`] compiled for the widest vector unit this CPU has, chosen once per call.
pub(crate) fn row_kernel() -> RowKernel {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return |d, s, m, scale| unsafe { softmax_row_avx512(d, s, m, scale) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return |d, s, m, scale| unsafe { softmax_row_avx2(d, s, m, scale) };
        }
    }
    softmax_row
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_row_avx512(dst: &mut [f32], s: &[f32], m: Option<&[f32]>, scale: f32) {
    softmax_row(dst, s, m, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(dst: &mut [f32], s: &[f32], m: Option<&[f32]>, scale: f32) {
    softmax_row(dst, s, m, scale);
}

/// Lanes of the partial maxima and sums: the loops below keep `LANES` independent
/// accumulators so that they vectorise (a single running max or sum is a serial chain).
const LANES: usize = 16;

/// `softmax(scale·s + m)` into `dst`, written without branches in its loops so that they
/// vectorise under the caller's target features. e^x is [`exp`] (Cephes' polynomial, within
/// 2 ulps of libm), with a masked key (−∞) given exactly 0 as libm's `expf(−∞)` is; sums are
/// taken over `LANES` partial sums. Compared with scaling, adding the mask and candle's
/// `softmax_last_dim` one after another the probabilities differ by a few ulps (tested).
/// A row with every key masked comes out NaN, as candle's does.
#[inline(always)]
fn softmax_row(dst: &mut [f32], s: &[f32], m: Option<&[f32]>, scale: f32) {
    match m {
        Some(m) => {
            for ((d, &x), &a) in dst.iter_mut().zip(s).zip(m) {
                *d = x * scale + a;
            }
        }
        None => {
            for (d, &x) in dst.iter_mut().zip(s) {
                *d = x * scale;
            }
        }
    }
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = dst.chunks_exact(LANES);
    for c in &mut chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    // below −87 `exp` clamps; e^x is then under 1.7e−38 and taken as 0, as e^−∞ is
    let e = |x: f32| {
        let v = x - max;
        let e = exp(v);
        if v < -87.0 {
            0.0
        } else {
            e
        }
    };
    let mut sums = [0f32; LANES];
    let mut chunks = dst.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (acc, x) in sums.iter_mut().zip(c.iter_mut()) {
            *x = e(*x);
            *acc += *x;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for x in chunks.into_remainder() {
        *x = e(*x);
        sum += *x;
    }
    for d in dst.iter_mut() {
        *d /= sum;
    }
}
