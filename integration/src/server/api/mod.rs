//! Our HTTP routes, in front of mistral.rs's own router (which serves everything else:
//! `/v1/models`, `/health`, chat, …):
//!
//! - [`embeddings`]: `POST /v1/embeddings` with the per-request cache flag;
//! - [`classify`]: `POST /v1/classify` (embedding model + linear head, vLLM's shape);
//! - [`rerank`]: `POST /v1/rerank`, `/v2/rerank`, `/rerank` (Jina/Cohere shape, scored by
//!   the embedding model's cosine);
//! - [`tokenize`]: `POST /tokenize`, `/detokenize` (vLLM's shape);
//! - [`info`]: `GET /info` (model, limits, prompts, cache settings; TEI's idea);
//! - [`inputs`]: task prompts and truncation, shared by the routes;
//! - [`openapi`]: `GET /openapi.json`, derived from the route types;
//! - [`queue`]: the arrival-order queue in front of the engine;
//! - [`metrics`]: `GET /metrics` for Prometheus;
//! - [`error`]: OpenAI-style error bodies.

pub mod audit;
pub mod auth;
pub mod body;
pub mod classify;
pub mod embed;
pub mod embeddings;
pub mod error;
pub mod info;
pub mod inputs;
pub mod metrics;
pub mod openapi;
pub mod outcome;
pub mod queue;
pub mod rerank;
pub mod tokenize;
pub mod types;

use std::sync::Arc;

use attncache_plugin::AttnCache;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Router;
use mistralrs_server_core::types::SharedMistralRsState;

use crate::server::model_dir::ModelDir;

/// Largest request body accepted (bigger ones get 413).
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// What the routes share.
pub struct ApiState {
    /// mistral.rs, to send requests to.
    pub mistral: SharedMistralRsState,
    /// The attention-map cache (per-request flags, decisions, counters).
    pub cache: Arc<AttnCache>,
    /// The served model.
    pub model: ModelDir,
    /// Its name in responses.
    pub model_name: String,
    /// Flag-on results by input, for exact repeats (bounded in bytes; `None`: off).
    pub memo: Option<moka::sync::Cache<u64, Arc<embed::Remembered>>>,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// The classification head, when the server was given one.
    pub classifier: Option<Arc<crate::server::classifier::Classifier>>,
    /// Inputs that may be in flight at once (admission control: more get 429 at once
    /// instead of an unbounded queue).
    pub in_flight: Arc<tokio::sync::Semaphore>,
    /// The size of `in_flight`.
    pub max_in_flight: usize,
    /// The queue in front of the engine (arrival order, two batches of equal-length inputs
    /// inside at a time).
    pub engine: queue::EngineQueue,
    /// A request body must arrive within this time (slow bodies get 408).
    pub body_timeout: std::time::Duration,
    /// API keys required on `/v1/` (none: open).
    pub api_keys: Arc<auth::ApiKeys>,
    /// The model's tokenizer and task prompts.
    pub text: Arc<crate::server::model_text::ModelText>,
    /// Cut over-long inputs unless a request says `truncate: false` (`--auto-truncate`).
    pub auto_truncate: bool,
    /// The online check of near blend hits (`--blend-audit-rate`; `None`: off).
    pub audit: Option<audit::BlendAudit>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("model", &self.model_name)
            .finish_non_exhaustive()
    }
}

