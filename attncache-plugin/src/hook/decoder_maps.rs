//! Map reuse on decoders, the AttnCache paper's method: a prompt takes the attention maps
//! of a stored prompt it shares a long exact prefix with, instead of computing
//! `softmax(QKᵀ)`.
//!
//! A request holding a [`MapsTicket`] is looked up when its prompt step starts (layer 0):
//! among the stored prompts, the one sharing the longest exact token prefix with it (ties:
//! the nearest length). It is a hit when that prefix covers at least `min_shared` of the
//! prompt. The rows of the shared prefix are then exactly the stored prompt's (a causal
//! row depends only on the tokens up to it; stored as f16); the rows after it take the
//! stored rows of the stored prompt's own rest, stretched to the new length
//! ([`alignment`]): approximate, as the paper's reuse of a similar input's maps is. In the
//! layers the policy reuses the q/k projections, RoPE and the scores are skipped (patch
//! 0013, through `known_maps`). With `recompute_rest` the rows after the shared prefix, and
//! with `recompute_last` the last rows, are computed exactly instead, from the k the model
//! then projects for every position and the q it projects for those rows only;
//! `recompute_rest` keeps the answer within f16 rounding of exact.
//!
//! A request without a hit computes exactly, records its maps (the causal kernel's
//! probabilities, as packed f16 triangles) and stores them after its last layer, in a
//! moka cache bounded in bytes. Only one-sequence prompt steps are planned (a batch of
//! several runs exactly and records nothing): the engine batches equal-length prompts, and
//! a hit's skipped layers leave its KV cache empty, which only a prompt step that ends its
//! sequence may do.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Result, Tensor};
use dashmap::DashMap;
use half::f16;
use mistralrs_core::{AttentionCall, HookRow, KnownMapsCall};
use parking_lot::Mutex;

use crate::error::AttnCacheError;
use crate::kernels::causal_attention::{
    causal_attention, causal_attention_recorded, causal_mask, packed_len,
};
use crate::kernels::exact_attention::normalize_mask;
use crate::kernels::stored_maps::{attend_stored, StoredLayer};

/// How a decoder map hit is chosen and used.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderMapsPolicy {
    /// Least share (0 to 1] of a prompt's tokens that must be an exact prefix shared with
    /// the stored prompt for its maps to be used.
    pub min_shared: f32,
    /// Layers whose attention comes from the stored maps; empty: every layer.
    pub layers: Vec<usize>,
    /// Compute the rows after the shared prefix exactly instead of taking the stored
    /// prompt's.
    pub recompute_rest: bool,
    /// Compute this many last rows exactly (the last one gives the answer).
    pub recompute_last: usize,
    /// Also take exact prefix reuse: a prompt whose head the prefix store holds computes
    /// only its rest, and in the reused layers that rest's rows come from the maps (the
    /// stored head's V and K completing the rows' keys).
    pub over_prefix: bool,
}

impl Default for DecoderMapsPolicy {
    fn default() -> Self {
        Self {
            min_shared: 0.5,
            layers: Vec::new(),
            recompute_rest: false,
            recompute_last: 0,
            over_prefix: false,
        }
    }
}

impl DecoderMapsPolicy {
    /// Checks the settings against a model of `n_layers` layers.
    pub fn validate(&self, n_layers: usize) -> std::result::Result<(), AttnCacheError> {
        if !(self.min_shared > 0.0 && self.min_shared <= 1.0) {
            return Err(AttnCacheError::InvalidSetting {
                name: "decoder-maps-min-shared",
                value: self.min_shared.to_string(),
                expected: "a share in (0, 1]",
            });
        }
        if let Some(l) = self.layers.iter().find(|&&l| l >= n_layers) {
            return Err(AttnCacheError::InvalidSetting {
                name: "reuse-layers",
                value: l.to_string(),
                expected: "layers of the model (0 to its layer count - 1)",
            });
        }
        Ok(())
    }

    fn reuses(&self, layer: usize) -> bool {
        self.layers.is_empty() || self.layers.contains(&layer)
    }

    /// The first row computed exactly in a hit of `len` positions sharing `shared` with the
    /// stored prompt (`len`: none).
    fn exact_from(&self, shared: usize, len: usize) -> usize {
        let rest = if self.recompute_rest { shared } else { len };
        rest.min(len.saturating_sub(self.recompute_last))
    }
}

