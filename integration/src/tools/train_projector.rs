//! `attncache train-projector`: records real attention maps and trains the feature projector
//! on them (see `attncache_plugin::lookup::projector` for the design).
//!
//! 1. **Record.** Every text, and `--variants` one-word variants of it (so that close pairs
//!    exist, the regime where reuse is faithful), is embedded through the real pipeline with
//!    the cache recording every input's maps and its segment-pooled layer-0 representation
//!    into `--work-dir` (kept: a second run re-uses what is recorded).
//! 2. **Pairs.** Inputs of the same token count are paired (maps of different lengths are
//!    never exchanged); the target is the mean total-variation distance of their maps.
//!    Every tenth token count is held out for validation, so no held-out input is seen in
//!    training.
//! 3. **Train** with a progress bar, report how well projected distances rank held-out map
//!    distances (Spearman) next to the untrained mean-pool feature, and save
//!    `projector.safetensors` + `projector.json` (tied to the model's fingerprint) in `--out`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use attncache_plugin::lookup::projector::{
    self, Pairs, Projector, TrainOptions, TrainReport, SEGMENTS,
};
use attncache_plugin::storage::entry::Entry;
use attncache_plugin::storage::store::{MapStore, StoreConfig};
use attncache_plugin::{CacheConfig, ExactAttention, FeatureKind};
use candle_core::{Device, Tensor};
use clap::Parser;

use crate::server::cli::ServeArgs;
use crate::tools::local_server::LocalServer;
use crate::tools::progress::progress_bar as bar;
use crate::tools::texts::{load_texts, replace_word};

/// Flags of `attncache train-projector`.
#[derive(Debug, Clone, Parser)]
pub struct TrainProjectorArgs {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = crate::server::cli::default_model_dir())]
    pub model: PathBuf,
    /// Unlabelled texts: JSON arrays of strings (npm `nlp-corpus`, see `make fetch-corpus`)
    /// or of `{"text": …}` objects, or plain text with one input per line.
    #[arg(long, required = true, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Use at most this many texts.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// One-word variants recorded per text (at different positions), so close pairs exist.
    #[arg(long, default_value_t = 2)]
    pub variants: usize,
    /// Longest input (tokens) recorded; longer texts are skipped.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Text put in front of every input (e.g. EmbeddingGemma's "title: none | text: ").
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// Where recorded maps go (a cold-tier directory; re-used by later runs).
    /// Default: OUT/recorded.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Partners drawn per input within its token count (all, when fewer).
    #[arg(long, default_value_t = 16)]
    pub pairs_per_input: usize,
    /// Training epochs.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Width of the hidden layer, per segment.
    #[arg(long, default_value_t = 64)]
    pub width: usize,
    /// Feature dimension.
    #[arg(long, default_value_t = 64)]
    pub out_dim: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the initial weights, pair sampling and order.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Train on what --work-dir already holds, without running the model.
    #[arg(long)]
    pub no_record: bool,
    /// Output directory: projector.safetensors and projector.json.
    #[arg(long)]
    pub out: PathBuf,
}

/// The texts to record: each text, then its variants.
fn inputs(args: &TrainProjectorArgs) -> anyhow::Result<Vec<String>> {
    let mut texts = load_texts(&args.data)?;
    texts.truncate(args.limit);
    anyhow::ensure!(
        texts.len() >= 2,
        "need at least 2 texts, got {}",
        texts.len()
    );
    let words: Vec<String> = texts
        .iter()
        .flat_map(|t| t.split_whitespace().map(str::to_string))
        .collect();
    let mut out = Vec::with_capacity(texts.len() * (1 + args.variants));
    for (i, t) in texts.iter().enumerate() {
        out.push(format!("{}{t}", args.prefix));
        for v in 0..args.variants {
            let at = (v + 1) as f64 / (args.variants + 1) as f64;
            let word = &words[(i * 7919 + v * 104_729) % words.len()];
            out.push(format!("{}{}", args.prefix, replace_word(t, at, word)));
        }
    }
    Ok(out)
}

