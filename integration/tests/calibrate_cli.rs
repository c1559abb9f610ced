//! `attncache calibrate` end to end on the tiny model: it measures held-out points, writes
//! the JSON and the SVG plot, and its threshold keeps the target on its own points.

use crate::common;

use std::process::Command;

use common::TinyModel;

#[test]
fn calibrate_writes_a_threshold_its_points_support() {
    let model = TinyModel::new("calibrate");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("texts.json");
    let texts: Vec<String> = common::REVIEWS.iter().map(|s| s.to_string()).collect();
    std::fs::write(&data, serde_json::to_string(&texts).unwrap()).unwrap();
    let out = dir.path().join("cal.json");
    let run = Command::new(env!("CARGO_BIN_EXE_attncache"))
        .arg("calibrate")
        .arg("--model")
        .arg(model.path())
        .arg("--data")
        .arg(&data)
        .arg("--variants")
        .args(["--target", "0.9", "--floor", "0.0"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run attncache calibrate");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("held-out inputs: 8"), "{stdout}");
    let cal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let points = cal["points"].as_array().unwrap();
    assert!(
        !points.is_empty(),
        "one-word variants of 9-word texts must find same-length neighbours"
    );
    for p in points {
        let c = p["cosine"].as_f64().unwrap();
        assert!(c.is_finite() && c <= 1.0 + 1e-6, "{p}");
    }
    if let Some(t) = cal["threshold"].as_f64() {
        let hits: Vec<f64> = points
            .iter()
            .filter(|p| p["distance"].as_f64().unwrap() <= t)
            .map(|p| p["cosine"].as_f64().unwrap())
            .collect();
        let mean = hits.iter().sum::<f64>() / hits.len() as f64;
        assert!(mean >= 0.9, "threshold {t} gives mean cosine {mean}");
    }
    let svg = std::fs::read_to_string(out.with_extension("svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("circle"),
        "plot missing points"
    );
}
