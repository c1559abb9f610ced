//! `attncache size --trace FILE --target-loss 0.05`: the offline hot-tier report. Replays
//! a recorded access trace (`attncache-server --access-trace FILE`) through the same
//! reuse-distance estimator and cost model the server uses, and prints the predicted
//! slowdown against hot-tier size, the chosen size, a JSON report and an SVG plot.

use std::path::{Path, PathBuf};

use anyhow::Context;
use attncache_plugin::tiering::access_trace::{self, TraceOp};
use attncache_plugin::tiering::costs::MeasuredCosts;
use attncache_plugin::tiering::sizing::{self, CostModel, ReuseSampler};
use serde::Serialize;

/// Flags of `attncache size`.
#[derive(Debug, Clone, clap::Args)]
pub struct SizeArgs {
    /// Access trace written by `attncache-server --access-trace FILE`.
    #[arg(long)]
    pub trace: PathBuf,
    /// Largest predicted slowdown against "everything in RAM" (0.05 = 5%).
    #[arg(long, default_value_t = 0.05)]
    pub target_loss: f64,
    /// Measured tier costs: the `tier-costs.json` the server keeps in its --cache-dir
    /// (the measurement whose entry size is nearest the trace's median is used).
    #[arg(long, required_unless_present_all = ["hot_hit_us", "cold_hit_us", "miss_us"])]
    pub costs: Option<PathBuf>,
    /// Time of a hot hit, µs (instead of --costs).
    #[arg(long, requires_all = ["cold_hit_us", "miss_us"])]
    pub hot_hit_us: Option<f64>,
    /// Time of a cold hit, µs (instead of --costs).
    #[arg(long)]
    pub cold_hit_us: Option<f64>,
    /// Time of a miss, µs (instead of --costs).
    #[arg(long)]
    pub miss_us: Option<f64>,
    /// Mean time of one input's whole forward pass, µs (the slowdown's denominator).
    /// Without it the slowdown is taken against attention time alone, which overstates it.
    #[arg(long)]
    pub request_us: Option<f64>,
    /// Largest hot tier considered, MiB. Default: every distinct entry of the trace.
    #[arg(long)]
    pub max_mib: Option<u64>,
    /// Where to write the report (JSON); the plot goes next to it (.svg).
    #[arg(long, default_value = "hot-tier-size.json")]
    pub out: PathBuf,
}

/// Flags of `attncache tier-costs`.
#[derive(Debug, Clone, clap::Args)]
pub struct TierCostsArgs {
    /// Model directory (its config.json gives the attention shape).
    #[arg(long, default_value_os_t = crate::server::cli::default_model_dir())]
    pub model: PathBuf,
    /// The server's --cache-dir: measurements are added to its tier-costs.json, which the
    /// server reads at start-up instead of measuring again.
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Input lengths to measure.
    #[arg(long, value_delimiter = ',', default_value = "64,128,256,512")]
    pub tokens: Vec<usize>,
    /// Repetitions per median.
    #[arg(long, default_value_t = 9)]
    pub reps: usize,
}

/// Measures the tier costs at each length (again, replacing earlier measurements) and
/// prints them.
pub fn run_costs(args: &TierCostsArgs) -> anyhow::Result<Vec<MeasuredCosts>> {
    let model = crate::server::model_dir::ModelDir::inspect(&args.model)?;
    let file = attncache_plugin::tiering::costs::cache_file(&args.cache_dir);
    println!(
        "{:>7} {:>10} {:>12} {:>12} {:>12}",
        "tokens", "entry MiB", "hot hit µs", "cold hit µs", "miss µs"
    );
    let mut all = Vec::new();
    for &tokens in &args.tokens {
        let shape = model
            .entry_shape(tokens)
            .context("config.json gives no attention shape")?;
        let m = attncache_plugin::tiering::costs::measure(
            &shape,
            attncache_plugin::tiering::costs::ColdSource::Dir(&args.cache_dir),
            args.reps,
        )?;
        println!(
            "{tokens:>7} {:>10.2} {:>12.0} {:>12.0} {:>12.0}",
            mib(shape.map_bytes()),
            m.hot_hit_ns / 1e3,
            m.cold_hit_ns / 1e3,
            m.miss_ns / 1e3
        );
        all.push(m);
    }
    let mut known: Vec<MeasuredCosts> = std::fs::read_to_string(&file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    known.retain(|k| !all.iter().any(|m| m.shape == k.shape));
    known.extend(all.iter().copied());
    std::fs::write(&file, serde_json::to_string_pretty(&known)?)
        .with_context(|| format!("cannot write {}", file.display()))?;
    println!("written: {}", file.display());
    Ok(all)
}

/// One point of the curve.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SizePoint {
    /// Hot-tier budget, bytes.
    pub hot_bytes: u64,
    /// Predicted share of re-accesses that miss the hot tier.
    pub miss_ratio: f64,
    /// Predicted slowdown against everything hot.
    pub slowdown: f64,
}