impl ApiState {
    /// Shares `mistral` and `cache`; remembers up to `repeat_bytes` of flag-on results
    /// (0: no exact-repeat memo).
    /// Fails when the model directory's tokenizer or prompts cannot be read.
    pub fn new(
        mistral: SharedMistralRsState,
        cache: Arc<AttnCache>,
        model: ModelDir,
        repeat_bytes: u64,
        classifier: Option<crate::server::classifier::Classifier>,
        max_in_flight: usize,
    ) -> Result<Self, crate::server::model_text::ModelTextError> {
        let text = crate::server::model_text::ModelText::load(&model.path, model.max_positions)?;
        let memo = (repeat_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(repeat_bytes)
                .weigher(|_k: &u64, v: &Arc<embed::Remembered>| v.bytes())
                .build()
        });
        let metrics = metrics::Metrics::new(cache.clone());
        Ok(Self {
            engine: queue::EngineQueue::new(2, 16, metrics.queue_gauges()),
            metrics,
            model_name: model.name(),
            mistral,
            cache,
            model,
            memo,
            classifier: classifier.map(Arc::new),
            in_flight: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
            max_in_flight,
            body_timeout: std::time::Duration::from_secs(30),
            api_keys: Arc::new(auth::ApiKeys::default()),
            text: Arc::new(text),
            auto_truncate: false,
            audit: None,
        })
    }

    /// Lets `batches` batches of equal-length inputs into the engine at once (0: no queue),
    /// each of up to `batch_size` inputs (mistral.rs's `--max-seqs`).
    pub fn with_engine_queue(mut self, batches: usize, batch_size: usize) -> Self {
        self.engine = queue::EngineQueue::new(batches, batch_size, self.metrics.queue_gauges());
        self
    }

    /// Cuts over-long inputs unless a request says `truncate: false`.
    pub fn with_auto_truncate(mut self, on: bool) -> Self {
        self.auto_truncate = on;
        self
    }

    /// Recomputes the share `rate` of near blend hits exactly in the background and exports
    /// their fidelity (0: no audits; see [`audit`]).
    pub fn with_blend_audit(mut self, rate: f64) -> Self {
        self.audit = audit::BlendAudit::new(rate);
        self
    }

    /// Requires one of `keys` on `/v1/` requests (an empty list keeps the server open).
    pub fn with_api_keys(mut self, keys: &[String]) -> Self {
        self.api_keys = Arc::new(auth::ApiKeys::new(keys));
        self
    }

    /// Sets how long a request body may take to arrive.
    pub fn with_body_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.body_timeout = timeout;
        self
    }

    /// Whether `name` names the served model (`default`, its directory name or path).
    pub fn serves(&self, name: &str) -> bool {
        name == "default"
            || name == self.model_name
            || std::path::Path::new(name) == self.model.path.as_path()
    }
}

/// Counts a finished request in the metrics and turns its result into the HTTP answer.
pub fn finish<T: serde::Serialize>(
    state: &ApiState,
    endpoint: &'static str,
    started: std::time::Instant,
    result: Result<T, error::ApiError>,
) -> Response {
    let status = match &result {
        Ok(_) => 200,
        Err(e) => e.status.as_u16(),
    };
    state.metrics.request(endpoint, status, started.elapsed());
    match result {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => {
            tracing::debug!(status, endpoint, "request refused: {}", e.message);
            e.into_response()
        }
    }
}

fn too_large() -> Response {
    error::ApiError {
        status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
        param: None,
        code: "request_too_large",
    }
    .into_response()
}

/// Guards our routes' request bodies: one announced larger than [`MAX_BODY_BYTES`] gets 413
/// at once, before it is read; one that grows past it while read gets 413 too; one that
/// does not arrive within the state's `body_timeout` (a slow or stalled client) gets 408,
/// so a slow client cannot hold a request open without bound.
async fn guard_bodies(
    State(state): State<Arc<ApiState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let announced = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(state.body_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let too_long = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_long {
                return too_large();
            }
            return error::ApiError::invalid(None, format!("cannot read the request body: {e}"))
                .into_response();
        }
        Err(_) => {
            return error::ApiError {
                status: axum::http::StatusCode::REQUEST_TIMEOUT,
                message: format!(
                    "the request body did not arrive within {} s",
                    state.body_timeout.as_secs_f64()
                ),
                param: None,
                code: "request_timeout",
            }
            .into_response()
        }
    };
    next.run(axum::extract::Request::from_parts(parts, bytes.into()))
        .await
}

/// Our routes as (method, path, handler): the router is built from this list, and a test
/// checks that `/openapi.json` documents exactly these.
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<ApiState>>)> {
    vec![
        ("post", "/v1/embeddings", post(embeddings::embeddings)),
        ("post", "/v1/classify", post(classify::classify)),
        ("post", "/v1/rerank", post(rerank::rerank)),
        ("post", "/v2/rerank", post(rerank::rerank)),
        ("post", "/rerank", post(rerank::rerank)),
        ("post", "/tokenize", post(tokenize::tokenize)),
        ("post", "/v1/tokenize", post(tokenize::tokenize)),
        ("post", "/detokenize", post(tokenize::detokenize)),
        ("post", "/v1/detokenize", post(tokenize::detokenize)),
        ("get", "/info", get(info::info)),
        ("get", "/metrics", get(metrics::metrics)),
        ("get", "/openapi.json", get(openapi::openapi)),
    ]
}

/// Our routes, falling back to `mistral` for every path they do not handle; with API keys
/// configured, the guarded paths of both (see [`auth::is_guarded`]) need one.
pub fn router(state: Arc<ApiState>, mistral: Router) -> Router {
    let keys = state.api_keys.clone();
    let app = routes()
        .into_iter()
        .fold(Router::new(), |r, (_, path, handler)| {
            r.route(path, handler)
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard_bodies,
        ))
        .with_state(state)
        .fallback_service(mistral);
    auth::guard(app, keys)
}
