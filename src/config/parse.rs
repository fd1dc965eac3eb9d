//! The [`Config`] parsers: a YAML/TOML document (litellm's forms and our section) into a
//! validated config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::Timestamp;

use crate::model::budget::Scope;
use crate::model::text::redact_urls;

use super::env::{env_var, with_env};
use super::error::{syntax, ConfigError};
use super::litellm::{RawBudget, RawDeployment, RawDocument};
use super::own::{RawOwn, RawRedis, RawUrls};
use super::schema::{
    sort_budgets, BudgetConfig, Config, RedisConfig, RedisTls, StorageConfig,
    DEFAULT_RESERVATION_TIMEOUT,
};
use crate::model::text::one_line;

impl Config {
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

    fn from_raw(raw: RawDocument) -> Result<Config, ConfigError> {
        let mut own = raw.provider_budgets.unwrap_or_default();
        let router_settings_unread = raw.router_settings.as_ref().map(|r| r.unread.clone());
        let (nested, nested_tags) = raw.router_settings.map_or((None, None), |r| {
            (r.provider_budget_config, r.tag_budget_config)
        });
        let block = match (raw.provider_budget_config, nested) {
            (Some(_), Some(_)) => return Err(ConfigError::TwoBudgetBlocks),
            (Some(b), None) | (None, Some(b)) => b.0,
            (None, None) => BTreeMap::new(),
        };
        let mut ignored = raw.unread;
        for (section, s) in [
            ("router_settings", router_settings_unread),
            (
                "litellm_settings",
                raw.litellm_settings.as_ref().map(|s| s.unread.clone()),
            ),
        ] {
            ignored.extend(
                s.unwrap_or_default()
                    .into_iter()
                    .map(|k| format!("{section}.{k}")),
            );
        }
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
        let budgets = collect_budgets(
            block,
            tags,
            tag_block,
            raw.model_list,
            &mut own,
            &mut ignored,
        )?;
        let storage = own.storage.unwrap_or_default();
        let defaults = StorageConfig::default();
        let mut config = Config {
            budgets,
            storage: StorageConfig {
                dir: storage.dir.map(|d| PathBuf::from(d.value)),
                max_delay: storage.max_delay.map_or(defaults.max_delay, |d| d.0),
                retention: storage.retention.map_or(defaults.retention, |d| d.0),
            },
            redis: own.redis.map(redis_config),
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
            pricing: own
                .pricing
                .map(super::pricing::RawPricing::into_pricing)
                .transpose()?
                .unwrap_or_default(),
            alerts: own
                .alerts
                .map(super::alerts::RawAlerts::into_alerts)
                .transpose()?
                .unwrap_or_default(),
        };
        sort_budgets(&mut config.budgets);
        config.validate()?;
        for w in config.warnings() {
            tracing::warn!("{w}");
        }
        Ok(config)
    }
}

/// Every budget of the document: litellm's provider and tag blocks, `model_list`, and our
/// `provider_budgets.budgets`.
fn collect_budgets(
    block: BTreeMap<String, RawBudget>,
    tags: BTreeMap<String, RawBudget>,
    tag_block: &'static str,
    model_list: Option<Vec<RawDeployment>>,
    own: &mut RawOwn,
    ignored: &mut Vec<String>,
) -> Result<Vec<BudgetConfig>, ConfigError> {
    let mut budgets = Vec::with_capacity(block.len());
    for (provider, raw) in block {
        budgets.push(raw.into_budget(
            Scope::Provider,
            provider,
            "provider_budget_config",
            ignored,
        )?);
    }
    for (tag, raw) in tags {
        budgets.push(raw.into_budget(Scope::Tag, tag, tag_block, ignored)?);
    }
    for (i, d) in model_list.unwrap_or_default().into_iter().enumerate() {
        budgets.extend(d.into_budgets(i)?);
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
    Ok(budgets)
}

/// `provider_budgets.redis` with the defaults of what it leaves out.
fn redis_config(r: RawRedis) -> RedisConfig {
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
}
