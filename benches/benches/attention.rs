//! One layer of EmbeddingGemma-300M attention (3 query heads, 1 kv head, head_dim 256,
//! bidirectional sliding-window mask of 512) at 64 / 128 / 256 / 512 / 1024 tokens:
//!
//! - `stock`: mistral.rs's CPU kernel;
//! - `exact_fast`: our matrix-multiply attention (the cache's miss path without recording);
//! - `miss_record`: exact probabilities kept as f16 maps (what a recorded miss does), then P·V;
//! - `hit`: stored f16 maps decoded to f32, then P·V (q/k projections are skipped on top,
//!   which this bench does not include).
//!
//! `cargo bench -p attncache-benches --bench attention` (or `make bench`).

use attncache_plugin::exact_attention::{
    apply_probabilities, attention, normalize_mask, probabilities, AttentionParams,
};
use candle_core::DType;
use candle_core::{Device, Tensor};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use mistralrs_core::layers::Sdpa;
use mistralrs_core::SdpaParams;

const HEADS: usize = 3;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 256;
const WINDOW: usize = 512;

fn sliding_mask(l: usize) -> Tensor {
    let data: Vec<f32> = (0..l * l)
        .map(|x| {
            if (x / l).abs_diff(x % l) < WINDOW {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Tensor::from_vec(data, (l, l), &Device::Cpu).expect("mask")
}

fn bench_attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_layer");
    group.sample_size(10);
    for len in [64usize, 128, 256, 512, 1024] {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1f32, (1, HEADS, len, HEAD_DIM), &dev).expect("q");
        let k = Tensor::randn(0f32, 1f32, (1, KV_HEADS, len, HEAD_DIM), &dev).expect("k");
        let v = Tensor::randn(0f32, 1f32, (1, KV_HEADS, len, HEAD_DIM), &dev).expect("v");
        let mask = sliding_mask(len);
        let sdpa = SdpaParams {
            n_kv_groups: HEADS / KV_HEADS,
            softcap: None,
            softmax_scale: 1.0 / (HEAD_DIM as f32).sqrt(),
            sliding_window: Some(WINDOW),
            sinks: None,
        };
        let params = AttentionParams::from_sdpa(&sdpa);
        let mask4 = normalize_mask(&mask, 1, HEADS, len, len).expect("mask shape");
        group.bench_with_input(BenchmarkId::new("stock", len), &len, |b, _| {
            b.iter(|| {
                black_box(
                    Sdpa.run_attention(&q, &k, &v, Some(&mask), None, &sdpa)
                        .expect("stock"),
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("exact_fast", len), &len, |b, _| {
            b.iter(|| black_box(attention(&q, &k, &v, Some(&mask4), &params).expect("fast")))
        });
        group.bench_with_input(BenchmarkId::new("miss_record", len), &len, |b, _| {
            b.iter(|| {
                let p = probabilities(&q, &k, Some(&mask4), &params).expect("probs");
                let kept = p
                    .squeeze(0)
                    .and_then(|p| p.to_dtype(DType::F16))
                    .expect("f16 maps");
                black_box((apply_probabilities(&p, &v).expect("pv"), kept))
            })
        });
        let stored = probabilities(&q, &k, Some(&mask4), &params)
            .and_then(|p| p.squeeze(0))
            .and_then(|p| p.to_dtype(DType::F16))
            .expect("stored maps");
        group.bench_with_input(BenchmarkId::new("hit", len), &len, |b, _| {
            b.iter(|| {
                let p = stored
                    .to_dtype(DType::F32)
                    .and_then(|p| p.unsqueeze(0))
                    .expect("decode");
                black_box(apply_probabilities(&p, &v).expect("pv"))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
