//! Which positions a blend hit recomputes: the check layer's per-position deviations
//! ([`deviations`], [`pooled_deviation`]) and the set S they lead to under a policy
//! ([`select`] for the fast rule, [`escalation`] for an escalated hit). Both start from the
//! differing positions and pad by largest deviation ([`pad_by_deviation`]).

use super::policy::BlendPolicy;

/// What [`select`] decided for one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Selection {
    /// Recompute these positions (sorted); the largest deviation left outside is `residual`.
    Accept {
        /// S, sorted.
        positions: Vec<u32>,
        /// Largest deviation of a position outside S (0 when S holds every position).
        residual: f32,
    },
    /// S would need `needed` positions, more than the policy allows.
    Refuse {
        /// Positions S would need.
        needed: usize,
    },
    /// The input as a whole moved too far from the stored one ([`pooled_deviation`]).
    TooFar {
        /// Its pooled deviation.
        pooled: f32,
    },
}

/// S for an input of `deviation.len()` positions: every `differing` position plus every
/// position whose deviation exceeds the policy's bound — the smallest S whose largest
/// remaining deviation is within it — unless that is more than the policy's largest share;
/// then, if any state moved, the positions of largest deviation up to its smallest share.
/// Both bounds are relaxed by the share of the input that moved ([`BlendPolicy::dilution`]).
///
/// `pooled` is the input's [`pooled_deviation`]; over the policy's bound (or NaN) the hit is
/// refused whatever S would be.
pub fn select(
    deviation: &[f32],
    pooled: f32,
    differing: &[usize],
    policy: &BlendPolicy,
) -> Selection {
    if pooled.is_nan() || pooled > policy.max_pooled_deviation {
        return Selection::TooFar { pooled };
    }
    let len = deviation.len();
    let mut in_s = marked(len, differing);
    // the share of the input whose state moved (a NaN counts: it is not trusted)
    let moved = (0..len)
        .filter(|&i| in_s[i] || deviation[i] > 0.0 || deviation[i].is_nan())
        .count();
    let scale = match len {
        0 => 1.0,
        _ => (moved as f64 / len as f64).powf(f64::from(policy.dilution)),
    };
    let bound = match scale > 0.0 {
        true => (f64::from(policy.max_deviation) / scale) as f32,
        false => policy.max_deviation,
    };
    let mut residual = 0f32;
    for (i, &d) in deviation.iter().enumerate() {
        // a NaN deviation is not trusted: recompute that position
        if d.is_nan() || d > bound {
            in_s[i] = true;
        } else if !in_s[i] {
            residual = residual.max(d);
        }
    }
    let needed = in_s.iter().filter(|x| **x).count();
    let cap = (policy.max_recompute_share as f64 * len as f64).floor() as usize;
    if needed > cap.max(usize::from(len > 0 && policy.max_recompute_share >= 1.0)) {
        return Selection::Refuse { needed };
    }
    // (an f32 share such as 0.2 is 0.2000000003: not one position more for its rounding)
    // (a smallest share of 1 is every position, the exact output, whatever the dilution)
    let scale_floor = if policy.min_recompute_share >= 1.0 {
        1.0
    } else {
        scale
    };
    let floor =
        (f64::from(policy.min_recompute_share) * scale_floor * len as f64 - 1e-6).ceil() as usize;
    if moved > 0 && needed < floor {
        pad_by_deviation(&mut in_s, deviation, floor);
        residual = residual_outside(&in_s, deviation);
    }
    Selection::Accept {
        positions: positions_of(&in_s),
        residual,
    }
}

/// The widest span of differing positions still taken as one edit by dilution
/// ([`single_edit`]).
pub const SINGLE_EDIT_SPAN: usize = 32;

/// Whether the `differing` positions are one edit: none, or all within
/// [`SINGLE_EDIT_SPAN`] positions of each other. Dilution ([`BlendPolicy::dilution`]) holds
/// only then: with edits in several places the positions between them are stale towards
/// each, and what global layers carry across them is not seen by a sliding check layer.
pub fn single_edit(differing: &[usize]) -> bool {
    match (differing.iter().min(), differing.iter().max()) {
        (Some(lo), Some(hi)) => hi - lo <= SINGLE_EDIT_SPAN,
        _ => true,
    }
}

