//! Runtime budgets: budgets defined while the limiter runs ([`Limiter::put_budget`],
//! [`Limiter::delete_budget`]), kept durably in the data dir and replicated to every node
//! through Redis (modules `durable::definitions`, `replicate::definitions`).
//!
//! Every configuration the limiter applies is the base configuration (the file, or what the
//! embedder opened or reloaded with) with the runtime budgets merged in, base first
//! (`config::runtime::merge`): a runtime budget whose series the base defines is shadowed by
//! it (one warning), so the file stays the source of truth for what it names, and a put or
//! delete of such a series is refused ([`BudgetError::DefinedByConfig`]). Applying goes
//! through the reload machinery: a new series gets a slot (starting from what is stored for
//! it), a changed one is changed in place, a deleted one stops applying and keeps its spend,
//! and putting it back resumes the same series.
//!
//! Bounds: a series added after the start takes two of the slots one process can add (see
//! [`RELOAD_SLOTS`](crate::view::RELOAD_SLOTS)); a put beyond them is refused
//! ([`BudgetError::NoRoom`]), and a definition received from another node beyond them waits
//! for the next start (one warning). A definition this node cannot read (a scope or field of
//! a later version, a time zone its database lacks) is kept, never applied, and warned about
//! once.

use std::sync::{Arc, PoisonError};

use crate::config::runtime::{merge, Definition};
use crate::config::{BudgetConfig, Config, ConfigError};
use crate::durable::definitions::{Definitions, Record};
use crate::durable::store::StoreError;
use crate::error::Error;
use crate::limiter::Limiter;
use crate::model::budget::{Enforcement, Scope};
use crate::model::clock::floor_secs;
use crate::model::key::BudgetKey;
use crate::model::unit::Unit;

/// A runtime budget as this node holds it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RuntimeBudget {
    /// The budget.
    pub budget: BudgetConfig,
    /// The period part of its series (`1d`, `1d@Europe/Berlin`).
    pub period_key: String,
    /// The Lamport version of its last change.
    pub version: u64,
    /// The node that made that change.
    pub node: String,
    /// The base configuration (the file) defines its series: the file's budget applies.
    pub shadowed: bool,
}

/// What a put or a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetChange {
    /// The budget's scope.
    pub scope: Scope,
    /// Its name.
    pub name: String,
    /// The period part of its series (`1d`, `1d@Europe/Berlin`).
    pub period_key: String,
    /// The Lamport version of the change (the largest version this node had seen + 1).
    pub version: u64,
    /// This node's id.
    pub node: String,
    /// A delete.
    pub deleted: bool,
    /// The change reached Redis (written, or refused by a newer change, which then applies
    /// here too). `false` without Redis, or when Redis could not be reached within the
    /// timeouts: the change applies here and is sent at the next round that reaches Redis.
    pub replicated: bool,
}

/// Why a runtime budget was not put or deleted. Nothing changed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    /// A field is invalid (names the budget and the field).
    #[error("{}", .0.to_string().strip_prefix("config: ").unwrap_or(&.0.to_string()))]
    Invalid(ConfigError),
    /// The base configuration (the config file) defines this budget's series.
    #[error("{budget} is defined by the config file; change it there (the file stays the source of truth for what it names)")]
    DefinedByConfig {
        /// The budget, e.g. `tag "team-a" (1d)`.
        budget: String,
    },
    /// No runtime budget of that scope, name (and period).
    #[error("no runtime budget {budget}")]
    NotFound {
        /// What was asked for.
        budget: String,
    },
    /// Several runtime budgets of that scope and name: the period must be given.
    #[error("{budget} has runtime budgets for several periods ({}): give the period", .periods.join(", "))]
    Ambiguous {
        /// The scope and name.
        budget: String,
        /// Their period parts.
        periods: Vec<String>,
    },
    /// The process cannot add another budget series.
    #[error("no room for {budget}: one process adds at most {bound} budget series after it started (runtime budgets and reloads together); restart it to apply more")]
    NoRoom {
        /// The budget.
        budget: String,
        /// The bound ([`RELOAD_SLOTS`](crate::view::RELOAD_SLOTS)).
        bound: usize,
    },
    /// The definition could not be stored (a full disk, a failed fsync).
    #[error("runtime budget not stored: {0}")]
    Storage(#[from] StoreError),
    /// Stored, but applying it failed (the error says why); it applies at the next change or
    /// start.
    #[error("runtime budget stored, but not applied: {0}")]
    Apply(Error),
    /// The limiter is shut down.
    #[error("the limiter is shut down")]
    Closed,
}

