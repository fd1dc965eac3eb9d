//! [`Limiter`]: the facade a router holds. It owns the view, the journal thread, the store and
//! (with Redis configured) the fleet replication, and stops them when the last clone is
//! dropped. Its children add to it: `spend` (one spend call, [`Receipt`](spend::Receipt)),
//! `reserve`, `filter`, `status`, `reload`, `open` (and repair), `fleet` (the one place that
//! differs without the `redis` feature), `adjust` (corrections), `history` (a budget's
//! windows), `idempotency` (the stored idempotency records read back), `runtime` (runtime
//! budgets), `testing` (hooks for tests).

pub(crate) mod adjust;
pub(crate) mod filter;
pub(crate) mod fleet;
pub(crate) mod health;
pub(crate) mod held;
pub(crate) mod history;
pub(crate) mod idempotency;
pub(crate) mod materialize;
pub(crate) mod open;
pub(crate) mod pricing;
pub(crate) mod reload;
pub(crate) mod reserve;
pub(crate) mod runtime;
pub(crate) mod spend;
pub(crate) mod status;
pub(crate) mod template_status;
pub mod testing;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use arc_swap::ArcSwap;
use jiff::Timestamp;

use crate::config::Config;
use crate::durable::journal::{Journal, StopReason};
use crate::durable::store::{Store, StoreError};
use crate::error::{Error, RecordError};
use crate::limiter::filter::{Check, NoDeployments};
use crate::limiter::fleet::Fleet;
use crate::limiter::health::Health;
use crate::limiter::open::LimiterBuilder;
use crate::model::budget::{Scope, SoftLimitCrossed, SoftLimitHandler};
use crate::model::clock::Clock;
use crate::model::identity::Identity;
use crate::model::money::Money;
use crate::model::slots::SlotKeys;
use crate::model::window::Window;
use crate::resolve::{Deployment, Resolved, Resolver, Target};
use crate::template::Template;
use crate::view::View;

/// Enforces the configured budgets. Cheap to clone (one `Arc`); share it across threads and
/// tasks. The background threads stop when the last clone is dropped or on [`Limiter::shutdown`].
#[derive(Debug, Clone)]
pub struct Limiter {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    /// What is applied: the base config with the runtime budgets merged in (module
    /// `runtime`). Swapped by `reload` and by runtime budget changes.
    pub(crate) config: ArcSwap<Config>,
    /// The config as opened or last reloaded, without runtime budgets.
    pub(crate) base: ArcSwap<Config>,
    /// The runtime budget definitions (the data dir's `definitions` tree, in memory).
    pub(crate) definitions: Arc<crate::durable::definitions::Definitions>,
    /// Their exchange with Redis (empty without Redis).
    pub(crate) runtime_link: crate::limiter::fleet::DefinitionLink,
    /// Warnings about runtime budgets already logged (each once per process).
    pub(crate) notes: crate::limiter::runtime::Notes,
    pub(crate) clock: Arc<dyn Clock>,
    /// Scope name → budget slots; swapped by `reload`. Shared with `Prepared` lists.
    pub(crate) resolver: Arc<ArcSwap<Resolver>>,
    /// (provider, period) per budget slot, shared with the journal and the replicator.
    pub(crate) keys: Arc<SlotKeys>,
    /// Serialises reloads and runtime budget changes (each computes the config to apply from
    /// the base and the definitions, then installs it: two at once could install an older
    /// one last).
    pub(crate) reload_lock: Mutex<()>,
    /// Serialises corrections: a credit's check against the window's net spend and its count
    /// are one step, so concurrent credits on this node never credit more than was spent.
    pub(crate) adjust_lock: Mutex<()>,
    /// Bumped by each reload: `Prepared` lists resolve again.
    pub(crate) generation: Arc<AtomicU64>,
    /// Called once per window per soft limit crossed (`Limiter::on_soft_limit`).
    pub(crate) soft_handler: Arc<Mutex<Option<SoftLimitHandler>>>,
    /// The store, for a reload to read what a new budget already has stored.
    pub(crate) store: Arc<Store>,
    /// Shared with the journal (which prunes it) and the replicator (which raises others).
    pub(crate) view: Arc<View>,
    pub(crate) journal: Journal,
    /// Open reservations (module `reserve`): what the reaper expires.
    pub(crate) reservations: crate::limiter::reserve::Registry,
    pub(crate) node_id: String,
    /// Fleet replication and fleet-wide soft-limit claims (empty without Redis).
    pub(crate) fleet: Fleet,
    /// Set by `shutdown`: later records are refused instead of queued to a stopped journal.
    pub(crate) closed: AtomicBool,
    /// The price catalog (module `pricing`): loaded at open when configured, else lazily;
    /// swapped by `reload`.
    pub(crate) prices: crate::limiter::pricing::Prices,
}

