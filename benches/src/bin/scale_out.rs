//! What sharing the cache through Redis costs, for entries of the served model's shape, on
//! a throw-away `redis-server` on this machine (loopback: no network latency is included):
//!
//! - **cross-replica delay**: from `insert` on replica A (which returns at once) until
//!   replica B has indexed the entry — A's background encode and write, the Lua script,
//!   the stream message and B's `XREAD`;
//! - **lookup cost** of one entry found in B's hot tier (RAM), in Redis, and for
//!   comparison on a local disk tier (file just written: page cache warm);
//! - what a hit saves: every layer's softmax(QKᵀ)·V computed (a miss), against P·V with
//!   the stored maps (a hit), from [`attncache_plugin::tiering::costs::measure`];
//! - the bytes one entry takes, in Redis and on the wire.
//!
//! Then, end to end (unless `--e2e-rounds 0`): two `attncache-server` replicas with the
//! real model on one Redis; per round and length a new input is sent to A (a miss, stored),
//! then to B once its index has it (a hit read from Redis), to B again (a hit from B's hot
//! tier) and to B with the flag off (exact). Request latencies and the server-side
//! `lookup_us` of each kind are reported.
//!
//! Writes `benches/results/scale-out.{json,md}`; `docs/scale-out.md` rests on them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use attncache_benches::stats::quantile;
use attncache_plugin::storage::entry::{AttentionMaps, Entry, Payload};
use attncache_plugin::storage::store::{MapStore, StoreConfig};
use attncache_plugin::tiering::costs::{self, EntryShape};
use attncache_plugin::RedisSettings;
use attncache_server::model_dir::ModelDir;
use attncache_server::redis_server::RedisServer;
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use serde::Serialize;

