//! Corrections across the fleet: a credit recorded on one node is known to every node after
//! a round, counts once whatever happens to Redis (FLUSHALL, a node restarted), and credits
//! of several nodes add up (a PN-counter of per-node grow-only totals).

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use provider_budgets::{Adjustment, Config, FakeClock, Limiter, Money, RedisConfig};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};
use redis_server::RedisServer;

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(dir: &Path, url: &str, node: &str) -> Config {
    let mut c = Config::new()
        .budget("openai", usd("1"), "1h".parse().unwrap())
        .data_dir(dir);
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "corrections".to_owned();
    // Rounds happen when the test says so.
    r.sync_interval = Duration::from_secs(3600);
    c.redis = Some(r);
    c
}

/// (spend net, credited, exhausted) of openai on a node.
fn row(l: &Limiter) -> (Money, Money, bool) {
    let s = l
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap();
    (s.spend, s.credited, s.exhausted)
}

fn converge(nodes: &[&Limiter]) {
    for _ in 0..2 {
        for n in nodes {
            n.sync().unwrap();
        }
    }
}

#[test]
fn a_credit_on_one_node_counts_once_on_every_node() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let now = Timestamp::now().as_second();
    // Mid-hour, near real time (Redis expires keys by its own clock).
    let clock = Arc::new(FakeClock::new(
        Timestamp::from_second(now - now.rem_euclid(3600) + 1800).unwrap(),
    ));
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = support::open(config(da.path(), &server.url(), "a"), &clock);
    let b = support::open(config(db.path(), &server.url(), "b"), &clock);
    a.charge(Spend::provider("openai", usd("0.8"))).unwrap();
    b.charge(Spend::provider("openai", usd("0.4"))).unwrap();
    converge(&[&a, &b]);
    assert_eq!(row(&b), (usd("1.2"), Money::ZERO, true));
    assert!(b.filter(&["gpt-4o"], NO_TAGS).is_err());

    a.adjust(Adjustment::credit("openai", usd("0.5"), "refunded call").by("ops"))
        .unwrap();
    converge(&[&a, &b]);
    for n in [&a, &b] {
        assert_eq!(row(n), (usd("0.7"), usd("0.5"), false));
    }
    assert_eq!(b.filter(&["gpt-4o"], NO_TAGS).unwrap().len(), 1);

    // A second node's credit adds to the first's.
    b.adjust(Adjustment::credit("openai", usd("0.2"), "test traffic"))
        .unwrap();
    converge(&[&a, &b]);
    for n in [&a, &b] {
        assert_eq!(row(n), (usd("0.5"), usd("0.7"), false));
    }

    // Redis loses everything: the nodes ship their absolute totals again, nothing doubles.
    server.flushall();
    converge(&[&a, &b]);
    for n in [&a, &b] {
        assert_eq!(row(n), (usd("0.5"), usd("0.7"), false));
    }

    // A restarted node finds its credit on disk and the other's through Redis.
    drop(a);
    let a = support::open(config(da.path(), &server.url(), "a"), &clock);
    converge(&[&a, &b]);
    for n in [&a, &b] {
        assert_eq!(row(n), (usd("0.5"), usd("0.7"), false));
    }
    // A new node learns both credits from Redis alone.
    let dc = tempfile::tempdir().unwrap();
    let c = support::open(config(dc.path(), &server.url(), "c"), &clock);
    converge(&[&a, &b, &c]);
    assert_eq!(row(&c), (usd("0.5"), usd("0.7"), false));
}

/// Reserves and commits $0.25 on alternating nodes until both were denied 20 times in a row;
/// returns how many were committed.
fn spend_until_denied(a: &Limiter, b: &Limiter) -> u64 {
    let quarter = usd("0.25");
    let (mut committed, mut denied_in_a_row) = (0u64, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while denied_in_a_row < 20 {
        assert!(std::time::Instant::now() < deadline, "never exhausted");
        let node = if committed.is_multiple_of(2) { a } else { b };
        match node.reserve(&[&"strict/m"], quarter).wait() {
            Ok(r) => {
                r.commit(quarter).unwrap().wait().unwrap();
                committed += 1;
                denied_in_a_row = 0;
            }
            Err(_) => {
                denied_in_a_row += 1;
                let _ = a.sync();
                let _ = b.sync();
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    committed
}

/// A strict budget spent to its limit: a credit gives the fleet room to grant again, as much
/// as the credit and no more (net spend stays within the limit).
#[test]
fn a_credit_frees_room_in_a_strict_budget_and_no_more() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(Timestamp::now()));
    let strict = |dir: &Path, node: &str| {
        let mut c = config(dir, &server.url(), node);
        c.budgets = Config::from_yaml_str(
            "provider_budgets:\n  budgets:\n    - {provider: strict, limit: 10, period: 1h, enforcement: strict}\n",
        )
        .unwrap()
        .budgets;
        let r = c.redis.as_mut().unwrap();
        r.sync_interval = Duration::from_millis(100);
        r.prefix = "corrections-strict".to_owned();
        support::open(c, &clock)
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (strict(da.path(), "a"), strict(db.path(), "b"));
    let first = spend_until_denied(&a, &b);
    assert!(
        (36..=40).contains(&first),
        "{first} × $0.25 before the credit"
    );

    a.adjust(Adjustment::credit("strict", usd("5"), "refund").period("1h".parse().unwrap()))
        .unwrap();
    let second = spend_until_denied(&a, &b);
    assert!(
        first + second <= 60,
        "{first} + {second} × $0.25: more than the limit plus the credit"
    );
    assert!(
        second >= 12,
        "only {second} × $0.25 granted after a $5 credit"
    );
    converge(&[&a, &b]);
    let (spend, credited, _) = {
        let s = b
            .status(StatusQuery::provider("strict"))
            .into_iter()
            .next()
            .unwrap();
        (s.spend, s.credited, s.exhausted)
    };
    assert_eq!(credited, usd("5"));
    assert!(spend <= usd("10"), "net spend {spend} over the limit");
}
