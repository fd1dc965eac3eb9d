//! The request-path filter: which deployments may still be used.
//!
//! One clock read per call; per deployment one cached resolution (a hash lookup of its
//! (model, id)) and, per distinct budget that may be spent, one read of its current window.
//! A per-call bitmask ([`Memo`], first 128 budgets) remembers each answer and starts from the
//! view's set of budgets that may be spent at all (`View::hot`, one read per call), so a
//! deployment whose budgets were never spent costs a few `u128` operations. Nothing is
//! allocated except the result, and nothing is locked.
//!
//! Being over budget is not an error of the limiter, but an empty result is something the
//! router must handle, so it comes back as [`NoDeployments`], whose message is the reference's.

use std::fmt;

use jiff::Timestamp;

use crate::limiter::{identity_slots, refused_new, SlotBuf};
use crate::model::budget::Scope;
use crate::model::identity::Identity;
use crate::model::money::Money;
use crate::model::slots::SlotKeys;
use crate::model::unit::Unit;
use crate::resolve::{CacheMap, Deployment, Misses, Resolved, Resolver};
use crate::template::{name_fault, Lookup};
use crate::view::View;

/// No deployment is left: every candidate is under a spent budget (its provider's, its model's,
/// its own), a tag or an identity of the request has spent its budget, or candidates were
/// denied as unknown. The message is litellm's (`No deployments available - crossed budget: Exceeded
/// budget for provider openai: 10.5 >= 10`), with the scope in place of `provider` for the
/// other scopes (`Exceeded budget for tag team-a: 5 >= 5`); when each budget resets is in
/// [`Exceeded::resets_at`]. A strict budget that refused a reservation by this node's grant
/// alone (not spent) reads `Exceeded this node's grant for provider openai: 1 > 0 (limit 100,
/// not spent: …)`, see [`Exceeded::grant`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct NoDeployments {
    /// Each exceeded (enforced) budget among the candidates and the request's tags and
    /// identities, once, with its spend, limit and reset time.
    pub exceeded: Vec<Exceeded>,
    /// Candidates dropped because their provider could not be resolved and
    /// `unknown_provider` is `deny`.
    pub unknown: Vec<String>,
    /// The request names an identity that its scope's template refuses before its first use
    /// (the template is full: `max_series`; its limit is zero; the name cannot be a series):
    /// why, in one line.
    pub template_refused: Option<String>,
}

/// One budget that refused: over its limit, or (a strict budget refusing a reservation) over
/// this node's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Exceeded {
    /// The provider for a provider budget; for the other scopes the budget's key name
    /// (`tag:team-a`), so that code written before scopes still names it uniquely.
    pub provider: String,
    /// The budget's scope.
    pub scope: Scope,
    /// The provider, deployment id, model, tag, key, user, team, org or customer.
    pub name: String,
    /// The budget's period (with `@Zone` when it has its own time zone).
    pub period: String,
    /// Its spend in the current window (from `filter`; for a sliding budget with the weighted
    /// part of the previous window, as its limit is compared). A refused reservation reports what
    /// admission would have reached against the bound that refused: the fleet's spend plus
    /// held money plus the estimate against the limit; this node's own spend plus its held
    /// money plus the estimate against its grant (when [`Exceeded::grant`] is set).
    pub spend: Money,
    /// Its configured limit, whatever refused.
    pub limit: Money,
    /// Set when a strict budget refused a reservation by this node's grant alone: the grant
    /// this node holds in the window. The budget is not spent; the node may admit no more
    /// until Redis grants it more (Redis is unreachable, or the rest of the limit is granted
    /// to other nodes). `None` when the limit refused.
    pub grant: Option<Money>,
    /// When its window ends: the limit admits again after this (a grant may come sooner).
    /// A concurrent budget's window never ends: a slot frees at a commit, release or expiry.
    pub resets_at: Timestamp,
    /// When its window started.
    pub window_start: Timestamp,
    /// What it counts: `spend`, `limit` and `grant` are in this unit (nano-dollars for USD,
    /// the whole count otherwise; held slots for a concurrent budget).
    pub unit: Unit,
}

impl Exceeded {
    /// An amount of its unit as text (`0.25`, `1500`).
    fn amount(&self, m: Money) -> String {
        self.unit.format_amount(m.as_nanos())
    }

    /// ` tokens`, ` requests`, … after the amounts of a budget that does not count dollars.
    fn unit_suffix(&self) -> String {
        match self.unit {
            Unit::Usd => String::new(),
            Unit::Concurrent => " concurrent requests".into(),
            u => format!(" {u}"),
        }
    }

