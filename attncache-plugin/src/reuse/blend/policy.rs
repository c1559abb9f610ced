//! The blend policy: what the cache reuses on a hit ([`ReuseKind`]) and how a blend hit
//! chooses the positions it recomputes ([`BlendPolicy`], its settings and their checks).

use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;
use crate::storage::layer_kv::KvFormat;

/// What the cache reuses on a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReuseKind {
    /// Attention maps (AttnCache): a hit skips q/k, QKᵀ and softmax in reused layers.
    #[default]
    Maps,
    /// Per-layer K/V and hidden states: a hit recomputes only the positions that deviate.
    Blend,
}

impl std::str::FromStr for ReuseKind {
    type Err = AttnCacheError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "maps" => Ok(Self::Maps),
            "blend" => Ok(Self::Blend),
            other => Err(AttnCacheError::InvalidSetting {
                name: "reuse",
                value: other.to_string(),
                expected: "maps or blend",
            }),
        }
    }
}

impl std::fmt::Display for ReuseKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Maps => "maps",
            Self::Blend => "blend",
        })
    }
}

/// The default [`BlendPolicy::min_gain`]: under the smallest gain predicted for any held-out
/// hit of `make blend-eval` (1.58x, the escalated spam pairs at 256 tokens, commit d3ef4ce),
/// above what blend hits on short inputs paid (1.23x served on 17–35-token reviews with one
/// word swapped). With [`DEFAULT_FIXED_TOKENS`] on EmbeddingGemma it refuses the fast rule's
/// hits on inputs under ~45 tokens and escalated hits under ~100.
pub const DEFAULT_MIN_GAIN: f32 = 1.5;
/// The default [`BlendPolicy::fixed_tokens`], measured for EmbeddingGemma-300M on 2 cores
/// (AMD EPYC): exact forwards of 8–92 tokens (`attncache-latency --words 5,10,20,40,80,160,320
/// --rounds 5`, medians, commit bfa6ba4) fit 38.5 ms + 1.232 ms a token, 31 tokens' worth.
pub const DEFAULT_FIXED_TOKENS: f32 = 31.0;

/// How a blend hit chooses the positions it recomputes, and when it is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BlendPolicy {
    /// The layer after which S is chosen (layers up to it run on every position).
    pub check_layer: usize,
    /// Largest relative deviation `‖h − h_stored‖ / ‖h_stored‖` of a position's state after
    /// the check layer that may be left outside S.
    pub max_deviation: f32,
    /// Largest share of the input's positions S may hold; a hit that needs more is refused.
    pub max_recompute_share: f32,
    /// Smallest share of the positions S holds when the input's states moved at all: the
    /// positions of largest deviation are added up to it (CacheBlend's fixed ratio, scaled
    /// down by [`BlendPolicy::dilution`] when only part of the input moved; 1.0 recomputes
    /// every position, the exact output, whatever the dilution).
    pub min_recompute_share: f32,
    /// Stored inputs up to this many tokens longer or shorter are candidates (aligned).
    pub length_slack: usize,
    /// Largest deviation of the input as a whole after the check layer that a hit may take
    /// (default 2.0, the largest `1 − cos` can be: no bound; see `--blend-max-pooled-deviation`):
    /// `1 − cos` between the mean of its positions' RMS-normalised states and the stored
    /// input's ([`pooled_deviation`]). Over it the hit is refused before any layer is
    /// skipped. The per-position deviation says which positions to recompute but not
    /// whether the stored final states of the others are still close: in an independent
    /// NumPy EmbeddingGemma on 40 SpamAssassin pairs the per-position deviation ranked a
    /// blend hit's final error with Spearman 0.27, the pooled deviation with 0.77. Not yet
    /// calibrated for the served path (in `make blend-eval` bounds of 3e-6 to 1.2e-5 accepted
    /// 0–5% of the pairs, far fewer than in NumPy), hence no bound by default.
    pub max_pooled_deviation: f32,
    /// How a recorded blend entry keeps its K/V (`--blend-kv`): f16, or int8 with a scale per
    /// token, layer and head (39% fewer bytes on EmbeddingGemma). Entries of either format are
    /// read whatever this says.
    pub kv_format: KvFormat,
    /// The layer after which an escalated hit runs every position again (`None`: no
    /// escalation, a hit the fast rule refuses is computed exactly). Recorded entries keep
    /// their states after this layer (4 bytes per token and hidden unit more).
    pub resume_layer: Option<usize>,
    /// Share of the positions an escalated hit recomputes up to the resume layer (the
    /// differing positions, then the largest check-layer deviations).
    pub escalate_share: f32,
    /// How the fast rule's bounds follow the share `w` of the input whose states moved at
    /// the check layer (a differing token, or a deviation above 0). An edit to a long input
    /// moves only the positions within the sliding window of it (exactly 0 elsewhere: 528 of
    /// 1024 on EmbeddingGemma for a 16-token edit), and pooling averages the stale positions'
    /// error over the whole input, so with `w < 1` the per-position bound is
    /// `max_deviation / w^dilution` and the smallest share `min_recompute_share · w^dilution`
    /// of the input. 0: the bounds ignore `w`; every input that moved everywhere (`w = 1`,
    /// such as the calibration pairs at 256 tokens) is treated the same whatever this is. Nor
    /// is an input aligned with a shift (an insertion or deletion: the relative positions
    /// across it change in every global layer, unseen by the sliding check layer).
    /// The default 3 is `make blend-eval`'s choice (the fastest of 0–3 whose calibration
    /// documents at 512–2048 tokens kept the fidelity targets; held out, 1024-token documents
    /// recomputed 8% at fidelity ≥ 0.999).
    pub dilution: f32,
    /// Inputs of at least this many tokens, alone in their batch, look up their neighbour
    /// (and read its entry, from the cold tier if need be) on a thread of their own while
    /// layer 0 runs, and wait for it at the check layer; `None` (the default): every lookup
    /// comes before layer 0. A blend entry is large (EmbeddingGemma: 34 KB a token, 69 MB
    /// at 2048 tokens, ~135 ms from Redis on loopback) and layer 0 of a long input takes
    /// longer than reading it, but on 2 cores the thread competes with layer 0: measured
    /// (blend-eval `--overlap-reps`), 1.06x / 1.08x per Redis hit at 1024 / 2048 tokens,
    /// 0.94–1.04x from disk, 0.95x at 256–512 tokens from RAM.
    pub lookup_overlap_from: Option<usize>,
    /// The smallest predicted speed-up a hit must have ([`super::predicted_gain`]): one
    /// predicted under it is refused at the check layer and computed exactly. 0 or 1: every
    /// hit the rules accept is taken.
    pub min_gain: f32,
    /// What a layer costs however few rows it runs on, in tokens (the cost model of
    /// [`super::predicted_gain`]): the intercept over the slope of exact forward time against
    /// input length, measured on the serving machine and model.
    pub fixed_tokens: f32,
    /// The calibrated fidelity gate (`--blend-gate`): a rule's hit is taken only when its
    /// check-layer signal is within the bound fitted for its length band and rule
    /// ([`super::FidelityGate`]); `None`: every hit the rules accept is taken.
    pub gate: Option<super::FidelityGate>,
}

