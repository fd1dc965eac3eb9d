//! The `provider-budgets` command line contract (DESIGN.md, "Interfaces"): exact money,
//! windows placed by `--now`/`--at`, litellm's "No deployments available" with exit code 3,
//! deployments without a budget passing, and every bad input answered by exactly one
//! `error:` line that names the culprit, without a panic and without losing recorded spend.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::cli;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use cli::{bare_cmd, budget, Cli, Run};

const ONE_DOLLAR_A_DAY: &str =
    "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n";
const NOW: &str = "2024-05-01T12:00:00Z";
const NANOS: u64 = 1_000_000_000;

#[test]
fn ten_tenths_exhaust_a_one_dollar_budget_exactly() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    for i in 0..10 {
        let run = cli.run(&["--now", NOW, "record", "openai", "0.1"]);
        run.assert_ok();
        assert!(
            run.stdout.starts_with("recorded 0.1 USD for openai"),
            "{run:?}"
        );
        assert_eq!(run.stdout.lines().count(), 1, "{run:?}");
        // Not yet at the limit: the deployment is still offered.
        if i < 9 {
            let run = cli.run(&["--now", NOW, "filter", "gpt-4o"]);
            run.assert_ok();
            assert_eq!(run.stdout, "gpt-4o\n");
        }
    }
    let doc = cli.status_json(NOW);
    assert!(
        doc["node_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{doc}"
    );
    let b = budget(&doc, "openai");
    assert_eq!(b["spend_nanos"], NANOS, "{doc}");
    assert_eq!(b["spend"].as_f64(), Some(1.0));
    assert_eq!(b["limit"].as_f64(), Some(1.0));
    assert_eq!(b["remaining"].as_f64(), Some(0.0));
    assert_eq!(b["own_spend"].as_f64(), Some(1.0));
    assert_eq!(b["exhausted"], true);
    assert_eq!(b["period"], "1d");
    assert_eq!(b["window_start"], "2024-05-01T00:00:00Z");
    assert_eq!(b["resets_at"], "2024-05-02T00:00:00Z");
    assert_eq!(b["replication"]["enabled"], false);
    assert!(b["replication"]["last_sync"].is_null());

    let run = cli.run(&["--now", NOW, "filter", "gpt-4o", "openai/gpt-4o-mini"]);
    run.assert_error(
        3,
        &[
            "No deployments available - crossed budget",
            "Exceeded budget for provider openai",
        ],
    );
    assert_eq!(run.stdout, "");

    // Providers without a budget (or unknown ones, default `allow`) still pass, in order.
    let run = cli.run(&[
        "--now",
        NOW,
        "filter",
        "gpt-4o",
        "azure/gpt-4o",
        "claude-3-5-sonnet",
        "mystery-model",
    ]);
    run.assert_ok();
    assert_eq!(
        run.stdout,
        "azure/gpt-4o\nclaude-3-5-sonnet\nmystery-model\n"
    );

    // The human table has a header and one row per budget with exact amounts.
    let run = cli.run(&["--now", NOW, "status"]);
    run.assert_ok();
    let rows: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(rows.len(), 2, "{run:?}");
    assert!(rows[0].starts_with("PROVIDER"), "{run:?}");
    let cells: Vec<&str> = rows[1].split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "openai",
            "1d",
            "2024-05-01T00:00:00Z",
            "2024-05-02T00:00:00Z",
            "1",
            "1",
            "0"
        ]
    );
}

#[test]
fn the_table_shows_reserved_money_and_the_grant_only_when_a_budget_is_strict() {
    // One strict and one shared budget, no Redis: the node is the fleet, so its grant is the
    // whole limit; the shared budget has none ("-"). The contract's seven columns come first.
    let cli = Cli::new(
        "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 100, period: 1d, enforcement: strict}\n    - {provider: anthropic, limit: 5, period: 1d}\n",
    );
    cli.run(&["--now", NOW, "record", "openai", "2.5"])
        .assert_ok();
    let run = cli.run(&["--now", NOW, "status"]);
    run.assert_ok();
    let rows: Vec<Vec<&str>> = run
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{run:?}");
    assert_eq!(
        rows[0],
        [
            "PROVIDER",
            "PERIOD",
            "WINDOW",
            "START",
            "RESETS",
            "AT",
            "SPEND",
            "LIMIT",
            "REMAINING",
            "RESERVED",
            "GRANT"
        ],
        "{run:?}"
    );
    let row = |p: &str| rows.iter().find(|r| r[0] == p).unwrap().clone();
    assert_eq!(
        row("openai")[4..],
        ["2.5", "100", "97.5", "0", "100"],
        "{run:?}"
    );
    assert_eq!(row("anthropic")[4..], ["0", "5", "5", "0", "-"], "{run:?}");
}

