//! Units across the fleet, through a real `redis-server`: shared `tokens` and `requests`
//! budgets count every node's spend exactly once (node restarts, a Redis restart and a
//! FLUSHALL heal), and a strict `tokens` budget is granted in whole tokens and never admits
//! more than its limit across nodes. Fleet-wide `concurrent` slots are in `units_concurrent.rs`.

use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use provider_budgets::{
    Config, Estimate, FakeClock, Limiter, Money, RedisConfig, Spend, StatusQuery, Unit, Usage,
};
use redis_server::{RedisServer, Reply};

/// 30 s into the current minute of the real clock: windows under the test's control, near
/// real time (Redis expires keys by its own clock).
fn clock() -> Arc<FakeClock> {
    let now = Timestamp::now().as_second();
    Arc::new(FakeClock::new(
        Timestamp::from_second(now - now.rem_euclid(60) + 30).unwrap(),
    ))
}

fn config(yaml: &str, dir: &Path, url: &str, node: &str, interval: Duration) -> Config {
    let mut c = support::yaml(yaml, dir);
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "units".to_owned();
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

/// (fleet spend, own spend) of `l`'s openai budget counting `unit`, as raw integers.
fn counted(l: &Limiter, unit: Unit) -> (u64, u64) {
    let s = l
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .find(|s| s.unit == unit)
        .unwrap();
    (s.spend.as_nanos(), s.own_spend.as_nanos())
}

/// The Redis hash of the openai budget counting `unit` (its only window).
fn window_key(server: &RedisServer, unit: Unit) -> String {
    let keys = server.command(&["KEYS", &format!("units:{{openai:*~{unit}}}:*")]);
    let windows: Vec<&str> = keys
        .trim_matches(['[', ']'])
        .split(", ")
        .filter(|k| {
            k.rsplit(':')
                .next()
                .is_some_and(|s| s.parse::<i64>().is_ok())
        })
        .collect();
    assert_eq!(windows.len(), 1, "{keys}");
    windows[0].to_owned()
}

const SHARED: &str = "\
provider_budgets:
  budgets:
    - {provider: openai, unit: tokens, limit: 100000000, period: 1h}
    - {provider: openai, unit: requests, limit: 100000000, period: 1h}
";

#[test]
fn shared_token_and_request_budgets_count_each_node_once_across_restarts_and_redis_losses() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let clock = clock();
    let hour = Duration::from_secs(3600); // rounds when the test says so
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let open = |i: usize| {
        let id = ["a", "b", "c"][i];
        support::open(
            config(SHARED, dirs[i].path(), &server.url(), id, hour),
            &clock,
        )
    };
    let mut nodes: Vec<Limiter> = (0..3).map(open).collect();
    let (mut tokens, mut requests) = (0u64, 0u64);
    let mut spend = |nodes: &[Limiter], k: u64| {
        for (i, n) in nodes.iter().enumerate() {
            for j in 0..20u64 {
                let (input, output) = (100 + 7 * j + k, 13 * i as u64 + j);
                n.charge(Spend::provider("openai", Money::ZERO).usage(Usage::new(input, output)))
                    .unwrap()
                    .wait()
                    .unwrap();
                tokens += input + output;
                requests += 1;
            }
        }
        (tokens, requests)
    };
    let check = |nodes: &[Limiter], (t, r): (u64, u64)| {
        let refs: Vec<&Limiter> = nodes.iter().collect();
        converge(&refs);
        for n in nodes {
            assert_eq!(counted(n, Unit::Tokens).0, t, "tokens, fleet-wide");
            assert_eq!(counted(n, Unit::Requests).0, r, "requests, fleet-wide");
        }
    };
    let want = spend(&nodes, 1);
    check(&nodes, want);
    // The wire carries whole tokens: each node field is its own count, no USD scaling.
    let key = window_key(&server, Unit::Tokens);
    let own_a = counted(&nodes[0], Unit::Tokens).1;
    assert_eq!(server.command(&["HGET", &key, "a"]), own_a.to_string());
    assert_eq!(
        server.command(&["HGET", &key, "~total"]),
        want.0.to_string()
    );

    // A node restarts: it neither recounts nor loses its spend.
    drop(nodes.remove(1));
    nodes.insert(1, open(1));
    let want = spend(&nodes, 2);
    check(&nodes, want);

    // FLUSHALL mid-stream, then a Redis restart without persistence: the nodes heal it.
    spend(&nodes, 3);
    server.flushall();
    let want = spend(&nodes, 4);
    check(&nodes, want);
    server.restart();
    let want = spend(&nodes, 5);
    check(&nodes, want);
    assert_eq!(
        server.command(&["HGET", &window_key(&server, Unit::Requests), "~total"]),
        want.1.to_string()
    );
}

