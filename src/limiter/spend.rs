//! One spend call: a [`Spend`] says what was spent, against what and when;
//! [`Limiter::charge`] counts it and hands back a [`Receipt`]; durability is a value, not a
//! method suffix: drop the receipt (buffered: durable within `storage.max_delay`), or
//! [`Receipt::wait`] / `.await` it (returns once an fsync covers it, group commit).
//!
//! Why the receipt asks for durability lazily: the buffered path (the usual one) must stay as
//! cheap as it was (no channel, no allocation, no reference count). Only a receipt that is
//! waited on queues a flush barrier behind its spend (the journal works in order, so the
//! barrier's acknowledgement covers the spend); concurrent waiters share one fsync.
//!
//! This module also holds the one helper that makes a durability acknowledgement
//! ([`AckWait::request`]): every place in the facade that waits for the journal goes
//! through it.

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::task::{Context, Poll};

use jiff::Timestamp;

use std::sync::atomic::Ordering;

use crate::durable::journal::{Ack, AckResult, Event, Items, Journal, KeyedAdd};
use crate::error::RecordError;
use crate::limiter::{charge_slots, charge_slots_for, request_slots, Limiter};
use crate::model::budget::SoftLimitCrossed;
use crate::model::clock::floor_secs;
use crate::model::identity::Identity;
use crate::model::money::Money;
use crate::model::unit::Unit;
use crate::model::window::Window;
use crate::pricing::{PriceSource, Usage};
use crate::resolve::{Deployment, MissLog};

/// How far past the clock a spend's `at` may lie ([`Spend::at`]); later is refused with
/// [`RecordError::Future`] and nothing is counted. Spend is counted in the window
/// of its `at` and every distinct window is kept and replicated, so an unbounded future `at`
/// would let one client pile up windows without limit. Five minutes absorb the clock skew
/// between a router and this node; the past stays bounded by `storage.retention`.
pub const MAX_FUTURE_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

