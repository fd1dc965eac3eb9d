//! [`ConfigError`]: what is wrong with a configuration, on one line naming the key path.

use std::path::PathBuf;

use crate::model::money::MoneyError;
use crate::model::text::redact_urls;
use crate::model::window::PeriodError;

use super::env::ENV_MARKER;
use crate::model::key::provider_name_fault;
use crate::model::text::one_line;

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

pub(super) fn syntax<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> ConfigError {
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
pub(super) fn parser_message(path: &str, message: &str) -> String {
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

/// ` (os.environ/NAME)` when a limit came from the environment; nothing otherwise (the
/// amount's own error quotes the value).
pub(super) fn written_as(value: &str) -> String {
    if value.starts_with(ENV_MARKER) {
        format!(" ({value})")
    } else {
        String::new()
    }
}

/// The reason [`ConfigError::ProviderName`] gives.
pub(super) fn provider_name_problem(name: &str) -> String {
    provider_name_fault(name).unwrap_or_else(|| "reserved".into())
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
