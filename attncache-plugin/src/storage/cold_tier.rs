//! The storage backend seam: where entries live beyond the hot tier.
//!
//! A [`ColdTier`] stores encoded entries ([`crate::storage::entry`]'s header/checksum format) under
//! their store key. Two implementations:
//!
//! - [`crate::storage::disk_tier::DiskTier`] (the default): checksummed files read through mmap,
//!   private to one process, surviving restarts;
//! - [`crate::storage::redis_tier::RedisTier`]: a Redis server shared by every replica of a
//!   deployment, which also announces new entries so other replicas index them.
//!
//! Every tier checks what it reads (magic, model fingerprint, shape, checksum, and that the
//! entry's tokens hash to the key it was stored under): a corrupt or foreign entry is a
//! miss plus one warning, counted in [`StoreStats::corrupt`], and is removed.

use std::sync::atomic::{AtomicBool, AtomicU64};

use crate::storage::entry::{self, Indexed, MapEntry};
use crate::storage::stable_hash::token_key;

/// Counters of the store and its cold tier (one `Arc` shared by both: the store counts
/// hits and inserts, the tier what happens below it).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Hits served from RAM.
    pub hot_hits: AtomicU64,
    /// Hits read from the cold tier (disk or Redis).
    pub cold_hits: AtomicU64,
    /// Lookups that found nothing usable.
    pub misses: AtomicU64,
    /// Entries inserted.
    pub inserts: AtomicU64,
    /// Cold files removed to stay within the budget.
    pub cold_evictions: AtomicU64,
    /// Hot entries evicted to stay within the hot budget (they remain in the cold tier).
    pub hot_evictions: AtomicU64,
    /// Files found corrupt, truncated or foreign (and removed).
    pub corrupt: AtomicU64,
    /// Nanoseconds spent reading and decoding cold entries.
    pub cold_read_ns: AtomicU64,
    /// Cold-tier writes skipped because the writer's queue was full (the entry stayed hot).
    pub cold_writes_skipped: AtomicU64,
    /// Cold-tier writes that failed (full disk, quota, permissions; the entry stayed hot).
    /// The first failure is logged as a warning, later ones at debug level.
    pub cold_write_failures: AtomicU64,
    /// Calls to a shared tier that failed or timed out (each a miss or a skipped write).
    pub shared_errors: AtomicU64,
    /// Calls to a shared tier skipped while it was marked down (each a miss or a skipped
    /// write), after an error.
    pub shared_skipped: AtomicU64,
    /// Whether a shared tier is marked down (serving from local tiers only).
    pub shared_down: AtomicBool,
    /// Entries other replicas stored that this one learned of (through the shared tier).
    pub announced: AtomicU64,
}

/// A tier of entries below the hot tier. Implementations are called from request threads
/// ([`ColdTier::read`]) and from the store's background writer ([`ColdTier::write`]); a
/// failure is a miss or a skipped write, counted in the store's [`StoreStats`], never an
/// error for the request.
pub trait ColdTier: Send + Sync {
    /// Short name for logs ("disk", "redis").
    fn kind(&self) -> &'static str;

    /// The entries stored when the tier opened, for the similarity index (returned once).
    fn take_scanned(&self) -> Vec<Indexed>;

    /// Entries that *other* processes stored since the last call (shared tiers only).
    fn take_announced(&self) -> Vec<Indexed> {
        Vec::new()
    }

    /// The checked entry stored under `key` with `len` tokens, if there is one.
    fn read(&self, key: u64, len: usize) -> Option<MapEntry>;

    /// Stores `entry` under `key` (on the writer thread, never on a request's path).
    fn write(&self, key: u64, entry: &MapEntry);

    /// Entries and bytes the tier holds (for a shared tier: all processes' entries, as of
    /// this process's last write).
    fn usage(&self) -> (u64, u64);

    /// What reading an entry back costs on this tier, for the hot tier's sizing: stores
    /// `bytes` (an encoded entry) where no entry lives and no other process looks, reads it
    /// back `reps` times, each read followed by `then` (decoding and using it), removes it,
    /// and returns each read's time in nanoseconds. An error says why the tier cannot be
    /// measured now (a shared tier that is down).
    fn time_reads(
        &self,
        bytes: &[u8],
        reps: usize,
        then: &mut ReadProbe<'_>,
    ) -> Result<Vec<f64>, String>;
}

/// What [`ColdTier::time_reads`] does with each read: decode and use the bytes.
pub type ReadProbe<'a> = dyn FnMut(&[u8]) -> Result<(), String> + 'a;

/// Decodes `bytes` for `fingerprint` and checks that the entry belongs under `key`.
pub(crate) fn decode_checked(bytes: &[u8], fingerprint: u64, key: u64) -> Result<MapEntry, String> {
    let e = entry::decode(bytes, fingerprint).map_err(|e| e.to_string())?;
    if token_key(&e.tokens) != key {
        return Err("stored under another input's key".into());
    }
    Ok(e)
}

/// Counts a corrupt entry and warns about it.
pub(crate) fn report_corrupt(stats: &StoreStats, place: &str, why: &str) {
    stats
        .corrupt
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tracing::warn!(entry = place, "discarding cache entry: {why}");
}
