//! One budget identity: [`BudgetKey`] (scope, name, period part). The slot table
//! ([`super::slots::SlotKeys`]) holds one per slot; the sled key parts and the Redis keys of a
//! budget are derived here and nowhere else, and no code parses a scope back out of a string
//! (stored data is mapped back to a budget by looking its key text up in the slot table).
//!
//! # Layout (unchanged since the first release; data dirs and Redis keys open as they are)
//!
//! * the **key name** ([`BudgetKey::key_name`]): the provider name as it is for provider
//!   budgets (so data dirs and Redis keys written before scopes existed keep working, no
//!   migration), `scope:name` for the other scopes (`tag:team-a`, `deployment:gpt4o-east`,
//!   `model:gpt-4o`, `team:research`, `key:9f86d0…`). Provider names may not contain `:`, so
//!   no provider can ever collide with a scoped key;
//! * the **period part**: the period as written (`1d`), followed by `@Zone` when the budget has
//!   its own `time_zone` and the period is a calendar one (`d`, `w`, `mo`): a day in Berlin is
//!   another series than a day in New York;
//! * a budget's **credit series** (corrections, [`BudgetKey::credit`]): the period part with
//!   `#credit` appended (`1d#credit`) in sled; in Redis the suffix follows the budget's hash
//!   tag (`{prefix}:{openai:1d}#credit:…`), so both share one Cluster slot;
//! * sled: `key name 0x00 period part 0x00 start` (module `durable::store`);
//! * Redis: `{prefix}:{key name:period part}:…` ([`BudgetKey::redis_tag`]), the braces being
//!   the budget's Redis Cluster hash tag.
//!
//! Every name may contain neither `{`, `}` (Redis hash-tag delimiters) nor control characters
//! (NUL separates sled key parts); periods never contain `:`, so a key reads back unambiguously.

use crate::model::budget::Scope;
use crate::model::window::Period;

/// The identity of one budget series: what it applies to, and its period part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BudgetKey {
    /// What the budget applies to.
    pub scope: Scope,
    /// The provider, deployment id, model, tag or identity name (key, user, team, org, customer).
    pub name: String,
    /// The period as written, with `@Zone` when the budget has its own zone and the period is
    /// a calendar one.
    pub period_part: String,
}

impl BudgetKey {
    pub fn new(scope: Scope, name: impl Into<String>, period_part: impl Into<String>) -> Self {
        BudgetKey {
            scope,
            name: name.into(),
            period_part: period_part.into(),
        }
    }

    /// The key of a budget over `period`, in `zone` when it has its own.
    pub fn of(scope: Scope, name: &str, period: Period, zone: Option<&str>) -> Self {
        let mut period_part = period.to_string();
        if let Some(zone) = zone {
            if period.is_calendar() {
                period_part.push('@');
                period_part.push_str(zone);
            }
        }
        BudgetKey::new(scope, name, period_part)
    }

    /// The same key for a budget counting `unit`: the period part gains `~unit` (`1m~tokens`),
    /// except for USD, whose keys are those written before units existed.
    pub fn in_unit(mut self, unit: crate::model::unit::Unit) -> Self {
        self.period_part.push_str(unit.key_suffix());
        self
    }

    /// The unit a period part names (USD without a suffix).
    pub fn unit(&self) -> crate::model::unit::Unit {
        let part = self
            .period_part
            .strip_suffix(CREDIT)
            .unwrap_or(&self.period_part);
        crate::model::unit::Unit::ALL
            .into_iter()
            .rev()
            .find(|u| !u.key_suffix().is_empty() && part.ends_with(u.key_suffix()))
            .unwrap_or_default()
    }

    /// The period part without its unit suffix (what status shows as `period`).
    pub fn period_shown(&self) -> &str {
        let suffix = self.unit().key_suffix();
        self.period_part
            .strip_suffix(suffix)
            .unwrap_or(&self.period_part)
    }

    /// The key name: the provider name as it is, `scope:name` otherwise (see the module doc).
    pub fn key_name(&self) -> String {
        match self.scope {
            Scope::Provider => self.name.clone(),
            other => format!("{}:{}", other.as_str(), self.name),
        }
    }

    /// (key name, period part): the sled key's first two parts.
    pub fn store_parts(&self) -> (String, String) {
        (self.key_name(), self.period_part.clone())
    }

