//! Isolated partitions (`CacheConfig::scopes`) and injected disk faults: a partition never
//! hits or evicts another's entries; an unusable cold directory or failing writes leave a
//! working RAM cache, counted.

use attncache_plugin::storage::entry::{AttentionMaps, Entry, Payload};
use attncache_plugin::{AttnCache, CacheConfig, FeatureExtractor, FeatureKind, Lookup};
use candle_core::{DType, Device, Tensor};

const FP: u64 = 0xA77E_5CAC_4E00_0002;

/// An entry for `tokens`: `layers` layers of one uniform `[heads, L, L]` map each.
fn entry(tokens: &[u32], layers: usize, heads: usize) -> Entry {
    let l = tokens.len();
    let maps = (0..layers)
        .map(|_| {
            Tensor::full(1.0 / l as f32, (heads, l, l), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        })
        .collect();
    Entry {
        tokens: tokens.into(),
        feature: vec![0.5, 1.0].into(),
        feature_id: FeatureExtractor::load(&FeatureKind::default(), FP)
            .unwrap()
            .id(),
        payload: Payload::Maps(AttentionMaps {
            heads,
            layers: maps,
        }),
    }
}

fn scoped(names: &[&str], hot_bytes: u64, cold_dir: Option<&std::path::Path>) -> CacheConfig {
    CacheConfig {
        scopes: names.iter().map(|s| s.to_string()).collect(),
        hot_bytes,
        cold_dir: cold_dir.map(|d| d.to_path_buf()),
        cold_bytes: 64 << 20,
        enabled_by_default: true,
        ..CacheConfig::default()
    }
}

fn is_hit(found: &Lookup) -> bool {
    matches!(found, Lookup::Hit(_) | Lookup::Near { .. })
}

#[test]
fn a_partition_never_hits_another_partitions_entries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = AttnCache::open(scoped(&["a", "b"], 8 << 20, Some(dir.path())), FP).unwrap();
    let tokens = [5, 6, 7, 8];
    let (req_a, req_b, req_none) = (1, 2, 3);
    let _a = cache.ticket(req_a, None, Some(0)).unwrap();
    let _b = cache.ticket(req_b, None, Some(1)).unwrap();
    assert!(matches!(
        cache.lookup_for(req_a, &tokens, None),
        Lookup::Miss { record: true }
    ));
    cache.record_in(0, entry(&tokens, 2, 2));
    assert!(is_hit(&cache.lookup_for(req_a, &tokens, None)));
    // B looks up the same tokens: a miss it may record in its own partition
    assert!(matches!(
        cache.lookup_for(req_b, &tokens, None),
        Lookup::Miss { record: true }
    ));
    // a request without a partition does not use a partitioned cache at all
    assert!(!cache.enabled_for(req_none));
    assert!(matches!(
        cache.lookup_for(req_none, &tokens, None),
        Lookup::Miss { record: false }
    ));
    assert!(
        cache.ticket(req_none, None, Some(2)).is_err(),
        "no third scope"
    );
    // after a restart each partition finds its own files only
    cache.flush();
    drop((_a, _b));
    drop(cache);
    let cache = AttnCache::open(scoped(&["a", "b"], 8 << 20, Some(dir.path())), FP).unwrap();
    let _a = cache.ticket(req_a, None, Some(0)).unwrap();
    let _b = cache.ticket(req_b, None, Some(1)).unwrap();
    assert!(is_hit(&cache.lookup_for(req_a, &tokens, None)));
    assert!(!is_hit(&cache.lookup_for(req_b, &tokens, None)));
    assert!(dir.path().join("scope-a").is_dir() && dir.path().join("scope-b").is_dir());
    assert_eq!(cache.counts().cold_entries, 1);
}

