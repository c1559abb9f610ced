//! How a decoder's GGUF weights are multiplied: dequantized once at load to f32 (the fast
//! exact path) or kept in the file's quantized types (stock mistral.rs).
//!
//! mistral.rs multiplies a GGUF weight with candle's `QMatMul`. Kept quantized (Q4_1 for
//! SmolLM2), candle's CPU kernel first rounds the activations to 8 bits and then runs one
//! dot product per output value: about 40 ms a token for SmolLM2-135M on 2 cores, and the
//! rounding moves the logits (llama.cpp computes the same way). Under `--exact-attention
//! fast` the hook is installed before the model loads and asks for f32 weights (patch 0007:
//! each weight dequantized once, exactly, into a float linear layer whose product the
//! plugin's kernel computes): the function PyTorch computes on the same GGUF, where
//! transformers dequantizes it to f32.

use attncache_plugin::ExactAttention;

/// candle's own switches that would dequantize every weight at load whatever the mode.
const CANDLE_SWITCHES: [&str; 2] = ["CANDLE_DEQUANTIZE_ALL", "CANDLE_DEQUANTIZE_ALL_F16"];

/// The GGUF architectures whose loader dequantizes to f32 when the hook asks: llama
/// (patch 0007) and qwen2 (patch 0010). The others keep their quantized weights in both
/// modes (`fast` then still computes attention in the plugin's kernel).
pub const F32_ARCHITECTURES: [&str; 2] = ["llama", "qwen2"];

/// How the decoder's weights are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderWeights {
    /// Dequantized once at load to f32, multiplied in f32 (`--exact-attention fast`).
    DequantizedF32,
    /// The file's quantized types, activations rounded per matmul (`--exact-attention stock`).
    Quantized,
    /// The file's quantized types under `fast`: the architecture's loader has no f32 path.
    QuantizedNoF32Loader,
    /// A safetensors directory's float weights, cast to f32 at load (both modes); the
    /// projections through candle's f32 matmul, attention and the MLP in the plugin's
    /// kernels under `fast`.
    StoredFloat,
}

impl DecoderWeights {
    /// What `--exact-attention` gives `model`.
    pub fn for_model(exact: ExactAttention, model: &super::DecoderModel) -> Self {
        if model.format == super::DecoderFormat::Safetensors {
            return Self::StoredFloat;
        }
        Self::for_mode(exact, &model.architecture)
    }

    /// What `--exact-attention` gives a GGUF model of `architecture`.
    fn for_mode(exact: ExactAttention, architecture: &str) -> Self {
        match exact {
            ExactAttention::Fast if F32_ARCHITECTURES.contains(&architecture) => {
                Self::DequantizedF32
            }
            ExactAttention::Fast => Self::QuantizedNoF32Loader,
            ExactAttention::Stock => Self::Quantized,
        }
    }

    /// A short description for `/info` and the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::DequantizedF32 => "f32, dequantized once at load",
            Self::Quantized => "quantized as in the file (8-bit activations per matmul)",
            Self::QuantizedNoF32Loader => {
                "quantized as in the file (8-bit activations per matmul): this architecture's \
                 loader has no f32 path (llama and qwen2 have)"
            }
            Self::StoredFloat => "the directory's float weights, cast to f32 at load",
        }
    }
}

/// The weights' treatment for `exact` on `model`; an error when one of candle's global
/// switches is set, since the weights would then not be what `/info` names.
pub fn check(exact: ExactAttention, model: &super::DecoderModel) -> anyhow::Result<DecoderWeights> {
    for name in CANDLE_SWITCHES {
        if std::env::var(name).is_ok_and(|s| !s.is_empty() && s != "0") {
            anyhow::bail!(
                "{name} is set in the environment: unset it (--exact-attention fast already \
                 dequantizes a decoder's weights to f32; stock keeps them quantized)"
            );
        }
    }
    Ok(DecoderWeights::for_model(exact, model))
}
