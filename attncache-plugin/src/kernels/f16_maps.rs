//! f32 ↔ f16 conversion of attention maps with the CPU's F16C instructions, through `half`'s
//! slice conversions. candle's `to_dtype` converts element by element: measured on one
//! EmbeddingGemma layer at 256 tokens it made a recording miss 0.5 ms slower than exact
//! attention and was half of a hit's time (`cargo bench --workspace --bench attention`).

use candle_core::{DType, Result, Storage, Tensor, WithDType};
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Runs `f` on the contiguous CPU values of `t` (of type `T`), or returns `None` when the
/// tensor is not a CPU tensor of that type.
pub(crate) fn with_values<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<Option<R>> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) else {
        return Ok(None);
    };
    match cpu.as_slice::<T>() {
        Ok(values) => Ok(values.get(start..end).map(f)),
        Err(_) => Ok(None),
    }
}

/// `t` as f16 (any other dtype or device falls back to candle's conversion).
pub fn to_f16(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        if let Some(v) = with_values::<f32, _>(t, |src| {
            let mut dst = vec![f16::ZERO; src.len()];
            dst.convert_from_f32_slice(src);
            dst
        })? {
            return Tensor::from_vec(v, t.dims(), t.device());
        }
    }
    t.to_dtype(DType::F16)
}

/// `t` as f32 (any other dtype or device falls back to candle's conversion).
pub fn to_f32(t: &Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F16 {
        if let Some(v) = with_values::<f16, _>(t, |src| {
            let mut dst = vec![0f32; src.len()];
            src.convert_to_f32_slice(&mut dst);
            dst
        })? {
            return Tensor::from_vec(v, t.dims(), t.device());
        }
    }
    t.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn conversions_match_candles_bit_for_bit() {
        let t = Tensor::rand(0f32, 1f32, (3, 17, 17), &Device::Cpu).unwrap();
        let ours = to_f16(&t).unwrap();
        let theirs = t.to_dtype(DType::F16).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        let bits = |x: &Tensor| -> Vec<u16> {
            x.flatten_all()
                .unwrap()
                .to_vec1::<f16>()
                .unwrap()
                .iter()
                .map(|h| h.to_bits())
                .collect()
        };
        assert_eq!(bits(&ours), bits(&theirs));
        let back = to_f32(&ours).unwrap();
        let back_theirs = theirs.to_dtype(DType::F32).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            back_theirs.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn views_and_other_dtypes_convert_too() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        // a non-contiguous view
        let v = t.transpose(1, 2).unwrap().narrow(0, 1, 1).unwrap();
        let got = to_f32(&to_f16(&v).unwrap()).unwrap();
        assert_eq!(
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            v.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let d = Tensor::new(&[1f64, 2.0], &Device::Cpu).unwrap();
        assert_eq!(to_f16(&d).unwrap().dtype(), DType::F16);
        assert_eq!(to_f32(&d).unwrap().dtype(), DType::F32);
    }
}
