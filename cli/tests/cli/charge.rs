//! `charge DEPLOYMENT [COST] --input-tokens N --output-tokens M [--cache-read-tokens N]`:
//! without COST the tokens are priced by the catalog; a given COST wins; neither is a usage
//! error (exit 2, one line); an unpriced model under `deny` is refused (exit 1, nothing
//! counted).

use provider_budgets_test_support::cli;

use cli::{budget, Cli};

const NOW: &str = "2024-05-01T12:00:00Z";
const PRICED: &str = "provider_budget_config:
  openai: {budget_limit: 100, time_period: 1d}
provider_budgets:
  pricing:
    overrides:
      my-model: {input_per_mtok: 1, output_per_mtok: 2, cache_read_per_mtok: \"0.5\"}
";

fn openai_nanos(cli: &Cli) -> u64 {
    budget(&cli.status_json(NOW), "openai")["spend_nanos"]
        .as_u64()
        .unwrap()
}

#[test]
fn charge_prices_tokens_when_no_cost_is_given() {
    let cli = Cli::new(PRICED);
    let run = cli.run(&[
        "--now",
        NOW,
        "charge",
        "openai/my-model",
        "--input-tokens",
        "1000000",
        "--output-tokens",
        "1000000",
        "--cache-read-tokens",
        "400000",
    ]);
    run.assert_ok();
    assert!(
        run.stdout
            .starts_with("charged 2.8 USD to 1 budgets (priced: true, override \"my-model\")\n"),
        "{run:?}"
    );
    assert_eq!(openai_nanos(&cli), 2_800_000_000);
    // The builtin catalog prices the rest.
    let run = cli.run(&[
        "--now",
        NOW,
        "charge",
        "gpt-4o",
        "--input-tokens",
        "1000",
        "--output-tokens",
        "10",
    ]);
    run.assert_ok();
    assert!(
        run.stdout
            .contains("(priced: true, catalog key \"gpt-4o\")"),
        "{run:?}"
    );
    // A given cost wins.
    let before = openai_nanos(&cli);
    let run = cli.run(&[
        "--now",
        NOW,
        "charge",
        "openai/my-model",
        "0.5",
        "--input-tokens",
        "1000000",
        "--output-tokens",
        "0",
    ]);
    run.assert_ok();
    assert!(
        run.stdout
            .starts_with("charged 0.5 USD to 1 budgets (given; the tokens are not priced)\n"),
        "{run:?}"
    );
    assert_eq!(openai_nanos(&cli), before + 500_000_000);
    // A plain cost prints what it always did.
    let run = cli.run(&["--now", NOW, "charge", "gpt-4o", "1"]);
    assert!(
        run.stdout.starts_with("charged 1 USD to 1 budgets\n"),
        "{run:?}"
    );
}

#[test]
fn charge_without_cost_or_tokens_is_a_usage_error() {
    let cli = Cli::new(PRICED);
    cli.run(&["--now", NOW, "charge", "gpt-4o"])
        .assert_error(2, &["COST"]);
    cli.run(&[
        "--now",
        NOW,
        "charge",
        "gpt-4o",
        "--input-tokens",
        "10",
        "--output-tokens",
        "1",
        "--cache-read-tokens",
        "11",
    ])
    .assert_error(2, &["--cache-read-tokens 11"]);
    cli.run(&["--now", NOW, "charge", "gpt-4o", "--input-tokens", "x"])
        .assert_error(2, &["--input-tokens"]);
    assert_eq!(openai_nanos(&cli), 0);
}

#[test]
fn charge_of_an_unpriced_model_follows_the_policy() {
    let cli = Cli::new(PRICED);
    cli.run(&[
        "--now",
        NOW,
        "charge",
        "openai/no-such-model",
        "--input-tokens",
        "10",
        "--output-tokens",
        "10",
    ])
    .assert_error(1, &["\"openai/no-such-model\" is unpriced", "deny"]);
    assert_eq!(openai_nanos(&cli), 0);
    let cli = Cli::new(
        "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\nprovider_budgets:\n  pricing: {unpriced: default, default_per_mtok: \"10\"}\n",
    );
    let run = cli.run(&[
        "--now",
        NOW,
        "charge",
        "openai/no-such-model",
        "--input-tokens",
        "100000",
        "--output-tokens",
        "0",
    ]);
    run.assert_ok();
    assert!(
        run.stdout
            .starts_with("charged 1 USD to 1 budgets (priced: false, "),
        "{run:?}"
    );
    assert!(run.stdout.contains("pricing.default_per_mtok"), "{run:?}");
}

const UNITS: &str = "provider_budgets:
  budgets:
    - {model: gpt-4o, limit: 10, period: 1d}
    - {model: gpt-4o, unit: tokens, limit: 1000, period: 1m}
    - {model: gpt-4o, unit: requests, limit: 2, period: 1m}
";

#[test]
fn charge_counts_tokens_and_requests_and_names_what_it_could_not_count() {
    let cli = Cli::new(UNITS);
    let run = cli.run(&[
        "--now",
        NOW,
        "charge",
        "openai/gpt-4o",
        "0.5",
        "--input-tokens",
        "300",
        "--output-tokens",
        "200",
    ]);
    run.assert_ok();
    assert!(run.stdout.contains("spend 500 of 1000 tokens"), "{run:?}");
    assert!(run.stdout.contains("spend 1 of 2 requests"), "{run:?}");
    let run = cli.run(&["--now", NOW, "charge", "openai/gpt-4o", "0.5"]);
    run.assert_ok();
    assert!(
        run.stdout
            .contains("not counted in model gpt-4o 1m (tokens): no token usage given"),
        "{run:?}"
    );
    let doc = cli.status_json(NOW);
    let rows: Vec<(String, serde_json::Value)> = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["unit"].as_str().unwrap().to_owned(), r["spend"].clone()))
        .collect();
    assert!(
        rows.contains(&("tokens".into(), serde_json::json!(500))),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("requests".into(), serde_json::json!(2))),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("usd".into(), serde_json::json!(1.0))),
        "{rows:?}"
    );
    // Requests are spent: the table shows whole counts and the unit.
    let run = cli.run(&["--now", NOW, "status"]);
    run.assert_ok();
    assert!(run.stdout.contains("1m requests"), "{run:?}");
}
