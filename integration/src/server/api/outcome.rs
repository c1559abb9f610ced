//! [`InputOutcome`]: what the cache did for one input — the one spelling the per-input
//! report, the metrics label and the exact-repeat memo all use — and the report itself
//! ([`InputReport`], [`CacheReport`]) every route's response carries.

use attncache_plugin::{Decision, Outcome};
use serde::Serialize;

/// What the cache did for one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputOutcome {
    /// The cache was not used (flag off): the exact path.
    Off,
    /// A flag-on exact repeat answered from the memo (the model did not run).
    ExactRepeat,
    /// Identical token ids were stored: their maps (or blend states) were used.
    Hit,
    /// A similar stored input's maps (or blend states) were used.
    NearHit,
    /// Nothing usable was stored: computed exactly (and recorded when admitted).
    Miss,
    /// Outside what the cache keeps (length range, partition): computed exactly, not stored.
    NotCached,
}

impl InputOutcome {
    /// The outcome of a model run: `flag` off is [`InputOutcome::Off`]; flag on, the
    /// lookup's outcome (no lookup: the input was not cacheable).
    pub fn of_run(flag: bool, lookup: Option<Outcome>) -> Self {
        match (flag, lookup) {
            (false, _) => Self::Off,
            (true, Some(Outcome::ExactHit)) => Self::Hit,
            (true, Some(Outcome::NearHit)) => Self::NearHit,
            (true, Some(Outcome::Miss)) => Self::Miss,
            (true, Some(Outcome::NotCached) | None) => Self::NotCached,
        }
    }

    /// The label in reports and `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::ExactRepeat => "exact_repeat",
            Self::Hit => "hit",
            Self::NearHit => "near_hit",
            Self::Miss => "miss",
            Self::NotCached => "not_cached",
        }
    }

    /// Whether a flag-on answer is the exact one for its input and so may answer exact
    /// repeats from the memo: hits on identical tokens and exact computations are; near
    /// hits are not (they stay lookups).
    pub fn remembered(self) -> bool {
        matches!(self, Self::Hit | Self::Miss | Self::NotCached)
    }
}

/// `attn_cache` in a response.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CacheReport {
    /// Whether the request used the cache.
    pub enabled: bool,
    /// Per input.
    pub inputs: Vec<InputReport>,
}

/// What the cache did for one input.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct InputReport {
    /// Position of the input.
    pub index: usize,
    /// `off`, `exact_repeat`, `hit`, `near_hit`, `miss` or `not_cached` (outside the
    /// cached length range).
    pub outcome: InputOutcome,
    /// Feature distance to the stored entry used (0 for an identical one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance: Option<f32>,
    /// Time of the cache lookup, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup_us: Option<f64>,
    /// Near hits: positions whose token differs from the neighbour's (after alignment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub differing_tokens: Option<u32>,
    /// Near hits decided by the error gate: its predicted 1 − cosine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_error: Option<f32>,
    /// Near hits with selective recompute: attention rows recomputed per reused layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recomputed_rows: Option<u32>,
    /// Blend hits (`--reuse blend`): positions the layers after the check layer recomputed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recomputed_tokens: Option<u32>,
    /// Blend hits: the largest check-layer deviation left outside the recomputed positions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_deviation: Option<f32>,
    /// Tokens truncation cut from the input (`truncate`, `--auto-truncate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_tokens: Option<u32>,
}

impl InputReport {
    /// The report of input `index` whose cache outcome is `outcome`, with the lookup's
    /// decision when the cache looked it up.
    pub fn new(index: usize, outcome: InputOutcome, decision: Option<&Decision>) -> Self {
        let near = decision.filter(|d| d.outcome == Outcome::NearHit);
        Self {
            index,
            outcome,
            distance: decision.and_then(|d| d.distance).filter(|d| d.is_finite()),
            lookup_us: decision.map(|d| d.lookup_ns as f64 / 1e3),
            differing_tokens: near.and_then(|d| d.differing),
            predicted_error: near.and_then(|d| d.predicted_loss),
            recomputed_rows: near
                .filter(|d| d.residual_deviation.is_none())
                .map(|d| d.recomputed_rows)
                .filter(|r| *r > 0),
            recomputed_tokens: decision
                .and_then(|d| d.residual_deviation.map(|_| d.recomputed_rows)),
            residual_deviation: decision.and_then(|d| d.residual_deviation),
            truncated_tokens: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_match_the_serialized_form() {
        for o in [
            InputOutcome::Off,
            InputOutcome::ExactRepeat,
            InputOutcome::Hit,
            InputOutcome::NearHit,
            InputOutcome::Miss,
            InputOutcome::NotCached,
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), o.as_str());
        }
    }

    #[test]
    fn runs_map_to_outcomes_and_near_hits_are_not_remembered() {
        assert_eq!(
            InputOutcome::of_run(false, Some(Outcome::ExactHit)),
            InputOutcome::Off
        );
        assert_eq!(InputOutcome::of_run(true, None), InputOutcome::NotCached);
        assert_eq!(
            InputOutcome::of_run(true, Some(Outcome::NearHit)),
            InputOutcome::NearHit
        );
        assert!(!InputOutcome::NearHit.remembered() && !InputOutcome::Off.remembered());
        assert!(InputOutcome::Hit.remembered() && InputOutcome::Miss.remembered());
    }
}
