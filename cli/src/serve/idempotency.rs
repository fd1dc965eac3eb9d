//! Idempotency keys of `POST /v1/spend`: a retried request is counted once.
//!
//! Memory only, bounded two ways: a key is remembered for [`TTL`] after its first request
//! (a client retries within seconds or minutes, not a day), and at most [`CAPACITY`] keys are
//! kept (beyond that the oldest is forgotten first). A key is not persisted: after a restart
//! of the sidecar a retry of a request acknowledged before the restart counts again (see
//! `docs/guide/sidecar.md`).
//!
//! Concurrent requests with the same key: the first runs, the others wait for its outcome and
//! answer with it. A first attempt that counted nothing (expired `at`, shutting down) forgets
//! the key, so a retry runs again.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How long a key is remembered after its first request.
pub(crate) const TTL: Duration = Duration::from_secs(24 * 3600);
/// Most keys remembered at once.
pub(crate) const CAPACITY: usize = 262_144;
/// Longest key accepted, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 256;

/// The stored answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Whether the spend was counted.
    pub counted: bool,
    /// Why not, when it was not.
    pub reason: Option<String>,
    /// Whether a retry would meet the same answer (remember it) or may count (forget the key).
    pub settled: bool,
}

#[derive(Debug)]
enum Slot {
    Pending(watch::Receiver<Option<Outcome>>),
    Done(Outcome),
}

#[derive(Debug, Default)]
struct Table {
    slots: HashMap<Arc<str>, (u64, Slot)>,
    /// Insertion order with deadlines: (key, generation, expires).
    order: VecDeque<(Arc<str>, u64, Instant)>,
    next_generation: u64,
}

/// The keys seen recently.
#[derive(Debug, Default, Clone)]
pub(crate) struct Keys {
    table: Arc<Mutex<Table>>,
}

/// What [`Keys::begin`] found.
#[derive(Debug)]
pub(crate) enum Begin {
    /// First time: run the request and [`Ticket::finish`] it.
    Fresh(Ticket),
    /// Answered before.
    Done(Outcome),
    /// In flight: wait for its outcome (`None` when the first attempt was abandoned).
    Wait(watch::Receiver<Option<Outcome>>),
}

/// The right to run the request of a fresh key.
#[derive(Debug)]
pub(crate) struct Ticket {
    keys: Keys,
    key: Arc<str>,
    generation: u64,
    tx: Option<watch::Sender<Option<Outcome>>>,
}

impl Keys {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock leaves a consistent table (no multi-step updates).
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `key` unless it is known.
    pub(crate) fn begin(&self, key: &str) -> Begin {
        let now = Instant::now();
        let mut t = self.lock();
        t.expire(now);
        if let Some((_, slot)) = t.slots.get(key) {
            return match slot {
                Slot::Done(o) => Begin::Done(o.clone()),
                Slot::Pending(rx) => Begin::Wait(rx.clone()),
            };
        }
        let key: Arc<str> = Arc::from(key);
        let (tx, rx) = watch::channel(None);
        let generation = t.next_generation;
        t.next_generation += 1;
        t.slots
            .insert(Arc::clone(&key), (generation, Slot::Pending(rx)));
        t.order.push_back((Arc::clone(&key), generation, now + TTL));
        Begin::Fresh(Ticket {
            keys: self.clone(),
            key,
            generation,
            tx: Some(tx),
        })
    }

    /// Number of keys remembered.
    pub(crate) fn len(&self) -> usize {
        self.lock().slots.len()
    }
}

impl Table {
    fn expire(&mut self, now: Instant) {
        while let Some((key, generation, expires)) = self.order.front() {
            if *expires > now && self.slots.len() < CAPACITY {
                break;
            }
            if self.slots.get(key).is_some_and(|(g, _)| g == generation) {
                self.slots.remove(key);
            }
            self.order.pop_front();
        }
    }
}

impl Ticket {
    /// Stores the outcome and wakes the waiters. An outcome that counted nothing forgets the
    /// key, so a retry runs again.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        let mut t = self.keys.lock();
        if let Some((g, slot)) = t.slots.get_mut(&self.key) {
            if *g == self.generation {
                if outcome.settled {
                    *slot = Slot::Done(outcome.clone());
                } else {
                    t.slots.remove(&self.key);
                }
            }
        }
        drop(t);
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Some(outcome));
        }
    }
}

impl Drop for Ticket {
    /// Abandoned (a panic): forget the key and let the waiters retry.
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let mut t = self.keys.lock();
            if t.slots
                .get(&self.key)
                .is_some_and(|(g, _)| *g == self.generation)
            {
                t.slots.remove(&self.key);
            }
            drop(t);
            let _ = tx.send(None);
        }
    }
}

impl Outcome {
    /// Counted.
    pub(crate) fn counted() -> Outcome {
        Outcome {
            counted: true,
            reason: None,
            settled: true,
        }
    }

    /// Not counted, for a reason that a retry would meet again (no budget).
    pub(crate) fn refused(reason: String) -> Outcome {
        Outcome {
            counted: false,
            reason: Some(reason),
            settled: true,
        }
    }

    /// Not counted, for a reason that may pass on retry (shutting down, storage).
    pub(crate) fn transient(reason: String) -> Outcome {
        Outcome {
            counted: false,
            reason: Some(reason),
            settled: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_counted_once_and_failures_are_forgotten() {
        let keys = Keys::default();
        let Begin::Fresh(t) = keys.begin("a") else {
            panic!("fresh")
        };
        assert!(matches!(keys.begin("a"), Begin::Wait(_)));
        t.finish(Outcome::counted());
        assert!(matches!(keys.begin("a"), Begin::Done(o) if o.counted));

        let Begin::Fresh(t) = keys.begin("b") else {
            panic!("fresh")
        };
        t.finish(Outcome::transient("closed".into()));
        assert!(matches!(keys.begin("b"), Begin::Fresh(_)));

        let Begin::Fresh(t) = keys.begin("c") else {
            panic!("fresh")
        };
        drop(t);
        assert!(matches!(keys.begin("c"), Begin::Fresh(_)));
    }

    #[tokio::test]
    async fn waiters_get_the_first_outcome() {
        let keys = Keys::default();
        let Begin::Fresh(t) = keys.begin("k") else {
            panic!("fresh")
        };
        let Begin::Wait(mut rx) = keys.begin("k") else {
            panic!("wait")
        };
        t.finish(Outcome::counted());
        let got = rx.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(got, Some(Outcome::counted()));
    }
}
