//! One forward pass under blend reuse: what each row of the batch does, decided at layer 0
//! (lookup), settled at the check layer (S, escalation or refusal), resumed on every position
//! after the resume layer (an escalated hit) and finished after the last layer (the output
//! states of a hit, or a recorded entry).
//!
//! A hit needs a batch of one row (the layers after the check layer run on that row's S);
//! rows of larger batches are computed exactly and recorded when admitted.
//!
//! With `BlendPolicy::lookup_overlap_from`, the lookup of a long input alone in its batch
//! runs on a thread of its own while layer 0 computes, and is waited for at the check layer:
//! a blend entry is large (EmbeddingGemma: 34 KB per token), and reading one from the cold
//! tier (disk, Redis) otherwise comes before any work.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Result, Tensor};
use mistralrs_core::{AfterLayer, BlendAttentionCall, HookRow, LayerKvCall, LayerOutputCall};

use crate::cache::{AttnCache, Lookup};
use crate::kernels::exact_attention::AttentionParams;
use crate::reuse::blend::{self, BlendPolicy, CheckSignals, Selection};
use crate::storage::entry::{BlendStates, Entry, Payload};
use crate::storage::layer_kv::LayerKv;

/// What one row does in this forward.
#[derive(Debug)]
enum RowState {
    /// Computed exactly; `record`: its states are kept and stored after the last layer.
    Exact { record: bool },
    /// Its lookup is still running (on another thread); settled at the check layer.
    LookingUp(std::thread::JoinHandle<Lookup>),
    /// A stored neighbour (or the same tokens), to be settled at the check layer.
    Candidate(Neighbour),
    /// Layers after the check layer run on `positions` only (up to `resume_after`, when
    /// escalated: after it, every position).
    Blending {
        neighbour: Neighbour,
        positions: Arc<[u32]>,
        resume_after: Option<usize>,
    },
}

/// The stored blend entries a hit takes from and how the input's positions map onto them.
#[derive(Debug)]
struct Neighbour {
    /// The entries (at least one), their positions laid end to end in this order.
    entries: Vec<Arc<Entry>>,
    /// For each input position, the stored position it takes; `None`: itself (one entry).
    source: Option<Arc<[u32]>>,
    /// Input positions whose token differs from their source's (always recomputed).
    differing: Arc<[u32]>,
    /// A stored neighbour (not identical tokens): counted as a near hit when used.
    near: bool,
}

impl Neighbour {
    /// Every entry's blend states, in order.
    fn states(&self) -> Result<Vec<&BlendStates>> {
        self.entries
            .iter()
            .map(|e| match e.blend() {
                Some(b) => Ok(&**b),
                None => candle_core::bail!("blend hit on an entry without states"),
            })
            .collect()
    }

    /// The first entry's blend states (shapes, check layer: every entry is checked alike).
    fn first(&self) -> Result<&BlendStates> {
        match self.entries.first().map(|e| e.blend()) {
            Some(Some(b)) => Ok(&**b),
            Some(None) => candle_core::bail!("blend hit on an entry without states"),
            None => candle_core::bail!("a blend neighbour without entries"),
        }
    }

    /// `[L_stored, hidden]` states picked by `pick` from every entry, laid end to end (f32
    /// when there are several entries); `None` when an entry lacks them.
    fn joined(
        &self,
        pick: impl for<'a> Fn(&'a BlendStates) -> Option<&'a Tensor>,
    ) -> Result<Option<Tensor>> {
        let states = self.states()?;
        let Some(parts) = states
            .iter()
            .map(|s| pick(s))
            .collect::<Option<Vec<&Tensor>>>()
        else {
            return Ok(None);
        };
        match parts.as_slice() {
            [one] => Ok(Some((*one).clone())),
            many => {
                let f32s = many
                    .iter()
                    .map(|t| crate::kernels::f16_maps::to_f32(t))
                    .collect::<Result<Vec<Tensor>>>()?;
                Ok(Some(Tensor::cat(&f32s, 0)?))
            }
        }
    }

    /// Whether every entry fits a model of `n_layers` layers, `hidden` wide, checked after
    /// `check_layer`, with the first entry's kv heads and head size.
    fn fits(&self, n_layers: usize, check_layer: usize, hidden: usize) -> Result<bool> {
        let dims = self.first()?.dims();
        Ok(dims.2 == hidden
            && self.states()?.iter().all(|s| {
                s.kv.len() == n_layers && s.check_layer == check_layer && s.dims() == dims
            }))
    }

    /// Whether every entry kept its states after `layer` (an escalated hit resumes there).
    fn resumes_at(&self, layer: usize) -> Result<bool> {
        Ok(self.states()?.iter().all(
            |s| matches!(&s.resume, Some((at, t)) if *at == layer && t.dims() == s.last.dims()),
        ))
    }
}

