//! Token-run index: where stored inputs hold a given run of tokens, so that a new input can be
//! aligned by content with every stored input it shares long runs with, at any offset and
//! whatever the lengths ([`crate::reuse::spans`]).
//!
//! Each stored input is indexed by the hashes of its runs of [`GRAM`] tokens, keeping only the
//! runs whose hash falls in one of [`SAMPLE`] buckets (content-defined, so the same text keeps
//! the same anchors wherever it moves): a shared run of 24 tokens holds an anchor with
//! probability 99%. An anchor found in a new input is extended token by token on both sides
//! into the whole shared run.
//!
//! Memory is bounded by `max_postings` anchors; past it the inputs indexed first are dropped
//! first. The index only names stored inputs; the store decides whether one still exists, so
//! an evicted entry is simply not taken.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::RwLock;
use smallvec::SmallVec;
use xxhash_rust::xxh3::xxh3_64;

use crate::reuse::spans::Run;

/// Tokens per indexed run.
pub const GRAM: usize = 8;
/// One run in `SAMPLE` (by hash) is indexed.
pub const SAMPLE: u64 = 4;
/// Anchors kept by default: about 4M stored tokens (memory not measured).
pub const DEFAULT_MAX_POSTINGS: usize = 1 << 20;
/// Stored places an anchor names at most (boilerplate repeated in many inputs names the
/// first ones only).
const MAX_PER_ANCHOR: usize = 32;

/// One stored input.
#[derive(Debug)]
struct Indexed {
    key: u64,
    tokens: Arc<[u32]>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Anchor hash → (slot, position); most anchors name one place, kept inline.
    postings: HashMap<u64, SmallVec<[(u32, u32); 1]>>,
    /// Indexed inputs by slot (`None`: dropped).
    slots: Vec<Option<Indexed>>,
    /// Slot of each indexed key.
    by_key: HashMap<u64, u32>,
    /// Slots in the order they were indexed.
    order: VecDeque<u32>,
    /// Free slots.
    free: Vec<u32>,
    anchors: usize,
}

/// The token-run index of one scope's stored inputs.
#[derive(Debug)]
pub struct SpanIndex {
    inner: RwLock<Inner>,
    max_postings: usize,
}

impl Default for SpanIndex {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_POSTINGS)
    }
}

/// The anchors of `tokens`: `(hash, position)` of the sampled runs of [`GRAM`] tokens.
fn anchors(tokens: &[u32]) -> impl Iterator<Item = (u64, usize)> + '_ {
    tokens.windows(GRAM).enumerate().filter_map(|(i, w)| {
        let mut bytes = [0u8; 4 * GRAM];
        for (chunk, t) in bytes.chunks_exact_mut(4).zip(w) {
            chunk.copy_from_slice(&t.to_le_bytes());
        }
        let h = xxh3_64(&bytes);
        h.is_multiple_of(SAMPLE).then_some((h, i))
    })
}

