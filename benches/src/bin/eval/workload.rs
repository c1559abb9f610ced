//! One workload's evaluation, one method per stage of the crate doc's list, over a
//! [`WorkloadRun`] that holds the workload's server and what every stage reads:
//!
//! 1. [`WorkloadRun::warm_up`]: record the store split (identical-input reuse only);
//! 2. [`WorkloadRun::calibrate`]: the calibration inputs, exact (nothing recorded from here
//!    until the served run);
//! 3. [`WorkloadRun::sensitivities`]: layers and (layer, head) maps ranked by how much
//!    reusing each alone changes the output, for the `layers=N` / `heads=N` levers;
//! 4. [`WorkloadRun::lever_runs`]: every lever's calibration pass (→ its gate) and test pass;
//! 5. [`WorkloadRun::choose_served`]: the served configuration, chosen on calibration only;
//! 6. [`WorkloadRun::serve`]: the served run, stock / exact / cache in rotating order;
//! 7. [`WorkloadRun::report`]: accuracy, latency and fidelity of the served run, each lever's
//!    sweep, and (diverse workloads) the database-size stage.

use anyhow::Context;
use attncache_benches::report::{HeadSensitivity, LayerSensitivity, WorkloadReport};
use attncache_benches::stats::{self, Fidelity, Latency};
use attncache_benches::workloads::{Kind, Workload};
use attncache_plugin::{CacheCounts, ErrorGate, ExactAttention, GatePoint, Outcome, ReusePolicy};
use attncache_server::classifier::Classifier;
use attncache_server::local_server::{cosine, Embedded, LocalServer};
use std::time::Instant;

mod report;

use super::{
    db_size_stage, gate_points, is_hit, mean_lookup_ms_of, reuses, start_server, truncate, Args,
    Forced, LeverSpec, Row, Scoring, TARGETS,
};

/// Evaluates one workload (see the module doc for its stages).
pub(super) async fn run_workload(
    args: &Args,
    wl: &Workload,
    levers: &[LeverSpec],
    tok: &tokenizers::Tokenizer,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<WorkloadReport> {
    let run = WorkloadRun::start(args, wl, levers, tok, bar).await?;
    let (mut train_x, mut train_y) = run.warm_up().await?;
    let splits = run.calibrate(&mut train_x, &mut train_y).await?;
    let sens = run.sensitivities(&splits).await?;
    let runs = run.lever_runs(&splits, &sens).await?;
    let served = run.choose_served(&splits, &runs, &train_x, &train_y)?;
    let measured = run.serve(&splits.test_texts).await?;
    run.report(&splits, sens, &runs, served, measured, &train_x, &train_y)
        .await
}

/// A workload's server and what every stage reads.
struct WorkloadRun<'a> {
    args: &'a Args,
    wl: &'a Workload,
    levers: &'a [LeverSpec],
    tok: &'a tokenizers::Tokenizer,
    bar: &'a indicatif::ProgressBar,
    server: LocalServer,
    /// The server's cold tier, removed with the run.
    _cold: tempfile::TempDir,
    /// The workload's labels, sorted: a label's class is its index.
    labels: Vec<String>,
}

/// The inputs the stages after calibration use.
struct Splits {
    calib_texts: Vec<String>,
    /// Exact embeddings of the calibration inputs.
    calib_emb: Vec<Vec<f32>>,
    test_texts: Vec<String>,
}

/// Stage 3's results.
struct Sensitivities {
    /// The calibration pass with every layer's maps reused (also lever `all`'s).
    all_calib: Vec<Forced>,
    layers: Vec<LayerSensitivity>,
    heads: Vec<HeadSensitivity>,
    /// Layers, least sensitive first.
    least_sensitive: Vec<usize>,
    /// (layer, head) maps, least sensitive first.
    heads_first: Vec<[usize; 2]>,
}

/// One lever's passes and the gate fitted on its calibration pass.
struct LeverRun {
    spec: LeverSpec,
    policy: ReusePolicy,
    gate: Option<ErrorGate>,
    calib: Vec<Forced>,
    test: Vec<Forced>,
}

/// The served configuration: the lever's name and its maximum predicted error, or "exact
/// only" and none.
struct Served {
    lever: String,
    max_error: Option<f64>,
}

/// Stage 6's results: its rows and the cache's counters around it.
struct Measured {
    rows: Vec<Row>,
    before: CacheCounts,
    after: CacheCounts,
}

