//! Work of a transformer layer outside attention, made fast on the CPU: the gated MLP's
//! activation ([`gelu_tanh_glu`], [`silu_glu`]) and the float linear projections ([`linear`]).
//!
//! mistral.rs 0.8.1 computes the gated MLP's activation `gelu_tanh(gate) · up` (EmbeddingGemma's
//! `gelu_pytorch_tanh`) in `mistralrs-quant`'s `fused_glu`: one rayon task per element calling
//! libm's `tanhf`. Profiled on a 512-token EmbeddingGemma forward that was 14% of the CPU time
//! (PyTorch: 2%). Here the same function runs over chunks with an exp that the compiler can
//! vectorise (AVX-512 or AVX2+FMA, chosen at run time), through the identity
//! `0.5·x·(1 + tanh(u)) = x / (1 + e^(−2u))`, `u = √(2/π)·(x + 0.044715·x³)`.
//! The result agrees with the tanh form to a few f32 ulps (tested).

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

use crate::kernels::f16_maps::with_values;

/// Elements per rayon task: large enough that scheduling is noise, small enough to split
/// a 128-token layer (128 · 1152 values) over the cores.
const CHUNK: usize = 8 * 1024;

/// `gelu_tanh(gate) · up` element by element (PyTorch's `gelu(approximate="tanh")`), for two
/// f32 CPU tensors of one shape; `None` for any other kind of input (the caller then keeps
/// its own computation).
pub fn gelu_tanh_glu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    glu(gate, up, Glu::GeluTanh)
}

/// `silu(gate) · up` element by element (llama's gated MLP, `x / (1 + e^(−x))`), for two
/// f32 CPU tensors of one shape; `None` for any other kind of input. mistral.rs's fused
/// kernel runs one rayon task per element with libm's `expf` (measured: about 10% of a
/// SmolLM2 prefill on 2 cores).
pub fn silu_glu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    glu(gate, up, Glu::Silu)
}

/// The gate activations [`glu`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Glu {
    GeluTanh,
    Silu,
}

fn glu(gate: &Tensor, up: &Tensor, act: Glu) -> Result<Option<Tensor>> {
    if gate.dtype() != DType::F32 || up.dtype() != DType::F32 || gate.shape() != up.shape() {
        return Ok(None);
    }
    let out = with_values::<f32, _>(gate, |a| {
        with_values::<f32, _>(up, |b| {
            let mut out = vec![0f32; a.len()];
            out.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(o, (a, b))| glu_chunk(a, b, o, act));
            out
        })
    })?;
    match out.transpose()?.flatten() {
        Some(values) => Tensor::from_vec(values, gate.shape(), gate.device()).map(Some),
        None => Ok(None),
    }
}

/// Most rows of `x` for which [`linear`] asks gemm for a column-major product (and then
/// transposes it); above, a row-major product, where gemm repacks the weight once per call,
/// a small share of the multiply. Measured with `cargo bench --bench attention -- linear` at
/// EmbeddingGemma's 768 → 1152 projection (column-major / candle, one run): 0.25 / 2.29 ms
/// at 4 rows, 1.64 / 4.04 at 128, 6.34 / 8.80 at 512, 13.0 / 14.8 at 1024; at 2048 rows,
/// with the cap raised, 25.0 / 22.3 ms.
pub const LINEAR_MAX_ROWS: usize = 1024;

