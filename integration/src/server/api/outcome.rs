//! [`InputOutcome`]: what the cache did for one input — the one spelling the per-input
//! report, the metrics label and the exact-repeat memo all use — and the report itself
//! ([`InputReport`], [`CacheReport`]) every route's response carries.

pub use super::types::{CacheReport, CheckReport, InputOutcome, InputReport};
use attncache_plugin::{Decision, Outcome};

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
            resumed_after_layer: decision.and_then(|d| d.resumed_after_layer),
            check: decision.and_then(|d| d.check).map(|c| CheckReport {
                pooled_deviation: c.pooled,
                stale_deviation: c.stale,
                residual_deviation: c.residual,
                moved_share: c.moved_share,
            }),
            stored_inputs: near
                .filter(|d| d.residual_deviation.is_some())
                .and_then(|d| d.stored_inputs),
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
