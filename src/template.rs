//! Templates: a budget named `"*"` in an identity scope (`{key: "*", limit: 10, period: 1mo}`)
//! gives each distinct name of its scope a series of its own, created on first use.
//!
//! A [`Template`] holds, for one identity scope, its template budgets (one per period) and
//! the names that have series: name → the slots of their templated series. The resolver owns
//! one per identity scope with a template; a reload carries the live names into the new
//! resolver's table with the new settings (`Limiter::carry_templates`). A series keeps its
//! slot, keyed by its [`BudgetKey`](crate::model::key::BudgetKey), for the life of the
//! process.
//!
//! Creating a series needs the limiter (slots, stored totals, journal): that is
//! `limiter::materialize`. This module only answers lookups, on the request path: a read lock
//! of one of [`SHARDS`] maps, so that threads looking up different names rarely share a lock.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{PoisonError, RwLock};

use rustc_hash::FxHashMap;

use crate::config::BudgetConfig;

/// Shards of a template's name table. Why 16: two cores here, tens in production; a power of
/// two picks a shard with a mask.
const SHARDS: usize = 16;

/// Names longer than this get no series: a name becomes part of storage and Redis keys, and
/// an identity comes from a request (the router's hashed key, a user id), never this long.
pub const MAX_TEMPLATED_NAME: usize = 256;

/// One template budget of a scope (its own series counts nothing: it is the status row of
/// the template itself).
#[derive(Debug, Clone)]
pub(crate) struct Rule {
    pub budget: BudgetConfig,
}

/// The templates of one identity scope and the series their names have.
#[derive(Debug)]
pub(crate) struct Template {
    /// Every template budget of the scope (one per period part).
    pub rules: Vec<Rule>,
    /// The smallest `max_series` of the rules: the most names with series at once.
    pub bound: usize,
    /// Names with series.
    live: AtomicUsize,
    /// When the table was last swept for idle names, Unix seconds (see
    /// [`Template::sweep_due`]).
    swept: AtomicI64,
    /// Name → the slots of its templated series (the rules' periods that no explicit budget
    /// of the name covers; possibly none).
    shards: [RwLock<Shard>; SHARDS],
}

/// One shard of a template's names: name → the slots of its series.
type Shard = FxHashMap<Box<str>, Box<[u32]>>;

/// What a name has in a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// Its series' slots were added to the output.
    Found,
    /// No series yet (it gets them on its first charge or reservation).
    Missing,
}

impl Template {
    pub fn new(rules: Vec<Rule>) -> Template {
        let bound = rules
            .iter()
            .map(|r| r.budget.series_bound() as usize)
            .min()
            .unwrap_or(0);
        Template {
            rules,
            bound,
            live: AtomicUsize::new(0),
            swept: AtomicI64::new(i64::MIN),
            shards: std::array::from_fn(|_| RwLock::default()),
        }
    }

    fn shard(&self, name: &str) -> &RwLock<Shard> {
        let h = rustc_hash::FxBuildHasher.hash_one(name);
        // The high bits: Fx mixes its last word into them.
        &self.shards[(h >> 60) as usize & (SHARDS - 1)]
    }

    /// Adds the slots of `name`'s series to `out`.
    #[inline]
    pub fn lookup(&self, name: &str, mut out: impl FnMut(u32)) -> Lookup {
        let shard = self
            .shard(name)
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match shard.get(name) {
            Some(slots) => {
                slots.iter().for_each(|&s| out(s));
                Lookup::Found
            }
            None => Lookup::Missing,
        }
    }

    /// Whether `name` has its series.
    pub fn contains(&self, name: &str) -> bool {
        self.lookup(name, |_| {}) == Lookup::Found
    }

    /// Names with series.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Whether a full table may be swept for idle names at `now_secs`: at most once a
    /// second, so that a stream of new names against a full template costs one sweep a
    /// second, not one per name.
    pub fn sweep_due(&self, now_secs: i64) -> bool {
        let last = self.swept.load(Ordering::Relaxed);
        last < now_secs
            && self
                .swept
                .compare_exchange(last, now_secs, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether a new name would be refused: `bound` names have series.
    pub fn is_full(&self) -> bool {
        self.live() >= self.bound
    }

    /// Whether a name without series yet is refused by `filter`: the template is full, or an
    /// enforced rule has a zero limit (nothing may be spent, even before the first charge).
    pub fn refuses_new(&self) -> bool {
        self.is_full()
            || self.rules.iter().any(|r| {
                r.budget.limit == crate::model::money::Money::ZERO
                    && r.budget.mode == crate::model::budget::Mode::Enforce
            })
    }

    /// Records the series of `name` (the caller, `limiter::materialize`, serialises
    /// inserts and checked the bound). A name already present keeps its first slots.
    pub fn insert(&self, name: &str, slots: Box<[u32]>) {
        let mut shard = self
            .shard(name)
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !shard.contains_key(name) {
            shard.insert(name.into(), slots);
            self.live.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Removes the names `idle` says are idle (their series leave the table; their slots
    /// and stored totals stay, and a later use finds them again). Returns how many left.
    pub fn evict(&self, mut idle: impl FnMut(&[u32]) -> bool) -> usize {
        let mut gone = 0;
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(PoisonError::into_inner);
            let before = shard.len();
            shard.retain(|_, slots| !idle(slots));
            gone += before - shard.len();
        }
        self.live.fetch_sub(gone, Ordering::Relaxed);
        gone
    }

    /// Every (name, slots) with series, for `status` and the metrics' aggregates.
    pub fn each(&self, mut f: impl FnMut(&str, &[u32])) {
        for shard in &self.shards {
            let shard = shard.read().unwrap_or_else(PoisonError::into_inner);
            for (name, slots) in shard.iter() {
                f(name, slots);
            }
        }
    }
}

/// Why `name` cannot have a templated series, if it cannot: it must fit in the key layout
/// (module `key`), be at most [`MAX_TEMPLATED_NAME`] bytes and not be the template's own
/// name.
pub(crate) fn name_fault(name: &str) -> Option<String> {
    if name == crate::config::TEMPLATE_NAME {
        return Some(format!(
            "{:?} names the template itself",
            crate::config::TEMPLATE_NAME
        ));
    }
    if name.len() > MAX_TEMPLATED_NAME {
        return Some(format!(
            "it is {} bytes, at most {MAX_TEMPLATED_NAME}",
            name.len()
        ));
    }
    crate::model::key::scoped_name_fault(name)
}
