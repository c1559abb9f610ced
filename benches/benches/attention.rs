//! One layer of EmbeddingGemma-300M attention (3 query heads, 1 kv head, head_dim 256,
//! bidirectional sliding-window mask of 512) at 64 / 128 / 256 / 512 / 1024 tokens:
//!
//! - `stock`: mistral.rs's CPU kernel;
//! - `exact_fast`: our matrix-multiply attention (the cache's miss path without recording);
//! - `miss_record`: exact probabilities kept as f16 maps (what a recorded miss does), then P·V;
//! - `hit`: stored f16 maps decoded to f32, then P·V (q/k projections are skipped on top,
//!   which this bench does not include).
//!
//! `cargo bench --workspace --bench attention` (or `make bench`).

use attncache_benches::layer_attention::LayerCase;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_layer");
    group.sample_size(10);
    for len in [64usize, 128, 256, 512, 1024] {
        let case = LayerCase::new(len).expect("layer inputs");
        group.bench_with_input(BenchmarkId::new("stock", len), &len, |b, _| {
            b.iter(|| black_box(case.stock().expect("stock")))
        });
        group.bench_with_input(BenchmarkId::new("exact_fast", len), &len, |b, _| {
            b.iter(|| black_box(case.exact().expect("fast")))
        });
        group.bench_with_input(BenchmarkId::new("miss_record", len), &len, |b, _| {
            b.iter(|| black_box(case.miss_record().expect("miss")))
        });
        group.bench_with_input(BenchmarkId::new("hit", len), &len, |b, _| {
            b.iter(|| black_box(case.hit().expect("hit")))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
