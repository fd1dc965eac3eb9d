//! Admission in the view: reservations held and settled ([`View::try_reserve`],
//! [`View::settle`], [`View::unreserve`]) and the strict budgets' grants they are held to
//! (set by the replicator; lowered by a give-back; what a refused reservation lacked).

use std::sync::atomic::Ordering;

use crate::model::money::Money;
use crate::model::window::Window;

use super::{saturating_add, saturating_sub, Cell, Crossed, Refused, View};

impl View {
    /// Admission of a reservation: holds `amount` in the window containing `at_secs` if
    /// `spend + reserved + amount <= limit` (and, for a strict budget, `own + reserved + amount
    /// <= grant`), atomically (a CAS on `reserved`: two threads never share the last nano).
    /// A shadow budget never refuses (it counts a would-be denial and holds the amount).
    /// Returns the window the amount is held in, or why there is no room.
    pub fn try_reserve(&self, budget: u32, at_secs: i64, amount: Money) -> Result<Window, Refused> {
        let b = self.budget(budget);
        let cell = self.cell_at(budget, at_secs);
        let amount = amount.as_nanos();
        let previous = if b.sliding.load(Ordering::Relaxed) {
            b.previous_part(&b.cells.load(), Some(cell.window), at_secs, Cell::committed)
        } else {
            0
        };
        let mut held = cell.reserved.load(Ordering::Relaxed);
        loop {
            let limit = b.limit.load(Ordering::Relaxed);
            let own = cell.own.load(Ordering::Relaxed);
            let want = held.saturating_add(amount);
            let fleet = own
                .saturating_add(cell.others.load(Ordering::Relaxed))
                .saturating_sub(cell.credit.load(Ordering::Relaxed))
                .saturating_add(want)
                .saturating_add(previous);
            let refused = if fleet > limit {
                Some(Refused::Limit(cell.window))
            } else if b.strict.load(Ordering::Relaxed)
                && own.saturating_add(want) > cell.grant.load(Ordering::Relaxed)
            {
                Some(Refused::Grant(cell.window))
            } else {
                None
            };
            if let Some(refused) = refused {
                if !b.shadow.load(Ordering::Relaxed) {
                    return Err(refused);
                }
            }
            match cell.reserved.compare_exchange_weak(
                held,
                want,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    // A give-back may have lowered the grant since it was read: re-check
                    // (SeqCst, paired with `lower_grant`) and back out rather than hold money
                    // the fleet no longer granted.
                    if refused.is_none()
                        && b.strict.load(Ordering::Relaxed)
                        && cell.own.load(Ordering::SeqCst).saturating_add(want)
                            > cell.grant.load(Ordering::SeqCst)
                    {
                        saturating_sub(&cell.reserved, amount);
                        return Err(Refused::Grant(cell.window));
                    }
                    if refused.is_some() {
                        // A shadow budget: counted once, after the CAS (a retry must not
                        // count the same admission again).
                        b.would_deny.fetch_add(1, Ordering::Relaxed);
                    }
                    b.note_total(fleet);
                    return Ok(cell.window);
                }
                Err(now) => held = now,
            }
        }
    }

    /// Whether a strict budget's grant is short of `amount` more in the window containing
    /// `at_secs` (`own + reserved + amount > grant`), whatever its limit says: a budget a
    /// grant round should raise along with the one that refused (no cell is made).
    pub fn grant_short(&self, budget: u32, at_secs: i64, amount: Money) -> bool {
        let b = self.budget(budget);
        if !b.strict.load(Ordering::Relaxed) || b.shadow.load(Ordering::Relaxed) {
            return false;
        }
        let cells = b.cells.load();
        let Some(cell) = cells.iter().find(|c| c.window.contains_secs(at_secs)) else {
            return true; // no grant in this window yet
        };
        cell.own
            .load(Ordering::Relaxed)
            .saturating_add(cell.reserved.load(Ordering::Relaxed))
            .saturating_add(amount.as_nanos())
            > cell.grant.load(Ordering::Relaxed)
    }

    /// Gives back a held amount without counting it (a released reservation, or the part of
    /// a multi-budget admission that another budget refused).
    pub fn unreserve(&self, budget: u32, window: Window, amount: Money) {
        let cell = self.cell_for(budget, window);
        saturating_sub(&cell.reserved, amount.as_nanos());
    }

    /// Settles a reservation: counts `actual` as own spend of its window, then frees the held
    /// `amount` (in that order, so that spend plus reserved never dips in between and a
    /// concurrent admission cannot take the same money twice). Reports soft limits crossed.
    pub fn settle(
        &self,
        budget: u32,
        window: Window,
        amount: Money,
        actual: Money,
        now_secs: i64,
    ) -> Option<Crossed> {
        let cell = self.cell_for(budget, window);
        saturating_add(&cell.own, actual.as_nanos());
        saturating_sub(&cell.reserved, amount.as_nanos());
        let b = self.budget(budget);
        b.note_total(cell.committed());
        b.fire_bits(&cell, now_secs)
    }

    /// A reservation of `amount` was refused by this node's grant alone: remembered (the
    /// largest since the replicator last looked) so that the next grant round asks for it.
    pub fn note_starved(&self, budget: u32, amount: Money) {
        self.budget(budget)
            .starved
            .fetch_max(amount.as_nanos(), Ordering::Relaxed);
    }

    /// Takes the largest starved amount noted since the last call (the replicator).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn take_starved(&self, budget: u32) -> Money {
        Money::from_nanos(self.budget(budget).starved.swap(0, Ordering::Relaxed))
    }

    /// Lowers this node's grant of a window towards `target` (a give-back), never below what
    /// is spent and held there, and returns the grant now in force (what may be given back).
    /// Sequentially consistent with the re-check in [`View::try_reserve`] (a Dekker pair on
    /// `grant` and `reserved`): either a racing reservation sees the lowered grant and backs
    /// out, or this sees its hold and keeps the grant above it.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn lower_grant(&self, budget: u32, window: Window, target: Money) -> Money {
        let cell = self.cell_for(budget, window);
        let mut grant = target.as_nanos();
        let mut was = None;
        loop {
            let before = cell.grant.swap(grant, Ordering::SeqCst);
            let was = *was.get_or_insert(before);
            let used = cell
                .own
                .load(Ordering::SeqCst)
                .saturating_add(cell.reserved.load(Ordering::SeqCst));
            // Keep what is in use, never more than the grant was.
            let kept = used.min(was).max(grant);
            if kept == grant {
                return Money::from_nanos(grant);
            }
            grant = kept;
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn set_strict(&self, budget: u32, strict: bool) {
        self.budget(budget).strict.store(strict, Ordering::Relaxed);
    }

    /// Sets this node's grant of a strict budget's window (the replicator, after the grant is
    /// durable; a give-back lowers it before it is sent).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn set_grant(&self, budget: u32, window: Window, grant: Money) {
        self.cell_for(budget, window)
            .grant
            .store(grant.as_nanos(), Ordering::SeqCst);
    }
}