impl<'a> WorkloadRun<'a> {
    /// A fresh server with the cache on and a cold tier in a temporary directory.
    async fn start(
        args: &'a Args,
        wl: &'a Workload,
        levers: &'a [LeverSpec],
        tok: &'a tokenizers::Tokenizer,
        bar: &'a indicatif::ProgressBar,
    ) -> anyhow::Result<Self> {
        let cold = tempfile::tempdir()?;
        let server = start_server(args, cold.path(), 8192).await?;
        let mut labels: Vec<String> = wl
            .store
            .iter()
            .chain(&wl.test)
            .map(|e| e.label.clone())
            .collect();
        labels.sort();
        labels.dedup();
        Ok(Self {
            args,
            wl,
            levers,
            tok,
            bar,
            server,
            _cold: cold,
            labels,
        })
    }

    /// The text as served: the workload's prefix, cut to `--max-tokens`.
    fn prep(&self, text: &str) -> anyhow::Result<String> {
        truncate(
            self.tok,
            &format!("{}{text}", self.wl.prefix),
            self.args.max_tokens,
        )
    }

    fn label_of(&self, label: &str) -> u32 {
        self.labels.binary_search(&label.to_string()).unwrap_or(0) as u32
    }

    /// Times one request: `exact` picks the attention, `cached` the flag.
    async fn timed(
        &self,
        text: String,
        exact: ExactAttention,
        cached: bool,
    ) -> anyhow::Result<(f64, Embedded)> {
        self.server.hook.set_exact_attention(exact);
        self.server.cache.set_enabled_by_default(cached);
        let s = Instant::now();
        let e = self.server.embed(&text).await?;
        Ok((s.elapsed().as_secs_f64() * 1e3, e))
    }

    /// One pass over `texts` with the best-ranked neighbour's maps under `policy`;
    /// `with_exact`: also times each input on the exact path next to it.
    async fn forced_pass(
        &self,
        texts: Vec<String>,
        policy: ReusePolicy,
        with_exact: bool,
    ) -> anyhow::Result<Vec<Forced>> {
        let cache = &self.server.cache;
        cache.set_reuse_policy(policy)?;
        cache.set_error_gate(Some(ErrorGate::accept_all("forced")))?;
        let mut out = Vec::with_capacity(texts.len());
        for (i, text) in texts.into_iter().enumerate() {
            let exact_first = i % 2 == 0;
            let mut exact_ms = 0.0;
            if with_exact && exact_first {
                exact_ms = self
                    .timed(text.clone(), ExactAttention::Fast, false)
                    .await?
                    .0;
            }
            let (ms, e) = self.timed(text.clone(), ExactAttention::Fast, true).await?;
            let decision = e.decision().context("the cache decided")?;
            if with_exact && !exact_first {
                exact_ms = self.timed(text, ExactAttention::Fast, false).await?.0;
            }
            out.push(Forced {
                ms,
                exact_ms,
                embedding: e.embedding,
                decision,
            });
            self.bar.inc(1);
        }
        cache.set_error_gate(None)?;
        Ok(out)
    }

    /// Stage 1: records the store split, identical-input reuse only; returns its exact
    /// embeddings and classes (the heads' first training examples).
    async fn warm_up(&self) -> anyhow::Result<(Vec<Vec<f32>>, Vec<u32>)> {
        let cache = &self.server.cache;
        self.bar.set_message(format!("{} warm-up", self.wl.name));
        cache.set_similarity_threshold(None);
        cache.set_error_gate(None)?;
        cache.set_admission(true);
        let (mut train_x, mut train_y) = (Vec::new(), Vec::new());
        for e in &self.wl.store {
            let (_, emb) = self
                .timed(self.prep(&e.text)?, ExactAttention::Fast, true)
                .await?;
            train_x.push(emb.embedding);
            train_y.push(self.label_of(&e.label));
            self.bar.inc(1);
        }
        cache.flush(); // the warm-up's cold-tier writes must not overlap the measurements
        Ok((train_x, train_y))
    }

