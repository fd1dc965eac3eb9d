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
//! the key, so a retry runs again; its place in the eviction order is reclaimed too (the
//! order is compacted once it holds more dead entries than live keys), so failed first
//! attempts cannot grow the memory.
//!
//! A key remembers a fingerprint of its request (what is spent, on what, when): the same key
//! with another request is [`Begin::Mismatch`] (a `409`), not a silent duplicate.

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
    /// Key -> (generation, request fingerprint, slot).
    slots: HashMap<Arc<str>, (u64, u64, Slot)>,
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
    /// Known, with another request.
    Mismatch,
}

/// A fingerprint of a request's content (stable within the process).
pub(crate) fn fingerprint(content: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    content.hash(&mut h);
    h.finish()
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

    /// Registers `key` (for the request of `fingerprint`) unless it is known.
    pub(crate) fn begin(&self, key: &str, fingerprint: u64) -> Begin {
        let now = Instant::now();
        let mut t = self.lock();
        t.expire(now);
        if let Some((_, known, slot)) = t.slots.get(key) {
            if *known != fingerprint {
                return Begin::Mismatch;
            }
            return match slot {
                Slot::Done(o) => Begin::Done(o.clone()),
                Slot::Pending(rx) => Begin::Wait(rx.clone()),
            };
        }
        let key: Arc<str> = Arc::from(key);
        let (tx, rx) = watch::channel(None);
        let generation = t.next_generation;
        t.next_generation += 1;
        t.slots.insert(
            Arc::clone(&key),
            (generation, fingerprint, Slot::Pending(rx)),
        );
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

    /// Entries of the eviction order, dead ones included (bounded by twice the keys plus a
    /// constant).
    #[cfg(test)]
    fn order_len(&self) -> usize {
        self.lock().order.len()
    }
}

/// Dead entries tolerated in the eviction order beyond the live keys.
const SLACK: usize = 1024;

impl Table {
    fn expire(&mut self, now: Instant) {
        while let Some((key, generation, expires)) = self.order.front() {
            if *expires > now && self.slots.len() < CAPACITY {
                break;
            }
            if self.slots.get(key).is_some_and(|(g, _, _)| g == generation) {
                self.slots.remove(key);
            }
            self.order.pop_front();
        }
    }

    /// Forgets `key` (of `generation`) and keeps the eviction order bounded: once it holds
    /// more dead entries than live keys (plus [`SLACK`]), the dead ones are dropped, in time
    /// proportional to what was dropped (amortized constant).
    fn forget(&mut self, key: &str, generation: u64) {
        if self
            .slots
            .get(key)
            .is_some_and(|(g, _, _)| *g == generation)
        {
            self.slots.remove(key);
        }
        if self.order.len() > 2 * self.slots.len() + SLACK {
            let slots = &self.slots;
            self.order
                .retain(|(k, g, _)| slots.get(k).is_some_and(|(live, _, _)| live == g));
        }
    }
}

impl Ticket {
    /// Stores the outcome and wakes the waiters. An outcome that counted nothing forgets the
    /// key, so a retry runs again.
    pub(crate) fn finish(mut self, outcome: Outcome) {
        let mut t = self.keys.lock();
        if outcome.settled {
            if let Some((g, _, slot)) = t.slots.get_mut(&self.key) {
                if *g == self.generation {
                    *slot = Slot::Done(outcome.clone());
                }
            }
        } else {
            t.forget(&self.key, self.generation);
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
            t.forget(&self.key, self.generation);
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
        let Begin::Fresh(t) = keys.begin("a", 1) else {
            panic!("fresh")
        };
        assert!(matches!(keys.begin("a", 1), Begin::Wait(_)));
        t.finish(Outcome::counted());
        assert!(matches!(keys.begin("a", 1), Begin::Done(o) if o.counted));

        let Begin::Fresh(t) = keys.begin("b", 1) else {
            panic!("fresh")
        };
        t.finish(Outcome::transient("closed".into()));
        assert!(matches!(keys.begin("b", 1), Begin::Fresh(_)));

        let Begin::Fresh(t) = keys.begin("c", 1) else {
            panic!("fresh")
        };
        drop(t);
        assert!(matches!(keys.begin("c", 1), Begin::Fresh(_)));
    }

    #[test]
    fn failed_first_attempts_leave_the_table_bounded() {
        let keys = Keys::default();
        let Begin::Fresh(t) = keys.begin("kept", 1) else {
            panic!("fresh")
        };
        t.finish(Outcome::counted());
        for i in 0..300_000 {
            let Begin::Fresh(t) = keys.begin(&format!("failed-{i}"), 7) else {
                panic!("fresh")
            };
            if i % 2 == 0 {
                t.finish(Outcome::transient("expired".into()));
            } else {
                drop(t); // abandoned
            }
        }
        assert_eq!(keys.len(), 1);
        assert!(keys.order_len() <= 2 + SLACK, "{}", keys.order_len());
        assert!(matches!(keys.begin("kept", 1), Begin::Done(o) if o.counted));
    }

    #[test]
    fn a_key_with_another_request_is_a_mismatch() {
        let keys = Keys::default();
        let Begin::Fresh(t) = keys.begin("k", 1) else {
            panic!("fresh")
        };
        assert!(matches!(keys.begin("k", 2), Begin::Mismatch));
        assert!(matches!(keys.begin("k", 1), Begin::Wait(_)));
        t.finish(Outcome::counted());
        assert!(matches!(keys.begin("k", 2), Begin::Mismatch));
        assert!(matches!(keys.begin("k", 1), Begin::Done(_)));
        assert_ne!(fingerprint("a"), fingerprint("b"));
    }

    #[tokio::test]
    async fn waiters_get_the_first_outcome() {
        let keys = Keys::default();
        let Begin::Fresh(t) = keys.begin("k", 1) else {
            panic!("fresh")
        };
        let Begin::Wait(mut rx) = keys.begin("k", 1) else {
            panic!("wait")
        };
        t.finish(Outcome::counted());
        let got = rx.wait_for(Option::is_some).await.unwrap().clone();
        assert_eq!(got, Some(Outcome::counted()));
    }
}
