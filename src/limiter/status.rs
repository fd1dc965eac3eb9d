//! What [`Limiter::status`] reports per budget, and the query that selects the budgets.

use jiff::Timestamp;

use crate::config::BudgetConfig;
use crate::limiter::{charge_slots_for, Limiter};
use crate::model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit, WindowShape};
use crate::model::clock::floor_secs;
use crate::model::identity::Identity;
use crate::model::money::Money;
use crate::model::unit::Unit;
use crate::model::window::{Period, Window};
use crate::resolve::Deployment;

/// The state of one budget in its current window.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BudgetStatus {
    /// The provider for provider budgets; the key name (`tag:team-a`) for the other scopes.
    pub provider: String,
    /// What the budget applies to.
    pub scope: Scope,
    /// Its provider, deployment id, model, tag or identity name (key, user, team, org, customer).
    pub name: String,
    /// Enforce or shadow.
    pub mode: Mode,
    /// Its soft limits.
    pub soft_limits: Vec<SoftLimit>,
    /// The soft limits the window's spend has reached.
    pub thresholds_crossed: Vec<SoftLimit>,
    /// Filter calls since open that this budget, in shadow mode, would have denied.
    pub would_deny: u64,
    /// The budget's period ([`crate::CONCURRENT_PERIOD`] for a concurrent budget, which has
    /// none).
    pub period: Period,
    /// What it counts. The amounts (`spend`, `limit`, …) are in this unit: nano-dollars for
    /// USD, the whole count (`Money::as_nanos`) for tokens, requests and slots.
    pub unit: Unit,
    /// The period part of its storage and Redis keys: the period, with `@Zone` when the budget
    /// has its own time zone (`1d@Europe/Berlin`). The `period` label of its metrics.
    pub period_key: String,
    /// IANA time zone of its local windows (`d`, `w`, `mo` start at local midnight there);
    /// `UTC` when none is configured.
    pub time_zone: String,
    /// The current window: `window.start()` and `window.end()` (when it resets).
    pub window: Window,
    /// Spend of the whole fleet in the window, as known here, net of credits: own + others
    /// − credited, never below zero.
    pub spend: Money,
    /// Credits of the whole fleet in the window, as known here (corrections,
    /// [`Limiter::adjust`](crate::Limiter::adjust)).
    pub credited: Money,
    /// This node's own spend in the window.
    pub own_spend: Money,
    /// Held by this node's open reservations in the window (not spend: a commit turns it
    /// into spend, a release frees it). `filter` and admission count it, `exhausted` and
    /// `remaining` do not.
    pub reserved: Money,
    /// The budget limit.
    pub limit: Money,
    /// `limit - spend` (`limit - sliding_spend` for a sliding budget), zero when over.
    pub remaining: Money,
    /// `spend >= limit` (`sliding_spend >= limit` for a sliding budget): the provider's
    /// deployments are filtered out.
    pub exhausted: bool,
    /// `fixed` or `sliding` (config key `window`).
    pub window_shape: WindowShape,
    /// A sliding budget: `spend` plus the previous window's spend (net of credits) weighted
    /// by how much of it still lies in the trailing period ending now, rounded up: what the
    /// limit is compared with. `None` for a fixed budget.
    pub sliding_spend: Option<Money>,
    /// Replication state (the same for every budget of a limiter).
    pub replication: ReplicationStatus,
    /// The storage fault (a full disk, a dead journal) while spend is counted in memory but
    /// cannot be made durable; the same for every budget of a limiter. `None` when healthy.
    pub storage_fault: Option<String>,
    /// A replication problem of this budget only, from the last round: a field in one of its
    /// Redis hashes that is not a canonical u64 (skipped), a key of the wrong type (that
    /// window is not synced), a broken lease key. The other budgets are not affected; the
    /// problem clears once the bad data is gone. `None` when there is none.
    pub replication_problem: Option<String>,
    /// A series of a template (an identity budget named `"*"`): `/metrics` reports it only
    /// in the template's aggregates ([`Limiter::templates`](crate::Limiter::templates)).
    pub templated: bool,
    /// `shared` or `strict` (grants in escrow).
    pub enforcement: Enforcement,
    /// What a strict budget does without Redis.
    pub offline: Offline,
    /// Strict budgets: this node's grant in the window, i.e. what it may spend and hold
    /// (the whole limit when no Redis is configured: the node is the fleet). `None` for
    /// shared budgets.
    pub grant: Option<Money>,
    /// Strict budgets: the sum of every node's grant in the window, as of this node's last
    /// round (`None` before the first, and for shared budgets). Never above the limit.
    pub granted_total: Option<Money>,
}

