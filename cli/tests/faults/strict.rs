//! Strict budgets (grants in escrow) with several limiters on one real `redis-server`: grants
//! never sum above the limit, are durable on the node (a node that dies without giving back
//! finds its grant again), are rebuilt after FLUSHALL and a Redis restart without ever being
//! granted twice, are given back when idle and at shutdown, and belong to their window.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::child;
use provider_budgets_test_support::cli;
use provider_budgets_test_support::open as support;
use provider_budgets_test_support::proxy;
use provider_budgets_test_support::redis_server;

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use child::{sigkill, spawn_piped};
use cli::Cli;
use jiff::{SignedDuration, Timestamp};
use provider_budgets::{BudgetStatus, Config, Enforcement, FakeClock, Limiter, Money, RedisConfig};
use provider_budgets::{ReserveError, Spend, StatusQuery};
use redis_server::RedisServer;

mod loss;

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
    support::open(config(dir, url, node, "s"), clock)
}

fn row(l: &Limiter) -> BudgetStatus {
    l.status(StatusQuery::all()).into_iter().next().unwrap()
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

/// `x` whole dollars.
fn usd(x: u64) -> Money {
    Money::from_nanos(x * 1_000_000_000)
}

/// Polls until `l` can reserve `amount` (past the first use's guard); the probe is released.
fn until_first_grant(l: &Limiter, amount: Money) {
    until(&[l], "a first grant", || {
        l.reserve(&[&"openai/gpt-4o"], amount)
            .wait()
            .map(|r| r.release().unwrap().wait().unwrap())
            .is_ok()
    });
}

/// Spends $1 on `a` each round until `cond` holds.
fn spend_until(a: &Limiter, what: &str, cond: impl Fn() -> bool) {
    until(&[a], what, || {
        spend(a, "1");
        cond()
    });
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
    l.charge(Spend::provider("openai", usd.parse::<Money>().unwrap()))
        .unwrap();
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
    // more than half the limit: no give-back. A `record` is not refused by the grant (it is
    // spend already made), so the loop keeps its spend within a dollar of the grant: on a
    // fast disk it would otherwise spend the whole limit during the guard before the first
    // raise (3 intervals), and no grant could then pass half the limit. When ahead, it waits
    // up to about one round for a raise and then spends on (a node that stops spending is
    // idle and gives back).
    let a_cli = Cli::new(CLI_CONFIG);
    let (mut child, mut stdin, acks) = spawn_piped(a_cli.durable_ingest(&url, "a", &now_text));
    let mut acks = acks.lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut spent = 0;
    loop {
        let granted = redis_grant_of(&server, w, "a");
        if granted > LIMIT / 2 {
            break;
        }
        assert!(Instant::now() < deadline, "a never got half the limit");
        if spent > granted + LIMIT / 100 {
            let ahead_until = Instant::now() + Duration::from_millis(60);
            while redis_grant_of(&server, w, "a") == granted && Instant::now() < ahead_until {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        writeln!(stdin, "openai 0.2").unwrap();
        assert!(acks.next().unwrap().unwrap().starts_with("ok "));
        spent += LIMIT / 500;
    }
    sigkill(&mut child); // SIGKILL on unix
    let in_redis = redis_grant_of(&server, w, "a");

    // Redis dies too. a restarts offline: its grant comes from its disk (durable before it
    // was spendable, so at most what Redis granted, and more than nothing).
    server.kill();
    // Slower rounds here: the guard after the loss (3 intervals) must outlast b's quick
    // rounds below even on a loaded machine.
    let open = |dir: &Path, url: &str, node: &str, clock: &Arc<FakeClock>| {
        let mut c = config(dir, url, node, "s");
        c.redis.as_mut().unwrap().sync_interval = Duration::from_millis(400);
        Limiter::builder(c).clock(clock.clone()).open().unwrap()
    };
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
    // What b holds (and spent) never reaches into what a holds (a may have given part of
    // its grant back meanwhile: idle).
    let b_claim = grant(&b).max(own(&b));
    let a_claim = redis_grant_of(&server, w, "a").max(spent);
    assert!(
        b_claim + a_claim <= LIMIT + own(&b).saturating_sub(grant(&b)),
        "b {b_claim} + a {a_claim} > limit"
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
    spend_until(&a, "a holds a grant", || grant(&a) > own(&a));
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
    spend_until(&a, "a holds a grant", || grant(&a) > LIMIT / 2);
    let first = window_start(t0());
    clock.advance(SignedDuration::from_hours(24));
    let next = first + 86_400;
    assert_eq!(grant(&a), 0, "a new window starts without a grant");
    spend_until(&a, "a grant in the new window", || grant(&a) > LIMIT / 2);
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
        Limiter::builder(c).clock(clock.clone()).open().unwrap()
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
    // grant_only: nothing changes while Redis is unreachable: b admits exactly what is left
    // of its grant, not a nano more.
    let before = grant(&b);
    drop(server);
    assert!(b.sync().is_err());
    assert_eq!(grant(&b), before);
    let left = before - own(&b) - row(&b).reserved.as_nanos();
    assert!(left > 0);
    assert!(b
        .reserve(&[&"openai/gpt-4o"], Money::from_nanos(left + 1))
        .wait()
        .is_err());
    let r = b
        .reserve(&[&"openai/gpt-4o"], Money::from_nanos(left))
        .wait()
        .unwrap();
    r.commit(Money::from_nanos(left)).unwrap().wait().unwrap();
    assert!(b
        .reserve(&[&"openai/gpt-4o"], Money::from_nanos(1))
        .wait()
        .is_err());
}

#[test]
fn a_reservation_refused_by_its_grant_waits_for_one_grant_round_and_a_spent_budget_does_not() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = open(da.path(), &server.url(), "a", &clock);
    let b = open(db.path(), &server.url(), "b", &clock);
    // Past the first use's guard.
    until_first_grant(&a, usd(1));
    // $30 is far beyond a's grant: one out-of-cycle round (half of what is free) and it fits.
    let r = a.reserve(&[&"openai/gpt-4o"], usd(30)).wait().unwrap();
    assert!(grant(&a) >= usd(30).as_nanos());
    r.commit(usd(30)).unwrap().wait().unwrap();
    // b takes the rest, in a few reservations (each may wait for one round).
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && held.len() < 70 {
        match b.reserve(&[&"openai/gpt-4o"], usd(1)).wait() {
            Ok(r) => held.push(r),
            Err(_) => {
                a.sync().unwrap();
                b.sync().unwrap();
            }
        }
    }
    assert_eq!(held.len(), 70, "b got all that was free");
    for r in held {
        r.commit(usd(1)).unwrap().wait().unwrap();
    }
    a.flush().unwrap();
    b.flush().unwrap();
    a.sync().unwrap();
    b.sync().unwrap();
    // Spent fleet-wide: refused at once (no grant round can help).
    let grant_wait = Duration::from_millis(250);
    let started = Instant::now();
    assert!(b.reserve(&[&"openai/gpt-4o"], usd(1)).wait().is_err());
    assert!(started.elapsed() < grant_wait, "{:?}", started.elapsed());
    let (sum, _) = redis_grants(&server, window_start(t0()));
    assert!(sum <= LIMIT);
}

#[test]
fn a_refusal_by_the_grant_under_a_silent_redis_names_the_limit_and_the_grant_apart() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let da = tempfile::tempdir().unwrap();
    let a = open(da.path(), &server.url(), "a", &clock);
    until_first_grant(&a, usd(1));
    let r = a.reserve(&[&"openai/gpt-4o"], usd(1)).wait().unwrap();
    r.commit(usd(1)).unwrap().wait().unwrap();
    // Redis dies: grant_only keeps the grant, and nothing more is granted.
    server.kill();
    assert!(a.sync().is_err());
    let held = grant(&a);
    let left = held - own(&a);
    assert!(left > 0 && held < LIMIT, "grant {held}");
    let asked = Money::from_nanos(left + 1);
    let err = a.reserve(&[&"openai/gpt-4o"], asked).wait().unwrap_err();
    let ReserveError::Denied(none) = &err else {
        panic!("{err}")
    };
    assert_eq!(none.exceeded.len(), 1, "{err}");
    let e = &none.exceeded[0];
    assert_eq!(e.limit, Money::from_nanos(LIMIT), "the configured limit");
    assert_eq!(e.grant, Some(Money::from_nanos(held)), "this node's grant");
    assert!(e.by_grant());
    assert_eq!(e.spend.as_nanos(), own(&a) + asked.as_nanos());
    let text = err.to_string();
    assert!(
        text.contains(&format!(
            "Exceeded this node's grant for provider openai: {} > {} (limit 100, not spent",
            e.spend,
            Money::from_nanos(held)
        )) && text.contains("Redis is unreachable"),
        "{text}"
    );
    assert!(!text.contains("Exceeded budget"), "{text}");
    // Within the grant: admitted, Redis or not.
    let r = a
        .reserve(&[&"openai/gpt-4o"], Money::from_nanos(left))
        .wait()
        .unwrap();
    r.release().unwrap().wait().unwrap();
}

#[test]
fn offline_open_admits_against_the_fleet_total_and_comes_back_to_the_grant() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let da = tempfile::tempdir().unwrap();
    let link = proxy::Proxy::start(server.port()).unwrap();
    let mut c = config(da.path(), &link.url(), "a", "s");
    c.budgets = Config::from_yaml_str(&yaml("open")).unwrap().budgets;
    let a = Limiter::builder(c).clock(clock.clone()).open().unwrap();
    until_first_grant(&a, usd(1));
    let held = grant(&a);
    assert!(held < usd(60).as_nanos());
    link.cut();
    assert!(a.sync().is_err());
    // Offline and `open`: the limit, not the grant.
    let r = a.reserve(&[&"openai/gpt-4o"], usd(60)).wait().unwrap();
    r.release().unwrap().wait().unwrap();
    link.heal();
    a.sync().unwrap();
    // Back online: strict again (a $95 reservation needs a grant that is not there at once).
    assert!(grant(&a) < usd(95).as_nanos());
    assert!(a.reserve(&[&"openai/gpt-4o"], usd(95)).wait().is_err());
}

#[test]
fn enforcement_changes_in_a_live_reload() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let da = tempfile::tempdir().unwrap();
    let shared_yaml =
        "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 100, period: 1d}\n";
    let with = |yaml: &str| {
        let mut c = config(da.path(), &server.url(), "a", "s");
        c.budgets = Config::from_yaml_str(yaml).unwrap().budgets;
        c
    };
    let a = Limiter::builder(with(shared_yaml))
        .clock(clock.clone())
        .open()
        .unwrap();
    assert_eq!(
        (row(&a).enforcement, row(&a).grant),
        (Enforcement::Shared, None)
    );
    let summary = a.reload(with(&yaml("grant_only"))).unwrap();
    assert_eq!(summary.changed.len(), 1, "{summary:?}");
    assert_eq!(row(&a).enforcement, Enforcement::Strict);
    // Strict now: reservations come from grants (after the first use's guard).
    until(&[&a], "a first grant", || {
        a.reserve(&[&"openai/gpt-4o"], Money::from_nanos(1_000_000_000))
            .wait()
            .map(|r| {
                r.commit(Money::from_nanos(1_000_000_000))
                    .unwrap()
                    .wait()
                    .unwrap()
            })
            .is_ok()
    });
    assert!(grant(&a) >= 1_000_000_000);
    a.reload(with(shared_yaml)).unwrap();
    assert_eq!(row(&a).grant, None);
}

