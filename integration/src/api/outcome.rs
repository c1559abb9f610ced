//! [`InputOutcome`]: what the cache did for one input — the one spelling the per-input
//! report, the metrics label and the exact-repeat memo all use.

use attncache_plugin::Outcome;
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