const STRICT: &str = "\
provider_budgets:
  budgets:
    - {provider: openai, unit: tokens, limit: 20000, period: 1m, enforcement: strict}
";

/// A small deterministic generator (no dependency).
fn next(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    *seed >> 33
}

/// One node's demand: reservations of random token estimates, committed with usage at most
/// the estimate, until 30 refusals in a row (or the deadline). Returns the tokens committed.
fn demand(node: &Limiter, seed: u64, deadline: Instant) -> u64 {
    let d = ["openai/gpt-4o"];
    let mut seed = seed;
    let (mut committed, mut refusals) = (0, 0);
    while refusals < 30 && Instant::now() < deadline {
        let est = 100 + next(&mut seed) % 500;
        match node
            .reserve(&d, Money::ZERO)
            .estimate(Estimate::new(Money::ZERO, Some(est)))
            .wait()
        {
            Ok(r) => {
                refusals = 0;
                let used = est - next(&mut seed) % (est / 2);
                let input = used / 3;
                r.commit_usage(Money::ZERO, Usage::new(input, used - input))
                    .unwrap()
                    .wait()
                    .unwrap();
                committed += used;
            }
            Err(_) => {
                refusals += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    committed
}

#[test]
fn a_strict_token_budget_grants_whole_tokens_and_never_admits_more_than_its_limit() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = clock();
    let interval = Duration::from_millis(100);
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes: Vec<Limiter> = (0..3)
        .map(|i| {
            let id = ["a", "b", "c"][i];
            let c = config(STRICT, dirs[i].path(), &server.url(), id, interval);
            support::open(c, &clock)
        })
        .collect();
    let admitted = demand_window(&nodes);
    eprintln!("strict tokens: {admitted} of 20000 committed across 3 nodes");
    let refs: Vec<&Limiter> = nodes.iter().collect();
    converge(&refs);
    assert_eq!(counted(&nodes[0], Unit::Tokens).0, admitted);

    // Grants are whole tokens in Redis and in status: Σ grants ≤ the limit.
    let key = window_key(&server, Unit::Tokens);
    // One atomic read: the nodes keep renewing their grants meanwhile.
    let fields = ["~grant:a", "~grant:b", "~grant:c", "~granted"];
    let reply = server.command_reply(&[&["HMGET", key.as_str()][..], &fields[..]].concat());
    let Reply::Array(items) = reply else {
        panic!("HMGET: {reply}")
    };
    let whole = |r: &Reply| match r {
        Reply::Nil => 0,
        r => r
            .to_string()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("grant {r}")),
    };
    let sum: u64 = items[..3].iter().map(whole).sum();
    assert!(sum <= 20_000, "Σ grants {sum}");
    assert_eq!(whole(&items[3]), sum, "~granted is the sum of the grants");
    for n in &nodes {
        let s = n.status(StatusQuery::provider("openai")).remove(0);
        let grant = s.grant.unwrap().as_nanos();
        assert!(grant <= 20_000, "a node's grant counts tokens: {grant}");
    }

    // The next minute: grants start again from nothing, the last window's count nothing.
    // What the renewal costs: the first reservation of each node in the new window waits for
    // a grant round; the window's Redis round trips are counted.
    let trips = |nodes: &[Limiter]| -> u64 {
        let all = nodes.iter().map(|n| n.status(StatusQuery::all()).remove(0));
        all.map(|s| s.replication.round_trips).sum()
    };
    clock.advance(jiff::SignedDuration::from_secs(60));
    let before = trips(&nodes);
    let started = Instant::now();
    let mut first = Vec::new();
    for n in &nodes {
        let t = Instant::now();
        let est = Estimate::new(Money::ZERO, Some(100));
        let r = n
            .reserve(&["openai/gpt-4o"], Money::ZERO)
            .estimate(est)
            .wait();
        first.push(t.elapsed());
        r.unwrap().release().unwrap().wait().unwrap();
    }
    let next = demand_window(&nodes);
    eprintln!(
        "strict tokens, next minute: {next} of 20000; first reservation per node {first:?}; \
         {} Redis round trips (3 nodes, 100 ms rounds) in {:?}",
        trips(&nodes) - before,
        started.elapsed()
    );
    converge(&refs);
    assert_eq!(counted(&nodes[1], Unit::Tokens).0, next);
}

/// Every node's demand at once, until each is refused 30 times in a row; checks and returns
/// the tokens committed fleet-wide.
fn demand_window(nodes: &[Limiter]) -> u64 {
    let total = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    std::thread::scope(|s| {
        for (i, n) in nodes.iter().enumerate() {
            let total = &total;
            s.spawn(move || {
                total.fetch_add(demand(n, 7 + i as u64, deadline), Ordering::Relaxed);
            });
        }
    });
    let admitted = total.load(Ordering::Relaxed);
    assert!(admitted <= 20_000, "{admitted} tokens admitted on 20000");
    assert!(
        admitted >= 15_000,
        "{admitted}: the grants reached the nodes"
    );
    admitted
}

/// What the merge script raises a strict key of a 10-unit budget to, for `node` holding
/// `durable` and wanting far more.
async fn ask_ten(
    wire: &provider_budgets::__wire::Wire,
    conn: &mut redis::aio::MultiplexedConnection,
    node: &str,
    key: &str,
    durable: u64,
    grant_lease_ms: u64,
    known: &str,
) -> u64 {
    use provider_budgets::__wire::{GrantAsk, Group, Identity, Mode, SyncItem};
    let id = Identity {
        node,
        instance: "i0",
        lease_ms: 60_000,
        read_lease_ms: 60_000,
        release: false,
        verify: false,
        guard_ms: 0,
        grant_lease_ms,
    };
    let item = SyncItem {
        key: key.to_owned(),
        own: 0,
        expire_at: 4_000_000_000,
        grant: Some(GrantAsk {
            limit: 10,
            durable,
            want: 1000,
            known: known.to_owned(),
        }),
        skip: false,
    };
    let g = Group {
        lease: format!("{key}:lease:{node}"),
        marker: format!("{key}:strict"),
        items: vec![item],
        mode: Mode::Script { renew: true },
    };
    let out = wire.sync_round(conn, &id, &[g]).await.unwrap();
    let reply = out[0].as_ref().unwrap().keys[0].clone().unwrap();
    reply.grant.unwrap().grant
}

/// A count budget's small limit is given out to its last unit however many nodes hold a
/// grant: a slice of `free / (holders + 1)` below 1 is raised to 1 (it rounded down to a
/// raise of 0: 3 slots of 10 free, a fourth holder was granted nothing, ever).
#[tokio::test]
async fn a_small_count_limit_is_granted_to_its_last_unit_among_many_holders() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let wire = provider_budgets::__wire::Wire::new();
    let key = "units:{openai:1200mo~concurrent}:0";
    let mut grants = [0u64; 5];
    for _ in 0..4 {
        for (i, node) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            grants[i] = ask_ten(&wire, &mut conn, node, key, grants[i], 0, "").await;
        }
    }
    assert_eq!(
        grants,
        [6, 1, 1, 1, 1],
        "every unit given out, in whole units"
    );
    assert_eq!(server.command(&["HGET", key, "~granted"]), "10");
}

