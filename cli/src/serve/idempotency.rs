//! Idempotency keys of `POST /v1/spend`: a retried request is counted once, also across a
//! restart of the sidecar (a crash or SIGKILL included).
//!
//! Bounded two ways: a key is remembered for [`TTL`] after its first request (a client
//! retries within seconds or minutes, not a day), and at most [`CAPACITY`] keys are kept
//! (beyond that the oldest is forgotten first).
//!
//! Across a restart: a keyed spend is charged with
//! [`Spend::idempotency_key`](provider_budgets::Spend::idempotency_key), so the library's
//! journal writes the key and its request's [`fingerprint`] **in the sled batch of the spend
//! itself**: after a crash both are on disk or neither. At start, before it serves, the
//! sidecar seeds this table from the records on disk ([`Keys::seed`], each answered
//! `duplicate: true` for what is left of its [`TTL`]). The order that makes it exact:
//! the key is `Pending` here while its spend is in flight, the record goes to disk with the
//! spend, and the answer is sent only after the fsync (for `durable: true`). So a kill after
//! the fsync and before the answer leaves the key on disk, and the retry after the restart is
//! a duplicate that counts nothing; a kill before the fsync leaves neither, and the retry
//! counts once. A buffered spend (no `durable`) is answered before its fsync: a kill within
//! `storage.max_delay` after the answer loses the spend and its key together (the buffered
//! contract), and the retry counts it once. A spend that counts nothing (no budget applies, a
//! cost of zero) writes no record.
//!
//! The fingerprint is XXH3-64 of a canonical encoding of the request (built by the caller),
//! stable across processes, so that "same key, another request" is still a 409 after a
//! restart.
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

/// How long a key is remembered after its first request: as long as the library keeps its
/// record on disk.
pub(crate) const TTL: Duration = provider_budgets::IDEMPOTENCY_TTL;
/// Most keys remembered at once: as many as the library keeps on disk.
pub(crate) const CAPACITY: usize = provider_budgets::IDEMPOTENCY_CAPACITY;
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
    /// What was counted (`None` for an answer seeded from disk after a restart, which keeps
    /// only the key).
    pub cost: Option<super::usage::Counted>,
    /// The budgets that applied and could not count the spend (`"uncounted"`: a token
    /// budget and no usage), as JSON objects; empty for most spends.
    pub uncounted: Vec<serde_json::Value>,
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

/// A fingerprint of a request's canonical encoding: XXH3-64, the same in every process and
/// on every platform (it is stored with the key and compared after a restart).
pub(crate) fn fingerprint(canonical: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(canonical)
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

    /// Remembers keys answered before a restart (`(key, fingerprint, age)`, oldest first):
    /// each is answered as counted until its [`TTL`] (from its first request) has passed.
    /// Returns how many were taken (those older than the TTL are not).
    pub(crate) fn seed(&self, known: impl IntoIterator<Item = (String, u64, Duration)>) -> usize {
        let now = Instant::now();
        let mut t = self.lock();
        let mut taken = 0;
        for (key, fingerprint, age) in known {
            let Some(left) = TTL.checked_sub(age).filter(|l| !l.is_zero()) else {
                continue;
            };
            let key: Arc<str> = Arc::from(key);
            let generation = t.next_generation;
            t.next_generation += 1;
            let slot = Slot::Done(Outcome::counted());
            t.slots
                .insert(Arc::clone(&key), (generation, fingerprint, slot));
            // Oldest first: the deadlines stay in order, as `expire` needs.
            t.order.push_back((key, generation, now + left));
            taken += 1;
        }
        t.expire(now);
        taken
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
            cost: None,
            uncounted: Vec::new(),
        }
    }

    /// This outcome with what was counted.
    pub(crate) fn with_cost(self, cost: super::usage::Counted) -> Outcome {
        Outcome {
            cost: Some(cost),
            ..self
        }
    }

    /// This outcome with the budgets left uncounted.
    pub(crate) fn with_uncounted(self, uncounted: Vec<serde_json::Value>) -> Outcome {
        Outcome { uncounted, ..self }
    }

    /// Not counted, for a reason that a retry would meet again (no budget).
    pub(crate) fn refused(reason: String) -> Outcome {
        Outcome {
            counted: false,
            reason: Some(reason),
            settled: true,
            cost: None,
            uncounted: Vec::new(),
        }
    }

    /// Not counted, for a reason that may pass on retry (shutting down, storage).
    pub(crate) fn transient(reason: String) -> Outcome {
        Outcome {
            counted: false,
            reason: Some(reason),
            settled: false,
            cost: None,
            uncounted: Vec::new(),
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
        assert_ne!(fingerprint(b"a"), fingerprint(b"b"));
        // Stable across processes and versions: XXH3-64's specified value (seed 0).
        assert_eq!(fingerprint(b""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn seeded_keys_are_duplicates_until_their_ttl_and_keep_their_fingerprint() {
        let keys = Keys::default();
        let hour = Duration::from_secs(3600);
        let known = [
            ("old".to_owned(), 1, TTL + hour),
            ("young".to_owned(), 2, hour),
            ("new".to_owned(), 3, Duration::ZERO),
        ];
        assert_eq!(keys.seed(known), 2);
        assert!(matches!(keys.begin("young", 2), Begin::Done(o) if o.counted));
        assert!(matches!(keys.begin("young", 9), Begin::Mismatch));
        assert!(matches!(keys.begin("new", 3), Begin::Done(_)));
        assert_eq!(keys.len(), 2);
        assert!(
            matches!(keys.begin("old", 1), Begin::Fresh(_)),
            "past its TTL"
        );
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
