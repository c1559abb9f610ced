//! The map store: a hot tier in RAM (moka, bounded in bytes) over an optional cold tier
//! ([`crate::storage::cold_tier::ColdTier`]: files on disk by default, or a Redis server shared by
//! replicas), both keyed by the input's token ids.
//!
//! - `get` looks in the hot tier, then the cold tier (a cold hit is promoted to hot);
//! - `insert` puts an entry in the hot tier and hands it to a background writer, which
//!   writes it to the cold tier; the request that recorded the entry never waits for the
//!   cold tier (when the writer's queue is full the cold copy is skipped and counted);
//!   `flush` waits for queued writes, and dropping the store drains them;
//! - `open` indexes what the cold tier already holds, so entries survive a restart;
//! - a truncated, corrupt or foreign entry is a miss plus one warning, and is removed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use crate::storage::cold_tier::ColdTier;
use crate::storage::entry::Entry;
use crate::storage::redis_settings::RedisSettings;

pub use crate::storage::cold_tier::{SharedHealth, StoreStats};
pub use crate::storage::entry::Indexed;
pub use crate::storage::stable_hash::token_key;

/// Sizes and place of the two tiers.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Hot tier budget in bytes (entries are weighed by their map bytes).
    pub hot_bytes: u64,
    /// Cold tier directory; `None` keeps the cache in RAM only (unless `redis` is set).
    pub cold_dir: Option<PathBuf>,
    /// Cold tier budget in bytes (with `redis`: of this scope's shared entries).
    pub cold_bytes: u64,
    /// Keep the cold tier in this Redis server, shared with other replicas, instead of
    /// `cold_dir`.
    pub redis: Option<RedisSettings>,
    /// The store's scope as a shared tier names it in its keys (`global`, or
    /// `scope-<name>`): replicas share the entries of equal scopes only.
    pub scope: String,
    /// Fingerprint of the model; entries of other models are never used.
    pub fingerprint: u64,
}

/// Entries waiting for the background cold-tier writer, at most.
const WRITE_QUEUE: usize = 16;

/// Hot + cold attention-map store.
pub struct MapStore {
    core: Arc<StoreCore>,
    writer: Option<ColdWriter>,
    /// The cold tier's entries found when it opened, until the index takes them.
    scanned: parking_lot::Mutex<Vec<Indexed>>,
}

/// The hot tier: a moka cache weighed by map bytes, and its budget.
#[derive(Clone)]
struct HotTier {
    cache: moka::sync::Cache<u64, Arc<Entry>>,
    capacity: u64,
}

impl HotTier {
    fn new(bytes: u64, stats: &Arc<StoreStats>, recency: &Arc<DashMap<u64, u64>>) -> Self {
        let (stats, recency) = (stats.clone(), recency.clone());
        let cache = moka::sync::Cache::builder()
            .max_capacity(bytes)
            .weigher(|_k: &u64, e: &Arc<Entry>| u32::try_from(e.bytes()).unwrap_or(u32::MAX))
            .eviction_listener(move |k: Arc<u64>, _v, cause| {
                if cause != moka::notification::RemovalCause::Replaced {
                    recency.remove(&*k);
                }
                if cause == moka::notification::RemovalCause::Size {
                    stats.hot_evictions.fetch_add(1, Ordering::Relaxed);
                }
            })
            .build();
        Self {
            cache,
            capacity: bytes,
        }
    }
}

/// Queued cold-tier writes and the thread that performs them.
struct ColdWriter {
    queue: Option<std::sync::mpsc::SyncSender<Arc<Entry>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pending: Arc<(parking_lot::Mutex<usize>, parking_lot::Condvar)>,
}

/// The store's state, shared with the writer thread.
struct StoreCore {
    config: StoreConfig,
    /// The hot tier; replaced (under the write lock) when it is resized.
    hot: parking_lot::RwLock<HotTier>,
    /// When each hot entry was last used (clock ticks), to keep the most recent on a shrink.
    hot_recency: Arc<DashMap<u64, u64>>,
    cold: Option<Box<dyn ColdTier>>,
    clock: AtomicU64,
    stats: Arc<StoreStats>,
    /// Told of every entry access (inserts and hits), e.g. tier sizing's reuse sampler.
    observer: std::sync::OnceLock<Arc<dyn AccessObserver>>,
}

/// Told of every access to a store's entries (inserts and hits), by key and size: how tier
/// sizing samples reuse distances without the store depending on it.
pub trait AccessObserver: Send + Sync + std::fmt::Debug {
    /// Entry `key` of `bytes` bytes was inserted or hit.
    fn accessed(&self, key: u64, bytes: u64);
}

impl std::fmt::Debug for MapStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapStore")
            .field("config", &self.core.config)
            .finish_non_exhaustive()
    }
}

