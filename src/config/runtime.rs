//! Runtime budgets in the config layer: [`Definition`], the form a budget defined at run time
//! (not in the file) is stored in and replicated as, and [`merge`], which adds runtime
//! budgets to the configuration a limiter applies.
//!
//! A definition keeps every field as text or an integer (the limit in nanos, soft limits in
//! millionths), so its JSON is stable and exact, and a node turns it back into a
//! [`BudgetConfig`] with the file's checks: a definition that does not check out here (a
//! scope or field this version does not know, a time zone missing from its database) is
//! refused by that node, never applied half-read. Unknown fields are refused for the same
//! reason: a field added later (a unit, say) must not be dropped silently.

use serde::{Deserialize, Serialize};

use crate::model::budget::{Enforcement, Mode, Offline, Scope, SoftLimit, WindowShape};
use crate::model::key::BudgetKey;
use crate::model::money::Money;
use crate::model::unit::Unit;
use crate::model::window::Period;

use super::error::ConfigError;
use super::schema::{sort_budgets, BudgetConfig, Config};

/// A budget as runtime budgets store and replicate it (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Definition {
    /// `Scope::as_str`.
    pub scope: String,
    pub name: String,
    /// Nano-dollars.
    pub limit: u64,
    /// As written (`1d`).
    pub period: String,
    pub time_zone: Option<String>,
    /// Millionths of the limit, increasing.
    pub soft_limits: Vec<u32>,
    pub mode: String,
    pub enforcement: String,
    pub offline: String,
    /// `sliding`, or absent for `fixed` (definitions written before window shapes have
    /// none; a fixed budget writes none, so older nodes still read it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// A template's `max_series` (absent in definitions written before templates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_series: Option<u32>,
    /// What it counts (`Unit::as_str`); absent for USD, as in definitions written before
    /// units (a node that does not know units refuses a definition that has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// `max_estimate` in the budget's unit (nanos for USD); absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_estimate: Option<u64>,
}

impl Definition {
    /// The definition of `b`.
    pub(crate) fn of(b: &BudgetConfig) -> Definition {
        Definition {
            scope: b.scope.as_str().to_owned(),
            name: b.name.clone(),
            limit: b.limit.as_nanos(),
            period: b.period.to_string(),
            time_zone: b.time_zone.clone(),
            soft_limits: b.soft_limits.iter().map(|s| s.millionths()).collect(),
            mode: b.mode.as_str().to_owned(),
            enforcement: b.enforcement.as_str().to_owned(),
            offline: b.offline.as_str().to_owned(),
            window: (b.window != WindowShape::Fixed).then(|| b.window.as_str().to_owned()),
            max_series: b.max_series,
            unit: b.unit.is_count().then(|| b.unit.as_str().to_owned()),
            max_estimate: b.max_estimate.map(Money::as_nanos),
        }
    }

    /// The budget it defines, checked as the file's budgets are.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Budget`] naming the definition and what this node cannot read.
    pub(crate) fn budget(&self) -> Result<BudgetConfig, ConfigError> {
        let at = || format!("runtime budget {}:{}", self.scope, self.name);
        let refuse = |what: String| ConfigError::Budget {
            budget: at(),
            message: what,
        };
        let scope: Scope = self.scope.parse().map_err(refuse)?;
        let period: Period = self
            .period
            .parse()
            .map_err(|e: crate::model::window::PeriodError| refuse(format!("period: {e}")))?;
        let mut soft = Vec::with_capacity(self.soft_limits.len());
        for &ppm in &self.soft_limits {
            soft.push(
                SoftLimit::from_millionths(ppm)
                    .ok_or_else(|| refuse(format!("soft_limits: {ppm} millionths")))?,
            );
        }
        let mut b = BudgetConfig::new(scope, &self.name, Money::from_nanos(self.limit), period)
            .with_soft_limits(soft);
        b.time_zone.clone_from(&self.time_zone);
        b.mode = self
            .mode
            .parse::<Mode>()
            .map_err(|e| refuse(format!("mode: {e}")))?;
        b.enforcement = self
            .enforcement
            .parse::<Enforcement>()
            .map_err(|e| refuse(format!("enforcement: {e}")))?;
        b.offline = self
            .offline
            .parse::<Offline>()
            .map_err(|e| refuse(format!("offline: {e}")))?;
        if let Some(window) = &self.window {
            b.window = window
                .parse::<WindowShape>()
                .map_err(|e| refuse(format!("window: invalid value {window:?}: {e}")))?;
        }
        b.max_series = self.max_series;
        b.max_estimate = self.max_estimate.map(Money::from_nanos);
        if let Some(unit) = &self.unit {
            b.unit = unit
                .parse::<Unit>()
                .map_err(|e| refuse(format!("unit: {e}")))?;
        }
        b.validate()?;
        Ok(b)
    }
}

/// A configuration with runtime budgets added ([`merge`]).
#[derive(Debug)]
pub(crate) struct Merged {
    /// What the limiter applies: the base config's budgets and the runtime budgets it does
    /// not define, sorted as a parsed config's.
    pub config: Config,
    /// The runtime budgets left out because the base config defines their series (labels).
    pub shadowed: Vec<String>,
}