#[test]
fn filter_passes_deployments_of_providers_without_budget() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let run = cli.run(&[
        "--now",
        NOW,
        "filter",
        "azure/gpt-4o",
        "gpt-4o",
        "claude-3-5-sonnet",
    ]);
    run.assert_ok();
    assert_eq!(run.stdout, "azure/gpt-4o\ngpt-4o\nclaude-3-5-sonnet\n");
    // A whole record spends the budget at once; only the budgetless deployments remain.
    cli.run(&["--now", NOW, "record", "openai", "1"])
        .assert_ok();
    let run = cli.run(&[
        "--now",
        NOW,
        "filter",
        "azure/gpt-4o",
        "gpt-4o",
        "claude-3-5-sonnet",
    ]);
    run.assert_ok();
    assert_eq!(run.stdout, "azure/gpt-4o\nclaude-3-5-sonnet\n");
}

#[test]
fn now_and_at_place_records_in_their_windows() {
    let cli =
        Cli::new("provider_budget_config:\n  anthropic: {budget_limit: 10, time_period: 1h}\n");
    // --at as RFC 3339 and as Unix seconds (1714566600 = 12:30:00Z), while the clock says 12:45.
    cli.run(&[
        "--now",
        "2024-05-01T12:45:00Z",
        "record",
        "anthropic",
        "0.25",
        "--at",
        "2024-05-01T12:10:00Z",
    ])
    .assert_ok();
    cli.run(&[
        "--now",
        "2024-05-01T12:45:00Z",
        "record",
        "anthropic",
        "0.5",
        "--at",
        "1714566600",
        "--durable",
    ])
    .assert_ok();
    // Without --at the record lands at --now: 13:05, the next hour.
    cli.run(&["--now", "2024-05-01T13:05:00Z", "record", "anthropic", "2"])
        .assert_ok();

    let at = |now: &str| cli.spend_nanos(now, "anthropic");
    assert_eq!(at("2024-05-01T12:59:59Z"), 750_000_000);
    assert_eq!(at("2024-05-01T12:00:00Z"), 750_000_000);
    assert_eq!(at("2024-05-01T13:00:00Z"), 2 * NANOS);
    assert_eq!(at("1714568400"), 2 * NANOS); // 13:00:00Z as Unix seconds
    assert_eq!(at("2024-05-01T11:59:59Z"), 0);
    let doc = cli.status_json("2024-05-01T13:30:00Z");
    assert_eq!(
        budget(&doc, "anthropic")["window_start"],
        "2024-05-01T13:00:00Z"
    );
    assert_eq!(
        budget(&doc, "anthropic")["resets_at"],
        "2024-05-01T14:00:00Z"
    );
}

#[test]
fn ingest_acknowledges_and_keeps_records() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let input = "# spend of the night\nopenai 0.1\n\nopenai 0.2 2024-05-01T06:00:00Z\nopenai 0.000000001 1714564800\n";
    for durable in [true, false] {
        let mut args = vec!["--now", NOW, "ingest"];
        if durable {
            args.push("--durable");
        }
        let run = Run::of(pipe(&cli, &args, input));
        run.assert_ok();
        if durable {
            assert_eq!(run.stdout, "ok 1\nok 2\nok 3\n");
        } else {
            // Buffered: one acknowledgement covers what stdin delivered at once.
            assert!(run.stdout.ends_with("ok 3\n"), "{run:?}");
        }
    }
    assert_eq!(cli.spend_nanos(NOW, "openai"), 600_000_002);
}

