//! The map store and its file format: round trips, restart, damage of every kind, other
//! models, eviction, and many threads at once.

use std::sync::Arc;

use attncache_plugin::storage::entry::{self, AttentionMaps, DecodeError, Entry, Payload};
use attncache_plugin::storage::store::{MapStore, StoreConfig};
use attncache_plugin::tiering::sizing::{SharedSampler, STORE_SAMPLED_KEYS};
use attncache_plugin::{AttnCache, CacheConfig, FeatureExtractor, FeatureKind, Lookup};
use candle_core::{DType, Device, Tensor};

const FP: u64 = 0xA77E_5CAC_4E00_0001;

/// An entry for `tokens` with `layers` layers of `heads` rows-normalised maps whose values
/// depend on `salt`, so different entries have different maps.
fn entry(tokens: &[u32], layers: usize, heads: usize, salt: f32) -> Entry {
    let l = tokens.len();
    let maps = (0..layers)
        .map(|layer| {
            let data: Vec<f32> = (0..heads * l * l)
                .map(|i| 1.0 + ((i as f32 + salt + layer as f32) * 0.37).sin().abs())
                .collect();
            let t = Tensor::from_vec(data, (heads, l, l), &Device::Cpu).unwrap();
            let t = t.broadcast_div(&t.sum_keepdim(2).unwrap()).unwrap();
            t.to_dtype(DType::F16).unwrap()
        })
        .collect();
    Entry {
        tokens: tokens.into(),
        feature: vec![salt, 1.0, -2.0].into(),
        feature_id: mean_pool_id(),
        payload: Payload::Maps(AttentionMaps {
            heads,
            layers: maps,
        }),
    }
}

/// The id of the default feature computation (what the cache indexes).
fn mean_pool_id() -> u32 {
    FeatureExtractor::load(&FeatureKind::default(), FP)
        .unwrap()
        .id()
}

fn same_maps(a: &Entry, b: &Entry) -> bool {
    a.tokens == b.tokens
        && a.feature == b.feature
        && a.maps().map(|m| m.heads) == b.maps().map(|m| m.heads)
        && a.map_layers().len() == b.map_layers().len()
        && a.map_layers().iter().zip(b.map_layers()).all(|(x, y)| {
            x.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                == y.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
        })
}

fn config(dir: Option<&std::path::Path>) -> StoreConfig {
    StoreConfig {
        hot_bytes: 64 << 20,
        cold_dir: dir.map(|d| d.to_path_buf()),
        cold_bytes: 256 << 20,
        fingerprint: FP,
        redis: None,
        scope: "global".into(),
    }
}

#[test]
fn encode_decode_round_trip() {
    let e = entry(&[5, 6, 7, 8, 9], 3, 2, 0.5);
    let bytes = entry::encode(&e, FP).unwrap();
    assert_eq!(bytes.len(), entry::HEADER_BYTES + e.bytes());
    let back = entry::decode(&bytes, FP).unwrap();
    assert!(same_maps(&e, &back));
}

