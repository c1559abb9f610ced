//! `make blend-eval`: blend reuse (`--reuse blend`) on EmbeddingGemma against the exact
//! forward, in one run with every measurement interleaved (the same inputs, exact then
//! cached, one after the other):
//!
//! - **spam near-duplicates**: pairs of real SpamAssassin emails whose first 256 tokens
//!   differ in at most 10% of the positions after alignment (mined from the corpus); the
//!   first of each pair is stored (its recording timed against its exact forward), the
//!   second is served with the flag on (hit or refusal, timed against its exact forward);
//! - **long documents**: 512, 1024 and 2048 tokens of concatenated emails, stored, then
//!   served with one sentence (a span of 16 tokens in the middle) replaced; the first of each
//!   length also with 8 tokens inserted in the middle (its last 8 dropped: positions shifted);
//! - **identical repeats** at 256 and 1024 tokens (a stored input asked again, no memo);
//! - **recording's cost**: fresh 256- and 512-token windows of the email stream, each
//!   computed exactly and recorded (a miss, stored) back to back, in alternating order;
//!   `blend_record_overhead` is the median of the per-input ratios minus 1.
//!
//! Every cached timing is the whole request: lookup, loading, the check layer, the blended
//! layers, gather/scatter and pooling. Fidelity is the cosine to the exact embedding of the
//! same input; accuracy is nearest-centroid spam/ham classification with centroids of the
//! stored emails' exact embeddings. Writes `benches/results/blend.{json,md}` and merges the
//! `blend_*` figures into `benches/results/latest.json`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use attncache_plugin::reuse::align;
use attncache_plugin::{BlendPolicy, Decision, Outcome};
use attncache_server::cli::ServeArgs;
use attncache_server::local_server::{cosine, LocalServer};
use clap::Parser;
use serde::Serialize;

mod data;
mod kinds;
mod report;
mod revisions;
mod trust;

use data::{classify, emails, median, near_pairs, sum};
use report::markdown;