#[derive(Debug)]
struct Row {
    seq_id: usize,
    request_id: usize,
    scope: usize,
    tokens: Arc<[u32]>,
    feature: Arc<[f32]>,
    state: RowState,
    /// Per layer `[2, kv_heads, L, d]` in the policy's K/V format, while the row records (or
    /// may still).
    kv: Vec<LayerKv>,
    /// `[L, hidden]` f32 after the check layer.
    check: Option<Tensor>,
    /// `[L, hidden]` f32 after the policy's resume layer.
    resume: Option<Tensor>,
}

impl Row {
    /// Whether this row's K/V of `layer` are kept.
    fn keeps(&self, layer: usize, policy: &BlendPolicy) -> bool {
        match self.state {
            RowState::Exact { record } => record,
            RowState::Candidate(_) | RowState::LookingUp(_) => layer <= policy.check_layer,
            RowState::Blending { .. } => false,
        }
    }

    /// Waits for a lookup still running and takes its outcome (a lookup that failed is a
    /// miss, not recorded).
    fn finish_lookup(&mut self, cache: &AttnCache, alone: bool) {
        if !matches!(self.state, RowState::LookingUp(_)) {
            return;
        }
        let RowState::LookingUp(handle) =
            std::mem::replace(&mut self.state, RowState::Exact { record: false })
        else {
            return;
        };
        let waited = Instant::now();
        match handle.join() {
            Ok(found) => {
                tracing::trace!(
                    waited_us = waited.elapsed().as_micros() as u64,
                    "blend lookup joined at the check layer"
                );
                self.state = row_state(
                    cache,
                    self.request_id,
                    self.scope,
                    &self.tokens,
                    found,
                    alone,
                );
            }
            Err(_) => tracing::warn!("a blend lookup failed: this input is computed exactly"),
        }
    }
}

/// Starts the lookup of a batch's only row on a thread of its own (the forward goes on with
/// layer 0 meanwhile); where no thread can be started, looks up at once.
fn look_up_meanwhile(
    cache: &Arc<AttnCache>,
    request_id: usize,
    tokens: &[u32],
    feature: &Arc<[f32]>,
) -> RowState {
    let (c, t, f) = (cache.clone(), tokens.to_vec(), feature.clone());
    let spawned = std::thread::Builder::new()
        .name("attncache-lookup".into())
        .spawn(move || c.lookup_for(request_id, &t, (!f.is_empty()).then_some(&f[..])));
    match spawned {
        Ok(handle) => RowState::LookingUp(handle),
        Err(e) => {
            tracing::debug!("cannot start a lookup thread, looking up at once: {e}");
            let f = (!feature.is_empty()).then_some(&feature[..]);
            let found = cache.lookup_for(request_id, tokens, f);
            let scope = cache.scope_of(request_id).unwrap_or(0);
            row_state(cache, request_id, scope, tokens, found, true)
        }
    }
}

/// What a row does after its lookup: a candidate (a batch of one only), or exact (recorded
/// when admitted); a hit that cannot be used counts as refused.
fn row_state(
    cache: &AttnCache,
    request_id: usize,
    scope: usize,
    tokens: &[u32],
    found: Lookup,
    alone: bool,
) -> RowState {
    match found {
        Lookup::Hit(entry) if alone => RowState::Candidate(Neighbour {
            entries: vec![entry],
            source: None,
            differing: Arc::from(Vec::new()),
            near: false,
        }),
        Lookup::Near {
            entry,
            recompute,
            alignment,
            spans,
            ..
        } if alone => RowState::Candidate(Neighbour {
            entries: std::iter::once(entry).chain(spans).collect(),
            source: alignment,
            differing: recompute.unwrap_or_else(|| Arc::from(Vec::new())),
            near: true,
        }),
        Lookup::Hit(_) => {
            cache.settle_blend(request_id, false, None);
            RowState::Exact { record: false } // stored already
        }
        Lookup::Near { .. } => {
            cache.settle_blend(request_id, true, None);
            RowState::Exact {
                record: cache.admits(scope, tokens),
            }
        }
        Lookup::Miss { record } => RowState::Exact { record },
    }
}

