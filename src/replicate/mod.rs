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
//! * Every error and log line carries the Redis URL redacted ([`crate::model::text`]).

pub(crate) mod cluster;
mod tls;

/// A client with `seed`'s settings (TLS, auth, database) at another address: a cluster
/// master or a node named in a `MOVED`/`ASK` answer.
pub(crate) fn client_moved(
    seed: &redis::Client,
    host: &str,
    port: u16,
) -> redis::RedisResult<redis::Client> {
    let info = seed.get_connection_info().clone();
    let moved = match info.addr().clone() {
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure,
            tls_params,
        },
        _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    redis::Client::open(info.set_addr(moved))
}

/// A client for `url` with the TLS settings of `provider_budgets.redis.tls` (for other users
/// of Redis than the replicator, e.g. fleet-wide soft-limit claims).
pub(crate) fn client(
    url: &str,
    tls: &crate::config::RedisTls,
) -> redis::RedisResult<redis::Client> {
    tls::client(url, tls).map_err(|e| match e {
        tls::ClientError::Url(e) => e,
        tls::ClientError::Tls(e) => redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "unusable TLS settings",
            e.to_string(),
        )),
    })
}
pub(crate) mod alerts;
mod grants;
mod tracking;
pub(crate) mod wire;

pub(crate) use grants::GrantStatus;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use jiff::Timestamp;
use redis::aio::MultiplexedConnection;
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::RedisConfig;
use crate::durable::journal::{DurableTotals, Event};
use crate::durable::store::{AckedValue, GrantValue, PeersValue, Store, WindowKey};
use crate::error::{Error, ReplicationError};
use crate::limiter::status::RoundFigures;
use crate::model::clock::{floor_secs, Clock};
use crate::model::money::Money;
use crate::model::slots::SlotKeys;
use crate::model::text::{redact_url, scrub};
use crate::model::window::Window;
use crate::view::View;

use tracking::Tracker;
use wire::{
    lease_key, strict_key, window_key, Group, GroupOutcome, Identity, Lease, Mode, SyncItem, Wire,
    WireError,
};

/// Where rounds go.
enum Backend {
    /// One server (or a proxy): one pipeline per round.
    Single(Conn),
    /// A Redis Cluster: one pipeline per master per round, concurrently.
    Cluster(Cluster),
}

/// One replication connection and what it can vouch for (see [`tracking`]).
#[derive(Clone)]
struct Conn {
    conn: MultiplexedConnection,
    /// Ours, one per connection opened ([`Tracker::connection`]): fresh marks count only on
    /// the connection they were made on.
    epoch: u64,
    /// Send the tracking prelude: a RESP3 connection whose server has not refused tracking.
    track: bool,
    /// `CLIENT ID` at the last round (another one later means another server connection).
    client_id: Option<i64>,
}

/// What one connection's round says about its tracking.
#[derive(Debug, Default)]
struct Verdict {
    /// The server refused tracking (why).
    refused: Option<String>,
    /// The connection's earlier marks cannot be trusted (another client id, tracking off).
    lost: bool,
}

/// A Redis Cluster's slot map and the connections to its masters.
struct Cluster {
    map: cluster::SlotMap,
    conns: FxHashMap<cluster::Addr, Conn>,
    /// Read the slot map again before the next exchange (a redirect, a failed master).
    stale: bool,
}

fn shard_name(addr: &cluster::Addr) -> String {
    format!("{}:{}", addr.0, addr.1)
}

/// Longest wait between reconnection attempts while Redis is down.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Sync intervals for which a tracked read vouches for its key without an invalidation (see
/// [`tracking`], "Safety net").
const TRACKED_FOR: u32 = 60;

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
    /// The last round that reached Redis.
    pub last_round: RoundFigures,
    /// Rounds that started later than planned because the previous one ran past the interval.
    pub late_rounds: u64,
    /// Per budget index: this node's grant of a strict budget's current window and the
    /// fleet's granted total, as of the last round.
    pub grants: Vec<Option<GrantStatus>>,
    /// Redis tracks our clean reads (client-side caching, see [`tracking`]) on every
    /// connection of the last round; `false` before the first round and on servers that
    /// refuse it.
    pub tracking: bool,
}

/// What the replicator needs from the limiter.
#[derive(Debug)]
pub(crate) struct ReplicatorParts {
    pub redis: RedisConfig,
    pub node_id: String,
    /// (provider, period) per budget index: the Redis key parts (grows on reload).
    pub keys: Arc<crate::model::slots::SlotKeys>,
    pub clock: Arc<dyn Clock>,
    pub view: Arc<View>,
    pub store: Arc<Store>,
    pub durable: Arc<DurableTotals>,
    pub journal: Sender<Event>,
    /// Other nodes' totals loaded from the `peers` tree at open.
    pub peers: Vec<(WindowKey, PeersValue)>,
    /// This node's durable grants (the `grants` tree) loaded at open.
    pub grants: Vec<(WindowKey, GrantValue)>,
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

/// Checks every configured URL (with the TLS settings: a CA file must be readable) without
/// connecting.
fn check_config(redis: &RedisConfig) -> Result<(), ReplicationError> {
    for url in std::iter::once(&redis.url).chain(&redis.seeds) {
        check_url(url)?;
        if let Err(tls::ClientError::Tls(e)) = tls::client(url, &redis.tls) {
            return Err(e);
        }
    }
    Ok(())
}

/// How long a node id's lease lives without renewal: three sync intervals plus the time a
/// round may take, at least 1 s. Longer than the interval, so two live instances always see
/// each other's lease; short, so a crashed instance's lease frees quickly.
pub(crate) fn lease_ttl(redis: &RedisConfig) -> Duration {
    (redis.sync_interval.saturating_mul(3) + redis.connect_timeout + redis.command_timeout)
        .max(Duration::from_secs(1))
}

/// How long a clean budget's renewal (`PEXPIRE` of a plain read round) makes the lease live:
/// 30 sync intervals plus the time a round may take. It is renewed when a third of it has
/// passed, so a clean budget costs a `PEXPIRE` about every 10 rounds instead of every other
/// round. Decision: the price is that a node that crashes while its budgets are clean keeps
/// another data dir from taking its node id over for up to this long (that one is refused
/// loudly meanwhile, its spend kept apart and counted: nothing lost or doubled); a clean stop
/// releases the leases at once, and a restart of the same data dir is never refused. The
/// script (every write) sets [`lease_ttl`] again.
pub(crate) fn read_lease_ttl(redis: &RedisConfig) -> Duration {
    (redis.sync_interval.saturating_mul(30) + redis.connect_timeout + redis.command_timeout)
        .max(Duration::from_secs(1))
}

/// Out-of-cycle rounds asked for by the request path (a reservation refused by its grant
/// alone). Wakes coalesce: however many threads ask at once, one round serves them all.
#[derive(Debug, Default)]
pub(crate) struct Wake {
    notify: tokio::sync::Notify,
    /// (rounds started, rounds finished): a waiter waits for a round that *started* after it
    /// asked (an earlier one may have planned its asks before the refusal was noted).
    counts: Mutex<(u64, u64)>,
    done: std::sync::Condvar,
    /// Async waiters: the round they wait for, and the sender (taken by the first of the
    /// round's end or the waiter's timer).
    waiters: Mutex<Vec<(u64, AsyncWaiter)>>,
}

/// One async waiter's answer, sent once.
type AsyncWaiter = Arc<Mutex<Option<tokio::sync::oneshot::Sender<bool>>>>;

impl Wake {
    fn started(&self) {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
    }