/// Blend reuse vs exact on EmbeddingGemma (see the module documentation).
#[derive(Debug, Parser)]
#[command(name = "attncache-blend-eval")]
struct Args {
    /// Model directory (default: the fetched EmbeddingGemma-300M).
    #[arg(long, default_value_os_t = attncache_server::cli::default_model_dir())]
    model: PathBuf,
    /// SpamAssassin corpus (`scripts/fetch-spam`).
    #[arg(long, default_value_os_t = attncache_benches::workloads::default_data_dir().join("spam-assassin"))]
    spam: PathBuf,
    /// Near-duplicate pairs (at most; fewer when the corpus has fewer): every other pair
    /// calibrates the blend policy (a sweep), the rest are served with the chosen one.
    #[arg(long, default_value_t = 60)]
    pairs: usize,
    /// Do not sweep: serve every pair with the server's policy (`--server-args`).
    #[arg(long)]
    no_sweep: bool,
    /// Fidelity the chosen policy's calibration hits must keep: mean, then minimum.
    #[arg(long, default_value_t = 0.997)]
    target_mean: f64,
    /// See --target-mean.
    #[arg(long, default_value_t = 0.99)]
    target_min: f64,
    /// Tokens of each near-duplicate email (its first tokens).
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Largest share of positions that may differ within a mined pair.
    #[arg(long, default_value_t = 0.10)]
    max_differing: f64,
    /// Documents per long length (512, 1024, 2048 tokens).
    #[arg(long, default_value_t = 3)]
    long_docs: usize,
    /// Further documents per long length that calibrate the dilution exponent
    /// (`--blend-dilution`) after the sweep, each edited at a quarter, half or three
    /// quarters of its length (0: keep the server's exponent).
    #[arg(long, default_value_t = 2)]
    long_calibration: usize,
    /// Fresh inputs per length (256 and 512 tokens) for recording's cost: each is computed
    /// exactly and recorded (a miss, stored), in alternating order.
    #[arg(long, default_value_t = 8)]
    record_reps: usize,
    /// Repetitions of the lookup-overlap comparison (0: none): the first edited document of
    /// each long length and the first held-out near duplicate are served again with the
    /// lookup on a thread while layer 0 runs and before it, in alternating order; the gain
    /// shows where entries come from the cold tier (`--server-args='--hot-mib 1
    /// --cache-dir DIR'` or a Redis backend)
    #[arg(long, default_value_t = 0)]
    overlap_reps: usize,
    /// The fidelity gate the server loads (`--blend-gate`; `make blend-eval` passes the one
    /// `make serve` loads). The trust stage serves without it.
    #[arg(long)]
    blend_gate: Option<PathBuf>,
    /// Extra `attncache-server` flags, space-separated, given with `=` since they start with
    /// dashes (`--server-args='--blend-max-share 0.6'`); `--no-sweep` serves with them.
    #[arg(long, default_value = "")]
    server_args: String,
    /// Run the trust stage only (instead of the stages above): near-duplicate pairs of six
    /// kinds served under every path, a fidelity gate fitted on them and each kind served
    /// under a gate fitted without it (leave-one-kind-out); writes --trust-out and --gate-out.
    #[arg(long)]
    trust: bool,
    /// Trust stage: add the kind `revisions`, pairs of the real revision stream under this
    /// directory (`make fetch-revisions`): each doc file changed inside --revision-max-tokens
    /// (old stored, new served) and each changed chunk (its file's old chunks stored).
    #[arg(long)]
    trust_revisions: Option<PathBuf>,
    /// Trust stage: pairs per kind (the mined kind: as many as the corpus has, up to this).
    #[arg(long, default_value_t = 100)]
    trust_per_kind: usize,
    /// Trust stage: pairs of the long kind (512/1024/2048 tokens in turn).
    #[arg(long, default_value_t = 60)]
    trust_long: usize,
    /// Trust stage: keep every fitted bound at most this times the signal of the
    /// calibration's first hit below the floor (1: the plain split-conformal bound). Kinds
    /// the calibration never saw can fail under its first failure; 0.5 keeps the long
    /// documents' held-out failure out (a margin chosen after seeing it, then checked on
    /// pairs of another seed).
    #[arg(long, default_value_t = 0.5)]
    trust_margin: f64,
    /// Trust stage: serve only these kinds (comma-separated; the pairs are the same as in a
    /// full run) and merge them into the rows of --trust-rows, replacing that file's rows of
    /// the same kinds (after a change that affects only them).
    #[arg(long, value_delimiter = ',')]
    trust_kinds: Vec<String>,
    /// Trust stage: the seed the pairs are drawn with (and the bootstrap's).
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Trust stage: analyse the rows of these earlier trust reports (comma-separated, e.g.
    /// two seeds' runs; a pair present in several is counted once) instead of serving.
    #[arg(long, value_delimiter = ',')]
    trust_rows: Vec<PathBuf>,
    /// Trust stage: also serve the rows of this trust report, of pairs drawn with another
    /// --seed, under the shipped gate and each kind under the gate fitted without it (fresh
    /// pairs of kinds the calibration never saw); nothing is fitted or chosen on them.
    #[arg(long)]
    trust_holdout: Option<PathBuf>,
    /// Trust stage: where the rows come from, for the report (default: served by this run,
    /// or the --trust-rows file).
    #[arg(long)]
    trust_source: Option<String>,
    /// Trust stage: where its report goes (`.json` and `.md`).
    #[arg(long, default_value = "benches/results/blend-trust")]
    trust_out: PathBuf,
    /// Trust stage: where the fitted gate goes (the server's --blend-gate).
    #[arg(long, default_value = "config/blend-gate.json")]
    gate_out: PathBuf,
    /// Run the revision stage only: a real revision stream of documentation
    /// (`scripts/fetch-revisions`), old release stored, changed files and chunks of the new
    /// one asked exactly then cached; writes --revisions-out.
    #[arg(long)]
    revisions: Option<PathBuf>,
    /// Revision stage: longest input, in tokens (longer files are cut).
    #[arg(long, default_value_t = 2048)]
    revision_max_tokens: usize,
    /// Revision stage: tokens a chunk packs paragraphs up to.
    #[arg(long, default_value_t = 400)]
    revision_chunk_tokens: usize,
    /// Revision stage: only these packages (comma-separated directory names under
    /// --revisions, e.g. `click,jinja2`); all when unset.
    #[arg(long, value_delimiter = ',')]
    revision_packages: Vec<String>,
    /// Revision stage: where its report goes (`.json` and `.md`).
    #[arg(long, default_value = "benches/results/blend-revisions")]
    revisions_out: PathBuf,
    /// Where the report goes (`.json` and `.md`).
    #[arg(long, default_value = "benches/results/blend")]
    out: PathBuf,
    /// Merge the headline figures into this results file (empty: do not).
    #[arg(long, default_value = "benches/results/latest.json")]
    latest: String,
}

/// One served input, exact and cached.
#[derive(Debug, Clone, Serialize)]
struct Served {
    workload: String,
    tokens: usize,
    /// Positions that differ from the stored neighbour (after alignment).
    differing: usize,
    outcome: String,
    recomputed: Option<u32>,
    residual: Option<f32>,
    /// Escalated blend hits: the layer after which every position was computed again.
    resumed_after_layer: Option<u32>,
    exact_ms: f64,
    cached_ms: f64,
    lookup_ms: f64,
    cos: f64,
    /// Cosine of the stored neighbour's exact embedding to this input's (near duplicates):
    /// the fidelity of answering with the stored embedding as it is, the baseline a blend
    /// hit has to beat.
    stored_cos: Option<f64>,
    label: Option<String>,
}

/// One stored input: its exact forward and its recording, timed.
#[derive(Debug, Clone, Serialize)]
struct Stored {
    workload: String,
    tokens: usize,
    exact_ms: f64,
    record_ms: f64,
    /// What its entry added to the hot tier (0: not recorded).
    entry_bytes: u64,
}

/// Recording's cost on one fresh input: its exact forward (flag off) and its recording
/// (flag on: a miss, stored), run back to back in the order `record_first` says.
#[derive(Debug, Clone, Serialize)]
struct RecordPair {
    tokens: usize,
    exact_ms: f64,
    record_ms: f64,
    record_first: bool,
}

/// One policy of the calibration sweep, over the calibration pairs.
#[derive(Debug, Clone, Serialize)]
struct SweepPoint {
    policy: attncache_plugin::BlendPolicy,
    hit_rate: f64,
    fidelity_mean: Option<f64>,
    fidelity_min: Option<f64>,
    workload_speedup: f64,
    recomputed_share_mean: Option<f64>,
}

impl SweepPoint {
    /// `policy`'s figures over the calibration inputs it served (`rows`).
    fn of(policy: &attncache_plugin::BlendPolicy, rows: &[Served]) -> Self {
        let hits: Vec<&Served> = rows.iter().filter(|r| r.outcome != "miss").collect();
        let cos: Vec<f64> = hits.iter().map(|r| r.cos).collect();
        SweepPoint {
            policy: policy.clone(),
            hit_rate: hits.len() as f64 / rows.len().max(1) as f64,
            fidelity_mean: (!cos.is_empty()).then(|| attncache_benches::stats::mean(&cos)),
            fidelity_min: (!cos.is_empty()).then(|| attncache_benches::stats::min(&cos)),
            workload_speedup: sum(rows.iter().map(|r| r.exact_ms))
                / sum(rows.iter().map(|r| r.cached_ms)).max(1e-9),
            recomputed_share_mean: (!hits.is_empty()).then(|| {
                hits.iter()
                    .map(|r| f64::from(r.recomputed.unwrap_or(0)) / r.tokens as f64)
                    .sum::<f64>()
                    / hits.len() as f64
            }),
        }
    }
}

struct Runner {
    server: LocalServer,
}

impl Runner {
    async fn exact(&self, ids: &[u32]) -> anyhow::Result<(Vec<f32>, f64)> {
        self.server.cache.set_enabled_by_default(false);
        let t = Instant::now();
        let e = self.server.embed_ids(ids).await?;
        Ok((e.embedding, t.elapsed().as_secs_f64() * 1e3))
    }

