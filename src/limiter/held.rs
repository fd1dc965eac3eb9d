//! The state of open reservations (module `reserve`): each one's [`Held`] record, how it
//! [`End`]s, and the [`Registry`] the reaper sweeps.

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use jiff::Timestamp;
use rustc_hash::FxHashMap;

use crate::model::money::Money;
use crate::model::unit::{Estimate, Unit, Usage};
use crate::model::window::Window;

/// `Held::state`: open, then exactly one of the others (a CAS decides who ends it).
pub(crate) const OPEN: u8 = 0;
pub(crate) const DONE: u8 = 1;
pub(crate) const EXPIRED: u8 = 2;

/// How a reservation ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum End {
    /// The call cost this (and used this many tokens, when known).
    Commit(Money, Option<Usage>),
    /// The call never went out: nothing counted.
    Release,
    /// Dropped or expired: the call may have gone out, so the amount held counts.
    Expire,
}

impl End {
    /// What a budget of `unit` that held `held` counts: `None` when the commit lacks what
    /// the unit needs (a token budget and no usage: counted nowhere, reported). Concurrent
    /// slots count nothing: ending frees them.
    pub(crate) fn counts(&self, unit: Unit, held: u64) -> Option<u64> {
        match (self, unit) {
            (_, Unit::Concurrent) | (End::Release, _) => Some(0),
            (End::Expire, _) => Some(held),
            (End::Commit(cost, usage), unit) => unit.amount(*cost, usage.as_ref()),
        }
    }

    /// The dollars counted in USD budgets.
    pub(crate) fn cost(&self) -> Money {
        match self {
            End::Commit(cost, _) => *cost,
            End::Release => Money::ZERO,
            End::Expire => Money::ZERO,
        }
    }
}

/// One open reservation, shared by its [`Reservation`] handle and the registry (the reaper).
#[derive(Debug)]
pub(crate) struct Held {
    pub(crate) id: Arc<str>,
    /// Each budget and the window the estimate is held in.
    pub(crate) items: Arc<[(u32, Window)]>,
    /// The amount held in each budget of `items` (in its unit: [`Estimate::held`]).
    pub(crate) amounts: Box<[u64]>,
    pub(crate) estimate: Estimate,
    /// Unix seconds (whole: see the module `reserve`).
    pub(crate) expires_secs: i64,
    /// [`OPEN`], [`DONE`] or [`EXPIRED`]: whoever moves it from `OPEN` settles the money, once.
    pub(crate) state: AtomicU8,
}

impl Held {
    pub(crate) fn expires_at(&self) -> Timestamp {
        Timestamp::from_second(self.expires_secs).unwrap_or(Timestamp::MAX)
    }
}

/// The open reservations of a limiter, for expiry. A mutex around a map: taken once per
/// reserve and once per end, never on the filter or record path.
#[derive(Debug)]
pub(crate) struct Registry {
    open: Mutex<FxHashMap<Arc<str>, Arc<Held>>>,
    /// The earliest expiry in `open` (`i64::MAX` when empty), written under the lock: a sweep
    /// that finds nothing due costs one atomic load.
    next_expiry: AtomicI64,
    /// Random per open: ids stay unique across restarts of the same data dir.
    pub(crate) prefix: String,
    pub(crate) counter: AtomicU64,
    /// Dropping it (with the limiter) stops the reaper thread.
    pub(crate) reaper: OnceLock<Option<crossbeam_channel::Sender<()>>>,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        let mut prefix = crate::durable::store::random_id();
        prefix.truncate(16);
        Registry {
            open: Mutex::new(FxHashMap::default()),
            next_expiry: AtomicI64::new(i64::MAX),
            prefix,
            counter: AtomicU64::new(0),
            reaper: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FxHashMap<Arc<str>, Arc<Held>>> {
        // No multi-step updates under the lock: a poisoned map is still consistent.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn insert(&self, held: Arc<Held>) {
        let mut open = self.lock();
        self.next_expiry
            .fetch_min(held.expires_secs, Ordering::Relaxed);
        open.insert(Arc::clone(&held.id), held);
    }

    pub(crate) fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Takes out every reservation due at `now_secs`.
    pub(crate) fn due(&self, now_secs: i64) -> Vec<Arc<Held>> {
        if self.next_expiry.load(Ordering::Relaxed) > now_secs {
            return Vec::new();
        }
        let mut open = self.lock();
        let mut out = Vec::new();
        let mut next = i64::MAX;
        open.retain(|_, h| {
            if h.expires_secs <= now_secs {
                out.push(Arc::clone(h));
                false
            } else {
                next = next.min(h.expires_secs);
                true
            }
        });
        self.next_expiry.store(next, Ordering::Relaxed);
        out
    }

    /// Number of open reservations.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}
