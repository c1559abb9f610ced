//! `POST /tokenize` and `POST /detokenize` in vLLM's shape (also at `/v1/…`), with the
//! served model's own tokenizer, so a client can count tokens before it sends:
//!
//! - `/tokenize` `{model?, prompt, add_special_tokens = true, return_token_strs = false,
//!   prompt_name?}` → `{count, max_model_len, tokens, token_strs?}`; the ids are the ones
//!   `/v1/embeddings` gives the model for the same text (and `prompt_name`);
//! - `/detokenize` `{model?, tokens, skip_special_tokens = false}` → `{prompt}`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::response::Response;
use axum::Json;

use super::body::Field;
use super::error::ApiError;
pub use super::types::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use super::ApiState;

fn body<T: serde::de::DeserializeOwned>(
    body: Result<Json<serde_json::Value>, JsonRejection>,
    fields: &[Field],
) -> Result<T, ApiError> {
    let Json(value) = body?;
    super::body::parse(value, fields)
}

/// [`TokenizeRequest`]'s fields, as errors name them.
const TOKENIZE_FIELDS: &[Field] = &[
    Field::new("model"),
    Field::new("prompt"),
    Field::new("add_special_tokens"),
    Field::new("return_token_strs"),
    Field::new("prompt_name"),
    Field::alias("task", "prompt_name"),
];

/// [`DetokenizeRequest`]'s fields, as errors name them.
const DETOKENIZE_FIELDS: &[Field] = &[
    Field::new("model"),
    Field::new("tokens").hint("tokens must be an array of token ids (integers from 0 to 2^32-1)"),
    Field::new("skip_special_tokens"),
];

fn check_model(state: &ApiState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if !state.serves(m) => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

async fn handle_tokenize(
    state: Arc<ApiState>,
    raw: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<TokenizeResponse, ApiError> {
    let req: TokenizeRequest = body(raw, TOKENIZE_FIELDS)?;
    check_model(&state, req.model.as_deref())?;
    let options = super::inputs::InputOptions {
        prompt_name: req.prompt_name.clone(),
        ..Default::default()
    };
    let prefix = options.prompt_text(&state, None)?.unwrap_or_default();
    let text = format!("{prefix}{}", req.prompt);
    let (add_special, strs) = (req.add_special_tokens, req.return_token_strs);
    let worker = state.clone();
    let (tokens, token_strs) = tokio::task::spawn_blocking(move || {
        let ids = worker.text.encode(&text, add_special)?;
        let strs = strs.then(|| worker.text.token_strings(&ids));
        Ok::<_, crate::server::model_text::ModelTextError>((ids, strs))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::invalid(Some("prompt"), e.to_string()))?;
    Ok(TokenizeResponse {
        count: tokens.len(),
        max_model_len: state.text.max_tokens(),
        tokens,
        token_strs,
    })
}

async fn handle_detokenize(
    state: Arc<ApiState>,
    raw: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<DetokenizeResponse, ApiError> {
    let req: DetokenizeRequest = body(raw, DETOKENIZE_FIELDS)?;
    check_model(&state, req.model.as_deref())?;
    if let Some(vocab) = state.model.vocab_size {
        if let Some((i, bad)) = req
            .tokens
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(ApiError::invalid(
                Some("tokens"),
                format!("tokens[{i}] is {bad}, the vocabulary has {vocab} ids"),
            ));
        }
    }
    let worker = state.clone();
    let prompt = tokio::task::spawn_blocking(move || {
        worker.text.decode(&req.tokens, req.skip_special_tokens)
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(|e| ApiError::invalid(Some("tokens"), e.to_string()))?;
    Ok(DetokenizeResponse { prompt })
}

/// `POST /tokenize`.
#[utoipa::path(post, path = "/tokenize", tag = "tokenize",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "Token ids", body = TokenizeResponse),
        (status = 400, description = "Invalid request", body = super::error::ErrorBody),
        (status = 404, description = "Model not served", body = super::error::ErrorBody),
    ))]
pub async fn tokenize(
    State(state): State<Arc<ApiState>>,
    raw: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = handle_tokenize(state.clone(), raw).await;
    super::finish(&state, "tokenize", started, result)
}

/// `POST /detokenize`.
#[utoipa::path(post, path = "/detokenize", tag = "tokenize",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = DetokenizeResponse),
        (status = 400, description = "Invalid request", body = super::error::ErrorBody),
        (status = 404, description = "Model not served", body = super::error::ErrorBody),
    ))]
pub async fn detokenize(
    State(state): State<Arc<ApiState>>,
    raw: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = handle_detokenize(state.clone(), raw).await;
    super::finish(&state, "detokenize", started, result)
}

/// `/v1/tokenize`: the same route, documented.
#[utoipa::path(post, path = "/v1/tokenize", tag = "tokenize",
    request_body = TokenizeRequest,
    responses((status = 200, description = "Token ids", body = TokenizeResponse)))]
#[allow(dead_code)]
pub(crate) fn tokenize_v1_doc() {}

/// `/v1/detokenize`: the same route, documented.
#[utoipa::path(post, path = "/v1/detokenize", tag = "tokenize",
    request_body = DetokenizeRequest,
    responses((status = 200, description = "The text", body = DetokenizeResponse)))]
#[allow(dead_code)]
pub(crate) fn detokenize_v1_doc() {}
