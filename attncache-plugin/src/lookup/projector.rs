//! The learned feature projector: a small MLP that maps an input's layer-0 representation to
//! a vector whose L2 distances predict how far apart two inputs' attention maps are.
//!
//! Design (after the AttnCache paper's Siamese projector, changed where it did not fit):
//!
//! - **Input**: the layer-0 attention input (hidden states after `input_layernorm`,
//!   `[L, hidden]`), mean-pooled over [`SEGMENTS`] consecutive, equal-length spans of tokens
//!   and concatenated ([`segment_pool`]). The paper max-pools to ≤128 rows and pads every
//!   input to one length; segments keep *where* in the input a token sits (which is what
//!   shapes attention maps) with a fixed size and no padding, and our index only ever
//!   compares inputs of the same length.
//! - **Network**: standardise (training-set mean and spread per dimension) → one
//!   Linear(hidden → width) shared by every segment → ReLU → concatenate the segments →
//!   Linear(segments·width → out). Sharing the first layer across segments makes it 8x
//!   cheaper to train and run than one dense layer over the concatenation, with 8x fewer
//!   weights to overfit. The paper's BatchNorm is replaced by the fixed standardisation, so
//!   serving is one code path with no batch statistics.
//! - **Training** ([`train`]): Siamese pairs of same-length inputs; the target is the mean
//!   total-variation distance of their maps ([`map_distance`]: per query row ½·Σ|a−b|,
//!   averaged over rows, heads and layers, in [0, 1]); loss SmoothL1 between the L2 distance
//!   of the two projections and the target, both in log space (ranking close pairs is what
//!   matters for hits); AdamW; deterministic initialisation from a seed.
//! - **Files**: `projector.safetensors` (weights and standardisation) and `projector.json`
//!   ([`ProjectorConfig`]: shapes, the model fingerprint it was trained for, the training
//!   report, and the calibrated similarity threshold once `attncache calibrate` set it).
//!   A projector trained for another model is refused.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::Optimizer;
use serde::{Deserialize, Serialize};

use crate::error::AttnCacheError;
pub use crate::lookup::map_distance::{map_distance, map_distance_flat, spearman, FlatMaps};

/// Spans of tokens the layer-0 representation is pooled over.
pub const SEGMENTS: usize = 8;
/// Offset of the log-space training loss (distances near it and below count alike).
const LOG_OFFSET: f64 = 0.005;
/// Weights file in a projector directory.
pub const WEIGHTS_FILE: &str = "projector.safetensors";
/// Settings file in a projector directory.
pub const CONFIG_FILE: &str = "projector.json";
const FORMAT: u32 = 1;

/// `projector.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectorConfig {
    /// File format version (1).
    pub format: u32,
    /// Fingerprint of the model the projector was trained for (16 hex digits).
    pub fingerprint: String,
    /// Hidden size of the model.
    pub hidden: usize,
    /// Token spans pooled ([`SEGMENTS`]).
    pub segments: usize,
    /// Width of the hidden layer, per segment.
    pub width: usize,
    /// Dimension of the feature.
    pub out_dim: usize,
    /// Similarity threshold chosen by `attncache calibrate` for these features (used when
    /// the server is not given one).
    #[serde(default)]
    pub calibrated_threshold: Option<f32>,
    /// How the projector was trained and how well it ranks held-out pairs.
    #[serde(default)]
    pub training: Option<TrainReport>,
}

/// What training measured (held-out figures are `None` without held-out pairs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Inputs whose maps were recorded.
    pub inputs: usize,
    /// Same-length pairs trained on.
    pub train_pairs: usize,
    /// Same-length pairs held out (both inputs unseen in training).
    pub validation_pairs: usize,
    /// Epochs run.
    pub epochs: usize,
    /// Mean training loss of the last epoch.
    pub final_loss: f32,
    /// Mean absolute error of the predicted map distance on held-out pairs.
    pub validation_mae: Option<f32>,
    /// Spearman rank correlation between projected distance and map distance, held-out.
    pub validation_spearman: Option<f64>,
    /// The same for the untrained mean-pool feature (the baseline it must beat).
    pub validation_spearman_mean_pool: Option<f64>,
}

/// A loaded projector.
#[derive(Debug, Clone)]
pub struct Projector {
    config: ProjectorConfig,
    mean: Tensor,
    std: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    id: u32,
}

/// Options of [`train`].
#[derive(Debug, Clone, Copy)]
pub struct TrainOptions {
    /// Width of the hidden layer.
    pub width: usize,
    /// Feature dimension.
    pub out_dim: usize,
    /// Passes over the training pairs.
    pub epochs: usize,
    /// Pairs per optimiser step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// Seed of the initial weights and of the pair order.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            width: 64,
            out_dim: 64,
            epochs: 20,
            batch: 64,
            lr: 1e-3,
            seed: 7,
        }
    }
}

