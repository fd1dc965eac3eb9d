//! [`Limiter::adjust`]: corrections. A credit undoes spend that should not count (a test run
//! against production, a refunded call, a mistyped amount) without rewriting anything: each
//! budget has a **credit series** beside it (module `key`, [`BudgetKey::credit`]), a per-node
//! grow-only total per window that is journaled, stored and replicated exactly like spend.
//! The budget counts `max(0, spend − credits)` (a PN-counter of two grow-only counters), so a
//! credit is exactly once across the fleet for the same reasons spend is.
//!
//! Decisions:
//! * a credit names a configured budget by its key name (as `status` shows it) and, when it
//!   has several periods, the period; it lands in the window of `at` (default now), bounded
//!   like a spend's (retention behind, [`MAX_FUTURE_SKEW`](crate::MAX_FUTURE_SKEW) ahead);
//! * it may not exceed the window's spend net of earlier credits as known here: a credit
//!   larger than what was spent would let later spend in the window pass unseen, which is a
//!   limit change, not a correction (raise the limit for that);
//! * it is audited before it counts ([`crate::durable::audit`]) and logged at warn level,
//!   and [`Limiter::adjust`] returns once it is durable.
//!
//! [`BudgetKey::credit`]: crate::model::key::BudgetKey::credit

use jiff::Timestamp;

use crate::durable::audit::AuditEntry;
use crate::durable::journal::Event;
use crate::error::RecordError;
use crate::limiter::spend::Receipt;
use crate::limiter::Limiter;
use crate::model::clock::floor_secs;
use crate::model::money::Money;
use crate::model::unit::Unit;
use crate::model::window::{Period, Window};

/// Longest `reason` accepted, in bytes.
pub const MAX_REASON_BYTES: usize = 1024;

/// A correction to make: [`Adjustment::credit`], then options.
#[derive(Debug, Clone)]
pub struct Adjustment {
    budget: String,
    amount: Money,
    reason: String,
    period: Option<Period>,
    unit: Option<Unit>,
    at: Option<Timestamp>,
    by: String,
}

impl Adjustment {
    /// Credits `amount` to the budget whose key name is `budget` (`openai`, `tag:team-a`,
    /// `deployment:gpt4o-east`), for `reason` (required: it goes to the audit trail).
    pub fn credit(budget: impl Into<String>, amount: Money, reason: impl Into<String>) -> Self {
        Adjustment {
            budget: budget.into(),
            amount,
            reason: reason.into(),
            period: None,
            unit: None,
            at: None,
            by: String::new(),
        }
    }

    /// The budget's unit, needed when it has budgets of several units of one period. The
    /// amount of a budget that counts tokens, requests or slots is that whole count, given
    /// as a `Money` of that many units (`"500".parse()` credits 500 tokens).
    #[must_use]
    pub fn unit(mut self, unit: Unit) -> Self {
        self.unit = Some(unit);
        self
    }

    /// The budget's period, needed when it has several.
    #[must_use]
    pub fn period(mut self, period: Period) -> Self {
        self.period = Some(period);
        self
    }

    /// The instant whose window is credited (default now).
    #[must_use]
    pub fn at(mut self, at: Timestamp) -> Self {
        self.at = Some(at);
        self
    }

    /// Who asks, for the audit trail (default `unknown`).
    #[must_use]
    pub fn by(mut self, who: impl Into<String>) -> Self {
        self.by = who.into();
        self
    }
}

/// What [`Limiter::adjust`] recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Credited {
    /// The budget's key name.
    pub budget: String,
    /// The period part of its series (`1d`, `1d@Europe/Berlin`).
    pub period_key: String,
    /// The window credited.
    pub window: Window,
    /// The credit.
    pub amount: Money,
    /// Credits of the window after this one, as known here.
    pub credited: Money,
    /// The window's spend net of credits after this one, as known here.
    pub spend: Money,
}