#[test]
fn one_partition_filling_up_evicts_only_its_own_entries() {
    // 2 MiB split in two; each entry is 4 layers x 4 heads x 64 x 64 f16 = 128 KiB
    let cache = AttnCache::open(scoped(&["a", "b"], 2 << 20, None), FP).unwrap();
    let a_inputs: Vec<Vec<u32>> = (0..4).map(|i| vec![i; 64]).collect();
    for t in &a_inputs {
        cache.record_in(0, entry(t, 4, 4));
    }
    // B records 40 entries (5 MiB), far past its 1 MiB share
    for i in 0..40u32 {
        cache.record_in(1, entry(&[1000 + i; 64], 4, 4));
    }
    let _ticket = cache.ticket(1, None, Some(0)).unwrap();
    for t in &a_inputs {
        assert!(is_hit(&cache.lookup_for(1, t, None)), "A lost an entry");
    }
    let c = cache.counts();
    assert!(c.hot_evictions >= 30, "B evicted its own: {c:?}");
    assert!(c.hot_bytes <= 2 << 20, "{c:?}");
}

#[test]
fn scope_names_are_checked() {
    for bad in [vec!["A"], vec!["a/b"], vec![""], vec!["a", "a"]] {
        let err = AttnCache::open(scoped(&bad, 8 << 20, None), FP)
            .expect_err("bad scope")
            .to_string();
        assert!(err.contains("scopes"), "{err}");
    }
    let err = AttnCache::open(scoped(&["a", "b", "c"], 2 << 20, None), FP)
        .expect_err("less than 1 MiB each")
        .to_string();
    assert!(err.contains("hot_bytes"), "{err}");
}

#[test]
fn an_unusable_cold_directory_leaves_a_working_ram_cache() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"not a directory").unwrap();
    let cache = AttnCache::open(scoped(&[], 8 << 20, Some(&not_a_dir)), FP).unwrap();
    assert_eq!(cache.counts().cold_unavailable, 1);
    let tokens = [1, 2, 3];
    cache.record(entry(&tokens, 2, 2));
    cache.flush();
    assert!(is_hit(&cache.lookup(&tokens, None)));
    let c = cache.counts();
    assert_eq!((c.hot_entries, c.cold_entries), (1, 0), "{c:?}");
    assert_eq!(c.cold_write_failures, 0, "no disk writes were attempted");
}

#[test]
fn failing_cold_writes_are_counted_and_the_entry_stays_in_ram() {
    let dir = tempfile::tempdir().unwrap();
    let cache = AttnCache::open(scoped(&[], 8 << 20, Some(dir.path())), FP).unwrap();
    // every entry of 3 tokens goes to <dir>/<fingerprint>/00003/: make that a file, so
    // writes fail the way they do on a full disk (even for root, unlike permissions)
    let model_dir = dir.path().join(format!("{FP:016x}"));
    std::fs::write(model_dir.join("00003"), b"in the way").unwrap();
    for i in 0..3 {
        cache.record(entry(&[i, 2, 3], 2, 2));
    }
    cache.flush();
    let c = cache.counts();
    assert_eq!((c.cold_write_failures, c.cold_entries), (3, 0), "{c:?}");
    for i in 0..3 {
        assert!(is_hit(&cache.lookup(&[i, 2, 3], None)));
    }
    // other lengths still reach the disk
    cache.record(entry(&[1, 2, 3, 4], 2, 2));
    cache.flush();
    assert_eq!(cache.counts().cold_entries, 1);
}

/// Maps whose every value encodes `salt`, so a served entry can be told from another.
fn salted(tokens: &[u32], salt: f32) -> Entry {
    let mut e = entry(tokens, 4, 4);
    let l = tokens.len();
    let layers = (0..4)
        .map(|_| {
            Tensor::full(salt, (4, l, l), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
        })
        .collect();
    e.payload = Payload::Maps(AttentionMaps { heads: 4, layers });
    e
}

fn salt_of(e: &Entry) -> f32 {
    e.map_layers()[3]
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0]
}

