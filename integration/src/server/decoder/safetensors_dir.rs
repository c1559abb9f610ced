//! A Hugging Face text decoder directory (`config.json`, `tokenizer.json`, safetensors
//! weights) checked before mistral.rs's plain loader reads it: which directories are
//! decoders, and what the routes need from `config.json`.

use std::path::{Path, PathBuf};

use super::model::{DecoderFormat, DecoderModel, DecoderModelError, DIR_ARCHITECTURES};

/// The `config.json` fields read.
#[derive(Debug, serde::Deserialize)]
struct Config {
    #[serde(default)]
    architectures: Vec<String>,
    num_hidden_layers: Option<usize>,
    max_position_embeddings: Option<usize>,
    vocab_size: Option<usize>,
}

fn read_config(dir: &Path) -> Result<Config, String> {
    let text = std::fs::read_to_string(dir.join("config.json")).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("config.json: {e}"))
}

/// Whether `path` is a directory served as a decoder: its `config.json` names a causal LM
/// (`…ForCausalLM`) and it has no `modules.json` (a sentence-transformers model, such as
/// Qwen3-Embedding whose config also says `Qwen3ForCausalLM`, is an embedding model).
pub fn is_decoder_dir(path: &Path) -> bool {
    path.is_dir()
        && !path.join("modules.json").exists()
        && read_config(path).is_ok_and(|c| {
            c.architectures
                .first()
                .is_some_and(|a| a.ends_with("ForCausalLM"))
        })
}

/// The weight files of `dir`: `model.safetensors`, or the shards its index names.
fn weight_files(dir: &Path) -> Vec<PathBuf> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return vec![single];
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors")
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("model-"))
        })
        .collect();
    shards.sort();
    shards
}

/// The summed size of `dir`'s weight files (part of the model's fingerprint).
fn weight_bytes(dir: &Path) -> u64 {
    weight_files(dir)
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Reads and checks the decoder directory `dir`.
pub fn inspect(dir: &Path) -> Result<DecoderModel, DecoderModelError> {
    let bad = |message: String| DecoderModelError::BadDirectory {
        path: dir.to_path_buf(),
        message,
    };
    let config = read_config(dir).map_err(bad)?;
    let class = config
        .architectures
        .first()
        .cloned()
        .ok_or_else(|| bad("config.json names no architecture".into()))?;
    let Some(&(_, architecture)) = DIR_ARCHITECTURES.iter().find(|(c, _)| *c == class) else {
        return Err(DecoderModelError::UnsupportedDirectory {
            path: dir.to_path_buf(),
            class,
        });
    };
    if !dir.join("tokenizer.json").is_file() {
        return Err(bad("no tokenizer.json".into()));
    }
    if weight_files(dir).is_empty() {
        return Err(bad(
            "no model.safetensors (nor model-*.safetensors shards)".into()
        ));
    }
    let field =
        |v: Option<usize>, name: &str| v.ok_or_else(|| bad(format!("config.json has no {name}")));
    let name = dir
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "decoder".into());
    Ok(DecoderModel {
        path: dir.to_path_buf(),
        format: DecoderFormat::Safetensors,
        weight_bytes: weight_bytes(dir),
        architecture: architecture.to_string(),
        name,
        layers: field(config.num_hidden_layers, "num_hidden_layers")?,
        context_length: field(config.max_position_embeddings, "max_position_embeddings")?,
        vocab_size: field(config.vocab_size, "vocab_size")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_decoder_directory_is_read_and_told_apart_from_embedding_models() {
        let dir = tempfile::tempdir().unwrap();
        let path =
            crate::tools::tiny_decoder_dir::write(&dir.path().join("tiny-llama"), 3).unwrap();
        assert!(is_decoder_dir(&path) && super::super::is_decoder(&path));
        let m = inspect(&path).unwrap();
        assert_eq!(
            (m.format, m.architecture.as_str(), m.layers),
            (DecoderFormat::Safetensors, "llama", 2)
        );
        assert_eq!(m.id(), "tiny-llama");
        assert!(m.fingerprint().ends_with(&weight_bytes(&path).to_string()));
        assert!(weight_bytes(&path) > 0);
        // the tiny embedding model (EmbeddingGemma's layout) is not a decoder
        let emb = dir.path().join("emb");
        crate::tools::tiny_model::write(&emb, 1).unwrap();
        assert!(!super::super::is_decoder(&emb));
        // a causal LM with modules.json (Qwen3-Embedding's layout) is not either
        std::fs::write(path.join("modules.json"), "[]").unwrap();
        assert!(!is_decoder_dir(&path));
        std::fs::remove_file(path.join("modules.json")).unwrap();
        // an architecture not served from a directory, or missing weights: a clear error
        let cfg = path.join("config.json");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, text.replace("LlamaForCausalLM", "PhiForCausalLM")).unwrap();
        let err = inspect(&path).unwrap_err().to_string();
        assert!(err.contains("PhiForCausalLM"), "{err}");
        std::fs::write(&cfg, &text).unwrap();
        std::fs::remove_file(path.join("model.safetensors")).unwrap();
        let err = inspect(&path).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}
