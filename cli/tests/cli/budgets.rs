//! `provider-budgets budget put|delete|get`: runtime budgets from the command line, on the
//! data dir and, with `--redis`, through the fleet.

use provider_budgets_test_support::cli::Cli;
use provider_budgets_test_support::redis_server::RedisServer;

const NOW: &str = "2024-05-01T12:00:00Z";
const CONFIG: &str = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";

/// `budget` with `--now NOW`.
fn budget(cli: &Cli, args: &[&str]) -> provider_budgets_test_support::cli::Run {
    let mut all = vec!["--now", NOW, "budget"];
    all.extend_from_slice(args);
    cli.run(&all)
}

#[test]
fn budget_put_get_and_delete_change_runtime_budgets_and_keep_spend() {
    let cli = Cli::new(CONFIG);
    let put = budget(
        &cli,
        &[
            "put",
            "tag",
            "team-a",
            "--limit",
            "2",
            "--period",
            "1d",
            "--soft-limit",
            "0.5",
            "--time-zone",
            "Europe/Berlin",
        ],
    );
    put.assert_ok();
    assert!(
        put.stdout
            .starts_with("put tag \"team-a\" (1d@Europe/Berlin): limit 2 USD; version 1 by ")
            && put.stdout.trim_end().ends_with("replicated: false"),
        "{put:?}"
    );
    // A charge counts against it; the filter then refuses the tag.
    cli.run(&["--now", NOW, "charge", "gpt-4o", "2", "--tag", "team-a"])
        .assert_ok();
    let denied = cli.run(&["--now", NOW, "filter", "gpt-4o", "--tag", "team-a"]);
    assert_eq!(denied.code, Some(3), "{denied:?}");
    let got = budget(&cli, &["get", "tag", "team-a"]);
    got.assert_ok();
    assert!(
        got.stdout.contains("tag team-a 1d@Europe/Berlin in window")
            && got
                .stdout
                .contains("spend 2 of 2 USD (runtime, version 1 by "),
        "{got:?}"
    );
    let file = budget(&cli, &["get", "provider", "openai"]);
    assert!(file.stdout.contains("(config file)"), "{file:?}");

    // Delete keeps the spend: a put resumes the series.
    let gone = budget(&cli, &["delete", "tag", "team-a"]);
    gone.assert_ok();
    assert!(
        gone.stdout.starts_with(
            "deleted tag \"team-a\" (1d@Europe/Berlin): its spend is kept; version 2 by "
        ),
        "{gone:?}"
    );
    budget(&cli, &["get", "tag", "team-a"]).assert_error(1, &["no budget tag \"team-a\""]);
    budget(&cli, &["delete", "tag", "team-a"]).assert_error(1, &["no runtime budget"]);
    cli.run(&["--now", NOW, "filter", "gpt-4o", "--tag", "team-a"])
        .assert_ok();
    budget(
        &cli,
        &[
            "put",
            "tag",
            "team-a",
            "--limit",
            "5",
            "--period",
            "1d",
            "--time-zone",
            "Europe/Berlin",
        ],
    )
    .assert_ok();
    let doc = cli.status_json(NOW);
    let row = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "team-a")
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(
        (row["spend_nanos"].as_u64(), row["limit_nanos"].as_u64()),
        (Some(2_000_000_000), Some(5_000_000_000))
    );
}

#[test]
fn budget_refuses_a_budget_of_the_config_file_and_bad_fields_clearly() {
    let cli = Cli::new(CONFIG);
    // Refusals: a budget of the config file (naming the file), a bad field, a bad scope.
    let config = cli.config.display().to_string();
    budget(
        &cli,
        &[
            "put", "provider", "openai", "--limit", "1", "--period", "1d",
        ],
    )
    .assert_error(
        1,
        &[
            "provider \"openai\" (1d) is defined by the config file",
            &config,
        ],
    );
    budget(&cli, &["delete", "provider", "openai"])
        .assert_error(1, &["defined by the config file", &config]);
    budget(
        &cli,
        &["put", "tag", "x", "--limit", "abc", "--period", "1d"],
    )
    .assert_error(1, &["tag \"x\"", "limit: \"abc\""]);
    budget(
        &cli,
        &[
            "put", "tag", "x", "--limit", "1", "--period", "1d", "--mode", "loud",
        ],
    )
    .assert_error(1, &["mode: invalid value \"loud\""]);
    budget(
        &cli,
        &["put", "galaxy", "x", "--limit", "1", "--period", "1d"],
    )
    .assert_error(2, &["galaxy"]);

    let doc = cli.status_json(NOW);
    assert_eq!(
        doc["budgets"].as_array().map(Vec::len),
        Some(1),
        "nothing changed: {doc}"
    );
}