/// The blend plan of one forward pass.
#[derive(Debug)]
pub(crate) struct BlendForward {
    rows: Vec<Row>,
    policy: BlendPolicy,
    feature_id: u32,
    started: Instant,
}

impl BlendForward {
    /// Decides every row of a prefill batch at layer 0; `xs` is layer 0's normalised input
    /// `[b, L, hidden]` (features for the similarity lookup).
    pub(crate) fn decide(cache: &Arc<AttnCache>, rows: &[HookRow], xs: &Tensor) -> Result<Self> {
        let (_, len, _) = xs.dims3()?;
        let features = super::row_features::features_for(cache, rows, xs).unwrap_or_default();
        let policy = (*cache.blend_policy()).clone();
        let alone = rows.len() == 1;
        let rows = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let feature: Arc<[f32]> = features.get(i).cloned().unwrap_or_default().into();
                let scope = cache.scope_of(r.request_id).unwrap_or(0);
                let state =
                    if !r.is_prompt || r.tokens.len() != len || !cache.enabled_for(r.request_id) {
                        RowState::Exact { record: false }
                    } else if alone && policy.lookup_overlap_from.is_some_and(|n| len >= n) {
                        look_up_meanwhile(cache, r.request_id, &r.tokens, &feature)
                    } else {
                        let f = (!feature.is_empty()).then_some(&feature[..]);
                        let found = cache.lookup_for(r.request_id, &r.tokens, f);
                        row_state(cache, r.request_id, scope, &r.tokens, found, alone)
                    };
                Row {
                    seq_id: r.seq_id,
                    request_id: r.request_id,
                    scope,
                    tokens: Arc::from(r.tokens.as_slice()),
                    feature,
                    state,
                    kv: Vec::new(),
                    check: None,
                    resume: None,
                }
            })
            .collect();
        Ok(Self {
            rows,
            policy,
            feature_id: cache.features().id(),
            started: Instant::now(),
        })
    }

    /// Whether this plan was made for `rows`.
    pub(crate) fn is_for(&self, rows: &[HookRow]) -> bool {
        self.rows.len() == rows.len()
            && self
                .rows
                .iter()
                .zip(rows)
                .all(|(a, b)| a.seq_id == b.seq_id)
    }

    /// Whether any row still needs the hook (records, candidates, blends).
    pub(crate) fn is_active(&self) -> bool {
        self.rows
            .iter()
            .any(|r| !matches!(r.state, RowState::Exact { record: false }))
    }

    /// Keeps layer `call.layer_idx`'s K/V of the rows that need them.
    pub(crate) fn layer_kv(&mut self, call: &LayerKvCall<'_>) -> Result<()> {
        for (i, row) in self.rows.iter_mut().enumerate() {
            if !row.keeps(call.layer_idx, &self.policy) {
                continue;
            }
            if row.kv.len() != call.layer_idx {
                // a layer was missed: this row cannot be recorded
                row.state = RowState::Exact { record: false };
                row.kv.clear();
                continue;
            }
            let k = call.k.narrow(0, i, 1)?;
            let v = call.v.narrow(0, i, 1)?;
            row.kv.push(LayerKv::encode(
                &Tensor::cat(&[&k, &v], 0)?,
                self.policy.kv_format,
            )?);
        }
        Ok(())
    }

    /// What follows layer `call.layer_idx`. `Ok((action, done))`: `done` when the plan has
    /// nothing left to do (the caller drops it).
    pub(crate) fn after_layer(
        &mut self,
        cache: &AttnCache,
        call: &LayerOutputCall<'_>,
    ) -> Result<(AfterLayer, bool)> {
        let layer = call.layer_idx;
        let last = layer + 1 == call.n_layers;
        let mut action = AfterLayer::Continue;
        if layer == self.policy.check_layer {
            let alone = self.rows.len() == 1;
            for row in &mut self.rows {
                row.finish_lookup(cache, alone);
            }
            for (i, row) in self.rows.iter_mut().enumerate() {
                if row.keeps(layer, &self.policy) {
                    row.check = Some(call.xs.get(i)?.to_dtype(DType::F32)?);
                }
                if let RowState::Candidate(_) = row.state {
                    action = settle(cache, row, &call.xs.get(i)?, call.n_layers, &self.policy)?;
                }
            }
            return self.end_if_replaced(cache, call, action);
        }
        if self.policy.resume_layer == Some(layer) {
            for (i, row) in self.rows.iter_mut().enumerate() {
                if row.keeps(layer, &self.policy) {
                    row.resume = Some(call.xs.get(i)?.to_dtype(DType::F32)?);
                }
            }
        }
        if let Some(row) = self.rows.first_mut() {
            if let RowState::Blending {
                neighbour,
                positions,
                resume_after,
            } = &row.state
            {
                let stored = match resume_after {
                    Some(r) if *r == layer => match neighbour.joined(|s| resume_of(s, layer))? {
                        Some(t) => Some(t),
                        None => {
                            candle_core::bail!("escalated blend without states after layer {layer}")
                        }
                    },
                    _ if last => neighbour.joined(|s| Some(&s.last))?,
                    _ => None,
                };
                if let Some(stored) = stored {
                    let full = blend::final_states(
                        &stored,
                        neighbour.source.as_deref(),
                        positions,
                        &call.xs.get(0)?,
                    )?
                    .unsqueeze(0)?;
                    action = match last {
                        true => AfterLayer::Replace(full),
                        false => {
                            // escalated: every position from here on, computed exactly
                            row.state = RowState::Exact { record: false };
                            AfterLayer::Resume(full)
                        }
                    };
                }
            }
        }
        self.end_if_replaced(cache, call, action)
    }

    /// Ends the plan after a hit's output (or the last layer); otherwise goes on.
    fn end_if_replaced(
        &mut self,
        cache: &AttnCache,
        call: &LayerOutputCall<'_>,
        action: AfterLayer,
    ) -> Result<(AfterLayer, bool)> {
        let last = call.layer_idx + 1 == call.n_layers;
        if matches!(action, AfterLayer::Replace(_)) || last {
            self.finish(cache, call, matches!(action, AfterLayer::Replace(_)))?;
            return Ok((action, true));
        }
        Ok((action, false))
    }

    /// After the last layer (or a hit's output): stores the recorded rows.
    fn finish(
        &mut self,
        cache: &AttnCache,
        call: &LayerOutputCall<'_>,
        replaced: bool,
    ) -> Result<()> {
        cache.note_forward(self.started.elapsed().as_nanos() as u64, self.rows.len());
        if replaced || call.layer_idx + 1 != call.n_layers {
            return Ok(());
        }
        for (i, row) in self.rows.iter_mut().enumerate() {
            let recording = matches!(row.state, RowState::Exact { record: true });
            if !recording || row.kv.len() != call.n_layers {
                continue;
            }
            let Some(check) = row.check.take() else {
                continue;
            };
            let states = BlendStates {
                kv: std::mem::take(&mut row.kv),
                check,
                last: call.xs.get(i)?.to_dtype(DType::F32)?,
                check_layer: self.policy.check_layer,
                resume: self.policy.resume_layer.zip(row.resume.take()),
            };
            let entry = Entry {
                tokens: row.tokens.clone(),
                feature: row.feature.clone(),
                feature_id: self.feature_id,
                payload: Payload::Blend(Arc::new(states)),
            };
            cache.record_in(row.scope, entry);
        }
        Ok(())
    }

    /// Attention of a blended layer (the plan's single row).
    pub(crate) fn attention(&self, call: &BlendAttentionCall<'_>) -> Result<Tensor> {
        let Some(Row {
            state:
                RowState::Blending {
                    neighbour,
                    positions,
                    ..
                },
            ..
        }) = self.rows.first()
        else {
            candle_core::bail!("a blended layer ran without a blend hit");
        };
        // each entry's K/V of this layer (one short list a layer, no other copy)
        let kv = neighbour
            .entries
            .iter()
            .map(|e| e.blend().and_then(|b| b.kv.get(call.layer_idx)))
            .collect::<Option<Vec<&LayerKv>>>();
        let Some(kv) = kv else {
            candle_core::bail!("blend entry has no layer {}", call.layer_idx);
        };
        let (k_stored, v_stored) = blend::stored_kv(&kv, neighbour.source.as_deref())?;
        let params = AttentionParams::from_sdpa(call.params);
        let out = blend::attend(
            call.q,
            call.k,
            call.v,
            positions,
            &k_stored,
            &v_stored,
            call.rope,
            call.params.sliding_window,
            &params,
        )?;
        out.to_dtype(call.q.dtype())
    }
}

