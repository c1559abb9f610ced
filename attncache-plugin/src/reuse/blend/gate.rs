//! The fidelity gate: a calibrated bound on what a blend hit may leave stale
//! ([`FidelityGate`]). At the check layer every candidate rule (the fast rule's S, then an
//! escalated S) is summarised by [`CheckSignals`]; the gate lets a rule's hit through only
//! when the signal that rule is bounded on is at or under the bound calibrated for the
//! input's length band and that rule. Otherwise the next rule is tried, and when none passes the hit is refused and the
//! forward continues exactly.
//!
//! The bounds are fitted by `attncache-blend-eval` on held-apart near-duplicate pairs of
//! several kinds: per band and rule, the largest signal `t` such that, among the calibration
//! hits with signal ≤ `t`, `(k + 1) / (m + 1) ≤ target_below_floor`, where `m` is their
//! number and `k` how many fell below the floor (the split-conformal bound on the share of
//! accepted hits below the floor for one more input exchangeable with them). With a target of
//! 1% no bound exists until 99 calibration hits of a band and rule are at or under it, and a
//! band or rule with too few calibration hits takes no hit at all.

use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;

/// What the check layer saw of one candidate S: the numbers a [`FidelityGate`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CheckSignals {
    /// `1 − cos` between the input's pooled states and the stored input's after the check
    /// layer ([`super::pooled_deviation`]).
    pub pooled: f32,
    /// The mean, over every position, of the deviation of the positions left outside S (0
    /// for those in S): how much stale state the hit keeps ([`stale_deviation`]).
    pub stale: f32,
    /// The largest deviation of a position outside S.
    pub residual: f32,
    /// The share of the positions whose state moved at the check layer (or whose token
    /// differs).
    pub moved_share: f32,
}

/// Which of the [`CheckSignals`] a gate bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GateSignal {
    /// [`CheckSignals::stale`].
    Stale,
    /// [`CheckSignals::residual`].
    Residual,
    /// [`CheckSignals::pooled`].
    Pooled,
}

impl GateSignal {
    /// This signal's value in `s`.
    pub fn of(self, s: &CheckSignals) -> f32 {
        match self {
            Self::Stale => s.stale,
            Self::Residual => s.residual,
            Self::Pooled => s.pooled,
        }
    }
}

/// One rule's bound in one band, with the calibration behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBound {
    /// The signal bounded (the one whose bound took the most calibration hits).
    pub signal: GateSignal,
    /// Largest signal a hit of this rule may have; `None`: this rule takes no hit here (too
    /// few calibration hits to bound).
    pub max_signal: Option<f32>,
    /// Calibration hits of this rule and band at or under the bound.
    pub calibration_hits: usize,
    /// How many of them fell below the floor.
    pub calibration_below_floor: usize,
    /// `(below_floor + 1) / (hits + 1)`: the bound on the share of accepted hits below the
    /// floor (1 when no hit is accepted).
    pub bound: f64,
}

/// The bounds for inputs of at least `min_tokens` tokens (up to the next band's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateBand {
    /// Shortest input of the band.
    pub min_tokens: usize,
    /// The fast rule's bound (the layers after the check layer run on S only).
    pub fast: RuleBound,
    /// An escalated hit's bound (S only up to the resume layer).
    pub escalated: RuleBound,
}

/// A calibrated fidelity gate (`--blend-gate FILE`, written by `attncache-blend-eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FidelityGate {
    /// The fidelity floor (cosine of a hit's embedding to the exact one) the bounds protect.
    pub floor: f64,
    /// The largest share of accepted hits below the floor the bounds allow.
    pub target_below_floor: f64,
    /// How far under the calibration's first failure each bound was kept ([`fit_bound`]'s
    /// `margin`; 1 when the file does not say: the plain split-conformal bound).
    #[serde(default = "no_margin")]
    pub failure_margin: f64,
    /// Bands by input length, ascending `min_tokens`, the first at 0.
    pub bands: Vec<GateBand>,
    /// Where the bounds come from: model, pairs per kind, seed, commit, date.
    #[serde(default)]
    pub calibration: serde_json::Value,
}

