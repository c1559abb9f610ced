//! The fast exact path against mistral.rs's own CPU attention (`Sdpa::run_attention`, no hook
//! installed in this test binary), on random tensors: max |difference| must be ≤ 1e-5.

use attncache_plugin::kernels::exact_attention::{attention, normalize_mask, AttentionParams};
use candle_core::{Device, Result, Tensor};
use mistralrs_core::layers::Sdpa;
use mistralrs_core::SdpaParams;

const TOLERANCE: f32 = 1e-5;

/// Deterministic N(0,1)-ish values (xorshift + Box–Muller), so failures reproduce.
fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let data: Vec<f32> = (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
}

enum Mask {
    None,
    Bidirectional,
    Causal,
    Sliding(usize),
    CausalSliding(usize),
}

fn make_mask(kind: &Mask, l: usize) -> Result<Option<Tensor>> {
    let allowed = |i: usize, j: usize| match kind {
        Mask::None | Mask::Bidirectional => true,
        Mask::Causal => j <= i,
        Mask::Sliding(w) => i.abs_diff(j) < *w,
        Mask::CausalSliding(w) => j <= i && i - j < *w,
    };
    if matches!(kind, Mask::None) {
        return Ok(None);
    }
    let data: Vec<f32> = (0..l * l)
        .map(|x| {
            if allowed(x / l, x % l) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Ok(Some(Tensor::from_vec(data, (l, l), &Device::Cpu)?))
}

struct Case {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    len: usize,
    head_dim: usize,
    softcap: Option<f32>,
    mask: Mask,
}

fn max_abs_diff(case: Case, seed: u64) -> Result<f32> {
    let Case {
        batch,
        heads,
        kv_heads,
        len,
        head_dim,
        softcap,
        mask,
    } = case;
    let q = random(&[batch, heads, len, head_dim], seed)?;
    let k = random(&[batch, kv_heads, len, head_dim], seed + 1)?;
    let v = random(&[batch, kv_heads, len, head_dim], seed + 2)?;
    let mask = make_mask(&mask, len)?;
    let sdpa = SdpaParams {
        n_kv_groups: heads / kv_heads,
        softcap,
        softmax_scale: 1.0 / (head_dim as f32).sqrt(),
        sliding_window: None,
        sinks: None,
    };
    let stock = Sdpa.run_attention(&q, &k, &v, mask.as_ref(), None, &sdpa)?;
    let mask4 = mask
        .as_ref()
        .map(|m| normalize_mask(m, batch, heads, len, len).expect("2-D mask is supported"));
    let fast = attention(
        &q,
        &k,
        &v,
        mask4.as_ref(),
        &AttentionParams::from_sdpa(&sdpa),
    )?;
    assert_eq!(stock.dims(), fast.dims());
    let diff = (stock - fast)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(diff.is_finite(), "non-finite difference");
    Ok(diff)
}

fn check(case: Case, seed: u64) -> Result<()> {
    let label = format!(
        "b={} h={} kv={} L={} d={} softcap={:?}",
        case.batch, case.heads, case.kv_heads, case.len, case.head_dim, case.softcap
    );
    let diff = max_abs_diff(case, seed)?;
    assert!(
        diff <= TOLERANCE,
        "{label}: max |fast - stock| = {diff:e} > {TOLERANCE:e}"
    );
    Ok(())
}

#[test]
fn bidirectional_matches_stock() -> Result<()> {
    let case = Case {
        batch: 2,
        heads: 4,
        kv_heads: 4,
        len: 96,
        head_dim: 64,
        softcap: None,
        mask: Mask::Bidirectional,
    };
    check(case, 1)
}

#[test]
fn no_mask_matches_stock() -> Result<()> {
    let case = Case {
        batch: 1,
        heads: 2,
        kv_heads: 2,
        len: 33,
        head_dim: 32,
        softcap: None,
        mask: Mask::None,
    };
    check(case, 2)
}

#[test]
fn causal_matches_stock() -> Result<()> {
    let case = Case {
        batch: 2,
        heads: 4,
        kv_heads: 4,
        len: 130,
        head_dim: 64,
        softcap: None,
        mask: Mask::Causal,
    };
    check(case, 3)
}

#[test]
fn gqa_matches_stock() -> Result<()> {
    // EmbeddingGemma's shape: 3 query heads share 1 kv head, head_dim 256.
    let case = Case {
        batch: 1,
        heads: 3,
        kv_heads: 1,
        len: 150,
        head_dim: 256,
        softcap: None,
        mask: Mask::Bidirectional,
    };
    check(case, 4)?;
    let case = Case {
        batch: 2,
        heads: 8,
        kv_heads: 2,
        len: 70,
        head_dim: 64,
        softcap: None,
        mask: Mask::Causal,
    };
    check(case, 5)
}

#[test]
fn softcap_matches_stock() -> Result<()> {
    let case = Case {
        batch: 1,
        heads: 4,
        kv_heads: 2,
        len: 80,
        head_dim: 64,
        softcap: Some(5.0),
        mask: Mask::Causal,
    };
    check(case, 6)
}

#[test]
fn sliding_window_matches_stock() -> Result<()> {
    let case = Case {
        batch: 1,
        heads: 3,
        kv_heads: 1,
        len: 200,
        head_dim: 64,
        softcap: None,
        mask: Mask::Sliding(48),
    };
    check(case, 7)?;
    let case = Case {
        batch: 1,
        heads: 4,
        kv_heads: 2,
        len: 120,
        head_dim: 64,
        softcap: None,
        mask: Mask::CausalSliding(32),
    };
    check(case, 8)
}

#[test]
fn long_input_is_chunked_and_matches_stock() -> Result<()> {
    // Longer than QUERY_CHUNK, so several query blocks are computed and joined.
    let case = Case {
        batch: 1,
        heads: 3,
        kv_heads: 1,
        len: 1100,
        head_dim: 64,
        softcap: None,
        mask: Mask::Sliding(512),
    };
    check(case, 9)
}

#[test]
fn banded_blocks_match_stock_at_the_reference_window() -> Result<()> {
    // EmbeddingGemma's corrected window (512 / 2 + 1) on an input long enough that each
    // block of BAND_QUERY_CHUNK rows multiplies against only the keys it can see.
    let case = Case {
        batch: 1,
        heads: 3,
        kv_heads: 1,
        len: 1300,
        head_dim: 64,
        softcap: None,
        mask: Mask::Sliding(257),
    };
    check(case, 10)?;
    // a causal mask: each block's band ends at its last row
    let case = Case {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        len: 700,
        head_dim: 32,
        softcap: Some(30.0),
        mask: Mask::CausalSliding(100),
    };
    check(case, 11)
}

#[test]
fn visible_keys_is_the_band_of_a_block() -> Result<()> {
    use attncache_plugin::kernels::exact_attention::visible_keys;
    let full = make_mask(&Mask::Sliding(257), 1300)?.expect("mask");
    let full = normalize_mask(&full, 1, 3, 1300, 1300).expect("2-D mask");
    // rows 512..768 see keys 512-256 ..= 767+256
    assert_eq!(visible_keys(&full.narrow(2, 512, 256)?)?, Some((256, 1024)));
    assert_eq!(visible_keys(&full.narrow(2, 0, 256)?)?, Some((0, 512)));
    assert_eq!(
        visible_keys(&full.narrow(2, 1280, 20)?)?,
        Some((1024, 1300))
    );
    // nothing visible: no band (the caller keeps every key)
    let none = Tensor::full(f32::NEG_INFINITY, (1, 1, 4, 8), &Device::Cpu)?;
    assert_eq!(visible_keys(&none)?, None);
    Ok(())
}

#[test]
fn a_wrong_output_is_detected() -> Result<()> {
    // The comparison itself must be able to fail: a scale that differs from stock's is caught.
    let (b, h, l, d) = (1, 2, 40, 32);
    let q = random(&[b, h, l, d], 10)?;
    let k = random(&[b, h, l, d], 11)?;
    let v = random(&[b, h, l, d], 12)?;
    let sdpa = SdpaParams {
        n_kv_groups: 1,
        softcap: None,
        softmax_scale: 0.2,
        sliding_window: None,
        sinks: None,
    };
    let stock = Sdpa.run_attention(&q, &k, &v, None, None, &sdpa)?;
    let mut params = AttentionParams::from_sdpa(&sdpa);
    params.softmax_scale = 0.21;
    let fast = attention(&q, &k, &v, None, &params)?;
    let diff = (stock - fast)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(
        diff > TOLERANCE,
        "a 5% scale error went unnoticed: {diff:e}"
    );
    Ok(())
}

#[test]
fn unsupported_mask_shapes_are_declined() -> Result<()> {
    let m = Tensor::zeros((5, 7), candle_core::DType::F32, &Device::Cpu)?;
    assert!(normalize_mask(&m, 1, 2, 5, 6).is_none());
    let m = Tensor::zeros((3, 5, 5), candle_core::DType::F32, &Device::Cpu)?;
    assert!(normalize_mask(&m, 2, 4, 5, 5).is_none());
    let m = Tensor::zeros((2, 5, 5), candle_core::DType::F32, &Device::Cpu)?;
    assert_eq!(
        normalize_mask(&m, 2, 4, 5, 5).map(|t| t.dims().to_vec()),
        Some(vec![2, 1, 5, 5])
    );
    Ok(())
}

#[test]
fn fused_softmax_is_within_ulps_of_scale_mask_softmax() -> Result<()> {
    use attncache_plugin::kernels::exact_attention::fused_softmax;
    let (b, heads, l) = (2, 3, 70);
    let scores = random(&[b, heads, l, l], 21)?;
    let scale = 0.0625f32;
    let cases: Vec<Option<Tensor>> = vec![
        None,
        make_mask(&Mask::Sliding(17), l)?.map(|m| normalize_mask(&m, b, heads, l, l).unwrap()),
        // a mask per batch row and head, not broadcast
        Some(random(&[b, heads, l, l], 22)?),
        // one mask row broadcast over every query
        Some(random(&[1, 1, 1, l], 23)?),
    ];
    for mask in cases {
        let fused = fused_softmax(&scores, scale, mask.as_ref())?.expect("f32 CPU inputs");
        let mut unfused = (&scores * f64::from(scale))?;
        if let Some(m) = &mask {
            unfused = unfused.broadcast_add(m)?;
        }
        let unfused = candle_nn::ops::softmax_last_dim(&unfused)?;
        let (fused, unfused) = (
            fused.flatten_all()?.to_vec1::<f32>()?,
            unfused.flatten_all()?.to_vec1::<f32>()?,
        );
        let dims = mask.as_ref().map(|m| m.dims().to_vec());
        for (i, (&f, &u)) in fused.iter().zip(&unfused).enumerate() {
            // a few ulps of a probability; a masked key is exactly 0 on both paths
            assert!(
                (f - u).abs() <= 8.0 * f32::EPSILON * u.max(1e-30) + 1e-37,
                "mask {dims:?}, value {i}: fused {f} vs unfused {u}"
            );
            assert_eq!(f == 0.0, u == 0.0, "mask {dims:?}, value {i}: {f} vs {u}");
        }
    }
    // other dtypes are left to the unfused path
    let half = scores.to_dtype(candle_core::DType::F16)?;
    assert!(fused_softmax(&half, scale, None)?.is_none());
    Ok(())
}
