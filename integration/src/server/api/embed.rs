//! Embedding inputs, the path every route shares: the request's cache flag
//! ([`request_flag`], [`CacheUse`]), admission (`--max-in-flight`), the exact-repeat memo
//! ([`Remembered`]), the queue in front of mistral.rs, and one mistral.rs request per input
//! with a [`attncache_plugin::RequestTicket`] that owns its flag, scope and decision.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use axum::http::HeaderMap;
use mistralrs_core::{
    Constraint, NormalRequest, Request, RequestMessage, Response as ModelResponse, SamplingParams,
};

use super::error::ApiError;
use super::inputs::Prompt;
use super::outcome::{InputOutcome, InputReport};
use super::ApiState;
use attncache_plugin::Decision;

/// Header that sets the cache flag of a request.
pub const FLAG_HEADER: &str = "x-attn-cache";

/// A remembered flag-on result, for exact repeats.
#[derive(Debug)]
pub struct Remembered {
    scope: Option<usize>,
    prompt: Prompt,
    embedding: Vec<f32>,
    prompt_tokens: usize,
}

impl Remembered {
    /// Bytes it holds (for the memo's weigher).
    pub fn bytes(&self) -> u32 {
        let input = match &self.prompt {
            Prompt::Text(t) => t.len(),
            Prompt::Tokens(t) => 4 * t.len(),
        };
        u32::try_from(input + 4 * self.embedding.len() + 64).unwrap_or(u32::MAX)
    }
}

/// The memo's key of `prompt` (as the model receives it: after truncation) in `scope`.
fn memo_key(scope: Option<usize>, prompt: &Prompt) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (scope, prompt).hash(&mut h);
    h.finish()
}

/// What a request may use: whether the cache is on for it, and its scope (`Some`
/// only under `--cache-scope per-key`: the index of the API key it came with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUse {
    /// The cache is on for this request.
    pub on: bool,
    /// Its scope, when each API key has its own (`--cache-scope per-key`).
    pub scope: Option<usize>,
}

impl CacheUse {
    /// Resolves the flag (see [`request_flag`]) and the scope of `key_id`'s requests.
    pub fn resolve(
        state: &ApiState,
        headers: &HeaderMap,
        body: Option<bool>,
        key_id: Option<super::auth::ApiKeyId>,
    ) -> Result<Self, ApiError> {
        let on = request_flag(headers, body, state.cache.enabled_by_default())?;
        let scoped_per_key = !state.cache.config().scopes.is_empty();
        Ok(Self {
            on,
            scope: key_id.filter(|_| scoped_per_key).map(|t| t.0),
        })
    }
}

/// Whether a request uses the cache: the header or the body field (they may not disagree),
/// else the deployment default.
pub fn request_flag(
    headers: &HeaderMap,
    body: Option<bool>,
    default: bool,
) -> Result<bool, ApiError> {
    let header = match headers.get(FLAG_HEADER) {
        None => None,
        Some(v) => match v.to_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
            Ok("on" | "true" | "1") => Some(true),
            Ok("off" | "false" | "0") => Some(false),
            _ => {
                return Err(ApiError::invalid(
                    Some("X-Attn-Cache"),
                    "header X-Attn-Cache must be `on` or `off`",
                ))
            }
        },
    };
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::invalid(
            Some("attn_cache"),
            format!(
                "X-Attn-Cache header says {} but attn_cache says {b}",
                if h { "on" } else { "off" }
            ),
        )),
        (h, b) => Ok(h.or(b).unwrap_or(default)),
    }
}

/// One input's embedding and what the cache did for it.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The full-size embedding.
    pub embedding: Vec<f32>,
    /// Its token count.
    pub prompt_tokens: usize,
    /// The cache outcome.
    pub outcome: InputOutcome,
    /// What the cache's lookup decided, when it looked the input up.
    pub detail: Option<Decision>,
    /// Tokens cut by truncation before the model saw the input.
    pub truncated: usize,
}

impl Embedded {
    /// The per-input report of this result at position `index`.
    pub fn report(&self, index: usize) -> InputReport {
        let mut r = InputReport::new(index, self.outcome, self.detail.as_ref());
        r.truncated_tokens = (self.truncated > 0).then_some(self.truncated as u32);
        r
    }
}

