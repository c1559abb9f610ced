//! Blend reuse on decoders: a prompt takes stored K/V for the positions after its exact
//! stored prefix (if it has one), as CacheBlend does — the K/V of the stored prompt it is an
//! edit of, and of runs of ids stored in any prompt (a document after another query).
//!
//! When a request holding a prefix ticket is looked up ([`DecoderBlends::plan`]), the
//! prefix store also returns the stored spans that go on with the rest of its content
//! ([`PrefixStore::lookup_near`]), and the rest is aligned with each span by content from
//! its anchor (`reuse::maps::align`: an insertion or deletion shifts what follows it; a
//! moved stored K, after RoPE, is rotated by the shift). The engine computes the positions after the exact
//! prefix (patch 0008); their layers up to the check layer run on every one of them, and
//! at the check layer each position's fresh V is compared with the stored prompt's
//! (‖v − v_stored‖ / ‖v_stored‖ over its kv heads). The later layers run only on S: the
//! positions whose id differs from the stored prompt's or that it does not cover, the
//! share of the rest that deviates most, and always the last position (its logits are
//! the answer); their attention is over the exact prefix's K/V, the stored prompt's K/V
//! at every other position, and S's fresh rows (patch 0012). Nothing of a blended forward
//! is stored: its later layers' K/V never reach mistral.rs's cache, so the prompt step's
//! K/V offer does not match the prompt and is ignored.
//!
//! Positions before the first differing id are exact by construction (a causal model's
//! K/V at a position depends only on the ids up to it); the rest is approximate, bounded
//! by the share recomputed. A plan whose compulsory positions exceed `max_share` of the
//! computed ones, or that would reuse too few positions to repay its own costs, is not
//! made (the prompt runs as a plain prefix hit, exactly).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use dashmap::DashMap;
use mistralrs_core::{AfterLayer, BlendAttentionCall, LayerKvCall, LayerOutputCall, PrefixKv};
use parking_lot::Mutex;

use crate::error::AttnCacheError;
use crate::kernels::exact_attention::{self, AttentionParams};
use crate::prefix::{Continuation, PrefixStore};
use crate::reuse::blend::put_rows;
use crate::reuse::maps::align;

/// Fewest positions a blend must take from the stored prompt: on SmolLM2-135M a hit
/// reusing 8 of 14 computed positions took 0.18 s against 0.14 s for the plain prefix hit
/// (`make llm-eval`, 20 pairs, commit 80603f7).
const MIN_REUSED: usize = 32;
/// Smallest predicted ratio of layer-rows (every computed position in every layer) to the
/// blend's (every computed position up to the check layer, S after it).
const MIN_GAIN: f64 = 1.5;

/// How a decoder blend hit is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderBlendPolicy {
    /// Layers up to and including this one run on every computed position; S is chosen
    /// from the V of this layer.
    pub check_layer: usize,
    /// Share (0 to 1) of the reusable positions recomputed too, those whose V deviates most
    /// at the check layer; 1 recomputes every position (the exact answer, for testing).
    pub share: f32,
    /// Largest share of the computed positions that must be recomputed (ids that differ
    /// from the stored prompt's, or that it does not cover) for a hit to be tried.
    pub max_share: f32,
    /// A hit is taken only when its stale deviation (see [`BlendOutcome::stale_deviation`])
    /// is below this; otherwise it is computed exactly from the check layer on. `None`: no
    /// such bound (not calibrated).
    pub stale_below: Option<f32>,
}

impl Default for DecoderBlendPolicy {
    fn default() -> Self {
        Self {
            check_layer: 1,
            share: 0.15,
            max_share: 0.5,
            stale_below: None,
        }
    }
}

impl DecoderBlendPolicy {
    /// Rejects settings that cannot work, naming the setting.
    pub fn validate(&self) -> std::result::Result<(), AttnCacheError> {
        for (name, value) in [("share", self.share), ("max_share", self.max_share)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(AttnCacheError::InvalidSetting {
                    name,
                    value: value.to_string(),
                    expected: "a share from 0 to 1",
                });
            }
        }
        if let Some(m) = self.stale_below.filter(|m| !(m.is_finite() && *m >= 0.0)) {
            return Err(AttnCacheError::InvalidSetting {
                name: "stale_below",
                value: m.to_string(),
                expected: "a deviation of 0 or more",
            });
        }
        Ok(())
    }
}

