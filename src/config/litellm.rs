//! litellm's forms, read as they are: `provider_budget_config` and `tag_budget_config` (at the
//! top level, under `router_settings` or `litellm_settings`) and the budgets of `model_list`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::model::budget::{Scope, WindowShape};
use crate::model::unit::Unit;
use crate::model::window::Period;

use super::error::ConfigError;
use super::own::RawOwn;
use super::schema::BudgetConfig;
use super::validate::check_provider_name;
use super::values::{near_miss, parse_amount, parse_limit, refuse_at, RawAmount, Text, UniqueMap};

/// The top level of a file. Other keys are ignored: it may be a whole litellm config. But a
/// key that is nearly one of ours (`provider_budget_confg`, `provider-budgets`) is an error:
/// ignored, it would silently leave every provider without a budget.
#[derive(Debug, Default)]
pub(super) struct RawDocument {
    pub(super) provider_budget_config: Option<UniqueMap<RawBudget>>,
    pub(super) tag_budget_config: Option<UniqueMap<RawBudget>>,
    pub(super) model_list: Option<Vec<RawDeployment>>,
    pub(super) router_settings: Option<RawRouterSettings>,
    /// litellm's `litellm_settings`: only its `tag_budget_config` (where litellm's proxy
    /// reads it) is ours.
    pub(super) litellm_settings: Option<RawRouterSettings>,
    pub(super) provider_budgets: Option<RawOwn>,
    /// Keys this crate does not read whose name says "budget" (`general_settings.max_budget`):
    /// reported, so that budgets in a section we do not read are not silently unenforced.
    pub(super) unread: Vec<String>,
}

/// litellm's `router_settings`: only its `provider_budget_config` and `tag_budget_config`
/// are ours.
#[derive(Debug, Default)]
pub(super) struct RawRouterSettings {
    pub(super) provider_budget_config: Option<UniqueMap<RawBudget>>,
    pub(super) tag_budget_config: Option<UniqueMap<RawBudget>>,
    /// As [`RawDocument::unread`], relative to this section.
    pub(super) unread: Vec<String>,
}

/// One entry of litellm's `model_list`: only the budget of its `litellm_params` and its
/// `model_info.id` are read (other keys, e.g. API keys, are neither read nor expanded).
#[derive(Debug, Deserialize)]
#[serde(expecting = "a map (a litellm deployment)")]
pub(super) struct RawDeployment {
    pub(super) litellm_params: Option<RawParams>,
    pub(super) model_info: Option<RawModelInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a map")]
pub(super) struct RawParams {
    pub(super) model: Option<Text>,
    #[serde(alias = "budget_limit")]
    pub(super) max_budget: Option<RawAmount>,
    #[serde(alias = "time_period")]
    pub(super) budget_duration: Option<Text>,
    /// Tokens per minute: a deployment budget of `tokens` per `1m`.
    pub(super) tpm: Option<RawAmount>,
    /// Requests per minute: a deployment budget of `requests` per `1m`.
    pub(super) rpm: Option<RawAmount>,
    /// Requests in flight: a deployment budget of `concurrent` slots.
    pub(super) max_parallel_requests: Option<RawAmount>,
}

#[derive(Debug, Deserialize)]
#[serde(expecting = "a map")]
pub(super) struct RawModelInfo {
    pub(super) id: Option<Text>,
}

/// Reads the keys of a litellm-level map: `read` takes ours (and returns false for others),
/// other keys are skipped unless they nearly spell one of `ours`; ours may appear once.
/// Returns the skipped keys (and their direct sub-keys, `key.sub`) whose name contains
/// "budget".
pub(super) fn visit_litellm_map<'de, A: serde::de::MapAccess<'de>>(
    mut map: A,
    ours: &[&str],
    mut read: impl FnMut(&str, &mut A) -> Result<bool, A::Error>,
) -> Result<Vec<String>, A::Error> {
    let mut unread = Vec::new();
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
        let BudgetKeys(inner) = map.next_value()?;
        if says_budget(&key) {
            unread.push(key.clone());
        }
        unread.extend(inner.into_iter().map(|k| format!("{key}.{k}")));
    }
    Ok(unread)
}

fn says_budget(key: &str) -> bool {
    key.to_ascii_lowercase().contains("budget")
}

/// Any value, skipped; when it is a map, the names of its keys that contain "budget".
struct BudgetKeys(Vec<String>);

/// A map key: its text when it is a string, `None` for any other scalar.
struct KeyName(Option<String>);

/// The scalar visits of a visitor that keeps nothing of a scalar (`$out`).
macro_rules! skip_scalars {
    ($out:expr) => {
        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($out)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok($out)
        }
    };
}

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<KeyName, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = KeyName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map key")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(KeyName(Some(v.to_owned())))
            }
            skip_scalars!(KeyName(None));
        }
        d.deserialize_any(Visit)
    }
}

