//! One layer of EmbeddingGemma-300M attention (3 query heads, 1 kv head, head_dim 256,
//! bidirectional sliding-window mask of 512) at 64 / 128 / 256 / 512 / 1024 tokens:
//!
//! - `stock`: mistral.rs's CPU kernel;
//! - `exact_fast`: our matrix-multiply attention (the cache's miss path without recording);
//! - `miss_record`: exact probabilities kept as f16 maps (what a recorded miss does), then P·V;
//! - `hit`: stored f16 maps decoded to f32, then P·V (q/k projections are skipped on top,
//!   which this bench does not include).
//!
//! Group `softmax`: the step inside exact attention that turns one layer's scores
//! `[1, 3, L, L]` into probabilities, `fused` (one pass per row, rows in parallel:
//! `exact_attention::fused_softmax`) against `unfused` (scale, add the mask, candle's
//! `softmax_last_dim`, one after another), at 512 and 2048 tokens.
//!
//! Group `gelu_glu`: the MLP's `gelu_tanh(gate) · up` of one EmbeddingGemma layer
//! (`[1, L, 1152]`) at 128 and 512 tokens, `ours` (`layer_kernels::gelu_tanh_glu`, what the
//! hook runs in `fast` mode) against `mistralrs` (`fused_glu` of mistralrs-quant, what
//! mistral.rs runs otherwise).
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

