//! Identity budgets across the fleet: a team's budget is one budget for every node, whichever
//! node its keys' requests went through, exactly as tag budgets are (the same key layout:
//! `{prefix}:{team:research:1h}:{start}`).

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Identity, Limiter, Money, RedisConfig, Scope};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};
use redis_server::RedisServer;

const BUDGETS: &str = "\
provider_budgets:
  budgets:
    - {key: k1, limit: 2, period: 1h}
    - {team: research, limit: 5, period: 1h}
    - {org: acme, limit: 100, period: 1h}
";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(dir: &Path, url: &str, node: &str) -> Config {
    let mut c = support::yaml(BUDGETS, dir);
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "identity".to_owned();
    // Rounds happen when the test says so.
    r.sync_interval = Duration::from_secs(3600);
    c.redis = Some(r);
    c
}

fn converge(nodes: &[&Limiter]) {
    for _ in 0..2 {
        for n in nodes {
            n.sync().unwrap();
        }
    }
}

/// (key name, spend) of every budget on a node.
fn spend(l: &Limiter) -> Vec<(String, Money)> {
    l.status(StatusQuery::all())
        .into_iter()
        .map(|s| (s.provider, s.spend))
        .collect()
}

#[test]
fn a_teams_budget_is_shared_by_the_fleet_like_a_tags() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let now = Timestamp::now().as_second();
    // Mid-hour, near real time (Redis expires keys by its own clock).
    let start = now - now.rem_euclid(3600);
    let clock = Arc::new(FakeClock::new(
        Timestamp::from_second(start + 1800).unwrap(),
    ));
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = support::open(config(da.path(), &server.url(), "a"), &clock);
    let b = support::open(config(db.path(), &server.url(), "b"), &clock);
    let k1 = Identity::new().key("k1").team("research").org("acme");
    let k2 = Identity::new().key("k2").team("research").org("acme");
    // k1's requests go through node a, k2's through node b: 3 + 1.5 of the team's 5.
    a.charge(Spend::deployment("gpt-4o", usd("3")).identity(&k1))
        .unwrap();
    b.charge(Spend::deployment("gpt-4o", usd("1.5")).identity(&k2))
        .unwrap();
    assert!(
        b.filter_for(&["gpt-4o"], NO_TAGS, &k1).is_ok(),
        "b has not heard of k1's spend yet"
    );
    converge(&[&a, &b]);
    let want = vec![
        ("key:k1".to_string(), usd("3")),
        ("team:research".into(), usd("4.5")),
        ("org:acme".into(), usd("4.5")),
    ];
    assert_eq!(spend(&a), want);
    assert_eq!(spend(&b), want);
    // Node b now refuses k1 (its key is spent on a), and still admits k2 (0.5 left).
    let e = b.filter_for(&["gpt-4o"], NO_TAGS, &k1).unwrap_err();
    assert_eq!(
        e.exceeded
            .iter()
            .map(|e| (e.scope, e.name.as_str()))
            .collect::<Vec<_>>(),
        [(Scope::Key, "k1")]
    );
    assert!(b.filter_for(&["gpt-4o"], NO_TAGS, &k2).is_ok());
    // The team's last half dollar spent on b closes the team on a too.
    b.charge(Spend::deployment("gpt-4o", usd("0.5")).identity(&k2))
        .unwrap();
    converge(&[&a, &b]);
    let e = a.filter_for(&["gpt-4o"], NO_TAGS, &k2).unwrap_err();
    assert_eq!(e.exceeded[0].scope, Scope::Team);
    assert_eq!(e.exceeded[0].spend, usd("5"));
    // The Redis keys follow the layout of the other scopes.
    let keys = server.command(&["KEYS", "identity:*"]);
    for tag in ["{key:k1:1h}", "{team:research:1h}", "{org:acme:1h}"] {
        assert!(
            keys.contains(&format!("identity:{tag}:{start}")),
            "{tag} in {keys}"
        );
    }
}