    async fn cached(&self, ids: &[u32]) -> anyhow::Result<(Vec<f32>, f64, Option<Decision>)> {
        self.server.cache.set_enabled_by_default(true);
        let t = Instant::now();
        let e = self.server.embed_ids(ids).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        self.server.cache.set_enabled_by_default(false);
        let decision = e.decision();
        Ok((e.embedding, ms, decision))
    }

    /// Stores `ids` (its exact forward, then a recording miss). While it records, the near
    /// lookup takes no neighbour (no stored input with 0 differing positions can exist), so
    /// an input similar to one stored before is still stored itself: its pair is then served
    /// against it, as the workload says. (Under a generous policy it used to be served from
    /// the nearest stored email instead, and its pair matched that one.)
    async fn store(&self, workload: &str, ids: &[u32]) -> anyhow::Result<(Stored, Vec<f32>)> {
        let (exact, exact_ms) = self.exact(ids).await?;
        let cache = &self.server.cache;
        let policy = cache.blend_policy();
        cache.set_blend_policy(attncache_plugin::BlendPolicy {
            max_recompute_share: f32::MIN_POSITIVE,
            min_recompute_share: 0.0,
            ..(*policy).clone()
        })?;
        let before = cache.counts();
        let recorded = self.cached(ids).await;
        cache.set_blend_policy((*policy).clone())?;
        let (_, record_ms, _) = recorded?;
        cache.flush();
        let after = cache.counts();
        if after.recorded == before.recorded && after.hits == before.hits {
            eprintln!("blend-eval: a {workload} input was not recorded");
        }
        let before = before.hot_bytes;
        let entry_bytes = self.server.cache.counts().hot_bytes.saturating_sub(before);
        Ok((
            Stored {
                workload: workload.into(),
                tokens: ids.len(),
                exact_ms,
                record_ms,
                entry_bytes,
            },
            exact,
        ))
    }

    /// [`RecordPair`] of `ids`, which no stored input may equal or neighbour; `None` when
    /// the flag-on run did not record it (a hit after all), which says nothing of recording.
    async fn record_pair(
        &self,
        ids: &[u32],
        record_first: bool,
    ) -> anyhow::Result<Option<RecordPair>> {
        let recorded = self.server.cache.counts().recorded;
        let (exact_ms, record_ms) = if record_first {
            let (_, r, _) = self.cached(ids).await?;
            let (_, e) = self.exact(ids).await?;
            (e, r)
        } else {
            let (_, e) = self.exact(ids).await?;
            let (_, r, _) = self.cached(ids).await?;
            (e, r)
        };
        self.server.cache.flush();
        let missed = self.server.cache.counts().recorded == recorded + 1;
        Ok(missed.then_some(RecordPair {
            tokens: ids.len(),
            exact_ms,
            record_ms,
            record_first,
        }))
    }

    async fn serve(
        &self,
        workload: &str,
        ids: &[u32],
        differing: usize,
        label: Option<String>,
    ) -> anyhow::Result<(Served, Vec<f32>, Vec<f32>)> {
        let exact = self.exact(ids).await?;
        self.serve_against(workload, ids, differing, label, exact)
            .await
    }

