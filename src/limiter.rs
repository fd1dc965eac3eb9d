//! [`Limiter`]: the facade a router holds. It owns the view, the journal thread, the store and
//! (with Redis configured) the replicator, and stops them when the last clone is dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use jiff::Timestamp;

use crate::clock::{floor_secs, Clock, SystemClock};
use crate::config::{Config, ConfigError, UnknownProvider};
use crate::error::{Error, RecordError};
use crate::filter::{Exceeded, Memo, NoDeployments, Slot};
use crate::journal::{Ack, DurableTotals, Event, Journal, JournalSettings};
use crate::money::Money;
use crate::provider::{CacheMap, Deployment, Resolution, Resolver};
use crate::status::{BudgetStatus, ReplicationStatus};
use crate::store::{window_of, Store, StoreError};
use crate::view::View;
use crate::window::{Schedule, Window};

/// Enforces the configured budgets. Cheap to clone (one `Arc`); share it across threads and
/// tasks. The background threads stop when the last clone is dropped or on [`Limiter::shutdown`].
#[derive(Debug, Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Config,
    clock: Arc<dyn Clock>,
    resolver: Resolver,
    /// Shared with the journal (which prunes it) and the replicator (which raises others).
    view: Arc<View>,
    journal: Journal,
    node_id: String,
    /// Fleet replication, when Redis is configured.
    #[cfg(feature = "redis")]
    replicator: Option<crate::replicate::Replicator>,
    /// Set by `shutdown`: later records are refused instead of queued to a stopped journal.
    closed: AtomicBool,
}

impl Inner {
    /// Stops the background work in dependency order: make everything durable, ship it in a
    /// last sync round, then stop the journal. Idempotent.
    fn stop(&self) -> Result<(), StoreError> {
        #[cfg(feature = "redis")]
        if let Some(r) = &self.replicator {
            let (tx, rx) = crossbeam_channel::bounded(1);
            if self.journal.send(Event::Flush(Ack::Blocking(tx))).is_ok() {
                let _ = rx.recv();
            }
            r.stop();
        }
        self.journal.stop()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Drop guard: nothing recorded is left in memory when the last handle goes.
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "final journal commit failed");
        }
    }
}

impl Limiter {
    /// Opens the data dir of `config.storage.dir`, restores the stored totals and starts the
    /// journal (and the replicator when Redis is configured).
    pub fn open(config: Config) -> Result<Limiter, Error> {
        Limiter::open_with_clock(config, Arc::new(SystemClock))
    }

