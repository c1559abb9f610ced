//! `attncache-eval` (`make eval`): speedup, hit rate, fidelity and task accuracy of the
//! attention-map cache on real workloads, with EmbeddingGemma-300M served through the real
//! `/v1/embeddings` pipeline.
//!
//! Per workload (see `workloads.rs`), in one fresh server with a cold tier on disk:
//!
//! 1. **warm-up**: the store split is embedded with the cache on and identical-input reuse
//!    only, so every input's maps are recorded and its embedding is exact;
//! 2. **calibration**: every calibration input is embedded exactly and with the maps of its
//!    nearest stored input of the same length; the threshold is the largest feature distance
//!    whose reuses keep mean cosine ≥ `--target` and none below `--floor` (nothing is recorded);
//! 3. **sweep pass**: every test input, with the maps of its nearest stored input whatever the
//!    distance (nothing recorded) — the threshold sweep is composed from these;
//! 4. **served run**: every test input three times, rotating the order: stock attention
//!    (cache off), our exact attention (cache off), cache on at the calibrated threshold
//!    (misses recorded as in a deployment). Latency, hit rate, fidelity and accuracy come
//!    from this run.
//!
//! A logistic head is trained on the exact embeddings of the store and calibration splits
//! and scores the test embeddings of each column.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use attncache_benches::layer_attention::LayerCase;
use attncache_benches::provenance;
use attncache_benches::report::{
    self, AttentionTiming, DbSizeReport, ErrorBucket, Floor, LeverReport, ParetoBest, Report,
    SweepPoint, WorkloadReport,
};
use attncache_benches::stats::{self, Fidelity};
use attncache_benches::workloads::{self, Kind, Sizes, Workload};
use attncache_plugin::{Decision, ErrorGate, ExactAttention, GatePoint, Outcome, ReusePolicy};
use attncache_server::classifier::Classifier;
use attncache_server::cli::ServeArgs;
use attncache_server::{
    local_server::{cosine, LocalServer},
    progress::progress_bar,
};
use clap::Parser;

mod scoring;
mod summary;
mod workload;

use scoring::{db_size_stage, Scoring};
use summary::{summarize, write_default_gate};
use workload::run_workload;

