//! The queue in front of mistral.rs: requests enter the engine in arrival order with at
//! most `--max-seqs` inputs inside at once (one full batch), so a request never waits
//! behind inputs that arrived after it. mistral.rs's scheduler, given more sequences than
//! a batch, picks among them by length and lets some wait far longer than others (the
//! tail measured in issue 21); behind this queue it never holds more than one batch.
//! Admission (`--max-in-flight`, 429 at once) happens before the queue.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::metrics::Metrics;

/// Places in the engine, handed out first come, first served (tokio's semaphore is fair).
#[derive(Debug, Clone)]
pub struct EngineQueue {
    /// `None`: no queue (every input goes to mistral.rs at once).
    slots: Option<Arc<Semaphore>>,
    size: usize,
}

/// A request's places in the engine; they are given back (and counted) on drop.
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
    /// How many inputs the request may have in the engine at once.
    pub fn count(&self) -> usize {
        self.count
    }
}

impl EngineQueue {
    /// A queue with `size` places; 0: no queue (mistral.rs's scheduler gets every input at
    /// once, as without this queue).
    pub fn new(size: usize) -> Self {
        Self {
            slots: (size > 0).then(|| Arc::new(Semaphore::new(size))),
            size,
        }
    }

    /// Places in the engine (0: unbounded, no queue).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Waits, behind every request that arrived earlier, for up to `inputs` places (all of
    /// them at once, so a request's inputs enter together); counted in `metrics`.
    pub async fn enter<'a>(&self, inputs: usize, metrics: &'a Metrics) -> Places<'a> {
        let Some(slots) = &self.slots else {
            metrics.in_engine(inputs as i64);
            return Places {
                _permit: None,
                count: inputs.max(1),
                metrics,
            };
        };
        let count = inputs.clamp(1, self.size);
        let started = Instant::now();
        metrics.queued(inputs as i64);
        // the semaphore is never closed, so acquiring cannot fail; should it ever, the
        // request proceeds unqueued rather than failing
        let acquired = slots.clone().acquire_many_owned(count as u32).await;
        metrics.queued(-(inputs as i64));
        metrics.waited(started.elapsed());
        let permit = match acquired {
            Ok(p) => p,
            Err(_) => {
                tracing::error!("the engine queue is closed; admitting without it");
                Arc::new(Semaphore::new(count))
                    .acquire_many_owned(count as u32)
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
        let queue = EngineQueue::new(2);
        let first = queue.enter(2, &metrics).await;
        assert_eq!(first.count(), 2);
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for i in 0..4 {
            let (queue, metrics, order) = (queue.clone(), metrics.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let places = queue.enter(1 + i % 2, &metrics).await;
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
