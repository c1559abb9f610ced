//! The revision stage (`--revisions DIR`, `make blend-revisions`): a real revision stream
//! of documentation (`scripts/fetch-revisions`: the `*.rst` docs of two releases each of
//! Flask, Werkzeug, Jinja2 and Click), re-indexed as a search index would after a release.
//! The old release is stored; each file whose text changed is asked in the new release's
//! version, exactly then with the flag on, under the server's policy (what `make serve`
//! serves). Two modes:
//!
//! - **whole files**, cut at `--revision-max-tokens` (2048): the old file stored, the new one
//!   asked; a file whose edits all lie past the cut is an identical input, reported apart;
//! - **chunks**: each file's paragraphs (blank-line separated) packed greedily into chunks
//!   of about `--revision-chunk-tokens` (400) tokens, as a RAG index chunks; every old chunk of
//!   the changed files stored, every new chunk asked; a new chunk equal to an old one is
//!   reported apart (an exact repeat), the rest are the changed chunks.
//!
//! Per asked input: outcome, why a miss missed (the gate has no bound at its length, no stored
//! input shares enough with it, or a candidate refused at the check layer), how many stored
//! inputs a hit took positions from, fidelity (cosine to exact) and both times, every cached
//! time being the whole request.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use attncache_plugin::Outcome;
use attncache_server::local_server::cosine;
use serde::Serialize;

use super::Runner;

/// One asked input.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Asked {
    pub mode: &'static str,
    pub package: String,
    pub file: String,
    pub tokens: usize,
    pub stored_tokens: usize,
    /// `hit`, `near_hit` or `miss`.
    pub outcome: String,
    /// The same tokens as a stored input: a whole file whose edits all lie past the cut, or
    /// a chunk whose text did not change (reported apart).
    pub identical: bool,
    /// Misses: `no_bound` (the fidelity gate takes no near hit of this length, so nothing
    /// is looked up), `no_candidate` (no stored input shares enough with it: neither within
    /// the length slack nor by runs of tokens) or `refused` (a candidate refused at the check
    /// layer: the gate, the rules or its predicted gain).
    pub miss_reason: Option<&'static str>,
    /// Hits: how many stored inputs the hit took positions from (more than one: aligned by
    /// content across several).
    pub stored_inputs: Option<u32>,
    pub escalated: bool,
    pub recomputed: u32,
    pub cos: f64,
    pub exact_ms: f64,
    pub cached_ms: f64,
}

/// The `*.rst` files under `dir`, by path relative to it.
fn rst_files(dir: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rst") {
                let rel = p.strip_prefix(dir)?.to_string_lossy().to_string();
                out.insert(rel, std::fs::read_to_string(&p)?);
            }
        }
    }
    Ok(out)
}

fn encode(tok: &tokenizers::Tokenizer, text: &str) -> anyhow::Result<Vec<u32>> {
    Ok(tok
        .encode(format!("title: none | text: {text}"), true)
        .map_err(anyhow::Error::msg)?
        .get_ids()
        .to_vec())
}

/// The paragraphs of `text` packed greedily into chunks of about `budget` tokens.
fn chunks(tok: &tokenizers::Tokenizer, text: &str, budget: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let (mut cur, mut cur_tokens) = (Vec::<&str>::new(), 0usize);
    for para in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let n = tok
            .encode(para, false)
            .map_err(anyhow::Error::msg)?
            .get_ids()
            .len();
        if cur_tokens + n > budget && !cur.is_empty() {
            out.push(cur.join("\n\n"));
            (cur, cur_tokens) = (Vec::new(), 0);
        }
        cur.push(para);
        cur_tokens += n;
    }
    if !cur.is_empty() {
        out.push(cur.join("\n\n"));
    }
    Ok(out)
}

