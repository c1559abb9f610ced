//! What `attncache-eval` measures and how it writes it: JSON, a Markdown table, an SVG plot.

use serde::{Deserialize, Serialize};

use crate::stats::{Fidelity, Latency};
use crate::workloads::Kind;

/// One target error of a lever's sweep, composed from per-input measurements of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    /// The gate's target `1 − cosine` (`None`: identical token ids only).
    pub max_error: Option<f64>,
    /// Test inputs that reuse maps at this threshold.
    pub hit_rate: f64,
    /// Cosine to the exact embedding over all test inputs.
    pub fidelity: Fidelity,
    /// Head accuracy on these embeddings.
    pub accuracy: f64,
    /// Exact accuracy minus this accuracy, points.
    pub accuracy_drop_pt: f64,
    /// Total exact time / total time with reuse on hits (measured hit times; exact time plus
    /// the measured mean lookup on misses).
    pub e2e_speedup: f64,
    /// Total exact time of the test inputs, ms.
    pub exact_ms: f64,
    /// Total composed time with reuse, ms.
    pub reuse_ms: f64,
}

impl SweepPoint {
    /// Within the safety bounds of issue 9: accuracy drop ≤ 0.3 pt and fidelity mean ≥ 0.99.
    pub fn is_safe(&self) -> bool {
        self.accuracy_drop_pt <= SAFE_DROP_PT && self.fidelity.mean >= SAFE_FIDELITY
    }
}

/// Largest accuracy drop (points) a safe configuration may cost.
pub const SAFE_DROP_PT: f64 = 0.3;
/// Smallest mean fidelity (cosine to exact) a safe configuration may have.
pub const SAFE_FIDELITY: f64 = 0.99;

/// One lever configuration (a [`attncache_plugin::ReusePolicy`] with its calibrated gate),
/// measured on one workload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeverReport {
    /// Name (`all`, `layers=12`, `all+recompute`, …).
    pub name: String,
    /// The policy.
    pub policy: attncache_plugin::ReusePolicy,
    /// The gate calibrated for it on the calibration split (`None`: too few pairs).
    pub gate: Option<attncache_plugin::ErrorGate>,
    /// Calibration pairs (inputs with a same-length neighbour).
    pub calib_pairs: usize,
    /// Test inputs with a same-length neighbour.
    pub test_pairs: usize,
    /// Spearman correlation of the gate's prediction with the measured error on the
    /// calibration pairs (in sample) and on the test pairs (held out).
    pub spearman_calib: Option<f64>,
    /// On the test pairs (held out).
    pub spearman_test: Option<f64>,
    /// Mean time of a test input taking the best-ranked neighbour's maps, ms, and the same
    /// inputs on the exact path.
    pub reuse_ms: Option<f64>,
    /// The same inputs on the exact path, ms.
    pub reuse_inputs_exact_ms: Option<f64>,
    /// Mean measured error of those reuses and its 90th percentile.
    pub reuse_loss_mean: Option<f64>,
    /// 90th percentile.
    pub reuse_loss_p90: Option<f64>,
    /// The test reuses' error by the share of positions that differ from the neighbour.
    pub by_differing: Vec<ErrorBucket>,
    /// The sweep over target errors.
    pub sweep: Vec<SweepPoint>,
}

/// Reuse errors of the test pairs whose differing share falls in one bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBucket {
    /// Upper end of the bucket's differing share (the lower end is the previous bucket's).
    pub max_share: f64,
    /// Pairs in the bucket.
    pub pairs: usize,
    /// Mean `1 − cosine`.
    pub loss_mean: Option<f64>,
    /// 90th percentile.
    pub loss_p90: Option<f64>,
}

/// How much reusing one layer alone costs (calibration inputs, best-ranked neighbour).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSensitivity {
    /// Layer.
    pub layer: usize,
    /// Mean `1 − cosine` when only this layer reuses.
    pub mean_loss: f64,
}