#[test]
fn async_reservations_await_the_grant_round_without_blocking_the_runtime() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let da = tempfile::tempdir().unwrap();
    let link = proxy::Proxy::start(server.port()).unwrap();
    let mut c = config(da.path(), &link.url(), "a", "s");
    c.redis.as_mut().unwrap().grant_wait = Duration::from_secs(3);
    c.redis.as_mut().unwrap().command_timeout = Duration::from_secs(2);
    let a = Limiter::builder(c).clock(clock.clone()).open().unwrap();
    until_first_grant(&a, usd(1));
    // A slow link: the grant round takes a few hundred ms.
    link.set_delay(Duration::from_millis(100));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ticks, reserved) = runtime.block_on(async {
        let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let t = Arc::clone(&ticks);
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(5)).await;
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
        // $30 is far beyond the first grant: the reservation awaits one grant round.
        let r = a.reserve(&["openai/gpt-4o"], usd(30)).await;
        ticker.abort();
        (ticks.load(std::sync::atomic::Ordering::Relaxed), r)
    });
    reserved.unwrap().release().unwrap().wait().unwrap();
    // The runtime's only thread kept running other tasks while the reservation waited.
    assert!(ticks >= 10, "the wait blocked the runtime: {ticks} ticks");
}

// ---- model-based: the bound at every step ---------------------------------------------------

