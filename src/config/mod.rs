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
//!   pricing: { catalog: builtin, unpriced: deny }   # cost from usage: docs/guide/pricing.md
//!   alerts: { webhooks: [{url: "http://127.0.0.1:9000/hook", format: json}], lead_time: 1h }
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

mod alerts;
mod env;
mod error;
mod fields;
mod litellm;
mod own;
mod parse;
mod pricing;
pub(crate) mod runtime;
mod schema;
mod validate;
mod values;

pub use alerts::{AlertsConfig, Webhook, WebhookFormat};
pub use error::ConfigError;
pub use fields::BudgetFields;
pub use schema::{
    BudgetConfig, Config, RedisConfig, RedisTls, StorageConfig, UnknownProvider, CONCURRENT_PERIOD,
    DEFAULT_MAX_SERIES, MAX_MAX_SERIES, TEMPLATE_NAME,
};
pub use values::parse_duration;

#[cfg(test)]
pub(crate) mod testing {
    use super::Config;

    pub(crate) fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'static {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    pub(crate) fn yaml_err(text: &str) -> String {
        let e = Config::from_yaml_str_with_env(text, env(&[])).expect_err(text);
        let msg = e.to_string();
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }
}
