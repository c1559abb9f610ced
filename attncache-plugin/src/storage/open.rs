//! [`MapStore::open`]: builds the cold tier a [`StoreConfig`] names (Redis, else a
//! directory, else none) and injects it into the store, so that the store itself knows only
//! the [`ColdTier`] seam.

use crate::storage::cold_tier::ColdTier;
use crate::storage::disk_tier::DiskTier;
use crate::storage::store::{MapStore, StoreConfig};

impl MapStore {
    /// Opens the store: its cold tier is the Redis server of `config.redis`, else the
    /// directory `config.cold_dir` (whose valid entries are indexed), else none.
    /// A Redis server that cannot be reached is not an error: the tier retries in the
    /// background and serves misses meanwhile.
    pub fn open(config: StoreConfig) -> std::io::Result<Self> {
        let cold: Option<Box<dyn ColdTier>> = match (&config.redis, &config.cold_dir) {
            (Some(redis), _) => Some(redis_tier(&config, redis)?),
            (None, Some(dir)) => Some(Box::new(DiskTier::open(
                dir,
                config.fingerprint,
                config.cold_bytes,
            )?)),
            (None, None) => None,
        };
        Self::with_cold_tier(config, cold)
    }
}

/// The Redis tier of `config`'s scope.
#[cfg(feature = "redis")]
fn redis_tier(
    config: &StoreConfig,
    redis: &crate::storage::redis_settings::RedisSettings,
) -> std::io::Result<Box<dyn ColdTier>> {
    Ok(Box::new(crate::storage::redis_tier::RedisTier::open(
        redis.clone(),
        &config.scope,
        config.fingerprint,
        config.cold_bytes,
    )?))
}

/// Without the `redis` feature there is no Redis tier: asking for one is an error.
#[cfg(not(feature = "redis"))]
fn redis_tier(
    _config: &StoreConfig,
    _redis: &crate::storage::redis_settings::RedisSettings,
) -> std::io::Result<Box<dyn ColdTier>> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "no Redis tier: this build lacks the `redis` cargo feature",
    ))
}
