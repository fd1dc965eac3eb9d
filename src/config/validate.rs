//! What the type system cannot check: names that can never match, duplicates, node ids, time
//! zones, prefixes and ranges ([`Config::validate`]).

use crate::model::budget::{Enforcement, Scope, WindowShape, MAX_SOFT_LIMITS};

use super::error::{provider_name_problem, ConfigError};
use super::schema::{BudgetConfig, Config, MAX_MAX_SERIES, TEMPLATE_NAME};
use crate::model::key::provider_name_fault;

impl Config {
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
            if r.grant_lease.is_none() {
                if let Some(b) = self.budgets.iter().find(|b| {
                    b.unit == crate::model::unit::Unit::Concurrent
                        && b.enforcement == crate::model::budget::Enforcement::Strict
                }) {
                    // A concurrent budget has one window of 100 years: without the lease, a
                    // dead node's grant (its slots) would be stranded for all of it.
                    return Err(ConfigError::Invalid {
                        key: "provider_budgets.redis.grant_lease",
                        message: format!(
                            "required by the strict concurrent budget {}: a dead node's slots come back only when its grant is reclaimed (e.g. 3 sync intervals plus connect_timeout and command_timeout: 7s with the defaults)",
                            b.label()
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
}

/// What `validate` checks per budget: its name for its scope, its zone, its soft limits.
pub(super) fn check_budget(b: &BudgetConfig) -> Result<(), ConfigError> {
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
    if let Some(why) = max_series_fault(b) {
        return Err(refuse(why));
    }
    if let Some(zone) = &b.time_zone {
        if jiff::tz::TimeZone::get(zone).is_err() {
            return Err(refuse(format!(
                "time_zone: unknown time zone {zone:?} (an IANA name such as America/New_York or Europe/Berlin)"
            )));
        }
    }
    // Why refused: a strict grant covers one window, and no grant can yet leave room for
    // the weighted previous window (see docs/strict-budgets.md).
    if b.window == WindowShape::Sliding && b.enforcement == Enforcement::Strict {
        return Err(refuse(
            "window: sliding is not supported with enforcement: strict".into(),
        ));
    }
    if b.window == WindowShape::Sliding && b.unit == crate::model::unit::Unit::Concurrent {
        return Err(refuse(
            "window: sliding does not apply to unit: concurrent (it has no period)".into(),
        ));
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

/// Why a budget's `max_series` is refused, if it is: only a template has live series to
/// bound, and the bound must be at least 1 and at most [`MAX_MAX_SERIES`].
fn max_series_fault(b: &BudgetConfig) -> Option<String> {
    let n = b.max_series?;
    if !b.is_template() {
        return Some(format!(
            "max_series: only a template (name {TEMPLATE_NAME:?}) has series to bound"
        ));
    }
    (n == 0 || n > MAX_MAX_SERIES)
        .then(|| format!("max_series: {n} is not in 1..={MAX_MAX_SERIES}"))
}

/// Why a `model_providers` prefix can never take effect, if so: resolution tries a
/// `provider/model` split and the built-in table first (module `resolve`), so a prefix with
/// a `/` after its first character, or one that extends a built-in prefix, would be ignored
/// without a word.
pub(super) fn unreachable_prefix(prefix: &str) -> Option<String> {
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

pub(super) fn check_node_id(id: &str) -> Result<(), ConfigError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::yaml_err;

    use crate::model::money::Money;

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

    #[test]
    fn the_window_key_is_read_in_every_block_and_a_bad_value_names_its_budget() {
        let c = Config::from_yaml_str(
            "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d, window: sliding}\n  azure: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  budgets:\n    - {tag: a, limit: 1, period: 1h, window: sliding}\n    - {tag: b, limit: 1, period: 1h, window: fixed}\n",
        )
        .unwrap();
        let shape = |name: &str| c.budgets.iter().find(|b| b.name == name).unwrap().window;
        assert_eq!(shape("openai"), WindowShape::Sliding);
        assert_eq!(shape("azure"), WindowShape::Fixed);
        assert_eq!(shape("a"), WindowShape::Sliding);
        assert_eq!(shape("b"), WindowShape::Fixed);
        for (doc, words) in [
            (
                "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d, window: rolling}\n",
                ["provider_budget_config.openai", "window", "\"rolling\""],
            ),
            (
                "provider_budgets:\n  budgets:\n    - {tag: a, limit: 1, period: 1h, window: rolling}\n",
                ["budgets[0]", "window", "\"rolling\""],
            ),
            (
                "provider_budgets:\n  budgets:\n    - {tag: a, limit: 1, period: 1h, window: sliding, enforcement: strict}\n",
                ["budgets[0]", "window: sliding", "enforcement: strict"],
            ),
            (
                "provider_budgets:\n  budgets:\n    - {tag: a, limit: 1, unit: concurrent, window: sliding}\n",
                ["budgets[0]", "window: sliding", "unit: concurrent"],
            ),
        ] {
            let msg = yaml_err(doc);
            assert!(
                !msg.contains('\n') && words.iter().all(|w| msg.contains(w)),
                "{msg}"
            );
        }
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
}
