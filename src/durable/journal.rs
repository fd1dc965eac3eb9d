//! The journal thread: makes recorded spend durable, in batches.
//!
//! `record` bumps the view and sends an [`Event`] on a bounded crossbeam channel; this thread
//! owns the other end. It drains whatever is queued (waiting up to `max_delay` for more when
//! nobody is blocked on durability), adds the increments into its map of this node's absolute
//! totals per window, writes the changed totals in ONE sled batch and flushes once (group
//! commit: one fsync serves every waiter of the batch), then acknowledges the waiters and
//! publishes the new durable totals for the replicator.
//!
//! After sled's flush it writes the high-water record ([`crate::durable::highwater`]) and only then
//! acknowledges: a data dir that later loses acknowledged batches is detected at open.
//!
//! Failure handling (a full disk, an I/O error): the waiters get the error, the totals stay in
//! memory and marked dirty, and the fault is visible in [`StorageHealth`] (status, healthz, the
//! `provider_budgets_storage_fault` gauge). sled's first I/O error is sticky (every later
//! flush of that handle fails even once space is back), so recovery reopens the database and
//! rewrites *every* total held in memory, with a backoff between attempts. Recorded spend is
//! never dropped; because totals are absolute, writing one twice is harmless.
//!
//! Retention: windows are deleted (memory and disk) only by a *sane* clock. The cutoff is
//! `min(wall now, wall at start + monotonic time since) - retention`, so a wall clock that
//! steps forward deletes nothing, and a window that received a record (or was loaded at open)
//! within `retention` of monotonic time is never deleted. A one-shot process (the CLI, whatever
//! its `--now`) therefore never deletes anything it loaded.
//!
//! The channel is bounded so that a stalled disk slows `record` down (backpressure) instead of
//! growing memory without limit; with its capacity of 65 536 events that only happens when the
//! disk cannot keep up for a long time.
//!
//! Idempotency records (module `idempotency`): a keyed spend ([`Event::AddKeyed`]) and a
//! remembered reservation end ([`Event::Finish`] with `remember`) add a record that goes in the
//! same sled batch as the totals of that batch, and stays queued like a dirty total until a
//! batch with it is durable. Records are stamped with the sane clock (below) and removed once
//! older than `IDEMPOTENCY_TTL` by it (so never within that much uptime); beyond
//! `JournalSettings::idempotency_capacity` a batch also removes the oldest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rustc_hash::{FxHashMap, FxHashSet};

pub(crate) use crate::durable::event::{Ack, AckResult, Event, KeyedAdd};
use crate::durable::highwater::Mark;
use crate::durable::idempotency::{self, Ended, Remembered};
pub(crate) use crate::durable::items::Items;
use crate::durable::store::{summarize, OwnValue, ReservationValue, Store, StoreError, WindowKey};
use crate::model::clock::{floor_secs, Clock};
use crate::model::money::Money;
use crate::model::window::Window;
use crate::view::View;

/// Events queued before `record` blocks.
const CHANNEL_CAPACITY: usize = 1 << 16;
/// Largest batch committed at once, so a flood of records still gets flushed regularly.
const MAX_BATCH: usize = 1 << 16;
/// How often the thread wakes up when idle: retries failed writes, expires old windows.
const TICK: Duration = Duration::from_millis(250);
/// First and longest wait between two attempts to reopen a faulted store.
const REOPEN_BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(2));
/// How often the store is swept for ended peers entries.
const SWEEP: Duration = Duration::from_secs(60);

/// This node's own totals that are durable in sled: what the replicator may ship.
#[derive(Debug, Default)]
pub(crate) struct DurableTotals {
    inner: Mutex<FxHashMap<(u32, i64), (Window, u64)>>,
}

impl DurableTotals {
    fn publish(&self, items: impl IntoIterator<Item = (u32, Window, u64)>) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (budget, window, total) in items {
            map.insert((budget, window.start_secs()), (window, total));
        }
    }

    fn remove(&self, keys: &[(u32, i64)]) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            map.remove(k);
        }
    }

    /// A copy of every durable own total: (budget, window, nanos).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn snapshot(&self) -> Vec<(u32, Window, u64)> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(&(b, _), &(w, t))| (b, w, t)).collect()
    }
}

