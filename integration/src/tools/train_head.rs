//! `attncache train-head`: embeds labelled texts with a local server (cache off), trains a
//! [`Classifier`] on them, reports the held-out accuracy and saves the head. Kept apart from
//! [`crate::server::classifier`] (the head the route uses), which must not depend on the server.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::server::classifier::{Classifier, HeadConfig};

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

/// Flags of `attncache train-head`.
#[derive(Debug, Clone, clap::Parser)]
pub struct TrainHeadArgs {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = crate::server::cli::default_model_dir())]
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
    let serve = crate::server::cli::ServeArgs::parse_from(["attncache-server", "--model", model]);
    let server = crate::tools::local_server::LocalServer::start(&serve).await?;
    let bar = crate::tools::progress::progress_bar(examples.len(), "embedding")?;
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
}
