//! Which decoder requests use the prefix store, and what it gave each: the server takes a
//! [`PrefixTicket`] per request whose cache flag is on; mistral.rs's calls for sequences of
//! other requests are answered "nothing" and store nothing.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use dashmap::DashMap;
use mistralrs_core::PrefixKv;

use super::decoder_blend::{BlendOutcome, DecoderBlends};
use crate::prefix::PrefixStore;

/// The store and the requests that may use it.
#[derive(Debug)]
pub(crate) struct PrefixRuntime {
    store: Arc<PrefixStore>,
    /// Request id → prompt tokens reused so far (summed over its sequences).
    requests: DashMap<usize, usize>,
    /// Blend reuse past the exact prefix, when the server asks for it.
    blends: Option<DecoderBlends>,
}

impl PrefixRuntime {
    pub(crate) fn new(store: Arc<PrefixStore>, blends: Option<DecoderBlends>) -> Arc<Self> {
        Arc::new(Self {
            store,
            requests: DashMap::new(),
            blends,
        })
    }

    /// Decoder blend, when on.
    pub(crate) fn blends(&self) -> Option<&DecoderBlends> {
        self.blends.as_ref()
    }

    pub(crate) fn store(&self) -> &Arc<PrefixStore> {
        &self.store
    }

    /// The stored prefix of `toks` for a request that holds a ticket.
    pub(crate) fn lookup(&self, request_id: usize, toks: &[u32]) -> Result<Option<PrefixKv>> {
        if !self.requests.contains_key(&request_id) {
            return Ok(None);
        }
        let found = match &self.blends {
            Some(blends) => blends.plan(&self.store, request_id, toks)?,
            None => self.store.lookup(toks)?,
        };
        if let Some(p) = &found {
            // mistral.rs computes the last prompt token whatever is stored
            let used = p.len.min(toks.len().saturating_sub(1));
            self.store.note_reused(used);
            if let Some(mut reused) = self.requests.get_mut(&request_id) {
                *reused += used;
            }
        }
        Ok(found)
    }

    /// Keeps a prompt's K/V for a request that holds a ticket.
    pub(crate) fn offer(
        &self,
        request_id: usize,
        toks: &[u32],
        layers: &[(Tensor, Tensor)],
    ) -> Result<()> {
        if self.requests.contains_key(&request_id) {
            self.store.insert(toks, layers)?;
        }
        Ok(())
    }
}

/// A request's use of the prefix store, from before it is sent to mistral.rs until its
/// answer is read; dropping it ends the use.
#[derive(Debug)]
pub struct PrefixTicket {
    runtime: Arc<PrefixRuntime>,
    request_id: usize,
}

impl PrefixTicket {
    pub(crate) fn new(runtime: Arc<PrefixRuntime>, request_id: usize) -> Self {
        runtime.requests.insert(request_id, 0);
        Self {
            runtime,
            request_id,
        }
    }

    /// What decoder blend did for this request, if it blended or refused a blend at the
    /// check layer ([`BlendOutcome::refused`]).
    pub fn blend(&self) -> Option<BlendOutcome> {
        self.runtime.blends()?.outcome(self.request_id)
    }

    /// Prompt tokens whose K/V came from the store for this request so far.
    pub fn reused_tokens(&self) -> usize {
        self.runtime
            .requests
            .get(&self.request_id)
            .map_or(0, |r| *r)
    }
}

impl Drop for PrefixTicket {
    fn drop(&mut self) {
        self.runtime.requests.remove(&self.request_id);
        if let Some(blends) = self.runtime.blends() {
            blends.finish(self.request_id);
        }
    }
}
