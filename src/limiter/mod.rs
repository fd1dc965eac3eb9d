//! [`Limiter`]: the facade a router holds. It owns the view, the journal thread, the store and
//! (with Redis configured) the replicator, and stops them when the last clone is dropped.

pub(crate) mod filter;
pub(crate) mod health;
pub(crate) mod reload;
pub(crate) mod reserve;
pub(crate) mod status;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::ArcSwap;
use jiff::Timestamp;

use crate::config::{Config, ConfigError};
use crate::durable::journal::{
    Ack, DurableTotals, Event, Items, Journal, JournalSettings, StopReason,
};
use crate::durable::restore::{restore, RepairReport, Restored, Verify};
use crate::durable::store::{Store, StoreError};
use crate::error::{Error, RecordError};
use crate::limiter::filter::{Check, NoDeployments};
use crate::limiter::health::Health;
use crate::limiter::status::{BudgetStatus, ReplicationStatus};
use crate::model::budget::{Enforcement, Mode, Scope, SoftLimitCrossed, SoftLimitHandler};
use crate::model::clock::{floor_secs, Clock, SystemClock};
use crate::model::money::Money;
use crate::model::slots::SlotKeys;
use crate::model::window::Window;
use crate::resolve::{Deployment, Resolved, Resolver, Target};
use crate::view::View;

