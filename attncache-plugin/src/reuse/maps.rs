//! [`ReusePolicy`]: what a hit on a *different* input reuses — which layers take the stored
//! maps, and which attention rows are recomputed instead (CacheBlend's selective recompute).
//!
//! A hit on identical token ids always reuses every layer whole: its maps are the input's
//! own (up to f16 rounding). For a near hit the stored maps belong to another input, and
//! two levers trade speed for fidelity:
//!
//! - **partial reuse** ([`ReusePolicy::layers`], [`ReusePolicy::heads`]): only the listed
//!   layers, or (layer, head) maps, take stored maps; the others compute attention exactly
//!   (their q/k projections run). Which are least sensitive is measured per model by
//!   `attncache-eval` (reusing one layer, or one head, at a time);
//! - **selective recompute** ([`ReusePolicy::recompute_differing`]): in every reused layer
//!   the rows of positions whose token differs from the stored input's are computed exactly
//!   (`softmax(q_r·Kᵀ)` with the current keys), plus up to [`ReusePolicy::recompute_budget`]
//!   rows next to them (the positions whose context changed most). The other rows keep the
//!   stored probabilities. Recomputing needs this input's q and k, so such a hit does not
//!   skip the q/k projections;
//! - **length slack** ([`ReusePolicy::length_slack`]): an edit that adds or removes a token
//!   shifts every later position, so near-duplicates often differ in length. With slack,
//!   stored inputs up to that many tokens longer or shorter are candidates too, and their
//!   maps are *aligned* to the input ([`align`], a greedy diff of the token ids): matching
//!   tokens take each other's rows and columns, edited ones map onto the edit, and every
//!   row is renormalised. The edited positions count as differing. Alignment also applies
//!   at the same length (a truncated input whose middle gained a token is shifted, not
//!   different, after the edit).

use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;

/// What a near hit reuses (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReusePolicy {
    /// Layers whose stored maps a near hit uses; empty: every layer.
    pub layers: Vec<usize>,
    /// `[layer, head]` maps a near hit uses (within `layers`); empty: every head. The other
    /// heads of a reused layer compute their attention exactly.
    pub heads: Vec<[usize; 2]>,
    /// Recompute the attention rows of positions whose token differs from the stored input.
    pub recompute_differing: bool,
    /// Extra rows recomputed next to the differing positions (nearest first), at most this
    /// many per input.
    pub recompute_budget: usize,
    /// A neighbour with more differing positions than this share of the input is not used
    /// when recomputing (recomputing most rows costs more than it saves).
    pub max_recompute_share: f32,
    /// Stored inputs up to this many tokens longer or shorter are candidates, their maps
    /// aligned to the input (0: the same length only).
    pub length_slack: usize,
}

impl Default for ReusePolicy {
    fn default() -> Self {
        Self {
            layers: Vec::new(),
            heads: Vec::new(),
            recompute_differing: false,
            recompute_budget: 0,
            max_recompute_share: 0.5,
            length_slack: 0,
        }
    }
}

impl ReusePolicy {
    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), AttnCacheError> {
        if !(self.max_recompute_share > 0.0 && self.max_recompute_share <= 1.0) {
            return Err(AttnCacheError::InvalidSetting {
                name: "max_recompute_share",
                value: self.max_recompute_share.to_string(),
                expected: "a share in (0, 1]",
            });
        }
        Ok(())
    }

    /// Whether a near hit takes (some of) layer `layer`'s maps from the store.
    pub fn reuses_layer(&self, layer: usize) -> bool {
        (self.layers.is_empty() || self.layers.contains(&layer))
            && (self.heads.is_empty() || self.heads.iter().any(|h| h[0] == layer))
    }

    /// The heads of layer `layer` (of `n_heads`) that compute exactly although the layer is
    /// reused (sorted; empty when every head reuses).
    pub fn fresh_heads(&self, layer: usize, n_heads: usize) -> Vec<usize> {
        if self.heads.is_empty() {
            return Vec::new();
        }
        (0..n_heads)
            .filter(|&h| !self.heads.contains(&[layer, h]))
            .collect()
    }

    /// A short name for reports (`all`, `layers=12`, `heads=36`, `all+recompute`,
    /// `layers=12+recompute+4`).
    pub fn describe(&self) -> String {
        let mut s = if !self.heads.is_empty() {
            format!("heads={}", self.heads.len())
        } else if self.layers.is_empty() {
            "all".to_string()
        } else {
            format!("layers={}", self.layers.len())
        };
        if self.recompute_differing {
            s.push_str("+recompute");
            if self.recompute_budget > 0 {
                s.push_str(&format!("+{}", self.recompute_budget));
            }
        }
        if self.length_slack > 0 {
            s.push_str(&format!("+slack={}", self.length_slack));
        }
        s
    }

    /// The rows to recompute when an input of `len` tokens reuses aligned maps whose
    /// `differing` positions (sorted) do not match: `None` when the policy does not
    /// recompute; `Some(rows)` (sorted, possibly empty) otherwise; `Err(())` when too many
    /// rows differ for the neighbour to be worth using.
    #[allow(clippy::result_unit_err)]
    pub fn rows_to_recompute(
        &self,
        len: usize,
        differing: &[usize],
    ) -> Result<Option<Vec<u32>>, ()> {
        if !self.recompute_differing {
            return Ok(None);
        }
        if differing.len() as f32 > self.max_recompute_share * len as f32 {
            return Err(());
        }
        let mut chosen = vec![false; len];
        for &i in differing.iter().filter(|i| **i < len) {
            chosen[i] = true;
        }
        // the budget goes to the positions nearest a differing one, closest first
        let mut extra = self.recompute_budget;
        let mut radius = 1;
        while extra > 0 && !differing.is_empty() && radius < len {
            let mut added = false;
            for &i in differing {
                for j in [i.checked_sub(radius), Some(i + radius)]
                    .into_iter()
                    .flatten()
                {
                    if extra > 0 && j < len && !chosen[j] {
                        chosen[j] = true;
                        extra -= 1;
                        added = true;
                    }
                }
            }
            if !added && chosen.iter().all(|c| *c) {
                break;
            }
            radius += 1;
        }
        Ok(Some(
            chosen
                .iter()
                .enumerate()
                .filter(|(_, c)| **c)
                .map(|(i, _)| i as u32)
                .collect(),
        ))
    }
}