impl Inner {
    /// Stops the background work in dependency order: make everything durable, ship it in a
    /// last sync round, then stop the journal. Idempotent.
    fn stop(&self) -> Result<(), StoreError> {
        // First: no runtime definition is applied while the rest stops.
        self.runtime_link.stop();
        self.fleet.stop(|| drop(self.journal.flush()));
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
    /// journal (and the replicator when Redis is configured). The same as
    /// `Limiter::builder(config).open()`.
    ///
    /// # Errors
    ///
    /// As [`LimiterBuilder::open`].
    pub fn open(config: Config) -> Result<Limiter, Error> {
        LimiterBuilder::new(config).open()
    }

    /// Opens or repairs with options: `Limiter::builder(config).clock(clock).open()`, or
    /// `.repair(accept_loss)` (see [`LimiterBuilder`]).
    pub fn builder(config: Config) -> LimiterBuilder {
        LimiterBuilder::new(config)
    }

    /// This node's id (configured, or generated once and kept in the data dir).
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The configuration in use, runtime budgets included (a snapshot: [`Limiter::reload`]
    /// and runtime budget changes replace it).
    pub fn config(&self) -> Arc<Config> {
        self.inner.config.load_full()
    }

    /// What `reload` (module `reload`) changes.
    pub(crate) fn reload_parts(&self) -> crate::limiter::reload::Parts<'_> {
        crate::limiter::reload::Parts {
            config: &self.inner.config,
            keys: &self.inner.keys,
            view: &self.inner.view,
            store: &self.inner.store,
            journal: &self.inner.journal,
        }
    }

    /// Installs a reloaded config (the base, and what is applied) and its (scope, name,
    /// slot) table, with the templates' live names carried over. The caller holds the reload
    /// lock.
    pub(crate) fn install(&self, base: Config, config: Config, slots: Vec<(Scope, String, u32)>) {
        let resolver = Resolver::with_budgets(&config, slots);
        self.carry_templates(&resolver, config.redis.is_some());
        self.inner.resolver.store(Arc::new(resolver));
        self.inner.base.store(Arc::new(base));
        self.inner.config.store(Arc::new(config));
        self.inner.generation.fetch_add(1, Ordering::Release);
    }

    /// The clock's current time.
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
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

    /// Runs `action` once per fleet for `name` in `window` (put what identifies the event and
    /// the window in `name`): with Redis configured, on the node whose claim of
    /// `{prefix}:{name}:once` succeeds, in the background like soft limits (and on this node
    /// when Redis cannot answer); without Redis, here and now. The sidecar's forecast alerts
    /// use it.
    pub fn once_per_fleet(
        &self,
        name: &str,
        window: Window,
        action: impl FnOnce() + Send + 'static,
    ) {
        if let Some(action) = self.inner.fleet.claim_once(name, window, Box::new(action)) {
            action();
        }
    }

    // ---- filter ------------------------------------------------------------------------------

    /// The deployments whose budgets all have room, in their order, for a request carrying
    /// `tags` ([`NO_TAGS`] for none): a deployment passes when every budget that applies has
    /// room (its provider's, its model's, its own by id) and every budget of the request's
    /// tags has room (a spent tag budget leaves nothing). Deployments without any budget
    /// pass; unresolvable ones follow `unknown_provider`. An empty input gives an empty
    /// result; a non-empty input with nothing left gives [`NoDeployments`]. For a request
    /// with identities (key, user, team, org, customer), see [`Limiter::filter_for`].
    ///
    /// # Errors
    ///
    /// [`NoDeployments`] when the input is not empty and no deployment is left (each
    /// exceeded budget and unresolvable deployment listed).
    #[inline]
    pub fn filter<'a, D: Deployment, T: AsRef<str>>(
        &self,
        deployments: &'a [D],
        tags: &[T],
    ) -> Result<Vec<&'a D>, NoDeployments> {
        self.filter_with::<D, T, false>(deployments, tags, &Identity::NONE)
    }

    /// [`Limiter::filter`] for a request made for `identity`: every budget of every name it
    /// gives (its key's, user's, team's, org's, customer's) must have room too, as its tags'
    /// must (a spent identity budget leaves nothing). Names without budget are ignored.
    ///
    /// ```
    /// use provider_budgets::{Config, Identity, Limiter, Spend, NO_TAGS};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let yaml = "provider_budgets:\n  budgets:\n    - {team: research, limit: 1, period: 1mo}\n";
    /// let limiter = Limiter::open(Config::from_yaml_str(yaml)?.data_dir(dir.path()))?;
    /// let alice = Identity::new().key("key-of-alice").team("research");
    /// let bob = Identity::new().key("key-of-bob").team("research");
    ///
    /// limiter.charge(Spend::deployment("gpt-4o", "1".parse()?).identity(&alice))?;
    /// // The team's budget is spent: bob's key, in the same team, gets nothing either.
    /// assert!(limiter.filter_for(&["gpt-4o"], NO_TAGS, &bob).is_err());
    /// assert_eq!(limiter.filter_for(&["gpt-4o"], NO_TAGS, &Identity::new().key("key-of-bob"))?.len(), 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Limiter::filter`].
    #[inline]
    pub fn filter_for<'a, D: Deployment, T: AsRef<str>>(
        &self,
        deployments: &'a [D],
        tags: &[T],
        identity: &Identity<'_>,
    ) -> Result<Vec<&'a D>, NoDeployments> {
        self.filter_with::<D, T, true>(deployments, tags, identity)
    }

    /// The filter of [`Limiter::filter`] and [`Limiter::filter_for`]; `WITH_IDENTITY: false`
    /// compiles the identity check out (see `Check::request_passes`).
    fn filter_with<'a, D: Deployment, T: AsRef<str>, const WITH_IDENTITY: bool>(
        &self,
        deployments: &'a [D],
        tags: &[T],
        identity: &Identity<'_>,
    ) -> Result<Vec<&'a D>, NoDeployments> {
        let resolver = self.inner.resolver.load();
        let cache = resolver.cache();
        let mut check = self.check(&resolver);
        let request_ok = check.request_passes::<T, WITH_IDENTITY>(&resolver, tags, identity);
        let mut out = Vec::with_capacity(deployments.len());
        check.select_in(&resolver, &cache, request_ok, deployments, |_, d| {
            out.push(d)
        });
        check.note_misses(&resolver);
        if out.is_empty() && !deployments.is_empty() {
            return Err(check.no_deployments(
                &resolver,
                tags,
                identity,
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
    #[inline]
    pub fn filter_in_place<D: Deployment, T: AsRef<str>>(
        &self,
        deployments: &mut Vec<D>,
        tags: &[T],
    ) -> Result<(), NoDeployments> {
        self.filter_in_place_with::<D, T, false>(deployments, tags, &Identity::NONE)
    }

    /// [`Limiter::filter_in_place`] for a request made for `identity` (see
    /// [`Limiter::filter_for`]).
    ///
    /// # Errors
    ///
    /// As [`Limiter::filter`].
    #[inline]
    pub fn filter_in_place_for<D: Deployment, T: AsRef<str>>(
        &self,
        deployments: &mut Vec<D>,
        tags: &[T],
        identity: &Identity<'_>,
    ) -> Result<(), NoDeployments> {
        self.filter_in_place_with::<D, T, true>(deployments, tags, identity)
    }

    /// The filter of [`Limiter::filter_in_place`] and [`Limiter::filter_in_place_for`] (see
    /// [`Limiter::filter_with`]).
    fn filter_in_place_with<D: Deployment, T: AsRef<str>, const WITH_IDENTITY: bool>(
        &self,
        deployments: &mut Vec<D>,
        tags: &[T],
        identity: &Identity<'_>,
    ) -> Result<(), NoDeployments> {
        let resolver = self.inner.resolver.load();
        let cache = resolver.cache();
        let mut check = self.check(&resolver);
        let request_ok = check.request_passes::<T, WITH_IDENTITY>(&resolver, tags, identity);
        let kept = check.select_in(&resolver, &cache, request_ok, deployments, |_, _| {});
        check.note_misses(&resolver);
        if kept == 0 {
            if deployments.is_empty() {
                return Ok(());
            }
            return Err(check.no_deployments(
                &resolver,
                tags,
                identity,
                deployments
                    .iter()
                    .map(|d| (resolver.resolve_in(&cache, d), d.model())),
            ));
        }
        // Second pass answered by the memo (same decisions, no second window read).
        deployments.retain(|d| check.passes_in(&resolver, &cache, d));
        // The second pass noted the same misses again: already handed over.
        drop(check.take_misses());
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

    // ---- sync, flush, shutdown, health ---------------------------------------------------------

    /// One replication round now: ships this node's durable totals to Redis and reads the
    /// others', then exchanges the runtime budgets (the CLI's `sync`; a failure of that
    /// exchange alone is logged, not returned). Fails when no Redis is configured or it cannot be reached.
    ///
    /// # Errors
    ///
    /// [`Error::Replication`] when no Redis is configured or the round failed;
    /// [`Error::Storage`] when the flush before it failed.
    pub fn sync(&self) -> Result<(), Error> {
        if !self.inner.fleet.replicating() {
            return Err(crate::error::ReplicationError::NotConfigured.into());
        }
        // Only durable totals are shipped: make everything recorded so far durable first.
        self.flush()?;
        // The runtime budgets' round runs alongside the spend round (it applies what it
        // takes). Its failure is not the sync's: a cluster master that is down fails only
        // what it serves, and the definitions thread reports its own outage.
        let (spend, definitions) = self.inner.runtime_link.sync(|| self.inner.fleet.sync());
        if let Some(Err(e)) = definitions {
            tracing::debug!(error = %e, "runtime budgets not exchanged in this sync");
        }
        let Some(spend) = spend else {
            return Err(crate::error::ReplicationError::NotConfigured.into());
        };
        Ok(spend?)
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
            replication: self
                .inner
                .fleet
                .status(&self.inner.config.load(), self.now())
                .0,
            open_reservations: self.inner.reservations.len(),
        }
    }

    /// A reservation was refused by this node's grant alone on the strict budgets `budgets`
    /// (the one that refused and the others of its candidate whose grants are short): notes
    /// the amount on each (the next grant round asks each for at least that much more) and waits up to
    /// `grant_wait` for an out-of-cycle round. `true` when one finished (retry once then).
    pub(crate) fn wait_for_grant(&self, budgets: &[(u32, u64)]) -> bool {
        self.note_starved(budgets);
        self.inner.fleet.grant_round(&self.inner.config.load())
    }

    /// [`Limiter::wait_for_grant`] for async code: awaits the round without blocking.
    pub(crate) async fn wait_for_grant_async(&self, budgets: &[(u32, u64)]) -> bool {
        self.note_starved(budgets);
        let config = self.inner.config.load_full();
        self.inner.fleet.grant_round_async(&config).await
    }

    /// Remembers what each budget's grant lacked (its part of the estimate, in its unit).
    fn note_starved(&self, budgets: &[(u32, u64)]) {
        for &(b, amount) in budgets {
            self.inner.view.note_starved(b, Money::from_nanos(amount));
        }
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

/// No request tags (`limiter.filter(&deployments, NO_TAGS)`).
pub const NO_TAGS: &[&str] = &[];

/// The slots a charge adds to: the deployment's and those of each distinct tag (see
/// [`charge_slots_for`] for a request with identities).
pub(crate) fn charge_slots<'a, T: AsRef<str>>(
    resolver: &'a Resolver,
    r: &Resolved<'a>,
    tags: &'a [T],
) -> impl Iterator<Item = u32> + 'a {
    let r = *r;
    (0..3)
        .flat_map(move |k| r.slots[k].iter().copied())
        .chain(tag_slots(resolver, tags))
}

/// The slots a charge adds to: the deployment's, those of each distinct tag and those of
/// each identity. A separate iterator from [`charge_slots`] rather than one with an empty
/// identity: the longer chain cost a charge without identity a quarter more instructions.
pub(crate) fn charge_slots_for<'a, T: AsRef<str>>(
    resolver: &'a Resolver,
    r: &Resolved<'a>,
    tags: &'a [T],
    identity: &'a Identity<'a>,
) -> impl Iterator<Item = u32> + 'a {
    charge_slots(resolver, r, tags).chain(identity_slots(resolver, identity))
}

