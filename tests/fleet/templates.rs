//! Templates across the fleet, through a real `redis-server`: a templated series is one
//! series for every node (the same key as an explicit budget of the name would have), so a
//! name's spend on one node is counted on another from the first round after that node
//! makes the series; a template put at runtime on one node makes series on another within two
//! sync intervals; a Redis restart (FLUSHALL) loses nothing of a templated series; clean
//! templated series cost Redis no read per round (tracking, as any budget).

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use provider_budgets::{
    BudgetConfig, BudgetFields, Config, FakeClock, Identity, Limiter, Money, RedisConfig, Scope,
    Spend, StatusQuery, NO_TAGS,
};
use redis_server::RedisServer;

const TEMPLATE: &str = "\
provider_budgets:
  budgets:
    - {key: \"*\", limit: 2, period: 1h}
";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(yaml: &str, dir: &Path, url: &str, node: &str, interval: Duration) -> Config {
    let mut c = support::yaml(yaml, dir);
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "templates".to_owned();
    r.sync_interval = interval;
    r.connect_timeout = Duration::from_millis(500);
    r.command_timeout = Duration::from_millis(500);
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

/// The spend of key `name`'s series on `l` (None: no series there).
fn key_spend(l: &Limiter, name: &str) -> Option<Money> {
    l.status(StatusQuery::all().scope(Scope::Key).name(name))
        .first()
        .map(|s| s.spend)
}

fn charge(l: &Limiter, name: &str, cost: &str) {
    let id = Identity::new().key(name);
    l.charge(Spend::deployment("gpt-4o", usd(cost)).identity(&id))
        .unwrap()
        .wait()
        .unwrap();
}

/// Nodes "a" and "b" on `yaml`, sharing `server`, each on its own data dir (returned: the
/// dirs live as long as the test needs them).
fn two_nodes(
    yaml: &str,
    server: &RedisServer,
    interval: Duration,
    clock: &Arc<FakeClock>,
) -> (Limiter, Limiter, [tempfile::TempDir; 2]) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let open = |dir: &tempfile::TempDir, id: &str| {
        support::open(config(yaml, dir.path(), &server.url(), id, interval), clock)
    };
    (open(&dirs[0], "a"), open(&dirs[1], "b"), dirs)
}

/// A fake clock mid-hour, near real time (Redis expires keys by its own clock).
fn mid_hour() -> Arc<FakeClock> {
    let now = Timestamp::now().as_second();
    let start = now - now.rem_euclid(3600);
    Arc::new(FakeClock::new(
        Timestamp::from_second(start + 1800).unwrap(),
    ))
}

#[test]
fn a_names_series_is_one_series_for_the_fleet() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = mid_hour();
    let hour = Duration::from_secs(3600); // rounds when the test says so
    let (a, b, dirs) = two_nodes(TEMPLATE, &server, hour, &clock);
    charge(&a, "k1", "1.5");
    converge(&[&a, &b]);
    assert_eq!(
        key_spend(&b, "k1"),
        None,
        "b has not seen k1: no series there"
    );
    // k1's first request through b makes its series there; the next round brings a's spend.
    charge(&b, "k1", "0.1");
    converge(&[&a, &b]);
    assert_eq!(key_spend(&b, "k1"), Some(usd("1.6")));
    assert_eq!(key_spend(&a, "k1"), Some(usd("1.6")));
    charge(&a, "k1", "0.4");
    converge(&[&a, &b]);
    let k1 = Identity::new().key("k1");
    for n in [&a, &b] {
        assert!(
            n.filter_for(&["gpt-4o"], NO_TAGS, &k1).is_err(),
            "k1 spent 2.0"
        );
        assert!(n
            .filter_for(&["gpt-4o"], NO_TAGS, &Identity::new().key("k2"))
            .is_ok());
    }
    // The same keys as an explicit budget of the name: one key per window in Redis.
    let keys = server.command(&["KEYS", "templates:{key:k1:1h}*"]);
    assert!(keys.contains("templates:{key:k1:1h}"), "{keys}");

    // Redis loses everything: the nodes send their own totals again, nothing is lost.
    server.command(&["FLUSHALL"]);
    converge(&[&a, &b]);
    assert_eq!(key_spend(&a, "k1"), Some(usd("2")));
    assert_eq!(key_spend(&b, "k1"), Some(usd("2")));

    // A restarted node resumes k1's series from its data dir and Redis.
    drop(b);
    let b = support::open(
        config(TEMPLATE, dirs[1].path(), &server.url(), "b", hour),
        &clock,
    );
    converge(&[&a, &b]);
    assert_eq!(key_spend(&b, "k1"), Some(usd("2")));
}

