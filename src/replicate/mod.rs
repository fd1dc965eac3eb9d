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
//! 2. one round trip ([`wire`]): merge our totals with `max` per node and read every field back;
//! 3. merge the others' fields into the last known totals with `max` per node (a Redis that
//!    lost its data cannot lower them), raise the view and keep them in the store's `peers`
//!    tree, so a node restarted while Redis is down still enforces the fleet's spend;
//! 4. if Redis holds a larger total for *our* field than we do, this node's disk lost data:
//!    adopt it (view and journal), so the node does not count that spend again.
//!
//! While Redis is unreachable, rounds fail fast and reconnection backs off (up to
//! [`MAX_BACKOFF`]); nothing queues up — the next successful round ships the absolute totals.
//! A warning is logged when Redis becomes unreachable and an info line when it is back, not on
//! every failed round.

mod wire;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use jiff::Timestamp;
use redis::aio::MultiplexedConnection;
use rustc_hash::FxHashMap;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::{floor_secs, Clock};
use crate::config::RedisConfig;
use crate::journal::{DurableTotals, Event};
use crate::money::Money;
use crate::store::{PeersValue, Store, WindowKey};
use crate::view::View;
use crate::window::Window;

use wire::{window_key, SyncItem, Wire};

/// Longest wait between reconnection attempts while Redis is down.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Health of replication, shared with `status`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Health {
    pub last_sync: Option<Timestamp>,
    pub last_error: Option<String>,
    pub rounds: u64,
    pub round_trips: u64,
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

type Reply = crossbeam_channel::Sender<Result<(), String>>;

