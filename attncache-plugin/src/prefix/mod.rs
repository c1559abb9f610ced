//! Exact prefix reuse for decoders: the per-layer K/V of prompts already computed, kept in
//! blocks of token ids, so that a new prompt sharing a stored prefix computes only the rest.
//!
//! mistral.rs (patch 0008) offers the hook every prompt's K/V right after its prompt step
//! ([`PrefixStore::insert`]) and asks it, for each new sequence, for the K/V of the longest
//! stored prefix ([`PrefixStore::lookup`]); the engine then computes only the remaining
//! tokens, always at least the last one (its logits are the answer).
//!
//! Blocks, as vLLM's prefix caching keys them: the prompt is cut into blocks of
//! [`PrefixStore::block_tokens`] ids; block `i`'s key chains the key of block `i − 1` with
//! its own ids (XXH3), so a key names a whole prefix. Each stored block keeps its ids and
//! its parent's key, checked on lookup: a hash collision is a miss, never another prompt's
//! K/V. A causal model's K/V at a position depends only on the tokens up to it, so the
//! blocks of a prefix are exact for every prompt that starts with it. Only whole blocks
//! are stored. Where a prompt's chain of whole blocks ends, the stored blocks that follow
//! the last one found (its children, remembered in RAM) are compared token by token with
//! the rest of the prompt, and the longest shared run's rows are reused too: a 5-shot
//! head that ends mid-block is reused to its last token, not to its last whole block.
//!
//! The blocks live in a moka cache weighed in bytes (the RAM budget), evicting the least
//! recently used; a block evicted from the middle of a chain makes the blocks after it
//! unreachable until they are evicted too (they are then only a cost, never wrong).
//!
//! Below RAM, an optional cold tier ([`BlockTier`]: a directory, [`DiskBlocks`], or a Redis
//! server shared by replicas) holds every stored block, written in the background; a
//! lookup reads back the blocks RAM lacks and checks each ([`block`]'s format): a damaged
//! or foreign block ends the prefix there (a miss for the rest, computed exactly), with a
//! warning, and is removed.

pub mod block;
pub mod cold;
pub mod disk_blocks;
pub mod near;
#[cfg(feature = "redis")]
pub mod redis_blocks;

use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Device, Result, Tensor};
use mistralrs_core::PrefixKv;
use xxhash_rust::xxh3::xxh3_64_with_seed;

pub use block::BlockError;
use block::{rows, values, Block};
use cold::ColdBlocks;
pub use cold::{BlockTier, BlockTierError, ColdCounts};
pub use disk_blocks::DiskBlocks;
pub use near::Continuation;
#[cfg(feature = "redis")]
pub use redis_blocks::RedisBlocks;

/// What the store did, for `/info` and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixCounts {
    /// Lookups that found at least one block.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Prompt tokens whose K/V came from the store.
    pub tokens_reused: u64,
    /// Blocks written.
    pub blocks_stored: u64,
    /// Blocks now held.
    pub blocks_held: u64,
    /// Bytes now held.
    pub bytes_held: u64,
    /// Offered K/V that was not stored: shapes that disagree across layers or with the ids.
    pub rejected: u64,
    /// The cold tier's counters, when the store has one.
    pub cold: Option<ColdCounts>,
}

/// Parents whose children [`PrefixStore`] remembers for partial-block matches (least
/// recently used forgotten first); a forgotten parent only loses that refinement.
const MAX_PARENTS: u64 = 1 << 16;
/// Children remembered per parent (the most recently stored).
const MAX_CHILDREN: usize = 8;
/// Blocks the content index remembers (least recently used forgotten first). The K/V
/// budget binds long before: a SmolLM2-135M block of 16 ids is 0.7 MB, so a 512 MiB store
/// holds about 700 blocks.
const MAX_INDEXED: u64 = 1 << 16;
/// Seed of a block's content hash (its ids alone, wherever it sits): "SPAN".
const CONTENT_SEED: u64 = 0x5350_414e;

/// A stored block and the rows of it a lookup takes.
type Piece = (Arc<Block>, std::ops::Range<usize>);