#[test]
fn budget_put_with_redis_reaches_another_node() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let (a, b) = (Cli::new(CONFIG), Cli::new(CONFIG));
    let put = a.run(&[
        "--redis",
        &url,
        "--node-id",
        "a",
        "--now",
        NOW,
        "budget",
        "put",
        "tag",
        "t",
        "--limit",
        "0",
        "--period",
        "1d",
    ]);
    put.assert_ok();
    assert!(
        put.stdout.contains("version 1 by a, replicated: true"),
        "{put:?}"
    );
    // Another data dir learns it at its first round (the command syncs before it answers).
    let denied = b.run(&[
        "--redis",
        &url,
        "--node-id",
        "b",
        "--now",
        NOW,
        "filter",
        "gpt-4o",
        "--tag",
        "t",
    ]);
    assert_eq!(denied.code, Some(3), "{denied:?}");
    let got = b.run(&["--now", NOW, "budget", "get", "tag", "t"]);
    got.assert_ok();
    assert!(got.stdout.contains("(runtime, version 1 by a)"), "{got:?}");
    // A later change anywhere beats it: version 2.
    let put = b.run(&[
        "--redis",
        &url,
        "--node-id",
        "b",
        "--now",
        NOW,
        "budget",
        "put",
        "tag",
        "t",
        "--limit",
        "1",
        "--period",
        "1d",
    ]);
    put.assert_ok();
    assert!(
        put.stdout.contains("version 2 by b, replicated: true"),
        "{put:?}"
    );
}

#[test]
fn budget_put_of_a_template_gives_each_key_its_series_across_invocations() {
    let cli = Cli::new(CONFIG);
    budget(
        &cli,
        &[
            "put",
            "key",
            "*",
            "--limit",
            "1",
            "--period",
            "1d",
            "--max-series",
            "2",
        ],
    )
    .assert_ok();
    let run = |args: &[&str]| {
        let mut all = vec!["--now", NOW];
        all.extend_from_slice(args);
        cli.run(&all)
    };
    run(&["charge", "gpt-4o", "1", "--key", "a"]).assert_ok();
    let denied = run(&["filter", "gpt-4o", "--key", "a"]);
    assert_eq!(denied.code, Some(3), "a spent its own 1 USD: {denied:?}");
    run(&["filter", "gpt-4o", "--key", "b"]).assert_ok();
    run(&["charge", "gpt-4o", "0.5", "--key", "b"]).assert_ok();
    // Each invocation reopens the data dir: a and b's series come back, c does not fit.
    let full = run(&["filter", "gpt-4o", "--key", "c"]);
    assert_eq!(full.code, Some(3), "{full:?}");
    assert!(full.stderr.contains("max_series"), "{full:?}");
    let status = run(&["status", "--json"]);
    status.assert_ok();
    assert!(
        status.stdout.contains("\"name\":\"a\"") && status.stdout.contains("\"name\":\"b\""),
        "{status:?}"
    );
    budget(
        &cli,
        &[
            "put",
            "key",
            "a",
            "--limit",
            "1",
            "--period",
            "1d",
            "--max-series",
            "2",
        ],
    )
    .assert_error(1, &["max_series: only a template"]);
}

