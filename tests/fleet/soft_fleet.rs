//! Soft limits fire once per window per threshold per fleet when Redis is configured: two
//! nodes (two data dirs) that both see a threshold crossed in their own view claim it with
//! `SET NX` in a real `redis-server`; exactly one fires. Without Redis each node fires once;
//! with Redis down a node fires rather than lose the alert.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::redis_server;

use std::sync::{Arc, Mutex};

use provider_budgets::Spend;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig, SoftLimitCrossed};
use redis_server::RedisServer;

type Fired = Arc<Mutex<Vec<(String, f64)>>>;

fn node(
    redis: Option<&str>,
    id: &str,
    dir: &tempfile::TempDir,
    clock: &FakeClock,
    fired: &Fired,
) -> Limiter {
    let mut config = Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {tag: t, limit: 10, period: 1d, soft_limits: [0.5, 0.9]}\n",
    )
    .unwrap()
    .data_dir(dir.path());
    config.node_id = Some(id.to_owned());
    if let Some(url) = redis {
        let mut r = RedisConfig::new(url);
        r.connect_timeout = std::time::Duration::from_millis(500);
        r.command_timeout = std::time::Duration::from_millis(500);
        config.redis = Some(r);
    }
    let l = Limiter::builder(config)
        .clock(Arc::new(clock.clone()))
        .open()
        .unwrap();
    let sink = Arc::clone(fired);
    let me = id.to_owned();
    l.on_soft_limit(move |e: &SoftLimitCrossed| {
        sink.lock()
            .unwrap()
            .push((me.clone(), e.soft_limit.fraction()));
    });
    l
}

fn usd(n: u64) -> Money {
    Money::from_nanos(n * 1_000_000_000)
}

fn fractions(fired: &Fired) -> Vec<f64> {
    let mut f: Vec<f64> = fired.lock().unwrap().iter().map(|x| x.1).collect();
    f.sort_by(f64::total_cmp);
    f
}

#[test]
fn two_nodes_crossing_the_same_threshold_fire_once_through_redis() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // The real time: alert keys expire at the window's end (+ grace), which must be ahead.
    let clock = FakeClock::new(jiff::Timestamp::now());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fired: Fired = Arc::default();
    let a = node(Some(&server.url()), "n1", &da, &clock, &fired);
    let b = node(Some(&server.url()), "n2", &db, &clock, &fired);
    // Each node's own spend crosses 0.5 in its own view (6 of 10), then 0.9 (10 of 10).
    a.charge(Spend::deployment("x", usd(6)).tags(&["t"]))
        .unwrap();
    b.charge(Spend::deployment("x", usd(6)).tags(&["t"]))
        .unwrap();
    a.charge(Spend::deployment("x", usd(4)).tags(&["t"]))
        .unwrap();
    b.charge(Spend::deployment("x", usd(4)).tags(&["t"]))
        .unwrap();
    drop(a); // waits for its alert thread: every claim answered
    drop(b);
    assert_eq!(fractions(&fired), [0.5, 0.9], "{:?}", fired.lock().unwrap());
    // The claims are in Redis, under the budget's hash tag, one per threshold.
    let keys = server.command(&["KEYS", "provider_budgets:{tag:t:1d}:alert:*"]);
    assert!(
        keys.contains(":500000") && keys.contains(":900000"),
        "{keys}"
    );
}

#[test]
fn without_redis_each_node_fires_once_per_window() {
    let clock = FakeClock::new("2024-06-01T12:00:00Z".parse().unwrap());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fired: Fired = Arc::default();
    let a = node(None, "n1", &da, &clock, &fired);
    let b = node(None, "n2", &db, &clock, &fired);
    for _ in 0..2 {
        a.charge(Spend::deployment("x", usd(6)).tags(&["t"]))
            .unwrap();
        b.charge(Spend::deployment("x", usd(6)).tags(&["t"]))
            .unwrap();
    }
    assert_eq!(fractions(&fired), [0.5, 0.5, 0.9, 0.9]);
}

#[test]
fn with_redis_down_a_node_fires_rather_than_lose_the_alert() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let url = server.url();
    let clock = FakeClock::new("2024-06-01T12:00:00Z".parse().unwrap());
    let d = tempfile::tempdir().unwrap();
    let fired: Fired = Arc::default();
    let a = node(Some(&url), "n1", &d, &clock, &fired);
    server.kill();
    a.charge(Spend::deployment("x", usd(6)).tags(&["t"]))
        .unwrap();
    drop(a);
    assert_eq!(fractions(&fired), [0.5]);
}
