//! [`RedisBlocks`]: prefix blocks in a Redis server shared by replicas, so a prompt prefix
//! one replica computed is reused by the others and by replicas started later.
//!
//! Under `<prefix>:<store seed>:pfx` (`base`): `base:b:<key>` holds an encoded block
//! ([`super::block`]'s checked format), `base:lru` (sorted set: block → last use, ms),
//! `base:sizes` (hash: block → bytes) and `base:bytes` (total) keep the byte budget: a write
//! past it deletes the least recently used blocks in the same Lua script, so replicas never
//! race on it. No announcements: a block's key names its whole prefix, so a lookup asks for
//! it directly.
//!
//! As for the map entries' Redis tier: calls run on a dedicated Tokio runtime over an
//! auto-reconnecting connection; a failed or late call marks Redis down for a second,
//! during which reads are misses and writes are skipped, so Redis being down or slow costs
//! requests their reuse, never an answer.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::RedisResult;

use super::cold::{BlockTier, BlockTierError};
use crate::storage::redis_settings::{redacted_url, RedisSettings};
// a block is kept and forgotten as an entry is, without the announcement
use crate::storage::redis_tier::keys::{FORGET_SCRIPT, WRITE_QUIET_SCRIPT};
use crate::storage::redis_tier::{call_within, connect};

/// How long Redis stays marked down after a failed call.
const RETRY_AFTER: Duration = Duration::from_secs(1);

struct Inner {
    config: RedisSettings,
    conn: ConnectionManager,
    budget: u64,
    /// `base:b:`, `base:lru`, `base:sizes`, `base:bytes`.
    values: String,
    lru: String,
    sizes: String,
    total: String,
    started: Instant,
    down: AtomicBool,
    down_until_ms: AtomicU64,
    blocks: AtomicU64,
    bytes: AtomicU64,
}

/// Prefix blocks in Redis.
pub struct RedisBlocks {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl RedisBlocks {
    /// Connects lazily (an unreachable server is a warning and misses until it answers) to
    /// the server of `config`, for the store seeded `seed`, within `budget` bytes. Fails only
    /// for an invalid URL or when no runtime thread can be started.
    pub fn open(config: RedisSettings, seed: u64, budget: u64) -> std::io::Result<Self> {
        let (_, runtime, conn) = connect(&config, "attncache-prefix-redis")?;
        let base = format!("{}:{seed:016x}:pfx", config.prefix);
        tracing::info!(url = %redacted_url(&config.url), keys = %format!("{base}:*"),
            "prefix blocks in Redis, shared with other replicas");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                conn,
                budget,
                values: format!("{base}:b:"),
                lru: format!("{base}:lru"),
                sizes: format!("{base}:sizes"),
                total: format!("{base}:bytes"),
                started: Instant::now(),
                down: AtomicBool::new(false),
                down_until_ms: AtomicU64::new(0),
                blocks: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
            runtime: Some(runtime),
        })
    }

    /// Runs `call` on the runtime and waits up to `wait`; `None` when Redis is marked down
    /// (at once), failed or was late (then it is marked down).
    fn run<T, F>(&self, wait: Duration, call: F) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = RedisResult<T>> + Send + 'static,
    {
        let inner = &self.inner;
        let now = inner.started.elapsed().as_millis() as u64;
        if inner.down.load(Ordering::Relaxed) && now < inner.down_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        let why = match call_within(self.runtime.as_ref()?, wait, call) {
            Ok(value) => {
                if inner.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis reachable again (prefix blocks)");
                }
                return Some(value);
            }
            Err(why) => why,
        };
        let now = inner.started.elapsed().as_millis() as u64;
        inner
            .down_until_ms
            .store(now + RETRY_AFTER.as_millis() as u64, Ordering::Relaxed);
        if !inner.down.swap(true, Ordering::Relaxed) {
            tracing::warn!(url = %redacted_url(&inner.config.url),
                "Redis unavailable: prompts compute what its prefix blocks would have given \
                 (retrying every {} s): {why}", RETRY_AFTER.as_secs());
        }
        None
    }

    fn member(key: u64) -> String {
        format!("{key:016x}")
    }
}

