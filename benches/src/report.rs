//! What `attncache-eval` measures and how it writes it: JSON, a Markdown table, an SVG plot.

use serde::{Deserialize, Serialize};

use crate::stats::{Fidelity, Latency};
use crate::workloads::Kind;

/// One threshold of the sweep, composed from per-input measurements of one run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Similarity threshold (`None`: identical token ids only).
    pub threshold: Option<f32>,
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
    /// Threshold chosen on the calibration split (`None`: identical inputs only).
    pub threshold: Option<f32>,
    /// Calibration inputs that had a same-length neighbour.
    pub calib_points: usize,
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
    /// The threshold sweep.
    pub sweep: Vec<SweepPoint>,
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

fn opt_threshold(t: Option<f32>) -> String {
    t.map_or("exact only".to_string(), |t| format!("{t:.4}"))
}

/// The Markdown tables of a report.
pub fn markdown(r: &Report) -> String {
    let mut s = format!(
        "# AttnCache evaluation\n\n`{}` — commit `{}`, {}, {}, {:.0} s\n\n",
        r.command, r.commit, r.machine, r.date, r.seconds
    );
    s += "## Served run (calibrated threshold; stock / exact / cache interleaved per input)\n\n";
    s += "| workload | kind | test | tokens | threshold | hit rate | stock p50 / p99 ms | exact p50 / p99 ms | cache p50 / p99 ms | cache vs exact | cache vs stock | fidelity mean / p1 / min | accuracy exact → cache | bytes/entry |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for w in &r.workloads {
        s += &format!(
            "| {} | {:?} | {} | {:.0} | {} | {:.1}% ({:.1}% identical) | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.3}x | {:.2}x | {:.4} / {:.4} / {:.4} | {:.1}% → {:.1}% ({:+.1} pt) | {:.2} MB |\n",
            w.name,
            w.kind,
            w.test,
            w.mean_tokens,
            opt_threshold(w.threshold),
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
    s += "\n## Threshold sweep (frozen warm-up store; composed from per-input times of this run)\n\n| workload | threshold | hit rate | fidelity mean / p1 | accuracy drop pt | speedup vs exact |\n|---|---|---|---|---|---|\n";
    for w in &r.workloads {
        for p in &w.sweep {
            s += &format!(
                "| {} | {} | {:.1}% | {:.4} / {:.4} | {:.2} | {:.3}x |\n",
                w.name,
                opt_threshold(p.threshold),
                100.0 * p.hit_rate,
                p.fidelity.mean,
                p.fidelity.p1,
                p.accuracy_drop_pt,
                p.e2e_speedup
            );
        }
    }
    s += "\n## Floors (issue 6)\n\n| floor | measured | met |\n|---|---|---|\n";
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

/// One quantity of a sweep point, drawn against the hit rate.
type Metric = Box<dyn Fn(&SweepPoint) -> f64>;

const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Two panels against hit rate, one line per workload over the sweep: accuracy drop (points)
/// and end-to-end speedup vs the exact path; the calibrated threshold's point is circled.
pub fn plot(r: &Report) -> String {
    let (pw, ph, m) = (420.0, 320.0, 55.0);
    let w = 2.0 * pw;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{}' font-family='sans-serif' font-size='12'>\
<rect width='100%' height='100%' fill='white'/>",
        ph + 30.0
    );
    let points = |f: &dyn Fn(&SweepPoint) -> f64| {
        r.workloads
            .iter()
            .flat_map(|w| w.sweep.iter().map(f))
            .filter(|v| v.is_finite())
            .collect::<Vec<f64>>()
    };
    let panels: [(&str, Metric); 2] = [
        (
            "accuracy drop (points)",
            Box::new(|p: &SweepPoint| p.accuracy_drop_pt),
        ),
        (
            "end-to-end speedup vs exact",
            Box::new(|p: &SweepPoint| p.e2e_speedup),
        ),
    ];
    for (i, (title, f)) in panels.iter().enumerate() {
        let x0 = i as f64 * pw;
        let vals = points(f.as_ref());
        // accuracy drop from 0; speedup from just under 1x (or the slowest point)
        let lo = if i == 1 {
            vals.iter().copied().fold(1.0f64, f64::min) - 0.02
        } else {
            vals.iter().copied().fold(0.0f64, f64::min)
        };
        let hi = vals.iter().copied().fold(lo + 1e-3, f64::max);
        let x = |h: f64| x0 + m + (pw - 1.5 * m) * h;
        let y = |v: f64| 30.0 + (ph - m) * (1.0 - (v - lo) / (hi - lo));
        svg += &format!(
            "<text x='{}' y='20'>{title} against hit rate</text>\
<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{}' y1='30' x2='{}' y2='{}' stroke='black'/>\
<text x='{}' y='{}' text-anchor='middle'>hit rate</text>\
<text x='{}' y='{}' text-anchor='middle'>0%</text><text x='{}' y='{}' text-anchor='middle'>100%</text>\
<text x='{}' y='{}'>{hi:.2}</text><text x='{}' y='{}'>{lo:.2}</text>",
            x0 + m,
            x(0.0),
            y(lo),
            x(1.0),
            y(lo),
            x(0.0),
            x(0.0),
            y(lo),
            x(0.5),
            y(lo) + 28.0,
            x(0.0),
            y(lo) + 14.0,
            x(1.0),
            y(lo) + 14.0,
            x0 + 5.0,
            y(hi) + 4.0,
            x0 + 5.0,
            y(lo)
        );
        if i == 1 {
            svg += &format!(
                "<line x1='{}' y1='{}' x2='{}' y2='{}' stroke='grey' stroke-dasharray='4'/>",
                x(0.0),
                y(1.0),
                x(1.0),
                y(1.0)
            );
        }
        for (k, wl) in r.workloads.iter().enumerate() {
            let colour = COLOURS[k % COLOURS.len()];
            let mut pts: Vec<(f64, f64, bool)> = wl
                .sweep
                .iter()
                .filter(|p| f(p).is_finite())
                .map(|p| (p.hit_rate, f(p), p.threshold == wl.threshold))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let line: Vec<String> = pts
                .iter()
                .map(|(h, v, _)| format!("{:.1},{:.1}", x(*h), y(*v)))
                .collect();
            svg += &format!(
                "<polyline fill='none' stroke='{colour}' stroke-width='1.5' points='{}'/>",
                line.join(" ")
            );
            for (h, v, chosen) in &pts {
                svg += &format!(
                    "<circle cx='{:.1}' cy='{:.1}' r='{}' fill='{}' stroke='{colour}'/>",
                    x(*h),
                    y(*v),
                    if *chosen { 6 } else { 3 },
                    if *chosen { "none" } else { colour }
                );
            }
            if i == 0 {
                svg += &format!(
                    "<text x='{}' y='{}' fill='{colour}'>{}</text>",
                    x(0.05),
                    45.0 + 15.0 * k as f64,
                    wl.name
                );
            }
        }
    }
    svg + "</svg>"
}
