//! Strict budgets (grants in escrow) with several limiters on one real `redis-server`: grants
//! never sum above the limit, are durable on the node (a node that dies without giving back
//! finds its grant again), are rebuilt after FLUSHALL and a Redis restart without ever being
//! granted twice, are given back when idle and at shutdown, and belong to their window.

#![allow(clippy::unwrap_used)]

#[path = "support/cli.rs"]
mod cli;
#[path = "support/proxy.rs"]
mod proxy;
#[path = "support/redis_server.rs"]
mod redis_server;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cli::Cli;
use jiff::{SignedDuration, Timestamp};
use provider_budgets::{BudgetStatus, Config, Enforcement, FakeClock, Limiter, Money, RedisConfig};
use redis_server::RedisServer;

/// $100 a day, strict.
const LIMIT: u64 = 100_000_000_000;

/// Start time: the start of the current real day plus a few hours, so that a day window is
/// under the test's control while Redis (which expires keys by its own clock) agrees.
fn t0() -> Timestamp {
    let now = Timestamp::now().as_second();
    Timestamp::from_second(now - now.rem_euclid(86_400) + 3_600).unwrap()
}

fn yaml(offline: &str) -> String {
    format!(
        "provider_budgets:\n  budgets:\n    - {{provider: openai, limit: 100, period: 1d, enforcement: strict, offline: {offline}}}\n"
    )
}

fn config(dir: &Path, url: &str, node: &str, prefix: &str) -> Config {
    let mut c = Config::from_yaml_str(&yaml("grant_only"))
        .unwrap()
        .data_dir(dir);
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = prefix.to_owned();
    // Short: the guard after a loss is three intervals. Tests drive rounds with `sync`.
    r.sync_interval = Duration::from_millis(100);
    r.connect_timeout = Duration::from_millis(300);
    r.command_timeout = Duration::from_millis(300);
    c.redis = Some(r);
    c
}

fn open(dir: &Path, url: &str, node: &str, clock: &Arc<FakeClock>) -> Limiter {
    Limiter::open_with_clock(config(dir, url, node, "s"), clock.clone()).unwrap()
}

fn row(l: &Limiter) -> BudgetStatus {
    l.status().into_iter().next().unwrap()
}

fn grant(l: &Limiter) -> u64 {
    row(l).grant.unwrap().as_nanos()
}

/// Redis's view of the current window: `(Σ ~grant:*, ~granted)`.
fn redis_grants(server: &RedisServer, window_start: i64) -> (u64, u64) {
    let key = format!("s:{{openai:1d}}:{window_start}");
    let all = server.command(&["HGETALL", &key]);
    let words: Vec<&str> = all
        .trim_matches(|c| c == '[' || c == ']')
        .split(", ")
        .filter(|w| !w.is_empty())
        .collect();
    let mut sum = 0;
    let mut granted = 0;
    for pair in words.chunks(2) {
        if let [f, v] = pair {
            if f.starts_with("~grant:") {
                sum += v.parse::<u64>().unwrap();
            }
            if *f == "~granted" {
                granted = v.parse().unwrap();
            }
        }
    }
    (sum, granted)
}

/// Polls `cond` (running a round on every node each time) until it holds, bounded.
fn until(nodes: &[&Limiter], what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for n in nodes {
            let _ = n.sync();
        }
        if cond() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn window_start(at: Timestamp) -> i64 {
    at.as_second() - at.as_second().rem_euclid(86_400)
}

#[test]
fn config_reads_enforcement_and_offline_and_refuses_unknown_values() {
    let c = Config::from_yaml_str(&yaml("local_share")).unwrap();
    assert_eq!(c.budgets[0].enforcement, Enforcement::Strict);
    assert_eq!(c.budgets[0].offline.as_str(), "local_share");
    let shared = Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 100, period: 1d}\n",
    )
    .unwrap();
    assert_eq!(shared.budgets[0].enforcement, Enforcement::Shared);
    for (bad, names) in [
        ("enforcement: hard", "`shared` or `strict`"),
        ("offline: maybe", "`grant_only`, `local_share` or `open`"),
    ] {
        let text = format!(
            "provider_budgets:\n  budgets:\n    - {{provider: openai, limit: 100, period: 1d, {bad}}}\n"
        );
        let e = Config::from_yaml_str(&text).unwrap_err().to_string();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains(names), "{e}");
        assert!(e.contains(bad.split(':').next().unwrap()), "{e}");
    }
    // A lease shorter than three sync intervals would reclaim live nodes' grants.
    let e = Config::from_yaml_str(
        "provider_budgets:\n  redis: {url: \"redis://127.0.0.1:1/\", sync_interval: 1s, grant_lease: 2s}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("provider_budgets.redis.grant_lease"), "{e}");
}