/// The journal's health, shared with the limiter (status, healthz) without locks on the
/// request path.
#[derive(Debug, Default)]
pub(crate) struct StorageHealth {
    faulted: AtomicBool,
    fault: Mutex<Option<StoreError>>,
    /// Set when the thread is gone: the reason (a panic, or a normal stop).
    stopped: Mutex<Option<StopReason>>,
}

/// Why the journal thread is no longer running.
#[derive(Debug, Clone)]
pub(crate) enum StopReason {
    /// `stop` ran; the result of the final commit.
    Stopped(AckResult),
    /// The thread panicked.
    Died(String),
}

impl StorageHealth {
    /// The current storage fault (a full disk, an I/O error), if any.
    pub fn fault(&self) -> Option<String> {
        if !self.faulted.load(Ordering::Acquire) {
            return None;
        }
        self.fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ToString::to_string)
    }

    /// Why the journal thread stopped, if it did.
    pub fn stopped(&self) -> Option<StopReason> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_fault(&self, fault: Option<StoreError>) {
        metrics::gauge!("provider_budgets_storage_fault").set(if fault.is_some() {
            1.0
        } else {
            0.0
        });
        self.faulted.store(fault.is_some(), Ordering::Release);
        *self.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    fn set_stopped(&self, reason: StopReason) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }
}

/// Settings the journal thread needs.
#[derive(Debug)]
pub(crate) struct JournalSettings {
    /// Storage key parts (provider, period) per budget index (grows on reload).
    pub keys: Arc<crate::model::slots::SlotKeys>,
    pub max_delay: Duration,
    pub retention: Duration,
    pub clock: Arc<dyn Clock>,
    /// Most idempotency records kept (`IDEMPOTENCY_CAPACITY`; smaller in tests).
    pub idempotency_capacity: usize,
}

/// What the journal starts from: the restore step's result.
#[derive(Debug, Default)]
pub(crate) struct JournalStart {
    /// Own totals of configured budgets.
    pub loaded: Vec<(u32, Window, u64)>,
    /// Own totals stored for budgets no longer configured: kept (and counted in the
    /// high-water record) until their retention ends.
    pub orphans: Vec<(WindowKey, OwnValue)>,
    /// The batch sequence reached so far.
    pub seq: u64,
    /// While repairing: the acknowledged record. The marks written never claim less than it,
    /// so an interrupted repair cannot accept a loss that the operator did not accept.
    pub floor: Option<Mark>,
}

/// The handle the limiter keeps: the sending side and the thread.
#[derive(Debug)]
pub(crate) struct Journal {
    tx: Sender<Event>,
    thread: Mutex<Option<JoinHandle<()>>>,
    health: Arc<StorageHealth>,
    dir: std::path::PathBuf,
}

impl Journal {
    /// Starts the thread from what the restore step loaded.
    pub fn start(
        store: Arc<Store>,
        view: Arc<View>,
        durable: Arc<DurableTotals>,
        settings: JournalSettings,
        start: JournalStart,
    ) -> std::io::Result<Journal> {
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        durable.publish(start.loaded.iter().copied());
        let health = Arc::new(StorageHealth::default());
        let mono = settings.clock.monotonic();
        let worker = Worker {
            own: start
                .loaded
                .into_iter()
                .map(|(b, w, t)| ((b, w.start_secs()), Entry::loaded(w, t, mono)))
                .collect(),
            orphans: start.orphans.into_iter().collect(),
            dirty: FxHashSet::default(),
            reservations: FxHashMap::default(),
            remember: Vec::new(),
            remembered: None,
            pending: FxHashMap::default(),
            seq: start.seq,
            floor: start.floor,
            wall_start: floor_secs(settings.clock.now()),
            mono_start: mono,
            dir: store.dir().to_path_buf(),
            store,
            view,
            durable,
            health: Arc::clone(&health),
            fault: None,
            reopen_at: Instant::now(),
            backoff: REOPEN_BACKOFF.0,
            settings,
            last_expiry: Instant::now(),
            last_sweep: Instant::now(),
        };
        let dir = worker.dir.clone();
        let thread = std::thread::Builder::new()
            .name("provider-budgets-journal".into())
            .spawn(move || worker.run(rx))?;
        Ok(Journal {
            tx,
            thread: Mutex::new(Some(thread)),
            health,
            dir,
        })
    }

    /// Queues an event. Fails once the thread is gone.
    #[inline]
    pub fn send(&self, event: Event) -> Result<(), Event> {
        self.tx.send(event).map_err(|e| e.0)
    }

