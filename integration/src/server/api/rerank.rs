//! `POST /v1/rerank`, `/v2/rerank` (the path the `cohere` SDK's v2 client calls) and
//! `/rerank`, in the Jina/Cohere shape vLLM serves:
//!
//! `{model, query, documents: [string | {text}], top_n?, return_documents = true,
//! max_tokens_per_doc?, truncate?, truncation_direction?, attn_cache?}` →
//! `{id, model, results: [{index, relevance_score, document?: {text}}], usage, attn_cache}`.
//!
//! Scored with the served embedding model (a bi-encoder, as vLLM scores with embedding
//! models): the query with the model's `query` prompt, each document with its `document`
//! prompt (when the model has them, as EmbeddingGemma does), `relevance_score` = cosine of
//! the two embeddings, results best first. The cache flag works as on `/v1/embeddings`:
//! documents re-ranked for many queries come from the exact-repeat memo or the cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::{Extension, Json};

use super::body::Field;
use super::embed::{embed_all, CacheUse};
use super::embeddings::{Prompt, MAX_INPUTS};
use super::error::ApiError;
use super::inputs::{prepare_blocking, InputOptions};
pub use super::types::{
    Document, DocumentText, RerankCacheReport, RerankRequest, RerankResponse, RerankResult,
    RerankUsage,
};
use super::ApiState;

