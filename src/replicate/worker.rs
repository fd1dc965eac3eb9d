//! The replicator thread's worker: its start from the data dir, its loop (rounds every
//! `sync_interval`, on demand, with backoff and jitter) and the health it reports.

use super::round::{Acked, PeerWindow, Peers, RoundError};
use super::*;

/// Per-node jitter of the sync interval: ±10 %, from a generator seeded by the node id and
/// the instance, so that a fleet started at once spreads its rounds instead of hitting Redis
/// in step.
#[derive(Debug)]
pub(super) struct Jitter(pub(super) u64);

impl Jitter {
    pub(super) fn new(node: &str, instance: &str) -> Jitter {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        node.hash(&mut h);
        instance.hash(&mut h);
        Jitter(h.finish() | 1)
    }

    /// The next delay: `interval × [0.9, 1.1)`.
    pub(super) fn delay(&mut self, interval: Duration) -> Duration {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64;
        interval.mul_f64(0.9 + 0.2 * unit)
    }
}

impl Worker {
    pub(super) fn new(
        mut parts: ReplicatorParts,
        instance: String,
        health: Arc<Mutex<Health>>,
        wake: Arc<Wake>,
    ) -> Worker {
        // Checked at open (restore): a list that does not decode failed it.
        let holders = parts.store.load_holders().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the strict holder lists");
            Vec::new()
        });
        let book = grants::Book::load(&parts.keys, std::mem::take(&mut parts.grants), holders);
        let mut peers = Peers::default();
        for (key, value) in std::mem::take(&mut parts.peers) {
            let Some(b) = parts.keys.stored(&key.provider, &key.period) else {
                continue;
            };
            peers.insert(
                (b, key.start),
                PeerWindow {
                    window: crate::durable::store::window_of(&key, value.end),
                    others: value.others,
                    persisted: value.others,
                },
            );
        }
        let mut acked = FxHashMap::default();
        match parts.store.load_acked() {
            Ok(entries) => {
                for (key, value) in entries {
                    if let Some(b) = parts.keys.stored(&key.provider, &key.period) {
                        acked.insert(
                            (b, key.start),
                            Acked {
                                window: crate::durable::store::window_of(&key, value.end),
                                total: value.total,
                                stored: true,
                            },
                        );
                    }
                }
            }
            // Without it every live window is sent once more: harmless (a max merge).
            Err(e) => tracing::warn!(error = %e, "cannot read what redis acknowledged; re-sending"),
        }
        let tracked_for = parts.redis.sync_interval.saturating_mul(TRACKED_FOR);
        Worker {
            backoff: parts.redis.sync_interval,
            parts,
            instance,
            health,
            wire: Wire::new(),
            backend: None,
            peers,
            acked,
            acked_gone: Vec::new(),
            verify: true,
            sent: (0, 0),
            deferred: 0,
            turn: 0,
            lease_ours: Vec::new(),
            script_next: FxHashSet::default(),
            lease_set: Vec::new(),
            round_started: Instant::now(),
            tracker: Tracker::new(tracked_for),
            flushed: false,
            unchanged: 0,
            foreign_owners: FxHashMap::default(),
            retry_at: None,
            woken_at: None,
            down: false,
            refused: None,
            logged: FxHashSet::default(),
            release: false,
            book,
            wake,
        }
    }

    pub(super) fn url(&self) -> String {
        redact_url(&self.parts.redis.url)
    }

    pub(super) async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Reply>,
        cancel: CancellationToken,
    ) {
        // The first round runs at once (a fresh node learns the fleet's spend); the next ones
        // one jittered interval after the previous one *started*, or, when a round ran past
        // that, one jittered interval after it *ended*: rounds never pile up.
        let mut jitter = Jitter::new(&self.parts.node_id, &self.instance);
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {
                    let started = tokio::time::Instant::now();
                    if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                        let _ = self.round().await;
                    }
                    let delay = jitter.delay(self.parts.redis.sync_interval);
                    let now = tokio::time::Instant::now();
                    next = started + delay;
                    if now > next {
                        next = now + delay;
                        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
                        health.late_rounds += 1;
                        metrics::counter!("provider_budgets_sync_late_rounds_total").increment(1);
                    }
                }
                Some(reply) = requests.recv() => {
                    let result = self.drain().await;
                    let _ = reply.send(result);
                }
                () = self.wake.notify.notified() => {
                    // Out of cycle (a reservation refused by its grant). While backing off
                    // from an unreachable Redis, at most one such attempt per sync interval
                    // (Redis may be back before the backoff ends; refused reservations must
                    // not hammer it either): otherwise the waiters just time out.
                    let now = Instant::now();
                    let due = self.retry_at.is_none_or(|t| now >= t)
                        || self
                            .woken_at
                            .is_none_or(|t| now >= t + self.parts.redis.sync_interval);
                    if due {
                        self.woken_at = Some(now);
                        let _ = self.round().await;
                    } else {
                        self.wake.started();
                        self.wake.finished();
                    }
                }
            }
        }
        // Last round: ship what the journal made durable and release the lease, so that
        // another data dir may take this node id over at once (best effort).
        if !self.down {
            self.release = true;
            let _ = self.round().await;
        }
        while let Ok(reply) = requests.try_recv() {
            let _ = reply.send(Err(ReplicationError::Stopped));
        }
    }

    /// An explicit sync (`Limiter::sync`): rounds until nothing is left for later (each
    /// round's work is bounded; Redis serves other clients between them), as long as each
    /// round makes progress. Returns the last round's outcome.
    pub(super) async fn drain(&mut self) -> Result<(), ReplicationError> {
        let mut left = u64::MAX;
        loop {
            self.round().await?;
            if self.deferred == 0 || self.deferred >= left {
                return Ok(());
            }
            left = self.deferred;
        }
    }

    /// One sync round; records its outcome in `health`, metrics and logs.
    pub(super) async fn round(&mut self) -> Result<(), ReplicationError> {
        self.wake.started();
        let result = self.round_inner().await;
        self.wake.finished();
        result
    }

    pub(super) async fn round_inner(&mut self) -> Result<(), ReplicationError> {
        let started = Instant::now();
        let (out0, in0) = self.wire.traffic();
        self.sent = (0, 0);
        self.deferred = 0;
        let result = self.exchange().await;
        let now_secs = floor_secs(self.parts.clock.now());
        if matches!(result, Err(RoundError::Failed(_))) {
            self.book.go_offline(&self.parts.view, now_secs);
        }
        let shared = Arc::clone(&self.health);
        let mut health = shared.lock().unwrap_or_else(|p| p.into_inner());
        health.grants = (0..self.parts.view.len() as u32)
            .map(|b| self.book.status(b, now_secs))
            .collect();
        health.round_trips = self.wire.round_trips();
        health.tracking = self.tracker.on();
        if !matches!(result, Err(RoundError::Failed(_))) {
            let (out1, in1) = self.wire.traffic();
            health.last_round = RoundFigures {
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                keys_written: self.sent.0,
                keys_read: self.sent.1,
                keys_unchanged: self.unchanged,
                keys_deferred: self.deferred,
                bytes_out: out1 - out0,
                bytes_in: in1 - in0,
            };
        }
        self.record_outcome(&mut health, &result);
        if let Some(last) = health.last_sync {
            let lag = self.parts.clock.now().duration_since(last).as_secs_f64();
            metrics::gauge!("provider_budgets_sync_lag_seconds").set(lag);
        }
        result.map(drop).map_err(RoundError::into_error)
    }

    /// Takes a round's outcome into the health, the metrics, the logs (transitions only) and
    /// the reconnection backoff.
    fn record_outcome(
        &mut self,
        health: &mut Health,
        result: &Result<Vec<Vec<String>>, RoundError>,
    ) {
        match &result {
            Ok(problems) => {
                health.rounds += 1;
                health.last_sync = Some(self.parts.clock.now());
                health.last_error = None;
                metrics::counter!("provider_budgets_sync_rounds_total").increment(1);
                if self.down {
                    tracing::info!(target: "provider_budgets::lifecycle", url = %self.url(), "redis reachable again; replication resumed");
                }
                if let Some(holder) = self.refused.take() {
                    tracing::info!(
                        node_id = %self.parts.node_id,
                        previous_holder = %holder,
                        "node id lease taken: this node's spend is replicated again"
                    );
                }
                self.down = false;
                self.retry_at = None;
                self.backoff = self.parts.redis.sync_interval;
                self.report_problems(health, problems);
            }
            Err(RoundError::Duplicate { error, problems }) => {
                health.last_error = Some(error.to_string());
                metrics::counter!("provider_budgets_sync_errors_total").increment(1);
                metrics::counter!("provider_budgets_duplicate_node_id_total").increment(1);
                if let ReplicationError::DuplicateNodeId { holder, .. } = error {
                    if self.refused.as_ref() != Some(holder) {
                        tracing::warn!(error = %error, "duplicate node id; refusing to write this node's field");
                        self.refused = Some(holder.clone());
                    }
                }
                // Redis answered: no backoff, so the conflict resolves at the next interval.
                self.down = false;
                self.retry_at = None;
                self.backoff = self.parts.redis.sync_interval;
                self.report_problems(health, problems);
            }
            Err(RoundError::Failed(e)) => {
                health.last_error = Some(e.to_string());
                metrics::counter!("provider_budgets_sync_errors_total").increment(1);
                if self.down {
                    tracing::debug!(error = %e, "redis still unreachable");
                } else {
                    tracing::warn!(target: "provider_budgets::lifecycle", error = %e, "redis sync failed; enforcing own spend plus the last known spend of the others");
                }
                self.down = true;
                self.retry_at = Some(Instant::now() + self.backoff);
                // With `grant_lease`, never longer than a third of it: once Redis is back, a
                // live node must call within the lease of the first node back, or that node
                // reclaims its grant (slots it still holds) as a dead node's.
                let cap = self
                    .parts
                    .redis
                    .grant_lease
                    .map_or(MAX_BACKOFF, |l| (l / 3).min(MAX_BACKOFF));
                self.backoff = (self.backoff * 2).min(cap);
            }
        }
    }

    /// Publishes the per-budget problems of a round that reached Redis: status, metrics, and
    /// one log line per distinct problem (again only after it went away and came back).
    pub(super) fn report_problems(&mut self, health: &mut Health, problems: &[Vec<String>]) {
        // A reload may have added budget slots since the last round.
        if health.problems.len() < problems.len() {
            health.problems.resize(problems.len(), None);
        }
        let mut current = FxHashSet::default();
        let mut budgets_with_problems = 0u64;
        for (b, list) in problems.iter().enumerate() {
            let (provider, period) = self.parts.keys.get(b as u32).store_parts();
            let mut new = 0usize;
            for p in list {
                current.insert(p.clone());
                if !self.logged.contains(p) {
                    new += 1;
                    if new <= MAX_PROBLEMS_SHOWN {
                        tracing::warn!(budget = %format!("{provider}/{period}"), problem = %p, "replication problem in redis; other budgets are not affected");
                    }
                }
            }
            if new > MAX_PROBLEMS_SHOWN {
                // Thousands of poisoned fields must not mean thousands of log lines.
                tracing::warn!(
                    budget = %format!("{provider}/{period}"),
                    more = new - MAX_PROBLEMS_SHOWN,
                    "more replication problems in redis of the same budget (see status)"
                );
            }
            metrics::counter!("provider_budgets_sync_problems_total").increment(list.len() as u64);
            let summary = (!list.is_empty()).then(|| {
                let mut shown: Vec<&str> = list
                    .iter()
                    .take(MAX_PROBLEMS_SHOWN)
                    .map(String::as_str)
                    .collect();
                let more = list.len().saturating_sub(MAX_PROBLEMS_SHOWN);
                let more = format!("and {more} more");
                if list.len() > MAX_PROBLEMS_SHOWN {
                    shown.push(&more);
                }
                shown.join("; ")
            });
            if summary.is_none() && health.problems.get(b).is_some_and(Option::is_some) {
                tracing::info!(budget = %format!("{provider}/{period}"), "replication problem resolved");
            }
            if summary.is_some() {
                budgets_with_problems += 1;
            }
            if let Some(slot) = health.problems.get_mut(b) {
                *slot = summary;
            }
        }
        metrics::gauge!("provider_budgets_sync_problem_budgets").set(budgets_with_problems as f64);
        self.logged = current;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent_and_differs_per_node() {
        let interval = Duration::from_secs(1);
        let mut a = Jitter::new("a", "i");
        let mut b = Jitter::new("b", "i");
        let xs: Vec<Duration> = (0..1000).map(|_| a.delay(interval)).collect();
        let ys: Vec<Duration> = (0..1000).map(|_| b.delay(interval)).collect();
        for d in xs.iter().chain(&ys) {
            assert!(
                (Duration::from_millis(900)..Duration::from_millis(1100)).contains(d),
                "{d:?}"
            );
        }
        assert_ne!(xs, ys);
        // Spread, not constant: both halves of the range are used.
        assert!(xs.iter().any(|d| *d < Duration::from_millis(950)));
        assert!(xs.iter().any(|d| *d > Duration::from_millis(1050)));
        // The same node and instance: the same sequence (deterministic per node).
        let mut a2 = Jitter::new("a", "i");
        assert_eq!(a2.delay(interval), xs[0]);
    }
}
