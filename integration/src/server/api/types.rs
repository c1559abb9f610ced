//! Every request and response body of the API, in one place (the routes parse and build
//! them; `openapi.rs` publishes their schemas). Behaviour on these types (parsing checks,
//! option helpers) stays with the route that uses it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `model` when a request leaves it out.
fn default_model() -> String {
    "default".into()
}

/// A flag that defaults to on.
fn yes() -> bool {
    true
}
// `POST /v1/embeddings` (OpenAI)

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
    pub truncation_direction: Option<crate::server::model_text::TruncationDirection>,
    /// TEI / sentence-transformers: a task prompt of the model put before each text.
    #[serde(default, alias = "task")]
    pub prompt_name: Option<String>,
    /// Use the attention-map cache for this request (overrides the server default).
    #[serde(default)]
    pub attn_cache: Option<bool>,
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
// `POST /v1/classify`

/// The request body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRequest {
    /// Model name: `default`, the served directory's name, or its path.
    #[serde(default = "default_model")]
    pub model: String,
    /// One text or several.
    pub input: ClassifyInput,
    /// End-user id (accepted, ignored).
    #[serde(default)]
    pub user: Option<String>,
    /// mistral.rs: truncate over-long inputs instead of failing.
    #[serde(default)]
    pub truncate_sequence: Option<bool>,
    /// TEI: truncate over-long inputs instead of failing.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// Which end truncation cuts: `right` (default) or `left`.
    #[serde(default)]
    pub truncation_direction: Option<crate::server::model_text::TruncationDirection>,
    /// A task prompt of the model put before each text instead of the head's own prefix
    /// (a head scores best with the prefix it was trained with).
    #[serde(default, alias = "task")]
    pub prompt_name: Option<String>,
    /// Use the attention-map cache for this request (overrides the server default).
    #[serde(default)]
    pub attn_cache: Option<bool>,
}

/// `input`: a string or an array of strings.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ClassifyInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
}

/// The response body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClassifyResponse {
    /// `classify-N`.
    pub id: String,
    /// Always `list`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// The model name.
    pub model: String,
    /// One result per input, in input order.
    pub data: Vec<ClassifyData>,
    /// Token counts.
    pub usage: ClassifyUsage,
    /// What the cache did.
    pub attn_cache: CacheReport,
}

/// One input's class.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClassifyData {
    /// Position of the input.
    pub index: usize,
    /// Most probable label.
    pub label: String,
    /// Probability of every label, in the head's label order.
    pub probs: Vec<f32>,
    /// Number of labels.
    pub num_classes: usize,
}

/// `usage`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct ClassifyUsage {
    /// Tokens of all inputs.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`.
    pub total_tokens: usize,
    /// Always 0.
    pub completion_tokens: usize,
}
// `POST /v1/rerank`, `/v2/rerank`, `/rerank` (Cohere, TEI)

/// The request body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RerankRequest {
    /// Model name: `default`, the served directory's name, or its path.
    #[serde(default = "default_model")]
    pub model: String,
    /// The search query.
    pub query: String,
    /// The texts to rank.
    pub documents: Vec<Document>,
    /// Return only the best `top_n` (absent or 0: all).
    #[serde(default)]
    pub top_n: Option<usize>,
    /// Put each document's text in its result.
    #[serde(default = "yes")]
    pub return_documents: bool,
    /// Cohere: cut each document to this many tokens.
    #[serde(default)]
    pub max_tokens_per_doc: Option<usize>,
    /// Cut the query and documents longer than the model reads instead of refusing them.
    #[serde(default)]
    pub truncate: Option<bool>,
    /// Which end truncation cuts: `right` (default) or `left`.
    #[serde(default)]
    pub truncation_direction: Option<crate::server::model_text::TruncationDirection>,
    /// End-user id (accepted, ignored).
    #[serde(default)]
    pub user: Option<String>,
    /// Use the attention cache for this request (overrides the server default).
    #[serde(default)]
    pub attn_cache: Option<bool>,
}

/// A document: a string or `{"text": …}`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Document {
    /// A string.
    Text(String),
    /// `{"text": …}`.
    Object {
        /// The text.
        text: String,
    },
}

/// The response body.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RerankResponse {
    /// `rerank-N`.
    pub id: String,
    /// The model name.
    pub model: String,
    /// Documents best first.
    pub results: Vec<RerankResult>,
    /// Token counts (query and documents).
    pub usage: RerankUsage,
    /// What the cache did.
    pub attn_cache: RerankCacheReport,
}

