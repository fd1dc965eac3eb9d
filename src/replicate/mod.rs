//! Fleet replication: this node's durable own totals go to Redis, the other nodes' come back.
//!
//! Spend per (budget, window) is a G-counter: every node owns one field holding its absolute
//! total, which only grows; the fleet total is the sum of the fields. The replicator is one
//! thread running a current-thread tokio runtime (so embedders need no runtime of their own).
//! Every `sync_interval`, and on demand ([`Replicator::sync`]), it runs one round:
//!
//! 1. read the journal's [`DurableTotals`] (only what is fsynced is ever shipped, so a crash
//!    can never leave Redis ahead of the disk) and add, per budget, the current and previous
//!    windows read-only, so that an idle node still learns what the others spent;
//! 2. one round trip ([`wire`]): take or renew this node id's lease per budget, merge our
//!    totals with `max` and read every contribution back;
//! 3. merge the others' contributions into the last known ones with `max` per `(node,
//!    instance)` (a Redis that lost its data cannot lower them), raise the view and keep their
//!    sum per window in the store's `peers` tree, so a node restarted while Redis is down
//!    still enforces the fleet's spend. After a restart the stored sum is a floor:
//!    `others = max(floor, Σ contributions)`;
//! 4. if Redis holds a larger total for *our* field (same instance) than we do, this node's
//!    disk lost data: adopt it (view and journal), so the node does not count that spend again.
//!
//! **Faults** (see the README's failure model):
//!
//! * Redis unreachable: rounds fail fast and reconnection backs off (up to [`MAX_BACKOFF`]);
//!   nothing queues up — the next successful round ships the absolute totals. A warning is
//!   logged when Redis becomes unreachable and an info line when it is back.
//! * Duplicate node id: another live data dir holds the node id's lease. Decision: **refuse
//!   loudly**: the round does not write the node id's field, returns
//!   [`ReplicationError::DuplicateNodeId`], `status` shows it, the metric
//!   `provider_budgets_duplicate_node_id_total` counts it and one warning is logged per
//!   transition. And **never undercount**: our total is kept apart in Redis under our
//!   instance id (`~retired:{node}:{instance}`, a contribution only we write), so every node
//!   still counts it; once the other stops (it releases the lease) or its lease expires, we
//!   take the field over, keeping the other's total beside ours instead of max-merging it
//!   away. A restarting node (same data dir, same instance id) is never refused, even while
//!   its old lease is live.
//! * A bad field or key under one budget: skipped, reported for that budget only
//!   ([`Health::problems`]), logged once per distinct problem, counted in
//!   `provider_budgets_sync_problems_total`; the other budgets sync normally.
//! * Every error and log line carries the Redis URL redacted ([`crate::redact`]).

mod wire;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use jiff::Timestamp;
use redis::aio::MultiplexedConnection;
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::{floor_secs, Clock};
use crate::config::RedisConfig;
use crate::error::{Error, ReplicationError};
use crate::journal::{DurableTotals, Event};
use crate::money::Money;
use crate::redact::{redact_url, scrub};
use crate::store::{PeersValue, Store, WindowKey};
use crate::view::View;
use crate::window::Window;

use wire::{lease_key, window_key, Group, GroupOutcome, Identity, Lease, SyncItem, Wire};

/// Longest wait between reconnection attempts while Redis is down.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Most problems kept (and shown) per budget; the rest are counted.
const MAX_PROBLEMS_SHOWN: usize = 3;

/// Health of replication, shared with `status`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Health {
    pub last_sync: Option<Timestamp>,
    pub last_error: Option<String>,
    pub rounds: u64,
    pub round_trips: u64,
    /// Per budget index: the problems of its keys in the last round (one line), if any.
    pub problems: Vec<Option<String>>,
}

