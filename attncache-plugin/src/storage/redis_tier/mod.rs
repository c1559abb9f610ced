//! [`RedisTier`]: a cold tier in a Redis server, shared by every replica of a deployment.
//!
//! What lives in Redis, under `<prefix>:<model fingerprint>:<scope>` (`base` below):
//!
//! - `base:e:<len>:<key>`: an entry, in the same header/checksum format as a disk file
//!   ([`crate::storage::entry::encode`]); a replica checks it like a file, so a corrupt or foreign
//!   value is a miss plus a warning, and is deleted;
//! - `base:lru` (sorted set: member → last use, ms), `base:sizes` (hash: member → bytes) and
//!   `base:bytes` (total): the byte budget. A write past it deletes the least recently used
//!   entries, in the same Lua script as the write, so replicas never race on the budget;
//! - `base:stream`: one message per stored entry with its header, tokens and feature (not
//!   its maps), capped at `stream_len` messages. Every replica follows it and indexes what
//!   the others stored, so their entries become hits here within one stream read.
//!
//! Each replica keeps its own hot tier (moka) and similarity index; only the bytes are
//! shared. Calls run on a dedicated Tokio runtime, over a multiplexed, auto-reconnecting
//! [`redis::aio::ConnectionManager`] (the stream has its own connection, since a blocking
//! `XREAD` would hold up every other command). A request thread waits at most `timeout` for
//! a read; a failed or late call marks Redis down for [`RETRY_AFTER`], during which the tier
//! serves misses at once and skips writes (counted in its [`SharedHealth`]), so Redis being down or
//! slow costs requests nothing but their hits.

use parking_lot::Mutex;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use redis::aio::ConnectionManager;
use redis::{Client, RedisResult};

use crate::storage::cold_tier::{
    decode_checked, ColdTier, ReadProbe, SharedHealth, TierError, Written,
};
use crate::storage::entry::Indexed;
use crate::storage::entry::{self, Entry};
pub use crate::storage::redis_settings::{redacted_url, RedisSettings};

mod breaker;
pub(crate) mod keys;
mod stream;

use keys::{Keys, FORGET_SCRIPT, WRITE_SCRIPT};
use stream::follow_stream;

/// How long Redis stays marked down after a failed call before the next call tries again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Transfer rate a read of a large entry is allowed on top of the timeout (loopback
/// measured 160–660 MB/s for 9–38 MB entries on 2 cores, `attncache-scale-out`).
const READ_FLOOR_BYTES_PER_SEC: u64 = 100 << 20;

/// How long a request waits for reading an entry of `bytes`: the timeout plus the time
/// the bytes take at [`READ_FLOOR_BYTES_PER_SEC`], so a large entry that is merely large
/// does not count as Redis being slow.
fn read_wait(timeout: Duration, bytes: u64) -> Duration {
    timeout + Duration::from_millis(bytes.saturating_mul(1000) / READ_FLOOR_BYTES_PER_SEC)
}

/// A client for `config`'s server, the dedicated one-thread runtime (`thread_name`) its
/// calls run on, and a multiplexed, auto-reconnecting connection made lazily (an
/// unreachable server is not an error). Fails for an invalid URL, or when no runtime thread
/// can be started.
pub(crate) fn connect(
    config: &RedisSettings,
    thread_name: &str,
) -> std::io::Result<(Client, tokio::runtime::Runtime, ConnectionManager)> {
    let bad_url = |e: redis::RedisError| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("redis url {}: {e}", redacted_url(&config.url)),
        )
    };
    let client = Client::open(config.url.as_str()).map_err(bad_url)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(thread_name)
        .enable_all()
        .build()?;
    let manager_config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.timeout()))
        // each call has its own deadline (`call_within`); this only ends a connection that hangs
        .set_response_timeout(Some(Duration::from_secs(60)))
        .set_number_of_retries(1);
    let conn = {
        let _in_runtime = runtime.enter();
        ConnectionManager::new_lazy_with_config(client.clone(), manager_config).map_err(bad_url)?
    };
    Ok((client, runtime, conn))
}