/// How the positions of an input map onto a stored input's positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alignment {
    /// For each input position, the stored position whose row and column it takes.
    pub source: Vec<u32>,
    /// Input positions whose token is not the token at their source (sorted).
    pub differing: Vec<usize>,
    /// Whether `source` is the identity (same length, positions map to themselves).
    pub identity: bool,
}

/// Longest edit (in tokens, on either side) the alignment steps over to resynchronise.
pub const ALIGN_MAX_EDIT: usize = 8;
/// Tokens that must match after an edit for the alignment to resynchronise there.
const ALIGN_RESYNC: usize = 3;

/// Aligns `query` to `stored` with a greedy diff: matching tokens map to each other; at a
/// mismatch the alignment steps over the shortest edit (at most [`ALIGN_MAX_EDIT`] tokens on
/// either side) after which [`ALIGN_RESYNC`] tokens match again, mapping the edited query
/// positions proportionally onto the edited stored ones (an insertion onto the stored token
/// before it). Where no resynchronisation is found the rest maps proportionally. Positions
/// whose token differs from their source's are `differing`. A shift (a token added or
/// removed, or a different cut of a truncated input) costs only the edited positions.
pub fn align(query: &[u32], stored: &[u32]) -> Alignment {
    let (lq, ls) = (query.len(), stored.len());
    let mut source = Vec::with_capacity(lq);
    let (mut i, mut j) = (0, 0);
    let clamp = |p: usize| p.min(ls.saturating_sub(1)) as u32;
    while i < lq {
        if j < ls && query[i] == stored[j] {
            source.push(j as u32);
            i += 1;
            j += 1;
            continue;
        }
        match resync(query, stored, i, j) {
            Some((di, dj)) => {
                for t in 0..di {
                    let s = if dj > 0 {
                        j + t * dj / di
                    } else {
                        j.saturating_sub(1)
                    };
                    source.push(clamp(s));
                }
                i += di;
                j += dj;
            }
            None => {
                // no match ahead: the rest maps proportionally onto the rest
                let (rq, rs) = (lq - i, ls.saturating_sub(j));
                for t in 0..rq {
                    source.push(clamp(j + t * rs / rq));
                }
                break;
            }
        }
    }
    let differing = (0..lq)
        .filter(|&i| stored.get(source[i] as usize) != Some(&query[i]))
        .collect();
    let identity = lq == ls && source.iter().enumerate().all(|(i, s)| *s as usize == i);
    Alignment {
        source,
        differing,
        identity,
    }
}

