//! A classification head over the served embedding model: a linear layer and softmax,
//! trained by `attncache train-head` on labelled texts, served by `POST /v1/classify`.
//!
//! Files in a head directory: `head.safetensors` (`weight` `[classes, dims]`, `bias`
//! `[classes]`) and `head.json` ([`HeadConfig`]: labels, the prefix put before every
//! input, the model fingerprint it was trained for, and what training measured).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// One labelled text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The text.
    pub text: String,
    /// Its label.
    pub label: String,
}

/// Reads labelled texts: JSON arrays of `{"text", "label"|"class"}` objects, JSONL with the
/// same objects, or CSV with a `text,label` header (RFC 4180 quoting). Items without a text
/// or a label are skipped.
pub fn load_examples(path: &Path) -> anyhow::Result<Vec<Example>> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let from_value = |v: &serde_json::Value| -> Option<Example> {
        let text = v["text"].as_str()?.trim();
        let label = match v.get("label").or_else(|| v.get("class"))? {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => return None,
        };
        (!text.is_empty()).then(|| Example {
            text: text.to_string(),
            label,
        })
    };
    let is_csv = path.extension().is_some_and(|e| e == "csv");
    if is_csv {
        return load_csv(&raw);
    }
    if let Ok(serde_json::Value::Array(items)) = serde_json::from_str(&raw) {
        return Ok(items.iter().filter_map(from_value).collect());
    }
    let mut out = Vec::new();
    for (i, line) in raw
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        out.extend(from_value(&v));
    }
    Ok(out)
}

/// CSV with a header naming `text` and `label` columns (read by the `csv` crate: RFC 4180
/// quoting, doubled quotes, newlines inside quotes, CRLF; rows may have extra columns).
fn load_csv(raw: &str) -> anyhow::Result<Vec<Example>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(raw.as_bytes());
    let header = reader.headers().context("reading the CSV header")?.clone();
    anyhow::ensure!(!header.is_empty(), "empty CSV");
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (t, l) = (
        col("text").context("CSV header has no `text` column")?,
        col("label").context("CSV header has no `label` column")?,
    );
    let mut out = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let r = record.with_context(|| format!("CSV record {}", i + 1))?;
        let (Some(text), Some(label)) = (r.get(t), r.get(l)) else {
            continue;
        };
        let (text, label) = (text.trim(), label.trim());
        if !text.is_empty() && !label.is_empty() {
            out.push(Example {
                text: text.to_string(),
                label: label.to_string(),
            });
        }
    }
    Ok(out)
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
        use attncache_plugin::stable_hash::{check_stamp, Stamp};
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
    fn save(&self, dir: &Path) -> anyhow::Result<()> {
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

/// Flags of `attncache train-head`.
#[derive(Debug, Clone, clap::Parser)]
pub struct TrainHeadArgs {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = crate::cli::default_model_dir())]
    pub model: PathBuf,
    /// Labelled texts: JSON array or JSONL of {"text", "label"|"class"} objects, or CSV with
    /// a text,label header. Several files are concatenated.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Every n-th example is held out for the test accuracy.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..))]
    pub test_every: u64,
    /// Text put before every input, in training and when serving.
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Optimiser steps (full batch).
    #[arg(long, default_value_t = 300)]
    pub steps: usize,
    /// Names `/v1/classify` answers instead of the data's labels, as LABEL=NAME pairs
    /// separated by commas (`0=negative,1=positive`); labels not named keep their value.
    #[arg(long, value_delimiter = ',', value_parser = parse_label_name)]
    pub label_names: Vec<(String, String)>,
    /// Output directory: head.safetensors and head.json.
    #[arg(long)]
    pub out: PathBuf,
}

fn parse_label_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((label, name)) if !label.trim().is_empty() && !name.trim().is_empty() => {
            Ok((label.trim().to_string(), name.trim().to_string()))
        }
        _ => Err(format!("{s:?} is not LABEL=NAME, e.g. 0=negative")),
    }
}

