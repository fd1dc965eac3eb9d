//! Configuration that would silently do something else, through the real binary: duplicate
//! keys, provider names that can never match, wrongly shaped limits, paths printed twice,
//! `redis.url` left to `--redis`, `os.environ/NAME` values, the `PROVIDER_BUDGETS_*` variables,
//! passwords in error lines, and `ingest --redis` whose sync fails. Each bad config is exactly
//! one `error:` line naming the file once and the culprit, exit 1, and recorded spend survives.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::cli;
use provider_budgets_test_support::redis_server;

use std::io::Write;
use std::process::{Command, Stdio};

use cli::{bare_cmd, budget, Cli, Run};
use redis_server::RedisServer;

const ONE_DOLLAR_A_DAY: &str =
    "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n";
const NOW: &str = "2024-05-01T12:00:00Z";
/// Loopback port 1: refused at once.
const DEAD_REDIS: &str = "redis://127.0.0.1:1/";
const ENV_FLAGS: [&str; 4] = [
    "PROVIDER_BUDGETS_CONFIG",
    "PROVIDER_BUDGETS_DATA_DIR",
    "PROVIDER_BUDGETS_REDIS",
    "PROVIDER_BUDGETS_NODE_ID",
];

/// A command without any `PROVIDER_BUDGETS_*` variable inherited from the test's environment.
fn clean(mut c: Command) -> Command {
    for v in ENV_FLAGS {
        c.env_remove(v);
    }
    c
}

fn run(c: Command) -> Run {
    let mut c = c;
    Run::of(c.output().unwrap())
}

/// Writes `text` as `name` and runs `status` with it: the one error line.
fn refused(cli: &Cli, name: &str, text: &str, culprits: &[&str]) -> Run {
    let path = cli.write_config(name, text);
    let r = run(clean(cli.cmd_with(&path, &["--now", NOW, "status"])));
    r.assert_error(1, culprits);
    assert_eq!(
        r.stderr.matches(name).count(),
        1,
        "the file is named once: {r:?}"
    );
    r
}

#[test]
fn duplicate_keys_are_refused_naming_the_key() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    cli.run(&["--now", NOW, "record", "openai", "0.25"])
        .assert_ok();
    // YAML keeps the last of two equal keys: the first budget vanished without a word.
    refused(
        &cli,
        "dup.yaml",
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n  anthropic: {budget_limit: 2, time_period: 1d}\n  openai: {budget_limit: 500, time_period: 1d}\n",
        &["provider_budget_config", "\"openai\"", "more than once"],
    );
    refused(
        &cli,
        "nested.yaml",
        "router_settings:\n  provider_budget_config:\n    openai: {budget_limit: 1, time_period: 1d}\n    openai: {budget_limit: 5, time_period: 1h}\n",
        &["router_settings.provider_budget_config", "\"openai\""],
    );
    refused(
        &cli,
        "json.yaml",
        r#"{"provider_budget_config": {"openai": {"budget_limit": 1, "time_period": "1d"}, "openai": {"budget_limit": 9, "time_period": "1d"}}}"#,
        &["\"openai\"", "more than once"],
    );
    refused(
        &cli,
        "prefixes.yaml",
        "provider_budgets:\n  model_providers:\n    \"llama-\": together\n    \"llama-\": groq\n",
        &[
            "provider_budgets.model_providers",
            "\"llama-\"",
            "more than once",
        ],
    );
    // A field twice is refused too (serde's own check), in our section and in an entry.
    refused(
        &cli,
        "field.yaml",
        "provider_budget_config:\n  openai: {budget_limit: 1, budget_limit: 7, time_period: 1d}\n",
        &["provider_budget_config.openai", "budget_limit"],
    );
    // A misspelt top-level key would be ignored as litellm's: no budget at all, silently.
    refused(
        &cli,
        "typo.yaml",
        "provider_budget_confg:\n  openai: {budget_limit: 1, time_period: 1d}\n",
        &[
            "\"provider_budget_confg\"",
            "did you mean \"provider_budget_config\"",
        ],
    );
    refused(
        &cli,
        "typo.toml",
        "[router_settings.provider-budget-config.openai]\nbudget_limit = 1\ntime_period = \"1d\"\n",
        &[
            "\"provider-budget-config\"",
            "did you mean \"provider_budget_config\"",
        ],
    );
    // TOML refuses duplicate tables and keys itself; the line still names the table.
    refused(
        &cli,
        "dup.toml",
        "[provider_budget_config.openai]\nbudget_limit = 1\ntime_period = \"1d\"\n[provider_budget_config.openai]\nbudget_limit = 2\ntime_period = \"1d\"\n",
        &["duplicate", "provider_budget_config.openai"],
    );
    refused(
        &cli,
        "prefixes.toml",
        "[provider_budgets.model_providers]\n\"llama-\" = \"together\"\n\"llama-\" = \"groq\"\n",
        &["duplicate", "llama-"],
    );
    assert_eq!(cli.spend_nanos(NOW, "openai"), 250_000_000);
}

