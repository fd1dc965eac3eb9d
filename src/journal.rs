//! The journal thread: makes recorded spend durable, in batches.
//!
//! `record` bumps the view and sends an [`Event`] on a bounded crossbeam channel; this thread
//! owns the other end. It drains whatever is queued (waiting up to `max_delay` for more when
//! nobody is blocked on durability), adds the increments into its map of this node's absolute
//! totals per window, writes the changed totals in ONE sled batch and flushes once (group
//! commit: one fsync serves every waiter of the batch), then acknowledges the waiters and
//! publishes the new durable totals for the replicator.
//!
//! Failure handling: when sled refuses a write or a flush, the waiters get the error, the totals
//! stay marked dirty and are written again at the next batch or retry tick — recorded spend is
//! never dropped. Because totals are absolute, writing one twice is harmless.
//!
//! The channel is bounded so that a stalled disk slows `record` down (backpressure) instead of
//! growing memory without limit; with its capacity of 65 536 events that only happens when the
//! disk cannot keep up for a long time.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::clock::{floor_secs, Clock};
use crate::store::{OwnValue, Store, StoreError, WindowKey};
use crate::view::View;
use crate::window::Window;

/// Events queued before `record` blocks.
const CHANNEL_CAPACITY: usize = 1 << 16;
/// Largest batch committed at once, so a flood of records still gets flushed regularly.
const MAX_BATCH: usize = 1 << 16;
/// How often the thread wakes up when idle: retries failed writes, expires old windows.
const TICK: Duration = Duration::from_millis(250);

/// Result sent to a durability waiter.
pub(crate) type AckResult = Result<(), StoreError>;

/// How a waiter wants to hear that its event is durable.
#[derive(Debug)]
pub(crate) enum Ack {
    Blocking(Sender<AckResult>),
    Async(tokio::sync::oneshot::Sender<AckResult>),
}

impl Ack {
    fn send(self, result: AckResult) {
        // A waiter that gave up (dropped its receiver) needs no answer.
        match self {
            Ack::Blocking(tx) => drop(tx.send(result)),
            Ack::Async(tx) => drop(tx.send(result)),
        }
    }
}

/// What the request path tells the journal.
#[derive(Debug)]
pub(crate) enum Event {
    /// `amount` more spend of this node for a budget window.
    Add {
        budget: u32,
        window: Window,
        amount: u64,
        ack: Option<Ack>,
    },
    /// Raise this node's total of a window to at least `total`: the replicator found a larger
    /// own field in Redis (this node's data dir was wiped), so the durable total adopts it.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Adopt {
        budget: u32,
        window: Window,
        total: u64,
    },
    /// Acknowledge once everything queued before is durable.
    Flush(Ack),
    /// Commit what is queued, acknowledge, and stop.
    Stop(Ack),
}

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

    fn expire(&self, cutoff: i64) {
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (w, _)| w.end_secs() > cutoff);
    }

    /// A copy of every durable own total: (budget, window, nanos).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn snapshot(&self) -> Vec<(u32, Window, u64)> {
        let map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(&(b, _), &(w, t))| (b, w, t)).collect()
    }
}

/// Settings the journal thread needs.
#[derive(Debug)]
pub(crate) struct JournalSettings {
    /// Storage key parts (provider, period) per budget index (grows on reload).
    pub keys: Arc<crate::reload::SlotKeys>,
    pub max_delay: Duration,
    pub retention: Duration,
    pub clock: Arc<dyn Clock>,
}

