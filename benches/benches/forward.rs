//! One `/v1/embeddings` request of the tiny generated model (EmbeddingGemma's architecture,
//! 2 layers) through the in-process server, 64 tokens:
//!
//! - `stock`: mistral.rs's CPU attention, cache off;
//! - `exact`: our exact attention, cache off;
//! - `miss`: cache on, an input never seen (computed exactly, its maps recorded);
//! - `hit`: cache on, an input seen before (its maps reused, q/k projections skipped).
//!
//! The model is tiny, so this shows the hook's fixed costs (planning, lookup, recording)
//! rather than attention's; `attncache-eval` measures the real model.
//!
//! `cargo bench --workspace --bench forward`

use attncache_plugin::ExactAttention;
use attncache_server::cli::ServeArgs;
use attncache_server::local_server::LocalServer;
use attncache_server::tiny_model::{self, WORDS};
use clap::Parser;
use criterion::{black_box, criterion_group, criterion_main, Criterion};

const TOKENS: usize = 64;

/// The `n`-th distinct input: `TOKENS` words, the first few spelling `n` in base |WORDS|.
fn input(n: usize) -> String {
    let mut digits = Vec::new();
    let mut rest = n;
    for _ in 0..4 {
        digits.push(WORDS[rest % WORDS.len()]);
        rest /= WORDS.len();
    }
    (0..TOKENS)
        .map(|i| digits.get(i).copied().unwrap_or(WORDS[i % WORDS.len()]))
        .collect::<Vec<_>>()
        .join(" ")
}

fn bench_forward(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    tiny_model::write(dir.path(), 7).expect("tiny model");
    let model = dir.path().to_str().expect("UTF-8 temp path");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let serve = ServeArgs::parse_from(["attncache-server", "--model", model, "--attn-cache", "on"]);
    let server = rt.block_on(LocalServer::start(&serve)).expect("server");
    let (hook, cache) = (server.hook.clone(), server.cache.clone());
    let embed = |text: &str| rt.block_on(server.embed(text)).expect("embedding");
    let mut group = c.benchmark_group("forward_tiny_64_tokens");
    group.sample_size(20);
    for (name, exact, cached) in [
        ("stock", ExactAttention::Stock, false),
        ("exact", ExactAttention::Fast, false),
    ] {
        hook.set_exact_attention(exact);
        cache.set_enabled_by_default(cached);
        group.bench_function(name, |b| b.iter(|| black_box(embed(&input(0)))));
    }
    hook.set_exact_attention(ExactAttention::Fast);
    cache.set_enabled_by_default(true);
    let mut n = 1;
    group.bench_function("miss", |b| {
        b.iter(|| {
            n += 1;
            black_box(embed(&input(n)))
        })
    });
    embed(&input(0)); // recorded: every later request of it hits
    let mut ran = false;
    group.bench_function("hit", |b| {
        ran = true;
        b.iter(|| black_box(embed(&input(0))))
    });
    group.finish();
    let counts = cache.counts();
    // (a name filter that skips the hit case runs nothing to check)
    assert!(
        !ran || counts.hits > 0,
        "the hit case never hit: {counts:?}"
    );
    attncache_plugin::uninstall();
}

criterion_group!(benches, bench_forward);
criterion_main!(benches);
