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
use attncache_benches::report::{self, AttentionTiming, Floor, Report, SweepPoint, WorkloadReport};
use attncache_benches::stats::{self, Fidelity, Latency};
use attncache_benches::workloads::{self, Kind, Sizes, Workload};
use attncache_integration::calibrate::{choose_threshold, Point};
use attncache_integration::classifier::Classifier;
use attncache_integration::cli::ServeArgs;
use attncache_integration::local_server::{cosine, progress_bar, LocalServer};
use attncache_plugin::{ExactAttention, Outcome};
use clap::Parser;

/// Evaluates the attention-map cache: stock vs exact vs cache, hit rate, fidelity, accuracy.
#[derive(Debug, Parser)]
#[command(name = "attncache-eval")]
struct Args {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = attncache_integration::cli::default_model_dir())]
    model: PathBuf,
    /// Data directory holding `sentiment/` (scripts/fetch-data) and `spam-assassin/`
    /// (scripts/fetch-spam).
    #[arg(long, default_value_os_t = workloads::default_data_dir())]
    data: PathBuf,
    /// Workloads to run: spam, sentiment-template, sentiment.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "spam,sentiment-template,sentiment"
    )]
    workloads: Vec<String>,
    /// Sentiment workloads: inputs in the warm-up store.
    #[arg(long, default_value_t = 600)]
    store: usize,
    /// Sentiment workloads: calibration inputs.
    #[arg(long, default_value_t = 150)]
    calib: usize,
    /// Sentiment workloads: test inputs.
    #[arg(long, default_value_t = 300)]
    test: usize,
    /// Spam workload: emails in the warm-up store.
    #[arg(long, default_value_t = 360)]
    spam_store: usize,
    /// Spam workload: calibration emails.
    #[arg(long, default_value_t = 60)]
    spam_calib: usize,
    /// Spam workload: test emails.
    #[arg(long, default_value_t = 180)]
    spam_test: usize,
    /// Inputs longer than this many tokens (prefix included) are cut, as embedding servers
    /// truncate to a maximum length.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Mean cosine the calibrated threshold's reuses must keep.
    #[arg(long, default_value_t = 0.99)]
    target: f64,
    /// No calibration reuse under the threshold may fall below this cosine.
    #[arg(long, default_value_t = 0.95)]
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

/// One test input's measurements.
#[derive(Debug, Clone)]
struct Row {
    label: u32,
    tokens: u64,
    stock_ms: f64,
    exact_ms: f64,
    cache_ms: f64,
    forced_ms: f64,
    stock: Vec<f32>,
    exact: Vec<f32>,
    cache: Vec<f32>,
    forced: Vec<f32>,
    /// Served run: outcome of the cache-on request.
    outcome: Outcome,
    lookup_ns: u64,
    /// Sweep pass: outcome and distance of the nearest stored input.
    forced_outcome: Outcome,
    forced_distance: Option<f32>,
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

async fn run_workload(
    args: &Args,
    wl: &Workload,
    tok: &tokenizers::Tokenizer,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<WorkloadReport> {
    let prep = |t: &str| truncate(tok, &format!("{}{t}", wl.prefix), args.max_tokens);
    let cold = tempfile::tempdir()?;
    let model = args.model.to_str().context("model path is not UTF-8")?;
    let cold_dir = cold.path().to_str().context("temp path is not UTF-8")?;
    let hot = args.hot_mib.to_string();
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
    ]);
    let server = LocalServer::start(&serve).await?;
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

    // 1. warm-up: record the store split, identical-input reuse only
    bar.set_message(format!("{} warm-up", wl.name));
    cache.set_similarity_threshold(None);
    cache.set_admission(true);
    let (mut train_x, mut train_y) = (Vec::new(), Vec::new());
    for e in &wl.store {
        let (_, emb) = timed(prep(&e.text)?, ExactAttention::Fast, true).await?;
        train_x.push(emb.embedding);
        train_y.push(label_of(&e.label));
        bar.inc(1);
    }
    cache.flush(); // the warm-up's cold-tier writes must not overlap the measurements

    // 2. calibration: nearest stored input's maps vs exact; nothing recorded
    bar.set_message(format!("{} calibrate", wl.name));
    cache.set_admission(false);
    let mut points = Vec::new();
    for e in &wl.calib {
        let text = prep(&e.text)?;
        let (_, exact) = timed(text.clone(), ExactAttention::Fast, false).await?;
        cache.set_similarity_threshold(Some(f32::INFINITY));
        let (_, reused) = timed(text, ExactAttention::Fast, true).await?;
        if let Some(d) = cache
            .last_decision()
            .filter(|d| d.outcome == Outcome::NearHit)
        {
            points.push(Point {
                distance: d.distance.unwrap_or(f32::NAN),
                cosine: cosine(&exact.embedding, &reused.embedding),
                tokens: d.tokens,
            });
        }
        cache.set_similarity_threshold(None);
        train_x.push(exact.embedding);
        train_y.push(label_of(&e.label));
        bar.inc(2);
    }
    let threshold = choose_threshold(&points, args.target, args.floor);
    tracing::info!(workload = %wl.name, ?threshold, points = points.len(), "calibrated");

