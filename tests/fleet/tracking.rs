//! Client-side tracking of clean windows ("make the fleet scale with what changes"),
//! through real `redis-server`s: a clean round with nothing changed reads no window key;
//! another node's new spend is still seen at the next round (the invalidation); FLUSHALL, a
//! killed replication connection and a server that refuses tracking all stay exact; and a
//! clean budget renews its lease rarely.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig};
use provider_budgets::{Spend, StatusQuery};
use redis_server::RedisServer;

/// Near real time (Redis expires keys by its own clock), 30 s into the current minute.
fn clock() -> Arc<FakeClock> {
    let now = Timestamp::now().as_second();
    Arc::new(FakeClock::new(
        Timestamp::from_second(now - now.rem_euclid(60) + 30).unwrap(),
    ))
}

fn config(dir: &Path, url: &str, node: &str, interval: Duration) -> Config {
    let mut c = Config::new()
        .budget("openai", Money::from_nanos(1 << 50), "1h".parse().unwrap())
        .budget(
            "anthropic",
            Money::from_nanos(1 << 50),
            "1m".parse().unwrap(),
        )
        .data_dir(dir);
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "trk".to_owned();
    r.sync_interval = interval;
    r.connect_timeout = Duration::from_millis(500);
    r.command_timeout = Duration::from_millis(500);
    c.redis = Some(r);
    c
}

/// A node whose rounds run when the test says so (`sync`).
fn open(dir: &Path, url: &str, node: &str, clock: &Arc<FakeClock>) -> Limiter {
    support::open(config(dir, url, node, Duration::from_secs(3600)), clock)
}

fn spend(l: &Limiter, provider: &str) -> u64 {
    l.status(StatusQuery::provider(provider))
        .into_iter()
        .next()
        .unwrap()
        .spend
        .as_nanos()
}

fn nanos(n: u64) -> Money {
    Money::from_nanos(n)
}

/// `(keys_read, keys_unchanged)` of the node's last round, and whether it tracks.
fn figures(l: &Limiter) -> (u64, u64, bool) {
    let r = l
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap()
        .replication;
    (
        r.last_round.keys_read,
        r.last_round.keys_unchanged,
        r.tracking,
    )
}

/// Calls of `command` so far (`INFO commandstats`).
fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.command(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Starts two nodes that spent in `openai` and converged; each has run plain read rounds
/// since, so every clean window is tracked.
fn two_clean_nodes(url: &str) -> (Limiter, Limiter, [tempfile::TempDir; 2]) {
    let clock = clock();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = open(dirs[0].path(), url, "a", &clock);
    let b = open(dirs[1].path(), url, "b", &clock);
    a.charge(Spend::provider("openai", nanos(40))).unwrap();
    b.charge(Spend::provider("openai", nanos(2))).unwrap();
    for _ in 0..3 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    (a, b, dirs)
}

#[test]
fn a_clean_round_with_nothing_changed_reads_no_window_key() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b, _dirs) = two_clean_nodes(&server.url());
    let hmget = calls(&server, "hmget");
    let evalsha = calls(&server, "evalsha");
    for node in [&a, &b] {
        let trips = node
            .status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .replication
            .round_trips;
        node.sync().unwrap();
        // Still one round trip (it proves the connection alive and tracked) ...
        let after = node
            .status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .replication
            .round_trips;
        assert_eq!(after - trips, 1);
        // ... covering both live windows and their credit series', none of them read.
        assert_eq!(figures(node), (4, 4, true));
    }
    assert_eq!(calls(&server, "hmget"), hmget, "no HMGET in clean rounds");
    assert_eq!(calls(&server, "evalsha"), evalsha, "no script either");
    assert_eq!((spend(&a, "openai"), spend(&b, "openai")), (42, 42));
}

#[test]
fn a_clean_node_sees_another_nodes_new_spend_at_its_next_round() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b, _dirs) = two_clean_nodes(&server.url());
    let mut expected = 42;
    for k in 1..=20u64 {
        // Alternately a window with spend and one nobody had spent in (an absent key is
        // tracked too).
        let provider = if k % 2 == 0 { "openai" } else { "anthropic" };
        a.charge(Spend::provider(provider, nanos(k))).unwrap();
        a.sync().unwrap();
        b.sync().unwrap();
        if provider == "openai" {
            expected += k;
        }
        assert_eq!(spend(&b, "openai"), expected, "round {k}");
        assert_eq!(
            spend(&b, "anthropic"),
            (1..=k).filter(|i| i % 2 == 1).sum::<u64>(),
            "round {k}"
        );
        // b read only what changed (one window), the others (and the credit series'
        // windows) stayed unread.
        let (read, unchanged, tracking) = figures(&b);
        assert!(tracking);
        assert_eq!((read, unchanged), (4, 3), "round {k}");
    }
}

#[test]
fn flushall_is_healed_and_every_key_read_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let (a, b, _dirs) = two_clean_nodes(&url);
    let key = |node: &str| {
        let start = a
            .status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .window
            .start()
            .as_second();
        server.command(&["HGET", &format!("trk:{{openai:1h}}:{start}"), node])
    };
    server.flushall();
    for _ in 0..2 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    assert_eq!((key("a"), key("b")), ("40".to_owned(), "2".to_owned()));
    assert_eq!((spend(&a, "openai"), spend(&b, "openai")), (42, 42));
    // New spend after the flush is seen too.
    a.charge(Spend::provider("openai", nanos(100))).unwrap();
    a.sync().unwrap();
    b.sync().unwrap();
    assert_eq!(spend(&b, "openai"), 142);
}