/// Asks `ids` exactly then with the flag on, against a stored input of `stored_tokens`.
async fn ask(
    runner: &Runner,
    (mode, package, file): (&'static str, &str, &str),
    ids: &[u32],
    stored_tokens: usize,
) -> anyhow::Result<Asked> {
    let bounded = runner
        .server
        .cache
        .blend_policy()
        .gate
        .as_ref()
        .is_none_or(|g| g.takes_near_hits(ids.len()));
    let (exact, exact_ms) = runner.exact(ids).await?;
    let (cached, cached_ms, d) = runner.cached(ids).await?;
    let outcome = match d.map(|d| d.outcome) {
        Some(Outcome::ExactHit) => "hit",
        Some(Outcome::NearHit) => "near_hit",
        _ => "miss",
    };
    Ok(Asked {
        mode,
        package: package.into(),
        file: file.into(),
        tokens: ids.len(),
        stored_tokens,
        outcome: outcome.into(),
        identical: false,
        miss_reason: (outcome == "miss").then(|| match d.and_then(|d| d.check) {
            Some(_) => "refused",
            None if !bounded => "no_bound",
            None => "no_candidate",
        }),
        stored_inputs: d.and_then(|d| d.stored_inputs),
        escalated: d.is_some_and(|d| d.resumed_after_layer.is_some()),
        recomputed: d.map_or(0, |d| d.recomputed_rows),
        cos: cosine(&cached, &exact),
        exact_ms,
        cached_ms,
    })
}

/// Serves the revision stream under `dir` (see the module documentation).
pub(super) async fn serve(
    runner: &Runner,
    tok: &tokenizers::Tokenizer,
    dir: &Path,
    max_tokens: usize,
    chunk_tokens: usize,
    only: &[String],
) -> anyhow::Result<Vec<Asked>> {
    let mut packages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter(|p| {
            only.is_empty()
                || p.file_name()
                    .is_some_and(|n| only.iter().any(|o| n.to_string_lossy() == *o))
        })
        .collect();
    packages.sort();
    let mut out = Vec::new();
    for pkg_dir in packages {
        let pkg = pkg_dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let old = rst_files(&pkg_dir.join("old"))?;
        let new = rst_files(&pkg_dir.join("new"))?;
        let changed: Vec<(&String, &String, &String)> = new
            .iter()
            .filter_map(|(f, n)| old.get(f).filter(|o| *o != n).map(|o| (f, o, n)))
            .collect();
        eprintln!(
            "blend-eval: revisions, {pkg}: {} changed files",
            changed.len()
        );
        // whole files
        for (f, o, n) in &changed {
            let mut a = encode(tok, o)?;
            let mut b = encode(tok, n)?;
            a.truncate(max_tokens);
            b.truncate(max_tokens);
            runner.store("revisions-old", &a).await?;
            runner.server.cache.set_admission(false);
            let mut asked = ask(runner, ("file", &pkg, f), &b, a.len()).await?;
            runner.server.cache.set_admission(true);
            asked.identical = a == b;
            out.push(asked);
        }
        // chunks: every old chunk of the changed files stored, every new chunk asked
        let mut old_chunks = HashSet::new();
        for (_, o, _) in &changed {
            for c in chunks(tok, o, chunk_tokens)? {
                let ids = encode(tok, &c)?;
                if ids.len() <= max_tokens && old_chunks.insert(c) {
                    runner.store("revisions-old-chunk", &ids).await?;
                }
            }
        }
        for (f, _, n) in &changed {
            for c in chunks(tok, n, chunk_tokens)? {
                let ids = encode(tok, &c)?;
                if ids.len() > max_tokens {
                    continue;
                }
                runner.server.cache.set_admission(false);
                let mut asked = ask(runner, ("chunk", &pkg, f), &ids, 0).await?;
                runner.server.cache.set_admission(true);
                asked.identical = old_chunks.contains(&c);
                out.push(asked);
            }
        }
        eprintln!(
            "blend-eval: revisions, {pkg}: {} inputs asked so far",
            out.len()
        );
    }
    Ok(out)
}

/// The revision stream as pairs of the trust stage (kind `revisions`): per package, each file
/// changed inside the cut (old stored, new served), then each changed chunk (its file's old
/// chunks stored, the new chunk served). Files in path order, packages in name order.
pub(super) fn trust_pairs(
    tok: &tokenizers::Tokenizer,
    dir: &Path,
    max_tokens: usize,
    chunk_tokens: usize,
) -> anyhow::Result<Vec<super::kinds::Pair>> {
    let mut packages: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    packages.sort();
    let mut files = Vec::new();
    let mut chunk_pairs = Vec::new();
    for pkg_dir in packages {
        let old = rst_files(&pkg_dir.join("old"))?;
        let new = rst_files(&pkg_dir.join("new"))?;
        for (f, n) in &new {
            let Some(o) = old.get(f).filter(|o| *o != n) else {
                continue;
            };
            let mut a = encode(tok, o)?;
            let mut b = encode(tok, n)?;
            a.truncate(max_tokens);
            b.truncate(max_tokens);
            if a != b {
                files.push(super::kinds::Pair {
                    kind: "revisions",
                    stored: a,
                    also_stored: Vec::new(),
                    served: b,
                });
            }
            let olds: Vec<Vec<u32>> = chunks(tok, o, chunk_tokens)?
                .iter()
                .map(|c| encode(tok, c))
                .collect::<anyhow::Result<Vec<_>>>()?
                .into_iter()
                .filter(|ids| ids.len() <= max_tokens)
                .collect();
            let Some((first, rest)) = olds.split_first() else {
                continue;
            };
            for c in chunks(tok, n, chunk_tokens)? {
                let ids = encode(tok, &c)?;
                if ids.len() <= max_tokens && !olds.contains(&ids) {
                    chunk_pairs.push(super::kinds::Pair {
                        kind: "revisions",
                        stored: first.clone(),
                        also_stored: rest.to_vec(),
                        served: ids,
                    });
                }
            }
        }
    }
    files.extend(chunk_pairs);
    Ok(files)
}

/// Figures of `rows` (one mode's changed inputs).
fn summary(rows: &[&Asked]) -> serde_json::Value {
    let hits: Vec<&&Asked> = rows
        .iter()
        .filter(|r| r.outcome == "near_hit" || r.outcome == "hit")
        .collect();
    let cos: Vec<f64> = hits.iter().map(|r| r.cos).collect();
    let count = |f: &dyn Fn(&Asked) -> bool| rows.iter().filter(|r| f(r)).count();
    serde_json::json!({
        "inputs": rows.len(),
        "hits": hits.len(),
        "escalated": hits.iter().filter(|r| r.escalated).count(),
        "misses": count(&|r| r.outcome == "miss"),
        "misses_no_bound": count(&|r| r.miss_reason == Some("no_bound")),
        "misses_no_candidate": count(&|r| r.miss_reason == Some("no_candidate")),
        "hits_from_several_inputs": count(&|r| r.stored_inputs.is_some_and(|n| n > 1)),
        "misses_refused": count(&|r| r.miss_reason == Some("refused")),
        "miss_share": count(&|r| r.outcome == "miss") as f64 / rows.len().max(1) as f64,
        "fidelity_mean": (!cos.is_empty()).then(|| attncache_benches::stats::mean(&cos)),
        "fidelity_min": (!cos.is_empty()).then(|| attncache_benches::stats::min(&cos)),
        "served_speedup": rows.iter().map(|r| r.exact_ms).sum::<f64>() / rows.iter().map(|r| r.cached_ms).sum::<f64>().max(1e-9),
        "hit_speedup_summed": (!hits.is_empty()).then(|| hits.iter().map(|r| r.exact_ms).sum::<f64>() / hits.iter().map(|r| r.cached_ms).sum::<f64>().max(1e-9)),
    })
}

/// The report of the revision stage and its headline.
pub(super) fn report(rows: &[Asked]) -> (serde_json::Value, serde_json::Value) {
    let of = |f: &dyn Fn(&Asked) -> bool| rows.iter().filter(|r| f(r)).collect::<Vec<&Asked>>();
    let files = of(&|r| r.mode == "file" && !r.identical);
    let long_files = of(&|r| r.mode == "file" && !r.identical && r.tokens >= 1024);
    let files_identical = of(&|r| r.mode == "file" && r.identical);
    let chunks = of(&|r| r.mode == "chunk" && !r.identical);
    let chunks_unchanged = of(&|r| r.mode == "chunk" && r.identical);
    let changed = of(&|r| !r.identical);
    let per = serde_json::json!({
        "files_changed_inside_the_cut": summary(&files),
        "files_of_1024_tokens_or_more": summary(&long_files),
        "files_changed_past_the_cut": summary(&files_identical),
        "chunks_changed": summary(&chunks),
        "chunks_unchanged": summary(&chunks_unchanged),
    });
    let headline = serde_json::json!({
        "blend_revisions_doc_speedup": per["files_of_1024_tokens_or_more"]["served_speedup"],
        "blend_revisions_chunk_speedup": per["chunks_changed"]["served_speedup"],
        "blend_revisions_miss_share": changed.iter().filter(|r| r.outcome == "miss").count() as f64 / changed.len().max(1) as f64,
    });
    (per, headline)
}

/// The revision report as Markdown.
pub(super) fn markdown(report: &serde_json::Value) -> String {
    let mut s = String::from(
        "# Blend on a real revision stream (docs of four packages, old release stored)\n\n",
    );
    s += &format!(
        "commit {}, {}; `{}`\n\n",
        report["commit"],
        report["machine"],
        report["command"].as_str().unwrap_or("")
    );
    s += "| inputs | asked | hits (escalated; from several stored inputs) | misses: no gate bound at the length / no candidate / refused | fidelity mean / min | hits summed | served |\n|---|---|---|---|---|---|---|\n";
    for (name, key) in [
        (
            "whole files changed inside the cut",
            "files_changed_inside_the_cut",
        ),
        (
            "of them, 1024 tokens or more",
            "files_of_1024_tokens_or_more",
        ),
        (
            "whole files changed past the cut (identical inputs)",
            "files_changed_past_the_cut",
        ),
        ("chunks whose text changed", "chunks_changed"),
        ("chunks unchanged (exact repeats)", "chunks_unchanged"),
    ] {
        let r = &report["modes"][key];
        let f = |k: &str| r[k].as_f64().map_or("–".to_string(), |x| format!("{x:.5}"));
        let x = |k: &str| {
            r[k].as_f64()
                .map_or("–".to_string(), |x| format!("{x:.2}x"))
        };
        s += &format!(
            "| {name} | {} | {} ({}; {}) | {} / {} / {} | {} / {} | {} | {} |\n",
            r["inputs"],
            r["hits"],
            r["escalated"],
            r["hits_from_several_inputs"],
            r["misses_no_bound"],
            r["misses_no_candidate"],
            r["misses_refused"],
            f("fidelity_mean"),
            f("fidelity_min"),
            x("hit_speedup_summed"),
            x("served_speedup")
        );
    }
    s += &format!("\nHeadline: `{}`\n", report["headline"]);
    s
}