/// How much reusing one head of one layer alone costs (calibration inputs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeadSensitivity {
    /// Layer.
    pub layer: usize,
    /// Query head.
    pub head: usize,
    /// Mean `1 − cosine` when only this head of this layer reuses.
    pub mean_loss: f64,
}

/// The configuration that is fastest while safe on the redundant workloads (pooled).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ParetoBest {
    /// Lever name.
    pub lever: String,
    /// The policy.
    pub policy: attncache_plugin::ReusePolicy,
    /// Target error.
    pub max_error: f64,
    /// Pooled hit rate on the redundant workloads.
    pub hit_rate: f64,
    /// Pooled speedup vs exact on the redundant workloads.
    pub e2e_speedup: f64,
    /// Largest accuracy drop among them.
    pub accuracy_drop_pt: f64,
    /// Pooled fidelity mean.
    pub fidelity_mean: f64,
}

/// Per-workload results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadReport {
    /// Workload name.
    pub name: String,
    /// Redundant or diverse.
    pub kind: Kind,
    /// Inputs in the warm-up store, calibration and test splits.
    pub store: usize,
    /// Calibration inputs.
    pub calib: usize,
    /// Test inputs.
    pub test: usize,
    /// Mean tokens of a test input.
    pub mean_tokens: f64,
    /// The lever the served run used (chosen on the calibration split).
    pub served_lever: String,
    /// Its target error (`None`: identical inputs only).
    pub served_max_error: Option<f64>,
    /// Test inputs that reused maps in the served run.
    pub hit_rate: f64,
    /// Of which identical token ids.
    pub exact_hit_rate: f64,
    /// Hits served from the hot tier / cold tier.
    pub hot_hits: u64,
    /// Hits read from the cold tier.
    pub cold_hits: u64,
    /// Latency, stock attention, cache off.
    pub stock: Latency,
    /// Latency, our exact attention, cache off.
    pub exact: Latency,
    /// Latency, cache on.
    pub cache: Latency,
    /// Total exact time / total cache time (same inputs, interleaved).
    pub e2e_speedup: f64,
    /// Total stock time / total cache time.
    pub e2e_speedup_vs_stock: f64,
    /// Total stock time / total exact time.
    pub exact_speedup_vs_stock: f64,
    /// Mean request time of the hits, cache on, ms (`None`: no hits).
    pub hit_request_ms: Option<f64>,
    /// Mean request time of the same inputs on the exact path, ms.
    pub hit_inputs_exact_ms: Option<f64>,
    /// Misses, cache on: total time / total exact time of the same inputs, minus 1 (the
    /// cost of looking up and recording); `None` without misses.
    #[serde(default)]
    pub miss_overhead: Option<f64>,
    /// Share of the cache-on time spent in lookups.
    pub lookup_share: f64,
    /// Mean lookup time, µs.
    pub mean_lookup_us: f64,
    /// Cosine between cache-on and cache-off embeddings, all test inputs.
    pub fidelity: Fidelity,
    /// The same over the hits only.
    pub hit_fidelity: Option<Fidelity>,
    /// Cosine between stock and exact embeddings.
    pub exact_vs_stock: Fidelity,
    /// Head accuracy, cache off (exact path).
    pub accuracy_exact: f64,
    /// Head accuracy, cache on.
    pub accuracy_cache: f64,
    /// Exact minus cache accuracy, points.
    pub accuracy_drop_pt: f64,
    /// Head accuracy on the stock path's embeddings.
    pub accuracy_stock: f64,
    /// Stored entries and their bytes at the end.
    pub entries: u64,
    /// Bytes of one stored entry, mean.
    pub bytes_per_entry: f64,
    /// Hot-tier bytes at the end.
    pub hot_bytes: u64,
    /// Cold-tier bytes at the end.
    pub cold_bytes: u64,
    /// Each lever, with its sweep over target errors.
    pub levers: Vec<LeverReport>,
    /// Reusing one layer at a time (empty when no lever reuses a subset of layers).
    pub layer_sensitivity: Vec<LayerSensitivity>,
    /// Reusing one (layer, head) map at a time (empty when no lever reuses a subset of heads).
    #[serde(default)]
    pub head_sensitivity: Vec<HeadSensitivity>,
    /// Lever 4: the same test inputs against larger stores (diverse workload only).
    #[serde(default)]
    pub db_sizes: Vec<DbSizeReport>,
}