/// The slots of the request itself, whatever the deployment: each distinct tag's, then each
/// identity's.
pub(crate) fn request_slots<'a, T: AsRef<str>>(
    resolver: &'a Resolver,
    tags: &'a [T],
    identity: &'a Identity<'a>,
) -> impl Iterator<Item = u32> + 'a {
    tag_slots(resolver, tags).chain(identity_slots(resolver, identity))
}

/// The slots of each distinct tag (a tag given twice is charged once).
pub(crate) fn tag_slots<'a, T: AsRef<str>>(
    resolver: &'a Resolver,
    tags: &'a [T],
) -> impl Iterator<Item = u32> + 'a {
    tags.iter().enumerate().flat_map(move |(i, t)| {
        let t = t.as_ref();
        let repeated = tags[..i].iter().any(|u| u.as_ref() == t);
        if repeated {
            &[][..]
        } else {
            resolver.slots(Scope::Tag, t)
        }
        .iter()
        .copied()
    })
}

/// The slots of each name of `identity` (one name per identity scope: each is distinct): its
/// explicit budgets' and its templated series' (a name without series yet adds none: see
/// [`refused_new`] and `materialize`).
pub(crate) fn identity_slots(resolver: &Resolver, identity: &Identity<'_>) -> SlotBuf {
    let mut out = SlotBuf::default();
    for (scope, name) in identity.iter() {
        out.extend(resolver.slots(scope, name));
        if let Some(t) = resolver.template(scope) {
            t.lookup(name, |s| out.push(s));
        }
    }
    out
}

