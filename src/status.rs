//! What `Limiter::status` reports per budget.

use jiff::Timestamp;

use crate::money::Money;
use crate::window::{Period, Window};

/// The state of one budget in its current window.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BudgetStatus {
    /// Provider the budget applies to.
    pub provider: String,
    /// The budget's period.
    pub period: Period,
    /// The current window: `window.start()` and `window.end()` (when it resets).
    pub window: Window,
    /// Spend of the whole fleet in the window, as known here: own + others.
    pub spend: Money,
    /// This node's own spend in the window.
    pub own_spend: Money,
    /// The budget limit.
    pub limit: Money,
    /// `limit - spend`, zero when over.
    pub remaining: Money,
    /// `spend >= limit`: the provider's deployments are filtered out.
    pub exhausted: bool,
    /// Replication state (the same for every budget of a limiter).
    pub replication: ReplicationStatus,
    /// A replication problem of this budget only, from the last round: a field in one of its
    /// Redis hashes that is not a canonical u64 (skipped), a key of the wrong type (that
    /// window is not synced), a broken lease key. The other budgets are not affected; the
    /// problem clears once the bad data is gone. `None` when there is none.
    pub replication_problem: Option<String>,
}

/// Replication state of a limiter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ReplicationStatus {
    /// Whether a Redis URL is configured.
    pub enabled: bool,
    /// When the last successful sync round finished.
    pub last_sync: Option<Timestamp>,
    /// No successful sync within the last few intervals: others' spend may be out of date.
    pub stale: bool,
    /// The last sync error, if the last round failed.
    pub last_error: Option<String>,
    /// Successful sync rounds since open.
    pub rounds: u64,
    /// Redis round trips since open (one per round; two when Redis lost the script).
    pub round_trips: u64,
}
