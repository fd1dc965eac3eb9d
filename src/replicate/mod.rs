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
//! **Faults** (see `docs/guide/failure-model.md`):
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
pub(crate) mod alerts;
pub(crate) mod cluster;
mod conn;
pub(crate) mod definitions;
pub(crate) mod eviction;
mod grants;
mod round;
mod routed;
mod tls;
mod tracking;
pub(crate) mod wire;
mod worker;

pub(crate) use conn::{client, client_moved};
pub(crate) use grants::GrantStatus;

use conn::Backend;
use round::{Acked, Peers};

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
use crate::model::text::{flat, redact_url, scrub};
use crate::model::window::Window;
use crate::view::View;

use tracking::Tracker;
use wire::{
    lease_key, strict_key, window_key, Group, GroupOutcome, Identity, Lease, Mode, SyncItem, Wire,
    WireError,
};

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
    /// The `maxmemory-policy` of each server connected to that told it (see [`eviction`]).
    pub eviction: eviction::Policies,
    /// Reads that found our acknowledged field missing or lower (see [`eviction`]).
    pub data_loss: u64,
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
    /// Windows the last round left for later rounds (its work is bounded, see
    /// `round::MAX_WINDOWS_PER_CALL`).
    deferred: u64,
    /// Which budget takes the round's allowance first (rotates while there is a backlog).
    turn: usize,
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
