//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Texts of several lengths: some shorter than the tiny model's sliding window (8 tokens),
/// some much longer, so both the sliding and the full layers see real masks.
pub const TEXTS: &[&str] = &[
    "the food was great",
    "the staff were lovely and the room was clean",
    "the staff were rude and the room was dirty",
    "terrible movie , boring plot and the actor was awful . i would never recommend this film to my friends",
    "win cash now ! click here for a free prize",
    "task : search result | query : cheap hotel",
    "hello",
];

/// Nine-word review sentences of one shape, so that one-word variants keep their length
/// (the tools' near-duplicate workloads).
pub const REVIEWS: [&str; 8] = [
    "the food was great and the staff were friendly",
    "the room was clean and the price was fair",
    "the movie was boring and the plot was slow",
    "the phone was cheap but the battery was bad",
    "the service was slow but the food was good",
    "the hotel was nice and the staff were lovely",
    "the book was amazing and the story was great",
    "the order was late and the delivery was slow",
];

/// A fresh directory holding the tiny model (deterministic seed), removed on drop.
pub struct TinyModel {
    pub dir: PathBuf,
}

impl TinyModel {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("attncache-tiny-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        attncache_server::tiny_model::write(&dir, 7).expect("write tiny model");
        Self { dir }
    }
    /// A tiny model with `layers` layers instead of 2.
    pub fn with_layers(tag: &str, layers: usize) -> Self {
        let dir = std::env::temp_dir().join(format!("attncache-tiny-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        attncache_server::tiny_model::write_with_layers(&dir, 7, layers).expect("write tiny model");
        Self { dir }
    }
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TinyModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `{"model": "default", "input": texts}` as a request body.
pub fn embeddings_body(texts: &[&str]) -> serde_json::Value {
    serde_json::json!({"model": "default", "input": texts})
}

/// The embeddings of an OpenAI-style response, in `index` order.
pub fn embeddings_of(response: &serde_json::Value) -> Vec<Vec<f32>> {
    let data = response["data"].as_array().expect("data array");
    let mut rows: Vec<(u64, Vec<f32>)> = data
        .iter()
        .map(|d| {
            let index = d["index"].as_u64().expect("index");
            let v = serde_json::from_value::<Vec<f32>>(d["embedding"].clone())
                .expect("float embedding");
            (index, v)
        })
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    rows.into_iter().map(|(_, v)| v).collect()
}

pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (norm(a) * norm(b))
}

pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// Loads the server as `args` say and serves it in this process on a free loopback port;
/// returns the app (hook, cache) and the base URL.
pub async fn start(
    args: &attncache_server::cli::ServeArgs,
) -> (attncache_server::startup::App, String) {
    let app = attncache_server::startup::build(args)
        .await
        .expect("load tiny model");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = app.router.clone();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (app, base)
}

/// POSTs `texts` to `/v1/embeddings`, expects 200, returns the embeddings in input order.
pub async fn embed(client: &reqwest::Client, base: &str, texts: &[&str]) -> Vec<Vec<f32>> {
    let resp = client
        .post(format!("{base}/v1/embeddings"))
        .json(&embeddings_body(texts))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "status");
    embeddings_of(&resp.json().await.expect("json body"))
}

/// POSTs one text to `/v1/embeddings`, expects 200, returns its embedding and what the
/// cache reported for it (`attn_cache.inputs[0]`).
pub async fn embed_reported(
    client: &reqwest::Client,
    base: &str,
    text: &str,
) -> (Vec<f32>, serde_json::Value) {
    let resp = client
        .post(format!("{base}/v1/embeddings"))
        .json(&embeddings_body(&[text]))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status(), 200, "status");
    let body: serde_json::Value = resp.json().await.expect("json body");
    let report = body["attn_cache"]["inputs"][0].clone();
    (embeddings_of(&body).remove(0), report)
}

/// Embeds `texts` one request at a time, so that every input runs in a batch of its own.
///
/// For bit-for-bit comparisons: mistral.rs batches equal-length inputs that are waiting at
/// the same step (also across the inputs of one request), and a batch of another size sums
/// in another order (gemm's blocking follows the row count), which moves the last bits.
/// Whether two inputs of one request meet at a step is a race, so a bit-for-bit check of
/// a many-input request can fail on timing alone (it did, in CI).
pub async fn embed_each(client: &reqwest::Client, base: &str, texts: &[&str]) -> Vec<Vec<f32>> {
    let mut out = Vec::with_capacity(texts.len());
    for text in texts {
        out.extend(embed(client, base, &[text]).await);
    }
    out
}

