//! Per-request state: each request's flag and partition (scope), and the decision its
//! lookup took, kept until the route takes it.

use super::*;

impl AttnCache {
    /// The most recent lookup's decision (for tools that send one input at a time).
    pub fn last_decision(&self) -> Option<Decision> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether requests that do not say use the cache.
    pub fn enabled_by_default(&self) -> bool {
        self.enabled_by_default.load(Ordering::Relaxed)
    }

    /// Sets whether requests that do not say use the cache.
    pub fn set_enabled_by_default(&self, on: bool) {
        self.enabled_by_default.store(on, Ordering::Relaxed);
    }

    /// Sets whether the request `request_id` uses the cache (overrides the default).
    pub fn set_request_flag(&self, request_id: usize, on: bool) {
        self.flags.insert(request_id, on);
    }

    /// Forgets the flag, scope (and any unclaimed decision) of a finished request.
    pub fn clear_request_flag(&self, request_id: usize) {
        self.flags.remove(&request_id);
        self.decisions.remove(&request_id);
        self.request_scopes.remove(&request_id);
    }

    /// Assigns `request_id` to the partition `scope` (an index into
    /// [`CacheConfig::scopes`]). With scopes configured, a request without one never uses
    /// the cache.
    pub fn set_request_scope(&self, request_id: usize, scope: usize) -> Result<(), AttnCacheError> {
        if scope >= self.config.scopes.len() {
            return Err(AttnCacheError::InvalidSetting {
                name: "scope",
                value: scope.to_string(),
                expected: "an index into the configured scopes",
            });
        }
        self.request_scopes.insert(request_id, scope);
        Ok(())
    }

    /// The partition `request_id` uses: its assigned scope, the single shared partition
    /// when no scopes are configured, `None` when scopes are configured and it has none.
    pub fn scope_of(&self, request_id: usize) -> Option<usize> {
        match self.request_scopes.get(&request_id) {
            Some(s) => Some(*s),
            None => self.config.scopes.is_empty().then_some(0),
        }
    }

    /// The decision taken for the input of `request_id`, once (kept only for requests
    /// whose flag was set with [`AttnCache::set_request_flag`]).
    pub fn take_decision(&self, request_id: usize) -> Option<Decision> {
        self.decisions.remove(&request_id).map(|(_, d)| d)
    }

    /// [`AttnCache::lookup`] on behalf of `request_id`, keeping its decision for
    /// [`AttnCache::take_decision`] when the request set a flag.
    /// A request without a partition (see [`AttnCache::scope_of`]) is a miss that is not
    /// recorded.
    pub fn lookup_for(&self, request_id: usize, tokens: &[u32], feature: Option<&[f32]>) -> Lookup {
        let Some(scope) = self.scope_of(request_id) else {
            return Lookup::Miss { record: false };
        };
        let (found, decision) = self.decide(scope, tokens, feature);
        if self.flags.contains_key(&request_id) {
            self.decisions.insert(request_id, decision);
        }
        found
    }

    /// Whether `request_id` uses the cache (never without a partition, see
    /// [`AttnCache::scope_of`]).
    pub fn enabled_for(&self, request_id: usize) -> bool {
        self.scope_of(request_id).is_some()
            && self
                .flags
                .get(&request_id)
                .map_or_else(|| self.enabled_by_default.load(Ordering::Relaxed), |f| *f)
    }
}
