//! The attention-map cache through the real pipeline (tiny model, in-process server, HTTP):
//! flag off is the exact path bit for bit; the first pass with the cache records, the second
//! hits and stays within 1e-4 of exact; a restarted server serves the entries from disk;
//! the cached embeddings match the committed snapshot.
//!
//! The hook is process-wide: tests in this file take a lock so that one runs at a time.

mod common;

use attncache_integration::cli::ServeArgs;
use clap::Parser;
use common::{cosine, embed, max_abs_diff, rounded, start, TinyModel, TEXTS};

async fn env_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

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
    let exact = embed(&client, &base, TEXTS).await;
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

    // 4. flag off again: bit-identical to the first exact pass, entries notwithstanding.
    cache.set_enabled_by_default(false);
    let off = embed(&client, &base, TEXTS).await;
    assert_eq!(bits(&off), bits(&exact), "flag-off output changed");

    // 5. reference output: cached embeddings, rounded to 1e-4.
    let rounded = rounded(TEXTS, &second, 4);
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