/// Evaluates the attention-map cache: stock vs exact vs cache, hit rate, fidelity, accuracy.
#[derive(Debug, Parser)]
#[command(name = "attncache-eval")]
struct Args {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = attncache_server::cli::default_model_dir())]
    model: PathBuf,
    /// Data directory holding `sentiment/` (scripts/fetch-data) and `spam-assassin/`
    /// (scripts/fetch-spam).
    #[arg(long, default_value_os_t = workloads::default_data_dir())]
    data: PathBuf,
    /// Workloads to run: sentiment-variants and spam-variants (near-duplicates:
    /// redundant), sentiment-template and spam (a shared template or genre: templated),
    /// sentiment (diverse).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "sentiment-variants,spam-variants,sentiment-template,sentiment,spam"
    )]
    workloads: Vec<String>,
    /// Levers measured side by side on the sentiment workloads: `all` (every layer's maps)
    /// `layers=N` (the N least sensitive layers, measured on the calibration split) or
    /// `heads=N` (the N least sensitive (layer, head) maps, measured likewise), optionally `+recompute` (recompute the rows of differing tokens) and `+BUDGET` (that
    /// many more rows next to them).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_lever,
        default_value = "all,all+slack=2,layers=6+slack=2,layers=12+slack=2,heads=18+slack=2,heads=36+slack=2,all+recompute+8+slack=2,layers=12+recompute+slack=2"
    )]
    levers: Vec<LeverSpec>,
    /// Levers measured on the spam workloads (their emails are long: each lever costs a pass).
    #[arg(long, value_delimiter = ',', value_parser = parse_lever, default_value = "all+slack=2,layers=6+slack=2,layers=12+slack=2,heads=36+slack=2")]
    spam_levers: Vec<LeverSpec>,
    /// Lever 4: on the diverse workload, grow a store to these many inputs (its store split,
    /// then `nlp-corpus` sentences) and measure hit rate and fidelity at each size. Empty:
    /// skip.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    db_sizes: Vec<usize>,
    /// Levers measured at each database size (among --levers).
    #[arg(long, value_delimiter = ',', value_parser = parse_lever, default_value = "all+slack=2,layers=12+slack=2")]
    db_levers: Vec<LeverSpec>,
    /// Calibration inputs (with a neighbour) that measure each layer's sensitivity.
    #[arg(long, default_value_t = 12)]
    sensitivity_inputs: usize,
    /// Target error (1 − cosine) recorded in the fitted gates (the sweep tries many).
    #[arg(long, default_value_t = 0.01)]
    max_error: f64,
    /// Residual quantile of the gate's margin: its prediction bounds this share of the
    /// calibration pairs.
    #[arg(long, default_value_t = 0.9)]
    gate_quantile: f64,
    /// Sentiment workloads: inputs in the warm-up store.
    #[arg(long, default_value_t = 600)]
    store: usize,
    /// Sentiment workloads: calibration inputs.
    #[arg(long, default_value_t = 120)]
    calib: usize,
    /// Sentiment workloads: test inputs.
    #[arg(long, default_value_t = 200)]
    test: usize,
    /// Spam workload: emails in the warm-up store.
    #[arg(long, default_value_t = 240)]
    spam_store: usize,
    /// Spam workload: calibration emails.
    #[arg(long, default_value_t = 40)]
    spam_calib: usize,
    /// Spam workload: test emails.
    #[arg(long, default_value_t = 100)]
    spam_test: usize,
    /// Inputs longer than this many tokens (prefix included) are cut, as embedding servers
    /// truncate to a maximum length.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Mean cosine the served configuration's calibration reuses must keep.
    #[arg(long, default_value_t = 0.99)]
    target: f64,
    /// The served configuration's calibration hits: at least this share of the split.
    #[arg(long, default_value_t = 0.03)]
    min_calib_hits: f64,
    /// The served configuration's estimated gain on the calibration split (lookups counted):
    /// at least this (0.01: 1%); otherwise similarity lookups are not worth their cost.
    #[arg(long, default_value_t = 0.01)]
    min_gain: f64,
    /// No calibration reuse of the served configuration may fall below this cosine.
    #[arg(long, default_value_t = 0.98)]
    floor: f64,
    /// Hot-tier RAM budget, MiB (the rest of the entries live in the cold tier on disk).
    #[arg(long, default_value_t = 512)]
    hot_mib: u64,
    /// Repetitions of each one-layer attention timing.
    #[arg(long, default_value_t = 30)]
    attention_reps: usize,
    /// Where the results go (`latest.{json,md}`, `eval.svg`; git keeps earlier runs).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Where the Pareto-best safe gate goes (the configuration `make serve` loads with
    /// --error-gate when no projector is trained).
    #[arg(long, default_value = "config/gate-default.json")]
    gate_out: PathBuf,
    /// Measure nothing: redraw the Markdown table and the plot of a saved result JSON
    /// (written next to it as .md and .svg).
    #[arg(long)]
    replot: Option<PathBuf>,
}

/// One test input's measurements in the served run.
#[derive(Debug, Clone)]
struct Row {
    label: u32,
    tokens: u64,
    stock_ms: f64,
    exact_ms: f64,
    cache_ms: f64,
    stock: Vec<f32>,
    exact: Vec<f32>,
    cache: Vec<f32>,
    /// Served run: outcome of the cache-on request.
    outcome: Outcome,
    lookup_ns: u64,
}

/// One input embedded with its best-ranked neighbour's maps under one lever.
#[derive(Debug, Clone)]
struct Forced {
    ms: f64,
    /// The same input on the exact path, timed next to it (alternating order), so a lever's
    /// speedup is a ratio of neighbouring measurements, free of the machine's drift.
    exact_ms: f64,
    embedding: Vec<f32>,
    decision: Decision,
}

/// A lever as named on the command line: `all`, `layers=N` or `heads=N`, then
/// `+recompute` and an optional `+BUDGET`, and `+slack=N`.
#[derive(Debug, Clone)]
struct LeverSpec {
    name: String,
    layers: Option<usize>,
    heads: Option<usize>,
    recompute: bool,
    budget: usize,
    slack: usize,
}