/// The levers measured against a store of one size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbSizeReport {
    /// Inputs stored (the store split plus corpus sentences).
    pub stored: usize,
    /// Of which corpus sentences.
    pub corpus: usize,
    /// Entries in the store (inputs outside the cached lengths are not stored).
    pub entries: u64,
    /// Bytes of the cold tier on disk.
    pub bytes_on_disk: u64,
    /// Each lever's report at this size.
    pub levers: Vec<LeverReport>,
}

/// One layer's attention at one length: median times of the exact path and of a hit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttentionTiming {
    /// Tokens.
    pub tokens: usize,
    /// mistral.rs's kernel, median ms.
    pub stock_ms: f64,
    /// Our exact attention, median ms.
    pub exact_ms: f64,
    /// A hit (decode stored f16 maps + P·V), median ms.
    pub hit_ms: f64,
    /// exact / hit.
    pub speedup: f64,
}

/// A floor of issue 6 and whether this run met it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Floor {
    /// What is required.
    pub what: String,
    /// The measured value.
    pub measured: f64,
    /// Met.
    pub met: bool,
}

/// The whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Hit rate over all test inputs (served run, calibrated thresholds).
    pub hit_rate: f64,
    /// One layer at 256 tokens: exact time / hit time.
    pub attention_speedup_256: f64,
    /// Over all test inputs: total exact time / total cache time.
    pub e2e_speedup: f64,
    /// Over all test inputs: total stock time / total cache time.
    pub e2e_speedup_vs_stock: f64,
    /// The same as `e2e_speedup` over the redundant workloads.
    pub e2e_speedup_redundant: f64,
    /// The largest accuracy drop of any workload, points.
    pub accuracy_drop_pt: f64,
    /// Mean cosine (cache on vs off) over all test inputs.
    pub fidelity_cos_mean: f64,
    /// 1st percentile of that cosine.
    pub fidelity_cos_p1: f64,
    /// Mean bytes of a stored entry over all workloads.
    pub bytes_per_entry: f64,
    /// Hit rate of [`Report::pareto_best`] on the redundant workloads (pooled), when it is
    /// safe (accuracy drop ≤ 0.3 pt, fidelity mean ≥ 0.99); 0 when nothing that reuses is.
    pub safe_hit_rate_redundant: f64,
    /// Hit rate of the same configuration on the other (diverse and templated) workloads
    /// when it is safe on all of them; 0 when it refuses everything or is not safe.
    pub safe_hit_rate_diverse: f64,
    /// Whether `pareto_best` is safe on the other (diverse and templated) workloads.
    pub pareto_best_safe_on_diverse: bool,
    /// The fastest configuration that is safe on the redundant workloads.
    pub pareto_best: Option<ParetoBest>,
    /// The floors and whether they were met.
    pub floors: Vec<Floor>,
    /// Per workload.
    pub workloads: Vec<WorkloadReport>,
    /// One layer's attention at several lengths.
    pub attention: Vec<AttentionTiming>,
    /// The command that produced this.
    pub command: String,
    /// Git commit (with `-dirty` for uncommitted changes).
    pub commit: String,
    /// CPU, cores and memory.
    pub machine: String,
    /// Seconds the run took.
    pub seconds: f64,
    /// When it ran (UTC, RFC 3339).
    pub date: String,
}

fn opt_error(t: Option<f64>) -> String {
    t.map_or("exact only".to_string(), |t| format!("{t}"))
}

