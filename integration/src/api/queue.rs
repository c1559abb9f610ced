//! The queue in front of mistral.rs: requests enter the engine in arrival order, at most
//! `--engine-requests` of them (default 2) at once, each with up to `--max-seqs` of its
//! inputs inside at a time (so mistral.rs can still batch a request's equal-length inputs).
//! mistral.rs's scheduler runs one length bucket per step and, given sequences of several
//! lengths, picks the bucket by length and urgency: with many requests inside, short inputs
//! overtake long ones again and again (p99 65x to 72x the median measured on EmbeddingGemma
//! at 8 clients, `make serve-load`). Behind this queue it sees at most two requests' inputs,
//! so a request is overtaken by at most the one inside with it. Admission (`--max-in-flight`, 429 at once)
//! happens before the queue.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::Metrics;

/// Turns in the engine, handed out first come, first served (tokio's semaphore is fair).
#[derive(Debug, Clone)]
pub struct EngineQueue {
    /// One permit per request inside; `None`: no queue (every input goes to mistral.rs at once).
    slots: Option<Arc<Semaphore>>,
    /// A request's inputs inside at once.
    per_request: usize,
}

/// A request's turn in the engine; given back (and counted) on drop.
#[derive(Debug)]
pub struct Places<'a> {
    _permit: Option<OwnedSemaphorePermit>,
    count: usize,
    metrics: &'a Metrics,
}

impl Drop for Places<'_> {
    fn drop(&mut self) {
        self.metrics.in_engine(-(self.count as i64));
    }
}

impl Places<'_> {
    /// How many of its inputs the request may have in the engine at once.
    pub fn count(&self) -> usize {
        self.count
    }
}

impl EngineQueue {
    /// A queue that lets `requests` requests into the engine at once, each with up to
    /// `per_request` inputs inside at a time; `requests` 0: no queue (mistral.rs's
    /// scheduler gets every input at once, as without this queue).
    pub fn new(requests: usize, per_request: usize) -> Self {
        Self {
            slots: (requests > 0).then(|| Arc::new(Semaphore::new(requests))),
            per_request: per_request.max(1),
        }
    }

    /// Waits, behind every request that arrived earlier, for this request's turn; counted
    /// in `metrics`.
    pub async fn enter<'a>(&self, inputs: usize, metrics: &'a Metrics) -> Places<'a> {
        let Some(slots) = &self.slots else {
            metrics.in_engine(inputs as i64);
            return Places {
                _permit: None,
                count: inputs.max(1),
                metrics,
            };
        };
        let count = inputs.clamp(1, self.per_request);
        let started = Instant::now();
        metrics.queued(inputs as i64);
        // the semaphore is never closed, so acquiring cannot fail; should it ever, the
        // request proceeds unqueued rather than failing
        let acquired = slots.clone().acquire_owned().await;
        metrics.queued(-(inputs as i64));
        metrics.waited(started.elapsed());
        let permit = match acquired {
            Ok(p) => p,
            Err(_) => {
                tracing::error!("the engine queue is closed; admitting without it");
                Arc::new(Semaphore::new(1))
                    .acquire_owned()
                    .await
                    .unwrap_or_else(|_| unreachable!("a fresh semaphore is open"))
            }
        };
        metrics.in_engine(count as i64);
        Places {
            _permit: Some(permit),
            count,
            metrics,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_enter_in_arrival_order() {
        let cache = Arc::new(
            attncache_plugin::AttnCache::open(attncache_plugin::CacheConfig::default(), 0)
                .expect("cache"),
        );
        let metrics = Arc::new(Metrics::new(cache));
        let queue = EngineQueue::new(1, 2);
        let first = queue.enter(3, &metrics).await;
        assert_eq!(
            first.count(),
            2,
            "a request has at most per_request inputs inside"
        );
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (queue, metrics, order) = (queue.clone(), metrics.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let places = queue.enter(1 + i % 3, &metrics).await;
                order.lock().unwrap().push(i);
                tokio::task::yield_now().await;
                drop(places);
            }));
            // each waiter is queued before the next arrives
            tokio::task::yield_now().await;
        }
        drop(first);
        for w in waiting {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
        let text = metrics.render().unwrap();
        assert!(text.contains("attncache_queue_depth 0"), "{text}");
        assert!(text.contains("attncache_engine_inputs 0"), "{text}");
    }
}
