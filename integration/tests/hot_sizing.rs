//! `--hot-sizing auto` against a real server: tier costs are measured at start-up and
//! exported, decisions are taken on schedule, and once the sampled reuse distances show
//! the workload fits in far less RAM, the hot tier shrinks within the target loss.

use crate::common;

use common::{metric, Server, TinyModel};
use serde_json::json;

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// The kind's sample of `attncache_tier_cost_seconds`.
fn cost(text: &str, kind: &str) -> f64 {
    let prefix = format!("attncache_tier_cost_seconds{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cost for {kind}"))
}

/// Waits (up to 10 s) until `attncache_hot_tier_decisions_total` exceeds `after`.
fn next_decision(server: &Server, after: f64) -> String {
    for _ in 0..100 {
        let m = server.metrics();
        if metric(&m, "attncache_hot_tier_decisions_total") > after {
            return m;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("no sizing decision within 10 s");
}

#[test]
fn the_hot_tier_shrinks_to_what_the_workload_needs() {
    let model = TinyModel::new("hot-sizing");
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        &model,
        &[
            "--attn-cache",
            "on",
            "--repeat-mib",
            "0",
            "--hot-mib",
            "64",
            "--hot-resize-secs",
            "1",
            "--cache-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    let m = next_decision(&server, 0.0);
    let (hot, cold, miss) = (cost(&m, "hot_hit"), cost(&m, "cold_hit"), cost(&m, "miss"));
    // cold vs hot is not compared: the difference is within timing noise under parallel tests
    assert!(hot > 0.0 && cold > 0.0 && miss > 0.0, "{hot} {cold} {miss}");
    assert!(
        dir.path().join("tier-costs.json").is_file(),
        "costs are cached"
    );
    // too few accesses yet: the full budget stays
    assert_eq!(
        metric(&m, "attncache_hot_tier_budget_bytes"),
        (64u64 << 20) as f64
    );
    // 40 distinct inputs, each sent 8 times: a few hundred KiB of maps, reused at short distance
    let texts: Vec<String> = (0..40)
        .map(|i| format!("review number {i} says the room was clean and quiet"))
        .collect();
    for _ in 0..8 {
        let resp = client()
            .post(format!("{}/v1/embeddings", server.base))
            .json(&json!({"model": "default", "input": texts}))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    let before = metric(&server.metrics(), "attncache_hot_tier_decisions_total");
    let m = next_decision(&server, before);
    let budget = metric(&m, "attncache_hot_tier_budget_bytes");
    assert!(budget <= (4u64 << 20) as f64, "budget {budget}");
    let slowdown = metric(&m, "attncache_hot_tier_predicted_slowdown");
    assert!((0.0..=0.05).contains(&slowdown), "{slowdown}");
    // every input still hits after the shrink
    let body: serde_json::Value = client()
        .post(format!("{}/v1/embeddings", server.base))
        .json(&json!({"model": "default", "input": texts}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let inputs = body["attn_cache"]["inputs"].as_array().unwrap();
    assert!(inputs.iter().all(|i| i["outcome"] == "hit"), "{inputs:?}");
}

#[test]
fn a_fixed_hot_tier_is_never_resized() {
    let model = TinyModel::new("hot-fixed");
    let server = Server::start(
        &model,
        &[
            "--hot-sizing",
            "fixed",
            "--hot-mib",
            "64",
            "--hot-resize-secs",
            "1",
        ],
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_hot_tier_decisions_total"), 0.0);
    assert_eq!(
        metric(&m, "attncache_hot_tier_budget_bytes"),
        (64u64 << 20) as f64
    );
    assert!(!m.contains("attncache_tier_cost_seconds"));
}

#[test]
fn tier_costs_measured_by_the_tool_are_what_the_server_uses() {
    let model = TinyModel::new("tier-costs");
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attncache"))
        .arg("tier-costs")
        .arg("--model")
        .arg(model.path())
        .arg("--cache-dir")
        .arg(dir.path())
        // the server measures again unless a measurement has at least its 7 repetitions
        .args(["--tokens", "16,32", "--reps", "7"])
        .output()
        .expect("run attncache tier-costs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("hot hit µs") && stdout.contains("written:"),
        "{stdout}"
    );
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("tier-costs.json")).unwrap())
            .unwrap();
    let measured = file.as_array().unwrap();
    assert_eq!(measured.len(), 2);
    let at_32 = measured
        .iter()
        .find(|m| m["shape"]["tokens"] == 32)
        .expect("the 32-token measurement");
    // a server whose entries are at most 32 tokens sizes with that measurement, unmeasured
    let server = Server::start(
        &model,
        &[
            "--cache-dir",
            dir.path().to_str().unwrap(),
            "--cache-max-tokens",
            "32",
        ],
    );
    let m = server.metrics();
    let miss = at_32["miss_ns"].as_f64().unwrap() / 1e9;
    assert!(
        (cost(&m, "miss") - miss).abs() <= 1e-9 * miss.max(1e-9) + 1e-15,
        "{m}"
    );
}
