//! Our own `provider_budgets:` section: its keys (unknown ones are errors naming their path)
//! and the budgets of its `budgets:` list.

use jiff::Timestamp;
use serde::Deserialize;

use crate::model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit, WindowShape};
use crate::model::unit::Unit;

use super::error::ConfigError;
use super::schema::{BudgetConfig, UnknownProvider};
use super::validate::check_budget;
use super::values::{
    parse_amount, refuse_at, unit_period, Flag, HumanDuration, Parsed, RawAmount, Text, UniqueMap,
};
use crate::model::key::provider_name_fault;

/// One entry of `provider_budgets.budgets`: exactly one of the scope keys.
#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a map: {provider|deployment|model|tag|key|user|team|org|customer: NAME, limit, period}"
)]
pub(super) struct RawGeneral {
    pub(super) provider: Option<Text>,
    pub(super) deployment: Option<Text>,
    pub(super) model: Option<Text>,
    pub(super) tag: Option<Text>,
    pub(super) key: Option<Text>,
    pub(super) user: Option<Text>,
    pub(super) team: Option<Text>,
    pub(super) org: Option<Text>,
    pub(super) customer: Option<Text>,
    pub(super) limit: RawAmount,
    pub(super) period: Option<Text>,
    pub(super) unit: Option<Parsed<Unit>>,
    pub(super) soft_limits: Option<Vec<f64>>,
    pub(super) mode: Option<Parsed<Mode>>,
    pub(super) enforcement: Option<Parsed<Enforcement>>,
    pub(super) offline: Option<Parsed<Offline>>,
    pub(super) window: Option<Parsed<WindowShape>>,
    pub(super) time_zone: Option<Text>,
    pub(super) max_series: Option<u32>,
    pub(super) max_estimate: Option<RawAmount>,
}

impl RawGeneral {
    /// The budget of `provider_budgets.budgets[i]`.
    pub(super) fn into_budget(self, i: usize) -> Result<BudgetConfig, ConfigError> {
        let path = format!("provider_budgets.budgets[{i}]");
        let scoped = [
            (Scope::Provider, self.provider),
            (Scope::Deployment, self.deployment),
            (Scope::Model, self.model),
            (Scope::Tag, self.tag),
            (Scope::Key, self.key),
            (Scope::User, self.user),
            (Scope::Team, self.team),
            (Scope::Org, self.org),
            (Scope::Customer, self.customer),
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
                    format!("give one of {}", Scope::LIST),
                ))
            }
            (Some(a), Some(b)) => {
                return Err(refuse_at(
                    path,
                    "scope",
                    format!("give one of {}, not both {} and {}", Scope::LIST, a.0, b.0),
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
        let unit = self.unit.map(|u| u.0).unwrap_or_default();
        let limit =
            parse_amount(self.limit, unit).map_err(|e| refuse_at(path.clone(), "limit", e))?;
        let period = unit_period(self.period.as_ref().map(|p| p.value.as_str()), unit)
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
        b.unit = unit;
        b.mode = self.mode.map(|m| m.0).unwrap_or_default();
        b.enforcement = self.enforcement.map(|m| m.0).unwrap_or_default();
        b.offline = self.offline.map(|m| m.0).unwrap_or_default();
        b.window = self.window.map(|m| m.0).unwrap_or_default();
        b.time_zone = self.time_zone.map(|z| z.value);
        b.max_series = self.max_series;
        b.max_estimate = self
            .max_estimate
            .map(|m| parse_amount(m, unit))
            .transpose()
            .map_err(|e| refuse_at(path.clone(), "max_estimate", e))?;
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
pub(super) struct RawOwn {
    pub(super) storage: Option<RawStorage>,
    pub(super) redis: Option<RawRedis>,
    pub(super) node_id: Option<Text>,
    pub(super) window_anchor: Option<Parsed<Timestamp>>,
    pub(super) time_zone: Option<Text>,
    pub(super) unknown_provider: Option<Parsed<UnknownProvider>>,
    pub(super) model_providers: Option<UniqueMap<Text>>,
    pub(super) budgets: Option<Vec<RawGeneral>>,
    pub(super) reservation_timeout: Option<HumanDuration>,
    pub(super) pricing: Option<super::pricing::RawPricing>,
    pub(super) alerts: Option<super::alerts::RawAlerts>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map")]
pub(super) struct RawStorage {
    pub(super) dir: Option<Text>,
    pub(super) max_delay: Option<HumanDuration>,
    pub(super) retention: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map")]
pub(super) struct RawRedis {
    pub(super) url: Option<RawUrls>,
    pub(super) tls: Option<RawTls>,
    pub(super) prefix: Option<Text>,
    pub(super) sync_interval: Option<HumanDuration>,
    pub(super) grace: Option<HumanDuration>,
    pub(super) connect_timeout: Option<HumanDuration>,
    pub(super) command_timeout: Option<HumanDuration>,
    pub(super) grant_wait: Option<HumanDuration>,
    pub(super) grant_lease: Option<HumanDuration>,
}

/// `redis.url`: one URL, or a list of seed URLs (Redis Cluster). Each element is a [`Text`]
/// (so `os.environ/NAME` works and its errors name the variable).
#[derive(Debug)]
pub(super) enum RawUrls {
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
pub(super) struct RawTls {
    pub(super) ca_file: Option<Text>,
    pub(super) insecure_skip_verify: Option<Flag>,
}
