//! `GET /info` (TEI's idea): what is served and how — the model, its limits and task
//! prompts, the classifier's labels, and the cache settings a client may want to know.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::ApiState;

/// The answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Info {
    /// The served model's name (what `model` may say, besides `default`).
    pub model_id: String,
    /// `model_type` of its config.
    pub model_type: String,
    /// `architectures[0]` of its config.
    pub architecture: Option<String>,
    /// The longest input, in tokens.
    pub max_input_length: Option<usize>,
    /// Size of an embedding.
    pub embedding_dimensions: Option<usize>,
    /// Sizes `dimensions` may ask for (Matryoshka), when the model has a short list.
    pub matryoshka_dimensions: Vec<usize>,
    /// Task prompts by name (`prompt_name`).
    pub prompts: BTreeMap<String, String>,
    /// The prompt used when a request names none.
    pub default_prompt_name: Option<String>,
    /// Whether over-long inputs are cut by default (`--auto-truncate`).
    pub auto_truncate: bool,
    /// Inputs that may be in flight at once (more get 429).
    pub max_in_flight: usize,
    /// Most inputs in one request.
    pub max_client_batch_size: usize,
    /// The classification head's labels, when `/v1/classify` is served.
    pub classifier_labels: Option<Vec<String>>,
    /// The attention cache.
    pub attn_cache: CacheInfo,
    /// attncache-server's version.
    pub version: &'static str,
}

/// Cache settings in `/info`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CacheInfo {
    /// Whether requests that do not say use the cache.
    pub enabled_by_default: bool,
    /// What a hit reuses: `maps` or `blend`.
    #[schema(value_type = String, example = "maps")]
    pub reuse: attncache_plugin::ReuseKind,
    /// Shortest input the cache stores, in tokens.
    pub min_tokens: usize,
    /// Longest input the cache stores (longer ones are `not_cached`).
    pub max_tokens: usize,
    /// Whether the cache is partitioned by API key.
    pub partitioned: bool,
}

/// The route.
#[utoipa::path(get, path = "/info", tag = "info",
    responses((status = 200, description = "What is served", body = Info)))]
pub async fn info(State(state): State<Arc<ApiState>>) -> Response {
    let config = state.cache.config();
    let full = state.model.embedding_dim;
    let matryoshka = full
        .map(|f| {
            (1..=f)
                .rev()
                .filter(|&d| d == f || [128, 256, 512, 768].contains(&d))
                .filter(|&d| state.model.allows_dimensions(d, f))
                .collect()
        })
        .unwrap_or_default();
    Json(Info {
        model_id: state.model_name.clone(),
        model_type: state.model.model_type.clone(),
        architecture: state.model.architecture.clone(),
        max_input_length: state.text.max_tokens(),
        embedding_dimensions: full,
        matryoshka_dimensions: matryoshka,
        prompts: state.text.prompts().clone(),
        default_prompt_name: state.text.default_prompt_name().map(str::to_string),
        auto_truncate: state.auto_truncate,
        max_in_flight: state.max_in_flight,
        max_client_batch_size: super::embeddings::MAX_INPUTS,
        classifier_labels: state.classifier.as_ref().map(|c| c.config.labels.clone()),
        attn_cache: CacheInfo {
            enabled_by_default: state.cache.enabled_by_default(),
            reuse: config.reuse_kind,
            min_tokens: config.min_tokens,
            max_tokens: config.max_tokens,
            partitioned: !config.scopes.is_empty(),
        },
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response()
}