/// Runs `call` on `runtime` and waits up to `wait` for its answer; `Err(why)` when it
/// failed or did not answer in time.
pub(crate) fn call_within<T, F>(
    runtime: &tokio::runtime::Runtime,
    wait: Duration,
    call: F,
) -> Result<T, String>
where
    T: Send + 'static,
    F: Future<Output = RedisResult<T>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let _ = tx.send(tokio::time::timeout(wait, call).await);
    });
    match rx.recv_timeout(wait + Duration::from_millis(20)) {
        Ok(Ok(Ok(value))) => Ok(value),
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(_)) | Err(_) => Err(format!("no answer within {} ms", wait.as_millis())),
    }
}

/// Tiers opened by this process (part of each one's origin id).
static TIERS_OPENED: AtomicU64 = AtomicU64::new(0);

/// The tier's own counters (see [`SharedHealth`]).
#[derive(Default)]
struct Health {
    errors: AtomicU64,
    skipped: AtomicU64,
    down: AtomicBool,
    announced: AtomicU64,
}

/// State shared by request threads, the writer and the stream follower.
struct Inner {
    config: RedisSettings,
    /// The scope's name in the keys (`global`, `scope-<name>`).
    scope: String,
    fingerprint: u64,
    budget: u64,
    keys: Keys,
    /// This process's id in announcements (its own are not indexed twice).
    origin: String,
    client: Client,
    conn: ConnectionManager,
    forget_script: redis::Script,
    /// The tier's health: failed and skipped calls, down or not, announcements.
    health: Health,
    /// Entries known to be in Redis (announced or written here), with their length and
    /// encoded bytes: only those are read, so a miss costs no round trip.
    known: DashMap<u64, (usize, u64)>,
    announced: Mutex<Vec<Indexed>>,
    started: Instant,
    down_until_ms: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    stop: AtomicBool,
}