/// What a spend is counted against.
#[derive(Debug)]
pub(crate) enum Against<'a, D: ?Sized> {
    /// Every provider-scope budget of this provider name.
    Provider(&'a str),
    /// Every budget that applies to the deployment (provider, model, id).
    Deployment(&'a D),
}

/// One spend to count with [`Limiter::charge`]: a cost against a provider
/// ([`Spend::provider`]) or a deployment ([`Spend::deployment`]), plus the request's tags
/// ([`Spend::tags`]: each tag's budgets count it too), its identities ([`Spend::identity`]:
/// each identity's budgets count it too) and the instant it happened ([`Spend::at`];
/// default: now).
///
/// Token usage instead of a cost ([`Spend::deployment_usage`]): the limiter prices it at
/// [`Limiter::charge`] by its catalog ([`Limiter::price`], the deployment's model), and the
/// [`Receipt`] says what was counted ([`Receipt::cost`], [`Receipt::priced`]). Decision: a
/// constructor rather than a `usage` builder taking effect "when the cost is absent", since
/// every other constructor has a cost; [`Spend::usage`] attaches the usage to a spend with a
/// cost, where the given cost wins (the usage is not priced).
///
/// Built with methods only (its fields are private), so later versions can add what a spend
/// carries without breaking callers. `D` is the
/// deployment type; a provider spend has `D = dyn Deployment`, so code that builds either
/// kind in one place can name one type (`Spend::deployment(&d as &dyn Deployment, cost)`).
///
/// ```
/// use provider_budgets::{Identity, Spend, Money, Target};
///
/// let cost: Money = "0.25".parse().unwrap();
/// let by_provider = Spend::provider("openai", cost);
/// let d = Target::parse("azure/gpt-4o");
/// let by_deployment = Spend::deployment(&d, cost).tags(&["team-a"]);
/// let id = Identity::new().key("9f86d0…").team("research");
/// let for_a_team = Spend::deployment(&d, cost).identity(&id);
/// # let _ = (by_provider, by_deployment, for_a_team);
/// ```
#[must_use = "a Spend counts nothing until it is passed to Limiter::charge"]
pub struct Spend<'a, D: ?Sized = dyn Deployment, T = &'a str> {
    pub(crate) against: Against<'a, D>,
    pub(crate) tags: &'a [T],
    /// The request's identities; [`Identity::NONE`] when none is given.
    pub(crate) identity: &'a Identity<'a>,
    /// `None`: price `usage` ([`Spend::deployment_usage`]).
    pub(crate) cost: Option<Money>,
    /// The call's token usage, if given.
    pub(crate) usage: Option<Usage>,
    pub(crate) at: Option<Timestamp>,
    /// The idempotency key and the fingerprint of its request
    /// ([`Spend::idempotency_key`]); `None` costs the request path nothing.
    pub(crate) key: Option<(&'a str, u64)>,
}

impl<'a> Spend<'a> {
    /// `cost` against every provider-scope budget of `provider` (one per period).
    pub fn provider(provider: &'a str, cost: Money) -> Spend<'a> {
        Spend {
            against: Against::Provider(provider),
            tags: &[],
            identity: &Identity::NONE,
            cost: Some(cost),
            usage: None,
            at: None,
            key: None,
        }
    }
}

impl<'a, D: Deployment + ?Sized> Spend<'a, D> {
    /// `cost` against every budget that applies to the deployment: its provider's, its
    /// model's and its own (by id), resolved exactly as [`Limiter::filter`] does, so spend
    /// never goes to another budget than the one that filtered.
    pub fn deployment(deployment: &'a D, cost: Money) -> Spend<'a, D> {
        Spend {
            against: Against::Deployment(deployment),
            tags: &[],
            identity: &Identity::NONE,
            cost: Some(cost),
            usage: None,
            at: None,
            key: None,
        }
    }

    /// The cost of `usage` on the deployment's model ([`Deployment::model`]), priced at
    /// [`Limiter::charge`] by the limiter's catalog ([`Limiter::price`]), against every
    /// budget that applies to the deployment (as [`Spend::deployment`]). An unpriced model
    /// follows `pricing.unpriced`: `deny` refuses the charge ([`RecordError::Unpriced`],
    /// nothing counted), `allow_zero` counts zero, `default` prices it at
    /// `pricing.default_per_mtok`. `usage` by value or by reference.
    ///
    /// ```
    /// use provider_budgets::{Spend, Target, Usage};
    ///
    /// let d = Target::parse("gpt-4o");
    /// let spend = Spend::deployment_usage(&d, Usage::new(1200, 300).cache_read(1000));
    /// assert_eq!(spend.given_cost(), None);
    /// ```
    pub fn deployment_usage(deployment: &'a D, usage: impl Into<Usage>) -> Spend<'a, D> {
        Spend {
            against: Against::Deployment(deployment),
            tags: &[],
            identity: &Identity::NONE,
            cost: None,
            usage: Some(usage.into()),
            at: None,
            key: None,
        }
    }
}

impl<'a, D: ?Sized, T> Spend<'a, D, T> {
    /// The request's tags: each distinct tag's budgets count the spend too.
    pub fn tags<U: AsRef<str>>(self, tags: &'a [U]) -> Spend<'a, D, U> {
        Spend {
            against: self.against,
            tags,
            identity: self.identity,
            cost: self.cost,
            usage: self.usage,
            at: self.at,
            key: self.key,
        }
    }

    /// The request's identities (API key, user, team, org, customer): each name's budgets
    /// count the spend too. Name every identity whose budgets the spend belongs to (a key's
    /// spend counts toward its team only when the team is named as well).
    pub fn identity(self, identity: &'a Identity<'a>) -> Self {
        Spend { identity, ..self }
    }

    /// Counts the spend in the windows containing `at` (e.g. when the request was made)
    /// instead of now. A window that ended more than `storage.retention` ago is refused
    /// ([`RecordError::Expired`]), and so is an `at` later than now plus
    /// [`MAX_FUTURE_SKEW`] ([`RecordError::Future`]).
    pub fn at(self, at: Timestamp) -> Self {
        Spend {
            at: Some(at),
            ..self
        }
    }

    /// Writes an idempotency record (`key` and the `fingerprint` of its request) with the
    /// spend, in the journal's sled batch of the spend itself: after a crash both are on disk
    /// or neither. [`Limiter::idempotency_records`] reads the records back after a restart,
    /// for a service that answers retries (the sidecar); the limiter itself does not
    /// deduplicate. A spend that counts nothing (no budget applies, a cost of zero) writes no
    /// record. Not a stable API.
    #[doc(hidden)]
    pub fn idempotency_key(self, key: &'a str, fingerprint: u64) -> Self {
        Spend {
            key: Some((key, fingerprint)),
            ..self
        }
    }

    /// The call's token usage. With a cost given, the cost wins: the usage is carried, not
    /// priced. Without one ([`Spend::deployment_usage`]), this replaces the usage priced.
    /// `usage` by value or by reference.
    pub fn usage(self, usage: impl Into<Usage>) -> Self {
        Spend {
            usage: Some(usage.into()),
            ..self
        }
    }

    /// The cost given; zero for a spend priced from its usage ([`Spend::given_cost`] tells
    /// them apart, [`Receipt::cost`] says what was counted).
    pub fn cost(&self) -> Money {
        self.cost.unwrap_or(Money::ZERO)
    }

    /// The cost given, `None` for a spend priced from its usage.
    pub fn given_cost(&self) -> Option<Money> {
        self.cost
    }

    /// The token usage given, if any.
    pub fn given_usage(&self) -> Option<Usage> {
        self.usage
    }
}

impl<D: ?Sized> Clone for Against<'_, D> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<D: ?Sized> Copy for Against<'_, D> {}

impl<D: ?Sized, T> Clone for Spend<'_, D, T> {
    fn clone(&self) -> Self {
        *self
    }
}

/// A spend is a few references and numbers: copy it to count it again elsewhere.
impl<D: ?Sized, T> Copy for Spend<'_, D, T> {}

impl<D: Deployment + ?Sized, T: AsRef<str>> fmt::Debug for Spend<'_, D, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Spend");
        match &self.against {
            Against::Provider(p) => s.field("provider", p),
            Against::Deployment(d) => s.field("deployment", &d.model()),
        };
        let tags: Vec<&str> = self.tags.iter().map(AsRef::as_ref).collect();
        s.field("tags", &tags)
            .field("identity", self.identity)
            .field("cost", &self.cost)
            .field("usage", &self.usage)
            .field("at", &self.at)
            .field("idempotency_key", &self.key.map(|k| k.0))
            .finish()
    }
}

/// The limiter a receipt waits on: borrowed from a charge, owned from a reservation's end.
#[derive(Debug)]
enum Handle<'l> {
    Borrowed(&'l Limiter),
    Owned(Limiter),
}

impl Handle<'_> {
    fn get(&self) -> &Limiter {
        match self {
            Handle::Borrowed(l) => l,
            Handle::Owned(l) => l,
        }
    }
}

/// A budget that applied to a spend and could not count it ([`Receipt::uncounted`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Uncounted {
    /// Its scope.
    pub scope: crate::model::budget::Scope,
    /// Its name.
    pub name: String,
    /// Its period, as status shows it.
    pub period: String,
    /// Its unit: what the spend lacked.
    pub unit: Unit,
}

impl Uncounted {
    pub(crate) fn of(key: &crate::model::key::BudgetKey) -> Uncounted {
        Uncounted {
            scope: key.scope,
            name: key.name.clone(),
            period: key.period_shown().to_owned(),
            unit: key.unit(),
        }
    }
}

/// What one charge counted: the budgets that apply, and those that could not count it.
#[derive(Debug, Default)]
pub(crate) struct Counted {
    pub budgets: usize,
    pub uncounted: Vec<u32>,
}

/// Counts and logs (at most once a second) spends a budget could not count.
#[cold]
fn note_uncounted(inner: &crate::limiter::Inner, slots: &[u32]) {
    static LOGGED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    for &b in slots {
        let unit = inner.view.unit(b);
        metrics::counter!("provider_budgets_uncounted_total", "unit" => unit.as_str()).increment(1);
    }
    let now = inner.clock.now_secs();
    if LOGGED.swap(now, Ordering::Relaxed) != now {
        let key = inner.keys.get(slots[0]).key_name();
        tracing::warn!(
            budget = %key,
            "a spend without usage was not counted in a token budget (every other budget counted it)"
        );
    }
}

/// What [`Limiter::charge`] (and a reservation's commit or release) counted: the number of
/// budgets ([`Receipt::budgets`]; **0 means no budget applies**: nothing was counted, which
/// is not an error).
///
/// The spend is counted in memory and queued to the journal when the receipt exists.
/// Dropping the receipt is the buffered form (durable within `storage.max_delay`);
/// [`Receipt::wait`] blocks and `.await` waits until it is durable on disk.
pub struct Receipt<'l> {
    budgets: usize,
    limiter: Handle<'l>,
    /// What was counted (or would have been, with no budget applying).
    cost: Money,
    /// How the cost was priced; `None`: given.
    source: Option<PriceSource>,
    /// Budgets that applied but could not count the spend (a token budget and no usage):
    /// slots, named on demand ([`Receipt::uncounted`]). Empty: no allocation.
    uncounted: Vec<u32>,
}