impl MapStore {
    /// A store over `cold` (none: RAM only). [`MapStore::open`] builds the cold tier the
    /// configuration names. The store counts what the tier's calls return (see
    /// [`StoreStats`]); a shared tier's own health is [`MapStore::shared_health`].
    pub fn with_cold_tier(
        config: StoreConfig,
        cold: Option<Box<dyn ColdTier>>,
    ) -> std::io::Result<Self> {
        let stats = Arc::new(StoreStats::default());
        let hot_recency = Arc::new(DashMap::new());
        let hot = HotTier::new(config.hot_bytes, &stats, &hot_recency);
        let core = Arc::new(StoreCore {
            config,
            hot: parking_lot::RwLock::new(hot),
            hot_recency,
            cold,
            clock: AtomicU64::new(1),
            stats,
            observer: std::sync::OnceLock::new(),
        });
        // what the tier found when it opened: the corrupt entries are counted now (the tier
        // removed them), the valid ones wait for the index (`take_scanned`)
        let (scanned, corrupt) = core
            .cold
            .as_ref()
            .map_or_else(Default::default, |c| c.take_scanned());
        for error in &corrupt {
            core.stats.count(error);
        }
        let writer = core
            .cold
            .is_some()
            .then(|| ColdWriter::start(core.clone()))
            .transpose()?;
        Ok(Self {
            core,
            writer,
            scanned: parking_lot::Mutex::new(scanned),
        })
    }

    /// The cold tier's kind ("disk", "redis"), if there is one.
    pub fn cold_kind(&self) -> Option<&'static str> {
        self.core.cold.as_ref().map(|c| c.kind())
    }

    /// The cold tier, if there is one (to measure what its reads cost).
    pub fn cold_tier(&self) -> Option<&dyn ColdTier> {
        self.core.cold.as_deref()
    }

    /// The store's counters.
    pub fn stats(&self) -> &StoreStats {
        &self.core.stats
    }

    /// Entries the cold tier's place holds under the model fingerprint `legacy` (see
    /// [`ColdTier::legacy_entries`]); 0 without a cold tier or when it cannot tell.
    pub fn legacy_entries(&self, legacy: u64) -> u64 {
        self.core
            .cold
            .as_ref()
            .and_then(|c| c.legacy_entries(legacy))
            .unwrap_or(0)
    }

    /// A shared cold tier's health (`None` without one).
    pub fn shared_health(&self) -> Option<SharedHealth> {
        self.core.cold.as_ref()?.shared_health()
    }

    /// Entries and bytes in the hot tier (moka's weighted size, after pending maintenance).
    pub fn hot_usage(&self) -> (u64, u64) {
        self.core.hot_usage()
    }

    /// Entries and bytes in the cold tier (queued writes not yet included).
    pub fn cold_usage(&self) -> (u64, u64) {
        self.core.cold.as_ref().map_or((0, 0), |c| c.usage())
    }

    /// The entries the cold tier held when the store opened (returned once).
    pub fn take_scanned(&self) -> Vec<Indexed> {
        std::mem::take(&mut *self.scanned.lock())
    }

    /// Entries other replicas stored in a shared cold tier since the last call.
    pub fn take_announced(&self) -> Vec<Indexed> {
        self.core
            .cold
            .as_ref()
            .map_or_else(Vec::new, |c| c.take_announced())
    }

    /// The entry stored for exactly these tokens, if any.
    pub fn get(&self, tokens: &[u32]) -> Option<Arc<Entry>> {
        self.core
            .get_checked(token_key(tokens), tokens.len(), Some(tokens))
    }

    /// The entry stored under `key` (a similarity candidate), whatever its tokens, if it
    /// still exists and has `len` tokens.
    pub fn get_by_key(&self, key: u64, len: usize) -> Option<Arc<Entry>> {
        self.core.get_checked(key, len, None)
    }

    /// Stores `entry` in the hot tier now and queues its cold-tier copy. A failed disk write
    /// is logged and leaves the cold tier as it was (the hot tier still holds the entry).
    pub fn insert(&self, entry: Entry) {
        let key = token_key(&entry.tokens);
        let entry = Arc::new(entry);
        self.core.insert_hot(key, entry.clone());
        self.core.stats.inserts.fetch_add(1, Ordering::Relaxed);
        self.core.note_access(key, &entry);
        if let Some(writer) = &self.writer {
            writer.queue(entry, &self.core.stats);
        }
    }

    /// The hot tier's current budget in bytes.
    pub fn hot_capacity(&self) -> u64 {
        self.core.hot_tier().capacity
    }

    /// Resizes the hot tier to `bytes` (at least 1 MiB), keeping the most recently used
    /// entries that fit; the others remain in the cold tier, when there is one.
    pub fn resize_hot(&self, bytes: u64) {
        self.core.resize_hot(bytes.max(1 << 20));
    }

    /// Tells `observer` of every later access to this store's entries (inserts and hits).
    /// One observer per store: `false` (and nothing changes) when one is set already.
    pub fn observe_accesses(&self, observer: Arc<dyn AccessObserver>) -> bool {
        self.core.observer.set(observer).is_ok()
    }

    /// Waits until every queued cold-tier write has finished.
    pub fn flush(&self) {
        if let Some(writer) = &self.writer {
            writer.wait_idle();
        }
    }
}

