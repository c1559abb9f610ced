//! Stage 7 of a workload's evaluation: its report.

use super::*;

impl WorkloadRun<'_> {
    /// Stage 7: the workload's report — the served run's accuracy (a head trained on the
    /// exact store and calibration embeddings), latency and fidelity; each lever's sweep
    /// over target errors, composed from its test pass; and, for diverse workloads, the
    /// same test inputs against stores grown with unlabelled text.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn report(
        &self,
        splits: &Splits,
        sens: Sensitivities,
        runs: &[LeverRun],
        served: Served,
        measured: Measured,
        train_x: &[Vec<f32>],
        train_y: &[u32],
    ) -> anyhow::Result<WorkloadReport> {
        let (args, wl) = (self.args, self.wl);
        let Measured {
            rows,
            before,
            after,
        } = measured;
        let head = Classifier::train(train_x, train_y, self.labels.clone(), 300)?;
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
        let scoring = Scoring {
            rows: &rows,
            head: &head,
            ys: &ys,
            accuracy_exact,
        };
        let mut lever_reports = Vec::new();
        for run in runs {
            lever_reports.push(scoring.lever_report(
                &run.spec.name,
                &run.policy,
                run.gate.as_ref(),
                &gate_points(&run.calib, &splits.calib_emb),
                &run.test,
            )?);
        }
        let db_sizes = if wl.kind == Kind::Diverse && !args.db_sizes.is_empty() {
            let gates: Vec<(LeverSpec, ReusePolicy, Option<ErrorGate>)> = runs
                .iter()
                .filter(|r| args.db_levers.iter().any(|l| l.name == r.spec.name))
                .map(|r| (r.spec.clone(), r.policy.clone(), r.gate.clone()))
                .collect();
            db_size_stage(
                args,
                wl,
                &splits.test_texts,
                &gates,
                &scoring,
                self.tok,
                self.bar,
            )
            .await?
        } else {
            Vec::new()
        };

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
            served_lever: served.lever,
            served_max_error: served.max_error,
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
            levers: lever_reports,
            layer_sensitivity: sens.layers,
            head_sensitivity: sens.heads,
            db_sizes,
        })
    }
}
