//! Per-request state: each request's flag and scope (scope), and the decision its
//! lookup took. A [`RequestTicket`] owns it: the route takes one before it hands an input
//! to mistral.rs and reads the decision from it; dropping the ticket forgets the state.

use parking_lot::Mutex;

use super::*;

impl AttnCache {
    /// Whether requests that do not say use the cache.
    pub fn enabled_by_default(&self) -> bool {
        self.enabled_by_default.load(Ordering::Relaxed)
    }

    /// Sets whether requests that do not say use the cache.
    pub fn set_enabled_by_default(&self, on: bool) {
        self.enabled_by_default.store(on, Ordering::Relaxed);
    }

    /// Registers request `request_id` for as long as the returned ticket lives: whether it
    /// uses the cache (`on`; `None`: the server default) and its scope (`scope`, an
    /// index into [`CacheConfig::scopes`]; with scopes configured, a request without one
    /// never uses the cache). The hook finds this state by the request id mistral.rs gives
    /// each row; the lookup's [`Decision`] is kept in it for [`RequestTicket::take_decision`].
    /// Dropping the ticket forgets all of it, whatever path the request took.
    pub fn ticket(
        &self,
        request_id: usize,
        on: Option<bool>,
        scope: Option<usize>,
    ) -> Result<RequestTicket<'_>, AttnCacheError> {
        if let Some(scope) = scope.filter(|&s| s >= self.config.scopes.len()) {
            return Err(AttnCacheError::InvalidSetting {
                name: "scope",
                value: scope.to_string(),
                expected: "an index into the configured scopes",
            });
        }
        let state = Arc::new(RequestState {
            on,
            scope,
            decision: Mutex::new(None),
        });
        self.requests.insert(request_id, state.clone());
        Ok(RequestTicket {
            cache: self,
            id: request_id,
            state,
        })
    }

    /// The scope `request_id` uses: its assigned scope, the single shared scope
    /// when no scopes are configured, `None` when scopes are configured and it has none.
    pub fn scope_of(&self, request_id: usize) -> Option<usize> {
        match self.requests.get(&request_id).and_then(|r| r.scope) {
            Some(s) => Some(s),
            None => self.config.scopes.is_empty().then_some(0),
        }
    }

    /// [`AttnCache::lookup`] on behalf of `request_id`, keeping its decision in the
    /// request's ticket, if it has one.
    /// A request without a scope (see [`AttnCache::scope_of`]) is a miss that is not
    /// recorded.
    pub fn lookup_for(&self, request_id: usize, tokens: &[u32], feature: Option<&[f32]>) -> Lookup {
        let Some(scope) = self.scope_of(request_id) else {
            return Lookup::Miss { record: false };
        };
        let (found, decision) = self.decide(scope, tokens, feature);
        if let Some(r) = self.requests.get(&request_id) {
            *r.decision.lock() = Some(decision);
        }
        found
    }

    /// Whether `request_id` uses the cache (never without a scope, see
    /// [`AttnCache::scope_of`]).
    pub fn enabled_for(&self, request_id: usize) -> bool {
        self.scope_of(request_id).is_some()
            && self
                .requests
                .get(&request_id)
                .and_then(|r| r.on)
                .unwrap_or_else(|| self.enabled_by_default.load(Ordering::Relaxed))
    }
}

/// One request's use of the cache ([`AttnCache::ticket`]).
#[derive(Debug)]
pub(super) struct RequestState {
    /// Uses the cache (`None`: the server default).
    on: Option<bool>,
    /// Its scope.
    scope: Option<usize>,
    /// What its lookup decided (amended by a blend hit's check layer).
    pub(super) decision: Mutex<Option<Decision>>,
}

/// A request's registration with the cache; dropping it forgets the request's state.
#[derive(Debug)]
pub struct RequestTicket<'a> {
    cache: &'a AttnCache,
    id: usize,
    state: Arc<RequestState>,
}

impl RequestTicket<'_> {
    /// The request id the ticket stands for.
    pub fn id(&self) -> usize {
        self.id
    }

    /// What the request's lookup decided, once (`None`: no lookup took place, e.g. an
    /// input outside the cached lengths or a flag-off request).
    pub fn take_decision(&self) -> Option<Decision> {
        self.state.decision.lock().take()
    }
}

impl Drop for RequestTicket<'_> {
    fn drop(&mut self) {
        // only this ticket's state: a later ticket for the same id is left alone
        self.cache
            .requests
            .remove_if(&self.id, |_, s| Arc::ptr_eq(s, &self.state));
    }
}
