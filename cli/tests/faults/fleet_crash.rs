//! A fleet node killed with SIGKILL and restarted neither loses nor re-counts its spend.
//!
//! Node A is a real `provider-budgets ingest --durable --redis` child process that ships its
//! durable totals every 50 ms; node B is an in-process limiter on its own data dir. Each trial
//! kills A after Redis has seen some of its spend, with more records in flight, then reopens
//! A's data dir and syncs both: A's own spend is between what it acknowledged and what it was
//! sent, Redis holds exactly that for A's field, and both nodes see A's own plus B's own,
//! exactly — the reference would lose A's queued increments (flaw 3).
//!
//! Also: two CLI invocations with `--redis` on two data dirs see each other's spend.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::child;
use provider_budgets_test_support::cli;
use provider_budgets_test_support::redis_server;

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use child::{sigkill, spawn_piped};
use cli::Cli;
use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig};
use provider_budgets::{Spend, StatusQuery};
use redis_server::RedisServer;

/// The fixed `--now` of every process: the real time at the test's start, because Redis
/// expires keys by its own clock (window end + grace).
fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap()
}
const CONFIG: &str = "provider_budget_config:\n  openai: {budget_limit: 1000000, time_period: 1d}\nprovider_budgets:\n  redis: {url: \"redis://127.0.0.1:1/\", sync_interval: 50ms, connect_timeout: 500ms, command_timeout: 500ms}\n";

fn library_node(dir: &std::path::Path, url: &str, node: &str, now: Timestamp) -> Limiter {
    let mut config = Config::from_yaml_str(CONFIG).unwrap().data_dir(dir);
    config.node_id = Some(node.into());
    let mut redis = RedisConfig::new(url);
    redis.sync_interval = Duration::from_secs(3600);
    config.redis = Some(redis);
    let clock = Arc::new(FakeClock::new(now));
    Limiter::builder(config).clock(clock).open().unwrap()
}

fn redis_total(server: &RedisServer, now: Timestamp, node: &str) -> u64 {
    let window = now.as_second() - now.as_second().rem_euclid(86_400);
    let key = format!("provider_budgets:{{openai:1d}}:{window}");
    server.command(&["HGET", &key, node]).parse().unwrap_or(0)
}

#[test]
fn a_killed_node_neither_loses_nor_recounts_its_spend() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let now = now();
    let now_text = now.to_string();
    let a = Cli::new(CONFIG);
    let b_dir = tempfile::tempdir().unwrap();
    let b = library_node(b_dir.path(), &url, "b", now);
    let (mut acked_total, mut sent_total, mut b_total) = (0u64, 0u64, 0u64);
    for trial in 0..6u64 {
        let (mut child, mut stdin, acks) = spawn_piped(a.durable_ingest(&url, "a", &now_text));
        let mut acks = acks.lines();
        let shipped_before = redis_total(&server, now, "a");
        // Acknowledged records first, then wait until Redis has seen some of them.
        for k in 0..20u64 {
            let cost = 1_000 + trial * 100 + k;
            writeln!(stdin, "openai 0.{cost:09}").unwrap();
            sent_total += cost;
            assert!(acks.next().unwrap().unwrap().starts_with("ok "));
            acked_total += cost;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_total(&server, now, "a") <= shipped_before {
            assert!(Instant::now() < deadline, "node A never shipped its spend");
            std::thread::yield_now();
        }
        // More records in flight, unacknowledged, then SIGKILL.
        for k in 0..(trial * 7) {
            let cost = 7 + k;
            if writeln!(stdin, "openai 0.{cost:09}").is_ok() {
                sent_total += cost;
            }
        }
        sigkill(&mut child); // SIGKILL on unix

        b.charge(Spend::provider("openai", Money::from_nanos(3 + trial)))
            .unwrap();
        b_total += 3 + trial;

        // The killed process's lease on node id "a" is still live (it expires ~1 s after
        // its last renewal), but this is the same data dir (same instance id): not refused.
        let restarted = library_node(&a.data, &url, "a", now);
        for _ in 0..2 {
            restarted.sync().unwrap();
            b.sync().unwrap();
        }
        let own_a = restarted
            .status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .own_spend
            .as_nanos();
        assert!(
            (acked_total..=sent_total).contains(&own_a),
            "trial {trial}: own {own_a} not in {acked_total}..={sent_total}"
        );
        assert_eq!(
            redis_total(&server, now, "a"),
            own_a,
            "trial {trial}: redis field of A"
        );
        let fleet = Money::from_nanos(own_a + b_total);
        assert_eq!(
            restarted
                .status(StatusQuery::provider("openai"))
                .into_iter()
                .next()
                .unwrap()
                .spend,
            fleet,
            "trial {trial}: A"
        );
        assert_eq!(
            b.status(StatusQuery::provider("openai"))
                .into_iter()
                .next()
                .unwrap()
                .spend,
            fleet,
            "trial {trial}: B"
        );
        // The next trial continues from what survived.
        acked_total = own_a;
        sent_total = own_a;
    }
}

/// Two CLI invocations on two data dirs see each other's spend through `--redis`: `record`
/// syncs after its record is durable, `status` and `filter` sync before answering.
#[test]
fn two_cli_invocations_on_two_data_dirs_share_spend() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let now = now().to_string();
    let config = "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n";
    let (a, b) = (Cli::new(config), Cli::new(config));
    let common = ["--redis", url.as_str(), "--now", now.as_str()];
    let with = |extra: &[&'static str]| -> Vec<String> {
        common.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let go = |c: &Cli, args: &[String]| c.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    go(&a, &with(&["--node-id", "a", "record", "openai", "0.6"])).assert_ok();
    go(&b, &with(&["--node-id", "b", "record", "openai", "0.3"])).assert_ok();
    let run = go(&a, &with(&["--node-id", "a", "status", "--json"]));
    run.assert_ok();
    let doc: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let openai = cli::budget(&doc, "openai");
    assert_eq!(openai["spend_nanos"], 900_000_000, "{doc}");
    assert_eq!(openai["own_spend_nanos"], 600_000_000, "{doc}");
    assert_eq!(openai["replication"]["enabled"], true);
    assert_eq!(run.stderr, "", "no warning: the sync succeeded");
    // B's next record exhausts the fleet's budget: A's filter drops openai.
    go(&b, &with(&["--node-id", "b", "record", "openai", "0.1"])).assert_ok();
    let run = go(
        &a,
        &with(&["--node-id", "a", "filter", "gpt-4o", "claude-3-haiku"]),
    );
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout, "claude-3-haiku\n");
    let run = go(&a, &with(&["--node-id", "a", "filter", "gpt-4o"]));
    assert_eq!(run.code, Some(3), "{run:?}");
    assert!(
        run.stderr
            .contains("Exceeded budget for provider openai: 1 >= 1"),
        "{run:?}"
    );
}