impl fmt::Debug for Receipt<'_> {
    /// The count, not the limiter it waits on.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receipt")
            .field("budgets", &self.budgets)
            .field("cost", &self.cost)
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<'l> Receipt<'l> {
    pub(crate) fn new(limiter: &'l Limiter, budgets: usize) -> Receipt<'l> {
        Receipt {
            budgets,
            limiter: Handle::Borrowed(limiter),
            cost: Money::ZERO,
            source: None,
            uncounted: Vec::new(),
        }
    }
}

impl Receipt<'static> {
    pub(crate) fn owned(limiter: Limiter, budgets: usize) -> Receipt<'static> {
        Receipt {
            budgets,
            limiter: Handle::Owned(limiter),
            cost: Money::ZERO,
            source: None,
            uncounted: Vec::new(),
        }
    }
}

impl Receipt<'_> {
    /// The number of budgets the spend was counted against (0: no budget applies).
    pub fn budgets(&self) -> usize {
        self.budgets
    }

    /// The receipt of `cost`, priced as `source` (`None`: given).
    pub(crate) fn with_cost(mut self, cost: Money, source: Option<PriceSource>) -> Self {
        self.cost = cost;
        self.source = source;
        self
    }

    /// With the slots left uncounted.
    pub(crate) fn with_uncounted(mut self, uncounted: Vec<u32>) -> Self {
        self.uncounted = uncounted;
        self
    }

    /// The budgets that apply to the spend but could not count it, because it lacks what
    /// their unit needs (a `tokens` budget and a spend without usage): every other budget
    /// counted it; these were left as they were, never guessed. Empty for most spends.
    pub fn uncounted(&self) -> Vec<Uncounted> {
        let inner = &self.limiter.get().inner;
        self.uncounted
            .iter()
            .map(|&b| Uncounted::of(&inner.keys.get(b)))
            .collect()
    }

    /// The cost counted in each budget: the one given, or the usage's price.
    pub fn cost(&self) -> Money {
        self.cost
    }

    /// Whether the cost was priced from the usage by a catalog entry or an override. `false`
    /// for a given cost, and for an unpriced model counted under `pricing.unpriced:
    /// allow_zero` or `default` ([`Receipt::price_source`] says which).
    pub fn priced(&self) -> bool {
        matches!(
            self.source,
            Some(PriceSource::Catalog { .. } | PriceSource::Override { .. })
        )
    }

    /// How the cost was priced; `None` when it was given.
    pub fn price_source(&self) -> Option<&PriceSource> {
        self.source.as_ref()
    }

    /// Blocks until the spend (and everything counted before it) is durable on disk: one
    /// fsync shared by concurrent waiters. From async code, `.await` the receipt instead.
    /// Returns [`Receipt::budgets`].
    ///
    /// # Errors
    ///
    /// [`RecordError::Storage`] when the fsync failed (a full disk): the spend stays counted
    /// in memory and the journal retries it; [`RecordError::Closed`] after shutdown.
    pub fn wait(self) -> Result<usize, RecordError> {
        let limiter = self.limiter.get();
        let result =
            AckWait::request(&limiter.inner.journal, false, Event::Flush).and_then(AckWait::recv);
        answer(limiter, result, self.budgets)
    }
}

