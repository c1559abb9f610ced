//! Checks a local embedding-model directory before mistral.rs loads it.

use std::path::{Path, PathBuf};

use mistralrs_core::ModelDType;

use crate::server::cli::DTypeArg;

/// What is wrong with a model directory or the requested dtype.
#[derive(Debug, thiserror::Error)]
pub enum ModelDirError {
    /// A required file is absent.
    #[error("{dir}: missing {file} (a model directory needs config.json, tokenizer.json, modules.json and model.safetensors; run `make fetch-model` for the default model)")]
    Missing {
        /// The directory.
        dir: PathBuf,
        /// The missing file.
        file: &'static str,
    },
    /// `config.json` could not be read or parsed.
    #[error("{path}: {message}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The dtype is known to give wrong results for this model on this device.
    #[error("--dtype {dtype:?} refused for {model_type}: {reason}")]
    UnsafeDType {
        /// Requested dtype.
        dtype: DTypeArg,
        /// `model_type` from config.json.
        model_type: String,
        /// Why it is refused.
        reason: &'static str,
    },
}

/// The facts about a model directory that startup needs.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory.
    pub path: PathBuf,
    /// `model_type` from config.json (e.g. `gemma3_text`).
    pub model_type: String,
    /// `architectures[0]` from config.json, if any.
    pub architecture: Option<String>,
    /// `num_hidden_layers` from config.json: attention calls per forward.
    pub layers: usize,
    /// `num_attention_heads` from config.json.
    pub heads: Option<usize>,
    /// `num_key_value_heads` from config.json (else `heads`).
    pub kv_heads: Option<usize>,
    /// `head_dim` from config.json (else `hidden_size / heads`).
    pub head_dim: Option<usize>,
    /// `vocab_size` from config.json: token ids must be below it.
    pub vocab_size: Option<usize>,
    /// `max_position_embeddings` from config.json: the longest input.
    pub max_positions: Option<usize>,
    /// Size of the embeddings: the last sentence-transformers Dense layer's
    /// `out_features`, else `hidden_size` (`None` when neither can be read).
    pub embedding_dim: Option<usize>,
}

/// `out_features` of the last Dense module listed in `modules.json`, if any.
fn last_dense_out(dir: &Path) -> Option<usize> {
    let modules: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("modules.json")).ok()?).ok()?;
    let dense = modules
        .as_array()?
        .iter()
        .rev()
        .find(|m| m["type"].as_str().is_some_and(|t| t.ends_with(".Dense")))?;
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(dense["path"].as_str()?).join("config.json")).ok()?,
    )
    .ok()?;
    config["out_features"].as_u64().map(|v| v as usize)
}

