//! Loads the model, installs the attention hook, builds the router and serves it.

use std::sync::Arc;

use anyhow::Context;
use attncache_plugin::{AttnCache, AttnCacheHook, CacheConfig};
use axum::Router;
use mistralrs_core::{ModelSelected, TokenSource};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;
use tokio::net::TcpListener;

use crate::server::api::ApiState;
use crate::server::cli::ServeArgs;
use crate::server::model_dir::ModelDir;

/// A loaded model with the hook installed, ready to serve.
pub struct App {
    /// Our routes (`/v1/embeddings`, `/metrics`) in front of mistral.rs's
    /// (`/v1/models`, `/health`, …).
    pub router: Router,
    /// The installed hook (shared with mistral.rs); its mode can be switched at run time.
    pub hook: Arc<AttnCacheHook>,
    /// The checked model directory.
    pub model: ModelDir,
    /// What our routes share (metrics, the exact-repeat memo).
    pub api: Arc<ApiState>,
}

/// With `--hot-sizing auto`: measures the tier costs for an entry of the model's shape
/// (cached in the cache directory) and re-decides the hot tier's size every
/// `--hot-resize-secs` on a background task. Without the model's attention shape, or when
/// the costs cannot be measured, the hot tier stays at `--hot-mib` (with a warning).
fn start_hot_sizing(args: &ServeArgs, model: &ModelDir, cache: &Arc<AttnCache>) {
    use attncache_plugin::tiering::costs::{self, ColdSource};
    if args.hot_sizing == crate::server::cli::HotSizing::Fixed {
        return;
    }
    let Some(shape) = model.entry_shape((args.cache_max_tokens() as usize).min(128)) else {
        tracing::warn!("config.json gives no attention shape: the hot tier stays at --hot-mib");
        return;
    };
    let scratch = || costs::measure(&shape, ColdSource::Dir(&std::env::temp_dir()), 7);
    // without a cache directory the only cold tier is Redis, read over the network: price
    // its hits as they are; while it does not answer, local disk reads stand in and Redis
    // is timed again at each resize
    let mut redis_unpriced = false;
    let measured = match args.cache_dir.as_ref().filter(|d| d.is_dir()) {
        Some(dir) => costs::measure_cached(&shape, dir, 7),
        None => match cache.measure_tier_costs(&shape, 7) {
            Some(Ok(m)) => Ok(m),
            Some(Err(e)) => {
                tracing::warn!(
                    "cannot time reads from Redis ({e}): cold hits are priced as local disk \
                     reads until Redis answers"
                );
                redis_unpriced = true;
                scratch()
            }
            // no cold tier: the sizing prices a hot-tier miss as a recomputation anyway
            None => scratch(),
        },
    };
    let measured = match measured {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("cannot measure the tier costs, the hot tier stays at --hot-mib: {e}");
            return;
        }
    };
    tracing::info!(
        tokens = shape.tokens,
        cold_tier = cache.cold_kind().unwrap_or("none"),
        hot_hit_us = measured.hot_hit_ns / 1e3,
        cold_hit_us = measured.cold_hit_ns / 1e3,
        miss_us = measured.miss_ns / 1e3,
        target_loss = args.hot_target_loss,
        every_secs = args.hot_resize_secs,
        "hot tier sized automatically, at most --hot-mib"
    );
    cache.set_tier_costs(measured.cost_model());
    let (cache, target) = (cache.clone(), args.hot_target_loss);
    let every = std::time::Duration::from_secs(args.hot_resize_secs);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.tick().await; // the first tick is immediate
        loop {
            ticks.tick().await;
            let cache = cache.clone();
            let unpriced = redis_unpriced;
            redis_unpriced = tokio::task::spawn_blocking(move || {
                let still = unpriced && !reprice_from_redis(&cache, &shape);
                cache.resize_hot_tier(target);
                still
            })
            .await
            .unwrap_or(unpriced);
        }
    });
}

