//! The prefix store's cold tier: where blocks live beyond RAM (a directory, or a Redis
//! server shared by replicas), behind one seam ([`BlockTier`]), written by a background
//! thread so that storing a prompt never waits for it ([`ColdBlocks`]).
//!
//! A tier moves bytes only; [`ColdBlocks::read`] checks every block it reads
//! ([`super::block::decode`]): a damaged, truncated or foreign block is a miss plus one
//! warning, counted, and removed from the tier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::block::{self, Block};

/// Blocks waiting for the writer; past this a new block stays in RAM only (counted).
const WRITE_QUEUE: usize = 1024;

/// Why a tier call gave no bytes, or stored none.
#[derive(Debug, thiserror::Error)]
pub enum BlockTierError {
    /// The call failed (a file that cannot be read or written, a Redis error).
    #[error("prefix block {place}: {why}")]
    Failed {
        /// Where the block is (a path, a Redis key).
        place: String,
        /// The failure.
        why: String,
    },
    /// A shared tier that is down or did not answer in time: a miss, or a skipped write.
    #[error("shared tier unavailable")]
    Unavailable,
}

/// Where blocks live beyond RAM. Called from request threads ([`BlockTier::read`]) and
/// from the store's writer thread ([`BlockTier::write`]).
pub trait BlockTier: Send + Sync {
    /// Short name for logs ("disk", "redis").
    fn kind(&self) -> &'static str;

    /// Whether the tier may hold `key` (no false negatives for blocks this process wrote
    /// or found at start; a read is still needed to know).
    fn contains(&self, key: u64) -> bool;

    /// The bytes stored under `key`, if any.
    fn read(&self, key: u64) -> Result<Option<Vec<u8>>, BlockTierError>;

    /// Stores `bytes` under `key`; returns how many blocks were removed to stay within the
    /// tier's byte budget.
    fn write(&self, key: u64, bytes: &[u8]) -> Result<u64, BlockTierError>;

    /// Removes `key` (a damaged block).
    fn remove(&self, key: u64);

    /// Where `key` lives, for a warning.
    fn place(&self, key: u64) -> String;

    /// Blocks and bytes the tier holds.
    fn usage(&self) -> (u64, u64);
}

/// What the cold tier did (a snapshot, for `/info`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ColdCounts {
    /// Blocks read back from the tier (each then held in RAM again).
    pub reads: u64,
    /// Blocks found damaged, truncated or foreign (a miss; removed from the tier).
    pub corrupt: u64,
    /// Blocks written.
    pub writes: u64,
    /// Blocks not written because the writer's queue was full.
    pub writes_skipped: u64,
    /// Writes or reads that failed (a full disk, Redis down).
    pub failures: u64,
    /// Blocks removed to stay within the tier's budget.
    pub evictions: u64,
    /// Blocks the tier holds.
    pub blocks: u64,
    /// Bytes the tier holds.
    pub bytes: u64,
    /// Nanoseconds spent reading and checking blocks.
    pub read_ns: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    corrupt: AtomicU64,
    writes: AtomicU64,
    writes_skipped: AtomicU64,
    failures: AtomicU64,
    evictions: AtomicU64,
    read_ns: AtomicU64,
}

impl Counters {
    fn failed(&self, error: &BlockTierError) {
        // the first failure is worth a warning; later ones are counted
        if self.failures.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "{error} (later failures are counted in /info's prefix_store.cold.failures)"
            );
        } else {
            tracing::debug!("{error}");
        }
    }
}

/// A cold tier with its writer thread and its counters.
pub struct ColdBlocks {
    tier: Arc<dyn BlockTier>,
    seed: u64,
    block_tokens: usize,
    counters: Arc<Counters>,
    queue: Option<SyncSender<(u64, Arc<Block>)>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ColdBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColdBlocks")
            .field("kind", &self.tier.kind())
            .finish()
    }
}

impl ColdBlocks {
    /// `tier` for a store seeded `seed` with blocks of `block_tokens` ids; starts the writer.
    pub(crate) fn new(tier: Arc<dyn BlockTier>, seed: u64, block_tokens: usize) -> Self {
        let counters = Arc::new(Counters::default());
        let (queue, rx) = sync_channel::<(u64, Arc<Block>)>(WRITE_QUEUE);
        let writer = {
            let (tier, counters) = (tier.clone(), counters.clone());
            std::thread::Builder::new()
                .name("attncache-prefix-writer".into())
                .spawn(move || {
                    for (key, block) in rx {
                        let bytes = block::encode(&block, key, seed);
                        match tier.write(key, &bytes) {
                            Ok(evicted) => {
                                counters.writes.fetch_add(1, Ordering::Relaxed);
                                counters.evictions.fetch_add(evicted, Ordering::Relaxed);
                            }
                            Err(e) => counters.failed(&e),
                        }
                    }
                })
                .map_err(|e| tracing::warn!("no prefix writer thread ({e}): RAM only"))
                .ok()
        };
        Self {
            tier,
            seed,
            block_tokens,
            counters,
            queue: writer.as_ref().map(|_| queue),
            writer,
        }
    }

    /// The tier's name.
    pub(crate) fn kind(&self) -> &'static str {
        self.tier.kind()
    }

    /// Queues `block` for writing (the store offers only blocks new to its RAM; one the
    /// tier holds already is rewritten, which also replaces a damaged copy).
    pub(crate) fn offer(&self, key: u64, block: &Arc<Block>) {
        if let Some(queue) = &self.queue {
            match queue.try_send((key, block.clone())) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.counters.writes_skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Block `key` (ids `tokens` after the block keyed `parent`) from the tier, checked;
    /// `None` when the tier lacks it or it is damaged (then removed, warned and counted).
    pub(crate) fn read(&self, key: u64, parent: u64, tokens: &[u32]) -> Option<Block> {
        if !self.tier.contains(key) {
            return None;
        }
        let t0 = Instant::now();
        let bytes = match self.tier.read(key) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(BlockTierError::Unavailable) => return None,
            Err(e) => {
                self.counters.failed(&e);
                return None;
            }
        };
        let out = match block::decode(&bytes, key, self.seed, self.block_tokens) {
            Ok(b) if b.parent == parent && b.tokens == tokens => Some(b),
            Ok(_) => {
                self.discard(key, &block::BlockError::WrongKey);
                None
            }
            Err(e) => {
                self.discard(key, &e);
                None
            }
        };
        self.counters
            .read_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if out.is_some() {
            self.counters.reads.fetch_add(1, Ordering::Relaxed);
        }
        out
    }

    /// A stored block that cannot be used: removed, warned and counted (a miss).
    pub(crate) fn discard(&self, key: u64, why: &dyn std::fmt::Display) {
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            "discarding prefix block {}: {why} (a miss; the prompt's rest is computed)",
            self.tier.place(key)
        );
        self.tier.remove(key);
    }

    /// Waits until every queued block is written; later offers are dropped (shutdown).
    fn flush(&mut self) {
        self.queue.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }

    /// A snapshot of the counters.
    pub(crate) fn counts(&self) -> ColdCounts {
        let c = &self.counters;
        let (blocks, bytes) = self.tier.usage();
        ColdCounts {
            reads: c.reads.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            writes: c.writes.load(Ordering::Relaxed),
            writes_skipped: c.writes_skipped.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            blocks,
            bytes,
            read_ns: c.read_ns.load(Ordering::Relaxed),
        }
    }
}

impl Drop for ColdBlocks {
    fn drop(&mut self) {
        self.flush();
    }
}