#[test]
fn provider_names_that_can_never_match_are_refused() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let cases: &[(&str, &[&str])] = &[
        // `azure/gpt-4o` resolves to `azure`: a budget for "azure/gpt-4o" never applies.
        ("\"azure/gpt-4o\"", &["\"azure/gpt-4o\"", "'/'"]),
        // `ingest` splits at whitespace: this budget could never be fed.
        ("\"open ai\"", &["\"open ai\"", "whitespace"]),
        ("\"openai\\t\"", &["\"openai\\t\"", "whitespace"]),
        (
            "\"open\\u0007ai\"",
            &["\"open\\u{7}ai\"", "control character"],
        ),
        // Today's rules still hold.
        ("\"\"", &["\"\"", "empty"]),
        ("\"openai:eu\"", &["\"openai:eu\"", "':'"]),
        ("\"{openai}\"", &["\"{openai}\""]),
        ("\"open\\0ai\"", &["\"open\\0ai\""]),
    ];
    for (i, (name, culprits)) in cases.iter().enumerate() {
        let mut all = vec!["provider name", "not allowed"];
        all.extend_from_slice(culprits);
        refused(
            &cli,
            &format!("name{i}.yaml"),
            &format!("provider_budget_config:\n  {name}: {{budget_limit: 1, time_period: 1d}}\n"),
            &all,
        );
    }
    // The same rules for the providers `model_providers` maps prefixes to.
    refused(
        &cli,
        "mapped.yaml",
        "provider_budgets:\n  model_providers:\n    \"llama-\": \"together ai\"\n",
        &[
            "provider_budgets.model_providers",
            "\"llama-\"",
            "\"together ai\"",
            "whitespace",
        ],
    );
    refused(
        &cli,
        "mapped.toml",
        "[provider_budgets.model_providers]\n\"llama-\" = \"meta/together\"\n",
        &[
            "provider_budgets.model_providers",
            "\"meta/together\"",
            "'/'",
        ],
    );
    // A prefix the built-in table or the `provider/` split always answers first never applies.
    refused(
        &cli,
        "shadowed.yaml",
        "provider_budgets:\n  model_providers:\n    \"gpt-4o-mini\": azure\n",
        &[
            "provider_budgets.model_providers",
            "\"gpt-4o-mini\" can never match",
            "\"gpt-\"",
        ],
    );
    refused(
        &cli,
        "slashed.yaml",
        "provider_budgets:\n  model_providers:\n    \"meta/llama\": together\n",
        &["\"meta/llama\" can never match"],
    );
}