    /// Another sender for the same thread (the replicator's, for [`Event::Adopt`]).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    pub fn health(&self) -> &StorageHealth {
        &self.health
    }

    /// The error for a journal that is gone (stopped or dead), or `None` if it runs.
    pub fn gone(&self) -> Option<StoreError> {
        match self.health.stopped()? {
            StopReason::Died(reason) => Some(StoreError::JournalStopped {
                dir: self.dir.clone(),
                reason,
            }),
            StopReason::Stopped(_) => Some(StoreError::JournalStopped {
                dir: self.dir.clone(),
                reason: "the limiter was shut down".into(),
            }),
        }
    }

    /// Waits until everything queued before is durable. Errors when it is not, including when
    /// the thread is gone; after a normal stop, returns the final commit's result.
    pub fn flush(&self) -> AckResult {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.tx.send(Event::Flush(Ack::Blocking(tx))).is_ok() {
            if let Ok(result) = rx.recv() {
                return result;
            }
        }
        match self.health.stopped() {
            Some(StopReason::Stopped(result)) => result,
            Some(StopReason::Died(reason)) => Err(StoreError::JournalStopped {
                dir: self.dir.clone(),
                reason,
            }),
            None => Err(StoreError::JournalStopped {
                dir: self.dir.clone(),
                reason: "the journal thread exited".into(),
            }),
        }
    }

    /// Commits everything queued, then stops the thread and waits for it. Returns the final
    /// commit's result, or why the thread died.
    pub fn stop(&self) -> AckResult {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else {
            return self.flush();
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let result = match self.tx.send(Event::Stop(Ack::Blocking(tx))) {
            Ok(()) => rx.recv().ok(),
            Err(_) => None,
        };
        let _ = handle.join();
        match (result, self.health.stopped()) {
            (Some(result), _) => {
                self.health.set_stopped(StopReason::Stopped(result.clone()));
                result
            }
            (None, Some(StopReason::Died(reason))) => Err(StoreError::JournalStopped {
                dir: self.dir.clone(),
                reason,
            }),
            (None, _) => Err(StoreError::JournalStopped {
                dir: self.dir.clone(),
                reason: "the journal thread exited".into(),
            }),
        }
    }
}

/// Marks the journal dead when its thread unwinds.
struct DeathGuard(Arc<StorageHealth>);

impl Drop for DeathGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the journal thread panicked; records are refused from now on");
            metrics::gauge!("provider_budgets_storage_fault").set(1.0);
            self.0
                .set_stopped(StopReason::Died("the journal thread panicked".into()));
        }
    }
}

/// One own window in the journal's memory.
#[derive(Debug, Clone, Copy)]
struct Entry {
    window: Window,
    total: u64,
    /// Monotonic time of the last record (or of the load at open): retention never deletes a
    /// window touched within `retention` of monotonic time.
    touched: Duration,
}

impl Entry {
    fn loaded(window: Window, total: u64, now: Duration) -> Entry {
        Entry {
            window,
            total,
            touched: now,
        }
    }
}

struct Worker {
    store: Arc<Store>,
    view: Arc<View>,
    durable: Arc<DurableTotals>,
    health: Arc<StorageHealth>,
    settings: JournalSettings,
    dir: std::path::PathBuf,
    /// This node's absolute total per (budget, window start): the truth that gets written.
    own: FxHashMap<(u32, i64), Entry>,
    /// Stored own totals of budgets no longer configured (see [`JournalStart::orphans`]).
    orphans: std::collections::BTreeMap<WindowKey, OwnValue>,
    /// Totals changed since their last successful flush.
    dirty: FxHashSet<(u32, i64)>,
    /// Reservation records to write (`Some`: opened) or remove (`None`: ended) with the next
    /// batch; kept until a batch with them is durable (rewriting one is harmless).
    reservations: FxHashMap<Arc<str>, Option<Box<ReservationValue>>>,
    /// Idempotency records to write with the next batch (the spend they guard is in it too);
    /// kept until a batch with them is durable, like the dirty totals.
    remember: Vec<idempotency::Entry>,
    /// Idempotency records on disk: what tells a batch how many of the oldest to remove.
    /// Counted (a scan) by the first batch that writes one, again after a reopen, then kept
    /// by each write: a process that writes none (the CLI) never pays the scan.
    remembered: Option<usize>,
    /// The current batch's increments per window, not yet in `own` (see [`Worker::pend`]).
    pending: FxHashMap<(u32, i64), (Window, u64)>,
    /// Sequence of the last durable batch.
    seq: u64,
    /// See [`JournalStart::floor`].
    floor: Option<Mark>,
    /// Wall and monotonic time at start: the sane clock for retention.
    wall_start: i64,
    mono_start: Duration,
    /// The storage fault, while the store must be reopened before the next write.
    fault: Option<StoreError>,
    reopen_at: Instant,
    backoff: Duration,
    last_expiry: Instant,
    /// Last sweep of the peers tree for ended windows.
    last_sweep: Instant,
}

