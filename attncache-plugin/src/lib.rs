//! AttnCache for mistral.rs.
//!
//! mistral.rs 0.8.1, patched by the series in `patches/` (`patches/README.md`), offers every
//! attention call to one process-wide [`mistralrs_core::AttentionHook`]. This crate provides
//! that hook and the cache behind it. A request's way through it (`docs/architecture.md` has the
//! whole picture):
//!
//! 1. the server takes a [`RequestTicket`] from the [`AttnCache`] (`cache`): the request's
//!    flag and scope, and later its decision;
//! 2. at layer 0 the [`AttnCacheHook`] (`hook`) asks the cache for a lookup: exact token
//!    ids in the store, else a similar input through `lookup` (features or the learned
//!    projector, the HNSW index, the error gate);
//! 3. the hook follows the decision layer by layer: stored maps or blend states (`reuse`),
//!    else exact attention on our kernels (`kernels`) or mistral.rs's;
//! 4. a recorded miss goes to the store (`storage`: hot tier in RAM, cold tier on disk or
//!    in Redis), whose hot tier is sized from measured costs (`tiering`).
//!
//! Subsystems, each a folder whose module doc says what it owns and what it may call:
//!
//! - `hook`: the hook, the per-forward plan, the blend forward;
//! - [`kernels`]: exact attention, the MLP gate and linear projections, f16 maps;
//! - [`reuse`]: what a hit reuses (map policies, alignment, blend policy);
//! - [`lookup`]: features, projector, index, error gate;
//! - [`prefix`]: exact prefix reuse for decoders (per-layer K/V in blocks of token ids);
//! - [`storage`]: entry format, persisted hashes, store, cold tiers (disk; Redis with the
//!   cargo feature `redis`);
//! - [`tiering`]: tier costs, hot-tier sizing, access trace;
//! - `cache`: the [`AttnCache`] facade;
//! - `config`, `error`: the settings and the error type.

mod cache;
mod config;
mod error;
mod hook;
pub mod kernels;
pub mod lookup;
pub mod prefix;
pub mod reuse;
pub mod storage;
pub mod tiering;

pub use cache::{AttnCache, CacheCounts, Decision, HotTierSizing, Lookup, Outcome, RequestTicket};
pub use config::{CacheConfig, RedisSettings};
pub use error::AttnCacheError;
pub use hook::{
    install, uninstall, AttnCacheHook, BlendOutcome, DecoderBlendCounts, DecoderBlendPolicy,
    DecoderMapsCounts, DecoderMapsPolicy, ExactAttention, HookCounts, LabelRowsTicket, MapsOutcome,
    MapsTicket, PrefixTicket,
};
pub use lookup::{ErrorGate, FeatureExtractor, FeatureKind, GatePoint};
pub use reuse::{BlendPolicy, ReuseKind, ReusePolicy};
pub use storage::KvFormat;
