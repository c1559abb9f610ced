//! One stored block of a prompt prefix ([`Block`]) and its byte format for the cold tiers.
//!
//! An encoded block (little endian):
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `ACPFXKV1` |
//! | 8 | the store's seed (the model's identity) |
//! | 8 | the block's key, 8 its parent's key |
//! | 4 | ids in the block, 4 layers |
//! | 16 per layer | K heads, K head dim, V heads, V head dim |
//! | 4 per id | the ids |
//! | 4 per value | each layer's K then V, f32, `[heads, ids, dim]` |
//! | 8 | XXH3 of everything before |
//!
//! [`decode`] checks all of it against what the lookup expects: the magic, the seed, the
//! key it was read under, that the ids and the parent hash to that key, the sizes and the
//! checksum. Anything else is [`BlockError`], which the store turns into a miss.

use candle_core::{DType, Device, Result, Tensor};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

const MAGIC: &[u8; 8] = b"ACPFXKV1";
/// Bytes before the per-layer shapes.
const HEAD: usize = 8 + 8 + 8 + 8 + 4 + 4;

/// Each layer's (heads, head_dim) of K and of V.
pub(crate) type Shapes = Vec<((usize, usize), (usize, usize))>;

/// One stored block: its ids, its parent's key and each layer's K and V for its positions,
/// f32 values in `[kv_heads, block_tokens, head_dim]` order.
#[derive(Debug, PartialEq)]
pub(crate) struct Block {
    pub(crate) parent: u64,
    pub(crate) tokens: Vec<u32>,
    pub(crate) layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// Each layer's (kv_heads, head_dim) of K and of V.
    pub(crate) shapes: Shapes,
    /// Bytes of K/V held (the hot tier's weight).
    pub(crate) bytes: u32,
}

impl Block {
    /// A block of `tokens` after the block keyed `parent`, with its layers' K/V.
    pub(crate) fn new(
        parent: u64,
        tokens: Vec<u32>,
        layers: Vec<(Vec<f32>, Vec<f32>)>,
        shapes: Shapes,
    ) -> Self {
        let bytes = layers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * 4)
            .sum::<usize>();
        Self {
            parent,
            tokens,
            layers,
            shapes,
            bytes: u32::try_from(bytes).unwrap_or(u32::MAX),
        }
    }
}