/// Replication state of a limiter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ReplicationStatus {
    /// Whether a Redis URL is configured.
    pub enabled: bool,
    /// When the last successful sync round finished.
    pub last_sync: Option<Timestamp>,
    /// No successful sync within the last few intervals: others' spend may be out of date.
    pub stale: bool,
    /// The last sync error, if the last round failed.
    pub last_error: Option<String>,
    /// Successful sync rounds since open.
    pub rounds: u64,
    /// Redis round trips since open (one per round; two when Redis lost the script).
    pub round_trips: u64,
    /// The last round that reached Redis: how long it took and what it moved.
    pub last_round: RoundFigures,
    /// Timed rounds that ran past their interval (the next one then waited a whole
    /// interval from the end: rounds never pile up).
    pub late_rounds: u64,
    /// Redis tracks this node's clean reads (client-side caching: unchanged budgets cost it
    /// no read); `false` when the server refuses it (every clean budget read every round).
    pub tracking: bool,
    /// Whether Redis may evict this library's keys: its `maxmemory-policy` is anything but
    /// `noeviction` (every key written has a TTL, so `volatile-*` policies evict them too);
    /// `None` until connected, or when the server refuses `CONFIG GET` (managed Redis).
    pub evicting: Option<bool>,
    /// The `maxmemory-policy` reported (the evicting one when servers differ).
    pub maxmemory_policy: Option<String>,
    /// Sync reads that found this node's acknowledged spend missing from Redis (evicted or
    /// deleted keys, a flush, a failover that lost writes) since open; each such window is
    /// sent again.
    pub data_loss: u64,
}

/// Figures of one sync round (see the README's "Fleet replication").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RoundFigures {
    /// Wall time of the round, milliseconds.
    pub duration_ms: u64,
    /// Window keys whose total was sent (dirty windows).
    pub keys_written: u64,
    /// Window keys only read (clean live windows), including those known unchanged.
    pub keys_read: u64,
    /// Of `keys_read`, the keys not read at all: Redis tracks our last read of them and
    /// reported no change since (client-side caching).
    pub keys_unchanged: u64,
    /// Windows left for later rounds: one round's work is bounded (at most 128 windows of a
    /// budget, 512 beyond the budgets' current windows in all), so a backlog (a long outage
    /// of a short budget) drains over several rounds; `Limiter::sync` runs rounds until none
    /// is left.
    pub keys_deferred: u64,
    /// Request bytes sent to Redis.
    pub bytes_out: u64,
    /// Reply bytes received from Redis.
    pub bytes_in: u64,
}

/// Which budgets [`Limiter::status`] reports, and when: [`StatusQuery::all`],
/// [`StatusQuery::provider`] or [`StatusQuery::deployment`] (with [`StatusQuery::tags`] and
/// [`StatusQuery::identity`]),
/// each now or [`StatusQuery::at`] an instant.
///
/// ```
/// # use provider_budgets::{Config, Limiter, StatusQuery};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let yaml = "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n";
/// # let limiter = Limiter::open(Config::from_yaml_str(yaml)?.data_dir(dir.path()))?;
/// let every = limiter.status(StatusQuery::all());
/// let openai = limiter.status(StatusQuery::provider("openai"));
/// let for_call = limiter.status(StatusQuery::deployment("gpt-4o").tags(&["team-a"]));
/// assert_eq!((every.len(), openai.len(), for_call.len()), (1, 1, 1));
/// # Ok(()) }
/// ```
#[must_use = "a StatusQuery reports nothing until it is passed to Limiter::status"]
pub struct StatusQuery<'a, D: ?Sized = dyn Deployment, T = &'a str> {
    select: Select<'a, D>,
    tags: &'a [T],
    identity: &'a Identity<'a>,
    at: Option<Timestamp>,
    page: Page<'a>,
}