/// What the replicator needs from the limiter.
#[derive(Debug)]
pub(crate) struct ReplicatorParts {
    pub redis: RedisConfig,
    pub node_id: String,
    /// (provider, period) per budget index: the Redis key parts (grows on reload).
    pub keys: Arc<crate::reload::SlotKeys>,
    pub clock: Arc<dyn Clock>,
    pub view: Arc<View>,
    pub store: Arc<Store>,
    pub durable: Arc<DurableTotals>,
    pub journal: Sender<Event>,
    /// Other nodes' totals loaded from the `peers` tree at open.
    pub peers: Vec<(WindowKey, PeersValue)>,
}

type Reply = crossbeam_channel::Sender<Result<(), ReplicationError>>;

/// Checks that `url` is a Redis URL the client accepts (without connecting).
pub(crate) fn check_url(url: &str) -> Result<(), ReplicationError> {
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| ReplicationError::InvalidUrl {
            url: redact_url(url),
            reason: flat(&scrub(&e.to_string(), url)),
        })
}

/// How long a node id's lease lives without renewal: three sync intervals plus the time a
/// round may take, at least 1 s. Longer than the interval, so two live instances always see
/// each other's lease; short, so a crashed instance's lease frees quickly.
pub(crate) fn lease_ttl(redis: &RedisConfig) -> Duration {
    (redis.sync_interval.saturating_mul(3) + redis.connect_timeout + redis.command_timeout)
        .max(Duration::from_secs(1))
}