/// The blocks of a prompt's longest stored prefix.
struct Chain {
    /// Whole blocks, then possibly part of one.
    pieces: Vec<Piece>,
    /// The key of the last whole block (the store's seed when there is none).
    last_whole: u64,
    /// Positions the whole blocks cover.
    whole: usize,
}

/// Each layer's K and V `[1, heads, rows, dim]` of `pieces`' rows laid end to end (blocks
/// of `block_tokens` ids, the first piece's layer shapes); the layers are copied in
/// parallel (a 700-token prefix of SmolLM2 is 32 MB).
fn join_rows(pieces: &[Piece], block_tokens: usize) -> Result<Vec<(Tensor, Tensor)>> {
    let Some((first, _)) = pieces.first() else {
        return Ok(Vec::new());
    };
    let len: usize = pieces.iter().map(|(_, rows)| rows.len()).sum();
    first
        .shapes
        .par_iter()
        .enumerate()
        .map(|(l, &((kh, kd), (vh, vd)))| {
            // [heads, len, dim]: for each head, the pieces' rows one after another
            let join = |pick: &dyn Fn(&Block) -> &[f32], heads: usize, dim: usize| {
                let mut out = Vec::with_capacity(heads * len * dim);
                for h in 0..heads {
                    for (block, rows) in pieces {
                        let start = (h * block_tokens + rows.start) * dim;
                        out.extend_from_slice(&pick(block)[start..start + rows.len() * dim]);
                    }
                }
                Tensor::from_vec(out, (1, heads, len, dim), &Device::Cpu)
            };
            let k = join(&|blk: &Block| &blk.layers[l].0, kh, kd)?;
            let v = join(&|blk: &Block| &blk.layers[l].1, vh, vd)?;
            Ok((k, v))
        })
        .collect()
}

/// The hash of a run of ids alone, wherever it sits ([`PrefixStore`]'s content index).
fn content_key(ids: &[u32]) -> u64 {
    block::key(CONTENT_SEED, ids)
}

/// The block store; cheap to share behind an `Arc`.
pub struct PrefixStore {
    blocks: moka::sync::Cache<u64, Arc<Block>>,
    /// A block's key → the keys of the blocks stored after it, for partial-block matches.
    children: moka::sync::Cache<u64, Arc<[u64]>>,
    /// A block's ids alone (hashed, position-free) → the most recent block stored with
    /// them and its first position in its prompt: where a new prompt's run of ids was seen
    /// before, at any offset (a document recurring after another query). Checked against
    /// the block on use: a stale or colliding entry is no match.
    content: moka::sync::Cache<u64, (u64, usize)>,
    block_tokens: usize,
    /// Seed of the first block's key: the model's identity (a different model or layout
    /// never matches).
    seed: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    tokens_reused: AtomicU64,
    blocks_stored: AtomicU64,
    rejected: AtomicU64,
    /// Where blocks live beyond RAM, if anywhere.
    cold: Option<ColdBlocks>,
}

impl std::fmt::Debug for PrefixStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixStore")
            .field("block_tokens", &self.block_tokens)
            .field("blocks", &self.blocks.entry_count())
            .finish()
    }
}

impl PrefixStore {
    /// A store of at most `budget_bytes` of K/V in blocks of `block_tokens` ids, for the
    /// model named by `model_key` (any stable text: file name, layers, sizes).
    pub fn new(budget_bytes: u64, block_tokens: usize, model_key: &str) -> Self {
        // LRU, not moka's default TinyLFU: TinyLFU admits a new block only if it was seen
        // more often than the victim, so once the budget is full a new prompt's blocks (seen
        // once) would be turned away and the next prompt sharing its head would miss
        let blocks = moka::sync::Cache::builder()
            .max_capacity(budget_bytes)
            .weigher(|_: &u64, b: &Arc<Block>| b.bytes)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        let children = moka::sync::Cache::builder()
            .max_capacity(MAX_PARENTS)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        let content = moka::sync::Cache::builder()
            .max_capacity(MAX_INDEXED)
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        Self {
            blocks,
            children,
            content,
            block_tokens: block_tokens.max(1),
            seed: xxh3_64_with_seed(model_key.as_bytes(), 0x5052_4546_4958), // "PREFIX"
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            tokens_reused: AtomicU64::new(0),
            blocks_stored: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            cold: None,
        }
    }

