//! The series of templates, made on first use (module `template` for the table).
//!
//! A charge or a reservation naming an identity that its scope's template covers gives the
//! name its series before anything is counted: one per template period that no explicit
//! budget of the name defines (an explicit budget wins for its name and period: it *is* that
//! series, the same key). A series starts from what is stored for it (a name seen before, on
//! this node or, through replication, on another), takes two slots (budget and credit
//! series, as every budget does), and from then on is journaled, replicated and reported as
//! any budget is.
//!
//! Made under the reload lock: slots are pushed one writer at a time, and a reload cannot
//! install a config between a name's slots and their settings.
//!
//! Bounds: a template refuses a new name once `max_series` names have series (a clear error
//! and `provider_budgets_template_refused_total`), and every template of the process together
//! at most [`TEMPLATE_SLOTS`](crate::view::TEMPLATE_SLOTS) / 2 series since it started. Idle
//! names leave the table ([`Limiter::evict_idle_series`]); their slots stay (an index a racing
//! request holds stays valid) and are found again by key when the name comes back.

use std::sync::PoisonError;

use rustc_hash::FxHashMap;

use crate::limiter::reload::{apply_settings, StoredPair};
use crate::limiter::{template_refusal, Limiter};
use crate::model::budget::Scope;
use crate::model::identity::Identity;
use crate::model::key::BudgetKey;
use crate::resolve::Resolver;
use crate::template::{name_fault, Template};

impl Limiter {
    /// Gives each name of `identity` that a template covers its series, if it has none yet.
    ///
    /// # Errors
    ///
    /// Why a template refuses a name (full, zero limit, a name that cannot be a series), in
    /// one line. Names before it may have been given their series.
    pub(crate) fn materialize(
        &self,
        resolver: &Resolver,
        identity: &Identity<'_>,
    ) -> Result<(), String> {
        for (scope, name) in identity.iter() {
            let Some(t) = resolver.template(scope) else {
                continue;
            };
            if t.contains(name) {
                continue;
            }
            if let Some(why) = name_fault(name) {
                refused(scope);
                return Err(format!(
                    "{scope} {name:?} cannot have a templated budget: {why}"
                ));
            }
            self.add_templated(resolver, t, scope, name, &mut |_| None)?;
        }
        Ok(())
    }

    /// Makes the series of `name` in template `t` (of `scope`), serialised with reloads.
    /// `known(key)`: what the store holds for a series when the caller read it already
    /// (`None`: read it now).
    fn add_templated(
        &self,
        resolver: &Resolver,
        t: &Template,
        scope: Scope,
        name: &str,
        known: &mut dyn FnMut(&BudgetKey) -> Option<StoredPair>,
    ) -> Result<(), String> {
        let _serial = self
            .inner
            .reload_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if t.contains(name) {
            return Ok(()); // made by a racing call
        }
        if t.is_full() {
            let now = crate::model::clock::floor_secs(self.inner.clock.now());
            if t.sweep_due(now) {
                let view = &self.inner.view;
                t.evict(|slots| slots.iter().all(|&b| view.is_idle(b, now)));
            }
        }
        if t.is_full() {
            refused(scope);
            return Err(template_refusal(t, scope, name));
        }
        let view = &self.inner.view;
        if view.len() + 2 * t.rules.len() > view.capacity() {
            refused(scope);
            return Err(format!(
                "{scope} {name:?}: this process made its most templated series ({}) since it \
                 started; a restart frees the slots of idle names",
                crate::view::TEMPLATE_SLOTS / 2
            ));
        }
        let config = self.inner.config.load();
        let redis = config.redis.is_some();
        let parts = self.reload_parts();
        let explicit = resolver.slots(scope, name);
        let mut slots = Vec::with_capacity(t.rules.len());
        for rule in &t.rules {
            let b = rule.budget.instance(name);
            let slot = match self.inner.keys.position(&b.budget_key()) {
                // An explicit budget of the name with this period: it is the series.
                Some(s) if explicit.contains(&s) => continue,
                // Made before (an earlier use, before a reload or an eviction; or a removed
                // explicit budget): the same series, its spend kept.
                Some(s) => s,
                None => {
                    let stored = known(&b.budget_key());
                    parts
                        .add_templated_series(&config, &b, stored)
                        .map_err(|e| format!("{scope} {name:?}: {e}"))?
                }
            };
            apply_settings(parts.view, slot, &b, redis);
            slots.push(slot);
        }
        t.insert(name, slots.into_boxed_slice());
        metrics::counter!("provider_budgets_template_series_made_total", "scope" => scope.as_str())
            .increment(1);
        Ok(())
    }