/// The Markdown tables of a report.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# AttnCache evaluation\n\n`{}` — commit `{}`, {}, {}, {:.0} s\n\n",
        r.command, r.commit, r.machine, r.date, r.seconds
    );
    s += "## Summary (issue 9)\n\n";
    match &r.pareto_best {
        Some(b) => {
            s += &format!(
                "Pareto-best safe configuration on the redundant workloads (pooled): **{} at max error {}** — hit rate {:.1}%, {:.3}x vs exact, worst accuracy drop {:.2} pt, fidelity mean {:.4}. On the other (diverse, templated) workloads it is {} (hit rate {:.1}%).\n\n",
                b.lever,
                b.max_error,
                100.0 * b.hit_rate,
                b.e2e_speedup,
                b.accuracy_drop_pt,
                b.fidelity_mean,
                if r.pareto_best_safe_on_diverse { "safe" } else { "**not safe**" },
                100.0 * r.safe_hit_rate_diverse
            );
        }
        None => s += "No configuration that reuses maps is safe on the redundant workloads.\n\n",
    }
    s += &format!(
        "safe_hit_rate_redundant {:.3}, safe_hit_rate_diverse {:.3} (safe: accuracy drop ≤ {SAFE_DROP_PT} pt and fidelity mean ≥ {SAFE_FIDELITY}).\n\n",
        r.safe_hit_rate_redundant, r.safe_hit_rate_diverse
    );
    s += "## Served run (lever and target chosen on the calibration split; stock / exact / cache interleaved per input)\n\n";
    s += "| workload | kind | test | tokens | lever / max error | hit rate | stock p50 / p99 ms | exact p50 / p99 ms | cache p50 / p99 ms | cache vs exact | cache vs stock | fidelity mean / p1 / min | accuracy exact → cache | bytes/entry |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for w in &r.workloads {
        s += &format!(
            "| {} | {:?} | {} | {:.0} | {} / {} | {:.1}% ({:.1}% identical) | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.3}x | {:.2}x | {:.4} / {:.4} / {:.4} | {:.1}% → {:.1}% ({:+.1} pt) | {:.2} MB |\n",
            w.name,
            w.kind,
            w.test,
            w.mean_tokens,
            w.served_lever,
            opt_error(w.served_max_error),
            100.0 * w.hit_rate,
            100.0 * w.exact_hit_rate,
            w.stock.p50_ms,
            w.stock.p99_ms,
            w.exact.p50_ms,
            w.exact.p99_ms,
            w.cache.p50_ms,
            w.cache.p99_ms,
            w.e2e_speedup,
            w.e2e_speedup_vs_stock,
            w.fidelity.mean,
            w.fidelity.p1,
            w.fidelity.min,
            100.0 * w.accuracy_exact,
            100.0 * w.accuracy_cache,
            -w.accuracy_drop_pt,
            w.bytes_per_entry / 1e6
        );
    }
    s += &format!(
        "\nOverall: hit rate {:.1}%, cache vs exact {:.3}x (redundant workloads {:.3}x), cache vs stock {:.2}x, fidelity mean {:.4} p1 {:.4}, worst accuracy drop {:.2} pt.\n\n",
        100.0 * r.hit_rate,
        r.e2e_speedup,
        r.e2e_speedup_redundant,
        r.e2e_speedup_vs_stock,
        r.fidelity_cos_mean,
        r.fidelity_cos_p1,
        r.accuracy_drop_pt
    );
    s += "| workload | hits: request ms (cache) vs same inputs exact | misses: extra time vs exact | mean lookup µs | lookup share | hot / cold hits | entries | hot / cold MB | stock→exact accuracy | exact vs stock cosine min |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for w in &r.workloads {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.3}% | {} / {} | {} | {:.0} / {:.0} | {:.1}% / {:.1}% | {:.6} |\n",
            w.name,
            match (w.hit_request_ms, w.hit_inputs_exact_ms) {
                (Some(h), Some(e)) => format!("{h:.0} vs {e:.0} ({:.2}x)", e / h),
                _ => "no hits".to_string(),
            },
            w.miss_overhead
                .map_or("no misses".to_string(), |o| format!("{:+.1}%", 100.0 * o)),
            w.mean_lookup_us,
            100.0 * w.lookup_share,
            w.hot_hits,
            w.cold_hits,
            w.entries,
            w.hot_bytes as f64 / 1e6,
            w.cold_bytes as f64 / 1e6,
            100.0 * w.accuracy_stock,
            100.0 * w.accuracy_exact,
            w.exact_vs_stock.min
        );
    }
    s += "\n## One layer's attention (EmbeddingGemma shapes, median ms)\n\n| tokens | stock | exact | hit | exact / hit |\n|---|---|---|---|---|\n";
    for a in &r.attention {
        s += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.2}x |\n",
            a.tokens, a.stock_ms, a.exact_ms, a.hit_ms, a.speedup
        );
    }
    s += "\n## Levers (frozen warm-up store; each test input once per lever with its best-ranked neighbour's maps; sweeps composed from those times)\n\n";
    s += "| workload | lever | calib / test pairs | gate Spearman calib / held-out | reuse: ms vs exact ms | reuse error mean / p90 |\n|---|---|---|---|---|---|\n";
    let opt = |v: Option<f64>, p: usize| v.map_or("–".to_string(), |v| format!("{v:.p$}"));
    for w in &r.workloads {
        for l in &w.levers {
            s += &format!(
                "| {} | {} | {} / {} | {} / {} | {} vs {} | {} / {} |\n",
                w.name,
                l.name,
                l.calib_pairs,
                l.test_pairs,
                opt(l.spearman_calib, 3),
                opt(l.spearman_test, 3),
                opt(l.reuse_ms, 1),
                opt(l.reuse_inputs_exact_ms, 1),
                opt(l.reuse_loss_mean, 4),
                opt(l.reuse_loss_p90, 4),
            );
        }
    }
    s += "\nReuse error (1 − cosine, mean / p90) of the test pairs by the share of positions that differ from the neighbour:\n\n| workload | lever |";
    for b in ERROR_BUCKETS_HEAD {
        s += &format!(" {b} |");
    }
    s += "\n|---|---|";
    for _ in ERROR_BUCKETS_HEAD {
        s += "---|";
    }
    s += "\n";
    for w in &r.workloads {
        for l in &w.levers {
            s += &format!("| {} | {} |", w.name, l.name);
            for b in &l.by_differing {
                s += &match (b.loss_mean, b.loss_p90) {
                    (Some(m), Some(p)) => format!(" {m:.4} / {p:.4} ({}) |", b.pairs),
                    _ => " – |".to_string(),
                };
            }
            s += "\n";
        }
    }
    s += "\n| workload | lever | max error | hit rate | fidelity mean / p1 | accuracy drop pt | speedup vs exact | safe |\n|---|---|---|---|---|---|---|---|\n";
    for w in &r.workloads {
        for l in &w.levers {
            for p in &l.sweep {
                s += &format!(
                    "| {} | {} | {} | {:.1}% | {:.4} / {:.4} | {:.2} | {:.3}x | {} |\n",
                    w.name,
                    l.name,
                    opt_error(p.max_error),
                    100.0 * p.hit_rate,
                    p.fidelity.mean,
                    p.fidelity.p1,
                    p.accuracy_drop_pt,
                    p.e2e_speedup,
                    if p.is_safe() { "yes" } else { "no" }
                );
            }
        }
    }
    for w in r
        .workloads
        .iter()
        .filter(|w| !w.layer_sensitivity.is_empty())
    {
        let mut sens = w.layer_sensitivity.clone();
        sens.sort_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss));
        s += &format!(
            "\n{}: layers from least to most sensitive (mean 1 − cosine when reusing that layer alone): {}\n",
            w.name,
            sens.iter()
                .map(|l| format!("{} ({:.1e})", l.layer, l.mean_loss))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for w in r
        .workloads
        .iter()
        .filter(|w| !w.head_sensitivity.is_empty())
    {
        let mut sens = w.head_sensitivity.clone();
        sens.sort_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss));
        s += &format!(
            "\n{}: (layer:head) maps from least to most sensitive (mean 1 − cosine when reusing that map alone): {}\n",
            w.name,
            sens.iter()
                .map(|h| format!("{}:{} ({:.1e})", h.layer, h.head, h.mean_loss))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for w in r.workloads.iter().filter(|w| !w.db_sizes.is_empty()) {
        s += &format!(
            "\n## Database size ({}: store split plus nlp-corpus sentences)\n\n| stored inputs | entries | on disk | lever | test pairs | reuse error mean / p90 | hit rate / accuracy drop at the largest safe target | ungated: fidelity mean / accuracy drop |\n|---|---|---|---|---|---|---|---|\n",
            w.name
        );
        for d in &w.db_sizes {
            for l in &d.levers {
                let safe = l
                    .sweep
                    .iter()
                    .filter(|p| p.max_error.is_some() && p.is_safe())
                    .max_by(|a, b| a.hit_rate.total_cmp(&b.hit_rate));
                let all = l.sweep.last();
                s += &format!(
                    "| {} | {} | {:.1} GB | {} | {} | {} / {} | {} | {} |\n",
                    d.stored,
                    d.entries,
                    d.bytes_on_disk as f64 / 1e9,
                    l.name,
                    l.test_pairs,
                    opt(l.reuse_loss_mean, 4),
                    opt(l.reuse_loss_p90, 4),
                    safe.map_or("–".to_string(), |p| format!(
                        "{:.1}% / {:.2} pt",
                        100.0 * p.hit_rate,
                        p.accuracy_drop_pt
                    )),
                    all.map_or("–".to_string(), |p| format!(
                        "{:.4} / {:.2} pt",
                        p.fidelity.mean, p.accuracy_drop_pt
                    )),
                );
            }
        }
    }
    s += "\n## Floors\n\n| floor | measured | met |\n|---|---|---|\n";
    for f in &r.floors {
        s += &format!(
            "| {} | {:.4} | {} |\n",
            f.what,
            f.measured,
            if f.met { "yes" } else { "**no**" }
        );
    }
    s
}