/// `(text, embedding rounded to 10^-decimals)` pairs, the shape of the insta snapshots.
pub fn rounded(texts: &[&str], embeddings: &[Vec<f32>], decimals: i32) -> Vec<(String, Vec<f64>)> {
    let scale = 10f64.powi(decimals);
    texts
        .iter()
        .zip(embeddings)
        .map(|(t, e)| {
            (
                t.to_string(),
                e.iter()
                    .map(|x| (f64::from(*x) * scale).round() / scale)
                    .collect(),
            )
        })
        .collect()
}

/// `values` with each number that lies within `tol` of the same number in the committed
/// snapshot `tests/snapshots/<file>.snap` replaced by the committed one. Float summation
/// order differs between CPUs (gemm picks its kernels by vector width), so a value next to
/// a rounding boundary can round either way; snapped, the snapshot still fails on any
/// change larger than `tol` and shows it. Without a committed snapshot (or a different
/// shape) `values` are returned as they are, for insta to report.
pub fn snapped_to_committed(
    file: &str,
    mut values: Vec<(String, Vec<f64>)>,
    tol: f64,
) -> Vec<(String, Vec<f64>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{file}.snap"));
    let Ok(text) = std::fs::read_to_string(&path) else {
        return values;
    };
    // insta's file: a `---`-delimited header, then the JSON body
    let body = text.splitn(3, "---\n").nth(2).unwrap_or_default();
    let Ok(committed) = serde_json::from_str::<Vec<(String, Vec<f64>)>>(body) else {
        return values;
    };
    for ((text, row), (old_text, old_row)) in values.iter_mut().zip(&committed) {
        if text != old_text || row.len() != old_row.len() {
            continue;
        }
        for (x, old) in row.iter_mut().zip(old_row) {
            if (*x - old).abs() <= tol {
                *x = *old;
            }
        }
    }
    values
}

/// A running server, killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Server {
    pub fn start(model: &TinyModel, extra: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_attncache-server"));
        command.args(Self::args(model, extra));
        Self::start_command(command)
    }

    /// The server's arguments for `model` on a free loopback port, then `extra`.
    pub fn args(model: &TinyModel, extra: &[&str]) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec!["--model".into(), model.path().into()];
        args.extend(["--host", "127.0.0.1", "--port", "0"].map(Into::into));
        args.extend(extra.iter().map(Into::into));
        args
    }

    /// Runs `command` (which must start attncache-server) and waits until it listens.
    /// The server's log is forwarded through a pipe (not inherited), so a server under a
    /// file-size limit can still log when the tests' stderr is a file.
    pub fn start_command(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn attncache-server");
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_else(|e| {
                std::thread::sleep(Duration::from_millis(300));
                let exited = child.try_wait().ok().flatten();
                let _ = child.kill();
                match exited {
                    Some(status) => panic!("attncache-server exited before listening: {status}"),
                    None => panic!("attncache-server did not start listening: {e}"),
                }
            });
        Self { child, base }
    }
}

impl Server {
    /// The text of `GET /metrics`.
    pub fn metrics(&self) -> String {
        reqwest::blocking::get(format!("{}/metrics", self.base))
            .expect("metrics")
            .text()
            .expect("metrics text")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response body made stable for a snapshot: numbers rounded to `decimals`, and the
/// fields that change from run to run (`id`, `created`, `lookup_us`, `model`: a temp dir) replaced by a marker.
pub fn redacted(v: &serde_json::Value, decimals: i32) -> serde_json::Value {
    use serde_json::Value;
    let scale = 10f64.powi(decimals);
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| {
                    let x = if ["id", "created", "lookup_us", "model"].contains(&k.as_str()) {
                        Value::String("[redacted]".into())
                    } else {
                        redacted(x, decimals)
                    };
                    (k.clone(), x)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(|x| redacted(x, decimals)).collect()),
        Value::Number(n) if n.is_f64() => {
            serde_json::json!((n.as_f64().unwrap_or(f64::NAN) * scale).round() / scale)
        }
        other => other.clone(),
    }
}

/// The value of the Prometheus series `name` (first sample) in a `/metrics` text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// The cache outcome of each input in an embeddings response (`miss`, `hit`, `off`, …).
pub fn outcomes(body: &serde_json::Value) -> Vec<String> {
    body["attn_cache"]["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["outcome"].as_str().unwrap().to_string())
        .collect()
}

/// Runs the Python client script `tests/<script>` (from the venv of scripts/setup-python,
/// or `$ATTNCACHE_PYTHON`) against `base` with `key`; panics unless it succeeds; returns the
/// JSON object it prints.
pub fn run_python_client(script: &str, base: &str, key: &str) -> serde_json::Value {
    let python = std::env::var("ATTNCACHE_PYTHON").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python").to_string()
    });
    assert!(
        Path::new(&python).exists(),
        "{python} is missing: run scripts/setup-python (make test does)"
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(script);
    let out = Command::new(&python)
        .arg(path)
        .arg(base)
        .arg(key)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).expect("the client prints one JSON object")
}
