//! The tiers' costs measured on this machine, for one entry of the served model's shape:
//! a hot hit (maps in RAM: f16 → f32 and P·V for every layer), a cold hit (the same after
//! mapping, checking and decoding the entry file) and a miss (softmax(QKᵀ)·V for every
//! layer, plus converting the maps to f16 to record them). [`crate::tiering::sizing`] turns
//! them into a predicted slowdown. Measured once per shape and cached in a small JSON file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;
use crate::kernels::exact_attention::{apply_probabilities, probabilities, AttentionParams};
use crate::storage::cold_tier::ColdTier;
use crate::storage::entry::{self, AttentionMaps, Entry, Payload};
use crate::tiering::sizing::CostModel;

/// The shape of one stored input: the model's attention and an input length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryShape {
    /// Attention layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Tokens of the input.
    pub tokens: usize,
}

impl EntryShape {
    /// Bytes of the entry's maps (f16).
    pub fn map_bytes(&self) -> u64 {
        (self.layers * self.heads * self.tokens * self.tokens * 2) as u64
    }
}

/// A measurement: the shape, the costs, and how many repetitions each median took.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeasuredCosts {
    /// What was measured.
    pub shape: EntryShape,
    /// Median time of a hot hit.
    pub hot_hit_ns: f64,
    /// Median time of a cold hit.
    pub cold_hit_ns: f64,
    /// Median time of a miss.
    pub miss_ns: f64,
    /// Repetitions per median.
    pub repetitions: usize,
}

impl MeasuredCosts {
    /// The cost model these times give.
    pub fn cost_model(&self) -> CostModel {
        CostModel {
            hot_hit_ns: self.hot_hit_ns,
            cold_hit_ns: self.cold_hit_ns,
            miss_ns: self.miss_ns,
            request_ns: 0.0,
        }
    }
}