impl Document {
    /// The document's text, whichever form it came in.
    pub(crate) fn text(&self) -> &str {
        match self {
            Document::Text(t) | Document::Object { text: t } => t,
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The body of a rerank request, or a 400 naming the field at fault (shared with the
/// decoder's LLM rerank).
pub(crate) fn parse(value: serde_json::Value) -> Result<RerankRequest, ApiError> {
    super::body::parse(value, FIELDS)
}

/// [`RerankRequest`]'s fields, as errors name them.
const FIELDS: &[Field] = &[
    Field::new("model"),
    Field::new("query"),
    Field::new("documents")
        .hint("documents must be an array of strings or of {\"text\": string} objects"),
    Field::new("top_n"),
    Field::new("return_documents"),
    Field::new("max_tokens_per_doc"),
    Field::new("truncate"),
    Field::new("truncation_direction").hint("truncation_direction must be `right` or `left`"),
    Field::new("user"),
    Field::new("attn_cache"),
];

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// The documents of `req` with their `scores` (in `documents` order), best first (ties by
/// position), cut to `top_n`, each with its text when `return_documents`.
pub(crate) fn ranked(req: &RerankRequest, scores: impl Iterator<Item = f64>) -> Vec<RerankResult> {
    let mut ranked: Vec<RerankResult> = scores
        .enumerate()
        .map(|(index, relevance_score)| RerankResult {
            index,
            relevance_score,
            document: req.return_documents.then(|| DocumentText {
                text: req.documents[index].text().to_string(),
            }),
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.relevance_score
            .total_cmp(&a.relevance_score)
            .then(a.index.cmp(&b.index))
    });
    if let Some(n) = req.top_n.filter(|&n| n > 0) {
        ranked.truncate(n);
    }
    ranked
}

async fn handle(
    state: Arc<ApiState>,
    key_id: Option<super::auth::ApiKeyId>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<RerankResponse, ApiError> {
    let Json(value) = body?;
    let req = parse(value)?;
    if !state.serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    if req.query.is_empty() {
        return Err(ApiError::invalid(Some("query"), "query must not be empty"));
    }
    if req.documents.is_empty() {
        return Err(ApiError::invalid(
            Some("documents"),
            "documents must not be empty",
        ));
    }
    if req.documents.len() >= MAX_INPUTS {
        return Err(ApiError::invalid(
            Some("documents"),
            format!(
                "at most {} documents per request, got {}",
                MAX_INPUTS - 1,
                req.documents.len()
            ),
        ));
    }
    if let Some(i) = req.documents.iter().position(|d| d.text().is_empty()) {
        return Err(ApiError::invalid(
            Some("documents"),
            format!("documents[{i}] is an empty string"),
        ));
    }
    if req.max_tokens_per_doc == Some(0) {
        return Err(ApiError::invalid(
            Some("max_tokens_per_doc"),
            "max_tokens_per_doc must be at least 1",
        ));
    }
    let cache = CacheUse::resolve(&state, &headers, req.attn_cache, key_id)?;
    let options = InputOptions {
        truncate: req.truncate,
        truncation_direction: req.truncation_direction,
        ..InputOptions::default()
    };
    let query = prepare_blocking(
        &state,
        vec![Prompt::Text(req.query.clone())],
        options.clone(),
        Some("query"),
    )
    .await?;
    let docs: Vec<Prompt> = req
        .documents
        .iter()
        .map(|d| Prompt::Text(d.text().to_string()))
        .collect();
    let doc_options = InputOptions {
        max_tokens: req.max_tokens_per_doc,
        ..options
    };
    let docs = prepare_blocking(&state, docs, doc_options, Some("document")).await?;
    let mut all = query;
    all.extend(docs);
    let results = embed_all(&state, all, cache).await?;
    let (query, docs) = results
        .split_first()
        .ok_or_else(|| ApiError::internal("no query embedding"))?;
    let ranked = ranked(
        &req,
        docs.iter().map(|d| cosine(&query.embedding, &d.embedding)),
    );
    let tokens: usize = results.iter().map(|r| r.prompt_tokens).sum();
    Ok(RerankResponse {
        id: format!("rerank-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        model: state.model_name.clone(),
        results: ranked,
        usage: RerankUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
        attn_cache: RerankCacheReport {
            enabled: cache.on,
            query: query.report(0),
            documents: docs.iter().enumerate().map(|(i, d)| d.report(i)).collect(),
        },
    })
}

/// The route.
#[utoipa::path(post, path = "/v1/rerank", tag = "rerank",
    request_body = RerankRequest,
    responses(
        (status = 200, description = "Documents best first", body = RerankResponse),
        (status = 400, description = "Invalid request", body = super::error::ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorBody),
        (status = 404, description = "Model not served", body = super::error::ErrorBody),
        (status = 429, description = "Busy: retry after the Retry-After header", body = super::error::ErrorBody),
    ))]
pub async fn rerank(
    State(state): State<Arc<ApiState>>,
    key_id: Option<Extension<super::auth::ApiKeyId>>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let started = Instant::now();
    let result = handle(state.clone(), key_id.map(|t| t.0), headers, body).await;
    super::finish(&state, "rerank", started, result)
}

/// `/v2/rerank` (the `cohere` SDK's v2 path): the same route, documented.
#[utoipa::path(post, path = "/v2/rerank", tag = "rerank",
    request_body = RerankRequest,
    responses((status = 200, description = "Documents best first", body = RerankResponse)))]
#[allow(dead_code)]
pub(crate) fn rerank_v2_doc() {}

/// `/rerank`: the same route, documented.
#[utoipa::path(post, path = "/rerank", tag = "rerank",
    request_body = RerankRequest,
    responses((status = 200, description = "Documents best first", body = RerankResponse)))]
#[allow(dead_code)]
pub(crate) fn rerank_root_doc() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_is_scale_free_and_zero_safe() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
    }

    #[test]
    fn documents_are_strings_or_text_objects() {
        let req = parse(serde_json::json!({
            "query": "q", "documents": ["a", {"text": "b"}]
        }))
        .expect("parsed");
        let texts: Vec<&str> = req.documents.iter().map(Document::text).collect();
        assert_eq!(texts, ["a", "b"]);
        let err = parse(serde_json::json!({"query": "q", "documents": [1]})).expect_err("bad");
        assert_eq!(err.param, Some("documents"));
        let err = parse(serde_json::json!({"documents": ["a"]})).expect_err("no query");
        assert_eq!(err.param, Some("query"));
        let err = parse(serde_json::json!({"query": "q", "documents": ["a"], "priority": 1}))
            .expect_err("unknown");
        assert!(err.message.contains("priority"), "{}", err.message);
    }
}
