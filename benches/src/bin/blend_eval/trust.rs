//! The trust stage (`--trust`): near-duplicate pairs of six kinds drawn with a seed
//! ([`super::kinds`]), and with `--trust-revisions` the real revision stream's changed files
//! and chunks, served under every path a blend hit can take, then a fidelity gate fitted on
//! them ([`attncache_plugin::reuse::FidelityGate`]) and proved on kinds it never saw.
//!
//! **Serving.** Per pair, in one run, one after the other: the stored input is recorded; the
//! served input runs exactly (flag off), then with the flag on three times, nothing recorded:
//! under the server's rules with no gate and no smallest gain (the fast rule's hit, or an
//! escalated one when the fast rule refuses), forced to escalate, and forced to refuse at
//! the check layer (what a refusal costs: lookup, check layer, exact continuation). Each
//! run reports what its check layer saw ([`CheckSignals`]) and is timed whole.
//!
//! **Gates.** A gate decides per input which of those paths the server takes (the fast hit
//! when its signal is within the fast bound, else the escalated hit within the escalated
//! bound, else a refusal; then the smallest predicted gain), so the fidelity and time of
//! any gate on any pair are the measured ones of the path it takes. The bounds are fitted
//! per length band and rule with [`fit_bound`] (at most `target` of accepted hits below the
//! floor, split-conformal), each on the signal that accepts the most calibration hits.
//!
//! **Leave one kind out.** For each kind, a gate fitted on the other kinds serves it; the
//! accepted hits' fidelity (mean, p1, min, share below the floor, bootstrap intervals) and
//! the served speed-up are reported per kind. The shipped gate is fitted on every kind.

use std::time::Instant;

use attncache_plugin::reuse::{
    fit_bound, predicted_gain, CheckSignals, FidelityGate, GateBand, GateSignal,
};
use attncache_plugin::{BlendPolicy, Outcome};
use attncache_server::local_server::cosine;
use serde::{Deserialize, Serialize};

use super::kinds::{Pair, Rng, KINDS};
use super::Runner;

/// One flag-on run of a served input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PathRun {
    /// `hit`, `near_hit` or `miss`.
    pub outcome: String,
    pub escalated: bool,
    pub recomputed: u32,
    pub cos: f64,
    pub ms: f64,
    pub check: Option<CheckSignals>,
}

impl PathRun {
    fn is_hit(&self) -> bool {
        self.outcome != "miss"
    }
}

/// One pair, served exactly and under every path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Row {
    pub kind: String,
    pub tokens: usize,
    pub stored_tokens: usize,
    pub exact_ms: f64,
    /// The server's rules, no gate, no smallest gain.
    pub rules: PathRun,
    /// Forced to escalate.
    pub escalated: PathRun,
    /// Forced to refuse at the check layer.
    pub refused: PathRun,
}

