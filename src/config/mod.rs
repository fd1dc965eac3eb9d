//! Configuration: which providers have which budget, where spend is stored, how it is shared.
//!
//! Two sources, one [`Config`]:
//!
//! * a litellm proxy config's `provider_budget_config` block, accepted verbatim at the top level
//!   or under `router_settings` (every other key of a litellm config is ignored, so the proxy's
//!   own file can be passed as it is);
//! * our own `provider_budgets:` section for everything litellm has no word for. Unknown keys in
//!   it are errors that name their path (`provider_budgets.storage.max_dely`), because a typo
//!   there would silently weaken durability or replication.
//!
//! ```yaml
//! provider_budget_config:          # litellm's block, as it is
//!   openai: { budget_limit: 100, time_period: 1d }
//!   anthropic: { budget_limit: 50.5, time_period: 1mo }
//! provider_budgets:                # ours, every key optional
//!   storage: { dir: ./budgets, max_delay: 2ms, retention: 2h }
//!   redis: { url: "redis://127.0.0.1/", prefix: provider_budgets, sync_interval: 1s }
//!   node_id: edge-7
//!   window_anchor: 2024-01-01T00:00:00Z   # e.g. a Monday for weekly budgets
//!   unknown_provider: allow               # or deny
//!   reservation_timeout: 10m              # open reservations expire (count their estimate)
//!   model_providers: { "llama-": together }
//! ```
//!
//! Durations are humantime strings (`2ms`, `1s`, `1h 30m`). Budget periods use litellm's
//! notation, see [`Period`].
//!
//! Decisions that keep a file from silently meaning something else:
//!
//! * A key given twice in `provider_budget_config` (at either place) or in
//!   `provider_budgets.model_providers` is an error naming the key (YAML parsers keep the last
//!   one; TOML refuses duplicates itself). A field given twice is an error too.
//! * A value starting with `os.environ/` is replaced by the environment variable it names, as
//!   litellm's proxy does, in every value we read (not in keys, and not in the litellm keys we
//!   ignore). A variable that is unset or empty is an error naming the key path and the variable
//!   (litellm would silently read nothing). Errors about such a value name `os.environ/NAME`;
//!   only a refused budget limit or period also shows what was read (an amount is no secret),
//!   and a Redis URL's password never appears.
//! * `provider_budgets.redis.url` may be left out of the file when the URL comes from elsewhere
//!   (the CLI's `--redis`); the parsed [`RedisConfig::url`] is then empty and
//!   [`Limiter::open`](crate::Limiter::open) refuses it with [`ConfigError::NoRedisUrl`].
//! * Keys outside ours are ignored (a litellm config passes as it is), except one that nearly
//!   spells ours (`provider_budget_confg`, `Provider-Budgets`): that would leave every provider
//!   without a budget, so it is an error naming the key meant.
//! * A `model_providers` prefix that resolution can never reach (it extends a built-in prefix,
//!   or has a `/` after its first character) is an error.
//! * Provider names may not contain `/`, whitespace or control characters (they could never
//!   match a deployment or be fed through `ingest`), nor `:`, `{`, `}` (key separators).
//! * Every error is one line naming the key path once; URLs in it (and in `RedisConfig`'s
//!   `Debug`) have their password replaced by `***`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;

use crate::model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit, MAX_SOFT_LIMITS};
use crate::model::money::{Money, MoneyError};
use crate::model::text::redact_urls;
use crate::model::window::{Period, PeriodError, Schedule};

/// One budget: the deployments (or requests) of a scope name may spend `limit` per window of
/// `period`. See [`crate::Scope`] and the module `budget` for what each scope covers and how
/// a budget is keyed in storage and Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetConfig {
    /// What the budget applies to.
    pub scope: Scope,
    /// The provider, deployment id, model name or tag.
    pub name: String,
    /// Spend at or above which the budget's deployments (or requests) are filtered out.
    pub limit: Money,
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
}

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
            period,
            time_zone: None,
            soft_limits: Vec::new(),
            mode: Mode::Enforce,
            enforcement: Enforcement::Shared,
            offline: Offline::GrantOnly,
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
    }

    /// The storage and Redis key parts (key name, period part): see the module `key`.
    /// Provider budgets without their own zone keep the keys of earlier versions exactly.
    pub fn key_parts(&self) -> (String, String) {
        self.budget_key().store_parts()
    }

    /// How errors and logs name it: `tag "team-a" (1h)`.
    pub fn label(&self) -> String {
        format!("{} {:?} ({})", self.scope, self.name, self.budget_key().period_part)
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
        }
    }
}

