//! The attention hook installed into mistral.rs (see `patches/`).
//!
//! Rows that do not use the cache get exact attention: with [`ExactAttention::Stock`] the
//! hook declines, so mistral.rs runs its own kernel and the output is bit-identical to not
//! installing the hook; with [`ExactAttention::Fast`] prefill attention runs through
//! [`crate::kernels::exact_attention`], and the MLP's tanh-GELU gate through
//! [`crate::kernels::layer_kernels`]. Decode steps, attention sinks and anything else the fast path
//! does not cover go to mistral.rs.
//!
//! With an [`AttnCache`], the rows of a prefill batch that use it follow a [`ForwardPlan`]
//! decided at layer 0: hits take stored probabilities (and, in models with the known-maps
//! hunk, skip the q/k projections when every row of the batch hits), recorded misses keep
//! their exact maps and store them after the last layer.
//!
//! Owns: what the hook does inside one forward (the [`ForwardPlan`] of map hits and
//! recorded misses, the blend forward's recompute), kept in mistral.rs's per-batch slot
//! so it lives exactly as long as the batch, and the hook's counters. May call: `cache` (to
//! look up and record), `kernels`, `reuse`; never the storage tiers directly.

pub(crate) mod blend_forward;
mod decoder_blend;
mod decoder_maps;
pub(crate) mod forward_plan;
mod label_rows;
mod map_attention;
mod prefix_requests;
mod row_features;

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Result, Tensor};
use mistralrs_core::layers::Sdpa;
use mistralrs_core::{
    AfterLayer, AttentionCall, AttentionHook, BlendAttentionCall, HookRow, KnownMapsCall,
    LayerKvCall, LayerOutputCall, PrefixKv,
};

use crate::cache::AttnCache;
use crate::error::AttnCacheError;
use crate::hook::blend_forward::BlendForward;
use crate::hook::forward_plan::ForwardPlan;
use crate::kernels::exact_attention::{self, AttentionParams};
use crate::kernels::layer_kernels;
use crate::prefix::PrefixStore;
use crate::reuse::blend::ReuseKind;
use decoder_blend::DecoderBlends;
pub use decoder_blend::{BlendOutcome, DecoderBlendCounts, DecoderBlendPolicy};
use decoder_maps::DecoderMaps;
pub use decoder_maps::{DecoderMapsCounts, DecoderMapsPolicy, MapsOutcome, MapsTicket};
use label_rows::LabelRows;
pub use label_rows::LabelRowsTicket;
use prefix_requests::PrefixRuntime;
pub use prefix_requests::PrefixTicket;

/// Which kernels run when no cached map applies (attention; in `Fast` mode also the linear
/// projections and the MLP's GELU of [`crate::kernels::layer_kernels`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExactAttention {
    /// Matrix-multiply attention (`exact_attention`) and [`crate::kernels::layer_kernels`], within
    /// 1e-5 of stock; attention ~3x faster on CPU.
    #[default]
    Fast,
    /// mistral.rs's own kernel, bit for bit.
    Stock,
}

impl ExactAttention {
    fn to_u8(self) -> u8 {
        match self {
            Self::Fast => 0,
            Self::Stock => 1,
        }
    }
    fn from_u8(v: u8) -> Self {
        if v == 1 {
            Self::Stock
        } else {
            Self::Fast
        }
    }
}

impl FromStr for ExactAttention {
    type Err = AttnCacheError;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fast" => Ok(Self::Fast),
            "stock" => Ok(Self::Stock),
            other => Err(AttnCacheError::InvalidSetting {
                name: "exact-attention",
                value: other.to_string(),
                expected: "fast or stock",
            }),
        }
    }
}

impl std::fmt::Display for ExactAttention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fast => "fast",
            Self::Stock => "stock",
        })
    }
}

/// Counters of what the hook did, for metrics and for tests that must know the hook ran.
#[derive(Debug, Default)]
struct HookStats {
    fast_calls: AtomicU64,
    declined_calls: AtomicU64,
    cached_calls: AtomicU64,
    qk_skipped_calls: AtomicU64,
    blend_calls: AtomicU64,
    kernel_calls: AtomicU64,
    label_row_heads: AtomicU64,
    exact_attention_ns: AtomicU64,
}