/// What decoder blend did, for `/info`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecoderBlendCounts {
    /// Prompts served from a stored prompt's K/V past their exact prefix.
    pub hits: u64,
    /// Prompts with a stored continuation that needed more than `max_share` recomputed, or
    /// would not repay the blend's costs.
    pub refused: u64,
    /// Planned hits computed exactly from the check layer on: their stale deviation was
    /// not below `stale_below`.
    pub refused_stale: u64,
    /// Positions recomputed past the check layer over all hits.
    pub recomputed: u64,
    /// Positions taken from stored prompts over all hits.
    pub reused: u64,
    /// Planned hits that took a span found by content further on in the prompt (another
    /// prompt's document after a different query, a paragraph moved by a long insertion),
    /// not only the stored prompt that continues the exact prefix.
    pub found_by_content: u64,
}

/// What a request's blend did (`None` in [`BlendOutcome`] when not blended).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlendOutcome {
    /// Positions recomputed after the check layer (S).
    pub recomputed: usize,
    /// Positions whose K/V after the check layer came from the stored prompt.
    pub reused: usize,
    /// The largest check-layer deviation of V (‖v − v_stored‖ / ‖v_stored‖ over the kv
    /// heads) among the positions whose stored K/V were kept: what the blend left stale
    /// (0 when none was kept).
    pub stale_deviation: f32,
    /// The check-layer V deviation of the kept positions summed and divided by the prompt's
    /// length (the exact prefix and the recomputed positions count 0): how stale the
    /// context is on average, where `stale_deviation` is its worst position. Reported, not
    /// bounded.
    pub stale_mean: f32,
    /// The stale deviation was not below the policy's bound: nothing was blended, the
    /// prompt was computed exactly from the check layer on (`recomputed` is every computed
    /// position, `reused` 0).
    pub refused: bool,
}

enum Stage {
    /// Waiting for the check layer.
    Pending,
    /// S chosen: `rel` indexes the forward's rows, `abs` the prompt's positions; `running`
    /// once the layers after the check layer run on S.
    Blending {
        rel: Arc<[u32]>,
        abs: Arc<[u32]>,
        running: bool,
        stale: f32,
        stale_mean: f32,
    },
    /// Computed exactly from the check layer on (its stale deviation was over the bound).
    Refused(BlendOutcome),
    /// Answered.
    Done(BlendOutcome),
}

/// One request's planned blend.
struct Planned {
    tokens: Arc<[u32]>,
    /// Positions the engine takes from the prefix (it computes the rest).
    prefix_len: usize,
    /// Per layer K (after RoPE) and V `[1, kv_heads, L, d]`: the exact prefix's rows, then
    /// the stored prompt's (zeros where it has none: those positions are always in S).
    kv: Vec<(Tensor, Tensor)>,
    /// For each prompt position from `prefix_len` on: whether its stored row may be kept.
    reusable: Vec<bool>,
    /// For each prompt position from `prefix_len` on: its position minus its stored row's
    /// (K after RoPE is rotated by this much; 0 where not reusable).
    shift: Vec<i64>,
    stage: Mutex<Stage>,
}

/// The decoder blend plans of the requests in flight.
pub(crate) struct DecoderBlends {
    policy: DecoderBlendPolicy,
    plans: DashMap<usize, Arc<Planned>>,
    hits: AtomicU64,
    refused: AtomicU64,
    recomputed: AtomicU64,
    reused: AtomicU64,
    found_by_content: AtomicU64,
    refused_stale: AtomicU64,
}

impl std::fmt::Debug for DecoderBlends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecoderBlends")
            .field("policy", &self.policy)
            .field("in_flight", &self.plans.len())
            .finish()
    }
}