#[test]
fn a_shrink_keeps_the_most_recently_used_entries() {
    // 128 KiB entries, 4 MiB budget, RAM only
    let cache = AttnCache::open(scoped(&[], 4 << 20, None), FP).unwrap();
    let inputs: Vec<Vec<u32>> = (0..24).map(|i| vec![i; 64]).collect();
    for (i, t) in inputs.iter().enumerate() {
        cache.record(salted(t, i as f32));
    }
    // use the first 6 again, so recency differs from insertion order
    for t in &inputs[..6] {
        assert!(is_hit(&cache.lookup(t, None)));
    }
    let held = match cache.lookup(&inputs[20], None) {
        Lookup::Hit(e) => e,
        other => panic!("{other:?}"),
    };
    // 1 MiB holds 7 entries (plus bookkeeping): input 20 (used last) and inputs 0..6
    cache.set_hot_bytes(1 << 20);
    for t in inputs[..6].iter().chain([&inputs[20]]) {
        assert!(is_hit(&cache.lookup(t, None)), "a recent entry was dropped");
    }
    assert!(!is_hit(&cache.lookup(&inputs[12], None)));
    // an entry in use before the shrink is still whole and right
    assert_eq!(salt_of(&held), 20.0);
    assert!(cache.counts().hot_bytes <= 1 << 20);
}

#[test]
fn lookups_during_resizes_always_get_the_right_maps() {
    let dir = tempfile::tempdir().unwrap();
    let cache =
        std::sync::Arc::new(AttnCache::open(scoped(&[], 8 << 20, Some(dir.path())), FP).unwrap());
    let inputs: Vec<Vec<u32>> = (0..40).map(|i| vec![i + 1; 64]).collect();
    for (i, t) in inputs.iter().enumerate() {
        cache.record(salted(t, i as f32));
        cache.flush(); // a writer that falls behind skips cold copies: this test needs them all
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let lookups = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (cache, inputs, stop) = (cache.clone(), inputs.clone(), stop.clone());
            let lookups = lookups.clone();
            std::thread::spawn(move || {
                let mut served = 0;
                let mut i = r;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let k = i % inputs.len();
                    match cache.lookup(&inputs[k], None) {
                        Lookup::Hit(e) => {
                            assert_eq!(&*e.tokens, &inputs[k][..]);
                            assert_eq!(salt_of(&e), k as f32, "wrong maps served");
                            served += 1;
                            lookups.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        other => panic!("entry {k} lost (it is on disk): {other:?}"),
                    }
                    i += 7;
                }
                served
            })
        })
        .collect();
    for round in 0..60u64 {
        // every resize lands between lookups, also on a loaded machine where the readers
        // are slow to be scheduled (waits at most 1 s per round)
        let before = lookups.load(std::sync::atomic::Ordering::Relaxed);
        cache.set_hot_bytes(if round % 2 == 0 { 1 << 20 } else { 8 << 20 });
        let waited = std::time::Instant::now();
        while lookups.load(std::sync::atomic::Ordering::Relaxed) == before
            && waited.elapsed() < std::time::Duration::from_secs(1)
        {
            std::thread::yield_now();
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served: usize = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(served > 0);
}

#[test]
fn a_ticket_owns_its_requests_flag_scope_and_decision() {
    use attncache_plugin::Outcome;
    let cache = AttnCache::open(scoped(&["a", "b"], 8 << 20, None), FP).unwrap();
    let tokens = [5, 6, 7, 8];
    // scopes configured: a request is in none until its ticket names one
    assert!(!cache.enabled_for(1));
    {
        let ticket = cache.ticket(1, Some(true), Some(1)).unwrap();
        assert!(cache.enabled_for(1));
        assert_eq!(cache.scope_of(1), Some(1));
        assert!(ticket.take_decision().is_none(), "no lookup yet");
        cache.lookup_for(1, &tokens, None);
        let d = ticket.take_decision().expect("the lookup's decision");
        assert_eq!((d.outcome, d.tokens), (Outcome::Miss, 4));
        assert!(ticket.take_decision().is_none(), "taken once");
        // flag off on another request: the default (on) does not apply to it
        let off = cache.ticket(2, Some(false), Some(0)).unwrap();
        assert!(!cache.enabled_for(2));
        drop(off);
    }
    // dropped: the request is forgotten
    assert!(!cache.enabled_for(1));
    assert_eq!(cache.scope_of(1), None);
    // an earlier ticket's drop leaves a later ticket for the same id alone
    let first = cache.ticket(3, Some(true), Some(0)).unwrap();
    let second = cache.ticket(3, Some(true), Some(1)).unwrap();
    drop(first);
    assert_eq!(cache.scope_of(3), Some(1));
    drop(second);
    assert_eq!(cache.scope_of(3), None);
}
