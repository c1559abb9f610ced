//! Sizing the hot tier the way Tuna sizes fast memory: the least RAM whose predicted
//! slowdown against "everything hot" stays under a target.
//!
//! - [`ReuseSampler`] estimates the hot tier's miss-ratio curve online from the stream of
//!   entry accesses: byte-weighted LRU reuse distances (the bytes of distinct entries used
//!   since the last use of this one) of a hash-sampled subset of keys (SHARDS: a key is
//!   sampled when its hash falls under a threshold, and its distances are scaled by the
//!   rate), with bounded memory — past `max_keys` sampled keys the rate is lowered and the
//!   keys above the new threshold are dropped.
//! - [`CostModel`] holds measured times of a hot hit, a cold hit and a miss.
//! - [`choose_hot_bytes`] returns the smallest candidate size whose predicted slowdown is
//!   within the target.

use std::collections::{BTreeMap, HashMap};

/// Reuse distances are counted in buckets of this many per doubling (≈ 4.4% wide); a
/// bucket counts as a miss for every size below its upper end, so predictions err on the
/// side of more RAM.
const BUCKETS_PER_DOUBLING: f64 = 16.0;

fn bucket_of(distance: u64) -> u32 {
    ((distance.max(1) as f64).log2() * BUCKETS_PER_DOUBLING).floor() as u32
}

fn bucket_end(bucket: u32) -> f64 {
    (f64::from(bucket + 1) / BUCKETS_PER_DOUBLING).exp2()
}

/// A 64-bit mix of a key, so sampling does not depend on how keys were made.
fn mix(key: u64) -> u64 {
    let mut z = key.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Online estimator of the byte-weighted LRU miss-ratio curve (SHARDS with a key budget).
#[derive(Debug, Clone)]
pub struct ReuseSampler {
    /// Keys whose mixed hash is below this are sampled.
    threshold: u64,
    max_keys: usize,
    clock: u64,
    /// Sampled key → time of its last access.
    last: HashMap<u64, u64>,
    /// Time of last access → bytes of that entry, for the distance sums.
    by_time: BTreeMap<u64, u64>,
    /// Reuse-distance bucket → weight (accesses / rate).
    histogram: BTreeMap<u32, f64>,
    /// All sampled accesses, weighted.
    total: f64,
}

impl ReuseSampler {
    /// A sampler keeping about `rate` of the keys (0 < rate ≤ 1), at most `max_keys` of them.
    pub fn new(rate: f64, max_keys: usize) -> Self {
        let rate = rate.clamp(1e-6, 1.0);
        Self {
            threshold: if rate >= 1.0 {
                u64::MAX
            } else {
                (rate * u64::MAX as f64) as u64
            },
            max_keys: max_keys.max(1),
            clock: 0,
            last: HashMap::new(),
            by_time: BTreeMap::new(),
            histogram: BTreeMap::new(),
            total: 0.0,
        }
    }

    /// The current sampling rate.
    pub fn rate(&self) -> f64 {
        if self.threshold == u64::MAX {
            1.0
        } else {
            self.threshold as f64 / u64::MAX as f64
        }
    }

    /// Records one access to the entry `key` of `bytes` bytes.
    pub fn access(&mut self, key: u64, bytes: u64) {
        let h = mix(key);
        if h > self.threshold {
            return;
        }
        self.clock += 1;
        let weight = 1.0 / self.rate();
        self.total += weight;
        // a first access has no reuse distance (it misses at any size) and only counts
        if let Some(then) = self.last.insert(key, self.clock) {
            self.by_time.remove(&then);
            // bytes of the distinct sampled entries used since, scaled to all keys,
            // plus this entry itself (it must fit too)
            let since: u64 = self.by_time.range(then..).map(|(_, b)| *b).sum();
            let distance = (since as f64 / self.rate()) as u64 + bytes;
            *self.histogram.entry(bucket_of(distance)).or_insert(0.0) += weight;
        }
        self.by_time.insert(self.clock, bytes);
        if self.last.len() > self.max_keys {
            self.lower_rate();
        }
    }

    /// Halves the sampled key space, dropping the keys that fall outside it.
    fn lower_rate(&mut self) {
        while self.last.len() > self.max_keys {
            self.threshold /= 2;
            let threshold = self.threshold;
            let dropped: Vec<u64> = self
                .last
                .keys()
                .copied()
                .filter(|k| mix(*k) > threshold)
                .collect();
            for k in dropped {
                if let Some(t) = self.last.remove(&k) {
                    self.by_time.remove(&t);
                }
            }
        }
    }

    /// Weighted accesses seen.
    pub fn accesses(&self) -> f64 {
        self.total
    }

    /// Predicted share of the re-accesses (accesses after the first of each entry) that
    /// would miss an LRU hot tier of `hot_bytes` bytes (0 when there were none).
    pub fn miss_ratio(&self, hot_bytes: u64) -> f64 {
        let reuses: f64 = self.histogram.values().sum();
        if reuses <= 0.0 {
            return 0.0;
        }
        let missing: f64 = self
            .histogram
            .iter()
            .filter(|(b, _)| bucket_end(**b) > hot_bytes as f64)
            .map(|(_, w)| w)
            .sum();
        missing / reuses
    }
}

/// Measured cost of one lookup that finds its entry hot, cold, or nowhere, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// A hit served from RAM.
    pub hot_hit_ns: f64,
    /// A hit read from the cold tier (page-in and decode).
    pub cold_hit_ns: f64,
    /// A miss (exact attention and recording).
    pub miss_ns: f64,
    /// The whole forward pass of one input as observed (attention and everything else);
    /// 0 when unknown, and then the slowdown is taken against attention time alone, which
    /// overstates it (errs towards more RAM).
    pub request_ns: f64,
}

