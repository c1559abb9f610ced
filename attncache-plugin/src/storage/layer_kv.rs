//! How a blend entry keeps one layer's K/V (`[2, kv_heads, L, head_dim]`, K then V): f16,
//! or int8 with one f32 scale per row of `head_dim` values (per layer, K or V, kv head and
//! token; symmetric, `x ≈ q · scale`, `|q| ≤ 127`). int8 halves the K/V bytes (EmbeddingGemma:
//! a blend entry goes from 30.7 to 18.6 KB per token); what it costs in fidelity is measured
//! by `make blend-eval` (docs/blend.md).

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use serde::{Deserialize, Serialize};

/// The encoding of a blend entry's K/V (`--blend-kv`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvFormat {
    /// 2 bytes a value.
    #[default]
    F16,
    /// 1 byte a value plus a 4-byte scale per `head_dim` values.
    Int8,
}

impl std::str::FromStr for KvFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "int8" => Ok(Self::Int8),
            other => Err(format!(
                "unknown K/V format {other:?}: expected f16 or int8"
            )),
        }
    }
}

impl std::fmt::Display for KvFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F16 => "f16",
            Self::Int8 => "int8",
        })
    }
}

/// One layer's K/V as a blend entry keeps it.
#[derive(Debug, Clone)]
pub enum LayerKv {
    /// f16 values on the CPU.
    F16(Tensor),
    /// int8 values with a scale per row.
    Int8(Int8Kv),
}

/// int8 K/V: `values[i] as f32 * scales[i / head_dim]`.
#[derive(Debug, Clone)]
pub struct Int8Kv {
    dims: [usize; 4],
    values: Arc<[i8]>,
    scales: Arc<[f32]>,
}

impl Int8Kv {
    /// Checks that `values` and `scales` fit `dims` (`[2, kv_heads, L, head_dim]`).
    pub fn new(dims: [usize; 4], values: Arc<[i8]>, scales: Arc<[f32]>) -> Result<Self> {
        let n: usize = dims.iter().product();
        if values.len() != n || dims[3] == 0 || scales.len() * dims[3] != n {
            candle_core::bail!(
                "int8 K/V of {} values and {} scales does not fit {dims:?}",
                values.len(),
                scales.len()
            );
        }
        Ok(Self {
            dims,
            values,
            scales,
        })
    }

    /// The quantised values, `[2][kv_heads][L][head_dim]`.
    pub fn values(&self) -> &[i8] {
        &self.values
    }

    /// One scale per row of `head_dim` values.
    pub fn scales(&self) -> &[f32] {
        &self.scales
    }
}

impl LayerKv {
    /// `kv` (`[2, kv_heads, L, head_dim]`, any float dtype) in `format`.
    pub fn encode(kv: &Tensor, format: KvFormat) -> Result<Self> {
        if kv.rank() != 4 {
            candle_core::bail!(
                "layer K/V {:?}, expected [2, kv_heads, L, head_dim]",
                kv.dims()
            );
        }
        match format {
            KvFormat::F16 => Ok(Self::F16(crate::kernels::f16_maps::to_f16(kv)?)),
            KvFormat::Int8 => {
                let dims = [kv.dim(0)?, kv.dim(1)?, kv.dim(2)?, kv.dim(3)?];
                let x = crate::kernels::f16_maps::to_f32(kv)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let (values, scales) = quantize(&x, dims[3]);
                Ok(Self::Int8(Int8Kv::new(dims, values.into(), scales.into())?))
            }
        }
    }

    /// Which encoding this is.
    pub fn format(&self) -> KvFormat {
        match self {
            Self::F16(_) => KvFormat::F16,
            Self::Int8(_) => KvFormat::Int8,
        }
    }

    /// `[2, kv_heads, L, head_dim]`.
    pub fn dims(&self) -> &[usize] {
        match self {
            Self::F16(t) => t.dims(),
            Self::Int8(q) => &q.dims,
        }
    }

    /// Bytes it occupies (and takes in an encoded entry).
    pub fn bytes(&self) -> usize {
        let n: usize = self.dims().iter().product();
        match self {
            Self::F16(_) => 2 * n,
            Self::Int8(q) => n + 4 * q.scales.len(),
        }
    }

    /// The values as an f32 tensor on the CPU.
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            Self::F16(t) => crate::kernels::f16_maps::to_f32(t),
            Self::Int8(q) => {
                let d = q.dims[3];
                let mut out = Vec::with_capacity(q.values.len());
                for (row, &scale) in q.values.chunks_exact(d).zip(q.scales.iter()) {
                    out.extend(row.iter().map(|&v| f32::from(v) * scale));
                }
                Tensor::from_vec(out, q.dims.as_slice(), &Device::Cpu)
            }
        }
    }
}

/// Symmetric int8 quantisation of `x` by rows of `d` values: `(values, scales)`.
fn quantize(x: &[f32], d: usize) -> (Vec<i8>, Vec<f32>) {
    let mut values = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len() / d.max(1));
    for row in x.chunks_exact(d) {
        let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = if amax > 0.0 && amax.is_finite() {
            amax / 127.0
        } else {
            1.0
        };
        values.extend(
            row.iter()
                .map(|&v| (v / scale).round().clamp(-127.0, 127.0) as i8),
        );
        scales.push(scale);
    }
    (values, scales)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(dims: [usize; 4]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (i as f32 * 0.731).sin() * (1.0 + (i / dims[3]) as f32))
            .collect();
        Tensor::from_vec(v, dims.as_slice(), &Device::Cpu).unwrap()
    }

    #[test]
    fn int8_keeps_every_value_within_half_a_step_of_its_row() {
        let dims = [2, 1, 7, 16];
        let x = kv(dims);
        let q = LayerKv::encode(&x, KvFormat::Int8).unwrap();
        assert_eq!(q.format(), KvFormat::Int8);
        assert_eq!(q.dims(), dims.as_slice());
        // a byte a value plus a 4-byte scale per row of 16
        assert_eq!(q.bytes(), 2 * 7 * 16 + 4 * 2 * 7);
        let back = q
            .to_f32()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let x = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (row, got) in x.chunks_exact(16).zip(back.chunks_exact(16)) {
            let step = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            for (a, b) in row.iter().zip(got) {
                assert!(
                    (a - b).abs() <= 0.5 * step + 1e-6,
                    "{a} vs {b} (step {step})"
                );
            }
        }
    }

    #[test]
    fn a_zero_row_stays_zero_and_f16_is_f16() {
        let x = Tensor::zeros((2, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let q = LayerKv::encode(&x, KvFormat::Int8).unwrap();
        let back = q
            .to_f32()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(back.iter().all(|&v| v == 0.0));
        let h = LayerKv::encode(&kv([2, 1, 3, 4]), KvFormat::F16).unwrap();
        assert!(matches!(&h, LayerKv::F16(t) if t.dtype() == DType::F16));
        assert_eq!(h.bytes(), 2 * 2 * 3 * 4);
        assert!(Int8Kv::new([2, 1, 3, 4], vec![0i8; 24].into(), vec![1f32; 5].into()).is_err());
        assert_eq!("int8".parse::<KvFormat>(), Ok(KvFormat::Int8));
        assert!("q4".parse::<KvFormat>().is_err());
    }
}
