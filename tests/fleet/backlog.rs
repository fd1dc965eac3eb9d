//! Bounded work per sync round (invariant 6): a large backlog of windows of one budget
//! (a `1s` budget after a 2 h outage: 7 200 dirty windows) is sent in bounded script calls,
//! over several rounds, the current window first. A Redis whose script time limit is low
//! (`busy-reply-threshold 50` ms) never answers `BUSY` to another client meanwhile, and
//! every window reaches Redis exactly.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::redis_server::RedisServer;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use provider_budgets::{Config, FakeClock, Limiter, Money, RedisConfig, Spend, StatusQuery};

const WINDOWS: i64 = 7_200;

fn config(dir: &std::path::Path, url: &str, node: &str) -> Config {
    let mut c = Config::new()
        .budget(
            "openai",
            Money::from_nanos(u64::MAX / 2),
            "1s".parse().unwrap(),
        )
        .data_dir(dir);
    c.node_id = Some(node.to_owned());
    c.storage.retention = Duration::from_secs(3 * 3600);
    let mut r = RedisConfig::new(url);
    r.prefix = "backlog".to_owned();
    r.grace = Duration::from_secs(3 * 3600);
    // Rounds happen when the test says so.
    r.sync_interval = Duration::from_secs(3600);
    r.command_timeout = Duration::from_secs(2);
    c.redis = Some(r);
    c
}

/// Another application's client: `PING`s in a loop until `stop`; counts `BUSY` answers.
fn bystander(
    url: String,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut pings = 0;
        while !stop.load(Ordering::Relaxed) {
            match redis::cmd("PING").query::<String>(&mut conn) {
                Ok(_) => pings += 1,
                Err(e) if e.to_string().contains("BUSY") => {
                    busy.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => panic!("bystander: {e}"),
            }
            // A script that runs past the 50 ms threshold would answer several of these
            // with BUSY; the pause keeps this loop from starving the other tests of CPU.
            std::thread::sleep(Duration::from_millis(2));
        }
        pings
    })
}

/// The longest `EVALSHA` in the server's slow log, microseconds, and how many there were.
fn longest_script_call(conn: &mut redis::Connection) -> (u64, usize) {
    let log: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query(conn)
        .unwrap();
    let mut longest = 0;
    let mut calls = 0;
    for entry in log {
        let redis::Value::Array(fields) = entry else {
            continue;
        };
        let (Some(redis::Value::Int(us)), Some(redis::Value::Array(args))) =
            (fields.get(2), fields.get(3))
        else {
            continue;
        };
        if matches!(args.first(), Some(redis::Value::BulkString(c)) if c.eq_ignore_ascii_case(b"EVALSHA"))
        {
            calls += 1;
            longest = longest.max(u64::try_from(*us).unwrap());
        }
    }
    (longest, calls)
}

#[test]
fn a_two_hour_backlog_of_a_one_second_budget_never_makes_redis_busy() {
    let Some(server) = RedisServer::start_with(
        &[
            "--busy-reply-threshold".into(),
            "50".into(),
            "--slowlog-log-slower-than".into(),
            "0".into(),
            "--slowlog-max-len".into(),
            "1000000".into(),
        ],
        u16::MAX,
        false,
    ) else {
        return;
    };
    let now = Timestamp::now().as_second();
    let clock = Arc::new(FakeClock::new(Timestamp::from_second(now).unwrap()));
    let dir = tempfile::tempdir().unwrap();
    // Written offline (no Redis yet would be the outage; here: no round runs until asked).
    let limiter = Limiter::builder(config(dir.path(), &server.url(), "a"))
        .clock(clock.clone())
        .open()
        .unwrap();
    let mut spent: u128 = 0;
    for i in 0..WINDOWS {
        let at = Timestamp::from_second(now - WINDOWS + i).unwrap();
        let cost = 1_000 + u64::try_from(i).unwrap();
        spent += u128::from(cost);
        limiter
            .charge(Spend::provider("openai", Money::from_nanos(cost)).at(at))
            .unwrap();
    }
    limiter.flush().unwrap();

    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let _: () = redis::cmd("SLOWLOG").arg("RESET").query(&mut conn).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let busy = Arc::new(AtomicU64::new(0));
    let other = bystander(server.url(), stop.clone(), busy.clone());
    let started = Instant::now();
    limiter.sync().unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let pings = other.join().unwrap();
    let (longest_us, calls) = longest_script_call(&mut conn);
    eprintln!(
        "{WINDOWS} windows: {calls} script calls in {took:?}, the longest {longest_us} us; \
         {pings} pings of another client meanwhile"
    );
    assert_eq!(busy.load(Ordering::Relaxed), 0, "another client got BUSY");
    assert!(calls > 1, "the backlog went in one script call");
    assert!(longest_us < 50_000, "one script call took {longest_us} us");
    let last = limiter
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap()
        .replication
        .last_round;
    assert_eq!(last.keys_deferred, 0, "{last:?}");

    // Every window reached Redis exactly.
    let mut in_redis: u128 = 0;
    for i in 0..WINDOWS {
        let key = format!("backlog:{{openai:1s}}:{}", now - WINDOWS + i);
        let total: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("~total")
            .query(&mut conn)
            .unwrap();
        in_redis += total.map_or(0, |t| t.parse::<u128>().unwrap());
    }
    assert_eq!(in_redis, spent);
    limiter.shutdown().unwrap();
}
