//! A tiny, deterministic llama-shaped decoder as a GGUF file, for tests (also as `qwen2`,
//! with q/k/v biases: [`write_arch`]).
//!
//! The format and loader the decoder path serves in production (mistral.rs's GGUF loader,
//! the tokenizer it builds from the file's metadata, quantized matmuls, the output tied to
//! the token embedding as in SmolLM2), but 2 layers, hidden size 64, 4 query heads over 2
//! kv heads. The tokenizer is a SentencePiece-style unigram vocabulary (`tokenizer.ggml.model
//! = "llama"`) of `<unk>`, `<s>`, `</s>`, `▁` + each of the tiny embedding model's
//! [`WORDS`], then the single letters and digits, so every lowercase text tokenizes and each
//! word is one token. Weights come from a fixed-seed generator: the same seed writes the
//! same bytes.

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::tiny_model::{Rng, WORDS};

pub(crate) const HIDDEN: usize = 64;
pub(crate) const LAYERS: usize = 2;
pub(crate) const HEADS: usize = 4;
pub(crate) const KV_HEADS: usize = 2;
pub(crate) const HEAD_DIM: usize = HIDDEN / HEADS;
pub(crate) const FFN: usize = 128;
/// The longest input the tiny decoder takes.
pub const CONTEXT: usize = 256;
/// The file name [`write`] gives the model.
pub const FILE: &str = "tiny-decoder.gguf";

/// The vocabulary: specials, then `▁word` for each of [`WORDS`], then `▁` and single
/// characters (each `▁`-prefixed too) for anything else.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    v.extend(WORDS.iter().map(|w| format!("▁{w}")));
    v.push("▁".into());
    for c in ('a'..='z')
        .chain('0'..='9')
        .chain(['.', ',', '?', '!', ':'])
    {
        v.push(c.to_string());
        v.push(format!("▁{c}"));
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|t| seen.insert(t.clone())); // the first of each, in order
    v
}

/// How [`write_with`] stores the weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyWeights {
    /// Q8_0 token embedding, Q4_1 projections (as SmolLM2's file): stock mistral.rs then
    /// quantizes the activations per matmul.
    Quantized,
    /// Every tensor in f32 (the same values before quantization): mistral.rs multiplies them
    /// in f32 in every mode, so the modes differ by their attention kernels alone.
    F32,
    /// Every tensor in f32, holding the values [`TinyWeights::Quantized`] dequantizes to:
    /// the function the quantized file means when its weights are multiplied exactly.
    Dequantized,
}

/// Writes the tiny decoder, quantized ([`TinyWeights::Quantized`]), to `dir`/[`FILE`] from
/// `seed` and returns its path.
pub fn write(dir: &Path, seed: u64) -> anyhow::Result<PathBuf> {
    write_with(dir, seed, TinyWeights::Quantized)
}

/// The architecture [`write_arch`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// `llama` (as SmolLM2): no biases.
    Llama,
    /// `qwen2` (as Qwen2.5): q, k and v projections with a bias.
    Qwen2,
}