/// The share of the positions whose state moved at the check layer (a deviation above 0,
/// or NaN) or whose token differs.
pub fn moved_share(deviation: &[f32], differing: &[usize]) -> f32 {
    if deviation.is_empty() {
        return 0.0;
    }
    let in_s = marked(deviation.len(), differing);
    let moved = (0..deviation.len())
        .filter(|&i| in_s[i] || deviation[i] > 0.0 || deviation[i].is_nan())
        .count();
    moved as f32 / deviation.len() as f32
}

/// Positions to recompute and the largest deviation left outside them.
#[derive(Debug, Clone, PartialEq)]
pub struct Recompute {
    /// S, sorted.
    pub positions: Vec<u32>,
    /// Largest deviation of a position outside S (0 when S holds every position).
    pub residual: f32,
}

/// S of an escalated hit: every `differing` position, then the positions of largest
/// `deviation` (a NaN first) until S holds `share` of the input (rounded up), and the
/// largest deviation left outside it.
pub fn escalation(deviation: &[f32], differing: &[usize], share: f32) -> Recompute {
    let mut in_s = marked(deviation.len(), differing);
    let want = (f64::from(share) * deviation.len() as f64 - 1e-6).ceil() as usize;
    pad_by_deviation(&mut in_s, deviation, want);
    Recompute {
        positions: positions_of(&in_s),
        residual: residual_outside(&in_s, deviation),
    }
}

/// `len` flags with every `differing` position set (positions past the end ignored).
fn marked(len: usize, differing: &[usize]) -> Vec<bool> {
    let mut in_s = vec![false; len];
    for &i in differing {
        if let Some(x) = in_s.get_mut(i) {
            *x = true;
        }
    }
    in_s
}

/// Sets the unset positions of largest `deviation` (a NaN first, then lower positions on
/// ties) until `want` positions are set.
fn pad_by_deviation(in_s: &mut [bool], deviation: &[f32], want: usize) {
    let have = in_s.iter().filter(|x| **x).count();
    if have >= want {
        return;
    }
    let key = |d: f32| if d.is_nan() { f32::INFINITY } else { d };
    let mut rest: Vec<usize> = (0..in_s.len()).filter(|&i| !in_s[i]).collect();
    rest.sort_by(|&a, &b| {
        key(deviation[b])
            .total_cmp(&key(deviation[a]))
            .then(a.cmp(&b))
    });
    for &i in rest.iter().take(want - have) {
        in_s[i] = true;
    }
}

/// The largest deviation of a position outside S (0 when S holds every position).
fn residual_outside(in_s: &[bool], deviation: &[f32]) -> f32 {
    deviation
        .iter()
        .zip(in_s)
        .filter(|(_, s)| !**s)
        .map(|(d, _)| *d)
        .fold(0f32, f32::max)
}

/// The set positions, sorted.
fn positions_of(in_s: &[bool]) -> Vec<u32> {
    (0..in_s.len())
        .filter(|&i| in_s[i])
        .map(|i| i as u32)
        .collect()
}

/// Relative deviation of each position's state `xs` `[L, hidden]` (f32) from the stored
/// states `stored` `[L, hidden]` (already aligned to the input's positions).
pub fn deviations(xs: &[f32], stored: &[f32], hidden: usize) -> Vec<f32> {
    xs.chunks_exact(hidden)
        .zip(stored.chunks_exact(hidden))
        .map(|(x, s)| {
            let (mut diff, mut norm) = (0f64, 0f64);
            for (a, b) in x.iter().zip(s) {
                let d = f64::from(*a) - f64::from(*b);
                diff += d * d;
                norm += f64::from(*b) * f64::from(*b);
            }
            (diff.sqrt() / norm.sqrt().max(1e-12)) as f32
        })
        .collect()
}

