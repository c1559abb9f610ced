//! The storage backend seam: where entries live beyond the hot tier.
//!
//! A [`ColdTier`] stores encoded entries ([`crate::storage::entry`]'s header/checksum format) under
//! their store key. Two implementations:
//!
//! - [`crate::storage::disk_tier::DiskTier`] (the default): checksummed files read through mmap,
//!   private to one process, surviving restarts;
//! - `RedisTier` (`storage::redis_tier`, with the `redis` feature): a Redis server shared
//!   by every replica of a deployment, which also announces new entries so other replicas
//!   index them.
//!
//! Every tier checks what it reads (magic, model fingerprint, shape, checksum, and that the
//! entry's tokens hash to the key it was stored under): a corrupt or foreign entry is a
//! miss plus one warning, counted in [`StoreStats::corrupt`], and is removed.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::storage::entry::{self, Entry, Indexed};
use crate::storage::stable_hash::token_key;

/// The store's counters: what it served, stored and evicted, and what its cold tier's
/// calls returned (the tier never touches them; a shared tier's own health is
/// [`SharedHealth`]).
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
}

impl StoreStats {
    /// Counts what a cold-tier call's error says about the entry (a shared tier's own
    /// health is in [`SharedHealth`]); logs a corrupt entry, and the first failed write.
    pub(crate) fn count(&self, error: &TierError) {
        match error {
            TierError::Corrupt { .. } => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("{error}");
            }
            TierError::WriteFailed { .. } => {
                if self.cold_write_failures.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "{error}; keeping it in RAM only (later failures are counted in \
                         attncache_cold_write_failures_total)"
                    );
                } else {
                    tracing::debug!("{error}");
                }
            }
            TierError::Unavailable { writing: true } => {
                self.cold_write_failures.fetch_add(1, Ordering::Relaxed);
            }
            TierError::Unavailable { writing: false } => {}
        }
    }
}

/// Why a cold-tier call gave no entry, or stored none. The tier has already dealt with
/// the cause (removed the corrupt entry, marked a shared tier down); the store counts it.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The stored bytes were corrupt, truncated or foreign; the tier removed them.
    #[error("discarding cache entry {place}: {why}")]
    Corrupt {
        /// Where the entry was (a path, a Redis key).
        place: String,
        /// What was wrong with it.
        why: String,
    },
    /// The entry could not be written (full disk, quota, permissions, encoding).
    #[error("cannot write cache entry {place}: {why}")]
    WriteFailed {
        /// Where it was to go.
        place: String,
        /// The failure.
        why: String,
    },
    /// A shared tier failed, did not answer in time, or is marked down (see
    /// [`SharedHealth`]): a miss, or a skipped write.
    #[error("shared tier unavailable")]
    Unavailable {
        /// Whether the call was a write.
        writing: bool,
    },
}

/// What a successful [`ColdTier::write`] did besides storing the entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Written {
    /// Entries removed to stay within the tier's byte budget.
    pub evicted: u64,
}

/// A shared tier's own health: its counters, kept by the tier (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedHealth {
    /// Calls that failed or timed out (each a miss or a skipped write, or a stream read).
    pub errors: u64,
    /// Calls skipped while the tier was marked down, after an error.
    pub skipped: u64,
    /// Whether the tier is marked down (serving from local tiers only).
    pub down: bool,
    /// Entries other replicas stored that this one learned of.
    pub announced: u64,
}

/// A tier of entries below the hot tier. Implementations are called from request threads
/// ([`ColdTier::read`]) and from the store's background writer ([`ColdTier::write`]); a
/// failure is a typed [`TierError`] that the store counts in its [`StoreStats`] (a miss or
/// a skipped write, never an error for the request). A tier never touches the store's
/// counters.
pub trait ColdTier: Send + Sync {
    /// Short name for logs ("disk", "redis").
    fn kind(&self) -> &'static str;

    /// The entries stored when the tier opened, for the similarity index, and the stored
    /// entries found corrupt then (and removed); returned once.
    fn take_scanned(&self) -> (Vec<Indexed>, Vec<TierError>);

    /// Entries that *other* processes stored since the last call (shared tiers only).
    fn take_announced(&self) -> Vec<Indexed> {
        Vec::new()
    }

    /// The checked entry stored under `key` with `len` tokens, if there is one.
    fn read(&self, key: u64, len: usize) -> Result<Option<Entry>, TierError>;

    /// Stores `entry` under `key` (on the writer thread, never on a request's path).
    fn write(&self, key: u64, entry: &Entry) -> Result<Written, TierError>;

    /// A shared tier's health (`None` for a tier private to this process).
    fn shared_health(&self) -> Option<SharedHealth> {
        None
    }

    /// Entries this tier's place holds for the model fingerprint `legacy` (an earlier
    /// build's key scheme), left alone: they are never read (misses, not corrupt). `None`
    /// when that cannot be told now (a shared tier counts in the background and logs what
    /// it finds itself, so that a start never waits for it).
    fn legacy_entries(&self, legacy: u64) -> Option<u64>;

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
pub(crate) fn decode_checked(bytes: &[u8], fingerprint: u64, key: u64) -> Result<Entry, String> {
    let e = entry::decode(bytes, fingerprint).map_err(|e| e.to_string())?;
    if token_key(&e.tokens) != key {
        return Err("stored under another input's key".into());
    }
    Ok(e)
}
