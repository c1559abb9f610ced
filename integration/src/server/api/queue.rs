//! The queue in front of mistral.rs: inputs enter the engine in arrival order, as at most
//! `--engine-batches` (default 2) batches of equal token length at once.
//!
//! mistral.rs's scheduler runs one bucket of equal-length sequences per step and, given
//! several lengths, picks the bucket by length and urgency: with many inputs inside, short
//! inputs overtake long ones again and again (p99 47x to 109x the median measured on
//! EmbeddingGemma at 8 clients, `make serve-load`). Here the oldest waiting input always
//! opens the next batch, and every waiting input of the same token length (from any
//! request, up to `--max-seqs`) joins it: mistral.rs batches them in one step, as it would
//! with every input inside, but never sees more than two lengths at once, so an input is
//! overtaken by at most the batch inside with it. Admission (`--max-in-flight`, 429 at once)
//! happens before the queue.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

/// The queue's gauges in `/metrics` (clones of the registered ones).
#[derive(Debug, Clone)]
pub struct QueueGauges {
    /// Inputs waiting.
    pub depth: Gauge,
    /// Inputs in the engine.
    pub inside: Gauge,
    /// Seconds each input waited.
    pub wait: Histogram,
    /// Inputs in each batch let in (how often equal lengths share a step).
    pub batch_size: Histogram,
}

/// Places in the engine, handed out in arrival order, one batch of equal-length inputs at a
/// time.
#[derive(Debug, Clone)]
pub struct EngineQueue {
    /// `None`: no queue (every input goes to mistral.rs at once).
    shared: Option<Arc<Shared>>,
    gauges: QueueGauges,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<Waiting>,
    /// Batches in the engine at once.
    batches: usize,
    /// Inputs in one batch.
    batch_size: usize,
    /// Counts each batch's inputs.
    sizes: Histogram,
}

#[derive(Debug, Default)]
struct Waiting {
    queue: VecDeque<Ticket>,
    /// Batches in the engine now.
    inside: usize,
}

#[derive(Debug)]
struct Ticket {
    tokens: usize,
    tx: oneshot::Sender<Arc<Batch>>,
}

/// A batch in the engine; its place is given back when its last input leaves.
#[derive(Debug)]
struct Batch {
    shared: Arc<Shared>,
}

impl Drop for Batch {
    fn drop(&mut self) {
        let opened = {
            let mut state = self.shared.state.lock();
            state.inside = state.inside.saturating_sub(1);
            self.shared.open(&mut state)
        };
        // dropped outside the lock: a batch nobody took gives its place back at once
        drop(opened);
    }
}

impl Shared {
    /// Opens batches while there are places and waiting inputs: the oldest input and every
    /// waiting input of its length. Returns the opened batches' own handles, to be dropped
    /// after the lock is released.
    fn open(self: &Arc<Self>, state: &mut Waiting) -> Vec<Arc<Batch>> {
        let mut opened = Vec::new();
        while state.inside < self.batches {
            // inputs whose request is gone (client left) take no place
            state.queue.retain(|t| !t.tx.is_closed());
            let Some(first) = state.queue.pop_front() else {
                break;
            };
            let batch = Arc::new(Batch {
                shared: self.clone(),
            });
            state.inside += 1;
            let tokens = first.tokens;
            let mut members = vec![first];
            let mut i = 0;
            while i < state.queue.len() && members.len() < self.batch_size {
                if state.queue[i].tokens == tokens {
                    members.extend(state.queue.remove(i));
                } else {
                    i += 1;
                }
            }
            self.sizes.observe(members.len() as f64);
            for m in members {
                // a receiver dropped since the check above just leaves its place unused
                let _ = m.tx.send(batch.clone());
            }
            opened.push(batch);
        }
        opened
    }
}

/// An input waiting for its place ([`EngineQueue::join`]).
#[derive(Debug)]
pub struct Queued {
    rx: Option<oneshot::Receiver<Arc<Batch>>>,
    gauges: QueueGauges,
    since: Instant,
    counted: bool,
}

/// An input's place in the engine; given back (and counted) on drop.
#[derive(Debug)]
pub struct Place {
    _batch: Option<Arc<Batch>>,
    gauges: QueueGauges,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.gauges.inside.dec();
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        if self.counted {
            self.gauges.depth.dec();
        }
    }
}

impl Queued {
    /// Waits for the input's place.
    pub async fn place(mut self) -> Place {
        let batch = match self.rx.take() {
            None => None,
            Some(rx) => {
                // the sender lives in the queue until it hands out a place, and the queue
                // lives as long as the server; should it ever be dropped, the input
                // proceeds unqueued
                let batch = rx.await.ok();
                self.gauges.wait.observe(self.since.elapsed().as_secs_f64());
                batch
            }
        };
        self.gauges.inside.inc();
        Place {
            _batch: batch,
            gauges: self.gauges.clone(),
        }
    }
}