/// Why a correction was refused. Nothing was credited.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdjustError {
    /// No configured budget has this key name (and period).
    #[error("no configured budget {budget:?}{}; `status` lists the budgets", period.as_ref().map(|p| format!(" with period {p}")).unwrap_or_default())]
    UnknownBudget {
        /// The key name as given.
        budget: String,
        /// The period as given.
        period: Option<String>,
    },
    /// The budget has several periods and none was named.
    #[error("budget {budget:?} has several periods ({}); name one", periods.join(", "))]
    AmbiguousPeriod {
        /// The key name.
        budget: String,
        /// Its periods.
        periods: Vec<String>,
    },
    /// The amount is zero, or more than the window's spend net of earlier credits.
    #[error("credit of {amount} USD for {budget:?}: {why}; nothing credited")]
    Amount {
        /// The key name.
        budget: String,
        /// The credit asked for.
        amount: Money,
        /// Why it is refused.
        why: String,
    },
    /// The audit trail holds [`MAX_AUDIT_ENTRIES`](crate::MAX_AUDIT_ENTRIES) entries recorded
    /// within the storage retention: no more credits until older ones age out.
    #[error("the audit trail holds {0} corrections within the storage retention; no more are accepted until older ones age out")]
    AuditFull(usize),
    /// The credit is counted (in memory, audited) but its fsync failed (a full disk): the
    /// journal retries it, so it becomes durable once the disk works. Do **not** retry it: a
    /// retry would credit twice.
    #[error("credited in memory, not yet durable ({0}); the journal retries it: do not retry the credit")]
    NotDurable(crate::StoreError),
    /// The reason is empty, too long, or not one line.
    #[error("reason: {0}")]
    Reason(String),
    /// The credit could not be recorded (its window is past retention or too far ahead, the
    /// disk failed, the limiter is shut down).
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl Limiter {
    /// Credits a budget's window (see [`Adjustment`]), audits it and waits until it is
    /// durable. From async code, call it in `spawn_blocking`: it waits for an fsync.
    ///
    /// # Errors
    ///
    /// [`AdjustError`]: nothing is credited on error.
    pub fn adjust(&self, mut adjustment: Adjustment) -> Result<Credited, AdjustError> {
        check_reason(&adjustment.reason)?;
        let slot = self.adjusted_slot(&adjustment)?;
        adjustment.amount = self.amount_in_unit(slot, &adjustment)?;
        let inner = &*self.inner;
        let _serial = inner
            .adjust_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let series = inner
            .view
            .credit_series(slot)
            .expect("every budget slot has a credit series");
        let key = inner.keys.get(slot);
        let at = adjustment.at.unwrap_or_else(|| self.now());
        self.check_age(&adjustment.budget, at, std::iter::once(slot))?;
        let secs = floor_secs(at);
        let before = inner.view.totals_at(slot, secs);
        let refuse = |why: String| AdjustError::Amount {
            budget: adjustment.budget.clone(),
            amount: adjustment.amount,
            why,
        };
        if adjustment.amount == Money::ZERO {
            return Err(refuse("the amount is zero".into()));
        }
        if adjustment.amount > before.total() {
            return Err(refuse(format!(
                "more than the window's spend net of earlier credits ({} USD)",
                before.total()
            )));
        }
        let by = match adjustment.by.trim() {
            "" => "unknown".to_owned(),
            who => crate::model::text::one_line(who)
                .chars()
                .take(256)
                .collect(),
        };
        let entry = AuditEntry {
            recorded_at_nanos: i64::try_from(self.now().as_nanosecond()).unwrap_or(i64::MAX),
            by,
            node: inner.node_id.clone(),
            budget: key.key_name(),
            period: key.period_part.clone(),
            window_start: before.window.start_secs(),
            amount: adjustment.amount.as_nanos(),
            reason: adjustment.reason.clone(),
        };
        self.record_credit(series, secs, adjustment.amount, &entry)?;
        let after = inner.view.totals_at(slot, secs);
        Ok(Credited {
            budget: entry.budget,
            period_key: entry.period,
            window: after.window,
            amount: adjustment.amount,
            credited: after.credit,
            spend: after.total(),
        })
    }

    /// The audit trail of corrections recorded by this data dir, oldest first (kept for the
    /// storage retention).
    ///
    /// # Errors
    ///
    /// A storage error, or an entry that does not decode (named).
    pub fn audit(&self) -> Result<Vec<AuditEntry>, crate::StoreError> {
        self.inner.store.load_audit()
    }

    /// The configured budget slot an adjustment names.
    fn adjusted_slot(&self, a: &Adjustment) -> Result<u32, AdjustError> {
        let config = self.inner.config.load();
        let mut named: Vec<crate::config::BudgetConfig> = config
            .budgets
            .iter()
            .filter(|b| b.budget_key().key_name() == a.budget)
            .cloned()
            .collect();
        if named.is_empty() {
            named = self.templated_for_adjust(&a.budget);
        }
        let chosen: Vec<_> = named
            .iter()
            .filter(|b| a.period.is_none_or(|p| b.period == p))
            .filter(|b| a.unit.is_none_or(|u| b.unit == u))
            .collect();
        match chosen.as_slice() {
            [b] => self
                .inner
                .keys
                .position(&b.budget_key())
                .ok_or_else(|| unknown(a)),
            [] => Err(unknown(a)),
            _ => Err(AdjustError::AmbiguousPeriod {
                budget: a.budget.clone(),
                periods: chosen.iter().map(|b| b.budget_key().period_part).collect(),
            }),
        }
    }

    /// The amount of `a` in the unit of the budget `slot`: as given for USD; a whole count
    /// for the other units (see [`Adjustment::unit`]).
    fn amount_in_unit(&self, slot: u32, a: &Adjustment) -> Result<Money, AdjustError> {
        const NANOS: u64 = 1_000_000_000;
        if !self.inner.view.unit(slot).is_count() {
            return Ok(a.amount);
        }
        let nanos = a.amount.as_nanos();
        if !nanos.is_multiple_of(NANOS) {
            return Err(AdjustError::Amount {
                budget: a.budget.clone(),
                amount: a.amount,
                why: format!(
                    "a {} budget is credited a whole number",
                    self.inner.view.unit(slot)
                ),
            });
        }
        Ok(Money::from_nanos(nanos / NANOS))
    }

    /// Audits, counts and journals a credit, then waits for its fsync; logs it.
    fn record_credit(
        &self,
        series: u32,
        secs: i64,
        amount: Money,
        entry: &AuditEntry,
    ) -> Result<(), AdjustError> {
        let inner = &*self.inner;
        let retention =
            i64::try_from(inner.config.load().storage.retention.as_nanos()).unwrap_or(i64::MAX);
        let appended = inner
            .store
            .append_audit(
                entry,
                entry.recorded_at_nanos.saturating_sub(retention),
                crate::durable::audit::MAX_ENTRIES,
            )
            .map_err(RecordError::Storage)?;
        if !appended {
            return Err(AdjustError::AuditFull(crate::durable::audit::MAX_ENTRIES));
        }
        if inner.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(RecordError::Closed.into());
        }
        let window = inner.view.add_credit(series, secs, amount);
        let event = Event::Add {
            budget: series,
            window,
            amount: amount.as_nanos(),
            ack: None,
        };
        inner.journal.send(event).map_err(|_| self.gone())?;
        match Receipt::new(self, 1).wait() {
            Ok(_) => {}
            Err(RecordError::Storage(e)) => {
                tracing::warn!(budget = %entry.budget, amount = %amount, by = %entry.by,
                    reason = %entry.reason, error = %e, "credit recorded, not yet durable");
                return Err(AdjustError::NotDurable(e));
            }
            Err(e) => return Err(e.into()),
        }
        tracing::warn!(
            budget = %entry.budget,
            period = %entry.period,
            window_start = entry.window_start,
            amount = %amount,
            by = %entry.by,
            reason = %entry.reason,
            "credit recorded"
        );
        Ok(())
    }
}