/// The ack's answer as a receipt's result.
fn answer(
    limiter: &Limiter,
    result: Option<AckResult>,
    budgets: usize,
) -> Result<usize, RecordError> {
    limiter.acked(result).map(|()| budgets)
}

impl Limiter {
    /// The answer of an acknowledgement ([`AckWait`]) as a record's result: `None` (the
    /// journal went away without answering) is why it is gone.
    pub(crate) fn acked(&self, result: Option<AckResult>) -> Result<(), RecordError> {
        match result {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(RecordError::Storage(e)),
            None => Err(self.gone()),
        }
    }
}

impl<'l> IntoFuture for Receipt<'l> {
    type Output = Result<usize, RecordError>;
    type IntoFuture = Durable<'l>;

    /// Waits (without blocking a worker) until the spend is durable, as [`Receipt::wait`].
    fn into_future(self) -> Durable<'l> {
        let wait = AckWait::request(&self.limiter.get().inner.journal, true, Event::Flush);
        Durable {
            receipt: self,
            wait,
        }
    }
}

/// The future of an awaited [`Receipt`].
#[derive(Debug)]
#[must_use = "futures do nothing unless awaited"]
pub struct Durable<'l> {
    receipt: Receipt<'l>,
    wait: Option<AckWait>,
}

impl Future for Durable<'_> {
    type Output = Result<usize, RecordError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let result = match &mut this.wait {
            Some(wait) => match wait.poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(r) => r,
            },
            None => None,
        };
        Poll::Ready(answer(
            this.receipt.limiter.get(),
            result,
            this.receipt.budgets,
        ))
    }
}