/// `x · wᵀ` for a float linear layer without bias: `x` `[.., k]`, `w` `[n, k]` (mistral.rs's
/// layout), both f32 on the CPU; `None` for anything else.
///
/// candle asks `gemm` for a row-major `[m, n]` result, one call per leading batch index;
/// gemm then solves the transposed problem, in which `w` is the left operand in the wrong
/// orientation, and repacks the whole weight matrix (element by element) on every call — for
/// a 16-token input that copy was most of the forward, and a batch of 16 prompts repacked it
/// 16 times. Up to [`LINEAR_MAX_ROWS`] rows this asks for the result column-major instead,
/// which lets gemm read `w` where it lies and pack only `x`, then transposes the result into
/// place (`m·n` values instead of `k·n`); above, it asks for the row-major result in one call
/// over all the rows of every batch index (one repack).
///
/// A weight kept transposed (`w.t()` contiguous, as patch 0007's GGUF loader keeps f32
/// weights) is best of all: gemm reads it in place for the row-major result at any number of
/// rows, with no repack and no transpose. Measured with `cargo bench --bench attention --
/// linear` at SmolLM2's 576 → 1536 (contiguous / transposed weight, one run): 1.45 / 1.16 ms
/// at 128 rows, 5.70 / 4.86 at 512, 12.5 / 9.2 at 1024, 18.0 / 18.8 at 2048; at 1536 → 576
/// 6.80 / 4.35 ms at 512 and 12.2 / 8.87 at 1024.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (n, k) = match w.dims() {
        [n, k] => (*n, *k),
        _ => return Ok(None),
    };
    let dims = x.dims();
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    if dims.last() != Some(&k) || !f32_cpu(x) || !f32_cpu(w) {
        return Ok(None);
    }
    let m = x.elem_count() / k.max(1);
    if m == 0 || n == 0 {
        return Ok(None);
    }
    // w stored transposed (its transpose `[k, n]` contiguous, as the GGUF loader keeps f32
    // weights for this path): gemm reads it where it lies for a row-major result at any m
    let wt = w.t()?;
    if wt.is_contiguous() {
        let product = with_values::<f32, _>(x, |xv| {
            with_values::<f32, _>(&wt, |wtv| {
                // SAFETY: lhs = x, m·k row-major; rhs = wᵀ, k·n row-major (cs 1, rs n);
                // dst row-major m·n; the slices are exactly that long.
                unsafe { gemm_into(m, n, k, xv, (1, k as isize), wtv, (1, n as isize), false) }
            })
        })?;
        return finish(product.transpose()?.flatten(), dims, n, x);
    }
    let column_major = m <= LINEAR_MAX_ROWS;
    let product = with_values::<f32, _>(x, |xv| {
        with_values::<f32, _>(w, |wv| {
            // SAFETY: lhs = x, m·k row-major (lhs_cs 1, lhs_rs k); rhs = wᵀ read from w's
            // n·k row-major values (rhs_cs k, rhs_rs 1); the slices are exactly that long.
            let out = unsafe {
                gemm_into(
                    m,
                    n,
                    k,
                    xv,
                    (1, k as isize),
                    wv,
                    (k as isize, 1),
                    column_major,
                )
            };
            match column_major {
                true => transpose(&out, n, m),
                false => out,
            }
        })
    })?;
    finish(product.transpose()?.flatten(), dims, n, x)
}

/// The `[.., n]` tensor of `linear`'s product values, or `None` when there are none.
fn finish(
    values: Option<Vec<f32>>,
    dims: &[usize],
    n: usize,
    x: &Tensor,
) -> Result<Option<Tensor>> {
    let Some(values) = values else {
        return Ok(None);
    };
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    Tensor::from_vec(values, shape, x.device()).map(Some)
}

/// `lhs · rhs` (`m×k` by `k×n`, each given by its values and `(column, row)` strides) into a
/// new buffer, row-major, or column-major when `column_major`; gemm on rayon's threads.
///
/// # Safety
/// The strides must address only values inside `lhs` and `rhs`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    (lhs_cs, lhs_rs): (isize, isize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (isize, isize),
    column_major: bool,
) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(n * m);
    // column-major dst: (i, j) at i + j·m; row-major: at i·n + j
    let (dst_cs, dst_rs) = match column_major {
        true => (m as isize, 1),
        false => (1, n as isize),
    };
    // SAFETY: dst has capacity m·n at the strides above and gemm writes every value of it
    // (read_dst false: nothing is read), so the length can then be set; lhs and rhs as the
    // caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            dst_cs,
            dst_rs,
            false,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
        out.set_len(n * m);
    }
    out
}