/// Records every input's maps into `work_dir`; returns the model fingerprint.
async fn record(
    args: &TrainProjectorArgs,
    work_dir: &std::path::Path,
) -> anyhow::Result<(u64, usize)> {
    let inputs = inputs(args)?;
    let model = args.model.to_str().context("model path is not UTF-8")?;
    let serve = ServeArgs::parse_from(["attncache-server", "--model", model]);
    let config = CacheConfig {
        enabled_by_default: true,
        hot_bytes: 64 << 20,
        cold_dir: Some(work_dir.to_path_buf()),
        cold_bytes: u64::MAX / 2,
        max_tokens: args.max_tokens,
        features: FeatureKind::SegmentPool,
        ..CacheConfig::default()
    };
    let server = LocalServer::start_with(&serve, config).await?;
    server.hook.set_exact_attention(ExactAttention::Fast);
    let progress = bar(inputs.len(), "recording")?;
    for text in &inputs {
        server.embed(text).await?;
        // every entry must reach the disk: wait for the background writer, never skip
        server.cache.flush();
        progress.inc(1);
    }
    progress.finish_and_clear();
    attncache_plugin::uninstall();
    let fingerprint = server.model.fingerprint()?;
    Ok((fingerprint, inputs.len()))
}

/// Every recorded entry, grouped by token count.
fn load_recorded(
    work_dir: &std::path::Path,
    fingerprint: u64,
    feature_id: u32,
) -> anyhow::Result<BTreeMap<usize, Vec<Arc<Entry>>>> {
    let store = MapStore::open(StoreConfig {
        hot_bytes: 1 << 20,
        cold_dir: Some(work_dir.to_path_buf()),
        cold_bytes: u64::MAX / 2,
        fingerprint,
        redis: None,
        scope: "global".into(),
    })?;
    let mut found = store.take_scanned();
    found.sort_by_key(|f| (f.len, f.key)); // directory order varies; training must not
    let progress = bar(found.len(), "loading")?;
    let mut by_len: BTreeMap<usize, Vec<Arc<Entry>>> = BTreeMap::new();
    for f in found {
        progress.inc(1);
        if f.feature_id != feature_id {
            continue;
        }
        if let Some(e) = store.get_by_key(f.key, f.len) {
            by_len.entry(f.len).or_default().push(e);
        }
    }
    progress.finish_and_clear();
    Ok(by_len)
}

/// Deterministic partner choice (SplitMix64 step).
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Unit-length mean over tokens, from the segment means of an input of `len` tokens
/// (exact for `len ≥ SEGMENTS`): the untrained baseline feature.
fn mean_pool_from_segments(desc: &[f32], len: usize) -> Vec<f32> {
    let hidden = desc.len() / SEGMENTS;
    let mut mean = vec![0f32; hidden];
    for s in 0..SEGMENTS {
        let lo = s * len / SEGMENTS;
        let n = (((s + 1) * len / SEGMENTS).max(lo + 1).min(len) - lo) as f32;
        for (m, v) in mean.iter_mut().zip(&desc[s * hidden..(s + 1) * hidden]) {
            *m += v * n;
        }
    }
    let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    mean.iter().map(|v| v / norm).collect()
}

fn l2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// What the command did.
#[derive(Debug, Clone)]
pub struct Trained {
    /// The saved projector (as loaded back from disk).
    pub projector: Projector,
    /// Its training report.
    pub report: TrainReport,
}