/// `labels` (sorted, distinct) with the names of `names` (data label → name): every named
/// label must occur in the data and the names must stay distinct.
pub fn name_labels(labels: &[String], names: &[(String, String)]) -> anyhow::Result<Vec<String>> {
    for (label, _) in names {
        anyhow::ensure!(
            labels.contains(label),
            "--label-names names `{label}`, which is not a label of the data ({labels:?})"
        );
    }
    let named: Vec<String> = labels
        .iter()
        .map(|l| {
            names
                .iter()
                .rev()
                .find(|(from, _)| from == l)
                .map_or_else(|| l.clone(), |(_, to)| to.clone())
        })
        .collect();
    let mut distinct = named.clone();
    distinct.sort();
    distinct.dedup();
    anyhow::ensure!(
        distinct.len() == named.len(),
        "--label-names gives two labels the same name: {named:?}"
    );
    Ok(named)
}

/// Embeds the examples (cache off), trains, evaluates on the held-out split, saves.
pub async fn train_head(args: &TrainHeadArgs) -> anyhow::Result<HeadConfig> {
    use clap::Parser;
    let mut examples = Vec::new();
    for p in &args.data {
        examples.extend(load_examples(p)?);
    }
    let mut labels: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    labels.sort();
    labels.dedup();
    anyhow::ensure!(
        labels.len() >= 2,
        "need at least 2 labels, found {labels:?} in {} examples",
        examples.len()
    );
    let names = name_labels(&labels, &args.label_names)?;
    let model = args.model.to_str().context("model path is not UTF-8")?;
    let serve = crate::cli::ServeArgs::parse_from(["attncache-server", "--model", model]);
    let server = crate::local_server::LocalServer::start(&serve).await?;
    let bar = crate::progress::progress_bar(examples.len(), "embedding")?;
    let (mut train_x, mut train_y, mut test_x, mut test_y) = (vec![], vec![], vec![], vec![]);
    for (i, e) in examples.iter().enumerate() {
        let v = server
            .embed(&format!("{}{}", args.prefix, e.text))
            .await?
            .embedding;
        let y = labels.binary_search(&e.label).unwrap_or(0) as u32;
        if (i as u64 + 1).is_multiple_of(args.test_every) {
            test_x.push(v);
            test_y.push(y);
        } else {
            train_x.push(v);
            train_y.push(y);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    attncache_plugin::uninstall();
    let mut head = Classifier::train(&train_x, &train_y, names, args.steps)?;
    head.config.prefix = args.prefix.clone();
    head.config.fingerprint = format!("{:016x}", server.model.fingerprint()?);
    head.config.test_examples = test_x.len();
    head.config.test_accuracy = head.accuracy(&test_x, &test_y)?;
    head.save(&args.out)?;
    Ok(head.config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_names_rename_in_class_order() {
        let labels = vec!["0".to_string(), "1".to_string()];
        let names = vec![("1".to_string(), "positive".to_string())];
        assert_eq!(name_labels(&labels, &names).unwrap(), ["0", "positive"]);
        let both = [parse_label_name("0=negative").unwrap(), names[0].clone()];
        assert_eq!(
            name_labels(&labels, &both).unwrap(),
            ["negative", "positive"]
        );
        assert!(name_labels(&labels, &[("2".into(), "x".into())]).is_err());
        assert!(name_labels(&labels, &[("0".into(), "1".into())]).is_err());
        assert!(parse_label_name("novalue").is_err());
    }

    #[test]
    fn examples_load_from_json_jsonl_and_csv() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("a.json");
        std::fs::write(
            &json,
            r#"[{"text": "good", "class": 1}, {"text": "", "class": null}, {"text": "bad", "label": "neg"}]"#,
        )
        .unwrap();
        let jsonl = dir.path().join("b.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"fine\", \"label\": \"pos\"}\n\n").unwrap();
        let csv = dir.path().join("c.csv");
        std::fs::write(
            &csv,
            "label,text\r\npos,\"nice, \"\"really\"\"\"\r\nneg,awful\nneg\npos,\"two\nlines\"\n",
        )
        .unwrap();
        let all: Vec<(String, String)> = [json, jsonl, csv]
            .iter()
            .flat_map(|p| load_examples(p).unwrap())
            .map(|e| (e.text, e.label))
            .collect();
        let want = [
            ("good", "1"),
            ("bad", "neg"),
            ("fine", "pos"),
            ("nice, \"really\"", "pos"),
            ("awful", "neg"),
            ("two\nlines", "pos"),
        ];
        assert_eq!(
            all,
            want.iter()
                .map(|(t, l)| (t.to_string(), l.to_string()))
                .collect::<Vec<_>>()
        );
    }

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