/// Enforces the configured budgets. Cheap to clone (one `Arc`); share it across threads and
/// tasks. The background threads stop when the last clone is dropped or on [`Limiter::shutdown`].
#[derive(Debug, Clone)]
pub struct Limiter {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// Swapped by `reload`.
    pub(crate) config: ArcSwap<Config>,
    pub(crate) clock: Arc<dyn Clock>,
    /// Scope name → budget slots; swapped by `reload`. Shared with `Prepared` lists.
    pub(crate) resolver: Arc<ArcSwap<Resolver>>,
    /// (provider, period) per budget slot, shared with the journal and the replicator.
    pub(crate) keys: Arc<SlotKeys>,
    /// Serialises reloads.
    reload_lock: Mutex<()>,
    /// Bumped by each reload: `Prepared` lists resolve again.
    generation: Arc<AtomicU64>,
    /// Called once per window per soft limit crossed (`Limiter::on_soft_limit`).
    soft_handler: Arc<Mutex<Option<SoftLimitHandler>>>,
    /// With Redis: soft limits are claimed fleet-wide before they fire (module `alerts`).
    #[cfg(feature = "redis")]
    alerts: Option<crate::replicate::alerts::FleetAlerts>,
    /// The store, for a reload to read what a new budget already has stored.
    store: Arc<Store>,
    /// Shared with the journal (which prunes it) and the replicator (which raises others).
    pub(crate) view: Arc<View>,
    pub(crate) journal: Journal,
    /// Open reservations (module `reserve`): what the reaper expires.
    pub(crate) reservations: crate::limiter::reserve::Registry,
    node_id: String,
    /// Fleet replication, when Redis is configured.
    #[cfg(feature = "redis")]
    replicator: Option<crate::replicate::Replicator>,
    /// Set by `shutdown`: later records are refused instead of queued to a stopped journal.
    pub(crate) closed: AtomicBool,
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
            grants,
        } = restored;
        for (i, b) in config.budgets.iter().enumerate() {
            view.set_shadow(i as u32, b.mode == Mode::Shadow);
            set_policy(&view, i as u32, b, config.redis.is_some());
            // Crossed before this start: marked fired, not fired again.
            view.set_soft_limits(i as u32, b.soft_limits.clone());
        }
        let durable = Arc::new(DurableTotals::default());
        let slot_keys = Arc::new(keys);
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
                    grants,
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
        drop((peers, grants));
        let soft_handler: Arc<Mutex<Option<SoftLimitHandler>>> = Arc::default();
        #[cfg(feature = "redis")]
        let alerts = match &config.redis {
            Some(redis) => Some(
                crate::replicate::alerts::FleetAlerts::start(
                    redis,
                    node_id.clone(),
                    Arc::clone(&soft_handler),
                )
                .map_err(|source| Error::Thread {
                    what: "alerts",
                    source,
                })?,
            ),
            None => None,
        };
        Ok(Limiter {
            inner: Arc::new(Inner {
                #[cfg(feature = "redis")]
                replicator,
                resolver: Arc::new(ArcSwap::from_pointee(Resolver::new(&config))),
                config: ArcSwap::from_pointee(config),
                keys: slot_keys,
                reload_lock: Mutex::new(()),
                generation: Arc::new(AtomicU64::new(0)),
                soft_handler,
                #[cfg(feature = "redis")]
                alerts,
                store,
                clock,
                view,
                journal,
                node_id,
                reservations: crate::limiter::reserve::Registry::new(),
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
        config.validate()?;
        let dir = config.storage.dir.clone().ok_or(ConfigError::NoDataDir)?;
        let start = crate::durable::restore::repair_begin(&dir)?;
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
        // Releases the data dir before the last step opens it.
        drop(limiter);
        Ok(crate::durable::restore::repair_finish(
            &dir,
            start,
            accept_loss,
            synced,
        )?)
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
    pub(crate) fn reload_parts(&self) -> crate::limiter::reload::Parts<'_> {
        crate::limiter::reload::Parts {
            lock: &self.inner.reload_lock,
            config: &self.inner.config,
            keys: &self.inner.keys,
            view: &self.inner.view,
            store: &self.inner.store,
            journal: &self.inner.journal,
        }
    }

    /// Installs a reloaded config and its (scope, name, slot) table.
    pub(crate) fn install(&self, config: Config, slots: Vec<(Scope, String, u32)>) {
        let resolver = Resolver::with_budgets(&config, slots);
        self.inner.resolver.store(Arc::new(resolver));
        self.inner.config.store(Arc::new(config));
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// The clock's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    // ---- record and charge -------------------------------------------------------------------

    /// Counts `cost` against `provider`'s budgets now (every provider-scope budget of that
    /// provider: one per period). Returns at once: the journal makes it durable within
    /// `storage.max_delay`.
    ///
    /// # Errors
    ///
    /// [`RecordError::NoBudget`] when the provider has no budget (nothing counted),
    /// [`RecordError::Closed`] after shutdown, [`RecordError::Storage`] when the journal died.
    #[inline]
    pub fn record(&self, provider: &str, cost: Money) -> Result<(), RecordError> {
        // "Now" is never past retention: skip `record_at`'s age check (a second clock read).
        self.add_provider(provider, cost, self.inner.clock.now_secs(), None)
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
        self.check_age_provider(provider, at)?;
        self.add_provider(provider, cost, floor_secs(at), None)
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
        self.check_age_provider(provider, at)?;
        self.durably(|ack| self.add_provider(provider, cost, floor_secs(at), Some(ack)))
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
        let now = self.inner.clock.now_secs();
        self.durably_async(|ack| self.add_provider(provider, cost, now, Some(ack)))
            .await
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
        self.check_age_provider(provider, at)?;
        self.durably_async(|ack| self.add_provider(provider, cost, floor_secs(at), Some(ack)))
            .await
    }

    /// Counts `cost` against every budget that applies to the deployment and the request's
    /// tags: its provider's, its model's, its own (by id) and each tag's, resolved exactly as
    /// [`Limiter::filter_tagged`] does, so spend never goes to another budget than the one
    /// that filtered. Returns the number of budgets charged (a charge that matches no budget
    /// is not an error: 0). Returns at once, like [`Limiter::record`].
    ///
    /// # Errors
    ///
    /// [`RecordError::Closed`] after shutdown, [`RecordError::Storage`] when the journal died.
    #[inline]
    pub fn charge<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        deployment: &D,
        tags: &[T],
        cost: Money,
    ) -> Result<usize, RecordError> {
        self.charge_inner(deployment, tags, cost, self.inner.clock.now_secs(), None)
    }

    /// [`Limiter::charge`] in the window of `at`.
    ///
    /// # Errors
    ///
    /// As [`Limiter::charge`], and [`RecordError::Expired`] when the window of `at` of one
    /// of the budgets ended more than `storage.retention` ago (nothing is charged then).
    pub fn charge_at<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        deployment: &D,
        tags: &[T],
        cost: Money,
        at: Timestamp,
    ) -> Result<usize, RecordError> {
        self.check_age_charge(deployment, tags, at)?;
        self.charge_inner(deployment, tags, cost, floor_secs(at), None)
    }

    /// [`Limiter::charge_at`] that returns once the charge is durable on disk (`at`: `None`
    /// is now).
    ///
    /// # Errors
    ///
    /// As [`Limiter::charge_at`] and [`Limiter::record_durable`].
    pub fn charge_durable<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        deployment: &D,
        tags: &[T],
        cost: Money,
        at: Option<Timestamp>,
    ) -> Result<usize, RecordError> {
        let at = at.unwrap_or_else(|| self.inner.clock.now());
        self.check_age_charge(deployment, tags, at)?;
        self.durably(|ack| self.charge_inner(deployment, tags, cost, floor_secs(at), Some(ack)))
    }

    /// [`Limiter::charge_durable`] for async code.
    ///
    /// # Errors
    ///
    /// As [`Limiter::charge_durable`].
    pub async fn charge_durable_async<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        deployment: &D,
        tags: &[T],
        cost: Money,
        at: Option<Timestamp>,
    ) -> Result<usize, RecordError> {
        let at = at.unwrap_or_else(|| self.inner.clock.now());
        self.check_age_charge(deployment, tags, at)?;
        self.durably_async(|ack| {
            self.charge_inner(deployment, tags, cost, floor_secs(at), Some(ack))
        })
        .await
    }

    /// Calls `handler` each time a soft limit is crossed: once per window per threshold, per
    /// fleet when Redis is configured (the node whose claim in Redis succeeds fires, see
    /// `alerts`), per node otherwise. Replaces an earlier handler. It runs on the charging thread: keep it short.
    pub fn on_soft_limit(&self, handler: impl Fn(&SoftLimitCrossed) + Send + Sync + 'static) {
        *self
            .inner
            .soft_handler
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(SoftLimitHandler(Arc::new(handler)));
    }

    fn charge_inner<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        deployment: &D,
        tags: &[T],
        cost: Money,
        secs: i64,
        ack: Option<Ack>,
    ) -> Result<usize, RecordError> {
        let resolver = self.inner.resolver.load();
        let cache = resolver.cache();
        let r = resolver.resolve_in(&cache, deployment);
        let slots = charge_slots(&resolver, &r, tags);
        self.add_slots(slots, cost, secs, ack)
    }

    /// Refuses a timestamp whose window is already past retention: the journal would delete
    /// it at its next pass, so counting it would only pretend.
    fn check_age(
        &self,
        what: &str,
        at: Timestamp,
        slots: impl Iterator<Item = u32>,
    ) -> Result<(), RecordError> {
        let retention = &self.inner.config.load().storage.retention;
        let secs = floor_secs(at);
        let cutoff = floor_secs(self.now())
            .saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        if secs >= cutoff {
            return Ok(());
        }
        for b in slots {
            if self.inner.view.schedule(b).window_at_secs(secs).end_secs() <= cutoff {
                return Err(RecordError::Expired {
                    provider: what.to_owned(),
                    at,
                    retention: humantime::format_duration(*retention).to_string(),
                });
            }
        }
        Ok(())
    }

    fn check_age_provider(&self, provider: &str, at: Timestamp) -> Result<(), RecordError> {
        let resolver = self.inner.resolver.load();
        self.check_age(
            provider,
            at,
            resolver.provider_slots(provider).iter().copied(),
        )
    }

    fn check_age_charge<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        deployment: &D,
        tags: &[T],
        at: Timestamp,
    ) -> Result<(), RecordError> {
        let resolver = self.inner.resolver.load();
        let r = resolver.resolve(deployment);
        let slots = charge_slots(&resolver, &r, tags);
        self.check_age(deployment.model(), at, slots)
    }

    #[inline]
    fn add_provider(
        &self,
        provider: &str,
        cost: Money,
        secs: i64,
        ack: Option<Ack>,
    ) -> Result<(), RecordError> {
        let resolver = self.inner.resolver.load();
        let slots = resolver.provider_slots(provider);
        if slots.is_empty() {
            return Err(RecordError::NoBudget {
                provider: provider.to_owned(),
            });
        }
        self.add_slots(slots.iter().copied(), cost, secs, ack)
            .map(|_| ())
    }

    /// Adds `cost` to each slot (in the window of the instant `secs`) and queues one journal event per
    /// slot; a durability waiter is acknowledged with the last one (the journal commits in
    /// order). Returns the number of slots.
    #[inline]
    fn add_slots(
        &self,
        slots: impl Iterator<Item = u32>,
        cost: Money,
        secs: i64,
        mut ack: Option<Ack>,
    ) -> Result<usize, RecordError> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(RecordError::Closed);
        }
        let mut n = 0;
        if cost != Money::ZERO {
            // One journal event per call: a single window goes as `Add`, several as `AddMany`
            // (up to four windows inline: no allocation).
            let mut items = Items::default();
            for budget in slots {
                n += 1;
                let (window, crossed) = inner.view.add_own_checked(budget, secs, cost);
                if let Some(c) = crossed {
                    self.fire(budget, c);
                }
                items.push((budget, window));
            }
            let event = match (n, items.single()) {
                (0, _) => None,
                (_, Some((budget, window))) => Some(Event::Add {
                    budget,
                    window,
                    amount: cost.as_nanos(),
                    ack: ack.take(),
                }),
                _ => Some(Event::AddMany {
                    items,
                    amount: cost.as_nanos(),
                    ack: ack.take(),
                }),
            };
            if let Some(event) = event {
                inner.journal.send(event).map_err(|_| self.gone())?;
            }
        } else {
            n = slots.count();
        }
        // Nothing to count (zero cost or no budget); a durable caller still gets its answer
        // after the flush.
        if let Some(ack) = ack {
            inner
                .journal
                .send(Event::Flush(ack))
                .map_err(|_| self.gone())?;
        }
        Ok(n)
    }

    /// Reports newly crossed soft limits: callback, metric, `tracing` event (cold path);
    /// with Redis, after this node won the fleet-wide claim (module `alerts`).
    #[cold]
    pub(crate) fn fire(&self, budget: u32, crossed: crate::view::Crossed) {
        let budget_key = self.inner.keys.get(budget);
        let (scope, name, period) = (budget_key.scope, &budget_key.name, &budget_key.period_part);
        let key = budget_key.key_name();
        let soft = self.inner.view.soft_limits(budget);
        let limit = self.inner.view.limit(budget);
        for (i, s) in soft.iter().enumerate().take(8) {
            if crossed.bits & (1 << i) == 0 {
                continue;
            }
            let event = SoftLimitCrossed {
                scope,
                name: name.to_owned(),
                period: period.clone(),
                soft_limit: *s,
                spend: Money::from_nanos(crossed.spend),
                limit,
                window: crossed.window,
            };
            #[cfg(feature = "redis")]
            if let Some(alerts) = &self.inner.alerts {
                alerts.claim(&key, event);
                continue;
            }
            crate::model::budget::deliver_soft_limit(&self.inner.soft_handler, &key, &event);
        }
    }

    // ---- filter ------------------------------------------------------------------------------

    /// The deployments whose budgets all have room, in their order (no request tags: see
    /// [`Limiter::filter_tagged`]). Deployments without any budget pass; unresolvable ones
    /// follow `unknown_provider`. An empty input gives an empty result; a non-empty input
    /// with nothing left gives [`NoDeployments`].
    ///
    /// # Errors
    ///
    /// [`NoDeployments`] when the input is not empty and no deployment is left (each
    /// exceeded budget and unresolvable deployment listed).
    #[inline]
    pub fn filter<'a, D: Deployment>(
        &self,
        deployments: &'a [D],
    ) -> Result<Vec<&'a D>, NoDeployments> {
        self.filter_tagged(deployments, NO_TAGS)
    }

    /// [`Limiter::filter`] for a request carrying `tags`: a deployment passes when every
    /// budget that applies has room (its provider's, its model's, its own by id) and every
    /// budget of the request's tags has room (a spent tag budget leaves nothing).
    ///
    /// # Errors
    ///
    /// As [`Limiter::filter`].
    pub fn filter_tagged<'a, D: Deployment, T: AsRef<str>>(
        &self,
        deployments: &'a [D],
        tags: &[T],
    ) -> Result<Vec<&'a D>, NoDeployments> {
        let resolver = self.inner.resolver.load();
        let cache = resolver.cache();
        let mut check = self.check(&resolver);
        let tags_ok = check.tags_pass(&resolver, tags);
        let mut out = Vec::with_capacity(deployments.len());
        check.select(
            tags_ok,
            deployments.iter().map(|d| resolver.resolve_in(&cache, d)),
            |i| out.push(&deployments[i]),
        );
        if out.is_empty() && !deployments.is_empty() {
            return Err(check.no_deployments(
                &resolver,
                tags,
                deployments
                    .iter()
                    .map(|d| (resolver.resolve_in(&cache, d), d.model())),
            ));
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
        self.filter_in_place_tagged(deployments, NO_TAGS)
    }

    /// [`Limiter::filter_in_place`] for a request carrying `tags`.
    ///
    /// # Errors
    ///
    /// As [`Limiter::filter`].
    pub fn filter_in_place_tagged<D: Deployment, T: AsRef<str>>(
        &self,
        deployments: &mut Vec<D>,
        tags: &[T],
    ) -> Result<(), NoDeployments> {
        let resolver = self.inner.resolver.load();
        let cache = resolver.cache();
        let mut check = self.check(&resolver);
        let tags_ok = check.tags_pass(&resolver, tags);
        let kept = check.select(
            tags_ok,
            deployments.iter().map(|d| resolver.resolve_in(&cache, d)),
            |_| {},
        );
        if kept == 0 {
            if deployments.is_empty() {
                return Ok(());
            }
            return Err(check.no_deployments(
                &resolver,
                tags,
                deployments
                    .iter()
                    .map(|d| (resolver.resolve_in(&cache, d), d.model())),
            ));
        }
        // Second pass answered by the memo (same decisions, no second window read).
        deployments.retain(|d| check.passes(&resolver.resolve_in(&cache, d)));
        Ok(())
    }

    /// Resolves a deployment list once, for routers whose list rarely changes: the returned
    /// [`Prepared`] filters with one clock read and one atomic read per distinct budget. It
    /// does not keep the limiter's threads alive (it holds the in-memory view, not the
    /// limiter).
    pub fn prepare<D: Deployment>(&self, deployments: &[D]) -> Prepared {
        let resolver = self.inner.resolver.load();
        let mut prepared = Prepared {
            limiter: Arc::downgrade(&self.inner),
            view: Arc::clone(&self.inner.view),
            keys: Arc::clone(&self.inner.keys),
            clock: Arc::clone(&self.inner.clock),
            resolver: Arc::clone(&self.inner.resolver),
            generation_now: Arc::clone(&self.inner.generation),
            generation: self.inner.generation.load(Ordering::Acquire),
            slots: Vec::new(),
            ranges: Vec::with_capacity(deployments.len()),
            snapshot: Arc::clone(&resolver),
            distinct: Vec::new(),
            masks: None,
            targets: deployments
                .iter()
                .map(|d| Target {
                    model: d.model().to_owned(),
                    provider: d.provider().map(str::to_owned),
                    id: d.id().map(str::to_owned),
                })
                .collect(),
        };
        prepared.fill(&resolver);
        prepared
    }

    fn check<'r>(&'r self, resolver: &Resolver) -> Check<'r> {
        Check::new(
            &self.inner.view,
            &self.inner.keys,
            self.inner.clock.now_secs(),
            resolver.deny_unknown,
        )
    }

    // ---- status, flush, shutdown -------------------------------------------------------------

    /// Every budget's state now, in config order (sorted by provider).
    pub fn status(&self) -> Vec<BudgetStatus> {
        self.status_at(self.inner.clock.now())
    }

    /// Every budget's state in the windows containing `at` (windows past their retention read
    /// as empty), in config order (providers first).
    pub fn status_at(&self, at: Timestamp) -> Vec<BudgetStatus> {
        self.status_rows(at).into_iter().map(|(_, s)| s).collect()
    }

    /// [`Limiter::status_at`] with each row's slot.
    fn status_rows(&self, at: Timestamp) -> Vec<(u32, BudgetStatus)> {
        let secs = floor_secs(at);
        let (replication, problems) = self.replication_status();
        let grants = self.grant_status();
        let storage_fault = self.health().storage_fault;
        let config = self.inner.config.load();
        config
            .budgets
            .iter()
            .filter_map(|b| {
                let budget_key = b.budget_key();
                let (key, period) = budget_key.store_parts();
                Some((self.inner.keys.position(&budget_key)?, b, key, period))
            })
            .map(|(i, b, key, period_key)| {
                let t = self.inner.view.totals_at(i, secs);
                let spend = t.total();
                let crossed = b
                    .soft_limits
                    .iter()
                    .copied()
                    .filter(|s| spend.as_nanos() >= s.threshold(b.limit.as_nanos()))
                    .collect();
                let row = BudgetStatus {
                    provider: key,
                    scope: b.scope,
                    name: b.name.clone(),
                    period: b.period,
                    period_key,
                    time_zone: config.budget_zone_name(b),
                    mode: b.mode,
                    soft_limits: b.soft_limits.clone(),
                    thresholds_crossed: crossed,
                    would_deny: self.inner.view.would_deny(i),
                    window: t.window,
                    spend,
                    own_spend: t.own,
                    reserved: t.reserved,
                    limit: b.limit,
                    remaining: b.limit.saturating_sub(spend),
                    exhausted: spend >= b.limit,
                    replication: replication.clone(),
                    storage_fault: storage_fault.clone(),
                    replication_problem: problems.get(i as usize).cloned().flatten(),
                    enforcement: b.enforcement,
                    offline: b.offline,
                    grant: None,
                    granted_total: None,
                };
                let row = BudgetStatus {
                    grant: (b.enforcement == Enforcement::Strict).then(|| {
                        if config.redis.is_some() {
                            t.grant
                        } else {
                            b.limit
                        }
                    }),
                    granted_total: match (b.enforcement, config.redis.is_some()) {
                        (Enforcement::Strict, true) => grants
                            .get(i as usize)
                            .copied()
                            .flatten()
                            .filter(|g| g.0 == t.window)
                            .map(|g| g.1),
                        (Enforcement::Strict, false) => Some(t.total().max(t.grant)),
                        _ => None,
                    },
                    ..row
                };
                (i, row)
            })
            .collect()
    }

    /// The state of every budget that applies to the deployment and the request's tags (those
    /// [`Limiter::charge`] counts against), in the windows containing `at`.
    pub fn status_for<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        deployment: &D,
        tags: &[T],
        at: Timestamp,
    ) -> Vec<BudgetStatus> {
        let resolver = self.inner.resolver.load();
        let r = resolver.resolve(deployment);
        let slots: Vec<u32> = charge_slots(&resolver, &r, tags).collect();
        self.status_rows(at)
            .into_iter()
            .filter(|(slot, _)| slots.contains(slot))
            .map(|(_, s)| s)
            .collect()
    }

    /// The state of one provider's (first) budget now, `None` when it has none.
    pub fn budget_status(&self, provider: &str) -> Option<BudgetStatus> {
        self.status()
            .into_iter()
            .find(|s| s.scope == Scope::Provider && s.name == provider)
    }

    /// Every window still held in memory for `provider`'s (first) budget (newest first):
    /// previous windows stay readable until their retention ends.
    pub fn windows(&self, provider: &str) -> Vec<(Window, Money)> {
        match self.inner.resolver.load().provider_slots(provider).first() {
            Some(&b) => self
                .inner
                .view
                .windows(b)
                .into_iter()
                .map(|t| (t.window, t.total()))
                .collect(),
            None => Vec::new(),
        }
    }

    /// How long a reservation refused by its grant alone waits for a grant round
    /// (`redis.grant_wait`; zero without Redis).
    #[cfg(feature = "redis")]
    fn grant_wait(&self) -> std::time::Duration {
        self.inner
            .config
            .load()
            .redis
            .as_ref()
            .map_or(std::time::Duration::ZERO, |r| r.grant_wait)
    }

    /// A reservation on strict budget `budget` was refused by this node's grant alone: notes
    /// the amount (the next grant round asks for at least that much more) and waits up to
    /// `grant_wait` for an out-of-cycle round. `true` when one finished (retry once then).
    pub(crate) fn wait_for_grant(&self, budget: u32, amount: Money) -> bool {
        self.inner.view.note_starved(budget, amount);
        #[cfg(feature = "redis")]
        if let Some(r) = &self.inner.replicator {
            return r.grant_round(self.grant_wait());
        }
        false
    }

    /// [`Limiter::wait_for_grant`] for async code: awaits the round without blocking.
    pub(crate) async fn wait_for_grant_async(&self, budget: u32, amount: Money) -> bool {
        self.inner.view.note_starved(budget, amount);
        #[cfg(feature = "redis")]
        if let Some(r) = &self.inner.replicator {
            return r.grant_round_async(self.grant_wait()).await;
        }
        false
    }

    /// Per budget index: the window and the fleet's granted total of a strict budget, as of
    /// the replicator's last round.
    fn grant_status(&self) -> Vec<Option<(Window, Money)>> {
        #[cfg(feature = "redis")]
        if let Some(r) = &self.inner.replicator {
            return r
                .health()
                .grants
                .iter()
                .map(|g| g.map(|g| (g.window, g.granted_total)))
                .collect();
        }
        Vec::new()
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
                tracking: h.tracking,
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

    /// Expires the reservations past `reservation_timeout` (they count their estimate), then
    /// runs the journal's periodic work (failed-write retries, retention) now and waits for
    /// it. Both also run on their own (every second, every 250 ms); tests call this instead
    /// of sleeping.
    ///
    /// # Errors
    ///
    /// As [`Limiter::flush`].
    #[doc(hidden)]
    pub fn maintain(&self) -> Result<(), StoreError> {
        // Expired reservations count their estimate first, so the pass below makes it durable.
        self.reap();
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

    /// Queues one journal event through `submit` with an acknowledgement and waits until the
    /// journal has made it durable: the one place where the durable forms of `record` and
    /// `charge` wait for their fsync. `submit`'s result is returned once the ack came.
    fn durably<R>(
        &self,
        submit: impl FnOnce(Ack) -> Result<R, RecordError>,
    ) -> Result<R, RecordError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let r = submit(Ack::Blocking(tx))?;
        rx.recv().map_err(|_| self.gone())??;
        Ok(r)
    }

    /// [`Limiter::durably`] for async code: awaits the ack without blocking a worker.
    async fn durably_async<R>(
        &self,
        submit: impl FnOnce(Ack) -> Result<R, RecordError>,
    ) -> Result<R, RecordError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let r = submit(Ack::Async(tx))?;
        rx.await.map_err(|_| self.gone())??;
        Ok(r)
    }

    /// The error for a record that could not be queued.
    #[cold]
    pub(crate) fn gone(&self) -> RecordError {
        if self.inner.closed.load(Ordering::Acquire) {
            return RecordError::Closed;
        }
        match self.inner.journal.gone() {
            Some(e @ StoreError::JournalStopped { .. }) => RecordError::Storage(e),
            _ => RecordError::Closed,
        }
    }
}