impl Limiter {
    /// The base configuration: what the limiter was opened or last reloaded with, without
    /// the runtime budgets ([`Limiter::config`] has them merged in).
    pub fn base_config(&self) -> Arc<Config> {
        self.inner.base.load_full()
    }

    /// Creates or changes the runtime budget of `budget`'s series (scope, name, period and
    /// own zone): durable in the data dir, applied at once, and sent to Redis (with Redis
    /// configured) before it returns. A put equal to the budget in force changes nothing (it
    /// is sent again if it had not reached Redis).
    ///
    /// # Errors
    ///
    /// [`BudgetError`]: an invalid field, a series the base configuration defines, no room
    /// for another series, a storage fault: nothing changed then. [`BudgetError::Apply`]:
    /// stored and sent, not applied here.
    pub fn put_budget(&self, budget: BudgetConfig) -> Result<BudgetChange, BudgetError> {
        budget.validate().map_err(BudgetError::Invalid)?;
        // As `Config::validate` for the file's budgets: a strict concurrent budget's dead
        // nodes give their slots back only by the grant lease.
        let base = self.inner.base.load();
        if budget.unit == Unit::Concurrent
            && budget.enforcement == Enforcement::Strict
            && base.redis.as_ref().is_some_and(|r| r.grant_lease.is_none())
        {
            return Err(BudgetError::Invalid(ConfigError::Invalid {
                key: "provider_budgets.redis.grant_lease",
                message: format!(
                    "required by the strict concurrent budget {}: a dead node's slots come back only when its grant is reclaimed (e.g. 3 sync intervals plus connect_timeout and command_timeout: 7s with the defaults)",
                    budget.label()
                ),
            }));
        }
        let key = budget.budget_key();
        let definition = Definition::of(&budget);
        self.change(&key, |current| {
            let same = current
                .is_some_and(|r| !r.deleted && r.definition().ok().as_ref() == Some(&definition));
            if same {
                return Ok(None);
            }
            let (used, room) = self.inner.view.reload_room();
            if self.inner.keys.position(&key).is_none() && used + 2 > room {
                return Err(BudgetError::NoRoom {
                    budget: budget.label(),
                    bound: crate::view::RELOAD_SLOTS,
                });
            }
            Ok(Some((
                false,
                serde_json::to_value(&definition).unwrap_or_default(),
            )))
        })
    }

