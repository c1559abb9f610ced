//! [`MapStore::open`]: builds the cold tier a [`StoreConfig`] names (Redis, else a
//! directory, else none) and injects it into the store, so that the store itself knows only
//! the [`ColdTier`] seam.

use std::sync::Arc;

use crate::storage::cold_tier::{ColdTier, StoreStats};
use crate::storage::disk_tier::DiskTier;
use crate::storage::redis_tier::RedisTier;
use crate::storage::store::{MapStore, StoreConfig};

impl MapStore {
    /// Opens the store: its cold tier is the Redis server of `config.redis`, else the
    /// directory `config.cold_dir` (whose valid entries are indexed), else none.
    /// A Redis server that cannot be reached is not an error: the tier retries in the
    /// background and serves misses meanwhile.
    pub fn open(config: StoreConfig) -> std::io::Result<Self> {
        let stats = Arc::new(StoreStats::default());
        let cold: Option<Box<dyn ColdTier>> = match (&config.redis, &config.cold_dir) {
            (Some(redis), _) => Some(Box::new(RedisTier::open(
                redis.clone(),
                config.fingerprint,
                config.cold_bytes,
                stats.clone(),
            )?)),
            (None, Some(dir)) => Some(Box::new(DiskTier::open(
                dir,
                config.fingerprint,
                config.cold_bytes,
                stats.clone(),
            )?)),
            (None, None) => None,
        };
        Self::with_cold_tier(config, cold, stats)
    }
}