/// A configuration is unusable. Each message names the key or provider and the bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file is not valid YAML/TOML, or a key has the wrong shape.
    #[error("config: {path}: {message}")]
    Syntax {
        /// Key path, e.g. `provider_budgets.storage.max_delay`, or `(document)`.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// A budget's limit is not a usable amount.
    #[error("config: provider {provider:?}: budget_limit{}: {source}", written_as(.value))]
    Limit {
        /// The provider.
        provider: String,
        /// The value as written.
        value: String,
        /// Why it is refused.
        source: MoneyError,
    },
    /// A budget's time period is not a duration we know.
    #[error("config: provider {provider:?}: time_period: {source}")]
    Period {
        /// The provider.
        provider: String,
        /// Why it is refused (names the value).
        source: PeriodError,
    },
    /// A provider name cannot be stored or can never match a deployment: empty, or containing
    /// `/`, `:`, `{`, `}`, whitespace or a control character (NUL included).
    #[error("config: provider name {0:?} is not allowed: {problem}", problem = provider_name_problem(.0))]
    ProviderName(String),
    /// Two budgets with the same scope, name and period (and own time zone), e.g.
    /// `provider "openai" (1d)`.
    #[error("config: {0} is given twice (a scope name may have several budgets, one per period)")]
    DuplicateBudget(String),
    /// A budget of another scope than provider is unusable (names its source and key).
    #[error("config: {budget}: {message}")]
    Budget {
        /// The budget: scope, name and where it was given.
        budget: String,
        /// What is wrong.
        message: String,
    },
    /// `provider_budget_config` appears both at the top level and under `router_settings`.
    #[error("config: provider_budget_config is given both at the top level and under router_settings; keep one")]
    TwoBudgetBlocks,
    /// The node id is empty or contains characters Redis keys and logs would mangle.
    #[error("config: node_id {0:?} must be 1-64 characters of [A-Za-z0-9._-]")]
    NodeId(String),
    /// A setting is out of range.
    #[error("config: {key}: {message}")]
    Invalid {
        /// Key path.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A `redis` section without a URL, and none given otherwise (the CLI's `--redis`).
    #[error("config: provider_budgets.redis.url is not set (set it in the config file or pass --redis URL)")]
    NoRedisUrl,
    /// No storage dir: the limiter is durable and needs one.
    #[error("config: no data dir (set provider_budgets.storage.dir or pass --data-dir)")]
    NoDataDir,
    /// The file could not be read.
    #[error("config: cannot read {path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
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

    /// One line listing the litellm keys this crate does not implement, if the file set any.
    pub fn warning(&self) -> Option<String> {
        (!self.ignored_litellm_keys.is_empty()).then(|| {
            format!(
                "config: litellm keys not implemented by provider-budgets (ignored): {}",
                self.ignored_litellm_keys.join(", ")
            )
        })
    }

    /// Reads a YAML (`.yaml`, `.yml`) or TOML (`.toml`) file; other extensions are tried as
    /// YAML, which also accepts JSON.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Io`] when the file cannot be read; otherwise as [`Config::from_yaml_str`].
    pub fn from_path(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("toml") => Config::from_toml_str(&text),
            _ => Config::from_yaml_str(&text),
        }
    }

    /// Parses YAML (a litellm proxy config works as it is). `os.environ/NAME` values are read
    /// from this process's environment.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the key path and the value: a syntax error, a key of the wrong
    /// shape, an unknown key in our section, a bad limit or period, a duplicate, an unset
    /// `os.environ/` variable, or what [`Config::validate`] refuses.
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_str_with_env(text, env_var)
    }

    /// [`Config::from_yaml_str`] with `os.environ/NAME` values looked up by `env` instead of in
    /// the process environment (tests, or a caller with its own secret store).
    ///
    /// # Errors
    ///
    /// As [`Config::from_yaml_str`].
    pub fn from_yaml_str_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String> + 'static,
    ) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Config::from_raw(RawDocument::default());
        }
        let raw: RawDocument = with_env(env, || {
            let de = serde_yaml_ng::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(syntax)
        })?;
        Config::from_raw(raw)
    }

    /// Parses TOML. `os.environ/NAME` values are read from this process's environment.
    ///
    /// # Errors
    ///
    /// As [`Config::from_yaml_str`].
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str_with_env(text, env_var)
    }

    /// [`Config::from_toml_str`] with `os.environ/NAME` values looked up by `env`.
    ///
    /// # Errors
    ///
    /// As [`Config::from_yaml_str`].
    pub fn from_toml_str_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String> + 'static,
    ) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            path: "(document)".into(),
            message: redact_urls(&one_line(&e.to_string())),
        })?;
        let raw: RawDocument =
            with_env(env, || serde_path_to_error::deserialize(de).map_err(syntax))?;
        Config::from_raw(raw)
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
    fn zone(&self) -> Result<Option<jiff::tz::TimeZone>, ConfigError> {
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

    /// Checks what the type system cannot: provider names, duplicates, node id, ranges.
    ///
    /// An empty Redis URL passes here (a file may leave it to the command line); opening a
    /// limiter with it is [`ConfigError::NoRedisUrl`].
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the offending name or key: a provider or budget name that can
    /// never match, a duplicate budget, a bad node id, an unknown time zone, a bad
    /// `model_providers` prefix, an out-of-range Redis setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for b in &self.budgets {
            check_budget(b)?;
            if !seen.insert(b.budget_key()) {
                return Err(ConfigError::DuplicateBudget(b.label()));
            }
        }
        if let Some(id) = &self.node_id {
            check_node_id(id)?;
        }
        self.zone()?;
        if self.reservation_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                key: "provider_budgets.reservation_timeout",
                message: "must be longer than zero (every reservation would expire at once)".into(),
            });
        }
        for (prefix, provider) in &self.model_providers {
            if prefix.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.model_providers",
                    message: format!("empty prefix for provider {provider:?}"),
                });
            }
            if let Some(why) = unreachable_prefix(prefix) {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.model_providers",
                    message: format!("prefix {prefix:?} can never match: {why}"),
                });
            }
            if check_provider_name(provider).is_err() {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.model_providers",
                    message: format!(
                        "prefix {prefix:?}: provider name {provider:?} is not allowed: {}",
                        provider_name_problem(provider)
                    ),
                });
            }
        }
        if let Some(r) = &self.redis {
            if r.sync_interval.is_zero() {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.redis.sync_interval",
                    message: "must be greater than zero".into(),
                });
            }
            if let Some(lease) = r.grant_lease {
                if lease < r.sync_interval.saturating_mul(3) {
                    return Err(ConfigError::Invalid {
                        key: "provider_budgets.redis.grant_lease",
                        message: format!(
                            "{} is shorter than three sync intervals: live nodes would lose their grants",
                            humantime::format_duration(lease)
                        ),
                    });
                }
            }
            if r.prefix.contains(['{', '}']) {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.redis.prefix",
                    message: format!("{:?} must not contain '{{' or '}}'", r.prefix),
                });
            }
        }
        Ok(())
    }

    fn from_raw(raw: RawDocument) -> Result<Config, ConfigError> {
        let mut own = raw.provider_budgets.unwrap_or_default();
        let (nested, nested_tags) = raw.router_settings.map_or((None, None), |r| {
            (r.provider_budget_config, r.tag_budget_config)
        });
        let block = match (raw.provider_budget_config, nested) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoBudgetBlocks),
            (Some(b), None) | (None, Some(b)) => b.0,
            (None, None) => BTreeMap::new(),
        };
        let mut ignored = Vec::new();
        let settings_tags = raw.litellm_settings.and_then(|s| {
            if s.provider_budget_config.is_some() {
                // litellm reads provider budgets from router_settings only: say so.
                ignored.push("litellm_settings.provider_budget_config (litellm reads it from router_settings)".to_owned());
            }
            s.tag_budget_config
        });
        let given = [
            raw.tag_budget_config.map(|b| (b, "tag_budget_config")),
            nested_tags.map(|b| (b, "router_settings.tag_budget_config")),
            settings_tags.map(|b| (b, "litellm_settings.tag_budget_config")),
        ];
        let mut given = given.into_iter().flatten();
        let (tags, tag_block) = match (given.next(), given.next()) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Syntax {
                    path: "tag_budget_config".into(),
                    message: "given at more than one place (top level, router_settings, litellm_settings); keep one"
                        .into(),
                })
            }
            (Some((b, at)), None) => (b.0, at),
            (None, _) => (BTreeMap::new(), "tag_budget_config"),
        };
        let mut budgets = Vec::with_capacity(block.len());
        for (provider, raw) in block {
            budgets.push(raw.into_budget(
                Scope::Provider,
                provider,
                "provider_budget_config",
                &mut ignored,
            )?);
        }
        for (tag, raw) in tags {
            budgets.push(raw.into_budget(Scope::Tag, tag, tag_block, &mut ignored)?);
        }
        for (i, d) in raw.model_list.unwrap_or_default().into_iter().enumerate() {
            budgets.extend(d.into_budget(i)?);
        }
        for (i, g) in own
            .budgets
            .take()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            budgets.push(g.into_budget(i)?);
        }
        let storage = own.storage.unwrap_or_default();
        let defaults = StorageConfig::default();
        let mut config = Config {
            budgets,
            storage: StorageConfig {
                dir: storage.dir.map(|d| PathBuf::from(d.value)),
                max_delay: storage.max_delay.map_or(defaults.max_delay, |d| d.0),
                retention: storage.retention.map_or(defaults.retention, |d| d.0),
            },
            redis: own.redis.map(|r| {
                let mut urls = match r.url {
                    None => Vec::new(),
                    Some(RawUrls::One(u)) => vec![u.value],
                    Some(RawUrls::Many(list)) => list.into_iter().map(|u| u.value).collect(),
                }
                .into_iter();
                let d = RedisConfig::new(urls.next().unwrap_or_default());
                let tls = r.tls.unwrap_or_default();
                RedisConfig {
                    seeds: urls.collect(),
                    tls: RedisTls {
                        ca_file: tls.ca_file.map(|f| PathBuf::from(f.value)),
                        insecure_skip_verify: tls.insecure_skip_verify.is_some_and(|f| f.0),
                    },
                    prefix: r.prefix.map_or(d.prefix, |p| p.value),
                    sync_interval: r.sync_interval.map_or(d.sync_interval, |x| x.0),
                    grace: r.grace.map_or(d.grace, |x| x.0),
                    connect_timeout: r.connect_timeout.map_or(d.connect_timeout, |x| x.0),
                    command_timeout: r.command_timeout.map_or(d.command_timeout, |x| x.0),
                    grant_wait: r.grant_wait.map_or(d.grant_wait, |x| x.0),
                    grant_lease: r.grant_lease.map(|x| x.0),
                    url: d.url,
                }
            }),
            node_id: own.node_id.map(|n| n.value),
            window_anchor: own.window_anchor.map_or(Timestamp::UNIX_EPOCH, |a| a.0),
            time_zone: own.time_zone.map(|z| z.value),
            unknown_provider: own.unknown_provider.map(|u| u.0).unwrap_or_default(),
            model_providers: own
                .model_providers
                .map(|m| m.0)
                .unwrap_or_default()
                .into_iter()
                .map(|(prefix, provider)| (prefix, provider.value))
                .collect(),
            ignored_litellm_keys: ignored,
            reservation_timeout: own
                .reservation_timeout
                .map_or(DEFAULT_RESERVATION_TIMEOUT, |d| d.0),
        };
        sort_budgets(&mut config.budgets);
        config.validate()?;
        if let Some(w) = config.warning() {
            tracing::warn!("{w}");
        }
        Ok(config)
    }
}

/// Budgets in their canonical order: scope (providers first), name, key.
fn sort_budgets(budgets: &mut [BudgetConfig]) {
    budgets.sort_by_cached_key(BudgetConfig::budget_key);
}

