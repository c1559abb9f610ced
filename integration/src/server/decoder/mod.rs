//! Serving a decoder LLM prefill-only: `--model FILE.gguf` loads a GGUF text model with
//! mistral.rs's GGUF loader (its own tokenizer from the file, no hub access), `--model DIR`
//! a Hugging Face llama or qwen2 directory in safetensors with its plain loader
//! ([`safetensors_dir`]; weights as stored, cast to f32), and serves
//! `POST /v1/classify` over label words from the last position's logits ([`routes`]) and
//! `POST /v1/score` / `/v1/rerank` by p(yes) under a prompt template ([`score`]), the
//! embedding routes answering 400 and mistral.rs's own routes behind them.
//!
//! The hook is installed before the model loads. Under `--exact-attention fast` (the
//! default) it asks for the weights dequantized once to f32 ([`weights`]) and computes the
//! projections, the MLP's gate and attention in the plugin's exact kernels; under `stock` it
//! steps aside and mistral.rs's own forward runs on the file's quantized weights, bit for
//! bit. A request with the cache flag on (`attn_cache`, `X-Attn-Cache`, or `--attn-cache
//! on` for every request) takes the K/V of its prompt's longest stored prefix from the
//! plugin's prefix store (patch 0008, `--hot-mib` of RAM) and leaves its own there.
//! mistral.rs's own prefix cacher is off: on CPU it keeps every finished sequence's K/V and
//! never evicts it.

pub mod blend_gate;
pub mod metrics;
pub mod model;
pub mod prefill;
pub mod routes;
pub mod safetensors_dir;
pub mod score;
pub mod score_setup;
pub mod state;
pub mod weights;

use std::sync::Arc;

use anyhow::Context;
use attncache_plugin::prefix::{BlockTier, DiskBlocks, PrefixStore};
use attncache_plugin::AttnCacheHook;
use axum::Router;
use mistralrs_core::{AutoDeviceMapParams, ModelDType, ModelSelected, TokenSource};
use mistralrs_server_core::mistralrs_for_server_builder::MistralRsForServerBuilder;
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;

pub use model::{DecoderFormat, DecoderModel, DecoderModelError};
pub use routes::DecoderState;

/// Token ids per block of the prefix store (a prefix ending mid-block is still reused to its
/// last token when a stored block continues it).
pub const PREFIX_BLOCK_TOKENS: usize = 16;

use crate::server::cli::{CacheBackend, OnOff, ServeArgs};

/// A loaded decoder, ready to serve.
pub struct DecoderApp {
    /// The decoder routes in front of mistral.rs's.
    pub router: Router,
    /// What the routes share.
    pub state: Arc<DecoderState>,
}

/// Flags that only mean something for an embedding model, if any was given for a decoder.
fn embedding_only_flag(args: &ServeArgs) -> Option<&'static str> {
    if args.classifier.is_some() {
        Some("--classifier (a decoder classifies by label words: POST /v1/classify with labels)")
    } else if args.projector.is_some() {
        Some("--projector")
    } else if args.error_gate.is_some() {
        Some("--error-gate")
    } else {
        None
    }
}

/// The prefix store's cold tier the flags name: `--cache-dir DIR` keeps blocks in
/// `DIR/prefix-blocks/`, `--cache-backend redis` in the Redis server of `--redis-url`.
fn prefix_cold_tier(args: &ServeArgs, seed: u64) -> anyhow::Result<Option<Arc<dyn BlockTier>>> {
    let budget = args.cold_mib.saturating_mul(1 << 20);
    match (args.cache_backend, &args.redis_url, &args.cache_dir) {
        (CacheBackend::Redis, None, _) => anyhow::bail!(
            "--cache-backend redis needs --redis-url (or ATTNCACHE_REDIS_URL), e.g. \
             redis://127.0.0.1:6379"
        ),
        (CacheBackend::Local, Some(_), _) => anyhow::bail!(
            "--redis-url is only used with --cache-backend redis (the default is local)"
        ),
        (CacheBackend::Redis, Some(_), _) => {
            let settings = args
                .redis_settings()
                .context("--cache-backend redis without Redis settings")?;
            let tier = attncache_plugin::prefix::RedisBlocks::open(settings, seed, budget)
                .context("the prefix store's Redis tier")?;
            Ok(Some(Arc::new(tier)))
        }
        (CacheBackend::Local, None, Some(dir)) => {
            let dir = dir.join("prefix-blocks");
            let tier = DiskBlocks::open(&dir, budget)
                .with_context(|| format!("the prefix store's directory {}", dir.display()))?;
            Ok(Some(Arc::new(tier)))
        }
        (CacheBackend::Local, None, None) => Ok(None),
    }
}

