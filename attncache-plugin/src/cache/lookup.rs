//! Lookups: exact token ids in the scope's store, else the nearest stored input of the
//! same length (index, alignment, error gate or threshold; blend candidates), and the
//! admission of misses.

use super::*;

impl AttnCache {
    /// Looks `tokens` up — exactly, then (with a feature and a threshold) the nearest stored
    /// input of the same length; counts the decision and its time. Uses the first scope.
    pub fn lookup(&self, tokens: &[u32], feature: Option<&[f32]>) -> Lookup {
        self.decide(0, tokens, feature).0
    }

    pub(super) fn decide(
        &self,
        scope: usize,
        tokens: &[u32],
        feature: Option<&[f32]>,
    ) -> (Lookup, Decision) {
        let scope_cache = &self.scopes[scope];
        let started = Instant::now();
        let announced = scope_cache.store.take_announced();
        if !announced.is_empty() {
            let foreign = index_entries(
                &scope_cache.index,
                scope_cache.spans.as_ref(),
                announced,
                self.features.id(),
            );
            if foreign > 0 {
                tracing::debug!(
                    entries = foreign,
                    "other replicas stored entries with features of another computation"
                );
            }
        }
        let miss = Decision {
            outcome: Outcome::Miss,
            distance: None,
            tokens: tokens.len(),
            differing: None,
            predicted_loss: None,
            recomputed_rows: 0,
            lookup_ns: 0,
            residual_deviation: None,
            resumed_after_layer: None,
            check: None,
            stored_inputs: None,
        };
        if !self.cacheable(tokens.len()) {
            self.counters.not_cached.fetch_add(1, Ordering::Relaxed);
            let decision = Decision {
                outcome: Outcome::NotCached,
                ..miss
            };
            return (Lookup::Miss { record: false }, decision);
        }
        self.counters.lookups.fetch_add(1, Ordering::Relaxed);
        let blend = self.config.reuse_kind == ReuseKind::Blend;
        let found = scope_cache
            .store
            .get(tokens)
            .filter(|e| e.is_blend() == blend) // the other kind is a miss
            .map(Lookup::Hit)
            .or_else(|| match blend {
                true => self.near_blend(scope_cache, tokens, feature),
                false => self.near(scope_cache, tokens, feature?),
            });
        let result = match found {
            // a blend candidate counts as a hit or a miss once the check layer settles it
            // (`settle_blend`): counters never go back
            Some(hit) if blend => {
                self.counters
                    .blend_candidates
                    .fetch_add(1, Ordering::Relaxed);
                hit
            }
            Some(hit) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                if matches!(hit, Lookup::Near { .. }) {
                    self.counters.near_hits.fetch_add(1, Ordering::Relaxed);
                }
                hit
            }
            None => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                let record = self.admit(scope_cache, tokens);
                Lookup::Miss { record }
            }
        };
        let lookup_ns = started.elapsed().as_nanos() as u64;
        if let Some(trace) = &self.trace {
            match &result {
                Lookup::Hit(e) | Lookup::Near { entry: e, .. } => {
                    trace.record(TraceOp::Hit, scope, token_key(&e.tokens), e.bytes() as u64)
                }
                Lookup::Miss { .. } => trace.record(TraceOp::Miss, scope, 0, 0),
            }
        }
        let miss = Decision { lookup_ns, ..miss };
        let decision = match &result {
            Lookup::Hit(_) => Decision {
                outcome: Outcome::ExactHit,
                distance: Some(0.0),
                differing: Some(0),
                ..miss
            },
            Lookup::Near {
                distance,
                differing,
                recompute,
                predicted_loss,
                spans,
                ..
            } => Decision {
                outcome: Outcome::NearHit,
                stored_inputs: Some(1 + spans.len() as u32),
                distance: Some(*distance),
                differing: Some(*differing as u32),
                predicted_loss: predicted_loss.map(|l| l as f32),
                recomputed_rows: recompute.as_ref().map_or(0, |r| r.len() as u32),
                ..miss
            },
            Lookup::Miss { .. } => miss,
        };
        self.counters
            .lookup_ns
            .fetch_add(lookup_ns, Ordering::Relaxed);
        (result, decision)
    }

    /// A near hit for `tokens`: with an error gate, the best-ranked neighbour (fewest
    /// differing positions, then nearest feature) if its predicted error is within the
    /// target; without one, the nearest neighbour within the similarity threshold.
    fn near(&self, scope_cache: &ScopeCache, tokens: &[u32], feature: &[f32]) -> Option<Lookup> {
        let len = tokens.len();
        let gate = self.error_gate();
        let threshold = self.similarity_threshold();
        if gate.is_none() && threshold.is_none() {
            return None;
        }
        let policy = self.reuse_policy();
        // same length first, then up to `length_slack` tokens shorter and longer
        let slack = if gate.is_some() {
            policy.length_slack
        } else {
            0
        };
        let mut found = candidates(scope_cache, tokens, feature, slack);
        let use_neighbour = |a: &crate::reuse::maps::Alignment,
                             n: &crate::lookup::index::Neighbour| {
            let recompute = policy.rows_to_recompute(len, &a.differing).ok()?;
            let entry = scope_cache.store.get_by_key(n.key, n.tokens.len())?;
            let alignment = (!a.identity).then(|| Arc::from(a.source.as_slice()));
            Some((entry, recompute.map(Arc::from), alignment))
        };
        let (best, (entry, recompute, alignment), predicted_loss) = match &gate {
            Some(gate) => {
                fewest_differing_first(&mut found);
                let best = found.first()?;
                let loss = gate.predict(best.1.distance, best.0.differing.len(), len);
                if loss > gate.max_loss {
                    return None;
                }
                (best, use_neighbour(&best.0, &best.1)?, Some(loss))
            }
            None => {
                let t = threshold?;
                found.sort_by(|a, b| a.1.distance.total_cmp(&b.1.distance));
                found
                    .iter()
                    .take_while(|(_, n)| n.distance <= t)
                    .find_map(|c| Some((c, use_neighbour(&c.0, &c.1)?, None)))?
            }
        };
        Some(Lookup::Near {
            entry,
            distance: best.1.distance,
            differing: best.0.differing.len(),
            recompute,
            alignment,
            spans: Vec::new(),
            predicted_loss,
        })
    }

    /// A blend candidate for `tokens`: among the nearest stored inputs (same length, then up
    /// to `length_slack` shorter and longer), the one with the fewest differing positions
    /// after alignment, then the nearest feature, if no more than the policy's share of the
    /// positions differ. Whether it is used is decided at the check layer. None when the
    /// fidelity gate has no bound for inputs of this length.
    fn near_blend(
        &self,
        scope_cache: &ScopeCache,
        tokens: &[u32],
        feature: Option<&[f32]>,
    ) -> Option<Lookup> {
        let len = tokens.len();
        let policy = self.blend_policy();
        if policy
            .gate
            .as_ref()
            .is_some_and(|g| !g.takes_near_hits(len))
        {
            return None; // the gate would refuse any candidate: do not look or load
        }
        let cap = (f64::from(policy.max_recompute_share) * len as f64).floor() as usize;
        let by_feature = feature.and_then(|f| {
            let mut found = candidates(scope_cache, tokens, f, policy.length_slack);
            fewest_differing_first(&mut found);
            found
                .into_iter()
                .take_while(|(a, _)| a.differing.len() <= cap)
                .find_map(|(a, n)| {
                    let entry = scope_cache
                        .store
                        .get_by_key(n.key, n.tokens.len())
                        .filter(|e| e.is_blend())?;
                    Some((a, n, entry))
                })
        });
        // aligned by content, across stored inputs: taken when it leaves fewer positions to
        // recompute than the nearest stored input of about the same length
        let fewer_than = by_feature
            .as_ref()
            .map_or(cap + 1, |(a, _, _)| a.differing.len());
        if let Some(found) = scope_cache
            .spans
            .as_ref()
            .and_then(|spans| span_candidate(scope_cache, spans, tokens, feature))
            .filter(|f| f.differing.len() < fewer_than)
        {
            tracing::debug!(
                len,
                stored_inputs = found.entries.len(),
                differing = found.differing.len(),
                "blend candidate aligned by content"
            );
            return Some(Lookup::Near {
                entry: found.entries[0].clone(),
                distance: found.distance,
                differing: found.differing.len(),
                recompute: Some(found.differing.iter().map(|&i| i as u32).collect()),
                alignment: Some(found.source.into()),
                spans: found.entries[1..].to_vec(),
                predicted_loss: None,
            });
        }
        let (a, n, entry) = by_feature?;
        let differing: Vec<u32> = a.differing.iter().map(|&i| i as u32).collect();
        Some(Lookup::Near {
            entry,
            distance: n.distance,
            differing: a.differing.len(),
            recompute: Some(Arc::from(differing)),
            alignment: (!a.identity).then(|| Arc::from(a.source.as_slice())),
            spans: Vec::new(),
            predicted_loss: None,
        })
    }

    /// Settles the blend candidate of `request_id` (a stored neighbour when `near`, else
    /// identical tokens) at the check layer: `Some((recomputed, residual))` when it was
    /// used (it counts as a hit), `None` when it was refused (it counts as a miss, and the
    /// request's decision says so). Each candidate is counted here once, so every counter
    /// only rises.
    pub fn settle_blend(&self, request_id: usize, near: bool, used: Option<(usize, f32)>) {
        let c = &self.counters;
        match used {
            Some((recomputed, _)) => {
                c.hits.fetch_add(1, Ordering::Relaxed);
                if near {
                    c.near_hits.fetch_add(1, Ordering::Relaxed);
                }
                c.blend_hits.fetch_add(1, Ordering::Relaxed);
                c.recomputed_tokens
                    .fetch_add(recomputed as u64, Ordering::Relaxed);
            }
            None => {
                c.blend_refused.fetch_add(1, Ordering::Relaxed);
                c.misses.fetch_add(1, Ordering::Relaxed);
            }
        }
        let amend = |d: &mut Decision| match used {
            Some((recomputed, residual)) => {
                d.recomputed_rows = recomputed as u32;
                d.residual_deviation = Some(residual);
            }
            None => {
                d.outcome = Outcome::Miss;
                d.distance = None;
                d.differing = None;
                d.stored_inputs = None;
            }
        };
        self.amend_decision(request_id, amend);
    }

    /// Counts a blend candidate refused at the check layer because its predicted speed-up was
    /// under the policy's smallest (it is also settled as refused, see
    /// [`Self::settle_blend`]).
    pub fn note_blend_unprofitable(&self) {
        self.counters
            .blend_unprofitable
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Notes that the blend hit of `request_id` (settled by [`Self::settle_blend`]) was
    /// escalated: every position is computed again after `layer`.
    pub fn note_blend_escalation(&self, request_id: usize, layer: usize) {
        self.counters
            .blend_escalated
            .fetch_add(1, Ordering::Relaxed);
        let amend = |d: &mut Decision| d.resumed_after_layer = Some(layer as u32);
        self.amend_decision(request_id, amend);
    }

    /// Notes what the check layer saw of the blend candidate of `request_id` (the S taken, or
    /// the last one the fidelity gate refused).
    pub fn note_blend_check(&self, request_id: usize, signals: crate::reuse::blend::CheckSignals) {
        self.amend_decision(request_id, |d| d.check = Some(signals));
    }

    /// Counts a blend candidate the fidelity gate ([`crate::reuse::blend::FidelityGate`])
    /// refused (every rule's signal over its bound; it is also settled as refused).
    pub fn note_blend_gate_refused(&self) {
        self.counters
            .blend_gate_refused
            .fetch_add(1, Ordering::Relaxed);
    }

    /// Applies `amend` to the decision reported for `request_id`.
    fn amend_decision(&self, request_id: usize, amend: impl Fn(&mut Decision)) {
        if let Some(r) = self.requests.get(&request_id) {
            if let Some(d) = r.decision.lock().as_mut() {
                amend(d);
            }
        }
    }

    /// Whether a miss of `tokens` in scope `scope` should be recorded (used when a
    /// refused blend hit turns into a miss).
    pub fn admits(&self, scope: usize, tokens: &[u32]) -> bool {
        self.cacheable(tokens.len())
            && self
                .scopes
                .get(scope)
                .is_some_and(|p| self.admit(p, tokens))
    }

    /// Whether inputs of `len` tokens are cached at all (`min_tokens..=max_tokens`).
    pub(super) fn cacheable(&self, len: usize) -> bool {
        (self.config.min_tokens..=self.config.max_tokens).contains(&len)
    }

    pub(super) fn admit(&self, scope_cache: &ScopeCache, tokens: &[u32]) -> bool {
        if !self.admission.load(Ordering::Relaxed) {
            return false;
        }
        if self.config.admit_after <= 1 {
            return true;
        }
        let key = token_key(tokens);
        let seen = scope_cache.sightings.get(&key).unwrap_or(0) + 1;
        scope_cache.sightings.insert(key, seen);
        seen >= self.config.admit_after
    }
}