/// A snapshot of what the hook did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookCounts {
    /// Attention calls computed by the fast exact path for the whole batch.
    pub fast_calls: u64,
    /// Attention calls left to mistral.rs (stock mode, decode, unsupported shapes).
    pub declined_calls: u64,
    /// Attention calls computed row by row because some row used the cache.
    pub cached_calls: u64,
    /// Layers where every row hit and q/k projections were skipped.
    pub qk_skipped_calls: u64,
    /// Blend calls: layers whose attention ran on a blend hit's positions, and blend
    /// decisions that changed the forward (S chosen, or the stored output taken).
    pub blend_calls: u64,
    /// Gated-MLP activations and linear projections computed by [`crate::kernels::layer_kernels`]
    /// (`fast` mode) instead of mistral.rs.
    pub kernel_calls: u64,
    /// Decoder output heads computed on the asked vocabulary rows only (one per batch).
    pub label_row_heads: u64,
    /// Nanoseconds spent in the exact attention kernel of prompt calls the hook computed
    /// (`fast_calls`: scores, softmax and P·V; the q/k/v projections and RoPE run before the
    /// hook and are not in it). Map reuse's own kernel time is
    /// [`DecoderMapsCounts::attention_ns`].
    pub exact_attention_ns: u64,
}

/// The AttnCache attention hook.
#[derive(Debug)]
pub struct AttnCacheHook {
    exact: AtomicU8,
    stats: HookStats,
    cache: Option<CacheRuntime>,
    prefix: Option<Arc<PrefixRuntime>>,
    maps: Option<Arc<DecoderMaps>>,
    label_rows: Arc<LabelRows>,
}

#[derive(Debug)]
struct CacheRuntime {
    cache: Arc<AttnCache>,
    n_layers: usize,
}

/// What the hook keeps for the forward running on this thread: the map plan or the blend
/// plan decided at layer 0. It lives in mistral.rs's batch slot
/// ([`mistralrs_core::with_batch_state`]): empty at each batch's start and dropped with the
/// batch, never shared between threads, and never behind a lock (a lookup that reads Redis
/// while planning holds none).
#[derive(Debug, Default)]
struct BatchState {
    /// The runtime the state belongs to (another hook's state on this thread is dropped).
    owner: usize,
    plan: Option<ForwardPlan>,
    blend: Option<BlendForward>,
}

impl AttnCacheHook {
    /// A hook without a cache whose attention is `exact`.
    pub fn new(exact: ExactAttention) -> Self {
        Self {
            exact: AtomicU8::new(exact.to_u8()),
            stats: HookStats::default(),
            cache: None,
            prefix: None,
            maps: None,
            label_rows: Arc::default(),
        }
    }

    /// The hook with exact prefix reuse for decoders from `store` (patch 0008): a request
    /// holding a [`PrefixTicket`] gets the K/V of its prompt's longest stored prefix and
    /// leaves its own prompt's K/V in the store.
    pub fn with_prefix_store(mut self, store: Arc<PrefixStore>) -> Self {
        self.prefix = Some(PrefixRuntime::new(store, None));
        self
    }

    /// The hook whose prefix store (see [`AttnCacheHook::with_prefix_store`]) also serves
    /// decoder blend hits: a prompt whose exact prefix ends at an edit of a stored prompt
    /// (words replaced, inserted or removed) takes that prompt's K/V past the edit, aligned
    /// by content, and recomputes, after `policy.check_layer`, only the positions that
    /// differ or deviate most (patch 0012; GGUF llama and qwen2 models). Without a prefix store this
    /// does nothing.
    pub fn with_decoder_blend(mut self, policy: DecoderBlendPolicy) -> Self {
        self.prefix = self
            .prefix
            .map(|p| PrefixRuntime::new(p.store().clone(), Some(DecoderBlends::new(policy))));
        self
    }

    /// The hook with map reuse for decoder prompts (the AttnCache paper's method, patch
    /// 0013: GGUF llama and qwen2): a request holding a [`MapsTicket`] takes the stored attention maps
    /// of the stored prompt it shares the longest exact prefix with (at least
    /// `policy.min_shared` of its tokens), or computes exactly and stores its own, up to
    /// `budget_bytes` of maps for a model of `n_layers` layers. Needs `fast` attention (the
    /// maps are recorded by its kernel).
    pub fn with_decoder_maps(
        mut self,
        policy: DecoderMapsPolicy,
        n_layers: usize,
        budget_bytes: u64,
    ) -> Self {
        self.maps = Some(Arc::new(DecoderMaps::new(policy, n_layers, budget_bytes)));
        self
    }