#[test]
fn wrongly_shaped_limits_name_the_provider_in_plain_words() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let entry = |body: &str| format!("provider_budget_config:\n  openai: {body}\n");
    let limit = "provider_budget_config.openai.budget_limit";
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            entry("{budget_limit: null, time_period: 1d}"),
            vec![limit, "must be a number or a decimal string, got null"],
        ),
        (
            entry("{budget_limit: ~, time_period: 1d}"),
            vec![limit, "got null"],
        ),
        (
            entry("{budget_limit: [1], time_period: 1d}"),
            vec![limit, "got a list"],
        ),
        (
            entry("{budget_limit: {usd: 1}, time_period: 1d}"),
            vec![limit, "got a map"],
        ),
        (
            entry("{budget_limit: true, time_period: 1d}"),
            vec![limit, "got true"],
        ),
        (
            entry("{time_period: 1d}"),
            vec![
                "provider_budget_config.openai",
                "missing field `budget_limit`",
            ],
        ),
        (
            entry("{budget_limit: 1}"),
            vec![
                "provider_budget_config.openai",
                "missing field `time_period`",
            ],
        ),
        (
            entry("{budget_limit: 1, time_period: [1d]}"),
            vec!["provider_budget_config.openai.time_period", "sequence"],
        ),
        (
            entry("null"),
            vec![
                "provider_budget_config.openai",
                "null",
                "a map with budget_limit and time_period",
            ],
        ),
        (
            entry("5"),
            vec!["provider_budget_config.openai", "integer `5`"],
        ),
        (
            "provider_budgets:\n  storage: [dir]\n".into(),
            vec!["provider_budgets.storage", "expected a map"],
        ),
    ];
    for (i, (text, culprits)) in cases.iter().enumerate() {
        let r = refused(&cli, &format!("shape{i}.yaml"), text, culprits);
        for internal in ["Raw", "untagged", "unit value", "struct", "Option value"] {
            assert!(!r.stderr.contains(internal), "{internal:?} leaks: {r:?}");
        }
    }
    let r = refused(
        &cli,
        "shape.toml",
        "[provider_budget_config.openai]\nbudget_limit = [1]\ntime_period = \"1d\"\n",
        &[limit, "got a list"],
    );
    assert!(!r.stderr.contains("Raw"), "{r:?}");
}

#[test]
fn every_config_error_names_its_path_once() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let cases: &[(&str, &str, &str)] = &[
        (
            "redis_type.yaml",
            "provider_budgets:\n  redis: [a]\n",
            "provider_budgets.redis",
        ),
        (
            "storage_field.yaml",
            "provider_budgets:\n  storage:\n    max_dely: 2ms\n",
            "provider_budgets.storage",
        ),
        (
            "delay.yaml",
            "provider_budgets:\n  storage:\n    max_delay: soon\n",
            "provider_budgets.storage.max_delay",
        ),
        (
            "unknown.yaml",
            "provider_budgets:\n  unknown_provider: maybe\n",
            "provider_budgets.unknown_provider",
        ),
        (
            "anchor.yaml",
            "provider_budgets:\n  window_anchor: monday\n",
            "provider_budgets.window_anchor",
        ),
        (
            "missing.yaml",
            "provider_budget_config:\n  openai: {time_period: 1d}\n",
            "provider_budget_config.openai",
        ),
        (
            "block.yaml",
            "provider_budget_config: 5\n",
            "provider_budget_config",
        ),
    ];
    for (name, text, path) in cases {
        let r = refused(&cli, name, text, &[path]);
        assert_eq!(
            r.stderr.matches(path).count(),
            1,
            "{path} is printed more than once: {r:?}"
        );
    }
}