/// Column heads of the differing-share buckets (`ERROR_BUCKETS` of the eval).
const ERROR_BUCKETS_HEAD: [&str; 6] = ["≤ 2%", "2–5%", "5–10%", "10–25%", "25–50%", "> 50%"];

const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
];

/// The Pareto plot: one panel per workload, end-to-end speedup vs exact (y) against the
/// accuracy drop in points (x), one line per lever over its target errors; the safe region
/// (drop ≤ 0.3 pt) is shaded and the served configuration is circled.
pub fn plot(r: &Report) -> String {
    let (pw, ph, m) = (400.0, 300.0, 55.0);
    let n = r.workloads.len().max(1);
    let cols = n.min(2);
    let rows = n.div_ceil(cols);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' font-family='sans-serif' font-size='12'>\
<rect width='100%' height='100%' fill='white'/>",
        cols as f64 * pw,
        rows as f64 * (ph + 40.0)
    );
    for (i, wl) in r.workloads.iter().enumerate() {
        let (x0, y0) = ((i % cols) as f64 * pw, (i / cols) as f64 * (ph + 40.0));
        let pts: Vec<&SweepPoint> = wl.levers.iter().flat_map(|l| &l.sweep).collect();
        let drop_hi = pts
            .iter()
            .map(|p| p.accuracy_drop_pt)
            .filter(|v| v.is_finite())
            .fold(1.0f64, f64::max);
        let drop_lo = pts
            .iter()
            .map(|p| p.accuracy_drop_pt)
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::min);
        let sp: Vec<f64> = pts
            .iter()
            .map(|p| p.e2e_speedup)
            .filter(|v| v.is_finite())
            .collect();
        let lo = sp.iter().copied().fold(1.0f64, f64::min) - 0.02;
        let hi = sp.iter().copied().fold(lo + 0.05, f64::max) + 0.01;
        let x = |d: f64| x0 + m + (pw - 1.5 * m) * (d - drop_lo) / (drop_hi - drop_lo);
        let y = |v: f64| y0 + 40.0 + (ph - m) * (1.0 - (v - lo) / (hi - lo));
        svg += &format!(
            "<rect x='{:.1}' y='{:.1}' width='{:.1}' height='{:.1}' fill='#eef7ee'/>\
<text x='{}' y='{}'>{} ({:?}): speedup vs exact against accuracy drop</text>\
<line x1='{:.1}' y1='{:.1}' x2='{:.1}' y2='{:.1}' stroke='black'/><line x1='{:.1}' y1='{:.1}' x2='{:.1}' y2='{:.1}' stroke='black'/>\
<text x='{:.1}' y='{:.1}' text-anchor='middle'>accuracy drop (points)</text>\
<text x='{:.1}' y='{:.1}' text-anchor='middle'>{drop_lo:.1}</text><text x='{:.1}' y='{:.1}' text-anchor='middle'>{drop_hi:.1}</text>\
<text x='{}' y='{:.1}'>{hi:.2}x</text><text x='{}' y='{:.1}'>{lo:.2}x</text>\
<line x1='{:.1}' y1='{:.1}' x2='{:.1}' y2='{:.1}' stroke='grey' stroke-dasharray='4'/>",
            x(drop_lo.max(-1e9)),
            y(hi),
            (x(SAFE_DROP_PT.min(drop_hi)) - x(drop_lo)).max(0.0),
            y(lo) - y(hi),
            x0 + m,
            y0 + 25.0,
            wl.name,
            wl.kind,
            x(drop_lo),
            y(lo),
            x(drop_hi),
            y(lo),
            x(drop_lo),
            y(lo),
            x(drop_lo),
            y(hi),
            x((drop_lo + drop_hi) / 2.0),
            y(lo) + 28.0,
            x(drop_lo),
            y(lo) + 14.0,
            x(drop_hi),
            y(lo) + 14.0,
            x0 + 5.0,
            y(hi) + 4.0,
            x0 + 5.0,
            y(lo),
            x(drop_lo),
            y(1.0),
            x(drop_hi),
            y(1.0)
        );
        for (k, lever) in wl.levers.iter().enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            let mut line: Vec<(f64, f64, bool)> = lever
                .sweep
                .iter()
                .filter(|p| p.e2e_speedup.is_finite() && p.accuracy_drop_pt.is_finite())
                .map(|p| {
                    let served =
                        lever.name == wl.served_lever && p.max_error == wl.served_max_error;
                    (p.accuracy_drop_pt, p.e2e_speedup, served)
                })
                .collect();
            line.sort_by(|a, b| a.1.total_cmp(&b.1));
            let path: Vec<String> = line
                .iter()
                .map(|(d, v, _)| format!("{:.1},{:.1}", x(*d), y(*v)))
                .collect();
            svg += &format!(
                "<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{}'/>",
                path.join(" ")
            );
            for (d, v, served) in &line {
                svg += &format!(
                    "<circle cx='{:.1}' cy='{:.1}' r='{}' fill='{}' stroke='{colour}'/>",
                    x(*d),
                    y(*v),
                    if *served { 7 } else { 3 },
                    if *served { "none" } else { colour }
                );
            }
            svg += &format!(
                "<text x='{:.1}' y='{:.1}' fill='{colour}'>{}</text>",
                x0 + pw - 1.4 * m - 60.0,
                y0 + 55.0 + 14.0 * k as f64,
                lever.name
            );
        }
    }
    svg + "</svg>"
}
