//! Command-line flags of `attncache-server`.

use std::path::PathBuf;

use attncache_plugin::ExactAttention;
use clap::{Parser, ValueEnum};

/// The default `--score-template` of a decoder's `/v1/score` and `/v1/rerank`: a plain
/// prompt an instruction-tuned decoder can follow.
pub const DEFAULT_SCORE_TEMPLATE: &str = "Query: {query}\nDocument: {document}\nDoes the \
    document answer the query? Answer yes or no.\nAnswer:";

/// Serves a local embedding model with mistral.rs's OpenAI-compatible API
/// (`POST /v1/embeddings`, `GET /v1/models`, `GET /health`) and the AttnCache attention hook.
///
/// The model is loaded from local files only (no hub access): a directory with `config.json`,
/// `model.safetensors`, `tokenizer.json` and sentence-transformers `modules.json`, or a
/// decoder LLM (a GGUF file, or a llama / qwen2 directory in safetensors without
/// `modules.json`), served prefill-only (`POST /v1/classify` with label words).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "attncache-server",
    version,
    about,
    long_about,
    args_override_self = true
)]
pub struct ServeArgs {
    /// TOML file of settings: keys are these flags' long names (`hot_mib = 1024`,
    /// `attn_cache = "on"`); flags on the command line override it; unknown keys are refused.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Model directory, or a decoder LLM: a GGUF file (`*.gguf`; `scripts/fetch-llm` fetches
    /// SmolLM2-135M-Instruct) or a Hugging Face directory whose config.json names
    /// LlamaForCausalLM or Qwen2ForCausalLM and that has no modules.json (served
    /// prefill-only: POST /v1/classify over label words, /v1/score, /v1/rerank). Default:
    /// EmbeddingGemma-300M as fetched by `scripts/fetch-model`.
    #[arg(long, env = "ATTNCACHE_MODEL_DIR", default_value_os_t = default_model_dir())]
    pub model: PathBuf,

    /// Address to listen on. Keep 127.0.0.1 unless the port is protected otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on; 0 picks a free port. The chosen address is printed on stdout
    /// as `listening on http://HOST:PORT`.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,

    /// Kernels used when no cached map applies. `fast`: explicit matrix-multiply attention
    /// (about 3x mistral.rs's on CPU), linear projections without per-call weight repacking
    /// and a vectorised tanh-GELU, within 1e-5 of mistral.rs. `stock`: mistral.rs's own
    /// kernels, bit for bit (the hook steps aside). Decode steps always use stock. For a GGUF
    /// decoder, `fast` also dequantizes the weights once at load to f32 (the function PyTorch
    /// computes on the file; ~20x stock on CPU) where `stock` keeps the file's quantized
    /// matmuls, which round the activations to 8 bits as llama.cpp does.
    #[arg(long, default_value_t = ExactAttention::Fast, value_parser = parse_exact)]
    pub exact_attention: ExactAttention,

    /// Weight and activation dtype. `f32` is the default on CPU: mistral.rs's `auto` picks
    /// f16 there, which turns EmbeddingGemma's embeddings into NaN, so f16 and auto are
    /// refused for Gemma-3 models; bf16 is refused on CPU (candle has no CPU bf16 matmul).
    #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
    pub dtype: DTypeArg,

    /// Whether requests that do not say use the cache (the deployment default; a request's
    /// `attn_cache` field or `X-Attn-Cache` header overrides it). With the cache: an exact
    /// repeat is answered from memory (--repeat-mib); an input with the same token ids as a
    /// stored one reuses its stored work; a near duplicate (up to --blend-length-slack tokens
    /// longer or shorter, few tokens differing) takes a stored neighbour's per-layer K/V and
    /// recomputes only the positions its edit moved (--reuse blend, what `make serve` runs;
    /// --blend-gate bounds what a hit may leave stale, and a hit over the bound or too short
    /// to pay is computed exactly), or reuses its attention maps when --error-gate or
    /// --similarity-threshold allow it (--reuse maps). Near hits are not exact: docs/blend.md
    /// says what is guaranteed and on what. Everything else is computed exactly
    /// (--exact-attention) and recorded. Flag off is always the exact path. For a decoder
    /// the cache reuses exact prompt prefixes: a prompt takes the per-layer K/V of its
    /// longest stored prefix (whole blocks of 16 token ids, then the ids it shares with the
    /// stored block that follows) and computes the rest; with --reuse blend (GGUF llama and
    /// qwen2) it also takes a stored near-duplicate's K/V past the prefix where the
    /// --blend-gate file's bound allows (`make llm-serve` does both; docs/decoders.md).
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    pub attn_cache: OnOff,

