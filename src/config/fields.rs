//! A budget from its fields as text ([`BudgetFields`]: a sidecar request, the CLI's flags),
//! read and validated exactly as an entry of `provider_budgets.budgets` in the file is: the
//! same parsers, the same checks (`check_budget`), the same messages naming the field. Values
//! are taken as they are (no `os.environ/` expansion: they do not come from the operator's
//! file).

use crate::model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit, WindowShape};
use crate::model::key::provider_name_fault;
use crate::model::unit::Unit;

use super::error::ConfigError;
use super::schema::BudgetConfig;
use super::validate::check_budget;
use super::values::{parse_amount, refuse_at, unit_period, RawAmount, Text};

/// The fields of one budget as text, as a request or a command line gives them. Build it
/// with [`BudgetFields::new`] and set the optional fields; [`BudgetConfig::from_fields`]
/// reads it.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct BudgetFields {
    /// The limit in USD, a decimal (`"12.5"`, `"1e-3"`), as the file's `limit`.
    pub limit: String,
    /// The period (`1d`, `1mo`), as the file's `period`.
    pub period: String,
    /// Soft limits, fractions of the limit in (0, 1].
    pub soft_limits: Vec<f64>,
    /// `enforce` (default) or `shadow`.
    pub mode: Option<String>,
    /// `shared` (default) or `strict`.
    pub enforcement: Option<String>,
    /// Strict budgets without Redis: `grant_only` (default), `local_share` or `open`.
    pub offline: Option<String>,
    /// `fixed` (default) or `sliding`.
    pub window: Option<String>,
    /// The budget's own IANA time zone.
    pub time_zone: Option<String>,
    /// A template's bound on its live series (`max_series`).
    pub max_series: Option<u32>,
    /// What it counts: `usd` (default), `tokens`, `input_tokens`, `output_tokens`,
    /// `requests` or `concurrent` (which takes no period: leave `period` empty).
    pub unit: Option<String>,
    /// The most a reservation holds in the budget, in its unit (`max_estimate`).
    pub max_estimate: Option<String>,
}

impl BudgetFields {
    /// A limit and a period; every other field at its default.
    pub fn new(limit: impl Into<String>, period: impl Into<String>) -> BudgetFields {
        BudgetFields {
            limit: limit.into(),
            period: period.into(),
            ..BudgetFields::default()
        }
    }
}

/// A word field (`mode`, `enforcement`, `offline`, `window`) or its default.
fn word<T: std::str::FromStr<Err = String> + Default>(
    at: &str,
    key: &str,
    value: Option<&String>,
) -> Result<T, ConfigError> {
    match value {
        None => Ok(T::default()),
        Some(v) => v
            .trim()
            .parse::<T>()
            .map_err(|e| refuse_at(at.to_owned(), key, format!("invalid value {v:?}: {e}"))),
    }
}

impl BudgetConfig {
    /// The budget of `scope` `name` described by `fields`, checked as the config file checks
    /// a budget of `provider_budgets.budgets`.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Budget`] naming the budget and the field (`limit: …`, `period: …`,
    /// `soft_limits: …`, `mode: …`, `time_zone: …`, the name).
    pub fn from_fields(
        scope: Scope,
        name: &str,
        fields: &BudgetFields,
    ) -> Result<BudgetConfig, ConfigError> {
        let at = format!("{scope} {name:?}");
        if scope == Scope::Provider {
            if let Some(why) = provider_name_fault(name) {
                return Err(refuse_at(
                    at,
                    "name",
                    format!("{name:?} is not allowed: {why}"),
                ));
            }
        }
        let unit = word::<Unit>(&at, "unit", fields.unit.as_ref())?;
        let limit = parse_amount(RawAmount::Text(Text::plain(fields.limit.clone())), unit)
            .map_err(|e| refuse_at(at.clone(), "limit", e))?;
        let given = Some(fields.period.trim()).filter(|p| !p.is_empty());
        let period = unit_period(given, unit).map_err(|e| refuse_at(at.clone(), "period", e))?;
        let mut soft = Vec::with_capacity(fields.soft_limits.len());
        for &f in &fields.soft_limits {
            soft.push(SoftLimit::new(f).ok_or_else(|| {
                refuse_at(
                    at.clone(),
                    "soft_limits",
                    format!("{f} is not a fraction in (0, 1]"),
                )
            })?);
        }
        soft.sort_unstable();
        soft.dedup();
        let mut b = BudgetConfig::new(scope, name, limit, period).with_soft_limits(soft);
        b.unit = unit;
        b.mode = word::<Mode>(&at, "mode", fields.mode.as_ref())?;
        b.enforcement = word::<Enforcement>(&at, "enforcement", fields.enforcement.as_ref())?;
        b.offline = word::<Offline>(&at, "offline", fields.offline.as_ref())?;
        b.window = word::<WindowShape>(&at, "window", fields.window.as_ref())?;
        b.time_zone = fields.time_zone.clone();
        b.max_series = fields.max_series;
        b.max_estimate = match &fields.max_estimate {
            None => None,
            Some(text) => Some(
                parse_amount(RawAmount::Text(Text::plain(text.clone())), unit)
                    .map_err(|e| refuse_at(at.clone(), "max_estimate", e))?,
            ),
        };
        b.validate()?;
        Ok(b)
    }