#[test]
fn budget_put_takes_a_unit_a_whole_limit_and_no_period_for_concurrent() {
    let cli = Cli::new(CONFIG);
    let put = budget(
        &cli,
        &[
            "put", "tag", "batch", "--limit", "3", "--period", "1m", "--unit", "requests",
        ],
    );
    put.assert_ok();
    assert!(
        put.stdout
            .starts_with("put tag \"batch\" (1m~requests): limit 3 requests;"),
        "{put:?}"
    );
    let bad = budget(
        &cli,
        &[
            "put", "tag", "batch", "--limit", "2.5", "--period", "1m", "--unit", "tokens",
        ],
    );
    bad.assert_error(1, &["limit", "whole number"]);
    let bad = budget(
        &cli,
        &[
            "put",
            "tag",
            "x",
            "--limit",
            "2",
            "--period",
            "1m",
            "--unit",
            "concurrent",
        ],
    );
    bad.assert_error(1, &["period", "concurrent budget has no period"]);
    budget(
        &cli,
        &["put", "tag", "x", "--limit", "2", "--unit", "concurrent"],
    )
    .assert_ok();
    let doc = cli.status_json(NOW);
    let units: Vec<(String, String)> = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["unit"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        units.contains(&("batch".into(), "requests".into())),
        "{units:?}"
    );
    assert!(
        units.contains(&("x".into(), "concurrent".into())),
        "{units:?}"
    );
}

#[test]
fn budget_put_window_sliding_counts_the_previous_window_in_status_json() {
    let cli = Cli::new(CONFIG);
    let args = ["put", "tag", "team-s", "--limit", "1", "--period", "1h"];
    budget(&cli, &[&args[..], &["--window", "sliding"]].concat()).assert_ok();
    // Spent late in the previous hour: at the boundary all of it still counts.
    cli.run(&[
        "--now",
        "2024-05-01T11:59:00Z",
        "charge",
        "gpt-4o",
        "0.8",
        "--tag",
        "team-s",
    ])
    .assert_ok();
    let doc = cli.status_json(NOW);
    let row = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "team-s")
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(row["window"], "sliding", "{row}");
    assert_eq!(row["spend_nanos"], 0, "{row}");
    assert_eq!(row["sliding_spend_nanos"], 800_000_000u64, "{row}");
    assert_eq!(row["sliding_spend"], 0.8, "{row}");
    let openai = provider_budgets_test_support::cli::budget(&doc, "openai");
    assert_eq!(
        (&openai["window"], &openai["sliding_spend"]),
        (&serde_json::json!("fixed"), &serde_json::Value::Null)
    );
    let got = budget(&cli, &["get", "tag", "team-s"]);
    assert!(
        got.stdout.contains("spend 0 (sliding 0.8) of 1 USD"),
        "{got:?}"
    );
    // 0.8 < 1: the filter passes; a charge of 0.2 more spends it (sliding), not when fixed.
    let filter = || cli.run(&["--now", NOW, "filter", "gpt-4o", "--tag", "team-s"]);
    filter().assert_ok();
    cli.run(&["--now", NOW, "charge", "gpt-4o", "0.2", "--tag", "team-s"])
        .assert_ok();
    assert_eq!(filter().code, Some(3));
    budget(&cli, &[&args[..], &["--window", "fixed"]].concat()).assert_ok();
    let doc = cli.status_json(NOW);
    let row = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "team-s")
        .unwrap();
    assert_eq!(
        (&row["window"], &row["sliding_spend_nanos"]),
        (&serde_json::json!("fixed"), &serde_json::Value::Null)
    );
    filter().assert_ok();
    // An unknown value: one line naming the budget and the value.
    let bad = budget(&cli, &[&args[..], &["--window", "rolling"]].concat());
    bad.assert_error(1, &["tag \"team-s\"", "window", "\"rolling\""]);
}

#[test]
fn a_sliding_token_budget_shows_its_sliding_spend_as_a_whole_count() {
    let cli = Cli::new(CONFIG);
    budget(
        &cli,
        &[
            "put", "model", "gpt-4o", "--unit", "tokens", "--limit", "1000", "--period", "1m",
            "--window", "sliding",
        ],
    )
    .assert_ok();
    cli.run(&[
        "--now",
        "2024-05-01T11:59:30Z",
        "charge",
        "gpt-4o",
        "0.01",
        "--input-tokens",
        "600",
        "--output-tokens",
        "300",
    ])
    .assert_ok();
    let doc = cli.status_json(NOW);
    let row = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["scope"] == "model")
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(
        (
            &row["window"],
            &row["sliding_spend"],
            &row["sliding_spend_nanos"]
        ),
        (
            &serde_json::json!("sliding"),
            &serde_json::json!(900),
            &serde_json::Value::Null
        ),
        "{row}"
    );
}