/// Every bad input: one `error:` line naming the culprit, a non-zero exit, no panic, and the
/// spend recorded before still there.
#[test]
fn bad_inputs_fail_cleanly_and_keep_recorded_spend() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    cli.run(&["--now", NOW, "record", "openai", "0.25"])
        .assert_ok();
    let intact = |what: &str| {
        assert_eq!(
            cli.spend_nanos(NOW, "openai"),
            250_000_000,
            "spend changed after {what}"
        );
    };

    let usage: &[(&[&str], &[&str])] = &[
        (&["record", "openai", "-1"], &["-1", "negative"]),
        (&["record", "openai", "NaN"], &["NaN"]),
        (&["record", "openai", "inf"], &["inf"]),
        (&["record", "openai", "-inf"], &["-inf"]),
        (&["record", "openai", "1e30"], &["1e30", "too large"]),
        (
            &["record", "openai", "99999999999999"],
            &["99999999999999", "too large"],
        ),
        (&["record", "openai", "12abc"], &["12abc"]),
        (&["record", "openai", "0.1", "--at", "noon"], &["noon"]),
        (&["--now", "yesterday", "status"], &["yesterday"]),
        (
            &["--now", "2024-13-01T00:00:00Z", "status"],
            &["2024-13-01T00:00:00Z"],
        ),
        (&["frobnicate"], &["frobnicate"]),
        (&["record", "openai"], &["COST"]),
        (&["filter"], &["DEPLOYMENT"]),
    ];
    for (args, culprits) in usage {
        cli.run(args).assert_error(2, culprits);
        intact(&format!("{args:?}"));
    }

    let runtime: &[(&[&str], &[&str])] = &[
        (
            &["--now", NOW, "record", "mistral", "1"],
            &["mistral", "no budget"],
        ),
        (&["--node-id", "bad id", "status"], &["bad id"]),
        (&["sync"], &["Redis"]),
    ];
    for (args, culprits) in runtime {
        cli.run(args).assert_error(1, culprits);
        intact(&format!("{args:?}"));
    }

    // Malformed ingest lines: earlier lines stay recorded, the error names the line.
    let ingest: &[(&str, &[&str])] = &[
        ("openai 0.5\nopenai -3\n", &["line 2", "-3"]),
        ("openai 0.5\n\nopenai nan\n", &["line 3", "nan"]),
        (
            "openai 0.5\nopenai 1 2024-02-30T00:00:00Z\n",
            &["line 2", "2024-02-30"],
        ),
        ("openai 0.5\nopenai\n", &["line 2", "openai"]),
        ("openai 0.5\ngroq 1\n", &["line 2", "groq"]),
    ];
    let mut expected = 250_000_000;
    for (input, culprits) in ingest {
        for durable in [false, true] {
            let args: &[&str] = if durable {
                &["--now", NOW, "ingest", "--durable"]
            } else {
                &["--now", NOW, "ingest"]
            };
            let run = Run::of(pipe(&cli, args, input));
            // Durable mode acknowledged the good line before the bad one.
            // Buffered mode may or may not have acknowledged it, depending on how the pipe
            // delivered the input.
            if durable {
                assert_eq!(run.stdout, "ok 1\n", "{run:?}");
            } else {
                assert!(["", "ok 1\n"].contains(&run.stdout.as_str()), "{run:?}");
            }
            Run {
                stdout: String::new(),
                ..run
            }
            .assert_error(1, culprits);
            expected += 500_000_000;
            assert_eq!(cli.spend_nanos(NOW, "openai"), expected, "{input:?}");
        }
    }
}

#[test]
fn bad_config_files_name_the_file_and_the_value() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    cli.run(&["--now", NOW, "record", "openai", "0.125"])
        .assert_ok();
    let cases: &[(&str, &str, &[&str])] = &[
        ("broken.yaml", "provider_budget_config: [openai\n", &["broken.yaml"]),
        ("broken.toml", "[provider_budget_config\nopenai = 1\n", &["broken.toml"]),
        (
            "delay.yaml",
            "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  storage:\n    max_delay: soon\n",
            &["delay.yaml", "max_delay", "soon"],
        ),
        (
            "period.yaml",
            "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1fortnight}\n",
            &["openai", "1fortnight"],
        ),
        (
            "period.toml",
            "[provider_budget_config.openai]\nbudget_limit = 1\ntime_period = \"soon\"\n",
            &["period.toml", "openai", "soon"],
        ),
        (
            "limit.yaml",
            "provider_budget_config:\n  openai: {budget_limit: -5, time_period: 1d}\n",
            &["openai", "-5"],
        ),
        (
            "typo.yaml",
            "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  stroage: {dir: /tmp}\n",
            &["typo.yaml", "stroage"],
        ),
    ];
    for (name, text, culprits) in cases {
        let path = cli.write_config(name, text);
        for args in [
            &["status"][..],
            &["record", "openai", "1"],
            &["filter", "gpt-4o"],
        ] {
            cli.run_with(&path, args).assert_error(1, culprits);
        }
        assert_eq!(cli.spend_nanos(NOW, "openai"), 125_000_000, "{name}");
    }
    let missing = cli.tmp.path().join("missing.yaml");
    cli.run_with(&missing, &["status"])
        .assert_error(1, &["missing.yaml"]);
    assert_eq!(cli.spend_nanos(NOW, "openai"), 125_000_000);
}

