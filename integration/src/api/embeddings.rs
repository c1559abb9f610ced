//! `POST /v1/embeddings`, OpenAI-compatible, with the per-request attention-map cache flag.
//!
//! - `input`: a string, an array of strings, an array of token ids, or an array of arrays
//!   of token ids (at most [`MAX_INPUTS`]);
//! - `encoding_format`: `float` (default) or `base64` (little-endian f32);
//! - `dimensions`: Matryoshka truncation and renormalisation where the model was trained
//!   for it (EmbeddingGemma: 768/512/256/128), 400 otherwise;
//! - `user`: accepted and ignored;
//! - `prompt_name` (or `task`): a task prompt of the model put before each text, as
//!   sentence-transformers does (see [`super::inputs`]);
//! - `truncate` (or mistral.rs's `truncate_sequence`) and `truncation_direction`: cut
//!   over-long inputs from the right (default) or the left; the report says how many tokens;
//! - the cache flag: body `"attn_cache": true|false` (the official client's `extra_body`) or
//!   header `X-Attn-Cache: on|off`; either overrides the server default, and the two may not
//!   disagree. With the flag off an input is computed by the exact path, as without cache;
//!   with it on, an input seen before with the flag on is an *exact repeat* (its embedding
//!   is returned without a forward), otherwise the cache decides hit / near hit / miss.
//!
//! The response carries an extra `attn_cache` object (clients ignore unknown fields): per
//! input the outcome, the stored-entry distance and the lookup time.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};
use base64::Engine;
use mistralrs_core::{
    Constraint, NormalRequest, Request, RequestMessage, Response as ModelResponse, SamplingParams,
};
use serde::{Deserialize, Serialize};

use super::body::Field;
use super::error::ApiError;
pub use super::inputs::Prompt;
use super::outcome::InputOutcome;
use super::ApiState;
use attncache_plugin::{Decision, Outcome};

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Header that sets the cache flag of a request.
pub const FLAG_HEADER: &str = "x-attn-cache";

/// The request body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    /// Model name: `default`, the served directory's name, or its path.
    #[serde(default = "default_model")]
    pub model: String,
    /// What to embed.
    pub input: Input,
    /// `float` or `base64`.
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Matryoshka output size.
    #[serde(default)]
    pub dimensions: Option<usize>,
    /// End-user id (accepted, ignored).
    #[serde(default)]
    pub user: Option<String>,
    /// mistral.rs: truncate inputs longer than the model's context instead of failing.
    #[serde(default)]
    pub truncate_sequence: Option<bool>,
    /// TEI: truncate inputs longer than the model's context instead of failing.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// TEI: which end truncation cuts (`right`, the default, or `left`).
    #[serde(default)]
    pub truncation_direction: Option<crate::model_text::TruncationDirection>,
    /// TEI / sentence-transformers: a task prompt of the model put before each text.
    #[serde(default, alias = "task")]
    pub prompt_name: Option<String>,
    /// Use the attention-map cache for this request (overrides the server default).
    #[serde(default)]
    pub attn_cache: Option<bool>,
}

impl EmbeddingRequest {
    /// The prompt and truncation fields.
    pub fn input_options(&self) -> super::inputs::InputOptions {
        super::inputs::InputOptions {
            prompt_name: self.prompt_name.clone(),
            truncate: self.truncate,
            truncate_sequence: self.truncate_sequence,
            truncation_direction: self.truncation_direction,
            max_tokens: None,
        }
    }
}

/// `model` when a request leaves it out.
pub(super) fn default_model() -> String {
    "default".into()
}

/// `input` in its four OpenAI shapes.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Input {
    /// One string.
    Text(String),
    /// Several strings.
    Texts(Vec<String>),
    /// One tokenised input.
    Tokens(Vec<u32>),
    /// Several tokenised inputs.
    TokenBatch(Vec<Vec<u32>>),
}

/// `encoding_format`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// JSON array of numbers.
    Float,
    /// Base64 of little-endian f32.
    Base64,
}

