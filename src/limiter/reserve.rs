//! Reservations (one node): admission before a call, settlement after it.
//!
//! [`Limiter::reserve`] holds an estimate in every budget that applies (exactly the budgets
//! [`Limiter::charge`] would charge), atomically per budget (the view's CAS on
//! `spend + reserved + estimate <= limit`: two threads never share the last nano), and hands
//! back a [`Reservation`] (once its record is durable: [`ReserveRequest::wait`] blocks,
//! `.await` does not). It ends in one of these ways:
//!
//! | end                         | counts            | journal                            |
//! |-----------------------------|-------------------|------------------------------------|
//! | [`Reservation::commit`]     | the actual cost   | spend + end of record, one batch; fsynced when its [`Receipt`] is waited |
//! | [`Reservation::release`]    | nothing           | end of record; fsynced when its [`Receipt`] is waited |
//! | drop without either         | the estimate      | spend + end of record, one batch (not awaited) |
//! | expiry (`reservation_timeout`) | the estimate   | as a drop; a later commit is [`ReserveError::Expired`] |
//! | crash (process killed)      | the estimate      | counted at the next open (module `restore`) |
//!
//! Decisions (each with its why):
//!
//! * **Money is held in the window of admission** and a commit counts the actual cost there,
//!   even after that window ended: each window's bound (`spend <= limit + overshoot of
//!   commits above their estimate`) then holds at a boundary too. The next window does not
//!   see money held by calls admitted in the previous one.
//! * **The record is durable before `reserve` returns** (one group-committed fsync, shared by
//!   concurrent callers): a crash after the call went out cannot forget it. It lives in the
//!   `own` tree under a `0xff` key (see `store`), so that a commit's spend and the removal of
//!   its record go in one sled batch: a crash can neither count a commit twice (spend and
//!   record) nor lose it.
//! * **Drop counts the estimate**: a reservation that was neither committed nor released may
//!   have reached the provider (a panic, a cancelled future). Counting it errs on the side of
//!   the limit, like the crash case.
//! * **Allocation**: `reserve` allocates (its id, the list of budgets, the journal record) and
//!   takes a mutex (the registry): it waits for an fsync anyway. `filter`, `record` and
//!   `charge` stay allocation- and lock-free.
//! * **Expiry** is checked by every `reserve` (one atomic load when nothing is due), by
//!   `maintain`, and by a reaper thread (started with the first reservation, every second,
//!   holding only a weak handle: it never keeps a limiter alive). A reservation lives at
//!   least `reservation_timeout` and at most one second more (whole seconds).
//! * **Shadow budgets** hold the estimate too but never refuse (they count a would-be denial).
//! * **A spent budget admits nothing**, not even a zero estimate (`spend + reserved >= limit`,
//!   what `filter` denies): a caller that cannot price a call still cannot pass a spent budget.
//! * A denial is [`NoDeployments`], as `filter` reports it, with one [`Exceeded`] per refusing
//!   budget: its `spend` is what admission would have reached (`spend + reserved + estimate`;
//!   for a strict budget refused by its grant: `own + reserved + estimate`, with the grant in
//!   [`Exceeded::grant`] and the configured limit as `limit`), so the message `Exceeded budget
//!   for provider openai: 10.5 >= 10` (or `Exceeded this node's grant for provider openai:
//!   1 > 0 (limit 100, …)`) is true.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use jiff::Timestamp;

use crate::durable::idempotency::Ended;
use crate::durable::journal::{Ack, Event};
use crate::durable::store::ReservationValue;
use crate::error::RecordError;
use crate::limiter::filter::{Exceeded, NoDeployments};
use crate::limiter::spend::{AckWait, Counted, Receipt};
use crate::limiter::{charge_slots_for, Inner, Limiter};
use crate::model::clock::floor_secs;
use crate::model::identity::Identity;
use crate::model::money::Money;
use crate::model::unit::{Estimate, Unit, Usage};
use crate::model::window::Window;
use crate::pricing::EstimateInput;
use crate::resolve::{Deployment, MissLog};
use crate::view::Refused;

pub(crate) use super::held::Registry;
use super::held::{End, Held, DONE, EXPIRED, OPEN};