#[test]
fn usage_errors_are_one_line_and_help_still_works() {
    let run = Run::of(bare_cmd().output().unwrap());
    run.assert_error(2, &["--config"]);
    let run = Run::of(
        bare_cmd()
            .args(["--config", "x.yaml", "--data-dir", "d"])
            .output()
            .unwrap(),
    );
    run.assert_error(2, &["subcommand"]);
    let run = Run::of(bare_cmd().arg("--help").output().unwrap());
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(
        run.stdout.contains("Usage:") && run.stdout.contains("ingest"),
        "{run:?}"
    );
    let run = Run::of(bare_cmd().arg("--version").output().unwrap());
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.starts_with("provider-budgets "), "{run:?}");
}

#[test]
fn corrupt_stored_value_is_reported_by_key_and_the_rest_survives() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    cli.run(&["--now", NOW, "record", "openai", "0.375"])
        .assert_ok();
    // Key layout (src/store.rs): provider 0 period 0 start (big-endian, sign bit flipped).
    let mut key = b"openai\x001d\x00".to_vec();
    key.extend_from_slice(&(1u64 << 63).to_be_bytes()); // window start 0, sign bit flipped
    let damage = |value: Option<&[u8]>| {
        let db = sled::open(&cli.data).unwrap();
        let own = db.open_tree("own").unwrap();
        match value {
            Some(v) => own.insert(&key, v).map(drop).unwrap(),
            None => own.remove(&key).map(drop).unwrap(),
        }
        db.flush().unwrap();
    };
    for garbage in [
        &b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..],
        b"\x09junk",
        b"",
    ] {
        damage(Some(garbage));
        for args in [
            &["--now", NOW, "status"][..],
            &["--now", NOW, "record", "openai", "1"],
        ] {
            cli.run(args)
                .assert_error(1, &["corrupt", "own", "openai/1d/0"]);
        }
    }
    damage(None);
    assert_eq!(cli.spend_nanos(NOW, "openai"), 375_000_000);
}

#[test]
fn data_dir_held_by_a_live_process_is_a_clear_error() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let mut holder = cli
        .cmd(&["--now", NOW, "ingest", "--durable"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = holder.stdin.take().unwrap();
    let mut acks = BufReader::new(holder.stdout.take().unwrap());
    // Once the first record is acknowledged the holder certainly has the dir open.
    writeln!(stdin, "openai 0.5").unwrap();
    let mut ack = String::new();
    acks.read_line(&mut ack).unwrap();
    assert_eq!(ack, "ok 1\n");

    let data = cli.data.to_string_lossy().into_owned();
    for args in [
        &["--now", NOW, "status"][..],
        &["--now", NOW, "record", "openai", "0.1"],
    ] {
        cli.run(args).assert_error(1, &["in use", "lock", &data]);
    }

    drop(stdin); // EOF: the holder commits and exits
    let status = holder.wait().unwrap();
    assert!(status.success());
    assert_eq!(cli.spend_nanos(NOW, "openai"), 500_000_000);
}

#[test]
fn overrides_and_an_unreachable_redis() {
    let cli = Cli::new(ONE_DOLLAR_A_DAY);
    let doc = cli.status_json(NOW);
    let generated = doc["node_id"].as_str().unwrap().to_owned();
    assert_eq!(
        cli.status_json(NOW)["node_id"],
        generated.as_str(),
        "node id is kept"
    );
    // A data dir keeps its node id: another id on the command line is refused, naming both
    // (running its spend under a second id would count it twice in the fleet).
    let run = cli.run(&["--node-id", "edge-7", "--now", NOW, "status", "--json"]);
    run.assert_error(1, &["edge-7", &generated, "keeps its node id"]);
    let run = cli.run(&["--node-id", &generated, "--now", NOW, "status", "--json"]);
    run.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["node_id"], generated.as_str());

    // Port 1 on loopback refuses at once. With the default log level, the CLI's own line is
    // the only one on stderr.
    let redis = ["--redis", "redis://127.0.0.1:1/", "--now", NOW];
    let quiet = |args: &[&str]| {
        let mut all = redis.to_vec();
        all.extend_from_slice(args);
        let run = Run::of(cli.cmd(&all).env_remove("RUST_LOG").output().unwrap());
        assert!(!run.stderr.contains("redis: redis:"), "{run:?}");
        run
    };
    let run = quiet(&["record", "openai", "0.5"]);
    // Durable locally, the sync failed: exit 4, do not retry (a retry would count it twice).
    run.assert_error(4, &["recorded locally; do not retry", "redis"]);
    assert!(
        run.stdout.starts_with("recorded 0.5 USD for openai"),
        "{run:?}"
    );
    let run = quiet(&["status", "--json"]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stderr.lines().count(), 1, "{run:?}");
    assert!(
        run.stderr.starts_with("warning: ") && run.stderr.contains("answering from local data"),
        "{run:?}"
    );
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    // The record above failed only to replicate: its spend is durable locally.
    assert_eq!(budget(&doc, "openai")["spend_nanos"], 500_000_000);
    assert_eq!(budget(&doc, "openai")["replication"]["enabled"], true);
    let run = quiet(&["filter", "gpt-4o"]);
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "gpt-4o\n"),
        "{run:?}"
    );
    assert!(run.stderr.starts_with("warning: "), "{run:?}");
    quiet(&["sync"]).assert_error(1, &["redis"]);
    assert_eq!(cli.spend_nanos(NOW, "openai"), 500_000_000);
}

