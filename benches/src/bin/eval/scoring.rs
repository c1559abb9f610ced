//! Scoring a workload's passes against its served run ([`Scoring`]: each lever's sweep over
//! target errors) and the database-size stage ([`db_size_stage`]).

use super::*;

/// What the sweeps of a workload are scored against: the served run's exact rows and the
/// head trained on exact embeddings.
pub(super) struct Scoring<'a> {
    pub(super) rows: &'a [Row],
    pub(super) head: &'a Classifier,
    pub(super) ys: &'a [u32],
    pub(super) accuracy_exact: f64,
}

impl Scoring<'_> {
    /// A lever's report: its gate's rank correlation, its reuse errors by differing share,
    /// and its sweep over target errors composed from `test` (one forced pass).
    pub(super) fn lever_report(
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
pub(super) async fn db_size_stage(
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
                let decision = e.decision().context("the cache decided")?;
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