impl Worker {
    fn run(mut self, rx: Receiver<Event>) {
        // A local is dropped before the parameters when the thread unwinds: the reason is set
        // before `rx` goes and senders see the channel disconnected.
        let _guard = DeathGuard(Arc::clone(&self.health));
        let mut batch: Vec<Event> = Vec::new();
        loop {
            let first = match rx.recv_timeout(TICK) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    self.idle();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit(Vec::new());
                    return;
                }
            };
            let deadline = Instant::now() + self.settings.max_delay;
            let mut urgent = is_urgent(&first);
            batch.push(first);
            // Gather: everything already queued, and when nobody waits for durability, whatever
            // arrives within max_delay too.
            while batch.len() < MAX_BATCH {
                let next = match rx.try_recv() {
                    Ok(ev) => Some(ev),
                    Err(TryRecvError::Empty) if !urgent => rx.recv_deadline(deadline).ok(),
                    Err(_) => None,
                };
                let Some(ev) = next else { break };
                urgent |= is_urgent(&ev);
                batch.push(ev);
            }
            let stop = batch.iter().any(|e| matches!(e, Event::Stop(_)));
            self.commit(std::mem::take(&mut batch));
            if stop {
                return;
            }
            if self.last_expiry.elapsed() >= TICK {
                self.idle();
            }
        }
    }

    /// Applies a batch: coalesce, one sled batch, one flush, then the acks.
    fn commit(&mut self, batch: Vec<Event>) {
        let mut acks = Vec::new();
        let mut maintain = false;
        let mut records: u64 = 0;
        let mono = self.settings.clock.monotonic();
        for ev in batch {
            match ev {
                Event::Add {
                    budget,
                    window,
                    amount,
                    ack,
                } => {
                    records += 1;
                    self.pend(budget, window, amount);
                    acks.extend(ack);
                }
                Event::AddMany { items, amount, ack } => {
                    records += 1;
                    for (budget, window) in items.iter() {
                        self.pend(budget, window, amount);
                    }
                    acks.extend(ack);
                }
                Event::AddKeyed(keyed) => {
                    records += 1;
                    acks.extend(self.add_keyed(*keyed));
                }
                Event::Adopt {
                    budget,
                    window,
                    total,
                    ..
                } => self.adopt(budget, window, total, mono),
                Event::Reserve { id, value, ack } => {
                    self.reservations.insert(id, Some(value));
                    acks.push(ack);
                }
                Event::Finish {
                    id,
                    items,
                    spent,
                    amount,
                    ack,
                    remember,
                } => {
                    records += 1;
                    self.finish(id, (&items, &spent), amount, remember, mono);
                    acks.extend(ack);
                }
                Event::Flush(ack) | Event::Stop(ack) => acks.push(ack),
                Event::Maintain(ack) => {
                    maintain = true;
                    acks.push(ack);
                }
                Event::Panic => panic!("journal fault injection"),
            }
        }
        self.apply_pending(mono);
        let mut result = self.write(&[], &[]);
        if maintain {
            self.idle();
            if result.is_ok() {
                result = self.write(&[], &[]);
            }
        }
        // Counted before the acks: a client that reads /metrics after its answer sees it.
        if records > 0 {
            metrics::counter!("provider_budgets_records_total").increment(records);
        }
        for ack in acks {
            ack.send(result.clone());
        }
    }

    /// A keyed spend: its increments, and its idempotency record for the same batch. Returns
    /// its acknowledgement.
    fn add_keyed(&mut self, keyed: KeyedAdd) -> Option<Ack> {
        let KeyedAdd {
            items,
            amount,
            others,
            key,
            fingerprint,
            ack,
        } = keyed;
        for (budget, window) in items.iter() {
            self.pend(budget, window, amount);
        }
        for (budget, window, amount) in others {
            self.pend(budget, window, amount);
        }
        let what = Remembered::Spend { fingerprint };
        self.remember
            .push(idempotency::entry(self.sane_now(), &key, what));
        ack
    }

    /// The end of a reservation: its spend, the removal of its record and, when asked, the
    /// idempotency record of how it ended, all for the same batch.
    fn finish(
        &mut self,
        id: Arc<str>,
        (items, spent): (&[(u32, Window)], &[u64]),
        amount: u64,
        remember: Option<Ended>,
        mono: Duration,
    ) {
        for (&(budget, window), &spent) in items.iter().zip(spent) {
            if spent > 0 {
                self.add(budget, window, spent, mono);
            }
        }
        if let Some(ended) = remember {
            let what = match ended {
                Ended::Committed => Remembered::Committed {
                    cost: Money::from_nanos(amount),
                },
                Ended::Released => Remembered::Released,
            };
            self.remember
                .push(idempotency::entry(self.sane_now(), &id, what));
        }
        self.reservations.insert(id, None);
    }

    /// Raises a window's own total to what Redis held of it (the data dir lost it).
    fn adopt(&mut self, budget: u32, window: Window, total: u64, mono: Duration) {
        // Not an addition: the increments before it apply first.
        self.apply_pending(mono);
        let key = (budget, window.start_secs());
        let entry = self.entry(budget, window, mono);
        entry.touched = mono;
        if total > entry.total {
            entry.total = total;
            self.dirty.insert(key);
        }
    }

    /// `amount` more own spend in a window, summed per window over the batch first: one
    /// hash update per charged window instead of three (entry, total, dirty set), applied by
    /// [`Worker::apply_pending`] before anything that is not an addition and before the write.
    #[inline]
    fn pend(&mut self, budget: u32, window: Window, amount: u64) {
        let p = self
            .pending
            .entry((budget, window.start_secs()))
            .or_insert((window, 0));
        p.1 = p.1.saturating_add(amount);
    }

    /// Adds the batch's summed increments to the own totals.
    fn apply_pending(&mut self, mono: Duration) {
        let mut pending = std::mem::take(&mut self.pending);
        for (&(budget, _), &(window, amount)) in &pending {
            self.add(budget, window, amount, mono);
        }
        pending.clear();
        // The map keeps its capacity for the next batch.
        self.pending = pending;
    }

    /// `amount` more own spend in a window: its absolute total grows and becomes dirty.
    fn add(&mut self, budget: u32, window: Window, amount: u64, mono: Duration) {
        let entry = self.entry(budget, window, mono);
        entry.total = entry.total.saturating_add(amount);
        entry.touched = mono;
        self.dirty.insert((budget, window.start_secs()));
    }

    /// The own entry of a window, created on first use. A budget added back by a reload may
    /// find its window among the orphans (stored, not configured at open): the entry takes it
    /// over, so that the window is counted once (in the high-water sum too).
    fn entry(&mut self, budget: u32, window: Window, mono: Duration) -> &mut Entry {
        let key = (budget, window.start_secs());
        if !self.own.contains_key(&key) {
            let mut entry = Entry::loaded(window, 0, mono);
            if !self.orphans.is_empty() {
                if let Some(orphan) = self.orphans.remove(&self.key(budget, key.1)) {
                    entry.total = orphan.total;
                    self.dirty.insert(key);
                }
            }
            self.own.insert(key, entry);
        }
        self.own
            .entry(key)
            .or_insert_with(|| Entry::loaded(window, 0, mono))
    }

    /// Writes every dirty total and the given removals in one batch, flushes, writes the
    /// high-water mark; on success the totals become durable and published. On failure the
    /// store is marked faulted (reopened before the next attempt) and nothing is lost: the
    /// totals stay dirty in memory.
    fn write(&mut self, removed: &[(u32, i64)], removed_orphans: &[WindowKey]) -> AckResult {
        if self.dirty.is_empty()
            && self.reservations.is_empty()
            && self.remember.is_empty()
            && removed.is_empty()
            && removed_orphans.is_empty()
        {
            return match &self.fault {
                Some(e) => Err(e.clone()),
                None => Ok(()),
            };
        }
        let result = self.try_write(removed, removed_orphans);
        match &result {
            Ok(()) => {
                if self.fault.take().is_some() {
                    tracing::info!(dir = %self.dir.display(), "storage works again; every counted total is durable");
                    self.health.set_fault(None);
                }
                self.backoff = REOPEN_BACKOFF.0;
            }
            Err(e) => {
                metrics::counter!("provider_budgets_journal_errors_total").increment(1);
                if self.fault.is_none() {
                    tracing::error!(error = %e, "storage fault: spend keeps being counted in memory and is written once the disk works again");
                }
                self.health.set_fault(Some(e.clone()));
                self.fault = Some(e.clone());
            }
        }
        result
    }

    /// After a storage fault, once its backoff has passed: a fresh sled handle and every
    /// total marked dirty again; `Err` (the fault) while backing off.
    fn recover(&mut self) -> AckResult {
        if let Some(fault) = &self.fault {
            if Instant::now() < self.reopen_at {
                return Err(fault.clone());
            }
            self.reopen_at = Instant::now() + self.backoff;
            self.backoff = (self.backoff * 2).min(REOPEN_BACKOFF.1);
            // sled's I/O errors are sticky: a fresh handle, then every total again (what the
            // failed flushes may or may not have left on disk does not matter: absolute
            // totals).
            self.store.reopen()?;
            self.seq = self.seq.max(self.store.seq()?);
            self.remembered = None;
            self.dirty.extend(self.own.keys().copied());
        }
        Ok(())
    }

    fn try_write(&mut self, removed: &[(u32, i64)], removed_orphans: &[WindowKey]) -> AckResult {
        self.recover()?;
        let started = Instant::now();
        let seq = self.seq + 1;
        let items: Vec<(WindowKey, OwnValue)> = self
            .dirty
            .iter()
            .filter_map(|k| {
                self.own.get(k).map(|e| {
                    (
                        self.key(k.0, k.1),
                        OwnValue {
                            end: e.window.end_secs(),
                            total: e.total,
                        },
                    )
                })
            })
            .collect();
        let removed_keys: Vec<WindowKey> = removed
            .iter()
            .map(|k| self.key(k.0, k.1))
            .chain(removed_orphans.iter().cloned())
            .collect();
        let (forgotten, skipped) = self.over_capacity()?;
        self.store.write_batch(
            seq,
            items.iter().map(|(k, v)| (k, *v)),
            removed_keys.iter(),
            self.reservations
                .iter()
                .map(|(id, v)| (&**id, v.as_deref())),
            &self.remember[skipped..],
            &forgotten,
        )?;
        self.store.flush()?;
        let mut mark = summarize(
            seq,
            self.own
                .iter()
                .filter(|(k, _)| !removed.contains(k))
                .map(|(_, e)| e.total)
                .chain(
                    self.orphans
                        .iter()
                        .filter(|(k, _)| !removed_orphans.contains(k))
                        .map(|(_, v)| v.total),
                ),
        );
        if let Some(floor) = self.floor.filter(|f| f.sum > mark.sum) {
            (mark.entries, mark.sum) = (floor.entries, floor.sum);
        }
        self.store.mark(&mark)?;
        metrics::histogram!("provider_budgets_journal_flush_seconds")
            .record(started.elapsed().as_secs_f64());
        self.seq = seq;
        self.reservations.clear();
        if let Some(n) = &mut self.remembered {
            *n = (*n + self.remember.len() - skipped).saturating_sub(forgotten.len());
        }
        self.remember.clear();
        for k in removed {
            self.own.remove(k);
        }
        for k in removed_orphans {
            self.orphans.remove(k);
        }
        let published: Vec<(u32, Window, u64)> = self
            .dirty
            .drain()
            .filter_map(|k| self.own.get(&k).map(|e| (k.0, e.window, e.total)))
            .collect();
        self.update_gauges(published.iter().map(|p| p.0));
        self.durable.publish(published);
        Ok(())
    }

    /// What the next batch must drop to keep at most `idempotency_capacity` records, the
    /// oldest first: records on disk (their sled keys), then, when the batch alone is over
    /// it, how many of its own oldest records are not written at all.
    fn over_capacity(&mut self) -> Result<(Vec<sled::IVec>, usize), StoreError> {
        if self.remember.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let stored = match self.remembered {
            Some(n) => n,
            None => *self.remembered.insert(self.store.count_remembered()?),
        };
        let excess =
            (stored + self.remember.len()).saturating_sub(self.settings.idempotency_capacity);
        let forgotten = match excess {
            0 => Vec::new(),
            n => self.store.oldest_remembered(n)?,
        };
        let skipped = (excess - forgotten.len()).min(self.remember.len());
        Ok((forgotten, skipped))
    }

    fn key(&self, budget: u32, start: i64) -> WindowKey {
        WindowKey::of(&self.settings.keys.get(budget), start)
    }

    /// Periodic work: retry failed writes, forget windows past their retention.
    fn idle(&mut self) {
        self.last_expiry = Instant::now();
        if !self.dirty.is_empty() || !self.reservations.is_empty() || !self.remember.is_empty() {
            if let Err(e) = self.write(&[], &[]) {
                tracing::debug!(error = %e, "journal retry failed");
            }
        }
        if self.fault.is_none() {
            self.expire();
        }
        self.update_gauges(0..self.view.len() as u32);
    }

    /// The sane clock (see the module doc): `min(wall now, wall at start + monotonic time
    /// since)`, Unix seconds.
    fn sane_now(&self) -> i64 {
        let wall = floor_secs(self.settings.clock.now());
        let up = self
            .settings
            .clock
            .monotonic()
            .saturating_sub(self.mono_start);
        let steady = self
            .wall_start
            .saturating_add(i64::try_from(up.as_secs()).unwrap_or(i64::MAX));
        wall.min(steady)
    }

    /// Deletes the windows past retention by the sane clock (see the module doc), and the
    /// idempotency records older than `IDEMPOTENCY_TTL` by it.
    fn expire(&mut self) {
        let retention = self.settings.retention;
        let retention_secs = i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
        let now = self.sane_now();
        let mono = self.settings.clock.monotonic();
        let up = mono.saturating_sub(self.mono_start);
        self.expire_remembered(now);
        let mut cutoff = now.saturating_sub(retention_secs);
        // A window touched within retention (monotonic) is never deleted, whatever the clock
        // says: lower the cutoff below it, for the view and the peers as well.
        for e in self.own.values() {
            if mono.saturating_sub(e.touched) < retention && e.window.end_secs() <= cutoff {
                cutoff = e.window.end_secs() - 1;
            }
        }
        let view = &self.view;
        let removed: Vec<(u32, i64)> = self
            .own
            .iter()
            .filter(|(k, e)| {
                e.window.end_secs() <= view.keep_cutoff(k.0, cutoff, now) && !self.dirty.contains(k)
            })
            .map(|(k, _)| *k)
            .collect();
        // Orphans were loaded at open: never deleted before `retention` of uptime.
        let removed_orphans: Vec<WindowKey> = if up >= retention {
            self.orphans
                .iter()
                .filter(|(_, v)| v.end <= cutoff)
                .map(|(k, _)| k.clone())
                .collect()
        } else {
            Vec::new()
        };
        if !removed.is_empty() || !removed_orphans.is_empty() {
            if let Err(e) = self.write(&removed, &removed_orphans) {
                tracing::warn!(error = %e, "could not remove expired windows");
                return;
            }
            self.durable.remove(&removed);
        }
        self.view.prune(cutoff, now);
        if self.last_sweep.elapsed() >= SWEEP && up >= retention {
            self.last_sweep = Instant::now();
            // The others' totals are kept by budget key, not slot: keep every window a
            // sliding budget still counts (the lowest of their cutoffs).
            let view = &self.view;
            let peers_cutoff =
                (0..view.len() as u32).fold(cutoff, |c, s| view.keep_cutoff(s, c, now));
            if let Err(e) = self.store.remove_peers_ended(peers_cutoff) {
                tracing::warn!(error = %e, "could not remove expired peers entries");
            }
        }
    }

    /// Removes the idempotency records older than `IDEMPOTENCY_TTL` at the sane time `now`.
    fn expire_remembered(&mut self, now: i64) {
        let ttl = i64::try_from(idempotency::IDEMPOTENCY_TTL.as_secs()).unwrap_or(i64::MAX);
        match self.store.remove_remembered_before(now.saturating_sub(ttl)) {
            Ok(n) => {
                if let Some(stored) = &mut self.remembered {
                    *stored = stored.saturating_sub(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not remove expired idempotency records"),
        }
    }

    fn update_gauges(&self, budgets: impl IntoIterator<Item = u32>) {
        let now = floor_secs(self.settings.clock.now());
        let mut seen = FxHashSet::default();
        for b in budgets {
            // A credit series changes the spend of the budget it credits.
            let b = self.view.credited_budget(b).unwrap_or(b);
            // A template's series: in the template's aggregates only (a gauge per series
            // would grow with the key population).
            // Other units: in the unit's gauges, set by the sidecar's scrape (never dollars).
            if self.view.is_templated(b) || self.view.unit(b).is_count() || !seen.insert(b) {
                continue;
            }
            let spend = self.view.totals_at(b, now).total();
            // A sliding budget's room: what the weighted previous window leaves.
            let counted = self.view.sliding_spend(b, now).unwrap_or(spend);
            let remaining = self.view.limit(b).saturating_sub(counted);
            // Labels as the sidecar's scrape sets them (serve/metrics.rs): key name and period.
            let (provider, period) = self.settings.keys.get(b).store_parts();
            metrics::gauge!("provider_budgets_spend_usd", "provider" => provider.clone(), "period" => period.clone())
                .set(spend.as_usd());
            metrics::gauge!("provider_budgets_limit_usd", "provider" => provider.clone(), "period" => period.clone())
                .set(self.view.limit(b).as_usd());
            metrics::gauge!("provider_budgets_remaining_usd", "provider" => provider, "period" => period)
                .set(remaining.as_usd());
        }
    }
}

fn is_urgent(ev: &Event) -> bool {
    match ev {
        Event::Add { ack, .. } | Event::AddMany { ack, .. } | Event::Finish { ack, .. } => {
            ack.is_some()
        }
        Event::AddKeyed(keyed) => keyed.ack.is_some(),
        Event::Adopt { urgent, .. } => *urgent,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_stays_small() {
        // What the channel's ring holds per event (see `Items`).
        assert!(
            std::mem::size_of::<Event>() <= 96,
            "{}",
            std::mem::size_of::<Event>()
        );
    }

    #[test]
    fn idempotency_records_stay_within_the_capacity_oldest_first() {
        use crate::durable::restore::{restore, Verify};
        use crate::model::clock::FakeClock;

        let dir = tempfile::tempdir().unwrap();
        let yaml = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";
        let config = crate::config::Config::from_yaml_str(yaml)
            .unwrap()
            .data_dir(dir.path());
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let restored = restore(&store, &config, "n", Verify::Strict).unwrap();
        let start = 1_714_521_600;
        let clock = FakeClock::new(jiff::Timestamp::from_second(start).unwrap());
        let settings = JournalSettings {
            keys: Arc::new(restored.keys),
            max_delay: Duration::from_millis(1),
            retention: Duration::from_secs(3600),
            clock: Arc::new(clock.clone()),
            idempotency_capacity: 3,
        };
        let journal = Journal::start(
            Arc::clone(&store),
            restored.view,
            Arc::default(),
            settings,
            restored.journal,
        )
        .unwrap();
        let window = Window::from_secs(start, start + 86_400);
        let keyed = |key: &str, fingerprint| {
            let mut items = Items::default();
            items.push((0, window));
            Event::AddKeyed(Box::new(KeyedAdd {
                items,
                amount: 1,
                others: Vec::new(),
                key: key.into(),
                fingerprint,
                ack: None,
            }))
        };
        let stored = || -> Vec<String> {
            let records = store.load_remembered().unwrap();
            records.into_iter().map(|r| r.key).collect()
        };
        // Over the capacity within batches: the oldest go (one stamp: sled's key order).
        for i in 0..5 {
            journal.send(keyed(&format!("a{i}"), i)).unwrap();
        }
        journal.flush().unwrap();
        assert_eq!(stored(), ["a2", "a3", "a4"]);
        // Later records push the oldest on disk out, one by one.
        for (i, key) in ["b0", "b1"].into_iter().enumerate() {
            clock.pass(Duration::from_secs(1));
            journal.send(keyed(key, 10 + i as u64)).unwrap();
            journal.flush().unwrap();
        }
        assert_eq!(stored(), ["a4", "b0", "b1"]);
        // A record left out never leaves its spend out.
        journal.stop().unwrap();
        let own = store.load_own().unwrap();
        assert_eq!(own.iter().map(|(_, v)| v.total).sum::<u64>(), 7);
    }
}
