//! [`ErrorGate`]: decides a near hit by the *predicted error* of reusing a neighbour's maps,
//! calibrated on measured pairs, with the target error as the only knob.
//!
//! The error of a reuse is `1 − cosine(embedding with the neighbour's maps, exact
//! embedding)`. It is predicted from what a lookup knows without running the model:
//!
//! - the share of positions whose token differs from the neighbour's (near-duplicates
//!   differ in a few; merely similar sentences in almost all),
//! - the feature distance to the neighbour,
//! - the token count.
//!
//! The model is a least-squares fit of `ln(error)` on `[1, ln(differing share + 1/2L),
//! distance, ln L]` over calibration pairs, plus a margin: the `quantile`-th residual of the
//! fit, so the prediction is an upper bound for that share of calibration pairs. A
//! neighbour is used when the bound is at most [`ErrorGate::max_loss`]. The fit depends on
//! what a hit reuses ([`crate::reuse::maps::ReusePolicy`]), so a gate is calibrated per policy.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;

/// Predictors the gate uses.
pub const PREDICTORS: usize = 4;
/// Errors below this are treated as this (f16 maps of an identical input are about 1e-7).
const LOSS_FLOOR: f64 = 1e-6;
/// Ridge term of the least-squares fit (keeps it solvable when a predictor is constant).
const RIDGE: f64 = 1e-6;

/// One measured reuse: what the lookup knew, and the error it caused.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GatePoint {
    /// Feature distance to the neighbour.
    pub distance: f32,
    /// Positions whose token differs from the neighbour's.
    pub differing: usize,
    /// Token count of the input.
    pub tokens: usize,
    /// Measured `1 − cosine` to the exact embedding.
    pub loss: f64,
}

/// A calibrated predicted-error gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorGate {
    /// Fitted coefficients of `[1, ln(share + 1/2L), distance, ln L]` for `ln(error)`.
    pub coefficients: [f64; PREDICTORS],
    /// Added to the fitted `ln(error)`: the residual quantile that makes it an upper bound.
    pub margin: f64,
    /// The residual quantile the margin was taken at.
    pub quantile: f64,
    /// The target: largest predicted `1 − cosine` a near hit may have.
    pub max_loss: f64,
    /// Calibration pairs the fit used.
    pub points: usize,
    /// The reuse policy the pairs were measured under ([`crate::ReusePolicy::describe`]).
    pub policy: String,
    /// That policy itself, when recorded: a server given this gate reuses the way it was
    /// calibrated unless its flags say otherwise.
    #[serde(default)]
    pub reuse: Option<crate::reuse::maps::ReusePolicy>,
}

fn predictors(distance: f32, differing: usize, tokens: usize) -> [f64; PREDICTORS] {
    let len = tokens.max(1) as f64;
    let share = differing as f64 / len;
    [1.0, (share + 0.5 / len).ln(), f64::from(distance), len.ln()]
}

