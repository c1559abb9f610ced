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
    self, AttentionTiming, DbSizeReport, ErrorBucket, Floor, HeadSensitivity, LayerSensitivity,
    LeverReport, ParetoBest, Report, SweepPoint, WorkloadReport,
};
use attncache_benches::stats::{self, Fidelity, Latency};
use attncache_benches::workloads::{self, Kind, Sizes, Workload};
use attncache_plugin::{Decision, ErrorGate, ExactAttention, GatePoint, Outcome, ReusePolicy};
use attncache_server::classifier::Classifier;
use attncache_server::cli::ServeArgs;
use attncache_server::{
    local_server::{cosine, LocalServer},
    progress::progress_bar,
};
use clap::Parser;

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
    /// Where the results go (`eval-<date and time>.{json,md}`, `latest.{json,md}`, `eval.svg`).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
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

#[allow(clippy::too_many_lines)]
async fn run_workload(
    args: &Args,
    wl: &Workload,
    levers: &[LeverSpec],
    tok: &tokenizers::Tokenizer,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<WorkloadReport> {
    let prep = |t: &str| truncate(tok, &format!("{}{t}", wl.prefix), args.max_tokens);
    let cold = tempfile::tempdir()?;
    let server = start_server(args, cold.path(), 8192).await?;
    let (hook, cache) = (server.hook.clone(), server.cache.clone());
    let mut labels: Vec<String> = wl
        .store
        .iter()
        .chain(&wl.test)
        .map(|e| e.label.clone())
        .collect();
    labels.sort();
    labels.dedup();
    let label_of = |l: &str| labels.binary_search(&l.to_string()).unwrap_or(0) as u32;
    // times one request; `exact` picks the attention, `cached` the flag
    let timed = |text: String, exact: ExactAttention, cached: bool| {
        hook.set_exact_attention(exact);
        cache.set_enabled_by_default(cached);
        let server = &server;
        async move {
            let s = Instant::now();
            let e = server.embed(&text).await?;
            Ok::<_, anyhow::Error>((s.elapsed().as_secs_f64() * 1e3, e))
        }
    };
    // one pass over `texts` with the best-ranked neighbour's maps under `policy`
    // `with_exact`: also time each input on the exact path next to it
    let forced_pass = |texts: Vec<String>, policy: ReusePolicy, with_exact: bool| {
        let cache = cache.clone();
        let timed = &timed;
        async move {
            cache.set_reuse_policy(policy)?;
            cache.set_error_gate(Some(ErrorGate::accept_all("forced")))?;
            let mut out = Vec::with_capacity(texts.len());
            for (i, text) in texts.into_iter().enumerate() {
                let exact_first = i % 2 == 0;
                let mut exact_ms = 0.0;
                if with_exact && exact_first {
                    exact_ms = timed(text.clone(), ExactAttention::Fast, false).await?.0;
                }
                let (ms, e) = timed(text.clone(), ExactAttention::Fast, true).await?;
                let decision = cache.last_decision().context("the cache decided")?;
                if with_exact && !exact_first {
                    exact_ms = timed(text, ExactAttention::Fast, false).await?.0;
                }
                out.push(Forced {
                    ms,
                    exact_ms,
                    embedding: e.embedding,
                    decision,
                });
                bar.inc(1);
            }
            cache.set_error_gate(None)?;
            Ok::<_, anyhow::Error>(out)
        }
    };

    // 1. warm-up: record the store split, identical-input reuse only
    bar.set_message(format!("{} warm-up", wl.name));
    cache.set_similarity_threshold(None);
    cache.set_error_gate(None)?;
    cache.set_admission(true);
    let (mut train_x, mut train_y) = (Vec::new(), Vec::new());
    for e in &wl.store {
        let (_, emb) = timed(prep(&e.text)?, ExactAttention::Fast, true).await?;
        train_x.push(emb.embedding);
        train_y.push(label_of(&e.label));
        bar.inc(1);
    }
    cache.flush(); // the warm-up's cold-tier writes must not overlap the measurements

    // 2. calibration inputs, exact; nothing recorded from here until the served run
    bar.set_message(format!("{} calibrate", wl.name));
    cache.set_admission(false);
    let calib_texts: Vec<String> = wl
        .calib
        .iter()
        .map(|e| prep(&e.text))
        .collect::<anyhow::Result<_>>()?;
    let mut calib_exact = Vec::new();
    for (text, e) in calib_texts.iter().zip(&wl.calib) {
        let (ms, exact) = timed(text.clone(), ExactAttention::Fast, false).await?;
        calib_exact.push((ms, exact.embedding.clone()));
        train_x.push(exact.embedding);
        train_y.push(label_of(&e.label));
        bar.inc(1);
    }
    let calib_emb: Vec<Vec<f32>> = calib_exact.iter().map(|c| c.1.clone()).collect();
    let test_texts: Vec<String> = wl
        .test
        .iter()
        .map(|e| prep(&e.text))
        .collect::<anyhow::Result<_>>()?;

    // 3. layer sensitivity (for `layers=N` levers): calibration inputs that have a
    //    neighbour, one layer reused at a time
    let all_calib = forced_pass(calib_texts.clone(), ReusePolicy::default(), true).await?;
    let with_neighbour: Vec<usize> = all_calib
        .iter()
        .enumerate()
        .filter(|(_, f)| f.decision.outcome == Outcome::NearHit)
        .map(|(i, _)| i)
        .take(args.sensitivity_inputs)
        .collect();
    let n_layers = server.model.layers;
    let mut sensitivity = Vec::new();
    if levers.iter().any(|l| l.layers.is_some()) && !with_neighbour.is_empty() {
        bar.set_message(format!("{} layer sensitivity", wl.name));
        bar.inc_length((n_layers * with_neighbour.len()) as u64);
        for layer in 0..n_layers {
            let texts = with_neighbour
                .iter()
                .map(|&i| calib_texts[i].clone())
                .collect();
            let policy = ReusePolicy {
                layers: vec![layer],
                ..ReusePolicy::default()
            };
            let got = forced_pass(texts, policy, false).await?;
            let losses: Vec<f64> = got
                .iter()
                .zip(&with_neighbour)
                .map(|(f, &i)| 1.0 - cosine(&calib_emb[i], &f.embedding))
                .collect();
            sensitivity.push(LayerSensitivity {
                layer,
                mean_loss: stats::mean(&losses),
            });
        }
    }
    let mut order: Vec<&LayerSensitivity> = sensitivity.iter().collect();
    order.sort_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss));
    let least_sensitive: Vec<usize> = order.iter().map(|s| s.layer).collect();
    //    and for `heads=N` levers, one (layer, head) map reused at a time
    let n_heads = server.model.heads.unwrap_or(0);
    let mut head_sensitivity = Vec::new();
    if levers.iter().any(|l| l.heads.is_some()) && !with_neighbour.is_empty() && n_heads > 0 {
        bar.set_message(format!("{} head sensitivity", wl.name));
        bar.inc_length((n_layers * n_heads * with_neighbour.len()) as u64);
        let texts: Vec<String> = with_neighbour
            .iter()
            .map(|&i| calib_texts[i].clone())
            .collect();
        for layer in 0..n_layers {
            for head in 0..n_heads {
                let policy = ReusePolicy {
                    heads: vec![[layer, head]],
                    ..ReusePolicy::default()
                };
                let got = forced_pass(texts.clone(), policy, false).await?;
                let losses: Vec<f64> = got
                    .iter()
                    .zip(&with_neighbour)
                    .map(|(f, &i)| 1.0 - cosine(&calib_emb[i], &f.embedding))
                    .collect();
                head_sensitivity.push(HeadSensitivity {
                    layer,
                    head,
                    mean_loss: stats::mean(&losses),
                });
            }
        }
    }
    let mut head_order: Vec<&HeadSensitivity> = head_sensitivity.iter().collect();
    head_order.sort_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss));
    let heads_first: Vec<[usize; 2]> = head_order.iter().map(|h| [h.layer, h.head]).collect();

    // 4. every lever: calibration pass → gate; test pass (best-ranked neighbour's maps)
    struct LeverRun {
        spec: LeverSpec,
        policy: ReusePolicy,
        gate: Option<ErrorGate>,
        calib: Vec<Forced>,
        test: Vec<Forced>,
    }
    let mut runs = Vec::new();
    for spec in levers {
        if (spec.layers.is_some() && least_sensitive.is_empty())
            || (spec.heads.is_some() && heads_first.is_empty())
        {
            continue; // no neighbour to measure sensitivity with: nothing to choose from
        }
        bar.set_message(format!("{} {}", wl.name, spec.name));
        let policy = spec.policy(&least_sensitive, &heads_first);
        let calib = if spec.layers.is_none()
            && spec.heads.is_none()
            && !spec.recompute
            && spec.slack == 0
        {
            all_calib.clone()
        } else {
            bar.inc_length(calib_texts.len() as u64);
            forced_pass(calib_texts.clone(), policy.clone(), true).await?
        };
        let points: Vec<GatePoint> = gate_points(&calib, &calib_emb)
            .into_iter()
            .map(|p| p.0)
            .collect();
        let gate = ErrorGate::fit(&points, args.max_error, args.gate_quantile, &spec.name);
        let test = forced_pass(test_texts.clone(), policy.clone(), true).await?;
        runs.push(LeverRun {
            spec: spec.clone(),
            policy,
            gate,
            calib,
            test,
        });
    }

    // 5. the served configuration, chosen on the calibration split: the fastest (lever,
    //    target) whose calibration hits keep mean cosine ≥ --target, none below --floor,
    //    change no prediction of a head trained on the exact store and calibration
    //    embeddings, are at least --min-calib-hits of the split, and gain at least
    //    --min-gain (lookups counted); otherwise identical inputs only
    let choice_head = Classifier::train(&train_x, &train_y, labels.clone(), 300)?;
    let calib_pred = choice_head.predict(&calib_emb)?;
    let mut served: Option<(usize, f64, f64)> = None; // (run, target, calibration speedup)
    for (k, run) in runs.iter().enumerate() {
        let Some(gate) = &run.gate else { continue };
        let lookup_ms = mean_lookup_ms_of(&run.calib);
        let reused: Vec<Vec<f32>> = run.calib.iter().map(|f| f.embedding.clone()).collect();
        let reused_pred = choice_head.predict(&reused)?;
        for &t in &TARGETS {
            let hits: Vec<usize> = (0..run.calib.len())
                .filter(|&i| reuses(&run.calib[i], Some(gate), Some(t)))
                .collect();
            let enough = hits.len() as f64 >= args.min_calib_hits * run.calib.len() as f64;
            if hits.is_empty() || !enough {
                continue;
            }
            let cos: Vec<f64> = hits
                .iter()
                .map(|&i| cosine(&calib_emb[i], &run.calib[i].embedding))
                .collect();
            let flips = hits
                .iter()
                .filter(|&&i| reused_pred[i] != calib_pred[i])
                .count();
            if stats::mean(&cos) < args.target || stats::min(&cos) < args.floor || flips > 0 {
                continue;
            }
            let (mut exact, mut time) = (0.0, 0.0);
            for (i, f) in run.calib.iter().enumerate() {
                exact += f.exact_ms;
                time += if hits.contains(&i) {
                    f.ms
                } else {
                    f.exact_ms + lookup_ms
                };
            }
            let speedup = exact / time;
            let better = served.is_none_or(|(_, _, best)| speedup > best);
            if speedup >= 1.0 + args.min_gain && better {
                served = Some((k, t, speedup));
            }
        }
    }
    let (served_lever, served_max_error) = match served {
        Some((k, t, _)) => {
            let run = &runs[k];
            cache.set_reuse_policy(run.policy.clone())?;
            cache.set_error_gate(run.gate.as_ref().map(|g| g.with_max_loss(t)))?;
            (run.spec.name.clone(), Some(t))
        }
        None => {
            cache.set_reuse_policy(ReusePolicy::default())?;
            cache.set_error_gate(None)?;
            ("exact only".to_string(), None)
        }
    };
    tracing::info!(workload = %wl.name, %served_lever, ?served_max_error, "served configuration");

    // 6. served run, misses recorded; rotating order per input
    bar.set_message(format!("{} serve", wl.name));
    cache.set_admission(true);
    let before = cache.counts();
    let mut rows = Vec::new();
    for (i, text) in test_texts.iter().enumerate() {
        let mut got: [Option<(f64, Vec<f32>, u64)>; 3] = [None, None, None];
        let (mut outcome, mut lookup_ns) = (Outcome::Miss, 0);
        for j in 0..3 {
            let k = (i + j) % 3;
            let (exact, cached) = match k {
                0 => (ExactAttention::Stock, false),
                1 => (ExactAttention::Fast, false),
                _ => (ExactAttention::Fast, true),
            };
            let (ms, e) = timed(text.clone(), exact, cached).await?;
            if cached {
                let d = cache.last_decision().context("the cache decided")?;
                outcome = d.outcome;
                lookup_ns = d.lookup_ns;
            }
            got[k] = Some((ms, e.embedding, e.tokens));
            bar.inc(1);
        }
        let [Some(stock), Some(exact), Some(cached)] = got else {
            anyhow::bail!("a column was not measured");
        };
        rows.push(Row {
            label: label_of(&wl.test[i].label),
            tokens: exact.2,
            stock_ms: stock.0,
            exact_ms: exact.0,
            cache_ms: cached.0,
            stock: stock.1,
            exact: exact.1,
            cache: cached.1,
            outcome,
            lookup_ns,
        });
    }
    cache.flush();
    let after = cache.counts();
    attncache_plugin::uninstall();

    let head = Classifier::train(&train_x, &train_y, labels.clone(), 300)?;
    let ys: Vec<u32> = rows.iter().map(|r| r.label).collect();
    let acc = |f: &dyn Fn(&Row) -> Vec<f32>| -> anyhow::Result<f64> {
        let xs: Vec<Vec<f32>> = rows.iter().map(f).collect();
        head.accuracy(&xs, &ys)
    };
    let accuracy_exact = acc(&|r| r.exact.clone())?;
    let accuracy_cache = acc(&|r| r.cache.clone())?;
    let accuracy_stock = acc(&|r| r.stock.clone())?;

    let sum = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).sum::<f64>();
    let col = |f: &dyn Fn(&Row) -> f64| rows.iter().map(f).collect::<Vec<f64>>();
    let n = rows.len().max(1) as f64;
    let hits: Vec<&Row> = rows.iter().filter(|r| is_hit(r.outcome)).collect();
    let cache_total_ms = sum(&|r| r.cache_ms);
    let lookup_ms = sum(&|r| r.lookup_ns as f64 / 1e6);
    let mean_lookup_ms = lookup_ms / n;
    let entries = after.cold_entries.max(after.hot_entries);
    let stored_bytes = after.cold_bytes.max(after.hot_bytes);
    // 7. each lever's sweep over target errors, composed from its test pass
    let scoring = Scoring {
        rows: &rows,
        head: &head,
        ys: &ys,
        accuracy_exact,
    };
    let mut lever_reports = Vec::new();
    for run in &runs {
        lever_reports.push(scoring.lever_report(
            &run.spec.name,
            &run.policy,
            run.gate.as_ref(),
            &gate_points(&run.calib, &calib_emb),
            &run.test,
        )?);
    }

    // 8. database size: the same test inputs against stores grown with unlabelled text
    let db_sizes = if wl.kind == Kind::Diverse && !args.db_sizes.is_empty() {
        let gates: Vec<(LeverSpec, ReusePolicy, Option<ErrorGate>)> = runs
            .iter()
            .filter(|r| args.db_levers.iter().any(|l| l.name == r.spec.name))
            .map(|r| (r.spec.clone(), r.policy.clone(), r.gate.clone()))
            .collect();
        db_size_stage(args, wl, &test_texts, &gates, &scoring, tok, bar).await?
    } else {
        Vec::new()
    };

    let misses: Vec<&Row> = rows.iter().filter(|r| !is_hit(r.outcome)).collect();
    let miss_overhead = (!misses.is_empty()).then(|| {
        misses.iter().map(|r| r.cache_ms).sum::<f64>()
            / misses.iter().map(|r| r.exact_ms).sum::<f64>()
            - 1.0
    });
    let hit_cos: Vec<f64> = hits.iter().map(|r| cosine(&r.exact, &r.cache)).collect();
    Ok(WorkloadReport {
        name: wl.name.clone(),
        kind: wl.kind,
        store: wl.store.len(),
        calib: wl.calib.len(),
        test: rows.len(),
        mean_tokens: sum(&|r| r.tokens as f64) / n,
        served_lever,
        served_max_error,
        hit_rate: hits.len() as f64 / n,
        exact_hit_rate: rows
            .iter()
            .filter(|r| r.outcome == Outcome::ExactHit)
            .count() as f64
            / n,
        hot_hits: after.hot_hits - before.hot_hits,
        cold_hits: after.cold_hits - before.cold_hits,
        stock: Latency::of(&col(&|r| r.stock_ms)),
        exact: Latency::of(&col(&|r| r.exact_ms)),
        cache: Latency::of(&col(&|r| r.cache_ms)),
        e2e_speedup: sum(&|r| r.exact_ms) / cache_total_ms,
        e2e_speedup_vs_stock: sum(&|r| r.stock_ms) / cache_total_ms,
        exact_speedup_vs_stock: sum(&|r| r.stock_ms) / sum(&|r| r.exact_ms),
        hit_request_ms: (!hits.is_empty())
            .then(|| stats::mean(&hits.iter().map(|r| r.cache_ms).collect::<Vec<_>>())),
        hit_inputs_exact_ms: (!hits.is_empty())
            .then(|| stats::mean(&hits.iter().map(|r| r.exact_ms).collect::<Vec<_>>())),
        miss_overhead,
        lookup_share: lookup_ms / cache_total_ms,
        mean_lookup_us: mean_lookup_ms * 1e3,
        fidelity: Fidelity::of(&col(&|r| cosine(&r.exact, &r.cache))),
        hit_fidelity: (!hit_cos.is_empty()).then(|| Fidelity::of(&hit_cos)),
        exact_vs_stock: Fidelity::of(&col(&|r| cosine(&r.exact, &r.stock))),
        accuracy_exact,
        accuracy_cache,
        accuracy_drop_pt: 100.0 * (accuracy_exact - accuracy_cache),
        accuracy_stock,
        entries,
        bytes_per_entry: stored_bytes as f64 / entries.max(1) as f64,
        hot_bytes: after.hot_bytes,
        cold_bytes: after.cold_bytes,
        levers: lever_reports,
        layer_sensitivity: sensitivity,
        head_sensitivity,
        db_sizes,
    })
}

