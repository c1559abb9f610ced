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
//! are stored; the partial block at the end is recomputed.
//!
//! The blocks live in a moka cache weighed in bytes (the RAM budget), evicting the least
//! recently used; a block evicted from the middle of a chain makes the blocks after it
//! unreachable until they are evicted too (they are then only a cost, never wrong).

use rayon::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use mistralrs_core::PrefixKv;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// One stored block: its ids, its parent's key and each layer's K and V for its positions,
/// f32 values in `[kv_heads, block_tokens, head_dim]` order.
struct Block {
    parent: u64,
    tokens: Vec<u32>,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// Each layer's (kv_heads, head_dim) of K and of V.
    shapes: Vec<((usize, usize), (usize, usize))>,
    bytes: u32,
}

/// A layer's K or V as `[heads, len, dim]` f32 values (one copy of mistral.rs's view).
fn values(t: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (_, heads, _, dim) = t.dims4()?;
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok((v, heads, dim))
}

/// Positions `[start, start + n)` of `[heads, len, dim]` values, as `[heads, n, dim]`.
fn rows(v: &[f32], heads: usize, len: usize, dim: usize, start: usize, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * n * dim);
    for h in 0..heads {
        let from = (h * len + start) * dim;
        out.extend_from_slice(&v[from..from + n * dim]);
    }
    out
}

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
}

/// The block store; cheap to share behind an `Arc`.
pub struct PrefixStore {
    blocks: moka::sync::Cache<u64, Arc<Block>>,
    block_tokens: usize,
    /// Seed of the first block's key: the model's identity (a different model or layout
    /// never matches).
    seed: u64,
    hits: AtomicU64,
    misses: AtomicU64,
    tokens_reused: AtomicU64,
    blocks_stored: AtomicU64,
    rejected: AtomicU64,
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
        Self {
            blocks,
            block_tokens: block_tokens.max(1),
            seed: xxh3_64_with_seed(model_key.as_bytes(), 0x5052_4546_4958), // "PREFIX"
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            tokens_reused: AtomicU64::new(0),
            blocks_stored: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    /// Ids per block.
    pub fn block_tokens(&self) -> usize {
        self.block_tokens
    }

    /// The key of a block whose parent has key `parent`.
    fn key(parent: u64, tokens: &[u32]) -> u64 {
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        xxh3_64_with_seed(&bytes, parent)
    }

    /// The K/V of the longest stored prefix of `toks` (whole blocks), or `None`.
    pub fn lookup(&self, toks: &[u32]) -> Result<Option<PrefixKv>> {
        let mut parent = self.seed;
        let mut found: Vec<Arc<Block>> = Vec::new();
        for chunk in toks.chunks_exact(self.block_tokens) {
            let key = Self::key(parent, chunk);
            match self.blocks.get(&key) {
                Some(b) if b.parent == parent && b.tokens == chunk => found.push(b),
                _ => break, // absent, or a collision: the prefix ends here
            }
            parent = key;
        }
        let Some(first) = found.first() else {
            self.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        let (b, len) = (self.block_tokens, found.len() * self.block_tokens);
        // the layers' copies in parallel: a 700-token prefix of SmolLM2 is 32 MB
        let layers = first
            .shapes
            .par_iter()
            .enumerate()
            .map(|(l, &((kh, kd), (vh, vd)))| {
                // [heads, len, dim]: for each head, the blocks' rows one after another
                let join = |pick: &dyn Fn(&Block) -> &[f32], heads: usize, dim: usize| {
                    let mut out = Vec::with_capacity(heads * len * dim);
                    for h in 0..heads {
                        for block in &found {
                            out.extend_from_slice(&pick(block)[h * b * dim..(h + 1) * b * dim]);
                        }
                    }
                    Tensor::from_vec(out, (1, heads, len, dim), &Device::Cpu)
                };
                let k = join(&|blk: &Block| &blk.layers[l].0, kh, kd)?;
                let v = join(&|blk: &Block| &blk.layers[l].1, vh, vd)?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()?;
        let len = found.len() * self.block_tokens;
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(PrefixKv { len, layers }))
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
            let bytes = block_layers
                .iter()
                .map(|(k, v)| (k.len() + v.len()) * 4)
                .sum::<usize>();
            let block = Block {
                parent,
                tokens: chunk.to_vec(),
                layers: block_layers,
                shapes: shapes.clone(),
                bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
            };
            self.blocks.insert(key, Arc::new(block));
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K/V where every value encodes (layer, k or v, head, position, dim), as a prompt's
    /// forward would give position by position.
    fn kv(n_layers: usize, toks: &[u32]) -> Vec<(Tensor, Tensor)> {
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