    /// Checks what [`Config::validate`](super::Config::validate) checks of one budget: its
    /// name for its scope, its time zone, its soft limits.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the budget and what is wrong.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_budget(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::money::Money;

    fn err(scope: Scope, name: &str, f: &BudgetFields) -> String {
        let e = BudgetConfig::from_fields(scope, name, f).expect_err("refused");
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn fields_read_as_the_file_reads_a_budget() {
        let mut f = BudgetFields::new("12.5", "1d");
        f.soft_limits = vec![0.9, 0.5, 0.5];
        f.mode = Some("shadow".into());
        f.time_zone = Some("Europe/Berlin".into());
        let b = BudgetConfig::from_fields(Scope::Tag, "team-a", &f).unwrap();
        assert_eq!(b.limit, "12.5".parse::<Money>().unwrap());
        assert_eq!(b.mode, Mode::Shadow);
        assert_eq!(b.soft_limits.len(), 2);
        assert_eq!(b.budget_key().period_part, "1d@Europe/Berlin");
        // A positive limit below a nano rounds up, as in the file.
        let b =
            BudgetConfig::from_fields(Scope::Tag, "t", &BudgetFields::new("1e-12", "1h")).unwrap();
        assert_eq!(b.limit, Money::from_nanos(1));
    }

    #[test]
    fn each_bad_field_is_named() {
        let ok = BudgetFields::new("1", "1d");
        let with = |edit: &dyn Fn(&mut BudgetFields)| {
            let mut f = ok.clone();
            edit(&mut f);
            f
        };
        for (f, words) in [
            (with(&|f| f.limit = "-1".into()), "limit: \"-1\""),
            (with(&|f| f.limit = "abc".into()), "limit: \"abc\""),
            (with(&|f| f.period = "3x".into()), "period:"),
            (with(&|f| f.soft_limits = vec![1.5]), "soft_limits: 1.5"),
            (
                with(&|f| f.mode = Some("loud".into())),
                "mode: invalid value \"loud\"",
            ),
            (
                with(&|f| f.enforcement = Some("hard".into())),
                "enforcement: invalid value",
            ),
            (
                with(&|f| f.offline = Some("x".into())),
                "offline: invalid value",
            ),
            (
                with(&|f| f.window = Some("rolling".into())),
                "window: invalid value \"rolling\"",
            ),
            (
                with(&|f| f.time_zone = Some("Mars/Base".into())),
                "time_zone: unknown time zone",
            ),
        ] {
            let msg = err(Scope::Tag, "team-a", &f);
            assert!(
                msg.contains(words) && msg.contains("tag \"team-a\""),
                "{words}: {msg}"
            );
        }
        assert!(err(Scope::Provider, "a/b", &ok).contains("name: \"a/b\" is not allowed"));
        assert!(err(Scope::Tag, "a{b", &ok).contains("the name is not allowed"));
    }
}