#[test]
fn redis_url_may_come_from_the_command_line_only() {
    let yaml = format!(
        "{ONE_DOLLAR_A_DAY}provider_budgets:\n  redis: {{prefix: fleet-a, sync_interval: 5s}}\n"
    );
    let cli = Cli::new(&yaml);
    // No URL anywhere: the key is named, nothing is opened.
    let r = run(clean(cli.cmd(&["--now", NOW, "status"])));
    r.assert_error(1, &["provider_budgets.redis.url", "--redis", "config.yaml"]);
    assert!(!cli.data.exists(), "nothing opened without a URL");
    // The flag, or its variable, completes the file's section.
    let by_flag = clean(cli.cmd(&["--redis", DEAD_REDIS, "--now", NOW, "status", "--json"]));
    let mut by_env = clean(cli.cmd(&["--now", NOW, "status", "--json"]));
    by_env.env("PROVIDER_BUDGETS_REDIS", DEAD_REDIS);
    for c in [by_flag, by_env] {
        let r = run(c);
        assert_eq!(r.code, Some(0), "{r:?}");
        assert!(
            r.stderr.starts_with("warning: ") && r.stderr.lines().count() == 1,
            "{r:?}"
        );
        let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(budget(&doc, "openai")["replication"]["enabled"], true);
    }
}

#[test]
fn global_flags_come_from_the_environment_and_flags_win() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let other = cli.tmp.path().join("other-data");
    let env_cmd = |args: &[&str]| {
        let mut c = clean(bare_cmd());
        c.env("PROVIDER_BUDGETS_CONFIG", &cli.config)
            .env("PROVIDER_BUDGETS_DATA_DIR", &cli.data)
            .env("PROVIDER_BUDGETS_NODE_ID", "edge-env")
            .args(args);
        c
    };
    run(env_cmd(&["--now", NOW, "record", "openai", "0.5"])).assert_ok();
    let r = run(env_cmd(&["--now", NOW, "status", "--json"]));
    r.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["node_id"], "edge-env");
    assert_eq!(budget(&doc, "openai")["spend_nanos"], 500_000_000);
    // The variables' data dir is the flags' data dir: same spend.
    assert_eq!(cli.spend_nanos(NOW, "openai"), 500_000_000);

    // Flags win over variables.
    let r = run(env_cmd(&[
        "--data-dir",
        other.to_str().unwrap(),
        "--node-id",
        "edge-flag",
        "--now",
        NOW,
        "status",
        "--json",
    ]));
    r.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["node_id"], "edge-flag");
    assert_eq!(budget(&doc, "openai")["spend_nanos"], 0);
    let missing = cli.tmp.path().join("missing.yaml");
    let r = run(env_cmd(&["--config", missing.to_str().unwrap(), "status"]));
    r.assert_error(1, &["missing.yaml"]);

    // A bad value names where it came from: the variable, or the flag.
    let mut c = env_cmd(&["--now", NOW, "status"]);
    c.env("PROVIDER_BUDGETS_NODE_ID", "edge 7");
    run(c).assert_error(1, &["PROVIDER_BUDGETS_NODE_ID", "\"edge 7\""]);
    run(env_cmd(&["--node-id", "edge 8", "--now", NOW, "status"]))
        .assert_error(1, &["--node-id", "\"edge 8\""]);

    // An empty variable counts as unset: no replication, no empty URL.
    let mut c = env_cmd(&["--now", NOW, "status", "--json"]);
    c.env("PROVIDER_BUDGETS_REDIS", "");
    let r = run(c);
    r.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(budget(&doc, "openai")["replication"]["enabled"], false);
    // Without the config anywhere it is a usage error naming the flag.
    let mut c = clean(bare_cmd());
    c.env("PROVIDER_BUDGETS_CONFIG", "").args(["status"]);
    run(c).assert_error(2, &["--config"]);

    // The Redis variable reaches the limiter (replication on, unreachable: a warning).
    let mut c = env_cmd(&["--now", NOW, "status", "--json"]);
    c.env("PROVIDER_BUDGETS_REDIS", DEAD_REDIS);
    let r = run(c);
    assert_eq!(r.code, Some(0), "{r:?}");
    assert!(r.stderr.starts_with("warning: "), "{r:?}");
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(budget(&doc, "openai")["replication"]["enabled"], true);

    // --help names the variables but never prints the Redis one's value (a password).
    let mut c = clean(bare_cmd());
    c.env("PROVIDER_BUDGETS_REDIS", "redis://:hunter2@127.0.0.1:1/")
        .arg("--help");
    let r = run(c);
    assert_eq!(r.code, Some(0), "{r:?}");
    for v in ENV_FLAGS {
        assert!(r.stdout.contains(v), "--help does not name {v}: {r:?}");
    }
    assert!(!r.stdout.contains("hunter2"), "password in --help: {r:?}");
}