/// Serves every pair (see the module documentation), with progress lines.
pub(super) async fn serve(runner: &Runner, pairs: &[Pair]) -> anyhow::Result<Vec<Row>> {
    let cache = &runner.server.cache;
    let base = (*cache.blend_policy()).clone();
    let rules = BlendPolicy {
        min_gain: 0.0,
        gate: None,
        ..base.clone()
    };
    let escalate = BlendPolicy {
        max_pooled_deviation: 0.0,
        ..rules.clone()
    };
    let refuse = BlendPolicy {
        resume_layer: None,
        ..escalate.clone()
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut stored = std::collections::HashSet::new();
    for (i, p) in pairs.iter().enumerate() {
        cache.set_blend_policy(base.clone())?;
        for s in p.also_stored.iter().chain([&p.stored]) {
            // stored once (an input stored again would only be an exact hit)
            if stored.insert(s.clone()) {
                runner.store(p.kind, s).await?;
            }
        }
        cache.set_admission(false);
        let (exact, exact_ms) = runner.exact(&p.served).await?;
        let mut runs: Vec<PathRun> = Vec::new();
        for policy in [&rules, &escalate, &refuse] {
            // the rules escalated already: forcing it would run the same S again
            if policy == &escalate && runs.first().is_some_and(|r| r.escalated) {
                runs.push(runs[0].clone());
                continue;
            }
            cache.set_blend_policy(policy.clone())?;
            let (emb, ms, d) = runner.cached(&p.served).await?;
            runs.push(PathRun {
                outcome: match d.map(|d| d.outcome) {
                    Some(Outcome::ExactHit) => "hit",
                    Some(Outcome::NearHit) => "near_hit",
                    _ => "miss",
                }
                .into(),
                escalated: d.is_some_and(|d| d.resumed_after_layer.is_some()),
                recomputed: d.map_or(0, |d| d.recomputed_rows),
                cos: cosine(&emb, &exact),
                ms,
                check: d.and_then(|d| d.check),
            });
        }
        cache.set_admission(true);
        cache.set_blend_policy(base.clone())?;
        let mut runs = runs.into_iter();
        let (Some(r), Some(e), Some(x)) = (runs.next(), runs.next(), runs.next()) else {
            unreachable!("three runs");
        };
        rows.push(Row {
            kind: p.kind.into(),
            tokens: p.served.len(),
            stored_tokens: p.stored.len(),
            exact_ms,
            rules: r,
            escalated: e,
            refused: x,
        });
        if (i + 1) % 10 == 0 || i + 1 == pairs.len() {
            let s = started.elapsed().as_secs_f64();
            eprintln!(
                "blend-eval: trust pairs {}/{} ({}), {s:.0} s, ~{:.0} s left",
                i + 1,
                pairs.len(),
                p.kind,
                s / (i + 1) as f64 * (pairs.len() - i - 1) as f64
            );
        }
    }
    Ok(rows)
}

/// `rows` with each pair once: two rows are the same pair served again (drawn by two seeds
/// from one small corpus, as the mined pairs are, or a corpus holding one email twice) when
/// their kind, lengths and every path's check signals are equal and their fidelities equal
/// to 1e-12 — one pair's deterministic computations.
pub(super) fn dedupe(rows: Vec<Row>) -> Vec<Row> {
    let mut seen = std::collections::HashSet::new();
    rows.into_iter()
        .filter(|r| {
            if r.rules.check.is_none() && r.escalated.check.is_none() {
                return true; // identical inputs all look alike: nothing tells pairs apart
            }
            let run = |p: &PathRun| {
                let c = p.check.unwrap_or_default();
                // the cosine to 1e-12: one pair's runs differ in its last bits
                let cos = (p.cos * 1e12).round() as i64;
                (
                    cos,
                    c.pooled.to_bits(),
                    c.stale.to_bits(),
                    c.residual.to_bits(),
                )
            };
            seen.insert((
                r.kind.clone(),
                r.tokens,
                r.stored_tokens,
                run(&r.rules),
                run(&r.escalated),
            ))
        })
        .collect()
}

/// What the gate fitting needs of the server's policy and the model.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Setting {
    pub floor: f64,
    pub target: f64,
    /// `fit_bound`'s margin under the first failure.
    pub margin: f64,
    /// Shortest input of each band, ascending, the first 0.
    pub bands: Vec<usize>,
    pub min_gain: f32,
    pub fixed_tokens: f32,
    pub n_layers: usize,
    pub check_layer: usize,
    pub resume_layer: Option<usize>,
}

/// The path a gate takes for one row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(super) enum Taken {
    Fast,
    Escalated,
    Refused,
    Miss,
}

impl Setting {
    fn pays(&self, row: &Row, run: &PathRun) -> bool {
        let resume = run.escalated.then_some(self.resume_layer).flatten();
        predicted_gain(
            row.tokens,
            run.recomputed as usize,
            self.n_layers,
            self.check_layer,
            resume,
            self.fixed_tokens,
        ) >= f64::from(self.min_gain)
    }