/// `1 − cos` between the mean of the RMS-normalised rows of `xs` and of `stored` (both
/// `[L, hidden]` f32, aligned to the input's positions): how far the input as a whole moved,
/// with every position weighing the same (as mean pooling after the model's final norm).
pub fn pooled_deviation(xs: &[f32], stored: &[f32], hidden: usize) -> f32 {
    let pool = |rows: &[f32]| {
        let mut sum = vec![0f64; hidden];
        for row in rows.chunks_exact(hidden) {
            let ms = row.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / hidden as f64;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            for (s, x) in sum.iter_mut().zip(row) {
                *s += f64::from(*x) * inv;
            }
        }
        sum
    };
    let (a, b) = (pool(xs), pool(stored));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 && nb == 0.0 {
        return 0.0;
    }
    (1.0 - dot / (na * nb).max(1e-300)).clamp(0.0, 2.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain rule (no dilution: these inputs' zero deviations would relax it).
    fn policy(max_deviation: f32, share: f32) -> BlendPolicy {
        BlendPolicy {
            max_deviation,
            max_recompute_share: share,
            min_recompute_share: 0.0,
            dilution: 0.0,
            ..BlendPolicy::default()
        }
    }

    #[test]
    fn escalation_takes_differing_then_largest_deviations() {
        let dev = [0.01, 0.2, f32::NAN, 0.5, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0];
        // 30% of 10: the differing 6, then NaN (2) and 0.5 (3)
        let three = escalation(&dev, &[6], 0.3);
        assert_eq!(three.positions, vec![2, 3, 6]);
        assert_eq!(three.residual, 0.2, "the largest deviation left outside");
        // more differing positions than the share: all of them, nothing added
        assert_eq!(
            escalation(&dev, &[0, 4, 8, 9], 0.2).positions,
            vec![0, 4, 8, 9]
        );
        let all = escalation(&dev, &[], 1.0);
        assert_eq!((all.positions.len(), all.residual), (10, 0.0));
        let p = BlendPolicy {
            resume_layer: Some(0),
            ..BlendPolicy::default()
        };
        assert!(p.validate().is_err(), "resume layer at the check layer");
        let p = BlendPolicy {
            escalate_share: 0.0,
            ..BlendPolicy::default()
        };
        assert!(p.validate().is_err());
    }

    #[test]
    fn select_takes_differing_and_deviating_positions() {
        let dev = [0.01, 0.2, 0.03, 0.5, 0.0, 0.04, 0.0, 0.0, 0.0, 0.0];
        match select(&dev, 0.0, &[6], &policy(0.05, 0.5)) {
            Selection::Accept {
                positions,
                residual,
            } => {
                assert_eq!(positions, vec![1, 3, 6]);
                assert_eq!(residual, 0.04);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn select_refuses_past_the_cap() {
        let dev = [0.5; 10];
        assert_eq!(
            select(&dev, 0.0, &[], &policy(0.05, 0.3)),
            Selection::Refuse { needed: 10 }
        );
        // a NaN deviation is recomputed, never trusted
        let dev = [f32::NAN, 0.0, 0.0, 0.0];
        assert!(matches!(
            select(&dev, 0.0, &[], &policy(0.05, 0.25)),
            Selection::Accept { positions, .. } if positions == vec![0]
        ));
    }

    #[test]
    fn share_one_allows_every_position() {
        let dev = [0.5; 4];
        assert!(matches!(
            select(&dev, 0.0, &[], &policy(0.0, 1.0)),
            Selection::Accept { positions, residual } if positions.len() == 4 && residual == 0.0
        ));
    }

    #[test]
    fn dilution_relaxes_the_bounds_when_part_of_the_input_moved() {
        // 20 positions, the first 10 moved (w = 0.5); three of them over 0.05, one over 0.1
        let mut dev = [0.0f32; 20];
        dev[..10].copy_from_slice(&[0.2, 0.06, 0.07, 0.01, 0.02, 0.03, 0.01, 0.01, 0.02, 0.01]);
        let p = |dilution| BlendPolicy {
            min_recompute_share: 0.4,
            dilution,
            ..policy(0.05, 0.5)
        };
        let positions = |d| match select(&dev, 0.0, &[], &p(d)) {
            Selection::Accept { positions, .. } => positions,
            other => panic!("{other:?}"),
        };
        // no dilution: 3 over the bound, padded to 40% of 20
        assert_eq!(positions(0.0).len(), 8);
        // w^1 = 0.5: bound 0.1 (one position over it), padded to 20% of 20
        assert_eq!(positions(1.0), vec![0, 1, 2, 5]);
        // w^2 = 0.25: bound 0.2 (none over it: 0.2 is within), padded to 10% of 20
        assert_eq!(positions(2.0), vec![0, 2]);
        // an input that moved everywhere is treated the same whatever the exponent
        let everywhere = [0.06f32, 0.01, 0.02, 0.2, 0.01, 0.03, 0.01, 0.01, 0.02, 0.01];
        assert_eq!(
            select(&everywhere, 0.0, &[], &p(0.0)),
            select(&everywhere, 0.0, &[], &p(3.0))
        );
        // a differing position counts as moved even with no deviation
        let mut dev = [0.0f32; 10];
        dev[0] = 0.01;
        match select(&dev, 0.0, &[9], &p(1.0)) {
            // w = 0.2: padded to 0.4 · 0.2 · 10 = 0.8, one position: the differing one
            Selection::Accept { positions, .. } => assert_eq!(positions, vec![9]),
            other => panic!("{other:?}"),
        }
        for bad in [-1.0, f32::NAN, f32::INFINITY] {
            assert!(p(bad).validate().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_smallest_share_adds_the_largest_deviations() {
        let dev = [0.01, 0.02, 0.0, 0.03, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let p = BlendPolicy {
            min_recompute_share: 0.2,
            ..policy(0.05, 0.5)
        };
        assert_eq!(
            select(&dev, 0.0, &[], &p),
            Selection::Accept {
                positions: vec![1, 3],
                residual: 0.01
            }
        );
        // states that did not move at all (an identical input): nothing is added
        assert_eq!(
            select(&[0.0; 10], 0.0, &[], &p),
            Selection::Accept {
                positions: vec![],
                residual: 0.0
            }
        );
        let all = BlendPolicy {
            min_recompute_share: 1.0,
            dilution: 3.0,
            ..policy(0.05, 1.0)
        };
        assert!(
            matches!(select(&dev, 0.0, &[], &all), Selection::Accept { positions, .. } if positions.len() == 10)
        );
        assert!(BlendPolicy {
            min_recompute_share: 0.6,
            ..policy(0.05, 0.5)
        }
        .validate()
        .is_err());
    }

    #[test]
    fn the_pooled_gate_refuses_an_input_that_moved_as_a_whole() {
        let same = [1.0f32, 2.0, 3.0, 4.0, -1.0, 0.5];
        assert_eq!(pooled_deviation(&same, &same, 3), 0.0);
        // a row scaled as a whole does not move (RMS-normalised), a changed row does
        let scaled = [2.0f32, 4.0, 6.0, 4.0, -1.0, 0.5];
        assert!(pooled_deviation(&scaled, &same, 3) < 1e-9);
        let moved = [1.0f32, 2.0, 3.0, -4.0, 1.0, 0.5];
        let d = pooled_deviation(&moved, &same, 3);
        assert!(d > 0.01, "{d}");
        let p = BlendPolicy {
            max_pooled_deviation: d / 2.0,
            ..policy(0.05, 0.5)
        };
        assert_eq!(
            select(&[0.0; 2], d, &[], &p),
            Selection::TooFar { pooled: d }
        );
        assert!(matches!(
            select(&[0.0; 2], d / 4.0, &[], &p),
            Selection::Accept { .. }
        ));
        assert!(matches!(
            select(&[0.0; 2], f32::NAN, &[], &p),
            Selection::TooFar { .. }
        ));
        assert!(BlendPolicy {
            max_pooled_deviation: -1.0,
            ..BlendPolicy::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn edits_in_several_places_are_not_one_edit() {
        assert!(single_edit(&[]));
        assert!(single_edit(&[100, 101, 115]));
        assert!(single_edit(&[100, 100 + SINGLE_EDIT_SPAN]));
        assert!(!single_edit(&[100, 101 + SINGLE_EDIT_SPAN]));
        assert!(!single_edit(&[3, 700, 701]));
    }

    #[test]
    fn deviations_are_relative() {
        let d = deviations(&[1.0, 0.0, 2.0, 2.0], &[1.0, 0.0, 1.0, 1.0], 2);
        assert_eq!(d[0], 0.0);
        assert!((d[1] - 1.0).abs() < 1e-6);
    }
}