    /// The store with a cold tier below its RAM: every stored block is also written there
    /// (in the background), and a lookup whose block left RAM (or was stored by an earlier
    /// process, or by another replica) reads it back, checked.
    pub fn with_cold_tier(mut self, tier: Arc<dyn BlockTier>) -> Self {
        self.cold = Some(ColdBlocks::new(tier, self.seed, self.block_tokens));
        self
    }

    /// The cold tier's name ("disk", "redis"), if the store has one.
    pub fn cold_kind(&self) -> Option<&'static str> {
        self.cold.as_ref().map(ColdBlocks::kind)
    }

    /// The first block's key seed: the model's identity, which names the store's place in a
    /// shared tier.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Ids per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The key of a block whose parent has key `parent`.
    fn key(parent: u64, tokens: &[u32]) -> u64 {
        block::key(parent, tokens)
    }

    /// Block `key` from RAM, else from the cold tier (checked, then held in RAM again).
    fn block(&self, key: u64, parent: u64, chunk: &[u32]) -> Option<Arc<Block>> {
        match self.blocks.get(&key) {
            Some(b) if b.parent == parent && b.tokens == chunk => Some(b),
            Some(_) => None, // a collision: the prefix ends here
            None => {
                let b = Arc::new(self.cold.as_ref()?.read(key, parent, chunk)?);
                self.blocks.insert(key, b.clone());
                self.note_child(parent, key);
                Some(b)
            }
        }
    }

    /// Remembers that block `key` follows block `parent` (the most recent [`MAX_CHILDREN`]).
    fn note_child(&self, parent: u64, key: u64) {
        let mut list = self
            .children
            .get(&parent)
            .map(|c| c.to_vec())
            .unwrap_or_default();
        if list.contains(&key) {
            return;
        }
        if list.len() == MAX_CHILDREN {
            list.remove(0);
        }
        list.push(key);
        self.children.insert(parent, list.into());
    }

    /// The stored child of `parent` (in RAM) sharing the longest run of first ids with
    /// `rest`, and that run's length (at least 1), if any.
    fn partial_block(&self, parent: u64, rest: &[u32]) -> Option<(Arc<Block>, usize)> {
        let children = self.children.get(&parent)?;
        children
            .iter()
            .filter_map(|key| {
                let b = self.blocks.get(key).filter(|b| b.parent == parent)?;
                let shared = b
                    .tokens
                    .iter()
                    .zip(rest)
                    .take_while(|(a, c)| a == c)
                    .count();
                (shared > 0).then_some((b, shared))
            })
            .max_by_key(|(_, shared)| *shared)
    }

    /// The K/V of the longest stored prefix of `toks`, or `None` when not even its first
    /// block is stored: whole blocks, then the longest run of ids the next stored block
    /// shares with the rest of `toks`.
    pub fn lookup(&self, toks: &[u32]) -> Result<Option<PrefixKv>> {
        match self.chain(toks) {
            Some(chain) => Ok(Some(self.answer(&chain)?)),
            None => Ok(None),
        }
    }

    /// The stored blocks of `toks`' longest stored prefix (counted as a hit or a miss).
    fn chain(&self, toks: &[u32]) -> Option<Chain> {
        let mut parent = self.seed;
        let mut found: Vec<Arc<Block>> = Vec::new();
        for chunk in toks.chunks_exact(self.block_tokens) {
            let key = Self::key(parent, chunk);
            // absent, or a collision: the prefix ends here
            let Some(b) = self.block(key, parent, chunk) else {
                break;
            };
            // every block of a model has its layers' shapes; one that does not (a cold
            // block of another layout that passed its checks) ends the prefix too
            if found.first().is_some_and(|f| f.shapes != b.shapes) {
                if let Some(cold) = &self.cold {
                    self.blocks.invalidate(&key);
                    cold.discard(key, &"layer shapes differ from the prefix's");
                }
                break;
            }
            found.push(b);
            parent = key;
        }
        let Some(first) = found.first().cloned() else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let b = self.block_tokens;
        // each block with the rows it gives: whole blocks, then a partial one
        let mut pieces: Vec<Piece> = found.into_iter().map(|f| (f, 0..b)).collect();
        let whole = pieces.len() * b;
        if let Some((block, shared)) = self
            .partial_block(parent, &toks[whole..])
            .filter(|(block, _)| block.shapes == first.shapes)
        {
            pieces.push((block, 0..shared));
        }
        self.hits.fetch_add(1, Ordering::Relaxed);
        Some(Chain {
            pieces,
            last_whole: parent,
            whole,
        })
    }

    /// A chain's K/V as the engine takes it.
    fn answer(&self, chain: &Chain) -> Result<PrefixKv> {
        let layers = join_rows(&chain.pieces, self.block_tokens)?;
        let len = chain.pieces.iter().map(|(_, rows)| rows.len()).sum();
        Ok(PrefixKv { len, layers })
    }

    /// Notes that the engine reused `tokens` positions of a lookup's answer.
    pub fn note_reused(&self, tokens: usize) {
        self.tokens_reused
            .fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// Stores the whole blocks of `toks` not stored yet, from `layers` (each layer's K and
    /// V, `[1, kv_heads, toks.len(), head_dim]`). Offers of the wrong shape are counted in
    /// [`PrefixCounts::rejected`] and dropped.
    pub fn insert(&self, toks: &[u32], layers: &[(Tensor, Tensor)]) -> Result<()> {
        let fits = |t: &Tensor, like: &Tensor| {
            matches!((t.dims4(), like.dims4()), (Ok((1, h, l, d)), Ok((1, h2, _, d2)))
                if l == toks.len() && h == h2 && d == d2)
        };
        let Some((k0, v0)) = layers.first() else {
            return Ok(());
        };
        if !layers.iter().all(|(k, v)| fits(k, k0) && fits(v, v0)) {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        // the keys of the whole blocks, and whether any is new
        let mut keys = Vec::new();
        let mut parent = self.seed;
        for chunk in toks.chunks_exact(self.block_tokens) {
            let key = Self::key(parent, chunk);
            keys.push((parent, key, chunk));
            parent = key;
        }
        let Some(first_new) = keys
            .iter()
            .position(|(_, key, _)| !self.blocks.contains_key(key))
        else {
            return Ok(());
        };
        // one copy of each layer's rows from the first new block on (a prompt that reused a
        // long prefix copies only its new part), then each new block's rows out of it
        let b = self.block_tokens;
        let (start, n) = (first_new * b, (keys.len() - first_new) * b);
        let copied = layers
            .iter()
            .map(|(k, v)| {
                Ok((
                    values(&k.narrow(2, start, n)?)?,
                    values(&v.narrow(2, start, n)?)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let shapes: Vec<_> = copied
            .iter()
            .map(|((_, kh, kd), (_, vh, vd))| ((*kh, *kd), (*vh, *vd)))
            .collect();
        for (i, (parent, key, chunk)) in keys.into_iter().enumerate().skip(first_new) {
            if self.blocks.contains_key(&key) {
                continue;
            }
            let i = i - first_new;
            let block_layers: Vec<(Vec<f32>, Vec<f32>)> = copied
                .iter()
                .map(|((k, kh, kd), (v, vh, vd))| {
                    (
                        rows(k, *kh, n, *kd, i * b, b),
                        rows(v, *vh, n, *vd, i * b, b),
                    )
                })
                .collect();
            let block = Arc::new(Block::new(
                parent,
                chunk.to_vec(),
                block_layers,
                shapes.clone(),
            ));
            if let Some(cold) = &self.cold {
                cold.offer(key, &block);
            }
            self.blocks.insert(key, block);
            self.note_child(parent, key);
            self.content
                .insert(content_key(chunk), (key, (first_new + i) * b));
            self.blocks_stored.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// A snapshot of the counters.
    pub fn counts(&self) -> PrefixCounts {
        self.blocks.run_pending_tasks();
        PrefixCounts {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            tokens_reused: self.tokens_reused.load(Ordering::Relaxed),
            blocks_stored: self.blocks_stored.load(Ordering::Relaxed),
            blocks_held: self.blocks.entry_count(),
            bytes_held: self.blocks.weighted_size(),
            rejected: self.rejected.load(Ordering::Relaxed),
            cold: self.cold.as_ref().map(ColdBlocks::counts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K/V where every value encodes (layer, k or v, head, position, dim), as a prompt's
    /// forward would give position by position.
    pub(super) fn kv(n_layers: usize, toks: &[u32]) -> Vec<(Tensor, Tensor)> {
        let (h, d) = (2, 3);
        let value = |l: usize, which: usize, hh: usize, p: usize, dd: usize| {
            // depends on the token ids up to p, as a causal model's K/V does
            let prefix: u32 = toks[..=p].iter().sum();
            (l * 1000 + which * 100 + hh * 10 + dd) as f32 + prefix as f32 * 1e-3
        };
        (0..n_layers)
            .map(|l| {
                let make = |which| {
                    let mut v = Vec::new();
                    for hh in 0..h {
                        for p in 0..toks.len() {
                            for dd in 0..d {
                                v.push(value(l, which, hh, p, dd));
                            }
                        }
                    }
                    Tensor::from_vec(v, (1, h, toks.len(), d), &Device::Cpu).unwrap()
                };
                (make(0), make(1))
            })
            .collect()
    }

    #[test]
    fn a_stored_prefix_comes_back_exactly_in_whole_blocks() {
        let store = PrefixStore::new(1 << 30, 4, "model-a");
        let first: Vec<u32> = (0..11).collect();
        store.insert(&first, &kv(3, &first)).unwrap();
        assert_eq!(store.counts().blocks_stored, 2); // 11 ids: two whole blocks of 4
                                                     // a new prompt sharing the first 9 ids: the two whole blocks (8 positions) match
        let mut second: Vec<u32> = (0..9).collect();
        second.extend([50, 51, 52]);
        let got = store.lookup(&second).unwrap().expect("a hit");
        assert_eq!(got.len, 8);
        let want = kv(3, &second);
        for (l, ((k, v), (wk, wv))) in got.layers.iter().zip(&want).enumerate() {
            let wk = wk.narrow(2, 0, 8).unwrap();
            let wv = wv.narrow(2, 0, 8).unwrap();
            let dk = (k - wk).unwrap().abs().unwrap().max_all().unwrap();
            let dv = (v - wv).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(dk.to_scalar::<f32>().unwrap(), 0.0, "layer {l} k");
            assert_eq!(dv.to_scalar::<f32>().unwrap(), 0.0, "layer {l} v");
        }
        // one id differs in the first block: nothing matches
        let mut third = second.clone();
        third[1] = 99;
        assert!(store.lookup(&third).unwrap().is_none());
        // another model's store never matches
        let other = PrefixStore::new(1 << 30, 4, "model-b");
        other.insert(&first, &kv(3, &first)).unwrap();
        let c = store.counts();
        assert_eq!((c.hits, c.misses), (1, 1));
    }

    #[test]
    fn a_prompt_extending_a_stored_prefix_stores_only_its_new_blocks_exactly() {
        let store = PrefixStore::new(1 << 30, 4, "model-a");
        let head: Vec<u32> = (0..8).collect();
        store.insert(&head, &kv(2, &head)).unwrap();
        assert_eq!(store.counts().blocks_stored, 2);
        // the head and three more blocks (and a partial one): only those three are new
        let mut long = head.clone();
        long.extend(20..34);
        store.insert(&long, &kv(2, &long)).unwrap();
        assert_eq!(store.counts().blocks_stored, 5);
        let got = store.lookup(&long).unwrap().expect("a hit");
        assert_eq!(got.len, 20);
        for ((k, v), (wk, wv)) in got.layers.iter().zip(&kv(2, &long)) {
            for (t, w) in [(k, wk), (v, wv)] {
                let w = w.narrow(2, 0, 20).unwrap();
                let d = (t - w).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn a_lost_block_ends_the_prefix_and_bad_shapes_are_refused() {
        let store = PrefixStore::new(1 << 30, 2, "m");
        let toks: Vec<u32> = (10..20).collect();
        store.insert(&toks, &kv(2, &toks)).unwrap();
        assert_eq!(store.lookup(&toks).unwrap().unwrap().len, 10);
        // drop the third block: the prefix stops before it
        let k0 = PrefixStore::key(store.seed, &toks[0..2]);
        let k1 = PrefixStore::key(k0, &toks[2..4]);
        let k2 = PrefixStore::key(k1, &toks[4..6]);
        store.blocks.invalidate(&k2);
        assert_eq!(store.lookup(&toks).unwrap().unwrap().len, 4);
        // K/V whose length disagrees with the ids: refused, nothing stored
        let before = store.counts().blocks_stored;
        let short = kv(2, &toks[..6]);
        store.insert(&[1, 2, 3, 4, 5, 6, 7, 8], &short).unwrap();
        assert_eq!(store.counts().blocks_stored, before);
        assert_eq!(store.counts().rejected, 1);
    }

    #[test]
    fn a_full_store_still_takes_new_prompts() {
        // room for 4 blocks: an old prompt fills it, a new one must still be admitted
        let store = PrefixStore::new(192 * 4, 2, "m");
        let old: Vec<u32> = (0..8).collect();
        for _ in 0..5 {
            store.insert(&old, &kv(2, &old)).unwrap();
            assert!(store.lookup(&old).unwrap().is_some());
        }
        let new: Vec<u32> = (100..108).collect();
        store.insert(&new, &kv(2, &new)).unwrap();
        store.blocks.run_pending_tasks();
        assert_eq!(store.lookup(&new).unwrap().map(|p| p.len), Some(8));
    }

    fn cold_store(dir: &std::path::Path, ram: u64) -> PrefixStore {
        let tier = DiskBlocks::open(dir, 1 << 30).unwrap();
        PrefixStore::new(ram, 4, "model-a").with_cold_tier(Arc::new(tier))
    }

    fn assert_equal_prefix(got: &PrefixKv, toks: &[u32], n_layers: usize) {
        for ((k, v), (wk, wv)) in got.layers.iter().zip(&kv(n_layers, toks)) {
            for (t, w) in [(k, wk), (v, wv)] {
                let w = w.narrow(2, 0, got.len).unwrap();
                let d = (t - w).unwrap().abs().unwrap().max_all().unwrap();
                assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
            }
        }
    }

    #[test]
    fn a_prefix_ending_mid_block_is_reused_to_its_last_shared_id() {
        let store = PrefixStore::new(1 << 30, 4, "m");
        // a stored prompt: a 6-id head, then its own question (blocks 0..4 and 4,5,60,61)
        let first: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 60, 61, 62];
        store.insert(&first, &kv(2, &first)).unwrap();
        // another question after the same head: the first block and two rows of the next
        let second: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 70, 71, 72, 73];
        let got = store.lookup(&second).unwrap().expect("a hit");
        assert_eq!(got.len, 6);
        assert_equal_prefix(&got, &second, 2);
        // the next block's first id differs: the whole block only
        let third: Vec<u32> = vec![0, 1, 2, 3, 8, 8, 8];
        assert_eq!(store.lookup(&third).unwrap().unwrap().len, 4);
        // a prompt that is all head: every id found (the engine computes the last anyway)
        let head: Vec<u32> = vec![0, 1, 2, 3, 4, 5];
        let got = store.lookup(&head).unwrap().expect("a hit");
        assert_eq!(got.len, 6);
        assert_equal_prefix(&got, &head, 2);
        // sharing part of the first block only is not a hit: a hit starts with a whole block
        assert!(store.lookup(&[0, 1, 9, 9, 9]).unwrap().is_none());
        // of two children, the one sharing more ids is taken
        let fourth: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 70, 71, 99];
        store.insert(&fourth, &kv(2, &fourth)).unwrap();
        let fifth: Vec<u32> = vec![0, 1, 2, 3, 4, 5, 70, 80];
        let got = store.lookup(&fifth).unwrap().expect("a hit");
        assert_eq!(got.len, 7);
        assert_equal_prefix(&got, &fifth, 2);
    }

    #[test]
    fn blocks_on_disk_survive_a_restart_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let toks: Vec<u32> = (0..13).collect();
        {
            let store = cold_store(dir.path(), 1 << 30);
            store.insert(&toks, &kv(3, &toks)).unwrap();
        } // dropping the store waits for its writer
        let store = cold_store(dir.path(), 1 << 30);
        assert_eq!(store.counts().blocks_held, 0);
        let got = store.lookup(&toks).unwrap().expect("a hit from disk");
        assert_eq!(got.len, 12);
        assert_equal_prefix(&got, &toks, 3);
        let c = store.counts();
        let cold = c.cold.unwrap();
        assert_eq!((cold.reads, cold.corrupt, cold.blocks), (3, 0, 3), "{c:?}");
        assert_eq!(c.blocks_held, 3, "read blocks are held in RAM again");
        // another model's store over the same directory finds nothing of it
        let other = PrefixStore::new(1 << 30, 4, "model-b")
            .with_cold_tier(Arc::new(DiskBlocks::open(dir.path(), 1 << 30).unwrap()));
        assert!(other.lookup(&toks).unwrap().is_none());
    }

    #[test]
    fn a_damaged_block_on_disk_is_a_miss_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let toks: Vec<u32> = (0..12).collect();
        {
            let store = cold_store(dir.path(), 1 << 30);
            store.insert(&toks, &kv(2, &toks)).unwrap();
        }
        let k0 = PrefixStore::key(cold_store_seed(), &toks[0..4]);
        let k1 = PrefixStore::key(k0, &toks[4..8]);
        let k2 = PrefixStore::key(k1, &toks[8..12]);
        let file = |k: u64| dir.path().join(format!("{k:016x}.kvb"));
        // the second block flipped, the third truncated
        let mut bytes = std::fs::read(file(k1)).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(file(k1), &bytes).unwrap();
        let third = std::fs::read(file(k2)).unwrap();
        std::fs::write(file(k2), &third[..third.len() / 3]).unwrap();
        let store = cold_store(dir.path(), 1 << 30);
        let got = store
            .lookup(&toks)
            .unwrap()
            .expect("the first block is intact");
        assert_eq!(got.len, 4);
        assert_equal_prefix(&got, &toks, 2);
        assert_eq!(store.counts().cold.unwrap().corrupt, 1);
        assert!(!file(k1).exists(), "a damaged block is removed");
        // a block copied under another prefix's name is refused as well
        std::fs::copy(file(k0), file(k1)).unwrap();
        let store = cold_store(dir.path(), 1 << 30);
        assert_eq!(store.lookup(&toks).unwrap().map(|p| p.len), Some(4));
        assert_eq!(store.counts().cold.unwrap().corrupt, 1);
        // storing the prompt again repairs the chain
        store.insert(&toks, &kv(2, &toks)).unwrap();
        drop(store);
        let store = cold_store(dir.path(), 1 << 30);
        let got = store.lookup(&toks).unwrap().unwrap();
        assert_eq!(got.len, 12);
        assert_equal_prefix(&got, &toks, 2);
    }

    fn cold_store_seed() -> u64 {
        PrefixStore::new(1, 4, "model-a").seed
    }

    #[test]
    fn blocks_evicted_from_ram_come_back_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        // RAM for two blocks of 2 layers x (k + v) x 2 heads x 4 positions x 3 dims x 4 B
        let store = cold_store(dir.path(), 384 * 2);
        let toks: Vec<u32> = (0..16).collect();
        store.insert(&toks, &kv(2, &toks)).unwrap();
        store.blocks.run_pending_tasks();
        assert!(store.counts().blocks_held <= 2);
        // the writer is in the background: wait for its four writes
        let t0 = std::time::Instant::now();
        while store.counts().cold.unwrap().writes < 4 {
            assert!(t0.elapsed().as_secs() < 30, "{:?}", store.counts());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let got = store.lookup(&toks).unwrap().unwrap();
        assert_eq!(got.len, 16);
        assert_equal_prefix(&got, &toks, 2);
    }

    #[test]
    fn the_budget_bounds_what_is_held() {
        // each block: 2 layers x (k + v) x 2 heads x 2 positions x 3 dims x 4 bytes = 192 B
        let store = PrefixStore::new(192 * 5, 2, "m");
        for p in 0..20u32 {
            let toks: Vec<u32> = (0..8).map(|i| p * 100 + i).collect();
            store.insert(&toks, &kv(2, &toks)).unwrap();
        }
        let c = store.counts();
        assert_eq!(c.blocks_stored, 80);
        assert!(c.bytes_held <= 192 * 5, "{c:?}");
    }
}