/// An admission: the candidate's index, each budget and window holding the estimate, and
/// the instant (Unix seconds).
type Admitted = (usize, Vec<(u32, Window, u64)>, i64, Estimate);

/// What a reservation holds: one estimate for every candidate, or one per candidate made
/// from the request ([`ReserveRequest::estimate_from`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Estimating<'a> {
    Fixed(Estimate),
    Request(&'a EstimateInput),
}

/// What a reservation's request adds to its deployment's budgets: its tags and identities.
type Request<'a, T> = (&'a [T], &'a Identity<'a>);

/// How often the reaper thread looks for expired reservations.
const REAP_TICK: Duration = Duration::from_secs(1);

/// Why a reservation could not be made or ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReserveError {
    /// No candidate has room: every budget that refused, as `filter` reports it (with
    /// `resets_at`), and the candidates denied as unknown. Nothing is held.
    #[error(transparent)]
    Denied(NoDeployments),
    /// `reserve` was given no deployment.
    #[error("no deployment to reserve for (the candidate list is empty)")]
    NoCandidates,
    /// The reservation expired (`reservation_timeout`) before its commit or release: its
    /// estimate was counted instead, and the actual cost was not.
    #[error("reservation {id} expired at {expired_at} (provider_budgets.reservation_timeout); its estimate {estimate} was counted instead")]
    Expired {
        /// The reservation's id.
        id: String,
        /// When it expired.
        expired_at: Timestamp,
        /// What was counted.
        estimate: Money,
    },
    /// The limiter is shut down or its journal failed. From `reserve`: nothing is held. From
    /// `commit`/`release`: the view is settled in memory; with [`RecordError::Storage`] the
    /// journal retries (the spend becomes durable once the disk works), with
    /// [`RecordError::Closed`] the journaled reservation counts its estimate at the next open.
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Money held for one call by [`Limiter::reserve`]: end it with [`Reservation::commit`] (the
/// call reached the provider) or [`Reservation::release`] (it did not). Dropped without
/// either, or past `reservation_timeout`, it counts its estimate. It keeps the limiter open.
#[must_use = "a reservation dropped without commit or release counts its estimate"]
pub struct Reservation {
    held: Arc<Held>,
    limiter: Limiter,
    deployment: usize,
    /// Journal an idempotency record of the end ([`Reservation::remember_end`]).
    remember: bool,
}

impl Reservation {
    /// Unique, opaque and URL-safe (`[0-9a-f-]`): how the sidecar names it.
    pub fn id(&self) -> &str {
        &self.held.id
    }

    /// Which candidate admitted it (the index in the list given to `reserve`).
    pub fn deployment_index(&self) -> usize {
        self.deployment
    }

    /// The dollars held in each USD budget.
    pub fn estimate(&self) -> Money {
        self.held.estimate.usd
    }

    /// The estimate, every unit's part.
    pub fn estimates(&self) -> Estimate {
        self.held.estimate
    }

    /// When it expires (counts its estimate) unless committed or released before.
    pub fn expires_at(&self) -> jiff::Timestamp {
        self.held.expires_at()
    }

    /// Makes the commit or release write an idempotency record of how it ended (the id; the
    /// cost, or released) in the journal's sled batch of the end itself, so that
    /// [`Limiter::idempotency_records`] returns it after a restart: a service that answers
    /// repeated commits (the sidecar) answers a repeat after a restart the same way. A drop
    /// or an expiry writes none, nor does a reservation in which no budget applies. Not a
    /// stable API.
    #[doc(hidden)]
    pub fn remember_end(mut self) -> Reservation {
        self.remember = true;
        self
    }

    /// The call reached the provider and cost `actual`: counts it in every budget the
    /// reservation holds money in (in the window of admission; in full when above the
    /// estimate) and frees the estimate (one journal batch). Soft limits fire as for a
    /// charge. The [`Receipt`] says in how many budgets; wait on it (`.wait()` or `.await`)
    /// for the fsync, as for [`Limiter::charge`].
    ///
    /// # Errors
    ///
    /// [`ReserveError::Expired`] when it expired before (its estimate was counted, not
    /// `actual`); [`ReserveError::Record`] when the limiter is shut down or its journal is
    /// gone (see there).
    pub fn commit(self, actual: Money) -> Result<Receipt<'static>, ReserveError> {
        self.end(End::Commit(actual, None))
    }

    /// [`Reservation::commit`] with the call's usage: token budgets count their tokens of it,
    /// USD budgets `actual`. Without usage ([`Reservation::commit`]) a token budget counts
    /// nothing and is listed in [`Receipt::uncounted`].
    ///
    /// # Errors
    ///
    /// As [`Reservation::commit`].
    pub fn commit_usage(
        self,
        actual: Money,
        usage: Usage,
    ) -> Result<Receipt<'static>, ReserveError> {
        self.end(End::Commit(actual, Some(usage)))
    }

    /// The call never reached the provider: frees the estimate and counts nothing. Wait on
    /// the [`Receipt`] for the end of the reservation to be durable.
    ///
    /// # Errors
    ///
    /// As [`Reservation::commit`].
    pub fn release(self) -> Result<Receipt<'static>, ReserveError> {
        self.end(End::Release)
    }

    fn end(&self, end: End) -> Result<Receipt<'static>, ReserveError> {
        self.begin_end(&end)?;
        let (ended, cost) = match end {
            End::Commit(cost, _) => (Ended::Committed, cost),
            _ => (Ended::Released, Money::ZERO),
        };
        let remember = self.remember.then_some(ended);
        let counted = self.limiter.settle(&self.held, end, true, remember)?;
        Ok(Receipt::owned(self.limiter.clone(), counted.budgets)
            .with_cost(cost, None)
            .with_uncounted(counted.uncounted))
    }

    /// Takes the right to end the reservation (it may have expired first).
    fn begin_end(&self, end: &End) -> Result<(), ReserveError> {
        let now = floor_secs(self.limiter.now());
        if now >= self.held.expires_secs {
            self.limiter.expire(&self.held);
        }
        if self
            .held
            .state
            .compare_exchange(OPEN, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return Err(ReserveError::Expired {
                id: self.held.id.to_string(),
                expired_at: self.held.expires_at(),
                estimate: self.held.estimate.usd,
            });
        }
        let outcome = if matches!(end, End::Commit(..)) {
            "committed"
        } else {
            "released"
        };
        metrics::counter!("provider_budgets_reservations_ended_total", "outcome" => outcome)
            .increment(1);
        Ok(())
    }
}

