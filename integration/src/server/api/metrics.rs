//! `GET /metrics` in the Prometheus text format (`prometheus-client`): request counts and
//! latency per endpoint and status, inputs per cache outcome, lookup latency, and the
//! cache's own counters and tier sizes (read at scrape time).

use std::sync::Arc;
use std::time::Duration;

use attncache_plugin::AttnCache;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::ApiState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Upper bounds of the audit histogram's buckets: dense where the fidelity floors are
/// (0.99 per hit, 0.997 mean).
const AUDIT_BUCKETS: [f64; 12] = [
    0.9, 0.95, 0.97, 0.98, 0.985, 0.99, 0.995, 0.997, 0.998, 0.999, 0.9995, 0.9999,
];

/// Requests by endpoint and status, 4xx answers and latency: the families every server
/// kind (embedding model or decoder) registers under the same names.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
    rejected: Family<EndpointLabels, Counter>,
    duration: Family<EndpointLabels, Histogram>,
    inputs: Family<OutcomeLabels, Counter>,
}

impl HttpMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "attncache_http_requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        let rejected = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "attncache_rejected_requests",
            "Requests answered with a 4xx status",
            rejected.clone(),
        );
        let duration = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "attncache_request_duration_seconds",
            "Time to answer a request",
            duration.clone(),
        );
        let inputs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "attncache_inputs",
            "Inputs by cache outcome (off, exact_repeat, hit, near_hit, miss, not_cached; on a decoder: off, miss, prefix_hit)",
            inputs.clone(),
        );
        Self {
            requests,
            rejected,
            duration,
            inputs,
        }
    }

    /// Counts a finished request.
    pub fn request(&self, endpoint: &'static str, status: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, status })
            .inc();
        if (400..500).contains(&status) {
            self.rejected
                .get_or_create(&EndpointLabels { endpoint })
                .inc();
        }
        self.duration
            .get_or_create(&EndpointLabels { endpoint })
            .observe(took.as_secs_f64());
    }

    /// Counts one input of outcome `outcome`.
    pub fn input(&self, outcome: &'static str) {
        self.inputs.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// Counters given by name, help and value (counts as `u64`, seconds as `f64`), encoded as
/// Prometheus counters.
pub(crate) fn encode_counters<N: EncodeCounterValue + Copy>(
    encoder: &mut DescriptorEncoder,
    counters: &[(&str, &str, N)],
) -> Result<(), std::fmt::Error> {
    for &(name, help, value) in counters {
        let counter = ConstCounter::new(value);
        counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
    }
    Ok(())
}

/// Gauges given by name, help and value.
pub(crate) fn encode_gauges(
    encoder: &mut DescriptorEncoder,
    gauges: &[(&str, &str, f64)],
) -> Result<(), std::fmt::Error> {
    for &(name, help, value) in gauges {
        let gauge = ConstGauge::new(value);
        gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
    }
    Ok(())
}

/// The text exposition of `registry`, as `GET /metrics` answers it.
pub(crate) fn render_response(registry: &Registry) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, registry) {
        Ok(()) => (
            [(
                CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => super::error::ApiError::internal("cannot encode metrics").into_response(),
    }
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http: HttpMetrics,
    lookup: Histogram,
    queue_depth: Gauge,
    engine_inputs: Gauge,
    queue_wait: Histogram,
    batch_size: Histogram,
    blend_audit: Histogram,
    blend_audit_skipped: Counter,
}

/// The cache's counters, read on every scrape.
#[derive(Debug)]
struct CacheCollector(Arc<AttnCache>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.0.counts();
        let counters: [(&str, &str, u64); 23] = [
            (
                "attncache_lookups",
                "Inputs looked up in the cache",
                c.lookups,
            ),
            (
                "attncache_not_cached",
                "Flag-on inputs outside the cached lengths (computed exactly, never stored)",
                c.not_cached,
            ),
            (
                "attncache_hits",
                "Inputs whose maps came from the cache (exact and near)",
                c.hits,
            ),
            (
                "attncache_near_hits",
                "Hits that used a similar input's maps",
                c.near_hits,
            ),
            ("attncache_misses", "Inputs computed exactly", c.misses),
            (
                "attncache_blend_candidates",
                "Blend candidates found by lookups (--reuse blend), each counted once as a hit or a miss when the check layer settles it",
                c.blend_candidates,
            ),
            (
                "attncache_blend_hits",
                "Blend hits (--reuse blend): inputs that recomputed only the positions that deviate",
                c.blend_hits,
            ),
            (
                "attncache_blend_refused",
                "Blend candidates refused at the check layer (computed exactly from there)",
                c.blend_refused,
            ),
            (
                "attncache_blend_unprofitable",
                "Blend candidates refused because their predicted speed-up was under --blend-min-gain (counted among attncache_blend_refused)",
                c.blend_unprofitable,
            ),
            (
                "attncache_blend_gate_refused",
                "Blend candidates the fidelity gate refused (--blend-gate: every rule's check-layer signal over its calibrated bound; counted among attncache_blend_refused)",
                c.blend_gate_refused,
            ),
            (
                "attncache_blend_escalated",
                "Blend hits escalated: positions recomputed up to the resume layer, every position after it",
                c.blend_escalated,
            ),
            (
                "attncache_recomputed_tokens",
                "Positions recomputed by blend hits",
                c.recomputed_tokens,
            ),
            (
                "attncache_recorded",
                "Inputs whose maps were stored",
                c.recorded,
            ),
            ("attncache_hot_hits", "Hits served from RAM", c.hot_hits),
            (
                "attncache_cold_hits",
                "Hits read from the cold tier (disk, or Redis with --cache-backend redis)",
                c.cold_hits,
            ),
            (
                "attncache_hot_evictions",
                "Entries evicted from the hot tier",
                c.hot_evictions,
            ),
            (
                "attncache_cold_evictions",
                "Files removed from the cold tier",
                c.cold_evictions,
            ),
            (
                "attncache_corrupt_entries",
                "Corrupt, truncated or foreign files found",
                c.corrupt,
            ),
            (
                "attncache_cold_writes_skipped",
                "Cold-tier copies skipped because the background writer was behind",
                c.cold_writes_skipped,
            ),
            (
                "attncache_cold_write_failures",
                "Cold-tier writes that failed (full disk, quota, permissions, Redis down); the entry stayed in RAM",
                c.cold_write_failures,
            ),
            (
                "attncache_shared_tier_errors",
                "Redis calls that failed or timed out (each a miss or a skipped write, never a failed request)",
                c.shared_errors,
            ),
            (
                "attncache_shared_tier_skipped",
                "Redis calls skipped while Redis was marked down after an error",
                c.shared_skipped,
            ),
            (
                "attncache_shared_announced",
                "Entries other replicas stored in Redis that this replica indexed",
                c.announced,
            ),
        ];
        encode_counters(&mut encoder, &counters)?;
        let hit_rate = c.hits as f64 / c.lookups.max(1) as f64;
        let gauges: [(&str, &str, f64); 9] = [
            (
                "attncache_hit_rate",
                "Hits over lookups since start",
                hit_rate,
            ),
            (
                "attncache_hot_bytes",
                "Bytes in the hot tier",
                c.hot_bytes as f64,
            ),
            (
                "attncache_hot_entries",
                "Entries in the hot tier",
                c.hot_entries as f64,
            ),
            (
                "attncache_cold_bytes",
                "Bytes in the cold tier",
                c.cold_bytes as f64,
            ),
            (
                "attncache_cold_entries",
                "Entries in the cold tier",
                c.cold_entries as f64,
            ),
            (
                "attncache_indexed_entries",
                "Entries in the similarity index",
                c.indexed as f64,
            ),
            (
                "attncache_cold_tier_unavailable",
                "Cache scopes whose cold directory could not be opened (RAM only)",
                c.cold_unavailable as f64,
            ),
            (
                "attncache_shared_tier_up",
                "1 when every scope's Redis tier is reachable (or none is configured), 0 while any is marked down",
                f64::from(u8::from(c.shared_down == 0)),
            ),
            (
                "attncache_forward_seconds_per_input",
                "Mean prefill forward time per input since start (what hot-tier sizing weighs a slowdown against)",
                self.0.forward_ns_per_input() / 1e9,
            ),
        ];
        encode_gauges(&mut encoder, &gauges)?;
        let sizing = self.0.hot_tier_sizing();
        let decisions = ConstCounter::new(sizing.count);
        decisions.encode(encoder.encode_descriptor(
            "attncache_hot_tier_decisions",
            "Hot-tier sizing decisions taken (one per scope per round)",
            None,
            decisions.metric_type(),
        )?)?;
        let budget = ConstGauge::new(sizing.budget_bytes as f64);
        budget.encode(encoder.encode_descriptor(
            "attncache_hot_tier_budget_bytes",
            "The hot tier's current budget (chosen by --hot-sizing auto, else --hot-mib)",
            None,
            budget.metric_type(),
        )?)?;
        if !sizing.decisions.is_empty() {
            let n = sizing.decisions.len() as f64;
            let slowdown: f64 = sizing.decisions.iter().map(|d| d.predicted_slowdown).sum();
            let gauge = ConstGauge::new(slowdown / n);
            gauge.encode(encoder.encode_descriptor(
                "attncache_hot_tier_predicted_slowdown",
                "Predicted slowdown at the chosen hot-tier size against everything in RAM (latest decision)",
                None,
                gauge.metric_type(),
            )?)?;
        }
        if let Some(cost) = sizing.cost {
            let mut family = encoder.encode_descriptor(
                "attncache_tier_cost_seconds",
                "Measured cost of one lookup that finds its entry in RAM, in the cold tier (disk or Redis), or nowhere",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (kind, ns) in [
                ("hot_hit", cost.hot_hit_ns),
                ("cold_hit", cost.cold_hit_ns),
                ("miss", cost.miss_ns),
            ] {
                ConstGauge::new(ns / 1e9).encode(family.encode_family(&[("kind", kind)])?)?;
            }
        }
        let mut curve = encoder.encode_descriptor(
            "attncache_hot_tier_predicted_miss_ratio",
            "Share of re-accesses that would miss an LRU hot tier of hot_mib MiB (sampled reuse distances)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (bytes, ratio) in self.0.hot_tier_curve() {
            let labels = [("hot_mib", (bytes >> 20).to_string())];
            ConstGauge::new(ratio).encode(curve.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Registers every metric; the cache's counters are read from `cache` at scrape time.
    pub fn new(cache: Arc<AttnCache>) -> Self {
        let mut registry = Registry::default();
        let http = HttpMetrics::register(&mut registry);
        let lookup = Histogram::new(exponential_buckets(1e-6, 2.0, 20));
        registry.register(
            "attncache_lookup_duration_seconds",
            "Time of one cache lookup (hash, index search, tier read and decode)",
            lookup.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "attncache_queue_depth",
            "Inputs waiting, in arrival order, for a place in the engine",
            queue_depth.clone(),
        );
        let engine_inputs = Gauge::default();
        registry.register(
            "attncache_engine_inputs",
            "Inputs in the engine (at most --engine-batches batches of up to --max-seqs)",
            engine_inputs.clone(),
        );
        let queue_wait = Histogram::new(exponential_buckets(1e-4, 2.0, 20));
        registry.register(
            "attncache_queue_wait_seconds",
            "Time an input waited in the queue before it entered the engine",
            queue_wait.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register(
            "attncache_engine_batch_size",
            "Inputs in each batch the queue let into the engine (equal token lengths)",
            batch_size.clone(),
        );
        registry.register_collector(Box::new(CacheCollector(cache)));
        let blend_audit = Histogram::new(AUDIT_BUCKETS);
        registry.register(
            "attncache_blend_audit_fidelity",
            "Audited near blend hits (--blend-audit-rate): cosine of the served embedding to the exact one",
            blend_audit.clone(),
        );
        let blend_audit_skipped = Counter::default();
        registry.register(
            "attncache_blend_audits_skipped",
            "Near blend hits sampled for an audit but not audited (one was running, or the exact run failed)",
            blend_audit_skipped.clone(),
        );
        Self {
            registry,
            http,
            lookup,
            queue_depth,
            engine_inputs,
            queue_wait,
            batch_size,
            blend_audit,
            blend_audit_skipped,
        }
    }

    /// Records an audited near blend hit's fidelity (cosine to the exact embedding).
    pub fn blend_audit(&self, cosine: f64) {
        self.blend_audit.observe(cosine);
    }

    /// Counts a near blend hit sampled for an audit that did not take place.
    pub fn blend_audit_skipped(&self) {
        self.blend_audit_skipped.inc();
    }

    /// Counts a finished request.
    pub fn request(&self, endpoint: &'static str, status: u16, took: Duration) {
        self.http.request(endpoint, status, took);
    }

    /// The queue's gauges, for [`super::queue::EngineQueue`] to keep up to date.
    pub fn queue_gauges(&self) -> super::queue::QueueGauges {
        super::queue::QueueGauges {
            depth: self.queue_depth.clone(),
            inside: self.engine_inputs.clone(),
            wait: self.queue_wait.clone(),
            batch_size: self.batch_size.clone(),
        }
    }

    /// Counts one input's cache outcome and its lookup time (microseconds).
    pub fn input(&self, outcome: super::outcome::InputOutcome, lookup_us: Option<f64>) {
        self.http.input(outcome.as_str());
        if let Some(us) = lookup_us {
            self.lookup.observe(us / 1e6);
        }
    }
}

/// The route.
#[utoipa::path(get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    render_response(&state.metrics.registry)
}
