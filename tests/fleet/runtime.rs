//! Runtime budgets across a fleet, through a real `redis-server`: a put on one node is
//! enforced on another within two sync intervals (and so is a delete); concurrent puts on two
//! nodes converge to one winner on both (Lamport version, then node id); with Redis down a
//! put stays local (`replicated: false`) and reaches the other node once Redis is back.

use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use provider_budgets::{
    BudgetConfig, BudgetFields, Config, FakeClock, Limiter, RedisConfig, Scope, StatusQuery,
};
use redis_server::RedisServer;

const FILE: &str = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";
const TEAM: &[&str] = &["team-a"];

fn node(url: &str, id: &str, dir: &Path, interval: Duration) -> Limiter {
    let mut config = Config::from_yaml_str(FILE).unwrap().data_dir(dir);
    config.node_id = Some(id.to_owned());
    let mut r = RedisConfig::new(url);
    r.sync_interval = interval;
    r.connect_timeout = Duration::from_millis(500);
    r.command_timeout = Duration::from_millis(500);
    config.redis = Some(r);
    // The real time: tombstones age by it.
    Limiter::builder(config)
        .clock(Arc::new(FakeClock::new(jiff::Timestamp::now())))
        .open()
        .unwrap()
}

fn team(limit: &str) -> BudgetConfig {
    BudgetConfig::from_fields(Scope::Tag, "team-a", &BudgetFields::new(limit, "1d")).unwrap()
}

/// The limit (nanos) of tag team-a on `l`, if it applies there.
fn team_limit(l: &Limiter) -> Option<u64> {
    l.status(StatusQuery::all().scope(Scope::Tag).name("team-a"))
        .first()
        .map(|s| s.limit.as_nanos())
}

/// Polls `done` until it holds or `within` passed; returns how long it took.
fn within(within: Duration, what: &str, done: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

#[test]
fn a_put_on_one_node_is_enforced_on_the_other_within_two_sync_intervals() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let interval = Duration::from_secs(1);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&server.url(), "a", da.path(), interval);
    let b = node(&server.url(), "b", db.path(), interval);
    assert!(b.filter(&["gpt-4o"], TEAM).is_ok());

    // A limit of 0 is spent from the start: enforced as soon as it applies.
    let put = a.put_budget(team("0")).unwrap();
    assert!(put.replicated, "{put:?}");
    within(2 * interval, "b enforces a's put", || {
        b.filter(&["gpt-4o"], TEAM).is_err()
    });
    assert_eq!(b.runtime_budgets()[0].node, "a");
    let fields = server.command(&["HKEYS", "provider_budgets:budgets"]);
    assert!(
        fields.contains("tag:team-a:1d") && fields.contains("~changes"),
        "{fields}"
    );

    let gone = a.delete_budget(Scope::Tag, "team-a", None).unwrap();
    assert!(gone.replicated);
    within(2 * interval, "b drops a's deleted budget", || {
        b.filter(&["gpt-4o"], TEAM).is_ok()
    });
    assert!(b.runtime_budgets().is_empty());

    // A node that starts later learns the budgets at its first round; a restarted one keeps
    // them from its data dir.
    a.put_budget(team("0")).unwrap();
    let dc = tempfile::tempdir().unwrap();
    let c = node(&server.url(), "c", dc.path(), interval);
    within(2 * interval, "a new node enforces it", || {
        c.filter(&["gpt-4o"], TEAM).is_err()
    });
    drop(c);
    let c = node("redis://127.0.0.1:1/", "c", dc.path(), interval);
    assert!(c.filter(&["gpt-4o"], TEAM).is_err(), "from its data dir");
}