/// The shortest edit `(query tokens, stored tokens)` at `(i, j)` after which the next tokens
/// match (up to [`ALIGN_RESYNC`], fewer at the ends); balanced edits first at equal length.
fn resync(query: &[u32], stored: &[u32], i: usize, j: usize) -> Option<(usize, usize)> {
    let (lq, ls) = (query.len(), stored.len());
    for sum in 1..=2 * ALIGN_MAX_EDIT {
        let mut options: Vec<(usize, usize)> = (0..=sum)
            .map(|di| (di, sum - di))
            .filter(|&(di, dj)| di <= ALIGN_MAX_EDIT && dj <= ALIGN_MAX_EDIT)
            .collect();
        options.sort_by_key(|&(di, dj)| di.abs_diff(dj));
        for (di, dj) in options {
            let (a, b) = (i + di, j + dj);
            if a > lq || b > ls {
                continue;
            }
            let m = ALIGN_RESYNC.min(lq - a).min(ls - b);
            if m == 0 {
                // both at their ends: the edit runs to the end
                if a == lq && b == ls {
                    return Some((di, dj));
                }
                continue;
            }
            if query[a..a + m] == stored[b..b + m] {
                return Some((di, dj));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differing_rows_and_their_neighbours_are_recomputed() {
        let p = ReusePolicy {
            recompute_differing: true,
            recompute_budget: 3,
            ..ReusePolicy::default()
        };
        let a = [1, 2, 3, 4, 5, 6, 7, 8];
        let b = [1, 2, 3, 9, 5, 6, 7, 8];
        let rows = |p: &ReusePolicy, x: &[u32], y: &[u32]| {
            p.rows_to_recompute(x.len(), &align(x, y).differing)
        };
        // position 3 differs; budget 3 takes 2 and 4 (radius 1), then 1 (radius 2, left first)
        assert_eq!(rows(&p, &a, &b), Ok(Some(vec![1, 2, 3, 4])));
        assert_eq!(rows(&p, &a, &a), Ok(Some(vec![])));
        let off = ReusePolicy::default();
        assert_eq!(rows(&off, &a, &b), Ok(None));
        // more than half the positions differ: not worth it
        let c = [9, 9, 9, 9, 9, 6, 7, 8];
        assert_eq!(rows(&p, &a, &c), Err(()));
        // a budget larger than the input stops at the whole input
        let big = ReusePolicy {
            recompute_budget: 100,
            ..p.clone()
        };
        assert_eq!(rows(&big, &a, &b), Ok(Some((0..8).collect::<Vec<u32>>())));
    }

    #[test]
    fn a_shift_of_a_truncated_input_costs_only_the_edit() {
        // stored: 0..20; query: a token inserted at 5, cut to the same length (20)
        let stored: Vec<u32> = (0..20).collect();
        let mut query: Vec<u32> = (0..5).chain([99]).chain(5..20).collect();
        query.truncate(20);
        let a = align(&query, &stored);
        assert_eq!(a.differing, vec![5]);
        assert!(!a.identity);
        assert_eq!(a.source[6..], (5..19).collect::<Vec<u32>>()[..]);
        // nothing in common: everything differs, sources stay in range
        let other: Vec<u32> = (100..110).collect();
        let a = align(&other, &stored);
        assert_eq!(a.differing.len(), 10);
        assert!(a.source.iter().all(|s| *s < 20));
    }

    #[test]
    fn alignment_keeps_prefix_and_suffix_across_insertions_and_deletions() {
        let a = [1, 2, 3, 4, 5, 6];
        // same length, one substitution: the identity, one differing position
        let s = align(&[1, 2, 9, 4, 5, 6], &a);
        assert!(s.identity);
        assert_eq!(s.differing, vec![2]);
        // an insertion after 3: the suffix maps from the end, the new token differs
        let ins = align(&[1, 2, 3, 7, 4, 5, 6], &a);
        assert_eq!(ins.source, vec![0, 1, 2, 2, 3, 4, 5]);
        assert_eq!(ins.differing, vec![3]);
        assert!(!ins.identity);
        // a deletion of 4: every query position keeps its own token
        let del = align(&[1, 2, 3, 5, 6], &a);
        assert_eq!(del.source, vec![0, 1, 2, 4, 5]);
        assert!(del.differing.is_empty());
        // a replaced word of two tokens by one: the middle maps proportionally
        let rep = align(&[1, 2, 8, 5, 6], &a);
        assert_eq!(rep.source, vec![0, 1, 2, 4, 5]);
        assert_eq!(rep.differing, vec![2]);
        // identical inputs and an empty one
        assert!(align(&a, &a).identity && align(&a, &a).differing.is_empty());
        assert!(align(&[], &a).source.is_empty());
        // a repeated token at the edit does not make the prefix and suffix overlap
        let rr = align(&[1, 1], &[1, 1, 1]);
        assert_eq!(rr.source, vec![0, 1]);
        assert!(rr.differing.is_empty());
    }

    #[test]
    fn layers_and_names() {
        let p = ReusePolicy {
            layers: vec![3, 5],
            recompute_differing: true,
            recompute_budget: 4,
            ..ReusePolicy::default()
        };
        assert!(p.reuses_layer(3) && !p.reuses_layer(4));
        assert!(ReusePolicy::default().reuses_layer(17));
        assert_eq!(p.describe(), "layers=2+recompute+4");
        assert_eq!(ReusePolicy::default().describe(), "all");
        assert!(ReusePolicy {
            max_recompute_share: 0.0,
            ..ReusePolicy::default()
        }
        .validate()
        .is_err());
    }
}
