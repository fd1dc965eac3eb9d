//! [`Limiter`]: the facade a router holds. It owns the view, the journal thread, the store and
//! (with Redis configured) the replicator, and stops them when the last clone is dropped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use jiff::Timestamp;

use crate::clock::{floor_secs, Clock, SystemClock};
use crate::config::{Config, ConfigError, UnknownProvider};
use crate::error::{Error, RecordError};
use crate::filter::{Exceeded, Memo, NoDeployments, Slot};
use crate::health::Health;
use crate::journal::{Ack, DurableTotals, Event, Journal, JournalSettings, StopReason};
use crate::money::Money;
use crate::provider::{CacheMap, Deployment, Resolution, Resolver, Target};
use crate::reload::SlotKeys;
use crate::restore::{restore, RepairReport, Restored, Verify};
use crate::status::{BudgetStatus, ReplicationStatus};
use crate::store::{Store, StoreError};
use crate::view::View;
use crate::window::Window;

/// Enforces the configured budgets. Cheap to clone (one `Arc`); share it across threads and
/// tasks. The background threads stop when the last clone is dropped or on [`Limiter::shutdown`].
#[derive(Debug, Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Swapped by `reload`.
    config: ArcSwap<Config>,
    clock: Arc<dyn Clock>,
    /// Provider → budget slot; swapped by `reload`.
    resolver: ArcSwap<Resolver>,
    /// (provider, period) per budget slot, shared with the journal and the replicator.
    keys: Arc<SlotKeys>,
    /// Serialises reloads.
    reload_lock: Mutex<()>,
    /// Bumped by each reload: `Prepared` lists resolve again.
    generation: AtomicU64,
    /// The store, for a reload to read what a new budget already has stored.
    store: Arc<Store>,
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
    ///
    /// # Errors
    ///
    /// As [`Limiter::open_with_clock`].
    pub fn open(config: Config) -> Result<Limiter, Error> {
        Limiter::open_with_clock(config, Arc::new(SystemClock))
    }

    /// [`Limiter::open`] with another clock (tests use [`FakeClock`](crate::FakeClock)).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid config (or no data dir), [`Error::Storage`] when the
    /// data dir is locked, unreadable, belongs to another node id, or lost acknowledged spend
    /// ([`StoreError::Corrupt`] of tree `high-water`: run `provider-budgets repair`), [`Error::Thread`] when a thread
    /// cannot start.
    pub fn open_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Limiter, Error> {
        Limiter::open_verified(config, clock, Verify::Strict)
    }

    fn open_verified(
        config: Config,
        clock: Arc<dyn Clock>,
        verify: Verify,
    ) -> Result<Limiter, Error> {
        config.validate()?;
        #[cfg(not(feature = "redis"))]
        if config.redis.is_some() {
            return Err(crate::error::ReplicationError::NotBuilt.into());
        }
        let dir = config.storage.dir.clone().ok_or(ConfigError::NoDataDir)?;
        if config.redis.as_ref().is_some_and(|r| r.url.is_empty()) {
            return Err(ConfigError::NoRedisUrl.into());
        }
        // An unusable Redis URL fails here, naming it (redacted), not later in every round.
        #[cfg(feature = "redis")]
        if let Some(r) = &config.redis {
            crate::replicate::check_url(&r.url)?;
        }
        let store = Arc::new(Store::open(&dir)?);
        let restored = restore(&store, &config, &generate_node_id(), verify)?;
        let Restored {
            node_id,
            keys,
            view,
            journal: start,
            peers,
        } = restored;
        let durable = Arc::new(DurableTotals::default());
        let slot_keys = Arc::new(SlotKeys::new(keys.to_vec()));
        let journal = Journal::start(
            Arc::clone(&store),
            Arc::clone(&view),
            Arc::clone(&durable),
            JournalSettings {
                keys: Arc::clone(&slot_keys),
                max_delay: config.storage.max_delay,
                retention: config.storage.retention,
                clock: Arc::clone(&clock),
            },
            start,
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
                    keys: Arc::clone(&slot_keys),
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
        drop(peers);
        Ok(Limiter {
            inner: Arc::new(Inner {
                #[cfg(feature = "redis")]
                replicator,
                resolver: ArcSwap::from_pointee(Resolver::new(&config)),
                config: ArcSwap::from_pointee(config),
                keys: slot_keys,
                reload_lock: Mutex::new(()),
                generation: AtomicU64::new(0),
                store,
                clock,
                view,
                journal,
                node_id,
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Repairs a data dir that fails to open because it lost acknowledged spend ([`StoreError::Corrupt`] of tree `high-water`): opens what sled still
    /// holds, takes back from Redis (when configured) this node's own totals that are larger
    /// (one replication round), and compares the result with the high-water record. When
    /// nothing acknowledged is missing any more, the record is brought up to date and the
    /// data dir opens again. When spend is still missing, the record keeps claiming it (the
    /// data dir keeps failing to open) unless `accept_loss` is set, which accepts the loss.
    ///
    /// # Errors
    ///
    /// Those of [`Limiter::open`] (except the high-water mismatch).
    pub fn repair(config: Config, accept_loss: bool) -> Result<RepairReport, Error> {
        Limiter::repair_with_clock(config, Arc::new(SystemClock), accept_loss)
    }

    /// [`Limiter::repair`] with another clock.
    ///
    /// # Errors
    ///
    /// Those of [`Limiter::open`] (except the high-water mismatch).
    pub fn repair_with_clock(
        config: Config,
        clock: Arc<dyn Clock>,
        accept_loss: bool,
    ) -> Result<RepairReport, Error> {
        crate::restore::repair(config, clock, accept_loss, |config, clock| {
            let limiter = Limiter::open_verified(config, clock, Verify::Repair)?;
            #[cfg(feature = "redis")]
            let synced = limiter
                .inner
                .replicator
                .as_ref()
                .map(|r| r.sync().map_err(|e| e.to_string()));
            #[cfg(not(feature = "redis"))]
            let synced = None;
            limiter.shutdown()?;
            Ok(synced)
        })
    }

    /// This node's id (configured, or generated once and kept in the data dir).
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The configuration in use (a snapshot: [`Limiter::reload`] may replace it).
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// What `reload` (module `reload`) changes.
    pub(crate) fn reload_parts(&self) -> crate::reload::Parts<'_> {
        crate::reload::Parts {
            lock: &self.inner.reload_lock,
            config: &self.inner.config,
            keys: &self.inner.keys,
            view: &self.inner.view,
            store: &self.inner.store,
            journal: &self.inner.journal,
        }
    }

    /// Installs a reloaded config and its provider → slot table.
    pub(crate) fn install(&self, config: Config, slots: Vec<(String, u32)>) {
        let resolver = Resolver::with_budgets(&config, slots.into_iter().collect());
        self.inner.resolver.store(Arc::new(resolver));
        self.inner.config.store(Arc::new(config));
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// The clock's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    // ---- record ------------------------------------------------------------------------------

    /// Counts `cost` against `provider`'s budget now. Returns at once: the journal makes it
    /// durable within `storage.max_delay`.
    #[inline]
    ///
    /// # Errors
    ///
    /// [`RecordError::NoBudget`] when the provider has no budget (nothing counted),
    /// [`RecordError::Closed`] after shutdown, [`RecordError::Storage`] when the journal died.
    pub fn record(&self, provider: &str, cost: Money) -> Result<(), RecordError> {
        // "Now" is never past retention: skip `record_at`'s age check (a second clock read).
        self.add(provider, cost, self.inner.clock.now(), None)
    }

    /// Counts `cost` in the window of `at` (e.g. the time the request was made).
    /// Fails with [`RecordError::Expired`] when that window ended more than
    /// `storage.retention` ago.
    ///
    /// # Errors
    ///
    /// As [`Limiter::record`], and [`RecordError::Expired`] when the window of `at` ended
    /// more than `storage.retention` ago.
    pub fn record_at(&self, provider: &str, cost: Money, at: Timestamp) -> Result<(), RecordError> {
        self.check_age(provider, at)?;
        self.add(provider, cost, at, None)
    }

    /// Counts `cost` now and returns once it is durable on disk (group commit: concurrent
    /// callers share one fsync). Blocks the thread; from async code use
    /// [`Limiter::record_durable_async`].
    ///
    /// # Errors
    ///
    /// As [`Limiter::record`], and [`RecordError::Storage`] when the record is counted but
    /// its fsync failed (a full disk): it stays counted in memory and is retried.
    pub fn record_durable(&self, provider: &str, cost: Money) -> Result<(), RecordError> {
        self.record_durable_at(provider, cost, self.inner.clock.now())
    }

    /// [`Limiter::record_durable`] in the window of `at`.
    ///
    /// # Errors
    ///
    /// As [`Limiter::record_durable`] and [`Limiter::record_at`].
    pub fn record_durable_at(
        &self,
        provider: &str,
        cost: Money,
        at: Timestamp,
    ) -> Result<(), RecordError> {
        self.check_age(provider, at)?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.add(provider, cost, at, Some(Ack::Blocking(tx)))?;
        rx.recv().map_err(|_| self.gone())??;
        Ok(())
    }

    /// [`Limiter::record_durable`] for async code: awaits the fsync without blocking a worker.
    ///
    /// # Errors
    ///
    /// As [`Limiter::record_durable`].
    pub async fn record_durable_async(
        &self,
        provider: &str,
        cost: Money,
    ) -> Result<(), RecordError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.add(provider, cost, self.inner.clock.now(), Some(Ack::Async(tx)))?;
        rx.await.map_err(|_| self.gone())??;
        Ok(())
    }

    /// [`Limiter::record_durable_async`] in the window of `at` (checked like
    /// [`Limiter::record_at`]).
    ///
    /// # Errors
    ///
    /// As [`Limiter::record_durable_at`].
    pub async fn record_durable_at_async(
        &self,
        provider: &str,
        cost: Money,
        at: Timestamp,
    ) -> Result<(), RecordError> {
        self.check_age(provider, at)?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.add(provider, cost, at, Some(Ack::Async(tx)))?;
        rx.await.map_err(|_| self.gone())??;
        Ok(())
    }

    /// Refuses a timestamp whose window is already past retention: the journal would delete
    /// it at its next pass, so counting it would only pretend.
    fn check_age(&self, provider: &str, at: Timestamp) -> Result<(), RecordError> {
        let retention = &self.inner.config.load().storage.retention;
        let secs = floor_secs(at);
        let cutoff = floor_secs(self.now())
            .saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        if secs >= cutoff {
            return Ok(());
        }
        let Some(b) = self.inner.resolver.load().budget_of_provider(provider) else {
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
        let budget = inner
            .resolver
            .load()
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
                        .map_err(|_| self.gone())
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
            .map_err(|_| self.gone())
    }

    // ---- filter ------------------------------------------------------------------------------

    /// The deployments whose provider may still spend, in their order. Providers without a
    /// budget pass; unresolvable ones follow `unknown_provider`. An empty input gives an empty
    /// result; a non-empty input with nothing left gives [`NoDeployments`].
    ///
    /// # Errors
    ///
    /// [`NoDeployments`] when the input is not empty and no deployment is left (each
    /// exceeded budget and unresolvable deployment listed).
    pub fn filter<'a, D: Deployment>(
        &self,
        deployments: &'a [D],
    ) -> Result<Vec<&'a D>, NoDeployments> {
        let now = floor_secs(self.inner.clock.now());
        let mut memo = Memo::default();
        let mut out = Vec::with_capacity(deployments.len());
        let resolver = self.inner.resolver.load();
        let cache = resolver.cache();
        for d in deployments {
            if self.passes(self.slot_in(&resolver, &cache, d), now, &mut memo) {
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
    ///
    /// # Errors
    ///
    /// As [`Limiter::filter`].
    pub fn filter_in_place<D: Deployment>(
        &self,
        deployments: &mut Vec<D>,
    ) -> Result<(), NoDeployments> {
        let now = floor_secs(self.inner.clock.now());
        let mut memo = Memo::default();
        let resolver = self.inner.resolver.load();
        let cache = resolver.cache();
        let any = deployments
            .iter()
            .any(|d| self.passes(self.slot_in(&resolver, &cache, d), now, &mut memo));
        if !any {
            if deployments.is_empty() {
                return Ok(());
            }
            return Err(
                self.no_deployments(deployments.iter().map(|d| (self.slot(d), d.model())), now)
            );
        }
        deployments.retain(|d| self.passes(self.slot_in(&resolver, &cache, d), now, &mut memo));
        Ok(())
    }

    /// Resolves a deployment list once, for routers whose list rarely changes: the returned
    /// [`Prepared`] filters with one clock read and one atomic read per distinct budget.
    pub fn prepare<D: Deployment>(&self, deployments: &[D]) -> Prepared {
        Prepared {
            limiter: self.clone(),
            generation: self.inner.generation.load(Ordering::Acquire),
            slots: deployments.iter().map(|d| self.slot_uncached(d)).collect(),
            models: deployments.iter().map(|d| d.model().to_owned()).collect(),
            providers: deployments
                .iter()
                .map(|d| d.provider().map(str::to_owned))
                .collect(),
        }
    }

    #[inline]
    fn slot<D: Deployment + ?Sized>(&self, d: &D) -> Slot {
        self.to_slot(self.inner.resolver.load().resolve_cached(d))
    }

    /// [`Limiter::slot`] with the resolver and its model cache loaded once per call.
    #[inline]
    fn slot_in<D: Deployment + ?Sized>(
        &self,
        resolver: &Resolver,
        cache: &CacheMap,
        d: &D,
    ) -> Slot {
        self.to_slot(resolver.resolve_in(cache, d))
    }

    fn slot_uncached<D: Deployment + ?Sized>(&self, d: &D) -> Slot {
        self.to_slot(self.inner.resolver.load().resolve(d))
    }

    #[inline]
    fn to_slot(&self, r: Resolution) -> Slot {
        match r {
            Resolution::Budget(b) => Slot::Budget(b),
            Resolution::NoBudget => Slot::Pass,
            Resolution::Unknown => {
                metrics::counter!("provider_budgets_unknown_provider_total").increment(1);
                match self.inner.config.load().unknown_provider {
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
                        provider: self.inner.keys.get(b).0,
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
        let storage_fault = self.health().storage_fault;
        let config = self.inner.config.load();
        let resolver = self.inner.resolver.load();
        let zone = config.time_zone.clone().unwrap_or_else(|| "UTC".to_owned());
        config
            .budgets
            .iter()
            .filter_map(|b| Some((resolver.budget_of_provider(&b.provider)?, b)))
            .map(|(i, b)| {
                let t = self.inner.view.totals_at(i, secs);
                let spend = t.total();
                BudgetStatus {
                    provider: b.provider.clone(),
                    period: b.period,
                    time_zone: zone.clone(),
                    window: t.window,
                    spend,
                    own_spend: t.own,
                    limit: b.limit,
                    remaining: b.limit.saturating_sub(spend),
                    exhausted: spend >= b.limit,
                    replication: replication.clone(),
                    storage_fault: storage_fault.clone(),
                    replication_problem: problems.get(i as usize).cloned().flatten(),
                }
            })
            .collect()
    }

    /// The state of one provider's budget now, `None` when it has none.
    pub fn budget_status(&self, provider: &str) -> Option<BudgetStatus> {
        self.inner.resolver.load().budget_of_provider(provider)?;
        self.status().into_iter().find(|s| s.provider == provider)
    }

    /// Every window still held in memory for `provider` (newest first): previous windows stay
    /// readable until their retention ends.
    pub fn windows(&self, provider: &str) -> Vec<(Window, Money)> {
        match self.inner.resolver.load().budget_of_provider(provider) {
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
        let config = self.inner.config.load();
        #[cfg(feature = "redis")]
        if let (Some(r), Some(redis)) = (&self.inner.replicator, &config.redis) {
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
                last_round: h.last_round,
                late_rounds: h.late_rounds,
            };
            return (status, h.problems);
        }
        (ReplicationStatus::default(), Vec::new())
    }

    /// One replication round now: ships this node's durable totals to Redis and reads the
    /// others' (the CLI's `sync`). Fails when no Redis is configured or it cannot be reached.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] when no Redis is configured or the round failed;
    /// [`Error::Storage`] when the flush before it failed.
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
    ///
    /// # Errors
    ///
    /// The storage fault that keeps it from being durable (a full disk: it is retried and
    /// becomes durable once the disk works, without a restart), or
    /// [`StoreError::JournalStopped`] when the journal thread died. After
    /// [`Limiter::shutdown`], the result of the final commit.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.journal.flush()
    }

    /// Makes everything recorded durable and stops the background threads. Later records
    /// return [`RecordError::Closed`]; filter and status keep answering from memory.
    ///
    /// # Errors
    ///
    /// [`Error::Storage`] when the final commit failed (a full disk: the spend is lost with the
    /// process, say so loudly) or the journal thread had died.
    pub fn shutdown(&self) -> Result<(), Error> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.stop()?;
        Ok(())
    }

    /// Health of storage and replication, for health checks and status pages.
    pub fn health(&self) -> Health {
        let journal = &self.inner.journal;
        let stopped = journal.gone();
        Health {
            storage_fault: journal
                .health()
                .fault()
                .or_else(|| match journal.health().stopped() {
                    Some(StopReason::Died(reason)) => Some(reason),
                    _ => None,
                }),
            journal_running: stopped.is_none(),
            replication: self.replication_status().0,
        }
    }

    /// Runs the journal's periodic work (failed-write retries, retention) now and waits for
    /// it. It also runs on its own every 250 ms; tests call this instead of sleeping.
    ///
    /// # Errors
    ///
    /// As [`Limiter::flush`].
    #[doc(hidden)]
    pub fn maintain(&self) -> Result<(), StoreError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self
            .inner
            .journal
            .send(Event::Maintain(Ack::Blocking(tx)))
            .is_err()
        {
            return self.flush();
        }
        rx.recv().unwrap_or_else(|_| self.flush())
    }

    /// Fault injection for tests: makes the journal thread panic, as a bug would.
    #[doc(hidden)]
    pub fn inject_journal_panic(&self) {
        let _ = self.inner.journal.send(Event::Panic);
    }

    /// The error for a record that could not be queued.
    #[cold]
    fn gone(&self) -> RecordError {
        if self.inner.closed.load(Ordering::Acquire) {
            return RecordError::Closed;
        }
        match self.inner.journal.gone() {
            Some(e @ StoreError::JournalStopped { .. }) => RecordError::Storage(e),
            _ => RecordError::Closed,
        }
    }
}

/// A deployment list resolved once by [`Limiter::prepare`].
#[derive(Debug, Clone)]
pub struct Prepared {
    limiter: Limiter,
    /// The limiter's reload generation when resolved; after a reload, calls resolve again.
    generation: u64,
    slots: Vec<Slot>,
    models: Vec<String>,
    providers: Vec<Option<String>>,
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
    ///
    /// # Errors
    ///
    /// [`NoDeployments`] when no deployment is left (`out` is then empty).
    pub fn filter_into(&self, out: &mut Vec<usize>) -> Result<(), NoDeployments> {
        out.clear();
        let now = floor_secs(self.limiter.inner.clock.now());
        let mut memo = Memo::default();
        let fresh;
        let slots = if self.generation == self.limiter.inner.generation.load(Ordering::Acquire) {
            &self.slots
        } else {
            // Reloaded since `prepare`: resolve with the current budgets (prepare again to
            // get the fast path back).
            fresh = self.resolve_again();
            &fresh
        };
        for (i, &slot) in slots.iter().enumerate() {
            if self.limiter.passes(slot, now, &mut memo) {
                out.push(i);
            }
        }
        if out.is_empty() && !slots.is_empty() {
            let models = self.models.iter().map(String::as_str);
            return Err(self
                .limiter
                .no_deployments(slots.iter().copied().zip(models), now));
        }
        Ok(())
    }

    fn resolve_again(&self) -> Vec<Slot> {
        self.models
            .iter()
            .zip(&self.providers)
            .map(|(m, p)| {
                self.limiter.slot_uncached(&Target {
                    model: m.clone(),
                    provider: p.clone(),
                })
            })
            .collect()
    }

    /// The indices of the usable deployments.
    ///
    /// # Errors
    ///
    /// As [`Prepared::filter_into`].
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
