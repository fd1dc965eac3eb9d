//! Loud data loss: the eviction policy of every Redis connected to, and our own
//! acknowledged fields found missing.
//!
//! * **Eviction policy.** Each new connection (the configured server, each cluster master)
//!   asks `CONFIG GET maxmemory-policy`. Every key this library writes carries a TTL (window
//!   keys expire after their window and grace, leases after their term), so not only the
//!   `allkeys-*` policies but also the `volatile-*` ones choose among our keys when Redis is
//!   full: anything but `noeviction` counts as evicting, with one warning per server and
//!   policy. A server that refuses `CONFIG` (managed Redis, ACLs) leaves it unknown, logged
//!   at debug level only.
//! * **Data loss.** A read that finds our own field of a window lower than what Redis
//!   acknowledged before (an evicted or deleted key, `FLUSHALL`, a failover to a replica that
//!   missed writes) counts one loss (`ReplicationStatus::data_loss`, the
//!   `provider_budgets_data_loss_total` counter) and warns; the window is then sent again
//!   (it is dirty), so the fleet total heals at the next round. A key within
//!   [`EXPIRY_SKEW_SECS`] of its expiry is not counted (Redis's clock may be ahead).

use super::*;

/// Seconds before a window key's expiry within which a missing key is not counted as a loss
/// (Redis's clock may run ahead of ours).
const EXPIRY_SKEW_SECS: i64 = 10;

/// Whether Redis may evict our keys under `policy` (see the module doc).
pub(super) fn evicts(policy: &str) -> bool {
    !policy.eq_ignore_ascii_case("noeviction")
}

/// Per connection label (the URL or a shard): its `maxmemory-policy`, as Redis told it.
pub(crate) type Policies = Vec<(String, String)>;

/// `evicting` and the policy to show for a set of servers: unknown when none answered;
/// else evicting when any may evict (its policy shown), else the first policy.
pub(crate) fn summary(policies: &Policies) -> (Option<bool>, Option<String>) {
    if let Some((_, p)) = policies.iter().find(|(_, p)| evicts(p)) {
        return (Some(true), Some(p.clone()));
    }
    match policies.first() {
        Some((_, p)) => (Some(false), Some(p.clone())),
        None => (None, None),
    }
}

impl Worker {
    /// Asks a new connection for its eviction policy and records it in `health` (one
    /// warning per server and evicting policy; unknown, quietly, when refused).
    pub(super) async fn probe_eviction(&self, conn: &mut MultiplexedConnection, label: &str) {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        let asked = tokio::time::timeout(
            self.parts.redis.command_timeout,
            cmd.query_async::<FxHashMap<String, String>>(conn),
        )
        .await;
        let policy = match asked {
            Ok(Ok(mut m)) => m.remove("maxmemory-policy"),
            Ok(Err(e)) => {
                tracing::debug!(redis = %label, error = %flat(&e.to_string()), "cannot read maxmemory-policy");
                None
            }
            Err(_) => None,
        };
        let Some(policy) = policy else {
            return;
        };
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let known = health.eviction.iter_mut().find(|(l, _)| l == label);
        let changed = match known {
            Some((_, p)) if *p == policy => false,
            Some((_, p)) => {
                p.clone_from(&policy);
                true
            }
            None => {
                health.eviction.push((label.to_owned(), policy.clone()));
                true
            }
        };
        let evicting = summary(&health.eviction).0 == Some(true);
        drop(health);
        metrics::gauge!("provider_budgets_redis_evicting").set(if evicting { 1.0 } else { 0.0 });
        if changed && evicts(&policy) {
            tracing::warn!(
                redis = %label,
                maxmemory_policy = %policy,
                "redis may evict this library's keys when full (every key it writes has a TTL): \
                 spend and leases can vanish; set maxmemory-policy noeviction"
            );
        }
    }

    /// Our acknowledged field of budget `b`'s window is below what Redis acknowledged
    /// (`acked`): Redis lost it. Counted and logged; the window is sent again.
    pub(super) fn data_loss(&self, b: u32, window: Window, acked: u64, found: u64) {
        // Near its expiry (`EXPIREAT` end + grace, by Redis's clock) a key may be gone for a
        // clock skew's sake: not a loss.
        let grace = i64::try_from(self.parts.redis.grace.as_secs()).unwrap_or(i64::MAX / 4);
        let now = floor_secs(self.parts.clock.now());
        if window.end_secs().saturating_add(grace).saturating_sub(now) <= EXPIRY_SKEW_SECS {
            return;
        }
        tracing::warn!(
            budget = %self.parts.keys.get(b).key_name(),
            window = %window.start(),
            acknowledged = acked,
            found,
            redis = %self.url(),
            "redis lost this node's acknowledged spend (eviction, deletion, flush or failover); \
             sending it again"
        );
        metrics::counter!("provider_budgets_data_loss_total").increment(1);
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.data_loss += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_noeviction_keeps_our_keys_and_the_summary_shows_the_evicting_server() {
        assert!(!evicts("noeviction"));
        for p in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-ttl",
        ] {
            assert!(evicts(p), "{p}");
        }
        assert_eq!(summary(&Vec::new()), (None, None));
        let mut servers = vec![("a".to_owned(), "noeviction".to_owned())];
        assert_eq!(summary(&servers), (Some(false), Some("noeviction".into())));
        servers.push(("b".to_owned(), "allkeys-lru".to_owned()));
        assert_eq!(summary(&servers), (Some(true), Some("allkeys-lru".into())));
    }
}