/// Handle owned by the limiter; stopping (or dropping) it runs a last round and joins.
#[derive(Debug)]
pub(crate) struct Replicator {
    health: Arc<Mutex<Health>>,
    requests: mpsc::UnboundedSender<Reply>,
    cancel: CancellationToken,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Replicator {
    pub fn start(parts: ReplicatorParts) -> std::io::Result<Replicator> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let health = Arc::new(Mutex::new(Health::default()));
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let worker = Worker::new(parts, Arc::clone(&health));
        let token = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("provider-budgets-replicator".into())
            .spawn(move || runtime.block_on(worker.run(rx, token)))?;
        Ok(Replicator {
            health,
            requests: tx,
            cancel,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs one round now and waits for its outcome (bounded by the connect and command
    /// timeouts).
    pub fn sync(&self) -> Result<(), String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.requests
            .send(tx)
            .map_err(|_| "replication is stopped".to_string())?;
        rx.recv()
            .unwrap_or_else(|_| Err("replication is stopped".to_string()))
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Runs a last round (best effort, bounded) and stops the thread.
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

/// Per (budget, window start): the window and every other node's last known total.
type Peers = FxHashMap<(u32, i64), (Window, FxHashMap<String, u64>)>;

struct Worker {
    parts: ReplicatorParts,
    health: Arc<Mutex<Health>>,
    wire: Wire,
    conn: Option<MultiplexedConnection>,
    peers: Peers,
    /// Reconnection backoff while Redis is down: next attempt not before this.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Whether the last round failed (to log transitions only).
    down: bool,
}

impl Worker {
    fn new(mut parts: ReplicatorParts, health: Arc<Mutex<Health>>) -> Worker {
        let mut peers = Peers::default();
        for (key, value) in std::mem::take(&mut parts.peers) {
            let Some(b) = parts.keys.position(&key.provider, &key.period) else {
                continue;
            };
            let window = crate::store::window_of(&key, value.end);
            let nodes = value
                .nodes
                .into_iter()
                .filter(|(n, _)| *n != parts.node_id)
                .collect();
            peers.insert((b, key.start), (window, nodes));
        }
        Worker {
            backoff: parts.redis.sync_interval,
            parts,
            health,
            wire: Wire::new(),
            conn: None,
            peers,
            retry_at: None,
            down: false,
        }
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
        // Last round: ship what the journal made durable before stopping (best effort).
        if !self.down {
            let _ = self.round().await;
        }
        while let Ok(reply) = requests.try_recv() {
            let _ = reply.send(Err("replication is stopped".into()));
        }
    }

    /// One sync round; records its outcome in `health`.
    async fn round(&mut self) -> Result<(), String> {
        let result = self.exchange().await;
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.round_trips = self.wire.round_trips();
        match &result {
            Ok(()) => {
                health.rounds += 1;
                health.last_sync = Some(self.parts.clock.now());
                health.last_error = None;
                metrics::counter!("provider_budgets_sync_rounds_total").increment(1);
                if self.down {
                    tracing::info!(url = %self.parts.redis.url, "redis reachable again; replication resumed");
                }
                self.down = false;
                self.retry_at = None;
                self.backoff = self.parts.redis.sync_interval;
            }
            Err(e) => {
                health.last_error = Some(e.clone());
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
        result
    }

    async fn exchange(&mut self) -> Result<(), String> {
        let now = floor_secs(self.parts.clock.now());
        let grace = i64::try_from(self.parts.redis.grace.as_secs()).unwrap_or(i64::MAX / 4);
        // Forget others' windows once their keys have expired in Redis too.
        self.peers
            .retain(|_, (w, _)| w.end_secs().saturating_add(grace) > now);
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
                Err((e, _)) => return Err(e),
            }
        };
        self.apply(&groups, replies)
    }

    /// One exchange on the current (or a new) connection. On failure, says whether the
    /// connection is dead (and drops it).
    async fn send(
        &mut self,
        groups: &Groups,
    ) -> Result<Vec<Vec<wire::NodeTotals>>, (String, bool)> {
        let conn = match self.conn.as_mut() {
            Some(c) => c,
            None => {
                let c = self.connect().await.map_err(|e| (e, false))?;
                self.conn.insert(c)
            }
        };
        let timeout = self.parts.redis.command_timeout;
        let sent = tokio::time::timeout(
            timeout,
            self.wire
                .sync_round(conn, &self.parts.node_id, &groups.items),
        )
        .await;
        match sent {
            Ok(Ok(replies)) => Ok(replies),
            Ok(Err(e)) => {
                let dead = e.is_connection_error();
                if dead {
                    self.conn = None;
                }
                Err((e.to_string(), dead))
            }
            Err(_) => {
                self.conn = None;
                Err((
                    format!(
                        "redis: no answer within {} ({})",
                        humantime::format_duration(timeout),
                        self.parts.redis.url
                    ),
                    false,
                ))
            }
        }
    }

    async fn connect(&self) -> Result<MultiplexedConnection, String> {
        let url = &self.parts.redis.url;
        let client = redis::Client::open(url.as_str())
            .map_err(|e| format!("redis: invalid URL {url:?}: {e}"))?;
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
            Ok(Err(e)) => Err(format!(
                "redis: cannot connect to {url}: {}",
                one_line(&e.to_string())
            )),
            Err(_) => Err(format!(
                "redis: cannot connect to {url}: no answer within {}",
                humantime::format_duration(self.parts.redis.connect_timeout)
            )),
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
        let items = windows
            .iter()
            .enumerate()
            .map(|(b, list)| {
                let (provider, period) = &keys[b];
                list.iter()
                    .map(|(w, own)| SyncItem {
                        key: window_key(prefix, provider, period, w.start_secs()),
                        own: *own,
                        expire_at: w.end_secs().saturating_add(grace),
                    })
                    .collect()
            })
            .collect();
        Groups { windows, items }
    }

    /// Merges a round's replies into the peers, the view, the store and (adoption) the journal.
    fn apply(
        &mut self,
        groups: &Groups,
        replies: Vec<Vec<wire::NodeTotals>>,
    ) -> Result<(), String> {
        let mut changed = Vec::new();
        let mut adopt = Vec::new();
        for (b, (windows, replies)) in groups.windows.iter().zip(replies).enumerate() {
            let b = b as u32;
            for (&(window, own), nodes) in windows.iter().zip(replies) {
                let entry = self
                    .peers
                    .entry((b, window.start_secs()))
                    .or_insert_with(|| (window, FxHashMap::default()));
                let mut grew = false;
                for (node, total) in nodes {
                    if node == self.parts.node_id {
                        if total > own {
                            adopt.push((b, window, total));
                        }
                        continue;
                    }
                    let known = entry.1.entry(node).or_insert(0);
                    if total > *known {
                        *known = total;
                        grew = true;
                    }
                }
                let others = entry.1.values().fold(0u64, |s, t| s.saturating_add(*t));
                self.parts
                    .view
                    .raise_others(b, window, Money::from_nanos(others));
                if grew {
                    changed.push((b, window.start_secs()));
                }
            }
        }
        for (b, window, total) in adopt {
            self.adopt(b, window, total);
        }
        self.persist(&changed);
        Ok(())
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
    fn persist(&self, changed: &[(u32, i64)]) {
        if changed.is_empty() {
            return;
        }
        let items: Vec<(WindowKey, PeersValue)> = changed
            .iter()
            .filter_map(|k| self.peers.get(k).map(|(w, nodes)| (k.0, *w, nodes)))
            .map(|(b, w, nodes)| {
                let (provider, period) = self.parts.keys.get(b);
                let mut nodes: Vec<(String, u64)> =
                    nodes.iter().map(|(n, t)| (n.clone(), *t)).collect();
                nodes.sort();
                (
                    WindowKey {
                        provider,
                        period,
                        start: w.start_secs(),
                    },
                    PeersValue {
                        end: w.end_secs(),
                        nodes,
                    },
                )
            })
            .collect();
        let written = self
            .parts
            .store
            .write_peers(items.iter().map(|(k, v)| (k, v)))
            .and_then(|()| self.parts.store.flush());
        if let Err(e) = written {
            tracing::warn!(error = %e, "could not keep the other nodes' spend in the data dir");
        }
    }
}

/// One round's request: per budget the windows (with our own totals) and their wire items.
struct Groups {
    windows: Vec<Vec<(Window, u64)>>,
    items: Vec<Vec<SyncItem>>,
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