impl SpanIndex {
    /// An empty index keeping at most `max_postings` anchors.
    pub fn new(max_postings: usize) -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            max_postings: max_postings.max(1),
        }
    }

    /// Indexes the stored input `key` with `tokens` (once; a key indexed already is left).
    pub fn insert(&self, key: u64, tokens: Arc<[u32]>) {
        if tokens.len() < GRAM {
            return;
        }
        let found: Vec<(u64, usize)> = anchors(&tokens).collect();
        let mut inner = self.inner.write();
        if inner.by_key.contains_key(&key) {
            return;
        }
        while inner.anchors + found.len() > self.max_postings {
            if !inner.drop_oldest() {
                break;
            }
        }
        let slot = match inner.free.pop() {
            Some(s) => s,
            None => {
                inner.slots.push(None);
                (inner.slots.len() - 1) as u32
            }
        };
        for &(h, pos) in &found {
            let places = inner.postings.entry(h).or_default();
            if places.len() < MAX_PER_ANCHOR {
                places.push((slot, pos as u32));
                inner.anchors += 1;
            }
        }
        inner.slots[slot as usize] = Some(Indexed { key, tokens });
        inner.by_key.insert(key, slot);
        inner.order.push_back(slot);
    }

    /// Forgets the stored input `key` (a no-op when it is not indexed).
    pub fn remove(&self, key: u64) {
        let mut inner = self.inner.write();
        if let Some(slot) = inner.by_key.get(&key).copied() {
            inner.order.retain(|s| *s != slot);
            inner.drop_slot(slot);
        }
    }

    /// Stored inputs indexed.
    pub fn len(&self) -> usize {
        self.inner.read().by_key.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every maximal run of at least [`GRAM`] tokens that `query` shares with an indexed input
    /// and that holds an anchor (each run once, however many anchors it holds).
    pub fn runs(&self, query: &[u32]) -> Vec<Run> {
        let inner = self.inner.read();
        let mut out: Vec<Run> = Vec::new();
        // per (slot, diagonal): the input positions already covered by an extended run
        let mut seen: HashMap<(u32, i64), Vec<(usize, usize)>> = HashMap::new();
        for (h, i) in anchors(query) {
            let Some(places) = inner.postings.get(&h) else {
                continue;
            };
            for &(slot, pos) in places {
                let Some(Some(stored)) = inner.slots.get(slot as usize) else {
                    continue;
                };
                let (pos, s) = (pos as usize, &stored.tokens);
                let diagonal = (slot, pos as i64 - i as i64);
                let covered = seen.entry(diagonal).or_default();
                if covered.iter().any(|&(a, b)| (a..b).contains(&i)) {
                    continue;
                }
                if s.get(pos..pos + GRAM) != query.get(i..i + GRAM) {
                    continue; // a hash collision
                }
                let back = (1..=i.min(pos))
                    .take_while(|&t| query[i - t] == s[pos - t])
                    .count();
                let ahead = (GRAM..)
                    .take_while(|&t| i + t < query.len() && pos + t < s.len())
                    .take_while(|&t| query[i + t] == s[pos + t])
                    .count();
                let (q_start, s_start, len) = (i - back, pos - back, back + GRAM + ahead);
                covered.push((q_start, q_start + len));
                out.push(Run {
                    key: stored.key,
                    stored_len: s.len(),
                    q_start,
                    s_start,
                    len,
                });
            }
        }
        out
    }
}

impl Inner {
    /// Drops the input indexed first; false when nothing is left.
    fn drop_oldest(&mut self) -> bool {
        match self.order.pop_front() {
            Some(slot) => {
                self.drop_slot(slot);
                true
            }
            None => false,
        }
    }

    fn drop_slot(&mut self, slot: u32) {
        let Some(Some(gone)) = self.slots.get_mut(slot as usize).map(Option::take) else {
            return;
        };
        self.by_key.remove(&gone.key);
        for (h, _) in anchors(&gone.tokens) {
            if let Some(places) = self.postings.get_mut(&h) {
                let before = places.len();
                places.retain(|(s, _)| *s != slot);
                self.anchors -= before - places.len();
                if places.is_empty() {
                    self.postings.remove(&h);
                }
            }
        }
        self.free.push(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` pseudo-random token ids from `seed` (no run repeats).
    fn text(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 30000 + 5)
            .collect()
    }

    #[test]
    fn a_shared_run_is_found_at_any_offset_and_extended_to_its_ends() {
        let index = SpanIndex::default();
        let a = text(1, 300);
        index.insert(11, a.clone().into());
        // the query: 17 other tokens, then a[100..260], then 30 other tokens
        let q: Vec<u32> = text(2, 17)
            .into_iter()
            .chain(a[100..260].iter().copied())
            .chain(text(3, 30))
            .collect();
        let runs = index.runs(&q);
        assert_eq!(runs.len(), 1, "{runs:?}");
        let r = runs[0];
        assert_eq!((r.key, r.q_start, r.s_start, r.len), (11, 17, 100, 160));
    }

    #[test]
    fn runs_from_two_inputs_and_a_forgotten_one() {
        let index = SpanIndex::default();
        let (a, b) = (text(1, 200), text(4, 200));
        index.insert(1, a.clone().into());
        index.insert(2, b.clone().into());
        let q: Vec<u32> = a[120..].iter().chain(&b[..90]).copied().collect();
        let mut keys: Vec<u64> = index.runs(&q).iter().map(|r| r.key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys, vec![1, 2]);
        index.remove(1);
        assert!(index.runs(&q).iter().all(|r| r.key == 2));
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn the_anchor_budget_drops_the_oldest_inputs() {
        let a = text(1, 400);
        let per_input = anchors(&a).count();
        assert!(per_input > 50, "{per_input} anchors");
        let index = SpanIndex::new(per_input * 2 + per_input / 2);
        for key in 0..4u64 {
            index.insert(key, text(key as u32 + 1, 400).into());
        }
        assert!(index.len() <= 2, "{} inputs kept", index.len());
        assert!(index.runs(&a).is_empty(), "the first input was dropped");
        let last = text(4, 400);
        assert!(index.runs(&last).iter().any(|r| r.key == 3 && r.len == 400));
    }
}