/// Runs `args` with `input` on stdin.
fn pipe(cli: &Cli, args: &[&str], input: &str) -> std::process::Output {
    cli.pipe(args, input)
}

/// `record --at` and `charge --at` refuse a time later than now
/// plus five minutes (exit 1, one line naming it, nothing counted); an RFC 3339 time beyond
/// what a timestamp holds is called out of range, not "neither RFC 3339".
#[test]
fn a_far_future_at_is_refused_and_nothing_counted() {
    let cli = Cli::new("provider_budget_config:\n  openai: {budget_limit: 10, time_period: 1h}\n");
    let now = "2024-05-01T12:00:00Z";
    for at in ["9999-12-30T00:00:00Z", "2024-05-01T12:05:01Z"] {
        cli.run(&["--now", now, "record", "openai", "1", "--at", at])
            .assert_error(1, &[at, "2024-05-01T12:05:00Z", "not counted"]);
        cli.run(&["--now", now, "charge", "gpt-4o", "1", "--at", at])
            .assert_error(1, &[at, "not counted"]);
    }
    let run = cli.run(&[
        "--now",
        now,
        "record",
        "openai",
        "1",
        "--at",
        "9999-12-31T00:00:00Z",
    ]);
    run.assert_error(2, &["9999-12-31T00:00:00Z", "out of range"]);
    assert!(!run.stderr.contains("neither"), "{run:?}");
    assert_eq!(cli.spend_nanos("2024-05-01T12:30:00Z", "openai"), 0);
    // Within the skew: counted.
    cli.run(&[
        "--now",
        now,
        "record",
        "openai",
        "1",
        "--at",
        "2024-05-01T12:05:00Z",
    ])
    .assert_ok();
    assert_eq!(cli.spend_nanos("2024-05-01T12:30:00Z", "openai"), NANOS);
}

