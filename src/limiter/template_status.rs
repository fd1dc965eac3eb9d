//! [`Limiter::templates`]: one row per template with the aggregates of its series (how many
//! names have one, how many are spent, their spend together). What `/metrics` exports for
//! templates: a gauge per series would make a scrape as large as the key population.

use crate::limiter::Limiter;
use crate::model::budget::Scope;
use crate::model::clock::floor_secs;
use crate::model::money::Money;

/// The aggregates of one template (an identity budget named `"*"`) in its current windows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TemplateStatus {
    /// Its identity scope.
    pub scope: Scope,
    /// Its period part (`1mo`, `1d@Europe/Berlin`), as [`BudgetStatus::period_key`](crate::BudgetStatus::period_key).
    pub period_key: String,
    /// The limit of each series.
    pub limit: Money,
    /// Its bound on live series.
    pub max_series: u32,
    /// Names with series in the scope's table (every template of a scope shares it).
    pub live_series: u64,
    /// Series of this template spent in their current window (`spend >= limit`).
    pub exhausted_series: u64,
    /// Spend of all its series in their current windows, net of credits.
    pub spend: Money,
}

impl Limiter {
    /// Every template, in config order, with the aggregates of its series.
    pub fn templates(&self) -> Vec<TemplateStatus> {
        let resolver = self.inner.resolver.load();
        let secs = floor_secs(self.now());
        let (view, keys) = (&self.inner.view, &self.inner.keys);
        let mut out = Vec::new();
        for scope in Scope::IDENTITY {
            let Some(t) = resolver.template(scope) else {
                continue;
            };
            for rule in &t.rules {
                let period_key = rule.budget.budget_key().period_part;
                let mut row = TemplateStatus {
                    scope,
                    period_key,
                    limit: rule.budget.limit,
                    max_series: rule.budget.series_bound(),
                    live_series: t.live() as u64,
                    exhausted_series: 0,
                    spend: Money::ZERO,
                };
                t.each(|_, slots| {
                    for &s in slots {
                        if keys.get(s).period_part != row.period_key {
                            continue;
                        }
                        let spend = view.totals_at(s, secs).total();
                        row.spend = row.spend.saturating_add(spend);
                        let counted = view.sliding_spend(s, secs).unwrap_or(spend);
                        row.exhausted_series += u64::from(counted >= view.limit(s));
                    }
                });
                out.push(row);
            }
        }
        out
    }
}
