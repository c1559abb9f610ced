//! The learned projector: pooling, the map distance it learns, training on pairs with a known
//! answer, saving and loading, and refusing a projector of another model.

use attncache_plugin::lookup::projector::{
    self, map_distance, segment_pool, spearman, Pairs, TrainOptions,
};
use attncache_plugin::storage::entry::{AttentionMaps, Entry, Payload};
use attncache_plugin::{AttnCache, CacheConfig, FeatureExtractor, FeatureKind};
use candle_core::{DType, Device, Tensor};

const FP: u64 = 0x1234_5678_9abc_def0;

#[test]
fn segments_average_their_tokens() {
    // one row, 4 tokens, hidden 2: tokens (0,1) (2,3) (4,5) (6,7)
    let xs = Tensor::arange(0f32, 8.0, &Device::Cpu)
        .unwrap()
        .reshape((1, 4, 2))
        .unwrap();
    let two = segment_pool(&xs, 2).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(two, vec![vec![1.0, 2.0, 5.0, 6.0]]);
    // fewer tokens than segments: each segment takes the token it starts at
    let one = Tensor::new(&[[[3f32, 4.0]]], &Device::Cpu).unwrap();
    let eight = segment_pool(&one, 8).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(eight[0], [3.0, 4.0].repeat(8));
}

fn one_layer_entry(rows: Vec<Vec<f32>>) -> Entry {
    let l = rows.len();
    let t = Tensor::new(rows, &Device::Cpu)
        .unwrap()
        .reshape((1, l, l))
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    Entry {
        tokens: (0..l as u32).collect(),
        feature: Vec::new().into(),
        feature_id: 0,
        payload: Payload::Maps(AttentionMaps {
            heads: 1,
            layers: vec![t.clone(), t],
        }),
    }
}

#[test]
fn map_distance_is_mean_total_variation() {
    let a = one_layer_entry(vec![vec![1.0, 0.0], vec![0.5, 0.5]]);
    let b = one_layer_entry(vec![vec![0.0, 1.0], vec![0.5, 0.5]]);
    assert_eq!(map_distance(&a, &a).unwrap(), 0.0);
    // row 0 disjoint (1), row 1 identical (0): mean 0.5
    assert!((map_distance(&a, &b).unwrap() - 0.5).abs() < 1e-6);
}

