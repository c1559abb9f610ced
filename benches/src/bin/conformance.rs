//! `make conformance`: every committed reference embedding of EmbeddingGemma (computed by
//! sentence-transformers over transformers' Gemma-3, `scripts/reference-embeddings`) against
//! what `attncache-server` serves for the same text:
//!
//! - flag off, `--exact-attention stock` (mistral.rs's kernel) and `fast` (ours): the
//!   definition of exact, cosine ≥ 0.99999 at every length;
//! - flag on, `fast`: the recording miss, then the map hit on the same tokens (stored f16
//!   maps reused) for every input the cache stores (`--cache-max-tokens`).
//!
//! Writes `benches/results/conformance.json` (`min_cos`, `min_cos_over_257`, `texts`,
//! `max_tokens`, per mode and per input) and exits non-zero when a bound is missed.

use std::path::PathBuf;

use attncache_plugin::ExactAttention;
use attncache_server::cli::ServeArgs;
use attncache_server::local_server::{cosine, LocalServer};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Checks the served EmbeddingGemma embeddings against the committed reference vectors.
#[derive(Debug, Parser)]
#[command(name = "attncache-conformance")]
struct Args {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = attncache_server::cli::default_model_dir())]
    model: PathBuf,
    /// Reference vectors written by `scripts/reference-embeddings`.
    #[arg(long, default_value = "benches/reference/embeddinggemma.json")]
    reference: PathBuf,
    /// Where the report goes.
    #[arg(long, default_value = "benches/results/conformance.json")]
    out: PathBuf,
    /// Smallest cosine to the reference every served embedding must reach.
    #[arg(long, default_value_t = 0.99999)]
    min_cos: f64,
}

#[derive(Deserialize)]
struct Reference {
    reference: serde_json::Value,
    model: serde_json::Value,
    inputs: Vec<ReferenceInput>,
}

#[derive(Deserialize)]
struct ReferenceInput {
    name: String,
    text: String,
    tokens: usize,
    embedding: Vec<f32>,
}

/// How one input compared, in one mode.
#[derive(Serialize, Clone, Copy)]
struct Comparison {
    cos: f64,
    max_abs_diff: f32,
}

#[derive(Serialize)]
struct InputReport {
    name: String,
    tokens: usize,
    stock: Comparison,
    fast: Comparison,
    /// `None` when the cache does not store inputs this long.
    cache_miss: Option<Comparison>,
    cache_hit: Option<Comparison>,
}

#[derive(Serialize)]
struct ModeSummary {
    inputs: usize,
    min_cos: f64,
    min_cos_over_257: Option<f64>,
    max_abs_diff: f32,
}

fn compare(ours: &[f32], reference: &[f32]) -> anyhow::Result<Comparison> {
    anyhow::ensure!(
        ours.len() == reference.len(),
        "dimension {} vs reference {}",
        ours.len(),
        reference.len()
    );
    let max_abs_diff = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    Ok(Comparison {
        cos: cosine(ours, reference),
        max_abs_diff,
    })
}

