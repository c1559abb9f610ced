//! The attention-map cache through the real pipeline (tiny model, in-process server, HTTP):
//! flag off is the exact path bit for bit; the first pass with the cache records, the second
//! hits and stays within 1e-4 of exact; a restarted server serves the entries from disk;
//! the cached embeddings match the committed snapshot.
//!
//! The hook is process-wide: tests in this file take a lock so that one runs at a time.

use crate::common;

use attncache_server::cli::ServeArgs;
use clap::Parser;
use common::{
    cosine, embed, embed_each, embed_reported, max_abs_diff, rounded, snapped_to_committed, start,
    TinyModel, TEXTS,
};

use crate::env_lock;

fn bits(e: &[Vec<f32>]) -> Vec<Vec<u32>> {
    e.iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_records_hits_survives_restart_and_leaves_flag_off_exact() {
    let _guard = env_lock().await;
    let model = TinyModel::new("cache");
    let cache_dir = tempfile::tempdir().unwrap();
    let args = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        model.path().to_str().unwrap(),
        "--repeat-mib",
        "0",
        "--attn-cache",
        "off",
        "--cache-dir",
        cache_dir.path().to_str().unwrap(),
    ]);
    let (app, base) = start(&args).await;
    let cache = app
        .hook
        .cache()
        .expect("the server always has a cache")
        .clone();
    let client = reqwest::Client::new();

    // 1. flag off (the default here): the exact path; the cache is not even consulted.
    let exact = embed_each(&client, &base, TEXTS).await;
    assert_eq!(cache.counts().lookups, 0);

    // 2. flag on, first pass: every input misses and is recorded.
    cache.set_enabled_by_default(true);
    let first = embed(&client, &base, TEXTS).await;
    let c = cache.counts();
    assert_eq!((c.hits, c.recorded), (0, TEXTS.len() as u64), "{c:?}");
    assert!(
        max_abs_diff(&exact, &first) <= 1e-5,
        "recording pass must be exact"
    );

    // 3. second pass: every input hits (maps from the store), within 1e-4 of exact.
    let before = app.hook.stats();
    let second = embed(&client, &base, TEXTS).await;
    let c = cache.counts();
    assert_eq!(c.hits, TEXTS.len() as u64, "{c:?}");
    let after = app.hook.stats();
    assert!(
        after.qk_skipped_calls > before.qk_skipped_calls,
        "all-hit batches must skip q/k: {after:?}"
    );
    let diff = max_abs_diff(&exact, &second);
    assert!(diff <= 1e-4, "cached vs exact: {diff:e}");
    for (a, b) in exact.iter().zip(&second) {
        assert!(cosine(a, b) >= 0.9999);
    }

    // 4. flag off again: bit-identical to the first exact pass, entries notwithstanding
    // (both one input per request: bits depend on the batch an input runs in).
    cache.set_enabled_by_default(false);
    let off = embed_each(&client, &base, TEXTS).await;
    assert_eq!(bits(&off), bits(&exact), "flag-off output changed");

    // 5. reference output: cached embeddings, rounded to 1e-4; a value one rounding step
    // from the committed one (CPU-dependent summation order) counts as unchanged.
    let rounded = snapped_to_committed(
        "in_process__cache_pipeline__tiny_model_cached_embeddings",
        rounded(TEXTS, &second, 4),
        1.5e-4,
    );
    insta::assert_json_snapshot!("tiny_model_cached_embeddings", rounded);

    // 6. restart on the same directory: the entries come back from disk (cold hits).
    cache.flush(); // cold copies are written in the background
    let (app2, base2) = start(&args).await;
    let cache2 = app2.hook.cache().unwrap().clone();
    assert_eq!(cache2.counts().cold_entries, TEXTS.len() as u64);
    cache2.set_enabled_by_default(true);
    let restarted = embed(&client, &base2, TEXTS).await;
    let c = cache2.counts();
    assert_eq!((c.cold_hits, c.recorded), (TEXTS.len() as u64, 0), "{c:?}");
    assert!(
        max_abs_diff(&second, &restarted) <= 1e-6,
        "maps read from disk differ from RAM ones"
    );
    attncache_plugin::uninstall();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_inputs_take_a_neighbours_maps_when_a_threshold_allows() {
    let _guard = env_lock().await;
    let model = TinyModel::new("near");
    let args = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        model.path().to_str().unwrap(),
        "--attn-cache",
        "on",
        "--repeat-mib",
        "0",
    ]);
    let (app, base) = start(&args).await;
    let cache = app.hook.cache().unwrap().clone();
    let client = reqwest::Client::new();
    let stored = "the staff were lovely and the room was clean";
    let variant = "the staff were rude and the room was clean"; // one word changed, same length
    embed(&client, &base, &[stored]).await;
    assert_eq!(
        cache.counts().indexed,
        1,
        "the recorded entry has a layer-0 feature"
    );

    // no threshold: the variant is a miss (computed exactly, recorded)
    cache.set_enabled_by_default(false);
    let exact = embed(&client, &base, &[variant]).await;
    cache.set_enabled_by_default(true);
    cache.set_similarity_threshold(Some(f32::INFINITY));
    let before = cache.counts();
    let near = embed(&client, &base, &[variant]).await;
    let after = cache.counts();
    assert_eq!(after.near_hits - before.near_hits, 1, "{after:?}");
    assert!(near[0].iter().all(|x| x.is_finite()));
    let c = cosine(&exact[0], &near[0]);
    eprintln!("tiny model, one word changed, neighbour's maps: cosine {c}");
    assert!(
        c < 1.0 - 1e-6,
        "a neighbour's maps cannot reproduce the exact output bit for bit"
    );
    attncache_plugin::uninstall();
}

