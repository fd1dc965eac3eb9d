//! What `Limiter::status` reports per budget.

use jiff::Timestamp;

use crate::model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit};
use crate::model::money::Money;
use crate::model::window::{Period, Window};

/// The state of one budget in its current window.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BudgetStatus {
    /// The provider for provider budgets; the key name (`tag:team-a`) for the other scopes.
    pub provider: String,
    /// What the budget applies to.
    pub scope: Scope,
    /// Its provider, deployment id, model or tag.
    pub name: String,
    /// Enforce or shadow.
    pub mode: Mode,
    /// Its soft limits.
    pub soft_limits: Vec<SoftLimit>,
    /// The soft limits the window's spend has reached.
    pub thresholds_crossed: Vec<SoftLimit>,
    /// Filter calls since open that this budget, in shadow mode, would have denied.
    pub would_deny: u64,
    /// The budget's period.
    pub period: Period,
    /// The period part of its storage and Redis keys: the period, with `@Zone` when the budget
    /// has its own time zone (`1d@Europe/Berlin`). The `period` label of its metrics.
    pub period_key: String,
    /// IANA time zone of its local windows (`d`, `w`, `mo` start at local midnight there);
    /// `UTC` when none is configured.
    pub time_zone: String,
    /// The current window: `window.start()` and `window.end()` (when it resets).
    pub window: Window,
    /// Spend of the whole fleet in the window, as known here: own + others.
    pub spend: Money,
    /// This node's own spend in the window.
    pub own_spend: Money,
    /// Held by this node's open reservations in the window (not spend: a commit turns it
    /// into spend, a release frees it). `filter` and admission count it, `exhausted` and
    /// `remaining` do not.
    pub reserved: Money,
    /// The budget limit.
    pub limit: Money,
    /// `limit - spend`, zero when over.
    pub remaining: Money,
    /// `spend >= limit`: the provider's deployments are filtered out.
    pub exhausted: bool,
    /// Replication state (the same for every budget of a limiter).
    pub replication: ReplicationStatus,
    /// The storage fault (a full disk, a dead journal) while spend is counted in memory but
    /// cannot be made durable; the same for every budget of a limiter. `None` when healthy.
    pub storage_fault: Option<String>,
    /// A replication problem of this budget only, from the last round: a field in one of its
    /// Redis hashes that is not a canonical u64 (skipped), a key of the wrong type (that
    /// window is not synced), a broken lease key. The other budgets are not affected; the
    /// problem clears once the bad data is gone. `None` when there is none.
    pub replication_problem: Option<String>,
    /// `shared` or `strict` (grants in escrow).
    pub enforcement: Enforcement,
    /// What a strict budget does without Redis.
    pub offline: Offline,
    /// Strict budgets: this node's grant in the window, i.e. what it may spend and hold
    /// (the whole limit when no Redis is configured: the node is the fleet). `None` for
    /// shared budgets.
    pub grant: Option<Money>,
    /// Strict budgets: the sum of every node's grant in the window, as of this node's last
    /// round (`None` before the first, and for shared budgets). Never above the limit.
    pub granted_total: Option<Money>,
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
    /// The last round that reached Redis: how long it took and what it moved.
    pub last_round: RoundFigures,
    /// Timed rounds that ran past their interval (the next one then waited a whole
    /// interval from the end: rounds never pile up).
    pub late_rounds: u64,
    /// Redis tracks this node's clean reads (client-side caching: unchanged budgets cost it
    /// no read); `false` when the server refuses it (every clean budget read every round).
    pub tracking: bool,
}

/// Figures of one sync round (see the README's "Fleet replication").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RoundFigures {
    /// Wall time of the round, milliseconds.
    pub duration_ms: u64,
    /// Window keys whose total was sent (dirty windows).
    pub keys_written: u64,
    /// Window keys only read (clean live windows), including those known unchanged.
    pub keys_read: u64,
    /// Of `keys_read`, the keys not read at all: Redis tracks our last read of them and
    /// reported no change since (client-side caching).
    pub keys_unchanged: u64,
    /// Request bytes sent to Redis.
    pub bytes_out: u64,
    /// Reply bytes received from Redis.
    pub bytes_in: u64,
}
