//! LLM reranking on a decoder: `POST /v1/score` (vLLM's shape) and `POST /v1/rerank`,
//! `/v2/rerank`, `/rerank` (Cohere's and Jina's), scoring each query–document pair by the
//! probability of a "yes" as the next word, as Qwen3-Reranker scores:
//! `p = softmax(logit_yes, logit_no)[yes]` at the last position of the pair read through a
//! prompt template (`--score-template`, `--score-yes`, `--score-no`).
//!
//! The template's parts are tokenized separately (its fixed text once, at start; the query
//! once per request; each document once) and joined, as Qwen3-Reranker's own code joins
//! prefix, pair and suffix ids. So the documents of one query share the query's token prefix
//! exactly, and with the cache flag on all but the first read its K/V from the prefix store.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::prefill::tokenize;
use super::state::{
    check_prompt, prefill_all, DecoderCacheReport, DecoderState, HeadRows, ListResponse,
    PrefixReport, Reused,
};
use crate::server::api::body::Field;
use crate::server::api::error::ApiError;
use crate::server::api::types::{Document, RerankRequest, RerankResult, RerankUsage};

/// Most documents (or pairs) in one request.
pub const MAX_PAIRS: usize = super::state::MAX_INPUTS;

/// A query or document as token ids; `first`: it opens the prompt (the template starts
/// with its slot), so it takes the model's special tokens.
async fn slot_ids(
    state: &DecoderState,
    text: &str,
    param: &'static str,
    i: usize,
    first: bool,
) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} {i} is empty: the template's slot would be empty"),
        ));
    }
    tokenize(&state.mistral, text, first).await
}

/// Options of a scoring request.
struct Pairs<'a> {
    queries: Vec<&'a str>,
    documents: Vec<&'a str>,
    /// `queries` has one entry scored against every document.
    one_query: bool,
    max_tokens_per_doc: Option<usize>,
    truncate: bool,
}

/// p(yes) of every pair (in `documents` order), with each prompt's tokens and what the
/// prefix store gave it.
async fn score_pairs(
    state: &Arc<DecoderState>,
    pairs: Pairs<'_>,
    use_cache: bool,
) -> Result<Vec<(f64, usize, Option<Reused>)>, ApiError> {
    let setup = &state.score;
    let labels = setup.labels()?;
    let (query_first, doc_first) = setup.slot_first();
    let mut query_ids = Vec::with_capacity(pairs.queries.len());
    for (i, q) in pairs.queries.iter().enumerate() {
        query_ids.push(slot_ids(state, q, "query", i, query_first).await?);
    }
    let room = state.model.context_length;
    let mut prompts = Vec::with_capacity(pairs.documents.len());
    for (i, d) in pairs.documents.iter().enumerate() {
        let mut doc = slot_ids(state, d, "documents", i, doc_first).await?;
        if let Some(n) = pairs.max_tokens_per_doc {
            doc.truncate(n);
        }
        let query = &query_ids[if pairs.one_query { 0 } else { i }];
        let fixed = setup.fixed_tokens() + query.len();
        if pairs.truncate && fixed + doc.len() > room {
            doc.truncate(room.saturating_sub(fixed).max(1));
        }
        let ids = setup.join(query, &doc);
        check_prompt(state, "documents", i, &ids)?;
        prompts.push(ids);
    }
    // p(yes) needs the yes and no rows of the output head only
    let results = prefill_all(state, prompts, labels, use_cache, HeadRows::Asked).await?;
    Ok(results
        .into_iter()
        .map(|(got, reused)| (p_yes(&got.logits), got.prompt_tokens, reused))
        .collect())
}

/// `softmax(yes, no)[yes]`, in f64.
fn p_yes(logits: &[f32]) -> f64 {
    match logits {
        [yes, no] => 1.0 / (1.0 + (f64::from(*no) - f64::from(*yes)).exp()),
        _ => f64::NAN,
    }
}

/// `POST /v1/score`'s body (vLLM's): `text_1` the query (or queries), `text_2` the
/// documents; one query against many documents, or as many queries as documents, paired.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreRequest {
    /// `default`, the file's stem, `general.name` or the path.
    #[serde(default = "super::state::default_model")]
    pub model: String,
    /// The query, or one per document.
    pub text_1: OneOrMany,
    /// The document, or several.
    pub text_2: OneOrMany,
    /// Reuse stored prompt prefixes; unset: the server's `--attn-cache`.
    #[serde(default)]
    pub attn_cache: Option<bool>,
    /// Cut each document to fit the model's context instead of refusing it.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// End-user id (accepted, ignored).
    #[serde(default)]
    pub user: Option<String>,
}

/// A string or an array of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One text.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl OneOrMany {
    fn texts(&self) -> Vec<&str> {
        match self {
            Self::One(t) => vec![t.as_str()],
            Self::Many(ts) => ts.iter().map(String::as_str).collect(),
        }
    }
}

/// One pair's score.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreData {
    /// Position of the pair (of `text_2`).
    pub index: usize,
    /// `score`.
    pub object: &'static str,
    /// p(yes).
    pub score: f64,
}

/// `/v1/score`'s answer (vLLM's shape, with the cache report).
pub type ScoreResponse = ListResponse<ScoreData>;

const SCORE_FIELDS: &[Field] = &[
    Field::new("model"),
    Field::new("text_1").hint("text_1 must be a string or an array of strings"),
    Field::new("text_2").hint("text_2 must be a string or an array of strings"),
    Field::new("attn_cache"),
    Field::new("truncate"),
    Field::new("user"),
];