use proptest::prelude::*;
use provider_budgets::Reservation;

#[derive(Debug, Clone)]
enum Op {
    /// A reservation of `est` cents on `node`.
    Reserve {
        node: usize,
        est: u64,
    },
    /// Commit the open reservation `pick` of `node` at `pct` % of its estimate.
    Commit {
        node: usize,
        pick: usize,
        pct: u64,
    },
    Release {
        node: usize,
        pick: usize,
    },
    Sync {
        node: usize,
    },
    /// Drop the limiter while cut off (no give-back reaches Redis), reopen its data dir.
    Crash {
        node: usize,
    },
    Cut {
        node: usize,
    },
    Heal {
        node: usize,
    },
    RedisRestart,
    FlushAll,
    /// The next day's window.
    CrossWindow,
    /// Real time passes (background rounds run, the guard after a loss ends).
    Pass,
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0usize..3;
    prop_oneof![
        8 => (node.clone(), 1u64..400).prop_map(|(node, est)| Op::Reserve { node, est }),
        5 => (node.clone(), 0usize..4, prop_oneof![3 => 10u64..100, 1 => 100u64..150])
            .prop_map(|(node, pick, pct)| Op::Commit { node, pick, pct }),
        2 => (node.clone(), 0usize..4).prop_map(|(node, pick)| Op::Release { node, pick }),
        3 => node.clone().prop_map(|node| Op::Sync { node }),
        1 => node.clone().prop_map(|node| Op::Crash { node }),
        1 => node.clone().prop_map(|node| Op::Cut { node }),
        2 => node.prop_map(|node| Op::Heal { node }),
        1 => Just(Op::RedisRestart),
        1 => Just(Op::FlushAll),
        1 => Just(Op::CrossWindow),
        2 => Just(Op::Pass),
    ]
}