/// The handle the limiter keeps: the sending side and the thread.
#[derive(Debug)]
pub(crate) struct Journal {
    tx: Sender<Event>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Journal {
    /// Starts the thread. `loaded` are the own totals read from the store at open.
    pub fn start(
        store: Arc<Store>,
        view: Arc<View>,
        durable: Arc<DurableTotals>,
        settings: JournalSettings,
        loaded: Vec<(u32, Window, u64)>,
    ) -> std::io::Result<Journal> {
        let (tx, rx) = crossbeam_channel::bounded(CHANNEL_CAPACITY);
        durable.publish(loaded.iter().copied());
        let worker = Worker {
            own: loaded
                .into_iter()
                .map(|(b, w, t)| ((b, w.start_secs()), (w, t)))
                .collect(),
            dirty: FxHashSet::default(),
            store,
            view,
            durable,
            settings,
            last_expiry: Instant::now(),
            last_sweep: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("provider-budgets-journal".into())
            .spawn(move || worker.run(rx))?;
        Ok(Journal {
            tx,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues an event. Fails only after `stop`.
    #[inline]
    pub fn send(&self, event: Event) -> Result<(), Event> {
        self.tx.send(event).map_err(|e| e.0)
    }

    /// Another sender for the same thread (the replicator's, for [`Event::Adopt`]).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn sender(&self) -> Sender<Event> {
        self.tx.clone()
    }

    /// Commits everything queued, then stops the thread and waits for it.
    pub fn stop(&self) -> AckResult {
        let handle = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(handle) = handle else {
            return Ok(());
        };
        let (tx, rx) = crossbeam_channel::bounded(1);
        let result = match self.tx.send(Event::Stop(Ack::Blocking(tx))) {
            Ok(()) => rx.recv().unwrap_or(Ok(())),
            Err(_) => Ok(()),
        };
        let _ = handle.join();
        result
    }
}

struct Worker {
    store: Arc<Store>,
    view: Arc<View>,
    durable: Arc<DurableTotals>,
    settings: JournalSettings,
    /// This node's absolute total per (budget, window start): the truth that gets written.
    own: FxHashMap<(u32, i64), (Window, u64)>,
    /// Totals changed since their last successful flush.
    dirty: FxHashSet<(u32, i64)>,
    last_expiry: Instant,
    /// Last full sweep of the store for ended windows (also those of budgets no longer
    /// configured, which the in-memory map does not know).
    last_sweep: Instant,
}

/// How often the store is swept for ended windows even when the in-memory map saw none.
const SWEEP: Duration = Duration::from_secs(60);

impl Worker {
    fn run(mut self, rx: Receiver<Event>) {
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
        let mut records: u64 = 0;
        for ev in batch {
            match ev {
                Event::Add {
                    budget,
                    window,
                    amount,
                    ack,
                } => {
                    records += 1;
                    let key = (budget, window.start_secs());
                    let entry = self.own.entry(key).or_insert((window, 0));
                    entry.1 = entry.1.saturating_add(amount);
                    self.dirty.insert(key);
                    acks.extend(ack);
                }
                Event::Adopt {
                    budget,
                    window,
                    total,
                } => {
                    let key = (budget, window.start_secs());
                    let entry = self.own.entry(key).or_insert((window, 0));
                    if total > entry.1 {
                        entry.1 = total;
                        self.dirty.insert(key);
                    }
                }
                Event::Flush(ack) | Event::Stop(ack) => acks.push(ack),
            }
        }
        let result = self.write_dirty();
        if let Err(e) = &result {
            tracing::error!(error = %e, "journal write failed; will retry");
            metrics::counter!("provider_budgets_journal_errors_total").increment(1);
        }
        for ack in acks {
            ack.send(result.clone());
        }
        if records > 0 {
            metrics::counter!("provider_budgets_records_total").increment(records);
        }
    }

    /// Writes and flushes every dirty total; on success they become durable and published.
    fn write_dirty(&mut self) -> AckResult {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let items: Vec<(WindowKey, OwnValue)> = self
            .dirty
            .iter()
            .filter_map(|k| {
                self.own.get(k).map(|&(w, t)| {
                    (
                        self.key(k.0, w),
                        OwnValue {
                            end: w.end_secs(),
                            total: t,
                        },
                    )
                })
            })
            .collect();
        self.store.write_own(items.iter().map(|(k, v)| (k, *v)))?;
        let flush_started = Instant::now();
        self.store.flush()?;
        metrics::histogram!("provider_budgets_journal_flush_seconds")
            .record(flush_started.elapsed().as_secs_f64());
        let published: Vec<(u32, Window, u64)> = self
            .dirty
            .drain()
            .filter_map(|k| self.own.get(&k).map(|&(w, t)| (k.0, w, t)))
            .collect();
        self.update_gauges(published.iter().map(|p| p.0));
        self.durable.publish(published);
        Ok(())
    }

    fn key(&self, budget: u32, window: Window) -> WindowKey {
        let (provider, period) = self.settings.keys.get(budget);
        WindowKey {
            provider,
            period,
            start: window.start_secs(),
        }
    }

    /// Periodic work: retry failed writes, forget windows past their retention.
    fn idle(&mut self) {
        self.last_expiry = Instant::now();
        if !self.dirty.is_empty() {
            if let Err(e) = self.write_dirty() {
                tracing::warn!(error = %e, "journal retry failed");
            }
        }
        let now = floor_secs(self.settings.clock.now());
        let retention = i64::try_from(self.settings.retention.as_secs()).unwrap_or(i64::MAX);
        let cutoff = now.saturating_sub(retention);
        let dirty = &self.dirty;
        let before = self.own.len();
        self.own
            .retain(|k, (w, _)| w.end_secs() > cutoff || dirty.contains(k));
        if self.own.len() != before || self.last_sweep.elapsed() >= SWEEP {
            self.last_sweep = Instant::now();
            self.durable.expire(cutoff);
            self.view.prune(cutoff);
            if let Err(e) = self.store.remove_ended(cutoff) {
                tracing::warn!(error = %e, "could not remove expired windows");
            }
        }
        self.update_gauges(0..self.view.len() as u32);
    }

    fn update_gauges(&self, budgets: impl IntoIterator<Item = u32>) {
        let now = floor_secs(self.settings.clock.now());
        let mut seen = FxHashSet::default();
        for b in budgets {
            if !seen.insert(b) {
                continue;
            }
            let spend = self.view.totals_at(b, now).total();
            let remaining = self.view.limit(b).saturating_sub(spend);
            let provider = self.settings.keys.get(b).0;
            metrics::gauge!("provider_budgets_spend_usd", "provider" => provider.clone())
                .set(spend.as_usd());
            metrics::gauge!("provider_budgets_limit_usd", "provider" => provider.clone())
                .set(self.view.limit(b).as_usd());
            metrics::gauge!("provider_budgets_remaining_usd", "provider" => provider)
                .set(remaining.as_usd());
        }
    }
}

fn is_urgent(ev: &Event) -> bool {
    !matches!(ev, Event::Add { ack: None, .. })
}