#[test]
fn strict_without_redis_is_held_to_the_limit_only() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::from_yaml_str(&yaml("grant_only"))
        .unwrap()
        .data_dir(dir.path());
    let l = Limiter::open(c).unwrap();
    let s = row(&l);
    assert_eq!(s.enforcement, Enforcement::Strict);
    assert_eq!(s.grant, Some(Money::from_nanos(LIMIT)));
}

/// Demand on a node: a charge of `usd` (spend the node makes; its replicator sizes its asks
/// by its spend rate).
fn spend(l: &Limiter, usd: &str) {
    l.record("openai", usd.parse::<Money>().unwrap()).unwrap();
}

fn own(l: &Limiter) -> u64 {
    row(l).own_spend.as_nanos()
}

#[test]
fn grants_follow_demand_stay_within_the_limit_and_are_given_back_when_idle() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), &server.url(), "a", &clock);
    let b = open(db.path(), &server.url(), "b", &clock);
    let w = window_start(t0());
    // Without demand, no grant.
    assert_eq!((grant(&a), grant(&b)), (0, 0));
    until(&[&a, &b], "both hold a grant", || {
        spend(&a, "0.5");
        spend(&b, "0.1");
        grant(&a) > own(&a) && grant(&b) > own(&b)
    });
    // Busier a asks for more than b.
    until(&[&a, &b], "a holds more", || {
        spend(&a, "0.5");
        grant(&a) > grant(&b)
    });
    let (sum, granted) = redis_grants(&server, w);
    assert_eq!(sum, granted);
    assert!(granted <= LIMIT, "{granted}");
    a.sync().unwrap();
    assert_eq!(
        row(&a).granted_total.unwrap().as_nanos(),
        redis_grants(&server, w).1
    );
    // No spend for five rounds: both give back all but what they spent.
    until(&[&a, &b], "idle grants given back", || {
        grant(&a) == own(&a) && grant(&b) == own(&b)
    });
    a.flush().unwrap();
    b.flush().unwrap();
    until(&[&a, &b], "redis learns it", || {
        redis_grants(&server, w).0 == own(&a) + own(&b)
    });
}

/// The CLI's config: the same strict budget, Redis keys under prefix `s`, fast rounds.
const CLI_CONFIG: &str = "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 100, period: 1d, enforcement: strict}\n  redis: {url: \"redis://127.0.0.1:1/\", prefix: s, sync_interval: 50ms, connect_timeout: 300ms, command_timeout: 300ms}\n";

fn redis_grant_of(server: &RedisServer, window_start: i64, node: &str) -> u64 {
    let key = format!("s:{{openai:1d}}:{window_start}");
    server
        .command(&["HGET", &key, &format!("~grant:{node}")])
        .parse()
        .unwrap_or(0)
}