    /// Deletes the runtime budget of `scope` `name`; `period` (the period, `1d`, or the
    /// period part, `1d@Europe/Berlin`, which wins when it is exact) is needed when it has
    /// several. Its spend is kept:
    /// putting it back resumes the same series.
    ///
    /// # Errors
    ///
    /// [`BudgetError::NotFound`], [`BudgetError::Ambiguous`], [`BudgetError::DefinedByConfig`]
    /// (the base configuration defines it), [`BudgetError::Storage`].
    pub fn delete_budget(
        &self,
        scope: Scope,
        name: &str,
        period: Option<&str>,
    ) -> Result<BudgetChange, BudgetError> {
        let asked = match period {
            Some(p) => format!("{scope} {name:?} ({p})"),
            None => format!("{scope} {name:?}"),
        };
        let matches = |k: &BudgetKey| {
            k.scope == scope
                && k.name == name
                && period.is_none_or(|p| {
                    let shown = k.period_shown();
                    k.period_part == p || shown == p || shown.split('@').next() == Some(p)
                })
        };
        let mut live: Vec<(BudgetKey, Record)> = self
            .runtime_records()
            .into_iter()
            .filter(|(k, r)| !r.deleted && matches(k))
            .collect();
        // A period part given exactly names one series, even when the period alone names more.
        let exact = |k: &BudgetKey| Some(k.period_part.as_str()) == period;
        if live.len() > 1 && live.iter().any(|(k, _)| exact(k)) {
            live.retain(|(k, _)| exact(k));
        }
        let key = match live.as_slice() {
            [(k, _)] => k.clone(),
            [] => {
                let base = self.base_config();
                return Err(
                    match base.budgets.iter().find(|b| matches(&b.budget_key())) {
                        Some(b) => BudgetError::DefinedByConfig { budget: b.label() },
                        None => BudgetError::NotFound { budget: asked },
                    },
                );
            }
            several => {
                return Err(BudgetError::Ambiguous {
                    budget: format!("{scope} {name:?}"),
                    periods: several.iter().map(|(k, _)| k.period_part.clone()).collect(),
                })
            }
        };
        self.change(
            &key,
            |current| Ok(current.map(|r| (true, r.budget.clone()))),
        )
    }

    /// The runtime budgets this node holds (deleted ones are gone; those it cannot read are
    /// left out), in series order.
    pub fn runtime_budgets(&self) -> Vec<RuntimeBudget> {
        let base = self.base_config();
        let defined: rustc_hash::FxHashSet<BudgetKey> =
            base.budgets.iter().map(BudgetConfig::budget_key).collect();
        let mut out: Vec<RuntimeBudget> = self
            .inner
            .definitions
            .records()
            .into_iter()
            .filter(|(_, r)| !r.deleted)
            .filter_map(|(_, r)| {
                let budget = r.definition().ok()?.budget().ok()?;
                let key = budget.budget_key();
                Some(RuntimeBudget {
                    shadowed: defined.contains(&key),
                    period_key: key.period_part,
                    budget,
                    version: r.version,
                    node: r.node,
                })
            })
            .collect();
        out.sort_by_cached_key(|r| r.budget.budget_key());
        out
    }

    /// Every record this node can key (its budget readable), with its key.
    fn runtime_records(&self) -> Vec<(BudgetKey, Record)> {
        self.inner
            .definitions
            .records()
            .into_iter()
            .filter_map(|(_, r)| {
                let key = r.definition().ok()?.budget().ok()?.budget_key();
                Some((key, r))
            })
            .collect()
    }