/// The response body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EmbeddingResponse {
    /// Always `list`.
    pub object: &'static str,
    /// One embedding per input, in input order.
    pub data: Vec<EmbeddingData>,
    /// The model name.
    pub model: String,
    /// Token counts.
    pub usage: Usage,
    /// What the cache did.
    pub attn_cache: CacheReport,
}

/// One embedding.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: &'static str,
    /// Position of the input.
    pub index: usize,
    /// The vector (numbers or base64).
    pub embedding: Vector,
}

/// An embedding as numbers or base64.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Vector {
    /// Numbers.
    Float(Vec<f32>),
    /// Base64 of little-endian f32.
    Base64(String),
}

/// `usage`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct Usage {
    /// Tokens of all inputs.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens` (no completion).
    pub total_tokens: usize,
}

/// `attn_cache` in a response.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CacheReport {
    /// Whether the request used the cache.
    pub enabled: bool,
    /// Per input.
    pub inputs: Vec<InputReport>,
}

/// What the cache did for one input.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct InputReport {
    /// Position of the input.
    pub index: usize,
    /// `off`, `exact_repeat`, `hit`, `near_hit`, `miss` or `not_cached` (outside the
    /// cached length range).
    pub outcome: InputOutcome,
    /// Feature distance to the stored entry used (0 for an identical one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distance: Option<f32>,
    /// Time of the cache lookup, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup_us: Option<f64>,
    /// Near hits: positions whose token differs from the neighbour's (after alignment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub differing_tokens: Option<u32>,
    /// Near hits decided by the error gate: its predicted 1 − cosine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_error: Option<f32>,
    /// Near hits with selective recompute: attention rows recomputed per reused layer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recomputed_rows: Option<u32>,
    /// Blend hits (`--reuse blend`): positions the layers after the check layer recomputed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recomputed_tokens: Option<u32>,
    /// Blend hits: the largest check-layer deviation left outside the recomputed positions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_deviation: Option<f32>,
    /// Tokens truncation cut from the input (`truncate`, `--auto-truncate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_tokens: Option<u32>,
}

impl InputReport {
    /// The report of input `index` whose cache outcome is `outcome`, with the lookup's
    /// decision when the cache looked it up.
    pub fn new(index: usize, outcome: InputOutcome, decision: Option<&Decision>) -> Self {
        let near = decision.filter(|d| d.outcome == Outcome::NearHit);
        Self {
            index,
            outcome,
            distance: decision.and_then(|d| d.distance).filter(|d| d.is_finite()),
            lookup_us: decision.map(|d| d.lookup_ns as f64 / 1e3),
            differing_tokens: near.and_then(|d| d.differing),
            predicted_error: near.and_then(|d| d.predicted_loss),
            recomputed_rows: near
                .filter(|d| d.residual_deviation.is_none())
                .map(|d| d.recomputed_rows)
                .filter(|r| *r > 0),
            recomputed_tokens: decision
                .and_then(|d| d.residual_deviation.map(|_| d.recomputed_rows)),
            residual_deviation: decision.and_then(|d| d.residual_deviation),
            truncated_tokens: None,
        }
    }
}

/// A remembered flag-on result, for exact repeats.
#[derive(Debug)]
pub struct Remembered {
    scope: Option<usize>,
    prompt: Prompt,
    truncate: bool,
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

fn memo_key(scope: Option<usize>, prompt: &Prompt, truncate: bool) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (scope, prompt, truncate).hash(&mut h);
    h.finish()
}

/// What a request may use: whether the cache is on for it, and its partition (`Some`
/// only under `--cache-scope per-key`: the index of the API key it came with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheUse {
    /// The cache is on for this request.
    pub on: bool,
    /// Its partition, when the cache is partitioned by key.
    pub scope: Option<usize>,
}