fn count_ok(param: &'static str, n: usize) -> Result<(), ApiError> {
    if n == 0 || n > MAX_PAIRS {
        return Err(ApiError::invalid(
            Some(param),
            format!("{param} must hold 1 to {MAX_PAIRS} texts, not {n}"),
        ));
    }
    Ok(())
}

/// Each document's cache report, counted in the metrics.
fn reports(
    state: &DecoderState,
    results: &[(f64, usize, Option<Reused>)],
    use_cache: bool,
) -> DecoderCacheReport {
    let inputs: Vec<PrefixReport> = results
        .iter()
        .enumerate()
        .map(|(i, (_, _, reused))| PrefixReport::new(i, *reused))
        .collect();
    state.metrics.inputs(inputs.iter().map(|r| r.outcome));
    DecoderCacheReport {
        enabled: use_cache,
        inputs,
    }
}

async fn score_inner(
    state: Arc<DecoderState>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<ScoreResponse, ApiError> {
    let Json(value) = body?;
    let req: ScoreRequest = crate::server::api::body::parse(value, SCORE_FIELDS)?;
    if !state.model.serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    let use_cache =
        crate::server::api::embed::request_flag(&headers, req.attn_cache, state.cache_by_default)?;
    let (queries, documents) = (req.text_1.texts(), req.text_2.texts());
    count_ok("text_1", queries.len())?;
    count_ok("text_2", documents.len())?;
    let one_query = queries.len() == 1;
    if !one_query && queries.len() != documents.len() {
        return Err(ApiError::invalid(
            Some("text_1"),
            format!(
                "text_1 must hold one text or as many as text_2 ({}), not {}",
                documents.len(),
                queries.len()
            ),
        ));
    }
    let pairs = Pairs {
        queries,
        documents,
        one_query,
        max_tokens_per_doc: None,
        truncate: req.truncate.unwrap_or(false),
    };
    let results = score_pairs(&state, pairs, use_cache).await?;
    let tokens = results.iter().map(|r| r.1).sum();
    let data = results
        .iter()
        .enumerate()
        .map(|(index, (score, _, _))| ScoreData {
            index,
            object: "score",
            score: *score,
        })
        .collect();
    let report = reports(&state, &results, use_cache);
    Ok(ListResponse::new("score", &state, data, tokens, report))
}

/// The rerank answer on a decoder: Cohere's shape (`results` best first, `relevance_score`
/// = p(yes)), with the per-document cache report.
#[derive(Debug, Clone, Serialize)]
pub struct DecoderRerankResponse {
    /// `rerank-N`.
    pub id: String,
    /// The served model's id.
    pub model: String,
    /// Documents best first.
    pub results: Vec<RerankResult>,
    /// Tokens read (templates included).
    pub usage: RerankUsage,
    /// What the prefix store did for each document (`index`: its position).
    pub attn_cache: DecoderCacheReport,
}

async fn rerank_inner(
    state: Arc<DecoderState>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<DecoderRerankResponse, ApiError> {
    let Json(value) = body?;
    let req: RerankRequest = crate::server::api::rerank::parse(value)?;
    if !state.model.serves(&req.model) {
        return Err(ApiError::model_not_found(&req.model));
    }
    let use_cache =
        crate::server::api::embed::request_flag(&headers, req.attn_cache, state.cache_by_default)?;
    if req.query.is_empty() {
        return Err(ApiError::invalid(Some("query"), "query must not be empty"));
    }
    count_ok("documents", req.documents.len())?;
    if req.max_tokens_per_doc == Some(0) {
        return Err(ApiError::invalid(
            Some("max_tokens_per_doc"),
            "max_tokens_per_doc must be at least 1",
        ));
    }
    let pairs = Pairs {
        queries: vec![req.query.as_str()],
        documents: req.documents.iter().map(Document::text).collect(),
        one_query: true,
        max_tokens_per_doc: req.max_tokens_per_doc,
        truncate: req.truncate.unwrap_or(false),
    };
    let results = score_pairs(&state, pairs, use_cache).await?;
    let ranked = crate::server::api::rerank::ranked(&req, results.iter().map(|r| r.0));
    let tokens = results.iter().map(|r| r.1).sum();
    Ok(DecoderRerankResponse {
        id: format!("rerank-{}", state.request_id()),
        model: state.model.id(),
        results: ranked,
        usage: RerankUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
        attn_cache: reports(&state, &results, use_cache),
    })
}

fn respond<T: Serialize>(route: &str, result: Result<T, ApiError>) -> Response {
    match result {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(error = %e.message, "{route} failed");
            }
            e.into_response()
        }
    }
}

/// `POST /v1/score` and `/score`.
pub async fn score(
    State(state): State<Arc<DecoderState>>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    respond("score", score_inner(state, headers, body).await)
}

/// `POST /v1/rerank`, `/v2/rerank` and `/rerank`.
pub async fn rerank(
    State(state): State<Arc<DecoderState>>,
    headers: HeaderMap,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    respond("rerank", rerank_inner(state, headers, body).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p_yes_is_the_two_word_softmax() {
        assert!((p_yes(&[0.0, 0.0]) - 0.5).abs() < 1e-12);
        let p = p_yes(&[2.0, -1.0]);
        let want = 2f64.exp() / (2f64.exp() + (-1f64).exp());
        assert!((p - want).abs() < 1e-12);
        // no overflow far out
        assert!((p_yes(&[1000.0, -1000.0]) - 1.0).abs() < 1e-12);
        assert!(p_yes(&[-1000.0, 1000.0]) < 1e-300);
    }
}
