//! A classification head over the served embedding model: a linear layer and softmax,
//! trained by `attncache train-head` on labelled texts, served by `POST /v1/classify`.
//!
//! Training lives in [`crate::tools::train_head`] (a tool that starts a local server); this module
//! is what the route uses.
//!
//! Files in a head directory: `head.safetensors` (`weight` `[classes, dims]`, `bias`
//! `[classes]`) and `head.json` ([`HeadConfig`]: labels, the prefix put before every
//! input, the model fingerprint it was trained for, and what training measured).

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

/// Weights file of a head.
pub const WEIGHTS_FILE: &str = "head.safetensors";
/// Settings file of a head.
pub const CONFIG_FILE: &str = "head.json";

/// `head.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// Class names, in output order.
    pub labels: Vec<String>,
    /// Embedding size the head reads.
    pub dims: usize,
    /// Text put before every input (the same as in training).
    pub prefix: String,
    /// Fingerprint of the model the head was trained on (16 hex digits).
    pub fingerprint: String,
    /// Labelled texts used for training.
    pub train_examples: usize,
    /// Held-out labelled texts.
    pub test_examples: usize,
    /// Accuracy on the training texts.
    pub train_accuracy: f64,
    /// Accuracy on the held-out texts (cache off).
    pub test_accuracy: f64,
}

/// A loaded head.
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Settings and training report.
    pub config: HeadConfig,
    weight: Tensor,
    bias: Tensor,
}

impl Classifier {
    /// Loads `dir`, refusing a head trained on another model (one stamped with the model's
    /// fingerprint of earlier builds, `legacy`, is loaded with a log line).
    pub fn load(dir: &Path, fingerprint: u64, legacy: Option<u64>) -> anyhow::Result<Self> {
        let config: HeadConfig = serde_json::from_str(
            &std::fs::read_to_string(dir.join(CONFIG_FILE))
                .with_context(|| format!("reading {}", dir.join(CONFIG_FILE).display()))?,
        )
        .with_context(|| format!("{} is not a head config", dir.join(CONFIG_FILE).display()))?;
        use attncache_plugin::storage::stable_hash::{check_stamp, Stamp};
        match check_stamp(&config.fingerprint, fingerprint, legacy) {
            Stamp::Current => {}
            Stamp::Legacy => tracing::info!(
                head = %dir.display(),
                "classifier stamped with this model's fingerprint of earlier builds; loaded \
                 (train it again to stamp the stable one)"
            ),
            Stamp::Other => anyhow::bail!(
                "classifier {} was trained on model {}, this model is {fingerprint:016x}; train one with `attncache train-head`",
                dir.display(),
                config.fingerprint
            ),
        }
        let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu)
            .with_context(|| format!("reading {}", dir.join(WEIGHTS_FILE).display()))?;
        let (c, d) = (config.labels.len(), config.dims);
        let weight = tensors
            .get("weight")
            .context("head has no `weight`")?
            .clone();
        let bias = tensors.get("bias").context("head has no `bias`")?.clone();
        anyhow::ensure!(
            weight.dims() == [c, d] && bias.dims() == [c] && c >= 2,
            "head weights are {:?} / {:?}, expected [{c}, {d}] / [{c}] with at least 2 labels",
            weight.dims(),
            bias.dims()
        );
        Ok(Self {
            config,
            weight: weight.to_dtype(DType::F32)?,
            bias: bias.to_dtype(DType::F32)?,
        })
    }

    /// Class probabilities of each embedding (`None` if its size is not the head's).
    pub fn probabilities(&self, embeddings: &[Vec<f32>]) -> anyhow::Result<Vec<Vec<f32>>> {
        if embeddings.is_empty() {
            return Ok(Vec::new());
        }
        for e in embeddings {
            anyhow::ensure!(
                e.len() == self.config.dims,
                "embedding has {} values, the head reads {}",
                e.len(),
                self.config.dims
            );
        }
        let flat: Vec<f32> = embeddings.iter().flatten().copied().collect();
        let x = Tensor::from_vec(flat, (embeddings.len(), self.config.dims), &Device::Cpu)?;
        let logits = x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        Ok(candle_nn::ops::softmax(&logits, D::Minus1)?.to_vec2()?)
    }

    /// Writes the head into `dir`.
    pub(crate) fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let tensors: HashMap<String, Tensor> = [
            ("weight".to_string(), self.weight.clone()),
            ("bias".to_string(), self.bias.clone()),
        ]
        .into_iter()
        .collect();
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        std::fs::write(
            dir.join(CONFIG_FILE),
            serde_json::to_string_pretty(&self.config)?,
        )?;
        Ok(())
    }
}