impl std::fmt::Debug for Reservation {
    /// The reservation, not the limiter it holds.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("id", &self.held.id)
            .field("deployment_index", &self.deployment)
            .field("estimate", &self.held.estimate)
            .field("budgets", &self.held.items.len())
            .field("expires_at", &self.held.expires_at())
            .finish()
    }
}

impl Drop for Reservation {
    /// Neither committed nor released (a panic, a cancelled task): counts the estimate, since
    /// the call may have reached the provider. Not awaited: the journal makes it durable
    /// within `storage.max_delay`.
    fn drop(&mut self) {
        if self
            .held
            .state
            .compare_exchange(OPEN, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            metrics::counter!("provider_budgets_reservations_ended_total", "outcome" => "dropped")
                .increment(1);
            let _ = self.limiter.settle(&self.held, End::Expire, false, None);
        }
    }
}

/// A reservation being made: [`Limiter::reserve`]`(&candidates, estimate)`, optionally
/// [`.tags(&tags)`](ReserveRequest::tags) and [`.identity(&id)`](ReserveRequest::identity),
/// then [`.wait()`](ReserveRequest::wait) (blocking)
/// or `.await` (async: the grant wait and the fsync are awaited, never blocking a worker).
#[must_use = "nothing is reserved until .wait() or .await"]
pub struct ReserveRequest<'a, D, T = &'a str> {
    limiter: &'a Limiter,
    candidates: &'a [D],
    tags: &'a [T],
    identity: &'a Identity<'a>,
    estimate: Estimate,
    /// Set by [`ReserveRequest::estimate_from`]: each candidate's estimate is made from it.
    from_request: Option<&'a EstimateInput>,
}