/// Filters and paging of a [`StatusQuery`] (status order: scope, name, period part).
#[derive(Debug, Clone, Copy, Default)]
struct Page<'a> {
    scope: Option<Scope>,
    name: Option<&'a str>,
    /// Only budgets after this one (scope, name, period part).
    after: Option<(Scope, &'a str, &'a str)>,
    limit: Option<usize>,
    /// Leave out the series of templates.
    no_templated: bool,
}

enum Select<'a, D: ?Sized> {
    All,
    Provider(&'a str),
    Deployment(&'a D),
}

impl<D: Deployment + ?Sized, T: AsRef<str>> std::fmt::Debug for StatusQuery<'_, D, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tags: Vec<&str> = self.tags.iter().map(AsRef::as_ref).collect();
        let mut s = f.debug_struct("StatusQuery");
        match &self.select {
            Select::All => s.field("all", &true),
            Select::Provider(p) => s.field("provider", p),
            Select::Deployment(d) => s.field("deployment", &d.model()),
        };
        s.field("tags", &tags)
            .field("identity", self.identity)
            .field("at", &self.at)
            .field("page", &self.page)
            .finish()
    }
}

impl<'a> StatusQuery<'a> {
    /// Every budget, in config order (providers first).
    pub fn all() -> StatusQuery<'a> {
        StatusQuery {
            select: Select::All,
            tags: &[],
            identity: &Identity::NONE,
            at: None,
            page: Page::default(),
        }
    }

    /// The provider-scope budgets of `provider` (one per period; none when it has no budget).
    pub fn provider(provider: &'a str) -> StatusQuery<'a> {
        StatusQuery {
            select: Select::Provider(provider),
            tags: &[],
            identity: &Identity::NONE,
            at: None,
            page: Page::default(),
        }
    }
}

