//! Injected cold-tier faults against a real server: a cache directory that cannot be
//! opened, and a disk that refuses every write (a file-size quota of 1 KiB). Each is
//! detected, counted in `/metrics`, and every request is still answered correctly.

use crate::common;

use common::{embeddings_of, max_abs_diff, metric, Server, TinyModel, REVIEWS};
use serde_json::{json, Value};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

/// Embeddings and cache outcomes of `REVIEWS` with the cache `flag`.
fn embed(server: &Server, flag: &str) -> (Vec<Vec<f32>>, Vec<String>) {
    let body: Value = client()
        .post(format!("{}/v1/embeddings", server.base))
        .header("X-Attn-Cache", flag)
        .json(&json!({"model": "default", "input": REVIEWS}))
        .send()
        .expect("request")
        .error_for_status()
        .expect("200")
        .json()
        .expect("json");
    let outcomes = body["attn_cache"]["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|i| i["outcome"].as_str().unwrap_or_default().to_string())
        .collect();
    (embeddings_of(&body), outcomes)
}

/// Flag off, then flag on twice: the second pass must hit, and every answer must match the
/// flag-off one.
fn answers_correctly_with_hits(server: &Server) {
    let (exact, _) = embed(server, "off");
    let (first, first_outcomes) = embed(server, "on");
    let (second, second_outcomes) = embed(server, "on");
    assert!(
        first_outcomes.iter().all(|o| o == "miss"),
        "{first_outcomes:?}"
    );
    assert!(
        second_outcomes.iter().all(|o| o == "hit"),
        "{second_outcomes:?}"
    );
    assert!(max_abs_diff(&exact, &first) < 1e-5);
    assert!(
        max_abs_diff(&exact, &second) <= 1e-4,
        "{}",
        max_abs_diff(&exact, &second)
    );
}

#[test]
fn a_cache_dir_that_cannot_be_opened_leaves_a_ram_cache() {
    let model = TinyModel::new("fault-dir");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let server = Server::start(
        &model,
        &["--repeat-mib", "0", "--cache-dir", file.to_str().unwrap()],
    );
    answers_correctly_with_hits(&server);
    let m = server.metrics();
    assert_eq!(metric(&m, "attncache_cold_tier_unavailable"), 1.0);
    assert_eq!(metric(&m, "attncache_cold_entries"), 0.0);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"x",
        "the file was left alone"
    );
}

#[test]
fn a_disk_that_refuses_writes_is_counted_and_requests_still_succeed() {
    let model = TinyModel::new("fault-quota");
    let dir = tempfile::tempdir().unwrap();
    // a 1 KiB file-size limit (every entry is larger), with SIGXFSZ ignored so that writes
    // fail with EFBIG like a full disk or a quota, instead of killing the process
    let mut command = std::process::Command::new("bash");
    command
        .args(["-c", "trap '' XFSZ; ulimit -f 1; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_attncache-server"))
        .args(Server::args(
            &model,
            &[
                "--repeat-mib",
                "0",
                "--hot-sizing",
                "fixed",
                "--cache-dir",
                dir.path().to_str().unwrap(),
            ],
        ));
    let server = Server::start_command(command);
    answers_correctly_with_hits(&server);
    // writes happen on a background thread: give it a moment to fail
    let mut m = server.metrics();
    for _ in 0..50 {
        if metric(&m, "attncache_cold_write_failures_total") >= REVIEWS.len() as f64 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        m = server.metrics();
    }
    let failures = metric(&m, "attncache_cold_write_failures_total");
    assert_eq!(failures, REVIEWS.len() as f64, "one failed write per entry");
    assert_eq!(metric(&m, "attncache_cold_entries"), 0.0);
    assert_eq!(metric(&m, "attncache_cold_tier_unavailable"), 0.0);
    // no partial file was left behind
    let leftovers: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().map_while(Result::ok) {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