/// The first name of `identity` that a template refuses before it has series: the template
/// is full, or would count nothing for it (see [`Template::refuses_new`]), or the name cannot
/// be a series (`template::name_fault`). `filter` refuses such a request, as a charge could
/// not count it. With why, in one line.
pub(crate) fn refused_new(resolver: &Resolver, identity: &Identity<'_>) -> Option<String> {
    identity.iter().find_map(|(scope, name)| {
        let t = resolver.template(scope)?;
        if let Some(why) = crate::template::name_fault(name) {
            return Some(format!(
                "{scope} {name:?} cannot have a templated budget: {why}"
            ));
        }
        (!t.contains(name) && t.refuses_new()).then(|| template_refusal(t, scope, name))
    })
}

/// Why template `t` refuses the new name `name` of `scope`.
pub(crate) fn template_refusal(t: &Template, scope: Scope, name: &str) -> String {
    if t.is_full() {
        format!(
            "{scope} {name:?}: the template {scope}:* has {} live series, its max_series",
            t.bound
        )
    } else {
        format!("{scope} {name:?}: the template {scope}:* has a zero limit")
    }
}

/// Budget slots, the first [`SlotBuf::INLINE`] without allocating: the request path collects
/// an identity's slots here (templated series are read under a lock, so they cannot be
/// borrowed out as the resolver's tables are).
#[derive(Debug, Clone, Default)]
pub(crate) struct SlotBuf {
    inline: [u32; SlotBuf::INLINE],
    len: usize,
    spill: Vec<u32>,
}