/// A durability acknowledgement on its way from the journal: the one place the facade makes
/// the channel of an [`Ack`] (blocking: a crossbeam channel; async: a tokio oneshot).
#[derive(Debug)]
pub(crate) enum AckWait {
    Blocking(crossbeam_channel::Receiver<AckResult>),
    Async(tokio::sync::oneshot::Receiver<AckResult>),
}

impl AckWait {
    /// Sends `event(ack)` to the journal; `None` when the journal is gone (nothing sent).
    /// `asynchronous`: the answer is awaited (poll it) rather than received blocking.
    pub(crate) fn request(
        journal: &Journal,
        asynchronous: bool,
        event: impl FnOnce(Ack) -> Event,
    ) -> Option<AckWait> {
        let (ack, wait) = if asynchronous {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Ack::Async(tx), AckWait::Async(rx))
        } else {
            let (tx, rx) = crossbeam_channel::bounded(1);
            (Ack::Blocking(tx), AckWait::Blocking(rx))
        };
        journal.send(event(ack)).ok()?;
        Some(wait)
    }

    /// Blocks for the answer; `None` when the journal went away without answering.
    pub(crate) fn recv(self) -> Option<AckResult> {
        match self {
            AckWait::Blocking(rx) => rx.recv().ok(),
            AckWait::Async(rx) => rx.blocking_recv().ok(),
        }
    }

    /// Polls for the answer (a blocking one is received at once: never made for async use).
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<AckResult>> {
        match self {
            AckWait::Blocking(rx) => Poll::Ready(rx.recv().ok()),
            AckWait::Async(rx) => Pin::new(rx).poll(cx).map(Result::ok),
        }
    }

    /// Awaits the answer.
    pub(crate) async fn recv_async(mut self) -> Option<AckResult> {
        std::future::poll_fn(|cx| self.poll(cx)).await
    }
}