    /// Directory of the cold tier (checksummed map files, read through mmap; entries survive
    /// restarts). Without it the cache lives in RAM only. For a decoder: its prompt-prefix
    /// K/V blocks, checksummed files in DIR/prefix-blocks/ (a damaged one is a miss).
    #[arg(long, conflicts_with = "redis_url")]
    pub cache_dir: Option<PathBuf>,

    /// Where the cold tier lives. `local`: --cache-dir on this machine (or RAM only).
    /// `redis`: a Redis server shared by every replica (--redis-url): an entry one replica
    /// stores becomes a hit on the others (for a decoder: the prompt-prefix blocks one
    /// replica computed), each keeping its own hot tier and index. Redis
    /// down or slow degrades to this replica's hot tier, with a warning and the
    /// `attncache_shared_tier_up` metric, never a failed request.
    #[arg(long, value_enum, default_value_t = CacheBackend::Local)]
    pub cache_backend: CacheBackend,

    /// Redis server of --cache-backend redis, `redis://[user:password@]host:port[/db]`
    /// (prefer the environment variable when it holds a password: `ps` shows flags).
    #[arg(long, env = "ATTNCACHE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Key prefix in Redis: replicas with the same prefix (and model) share entries; use
    /// another prefix for an unrelated deployment on the same server.
    #[arg(long, default_value = "attncache")]
    pub redis_prefix: String,

    /// Seconds a shared entry lives after its last use (0: until --cold-mib evicts it).
    #[arg(long, default_value_t = 0)]
    pub redis_ttl_secs: u64,

    /// Longest a request waits for Redis, ms, plus the entry's size at 100 MiB/s; a late
    /// answer is a miss and Redis is skipped for a second. Writes (off the request path) may
    /// take 10x as long.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60000))]
    pub redis_timeout_ms: u64,

    /// Announcements of new entries kept in Redis (per scope); a replica started later
    /// indexes at most this many of the entries already shared.
    #[arg(long, default_value_t = 10000, value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_stream_len: u64,

    /// RAM budget of the hot tier, MiB of attention maps. For a decoder: MiB of stored
    /// prompt-prefix K/V (SmolLM2-135M: about 46 KB a token).
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    pub hot_mib: u64,

    /// How the hot tier is sized. `auto`: --hot-mib is the most it may use; every
    /// --hot-resize-secs the server picks the least RAM whose predicted slowdown against
    /// "everything in RAM" stays under --hot-target-loss (from sampled reuse distances and
    /// the tier costs measured at start-up) and resizes the tier. `fixed`: always --hot-mib.
    #[arg(long, value_enum, default_value_t = HotSizing::Auto)]
    pub hot_sizing: HotSizing,

    /// Largest predicted slowdown the automatic hot-tier size may cost (0.05 = 5%).
    #[arg(long, default_value_t = 0.05, value_parser = parse_loss)]
    pub hot_target_loss: f64,

    /// Seconds between hot-tier sizing decisions (with --hot-sizing auto).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub hot_resize_secs: u64,

    /// Record every cache access (lookup outcome or stored entry: `op,scope,key,bytes`, no
    /// input content) to this CSV file, for `attncache size --trace FILE`.
    #[arg(long)]
    pub access_trace: Option<PathBuf>,

