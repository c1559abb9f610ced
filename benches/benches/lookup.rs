//! Lookup cost: feature computation (mean-pool, and a projector of the trained shape) for
//! EmbeddingGemma's layer-0 input, and the similarity search over 1k / 10k / 100k stored
//! inputs of one length (the worst case: every entry in the probed length's HNSW graph), and
//! the content alignment of a revised 2048-token input against 1k / 10k stored chunks of 400
//! tokens (the token-run index's runs, then the cover).
//!
//! `cargo bench --workspace --bench lookup`

use std::sync::Arc;

use attncache_plugin::lookup::projector::{self, Pairs, TrainOptions, SEGMENTS};
use attncache_plugin::storage::entry::{AttentionMaps, Entry, Payload};
use attncache_plugin::{AttnCache, CacheConfig, FeatureExtractor, FeatureKind, Lookup};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const HIDDEN: usize = 768;
const LEN: usize = 128;
const FP: u64 = 11;

/// A deterministic pseudo-random vector.
fn vector(seed: u64, dim: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..dim)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn bench_features(c: &mut Criterion) {
    let xs = Tensor::rand(-1f32, 1f32, (1, LEN, HIDDEN), &Device::Cpu).expect("xs");
    let mut group = c.benchmark_group("features_128_tokens");
    let mean = FeatureExtractor::load(&FeatureKind::MeanPool, FP).expect("mean-pool");
    group.bench_function("mean_pool", |b| b.iter(|| mean.compute(&xs).expect("f")));
    // a projector of the shape `attncache train-projector` writes (weights from 1 epoch on
    // random pairs: the cost does not depend on what it learned)
    let desc = Tensor::rand(-1f32, 1f32, (16, SEGMENTS * HIDDEN), &Device::Cpu).expect("d");
    let mut pairs = Pairs::default();
    for i in 0..15 {
        pairs.push(i, i + 1, 0.1);
    }
    let opts = TrainOptions {
        epochs: 1,
        ..TrainOptions::default()
    };
    let (p, _) = projector::train(&desc, &pairs, SEGMENTS, FP, opts, &mut |_, _| {}).expect("p");
    let dir = tempfile::tempdir().expect("tempdir");
    p.save(dir.path()).expect("save");
    let learned = FeatureExtractor::load(&FeatureKind::Projector(dir.path().to_path_buf()), FP)
        .expect("load");
    group.bench_function("projector", |b| b.iter(|| learned.compute(&xs).expect("f")));
    group.finish();
}

fn tiny_entry(i: u64, dim: usize, feature_id: u32) -> Entry {
    let maps = Tensor::ones((1, 4, 4), DType::F16, &Device::Cpu).expect("maps");
    Entry {
        tokens: (0..4).map(|t| (i * 4 + t) as u32).collect::<Arc<[u32]>>(),
        feature: vector(i, dim).into(),
        feature_id,
        payload: Payload::Maps(AttentionMaps {
            heads: 1,
            layers: vec![maps],
        }),
    }
}

fn bench_search(c: &mut Criterion) {
    let mut group = c.benchmark_group("similarity_lookup");
    group.sample_size(30);
    for (name, dim) in [("projector_64d", 64usize), ("mean_pool_768d", HIDDEN)] {
        // `cargo test --all-targets` runs each bench once without `--bench`: keep it short
        let full = std::env::args().any(|a| a == "--bench");
        let sizes: &[u64] = if full {
            &[1_000, 10_000, 100_000]
        } else {
            &[1_000]
        };
        for &n in sizes {
            let cache = AttnCache::open(
                CacheConfig {
                    hot_bytes: 1 << 30,
                    similarity_threshold: Some(f32::INFINITY),
                    ..CacheConfig::default()
                },
                FP,
            )
            .expect("cache");
            let id = cache.features().id();
            for i in 0..n {
                cache.record(tiny_entry(i, dim, id));
            }
            let probe = vector(u64::MAX, dim);
            let tokens = [u32::MAX - 3, u32::MAX - 2, u32::MAX - 1, u32::MAX];
            assert!(matches!(
                cache.lookup(&tokens, Some(&probe)),
                Lookup::Near { .. }
            ));
            group.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| cache.lookup(&tokens, Some(&probe)))
            });
        }
    }
    group.finish();
}

/// `n` pseudo-random token ids from `seed`.
fn token_ids(seed: u64, n: usize) -> Vec<u32> {
    vector(seed, n)
        .into_iter()
        .map(|v| ((v + 0.5) * 250_000.0) as u32)
        .collect()
}

fn bench_spans(c: &mut Criterion) {
    use attncache_plugin::lookup::span_index::SpanIndex;
    use attncache_plugin::reuse::spans::cover;
    let mut group = c.benchmark_group("content_alignment_2048_tokens");
    for stored in [1_000u64, 10_000] {
        let index = SpanIndex::default();
        let chunks: Vec<Vec<u32>> = (0..stored).map(|i| token_ids(i + 1, 400)).collect();
        for (i, c) in chunks.iter().enumerate() {
            index.insert(i as u64, c.clone().into());
        }
        // a revised document: five stored chunks, an edit of 30 tokens in each
        let mut query = Vec::new();
        for (k, c) in chunks.iter().take(5).enumerate() {
            query.extend_from_slice(&c[..200]);
            query.extend(token_ids(1_000_000 + k as u64, 30));
            query.extend_from_slice(&c[200..]);
        }
        query.truncate(2048);
        group.bench_with_input(
            BenchmarkId::new("runs_and_cover", stored),
            &query,
            |b, q| b.iter(|| cover(q.len(), &index.runs(q), 4).expect("a cover")),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_features, bench_search, bench_spans);
criterion_main!(benches);
