//! One layer of EmbeddingGemma-300M attention (3 query heads, 1 kv head, head_dim 256,
//! bidirectional sliding-window mask of 512), stock mistral.rs CPU kernel vs our exact path,
//! at 64 / 256 / 1024 tokens. `cargo bench -p attncache-benches --bench attention`.

use attncache_plugin::exact_attention::{attention, normalize_mask, AttentionParams};
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
    for len in [64usize, 256, 1024] {
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
    }
    group.finish();
}

criterion_group!(benches, bench_attention);
criterion_main!(benches);