    /// Stage 2: the calibration inputs, exact (added to the heads' training examples);
    /// nothing is recorded from here until the served run.
    async fn calibrate(
        &self,
        train_x: &mut Vec<Vec<f32>>,
        train_y: &mut Vec<u32>,
    ) -> anyhow::Result<Splits> {
        self.bar.set_message(format!("{} calibrate", self.wl.name));
        self.server.cache.set_admission(false);
        let calib_texts: Vec<String> = self
            .wl
            .calib
            .iter()
            .map(|e| self.prep(&e.text))
            .collect::<anyhow::Result<_>>()?;
        let mut calib_emb = Vec::new();
        for (text, e) in calib_texts.iter().zip(&self.wl.calib) {
            let (_, exact) = self
                .timed(text.clone(), ExactAttention::Fast, false)
                .await?;
            calib_emb.push(exact.embedding.clone());
            train_x.push(exact.embedding);
            train_y.push(self.label_of(&e.label));
            self.bar.inc(1);
        }
        let test_texts: Vec<String> = self
            .wl
            .test
            .iter()
            .map(|e| self.prep(&e.text))
            .collect::<anyhow::Result<_>>()?;
        Ok(Splits {
            calib_texts,
            calib_emb,
            test_texts,
        })
    }

    /// Mean `1 − cosine` against the exact embeddings of the calibration inputs
    /// `with_neighbour` when `policy` reuses maps.
    async fn mean_loss(
        &self,
        splits: &Splits,
        with_neighbour: &[usize],
        policy: ReusePolicy,
    ) -> anyhow::Result<f64> {
        let texts = with_neighbour
            .iter()
            .map(|&i| splits.calib_texts[i].clone())
            .collect();
        let got = self.forced_pass(texts, policy, false).await?;
        let losses: Vec<f64> = got
            .iter()
            .zip(with_neighbour)
            .map(|(f, &i)| 1.0 - cosine(&splits.calib_emb[i], &f.embedding))
            .collect();
        Ok(stats::mean(&losses))
    }