/// `src` (`rows × cols`, row-major) transposed: the result's rows in bands of `BAND`, one
/// rayon task each, so a task reads `BAND` adjacent values of every source row.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const BAND: usize = 32;
    let mut dst = vec![0f32; rows * cols];
    dst.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * BAND;
            let band_cols = out.len() / rows;
            for r in 0..rows {
                let row = &src[r * cols + c0..r * cols + c0 + band_cols];
                for (c, &v) in row.iter().enumerate() {
                    out[c * rows + r] = v;
                }
            }
        });
    dst
}

/// One chunk on the widest vector unit this CPU has.
fn glu_chunk(a: &[f32], b: &[f32], out: &mut [f32], act: Glu) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            unsafe { glu_avx512(a, b, out, act) };
            return;
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { glu_avx2(a, b, out, act) };
            return;
        }
    }
    glu_body(a, b, out, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn glu_avx512(a: &[f32], b: &[f32], out: &mut [f32], act: Glu) {
    glu_body(a, b, out, act);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn glu_avx2(a: &[f32], b: &[f32], out: &mut [f32], act: Glu) {
    glu_body(a, b, out, act);
}

/// Written without branches in the loops so that they vectorise under whatever target
/// features the caller enables.
#[inline(always)]
fn glu_body(a: &[f32], b: &[f32], out: &mut [f32], act: Glu) {
    match act {
        Glu::GeluTanh => {
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = gelu_tanh(x) * y;
            }
        }
        Glu::Silu => {
            for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
                *o = silu(x) * y;
            }
        }
    }
}

/// SiLU (swish), `x / (1 + e^(−x))`, as mistral.rs and PyTorch write it.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `√(2/π)`, as PyTorch and mistral.rs spell it in f32.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_COEFF: f32 = 0.044_715;

/// PyTorch's tanh-approximated GELU, as `x / (1 + e^(−2u))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let u = SQRT_2_OVER_PI * (x + GELU_COEFF * x * x * x);
    x / (1.0 + exp(-2.0 * u))
}

