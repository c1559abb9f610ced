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

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};
use base64::Engine;

use super::body::Field;
use super::embed::{embed_all, CacheUse, Embedded};
use super::error::ApiError;
pub use super::inputs::Prompt;
use super::outcome::CacheReport;
use super::ApiState;

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
pub use super::embed::FLAG_HEADER;
pub use super::types::{
    EmbeddingData, EmbeddingRequest, EmbeddingResponse, EncodingFormat, Input, Usage, Vector,
};

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
    key_id: Option<super::auth::ApiKeyId>,
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
    let cache = CacheUse::resolve(&state, &headers, req.attn_cache, key_id)?;
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
    key_id: Option<Extension<super::auth::ApiKeyId>>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = handle(state.clone(), key_id.map(|t| t.0), headers, body).await;
    super::finish(&state, "embeddings", started, result)
}