impl ModelDir {
    /// Reads and checks `path`.
    pub fn inspect(path: &Path) -> Result<Self, ModelDirError> {
        for file in ["config.json", "tokenizer.json", "modules.json"] {
            if !path.join(file).is_file() {
                return Err(ModelDirError::Missing {
                    dir: path.to_path_buf(),
                    file,
                });
            }
        }
        if !path.join("model.safetensors").is_file()
            && !path.join("model.safetensors.index.json").is_file()
        {
            return Err(ModelDirError::Missing {
                dir: path.to_path_buf(),
                file: "model.safetensors",
            });
        }
        let config_path = path.join("config.json");
        let bad = |message: String| ModelDirError::BadConfig {
            path: config_path.clone(),
            message,
        };
        let text = std::fs::read_to_string(&config_path).map_err(|e| bad(e.to_string()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let model_type = config
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no \"model_type\" string".into()))?
            .to_string();
        let architecture = config
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let layers = config
            .get("num_hidden_layers")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad("no \"num_hidden_layers\" number".into()))?
            as usize;
        let number = |key: &str| config.get(key).and_then(|v| v.as_u64()).map(|v| v as usize);
        let embedding_dim = last_dense_out(path).or_else(|| number("hidden_size"));
        let heads = number("num_attention_heads").filter(|h| *h > 0);
        let head_dim = number("head_dim")
            .or_else(|| Some(number("hidden_size")? / heads?))
            .filter(|d| *d > 0);
        Ok(Self {
            heads,
            kv_heads: number("num_key_value_heads").or(heads),
            head_dim,
            path: path.to_path_buf(),
            model_type,
            architecture,
            layers,
            embedding_dim,
            vocab_size: number("vocab_size"),
            max_positions: number("max_position_embeddings"),
        })
    }

    /// The attention shape of one stored input of `tokens` tokens, when config.json gives
    /// the heads and their size.
    pub fn entry_shape(
        &self,
        tokens: usize,
    ) -> Option<attncache_plugin::tiering::costs::EntryShape> {
        let heads = self.heads?;
        Some(attncache_plugin::tiering::costs::EntryShape {
            layers: self.layers,
            heads,
            kv_heads: self.kv_heads.unwrap_or(heads),
            head_dim: self.head_dim?,
            tokens,
        })
    }

    /// The model's name in API responses: the directory's name.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "default".into())
    }

    /// Whether an embedding of `full` dimensions may be cut to `dims` (Matryoshka):
    /// EmbeddingGemma was trained for 768, 512, 256 and 128; Qwen3-Embedding for any size
    /// from 32 up; other models only give their full size.
    pub fn allows_dimensions(&self, dims: usize, full: usize) -> bool {
        if dims == full {
            return true;
        }
        match self.model_type.as_str() {
            "gemma3_text" | "gemma3" => [128, 256, 512, 768].contains(&dims) && dims < full,
            "qwen3" => (32..full).contains(&dims),
            _ => false,
        }
    }

    /// A fingerprint of everything that shapes attention maps: config, tokenizer and the
    /// full contents of every safetensors file (crc32, fast enough for a 1.2 GB model).
    /// Cache entries written for another fingerprint are never used. Stable across builds
    /// ([`attncache_plugin::storage::stable_hash`]).
    pub fn fingerprint(&self) -> std::io::Result<u64> {
        Ok(self.fingerprints()?.stable)
    }

    /// The stable fingerprint and the one earlier builds computed, from one read of the files.
    pub fn fingerprints(&self) -> std::io::Result<Fingerprints> {
        let mut files = vec![
            self.path.join("config.json"),
            self.path.join("tokenizer.json"),
        ];
        let mut weights: Vec<PathBuf> = std::fs::read_dir(&self.path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        weights.sort();
        files.extend(weights);
        fingerprints_of(&files)
    }

    /// Whether this is a Gemma-3 family model (EmbeddingGemma is `gemma3_text`).
    pub fn is_gemma3(&self) -> bool {
        self.model_type.starts_with("gemma3")
    }

    /// The dtype to load with on CPU, or why the requested one is refused.
    pub fn cpu_dtype(&self, requested: DTypeArg) -> Result<ModelDType, ModelDirError> {
        let refuse = |reason| ModelDirError::UnsafeDType {
            dtype: requested,
            model_type: self.model_type.clone(),
            reason,
        };
        match requested {
            DTypeArg::F32 => Ok(ModelDType::F32),
            DTypeArg::Bf16 => Err(refuse("candle's CPU backend has no bf16 matmul; use --dtype f32")),
            DTypeArg::F16 | DTypeArg::Auto if self.is_gemma3() => Err(refuse(
                "Gemma-3 activations overflow f16 (mistral.rs's `auto` is f16 on CPU) and embeddings come out NaN or zero; use --dtype f32",
            )),
            DTypeArg::F16 => Ok(ModelDType::F16),
            DTypeArg::Auto => Ok(ModelDType::Auto),
        }
    }
}

/// A model's fingerprints (see [`ModelDir::fingerprints`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprints {
    /// XXH3 over explicit little-endian fields: the same in every build.
    pub stable: u64,
    /// std's `DefaultHasher` over the same fields, as builds before the stable hashes
    /// computed it (with this toolchain): accepted on projector and head files, and used to
    /// find cold-tier entries of the old key scheme.
    pub legacy: u64,
}

/// The fingerprints of `files`, in order: each file's name, byte count and crc32.
pub fn fingerprints_of(files: &[PathBuf]) -> std::io::Result<Fingerprints> {
    use std::hash::Hasher;
    use std::io::Read;
    let mut stable = attncache_plugin::storage::stable_hash::Fingerprinter::new();
    let mut sip = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut crc = crc32fast::Hasher::new();
        let mut file = std::fs::File::open(f)?;
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            crc.update(&buf[..n]);
            total += n as u64;
        }
        let name = f
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default();
        let crc = crc.finalize();
        stable.bytes(name).u64(total).u32(crc);
        sip.write(name);
        sip.write_u64(total);
        sip.write_u32(crc);
    }
    Ok(Fingerprints {
        stable: stable.finish(),
        legacy: sip.finish(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stable fingerprint is pinned: computed independently (Python: `xxhash` 3.5.0's
    /// `xxh3_64_intdigest` over `<Q` name length, name, `<Q` byte count, `<I` zlib.crc32,
    /// per file). Every stored entry, Redis key and stamped projector or head depends on it.
    #[test]
    fn the_stable_fingerprint_is_pinned() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.json");
        std::fs::write(&config, br#"{"model_type": "gemma3_text"}"#).unwrap();
        let weights = dir.path().join("model.safetensors");
        let bytes: Vec<u8> = (0..5).flat_map(|_| 0..=255u8).collect();
        std::fs::write(&weights, bytes).unwrap();
        let f = fingerprints_of(&[config.clone(), weights.clone()]).unwrap();
        assert_eq!(f.stable, 0x6a845d41c1bc4043, "{:016x}", f.stable);
        assert_ne!(f.stable, f.legacy);
        // the order of the files is part of the fingerprint
        assert_ne!(
            fingerprints_of(&[weights, config]).unwrap().stable,
            f.stable
        );
    }
}