    /// Whether this node's grant refused (a strict budget), not the budget's limit.
    pub fn by_grant(&self) -> bool {
        self.grant.is_some()
    }
}

impl fmt::Display for NoDeployments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("No deployments available - crossed budget:")?;
        let mut sep = " ";
        for e in &self.exceeded {
            match e.grant {
                // Why spelled out: "Exceeded budget ... 1 >= 0" would read as a spent budget.
                Some(grant) => write!(
                    f,
                    "{sep}Exceeded this node's grant for {} {}: {} > {}{} (limit {}, not \
                     spent: a strict budget admits only what Redis granted this node, and no \
                     more came: Redis is unreachable, or the rest is granted to other nodes)",
                    e.scope,
                    e.name,
                    e.amount(e.spend),
                    e.amount(grant),
                    e.unit_suffix(),
                    e.amount(e.limit)
                )?,
                None => write!(
                    f,
                    "{sep}Exceeded budget for {} {}: {} >= {}{}",
                    e.scope,
                    e.name,
                    e.amount(e.spend),
                    e.amount(e.limit),
                    e.unit_suffix()
                )?,
            }
            sep = ", ";
        }
        for m in &self.unknown {
            write!(
                f,
                "{sep}Unknown provider for deployment {m:?} (unknown_provider: deny)"
            )?;
            sep = ", ";
        }
        if let Some(why) = &self.template_refused {
            write!(f, "{sep}Refused by a template: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoDeployments {}

/// Remembers, within one call, which budgets were already checked (first 128 budgets); a
/// call starts with every budget that cannot be spent marked checked (`View::hot`).
#[derive(Debug, Default)]
pub(crate) struct Memo {
    checked: u128,
    blocked: u128,
}

impl Memo {
    /// `is_blocked(b)` through the memo.
    #[inline]
    pub fn blocked(&mut self, budget: u32, is_blocked: impl FnOnce() -> bool) -> bool {
        if budget >= 128 {
            return is_blocked();
        }
        let bit = 1u128 << budget;
        if self.checked & bit == 0 {
            self.checked |= bit;
            if is_blocked() {
                self.blocked |= bit;
            }
        }
        self.blocked & bit != 0
    }

    /// Whether any budget of `mask` (bit `b`: slot `b`) is blocked, through the memo: the
    /// budgets not yet checked in this call are read (all of them, so a spent shadow budget
    /// counts its would-be denial as the prepared form does), the others cost nothing.
    #[inline]
    pub fn blocked_mask(&mut self, mask: u128, mut is_blocked: impl FnMut(u32) -> bool) -> bool {
        let mut new = mask & !self.checked;
        if new != 0 {
            self.checked |= new;
            while new != 0 {
                let b = new.trailing_zeros();
                new &= new - 1;
                if is_blocked(b) {
                    self.blocked |= 1u128 << b;
                }
            }
        }
        mask & self.blocked != 0
    }
}

/// The filter loop shared by `Limiter::filter`, `Limiter::filter_in_place` and `Prepared`:
/// one clock read per call, each deployment resolved once, each distinct budget read once
/// (memo), nothing allocated but the caller's result.
#[derive(Debug)]
pub(crate) struct Check<'a> {
    pub view: &'a View,
    pub keys: &'a SlotKeys,
    pub now: i64,
    pub deny_unknown: bool,
    memo: Memo,
    /// The call's cache misses (see [`Check::note_misses`]).
    misses: Misses,
}

impl<'a> Check<'a> {
    pub fn new(view: &'a View, keys: &'a SlotKeys, now: i64, deny_unknown: bool) -> Check<'a> {
        Check {
            view,
            keys,
            now,
            deny_unknown,
            // Budgets that cannot be spent (clear in the view's hot set) start out checked
            // and not blocked: the call reads none of them.
            memo: Memo {
                checked: !view.hot(),
                blocked: 0,
            },
            misses: Misses::default(),
        }
    }

    /// Hands the call's cache misses to the resolver, once per call (it publishes them in
    /// batches, see `Resolver::note_misses`); nothing when every deployment hit.
    #[inline]
    pub fn note_misses(&mut self, resolver: &Resolver) {
        if !self.misses.is_empty() {
            resolver.note_misses(std::mem::take(&mut self.misses));
        }
    }

    /// Forgets the misses noted so far (a second pass over the same list notes them again).
    #[inline]
    pub fn take_misses(&mut self) -> Misses {
        std::mem::take(&mut self.misses)
    }

    /// Whether an enforced budget is spent (a spent shadow budget counts a would-be denial
    /// and passes).
    #[inline]
    pub fn blocked(&mut self, budget: u32) -> bool {
        let (view, now) = (self.view, self.now);
        self.memo.blocked(budget, || view.blocks(budget, now))
    }

    /// Whether every budget of the request has room: each of its tags' and, with
    /// `WITH_IDENTITY`, each of its identities'.
    ///
    /// Why a const parameter: the entry points without identity (`filter`, `filter_into`, …)
    /// pass `false`, so their code has no identity check at all (not even the `is_empty` of a
    /// pointer the optimiser cannot see through once one instance serves both kinds of
    /// caller): they stay exactly as fast as before identities existed.
    #[inline]
    pub fn request_passes<T: AsRef<str>, const WITH_IDENTITY: bool>(
        &mut self,
        resolver: &Resolver,
        tags: &[T],
        identity: &Identity<'_>,
    ) -> bool {
        let mut ok = true;
        for t in tags {
            for &b in resolver.slots(Scope::Tag, t.as_ref()) {
                // No short cut: shadow tag budgets count their would-be denials.
                ok &= !self.blocked(b);
            }
        }
        // Out of line: a request without identity pays five `None` checks, nothing more.
        if WITH_IDENTITY && !identity.is_empty() {
            ok &= self.identity_passes(resolver, identity);
        }
        ok
    }

    /// Whether every budget of the request's identities has room (each read, so shadow
    /// budgets count their would-be denials).
    #[inline(never)]
    fn identity_passes(&mut self, resolver: &Resolver, identity: &Identity<'_>) -> bool {
        let mut ok = true;
        if !resolver.has_templates() {
            // The explicit budgets only, borrowed from the resolver's tables (no copy).
            for (scope, name) in identity.iter() {
                for &b in resolver.slots(scope, name) {
                    ok &= !self.blocked(b);
                }
            }
            return ok;
        }
        for (scope, name) in identity.iter() {
            for &b in resolver.slots(scope, name) {
                ok &= !self.blocked(b);
            }
            let Some(t) = resolver.template(scope) else {
                continue;
            };
            // One read of the template's table per name: its series, or whether a name
            // without series yet is refused (see `refused_new`).
            let mut series = SlotBuf::default();
            match t.lookup(name, |s| series.push(s)) {
                Lookup::Found => {
                    for b in series {
                        ok &= !self.blocked(b);
                    }
                }
                Lookup::Missing => ok &= !t.refuses_new() && name_fault(name).is_none(),
            }
        }
        ok
    }

    /// Whether a resolved deployment passes.
    #[inline]
    pub fn passes(&mut self, r: &Resolved<'_>) -> bool {
        if r.unknown {
            metrics::counter!("provider_budgets_unknown_provider_total").increment(1);
            if self.deny_unknown {
                return false;
            }
        }
        if let Some(mask) = r.mask {
            let (view, now) = (self.view, self.now);
            return !self.memo.blocked_mask(mask, |b| view.blocks(b, now));
        }
        for s in r.slots {
            for &b in s {
                if self.blocked(b) {
                    return false;
                }
            }
        }
        true
    }

    /// The loop: `keep(i)` for each candidate that passes (none when a budget of the request
    /// blocks); returns how many passed.
    #[inline]
    pub fn select<'r>(
        &mut self,
        tags_ok: bool,
        candidates: impl Iterator<Item = Resolved<'r>>,
        mut keep: impl FnMut(usize),
    ) -> usize {
        if !tags_ok {
            return 0;
        }
        let mut kept = 0;
        for (i, r) in candidates.enumerate() {
            if self.passes(&r) {
                keep(i);
                kept += 1;
            }
        }
        kept
    }

    /// The plain filter's loop (`Limiter::filter_tagged`, `Limiter::filter_in_place_tagged`):
    /// `keep(i, d)` for each deployment that passes (none when a budget of the request
    /// blocks), each resolved
    /// through the cache loaded once by the caller; returns how many passed.
    #[inline]
    pub fn select_in<'d, D: Deployment>(
        &mut self,
        resolver: &Resolver,
        cache: &CacheMap,
        tags_ok: bool,
        deployments: &'d [D],
        mut keep: impl FnMut(usize, &'d D),
    ) -> usize {
        if !tags_ok {
            return 0;
        }
        let mut kept = 0;
        for (i, d) in deployments.iter().enumerate() {
            if self.passes_in(resolver, cache, d) {
                keep(i, d);
                kept += 1;
            }
        }
        kept
    }

    /// Whether a deployment passes, resolved through the loaded cache.
    ///
    /// The fast path, inlined into the loop: a cache hit of a known provider whose budgets
    /// were all checked already in this call (or cannot be spent, `View::hot`) is answered
    /// by two `u128` operations. Everything else (a budget read for the first time in this
    /// call, an unknown provider, an explicit provider, a miss, slots from 128 up) goes
    /// through [`Check::passes`], out of line.
    #[inline]
    pub fn passes_in(
        &mut self,
        resolver: &Resolver,
        cache: &CacheMap,
        d: &(impl Deployment + ?Sized),
    ) -> bool {
        match resolver.cached(cache, d) {
            Some(c) => match c.known_mask() {
                Some(mask) if mask & !self.memo.checked == 0 => mask & self.memo.blocked == 0,
                _ => self.passes_out_of_line(&c.resolved()),
            },
            None => self.passes_uncached(resolver, cache, d),
        }
    }

    #[inline(never)]
    fn passes_out_of_line(&mut self, r: &Resolved<'_>) -> bool {
        self.passes(r)
    }

    #[inline(never)]
    fn passes_uncached(
        &mut self,
        resolver: &Resolver,
        cache: &CacheMap,
        d: &(impl Deployment + ?Sized),
    ) -> bool {
        let r = resolver.resolve_noting(cache, d, &mut self.misses);
        self.passes(&r)
    }

    /// The error for an empty result (cold path): every spent enforced budget of the
    /// request (tags, then identities) and the candidates, once, and the denied unknown ones.
    pub fn no_deployments<'r, T: AsRef<str>>(
        &self,
        resolver: &Resolver,
        tags: &[T],
        identity: &Identity<'_>,
        candidates: impl Iterator<Item = (Resolved<'r>, &'r str)>,
    ) -> NoDeployments {
        let mut err = NoDeployments {
            exceeded: Vec::new(),
            unknown: Vec::new(),
            template_refused: refused_new(resolver, identity),
        };
        let mut seen = Vec::new();
        let mut note = |b: u32, err: &mut NoDeployments| {
            if seen.contains(&b) || !self.view.blocks_quietly(b, self.now) {
                return;
            }
            seen.push(b);
            let key = self.keys.get(b);
            let t = self.view.totals_at(b, self.now);
            let unit = key.unit();
            // A concurrent budget is full of held slots, not of spend.
            let spend = match unit {
                Unit::Concurrent => t.total().saturating_add(t.reserved),
                // A sliding budget: with the weighted part of the previous window.
                _ => self.view.sliding_spend(b, self.now).unwrap_or(t.total()),
            };
            err.exceeded.push(Exceeded {
                provider: key.key_name(),
                scope: key.scope,
                period: key.period_shown().to_owned(),
                name: key.name,
                spend,
                limit: self.view.limit(b),
                grant: None,
                resets_at: t.window.end(),
                window_start: t.window.start(),
                unit,
            });
        };
        for t in tags {
            for &b in resolver.slots(Scope::Tag, t.as_ref()) {
                note(b, &mut err);
            }
        }
        for b in identity_slots(resolver, identity) {
            note(b, &mut err);
        }
        for (r, model) in candidates {
            if r.unknown && self.deny_unknown {
                err.unknown.push(model.to_owned());
                continue;
            }
            for b in r.iter() {
                note(b, &mut err);
            }
        }
        metrics::counter!("provider_budgets_no_deployments_total").increment(1);
        err
    }
}

#[cfg(test)]
mod tests {
    use super::Memo;

    #[test]
    fn the_mask_memo_reads_each_budget_once_and_agrees_with_the_slot_memo() {
        let spent = |b: u32| b % 5 == 3;
        let lists: [&[u32]; 4] = [&[0, 3, 7], &[1, 2], &[7, 8, 13], &[127, 0]];
        let mut by_mask = Memo::default();
        let mut by_slot = Memo::default();
        let mut reads = Vec::new();
        for list in lists {
            let mask = list.iter().fold(0u128, |m, &b| m | 1u128 << b);
            let a = by_mask.blocked_mask(mask, |b| {
                reads.push(b);
                spent(b)
            });
            let b = list.iter().any(|&b| by_slot.blocked(b, || spent(b)));
            assert_eq!(a, b, "{list:?}");
        }
        // Every budget read once, in the order first seen (ascending within a list).
        assert_eq!(reads, vec![0, 3, 7, 1, 2, 8, 13, 127]);
    }
}
