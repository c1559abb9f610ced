//! The routes a decoder serves: `POST /v1/classify` over label words, `GET /info`,
//! `GET /metrics` ([`super::metrics`]), and a
//! clear 400 on the embedding routes (which need an embedding model). Everything else
//! (`/v1/models`, `/health`, completions) falls back to mistral.rs's router.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::prefill::tokenize;
use super::score;
use super::state::{
    check_prompt, prefill_all, DecoderCacheReport, HeadRows, ListResponse, PrefixReport,
};
pub use super::state::{DecoderState, MAX_INPUTS, MAX_LABELS};
use crate::server::api::auth;
use crate::server::api::body::Field;
use crate::server::api::error::ApiError;
use attncache_plugin::HookCounts;

/// `POST /v1/classify` on a decoder: the label words' probabilities at the last position.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderClassifyRequest {
    /// `default`, the file's stem, `general.name` or the path.
    #[serde(default = "super::state::default_model")]
    pub model: String,
    /// One prompt or several, as text (read as it is, no chat template; the model's special
    /// tokens added as its tokenizer adds them) or as token ids (read exactly).
    pub input: OneOrMany,
    /// The candidate next words, each exactly one token of the model (mind the leading
    /// space: `" A"`, `" positive"`).
    pub labels: Vec<String>,
    /// Reuse stored prompt prefixes (exact: the K/V of the same token ids) and store this
    /// prompt's; unset: the server's `--attn-cache`.
    #[serde(default)]
    pub attn_cache: Option<bool>,
    /// Also return each label's log-probability under the whole vocabulary (`logprobs`):
    /// the output head is then computed on every vocabulary row, not only the labels'.
    #[serde(default)]
    pub logprobs: bool,
    /// End-user id (accepted, ignored).
    #[serde(default)]
    pub user: Option<String>,
}

/// A string, an array of strings, an array of token ids or an array of those (OpenAI's
/// forms of `input`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One text.
    One(String),
    /// Several texts.
    Many(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    ManyTokens(Vec<Vec<u32>>),
}

/// One input of a request, before tokenization.
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

impl OneOrMany {
    fn into_prompts(self) -> Vec<Prompt> {
        match self {
            Self::One(t) => vec![Prompt::Text(t)],
            Self::Many(ts) => ts.into_iter().map(Prompt::Text).collect(),
            Self::Tokens(ids) => vec![Prompt::Tokens(ids)],
            Self::ManyTokens(all) => all.into_iter().map(Prompt::Tokens).collect(),
        }
    }
}

/// One input's answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DecoderClassifyData {
    /// Position in `input`.
    pub index: usize,
    /// The most probable label.
    pub label: String,
    /// Probabilities over the labels (softmax of their logits), in `labels` order.
    pub probs: Vec<f32>,
    /// Each label's log-probability under the model's whole vocabulary (when asked with
    /// `"logprobs": true`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<f32>>,
    /// Number of labels.
    pub num_classes: usize,
}

/// The answer, in vLLM's `/classify` shape.
pub type DecoderClassifyResponse = ListResponse<DecoderClassifyData>;

const FIELDS: &[Field] = &[
    Field::new("model"),
    Field::new("input").hint("input must be a string or an array of strings"),
    Field::new("labels").hint("labels must be an array of strings, each one token"),
    Field::new("attn_cache"),
    Field::new("logprobs").hint("logprobs must be true or false"),
    Field::new("user"),
];

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f64> = logits.iter().map(|&x| f64::from(x - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| (e / sum) as f32).collect()
}

/// The label words' token ids, or a 400 naming the label that is not one token.
async fn label_ids(state: &DecoderState, labels: &[String]) -> Result<Vec<u32>, ApiError> {
    if labels.is_empty() || labels.len() > MAX_LABELS {
        return Err(ApiError::invalid(
            Some("labels"),
            format!(
                "labels must hold 1 to {MAX_LABELS} words, not {}",
                labels.len()
            ),
        ));
    }
    let mut ids = Vec::with_capacity(labels.len());
    for label in labels {
        let got = tokenize(&state.mistral, label, false).await?;
        let [id] = got[..] else {
            return Err(ApiError::invalid(
                Some("labels"),
                format!(
                    "label {label:?} is {} tokens of this model, not one (a label is the next \
                     word the model would write: mind the leading space, e.g. \" yes\")",
                    got.len()
                ),
            ));
        };
        if ids.contains(&id) {
            return Err(ApiError::invalid(
                Some("labels"),
                format!("label {label:?} is the same token as an earlier label"),
            ));
        }
        ids.push(id);
    }
    Ok(ids)
}

