//! `attncache-load` (`make soak`, and a short run in `make test`): a bounded load generator.
//!
//! Starts `attncache-server` (the binary next to this one) on a free loopback port with the
//! tiny generated model, computes the exact (flag-off, one at a time) embedding of every
//! input of a fixed pool, then lets `--clients` concurrent clients send `/v1/embeddings`
//! requests for `--duration-s` seconds: mixed input lengths (4 to 240 tokens), cache flag on
//! or off per request, a share of repeated inputs. It checks every response and stops by
//! itself. It fails (exit status 1) when any request errs, when a flag-off answer differs
//! from the exact one by more than `--tolerance`, or when the server's peak RSS exceeds its
//! RSS after start-up plus the configured hot tier, repeat memo and `--rss-slack-mib`.
//! 429 answers (admission control) are counted, not errors.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use attncache_benches::stats;
use attncache_server::tiny_model::{self, WORDS};
use clap::Parser;
use serde::Serialize;

/// Drives attncache-server with concurrent clients and checks every answer.
#[derive(Debug, Parser)]
#[command(name = "attncache-load")]
struct Args {
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long the clients send requests, seconds.
    #[arg(long, default_value_t = 300)]
    duration_s: u64,
    /// Distinct inputs in the pool.
    #[arg(long, default_value_t = 200)]
    inputs: usize,
    /// Share of requests with the cache flag on.
    #[arg(long, default_value_t = 0.5)]
    flag_on: f64,
    /// Hot-tier budget given to the server, MiB.
    #[arg(long, default_value_t = 64)]
    hot_mib: u64,
    /// Exact-repeat memo budget given to the server, MiB.
    #[arg(long, default_value_t = 16)]
    repeat_mib: u64,
    /// Requests the server admits at once before answering 429.
    #[arg(long, default_value_t = 64)]
    max_in_flight: u32,
    /// Largest flag-off difference from the exact answer accepted (batching changes the
    /// order of float additions; the cache is never used flag off).
    #[arg(long, default_value_t = 1e-5)]
    tolerance: f32,
    /// RSS the server may add beyond start-up + hot tier + memo (request buffers, batches,
    /// allocator slack), MiB.
    #[arg(long, default_value_t = 192)]
    rss_slack_mib: u64,
    /// The server binary (default: attncache-server next to this program).
    #[arg(long)]
    server: Option<PathBuf>,
    /// Also write the result as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Serialize)]
struct LoadReport {
    clients: usize,
    duration_s: f64,
    requests: u64,
    ok: u64,
    rejected_429: u64,
    errors: u64,
    flag_off_checked: u64,
    flag_off_max_diff: f32,
    throughput_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    rss_start_mib: f64,
    rss_peak_mib: f64,
    rss_bound_mib: f64,
    cache_hits: f64,
    cache_recorded: f64,
    passed: bool,
}

/// The `i`-th pool input: between 4 and 240 words of the tiny model's vocabulary.
fn input(i: usize) -> String {
    let len = 4 + (i * 37) % 237;
    (0..len)
        .map(|j| WORDS[(i * 7 + j * (1 + i % 5)) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

/// A small deterministic generator (xorshift) per client.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn rss_mib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))?;
    Ok(kb / 1024.0)
}

/// The server child process, killed on drop.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(bin: &PathBuf, model: &std::path::Path, args: &Args) -> anyhow::Result<Server> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin)
        .arg("--model")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", "0", "--attn-cache", "off"])
        .args(["--hot-mib", &args.hot_mib.to_string()])
        .args(["--repeat-mib", &args.repeat_mib.to_string()])
        .args(["--max-in-flight", &args.max_in_flight.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("listening on ") {
                let _ = tx.send(addr.to_string());
            }
        }
    });
    let mut server = Server {
        child,
        base: String::new(),
    };
    // on failure the server is killed when `server` drops
    server.base = rx
        .recv_timeout(Duration::from_secs(120))
        .context("attncache-server did not start listening within 120 s")?;
    Ok(server)
}

async fn embed(
    client: &reqwest::Client,
    base: &str,
    text: &str,
    flag: bool,
) -> anyhow::Result<(u16, Option<Vec<f32>>)> {
    let body = serde_json::json!({"model": "default", "input": text, "attn_cache": flag});
    let resp = client
        .post(format!("{base}/v1/embeddings"))
        .json(&body)
        .send()
        .await?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Ok((status, None));
    }
    let v: serde_json::Value = resp.json().await?;
    let e: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone())?;
    Ok((status, Some(e)))
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bin = match &args.server {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("attncache-server"),
    };
    let model = tempfile::tempdir()?;
    tiny_model::write(model.path(), 7)?;
    let server = start_server(&bin, model.path(), &args)?;
    let base = server.base.clone();
    let pid = server.child.id();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;

    // exact answers, one request at a time, flag off
    let pool: Vec<String> = (0..args.inputs).map(input).collect();
    let bar = attncache_server::progress::progress_bar(pool.len(), "reference")?;
    let mut exact = Vec::with_capacity(pool.len());
    for text in &pool {
        let (status, e) = embed(&client, &base, text, false).await?;
        anyhow::ensure!(status == 200, "reference request answered {status}");
        exact.push(e.context("embedding")?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let rss_start = rss_mib(pid, "VmRSS:")?;

    let deadline = Instant::now() + Duration::from_secs(args.duration_s);
    let bar = attncache_server::progress::progress_bar(args.duration_s as usize, "load")?;
    let counters: Arc<[AtomicU64; 4]> = Arc::new(Default::default()); // ok, 429, errors, checked
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let max_diff = Arc::new(Mutex::new(0f32));
    let pool = Arc::new(pool);
    let exact = Arc::new(exact);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (client, base, pool, exact) =
            (client.clone(), base.clone(), pool.clone(), exact.clone());
        let (counters, latencies, max_diff) =
            (counters.clone(), latencies.clone(), max_diff.clone());
        let flag_on = args.flag_on;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (c as u64 + 1));
            while Instant::now() < deadline {
                // a skewed choice: a quarter of the pool gets most requests (repeats hit)
                let i = if rng.unit() < 0.7 {
                    (rng.next() as usize) % (pool.len() / 4).max(1)
                } else {
                    (rng.next() as usize) % pool.len()
                };
                let flag = rng.unit() < flag_on;
                let t = Instant::now();
                match embed(&client, &base, &pool[i], flag).await {
                    Ok((200, Some(e))) => {
                        latencies
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(t.elapsed().as_secs_f64() * 1e3);
                        counters[0].fetch_add(1, Ordering::Relaxed);
                        if !flag {
                            let d = e
                                .iter()
                                .zip(exact[i].iter())
                                .map(|(a, b)| (a - b).abs())
                                .fold(0f32, f32::max);
                            let mut m = max_diff.lock().unwrap_or_else(|p| p.into_inner());
                            *m = m.max(if e.len() == exact[i].len() {
                                d
                            } else {
                                f32::INFINITY
                            });
                            counters[3].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok((429, _)) => {
                        counters[1].fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok((status, _)) => {
                        tracing::warn!(status, "request failed");
                        counters[2].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("request error: {e:#}");
                        counters[2].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.set_position(started.elapsed().as_secs().min(args.duration_s));
    }
    for t in tasks {
        t.await?;
    }
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let rss_peak = rss_mib(pid, "VmHWM:")?;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let health = client.get(format!("{base}/health")).send().await?.status();
    let lat = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let c: Vec<u64> = counters.iter().map(|x| x.load(Ordering::Relaxed)).collect();
    let max_diff = *max_diff.lock().unwrap_or_else(|p| p.into_inner());
    let rss_bound = rss_start + (args.hot_mib + args.repeat_mib + args.rss_slack_mib) as f64;
    let passed = c[2] == 0
        && c[0] > 0
        && max_diff <= args.tolerance
        && rss_peak <= rss_bound
        && health.is_success();
    let report = LoadReport {
        clients: args.clients,
        duration_s: elapsed,
        requests: c[0] + c[1] + c[2],
        ok: c[0],
        rejected_429: c[1],
        errors: c[2],
        flag_off_checked: c[3],
        flag_off_max_diff: max_diff,
        throughput_per_s: c[0] as f64 / elapsed,
        p50_ms: stats::quantile(&lat, 0.5),
        p99_ms: stats::quantile(&lat, 0.99),
        max_ms: stats::quantile(&lat, 1.0),
        rss_start_mib: rss_start,
        rss_peak_mib: rss_peak,
        rss_bound_mib: rss_bound,
        cache_hits: metric(&metrics, "attncache_hits_total"),
        cache_recorded: metric(&metrics, "attncache_recorded_total"),
        passed,
    };
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(out) = &args.out {
        std::fs::write(out, &json)?;
    }
    drop(server);
    anyhow::ensure!(passed, "load test failed (see the report above)");
    Ok(())
}