/// Measures the shared (Redis) cold tier: cross-replica delay and the cost of a Redis hit
/// against a hot hit, a disk hit and a recompute, for the model's entry shape.
#[derive(Debug, Parser)]
#[command(name = "attncache-scale-out")]
struct Args {
    /// Model directory whose `config.json` gives the attention shape (default: the fetched
    /// EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = attncache_server::cli::default_model_dir())]
    model: PathBuf,
    /// Input lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,512")]
    tokens: Vec<usize>,
    /// Entries measured per length (each once from Redis, once from RAM).
    #[arg(long, default_value_t = 15)]
    samples: usize,
    /// End-to-end rounds with two server replicas and the real model (0: skip).
    #[arg(long, default_value_t = 7)]
    e2e_rounds: usize,
    /// Input lengths of the end-to-end stage, in words (≈1.2 tokens per word).
    #[arg(long, value_delimiter = ',', default_value = "100,200,400")]
    e2e_words: Vec<usize>,
    /// Where to write scale-out.json and scale-out.md.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

#[derive(Debug, Serialize)]
struct Row {
    tokens: usize,
    entry_bytes: usize,
    samples: usize,
    cross_replica_ms_p50: f64,
    cross_replica_ms_p90: f64,
    write_ms_p50: f64,
    hot_lookup_us_p50: f64,
    redis_lookup_ms_p50: f64,
    redis_lookup_ms_p90: f64,
    disk_lookup_ms_p50: f64,
    hit_reuse_ms: f64,
    miss_attention_ms: f64,
}

/// One length of the end-to-end stage: medians over the rounds.
#[derive(Debug, Serialize)]
struct E2eRow {
    words: usize,
    tokens: usize,
    rounds: usize,
    miss_on_a_ms: f64,
    visible_on_b_ms: f64,
    redis_hit_on_b_ms: f64,
    hot_hit_on_b_ms: f64,
    exact_on_b_ms: f64,
    redis_lookup_us: f64,
    hot_lookup_us: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    commit: String,
    machine: String,
    date: String,
    redis: String,
    shape: EntryShape,
    rows: Vec<Row>,
    e2e: Vec<E2eRow>,
}

fn entry(shape: &EntryShape, salt: u32) -> anyhow::Result<Entry> {
    let l = shape.tokens;
    let layers = (0..shape.layers)
        .map(|_| {
            let t = Tensor::rand(0f32, 1.0, (shape.heads, l, l), &Device::Cpu)?;
            t.broadcast_div(&t.sum_keepdim(2)?)?.to_dtype(DType::F16)
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tokens: Vec<u32> = (0..l as u32).map(|i| i + salt * 100_003).collect();
    Ok(Entry {
        tokens: tokens.into(),
        feature: vec![salt as f32; 16].into(),
        feature_id: 1,
        payload: Payload::Maps(AttentionMaps {
            heads: shape.heads,
            layers,
        }),
    })
}

fn redis_store(url: &str, prefix: &str, hot_bytes: u64) -> anyhow::Result<MapStore> {
    let settings = RedisSettings {
        url: url.into(),
        prefix: prefix.into(),
        timeout_ms: 2_000,
        ..RedisSettings::default()
    };
    Ok(MapStore::open(StoreConfig {
        hot_bytes,
        cold_dir: None,
        cold_bytes: 64 << 30,
        fingerprint: 1,
        redis: Some(settings.clone()),
        scope: "global".into(),
    })?)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    attncache_benches::logging::init();
    let model = ModelDir::inspect(&args.model)
        .with_context(|| format!("model directory {}", args.model.display()))?;
    let redis = RedisServer::start()?;
    let version = std::process::Command::new(RedisServer::binary()?)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let work = tempfile::tempdir()?;
    let bar = attncache_server::progress::styled_bar(
        args.tokens.len() * args.samples,
        "{msg:>12} {bar:40} {pos}/{len} [{elapsed}]",
    )?;
    let mut rows = Vec::new();
    let mut shape_seen = None;
    for (i, &tokens) in args.tokens.iter().enumerate() {
        let shape = model
            .entry_shape(tokens)
            .context("config.json gives no attention shape")?;
        shape_seen = Some(shape);
        bar.set_message(format!("{tokens} tokens"));
        let prefix = format!("scale{i}");
        let a = redis_store(&redis.url(), &prefix, 1 << 30)?;
        let b = redis_store(&redis.url(), &prefix, 1 << 34)?;
        let disk_config = StoreConfig {
            hot_bytes: 1 << 30,
            cold_dir: Some(work.path().join(format!("disk{i}"))),
            cold_bytes: 64 << 30,
            fingerprint: 1,
            redis: None,
            scope: "global".into(),
        };
        let disk = MapStore::open(disk_config.clone())?;
        let mut written = Vec::new();
        let (mut cross, mut write, mut hot, mut remote, mut local) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut entry_bytes = 0;
        for s in 0..args.samples {
            let e = entry(&shape, (i * 1000 + s) as u32)?;
            entry_bytes = attncache_plugin::storage::entry::encode(&e, 1)?.len();
            let t = e.tokens.clone();
            let started = Instant::now();
            a.insert(e.clone());
            let writer = std::thread::scope(|scope| {
                let flushed = scope.spawn(|| {
                    a.flush();
                    started.elapsed()
                });
                loop {
                    if !b.take_announced().is_empty() {
                        break;
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        anyhow::bail!("no announcement within 30 s");
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                cross.push(ms(started.elapsed()));
                flushed
                    .join()
                    .map_err(|_| anyhow::anyhow!("flush panicked"))
            })?;
            write.push(ms(writer));
            let started = Instant::now();
            let got = b.get(&t).context("B did not find A's entry in Redis")?;
            remote.push(ms(started.elapsed()));
            drop(got);
            let started = Instant::now();
            let got = b.get(&t).context("B lost the entry")?;
            hot.push(started.elapsed().as_secs_f64() * 1e6);
            drop(got);
            disk.insert(e);
            written.push(t);
            bar.inc(1);
        }
        disk.flush();
        drop(disk);
        // a store reopened over the files: every first lookup reads one (page cache warm)
        let disk = MapStore::open(disk_config)?;
        for t in &written {
            let started = Instant::now();
            let got: Option<Arc<Entry>> = disk.get(t);
            local.push(ms(started.elapsed()));
            got.context("disk tier lost the entry")?;
        }
        let costs = costs::measure(&shape, costs::ColdSource::Dir(work.path()), 5)?;
        let p = |v: &[f64], q| quantile(v, q);
        rows.push(Row {
            tokens,
            entry_bytes,
            samples: args.samples,
            cross_replica_ms_p50: p(&cross, 0.5),
            cross_replica_ms_p90: p(&cross, 0.9),
            write_ms_p50: p(&write, 0.5),
            hot_lookup_us_p50: p(&hot, 0.5),
            redis_lookup_ms_p50: p(&remote, 0.5),
            redis_lookup_ms_p90: p(&remote, 0.9),
            disk_lookup_ms_p50: p(&local, 0.5),
            hit_reuse_ms: costs.hot_hit_ns / 1e6,
            miss_attention_ms: costs.miss_ns / 1e6,
        });
    }
    bar.finish_and_clear();
    let e2e = if args.e2e_rounds > 0 {
        end_to_end(&args, &redis)?
    } else {
        Vec::new()
    };
    let report = Report {
        commit: attncache_benches::provenance::git_commit(),
        machine: attncache_benches::provenance::machine(),
        date: attncache_benches::provenance::now_utc(),
        redis: version,
        shape: shape_seen.context("no --tokens given")?,
        rows,
        e2e,
    };
    let md = markdown(&report);
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("scale-out.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("scale-out.md"), md)?;
    Ok(())
}

/// A running `attncache-server` replica, killed on drop.
struct Replica {
    child: std::process::Child,
    base: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    fn start(model: &std::path::Path, redis_url: &str) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let exe = std::env::current_exe()?.with_file_name("attncache-server");
        let mut child = std::process::Command::new(&exe)
            .arg("--model")
            .arg(model)
            .args([
                "--port",
                "0",
                "--attn-cache",
                "on",
                "--cache-backend",
                "redis",
            ])
            .args(["--redis-url", redis_url, "--repeat-mib", "0"])
            .args([
                "--hot-sizing",
                "fixed",
                "--hot-mib",
                "2048",
                "--cold-mib",
                "16384",
            ])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(300))
            .context("attncache-server did not start listening")?;
        Ok(Self { child, base })
    }

    /// Sends `text`; returns the latency, the outcome, the lookup time (µs) and the tokens.
    fn embed(
        &self,
        http: &reqwest::blocking::Client,
        text: &str,
        cache: bool,
    ) -> anyhow::Result<(f64, String, f64, usize)> {
        let started = Instant::now();
        let resp = http
            .post(format!("{}/v1/embeddings", self.base))
            .json(&serde_json::json!({"input": [text], "attn_cache": cache}))
            .send()?;
        anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
        let body: serde_json::Value = resp.json()?;
        let took = ms(started.elapsed());
        let report = &body["attn_cache"]["inputs"][0];
        let outcome = report["outcome"].as_str().unwrap_or_default().to_string();
        let lookup = report["lookup_us"].as_f64().unwrap_or(f64::NAN);
        let tokens = body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        Ok((took, outcome, lookup, tokens))
    }

    fn announced(&self, http: &reqwest::blocking::Client) -> anyhow::Result<f64> {
        let text = http.get(format!("{}/metrics", self.base)).send()?.text()?;
        Ok(text
            .lines()
            .find(|l| l.starts_with("attncache_shared_announced_total "))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0))
    }
}

/// The end-to-end stage (see the module doc).
fn end_to_end(args: &Args, redis: &RedisServer) -> anyhow::Result<Vec<E2eRow>> {
    let a = Replica::start(&args.model, &redis.url())?;
    let b = Replica::start(&args.model, &redis.url())?;
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    // warm both replicas up (first requests allocate)
    for r in [&a, &b] {
        r.embed(&http, &attncache_benches::synthetic::text_of(50, 0), false)?;
    }
    let bar = attncache_server::progress::styled_bar(
        args.e2e_rounds * args.e2e_words.len(),
        "{msg:>12} {bar:40} {pos}/{len} [{elapsed}]",
    )?;
    bar.set_message("two replicas");
    let mut rows = Vec::new();
    let mut variant = 1;
    for &words in &args.e2e_words {
        let mut cols: [Vec<f64>; 7] = Default::default();
        let mut tokens = 0;
        for _ in 0..args.e2e_rounds {
            variant += 1;
            let text = attncache_benches::synthetic::text_of(words, variant);
            let before = b.announced(&http)?;
            let (miss, outcome, _, n) = a.embed(&http, &text, true)?;
            anyhow::ensure!(outcome == "miss", "A: {outcome}, expected a miss");
            tokens = n;
            let sent = Instant::now();
            while b.announced(&http)? <= before {
                anyhow::ensure!(sent.elapsed() < Duration::from_secs(30), "B never saw it");
                std::thread::sleep(Duration::from_millis(1));
            }
            let visible = ms(sent.elapsed());
            let (redis_hit, outcome, redis_lookup, _) = b.embed(&http, &text, true)?;
            anyhow::ensure!(outcome == "hit", "B: {outcome}, expected a hit from Redis");
            let (hot_hit, outcome, hot_lookup, _) = b.embed(&http, &text, true)?;
            anyhow::ensure!(outcome == "hit", "B again: {outcome}, expected a hot hit");
            let (exact, _, _, _) = b.embed(&http, &text, false)?;
            for (col, v) in cols.iter_mut().zip([
                miss,
                visible,
                redis_hit,
                hot_hit,
                exact,
                redis_lookup,
                hot_lookup,
            ]) {
                col.push(v);
            }
            bar.inc(1);
        }
        let p50 = |i: usize| quantile(&cols[i], 0.5);
        rows.push(E2eRow {
            words,
            tokens,
            rounds: args.e2e_rounds,
            miss_on_a_ms: p50(0),
            visible_on_b_ms: p50(1),
            redis_hit_on_b_ms: p50(2),
            hot_hit_on_b_ms: p50(3),
            exact_on_b_ms: p50(4),
            redis_lookup_us: p50(5),
            hot_lookup_us: p50(6),
        });
    }
    bar.finish_and_clear();
    Ok(rows)
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# Shared cold tier (Redis) costs\n\ncommit {} · {} · {} · {}\n\nshape: {} layers × {} heads (f16 maps); Redis on loopback (no network latency included); medians of {} entries per length\n\n",
        r.commit,
        r.date,
        r.machine,
        r.redis,
        r.shape.layers,
        r.shape.heads,
        r.rows.first().map_or(0, |x| x.samples)
    );
    s.push_str("| tokens | entry MB | A→B visible ms (p50 / p90) | A write ms | hot lookup µs | Redis lookup ms (p50 / p90) | disk lookup ms | reuse (P·V) ms | recompute (attention) ms |\n|---|---|---|---|---|---|---|---|---|\n");
    for x in &r.rows {
        s.push_str(&format!(
            "| {} | {:.2} | {:.1} / {:.1} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1} | {:.1} | {:.1} |\n",
            x.tokens,
            x.entry_bytes as f64 / 1e6,
            x.cross_replica_ms_p50,
            x.cross_replica_ms_p90,
            x.write_ms_p50,
            x.hot_lookup_us_p50,
            x.redis_lookup_ms_p50,
            x.redis_lookup_ms_p90,
            x.disk_lookup_ms_p50,
            x.hit_reuse_ms,
            x.miss_attention_ms,
        ));
    }
    if !r.e2e.is_empty() {
        s.push_str(&format!(
            "\n## End to end: two attncache-server replicas, one Redis (medians of {} rounds)\n\nA request to replica A stores its maps; B then serves the same input from Redis, then from its own hot tier; `exact` is B with the flag off. `lookup` is the server's own lookup time for the input.\n\n| words | tokens | miss on A ms | visible on B after A's answer ms | exact on B ms | Redis hit on B ms | hot hit on B ms | Redis lookup ms | hot lookup ms |\n|---|---|---|---|---|---|---|---|---|\n",
            r.e2e.first().map_or(0, |x| x.rounds)
        ));
        for x in &r.e2e {
            s.push_str(&format!(
                "| {} | {} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.2} |\n",
                x.words,
                x.tokens,
                x.miss_on_a_ms,
                x.visible_on_b_ms,
                x.exact_on_b_ms,
                x.redis_hit_on_b_ms,
                x.hot_hit_on_b_ms,
                x.redis_lookup_us / 1e3,
                x.hot_lookup_us / 1e3,
            ));
        }
    }
    s
}
