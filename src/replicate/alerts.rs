//! Soft-limit alerts once per fleet: with Redis configured, a node that sees a soft limit
//! crossed claims it with `SET key node NX PXAT window_end+grace` before firing; only the node
//! whose `SET` succeeds fires (callback, metric, `tracing` event). Without Redis every node
//! fires once per window per threshold on its own.
//!
//! The claim runs on one background thread fed by a bounded channel, so the charging thread
//! never waits for Redis: the callback runs on that thread. Its own connection (not the
//! replicator's), opened lazily with `redis.connect_timeout`, each command bounded by
//! `redis.command_timeout`. When Redis cannot answer, the node fires anyway (an alert may then
//! come from more than one node, but is never lost) and logs the failure once per outage.
//!
//! Key: `{prefix}:{key name:period part}:alert:{window start}:{threshold in millionths}`: the
//! budget's Redis Cluster hash tag, next to its window and lease keys, never equal to one.
//!
//! On a Redis Cluster the claim goes to the master of its slot (module `routed` follows the
//! `MOVED` and `ASK` replies). Without this every claim would fail with `MOVED` on the first
//! URL's node and fire locally on every node.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::RedisConfig;
use crate::model::budget::{SoftLimitCrossed, SoftLimitHandler};
use crate::model::window::Window;
use crate::replicate::routed::Routed;

/// Claims waiting for the alert thread before new ones fire locally instead.
const QUEUE: usize = 4096;

/// The handler shared by the limiter and the alert thread.
pub(crate) type SharedHandler = Arc<Mutex<Option<SoftLimitHandler>>>;

/// Delivers a crossed soft limit (the limiter's own delivery).
fn deliver(handler: &SharedHandler, key: &str, e: &SoftLimitCrossed) {
    crate::model::budget::deliver_soft_limit(handler, key, e);
}

/// The alert key of a crossing.
pub(crate) fn alert_key(prefix: &str, key: &str, e: &SoftLimitCrossed) -> String {
    let ppm = (e.soft_limit.fraction() * 1e6).round() as u64;
    format!(
        "{prefix}:{{{key}:{}}}:alert:{}:{ppm}",
        e.period,
        e.window.start_secs()
    )
}

struct Claim {
    key: String,
    expire_at_ms: i64,
    then: Then,
}

/// What a won claim (or one Redis could not answer) does.
enum Then {
    /// Delivers a crossed soft limit of the budget `budget_key`.
    Soft {
        budget_key: String,
        event: SoftLimitCrossed,
    },
    /// Runs a caller's action ([`crate::Limiter::once_per_fleet`]).
    Run(Box<dyn FnOnce() + Send>),
}

impl Then {
    fn fire(self, handler: &SharedHandler) {
        match self {
            Then::Soft { budget_key, event } => deliver(handler, &budget_key, &event),
            Then::Run(action) => action(),
        }
    }
}

/// The fleet-wide claimer (one thread).
#[derive(Debug)]
pub(crate) struct FleetAlerts {
    tx: Option<Sender<Claim>>,
    thread: Option<JoinHandle<()>>,
    prefix: String,
    grace: Duration,
    handler: SharedHandler,
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key)
    }
}

impl FleetAlerts {
    pub fn start(
        redis: &RedisConfig,
        node_id: String,
        handler: SharedHandler,
    ) -> std::io::Result<FleetAlerts> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let worker = Worker {
            node_id,
            handler: Arc::clone(&handler),
            redis: Routed::new(redis),
            down: false,
        };
        let thread = std::thread::Builder::new()
            .name("provider-budgets-alerts".into())
            .spawn(move || worker.run(rx))?;
        Ok(FleetAlerts {
            tx: Some(tx),
            thread: Some(thread),
            prefix: redis.prefix.clone(),
            grace: redis.grace,
            handler,
        })
    }

    /// Claims the crossing for this node (in the background) and fires it if the claim wins.
    pub fn claim(&self, budget_key: &str, event: SoftLimitCrossed) {
        let claim = Claim {
            key: alert_key(&self.prefix, budget_key, &event),
            expire_at_ms: self.expire_at_ms(event.window),
            then: Then::Soft {
                budget_key: budget_key.to_owned(),
                event,
            },
        };
        self.send(claim);
    }

    /// Claims `name` (unique per window: the caller puts the window in it) for this node and
    /// runs `action` if the claim wins. Key `{prefix}:{name}:once`: its own hash tag.
    pub fn claim_once(&self, name: &str, window: Window, action: Box<dyn FnOnce() + Send>) {
        let claim = Claim {
            key: format!("{}:{{{name}}}:once", self.prefix),
            expire_at_ms: self.expire_at_ms(window),
            then: Then::Run(action),
        };
        self.send(claim);
    }

    /// The window's end (or now, for a past window) plus grace: a claim must outlive the
    /// moment other nodes may still see the same event.
    fn expire_at_ms(&self, window: Window) -> i64 {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2));
        window
            .end_secs()
            .saturating_mul(1000)
            .max(now_ms)
            .saturating_add(i64::try_from(self.grace.as_millis()).unwrap_or(i64::MAX / 2))
    }

    fn send(&self, claim: Claim) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(claim) {
            Ok(()) => {}
            Err(TrySendError::Full(c) | TrySendError::Disconnected(c)) => {
                // Never lose an alert: fire here rather than drop it.
                c.then.fire(&self.handler);
            }
        }
    }
}

impl Drop for FleetAlerts {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    node_id: String,
    handler: SharedHandler,
    /// Its own connection (following cluster redirects), not the replicator's.
    redis: Routed,
    /// Logged once per outage.
    down: bool,
}

impl Worker {
    fn run(mut self, rx: Receiver<Claim>) {
        for claim in rx {
            match self.set_nx(&claim) {
                Ok(true) => {
                    self.up();
                    claim.then.fire(&self.handler);
                }
                Ok(false) => {
                    self.up();
                    let name = match claim.then {
                        Then::Soft { .. } => "provider_budgets_soft_limit_claimed_elsewhere_total",
                        Then::Run(_) => "provider_budgets_once_claimed_elsewhere_total",
                    };
                    metrics::counter!(name).increment(1);
                }
                Err(e) => {
                    self.redis.reset();
                    if !self.down {
                        self.down = true;
                        tracing::warn!(
                            error = %crate::model::text::redact_urls(&e.to_string()),
                            "alert claim in Redis failed; firing on this node (an alert may come from several nodes until Redis answers)"
                        );
                    }
                    claim.then.fire(&self.handler);
                }
            }
        }
    }

    fn up(&mut self) {
        if self.down {
            self.down = false;
            tracing::info!("alert claims in Redis work again");
        }
    }

    /// `SET key node NX PXAT …` on the node serving the key (following cluster redirects).
    fn set_nx(&mut self, claim: &Claim) -> redis::RedisResult<bool> {
        let node_id = &self.node_id;
        self.redis.run(&claim.key, "soft-limit claim", |conn| {
            redis::cmd("SET")
                .arg(&claim.key)
                .arg(node_id)
                .arg("NX")
                .arg("PXAT")
                .arg(claim.expire_at_ms.max(1))
                .query::<Option<String>>(conn)
                .map(|reply| reply.is_some())
        })
    }
}