impl Drop for MapStore {
    fn drop(&mut self) {
        if let Some(writer) = &mut self.writer {
            writer.queue.take(); // the thread drains what is queued, then ends
            if let Some(t) = writer.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl ColdWriter {
    fn start(core: Arc<StoreCore>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Entry>>(WRITE_QUEUE);
        let pending = Arc::new((parking_lot::Mutex::new(0usize), parking_lot::Condvar::new()));
        let done = pending.clone();
        let thread = std::thread::Builder::new()
            .name("attncache-cold-writer".into())
            .spawn(move || {
                for entry in rx {
                    core.write_cold(&entry);
                    let (count, idle) = &*done;
                    let mut n = count.lock();
                    *n = n.saturating_sub(1);
                    idle.notify_all();
                }
            })?;
        Ok(Self {
            queue: Some(tx),
            thread: Some(thread),
            pending,
        })
    }

    fn queue(&self, entry: Arc<Entry>, stats: &StoreStats) {
        let Some(tx) = &self.queue else { return };
        let (count, _) = &*self.pending;
        *count.lock() += 1;
        if tx.try_send(entry).is_err() {
            *count.lock() -= 1;
            stats.cold_writes_skipped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("cold-tier writer busy: entry kept in the hot tier only");
        }
    }

    fn wait_idle(&self) {
        let (count, idle) = &*self.pending;
        let mut n = count.lock();
        while *n > 0 {
            idle.wait(&mut n);
        }
    }
}

impl StoreCore {
    fn hot_usage(&self) -> (u64, u64) {
        let hot = self.hot_tier();
        hot.cache.run_pending_tasks();
        (hot.cache.entry_count(), hot.cache.weighted_size())
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn get_checked(&self, key: u64, len: usize, tokens: Option<&[u32]>) -> Option<Arc<Entry>> {
        let wanted = |e: &Entry| e.len() == len && tokens.is_none_or(|t| *e.tokens == *t);
        if let Some(e) = self.hot_tier().cache.get(&key) {
            if wanted(&e) {
                self.hot_recency.insert(key, self.tick());
                self.stats.hot_hits.fetch_add(1, Ordering::Relaxed);
                self.note_access(key, &e);
                return Some(e);
            }
        }
        let found = self.get_cold(key, len).filter(|e| wanted(e));
        if let Some(e) = &found {
            self.note_access(key, e);
        }
        let counter = if found.is_some() {
            &self.stats.cold_hits
        } else {
            &self.stats.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    fn get_cold(&self, key: u64, len: usize) -> Option<Arc<Entry>> {
        let cold = self.cold.as_ref()?;
        let started = Instant::now();
        let found = cold.read(key, len);
        self.stats
            .cold_read_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let found = found.unwrap_or_else(|error| {
            self.stats.count(&error);
            None
        });
        let e = Arc::new(found?);
        self.insert_hot(key, e.clone());
        Some(e)
    }

    /// An entry larger than the whole hot tier stays cold (moka would admit it until its
    /// next maintenance and then evict everything else).
    fn insert_hot(&self, key: u64, entry: Arc<Entry>) {
        let hot = self.hot_tier();
        if entry.bytes() as u64 <= hot.capacity {
            self.hot_recency.insert(key, self.tick());
            hot.cache.insert(key, entry);
        }
    }

    /// The current hot tier (a cheap handle; a resize swaps in another).
    fn hot_tier(&self) -> HotTier {
        self.hot.read().clone()
    }

    /// Replaces the hot tier by one of `bytes`, keeping the most recently used entries
    /// that fit. Lookups wait during the swap; entries in use elsewhere (held by a
    /// forward pass) are reference-counted and stay valid whatever happens here.
    fn resize_hot(&self, bytes: u64) {
        let mut slot = self.hot.write();
        if slot.capacity == bytes {
            return;
        }
        let fresh = HotTier::new(bytes, &self.stats, &self.hot_recency);
        let mut entries: Vec<(u64, u64, Arc<Entry>)> = slot
            .cache
            .iter()
            .map(|(k, e)| {
                let used = self.hot_recency.get(&*k).map_or(0, |t| *t);
                (used, *k, e)
            })
            .collect();
        entries.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        let mut kept = 0u64;
        for (_, key, entry) in entries {
            let size = entry.bytes() as u64;
            if kept + size <= bytes {
                kept += size;
                fresh.cache.insert(key, entry);
            } else {
                self.hot_recency.remove(&key);
                self.stats.hot_evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
        fresh.cache.run_pending_tasks();
        *slot = fresh;
    }

    fn note_access(&self, key: u64, entry: &Entry) {
        if let Some(observer) = self.observer.get() {
            observer.accessed(key, entry.bytes() as u64);
        }
    }

    /// Writes `entry` to the cold tier (on the writer thread).
    fn write_cold(&self, entry: &Entry) {
        if let Some(cold) = &self.cold {
            match cold.write(token_key(&entry.tokens), entry) {
                Ok(written) => {
                    self.stats
                        .cold_evictions
                        .fetch_add(written.evicted, Ordering::Relaxed);
                }
                Err(error) => self.stats.count(&error),
            }
        }
    }
}