    /// [`Limiter::open`] with another clock (tests use [`FakeClock`](crate::FakeClock)).
    pub fn open_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Limiter, Error> {
        config.validate()?;
        // An unusable Redis URL fails here, naming it (redacted), not later in every round.
        #[cfg(feature = "redis")]
        if let Some(r) = &config.redis {
            crate::replicate::check_url(&r.url)?;
        }
        let dir = config.storage.dir.clone().ok_or(ConfigError::NoDataDir)?;
        let store = Arc::new(Store::open(&dir)?);
        let node_id = store.node_id(config.node_id.as_deref(), &generate_node_id())?;
        let view =
            Arc::new(View::new(config.budgets.iter().map(|b| {
                (Schedule::new(b.period, config.window_anchor), b.limit)
            })));
        let keys: Vec<(String, String)> = config
            .budgets
            .iter()
            .map(|b| (b.provider.clone(), b.period.to_string()))
            .collect();
        let budget_of = |provider: &str, period: &str| {
            keys.iter()
                .position(|(p, q)| p == provider && q == period)
                .map(|i| i as u32)
        };
        // Totals of budgets no longer configured stay stored until their retention ends.
        #[cfg(not(feature = "redis"))]
        if config.redis.is_some() {
            return Err(crate::error::ReplicationError::NotBuilt.into());
        }
        let mut loaded = Vec::new();
        for (key, value) in store.load_own()? {
            if let Some(b) = budget_of(&key.provider, &key.period) {
                loaded.push((b, window_of(&key, value.end), value.total));
            }
        }
        // In bulk: one view list swap per budget, not one per window (linear in windows).
        view.raise_own_many(loaded.iter().map(|&(b, w, t)| (b, w, Money::from_nanos(t))));
        let peers = store.load_peers()?;
        let mut others_loaded = Vec::new();
        for (key, value) in &peers {
            if let Some(b) = budget_of(&key.provider, &key.period) {
                let others = Money::from_nanos(value.others);
                others_loaded.push((b, window_of(key, value.end), others));
            }
        }
        view.raise_others_many(others_loaded);
        let durable = Arc::new(DurableTotals::default());
        let journal = Journal::start(
            Arc::clone(&store),
            Arc::clone(&view),
            Arc::clone(&durable),
            JournalSettings {
                keys: keys.clone(),
                max_delay: config.storage.max_delay,
                retention: config.storage.retention,
                clock: Arc::clone(&clock),
            },
            loaded,
        )
        .map_err(|source| Error::Thread {
            what: "journal",
            source,
        })?;
        #[cfg(feature = "redis")]
        let replicator = match &config.redis {
            Some(redis) => {
                let r = crate::replicate::Replicator::start(crate::replicate::ReplicatorParts {
                    redis: redis.clone(),
                    node_id: node_id.clone(),
                    keys,
                    clock: Arc::clone(&clock),
                    view: Arc::clone(&view),
                    store: Arc::clone(&store),
                    durable: Arc::clone(&durable),
                    journal: journal.sender(),
                    peers,
                })?;
                // First round before any record: own = max(disk, own field in Redis), so a node
                // whose disk was wiped does not count its spend twice. Redis being down is not
                // an error here (status reports it); the round is bounded by the timeouts.
                if let Err(e) = r.sync() {
                    tracing::warn!(error = %e, "initial redis sync failed; starting from local data");
                }
                Some(r)
            }
            None => None,
        };
        #[cfg(not(feature = "redis"))]
        drop((keys, peers));
        Ok(Limiter {
            inner: Arc::new(Inner {
                #[cfg(feature = "redis")]
                replicator,
                resolver: Resolver::new(&config),
                config,
                clock,
                view,
                journal,
                node_id,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// This node's id (configured, or generated once and kept in the data dir).
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The clock's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    // ---- record ------------------------------------------------------------------------------

    /// Counts `cost` against `provider`'s budget now. Returns at once: the journal makes it
    /// durable within `storage.max_delay`.
    #[inline]
    pub fn record(&self, provider: &str, cost: Money) -> Result<(), RecordError> {
        // "Now" is never past retention: skip `record_at`'s age check (a second clock read).
        self.add(provider, cost, self.inner.clock.now(), None)
    }

    /// Counts `cost` in the window of `at` (e.g. the time the request was made).
    /// Fails with [`RecordError::Expired`] when that window ended more than
    /// `storage.retention` ago.
    pub fn record_at(&self, provider: &str, cost: Money, at: Timestamp) -> Result<(), RecordError> {
        self.check_age(provider, at)?;
        self.add(provider, cost, at, None)
    }

    /// Counts `cost` now and returns once it is durable on disk (group commit: concurrent
    /// callers share one fsync). Blocks the thread; from async code use
    /// [`Limiter::record_durable_async`].
    pub fn record_durable(&self, provider: &str, cost: Money) -> Result<(), RecordError> {
        self.record_durable_at(provider, cost, self.inner.clock.now())
    }

    /// [`Limiter::record_durable`] in the window of `at`.
    pub fn record_durable_at(
        &self,
        provider: &str,
        cost: Money,
        at: Timestamp,
    ) -> Result<(), RecordError> {
        self.check_age(provider, at)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.add(provider, cost, at, Some(Ack::Blocking(tx)))?;
        rx.recv().map_err(|_| RecordError::Closed)??;
        Ok(())
    }

    /// [`Limiter::record_durable`] for async code: awaits the fsync without blocking a worker.
    pub async fn record_durable_async(
        &self,
        provider: &str,
        cost: Money,
    ) -> Result<(), RecordError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.add(provider, cost, self.inner.clock.now(), Some(Ack::Async(tx)))?;
        rx.await.map_err(|_| RecordError::Closed)??;
        Ok(())
    }

    /// Refuses a timestamp whose window is already past retention: the journal would delete
    /// it at its next pass, so counting it would only pretend.
    fn check_age(&self, provider: &str, at: Timestamp) -> Result<(), RecordError> {
        let retention = &self.inner.config.storage.retention;
        let secs = floor_secs(at);
        let cutoff = floor_secs(self.now())
            .saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        if secs >= cutoff {
            return Ok(());
        }
        let Some(b) = self.inner.resolver.budget_of_provider(provider) else {
            return Ok(()); // `add` reports the missing budget
        };
        if self.inner.view.schedule(b).window_at_secs(secs).end_secs() > cutoff {
            return Ok(());
        }
        Err(RecordError::Expired {
            provider: provider.to_owned(),
            at,
            retention: humantime::format_duration(*retention).to_string(),
        })
    }

    #[inline]
    fn add(
        &self,
        provider: &str,
        cost: Money,
        at: Timestamp,
        ack: Option<Ack>,
    ) -> Result<(), RecordError> {
        let inner = &*self.inner;
        let budget =
            inner
                .resolver
                .budget_of_provider(provider)
                .ok_or_else(|| RecordError::NoBudget {
                    provider: provider.to_owned(),
                })?;
        if inner.closed.load(Ordering::Acquire) {
            return Err(RecordError::Closed);
        }
        let (window, ack) = if cost == Money::ZERO {
            // Nothing to count; a durable caller still gets its answer after the flush.
            match ack {
                None => return Ok(()),
                Some(ack) => {
                    return inner
                        .journal
                        .send(Event::Flush(ack))
                        .map_err(|_| RecordError::Closed)
                }
            }
        } else {
            (inner.view.add_own(budget, floor_secs(at), cost), ack)
        };
        inner
            .journal
            .send(Event::Add {
                budget,
                window,
                amount: cost.as_nanos(),
                ack,
            })
            .map_err(|_| RecordError::Closed)
    }

    // ---- filter ------------------------------------------------------------------------------

    /// The deployments whose provider may still spend, in their order. Providers without a
    /// budget pass; unresolvable ones follow `unknown_provider`. An empty input gives an empty
    /// result; a non-empty input with nothing left gives [`NoDeployments`].
    pub fn filter<'a, D: Deployment>(
        &self,
        deployments: &'a [D],
    ) -> Result<Vec<&'a D>, NoDeployments> {
        let now = floor_secs(self.inner.clock.now());
        let mut memo = Memo::default();
        let mut out = Vec::with_capacity(deployments.len());
        let cache = self.inner.resolver.cache();
        for d in deployments {
            if self.passes(self.slot_in(&cache, d), now, &mut memo) {
                out.push(d);
            }
        }
        if out.is_empty() && !deployments.is_empty() {
            return Err(
                self.no_deployments(deployments.iter().map(|d| (self.slot(d), d.model())), now)
            );
        }
        Ok(out)
    }

    /// [`Limiter::filter`] that removes the dropped deployments from `deployments` (no
    /// allocation). On [`NoDeployments`] the vector is left unchanged.
    pub fn filter_in_place<D: Deployment>(
        &self,
        deployments: &mut Vec<D>,
    ) -> Result<(), NoDeployments> {
        let now = floor_secs(self.inner.clock.now());
        let mut memo = Memo::default();
        let cache = self.inner.resolver.cache();
        let any = deployments
            .iter()
            .any(|d| self.passes(self.slot_in(&cache, d), now, &mut memo));
        if !any {
            if deployments.is_empty() {
                return Ok(());
            }
            return Err(
                self.no_deployments(deployments.iter().map(|d| (self.slot(d), d.model())), now)
            );
        }
        deployments.retain(|d| self.passes(self.slot_in(&cache, d), now, &mut memo));
        Ok(())
    }

    /// Resolves a deployment list once, for routers whose list rarely changes: the returned
    /// [`Prepared`] filters with one clock read and one atomic read per distinct budget.
    pub fn prepare<D: Deployment>(&self, deployments: &[D]) -> Prepared {
        Prepared {
            limiter: self.clone(),
            slots: deployments.iter().map(|d| self.slot_uncached(d)).collect(),
            models: deployments.iter().map(|d| d.model().to_owned()).collect(),
        }
    }

    #[inline]
    fn slot<D: Deployment + ?Sized>(&self, d: &D) -> Slot {
        self.to_slot(self.inner.resolver.resolve_cached(d))
    }

    /// [`Limiter::slot`] with the model cache loaded once per call.
    #[inline]
    fn slot_in<D: Deployment + ?Sized>(&self, cache: &CacheMap, d: &D) -> Slot {
        self.to_slot(self.inner.resolver.resolve_in(cache, d))
    }

    fn slot_uncached<D: Deployment + ?Sized>(&self, d: &D) -> Slot {
        self.to_slot(self.inner.resolver.resolve(d))
    }

    #[inline]
    fn to_slot(&self, r: Resolution) -> Slot {
        match r {
            Resolution::Budget(b) => Slot::Budget(b),
            Resolution::NoBudget => Slot::Pass,
            Resolution::Unknown => {
                metrics::counter!("provider_budgets_unknown_provider_total").increment(1);
                match self.inner.config.unknown_provider {
                    UnknownProvider::Allow => Slot::Pass,
                    UnknownProvider::Deny => Slot::Deny,
                }
            }
        }
    }

    #[inline]
    fn passes(&self, slot: Slot, now: i64, memo: &mut Memo) -> bool {
        match slot {
            Slot::Pass => true,
            Slot::Deny => false,
            Slot::Budget(b) => !memo.exhausted(b, || self.inner.view.exhausted(b, now)),
        }
    }

    /// The error for an empty result (cold path).
    fn no_deployments<'a>(
        &self,
        slots: impl Iterator<Item = (Slot, &'a str)>,
        now: i64,
    ) -> NoDeployments {
        let mut err = NoDeployments {
            exceeded: Vec::new(),
            unknown: Vec::new(),
        };
        let mut seen = Vec::new();
        for (slot, model) in slots {
            match slot {
                Slot::Budget(b) if !seen.contains(&b) => {
                    seen.push(b);
                    err.exceeded.push(Exceeded {
                        provider: self.inner.config.budgets[b as usize].provider.clone(),
                        spend: self.inner.view.totals_at(b, now).total(),
                        limit: self.inner.view.limit(b),
                    });
                }
                Slot::Deny => err.unknown.push(model.to_owned()),
                _ => {}
            }
        }
        metrics::counter!("provider_budgets_no_deployments_total").increment(1);
        err
    }

    // ---- status, flush, shutdown -------------------------------------------------------------

    /// Every budget's state now, in config order (sorted by provider).
    pub fn status(&self) -> Vec<BudgetStatus> {
        self.status_at(self.inner.clock.now())
    }

    /// Every budget's state in the windows containing `at` (windows past their retention read
    /// as empty).
    pub fn status_at(&self, at: Timestamp) -> Vec<BudgetStatus> {
        let secs = floor_secs(at);
        let (replication, problems) = self.replication_status();
        self.inner
            .config
            .budgets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let t = self.inner.view.totals_at(i as u32, secs);
                let spend = t.total();
                BudgetStatus {
                    provider: b.provider.clone(),
                    period: b.period,
                    window: t.window,
                    spend,
                    own_spend: t.own,
                    limit: b.limit,
                    remaining: b.limit.saturating_sub(spend),
                    exhausted: spend >= b.limit,
                    replication: replication.clone(),
                    replication_problem: problems.get(i).cloned().flatten(),
                }
            })
            .collect()
    }