/// What map reuse did for one request's prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapsOutcome {
    /// Maps of a stored prompt were used.
    Hit {
        /// Tokens of the exact prefix shared with the stored prompt (their rows are exact).
        shared: usize,
        /// The stored prompt's length.
        stored_len: usize,
        /// The prompt's length.
        len: usize,
    },
    /// No stored prompt shared enough; computed exactly and its maps stored.
    Recorded,
    /// No stored prompt shared enough; computed exactly, nothing stored (a batch of
    /// several sequences, a shape the recording kernel does not take, or maps larger than
    /// the store's budget).
    Exact,
}

/// Counters of decoder map reuse, for `/info` and `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecoderMapsCounts {
    /// Prompts that used stored maps.
    pub hits: u64,
    /// Prompts computed exactly whose maps were stored.
    pub recorded: u64,
    /// Prompts computed exactly without storing (batched with others, unsupported shape,
    /// maps larger than the budget).
    pub exact: u64,
    /// Entries stored now.
    pub entries: u64,
    /// Bytes they take.
    pub bytes: u64,
    /// Nanoseconds spent finding prompts' stored neighbours and aligning them (the lookup;
    /// the maps stay in RAM, so loading one is taking a reference to it).
    pub lookup_ns: u64,
    /// Nanoseconds spent in the attention kernels of hits' reused layers: P·V from the
    /// stored maps and the exactly computed rows' scores, softmax and P·V (the v, k and q
    /// projections the model runs for them are not in it).
    pub attention_ns: u64,
}

/// A stored prompt's maps: per layer, `heads` packed lower triangles (f16).
#[derive(Debug)]
struct StoredMaps {
    tokens: Arc<[u32]>,
    heads: usize,
    layers: Vec<Vec<f16>>,
}

impl StoredMaps {
    fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.len() * 2).sum::<usize>() + self.tokens.len() * 4
    }
}

/// What one request's prompt step is doing.
#[derive(Debug)]
enum Plan {
    Hit {
        entry: Arc<StoredMaps>,
        /// The stored position each position takes.
        source: Arc<[u32]>,
        shared: usize,
    },
    Record {
        tokens: Arc<[u32]>,
        layers: Vec<Vec<f16>>,
    },
    Exact,
}

/// One request's state.
#[derive(Debug, Default)]
struct RequestMaps {
    /// The sequence its plan is for, and the plan.
    plan: Option<(usize, Plan)>,
    outcome: Option<MapsOutcome>,
    /// With [`DecoderMapsPolicy::over_prefix`]: what the prefix store gave this request.
    prefix: Option<GivenPrefix>,
}

/// A request's head from the prefix store: its prompt step then sees only the tokens after
/// it, so the whole prompt is kept here for the lookup.
#[derive(Debug)]
struct GivenPrefix {
    /// The whole prompt.
    tokens: Arc<[u32]>,
    /// K (after RoPE) and V per layer, `[1, kv_heads, ≥ head, d]`.
    layers: Arc<[(Tensor, Tensor)]>,
}

/// Map reuse for decoder prompts: the stored maps, the requests that may use them, counters.
#[derive(Debug)]
pub(crate) struct DecoderMaps {
    policy: DecoderMapsPolicy,
    n_layers: usize,
    store: moka::sync::Cache<Arc<[u32]>, Arc<StoredMaps>>,
    /// Request id → its state (an `Arc`, so a forward never holds the map's shard lock).
    requests: DashMap<usize, Arc<Mutex<RequestMaps>>>,
    hits: AtomicU64,
    recorded: AtomicU64,
    exact: AtomicU64,
    /// The store's budget: maps larger than it are not recorded.
    budget_bytes: u64,
    lookup_ns: AtomicU64,
    attention_ns: AtomicU64,
}