/// The defaults are the policy `make blend-eval` chose on EmbeddingGemma-300M (calibration
/// half of 40 real SpamAssassin near-duplicate pairs at 256 tokens; the fastest of its sweep
/// whose calibration hits kept fidelity mean ≥ 0.997 and min ≥ 0.99: escalation after layer 11
/// with 10% of the positions; held out: every pair a hit, half of them escalated, fidelity
/// mean 0.9977 / min 0.9936, `benches/results/blend.md`), and the dilution its second stage
/// chose on long documents. A model with fewer than 13 layers never escalates (no layer 11
/// before its last).
impl Default for BlendPolicy {
    fn default() -> Self {
        Self {
            check_layer: 0,
            max_deviation: 0.005,
            max_recompute_share: 0.5,
            min_recompute_share: 0.4,
            length_slack: 8,
            max_pooled_deviation: 2.0,
            kv_format: KvFormat::F16,
            resume_layer: Some(11),
            escalate_share: 0.1,
            dilution: 3.0,
            lookup_overlap_from: None,
            min_gain: DEFAULT_MIN_GAIN,
            fixed_tokens: DEFAULT_FIXED_TOKENS,
            gate: None,
        }
    }
}

impl BlendPolicy {
    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> std::result::Result<(), AttnCacheError> {
        let bad = |name, value: String, expected| {
            Err(AttnCacheError::InvalidSetting {
                name,
                value,
                expected,
            })
        };
        if !(self.max_deviation.is_finite() && self.max_deviation >= 0.0) {
            return bad(
                "blend.max_deviation",
                self.max_deviation.to_string(),
                "a deviation of 0 or more",
            );
        }
        if !(self.max_recompute_share > 0.0 && self.max_recompute_share <= 1.0) {
            return bad(
                "blend.max_recompute_share",
                self.max_recompute_share.to_string(),
                "a share in (0, 1]",
            );
        }
        if self.max_pooled_deviation.is_nan() || self.max_pooled_deviation < 0.0 {
            return bad(
                "blend.max_pooled_deviation",
                self.max_pooled_deviation.to_string(),
                "a deviation of 0 or more",
            );
        }
        if !(self.escalate_share > 0.0 && self.escalate_share <= 1.0) {
            return bad(
                "blend.escalate_share",
                self.escalate_share.to_string(),
                "a share in (0, 1]",
            );
        }
        if !(self.dilution.is_finite() && self.dilution >= 0.0) {
            return bad(
                "blend.dilution",
                self.dilution.to_string(),
                "an exponent of 0 or more",
            );
        }
        if !(self.min_gain.is_finite() && self.min_gain >= 0.0) {
            return bad(
                "blend.min_gain",
                self.min_gain.to_string(),
                "a speed-up of 0 or more",
            );
        }
        if !(self.fixed_tokens.is_finite() && self.fixed_tokens >= 0.0) {
            return bad(
                "blend.fixed_tokens",
                self.fixed_tokens.to_string(),
                "a number of tokens, 0 or more",
            );
        }
        if let Some(gate) = &self.gate {
            gate.validate()?;
        }
        if let Some(r) = self.resume_layer.filter(|r| *r <= self.check_layer) {
            return bad(
                "blend.resume_layer",
                r.to_string(),
                "a layer after the check layer",
            );
        }
        if !(0.0..=self.max_recompute_share).contains(&self.min_recompute_share) {
            return bad(
                "blend.min_recompute_share",
                self.min_recompute_share.to_string(),
                "a share in [0, max_recompute_share]",
            );
        }
        Ok(())
    }
}