#[test]
fn spearman_ranks() {
    let x = [1.0, 2.0, 3.0, 4.0];
    assert!((spearman(&x, &[10.0, 20.0, 30.0, 40.0]) - 1.0).abs() < 1e-12);
    assert!((spearman(&x, &[4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    assert!(spearman(&x[..1], &[1.0]).is_nan());
}

/// Descriptors whose "map distance" is the distance along 2 of 32 dimensions: the projector
/// must learn to ignore the other 30.
fn synthetic(n: usize, seed: u64) -> (Tensor, Vec<[f32; 2]>) {
    let mut s = seed;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let mut data = Vec::new();
    let mut key = Vec::new();
    for _ in 0..n {
        let row: Vec<f32> = (0..32).map(|_| next()).collect();
        key.push([row[3] * 0.2, row[17] * 0.2]);
        data.extend(row);
    }
    (Tensor::from_vec(data, (n, 32), &Device::Cpu).unwrap(), key)
}

fn pairs_of(key: &[[f32; 2]], range: std::ops::Range<usize>) -> Pairs {
    let mut p = Pairs::default();
    for i in range.clone() {
        for j in (i + 1..range.end).take(12) {
            let d = ((key[i][0] - key[j][0]).powi(2) + (key[i][1] - key[j][1]).powi(2)).sqrt();
            p.push(i, j, d);
        }
    }
    p
}

#[test]
fn training_learns_which_dimensions_predict_the_distance_and_round_trips() {
    let (desc, key) = synthetic(800, 3);
    let train = pairs_of(&key, 0..600);
    let held = pairs_of(&key, 600..800);
    let opts = TrainOptions {
        width: 32,
        out_dim: 8,
        epochs: 20,
        batch: 64,
        lr: 3e-3,
        seed: 1,
    };
    let mut epochs = 0;
    let (p, loss) = projector::train(&desc, &train, 4, FP, opts, &mut |e, _| epochs = e).unwrap();
    assert_eq!(epochs, 20);
    assert!(loss.is_finite());
    let truth: Vec<f64> = held.target.iter().map(|&t| t as f64).collect();
    let predicted: Vec<f64> = p
        .predict(&desc, &held)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    // raw descriptor distance: dominated by the 30 irrelevant dimensions
    let raw: Vec<f64> = held
        .a
        .iter()
        .zip(&held.b)
        .map(|(&a, &b)| {
            let (x, y) = (desc.get(a as usize).unwrap(), desc.get(b as usize).unwrap());
            f64::from(
                (x - y)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
            )
            .sqrt()
        })
        .collect();
    let (rho, rho_raw) = (spearman(&predicted, &truth), spearman(&raw, &truth));
    eprintln!("held-out rank correlation {rho} (raw {rho_raw})");
    assert!(
        rho > 0.8 && rho > rho_raw + 0.3,
        "held-out rank correlation {rho} (raw {rho_raw})"
    );

    // save, load: same features; the id names the weights
    let dir = tempfile::tempdir().unwrap();
    p.save(dir.path()).unwrap();
    let loaded = projector::Projector::load(dir.path(), FP).unwrap();
    let before = p.project(&desc).unwrap().to_vec2::<f32>().unwrap();
    let after = loaded.project(&desc).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(before, after);
    let other_seed = TrainOptions {
        seed: 2,
        epochs: 1,
        ..opts
    };
    let (q, _) = projector::train(&desc, &train, 4, FP, other_seed, &mut |_, _| {}).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    q.save(dir2.path()).unwrap();
    let q = projector::Projector::load(dir2.path(), FP).unwrap();
    assert_ne!(q.id(), loaded.id());

    // a projector of another model is refused, with the reason
    let err = projector::Projector::load(dir.path(), FP ^ 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("trained for model"), "{err}");
    // … unless it is stamped with this model's fingerprint of earlier builds
    let mut legacy = projector::Projector::load_accepting(dir.path(), FP ^ 1, Some(FP)).unwrap();
    assert_eq!(legacy.id(), loaded.id());
    // re-stamped and saved, it loads as the stable model's, with the same weights
    let restamped = tempfile::tempdir().unwrap();
    legacy.save(restamped.path()).unwrap();
    legacy.set_fingerprint(FP ^ 1);
    legacy.save_config(restamped.path()).unwrap();
    let stable = projector::Projector::load(restamped.path(), FP ^ 1).unwrap();
    assert_eq!(stable.id(), loaded.id());
    assert!(projector::Projector::load_accepting(dir.path(), FP ^ 1, Some(FP ^ 2)).is_err());
    // a damaged weights file is refused
    std::fs::write(dir2.path().join(projector::WEIGHTS_FILE), b"junk").unwrap();
    assert!(projector::Projector::load(dir2.path(), FP).is_err());
}

#[test]
fn the_cache_takes_the_projectors_calibrated_threshold() {
    let (desc, key) = synthetic(40, 5);
    let opts = TrainOptions {
        width: 8,
        out_dim: 4,
        epochs: 1,
        ..TrainOptions::default()
    };
    let (mut p, _) =
        projector::train(&desc, &pairs_of(&key, 0..40), 4, FP, opts, &mut |_, _| {}).unwrap();
    let dir = tempfile::tempdir().unwrap();
    p.save(dir.path()).unwrap();
    let cfg = CacheConfig {
        features: FeatureKind::Projector(dir.path().to_path_buf()),
        ..CacheConfig::default()
    };
    // not calibrated: exact matches only
    assert_eq!(
        AttnCache::open(cfg.clone(), FP)
            .unwrap()
            .similarity_threshold(),
        None
    );
    p.set_calibrated_threshold(Some(0.25));
    p.save_config(dir.path()).unwrap();
    let cache = AttnCache::open(cfg.clone(), FP).unwrap();
    assert_eq!(cache.similarity_threshold(), Some(0.25));
    let id = FeatureExtractor::load(&cfg.features, FP).unwrap().id();
    assert_eq!(
        cache.features().id(),
        id,
        "the threshold does not change the id"
    );
    // an explicit threshold wins
    let explicit = CacheConfig {
        similarity_threshold: Some(0.1),
        ..cfg.clone()
    };
    assert_eq!(
        AttnCache::open(explicit, FP)
            .unwrap()
            .similarity_threshold(),
        Some(0.1)
    );
    // another model: the cache refuses to open, naming the projector
    let err = AttnCache::open(cfg, FP ^ 1).unwrap_err().to_string();
    assert!(err.contains("projector"), "{err}");
}
