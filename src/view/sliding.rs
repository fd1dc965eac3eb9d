//! Sliding windows (`window: sliding`): the previous window counts, weighted by how much of it
//! still lies in the trailing period that ends at the instant of the check.
//!
//! At instant `t` in window `k` (of length `L`, the window's actual length for calendar
//! periods), the trailing period is `[t − L, t)`. The part of window `k − 1` inside it is
//! `min(end(k) − t, len(k − 1))` seconds, so the sliding spend is
//!
//! ```text
//! total(k) + ceil(total(k − 1) × min(end(k) − t, len(k − 1)) / len(k − 1))
//! ```
//!
//! in exact integers (`u128`), the weighted part rounded **up**: a sliding budget never admits
//! more than this model. At the first second of window `k` the whole previous window counts
//! (when it is not longer than window `k`); the weight falls by `1 / len(k − 1)` each second.
//! Window `k − 1` is the window that ends where `k` starts (windows are contiguous).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::model::money::Money;
use crate::model::window::Window;

use super::{BudgetView, Cell, View};

/// The part of `previous`'s `total` that counts at `t` (an instant in `current`), rounded up.
pub(crate) fn weighted(total: u64, previous: Window, current: Window, t: i64) -> u64 {
    let len = previous.end_secs().saturating_sub(previous.start_secs());
    if total == 0 || len <= 0 || previous.end_secs() != current.start_secs() {
        return 0;
    }
    let overlap = current.end_secs().saturating_sub(t).clamp(0, len);
    let (num, den) = (
        u128::from(total) * u128::try_from(overlap).unwrap_or(0),
        u128::try_from(len).unwrap_or(1),
    );
    u64::try_from(num.div_ceil(den)).unwrap_or(u64::MAX)
}

impl BudgetView {
    /// The weighted part of the previous window's `amount` at `t` (0 when it has no cell).
    /// `current` is the window holding `t` when the caller has its cell.
    pub(super) fn previous_part(
        &self,
        cells: &[Arc<Cell>],
        current: Option<Window>,
        t: i64,
        amount: fn(&Cell) -> u64,
    ) -> u64 {
        let current = current.unwrap_or_else(|| self.schedule.window_at_secs(t));
        cells
            .iter()
            .find(|c| c.window.end_secs() == current.start_secs())
            .map_or(0, |c| weighted(amount(c), c.window, current, t))
    }

    /// Recomputes `gate` from the limit and the shape. When it falls, totals between the new
    /// and the old gate were not recorded in `peak` (and a charge racing with this store may
    /// still compare with the old gate): the fast path of this budget is given up (until the
    /// next start) rather than miss one.
    pub(super) fn set_gate(&self) {
        let limit = self.limit.load(Ordering::Relaxed);
        let gate = if self.sliding.load(Ordering::Relaxed) {
            limit.div_ceil(2)
        } else {
            limit
        };
        let old = self.gate.swap(gate, Ordering::Relaxed);
        if gate < old {
            self.peak.store(u64::MAX, Ordering::Relaxed);
        }
        if self.peak.load(Ordering::Relaxed) >= gate {
            self.hot.mark(self.slot);
        }
    }

    /// The cutoff below which this budget's windows may go: `cutoff`, lowered for a sliding
    /// budget so that the window before the one holding `now` stays.
    pub(super) fn keep_cutoff(&self, cutoff: i64, now: i64) -> i64 {
        if !self.sliding.load(Ordering::Relaxed) {
            return cutoff;
        }
        // The previous window ends where the current one starts; keep it (end > cutoff).
        cutoff.min(self.schedule.window_at_secs(now).start_secs() - 1)
    }
}

impl View {
    /// Sets a budget's window shape (open, reload): in place, the series and its windows stay.
    pub fn set_sliding(&self, budget: u32, sliding: bool) {
        let b = self.budget(budget);
        b.sliding.store(sliding, Ordering::Relaxed);
        b.set_gate();
    }

