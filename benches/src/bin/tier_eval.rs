//! `make tier-eval`: validates the hot-tier sizing on EmbeddingGemma-300M through the real
//! pipeline. Distinct template-wrapped sentiment texts are requested with Zipf popularity
//! (identical inputs, so every repeat is a map-cache hit). After a warm-up that records every
//! input, the same request sequence is served twice: with every entry in RAM, then with the
//! hot tier the server's own sizing chooses (tier costs measured here, reuse distances
//! sampled during the first pass). Reports the measured slowdown and the RAM saved, and the
//! offline `attncache size` curve of the first pass's access trace as a plot.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use attncache_benches::provenance;
use attncache_benches::stats;
use attncache_benches::workloads::{self, Kind, Sizes};
use attncache_plugin::tiering::costs;
use attncache_server::cli::ServeArgs;
use attncache_server::tier_report::{self, SizeArgs};
use attncache_server::{local_server::LocalServer, progress::progress_bar};
use clap::Parser;
use serde::Serialize;

/// Validates the automatic hot-tier size: all-in-RAM vs chosen, same requests.
#[derive(Debug, Parser)]
#[command(name = "attncache-tier-eval")]
struct Args {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = attncache_server::cli::default_model_dir())]
    model: PathBuf,
    /// Data directory holding `sentiment/` (scripts/fetch-data).
    #[arg(long, default_value_os_t = workloads::default_data_dir())]
    data: PathBuf,
    /// Distinct inputs.
    #[arg(long, default_value_t = 400)]
    distinct: usize,
    /// Requests per pass.
    #[arg(long, default_value_t = 1500)]
    requests: usize,
    /// Zipf exponent of the inputs' popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Largest predicted slowdown the chosen size may cost (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    target_loss: f64,
    /// Seed of the request order.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where the results go (`tiers.json`, `tiers.md`, `tiers.svg`).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
}

