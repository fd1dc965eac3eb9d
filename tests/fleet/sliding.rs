//! `window: sliding` across a fleet: node B's spend late in the previous window, replicated
//! through a real `redis-server`, refuses node A just after the boundary (a fixed budget of
//! the same spend admits it). Node A never spent in that window: it learns B's total because
//! a sliding budget's previous window is read every round.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::time::Duration;

use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig, Spend, StatusQuery};
use redis_server::RedisServer;

const YAML: &str = "provider_budgets:
  budgets:
    - {tag: s, limit: 1, period: 1h, window: sliding}
    - {tag: f, limit: 1, period: 1h}
";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn node(dir: &Path, url: &str, id: &str, clock: &FakeClock) -> Limiter {
    let mut c = Config::from_yaml_str(YAML).unwrap().data_dir(dir);
    c.node_id = Some(id.to_owned());
    let mut r = RedisConfig::new(url);
    // Rounds happen when the test says so.
    r.sync_interval = Duration::from_secs(3600);
    r.connect_timeout = Duration::from_millis(500);
    r.command_timeout = Duration::from_millis(500);
    c.redis = Some(r);
    support::open(c, clock)
}

fn admits(l: &Limiter, tag: &str, estimate: &str) -> bool {
    match l.reserve(&["gpt-4o"], usd(estimate)).tags(&[tag]).wait() {
        Ok(r) => {
            r.release().unwrap();
            true
        }
        Err(_) => false,
    }
}

#[test]
fn a_peers_spend_in_the_previous_window_refuses_a_node_under_sliding() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    // The last minute of the previous real hour: near real time, because Redis expires keys
    // by its own clock (`EXPIREAT` after the window, the next one and the grace).
    let now = Timestamp::now().as_second();
    let boundary = now - now.rem_euclid(3600);
    let clock = FakeClock::new(Timestamp::from_second(boundary - 60).unwrap());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = server.url();
    let a = node(da.path(), &url, "node-a", &clock);
    let b = node(db.path(), &url, "node-b", &clock);
    b.charge(Spend::deployment("gpt-4o", usd("0.9")).tags(&["s", "f"]))
        .unwrap();
    b.sync().unwrap();
    // The sliding budget's key lives one window longer (the next window still counts it).
    let ttl = |tag: &str| -> i64 {
        let key = format!("provider_budgets:{{tag:{tag}:1h}}:{}", boundary - 3600);
        server.command(&["TTL", &key]).parse().unwrap()
    };
    let (sliding, fixed) = (ttl("s"), ttl("f"));
    assert!(
        fixed > 0 && (3590..=3610).contains(&(sliding - fixed)),
        "{sliding} {fixed}"
    );

    // One second into the new window: 3599/3600 of B's 0.9 still counts for `s`.
    clock.set(Timestamp::from_second(boundary + 1).unwrap());
    a.sync().unwrap();
    let row = |tag: &str| {
        a.status(StatusQuery::all())
            .into_iter()
            .find(|s| s.name == tag)
            .unwrap()
    };
    assert_eq!(row("s").sliding_spend, Some(usd("0.89975")));
    assert_eq!(row("s").spend, Money::ZERO);
    assert!(!admits(&a, "s", "0.5"), "0.89975 + 0.5 > 1");
    assert!(admits(&a, "s", "0.1"));
    assert!(
        admits(&a, "f", "0.5"),
        "fixed: the new window starts from zero"
    );
    assert!(a.filter(&["gpt-4o"], &["s"]).is_ok(), "0.89975 < 1");
    // A's own spend on top of B's weighted spend: the tag is spent for A.
    a.charge(Spend::deployment("gpt-4o", usd("0.11")).tags(&["s"]))
        .unwrap();
    assert!(a.filter(&["gpt-4o"], &["s"]).is_err());
    // Later in the window the previous one weighs less: room again.
    clock.set(Timestamp::from_second(boundary + 1800).unwrap());
    assert!(a.filter(&["gpt-4o"], &["s"]).is_ok());
    assert_eq!(row("s").sliding_spend, Some(usd("0.56")));
}

#[test]
fn a_runtime_sliding_budget_replicates_with_its_window() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = FakeClock::new(Timestamp::now());
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let url = server.url();
    let a = node(da.path(), &url, "node-a", &clock);
    let b = node(db.path(), &url, "node-b", &clock);
    let mut fields = provider_budgets::BudgetFields::new("2", "1d");
    fields.window = Some("sliding".into());
    let budget =
        provider_budgets::BudgetConfig::from_fields(provider_budgets::Scope::Team, "t", &fields)
            .unwrap();
    assert!(a.put_budget(budget).unwrap().replicated);
    let stored = server.command(&["HGET", "provider_budgets:budgets", "team:t:1d"]);
    assert!(stored.contains("\"window\":\"sliding\""), "{stored}");
    b.sync().unwrap();
    let row = b
        .status(StatusQuery::all().scope(provider_budgets::Scope::Team))
        .pop()
        .unwrap_or_else(|| panic!("not applied on b: {:?}", b.runtime_budgets()));
    assert_eq!(row.window_shape, provider_budgets::WindowShape::Sliding);
    assert_eq!(row.sliding_spend, Some(Money::ZERO));
}
