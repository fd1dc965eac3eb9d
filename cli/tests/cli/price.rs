//! `provider-budgets price`: the cost of a call and the entry that priced it, with and
//! without a config, and its errors (one line, exit 2 for usage, 1 for files and unpriced).

use provider_budgets_test_support::cli;

use cli::{bare_cmd, Cli, Run};

fn price(args: &[&str]) -> Run {
    Run::of(bare_cmd().arg("price").args(args).output().expect("spawn"))
}

#[test]
fn price_prints_the_cost_and_the_entry_used() {
    let run = price(&[
        "gpt-4o",
        "--input-tokens",
        "1000",
        "--output-tokens",
        "500",
        "--cache-read-tokens",
        "200",
    ]);
    run.assert_ok();
    assert_eq!(
        run.stdout,
        "model: gpt-4o\n\
         entry: catalog key \"gpt-4o\" (builtin catalog of litellm 1.110.2)\n\
         tier: base\n\
         usd_per_mtok: input 2.5, output 10, cache_read 1.25, cache_creation 2.5, reasoning 10\n\
         tokens: uncached_input 800, cache_read 200, cache_creation 0, non_reasoning_output 500, reasoning 0\n\
         cost: 0.00725 USD\n"
    );
    // Through the provider prefix, to the same entry.
    let run = price(&[
        "openai/gpt-4o",
        "--input-tokens",
        "1",
        "--output-tokens",
        "0",
    ]);
    run.assert_ok();
    assert!(
        run.stdout.contains("entry: catalog key \"gpt-4o\""),
        "{run:?}"
    );
    assert!(run.stdout.ends_with("cost: 0.0000025 USD\n"), "{run:?}");
}

#[test]
fn price_shows_the_context_tier() {
    let run = price(&[
        "gemini/gemini-2.5-pro",
        "--input-tokens",
        "300000",
        "--output-tokens",
        "0",
    ]);
    run.assert_ok();
    assert!(
        run.stdout.contains("tier: above 200000 input tokens"),
        "{run:?}"
    );
}

#[test]
fn price_applies_the_configs_overrides_and_policy() {
    let cli = Cli::new(
        "provider_budgets:\n  pricing:\n    overrides:\n      gpt-4o: {input_per_mtok: \"2\", output_per_mtok: 8}\n      tiny: {input_per_mtok: \"0.0375\", output_per_mtok: 0}\n    unpriced: default\n    default_per_mtok: 1\n",
    );
    let config = cli.config.to_str().unwrap();
    let run = price(&[
        "gpt-4o",
        "--input-tokens",
        "1000000",
        "--output-tokens",
        "1000000",
        "--config",
        config,
    ]);
    run.assert_ok();
    assert!(run.stdout.contains("entry: override \"gpt-4o\""), "{run:?}");
    assert!(run.stdout.ends_with("cost: 10 USD\n"), "{run:?}");
    // 3 tokens at 0.0375 USD/Mtok are 112.5 nano-dollars: rounded up to 113.
    let run = price(&[
        "tiny",
        "--input-tokens",
        "3",
        "--output-tokens",
        "0",
        "--config",
        config,
    ]);
    run.assert_ok();
    assert!(run.stdout.ends_with("cost: 0.000000113 USD\n"), "{run:?}");
    // After the global flags, with the global --config.
    let run = cli.run(&[
        "price",
        "no-such-model",
        "--input-tokens",
        "1000000",
        "--output-tokens",
        "0",
    ]);
    run.assert_ok();
    assert!(run.stdout.contains("entry: unpriced"), "{run:?}");
    assert!(run.stdout.ends_with("cost: 1 USD\n"), "{run:?}");
}

#[test]
fn price_errors_are_one_line() {
    // Usage errors: exit 2, naming the flag.
    price(&["gpt-4o", "--input-tokens", "x", "--output-tokens", "1"])
        .assert_error(2, &["--input-tokens", "x"]);
    price(&["gpt-4o", "--input-tokens", "1"]).assert_error(2, &["--output-tokens"]);
    price(&["gpt-4o", "--input-tokens", "-1", "--output-tokens", "1"]).assert_error(2, &["'-1'"]);
    price(&[
        "gpt-4o",
        "--input-tokens",
        "10",
        "--output-tokens",
        "1",
        "--cache-read-tokens",
        "11",
    ])
    .assert_error(2, &["--cache-read-tokens 11", "--input-tokens 10"]);
    price(&[
        "gpt-4o",
        "--input-tokens",
        "10",
        "--output-tokens",
        "1",
        "--reasoning-tokens",
        "2",
    ])
    .assert_error(2, &["--reasoning-tokens 2", "--output-tokens 1"]);
    // Unpriced under the default policy, a missing config, a malformed catalog: exit 1.
    price(&[
        "no-such-model",
        "--input-tokens",
        "1",
        "--output-tokens",
        "1",
    ])
    .assert_error(1, &["\"no-such-model\" is unpriced"]);
    price(&[
        "gpt-4o",
        "--input-tokens",
        "1",
        "--output-tokens",
        "1",
        "--config",
        "/nonexistent.yaml",
    ])
    .assert_error(1, &["/nonexistent.yaml"]);
    let cli = Cli::new("provider_budgets:\n  pricing: {catalog: prices.json}\n");
    let catalog = cli.write_config(
        "prices.json",
        "{\"m\": {\"input_cost_per_token\": \"abc\"}}",
    );
    let yaml = format!(
        "provider_budgets:\n  pricing: {{catalog: {}}}\n",
        catalog.display()
    );
    let config = cli.write_config("c.yaml", &yaml);
    let run = price(&[
        "m",
        "--input-tokens",
        "1",
        "--output-tokens",
        "1",
        "--config",
        config.to_str().unwrap(),
    ]);
    run.assert_error(
        1,
        &[
            catalog.to_str().unwrap(),
            "m.input_cost_per_token",
            "\"abc\"",
        ],
    );
}