fn unknown(a: &Adjustment) -> AdjustError {
    AdjustError::UnknownBudget {
        budget: a.budget.clone(),
        period: a.period.map(|p| p.to_string()),
    }
}

impl Limiter {
    /// The budgets a template gives the key name `budget` (`key:9f86d0…`), its series made
    /// if need be (a credit may name a key that has not spent through this node yet): none
    /// when no template covers it or the template refuses the name.
    fn templated_for_adjust(&self, budget: &str) -> Vec<crate::config::BudgetConfig> {
        let resolver = self.inner.resolver.load();
        for scope in crate::model::budget::Scope::IDENTITY {
            let Some(t) = resolver.template(scope) else {
                continue;
            };
            let Some(name) = budget
                .strip_prefix(scope.as_str())
                .and_then(|n| n.strip_prefix(':'))
            else {
                continue;
            };
            let identity = crate::model::identity::Identity::new().with(scope, Some(name));
            if self.materialize(&resolver, &identity).is_err() {
                return Vec::new();
            }
            return t.rules.iter().map(|r| r.budget.instance(name)).collect();
        }
        Vec::new()
    }
}

/// A reason is required, one line, at most [`MAX_REASON_BYTES`].
fn check_reason(reason: &str) -> Result<(), AdjustError> {
    if reason.trim().is_empty() {
        return Err(AdjustError::Reason(
            "a reason is required (it is audited)".into(),
        ));
    }
    if reason.len() > MAX_REASON_BYTES {
        return Err(AdjustError::Reason(format!(
            "{} bytes, more than {MAX_REASON_BYTES}",
            reason.len()
        )));
    }
    if reason.chars().any(char::is_control) {
        return Err(AdjustError::Reason(
            "it contains a control character (one line only)".into(),
        ));
    }
    Ok(())
}