    // 3. sweep pass: nearest stored input whatever the distance; nothing recorded
    bar.set_message(format!("{} sweep", wl.name));
    let texts: Vec<String> = wl
        .test
        .iter()
        .map(|e| prep(&e.text))
        .collect::<anyhow::Result<_>>()?;
    let mut forced = Vec::new();
    cache.set_similarity_threshold(Some(f32::INFINITY));
    for text in &texts {
        let (ms, e) = timed(text.clone(), ExactAttention::Fast, true).await?;
        let d = cache.last_decision().context("the cache decided")?;
        forced.push((ms, e, d));
        bar.inc(1);
    }

    // 4. served run at the calibrated threshold, misses recorded; rotating order per input
    bar.set_message(format!("{} serve", wl.name));
    cache.set_similarity_threshold(threshold);
    cache.set_admission(true);
    let before = cache.counts();
    let mut rows = Vec::new();
    for (i, (text, (forced_ms, forced_e, forced_d))) in texts.iter().zip(forced).enumerate() {
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
            forced_ms,
            stock: stock.1,
            exact: exact.1,
            cache: cached.1,
            forced: forced_e.embedding,
            outcome,
            lookup_ns,
            forced_outcome: forced_d.outcome,
            forced_distance: forced_d.distance,
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

    // the sweep: thresholds at quantiles of the nearest distances, plus the calibrated one
    let mut dists: Vec<f64> = rows
        .iter()
        .filter(|r| r.forced_outcome == Outcome::NearHit)
        .filter_map(|r| r.forced_distance.map(f64::from))
        .collect();
    dists.sort_by(f64::total_cmp);
    let mut thresholds: Vec<Option<f32>> = vec![None, threshold];
    for q in [0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0] {
        if !dists.is_empty() {
            thresholds.push(Some(stats::quantile(&dists, q) as f32));
        }
    }
    thresholds.sort_by(|a, b| a.unwrap_or(-1.0).total_cmp(&b.unwrap_or(-1.0)));
    thresholds.dedup();
    let mut sweep = Vec::new();
    for t in thresholds {
        let reuse = |r: &Row| match r.forced_outcome {
            Outcome::ExactHit => true,
            Outcome::NearHit => t.is_some_and(|t| r.forced_distance.is_some_and(|d| d <= t)),
            Outcome::Miss => false,
        };
        let chosen: Vec<Vec<f32>> = rows
            .iter()
            .map(|r| {
                if reuse(r) {
                    r.forced.clone()
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
        let time: f64 = rows
            .iter()
            .map(|r| {
                if reuse(r) {
                    r.forced_ms
                } else {
                    r.exact_ms + mean_lookup_ms
                }
            })
            .sum();
        let accuracy = head.accuracy(&chosen, &ys)?;
        sweep.push(SweepPoint {
            threshold: t,
            hit_rate: rows.iter().filter(|r| reuse(r)).count() as f64 / n,
            fidelity: Fidelity::of(&cos),
            accuracy,
            accuracy_drop_pt: 100.0 * (accuracy_exact - accuracy),
            e2e_speedup: sum(&|r| r.exact_ms) / time,
        });
    }

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
        threshold,
        calib_points: points.len(),
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
        sweep,
    })
}

fn floors(r: &Report) -> Vec<Floor> {
    let mut f = vec![
        Floor {
            what: "attention on a hit ≥ 2x faster than exact at 256 tokens".into(),
            measured: r.attention_speedup_256,
            met: r.attention_speedup_256 >= 2.0,
        },
        Floor {
            what: "end-to-end ≥ 1.15x vs exact on the redundant workloads".into(),
            measured: r.e2e_speedup_redundant,
            met: r.e2e_speedup_redundant >= 1.15,
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
        let r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an attncache-eval result", json.display()))?;
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
    let mut loads = Vec::new();
    for name in &args.workloads {
        loads.push(match name.as_str() {
            "spam" => workloads::spam(
                &args.data.join("spam-assassin"),
                workloads::CLASSIFY_PREFIX,
                Sizes {
                    store: args.spam_store,
                    calib: args.spam_calib,
                    test: args.spam_test,
                },
            )?,
            "sentiment-template" => workloads::sentiment(
                &sentiment_dir,
                name,
                Kind::Redundant,
                workloads::CLASSIFY_PREFIX,
                Some(workloads::TEMPLATE),
                sizes,
            )?,
            "sentiment" => {
                workloads::sentiment(&sentiment_dir, name, Kind::Diverse, "", None, sizes)?
            }
            other => {
                anyhow::bail!("unknown workload {other:?}: spam, sentiment-template or sentiment")
            }
        });
    }
    let steps: usize = loads
        .iter()
        .map(|w| w.store.len() + 2 * w.calib.len() + 4 * w.test.len())
        .sum();
    let bar = progress_bar(steps, "eval")?;
    bar.set_style(indicatif::ProgressStyle::with_template(
        "{msg:28} {bar:30} {pos}/{len} requests {elapsed_precise} (eta {eta})",
    )?);
    let mut reports = Vec::new();
    for wl in &loads {
        reports.push(run_workload(&args, wl, &tok, &bar).await?);
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
        floors: Vec::new(),
        workloads: reports,
        attention,
        command: std::env::args().collect::<Vec<_>>().join(" "),
        commit,
        machine: provenance::machine(),
        seconds: started.elapsed().as_secs_f64(),
        date: provenance::now_utc(),
    };
    report.floors = floors(&report);
    std::fs::create_dir_all(&args.out)?;
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