#[test]
fn every_kind_of_damage_is_detected() {
    let e = entry(&[1, 2, 3, 4], 2, 3, 1.5);
    let good = entry::encode(&e, FP).unwrap();
    // truncated anywhere
    for cut in [0, 10, entry::HEADER_BYTES, good.len() - 1] {
        assert!(
            matches!(
                entry::decode(&good[..cut], FP),
                Err(DecodeError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    // a flipped bit in a header field: refused, whatever the field
    for at in [9, 13, 20, 25, 29, 33, 37, 41] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        assert!(
            entry::decode(&bad, FP).is_err(),
            "header bit flip at {at} accepted"
        );
    }
    // a flipped bit in the tokens, the feature or the maps: checksum mismatch
    let feature_at = entry::HEADER_BYTES + 4 * 4;
    for at in [entry::HEADER_BYTES + 2, feature_at + 1, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        assert_eq!(
            entry::decode(&bad, FP).err(),
            Some(DecodeError::Corrupt),
            "bit flip at {at}"
        );
    }
    // another model's entry, another format
    assert!(matches!(
        entry::decode(&good, FP + 1),
        Err(DecodeError::OtherModel { .. })
    ));
    let mut foreign = good.clone();
    foreign[0] = b'X';
    assert_eq!(
        entry::decode(&foreign, FP).err(),
        Some(DecodeError::Foreign)
    );
    // a header whose shape does not match its payload size
    let mut shape = good.clone();
    shape[24] = 9;
    assert!(matches!(
        entry::decode(&shape, FP),
        Err(DecodeError::BadHeader(_))
    ));
}

#[test]
fn restart_keeps_entries_and_reads_them_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let a = entry(&[10, 11, 12], 2, 2, 0.0);
    let b = entry(&[10, 11, 12, 13, 14], 2, 2, 3.0);
    let c = entry(&[20, 21, 22], 2, 2, 5.0);
    {
        let store = MapStore::open(config(Some(dir.path()))).unwrap();
        store.insert(a.clone());
        store.insert(b.clone());
        store.flush();
        assert_eq!(store.cold_usage().0, 2);
        // queued but not flushed: dropping the store still writes it
        store.insert(c.clone());
    }
    let store = MapStore::open(config(Some(dir.path()))).unwrap();
    assert_eq!(store.cold_usage().0, 3, "the cold index was not rebuilt");
    assert!(same_maps(
        &c,
        &store.get(&c.tokens).expect("entry c after restart")
    ));
    let got = store.get(&a.tokens).expect("entry a after restart");
    assert!(same_maps(&a, &got));
    let got = store.get(&b.tokens).expect("entry b after restart");
    assert!(same_maps(&b, &got));
    assert_eq!(
        store
            .stats()
            .cold_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    // promoted to the hot tier
    assert!(store.get(&a.tokens).is_some());
    assert_eq!(
        store
            .stats()
            .hot_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // lengths never share: a prefix of b's tokens is not b
    assert!(store.get(&[10, 11, 12, 13]).is_none());
}

fn entry_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let dir = dir.join(format!("{FP:016x}"));
    for d in std::fs::read_dir(dir).unwrap().flatten() {
        if d.path().is_dir() {
            out.extend(
                std::fs::read_dir(d.path())
                    .unwrap()
                    .flatten()
                    .map(|f| f.path()),
            );
        }
    }
    out
}

#[test]
fn damaged_files_are_a_miss_and_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<Vec<u32>> = (0..4).map(|i| vec![i, i + 1, i + 2, i + 3]).collect();
    {
        let store = MapStore::open(config(Some(dir.path()))).unwrap();
        for (i, t) in tokens.iter().enumerate() {
            store.insert(entry(t, 2, 2, i as f32));
        }
    }
    let mut files = entry_files(dir.path());
    files.sort();
    assert_eq!(files.len(), 4);
    // 0: flipped payload byte (found on read); 1: truncated (found at open);
    // 2: another model's entry under this name (found at open); 3: untouched.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xFF;
    std::fs::write(&files[0], &bytes).unwrap();
    let bytes = std::fs::read(&files[1]).unwrap();
    std::fs::write(&files[1], &bytes[..bytes.len() / 2]).unwrap();
    let other = entry::encode(&entry(&[0, 1, 2, 3], 2, 2, 0.0), FP ^ 1).unwrap();
    std::fs::write(&files[2], other).unwrap();

    let store = MapStore::open(config(Some(dir.path()))).unwrap();
    assert_eq!(
        store.cold_usage().0,
        2,
        "truncated and foreign files must not be indexed"
    );
    let served: Vec<_> = tokens.iter().filter_map(|t| store.get(t)).collect();
    assert_eq!(served.len(), 1, "only the untouched entry may be served");
    for e in &served {
        let i = tokens.iter().position(|t| **t == *e.tokens).unwrap();
        assert!(
            same_maps(e, &entry(&tokens[i], 2, 2, i as f32)),
            "wrong maps served"
        );
    }
    assert_eq!(
        store
            .stats()
            .corrupt
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    assert_eq!(
        entry_files(dir.path()).len(),
        1,
        "damaged files must be removed"
    );
}

#[test]
fn cold_tier_stays_within_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let one = entry::HEADER_BYTES + entry(&[0; 16], 2, 2, 0.0).bytes();
    let cfg = StoreConfig {
        cold_bytes: (3 * one) as u64,
        ..config(Some(dir.path()))
    };
    let store = MapStore::open(cfg).unwrap();
    for i in 0..6u32 {
        store.insert(entry(&[i; 16], 2, 2, i as f32));
    }
    store.flush();
    let (entries, bytes) = store.cold_usage();
    assert_eq!(entries, 3);
    assert!(bytes <= (3 * one) as u64);
    assert_eq!(entry_files(dir.path()).len(), 3);
    assert_eq!(
        store
            .stats()
            .cold_evictions
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
}

#[test]
fn many_threads_insert_and_read_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(MapStore::open(config(Some(dir.path()))).unwrap());
    let threads: Vec<_> = (0..6u32)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for round in 0..20u32 {
                    let i = (t * 7 + round) % 10; // threads overlap on the same keys
                    let tokens = vec![i, i + 100, i + 200];
                    match store.get(&tokens) {
                        Some(e) => assert!(
                            same_maps(&e, &entry(&tokens, 2, 2, i as f32)),
                            "wrong maps for {i}"
                        ),
                        None => store.insert(entry(&tokens, 2, 2, i as f32)),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread panicked");
    }
    store.flush();
    for i in 0..10u32 {
        let tokens = vec![i, i + 100, i + 200];
        let e = store.get(&tokens).expect("every key was inserted");
        assert!(same_maps(&e, &entry(&tokens, 2, 2, i as f32)));
    }
    // a cold copy is skipped (never waited for) when the writer's queue is full
    let skipped = store
        .stats()
        .cold_writes_skipped
        .load(std::sync::atomic::Ordering::Relaxed);
    let on_disk = store.cold_usage().0;
    assert!(
        on_disk <= 10 && on_disk + skipped >= 10,
        "{on_disk} on disk, {skipped} skipped"
    );
    assert_eq!(entry_files(dir.path()).len() as u64, on_disk);
    assert!(entry_files(dir.path()).iter().all(|p| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(".tmp-")));
}

#[test]
fn admission_after_the_second_sighting() {
    let cfg = CacheConfig {
        admit_after: 2,
        ..CacheConfig::default()
    };
    let cache = AttnCache::open(cfg, FP).unwrap();
    assert!(matches!(
        cache.lookup(&[1, 2, 3], None),
        Lookup::Miss { record: false }
    ));
    assert!(matches!(
        cache.lookup(&[1, 2, 3], None),
        Lookup::Miss { record: true }
    ));
    assert!(matches!(
        cache.lookup(&[4, 5, 6], None),
        Lookup::Miss { record: false }
    ));
    cache.record(entry(&[1, 2, 3], 1, 1, 0.0));
    assert!(matches!(cache.lookup(&[1, 2, 3], None), Lookup::Hit(_)));
    let c = cache.counts();
    assert_eq!((c.lookups, c.hits, c.misses, c.recorded), (4, 1, 3, 1));
}

#[test]
fn invalid_settings_are_rejected_by_name() {
    for (cfg, name) in [
        (
            CacheConfig {
                hot_bytes: 10,
                ..Default::default()
            },
            "hot_bytes",
        ),
        (
            CacheConfig {
                admit_after: 0,
                ..Default::default()
            },
            "admit_after",
        ),
        (
            CacheConfig {
                cold_dir: Some("/tmp/x".into()),
                cold_bytes: 1,
                ..Default::default()
            },
            "cold_bytes",
        ),
    ] {
        let err = AttnCache::open(cfg, FP).expect_err(name).to_string();
        assert!(err.contains(name), "{err}");
    }
    let err = serde_json::from_str::<CacheConfig>(r#"{"hot_bytez": 5}"#)
        .expect_err("unknown field")
        .to_string();
    assert!(err.contains("hot_bytez"), "{err}");
}

fn with_feature(mut e: Entry, feature: &[f32]) -> Entry {
    e.feature = feature.into();
    e
}

#[test]
fn similar_inputs_of_the_same_length_hit_within_the_threshold_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig {
        cold_dir: Some(dir.path().to_path_buf()),
        similarity_threshold: Some(0.5),
        ..CacheConfig::default()
    };
    {
        let cache = AttnCache::open(cfg.clone(), FP).unwrap();
        cache.record(with_feature(
            entry(&[1, 2, 3, 4], 2, 2, 0.0),
            &[1.0, 0.0, 0.0],
        ));
        cache.record(with_feature(
            entry(&[9, 9, 9, 9, 9], 2, 2, 1.0),
            &[0.0, 1.0, 0.0],
        ));
        // near (distance 0.3) and same length: the neighbour's maps
        match cache.lookup(&[1, 2, 3, 7], Some(&[1.0, 0.3, 0.0])) {
            Lookup::Near {
                entry, distance, ..
            } => {
                assert_eq!(&*entry.tokens, &[1, 2, 3, 4]);
                assert!((distance - 0.3).abs() < 1e-4, "{distance}");
            }
            other => panic!("expected a near hit, got {other:?}"),
        }
        // too far (distance 1.0)
        assert!(matches!(
            cache.lookup(&[1, 2, 3, 8], Some(&[1.0, 1.0, 0.0])),
            Lookup::Miss { .. }
        ));
        // close, but another length
        assert!(matches!(
            cache.lookup(&[1, 2, 3], Some(&[1.0, 0.0, 0.0])),
            Lookup::Miss { .. }
        ));
        // without a threshold, exact matches only
        cache.set_similarity_threshold(None);
        assert!(matches!(
            cache.lookup(&[1, 2, 3, 7], Some(&[1.0, 0.3, 0.0])),
            Lookup::Miss { .. }
        ));
        let c = cache.counts();
        assert_eq!((c.hits, c.near_hits, c.indexed), (1, 1, 2));
    }
    // the index is rebuilt from the cold tier at start
    let cache = AttnCache::open(cfg, FP).unwrap();
    assert_eq!(cache.counts().indexed, 2);
    assert!(matches!(
        cache.lookup(&[5, 2, 3, 4], Some(&[0.9, 0.1, 0.0])),
        Lookup::Near { .. }
    ));
}

#[test]
fn hot_tier_stays_within_its_byte_budget_and_falls_back_to_cold() {
    let dir = tempfile::tempdir().unwrap();
    let one = entry(&[0; 32], 2, 2, 0.0).bytes() as u64;
    let cfg = StoreConfig {
        hot_bytes: 3 * one,
        ..config(Some(dir.path()))
    };
    let store = MapStore::open(cfg).unwrap();
    for i in 0..8u32 {
        store.insert(entry(&[i; 32], 2, 2, i as f32));
    }
    store.flush();
    let (entries, bytes) = store.hot_usage();
    assert!(
        entries <= 3 && bytes <= 3 * one,
        "hot tier over budget: {entries} entries, {bytes} bytes"
    );
    assert!(
        store
            .stats()
            .hot_evictions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 5
    );
    // every entry is still served, right, from one tier or the other
    for i in 0..8u32 {
        let e = store
            .get(&[i; 32])
            .expect("served from the cold tier after hot eviction");
        assert!(same_maps(&e, &entry(&[i; 32], 2, 2, i as f32)));
    }
}

#[test]
fn inputs_outside_the_token_range_are_never_cached() {
    let cfg = CacheConfig {
        min_tokens: 2,
        max_tokens: 4,
        ..CacheConfig::default()
    };
    let cache = AttnCache::open(cfg, FP).unwrap();
    assert!(matches!(
        cache.lookup(&[1], None),
        Lookup::Miss { record: false }
    ));
    assert!(matches!(
        cache.lookup(&[1, 2, 3, 4, 5], None),
        Lookup::Miss { record: false }
    ));
    assert!(matches!(
        cache.lookup(&[1, 2, 3, 4], None),
        Lookup::Miss { record: true }
    ));
    let err = AttnCache::open(
        CacheConfig {
            min_tokens: 5,
            max_tokens: 4,
            ..CacheConfig::default()
        },
        FP,
    )
    .expect_err("max below min")
    .to_string();
    assert!(err.contains("max_tokens"), "{err}");
}

#[test]
fn features_of_another_computation_are_never_compared() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CacheConfig {
        cold_dir: Some(dir.path().to_path_buf()),
        similarity_threshold: Some(0.5),
        ..CacheConfig::default()
    };
    let mut foreign = with_feature(entry(&[1, 2, 3, 4], 2, 2, 0.0), &[1.0, 0.0, 0.0]);
    foreign.feature_id = mean_pool_id() ^ 1;
    {
        let cache = AttnCache::open(cfg.clone(), FP).unwrap();
        cache.record(foreign);
        assert_eq!(cache.counts().indexed, 0, "not indexed when recorded");
    }
    // nor after a restart, but its exact tokens still hit
    let cache = AttnCache::open(cfg, FP).unwrap();
    assert_eq!(cache.counts().indexed, 0);
    assert!(matches!(
        cache.lookup(&[1, 2, 3, 7], Some(&[1.0, 0.0, 0.0])),
        Lookup::Miss { .. }
    ));
    assert!(matches!(
        cache.lookup(&[1, 2, 3, 4], Some(&[1.0, 0.0, 0.0])),
        Lookup::Hit(_)
    ));
}

#[test]
fn the_hot_tier_curve_follows_the_access_pattern() {
    let store = MapStore::open(config(None)).unwrap();
    // the store tells its observer of every insert and hit
    let sampler = Arc::new(SharedSampler::new(STORE_SAMPLED_KEYS));
    assert!(store.observe_accesses(sampler.clone()));
    assert!(
        !store.observe_accesses(Arc::new(SharedSampler::new(1))),
        "one observer per store"
    );
    let one = entry(&[0; 16], 2, 2, 0.0).bytes() as u64;
    assert_eq!(sampler.miss_ratios(&[one]), vec![0.0], "no re-access yet");
    // ten entries, then read in the same order twice: every re-access has 10 entries'
    // bytes (the others and itself) since its last use
    for i in 0..10u32 {
        store.insert(entry(&[i; 16], 2, 2, i as f32));
    }
    for _ in 0..2 {
        for i in 0..10u32 {
            assert!(store.get(&[i; 16]).is_some());
        }
    }
    let r = sampler.miss_ratios(&[5 * one, 9 * one, 11 * one, 100 * one]);
    assert_eq!(r, vec![1.0, 1.0, 0.0, 0.0], "{r:?}");
    // one entry read over and over needs only itself
    for _ in 0..40 {
        assert!(store.get(&[3; 16]).is_some());
    }
    let r = sampler.miss_ratios(&[2 * one]);
    assert!(r[0] < 0.5, "{r:?}");
}

/// Entries filed under the model's fingerprint of earlier builds (the old key scheme) are
/// misses for a cache opened under the stable one, and are left untouched (never treated as
/// corrupt or deleted).
#[test]
fn entries_of_the_old_key_scheme_are_misses_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    const STABLE: u64 = FP ^ 0xFFFF;
    let e = entry(&[11, 12, 13, 14], 2, 2, 0.25);
    {
        let old = MapStore::open(config(Some(dir.path()))).unwrap();
        old.insert(e.clone());
        old.flush();
    }
    assert_eq!(
        attncache_plugin::storage::disk_tier::entry_files(dir.path(), FP),
        1
    );
    let stable = MapStore::open(StoreConfig {
        fingerprint: STABLE,
        ..config(Some(dir.path()))
    })
    .unwrap();
    assert_eq!(stable.legacy_entries(FP), 1, "the disk tier counts them");
    assert_eq!(stable.legacy_entries(FP ^ 1), 0);
    drop(stable);
    let cache = AttnCache::open(
        CacheConfig {
            cold_dir: Some(dir.path().to_path_buf()),
            legacy_fingerprint: Some(FP),
            ..CacheConfig::default()
        },
        STABLE,
    )
    .unwrap();
    let counts = cache.counts();
    assert_eq!(counts.cold_entries, 0, "the old entry is not indexed");
    assert_eq!(counts.corrupt, 0, "nor counted as corrupt");
    drop(cache);
    assert_eq!(
        attncache_plugin::storage::disk_tier::entry_files(dir.path(), FP),
        1,
        "and it is still there"
    );
}