    /// The state of one provider's budget now, `None` when it has none.
    pub fn budget_status(&self, provider: &str) -> Option<BudgetStatus> {
        let b = self.inner.resolver.budget_of_provider(provider)?;
        self.status().into_iter().nth(b as usize)
    }

    /// Every window still held in memory for `provider` (newest first): previous windows stay
    /// readable until their retention ends.
    pub fn windows(&self, provider: &str) -> Vec<(Window, Money)> {
        match self.inner.resolver.budget_of_provider(provider) {
            Some(b) => self
                .inner
                .view
                .windows(b)
                .into_iter()
                .map(|t| (t.window, t.total()))
                .collect(),
            None => Vec::new(),
        }
    }

    /// The limiter's replication state and the problems per budget index.
    fn replication_status(&self) -> (ReplicationStatus, Vec<Option<String>>) {
        #[cfg(feature = "redis")]
        if let (Some(r), Some(redis)) = (&self.inner.replicator, &self.inner.config.redis) {
            let h = r.health();
            // Stale: no successful round within three intervals (or none yet).
            let limit = redis.sync_interval.saturating_mul(3);
            let stale = h
                .last_sync
                .is_none_or(|t| self.now().duration_since(t).unsigned_abs() > limit);
            let status = ReplicationStatus {
                enabled: true,
                last_sync: h.last_sync,
                stale,
                last_error: h.last_error,
                rounds: h.rounds,
                round_trips: h.round_trips,
            };
            return (status, h.problems);
        }
        (ReplicationStatus::default(), Vec::new())
    }