impl<'a, D: Deployment + ?Sized> StatusQuery<'a, D> {
    /// The budgets a spend on `deployment` counts against (see [`StatusQuery::tags`] and
    /// [`StatusQuery::identity`]).
    pub fn deployment(deployment: &'a D) -> StatusQuery<'a, D> {
        StatusQuery {
            select: Select::Deployment(deployment),
            tags: &[],
            identity: &Identity::NONE,
            at: None,
            page: Page::default(),
        }
    }
}

impl<'a, D: ?Sized, T> StatusQuery<'a, D, T> {
    /// With [`StatusQuery::deployment`]: the request's tags' budgets too (ignored otherwise).
    pub fn tags<U: AsRef<str>>(self, tags: &'a [U]) -> StatusQuery<'a, D, U> {
        StatusQuery {
            select: self.select,
            tags,
            identity: self.identity,
            at: self.at,
            page: self.page,
        }
    }

    /// With [`StatusQuery::deployment`]: the budgets of the request's identities too
    /// (ignored otherwise).
    pub fn identity(self, identity: &'a Identity<'a>) -> Self {
        StatusQuery { identity, ..self }
    }

    /// The windows containing `at` instead of now (windows past their retention read as
    /// empty).
    pub fn at(self, at: Timestamp) -> Self {
        StatusQuery {
            at: Some(at),
            ..self
        }
    }

    /// Only budgets of `scope`.
    pub fn scope(mut self, scope: Scope) -> Self {
        self.page.scope = Some(scope);
        self
    }

    /// Only budgets named `name` (a provider, deployment id, model, tag…).
    pub fn name(mut self, name: &'a str) -> Self {
        self.page.name = Some(name);
        self
    }

    /// Only budgets after the one of `scope`, `name` and `period_key` (a row's
    /// [`BudgetStatus::period_key`]) in status order: the next page after that row.
    pub fn after(mut self, scope: Scope, name: &'a str, period_key: &'a str) -> Self {
        self.page.after = Some((scope, name, period_key));
        self
    }

    /// At most `n` budgets (the first in status order).
    pub fn limit(mut self, n: usize) -> Self {
        self.page.limit = Some(n);
        self
    }

    /// Without the series of templates (the rows with [`BudgetStatus::templated`]): the
    /// configured and runtime budgets only, whatever the number of keys (what `/metrics`
    /// reports per budget).
    pub fn without_templated(mut self) -> Self {
        self.page.no_templated = true;
        self
    }
}

impl Limiter {
    /// The state of the budgets `query` selects, in config order (providers first): e.g.
    /// `limiter.status(StatusQuery::all())`.
    pub fn status<D: Deployment + ?Sized, T: AsRef<str>>(
        &self,
        query: StatusQuery<'_, D, T>,
    ) -> Vec<BudgetStatus> {
        let at = query.at.unwrap_or_else(|| self.now());
        let limit = query.page.limit.unwrap_or(usize::MAX);
        // Without a selection the page's limit bounds the rows computed, not only those shown.
        let mut page = query.page;
        if !matches!(query.select, Select::All) {
            page.limit = None;
        }
        let rows = self.status_rows(at, &page).into_iter();
        match query.select {
            Select::All => rows.map(|(_, s)| s).collect(),
            Select::Provider(p) => rows
                .map(|(_, s)| s)
                .filter(|s| s.scope == Scope::Provider && s.name == p)
                .take(limit)
                .collect(),
            Select::Deployment(d) => {
                let resolver = self.inner.resolver.load();
                let r = resolver.resolve(d);
                let slots: Vec<u32> =
                    charge_slots_for(&resolver, &r, query.tags, query.identity).collect();
                rows.filter(|(slot, _)| slots.contains(slot))
                    .map(|(_, s)| s)
                    .take(limit)
                    .collect()
            }
        }
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

    /// The row (with its slot) of every budget `page` selects, in the windows containing `at`.
    fn status_rows(&self, at: Timestamp, page: &Page<'_>) -> Vec<(u32, BudgetStatus)> {
        let secs = floor_secs(at);
        let config = self.inner.config.load();
        let (replication, problems) = self.inner.fleet.status(&config, self.now());
        let grants = self.inner.fleet.grants();
        let storage_fault = self.health().storage_fault;
        let templated = self.templated_budgets(page);
        let budgets: std::borrow::Cow<'_, [BudgetConfig]> = if templated.is_empty() {
            std::borrow::Cow::Borrowed(&config.budgets)
        } else {
            let mut all = config.budgets.clone();
            all.extend(templated);
            all.sort_by_cached_key(BudgetConfig::budget_key);
            std::borrow::Cow::Owned(all)
        };
        paged(&budgets, page)
            .filter_map(|b| {
                let budget_key = b.budget_key();
                let (key, period) = budget_key.store_parts();
                Some((self.inner.keys.position(&budget_key)?, b, key, period))
            })
            .map(|(i, b, key, period_key)| {
                let t = self.inner.view.totals_at(i, secs);
                let spend = t.total();
                let sliding = self.inner.view.sliding_spend(i, secs);
                let counted = sliding.unwrap_or(spend);
                let crossed = b
                    .soft_limits
                    .iter()
                    .copied()
                    .filter(|s| counted.as_nanos() >= s.threshold(b.limit.as_nanos()))
                    .collect();
                let fleet = config.redis.is_some();
                let row = BudgetStatus {
                    provider: key,
                    scope: b.scope,
                    name: b.name.clone(),
                    period: b.period,
                    unit: b.unit,
                    period_key,
                    time_zone: config.budget_zone_name(b),
                    mode: b.mode,
                    soft_limits: b.soft_limits.clone(),
                    thresholds_crossed: crossed,
                    would_deny: self.inner.view.would_deny(i),
                    window: t.window,
                    spend,
                    credited: t.credit,
                    own_spend: t.own,
                    reserved: t.reserved,
                    limit: b.limit,
                    remaining: b.limit.saturating_sub(counted),
                    exhausted: counted >= b.limit,
                    window_shape: b.window,
                    sliding_spend: sliding,
                    replication: replication.clone(),
                    storage_fault: storage_fault.clone(),
                    replication_problem: problems.get(i as usize).cloned().flatten().or_else(
                        || {
                            let series = self.inner.view.credit_series(i)?;
                            problems.get(series as usize).cloned().flatten()
                        },
                    ),
                    templated: b.scope.is_identity() && !is_configured(&config.budgets, b),
                    enforcement: b.enforcement,
                    offline: b.offline,
                    grant: (b.enforcement == Enforcement::Strict).then_some(if fleet {
                        t.grant
                    } else {
                        b.limit
                    }),
                    granted_total: match (b.enforcement, fleet) {
                        (Enforcement::Strict, true) => grants
                            .get(i as usize)
                            .copied()
                            .flatten()
                            .filter(|g| g.0 == t.window)
                            .map(|g| g.1),
                        (Enforcement::Strict, false) => Some(t.total().max(t.grant)),
                        _ => None,
                    },
                };
                (i, row)
            })
            .collect()
    }
}

impl Limiter {
    /// The budgets of the templates' series that `page` may select (one per name and series:
    /// the template with the name), unsorted. Only the named one when `page` names one.
    fn templated_budgets(&self, page: &Page<'_>) -> Vec<BudgetConfig> {
        if page.no_templated {
            return Vec::new();
        }
        let resolver = self.inner.resolver.load();
        let keys = &self.inner.keys;
        let mut out = Vec::new();
        for scope in Scope::IDENTITY {
            let Some(t) = resolver.template(scope) else {
                continue;
            };
            if page.scope.is_some_and(|s| s != scope) {
                continue;
            }
            let mut add = |name: &str, slots: &[u32]| {
                for rule in &t.rules {
                    let b = rule.budget.instance(name);
                    if keys
                        .position(&b.budget_key())
                        .is_some_and(|s| slots.contains(&s))
                    {
                        out.push(b);
                    }
                }
            };
            match page.name {
                Some(name) => {
                    let mut slots = Vec::new();
                    t.lookup(name, |s| slots.push(s));
                    add(name, &slots);
                }
                None => t.each(add),
            }
        }
        out
    }
}

/// Whether `b` is one of the configured budgets (sorted in status order), not a template's
/// series.
fn is_configured(budgets: &[BudgetConfig], b: &BudgetConfig) -> bool {
    let key = b.budget_key();
    budgets
        .binary_search_by(|c| c.budget_key().cmp(&key))
        .is_ok()
}

/// The budgets `page` selects, in status order (budgets are sorted by scope, name and period
/// part: the start is found by binary search, not by a scan).
fn paged<'c>(
    budgets: &'c [crate::config::BudgetConfig],
    page: &Page<'_>,
) -> impl Iterator<Item = &'c crate::config::BudgetConfig> + 'c {
    let after = page.after.map_or(0, |(scope, name, period)| {
        budgets.partition_point(|b| {
            let k = b.budget_key();
            (k.scope, k.name.as_str(), k.period_part.as_str()) <= (scope, name, period)
        })
    });
    let first = match (page.scope, page.name) {
        (Some(s), Some(n)) => budgets.partition_point(|b| (b.scope, b.name.as_str()) < (s, n)),
        (Some(s), None) => budgets.partition_point(|b| b.scope < s),
        _ => 0,
    };
    let (scope, name) = (page.scope, page.name.map(str::to_owned));
    budgets[after.max(first).min(budgets.len())..]
        .iter()
        .take_while(move |b| scope.is_none_or(|s| b.scope == s))
        .filter(move |b| name.as_deref().is_none_or(|n| b.name == n))
        .take(page.limit.unwrap_or(usize::MAX))
}
