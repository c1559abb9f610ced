//! The feature vector of an input, computed before layer 0's attention from the layer's
//! input (the hidden states after `input_layernorm`, `[L, hidden]`).
//!
//! - [`FeatureKind::MeanPool`]: the untrained baseline, the mean over tokens at unit length;
//! - [`FeatureKind::SegmentPool`]: the projector's raw input (means of [`SEGMENTS`] token
//!   spans, concatenated), recorded by `attncache train-projector`;
//! - [`FeatureKind::Projector`]: a trained [`Projector`] over the segment means, whose
//!   distances predict attention-map distances.
//!
//! Whatever the feature, the distance threshold that turns a neighbour into a hit is
//! calibrated on measured fidelity (`attncache calibrate`), never guessed. Every feature
//! kind has an id stored with each entry: features of another kind (or another projector)
//! are never compared, so such entries serve exact token matches only.

use std::path::PathBuf;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;
use crate::lookup::projector::{segment_pool, Projector, SEGMENTS};

/// How features are computed (the setting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureKind {
    /// Mean of the layer-0 normed hidden states over tokens, unit length.
    #[default]
    MeanPool,
    /// Means of [`SEGMENTS`] consecutive token spans, concatenated (training input).
    SegmentPool,
    /// A trained projector, loaded from this directory (`attncache train-projector`).
    Projector(PathBuf),
}

/// A loaded feature computation.
#[derive(Debug, Clone)]
pub struct FeatureExtractor {
    kind: Loaded,
    id: u32,
}

#[derive(Debug, Clone)]
enum Loaded {
    MeanPool,
    SegmentPool,
    Projector(Box<Projector>),
}

impl FeatureExtractor {
    /// Loads `kind` for the model with `fingerprint` (a projector must have been trained for it).
    pub fn load(kind: &FeatureKind, fingerprint: u64) -> std::result::Result<Self, AttnCacheError> {
        Self::load_accepting(kind, fingerprint, None)
    }

    /// [`FeatureExtractor::load`], also accepting a projector stamped with the model's
    /// `legacy` fingerprint ([`crate::storage::stable_hash::Stamp::Legacy`]).
    pub fn load_accepting(
        kind: &FeatureKind,
        fingerprint: u64,
        legacy: Option<u64>,
    ) -> std::result::Result<Self, AttnCacheError> {
        Ok(match kind {
            FeatureKind::MeanPool => Self {
                kind: Loaded::MeanPool,
                id: crc32fast::hash(b"mean-pool"),
            },
            FeatureKind::SegmentPool => Self {
                kind: Loaded::SegmentPool,
                id: crc32fast::hash(format!("segment-pool:{SEGMENTS}").as_bytes()),
            },
            FeatureKind::Projector(dir) => {
                let p = Projector::load_accepting(dir, fingerprint, legacy)?;
                Self {
                    id: p.id(),
                    kind: Loaded::Projector(Box::new(p)),
                }
            }
        })
    }

    /// Identifies the feature computation; stored with every entry.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The trained projector, if the features come from one.
    pub fn projector(&self) -> Option<&Projector> {
        match &self.kind {
            Loaded::Projector(p) => Some(p),
            _ => None,
        }
    }

    /// Short description for logs and reports.
    pub fn describe(&self) -> String {
        match &self.kind {
            Loaded::MeanPool => "mean-pool (untrained)".into(),
            Loaded::SegmentPool => format!("segment-pool x{SEGMENTS} (untrained)"),
            Loaded::Projector(p) => format!(
                "projector {:08x} ({}→{}→{})",
                p.id(),
                p.config().segments * p.config().hidden,
                p.config().width,
                p.config().out_dim
            ),
        }
    }

    /// Features of every row of `xs` (`[b, L, hidden]`): `b` vectors.
    pub fn compute(&self, xs: &Tensor) -> Result<Vec<Vec<f32>>> {
        match &self.kind {
            Loaded::MeanPool => {
                // one span = the mean over tokens, as a matrix product (5x faster than a
                // strided mean over the token axis: `cargo bench --bench lookup`)
                let mean = segment_pool(xs, 1)?; // [b, hidden]
                let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
                mean.broadcast_div(&norm)?.to_vec2::<f32>()
            }
            Loaded::SegmentPool => segment_pool(xs, SEGMENTS)?.to_vec2::<f32>(),
            Loaded::Projector(p) => p.features(xs),
        }
    }
}
