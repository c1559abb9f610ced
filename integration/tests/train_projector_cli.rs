//! `attncache train-projector` end to end on the tiny model: it records maps, trains, writes a
//! loadable projector tied to the model, is deterministic for a seed, and `attncache
//! calibrate --projector --save-threshold` records the threshold the server then uses.

use crate::common;

use std::path::Path;
use std::process::Command;

use attncache_plugin::lookup::projector::{Projector, CONFIG_FILE};
use attncache_plugin::{AttnCache, CacheConfig, FeatureKind};
use common::{TinyModel, REVIEWS as TEXTS};

fn attncache(args: &[&std::ffi::OsStr]) -> String {
    let run = Command::new(env!("CARGO_BIN_EXE_attncache"))
        .args(args)
        .output()
        .expect("run attncache");
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

fn train(model: &Path, data: &Path, out: &Path) -> String {
    attncache(&[
        "train-projector".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--variants".as_ref(),
        "3".as_ref(),
        "--epochs".as_ref(),
        "5".as_ref(),
        "--width".as_ref(),
        "16".as_ref(),
        "--out-dim".as_ref(),
        "8".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ])
}

#[test]
fn train_projector_then_calibrate_it() {
    let model = TinyModel::new("train-projector");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("texts.json");
    std::fs::write(&data, serde_json::to_string(&TEXTS).unwrap()).unwrap();
    let out = dir.path().join("projector");
    let stdout = train(model.path(), &data, &out);
    assert!(stdout.contains("Spearman"), "{stdout}");

    let fingerprint = attncache_server::model_dir::ModelDir::inspect(model.path())
        .unwrap()
        .fingerprint()
        .unwrap();
    let p = Projector::load(&out, fingerprint).expect("a projector for this model");
    let report = p.config().training.clone().expect("training report");
    // 8 texts and 3 variants each; a variant that repeats an input is stored once
    assert!((24..=32).contains(&report.inputs), "{report:?}");
    assert!(report.train_pairs > 0 && report.final_loss.is_finite());
    assert_eq!((p.config().width, p.config().out_dim), (16, 8));

    // same data, same seed: the same weights (recorded maps are re-used from the work dir)
    let again = dir.path().join("again");
    train(model.path(), &data, &again);
    let q = Projector::load(&again, fingerprint).unwrap();
    assert_eq!(p.id(), q.id(), "training is deterministic for a seed");

    // calibrate the projector's features and record the threshold
    let cal = dir.path().join("cal.json");
    attncache(&[
        "calibrate".as_ref(),
        "--model".as_ref(),
        model.path().as_os_str(),
        "--data".as_ref(),
        data.as_os_str(),
        "--variants".as_ref(),
        "--target".as_ref(),
        "0.9".as_ref(),
        "--floor".as_ref(),
        "0.0".as_ref(),
        "--projector".as_ref(),
        out.as_os_str(),
        "--save-threshold".as_ref(),
        "--out".as_ref(),
        cal.as_os_str(),
    ]);
    let cal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    assert!(
        cal["features"].as_str().unwrap().starts_with("projector"),
        "{cal}"
    );
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(saved["calibrated_threshold"], cal["threshold"]);
    let cache = AttnCache::open(
        CacheConfig {
            features: FeatureKind::Projector(out.clone()),
            ..CacheConfig::default()
        },
        fingerprint,
    )
    .unwrap();
    assert_eq!(
        cache.similarity_threshold(),
        cal["threshold"].as_f64().map(|t| t as f32)
    );
    assert_eq!(
        cache.features().id(),
        p.id(),
        "calibration keeps the weights"
    );
}
