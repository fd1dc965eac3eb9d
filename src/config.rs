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
//!   model_providers: { "llama-": together }
//! ```
//!
//! Durations are humantime strings (`2ms`, `1s`, `1h 30m`). Budget periods use litellm's
//! notation, see [`Period`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;

use crate::money::{Money, MoneyError};
use crate::window::{Period, PeriodError};

/// One budget: a provider may spend `limit` per window of `period`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetConfig {
    /// Provider name as it appears in deployments (`openai`, `anthropic`, `azure`, ...).
    pub provider: String,
    /// Spend at or above which the provider's deployments are filtered out.
    pub limit: Money,
    /// Length of a window.
    pub period: Period,
}

/// Where and how durably spend is kept on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Fleet replication through Redis (used by the `redis` feature).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://`).
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
    /// Budgets, at most one per provider, sorted by provider.
    pub budgets: Vec<BudgetConfig>,
    /// Local storage.
    pub storage: StorageConfig,
    /// Replication; `None` runs a single-instance limiter.
    pub redis: Option<RedisConfig>,
    /// This node's id in the fleet; generated once and kept in the data dir when `None`.
    pub node_id: Option<String>,
    /// Windows are aligned to this instant (default the Unix epoch).
    pub window_anchor: Timestamp,
    /// Policy for deployments whose provider cannot be resolved.
    pub unknown_provider: UnknownProvider,
    /// Extra bare-model prefixes → provider, consulted after the built-in table. The longest
    /// matching prefix wins.
    pub model_providers: Vec<(String, String)>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            budgets: Vec::new(),
            storage: StorageConfig::default(),
            redis: None,
            node_id: None,
            window_anchor: Timestamp::UNIX_EPOCH,
            unknown_provider: UnknownProvider::Allow,
            model_providers: Vec::new(),
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
    #[error("config: provider {provider:?}: budget_limit {value:?}: {source}")]
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
    /// A provider name cannot be stored (empty, or contains NUL or a `:`/`{`/`}`).
    #[error(
        "config: provider name {0:?} is not allowed (empty, or contains NUL, ':', '{{' or '}}')"
    )]
    ProviderName(String),
    /// The same provider has two budgets.
    #[error("config: provider {0:?} has more than one budget")]
    DuplicateBudget(String),
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

    /// Adds a budget (builder style). Validation happens in [`Config::validate`] and at open.
    pub fn budget(mut self, provider: impl Into<String>, limit: Money, period: Period) -> Config {
        self.budgets.push(BudgetConfig {
            provider: provider.into(),
            limit,
            period,
        });
        self
    }

    /// Sets the data dir (builder style).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Config {
        self.storage.dir = Some(dir.into());
        self
    }

    /// The budget of a provider, if any.
    pub fn budget_for(&self, provider: &str) -> Option<&BudgetConfig> {
        self.budgets.iter().find(|b| b.provider == provider)
    }

    /// Reads a YAML (`.yaml`, `.yml`) or TOML (`.toml`) file; other extensions are tried as
    /// YAML, which also accepts JSON.
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

    /// Parses YAML (a litellm proxy config works as it is).
    pub fn from_yaml_str(text: &str) -> Result<Config, ConfigError> {
        if text.trim().is_empty() {
            return Config::from_raw(RawDocument::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let raw: RawDocument = serde_path_to_error::deserialize(de).map_err(syntax)?;
        Config::from_raw(raw)
    }

    /// Parses TOML.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            path: "(document)".into(),
            message: one_line(&e.to_string()),
        })?;
        let raw: RawDocument = serde_path_to_error::deserialize(de).map_err(syntax)?;
        Config::from_raw(raw)
    }

    /// Checks what the type system cannot: provider names, duplicates, node id, ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for b in &self.budgets {
            check_provider_name(&b.provider)?;
            if !seen.insert(b.provider.as_str()) {
                return Err(ConfigError::DuplicateBudget(b.provider.clone()));
            }
        }
        if let Some(id) = &self.node_id {
            check_node_id(id)?;
        }
        for (prefix, provider) in &self.model_providers {
            if prefix.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.model_providers",
                    message: format!("empty prefix for provider {provider:?}"),
                });
            }
            check_provider_name(provider)?;
        }
        if let Some(r) = &self.redis {
            if r.sync_interval.is_zero() {
                return Err(ConfigError::Invalid {
                    key: "provider_budgets.redis.sync_interval",
                    message: "must be greater than zero".into(),
                });
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
        let own = raw.provider_budgets.unwrap_or_default();
        let nested = raw.router_settings.and_then(|r| r.provider_budget_config);
        let block = match (raw.provider_budget_config, nested) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoBudgetBlocks),
            (Some(b), None) | (None, Some(b)) => b,
            (None, None) => BTreeMap::new(),
        };
        let mut budgets = Vec::with_capacity(block.len());
        for (provider, raw) in block {
            budgets.push(raw.into_budget(provider)?);
        }
        let storage = own.storage.unwrap_or_default();
        let defaults = StorageConfig::default();
        let mut config = Config {
            budgets,
            storage: StorageConfig {
                dir: storage.dir,
                max_delay: storage.max_delay.map_or(defaults.max_delay, |d| d.0),
                retention: storage.retention.map_or(defaults.retention, |d| d.0),
            },
            redis: own.redis.map(|r| {
                let d = RedisConfig::new(r.url);
                RedisConfig {
                    prefix: r.prefix.unwrap_or(d.prefix),
                    sync_interval: r.sync_interval.map_or(d.sync_interval, |x| x.0),
                    grace: r.grace.map_or(d.grace, |x| x.0),
                    connect_timeout: r.connect_timeout.map_or(d.connect_timeout, |x| x.0),
                    command_timeout: r.command_timeout.map_or(d.command_timeout, |x| x.0),
                    url: d.url,
                }
            }),
            node_id: own.node_id,
            window_anchor: own.window_anchor.unwrap_or(Timestamp::UNIX_EPOCH),
            unknown_provider: own.unknown_provider.unwrap_or_default(),
            model_providers: own
                .model_providers
                .unwrap_or_default()
                .into_iter()
                .collect(),
        };
        config.budgets.sort_by(|a, b| a.provider.cmp(&b.provider));
        config.validate()?;
        Ok(config)
    }
}