    /// Lets request `request_id` use decoder map reuse until the ticket is dropped; `None`
    /// when it is off.
    pub fn maps_ticket(&self, request_id: usize) -> Option<MapsTicket> {
        self.maps
            .as_ref()
            .map(|m| MapsTicket::new(m.clone(), request_id))
    }

    /// The decoder map reuse policy, when it is on.
    pub fn decoder_maps_policy(&self) -> Option<&DecoderMapsPolicy> {
        self.maps.as_ref().map(|m| m.policy())
    }

    /// What decoder map reuse did so far, when it is on.
    pub fn decoder_maps_counts(&self) -> Option<DecoderMapsCounts> {
        self.maps.as_ref().map(|m| m.counts())
    }

    /// The decoder blend policy, when decoder blend is on.
    pub fn decoder_blend_policy(&self) -> Option<&DecoderBlendPolicy> {
        Some(self.prefix.as_ref()?.blends()?.policy())
    }

    /// What decoder blend did so far, when it is on.
    pub fn decoder_blend_counts(&self) -> Option<DecoderBlendCounts> {
        Some(self.prefix.as_ref()?.blends()?.counts())
    }

    /// Decoder blend, when on.
    fn decoder_blends(&self) -> Option<&DecoderBlends> {
        self.prefix.as_ref()?.blends()
    }

    /// The prefix store, if the hook has one.
    pub fn prefix_store(&self) -> Option<&Arc<PrefixStore>> {
        self.prefix.as_ref().map(|p| p.store())
    }

    /// Lets request `request_id` (mistral.rs's request id) use the prefix store until the
    /// ticket is dropped; `None` without a store.
    pub fn prefix_ticket(&self, request_id: usize) -> Option<PrefixTicket> {
        self.prefix
            .as_ref()
            .map(|p| PrefixTicket::new(p.clone(), request_id))
    }

    /// Reads request `request_id`'s logits at the vocabulary rows `ids` only, until the
    /// ticket is dropped (patch 0011): in `fast` mode, when every request of a batch holds
    /// one, the output head computes only those rows (the others come out `-inf`).
    pub fn label_rows_ticket(&self, request_id: usize, ids: Arc<[u32]>) -> LabelRowsTicket {
        LabelRowsTicket::new(self.label_rows.clone(), request_id, ids)
    }

    /// A hook that uses `cache` for a model with `n_layers` attention layers.
    pub fn with_cache(exact: ExactAttention, cache: Arc<AttnCache>, n_layers: usize) -> Self {
        let runtime = CacheRuntime { cache, n_layers };
        Self {
            cache: Some(runtime),
            ..Self::new(exact)
        }
    }

    /// The cache, if the hook has one.
    pub fn cache(&self) -> Option<&Arc<AttnCache>> {
        self.cache.as_ref().map(|c| &c.cache)
    }

    /// The attention used when no cached map applies.
    pub fn exact_attention(&self) -> ExactAttention {
        ExactAttention::from_u8(self.exact.load(Ordering::Relaxed))
    }

    /// Switches the attention used when no cached map applies (takes effect on the next call).
    pub fn set_exact_attention(&self, exact: ExactAttention) {
        self.exact.store(exact.to_u8(), Ordering::Relaxed);
    }

    /// What the hook has done so far.
    pub fn stats(&self) -> HookCounts {
        let s = &self.stats;
        HookCounts {
            fast_calls: s.fast_calls.load(Ordering::Relaxed),
            declined_calls: s.declined_calls.load(Ordering::Relaxed),
            cached_calls: s.cached_calls.load(Ordering::Relaxed),
            qk_skipped_calls: s.qk_skipped_calls.load(Ordering::Relaxed),
            blend_calls: s.blend_calls.load(Ordering::Relaxed),
            kernel_calls: s.kernel_calls.load(Ordering::Relaxed),
            label_row_heads: s.label_row_heads.load(Ordering::Relaxed),
            exact_attention_ns: s.exact_attention_ns.load(Ordering::Relaxed),
        }
    }

