//! Runtime budget definitions through Redis: one thread (`provider-budgets-definitions`)
//! keeps this node's `definitions` table and the fleet's definitions hash in step.
//!
//! At start and every `sync_interval`, a **round**: `HGET {prefix}:budgets ~changes` (one command while
//! nothing changed); when the counter moved (or this process has not read the hash yet, a
//! write of ours is pending, or 60 rounds passed without a full read: a safety net for a
//! counter that came back to a value we saw, or a tombstone of ours is past its retention),
//! `HGETALL` and reconcile it with the table
//! (`Definitions::reconcile`): records that win are taken (stored, then the limiter applies
//! them through its reload machinery, the callback given to [`DefinitionSync::start`]);
//! records of ours that Redis lacks or holds older are written with the script (which keeps
//! the winner of the two: the same rule as the table's), and tombstones older than their
//! retention (the storage retention, at least 30 days) are removed on both sides.
//!
//! A local change (`Limiter::put_budget`, `delete_budget`) asks this thread to write it at
//! once ([`Handle::push`]) and waits for the answer, boundedly: `true` once the record
//! reached Redis (written, or refused by a winner, which is taken at once). When Redis cannot
//! be reached the change stays local and pending: every round retries it until one succeeds.
//!
//! Decision: a thread and a connection of its own rather than a step of the spend rounds.
//! Definitions change rarely and their exchange is tiny; the spend rounds carry bounded,
//! per-budget work, client-side tracking and per-master pipelines that definitions need none
//! of; and applying a definition runs the limiter's reload, which must not stall spend
//! replication. The cost is one connection per node and one `HGET` per interval.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};

use crate::config::RedisConfig;
use crate::durable::definitions::{Definitions, Reconciled, Record};
use crate::durable::store::Store;
use crate::error::ReplicationError;
use crate::model::clock::{floor_secs, Clock};
use crate::model::text::{redact_url, redact_urls};
use crate::replicate::routed::Routed;
use crate::replicate::wire::definitions::{
    definitions_key, hash_reply, put_reply, Put, CHANGES, DEFINITIONS_SCRIPT,
};

/// Rounds after which the hash is read whole even though its counter did not move.
const FULL_READ_EVERY: u32 = 60;

/// Applies the table's definitions (the limiter's reload, bound once the limiter exists).
pub(crate) type Applier = Arc<dyn Fn() + Send + Sync>;

/// What the thread needs.
pub(crate) struct DefinitionParts {
    pub redis: RedisConfig,
    pub table: Arc<Definitions>,
    pub store: Arc<Store>,
    pub clock: Arc<dyn Clock>,
    /// Tombstones older than this are removed (`tombstone_retention`).
    pub retention: Duration,
}

enum Request {
    /// Write this field's record now; answer whether it reached Redis.
    Push(String, Sender<bool>),
    /// A round now (`Limiter::sync`).
    Round(Sender<Result<(), ReplicationError>>),
}

/// The thread: stopping (or dropping) it ends the thread.
pub(crate) struct DefinitionSync {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
    thread_id: ThreadId,
}

/// What callers use to reach the thread (cheap to clone, so a caller waits for an answer
/// without holding the limiter's handle on the thread).
#[derive(Clone)]
pub(crate) struct Handle {
    tx: Sender<Request>,
    /// Set once the first round ended (either way): a change waits for it, so that its
    /// version counts what Redis held when the process started.
    first: Arc<(Mutex<bool>, Condvar)>,
    /// How long a caller waits for a push or a round: the thread may be inside a round that
    /// waits out the timeouts, then runs the request under them.
    wait: Duration,
}

impl std::fmt::Debug for DefinitionSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DefinitionSync").finish_non_exhaustive()
    }
}

impl DefinitionSync {
    /// Starts the thread; its first round runs at once. A change taken from Redis is applied
    /// through `applier`.
    pub(crate) fn start(
        parts: DefinitionParts,
        applier: Applier,
    ) -> std::io::Result<DefinitionSync> {
        let r = &parts.redis;
        let wait = (r.connect_timeout + r.command_timeout.saturating_mul(2)).saturating_mul(2);
        let (tx, rx) = crossbeam_channel::unbounded();
        let first: Arc<(Mutex<bool>, Condvar)> = Arc::default();
        let worker = Worker {
            first: Arc::clone(&first),
            key: definitions_key(&parts.redis.prefix),
            script: redis::Script::new(DEFINITIONS_SCRIPT),
            conn: Routed::new(&parts.redis),
            applier,
            last: None,
            since_full: 0,
            pending: false,
            down: false,
            logged: rustc_hash::FxHashSet::default(),
            parts,
        };
        let thread = std::thread::Builder::new()
            .name("provider-budgets-definitions".into())
            .spawn(move || worker.run(&rx))?;
        Ok(DefinitionSync {
            thread_id: thread.thread().id(),
            handle: Handle { tx, first, wait },
            thread: Some(thread),
        })
    }