/// Provider names become storage and Redis key parts: keep them unambiguous there.
pub(crate) fn check_provider_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.contains(['\0', ':', '{', '}']) {
        return Err(ConfigError::ProviderName(name.to_owned()));
    }
    Ok(())
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
    ConfigError::Syntax {
        path: if path == "." {
            "(document)".into()
        } else {
            path
        },
        message: one_line(&e.inner().to_string()),
    }
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

// ---- the file's shape ------------------------------------------------------------------------

/// The top level of a file. Unknown keys are ignored here: it may be a whole litellm config.
#[derive(Debug, Default, Deserialize)]
struct RawDocument {
    provider_budget_config: Option<BTreeMap<String, RawBudget>>,
    router_settings: Option<RawRouterSettings>,
    provider_budgets: Option<RawOwn>,
}

#[derive(Debug, Deserialize)]
struct RawRouterSettings {
    provider_budget_config: Option<BTreeMap<String, RawBudget>>,
}

/// One entry of litellm's block. Extra keys litellm may add are tolerated.
#[derive(Debug, Deserialize)]
struct RawBudget {
    budget_limit: RawAmount,
    time_period: String,
}

/// A limit may be written as a number or a string (`"0.1"`); strings parse exactly.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawAmount {
    Int(u64),
    Float(f64),
    Text(String),
}

impl RawBudget {
    fn into_budget(self, provider: String) -> Result<BudgetConfig, ConfigError> {
        check_provider_name(&provider)?;
        let (value, parsed) = match self.budget_limit {
            RawAmount::Int(n) => (n.to_string(), n.to_string().parse::<Money>()),
            // Display of f64 is the shortest exact round trip (`0.1`), parsed as a decimal.
            RawAmount::Float(f) => (f.to_string(), f.to_string().parse::<Money>()),
            RawAmount::Text(s) => {
                let p = s.trim().parse::<Money>();
                (s, p)
            }
        };
        let limit = match parsed {
            // A positive limit below one nano rounds up rather than becoming "no budget".
            Ok(m) if m == Money::ZERO && value.trim().parse::<f64>().is_ok_and(|f| f > 0.0) => {
                Money::from_nanos(1)
            }
            Ok(m) => m,
            Err(source) => {
                return Err(ConfigError::Limit {
                    provider,
                    value,
                    source,
                })
            }
        };
        let period = self
            .time_period
            .parse::<Period>()
            .map_err(|source| ConfigError::Period {
                provider: provider.clone(),
                source,
            })?;
        Ok(BudgetConfig {
            provider,
            limit,
            period,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwn {
    storage: Option<RawStorage>,
    redis: Option<RawRedis>,
    node_id: Option<String>,
    window_anchor: Option<Timestamp>,
    unknown_provider: Option<UnknownProvider>,
    model_providers: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    dir: Option<PathBuf>,
    max_delay: Option<HumanDuration>,
    retention: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    url: String,
    prefix: Option<String>,
    sync_interval: Option<HumanDuration>,
    grace: Option<HumanDuration>,
    connect_timeout: Option<HumanDuration>,
    command_timeout: Option<HumanDuration>,
}

/// A humantime duration string (`2ms`, `1h 30m`).
#[derive(Debug)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s)
            .map(HumanDuration)
            .map_err(serde::de::Error::custom)
    }
}

/// Parses a humantime duration (`250ms`, `1s`, `1h 30m`) with an error that quotes the input.
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
        assert_eq!(c.budgets[0].provider, "azure");
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
}
