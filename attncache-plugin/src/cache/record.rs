//! Recording: a miss's entry into its scope's store (and the access trace).

use super::*;

impl AttnCache {
    /// Waits until every recorded entry queued for the cold tier is on disk (and writes
    /// the access trace's buffered records).
    pub fn flush(&self) {
        if let Some(trace) = &self.trace {
            trace.flush();
        }
        for scope_cache in &self.scopes {
            scope_cache.store.flush();
        }
    }

    /// Stores the maps recorded for one input in the first scope.
    pub fn record(&self, entry: Entry) {
        self.record_in(0, entry);
    }

    /// Stores the maps recorded for one input in scope `scope` (ignored when there is
    /// no such scope).
    pub fn record_in(&self, scope: usize, entry: Entry) {
        let Some(scope_cache) = self.scopes.get(scope) else {
            return;
        };
        scope_cache.sightings.invalidate(&token_key(&entry.tokens));
        self.counters.recorded.fetch_add(1, Ordering::Relaxed);
        if let Some(spans) = &scope_cache.spans {
            spans.insert(token_key(&entry.tokens), entry.tokens.clone());
        }
        if entry.feature_id == self.features.id() {
            scope_cache.index.insert(
                token_key(&entry.tokens),
                entry.tokens.clone(),
                &entry.feature,
            );
        }
        if let Some(trace) = &self.trace {
            let (key, bytes) = (token_key(&entry.tokens), entry.bytes() as u64);
            trace.record(TraceOp::Insert, scope, key, bytes);
        }
        scope_cache.store.insert(entry);
    }
}
