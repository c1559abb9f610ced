//! The online check of blend hits (`--blend-audit-rate R`): a share R of the near blend hits
//! the server answers is computed again exactly, in the background, and the cosine of the
//! embedding it served to the exact one is exported as the histogram
//! `attncache_blend_audit_fidelity`, so an operator sees on their own traffic whether the
//! accepted hits keep the fidelity floor.
//!
//! An audit is an ordinary flag-off request (through the engine queue, so it waits its turn
//! like any input), runs after the answer was sent and never changes it; audits run one at a
//! time, and a sampled hit that finds one running is skipped and counted
//! (`attncache_blend_audits_skipped_total`), so audits cannot pile up under load.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use attncache_plugin::{Decision, Outcome};

use super::error::ApiError;
use super::ApiState;

/// The audit's sampling state.
#[derive(Debug)]
pub struct BlendAudit {
    rate: f64,
    /// Near blend hits seen so far (the sampling clock).
    seen: AtomicU64,
    /// One audit at a time.
    running: Arc<tokio::sync::Semaphore>,
}

impl BlendAudit {
    /// Audits the share `rate` (0 < rate ≤ 1) of near blend hits; `None` for 0 (no audits).
    pub fn new(rate: f64) -> Option<Self> {
        (rate > 0.0).then(|| Self {
            rate: rate.min(1.0),
            seen: AtomicU64::new(0),
            running: Arc::new(tokio::sync::Semaphore::new(1)),
        })
    }

    /// The share of near blend hits audited.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Whether the next near blend hit is audited: exactly the share `rate` of them, spread
    /// evenly (every one at 1, every fourth at 0.25), with no randomness.
    fn sampled(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.rate).floor() > (n * self.rate).floor()
    }
}

/// Whether `decision` is an accepted near blend hit (a stored neighbour's K/V used, the
/// deviating positions recomputed): what the audit checks.
pub fn is_near_blend_hit(decision: Option<&Decision>) -> bool {
    decision.is_some_and(|d| d.outcome == Outcome::NearHit && d.residual_deviation.is_some())
}

/// Audits the answer `served` to an input of `tokens` tokens when the server audits and this
/// hit is sampled: runs `exact` (the same input with the flag off; not started otherwise) in
/// the background, in its place in the engine queue, and records the cosine of the two.
pub fn maybe_audit<F>(state: &Arc<ApiState>, tokens: usize, served: Vec<f32>, exact: F)
where
    F: Future<Output = Result<Vec<f32>, ApiError>> + Send + 'static,
{
    let Some(audit) = state.audit.as_ref() else {
        return;
    };
    if !audit.sampled() {
        return;
    }
    let Ok(permit) = audit.running.clone().try_acquire_owned() else {
        state.metrics.blend_audit_skipped();
        return;
    };
    let state = state.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let queued = state.engine.join(tokens);
        let _place = queued.place().await;
        match exact.await {
            Ok(exact) => state.metrics.blend_audit(cosine(&served, &exact)),
            Err(e) => {
                tracing::warn!("a blend audit could not compute the exact embedding: {e:?}");
                state.metrics.blend_audit_skipped();
            }
        }
    });
}

/// Cosine similarity, accumulated in f64 (0 when a vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_takes_exactly_the_share_spread_evenly() {
        let every = |rate: f64, n: usize| {
            let a = BlendAudit::new(rate).expect("audits");
            (0..n).map(|_| a.sampled()).collect::<Vec<_>>()
        };
        assert!(every(1.0, 5).iter().all(|s| *s));
        assert_eq!(
            every(0.25, 8),
            [false, false, false, true, false, false, false, true]
        );
        assert_eq!(every(0.1, 1000).iter().filter(|s| **s).count(), 100);
        assert!(BlendAudit::new(0.0).is_none());
    }

    #[test]
    fn only_accepted_near_blend_hits_are_audited() {
        let d = |outcome, residual| Decision {
            outcome,
            distance: None,
            tokens: 40,
            differing: Some(1),
            predicted_loss: None,
            recomputed_rows: 3,
            lookup_ns: 0,
            residual_deviation: residual,
            resumed_after_layer: None,
            check: None,
            stored_inputs: Some(1),
        };
        assert!(is_near_blend_hit(Some(&d(Outcome::NearHit, Some(0.01)))));
        // a map near hit, an identical blend entry, a refused candidate (a miss), no lookup
        assert!(!is_near_blend_hit(Some(&d(Outcome::NearHit, None))));
        assert!(!is_near_blend_hit(Some(&d(Outcome::ExactHit, Some(0.0)))));
        assert!(!is_near_blend_hit(Some(&d(Outcome::Miss, None))));
        assert!(!is_near_blend_hit(None));
    }

    #[test]
    fn cosine_of_equal_and_opposite_vectors() {
        assert!((cosine(&[1.0, 2.0], &[1.0, 2.0]) - 1.0).abs() < 1e-12);
        assert!((cosine(&[1.0, 0.0], &[-1.0, 0.0]) + 1.0).abs() < 1e-12);
    }
}