fn parse_lever(s: &str) -> Result<LeverSpec, String> {
    let mut parts = s.split('+');
    let count = |p: &str, prefix: &str| {
        p[prefix.len()..]
            .parse::<usize>()
            .map_err(|e| format!("{s:?}: {e}"))
    };
    let (layers, heads) = match parts.next() {
        Some("all") => (None, None),
        Some(p) if p.starts_with("layers=") => (Some(count(p, "layers=")?), None),
        Some(p) if p.starts_with("heads=") => (None, Some(count(p, "heads=")?)),
        _ => {
            return Err(format!(
                "{s:?}: a lever starts with `all`, `layers=N` or `heads=N`"
            ))
        }
    };
    let (mut recompute, mut budget, mut slack) = (false, 0, 0);
    for p in parts {
        match p {
            "recompute" => recompute = true,
            n if n.starts_with("slack=") => {
                slack = n["slack=".len()..]
                    .parse()
                    .map_err(|e| format!("{s:?}: {e}"))?
            }
            n if recompute => budget = n.parse().map_err(|e| format!("{s:?}: {e}"))?,
            _ => {
                return Err(format!(
                    "{s:?}: expected `+recompute[+BUDGET]` or `+slack=N`"
                ))
            }
        }
    }
    Ok(LeverSpec {
        name: s.to_string(),
        layers,
        heads,
        recompute,
        budget,
        slack,
    })
}

impl LeverSpec {
    /// The policy, with the `n` least sensitive layers for `layers=N`, or (layer, head)
    /// maps for `heads=N`.
    fn policy(&self, least_sensitive_first: &[usize], heads_first: &[[usize; 2]]) -> ReusePolicy {
        let mut layers: Vec<usize> = match self.layers {
            Some(n) => least_sensitive_first.iter().take(n).copied().collect(),
            None => Vec::new(),
        };
        layers.sort_unstable();
        let mut heads: Vec<[usize; 2]> = match self.heads {
            Some(n) => heads_first.iter().take(n).copied().collect(),
            None => Vec::new(),
        };
        heads.sort_unstable();
        ReusePolicy {
            layers,
            heads,
            recompute_differing: self.recompute,
            recompute_budget: self.budget,
            length_slack: self.slack,
            ..ReusePolicy::default()
        }
    }
}

/// Upper ends of the differing-share buckets the reuse error is reported by.
const ERROR_BUCKETS: [f64; 6] = [0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Target errors of each lever's sweep (`1 − cosine`).
const TARGETS: [f64; 11] = [
    1e-4, 3e-4, 1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 1.0,
];

/// Whether input `i` takes its neighbour's maps at `target` under `gate`.
fn reuses(f: &Forced, gate: Option<&ErrorGate>, target: Option<f64>) -> bool {
    let d = &f.decision;
    match d.outcome {
        Outcome::ExactHit => true,
        Outcome::NearHit => match (gate, target) {
            (Some(g), Some(t)) => {
                g.predict(
                    d.distance.unwrap_or(f32::NAN),
                    d.differing.unwrap_or(u32::MAX) as usize,
                    d.tokens,
                ) <= t
            }
            _ => false,
        },
        Outcome::Miss | Outcome::NotCached => false,
    }
}

/// Mean lookup time of a pass, ms (what a miss pays for looking up).
fn mean_lookup_ms_of(pass: &[Forced]) -> f64 {
    pass.iter()
        .map(|f| f.decision.lookup_ns as f64 / 1e6)
        .sum::<f64>()
        / pass.len().max(1) as f64
}

/// The measured error `1 − cosine` of each near hit, with its gate predictors.
fn gate_points(forced: &[Forced], exact: &[Vec<f32>]) -> Vec<(GatePoint, usize)> {
    forced
        .iter()
        .zip(exact)
        .enumerate()
        .filter(|(_, (f, _))| f.decision.outcome == Outcome::NearHit)
        .map(|(i, (f, e))| {
            let d = &f.decision;
            let point = GatePoint {
                distance: d.distance.unwrap_or(f32::NAN),
                differing: d.differing.unwrap_or(0) as usize,
                tokens: d.tokens,
                loss: 1.0 - cosine(e, &f.embedding),
            };
            (point, i)
        })
        .collect()
}

fn spearman_of(gate: Option<&ErrorGate>, points: &[(GatePoint, usize)]) -> Option<f64> {
    let gate = gate?;
    (points.len() >= 3).then(|| {
        let pred: Vec<f64> = points
            .iter()
            .map(|(p, _)| gate.score(p.distance, p.differing, p.tokens))
            .collect();
        let real: Vec<f64> = points.iter().map(|(p, _)| p.loss).collect();
        attncache_plugin::lookup::error_gate::spearman(&pred, &real)
    })
}

/// `text` cut to at most `max` tokens (without special tokens), at a token boundary.
fn truncate(tok: &tokenizers::Tokenizer, text: &str, max: usize) -> anyhow::Result<String> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let Some(&(mut cut, _)) = enc.get_offsets().get(max) else {
        return Ok(text.to_string());
    };
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    Ok(text[..cut].trim_end().to_string())
}