/// A gate file that accepts every neighbour: predicted error 1e-4 whatever the pair.
fn accept_all_gate(dir: &std::path::Path) -> std::path::PathBuf {
    let gate = attncache_plugin::ErrorGate {
        coefficients: [1e-4f64.ln(), 0.0, 0.0, 0.0],
        margin: 0.0,
        quantile: 0.9,
        max_loss: 0.01,
        points: 0,
        policy: "test".into(),
        reuse: None,
    };
    let path = dir.join("gate.json");
    gate.save(&path).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_hit_levers_are_exact_where_they_compute_and_align_other_lengths() {
    let _guard = env_lock().await;
    let model = TinyModel::new("levers");
    let dir = tempfile::tempdir().unwrap();
    let gate = accept_all_gate(dir.path());
    let args = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        model.path().to_str().unwrap(),
        "--attn-cache",
        "on",
        "--repeat-mib",
        "0",
        "--error-gate",
        gate.to_str().unwrap(),
    ]);
    let (app, base) = start(&args).await;
    let cache = app.hook.cache().unwrap().clone();
    assert!(cache.error_gate().is_some(), "--error-gate is loaded");
    let client = reqwest::Client::new();
    let stored = "the staff were lovely and the room was clean";
    let variant = "the staff were rude and the room was clean"; // same length
    let longer = "the staff were really lovely and the room was clean"; // one word inserted
    embed(&client, &base, &[stored]).await;
    cache.set_admission(false);
    cache.set_enabled_by_default(false);
    let exact = embed(&client, &base, &[variant, longer]).await;
    cache.set_enabled_by_default(true);
    let policy = |p: attncache_plugin::ReusePolicy| cache.set_reuse_policy(p).unwrap();
    let near = |text: &'static str| {
        let (client, base, cache) = (client.clone(), base.clone(), cache.clone());
        async move {
            let before = cache.counts().near_hits;
            let (e, report) = embed_reported(&client, &base, text).await;
            assert_eq!(
                cache.counts().near_hits,
                before + 1,
                "{text:?} is a near hit"
            );
            assert_eq!(report["outcome"], "near_hit", "{report}");
            (e, report)
        }
    };

    // whole maps: not the exact output
    let (whole, d) = near(variant).await;
    assert_eq!(d["differing_tokens"], 1, "{d}");
    assert!(cosine(&whole, &exact[0]) < 1.0 - 1e-6);
    // partial reuse that reuses no layer: every layer computed, the exact output
    policy(attncache_plugin::ReusePolicy {
        layers: vec![99],
        ..Default::default()
    });
    let (none, _) = near(variant).await;
    assert!(max_abs_diff(&[none], &exact[..1]) <= 1e-5);
    // selective recompute of every row (budget over the length): the exact output
    policy(attncache_plugin::ReusePolicy {
        recompute_differing: true,
        recompute_budget: 64,
        max_recompute_share: 1.0,
        ..Default::default()
    });
    let (all_rows, d) = near(variant).await;
    assert!(d["recomputed_rows"].as_u64().is_some_and(|r| r > 1), "{d}");
    assert!(max_abs_diff(&[all_rows], &exact[..1]) <= 1e-5);
    // another length: only with slack, aligned (one differing position, the inserted word)
    policy(attncache_plugin::ReusePolicy::default());
    let before = cache.counts().near_hits;
    embed(&client, &base, &[longer]).await;
    assert_eq!(
        cache.counts().near_hits,
        before,
        "no slack: same length only"
    );
    policy(attncache_plugin::ReusePolicy {
        length_slack: 1,
        ..Default::default()
    });
    let (aligned, d) = near(longer).await;
    assert_eq!(d["differing_tokens"], 1, "{d}");
    assert!(aligned.iter().all(|x| x.is_finite()));
    let c = cosine(&aligned, &exact[1]);
    eprintln!("tiny model, one word inserted, aligned neighbour's maps: cosine {c}");
    assert!(c > 0.5 && c < 1.0 - 1e-6, "cosine {c}");
    // aligned and every row recomputed: exact again
    policy(attncache_plugin::ReusePolicy {
        length_slack: 1,
        recompute_differing: true,
        recompute_budget: 64,
        max_recompute_share: 1.0,
        ..Default::default()
    });
    let (aligned_exact, _) = near(longer).await;
    assert!(max_abs_diff(&[aligned_exact], &exact[1..]) <= 1e-5);
    // a gate whose target the pair misses: a miss, the exact output
    let strict = cache.error_gate().unwrap().with_max_loss(1e-6);
    cache.set_error_gate(Some(strict)).unwrap();
    let before = cache.counts().misses;
    let refused = embed(&client, &base, &[variant]).await;
    assert_eq!(cache.counts().misses, before + 1);
    assert!(max_abs_diff(&refused, &exact[..1]) <= 1e-5);
    attncache_plugin::uninstall();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_error_gate_file_is_refused_at_start_by_name() {
    let _guard = env_lock().await;
    let model = TinyModel::new("badgate");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gate.json");
    std::fs::write(&path, "{\"coefficients\": [1, 2]}").unwrap();
    let args = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        model.path().to_str().unwrap(),
        "--error-gate",
        path.to_str().unwrap(),
    ]);
    let err = attncache_server::startup::build(&args)
        .await
        .err()
        .expect("a broken gate file is refused");
    assert!(format!("{err:#}").contains("error_gate"), "{err:#}");
}