    /// [`Runner::serve`] with the exact embedding and time already measured.
    async fn serve_against(
        &self,
        workload: &str,
        ids: &[u32],
        differing: usize,
        label: Option<String>,
        (exact, exact_ms): (Vec<f32>, f64),
    ) -> anyhow::Result<(Served, Vec<f32>, Vec<f32>)> {
        let (cached, cached_ms, d) = self.cached(ids).await?;
        let outcome = match d.map(|d| d.outcome) {
            Some(Outcome::ExactHit) => "hit",
            Some(Outcome::NearHit) => "near_hit",
            _ => "miss",
        };
        Ok((
            Served {
                workload: workload.into(),
                tokens: ids.len(),
                differing,
                outcome: outcome.into(),
                recomputed: d
                    .filter(|d| d.residual_deviation.is_some())
                    .map(|d| d.recomputed_rows),
                residual: d.and_then(|d| d.residual_deviation),
                resumed_after_layer: d.and_then(|d| d.resumed_after_layer),
                exact_ms,
                cached_ms,
                lookup_ms: d.map_or(0.0, |d| d.lookup_ns as f64 / 1e6),
                cos: cosine(&cached, &exact),
                stored_cos: None,
                label,
            },
            exact,
            cached,
        ))
    }
}

/// The lookup-overlap comparison: each input served `reps` times with the lookup on a thread
/// while layer 0 runs and `reps` times before it, in alternating order (hits on a stored
/// neighbour, nothing recorded). Per input: median times and their ratio.
async fn lookup_overlap(
    runner: &Runner,
    policy: &attncache_plugin::BlendPolicy,
    inputs: &[(String, Vec<u32>)],
    reps: usize,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let cache = &runner.server.cache;
    let with = |from: Option<usize>| attncache_plugin::BlendPolicy {
        lookup_overlap_from: from,
        ..policy.clone()
    };
    let mut out = Vec::new();
    for (what, ids) in inputs.iter().filter(|_| reps > 0) {
        let (mut during, mut before) = (Vec::new(), Vec::new());
        let (mut during_lookup, mut before_lookup) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            for overlapped in [rep % 2 == 0, rep % 2 == 1] {
                cache.set_blend_policy(with(overlapped.then_some(0)))?;
                let (_, ms, d) = runner.cached(ids).await?;
                if !matches!(
                    d.map(|d| d.outcome),
                    Some(Outcome::ExactHit | Outcome::NearHit)
                ) {
                    eprintln!("blend-eval: a lookup-overlap input of {what} was not a hit");
                }
                let lookup = d.map_or(0.0, |d| d.lookup_ns as f64 / 1e6);
                match overlapped {
                    true => (during.push(ms), during_lookup.push(lookup)),
                    false => (before.push(ms), before_lookup.push(lookup)),
                };
            }
        }
        let (d, b) = (median(&during), median(&before));
        eprintln!(
            "blend-eval: lookup overlap, {what}: {b:.1} ms before layer 0, {d:.1} ms during it"
        );
        out.push(serde_json::json!({
            "input": what,
            "tokens": ids.len(),
            "reps": reps,
            "before_ms": b,
            "during_ms": d,
            "lookup_before_ms": median(&before_lookup),
            "lookup_during_ms": median(&during_lookup),
            "speedup": b / d,
        }));
    }
    cache.set_blend_policy(policy.clone())?;
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    attncache_benches::logging::init();
    let args = Args::parse();
    let model = args.model.to_str().context("model path is not UTF-8")?;
    let tok = tokenizers::Tokenizer::from_file(args.model.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let mut argv = vec![
        "attncache-server",
        "--model",
        model,
        "--attn-cache",
        "off",
        "--reuse",
        "blend",
        "--hot-mib",
        "8192",
    ];
    let gate = args
        .blend_gate
        .as_ref()
        .map(|p| p.to_string_lossy().to_string());
    if let Some(gate) = &gate {
        argv.extend(["--blend-gate", gate.as_str()]);
    }
    argv.extend(args.server_args.split_whitespace());
    let serve = ServeArgs::parse_from(argv);
    if !args.trust_rows.is_empty() && args.trust_kinds.is_empty() {
        return trust_stage(&args, None, &tok, Some(&args.trust_rows)).await;
    }
    let runner = Runner {
        server: LocalServer::start(&serve).await?,
    };
    // the server's policy as it loaded it (with the gate of --blend-gate, which the flags'
    // policy does not hold): every policy this eval sets derives from it
    let policy = (*runner.server.cache.blend_policy()).clone();
    eprintln!(
        "blend-eval: policy {:?}; fidelity gate: {}",
        BlendPolicy {
            gate: None,
            ..policy.clone()
        },
        policy.gate.as_ref().map_or("none".into(), |g| g.describe())
    );

    if args.trust {
        return trust_stage(&args, Some(&runner), &tok, None).await;
    }
    if let Some(dir) = &args.revisions {
        return revision_stage(&args, &runner, &tok, dir).await;
    }
    let all = emails(&args, &tok)?;
    let mut pairs = near_pairs(&all, args.tokens, args.max_differing);
    pairs.truncate(args.pairs);
    eprintln!(
        "blend-eval: {} emails, {} near-duplicate pairs at {} tokens",
        all.len(),
        pairs.len(),
        args.tokens
    );
    anyhow::ensure!(!pairs.is_empty(), "no near-duplicate pairs found");
    let progress = |what: &str, i: usize, n: usize| eprintln!("blend-eval: {what} {i}/{n}");
    let cache = runner.server.cache.clone();
    let (calib, test): (Vec<_>, Vec<_>) = match args.no_sweep {
        true => (Vec::new(), pairs.clone()),
        false => {
            let (c, t): (Vec<_>, Vec<_>) = pairs.iter().enumerate().partition(|(i, _)| i % 2 == 0);
            (
                c.into_iter().map(|x| *x.1).collect(),
                t.into_iter().map(|x| *x.1).collect(),
            )
        }
    };
    // calibration: each calibration pair's first email stored, the second served under
    // every policy of the grid (not recorded, so each policy sees the same store)
    // (the fast rule alone; then, when the server's policy has a resume layer, so that the
    // stored entries keep states after it, the same rule escalating what it refuses)
    let mut grid = Vec::new();
    for max_deviation in [0.005f32, 0.01, 0.02] {
        for min_share in [0.1f32, 0.2, 0.3, 0.4] {
            grid.push(attncache_plugin::BlendPolicy {
                max_deviation,
                min_recompute_share: min_share,
                max_recompute_share: 0.5,
                resume_layer: None,
                ..policy.clone()
            });
        }
    }
    if policy.resume_layer.is_some() {
        for min_share in [0.3f32, 0.4] {
            for escalate_share in [0.1f32, 0.2, 0.3] {
                grid.push(attncache_plugin::BlendPolicy {
                    max_deviation: 0.005,
                    min_recompute_share: min_share,
                    max_recompute_share: 0.5,
                    escalate_share,
                    ..policy.clone()
                });
            }
        }
    }
    let mut sweep_rows: Vec<Vec<Served>> = vec![Vec::new(); grid.len()];
    for (k, &(a, b, differing)) in calib.iter().enumerate() {
        cache.set_blend_policy(policy.clone())?;
        runner
            .store("calibration", &all[a].1[..args.tokens])
            .await?;
        cache.set_admission(false);
        let ids_b = &all[b].1[..args.tokens];
        let exact = runner.exact(ids_b).await?;
        for (g, p) in grid.iter().enumerate() {
            cache.set_blend_policy(p.clone())?;
            let (r, _, _) = runner
                .serve_against("calibration", ids_b, differing, None, exact.clone())
                .await?;
            sweep_rows[g].push(r);
        }
        cache.set_admission(true);
        progress("calibration pairs", k + 1, calib.len());
    }
    let sweep: Vec<SweepPoint> = grid
        .iter()
        .zip(&sweep_rows)
        .map(|(p, rows)| SweepPoint::of(p, rows))
        .collect();
    // the fastest policy whose calibration hits keep the fidelity targets (or, if none
    // does, the most faithful one)
    let safe = |s: &SweepPoint| {
        s.fidelity_mean.is_some_and(|m| m >= args.target_mean)
            && s.fidelity_min.is_some_and(|m| m >= args.target_min)
    };
    let chosen = sweep
        .iter()
        .filter(|_| !calib.is_empty())
        .filter(|s| safe(s))
        .max_by(|a, b| a.workload_speedup.total_cmp(&b.workload_speedup))
        .or_else(|| {
            sweep.iter().max_by(|a, b| {
                a.fidelity_min
                    .unwrap_or(0.0)
                    .total_cmp(&b.fidelity_min.unwrap_or(0.0))
            })
        })
        .filter(|_| !calib.is_empty())
        .map(|s| s.policy.clone())
        .unwrap_or_else(|| policy.clone());
    let chosen_is_safe = sweep.iter().any(|s| s.policy == chosen && safe(s));

    // second stage: the dilution exponent, on long calibration documents with one span
    // edited (the sliding window confines what the edit moves at the check layer; the pairs
    // above moved everywhere, where the exponent changes nothing); each document stored
    // under the chosen policy, its edit served under every exponent
    let stream: Vec<u32> = all
        .iter()
        .flat_map(|(_, ids)| ids[1..].iter().copied())
        .collect();
    let mut offset = 0usize;
    let dilutions: Vec<attncache_plugin::BlendPolicy> = [0.0f32, 1.0, 2.0, 3.0]
        .iter()
        .map(|&dilution| attncache_plugin::BlendPolicy {
            dilution,
            ..chosen.clone()
        })
        .collect();
    let mut dilution_rows: Vec<Vec<Served>> = vec![Vec::new(); dilutions.len()];
    let long_calibration = if args.no_sweep {
        0
    } else {
        args.long_calibration
    };
    for len in [512usize, 1024, 2048] {
        for d in 0..long_calibration {
            let mut doc = vec![all[0].1[0]];
            doc.extend_from_slice(&stream[offset..offset + len - 1]);
            offset += len;
            cache.set_blend_policy(chosen.clone())?;
            runner.store("calibration-long", &doc).await?;
            cache.set_admission(false);
            let mut edited = doc.clone();
            let at = len * (1 + d % 3) / 4;
            edited[at..at + 16].copy_from_slice(&stream[offset..offset + 16]);
            offset += 16;
            let differing = align(&edited, &doc).differing.len();
            let exact = runner.exact(&edited).await?;
            for (g, p) in dilutions.iter().enumerate() {
                cache.set_blend_policy(p.clone())?;
                let (r, _, _) = runner
                    .serve_against("calibration-long", &edited, differing, None, exact.clone())
                    .await?;
                dilution_rows[g].push(r);
            }
            cache.set_admission(true);
            progress(
                &format!("{len}-token calibration documents"),
                d + 1,
                long_calibration,
            );
        }
    }
    let dilution_sweep: Vec<SweepPoint> = dilutions
        .iter()
        .zip(&dilution_rows)
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(p, rows)| SweepPoint::of(p, rows))
        .collect();
    // the fastest exponent whose calibration hits keep the targets (none: the chosen one's)
    let chosen = dilution_sweep
        .iter()
        .filter(|s| safe(s))
        .max_by(|a, b| a.workload_speedup.total_cmp(&b.workload_speedup))
        .map_or(chosen, |s| s.policy.clone());
    eprintln!("blend-eval: chosen policy {chosen:?} (meets the targets: {chosen_is_safe})");
    cache.set_blend_policy(chosen.clone())?;