/// Nanoseconds since `started`, for the counters.
pub(super) fn nanos_since(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The stored position each of `len` positions takes from a stored prompt of `stored_len`
/// positions that shares the first `shared` tokens: the shared prefix as it is, the rest
/// stretched over the stored prompt's rest so that the last position takes the stored last
/// one. `None` when the stored prompt has no rest to take (it is all shared prefix while the
/// prompt goes on).
pub(crate) fn alignment(shared: usize, len: usize, stored_len: usize) -> Option<Vec<u32>> {
    if shared > len || shared > stored_len || len == 0 {
        return None;
    }
    if shared == len {
        return Some((0..len as u32).collect());
    }
    if stored_len == shared {
        return None;
    }
    let (rest, stored_rest) = (len - 1 - shared, stored_len - 1 - shared);
    let source = (0..len)
        .map(|i| {
            if i < shared {
                i as u32
            } else if rest == 0 {
                (stored_len - 1) as u32
            } else {
                let t = (i - shared) as f64 * stored_rest as f64 / rest as f64;
                (shared + t.round() as usize) as u32
            }
        })
        .collect();
    Some(source)
}

fn shared_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl DecoderMaps {
    pub(crate) fn new(policy: DecoderMapsPolicy, n_layers: usize, budget_bytes: u64) -> Self {
        // least recently used out first: moka's default (TinyLFU) admits a new entry only
        // if it was asked for more often than the one it would evict, so a full store of
        // prompts hit a few times each would refuse every new prompt's maps
        let store = moka::sync::Cache::builder()
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .max_capacity(budget_bytes.div_ceil(1024).max(1))
            .weigher(|_: &Arc<[u32]>, e: &Arc<StoredMaps>| {
                u32::try_from(e.bytes().div_ceil(1024)).unwrap_or(u32::MAX)
            })
            .build();
        Self {
            policy,
            n_layers,
            store,
            requests: DashMap::new(),
            hits: AtomicU64::new(0),
            recorded: AtomicU64::new(0),
            exact: AtomicU64::new(0),
            budget_bytes,
            lookup_ns: AtomicU64::new(0),
            attention_ns: AtomicU64::new(0),
        }
    }

    pub(crate) fn policy(&self) -> &DecoderMapsPolicy {
        &self.policy
    }

    /// Whether a reused layer never projects q or k (no row is computed exactly).
    pub(crate) fn skips_qk(&self) -> bool {
        !self.policy.recompute_rest && self.policy.recompute_last == 0
    }

    pub(crate) fn counts(&self) -> DecoderMapsCounts {
        self.store.run_pending_tasks();
        DecoderMapsCounts {
            hits: self.hits.load(Ordering::Relaxed),
            recorded: self.recorded.load(Ordering::Relaxed),
            exact: self.exact.load(Ordering::Relaxed),
            entries: self.store.entry_count(),
            bytes: self.store.weighted_size() * 1024,
            lookup_ns: self.lookup_ns.load(Ordering::Relaxed),
            attention_ns: self.attention_ns.load(Ordering::Relaxed),
        }
    }

    /// The stored prompt to take maps from for `tokens`, with the shared prefix's length.
    fn neighbour(&self, tokens: &[u32]) -> Option<(Arc<StoredMaps>, usize, Vec<u32>)> {
        let len = tokens.len();
        let need = ((f64::from(self.policy.min_shared) * len as f64).ceil() as usize).max(1);
        let mut best: Option<(Arc<StoredMaps>, usize)> = None;
        for (_, entry) in self.store.iter() {
            if entry.layers.len() != self.n_layers {
                continue;
            }
            let shared = shared_prefix(tokens, &entry.tokens);
            if shared < need {
                continue;
            }
            let better = match &best {
                None => true,
                Some((b, s)) => {
                    shared > *s
                        || (shared == *s
                            && entry.tokens.len().abs_diff(len) < b.tokens.len().abs_diff(len))
                }
            };
            if better {
                best = Some((entry, shared));
            }
        }
        let (entry, shared) = best?;
        let source = alignment(shared, len, entry.tokens.len())?;
        // a hit makes its entry the most recently used (iterating does not)
        self.store.get(&entry.tokens);
        Some((entry, shared, source))
    }

    /// The plan of a one-sequence prompt step of a registered request, made at layer 0.
    fn decide(&self, tokens: &[u32]) -> Plan {
        let started = Instant::now();
        let neighbour = self.neighbour(tokens);
        self.lookup_ns
            .fetch_add(nanos_since(started), Ordering::Relaxed);
        match neighbour {
            Some((entry, shared, source)) => Plan::Hit {
                entry,
                source: source.into(),
                shared,
            },
            None => Plan::Record {
                tokens: tokens.into(),
                layers: Vec::with_capacity(self.n_layers),
            },
        }
    }

    /// Runs `f` on the plan of the request whose one-sequence prompt step `rows` is at
    /// `layer`; `None` for anything else. The plan is made at layer 0.
    fn with_plan<R>(
        &self,
        rows: &[HookRow],
        layer: usize,
        f: impl FnOnce(&mut Plan, &mut Option<MapsOutcome>, Option<&[(Tensor, Tensor)]>) -> R,
    ) -> Option<R> {
        let state = match rows {
            [row] if row.is_prompt => self.requests.get(&row.request_id)?.value().clone(),
            rows => {
                // several sequences at once: each registered one runs exactly
                if layer == 0 && rows.iter().all(|r| r.is_prompt) {
                    for r in rows {
                        if let Some(s) = self.requests.get(&r.request_id) {
                            let mut s = s.lock();
                            if s.outcome.is_none() {
                                s.outcome = Some(MapsOutcome::Exact);
                                self.exact.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                return None;
            }
        };
        let row = &rows[0];
        let mut state = state.lock();
        let state = &mut *state;
        if layer == 0
            && state
                .plan
                .as_ref()
                .is_none_or(|(seq, _)| *seq != row.seq_id)
        {
            // a step after a head the prefix store gave sees only the rest of the prompt
            let tokens = match &state.prefix {
                Some(p) if p.tokens.ends_with(&row.tokens) => &p.tokens[..],
                _ => &row.tokens[..],
            };
            state.plan = Some((row.seq_id, self.decide(tokens)));
        }
        let (seq, plan) = state.plan.as_mut()?;
        if *seq != row.seq_id {
            return None;
        }
        let prefix = state.prefix.as_ref().map(|p| &p.layers[..]);
        Some(f(plan, &mut state.outcome, prefix))
    }

    /// Called before q/k are projected (patch 0013): the attention output of a hit's reused
    /// layer, its rows from the stored maps up to [`DecoderMapsPolicy::exact_from`] and
    /// exact after it, from the k and q the model offers (without them that layer is left to
    /// the exact path).
    pub(crate) fn known_maps(&self, call: &KnownMapsCall<'_>) -> Result<Option<Tensor>> {
        let layer = call.layer_idx;
        let reused = self.policy.reuses(layer);
        let n_layers = self.n_layers;
        let out = self.with_plan(
            call.rows,
            layer,
            |plan, outcome, prefix| -> Result<Option<Tensor>> {
                let Plan::Hit {
                    entry,
                    source,
                    shared,
                } = plan
                else {
                    return Ok(None);
                };
                let len = source.len();
                // positions before `past` came from the prefix store (this step computes
                // the rest); their K/V complete the rows' keys
                let past = len.saturating_sub(call.xs.dim(1)?);
                let head = match (past, prefix.and_then(|p| p.get(layer))) {
                    (0, _) => None,
                    (_, Some((k, v))) if k.dim(2)? >= past && v.dim(2)? >= past => {
                        Some((k.narrow(2, 0, past)?, v.narrow(2, 0, past)?))
                    }
                    // a head whose K/V this hook was not given (another prefix cacher's):
                    // the whole prompt runs the exact path
                    _ => {
                        if layer == 0 {
                            self.exact.fetch_add(1, Ordering::Relaxed);
                            *outcome = Some(MapsOutcome::Exact);
                        }
                        *plan = Plan::Exact;
                        return Ok(None);
                    }
                };
                if layer == 0 {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    *outcome = Some(MapsOutcome::Hit {
                        shared: *shared,
                        stored_len: entry.tokens.len(),
                        len,
                    });
                }
                let from = self.policy.exact_from(*shared, len).max(past);
                let qk = call.k.zip(call.q_from);
                let softcap = call.params.softcap.is_some_and(|c| c != 0.0);
                if !reused || (from < len && (qk.is_none() || softcap)) {
                    return Ok(None);
                }
                let with_head = |t: Tensor, h: Option<&Tensor>| match h {
                    Some(h) => Tensor::cat(&[&h.to_dtype(t.dtype())?, &t], 2),
                    None => Ok(t),
                };
                let v = with_head((call.v)()?, head.as_ref().map(|h| &h.1))?;
                let stored = StoredLayer {
                    maps: &entry.layers[layer],
                    heads: entry.heads,
                    len: entry.tokens.len(),
                };
                let started = Instant::now();
                let first = attend_stored(stored, source, past..from, &v)?;
                let mut kernel_ns = nanos_since(started);
                let out = match qk {
                    Some((k, q_from)) if from < len => {
                        let k = with_head(k()?, head.as_ref().map(|h| &h.0))?;
                        let q = q_from(from - past)?;
                        let started = Instant::now();
                        let mask = causal_mask(len - from, len)?;
                        let scale = call.params.softmax_scale;
                        let rest = causal_attention(&q, &k, &v, &mask, scale, None)?;
                        kernel_ns += nanos_since(started);
                        match rest {
                            Some(rest) => Tensor::cat(&[&first, &rest], 2)?,
                            None => return Ok(None),
                        }
                    }
                    _ => first,
                };
                self.attention_ns.fetch_add(kernel_ns, Ordering::Relaxed);
                if layer + 1 == n_layers {
                    *plan = Plan::Exact;
                }
                Ok(Some(out))
            },
        );
        out.transpose().map(Option::flatten)
    }

    /// Called for the attention of a prompt layer that [`Self::known_maps`] did not answer:
    /// a recording request's exact attention, its maps kept. `None`: not ours (a hit's
    /// layer that does not reuse maps runs the exact path).
    pub(crate) fn attention(&self, call: &AttentionCall<'_>) -> Result<Option<Tensor>> {
        let layer = call.layer_idx;
        let n_layers = self.n_layers;
        let out = self.with_plan(
            call.rows,
            layer,
            |plan, outcome, _| -> Result<Option<Tensor>> {
                let Plan::Record { tokens, layers } = plan else {
                    return Ok(None);
                };
                let (b, heads, lq, _) = call.q.dims4()?;
                let lk = call.k.dim(2)?;
                let mask = match call.mask {
                    Some(m) if b == 1 && lq == lk && tokens.len() == lq => {
                        normalize_mask(m, 1, heads, lq, lk)
                    }
                    _ => None,
                };
                let plain = call.params.softcap.is_none_or(|c| c == 0.0);
                // maps the store could not hold are not recorded (recording costs more than
                // the exact kernel)
                let fits = self.entry_bytes(heads, lq) <= self.budget_bytes;
                let recorded = match &mask {
                    Some(m) if plain && fits && layers.len() == layer => {
                        let scale = call.params.softmax_scale;
                        causal_attention_recorded(call.q, call.k, call.v, m, scale)?
                    }
                    _ => None,
                };
                let Some((out, maps)) = recorded else {
                    self.exact.fetch_add(1, Ordering::Relaxed);
                    *outcome = Some(MapsOutcome::Exact);
                    *plan = Plan::Exact;
                    return Ok(None);
                };
                layers.push(maps);
                if layer + 1 == n_layers {
                    let entry = StoredMaps {
                        tokens: tokens.clone(),
                        heads,
                        layers: std::mem::take(layers),
                    };
                    self.keep(entry);
                    self.recorded.fetch_add(1, Ordering::Relaxed);
                    *outcome = Some(MapsOutcome::Recorded);
                    *plan = Plan::Exact;
                }
                Ok(Some(out))
            },
        );
        out.transpose().map(Option::flatten)
    }

    /// The bytes a prompt of `len` positions and `heads` heads would store.
    fn entry_bytes(&self, heads: usize, len: usize) -> u64 {
        (self.n_layers * heads * packed_len(len) * 2 + len * 4) as u64
    }

    /// Stores a recorded prompt's maps, evicting the least recently used over the budget.
    fn keep(&self, entry: StoredMaps) {
        self.store.insert(entry.tokens.clone(), Arc::new(entry));
        // evict now: entries are ~100 MB, and moka would otherwise hold the ones over the
        // budget until its next maintenance
        self.store.run_pending_tasks();
    }

    /// The prefix store gave request `request_id` (prompt `tokens`) its head's K/V (`layers`,
    /// in model layer order); with [`DecoderMapsPolicy::over_prefix`] its hit's rows after
    /// the head attend over them (kept until the request ends).
    pub(crate) fn prefix_given(
        &self,
        request_id: usize,
        tokens: &[u32],
        layers: &[(Tensor, Tensor)],
    ) {
        if !self.policy.over_prefix {
            return;
        }
        if let Some(state) = self.requests.get(&request_id) {
            state.lock().prefix = Some(GivenPrefix {
                tokens: tokens.into(),
                layers: layers.into(),
            });
        }
    }

    fn register(&self, request_id: usize) {
        self.requests.insert(request_id, Arc::default());
    }

    fn outcome(&self, request_id: usize) -> Option<MapsOutcome> {
        self.requests.get(&request_id)?.lock().outcome
    }

    fn finish(&self, request_id: usize) {
        self.requests.remove(&request_id);
    }
}

/// A request's use of decoder map reuse, from before it is sent to mistral.rs until its
/// answer is read; dropping it ends the use.
#[derive(Debug)]
pub struct MapsTicket {
    maps: Arc<DecoderMaps>,
    request_id: usize,
}

impl MapsTicket {
    pub(crate) fn new(maps: Arc<DecoderMaps>, request_id: usize) -> Self {
        maps.register(request_id);
        Self { maps, request_id }
    }

    /// What map reuse did for this request's prompt, once its prompt step ran.
    pub fn outcome(&self) -> Option<MapsOutcome> {
        self.maps.outcome(self.request_id)
    }
}

impl Drop for MapsTicket {
    fn drop(&mut self) {
        self.maps.finish(self.request_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shared_prefix_is_kept_and_the_rest_stretched_to_the_stored_end() {
        assert_eq!(alignment(3, 3, 5), Some(vec![0, 1, 2]));
        assert_eq!(alignment(2, 5, 4), Some(vec![0, 1, 2, 3, 3]));
        assert_eq!(alignment(2, 4, 7), Some(vec![0, 1, 2, 6]));
        // one position after the prefix takes the stored last one
        assert_eq!(alignment(3, 4, 9), Some(vec![0, 1, 2, 8]));
        // a stored prompt that is all shared prefix has nothing for the rest
        assert_eq!(alignment(3, 5, 3), None);
        assert_eq!(alignment(0, 0, 3), None);
        for (shared, len, stored) in [(10, 40, 25), (0, 7, 30), (5, 30, 6)] {
            let a = alignment(shared, len, stored).unwrap();
            assert!(crate::kernels::stored_maps::valid_alignment(&a, stored));
            assert_eq!(*a.last().unwrap() as usize, stored - 1);
        }
    }

    #[test]
    fn a_full_store_keeps_the_newest_maps_and_evicts_the_least_recently_used() {
        // one layer of 512 f16 and 8 tokens: 2 KiB as weighed; room for two
        let entry = |first: u32| StoredMaps {
            tokens: (first..first + 8).collect::<Vec<_>>().into(),
            heads: 1,
            layers: vec![vec![f16::ZERO; 512]],
        };
        let maps = DecoderMaps::new(DecoderMapsPolicy::default(), 1, 4 * 1024);
        let found = |first: u32| {
            let asked: Vec<u32> = (first..first + 8).collect();
            maps.neighbour(&asked)
                .map(|(e, shared, _)| (e.tokens[0], shared))
        };
        maps.keep(entry(0));
        // the first prompt's maps are taken often...
        for _ in 0..5 {
            assert_eq!(found(0), Some((0, 8)));
        }
        maps.keep(entry(100));
        maps.keep(entry(200));
        // ...yet the newest are kept, and the least recently used went
        assert_eq!(found(200), Some((200, 8)));
        assert_eq!(found(100), Some((100, 8)));
        assert_eq!(found(0), None);
        assert_eq!(maps.counts().entries, 2);
        // a hit counts as a use: the older entry taken last stays
        maps.keep(entry(300));
        assert_eq!(found(100), Some((100, 8)));
        assert_eq!(found(200), None);
    }

    #[test]
    fn the_size_checked_before_recording_is_the_size_stored() {
        let (layers, heads, len) = (3, 2, 37);
        let maps = DecoderMaps::new(DecoderMapsPolicy::default(), layers, 1 << 20);
        let stored = StoredMaps {
            tokens: (0..len as u32).collect::<Vec<_>>().into(),
            heads,
            layers: vec![vec![f16::ZERO; heads * packed_len(len)]; layers],
        };
        assert_eq!(maps.entry_bytes(heads, len), stored.bytes() as u64);
    }

    #[test]
    fn the_policy_is_checked() {
        let ok = DecoderMapsPolicy::default();
        assert!(ok.validate(30).is_ok());
        for min_shared in [0.0, -1.0, 1.5, f32::NAN] {
            let p = DecoderMapsPolicy {
                min_shared,
                ..ok.clone()
            };
            assert!(p.validate(30).is_err(), "{min_shared}");
        }
        let p = DecoderMapsPolicy {
            layers: vec![3, 30],
            ..ok
        };
        assert!(p.validate(30).is_err());
        assert!(p.reuses(3) && !p.reuses(4));
    }
}