/// What the sweeps of a workload are scored against: the served run's exact rows and the
/// head trained on exact embeddings.
struct Scoring<'a> {
    rows: &'a [Row],
    head: &'a Classifier,
    ys: &'a [u32],
    accuracy_exact: f64,
}

impl Scoring<'_> {
    /// A lever's report: its gate's rank correlation, its reuse errors by differing share,
    /// and its sweep over target errors composed from `test` (one forced pass).
    fn lever_report(
        &self,
        name: &str,
        policy: &ReusePolicy,
        gate: Option<&ErrorGate>,
        calib_points: &[(GatePoint, usize)],
        test: &[Forced],
    ) -> anyhow::Result<LeverReport> {
        let rows = self.rows;
        let exact_emb: Vec<Vec<f32>> = rows.iter().map(|r| r.exact.clone()).collect();
        let test_points = gate_points(test, &exact_emb);
        let n = rows.len().max(1) as f64;
        // times from the lever's own pass: reuse next to exact, and its own lookup cost
        let exact_total: f64 = test.iter().map(|f| f.exact_ms).sum();
        let lookup_ms = mean_lookup_ms_of(test);
        let mut sweep = Vec::new();
        let targets = std::iter::once(None).chain(TARGETS.iter().map(|t| Some(*t)));
        for t in targets {
            let reuse: Vec<bool> = test.iter().map(|f| reuses(f, gate, t)).collect();
            let chosen: Vec<Vec<f32>> = rows
                .iter()
                .zip(test)
                .zip(&reuse)
                .map(|((r, f), &u)| {
                    if u {
                        f.embedding.clone()
                    } else {
                        r.exact.clone()
                    }
                })
                .collect();
            let cos: Vec<f64> = rows
                .iter()
                .zip(&chosen)
                .map(|(r, c)| cosine(&r.exact, c))
                .collect();
            let time: f64 = test
                .iter()
                .zip(&reuse)
                .map(|(f, &u)| if u { f.ms } else { f.exact_ms + lookup_ms })
                .sum();
            let accuracy = self.head.accuracy(&chosen, self.ys)?;
            sweep.push(SweepPoint {
                max_error: t,
                hit_rate: reuse.iter().filter(|u| **u).count() as f64 / n,
                fidelity: Fidelity::of(&cos),
                accuracy,
                accuracy_drop_pt: 100.0 * (self.accuracy_exact - accuracy),
                e2e_speedup: exact_total / time,
                exact_ms: exact_total,
                reuse_ms: time,
            });
        }
        let by_differing = ERROR_BUCKETS
            .iter()
            .enumerate()
            .map(|(b, &max_share)| {
                let lo = if b == 0 { -1.0 } else { ERROR_BUCKETS[b - 1] };
                let losses: Vec<f64> = test_points
                    .iter()
                    .filter(|(p, _)| {
                        let share = p.differing as f64 / p.tokens.max(1) as f64;
                        share > lo && share <= max_share
                    })
                    .map(|(p, _)| p.loss)
                    .collect();
                ErrorBucket {
                    max_share,
                    pairs: losses.len(),
                    loss_mean: (!losses.is_empty()).then(|| stats::mean(&losses)),
                    loss_p90: (!losses.is_empty()).then(|| stats::quantile(&losses, 0.9)),
                }
            })
            .collect();
        let near: Vec<usize> = test_points.iter().map(|p| p.1).collect();
        let losses: Vec<f64> = test_points.iter().map(|p| p.0.loss).collect();
        let some = |v: f64| (!near.is_empty()).then_some(v);
        Ok(LeverReport {
            name: name.to_string(),
            policy: policy.clone(),
            gate: gate.cloned(),
            calib_pairs: calib_points.len(),
            test_pairs: test_points.len(),
            spearman_calib: spearman_of(gate, calib_points),
            spearman_test: spearman_of(gate, &test_points),
            reuse_ms: some(stats::mean(
                &near.iter().map(|&i| test[i].ms).collect::<Vec<_>>(),
            )),
            reuse_inputs_exact_ms: some(stats::mean(
                &near.iter().map(|&i| test[i].exact_ms).collect::<Vec<_>>(),
            )),
            reuse_loss_mean: some(stats::mean(&losses)),
            reuse_loss_p90: some(stats::quantile(&losses, 0.9)),
            by_differing,
            sweep,
        })
    }
}

