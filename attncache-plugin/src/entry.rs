//! One cache entry: every layer's post-softmax attention maps for one input (plus the
//! input's feature vector for similarity lookups), and its on-disk encoding.
//!
//! File layout (little endian), written by [`encode`] and checked by [`decode`]:
//!
//! ```text
//! offset size  field
//!  0      8    magic "ATNCACHE"
//!  8      4    format version (4)
//! 12      4    map dtype (1 = f16)
//! 16      8    model fingerprint
//! 24      4    layers
//! 28      4    heads (query heads, after kv repetition)
//! 32      4    tokens (L)
//! 36      4    feature dimension F (0: none)
//! 40      8    payload bytes = 4·L + 4·F + 2·layers·heads·L·L
//! 48      4    crc32 of bytes 0..48, 52..64 and of the payload
//! 52      4    feature id (which feature computation produced the feature)
//! 56      8    reserved (0)
//! 64      …    payload: token ids (u32 × L), feature (f32 × F), then maps
//!              (f16, [layer][head][row][col])
//! ```

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

/// Bytes before the payload.
pub const HEADER_BYTES: usize = 64;
const MAGIC: &[u8; 8] = b"ATNCACHE";
/// 4: maps computed with the reference implementation's bidirectional sliding window
/// (`|i - j| < W / 2 + 1`, the conformance fix). Entries of version 3 hold maps of inputs over
/// 257 tokens computed with mistral.rs's wider window; they read as foreign (a miss), never
/// as a hit with wrong maps.
const VERSION: u32 = 4;
const DTYPE_F16: u32 = 1;

/// Every layer's attention probabilities for one tokenised input.
#[derive(Debug, Clone)]
pub struct MapEntry {
    /// The input's token ids; an exact lookup must match them.
    pub tokens: Arc<[u32]>,
    /// Query heads per layer.
    pub heads: usize,
    /// One tensor per layer, `[heads, L, L]`, f16 on the CPU.
    pub layers: Vec<Tensor>,
    /// The input's feature vector for similarity lookups (empty: exact lookups only).
    pub feature: Arc<[f32]>,
    /// Which feature computation produced `feature`
    /// ([`crate::features::FeatureExtractor::id`]).
    pub feature_id: u32,
}

impl MapEntry {
    /// Token count L.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether the entry covers no tokens (never true for a stored entry).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Payload bytes: what the entry occupies in memory and (plus the header) on disk.
    pub fn bytes(&self) -> usize {
        let l = self.len();
        4 * l + 4 * self.feature.len() + 2 * self.layers.len() * self.heads * l * l
    }
}

/// Why bytes could not be decoded into an entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter (or longer) than its header says.
    #[error("truncated: {got} bytes, expected {want}")]
    Truncated {
        /// Bytes present.
        got: usize,
        /// Bytes the header announces.
        want: usize,
    },
    /// Not an AttnCache entry, or a format version this build does not read.
    #[error("not an attncache entry of this version (bad magic, version or dtype)")]
    Foreign,
    /// Written for another model.
    #[error("entry of another model (fingerprint {got:016x}, expected {want:016x})")]
    OtherModel {
        /// Fingerprint in the file.
        got: u64,
        /// Fingerprint of the running model.
        want: u64,
    },
    /// Checksum mismatch: the bytes changed after writing.
    #[error("checksum mismatch")]
    Corrupt,
    /// Header fields that cannot describe a valid entry.
    #[error("inconsistent header: {0}")]
    BadHeader(&'static str),
}

/// Header fields, as read by [`read_header`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Model fingerprint.
    pub fingerprint: u64,
    /// Layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Tokens.
    pub len: usize,
    /// Feature dimension.
    pub feature_dim: usize,
    /// Feature id.
    pub feature_id: u32,
    /// Payload bytes.
    pub payload: usize,
}

impl Header {
    /// Bytes from the start of the file to the end of the feature vector.
    pub fn prefix_bytes(&self) -> usize {
        HEADER_BYTES + 4 * self.len + 4 * self.feature_dim
    }
}

fn payload_bytes(layers: usize, heads: usize, len: usize, feature_dim: usize) -> Option<usize> {
    let maps = layers
        .checked_mul(heads)?
        .checked_mul(len)?
        .checked_mul(len)?
        .checked_mul(2)?;
    maps.checked_add(len.checked_mul(4)?)?
        .checked_add(feature_dim.checked_mul(4)?)
}