    /// Counts an attention call the fast exact kernel computed, begun at `started`.
    fn count_exact(&self, started: Instant) {
        self.stats
            .exact_attention_ns
            .fetch_add(decoder_maps::nanos_since(started), Ordering::Relaxed);
        self.stats.fast_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// `kernel()` in `fast` mode, counted when it took the work; `None` in `stock`, which
    /// keeps every kernel of mistral.rs's so that it stays the baseline it names.
    fn layer_kernel(
        &self,
        kernel: impl FnOnce() -> Result<Option<Tensor>>,
    ) -> Result<Option<Tensor>> {
        if self.exact_attention() == ExactAttention::Stock {
            return Ok(None);
        }
        let out = kernel()?;
        if out.is_some() {
            self.stats.kernel_calls.fetch_add(1, Ordering::Relaxed);
        }
        Ok(out)
    }

    fn fast_path(&self, call: &AttentionCall<'_>) -> Result<Option<Tensor>> {
        if self.exact_attention() == ExactAttention::Stock
            || !is_prefill(call.rows)
            || call.params.sinks.is_some()
        {
            return Ok(None);
        }
        // [b, heads, L_q, d] and [b, kv_heads, L_kv, d]; prefill of a whole prompt has
        // L_q == L_kv, the rest of a prompt after a reused prefix L_q < L_kv with a mask
        let (b, heads, lq, _) = call.q.dims4()?;
        let lk = call.k.dim(2)?;
        let shaped = lq == lk || (lq < lk && call.mask.is_some());
        if !shaped || !call.q.device().is_cpu() {
            return Ok(None);
        }
        let mask = match call.mask {
            Some(m) => match exact_attention::normalize_mask(m, b, heads, lq, lk) {
                Some(m) => Some(m),
                None => return Ok(None),
            },
            None => None,
        };
        let params = AttentionParams::from_sdpa(call.params);
        exact_attention::attention(call.q, call.k, call.v, mask.as_ref(), &params).map(Some)
    }

    /// Exact attention for one row, `[1, heads, L, d]`: the fast path where it applies
    /// (`mask` normalised), mistral.rs's kernel otherwise.
    fn exact_row(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        raw_mask: Option<&Tensor>,
        call: &AttentionCall<'_>,
    ) -> Result<Tensor> {
        match self.exact_attention() {
            ExactAttention::Fast if call.mask.is_none() || mask.is_some() => {
                let params = AttentionParams::from_sdpa(call.params);
                exact_attention::attention(q, k, v, mask, &params)
            }
            // the hook's own call to Sdpa goes to mistral.rs's kernel
            _ => Sdpa.run_attention(q, k, v, raw_mask, None, call.params),
        }
    }
}

fn is_prefill(rows: &[HookRow]) -> bool {
    !rows.is_empty() && rows.iter().all(|r| r.is_prompt)
}

impl CacheRuntime {
    /// Runs `f` on this thread's batch state (see [`BatchState`]).
    fn with_batch<R>(&self, f: impl FnOnce(&mut BatchState) -> R) -> R {
        let owner = self as *const Self as usize;
        mistralrs_core::with_batch_state(|slot| {
            let ours = slot
                .as_mut()
                .and_then(|s| s.downcast_mut::<BatchState>())
                .filter(|s| s.owner == owner);
            match ours {
                Some(state) => f(state),
                None => {
                    let mut state = BatchState {
                        owner,
                        ..BatchState::default()
                    };
                    let out = f(&mut state);
                    *slot = Some(Box::new(state));
                    out
                }
            }
        })
    }

    /// Whether hits reuse per-layer K/V (blend) rather than maps.
    fn blends(&self) -> bool {
        self.cache.config().reuse_kind == ReuseKind::Blend
    }