/// Lever 4, database size: a fresh server warmed with the workload's store split, then
/// grown with `nlp-corpus` sentences to each of `--db-sizes` stored inputs; at each size every
/// test input takes its best-ranked neighbour's maps under each lever (with the gate the
/// workload calibrated), scored like the levers.
async fn db_size_stage(
    args: &Args,
    wl: &Workload,
    test_texts: &[String],
    gates: &[(LeverSpec, ReusePolicy, Option<ErrorGate>)],
    scoring: &Scoring<'_>,
    tok: &tokenizers::Tokenizer,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<DbSizeReport>> {
    let corpus =
        attncache_server::texts::load_texts(&corpus_files(&args.data.join("nlp-corpus"))?)?;
    let cold = tempfile::tempdir()?;
    let server = start_server(args, cold.path(), 65536).await?;
    let cache = server.cache.clone();
    server.hook.set_exact_attention(ExactAttention::Fast);
    cache.set_enabled_by_default(true);
    cache.set_error_gate(None)?;
    cache.set_admission(true);
    let sizes: Vec<usize> = args
        .db_sizes
        .iter()
        .copied()
        .filter(|n| *n >= wl.store.len())
        .collect();
    let grow: usize = sizes.last().map_or(0, |n| n - wl.store.len());
    bar.inc_length((wl.store.len() + grow + sizes.len() * gates.len() * test_texts.len()) as u64);
    bar.set_message(format!("{} database warm-up", wl.name));
    for e in &wl.store {
        server
            .embed(&truncate(
                tok,
                &format!("{}{}", wl.prefix, e.text),
                args.max_tokens,
            )?)
            .await?;
        bar.inc(1);
    }
    let mut added = 0;
    let mut out = Vec::new();
    for size in sizes {
        bar.set_message(format!("{} database {size}", wl.name));
        cache.set_admission(true);
        cache.set_error_gate(None)?;
        while wl.store.len() + added < size && added < corpus.len() {
            let text = format!("{}{}", wl.prefix, corpus[added]);
            server
                .embed(&truncate(tok, &text, args.max_tokens)?)
                .await?;
            added += 1;
            bar.inc(1);
        }
        cache.flush();
        cache.set_admission(false);
        let counts = cache.counts();
        let mut levers = Vec::new();
        for (spec, policy, gate) in gates {
            cache.set_reuse_policy(policy.clone())?;
            cache.set_error_gate(Some(ErrorGate::accept_all("forced")))?;
            let mut forced = Vec::with_capacity(test_texts.len());
            for text in test_texts {
                let s = Instant::now();
                let e = server.embed(text).await?;
                let ms = s.elapsed().as_secs_f64() * 1e3;
                let decision = cache.last_decision().context("the cache decided")?;
                cache.set_enabled_by_default(false);
                let s = Instant::now();
                server.embed(text).await?;
                let exact_ms = s.elapsed().as_secs_f64() * 1e3;
                cache.set_enabled_by_default(true);
                forced.push(Forced {
                    ms,
                    exact_ms,
                    embedding: e.embedding,
                    decision,
                });
                bar.inc(1);
            }
            levers.push(scoring.lever_report(&spec.name, policy, gate.as_ref(), &[], &forced)?);
        }
        out.push(DbSizeReport {
            stored: wl.store.len() + added,
            corpus: added,
            entries: counts.cold_entries.max(counts.hot_entries),
            bytes_on_disk: counts.cold_bytes,
            levers,
        });
    }
    attncache_plugin::uninstall();
    Ok(out)
}

/// The `doc-*.json` files of the nlp-corpus directory, in numeric order.
fn corpus_files(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("nlp-corpus at {} (make fetch-corpus)", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter_map(|p| {
            let n = p
                .file_stem()?
                .to_str()?
                .strip_prefix("doc-")?
                .parse()
                .ok()?;
            Some((n, p))
        })
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "no doc-*.json in {}", dir.display());
    Ok(files.into_iter().map(|f| f.1).collect())
}

/// Fills in the summary of issue 9 (Pareto-best, safe hit rates) and the floors.
fn summarize(report: &mut Report) {
    report.pareto_best = pareto_best(&report.workloads);
    report.safe_hit_rate_redundant = 0.0;
    report.safe_hit_rate_diverse = 0.0;
    report.pareto_best_safe_on_diverse = false;
    if let Some(best) = &report.pareto_best {
        report.safe_hit_rate_redundant = best.hit_rate;
        let others = on_diverse(&report.workloads, best);
        report.pareto_best_safe_on_diverse = others.iter().all(|p| p.is_safe());
        let diverse: Vec<f64> = report
            .workloads
            .iter()
            .filter(|w| w.kind == Kind::Diverse)
            .filter_map(|w| {
                let l = w.levers.iter().find(|l| l.name == best.lever)?;
                let p = l
                    .sweep
                    .iter()
                    .find(|p| p.max_error == Some(best.max_error))?;
                Some(p.hit_rate)
            })
            .collect();
        if report.pareto_best_safe_on_diverse && !diverse.is_empty() {
            report.safe_hit_rate_diverse = stats::mean(&diverse);
        }
    }
    report.floors = floors(report);
}

/// Writes `gate-default.json`: the Pareto-best lever's gate as calibrated on the first
/// redundant workload, at the Pareto-best target, with that workload's policy recorded in it
/// (`attncache-server --error-gate` then reuses the same way). Nothing without a Pareto-best.
fn write_default_gate(report: &Report, dir: &std::path::Path) -> anyhow::Result<()> {
    let Some(best) = &report.pareto_best else {
        return Ok(());
    };
    let lever = report
        .workloads
        .iter()
        .filter(|w| w.kind == Kind::Redundant)
        .find_map(|w| w.levers.iter().find(|l| l.name == best.lever));
    if let Some(gate) = lever.and_then(|l| Some((l.gate.as_ref()?, &l.policy))) {
        let mut g = gate.0.with_max_loss(best.max_error);
        g.reuse = Some(gate.1.clone());
        g.save(&dir.join("gate-default.json"))?;
    }
    Ok(())
}

/// The fastest (lever, target) that is safe on the redundant workloads pooled (worst
/// accuracy drop ≤ 0.3 pt, pooled fidelity mean ≥ 0.99, some hits) and safe on every other
/// workload where it was measured (refusing is fine there).
fn pareto_best(workloads: &[WorkloadReport]) -> Option<ParetoBest> {
    let redundant: Vec<&WorkloadReport> = workloads
        .iter()
        .filter(|w| w.kind == Kind::Redundant)
        .collect();
    let first = redundant.first()?;
    let mut best: Option<ParetoBest> = None;
    for lever in &first.levers {
        for point in &lever.sweep {
            let Some(t) = point.max_error else { continue };
            let mut found = Vec::new();
            for w in &redundant {
                let p = w
                    .levers
                    .iter()
                    .find(|l| l.name == lever.name)
                    .and_then(|l| l.sweep.iter().find(|p| p.max_error == Some(t)));
                found.extend(p.map(|p| (p, w.test as f64)));
            }
            if found.len() != redundant.len() {
                continue;
            }
            let tests: f64 = found.iter().map(|f| f.1).sum();
            let candidate = ParetoBest {
                lever: lever.name.clone(),
                policy: lever.policy.clone(),
                max_error: t,
                hit_rate: found.iter().map(|(p, n)| p.hit_rate * n).sum::<f64>() / tests,
                e2e_speedup: found.iter().map(|(p, _)| p.exact_ms).sum::<f64>()
                    / found.iter().map(|(p, _)| p.reuse_ms).sum::<f64>(),
                accuracy_drop_pt: found
                    .iter()
                    .map(|(p, _)| p.accuracy_drop_pt)
                    .fold(f64::NEG_INFINITY, f64::max),
                fidelity_mean: found.iter().map(|(p, n)| p.fidelity.mean * n).sum::<f64>() / tests,
            };
            let safe_elsewhere = on_diverse(workloads, &candidate)
                .iter()
                .all(|p| p.is_safe());
            let safe = candidate.accuracy_drop_pt <= report::SAFE_DROP_PT
                && candidate.fidelity_mean >= report::SAFE_FIDELITY
                && candidate.hit_rate > 0.0
                && safe_elsewhere;
            if safe
                && best
                    .as_ref()
                    .is_none_or(|b| candidate.e2e_speedup > b.e2e_speedup)
            {
                best = Some(candidate);
            }
        }
    }
    best
}

/// The pareto-best configuration's point on each workload that is not near-duplicate
/// traffic (diverse and templated).
fn on_diverse<'a>(workloads: &'a [WorkloadReport], best: &ParetoBest) -> Vec<&'a SweepPoint> {
    workloads
        .iter()
        .filter(|w| w.kind != Kind::Redundant)
        .filter_map(|w| {
            w.levers
                .iter()
                .find(|l| l.name == best.lever)
                .and_then(|l| l.sweep.iter().find(|p| p.max_error == Some(best.max_error)))
        })
        .collect()
}