impl DecoderBlends {
    pub(crate) fn new(policy: DecoderBlendPolicy) -> Self {
        Self {
            policy,
            plans: DashMap::new(),
            hits: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            recomputed: AtomicU64::new(0),
            reused: AtomicU64::new(0),
            found_by_content: AtomicU64::new(0),
            refused_stale: AtomicU64::new(0),
        }
    }

    pub(crate) fn policy(&self) -> &DecoderBlendPolicy {
        &self.policy
    }

    pub(crate) fn counts(&self) -> DecoderBlendCounts {
        DecoderBlendCounts {
            hits: self.hits.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            recomputed: self.recomputed.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            found_by_content: self.found_by_content.load(Ordering::Relaxed),
            refused_stale: self.refused_stale.load(Ordering::Relaxed),
        }
    }

    /// The prefix for request `request_id`'s prompt `toks`, and a blend plan when a stored
    /// prompt continues it (see [`PrefixStore::lookup_near`]).
    pub(crate) fn plan(
        &self,
        store: &PrefixStore,
        request_id: usize,
        toks: &[u32],
    ) -> Result<Option<PrefixKv>> {
        self.plans.remove(&request_id);
        let (prefix, cont) = store.lookup_near(toks)?;
        if let Some(cont) = cont {
            match self.planned(prefix.as_ref(), &cont, toks)? {
                Some(p) => {
                    if cont.spans.iter().any(|s| s.by_content) {
                        self.found_by_content.fetch_add(1, Ordering::Relaxed);
                    }
                    self.plans.insert(request_id, Arc::new(p));
                }
                None => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(prefix)
    }

    /// The plan for `toks` from its exact `prefix` (if any) and the stored `cont`, or
    /// `None` when more than `max_share` of the computed positions would have to be
    /// recomputed, or the blend would not repay its costs.
    fn planned(
        &self,
        prefix: Option<&PrefixKv>,
        cont: &Continuation,
        toks: &[u32],
    ) -> Result<Option<Planned>> {
        let len = toks.len();
        // mistral.rs always computes the last position (its logits)
        let p = prefix.map_or(0, |x| x.len).min(len.saturating_sub(1));
        let computed = len - p;
        if cont.ids.is_empty() || cont.start > p || computed < 2 {
            return Ok(None);
        }
        // each span aligned by content with the rest of the prompt from its anchor to the
        // next span's (an insertion or deletion shifts what follows it); positions no span
        // covers are recomputed
        let mut source = vec![0u32; computed];
        let mut reusable = vec![false; computed];
        let mut shift = vec![0i64; computed];
        for (i, span) in cont.spans.iter().enumerate() {
            let end = cont.spans.get(i + 1).map_or(len, |next| next.at).min(len);
            if span.at >= end || span.rows.is_empty() || span.rows.end > cont.ids.len() {
                continue;
            }
            let aligned = align(&toks[span.at..end], &cont.ids[span.rows.clone()]);
            let mut differing = aligned.differing.iter().peekable();
            for (r, &s) in aligned.source.iter().enumerate() {
                let differs = differing.next_if_eq(&&r).is_some();
                let Some(at) = (span.at + r).checked_sub(p) else {
                    continue;
                };
                source[at] = (span.rows.start + s as usize) as u32;
                reusable[at] = !differs;
                shift[at] = (span.at + r) as i64 - (span.stored_at + s as usize) as i64;
            }
        }
        reusable[computed - 1] = false;
        for (r, keep) in reusable.iter().enumerate() {
            if !keep {
                shift[r] = 0;
            }
        }
        let compulsory = reusable.iter().filter(|r| !**r).count();
        if compulsory as f32 > self.policy.max_share * computed as f32 {
            return Ok(None);
        }
        // a blend's own costs (the stored rows assembled and put in every later layer) are
        // not repaid by a few reused positions
        let kept = computed - compulsory;
        let recomputed = compulsory + (self.policy.share * kept as f32).ceil() as usize;
        let layers = match prefix {
            Some(x) => x.layers.len().min(cont.layers.len()),
            None => cont.layers.len(),
        };
        let check = (self.policy.check_layer + 1).min(layers);
        let work = check * computed + (layers - check) * recomputed;
        let gain = (layers * computed) as f64 / work.max(1) as f64;
        // (a share of 1 recomputes everything: the exact answer, for testing)
        if self.policy.share < 1.0 && (kept < MIN_REUSED || gain < MIN_GAIN) {
            tracing::debug!(kept, gain, "decoder blend: not worth it, plain prefix hit");
            return Ok(None);
        }
        let idx = Tensor::from_slice(&source, source.len(), &Device::Cpu)?;
        // per layer: the prefix's rows (if any), then the stored prompt's rows each position
        // takes
        let kv = (0..layers)
            .map(|l| {
                let (ck, cv) = &cont.layers[l];
                let one = |pre: Option<&Tensor>, stored: &Tensor| -> Result<Tensor> {
                    let taken = stored.to_dtype(DType::F32)?.index_select(&idx, 2)?;
                    match pre {
                        Some(pre) => {
                            let pre = pre.narrow(2, 0, p)?.to_dtype(DType::F32)?;
                            Tensor::cat(&[&pre, &taken], 2)
                        }
                        None => Ok(taken),
                    }
                };
                let (pk, pv) = match prefix.map(|x| &x.layers[l]) {
                    Some((k, v)) => (Some(k), Some(v)),
                    None => (None, None),
                };
                Ok((one(pk, ck)?, one(pv, cv)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Planned {
            tokens: Arc::from(toks),
            prefix_len: p,
            kv,
            reusable,
            shift,
            stage: Mutex::new(Stage::Pending),
        }))
    }

    /// Forgets request `request_id`'s plan (its ticket ended).
    pub(crate) fn finish(&self, request_id: usize) {
        self.plans.remove(&request_id);
    }

    /// What request `request_id`'s blend did so far (a hit, or a refusal at the check layer).
    pub(crate) fn outcome(&self, request_id: usize) -> Option<BlendOutcome> {
        let plan = self.plans.get(&request_id)?;
        let stage = plan.stage.lock();
        match &*stage {
            Stage::Done(outcome) | Stage::Refused(outcome) => Some(*outcome),
            _ => None,
        }
    }

    /// The plan of a forward over `rows` (one prompt row whose plan is for these tokens and
    /// whose computed part has `computed` rows).
    fn plan_of(
        &self,
        rows: &[mistralrs_core::HookRow],
        computed: Option<usize>,
    ) -> Option<Arc<Planned>> {
        let [row] = rows else { return None };
        if !row.is_prompt {
            return None;
        }
        let plan = self.plans.get(&row.request_id)?.clone();
        // after a prefix hit the sequence holds only the ids it computes (patch 0008)
        let rest = &plan.tokens[plan.prefix_len..];
        let fits = (*plan.tokens == row.tokens[..] || *rest == row.tokens[..])
            && computed.is_none_or(|n| n == rest.len());
        fits.then_some(plan)
    }

    /// At the check layer: chooses S from the deviation of each computed position's V.
    pub(crate) fn layer_kv(&self, call: &LayerKvCall<'_>) -> Result<()> {
        if call.layer_idx != self.policy.check_layer {
            return Ok(());
        }
        let Some(plan) = self.plan_of(call.rows, Some(call.v.dim(2)?)) else {
            return Ok(());
        };
        let mut stage = plan.stage.lock();
        if !matches!(*stage, Stage::Pending) {
            return Ok(());
        }
        let p = plan.prefix_len;
        let computed = plan.reusable.len();
        let Some((_, stored_v)) = plan.kv.get(call.layer_idx) else {
            return Ok(()); // a layer the stored prompt has not: no blend
        };
        let stored_v = stored_v.narrow(2, p, computed)?;
        let deviation = deviations(call.v, &stored_v)?;
        let mut chosen: Vec<usize> = (0..computed).filter(|&r| !plan.reusable[r]).collect();
        let mut candidates: Vec<usize> = (0..computed).filter(|&r| plan.reusable[r]).collect();
        let extra = (self.policy.share * candidates.len() as f32).ceil() as usize;
        candidates.sort_by(|&a, &b| deviation[b].total_cmp(&deviation[a]));
        chosen.extend(candidates.iter().take(extra));
        chosen.sort_unstable();
        // the most deviating position left stale, and the mean over the prompt
        let stale = candidates.get(extra).map_or(0.0, |&r| deviation[r]);
        let kept_sum: f32 = candidates.iter().skip(extra).map(|&r| deviation[r]).sum();
        let stale_mean = kept_sum / (p + computed).max(1) as f32;
        if self.policy.stale_below.is_some_and(|m| stale >= m) {
            tracing::debug!(stale, "decoder blend: too stale, computed exactly");
            self.refused_stale.fetch_add(1, Ordering::Relaxed);
            *stage = Stage::Refused(BlendOutcome {
                recomputed: computed,
                reused: 0,
                stale_deviation: stale,
                stale_mean,
                refused: true,
            });
            return Ok(());
        }
        let rel: Vec<u32> = chosen.iter().map(|&r| r as u32).collect();
        let abs: Vec<u32> = chosen.iter().map(|&r| (r + p) as u32).collect();
        tracing::debug!(
            computed,
            recomputed = rel.len(),
            "decoder blend: S chosen at the check layer"
        );
        *stage = Stage::Blending {
            rel: rel.into(),
            abs: abs.into(),
            running: false,
            stale,
            stale_mean,
        };
        Ok(())
    }

    /// After the check layer: the rest on S; after the last layer: the output.
    pub(crate) fn after_layer(&self, call: &LayerOutputCall<'_>) -> Result<AfterLayer> {
        let last = call.layer_idx + 1 == call.n_layers;
        if call.layer_idx != self.policy.check_layer && !last {
            return Ok(AfterLayer::Continue);
        }
        let Some(plan) = self.plan_of(call.rows, None) else {
            return Ok(AfterLayer::Continue);
        };
        let mut stage = plan.stage.lock();
        let (rel, running, stale, stale_mean) = match &mut *stage {
            Stage::Blending {
                rel,
                running,
                stale,
                stale_mean,
                ..
            } => (rel.clone(), running, *stale, *stale_mean),
            _ => return Ok(AfterLayer::Continue),
        };
        let computed = plan.reusable.len();
        if !*running {
            // the check layer; when it is the last one there is nothing to blend
            if last {
                *stage = Stage::Pending;
                return Ok(AfterLayer::Continue);
            }
            *running = true;
            let idx = Tensor::from_slice(&rel, rel.len(), call.xs.device())?;
            return Ok(AfterLayer::Blend(idx));
        }
        if !last {
            return Ok(AfterLayer::Continue);
        }
        // every computed row's output: S's fresh rows (only the last one's logits are read)
        let (b, n, hidden) = call.xs.dims3()?;
        if b != 1 || n != rel.len() {
            candle_core::bail!(
                "decoder blend: {n} output rows for {} recomputed",
                rel.len()
            );
        }
        let base = Tensor::zeros((1, 1, computed, hidden), DType::F32, call.xs.device())?;
        let full = put_rows(&base, &rel, &call.xs.unsqueeze(0)?)?
            .squeeze(0)?
            .to_dtype(call.xs.dtype())?;
        let outcome = BlendOutcome {
            recomputed: rel.len(),
            reused: computed - rel.len(),
            stale_deviation: stale,
            stale_mean,
            refused: false,
        };
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.recomputed
            .fetch_add(outcome.recomputed as u64, Ordering::Relaxed);
        self.reused
            .fetch_add(outcome.reused as u64, Ordering::Relaxed);
        *stage = Stage::Done(outcome);
        Ok(AfterLayer::Replace(full))
    }

    /// A blended layer's attention: S's queries over the prefix, the stored rows and S's own.
    pub(crate) fn attention(&self, call: &BlendAttentionCall<'_>) -> Result<Option<Tensor>> {
        let Some(plan) = self.plan_of(call.rows, None) else {
            return Ok(None);
        };
        let stage = plan.stage.lock();
        let Stage::Blending {
            abs, running: true, ..
        } = &*stage
        else {
            candle_core::bail!("a decoder blend layer ran before its check layer");
        };
        let Some((k_stored, v_stored)) = plan.kv.get(call.layer_idx) else {
            candle_core::bail!("decoder blend: no stored layer {}", call.layer_idx);
        };
        let len = plan.tokens.len();
        let device = call.q.device();
        let positions = Tensor::from_slice(abs, abs.len(), device)?;
        let k_fresh = (call.rope)(&call.k.to_dtype(DType::F32)?, &positions)?;
        let q = (call.rope)(&call.q.to_dtype(DType::F32)?, &positions)?;
        let k_stored = moved_rows(k_stored, &plan, abs, call.rope)?;
        let k = put_rows(&k_stored, abs, &k_fresh)?;
        let v = put_rows(v_stored, abs, &call.v.to_dtype(DType::F32)?)?;
        let mask = causal_rows(abs, len, device)?;
        let params = AttentionParams::from_sdpa(call.params);
        let out = exact_attention::attention(&q, &k, &v, Some(&mask), &params)?;
        Ok(Some(out.to_dtype(call.q.dtype())?))
    }
}

/// `k` (`[1, kv_heads, L, d]`, after RoPE) with the stored rows the plan keeps that moved
/// (an insertion or deletion before them) rotated to their new positions; rows of `s` are
/// left as they are (replaced by fresh ones).
fn moved_rows(
    k: &Tensor,
    plan: &Planned,
    s: &[u32],
    rope: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let p = plan.prefix_len;
    let mut forward: (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    let mut backward: (Vec<u32>, Vec<u32>) = (Vec::new(), Vec::new());
    for (r, &d) in plan.shift.iter().enumerate() {
        let row = (p + r) as u32;
        if d == 0 || s.binary_search(&row).is_ok() {
            continue;
        }
        let side = if d > 0 { &mut forward } else { &mut backward };
        side.0.push(row);
        side.1.push(d.unsigned_abs() as u32);
    }
    if forward.0.is_empty() && backward.0.is_empty() {
        return Ok(k.clone());
    }
    let device = k.device();
    let flip = rotation_flip(k.dim(3)?, rope, device)?;
    let mut out = k.clone();
    for ((rows, by), back) in [(forward, false), (backward, true)] {
        if rows.is_empty() {
            continue;
        }
        let idx = Tensor::from_slice(&rows, rows.len(), device)?;
        let by = Tensor::from_slice(&by, by.len(), device)?;
        let x = out.index_select(&idx, 2)?;
        // RoPE composes: R(a)·R(b) = R(a + b); R(−a) = F·R(a)·F with F the reflection
        // that negates the second coordinate of each rotated pair
        let moved = match back {
            false => rope(&x, &by)?,
            true => rope(&x.broadcast_mul(&flip)?, &by)?.broadcast_mul(&flip)?,
        };
        out = put_rows(&out, &rows, &moved)?;
    }
    Ok(out)
}

/// The reflection F (`[d]` of ±1) that turns the model's RoPE by `a` into RoPE by `−a`
/// (`F·R(a)·F = R(−a)`): it negates the second coordinate of each pair RoPE rotates, found
/// by rotating a unit vector by one position (pairs of neighbours, or of halves).
fn rotation_flip(
    d: usize,
    rope: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
    device: &Device,
) -> Result<Tensor> {
    let mut e0 = vec![0f32; d];
    e0[0] = 1.0;
    let x = Tensor::from_vec(e0, (1, 1, 1, d), device)?;
    let y = rope(&x, &Tensor::new(&[1u32], device)?)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let interleaved = y[1].abs() > y[d / 2].abs();
    let f: Vec<f32> = (0..d)
        .map(|i| {
            let second = match interleaved {
                true => i % 2 == 1,
                false => i >= d / 2,
            };
            if second {
                -1.0
            } else {
                1.0
            }
        })
        .collect();
    Tensor::from_vec(f, d, device)
}

/// ‖v − v_stored‖ / ‖v_stored‖ of each position over its kv heads (`[1, kv_heads, n, d]`).
fn deviations(v: &Tensor, stored: &Tensor) -> Result<Vec<f32>> {
    let v = v.to_dtype(DType::F32)?.squeeze(0)?.transpose(0, 1)?; // [n, heads, d]
    let s = stored.to_dtype(DType::F32)?.squeeze(0)?.transpose(0, 1)?;
    let diff = (&v - &s)?.sqr()?.flatten_from(1)?.sum(1)?.sqrt()?;
    let norm = s.sqr()?.flatten_from(1)?.sum(1)?.sqrt()?;
    let diff = diff.to_vec1::<f32>()?;
    let norm = norm.to_vec1::<f32>()?;
    Ok(diff
        .iter()
        .zip(&norm)
        .map(|(d, n)| d / n.max(f32::MIN_POSITIVE))
        .collect())
}

/// An additive mask `[1, 1, |rows|, len]` letting the query at position `rows[i]` see the
/// keys at positions up to its own.
fn causal_rows(rows: &[u32], len: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![f32::NEG_INFINITY; rows.len() * len];
    for (i, &p) in rows.iter().enumerate() {
        let visible = (p as usize + 1).min(len);
        m[i * len..i * len + visible].fill(0.0);
    }
    Tensor::from_vec(m, (1, 1, rows.len(), len), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_rows_sees_up_to_its_own_position() {
        let m = causal_rows(&[0, 3], 5, &Device::Cpu).unwrap();
        let v = m.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let seen = |r: usize| (0..5).filter(|j| v[r * 5 + j] == 0.0).count();
        assert_eq!((seen(0), seen(1)), (1, 4));
    }

    #[test]
    fn deviation_is_relative_per_position() {
        let s = Tensor::ones((1, 2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let v = s.clone();
        let mut vals = v.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // position 1 of head 0 doubled: ‖diff‖ = 2 over ‖s‖ = sqrt(8)
        for x in &mut vals[4..8] {
            *x = 2.0;
        }
        let v = Tensor::from_vec(vals, (1, 2, 3, 4), &Device::Cpu).unwrap();
        let d = deviations(&v, &s).unwrap();
        assert_eq!(d[0], 0.0);
        assert!((d[1] - 2.0 / 8f32.sqrt()).abs() < 1e-6);
        assert_eq!(d[2], 0.0);
    }

    /// Stored keys after RoPE at their stored positions, moved forward and back, equal the
    /// keys rotated at the new positions from scratch, in both RoPE layouts.
    #[test]
    fn moved_keys_equal_keys_rotated_at_their_new_positions() {
        for interleaved in [false, true] {
            let rope = crate::reuse::blend::test_rope(interleaved);
            let dev = Device::Cpu;
            let raw = Tensor::randn(0f32, 1.0, (1, 2, 6, 8), &dev).unwrap();
            let at = |pos: &[u32]| rope(&raw, &Tensor::new(pos, &dev).unwrap()).unwrap();
            // rows 0, 1: the prefix; 2: recomputed (in S); 3, 4: moved +3 and -2; 5: in place
            let stored = at(&[0, 1, 20, 10, 30, 5]);
            let plan = Planned {
                tokens: Arc::from(vec![0u32; 6]),
                prefix_len: 2,
                kv: Vec::new(),
                reusable: vec![false, true, true, true],
                shift: vec![0, 3, -2, 0],
                stage: Mutex::new(Stage::Pending),
            };
            let moved = moved_rows(&stored, &plan, &[2], &rope).unwrap();
            let want = at(&[0, 1, 20, 13, 28, 5]);
            let diff = (moved - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "interleaved {interleaved}: {diff}");
        }
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        assert!(DecoderBlendPolicy::default().validate().is_ok());
        let bad = DecoderBlendPolicy {
            share: 1.5,
            ..DecoderBlendPolicy::default()
        };
        assert!(bad.validate().is_err());
    }
}