impl CostModel {
    /// Predicted slowdown against "everything hot" when a share `hot_miss` of the hits
    /// miss the hot tier, for a cache whose overall hit ratio is `hit_ratio`.
    pub fn slowdown(&self, hit_ratio: f64, hot_miss: f64) -> f64 {
        let attention = hit_ratio * self.hot_hit_ns + (1.0 - hit_ratio) * self.miss_ns;
        let all_hot = attention.max(self.request_ns);
        if all_hot <= 0.0 {
            return 0.0;
        }
        hit_ratio * hot_miss * (self.cold_hit_ns - self.hot_hit_ns).max(0.0) / all_hot
    }
}

/// The smallest of `candidates` (bytes, any order) whose predicted slowdown is at most
/// `target` (0.05 = 5%), with its slowdown; the largest candidate when none is.
pub fn choose_hot_bytes(
    sampler: &ReuseSampler,
    cost: &CostModel,
    hit_ratio: f64,
    target: f64,
    candidates: &[u64],
) -> Option<(u64, f64)> {
    let mut sizes = candidates.to_vec();
    sizes.sort_unstable();
    let predicted = |s: u64| cost.slowdown(hit_ratio, sampler.miss_ratio(s));
    sizes
        .iter()
        .map(|&s| (s, predicted(s)))
        .find(|(_, d)| *d <= target)
        .or_else(|| sizes.last().map(|&s| (s, predicted(s))))
}

/// One decision of a hot tier's size (see [`decide`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SizingDecision {
    /// The chosen budget, bytes.
    pub hot_bytes: u64,
    /// The largest budget allowed (the configured one), bytes.
    pub max_bytes: u64,
    /// Predicted slowdown at the chosen size against everything hot (0.05 = 5%).
    pub predicted_slowdown: f64,
    /// Predicted share of re-accesses that miss the hot tier at the chosen size.
    pub predicted_miss_ratio: f64,
    /// The cache's hit ratio the prediction used.
    pub hit_ratio: f64,
    /// Accesses the reuse-distance estimate rests on (scaled by the sampling rate).
    pub accesses: f64,
}

/// Accesses below which [`decide`] keeps the largest budget (too little to go on).
pub const MIN_ACCESSES: f64 = 200.0;

/// Candidate budgets from 1 MiB up to `max_bytes` in steps of 2^(1/8) (≈ 9%), and
/// `max_bytes` itself: fine at every scale, whatever the configured maximum.
pub fn candidates(max_bytes: u64) -> Vec<u64> {
    let mut c = Vec::new();
    let mut b = (1u64 << 20) as f64;
    while (b as u64) < max_bytes {
        c.push(b as u64);
        b *= 2f64.powf(1.0 / 8.0);
    }
    c.push(max_bytes);
    c
}

/// The smallest budget up to `max_bytes` whose predicted slowdown stays within `target`;
/// `max_bytes` while the sampler has seen fewer than [`MIN_ACCESSES`] accesses.
pub fn decide(
    sampler: &ReuseSampler,
    cost: &CostModel,
    hit_ratio: f64,
    target: f64,
    max_bytes: u64,
) -> SizingDecision {
    let predict = |b: u64| {
        let miss = sampler.miss_ratio(b);
        (cost.slowdown(hit_ratio, miss), miss)
    };
    let chosen = if sampler.accesses() < MIN_ACCESSES {
        max_bytes
    } else {
        choose_hot_bytes(sampler, cost, hit_ratio, target, &candidates(max_bytes))
            .map_or(max_bytes, |(b, _)| b)
    };
    let (predicted_slowdown, predicted_miss_ratio) = predict(chosen);
    SizingDecision {
        hot_bytes: chosen,
        max_bytes,
        predicted_slowdown,
        predicted_miss_ratio,
        hit_ratio,
        accesses: sampler.accesses(),
    }
}

