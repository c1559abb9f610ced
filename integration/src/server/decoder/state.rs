//! What a decoder's routes share: the served state ([`DecoderState`]), running a set of
//! prompts through one prefill ([`prefill_all`]) and the per-input cache report.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mistralrs_server_core::types::SharedMistralRsState;
use serde::Serialize;

use super::model::DecoderModel;
use super::prefill::{last_logits, LastLogits};
use super::score_setup::ScoreSetup;
use super::weights::DecoderWeights;
use crate::server::api::error::ApiError;
use attncache_plugin::AttnCacheHook;

/// Most inputs in one request.
pub const MAX_INPUTS: usize = 64;
/// Prompt tokens of one request the engine is given at once: a request's inputs go in
/// waves of at most this many tokens (at least one input each), one wave after another.
/// Short prompts still share a forward; long ones run one by one, which on 2 cores was
/// faster: 16 prompts of 800 tokens took 24.4–26.5 s given at once against 20.7–22.9 s
/// as 16 requests one after another (SmolLM2-135M, interleaved).
pub const WAVE_TOKENS: usize = 1024;
/// Most labels in one request.
pub const MAX_LABELS: usize = 64;

/// What the decoder routes share.
pub struct DecoderState {
    /// mistral.rs, loaded with the decoder.
    pub mistral: SharedMistralRsState,
    /// The served file.
    pub model: DecoderModel,
    /// Inputs admitted at once (`--max-in-flight`); more are answered 429.
    pub in_flight: Arc<tokio::sync::Semaphore>,
    pub(super) max_in_flight: usize,
    next_id: AtomicUsize,
    pub(super) hook: Arc<AttnCacheHook>,
    pub(super) weights: DecoderWeights,
    pub(super) cache_by_default: bool,
    /// `/v1/score` and `/v1/rerank`'s template and words.
    pub(super) score: ScoreSetup,
    /// What `GET /metrics` reports.
    pub(super) metrics: Arc<super::metrics::DecoderMetrics>,
    /// The decoder blend gate file (`--blend-gate`), as it says, for `/info`.
    pub(super) blend_gate: Option<serde_json::Value>,
}

impl DecoderState {
    /// State for `model`, loaded in `mistral` with `weights` and the installed `hook`,
    /// admitting `max_in_flight` inputs at once; `cache_by_default`: requests that do not
    /// say use the prefix store; `score`: how `/v1/score` and `/v1/rerank` read a pair.
    pub fn new(
        mistral: SharedMistralRsState,
        model: DecoderModel,
        max_in_flight: usize,
        hook: Arc<AttnCacheHook>,
        weights: DecoderWeights,
        cache_by_default: bool,
        score: ScoreSetup,
    ) -> Self {
        let metrics = Arc::new(super::metrics::DecoderMetrics::new(&hook));
        Self {
            mistral,
            model,
            in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_in_flight,
            next_id: AtomicUsize::new(0),
            hook,
            weights,
            cache_by_default,
            score,
            metrics,
            blend_gate: None,
        }
    }

    /// The same with the decoder blend gate file's contents shown in `/info`.
    pub fn with_blend_gate(mut self, gate: Option<serde_json::Value>) -> Self {
        self.blend_gate = gate;
        self
    }

