//! A tiny, deterministic EmbeddingGemma-shaped model for tests.
//!
//! Same architecture as EmbeddingGemma-300M (`gemma3_text`, bidirectional attention,
//! sliding + full layers, mean pooling, two dense layers, normalisation), but 2 layers,
//! hidden size 64, 4 query heads over 2 kv heads (so grouped-query attention is exercised)
//! and a sliding window of 8 tokens (so inputs longer than 8 tokens exercise the sliding
//! mask). The tokenizer is a WordLevel vocabulary of [`WORDS`] with whitespace splitting.
//! Weights come from a fixed-seed generator: the same seed writes the same bytes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::json;

/// Hidden size of the tiny model.
pub const HIDDEN: usize = 64;
/// Output dimension of the embeddings (after the two dense layers).
pub const EMBEDDING_DIM: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTERMEDIATE: usize = 128;
const DENSE_INNER: usize = 128;
const SLIDING_WINDOW: usize = 8;

/// The tokenizer's words (after the special tokens `<pad>`, `<eos>`, `<bos>`, `<unk>`).
pub const WORDS: &[&str] = &[
    "the",
    "a",
    "an",
    "and",
    "or",
    "but",
    "of",
    "to",
    "in",
    "on",
    "at",
    "for",
    "with",
    "by",
    "from",
    "is",
    "was",
    "are",
    "were",
    "be",
    "been",
    "it",
    "this",
    "that",
    "these",
    "those",
    "i",
    "you",
    "he",
    "she",
    "we",
    "they",
    "my",
    "your",
    "our",
    "their",
    "food",
    "service",
    "staff",
    "room",
    "hotel",
    "movie",
    "film",
    "book",
    "product",
    "price",
    "order",
    "delivery",
    "time",
    "day",
    "night",
    "place",
    "people",
    "story",
    "plot",
    "actor",
    "music",
    "screen",
    "phone",
    "battery",
    "quality",
    "money",
    "good",
    "great",
    "excellent",
    "lovely",
    "nice",
    "bad",
    "terrible",
    "awful",
    "rude",
    "slow",
    "fast",
    "cheap",
    "expensive",
    "clean",
    "dirty",
    "friendly",
    "boring",
    "amazing",
    "very",
    "really",
    "not",
    "never",
    "always",
    "again",
    "would",
    "will",
    "could",
    "recommend",
    "love",
    "hate",
    "like",
    "buy",
    "return",
    "free",
    "offer",
    "click",
    "here",
    "now",
    "win",
    "cash",
    "prize",
    "meeting",
    "tomorrow",
    "please",
    "thanks",
    "hello",
    "query",
    "document",
    "search",
    "result",
    "title",
    "none",
    "text",
    "task",
    "|",
    ":",
    ".",
    ",",
    "!",
    "?",
];

/// Writes the tiny model into `dir` (created if needed) from `seed`.
pub fn write(dir: &Path, seed: u64) -> anyhow::Result<()> {
    write_with_layers(dir, seed, LAYERS)
}

/// [`write`] with `layers` decoder layers instead of the usual 2 (tests of features that need
/// a layer between the first and the last).
pub fn write_with_layers(dir: &Path, seed: u64, layers: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("1_Pooling"))?;
    std::fs::create_dir_all(dir.join("2_Dense"))?;
    std::fs::create_dir_all(dir.join("3_Dense"))?;
    let vocab = vocabulary();
    write_json(&dir.join("config.json"), &config(vocab.len(), layers))?;
    write_json(&dir.join("tokenizer.json"), &tokenizer(&vocab))?;
    write_json(&dir.join("modules.json"), &modules())?;
    write_json(
        &dir.join("config_sentence_transformers.json"),
        &sentence_transformers(),
    )?;
    write_json(&dir.join("1_Pooling/config.json"), &pooling())?;
    write_json(
        &dir.join("2_Dense/config.json"),
        &dense(HIDDEN, DENSE_INNER),
    )?;
    write_json(
        &dir.join("3_Dense/config.json"),
        &dense(DENSE_INNER, EMBEDDING_DIM),
    )?;

    let mut rng = Rng::new(seed);
    let mut t = HashMap::new();
    t.insert(
        "embed_tokens.weight".to_string(),
        rng.tensor(&[vocab.len(), HIDDEN], 0.5)?,
    );
    for l in 0..layers {
        let p = format!("layers.{l}");
        let shapes: [(&str, Vec<usize>, f32); 13] = [
            (
                "self_attn.q_proj.weight",
                vec![HEADS * HEAD_DIM, HIDDEN],
                0.15,
            ),
            (
                "self_attn.k_proj.weight",
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.15,
            ),
            (
                "self_attn.v_proj.weight",
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
                0.15,
            ),
            (
                "self_attn.o_proj.weight",
                vec![HIDDEN, HEADS * HEAD_DIM],
                0.15,
            ),
            ("self_attn.q_norm.weight", vec![HEAD_DIM], 0.1),
            ("self_attn.k_norm.weight", vec![HEAD_DIM], 0.1),
            ("mlp.gate_proj.weight", vec![INTERMEDIATE, HIDDEN], 0.1),
            ("mlp.up_proj.weight", vec![INTERMEDIATE, HIDDEN], 0.1),
            ("mlp.down_proj.weight", vec![HIDDEN, INTERMEDIATE], 0.1),
            ("input_layernorm.weight", vec![HIDDEN], 0.1),
            ("post_attention_layernorm.weight", vec![HIDDEN], 0.1),
            ("pre_feedforward_layernorm.weight", vec![HIDDEN], 0.1),
            ("post_feedforward_layernorm.weight", vec![HIDDEN], 0.1),
        ];
        for (name, shape, std) in shapes {
            t.insert(format!("{p}.{name}"), rng.tensor(&shape, std)?);
        }
    }
    t.insert("norm.weight".to_string(), rng.tensor(&[HIDDEN], 0.1)?);
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;

    let d1 = HashMap::from([(
        "linear.weight".to_string(),
        rng.tensor(&[DENSE_INNER, HIDDEN], 0.15)?,
    )]);
    candle_core::safetensors::save(&d1, dir.join("2_Dense/model.safetensors"))?;
    let d2 = HashMap::from([(
        "linear.weight".to_string(),
        rng.tensor(&[EMBEDDING_DIM, DENSE_INNER], 0.1)?,
    )]);
    candle_core::safetensors::save(&d2, dir.join("3_Dense/model.safetensors"))?;
    Ok(())
}

