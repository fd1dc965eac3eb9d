//! A fleet node killed with SIGKILL and restarted neither loses nor re-counts its spend.
//!
//! Node A is a real `provider-budgets ingest --durable --redis` child process that ships its
//! durable totals every 50 ms; node B is an in-process limiter on its own data dir. Each trial
//! kills A after Redis has seen some of its spend, with more records in flight, then reopens
//! A's data dir and syncs both: A's own spend is between what it acknowledged and what it was
//! sent, Redis holds exactly that for A's field, and both nodes see A's own plus B's own,
//! exactly — the reference would lose A's queued increments (flaw 3).

#![allow(clippy::unwrap_used)]

#[path = "support/cli.rs"]
mod cli;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli::Cli;
use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig};
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
    Limiter::open_with_clock(config, clock).unwrap()
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
        let mut child = a
            .cmd(&[
                "--redis",
                &url,
                "--node-id",
                "a",
                "--now",
                &now_text,
                "ingest",
                "--durable",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut acks = BufReader::new(child.stdout.take().unwrap()).lines();
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
        child.kill().unwrap(); // SIGKILL on unix
        child.wait().unwrap();

        b.record("openai", Money::from_nanos(3 + trial)).unwrap();
        b_total += 3 + trial;

        let restarted = library_node(&a.data, &url, "a", now);
        for _ in 0..2 {
            restarted.sync().unwrap();
            b.sync().unwrap();
        }
        let own_a = restarted
            .budget_status("openai")
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
            restarted.budget_status("openai").unwrap().spend,
            fleet,
            "trial {trial}: A"
        );
        assert_eq!(
            b.budget_status("openai").unwrap().spend,
            fleet,
            "trial {trial}: B"
        );
        // The next trial continues from what survived.
        acked_total = own_a;
        sent_total = own_a;
    }
}