    /// A handle to reach the thread.
    pub(crate) fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Ends the thread. Called from the thread itself (the limiter dropped by its own apply
    /// step), it does not wait for itself.
    pub(crate) fn stop(mut self) {
        self.end();
    }

    fn end(&mut self) {
        // Closing the channel ends the loop (other handles only live for one request).
        let (tx, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.handle.tx, tx));
        if let Some(t) = self.thread.take() {
            if std::thread::current().id() != self.thread_id {
                let _ = t.join();
            }
        }
    }
}

impl Drop for DefinitionSync {
    fn drop(&mut self) {
        self.end();
    }
}

impl Handle {
    /// Waits (within the wait of a request) until the first round ended.
    pub(crate) fn first_round(&self) {
        let (done, ended) = &*self.first;
        let guard = done.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = ended
            .wait_timeout_while(guard, self.wait, |done| !*done)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Writes `field`'s record to Redis now; `true` once it reached Redis within the wait.
    pub(crate) fn push(&self, field: &str) -> bool {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.tx.send(Request::Push(field.to_owned(), reply)).is_ok()
            && answer.recv_timeout(self.wait).unwrap_or(false)
    }

    /// One round now, run while `alongside` runs on the caller's thread (a sync's spend
    /// round: the two take the longer of their times, not the sum). Returns `alongside`'s
    /// result and the round's.
    pub(crate) fn sync<R>(
        &self,
        alongside: impl FnOnce() -> R,
    ) -> (R, Result<(), ReplicationError>) {
        let (reply, answer) = crossbeam_channel::bounded(1);
        let sent = self.tx.send(Request::Round(reply)).is_ok();
        let other = alongside();
        let round = if sent {
            answer
                .recv_timeout(self.wait)
                .unwrap_or(Err(ReplicationError::Stopped))
        } else {
            Err(ReplicationError::Stopped)
        };
        (other, round)
    }
}

struct Worker {
    parts: DefinitionParts,
    /// Set after the first round (see [`Handle::first_round`]).
    first: Arc<(Mutex<bool>, Condvar)>,
    key: String,
    script: redis::Script,
    conn: Routed,
    applier: Applier,
    /// The counter read with the last full read (`Some(None)`: the hash was absent).
    last: Option<Option<i64>>,
    since_full: u32,
    /// A record of ours may not be in Redis (a write failed).
    pending: bool,
    /// Redis unreachable: logged once per outage.
    down: bool,
    /// Unreadable fields already logged (field and why).
    logged: rustc_hash::FxHashSet<(String, String)>,
}

impl Worker {
    fn run(mut self, rx: &crossbeam_channel::Receiver<Request>) {
        let interval = self.parts.redis.sync_interval;
        // The first round at once: a node learns the fleet's runtime budgets as it starts.
        let mut next = Instant::now();
        loop {
            match rx.recv_deadline(next) {
                Ok(Request::Push(field, reply)) => {
                    let reached = self.push_now(&field);
                    let _ = reply.send(reached);
                }
                Ok(Request::Round(reply)) => {
                    let _ = reply.send(self.round());
                    next = Instant::now() + interval;
                    self.first_done();
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.round();
                    next = Instant::now() + interval;
                    self.first_done();
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// Notes that a round ended (see [`Handle::first_round`]).
    fn first_done(&self) {
        let (done, ended) = &*self.first;
        *done.lock().unwrap_or_else(PoisonError::into_inner) = true;
        ended.notify_all();
    }

    /// Runs the limiter's apply step.
    fn apply(&self) {
        (self.applier)();
    }

    fn error(&self, e: &redis::RedisError) -> ReplicationError {
        let url = redact_url(&self.parts.redis.url);
        ReplicationError::Protocol {
            message: redact_urls(&format!("runtime budgets: redis {url}: {e}")),
        }
    }

    /// Notes a failure: the connection is dropped, the outage logged once.
    fn failed(&mut self, e: &ReplicationError) {
        self.conn.reset();
        self.last = None;
        metrics::counter!("provider_budgets_runtime_budget_sync_errors_total").increment(1);
        if !self.down {
            self.down = true;
            tracing::warn!(error = %e, "runtime budgets cannot be exchanged with redis; changes stay local until it answers");
        }
    }

    fn up(&mut self) {
        if self.down {
            self.down = false;
            tracing::info!("runtime budgets are exchanged with redis again");
        }
    }

    fn push_now(&mut self, field: &str) -> bool {
        let Some(record) = self.parts.table.get(field) else {
            return false;
        };
        // A connection kept from an earlier round may have died (Redis restarted): one
        // fresh connection gets a second chance.
        let retry = self.conn.connected();
        let mut result = self.put(field, &record);
        if result.is_err() && retry {
            self.conn.reset();
            result = self.put(field, &record);
        }
        match result {
            Ok(changed) => {
                self.up();
                if changed {
                    self.apply();
                }
                true
            }
            Err(e) => {
                self.failed(&e);
                self.pending = true;
                false
            }
        }
    }

    /// Writes one record with the script; `true` when a winner Redis held replaced ours.
    fn put(&mut self, field: &str, record: &Record) -> Result<bool, ReplicationError> {
        let (key, script) = (&self.key, &self.script);
        let json = record.to_json();
        let reply: redis::Value = self
            .conn
            .run(key, "runtime budget write", |c| {
                script
                    .key(key)
                    .arg("put")
                    .arg(field)
                    .arg(record.version)
                    .arg(&record.node)
                    .arg(&json)
                    .invoke(c)
            })
            .map_err(|e| self.error(&e))?;
        match put_reply(reply) {
            Ok(Put::Written(n)) => {
                // Only our write since the last full read: nothing new to read.
                if self.last == Some(Some(n - 1)) || (n == 1 && self.last == Some(None)) {
                    self.last = Some(Some(n));
                }
                Ok(false)
            }
            Ok(Put::Refused(text)) => match Record::from_json(text.as_bytes()) {
                Ok(winner) => self
                    .parts
                    .table
                    .take(&self.parts.store, field, winner)
                    .map_err(|e| ReplicationError::Protocol {
                        message: format!("runtime budgets: {e}"),
                    }),
                Err(why) => {
                    self.log_bad(field, &why);
                    Ok(false)
                }
            },
            Err(why) => Err(ReplicationError::Protocol {
                message: format!("runtime budgets: {}: {why}", self.key),
            }),
        }
    }

    fn log_bad(&mut self, field: &str, why: &str) {
        if self.logged.insert((field.to_owned(), why.to_owned())) {
            tracing::warn!(key = %self.key, field = %field, problem = %why, "unreadable runtime budget in redis; skipped (other budgets are not affected)");
        }
    }

    /// Tombstones written before this (Unix seconds) are past their retention.
    fn cutoff(&self) -> i64 {
        let now = floor_secs(self.parts.clock.now());
        let retention = i64::try_from(self.parts.retention.as_secs()).unwrap_or(i64::MAX / 4);
        now.saturating_sub(retention)
    }

    /// One round; see the module doc. A connection kept from an earlier round may have died
    /// meanwhile (Redis restarted): then a fresh one gets a second chance in the same round.
    fn round(&mut self) -> Result<(), ReplicationError> {
        let retry = self.conn.connected();
        let mut result = self.round_inner();
        if result.is_err() && retry {
            self.conn.reset();
            result = self.round_inner();
        }
        match &result {
            Ok(()) => self.up(),
            Err(e) => self.failed(e),
        }
        result
    }

    fn round_inner(&mut self) -> Result<(), ReplicationError> {
        let key = self.key.clone();
        let changes: Option<i64> = self
            .conn
            .run(&key, "HGET", |c| {
                redis::cmd("HGET").arg(&key).arg(CHANGES).query(c)
            })
            .map_err(|e| self.error(&e))?;
        self.since_full += 1;
        let cutoff = self.cutoff();
        // Tombstones of ours past their retention: the full read removes them on both sides.
        let due = self.pending
            || self.last != Some(changes)
            || self.since_full >= FULL_READ_EVERY
            || self.parts.table.has_tombstones_before(cutoff);
        if !due {
            return Ok(());
        }
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = self
            .conn
            .run(&key, "HGETALL", |c| {
                redis::cmd("HGETALL").arg(&key).query(c)
            })
            .map_err(|e| self.error(&e))?;
        let hash = hash_reply(pairs);
        for (field, why) in &hash.bad {
            self.log_bad(field, why);
        }
        let found = match self
            .parts
            .table
            .reconcile(&self.parts.store, &hash.records, cutoff)
        {
            Ok(found) => found,
            Err(e) => {
                // Records taken before the fault are stored: apply them (a later round would
                // find nothing new to apply).
                self.apply();
                return Err(ReplicationError::Protocol {
                    message: format!("runtime budgets: {e}"),
                });
            }
        };
        self.last = Some(hash.changes);
        self.since_full = 0;
        self.pending = false;
        let mut taken = false;
        let written = self.write_back(&found, &mut taken);
        // Applied whatever the writes did: what was taken is stored here already.
        if found.changed || taken {
            self.apply();
        }
        written
    }

    /// Writes what a full read found Redis lacking (our records; a write refused by a winner
    /// takes the winner, noted in `taken`) and removes the tombstones past their retention.
    fn write_back(&mut self, found: &Reconciled, taken: &mut bool) -> Result<(), ReplicationError> {
        for (field, record) in &found.push {
            match self.put(field, record) {
                Ok(t) => *taken |= t,
                Err(e) => {
                    self.pending = true;
                    return Err(e);
                }
            }
        }
        let (key, script) = (&self.key, &self.script);
        for (field, text) in &found.forget {
            self.conn
                .run(key, "runtime budget forget", |c| {
                    script
                        .key(key)
                        .arg("forget")
                        .arg(field)
                        .arg(text)
                        .invoke::<i64>(c)
                })
                .map_err(|e| self.error(&e))?;
        }
        Ok(())
    }
}