/// No request tags, for the untagged forms (`limiter.charge(&d, NO_TAGS, cost)`).
pub const NO_TAGS: &[&str] = &[];

/// The slots a charge adds to: the deployment's and those of each distinct tag.
pub(crate) fn charge_slots<'a, T: AsRef<str>>(
    resolver: &'a Resolver,
    r: &Resolved<'a>,
    tags: &'a [T],
) -> impl Iterator<Item = u32> + 'a {
    let r = *r;
    let tag_slots = tags.iter().enumerate().flat_map(move |(i, t)| {
        let t = t.as_ref();
        // A tag given twice is charged once.
        let repeated = tags[..i].iter().any(|u| u.as_ref() == t);
        if repeated {
            &[][..]
        } else {
            resolver.slots(Scope::Tag, t)
        }
        .iter()
        .copied()
    });
    (0..3)
        .flat_map(move |k| r.slots[k].iter().copied())
        .chain(tag_slots)
}

/// A deployment list resolved once by [`Limiter::prepare`]. It holds the limiter's in-memory
/// view, not the limiter: dropping every [`Limiter`] stops the background threads even while
/// a `Prepared` lives (it then keeps answering from memory).
#[derive(Debug, Clone)]
pub struct Prepared {
    limiter: Weak<Inner>,
    view: Arc<View>,
    keys: Arc<SlotKeys>,
    clock: Arc<dyn Clock>,
    resolver: Arc<ArcSwap<Resolver>>,
    generation_now: Arc<AtomicU64>,
    /// The limiter's reload generation when resolved; after a reload, calls resolve again.
    generation: u64,
    /// Every deployment's slots, concatenated.
    slots: Vec<u32>,
    /// Per deployment: start in `slots`, count, denied as unknown.
    ranges: Vec<(u32, u32, bool)>,
    /// The resolver as of `generation` (tags are resolved with it: no `ArcSwap` load per call).
    snapshot: Arc<Resolver>,
    /// The distinct budget slots of all deployments, each read once per call.
    distinct: Vec<u32>,
    /// Per deployment, the bits (indices into `distinct`) of its budgets; `None` when there
    /// are more than 128 distinct budgets (then the memo loop of `filter.rs` serves).
    masks: Option<Vec<u128>>,
    targets: Vec<Target>,
}