/// The key of a block whose parent has key `parent`: it names the whole prefix.
pub(crate) fn key(parent: u64, tokens: &[u32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    xxh3_64_with_seed(&bytes, parent)
}

/// A layer's K or V as `[heads, len, dim]` f32 values (one copy of mistral.rs's view).
pub(crate) fn values(t: &Tensor) -> Result<(Vec<f32>, usize, usize)> {
    let (_, heads, _, dim) = t.dims4()?;
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    Ok((v, heads, dim))
}

/// Positions `[start, start + n)` of `[heads, len, dim]` values, as `[heads, n, dim]`.
pub(crate) fn rows(
    v: &[f32],
    heads: usize,
    len: usize,
    dim: usize,
    start: usize,
    n: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(heads * n * dim);
    for h in 0..heads {
        let from = (h * len + start) * dim;
        out.extend_from_slice(&v[from..from + n * dim]);
    }
    out
}

/// Why stored bytes are not the block a lookup asked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    /// Shorter than its header or its sizes say.
    #[error("truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a prefix block at all.
    #[error("not a prefix block (bad magic)")]
    Foreign,
    /// A block of another model, or of the same model under another layout.
    #[error("stored for another model")]
    OtherModel,
    /// The checksum does not match the contents.
    #[error("checksum mismatch")]
    Corrupt,
    /// The header names another key, or the ids and parent do not hash to it.
    #[error("stored under another prefix's key")]
    WrongKey,
    /// Sizes that cannot be a block of this store.
    #[error("bad sizes: {0}")]
    BadShape(&'static str),
}

/// The bytes of `block`, keyed `key`, for a store seeded `seed`.
pub(crate) fn encode(block: &Block, key: u64, seed: u64) -> Vec<u8> {
    let values: usize = block.layers.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(
        HEAD + 16 * block.shapes.len() + 4 * block.tokens.len() + 4 * values + 8,
    );
    out.extend_from_slice(MAGIC);
    for x in [seed, key, block.parent] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    for x in [block.tokens.len(), block.layers.len()] {
        out.extend_from_slice(&(x as u32).to_le_bytes());
    }
    for &((kh, kd), (vh, vd)) in &block.shapes {
        for x in [kh, kd, vh, vd] {
            out.extend_from_slice(&(x as u32).to_le_bytes());
        }
    }
    for t in &block.tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for (k, v) in &block.layers {
        for x in k.iter().chain(v) {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Little-endian reads from a byte slice, each checked against its end.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> std::result::Result<&[u8], BlockError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or(BlockError::Truncated(self.bytes.len()))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> std::result::Result<u64, BlockError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(
            b.try_into().map_err(|_| BlockError::Truncated(b.len()))?,
        ))
    }

    fn u32(&mut self) -> std::result::Result<u32, BlockError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes(
            b.try_into().map_err(|_| BlockError::Truncated(b.len()))?,
        ))
    }

    fn usize(&mut self) -> std::result::Result<usize, BlockError> {
        Ok(self.u32()? as usize)
    }

    fn f32s(&mut self, n: usize) -> std::result::Result<Vec<f32>, BlockError> {
        let b = self.take(
            n.checked_mul(4)
                .ok_or(BlockError::BadShape("too many values"))?,
        )?;
        Ok(b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

/// The block in `bytes`, checked to be block `key` of a store seeded `seed` whose blocks
/// hold `block_tokens` ids.
pub(crate) fn decode(
    bytes: &[u8],
    key: u64,
    seed: u64,
    block_tokens: usize,
) -> std::result::Result<Block, BlockError> {
    if bytes.len() < HEAD + 8 {
        return Err(BlockError::Truncated(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(BlockError::Foreign);
    }
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let mut r = Reader { bytes: body, at: 8 };
    if r.u64()? != seed {
        return Err(BlockError::OtherModel);
    }
    let stored_key = r.u64()?;
    let parent = r.u64()?;
    let (n_tokens, n_layers) = (r.usize()?, r.usize()?);
    if n_tokens != block_tokens {
        return Err(BlockError::BadShape("ids per block"));
    }
    if n_layers == 0 || n_layers > 4096 {
        return Err(BlockError::BadShape("layers"));
    }
    let mut shapes = Vec::with_capacity(n_layers);
    for _ in 0..n_layers {
        let s = (r.usize()?, r.usize()?, r.usize()?, r.usize()?);
        shapes.push(((s.0, s.1), (s.2, s.3)));
    }
    let tokens = (0..n_tokens)
        .map(|_| r.u32())
        .collect::<std::result::Result<Vec<u32>, _>>()?;
    // the checksum before the values: a flipped size is a corrupt block, not a huge read
    if xxh3_64(body).to_le_bytes() != sum {
        return Err(BlockError::Corrupt);
    }
    if stored_key != key || self::key(parent, &tokens) != key {
        return Err(BlockError::WrongKey);
    }
    let mut layers = Vec::with_capacity(n_layers);
    for &((kh, kd), (vh, vd)) in &shapes {
        let k = r.f32s(kh * n_tokens * kd)?;
        let v = r.f32s(vh * n_tokens * vd)?;
        layers.push((k, v));
    }
    if r.at != body.len() {
        return Err(BlockError::BadShape("trailing bytes"));
    }
    Ok(Block::new(parent, tokens, layers, shapes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> (Block, u64) {
        let tokens = vec![3, 1, 4, 1];
        let parent = 77;
        let layers = (0..2)
            .map(|l| {
                let k: Vec<f32> = (0..2 * 4 * 3).map(|i| (l * 100 + i) as f32 * 0.5).collect();
                let v: Vec<f32> = (0..4 * 2).map(|i| -((l * 10 + i) as f32)).collect();
                (k, v)
            })
            .collect();
        let shapes = vec![((2, 3), (1, 2)); 2];
        let b = Block::new(parent, tokens.clone(), layers, shapes);
        (b, key(parent, &tokens))
    }

    #[test]
    fn a_block_round_trips_exactly() {
        let (b, k) = block();
        let bytes = encode(&b, k, 9);
        assert_eq!(decode(&bytes, k, 9, 4), Ok(b));
    }

    #[test]
    fn every_damage_is_an_error_never_another_block() {
        let (b, k) = block();
        let bytes = encode(&b, k, 9);
        assert_eq!(decode(&bytes, k, 10, 4), Err(BlockError::OtherModel));
        assert_eq!(decode(&bytes, k ^ 1, 9, 4), Err(BlockError::WrongKey));
        assert_eq!(
            decode(&bytes, k, 9, 8),
            Err(BlockError::BadShape("ids per block"))
        );
        assert!(matches!(
            decode(&bytes[..bytes.len() - 5], k, 9, 4),
            Err(BlockError::Corrupt | BlockError::Truncated(_))
        ));
        assert_eq!(
            decode(&bytes[..20], k, 9, 4),
            Err(BlockError::Truncated(20))
        );
        let mut foreign = bytes.clone();
        foreign[0] = b'X';
        assert_eq!(decode(&foreign, k, 9, 4), Err(BlockError::Foreign));
        // a flipped bit anywhere after the magic and the seed: never Ok
        for at in (16..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(decode(&bad, k, 9, 4).is_err(), "flip at {at}");
        }
    }
}
