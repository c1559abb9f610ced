//! The arithmetic the hook runs instead of mistral.rs's own kernels: exact prefill attention
//! with GEMMs (and the maps it can record), attention from stored maps, the MLP's tanh-GELU gate and the float linear
//! projections, and f32 ↔ f16 conversion of maps.
//!
//! Owns: no state. May call: candle only (a leaf: nothing else in the crate).

pub mod causal_attention;
pub mod exact_attention;
pub mod f16_maps;
pub mod layer_kernels;
pub(crate) mod softmax_rows;
pub mod stored_maps;
