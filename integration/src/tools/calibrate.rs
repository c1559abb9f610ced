//! `attncache calibrate`: measures what reusing a similar input's maps costs in fidelity,
//! per feature distance, and picks the similarity threshold from the measurement.
//!
//! 1. The warm half of the texts is embedded with the cache on (exact lookups only), so
//!    every warm input's maps and feature are stored.
//! 2. Every held-out input is embedded twice: flag off (exact), and with the cache forced to
//!    take the nearest stored input of the same length whatever the distance. The pair
//!    (feature distance, cosine of the two embeddings) is one calibration point. Held-out
//!    inputs are not recorded, so they never serve each other.
//! 3. The threshold is the largest distance `t` such that the points with distance ≤ `t`
//!    have mean cosine ≥ the target (and none below the floor). Reported with the hit rate
//!    it gives on the held-out inputs, and drawn as an SVG scatter plot.

use std::path::{Path, PathBuf};

use anyhow::Context;
use attncache_plugin::{ExactAttention, Outcome};
use clap::Parser;
use serde::Serialize;

use crate::server::cli::ServeArgs;
use crate::tools::local_server::{cosine, LocalServer};
pub use crate::tools::texts::load_texts;
use crate::tools::texts::one_word_variant;

/// Flags of `attncache calibrate`.
#[derive(Debug, Clone, Parser)]
pub struct CalibrateArgs {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = crate::server::cli::default_model_dir())]
    pub model: PathBuf,
    /// Texts: JSON arrays of strings or of objects with a "text" field, or plain text
    /// (one input per line). Several files are concatenated.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Use at most this many texts (after concatenation).
    #[arg(long, default_value_t = 600)]
    pub limit: usize,
    /// Held-out inputs are one-word variants of warm inputs (a near-duplicate workload)
    /// instead of the other half of the texts (a diverse workload).
    #[arg(long)]
    pub variants: bool,
    /// Mean cosine the hits below the threshold must keep.
    #[arg(long, default_value_t = 0.99)]
    pub target: f64,
    /// No hit below the threshold may fall under this cosine.
    #[arg(long, default_value_t = 0.95)]
    pub floor: f64,
    /// Text put in front of every input (e.g. EmbeddingGemma's "title: none | text: ").
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Measure the features of this trained projector (`attncache train-projector`)
    /// instead of the untrained mean-pool baseline.
    #[arg(long)]
    pub projector: Option<PathBuf>,
    /// Untrained features to measure when there is no --projector (`mean-pool` or
    /// `segment-pool`).
    #[arg(long, default_value = "mean-pool", conflicts_with = "projector")]
    pub features: String,
    /// Record the chosen threshold in the projector's projector.json, where
    /// attncache-server --projector picks it up (needs --projector).
    #[arg(long, requires = "projector")]
    pub save_threshold: bool,
    /// Where to write the result (JSON) and the plot (same name, .svg).
    #[arg(long, default_value = "calibration.json")]
    pub out: PathBuf,
}

/// One calibration point.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Point {
    /// Feature distance to the neighbour whose maps were used.
    pub distance: f32,
    /// Cosine between the embedding with the neighbour's maps and the exact one.
    pub cosine: f64,
    /// Tokens of the input.
    pub tokens: usize,
}

/// What `attncache calibrate` found.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    /// Chosen similarity threshold; `null` when no distance keeps the target.
    pub threshold: Option<f32>,
    /// Mean cosine target.
    pub target: f64,
    /// Per-hit cosine floor.
    pub floor: f64,
    /// Held-out inputs measured.
    pub held_out: usize,
    /// Held-out inputs that had a same-length neighbour (the calibration points).
    pub with_neighbour: usize,
    /// Hit rate on the held-out inputs at the chosen threshold.
    pub hit_rate: f64,
    /// Mean cosine of those hits.
    pub hit_mean_cosine: Option<f64>,
    /// Every point, nearest first.
    pub points: Vec<Point>,
    /// Feature kind and model fingerprint the threshold belongs to.
    pub features: String,
    /// Model fingerprint.
    pub fingerprint: String,
    /// Mean lookup time (exact probe, feature search, entry fetch), microseconds.
    pub mean_lookup_us: f64,
}

/// Largest threshold whose hits keep `target` mean cosine and `floor` minimum.
pub fn choose_threshold(points: &[Point], target: f64, floor: f64) -> Option<f32> {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.distance.total_cmp(&b.distance));
    let (mut sum, mut best) = (0.0, None);
    for (i, p) in sorted.iter().enumerate() {
        sum += p.cosine;
        let mean = sum / (i + 1) as f64;
        let next_same = sorted.get(i + 1).is_some_and(|q| q.distance == p.distance);
        if p.cosine < floor {
            break;
        }
        if mean >= target && !next_same {
            best = Some(p.distance);
        }
    }
    best
}