/// Whether `path` is served as a decoder: a GGUF file, or a text-model directory whose
/// `config.json` names a causal LM and that is not a sentence-transformers model (those,
/// Qwen3-Embedding among them, have `modules.json` and take the embedding path).
pub fn is_decoder(path: &std::path::Path) -> bool {
    DecoderModel::is_gguf(path) || safetensors_dir::is_decoder_dir(path)
}

/// Reads and checks the decoder at `path`: a GGUF file's header, or a directory's
/// `config.json`.
pub fn inspect(path: &std::path::Path) -> Result<DecoderModel, DecoderModelError> {
    if path.is_dir() {
        safetensors_dir::inspect(path)
    } else {
        DecoderModel::inspect_gguf(path)
    }
}

/// What mistral.rs loads for `model`: the GGUF loader on the file, or the plain loader on
/// the directory (its `config.json` picks the architecture), f32 on CPU either way.
fn model_selected(model: &DecoderModel) -> anyhow::Result<ModelSelected> {
    let utf8 = |p: &std::path::Path, what: &str| {
        p.to_str()
            .map(str::to_string)
            .with_context(|| format!("the model {what}'s path must be valid UTF-8"))
    };
    Ok(match model.format {
        DecoderFormat::Gguf => {
            let dir = model
                .path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            let file = model
                .path
                .file_name()
                .map(std::path::Path::new)
                .context("the model file has no name")?;
            ModelSelected::GGUF {
                tok_model_id: None,
                quantized_model_id: utf8(dir, "file's directory")?,
                quantized_filename: utf8(file, "file")?,
                dtype: ModelDType::F32,
                topology: None,
                max_seq_len: AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
                max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
            }
        }
        DecoderFormat::Safetensors => ModelSelected::Plain {
            model_id: utf8(&model.path, "directory")?,
            tokenizer_json: None,
            arch: None,
            dtype: ModelDType::F32,
            topology: None,
            organization: None,
            write_uqff: None,
            from_uqff: None,
            imatrix: None,
            calibration_file: None,
            max_seq_len: AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN,
            max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
            hf_cache_path: None,
            matformer_config_path: None,
            matformer_slice_name: None,
        },
    })
}

/// Checks the decoder (a GGUF file or a safetensors directory) and the flags, and loads it
/// on CPU (f32 activations).
/// The map reuse policy `--decoder-maps` asks for, refused where it cannot run: it needs
/// the GGUF llama or qwen2 model's known-maps hunk (patch 0013) and the fast kernel (which records
/// the maps), and it is another way than `--reuse blend` to reuse past the exact prefix.
fn decoder_maps_policy(
    args: &ServeArgs,
    model: &DecoderModel,
) -> anyhow::Result<attncache_plugin::DecoderMapsPolicy> {
    if args.reuse == attncache_plugin::ReuseKind::Blend {
        anyhow::bail!(
            "--decoder-maps and --reuse blend are two ways to reuse a stored prompt's work past \
             the exact prefix; choose one"
        );
    }
    if args.exact_attention != attncache_plugin::ExactAttention::Fast {
        anyhow::bail!(
            "--decoder-maps records maps with the fast attention kernel; it needs \
             --exact-attention fast"
        );
    }
    if model.format != DecoderFormat::Gguf || !["llama", "qwen2"].contains(&&*model.architecture) {
        anyhow::bail!(
            "--decoder-maps needs a GGUF llama or qwen2 model (patch 0013 lets their layers \
             skip q/k); this is a {} {:?} model",
            model.architecture,
            model.format
        );
    }
    let policy = attncache_plugin::DecoderMapsPolicy {
        min_shared: args.decoder_maps_min_shared,
        layers: args.reuse_layers.clone(),
        recompute_rest: args.decoder_maps_recompute_rest,
        recompute_last: args.decoder_maps_recompute_last,
        over_prefix: args.decoder_maps_over_prefix,
    };
    policy.validate(model.layers)?;
    tracing::info!(
        ?policy,
        "decoder map reuse on for requests with the cache flag \
        (approximate past the shared prefix unless --decoder-maps-recompute-rest)"
    );
    Ok(policy)
}