/// The states `states` kept after `layer` (an escalated hit resumes there), if it kept them.
fn resume_of(states: &BlendStates, layer: usize) -> Option<&Tensor> {
    match &states.resume {
        Some((at, t)) if *at == layer => Some(t),
        _ => None,
    }
}

/// Refuses the candidate `neighbour` of `row` at the check layer: counted as a miss, the
/// forward continues exactly from here, and the input is recorded when `may_record`, it is
/// not the neighbour itself and admission allows.
fn refuse(cache: &AttnCache, row: &mut Row, neighbour: &Neighbour, may_record: bool) -> AfterLayer {
    cache.settle_blend(row.request_id, neighbour.near, None);
    let record = may_record && (!neighbour.differing.is_empty() || neighbour.source.is_some());
    row.state = RowState::Exact {
        record: record && cache.admits(row.scope, &row.tokens),
    };
    AfterLayer::Continue
}

/// Settles a candidate row at the check layer from its states `xs` `[L, hidden]`: a blend
/// (S chosen, or the stored output at once when S is empty) or a refusal (exact from here).
fn settle(
    cache: &AttnCache,
    row: &mut Row,
    xs: &Tensor,
    n_layers: usize,
    policy: &BlendPolicy,
) -> Result<AfterLayer> {
    let RowState::Candidate(neighbour) =
        std::mem::replace(&mut row.state, RowState::Exact { record: false })
    else {
        return Ok(AfterLayer::Continue);
    };
    let (len, hidden) = xs.dims2()?;
    let usable =
        neighbour.fits(n_layers, policy.check_layer, hidden)? && policy.check_layer + 1 < n_layers;
    // a hit the fast rule refuses may be escalated: S only up to the resume layer
    let resume_layer = match policy.resume_layer {
        Some(r) if usable && r + 1 < n_layers && neighbour.resumes_at(r)? => Some(r),
        _ => None,
    };
    // the rules' candidate S in order (the fast rule's, then an escalated one), each with
    // what the check layer saw of it; the fidelity gate takes the first within its bound
    let mut candidates: Vec<(Vec<u32>, f32, Option<usize>, CheckSignals)> = Vec::new();
    if usable {
        let Some(stored) = neighbour.joined(|s| Some(&s.check))? else {
            candle_core::bail!("blend entry without check states");
        };
        let stored = crate::kernels::f16_maps::to_f32(&stored)?;
        let stored = match &neighbour.source {
            Some(src) => {
                stored.index_select(&Tensor::from_slice(src, src.len(), stored.device())?, 0)?
            }
            None => stored,
        };
        let fresh = xs.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let stored = stored.flatten_all()?.to_vec1::<f32>()?;
        let deviation = blend::deviations(&fresh, &stored, hidden);
        let pooled = blend::pooled_deviation(&fresh, &stored, hidden);
        let differing: Vec<usize> = neighbour.differing.iter().map(|&i| i as usize).collect();
        let moved_share = blend::moved_share(&deviation, &differing);
        let signals = |positions: &[u32], residual: f32| CheckSignals {
            pooled,
            stale: blend::stale_deviation(&deviation, positions),
            residual,
            moved_share,
        };
        // a shifted alignment (an insertion or deletion) changes the relative positions across
        // it in every global layer, which the check layer's sliding window cannot see: the
        // share that moved there says nothing of the rest, so no dilution (measured on
        // EmbeddingGemma, 8 tokens inserted mid-document: 0.9934 diluted vs 0.9971 without)
        // nor are edits in several places: the stale positions between them take what global
        // layers carry from each edit (blend-eval --trust, 100 documents of 274-1531 tokens
        // with 2-4 spans replaced: 4 of 51 diluted fast hits under 0.99, down to 0.969,
        // where single edits of long documents kept >= 0.9917)
        let undiluted;
        let several_edits = !blend::single_edit(&differing);
        let rule = match &neighbour.source {
            _ if several_edits && policy.dilution != 0.0 => {
                undiluted = BlendPolicy {
                    dilution: 0.0,
                    ..policy.clone()
                };
                &undiluted
            }
            Some(_) if policy.dilution != 0.0 => {
                undiluted = BlendPolicy {
                    dilution: 0.0,
                    ..policy.clone()
                };
                &undiluted
            }
            _ => policy,
        };
        match blend::select(&deviation, pooled, &differing, rule) {
            Selection::Accept {
                positions,
                residual,
            } => {
                let s = signals(&positions, residual);
                candidates.push((positions, residual, None, s));
            }
            refused => tracing::debug!(?refused, len, "the fast rule refused a blend hit"),
        }
        // escalation: when the fast rule refused, or the gate may refuse what it took
        let fast_passes = candidates.first().is_some_and(|(_, _, _, s)| {
            policy.gate.as_ref().is_none_or(|g| g.allows(len, false, s))
        });
        if let (Some(layer), false) = (resume_layer, fast_passes) {
            let e = blend::escalation(&deviation, &differing, policy.escalate_share);
            let s = signals(&e.positions, e.residual);
            candidates.push((e.positions, e.residual, Some(layer), s));
        }
    } else {
        tracing::debug!("blend entry of another shape or check layer: refused");
    }
    let mut gate_refused = None;
    let mut chosen = None;
    for (positions, residual, resume_after, s) in candidates {
        match &policy.gate {
            Some(g) if !g.allows(len, resume_after.is_some(), &s) => gate_refused = Some(s),
            _ => {
                chosen = Some((positions, residual, resume_after, s));
                break;
            }
        }
    }
    let Some((positions, residual, resume_after, signals)) = chosen else {
        if let Some(s) = gate_refused {
            tracing::debug!(len, ?s, "blend hit refused by the fidelity gate");
            cache.note_blend_gate_refused();
            cache.note_blend_check(row.request_id, s);
        }
        return Ok(refuse(cache, row, &neighbour, true));
    };
    if let Some(layer) = resume_after {
        tracing::debug!(len, layer, "blend hit escalated at the check layer");
    }
    let gain = blend::predicted_gain(
        len,
        positions.len(),
        n_layers,
        policy.check_layer,
        resume_after,
        policy.fixed_tokens,
    );
    if gain < f64::from(policy.min_gain) {
        tracing::debug!(
            len,
            recomputed = positions.len(),
            gain,
            "blend hit refused at the check layer: it would not pay"
        );
        cache.note_blend_unprofitable();
        // not recorded either: a near duplicate of it would not pay any better, and
        // recording (its K/V kept per layer) is what a refusal would cost most
        return Ok(refuse(cache, row, &neighbour, false));
    }
    cache.settle_blend(
        row.request_id,
        neighbour.near,
        Some((positions.len(), residual)),
    );
    cache.note_blend_check(row.request_id, signals);
    if let Some(layer) = resume_after {
        cache.note_blend_escalation(row.request_id, layer);
    }
    row.kv.clear();
    row.check = None;
    row.resume = None;
    if positions.is_empty() {
        let Some(last) = neighbour.joined(|s| Some(&s.last))? else {
            candle_core::bail!("blend entry without final states");
        };
        let full = blend::final_states(&last, neighbour.source.as_deref(), &[], xs)?;
        return Ok(AfterLayer::Replace(full.unsqueeze(0)?));
    }
    let idx = Tensor::from_slice(&positions, positions.len(), xs.device())?;
    row.state = RowState::Blending {
        neighbour,
        positions: positions.into(),
        resume_after,
    };
    Ok(AfterLayer::Blend(idx))
}
