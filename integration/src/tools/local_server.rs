//! An `attncache-server` running inside this process on a free loopback port, for tools that
//! switch the hook and cache between requests (calibration, latency measurement).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use attncache_plugin::{AttnCache, AttnCacheHook, Decision, Outcome};

use crate::server::api::outcome::{InputOutcome, InputReport};
use crate::server::cli::ServeArgs;
use crate::server::model_dir::ModelDir;

/// A running in-process server and a client for it.
pub struct LocalServer {
    /// The installed hook.
    pub hook: Arc<AttnCacheHook>,
    /// The hook's cache.
    pub cache: Arc<AttnCache>,
    /// The model directory.
    pub model: ModelDir,
    url: String,
    client: reqwest::Client,
    /// The HTTP server's task, stopped when the `LocalServer` is dropped.
    serving: tokio::task::JoinHandle<()>,
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        // stop listening: a tool that starts several servers in turn must not leave the
        // earlier ones accepting connections
        self.serving.abort();
    }
}

/// One `/v1/embeddings` answer for a single input.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// The embedding.
    pub embedding: Vec<f32>,
    /// `usage.prompt_tokens`.
    pub tokens: u64,
    /// What the cache did for the input (`attn_cache.inputs[0]` of the answer).
    pub report: Option<InputReport>,
}

impl Embedded {
    /// The cache's decision for the input, as the answer reported it; `None` when the
    /// cache did not look it up (flag off, an exact repeat from the memo).
    pub fn decision(&self) -> Option<Decision> {
        let r = self.report?;
        let outcome = match r.outcome {
            InputOutcome::Hit => Outcome::ExactHit,
            InputOutcome::NearHit => Outcome::NearHit,
            InputOutcome::Miss => Outcome::Miss,
            InputOutcome::NotCached => Outcome::NotCached,
            InputOutcome::Off | InputOutcome::ExactRepeat => return None,
        };
        Some(Decision {
            outcome,
            distance: r.distance,
            tokens: self.tokens as usize,
            differing: r
                .differing_tokens
                .or((outcome == Outcome::ExactHit).then_some(0)),
            predicted_loss: r.predicted_error,
            recomputed_rows: r.recomputed_tokens.or(r.recomputed_rows).unwrap_or(0),
            lookup_ns: r.lookup_us.map_or(0, |us| (us * 1e3).round() as u64),
            residual_deviation: r.residual_deviation,
            resumed_after_layer: r.resumed_after_layer,
            check: r.check.map(|c| attncache_plugin::reuse::CheckSignals {
                pooled: c.pooled_deviation,
                stale: c.stale_deviation,
                residual: c.residual_deviation,
                moved_share: c.moved_share,
            }),
            stored_inputs: r.stored_inputs,
        })
    }
}

impl LocalServer {
    /// Loads the model as `attncache-server` would with `args` and serves it on 127.0.0.1.
    pub async fn start(args: &ServeArgs) -> anyhow::Result<Self> {
        Self::start_with(args, args.cache_config()).await
    }

    /// [`LocalServer::start`] with cache settings other than the flags'.
    pub async fn start_with(
        args: &ServeArgs,
        config: attncache_plugin::CacheConfig,
    ) -> anyhow::Result<Self> {
        // every request must reach the model: the measuring tools time and compare forwards
        // and the hot tier keeps its size (the tier evaluation resizes it itself)
        let args = ServeArgs {
            repeat_mib: 0,
            hot_sizing: crate::server::cli::HotSizing::Fixed,
            ..args.clone()
        };
        let app = crate::server::startup::build_with(&args, config).await?;
        let cache = app.hook.cache().context("the server has a cache")?.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/embeddings", listener.local_addr()?);
        let router = app.router;
        let serving = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!("local server stopped: {e}");
            }
        });
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        Ok(Self {
            hook: app.hook,
            cache,
            model: app.model,
            url,
            client,
            serving,
        })
    }

    /// The server's `/v1/embeddings` URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Embeds one input over HTTP.
    pub async fn embed(&self, text: &str) -> anyhow::Result<Embedded> {
        self.embed_body(serde_json::json!({"model": "default", "input": [text]}))
            .await
    }

    /// Embeds one input given as token ids over HTTP.
    pub async fn embed_ids(&self, ids: &[u32]) -> anyhow::Result<Embedded> {
        self.embed_body(serde_json::json!({"model": "default", "input": [ids]}))
            .await
    }

    async fn embed_body(&self, body: serde_json::Value) -> anyhow::Result<Embedded> {
        let resp = self.client.post(&self.url).json(&body).send().await?;
        let status = resp.status();
        if status != 200 {
            let text = resp.text().await.unwrap_or_default();
            anyhow::bail!("status {status}: {text}");
        }
        let v: serde_json::Value = resp.json().await?;
        let embedding = serde_json::from_value(v["data"][0]["embedding"].clone())?;
        let tokens = v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        let report = serde_json::from_value(v["attn_cache"]["inputs"][0].clone()).ok();
        Ok(Embedded {
            embedding,
            tokens,
            report,
        })
    }
}

/// Cosine similarity, accumulated in f64: the one the server's blend audit uses.
pub use crate::server::api::audit::cosine;