    /// The fast rule's hit of `row`, if its rules took one.
    fn fast<'a>(&self, row: &'a Row) -> Option<&'a PathRun> {
        (row.rules.is_hit() && !row.rules.escalated && row.rules.check.is_some())
            .then_some(&row.rules)
    }

    /// The escalated hit of `row`, if one exists.
    fn escalation<'a>(&self, row: &'a Row) -> Option<&'a PathRun> {
        (row.escalated.is_hit() && row.escalated.escalated && row.escalated.check.is_some())
            .then_some(&row.escalated)
    }

    /// The path the server takes for `row` under `gate` (`None`: every hit the rules take),
    /// with its fidelity and time.
    pub fn take(&self, row: &Row, gate: Option<&FidelityGate>) -> (Taken, f64, f64) {
        let allows = |run: &PathRun, escalated: bool| {
            gate.is_none_or(|g| {
                run.check
                    .is_some_and(|c| g.allows(row.tokens, escalated, &c))
            })
        };
        let fast = self.fast(row);
        let esc = self.escalation(row);
        if fast.is_none() && esc.is_none() && !row.escalated.is_hit() && !row.rules.is_hit() {
            // no candidate at all: a plain miss
            return (Taken::Miss, 1.0, row.rules.ms);
        }
        let chosen = match fast {
            Some(f) if allows(f, false) => Some((Taken::Fast, f)),
            _ => esc
                .filter(|e| allows(e, true))
                .map(|e| (Taken::Escalated, e)),
        };
        match chosen {
            Some((t, run)) if self.pays(row, run) => (t, run.cos, run.ms),
            _ => (Taken::Refused, 1.0, row.refused.ms),
        }
    }

    /// A gate fitted on `rows`: per band, the fast rule's bound on the signal that takes the
    /// most calibration hits, then the escalated rule's, on the hits that reach it.
    pub fn fit(&self, rows: &[&Row]) -> FidelityGate {
        let band_of = |len: usize| self.bands.iter().rposition(|&b| b <= len).unwrap_or(0);
        let best = |hits: &dyn Fn(GateSignal) -> Vec<(f32, f64)>| {
            SIGNALS
                .into_iter()
                .map(|s| fit_bound(&hits(s), s, self.floor, self.target, self.margin))
                .max_by_key(|b| (b.max_signal.is_some(), b.calibration_hits))
                .expect("three signals")
        };
        let mut bands = Vec::new();
        for (b, &min_tokens) in self.bands.iter().enumerate() {
            let here: Vec<&&Row> = rows.iter().filter(|r| band_of(r.tokens) == b).collect();
            let fast = best(&|signal| {
                here.iter()
                    .filter_map(|r| self.fast(r).filter(|f| self.pays(r, f)))
                    .filter_map(|f| Some((signal.of(&f.check?), f.cos)))
                    .collect()
            });
            // escalated hits are considered where the fast rule took none within its bound
            let reaches = |r: &Row| {
                self.fast(r).is_none_or(|f| {
                    f.check
                        .is_none_or(|c| fast.max_signal.is_none_or(|m| fast.signal.of(&c) > m))
                })
            };
            let escalated = best(&|signal| {
                here.iter()
                    .filter(|r| reaches(r))
                    .filter_map(|r| self.escalation(r).filter(|e| self.pays(r, e)))
                    .filter_map(|e| Some((signal.of(&e.check?), e.cos)))
                    .collect()
            });
            bands.push(GateBand {
                min_tokens,
                fast,
                escalated,
            });
        }
        FidelityGate {
            floor: self.floor,
            target_below_floor: self.target,
            failure_margin: self.margin,
            bands,
            calibration: serde_json::Value::Null,
        }
    }
}

/// The signals a rule's bound may be on.
const SIGNALS: [GateSignal; 3] = [GateSignal::Stale, GateSignal::Residual, GateSignal::Pooled];

/// Fidelity and speed of one kind served under one gate.
#[derive(Debug, Clone, Serialize)]
pub(super) struct KindResult {
    pub kind: String,
    pub inputs: usize,
    pub tokens_min: usize,
    pub tokens_max: usize,
    pub fast: usize,
    pub escalated: usize,
    pub refused: usize,
    pub misses: usize,
    pub fidelity_mean: Option<f64>,
    pub fidelity_p1: Option<f64>,
    pub fidelity_min: Option<f64>,
    pub below_floor: usize,
    pub below_floor_share: f64,
    /// 95% bootstrap intervals (percentile, 1000 resamples of the accepted hits).
    pub fidelity_mean_ci: Option<(f64, f64)>,
    pub fidelity_p1_ci: Option<(f64, f64)>,
    /// Sum of exact times over the sum of the taken paths' times.
    pub served_speedup: f64,
}

/// `rows` of one kind served under `gate`.
pub(super) fn serve_kind(
    setting: &Setting,
    kind: &str,
    rows: &[&Row],
    gate: Option<&FidelityGate>,
    seed: u64,
) -> KindResult {
    let taken: Vec<(Taken, f64, f64)> = rows.iter().map(|r| setting.take(r, gate)).collect();
    let count = |t: Taken| taken.iter().filter(|x| x.0 == t).count();
    let cos: Vec<f64> = taken
        .iter()
        .filter(|x| matches!(x.0, Taken::Fast | Taken::Escalated))
        .map(|x| x.1)
        .collect();
    let below = cos.iter().filter(|c| **c < setting.floor).count();
    let stat = |f: fn(&[f64]) -> f64| (!cos.is_empty()).then(|| f(&cos));
    let p1 = |v: &[f64]| attncache_benches::stats::quantile(v, 0.01);
    KindResult {
        kind: kind.into(),
        inputs: rows.len(),
        tokens_min: rows.iter().map(|r| r.tokens).min().unwrap_or(0),
        tokens_max: rows.iter().map(|r| r.tokens).max().unwrap_or(0),
        fast: count(Taken::Fast),
        escalated: count(Taken::Escalated),
        refused: count(Taken::Refused),
        misses: count(Taken::Miss),
        fidelity_mean: stat(attncache_benches::stats::mean),
        fidelity_p1: stat(p1),
        fidelity_min: stat(attncache_benches::stats::min),
        below_floor: below,
        below_floor_share: below as f64 / cos.len().max(1) as f64,
        fidelity_mean_ci: bootstrap(&cos, attncache_benches::stats::mean, seed),
        fidelity_p1_ci: bootstrap(&cos, p1, seed),
        served_speedup: rows.iter().map(|r| r.exact_ms).sum::<f64>()
            / taken.iter().map(|x| x.2).sum::<f64>().max(1e-9),
    }
}