/// Encodes `entry` for `fingerprint` into the file layout above.
pub fn encode(entry: &MapEntry, fingerprint: u64) -> candle_core::Result<Vec<u8>> {
    let (layers, heads, len) = (entry.layers.len(), entry.heads, entry.len());
    let payload = entry.bytes();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&DTYPE_F16.to_le_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    for v in [layers, heads, len, entry.feature.len()] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out.extend_from_slice(&(payload as u64).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // crc, filled below
    out.extend_from_slice(&entry.feature_id.to_le_bytes());
    out.extend_from_slice(&[0u8; 8]); // reserved
    for t in entry.tokens.iter() {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for f in entry.feature.iter() {
        out.extend_from_slice(&f.to_le_bytes());
    }
    for layer in &entry.layers {
        if layer.dims() != [heads, len, len] {
            candle_core::bail!(
                "layer maps {:?}, expected [{heads}, {len}, {len}]",
                layer.dims()
            );
        }
        let values = layer
            .to_dtype(DType::F16)?
            .flatten_all()?
            .to_vec1::<half::f16>()?;
        for v in values {
            out.extend_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    let crc = checksum(&out);
    out[48..52].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn checksum(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..48]);
    h.update(&bytes[52..]);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Reads and checks the header (not the checksum) of an encoded entry.
pub fn read_header(bytes: &[u8], fingerprint: u64) -> Result<Header, DecodeError> {
    if bytes.len() < HEADER_BYTES {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            want: HEADER_BYTES,
        });
    }
    if &bytes[..8] != MAGIC || u32_at(bytes, 8) != VERSION || u32_at(bytes, 12) != DTYPE_F16 {
        return Err(DecodeError::Foreign);
    }
    let got = u64_at(bytes, 16);
    if got != fingerprint {
        return Err(DecodeError::OtherModel {
            got,
            want: fingerprint,
        });
    }
    let field = |at| u32_at(bytes, at) as usize;
    let (layers, heads, len, feature_dim) = (field(24), field(28), field(32), field(36));
    if layers == 0 || heads == 0 || len == 0 {
        return Err(DecodeError::BadHeader("zero layers, heads or tokens"));
    }
    let payload = u64_at(bytes, 40) as usize;
    if payload_bytes(layers, heads, len, feature_dim) != Some(payload) {
        return Err(DecodeError::BadHeader(
            "payload size does not match the shape",
        ));
    }
    Ok(Header {
        fingerprint: got,
        layers,
        heads,
        len,
        feature_dim,
        feature_id: u32_at(bytes, 52),
        payload,
    })
}

/// Reads the token ids and the feature vector from the first [`Header::prefix_bytes`]
/// bytes of an entry (not checksummed: the full read in [`decode`] is).
pub fn read_prefix(bytes: &[u8], h: &Header) -> Option<(Vec<u32>, Vec<f32>)> {
    if bytes.len() < h.prefix_bytes() {
        return None;
    }
    let tok_end = HEADER_BYTES + 4 * h.len;
    let tokens = bytes[HEADER_BYTES..tok_end]
        .chunks_exact(4)
        .map(|c| u32_at(c, 0))
        .collect();
    let feature = bytes[tok_end..h.prefix_bytes()]
        .chunks_exact(4)
        .map(|c| f32::from_bits(u32_at(c, 0)))
        .collect();
    Some((tokens, feature))
}

/// Decodes an entry written by [`encode`], checking every header field and the checksum.
pub fn decode(bytes: &[u8], fingerprint: u64) -> Result<MapEntry, DecodeError> {
    let h = read_header(bytes, fingerprint)?;
    let want = HEADER_BYTES + h.payload;
    if bytes.len() != want {
        return Err(DecodeError::Truncated {
            got: bytes.len(),
            want,
        });
    }
    if checksum(bytes) != u32_at(bytes, 48) {
        return Err(DecodeError::Corrupt);
    }
    let (tokens, feature) = read_prefix(bytes, &h).ok_or(DecodeError::BadHeader("short prefix"))?;
    let maps_start = h.prefix_bytes();
    let per_layer = 2 * h.heads * h.len * h.len;
    let layers = (0..h.layers)
        .map(|l| {
            let start = maps_start + l * per_layer;
            let shape = [h.heads, h.len, h.len];
            Tensor::from_raw_buffer(
                &bytes[start..start + per_layer],
                DType::F16,
                &shape,
                &Device::Cpu,
            )
        })
        .collect::<candle_core::Result<Vec<_>>>()
        .map_err(|_| DecodeError::BadHeader("maps do not fit the shape"))?;
    Ok(MapEntry {
        tokens: tokens.into(),
        heads: h.heads,
        layers,
        feature: feature.into(),
        feature_id: h.feature_id,
    })
}