async fn classify_inner(
    state: Arc<DecoderState>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<DecoderClassifyResponse, ApiError> {
    let Json(value) = body?;
    let req: DecoderClassifyRequest = crate::server::api::body::parse(value, FIELDS)?;
    if !state.model.serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    // the flag as every route reads it (body field, X-Attn-Cache header, their agreement)
    let use_cache =
        crate::server::api::embed::request_flag(&headers, req.attn_cache, state.cache_by_default)?;
    let inputs = req.input.into_prompts();
    if inputs.is_empty() || inputs.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            Some("input"),
            format!(
                "input must hold 1 to {MAX_INPUTS} prompts, not {}",
                inputs.len()
            ),
        ));
    }
    let ids: Arc<[u32]> = label_ids(&state, &req.labels).await?.into();
    let mut prompts = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        let tokens = match input {
            Prompt::Text(text) => tokenize(&state.mistral, &text, true).await?,
            Prompt::Tokens(ids) => {
                let vocab = state.model.vocab_size;
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                    return Err(ApiError::invalid(
                        Some("input"),
                        format!("input {i} holds token id {bad}, beyond the vocabulary of {vocab}"),
                    ));
                }
                ids
            }
        };
        check_prompt(&state, "input", i, &tokens)?;
        prompts.push(tokens);
    }
    // without logprobs only the labels' rows of the output head are needed
    let rows = if req.logprobs {
        HeadRows::All
    } else {
        HeadRows::Asked
    };
    let results = prefill_all(&state, prompts, ids, use_cache, rows).await?;
    let mut tokens = 0;
    let mut reports = Vec::with_capacity(results.len());
    let data = results
        .into_iter()
        .enumerate()
        .map(|(index, (got, reused))| {
            tokens += got.prompt_tokens;
            reports.push(PrefixReport::new(index, reused));
            let probs = softmax(&got.logits);
            let best = probs
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            DecoderClassifyData {
                index,
                label: req.labels[best].clone(),
                logprobs: req
                    .logprobs
                    .then(|| got.logits.iter().map(|l| l - got.logsumexp).collect()),
                num_classes: probs.len(),
                probs,
            }
        })
        .collect();
    state.metrics.inputs(reports.iter().map(|r| r.outcome));
    let reports = DecoderCacheReport {
        enabled: use_cache,
        inputs: reports,
    };
    Ok(ListResponse::new("classify", &state, data, tokens, reports))
}

async fn classify(
    State(state): State<Arc<DecoderState>>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    match classify_inner(state, headers, body).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(error = %e.message, "classify failed");
            }
            e.into_response()
        }
    }
}