    /// The blend plan for `rows`, if one was made for them at layer 0.
    fn blend_plan<'g>(
        slot: &'g mut Option<BlendForward>,
        rows: &[HookRow],
    ) -> Option<&'g mut BlendForward> {
        if !slot.as_ref().is_some_and(|p| p.is_for(rows)) {
            *slot = None;
        }
        slot.as_mut()
    }

    /// The plan for this call: made by the batch's first call at layer 0, followed by its
    /// later calls. `None` when the batch is not a prefill. `xs`, the layer's input
    /// `[b, L, hidden]` when the model offers it, gives the rows' features.
    ///
    /// The slot is the batch's own (empty when mistral.rs starts the batch, see
    /// [`BatchState`]) and the patch numbers layers per batch, so a plan always lines up
    /// with its calls; one that does not is a broken invariant, dropped with a warning
    /// (the rest of the forward runs exact).
    fn plan_for<'g>(
        &self,
        slot: &'g mut Option<ForwardPlan>,
        rows: &[HookRow],
        layer_idx: usize,
        len: usize,
        xs: Option<&Tensor>,
    ) -> Option<&'g mut ForwardPlan> {
        if !is_prefill(rows) {
            *slot = None;
            return None;
        }
        if layer_idx == 0 && slot.is_none() {
            let features = xs.and_then(|xs| row_features::features_for(&self.cache, rows, xs));
            *slot = Some(ForwardPlan::decide(
                &self.cache,
                rows,
                len,
                self.n_layers,
                features,
            ));
        }
        if let Some(plan) = slot.as_ref() {
            if plan.next_layer != layer_idx || !plan.is_for(rows) {
                tracing::warn!(
                    layer = layer_idx,
                    planned = plan.next_layer,
                    "attention call out of line with its batch's plan; this forward runs exact"
                );
                *slot = None;
            }
        }
        slot.as_mut()
    }

    /// Marks `layer_idx` done; after the last layer, stores what was recorded.
    fn finish_layer(&self, slot: &mut Option<ForwardPlan>, layer_idx: usize) {
        if layer_idx + 1 < self.n_layers {
            if let Some(p) = slot.as_mut() {
                p.next_layer = layer_idx + 1;
            }
            return;
        }
        if let Some(plan) = slot.take() {
            let ns = plan.started.elapsed().as_nanos() as u64;
            self.cache.note_forward(ns, plan.rows.len());
            for (scope, entry) in plan.into_entries(self.n_layers, self.cache.features().id()) {
                self.cache.record_in(scope, entry);
            }
        }
    }
}

impl AttentionHook for AttnCacheHook {
    fn gelu_tanh_glu(&self, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
        self.layer_kernel(|| layer_kernels::gelu_tanh_glu(gate, up))
    }

    fn linear(&self, x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
        self.layer_kernel(|| layer_kernels::linear(x, w))
    }

    fn silu_glu(&self, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
        self.layer_kernel(|| layer_kernels::silu_glu(gate, up))
    }

    fn lm_head(&self, x: &Tensor, w: &Tensor, rows: &[HookRow]) -> Result<Option<Tensor>> {
        if self.exact_attention() != ExactAttention::Fast {
            return Ok(None);
        }
        let logits = self.label_rows.logits(x, w, rows)?;
        if logits.is_some() {
            self.stats.label_row_heads.fetch_add(1, Ordering::Relaxed);
        }
        Ok(logits)
    }

    fn prefix_kv(&self, request_id: usize, toks: &[u32]) -> Result<Option<PrefixKv>> {
        let kv = match &self.prefix {
            Some(p) => p.lookup(request_id, toks)?,
            None => None,
        };
        // map reuse over prefix reuse: a hit's rows after the head attend over its K/V
        if let (Some(maps), Some(kv)) = (&self.maps, &kv) {
            maps.prefix_given(request_id, toks, &kv.layers);
        }
        Ok(kv)
    }

    fn sequence_kv(
        &self,
        request_id: usize,
        toks: &[u32],
        layers: &[(Tensor, Tensor)],
    ) -> Result<()> {
        match &self.prefix {
            Some(p) => p.offer(request_id, toks, layers),
            None => Ok(()),
        }
    }

    /// In `fast` mode a GGUF decoder loaded while the hook is installed keeps its weights
    /// dequantized once to f32, so [`AttentionHook::linear`] can take its projections
    /// (candle's quantized CPU matmul rounds the activations to 8 bits and is ~20x slower).
    fn f32_weights(&self) -> bool {
        self.exact_attention() == ExactAttention::Fast
    }