impl SlotBuf {
    /// Five identities with two budgets each, and room to spare.
    const INLINE: usize = 12;

    #[inline]
    pub fn push(&mut self, slot: u32) {
        match self.inline.get_mut(self.len) {
            Some(s) => {
                *s = slot;
                self.len += 1;
            }
            None => self.spill.push(slot),
        }
    }

    #[inline]
    pub fn extend(&mut self, slots: &[u32]) {
        slots.iter().for_each(|&s| self.push(s));
    }
}

impl IntoIterator for SlotBuf {
    type Item = u32;
    type IntoIter = std::iter::Chain<
        std::iter::Take<std::array::IntoIter<u32, { SlotBuf::INLINE }>>,
        std::vec::IntoIter<u32>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.inline.into_iter().take(self.len).chain(self.spill)
    }
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

    /// Writes the indices of the usable deployments for a request carrying `tags`
    /// ([`NO_TAGS`] for none) into `out` (cleared first; reuse it to avoid allocating).
    ///
    /// # Errors
    ///
    /// [`NoDeployments`] when no deployment is left (`out` is then empty).
    #[inline]
    pub fn filter_into<T: AsRef<str>>(
        &self,
        tags: &[T],
        out: &mut Vec<usize>,
    ) -> Result<(), NoDeployments> {
        self.select_into::<T, false>(tags, &Identity::NONE, out)
    }

    /// [`Prepared::filter_into`] for a request made for `identity`: every budget of every
    /// name it gives must have room too (see [`Limiter::filter_for`]).
    ///
    /// # Errors
    ///
    /// As [`Prepared::filter_into`].
    #[inline]
    pub fn filter_into_for<T: AsRef<str>>(
        &self,
        tags: &[T],
        identity: &Identity<'_>,
        out: &mut Vec<usize>,
    ) -> Result<(), NoDeployments> {
        self.select_into::<T, true>(tags, identity, out)
    }

    /// The filter of [`Prepared::filter_into`] and [`Prepared::filter_into_for`];
    /// `WITH_IDENTITY: false` compiles the identity check out (see `Check::request_passes`).
    #[inline]
    fn select_into<T: AsRef<str>, const WITH_IDENTITY: bool>(
        &self,
        tags: &[T],
        identity: &Identity<'_>,
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
            return again.select_into::<T, WITH_IDENTITY>(tags, identity, out);
        }
        // `ranges` carry `unknown && deny_unknown` as resolved at `prepare` (a reload bumps the
        // generation): no resolver load on the request path.
        let mut check = Check::new(&self.view, &self.keys, now, true);
        let request_ok = (tags.is_empty() && (!WITH_IDENTITY || identity.is_empty()))
            || check.request_passes::<T, WITH_IDENTITY>(&self.snapshot, tags, identity);
        match &self.masks {
            // Each distinct budget read once into a bit set, then one AND per deployment.
            Some(masks) if request_ok => {
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
                check.select(request_ok, self.resolved(), |i| out.push(i));
            }
        }
        if out.is_empty() && !self.ranges.is_empty() {
            let resolver = self.resolver.load();
            let models = self.targets.iter().map(|t| t.model.as_str());
            return Err(check.no_deployments(
                &resolver,
                tags,
                identity,
                self.resolved().zip(models),
            ));
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

    /// The indices of the usable deployments for a request carrying `tags`.
    ///
    /// # Errors
    ///
    /// As [`Prepared::filter_into`].
    pub fn filter<T: AsRef<str>>(&self, tags: &[T]) -> Result<Vec<usize>, NoDeployments> {
        self.filter_for(tags, &Identity::NONE)
    }

    /// The indices of the usable deployments for a request carrying `tags`, made for
    /// `identity` (see [`Limiter::filter_for`]).
    ///
    /// # Errors
    ///
    /// As [`Prepared::filter_into`].
    pub fn filter_for<T: AsRef<str>>(
        &self,
        tags: &[T],
        identity: &Identity<'_>,
    ) -> Result<Vec<usize>, NoDeployments> {
        let mut out = Vec::with_capacity(self.len());
        self.filter_into_for(tags, identity, &mut out)?;
        Ok(out)
    }

    /// Whether the limiter this list was prepared by is still open (not dropped).
    pub fn limiter_alive(&self) -> bool {
        self.limiter.strong_count() > 0
    }
}

/// Installs a budget's enforcement in the view. A strict budget **without Redis** is not
/// held to a grant: the node is the whole fleet, so admitting against the limit
/// (`spend + reserved + estimate <= limit`, atomic) is already exact; its grant is, in
/// effect, the whole limit.
pub(crate) fn set_policy(view: &View, slot: u32, b: &crate::config::BudgetConfig, fleet: bool) {
    view.set_policy(slot, b.enforcement, b.offline);
    view.set_unit(slot, b.unit);
    view.set_cap(slot, b.max_estimate);
    if !fleet {
        view.set_strict(slot, false);
    }
}