    /// Budget of the cold tier, MiB (least recently used entries are removed past it). With
    /// --cache-backend redis: the budget of the entries in Redis (give every replica the same).
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u64).range(1..))]
    pub cold_mib: u64,

    /// Record an input's maps on its n-th miss (1: first), so one-off inputs do not churn the store.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub admit_after: u32,

    /// Largest feature distance at which a *different* input of the same length reuses a
    /// stored input's maps. Unset: identical token ids only. Take it from
    /// `attncache calibrate`, which measures the fidelity each distance costs.
    #[arg(long)]
    pub similarity_threshold: Option<f32>,

    /// Predicted-error gate (JSON written by `attncache-eval`: `config/gate-default.json` is
    /// the Pareto-best safe configuration for EmbeddingGemma-300M with mean-pool features):
    /// a *different* input reuses its best-ranked neighbour's
    /// maps (fewest differing tokens, then nearest feature) only when the gate's calibrated
    /// upper bound on the error (1 − cosine of the embedding) is within --max-error.
    /// Replaces --similarity-threshold. A gate is calibrated for one model, feature kind
    /// and reuse policy; the policy recorded in the file applies unless --reuse-layers,
    /// --reuse-heads, --recompute-differing, --recompute-budget or --length-slack are given.
    #[arg(long)]
    pub error_gate: Option<PathBuf>,

    /// Target error of the --error-gate: the largest predicted 1 − cosine a near hit may
    /// have (0.01: cosine ≥ 0.99). Unset: the target recorded in the gate file.
    #[arg(long, requires = "error_gate", value_parser = parse_loss)]
    pub max_error: Option<f64>,

    /// Layers whose stored maps a near hit reuses, comma-separated (e.g. `12,13,14`); the
    /// others compute attention exactly. Empty (default): every layer. Exact-token hits
    /// always reuse every layer.
    #[arg(long, value_delimiter = ',')]
    pub reuse_layers: Vec<usize>,

    /// (layer:head) maps a near hit reuses, comma-separated (e.g. `12:0,12:2,13:1`); the other
    /// heads of those layers, and the layers with none listed, compute attention exactly.
    /// Empty (default): every head of the --reuse-layers.
    #[arg(long, value_delimiter = ',', value_parser = parse_layer_head)]
    pub reuse_heads: Vec<[usize; 2]>,

    /// Selective recompute: on a near hit, recompute the attention rows of the positions
    /// whose token differs from the neighbour's in every reused layer (such hits then run
    /// the q/k projections).
    #[arg(long, value_enum, default_value_t = OnOff::Off)]
    pub recompute_differing: OnOff,

    /// With --recompute-differing on: also recompute up to N rows next to the differing
    /// positions (nearest first).
    #[arg(long, default_value_t = 0)]
    pub recompute_budget: usize,

    /// Near hits may take the maps of stored inputs up to N tokens longer or shorter (an
    /// edit that adds or removes a token), aligned token by token to the input.
    #[arg(long, default_value_t = 0)]
    pub length_slack: usize,

    /// Directory of a trained feature projector (`attncache train-projector`) for this
    /// model. Its features find similar stored inputs; its calibrated threshold (set by
    /// `attncache calibrate --projector DIR --save-threshold`) applies unless
    /// --similarity-threshold is given. Without it, untrained mean-pool features are used.
    #[arg(long)]
    pub projector: Option<PathBuf>,

    /// Longest input (in tokens) that is cached; longer inputs are computed exactly and never
    /// stored. Default: 1024 with --reuse maps (a map entry grows with the square of the
    /// length: EmbeddingGemma needs 151 MB at 1024 tokens), 2048 (the model's context) with
    /// --reuse blend (a blend entry grows linearly: 33.8 KB per token with the default f16 K/V
    /// and resume states, measured by `make blend-eval`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub cache_max_tokens: Option<u64>,

    /// What a hit reuses. `maps`: the stored input's attention maps (a hit skips q/k, QKᵀ
    /// and softmax in the layers it reuses). `blend`: the stored input's per-layer K/V and
    /// hidden states; layers up to --blend-check-layer run on every position, the rest only
    /// on the positions whose token differs or whose state there deviates by more than
    /// --blend-max-deviation (refused, and computed exactly, when those are more than
    /// --blend-max-share of the input). Entries of the other kind are misses.
    #[arg(long, value_parser = parse_reuse, default_value = "maps")]
    pub reuse: attncache_plugin::ReuseKind,

    /// --reuse blend: the layer after which the recomputed positions are chosen (0: the
    /// first; later layers cost more on every hit and bought nothing when measured).
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().check_layer)]
    pub blend_check_layer: usize,

    /// --reuse blend: the largest relative deviation ‖h − h_stored‖/‖h_stored‖ of a
    /// position's state after the check layer that may keep the stored states.
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().max_deviation)]
    pub blend_max_deviation: f32,

    /// --reuse blend: the largest share of an input's positions a blend hit recomputes; a
    /// hit that needs more is refused (and computed exactly from the check layer on).
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().max_recompute_share)]
    pub blend_max_share: f32,

    /// --reuse blend: the smallest share of an input's positions a blend hit recomputes when
    /// any state moved (the positions of largest deviation are added up to it); 1.0
    /// recomputes every position (the exact output, for testing); below 1 it is scaled by
    /// --blend-dilution when only part of the input moved.
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().min_recompute_share)]
    pub blend_min_share: f32,

    /// --reuse blend: the largest deviation of the input as a whole after the check layer
    /// (1 − cos of the mean of its positions' RMS-normalised states against the stored
    /// input's) a hit may take; over it the hit is refused before any layer is skipped
    /// (computed exactly, no work lost). The default 2.0 (the largest 1 − cos can be) is no bound.
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().max_pooled_deviation)]
    pub blend_max_pooled_deviation: f32,

    /// --reuse blend: how a recorded entry keeps each layer's K/V. `f16`; or `int8`, a byte a
    /// value plus a scale per token, layer and head: 18.6 instead of 30.7 KB a token on
    /// EmbeddingGemma, so the same tiers hold 1.6x the entries (fidelity cost:
    /// docs/blend.md). Entries of either format are read, whatever this says.
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().kv_format)]
    pub blend_kv: attncache_plugin::KvFormat,

    /// --reuse blend: escalate, instead of refusing, a hit the fast rule refuses (more than
    /// --blend-max-share of its positions deviate): the layers up to N run on
    /// --blend-escalate-share of the positions, then the stored input's states after layer N
    /// take those positions' fresh rows and the remaining layers run on every position.
    /// Entries recorded with a resume layer keep their states after it (3 KB a token more on
    /// EmbeddingGemma); entries without them are refused as before. `off`: no escalation
    /// (a layer the model does not have past the check layer is the same). The default is
    /// `make blend-eval`'s choice for EmbeddingGemma (its 24 layers; 11 is a global one).
    #[arg(long, value_parser = parse_resume_layer,
          default_value_t = OrOff(attncache_plugin::BlendPolicy::default().resume_layer))]
    pub blend_resume_layer: OrOff,

    /// --reuse blend: the smallest predicted speed-up a hit must have over the exact forward;
    /// one predicted under it is refused at the check layer and computed exactly (counted in
    /// attncache_blend_unprofitable_total). The prediction counts the rows every layer runs
    /// on (every position up to the check layer, the recomputed ones after it, every one
    /// after the resume layer of an escalated hit), each layer costing
    /// --blend-fixed-tokens more however few rows it runs: short inputs, where a layer
    /// costs about the same on a few rows as on all, are refused. 0 or 1: no such refusal.
    #[arg(long, value_name = "X", default_value_t = attncache_plugin::BlendPolicy::default().min_gain)]
    pub blend_min_gain: f32,

    /// --reuse blend: what a layer costs however few rows it runs on, in tokens, for
    /// --blend-min-gain's prediction: the intercept over the slope of the exact forward's
    /// time against input length on this machine and model.
    #[arg(long, value_name = "TOKENS", default_value_t = attncache_plugin::BlendPolicy::default().fixed_tokens)]
    pub blend_fixed_tokens: f32,

    /// --reuse blend: the share (0 to 1) of near blend hits computed again exactly, in the
    /// background after their answer, to measure what the hit cost: the cosine of the served
    /// embedding to the exact one goes to the /metrics histogram
    /// `attncache_blend_audit_fidelity`. Audits run one at a time through the same queue as
    /// requests (a sampled hit that finds one running is skipped and counted), so each costs
    /// one exact forward of spare capacity. 0 (the default): no audits.
    #[arg(long, value_name = "R", default_value_t = 0.0, value_parser = parse_rate)]
    pub blend_audit_rate: f64,

    /// Decoders (GGUF llama, qwen2) with --reuse blend: requests with the cache flag whose
    /// exact stored prefix ends at an edit of a stored prompt take that prompt's K/V past the
    /// edit, and runs of 16 ids stored in any prompt (a document recurring after another
    /// query) take that prompt's K/V at their new offset. The layers up to and including
    /// this one run on every position after the prefix; each position's V there against the
    /// stored one chooses what the later layers recompute. The answer is approximate; a
    /// --blend-gate file bounds how far (docs/decoders.md). Default: the gate file's, else 1.
    #[arg(long, value_name = "LAYER")]
    pub decoder_blend_check_layer: Option<usize>,

    /// Decoders with --reuse blend: the share (0 to 1) of the positions a stored prompt could
    /// give that are recomputed anyway, those whose V deviates most at the check layer
    /// (besides the positions whose id differs, and the last one, always recomputed); 1
    /// recomputes every position (the exact answer, for testing). Default: the gate file's,
    /// else 0.15.
    #[arg(long, value_name = "R", value_parser = parse_share)]
    pub decoder_blend_share: Option<f32>,

    /// Decoders with --reuse blend: a prompt whose positions after its exact prefix are more
    /// than this share (0 to 1) ids the stored prompt does not have at that position is
    /// served as a plain prefix hit (exact), not blended.
    #[arg(long, value_name = "R", value_parser = parse_share,
          default_value_t = attncache_plugin::DecoderBlendPolicy::default().max_share)]
    pub decoder_blend_max_share: f32,

    /// Decoders with --reuse blend: at the check layer, a hit is taken only when its stale
    /// deviation (the largest ‖v − v_stored‖ / ‖v_stored‖ among the positions it would keep
    /// stored, reported per input as `stale_deviation`) is below D; otherwise the prompt is
    /// computed exactly from there on (and stored). Default: the --blend-gate file's bound,
    /// else none; 0 refuses every blend.
    #[arg(long, value_name = "D")]
    pub decoder_blend_stale_below: Option<f32>,

    /// Decoders (GGUF llama, qwen2): map reuse, the AttnCache paper's method, instead of prefix
    /// reuse for requests with the cache flag (on top of it with --decoder-maps-over-prefix).
    /// A prompt that shares an exact prefix of at
    /// least --decoder-maps-min-shared of its tokens with a stored prompt takes that prompt's
    /// attention maps in the --reuse-layers (default every layer) and skips the q/k
    /// projections and the scores there: the shared prefix's rows are the stored ones
    /// (f16), the rows after it the stored prompt's own, stretched to the new length
    /// (approximate; --decoder-maps-recompute-rest computes them exactly instead, and
    /// --decoder-maps-recompute-last N the last N rows). Any other
    /// prompt is computed exactly and its maps stored, up to --hot-mib (a prompt of L tokens
    /// takes layers × heads × L²/2 × 2 bytes: 104 MB at 620 tokens on SmolLM2-135M).
    /// Needs --exact-attention fast; excludes --reuse blend (docs/decoders.md).
    #[arg(long)]
    pub decoder_maps: bool,

    /// --decoder-maps: the least share (0 to 1] of a prompt's tokens that must be an exact
    /// prefix shared with a stored prompt for its maps to be used.
    #[arg(long, value_name = "R", requires = "decoder_maps", value_parser = parse_share,
          default_value_t = attncache_plugin::DecoderMapsPolicy::default().min_shared)]
    pub decoder_maps_min_shared: f32,

    /// --decoder-maps: compute the rows after the shared prefix exactly (k is then projected
    /// for every position, q for those rows only), so only the shared prefix's rows come
    /// from the stored maps: within f16 rounding of exact, and a smaller saving.
    #[arg(long, requires = "decoder_maps")]
    pub decoder_maps_recompute_rest: bool,

    /// --decoder-maps: compute the last N rows exactly (the last one gives the answer): k is
    /// then projected for every position and q for those rows only; the other rows still
    /// come from the stored maps. 0 (the default): none, as in the paper.
    #[arg(long, value_name = "N", requires = "decoder_maps", default_value_t = 0)]
    pub decoder_maps_recompute_last: usize,

    /// --decoder-maps: take map reuse on top of exact prefix reuse instead of in its place.
    /// A prompt whose head the prefix store holds loads that head's K/V and computes only
    /// its rest; in the reused layers the rest's rows then come from the stored maps (over
    /// the head's V and the rest's). A prompt the prefix store gives nothing is served as
    /// without this flag. Its maps are recorded only when it is computed whole.
    #[arg(long, requires = "decoder_maps")]
    pub decoder_maps_over_prefix: bool,

    /// --reuse blend: a fidelity gate file written by `attncache-blend-eval` (`make serve`
    /// passes config/blend-gate.json, calibrated for EmbeddingGemma-300M). At the check layer a
    /// hit is taken only when what it would leave stale (its check-layer signal) is within
    /// the bound calibrated for its length band and rule (fast, then escalated); otherwise it
    /// is computed exactly (attncache_blend_gate_refused_total). The file says what the bound
    /// targets (at most 1% of accepted hits under cosine 0.99 to the exact embedding) and on
    /// which pairs it was fitted; /info shows it. Without one, every hit the rules accept is
    /// taken. With a GGUF decoder: a decoder gate file written by llm_gate.py for that model
    /// (`make llm-serve` passes config/decoder-blend-gate-smollm2.json), which sets the check
    /// layer, the share and --decoder-blend-stale-below; a file fitted for another model is
    /// refused at start.
    #[arg(long, value_name = "FILE")]
    pub blend_gate: Option<PathBuf>,

    /// --reuse blend: the share of the positions an escalated hit recomputes up to
    /// --blend-resume-layer (the differing positions, then the largest deviations).
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().escalate_share)]
    pub blend_escalate_share: f32,

    /// --reuse blend: how the fast rule's bounds follow the share w of an input's positions
    /// whose state moved at the check layer (an edit to a long input moves only the
    /// positions within the sliding window of it): the deviation bound becomes
    /// --blend-max-deviation / w^P and the smallest share --blend-min-share · w^P. 0: bounds
    /// independent of w. Inputs that moved everywhere (w = 1) are treated the same whatever P is.
    #[arg(long, value_name = "P",
          default_value_t = attncache_plugin::BlendPolicy::default().dilution)]
    pub blend_dilution: f32,

    /// --reuse blend: inputs of at least N tokens look up their stored neighbour (and read
    /// its entry, from disk or Redis when it is not in RAM) on a thread of their own while
    /// the model's first layer runs, instead of before it. `off` (the default): always
    /// before. Measured on 2 cores: 1.06x / 1.08x per hit read from Redis at 1024 / 2048
    /// tokens (a 35 / 69 MB entry), no gain from disk, 5% slower at 256–512 tokens from RAM
    /// (docs/blend.md); try 1024 with Redis and cores to spare.
    #[arg(long, value_name = "N", value_parser = parse_tokens_or_off,
          default_value_t = OrOff(attncache_plugin::BlendPolicy::default().lookup_overlap_from))]
    pub blend_lookup_overlap_from: OrOff,

    /// --reuse blend: stored inputs up to N tokens longer or shorter are candidates, their
    /// K/V aligned token by token and re-rotated to the input's positions.
    #[arg(long, default_value_t = attncache_plugin::BlendPolicy::default().length_slack)]
    pub blend_length_slack: usize,

    /// RAM for exact repeats, MiB: with the cache on, an input seen before (same text or
    /// token ids) gets its remembered embedding back without running the model. 0: off
    /// (every input reaches the model and the map cache).
    #[arg(long, default_value_t = 64)]
    pub repeat_mib: u64,

    /// Untrained features used without --projector: `mean-pool` (mean of the layer-0
    /// states) or `segment-pool` (means of 8 spans of tokens, concatenated: keeps where in
    /// the input a difference is). A calibrated threshold belongs to one kind.
    #[arg(long, value_enum, default_value_t = UntrainedFeatures::MeanPool, conflicts_with = "projector")]
    pub features: UntrainedFeatures,

    /// Classification head directory (`attncache train-head`): enables `POST /v1/classify`.
    #[arg(long)]
    pub classifier: Option<PathBuf>,

    /// Inputs (summed over requests) that may be in flight at once on /v1/embeddings and
    /// /v1/classify; a request that would exceed it gets 429 with Retry-After at once,
    /// instead of waiting in an unbounded queue.
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_in_flight: u32,

    /// API key that `/v1/` requests must send as `Authorization: Bearer KEY` (repeat the flag,
    /// or separate keys by commas, for several; prefer the environment variable, which `ps`
    /// does not show). Without any key the server is open. `/health` and `/metrics` stay open.
    #[arg(
        long,
        env = "ATTNCACHE_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,

    /// Who shares cached maps. `global`: every request (most reuse; a client can tell from
    /// response times, or the `attn_cache` report, whether someone sent a similar input).
    /// `per-key`: one scope per API key (needs --api-key), each with an equal share of
    /// --hot-mib and --cold-mib: a key never hits, evicts or times another's entries.
    #[arg(long, value_enum, default_value_t = CacheScope::Global)]
    pub cache_scope: CacheScope,

    /// Seconds a request body may take to arrive; a slower (or stalled) client gets 408.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_secs: u64,

    /// Cut inputs longer than the model reads (EmbeddingGemma: 2048 tokens) instead of
    /// answering 400, keeping their start (a request's `truncation_direction: left` keeps
    /// the end; its `truncate: false` still refuses). Like TEI's `--auto-truncate`.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub auto_truncate: bool,

    /// Batches of inputs in mistral.rs at once; later inputs wait in arrival order. The
    /// oldest waiting input opens the next batch and every waiting input of the same token
    /// length (from any request, up to --max-seqs) joins it, so mistral.rs still batches
    /// equal lengths. Its scheduler runs one length bucket per step and picks among several
    /// by length and urgency: with every input inside, short inputs overtake long ones (a
    /// p99 87x to 109x the median measured at 8 clients by `make serve-load`). At 2 (the
    /// default) an input is overtaken by at most the batch inside with it; at 1 by none. 0:
    /// no queue (every input goes to mistral.rs at once). (`--engine-requests` is the former name.)
    #[arg(long, alias = "engine-requests", default_value_t = 2)]
    pub engine_batches: u32,

    /// Most sequences the scheduler runs in one batch.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_seqs: u32,

    /// Decoders only: turn on mistral.rs's own prefix cacher (every request, whatever
    /// its cache flag) with this many sequences on the device. On CPU it keeps every finished
    /// sequence's K/V and never evicts it (SmolLM2-135M: about 46 KB a token, forever), so
    /// it is off by default; `make llm-bench` turns it on to compare it with the cache's own
    /// prefix reuse (`--attn-cache`, bounded by --hot-mib).
    #[arg(long, default_value_t = 0)]
    pub engine_prefix_cache: usize,

    /// Decoders only: the prompt `/v1/score` and `/v1/rerank` read a query and a
    /// document through, with `{query}` and `{document}` each once. The score is p(yes) of
    /// the next word: the softmax of the --score-yes and --score-no words' logits at the last
    /// position (as Qwen3-Reranker scores; docs/decoders.md has its template). The template's
    /// text, the query and each document are tokenized apart and joined, so the documents of
    /// one query share its token prefix, and with the cache flag its stored K/V.
    #[arg(long, default_value = DEFAULT_SCORE_TEMPLATE)]
    pub score_template: String,

    /// Decoders only: the word whose probability is the score (one token of the model;
    /// mind the leading space). If it or --score-no is not one token, /v1/score and
    /// /v1/rerank answer 400 saying so.
    #[arg(long, default_value = " yes", allow_hyphen_values = true)]
    pub score_yes: String,

    /// Decoders only: the word the --score-yes word is weighed against.
    #[arg(long, default_value = " no", allow_hyphen_values = true)]
    pub score_no: String,
}

