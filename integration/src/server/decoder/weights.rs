//! How a decoder's GGUF weights are multiplied: dequantized once at load to f32 (the fast
//! exact path) or kept in the file's quantized types (stock mistral.rs).
//!
//! mistral.rs multiplies a GGUF weight with candle's `QMatMul`. Kept quantized (Q4_1 for
//! SmolLM2), candle's CPU kernel first quantizes the activations to 8 bits and then runs one
//! dot product per output value: about 40 ms a token for SmolLM2-135M on 2 cores, and the
//! activations' rounding moves the logits (llama.cpp computes the same way). candle's own
//! switch `CANDLE_DEQUANTIZE_ALL` makes `QMatMul` dequantize each weight once, exactly, to
//! f32 at load and multiply with its f32 GEMM: the function PyTorch computes on the same
//! GGUF (transformers dequantizes it to f32), and about 10x faster here.
//!
//! candle reads the switch once per thread, on the first weight it loads there, so it has to
//! be set before any thread exists: [`prepare_process`] is called first thing in `main`,
//! and [`effective`] lets start-up check that it was.

use crate::server::cli::ServeArgs;
use attncache_plugin::ExactAttention;

/// candle's switch: dequantize every quantized weight to f32 when it is loaded.
const DEQUANTIZE_ALL: &str = "CANDLE_DEQUANTIZE_ALL";
/// candle's other switch (to f16), which would take precedence over the quantized path.
const DEQUANTIZE_ALL_F16: &str = "CANDLE_DEQUANTIZE_ALL_F16";

/// How the decoder's weights are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderWeights {
    /// Dequantized once at load to f32, multiplied in f32 (`--exact-attention fast`).
    DequantizedF32,
    /// The file's quantized types, activations quantized per call (`--exact-attention stock`).
    Quantized,
}

impl DecoderWeights {
    /// What `--exact-attention` asks for.
    pub fn for_mode(exact: ExactAttention) -> Self {
        match exact {
            ExactAttention::Fast => Self::DequantizedF32,
            ExactAttention::Stock => Self::Quantized,
        }
    }

    /// A short description for `/info` and the start-up log.
    pub fn describe(self) -> &'static str {
        match self {
            Self::DequantizedF32 => "f32, dequantized once at load",
            Self::Quantized => "quantized as in the file (8-bit activations per matmul)",
        }
    }
}

/// Sets candle's load-time switch for a decoder as `--exact-attention` asks. Call it before
/// the process starts any thread (first thing in `main`): the environment is not safe to
/// change while other threads may read it. Does nothing for an embedding model.
pub fn prepare_process(args: &ServeArgs) {
    if !super::DecoderModel::is_gguf(&args.model) {
        return;
    }
    std::env::remove_var(DEQUANTIZE_ALL_F16);
    match DecoderWeights::for_mode(args.exact_attention) {
        DecoderWeights::DequantizedF32 => std::env::set_var(DEQUANTIZE_ALL, "1"),
        DecoderWeights::Quantized => std::env::remove_var(DEQUANTIZE_ALL),
    }
}

/// The weights' treatment for `exact`, checked against the environment candle will read
/// at load: an error when [`prepare_process`] did not run (or something changed the
/// environment since), rather than serving numbers other than the ones `/info` names.
pub fn check(exact: ExactAttention) -> anyhow::Result<DecoderWeights> {
    let on = |name: &str| std::env::var(name).is_ok_and(|s| !s.is_empty() && s != "0");
    let wanted = DecoderWeights::for_mode(exact);
    let found = match (on(DEQUANTIZE_ALL), on(DEQUANTIZE_ALL_F16)) {
        (_, true) => anyhow::bail!(
            "{DEQUANTIZE_ALL_F16} is set: a decoder is served with f32 weights (--exact-attention \
             fast) or quantized ones (stock), not f16"
        ),
        (true, false) => DecoderWeights::DequantizedF32,
        (false, false) => DecoderWeights::Quantized,
    };
    anyhow::ensure!(
        found == wanted,
        "--exact-attention {exact} needs {wanted:?} weights but candle would load them {found:?}: \
         decoder::weights::prepare_process must run before the runtime starts"
    );
    Ok(found)
}
