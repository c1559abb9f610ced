//! Crash safety of the cold tier: `attncache-server` is killed with SIGKILL while clients
//! make it record entries (background writes in flight), then restarted on the same
//! directory, round after round. Every restart must find no corrupt entry and an index that
//! matches the files on disk, and every hit served must equal the exact embedding of that
//! input (within f16 rounding): a torn or foreign file is never served.
//!
//! Rounds: `ATTNCACHE_CRASH_ROUNDS` (default 10; `make crash` runs 100).

use crate::common;

use std::path::Path;
use std::time::Duration;

use attncache_server::tiny_model::WORDS;
use common::{metric, Server, TinyModel};
use serde_json::{json, Value};

/// The `i`-th input: 100 to 240 words, so entries are large enough for writes to take a while.
fn input(i: usize) -> String {
    let len = 100 + (i * 53) % 141;
    (0..len)
        .map(|j| WORDS[(i * 11 + j * (1 + i % 7)) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// Files under `dir` (recursively) whose name `matches`.
fn count_files(dir: &Path, matches: &dyn Fn(&str) -> bool) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += count_files(&p, matches);
        } else if p.file_name().is_some_and(|f| matches(&f.to_string_lossy())) {
            n += 1;
        }
    }
    n
}

/// Cache entries on disk.
fn entry_files(dir: &Path) -> usize {
    count_files(dir, &|name| name.ends_with(".attn"))
}

/// Temp files of interrupted writes (removed when the store opens).
fn temp_files(dir: &Path) -> usize {
    count_files(dir, &|name| name.starts_with(".tmp-"))
}

/// After a restart: no corrupt entry was found, and the cold index matches the files.
async fn check_store(client: &reqwest::Client, base: &str, dir: &Path, when: &str) {
    let m = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        metric(&m, "attncache_corrupt_entries_total"),
        0.0,
        "{when}: a corrupt entry was found after a SIGKILL"
    );
    assert_eq!(
        metric(&m, "attncache_cold_entries") as usize,
        entry_files(dir),
        "{when}: the index does not match the files"
    );
}

async fn embed(client: &reqwest::Client, base: &str, text: &str, flag: bool) -> Option<Value> {
    let body = json!({"model": "default", "input": text, "attn_cache": flag});
    let resp = client
        .post(format!("{base}/v1/embeddings"))
        .json(&body)
        .send()
        .await
        .ok()?;
    assert_eq!(resp.status(), 200, "a request failed");
    resp.json().await.ok()
}

fn embedding(v: &Value) -> Vec<f32> {
    serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_cache_writes_never_leaves_a_corrupt_or_wrong_entry() {
    let rounds: usize = std::env::var("ATTNCACHE_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let model = TinyModel::new("crash");
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    // every round records new inputs (so writes are in flight when it is killed) and
    // repeats earlier ones (so hits are read back from files written before a kill)
    const NEW_PER_ROUND: usize = 8;
    let inputs: Vec<String> = (0..(rounds + 1) * NEW_PER_ROUND).map(input).collect();

    // exact answers, from a server without cache
    let exact: Vec<Vec<f32>> = {
        let server = Server::start(&model, &["--repeat-mib", "0"]);
        let mut out = Vec::new();
        for t in &inputs {
            out.push(embedding(
                &embed(&client, &server.base, t, false).await.unwrap(),
            ));
        }
        out
    };

    let cache_dir = dir.path().to_str().unwrap();
    // a 1 MiB hot tier holds no entry of this size: every hit is read from a file
    let args = [
        "--attn-cache",
        "on",
        "--cache-dir",
        cache_dir,
        "--hot-mib",
        "1",
        "--repeat-mib",
        "0",
    ];
    let (mut hits, mut recorded_before_kill, mut torn) = (0u64, 0u64, 0usize);
    for round in 0..rounds {
        torn += temp_files(dir.path());
        let mut server = Server::start(&model, &args);
        let base = server.base.clone();
        check_store(&client, &base, dir.path(), &format!("round {round}")).await;
        // 4 clients send inputs (new ones are recorded, old ones hit) until the kill
        let mut tasks = Vec::new();
        for c in 0..4 {
            let (client, base, inputs, exact) =
                (client.clone(), base.clone(), inputs.clone(), exact.clone());
            tasks.push(tokio::spawn(async move {
                let (mut hits, mut done) = (0u64, 0u64);
                for k in 0usize.. {
                    // even steps: this round's new inputs; odd steps: any earlier input
                    let fresh = round * NEW_PER_ROUND + (c + k * 4) % NEW_PER_ROUND;
                    let old = (c * 7 + k * 3) % (round * NEW_PER_ROUND + 1);
                    let i = if k % 2 == 0 { fresh } else { old };
                    let Some(v) = embed(&client, &base, &inputs[i], true).await else {
                        break; // the server was killed
                    };
                    done += 1;
                    if v["attn_cache"]["inputs"][0]["outcome"] == "hit" {
                        let got = embedding(&v);
                        let diff = got
                            .iter()
                            .zip(&exact[i])
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(diff <= 1e-3, "a hit served wrong maps: max diff {diff}");
                        hits += 1;
                    }
                }
                (hits, done)
            }));
        }
        // kill at a different moment each round, while entries are being written
        tokio::time::sleep(Duration::from_millis(30 + (round as u64 * 37) % 250)).await;
        let _ = server.child.kill(); // SIGKILL
        let _ = server.child.wait();
        for t in tasks {
            let (h, d) = t.await.expect("client task");
            hits += h;
            recorded_before_kill += d;
        }
    }
    // a final start checks the last kill too
    let server = Server::start(&model, &args);
    check_store(&client, &server.base, dir.path(), "after the last kill").await;
    assert!(hits > 0, "no hit was served in {rounds} rounds");
    assert!(recorded_before_kill > 0);
    eprintln!(
        "{rounds} SIGKILLs, {recorded_before_kill} answered requests, {hits} hits checked, \
{torn} interrupted writes cleaned up, {} entries on disk",
        entry_files(dir.path())
    );
}