/// `base` with the budgets of `runtime` added, the base first: a runtime budget whose series
/// (scope, name, period part) `base` defines is left out (shadowed), so the file stays the
/// source of truth for what it names.
pub(crate) fn merge(base: &Config, runtime: impl IntoIterator<Item = BudgetConfig>) -> Merged {
    let defined: rustc_hash::FxHashSet<BudgetKey> =
        base.budgets.iter().map(BudgetConfig::budget_key).collect();
    let mut config = base.clone();
    let mut shadowed = Vec::new();
    for b in runtime {
        if defined.contains(&b.budget_key()) {
            shadowed.push(b.label());
        } else {
            config.budgets.push(b);
        }
    }
    sort_budgets(&mut config.budgets);
    Merged { config, shadowed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BudgetFields;

    #[test]
    fn a_definition_reads_back_as_its_budget_and_refuses_what_it_cannot_read() {
        let mut f = BudgetFields::new("2.5", "1mo");
        f.soft_limits = vec![0.5];
        f.enforcement = Some("strict".into());
        f.time_zone = Some("Europe/Berlin".into());
        let b = BudgetConfig::from_fields(Scope::Tag, "team-a", &f).unwrap();
        let d = Definition::of(&b);
        let json = serde_json::to_string(&d).unwrap();
        let back: Definition = serde_json::from_str(&json).unwrap();
        assert_eq!(back.budget().unwrap(), b);
        // A scope or field of a later version is refused, never half-read.
        let later = json.replace("\"tag\"", "\"galaxy\"");
        let d: Definition = serde_json::from_str(&later).unwrap();
        assert!(d.budget().unwrap_err().to_string().contains("galaxy"));
        let later = json.replace("\"offline\"", "\"galaxy\":\"far\",\"offline\"");
        assert!(serde_json::from_str::<Definition>(&later).is_err());
        // A unit reads back; an unknown one is refused naming it.
        let mut f = BudgetFields::new("60", "1m");
        f.unit = Some("requests".into());
        let b = BudgetConfig::from_fields(Scope::Deployment, "d", &f).unwrap();
        let json = serde_json::to_string(&Definition::of(&b)).unwrap();
        assert!(json.contains("\"unit\":\"requests\""), "{json}");
        let back: Definition = serde_json::from_str(&json).unwrap();
        assert_eq!(back.budget().unwrap(), b);
        let later: Definition = serde_json::from_str(&json.replace("requests", "joules")).unwrap();
        assert!(later.budget().unwrap_err().to_string().contains("unit"));
    }

    #[test]
    fn a_window_shape_round_trips_and_an_old_definition_is_fixed() {
        let mut f = BudgetFields::new("2.5", "1h");
        f.window = Some("sliding".into());
        let b = BudgetConfig::from_fields(Scope::Tag, "team-a", &f).unwrap();
        assert_eq!(b.window, WindowShape::Sliding);
        let json = serde_json::to_string(&Definition::of(&b)).unwrap();
        assert!(json.contains("\"window\":\"sliding\""), "{json}");
        let back: Definition = serde_json::from_str(&json).unwrap();
        assert_eq!(back.budget().unwrap(), b);
        // A fixed budget writes no `window` (older nodes read it); absent reads as fixed.
        let fixed =
            BudgetConfig::from_fields(Scope::Tag, "t", &BudgetFields::new("1", "1h")).unwrap();
        let json = serde_json::to_string(&Definition::of(&fixed)).unwrap();
        assert!(!json.contains("window"), "{json}");
        let back: Definition = serde_json::from_str(&json).unwrap();
        assert_eq!(back.budget().unwrap().window, WindowShape::Fixed);
        let bad = json.replace("\"offline\"", "\"window\":\"rolling\",\"offline\"");
        let d: Definition = serde_json::from_str(&bad).unwrap();
        let msg = d.budget().unwrap_err().to_string();
        assert!(
            msg.contains("runtime budget tag:t") && msg.contains("rolling"),
            "{msg}"
        );
    }

    #[test]
    fn the_base_config_shadows_a_runtime_budget_of_its_series() {
        let day: Period = "1d".parse().unwrap();
        let base = Config::new().budget("openai", Money::from_nanos(5), day);
        let runtime = [
            BudgetConfig::new(Scope::Provider, "openai", Money::from_nanos(9), day),
            BudgetConfig::new(
                Scope::Provider,
                "openai",
                Money::from_nanos(9),
                "1h".parse().unwrap(),
            ),
            BudgetConfig::new(Scope::Tag, "a", Money::from_nanos(1), day),
        ];
        let m = merge(&base, runtime);
        assert_eq!(m.shadowed, ["provider \"openai\" (1d)"]);
        let limits: Vec<(String, u64)> = m
            .config
            .budgets
            .iter()
            .map(|b| (b.label(), b.limit.as_nanos()))
            .collect();
        assert_eq!(
            limits,
            [
                ("provider \"openai\" (1d)".to_owned(), 5),
                ("provider \"openai\" (1h)".to_owned(), 9),
                ("tag \"a\" (1d)".to_owned(), 1),
            ]
        );
    }
}
