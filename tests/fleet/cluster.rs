//! Fleet replication through a real Redis Cluster started by the test (`redis-server
//! --cluster-enabled yes` × N, `redis-cli --cluster create`): a single node's URL is detected
//! as a cluster, a list of seed URLs works, budgets spread over the masters by their hash tag,
//! a round sends one pipeline per master, a master that is down fails only its budgets, and
//! after a failover (replica promoted) the fleet totals are exact again.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig};
use provider_budgets::{Spend, StatusQuery};
use redis_server::RedisCluster;

const PROVIDERS: [&str; 6] = ["p0", "p1", "p2", "p3", "p4", "p5"];

fn now() -> Timestamp {
    Timestamp::from_second(Timestamp::now().as_second()).unwrap()
}

fn hour_start(now: Timestamp) -> i64 {
    now.as_second() - now.as_second().rem_euclid(3600)
}

fn config(dir: &Path, urls: &[String], node: &str) -> Config {
    let mut c = Config::new().data_dir(dir);
    for p in PROVIDERS {
        c = c.budget(p, Money::from_nanos(u64::MAX / 4), "1h".parse().unwrap());
    }
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(urls[0].clone());
    r.seeds = urls[1..].to_vec();
    r.prefix = "cl".into();
    r.sync_interval = Duration::from_secs(3600);
    r.connect_timeout = Duration::from_millis(500);
    r.command_timeout = Duration::from_millis(1000);
    c.redis = Some(r);
    c
}

fn open(dir: &Path, urls: &[String], node: &str, at: Timestamp) -> Limiter {
    support::open(config(dir, urls, node), &FakeClock::new(at))
}

fn spend(l: &Limiter, provider: &str) -> u64 {
    l.status(StatusQuery::provider(provider))
        .into_iter()
        .next()
        .unwrap()
        .spend
        .as_nanos()
}

fn key(provider: &str, at: Timestamp) -> String {
    format!("cl:{{{provider}:1h}}:{}", hour_start(at))
}

#[test]
fn two_nodes_are_exact_on_a_three_master_cluster_one_pipeline_per_master() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let at = now();
    let masters: std::collections::BTreeSet<usize> = PROVIDERS
        .iter()
        .map(|p| cluster.master_of(&key(p, at)))
        .collect();
    assert!(masters.len() >= 2, "budgets all on one master: {masters:?}");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // One node finds the cluster from a single node's URL; the other gets a list of seeds
    // whose first one is down.
    let a = open(da.path(), &[cluster.url(0)], "a", at);
    let b = open(
        db.path(),
        &["redis://127.0.0.1:1/".to_owned(), cluster.url(2)],
        "b",
        at,
    );
    let mut expected = [0u64; 6];
    for k in 0..120u64 {
        let p = (k % 6) as usize;
        let cost = 1 + k * 7_919 % 100_003;
        let node = if k % 3 == 0 { &a } else { &b };
        node.charge(Spend::provider(PROVIDERS[p], Money::from_nanos(cost)))
            .unwrap();
        expected[p] += cost;
    }
    for _ in 0..2 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    for (p, want) in PROVIDERS.iter().zip(expected) {
        assert_eq!(spend(&a, p), want, "{p} at a");
        assert_eq!(spend(&b, p), want, "{p} at b");
        // Stored on the master of its hash tag.
        let m = cluster.master_of(&key(p, at));
        assert_eq!(
            cluster.nodes[m].command(&["HGET", &key(p, at), "~total"]),
            want.to_string()
        );
    }
    // One pipeline per master that serves a budget, per round.
    let before = a
        .status(StatusQuery::provider("p0"))
        .into_iter()
        .next()
        .unwrap()
        .replication
        .round_trips;
    a.sync().unwrap();
    let after = a
        .status(StatusQuery::provider("p0"))
        .into_iter()
        .next()
        .unwrap()
        .replication
        .round_trips;
    assert_eq!(after - before, masters.len() as u64);
}