    let (mut stored, mut served) = (Vec::new(), Vec::new());
    // inputs of the lookup-overlap comparison: (what, tokens)
    let mut overlap_inputs: Vec<(String, Vec<u32>)> = Vec::new();
    let mut exact_served = Vec::new();
    let mut cached_served = Vec::new();
    let mut stored_exact: Vec<(String, Vec<f32>)> = Vec::new();
    let n = test.len();
    for (k, &(a, b, differing)) in test.iter().enumerate() {
        let ids_a = &all[a].1[..args.tokens];
        let ids_b = &all[b].1[..args.tokens];
        if k == 0 {
            overlap_inputs.push(("spam-near-duplicates".into(), ids_b.to_vec()));
        }
        let (s, exact_a) = runner.store("spam-near-duplicates", ids_a).await?;
        stored.push(s);
        stored_exact.push((all[a].0.clone(), exact_a.clone()));
        let (r, e, c) = runner
            .serve(
                "spam-near-duplicates",
                ids_b,
                differing,
                Some(all[b].0.clone()),
            )
            .await?;
        served.push(Served {
            stored_cos: Some(cosine(&exact_a, &e)),
            ..r
        });
        exact_served.push(e);
        cached_served.push(c);
        if (k + 1) % 5 == 0 || k + 1 == n {
            progress("near-duplicate pairs", k + 1, n);
        }
    }

    // long documents: concatenated emails, one 16-token span in the middle replaced
    for len in [512usize, 1024, 2048] {
        for d in 0..args.long_docs {
            let mut doc = vec![all[0].1[0]];
            doc.extend_from_slice(&stream[offset..offset + len - 1]);
            offset += len;
            let (s, _) = runner.store(&format!("long-{len}"), &doc).await?;
            stored.push(s);
            let mut edited = doc.clone();
            let at = len / 2 + d * 7;
            edited[at..at + 16].copy_from_slice(&stream[offset..offset + 16]);
            offset += 16;
            let differing = align(&edited, &doc).differing.len();
            if d == 0 {
                overlap_inputs.push((format!("long-{len}"), edited.clone()));
            }
            let (r, _, _) = runner
                .serve(&format!("long-{len}"), &edited, differing, None)
                .await?;
            served.push(r);
            let (r, _, _) = runner
                .serve(&format!("identical-{len}"), &doc, 0, None)
                .await?;
            served.push(r);
            if d == 0 {
                // the first document again with 8 tokens inserted in the middle (the first 8
                // of the span above) and its last 8 dropped: the same length, the positions
                // after the insertion shifted (never diluted)
                let at = len / 2;
                let mut shifted = doc[..at].to_vec();
                shifted.extend_from_slice(&stream[offset - 16..offset - 8]);
                shifted.extend_from_slice(&doc[at..len - 8]);
                let differing = align(&shifted, &doc).differing.len();
                let (r, _, _) = runner
                    .serve(&format!("shifted-{len}"), &shifted, differing, None)
                    .await?;
                served.push(r);
            }
            progress(&format!("{len}-token documents"), d + 1, args.long_docs);
        }
    }
    // identical repeats at 256 tokens: the stored near-duplicate emails asked again
    for &(a, _, _) in test.iter().take(args.long_docs.max(3)) {
        let (r, _, _) = runner
            .serve("identical-256", &all[a].1[..args.tokens], 0, None)
            .await?;
        served.push(r);
    }
    let overlap = lookup_overlap(&runner, &chosen, &overlap_inputs, args.overlap_reps).await?;
    // recording's cost: fresh windows of the email stream (unaligned to emails, so no
    // stored input equals or neighbours them), exact and recorded in alternating order
    let mut record_pairs = Vec::new();
    for rep in 0..args.record_reps {
        for len in [args.tokens, 512] {
            let Some(window) = stream.get(offset..offset + len - 1) else {
                break;
            };
            offset += len + 31;
            let mut ids = vec![all[0].1[0]];
            ids.extend_from_slice(window);
            if let Some(pair) = runner.record_pair(&ids, rep % 2 == 1).await? {
                record_pairs.push(pair);
            }
        }
        progress("recording's cost", rep + 1, args.record_reps);
    }
    let counts = runner.server.cache.counts();
    attncache_plugin::uninstall();