/// One ranked document.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RerankResult {
    /// Its position in `documents`.
    pub index: usize,
    /// Cosine of the query's and the document's embeddings.
    pub relevance_score: f64,
    /// The document, when `return_documents`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<DocumentText>,
}

/// `document` in a result.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DocumentText {
    /// The text, as sent.
    pub text: String,
}

/// `usage`.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct RerankUsage {
    /// Tokens of the query and the documents.
    pub prompt_tokens: usize,
    /// Same as `prompt_tokens`.
    pub total_tokens: usize,
}

/// `attn_cache` of a rerank answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RerankCacheReport {
    /// Whether the request used the cache.
    pub enabled: bool,
    /// The query's outcome (`index` 0).
    pub query: InputReport,
    /// Each document's outcome (`index`: its position in `documents`).
    pub documents: Vec<InputReport>,
}
// `POST /tokenize`, `/detokenize` (TEI; also under `/v1/`)

/// `/tokenize`'s body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// Model name (optional; when given it must be the served model).
    #[serde(default)]
    pub model: Option<String>,
    /// The text.
    pub prompt: String,
    /// Add the special tokens the model's tokenizer adds (`<bos>`, `<eos>`), as embedding does.
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    /// Also return each token as the vocabulary spells it.
    #[serde(default)]
    pub return_token_strs: bool,
    /// A task prompt of the model put before the text, as on `/v1/embeddings`.
    #[serde(default, alias = "task")]
    pub prompt_name: Option<String>,
}

/// `/tokenize`'s answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// The longest input the model reads.
    pub max_model_len: Option<usize>,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// The tokens as strings, when asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<Option<String>>>,
}

/// `/detokenize`'s body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    /// Model name (optional; when given it must be the served model).
    #[serde(default)]
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Leave special tokens out of the text.
    #[serde(default)]
    pub skip_special_tokens: bool,
}

/// `/detokenize`'s answer.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
}
// every 4xx and 5xx (OpenAI's error shape)

/// The body of every error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// `error` in an error answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<&'static str>,
    /// Machine-readable code (`invalid_value`, `model_not_found`, …).
    pub code: &'static str,
}
// `GET /info` (TEI)

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
    /// Whether each API key has its own cache scope (`--cache-scope per-key`).
    pub scoped_per_key: bool,
    /// The share of near blend hits recomputed exactly in the background to measure their
    /// fidelity (`--blend-audit-rate`; 0: none).
    pub blend_audit_rate: f64,
    /// The blend fidelity gate (`--blend-gate`), as its file says: the signal it bounds, the
    /// floor and the share of accepted hits allowed under it, each length band's bounds with
    /// the calibration hits behind them, and where they were calibrated. `null`: none.
    #[schema(value_type = Option<Object>)]
    pub blend_gate: Option<serde_json::Value>,
}
// the `attn_cache` report every embedding answer carries

/// `attn_cache` in a response.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CacheReport {
    /// Whether the request used the cache.
    pub enabled: bool,
    /// Per input.
    pub inputs: Vec<InputReport>,
}

/// What the cache did for one input.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, utoipa::ToSchema)]
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
    /// Escalated blend hits: the layer after which every position was computed again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed_after_layer: Option<u32>,
    /// Blend candidates: what the check layer saw of the positions left stale (of the hit
    /// taken, or of the last one the fidelity gate refused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<CheckReport>,
    /// Near blend hits: how many stored inputs the hit took positions from (more than one:
    /// aligned by content across several stored inputs, e.g. the tail of one stored chunk
    /// and the head of the next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stored_inputs: Option<u32>,
    /// Tokens truncation cut from the input (`truncate`, `--auto-truncate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_tokens: Option<u32>,
}

/// What a blend candidate's check layer saw (the signals `--blend-gate` bounds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckReport {
    /// `1 − cos` between the input's pooled states and the stored input's.
    pub pooled_deviation: f32,
    /// Mean over every position of the deviation of the positions left stale.
    pub stale_deviation: f32,
    /// Largest deviation of a position left stale.
    pub residual_deviation: f32,
    /// Share of the positions whose state moved (or whose token differs).
    pub moved_share: f32,
}

/// What the cache did for one input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputOutcome {
    /// The cache was not used (flag off): the exact path.
    Off,
    /// A flag-on exact repeat answered from the memo (the model did not run).
    ExactRepeat,
    /// Identical token ids were stored: their maps (or blend states) were used.
    Hit,
    /// A similar stored input's maps (or blend states) were used.
    NearHit,
    /// Nothing usable was stored: computed exactly (and recorded when admitted).
    Miss,
    /// Outside what the cache keeps (length range, scope): computed exactly, not stored.
    NotCached,
}