#[test]
fn a_master_that_is_down_fails_only_its_budgets() {
    let Some(mut cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let at = now();
    let dir = tempfile::tempdir().unwrap();
    let a = open(dir.path(), &[cluster.url(0)], "a", at);
    for p in PROVIDERS {
        a.charge(Spend::provider(p, Money::from_nanos(5))).unwrap();
    }
    a.sync().unwrap();
    // Kill a master serving some budgets, not node 0 (the first seed stays reachable).
    let victim = PROVIDERS
        .iter()
        .map(|p| cluster.master_of(&key(p, at)))
        .find(|&m| m != 0)
        .expect("a budget on a master other than node 0");
    let dead_providers: Vec<&str> = PROVIDERS
        .iter()
        .copied()
        .filter(|p| cluster.master_of(&key(p, at)) == victim)
        .collect();
    let seeds = vec![cluster.url(0), cluster.url(1), cluster.url(2)];
    drop(a);
    let a = open(dir.path(), &seeds, "a", at);
    a.sync().unwrap();
    cluster.nodes[victim].kill();
    for p in PROVIDERS {
        a.charge(Spend::provider(p, Money::from_nanos(1))).unwrap();
    }
    let started = Instant::now();
    // The round succeeds: the live masters' budgets sync; the dead one's are problems.
    a.sync().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for p in PROVIDERS {
        let status = a
            .status(StatusQuery::provider(p))
            .into_iter()
            .next()
            .unwrap();
        let m = cluster.nodes[victim].port();
        if dead_providers.contains(&p) {
            let problem = status.replication_problem.unwrap_or_default();
            assert!(problem.contains(&format!(":{m}")), "{p}: {problem}");
            assert!(!problem.contains('\n'));
        } else {
            assert_eq!(status.replication_problem, None, "{p}");
            let k = key(p, at);
            let owner = cluster.master_of(&k);
            assert_eq!(cluster.nodes[owner].command(&["HGET", &k, "a"]), "6", "{p}");
        }
    }
    assert!(!dead_providers.is_empty() && dead_providers.len() < PROVIDERS.len());
}

#[test]
fn fleet_totals_are_exact_after_a_master_fails_over_to_its_replica() {
    let Some(mut cluster) = RedisCluster::start(3, 1) else {
        return;
    };
    let at = now();
    let seeds: Vec<String> = (0..cluster.nodes.len()).map(|i| cluster.url(i)).collect();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), &seeds, "a", at);
    let b = open(db.path(), &seeds[1..], "b", at);
    let mut expected = [0u64; 6];
    let spend_round = |cost: u64, expected: &mut [u64; 6]| {
        for (i, p) in PROVIDERS.iter().enumerate() {
            a.charge(Spend::provider(p, Money::from_nanos(cost)))
                .unwrap();
            b.charge(Spend::provider(p, Money::from_nanos(2 * cost)))
                .unwrap();
            expected[i] += 3 * cost;
        }
    };
    spend_round(10, &mut expected);
    for _ in 0..2 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    // Kill the master of p0; its replica takes over after the node timeout (1 s). Redis
    // replication is asynchronous, so the promoted replica may have lost the last writes:
    // the nodes notice their fields are missing and send them again.
    let victim = cluster.master_of(&key("p0", at));
    cluster.nodes[victim].kill();
    spend_round(100, &mut expected);
    cluster
        .wait_until("a replica is promoted", Duration::from_secs(20), |c| {
            c.masters().len() == 3
                && c.nodes
                    .iter()
                    .filter(|n| n.alive())
                    .all(|n| n.command(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        })
        .unwrap_or_else(|e| {
            let live = cluster.nodes.iter().find(|n| n.alive()).unwrap();
            let logs: Vec<String> = cluster
                .nodes
                .iter()
                .filter(|n| n.alive())
                .map(|n| {
                    let text =
                        std::fs::read_to_string(n.dir().join("redis.log")).unwrap_or_default();
                    let lines: Vec<&str> = text.lines().collect();
                    format!(
                        "--- {}\n{}",
                        n.port(),
                        lines[lines.len().saturating_sub(8)..].join("\n")
                    )
                })
                .collect();
            panic!(
                "{e}: {}\n{}",
                live.command(&["CLUSTER", "NODES"]),
                logs.join("\n")
            )
        });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let _ = a.sync();
        let _ = b.sync();
        let exact = PROVIDERS.iter().zip(expected).all(|(p, want)| {
            spend(&a, p) == want
                && spend(&b, p) == want
                && a.status(StatusQuery::provider(p))
                    .into_iter()
                    .next()
                    .unwrap()
                    .replication_problem
                    .is_none()
        });
        if exact {
            break;
        }
        assert!(Instant::now() < deadline, "not exact after the failover");
        std::thread::sleep(Duration::from_millis(50));
    }
    for (p, want) in PROVIDERS.iter().zip(expected) {
        let k = key(p, at);
        let owner = cluster.master_of(&k);
        assert_eq!(
            cluster.nodes[owner].command(&["HGET", &k, "~total"]),
            want.to_string(),
            "{p}"
        );
    }
}