impl TinyArch {
    fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// [`write`] with the weight matrices stored as `weights` says.
pub fn write_with(dir: &Path, seed: u64, weights: TinyWeights) -> anyhow::Result<PathBuf> {
    write_arch(dir, seed, weights, TinyArch::Llama)
}

/// [`write_with`] for the architecture `arch`.
pub fn write_arch(
    dir: &Path,
    seed: u64,
    weights: TinyWeights,
    arch: TinyArch,
) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let a = arch.name();
    let key = |k: &str| format!("{a}.{k}");
    let vocab = vocabulary();
    let mut rng = Rng::new(seed);
    // unigram scores: whole words far likelier than letters, so a word is one token
    let scores: Vec<gguf_file::Value> = vocab
        .iter()
        .map(|t| {
            let score = match t.chars().count() {
                _ if t.starts_with('<') => 0.0,
                1 => -10.0,
                2 if t.starts_with('▁') => -9.0,
                _ => -1.0,
            };
            gguf_file::Value::F32(score)
        })
        .collect();
    let types: Vec<gguf_file::Value> = vocab
        .iter()
        .map(|t| gguf_file::Value::I32(if t.starts_with('<') { 3 } else { 1 }))
        .collect();
    let tokens: Vec<gguf_file::Value> = vocab
        .iter()
        .map(|t| gguf_file::Value::String(t.clone()))
        .collect();
    let u32v = |x: usize| gguf_file::Value::U32(x as u32);
    let metadata: Vec<(String, gguf_file::Value)> = vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(a.into()),
        ),
        (
            "general.name".into(),
            gguf_file::Value::String("tiny-decoder".into()),
        ),
        (key("block_count"), u32v(LAYERS)),
        (key("context_length"), u32v(CONTEXT)),
        (key("embedding_length"), u32v(HIDDEN)),
        (key("feed_forward_length"), u32v(FFN)),
        (key("attention.head_count"), u32v(HEADS)),
        (key("attention.head_count_kv"), u32v(KV_HEADS)),
        (key("rope.dimension_count"), u32v(HEAD_DIM)),
        (key("rope.freq_base"), gguf_file::Value::F32(10_000.0)),
        (
            key("attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(1e-5),
        ),
        (
            "tokenizer.ggml.model".into(),
            gguf_file::Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            gguf_file::Value::Array(tokens),
        ),
        (
            "tokenizer.ggml.scores".into(),
            gguf_file::Value::Array(scores),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            gguf_file::Value::Array(types),
        ),
        ("tokenizer.ggml.unknown_token_id".into(), u32v(0)),
        ("tokenizer.ggml.bos_token_id".into(), u32v(1)),
        ("tokenizer.ggml.eos_token_id".into(), u32v(2)),
    ];
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut put = |name: String, t: Tensor, dtype: GgmlDType| -> anyhow::Result<()> {
        let t = match weights {
            TinyWeights::Quantized => QTensor::quantize(&t, dtype)?,
            TinyWeights::F32 => QTensor::quantize(&t, GgmlDType::F32)?,
            TinyWeights::Dequantized => {
                let values = QTensor::quantize(&t, dtype)?.dequantize(&Device::Cpu)?;
                QTensor::quantize(&values, GgmlDType::F32)?
            }
        };
        tensors.push((name, t));
        Ok(())
    };
    let norm = |rng: &mut Rng| -> candle_core::Result<Tensor> {
        // llama's RMSNorm multiplies by the weight: around 1
        rng.tensor(&[HIDDEN], 0.1)? + 1.0
    };
    put(
        "token_embd.weight".into(),
        rng.tensor(&[vocab.len(), HIDDEN], 0.5)?,
        GgmlDType::Q8_0,
    )?;
    for l in 0..LAYERS {
        let p = format!("blk.{l}");
        let q4 = GgmlDType::Q4_1;
        put(
            format!("{p}.attn_norm.weight"),
            norm(&mut rng)?,
            GgmlDType::F32,
        )?;
        put(
            format!("{p}.attn_q.weight"),
            rng.tensor(&[HIDDEN, HIDDEN], 0.15)?,
            q4,
        )?;
        let kv = KV_HEADS * HEAD_DIM;
        put(
            format!("{p}.attn_k.weight"),
            rng.tensor(&[kv, HIDDEN], 0.15)?,
            q4,
        )?;
        put(
            format!("{p}.attn_v.weight"),
            rng.tensor(&[kv, HIDDEN], 0.15)?,
            q4,
        )?;
        if arch == TinyArch::Qwen2 {
            // biases stay f32 in the file, as in Qwen2.5's
            for (name, n) in [("q", HIDDEN), ("k", kv), ("v", kv)] {
                put(
                    format!("{p}.attn_{name}.bias"),
                    rng.tensor(&[n], 0.2)?,
                    GgmlDType::F32,
                )?;
            }
        }
        put(
            format!("{p}.attn_output.weight"),
            rng.tensor(&[HIDDEN, HIDDEN], 0.15)?,
            q4,
        )?;
        put(
            format!("{p}.ffn_norm.weight"),
            norm(&mut rng)?,
            GgmlDType::F32,
        )?;
        put(
            format!("{p}.ffn_gate.weight"),
            rng.tensor(&[FFN, HIDDEN], 0.15)?,
            q4,
        )?;
        put(
            format!("{p}.ffn_up.weight"),
            rng.tensor(&[FFN, HIDDEN], 0.15)?,
            q4,
        )?;
        put(
            format!("{p}.ffn_down.weight"),
            rng.tensor(&[HIDDEN, FFN], 0.1)?,
            q4,
        )?;
    }
    put("output_norm.weight".into(), norm(&mut rng)?, GgmlDType::F32)?;
    let path = dir.join(FILE);
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let md: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &md, &ts)?;
    std::io::Write::flush(&mut file)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_decoder_is_deterministic_and_reads_back() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let pa = write(a.path(), 3).unwrap();
        let pb = write(b.path(), 3).unwrap();
        assert_eq!(std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
        let mut f = std::fs::File::open(&pa).unwrap();
        let content = gguf_file::Content::read(&mut f).unwrap();
        assert_eq!(
            content.metadata["llama.block_count"].to_u32().unwrap(),
            LAYERS as u32
        );
        assert!(content.tensor_infos.contains_key("blk.1.ffn_down.weight"));
        let vocab = vocabulary();
        assert_eq!(
            content.metadata["tokenizer.ggml.tokens"]
                .to_vec()
                .unwrap()
                .len(),
            vocab.len()
        );
        assert_eq!(&vocab[..3], ["<unk>", "<s>", "</s>"]);
    }
}