/// Times reads from the Redis tier again and, when it answers, prices cold hits by them
/// (the other costs are measured again too). Whether it did.
fn reprice_from_redis(
    cache: &AttnCache,
    shape: &attncache_plugin::tiering::costs::EntryShape,
) -> bool {
    match cache.measure_tier_costs(shape, 7) {
        Some(Ok(m)) => {
            tracing::info!(
                hot_hit_us = m.hot_hit_ns / 1e3,
                cold_hit_us = m.cold_hit_ns / 1e3,
                miss_us = m.miss_ns / 1e3,
                "Redis answers again: cold hits are now priced as reads from Redis"
            );
            cache.set_tier_costs(m.cost_model());
            true
        }
        Some(Err(e)) => {
            tracing::debug!("Redis still cannot be timed: {e}");
            false
        }
        None => true,
    }
}

/// Checks the model directory and dtype, loads the model on CPU and installs the hook.
pub async fn build(args: &ServeArgs) -> anyhow::Result<App> {
    build_with(args, args.cache_config()).await
}

/// [`build`] with cache settings other than the flags' (tools that record or measure).
pub async fn build_with(args: &ServeArgs, config: CacheConfig) -> anyhow::Result<App> {
    anyhow::ensure!(
        args.engine_prefix_cache == 0,
        "--engine-prefix-cache is for GGUF decoders; {} is an embedding model",
        args.model.display()
    );
    anyhow::ensure!(
        args.score_template == crate::server::cli::DEFAULT_SCORE_TEMPLATE
            && args.score_yes == " yes"
            && args.score_no == " no",
        "--score-template, --score-yes and --score-no are for GGUF decoders; {} is an \
         embedding model (its /v1/rerank scores by embedding cosine)",
        args.model.display()
    );
    if args.cache_scope == crate::server::cli::CacheScope::PerKey
        && crate::server::api::auth::ApiKeys::new(&args.api_key).is_open()
    {
        anyhow::bail!(
            "--cache-scope per-key needs at least one --api-key (or ATTNCACHE_API_KEY): the \
             scopes are per key"
        );
    }
    match (args.cache_backend, &args.redis_url) {
        (crate::server::cli::CacheBackend::Redis, None) => anyhow::bail!(
            "--cache-backend redis needs --redis-url (or ATTNCACHE_REDIS_URL), e.g. \
             redis://127.0.0.1:6379"
        ),
        (crate::server::cli::CacheBackend::Local, Some(_)) if config.redis.is_none() => {
            anyhow::bail!(
                "--redis-url is only used with --cache-backend redis (the default is local)"
            )
        }
        _ => {}
    }
    let config = match args.blend_gate()? {
        Some(gate) => {
            tracing::info!(gate = %gate.describe(), "blend fidelity gate loaded");
            CacheConfig {
                blend: attncache_plugin::BlendPolicy {
                    gate: Some(gate),
                    ..config.blend
                },
                ..config
            }
        }
        None => config,
    };
    config.validate()?;
    let model = ModelDir::inspect(&args.model)?;
    let dtype = model.cpu_dtype(args.dtype)?;
    let model_id = model
        .path
        .to_str()
        .context("the model directory's path must be valid UTF-8")?
        .to_string();
    tracing::info!(model = %model_id, model_type = %model.model_type, ?dtype, exact_attention = %args.exact_attention, "loading");
    let selected = ModelSelected::Embedding {
        model_id,
        tokenizer_json: None,
        arch: None,
        dtype,
        topology: None,
        write_uqff: None,
        from_uqff: None,
        hf_cache_path: None,
    };
    let state = MistralRsForServerBuilder::new()
        .with_model(selected)
        .with_cpu(true)
        .with_token_source(TokenSource::None)
        .with_max_seqs(args.max_seqs as usize)
        .build()
        .await
        .context("mistral.rs could not load the model")?;
    let fingerprints = model
        .fingerprints()
        .context("cannot read the model files")?;
    let fingerprint = fingerprints.stable;
    let gate = args.error_gate()?.or(config.error_gate);
    // the gate's own policy, unless the flags set one
    let reuse = match gate.as_ref().and_then(|g| g.reuse.clone()) {
        Some(policy) if config.reuse == attncache_plugin::ReusePolicy::default() => policy,
        _ => config.reuse,
    };
    let config = CacheConfig {
        error_gate: gate,
        reuse,
        legacy_fingerprint: Some(fingerprints.legacy),
        ..config
    };
    let cache = AttnCache::open(config, fingerprint)?;
    let features = cache.features().describe();
    let lookups = match (cache.similarity_threshold(), cache.features().projector()) {
        _ if cache.error_gate().is_some() => {
            let gate = cache.error_gate().map(|g| g.max_loss).unwrap_or_default();
            format!(
                "exact matches, and neighbours (same length, or within the policy's length slack) whose predicted error (1 - cosine) is at most {gate} ({features}; near hits reuse {})",
                cache.reuse_policy().describe()
            )
        }
        (None, None) => "exact token-id matches only (no trained projector: pass --projector DIR from `attncache train-projector`)".to_string(),
        (None, Some(_)) => format!("exact token-id matches only ({features} has no calibrated threshold: run `attncache calibrate --projector DIR --save-threshold`)"),
        (Some(t), _) => format!("exact matches, and same-length neighbours within feature distance {t} ({features})"),
    };
    let counts = cache.counts();
    tracing::info!(
        fingerprint = format!("{fingerprint:016x}"),
        config = ?cache.config(),
        cold_entries = counts.cold_entries,
        "attention-map cache ready: {lookups}"
    );
    let cache = Arc::new(cache);
    start_hot_sizing(args, &model, &cache);
    let hook = Arc::new(AttnCacheHook::with_cache(
        args.exact_attention,
        cache.clone(),
        model.layers,
    ));
    attncache_plugin::install(hook.clone());
    let classifier = match &args.classifier {
        Some(dir) => {
            let head = crate::server::classifier::Classifier::load(
                dir,
                fingerprint,
                Some(fingerprints.legacy),
            )?;
            tracing::info!(
                labels = ?head.config.labels,
                test_accuracy = head.config.test_accuracy,
                "classifier loaded: POST /v1/classify"
            );
            Some(head)
        }
        None => None,
    };
    let api = Arc::new(
        ApiState::new(
            state.clone(),
            cache,
            model.clone(),
            args.repeat_mib << 20,
            classifier,
            args.max_in_flight as usize,
        )?
        .with_auto_truncate(args.auto_truncate)
        .with_blend_audit(args.blend_audit_rate)
        .with_engine_queue(args.engine_batches as usize, args.max_seqs as usize)
        .with_body_timeout(std::time::Duration::from_secs(args.body_timeout_secs))
        .with_api_keys(&args.api_key),
    );
    if !api.api_keys.is_open() {
        tracing::info!(
            keys = api.api_keys.len(),
            cache_scope = ?args.cache_scope,
            "API keys required on /v1/"
        );
    }
    let mistral_router = MistralRsServerRouterBuilder::new()
        .with_mistralrs(state)
        .build()
        .await?;
    Ok(App {
        router: crate::server::api::router(api.clone(), mistral_router),
        hook,
        model,
        api,
    })
}

/// Binds `host:port`, prints `listening on http://ADDR` on stdout and serves until SIGINT/SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    if crate::server::decoder::is_decoder(&args.model) {
        return serve_decoder(args).await;
    }
    let app = build(&args).await?;
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, "serving");
    let hook = app.hook.clone();
    axum::serve(listener, app.router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    if let Some(cache) = hook.cache() {
        cache.flush(); // finish the queued cold-tier writes before exiting
    }
    tracing::info!("stopped");
    Ok(())
}

/// [`serve`] for a decoder (`--model FILE.gguf`).
async fn serve_decoder(args: ServeArgs) -> anyhow::Result<()> {
    let app = crate::server::decoder::build(&args).await?;
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    tracing::info!(%addr, "serving a decoder");
    axum::serve(listener, app.router)
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