#[test]
fn a_killed_node_finds_its_grant_on_disk_and_it_is_never_granted_twice() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let url = server.url();
    let w = window_start(t0());
    let now_text = t0().to_string();

    // Node a: a CLI process spending fast (its grant grows), SIGKILLed once Redis granted it
    // more than half the limit: no give-back.
    let a_cli = Cli::new(CLI_CONFIG);
    let mut child = a_cli
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
    let deadline = Instant::now() + Duration::from_secs(20);
    while redis_grant_of(&server, w, "a") <= LIMIT / 2 {
        assert!(Instant::now() < deadline, "a never got half the limit");
        writeln!(stdin, "openai 0.2").unwrap();
        assert!(acks.next().unwrap().unwrap().starts_with("ok "));
    }
    child.kill().unwrap(); // SIGKILL on unix
    child.wait().unwrap();
    let in_redis = redis_grant_of(&server, w, "a");

    // Redis dies too. a restarts offline: its grant comes from its disk (durable before it
    // was spendable, so at most what Redis granted, and more than nothing).
    server.kill();
    let a = open(&a_cli.data, &url, "a", &clock);
    let held = grant(&a);
    assert!(
        held > 0 && held <= in_redis,
        "disk {held}, redis {in_redis}"
    );
    let spent = own(&a);

    // Redis comes back empty. b (never a holder) is busy; a re-registers its durable grant
    // (max) at its next round, within the guard: b never gets a's money.
    server.restart();
    let db = tempfile::tempdir().unwrap();
    let b = open(db.path(), &url, "b", &clock);
    for _ in 0..5 {
        // Fast spend: b asks for as much as it can get, before a's next round.
        spend(&b, "2");
        b.sync().unwrap();
    }
    a.sync().unwrap();
    assert_eq!(
        redis_grant_of(&server, w, "a"),
        held,
        "rebuilt from a's disk"
    );
    until(&[&a, &b], "b holds a grant", || {
        spend(&b, "0.2");
        let (sum, granted) = redis_grants(&server, w);
        assert_eq!(sum, granted);
        assert!(sum <= LIMIT, "granted twice: {sum} > {LIMIT}");
        grant(&b) > own(&b) && grant(&b) > LIMIT / 10
    });
    // What b holds (and spent) never reaches into a's unused grant.
    let b_claim = grant(&b).max(own(&b));
    assert!(
        b_claim + held.max(spent) <= LIMIT + own(&b).saturating_sub(grant(&b)),
        "b {b_claim} + a {held} > limit"
    );

    // FLUSHALL while both hold grants: both are rebuilt, never above the limit.
    server.flushall();
    for _ in 0..10 {
        spend(&b, "0.2");
        for n in [&a, &b] {
            n.sync().unwrap();
        }
        let (sum, granted) = redis_grants(&server, w);
        assert_eq!(sum, granted);
        assert!(sum <= LIMIT, "granted twice after FLUSHALL: {sum}");
    }
    assert!(redis_grant_of(&server, w, "a") >= grant(&a).min(held));
}

#[test]
fn a_clean_shutdown_gives_the_grant_back() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let da = tempfile::tempdir().unwrap();
    let a = open(da.path(), &server.url(), "a", &clock);
    until(&[&a], "a holds a grant", || {
        spend(&a, "1");
        grant(&a) > own(&a)
    });
    let spent = own(&a);
    a.shutdown().unwrap();
    assert_eq!(redis_grants(&server, window_start(t0())).0, spent);
}

#[test]
fn grants_belong_to_their_window() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let da = tempfile::tempdir().unwrap();
    let a = open(da.path(), &server.url(), "a", &clock);
    until(&[&a], "a holds a grant", || {
        spend(&a, "1");
        grant(&a) > LIMIT / 2
    });
    let first = window_start(t0());
    clock.advance(SignedDuration::from_hours(24));
    let next = first + 86_400;
    assert_eq!(grant(&a), 0, "a new window starts without a grant");
    until(&[&a], "a grant in the new window", || {
        spend(&a, "1");
        grant(&a) > LIMIT / 2
    });
    // The old window's grant does not count against the new one.
    assert_eq!(redis_grants(&server, next).0, grant(&a));
    assert_eq!(row(&a).granted_total.unwrap().as_nanos(), grant(&a));
}

#[test]
fn offline_local_share_admits_a_share_of_the_limit_and_grant_only_keeps_the_grant() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let link = proxy::Proxy::start(server.port()).unwrap();
    let open_with = |dir: &Path, url: &str, node: &str, offline: &str| {
        let mut c = config(dir, url, node, "s");
        c.budgets = Config::from_yaml_str(&yaml(offline)).unwrap().budgets;
        Limiter::open_with_clock(c, clock.clone()).unwrap()
    };
    let a = open_with(da.path(), &link.url(), "a", "local_share");
    let b = open_with(db.path(), &server.url(), "b", "grant_only");
    until(&[&a, &b], "both hold a grant", || {
        spend(&a, "0.5");
        spend(&b, "0.5");
        grant(&a) > own(&a) && grant(&b) > own(&b)
    });
    a.sync().unwrap(); // a learns that b holds a grant too
    let held = grant(&a);
    assert!(held < LIMIT / 2, "{held}");
    // a is cut off from Redis: it may admit up to half the limit (2 holders seen).
    link.cut();
    assert!(a.sync().is_err());
    assert_eq!(grant(&a), LIMIT / 2);
    // Back: the durable grant again.
    link.heal();
    until(&[&a], "a is back on its grant", || grant(&a) < LIMIT / 2);
    assert!(grant(&a) >= held.min(own(&a)));
    // grant_only: nothing changes while Redis is unreachable.
    let before = grant(&b);
    drop(server);
    assert!(b.sync().is_err());
    assert_eq!(grant(&b), before);
}