/// Pairs of inputs (indices into the descriptor matrix) and their map distance.
#[derive(Debug, Clone, Default)]
pub struct Pairs {
    /// First input of each pair.
    pub a: Vec<u32>,
    /// Second input of each pair.
    pub b: Vec<u32>,
    /// Map distance of each pair.
    pub target: Vec<f32>,
}

impl Pairs {
    /// Adds a pair.
    pub fn push(&mut self, a: usize, b: usize, target: f32) {
        self.a.push(a as u32);
        self.b.push(b as u32);
        self.target.push(target);
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.target.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.target.is_empty()
    }
}

/// Pools `xs` (`[b, L, hidden]`) into `[b, segments·hidden]` (f32): the mean of each of
/// `segments` consecutive spans of tokens (span `s` covers tokens `⌊s·L/S⌋ .. ⌊(s+1)·L/S⌋`;
/// with fewer tokens than spans, a span takes the token at its start).
pub fn segment_pool(xs: &Tensor, segments: usize) -> Result<Tensor> {
    let (b, len, hidden) = xs.dims3()?;
    if len == 0 || segments == 0 {
        candle_core::bail!("cannot pool {len} tokens into {segments} segments");
    }
    let mut weights = vec![0f32; segments * len];
    for s in 0..segments {
        let lo = s * len / segments;
        let hi = ((s + 1) * len / segments).max(lo + 1).min(len);
        let w = 1.0 / (hi - lo) as f32;
        for t in lo..hi {
            weights[s * len + t] = w;
        }
    }
    let pool = Tensor::from_vec(weights, (1, segments, len), xs.device())?;
    pool.broadcast_as((b, segments, len))?
        .matmul(&xs.to_dtype(DType::F32)?.contiguous()?)?
        .reshape((b, segments * hidden))
}

/// SplitMix64: the deterministic generator behind initial weights and pair order.
#[derive(Debug, Clone)]
struct SplitMix(u64);

impl SplitMix {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn symmetric(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// A Linear layer's weights with uniform ±1/√fan_in initialisation, as trainable vars.
fn init_linear(rng: &mut SplitMix, fan_in: usize, fan_out: usize) -> Result<(Var, Var)> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w: Vec<f32> = (0..fan_in * fan_out)
        .map(|_| rng.symmetric() * bound)
        .collect();
    let b: Vec<f32> = (0..fan_out).map(|_| rng.symmetric() * bound).collect();
    Ok((
        Var::from_tensor(&Tensor::from_vec(w, (fan_out, fan_in), &Device::Cpu)?)?,
        Var::from_tensor(&Tensor::from_vec(b, fan_out, &Device::Cpu)?)?,
    ))
}

/// The network: `x` (`[n, segments·hidden]`, standardised) → shared per-segment layer →
/// ReLU → concatenation → output layer (`[n, out]`).
fn segment_mlp(
    x: &Tensor,
    segments: usize,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let width = w1.dim(0)?;
    let h = x
        .reshape((n * segments, d / segments))?
        .matmul(&w1.t()?)?
        .broadcast_add(b1)?
        .relu()?;
    h.reshape((n, segments * width))?
        .matmul(&w2.t()?)?
        .broadcast_add(b2)
}

fn smooth_l1(pred: &Tensor, target: &Tensor, beta: f64) -> Result<Tensor> {
    let diff = (pred - target)?.abs()?;
    let small = diff.lt(beta)?;
    let quadratic = (diff.sqr()? * (0.5 / beta))?;
    let linear = (&diff - 0.5 * beta)?;
    small.where_cond(&quadratic, &linear)?.mean_all()
}

fn pair_distance(pa: &Tensor, pb: &Tensor) -> Result<Tensor> {
    ((pa - pb)?.sqr()?.sum(D::Minus1)? + 1e-12)?.sqrt()
}

impl Projector {
    /// The settings and training report.
    pub fn config(&self) -> &ProjectorConfig {
        &self.config
    }

    /// Identifies these weights (crc32 of the weights file): stored features are only
    /// compared with features of the same projector.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Projects descriptors (`[n, segments·hidden]`) to features (`[n, out_dim]`).
    pub fn project(&self, descriptors: &Tensor) -> Result<Tensor> {
        let x = descriptors
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        segment_mlp(
            &x,
            self.config.segments,
            &self.w1,
            &self.b1,
            &self.w2,
            &self.b2,
        )
    }

    /// Features of every row of `xs` (`[b, L, hidden]`).
    pub fn features(&self, xs: &Tensor) -> Result<Vec<Vec<f32>>> {
        let d = segment_pool(xs, self.config.segments)?;
        self.project(&d)?.to_vec2::<f32>()
    }

