//! One cache entry ([`Entry`]): an input's token ids and similarity feature, and what a hit
//! reuses ([`Payload`]: every layer's attention maps, or the per-layer K/V and hidden
//! states of a blend entry, [`BlendStates`]); and its encoding, written by [`encode`] and
//! checked by [`decode`].
//!
//! Every version's layout (a 64-byte header, then the payload) is in
//! `docs/entry-format.md`: version 4 holds maps (dtype 1), version 5 blend states (dtype 2:
//! K/V in f16, dtype 3: int8), version 6 blend states with the states after a resume layer.
//! Versions 5 and 6 place the head dimension, hidden size and check layer at different
//! offsets; [`read_header`] reads each version by its own layout.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::storage::layer_kv::{Int8Kv, KvFormat, LayerKv};

/// Bytes before the payload.
pub const HEADER_BYTES: usize = 64;
const MAGIC: &[u8; 8] = b"ATNCACHE";
/// 4: maps computed with the reference implementation's bidirectional sliding window
/// (`|i - j| < W / 2 + 1`, the conformance fix). Entries of version 3 hold maps of inputs over
/// 257 tokens computed with mistral.rs's wider window; they read as foreign (a miss), never
/// as a hit with wrong maps.
const VERSION: u32 = 4;
const DTYPE_F16: u32 = 1;
/// Blend entries (per-layer K/V and hidden states) were added in version 5.
const BLEND_VERSION: u32 = 5;
const DTYPE_BLEND_F16: u32 = 2;
/// Blend entries with int8 K/V (same version: a reader of version 5 knows both).
const DTYPE_BLEND_INT8: u32 = 3;
/// Blend entries that also keep the states after a resume layer (either K/V dtype).
const BLEND_RESUME_VERSION: u32 = 6;

/// What a blend entry keeps for blend reuse (`crate::reuse::blend`): every layer's K (after its
/// norm, before RoPE, so it can be rotated to other positions) and V for every token, and
/// the hidden states after the check layer and after the last layer, on the CPU: K/V in f16
/// or int8 ([`LayerKv`]), the states in f32 (Gemma-3's residual stream holds values beyond f16's 65504: stored as
/// f16, EmbeddingGemma's final states overflowed to infinity).
#[derive(Debug, Clone)]
pub struct BlendStates {
    /// Per layer `[2, kv_heads, L, head_dim]`: K, then V (every layer in one format).
    pub kv: Vec<LayerKv>,
    /// `[L, hidden]` f32 after layer `check_layer`.
    pub check: Tensor,
    /// `[L, hidden]` f32 after the last layer (before the model's final norm).
    pub last: Tensor,
    /// The layer after which a blend selects the positions it recomputes.
    pub check_layer: usize,
    /// `(layer, [L, hidden] f32)`: the states after that layer, kept when the recording policy
    /// has a resume layer ([`crate::reuse::blend::BlendPolicy::resume_layer`]). An escalated
    /// hit runs the layers up to it on S only, then puts S's rows into these states and runs
    /// the remaining layers on every position.
    pub resume: Option<(usize, Tensor)>,
}

impl BlendStates {
    /// `(kv_heads, head_dim, hidden)`.
    pub fn dims(&self) -> (usize, usize, usize) {
        let kv = self.kv.first().map(|t| t.dims()).unwrap_or(&[0, 0, 0, 0]);
        let hidden = self.check.dims().get(1).copied().unwrap_or(0);
        (
            kv.get(1).copied().unwrap_or(0),
            kv.get(3).copied().unwrap_or(0),
            hidden,
        )
    }

    /// The format of its K/V (f16 when it has no layer).
    pub fn kv_format(&self) -> KvFormat {
        self.kv.first().map_or(KvFormat::F16, LayerKv::format)
    }

    fn payload(&self, len: usize) -> usize {
        let (_, _, hidden) = self.dims();
        let states = if self.resume.is_some() { 12 } else { 8 };
        self.kv.iter().map(LayerKv::bytes).sum::<usize>() + states * len * hidden
    }
}

