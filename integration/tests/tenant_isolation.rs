//! `--cache-scope per-key` against a real server: tenant B's cache outcomes are the same
//! whether or not tenant A sent the same inputs first, while with `global` B's first
//! requests already hit A's entries (the side channel per-key closes).

use crate::common;

use common::{Server, TinyModel, REVIEWS};
use serde_json::{json, Value};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// The cache outcome of every input of one `/v1/embeddings` request sent with `key`.
fn outcomes(server: &Server, key: &str, texts: &[&str]) -> Vec<String> {
    let resp = client()
        .post(format!("{}/v1/embeddings", server.base))
        .header("Authorization", format!("Bearer {key}"))
        .json(&json!({"model": "default", "input": texts}))
        .send()
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().expect("json");
    body["attn_cache"]["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|i| i["outcome"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Starts a server with keys `ka` and `kb`; when `a_first`, A sends the reviews twice;
/// then B sends them twice. Returns (A's second pass, B's two passes).
fn scenario(
    model: &TinyModel,
    scope: &str,
    repeat_mib: &str,
    a_first: bool,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        model,
        &[
            "--api-key",
            "ka,kb",
            "--cache-scope",
            scope,
            "--attn-cache",
            "on",
            "--repeat-mib",
            repeat_mib,
            "--cache-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    let mut a_second = Vec::new();
    if a_first {
        outcomes(&server, "ka", &REVIEWS);
        a_second = outcomes(&server, "ka", &REVIEWS);
    }
    let b_first = outcomes(&server, "kb", &REVIEWS);
    let b_second = outcomes(&server, "kb", &REVIEWS);
    if scope == "per-key" {
        // one directory per key, named by a hash that does not show the key
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names
            .iter()
            .all(|n| n.starts_with("scope-") && !n.contains("ka") && !n.contains("kb")));
    }
    (a_second, b_first, b_second)
}

fn all(v: &[String], outcome: &str) -> bool {
    v.len() == REVIEWS.len() && v.iter().all(|o| o == outcome)
}

#[test]
fn per_key_scope_hides_one_tenants_inputs_from_another() {
    let model = TinyModel::new("tenants");
    let (_, alone_1, alone_2) = scenario(&model, "per-key", "0", false);
    let (a_2, after_a_1, after_a_2) = scenario(&model, "per-key", "0", true);
    assert!(all(&a_2, "hit"), "A's entries were stored: {a_2:?}");
    assert!(
        all(&alone_1, "miss") && all(&alone_2, "hit"),
        "{alone_1:?} {alone_2:?}"
    );
    assert_eq!(
        (&alone_1, &alone_2),
        (&after_a_1, &after_a_2),
        "B's outcomes must not depend on A"
    );
    // the exact-repeat memo is partitioned too
    let (a_2, memo_1, memo_2) = scenario(&model, "per-key", "64", true);
    assert!(all(&a_2, "exact_repeat"), "{a_2:?}");
    assert!(
        all(&memo_1, "miss") && all(&memo_2, "exact_repeat"),
        "{memo_1:?} {memo_2:?}"
    );
    // the contrast: one global cache lets B see that A sent these inputs
    let (_, global_1, _) = scenario(&model, "global", "0", true);
    assert!(all(&global_1, "hit"), "{global_1:?}");
}

#[test]
fn per_key_scope_without_keys_is_refused_at_start() {
    let model = TinyModel::new("tenants-nokey");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attncache-server"))
        .arg("--model")
        .arg(model.path())
        .args(["--port", "0", "--cache-scope", "per-key"])
        .env_remove("ATTNCACHE_API_KEY")
        .output()
        .expect("run attncache-server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cache-scope per-key needs"), "{stderr}");
}
