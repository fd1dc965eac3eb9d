//! `os.environ/NAME` values: replaced by the environment variable they name, as litellm's
//! proxy does.

// ---- os.environ/NAME --------------------------------------------------------------------------

/// The marker litellm uses for a value taken from the environment.
pub(super) const ENV_MARKER: &str = "os.environ/";

pub(super) type EnvLookup = std::rc::Rc<dyn Fn(&str) -> Option<String>>;

thread_local! {
    /// The lookup of the parse running on this thread (`Deserialize` impls take no context).
    static ENV: std::cell::RefCell<Option<EnvLookup>> = const { std::cell::RefCell::new(None) };
}

/// The process environment; a value that is not UTF-8 is taken lossily (it fails its parse).
pub(super) fn env_var(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// Runs `parse` with `env` as the lookup of `os.environ/NAME` values on this thread.
pub(super) fn with_env<T>(
    env: impl Fn(&str) -> Option<String> + 'static,
    parse: impl FnOnce() -> T,
) -> T {
    struct Reset(Option<EnvLookup>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let previous = self.0.take();
            ENV.with(|e| *e.borrow_mut() = previous);
        }
    }
    let previous = ENV.with(|e| e.borrow_mut().replace(std::rc::Rc::new(env)));
    let _reset = Reset(previous);
    parse()
}

/// Expands `os.environ/NAME` like litellm: a value that starts with the marker is replaced by
/// the variable; anything else is kept. Unset or empty is an error naming the variable (the
/// caller's path names the key); the variable's content never appears in an error.
pub(super) fn expand_env(written: &str) -> Result<Option<String>, String> {
    let Some(name) = written.strip_prefix(ENV_MARKER) else {
        return Ok(None);
    };
    if name.is_empty() {
        return Err(format!("{written:?} names no environment variable"));
    }
    let lookup = ENV.with(|e| e.borrow().clone());
    let value = match lookup {
        Some(f) => f(name),
        None => env_var(name),
    };
    match value {
        Some(v) if !v.is_empty() => Ok(Some(v)),
        Some(_) => Err(format!("{written}: environment variable {name} is empty")),
        None => Err(format!("{written}: environment variable {name} is not set")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::{env, yaml_err};
    use crate::config::*;

    use crate::model::money::Money;

    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn os_environ_values_expand_like_litellm() {
        let text = "model_list:\n  - litellm_params: {api_key: os.environ/UNSET_AND_NOT_OURS}\nprovider_budget_config:\n  openai: {budget_limit: os.environ/LIMIT, time_period: os.environ/PERIOD}\nprovider_budgets:\n  node_id: os.environ/NODE\n  window_anchor: os.environ/ANCHOR\n  unknown_provider: os.environ/POLICY\n  storage: {dir: os.environ/DIR, max_delay: os.environ/DELAY}\n  redis: {url: os.environ/URL, prefix: os.environ/PREFIX}\n  model_providers: {\"llama-\": os.environ/LLAMA}\n";
        let all = [
            ("LIMIT", "0.5"),
            ("PERIOD", "1w"),
            ("NODE", "edge-9"),
            ("ANCHOR", "2024-01-01T00:00:00Z"),
            ("POLICY", "deny"),
            ("DIR", "/var/lib/budgets"),
            ("DELAY", "5ms"),
            ("URL", "redis://:pw@10.0.0.1/"),
            ("PREFIX", "fleet"),
            ("LLAMA", "together"),
        ];
        let c = Config::from_yaml_str_with_env(text, env(&all)).expect("parses");
        assert_eq!(c.budgets[0].limit, Money::from_nanos(500_000_000));
        assert_eq!(c.budgets[0].period.to_string(), "1w");
        assert_eq!(c.node_id.as_deref(), Some("edge-9"));
        assert_eq!(c.window_anchor.to_string(), "2024-01-01T00:00:00Z");
        assert_eq!(c.unknown_provider, UnknownProvider::Deny);
        assert_eq!(
            c.storage.dir.as_deref(),
            Some(Path::new("/var/lib/budgets"))
        );
        assert_eq!(c.storage.max_delay, Duration::from_millis(5));
        let r = c.redis.as_ref().expect("redis");
        assert_eq!(
            (r.url.as_str(), r.prefix.as_str()),
            ("redis://:pw@10.0.0.1/", "fleet")
        );
        assert_eq!(
            c.model_providers,
            vec![("llama-".into(), "together".into())]
        );

        // Each missing or empty variable: the key path and the variable, never a value.
        for (i, (name, _)) in all.iter().enumerate() {
            let mut some = all.to_vec();
            some.remove(i);
            let msg = Config::from_yaml_str_with_env(text, env(&some))
                .expect_err(name)
                .to_string();
            assert!(
                msg.contains(&format!(
                    "os.environ/{name}: environment variable {name} is not set"
                )),
                "{msg}"
            );
            assert!(!msg.contains("pw@"), "{msg}");
            some.insert(i, (name, ""));
            let msg = Config::from_yaml_str_with_env(text, env(&some))
                .expect_err(name)
                .to_string();
            assert!(
                msg.contains(&format!("environment variable {name} is empty")),
                "{msg}"
            );
        }
        let msg = yaml_err("provider_budgets:\n  redis: {url: os.environ/}\n");
        assert!(
            msg.contains("provider_budgets.redis.url")
                && msg.contains("names no environment variable"),
            "{msg}"
        );

        // Only a whole value starting with the marker; keys are never expanded.
        let c = Config::from_yaml_str_with_env(
            "provider_budgets:\n  node_id: \"x\"\n  storage: {dir: \"./os.environ/DIR\"}\n",
            env(&all),
        )
        .expect("parses");
        assert_eq!(
            c.storage.dir.as_deref(),
            Some(Path::new("./os.environ/DIR"))
        );
        let msg = Config::from_yaml_str_with_env(
            "provider_budget_config:\n  os.environ/NODE: {budget_limit: 1, time_period: 1d}\n",
            env(&all),
        )
        .expect_err("a key is a name")
        .to_string();
        assert!(msg.contains("\"os.environ/NODE\""), "{msg}");

        // A refused value from the environment is quoted by its variable, not its content.
        let msg = Config::from_yaml_str_with_env(
            "provider_budgets:\n  storage: {retention: os.environ/SECRET}\n",
            env(&[("SECRET", "hunter2")]),
        )
        .expect_err("not a duration")
        .to_string();
        assert!(
            msg.contains("from os.environ/SECRET") && !msg.contains("hunter2"),
            "{msg}"
        );

        // TOML too; the lookup is only in effect during its parse.
        let c = Config::from_toml_str_with_env(
            "[provider_budget_config.openai]\nbudget_limit = \"os.environ/LIMIT\"\ntime_period = \"1d\"\n",
            env(&all),
        )
        .expect("toml");
        assert_eq!(c.budgets[0].limit, Money::from_nanos(500_000_000));
        assert!(ENV.with(|e| e.borrow().is_none()));
    }
}