#[test]
fn os_environ_values_are_read_like_litellm() {
    let yaml = "model_list:\n  - model_name: gpt-4o\n    litellm_params: {model: gpt-4o, api_key: os.environ/NOT_OURS_IGNORED}\nprovider_budget_config:\n  openai: {budget_limit: os.environ/PB_TEST_OPENAI_LIMIT, time_period: os.environ/PB_TEST_PERIOD}\nprovider_budgets:\n  node_id: os.environ/PB_TEST_NODE\n";
    let cli = Cli::new(yaml);
    let with_env = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = clean(cli.cmd(args));
        for (k, v) in env {
            c.env(k, v);
        }
        c.env_remove("NOT_OURS_IGNORED");
        run(c)
    };
    let all = [
        ("PB_TEST_OPENAI_LIMIT", "2.5"),
        ("PB_TEST_PERIOD", "1h"),
        ("PB_TEST_NODE", "edge-from-env"),
    ];
    let r = with_env(&["--now", NOW, "status", "--json"], &all);
    r.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["node_id"], "edge-from-env");
    let b = budget(&doc, "openai");
    assert_eq!(b["limit_nanos"], 2_500_000_000u64);
    assert_eq!(b["period"], "1h");
    assert_eq!(b["window_start"], "2024-05-01T12:00:00Z");

    // A missing variable names the key path and the variable, once, in one line.
    let r = with_env(&["--now", NOW, "status"], &all[..1]);
    r.assert_error(
        1,
        &[
            "config.yaml",
            "provider_budget_config.openai.time_period",
            "PB_TEST_PERIOD",
            "not set",
        ],
    );
    let r = with_env(
        &["--now", NOW, "status"],
        &[("PB_TEST_OPENAI_LIMIT", ""), all[1], all[2]],
    );
    r.assert_error(
        1,
        &[
            "provider_budget_config.openai.budget_limit",
            "PB_TEST_OPENAI_LIMIT",
            "empty",
        ],
    );

    // A secret from the environment is never printed: the URL's variable is missing in one
    // file, and its value is refused in another; neither line shows the password.
    let secret = "redis://:s3cr3t-pw@127.0.0.1:1/";
    let path = cli.write_config(
        "url.yaml",
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  redis: {url: os.environ/PB_TEST_REDIS_URL}\n  storage: {max_delay: os.environ/PB_TEST_DELAY}\n",
    );
    let mut c = clean(cli.cmd_with(&path, &["--now", NOW, "status"]));
    c.env("PB_TEST_DELAY", "2ms");
    run(c).assert_error(
        1,
        &["provider_budgets.redis.url", "PB_TEST_REDIS_URL", "not set"],
    );
    let mut c = clean(cli.cmd_with(&path, &["--now", NOW, "status"]));
    c.env("PB_TEST_REDIS_URL", secret)
        .env("PB_TEST_DELAY", "s3cr3t-pw");
    let r = run(c);
    r.assert_error(1, &["provider_budgets.storage.max_delay", "PB_TEST_DELAY"]);
    assert!(!r.stderr.contains("s3cr3t"), "{r:?}");
}