/// Keys a store's [`SharedSampler`] keeps for its reuse-distance estimate (the sampling
/// rate drops past it).
pub const STORE_SAMPLED_KEYS: usize = 4096;

/// A [`ReuseSampler`] a store reports its accesses to (through
/// [`crate::storage::AccessObserver`]), read by the hot-tier sizing.
#[derive(Debug)]
pub struct SharedSampler(parking_lot::Mutex<ReuseSampler>);

impl SharedSampler {
    /// A sampler of every access at first, keeping up to `max_keys` keys.
    pub fn new(max_keys: usize) -> Self {
        Self(parking_lot::Mutex::new(ReuseSampler::new(1.0, max_keys)))
    }

    /// The hot-tier budget (at most `max_bytes`) that keeps the predicted slowdown within
    /// `target`, from the sampled reuse distances and `cost` (see [`decide`]); not applied.
    pub fn size_hot(
        &self,
        cost: &CostModel,
        hit_ratio: f64,
        target: f64,
        max_bytes: u64,
    ) -> SizingDecision {
        decide(&self.0.lock(), cost, hit_ratio, target, max_bytes)
    }

    /// Predicted share of re-accesses that would miss a hot tier of each of `hot_bytes`
    /// (LRU, from the sampled reuse distances of inserts and hits since start).
    pub fn miss_ratios(&self, hot_bytes: &[u64]) -> Vec<f64> {
        let sampler = self.0.lock();
        hot_bytes.iter().map(|&b| sampler.miss_ratio(b)).collect()
    }
}

