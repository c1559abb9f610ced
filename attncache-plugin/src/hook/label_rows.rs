//! A decoder's output head computed on the vocabulary rows a request asked for (patch 0011):
//! a classifier reads the logits of its label words only, so the other rows of the head
//! (49,152 × 576 f32 for SmolLM2, 151,936 × 896 for Qwen2.5-0.5B) need not be read.
//!
//! The server takes a [`LabelRowsTicket`] for each request that wants only some rows; when
//! every row of a batch holds one, the head's product is a dot product per asked row and the
//! other logits are `-inf` (so mistral.rs's sampler and the server's logits processor see a
//! distribution over the asked rows only). Any row without a ticket, or a quantized head,
//! keeps the whole product.

use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use dashmap::DashMap;
use mistralrs_core::HookRow;

use crate::kernels::f16_maps::with_values;

/// Request id → the vocabulary rows its logits are read at.
#[derive(Debug, Default)]
pub(crate) struct LabelRows {
    requests: DashMap<usize, Arc<[u32]>>,
}

impl LabelRows {
    /// The logits `[b, 1, vocab]` of `x` (`[b, 1, hidden]`) under `w` (`[vocab, hidden]`) at
    /// each row's asked ids, `-inf` elsewhere; `None` when a row holds no ticket, an asked id
    /// is beyond the vocabulary, or the shapes are not this path's.
    pub(crate) fn logits(
        &self,
        x: &Tensor,
        w: &Tensor,
        rows: &[HookRow],
    ) -> Result<Option<Tensor>> {
        let (b, one, hidden) = match x.dims3() {
            Ok(dims) => dims,
            Err(_) => return Ok(None),
        };
        let (vocab, w_hidden) = w.dims2()?;
        let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
        if one != 1 || w_hidden != hidden || rows.len() != b || !f32_cpu(x) || !f32_cpu(w) {
            return Ok(None);
        }
        let Some(asked) = rows
            .iter()
            .map(|r| self.requests.get(&r.request_id).map(|ids| ids.clone()))
            .collect::<Option<Vec<Arc<[u32]>>>>()
        else {
            return Ok(None);
        };
        if asked
            .iter()
            .flat_map(|ids| ids.iter())
            .any(|&id| id as usize >= vocab)
        {
            return Ok(None);
        }
        // the loaders keep the weight transposed (`[hidden, vocab]` contiguous): row `id` of
        // the head is column `id` there
        let wt = w.t()?;
        let out = with_values::<f32, _>(x, |xv| {
            with_values::<f32, _>(&wt, |wv| {
                let mut out = vec![f32::NEG_INFINITY; b * vocab];
                for (r, ids) in asked.iter().enumerate() {
                    let xr = &xv[r * hidden..(r + 1) * hidden];
                    for &id in ids.iter() {
                        let id = id as usize;
                        out[r * vocab + id] = xr
                            .iter()
                            .enumerate()
                            .map(|(h, &xh)| xh * wv[h * vocab + id])
                            .sum();
                    }
                }
                out
            })
        })?
        .transpose()?
        .flatten();
        match out {
            Some(out) => Ok(Some(Tensor::from_vec(out, (b, 1, vocab), &Device::Cpu)?)),
            None => Ok(None),
        }
    }
}

/// Request `request_id`'s logits are read at `ids` only, while the ticket lives.
#[derive(Debug)]
pub struct LabelRowsTicket {
    rows: Arc<LabelRows>,
    request_id: usize,
}

impl LabelRowsTicket {
    pub(crate) fn new(rows: Arc<LabelRows>, request_id: usize, ids: Arc<[u32]>) -> Self {
        rows.requests.insert(request_id, ids);
        Self { rows, request_id }
    }
}

impl Drop for LabelRowsTicket {
    fn drop(&mut self) {
        self.rows.requests.remove(&self.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(request_id: usize) -> HookRow {
        HookRow {
            seq_id: request_id,
            request_id,
            tokens: Vec::new(),
            is_prompt: true,
        }
    }

    #[test]
    fn asked_rows_equal_the_whole_product_and_the_rest_is_minus_infinity() {
        let dev = Device::Cpu;
        let (vocab, hidden) = (50, 8);
        // the head as the loaders keep it: `[hidden, vocab]` contiguous, seen as `[vocab, hidden]`
        let wt = Tensor::randn(0f32, 1.0, (hidden, vocab), &dev).unwrap();
        let w = wt.t().unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, hidden), &dev).unwrap();
        let full = x.broadcast_matmul(&wt).unwrap().to_vec3::<f32>().unwrap();
        let rows = Arc::new(LabelRows::default());
        // one request without a ticket: the whole product
        let _a = LabelRowsTicket::new(rows.clone(), 1, Arc::from([3u32, 7]));
        assert!(rows.logits(&x, &w, &[row(1), row(2)]).unwrap().is_none());
        let _b = LabelRowsTicket::new(rows.clone(), 2, Arc::from([0u32, 49]));
        let got = rows
            .logits(&x, &w, &[row(1), row(2)])
            .unwrap()
            .expect("label rows");
        let got = got.to_vec3::<f32>().unwrap();
        for (r, ids) in [(0, [3usize, 7]), (1, [0, 49])] {
            for id in 0..vocab {
                let (g, f) = (got[r][0][id], full[r][0][id]);
                if ids.contains(&id) {
                    assert!((g - f).abs() <= 1e-5, "row {r} id {id}: {g} vs {f}");
                } else {
                    assert_eq!(g, f32::NEG_INFINITY);
                }
            }
        }
        // an id beyond the vocabulary: the whole product
        let _c = LabelRowsTicket::new(rows.clone(), 3, Arc::from([50u32]));
        assert!(rows.logits(&x, &w, &[row(1), row(3)]).unwrap().is_none());
        // a dropped ticket takes its request out
        drop(_b);
        assert!(rows.logits(&x, &w, &[row(1), row(2)]).unwrap().is_none());
    }
}