/// Runs the calibration and writes `args.out` and its `.svg`.
pub async fn run(args: &CalibrateArgs) -> anyhow::Result<Calibration> {
    let mut texts = load_texts(&args.data)?;
    texts.truncate(args.limit);
    anyhow::ensure!(
        texts.len() >= 4,
        "need at least 4 texts, got {}",
        texts.len()
    );
    let texts: Vec<String> = texts
        .into_iter()
        .map(|t| format!("{}{}", args.prefix, t))
        .collect();
    let (warm, held): (Vec<String>, Vec<String>) = if args.variants {
        let warm = texts.clone();
        let words: Vec<&str> = texts.iter().flat_map(|t| t.split_whitespace()).collect();
        let held = texts
            .iter()
            .enumerate()
            .map(|(i, t)| one_word_variant(t, words[(i * 7919) % words.len()]))
            .collect();
        (warm, held)
    } else {
        let warm = texts.iter().step_by(2).cloned().collect();
        let held = texts.iter().skip(1).step_by(2).cloned().collect();
        (warm, held)
    };

    let model = args.model.to_str().context("model path is not UTF-8")?;
    let mut flags = vec!["attncache-server", "--model", model, "--attn-cache", "on"];
    if args.projector.is_none() {
        flags.extend(["--features", args.features.as_str()]);
    }
    if let Some(p) = &args.projector {
        flags.extend([
            "--projector",
            p.to_str().context("projector path is not UTF-8")?,
        ]);
    }
    let serve = ServeArgs::parse_from(flags);
    let server = LocalServer::start(&serve).await?;
    server.hook.set_exact_attention(ExactAttention::Fast);
    let cache = server.cache.clone();
    let embed = |text: &str| {
        let text = text.to_string();
        let server = &server;
        async move { server.embed(&text).await }
    };

    let bar = crate::tools::progress::progress_bar(warm.len() + 2 * held.len(), "warm-up")?;
    cache.set_similarity_threshold(None);
    for t in &warm {
        embed(t).await?;
        bar.inc(1);
    }
    bar.set_message("held-out");
    cache.set_admission(false);
    let mut points = Vec::new();
    for t in &held {
        cache.set_enabled_by_default(false);
        let exact = embed(t).await?;
        bar.inc(1);
        cache.set_enabled_by_default(true);
        cache.set_similarity_threshold(Some(f32::INFINITY));
        let reused = embed(t).await?;
        cache.set_similarity_threshold(None);
        bar.inc(1);
        if let Some(d) = reused.decision() {
            if d.outcome == Outcome::NearHit {
                let distance = d.distance.unwrap_or(f32::NAN);
                points.push(Point {
                    distance,
                    cosine: cosine(&exact.embedding, &reused.embedding),
                    tokens: d.tokens,
                });
            }
        }
    }
    bar.finish_and_clear();
    attncache_plugin::uninstall();
    let counts = cache.counts();
    let mean_lookup_us = counts.lookup_ns as f64 / counts.lookups.max(1) as f64 / 1e3;
    points.sort_by(|a, b| a.distance.total_cmp(&b.distance));
    let threshold = choose_threshold(&points, args.target, args.floor);
    let hits: Vec<&Point> = points
        .iter()
        .filter(|p| threshold.is_some_and(|t| p.distance <= t))
        .collect();
    // one read of the model's files (over a gigabyte for EmbeddingGemma) gives both
    let fingerprints = server.model.fingerprints()?;
    let calibration = Calibration {
        threshold,
        target: args.target,
        floor: args.floor,
        held_out: held.len(),
        with_neighbour: points.len(),
        hit_rate: hits.len() as f64 / held.len().max(1) as f64,
        hit_mean_cosine: (!hits.is_empty())
            .then(|| hits.iter().map(|p| p.cosine).sum::<f64>() / hits.len() as f64),
        points,
        features: cache.features().describe(),
        fingerprint: format!("{:016x}", fingerprints.stable),
        mean_lookup_us,
    };
    if let (true, Some(dir)) = (args.save_threshold, &args.projector) {
        let mut p = attncache_plugin::lookup::projector::Projector::load_accepting(
            dir,
            fingerprints.stable,
            Some(fingerprints.legacy),
        )?;
        p.set_calibrated_threshold(threshold);
        p.set_fingerprint(fingerprints.stable); // a legacy stamp becomes the stable one
        p.save_config(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&calibration)?)?;
    std::fs::write(args.out.with_extension("svg"), plot(&calibration))?;
    Ok(calibration)
}