impl Drop for RedisBlocks {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl BlockTier for RedisBlocks {
    fn kind(&self) -> &'static str {
        "redis"
    }

    /// Any replica may have stored it: always worth a read.
    fn contains(&self, _key: u64) -> bool {
        true
    }

    fn read(&self, key: u64) -> Result<Option<Vec<u8>>, BlockTierError> {
        let inner = self.inner.clone();
        let member = Self::member(key);
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // a block of SmolLM2-135M is 737 KB: allow its transfer at 100 MiB/s
        let wait = self.inner.config.timeout() + Duration::from_millis(10);
        self.run(wait, async move {
            let mut conn = inner.conn.clone();
            let value_key = format!("{}{member}", inner.values);
            let mut pipe = redis::pipe();
            if inner.config.ttl_secs > 0 {
                pipe.cmd("GETEX")
                    .arg(&value_key)
                    .arg("EX")
                    .arg(inner.config.ttl_secs);
            } else {
                pipe.cmd("GET").arg(&value_key);
            }
            pipe.cmd("ZADD")
                .arg(&inner.lru)
                .arg("XX")
                .arg(now_ms)
                .arg(&member)
                .ignore();
            let (value,): (Option<Vec<u8>>,) = pipe.query_async(&mut conn).await?;
            Ok(value)
        })
        .ok_or(BlockTierError::Unavailable)
    }

    fn write(&self, key: u64, bytes: &[u8]) -> Result<u64, BlockTierError> {
        let inner = self.inner.clone();
        let member = Self::member(key);
        let value = bytes.to_vec();
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let done = self.run(self.inner.config.timeout() * 10, async move {
            let mut conn = inner.conn.clone();
            let size = value.len() as u64;
            let mut pipe = redis::pipe();
            pipe.atomic();
            let set = pipe
                .cmd("SET")
                .arg(format!("{}{member}", inner.values))
                .arg(value);
            if inner.config.ttl_secs > 0 {
                set.arg("EX").arg(inner.config.ttl_secs);
            }
            set.ignore();
            pipe.cmd("EVAL")
                .arg(WRITE_QUIET_SCRIPT)
                .arg(3)
                .arg(&inner.lru)
                .arg(&inner.sizes)
                .arg(&inner.total)
                .arg(size)
                .arg(&member)
                .arg(now_ms)
                .arg(inner.budget)
                .arg(&inner.values);
            let ((evicted, total, count),): ((u64, u64, u64),) =
                pipe.query_async(&mut conn).await?;
            Ok((evicted, total, count))
        });
        let (evicted, total, count) = done.ok_or(BlockTierError::Unavailable)?;
        self.inner.bytes.store(total, Ordering::Relaxed);
        self.inner.blocks.store(count, Ordering::Relaxed);
        Ok(evicted)
    }

    fn remove(&self, key: u64) {
        let inner = self.inner.clone();
        let member = Self::member(key);
        self.run(self.inner.config.timeout(), async move {
            let mut conn = inner.conn.clone();
            redis::Script::new(FORGET_SCRIPT)
                .key(format!("{}{member}", inner.values))
                .key(&inner.lru)
                .key(&inner.sizes)
                .key(&inner.total)
                .arg(&member)
                .invoke_async::<i64>(&mut conn)
                .await
        });
    }

    fn place(&self, key: u64) -> String {
        format!("redis {}{}", self.inner.values, Self::member(key))
    }

    fn usage(&self) -> (u64, u64) {
        (
            self.inner.blocks.load(Ordering::Relaxed),
            self.inner.bytes.load(Ordering::Relaxed),
        )
    }
}