fn no_margin() -> f64 {
    1.0
}

impl FidelityGate {
    /// Reads a gate file.
    pub fn load(path: &std::path::Path) -> Result<Self, AttnCacheError> {
        let text = std::fs::read_to_string(path).map_err(|e| AttnCacheError::Io {
            what: "reading the blend fidelity gate",
            source: e,
        })?;
        let gate: Self =
            serde_json::from_str(&text).map_err(|e| AttnCacheError::InvalidSetting {
                name: "blend_gate",
                value: format!("{}: {e}", path.display()),
                expected: "a JSON fidelity gate written by attncache-blend-eval",
            })?;
        gate.validate()?;
        Ok(gate)
    }

    /// Rejects a gate that cannot be applied.
    pub fn validate(&self) -> Result<(), AttnCacheError> {
        let sorted = self
            .bands
            .windows(2)
            .all(|w| w[0].min_tokens < w[1].min_tokens);
        if self.bands.first().map(|b| b.min_tokens) != Some(0) || !sorted {
            return Err(AttnCacheError::InvalidSetting {
                name: "blend_gate.bands",
                value: format!("{} bands", self.bands.len()),
                expected: "bands by ascending min_tokens, the first at 0",
            });
        }
        let finite = self.bands.iter().all(|b| {
            [b.fast.max_signal, b.escalated.max_signal]
                .iter()
                .flatten()
                .all(|x| x.is_finite() && *x >= 0.0)
        });
        if !finite {
            return Err(AttnCacheError::InvalidSetting {
                name: "blend_gate.max_signal",
                value: "a negative or non-finite bound".into(),
                expected: "bounds of 0 or more",
            });
        }
        Ok(())
    }

    /// The band of an input of `len` tokens.
    pub fn band(&self, len: usize) -> Option<&GateBand> {
        self.bands.iter().rev().find(|b| b.min_tokens <= len)
    }

    /// Whether any near hit of `len` tokens can pass: its band bounds the fast or the
    /// escalated rule. When not, the cache does not look for a neighbour at all (an identical
    /// input is still an exact hit), so the lookup and the loading of a candidate it would
    /// refuse cost nothing.
    pub fn takes_near_hits(&self, len: usize) -> bool {
        self.band(len)
            .is_some_and(|b| b.fast.max_signal.is_some() || b.escalated.max_signal.is_some())
    }

    /// Whether a hit of `len` tokens by the fast rule (`escalated` false) or escalated, with
    /// `signals` at the check layer, may be taken. A NaN signal is never taken; an input whose
    /// states did not move at all (identical to the stored one) always is: its answer is the
    /// stored input's exact one.
    pub fn allows(&self, len: usize, escalated: bool, signals: &CheckSignals) -> bool {
        if signals.moved_share == 0.0 && !escalated {
            return true;
        }
        let Some(band) = self.band(len) else {
            return false;
        };
        let rule = if escalated {
            &band.escalated
        } else {
            &band.fast
        };
        let value = rule.signal.of(signals);
        rule.max_signal.is_some_and(|max| value <= max)
    }

    /// One line for logs and `/info`: the signal, floor, target and each band's bounds.
    pub fn describe(&self) -> String {
        let bands: Vec<String> = self
            .bands
            .iter()
            .map(|b| {
                let rule = |r: &RuleBound| match r.max_signal {
                    Some(x) => format!(
                        "{:?} <= {x:.3e} ({} hits, bound {:.4})",
                        r.signal, r.calibration_hits, r.bound
                    ),
                    None => "none".to_string(),
                };
                format!(
                    "from {} tokens: fast {}, escalated {}",
                    b.min_tokens,
                    rule(&b.fast),
                    rule(&b.escalated)
                )
            })
            .collect();
        format!(
            "fidelity floor {}, at most {} of accepted hits below it, bounds at most {}x the first failure's signal; {}",
            self.floor,
            self.target_below_floor,
            self.failure_margin,
            bands.join("; ")
        )
    }
}