/// `grant_lease` counts a node's silence from when the key's callers were last heard without a
/// gap: after a silence of every node (Redis away, with its data), the first node back does
/// not reclaim the others' grants (slots they still hold) before a full lease; a node silent
/// while the others call is reclaimed after the lease.
#[tokio::test]
async fn a_fleet_wide_silence_restarts_the_grant_lease() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let wire = provider_budgets::__wire::Wire::new();
    let key = "units:{openai:1200mo~concurrent}:0";
    let lease = 300;
    let a = ask_ten(&wire, &mut conn, "a", key, 0, lease, "").await;
    let mut b = 0;
    for _ in 0..6 {
        b = ask_ten(&wire, &mut conn, "b", key, b, lease, "").await;
    }
    assert_eq!((a, b), (5, 5));
    // Nobody calls for longer than the lease (Redis was unreachable): b, back first, takes
    // nothing of a's.
    tokio::time::sleep(std::time::Duration::from_millis(2 * lease)).await;
    assert_eq!(ask_ten(&wire, &mut conn, "b", key, b, lease, "").await, 5);
    // b keeps calling, a stays silent: reclaimed a lease after the fleet was heard again.
    let back = Instant::now();
    while b == 5 {
        assert!(back.elapsed() < Duration::from_secs(5), "never reclaimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
        b = ask_ten(&wire, &mut conn, "b", key, b, lease, "").await;
    }
    assert!(
        back.elapsed() >= Duration::from_millis(lease),
        "{:?}",
        back.elapsed()
    );
    for _ in 0..10 {
        b = ask_ten(&wire, &mut conn, "b", key, b, lease, "").await;
    }
    assert_eq!(b, 10, "all of a's grant came back");
    assert_eq!(server.command(&["HGET", key, "~granted"]), "10");
}