#[test]
fn a_killed_replication_connection_is_reopened_and_everything_read_again() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (a, b, _dirs) = two_clean_nodes(&server.url());
    for round in 0..3u64 {
        // Both replication connections die (the harness's own command connection is
        // skipped); while b has none, a's new spend sends b no invalidation.
        let killed = server.command(&["CLIENT", "KILL", "TYPE", "normal"]);
        assert!(killed.parse::<u64>().unwrap() >= 2, "{killed}");
        a.charge(Spend::provider("openai", nanos(1000))).unwrap();
        a.sync().unwrap();
        b.sync().unwrap();
        // b's new connection vouched for nothing: both windows read, a's spend seen.
        assert_eq!(figures(&b), (4, 0, true), "round {round}");
        assert_eq!(spend(&b, "openai"), 42 + 1000 * (round + 1));
        b.sync().unwrap();
        assert_eq!(figures(&b), (4, 4, true), "tracked again");
    }
}

#[test]
fn a_server_that_refuses_tracking_falls_back_to_reading_and_stays_exact() {
    // `CLIENT` renamed away: `CLIENT TRACKING` fails (a managed Redis that forbids it);
    // `HELLO` renamed away: no RESP3 at all (Redis 5, some proxies).
    for refused in ["CLIENT", "HELLO"] {
        let args = ["--rename-command", refused, ""].map(String::from);
        let Some(server) = RedisServer::start_with(&args, u16::MAX, false) else {
            return;
        };
        let (a, b, _dirs) = two_clean_nodes(&server.url());
        for node in [&a, &b] {
            assert_eq!(figures(node), (4, 0, false), "{refused}");
        }
        for k in 1..=3u64 {
            let hmget = calls(&server, "hmget");
            a.charge(Spend::provider("openai", nanos(k))).unwrap();
            a.sync().unwrap();
            b.sync().unwrap();
            // Every clean window read every round, as before tracking.
            assert!(calls(&server, "hmget") - hmget >= 3, "{refused}");
            assert_eq!(spend(&b, "openai"), 42 + k * (k + 1) / 2, "{refused}");
        }
    }
}

/// The lease key of node `a`'s `openai` budget.
const LEASE: &str = "trk:{openai:1h}:lease:a";

/// Node `a` (50 ms interval, 0.5 s timeouts) after one spend and one round: it holds the
/// lease of its `openai` budget, set by the script.
fn leased_node(server: &RedisServer) -> (tempfile::TempDir, Limiter) {
    let dir = tempfile::tempdir().unwrap();
    let c = config(dir.path(), &server.url(), "a", Duration::from_millis(50));
    let a = Limiter::builder(c).clock(clock()).open().unwrap();
    a.charge(Spend::provider("openai", nanos(1))).unwrap();
    a.sync().unwrap();
    (dir, a)
}

#[test]
fn a_clean_budget_renews_its_lease_rarely_for_longer() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // The script's lease lives 1.15 s, a clean renewal's 2.5 s (30 intervals + timeouts),
    // renewed once a third of that has passed.
    let (_dir, a) = leased_node(&server);
    let pttl = || server.command(&["PTTL", LEASE]).parse::<i64>().unwrap();
    assert!(pttl() <= 1150, "the script sets the short lease");
    let pexpire = calls(&server, "pexpire");
    let (started, mut rounds) = (Instant::now(), 0u64);
    let mut renewed = false;
    while started.elapsed() < Duration::from_millis(1500) {
        a.sync().unwrap();
        rounds += 1;
        renewed |= pttl() > 1150;
    }
    assert!(renewed, "a clean round renewed the lease for longer");
    // The lease never lapsed, and 2 budgets renewed at most every ~0.4 s (the first
    // renewal, a third of the script's lease) and then every ~0.8 s: a few calls, where
    // renewing every other round would have made `rounds`.
    let renewals = calls(&server, "pexpire") - pexpire;
    assert!(rounds > 40, "{rounds} rounds");
    assert!(renewals <= 8, "{renewals} PEXPIRE in {rounds} rounds");
    assert!(pttl() > 0);
}

#[test]
fn a_dirty_budget_renews_its_lease_once_a_third_has_passed() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // The script's lease lives 1.15 s, renewed once 0.38 s have passed.
    let (_dir, a) = leased_node(&server);
    let pttl = || server.command(&["PTTL", LEASE]).parse::<i64>().unwrap();
    let set = calls(&server, "set");
    let (started, mut rounds) = (Instant::now(), 0u64);
    let mut deleted = false;
    while started.elapsed() < Duration::from_millis(1500) {
        a.charge(Spend::provider("openai", nanos(1))).unwrap();
        a.sync().unwrap();
        rounds += 1;
        // Never lapsed, never the long lease of a clean budget.
        let left = pttl();
        assert!(left > 0 && left <= 1150, "{left} ms left");
        if !deleted && started.elapsed() > Duration::from_millis(200) {
            // Gone while the node thinks it fresh (a flush): the next script takes it
            // again although no renewal is due.
            server.command(&["DEL", LEASE]);
            deleted = true;
            a.charge(Spend::provider("openai", nanos(1))).unwrap();
            a.sync().unwrap();
            assert!(pttl() > 1000, "taken again");
        }
    }
    // One budget dirty: a `SET` once per ~0.38 s (plus the retake), not one per round.
    let sets = calls(&server, "set") - set;
    assert!(rounds > 20, "{rounds} rounds");
    assert!(sets <= 7, "{sets} SET in {rounds} dirty rounds");
    // Clean rounds give it the long lease; the next dirty round sets the short one at once
    // (a node that crashes while dirty is taken over as soon as before).
    let started = Instant::now();
    while pttl() <= 1150 {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "no clean renewal"
        );
        a.sync().unwrap();
    }
    a.charge(Spend::provider("openai", nanos(1))).unwrap();
    a.sync().unwrap();
    assert!(pttl() <= 1150, "{} ms left", pttl());
}
