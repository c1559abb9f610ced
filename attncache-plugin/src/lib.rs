//! AttnCache for mistral.rs.
//!
//! mistral.rs 0.8.1, patched by `patches/mistralrs-core-0.8.1.patch`, offers every attention
//! call to one process-wide [`mistralrs_core::AttentionHook`]. This crate provides that hook:
//!
//! - [`exact_attention`]: exact prefill attention with GEMMs (faster than mistral.rs's CPU
//!   kernel, within 1e-5 of it), the path that can also record attention maps;
//! - [`layer_kernels`]: the layer's work outside attention that the hook takes over from
//!   mistral.rs in `fast` mode (the MLP's tanh-GELU gate, vectorised; the float linear
//!   projections, without repacking the weights on every call);
//! - [`hook`]: the [`AttnCacheHook`] itself, with the choice of [`ExactAttention`]
//!   (`fast` or mistral.rs's `stock` kernel) and counters of what it did;
//! - [`cache`], [`store`], [`entry`], [`config`]: the attention-map cache — exact token-id
//!   lookups over a hot tier in RAM (moka) and a [`cold_tier`]: checksummed files (mmap,
//!   [`disk_tier`]) or a Redis server shared by replicas ([`redis_tier`]);
//! - [`features`], [`projector`], [`index`]: input features (untrained baselines or the
//!   learned projector) and the per-length HNSW index that finds similar stored inputs;
//! - `forward_plan`: the per-forward decisions the hook follows from layer 0 to the last;
//! - [`stable_hash`]: the persisted hashes (store keys, model fingerprints), pinned;
//! - [`blend`] and `blend_forward`: blend reuse — a stored neighbour's per-layer K/V with only
//!   the deviating positions recomputed (`--reuse blend`).

pub mod access_trace;
pub mod blend;
mod blend_forward;
pub mod cache;
pub mod cold_tier;
pub mod config;
pub mod disk_tier;
pub mod entry;
pub mod error;
pub mod error_gate;
pub mod exact_attention;
pub mod f16_maps;
pub mod features;
mod forward_plan;
pub mod hook;
pub mod index;
pub mod layer_kernels;
pub mod projector;
pub mod redis_tier;
pub mod reuse;
pub mod stable_hash;
pub mod store;
pub mod tier_costs;
pub mod tier_sizing;

pub use blend::{BlendPolicy, ReuseKind};
pub use cache::{AttnCache, CacheCounts, Decision, HotTierSizing, Lookup, Outcome};
pub use config::{CacheConfig, RedisSettings};
pub use error::AttnCacheError;
pub use error_gate::{ErrorGate, GatePoint};
pub use features::{FeatureExtractor, FeatureKind};
pub use hook::{install, uninstall, AttnCacheHook, ExactAttention, HookCounts};
pub use reuse::ReusePolicy;