/// A stored input near `tokens`, aligned with it.
type Candidate = (
    crate::reuse::maps::Alignment,
    crate::lookup::index::Neighbour,
);

/// The nearest stored inputs of the same length, then up to `slack` tokens shorter and
/// longer ([`NEIGHBOURS`] per length), each aligned with `tokens`.
fn candidates(
    scope_cache: &ScopeCache,
    tokens: &[u32],
    feature: &[f32],
    slack: usize,
) -> Vec<Candidate> {
    let len = tokens.len();
    (len.saturating_sub(slack)..=len + slack)
        .filter(|l| *l > 0)
        .flat_map(|l| scope_cache.index.nearest(l, feature, NEIGHBOURS))
        .map(|n| (align(tokens, &n.tokens), n))
        .collect()
}

/// Stored inputs a blend candidate aligned by content takes at most.
const MAX_SPAN_ENTRIES: usize = 4;

/// A blend candidate aligned by content ([`crate::reuse::spans`]): the stored blend entries
/// it takes runs from (in the order its `source` lays them end to end).
struct SpanCandidate {
    entries: Vec<Arc<Entry>>,
    source: Vec<u32>,
    differing: Vec<usize>,
    /// Feature distance to the first entry (0 without features).
    distance: f32,
}

/// The stored inputs `tokens` shares runs with, covered longest run first; a stored input the
/// store no longer holds (evicted, or not a blend entry) is left out and the rest covered
/// again. `None` when nothing covers it.
fn span_candidate(
    scope_cache: &ScopeCache,
    spans: &SpanIndex,
    tokens: &[u32],
    feature: Option<&[f32]>,
) -> Option<SpanCandidate> {
    let mut runs = spans.runs(tokens);
    loop {
        let cover = crate::reuse::spans::cover(tokens.len(), &runs, MAX_SPAN_ENTRIES)?;
        let mut entries = Vec::with_capacity(cover.entries.len());
        let mut gone = None;
        for &(key, len) in &cover.entries {
            match scope_cache
                .store
                .get_by_key(key, len)
                .filter(|e| e.is_blend() && e.tokens.len() == len)
            {
                Some(e) => entries.push(e),
                None => {
                    gone = Some(key);
                    break;
                }
            }
        }
        if let Some(key) = gone {
            spans.remove(key);
            runs.retain(|r| r.key != key);
            continue;
        }
        if cover.is_identity() {
            return None; // the same tokens: an exact hit, looked up before
        }
        let distance = match (feature, entries.first()) {
            (Some(f), Some(e)) if e.feature.len() == f.len() => f
                .iter()
                .zip(e.feature.iter())
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt(),
            _ => 0.0,
        };
        return Some(SpanCandidate {
            entries,
            source: cover.source,
            differing: cover.differing,
            distance,
        });
    }
}

/// Orders candidates by fewest differing positions after alignment, then nearest feature.
fn fewest_differing_first(found: &mut [Candidate]) {
    found.sort_by(|a, b| {
        (a.0.differing.len().cmp(&b.0.differing.len())).then(a.1.distance.total_cmp(&b.1.distance))
    });
}