impl Limiter {
    /// Counts a [`Spend`]: adds its cost to every budget that applies (see
    /// [`Spend::provider`], [`Spend::deployment`], [`Spend::tags`], [`Spend::identity`]) in the windows of its
    /// instant, and returns at once with a [`Receipt`]: drop it (buffered: durable within
    /// `storage.max_delay`), or [`Receipt::wait`] / `.await` it for an fsync.
    ///
    /// **No budget applies** (a provider without budget, a deployment and tags that match
    /// none) is not an error: the receipt says [`Receipt::budgets`]` == 0` and nothing is
    /// counted.
    ///
    /// ```
    /// use provider_budgets::{Config, Limiter, Money, Spend, StatusQuery};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let yaml = "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n";
    /// let limiter = Limiter::open(Config::from_yaml_str(yaml)?.data_dir(dir.path()))?;
    /// let cost: Money = "0.25".parse()?;
    ///
    /// limiter.charge(Spend::provider("openai", cost))?; // buffered
    /// let n = limiter.charge(Spend::deployment("gpt-4o", cost))?.wait()?; // fsynced
    /// assert_eq!(n, 1); // openai's budget
    /// assert_eq!(limiter.charge(Spend::provider("anthropic", cost))?.budgets(), 0);
    /// assert_eq!(limiter.status(StatusQuery::all())[0].spend, "0.5".parse::<Money>()?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`RecordError::Expired`] when a budget's window of [`Spend::at`] ended more than
    /// `storage.retention` ago (nothing is counted then), [`RecordError::Unpriced`] for a
    /// spend given as usage ([`Spend::deployment_usage`]) whose model has no price under
    /// `pricing.unpriced: deny` (nothing counted), [`RecordError::Closed`] after
    /// shutdown, [`RecordError::Storage`] when the journal died.
    #[inline]
    pub fn charge<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        spend: Spend<'_, D, T>,
    ) -> Result<Receipt<'_>, RecordError> {
        let (cost, source) = self.spend_cost(&spend)?;
        let resolver = self.inner.resolver.load();
        let (at, key) = (spend.at, spend.key);
        let cost = (cost, spend.usage.as_ref());
        let counted = match spend.against {
            // The hot path of a provider spend: its slots, no resolution, no iterator chain.
            Against::Provider(p) if spend.tags.is_empty() && spend.identity.is_empty() => {
                let own = resolver.provider_slots(p);
                self.add_at(p, at, cost, key, || own.iter().copied())?
            }
            Against::Provider(p) => {
                self.materialize_for_charge(&resolver, spend.identity);
                let own = resolver.provider_slots(p);
                let request = || request_slots(&resolver, spend.tags, spend.identity);
                self.add_at(p, at, cost, key, || own.iter().copied().chain(request()))?
            }
            Against::Deployment(d) => {
                let cache = resolver.cache();
                let mut misses = MissLog::new(&resolver);
                let r = resolver.resolve_noting(&cache, d, &mut misses.misses);
                // Two instances: a spend without identity runs the loop it had before
                // identities existed (see `charge_slots_for`).
                if spend.identity.is_empty() {
                    let slots = || charge_slots(&resolver, &r, spend.tags);
                    self.add_at(d.model(), at, cost, key, slots)?
                } else {
                    self.materialize_for_charge(&resolver, spend.identity);
                    let slots = || charge_slots_for(&resolver, &r, spend.tags, spend.identity);
                    self.add_at(d.model(), at, cost, key, slots)?
                }
            }
        };
        Ok(Receipt::new(self, counted.budgets)
            .with_cost(cost.0, source)
            .with_uncounted(counted.uncounted))
    }

    /// The cost of a spend: the one given, or its usage priced on its deployment's model.
    #[inline]
    fn spend_cost<D: Deployment + ?Sized, T>(
        &self,
        spend: &Spend<'_, D, T>,
    ) -> Result<(Money, Option<PriceSource>), RecordError> {
        match (spend.cost, &spend.against, &spend.usage) {
            (Some(cost), _, _) => Ok((cost, None)),
            (None, Against::Deployment(d), Some(usage)) => {
                let priced = self.price(d.model(), usage)?;
                Ok((priced.cost, Some(priced.source)))
            }
            // Not built by any constructor: a cost is given, or a deployment's usage.
            (None, _, _) => Ok((Money::ZERO, None)),
        }
    }

    /// Gives the request's templated names their series before a charge. A name a template
    /// refuses (full, see `materialize`) is not counted in that template, and only there:
    /// the spend happened, so every other budget counts it; the refusal is counted
    /// (`provider_budgets_template_refused_total`) and logged, at most once a second.
    #[inline]
    fn materialize_for_charge(&self, resolver: &crate::resolve::Resolver, identity: &Identity<'_>) {
        if !resolver.has_templates() {
            return;
        }
        if let Err(why) = self.materialize(resolver, identity) {
            static LOGGED: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
            let now = self.inner.clock.now_secs();
            if LOGGED.swap(now, std::sync::atomic::Ordering::Relaxed) != now {
                tracing::warn!(
                    "spend not counted in a template (the other budgets count it): {why}"
                );
            }
        }
    }

    /// Adds the spend to `slots()` in the windows of `at` (default now), after refusing an `at`
    /// past retention (`what` names the spend in that error); `key`: the idempotency record
    /// to journal with it.
    #[inline]
    fn add_at<I: Iterator<Item = u32>>(
        &self,
        what: &str,
        at: Option<Timestamp>,
        cost: (Money, Option<&Usage>),
        key: Option<(&str, u64)>,
        slots: impl Fn() -> I,
    ) -> Result<Counted, RecordError> {
        let secs = match at {
            // "Now" is never past retention: no age check (a second clock read).
            None => self.inner.clock.now_secs(),
            Some(at) => {
                self.check_age(what, at, slots())?;
                floor_secs(at)
            }
        };
        self.add_slots(slots(), cost, secs, key)
    }

    /// Refuses a timestamp whose window is already past retention (the journal would delete
    /// it at its next pass, so counting it would only pretend), or that is later than now
    /// plus [`MAX_FUTURE_SKEW`] (every distinct future window is kept and
    /// replicated, so far-future spend would pile up windows without bound).
    pub(crate) fn check_age(
        &self,
        what: &str,
        at: Timestamp,
        slots: impl Iterator<Item = u32>,
    ) -> Result<(), RecordError> {
        let retention = &self.inner.config.load().storage.retention;
        let secs = floor_secs(at);
        let now = self.now();
        let skew = i64::try_from(MAX_FUTURE_SKEW.as_secs()).unwrap_or(i64::MAX);
        let mut slots = slots.peekable();
        // To the second; like an expired one, refused only when a budget would count it.
        if secs > floor_secs(now).saturating_add(skew) && slots.peek().is_some() {
            return Err(RecordError::Future {
                provider: what.to_owned(),
                at,
                limit: Timestamp::from_second(floor_secs(now).saturating_add(skew))
                    .unwrap_or(Timestamp::MAX),
                skew: humantime::format_duration(MAX_FUTURE_SKEW).to_string(),
            });
        }
        let cutoff =
            floor_secs(now).saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
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

    /// Adds each slot's amount of the spend (`cost` for USD budgets, its unit's count of
    /// `usage` for the others: [`Unit::amount`]) in the window of the instant `secs`, and
    /// queues the journal events (with the idempotency record of `key`, when given: one
    /// event, so the journal writes both in one batch). Returns the number of slots and the
    /// slots left uncounted (a token budget and no usage).
    #[inline]
    fn add_slots(
        &self,
        slots: impl Iterator<Item = u32>,
        (cost, usage): (Money, Option<&Usage>),
        secs: i64,
        key: Option<(&str, u64)>,
    ) -> Result<Counted, RecordError> {
        let inner = &*self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(RecordError::Closed);
        }
        // USD budgets share one amount: one journal event for them all (`Add` for a single
        // window, `AddMany` for several, up to four inline: no allocation). Budgets of other
        // units each have their own amount: an `Add` each, sent as it is counted (a keyed
        // spend collects them in `others`, for its one event).
        let mut counted = Counted::default();
        let mut items = Items::default();
        let mut others: Vec<(u32, Window, u64)> = Vec::new();
        // Why the flag: a limiter without budgets of other units (most) skips the unit of
        // each budget, one more slot lookup per budget on the request path.
        let units = inner.view.has_units();
        for budget in slots {
            counted.budgets += 1;
            let unit = if units {
                inner.view.unit(budget)
            } else {
                Unit::Usd
            };
            let Some(amount) = unit.amount(cost, usage) else {
                counted.uncounted.push(budget);
                continue;
            };
            if amount == 0 {
                continue;
            }
            let (window, crossed) =
                inner
                    .view
                    .add_own_checked(budget, secs, Money::from_nanos(amount));
            if let Some(c) = crossed {
                self.fire(budget, c);
            }
            match (unit, key) {
                (Unit::Usd, _) => items.push((budget, window)),
                // Sent at once: no buffer to allocate on the request path.
                (_, None) => self.journal_add(budget, window, amount)?,
                // A keyed spend: in its one event, with its idempotency record.
                (_, Some(_)) => others.push((budget, window, amount)),
            }
        }
        if !counted.uncounted.is_empty() {
            note_uncounted(inner, &counted.uncounted);
        }
        self.journal_adds(items, cost.as_nanos(), others, key)?;
        Ok(counted)
    }

    /// Queues the USD event of one charge, or its one keyed event (see
    /// [`Limiter::add_slots`]).
    #[inline]
    fn journal_adds(
        &self,
        items: Items,
        amount: u64,
        others: Vec<(u32, Window, u64)>,
        key: Option<(&str, u64)>,
    ) -> Result<(), RecordError> {
        let journal = &self.inner.journal;
        if let Some((key, fingerprint)) = key {
            // Keyed: the only allocation, and only for a keyed spend. Nothing counted (a zero
            // cost and no other unit): no event and no record, as a zero cost always had.
            if items.is_empty() && others.is_empty() {
                return Ok(());
            }
            let event = Event::AddKeyed(Box::new(KeyedAdd {
                items,
                amount,
                others,
                key: key.into(),
                fingerprint,
                ack: None,
            }));
            return journal.send(event).map_err(|_| self.gone());
        }
        if !items.is_empty() {
            let event = match items.single() {
                Some((budget, window)) => Event::Add {
                    budget,
                    window,
                    amount,
                    ack: None,
                },
                None => Event::AddMany {
                    items,
                    amount,
                    ack: None,
                },
            };
            journal.send(event).map_err(|_| self.gone())?;
        }
        Ok(())
    }

    /// Queues one budget window's own amount (a budget of another unit than USD).
    #[inline]
    fn journal_add(&self, budget: u32, window: Window, amount: u64) -> Result<(), RecordError> {
        let event = Event::Add {
            budget,
            window,
            amount,
            ack: None,
        };
        self.inner.journal.send(event).map_err(|_| self.gone())
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
            if let Some(event) = self.inner.fleet.claim(&key, event) {
                crate::model::budget::deliver_soft_limit(&self.inner.soft_handler, &key, &event);
            }
        }
    }
}
