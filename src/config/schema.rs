//! The configuration's types: budgets, storage, Redis, and the [`Config`] they make up, with
//! its builders and the schedules it derives.

use std::path::PathBuf;
use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;

use crate::model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit, WindowShape};
use crate::model::money::Money;
use crate::model::text::redact_urls;
use crate::model::unit::Unit;
use crate::model::window::{Period, Schedule};

use super::error::ConfigError;

/// One budget: the deployments (or requests) of a scope name may spend `limit` per window of
/// `period`. See [`crate::Scope`] and the module `budget` for what each scope covers and how
/// a budget is keyed in storage and Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetConfig {
    /// What the budget applies to.
    pub scope: Scope,
    /// The provider, deployment id, model name, tag or identity name (key, user, team, org,
    /// customer).
    pub name: String,
    /// Spend at or above which the budget's deployments (or requests) are filtered out. For a
    /// budget counting another [`Unit`] than USD, the whole count as `Money::from_nanos(count)`
    /// (see [`BudgetConfig::counting`]): every amount is a `u64` in the budget's unit.
    pub limit: Money,
    /// What it counts: USD (the default), tokens, requests or concurrent requests.
    pub unit: Unit,
    /// Length of a window.
    pub period: Period,
    /// The budget's own IANA time zone for `d`, `w` and `mo` windows; `None` follows
    /// `provider_budgets.time_zone`.
    pub time_zone: Option<String>,
    /// Fractions of the limit that fire an alert once per window each (sorted, at most 8).
    pub soft_limits: Vec<SoftLimit>,
    /// Enforce (filter) or shadow (count and report only).
    pub mode: Mode,
    /// `shared` (the default: the replicated fleet total) or `strict` (grants in escrow, a
    /// bound on the fleet's overshoot; see `docs/strict-budgets.md`).
    pub enforcement: Enforcement,
    /// Strict budgets without Redis: `grant_only` (default), `local_share` or `open`.
    /// Ignored by shared budgets.
    pub offline: Offline,
    /// `fixed` (default) or `sliding`: how the windows count toward the limit. Not part of
    /// the budget's identity (key, storage, Redis): a reload that changes it keeps the
    /// series and changes only the admission rule.
    pub window: WindowShape,
    /// A template (name `"*"`, identity scopes only): the most distinct names with a live
    /// series at once on this node; `None` is [`DEFAULT_MAX_SERIES`]. Refused on a budget
    /// that is not a template.
    pub max_series: Option<u32>,
    /// The most a reservation holds in this budget, in its unit (`max_estimate`): a larger
    /// estimate (given, or made from the request by the catalog) holds this much here. A
    /// commit still counts the actual amount. `None`: no cap.
    pub max_estimate: Option<Money>,
}

/// The period of a [`Unit::Concurrent`] budget, which has none: one window of 100 years
/// ([`Period::LONGEST`]); its slots are held by reservations, never by a window's spend.
pub const CONCURRENT_PERIOD: Period = Period::LONGEST;

fn concurrent_period() -> Period {
    CONCURRENT_PERIOD
}

/// The name of a template: one series per distinct name of its identity scope.
pub const TEMPLATE_NAME: &str = "*";

/// A template's bound on its live series when it sets none (`max_series`).
pub const DEFAULT_MAX_SERIES: u32 = 100_000;

/// The largest `max_series` a template may set: the live series of one process, all
/// templates together, are bounded by [`crate::view::TEMPLATE_SLOTS`] too.
pub const MAX_MAX_SERIES: u32 = 1 << 20;

impl BudgetConfig {
    /// A budget of `scope` `name`, enforced, in the config's time zone, without soft limits.
    pub fn new(
        scope: Scope,
        name: impl Into<String>,
        limit: Money,
        period: Period,
    ) -> BudgetConfig {
        BudgetConfig {
            scope,
            name: name.into(),
            limit,
            unit: Unit::Usd,
            period,
            time_zone: None,
            soft_limits: Vec::new(),
            mode: Mode::Enforce,
            enforcement: Enforcement::Shared,
            offline: Offline::GrantOnly,
            window: WindowShape::Fixed,
            max_series: None,
            max_estimate: None,
        }
    }