fn bench_softmax(c: &mut Criterion) {
    use attncache_plugin::kernels::exact_attention::{fused_softmax, normalize_mask};
    use candle_core::{Device, Tensor};
    let mut group = c.benchmark_group("softmax");
    group.sample_size(20);
    for len in [512usize, 2048] {
        let scores = Tensor::randn(0f32, 1f32, (1, 3, len, len), &Device::Cpu).expect("scores");
        let mask: Vec<f32> = (0..len * len)
            .map(|x| {
                if (x / len).abs_diff(x % len) < 257 {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (len, len), &Device::Cpu).expect("mask");
        let mask = normalize_mask(&mask, 1, 3, len, len).expect("2-D mask");
        let scale = 1.0 / 16.0;
        group.bench_with_input(BenchmarkId::new("fused", len), &len, |b, _| {
            b.iter(|| black_box(fused_softmax(&scores, scale, Some(&mask)).expect("fused")))
        });
        group.bench_with_input(BenchmarkId::new("unfused", len), &len, |b, _| {
            b.iter(|| {
                let s = (&scores * f64::from(scale))
                    .and_then(|s| s.broadcast_add(&mask))
                    .and_then(|s| candle_nn::ops::softmax_last_dim(&s))
                    .expect("unfused");
                black_box(s)
            })
        });
    }
    group.finish();
}

fn bench_gelu_glu(c: &mut Criterion) {
    use attncache_plugin::kernels::layer_kernels::gelu_tanh_glu;
    use candle_core::{Device, Tensor};
    use mistralrs_quant::{fused_glu, GluActivationType};
    let mut group = c.benchmark_group("gelu_glu");
    group.sample_size(30);
    for len in [128usize, 512] {
        let gate = Tensor::randn(0f32, 1f32, (1, len, 1152), &Device::Cpu).expect("gate");
        let up = Tensor::randn(0f32, 1f32, (1, len, 1152), &Device::Cpu).expect("up");
        group.bench_with_input(BenchmarkId::new("ours", len), &len, |b, _| {
            b.iter(|| black_box(gelu_tanh_glu(&gate, &up).expect("ours")))
        });
        group.bench_with_input(BenchmarkId::new("mistralrs", len), &len, |b, _| {
            b.iter(|| black_box(fused_glu(&gate, &up, GluActivationType::Gelu).expect("theirs")))
        });
    }
    group.finish();
}

fn bench_linear(c: &mut Criterion) {
    use attncache_plugin::kernels::layer_kernels::linear;
    use candle_core::{Device, Tensor};
    let mut group = c.benchmark_group("linear");
    group.sample_size(20);
    // EmbeddingGemma's MLP up (768 → 1152) and down (1152 → 768) projections; SmolLM2's
    // gate/up (576 → 1536) and down (1536 → 576)
    for (k, n) in [(768usize, 1152usize), (1152, 768), (576, 1536), (1536, 576)] {
        let w = Tensor::randn(0f32, 1f32, (n, k), &Device::Cpu).expect("w");
        for m in [4usize, 16, 64, 128, 256, 512, 1024, 2048] {
            let x = Tensor::randn(0f32, 1f32, (1, m, k), &Device::Cpu).expect("x");
            let id = format!("{k}x{n}/{m}");
            group.bench_function(BenchmarkId::new("ours", &id), |b| {
                b.iter(|| black_box(linear(&x, &w).expect("ours")))
            });
            // the weight as the GGUF loader keeps it for the fast path: its transpose contiguous
            let w_t = w
                .t()
                .and_then(|t| t.contiguous())
                .and_then(|t| t.t())
                .expect("wᵀ");
            group.bench_function(BenchmarkId::new("ours-wt", &id), |b| {
                b.iter(|| black_box(linear(&x, &w_t).expect("ours-wt")))
            });
            group.bench_function(BenchmarkId::new("candle", &id), |b| {
                b.iter(|| black_box(x.broadcast_matmul(&w.t().expect("t")).expect("candle")))
            });
        }
    }
    group.finish();
}

/// Group `causal_attention`: one layer of SmolLM2-135M's prompt attention (9 query heads,
/// 3 kv heads, head_dim 64, causal mask) at 200 and 800 tokens, `general` (the banded
/// `exact_attention::attention` path as it ran before the causal kernel) against `causal`
/// (`causal_attention::causal_attention`, one task per head and block of rows).
fn bench_causal(c: &mut Criterion) {
    use attncache_plugin::kernels::causal_attention::{
        causal_attention, causal_attention_recorded,
    };
    use attncache_plugin::kernels::exact_attention::{normalize_mask, AttentionParams};
    use attncache_plugin::kernels::stored_maps::{attend_stored, StoredLayer};
    use candle_core::{Device, Tensor};
    let mut group = c.benchmark_group("causal_attention");
    group.sample_size(20);
    let p = AttentionParams {
        softmax_scale: 0.125,
        softcap: None,
        n_kv_groups: 3,
    };
    for len in [200usize, 800] {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 9, len, 64), &dev).expect("q");
        let k = Tensor::randn(0f32, 1.0, (1, 3, len, 64), &dev).expect("k");
        let v = Tensor::randn(0f32, 1.0, (1, 3, len, 64), &dev).expect("v");
        let values: Vec<f32> = (0..len)
            .flat_map(|r| (0..len).map(move |c| if c <= r { 0.0 } else { f32::NEG_INFINITY }))
            .collect();
        let mask = Tensor::from_vec(values, (len, len), &dev).expect("mask");
        let mask = normalize_mask(&mask, 1, 9, len, len).expect("rank 4");
        group.bench_with_input(BenchmarkId::new("general", len), &len, |b, _| {
            b.iter(|| black_box(general_attention(&q, &k, &v, &mask, &p)))
        });
        group.bench_with_input(BenchmarkId::new("causal", len), &len, |b, _| {
            b.iter(|| {
                black_box(
                    causal_attention(&q, &k, &v, &mask, p.softmax_scale, p.softcap)
                        .expect("causal")
                        .expect("the causal case"),
                )
            })
        });
        // the causal kernel also writing its probabilities as packed f16 (a decoder map miss
        // that records them)
        group.bench_with_input(BenchmarkId::new("causal_recorded", len), &len, |b, _| {
            b.iter(|| {
                black_box(
                    causal_attention_recorded(&q, &k, &v, &mask, p.softmax_scale)
                        .expect("record")
                        .expect("the causal case"),
                )
            })
        });
        // the same layer from stored maps (decoder map reuse): every row from maps recorded
        // on these q/k, the first 80% of positions aligned as they are (a shared prefix) and
        // the rest gathered from stored rows 3 further on (a stretched tail)
        let (_, maps) = causal_attention_recorded(&q, &k, &v, &mask, p.softmax_scale)
            .expect("record")
            .expect("the causal case");
        let shared = len * 4 / 5;
        let source: Vec<u32> = (0..len)
            .map(|i| if i < shared { i } else { (i + 3).min(len - 1) } as u32)
            .collect();
        let stored = StoredLayer {
            maps: &maps,
            heads: 9,
            len,
        };
        group.bench_with_input(BenchmarkId::new("stored_maps", len), &len, |b, _| {
            b.iter(|| black_box(attend_stored(stored, &source, 0..len, &v).expect("stored")))
        });
    }
    group.finish();
}

/// The banded general path, as `exact_attention::attention` runs a mask that is not causal.
fn general_attention(
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    mask: &candle_core::Tensor,
    p: &attncache_plugin::kernels::exact_attention::AttentionParams,
) -> candle_core::Tensor {
    attncache_plugin::kernels::exact_attention::attention_general(q, k, v, Some(mask), p)
        .expect("general")
}

criterion_group!(
    benches,
    bench_causal,
    bench_attention,
    bench_softmax,
    bench_gelu_glu,
    bench_linear
);
criterion_main!(benches);