fn vocabulary() -> Vec<String> {
    ["<pad>", "<eos>", "<bos>", "<unk>"]
        .iter()
        .chain(WORDS)
        .map(|w| w.to_string())
        .collect()
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)?;
    Ok(())
}

fn config(vocab_size: usize, layers: usize) -> serde_json::Value {
    json!({
        "architectures": ["Gemma3TextModel"],
        "model_type": "gemma3_text",
        "attention_bias": false,
        "attn_logit_softcapping": null,
        "final_logit_softcapping": null,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "head_dim": HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 512,
        "num_attention_heads": HEADS,
        "num_hidden_layers": layers,
        "num_key_value_heads": KV_HEADS,
        "query_pre_attn_scalar": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": null,
        "rope_theta": 1000000.0,
        "sliding_window": SLIDING_WINDOW,
        "sliding_window_pattern": 2,
        "use_bidirectional_attention": true,
        "vocab_size": vocab_size,
        "torch_dtype": "float32"
    })
}

fn tokenizer(vocab: &[String]) -> serde_json::Value {
    word_level_tokenizer(vocab, 4, serde_json::Value::Null)
}

/// A word-level `tokenizer.json` over `vocab` (ids in order, the first `specials` entries
/// special tokens, `<unk>` for unknown words), lower-cased and split on whitespace and
/// punctuation, with `decoder` as its decoder.
pub(crate) fn word_level_tokenizer(
    vocab: &[String],
    specials: usize,
    decoder: serde_json::Value,
) -> serde_json::Value {
    let ids: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), json!(i)))
        .collect();
    let added: Vec<_> = vocab[..specials]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            json!({"id": i, "content": w, "single_word": false, "lstrip": false,
                             "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": decoder,
        "model": {"type": "WordLevel", "vocab": ids, "unk_token": "<unk>"}
    })
}

/// Task prompts in EmbeddingGemma's layout (words of the tiny vocabulary), no default.
fn sentence_transformers() -> serde_json::Value {
    json!({
        "prompts": {"query": "you ? ", "document": "it is "},
        "default_prompt_name": null,
        "similarity_fn_name": "cosine"
    })
}

fn modules() -> serde_json::Value {
    json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"}
    ])
}

fn pooling() -> serde_json::Value {
    json!({
        "word_embedding_dimension": HIDDEN,
        "pooling_mode_cls_token": false,
        "pooling_mode_mean_tokens": true,
        "pooling_mode_max_tokens": false,
        "pooling_mode_mean_sqrt_len_tokens": false,
        "pooling_mode_weightedmean_tokens": false,
        "pooling_mode_lasttoken": false,
        "include_prompt": true
    })
}

fn dense(inp: usize, out: usize) -> serde_json::Value {
    json!({"in_features": inp, "out_features": out, "bias": false,
           "activation_function": "torch.nn.modules.linear.Identity"})
}

/// xorshift64* with Box–Muller: small, fixed, and the same on every platform.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    pub(crate) fn tensor(&mut self, shape: &[usize], std: f32) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| self.normal() as f32 * std).collect();
        Tensor::from_vec(data, shape, &Device::Cpu)
    }
}