fn summary<'a>(rows: impl Iterator<Item = (usize, &'a Comparison)>) -> ModeSummary {
    let rows: Vec<_> = rows.collect();
    let min = |over: usize| {
        rows.iter()
            .filter(|(t, _)| *t > over)
            .map(|(_, c)| c.cos)
            .reduce(f64::min)
    };
    ModeSummary {
        inputs: rows.len(),
        min_cos: min(0).unwrap_or(f64::NAN),
        min_cos_over_257: min(257),
        max_abs_diff: rows.iter().map(|(_, c)| c.max_abs_diff).fold(0.0, f32::max),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let reference: Reference = serde_json::from_str(&std::fs::read_to_string(&args.reference)?)?;
    let model = args
        .model
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("model path is not UTF-8"))?;
    let serve =
        ServeArgs::parse_from(["attncache-server", "--model", model, "--attn-cache", "off"]);
    let max_cached = usize::try_from(serve.cache_max_tokens())?;
    let server = LocalServer::start(&serve).await?;
    let (hook, cache) = (server.hook.clone(), server.cache.clone());

    let n = reference.inputs.len();
    let bar = attncache_server::progress::styled_bar(
        4 * n,
        "{bar:40} {pos}/{len} embeddings {elapsed_precise} (eta {eta})",
    )?;
    let mut rows = Vec::with_capacity(n);
    for input in &reference.inputs {
        let embed = |exact: ExactAttention, cached: bool| {
            hook.set_exact_attention(exact);
            cache.set_enabled_by_default(cached);
            let text = input.text.clone();
            let server = &server;
            async move { server.embed(&text).await }
        };
        let stock = embed(ExactAttention::Stock, false).await?;
        bar.inc(1);
        anyhow::ensure!(
            stock.tokens as usize == input.tokens,
            "{}: we count {} tokens, the reference {}",
            input.name,
            stock.tokens,
            input.tokens
        );
        let fast = embed(ExactAttention::Fast, false).await?;
        bar.inc(1);
        let (cache_miss, cache_hit) = if input.tokens <= max_cached {
            let miss = embed(ExactAttention::Fast, true).await?;
            bar.inc(1);
            let hit = embed(ExactAttention::Fast, true).await?;
            bar.inc(1);
            (
                Some(compare(&miss.embedding, &input.embedding)?),
                Some(compare(&hit.embedding, &input.embedding)?),
            )
        } else {
            bar.inc(2);
            (None, None)
        };
        rows.push(InputReport {
            name: input.name.clone(),
            tokens: input.tokens,
            stock: compare(&stock.embedding, &input.embedding)?,
            fast: compare(&fast.embedding, &input.embedding)?,
            cache_miss,
            cache_hit,
        });
    }
    bar.finish_and_clear();
    let counts = cache.counts();
    attncache_plugin::uninstall();

    let modes = serde_json::json!({
        "stock": summary(rows.iter().map(|r| (r.tokens, &r.stock))),
        "fast": summary(rows.iter().map(|r| (r.tokens, &r.fast))),
        "fast_cache_miss": summary(rows.iter().filter_map(|r| r.cache_miss.as_ref().map(|c| (r.tokens, c)))),
        "fast_cache_hit": summary(rows.iter().filter_map(|r| r.cache_hit.as_ref().map(|c| (r.tokens, c)))),
    });
    // the headline figures are the exact path's (flag off), over both exact modes
    let exact = summary(
        rows.iter()
            .flat_map(|r| [(r.tokens, &r.stock), (r.tokens, &r.fast)]),
    );
    let all_modes = rows.iter().flat_map(|r| {
        [
            Some(&r.stock),
            Some(&r.fast),
            r.cache_miss.as_ref(),
            r.cache_hit.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(move |c| (r.name.as_str(), r.tokens, c))
    });
    let failures: Vec<String> = all_modes
        .filter(|(_, _, c)| c.cos < args.min_cos)
        .map(|(name, tokens, c)| format!("{name} ({tokens} tokens): cosine {:.7}", c.cos))
        .collect();
    let report = serde_json::json!({
        "min_cos": exact.min_cos,
        "min_cos_over_257": exact.min_cos_over_257,
        "max_abs_diff": exact.max_abs_diff,
        "texts": n,
        "max_tokens": rows.iter().map(|r| r.tokens).max().unwrap_or(0),
        "bound": args.min_cos,
        "passed": failures.is_empty(),
        "cache": {"max_tokens": max_cached, "hits": counts.hits, "recorded": counts.recorded},
        "modes": modes,
        "reference": reference.reference,
        "model": reference.model,
        "commit": attncache_benches::provenance::git_commit(),
        "machine": attncache_benches::provenance::machine(),
        "time": attncache_benches::provenance::now_utc(),
        "inputs": rows,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)? + "\n")?;

    println!("reference: {}", args.reference.display());
    println!(
        "{:<28} {:>6} {:>11} {:>11} {:>11} {:>11}",
        "input", "tokens", "stock", "fast", "cache miss", "cache hit"
    );
    let cell = |c: Option<&Comparison>| c.map_or("-".to_string(), |c| format!("{:.8}", c.cos));
    for r in &rows {
        println!(
            "{:<28} {:>6} {:>11} {:>11} {:>11} {:>11}",
            r.name,
            r.tokens,
            cell(Some(&r.stock)),
            cell(Some(&r.fast)),
            cell(r.cache_miss.as_ref()),
            cell(r.cache_hit.as_ref())
        );
    }
    println!(
        "exact (flag off): min cosine {:.8}, over 257 tokens {}, max |diff| {:.2e}; {} texts up to {} tokens; wrote {}",
        exact.min_cos,
        exact
            .min_cos_over_257
            .map_or("-".into(), |c| format!("{c:.8}")),
        exact.max_abs_diff,
        n,
        report["max_tokens"],
        args.out.display()
    );
    anyhow::ensure!(
        failures.is_empty(),
        "below cosine {}: {}",
        args.min_cos,
        failures.join("; ")
    );
    Ok(())
}