/// Embeds every prompt concurrently (the scheduler batches them), in input order.
pub async fn embed_all(
    state: &Arc<ApiState>,
    prompts: Vec<super::inputs::Prepared>,
    cache: CacheUse,
) -> Result<Vec<Embedded>, ApiError> {
    let wanted = u32::try_from(prompts.len()).unwrap_or(u32::MAX);
    let _permits = state
        .in_flight
        .clone()
        .try_acquire_many_owned(wanted)
        .map_err(|_| {
            ApiError::busy(format!(
                "the server is busy: {} inputs may be in flight at once (--max-in-flight), this \
                 request has {}; retry shortly or send fewer inputs",
                state.max_in_flight,
                prompts.len()
            ))
        })?;
    // exact repeats are answered at once; the rest join the engine's queue in input order,
    // each in a task that waits for its place
    let mut results = Vec::with_capacity(prompts.len());
    let mut tasks = tokio::task::JoinSet::new();
    for (index, prepared) in prompts.into_iter().enumerate() {
        if let Some(e) = remembered(state, &prepared.prompt, cache) {
            // the memo holds the truncated prompt: a repeat was cut as its first answer was
            let truncated = prepared.truncated;
            results.push((index, Embedded { truncated, ..e }));
            continue;
        }
        let queued = state.engine.join(prepared.tokens);
        let state = state.clone();
        tasks.spawn(async move {
            let _place = queued.place().await;
            // kept only when near blend hits are audited
            let to_audit = state.audit.as_ref().map(|_| prepared.prompt.clone());
            let result = embed_one(state.clone(), prepared.prompt, cache)
                .await
                .map(|e| Embedded {
                    truncated: prepared.truncated,
                    ..e
                });
            if let (Ok(e), Some(prompt)) = (&result, to_audit) {
                if super::audit::is_near_blend_hit(e.detail.as_ref()) {
                    let flag_off = CacheUse { on: false, ..cache };
                    let exact = embed_one(state.clone(), prompt, flag_off);
                    let exact = async move { exact.await.map(|e| e.embedding) };
                    super::audit::maybe_audit(&state, prepared.tokens, e.embedding.clone(), exact);
                }
            }
            (index, result)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined.map_err(|e| ApiError::internal(e.to_string()))?;
        results.push((index, result?));
    }
    results.sort_by_key(|(i, _)| *i);
    for (_, e) in &results {
        let lookup_us = e.detail.map(|d| d.lookup_ns as f64 / 1e3);
        state.metrics.input(e.outcome, lookup_us);
    }
    Ok(results.into_iter().map(|(_, e)| e).collect())
}

/// The remembered answer to a flag-on exact repeat of `prompt`, if the memo has one.
fn remembered(state: &ApiState, prompt: &Prompt, cache: CacheUse) -> Option<Embedded> {
    if !cache.on {
        return None;
    }
    let key = memo_key(cache.scope, prompt);
    let m = state.memo.as_ref()?.get(&key)?;
    (m.scope == cache.scope && &m.prompt == prompt).then(|| Embedded {
        embedding: m.embedding.clone(),
        prompt_tokens: m.prompt_tokens,
        outcome: InputOutcome::ExactRepeat,
        detail: None,
        truncated: 0,
    })
}

/// Embeds one input through mistral.rs.
async fn embed_one(
    state: Arc<ApiState>,
    prompt: Prompt,
    cache: CacheUse,
) -> Result<Embedded, ApiError> {
    let flag = cache.on;
    let key = memo_key(cache.scope, &prompt);
    let id = state.mistral.next_request_id();
    // the request's flag and scope, for the hook; forgotten when the ticket drops,
    // however this future ends (answer, error or cancellation)
    let ticket = state
        .cache
        .ticket(id, Some(flag), cache.scope)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let (tx, mut rx) = mistralrs_server_core::handler_core::create_response_channel(Some(1));
    let messages = match &prompt {
        Prompt::Text(t) => RequestMessage::Embedding { prompt: t.clone() },
        Prompt::Tokens(t) => RequestMessage::EmbeddingTokens { prompt: t.clone() },
    };
    let request = Request::Normal(Box::new(NormalRequest {
        id,
        messages,
        sampling_params: SamplingParams::deterministic(),
        response: tx,
        return_logprobs: false,
        is_streaming: false,
        suffix: None,
        constraint: Constraint::None,
        tool_choice: None,
        tools: None,
        logits_processors: None,
        return_raw_logits: false,
        web_search_options: None,
        model_id: None,
        // inputs arrive cut (see `inputs::prepare`), or refused there when over-long and
        // not to be cut: mistral.rs never truncates one itself
        truncate_sequence: false,
    }));
    mistralrs_server_core::handler_core::send_request_with_model(&state.mistral, request, None)
        .await
        .map_err(|e| ApiError::internal(format!("cannot reach the model: {e}")))?;
    let (embedding, prompt_tokens) = match rx.recv().await {
        Some(ModelResponse::Embeddings {
            embeddings,
            prompt_tokens,
            ..
        }) => (embeddings, prompt_tokens),
        Some(ModelResponse::ValidationError(e)) => {
            return Err(ApiError::invalid(Some("input"), e.to_string()));
        }
        Some(ModelResponse::InternalError(e)) => return Err(ApiError::internal(e.to_string())),
        Some(ModelResponse::ModelError(msg, _)) => return Err(ApiError::internal(msg)),
        Some(_) => return Err(ApiError::internal("unexpected response from the model")),
        None => return Err(ApiError::internal("the model dropped the request")),
    };
    if embedding.iter().any(|v| !v.is_finite()) {
        return Err(ApiError::internal(
            "the model produced a non-finite embedding",
        ));
    }
    let decision = ticket.take_decision();
    let outcome = InputOutcome::of_run(flag, decision.map(|d| d.outcome));
    if let (true, Some(memo)) = (outcome.remembered(), &state.memo) {
        memo.insert(
            key,
            Arc::new(Remembered {
                scope: cache.scope,
                prompt,
                embedding: embedding.clone(),
                prompt_tokens,
            }),
        );
    }
    let detail = decision;
    Ok(Embedded {
        embedding,
        prompt_tokens,
        outcome,
        detail,
        truncated: 0,
    })
}
