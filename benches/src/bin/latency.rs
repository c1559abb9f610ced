//! End-to-end `/v1/embeddings` latency of one model, four ways, interleaved in one run:
//!
//! - `stock`: mistral.rs's own CPU attention (hook present, declining);
//! - `fast`: our exact matrix-multiply attention;
//! - `miss`: cache on, an input never seen (computed exactly and its maps recorded);
//! - `hit`: cache on, an input seen before (its maps reused, q/k projections skipped).
//!
//! Every round sends one request of each kind for each length, in rotating order, so slow
//! phases of a noisy machine hit all columns alike. Ratios are of medians.

use std::time::Instant;

use attncache_plugin::ExactAttention;
use attncache_server::cli::ServeArgs;
use attncache_server::local_server::{cosine, LocalServer};
use clap::Parser;

/// Measures /v1/embeddings latency: stock vs fast exact attention vs cache miss vs cache hit.
#[derive(Debug, Parser)]
#[command(name = "attncache-latency")]
struct Args {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = attncache_server::cli::default_model_dir())]
    model: std::path::PathBuf,
    /// Approximate input lengths in words (≈1.2 tokens per word for EmbeddingGemma).
    #[arg(long, value_delimiter = ',', default_value = "125,500")]
    words: Vec<usize>,
    /// Rounds; each round sends one request per kind and length.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
}

use attncache_benches::synthetic::text_of;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Stock,
    Fast,
    Miss,
    Hit,
}

const KINDS: [Kind; 4] = [Kind::Stock, Kind::Fast, Kind::Miss, Kind::Hit];

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let model = args
        .model
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("model path is not UTF-8"))?;
    let serve =
        ServeArgs::parse_from(["attncache-server", "--model", model, "--attn-cache", "off"]);
    let server = LocalServer::start(&serve).await?;
    let hook = server.hook.clone();
    let cache = server.cache.clone();
    let post = |text: String| {
        let server = &server;
        async move {
            let started = Instant::now();
            let e = server.embed(&text).await?;
            Ok::<_, anyhow::Error>((started.elapsed().as_secs_f64() * 1e3, e.tokens, e.embedding))
        }
    };

    let total = args.rounds * args.words.len() * KINDS.len() + args.words.len();
    let bar = attncache_server::progress::styled_bar(
        total,
        "{bar:40} {pos}/{len} requests {elapsed_precise} (eta {eta})",
    )?;
    let mut results = Vec::new();
    for &words in &args.words {
        // warm up and record the input the `hit` column will repeat
        hook.set_exact_attention(ExactAttention::Fast);
        cache.set_enabled_by_default(true);
        let (_, tokens, _) = post(text_of(words, 0)).await?;
        bar.inc(1);
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
        for round in 0..args.rounds {
            for j in 0..KINDS.len() {
                let k = (round + j) % KINDS.len();
                let kind = KINDS[k];
                let (exact, cached, text) = match kind {
                    Kind::Stock => (ExactAttention::Stock, false, text_of(words, 1)),
                    Kind::Fast => (ExactAttention::Fast, false, text_of(words, 1)),
                    Kind::Miss => (ExactAttention::Fast, true, text_of(words, 1000 + round)),
                    Kind::Hit => (ExactAttention::Fast, true, text_of(words, 0)),
                };
                hook.set_exact_attention(exact);
                cache.set_enabled_by_default(cached);
                let (ms, _, _) = post(text).await?;
                times[k].push(ms);
                bar.inc(1);
            }
        }
        // fidelity, same run: stock vs fast on one input; hit vs fast on the repeated one
        let embed = |exact: ExactAttention, cached: bool, variant: usize| {
            hook.set_exact_attention(exact);
            cache.set_enabled_by_default(cached);
            post(text_of(words, variant))
        };
        let (_, _, stock) = embed(ExactAttention::Stock, false, 1).await?;
        let (_, _, fast) = embed(ExactAttention::Fast, false, 1).await?;
        let (_, _, fast0) = embed(ExactAttention::Fast, false, 0).await?;
        let (_, _, hit0) = embed(ExactAttention::Fast, true, 0).await?;
        let fidelity = (
            cosine(&stock, &fast),
            max_abs(&stock, &fast),
            cosine(&fast0, &hit0),
            max_abs(&fast0, &hit0),
        );
        results.push((words, tokens, times, fidelity));
    }
    bar.finish_and_clear();
    println!("model: {}", args.model.display());
    println!(
        "rounds: {} (interleaved), one input per request, median ms",
        args.rounds
    );
    println!(
        "{:>6} {:>7} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>11}",
        "words", "tokens", "stock", "fast", "miss", "hit", "stock/fast", "fast/hit", "miss/fast"
    );
    let mut fidelity_rows = Vec::new();
    for (words, tokens, mut times, fidelity) in results {
        fidelity_rows.push((tokens, fidelity));
        let m: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        println!(
            "{words:>6} {tokens:>7} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>11.2} {:>11.2} {:>11.2}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[0] / m[1],
            m[1] / m[3],
            m[2] / m[1]
        );
    }
    for (tokens, (cs, ds, ch, dh)) in fidelity_rows {
        println!("{tokens:>6} tokens: fast vs stock cosine {cs:.7} max|diff| {ds:.2e}; hit vs fast cosine {ch:.7} max|diff| {dh:.2e}");
    }
    let c = cache.counts();
    println!(
        "cache: {} lookups, {} hits, {} recorded, mean lookup {:.1} µs, hot {} entries / {:.1} MiB",
        c.lookups,
        c.hits,
        c.recorded,
        c.lookup_ns as f64 / c.lookups.max(1) as f64 / 1e3,
        c.hot_entries,
        c.hot_bytes as f64 / (1 << 20) as f64
    );
    attncache_plugin::uninstall();
    Ok(())
}
