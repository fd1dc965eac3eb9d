//! [`Limiter::reload`]: a new configuration for a running limiter, without a restart.
//!
//! Budgets live in **slots**: an index into the view, the journal's and the replicator's key
//! table. Slots are only ever added while the limiter runs, never removed or renumbered, so an
//! index held by a racing `record` or `filter` stays valid. A reload:
//!
//! * keeps the slot of every budget whose series (key name, period part: see the module
//!   `budget`) is unchanged and stores its new limit, mode, soft limits and window shape in place: the next
//!   `filter` sees them;
//! * adds a slot for a new budget, or for a changed period (the period is part of the storage
//!   and Redis keys, so it is a new series starting at its stored total, zero when new), or
//!   takes back the slot of a budget that was removed earlier (its spend is still there);
//! * swaps the (scope, name) → slots table: a removed budget no longer applies; its slot keeps
//!   its spend (journaled, replicated, stored until retention ends);
//! * validates everything first: an invalid config, or a change of what only a restart can
//!   apply (storage, Redis, node id, window anchor), is refused and the old config keeps
//!   running.
//!
//! The configuration given (the base) is applied with the runtime budgets merged in (module
//! `runtime`); a runtime budget change applies through the same steps.
//!
//! Records that race with a reload land in the slot their provider resolved to when they were
//! made: spend is never dropped. `Prepared` lists notice a reload (a generation counter) and
//! resolve again on their next call.

use std::sync::PoisonError;

use arc_swap::ArcSwap;

use crate::config::{BudgetConfig, Config};
use crate::durable::journal::{Event, Journal};
use crate::durable::store::{window_of, Store};
use crate::error::Error;
use crate::limiter::Limiter;
use crate::model::budget::{Mode, Scope, WindowShape};
use crate::model::money::Money;
use crate::model::slots::SlotKeys;
use crate::model::window::Window;
use crate::view::View;

/// The limiter state a reload changes (lent by `Limiter::reload_parts`).
#[derive(Debug)]
pub(crate) struct Parts<'a> {
    pub config: &'a ArcSwap<Config>,
    pub keys: &'a SlotKeys,
    pub view: &'a View,
    pub store: &'a Store,
    pub journal: &'a Journal,
}

/// What the store holds for a budget series that gets a new slot: (window, own, others).
pub(crate) type Stored = Vec<(Window, u64, u64)>;

/// Per new series: what is stored for it and for its credit series.
pub(crate) type StoredPair = (Stored, Stored);

impl Parts<'_> {
    /// The slot of each budget of `config` (`None`: a new series), and what the new series
    /// already have on disk, read before anything changes. Refused when the new series would
    /// not fit in the slots one process can add.
    fn plan(
        &self,
        config: &Config,
    ) -> Result<(Vec<Option<u32>>, std::vec::IntoIter<StoredPair>), Error> {
        let slots: Vec<Option<u32>> = config
            .budgets
            .iter()
            .map(|b| self.keys.position(&b.budget_key()))
            .collect();
        let new_slots = slots.iter().filter(|s| s.is_none()).count();
        // Two slots per series: the budget and its credit series.
        let (used, room) = self.view.reload_room();
        if used + 2 * new_slots > room || self.view.len() + 2 * new_slots > self.view.capacity() {
            return Err(Error::Reload(format!(
                "{new_slots} new budget series would exceed the {} that one process can add; restart to apply",
                crate::view::RELOAD_SLOTS
            )));
        }
        let new_series: Vec<&BudgetConfig> = config
            .budgets
            .iter()
            .zip(&slots)
            .filter(|(_, s)| s.is_none())
            .map(|(b, _)| b)
            .collect();
        Ok((slots, self.stored(&new_series)?.into_iter()))
    }

    /// The stored totals of each series in `series` and of its credit series (a budget
    /// removed before this process started, or a period used before, still has its spend and
    /// credits on disk: a new slot resumes them).
    fn stored(&self, series: &[&BudgetConfig]) -> Result<Vec<StoredPair>, Error> {
        let n = series.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut out: Vec<Stored> = vec![Vec::new(); 2 * n];
        let keys = series.iter().map(|b| b.budget_key());
        let parts: Vec<(String, String)> = keys
            .clone()
            .chain(keys.map(|k| k.credit()))
            .map(|k| k.store_parts())
            .collect();
        let index =
            |name: &str, period: &str| parts.iter().position(|(n, p)| n == name && p == period);
        for (key, value) in self.store.load_own()? {
            if let Some(i) = index(&key.provider, &key.period) {
                out[i].push((window_of(&key, value.end), value.total, 0));
            }
        }
        for (key, value) in self.store.load_peers()? {
            if let Some(i) = index(&key.provider, &key.period) {
                // The peers cache holds the others' total per window (this node excluded).
                out[i].push((window_of(&key, value.end), 0, value.others));
            }
        }
        let credits = out.split_off(n);
        Ok(out.into_iter().zip(credits).collect())
    }
}

