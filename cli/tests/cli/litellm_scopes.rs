//! The scenarios of litellm's own router budget tests for deployment and tag budgets
//! (`tests/local_testing/test_router_budget_limiter.py`: deployment budgets e2e, deployment
//! budget "expect to fail", tag budgets "expect to fail"), run through the library and through
//! the CLI with litellm-shaped configs (`model_list` with `max_budget`/`budget_duration` and
//! `model_info.id`; `litellm_settings.tag_budget_config`). litellm's budget of
//! `0.000000000001` rounds up to one nano-dollar here, so the first charge spends it.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::cli;
use provider_budgets_test_support::open as support;

use cli::Cli;
use provider_budgets::Spend;
use provider_budgets::{FakeClock, Limiter, Money, Scope, Target, NO_TAGS};

const DEPLOYMENTS: &str = "\
model_list:
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY, max_budget: 0.000000000001, budget_duration: 1d}
    model_info: {id: openai-gpt-4o}
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY, max_budget: 10, budget_duration: 20d}
    model_info: {id: openai-gpt-4o-mini}
";

const TAGS: &str = "\
model_list:
  - model_name: openai/gpt-4o-mini
    litellm_params: {model: openai/gpt-4o-mini}
litellm_settings:
  tag_budget_config:
    product:chat-bot: {max_budget: 0.000000000001, budget_duration: 1d}
    product:chat-bot-2: {max_budget: 100, budget_duration: 1d}
";

const NOW: &str = "2024-06-01T12:00:00Z";

fn limiter(yaml: &str, dir: &tempfile::TempDir) -> Limiter {
    support::open(
        support::yaml(yaml, dir.path()),
        &FakeClock::new(NOW.parse().unwrap()),
    )
}

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

#[test]
fn library_deployment_budget_moves_traffic_to_the_other_deployment() {
    let dir = tempfile::tempdir().unwrap();
    let l = limiter(DEPLOYMENTS, &dir);
    let big = Target::with_id("openai-gpt-4o", "openai/gpt-4o");
    let mini = Target::with_id("openai-gpt-4o-mini", "openai/gpt-4o-mini");
    let group = [big.clone(), mini.clone()];
    // First request forced to openai-gpt-4o: it passes, and its cost spends the budget.
    assert_eq!(
        l.filter(std::slice::from_ref(&big), NO_TAGS).unwrap(),
        [&big]
    );
    assert_eq!(
        l.charge(Spend::deployment(&big, usd("0.00015")))
            .map(|r| r.budgets())
            .unwrap(),
        1
    );
    // The next three requests to the group all go to the mini deployment.
    for _ in 0..3 {
        assert_eq!(l.filter(&group, NO_TAGS).unwrap(), [&mini]);
        l.charge(Spend::deployment(&mini, usd("0.00002"))).unwrap();
    }
}

#[test]
fn library_deployment_budget_expect_to_fail() {
    let dir = tempfile::tempdir().unwrap();
    let l = limiter(
        "model_list:\n  - model_name: openai/gpt-4o-mini\n    litellm_params: {model: openai/gpt-4o-mini, max_budget: 0.000000000001, budget_duration: 1d}\n    model_info: {id: mini}\n",
        &dir,
    );
    let d = Target::with_id("mini", "openai/gpt-4o-mini");
    assert!(l.filter(std::slice::from_ref(&d), NO_TAGS).is_ok());
    l.charge(Spend::deployment(&d, usd("0.0001"))).unwrap();
    for _ in 0..3 {
        let err = l.filter(std::slice::from_ref(&d), NO_TAGS).unwrap_err();
        assert!(
            err.to_string()
                .contains("Exceeded budget for deployment mini"),
            "{err}"
        );
        assert_eq!(err.exceeded[0].scope, Scope::Deployment);
    }
}

#[test]
fn library_tag_budget_expect_to_fail_and_the_other_tag_passes() {
    let dir = tempfile::tempdir().unwrap();
    let l = limiter(TAGS, &dir);
    let d = ["openai/gpt-4o-mini"];
    let tag = ["product:chat-bot"];
    assert!(l.filter(&d, &tag).is_ok());
    l.charge(Spend::deployment(d[0], usd("0.0001")).tags(&tag))
        .unwrap();
    for _ in 0..3 {
        let err = l.filter(&d, &tag).unwrap_err();
        assert!(
            err.to_string()
                .contains("Exceeded budget for tag product:chat-bot: 0.0001 >= 0.000000001"),
            "{err}"
        );
    }
    for _ in 0..2 {
        assert_eq!(
            l.filter(&d, &["product:chat-bot-2"]).unwrap(),
            [&"openai/gpt-4o-mini"]
        );
        l.charge(Spend::deployment(d[0], usd("0.0001")).tags(&["product:chat-bot-2"]))
            .unwrap();
    }
    // Untagged requests are not affected by tag budgets.
    assert!(l.filter(&d, NO_TAGS).is_ok());
}