/// Runs the whole command.
pub async fn run(args: &TrainProjectorArgs) -> anyhow::Result<Trained> {
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| args.out.join("recorded"));
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("creating {}", work_dir.display()))?;
    let (fingerprint, recorded_inputs) = if args.no_record {
        let model = crate::server::model_dir::ModelDir::inspect(&args.model)?;
        (model.fingerprint()?, 0)
    } else {
        record(args, &work_dir).await?
    };
    tracing::info!(recorded_inputs, "recording done");
    let feature_id = attncache_plugin::FeatureExtractor::load(&FeatureKind::SegmentPool, 0)?.id();
    let by_len = load_recorded(&work_dir, fingerprint, feature_id)?;

    // descriptors, and pairs within each token count
    let mut descriptors: Vec<f32> = Vec::new();
    let mut dim = None;
    let mut index_of: Vec<(usize, Vec<usize>)> = Vec::new(); // (len, entry indices)
    let mut entries: Vec<Arc<Entry>> = Vec::new();
    for (len, group) in &by_len {
        let mut ids = Vec::new();
        for e in group {
            if *dim.get_or_insert(e.feature.len()) != e.feature.len() || e.feature.is_empty() {
                continue;
            }
            descriptors.extend_from_slice(&e.feature);
            ids.push(entries.len());
            entries.push(e.clone());
        }
        index_of.push((*len, ids));
    }
    let dim = dim.context("nothing was recorded (are the texts longer than --max-tokens?)")?;
    let n = entries.len();
    let mut candidates: Vec<(usize, usize, bool)> = Vec::new(); // (a, b, held out)
    for (len, ids) in &index_of {
        let held = len.is_multiple_of(10);
        for (k, &a) in ids.iter().enumerate() {
            let others = ids.len() - 1;
            if others == 0 {
                continue;
            }
            let mut partners: Vec<usize> = if others <= args.pairs_per_input {
                ids[k + 1..].to_vec()
            } else {
                (0..args.pairs_per_input)
                    .map(|j| {
                        let r = mix(args.seed ^ ((a as u64) << 20) ^ j as u64) as usize % others;
                        ids[if r >= k { r + 1 } else { r }]
                    })
                    .collect()
            };
            partners.sort_unstable();
            partners.dedup();
            candidates.extend(partners.into_iter().map(|b| (a, b, held)));
        }
    }
    anyhow::ensure!(
        !candidates.is_empty(),
        "no two recorded inputs have the same token count: record more texts (--limit, --variants)"
    );
    let flat = entries
        .iter()
        .map(|e| projector::FlatMaps::of(e))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let progress = bar(candidates.len(), "distances")?;
    let (mut train, mut held) = (Pairs::default(), Pairs::default());
    for &(a, b, is_held) in &candidates {
        let d = projector::map_distance_flat(&flat[a], &flat[b])?;
        if is_held { &mut held } else { &mut train }.push(a, b, d);
        progress.inc(1);
    }
    progress.finish_and_clear();
    drop(flat);
    tracing::info!(
        inputs = n,
        train = train.len(),
        held_out = held.len(),
        "map distances computed"
    );
    anyhow::ensure!(
        !train.is_empty(),
        "every pair fell in the held-out token counts"
    );

    let desc = Tensor::from_vec(descriptors, (n, dim), &Device::Cpu)?;
    let opts = TrainOptions {
        width: args.width,
        out_dim: args.out_dim,
        epochs: args.epochs,
        lr: args.lr,
        seed: args.seed,
        ..TrainOptions::default()
    };
    let progress = bar(args.epochs, "training")?;
    let (trained, final_loss) = projector::train(
        &desc,
        &train,
        SEGMENTS,
        fingerprint,
        opts,
        &mut |epoch, loss| {
            progress.set_message(format!("loss {loss:.5}"));
            tracing::info!(epoch, loss, "epoch");
            progress.inc(1);
        },
    )?;
    progress.finish_and_clear();

    // held-out ranking: projected distance vs map distance, next to mean-pool
    let truth: Vec<f64> = held.target.iter().map(|&t| f64::from(t)).collect();
    let predicted = trained.predict(&desc, &held)?;
    let validation_mae = (!predicted.is_empty()).then(|| {
        predicted
            .iter()
            .zip(&held.target)
            .map(|(p, t)| (p - t).abs())
            .sum::<f32>()
            / predicted.len() as f32
    });
    let baseline: Vec<f64> = held
        .a
        .iter()
        .zip(&held.b)
        .map(|(&a, &b)| {
            let (ea, eb) = (&entries[a as usize], &entries[b as usize]);
            l2(
                &mean_pool_from_segments(&ea.feature, ea.len()),
                &mean_pool_from_segments(&eb.feature, eb.len()),
            )
        })
        .collect();
    let predicted: Vec<f64> = predicted.into_iter().map(f64::from).collect();
    let report = TrainReport {
        inputs: n,
        train_pairs: train.len(),
        validation_pairs: held.len(),
        epochs: args.epochs,
        final_loss,
        validation_mae,
        validation_spearman: finite(projector::spearman(&predicted, &truth)),
        validation_spearman_mean_pool: finite(projector::spearman(&baseline, &truth)),
    };
    let mut trained = trained;
    trained.set_training_report(report.clone());
    trained.save(&args.out)?;
    let projector = Projector::load(&args.out, fingerprint)?;
    tracing::info!(
        recorded_inputs,
        id = format!("{:08x}", projector.id()),
        "projector saved"
    );
    Ok(Trained { projector, report })
}

/// Prints what training measured.
pub fn print_summary(t: &Trained, out: &std::path::Path) {
    let r = &t.report;
    println!(
        "inputs {}, pairs: {} train, {} held out; {} epochs, final loss {:.5}",
        r.inputs, r.train_pairs, r.validation_pairs, r.epochs, r.final_loss
    );
    let show = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.3}"));
    println!(
        "held-out map distance: mean abs error {}; Spearman vs map distance: projector {}, mean-pool {}",
        show(r.validation_mae.map(f64::from)),
        show(r.validation_spearman),
        show(r.validation_spearman_mean_pool)
    );
    println!(
        "written: {} (id {:08x}); calibrate it: attncache calibrate --projector {} --save-threshold …",
        out.display(),
        t.projector.id(),
        out.display()
    );
}