/// After Redis lost its data, a holder that never comes back (SIGKILLed for good) is awaited
/// only for the grant lease: its field is then written at 0 and the window is granted from
/// again (a `concurrent` budget's window lasts 100 years).
#[tokio::test]
async fn a_holder_lost_with_the_data_is_awaited_only_for_the_grant_lease() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let wire = provider_budgets::__wire::Wire::new();
    let key = "units:{openai:1200mo~concurrent}:0";
    let lease = 300;
    let a = ask_ten(&wire, &mut conn, "a", key, 0, lease, "a").await;
    let b = ask_ten(&wire, &mut conn, "b", key, 0, lease, "a,b").await;
    assert_eq!((a, b), (5, 1));
    server.flushall();
    // b re-registers its grant; a, which it knows held one, is awaited: nothing is raised.
    let lost = Instant::now();
    let mut b = ask_ten(&wire, &mut conn, "b", key, b, lease, "a,b").await;
    assert_eq!(b, 1);
    assert_eq!(server.command(&["HGET", key, "~await"]), "a");
    while b == 1 {
        assert!(
            lost.elapsed() < Duration::from_secs(5),
            "a awaited for ever"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        b = ask_ten(&wire, &mut conn, "b", key, b, lease, "a,b").await;
    }
    assert!(
        lost.elapsed() >= Duration::from_millis(lease),
        "{:?}",
        lost.elapsed()
    );
    for _ in 0..10 {
        b = ask_ten(&wire, &mut conn, "b", key, b, lease, "a,b").await;
    }
    assert_eq!(b, 10, "the whole limit is granted again");
    assert_eq!(server.command(&["HGET", key, "~grant:a"]), "0");
    assert_eq!(server.command(&["HGET", key, "~await"]), "(nil)");
}

/// A strict concurrent budget needs `redis.grant_lease` (its one window lasts 100 years: a
/// dead node's grant would never come back), in the file and as a runtime budget.
#[test]
fn a_strict_concurrent_budget_needs_a_grant_lease() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let yaml = "\
provider_budgets:
  budgets:
    - {provider: openai, unit: concurrent, limit: 4, enforcement: strict}
";
    let c = config(yaml, dir.path(), &server.url(), "a", Duration::from_secs(1));
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("provider_budgets.redis.grant_lease"), "{err}");
    let mut c = config(yaml, dir.path(), &server.url(), "a", Duration::from_secs(1));
    c.redis.as_mut().unwrap().grant_lease = Some(Duration::from_secs(3));
    c.validate().unwrap();

    let c = config(
        SHARED,
        dir.path(),
        &server.url(),
        "a",
        Duration::from_secs(1),
    );
    let l = support::open(c, &clock());
    let mut fields = provider_budgets::BudgetFields::new("4", "");
    fields.unit = Some("concurrent".into());
    fields.enforcement = Some("strict".into());
    let runtime = provider_budgets::BudgetConfig::from_fields(
        provider_budgets::Scope::Provider,
        "anthropic",
        &fields,
    );
    let err = l.put_budget(runtime.unwrap()).unwrap_err().to_string();
    assert!(err.contains("provider_budgets.redis.grant_lease"), "{err}");
}