/// The 95% percentile interval of `stat` over 1000 resamples of `v`.
fn bootstrap(v: &[f64], stat: fn(&[f64]) -> f64, seed: u64) -> Option<(f64, f64)> {
    if v.len() < 2 {
        return None;
    }
    let mut rng = Rng::new(seed);
    let mut stats: Vec<f64> = (0..1000)
        .map(|_| {
            let sample: Vec<f64> = (0..v.len()).map(|_| v[rng.range(0, v.len())]).collect();
            stat(&sample)
        })
        .collect();
    stats.sort_by(f64::total_cmp);
    Some((stats[24], stats[974]))
}

/// The whole trust analysis of `rows`: the shipped gate (fitted on every kind), each kind
/// served under it, under the rules alone, and left out of calibration. With `holdout` (the
/// rows of pairs drawn with another seed, never used to fit or to choose anything), each
/// holdout kind is also served under the shipped gate and under the gate fitted without that
/// kind: fresh pairs of a kind the calibration never saw.
pub(super) fn analyse(
    setting: &Setting,
    rows: &[Row],
    seed: u64,
    holdout: Option<&[Row]>,
) -> serde_json::Value {
    let all: Vec<&Row> = rows.iter().collect();
    let kinds: Vec<&str> = KINDS
        .iter()
        .copied()
        .filter(|k| rows.iter().any(|r| r.kind == *k))
        .collect();
    let of = |k: &str| rows.iter().filter(|r| r.kind == k).collect::<Vec<&Row>>();
    let shipped = setting.fit(&all);
    let mut loko = Vec::new();
    let mut in_sample = Vec::new();
    let mut ungated = Vec::new();
    let mut loko_gates = Vec::new();
    for k in &kinds {
        let others: Vec<&Row> = rows.iter().filter(|r| r.kind != *k).collect();
        let gate = setting.fit(&others);
        loko.push(serve_kind(setting, k, &of(k), Some(&gate), seed));
        loko_gates.push(serde_json::json!({"left_out": k, "gate": gate}));
        in_sample.push(serve_kind(setting, k, &of(k), Some(&shipped), seed));
        ungated.push(serve_kind(setting, k, &of(k), None, seed));
    }
    let with_hits: Vec<&KindResult> = loko.iter().filter(|r| r.fidelity_p1.is_some()).collect();
    let p1_min = with_hits
        .iter()
        .filter_map(|r| r.fidelity_p1)
        .fold(f64::INFINITY, f64::min);
    let below_max = loko.iter().map(|r| r.below_floor_share).fold(0.0, f64::max);
    let mut held = (Vec::new(), Vec::new());
    for k in KINDS {
        let Some(fresh) = holdout.map(|h| h.iter().filter(|r| r.kind == k).collect::<Vec<_>>())
        else {
            break;
        };
        if fresh.is_empty() {
            continue;
        }
        let others: Vec<&Row> = rows.iter().filter(|r| r.kind != k).collect();
        held.0
            .push(serve_kind(setting, k, &fresh, Some(&shipped), seed));
        held.1.push(serve_kind(
            setting,
            k,
            &fresh,
            Some(&setting.fit(&others)),
            seed,
        ));
    }
    let held_p1 = held
        .1
        .iter()
        .filter_map(|r| r.fidelity_p1)
        .fold(f64::INFINITY, f64::min);
    let held_below = held
        .1
        .iter()
        .map(|r| r.below_floor_share)
        .fold(0.0, f64::max);
    let holdout_keys = holdout.map(|h| {
        serde_json::json!({
            "blend_holdout_pairs": h.len(),
            "blend_holdout_lokko_p1_min": held_p1.is_finite().then_some(held_p1),
            "blend_holdout_lokko_below_floor_max": held_below,
        })
    });
    let mut headline = serde_json::json!({
        "blend_lokko_p1_min": p1_min.is_finite().then_some(p1_min),
        "blend_lokko_below_floor_max": below_max,
        "blend_trust_pairs": rows.len(),
        "blend_trust_mined_speedup": in_sample.iter().find(|r| r.kind == "mined").map(|r| r.served_speedup),
    });
    if let (Some(obj), Some(serde_json::Value::Object(extra))) =
        (headline.as_object_mut(), holdout_keys)
    {
        obj.extend(extra);
    }
    serde_json::json!({
        "setting": setting,
        "pairs": rows.len(),
        "pairs_per_kind": kinds.iter().map(|k| (k.to_string(), of(k).len())).collect::<std::collections::BTreeMap<_, _>>(),
        "gate": shipped,
        "leave_one_kind_out": loko,
        "shipped_gate_in_sample": in_sample,
        "rules_without_gate": ungated,
        "leave_one_kind_out_gates": loko_gates,
        "holdout_pairs": holdout.map(<[Row]>::len),
        "holdout_shipped_gate": holdout.map(|_| &held.0),
        "holdout_leave_one_kind_out": holdout.map(|_| &held.1),
        "headline": headline,
    })
}

