//! Similarity index: one HNSW graph (`hnsw_rs`, L2 distance) of feature vectors per token
//! length, because maps of different lengths are not interchangeable.
//!
//! The index only names candidates (by store key); the store decides whether the entry
//! still exists. HNSW has no deletion, so an evicted entry stays in the graph and its
//! lookups become misses until the process restarts (the index is rebuilt from the cold
//! tier at start).

use parking_lot::RwLock;
use std::sync::Arc;

use dashmap::DashMap;
use hnsw_rs::prelude::{DistL2, Hnsw};

/// Neighbours stored per node and layer.
const MAX_CONNECTIONS: usize = 16;
/// Candidate list size while inserting.
const EF_CONSTRUCTION: usize = 64;
/// Candidate list size while searching.
const EF_SEARCH: usize = 32;

struct LengthIndex {
    graph: Hnsw<'static, f32, DistL2>,
    /// Store key and token ids of each node, by node id.
    keys: RwLock<Vec<(u64, Arc<[u32]>)>>,
}

/// A stored entry the index names as a neighbour.
#[derive(Debug, Clone)]
pub struct Neighbour {
    /// Store key.
    pub key: u64,
    /// L2 distance between the two features.
    pub distance: f32,
    /// The stored input's token ids (to count differing positions without reading maps).
    pub tokens: Arc<[u32]>,
}

/// Feature vectors of stored entries, searchable per token length.
#[derive(Default)]
pub struct SimilarityIndex {
    by_len: DashMap<usize, Arc<LengthIndex>>,
    /// Keys indexed (an entry stored again, or announced twice, is not added twice).
    keys: DashMap<u64, ()>,
}

impl std::fmt::Debug for SimilarityIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimilarityIndex")
            .field("lengths", &self.by_len.len())
            .finish()
    }
}

impl SimilarityIndex {
    /// Adds the entry `key` with `tokens` and `feature`, unless `key` is indexed already.
    pub fn insert(&self, key: u64, tokens: Arc<[u32]>, feature: &[f32]) {
        let len = tokens.len();
        if feature.is_empty() || self.keys.insert(key, ()).is_some() {
            return;
        }
        let index = self
            .by_len
            .entry(len)
            .or_insert_with(|| {
                Arc::new(LengthIndex {
                    graph: Hnsw::new(MAX_CONNECTIONS, 1024, 16, EF_CONSTRUCTION, DistL2 {}),
                    keys: RwLock::new(Vec::new()),
                })
            })
            .clone();
        let id = {
            let mut keys = index.keys.write();
            keys.push((key, tokens));
            keys.len() - 1
        };
        index.graph.insert((feature, id));
    }

    /// Up to `k` stored entries of `len` tokens nearest to `feature`, nearest first.
    pub fn nearest(&self, len: usize, feature: &[f32], k: usize) -> Vec<Neighbour> {
        let Some(index) = self.by_len.get(&len).map(|i| i.clone()) else {
            return Vec::new();
        };
        let found = index.graph.search(feature, k, EF_SEARCH.max(k));
        let keys = index.keys.read();
        let mut out: Vec<Neighbour> = found
            .iter()
            .filter_map(|n| {
                keys.get(n.d_id).map(|(key, tokens)| Neighbour {
                    key: *key,
                    distance: n.distance,
                    tokens: tokens.clone(),
                })
            })
            .collect();
        out.sort_by(|a, b| a.distance.total_cmp(&b.distance));
        out
    }

    /// Entries indexed, over all lengths.
    pub fn len(&self) -> usize {
        self.keys.len()
    }
}
