//! `GET /info` (TEI's idea): what is served and how — the model, its limits and task
//! prompts, the classifier's labels, and the cache settings a client may want to know.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

pub use super::types::{CacheInfo, Info};
use super::ApiState;

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
            scoped_per_key: !config.scopes.is_empty(),
            blend_audit_rate: state.audit.as_ref().map_or(0.0, |a| a.rate()),
            blend_gate: (config.reuse_kind == attncache_plugin::ReuseKind::Blend)
                .then(|| state.cache.blend_policy().gate.clone())
                .flatten()
                .and_then(|g| serde_json::to_value(g).ok()),
        },
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response()
}