/// Median time of `f` in ms over `reps` calls.
fn median_ms(reps: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(stats::quantile(&t, 0.5))
}

fn attention_timings(reps: usize) -> anyhow::Result<Vec<AttentionTiming>> {
    let mut out = Vec::new();
    for tokens in [128, 256, 512] {
        let case = LayerCase::new(tokens)?;
        // warm the allocator and caches once, then alternate short bursts
        case.exact()?;
        case.hit()?;
        let (mut stock, mut exact, mut hit) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps.div_ceil(5) {
            stock.push(median_ms(5, || Ok(case.stock().map(drop)?))?);
            exact.push(median_ms(5, || Ok(case.exact().map(drop)?))?);
            hit.push(median_ms(5, || Ok(case.hit().map(drop)?))?);
        }
        let (s, e, h) = (
            stats::quantile(&stock, 0.5),
            stats::quantile(&exact, 0.5),
            stats::quantile(&hit, 0.5),
        );
        out.push(AttentionTiming {
            tokens,
            stock_ms: s,
            exact_ms: e,
            hit_ms: h,
            speedup: e / h,
        });
    }
    Ok(out)
}

/// Reuse any of these outcomes means the maps came from the store.
fn is_hit(o: Outcome) -> bool {
    matches!(o, Outcome::ExactHit | Outcome::NearHit)
}

