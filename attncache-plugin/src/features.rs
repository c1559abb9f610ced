//! The feature vector of an input, computed before layer 0's attention from the layer's
//! input (the hidden states after `input_layernorm`, `[L, hidden]`).
//!
//! [`FeatureKind::MeanPool`] is the untrained baseline: the mean over tokens, scaled to unit
//! length. A learned projector (the AttnCache paper's Siamese MLP) is to come; its distances
//! then replace these. Whatever the feature, the distance threshold that turns a neighbour
//! into a hit is calibrated on measured fidelity (`attncache calibrate`), never guessed.

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// How features are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureKind {
    /// Mean of the layer-0 normed hidden states over tokens, unit length.
    #[default]
    MeanPool,
}

impl FeatureKind {
    /// Features of every row of `xs` (`[b, L, hidden]`): `b` vectors.
    pub fn compute(self, xs: &Tensor) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::MeanPool => {
                let mean = xs.to_dtype(DType::F32)?.mean(1)?; // [b, hidden]
                let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
                mean.broadcast_div(&norm)?.to_vec2::<f32>()
            }
        }
    }
}