    /// A budget of `limit` `unit`s (tokens, requests, …) per `period` (builder style; for
    /// [`Unit::Concurrent`] the period is ignored: see [`CONCURRENT_PERIOD`]).
    pub fn counting(
        scope: Scope,
        name: impl Into<String>,
        unit: Unit,
        limit: u64,
        period: Period,
    ) -> BudgetConfig {
        let period = if unit == Unit::Concurrent {
            concurrent_period()
        } else {
            period
        };
        let mut b = BudgetConfig::new(scope, name, Money::from_nanos(limit), period);
        b.unit = unit;
        b
    }

    /// The limit as the `u64` amount of its unit (nanos for USD).
    pub fn limit_amount(&self) -> u64 {
        self.limit.as_nanos()
    }

    /// Whether it is a template: an identity budget named `"*"`, which gives each distinct
    /// name of its scope a series of its own (see the module `limiter::templates`).
    pub fn is_template(&self) -> bool {
        self.scope.is_identity() && self.name == TEMPLATE_NAME
    }

    /// A template's bound on its live series (`max_series` or [`DEFAULT_MAX_SERIES`]).
    pub fn series_bound(&self) -> u32 {
        self.max_series.unwrap_or(DEFAULT_MAX_SERIES)
    }

    /// The budget a template gives `name`: the template with its name.
    pub(crate) fn instance(&self, name: &str) -> BudgetConfig {
        BudgetConfig {
            name: name.to_owned(),
            max_series: None,
            ..self.clone()
        }
    }

    /// With its own time zone (builder style).
    pub fn in_time_zone(mut self, zone: impl Into<String>) -> BudgetConfig {
        self.time_zone = Some(zone.into());
        self
    }

    /// With soft limits (builder style; sorted and deduplicated by validation).
    pub fn with_soft_limits(mut self, limits: impl IntoIterator<Item = SoftLimit>) -> BudgetConfig {
        self.soft_limits = limits.into_iter().collect();
        self
    }

    /// In `mode` (builder style).
    pub fn with_mode(mut self, mode: Mode) -> BudgetConfig {
        self.mode = mode;
        self
    }

    /// With `enforcement` and, for strict budgets, the `offline` behaviour (builder style).
    pub fn with_enforcement(mut self, enforcement: Enforcement, offline: Offline) -> BudgetConfig {
        self.enforcement = enforcement;
        self.offline = offline;
        self
    }

    /// With the window shape (builder style).
    pub fn with_window(mut self, window: WindowShape) -> BudgetConfig {
        self.window = window;
        self
    }

    /// The provider name of a provider budget.
    pub fn provider(&self) -> Option<&str> {
        (self.scope == Scope::Provider).then_some(self.name.as_str())
    }

    /// The budget's identity (see the module `key`).
    pub(crate) fn budget_key(&self) -> crate::model::key::BudgetKey {
        crate::model::key::BudgetKey::of(
            self.scope,
            &self.name,
            self.period,
            self.time_zone.as_deref(),
        )
        .in_unit(self.unit)
    }

    /// The storage and Redis key parts (key name, period part): see the module `key`.
    /// Provider budgets without their own zone keep the keys of earlier versions exactly.
    pub fn key_parts(&self) -> (String, String) {
        self.budget_key().store_parts()
    }

    /// How errors and logs name it: `tag "team-a" (1h)`.
    pub fn label(&self) -> String {
        format!(
            "{} {:?} ({})",
            self.scope,
            self.name,
            self.budget_key().period_part
        )
    }
}