/// The trust report as Markdown.
pub(super) fn markdown(report: &serde_json::Value) -> String {
    let mut s = String::from("# Blend you can trust: the fidelity gate, left-out kinds\n\n");
    s += &format!(
        "{} pairs ({}); commit {}, {}; {}.\n\n",
        report["pairs"],
        report["pairs_per_kind"],
        report["commit"],
        report["machine"],
        report["source"].as_str().unwrap_or("")
    );
    s += "Each pair: the stored input recorded, the served one asked exactly, then flag on under \
          the rules (no gate), forced to escalate and forced to refuse, one after the other. A \
          gate's outcome for an input is the measured run of the path it takes (a refusal: the \
          forced refusal's time, lookup and check layer included); fidelity is the cosine to \
          the exact embedding, `served` the sum of exact times over the sum of the taken \
          paths' times. p1 of fewer than 100 hits is their minimum.\n\n";
    for (title, key) in [
        (
            "Each kind left out of calibration, served under the gate fitted on the other kinds",
            "leave_one_kind_out",
        ),
        (
            "The shipped gate (fitted on every kind), in sample",
            "shipped_gate_in_sample",
        ),
        (
            "The rules without a gate (hits still refused under the smallest gain)",
            "rules_without_gate",
        ),
        (
            "Fresh pairs (another seed), each kind served under the gate fitted without it",
            "holdout_leave_one_kind_out",
        ),
        (
            "Fresh pairs (another seed) under the shipped gate",
            "holdout_shipped_gate",
        ),
    ] {
        if report[key].is_null() {
            continue;
        }
        s += &format!("## {title}\n\n| kind | inputs | tokens | fast | escalated | refused | miss | fidelity mean [95% CI] | p1 [95% CI] | min | below 0.99 | served |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for r in report[key].as_array().into_iter().flatten() {
            let f = |k: &str| r[k].as_f64().map_or("–".to_string(), |x| format!("{x:.5}"));
            let ci = |k: &str| {
                r[k].as_array().map_or(String::new(), |a| {
                    format!(
                        " [{:.5}, {:.5}]",
                        a[0].as_f64().unwrap_or(0.0),
                        a[1].as_f64().unwrap_or(0.0)
                    )
                })
            };
            s += &format!(
                "| {} | {} | {}–{} | {} | {} | {} | {} | {}{} | {}{} | {} | {} ({:.1}%) | {:.2}x |\n",
                r["kind"].as_str().unwrap_or(""),
                r["inputs"],
                r["tokens_min"],
                r["tokens_max"],
                r["fast"],
                r["escalated"],
                r["refused"],
                r["misses"],
                f("fidelity_mean"),
                ci("fidelity_mean_ci"),
                f("fidelity_p1"),
                ci("fidelity_p1_ci"),
                f("fidelity_min"),
                r["below_floor"],
                100.0 * r["below_floor_share"].as_f64().unwrap_or(0.0),
                r["served_speedup"].as_f64().unwrap_or(0.0),
            );
        }
        s += "\n";
    }
    s += "## The shipped gate\n\n```json\n";
    s += &serde_json::to_string_pretty(&report["gate"]).unwrap_or_default();
    s += "\n```\n";
    s
}