    fn attention(&self, call: &AttentionCall<'_>) -> Result<Option<Tensor>> {
        let started = Instant::now();
        if let Some(maps) = &self.maps {
            if let Some(out) = maps.attention(call)? {
                // a recording forward: exact
                self.count_exact(started);
                return Ok(Some(out));
            }
        }
        if let Some(rt) = self.cache.as_ref().filter(|rt| !rt.blends()) {
            let (lq, lk) = (call.q.dim(2)?, call.k.dim(2)?);
            let planned = rt.with_batch(|batch| -> Result<Option<Tensor>> {
                let slot = &mut batch.plan;
                let planned = match rt.plan_for(slot, call.rows, call.layer_idx, lq, None) {
                    Some(plan) if lq == lk && plan.uses_cache() && call.params.sinks.is_none() => {
                        Some(self.planned(plan, call)?)
                    }
                    _ => None,
                };
                if slot.is_some() {
                    rt.finish_layer(slot, call.layer_idx);
                }
                Ok(planned)
            })?;
            if let Some(out) = planned {
                self.stats.cached_calls.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(out));
            }
        }
        let out = self.fast_path(call)?;
        match out {
            Some(_) => self.count_exact(started),
            None => {
                self.stats.declined_calls.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(out)
    }

    fn known_maps(&self, call: &KnownMapsCall<'_>) -> Result<Option<Tensor>> {
        if let Some(maps) = &self.maps {
            let out = maps.known_maps(call)?;
            if out.is_some() {
                self.stats.cached_calls.fetch_add(1, Ordering::Relaxed);
                if maps.skips_qk() {
                    self.stats.qk_skipped_calls.fetch_add(1, Ordering::Relaxed);
                }
            }
            return Ok(out);
        }
        let Some(rt) = &self.cache else {
            return Ok(None);
        };
        if rt.blends() {
            // blend mode: the plan is made here, at layer 0 (its input gives the features)
            if call.layer_idx == 0 {
                let plan = match is_prefill(call.rows) {
                    true => Some(BlendForward::decide(&rt.cache, call.rows, call.xs)?),
                    false => None,
                };
                let plan = plan.filter(BlendForward::is_active);
                rt.with_batch(|batch| batch.blend = plan);
            }
            return Ok(None);
        }
        let (_, len, _) = call.xs.dims3()?; // [b, L, hidden]
        rt.with_batch(|batch| self.known_maps_planned(rt, &mut batch.plan, call, len))
    }

    fn layer_kv(&self, call: &LayerKvCall<'_>) -> Result<()> {
        let Some(rt) = self.cache.as_ref().filter(|rt| rt.blends()) else {
            return match self.decoder_blends() {
                Some(blends) => blends.layer_kv(call),
                None => Ok(()),
            };
        };
        rt.with_batch(
            |batch| match CacheRuntime::blend_plan(&mut batch.blend, call.rows) {
                Some(plan) => plan.layer_kv(call),
                None => Ok(()),
            },
        )
    }

    fn after_layer(&self, call: &LayerOutputCall<'_>) -> Result<AfterLayer> {
        let Some(rt) = self.cache.as_ref().filter(|rt| rt.blends()) else {
            let action = match self.decoder_blends() {
                Some(blends) => blends.after_layer(call)?,
                None => AfterLayer::Continue,
            };
            if !matches!(action, AfterLayer::Continue) {
                self.stats.blend_calls.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(action);
        };
        let action = rt.with_batch(|batch| -> Result<AfterLayer> {
            let slot = &mut batch.blend;
            let Some(plan) = CacheRuntime::blend_plan(slot, call.rows) else {
                return Ok(AfterLayer::Continue);
            };
            let (action, done) = plan.after_layer(&rt.cache, call)?;
            if done {
                *slot = None;
            }
            Ok(action)
        })?;
        if !matches!(action, AfterLayer::Continue) {
            self.stats.blend_calls.fetch_add(1, Ordering::Relaxed);
        }
        Ok(action)
    }

    fn blend_attention(&self, call: &BlendAttentionCall<'_>) -> Result<Tensor> {
        let Some(rt) = self.cache.as_ref().filter(|rt| rt.blends()) else {
            let decoder = self.decoder_blends().map(|b| b.attention(call));
            if let Some(Some(out)) = decoder.transpose()? {
                self.stats.blend_calls.fetch_add(1, Ordering::Relaxed);
                return Ok(out);
            }
            candle_core::bail!("a blended layer ran without a blend cache");
        };
        rt.with_batch(|batch| {
            let Some(plan) = CacheRuntime::blend_plan(&mut batch.blend, call.rows) else {
                candle_core::bail!("a blended layer ran without a blend plan");
            };
            self.stats.blend_calls.fetch_add(1, Ordering::Relaxed);
            plan.attention(call)
        })
    }
}

/// Installs `hook` into mistral.rs for the whole process, replacing any other hook.
pub fn install(hook: Arc<AttnCacheHook>) {
    let previous = mistralrs_core::set_attention_hook(Some(hook));
    if previous.is_some() {
        tracing::warn!("replaced an attention hook that was already installed");
    }
}

/// Removes whatever attention hook is installed; mistral.rs runs unmodified afterwards.
pub fn uninstall() {
    mistralrs_core::set_attention_hook(None);
}