/// Untrained feature kinds (see `--features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum UntrainedFeatures {
    /// Mean over tokens, unit length.
    MeanPool,
    /// Means of 8 token spans, concatenated.
    SegmentPool,
}

/// How the hot tier is sized (see `--hot-sizing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HotSizing {
    /// The least RAM that keeps the predicted slowdown under the target.
    Auto,
    /// Always --hot-mib.
    Fixed,
}

fn parse_layer_head(s: &str) -> Result<[usize; 2], String> {
    let parsed = s
        .split_once(':')
        .and_then(|(l, h)| Some([l.trim().parse().ok()?, h.trim().parse().ok()?]));
    parsed.ok_or_else(|| format!("{s:?} is not LAYER:HEAD, e.g. 12:0"))
}

fn parse_share(s: &str) -> Result<f32, String> {
    parse_rate(s).map(|v| v as f32)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a share in [0, 1], e.g. 0.01 for 1%")),
    }
}

fn parse_loss(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a fraction in [0, 1), e.g. 0.05 for 5%"
        )),
    }
}

/// Where the cold tier lives (see `--cache-backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheBackend {
    /// Files in --cache-dir on this machine (or RAM only).
    Local,
    /// A Redis server shared by replicas.
    Redis,
}

/// Who shares cached maps (see `--cache-scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheScope {
    /// One cache for every request.
    Global,
    /// One scope per API key.
    PerKey,
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl ServeArgs {
    /// --cache-max-tokens, or its default for the --reuse kind.
    pub fn cache_max_tokens(&self) -> u64 {
        self.cache_max_tokens.unwrap_or(match self.reuse {
            attncache_plugin::ReuseKind::Maps => 1024,
            attncache_plugin::ReuseKind::Blend => 2048,
        })
    }

    /// The cache settings these flags describe.
    pub fn cache_config(&self) -> attncache_plugin::CacheConfig {
        attncache_plugin::CacheConfig {
            enabled_by_default: self.attn_cache == OnOff::On,
            hot_bytes: self.hot_mib << 20,
            cold_dir: self.cache_dir.clone(),
            cold_bytes: self.cold_mib << 20,
            admit_after: self.admit_after,
            similarity_threshold: self.similarity_threshold,
            max_tokens: self.cache_max_tokens() as usize,
            reuse_kind: self.reuse,
            blend: attncache_plugin::BlendPolicy {
                check_layer: self.blend_check_layer,
                max_deviation: self.blend_max_deviation,
                max_recompute_share: self.blend_max_share,
                min_recompute_share: self.blend_min_share,
                length_slack: self.blend_length_slack,
                max_pooled_deviation: self.blend_max_pooled_deviation,
                kv_format: self.blend_kv,
                resume_layer: self.blend_resume_layer.0,
                escalate_share: self.blend_escalate_share,
                dilution: self.blend_dilution,
                lookup_overlap_from: self.blend_lookup_overlap_from.0,
                min_gain: self.blend_min_gain,
                fixed_tokens: self.blend_fixed_tokens,
                gate: None,
            },
            access_trace: self.access_trace.clone(),
            scopes: match self.cache_scope {
                CacheScope::Global => Vec::new(),
                CacheScope::PerKey => {
                    crate::server::api::auth::ApiKeys::new(&self.api_key).scope_names()
                }
            },
            features: match (&self.projector, self.features) {
                (Some(dir), _) => attncache_plugin::FeatureKind::Projector(dir.clone()),
                (None, UntrainedFeatures::MeanPool) => attncache_plugin::FeatureKind::MeanPool,
                (None, UntrainedFeatures::SegmentPool) => {
                    attncache_plugin::FeatureKind::SegmentPool
                }
            },
            redis: self.redis_settings(),
            reuse: attncache_plugin::ReusePolicy {
                layers: self.reuse_layers.clone(),
                heads: self.reuse_heads.clone(),
                recompute_differing: self.recompute_differing == OnOff::On,
                recompute_budget: self.recompute_budget,
                length_slack: self.length_slack,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// The Redis tier's settings under `--cache-backend redis` (the URL empty when not
    /// given: startup refuses that), `None` with the local backend.
    pub fn redis_settings(&self) -> Option<attncache_plugin::RedisSettings> {
        (self.cache_backend == CacheBackend::Redis).then(|| attncache_plugin::RedisSettings {
            url: self.redis_url.clone().unwrap_or_default(),
            prefix: self.redis_prefix.clone(),
            ttl_secs: self.redis_ttl_secs,
            timeout_ms: self.redis_timeout_ms,
            stream_len: self.redis_stream_len as usize,
        })
    }

    /// The fidelity gate of `--blend-gate`, if given.
    pub fn blend_gate(&self) -> anyhow::Result<Option<attncache_plugin::reuse::FidelityGate>> {
        self.blend_gate
            .as_deref()
            .map(attncache_plugin::reuse::FidelityGate::load)
            .transpose()
            .map_err(anyhow::Error::from)
    }

    /// The error gate of `--error-gate` (with `--max-error` applied), if given.
    pub fn error_gate(&self) -> anyhow::Result<Option<attncache_plugin::ErrorGate>> {
        let Some(path) = &self.error_gate else {
            return Ok(None);
        };
        let gate = attncache_plugin::ErrorGate::load(path)?;
        Ok(Some(match self.max_error {
            Some(t) => gate.with_max_loss(t),
            None => gate,
        }))
    }
}

/// The dtypes `--dtype` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit floats (default; exact on CPU).
    F32,
    /// bfloat16 (GPU only with candle).
    Bf16,
    /// 16-bit floats (breaks Gemma-3 embeddings).
    F16,
    /// Let mistral.rs choose (f16 on CPU).
    Auto,
}

fn parse_reuse(s: &str) -> Result<attncache_plugin::ReuseKind, String> {
    s.parse()
        .map_err(|e: attncache_plugin::AttnCacheError| e.to_string())
}

/// A number, or `off`: `--blend-resume-layer` (a layer index; off: no escalation) and
/// `--blend-lookup-overlap-from` (a number of tokens; off: never).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrOff(pub Option<usize>);

impl std::fmt::Display for OrOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => write!(f, "{n}"),
            None => f.write_str("off"),
        }
    }
}

/// `s` as [`OrOff`]; `what` names the number in the error.
fn parse_or_off(s: &str, what: &str) -> Result<OrOff, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "off" | "none" => Ok(OrOff(None)),
        n => n
            .parse()
            .map(|n| OrOff(Some(n)))
            .map_err(|_| format!("{s:?} is neither {what} nor `off`")),
    }
}

fn parse_resume_layer(s: &str) -> Result<OrOff, String> {
    parse_or_off(s, "a layer index")
}

fn parse_tokens_or_off(s: &str) -> Result<OrOff, String> {
    parse_or_off(s, "a number of tokens")
}

fn parse_exact(s: &str) -> Result<ExactAttention, String> {
    s.parse()
        .map_err(|e: attncache_plugin::AttnCacheError| e.to_string())
}

/// `~/.cache/attncache/models/embeddinggemma-300m`, where `scripts/fetch-model` puts the default model.
pub fn default_model_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache/attncache/models/embeddinggemma-300m")
}
