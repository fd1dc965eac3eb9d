//! [`WindowTotals`]: what one window of a budget holds, as read at one instant.

use crate::model::money::Money;
use crate::model::window::Window;

/// A snapshot of one window's totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowTotals {
    pub window: Window,
    pub own: Money,
    pub others: Money,
    /// Held by this node's open reservations (not spend).
    pub reserved: Money,
    /// Strict budgets: this node's grant (zero otherwise or before the first).
    pub grant: Money,
    /// The fleet's credits in the window, as known here.
    pub credit: Money,
}

impl WindowTotals {
    /// Spend net of credits, never below zero: what the budget counts.
    pub fn total(&self) -> Money {
        self.gross().saturating_sub(self.credit)
    }

    /// Spend before credits: own + others.
    pub fn gross(&self) -> Money {
        self.own.saturating_add(self.others)
    }
}