impl crate::storage::AccessObserver for SharedSampler {
    fn accessed(&self, key: u64, bytes: u64) {
        self.0.lock().access(key, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator (xorshift).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// Exact miss ratio of the re-accesses in an LRU cache of `cap` equal entries.
    fn lru_miss_ratio(trace: &[u64], cap: usize) -> f64 {
        let mut order: Vec<u64> = Vec::new();
        let (mut reuses, mut misses) = (0usize, 0usize);
        let mut seen = std::collections::HashSet::new();
        for &k in trace {
            let pos = order.iter().position(|&x| x == k);
            if !seen.insert(k) {
                reuses += 1;
                if pos.is_none() {
                    misses += 1;
                }
            }
            if let Some(p) = pos {
                order.remove(p);
            }
            order.push(k);
            if order.len() > cap {
                order.remove(0);
            }
        }
        misses as f64 / reuses.max(1) as f64
    }

    fn zipf_trace(n: u64, alpha: f64, len: usize, seed: u64) -> Vec<u64> {
        let weights: Vec<f64> = (1..=n).map(|i| 1.0 / (i as f64).powf(alpha)).collect();
        let total: f64 = weights.iter().sum();
        let mut cdf = Vec::with_capacity(weights.len());
        let mut acc = 0.0;
        for w in &weights {
            acc += w / total;
            cdf.push(acc);
        }
        let mut rng = Rng(seed);
        (0..len)
            .map(|_| {
                let u = rng.unit();
                cdf.partition_point(|&c| c < u) as u64
            })
            .collect()
    }

    const B: u64 = 1 << 20; // one entry: 1 MiB

    #[test]
    fn a_cyclic_scan_misses_until_everything_fits() {
        let mut s = ReuseSampler::new(1.0, 10_000);
        for round in 0..5 {
            for k in 0..100u64 {
                s.access(k, B);
                let _ = round;
            }
        }
        assert_eq!(s.miss_ratio(50 * B), 1.0);
        assert_eq!(s.miss_ratio(99 * B), 1.0);
        assert_eq!(s.miss_ratio(105 * B), 0.0);
        let cost = CostModel {
            hot_hit_ns: 1e6,
            cold_hit_ns: 5e6,
            miss_ns: 50e6,
            request_ns: 0.0,
        };
        let sizes: Vec<u64> = (1..=200).map(|i| i * B).collect();
        let (chosen, slowdown) = choose_hot_bytes(&s, &cost, 0.8, 0.05, &sizes).unwrap();
        // LRU under a scan gains nothing until all 100 entries fit
        assert!((100 * B..=104 * B).contains(&chosen), "{}", chosen / B);
        assert_eq!(slowdown, 0.0);
    }

    #[test]
    fn uniform_and_zipf_curves_match_a_simulated_lru() {
        for (trace, what) in [
            (
                {
                    let mut rng = Rng(7);
                    (0..20_000).map(|_| rng.next() % 200).collect::<Vec<_>>()
                },
                "uniform",
            ),
            (zipf_trace(400, 1.0, 20_000, 11), "zipf"),
        ] {
            let mut s = ReuseSampler::new(1.0, 100_000);
            for &k in &trace {
                s.access(k, B);
            }
            for cap in [10usize, 50, 100, 150] {
                let want = lru_miss_ratio(&trace, cap);
                let got = s.miss_ratio(cap as u64 * B);
                // the bucket width (≈4.4%) bounds the error
                assert!(
                    (got - want).abs() <= 0.08,
                    "{what}, {cap} entries: predicted {got:.3}, LRU {want:.3}"
                );
            }
        }
    }

    #[test]
    fn skewed_reuse_needs_less_ram_than_uniform_for_the_same_target() {
        let cost = CostModel {
            hot_hit_ns: 1e6,
            cold_hit_ns: 6e6,
            miss_ns: 60e6,
            request_ns: 0.0,
        };
        let sizes: Vec<u64> = (1..=400).map(|i| i * B).collect();
        let choose = |trace: &[u64]| {
            let mut s = ReuseSampler::new(1.0, 100_000);
            for &k in trace {
                s.access(k, B);
            }
            choose_hot_bytes(&s, &cost, 0.9, 0.05, &sizes).unwrap()
        };
        let mut rng = Rng(3);
        let uniform: Vec<u64> = (0..20_000).map(|_| rng.next() % 400).collect();
        let (u, du) = choose(&uniform);
        let (z, dz) = choose(&zipf_trace(400, 1.2, 20_000, 5));
        assert!(du <= 0.05 && dz <= 0.05);
        // the goal: ≥ 30% RAM saved on a skewed workload (here 190 vs 379 MiB)
        assert!(
            z * 10 <= u * 7,
            "zipf chose {} MiB, uniform {} MiB",
            z / B,
            u / B
        );
        // and the uniform workload really needs most of its 400 MiB
        assert!(u >= 300 * B, "uniform chose {} MiB", u / B);
    }

    #[test]
    fn sampling_and_a_key_budget_keep_the_curve() {
        let trace = zipf_trace(2_000, 0.9, 60_000, 13);
        let mut exact = ReuseSampler::new(1.0, 1_000_000);
        let mut sampled = ReuseSampler::new(0.25, 200);
        for &k in &trace {
            exact.access(k, B);
            sampled.access(k, B);
        }
        assert!(sampled.rate() < 0.25, "the key budget lowered the rate");
        assert!(sampled.last.len() <= 200);
        for cap in [50u64, 200, 800] {
            let (e, s) = (exact.miss_ratio(cap * B), sampled.miss_ratio(cap * B));
            assert!(
                (e - s).abs() <= 0.1,
                "{cap} entries: exact {e:.3}, sampled {s:.3}"
            );
        }
    }

    #[test]
    fn no_hits_or_no_cold_penalty_means_no_slowdown() {
        let cost = CostModel {
            hot_hit_ns: 1e6,
            cold_hit_ns: 1e6,
            miss_ns: 10e6,
            request_ns: 0.0,
        };
        assert_eq!(cost.slowdown(0.9, 1.0), 0.0);
        let cost = CostModel {
            cold_hit_ns: 3e6,
            ..cost
        };
        assert_eq!(cost.slowdown(0.0, 1.0), 0.0);
        // half the hits cold: 0.5 * 0.5 * 2 ms over 0.5 * 1 + 0.5 * 10 ms
        assert!((cost.slowdown(0.5, 0.5) - 0.5 / 5.5).abs() < 1e-12);
        // a known forward time larger than the attention work is the denominator
        let whole = CostModel {
            request_ns: 100e6,
            ..cost
        };
        assert!((whole.slowdown(0.5, 0.5) - 0.5 / 100.0).abs() < 1e-12);
        let grid = candidates(4096 << 20);
        assert_eq!((grid[0], *grid.last().unwrap()), (1 << 20, 4096 << 20));
        assert!(grid
            .windows(2)
            .all(|w| w[1] > w[0] && w[1] as f64 <= w[0] as f64 * 1.1));
        let empty = ReuseSampler::new(1.0, 10);
        assert_eq!(empty.miss_ratio(1), 0.0);
        assert_eq!(
            choose_hot_bytes(&empty, &cost, 0.5, 0.05, &[3, 1, 2]),
            Some((1, 0.0))
        );
        assert_eq!(choose_hot_bytes(&empty, &cost, 0.5, 0.05, &[]), None);
    }
}