/// $20 a day; costs in cents.
const MODEL_LIMIT: u64 = 20_000_000_000;
const CENT: u64 = 10_000_000;

struct Node {
    dir: tempfile::TempDir,
    proxy: proxy::Proxy,
    limiter: Option<Limiter>,
    open: Vec<(Reservation, u64, i64)>,
}

fn model_open(node: &Node, i: usize, clock: &Arc<FakeClock>) -> Limiter {
    let mut c = config(node.dir.path(), &node.proxy.url(), &format!("m{i}"), "m");
    c.budgets = Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 20, period: 1d, enforcement: strict}\n",
    )
    .unwrap()
    .budgets;
    if let Some(r) = c.redis.as_mut() {
        // Fast rounds: the guard after a loss (three intervals) is shorter than a `Pass`.
        r.sync_interval = Duration::from_millis(30);
        r.grant_wait = Duration::from_millis(100);
        r.connect_timeout = Duration::from_millis(100);
        r.command_timeout = Duration::from_millis(200);
    }
    Limiter::builder(c).clock(clock.clone()).open().unwrap()
}

/// Runs `ops` through the model; returns how many reservations were admitted.
fn run_model(ops: Vec<Op>) -> Result<u64, TestCaseError> {
    let Some(mut server) = RedisServer::start() else {
        return Ok(0);
    };
    let clock = Arc::new(FakeClock::new(t0()));
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node {
            dir: tempfile::tempdir().unwrap(),
            proxy: proxy::Proxy::start(server.port()).unwrap(),
            limiter: None,
            open: Vec::new(),
        })
        .collect();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.limiter = Some(model_open(n, i, &clock));
    }
    // Per window start: what was really spent (commits, dropped estimates) and the excess of
    // commits above their estimate.
    let mut spent: std::collections::BTreeMap<i64, (u64, u64)> = Default::default();
    let mut day = window_start(t0());
    let mut admitted = 0u64;
    // Past the first use's guard: node 0 can reserve.
    {
        let l = nodes[0].limiter.as_ref().unwrap();
        until_first_grant(l, Money::from_nanos(CENT));
    }
    for op in ops {
        match op {
            Op::Reserve { node, est } => {
                let n = &mut nodes[node];
                let l = n.limiter.as_ref().unwrap();
                if let Ok(r) = l
                    .reserve(&[&"openai/gpt-4o"], Money::from_nanos(est * CENT))
                    .wait()
                {
                    n.open.push((r, est * CENT, day));
                    admitted += 1;
                }
            }
            Op::Commit { node, pick, pct } => {
                let n = &mut nodes[node];
                if !n.open.is_empty() {
                    let (r, est, w) = n.open.remove(pick % n.open.len());
                    let actual = est * pct / 100;
                    if r.commit(Money::from_nanos(actual))
                        .and_then(|r| Ok(r.wait().map(drop)?))
                        .is_ok()
                    {
                        let e = spent.entry(w).or_default();
                        e.0 += actual;
                        e.1 += actual.saturating_sub(est);
                    }
                }
            }
            Op::Release { node, pick } => {
                let n = &mut nodes[node];
                if !n.open.is_empty() {
                    let (r, _, _) = n.open.remove(pick % n.open.len());
                    r.release().unwrap().wait().unwrap();
                }
            }
            Op::Sync { node } => {
                let _ = nodes[node].limiter.as_ref().unwrap().sync();
            }
            Op::Crash { node } => {
                let n = &mut nodes[node];
                // Open reservations die with the process: they count their estimate.
                for (r, est, w) in n.open.drain(..) {
                    drop(r);
                    spent.entry(w).or_default().0 += est;
                }
                let was_cut = n.proxy.is_cut();
                n.proxy.cut();
                drop(n.limiter.take());
                if !was_cut {
                    n.proxy.heal();
                }
                n.limiter = Some(model_open(n, node, &clock));
            }
            Op::Cut { node } => nodes[node].proxy.cut(),
            Op::Heal { node } => nodes[node].proxy.heal(),
            Op::RedisRestart => server.restart(),
            Op::FlushAll => server.flushall(),
            Op::CrossWindow => {
                // Reservations do not outlive the window here (a day would expire them).
                for n in &mut nodes {
                    for (r, est, w) in n.open.drain(..) {
                        r.commit(Money::from_nanos(est)).unwrap().wait().unwrap();
                        spent.entry(w).or_default().0 += est;
                    }
                }
                clock.advance(SignedDuration::from_hours(24));
                day += 86_400;
            }
            Op::Pass => std::thread::sleep(Duration::from_millis(150)),
        }
        // The bound, in every window: true spend ≤ limit + excess. The nodes' own spend adds
        // up to the model's (exactly once).
        for (&w, &(truth, excess)) in &spent {
            prop_assert!(
                truth <= MODEL_LIMIT + excess,
                "window {w}: spent {truth} > limit + excess {excess}"
            );
        }
        let at = Timestamp::from_second(day + 3_600).unwrap();
        let own: u64 = nodes
            .iter()
            .map(|n| {
                n.limiter
                    .as_ref()
                    .unwrap()
                    .status(StatusQuery::all().at(at))[0]
                    .own_spend
                    .as_nanos()
            })
            .sum();
        let held: u64 = nodes
            .iter()
            .flat_map(|n| n.open.iter())
            .filter(|(_, _, w)| *w == day)
            .map(|(_, est, _)| est)
            .sum();
        let (truth, excess) = spent.get(&day).copied().unwrap_or_default();
        prop_assert_eq!(own, truth, "own spend of the nodes vs the model");
        prop_assert!(
            truth + held <= MODEL_LIMIT + excess,
            "spent {} + held {} > limit + excess {}",
            truth,
            held,
            excess
        );
    }
    // Heal: everything settles, every node sees the exact fleet spend.
    for n in &mut nodes {
        for (r, _, _) in n.open.drain(..) {
            r.release().unwrap().wait().unwrap();
        }
        n.proxy.heal();
    }
    let at = Timestamp::from_second(day + 3_600).unwrap();
    let truth = spent.get(&day).map_or(0, |s| s.0);
    let ls: Vec<&Limiter> = nodes.iter().map(|n| n.limiter.as_ref().unwrap()).collect();
    until(&ls, "the fleet converges", || {
        ls.iter()
            .all(|l| l.status(StatusQuery::all().at(at))[0].spend.as_nanos() == truth)
    });
    Ok(admitted)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, max_shrink_iters: 20, ..ProptestConfig::default() })]

    #[test]
    fn fleet_spend_never_exceeds_the_limit_plus_the_excess(ops in proptest::collection::vec(op(), 10..40)) {
        let admitted = run_model(ops)?;
        eprintln!("model case: {admitted} reservations admitted");
    }
}

#[test]
fn the_model_admits_reservations() {
    // A fixed sequence through the model: reservations, commits above the estimate, a cut,
    // a FLUSHALL, a window crossing.
    let mut ops = Vec::new();
    for node in 0..3 {
        ops.push(Op::Reserve { node, est: 300 });
        ops.push(Op::Reserve { node, est: 200 });
        ops.push(Op::Commit {
            node,
            pick: 0,
            pct: 120,
        });
    }
    ops.extend([
        Op::Cut { node: 1 },
        Op::Reserve { node: 1, est: 100 },
        Op::FlushAll,
        Op::Pass,
        Op::Pass,
        Op::Pass,
        Op::Reserve { node: 0, est: 100 },
        Op::Heal { node: 1 },
        Op::Crash { node: 2 },
        Op::CrossWindow,
        Op::Pass,
        Op::Reserve { node: 2, est: 100 },
    ]);
    if RedisServer::start().is_none() {
        return;
    }
    let admitted = run_model(ops).unwrap();
    assert!(admitted >= 6, "only {admitted} reservations admitted");
}