/// What `validate` checks per budget: its name for its scope, its zone, its soft limits.
fn check_budget(b: &BudgetConfig) -> Result<(), ConfigError> {
    let refuse = |message: String| ConfigError::Budget {
        budget: b.label(),
        message,
    };
    match b.scope {
        Scope::Provider => check_provider_name(&b.name)?,
        _ => {
            if let Some(why) = crate::model::key::scoped_name_fault(&b.name) {
                return Err(refuse(format!("the name is not allowed: {why}")));
            }
        }
    }
    if let Some(zone) = &b.time_zone {
        if jiff::tz::TimeZone::get(zone).is_err() {
            return Err(refuse(format!(
                "time_zone: unknown time zone {zone:?} (an IANA name such as America/New_York or Europe/Berlin)"
            )));
        }
    }
    if b.soft_limits.len() > MAX_SOFT_LIMITS {
        return Err(refuse(format!(
            "soft_limits: at most {MAX_SOFT_LIMITS} per budget"
        )));
    }
    if b.soft_limits.windows(2).any(|w| w[0] >= w[1]) {
        return Err(refuse(
            "soft_limits: must be increasing, without repeats".into(),
        ));
    }
    Ok(())
}

/// Why a `model_providers` prefix can never take effect, if so: resolution tries a
/// `provider/model` split and the built-in table first (module `resolve`), so a prefix with
/// a `/` after its first character, or one that extends a built-in prefix, would be ignored
/// without a word.
fn unreachable_prefix(prefix: &str) -> Option<String> {
    if let Some((before, _)) = prefix.split_once('/').filter(|(b, _)| !b.is_empty()) {
        return Some(format!(
            "a model name with '/' resolves to the provider before it ({before:?})"
        ));
    }
    crate::model::prefixes::BUILTIN_PREFIXES
        .iter()
        .find(|(builtin, _)| prefix.starts_with(builtin))
        .map(|(builtin, owner)| {
            format!(
                "the built-in prefix {builtin:?} ({owner}) is checked first; name such \
                 deployments PROVIDER/MODEL instead"
            )
        })
}

/// Provider names become storage and Redis key parts, and are matched against deployment
/// names (`provider/model`) and `ingest` fields (split at whitespace): keep them unambiguous
/// there and able to match at all.
pub(crate) fn check_provider_name(name: &str) -> Result<(), ConfigError> {
    if provider_name_fault(name).is_some() {
        return Err(ConfigError::ProviderName(name.to_owned()));
    }
    Ok(())
}

/// What is wrong with a provider name, if anything.
fn provider_name_fault(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".into());
    }
    let bad = name
        .chars()
        .find(|&c| matches!(c, '/' | ':' | '{' | '}') || c.is_whitespace() || c.is_control())?;
    let what = match bad {
        '/' => "'/' (it separates provider and model in a deployment name)".to_owned(),
        ':' | '{' | '}' => format!("{bad:?} (it is a storage and Redis key separator)"),
        c if c.is_whitespace() => format!("whitespace {c:?}"),
        c => format!("control character {c:?}"),
    };
    Some(format!("it contains {what}"))
}

/// ` (os.environ/NAME)` when a limit came from the environment; nothing otherwise (the
/// amount's own error quotes the value).
fn written_as(value: &str) -> String {
    if value.starts_with(ENV_MARKER) {
        format!(" ({value})")
    } else {
        String::new()
    }
}

/// The reason [`ConfigError::ProviderName`] gives.
fn provider_name_problem(name: &str) -> String {
    provider_name_fault(name).unwrap_or_else(|| "reserved".into())
}

fn check_node_id(id: &str) -> Result<(), ConfigError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::NodeId(id.to_owned()))
    }
}

fn syntax<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ConfigError {
    // A key may contain line breaks: escape them, errors are one line.
    let path = e.path().to_string().escape_debug().to_string();
    let path = if path == "." {
        "(document)".into()
    } else {
        path
    };
    let message = one_line(&e.inner().to_string());
    ConfigError::Syntax {
        message: redact_urls(&parser_message(&path, &message)),
        path,
    }
}

/// A parser's message without what the path already says: serde_yaml_ng starts its messages
/// with its own path of the failing node (`provider_budgets.redis: missing field ...`), which
/// is our path or a prefix of it. Serde's Rust vocabulary is translated for YAML readers.
fn parser_message(path: &str, message: &str) -> String {
    let message = match message.split_once(": ") {
        Some((head, rest))
            if !head.is_empty()
                && !head.contains(' ')
                && path.starts_with(head)
                && matches!(path.as_bytes().get(head.len()), None | Some(b'.' | b'[')) =>
        {
            rest
        }
        _ => message,
    };
    message
        .replace("invalid type: unit value", "invalid type: null")
        .replace("invalid type: Option value", "invalid type: null")
}

/// Parser messages may span lines (TOML draws the offending line); errors here are one line.
fn one_line(s: &str) -> String {
    s.split('\n')
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')
        })
        .collect::<Vec<_>>()
        .join("; ")
}

// ---- os.environ/NAME --------------------------------------------------------------------------

/// The marker litellm uses for a value taken from the environment.
const ENV_MARKER: &str = "os.environ/";

type EnvLookup = std::rc::Rc<dyn Fn(&str) -> Option<String>>;

thread_local! {
    /// The lookup of the parse running on this thread (`Deserialize` impls take no context).
    static ENV: std::cell::RefCell<Option<EnvLookup>> = const { std::cell::RefCell::new(None) };
}

/// The process environment; a value that is not UTF-8 is taken lossily (it fails its parse).
fn env_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// Runs `parse` with `env` as the lookup of `os.environ/NAME` values on this thread.
fn with_env<T>(env: impl Fn(&str) -> Option<String> + 'static, parse: impl FnOnce() -> T) -> T {
    struct Reset(Option<EnvLookup>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let previous = self.0.take();
            ENV.with(|e| *e.borrow_mut() = previous);
        }
    }
    let previous = ENV.with(|e| e.borrow_mut().replace(std::rc::Rc::new(env)));
    let _reset = Reset(previous);
    parse()
}

/// Expands `os.environ/NAME` like litellm: a value that starts with the marker is replaced by
/// the variable; anything else is kept. Unset or empty is an error naming the variable (the
/// caller's path names the key); the variable's content never appears in an error.
fn expand_env(written: &str) -> Result<Option<String>, String> {
    let Some(name) = written.strip_prefix(ENV_MARKER) else {
        return Ok(None);
    };
    if name.is_empty() {
        return Err(format!("{written:?} names no environment variable"));
    }
    let lookup = ENV.with(|e| e.borrow().clone());
    let value = match lookup {
        Some(f) => f(name),
        None => env_var(name),
    };
    match value {
        Some(v) if !v.is_empty() => Ok(Some(v)),
        Some(_) => Err(format!("{written}: environment variable {name} is empty")),
        None => Err(format!("{written}: environment variable {name} is not set")),
    }
}

// ---- the file's shape ------------------------------------------------------------------------

/// The top level of a file. Other keys are ignored: it may be a whole litellm config. But a
/// key that is nearly one of ours (`provider_budget_confg`, `provider-budgets`) is an error:
/// ignored, it would silently leave every provider without a budget.
#[derive(Debug, Default)]
struct RawDocument {
    provider_budget_config: Option<UniqueMap<RawBudget>>,
    tag_budget_config: Option<UniqueMap<RawBudget>>,
    model_list: Option<Vec<RawDeployment>>,
    router_settings: Option<RawRouterSettings>,
    /// litellm's `litellm_settings`: only its `tag_budget_config` (where litellm's proxy
    /// reads it) is ours.
    litellm_settings: Option<RawRouterSettings>,
    provider_budgets: Option<RawOwn>,
}

/// litellm's `router_settings`: only its `provider_budget_config` and `tag_budget_config`
/// are ours.
#[derive(Debug, Default)]
struct RawRouterSettings {
    provider_budget_config: Option<UniqueMap<RawBudget>>,
    tag_budget_config: Option<UniqueMap<RawBudget>>,
}