    /// Loads `dir` (see the module docs), refusing a projector trained for another model.
    pub fn load(dir: &Path, fingerprint: u64) -> std::result::Result<Self, AttnCacheError> {
        Self::load_accepting(dir, fingerprint, None)
    }

    /// [`Projector::load`], also accepting a projector stamped with the model's `legacy`
    /// fingerprint (trained by a build before the stable hashes; one log line says so).
    pub fn load_accepting(
        dir: &Path,
        fingerprint: u64,
        legacy: Option<u64>,
    ) -> std::result::Result<Self, AttnCacheError> {
        let bad = |reason: String| AttnCacheError::Projector {
            path: dir.to_path_buf(),
            reason,
        };
        let raw = std::fs::read_to_string(dir.join(CONFIG_FILE))
            .map_err(|e| bad(format!("cannot read {CONFIG_FILE}: {e}")))?;
        let config: ProjectorConfig =
            serde_json::from_str(&raw).map_err(|e| bad(format!("{CONFIG_FILE}: {e}")))?;
        if config.format != FORMAT {
            return Err(bad(format!(
                "format {} (this build reads {FORMAT})",
                config.format
            )));
        }
        match crate::storage::stable_hash::check_stamp(&config.fingerprint, fingerprint, legacy) {
            crate::storage::stable_hash::Stamp::Current => {}
            crate::storage::stable_hash::Stamp::Legacy => tracing::info!(
                projector = %dir.display(),
                "projector stamped with this model's fingerprint of earlier builds; loaded \
                 (train it again to stamp the stable one)"
            ),
            crate::storage::stable_hash::Stamp::Other => {
                return Err(bad(format!(
                    "trained for model {}, this model is {fingerprint:016x}; train one for it with `attncache train-projector`",
                    config.fingerprint
                )))
            }
        }
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE))
            .map_err(|e| bad(format!("cannot read {WEIGHTS_FILE}: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| bad(format!("{WEIGHTS_FILE}: {e}")))?;
        let d_in = config.segments * config.hidden;
        let get = |name: &str, shape: &[usize]| -> std::result::Result<Tensor, AttnCacheError> {
            let t = tensors
                .get(name)
                .ok_or_else(|| bad(format!("{WEIGHTS_FILE} has no {name}")))?;
            if t.dims() != shape || t.dtype() != DType::F32 {
                return Err(bad(format!(
                    "{name} is {:?} {:?}, expected {shape:?} f32",
                    t.dims(),
                    t.dtype()
                )));
            }
            Ok(t.clone())
        };
        let (w, o) = (config.width, config.out_dim);
        let projector = Self {
            mean: get("input.mean", &[d_in])?,
            std: get("input.std", &[d_in])?,
            w1: get("l1.weight", &[w, config.hidden])?,
            b1: get("l1.bias", &[w])?,
            w2: get("l2.weight", &[o, config.segments * w])?,
            b2: get("l2.bias", &[o])?,
            id: crc32fast::hash(&bytes),
            config,
        };
        Ok(projector)
    }

    /// Writes `projector.safetensors` and `projector.json` into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> std::result::Result<(), AttnCacheError> {
        let io = |what| move |source| AttnCacheError::Io { what, source };
        std::fs::create_dir_all(dir).map_err(io("creating the projector directory"))?;
        let tensors: HashMap<String, Tensor> = [
            ("input.mean", self.mean.clone()),
            ("input.std", self.std.clone()),
            ("l1.weight", self.w1.clone()),
            ("l1.bias", self.b1.clone()),
            ("l2.weight", self.w2.clone()),
            ("l2.bias", self.b2.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        candle_core::safetensors::save(&tensors, dir.join(WEIGHTS_FILE))?;
        self.save_config(dir)
    }

    /// Rewrites `projector.json` only (e.g. after calibration set the threshold; the
    /// weights, and so [`Projector::id`], do not change).
    pub fn save_config(&self, dir: &Path) -> std::result::Result<(), AttnCacheError> {
        let json =
            serde_json::to_string_pretty(&self.config).map_err(|e| AttnCacheError::Projector {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })?;
        std::fs::write(dir.join(CONFIG_FILE), json).map_err(|source| AttnCacheError::Io {
            what: "writing projector.json",
            source,
        })
    }

    /// Stamps the projector as trained for the model `fingerprint`: for one loaded under
    /// this model's fingerprint of earlier builds, so that saving it writes the stable stamp
    /// (its weights, and so its [`Projector::id`], do not change).
    pub fn set_fingerprint(&mut self, fingerprint: u64) {
        self.config.fingerprint = format!("{fingerprint:016x}");
    }

    /// Sets the calibrated threshold recorded in the config.
    pub fn set_calibrated_threshold(&mut self, threshold: Option<f32>) {
        self.config.calibrated_threshold = threshold;
    }

    /// Sets the training report recorded in the config.
    pub fn set_training_report(&mut self, report: TrainReport) {
        self.config.training = Some(report);
    }

    /// Predicted map distance (L2 distance of the projections) of each pair.
    pub fn predict(&self, descriptors: &Tensor, pairs: &Pairs) -> Result<Vec<f32>> {
        if pairs.is_empty() {
            return Ok(Vec::new());
        }
        let p = self.project(descriptors)?;
        let ia = Tensor::new(pairs.a.as_slice(), &Device::Cpu)?;
        let ib = Tensor::new(pairs.b.as_slice(), &Device::Cpu)?;
        pair_distance(&p.index_select(&ia, 0)?, &p.index_select(&ib, 0)?)?.to_vec1()
    }
}

/// Trains a projector on `descriptors` (`[n, segments·hidden]`, from [`segment_pool`]) and
/// same-length `pairs` of them; `on_epoch(epoch, mean_loss)` reports progress.
pub fn train(
    descriptors: &Tensor,
    pairs: &Pairs,
    segments: usize,
    fingerprint: u64,
    opts: TrainOptions,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<(Projector, f32)> {
    let (n, d_in) = descriptors.dims2()?;
    if pairs.is_empty() || n == 0 || d_in % segments != 0 {
        candle_core::bail!("nothing to train on ({n} inputs, {} pairs)", pairs.len());
    }
    let descriptors = descriptors.to_dtype(DType::F32)?;
    let mean = descriptors.mean(0)?;
    let centred = descriptors.broadcast_sub(&mean)?;
    let std = (centred.sqr()?.mean(0)?.sqrt()? + 1e-4)?;
    let x = centred.broadcast_div(&std)?;

    let mut rng = SplitMix(opts.seed);
    let (w1, b1) = init_linear(&mut rng, d_in / segments, opts.width)?;
    let (w2, b2) = init_linear(&mut rng, segments * opts.width, opts.out_dim)?;
    let vars = vec![w1.clone(), b1.clone(), w2.clone(), b2.clone()];
    let mut opt = candle_nn::AdamW::new(
        vars,
        candle_nn::ParamsAdamW {
            lr: opts.lr,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let forward = |x: &Tensor| -> Result<Tensor> {
        segment_mlp(
            x,
            segments,
            w1.as_tensor(),
            b1.as_tensor(),
            w2.as_tensor(),
            b2.as_tensor(),
        )
    };
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    let mut last = f32::NAN;
    for epoch in 0..opts.epochs {
        rng.shuffle(&mut order);
        let (mut sum, mut batches) = (0f32, 0usize);
        for chunk in order.chunks(opts.batch.max(1)) {
            let ia: Vec<u32> = chunk.iter().map(|&i| pairs.a[i]).collect();
            let ib: Vec<u32> = chunk.iter().map(|&i| pairs.b[i]).collect();
            let t: Vec<f32> = chunk.iter().map(|&i| pairs.target[i]).collect();
            let xa = x.index_select(&Tensor::new(ia.as_slice(), &Device::Cpu)?, 0)?;
            let xb = x.index_select(&Tensor::new(ib.as_slice(), &Device::Cpu)?, 0)?;
            let target = Tensor::new(t.as_slice(), &Device::Cpu)?;
            let dist = pair_distance(&forward(&xa)?, &forward(&xb)?)?;
            // in log space: ranking among close pairs (the ones that can be hits) counts as
            // much as among far ones
            let loss = smooth_l1(
                &(dist + LOG_OFFSET)?.log()?,
                &(target + LOG_OFFSET)?.log()?,
                0.1,
            )?;
            opt.backward_step(&loss)?;
            sum += loss.to_scalar::<f32>()?;
            batches += 1;
        }
        last = sum / batches.max(1) as f32;
        on_epoch(epoch + 1, last);
    }
    let config = ProjectorConfig {
        format: FORMAT,
        fingerprint: format!("{fingerprint:016x}"),
        hidden: d_in / segments,
        segments,
        width: opts.width,
        out_dim: opts.out_dim,
        calibrated_threshold: None,
        training: None,
    };

    // the id of an unsaved projector is that of the bytes it will be saved as
    let projector = Projector {
        config,
        mean,
        std,
        w1: w1.as_tensor().detach(),
        b1: b1.as_tensor().detach(),
        w2: w2.as_tensor().detach(),
        b2: b2.as_tensor().detach(),
        id: 0,
    };
    Ok((projector, last))
}