    /// Stage 3: calibration inputs that have a neighbour, one layer (for `layers=N`
    /// levers) or one (layer, head) map (for `heads=N`) reused at a time.
    async fn sensitivities(&self, splits: &Splits) -> anyhow::Result<Sensitivities> {
        let (args, wl, bar) = (self.args, self.wl, self.bar);
        let all_calib = self
            .forced_pass(splits.calib_texts.clone(), ReusePolicy::default(), true)
            .await?;
        let with_neighbour: Vec<usize> = all_calib
            .iter()
            .enumerate()
            .filter(|(_, f)| f.decision.outcome == Outcome::NearHit)
            .map(|(i, _)| i)
            .take(args.sensitivity_inputs)
            .collect();
        let n_layers = self.server.model.layers;
        let mut layers = Vec::new();
        if self.levers.iter().any(|l| l.layers.is_some()) && !with_neighbour.is_empty() {
            bar.set_message(format!("{} layer sensitivity", wl.name));
            bar.inc_length((n_layers * with_neighbour.len()) as u64);
            for layer in 0..n_layers {
                let policy = ReusePolicy {
                    layers: vec![layer],
                    ..ReusePolicy::default()
                };
                let mean_loss = self.mean_loss(splits, &with_neighbour, policy).await?;
                layers.push(LayerSensitivity { layer, mean_loss });
            }
        }
        let mut order: Vec<&LayerSensitivity> = layers.iter().collect();
        order.sort_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss));
        let least_sensitive: Vec<usize> = order.iter().map(|s| s.layer).collect();
        let n_heads = self.server.model.heads.unwrap_or(0);
        let mut heads = Vec::new();
        if self.levers.iter().any(|l| l.heads.is_some())
            && !with_neighbour.is_empty()
            && n_heads > 0
        {
            bar.set_message(format!("{} head sensitivity", wl.name));
            bar.inc_length((n_layers * n_heads * with_neighbour.len()) as u64);
            for layer in 0..n_layers {
                for head in 0..n_heads {
                    let policy = ReusePolicy {
                        heads: vec![[layer, head]],
                        ..ReusePolicy::default()
                    };
                    let mean_loss = self.mean_loss(splits, &with_neighbour, policy).await?;
                    heads.push(HeadSensitivity {
                        layer,
                        head,
                        mean_loss,
                    });
                }
            }
        }
        let mut head_order: Vec<&HeadSensitivity> = heads.iter().collect();
        head_order.sort_by(|a, b| a.mean_loss.total_cmp(&b.mean_loss));
        let heads_first: Vec<[usize; 2]> = head_order.iter().map(|h| [h.layer, h.head]).collect();
        Ok(Sensitivities {
            all_calib,
            layers,
            heads,
            least_sensitive,
            heads_first,
        })
    }

    /// Stage 4: every lever's calibration pass (its gate is fitted on it) and test pass,
    /// with the best-ranked neighbour's maps.
    async fn lever_runs(
        &self,
        splits: &Splits,
        sens: &Sensitivities,
    ) -> anyhow::Result<Vec<LeverRun>> {
        let mut runs = Vec::new();
        for spec in self.levers {
            if (spec.layers.is_some() && sens.least_sensitive.is_empty())
                || (spec.heads.is_some() && sens.heads_first.is_empty())
            {
                continue; // no neighbour to measure sensitivity with: nothing to choose from
            }
            self.bar
                .set_message(format!("{} {}", self.wl.name, spec.name));
            let policy = spec.policy(&sens.least_sensitive, &sens.heads_first);
            let calib = if spec.layers.is_none()
                && spec.heads.is_none()
                && !spec.recompute
                && spec.slack == 0
            {
                sens.all_calib.clone()
            } else {
                self.bar.inc_length(splits.calib_texts.len() as u64);
                self.forced_pass(splits.calib_texts.clone(), policy.clone(), true)
                    .await?
            };
            let points: Vec<GatePoint> = gate_points(&calib, &splits.calib_emb)
                .into_iter()
                .map(|p| p.0)
                .collect();
            let gate = ErrorGate::fit(
                &points,
                self.args.max_error,
                self.args.gate_quantile,
                &spec.name,
            );
            let test = self
                .forced_pass(splits.test_texts.clone(), policy.clone(), true)
                .await?;
            runs.push(LeverRun {
                spec: spec.clone(),
                policy,
                gate,
                calib,
                test,
            });
        }
        Ok(runs)
    }

    /// Stage 5: the served configuration, chosen on the calibration split — the fastest
    /// (lever, target) whose calibration hits keep mean cosine ≥ `--target`, none below
    /// `--floor`, change no prediction of a head trained on the exact store and calibration
    /// embeddings, are at least `--min-calib-hits` of the split, and gain at least
    /// `--min-gain` (lookups counted); otherwise identical inputs only. Sets it on the cache.
    fn choose_served(
        &self,
        splits: &Splits,
        runs: &[LeverRun],
        train_x: &[Vec<f32>],
        train_y: &[u32],
    ) -> anyhow::Result<Served> {
        let args = self.args;
        let choice_head = Classifier::train(train_x, train_y, self.labels.clone(), 300)?;
        let calib_pred = choice_head.predict(&splits.calib_emb)?;
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
                    .map(|&i| cosine(&splits.calib_emb[i], &run.calib[i].embedding))
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
        let cache = &self.server.cache;
        let served = match served {
            Some((k, t, _)) => {
                let run = &runs[k];
                cache.set_reuse_policy(run.policy.clone())?;
                cache.set_error_gate(run.gate.as_ref().map(|g| g.with_max_loss(t)))?;
                Served {
                    lever: run.spec.name.clone(),
                    max_error: Some(t),
                }
            }
            None => {
                cache.set_reuse_policy(ReusePolicy::default())?;
                cache.set_error_gate(None)?;
                Served {
                    lever: "exact only".to_string(),
                    max_error: None,
                }
            }
        };
        tracing::info!(
            workload = %self.wl.name,
            served_lever = %served.lever,
            served_max_error = ?served.max_error,
            "served configuration"
        );
        Ok(served)
    }

    /// Stage 6: the served run, misses recorded; every test input three times in rotating
    /// order: stock attention (cache off), our exact attention (cache off), cache on.
    async fn serve(&self, test_texts: &[String]) -> anyhow::Result<Measured> {
        let cache = &self.server.cache;
        self.bar.set_message(format!("{} serve", self.wl.name));
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
                let (ms, e) = self.timed(text.clone(), exact, cached).await?;
                if cached {
                    let d = e.decision().context("the cache decided")?;
                    outcome = d.outcome;
                    lookup_ns = d.lookup_ns;
                }
                got[k] = Some((ms, e.embedding, e.tokens));
                self.bar.inc(1);
            }
            let [Some(stock), Some(exact), Some(cached)] = got else {
                anyhow::bail!("a column was not measured");
            };
            rows.push(Row {
                label: self.label_of(&self.wl.test[i].label),
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
        Ok(Measured {
            rows,
            before,
            after,
        })
    }
}