/// e^x in f32 without branches or library calls: `x = n·ln2 + r`, |r| ≤ ln2/2, e^r by
/// Cephes' degree-6 `expf` polynomial (relative error ≈ 1 ulp), times 2^n built in the
/// exponent bits. Inputs are clamped to [−87, 88], so the result is a normal float or, for
/// x below −87, a value under 1.7e−38 where e^x would be smaller still (for the GELU above
/// that is a difference far below an ulp of its result).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // adding and removing 1.5·2^23 rounds to the nearest integer, and leaves n in the low
    // mantissa bits of `t`
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
    let er = p * r * r + r + 1.0;
    // n sits in the low bits of t as a two's-complement offset from ROUND's bits
    let n_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
    er * scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ulps(a: f32, b: f32) -> u32 {
        if a == b {
            return 0;
        }
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulps_of_libm_over_its_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x <= 88.0 {
            worst = worst.max(ulps(exp(x), x.exp()));
            x += 0.001_37;
        }
        assert!(worst <= 2, "worst {worst} ulps");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1.7e-38 && exp(-1000.0) >= 0.0);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn gelu_matches_the_tanh_form_to_float_precision() {
        // the reference: PyTorch's function in f64 (as x·sigmoid(2u): 1 + tanh(u) rounds to 0
        // in f64 too once u < −19), rounded to f32 at the end
        let reference = |x: f32| {
            let x = f64::from(x);
            let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            (x / (1.0 + (-2.0 * u).exp())) as f32
        };
        // the f32 tanh form (PyTorch's, mistral.rs's) is the bar: where 1 + tanh(u) cancels
        // (x < 0) it loses far more than an ulp of the result; ours must not be worse
        let tanh_form = |x: f32| {
            let u = SQRT_2_OVER_PI * (x + GELU_COEFF * x * x * x);
            0.5 * x * (1.0 + u.tanh())
        };
        let (mut worst_ours, mut worst_tanh) = (0f64, 0f64);
        let mut x = -30.0f32;
        while x <= 30.0 {
            let (ours, want) = (gelu_tanh(x), reference(x));
            // u's own f32 rounding moves e^(−2u) by ~|2u|·ε relative, whatever computes it
            let u = SQRT_2_OVER_PI * (x + GELU_COEFF * x * x * x);
            let tol = want.abs() * f32::EPSILON * (4.0 + 4.0 * u.abs()) + 1e-30;
            assert!((ours - want).abs() <= tol, "x={x}: {ours} vs {want}");
            let rel = |v: f32| f64::from((v - want).abs()) / f64::from(want.abs().max(1e-30));
            if want.abs() > 1e-6 {
                worst_ours = worst_ours.max(rel(ours));
                worst_tanh = worst_tanh.max(rel(tanh_form(x)));
            }
            x += 0.000_731;
        }
        assert!(
            worst_ours <= worst_tanh,
            "{worst_ours} vs the tanh form's {worst_tanh}"
        );
        for x in [-1e30f32, -200.0, -10.0, 0.0, 10.0, 200.0, 1e30] {
            let (ours, want) = (gelu_tanh(x), reference(x));
            assert!(
                (ours - want).abs() <= 1e-6 * want.abs().max(1.0),
                "x={x}: {ours} vs {want}"
            );
        }
        assert!(gelu_tanh(f32::NAN).is_nan());
    }

    #[test]
    fn the_glu_equals_candles_gelu_times_up_on_every_vector_width() {
        let dev = Device::Cpu;
        // odd length: the vector loops' tails run too; several chunks
        let gate = (Tensor::randn(0f32, 3f32, (3, 7, 1153), &dev).unwrap())
            .contiguous()
            .unwrap();
        let up = Tensor::randn(0f32, 1f32, (3, 7, 1153), &dev).unwrap();
        let ours = gelu_tanh_glu(&gate, &up).unwrap().expect("f32 on the CPU");
        let theirs = (gate.gelu().unwrap() * &up).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 2e-6);
        // the portable body and each wide one agree exactly (same operations, same order)
        let a: Vec<f32> = gate.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = up.flatten_all().unwrap().to_vec1().unwrap();
        for act in [Glu::GeluTanh, Glu::Silu] {
            let mut portable = vec![0f32; a.len()];
            glu_body(&a, &b, &mut portable, act);
            let mut dispatched = vec![0f32; a.len()];
            glu_chunk(&a, &b, &mut dispatched, act);
            assert_eq!(portable, dispatched, "{act:?}");
        }
    }

    #[test]
    fn the_silu_glu_equals_mistral_rs_formula_within_float_precision() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 4f32, (2, 5, 1537), &dev).unwrap();
        let up = Tensor::randn(0f32, 1f32, (2, 5, 1537), &dev).unwrap();
        let ours = silu_glu(&gate, &up).unwrap().expect("f32 on the CPU");
        // mistral.rs's CPU formula, x / (1 + e^(−x)) with libm's exp, times up
        let a: Vec<f32> = gate.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = up.flatten_all().unwrap().to_vec1().unwrap();
        let theirs: Vec<f32> = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| x / (1.0 + (-x).exp()) * y)
            .collect();
        let ours: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(o, t)| (o - t).abs() / t.abs().max(1e-3))
            .fold(0f32, f32::max);
        assert!(worst < 1e-6, "worst relative difference {worst}");
        // far out: no NaN, the limits
        assert!(silu(-200.0) <= 0.0 && silu(-200.0) > -1e-30);
        assert_eq!(silu(200.0), 200.0);
        assert!(silu(f32::NAN).is_nan());
        let half = Tensor::zeros((2, 3), DType::F16, &dev).unwrap();
        assert!(silu_glu(&half, &half).unwrap().is_none());
    }

    #[test]
    fn other_inputs_are_left_to_the_caller() {
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F16, &dev).unwrap();
        assert!(gelu_tanh_glu(&a, &a).unwrap().is_none());
        let b = Tensor::zeros((3, 2), DType::F32, &dev).unwrap();
        let c = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(gelu_tanh_glu(&b, &c).unwrap().is_none());
        // a strided (transposed) input is read through a contiguous copy
        let t = Tensor::randn(0f32, 1f32, (3, 2), &dev)
            .unwrap()
            .t()
            .unwrap();
        let ours = gelu_tanh_glu(&t, &c).unwrap().unwrap();
        let theirs = (t.gelu().unwrap() * &c).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
    }

    /// `x · wᵀ` in f64, the reference for [`linear`].
    fn reference_linear(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
        let n = w.len() / k;
        x.chunks(k)
            .flat_map(|row| {
                (0..n).map(move |j| {
                    row.iter()
                        .zip(&w[j * k..(j + 1) * k])
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum::<f64>()
                })
            })
            .collect()
    }

    #[test]
    fn linear_equals_the_matrix_product_at_every_shape() {
        let dev = Device::Cpu;
        // rows: one, fewer than a band, several bands with a tail; k and n off every width
        for (lead, k, n) in [
            (vec![1], 37, 45),
            (vec![3], 64, 33),
            (vec![2, 17], 37, 45),
            (vec![1, 130], 96, 70),
        ] {
            let mut xs = lead.clone();
            xs.push(k);
            let x = Tensor::randn(0f32, 1f32, xs, &dev).unwrap();
            let w = Tensor::randn(0f32, 1f32, (n, k), &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            // w as mistral.rs lays it out, and kept transposed as the GGUF loader keeps it
            let w_t = w.t().unwrap().contiguous().unwrap().t().unwrap();
            assert!(!w_t.is_contiguous());
            for w in [&w, &w_t] {
                let ours = linear(&x, w).unwrap().expect("f32 on the CPU");
                let mut want_dims = lead.clone();
                want_dims.push(n);
                assert_eq!(ours.dims(), want_dims.as_slice());
                let got: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
                let want = reference_linear(&xv, &wv, k);
                for (g, w) in got.iter().zip(&want) {
                    // an f32 dot product of k terms of size ~1: 1e-5·k is generous
                    assert!((f64::from(*g) - w).abs() <= 1e-5 * (k as f64), "{g} vs {w}");
                }
                // and candle's own product agrees to float rounding
                let theirs = x.broadcast_matmul(&w.t().unwrap()).unwrap();
                let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
                assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
            }
        }
    }

    #[test]
    fn linear_reads_a_strided_input_and_leaves_other_inputs_to_the_caller() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1f32, (5, 4), &dev).unwrap();
        // a transposed (strided) input is read through a contiguous copy
        let x = Tensor::randn(0f32, 1f32, (4, 3), &dev)
            .unwrap()
            .t()
            .unwrap();
        let ours = linear(&x, &w).unwrap().unwrap();
        let theirs = x.contiguous().unwrap().matmul(&w.t().unwrap()).unwrap();
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // over LINEAR_MAX_ROWS rows, in a batch: the row-major product, the same values
        let long = Tensor::randn(0f32, 1f32, (2, LINEAR_MAX_ROWS / 2 + 3, 4), &dev).unwrap();
        let ours = linear(&long, &w)
            .unwrap()
            .expect("a long input is taken too");
        let theirs = long.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let diff = (ours - theirs).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
        // wrong inner size, a weight that is not a matrix, half precision
        let x3 = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(linear(&x3, &w).unwrap().is_none());
        let w3 = Tensor::zeros((1, 5, 4), DType::F32, &dev).unwrap();
        assert!(linear(&x.contiguous().unwrap(), &w3).unwrap().is_none());
        let h = Tensor::zeros((3, 4), DType::F16, &dev).unwrap();
        assert!(linear(&h, &w).unwrap().is_none());
        let half_w = w.to_dtype(DType::F16).unwrap();
        assert!(linear(&x, &half_w).unwrap().is_none());
    }
}