    /// Gives their series again, at open, to the templated names that have a live window
    /// stored (own or others' spend): a restart resumes them; names idle since their last
    /// window do not come back until used. A name a template refuses now (a smaller
    /// `max_series`) is logged and left on disk.
    pub(crate) fn restore_templated(&self) -> Result<(), crate::error::Error> {
        let resolver = self.inner.resolver.load();
        if !resolver.has_templates() {
            return Ok(());
        }
        let now = crate::model::clock::floor_secs(self.inner.clock.now());
        // One pass over the store, grouped by series: a hundred thousand series must not cost
        // a hundred thousand reads.
        let mut stored: FxHashMap<(String, String), StoredPair> = FxHashMap::default();
        let mut names = std::collections::BTreeSet::new();
        let own = self.inner.store.load_own()?.into_iter();
        let own = own.map(|(k, v)| (k, v.end, v.total, 0));
        let peers = self.inner.store.load_peers()?.into_iter();
        for (key, end, total, others) in own.chain(peers.map(|(k, v)| (k, v.end, 0, v.others))) {
            let (period, credit) = match key.period.strip_suffix(crate::model::key::CREDIT) {
                Some(p) => (p, true),
                None => (key.period.as_str(), false),
            };
            let Some((scope, name)) = templated_name(&resolver, &key.provider, period) else {
                continue;
            };
            let window = crate::durable::store::window_of(&key, end);
            let entry = stored
                .entry((key.provider.clone(), period.to_owned()))
                .or_default();
            let series = if credit { &mut entry.1 } else { &mut entry.0 };
            series.push((window, total, others));
            if end > now && !credit {
                names.insert((scope, name));
            }
        }
        let mut known =
            |key: &BudgetKey| Some(stored.remove(&key.store_parts()).unwrap_or_default());
        let mut refused = 0usize;
        for (scope, name) in &names {
            let Some(t) = resolver.template(*scope) else {
                continue;
            };
            if let Err(why) = self.add_templated(&resolver, t, *scope, name, &mut known) {
                refused += 1;
                if refused == 1 {
                    tracing::warn!("templated series not restored: {why}");
                }
            }
        }
        if refused > 1 {
            tracing::warn!("{refused} templated series not restored (see the first above)");
        }
        Ok(())
    }

    /// Carries the names with series from the resolver in force into `next` (a reload's,
    /// not yet installed; the caller holds the reload lock): a name whose every series under
    /// `next`'s templates exists keeps them, with `next`'s settings. So a reload (or a runtime
    /// budget change) changes every live series at once, status keeps listing them, and a
    /// spent name is refused by `filter` without waiting for its next charge. A name that a
    /// new template period would give a new series is left out: its next use makes them all.
    pub(crate) fn carry_templates(&self, next: &Resolver, redis: bool) {
        let current = self.inner.resolver.load();
        let (keys, view) = (&self.inner.keys, &self.inner.view);
        for scope in Scope::IDENTITY {
            let (Some(from), Some(to)) = (current.template(scope), next.template(scope)) else {
                continue;
            };
            let explicit = |name: &str| next.slots(scope, name);
            from.each(|name, _| {
                if to.is_full() {
                    return;
                }
                let mut slots = Vec::with_capacity(to.rules.len());
                for rule in &to.rules {
                    let b = rule.budget.instance(name);
                    match keys.position(&b.budget_key()) {
                        Some(s) if explicit(name).contains(&s) => {}
                        Some(s) => {
                            apply_settings(view, s, &b, redis);
                            slots.push(s);
                        }
                        None => return, // a new period: made on the name's next use
                    }
                }
                to.insert(name, slots.into_boxed_slice());
            });
        }
    }

    /// Removes from the templates' tables the names whose every series is idle: no live
    /// window at `now_secs` (the windows ended and nothing was spent since) and nothing held
    /// by a reservation. They no longer count toward `max_series`; their slots and stored
    /// totals stay, and a later use of the name finds them again. Returns how many left.
    pub fn evict_idle_series(&self) -> usize {
        let now = crate::model::clock::floor_secs(self.inner.clock.now());
        let resolver = self.inner.resolver.load();
        let view = &self.inner.view;
        Scope::IDENTITY
            .iter()
            .filter_map(|&s| resolver.template(s))
            .map(|t| t.evict(|slots| slots.iter().all(|&b| view.is_idle(b, now))))
            .sum()
    }
}

/// The (scope, name) of a stored series (key name, period part) that a template of
/// `resolver` covers: the key name is `scope:name` (module `key`) and the period part one of
/// the template's (credit series and other periods are not its).
fn templated_name(resolver: &Resolver, key_name: &str, period: &str) -> Option<(Scope, String)> {
    Scope::IDENTITY.iter().find_map(|&scope| {
        let t = resolver.template(scope)?;
        let name = key_name.strip_prefix(scope.as_str())?.strip_prefix(':')?;
        t.rules
            .iter()
            .any(|r| r.budget.budget_key().period_part == period)
            .then(|| (scope, name.to_owned()))
    })
}

/// Counts a name refused by a template.
fn refused(scope: Scope) {
    metrics::counter!("provider_budgets_template_refused_total", "scope" => scope.as_str())
        .increment(1);
}