    // summaries
    let of = |w: &str| {
        served
            .iter()
            .filter(|s| s.workload == w)
            .collect::<Vec<_>>()
    };
    let summary = |rows: &[&Served]| {
        let hits: Vec<&&Served> = rows.iter().filter(|r| r.outcome != "miss").collect();
        let speed = |rs: &[&&Served]| {
            let e: Vec<f64> = rs.iter().map(|r| r.exact_ms).collect();
            let c: Vec<f64> = rs.iter().map(|r| r.cached_ms).collect();
            (!rs.is_empty()).then(|| median(&e) / median(&c))
        };
        let all_rows: Vec<&&Served> = rows.iter().collect();
        let cos: Vec<f64> = hits.iter().map(|r| r.cos).collect();
        let stored_cos: Vec<f64> = rows.iter().filter_map(|r| r.stored_cos).collect();
        serde_json::json!({
            "inputs": rows.len(),
            "hits": hits.len(),
            "escalated": hits.iter().filter(|r| r.resumed_after_layer.is_some()).count(),
            "hit_rate": hits.len() as f64 / rows.len().max(1) as f64,
            "safe_hit_rate": hits.iter().filter(|r| r.cos >= 0.99).count() as f64 / rows.len().max(1) as f64,
            "hit_speedup_median": speed(&hits),
            "workload_speedup": sum(all_rows.iter().map(|r| r.exact_ms)) / sum(all_rows.iter().map(|r| r.cached_ms)).max(1e-9),
            "fidelity_mean": (!cos.is_empty()).then(|| attncache_benches::stats::mean(&cos)),
            "fidelity_p1": (!cos.is_empty()).then(|| attncache_benches::stats::quantile(&cos, 0.01)),
            "fidelity_min": (!cos.is_empty()).then(|| attncache_benches::stats::min(&cos)),
            "stored_as_is_fidelity_mean": (!stored_cos.is_empty()).then(|| attncache_benches::stats::mean(&stored_cos)),
            "stored_as_is_fidelity_min": (!stored_cos.is_empty()).then(|| attncache_benches::stats::min(&stored_cos)),
            "recomputed_share_mean": (!hits.is_empty()).then(|| hits.iter().map(|r| f64::from(r.recomputed.unwrap_or(0)) / r.tokens as f64).sum::<f64>() / hits.len() as f64),
            "lookup_share_of_hit": (!hits.is_empty()).then(|| hits.iter().map(|r| r.lookup_ms).sum::<f64>() / hits.iter().map(|r| r.cached_ms).sum::<f64>()),
        })
    };
    let near = of("spam-near-duplicates");
    let centroids: Vec<(String, Vec<f32>)> = ["spam", "ham"]
        .iter()
        .filter_map(|label| {
            let members: Vec<&Vec<f32>> = stored_exact
                .iter()
                .filter(|(l, _)| l == label)
                .map(|(_, e)| e)
                .collect();
            let first = members.first()?;
            let mut c = vec![0f32; first.len()];
            for m in &members {
                for (x, y) in c.iter_mut().zip(m.iter()) {
                    *x += y;
                }
            }
            Some((label.to_string(), c))
        })
        .collect();
    let labels: Vec<&String> = near.iter().filter_map(|r| r.label.as_ref()).collect();
    let acc = |embs: &[Vec<f32>]| {
        embs.iter()
            .zip(&labels)
            .filter(|(e, l)| &&classify(e, &centroids) == *l)
            .count() as f64
            / labels.len().max(1) as f64
    };
    let accuracy_drop_pt = 100.0 * (acc(&exact_served) - acc(&cached_served));
    // the median of per-input ratios, each input's two runs back to back in alternating
    // order (the stored inputs' single, exact-first samples drift with the machine)
    let ratios = |tokens: Option<usize>| {
        let r: Vec<f64> = record_pairs
            .iter()
            .filter(|p| tokens.is_none_or(|t| p.tokens == t))
            .map(|p| p.record_ms / p.exact_ms)
            .collect();
        (!r.is_empty()).then(|| median(&r))
    };
    let record_overhead = ratios(None).map(|r| r - 1.0);
    let workloads = [
        "spam-near-duplicates",
        "long-512",
        "long-1024",
        "long-2048",
        "shifted-512",
        "shifted-1024",
        "shifted-2048",
        "identical-256",
        "identical-512",
        "identical-1024",
        "identical-2048",
    ];
    let per: serde_json::Map<String, serde_json::Value> = workloads
        .iter()
        .map(|w| (w.to_string(), summary(&of(w))))
        .collect();
    let hit_speedup = |w: &str| per[w]["hit_speedup_median"].as_f64();
    let near_summary = &per["spam-near-duplicates"];
    // measured: what the stored inputs' entries added to the hot tier, per token
    let recorded: Vec<&Stored> = stored.iter().filter(|s| s.entry_bytes > 0).collect();
    let bytes_per_token = (!recorded.is_empty()).then(|| {
        recorded.iter().map(|s| s.entry_bytes as f64).sum::<f64>()
            / recorded.iter().map(|s| s.tokens as f64).sum::<f64>()
    });
    let headline = serde_json::json!({
        "blend_hit_speedup_256": hit_speedup("spam-near-duplicates"),
        "blend_hit_speedup_1024": hit_speedup("long-1024"),
        "blend_e2e_speedup_redundant": near_summary["workload_speedup"],
        "blend_fidelity_mean": near_summary["fidelity_mean"],
        "blend_fidelity_min": near_summary["fidelity_min"],
        "blend_accuracy_drop_pt": accuracy_drop_pt,
        "blend_safe_hit_rate_redundant": near_summary["safe_hit_rate"],
        "blend_bytes_per_token": bytes_per_token,
        "blend_record_overhead": record_overhead,
    });
    let report = serde_json::json!({
        "commit": attncache_benches::provenance::git_commit(),
        "machine": attncache_benches::provenance::machine(),
        "date": attncache_benches::provenance::now_utc(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "policy": chosen,
        "policy_meets_targets": chosen_is_safe,
        "targets": {"fidelity_mean": args.target_mean, "fidelity_min": args.target_min},
        "sweep": sweep,
        "dilution_sweep": dilution_sweep,
        "lookup_overlap": overlap,
        "long_calibration_documents": long_calibration,
        "pairs": pairs.len(),
        "calibration_pairs": calib.len(),
        "test_pairs": test.len(),
        "tokens": args.tokens,
        "headline": headline,
        "workloads": per,
        "counts": {
            "blend_hits": counts.blend_hits,
            "blend_refused": counts.blend_refused,
            "blend_escalated": counts.blend_escalated,
            "recomputed_tokens": counts.recomputed_tokens,
            "recorded": counts.recorded,
        },
        "record_cost": {
            "pairs": record_pairs,
            "median_ratio": ratios(None),
            "median_ratio_256": ratios(Some(args.tokens)),
            "median_ratio_512": ratios(Some(512)),
        },
        "served": served,
        "stored": stored,
    });
    let json_path = args.out.with_extension("json");
    write_report(&args.out, &report, markdown(&report))?;
    merge_latest(&args.latest, &headline)?;
    println!("{}", serde_json::to_string_pretty(&headline)?);
    eprintln!("blend-eval: wrote {}", json_path.display());
    Ok(())
}

/// The rows of the trust reports `paths` (a pair in several counted once), the first
/// report (for its setting) and the seeds they were drawn with.
fn read_trust_rows(
    paths: &[PathBuf],
) -> anyhow::Result<(Vec<trust::Row>, serde_json::Value, Vec<u64>)> {
    let mut rows = Vec::new();
    let mut seeds = Vec::new();
    let mut first = serde_json::Value::Null;
    for path in paths {
        let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)
            .with_context(|| format!("reading {}", path.display()))?;
        let these: Vec<trust::Row> = serde_json::from_value(old["rows"].clone())?;
        rows.extend(these);
        seeds.extend(old["gate"]["calibration"]["seed"].as_u64());
        if first.is_null() {
            first = old;
        }
    }
    let before = rows.len();
    let rows = trust::dedupe(rows);
    if rows.len() < before {
        eprintln!(
            "blend-eval: {} of {before} rows were the same pair served again, counted once",
            before - rows.len()
        );
    }
    Ok((rows, first, seeds))
}