/// The report.
#[derive(Debug, Clone, Serialize)]
pub struct SizeReport {
    /// The trace.
    pub trace: PathBuf,
    /// Lookups in it (hits and misses).
    pub lookups: u64,
    /// Hit ratio of those lookups.
    pub hit_ratio: f64,
    /// Entries stored.
    pub inserts: u64,
    /// Distinct entries and their bytes (the "everything hot" size).
    pub distinct_entries: u64,
    /// Bytes of all distinct entries.
    pub distinct_bytes: u64,
    /// The costs used, ns.
    pub cost: CostModelReport,
    /// The target.
    pub target_loss: f64,
    /// The curve.
    pub points: Vec<SizePoint>,
    /// The chosen budget (the smallest within the target), bytes.
    pub chosen_bytes: u64,
    /// Its predicted slowdown.
    pub chosen_slowdown: f64,
    /// RAM saved against everything hot (share of `distinct_bytes`).
    pub ram_saved: f64,
}

/// [`CostModel`] as reported.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct CostModelReport {
    /// Hot hit, ns.
    pub hot_hit_ns: f64,
    /// Cold hit, ns.
    pub cold_hit_ns: f64,
    /// Miss, ns.
    pub miss_ns: f64,
    /// One input's whole forward pass, ns (0: unknown).
    pub request_ns: f64,
}

fn load_costs(args: &SizeArgs, median_bytes: u64) -> anyhow::Result<CostModel> {
    if let (Some(h), Some(c), Some(m)) = (args.hot_hit_us, args.cold_hit_us, args.miss_us) {
        return Ok(CostModel {
            hot_hit_ns: h * 1e3,
            cold_hit_ns: c * 1e3,
            miss_ns: m * 1e3,
            request_ns: args.request_us.unwrap_or(0.0) * 1e3,
        });
    }
    let path = args.costs.as_deref().context("--costs is required")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the tier costs {}", path.display()))?;
    let known: Vec<MeasuredCosts> = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a tier-costs.json", path.display()))?;
    let nearest = known
        .iter()
        .min_by_key(|m| m.shape.map_bytes().abs_diff(median_bytes))
        .with_context(|| format!("{} holds no measurement", path.display()))?;
    Ok(CostModel {
        request_ns: args.request_us.unwrap_or(0.0) * 1e3,
        ..nearest.cost_model()
    })
}