impl ErrorGate {
    /// Fits a gate on measured pairs; `None` with fewer than 8 usable pairs.
    pub fn fit(points: &[GatePoint], max_loss: f64, quantile: f64, policy: &str) -> Option<Self> {
        let usable: Vec<&GatePoint> = points
            .iter()
            .filter(|p| p.loss.is_finite() && p.distance.is_finite() && p.tokens > 0)
            .collect();
        if usable.len() < 8 {
            return None;
        }
        // normal equations (XᵀX + ridge·I) β = Xᵀy
        let mut xtx = [[0.0f64; PREDICTORS]; PREDICTORS];
        let mut xty = [0.0f64; PREDICTORS];
        for p in &usable {
            let x = predictors(p.distance, p.differing, p.tokens);
            let y = p.loss.max(LOSS_FLOOR).ln();
            for i in 0..PREDICTORS {
                xty[i] += x[i] * y;
                for j in 0..PREDICTORS {
                    xtx[i][j] += x[i] * x[j];
                }
            }
        }
        for (i, row) in xtx.iter_mut().enumerate() {
            row[i] += RIDGE * usable.len() as f64;
        }
        let coefficients = solve(xtx, xty)?;
        let mut residuals: Vec<f64> = usable
            .iter()
            .map(|p| {
                let x = predictors(p.distance, p.differing, p.tokens);
                p.loss.max(LOSS_FLOOR).ln() - dot(&coefficients, &x)
            })
            .collect();
        residuals.sort_by(f64::total_cmp);
        let q = quantile.clamp(0.0, 1.0);
        let margin = residuals[((residuals.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            coefficients,
            margin,
            quantile: q,
            max_loss,
            points: usable.len(),
            policy: policy.to_string(),
            reuse: None,
        })
    }

    /// A gate that accepts every neighbour (predicted error 1, no target): for measuring
    /// what reusing the best-ranked neighbour costs, before a gate is calibrated.
    pub fn accept_all(policy: &str) -> Self {
        Self {
            coefficients: [0.0; PREDICTORS],
            margin: 0.0,
            quantile: 1.0,
            max_loss: f64::INFINITY,
            points: 0,
            policy: policy.to_string(),
            reuse: None,
        }
    }

    /// The fitted `ln(error)` without the margin (for rank correlations).
    pub fn score(&self, distance: f32, differing: usize, tokens: usize) -> f64 {
        dot(&self.coefficients, &predictors(distance, differing, tokens))
    }

    /// The predicted upper bound on `1 − cosine` of reusing this neighbour.
    pub fn predict(&self, distance: f32, differing: usize, tokens: usize) -> f64 {
        (self.score(distance, differing, tokens) + self.margin).exp()
    }

    /// Whether the neighbour may be used: predicted error within the target.
    pub fn accepts(&self, distance: f32, differing: usize, tokens: usize) -> bool {
        self.predict(distance, differing, tokens) <= self.max_loss
    }

    /// The same gate with another target.
    pub fn with_max_loss(&self, max_loss: f64) -> Self {
        Self {
            max_loss,
            ..self.clone()
        }
    }

    /// Reads a gate written by [`ErrorGate::save`].
    pub fn load(path: &Path) -> Result<Self, AttnCacheError> {
        let text = std::fs::read_to_string(path).map_err(|e| AttnCacheError::Io {
            what: "reading the error gate",
            source: e,
        })?;
        let gate: Self =
            serde_json::from_str(&text).map_err(|e| AttnCacheError::InvalidSetting {
                name: "error_gate",
                value: format!("{}: {e}", path.display()),
                expected: "a JSON file written by attncache-eval or attncache calibrate",
            })?;
        gate.validate()?;
        Ok(gate)
    }

    /// Writes the gate as JSON.
    pub fn save(&self, path: &Path) -> Result<(), AttnCacheError> {
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        std::fs::write(path, text).map_err(|e| AttnCacheError::Io {
            what: "writing the error gate",
            source: e,
        })
    }

    /// Rejects gates whose numbers cannot be used.
    pub fn validate(&self) -> Result<(), AttnCacheError> {
        let finite = self.coefficients.iter().all(|c| c.is_finite()) && self.margin.is_finite();
        if !finite {
            return Err(AttnCacheError::InvalidSetting {
                name: "error_gate",
                value: format!("{:?} + {}", self.coefficients, self.margin),
                expected: "finite coefficients",
            });
        }
        if self.max_loss.is_nan() || self.max_loss < 0.0 {
            return Err(AttnCacheError::InvalidSetting {
                name: "max_error",
                value: self.max_loss.to_string(),
                expected: "an error (1 - cosine) of 0 or more",
            });
        }
        Ok(())
    }
}

fn dot(a: &[f64; PREDICTORS], b: &[f64; PREDICTORS]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Gaussian elimination with partial pivoting; `None` for a singular system.
fn solve(
    mut a: [[f64; PREDICTORS]; PREDICTORS],
    mut b: [f64; PREDICTORS],
) -> Option<[f64; PREDICTORS]> {
    for col in 0..PREDICTORS {
        let pivot =
            (col..PREDICTORS).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for row in col + 1..PREDICTORS {
            let f = a[row][col] / pivot_row[col];
            for (x, p) in a[row][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = [0.0; PREDICTORS];
    for row in (0..PREDICTORS).rev() {
        let s: f64 = (row + 1..PREDICTORS).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// Spearman rank correlation (the projector's, re-exported for the gate's reports).
pub use crate::lookup::projector::spearman;

#[cfg(test)]
mod tests {
    use super::*;

    /// Pairs whose error grows with the differing share, with noise.
    fn synthetic(n: usize, seed: u64) -> Vec<GatePoint> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f64 / (1u64 << 31) as f64
        };
        (0..n)
            .map(|_| {
                let tokens = 20 + (next() * 40.0) as usize;
                let differing = 1 + (next() * tokens as f64) as usize;
                let share = differing as f64 / tokens as f64;
                let noise = (next() - 0.5) * 0.4;
                GatePoint {
                    distance: (share * 0.3) as f32,
                    differing,
                    tokens,
                    loss: (0.2 * share).powf(1.5) * noise.exp(),
                }
            })
            .collect()
    }

    #[test]
    fn the_fit_predicts_held_out_errors_and_bounds_most_of_them() {
        let train = synthetic(200, 1);
        let test = synthetic(200, 2);
        let gate = ErrorGate::fit(&train, 0.01, 0.9, "all").expect("enough points");
        let pred: Vec<f64> = test
            .iter()
            .map(|p| gate.score(p.distance, p.differing, p.tokens))
            .collect();
        let real: Vec<f64> = test.iter().map(|p| p.loss).collect();
        assert!(spearman(&pred, &real) > 0.9, "{}", spearman(&pred, &real));
        let bounded = test
            .iter()
            .filter(|p| gate.predict(p.distance, p.differing, p.tokens) >= p.loss)
            .count();
        assert!(
            bounded >= 160,
            "upper bound for {bounded} of 200 held-out pairs"
        );
        // the knob: a stricter target accepts fewer
        let accepted = |g: &ErrorGate| {
            test.iter()
                .filter(|p| g.accepts(p.distance, p.differing, p.tokens))
                .count()
        };
        assert!(accepted(&gate.with_max_loss(1e-4)) < accepted(&gate));
        assert_eq!(accepted(&gate.with_max_loss(f64::INFINITY)), 200);
    }

    #[test]
    fn too_few_points_give_no_gate_and_files_round_trip() {
        assert!(ErrorGate::fit(&synthetic(5, 3), 0.01, 0.9, "all").is_none());
        let gate = ErrorGate::fit(&synthetic(50, 3), 0.01, 0.9, "all").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gate.json");
        gate.save(&path).unwrap();
        assert_eq!(ErrorGate::load(&path).unwrap(), gate);
        std::fs::write(&path, "{\"coefficients\": 3}").unwrap();
        assert!(ErrorGate::load(&path).is_err());
    }

    #[test]
    fn spearman_of_monotone_and_reversed_samples() {
        let a = [1.0, 2.0, 3.0, 4.0];
        assert!((spearman(&a, &[10.0, 20.0, 30.0, 45.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    }
}