impl<D: Deployment, T: AsRef<str>> std::fmt::Debug for ReserveRequest<'_, D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let models: Vec<&str> = self.candidates.iter().map(Deployment::model).collect();
        let tags: Vec<&str> = self.tags.iter().map(AsRef::as_ref).collect();
        f.debug_struct("ReserveRequest")
            .field("candidates", &models)
            .field("tags", &tags)
            .field("identity", self.identity)
            .field("estimate", &self.estimate)
            .finish()
    }
}

impl<'a, D: Deployment, T: AsRef<str>> ReserveRequest<'a, D, T> {
    /// The request's tags: their tag budgets hold the estimate too.
    pub fn tags<U: AsRef<str>>(self, tags: &'a [U]) -> ReserveRequest<'a, D, U> {
        ReserveRequest {
            limiter: self.limiter,
            candidates: self.candidates,
            tags,
            identity: self.identity,
            estimate: self.estimate,
            from_request: self.from_request,
        }
    }

    /// The request's identities: the budgets of each name hold the estimate too (a commit
    /// counts there).
    pub fn identity(self, identity: &'a Identity<'a>) -> Self {
        ReserveRequest { identity, ..self }
    }

    /// The estimate of every unit (replaces the dollars given to [`Limiter::reserve`]):
    /// token budgets hold their part of it, USD budgets `estimate.usd`.
    pub fn estimate(self, estimate: Estimate) -> Self {
        ReserveRequest { estimate, ..self }
    }

    /// Estimates each candidate's call from the request (its prompt and `max_tokens`) by the
    /// catalog ([`Limiter::estimate`]) instead of a given estimate: each candidate holds the
    /// price of its own model. [`Reservation::estimates`] says what the admitted one holds.
    /// Under `pricing.unpriced: deny`, a candidate whose model has no price fails the
    /// reservation with [`RecordError::Unpriced`].
    pub fn estimate_from(self, request: &'a EstimateInput) -> Self {
        ReserveRequest {
            from_request: Some(request),
            ..self
        }
    }

    /// How the admission estimates.
    fn estimating(&self) -> Estimating<'a> {
        match self.from_request {
            Some(input) => Estimating::Request(input),
            None => Estimating::Fixed(self.estimate),
        }
    }

    /// Makes the reservation, blocking until its record is durable (and, for a strict
    /// budget refused by this node's grant alone, up to `redis.grant_wait` for a grant
    /// round). From async code, `.await` the request instead.
    ///
    /// # Errors
    ///
    /// [`ReserveError::NoCandidates`] for an empty list, [`ReserveError::Denied`] when no
    /// candidate has room (every refusing budget listed once; nothing is held),
    /// [`ReserveError::Record`] when the limiter is shut down or the journal failed.
    pub fn wait(self) -> Result<Reservation, ReserveError> {
        let l = self.limiter;
        let (index, items, now, estimate) = l.hold(
            self.candidates.iter(),
            (self.tags, self.identity),
            &self.estimating(),
        )?;
        let (reservation, record) = l.register(index, items, now, estimate);
        let result = match record {
            None => Ok(()),
            Some(record) => {
                l.acked(AckWait::request(&l.inner.journal, false, record).and_then(AckWait::recv))
            }
        };
        l.opened(reservation, result)
    }
}

impl<'a, D: Deployment + Sync, T: AsRef<str> + Sync> IntoFuture for ReserveRequest<'a, D, T> {
    type Output = Result<Reservation, ReserveError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Reservation, ReserveError>> + Send + 'a>>;

    /// [`ReserveRequest::wait`] for async code (admission happens at the first poll).
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let l = self.limiter;
            let estimating = self.estimating();
            let (index, items, now, estimate) = l
                .hold_async(
                    self.candidates.iter(),
                    (self.tags, self.identity),
                    &estimating,
                )
                .await?;
            let (reservation, record) = l.register(index, items, now, estimate);
            let result = match record {
                None => Ok(()),
                Some(record) => match AckWait::request(&l.inner.journal, true, record) {
                    Some(wait) => l.acked(wait.recv_async().await),
                    None => l.acked(None),
                },
            };
            l.opened(reservation, result)
        })
    }
}