/// What a reload from `old` to `new` adds, changes (limit, soft limits, mode, enforcement,
/// offline policy) and removes, by budget series (a hash lookup each: a config may hold
/// thousands of budgets, and every runtime budget change applies through here).
fn summarize(old: &Config, new: &Config) -> ReloadSummary {
    let mut summary = ReloadSummary {
        budgets: new.budgets.len(),
        ..ReloadSummary::default()
    };
    let before: rustc_hash::FxHashMap<(String, String), &BudgetConfig> =
        old.budgets.iter().map(|o| (o.key_parts(), o)).collect();
    let after: rustc_hash::FxHashSet<(String, String)> =
        new.budgets.iter().map(BudgetConfig::key_parts).collect();
    for b in &new.budgets {
        match before.get(&b.key_parts()) {
            Some(o) => {
                if (o.limit, &o.soft_limits, o.mode, o.enforcement, o.offline)
                    != (b.limit, &b.soft_limits, b.mode, b.enforcement, b.offline)
                    || o.window != b.window
                {
                    summary.changed.push(summary_name(b));
                }
            }
            None => summary.added.push(summary_name(b)),
        }
    }
    for o in &old.budgets {
        if !after.contains(&o.key_parts()) {
            summary.removed.push(summary_name(o));
        }
    }
    summary
}

/// How a reload summary names a budget: the provider for provider budgets (as before scopes),
/// the key name otherwise (`tag:team-a`).
fn summary_name(b: &BudgetConfig) -> String {
    b.key_parts().0
}

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadSummary {
    /// Budgets in force after the reload.
    pub budgets: usize,
    /// Budgets that are new (or have a new period or own zone): the provider name for
    /// provider budgets, `scope:name` for the others (`tag:team-a`).
    pub added: Vec<String>,
    /// Budgets whose limit, soft limits, mode, enforcement or window shape changed (same
    /// series), named as `added`.
    pub changed: Vec<String>,
    /// Budgets removed (or replaced by one with a new period), named as `added`.
    pub removed: Vec<String>,
}

impl Parts<'_> {
    /// Adds the slots of a new budget series and of its credit series, each starting from its
    /// stored totals (view, journal, keys), and links them. Returns the budget's slot.
    fn add_series(
        &self,
        config: &Config,
        b: &BudgetConfig,
        (totals, credits): StoredPair,
    ) -> Result<u32, Error> {
        self.add_pair(config, b, (totals, credits), false)
    }

    /// [`Parts::add_series`] for a template's series of one name (`b`: the template's
    /// instance), from what the store holds for it (read by key prefix: a template may have
    /// a hundred thousand series, and each first use reads only its own).
    /// `known`: what the store holds for it when the caller read it already (open).
    pub(crate) fn add_templated_series(
        &self,
        config: &Config,
        b: &BudgetConfig,
        known: Option<StoredPair>,
    ) -> Result<u32, Error> {
        let stored = match known {
            Some(pair) => pair,
            None => {
                let key = b.budget_key();
                (
                    self.stored_series(&key.store_parts())?,
                    self.stored_series(&key.credit().store_parts())?,
                )
            }
        };
        self.add_pair(config, b, stored, true)
    }

    /// What the store holds for one series (key name, period part).
    fn stored_series(&self, (name, period): &(String, String)) -> Result<Stored, Error> {
        let mut out: Stored = Vec::new();
        for (key, value) in self.store.load_own_series(name, period)? {
            out.push((window_of(&key, value.end), value.total, 0));
        }
        for (key, value) in self.store.load_peers_series(name, period)? {
            out.push((window_of(&key, value.end), 0, value.others));
        }
        Ok(out)
    }

    /// Adds the slots of a budget series and of its credit series and links them; template
    /// series take the template room of the view, not the reloads'.
    fn add_pair(
        &self,
        config: &Config,
        b: &BudgetConfig,
        (totals, credits): StoredPair,
        templated: bool,
    ) -> Result<u32, Error> {
        let schedule = config.budget_schedule(b);
        let s = self.add_slot(schedule.clone(), b.limit, b.budget_key(), totals, templated)?;
        let c = self.add_slot(
            schedule,
            Money::MAX,
            b.budget_key().credit(),
            credits,
            templated,
        )?;
        self.view.link_credit(s, c);
        Ok(s)
    }

    /// Adds one slot (view, key), starting from its stored `totals`. Returns the slot.
    fn add_slot(
        &self,
        schedule: crate::model::window::Schedule,
        limit: Money,
        key: crate::model::key::BudgetKey,
        totals: Stored,
        templated: bool,
    ) -> Result<u32, Error> {
        let pushed = if templated {
            self.view.push_templated(schedule, limit)
        } else {
            self.view.push(schedule, limit)
        };
        let s = pushed.ok_or_else(|| Error::Reload("no budget slot left".into()))?;
        self.keys.push(key);
        self.view.raise_own_many(
            totals
                .iter()
                .filter(|t| t.1 > 0)
                .map(|&(w, own, _)| (s, w, Money::from_nanos(own))),
        );
        self.view.raise_others_many(
            totals
                .iter()
                .filter(|t| t.2 > 0)
                .map(|&(w, _, others)| (s, w, Money::from_nanos(others))),
        );
        // The journal writes absolute totals: it must start from the stored ones.
        for &(window, total, _) in totals.iter().filter(|t| t.1 > 0) {
            let _ = self.journal.send(Event::Adopt {
                budget: s,
                window,
                total,
                urgent: false,
            });
        }
        Ok(s)
    }
}