    /// One replication round now: ships this node's durable totals to Redis and reads the
    /// others' (the CLI's `sync`). Fails when no Redis is configured or it cannot be reached.
    pub fn sync(&self) -> Result<(), Error> {
        #[cfg(feature = "redis")]
        if let Some(r) = &self.inner.replicator {
            // Only durable totals are shipped: make everything recorded so far durable first.
            self.flush()?;
            return Ok(r.sync()?);
        }
        Err(crate::error::ReplicationError::NotConfigured.into())
    }

    /// Returns once everything recorded before is durable on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self
            .inner
            .journal
            .send(Event::Flush(Ack::Blocking(tx)))
            .is_err()
        {
            return Ok(()); // stopped: the final commit already ran
        }
        rx.recv().unwrap_or(Ok(()))
    }

    /// Makes everything recorded durable and stops the background threads. Later records
    /// return [`RecordError::Closed`]; filter and status keep answering from memory.
    pub fn shutdown(&self) -> Result<(), Error> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.stop()?;
        Ok(())
    }
}

/// A deployment list resolved once by [`Limiter::prepare`].
#[derive(Debug, Clone)]
pub struct Prepared {
    limiter: Limiter,
    slots: Vec<Slot>,
    models: Vec<String>,
}

impl Prepared {
    /// Number of deployments.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Writes the indices of the usable deployments into `out` (cleared first; reuse it to
    /// avoid allocating).
    #[inline]
    pub fn filter_into(&self, out: &mut Vec<usize>) -> Result<(), NoDeployments> {
        out.clear();
        let now = floor_secs(self.limiter.inner.clock.now());
        let mut memo = Memo::default();
        for (i, &slot) in self.slots.iter().enumerate() {
            if self.limiter.passes(slot, now, &mut memo) {
                out.push(i);
            }
        }
        if out.is_empty() && !self.slots.is_empty() {
            let models = self.models.iter().map(String::as_str);
            return Err(self
                .limiter
                .no_deployments(self.slots.iter().copied().zip(models), now));
        }
        Ok(())
    }

    /// The indices of the usable deployments.
    pub fn filter(&self) -> Result<Vec<usize>, NoDeployments> {
        let mut out = Vec::with_capacity(self.slots.len());
        self.filter_into(&mut out)?;
        Ok(out)
    }
}

/// A node id unlikely to collide: time, process and the std hasher's random keys.
fn generate_node_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    format!("node-{:016x}", h.finish())
}