impl Prepared {
    /// Number of deployments.
    pub fn len(&self) -> usize {
        self.targets.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn fill(&mut self, resolver: &Resolver) {
        self.slots.clear();
        self.ranges.clear();
        for t in &self.targets {
            let r = resolver.resolve(t);
            let start = self.slots.len() as u32;
            self.slots.extend(r.iter());
            self.ranges.push((
                start,
                self.slots.len() as u32 - start,
                r.unknown && resolver.deny_unknown,
            ));
        }
        self.distinct = self.slots.clone();
        self.distinct.sort_unstable();
        self.distinct.dedup();
        self.masks = (self.distinct.len() <= 128).then(|| {
            self.ranges
                .iter()
                .map(|&(start, len, _)| {
                    self.slots[start as usize..(start + len) as usize]
                        .iter()
                        .filter_map(|b| self.distinct.binary_search(b).ok())
                        .fold(0u128, |m, i| m | 1u128 << i)
                })
                .collect()
        });
    }

    /// Writes the indices of the usable deployments into `out` (cleared first; reuse it to
    /// avoid allocating).
    ///
    /// # Errors
    ///
    /// [`NoDeployments`] when no deployment is left (`out` is then empty).
    #[inline]
    pub fn filter_into(&self, out: &mut Vec<usize>) -> Result<(), NoDeployments> {
        self.filter_tagged_into(NO_TAGS, out)
    }

    /// [`Prepared::filter_into`] for a request carrying `tags`.
    ///
    /// # Errors
    ///
    /// As [`Prepared::filter_into`].
    #[inline]
    pub fn filter_tagged_into<T: AsRef<str>>(
        &self,
        tags: &[T],
        out: &mut Vec<usize>,
    ) -> Result<(), NoDeployments> {
        out.clear();
        let now = self.clock.now_secs();
        if self.generation != self.generation_now.load(Ordering::Acquire) {
            // Reloaded since `prepare`: resolve with the current budgets (prepare again to
            // get the fast path back).
            let mut again = self.clone();
            again.generation = self.generation_now.load(Ordering::Acquire);
            again.snapshot = self.resolver.load_full();
            again.fill(&again.snapshot.clone());
            return again.filter_tagged_into(tags, out);
        }
        // `ranges` carry `unknown && deny_unknown` as resolved at `prepare` (a reload bumps the
        // generation): no resolver load on the request path.
        let mut check = Check::new(&self.view, &self.keys, now, true);
        let tags_ok = tags.is_empty() || check.tags_pass(&self.snapshot, tags);
        match &self.masks {
            // Each distinct budget read once into a bit set, then one AND per deployment.
            Some(masks) if tags_ok => {
                let mut blocked = 0u128;
                for (i, &b) in self.distinct.iter().enumerate() {
                    // Through the memo: budgets that cannot be spent are not read.
                    if check.blocked(b) {
                        blocked |= 1u128 << i;
                    }
                }
                for (i, (&mask, &(_, _, denied))) in masks.iter().zip(&self.ranges).enumerate() {
                    if denied {
                        metrics::counter!("provider_budgets_unknown_provider_total").increment(1);
                    } else if mask & blocked == 0 {
                        out.push(i);
                    }
                }
            }
            _ => {
                check.select(tags_ok, self.resolved(), |i| out.push(i));
            }
        }
        if out.is_empty() && !self.ranges.is_empty() {
            let resolver = self.resolver.load();
            let models = self.targets.iter().map(|t| t.model.as_str());
            return Err(check.no_deployments(&resolver, tags, self.resolved().zip(models)));
        }
        Ok(())
    }

    #[inline]
    fn resolved(&self) -> impl Iterator<Item = Resolved<'_>> {
        self.ranges.iter().map(|&(start, len, unknown)| {
            Resolved::new(
                unknown,
                [
                    &self.slots[start as usize..(start + len) as usize],
                    &[],
                    &[],
                ],
            )
        })
    }

    /// The indices of the usable deployments.
    ///
    /// # Errors
    ///
    /// As [`Prepared::filter_into`].
    pub fn filter(&self) -> Result<Vec<usize>, NoDeployments> {
        let mut out = Vec::with_capacity(self.len());
        self.filter_into(&mut out)?;
        Ok(out)
    }

    /// Whether the limiter this list was prepared by is still open (not dropped).
    pub fn limiter_alive(&self) -> bool {
        self.limiter.strong_count() > 0
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

/// Installs a budget's enforcement in the view. A strict budget **without Redis** is not
/// held to a grant: the node is the whole fleet, so admitting against the limit
/// (`spend + reserved + estimate <= limit`, atomic) is already exact; its grant is, in
/// effect, the whole limit.
pub(crate) fn set_policy(view: &View, slot: u32, b: &crate::config::BudgetConfig, fleet: bool) {
    view.set_policy(slot, b.enforcement, b.offline);
    if !fleet {
        view.set_strict(slot, false);
    }
}
