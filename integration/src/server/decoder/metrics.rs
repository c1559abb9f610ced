//! `GET /metrics` on a decoder, in the Prometheus text format: requests, 4xx answers and
//! latency per endpoint and inputs per cache outcome (the same families as the embedding
//! server's, from [`HttpMetrics`]), and the prefix store's counters and sizes, its cold
//! tier's included, and decoder blend's counters when it is on, read at scrape time.

use std::sync::Arc;
use std::time::Instant;

use attncache_plugin::prefix::PrefixStore;
use attncache_plugin::AttnCacheHook;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;

use crate::server::api::metrics::{encode_counters, encode_gauges, render_response, HttpMetrics};

/// The decoder server's metrics.
#[derive(Debug)]
pub struct DecoderMetrics {
    registry: Registry,
    http: HttpMetrics,
}

/// The prefix store's counters, read on every scrape.
#[derive(Debug)]
struct PrefixCollector(Arc<PrefixStore>);

impl Collector for PrefixCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.0.counts();
        encode_counters(
            &mut encoder,
            &[
                (
                    "attncache_prefix_hits",
                    "Prompts that took a stored prefix's K/V",
                    c.hits,
                ),
                (
                    "attncache_prefix_misses",
                    "Prompts with the cache flag that found no stored prefix",
                    c.misses,
                ),
                (
                    "attncache_prefix_tokens_reused",
                    "Prompt tokens whose K/V came from the prefix store",
                    c.tokens_reused,
                ),
                (
                    "attncache_prefix_blocks_stored",
                    "Prefix blocks stored",
                    c.blocks_stored,
                ),
                (
                    "attncache_prefix_rejected",
                    "Offered K/V not stored (shapes that disagree)",
                    c.rejected,
                ),
            ],
        )?;
        encode_gauges(
            &mut encoder,
            &[
                (
                    "attncache_prefix_blocks",
                    "Prefix blocks held in RAM",
                    c.blocks_held as f64,
                ),
                (
                    "attncache_prefix_bytes",
                    "Bytes of prefix K/V held in RAM",
                    c.bytes_held as f64,
                ),
            ],
        )?;
        if let Some(cold) = c.cold {
            encode_counters(
                &mut encoder,
                &[
                    (
                        "attncache_prefix_cold_reads",
                        "Prefix blocks read back from the cold tier (disk or Redis)",
                        cold.reads,
                    ),
                    (
                        "attncache_prefix_cold_corrupt",
                        "Prefix blocks found damaged, truncated or foreign (misses; removed)",
                        cold.corrupt,
                    ),
                    (
                        "attncache_prefix_cold_writes",
                        "Prefix blocks written to the cold tier",
                        cold.writes,
                    ),
                    (
                        "attncache_prefix_cold_writes_skipped",
                        "Prefix blocks not written because the writer was behind",
                        cold.writes_skipped,
                    ),
                    (
                        "attncache_prefix_cold_failures",
                        "Cold-tier reads or writes that failed (full disk, Redis down)",
                        cold.failures,
                    ),
                    (
                        "attncache_prefix_cold_evictions",
                        "Prefix blocks removed from the cold tier to stay within --cold-mib",
                        cold.evictions,
                    ),
                ],
            )?;
            encode_gauges(
                &mut encoder,
                &[
                    (
                        "attncache_prefix_cold_blocks",
                        "Prefix blocks in the cold tier",
                        cold.blocks as f64,
                    ),
                    (
                        "attncache_prefix_cold_bytes",
                        "Bytes of prefix blocks in the cold tier",
                        cold.bytes as f64,
                    ),
                ],
            )?;
        }
        Ok(())
    }
}

/// Decoder blend's counters, read from the hook on every scrape.
#[derive(Debug)]
struct BlendCollector(Arc<AttnCacheHook>);

impl Collector for BlendCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.0.decoder_blend_counts() else {
            return Ok(());
        };
        encode_counters(
            &mut encoder,
            &[
                (
                    "attncache_decoder_blend_hits",
                    "Prompts served from a stored prompt's K/V past their exact prefix",
                    c.hits,
                ),
                (
                    "attncache_decoder_blend_refused",
                    "Prompts with a stored continuation served as plain prefix hits (too much \
                     to recompute, or too little to reuse)",
                    c.refused,
                ),
                (
                    "attncache_decoder_blend_recomputed_positions",
                    "Positions recomputed after the check layer over all decoder blend hits",
                    c.recomputed,
                ),
                (
                    "attncache_decoder_blend_reused_positions",
                    "Positions taken from stored prompts over all decoder blend hits",
                    c.reused,
                ),
                (
                    "attncache_decoder_blend_refused_stale",
                    "Decoder blend plans computed exactly from the check layer on: their stale \
                     deviation was not below --decoder-blend-stale-below",
                    c.refused_stale,
                ),
                (
                    "attncache_decoder_blend_found_by_content",
                    "Decoder blend plans that took a stored span found by content further on \
                     in the prompt (a document recurring after another query)",
                    c.found_by_content,
                ),
            ],
        )
    }
}

