//! The Redis keys of a budget: its window keys, its strict marker and its leases, all under
//! the budget's hash tag ([`BudgetKey::redis_tag`]).

use crate::model::key::BudgetKey;

/// Redis key of one budget window: `{prefix}:{{provider:period}}:{window_start_unix_secs}`.
///
/// The braces are a Redis Cluster hash tag per budget ([`BudgetKey::redis_tag`]): all windows
/// of one budget live in one slot, so the script that merges them in one call is valid on a
/// cluster too.
pub fn window_key(prefix: &str, budget: &BudgetKey, window_start: i64) -> String {
    format!("{}:{window_start}", budget.redis_tag(prefix))
}

/// Redis key of a strict budget's marker: `{prefix}:{{provider:period}}:strict`, the Redis
/// time (ms) of the first strict call after the key was absent (first use, or Redis lost its
/// data) or after a node re-registered a grant that Redis had forgotten. For a guard time
/// after it, no grant of that budget is raised (the holders re-register first). No expiry.
pub fn strict_key(prefix: &str, budget: &BudgetKey) -> String {
    format!("{}:strict", budget.redis_tag(prefix))
}

/// Redis key of a node id's lease for one budget: `{prefix}:{{provider:period}}:lease:{node}`
/// (same hash tag as the budget's windows).
pub fn lease_key(prefix: &str, budget: &BudgetKey, node: &str) -> String {
    format!("{}:lease:{node}", budget.redis_tag(prefix))
}