/// One entry of litellm's `model_list`: only the budget of its `litellm_params` and its
/// `model_info.id` are read (other keys, e.g. API keys, are neither read nor expanded).
#[derive(Debug, Deserialize)]
#[serde(expecting = "a map (a litellm deployment)")]
struct RawDeployment {
    litellm_params: Option<RawParams>,
    model_info: Option<RawModelInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a map")]
struct RawParams {
    model: Option<Text>,
    #[serde(alias = "budget_limit")]
    max_budget: Option<RawAmount>,
    #[serde(alias = "time_period")]
    budget_duration: Option<Text>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a map")]
struct RawModelInfo {
    id: Option<Text>,
}

/// The key of ours that `key` is probably a misspelling of: equal once case and `-`/`_`/space
/// are ignored, or at most two edits away.
fn near_miss<'k>(key: &str, ours: &[&'k str]) -> Option<&'k str> {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .map(|c| match c {
                '-' | ' ' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    };
    let k = norm(key);
    ours.iter()
        .copied()
        .find(|o| key != *o && edit_distance(&k, &norm(o)) <= 2)
}

/// Levenshtein distance (keys are short).
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// Reads the keys of a litellm-level map: `read` takes ours (and returns false for others),
/// other keys are skipped unless they nearly spell one of `ours`; ours may appear once.
fn visit_litellm_map<'de, A: serde::de::MapAccess<'de>>(
    mut map: A,
    ours: &[&str],
    mut read: impl FnMut(&str, &mut A) -> Result<bool, A::Error>,
) -> Result<(), A::Error> {
    use serde::de::Error;
    let mut seen: Vec<String> = Vec::new();
    while let Some(key) = map.next_key::<String>()? {
        if ours.contains(&key.as_str()) {
            if seen.contains(&key) {
                return Err(A::Error::custom(format!(
                    "key {key:?} is given more than once"
                )));
            }
            seen.push(key.clone());
        }
        if read(&key, &mut map)? {
            continue;
        }
        if let Some(meant) = near_miss(&key, ours) {
            return Err(A::Error::custom(format!(
                "unknown key {key:?}: did you mean {meant:?}? (other keys are ignored as litellm's)"
            )));
        }
        map.next_value::<serde::de::IgnoredAny>()?;
    }
    Ok(())
}

impl<'de> Deserialize<'de> for RawDocument {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawDocument, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawDocument;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map (a litellm config or our own)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawDocument, A::Error> {
                let mut doc = RawDocument::default();
                let ours = [
                    "provider_budget_config",
                    "tag_budget_config",
                    "model_list",
                    "router_settings",
                    "litellm_settings",
                    "provider_budgets",
                ];
                visit_litellm_map(map, &ours, |key, map| {
                    match key {
                        "provider_budget_config" => {
                            doc.provider_budget_config = map.next_value()?
                        }
                        "tag_budget_config" => doc.tag_budget_config = map.next_value()?,
                        "model_list" => doc.model_list = map.next_value()?,
                        "router_settings" => doc.router_settings = map.next_value()?,
                        "litellm_settings" => doc.litellm_settings = map.next_value()?,
                        "provider_budgets" => doc.provider_budgets = map.next_value()?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                Ok(doc)
            }
        }
        d.deserialize_map(Visit)
    }
}

impl<'de> Deserialize<'de> for RawRouterSettings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawRouterSettings, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawRouterSettings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawRouterSettings, A::Error> {
                let mut out = RawRouterSettings::default();
                let ours = ["provider_budget_config", "tag_budget_config"];
                visit_litellm_map(map, &ours, |key, map| {
                    match key {
                        "provider_budget_config" => {
                            out.provider_budget_config = map.next_value()?
                        }
                        "tag_budget_config" => out.tag_budget_config = map.next_value()?,
                        _ => return Ok(false),
                    }
                    Ok(true)
                })?;
                Ok(out)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// A map whose keys must be unique: YAML parsers keep the last of two equal keys, which would
/// silently drop a budget or a prefix. Sorted by key.
#[derive(Debug)]
struct UniqueMap<V>(BTreeMap<String, V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UniqueMap<V>, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueMap<V>, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "key {key:?} is given more than once"
                        )));
                    }
                    let value = map.next_value::<V>()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// One entry of litellm's `provider_budget_config` or `tag_budget_config`, in either of
/// litellm's spellings (`budget_limit`/`time_period` or `max_budget`/`budget_duration`).
/// Other keys are listed in [`Config::warning`].
#[derive(Debug, Deserialize)]
#[serde(expecting = "a map with budget_limit and time_period (or max_budget and budget_duration)")]
struct RawBudget {
    #[serde(alias = "max_budget")]
    budget_limit: RawAmount,
    #[serde(alias = "budget_duration")]
    time_period: Text,
    #[serde(flatten)]
    other: BTreeMap<String, serde::de::IgnoredAny>,
}

/// One entry of `provider_budgets.budgets`: exactly one of the scope keys.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a map: {provider|deployment|model|tag: NAME, limit, period}"
)]
struct RawGeneral {
    provider: Option<Text>,
    deployment: Option<Text>,
    model: Option<Text>,
    tag: Option<Text>,
    limit: RawAmount,
    period: Text,
    soft_limits: Option<Vec<f64>>,
    mode: Option<Parsed<Mode>>,
    enforcement: Option<Parsed<Enforcement>>,
    offline: Option<Parsed<Offline>>,
    time_zone: Option<Text>,
}

/// A limit may be written as a number or a string (`"0.1"`); strings parse exactly.
#[derive(Debug)]
enum RawAmount {
    Int(u64),
    Float(f64),
    Text(Text),
}

/// What a wrongly shaped value is, in YAML/TOML words, for "got ..." messages.
fn shape(u: serde::de::Unexpected<'_>) -> String {
    use serde::de::Unexpected;
    match u {
        Unexpected::Unit | Unexpected::Option => "null".into(),
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a map".into(),
        other => other.to_string(),
    }
}

