//! Where entries live: the entry format (header, checksum, maps or blend states), the
//! persisted hashes, the store (a moka hot tier over an optional cold tier) and the cold
//! tiers behind one seam: checksummed files on disk, or a Redis server shared by replicas.
//!
//! Owns: the entries and the tiers' counters ([`StoreStats`]). Files: `entry` (format and
//! identity; a blend entry's K/V encoding, f16 or int8, in `layer_kv`) ← `cold_tier` (the
//! seam: the trait, the counters, checked decoding) ←
//! `disk_tier`, `redis_tier` (the tiers; Redis only with the `redis` cargo feature, its
//! settings `redis_settings` always) and `store` (hot tier + writer, given its cold tier);
//! `open` builds the cold tier the configuration names and injects it. May call:
//! `kernels::f16_maps`. Tier sizing watches the store's accesses through
//! [`store::AccessObserver`]; the store does not know it.

pub mod cold_tier;
pub mod disk_tier;
pub mod entry;
pub mod layer_kv;
mod open;
pub mod redis_settings;
#[cfg(feature = "redis")]
pub(crate) mod redis_tier;
pub mod stable_hash;
pub mod store;

pub use cold_tier::{SharedHealth, StoreStats, TierError};
pub use entry::{AttentionMaps, Entry, Indexed, Payload};
pub use layer_kv::{KvFormat, LayerKv};
pub use stable_hash::token_key;
pub use store::{AccessObserver, MapStore, StoreConfig};