/// The Redis-backed cold tier of one scope.
pub struct RedisTier {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl RedisTier {
    /// Connects (lazily: an unreachable server is not an error, the tier is down until it
    /// answers) and starts following the scope's announcement stream from its start.
    /// Fails only for an invalid URL or when no runtime thread can be started.
    pub fn open(
        config: RedisSettings,
        scope: &str,
        fingerprint: u64,
        budget: u64,
    ) -> std::io::Result<Self> {
        let (client, runtime, conn) = connect(&config, "attncache-redis")?;
        let origin = format!(
            "{:x}-{:x}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
                ^ u128::from(TIERS_OPENED.fetch_add(1, Ordering::Relaxed))
        );
        let inner = Arc::new(Inner {
            keys: Keys::new(&config.prefix, fingerprint, scope),
            config,
            scope: scope.to_string(),
            fingerprint,
            budget,
            origin,
            client,
            conn,
            forget_script: redis::Script::new(FORGET_SCRIPT),
            health: Health::default(),
            known: DashMap::new(),
            announced: Mutex::new(Vec::new()),
            started: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        runtime.spawn(follow_stream(inner.clone()));
        tracing::info!(
            url = %redacted_url(&inner.config.url),
            stream = %inner.keys.stream,
            "cold tier in Redis, shared with other replicas"
        );
        Ok(Self {
            inner,
            runtime: Some(runtime),
        })
    }

    /// Runs `call` on the tier's runtime and waits up to `wait` for it. `None` when Redis
    /// is marked down (at once), failed or did not answer in time (then it is marked down).
    fn run<T, F>(&self, wait: Duration, call: F) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = RedisResult<T>> + Send + 'static,
    {
        let inner = &self.inner;
        if inner.is_down() {
            inner.health.skipped.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match call_within(self.runtime.as_ref()?, wait, call) {
            Ok(value) => {
                inner.mark_up();
                Some(value)
            }
            Err(why) => {
                inner.mark_down(&why);
                None
            }
        }
    }

    fn forget(&self, key: u64, len: usize) {
        self.inner.known.remove(&key);
        let inner = self.inner.clone();
        let member = Keys::member(key, len);
        self.run(self.inner.config.timeout(), async move {
            let mut conn = inner.conn.clone();
            inner
                .forget_script
                .key(inner.keys.value(&member))
                .key(&inner.keys.lru)
                .key(&inner.keys.sizes)
                .key(&inner.keys.total)
                .arg(&member)
                .invoke_async::<i64>(&mut conn)
                .await
        });
    }
}

impl Drop for RedisTier {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl ColdTier for RedisTier {
    fn kind(&self) -> &'static str {
        "redis"
    }

    fn take_scanned(&self) -> (Vec<Indexed>, Vec<TierError>) {
        // the stream, followed from its start, announces what Redis holds
        (Vec::new(), Vec::new())
    }

    fn take_announced(&self) -> Vec<Indexed> {
        std::mem::take(&mut *self.inner.announced.lock())
    }

    fn read(&self, key: u64, len: usize) -> Result<Option<Entry>, TierError> {
        let bytes = match self.inner.known.get(&key).map(|k| *k) {
            Some((l, bytes)) if l == len => bytes,
            _ => return Ok(None),
        };
        let inner = self.inner.clone();
        let member = Keys::member(key, len);
        let value_key = inner.keys.value(&member);
        let place = value_key.clone();
        let bytes: Option<Vec<u8>> = self
            .run(read_wait(inner.config.timeout(), bytes), async move {
                let mut conn = inner.conn.clone();
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
                    .arg(&inner.keys.lru)
                    .arg("XX")
                    .arg(inner.now_ms())
                    .arg(&member)
                    .ignore();
                let (value,): (Option<Vec<u8>>,) = pipe.query_async(&mut conn).await?;
                Ok(value)
            })
            .ok_or(TierError::Unavailable { writing: false })?;
        let Some(bytes) = bytes else {
            // evicted by the budget (another replica's write) or expired
            self.forget(key, len);
            return Ok(None);
        };
        let why = match decode_checked(&bytes, self.inner.fingerprint, key) {
            Ok(e) if e.len() == len => return Ok(Some(e)),
            Ok(_) => "length differs from its key".to_string(),
            Err(why) => why,
        };
        self.forget(key, len);
        Err(TierError::Corrupt { place, why })
    }

    fn time_reads(
        &self,
        bytes: &[u8],
        reps: usize,
        then: &mut ReadProbe<'_>,
    ) -> Result<Vec<f64>, String> {
        let inner = self.inner.clone();
        let probe = format!("{}{}", inner.keys.probe, inner.origin);
        let down = || {
            format!(
                "Redis at {} did not answer",
                redacted_url(&inner.config.url)
            )
        };
        let value = bytes.to_vec();
        let key = probe.clone();
        // expires by itself if this process dies before removing it
        self.run(
            read_wait(inner.config.timeout() * 10, bytes.len() as u64),
            {
                let inner = inner.clone();
                async move {
                    let mut conn = inner.conn.clone();
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(value)
                        .arg("EX")
                        .arg(300)
                        .query_async::<()>(&mut conn)
                        .await
                }
            },
        )
        .ok_or_else(down)?;
        let mut times = Vec::with_capacity(reps.max(1));
        let mut result = Ok(());
        for _ in 0..reps.max(1) {
            let started = Instant::now();
            let key = probe.clone();
            let conn_inner = inner.clone();
            // a read as `read` makes it: one GET (and the LRU touch) in a pipeline
            let read = self.run(
                read_wait(inner.config.timeout(), bytes.len() as u64),
                async move {
                    let mut conn = conn_inner.conn.clone();
                    let mut pipe = redis::pipe();
                    pipe.cmd("GET").arg(&key);
                    pipe.cmd("ZADD")
                        .arg(&conn_inner.keys.lru)
                        .arg("XX")
                        .arg(0)
                        .arg(&key)
                        .ignore();
                    let (value,): (Option<Vec<u8>>,) = pipe.query_async(&mut conn).await?;
                    Ok(value)
                },
            );
            match read {
                Some(Some(v)) => {
                    if let Err(e) = then(&v) {
                        result = Err(e);
                        break;
                    }
                    times.push(started.elapsed().as_nanos() as f64);
                }
                Some(None) => {
                    result = Err("the read probe vanished from Redis".to_string());
                    break;
                }
                None => {
                    result = Err(down());
                    break;
                }
            }
        }
        let remove = inner.clone();
        self.run(inner.config.timeout(), async move {
            let mut conn = remove.conn.clone();
            redis::cmd("DEL")
                .arg(&probe)
                .query_async::<i64>(&mut conn)
                .await
        });
        result.map(|()| times)
    }

    fn write(&self, key: u64, entry: &Entry) -> Result<Written, TierError> {
        let len = entry.len();
        let bytes =
            entry::encode(entry, self.inner.fingerprint).map_err(|e| TierError::WriteFailed {
                place: self.inner.keys.value(&Keys::member(key, len)),
                why: e.to_string(),
            })?;
        let entry_bytes = bytes.len() as u64;
        let prefix_len = entry::read_header(&bytes, self.inner.fingerprint)
            .map_or(bytes.len(), |h| h.prefix_bytes());
        let inner = self.inner.clone();
        let member = Keys::member(key, len);
        let wait = read_wait(inner.config.timeout() * 10, entry_bytes);
        let stored = self.run(wait, async move {
            let mut conn = inner.conn.clone();
            let prefix = &bytes[..prefix_len];
            let value_key = inner.keys.value(&member);
            let mut pipe = redis::pipe();
            pipe.atomic();
            let set = pipe.cmd("SET").arg(&value_key).arg(&bytes[..]);
            if inner.config.ttl_secs > 0 {
                set.arg("EX").arg(inner.config.ttl_secs);
            }
            set.ignore();
            pipe.cmd("EVAL")
                .arg(WRITE_SCRIPT)
                .arg(4)
                .arg(&inner.keys.lru)
                .arg(&inner.keys.sizes)
                .arg(&inner.keys.total)
                .arg(&inner.keys.stream)
                .arg(entry_bytes)
                .arg(&member)
                .arg(inner.now_ms())
                .arg(inner.budget)
                .arg(&inner.origin)
                .arg(prefix)
                .arg(inner.config.stream_len)
                .arg(&inner.keys.entries);
            let ((evicted, total, count),): ((u64, u64, u64),) =
                pipe.query_async(&mut conn).await?;
            Ok((evicted, total, count))
        });
        let (evicted, total, count) = stored.ok_or(TierError::Unavailable { writing: true })?;
        self.inner.known.insert(key, (len, entry_bytes));
        self.inner.bytes.store(total, Ordering::Relaxed);
        self.inner.entries.store(count, Ordering::Relaxed);
        Ok(Written { evicted })
    }

    fn legacy_entries(&self, legacy: u64) -> Option<u64> {
        // counted in the background, outside the circuit breaker: a start never waits for
        // Redis, and a Redis that is down says nothing here. The tier logs what it finds.
        let runtime = self.runtime.as_ref()?;
        let inner = self.inner.clone();
        let base = format!("{}:{legacy:016x}:{}:", inner.config.prefix, inner.scope);
        let lru = Keys::new(&inner.config.prefix, legacy, &inner.scope).lru;
        runtime.spawn(async move {
            let mut conn = inner.conn.clone();
            let mut zcard = redis::cmd("ZCARD");
            zcard.arg(&lru);
            let count = zcard.query_async::<u64>(&mut conn);
            if let Ok(Ok(entries)) = tokio::time::timeout(inner.config.timeout() * 10, count).await
            {
                if entries > 0 {
                    tracing::warn!(
                        entries,
                        "Redis entries filed under the key scheme of earlier builds are not \
                         used (misses; they are left in place: delete the keys `{base}*` to \
                         reclaim the space, or let their TTL or the byte budget of the \
                         replicas still using them expire them)"
                    );
                }
            }
        });
        None
    }

    fn shared_health(&self) -> Option<SharedHealth> {
        let h = &self.inner.health;
        Some(SharedHealth {
            errors: h.errors.load(Ordering::Relaxed),
            skipped: h.skipped.load(Ordering::Relaxed),
            down: h.down.load(Ordering::Relaxed),
            announced: h.announced.load(Ordering::Relaxed),
        })
    }

    fn usage(&self) -> (u64, u64) {
        (
            self.inner.entries.load(Ordering::Relaxed),
            self.inner.bytes.load(Ordering::Relaxed),
        )
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_read_may_take_its_transfer_time() {
        let t = Duration::from_millis(200);
        assert_eq!(read_wait(t, 0), t);
        // 100 MiB take one more second
        assert_eq!(read_wait(t, 100 << 20), t + Duration::from_secs(1));
        assert!(read_wait(t, 38 << 20) > Duration::from_millis(550));
    }
}
