//! The eval's inputs: SpamAssassin emails, their near-duplicate pairs, and small helpers
//! for scoring them.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use attncache_plugin::reuse::align;
use attncache_server::local_server::cosine;

use super::Args;

/// Emails of the corpus as `(label, token ids)`, each at least `min_tokens` long.
pub(super) fn emails(
    args: &Args,
    tok: &tokenizers::Tokenizer,
) -> anyhow::Result<Vec<(String, Vec<u32>)>> {
    let mut out = Vec::new();
    let mut groups: Vec<PathBuf> = std::fs::read_dir(&args.spam)
        .with_context(|| format!("{} (scripts/fetch-spam)", args.spam.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    groups.sort();
    for g in groups {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&g)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        for f in files {
            let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&f)?)?;
            let text = attncache_benches::workloads::email_text(raw["text"].as_str().unwrap_or(""));
            let label = match raw["group"].as_str().unwrap_or("").starts_with("spam") {
                true => "spam",
                false => "ham",
            };
            let enc = tok
                .encode(format!("title: none | text: {text}"), true)
                .map_err(anyhow::Error::msg)?;
            out.push((label.to_string(), enc.get_ids().to_vec()));
        }
    }
    Ok(out)
}

/// Pairs `(stored, served)` of emails whose first `len` tokens differ in at most
/// `max_share` of the positions after alignment: candidates share many 4-token shingles
/// (an inverted index over shingles seen in few emails), then the alignment decides.
pub(super) fn near_pairs(
    emails: &[(String, Vec<u32>)],
    len: usize,
    max_share: f64,
) -> Vec<(usize, usize, usize)> {
    let heads: Vec<Option<&[u32]>> = emails
        .iter()
        .map(|(_, ids)| (ids.len() >= len).then(|| &ids[..len]))
        .collect();
    let mut postings: HashMap<u64, Vec<usize>> = HashMap::new();
    let shingle = |w: &[u32]| {
        w.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, t| {
            (h ^ u64::from(*t)).wrapping_mul(0x100_0000_01b3)
        })
    };
    for (i, h) in heads.iter().enumerate() {
        let Some(h) = h else { continue };
        let mut seen: Vec<u64> = h.windows(4).map(shingle).collect();
        seen.sort_unstable();
        seen.dedup();
        for s in seen {
            postings.entry(s).or_default().push(i);
        }
    }
    let mut shared: HashMap<(usize, usize), u32> = HashMap::new();
    for list in postings.values().filter(|l| l.len() > 1 && l.len() <= 40) {
        for (a, &i) in list.iter().enumerate() {
            for &j in &list[a + 1..] {
                *shared.entry((i, j)).or_default() += 1;
            }
        }
    }
    let mut candidates: Vec<((usize, usize), u32)> = shared
        .into_iter()
        .filter(|(_, n)| f64::from(*n) >= 0.5 * len as f64)
        .collect();
    candidates.sort_by_key(|&((i, j), n)| (std::cmp::Reverse(n), i, j));
    let mut used = vec![false; emails.len()];
    let mut pairs = Vec::new();
    for ((i, j), _) in candidates {
        if used[i] || used[j] {
            continue;
        }
        let (Some(a), Some(b)) = (heads[i], heads[j]) else {
            continue;
        };
        if a == b {
            continue; // identical heads: an exact hit, not a near duplicate
        }
        let differing = align(b, a).differing.len();
        if differing as f64 <= max_share * len as f64 {
            used[i] = true;
            used[j] = true;
            pairs.push((i, j, differing));
        }
    }
    pairs
}

pub(super) fn median(v: &[f64]) -> f64 {
    attncache_benches::stats::quantile(v, 0.5)
}

pub(super) fn sum(v: impl Iterator<Item = f64>) -> f64 {
    v.sum()
}

/// Nearest-centroid label of `e` (centroids of the stored emails' exact embeddings).
pub(super) fn classify(e: &[f32], centroids: &[(String, Vec<f32>)]) -> String {
    centroids
        .iter()
        .max_by(|a, b| cosine(e, &a.1).total_cmp(&cosine(e, &b.1)))
        .map(|c| c.0.clone())
        .unwrap_or_default()
}