    /// One change of `key`'s record, serialised with reloads: refused when the base defines
    /// the series; `decide` gets the current record and returns the new one's (deleted,
    /// budget JSON), or `None` to keep it. The new record is stored (fsync) and applied,
    /// then sent to Redis.
    fn change(
        &self,
        key: &BudgetKey,
        decide: impl FnOnce(Option<&Record>) -> Result<Option<(bool, serde_json::Value)>, BudgetError>,
    ) -> Result<BudgetChange, BudgetError> {
        if self.inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BudgetError::Closed);
        }
        // The version must count what Redis held when this process started.
        self.inner.runtime_link.first_round();
        let field = key.definition_field();
        let mut applied = Ok(());
        let record = {
            let _serial = self
                .inner
                .reload_lock
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let base = self.base_config();
            if let Some(b) = base.budgets.iter().find(|b| b.budget_key() == *key) {
                return Err(BudgetError::DefinedByConfig { budget: b.label() });
            }
            let current = self.inner.definitions.get(&field);
            match decide(current.as_ref())? {
                None => current.ok_or_else(|| BudgetError::NotFound {
                    budget: field.clone(),
                })?,
                Some((deleted, budget)) => {
                    let node = self.inner.node_id.clone();
                    let at = floor_secs(self.now());
                    let record =
                        self.inner
                            .definitions
                            .write(&self.inner.store, &field, |version| Record {
                                version,
                                node,
                                deleted,
                                at,
                                budget,
                            })?;
                    applied = self.apply_locked((*base).clone()).map(drop);
                    tracing::info!(budget = %field, version = record.version, deleted, "runtime budget changed");
                    record
                }
            }
        };
        // Stored: it goes to the fleet even when this node could not apply it.
        let replicated = self.inner.runtime_link.push(&field);
        applied.map_err(BudgetError::Apply)?;
        Ok(BudgetChange {
            scope: key.scope,
            name: key.name.clone(),
            period_key: key.period_part.clone(),
            version: record.version,
            node: record.node,
            deleted: record.deleted,
            replicated,
        })
    }

    /// Applies the runtime definitions as they are now (a change taken from Redis).
    pub(crate) fn apply_runtime(&self) {
        let _serial = self
            .inner
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let base = self.base_config();
        match self.apply_locked((*base).clone()) {
            Ok(s) => tracing::info!(
                budgets = s.budgets,
                added = ?s.added,
                changed = ?s.changed,
                removed = ?s.removed,
                "runtime budgets applied"
            ),
            Err(e) => tracing::error!(error = %e, "runtime budgets not applied"),
        }
    }

    /// `base` with the runtime budgets merged in: those this node can read, and of those
    /// that need a new series only as many as there are slots left (after the base's own
    /// new series).
    pub(crate) fn effective(&self, base: &Config) -> Config {
        let keys = &self.inner.keys;
        let view = &self.inner.view;
        let base_new = base
            .budgets
            .iter()
            .filter(|b| keys.position(&b.budget_key()).is_none())
            .count();
        let (used, room) = view.reload_room();
        let mut room = room.saturating_sub(used) / 2;
        room = room.saturating_sub(base_new);
        runtime_config(
            base,
            &self.inner.definitions,
            &self.inner.notes,
            |key, defined| {
                if defined || keys.position(key).is_some() {
                    return true;
                }
                let fits = room > 0;
                room = room.saturating_sub(1);
                fits
            },
        )
    }
}

/// Warnings about runtime budgets, each logged once per process.
pub(crate) type Notes = std::sync::Mutex<rustc_hash::FxHashSet<String>>;

fn note(notes: &Notes, what: String, log: impl FnOnce()) {
    if notes
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(what)
    {
        log();
    }
}

/// `base` with the readable runtime budgets of `table` merged in; `fits(key, defined by the
/// base)` decides whether one that needs a new series can have it.
pub(crate) fn runtime_config(
    base: &Config,
    table: &Definitions,
    notes: &Notes,
    mut fits: impl FnMut(&BudgetKey, bool) -> bool,
) -> Config {
    let defined: rustc_hash::FxHashSet<BudgetKey> =
        base.budgets.iter().map(BudgetConfig::budget_key).collect();
    let mut runtime = Vec::new();
    for (field, r) in table.records() {
        if r.deleted {
            continue;
        }
        let budget = match r
            .definition()
            .and_then(|d| d.budget().map_err(|e| e.to_string()))
        {
            Ok(b) => b,
            Err(why) => {
                note(notes, format!("unreadable {field} {}", r.version), || {
                    tracing::warn!(budget = %field, version = r.version, problem = %why, "runtime budget not applied: this version cannot read it");
                });
                continue;
            }
        };
        let key = budget.budget_key();
        if !fits(&key, defined.contains(&key)) {
            note(notes, format!("no room {field}"), || {
                tracing::warn!(budget = %field, bound = crate::view::RELOAD_SLOTS, "runtime budget not applied: no budget series left in this process; it applies at the next start");
            });
            continue;
        }
        runtime.push(budget);
    }
    let merged = merge(base, runtime);
    for label in merged.shadowed {
        note(notes, format!("shadowed {label}"), || {
            tracing::warn!(budget = %label, "runtime budget shadowed: the config file defines its series, and the file's budget applies");
        });
    }
    merged.config
}