/// Every layer's attention probabilities for one input (`--reuse maps`).
#[derive(Debug, Clone)]
pub struct AttentionMaps {
    /// Query heads per layer.
    pub heads: usize,
    /// One tensor per layer, `[heads, L, L]`, f16 on the CPU.
    pub layers: Vec<Tensor>,
}

/// What a hit on an entry reuses.
#[derive(Debug, Clone)]
pub enum Payload {
    /// Every layer's attention maps (`--reuse maps`).
    Maps(AttentionMaps),
    /// Every layer's K/V and the hidden states blend reuse needs (`--reuse blend`).
    Blend(Arc<BlendStates>),
}

/// One cache entry: an input's tokens and feature, and what a hit reuses ([`Payload`]).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The input's token ids; an exact lookup must match them.
    pub tokens: Arc<[u32]>,
    /// The input's feature vector for similarity lookups (empty: exact lookups only).
    pub feature: Arc<[f32]>,
    /// Which feature computation produced `feature`
    /// ([`crate::lookup::features::FeatureExtractor::id`]).
    pub feature_id: u32,
    /// Attention maps or blend states.
    pub payload: Payload,
}

impl Entry {
    /// Its attention maps, for a map entry.
    pub fn maps(&self) -> Option<&AttentionMaps> {
        match &self.payload {
            Payload::Maps(m) => Some(m),
            Payload::Blend(_) => None,
        }
    }

    /// Its blend states, for a blend entry.
    pub fn blend(&self) -> Option<&Arc<BlendStates>> {
        match &self.payload {
            Payload::Blend(b) => Some(b),
            Payload::Maps(_) => None,
        }
    }

    /// Its per-layer attention maps (none for a blend entry).
    pub fn map_layers(&self) -> &[Tensor] {
        self.maps().map_or(&[], |m| &m.layers)
    }

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
        let payload = match &self.payload {
            Payload::Maps(m) => 2 * m.layers.len() * m.heads * l * l,
            Payload::Blend(b) => b.payload(l),
        };
        4 * l + 4 * self.feature.len() + payload
    }

    /// Whether this is a blend entry (per-layer K/V) rather than attention maps.
    pub fn is_blend(&self) -> bool {
        matches!(self.payload, Payload::Blend(_))
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
    /// For a blend entry, its shape.
    pub blend: Option<BlendShape>,
}

/// The shape of a blend entry's states, from its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlendShape {
    /// Head dimension D.
    pub head_dim: usize,
    /// Hidden size H.
    pub hidden: usize,
    /// The layer after which its check states were taken.
    pub check_layer: usize,
    /// The layer after which its resume states were taken (version 6), if any.
    pub resume_layer: Option<usize>,
    /// How its K/V are kept.
    pub kv_format: KvFormat,
}

impl Header {
    /// Bytes from the start of the file to the end of the feature vector.
    pub fn prefix_bytes(&self) -> usize {
        HEADER_BYTES + 4 * self.len + 4 * self.feature_dim
    }
}

fn payload_bytes(
    layers: usize,
    heads: usize,
    len: usize,
    feature_dim: usize,
    blend: Option<BlendShape>,
) -> Option<usize> {
    let maps = match blend {
        None => layers
            .checked_mul(heads)?
            .checked_mul(len)?
            .checked_mul(len)?
            .checked_mul(2)?,
        Some(b) => {
            let rows = heads.checked_mul(len)?.checked_mul(2)?;
            let per_layer = match b.kv_format {
                KvFormat::F16 => rows.checked_mul(b.head_dim)?.checked_mul(2)?,
                KvFormat::Int8 => rows
                    .checked_mul(b.head_dim)?
                    .checked_add(rows.checked_mul(4)?)?,
            };
            let states = if b.resume_layer.is_some() { 12 } else { 8 };
            layers
                .checked_mul(per_layer)?
                .checked_add(len.checked_mul(b.hidden)?.checked_mul(states)?)?
        }
    };
    maps.checked_add(len.checked_mul(4)?)?
        .checked_add(feature_dim.checked_mul(4)?)
}

