//! One layer of EmbeddingGemma-300M attention (3 query heads, 1 kv head, head_dim 256,
//! bidirectional sliding-window mask of 512) on random inputs, four ways: mistral.rs's CPU
//! kernel, our exact attention, a recording miss and a hit. Shared by the criterion bench
//! `attention` and by `attncache-eval`.

use attncache_plugin::kernels::exact_attention::{
    apply_probabilities, attention, normalize_mask, probabilities, AttentionParams,
};
use attncache_plugin::kernels::f16_maps::{to_f16, to_f32};
use candle_core::{Device, Result, Tensor};
use mistralrs_core::layers::Sdpa;
use mistralrs_core::SdpaParams;

const HEADS: usize = 3;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 256;
const WINDOW: usize = 512;

/// Inputs of one layer's attention at one length.
pub struct LayerCase {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor,
    mask4: Tensor,
    sdpa: SdpaParams,
    params: AttentionParams,
    stored: Tensor,
}

fn sliding_mask(l: usize) -> Result<Tensor> {
    let data: Vec<f32> = (0..l * l)
        .map(|x| {
            if (x / l).abs_diff(x % l) < WINDOW {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Tensor::from_vec(data, (l, l), &Device::Cpu)
}

impl LayerCase {
    /// Random q/k/v of `len` tokens, and the maps a hit would read (f16, as stored).
    pub fn new(len: usize) -> Result<Self> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1f32, (1, HEADS, len, HEAD_DIM), &dev)?;
        let k = Tensor::randn(0f32, 1f32, (1, KV_HEADS, len, HEAD_DIM), &dev)?;
        let v = Tensor::randn(0f32, 1f32, (1, KV_HEADS, len, HEAD_DIM), &dev)?;
        let mask = sliding_mask(len)?;
        let sdpa = SdpaParams {
            n_kv_groups: HEADS / KV_HEADS,
            softcap: None,
            softmax_scale: 1.0 / (HEAD_DIM as f32).sqrt(),
            sliding_window: Some(WINDOW),
            sinks: None,
        };
        let params = AttentionParams::from_sdpa(&sdpa);
        let mask4 = normalize_mask(&mask, 1, HEADS, len, len)
            .ok_or_else(|| candle_core::Error::Msg(format!("no {len}x{len} mask")))?;
        let stored = to_f16(&probabilities(&q, &k, Some(&mask4), &params)?.squeeze(0)?)?;
        Ok(Self {
            q,
            k,
            v,
            mask,
            mask4,
            sdpa,
            params,
            stored,
        })
    }

    /// mistral.rs's own CPU attention.
    pub fn stock(&self) -> Result<Tensor> {
        Sdpa.run_attention(
            &self.q,
            &self.k,
            &self.v,
            Some(&self.mask),
            None,
            &self.sdpa,
        )
    }

    /// Our exact attention (the cache's miss path without recording).
    pub fn exact(&self) -> Result<Tensor> {
        attention(&self.q, &self.k, &self.v, Some(&self.mask4), &self.params)
    }

    /// A recording miss: exact probabilities kept as f16 maps, then P·V.
    pub fn miss_record(&self) -> Result<(Tensor, Tensor)> {
        let p = probabilities(&self.q, &self.k, Some(&self.mask4), &self.params)?;
        let kept = to_f16(&p.squeeze(0)?)?;
        Ok((apply_probabilities(&p, &self.v)?, kept))
    }

    /// A hit: stored f16 maps decoded to f32, then P·V (the q/k projections a hit also
    /// skips are not part of this).
    pub fn hit(&self) -> Result<Tensor> {
        let p = to_f32(&self.stored)?.unsqueeze(0)?;
        apply_probabilities(&p, &self.v)
    }
}
