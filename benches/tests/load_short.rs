//! The short version of `make soak`: `attncache-load` with 16 clients for 10 seconds against
//! the real server binary and the tiny model. The tool exits non-zero on any failed request,
//! any flag-off answer that differs from the exact one, or a peak RSS over its bound.

use std::process::Command;

#[test]
fn sixteen_clients_for_ten_seconds_without_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_attncache-load"))
        .args(["--clients", "16", "--duration-s", "10", "--inputs", "60"])
        // no exact-repeat memo: repeats reach the map cache, so records and hits race
        .args(["--repeat-mib", "0"])
        .output()
        .expect("run attncache-load");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "attncache-load failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("JSON report");
    assert_eq!(report["errors"], 0);
    assert!(report["ok"].as_u64().unwrap() > 50, "{report}");
    assert!(report["flag_off_checked"].as_u64().unwrap() > 0, "{report}");
    assert!(report["cache_hits"].as_f64().unwrap() > 0.0, "{report}");
}