/// Where and how durably spend is kept on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StorageConfig {
    /// The sled data dir. Required to open a limiter (the CLI's `--data-dir` sets it).
    pub dir: Option<PathBuf>,
    /// Longest time a buffered `record` waits before its flush: the most a crash can lose.
    /// Default 2 ms.
    pub max_delay: Duration,
    /// How long an ended window stays stored and readable before it is deleted. Default 1 h.
    pub retention: Duration,
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            dir: None,
            max_delay: Duration::from_millis(2),
            retention: Duration::from_secs(3600),
        }
    }
}

/// Fleet replication through Redis (used by the `redis` feature). Its `Debug` masks the URL's
/// password, so a logged or panicking config never shows it.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://`). Empty when a file's `redis` section leaves the
    /// URL to the command line: opening a limiter with an empty URL is
    /// [`ConfigError::NoRedisUrl`].
    pub url: String,
    /// Prefix of every key, so several fleets can share one Redis. Default `provider_budgets`.
    pub prefix: String,
    /// Time between sync rounds. Default 1 s.
    pub sync_interval: Duration,
    /// How long a window's key outlives the window's end. Default 1 h.
    pub grace: Duration,
    /// Bound on establishing a connection. Default 2 s.
    pub connect_timeout: Duration,
    /// Bound on one sync round trip. Default 2 s.
    pub command_timeout: Duration,
    /// Further seed URLs of a Redis Cluster (`redis.url` given as a list: the first is
    /// [`RedisConfig::url`], the rest are here). Any one reachable node is enough; a single
    /// URL pointing at a cluster node works as well (the cluster is detected).
    pub seeds: Vec<String>,
    /// TLS settings for `rediss://` URLs.
    pub tls: RedisTls,
    /// Strict budgets: how long a reservation refused only by this node's grant waits for
    /// the out-of-cycle grant round before it is retried once. Default 250 ms.
    pub grant_wait: Duration,
    /// Strict budgets: a node whose grant was not renewed (no round reached Redis) for this
    /// long is deemed dead and its unused grant may be reclaimed by the others. `None` (the
    /// default): never reclaimed (stranded until the window ends). Reclaiming costs the bound
    /// the reclaimed amount if the node was alive after all (see `docs/strict-budgets.md`).
    pub grant_lease: Option<Duration>,
}

/// TLS for `rediss://` URLs (rustls). By default the server certificate is verified against
/// the system's root certificates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RedisTls {
    /// A PEM file of CA certificates to trust instead (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Accept any server certificate (no verification at all): **for tests only**, it
    /// leaves the connection open to interception. Logged as a warning at every connect.
    pub insecure_skip_verify: bool,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_urls(&self.url))
            .field("prefix", &self.prefix)
            .field("sync_interval", &self.sync_interval)
            .field("grace", &self.grace)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field(
                "seeds",
                &self
                    .seeds
                    .iter()
                    .map(|u| redact_urls(u))
                    .collect::<Vec<_>>(),
            )
            .field("tls", &self.tls)
            .field("grant_wait", &self.grant_wait)
            .field("grant_lease", &self.grant_lease)
            .finish()
    }
}

impl RedisConfig {
    /// Defaults for everything but the URL.
    pub fn new(url: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            prefix: "provider_budgets".into(),
            sync_interval: Duration::from_secs(1),
            grace: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            seeds: Vec::new(),
            tls: RedisTls::default(),
            grant_wait: Duration::from_millis(250),
            grant_lease: None,
        }
    }
}

/// What `filter` does with a deployment whose provider cannot be determined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownProvider {
    /// Let it pass (and count it in `provider_budgets_unknown_provider_total`). The default:
    /// dropping deployments silently is one of the reference's flaws.
    #[default]
    Allow,
    /// Filter it out.
    Deny,
}