#[test]
fn a_template_put_on_one_node_makes_series_on_the_other_within_two_intervals() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let interval = Duration::from_secs(1);
    let plain = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";
    let clock = Arc::new(FakeClock::new(Timestamp::now()));
    let (a, b, _dirs) = two_nodes(plain, &server, interval, &clock);
    let mut fields = BudgetFields::new("0", "1d");
    fields.max_series = Some(5);
    let template = BudgetConfig::from_fields(Scope::Customer, "*", &fields).unwrap();
    let put = a.put_budget(template).unwrap();
    assert!(put.replicated, "{put:?}");
    let acme = Identity::new().customer("acme");
    let start = Instant::now();
    while b.filter_for(&["gpt-4o"], NO_TAGS, &acme).is_ok() {
        assert!(
            start.elapsed() < 2 * interval,
            "b does not enforce a's template"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = b.filter_for(&["gpt-4o"], NO_TAGS, &acme).unwrap_err();
    assert!(
        err.template_refused
            .as_deref()
            .is_some_and(|w| w.contains("zero limit")),
        "{err}"
    );
}

#[test]
fn a_strict_template_grants_each_new_name_and_holds_its_limit_across_nodes() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let yaml = "\
provider_budgets:
  budgets:
    - {key: \"*\", limit: 1, period: 1h, enforcement: strict}
";
    let interval = Duration::from_millis(200);
    let clock = mid_hour();
    let (a, b, _dirs) = two_nodes(yaml, &server, interval, &clock);
    let first = Instant::now();
    let mut refused_first = 0;
    // Each node spends on the same keys until refused: the fleet never passes a key's 1 USD.
    for name in ["k1", "k2", "k3"] {
        let id = Identity::new().key(name);
        let mut admitted = [0u64; 2];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut denials = 0;
        while denials < 30 && Instant::now() < deadline {
            let mut any = false;
            for (i, n) in [&a, &b].into_iter().enumerate() {
                match n.reserve(&["gpt-4o"], usd("0.07")).identity(&id).wait() {
                    Ok(r) => {
                        r.commit(usd("0.07")).unwrap().wait().unwrap();
                        admitted[i] += 1;
                        any = true;
                    }
                    Err(_) => {
                        if admitted[i] == 0 {
                            refused_first += 1;
                        }
                    }
                }
            }
            if any {
                denials = 0;
            } else {
                denials += 1;
                std::thread::sleep(interval / 4);
            }
        }
        let spent = 7 * (admitted[0] + admitted[1]);
        assert!(spent <= 100, "{name}: the fleet spent {spent} cents of 100");
        assert!(
            spent >= 70,
            "{name}: {spent} cents: grants reached the nodes"
        );
    }
    eprintln!(
        "first reservations refused before a grant: {refused_first} ({:?})",
        first.elapsed()
    );
}

#[test]
fn clean_templated_series_cost_redis_no_read_per_round() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = mid_hour();
    let hour = Duration::from_secs(3600);
    let (a, b, _dirs) = two_nodes(TEMPLATE, &server, hour, &clock);
    for i in 0..50 {
        charge(&a, &format!("k{i}"), "0.01");
        charge(&b, &format!("k{i}"), "0.01");
    }
    for _ in 0..3 {
        converge(&[&a, &b]);
    }
    a.sync().unwrap();
    let round = a.status(StatusQuery::all()).remove(0).replication;
    assert!(round.tracking, "tracking is on");
    assert_eq!(round.last_round.keys_written, 0);
    assert!(round.last_round.keys_read >= 50, "{:?}", round.last_round);
    assert_eq!(
        round.last_round.keys_unchanged, round.last_round.keys_read,
        "every clean templated window is known unchanged: {:?}",
        round.last_round
    );
    assert_eq!(key_spend(&a, "k49"), Some(usd("0.02")));
}
