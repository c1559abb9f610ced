//! The hook inside the real pipeline, with the tiny model served in-process over HTTP:
//! - hook installed in `stock` mode gives bit-identical embeddings to no hook at all;
//! - `fast` mode (our attention and our MLP activation kernel) stays within 1e-5 (cosine ≥
//!   0.99999) and really runs (its counters move);
//! - the stock embeddings match the committed insta snapshot (the reference output).
//!
//! The hook is process-wide, so everything that switches it lives in one test. Inputs go
//! one per request (`embed_each`): bits depend on the batch an input runs in.

use crate::common;

use attncache_plugin::ExactAttention;
use attncache_server::cli::ServeArgs;
use clap::Parser;
use common::{
    cosine, embed_each, max_abs_diff, norm, rounded, snapped_to_committed, start, TinyModel, TEXTS,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_is_bit_identical_fast_is_within_1e5_and_snapshot_holds() {
    let _guard = crate::env_lock().await;
    let model = TinyModel::new("equivalence");
    let args = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        model.path().to_str().unwrap(),
        "--exact-attention",
        "stock",
    ]);
    let (app, base) = start(&args).await;
    let hook = app.hook.clone();
    let client = reqwest::Client::new();

    // 1. No hook at all: mistral.rs as published (plus the inert patch).
    attncache_plugin::uninstall();
    let reference = embed_each(&client, &base, TEXTS).await;
    for (text, e) in TEXTS.iter().zip(&reference) {
        assert_eq!(
            e.len(),
            attncache_server::tiny_model::EMBEDDING_DIM,
            "{text}"
        );
        assert!(e.iter().all(|x| x.is_finite()), "{text}: non-finite");
        assert!((norm(e) - 1.0).abs() < 1e-4, "{text}: norm {}", norm(e));
    }

    // 2. Hook installed, stock mode: asked at every layer, declines, output bit-identical.
    attncache_plugin::install(hook.clone());
    let before = hook.stats();
    let stock = embed_each(&client, &base, TEXTS).await;
    let after = hook.stats();
    assert!(
        after.declined_calls > before.declined_calls,
        "the hook was never asked"
    );
    assert_eq!(after.fast_calls, before.fast_calls);
    assert_eq!(
        after.kernel_calls, before.kernel_calls,
        "stock ran our MLP kernel"
    );
    for (a, b) in reference.iter().zip(&stock) {
        let (a, b): (Vec<u32>, Vec<u32>) = (
            a.iter().map(|x| x.to_bits()).collect(),
            b.iter().map(|x| x.to_bits()).collect(),
        );
        assert_eq!(a, b, "stock mode changed the output");
    }

    // 3. Fast mode: computed by our path, within 1e-5 of stock.
    hook.set_exact_attention(ExactAttention::Fast);
    let before = hook.stats();
    let fast = embed_each(&client, &base, TEXTS).await;
    let after = hook.stats();
    // 2 layers per input, every input in TEXTS reached the fast path.
    assert!(
        after.fast_calls - before.fast_calls >= 2,
        "fast path never ran: {before:?} -> {after:?}"
    );
    // and the MLP's tanh-GELU gate ran on our kernel (layer_kernels), 2 layers per input
    assert!(
        after.kernel_calls - before.kernel_calls >= 2,
        "the MLP kernel never ran: {before:?} -> {after:?}"
    );
    let diff = max_abs_diff(&reference, &fast);
    assert!(diff <= 1e-5, "fast vs stock: max |diff| = {diff:e}");
    for (text, (a, b)) in TEXTS.iter().zip(reference.iter().zip(&fast)) {
        let c = cosine(a, b);
        assert!(c >= 0.99999, "{text}: cosine {c}");
    }

    // 4. Reference output: the stock embeddings, rounded to 1e-5; a value one rounding step
    // from the committed one (CPU-dependent summation order) counts as unchanged.
    let rounded = snapped_to_committed(
        "in_process__hook_equivalence__tiny_model_embeddings",
        rounded(TEXTS, &reference, 5),
        1.5e-5,
    );
    insta::assert_json_snapshot!("tiny_model_embeddings", rounded);
    attncache_plugin::uninstall();
}