impl<'de> Deserialize<'de> for RawAmount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawAmount, D::Error> {
        use serde::de::{Error, Unexpected};
        struct Visit;
        impl Visit {
            fn refuse<E: Error>(u: Unexpected<'_>) -> E {
                E::custom(format!(
                    "must be a number or a decimal string, got {}",
                    shape(u)
                ))
            }
        }
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawAmount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a decimal string")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<RawAmount, E> {
                Ok(RawAmount::Int(v))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<RawAmount, E> {
                // Negative: kept as written, so that the limit's error quotes it.
                Ok(match u64::try_from(v) {
                    Ok(n) => RawAmount::Int(n),
                    Err(_) => RawAmount::Text(Text::plain(v.to_string())),
                })
            }
            // Beyond 64 bits: kept as written; the limit's error says "too large"/"negative".
            fn visit_u128<E: Error>(self, v: u128) -> Result<RawAmount, E> {
                Ok(RawAmount::Text(Text::plain(v.to_string())))
            }
            fn visit_i128<E: Error>(self, v: i128) -> Result<RawAmount, E> {
                Ok(RawAmount::Text(Text::plain(v.to_string())))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<RawAmount, E> {
                Ok(RawAmount::Float(v))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<RawAmount, E> {
                Text::from_written(v).map(RawAmount::Text)
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<RawAmount, E> {
                Err(Visit::refuse(Unexpected::Bool(v)))
            }
            fn visit_unit<E: Error>(self) -> Result<RawAmount, E> {
                Err(Visit::refuse(Unexpected::Unit))
            }
            fn visit_none<E: Error>(self) -> Result<RawAmount, E> {
                Err(Visit::refuse(Unexpected::Unit))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<RawAmount, A::Error> {
                Err(Visit::refuse(Unexpected::Seq))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<RawAmount, A::Error> {
                Err(Visit::refuse(Unexpected::Map))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// A string value after `os.environ/NAME` expansion. `written` is what the file says, and what
/// errors quote (so a secret from the environment is never printed).
#[derive(Debug)]
struct Text {
    value: String,
    written: String,
}

impl Text {
    fn plain(value: String) -> Text {
        Text {
            written: value.clone(),
            value,
        }
    }

    fn from_written<E: serde::de::Error>(written: &str) -> Result<Text, E> {
        match expand_env(written).map_err(E::custom)? {
            Some(value) => Ok(Text {
                value,
                written: written.to_owned(),
            }),
            None => Ok(Text::plain(written.to_owned())),
        }
    }

    /// How an error quotes the value: as written, or `from os.environ/NAME` when expanded.
    fn quoted(&self) -> String {
        if self.value == self.written {
            format!("{:?}", self.value)
        } else {
            format!("from {}", self.written)
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        use serde::de::{Error, Unexpected};
        struct Visit;
        fn refuse<E: Error>(u: Unexpected<'_>) -> E {
            E::custom(format!("must be a string, got {}", shape(u)))
        }
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Text, E> {
                Text::from_written(v)
            }
            // TOML numbers, as YAML's plain scalars arrive as text anyway.
            fn visit_u64<E: Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text::plain(v.to_string()))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text::plain(v.to_string()))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text::plain(v.to_string()))
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<Text, E> {
                Err(refuse(Unexpected::Bool(v)))
            }
            fn visit_unit<E: Error>(self) -> Result<Text, E> {
                Err(refuse(Unexpected::Unit))
            }
            fn visit_none<E: Error>(self) -> Result<Text, E> {
                Err(refuse(Unexpected::Unit))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Text, A::Error> {
                Err(refuse(Unexpected::Seq))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Text, A::Error> {
                Err(refuse(Unexpected::Map))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// A written amount as money, or the value as written and why it is refused.
fn parse_limit(amount: RawAmount) -> Result<Money, (String, MoneyError)> {
    let (value, parsed) = match amount {
        RawAmount::Int(n) => (n.to_string(), n.to_string().parse::<Money>()),
        // Display of f64 is the shortest exact round trip (`0.1`), parsed as a decimal.
        RawAmount::Float(f) => (f.to_string(), f.to_string().parse::<Money>()),
        RawAmount::Text(t) => {
            let p = t.value.trim().parse::<Money>();
            (t.written, p)
        }
    };
    match parsed {
        // A positive limit below one nano rounds up rather than becoming "no budget".
        Ok(m) if m == Money::ZERO && value.trim().parse::<f64>().is_ok_and(|f| f > 0.0) => {
            Ok(Money::from_nanos(1))
        }
        Ok(m) => Ok(m),
        Err(source) => Err((value, source)),
    }
}

/// A budget given outside `provider_budget_config`, refused: names where it was given.
fn refuse_at(path: String, key: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Budget {
        budget: path,
        message: format!("{key}: {message}"),
    }
}

impl RawBudget {
    /// A provider budget (errors as before scopes existed) or a tag budget (errors name
    /// `tag_budget_config.NAME`). Keys litellm may have that we do not implement go to
    /// `ignored`.
    fn into_budget(
        self,
        scope: Scope,
        name: String,
        block: &str,
        ignored: &mut Vec<String>,
    ) -> Result<BudgetConfig, ConfigError> {
        let path = format!("{block}.{name}");
        ignored.extend(self.other.keys().map(|k| format!("{path}.{k}")));
        match scope {
            Scope::Provider => check_provider_name(&name)?,
            _ => {
                if let Some(why) = crate::model::key::scoped_name_fault(&name) {
                    return Err(refuse_at(path, "name", format!("not allowed: {why}")));
                }
            }
        }
        let limit = match parse_limit(self.budget_limit) {
            Ok(m) => m,
            Err((value, source)) if scope == Scope::Provider => {
                return Err(ConfigError::Limit {
                    provider: name,
                    value,
                    source,
                })
            }
            Err((value, source)) => {
                return Err(refuse_at(
                    path,
                    "max_budget",
                    format!("{value:?}: {source}"),
                ))
            }
        };
        let period = match self.time_period.value.parse::<Period>() {
            Ok(p) => p,
            Err(source) if scope == Scope::Provider => {
                return Err(ConfigError::Period {
                    provider: name,
                    source,
                })
            }
            Err(source) => return Err(refuse_at(path, "budget_duration", source)),
        };
        Ok(BudgetConfig::new(scope, name, limit, period))
    }
}

impl RawDeployment {
    /// The deployment budget of `model_list[i]`, if it has one.
    fn into_budget(self, i: usize) -> Result<Option<BudgetConfig>, ConfigError> {
        let path = format!("model_list[{i}]");
        let Some(params) = self.litellm_params else {
            return Ok(None);
        };
        let (amount, duration) = match (params.max_budget, params.budget_duration) {
            (None, None) => return Ok(None),
            (Some(a), Some(d)) => (a, d),
            (Some(_), None) => {
                return Err(refuse_at(
                    path,
                    "litellm_params.budget_duration",
                    "missing (max_budget needs a budget_duration)",
                ))
            }
            (None, Some(_)) => {
                return Err(refuse_at(
                    path,
                    "litellm_params.max_budget",
                    "missing (budget_duration needs a max_budget)",
                ))
            }
        };
        let model = params.model.map(|m| m.value).unwrap_or_default();
        let Some(id) = self.model_info.and_then(|m| m.id).map(|t| t.value) else {
            return Err(refuse_at(
                path,
                "model_info.id",
                format!("missing: the budget of deployment {model:?} needs a fixed id (litellm generates one per start otherwise)"),
            ));
        };
        if let Some(why) = crate::model::key::scoped_name_fault(&id) {
            return Err(refuse_at(
                path,
                "model_info.id",
                format!("{id:?} is not allowed: {why}"),
            ));
        }
        let limit = parse_limit(amount).map_err(|(value, source)| {
            refuse_at(
                path.clone(),
                "litellm_params.max_budget",
                format!("{value:?}: {source}"),
            )
        })?;
        let period = duration
            .value
            .parse::<Period>()
            .map_err(|e| refuse_at(path.clone(), "litellm_params.budget_duration", e))?;
        Ok(Some(BudgetConfig::new(
            Scope::Deployment,
            id,
            limit,
            period,
        )))
    }
}

impl RawGeneral {
    /// The budget of `provider_budgets.budgets[i]`.
    fn into_budget(self, i: usize) -> Result<BudgetConfig, ConfigError> {
        let path = format!("provider_budgets.budgets[{i}]");
        let scoped = [
            (Scope::Provider, self.provider),
            (Scope::Deployment, self.deployment),
            (Scope::Model, self.model),
            (Scope::Tag, self.tag),
        ];
        let mut given = scoped
            .into_iter()
            .filter_map(|(s, n)| n.map(|n| (s, n.value)));
        let (scope, name) = match (given.next(), given.next()) {
            (Some(one), None) => one,
            (None, _) => {
                return Err(refuse_at(
                    path,
                    "scope",
                    "give one of provider, deployment, model or tag",
                ))
            }
            (Some(a), Some(b)) => {
                return Err(refuse_at(
                    path,
                    "scope",
                    format!(
                        "give one of provider, deployment, model or tag, not both {} and {}",
                        a.0, b.0
                    ),
                ))
            }
        };
        if scope == Scope::Provider {
            if let Some(why) = provider_name_fault(&name) {
                return Err(refuse_at(
                    path,
                    "provider",
                    format!("{name:?} is not allowed: {why}"),
                ));
            }
        }
        let limit = parse_limit(self.limit).map_err(|(value, source)| {
            refuse_at(path.clone(), "limit", format!("{value:?}: {source}"))
        })?;
        let period = self
            .period
            .value
            .parse::<Period>()
            .map_err(|e| refuse_at(path.clone(), "period", e))?;
        let mut soft = Vec::new();
        for f in self.soft_limits.unwrap_or_default() {
            soft.push(SoftLimit::new(f).ok_or_else(|| {
                refuse_at(
                    path.clone(),
                    "soft_limits",
                    format!("{f} is not a fraction in (0, 1]"),
                )
            })?);
        }
        soft.sort_unstable();
        soft.dedup();
        let mut b = BudgetConfig::new(scope, name, limit, period).with_soft_limits(soft);
        b.mode = self.mode.map(|m| m.0).unwrap_or_default();
        b.enforcement = self.enforcement.map(|m| m.0).unwrap_or_default();
        b.offline = self.offline.map(|m| m.0).unwrap_or_default();
        b.time_zone = self.time_zone.map(|z| z.value);
        check_budget(&b).map_err(|e| match e {
            ConfigError::Budget { message, .. } => ConfigError::Budget {
                budget: path,
                message,
            },
            other => other,
        })?;
        Ok(b)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map")]
struct RawOwn {
    storage: Option<RawStorage>,
    redis: Option<RawRedis>,
    node_id: Option<Text>,
    window_anchor: Option<Parsed<Timestamp>>,
    time_zone: Option<Text>,
    unknown_provider: Option<Parsed<UnknownProvider>>,
    model_providers: Option<UniqueMap<Text>>,
    budgets: Option<Vec<RawGeneral>>,
    reservation_timeout: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map")]
struct RawStorage {
    dir: Option<Text>,
    max_delay: Option<HumanDuration>,
    retention: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map")]
struct RawRedis {
    url: Option<RawUrls>,
    tls: Option<RawTls>,
    prefix: Option<Text>,
    sync_interval: Option<HumanDuration>,
    grace: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    command_timeout: Option<HumanDuration>,
    grant_wait: Option<HumanDuration>,
    grant_lease: Option<HumanDuration>,
}

/// `redis.url`: one URL, or a list of seed URLs (Redis Cluster). Each element is a [`Text`]
/// (so `os.environ/NAME` works and its errors name the variable).
#[derive(Debug)]
enum RawUrls {
    One(Text),
    Many(Vec<Text>),
}

impl<'de> Deserialize<'de> for RawUrls {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawUrls, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawUrls;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a Redis URL or a list of Redis URLs")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawUrls, E> {
                Text::from_written(v).map(RawUrls::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawUrls, A::Error> {
                let mut out = Vec::new();
                while let Some(t) = seq.next_element::<Text>()? {
                    out.push(t);
                }
                if out.is_empty() {
                    return Err(serde::de::Error::custom(
                        "an empty list: give at least one Redis URL",
                    ));
                }
                Ok(RawUrls::Many(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map")]
struct RawTls {
    ca_file: Option<Text>,
    insecure_skip_verify: Option<Flag>,
}

/// A boolean: `true`/`false` as a boolean (TOML) or as text (YAML, `os.environ/NAME`).
#[derive(Debug)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Flag, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Flag;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Flag, E> {
                let text = Text::from_written::<E>(v)?;
                text.value.trim().parse().map(Flag).map_err(|_| {
                    E::custom(format!(
                        "invalid value {}: expected true or false",
                        text.quoted()
                    ))
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// A string value parsed with `FromStr`; the error quotes the value as written.
#[derive(Debug)]
struct Parsed<T>(T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Parsed<T>, D::Error> {
        let text = Text::deserialize(d)?;
        text.value
            .trim()
            .parse::<T>()
            .map(Parsed)
            .map_err(|e| serde::de::Error::custom(format!("invalid value {}: {e}", text.quoted())))
    }
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

/// A humantime duration string (`2ms`, `1h 30m`).
#[derive(Debug)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
        let text = Text::deserialize(d)?;
        humantime::parse_duration(text.value.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!("invalid duration {}: {e}", text.quoted()))
            })
    }
}

/// Parses a humantime duration (`250ms`, `1s`, `1h 30m`) with an error that quotes the input.
///
/// # Errors
///
/// A one-line message quoting the input when it is not a humantime duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn litellm_block_at_top_level_and_under_router_settings() {
        let top = "provider_budget_config:\n  openai:\n    budget_limit: 0.000000001\n    time_period: 1d\n  azure:\n    budget_limit: 100\n    time_period: 1mo\nmodel_list: []\n";
        let c = Config::from_yaml_str(top).expect("parses");
        assert_eq!(c.budgets.len(), 2);
        assert_eq!(c.budgets[0].name, "azure");
        assert_eq!(c.budgets[0].limit, Money::from_nanos(100_000_000_000));
        assert_eq!(c.budgets[1].limit, Money::from_nanos(1));
        let nested = "router_settings:\n  routing_strategy: simple-shuffle\n  provider_budget_config:\n    openai: {budget_limit: 5, time_period: 30s}\n";
        let c = Config::from_yaml_str(nested).expect("parses");
        assert_eq!(c.budgets[0].period.to_string(), "30s");
        let both = format!("{top}{nested}");
        assert_eq!(
            Config::from_yaml_str(&both),
            Err(ConfigError::TwoBudgetBlocks)
        );
    }

    #[test]
    fn errors_name_the_path_and_value() {
        let e = Config::from_yaml_str("provider_budgets:\n  storage:\n    max_dely: 2ms\n")
            .expect_err("typo");
        let msg = e.to_string();
        assert!(
            msg.contains("provider_budgets.storage") && msg.contains("max_dely"),
            "{msg}"
        );
        let e = Config::from_yaml_str("provider_budgets:\n  storage:\n    max_delay: soon\n")
            .expect_err("bad duration");
        let msg = e.to_string();
        assert!(
            msg.contains("provider_budgets.storage.max_delay") && msg.contains("soon"),
            "{msg}"
        );
        let e = Config::from_yaml_str(
            "provider_budget_config:\n  openai: {budget_limit: -3, time_period: 1d}\n",
        )
        .expect_err("negative");
        let msg = e.to_string();
        assert!(msg.contains("openai") && msg.contains("-3"), "{msg}");
        let e = Config::from_toml_str(
            "[provider_budget_config.openai]\nbudget_limit = 3\ntime_period = \"1fortnight\"\n",
        )
        .expect_err("bad period");
        let msg = e.to_string();
        assert!(
            msg.contains("openai") && msg.contains("1fortnight"),
            "{msg}"
        );
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn toml_with_our_section() {
        let text = r#"
[provider_budget_config.anthropic]
budget_limit = "0.1"
time_period = "1h"

[provider_budgets]
node_id = "edge-1"
unknown_provider = "deny"
window_anchor = "2024-01-01T00:00:00Z"
[provider_budgets.storage]
dir = "/tmp/x"
max_delay = "5ms"
[provider_budgets.redis]
url = "redis://127.0.0.1:1/"
sync_interval = "250ms"
[provider_budgets.model_providers]
"llama-" = "together"
"#;
        let c = Config::from_toml_str(text).expect("parses");
        assert_eq!(c.budgets[0].limit, Money::from_nanos(100_000_000));
        assert_eq!(c.node_id.as_deref(), Some("edge-1"));
        assert_eq!(c.unknown_provider, UnknownProvider::Deny);
        assert_eq!(c.storage.max_delay, Duration::from_millis(5));
        assert_eq!(c.storage.dir.as_deref(), Some(Path::new("/tmp/x")));
        let r = c.redis.expect("redis");
        assert_eq!(r.sync_interval, Duration::from_millis(250));
        assert_eq!(r.prefix, "provider_budgets");
        assert_eq!(
            c.model_providers,
            vec![("llama-".to_owned(), "together".to_owned())]
        );
    }

    #[test]
    fn rejects_bad_names_and_node_ids() {
        assert!(matches!(
            Config::from_yaml_str(
                "provider_budget_config:\n  \"a:b\": {budget_limit: 1, time_period: 1d}\n"
            ),
            Err(ConfigError::ProviderName(_))
        ));
        assert!(matches!(
            Config::from_yaml_str("provider_budgets:\n  node_id: \"a b\"\n"),
            Err(ConfigError::NodeId(_))
        ));
        assert!(matches!(
            Config::from_yaml_str("[1, 2"),
            Err(ConfigError::Syntax { .. })
        ));
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'static {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    fn yaml_err(text: &str) -> String {
        let e = Config::from_yaml_str_with_env(text, env(&[])).expect_err(text);
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn duplicate_keys_are_errors_naming_the_key() {
        let msg = yaml_err(
            "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n  openai: {budget_limit: 2, time_period: 1d}\n",
        );
        assert!(
            msg.contains("provider_budget_config") && msg.contains("\"openai\""),
            "{msg}"
        );
        let msg = yaml_err(
            "router_settings:\n  provider_budget_config:\n    a: {budget_limit: 1, time_period: 1d}\n    a: {budget_limit: 1, time_period: 1d}\n",
        );
        assert!(
            msg.contains("router_settings.provider_budget_config") && msg.contains("\"a\""),
            "{msg}"
        );
        let msg = yaml_err("provider_budgets:\n  model_providers: {\"x-\": a, \"x-\": b}\n");
        assert!(
            msg.contains("provider_budgets.model_providers") && msg.contains("\"x-\""),
            "{msg}"
        );
        // Equal after YAML's own parsing (quoted and plain) is still a duplicate.
        let msg = yaml_err(
            "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n  \"openai\": {budget_limit: 2, time_period: 1d}\n",
        );
        assert!(msg.contains("more than once"), "{msg}");
        let e = Config::from_toml_str(
            "[provider_budget_config]\nopenai = { budget_limit = 1, time_period = \"1d\" }\nopenai = { budget_limit = 2, time_period = \"1d\" }\n",
        )
        .expect_err("toml duplicate");
        assert!(e.to_string().contains("duplicate"), "{e}");
        // Distinct keys still parse, sorted.
        let c =
            Config::from_yaml_str("provider_budgets:\n  model_providers: {\"x-\": a, \"w-\": b}\n")
                .expect("parses");
        assert_eq!(
            c.model_providers,
            vec![("w-".into(), "b".into()), ("x-".into(), "a".into())]
        );
    }

    #[test]
    fn near_misses_of_our_keys_are_refused_other_keys_ignored() {
        for (text, key, meant) in [
            (
                "provider_budget_confg: {}\n",
                "provider_budget_confg",
                "provider_budget_config",
            ),
            (
                "Provider-Budget-Config: {}\n",
                "Provider-Budget-Config",
                "provider_budget_config",
            ),
            (
                "provider_budget: {}\n",
                "provider_budget",
                "provider_budgets",
            ),
            ("router_setings: {}\n", "router_setings", "router_settings"),
            (
                "router_settings:\n  provider_budgets_config: {}\n",
                "provider_budgets_config",
                "provider_budget_config",
            ),
        ] {
            let msg = yaml_err(text);
            assert!(
                msg.contains(&format!("unknown key {key:?}: did you mean {meant:?}?")),
                "{msg}"
            );
        }
        // A whole litellm config: its own keys, even with os.environ values unset, are ignored.
        let c = Config::from_yaml_str_with_env(
            "model_list: [{model_name: x, litellm_params: {api_key: os.environ/K}}]\nlitellm_settings: {drop_params: true}\ngeneral_settings: {master_key: os.environ/M}\nrouter_settings: {routing_strategy: simple-shuffle, redis_password: os.environ/P, provider_budget_config: {openai: {budget_limit: 1, time_period: 1d}}}\nenvironment_variables: {A: b}\n",
            env(&[]),
        )
        .expect("litellm config");
        assert_eq!(c.budgets.len(), 1);
        let msg = yaml_err("provider_budgets: {}\nprovider_budgets: {}\n");
        assert!(
            msg.contains("\"provider_budgets\" is given more than once"),
            "{msg}"
        );
        assert_eq!(edit_distance(&['a', 'b'], &['b', 'a']), 2);
        assert_eq!(edit_distance(&[], &['x']), 1);
    }

    #[test]
    fn provider_names_that_cannot_match_are_refused() {
        for bad in [
            "", "a/b", "a b", "a\tb", "a\nb", "a\u{7}", "a\u{85}b", "a:b", "{a}", "a\0",
        ] {
            assert_eq!(
                check_provider_name(bad),
                Err(ConfigError::ProviderName(bad.into())),
                "{bad:?}"
            );
            let msg = ConfigError::ProviderName(bad.into()).to_string();
            assert!(
                !msg.contains('\n') && msg.contains("is not allowed: it "),
                "{msg}"
            );
        }
        for good in ["openai", "azure_ai", "vertex-ai", "Bedrock.eu", "ünïcode"] {
            assert_eq!(check_provider_name(good), Ok(()), "{good:?}");
        }
        let msg = yaml_err("provider_budgets:\n  model_providers: {\"llama-\": \"meta/llama\"}\n");
        assert!(
            msg.contains("provider_budgets.model_providers")
                && msg.contains("\"llama-\"")
                && msg.contains("\"meta/llama\""),
            "{msg}"
        );
        // Prefixes that resolution would never reach.
        for (prefix, words) in [
            ("gpt-4o-mini", "built-in prefix \"gpt-\" (openai)"),
            ("claude-3", "built-in prefix \"claude-\" (anthropic)"),
            (
                "meta/llama",
                "resolves to the provider before it (\"meta\")",
            ),
        ] {
            let msg = yaml_err(&format!(
                "provider_budgets:\n  model_providers: {{{prefix:?}: together}}\n"
            ));
            assert!(
                msg.contains("provider_budgets.model_providers")
                    && msg.contains(&format!("{prefix:?} can never match"))
                    && msg.contains(words),
                "{msg}"
            );
        }
        // Shorter than a built-in, or a leading '/', can still match.
        for prefix in ["gp", "/local-"] {
            let text = format!("provider_budgets:\n  model_providers: {{{prefix:?}: together}}\n");
            Config::from_yaml_str(&text).expect(prefix);
        }
        let c = Config::new().budget("a b", Money::from_nanos(1), "1d".parse().expect("period"));
        assert_eq!(c.validate(), Err(ConfigError::ProviderName("a b".into())));
    }

    #[test]
    fn wrong_shapes_read_as_plain_words_with_the_path_once() {
        let cases = [
            ("budget_limit: null", "got null"),
            ("budget_limit: ~", "got null"),
            ("budget_limit: [1]", "got a list"),
            ("budget_limit: {a: 1}", "got a map"),
            ("budget_limit: false", "got false"),
        ];
        for (limit, words) in cases {
            let msg = yaml_err(&format!(
                "provider_budget_config:\n  openai: {{{limit}, time_period: 1d}}\n"
            ));
            assert!(
                msg.contains("provider_budget_config.openai.budget_limit: must be a number or a decimal string")
                    && msg.contains(words),
                "{msg}"
            );
            assert_eq!(msg.matches("provider_budget_config").count(), 1, "{msg}");
        }
        // Beyond 64 bits, YAML's integers are refused as amounts, not as a type.
        for (limit, words) in [
            ("99999999999999999999", "too large"),
            ("-99999999999999999999", "negative"),
        ] {
            let msg = yaml_err(&format!(
                "provider_budget_config:\n  openai: {{budget_limit: {limit}, time_period: 1d}}\n"
            ));
            assert!(
                msg.contains("\"openai\"") && msg.contains(limit) && msg.contains(words),
                "{msg}"
            );
        }
        for (text, path) in [
            (
                "provider_budgets:\n  redis: {prefix: [x]}\n",
                "provider_budgets.redis.prefix",
            ),
            ("provider_budgets:\n  redis: 5\n", "provider_budgets.redis"),
            (
                "provider_budgets:\n  node_id: {a: b}\n",
                "provider_budgets.node_id",
            ),
            (
                "provider_budget_config:\n  openai: ~\n",
                "provider_budget_config.openai",
            ),
        ] {
            let msg = yaml_err(text);
            assert_eq!(msg.matches(path).count(), 1, "{msg}");
            for internal in ["Raw", "struct", "unit value", "untagged"] {
                assert!(!msg.contains(internal), "{msg}");
            }
        }
        // TOML numbers where text is expected are text, as YAML's plain scalars are.
        let c = Config::from_toml_str("[provider_budgets]\nnode_id = 7\n").expect("parses");
        assert_eq!(c.node_id.as_deref(), Some("7"));
        let e = Config::from_toml_str("[provider_budgets]\nnode_id = true\n").expect_err("bool");
        assert!(e.to_string().contains("got true"), "{e}");
    }

    #[test]
    fn parser_message_drops_only_the_repeated_path() {
        assert_eq!(
            parser_message(
                "provider_budgets.redis",
                "provider_budgets.redis: missing field `url`"
            ),
            "missing field `url`"
        );
        assert_eq!(
            parser_message(
                "provider_budgets.redis.prefx",
                "provider_budgets.redis: unknown field"
            ),
            "unknown field"
        );
        // Not a prefix at a key boundary, or a sentence: kept.
        assert_eq!(
            parser_message("provider_budgets.redisx", "provider_budgets.redis: x"),
            "provider_budgets.redis: x"
        );
        assert_eq!(parser_message("a", "invalid value: x"), "invalid value: x");
        assert_eq!(
            parser_message("(document)", "invalid type: unit value, expected a map"),
            "invalid type: null, expected a map"
        );
    }

    #[test]
    fn os_environ_values_expand_like_litellm() {
        let text = "model_list:\n  - litellm_params: {api_key: os.environ/UNSET_AND_NOT_OURS}\nprovider_budget_config:\n  openai: {budget_limit: os.environ/LIMIT, time_period: os.environ/PERIOD}\nprovider_budgets:\n  node_id: os.environ/NODE\n  window_anchor: os.environ/ANCHOR\n  unknown_provider: os.environ/POLICY\n  storage: {dir: os.environ/DIR, max_delay: os.environ/DELAY}\n  redis: {url: os.environ/URL, prefix: os.environ/PREFIX}\n  model_providers: {\"llama-\": os.environ/LLAMA}\n";
        let all = [
            ("LIMIT", "0.5"),
            ("PERIOD", "1w"),
            ("NODE", "edge-9"),
            ("ANCHOR", "2024-01-01T00:00:00Z"),
            ("POLICY", "deny"),
            ("DIR", "/var/lib/budgets"),
            ("DELAY", "5ms"),
            ("URL", "redis://:pw@10.0.0.1/"),
            ("PREFIX", "fleet"),
            ("LLAMA", "together"),
        ];
        let c = Config::from_yaml_str_with_env(text, env(&all)).expect("parses");
        assert_eq!(c.budgets[0].limit, Money::from_nanos(500_000_000));
        assert_eq!(c.budgets[0].period.to_string(), "1w");
        assert_eq!(c.node_id.as_deref(), Some("edge-9"));
        assert_eq!(c.window_anchor.to_string(), "2024-01-01T00:00:00Z");
        assert_eq!(c.unknown_provider, UnknownProvider::Deny);
        assert_eq!(
            c.storage.dir.as_deref(),
            Some(Path::new("/var/lib/budgets"))
        );
        assert_eq!(c.storage.max_delay, Duration::from_millis(5));
        let r = c.redis.as_ref().expect("redis");
        assert_eq!(
            (r.url.as_str(), r.prefix.as_str()),
            ("redis://:pw@10.0.0.1/", "fleet")
        );
        assert_eq!(
            c.model_providers,
            vec![("llama-".into(), "together".into())]
        );

        // Each missing or empty variable: the key path and the variable, never a value.
        for (i, (name, _)) in all.iter().enumerate() {
            let mut some = all.to_vec();
            some.remove(i);
            let msg = Config::from_yaml_str_with_env(text, env(&some))
                .expect_err(name)
                .to_string();
            assert!(
                msg.contains(&format!(
                    "os.environ/{name}: environment variable {name} is not set"
                )),
                "{msg}"
            );
            assert!(!msg.contains("pw@"), "{msg}");
            some.insert(i, (name, ""));
            let msg = Config::from_yaml_str_with_env(text, env(&some))
                .expect_err(name)
                .to_string();
            assert!(
                msg.contains(&format!("environment variable {name} is empty")),
                "{msg}"
            );
        }
        let msg = yaml_err("provider_budgets:\n  redis: {url: os.environ/}\n");
        assert!(
            msg.contains("provider_budgets.redis.url")
                && msg.contains("names no environment variable"),
            "{msg}"
        );

        // Only a whole value starting with the marker; keys are never expanded.
        let c = Config::from_yaml_str_with_env(
            "provider_budgets:\n  node_id: \"x\"\n  storage: {dir: \"./os.environ/DIR\"}\n",
            env(&all),
        )
        .expect("parses");
        assert_eq!(
            c.storage.dir.as_deref(),
            Some(Path::new("./os.environ/DIR"))
        );
        let msg = Config::from_yaml_str_with_env(
            "provider_budget_config:\n  os.environ/NODE: {budget_limit: 1, time_period: 1d}\n",
            env(&all),
        )
        .expect_err("a key is a name")
        .to_string();
        assert!(msg.contains("\"os.environ/NODE\""), "{msg}");

        // A refused value from the environment is quoted by its variable, not its content.
        let msg = Config::from_yaml_str_with_env(
            "provider_budgets:\n  storage: {retention: os.environ/SECRET}\n",
            env(&[("SECRET", "hunter2")]),
        )
        .expect_err("not a duration")
        .to_string();
        assert!(
            msg.contains("from os.environ/SECRET") && !msg.contains("hunter2"),
            "{msg}"
        );

        // TOML too; the lookup is only in effect during its parse.
        let c = Config::from_toml_str_with_env(
            "[provider_budget_config.openai]\nbudget_limit = \"os.environ/LIMIT\"\ntime_period = \"1d\"\n",
            env(&all),
        )
        .expect("toml");
        assert_eq!(c.budgets[0].limit, Money::from_nanos(500_000_000));
        assert!(ENV.with(|e| e.borrow().is_none()));
    }

    #[test]
    fn redis_url_may_be_left_out_of_the_file() {
        let c =
            Config::from_yaml_str("provider_budgets:\n  redis: {prefix: fleet}\n").expect("parses");
        let r = c.redis.as_ref().expect("redis section");
        assert_eq!((r.url.as_str(), r.prefix.as_str()), ("", "fleet"));
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            ConfigError::NoRedisUrl.to_string(),
            "config: provider_budgets.redis.url is not set (set it in the config file or pass --redis URL)"
        );
    }

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

    #[test]
    fn urls_in_messages_lose_their_password() {
        for (text, want) in [
            ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
            ("redis://admin:hunter2@h", "redis://admin:***@h"),
            ("rediss://hunter2@h/", "rediss://***@h/"),
            ("x \"redis://u:p@ss@h\" y", "x \"redis://u:***@h\" y"),
            (
                "a redis://h:1/ b redis://:p@k c",
                "a redis://h:1/ b redis://:***@k c",
            ),
            ("no url: a@b", "no url: a@b"),
            ("redis://h/path@x", "redis://h/path@x"),
        ] {
            assert_eq!(redact_urls(text), want, "{text}");
        }
    }

    #[test]
    fn redis_url_may_be_a_list_of_seeds_and_tls_has_a_ca_file_and_an_explicit_opt_out() {
        let c = Config::from_yaml_str(
            "provider_budgets:\n  redis:\n    url: [\"redis://:pw@10.0.0.1:7000/\", \"redis://10.0.0.2:7000/\"]\n    tls: {ca_file: /etc/ca.pem, insecure_skip_verify: true}\n",
        )
        .expect("parses");
        let r = c.redis.as_ref().expect("redis");
        assert_eq!(r.url, "redis://:pw@10.0.0.1:7000/");
        assert_eq!(r.seeds, ["redis://10.0.0.2:7000/"]);
        assert_eq!(r.tls.ca_file.as_deref(), Some(Path::new("/etc/ca.pem")));
        assert!(r.tls.insecure_skip_verify);
        assert!(!format!("{r:?}").contains("pw"));
        let c = Config::from_yaml_str("provider_budgets:\n  redis: {url: \"redis://h/\"}\n")
            .expect("parses");
        let r = c.redis.as_ref().expect("redis");
        assert!(r.seeds.is_empty() && !r.tls.insecure_skip_verify && r.tls.ca_file.is_none());
        let c = Config::from_toml_str(
            "[provider_budgets.redis]\nurl = [\"rediss://h/\"]\ntls = { insecure_skip_verify = true }\n",
        )
        .expect("parses");
        assert!(c.redis.as_ref().expect("redis").tls.insecure_skip_verify);
        for (yaml, culprit) in [
            ("provider_budgets:\n  redis: {url: {a: 1}}\n", "provider_budgets.redis.url"),
            ("provider_budgets:\n  redis: {url: []}\n", "provider_budgets.redis.url"),
            ("provider_budgets:\n  redis: {url: [5, [1]]}\n", "provider_budgets.redis.url"),
            (
                "provider_budgets:\n  redis: {url: \"redis://h/\", tls: {insecure_skip_verify: maybe}}\n",
                "provider_budgets.redis.tls.insecure_skip_verify",
            ),
            (
                "provider_budgets:\n  redis: {url: \"redis://h/\", tls: {verify: false}}\n",
                "provider_budgets.redis.tls",
            ),
        ] {
            let e = Config::from_yaml_str(yaml).expect_err(yaml).to_string();
            assert!(e.contains(culprit) && !e.contains('\n'), "{e}");
        }
    }
}
