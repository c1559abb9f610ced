//! What a hit reuses from a stored neighbour: the stored attention maps ([`ReusePolicy`]:
//! which layers and heads, which rows recomputed; token alignment in [`align`]) or, for
//! `--reuse blend`, its per-layer K/V with the deviating positions recomputed
//! ([`BlendPolicy`]: the selection, and the row arithmetic of the blend forward); the
//! content alignment of an input across several stored inputs ([`spans`]).
//!
//! Owns: the policies (plain settings). May call: `kernels` only.

pub(crate) mod blend;
pub(crate) mod maps;
pub mod spans;

pub use blend::{
    fit_bound, predicted_gain, BlendPolicy, CheckSignals, FidelityGate, GateBand, GateSignal,
    ReuseKind, RuleBound,
};
pub use maps::{align, ReusePolicy};
