//! The tensor work of a blend hit's layers after the check layer: S's fresh rows put into
//! the stored ones ([`put_rows`]), S's queries attending over the neighbour's K/V re-rotated
//! to the input's positions ([`stored_kv`], [`attend`], [`window_mask`]), and the final
//! states assembled ([`final_states`]).

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels::exact_attention::{self, AttentionParams};
use crate::storage::layer_kv::LayerKv;

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

/// The stored `[2, kv_heads, L_stored, d]` K/V (f16 or int8) of one layer, of one or several
/// stored inputs laid end to end along L, as two f32 tensors `[1, kv_heads, L, d]` at the
/// input's positions (`source[i]`: the stored position input position `i` takes; `None`:
/// itself).
pub fn stored_kv(kv: &[&LayerKv], source: Option<&[u32]>) -> Result<(Tensor, Tensor)> {
    let kv = match kv {
        [one] => one.to_f32()?,
        many => Tensor::cat(
            &many
                .iter()
                .map(|k| k.to_f32())
                .collect::<Result<Vec<Tensor>>>()?,
            2,
        )?,
    };
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

/// A test model's RoPE (head size 8, positions 0..64): rotate-half pairs (EmbeddingGemma's
/// layout) or, `interleaved`, neighbouring pairs (GGUF llama's).
#[cfg(test)]
pub(crate) fn rope_fn(interleaved: bool) -> impl Fn(&Tensor, &Tensor) -> Result<Tensor> {
    let d = 8usize;
    let inv: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for p in 0..64 {
        for f in &inv {
            cos.push((p as f32 * f).cos());
            sin.push((p as f32 * f).sin());
        }
    }
    let cos = Tensor::from_vec(cos, (64, d / 2), &Device::Cpu).expect("cos table");
    let sin = Tensor::from_vec(sin, (64, d / 2), &Device::Cpu).expect("sin table");
    move |x: &Tensor, p: &Tensor| {
        let (c, s) = (cos.index_select(p, 0)?, sin.index_select(p, 0)?);
        match interleaved {
            true => candle_nn::rotary_emb::rope_i(&x.contiguous()?, &c, &s),
            false => candle_nn::rotary_emb::rope(&x.contiguous()?, &c, &s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::layer_kv::KvFormat;

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
        let rope = rope_fn(false);
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
        let (k_stored, v_stored) = stored_kv(&[&kv], Some(&source)).unwrap();
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
}