    fn finished(&self) {
        let done = {
            let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            c.1 = c.0;
            self.done.notify_all();
            c.1
        };
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters.retain(|(target, tx)| {
            let mut tx = tx.lock().unwrap_or_else(|p| p.into_inner());
            if *target <= done {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(true);
                }
            }
            tx.is_some()
        });
    }
}

/// How long after a strict budget's marker was (re)created no grant is raised: three sync
/// intervals, in which every live holder re-registers its durable grant (see
/// `docs/strict-budgets.md`, "Redis loses its data").
pub(crate) fn guard(redis: &RedisConfig) -> Duration {
    redis.sync_interval.saturating_mul(3)
}

/// Handle owned by the limiter; stopping (or dropping) it runs a last round and joins.
#[derive(Debug)]
pub(crate) struct Replicator {
    wake: Arc<Wake>,
    /// The replicator's runtime, for the timers of async grant waits (the caller's runtime
    /// may not be tokio).
    timers: tokio::runtime::Handle,
    health: Arc<Mutex<Health>>,
    requests: mpsc::UnboundedSender<Reply>,
    cancel: CancellationToken,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Replicator {
    /// Validates the URL, reads the data dir's instance id and starts the thread.
    pub fn start(parts: ReplicatorParts) -> Result<Replicator, Error> {
        check_config(&parts.redis)?;
        // A data dir that cannot store its instance id (a full disk at the first open of this
        // version) runs under a fresh one: a restart then looks like another data dir, which
        // waits for its own old lease to expire and keeps its old total beside the new one.
        let instance = parts.store.instance_id().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot keep this data dir's instance id; using a temporary one");
            crate::durable::store::random_id()
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
        let wake = Arc::new(Wake::default());
        let worker = Worker::new(parts, instance, Arc::clone(&health), Arc::clone(&wake));
        let timers = runtime.handle().clone();
        let token = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("provider-budgets-replicator".into())
            .spawn(move || runtime.block_on(worker.run(rx, token)))
            .map_err(thread_error)?;
        Ok(Replicator {
            wake,
            timers,
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

    /// Asks for an out-of-cycle round (a strict budget's reservation was refused by this
    /// node's grant: the round asks the fleet for more) and waits up to `wait` for a round that
    /// started after the ask to finish. `true` when one did (then a retry sees its grant).
    pub fn grant_round(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut c = self.wake.counts.lock().unwrap_or_else(|p| p.into_inner());
        let target = c.0 + 1;
        self.wake.notify.notify_one();
        while c.1 < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            c = self
                .wake
                .done
                .wait_timeout(c, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// [`Replicator::grant_round`] for async callers: never blocks; the answer comes from the
    /// end of the round or from a timer on the replicator's own runtime, whichever is first
    /// (a stopped replicator answers `false`).
    pub fn grant_round_async(&self, wait: Duration) -> impl std::future::Future<Output = bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx: AsyncWaiter = Arc::new(Mutex::new(Some(tx)));
        {
            let c = self.wake.counts.lock().unwrap_or_else(|p| p.into_inner());
            self.wake
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((c.0 + 1, Arc::clone(&tx)));
        }
        self.wake.notify.notify_one();
        self.timers.spawn(async move {
            tokio::time::sleep(wait).await;
            if let Some(tx) = tx.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = tx.send(false);
            }
        });
        async move { rx.await.unwrap_or(false) }
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
    /// The others' total: the largest `~total - ours` seen (a Redis that lost data cannot
    /// lower it), at least what the data dir held at open.
    others: u64,
    /// The total last written to the data dir.
    persisted: u64,
}

/// What Redis acknowledged of our own total in one window (durable in the `acked` tree).
#[derive(Debug, Clone, Copy)]
struct Acked {
    window: Window,
    total: u64,
    /// Written to the data dir.
    stored: bool,
}

/// Per (budget, window start).
type Peers = FxHashMap<(u32, i64), PeerWindow>;

struct Worker {
    parts: ReplicatorParts,
    /// This data dir's instance id (the lease's value).
    instance: String,
    health: Arc<Mutex<Health>>,
    wire: Wire,
    /// The connection (or, on a cluster, the slot map and one connection per master).
    backend: Option<Backend>,
    peers: Peers,
    /// Per (budget, window start): our total as Redis last acknowledged it.
    acked: FxHashMap<(u32, i64), Acked>,
    /// Acked entries to remove from the data dir (their windows are over).
    acked_gone: Vec<WindowKey>,
    /// The next round recomputes every touched key's total server side (the first round
    /// of a process: repairs totals that nodes of the previous wire left behind).
    verify: bool,
    /// Keys written and read by the last exchange.
    sent: (u64, u64),
    /// Per budget index: whether the last reply said this instance holds the lease (then
    /// clean rounds renew it with a plain `PEXPIRE`).
    lease_ours: Vec<bool>,
    /// Budgets whose next round must run the script (see [`Mode`]).
    script_next: FxHashSet<u32>,
    /// Per budget index: when (the start of the round that did it) and for how long this
    /// instance last set its lease; a clean round renews it once a third has passed.
    lease_set: Vec<Option<(Instant, Duration)>>,
    /// The start of the current round.
    round_started: Instant,
    /// Which clean window keys Redis tracks for us, unchanged (see [`tracking`]).
    tracker: Tracker,
    /// Redis dropped its data set during the round (a flush invalidation): see
    /// [`Worker::on_flush`].
    flushed: bool,
    /// Clean window keys not read in the round (known unchanged).
    unchanged: u64,
    /// Per budget, other instances found recorded as the writer of our node's field
    /// (`~owner:{node}`) by a script round that held the lease: old writes (a data dir that
    /// used the node id before), not a live duplicate. A clean read that finds any other
    /// owner sends the budget through the script (its lease check), instead of a `GET` of
    /// the lease per clean budget per round.
    foreign_owners: FxHashMap<u32, Vec<String>>,
    /// Reconnection backoff while Redis is down: next attempt not before this.
    retry_at: Option<Instant>,
    /// The last out-of-cycle round run while backing off.
    woken_at: Option<Instant>,
    backoff: Duration,
    /// Whether the last round failed to reach Redis (to log transitions only).
    down: bool,
    /// The instance holding our node id's lease while we are refused (to log transitions).
    refused: Option<String>,
    /// Problems already logged (one line per distinct problem, not per round).
    logged: FxHashSet<String>,
    /// Release the lease in the next round (the last one).
    release: bool,
    /// This node's grants of strict budgets.
    book: grants::Book,
    wake: Arc<Wake>,
}

/// The data-dir key of budget `b`'s window starting at `start` (Unix seconds).
pub(crate) fn store_key(keys: &SlotKeys, b: u32, start: i64) -> WindowKey {
    WindowKey::of(&keys.get(b), start)
}

impl Worker {
    fn new(
        mut parts: ReplicatorParts,
        instance: String,
        health: Arc<Mutex<Health>>,
        wake: Arc<Wake>,
    ) -> Worker {
        let book = grants::Book::load(&parts.keys, std::mem::take(&mut parts.grants));
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

    fn url(&self) -> String {
        redact_url(&self.parts.redis.url)
    }

    async fn run(
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
                    let result = self.round().await;
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

    /// One sync round; records its outcome in `health`, metrics and logs.
    async fn round(&mut self) -> Result<(), ReplicationError> {
        self.wake.started();
        let result = self.round_inner().await;
        self.wake.finished();
        result
    }

    async fn round_inner(&mut self) -> Result<(), ReplicationError> {
        let started = Instant::now();
        let (out0, in0) = self.wire.traffic();
        self.sent = (0, 0);
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
                bytes_out: out1 - out0,
                bytes_in: in1 - in0,
            };
        }
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

    async fn exchange(&mut self) -> Result<Vec<Vec<String>>, RoundError> {
        self.round_started = Instant::now();
        self.unchanged = 0;
        // Invalidations received since the last round, before anything is planned.
        if self.tracker.drain() {
            self.on_flush();
        }
        let now = floor_secs(self.parts.clock.now());
        let grace = i64::try_from(self.parts.redis.grace.as_secs()).unwrap_or(i64::MAX / 4);
        // Forget others' windows once their keys have expired in Redis too.
        self.peers
            .retain(|_, p| p.window.end_secs().saturating_add(grace) > now);
        self.forget_acked(now, grace);
        self.book.prune(&self.parts.keys, now);
        let mut groups = self.groups(now, grace);
        // Marks of keys no longer synced (windows over) go.
        {
            let live: FxHashSet<&str> = groups
                .wire
                .iter()
                .flat_map(|g| g.items.iter().map(|x| x.key.as_str()))
                .collect();
            self.tracker.retain(|k| live.contains(k));
        }
        // A connection kept from an earlier round may have died meanwhile (Redis restarted, a
        // link reset): then one fresh connection gets a second chance within the same round.
        let mut attempts = if self.backend.is_some() { 2 } else { 1 };
        let replies = loop {
            attempts -= 1;
            match self.send(&mut groups).await {
                Ok(replies) => break replies,
                Err((e, dead)) if dead && attempts > 0 => {
                    tracing::debug!(error = %e, "redis connection lost; reconnecting");
                }
                Err((e, _)) => return Err(RoundError::Failed(e)),
            }
        };
        let applied = self.apply(&groups, replies);
        // After the replies (a renewal they made may predate the flush).
        if std::mem::take(&mut self.flushed) {
            self.on_flush();
        }
        self.verify = false;
        applied
    }

    /// Redis dropped its whole data set (an invalidation without keys): every clean key is
    /// read again (the tracker dropped its marks), so the reads find our fields gone and the
    /// windows dirty, as without tracking; and every lease is renewed at the next clean round
    /// (whose `PEXPIRE` then finds it gone: the script takes it again).
    ///
    /// Decision: the windows are not made dirty at once. That would save one round only when
    /// the invalidation reached us before the round started (a race with the network), while
    /// the reads heal deterministically one round later, exactly as a Redis restart does.
    fn on_flush(&mut self) {
        tracing::debug!(url = %self.url(), "redis dropped its data set; reading every window again");
        self.lease_set.clear();
    }

    /// Drops the acknowledgements of windows whose keys have expired in Redis (memory and
    /// data dir).
    fn forget_acked(&mut self, now: i64, grace: i64) {
        let keys = &self.parts.keys;
        let gone = &mut self.acked_gone;
        self.acked.retain(|&(b, start), a| {
            let live = a.window.end_secs().saturating_add(grace) > now;
            if !live && a.stored {
                gone.push(store_key(keys, b, start));
            }
            live
        });
    }

    /// The identity of this round's script calls.
    fn identity(&self) -> Identity<'_> {
        Identity {
            node: &self.parts.node_id,
            instance: &self.instance,
            lease_ms: u64::try_from(lease_ttl(&self.parts.redis).as_millis()).unwrap_or(u64::MAX),
            read_lease_ms: u64::try_from(read_lease_ttl(&self.parts.redis).as_millis())
                .unwrap_or(u64::MAX),
            release: self.release,
            verify: self.verify,
            guard_ms: u64::try_from(guard(&self.parts.redis).as_millis()).unwrap_or(u64::MAX),
            grant_lease_ms: self
                .parts
                .redis
                .grant_lease
                .map_or(0, |l| u64::try_from(l.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// One exchange on the current (or a new) connection. On failure, says whether the
    /// connection is dead (and drops it).
    async fn send(
        &mut self,
        groups: &mut Groups,
    ) -> Result<Vec<GroupOutcome>, (ReplicationError, bool)> {
        if self.backend.is_none() {
            let backend = self.establish().await.map_err(|e| (e, false))?;
            self.backend = Some(backend);
        }
        if matches!(self.backend, Some(Backend::Cluster(_))) {
            if let Some(Backend::Cluster(mut cluster)) = self.backend.take() {
                let sent = self.send_cluster(&mut cluster, groups).await;
                self.backend = Some(Backend::Cluster(cluster));
                return sent.map_err(|e| (e, false));
            }
        }
        let Some(Backend::Single(mut conn)) = self.backend.take() else {
            return Err((self.protocol("no redis connection"), false));
        };
        let timeout = self.parts.redis.command_timeout;
        set_skips(&self.tracker, &conn, &mut groups.wire);
        let id = self.identity();
        let sent = tokio::time::timeout(
            timeout,
            round_on(&self.wire, &mut conn, &id, &mut groups.wire),
        )
        .await;
        match sent {
            Ok(Ok((replies, verdict))) => {
                // Every budget failed for a connection-level reason (a failover left us on a
                // read-only replica, the server is loading): treat the connection as dead.
                let all_failed = !replies.is_empty() && replies.iter().all(Result::is_err);
                if all_failed {
                    if let Some(Err(e)) = replies
                        .iter()
                        .find(|r| r.as_ref().is_err_and(|e| e.is_connection_error()))
                    {
                        return Err((self.protocol(&e.to_string()), true));
                    }
                }
                let mut replies = replies;
                let label = self.url();
                let settled = self
                    .settle(&mut conn, &mut groups.wire, &mut replies, verdict, &label)
                    .await;
                if let Err(e) = settled {
                    let dead = e.is_connection_error();
                    if !dead {
                        self.backend = Some(Backend::Single(conn));
                    }
                    return Err((self.protocol(&e.to_string()), dead));
                }
                self.tracker.set_on(conn.track);
                self.backend = Some(Backend::Single(conn));
                Ok(replies)
            }
            Ok(Err(e)) => {
                let dead = e.is_connection_error();
                if !dead {
                    self.backend = Some(Backend::Single(conn));
                }
                Err((self.protocol(&e.to_string()), dead))
            }
            Err(_) => Err((
                ReplicationError::Timeout {
                    url: self.url(),
                    after: humantime::format_duration(timeout).to_string(),
                },
                false,
            )),
        }
    }

    /// A cluster round: per master one pipeline, all concurrently; a master that fails fails
    /// only the budgets it serves. Budgets answered with `MOVED`/`ASK` or whose master failed
    /// are sent once more within the round, after the slot map is refreshed (a failover, a
    /// resharding). Fails as a whole only when no slot map can be read.
    async fn send_cluster(
        &mut self,
        cluster: &mut Cluster,
        groups: &Groups,
    ) -> Result<Vec<GroupOutcome>, ReplicationError> {
        let n = groups.wire.len();
        let mut all_tracked = true;
        let mut results: Vec<Option<GroupOutcome>> = (0..n).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..n).collect();
        let timeout = self.parts.redis.command_timeout;
        for pass in 0..2 {
            if cluster.stale || pass == 1 {
                self.refresh(cluster).await?;
            }
            let mut by_master: FxHashMap<cluster::Addr, Vec<usize>> = FxHashMap::default();
            for i in pending.drain(..) {
                let slot = cluster::key_slot(&groups.wire[i].lease);
                match cluster.map.master(slot) {
                    Some(addr) => by_master.entry(addr.clone()).or_default().push(i),
                    None => {
                        results[i] = Some(Err(WireError::Shard {
                            shard: format!("slot {slot}"),
                            message: "no master serves this slot (the cluster is incomplete)"
                                .into(),
                        }))
                    }
                }
            }
            let mut calls = Vec::new();
            for (addr, members) in by_master {
                let conn = match cluster.conns.get(&addr) {
                    Some(c) => Ok(c.clone()),
                    None => match self.client_at(&addr) {
                        Ok(client) => self.connect_client(&client, &shard_name(&addr)).await,
                        Err(e) => Err(e),
                    },
                };
                match conn {
                    Ok(c) => {
                        cluster.conns.insert(addr.clone(), c.clone());
                        let mut sub: Vec<Group> =
                            members.iter().map(|&i| groups.wire[i].clone()).collect();
                        set_skips(&self.tracker, &c, &mut sub);
                        calls.push((addr, members, c, sub));
                    }
                    Err(e) => {
                        cluster.stale = true;
                        for &i in &members {
                            if pass == 0 {
                                pending.push(i);
                            } else {
                                results[i] = Some(Err(WireError::Shard {
                                    shard: shard_name(&addr),
                                    message: e.to_string(),
                                }));
                            }
                        }
                    }
                }
            }
            let id = self.identity();
            let wire = &self.wire;
            let outcomes = futures_util::future::join_all(calls.into_iter().map(
                |(addr, members, mut conn, mut sub)| {
                    let id = &id;
                    async move {
                        let r =
                            tokio::time::timeout(timeout, round_on(wire, &mut conn, id, &mut sub))
                                .await;
                        (addr, members, conn, sub, r)
                    }
                },
            ))
            .await;
            for (addr, members, mut conn, mut sub, outcome) in outcomes {
                let outcome = match outcome {
                    Ok(Ok((mut replies, verdict))) => {
                        let label = shard_name(&addr);
                        self.settle(&mut conn, &mut sub, &mut replies, verdict, &label)
                            .await
                            .map(|()| replies)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(WireError::Shard {
                        shard: shard_name(&addr),
                        message: format!("timed out after {}", humantime::format_duration(timeout)),
                    }),
                };
                let failure = match outcome {
                    Ok(replies) => {
                        all_tracked &= conn.track;
                        cluster.conns.insert(addr.clone(), conn);
                        for (i, reply) in members.into_iter().zip(replies) {
                            let redirected = matches!(&reply, Err(e) if e.is_redirect());
                            if redirected {
                                cluster.stale = true;
                            }
                            if redirected && pass == 0 {
                                pending.push(i);
                            } else {
                                results[i] = Some(reply);
                            }
                        }
                        continue;
                    }
                    Err(WireError::Shard { message, .. }) => message,
                    Err(e) => e.to_string(),
                };
                cluster.conns.remove(&addr);
                cluster.stale = true;
                for i in members {
                    if pass == 0 {
                        pending.push(i);
                    } else {
                        results[i] = Some(Err(WireError::Shard {
                            shard: shard_name(&addr),
                            message: failure.clone(),
                        }));
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        self.tracker.set_on(all_tracked);
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(WireError::Shard {
                        shard: "cluster".into(),
                        message: "no reply".into(),
                    })
                })
            })
            .collect())
    }

    /// Reads the slot map again from any reachable master, else from any seed.
    async fn refresh(&self, cluster: &mut Cluster) -> Result<(), ReplicationError> {
        let mut last = None;
        let known: Vec<(cluster::Addr, MultiplexedConnection)> = cluster
            .conns
            .iter()
            .map(|(a, c)| (a.clone(), c.conn.clone()))
            .collect();
        for (addr, mut conn) in known {
            match cluster::slot_map(&mut conn, &addr.0).await {
                Ok(map) if !map.masters().is_empty() => {
                    cluster.map = map;
                    cluster.stale = false;
                    return Ok(());
                }
                Ok(_) => last = Some("the cluster serves no slot".to_owned()),
                Err(e) => {
                    cluster.conns.remove(&addr);
                    last = Some(e);
                }
            }
        }
        for url in self.urls() {
            let attempt = async {
                let client = self.client(url)?;
                let mut conn = self.connect_client(&client, &redact_url(url)).await?.conn;
                let host = match client.get_connection_info().addr() {
                    redis::ConnectionAddr::Tcp(h, _)
                    | redis::ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
                    redis::ConnectionAddr::Unix(_) => String::new(),
                    _ => String::new(),
                };
                cluster::slot_map(&mut conn, &host)
                    .await
                    .map_err(|e| self.protocol(&e))
            };
            match attempt.await {
                Ok(map) if !map.masters().is_empty() => {
                    cluster.map = map;
                    cluster.stale = false;
                    return Ok(());
                }
                Ok(_) => last = Some("the cluster serves no slot".to_owned()),
                Err(e) => last = Some(e.to_string()),
            }
        }
        Err(self.protocol(&format!(
            "cannot read the cluster's slot map: {}",
            last.unwrap_or_default()
        )))
    }

    /// The configured URL, then the further seeds.
    fn urls(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.parts.redis.url).chain(self.parts.redis.seeds.iter())
    }

    /// Connects to the first reachable configured URL and finds out whether it is a cluster.
    async fn establish(&self) -> Result<Backend, ReplicationError> {
        let mut first_error = None;
        for url in self.urls() {
            let client = self.client(url)?;
            match self.connect_client(&client, &redact_url(url)).await {
                Ok(mut conn) => {
                    let timeout = self.parts.redis.command_timeout;
                    let detected =
                        tokio::time::timeout(timeout, cluster::is_cluster(&mut conn.conn)).await;
                    return match detected {
                        Ok(Ok(false)) => Ok(Backend::Single(conn)),
                        Ok(Ok(true)) => {
                            let mut cluster = Cluster {
                                map: cluster::SlotMap::default(),
                                conns: FxHashMap::default(),
                                stale: true,
                            };
                            self.refresh(&mut cluster).await?;
                            Ok(Backend::Cluster(cluster))
                        }
                        Ok(Err(e)) => Err(ReplicationError::Unreachable {
                            url: redact_url(url),
                            reason: flat(&self.protocol(&e.to_string()).to_string()),
                        }),
                        Err(_) => Err(ReplicationError::Timeout {
                            url: redact_url(url),
                            after: humantime::format_duration(timeout).to_string(),
                        }),
                    };
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(ReplicationError::Stopped))
    }

    /// A lower layer's message, on one line and redacted.
    fn protocol(&self, message: &str) -> ReplicationError {
        let mut message = scrub(message, &self.parts.redis.url);
        for seed in &self.parts.redis.seeds {
            message = scrub(&message, seed);
        }
        ReplicationError::Protocol {
            message: flat(&message),
        }
    }

    /// A client for one configured URL, with the TLS settings.
    fn client(&self, url: &str) -> Result<redis::Client, ReplicationError> {
        let invalid = |e: &dyn std::fmt::Display| ReplicationError::InvalidUrl {
            url: redact_url(url),
            reason: flat(&scrub(&e.to_string(), url)),
        };
        tls::client(url, &self.parts.redis.tls).map_err(|e| match e {
            tls::ClientError::Url(e) => invalid(&e),
            tls::ClientError::Tls(e) => e,
        })
    }

    /// A client for a cluster master: the first URL's settings at another address.
    fn client_at(&self, addr: &cluster::Addr) -> Result<redis::Client, ReplicationError> {
        let seed = self.client(&self.parts.redis.url)?;
        client_moved(&seed, &addr.0, addr.1).map_err(|e| self.protocol(&e.to_string()))
    }

    /// Connects in RESP3 with a push sender (for tracking invalidations, see [`tracking`]);
    /// when the server answers but refuses that (`HELLO 3`: Redis < 6, some proxies), in
    /// RESP2 without tracking.
    async fn connect_client(
        &self,
        client: &redis::Client,
        label: &str,
    ) -> Result<Conn, ReplicationError> {
        let (epoch, pushes) = self.tracker.connection();
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let tracked = redis::Client::open(info.set_redis_settings(resp3))
            .map_err(|e| self.protocol(&e.to_string()))?;
        match self
            .open(&tracked, self.conn_config().set_push_sender(pushes), label)
            .await
        {
            Ok(conn) => Ok(Conn {
                conn,
                epoch,
                track: true,
                client_id: None,
            }),
            Err((_, Some(refusal))) => {
                let conn = self
                    .open(client, self.conn_config(), label)
                    .await
                    .map_err(|(e, _)| e)?;
                self.tracker.refused(label, &flat(&refusal));
                Ok(Conn {
                    conn,
                    epoch,
                    track: false,
                    client_id: None,
                })
            }
            Err((e, None)) => Err(e),
        }
    }

    fn conn_config(&self) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.parts.redis.connect_timeout))
            .set_response_timeout(Some(self.parts.redis.command_timeout))
    }

    /// Opens one connection. On failure, also the server's answer when there was one (it
    /// refused something: worth another try without RESP3), as opposed to no server at all.
    async fn open(
        &self,
        client: &redis::Client,
        config: redis::AsyncConnectionConfig,
        label: &str,
    ) -> Result<MultiplexedConnection, (ReplicationError, Option<String>)> {
        // The outer timeout also bounds DNS resolution, which the connection timeout may not.
        let bound = self.parts.redis.connect_timeout + Duration::from_millis(100);
        match tokio::time::timeout(
            bound,
            client.get_multiplexed_async_connection_with_config(&config),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => {
                let answered = !(e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_refusal()
                    || e.is_connection_dropped());
                let message = self.protocol(&e.to_string()).to_string();
                Err((
                    ReplicationError::Unreachable {
                        url: label.to_owned(),
                        reason: tls::explain(&message),
                    },
                    answered.then_some(message),
                ))
            }
            Err(_) => Err((
                ReplicationError::Timeout {
                    url: label.to_owned(),
                    after: humantime::format_duration(self.parts.redis.connect_timeout).to_string(),
                },
                None,
            )),
        }
    }

    /// After one connection's round: drops the marks it cannot vouch for, marks the keys it
    /// read with tracking on and unmarks the others (written by the script, failed, in need
    /// of the script), then applies the invalidations that came with the replies: they win
    /// over the marks just made (see [`tracking`], "Ordering"), and a skipped key among them
    /// (changed before Redis ran our pipeline, its invalidation still on the way when the
    /// round was planned) is read in a second round trip, so that a round sees every change
    /// Redis made before it, as without tracking.
    async fn settle(
        &mut self,
        conn: &mut Conn,
        groups: &mut [Group],
        replies: &mut [GroupOutcome],
        verdict: Verdict,
        label: &str,
    ) -> Result<(), WireError> {
        if verdict.lost {
            self.tracker.forget_epoch(conn.epoch);
        }
        if let Some(reason) = verdict.refused {
            self.tracker.refused(label, &reason);
        }
        self.mark(conn, groups, replies, None);
        if self.tracker.drain() {
            self.flushed = true;
        }
        let raced: Vec<(usize, usize)> = positions(groups, |x| {
            x.skip && !self.tracker.is_marked(&x.key, conn.epoch)
        });
        if !raced.is_empty() {
            let id = self.identity();
            let timeout = self.parts.redis.command_timeout;
            let again = reread(&self.wire, conn, &id, groups, replies, &raced);
            match tokio::time::timeout(timeout, again).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(WireError::Shard {
                        shard: label.to_owned(),
                        message: format!("timed out after {}", humantime::format_duration(timeout)),
                    })
                }
            }
            self.mark(conn, groups, replies, Some(&raced));
            if self.tracker.drain() {
                self.flushed = true;
            }
        }
        self.unchanged += positions(groups, |x| x.skip).len() as u64;
        Ok(())
    }

    /// Marks the keys read by plain reads on a tracking connection, unmarks the other
    /// non-skipped ones (all of them, or those at `only`).
    fn mark(
        &mut self,
        conn: &Conn,
        groups: &[Group],
        replies: &[GroupOutcome],
        only: Option<&[(usize, usize)]>,
    ) {
        for (g, (group, reply)) in groups.iter().zip(replies).enumerate() {
            let read = matches!(group.mode, Mode::Read { .. });
            for (j, item) in group.items.iter().enumerate() {
                if item.skip || only.is_some_and(|o| !o.contains(&(g, j))) {
                    continue;
                }
                let usable = reply
                    .as_ref()
                    .ok()
                    .and_then(|r| r.keys.get(j))
                    .and_then(|k| k.as_ref().ok())
                    .is_some_and(|k| !k.needs_script && !k.unread);
                if conn.track && read && usable {
                    self.tracker.mark(&item.key, conn.epoch);
                } else {
                    self.tracker.unmark(&item.key);
                }
            }
        }
    }

    /// The windows of this round, grouped per budget (one script call each):
    ///
    /// * **dirty** (our durable total differs from what Redis last acknowledged): sent;
    /// * **clean and live** (the window has not ended): only read, so that we learn the
    ///   others' spend; the current window of every budget is always read;
    /// * **clean and closed**: neither sent nor read (`status` and late records use local
    ///   data; a late record makes the window dirty, so it is sent again).
    fn groups(&mut self, now: i64, grace: i64) -> Groups {
        let keys = self.parts.keys.snapshot();
        let n = keys.len();
        let mut windows: Vec<Vec<Item>> = vec![Vec::new(); n];
        for (b, w, total) in self.parts.durable.snapshot() {
            // A slot added by a reload after `keys` was read waits for the next round.
            let Some(list) = windows.get_mut(b as usize) else {
                continue;
            };
            if w.end_secs().saturating_add(grace) <= now {
                continue;
            }
            let acked = self.acked.get(&(b, w.start_secs())).map(|a| a.total);
            let dirty = total > 0 && acked != Some(total);
            let live = w.end_secs() > now;
            if dirty || live {
                list.push(Item {
                    window: w,
                    durable: total,
                    send: dirty,
                });
            }
        }
        let mut asks = vec![None; n];
        for (b, list) in windows.iter_mut().enumerate() {
            let current = self.parts.view.schedule(b as u32).window_at_secs(now);
            if !list.iter().any(|x| x.window == current) {
                list.push(Item {
                    window: current,
                    durable: 0,
                    send: false,
                });
            }
            asks[b] = self
                .book
                .plan(
                    &self.parts.view,
                    &self.parts.store,
                    &self.parts.keys,
                    b as u32,
                    current,
                    now,
                    self.parts.redis.sync_interval,
                    self.release,
                )
                .map(|ask| (current, ask));
            list.sort_by_key(|x| std::cmp::Reverse(x.window.start_secs()));
            for x in list.iter() {
                if x.send {
                    self.sent.0 += 1;
                } else {
                    self.sent.1 += 1;
                }
            }
        }
        // Budgets with nothing to write are read with plain commands, unless the script has
        // work there: this process's first (verifying) round, the last one (it releases the
        // leases), a lease not known to be ours (the script takes it), a key a plain read
        // found in need of repair.
        let started = self.round_started;
        let modes: Vec<Mode> = windows
            .iter()
            .enumerate()
            .map(|(b, list)| {
                let ours = self.lease_ours.get(b).copied().unwrap_or(false);
                let script = self.verify
                    || self.release
                    || asks[b].is_some()
                    || !ours
                    || list.iter().any(|x| x.send)
                    || self.script_next.contains(&(b as u32));
                let set = self.lease_set.get(b).copied().flatten();
                if script {
                    self.script_next.remove(&(b as u32));
                    // A dirty budget renews its lease like a clean one, once a third of it has
                    // passed (a `SET` per script call was ~1 µs of Redis CPU, issue 11); a
                    // lease last given the longer read lease is set back to the script's at
                    // once, so a node that crashes while dirty is taken over as soon as before.
                    let renew = set.is_none_or(|(at, ttl)| {
                        ttl != lease_ttl(&self.parts.redis)
                            || started.saturating_duration_since(at) >= ttl / 3
                    });
                    Mode::Script { renew }
                } else {
                    // Once a third of what we last gave the lease has passed (measured from
                    // the start of the round that set it: Redis set it later): rounds come
                    // at most ~1.1 intervals apart, so two thirds are a wide margin.
                    let due = set
                        .is_none_or(|(at, ttl)| started.saturating_duration_since(at) >= ttl / 3);
                    Mode::Read { renew: due }
                }
            })
            .collect();
        let prefix = &self.parts.redis.prefix;
        let node = &self.parts.node_id;
        let wire = windows
            .iter()
            .enumerate()
            .map(|(b, list)| {
                let budget = &keys[b];
                Group {
                    mode: modes[b],
                    lease: lease_key(prefix, budget, node),
                    marker: strict_key(prefix, budget),
                    items: list
                        .iter()
                        .map(|x| SyncItem {
                            key: window_key(prefix, budget, x.window.start_secs()),
                            own: if x.send { x.durable } else { 0 },
                            expire_at: x.window.end_secs().saturating_add(grace),
                            grant: asks[b].filter(|(w, _)| *w == x.window).map(|(_, ask)| ask),
                            skip: false,
                        })
                        .collect(),
                }
            })
            .collect();
        Groups { windows, wire }
    }

    /// Merges a round's replies into the peers, the view, the store, the acknowledgements and
    /// (adoption) the journal. Returns the problems per budget, or the duplicate node id
    /// error (after applying everything that was read).
    fn apply(
        &mut self,
        groups: &Groups,
        replies: Vec<GroupOutcome>,
    ) -> Result<Vec<Vec<String>>, RoundError> {
        let mut problems: Vec<Vec<String>> = vec![Vec::new(); groups.windows.len()];
        let mut changed = Vec::new();
        let mut acked_changed = false;
        let mut adopt = Vec::new();
        let mut refused_by = None;
        let mut failed_groups = 0usize;
        let mut first_failure = None;
        let (mut keys, mut failed_keys) = (0usize, 0usize);
        let mut first_key_failure = None;
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
            if self.lease_ours.len() <= b {
                self.lease_ours.resize(b + 1, false);
            }
            self.lease_ours[b] = reply.lease == Lease::Held;
            if self.lease_set.len() <= b {
                self.lease_set.resize(b + 1, None);
            }
            let redis = &self.parts.redis;
            self.lease_set[b] = match (&reply.lease, groups.wire[b].mode) {
                (Lease::Held, Mode::Script { renew: true }) => {
                    Some((self.round_started, lease_ttl(redis)))
                }
                // Not renewed (unless it was gone: then it lives longer than this says).
                (Lease::Held, Mode::Script { renew: false }) => self.lease_set[b],
                (Lease::Held, Mode::Read { renew: true }) => {
                    Some((self.round_started, read_lease_ttl(redis)))
                }
                (Lease::Held, Mode::Read { renew: false }) => self.lease_set[b],
                _ => None,
            };
            let held = match reply.lease {
                Lease::Held => true,
                Lease::Free => {
                    // The next round's script takes it.
                    self.script_next.insert(b as u32);
                    false
                }
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
            for (item, key) in windows.iter().zip(reply.keys) {
                keys += 1;
                let window = item.window;
                let state = match key {
                    Ok(state) => state,
                    Err(p) => {
                        self.script_next.insert(b32);
                        let p = flat(&scrub(&p, &self.parts.redis.url));
                        first_key_failure.get_or_insert_with(|| p.clone());
                        failed_keys += 1;
                        problems[b].push(p);
                        continue;
                    }
                };
                if state.unread {
                    // Not read: Redis reported no change since our last read.
                    continue;
                }
                if state.needs_script {
                    // A plain read found what only the script repairs: use it next round,
                    // and do not trust these values meanwhile.
                    self.script_next.insert(b32);
                    continue;
                }
                if !state.problems.is_empty() {
                    // Keep reporting it (only the script sees bad fields).
                    self.script_next.insert(b32);
                }
                problems[b].extend(state.problems);
                if let Some(owner) = state.owner.as_ref().filter(|o| **o != self.instance) {
                    let known = self.foreign_owners.entry(b32).or_default();
                    if !known.contains(owner) {
                        match groups.wire[b].mode {
                            // Another data dir wrote our node's field since we last looked:
                            // the script's lease check runs next round.
                            Mode::Read { .. } => {
                                self.script_next.insert(b32);
                            }
                            // Seen while we hold the lease: written before we took it.
                            Mode::Script { .. } if held => known.push(owner.clone()),
                            Mode::Script { .. } => {}
                        }
                    }
                }
                if let Some(g) = state.grant {
                    self.book.apply(
                        &self.parts.view,
                        &self.parts.store,
                        &self.parts.keys,
                        b32,
                        window,
                        g,
                    );
                }
                // Our field: recorded as written by this data dir, or (written before owners
                // were recorded) ours when we hold the lease.
                let field = state
                    .field
                    .filter(|_| match &state.owner {
                        Some(owner) => *owner == self.instance,
                        None => held,
                    })
                    .unwrap_or(0);
                let ours = field.saturating_add(state.mine);
                let others = state.total.saturating_sub(ours);
                let entry = self
                    .peers
                    .entry((b32, window.start_secs()))
                    .or_insert_with(|| PeerWindow {
                        window,
                        others: 0,
                        persisted: 0,
                    });
                entry.others = entry.others.max(others);
                self.parts
                    .view
                    .raise_others(b32, window, Money::from_nanos(entry.others));
                if entry.others > entry.persisted {
                    changed.push((b32, window.start_secs()));
                }
                if field > item.durable {
                    adopt.push((b32, window, field));
                }
                // What Redis holds of our counter covers our durable total: acknowledged.
                // Otherwise (Redis lost it, or it was never sent) the window is dirty.
                let k = (b32, window.start_secs());
                let in_redis = field.max(state.mine);
                if item.durable > 0 && in_redis >= item.durable {
                    if self.acked.get(&k).map(|a| a.total) != Some(item.durable) {
                        self.acked.insert(
                            k,
                            Acked {
                                window,
                                total: item.durable,
                                stored: false,
                            },
                        );
                        acked_changed = true;
                    }
                } else if self.acked.remove(&k).is_some_and(|a| a.stored) {
                    self.acked_gone.push(store_key(&self.parts.keys, b32, k.1));
                }
            }
        }
        for (b, window, total) in adopt {
            self.adopt(b, window, total);
        }
        self.persist(&changed, acked_changed);
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
                    node_id: self.parts.node_id.clone(),
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
            budget = %self.parts.keys.get(budget).key_name(),
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

    /// Keeps the others' totals and the acknowledgements in the data dir, one flush.
    /// Failure only costs freshness (or one more send) after a restart.
    fn persist(&mut self, changed: &[(u32, i64)], acked_changed: bool) {
        if changed.is_empty() && !acked_changed && self.acked_gone.is_empty() {
            return;
        }
        let items: Vec<(WindowKey, PeersValue)> = changed
            .iter()
            .filter_map(|k| self.peers.get(k).map(|p| (k.0, p.window, p.others)))
            .map(|(b, w, others)| {
                (
                    store_key(&self.parts.keys, b, w.start_secs()),
                    PeersValue {
                        end: w.end_secs(),
                        others,
                    },
                )
            })
            .collect();
        let acked: Vec<(WindowKey, AckedValue)> = self
            .acked
            .iter()
            .filter(|(_, a)| !a.stored)
            .map(|(&(b, start), a)| {
                (
                    store_key(&self.parts.keys, b, start),
                    AckedValue {
                        end: a.window.end_secs(),
                        total: a.total,
                    },
                )
            })
            .collect();
        let store = &self.parts.store;
        let written = store
            .write_peers(items.iter().map(|(k, v)| (k, v)))
            .and_then(|()| {
                store.write_acked(acked.iter().map(|(k, v)| (k, *v)), self.acked_gone.iter())
            })
            .and_then(|()| store.flush());
        match written {
            Ok(()) => {
                for k in changed {
                    if let Some(p) = self.peers.get_mut(k) {
                        p.persisted = p.others;
                    }
                }
                for a in self.acked.values_mut() {
                    a.stored = true;
                }
                self.acked_gone.clear();
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

/// Per-node jitter of the sync interval: ±10 %, from a generator seeded by the node id and
/// the instance, so that a fleet started at once spreads its rounds instead of hitting Redis
/// in step.
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    fn new(node: &str, instance: &str) -> Jitter {
        use std::hash::{Hash, Hasher};
        let mut h = rustc_hash::FxHasher::default();
        node.hash(&mut h);
        instance.hash(&mut h);
        Jitter(h.finish() | 1)
    }

    /// The next delay: `interval × [0.9, 1.1)`.
    fn delay(&mut self, interval: Duration) -> Duration {
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

/// Marks the clean window keys that `conn` tracks unchanged as not to be read.
fn set_skips(tracker: &Tracker, conn: &Conn, groups: &mut [Group]) {
    for group in groups {
        let read = matches!(group.mode, Mode::Read { .. });
        for item in &mut group.items {
            item.skip = read && conn.track && tracker.is_fresh(&item.key, conn.epoch);
        }
    }
}

/// One connection's part of a round: the tracking prelude when the connection tracks, the
/// pipeline, and, when the connection turns out unable to vouch for the keys it skipped
/// (another client id, tracking refused), a second pipeline reading them: then the replies
/// hold every key read, and the skipped items of `groups` are cleared.
async fn round_on(
    wire: &Wire,
    conn: &mut Conn,
    id: &Identity<'_>,
    groups: &mut [Group],
) -> Result<(Vec<GroupOutcome>, Verdict), WireError> {
    let (mut replies, tracked) = wire
        .sync_round_tracked(&mut conn.conn, id, groups, conn.track)
        .await?;
    let mut verdict = Verdict::default();
    if let Some(t) = tracked {
        match (t.error, t.client_id) {
            (None, Some(client)) => {
                verdict.lost = conn.client_id.is_some_and(|old| old != client);
                conn.client_id = Some(client);
            }
            (error, _) => {
                conn.track = false;
                verdict.lost = true;
                verdict.refused =
                    Some(error.unwrap_or_else(|| "CLIENT ID answered no id".to_owned()));
            }
        }
    }
    if !verdict.lost {
        return Ok((replies, verdict));
    }
    let skipped = positions(groups, |x| x.skip);
    if !skipped.is_empty() {
        reread(wire, conn, id, groups, &mut replies, &skipped).await?;
    }
    Ok((replies, verdict))
}

/// `(group, item)` positions of the items that satisfy `which`.
fn positions(groups: &[Group], which: impl Fn(&SyncItem) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for (j, item) in group.items.iter().enumerate() {
            if which(item) {
                out.push((g, j));
            }
        }
    }
    out
}

/// Reads the skipped items at `which` with plain reads in one pipeline: their replies replace
/// the `unread` ones and they are no longer skipped. A budget whose reads fail gets the error.
async fn reread(
    wire: &Wire,
    conn: &mut Conn,
    id: &Identity<'_>,
    groups: &mut [Group],
    replies: &mut [GroupOutcome],
    which: &[(usize, usize)],
) -> Result<(), WireError> {
    let mut budgets: Vec<usize> = which.iter().map(|&(g, _)| g).collect();
    budgets.dedup();
    let reads: Vec<Group> = budgets
        .iter()
        .map(|&g| Group {
            mode: Mode::Read { renew: false },
            items: which
                .iter()
                .filter(|&&(b, _)| b == g)
                .map(|&(_, j)| SyncItem {
                    skip: false,
                    ..groups[g].items[j].clone()
                })
                .collect(),
            ..groups[g].clone()
        })
        .collect();
    let second = wire.sync_round(&mut conn.conn, id, &reads).await?;
    for (&g, reply) in budgets.iter().zip(second) {
        let items: Vec<usize> = which
            .iter()
            .filter(|&&(b, _)| b == g)
            .map(|&(_, j)| j)
            .collect();
        for &j in &items {
            groups[g].items[j].skip = false;
        }
        match (&mut replies[g], reply) {
            (Ok(first), Ok(second)) => {
                for (&j, read) in items.iter().zip(second.keys) {
                    if let Some(slot) = first.keys.get_mut(j) {
                        *slot = read;
                    }
                }
            }
            (Ok(_), Err(e)) => replies[g] = Err(e),
            // The first reply failed as a whole: it stands.
            (Err(_), _) => {}
        }
    }
    Ok(())
}

/// One window of one budget in a round.
#[derive(Debug, Clone, Copy)]
struct Item {
    window: Window,
    /// Our durable total (0 when we never spent in it).
    durable: u64,
    /// Dirty: our total is sent; otherwise only read.
    send: bool,
}

/// One round's request: per budget the windows (with our own totals) and their wire groups.
struct Groups {
    windows: Vec<Vec<Item>>,
    wire: Vec<Group>,
}

fn flat(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
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