impl Limiter {
    /// Reserves `estimate` for the first candidate, in order, whose budgets all have room
    /// for it ([`Reservation::deployment_index`] says which): holds it in every budget that
    /// applies to that deployment (those [`Limiter::charge`] counts against)
    /// (`spend + reserved + estimate <= limit`), atomically: concurrent reservations never
    /// share the last dollar. The reservation is made by [`ReserveRequest::wait`] or
    /// `.await`, which return once it is durable (a crash counts its estimate). See the
    /// module doc of `reserve` (README "Reservations") for the semantics.
    ///
    /// ```
    /// use provider_budgets::{Config, Limiter, Money, ReserveError, StatusQuery};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let dir = tempfile::tempdir()?;
    /// let yaml = "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n";
    /// let limiter = Limiter::open(Config::from_yaml_str(yaml)?.data_dir(dir.path()))?;
    /// let deployments = ["gpt-4o", "claude-3-5-sonnet"];
    ///
    /// let r = limiter.reserve(&deployments, "0.75".parse()?).wait()?;
    /// assert_eq!(r.deployment_index(), 0); // openai has room for 0.75
    /// // 0.75 held: a second call does not fit in openai's dollar, anthropic has no budget.
    /// let other = limiter.reserve(&deployments, "0.5".parse()?).wait()?;
    /// assert_eq!(other.deployment_index(), 1);
    /// other.release()?;
    /// r.commit("0.6".parse()?)?.wait()?; // the call cost 0.6: counted, the rest of 0.75 freed
    /// assert_eq!(limiter.status(StatusQuery::all())[0].spend, "0.6".parse::<Money>()?);
    /// assert!(matches!(
    ///     limiter.reserve(&["gpt-4o"], "0.5".parse()?).wait(),
    ///     Err(ReserveError::Denied(_))
    /// ));
    /// # Ok(()) }
    /// ```
    pub fn reserve<'a, D: Deployment>(
        &'a self,
        candidates: &'a [D],
        estimate: Money,
    ) -> ReserveRequest<'a, D> {
        ReserveRequest {
            limiter: self,
            candidates,
            tags: &[],
            identity: &Identity::NONE,
            estimate: Estimate::from(estimate),
            from_request: None,
        }
    }

    /// Admission in the view: the first candidate whose budgets all take the estimate.
    ///
    /// Strict budgets: when a candidate was refused by this node's grant alone
    /// (`Refused::Grant`: the fleet may have more to give), the replicator is woken for one
    /// out-of-cycle grant round, the call waits for it up to `redis.grant_wait` and tries
    /// once more. Only that case waits: a budget spent fleet-wide is refused at once.
    fn hold<'d, D: Deployment + ?Sized + 'd, T: AsRef<str>>(
        &self,
        candidates: impl Iterator<Item = &'d D> + Clone,
        request: Request<'_, T>,
        estimate: &Estimating<'_>,
    ) -> Result<Admitted, ReserveError> {
        let mut starved = Vec::new();
        let held = self.hold_once(candidates.clone(), request, estimate, &mut starved);
        let held = match starved_by_grant(&held, &starved) {
            Some(b) if self.wait_for_grant(b) => {
                self.hold_once(candidates, request, estimate, &mut Vec::new())
            }
            _ => held,
        };
        count_denied(held)
    }

    /// [`Limiter::hold`] for async code: the grant wait is awaited, never blocking.
    async fn hold_async<'d, D: Deployment + ?Sized + 'd, T: AsRef<str>>(
        &self,
        candidates: impl Iterator<Item = &'d D> + Clone,
        request: Request<'_, T>,
        estimate: &Estimating<'_>,
    ) -> Result<Admitted, ReserveError> {
        let mut starved = Vec::new();
        let held = self.hold_once(candidates.clone(), request, estimate, &mut starved);
        let held = match starved_by_grant(&held, &starved) {
            Some(b) if self.wait_for_grant_async(b).await => {
                self.hold_once(candidates, request, estimate, &mut Vec::new())
            }
            _ => held,
        };
        count_denied(held)
    }

    /// One admission attempt; `starved` gets the first budget refused by its grant alone and
    /// the other budgets of that candidate whose grants are short too.
    fn hold_once<'d, D: Deployment + ?Sized + 'd, T: AsRef<str>>(
        &self,
        candidates: impl Iterator<Item = &'d D>,
        (tags, identity): Request<'_, T>,
        estimating: &Estimating<'_>,
        starved: &mut Vec<(u32, u64)>,
    ) -> Result<Admitted, ReserveError> {
        let inner: &Inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(RecordError::Closed.into());
        }
        let secs = floor_secs(inner.clock.now());
        self.reap_at(secs);
        let resolver = inner.resolver.load();
        let cache = resolver.cache();
        let mut misses = MissLog::new(&resolver);
        let mut denied = NoDeployments {
            exceeded: Vec::new(),
            unknown: Vec::new(),
            template_refused: None,
        };
        if resolver.has_templates() {
            if let Err(why) = self.materialize(&resolver, identity) {
                denied.template_refused = Some(why);
                return Err(ReserveError::Denied(denied));
            }
        }
        let mut seen: Vec<u32> = Vec::new();
        let mut any = false;
        for (i, d) in candidates.enumerate() {
            any = true;
            let estimate = &self.candidate_estimate(estimating, d.model())?;
            let r = resolver.resolve_noting(&cache, d, &mut misses.misses);
            if r.unknown {
                metrics::counter!("provider_budgets_unknown_provider_total").increment(1);
                if resolver.deny_unknown {
                    denied.unknown.push(d.model().to_owned());
                    continue;
                }
            }
            let mut taken: Vec<(u32, Window, u64)> = Vec::new();
            let mut refused = None;
            for b in charge_slots_for(&resolver, &r, tags, identity) {
                let amount = inner.view.capped(b, estimate.held(inner.view.unit(b)));
                if inner.view.blocks_quietly(b, secs) {
                    // Spent (as `filter` sees it): even a zero estimate is refused.
                    let window = inner.view.schedule(b).window_at_secs(secs);
                    refused = Some((b, Refused::Limit(window), amount));
                    break;
                }
                match inner.view.try_reserve(b, secs, Money::from_nanos(amount)) {
                    Ok(w) => taken.push((b, w, amount)),
                    Err(why) => {
                        refused = Some((b, why, amount));
                        break;
                    }
                }
            }
            let Some((b, why, amount)) = refused else {
                return Ok((i, taken, secs, *estimate));
            };
            for &(b, w, held) in &taken {
                inner.view.unreserve(b, w, Money::from_nanos(held));
            }
            if matches!(why, Refused::Grant(_)) && starved.is_empty() {
                // Every budget of this candidate that its grant holds back, not only the one
                // that refused first: one grant round then raises them all (key, team and org
                // of one request are otherwise raised one round, and one refusal, each).
                starved.push((b, amount));
                starved.extend(
                    charge_slots_for(&resolver, &r, tags, identity).filter_map(|o| {
                        let held = inner.view.capped(o, estimate.held(inner.view.unit(o)));
                        let short =
                            o != b && inner.view.grant_short(o, secs, Money::from_nanos(held));
                        short.then_some((o, held))
                    }),
                );
            }
            if !seen.contains(&b) {
                seen.push(b);
                let amount = Money::from_nanos(amount);
                denied.exceeded.push(self.refusal(b, why, secs, amount));
            }
        }
        if !any {
            return Err(ReserveError::NoCandidates);
        }
        Err(ReserveError::Denied(denied))
    }

    /// A candidate's estimate: the one given, or made from the request on its model.
    fn candidate_estimate(
        &self,
        estimating: &Estimating<'_>,
        model: &str,
    ) -> Result<Estimate, ReserveError> {
        match estimating {
            Estimating::Fixed(e) => Ok(*e),
            Estimating::Request(input) => self
                .estimate(model, input)
                .map(|e| e.estimate)
                .map_err(|u| ReserveError::Record(RecordError::Unpriced(u))),
        }
    }

    /// The [`Exceeded`] entry of a refusing budget (see the module doc for `spend`).
    #[cold]
    fn refusal(&self, budget: u32, why: Refused, secs: i64, estimate: Money) -> Exceeded {
        let inner = &self.inner;
        let budget_key = inner.keys.get(budget);
        let key = budget_key.key_name();
        let t = inner.view.totals_at(budget, secs);
        let (window, spend, grant) = match why {
            Refused::Limit(w) => (
                w,
                // A sliding budget: with the weighted part of the previous window.
                inner
                    .view
                    .sliding_spend(budget, secs)
                    .unwrap_or(t.total())
                    .saturating_add(t.reserved)
                    .saturating_add(estimate),
                None,
            ),
            Refused::Grant(w) => (
                w,
                t.own.saturating_add(t.reserved).saturating_add(estimate),
                Some(t.grant),
            ),
        };
        Exceeded {
            provider: key,
            scope: budget_key.scope,
            period: budget_key.period_shown().to_owned(),
            unit: budget_key.unit(),
            name: budget_key.name,
            spend,
            limit: inner.view.limit(budget),
            grant,
            resets_at: window.end(),
            window_start: window.start(),
        }
    }

    /// Makes the [`Reservation`] of an admission and registers it (for expiry); returns the
    /// journal event that opens it, given its acknowledgement (`None`: no budget applies,
    /// nothing to journal).
    fn register(
        &self,
        index: usize,
        taken: Vec<(u32, Window, u64)>,
        now_secs: i64,
        estimate: Estimate,
    ) -> (Reservation, Option<impl FnOnce(Ack) -> Event>) {
        let inner = &*self.inner;
        let timeout = inner.config.load().reservation_timeout;
        let lifetime = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let expires_secs = now_secs
            .saturating_add(1)
            .saturating_add(i64::try_from(lifetime).unwrap_or(i64::MAX));
        let n = inner.reservations.counter.fetch_add(1, Ordering::Relaxed);
        let id: Arc<str> = format!("{}-{n:x}", inner.reservations.prefix).into();
        let items: Arc<[(u32, Window)]> = taken.iter().map(|&(b, w, _)| (b, w)).collect();
        let amounts: Box<[u64]> = taken.iter().map(|&(_, _, a)| a).collect();
        // What a restart counts in each window (a crash may have let the call out): the
        // amount held, except concurrent slots, which a dead process no longer holds.
        let counts = taken
            .iter()
            .map(|&(b, _, a)| match inner.view.unit(b) {
                Unit::Concurrent => 0,
                _ => a,
            })
            .collect();
        let held = Arc::new(Held {
            id: Arc::clone(&id),
            items,
            amounts,
            estimate,
            expires_secs,
            state: AtomicU8::new(OPEN),
        });
        let reservation = Reservation {
            held: Arc::clone(&held),
            limiter: self.clone(),
            deployment: index,
            remember: false,
        };
        self.start_reaper();
        inner.reservations.insert(Arc::clone(&held));
        if held.items.is_empty() {
            // No budget applies: nothing held, nothing to count after a crash.
            return (reservation, None);
        }
        let value = ReservationValue {
            estimate: estimate.usd.as_nanos(),
            counts,
            expires: expires_secs,
            windows: held
                .items
                .iter()
                .map(|&(b, w)| {
                    let (provider, period) = inner.keys.get(b).store_parts();
                    (provider, period, w.start_secs(), w.end_secs())
                })
                .collect(),
        };
        let record = move |ack| Event::Reserve {
            id,
            value: Box::new(value),
            ack,
        };
        (reservation, Some(record))
    }

    /// The reservation once its journaling answered: on failure the money is given back
    /// (and the record dropped, should the journal write it later): the caller must not make
    /// the call.
    fn opened(
        &self,
        reservation: Reservation,
        result: Result<(), RecordError>,
    ) -> Result<Reservation, ReserveError> {
        if let Err(e) = result {
            let held = &reservation.held;
            if held
                .state
                .compare_exchange(OPEN, DONE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let _ = self.settle(held, End::Release, false, None);
            }
            return Err(e.into());
        }
        metrics::counter!("provider_budgets_reservations_total").increment(1);
        Ok(reservation)
    }

    /// Ends a reservation whose state this caller moved from `OPEN`: counts what `end` counts
    /// in each budget (see [`End::counts`]) and frees what it held, forgets it, and journals
    /// the end (and the spend) in one event (with `remember`, the idempotency record of the
    /// end too). Returns the number of budgets and those left uncounted. Unless `report`, a
    /// journal that is gone is not an error: the record stays on disk and the next open
    /// counts its estimate.
    fn settle(
        &self,
        held: &Held,
        end: End,
        report: bool,
        remember: Option<Ended>,
    ) -> Result<Counted, RecordError> {
        let inner = &*self.inner;
        let now = floor_secs(inner.clock.now());
        let mut counted = Counted::default();
        let mut spent = Vec::with_capacity(held.items.len());
        for (&(b, w), &amount) in held.items.iter().zip(held.amounts.iter()) {
            let hold = Money::from_nanos(amount);
            let actual = end.counts(inner.view.unit(b), amount);
            match (&end, actual) {
                (End::Release, _) => inner.view.unreserve(b, w, hold),
                (_, None) => {
                    counted.uncounted.push(b);
                    inner.view.unreserve(b, w, hold);
                }
                (_, Some(actual)) => {
                    if let Some(c) = inner
                        .view
                        .settle(b, w, hold, Money::from_nanos(actual), now)
                    {
                        self.fire(b, c);
                    }
                }
            }
            spent.push(actual.unwrap_or(0));
        }
        inner.reservations.remove(&held.id);
        counted.budgets = held.items.len();
        if counted.budgets == 0 {
            return Ok(counted);
        }
        let sent = inner.journal.send(Event::Finish {
            id: Arc::clone(&held.id),
            items: Arc::clone(&held.items),
            spent: spent.into(),
            amount: end.cost().as_nanos(),
            ack: None,
            remember,
        });
        match sent {
            Err(_) if report => Err(self.gone()),
            _ => Ok(counted),
        }
    }

    /// Expires one reservation if it is still open: counts its estimate.
    fn expire(&self, held: &Held) {
        if held
            .state
            .compare_exchange(OPEN, EXPIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            metrics::counter!("provider_budgets_reservations_ended_total", "outcome" => "expired")
                .increment(1);
            tracing::debug!(id = %held.id, estimate = %held.estimate.usd, "reservation expired; its estimate is counted");
            let _ = self.settle(held, End::Expire, false, None);
        }
    }

    /// Expires every reservation past its timeout now.
    pub(crate) fn reap(&self) {
        self.reap_at(floor_secs(self.inner.clock.now()));
    }

    fn reap_at(&self, now_secs: i64) {
        for held in self.inner.reservations.due(now_secs) {
            self.expire(&held);
        }
    }

    /// Starts the reaper thread once (with the first reservation). It holds a weak handle:
    /// it never keeps the limiter alive, and it ends when the limiter is dropped.
    fn start_reaper(&self) {
        self.inner.reservations.reaper.get_or_init(|| {
            let (tx, rx) = crossbeam_channel::bounded::<()>(0);
            let weak: Weak<Inner> = Arc::downgrade(&self.inner);
            let spawned = std::thread::Builder::new()
                .name("provider-budgets-reaper".into())
                .spawn(move || loop {
                    match rx.recv_timeout(REAP_TICK) {
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                            let Some(inner) = weak.upgrade() else { return };
                            if !inner.closed.load(Ordering::Acquire) {
                                Limiter { inner }.reap();
                            }
                        }
                        _ => return,
                    }
                });
            match spawned {
                Ok(_) => Some(tx),
                Err(e) => {
                    // Expiry still runs on every reserve and `maintain`.
                    tracing::warn!(error = %e, "cannot start the reservation reaper thread");
                    None
                }
            }
        });
    }
}

/// The strict budget whose grant alone refused `held`, when that is why it was denied (then a
/// grant round may help: one retry after it).
fn starved_by_grant<'s>(
    held: &Result<Admitted, ReserveError>,
    starved: &'s [(u32, u64)],
) -> Option<&'s [(u32, u64)]> {
    (!starved.is_empty() && matches!(held, Err(ReserveError::Denied(_)))).then_some(starved)
}

/// Counts a denial in the metrics; returns `held` unchanged.
fn count_denied(held: Result<Admitted, ReserveError>) -> Result<Admitted, ReserveError> {
    if matches!(held, Err(ReserveError::Denied(_))) {
        metrics::counter!("provider_budgets_no_deployments_total").increment(1);
        metrics::counter!("provider_budgets_reservations_denied_total").increment(1);
    }
    held
}
