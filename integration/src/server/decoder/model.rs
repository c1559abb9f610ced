//! Checks a decoder before mistral.rs loads it, and reads what the routes need (architecture,
//! layers, context length, vocabulary size): from a GGUF file's header here, from a
//! safetensors directory's `config.json` in `safetensors_dir`.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;

/// The GGUF architectures mistral.rs 0.8.1 loads as text models (`pipeline/gguf.rs`).
pub const ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral3",
    "phi2",
    "phi3",
    "starcoder2",
    "qwen2",
    "qwen3",
    "qwen3moe",
];

/// The `config.json` architectures served from a safetensors directory, with the name the
/// GGUF path uses for the same family (what `/info` and the fast-path checks say).
pub const DIR_ARCHITECTURES: &[(&str, &str)] =
    &[("LlamaForCausalLM", "llama"), ("Qwen2ForCausalLM", "qwen2")];

/// What is wrong with a decoder file.
#[derive(Debug, thiserror::Error)]
pub enum DecoderModelError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a GGUF file mistral.rs can read, or lacks a required key.
    #[error("{path}: not a usable GGUF model: {message}")]
    BadGguf {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// mistral.rs has no GGUF loader for the architecture.
    #[error("{path}: GGUF architecture `{architecture}` is not one mistral.rs 0.8.1 loads (it loads {})", ARCHITECTURES.join(", "))]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// `general.architecture`.
        architecture: String,
    },
    /// A model directory that lacks what a decoder needs, or whose `config.json` is bad.
    #[error("{path}: not a usable decoder directory: {message}")]
    BadDirectory {
        /// The directory.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A model directory of a causal LM served only as GGUF here.
    #[error(
        "{path}: `{class}` is not served from a safetensors directory (these are: {}); a GGUF \
         file of it may be",
        DIR_ARCHITECTURES.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
    )]
    UnsupportedDirectory {
        /// The directory.
        path: PathBuf,
        /// `config.json`'s `architectures[0]`.
        class: String,
    },
}

/// How the decoder's weights are stored, which decides how mistral.rs loads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderFormat {
    /// One GGUF file (mistral.rs's GGUF loader; the tokenizer is in the file).
    Gguf,
    /// A Hugging Face text-model directory: `config.json`, `tokenizer.json` and safetensors
    /// weights (mistral.rs's plain loader, weights as stored).
    Safetensors,
}

/// The facts about a decoder that start-up and the routes need.
#[derive(Debug, Clone)]
pub struct DecoderModel {
    /// The GGUF file or the model directory.
    pub path: PathBuf,
    /// Which of the two it is.
    pub format: DecoderFormat,
    /// The size of the weight files (the GGUF file, or the directory's safetensors).
    pub weight_bytes: u64,
    /// `general.architecture` (e.g. `llama`).
    pub architecture: String,
    /// `general.name`, else the file's stem.
    pub name: String,
    /// `<arch>.block_count`: transformer layers.
    pub layers: usize,
    /// `<arch>.context_length`: the longest input.
    pub context_length: usize,
    /// Number of tokens in the embedded vocabulary.
    pub vocab_size: usize,
}

impl DecoderModel {
    /// Whether `path` names a GGUF file.
    pub fn is_gguf(path: &Path) -> bool {
        path.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    }

    /// Reads and checks the header of the GGUF file `path` (a directory: see
    /// `safetensors_dir::inspect`).
    pub fn inspect_gguf(path: &Path) -> Result<Self, DecoderModelError> {
        let mut file = std::fs::File::open(path).map_err(|source| DecoderModelError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| DecoderModelError::BadGguf {
            path: path.to_path_buf(),
            message,
        };
        let content = gguf_file::Content::read(&mut file).map_err(|e| bad(e.to_string()))?;
        let md = &content.metadata;
        let string = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
        let architecture =
            string("general.architecture").ok_or_else(|| bad("no general.architecture".into()))?;
        if !ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(DecoderModelError::Unsupported {
                path: path.to_path_buf(),
                architecture,
            });
        }
        let number = |key: String| -> Result<usize, DecoderModelError> {
            md.get(&key)
                .and_then(|v| v.to_u64().ok())
                .map(|v| v as usize)
                .ok_or_else(|| bad(format!("no {key} number")))
        };
        let layers = number(format!("{architecture}.block_count"))?;
        let context_length = number(format!("{architecture}.context_length"))?;
        let vocab_size = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(Vec::len)
            .ok_or_else(|| {
                bad("no tokenizer.ggml.tokens (the tokenizer must be in the file)".into())
            })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "decoder".into());
        let weight_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
        Ok(Self {
            path: path.to_path_buf(),
            format: DecoderFormat::Gguf,
            weight_bytes,
            name: string("general.name").unwrap_or(stem),
            architecture,
            layers,
            context_length,
            vocab_size,
        })
    }

    /// The model's id in API responses and `model` fields: the GGUF file's stem or the
    /// directory's name (mistral.rs itself calls a GGUF model by its directory).
    pub fn id(&self) -> String {
        let name = match self.format {
            DecoderFormat::Gguf => self.path.file_stem(),
            DecoderFormat::Safetensors => self.path.file_name(),
        };
        name.map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "decoder".into())
    }

    /// A text naming this model's weights and shape (architecture, layers, vocabulary, the
    /// weight files' size): what keys the prefix store, so that K/V of another model never
    /// matches, and what a blend gate file names.
    pub fn fingerprint(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.name, self.architecture, self.layers, self.vocab_size, self.weight_bytes
        )
    }

    /// Whether a request's `model` field names this model: `default`, its id, its name or
    /// its path.
    pub fn serves(&self, model: &str) -> bool {
        model == "default"
            || model == self.id()
            || model == self.name
            || Path::new(model) == self.path
            || self.path.parent().is_some_and(|d| Path::new(model) == d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gguf_header_is_read_and_a_foreign_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::tools::tiny_decoder::write(dir.path(), 1).unwrap();
        let m = DecoderModel::inspect_gguf(&path).unwrap();
        assert_eq!(m.architecture, "llama");
        assert_eq!(m.layers, 2);
        assert_eq!(m.context_length, crate::tools::tiny_decoder::CONTEXT);
        assert_eq!(m.vocab_size, crate::tools::tiny_decoder::vocabulary().len());
        assert!(m.serves("default") && m.serves("tiny-decoder") && !m.serves("other"));
        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"not a gguf file at all").unwrap();
        let err = DecoderModel::inspect_gguf(&junk).unwrap_err().to_string();
        assert!(err.contains("not a usable GGUF model"), "{err}");
        assert!(DecoderModel::is_gguf(&path) && !DecoderModel::is_gguf(dir.path()));
    }
}