#[test]
fn soft_limit_claims_go_to_the_master_of_their_slot() {
    // Two nodes seeded with a master that does NOT serve the alert keys' slot: each claim is
    // redirected (`MOVED`) to the right master, so every threshold fires exactly once in the
    // fleet (a claim that failed on the redirect would fire locally on both nodes).
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let alert_keys = "cl:{tag:t:1d}:alert:*";
    let serving = cluster.master_of("cl:{tag:t:1d}:alert:0:500000");
    let seed = cluster
        .masters()
        .into_iter()
        .find(|&i| i != serving)
        .unwrap();
    type Fired = Arc<std::sync::Mutex<Vec<(String, f64)>>>;
    let fired: Fired = Arc::default();
    let clock = FakeClock::new(Timestamp::now());
    let node = |id: &str, dir: &tempfile::TempDir| {
        let mut c = Config::from_yaml_str(
            "provider_budgets:\n  budgets:\n    - {tag: t, limit: 10, period: 1d, soft_limits: [0.5, 0.9]}\n",
        )
        .unwrap()
        .data_dir(dir.path());
        c.node_id = Some(id.to_owned());
        let mut r = RedisConfig::new(cluster.url(seed));
        r.prefix = "cl".into();
        r.connect_timeout = Duration::from_millis(500);
        r.command_timeout = Duration::from_millis(1000);
        c.redis = Some(r);
        let l = Limiter::builder(c)
            .clock(Arc::new(clock.clone()))
            .open()
            .unwrap();
        let (sink, me) = (Arc::clone(&fired), id.to_owned());
        l.on_soft_limit(move |e| {
            sink.lock()
                .unwrap()
                .push((me.clone(), e.soft_limit.fraction()))
        });
        l
    };
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (node("n1", &da), node("n2", &db));
    let usd = |n: u64| Money::from_nanos(n * 1_000_000_000);
    for cost in [6, 4] {
        a.charge(Spend::deployment("x", usd(cost)).tags(&["t"]))
            .unwrap();
        b.charge(Spend::deployment("x", usd(cost)).tags(&["t"]))
            .unwrap();
    }
    drop(a); // waits for its alert thread: every claim answered
    drop(b);
    let mut fractions: Vec<f64> = fired.lock().unwrap().iter().map(|f| f.1).collect();
    fractions.sort_by(f64::total_cmp);
    assert_eq!(fractions, [0.5, 0.9], "{:?}", fired.lock().unwrap());
    // The claims live on the serving master, none on the seed.
    let on = |i: usize| cluster.nodes[i].command(&["KEYS", alert_keys]);
    assert!(
        on(serving).contains(":500000") && on(serving).contains(":900000"),
        "{}",
        on(serving)
    );
    assert!(!on(seed).contains(":alert:"), "{}", on(seed));
}

/// Strict budgets on a cluster: the merge script also touches the budget's strict
/// marker key, which shares the budget's hash tag, so grants work per budget on its master;
/// two nodes reserving until denied never pass the limit of any budget.
#[test]
fn strict_budgets_grant_within_the_limit_on_a_cluster() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let at = now();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let strict = |dir: &Path, node: &str| {
        let mut c = config(dir, &[cluster.url(0)], node);
        c.budgets = Config::from_yaml_str(
            "provider_budgets:\n  budgets:\n    - {provider: p0, limit: 10, period: 1h, enforcement: strict}\n    - {provider: p3, limit: 10, period: 1h, enforcement: strict}\n",
        )
        .unwrap()
        .budgets;
        c.redis.as_mut().unwrap().sync_interval = Duration::from_millis(100);
        Limiter::builder(c)
            .clock(Arc::new(FakeClock::new(at)))
            .open()
            .unwrap()
    };
    let a = strict(da.path(), "a");
    let b = strict(db.path(), "b");
    let usd = |cents: u64| Money::from_nanos(cents * 10_000_000);
    for provider in ["p0", "p3"] {
        let deployment = format!("{provider}/m");
        let mut committed = 0u64;
        let mut denied_in_a_row = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        // Alternate nodes; stop after both were denied a few times in a row.
        while denied_in_a_row < 20 {
            assert!(Instant::now() < deadline, "{provider}: never exhausted");
            let node = if committed.is_multiple_of(2) { &a } else { &b };
            match node.reserve(&[&deployment.as_str()], usd(25)).wait() {
                Ok(r) => {
                    r.commit(usd(25)).unwrap().wait().unwrap();
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
        assert!(
            committed * 25 <= 1000,
            "{provider}: {committed} × $0.25 > $10"
        );
        assert!(
            committed >= 36,
            "{provider}: only {committed} × $0.25 of $10 spent"
        );
    }
}

#[test]
fn clean_budgets_are_tracked_on_every_master_and_changes_still_seen() {
    let Some(cluster) = RedisCluster::start(3, 0) else {
        return;
    };
    let at = now();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), &[cluster.url(0)], "a", at);
    let b = open(db.path(), &[cluster.url(1)], "b", at);
    for p in PROVIDERS {
        a.charge(Spend::provider(p, Money::from_nanos(5))).unwrap();
    }
    for _ in 0..3 {
        a.sync().unwrap();
        b.sync().unwrap();
    }
    // Every master's connection tracks b's reads: a clean round reads none of the six.
    let figures = |l: &Limiter| {
        let r = l
            .status(StatusQuery::provider("p0"))
            .into_iter()
            .next()
            .unwrap()
            .replication;
        (
            r.last_round.keys_read,
            r.last_round.keys_unchanged,
            r.tracking,
        )
    };
    // Six budgets and their six credit series.
    assert_eq!(figures(&b), (12, 12, true));
    // a's spend in one budget (on one master) is read there, and only there.
    for (k, p) in PROVIDERS.iter().enumerate() {
        a.charge(Spend::provider(p, Money::from_nanos(100)))
            .unwrap();
        a.sync().unwrap();
        b.sync().unwrap();
        assert_eq!(figures(&b), (12, 11, true), "{p}");
        for (j, q) in PROVIDERS.iter().enumerate() {
            let want = if j <= k { 105 } else { 5 };
            assert_eq!(spend(&b, q), want, "{q} after {p}");
        }
    }
}
