//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Texts of several lengths: some shorter than the tiny model's sliding window (8 tokens),
/// some much longer, so both the sliding and the full layers see real masks.
pub const TEXTS: &[&str] = &[
    "the food was great",
    "the staff were lovely and the room was clean",
    "the staff were rude and the room was dirty",
    "terrible movie , boring plot and the actor was awful . i would never recommend this film to my friends",
    "win cash now ! click here for a free prize",
    "task : search result | query : cheap hotel",
    "hello",
];

/// A fresh directory holding the tiny model (deterministic seed), removed on drop.
pub struct TinyModel {
    pub dir: PathBuf,
}

impl TinyModel {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("attncache-tiny-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        attncache_integration::tiny_model::write(&dir, 7).expect("write tiny model");
        Self { dir }
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TinyModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `{"model": "default", "input": texts}` as a request body.
pub fn embeddings_body(texts: &[&str]) -> serde_json::Value {
    serde_json::json!({"model": "default", "input": texts})
}

/// The embeddings of an OpenAI-style response, in `index` order.
pub fn embeddings_of(response: &serde_json::Value) -> Vec<Vec<f32>> {
    let data = response["data"].as_array().expect("data array");
    let mut rows: Vec<(u64, Vec<f32>)> = data
        .iter()
        .map(|d| {
            let index = d["index"].as_u64().expect("index");
            let v = serde_json::from_value::<Vec<f32>>(d["embedding"].clone())
                .expect("float embedding");
            (index, v)
        })
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    rows.into_iter().map(|(_, v)| v).collect()
}

pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}
