//! The decoder blend gate file (`--blend-gate FILE` with a GGUF decoder): the check layer and
//! the stale-deviation bound that `benches/scripts/llm_gate.py` fitted for one model on
//! recorded blend hits, with what it was fitted on and what it targets. The server takes the
//! policy from it ([`policy`], with the flags) and shows the rest in `/info`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::model::DecoderModel;
use crate::server::cli::ServeArgs;

/// The `kind` a decoder gate file declares.
pub const KIND: &str = "decoder_blend_stale";

/// What is wrong with a decoder gate file.
#[derive(Debug, thiserror::Error)]
pub enum DecoderGateError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a decoder gate (bad JSON, another kind, a missing or bad field).
    #[error("{path}: not a decoder blend gate file: {message}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The gate was fitted on another model: its bound means nothing for this one.
    #[error(
        "{path}: this gate was fitted for the model `{fitted}`, not the served `{served}` \
         (a stale-deviation bound is calibrated per model; fit one with llm_gate.py)"
    )]
    OtherModel {
        /// The file.
        path: PathBuf,
        /// The model the file names.
        fitted: String,
        /// The served model.
        served: String,
    },
}

/// The model a gate was fitted for, as `DecoderModel::fingerprint` names it.
#[derive(Debug, Deserialize)]
struct FittedModel {
    fingerprint: String,
}

#[derive(Debug, Deserialize)]
struct GateFile {
    kind: String,
    model: FittedModel,
    check_layer: usize,
    share: f32,
    stale_below: f32,
}

/// A loaded decoder blend gate.
#[derive(Debug, Clone)]
pub struct DecoderBlendGate {
    /// Layers up to and including this one run on every position (the bound is for it).
    pub check_layer: usize,
    /// The share of reusable positions recomputed anyway the bound was fitted with.
    pub share: f32,
    /// A hit is taken only when its stale deviation is below this.
    pub stale_below: f32,
    /// The whole file, for `/info`.
    pub describe: serde_json::Value,
}

impl DecoderBlendGate {
    /// Reads and checks `path` for the served `model`.
    pub fn load(path: &Path, model: &DecoderModel) -> Result<Self, DecoderGateError> {
        let bad = |message: String| DecoderGateError::Bad {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|source| DecoderGateError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let describe: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let file: GateFile =
            serde_json::from_value(describe.clone()).map_err(|e| bad(e.to_string()))?;
        if file.kind != KIND {
            return Err(bad(format!(
                "its kind is `{}`, not `{KIND}` (an embedding model's gate file is for \
                 EmbeddingGemma servers)",
                file.kind
            )));
        }
        if !(file.stale_below.is_finite() && file.stale_below >= 0.0) {
            return Err(bad(format!(
                "stale_below {} is not a bound >= 0",
                file.stale_below
            )));
        }
        if !(0.0..=1.0).contains(&file.share) {
            return Err(bad(format!("share {} is not from 0 to 1", file.share)));
        }
        let served = model.fingerprint();
        if file.model.fingerprint != served {
            return Err(DecoderGateError::OtherModel {
                path: path.to_path_buf(),
                fitted: file.model.fingerprint,
                served,
            });
        }
        if file.check_layer >= model.layers {
            return Err(bad(format!(
                "check_layer {} but the model has {} layers",
                file.check_layer, model.layers
            )));
        }
        Ok(Self {
            check_layer: file.check_layer,
            share: file.share,
            stale_below: file.stale_below,
            describe,
        })
    }
}

/// The decoder blend policy of the flags and the gate file: the gate sets the check layer,
/// the share and the stale bound; a flag may not contradict it (the bound holds only for
/// the setting it was fitted with).
pub fn policy(
    args: &ServeArgs,
    gate: Option<&DecoderBlendGate>,
) -> anyhow::Result<attncache_plugin::DecoderBlendPolicy> {
    let default = attncache_plugin::DecoderBlendPolicy::default();
    let Some(gate) = gate else {
        return Ok(attncache_plugin::DecoderBlendPolicy {
            check_layer: args
                .decoder_blend_check_layer
                .unwrap_or(default.check_layer),
            share: args.decoder_blend_share.unwrap_or(default.share),
            max_share: args.decoder_blend_max_share,
            stale_below: args.decoder_blend_stale_below,
        });
    };
    if args.decoder_blend_stale_below.is_some() {
        anyhow::bail!(
            "--decoder-blend-stale-below and a --blend-gate file both set the stale bound; \
             give one"
        );
    }
    if args
        .decoder_blend_check_layer
        .is_some_and(|c| c != gate.check_layer)
    {
        anyhow::bail!(
            "--decoder-blend-check-layer differs from the --blend-gate file's check layer {} \
             (its bound holds for that layer only)",
            gate.check_layer
        );
    }
    if args.decoder_blend_share.is_some_and(|s| s != gate.share) {
        anyhow::bail!(
            "--decoder-blend-share differs from the --blend-gate file's share {} (its bound \
             holds for that share only)",
            gate.share
        );
    }
    Ok(attncache_plugin::DecoderBlendPolicy {
        check_layer: gate.check_layer,
        share: gate.share,
        max_share: args.decoder_blend_max_share,
        stale_below: Some(gate.stale_below),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_named(name: &str) -> DecoderModel {
        DecoderModel {
            path: PathBuf::from(format!("/nonexistent/{name}.gguf")),
            format: super::super::model::DecoderFormat::Gguf,
            weight_bytes: 0,
            architecture: "llama".into(),
            name: name.into(),
            layers: 2,
            context_length: 512,
            vocab_size: 100,
        }
    }

    fn model() -> DecoderModel {
        model_named("tiny")
    }

    fn write(dir: &Path, body: &serde_json::Value) -> PathBuf {
        let path = dir.join("gate.json");
        std::fs::write(&path, serde_json::to_vec(body).unwrap()).unwrap();
        path
    }

    fn good(m: &DecoderModel) -> serde_json::Value {
        serde_json::json!({
            "kind": KIND, "model": {"fingerprint": m.fingerprint()},
            "check_layer": 1, "share": 0.15, "stale_below": 0.02,
            "calibration": {"hits": 3},
        })
    }

    #[test]
    fn a_gate_for_the_served_model_loads_with_its_policy() {
        let dir = tempfile::tempdir().unwrap();
        let m = model();
        let gate = DecoderBlendGate::load(&write(dir.path(), &good(&m)), &m).unwrap();
        assert_eq!(
            (gate.check_layer, gate.share, gate.stale_below),
            (1, 0.15, 0.02)
        );
        assert_eq!(gate.describe["calibration"]["hits"], 3);
    }

    #[test]
    fn a_gate_for_another_model_or_kind_or_a_bad_value_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = model();
        let other = model_named("other");
        let err = DecoderBlendGate::load(&write(dir.path(), &good(&other)), &m).unwrap_err();
        assert!(matches!(err, DecoderGateError::OtherModel { .. }), "{err}");
        for (field, value) in [
            ("kind", serde_json::json!("blend_gate")),
            ("stale_below", serde_json::json!(-1.0)),
            ("share", serde_json::json!(2.0)),
            ("check_layer", serde_json::json!(2)),
        ] {
            let mut body = good(&m);
            body[field] = value;
            let err = DecoderBlendGate::load(&write(dir.path(), &body), &m).unwrap_err();
            assert!(
                matches!(err, DecoderGateError::Bad { .. }),
                "{field}: {err}"
            );
        }
        std::fs::write(dir.path().join("gate.json"), b"{").unwrap();
        assert!(DecoderBlendGate::load(&dir.path().join("gate.json"), &m).is_err());
    }
}
