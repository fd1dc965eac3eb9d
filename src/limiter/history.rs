//! [`Limiter::history`]: the windows of one budget still held in memory (the current one and
//! the ended ones within `storage.retention`), for charts: the status page's.

use crate::limiter::Limiter;
use crate::model::budget::Scope;
use crate::model::key::BudgetKey;
use crate::model::money::Money;
use crate::model::window::Window;

impl Limiter {
    /// Spend (net of credits) per window of the budget `scope`/`name` whose period part is
    /// `period_key` (as [`BudgetStatus::period_key`](crate::BudgetStatus::period_key) shows
    /// it), newest first, at most `n`. Empty when no such budget series exists.
    pub fn history(
        &self,
        scope: Scope,
        name: &str,
        period_key: &str,
        n: usize,
    ) -> Vec<(Window, Money)> {
        let key = BudgetKey::new(scope, name, period_key);
        match self.inner.keys.position(&key) {
            Some(slot) => self
                .inner
                .view
                .windows(slot)
                .into_iter()
                .take(n)
                .map(|t| (t.window, t.total()))
                .collect(),
            None => Vec::new(),
        }
    }
}