#[test]
fn redis_passwords_in_config_errors_are_masked() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    // The parser quotes a string where a map belongs.
    let r = refused(
        &cli,
        "string.yaml",
        "provider_budgets:\n  redis: \"redis://admin:hunter2@10.0.0.1:6379/0\"\n",
        &[
            "provider_budgets.redis",
            "redis://admin:***@10.0.0.1:6379/0",
        ],
    );
    assert!(!r.stderr.contains("hunter2"), "{r:?}");
    // TOML draws the offending line.
    let r = refused(
        &cli,
        "syntax.toml",
        "[provider_budgets.redis]\nurl = \"redis://:hunter2@10.0.0.1:6379/\" oops\n",
        &["syntax.toml"],
    );
    assert!(!r.stderr.contains("hunter2"), "{r:?}");
}

/// `ingest ARGS` with `input` on stdin.
fn ingest(cli: &Cli, args: &[&str], input: &str) -> Run {
    let mut all = args.to_vec();
    all.push("ingest");
    let mut child = clean(cli.cmd(&all))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    Run::of(child.wait_with_output().unwrap())
}

#[test]
fn ingest_with_redis_fails_when_its_sync_fails_and_keeps_the_spend() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let input = format!("openai 0.25 {NOW}\nopenai 0.5 {NOW}\n");
    let r = ingest(&cli, &["--redis", DEAD_REDIS, "--now", NOW], &input);
    r.assert_error(4, &["recorded locally; do not retry", "redis"]);
    assert_eq!(r.stdout, "ok 2\n", "acknowledged before the sync: {r:?}");
    assert_eq!(cli.spend_nanos(NOW, "openai"), 750_000_000);
}

#[test]
fn ingest_with_redis_ships_its_spend_and_reports_a_dead_server() {
    let Some(mut server) = RedisServer::start() else {
        return; // no redis-server here (CI fails inside start instead)
    };
    let url = server.url();
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 10, time_period: 1d}\n";
    let a = Cli::new(yaml);
    let b = Cli::new(yaml);
    // Redis keys expire at window end + grace, in real time: use a current window.
    let now = jiff::Timestamp::now().to_string();
    let now = now.as_str();
    let args = ["--redis", url.as_str(), "--now", now];
    let r = ingest(&a, &args, "openai 1.5\nopenai 0.25\n");
    r.assert_ok();
    assert_eq!(r.stdout, "ok 2\n");
    // Another node, another data dir: its status syncs and sees A's spend.
    let status = |cli: &Cli| {
        let r = run(clean(cli.cmd(&[
            "--redis",
            url.as_str(),
            "--now",
            now,
            "status",
            "--json",
        ])));
        r.assert_ok();
        let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        budget(&doc, "openai")["spend_nanos"].as_u64().unwrap()
    };
    assert_eq!(status(&b), 1_750_000_000);

    // Redis dies: ingest still records and acknowledges, then says so and exits 4.
    server.kill();
    let r = ingest(&a, &args, "openai 2\n");
    r.assert_error(4, &["recorded locally; do not retry", "redis"]);
    assert_eq!(r.stdout, "ok 1\n");
    assert_eq!(a.spend_nanos(now, "openai"), 3_750_000_000);
    // Back up (empty: persistence is off): A's next sync restores its whole total.
    server.restart();
    let r = run(clean(a.cmd(&[
        "--redis",
        url.as_str(),
        "--now",
        NOW,
        "sync",
    ])));
    r.assert_ok();
    assert_eq!(status(&b), 3_750_000_000);
}

#[test]
fn a_library_limiter_refuses_a_redis_section_without_url() {
    use provider_budgets::{Config, ConfigError, Error, Limiter};
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_yaml_str(&format!(
        "{ONE_DOLLAR_A_DAY}provider_budgets:\n  redis: {{prefix: fleet}}\n"
    ))
    .unwrap()
    .data_dir(dir.path().join("data"));
    let err = Limiter::open(config).expect_err("no URL");
    assert!(
        matches!(err, Error::Config(ConfigError::NoRedisUrl)),
        "{err}"
    );
    assert!(
        err.to_string().contains("provider_budgets.redis.url"),
        "{err}"
    );
}