/// Replays the trace and writes the report and plot.
pub fn run(args: &SizeArgs) -> anyhow::Result<SizeReport> {
    let records = access_trace::read(&args.trace)?;
    let mut sampler = ReuseSampler::new(1.0, 1 << 22);
    let (mut hits, mut misses, mut inserts) = (0u64, 0u64, 0u64);
    let mut sizes = std::collections::HashMap::new();
    for r in &records {
        match r.op {
            TraceOp::Miss => misses += 1,
            TraceOp::Hit | TraceOp::Insert => {
                if r.op == TraceOp::Hit {
                    hits += 1;
                } else {
                    inserts += 1;
                }
                // scopes are separate caches: keep their keys apart
                let key = r.key ^ (r.scope as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                sampler.access(key, r.bytes);
                sizes.insert(key, r.bytes);
            }
        }
    }
    anyhow::ensure!(!sizes.is_empty(), "the trace has no stored entries");
    let distinct_bytes: u64 = sizes.values().sum();
    let mut by_size: Vec<u64> = sizes.values().copied().collect();
    by_size.sort_unstable();
    let cost = load_costs(args, by_size[by_size.len() / 2])?;
    let hit_ratio = hits as f64 / (hits + misses).max(1) as f64;
    let max_bytes = args.max_mib.map_or(distinct_bytes, |m| m << 20).max(1);
    let mut candidates: Vec<u64> = (1..=64u64).map(|k| max_bytes * k / 64).collect();
    candidates.retain(|b| *b > 0);
    let points: Vec<SizePoint> = candidates
        .iter()
        .map(|&b| {
            let miss = sampler.miss_ratio(b);
            SizePoint {
                hot_bytes: b,
                miss_ratio: miss,
                slowdown: cost.slowdown(hit_ratio, miss),
            }
        })
        .collect();
    let (chosen_bytes, chosen_slowdown) =
        sizing::choose_hot_bytes(&sampler, &cost, hit_ratio, args.target_loss, &candidates)
            .context("no candidate sizes")?;
    let report = SizeReport {
        trace: args.trace.clone(),
        lookups: hits + misses,
        hit_ratio,
        inserts,
        distinct_entries: sizes.len() as u64,
        distinct_bytes,
        cost: CostModelReport {
            hot_hit_ns: cost.hot_hit_ns,
            cold_hit_ns: cost.cold_hit_ns,
            miss_ns: cost.miss_ns,
            request_ns: cost.request_ns,
        },
        target_loss: args.target_loss,
        points,
        chosen_bytes,
        chosen_slowdown,
        ram_saved: 1.0 - chosen_bytes as f64 / distinct_bytes as f64,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    std::fs::write(args.out.with_extension("svg"), plot(&report))?;
    Ok(report)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Prints the curve (every 8th point and the chosen one) and where the files went.
pub fn print_summary(r: &SizeReport, out: &Path) {
    println!(
        "{} lookups (hit ratio {:.3}), {} inserts, {} distinct entries = {:.1} MiB",
        r.lookups,
        r.hit_ratio,
        r.inserts,
        r.distinct_entries,
        mib(r.distinct_bytes)
    );
    println!(
        "costs: hot hit {:.0} µs, cold hit {:.0} µs, miss {:.0} µs",
        r.cost.hot_hit_ns / 1e3,
        r.cost.cold_hit_ns / 1e3,
        r.cost.miss_ns / 1e3
    );
    println!("{:>12} {:>12} {:>12}", "hot MiB", "miss ratio", "slowdown");
    for (i, p) in r.points.iter().enumerate() {
        if i % 8 == 7 || p.hot_bytes == r.chosen_bytes {
            let mark = if p.hot_bytes == r.chosen_bytes {
                "  <- chosen"
            } else {
                ""
            };
            println!(
                "{:>12.2} {:>12.4} {:>11.2}%{mark}",
                mib(p.hot_bytes),
                p.miss_ratio,
                100.0 * p.slowdown
            );
        }
    }
    println!(
        "chosen: {:.2} MiB (predicted slowdown {:.2}%, target {:.2}%), {:.0}% less RAM than everything hot",
        mib(r.chosen_bytes),
        100.0 * r.chosen_slowdown,
        100.0 * r.target_loss,
        100.0 * r.ram_saved
    );
    println!(
        "report: {}, plot: {}",
        out.display(),
        out.with_extension("svg").display()
    );
}

fn plot(r: &SizeReport) -> String {
    let (w, h, m) = (640.0, 400.0, 55.0);
    let max_x = r.points.last().map_or(1.0, |p| mib(p.hot_bytes)).max(1e-9);
    let max_y = r
        .points
        .iter()
        .map(|p| p.slowdown)
        .fold(r.target_loss * 1.5, f64::max)
        .max(1e-9);
    let x = |v: f64| m + (w - 2.0 * m) * v / max_x;
    let y = |v: f64| h - m - (h - 2.0 * m) * v / max_y;
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
<rect width='100%' height='100%' fill='white'/>\
<text x='{m}' y='20'>predicted slowdown vs hot-tier size ({} lookups, hit ratio {:.2})</text>\
<line x1='{m}' y1='{b}' x2='{rr}' y2='{b}' stroke='black'/><line x1='{m}' y1='{m}' x2='{m}' y2='{b}' stroke='black'/>\
<text x='{cx}' y='{lx}' text-anchor='middle'>hot tier, MiB (max {max_x:.1})</text>\
<text x='14' y='{cy}' transform='rotate(-90 14 {cy})' text-anchor='middle'>predicted slowdown (max {:.1}%)</text>",
        r.lookups,
        r.hit_ratio,
        100.0 * max_y,
        b = h - m,
        rr = w - m,
        cx = w / 2.0,
        lx = h - 15.0,
        cy = h / 2.0
    );
    let ty = y(r.target_loss);
    svg += &format!(
        "<line x1='{m}' y1='{ty}' x2='{}' y2='{ty}' stroke='green' stroke-dasharray='4'/>\
<text x='{}' y='{}' fill='green'>target {:.1}%</text>",
        w - m,
        w - m - 90.0,
        ty - 4.0,
        100.0 * r.target_loss
    );
    let cx = x(mib(r.chosen_bytes));
    svg += &format!(
        "<line x1='{cx}' y1='{m}' x2='{cx}' y2='{}' stroke='red'/>\
<text x='{}' y='{}' fill='red'>chosen {:.1} MiB</text>",
        h - m,
        cx + 4.0,
        m + 14.0,
        mib(r.chosen_bytes)
    );
    let path: Vec<String> = r
        .points
        .iter()
        .map(|p| format!("{:.1},{:.1}", x(mib(p.hot_bytes)), y(p.slowdown)))
        .collect();
    svg += &format!(
        "<polyline points='{}' fill='none' stroke='steelblue' stroke-width='2'/>",
        path.join(" ")
    );
    svg + "</svg>"
}

#[cfg(test)]
mod tests {
    use super::*;
    use attncache_plugin::tiering::access_trace::AccessTrace;

    /// A scan over 100 entries of 1 MiB repeated 5 times: LRU needs all of them (less
    /// RAM misses every re-access), so the chosen size is the whole set.
    #[test]
    fn a_cyclic_scan_needs_everything_and_a_hot_set_needs_little() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, keys: &[u64]| {
            let path = dir.path().join(name);
            let t = AccessTrace::create(&path).unwrap();
            for &k in keys {
                t.record(TraceOp::Insert, 0, k, 1 << 20);
                t.record(TraceOp::Hit, 0, k, 1 << 20);
            }
            path
        };
        let scan: Vec<u64> = (0..5).flat_map(|_| 0..100u64).collect();
        // 10 hot entries used 9 times out of 10, 90 cold ones once each
        let skewed: Vec<u64> = (0..900u64)
            .map(|i| if i % 10 == 9 { 100 + i / 10 } else { i % 10 })
            .collect();
        let args = |trace: PathBuf, out: &str| SizeArgs {
            trace,
            target_loss: 0.05,
            costs: None,
            hot_hit_us: Some(100.0),
            cold_hit_us: Some(1100.0),
            miss_us: Some(3000.0),
            request_us: None,
            max_mib: None,
            out: dir.path().join(out),
        };
        let scan = run(&args(write("scan.csv", &scan), "scan.json")).unwrap();
        assert_eq!(scan.distinct_bytes, 100 << 20);
        assert!(scan.chosen_bytes >= 99 << 20, "{}", scan.chosen_bytes);
        let skewed = run(&args(write("skewed.csv", &skewed), "skewed.json")).unwrap();
        assert!(skewed.chosen_bytes <= 25 << 20, "{}", skewed.chosen_bytes);
        assert!(skewed.chosen_slowdown <= 0.05);
        assert!(skewed.ram_saved >= 0.7, "{}", skewed.ram_saved);
        assert!(dir.path().join("skewed.svg").is_file());
    }
}