/// The trust stage ([`trust`]): serves the pairs (or reads the rows of `rows_from`), fits
/// and writes the gate, writes the report and merges its headline into `latest.json`.
async fn trust_stage(
    args: &Args,
    runner: Option<&Runner>,
    tok: &tokenizers::Tokenizer,
    rows_from: Option<&[PathBuf]>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut seeds = vec![args.seed];
    let (rows, setting, n_pairs_note): (Vec<trust::Row>, trust::Setting, String) =
        match (runner, rows_from) {
            (_, Some(paths)) => {
                let (rows, old, file_seeds) = read_trust_rows(paths)?;
                seeds = file_seeds;
                let s = &old["setting"];
                let setting = trust::Setting {
                    floor: s["floor"].as_f64().unwrap_or(0.99),
                    target: s["target"].as_f64().unwrap_or(0.01),
                    margin: args.trust_margin,
                    bands: serde_json::from_value(s["bands"].clone())?,
                    min_gain: s["min_gain"].as_f64().unwrap_or(1.5) as f32,
                    fixed_tokens: s["fixed_tokens"].as_f64().unwrap_or(31.0) as f32,
                    n_layers: s["n_layers"].as_u64().context("setting.n_layers")? as usize,
                    check_layer: s["check_layer"].as_u64().unwrap_or(0) as usize,
                    resume_layer: s["resume_layer"].as_u64().map(|x| x as usize),
                };
                let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                (rows, setting, format!("rows of {}", names.join(" and ")))
            }
            (Some(runner), None) => {
                let all = emails(args, tok)?;
                let mined = near_pairs(&all, args.tokens, args.max_differing);
                eprintln!(
                    "blend-eval: {} mined near-duplicate email pairs at {} tokens",
                    mined.len(),
                    args.tokens
                );
                let src = kinds::Sources {
                    tok,
                    emails: &all,
                    mined: &mined,
                    mined_tokens: args.tokens,
                };
                let mut pairs =
                    kinds::build(&src, args.trust_per_kind, args.trust_long, args.seed)?;
                if let Some(dir) = &args.trust_revisions {
                    pairs.extend(revisions::trust_pairs(
                        tok,
                        dir,
                        args.revision_max_tokens,
                        args.revision_chunk_tokens,
                    )?);
                }
                if !args.trust_kinds.is_empty() {
                    pairs.retain(|p| args.trust_kinds.iter().any(|k| k == p.kind));
                }
                let mut kinds_served: Vec<&str> = pairs.iter().map(|p| p.kind).collect();
                kinds_served.dedup();
                eprintln!(
                    "blend-eval: trust stage, {} pairs over {} kinds",
                    pairs.len(),
                    kinds_served.len()
                );
                let mut rows = trust::serve(runner, &pairs).await?;
                if !args.trust_rows.is_empty() {
                    let (old, _, _) = read_trust_rows(&args.trust_rows)?;
                    let kept = old
                        .into_iter()
                        .filter(|r| !args.trust_kinds.contains(&r.kind));
                    rows = kept.chain(rows).collect();
                }
                let policy = runner.server.cache.blend_policy();
                let setting = trust::Setting {
                    floor: args.target_min,
                    target: 0.01,
                    margin: args.trust_margin,
                    bands: vec![0, 64, 512],
                    min_gain: policy.min_gain,
                    fixed_tokens: policy.fixed_tokens,
                    n_layers: runner.server.model.layers,
                    check_layer: policy.check_layer,
                    resume_layer: policy.resume_layer,
                };
                (rows, setting, "served".to_string())
            }
            (None, None) => anyhow::bail!("the trust stage needs a server or --trust-rows"),
        };
    let mut holdout_seed = None;
    let holdout: Option<Vec<trust::Row>> = match &args.trust_holdout {
        Some(path) => {
            let old: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
            let seed = old["gate"]["calibration"]["seed"].as_u64();
            holdout_seed = seed;
            anyhow::ensure!(
                seed.is_none_or(|s| !seeds.contains(&s)),
                "--trust-holdout {} was drawn with --seed {} as the calibration was: the pairs \
                 are the same",
                path.display(),
                seed.unwrap_or_default()
            );
            Some(serde_json::from_value(old["rows"].clone())?)
        }
        None => None,
    };
    let mut report = trust::analyse(&setting, &rows, args.seed, holdout.as_deref());
    let commit = attncache_benches::provenance::git_commit();
    let machine = attncache_benches::provenance::machine();
    let date = attncache_benches::provenance::now_utc();
    let mut gate: attncache_plugin::reuse::FidelityGate =
        serde_json::from_value(report["gate"].clone())?;
    gate.calibration = serde_json::json!({
        "by": "attncache-blend-eval --trust",
        "model": args.model.file_name().and_then(|n| n.to_str()).unwrap_or(""),
        "pairs": rows.len(),
        "pairs_per_kind": report["pairs_per_kind"],
        "seed": seeds.first(),
        "seeds": seeds,
        "holdout": args.trust_holdout.as_ref().map(|_| serde_json::json!({
            "pairs": holdout.as_ref().map(Vec::len),
            "seed": holdout_seed,
        })),
        "commit": commit,
        "machine": machine,
        "date": date,
        "held_out_check": "leave-one-kind-out in benches/results/blend-trust.md",
    });
    report["gate"] = serde_json::to_value(&gate)?;
    let wall = started.elapsed().as_secs_f64();
    if let Some(obj) = report.as_object_mut() {
        obj.insert("commit".into(), serde_json::json!(commit));
        obj.insert("machine".into(), serde_json::json!(machine));
        obj.insert("date".into(), serde_json::json!(date));
        obj.insert(
            "command".into(),
            serde_json::json!(std::env::args().collect::<Vec<_>>().join(" ")),
        );
        let source = args.trust_source.clone().unwrap_or(n_pairs_note);
        obj.insert("source".into(), serde_json::json!(source));
        obj.insert("wall_seconds".into(), serde_json::json!(wall));
        obj.insert("rows".into(), serde_json::to_value(&rows)?);
    }
    write_report(&args.trust_out, &report, trust::markdown(&report))?;
    std::fs::write(&args.gate_out, serde_json::to_string_pretty(&gate)? + "\n")?;
    merge_latest(&args.latest, &report["headline"])?;
    println!("{}", serde_json::to_string_pretty(&report["headline"])?);
    eprintln!(
        "blend-eval: trust stage took {wall:.0} s; wrote {}, {}",
        args.trust_out.with_extension("md").display(),
        args.gate_out.display()
    );
    Ok(())
}