/// Handle owned by the limiter; stopping (or dropping) it runs a last round and joins.
#[derive(Debug)]
pub(crate) struct Replicator {
    health: Arc<Mutex<Health>>,
    requests: mpsc::UnboundedSender<Reply>,
    cancel: CancellationToken,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Replicator {
    /// Validates the URL, reads the data dir's instance id and starts the thread.
    pub fn start(parts: ReplicatorParts) -> Result<Replicator, Error> {
        check_url(&parts.redis.url)?;
        // A data dir that cannot store its instance id (a full disk at the first open of this
        // version) runs under a fresh one: a restart then looks like another data dir, which
        // waits for its own old lease to expire and keeps its old total beside the new one.
        let instance = parts.store.instance_id().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot keep this data dir's instance id; using a temporary one");
            crate::store::random_id()
        });
        let thread_error = |source| Error::Thread {
            what: "replicator",
            source,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(thread_error)?;
        let health = Arc::new(Mutex::new(Health {
            problems: vec![None; parts.keys.snapshot().len()],
            ..Health::default()
        }));
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let worker = Worker::new(parts, instance, Arc::clone(&health));
        let token = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("provider-budgets-replicator".into())
            .spawn(move || runtime.block_on(worker.run(rx, token)))
            .map_err(thread_error)?;
        Ok(Replicator {
            health,
            requests: tx,
            cancel,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs one round now and waits for its outcome (bounded by the connect and command
    /// timeouts).
    pub fn sync(&self) -> Result<(), ReplicationError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.requests
            .send(tx)
            .map_err(|_| ReplicationError::Stopped)?;
        rx.recv().unwrap_or(Err(ReplicationError::Stopped))
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs a last round (best effort, bounded; it releases the lease) and stops the thread.
    pub fn stop(&self) {
        self.cancel.cancel();
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Replicator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The others' last known spend in one window.
#[derive(Debug)]
struct PeerWindow {
    window: Window,
    /// The others' total loaded from the data dir at open: a floor until Redis says more.
    floor: u64,
    /// Per `(node, instance)` contribution: its largest total seen.
    owned: FxHashMap<(String, String), u64>,
    /// Fields without a recorded owner (written by an earlier version), per node.
    bare: FxHashMap<String, u64>,
    /// The total last written to the data dir.
    persisted: u64,
}

impl PeerWindow {
    fn others(&self) -> u64 {
        let sum = self
            .owned
            .values()
            .chain(self.bare.values())
            .fold(0u64, |s, t| s.saturating_add(*t));
        sum.max(self.floor)
    }
}

/// Per (budget, window start).
type Peers = FxHashMap<(u32, i64), PeerWindow>;

struct Worker {
    parts: ReplicatorParts,
    /// This data dir's instance id (the lease's value).
    instance: String,
    health: Arc<Mutex<Health>>,
    wire: Wire,
    conn: Option<MultiplexedConnection>,
    peers: Peers,
    /// Reconnection backoff while Redis is down: next attempt not before this.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Whether the last round failed to reach Redis (to log transitions only).
    down: bool,
    /// The instance holding our node id's lease while we are refused (to log transitions).
    refused: Option<String>,
    /// Problems already logged (one line per distinct problem, not per round).
    logged: FxHashSet<String>,
    /// Release the lease in the next round (the last one).
    release: bool,
}

impl Worker {
    fn new(mut parts: ReplicatorParts, instance: String, health: Arc<Mutex<Health>>) -> Worker {
        let mut peers = Peers::default();
        for (key, value) in std::mem::take(&mut parts.peers) {
            let Some(b) = parts.keys.position(&key.provider, &key.period) else {
                continue;
            };
            peers.insert(
                (b, key.start),
                PeerWindow {
                    window: crate::store::window_of(&key, value.end),
                    floor: value.others,
                    owned: FxHashMap::default(),
                    bare: FxHashMap::default(),
                    persisted: value.others,
                },
            );
        }
        Worker {
            backoff: parts.redis.sync_interval,
            parts,
            instance,
            health,
            wire: Wire::new(),
            conn: None,
            peers,
            retry_at: None,
            down: false,
            refused: None,
            logged: FxHashSet::default(),
            release: false,
        }
    }

    fn url(&self) -> String {
        redact_url(&self.parts.redis.url)
    }

    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<Reply>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.parts.redis.sync_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    if self.retry_at.is_none_or(|t| Instant::now() >= t) {
                        let _ = self.round().await;
                    }
                }
                Some(reply) = requests.recv() => {
                    let result = self.round().await;
                    let _ = reply.send(result);
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

    /// One sync round; records its outcome in `health`, metrics and logs.
    async fn round(&mut self) -> Result<(), ReplicationError> {
        let result = self.exchange().await;
        let shared = Arc::clone(&self.health);
        let mut health = shared.lock().unwrap_or_else(|p| p.into_inner());
        health.round_trips = self.wire.round_trips();
        match &result {
            Ok(problems) => {
                health.rounds += 1;
                health.last_sync = Some(self.parts.clock.now());
                health.last_error = None;
                metrics::counter!("provider_budgets_sync_rounds_total").increment(1);
                if self.down {
                    tracing::info!(url = %self.url(), "redis reachable again; replication resumed");
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
                self.report_problems(&mut health, problems);
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
                self.report_problems(&mut health, problems);
            }
            Err(RoundError::Failed(e)) => {
                health.last_error = Some(e.to_string());
                metrics::counter!("provider_budgets_sync_errors_total").increment(1);
                if self.down {
                    tracing::debug!(error = %e, "redis still unreachable");
                } else {
                    tracing::warn!(error = %e, "redis sync failed; enforcing own spend plus the last known spend of the others");
                }
                self.down = true;
                self.retry_at = Some(Instant::now() + self.backoff);
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
        if let Some(last) = health.last_sync {
            let lag = self.parts.clock.now().duration_since(last).as_secs_f64();
            metrics::gauge!("provider_budgets_sync_lag_seconds").set(lag);
        }
        result.map(drop).map_err(RoundError::into_error)
    }

    /// Publishes the per-budget problems of a round that reached Redis: status, metrics, and
    /// one log line per distinct problem (again only after it went away and came back).
    fn report_problems(&mut self, health: &mut Health, problems: &[Vec<String>]) {
        // A reload may have added budget slots since the last round.
        if health.problems.len() < problems.len() {
            health.problems.resize(problems.len(), None);
        }
        let mut current = FxHashSet::default();
        let mut budgets_with_problems = 0u64;
        for (b, list) in problems.iter().enumerate() {
            let (provider, period) = self.parts.keys.get(b as u32);
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

    async fn exchange(&mut self) -> Result<Vec<Vec<String>>, RoundError> {
        let now = floor_secs(self.parts.clock.now());
        let grace = i64::try_from(self.parts.redis.grace.as_secs()).unwrap_or(i64::MAX / 4);
        // Forget others' windows once their keys have expired in Redis too.
        self.peers
            .retain(|_, p| p.window.end_secs().saturating_add(grace) > now);
        let groups = self.groups(now, grace);
        // A connection kept from an earlier round may have died meanwhile (Redis restarted, a
        // link reset): then one fresh connection gets a second chance within the same round.
        let mut attempts = if self.conn.is_some() { 2 } else { 1 };
        let replies = loop {
            attempts -= 1;
            match self.send(&groups).await {
                Ok(replies) => break replies,
                Err((e, dead)) if dead && attempts > 0 => {
                    tracing::debug!(error = %e, "redis connection lost; reconnecting");
                }
                Err((e, _)) => return Err(RoundError::Failed(e)),
            }
        };
        self.apply(&groups, replies)
    }

    /// One exchange on the current (or a new) connection. On failure, says whether the
    /// connection is dead (and drops it).
    async fn send(
        &mut self,
        groups: &Groups,
    ) -> Result<Vec<GroupOutcome>, (ReplicationError, bool)> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => {
                let c = self.connect().await.map_err(|e| (e, false))?;
                self.conn.insert(c)
            }
        };
        let timeout = self.parts.redis.command_timeout;
        let lease_ms = u64::try_from(lease_ttl(&self.parts.redis).as_millis()).unwrap_or(u64::MAX);
        let id = Identity {
            node: &self.parts.node_id,
            instance: &self.instance,
            lease_ms,
            release: self.release,
        };
        let sent =
            tokio::time::timeout(timeout, self.wire.sync_round(conn, &id, &groups.wire)).await;
        match sent {
            Ok(Ok(replies)) => {
                // Every budget failed for a connection-level reason (a failover left us on a
                // read-only replica, the server is loading): treat the connection as dead.
                let all_failed = !replies.is_empty() && replies.iter().all(Result::is_err);
                if all_failed {
                    if let Some(Err(e)) = replies
                        .iter()
                        .find(|r| r.as_ref().is_err_and(|e| e.is_connection_error()))
                    {
                        self.conn = None;
                        return Err((self.protocol(&e.to_string()), true));
                    }
                }
                Ok(replies)
            }
            Ok(Err(e)) => {
                let dead = e.is_connection_error();
                if dead {
                    self.conn = None;
                }
                Err((self.protocol(&e.to_string()), dead))
            }
            Err(_) => {
                self.conn = None;
                Err((
                    ReplicationError::Timeout {
                        url: self.url(),
                        after: humantime::format_duration(timeout).to_string(),
                    },
                    false,
                ))
            }
        }
    }

    /// A lower layer's message, on one line and redacted.
    fn protocol(&self, message: &str) -> ReplicationError {
        ReplicationError::Protocol {
            message: flat(&scrub(message, &self.parts.redis.url)),
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, ReplicationError> {
        let url = &self.parts.redis.url;
        let client =
            redis::Client::open(url.as_str()).map_err(|e| ReplicationError::InvalidUrl {
                url: self.url(),
                reason: flat(&scrub(&e.to_string(), url)),
            })?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.parts.redis.connect_timeout))
            .set_response_timeout(Some(self.parts.redis.command_timeout));
        // The outer timeout also bounds DNS resolution, which the connection timeout may not.
        let bound = self.parts.redis.connect_timeout + Duration::from_millis(100);
        match tokio::time::timeout(
            bound,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(ReplicationError::Unreachable {
                url: self.url(),
                reason: flat(&scrub(&e.to_string(), url)),
            }),
            Err(_) => Err(ReplicationError::Timeout {
                url: self.url(),
                after: humantime::format_duration(self.parts.redis.connect_timeout).to_string(),
            }),
        }
    }

    /// The windows to merge, grouped per budget (one script call each).
    fn groups(&self, now: i64, grace: i64) -> Groups {
        let keys = self.parts.keys.snapshot();
        let n = keys.len();
        let mut windows: Vec<Vec<(Window, u64)>> = vec![Vec::new(); n];
        for (b, w, total) in self.parts.durable.snapshot() {
            // A slot added by a reload after `keys` was read waits for the next round.
            if let Some(list) = windows.get_mut(b as usize) {
                if w.end_secs().saturating_add(grace) > now {
                    list.push((w, total));
                }
            }
        }
        for (b, list) in windows.iter_mut().enumerate() {
            let schedule = self.parts.view.schedule(b as u32);
            let current = schedule.window_at_secs(now);
            let previous = schedule.window_at_secs(current.start_secs() - 1);
            for w in [current, previous] {
                if !list.iter().any(|(x, _)| *x == w) {
                    list.push((w, 0));
                }
            }
            list.sort_by_key(|(w, _)| std::cmp::Reverse(w.start_secs()));
        }
        let prefix = &self.parts.redis.prefix;
        let node = &self.parts.node_id;
        let wire = windows
            .iter()
            .enumerate()
            .map(|(b, list)| {
                let (provider, period) = &keys[b];
                Group {
                    lease: lease_key(prefix, provider, period, node),
                    items: list
                        .iter()
                        .map(|(w, own)| SyncItem {
                            key: window_key(prefix, provider, period, w.start_secs()),
                            own: *own,
                            expire_at: w.end_secs().saturating_add(grace),
                        })
                        .collect(),
                }
            })
            .collect();
        Groups { windows, wire }
    }

    /// Merges a round's replies into the peers, the view, the store and (adoption) the
    /// journal. Returns the problems per budget, or the duplicate node id error (after
    /// applying everything that was read).
    fn apply(
        &mut self,
        groups: &Groups,
        replies: Vec<GroupOutcome>,
    ) -> Result<Vec<Vec<String>>, RoundError> {
        let mut problems: Vec<Vec<String>> = vec![Vec::new(); groups.windows.len()];
        let mut changed = Vec::new();
        let mut adopt = Vec::new();
        let mut refused_by = None;
        let mut failed_groups = 0usize;
        let mut first_failure = None;
        let (mut keys, mut failed_keys) = (0usize, 0usize);
        let mut first_key_failure = None;
        let node = self.parts.node_id.clone();
        for (b, (windows, reply)) in groups.windows.iter().zip(replies).enumerate() {
            let reply = match reply {
                Ok(reply) => reply,
                Err(e) => {
                    let e = self.protocol(&e.to_string());
                    problems[b].push(e.to_string());
                    failed_groups += 1;
                    first_failure.get_or_insert(e);
                    continue;
                }
            };
            let held = match reply.lease {
                Lease::Held => true,
                Lease::Refused { holder } => {
                    refused_by.get_or_insert(holder);
                    false
                }
                Lease::Broken(e) => {
                    problems[b].push(format!(
                        "lease key {}: {} (this data dir's spend is kept apart under its instance id)",
                        groups.wire[b].lease,
                        flat(&e)
                    ));
                    false
                }
            };
            let b32 = b as u32;
            for (&(window, own), key) in windows.iter().zip(reply.keys) {
                keys += 1;
                let hash = match key {
                    Ok(hash) => hash,
                    Err(p) => {
                        let p = flat(&scrub(&p, &self.parts.redis.url));
                        first_key_failure.get_or_insert_with(|| p.clone());
                        failed_keys += 1;
                        problems[b].push(p);
                        continue;
                    }
                };
                problems[b].extend(hash.problems);
                let entry = self
                    .peers
                    .entry((b32, window.start_secs()))
                    .or_insert_with(|| PeerWindow {
                        window,
                        floor: 0,
                        owned: FxHashMap::default(),
                        bare: FxHashMap::default(),
                        persisted: 0,
                    });
                for c in hash.contributions {
                    if c.instance.is_some() && !entry.bare.is_empty() {
                        // An owner recorded for the field supersedes its ownerless reading.
                        entry.bare.remove(c.node.as_str());
                    }
                    if c.node == node {
                        let mine = match &c.instance {
                            Some(i) => *i == self.instance,
                            // Written before owners were recorded: ours when we hold the lease.
                            None => held,
                        };
                        if mine {
                            if c.total > own {
                                adopt.push((b32, window, c.total));
                            }
                            continue;
                        }
                    }
                    let known = match c.instance {
                        Some(instance) => entry.owned.entry((c.node, instance)).or_insert(0),
                        None => entry.bare.entry(c.node).or_insert(0),
                    };
                    *known = (*known).max(c.total);
                }
                let others = entry.others();
                self.parts
                    .view
                    .raise_others(b32, window, Money::from_nanos(others));
                if others > entry.persisted {
                    changed.push((b32, window.start_secs()));
                }
            }
        }
        for (b, window, total) in adopt {
            self.adopt(b, window, total);
        }
        self.persist(&changed);
        // Nothing at all synced (every budget or every key failed, e.g. Redis out of memory
        // or NOAUTH): that is a failed round, not a list of per-budget problems.
        if keys == failed_keys && (failed_groups > 0 || failed_keys > 0) {
            let e = first_failure.unwrap_or_else(|| ReplicationError::Protocol {
                message: first_key_failure.unwrap_or_default(),
            });
            return Err(RoundError::Failed(e));
        }
        match refused_by {
            Some(holder) => Err(RoundError::Duplicate {
                error: ReplicationError::DuplicateNodeId {
                    node_id: node,
                    holder,
                },
                problems,
            }),
            None => Ok(problems),
        }
    }

    /// This node's field in Redis is ahead of its disk: the data dir lost spend. Take it back.
    fn adopt(&self, budget: u32, window: Window, total: u64) {
        tracing::warn!(
            budget = %self.parts.keys.get(budget).0,
            window = %window.start(),
            total,
            "redis holds more own spend than the data dir; adopting it"
        );
        self.parts
            .view
            .raise_own(budget, window, Money::from_nanos(total));
        // A full channel only delays this to the next round, which sees the same difference.
        let _ = self.parts.journal.try_send(Event::Adopt {
            budget,
            window,
            total,
        });
    }

    /// Keeps the others' totals in the data dir. Failure only costs freshness after a restart.
    fn persist(&mut self, changed: &[(u32, i64)]) {
        if changed.is_empty() {
            return;
        }
        let items: Vec<(WindowKey, PeersValue)> = changed
            .iter()
            .filter_map(|k| self.peers.get(k).map(|p| (k.0, p.window, p.others())))
            .map(|(b, w, others)| {
                let (provider, period) = self.parts.keys.get(b);
                (
                    WindowKey {
                        provider,
                        period,
                        start: w.start_secs(),
                    },
                    PeersValue {
                        end: w.end_secs(),
                        others,
                    },
                )
            })
            .collect();
        let written = self
            .parts
            .store
            .write_peers(items.iter().map(|(k, v)| (k, v)))
            .and_then(|()| self.parts.store.flush());
        match written {
            Ok(()) => {
                for k in changed {
                    if let Some(p) = self.peers.get_mut(k) {
                        p.persisted = p.others();
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not keep the other nodes' spend in the data dir")
            }
        }
    }
}

/// How a round that did not fully succeed ended.
enum RoundError {
    /// Nothing (useful) came back: Redis down, timeout, every budget rejected.
    Failed(ReplicationError),
    /// Redis answered and the replies were applied, but another instance holds our lease.
    Duplicate {
        error: ReplicationError,
        problems: Vec<Vec<String>>,
    },
}

impl RoundError {
    fn into_error(self) -> ReplicationError {
        match self {
            RoundError::Failed(e) | RoundError::Duplicate { error: e, .. } => e,
        }
    }
}

/// One round's request: per budget the windows (with our own totals) and their wire groups.
struct Groups {
    windows: Vec<Vec<(Window, u64)>>,
    wire: Vec<Group>,
}

fn flat(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