/// An in-process server with the cache on, its cold tier in `cold_dir` (`cold_mib` MiB).
async fn start_server(
    args: &Args,
    cold_dir: &std::path::Path,
    cold_mib: u64,
) -> anyhow::Result<LocalServer> {
    let model = args.model.to_str().context("model path is not UTF-8")?;
    let cold_dir = cold_dir.to_str().context("temp path is not UTF-8")?;
    let (hot, cold) = (args.hot_mib.to_string(), cold_mib.to_string());
    let serve = ServeArgs::parse_from([
        "attncache-server",
        "--model",
        model,
        "--attn-cache",
        "on",
        "--cache-dir",
        cold_dir,
        "--hot-mib",
        &hot,
        "--cold-mib",
        &cold,
    ]);
    LocalServer::start(&serve).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    attncache_benches::logging::init();
    let args = Args::parse();
    if let Some(json) = &args.replot {
        let text =
            std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
        let mut r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an attncache-eval result", json.display()))?;
        // the summary is derived from the measurements: recompute it with this binary's rules
        summarize(&mut r);
        std::fs::write(json, serde_json::to_string_pretty(&r)?)?;
        if let Some(dir) = json.parent() {
            write_default_gate(&r, dir)?;
        }
        std::fs::write(json.with_extension("md"), report::markdown(&r))?;
        std::fs::write(json.with_file_name("eval.svg"), report::plot(&r))?;
        println!(
            "redrawn: {} and eval.svg beside it",
            json.with_extension("md").display()
        );
        return Ok(());
    }
    let started = Instant::now();
    // the tree the binary was built from, before anything can change during the run
    let commit = provenance::git_commit();
    let tok = tokenizers::Tokenizer::from_file(args.model.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("loading the tokenizer of {}: {e}", args.model.display()))?;
    let sizes = Sizes {
        store: args.store,
        calib: args.calib,
        test: args.test,
    };
    let sentiment_dir = args.data.join("sentiment");
    let spam_dir = args.data.join("spam-assassin");
    let spam_sizes = Sizes {
        store: args.spam_store,
        calib: args.spam_calib,
        test: args.spam_test,
    };
    let mut loads = Vec::new();
    for name in &args.workloads {
        loads.push(match name.as_str() {
            "spam" => workloads::spam(&spam_dir, workloads::CLASSIFY_PREFIX, spam_sizes)?,
            "sentiment-template" => workloads::sentiment(
                &sentiment_dir,
                name,
                Kind::Templated,
                workloads::CLASSIFY_PREFIX,
                Some(workloads::TEMPLATE),
                sizes,
            )?,
            "sentiment" => {
                workloads::sentiment(&sentiment_dir, name, Kind::Diverse, "", None, sizes)?
            }
            "spam-variants" => {
                workloads::spam_variants(&spam_dir, workloads::CLASSIFY_PREFIX, spam_sizes)?
            }
            "sentiment-variants" => workloads::sentiment_variants(
                &sentiment_dir,
                workloads::CLASSIFY_PREFIX,
                sizes,
            )?,
            other => {
                anyhow::bail!("unknown workload {other:?}: sentiment-variants, spam-variants, spam, sentiment-template or sentiment")
            }
        });
    }
    let levers_of = |w: &Workload| {
        if w.name.starts_with("spam") {
            &args.spam_levers
        } else {
            &args.levers
        }
    };
    // warm-up, exact calibration, one calibration pass, a test pass per lever, served run
    let steps: usize = loads
        .iter()
        .map(|w| w.store.len() + 2 * w.calib.len() + (3 + levers_of(w).len()) * w.test.len())
        .sum();
    let bar = progress_bar(steps, "eval")?;
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{msg:28} {bar:30} {pos}/{len} requests {elapsed_precise} (eta {eta})",
    )?);
    let mut reports = Vec::new();
    for wl in &loads {
        reports.push(run_workload(&args, wl, levers_of(wl), &tok, &bar).await?);
    }
    bar.set_message("one-layer attention");
    let attention = attention_timings(args.attention_reps)?;
    bar.finish_and_clear();

    let total = |f: &dyn Fn(&WorkloadReport) -> f64, only: Option<Kind>| {
        reports
            .iter()
            .filter(|w| only.is_none_or(|k| w.kind == k))
            .map(f)
            .sum::<f64>()
    };
    let exact_total = |only| total(&|w| w.exact.mean_ms * w.test as f64, only);
    let cache_total = |only| total(&|w| w.cache.mean_ms * w.test as f64, only);
    let tests = total(&|w| w.test as f64, None);
    let mut report = Report {
        hit_rate: total(&|w| w.hit_rate * w.test as f64, None) / tests,
        attention_speedup_256: attention
            .iter()
            .find(|a| a.tokens == 256)
            .map_or(f64::NAN, |a| a.speedup),
        e2e_speedup: exact_total(None) / cache_total(None),
        e2e_speedup_vs_stock: total(&|w| w.stock.mean_ms * w.test as f64, None) / cache_total(None),
        e2e_speedup_redundant: exact_total(Some(Kind::Redundant))
            / cache_total(Some(Kind::Redundant)),
        accuracy_drop_pt: reports
            .iter()
            .map(|w| w.accuracy_drop_pt)
            .fold(f64::NEG_INFINITY, f64::max),
        fidelity_cos_mean: total(&|w| w.fidelity.mean * w.test as f64, None) / tests,
        fidelity_cos_p1: reports
            .iter()
            .map(|w| w.fidelity.p1)
            .fold(f64::INFINITY, f64::min),
        bytes_per_entry: total(&|w| w.bytes_per_entry * w.entries as f64, None)
            / total(&|w| w.entries as f64, None),
        safe_hit_rate_redundant: 0.0,
        safe_hit_rate_diverse: 0.0,
        pareto_best_safe_on_diverse: false,
        pareto_best: None,
        floors: Vec::new(),
        workloads: reports,
        attention,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        commit,
        machine: provenance::machine(),
        seconds: started.elapsed().as_secs_f64(),
        date: provenance::now_utc(),
    };
    summarize(&mut report);
    std::fs::create_dir_all(&args.out)?;
    write_default_gate(&report, &args.gate_out)?;
    let json = serde_json::to_string_pretty(&report)?;
    let md = report::markdown(&report);
    for (name, body) in [("latest.json", &json), ("latest.md", &md)] {
        std::fs::write(args.out.join(name), body)?;
    }
    std::fs::write(args.out.join("eval.svg"), report::plot(&report))?;
    println!("{md}");
    println!(
        "written: {}/latest.{{json,md}}, eval.svg; {}",
        args.out.display(),
        args.gate_out.display()
    );
    Ok(())
}