/// Encodes `entry` for `fingerprint` into the file layout above.
pub fn encode(entry: &Entry, fingerprint: u64) -> candle_core::Result<Vec<u8>> {
    let len = entry.len();
    let (layers, heads) = match &entry.payload {
        Payload::Blend(b) => (b.kv.len(), b.dims().0),
        Payload::Maps(m) => (m.layers.len(), m.heads),
    };
    let payload = entry.bytes();
    let mut out = Vec::with_capacity(HEADER_BYTES + payload);
    out.extend_from_slice(MAGIC);
    let (version, dtype) = match entry.blend() {
        Some(b) => (
            match b.resume {
                Some(_) => BLEND_RESUME_VERSION,
                None => BLEND_VERSION,
            },
            match b.kv_format() {
                KvFormat::F16 => DTYPE_BLEND_F16,
                KvFormat::Int8 => DTYPE_BLEND_INT8,
            },
        ),
        None => (VERSION, DTYPE_F16),
    };
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&dtype.to_le_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    for v in [layers, heads, len, entry.feature.len()] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    out.extend_from_slice(&(payload as u64).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // crc, filled below
    out.extend_from_slice(&entry.feature_id.to_le_bytes());
    match entry.blend() {
        Some(b) => {
            let (_, d, hidden) = b.dims();
            let small = |v: usize, what| {
                u16::try_from(v).map_err(|_| candle_core::Error::msg(format!("{what} {v} > 65535")))
            };
            match &b.resume {
                Some((resume, _)) => {
                    out.extend_from_slice(&small(d, "head dimension")?.to_le_bytes());
                    out.extend_from_slice(&small(hidden, "hidden size")?.to_le_bytes());
                    out.extend_from_slice(&small(b.check_layer, "check layer")?.to_le_bytes());
                    out.extend_from_slice(&small(*resume, "resume layer")?.to_le_bytes());
                }
                None => {
                    out.extend_from_slice(&(d as u32).to_le_bytes());
                    out.extend_from_slice(&small(hidden, "hidden size")?.to_le_bytes());
                    out.extend_from_slice(&small(b.check_layer, "check layer")?.to_le_bytes());
                }
            }
        }
        None => out.extend_from_slice(&[0u8; 8]), // reserved
    }
    for t in entry.tokens.iter() {
        out.extend_from_slice(&t.to_le_bytes());
    }
    for f in entry.feature.iter() {
        out.extend_from_slice(&f.to_le_bytes());
    }
    if let Some(b) = entry.blend() {
        encode_states(b, len, &mut out)?;
    }
    for layer in entry.map_layers() {
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

/// Appends a blend entry's K/V (f16, or int8 then scales) and hidden states (f32) after
/// checking their shapes and that every layer has one format.
fn encode_states(b: &BlendStates, len: usize, out: &mut Vec<u8>) -> candle_core::Result<()> {
    let (kv, d, hidden) = b.dims();
    let format = b.kv_format();
    for layer in &b.kv {
        if layer.dims() != [2, kv, len, d] || layer.format() != format {
            candle_core::bail!(
                "blend k/v {:?} in {}, expected [2, {kv}, {len}, {d}] in {format}",
                layer.dims(),
                layer.format()
            );
        }
        match layer {
            LayerKv::F16(t) => {
                let values = t
                    .to_dtype(DType::F16)?
                    .flatten_all()?
                    .to_vec1::<half::f16>()?;
                out.reserve(2 * values.len());
                for v in values {
                    out.extend_from_slice(&v.to_bits().to_le_bytes());
                }
            }
            LayerKv::Int8(q) => {
                out.reserve(layer.bytes());
                out.extend(q.values().iter().map(|&v| v as u8));
                for s in q.scales() {
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
        }
    }
    let resume = b.resume.as_ref().map(|(_, t)| (t, "resume states"));
    for (t, what) in [(&b.check, "check states"), (&b.last, "last states")]
        .into_iter()
        .chain(resume)
    {
        if t.dims() != [len, hidden] {
            candle_core::bail!("blend {what} {:?}, expected [{len}, {hidden}]", t.dims());
        }
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        out.reserve(4 * values.len());
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(())
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
    let version = u32_at(bytes, 8);
    let kv_format = match (version, u32_at(bytes, 12)) {
        (VERSION, DTYPE_F16) => None,
        (BLEND_VERSION | BLEND_RESUME_VERSION, DTYPE_BLEND_F16) => Some(KvFormat::F16),
        (BLEND_VERSION | BLEND_RESUME_VERSION, DTYPE_BLEND_INT8) => Some(KvFormat::Int8),
        _ => return Err(DecodeError::Foreign),
    };
    if &bytes[..8] != MAGIC {
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
    let blend = kv_format.map(|kv_format| {
        let small = |at| u16::from_le_bytes([bytes[at], bytes[at + 1]]) as usize;
        match version {
            BLEND_RESUME_VERSION => BlendShape {
                head_dim: small(56),
                hidden: small(58),
                check_layer: small(60),
                resume_layer: Some(small(62)),
                kv_format,
            },
            _ => BlendShape {
                head_dim: field(56),
                hidden: small(60),
                check_layer: small(62),
                resume_layer: None,
                kv_format,
            },
        }
    });
    if let Some(b) = blend {
        if b.head_dim == 0 || b.hidden == 0 || b.check_layer >= layers {
            return Err(DecodeError::BadHeader(
                "zero head dimension or hidden size, or no check layer",
            ));
        }
        if b.resume_layer
            .is_some_and(|r| r <= b.check_layer || r + 1 >= layers)
        {
            return Err(DecodeError::BadHeader(
                "resume layer not between the check layer and the last",
            ));
        }
    }
    if payload_bytes(layers, heads, len, feature_dim, blend) != Some(payload) {
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
        blend,
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
pub fn decode(bytes: &[u8], fingerprint: u64) -> Result<Entry, DecodeError> {
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
    if let Some(shape) = h.blend {
        let (d, hidden) = (shape.head_dim, shape.hidden);
        let tensor = |start: usize, shape: &[usize], dtype: DType| {
            let n: usize = shape.iter().product::<usize>() * dtype.size_in_bytes();
            Tensor::from_raw_buffer(&bytes[start..start + n], dtype, shape, &Device::Cpu)
        };
        let dims = [2, h.heads, h.len, d];
        let (values, rows) = (2 * h.heads * h.len * d, 2 * h.heads * h.len);
        let per_layer = match shape.kv_format {
            KvFormat::F16 => 2 * values,
            KvFormat::Int8 => values + 4 * rows,
        };
        let states = (|| -> candle_core::Result<BlendStates> {
            let kv = (0..h.layers)
                .map(|l| {
                    let start = maps_start + l * per_layer;
                    match shape.kv_format {
                        KvFormat::F16 => Ok(LayerKv::F16(tensor(start, &dims, DType::F16)?)),
                        KvFormat::Int8 => {
                            let q = &bytes[start..start + values];
                            let scales = bytes[start + values..start + per_layer]
                                .chunks_exact(4)
                                .map(|c| f32::from_bits(u32_at(c, 0)))
                                .collect::<Vec<f32>>();
                            Ok(LayerKv::Int8(Int8Kv::new(
                                dims,
                                q.iter().map(|&b| b as i8).collect(),
                                scales.into(),
                            )?))
                        }
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let at = maps_start + h.layers * per_layer;
            let states = 4 * h.len * hidden;
            let resume = match shape.resume_layer {
                Some(layer) => Some((
                    layer,
                    tensor(at + 2 * states, &[h.len, hidden], DType::F32)?,
                )),
                None => None,
            };
            Ok(BlendStates {
                kv,
                check: tensor(at, &[h.len, hidden], DType::F32)?,
                last: tensor(at + states, &[h.len, hidden], DType::F32)?,
                check_layer: shape.check_layer,
                resume,
            })
        })()
        .map_err(|_| DecodeError::BadHeader("states do not fit the shape"))?;
        return Ok(Entry {
            tokens: tokens.into(),
            feature: feature.into(),
            feature_id: h.feature_id,
            payload: Payload::Blend(Arc::new(states)),
        });
    }
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
    Ok(Entry {
        tokens: tokens.into(),
        feature: feature.into(),
        feature_id: h.feature_id,
        payload: Payload::Maps(AttentionMaps {
            heads: h.heads,
            layers,
        }),
    })
}

/// An entry a cold tier holds (found at start, or announced by another replica): its key,
/// token count and feature vector.
#[derive(Debug, Clone)]
pub struct Indexed {
    /// Store key ([`crate::storage::stable_hash::token_key`] of its tokens).
    pub key: u64,
    /// Token count.
    pub len: usize,
    /// Token ids.
    pub tokens: std::sync::Arc<[u32]>,
    /// Feature vector (empty when the entry was stored without one).
    pub feature: Vec<f32>,
    /// Which feature computation produced it.
    pub feature_id: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blend_entry(format: KvFormat) -> Entry {
        let dev = Device::Cpu;
        let (layers, kv, len, d, hidden) = (4, 2, 5, 8, 6);
        let t = |shape: &[usize], salt: f32| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect();
            crate::kernels::f16_maps::to_f16(&Tensor::from_vec(v, shape, &dev).unwrap()).unwrap()
        };
        Entry {
            tokens: Arc::from(vec![3u32, 1, 4, 1, 5]),
            feature: Arc::from(vec![0.5f32, -1.0]),
            feature_id: 9,
            payload: Payload::Blend(Arc::new(BlendStates {
                kv: (0..layers)
                    .map(|l| LayerKv::encode(&t(&[2, kv, len, d], l as f32), format).unwrap())
                    .collect(),
                check: t(&[len, hidden], 10.0).to_dtype(DType::F32).unwrap(),
                last: t(&[len, hidden], 11.0).to_dtype(DType::F32).unwrap(),
                check_layer: 1,
                resume: None,
            })),
        }
    }

    fn values(t: &Tensor) -> Vec<f32> {
        crate::kernels::f16_maps::to_f32(t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn an_int8_blend_entry_round_trips_and_is_checked() {
        let e = blend_entry(KvFormat::Int8);
        let bytes = encode(&e, 42).unwrap();
        assert_eq!(bytes.len(), HEADER_BYTES + e.bytes());
        // layers·(2·kv·D + 8·kv) + 8·H bytes a token (+ the id): 18.6 KB for EmbeddingGemma
        assert_eq!(
            e.bytes(),
            4 * 5 + 4 * 2 + 4 * (2 * 2 * 5 * 8 + 8 * 2 * 5) + 8 * 5 * 6
        );
        assert_eq!(u32_at(&bytes, 12), DTYPE_BLEND_INT8);
        let back = decode(&bytes, 42).unwrap();
        let (a, b) = (e.blend().unwrap(), back.blend().unwrap());
        assert_eq!(b.kv_format(), KvFormat::Int8);
        for (x, y) in a.kv.iter().zip(&b.kv) {
            assert_eq!(values(&x.to_f32().unwrap()), values(&y.to_f32().unwrap()));
        }
        assert_eq!(values(&a.last), values(&b.last));
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 30] ^= 1;
        assert_eq!(decode(&flipped, 42).unwrap_err(), DecodeError::Corrupt);
        // the same payload announced as f16 K/V does not fit its size
        let mut other_format = bytes;
        other_format[12] = DTYPE_BLEND_F16 as u8;
        assert!(matches!(
            decode(&other_format, 42),
            Err(DecodeError::BadHeader(_))
        ));
    }

    #[test]
    fn a_blend_entry_round_trips_and_is_checked() {
        let e = blend_entry(KvFormat::F16);
        let bytes = encode(&e, 42).unwrap();
        assert_eq!(bytes.len(), HEADER_BYTES + e.bytes());
        // 4·layers·kv·D + 8·H bytes a token (+ the id): 30.7 KB for EmbeddingGemma
        assert_eq!(e.bytes(), 4 * 5 + 4 * 2 + 4 * 4 * 2 * 5 * 8 + 8 * 5 * 6);
        let back = decode(&bytes, 42).unwrap();
        assert!(back.is_blend() && back.map_layers().is_empty());
        assert_eq!(&back.tokens[..], &e.tokens[..]);
        assert_eq!(back.feature_id, 9);
        let (a, b) = (e.blend().unwrap(), back.blend().unwrap());
        assert_eq!(b.check_layer, 1);
        assert_eq!(b.dims(), (2, 8, 6));
        for (x, y) in a.kv.iter().zip(&b.kv) {
            assert_eq!(values(&x.to_f32().unwrap()), values(&y.to_f32().unwrap()));
        }
        assert_eq!(values(&a.check), values(&b.check));
        assert_eq!(values(&a.last), values(&b.last));
        // any flipped payload byte is caught by the checksum; the header's kind is checked
        let mut flipped = bytes.clone();
        flipped[HEADER_BYTES + 30] ^= 1;
        assert_eq!(decode(&flipped, 42).unwrap_err(), DecodeError::Corrupt);
        let mut other_kind = bytes.clone();
        other_kind[12] = 1; // blend payload announced as maps of version 5
        assert_eq!(decode(&other_kind, 42).unwrap_err(), DecodeError::Foreign);
        let mut bad_check = bytes;
        bad_check[62] = 4; // check layer 4 of 4 layers
        assert!(matches!(
            decode(&bad_check, 42),
            Err(DecodeError::BadHeader(_))
        ));
    }

    #[test]
    fn a_blend_entry_with_resume_states_is_version_6_and_checked() {
        let mut e = blend_entry(KvFormat::Int8);
        let plain = encode(&e, 42).unwrap();
        let mut states = (**e.blend().unwrap()).clone();
        let resume = states.last.affine(0.5, 1.0).unwrap();
        states.resume = Some((2, resume));
        e.payload = Payload::Blend(Arc::new(states));
        let bytes = encode(&e, 42).unwrap();
        assert_eq!(u32_at(&bytes, 8), BLEND_RESUME_VERSION);
        assert_eq!(
            u32_at(&plain, 8),
            BLEND_VERSION,
            "no resume states: still version 5"
        );
        // 4·L·H bytes more than the same entry without them
        assert_eq!(bytes.len(), plain.len() + 4 * 5 * 6);
        assert_eq!(bytes.len(), HEADER_BYTES + e.bytes());
        let h = read_header(&bytes, 42).unwrap();
        let shape = h.blend.unwrap();
        assert_eq!((shape.head_dim, shape.hidden), (8, 6));
        assert_eq!((shape.check_layer, shape.resume_layer), (1, Some(2)));
        let back = decode(&bytes, 42).unwrap();
        let (a, b) = (e.blend().unwrap(), back.blend().unwrap());
        let ((la, ta), (lb, tb)) = (a.resume.clone().unwrap(), b.resume.clone().unwrap());
        assert_eq!(la, lb);
        assert_eq!(values(&ta), values(&tb));
        assert_eq!(values(&a.last), values(&b.last));
        assert_eq!(values(&a.check), values(&b.check));
        // a resume layer that is not between the check layer and the last is refused
        for bad in [1u16, 3] {
            let mut x = bytes.clone();
            x[62..64].copy_from_slice(&bad.to_le_bytes());
            assert!(
                matches!(decode(&x, 42), Err(DecodeError::BadHeader(_))),
                "resume layer {bad}"
            );
        }
        let mut flipped = bytes;
        let n = flipped.len();
        flipped[n - 3] ^= 1; // inside the resume states
        assert_eq!(decode(&flipped, 42).unwrap_err(), DecodeError::Corrupt);
    }
}