/// The hook's attention time, read on every scrape.
#[derive(Debug)]
struct AttentionCollector(Arc<AttnCacheHook>);

impl Collector for AttentionCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode_counters(
            &mut encoder,
            &[(
                "attncache_exact_attention_seconds",
                "Seconds in the fast exact attention kernel (scores, softmax, P·V) of prompt \
                 layers; stored-map layers are in attncache_decoder_maps_attention_seconds",
                seconds(self.0.stats().exact_attention_ns),
            )],
        )
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Decoder map reuse's counters, read from the hook on every scrape.
#[derive(Debug)]
struct MapsCollector(Arc<AttnCacheHook>);

impl Collector for MapsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(c) = self.0.decoder_maps_counts() else {
            return Ok(());
        };
        encode_counters(
            &mut encoder,
            &[
                (
                    "attncache_decoder_maps_hits",
                    "Prompts that took a stored prompt's attention maps (--decoder-maps)",
                    c.hits,
                ),
                (
                    "attncache_decoder_maps_recorded",
                    "Prompts computed exactly whose attention maps were stored",
                    c.recorded,
                ),
                (
                    "attncache_decoder_maps_exact",
                    "Prompts with the cache flag computed exactly without storing maps \
                     (batched with other prompts, a shape the recording kernel does not take, \
                     or maps larger than --hot-mib)",
                    c.exact,
                ),
            ],
        )?;
        encode_counters(
            &mut encoder,
            &[
                (
                    "attncache_decoder_maps_lookup_seconds",
                    "Seconds spent finding prompts' stored neighbours (the lookup)",
                    seconds(c.lookup_ns),
                ),
                (
                    "attncache_decoder_maps_attention_seconds",
                    "Seconds in the attention kernels of layers taken from stored maps (P·V \
                     from the maps, exactly computed rows' scores and softmax)",
                    seconds(c.attention_ns),
                ),
            ],
        )?;
        encode_gauges(
            &mut encoder,
            &[
                (
                    "attncache_decoder_maps_entries",
                    "Prompts whose attention maps are stored",
                    c.entries as f64,
                ),
                (
                    "attncache_decoder_maps_bytes",
                    "Bytes of stored attention maps (bounded by --hot-mib)",
                    c.bytes as f64,
                ),
            ],
        )
    }
}

impl DecoderMetrics {
    /// Registers every metric; the prefix store's, when `hook` has one, and decoder
    /// blend's, when it is on, are read from `hook` at scrape time.
    pub fn new(hook: &Arc<AttnCacheHook>) -> Self {
        let mut registry = Registry::default();
        let http = HttpMetrics::register(&mut registry);
        registry.register_collector(Box::new(AttentionCollector(hook.clone())));
        if let Some(store) = hook.prefix_store().cloned() {
            registry.register_collector(Box::new(PrefixCollector(store)));
        }
        if hook.decoder_blend_policy().is_some() {
            registry.register_collector(Box::new(BlendCollector(hook.clone())));
        }
        if hook.decoder_maps_policy().is_some() {
            registry.register_collector(Box::new(MapsCollector(hook.clone())));
        }
        Self { registry, http }
    }

    /// Counts each input's cache outcome (`off`, `miss`, `prefix_hit`, `maps_hit`, `blend_hit`,
    /// `blend_refused`).
    pub fn inputs(&self, outcomes: impl IntoIterator<Item = &'static str>) {
        for outcome in outcomes {
            self.http.input(outcome);
        }
    }
}

/// The endpoint label of a decoder route (`None`: not one of ours, not counted).
fn endpoint(path: &str) -> Option<&'static str> {
    Some(match path {
        "/v1/classify" => "classify",
        "/v1/score" | "/score" => "score",
        "/v1/rerank" | "/v2/rerank" | "/rerank" => "rerank",
        "/info" => "info",
        "/metrics" => "metrics",
        _ => return None,
    })
}

/// Middleware counting every answered request of the decoder's routes.
pub async fn count(
    State(metrics): State<Arc<DecoderMetrics>>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let name = matched.as_ref().and_then(|m| endpoint(m.as_str()));
    let t0 = Instant::now();
    let response = next.run(request).await;
    if let Some(name) = name {
        metrics
            .http
            .request(name, response.status().as_u16(), t0.elapsed());
    }
    response
}

/// `GET /metrics`.
pub async fn metrics(State(metrics): State<Arc<DecoderMetrics>>) -> Response {
    render_response(&metrics.registry)
}