/// Multinomial logistic regression on embeddings, full batch, AdamW with a small L2 penalty.
fn fit(x: &Tensor, y: &[u32], classes: usize, steps: usize) -> anyhow::Result<(Tensor, Tensor)> {
    let d = x.dim(1)?;
    let w = Var::zeros((classes, d), DType::F32, &Device::Cpu)?;
    let b = Var::zeros(classes, DType::F32, &Device::Cpu)?;
    let target = Tensor::new(y, &Device::Cpu)?;
    let mut opt = candle_nn::AdamW::new(
        vec![w.clone(), b.clone()],
        candle_nn::ParamsAdamW {
            lr: 0.05,
            weight_decay: 1e-3,
            ..Default::default()
        },
    )?;
    for _ in 0..steps {
        let logits = x
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        let loss = candle_nn::loss::cross_entropy(&logits, &target)?;
        opt.backward_step(&loss)?;
    }
    Ok((w.as_tensor().detach(), b.as_tensor().detach()))
}

impl Classifier {
    /// Trains a head on embeddings `x` whose classes are `y` (indices into `labels`); the
    /// returned head has an empty prefix and fingerprint, and its training accuracy set.
    pub fn train(
        x: &[Vec<f32>],
        y: &[u32],
        labels: Vec<String>,
        steps: usize,
    ) -> anyhow::Result<Self> {
        let dims = x.first().context("no training examples")?.len();
        anyhow::ensure!(
            x.len() == y.len(),
            "{} embeddings, {} labels",
            x.len(),
            y.len()
        );
        let flat: Vec<f32> = x.iter().flatten().copied().collect();
        let xs = Tensor::from_vec(flat, (x.len(), dims), &Device::Cpu)?;
        let (weight, bias) = fit(&xs, y, labels.len(), steps)?;
        let mut head = Classifier {
            config: HeadConfig {
                labels,
                dims,
                prefix: String::new(),
                fingerprint: String::new(),
                train_examples: x.len(),
                test_examples: 0,
                train_accuracy: 0.0,
                test_accuracy: 0.0,
            },
            weight,
            bias,
        };
        head.config.train_accuracy = head.accuracy(x, y)?;
        Ok(head)
    }

    /// Most probable class of every embedding.
    pub fn predict(&self, x: &[Vec<f32>]) -> anyhow::Result<Vec<usize>> {
        Ok(self.probabilities(x)?.iter().map(|p| argmax(p)).collect())
    }

    /// Fraction of `x` whose most probable class is the one in `y` (NaN for none).
    pub fn accuracy(&self, x: &[Vec<f32>], y: &[u32]) -> anyhow::Result<f64> {
        if x.is_empty() {
            return Ok(f64::NAN);
        }
        let right = self
            .predict(x)?
            .iter()
            .zip(y)
            .filter(|(p, &t)| **p == t as usize)
            .count();
        Ok(right as f64 / x.len() as f64)
    }
}

/// Index of the largest value.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logistic_regression_separates_separable_classes() {
        // class = sign of the first coordinate
        let xs: Vec<Vec<f32>> = (0..40)
            .map(|i| {
                let s = if i % 2 == 0 { 1.0 } else { -1.0 };
                vec![
                    s * (0.5 + (i as f32) / 80.0),
                    ((i * 7) % 5) as f32 / 5.0 - 0.4,
                ]
            })
            .collect();
        let ys: Vec<u32> = (0..40).map(|i| (i % 2) as u32).collect();
        let flat: Vec<f32> = xs.iter().flatten().copied().collect();
        let x = Tensor::from_vec(flat, (40, 2), &Device::Cpu).unwrap();
        let (weight, bias) = fit(&x, &ys, 2, 200).unwrap();
        let head = Classifier {
            config: HeadConfig {
                labels: vec!["a".into(), "b".into()],
                dims: 2,
                prefix: String::new(),
                fingerprint: "0".into(),
                train_examples: 40,
                test_examples: 0,
                train_accuracy: 0.0,
                test_accuracy: 0.0,
            },
            weight,
            bias,
        };
        assert_eq!(head.accuracy(&xs, &ys).unwrap(), 1.0);
        let p = head.probabilities(&xs[..1]).unwrap();
        assert!((p[0].iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(
            head.probabilities(&[vec![1.0]]).is_err(),
            "wrong size is an error"
        );
    }
}