    /// `{prefix}:{{key name:period part}}`: the one place where a budget's identity becomes
    /// Redis key text, the braces being the budget's Redis Cluster hash tag.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn redis_tag(&self, prefix: &str) -> String {
        // A credit series shares its budget's hash tag (the suffix goes after the braces), so
        // both live on one Redis Cluster master and a master that is down affects a budget
        // only through the master it was already on.
        match self.period_part.strip_suffix(CREDIT) {
            Some(period) => format!("{prefix}:{{{}:{period}}}{CREDIT}", self.key_name()),
            None => format!("{prefix}:{{{}:{}}}", self.key_name(), self.period_part),
        }
    }
}

impl BudgetKey {
    /// The budget's field in the runtime definitions (`{scope}:{name}:{period part}`, e.g.
    /// `tag:team-a:1d`): the sled key of the `definitions` tree and the field of the Redis
    /// definitions hash. Every scope is written out (providers too), so it reads back
    /// unambiguously: the scope ends at the first `:` (no scope has one), the period part
    /// starts after the last (no period part has one).
    pub fn definition_field(&self) -> String {
        format!("{}:{}:{}", self.scope.as_str(), self.name, self.period_part)
    }
}

/// What ends the period part of a credit series: no period or zone contains `#`.
pub(crate) const CREDIT: &str = "#credit";

impl BudgetKey {
    /// The key of this budget's credit series (corrections): the same scope and name, the
    /// period part followed by `#credit`. Its per-node totals only grow, like spend's; the
    /// budget counts spend net of them (a PN-counter of two grow-only counters).
    pub fn credit(&self) -> BudgetKey {
        BudgetKey::new(
            self.scope,
            self.name.clone(),
            format!("{}{CREDIT}", self.period_part),
        )
    }
}

/// Why a scope name is refused, if it is: it must fit in the key layout (see the module doc;
/// provider names have their own, stricter rule).
pub(crate) fn scoped_name_fault(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("it is empty".into());
    }
    let bad = name
        .chars()
        .find(|&c| matches!(c, '{' | '}') || c.is_control())?;
    Some(match bad {
        '{' | '}' => format!("it contains {bad:?} (a Redis key delimiter)"),
        c => format!("it contains control character {c:?}"),
    })
}

/// What is wrong with a provider name, if anything.
pub(crate) fn provider_name_fault(name: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_never_collide_with_providers() {
        assert_eq!(
            BudgetKey::new(Scope::Provider, "openai", "1d").key_name(),
            "openai"
        );
        assert_eq!(
            BudgetKey::new(Scope::Tag, "openai", "1d").key_name(),
            "tag:openai"
        );
        for s in Scope::ALL {
            let k = BudgetKey::new(s, "a:b", "1d");
            if s != Scope::Provider {
                assert_eq!(k.key_name(), format!("{s}:a:b"));
            }
        }
        // A provider name never contains ':' (config refuses it), so "tag:x" is never one.
        assert!(provider_name_fault("tag:x").is_some());
    }

    #[test]
    fn identity_scopes_key_like_the_other_scopes() {
        let k = BudgetKey::new(Scope::Team, "research", "1mo");
        assert_eq!(k.key_name(), "team:research");
        assert_eq!(k.redis_tag("pb"), "pb:{team:research:1mo}");
        assert_eq!(
            BudgetKey::new(Scope::Customer, "cust:42", "1h").key_name(),
            "customer:cust:42"
        );
    }

    #[test]
    fn period_parts_and_redis_tags() {
        let day: Period = "1d".parse().unwrap();
        let hour: Period = "1h".parse().unwrap();
        let k = BudgetKey::of(Scope::Tag, "team-a", day, Some("Europe/Berlin"));
        assert_eq!(k.period_part, "1d@Europe/Berlin");
        assert_eq!(k.redis_tag("pb"), "pb:{tag:team-a:1d@Europe/Berlin}");
        assert_eq!(
            k.credit().redis_tag("pb"),
            "pb:{tag:team-a:1d@Europe/Berlin}#credit"
        );
        let k = BudgetKey::of(Scope::Provider, "openai", hour, Some("Europe/Berlin"));
        assert_eq!(k.store_parts(), ("openai".into(), "1h".into()));
        assert_eq!(k.definition_field(), "provider:openai:1h");
        let k = BudgetKey::of(Scope::Tag, "product:chat", day, Some("Europe/Berlin"));
        assert_eq!(k.definition_field(), "tag:product:chat:1d@Europe/Berlin");
    }
}
