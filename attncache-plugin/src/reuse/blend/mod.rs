//! Blend reuse (CacheBlend's idea on a bidirectional encoder): take a stored neighbour's
//! per-layer K/V and recompute only the positions that deviate.
//!
//! A blend entry ([`crate::storage::entry::BlendStates`]) keeps, for every token, each layer's K
//! (before RoPE) and V, the hidden states after the *check layer* and after the last layer.
//! For a new input whose neighbour is stored, the model runs every layer up to the check
//! layer exactly, on every position. There the hidden states are compared with the
//! neighbour's ([`deviations`]); the positions whose token differs and those whose state
//! deviates more than [`BlendPolicy::max_deviation`] form the set S ([`select`]). If S is no
//! larger than [`BlendPolicy::max_recompute_share`] of the input, the remaining layers run on
//! S's rows only: S's queries attend over the neighbour's K/V with S's fresh rows put in
//! ([`attend`], RoPE applied at the true positions, so a neighbour with an insertion is
//! re-rotated), and after the last layer S's states are put into the neighbour's final
//! states, which pooling then reads. Otherwise the hit is refused and the forward simply
//! continues exactly: a refusal costs no work.
//!
//! **Escalation.** With a resume layer ([`BlendPolicy::resume_layer`]) and an entry that kept
//! its states after that layer, a hit the rule above refuses is *escalated* instead: S is the
//! differing positions plus the largest deviations up to [`BlendPolicy::escalate_share`]
//! ([`escalation`]); the layers up to the resume layer run on S only, then S's rows are put
//! into the stored states after the resume layer and the remaining layers run on every
//! position. The positions outside S are stale only up to the resume layer, and the later
//! layers (two of EmbeddingGemma's global layers among them) correct them: faithful where the
//! fast rule could not tell, at a smaller saving.
//!
//! Files: `policy` (the settings), `selection` (S from the check layer's deviations),
//! `gain` (whether a hit pays), `gate` (the calibrated bound on what a hit leaves stale), `attention` (the tensor work of the layers after it).

mod attention;
mod gain;
mod gate;
mod policy;
mod selection;

#[cfg(test)]
pub(crate) use attention::rope_fn as test_rope;
pub use attention::{attend, final_states, put_rows, stored_kv};
pub use gain::predicted_gain;
pub use gate::{
    fit_bound, stale_deviation, CheckSignals, FidelityGate, GateBand, GateSignal, RuleBound,
};
pub use policy::{BlendPolicy, ReuseKind};
pub use selection::{
    deviations, escalation, moved_share, pooled_deviation, select, single_edit, Selection,
};