impl<'de> Deserialize<'de> for BudgetKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BudgetKeys, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = BudgetKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<BudgetKeys, A::Error> {
                let mut out = Vec::new();
                while let Some(KeyName(key)) = map.next_key()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    out.extend(key.filter(|k| says_budget(k)));
                }
                Ok(BudgetKeys(out))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<BudgetKeys, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(BudgetKeys(Vec::new()))
            }
            fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<BudgetKeys, E> {
                Ok(BudgetKeys(Vec::new()))
            }
            fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<BudgetKeys, D::Error> {
                BudgetKeys::deserialize(d)
            }
            skip_scalars!(BudgetKeys(Vec::new()));
        }
        d.deserialize_any(Visit)
    }
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
                doc.unread = visit_litellm_map(map, &ours, |key, map| {
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
                out.unread = visit_litellm_map(map, &ours, |key, map| {
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

/// One entry of litellm's `provider_budget_config` or `tag_budget_config`, in either of
/// litellm's spellings (`budget_limit`/`time_period` or `max_budget`/`budget_duration`).
/// Other keys are listed in [`Config::warning`].
#[derive(Debug, Deserialize)]
#[serde(expecting = "a map with budget_limit and time_period (or max_budget and budget_duration)")]
pub(super) struct RawBudget {
    #[serde(alias = "max_budget")]
    pub(super) budget_limit: RawAmount,
    #[serde(alias = "budget_duration")]
    pub(super) time_period: Text,
    /// Ours, not litellm's: `fixed` (default) or `sliding`.
    pub(super) window: Option<Text>,
    #[serde(flatten)]
    pub(super) other: BTreeMap<String, serde::de::IgnoredAny>,
}

impl RawBudget {
    /// A provider budget (errors as before scopes existed) or a tag budget (errors name
    /// `tag_budget_config.NAME`). Keys litellm may have that we do not implement go to
    /// `ignored`.
    pub(super) fn into_budget(
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
        let window = match self.window {
            None => WindowShape::Fixed,
            Some(w) => w.value.trim().parse::<WindowShape>().map_err(|e| {
                refuse_at(path, "window", format!("invalid value {}: {e}", w.quoted()))
            })?,
        };
        Ok(BudgetConfig::new(scope, name, limit, period).with_window(window))
    }
}

impl RawDeployment {
    /// The deployment budgets of `model_list[i]`: `max_budget` per `budget_duration` (USD),
    /// and litellm's `tpm`, `rpm` and `max_parallel_requests` as `tokens`/1m, `requests`/1m
    /// and `concurrent` budgets.
    pub(super) fn into_budgets(self, i: usize) -> Result<Vec<BudgetConfig>, ConfigError> {
        let path = format!("model_list[{i}]");
        let Some(params) = self.litellm_params else {
            return Ok(Vec::new());
        };
        let money = match (params.max_budget, params.budget_duration) {
            (None, None) => None,
            (Some(a), Some(d)) => Some((a, d)),
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
        let counts = [
            ("tpm", Unit::Tokens, params.tpm),
            ("rpm", Unit::Requests, params.rpm),
            (
                "max_parallel_requests",
                Unit::Concurrent,
                params.max_parallel_requests,
            ),
        ];
        if money.is_none() && counts.iter().all(|c| c.2.is_none()) {
            return Ok(Vec::new());
        }
        let model = params.model.map(|m| m.value).unwrap_or_default();
        let id = deployment_id(&path, &model, self.model_info)?;
        let mut out = Vec::new();
        if let Some((amount, duration)) = money {
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
            out.push(BudgetConfig::new(
                Scope::Deployment,
                id.clone(),
                limit,
                period,
            ));
        }
        for (key, unit, amount) in counts {
            let Some(amount) = amount else { continue };
            let at = format!("litellm_params.{key}");
            let limit = parse_amount(amount, unit).map_err(|e| refuse_at(path.clone(), &at, e))?;
            out.push(BudgetConfig::counting(
                Scope::Deployment,
                id.clone(),
                unit,
                limit.as_nanos(),
                Period::MINUTE,
            ));
        }
        Ok(out)
    }
}

/// The fixed id a deployment budget needs (`model_info.id`).
fn deployment_id(
    path: &str,
    model: &str,
    info: Option<RawModelInfo>,
) -> Result<String, ConfigError> {
    let Some(id) = info.and_then(|m| m.id).map(|t| t.value) else {
        return Err(refuse_at(
            path.to_owned(),
            "model_info.id",
            format!("missing: the budget of deployment {model:?} needs a fixed id (litellm generates one per start otherwise)"),
        ));
    };
    if let Some(why) = crate::model::key::scoped_name_fault(&id) {
        return Err(refuse_at(
            path.to_owned(),
            "model_info.id",
            format!("{id:?} is not allowed: {why}"),
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{env, yaml_err};
    use crate::config::values::edit_distance;
    use crate::config::*;

    use crate::model::money::Money;

    use std::path::Path;
    use std::time::Duration;

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