/// The mean over all positions of `deviation` outside `positions` (sorted S): a NaN outside
/// S makes it infinite (never under a bound).
pub fn stale_deviation(deviation: &[f32], positions: &[u32]) -> f32 {
    if deviation.is_empty() {
        return 0.0;
    }
    let mut next = positions.iter().peekable();
    let mut sum = 0f64;
    for (i, &d) in deviation.iter().enumerate() {
        if next.peek().is_some_and(|&&p| p as usize == i) {
            next.next();
            continue;
        }
        if d.is_nan() {
            return f32::INFINITY;
        }
        sum += f64::from(d);
    }
    (sum / deviation.len() as f64) as f32
}

/// The largest bound `t` over `hits` (value of `signal`, fidelity) such that among the hits
/// with signal ≤ `t`, `(below + 1) / (taken + 1) ≤ target`, `below` counting fidelities under
/// `floor`, and that rule's [`RuleBound`] (`max_signal` `None` when no `t` qualifies).
///
/// `margin` (in (0, 1]) keeps `t` at or under `margin` times the smallest signal at which a
/// calibration hit fell below the floor. The conformal bound holds for inputs exchangeable
/// with the calibration set; a kind of input it never saw can fail at lower signals than the
/// calibration's first failure (held out, a long document failed at 0.83x the signal of the
/// calibration's first failure), so the bound keeps its distance from every failure it has
/// seen. With `margin` 1 (or more) it is the plain split-conformal bound.
pub fn fit_bound(
    hits: &[(f32, f64)],
    signal: GateSignal,
    floor: f64,
    target: f64,
    margin: f64,
) -> RuleBound {
    let mut sorted: Vec<(f32, f64)> = hits
        .iter()
        .copied()
        .filter(|(s, _)| s.is_finite())
        .collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let cap = sorted
        .iter()
        .find(|(_, cos)| *cos < floor)
        .filter(|_| margin < 1.0)
        .map_or(f64::INFINITY, |(s, _)| margin * f64::from(*s));
    let mut best = RuleBound {
        signal,
        max_signal: None,
        calibration_hits: 0,
        calibration_below_floor: 0,
        bound: 1.0,
    };
    let mut below = 0usize;
    for (i, &(s, cos)) in sorted.iter().enumerate() {
        if f64::from(s) > cap {
            break;
        }
        below += usize::from(cos < floor);
        // a bound between equal signals cannot split them
        if sorted.get(i + 1).is_some_and(|n| n.0 == s) {
            continue;
        }
        let taken = i + 1;
        let bound = (below + 1) as f64 / (taken + 1) as f64;
        if bound <= target {
            best = RuleBound {
                signal,
                max_signal: Some(s),
                calibration_hits: taken,
                calibration_below_floor: below,
                bound,
            };
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(fast: Option<f32>, escalated: Option<f32>) -> FidelityGate {
        let rule = |max_signal| RuleBound {
            signal: GateSignal::Stale,
            max_signal,
            calibration_hits: 100,
            calibration_below_floor: 0,
            bound: 1.0 / 101.0,
        };
        FidelityGate {
            floor: 0.99,
            target_below_floor: 0.01,
            failure_margin: 1.0,
            bands: vec![
                GateBand {
                    min_tokens: 0,
                    fast: rule(None),
                    escalated: rule(None),
                },
                GateBand {
                    min_tokens: 64,
                    fast: rule(fast),
                    escalated: rule(escalated),
                },
            ],
            calibration: serde_json::Value::Null,
        }
    }

    #[test]
    fn the_gate_bounds_each_band_and_rule() {
        let g = gate(Some(0.01), Some(0.05));
        let s = |stale| CheckSignals {
            stale,
            moved_share: 0.5,
            ..CheckSignals::default()
        };
        assert!(!g.allows(10, false, &s(0.0)), "the short band takes no hit");
        assert!(g.allows(100, false, &s(0.01)));
        assert!(!g.allows(100, false, &s(0.02)));
        assert!(g.allows(100, true, &s(0.02)));
        assert!(!g.allows(100, true, &s(f32::NAN)), "NaN is never taken");
        let unmoved = CheckSignals::default();
        assert!(
            g.allows(10, false, &unmoved),
            "an identical input is its stored answer"
        );
        assert!(g.validate().is_ok());
        assert!(!g.takes_near_hits(10), "the short band has no bound");
        assert!(g.takes_near_hits(100));
        assert!(
            gate(None, Some(0.1)).takes_near_hits(100),
            "an escalated bound is enough"
        );
        assert!(!gate(None, None).takes_near_hits(100));
        let mut unsorted = g.clone();
        unsorted.bands.reverse();
        assert!(unsorted.validate().is_err());
        assert!(gate(Some(-1.0), None).validate().is_err());
    }

    #[test]
    fn stale_counts_only_positions_outside_s() {
        let dev = [0.1, 0.2, 0.3, 0.4];
        assert!((stale_deviation(&dev, &[1, 3]) - 0.1).abs() < 1e-6);
        assert_eq!(stale_deviation(&dev, &[0, 1, 2, 3]), 0.0);
        assert_eq!(stale_deviation(&[f32::NAN, 0.0], &[1]), f32::INFINITY);
        assert_eq!(stale_deviation(&[f32::NAN, 0.0], &[0]), 0.0);
    }

    #[test]
    fn the_fitted_bound_is_the_largest_that_keeps_the_target() {
        // 150 hits: signals 0..150, fidelity under the floor at signals 120 and 140
        let hits: Vec<(f32, f64)> = (0..150)
            .map(|i| (i as f32, if i == 120 || i == 140 { 0.98 } else { 0.999 }))
            .collect();
        let b = fit_bound(&hits, GateSignal::Stale, 0.99, 0.01, 1.0);
        // up to 119: 120 hits, 0 below: 1/121; with 120 below 1: 2/122 > 0.01 until 199 hits
        assert_eq!(b.max_signal, Some(119.0));
        assert_eq!((b.calibration_hits, b.calibration_below_floor), (120, 0));
        // 98 hits cannot reach 1%
        assert_eq!(
            fit_bound(&hits[..98], GateSignal::Stale, 0.99, 0.01, 1.0).max_signal,
            None
        );
        assert_eq!(
            fit_bound(&hits[..99], GateSignal::Stale, 0.99, 0.01, 1.0).max_signal,
            Some(98.0)
        );
        // ties are not split
        let tied = vec![(1.0f32, 0.999); 99]
            .into_iter()
            .chain([(2.0, 0.999), (2.0, 0.5)])
            .collect::<Vec<_>>();
        assert_eq!(
            fit_bound(&tied, GateSignal::Stale, 0.99, 0.01, 1.0).max_signal,
            Some(1.0)
        );
    }

    #[test]
    fn the_margin_keeps_the_bound_away_from_the_first_failure() {
        // 300 clean hits at signals 0..300 and one failure at 200: conformal alone stops
        // just under it, a margin of 0.5 at 100
        let hits: Vec<(f32, f64)> = (0..300)
            .map(|i| (i as f32, if i == 200 { 0.97 } else { 0.999 }))
            .collect();
        let plain = fit_bound(&hits, GateSignal::Stale, 0.99, 0.01, 1.0);
        assert_eq!(plain.max_signal, Some(299.0), "1 of 300 below: 2/301 <= 1%");
        let half = fit_bound(&hits, GateSignal::Stale, 0.99, 0.01, 0.5);
        assert_eq!(half.max_signal, Some(100.0));
        assert_eq!(
            (half.calibration_hits, half.calibration_below_floor),
            (101, 0)
        );
        // a margin that leaves fewer than 99 hits leaves no bound
        assert_eq!(
            fit_bound(&hits, GateSignal::Stale, 0.99, 0.01, 0.45).max_signal,
            None
        );
        // without any failure the margin changes nothing
        let clean: Vec<(f32, f64)> = (0..120).map(|i| (i as f32, 0.999)).collect();
        assert_eq!(
            fit_bound(&clean, GateSignal::Stale, 0.99, 0.01, 0.5).max_signal,
            Some(119.0)
        );
    }
}