/// A deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` draws of input indices in `0..distinct` with Zipf(`s`) popularity over a shuffled
/// ranking (so popularity does not follow the data's order).
fn zipf_sequence(distinct: usize, n: usize, s: f64, seed: u64) -> Vec<usize> {
    let mut rng = Rng(seed.max(1));
    let mut rank_to_input: Vec<usize> = (0..distinct).collect();
    for i in (1..distinct).rev() {
        let j = (rng.unit() * (i + 1) as f64) as usize;
        rank_to_input.swap(i, j.min(i));
    }
    let weights: Vec<f64> = (1..=distinct).map(|r| 1.0 / (r as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(distinct);
    let mut acc = 0.0;
    for w in weights {
        acc += w / total;
        cdf.push(acc);
    }
    (0..n)
        .map(|_| {
            let u = rng.unit();
            let rank = cdf.partition_point(|&c| c < u).min(distinct - 1);
            rank_to_input[rank]
        })
        .collect()
}

/// One pass over the request sequence.
#[derive(Debug, Clone, Serialize)]
struct Pass {
    hot_budget_mib: f64,
    hot_bytes_mib: f64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    hot_hits: u64,
    cold_hits: u64,
    misses: u64,
    /// Each request's time, ms, in sequence order.
    #[serde(skip)]
    ms: Vec<f64>,
    /// Whether each request read its maps from the cold tier.
    #[serde(skip)]
    cold: Vec<bool>,
}

#[derive(Debug, Serialize)]
struct TierReport {
    command: String,
    commit: String,
    machine: String,
    date: String,
    model: String,
    distinct: usize,
    requests: usize,
    zipf: f64,
    /// Share of requests that go to the 10% most popular inputs.
    top10_share: f64,
    entry_tokens_median: usize,
    entry_mib_median: f64,
    all_entries_mib: f64,
    costs_us: [f64; 3],
    /// Mean forward pass per input during the warm-up and the all-hot pass, µs.
    forward_us: f64,
    target_loss: f64,
    chosen_mib: f64,
    predicted_slowdown: f64,
    predicted_miss_ratio: f64,
    all_hot: Pass,
    chosen: Pass,
    measured_slowdown: f64,
    /// The same request's time in the second pass minus the first, mean over requests that
    /// hit the hot tier in the second pass (drift between passes) and over those that read
    /// the cold tier, ms.
    paired_delta_hot_ms: f64,
    /// See `paired_delta_hot_ms`.
    paired_delta_cold_ms: f64,
    /// The slowdown the cold reads cause, drift removed: (cold-read requests' extra delta
    /// over hot ones) × their share / the first pass's mean.
    cold_slowdown: f64,
    ram_saved: f64,
    offline_chosen_mib: f64,
    offline_predicted_slowdown: f64,
}

async fn serve_pass(
    server: &LocalServer,
    texts: &[String],
    order: &[usize],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Pass> {
    let cache = &server.cache;
    let before = cache.counts();
    let mut ms = Vec::with_capacity(order.len());
    let mut cold = Vec::with_capacity(order.len());
    for &i in order {
        let cold_before = cache.counts().cold_hits;
        let started = Instant::now();
        server.embed(&texts[i]).await?;
        ms.push(started.elapsed().as_secs_f64() * 1e3);
        cold.push(cache.counts().cold_hits > cold_before);
        bar.inc(1);
    }
    let after = cache.counts();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Ok(Pass {
        hot_budget_mib: mib(cache.hot_tier_sizing().budget_bytes),
        hot_bytes_mib: mib(after.hot_bytes),
        mean_ms: stats::mean(&ms),
        p50_ms: stats::quantile(&ms, 0.5),
        p99_ms: stats::quantile(&ms, 0.99),
        hot_hits: after.hot_hits - before.hot_hits,
        cold_hits: after.cold_hits - before.cold_hits,
        misses: after.misses - before.misses,
        ms,
        cold,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    attncache_benches::logging::init();
    let args = Args::parse();
    let commit = provenance::git_commit();
    let wl = workloads::sentiment(
        &args.data.join("sentiment"),
        "sentiment-template",
        Kind::Redundant,
        workloads::CLASSIFY_PREFIX,
        Some(workloads::TEMPLATE),
        Sizes {
            store: args.distinct,
            calib: 0,
            test: 0,
        },
    )?;
    let texts: Vec<String> = wl
        .store
        .iter()
        .map(|e| format!("{}{}", wl.prefix, e.text))
        .collect();
    let order = zipf_sequence(texts.len(), args.requests, args.zipf, args.seed);
    let mut counts = vec![0usize; texts.len()];
    for &i in &order {
        counts[i] += 1;
    }
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let top = texts.len().div_ceil(10);
    let top10_share = counts[..top].iter().sum::<usize>() as f64 / order.len() as f64;

    let work = tempfile::tempdir()?;
    let trace = work.path().join("trace.csv");
    let cold = work.path().join("cold");
    let serve = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        args.model.to_str().context("model path is not UTF-8")?,
        "--attn-cache",
        "on",
        "--cache-dir",
        cold.to_str().context("temp path is not UTF-8")?,
        "--hot-mib",
        "4096",
        "--cold-mib",
        "16384",
        "--access-trace",
        trace.to_str().context("temp path is not UTF-8")?,
    ]);
    let server = LocalServer::start(&serve).await?;
    let cache = server.cache.clone();
    let bar = progress_bar(texts.len() + 2 * order.len(), "warm-up")?;
    let mut tokens = Vec::with_capacity(texts.len());
    for t in &texts {
        tokens.push(server.embed(t).await?.tokens as usize);
        bar.inc(1);
    }
    cache.flush();
    let all_entries = cache.counts().hot_bytes;
    bar.set_message("all hot");
    let all_hot = serve_pass(&server, &texts, &order, &bar).await?;
    cache.flush();
    let forward_us = cache.forward_ns_per_input() / 1e3;
    let trace_a = work.path().join("trace-all-hot.csv");
    std::fs::copy(&trace, &trace_a)?;

    // the server's own decision: costs measured here, reuse distances sampled so far
    tokens.sort_unstable();
    let median_tokens = tokens[tokens.len() / 2];
    let shape = server
        .model
        .entry_shape(median_tokens)
        .context("config.json gives no attention shape")?;
    let measured = costs::measure_cached(&shape, &cold, 9)?;
    cache.set_tier_costs(measured.cost_model());
    let decisions = cache
        .resize_hot_tier(args.target_loss)
        .context("tier costs are set")?;
    let decision = decisions.first().context("one scope")?;
    bar.set_message("chosen");
    let chosen = serve_pass(&server, &texts, &order, &bar).await?;
    bar.finish();

    let offline_out = args.out.join("tiers-offline.json");
    std::fs::create_dir_all(&args.out)?;
    let offline = tier_report::run(&SizeArgs {
        trace: trace_a,
        target_loss: args.target_loss,
        costs: Some(costs::cache_file(&cold)),
        hot_hit_us: None,
        cold_hit_us: None,
        miss_us: None,
        request_us: Some(forward_us),
        max_mib: None,
        out: offline_out.clone(),
    })?;
    std::fs::rename(
        offline_out.with_extension("svg"),
        args.out.join("tiers.svg"),
    )?;

    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    let deltas = |cold: bool| -> Vec<f64> {
        all_hot
            .ms
            .iter()
            .zip(&chosen.ms)
            .zip(&chosen.cold)
            .filter(|(_, c)| **c == cold)
            .map(|((a, b), _)| b - a)
            .collect()
    };
    let (d_hot, d_cold) = (deltas(false), deltas(true));
    let (paired_delta_hot_ms, paired_delta_cold_ms) = (stats::mean(&d_hot), stats::mean(&d_cold));
    let cold_share = d_cold.len() as f64 / order.len() as f64;
    let cold_slowdown = if d_cold.is_empty() {
        0.0
    } else {
        (paired_delta_cold_ms
            - if d_hot.is_empty() {
                0.0
            } else {
                paired_delta_hot_ms
            })
            * cold_share
            / all_hot.mean_ms
    };
    let report = TierReport {
        paired_delta_hot_ms,
        paired_delta_cold_ms,
        cold_slowdown,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        commit,
        machine: provenance::machine(),
        date: provenance::now_utc(),
        model: server.model.name(),
        distinct: texts.len(),
        requests: order.len(),
        zipf: args.zipf,
        top10_share,
        entry_tokens_median: median_tokens,
        entry_mib_median: mib(shape.map_bytes()),
        all_entries_mib: mib(all_entries),
        costs_us: [
            measured.hot_hit_ns / 1e3,
            measured.cold_hit_ns / 1e3,
            measured.miss_ns / 1e3,
        ],
        forward_us,
        target_loss: args.target_loss,
        chosen_mib: mib(decision.hot_bytes),
        predicted_slowdown: decision.predicted_slowdown,
        predicted_miss_ratio: decision.predicted_miss_ratio,
        measured_slowdown: chosen.mean_ms / all_hot.mean_ms - 1.0,
        ram_saved: 1.0 - chosen.hot_bytes_mib / all_hot.hot_bytes_mib.max(1e-9),
        all_hot,
        chosen,
        offline_chosen_mib: mib(offline.chosen_bytes),
        offline_predicted_slowdown: offline.chosen_slowdown,
    };
    std::fs::write(
        args.out.join("tiers.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = markdown(&report);
    std::fs::write(args.out.join("tiers.md"), &md)?;
    println!("{md}");
    Ok(())
}

fn markdown(r: &TierReport) -> String {
    let row = |name: &str, p: &Pass| {
        format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |\n",
            p.hot_budget_mib,
            p.hot_bytes_mib,
            p.mean_ms,
            p.p50_ms,
            p.p99_ms,
            p.hot_hits,
            p.cold_hits,
            p.misses
        )
    };
    format!(
        "# Hot-tier sizing on {model} (`make tier-eval`)\n\n\
`{cmd}` — commit {commit}, {machine}, {date}\n\n\
Workload: {distinct} distinct template-wrapped sentiment texts (median {tok} tokens, \
{entry:.2} MiB of maps each, {all:.1} MiB in all), {req} requests with Zipf({zipf}) \
popularity: the 10% most popular inputs get {top:.0}% of the requests. Tier costs measured \
here: hot hit {h:.0} µs, cold hit {c:.0} µs, miss {mi:.0} µs; a forward pass takes \
{fw:.0} µs per input (the slowdown's denominator).\n\n\
| pass | hot budget MiB | hot MiB used | mean ms | p50 ms | p99 ms | hot hits | cold hits | misses |\n\
|---|---|---|---|---|---|---|---|---|\n{a}{b}\n\
- chosen size: **{chosen:.1} MiB** (target loss {target:.0}%, predicted slowdown \
{pred:.2}%, predicted hot-tier miss ratio {pmiss:.3})\n\
- measured slowdown (mean latency, chosen vs all hot, same requests): **{meas:+.2}%**; \
the same request's second time minus its first: {dh:+.2} ms where it hit RAM (drift between \
the passes), {dc:+.2} ms where it read the cold tier; slowdown due to cold reads, drift \
removed: **{cs:+.2}%**\n\
- RAM saved against all hot: **{saved:.0}%**\n\
- offline `attncache size` on the first pass's trace: {off:.1} MiB (predicted {offp:.2}%); \
curve in `tiers.svg`\n",
        model = r.model,
        cmd = r.command,
        commit = r.commit,
        machine = r.machine,
        date = r.date,
        distinct = r.distinct,
        tok = r.entry_tokens_median,
        entry = r.entry_mib_median,
        all = r.all_entries_mib,
        req = r.requests,
        zipf = r.zipf,
        top = 100.0 * r.top10_share,
        h = r.costs_us[0],
        c = r.costs_us[1],
        mi = r.costs_us[2],
        fw = r.forward_us,
        a = row("all hot", &r.all_hot),
        b = row("chosen", &r.chosen),
        chosen = r.chosen_mib,
        target = 100.0 * r.target_loss,
        pred = 100.0 * r.predicted_slowdown,
        pmiss = r.predicted_miss_ratio,
        meas = 100.0 * r.measured_slowdown,
        dh = r.paired_delta_hot_ms,
        dc = r.paired_delta_cold_ms,
        cs = 100.0 * r.cold_slowdown,
        saved = 100.0 * r.ram_saved,
        off = r.offline_chosen_mib,
        offp = 100.0 * r.offline_predicted_slowdown,
    )
}