#[test]
fn concurrent_puts_on_two_nodes_converge_to_one_winner_on_both() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // No timed round in the test: the puts cannot see each other before both are made.
    let interval = Duration::from_secs(3600);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&server.url(), "a", da.path(), interval);
    let b = node(&server.url(), "b", db.path(), interval);
    // Both have read the (empty) hash: neither can see the other's put before making its own.
    a.sync().unwrap();
    b.sync().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| assert!(a.put_budget(team("1")).unwrap().replicated));
        s.spawn(|| assert!(b.put_budget(team("2")).unwrap().replicated));
    });
    a.sync().unwrap();
    b.sync().unwrap();
    // Both wrote version 1: the greater node id wins, on both, whatever reached Redis first.
    assert_eq!(team_limit(&a), Some(2_000_000_000));
    assert_eq!(team_limit(&b), Some(2_000_000_000));
    let held = server.command(&["HGET", "provider_budgets:budgets", "tag:team-a:1d"]);
    assert!(
        held.contains("\"version\":1") && held.contains("\"node\":\"b\""),
        "{held}"
    );

    // A change made after seeing the other beats it, whatever the node id.
    let c = a.put_budget(team("3")).unwrap();
    assert_eq!(c.version, 2);
    b.sync().unwrap();
    assert_eq!(team_limit(&b), Some(3_000_000_000));
    assert_eq!(team_limit(&a), Some(3_000_000_000));
}

#[test]
fn with_redis_down_a_put_stays_local_and_reaches_the_other_node_once_redis_is_back() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let interval = Duration::from_millis(500);
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = node(&server.url(), "a", da.path(), interval);
    let b = node(&server.url(), "b", db.path(), interval);
    server.kill();
    let put = a.put_budget(team("0")).unwrap();
    assert!(!put.replicated, "{put:?}");
    assert!(
        a.filter(&["gpt-4o"], TEAM).is_err(),
        "applies locally at once"
    );
    within(Duration::from_secs(10), "both nodes see redis down", || {
        [&a, &b]
            .iter()
            .all(|l| l.health().replication.last_error.is_some())
    });
    assert!(b.filter(&["gpt-4o"], TEAM).is_ok());

    // Redis comes back empty: a's next round writes the pending put, b's next reads it.
    server.restart();
    within(
        Duration::from_secs(10),
        "b gets the put made while redis was down",
        || b.filter(&["gpt-4o"], TEAM).is_err(),
    );
    assert_eq!(team_limit(&b), Some(0));
    // Redis loses its data again (FLUSHALL): the nodes write their records back.
    server.flushall();
    within(
        Duration::from_secs(10),
        "the nodes write their definitions back",
        || {
            server
                .command(&["HGET", "provider_budgets:budgets", "tag:team-a:1d"])
                .contains("\"node\":\"a\"")
        },
    );
}

#[test]
fn a_node_that_was_down_during_a_delete_does_not_bring_the_budget_back() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let interval = Duration::from_millis(300);
    let clock = FakeClock::new(jiff::Timestamp::now());
    let open = |id: &str, dir: &Path| {
        let mut config = Config::from_yaml_str(FILE).unwrap().data_dir(dir);
        config.node_id = Some(id.to_owned());
        let mut r = RedisConfig::new(server.url());
        r.sync_interval = interval;
        config.redis = Some(r);
        Limiter::builder(config)
            .clock(Arc::new(clock.clone()))
            .open()
            .unwrap()
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open("a", da.path());
    let b = open("b", db.path());
    a.put_budget(team("0")).unwrap();
    within(Duration::from_secs(5), "b gets the put", || {
        b.filter(&["gpt-4o"], TEAM).is_err()
    });
    drop(b);
    let gone = a.delete_budget(Scope::Tag, "team-a", None).unwrap();
    assert_eq!((gone.version, gone.replicated), (2, true));

    // b comes back with version 1 on disk: the tombstone (version 2) wins over it.
    let b = open("b", db.path());
    within(Duration::from_secs(5), "b drops the deleted budget", || {
        b.filter(&["gpt-4o"], TEAM).is_ok()
    });
    let held = server.command(&["HGET", "provider_budgets:budgets", "tag:team-a:1d"]);
    assert!(
        held.contains("\"version\":2") && held.contains("\"deleted\":true"),
        "{held}"
    );

    // Once older than the tombstone retention (30 days here), the tombstone goes everywhere.
    clock.advance(jiff::SignedDuration::from_hours(31 * 24));
    a.sync().unwrap();
    b.sync().unwrap();
    let held = server.command(&["HGETALL", "provider_budgets:budgets"]);
    assert!(!held.contains("tag:team-a:1d"), "{held}");
    // The version goes on from the largest seen.
    assert_eq!(a.put_budget(team("1")).unwrap().version, 3);
}