pub async fn build(args: &ServeArgs) -> anyhow::Result<DecoderApp> {
    if let Some(flag) = embedding_only_flag(args) {
        anyhow::bail!(
            "{flag} is for embedding models; {} is a decoder",
            args.model.display()
        );
    }
    let model = inspect(&args.model)?;
    let template =
        score_setup::ScoreTemplate::parse(&args.score_template).map_err(anyhow::Error::msg)?;
    let weights = weights::check(args.exact_attention, &model)?;
    if weights == weights::DecoderWeights::QuantizedNoF32Loader {
        tracing::warn!(architecture = %model.architecture,
            "the fast exact forward dequantizes {} weights; this architecture keeps mistral.rs's \
             quantized CPU matmuls (attention still runs in the plugin's kernel)",
            weights::F32_ARCHITECTURES.join(" and "));
    }
    tracing::info!(model = %args.model.display(), format = ?model.format,
        architecture = %model.architecture, layers = model.layers,
        context = model.context_length, weights = weights.describe(),
        exact_attention = %args.exact_attention, "loading a decoder");
    let selected = model_selected(&model)?;
    // the hook goes in before the model loads: in fast mode the loader then dequantizes the
    // weights to f32 for the hook's kernels (patch 0007); its prefix store serves the
    // requests whose cache flag is on (patch 0008)
    let budget = args.hot_mib.saturating_mul(1 << 20);
    let key = format!("{}|{}", model.fingerprint(), args.exact_attention);
    let mut store = PrefixStore::new(budget, PREFIX_BLOCK_TOKENS, &key);
    if let Some(tier) = prefix_cold_tier(args, store.seed())? {
        store = store.with_cold_tier(tier);
    }
    let mut hook = AttnCacheHook::new(args.exact_attention).with_prefix_store(Arc::new(store));
    let mut gate_info = None;
    if args.blend_gate.is_some() && args.reuse != attncache_plugin::ReuseKind::Blend {
        anyhow::bail!("--blend-gate bounds blend hits; it needs --reuse blend");
    }
    if args.reuse == attncache_plugin::ReuseKind::Blend {
        let gate = match args.blend_gate.as_deref() {
            Some(path) => {
                let gate = blend_gate::DecoderBlendGate::load(path, &model)?;
                tracing::info!(file = %path.display(), check_layer = gate.check_layer,
                    share = gate.share, stale_below = gate.stale_below,
                    "decoder blend gate: a hit is taken only when its stale deviation is under \
                     the calibrated bound");
                Some(gate)
            }
            None => None,
        };
        let policy = blend_gate::policy(args, gate.as_ref())?;
        policy.validate()?;
        gate_info = gate.map(|g| g.describe);
        if model.format != DecoderFormat::Gguf
            || !["llama", "qwen2"].contains(&model.architecture.as_str())
        {
            tracing::warn!(architecture = %model.architecture, format = ?model.format,
                "--reuse blend: decoder blend needs the layer loop patch 0012 gives the GGUF \
                 llama and qwen2 models; this model serves exact prefix reuse only");
        }
        tracing::info!(
            ?policy,
            "decoder blend on for requests with the cache flag (approximate past the exact prefix)"
        );
        hook = hook.with_decoder_blend(policy);
    }
    if args.decoder_maps {
        hook = hook.with_decoder_maps(decoder_maps_policy(args, &model)?, model.layers, budget);
    }
    let hook = Arc::new(hook);
    attncache_plugin::install(hook.clone());
    let mistral = MistralRsForServerBuilder::new()
        .with_model(selected)
        .with_cpu(true)
        .with_token_source(TokenSource::None)
        .with_max_seqs(args.max_seqs as usize)
        .with_prefix_cache_n(args.engine_prefix_cache)
        .build()
        .await
        .context("mistral.rs could not load the decoder")?;
    let score =
        score_setup::ScoreSetup::prepare(&mistral, &template, &args.score_yes, &args.score_no)
            .await?;
    tracing::info!(
        model = %model.id(),
        prefix_store_mib = args.hot_mib,
        cache_by_default = args.attn_cache == OnOff::On,
        "decoder ready: POST /v1/classify (labels), /v1/score and /v1/rerank (p(yes) under --score-template); requests with the cache flag reuse stored prompt prefixes"
    );
    let state = Arc::new(
        DecoderState::new(
            mistral.clone(),
            model,
            args.max_in_flight as usize,
            hook,
            weights,
            args.attn_cache == OnOff::On,
            score,
        )
        .with_blend_gate(gate_info),
    );
    let mistral_router = MistralRsServerRouterBuilder::new()
        .with_mistralrs(mistral)
        .build()
        .await?;
    Ok(DecoderApp {
        router: routes::router(
            state.clone(),
            mistral_router,
            Arc::new(crate::server::api::auth::ApiKeys::new(&args.api_key)),
        ),
        state,
    })
}
