//! Reading one cache entry of EmbeddingGemma-300M's shape (24 layers × 3 heads × L × L, f16)
//! at 128 and 512 tokens: from the hot tier (RAM) vs the cold tier (file through mmap,
//! checksum, decode). The page cache is warm after the first read, so `cold` measures
//! mmap + crc32 + decode, not the disk.
//! `cargo bench --workspace --bench store`.

use std::sync::Arc;

use attncache_plugin::storage::entry::{self, AttentionMaps, Entry, Payload};
use attncache_plugin::storage::store::{MapStore, StoreConfig};
use candle_core::{DType, Device, Tensor};
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

const LAYERS: usize = 24;
const HEADS: usize = 3;
const FP: u64 = 7;

fn entry_of(len: usize) -> Entry {
    let maps = (0..LAYERS)
        .map(|_| {
            let t = Tensor::rand(0f32, 1f32, (HEADS, len, len), &Device::Cpu).expect("rand");
            t.broadcast_div(&t.sum_keepdim(2).expect("sum"))
                .and_then(|t| t.to_dtype(DType::F16))
                .expect("maps")
        })
        .collect();
    let tokens: Arc<[u32]> = (0..len as u32).collect();
    Entry {
        tokens,
        feature: vec![0.5; 768].into(),
        feature_id: 0,
        payload: Payload::Maps(AttentionMaps {
            heads: HEADS,
            layers: maps,
        }),
    }
}

fn bench_store(c: &mut Criterion) {
    let mut group = c.benchmark_group("store_read");
    group.sample_size(20);
    for len in [128usize, 512] {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = entry_of(len);
        let tokens = e.tokens.clone();
        let bytes = entry::encode(&e, FP).expect("encode");
        let cfg = |hot_bytes| StoreConfig {
            hot_bytes,
            cold_dir: Some(dir.path().to_path_buf()),
            cold_bytes: 1 << 34,
            fingerprint: FP,
            redis: None,
            scope: "global".into(),
        };
        let hot = MapStore::open(cfg(1 << 32)).expect("store");
        hot.insert(e);
        hot.flush(); // the cold file must exist before the second store indexes the directory
                     // a hot tier too small to hold the entry: every get reads the cold file
        let cold = MapStore::open(cfg(1)).expect("store");
        group.bench_with_input(BenchmarkId::new("hot", len), &len, |b, _| {
            b.iter(|| black_box(hot.get(&tokens).expect("hot hit")))
        });
        group.bench_with_input(BenchmarkId::new("cold", len), &len, |b, _| {
            b.iter(|| black_box(cold.get(&tokens).expect("cold hit")))
        });
        group.bench_with_input(BenchmarkId::new("decode_only", len), &len, |b, _| {
            b.iter(|| black_box(entry::decode(&bytes, FP).expect("decode")))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
