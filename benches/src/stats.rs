//! Summary statistics of measured samples.

/// Mean (NaN for no samples).
pub fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.iter().sum::<f64>() / v.len() as f64
}

/// The `q`-quantile (0 ≤ q ≤ 1) by the nearest-rank method (NaN for no samples).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * s.len() as f64).ceil() as usize;
    s[rank.saturating_sub(1).min(s.len() - 1)]
}

/// Smallest value (NaN for no samples).
pub fn min(v: &[f64]) -> f64 {
    v.iter().copied().reduce(f64::min).unwrap_or(f64::NAN)
}

/// Mean, p50 and p99 of latencies.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Latency {
    /// Mean, ms.
    pub mean_ms: f64,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Requests per second, one client (inputs / total time).
    pub per_s: f64,
}

impl Latency {
    /// Summary of request times in ms.
    pub fn of(ms: &[f64]) -> Self {
        Self {
            mean_ms: mean(ms),
            p50_ms: quantile(ms, 0.5),
            p99_ms: quantile(ms, 0.99),
            per_s: ms.len() as f64 / (ms.iter().sum::<f64>() / 1e3),
        }
    }
}

/// Mean, 1st percentile and minimum of cosines.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Fidelity {
    /// Mean cosine.
    pub mean: f64,
    /// 1st percentile.
    pub p1: f64,
    /// Smallest.
    pub min: f64,
}

impl Fidelity {
    /// Summary of cosines.
    pub fn of(cos: &[f64]) -> Self {
        Self {
            mean: mean(cos),
            p1: quantile(cos, 0.01),
            min: min(cos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 0.01), 1.0);
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
        assert_eq!(min(&[2.0, -1.0]), -1.0);
    }

    #[test]
    fn latency_throughput_is_inputs_over_total_time() {
        let l = Latency::of(&[100.0, 300.0]);
        assert_eq!(l.per_s, 5.0);
        assert_eq!(l.mean_ms, 200.0);
    }
}