async fn info(State(state): State<Arc<DecoderState>>) -> Response {
    let m = &state.model;
    // the attention calls our kernel computed and the ones it left to mistral.rs (decode
    // steps, shapes it does not take, every call in stock mode)
    let hook = &state.hook;
    let HookCounts {
        fast_calls,
        declined_calls,
        cached_calls,
        qk_skipped_calls,
        label_row_heads,
        exact_attention_ns,
        ..
    } = hook.stats();
    let maps_attention_ns = hook.decoder_maps_counts().map_or(0, |c| c.attention_ns);
    let prefix = hook.prefix_store().map(|store| {
        let c = store.counts();
        serde_json::json!({
            "block_tokens": store.block_tokens(),
            "hits": c.hits, "misses": c.misses, "tokens_reused": c.tokens_reused,
            "blocks_stored": c.blocks_stored, "blocks_held": c.blocks_held,
            "bytes_held": c.bytes_held, "rejected": c.rejected,
            "cold_tier": store.cold_kind(),
            "cold": c.cold.map(|c| serde_json::json!({
                "reads": c.reads, "corrupt": c.corrupt, "writes": c.writes,
                "writes_skipped": c.writes_skipped, "failures": c.failures,
                "evictions": c.evictions, "blocks": c.blocks, "bytes": c.bytes,
                "read_ms": c.read_ns as f64 / 1e6,
            })),
        })
    });
    Json(serde_json::json!({
        "model_id": m.id(),
        "model_kind": "decoder",
        "model_name": m.name,
        // what keys the prefix store and what a --blend-gate file must name
        "model_fingerprint": m.fingerprint(),
        "architecture": m.architecture,
        "layers": m.layers,
        "max_input_length": m.context_length,
        "vocab_size": m.vocab_size,
        "routes": ["POST /v1/classify (labels)", "POST /v1/score", "POST /v1/rerank",
            "GET /info", "GET /metrics",
            "GET /v1/models", "GET /health"],
        "max_in_flight": state.max_in_flight,
        "max_client_batch_size": MAX_INPUTS,
        "exact_attention": hook.exact_attention().to_string(),
        "weights": state.weights.describe(),
        // "maps": layers computed from stored attention maps (--decoder-maps), "qk_skipped":
        // those of them whose q/k were never projected
        "attention_calls": {"fast": fast_calls, "stock": declined_calls, "maps": cached_calls,
            "qk_skipped": qk_skipped_calls},
        // time in the attention kernels (scores, softmax, P·V; projections not included):
        // the exact kernel's and stored-map layers'
        "attention_seconds": {"exact": exact_attention_ns as f64 / 1e9,
            "maps": maps_attention_ns as f64 / 1e9},
        // forwards whose output head was computed on the asked rows only
        "label_row_heads": label_row_heads,
        "attn_cache": {
            "supported": true,
            "enabled_by_default": state.cache_by_default,
            "reuse": match hook.decoder_blend_policy() {
                _ if hook.decoder_maps_policy().is_some() => "attention maps of the stored prompt sharing the longest exact prefix (map reuse, the AttnCache paper's method: approximate past the shared prefix unless recompute_rest)",
                Some(_) => "exact prompt prefixes (per-layer K/V), and past them stored prompts' K/V: the one edited in place, and runs of ids stored in any prompt at their new offset (blend: approximate)",
                None => "exact prompt prefixes (per-layer K/V)",
            },
            "prefix_store": prefix,
            "decoder_blend": hook.decoder_blend_policy().map(|p| serde_json::json!({
                "check_layer": p.check_layer, "share": p.share, "max_share": p.max_share,
                "stale_below": p.stale_below, "counts": hook.decoder_blend_counts(),
                "gate": state.blend_gate,
            })),
            "decoder_maps": hook.decoder_maps_policy().map(|p| serde_json::json!({
                "min_shared": p.min_shared, "layers": if p.layers.is_empty() {
                    serde_json::json!("all") } else { serde_json::json!(p.layers) },
                "recompute_rest": p.recompute_rest, "recompute_last": p.recompute_last,
                "over_prefix": p.over_prefix, "counts": hook.decoder_maps_counts(),
            })),
        },
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

/// A 400 for a route only an embedding model serves.
async fn needs_embedding_model(
    State(state): State<Arc<DecoderState>>,
    uri: axum::http::Uri,
) -> Response {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: format!(
            "{} needs an embedding model; this server serves the decoder {} ({}): use POST \
             /v1/classify with labels, /v1/score or /v1/rerank",
            uri.path(),
            state.model.id(),
            state.model.architecture
        ),
        param: None,
        code: "unsupported_for_model",
    }
    .into_response()
}

/// The decoder's routes in front of `mistral`'s; with API keys configured (`keys` not
/// open), the guarded paths of both (see [`auth::is_guarded`]) need one.
pub fn router(state: Arc<DecoderState>, mistral: Router, keys: Arc<auth::ApiKeys>) -> Router {
    let embedding_only = [
        "/v1/embeddings",
        "/tokenize",
        "/v1/tokenize",
        "/detokenize",
        "/v1/detokenize",
    ];
    let app = embedding_only
        .into_iter()
        .fold(Router::new(), |r, path| {
            r.route(path, post(needs_embedding_model))
        })
        .route("/v1/classify", post(classify))
        .route("/v1/score", post(score::score))
        .route("/score", post(score::score))
        .route("/v1/rerank", post(score::rerank))
        .route("/v2/rerank", post(score::rerank))
        .route("/rerank", post(score::rerank))
        .route("/info", get(info))
        .route(
            "/metrics",
            get(super::metrics::metrics).with_state(state.metrics.clone()),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.metrics.clone(),
            super::metrics::count,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(
            crate::server::api::MAX_BODY_BYTES,
        ))
        .with_state(state)
        .fallback_service(mistral);
    auth::guard(app, keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let p = softmax(&[1.0, 3.0, 2.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[1] > p[2] && p[2] > p[0]);
        let big = softmax(&[1000.0, 1000.0]);
        assert!((big[0] - 0.5).abs() < 1e-6, "no overflow: {big:?}");
    }
}