/// The whole configuration. Build it from a file ([`Config::from_path`]) or in code
/// ([`Config::new`] and [`Config::budget`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Budgets, sorted by scope (providers first), name and period; one per (scope, name,
    /// period, own time zone).
    pub budgets: Vec<BudgetConfig>,
    /// Local storage.
    pub storage: StorageConfig,
    /// Replication; `None` runs a single-instance limiter.
    pub redis: Option<RedisConfig>,
    /// This node's id in the fleet; generated once and kept in the data dir when `None`.
    pub node_id: Option<String>,
    /// Windows are aligned to this instant (default the Unix epoch).
    pub window_anchor: Timestamp,
    /// IANA time zone of `d`, `w` and `mo` windows (they start at local midnight there,
    /// DST-correct); `None` (the default) keeps UTC arithmetic from the anchor.
    pub time_zone: Option<String>,
    /// Policy for deployments whose provider cannot be resolved.
    pub unknown_provider: UnknownProvider,
    /// Extra bare-model prefixes → provider, consulted after the built-in table. The longest
    /// matching prefix wins.
    pub model_providers: Vec<(String, String)>,
    /// Budget-related litellm keys the file sets that this crate does not implement (key
    /// paths). [`Config::warning`] lists them in one line; they are never silently dropped.
    pub ignored_litellm_keys: Vec<String>,
    /// `provider_budgets.reservation_timeout` (default 10 min): a reservation neither committed
    /// nor released within it expires and counts its estimate (the provider may have billed a
    /// call whose answer never came back). Long enough for the slowest streamed answer; short
    /// enough that money held by a crashed client comes back as spend, not as a hole.
    pub reservation_timeout: Duration,
    /// `provider_budgets.pricing`: the price catalog, negotiated prices and the unpriced
    /// policy, for [`Catalog::load`](crate::Catalog::load). Not used by the limiter yet.
    pub pricing: crate::pricing::Pricing,
    /// `provider_budgets.alerts`: webhooks and the forecast's lead time, read by the sidecar
    /// (the library fires soft limits through [`Limiter::on_soft_limit`](crate::Limiter::on_soft_limit)).
    pub alerts: super::alerts::AlertsConfig,
}

/// Default of [`Config::reservation_timeout`].
pub const DEFAULT_RESERVATION_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for Config {
    fn default() -> Config {
        Config {
            budgets: Vec::new(),
            storage: StorageConfig::default(),
            redis: None,
            node_id: None,
            window_anchor: Timestamp::UNIX_EPOCH,
            time_zone: None,
            unknown_provider: UnknownProvider::Allow,
            model_providers: Vec::new(),
            ignored_litellm_keys: Vec::new(),
            reservation_timeout: DEFAULT_RESERVATION_TIMEOUT,
            pricing: crate::pricing::Pricing::default(),
            alerts: super::alerts::AlertsConfig::default(),
        }
    }
}

impl Config {
    /// An empty configuration with defaults.
    pub fn new() -> Config {
        Config::default()
    }

    /// Adds a provider budget (builder style). Validation happens in [`Config::validate`] and
    /// at open.
    pub fn budget(self, provider: impl Into<String>, limit: Money, period: Period) -> Config {
        self.with_budget(BudgetConfig::new(Scope::Provider, provider, limit, period))
    }

    /// Adds a budget of any scope (builder style), keeping [`Config::budgets`] sorted.
    pub fn with_budget(mut self, budget: BudgetConfig) -> Config {
        self.budgets.push(budget);
        sort_budgets(&mut self.budgets);
        self
    }