impl EngineQueue {
    /// A queue that lets `batches` batches of equal-length inputs, each of up to
    /// `batch_size` inputs, into the engine at once; `batches` 0: no queue (mistral.rs's
    /// scheduler gets every input at once).
    pub fn new(batches: usize, batch_size: usize, gauges: QueueGauges) -> Self {
        Self {
            shared: (batches > 0).then(|| {
                Arc::new(Shared {
                    state: Mutex::new(Waiting::default()),
                    batches,
                    batch_size: batch_size.max(1),
                    sizes: gauges.batch_size.clone(),
                })
            }),
            gauges,
        }
    }

    /// Queues an input of `tokens` tokens behind every input that joined earlier; call in
    /// arrival order, then wait with [`Queued::place`].
    pub fn join(&self, tokens: usize) -> Queued {
        let Some(shared) = &self.shared else {
            return Queued {
                rx: None,
                gauges: self.gauges.clone(),
                since: Instant::now(),
                counted: false,
            };
        };
        let (tx, rx) = oneshot::channel();
        self.gauges.depth.inc();
        let opened = {
            let mut state = shared.state.lock();
            state.queue.push_back(Ticket { tokens, tx });
            shared.open(&mut state)
        };
        drop(opened);
        Queued {
            rx: Some(rx),
            gauges: self.gauges.clone(),
            since: Instant::now(),
            counted: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(batches: usize, batch_size: usize) -> EngineQueue {
        EngineQueue::new(
            batches,
            batch_size,
            QueueGauges {
                depth: Gauge::default(),
                inside: Gauge::default(),
                wait: Histogram::new([1.0]),
                batch_size: Histogram::new([1.0, 2.0, 3.0]),
            },
        )
    }

    /// Joins inputs of these lengths in order; returns the order they got their places in
    /// (each holds its place until the next yield).
    async fn order_of(q: &EngineQueue, lengths: &[usize], first: Place) -> Vec<usize> {
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (i, &len) in lengths.iter().enumerate() {
            let queued = q.join(len);
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let place = queued.place().await;
                order.lock().push(i);
                tokio::task::yield_now().await;
                drop(place);
            }));
        }
        tokio::task::yield_now().await;
        drop(first);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().clone();
        order
    }

    #[tokio::test]
    async fn inputs_enter_in_arrival_order() {
        let q = queue(1, 4);
        let first = q.join(7).place().await;
        let order = order_of(&q, &[3, 5, 9, 4], first).await;
        assert_eq!(order, vec![0, 1, 2, 3]);
        assert_eq!(q.gauges.depth.get(), 0);
        assert_eq!(q.gauges.inside.get(), 0);
    }

    #[tokio::test]
    async fn equal_lengths_waiting_join_the_oldest_inputs_batch() {
        let q = queue(1, 3);
        let first = q.join(1).place().await;
        // 5 opens a batch that the later 5s join (up to 3 inputs); then 8, then the last 5
        let order = order_of(&q, &[5, 8, 5, 5, 5], first).await;
        assert_eq!(order, vec![0, 2, 3, 1, 4]);
    }

    #[tokio::test]
    async fn a_batch_holds_its_place_until_its_last_input_leaves() {
        let q = queue(1, 4);
        let a = q.join(6).place().await;
        let b = q.join(2);
        // a's batch opened before c arrived: c waits behind b
        let c = q.join(6);
        let c = tokio::spawn(async move { c.place().await });
        tokio::task::yield_now().await;
        assert!(!c.is_finished());
        drop(a);
        let b = b.place().await;
        tokio::task::yield_now().await;
        assert!(!c.is_finished(), "one batch inside at a time");
        drop(b);
        let c = c.await.unwrap();
        assert_eq!(q.gauges.inside.get(), 1);
        drop(c);
        assert_eq!(q.gauges.inside.get(), 0);
    }

    #[tokio::test]
    async fn an_input_whose_request_left_takes_no_place() {
        let q = queue(1, 4);
        let a = q.join(3).place().await;
        let gone = q.join(4);
        let next = q.join(5);
        drop(gone);
        assert_eq!(q.gauges.depth.get(), 1);
        drop(a);
        let next = next.place().await;
        assert_eq!(q.gauges.inside.get(), 1);
        drop(next);
    }

    #[tokio::test]
    async fn no_queue_admits_at_once() {
        let q = queue(0, 4);
        let places: Vec<Place> = futures_places(&q, 10).await;
        assert_eq!(q.gauges.inside.get(), 10);
        drop(places);
        assert_eq!(q.gauges.inside.get(), 0);
        assert_eq!(q.gauges.depth.get(), 0);
    }

    async fn futures_places(q: &EngineQueue, n: usize) -> Vec<Place> {
        let mut out = Vec::new();
        for i in 0..n {
            out.push(q.join(i).place().await);
        }
        out
    }
}