impl CacheUse {
    /// Resolves the flag (see [`request_flag`]) and the partition of `tenant`'s requests.
    pub fn resolve(
        state: &ApiState,
        headers: &HeaderMap,
        body: Option<bool>,
        tenant: Option<super::auth::Tenant>,
    ) -> Result<Self, ApiError> {
        let on = request_flag(headers, body, state.cache.enabled_by_default())?;
        let partitioned = !state.cache.config().scopes.is_empty();
        Ok(Self {
            on,
            scope: tenant.filter(|_| partitioned).map(|t| t.0),
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

/// Parses and checks the body; every problem is a 400 naming the field.
pub fn parse(value: serde_json::Value) -> Result<EmbeddingRequest, ApiError> {
    super::body::parse(value, FIELDS)
}

/// [`EmbeddingRequest`]'s fields, as errors name them.
const FIELDS: &[Field] = &[
    Field::new("model"),
    Field::new("input").hint(
        "input must be a string, an array of strings, an array of token ids (integers from 0 \
         to 2^32-1), or an array of such arrays",
    ),
    Field::new("encoding_format").hint("encoding_format must be `float` or `base64`"),
    Field::new("dimensions"),
    Field::new("user"),
    Field::new("truncate_sequence"),
    Field::new("truncate"),
    Field::new("truncation_direction").hint("truncation_direction must be `right` or `left`"),
    Field::new("prompt_name"),
    Field::alias("task", "prompt_name"),
    Field::new("attn_cache"),
];

/// The inputs as prompts, checked against the model (token-id inputs longer than the model
/// reads are refused unless `truncating`).
pub fn prompts(input: Input, state: &ApiState, truncating: bool) -> Result<Vec<Prompt>, ApiError> {
    let prompts: Vec<Prompt> = match input {
        Input::Text(t) => vec![Prompt::Text(t)],
        Input::Texts(ts) => ts.into_iter().map(Prompt::Text).collect(),
        Input::Tokens(t) => vec![Prompt::Tokens(t)],
        Input::TokenBatch(b) => b.into_iter().map(Prompt::Tokens).collect(),
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(Some("input"), "input must not be empty"));
    }
    if prompts.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            Some("input"),
            format!(
                "at most {MAX_INPUTS} inputs per request, got {}",
                prompts.len()
            ),
        ));
    }
    for (i, p) in prompts.iter().enumerate() {
        match p {
            Prompt::Text(t) if t.is_empty() => {
                return Err(ApiError::invalid(
                    Some("input"),
                    format!("input[{i}] is an empty string"),
                ))
            }
            Prompt::Tokens(t) if t.is_empty() => {
                return Err(ApiError::invalid(
                    Some("input"),
                    format!("input[{i}] has no tokens"),
                ))
            }
            Prompt::Tokens(t)
                if !truncating && state.model.max_positions.is_some_and(|m| t.len() > m) =>
            {
                return Err(ApiError::invalid(
                    Some("input"),
                    format!(
                        "input[{i}] has {} tokens, the model reads at most {}; send \
                         `truncate: true` to cut it",
                        t.len(),
                        state.model.max_positions.unwrap_or_default()
                    ),
                ))
            }
            Prompt::Tokens(t) => {
                if let (Some(vocab), Some(bad)) = (
                    state.model.vocab_size,
                    t.iter()
                        .find(|&&id| state.model.vocab_size.is_some_and(|v| id as usize >= v)),
                ) {
                    return Err(ApiError::invalid(
                        Some("input"),
                        format!("input[{i}] has token id {bad}, the vocabulary has {vocab}"),
                    ));
                }
            }
            Prompt::Text(_) => {}
        }
    }
    Ok(prompts)
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
            results.push((index, e));
            continue;
        }
        let queued = state.engine.join(prepared.tokens);
        let state = state.clone();
        tasks.spawn(async move {
            let _place = queued.place().await;
            let result = embed_one(state, prepared.prompt, cache)
                .await
                .map(|e| Embedded {
                    truncated: prepared.truncated,
                    ..e
                });
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
    let key = memo_key(cache.scope, prompt, false);
    let m = state.memo.as_ref()?.get(&key)?;
    (m.scope == cache.scope && &m.prompt == prompt && !m.truncate).then(|| Embedded {
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
    // inputs arrive truncated (see `inputs::prepare`): mistral.rs never cuts one itself
    let truncate = false;
    let flag = cache.on;
    let key = memo_key(cache.scope, &prompt, truncate);
    let id = state.mistral.next_request_id();
    // the request's flag and partition, for the hook; forgotten when the ticket drops,
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
        truncate_sequence: truncate,
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
            let msg = e.to_string();
            return Err(match state.model.max_positions {
                Some(max) if msg.contains("truncate_sequence") => ApiError::invalid(
                    Some("input"),
                    format!(
                        "an input is longer than the {max} tokens the model reads; send \
                         `truncate: true` to cut it (or start the server with --auto-truncate)"
                    ),
                ),
                _ => ApiError::invalid(Some("input"), msg),
            });
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
                truncate,
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

/// Matryoshka: the first `dims` values, at unit length.
fn truncate_renormalise(mut v: Vec<f32>, dims: usize) -> Vec<f32> {
    v.truncate(dims);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn bad_dimensions(d: usize, full: usize) -> ApiError {
    ApiError::invalid(
        Some("dimensions"),
        format!(
            "this model gives {full} dimensions and was not trained to be cut to {d} \
             (EmbeddingGemma: 768, 512, 256 or 128)"
        ),
    )
}

async fn handle(
    state: Arc<ApiState>,
    tenant: Option<super::auth::Tenant>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<EmbeddingResponse, ApiError> {
    let Json(value) = body?;
    let req = parse(value)?;
    if !state.serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    match (req.dimensions, state.model.embedding_dim) {
        (Some(0), _) => {
            return Err(ApiError::invalid(
                Some("dimensions"),
                "dimensions must be at least 1",
            ))
        }
        (Some(d), Some(full)) if !state.model.allows_dimensions(d, full) => {
            return Err(bad_dimensions(d, full))
        }
        _ => {}
    }
    let cache = CacheUse::resolve(&state, &headers, req.attn_cache, tenant)?;
    let options = req.input_options();
    let prompts = prompts(req.input, &state, options.truncates(&state)?)?;
    let prompts = super::inputs::prepare_blocking(&state, prompts, options, None).await?;
    let results = embed_all(&state, prompts, cache).await?;
    let format = req.encoding_format.unwrap_or(EncodingFormat::Float);
    let (mut data, mut inputs, mut tokens) = (Vec::new(), Vec::new(), 0usize);
    for (index, result) in results.into_iter().enumerate() {
        inputs.push(result.report(index));
        let Embedded {
            embedding,
            prompt_tokens,
            ..
        } = result;
        let full = embedding.len();
        let embedding = match req.dimensions {
            Some(d) if state.model.allows_dimensions(d, full) => truncate_renormalise(embedding, d),
            Some(d) => return Err(bad_dimensions(d, full)),
            None => embedding,
        };
        tokens += prompt_tokens;
        data.push(EmbeddingData {
            object: "embedding",
            index,
            embedding: match format {
                EncodingFormat::Float => Vector::Float(embedding),
                EncodingFormat::Base64 => Vector::Base64(encode_base64(&embedding)),
            },
        });
    }
    Ok(EmbeddingResponse {
        object: "list",
        data,
        model: state.model_name.clone(),
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
        attn_cache: CacheReport {
            enabled: cache.on,
            inputs,
        },
    })
}

/// The route.
#[utoipa::path(post, path = "/v1/embeddings", tag = "embeddings",
    request_body = EmbeddingRequest,
    params(("X-Attn-Cache" = Option<String>, Header, description = "`on` or `off`: the cache flag of this request")),
    responses(
        (status = 200, description = "One embedding per input", body = EmbeddingResponse),
        (status = 400, description = "Invalid request", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorBody),
        (status = 404, description = "Model not served", body = super::error::ErrorBody),
        (status = 429, description = "Busy: retry after the Retry-After header", body = super::error::ErrorBody),
    ))]
pub async fn embeddings(
    State(state): State<Arc<ApiState>>,
    tenant: Option<Extension<super::auth::Tenant>>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = handle(state.clone(), tenant.map(|t| t.0), headers, body).await;
    super::finish(&state, "embeddings", started, result)
}