/// The revision stage ([`revisions`]): serves the stream, writes the report and merges its
/// headline into `latest.json`.
async fn revision_stage(
    args: &Args,
    runner: &Runner,
    tok: &tokenizers::Tokenizer,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let rows = revisions::serve(
        runner,
        tok,
        dir,
        args.revision_max_tokens,
        args.revision_chunk_tokens,
        &args.revision_packages,
    )
    .await?;
    let (modes, headline) = revisions::report(&rows);
    let report = serde_json::json!({
        "commit": attncache_benches::provenance::git_commit(),
        "machine": attncache_benches::provenance::machine(),
        "date": attncache_benches::provenance::now_utc(),
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "wall_seconds": started.elapsed().as_secs_f64(),
        "modes": modes,
        "headline": headline,
        "rows": rows,
    });
    write_report(&args.revisions_out, &report, revisions::markdown(&report))?;
    merge_latest(&args.latest, &headline)?;
    println!("{}", serde_json::to_string_pretty(&headline)?);
    eprintln!(
        "blend-eval: revision stage took {:.0} s; wrote {}",
        started.elapsed().as_secs_f64(),
        args.revisions_out.with_extension("md").display()
    );
    Ok(())
}

/// Merges the keys of `headline` into the results file at `path` (empty: none), keeping its
/// other keys.
fn merge_latest(path: &str, headline: &serde_json::Value) -> anyhow::Result<()> {
    if path.is_empty() {
        return Ok(());
    }
    let mut latest: serde_json::Value = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    if let (Some(obj), Some(h)) = (latest.as_object_mut(), headline.as_object()) {
        for (k, v) in h {
            // a figure this run could not measure (no hit to time) is absent, not null
            if v.is_null() {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), v.clone());
            }
        }
    }
    std::fs::write(path, serde_json::to_string_pretty(&latest)? + "\n")?;
    Ok(())
}

/// Writes `report` as `<out>.json` and its Markdown rendering `md` as `<out>.md`.
fn write_report(
    out: &std::path::Path,
    report: &serde_json::Value,
    md: String,
) -> anyhow::Result<()> {
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_string_pretty(report)? + "\n",
    )?;
    std::fs::write(out.with_extension("md"), md)?;
    Ok(())
}