    /// A new number for a response's id.
    pub(super) fn request_id(&self) -> usize {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// What the cache did for a request on a decoder.
#[derive(Debug, Clone, Serialize)]
pub struct DecoderCacheReport {
    /// Whether the request used the cache.
    pub enabled: bool,
    /// Per input.
    pub inputs: Vec<PrefixReport>,
}

/// What the store gave one input with the cache flag on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Reused {
    /// Prompt tokens whose K/V came from the store, exact.
    pub tokens: usize,
    /// What decoder blend did past them, if it blended.
    pub blend: Option<attncache_plugin::BlendOutcome>,
    /// What decoder map reuse did (`--decoder-maps`).
    pub maps: Option<attncache_plugin::MapsOutcome>,
}

/// What the prefix store gave one input.
#[derive(Debug, Clone, Serialize)]
pub struct PrefixReport {
    /// Position of the input.
    pub index: usize,
    /// `off` (flag off), `prefix_hit` (a stored prefix's K/V was used, the rest computed),
    /// `maps_hit` (`--decoder-maps`: a stored prompt's attention maps were used),
    /// `blend_hit` (past the stored prefix, a stored prompt's K/V was used at the positions
    /// not recomputed: approximate), `blend_refused` (a blend was planned but its stale
    /// deviation was over the bound: computed exactly past the prefix) or `miss`.
    pub outcome: &'static str,
    /// Prompt tokens whose K/V came from the store exactly (a stored prefix).
    pub prefix_tokens: usize,
    /// `blend_hit`: positions after the prefix recomputed past the check layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recomputed: Option<usize>,
    /// `blend_hit`: positions after the prefix whose K/V past the check layer came from the
    /// stored prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blended: Option<usize>,
    /// `blend_hit`, `blend_refused`: the largest check-layer V deviation among the positions
    /// whose stored K/V were (or would have been) kept (what the blend left stale;
    /// `--decoder-blend-stale-below` or the `--blend-gate` file bounds it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_deviation: Option<f32>,
    /// `blend_hit`, `blend_refused`: the kept positions' check-layer V deviation summed over
    /// the prompt's length (exact and recomputed positions count 0): the mean staleness,
    /// reported for calibration, not bounded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale_mean: Option<f32>,
    /// `maps_hit`: tokens of the exact prefix shared with the stored prompt whose attention
    /// maps were used (their rows are the stored ones; the rows after them are approximate
    /// unless `--decoder-maps-recompute-rest`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maps_shared: Option<usize>,
}

impl PrefixReport {
    /// The report of input `index`; `reused`: `None` with the flag off, else what the
    /// store gave.
    pub(super) fn new(index: usize, reused: Option<Reused>) -> Self {
        let maps_hit = match reused.and_then(|r| r.maps) {
            Some(attncache_plugin::MapsOutcome::Hit { shared, .. }) => Some(shared),
            _ => None,
        };
        let outcome = match reused {
            None => "off",
            Some(_) if maps_hit.is_some() => "maps_hit",
            Some(Reused { blend: Some(b), .. }) if b.refused => "blend_refused",
            Some(Reused { blend: Some(_), .. }) => "blend_hit",
            Some(Reused { tokens: 0, .. }) => "miss",
            Some(_) => "prefix_hit",
        };
        let blend = reused.and_then(|r| r.blend);
        let hit = blend.filter(|b| !b.refused);
        Self {
            index,
            outcome,
            prefix_tokens: reused.map_or(0, |r| r.tokens),
            recomputed: hit.map(|b| b.recomputed),
            blended: hit.map(|b| b.reused),
            stale_deviation: blend.map(|b| b.stale_deviation),
            stale_mean: blend.map(|b| b.stale_mean),
            maps_shared: maps_hit,
        }
    }
}

/// Tokens read.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Prompt tokens over all inputs.
    pub prompt_tokens: usize,
    /// The same (nothing is generated).
    pub total_tokens: usize,
}

/// `model` when a request leaves it out.
pub(super) fn default_model() -> String {
    "default".into()
}

/// A decoder route's answer in vLLM's list shape (`/classify`, `/score`), with the cache
/// report.
#[derive(Debug, Clone, Serialize)]
pub struct ListResponse<T> {
    /// `classify-N`, `score-N`.
    pub id: String,
    /// `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The served model's id.
    pub model: String,
    /// One per input, in order.
    pub data: Vec<T>,
    /// Tokens read.
    pub usage: Usage,
    /// What the prefix store did for each input.
    pub attn_cache: DecoderCacheReport,
}

impl<T> ListResponse<T> {
    /// The answer of route `kind` (`classify`, `score`) from `data` after reading `tokens`.
    pub(super) fn new(
        kind: &str,
        state: &DecoderState,
        data: Vec<T>,
        tokens: usize,
        attn_cache: DecoderCacheReport,
    ) -> Self {
        Self {
            id: format!("{kind}-{}", state.request_id()),
            object: "list",
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: state.model.id(),
            data,
            usage: Usage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
            attn_cache,
        }
    }
}

/// A 400 when prompt `i` of `param` cannot be read: empty (no last position) or longer
/// than the model's context.
pub(super) fn check_prompt(
    state: &DecoderState,
    param: &'static str,
    i: usize,
    tokens: &[u32],
) -> Result<(), ApiError> {
    if tokens.is_empty() {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} {i} is empty: there is no last position to read"),
        ));
    }
    if tokens.len() > state.model.context_length {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "{param} {i} is {} tokens, over the model's context of {}",
                tokens.len(),
                state.model.context_length
            ),
        ));
    }
    Ok(())
}

/// Which rows of the output head a prefill needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum HeadRows {
    /// Every vocabulary row (the log-sum-exp of [`LastLogits`] is over the vocabulary).
    All,
    /// The asked ids' rows only, when the batch allows it (the log-sum-exp is then over
    /// those ids: not a vocabulary log-probability).
    Asked,
}