/// `adjust KEY AMOUNT --reason TEXT [--period P] [--at TIME]`: a credit counted net of spend,
/// kept across runs, shown in `status --json`; refusals name the culprit and credit nothing.
#[test]
fn adjust_credits_back_spend_and_status_shows_it() {
    let cli = Cli::new(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  budgets:\n    - {tag: team-a, limit: 5, period: 1d}\n    - {tag: team-a, limit: 9, period: 1mo}\n",
    );
    cli.run(&["--now", NOW, "record", "openai", "1.2"])
        .assert_ok();
    let run = cli.run(&["--now", NOW, "filter", "gpt-4o"]);
    assert_eq!(run.code, Some(3), "{run:?}");

    let run = cli.run(&[
        "--now",
        NOW,
        "adjust",
        "openai",
        "0.7",
        "--reason",
        "test run against production",
    ]);
    run.assert_ok();
    assert!(
        run.stdout
            .starts_with("credited 0.7 USD to openai (1d) in window "),
        "{run:?}"
    );
    assert!(
        run.stdout.contains("spend 0.5 USD net of 0.7 USD credited"),
        "{run:?}"
    );
    cli.run(&["--now", NOW, "filter", "gpt-4o"]).assert_ok();
    let doc = cli.status_json(NOW);
    let openai = budget(&doc, "openai");
    assert_eq!(openai["credited_nanos"], 700_000_000);
    assert_eq!(openai["spend_nanos"], 500_000_000);
    assert_eq!(openai["own_spend_nanos"], 1_200_000_000);

    // An earlier window through --at; a tag with two periods needs --period.
    cli.run(&[
        "--now",
        NOW,
        "charge",
        "gpt-4o",
        "2",
        "--tag",
        "team-a",
        "--at",
        "2024-05-01T01:00:00Z",
    ])
    .assert_ok();
    cli.run(&[
        "--now",
        NOW,
        "adjust",
        "tag:team-a",
        "1",
        "--reason",
        "refund",
    ])
    .assert_error(1, &["tag:team-a", "several periods (1d, 1mo)"]);
    cli.run(&[
        "--now",
        NOW,
        "adjust",
        "tag:team-a",
        "1",
        "--reason",
        "refund",
        "--period",
        "1mo",
        "--at",
        "2024-05-01T01:00:00Z",
    ])
    .assert_ok();
    let doc = cli.status_json(NOW);
    let monthly = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["scope"] == "tag" && b["name"] == "team-a" && b["period"] == "1mo")
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(monthly["credited_nanos"], 1_000_000_000);

    for (args, culprits) in [
        (
            vec!["adjust", "openai", "2.6", "--reason", "x"],
            vec!["more than the window's spend"],
        ),
        (
            vec!["adjust", "anthropic", "0.1", "--reason", "x"],
            vec!["\"anthropic\""],
        ),
        (vec!["adjust", "openai", "-1", "--reason", "x"], vec!["-1"]),
        (
            vec!["adjust", "openai", "0.1", "--reason", ""],
            vec!["reason"],
        ),
    ] {
        let mut full = vec!["--now", NOW];
        full.extend(args);
        cli.run(&full)
            .assert_error(if culprits[0] == "-1" { 2 } else { 1 }, &culprits);
    }
    let run = cli.run(&["--now", NOW, "adjust", "openai", "0.1"]);
    assert_eq!(run.code, Some(2), "--reason is required: {run:?}");
    assert_eq!(
        budget(&cli.status_json(NOW), "openai")["credited_nanos"],
        700_000_000
    );
}

#[test]
fn charge_and_filter_take_the_requests_identities() {
    let cli = Cli::new(
        "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\nprovider_budgets:\n  budgets:\n    - {key: k1, limit: 1, period: 1d}\n    - {team: research, limit: 2, period: 1d}\n    - {org: acme, limit: 50, period: 1mo}\n",
    );
    let charge = |args: &[&str]| {
        let mut full = vec!["--now", NOW, "charge", "gpt-4o"];
        full.extend_from_slice(args);
        cli.run(&full)
    };
    let run = charge(&[
        "1", "--key", "k1", "--team", "research", "--org", "acme", "--user", "u",
    ]);
    run.assert_ok();
    assert!(
        run.stdout.starts_with("charged 1 USD to 4 budgets\n"),
        "{run:?}"
    );
    for line in ["  key k1 1d", "  team research 1d", "  org acme 1mo"] {
        assert!(run.stdout.contains(line), "{line:?} in {run:?}");
    }
    let filter = |args: &[&str]| {
        let mut full = vec!["--now", NOW, "filter", "gpt-4o", "claude-3-5-sonnet"];
        full.extend_from_slice(args);
        cli.run(&full)
    };
    // k1's key budget is spent: exit 3 naming it; another key of the team passes.
    filter(&["--key", "k1"]).assert_error(3, &["Exceeded budget for key k1: 1 >= 1"]);
    let run = filter(&["--key", "k2", "--team", "research", "--customer", "c"]);
    run.assert_ok();
    assert_eq!(run.stdout, "gpt-4o\nclaude-3-5-sonnet\n");
    // The team's second dollar through k2 closes the team for every key named with it.
    charge(&["1", "--key", "k2", "--team", "research"]).assert_ok();
    filter(&["--key", "k3", "--team", "research"])
        .assert_error(3, &["Exceeded budget for team research: 2 >= 2"]);
    filter(&["--key", "k3"]).assert_ok();
    let doc = cli.status_json(NOW);
    let spend: Vec<(String, u64)> = doc["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                format!(
                    "{}:{}",
                    b["scope"].as_str().unwrap(),
                    b["name"].as_str().unwrap()
                ),
                b["spend_nanos"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        spend,
        [
            ("provider:openai".to_string(), 2 * NANOS),
            ("key:k1".into(), NANOS),
            ("team:research".into(), 2 * NANOS),
            ("org:acme".into(), NANOS),
        ]
    );
}