fn median_ns(
    reps: usize,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> Result<f64, AttnCacheError> {
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let started = Instant::now();
        f().map_err(AttnCacheError::from)?;
        times.push(started.elapsed().as_nanos() as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Where [`measure`] times a cold hit.
#[derive(Clone, Copy)]
pub enum ColdSource<'a> {
    /// Entry files in this directory (the disk tier's, or a scratch directory).
    Dir(&'a Path),
    /// The cold tier the store uses (a shared Redis tier reads over the network).
    Tier(&'a dyn ColdTier),
}

/// Measures the three costs for `shape`; the cold hit reads one probe entry back from
/// `cold` (removed after).
pub fn measure(
    shape: &EntryShape,
    cold: ColdSource<'_>,
    reps: usize,
) -> Result<MeasuredCosts, AttnCacheError> {
    let reps = reps.max(1);
    let dev = Device::Cpu;
    let (h, kvh, d, l) = (
        shape.heads,
        shape.kv_heads.max(1),
        shape.head_dim,
        shape.tokens,
    );
    if h == 0 || d == 0 || l == 0 || shape.layers == 0 || h % kvh != 0 {
        return Err(AttnCacheError::InvalidSetting {
            name: "entry shape",
            value: format!("{shape:?}"),
            expected: "non-zero sizes, query heads a multiple of kv heads",
        });
    }
    let q = Tensor::randn(0f32, 1.0, (1, h, l, d), &dev)?;
    let k = Tensor::randn(0f32, 1.0, (1, kvh, l, d), &dev)?;
    let v = Tensor::randn(0f32, 1.0, (1, kvh, l, d), &dev)?;
    let params = AttentionParams {
        softmax_scale: 1.0 / (d as f32).sqrt(),
        softcap: None,
        n_kv_groups: h / kvh,
    };
    let mut maps = Vec::new();
    let miss_ns = median_ns(reps, || {
        maps.clear();
        for _ in 0..shape.layers {
            let probs = probabilities(&q, &k, None, &params)?;
            apply_probabilities(&probs, &v)?;
            maps.push(crate::kernels::f16_maps::to_f16(&probs.squeeze(0)?)?);
        }
        Ok(())
    })?;
    let hit = |e: &Entry| -> candle_core::Result<()> {
        for m in e.map_layers() {
            let probs = crate::kernels::f16_maps::to_f32(m)?.unsqueeze(0)?;
            apply_probabilities(&probs, &v)?;
        }
        Ok(())
    };
    let probe = Entry {
        tokens: (0..l as u32).collect::<Vec<_>>().into(),
        feature: Vec::new().into(),
        feature_id: 0,
        payload: Payload::Maps(AttentionMaps {
            heads: h,
            layers: maps,
        }),
    };
    let hot_hit_ns = median_ns(reps, || hit(&probe))?;
    let bytes = entry::encode(&probe, 0)?;
    let mut use_read = |b: &[u8]| -> Result<(), String> {
        let e = entry::decode(b, 0).map_err(|e| e.to_string())?;
        hit(&e).map_err(|e| e.to_string())
    };
    let mut times = match cold {
        ColdSource::Dir(dir) => {
            crate::storage::disk_tier::time_file_reads(dir, &bytes, reps, &mut use_read)
        }
        ColdSource::Tier(tier) => tier.time_reads(&bytes, reps, &mut use_read),
    }
    .map_err(|why| AttnCacheError::Io {
        what: "timing the cold tier's reads",
        source: std::io::Error::other(why),
    })?;
    times.sort_by(f64::total_cmp);
    let cold_hit_ns = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(MeasuredCosts {
        shape: *shape,
        hot_hit_ns,
        cold_hit_ns,
        miss_ns,
        repetitions: reps,
    })
}

/// Where [`measure_cached`] keeps measurements: `dir/tier-costs.json`.
pub fn cache_file(dir: &Path) -> PathBuf {
    dir.join("tier-costs.json")
}

/// The measurement for `shape` from `dir/tier-costs.json` when it has one, else measured
/// now (and added to the file). A damaged file is measured over, with a warning.
pub fn measure_cached(
    shape: &EntryShape,
    dir: &Path,
    reps: usize,
) -> Result<MeasuredCosts, AttnCacheError> {
    let file = cache_file(dir);
    let mut known: Vec<MeasuredCosts> = match std::fs::read_to_string(&file) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!(path = %file.display(), "ignoring unreadable tier costs: {e}");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    if let Some(m) = known
        .iter()
        .find(|m| m.shape == *shape && m.repetitions >= reps)
    {
        return Ok(*m);
    }
    let measured = measure(shape, ColdSource::Dir(dir), reps)?;
    known.retain(|m| m.shape != *shape);
    known.push(measured);
    let text =
        serde_json::to_string_pretty(&known).map_err(|e| AttnCacheError::InvalidSetting {
            name: "tier costs",
            value: e.to_string(),
            expected: "serialisable measurements",
        })?;
    if let Err(e) = std::fs::write(&file, text) {
        tracing::warn!(path = %file.display(), "cannot keep the tier costs: {e}");
    }
    Ok(measured)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_are_measured_ordered_and_cached() {
        let dir = tempfile::tempdir().unwrap();
        let shape = EntryShape {
            layers: 4,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            tokens: 96,
        };
        let m = measure_cached(&shape, dir.path(), 5).unwrap();
        assert!(
            m.hot_hit_ns > 0.0 && m.cold_hit_ns > 0.0 && m.miss_ns > 0.0,
            "{m:?}"
        );
        assert_eq!(shape.map_bytes(), 4 * 4 * 96 * 96 * 2);
        // the second call reads the file instead of measuring again
        let again = measure_cached(&shape, dir.path(), 5).unwrap();
        assert_eq!(m, again);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("tier-costs.json")]);
        // a damaged file is measured over
        std::fs::write(cache_file(dir.path()), "{not json").unwrap();
        assert!(measure_cached(&shape, dir.path(), 3).is_ok());
    }
}