    /// [`View::set_sliding`] at open, before any request can reach the view: the peak is
    /// recomputed from the live windows instead of given up, so a sliding budget keeps the
    /// fast path while nothing is near its limit.
    pub fn init_sliding(&self, budget: u32, sliding: bool) {
        let b = self.budget(budget);
        b.sliding.store(sliding, Ordering::Relaxed);
        let limit = b.limit.load(Ordering::Relaxed);
        let gate = if sliding { limit.div_ceil(2) } else { limit };
        b.gate.store(gate, Ordering::Relaxed);
        for c in b.cells.load().iter() {
            b.raise_peak(c.committed());
        }
        if b.peak.load(Ordering::Relaxed) >= gate {
            b.hot.mark(b.slot);
        }
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // the replicator's
    pub fn is_sliding(&self, budget: u32) -> bool {
        self.budget(budget).sliding.load(Ordering::Relaxed)
    }

    /// The cutoff of retention for one slot's windows (see [`BudgetView::keep_cutoff`]); a
    /// credit series follows the budget it credits.
    pub fn keep_cutoff(&self, slot: u32, cutoff: i64, now: i64) -> i64 {
        let owner = self.credited_budget(slot).unwrap_or(slot);
        self.budget(owner).keep_cutoff(cutoff, now)
    }

    /// A sliding budget's spend at `t`: the current window's net spend plus the weighted
    /// part of the previous window's (net of credits, without reservations, as `status`
    /// shows spend); `None` for a fixed budget.
    pub fn sliding_spend(&self, budget: u32, t: i64) -> Option<Money> {
        let b = self.budget(budget);
        if !b.sliding.load(Ordering::Relaxed) {
            return None;
        }
        let cells = b.cells.load();
        let current = cells.iter().find(|c| c.window.contains_secs(t));
        let previous = b.previous_part(&cells, current.map(|c| c.window), t, Cell::net);
        let spend = current.map_or(0, |c| c.net()).saturating_add(previous);
        Some(Money::from_nanos(spend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::window::Schedule;
    use jiff::Timestamp;

    #[test]
    fn a_sliding_budget_is_hot_once_a_window_reaches_half_its_limit() {
        let s = Schedule::new("10s".parse().unwrap(), Timestamp::UNIX_EPOCH);
        let n = Money::from_nanos;
        let v = View::new([(s.clone(), n(100)), (s, n(100))]);
        v.init_sliding(0, true);
        v.add_own(0, 5, n(49));
        assert_eq!(v.hot(), 0, "49 + 49 < 100: the fast path holds");
        v.add_own(0, 10, n(50));
        assert_eq!(v.hot(), 0b01, "50 + 50 may reach 100");
        assert!(!v.exhausted(0, 10), "50 + 49");
        v.add_own(0, 10, n(1));
        assert!(v.exhausted(0, 10), "51 + 49");
        assert!(!v.exhausted(0, 11), "51 + ceil(49 × 0.9) = 96");
        assert!(!v.exhausted(0, 9), "49, and nothing before it");
        // Turned sliding while live: the totals below the new gate were not in the peak.
        v.add_own(1, 5, n(60));
        v.add_own(1, 10, n(40));
        assert_eq!(v.hot() & 0b10, 0);
        assert!(!v.exhausted(1, 10));
        v.set_sliding(1, true);
        assert_eq!(v.hot() & 0b10, 0b10);
        assert!(v.exhausted(1, 10), "40 + 60");
        assert!(matches!(
            v.try_reserve(1, 15, n(31)),
            Err(crate::view::Refused::Limit(_))
        ));
        assert!(
            v.try_reserve(1, 15, n(30)).is_ok(),
            "40 + ceil(60 × 0.5) + 30"
        );
        v.set_sliding(1, false);
        assert!(!v.exhausted(1, 10));
    }

    #[test]
    fn the_weight_is_the_overlap_of_the_trailing_period_rounded_up() {
        let prev = Window::from_secs(0, 10);
        let cur = Window::from_secs(10, 20);
        assert_eq!(
            weighted(100, prev, cur, 10),
            100,
            "the whole previous window"
        );
        assert_eq!(weighted(100, prev, cur, 11), 90);
        assert_eq!(weighted(100, prev, cur, 19), 10);
        assert_eq!(weighted(7, prev, cur, 19), 1, "0.7 rounds up");
        assert_eq!(weighted(0, prev, cur, 15), 0);
        assert_eq!(
            weighted(100, Window::from_secs(0, 5), cur, 15),
            0,
            "not adjacent"
        );
        assert_eq!(weighted(u64::MAX, prev, cur, 10), u64::MAX, "no overflow");
        // A longer previous window (31 days before 28): only what the trailing period covers.
        let jan = Window::from_secs(0, 31);
        let feb = Window::from_secs(31, 59);
        assert_eq!(weighted(31, jan, feb, 31), 28);
        assert_eq!(weighted(31, jan, feb, 58), 1);
        // A shorter one (28 before 31): whole for the first three seconds.
        let feb = Window::from_secs(0, 28);
        let mar = Window::from_secs(28, 59);
        assert_eq!(weighted(28, feb, mar, 30), 28);
        assert_eq!(weighted(28, feb, mar, 31), 28);
        assert_eq!(weighted(28, feb, mar, 32), 27);
    }
}
