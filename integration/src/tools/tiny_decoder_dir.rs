//! A tiny, deterministic llama (or qwen2) decoder as a Hugging Face directory (`config.json`,
//! `tokenizer.json`, `model.safetensors` in f32), for tests of the safetensors decoder path.
//!
//! The shape of [`super::tiny_decoder`] (2 layers, hidden size 64, 4 query heads over 2 kv
//! heads, the output tied to the token embedding) with its own fixed-seed weights, and a
//! word-level tokenizer over `<unk>`, `<s>`, `</s>`, the tiny embedding model's [`WORDS`],
//! `yes`, `no`, single letters and digits (lower-cased, split on whitespace and punctuation),
//! so each known word is one token. The same seed writes the same bytes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::json;

pub use super::tiny_decoder::{TinyArch, CONTEXT};
use super::tiny_decoder::{FFN, HEADS, HEAD_DIM, HIDDEN, KV_HEADS, LAYERS};
use super::tiny_model::{word_level_tokenizer, Rng, WORDS};

/// The vocabulary, in id order.
pub fn vocabulary() -> Vec<String> {
    let mut v: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    v.extend(WORDS.iter().map(|w| w.to_string()));
    v.extend(["yes", "no"].map(String::from));
    v.extend(('a'..='z').chain('0'..='9').map(String::from));
    let mut seen = std::collections::HashSet::new();
    v.retain(|t| seen.insert(t.clone()));
    v
}

/// Writes the tiny llama directory `dir` (created if needed) from `seed`; returns `dir`.
pub fn write(dir: &Path, seed: u64) -> anyhow::Result<PathBuf> {
    write_arch(dir, seed, TinyArch::Llama)
}

/// [`write`] for the architecture `arch` (qwen2: q, k and v projections with a bias).
pub fn write_arch(dir: &Path, seed: u64, arch: TinyArch) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let vocab = vocabulary();
    let (class, model_type) = match arch {
        TinyArch::Llama => ("LlamaForCausalLM", "llama"),
        TinyArch::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let config = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT,
        "vocab_size": vocab.len(),
        "tie_word_embeddings": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    // mistral.rs's grammar support (llguidance) needs a decoder it knows; the vocabulary is
    // printable ASCII, which GPT-2's byte-level mapping leaves as it is
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                         "use_regex": true});
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_string_pretty(&word_level_tokenizer(&vocab, 3, decoder))?,
    )?;
    let mut rng = Rng::new(seed);
    let mut t = HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        rng.tensor(&[vocab.len(), HIDDEN], 0.5)?,
    );
    let kv = KV_HEADS * HEAD_DIM;
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let shapes: [(&str, Vec<usize>, f32); 7] = [
            ("self_attn.q_proj.weight", vec![HIDDEN, HIDDEN], 0.15),
            ("self_attn.k_proj.weight", vec![kv, HIDDEN], 0.15),
            ("self_attn.v_proj.weight", vec![kv, HIDDEN], 0.15),
            ("self_attn.o_proj.weight", vec![HIDDEN, HIDDEN], 0.15),
            ("mlp.gate_proj.weight", vec![FFN, HIDDEN], 0.15),
            ("mlp.up_proj.weight", vec![FFN, HIDDEN], 0.15),
            ("mlp.down_proj.weight", vec![HIDDEN, FFN], 0.1),
        ];
        for (name, shape, std) in shapes {
            t.insert(format!("{p}.{name}"), rng.tensor(&shape, std)?);
        }
        if arch == TinyArch::Qwen2 {
            for (name, n) in [("q", HIDDEN), ("k", kv), ("v", kv)] {
                t.insert(
                    format!("{p}.self_attn.{name}_proj.bias"),
                    rng.tensor(&[n], 0.2)?,
                );
            }
        }
        for name in ["input_layernorm", "post_attention_layernorm"] {
            // llama's RMSNorm multiplies by the weight: around 1
            t.insert(
                format!("{p}.{name}.weight"),
                (rng.tensor(&[HIDDEN], 0.1)? + 1.0)?,
            );
        }
    }
    t.insert(
        "model.norm.weight".to_string(),
        (rng.tensor(&[HIDDEN], 0.1)? + 1.0)?,
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors"))?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tiny_directory_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(&dir.path().join("a"), 5).unwrap();
        let b = write(&dir.path().join("b"), 5).unwrap();
        for f in ["config.json", "tokenizer.json", "model.safetensors"] {
            assert_eq!(
                std::fs::read(a.join(f)).unwrap(),
                std::fs::read(b.join(f)).unwrap(),
                "{f}"
            );
        }
        let c = write(&dir.path().join("c"), 6).unwrap();
        assert_ne!(
            std::fs::read(a.join("model.safetensors")).unwrap(),
            std::fs::read(c.join("model.safetensors")).unwrap()
        );
    }
}