/// Stores a budget's limit, mode, soft limits and policy in its slot (in place: the next
/// `filter` sees them).
pub(crate) fn apply_settings(view: &View, slot: u32, b: &BudgetConfig, redis: bool) {
    view.set_limit(slot, b.limit);
    view.set_shadow(slot, b.mode == Mode::Shadow);
    view.set_soft_limits(slot, b.soft_limits.clone());
    view.set_sliding(slot, b.window == WindowShape::Sliding);
    // Live: the replicator reads the policy every round (a budget turned strict asks for its
    // first grant then; one turned shared stops asking, its grant in Redis lapses with the
    // window).
    crate::limiter::set_policy(view, slot, b, redis);
}

/// Refuses a config that changes what only a restart can apply.
fn check_fixed(config: &Config, old: &Config) -> Result<(), Error> {
    let fixed = [
        ("storage", config.storage != old.storage),
        ("redis", config.redis != old.redis),
        ("node_id", config.node_id != old.node_id),
        ("window_anchor", config.window_anchor != old.window_anchor),
        ("time_zone", config.time_zone != old.time_zone),
    ];
    match fixed.iter().find(|(_, changed)| *changed) {
        Some((what, _)) => Err(Error::Reload(format!(
            "`{what}` changed; it applies only at a restart (nothing was changed)"
        ))),
        None => Ok(()),
    }
}

impl Limiter {
    /// Applies a new configuration to the running limiter: changed limits apply at once, new
    /// budgets (and budgets with a changed period: a new series) start from what is stored
    /// for them (zero when new), removed budgets stop filtering, and recorded spend is never
    /// lost. `unknown_provider` and `model_providers` change too. The runtime budgets
    /// ([`Limiter::put_budget`]) are kept: merged into `config`, which shadows those whose
    /// series it defines. Reloads are serialised.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `config` is invalid, and [`Error::Reload`] when it changes what
    /// only a restart can apply (`storage`, `redis`, `node_id`, `window_anchor`, `time_zone`; `storage.dir`
    /// may be left out, then the running one is kept) or needs more new budget slots than are
    /// left ([`RELOAD_SLOTS`](crate::view::RELOAD_SLOTS) series per process), or when
    /// `pricing`'s catalog cannot be loaded or has fewer than half the entries of the running
    /// one (a truncated file). The price catalog is reloaded with the config (module
    /// `pricing`). Nothing changes on error.
    pub fn reload(&self, mut config: Config) -> Result<ReloadSummary, Error> {
        config.validate()?;
        let _serial = self
            .inner
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let old = self.inner.base.load_full();
        if config.storage.dir.is_none() {
            config.storage.dir.clone_from(&old.storage.dir);
        }
        check_fixed(&config, &old)?;
        // The new catalog first: one that cannot be loaded, or shrank by more than half,
        // refuses the reload before anything changed.
        let catalog = self.inner.prices.prepare(&config.pricing)?;
        let summary = self.apply_locked(config)?;
        self.inner.prices.install(catalog);
        tracing::info!(
            target: "provider_budgets::lifecycle",
            budgets = summary.budgets,
            added = ?summary.added,
            changed = ?summary.changed,
            removed = ?summary.removed,
            "config reloaded"
        );
        Ok(summary)
    }

    /// Applies `base` with the runtime budgets merged in ([`Limiter::effective`]); the caller
    /// holds the reload lock.
    pub(crate) fn apply_locked(&self, base: Config) -> Result<ReloadSummary, Error> {
        let config = self.effective(&base);
        let parts = self.reload_parts();
        let (mut slots, mut stored) = parts.plan(&config)?;
        let summary = summarize(&parts.config.load(), &config);
        // Apply: new slots first (view with their stored totals, journal, keys), then limits,
        // then the provider table, so that no record reaches a slot before its totals.
        for (b, slot) in config.budgets.iter().zip(slots.iter_mut()) {
            let s = match *slot {
                Some(s) => s,
                None => {
                    let s = parts.add_series(&config, b, stored.next().unwrap_or_default())?;
                    *slot = Some(s);
                    s
                }
            };
            apply_settings(parts.view, s, b, config.redis.is_some());
        }
        let table: Vec<(Scope, String, u32)> = config
            .budgets
            .iter()
            .zip(&slots)
            .filter_map(|(b, s)| s.map(|s| (b.scope, b.name.clone(), s)))
            .collect();
        self.install(base, config, table);
        Ok(summary)
    }
}
