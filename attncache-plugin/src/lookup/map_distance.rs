//! How far apart two inputs' attention maps are (the projector's training target), and
//! the rank correlation its reports use.

use candle_core::{DType, Result};

use crate::storage::entry::Entry;

/// Mean total-variation distance between two same-shaped entries' maps: per query row
/// ½·Σ|a−b|, averaged over rows, heads and layers (0: identical, 1: disjoint).
pub fn map_distance(a: &Entry, b: &Entry) -> Result<f32> {
    map_distance_flat(&FlatMaps::of(a)?, &FlatMaps::of(b)?)
}

/// An entry's maps as one flat f16 vector (`[layer][head][row][col]`), for many distance
/// computations without tensor overhead.
#[derive(Debug, Clone)]
pub struct FlatMaps {
    values: Vec<half::f16>,
    rows: usize,
}

impl FlatMaps {
    /// Flattens `entry`'s maps.
    pub fn of(entry: &Entry) -> Result<Self> {
        let mut values = Vec::new();
        let mut rows = 0;
        for layer in entry.map_layers() {
            let (heads, l, _) = layer.dims3()?;
            rows += heads * l;
            values.extend(
                layer
                    .to_dtype(DType::F16)?
                    .flatten_all()?
                    .to_vec1::<half::f16>()?,
            );
        }
        Ok(Self { values, rows })
    }
}

/// [`map_distance`] of two flattened entries.
pub fn map_distance_flat(a: &FlatMaps, b: &FlatMaps) -> Result<f32> {
    if a.values.len() != b.values.len() || a.rows != b.rows || a.rows == 0 {
        candle_core::bail!("entries have different shapes");
    }
    let sum: f64 = a
        .values
        .chunks(4096)
        .zip(b.values.chunks(4096))
        .map(|(x, y)| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (p.to_f32() - q.to_f32()).abs())
                .sum::<f32>() as f64
        })
        .sum();
    Ok((sum / (2 * a.rows) as f64) as f32)
}

/// Spearman rank correlation (ties get their mean rank); NaN with fewer than 2 points.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < order.len() {
            let mut j = i;
            while j + 1 < order.len() && v[order[j + 1]] == v[order[i]] {
                j += 1;
            }
            for k in i..=j {
                r[order[k]] = (i + j) as f64 / 2.0;
            }
            i = j + 1;
        }
        r
    }
    if x.len() != y.len() || x.len() < 2 {
        return f64::NAN;
    }
    let (rx, ry) = (ranks(x), ranks(y));
    let n = x.len() as f64;
    let (mx, my) = (rx.iter().sum::<f64>() / n, ry.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in rx.iter().zip(&ry) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx).powi(2);
        syy += (b - my).powi(2);
    }
    sxy / (sxx * syy).sqrt()
}