/// Every prompt through one prefill at once (mistral.rs batches the ones of equal length):
/// the logits of `ids` at each one's last position and, with `use_cache`, the prompt tokens
/// the prefix store gave it; in `prompts` order. 429 when `--max-in-flight` is reached.
pub(super) async fn prefill_all(
    state: &Arc<DecoderState>,
    prompts: Vec<Vec<u32>>,
    ids: Arc<[u32]>,
    use_cache: bool,
    head: HeadRows,
) -> Result<Vec<(LastLogits, Option<Reused>)>, ApiError> {
    let permits = u32::try_from(prompts.len()).unwrap_or(u32::MAX);
    let _permit = state
        .in_flight
        .clone()
        .try_acquire_many_owned(permits)
        .map_err(|_| {
            ApiError::busy(format!(
                "{} inputs are already in flight (--max-in-flight {}): retry shortly",
                state.max_in_flight - state.in_flight.available_permits(),
                state.max_in_flight
            ))
        })?;
    // with the cache flag, a first prompt whose head others share (a rerank query before
    // each document, a few-shot head) runs alone: its K/V is stored when its prompt step
    // ends, so the others then compute only their own part
    let first_alone = use_cache
        && prompts.iter().skip(1).any(|p| {
            let shared = p
                .iter()
                .zip(&prompts[0])
                .take_while(|(a, b)| a == b)
                .count();
            shared >= super::PREFIX_BLOCK_TOKENS
        });
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut prompts: Vec<Option<Vec<u32>>> = prompts.into_iter().map(Some).collect();
    let mut results = Vec::with_capacity(permits as usize);
    for wave in waves(&lens, first_alone, WAVE_TOKENS) {
        let mut tasks = tokio::task::JoinSet::new();
        for index in wave {
            let Some(prompt) = prompts[index].take() else {
                continue;
            };
            let (state, ids) = (state.clone(), ids.clone());
            let id = state.request_id();
            tasks.spawn(async move {
                // the prefix store serves and keeps this prompt while the ticket lives
                // with --decoder-maps the cache reuses maps instead of prefixes (on top of
                // them with --decoder-maps-over-prefix)
                let maps = use_cache.then(|| state.hook.maps_ticket(id)).flatten();
                let over_prefix = state
                    .hook
                    .decoder_maps_policy()
                    .is_some_and(|p| p.over_prefix);
                let ticket = (use_cache && (maps.is_none() || over_prefix))
                    .then(|| state.hook.prefix_ticket(id))
                    .flatten();
                let _rows = (head == HeadRows::Asked)
                    .then(|| state.hook.label_rows_ticket(id, ids.clone()));
                let got = last_logits(&state.mistral, id, prompt, ids).await;
                let reused = match (ticket, maps) {
                    (Some(t), m) => Some(Reused {
                        tokens: t.reused_tokens(),
                        blend: t.blend(),
                        maps: m.and_then(|m| m.outcome()),
                    }),
                    (None, Some(m)) => Some(Reused {
                        maps: m.outcome(),
                        ..Reused::default()
                    }),
                    (None, None) => None,
                };
                (index, got.map(|g| (g, reused)))
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (index, got) =
                done.map_err(|e| ApiError::internal(format!("an input failed: {e}")))?;
            results.push((index, got?));
        }
    }
    results.sort_by_key(|(i, _)| *i);
    Ok(results.into_iter().map(|(_, r)| r).collect())
}

/// The waves a request's prompts of lengths `lens` run in, in order: consecutive inputs
/// up to `budget` tokens a wave (at least one); with `first_alone`, the first prompt is a
/// wave of its own.
fn waves(lens: &[usize], first_alone: bool, budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    if first_alone && !lens.is_empty() {
        out.push(0..1);
        start = 1;
    }
    let mut tokens = 0;
    for (i, &len) in lens.iter().enumerate().skip(start) {
        if i > start && tokens + len > budget {
            out.push(start..i);
            (start, tokens) = (i, 0);
        }
        tokens += len;
    }
    if start < lens.len() {
        out.push(start..lens.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::waves;

    #[test]
    fn waves_fill_the_token_budget_in_order_and_can_start_with_the_first_alone() {
        assert_eq!(waves(&[800; 3], false, 1024), vec![0..1, 1..2, 2..3]);
        assert_eq!(waves(&[200; 6], false, 1024), vec![0..5, 5..6]);
        assert_eq!(waves(&[50; 4], true, 1024), vec![0..1, 1..4]);
        assert_eq!(waves(&[2000, 10, 10], false, 1024), vec![0..1, 1..3]);
        assert_eq!(waves(&[5], true, 1024), vec![0..1]);
        assert!(waves(&[], true, 1024).is_empty());
        // every index exactly once, in order
        let lens = [300, 900, 100, 100, 1500, 20];
        let all: Vec<usize> = waves(&lens, true, 1024).into_iter().flatten().collect();
        assert_eq!(all, (0..lens.len()).collect::<Vec<_>>());
    }
}