fn floors(r: &Report) -> Vec<Floor> {
    let mut f = vec![
        Floor {
            what: "attention on a hit ≥ 2x faster than exact at 256 tokens".into(),
            measured: r.attention_speedup_256,
            met: r.attention_speedup_256 >= 2.0,
        },
        Floor {
            what: "end-to-end ≥ 1.15x vs exact on the redundant workloads (served run)".into(),
            measured: r.e2e_speedup_redundant,
            met: r.e2e_speedup_redundant >= 1.15,
        },
        Floor {
            what: "safe hit rate on the redundant workloads ≥ 50% (issue 9)".into(),
            measured: r.safe_hit_rate_redundant,
            met: r.safe_hit_rate_redundant >= 0.5,
        },
        Floor {
            what: "pareto-best end-to-end ≥ 1.2x vs exact on the redundant workloads (issue 9)"
                .into(),
            measured: r.pareto_best.as_ref().map_or(1.0, |b| b.e2e_speedup),
            met: r.pareto_best.as_ref().is_some_and(|b| b.e2e_speedup >= 1.2),
        },
        Floor {
            what: "pareto-best is safe on the diverse workloads (drop ≤ 0.3 pt)".into(),
            measured: f64::from(u8::from(r.pareto_best_safe_on_diverse)),
            met: r.pareto_best_safe_on_diverse,
        },
    ];
    for w in &r.workloads {
        f.push(Floor {
            what: format!("{}: accuracy drop ≤ 0.5 pt", w.name),
            measured: w.accuracy_drop_pt,
            met: w.accuracy_drop_pt <= 0.5,
        });
        f.push(Floor {
            what: format!("{}: fidelity mean ≥ 0.99", w.name),
            measured: w.fidelity.mean,
            met: w.fidelity.mean >= 0.99,
        });
        if w.kind == Kind::Diverse {
            f.push(Floor {
                what: format!("{}: slowdown ≤ 2% (speedup ≥ 0.98x)", w.name),
                measured: w.e2e_speedup,
                met: w.e2e_speedup >= 0.98,
            });
        }
    }
    f
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
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
    write_default_gate(&report, &args.out)?;
    let json = serde_json::to_string_pretty(&report)?;
    let md = report::markdown(&report);
    // one file per run: the date and time, without the colons file systems dislike
    let stamp = report.date.replace(':', "");
    for (name, body) in [
        (format!("eval-{stamp}.json"), &json),
        ("latest.json".to_string(), &json),
        (format!("eval-{stamp}.md"), &md),
        ("latest.md".to_string(), &md),
    ] {
        std::fs::write(args.out.join(name), body)?;
    }
    std::fs::write(args.out.join("eval.svg"), report::plot(&report))?;
    println!("{md}");
    println!(
        "written: {}/latest.{{json,md}}, eval-{stamp}.{{json,md}}, eval.svg",
        args.out.display()
    );
    Ok(())
}

/// Logs (warnings and up unless RUST_LOG says otherwise) go to stderr, under the progress bar.
fn tracing_subscriber_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