#[test]
fn cli_deployment_budget_moves_traffic_to_the_other_deployment() {
    let cli = Cli::new(DEPLOYMENTS);
    let big = "openai-gpt-4o=openai/gpt-4o";
    let mini = "openai-gpt-4o-mini=openai/gpt-4o-mini";
    let run = cli.run(&["--now", NOW, "filter", big]);
    run.assert_ok();
    assert_eq!(run.stdout, format!("{big}\n"));
    let run = cli.run(&["--now", NOW, "charge", big, "0.00015", "--durable"]);
    run.assert_ok();
    assert!(
        run.stdout
            .starts_with("charged 0.00015 USD to 1 budgets\n  deployment openai-gpt-4o 1d"),
        "{run:?}"
    );
    for _ in 0..3 {
        let run = cli.run(&["--now", NOW, "filter", big, mini]);
        run.assert_ok();
        assert_eq!(run.stdout, format!("{mini}\n"));
        cli.run(&["--now", NOW, "charge", mini, "0.00002"])
            .assert_ok();
    }
    let doc = cli.status_json(NOW);
    let rows = doc["budgets"].as_array().unwrap();
    let row = rows
        .iter()
        .find(|b| b["name"] == "openai-gpt-4o-mini")
        .unwrap();
    assert_eq!(row["scope"], "deployment");
    assert_eq!(row["mode"], "enforce");
    assert_eq!(row["spend_nanos"], 60_000);
    assert_eq!(row["period"], "20d");
    assert!(row["provider"].is_null(), "{row}");
    assert_eq!(row["time_zone"], "UTC");
    assert_eq!(row["thresholds_crossed"], serde_json::json!([]));
}

#[test]
fn cli_deployment_budget_expect_to_fail_exits_3() {
    let cli = Cli::new(
        "model_list:\n  - model_name: openai/gpt-4o-mini\n    litellm_params: {model: openai/gpt-4o-mini, max_budget: 0.000000000001, budget_duration: 1d}\n    model_info: {id: mini}\n",
    );
    let d = "mini=openai/gpt-4o-mini";
    cli.run(&["--now", NOW, "filter", d]).assert_ok();
    cli.run(&["--now", NOW, "charge", d, "0.0001"]).assert_ok();
    for _ in 0..3 {
        let run = cli.run(&["--now", NOW, "filter", d]);
        run.assert_error(3, &["Exceeded budget for deployment mini"]);
    }
}

#[test]
fn cli_tag_budget_expect_to_fail_and_the_other_tag_passes() {
    let cli = Cli::new(TAGS);
    let d = "openai/gpt-4o-mini";
    let tag = ["--tag", "product:chat-bot"];
    let args = |cmd: &[&'static str], tags: &[&'static str]| -> Vec<&'static str> {
        let mut v = vec!["--now", NOW];
        v.extend_from_slice(cmd);
        v.extend_from_slice(tags);
        v
    };
    cli.run(&args(&["filter", d], &tag)).assert_ok();
    let run = cli.run(&args(&["charge", d, "0.0001"], &tag));
    run.assert_ok();
    assert!(run.stdout.contains("tag product:chat-bot 1d"), "{run:?}");
    for _ in 0..3 {
        cli.run(&args(&["filter", d], &tag))
            .assert_error(3, &["Exceeded budget for tag product:chat-bot"]);
    }
    for _ in 0..2 {
        let run = cli.run(&args(&["filter", d], &["--tag", "product:chat-bot-2"]));
        run.assert_ok();
        assert_eq!(run.stdout, format!("{d}\n"));
    }
    // The same request untagged passes; `record` still means the provider only.
    cli.run(&args(&["filter", d], &[])).assert_ok();
    let doc = cli.status_json(NOW);
    let tags: Vec<(&str, u64)> = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap(),
                b["spend_nanos"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tags,
        [("product:chat-bot", 100_000), ("product:chat-bot-2", 0)]
    );
}

#[test]
fn cli_status_rows_carry_scope_mode_zone_and_thresholds() {
    let cli = Cli::new(
        "provider_budget_config:\n  openai: {budget_limit: 10, time_period: 1d}\nprovider_budgets:\n  budgets:\n    - {tag: t, limit: 4, period: 1d, soft_limits: [0.25, 0.5, 0.75], mode: shadow, time_zone: Asia/Kathmandu}\n",
    );
    cli.run(&["--now", NOW, "charge", "gpt-4o", "2", "--tag", "t"])
        .assert_ok();
    // Shadow: never filters, counts what it would have denied.
    cli.run(&["--now", NOW, "charge", "gpt-4o", "2", "--tag", "t"])
        .assert_ok();
    cli.run(&["--now", NOW, "filter", "gpt-4o", "--tag", "t"])
        .assert_ok();
    let doc = cli.status_json(NOW);
    let rows = doc["budgets"].as_array().unwrap();
    assert_eq!(rows[0]["provider"], "openai");
    assert_eq!(rows[0]["scope"], "provider");
    assert_eq!(rows[0]["spend_nanos"], 4_000_000_000u64);
    let t = &rows[1];
    assert_eq!(t["scope"], "tag");
    assert_eq!(t["name"], "t");
    assert_eq!(t["mode"], "shadow");
    assert_eq!(t["exhausted"], true);
    assert_eq!(t["time_zone"], "Asia/Kathmandu");
    assert_eq!(t["window_start"], "2024-05-31T18:15:00Z");
    assert_eq!(
        t["window_start_local"],
        "2024-06-01T00:00:00+05:45[Asia/Kathmandu]"
    );
    assert_eq!(
        t["thresholds_crossed"],
        serde_json::json!([0.25, 0.5, 0.75])
    );
    assert_eq!(t["soft_limits"], serde_json::json!([0.25, 0.5, 0.75]));
}

#[test]
fn cli_warns_once_about_unimplemented_litellm_keys() {
    let cli = Cli::new(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d, soft_budget: 0.5}\n",
    );
    let run = cli.run(&["--now", NOW, "filter", "gpt-4o"]);
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "gpt-4o\n"));
    assert_eq!(
        run.stderr,
        format!(
            "warning: {}: litellm keys not implemented by provider-budgets (ignored): provider_budget_config.openai.soft_budget\n",
            cli.config.display()
        )
    );
}