/// Prints the summary table: per distance decile, the hits and their fidelity.
pub fn print_summary(c: &Calibration, out: &Path) {
    println!(
        "held-out inputs: {}, with a same-length neighbour: {}",
        c.held_out, c.with_neighbour
    );
    println!(
        "{:>10} {:>6} {:>9} {:>11} {:>10}",
        "distance≤", "hits", "hit rate", "mean cos", "min cos"
    );
    let n = c.points.len();
    for q in 1..=10 {
        let upto = (n * q).div_ceil(10);
        if upto == 0 {
            continue;
        }
        let pts = &c.points[..upto];
        let mean = pts.iter().map(|p| p.cosine).sum::<f64>() / upto as f64;
        let min = pts.iter().map(|p| p.cosine).fold(f64::INFINITY, f64::min);
        let rate = upto as f64 / c.held_out.max(1) as f64;
        println!(
            "{:>10.4} {upto:>6} {rate:>9.3} {mean:>11.5} {min:>10.5}",
            pts[upto - 1].distance
        );
    }
    match c.threshold {
        Some(t) => println!(
            "threshold {t:.4}: hit rate {:.3}, mean cosine {:.5} (target {}, floor {})",
            c.hit_rate,
            c.hit_mean_cosine.unwrap_or(f64::NAN),
            c.target,
            c.floor
        ),
        None => println!(
            "no distance keeps mean cosine ≥ {} with every hit ≥ {}: exact lookups only",
            c.target, c.floor
        ),
    }
    println!(
        "mean lookup time {:.1} µs; written: {} and {}",
        c.mean_lookup_us,
        out.display(),
        out.with_extension("svg").display()
    );
}

/// Scatter plot of cosine against distance, with the target and the chosen threshold.
fn plot(c: &Calibration) -> String {
    let (w, h, m) = (640.0, 400.0, 50.0);
    let max_d = c
        .points
        .iter()
        .map(|p| p.distance as f64)
        .fold(1e-6, f64::max);
    let min_c = c
        .points
        .iter()
        .map(|p| p.cosine)
        .fold(c.floor.min(0.9), f64::min);
    let x = |d: f64| m + (w - 2.0 * m) * d / max_d;
    let y = |cos: f64| h - m - (h - 2.0 * m) * (cos - min_c) / (1.0 - min_c).max(1e-9);
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
<rect width='100%' height='100%' fill='white'/>\
<text x='{m}' y='20'>fidelity of reusing the nearest same-length input's maps ({} points)</text>\
<line x1='{m}' y1='{b}' x2='{r}' y2='{b}' stroke='black'/><line x1='{m}' y1='{m}' x2='{m}' y2='{b}' stroke='black'/>\
<text x='{cx}' y='{lx}' text-anchor='middle'>feature distance (max {max_d:.3})</text>\
<text x='12' y='{cy}' transform='rotate(-90 12 {cy})' text-anchor='middle'>cosine to exact (min {min_c:.3})</text>",
        c.points.len(),
        b = h - m,
        r = w - m,
        cx = w / 2.0,
        lx = h - 15.0,
        cy = h / 2.0
    );
    let ty = y(c.target);
    svg += &format!("<line x1='{m}' y1='{ty}' x2='{}' y2='{ty}' stroke='green' stroke-dasharray='4'/><text x='{}' y='{}' fill='green'>target {}</text>", w - m, w - m - 80.0, ty - 4.0, c.target);
    if let Some(t) = c.threshold {
        let tx = x(t as f64);
        svg += &format!("<line x1='{tx}' y1='{m}' x2='{tx}' y2='{}' stroke='red'/><text x='{}' y='{}' fill='red'>threshold {t:.3}</text>", h - m, tx + 4.0, h - m - 6.0);
    }
    for p in &c.points {
        svg += &format!(
            "<circle cx='{:.1}' cy='{:.1}' r='2.5' fill='steelblue' fill-opacity='0.6'/>",
            x(p.distance as f64),
            y(p.cosine)
        );
    }
    svg + "</svg>"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(distance: f32, cosine: f64) -> Point {
        Point {
            distance,
            cosine,
            tokens: 8,
        }
    }

    #[test]
    fn threshold_is_the_largest_distance_that_keeps_the_target() {
        let pts = [
            p(0.1, 1.0),
            p(0.2, 0.99),
            p(0.3, 0.985),
            p(0.4, 0.9),
            p(0.5, 0.999),
        ];
        // means: 1.0, 0.995, 0.9917, 0.9688, … → 0.3 is the last that keeps 0.99
        assert_eq!(choose_threshold(&pts, 0.99, 0.5), Some(0.3));
        // a floor of 0.95 stops at the first bad hit even if the mean recovers later
        assert_eq!(choose_threshold(&pts, 0.95, 0.95), Some(0.3));
        assert_eq!(choose_threshold(&pts, 0.95, 0.5), Some(0.5));
        // nothing keeps it
        assert_eq!(choose_threshold(&[p(0.1, 0.8)], 0.99, 0.5), None);
        assert_eq!(choose_threshold(&[], 0.99, 0.5), None);
    }

    #[test]
    fn ties_are_all_in_or_all_out() {
        let pts = [p(0.1, 1.0), p(0.2, 1.0), p(0.2, 0.9)];
        // at 0.2 the mean is 0.9667 < 0.99: 0.2 is not chosen although its first point is fine
        assert_eq!(choose_threshold(&pts, 0.99, 0.5), Some(0.1));
    }
}
