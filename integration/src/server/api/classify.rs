//! `POST /v1/classify` in vLLM's shape: `{model, input: string|[string]}` →
//! `{id, object, created, model, data: [{index, label, probs, num_classes}], usage}`, with the
//! same per-request cache flag as `/v1/embeddings` (body `attn_cache`, header
//! `X-Attn-Cache`). The classifier is the served embedding model plus the linear head given
//! with `--classifier DIR` (trained by `attncache train-head`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};

use super::body::Field;
use super::embed::{embed_all, CacheUse};
use super::embeddings::Prompt;
use super::error::ApiError;
use super::inputs::InputOptions;
use super::outcome::CacheReport;
pub use super::types::{
    ClassifyData, ClassifyInput, ClassifyRequest, ClassifyResponse, ClassifyUsage,
};
use super::ApiState;
use crate::server::classifier::argmax;

/// [`ClassifyRequest`]'s fields, as errors name them.
const FIELDS: &[Field] = &[
    Field::new("model"),
    Field::new("input").hint("input must be a string or an array of strings"),
    Field::new("user"),
    Field::new("truncate_sequence"),
    Field::new("truncate"),
    Field::new("truncation_direction").hint("truncation_direction must be `right` or `left`"),
    Field::new("prompt_name"),
    Field::alias("task", "prompt_name"),
    Field::new("attn_cache"),
];

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

async fn handle(
    state: Arc<ApiState>,
    key_id: Option<super::auth::ApiKeyId>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<ClassifyResponse, ApiError> {
    let Some(head) = state.classifier.clone() else {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: "no classifier is loaded: start attncache-server with --classifier DIR \
                      (see `attncache train-head`)"
                .into(),
            param: None,
            code: "classifier_not_configured",
        });
    };
    let Json(value) = body?;
    let req: ClassifyRequest = super::body::parse(value, FIELDS)?;
    if !state.serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    let cache = CacheUse::resolve(&state, &headers, req.attn_cache, key_id)?;
    let texts = match req.input {
        ClassifyInput::Text(t) => vec![t],
        ClassifyInput::Texts(ts) => ts,
    };
    let input = super::embeddings::Input::Texts(texts);
    let options = InputOptions {
        prompt_name: req.prompt_name.clone(),
        truncate: req.truncate,
        truncate_sequence: req.truncate_sequence,
        truncation_direction: req.truncation_direction,
        max_tokens: None,
    };
    let mut prompts: Vec<Prompt> =
        super::embeddings::prompts(input, &state, options.truncates(&state)?)?;
    if options.prompt_name.is_none() {
        for p in &mut prompts {
            if let Prompt::Text(t) = p {
                *t = format!("{}{t}", head.config.prefix);
            }
        }
    }
    let prompts = super::inputs::prepare_blocking(&state, prompts, options, None).await?;
    let results = embed_all(&state, prompts, cache).await?;
    let embeddings: Vec<Vec<f32>> = results.iter().map(|r| r.embedding.clone()).collect();
    let probs = head
        .probabilities(&embeddings)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut data = Vec::with_capacity(probs.len());
    let mut inputs = Vec::with_capacity(probs.len());
    let mut tokens = 0;
    for (index, (p, r)) in probs.into_iter().zip(&results).enumerate() {
        tokens += r.prompt_tokens;
        inputs.push(r.report(index));
        data.push(ClassifyData {
            index,
            label: head.config.labels[argmax(&p)].clone(),
            num_classes: p.len(),
            probs: p,
        });
    }
    Ok(ClassifyResponse {
        id: format!("classify-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        object: "list",
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: state.model_name.clone(),
        data,
        usage: ClassifyUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
            completion_tokens: 0,
        },
        attn_cache: CacheReport {
            enabled: cache.on,
            inputs,
        },
    })
}

/// The route.
#[utoipa::path(post, path = "/v1/classify", tag = "classify",
    request_body = ClassifyRequest,
    responses(
        (status = 200, description = "One class per input", body = ClassifyResponse),
        (status = 400, description = "Invalid request", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorBody),
        (status = 404, description = "Model not served, or no classifier loaded", body = super::error::ErrorBody),
        (status = 429, description = "Busy: retry after the Retry-After header", body = super::error::ErrorBody),
    ))]
pub async fn classify(
    State(state): State<Arc<ApiState>>,
    key_id: Option<Extension<super::auth::ApiKeyId>>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = handle(state.clone(), key_id.map(|t| t.0), headers, body).await;
    super::finish(&state, "classify", started, result)
}