    /// Sets the data dir (builder style).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Config {
        self.storage.dir = Some(dir.into());
        self
    }

    /// Sets [`Config::reservation_timeout`] (builder style).
    pub fn reservation_timeout(mut self, timeout: Duration) -> Config {
        self.reservation_timeout = timeout;
        self
    }

    /// The (first) budget of a provider, if any.
    pub fn budget_for(&self, provider: &str) -> Option<&BudgetConfig> {
        self.budgets
            .iter()
            .find(|b| b.scope == Scope::Provider && b.name == provider)
    }

    /// What a config that parses may still get wrong, one line each (logged at warn level
    /// when a file is read, so at start and at every reload): litellm keys this crate does not
    /// implement or sections it does not read that name a budget ([`Config::warning`]), no
    /// budget at all (everything is allowed), a provider budget whose name matches a known
    /// provider only in another case (`OpenAI`: it applies to nothing).
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self.warning().into_iter().collect();
        if self.budgets.is_empty() {
            out.push(
                "config: no budget is configured: every deployment is allowed and nothing is limited"
                    .to_owned(),
            );
        }
        let known = crate::model::prefixes::KNOWN_PROVIDERS
            .iter()
            .copied()
            .chain(crate::model::prefixes::BUILTIN_PREFIXES.iter().map(|p| p.1))
            .chain(self.model_providers.iter().map(|p| p.1.as_str()));
        let known: Vec<&str> = known.collect();
        for b in self.budgets.iter().filter(|b| b.scope == Scope::Provider) {
            let same_but_case = known
                .iter()
                .find(|k| k.eq_ignore_ascii_case(&b.name) && **k != b.name);
            if let (false, Some(k)) = (known.contains(&b.name.as_str()), same_but_case) {
                out.push(format!(
                    "config: provider budget {:?} matches no provider (names are case-sensitive); did you mean {k:?}?",
                    b.name
                ));
            }
        }
        out
    }

    /// One line listing the litellm keys this crate does not implement, if the file set any.
    pub fn warning(&self) -> Option<String> {
        (!self.ignored_litellm_keys.is_empty()).then(|| {
            format!(
                "config: litellm keys not implemented by provider-budgets (ignored): {}",
                self.ignored_litellm_keys.join(", ")
            )
        })
    }

    /// The window schedule of a budget period: aligned to `window_anchor`, in `time_zone`.
    pub fn schedule(&self, period: Period) -> Schedule {
        let schedule = Schedule::new(period, self.window_anchor);
        match self.zone() {
            Ok(Some(tz)) => schedule.in_zone(tz),
            _ => schedule,
        }
    }

    /// The window schedule of a budget: its own time zone, else the config's.
    pub fn budget_schedule(&self, budget: &BudgetConfig) -> Schedule {
        match budget.time_zone.as_deref().map(jiff::tz::TimeZone::get) {
            Some(Ok(tz)) => Schedule::new(budget.period, self.window_anchor).in_zone(tz),
            _ => self.schedule(budget.period),
        }
    }

    /// The IANA name of a budget's time zone (`UTC` when none is configured).
    pub fn budget_zone_name(&self, budget: &BudgetConfig) -> String {
        budget
            .time_zone
            .clone()
            .or_else(|| self.time_zone.clone())
            .unwrap_or_else(|| "UTC".to_owned())
    }

    /// `time_zone` resolved in the bundled time zone database.
    pub(super) fn zone(&self) -> Result<Option<jiff::tz::TimeZone>, ConfigError> {
        match &self.time_zone {
            None => Ok(None),
            Some(name) => jiff::tz::TimeZone::get(name)
                .map(Some)
                .map_err(|_| ConfigError::Invalid {
                    key: "provider_budgets.time_zone",
                    message: format!(
                        "unknown time zone {name:?} (an IANA name such as America/New_York or Europe/Berlin)"
                    ),
                }),
        }
    }
}

/// Budgets in their canonical order: scope (providers first), name, key.
pub(super) fn sort_budgets(budgets: &mut [BudgetConfig]) {
    budgets.sort_by_cached_key(BudgetConfig::budget_key);
}

impl std::str::FromStr for UnknownProvider {
    type Err = String;
    fn from_str(s: &str) -> Result<UnknownProvider, String> {
        match s {
            "allow" => Ok(UnknownProvider::Allow),
            "deny" => Ok(UnknownProvider::Deny),
            _ => Err("expected `allow` or `deny`".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_config_debug_masks_the_password() {
        let shown = format!("{:?}", RedisConfig::new("redis://:hunter2@10.0.0.1:6379/"));
        assert!(
            shown.contains("redis://:***@10.0.0.1:6379/") && !shown.contains("hunter2"),
            "{shown}"
        );
        let c = Config {
            redis: Some(RedisConfig::new("redis://u:hunter2@h/")),
            ..Config::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
