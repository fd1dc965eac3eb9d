//! Replication through a real local `redis-server` (started by the bench, on a free port):
//! records/s with replication on, round trips per sync, sync latency for 10/100/1000 budgets,
//! and fleet convergence lag (a record on node A until node B's filter sees it).
//!
//! Without `redis-server` on PATH these benches print a note and do nothing (unless `CI` is
//! set, where the harness panics: CI installs Redis).

use provider_budgets_test_support::redis_server;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use provider_budgets::{Config, Limiter, Money, RedisConfig};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};

use redis_server::RedisServer;

fn config(
    dir: &std::path::Path,
    url: &str,
    node: &str,
    budgets: usize,
    interval: Duration,
) -> Config {
    let mut c = Config::new().data_dir(dir);
    for i in 0..budgets {
        c = c.budget(
            format!("p{i}"),
            Money::from_nanos(1_000_000_000_000_000),
            "1h".parse().expect("period"),
        );
    }
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = format!("bench{budgets}");
    r.sync_interval = interval;
    c.redis = Some(r);
    c
}

/// Node "a" with `budgets` budgets on a fresh data dir.
fn open_node(
    server: &RedisServer,
    budgets: usize,
    interval: Duration,
) -> (tempfile::TempDir, Limiter) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node =
        Limiter::open(config(dir.path(), &server.url(), "a", budgets, interval)).expect("open");
    (dir, node)
}

/// A node with `budgets` budgets, each with some spend, synced once (script loaded), with
/// background rounds out of the way.
fn synced_node(server: &RedisServer, budgets: usize) -> (tempfile::TempDir, Limiter) {
    let (dir, node) = open_node(server, budgets, Duration::from_secs(3600));
    for i in 0..budgets {
        node.charge(Spend::provider(&format!("p{i}"), Money::from_nanos(1)))
            .expect("record");
    }
    node.sync().expect("sync");
    (dir, node)
}

/// The criterion part: sync latency per budget count, records/s with replication on.
pub fn bench(c: &mut Criterion) {
    let Some(server) = RedisServer::start() else {
        eprintln!("replication benches skipped: redis-server not available");
        return;
    };
    let mut group = c.benchmark_group("replication");
    group.sample_size(20);
    for budgets in [10usize, 100, 1000] {
        let (_dir, node) = synced_node(&server, budgets);
        group.bench_with_input(BenchmarkId::new("sync", budgets), &budgets, |b, _| {
            b.iter(|| node.sync().expect("sync"))
        });
    }
    let (_dir, node) = open_node(&server, 10, Duration::from_millis(100));
    group.throughput(Throughput::Elements(1));
    group.bench_function("record_with_replication", |b| {
        b.iter(|| {
            node.charge(Spend::provider(black_box("p3"), Money::from_nanos(1)))
                .expect("record")
        })
    });
    group.finish();
    drop(server);
    report();
}

/// The printed part: p50/p99 of sync latency, round trips per sync, convergence lag.
fn report() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    for budgets in [10usize, 100, 1000] {
        let (_dir, node) = synced_node(&server, budgets);
        let before = node.status(StatusQuery::all())[0].replication.round_trips;
        let rounds = 200;
        let mut times: Vec<Duration> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                node.sync().expect("sync");
                t.elapsed()
            })
            .collect();
        let trips = node.status(StatusQuery::all())[0].replication.round_trips - before;
        times.sort();
        println!(
            "replication/sync/{budgets:<4} p50 {:>9.1?}  p99 {:>9.1?}  round trips per sync {}",
            times[times.len() / 2],
            times[times.len() * 99 / 100],
            trips as f64 / rounds as f64
        );
    }

    // Records per second through the whole pipeline, replication on (100 ms rounds).
    let (_dir, node) = open_node(&server, 10, Duration::from_millis(100));
    let n = 1_000_000u64;
    let t = Instant::now();
    for i in 0..n {
        node.charge(Spend::provider(
            ["p0", "p1", "p2"][(i % 3) as usize],
            Money::from_nanos(1),
        ))
        .expect("record");
    }
    node.flush().expect("flush");
    let elapsed = t.elapsed();
    node.sync().expect("sync");
    println!(
        "replication/records_per_s {:.0} ({n} records incl. final flush, 100 ms sync interval)",
        n as f64 / elapsed.as_secs_f64()
    );
    drop(node);

    // Convergence lag: node A spends budget i; how long until node B's filter drops it.
    let interval = Duration::from_millis(100);
    let trials = 20;
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let mut ca = config(da.path(), &server.url(), "a", trials, interval);
    let mut cb = config(db.path(), &server.url(), "b", trials, interval);
    for c in [&mut ca, &mut cb] {
        for b in &mut c.budgets {
            b.limit = Money::from_nanos(1_000);
        }
        if let Some(r) = c.redis.as_mut() {
            r.prefix = "lag".into();
        }
    }
    let a = Limiter::open(ca).expect("open a");
    let b = Limiter::open(cb).expect("open b");
    let mut lags = Vec::new();
    for i in 0..trials {
        let model = [format!("p{i}/model")];
        let t = Instant::now();
        a.charge(Spend::provider(&format!("p{i}"), Money::from_nanos(1_000)))
            .expect("record");
        while b.filter(&model, NO_TAGS).is_ok() {
            if t.elapsed() > Duration::from_secs(10) {
                eprintln!("replication/lag: node B never saw trial {i}");
                return;
            }
            std::thread::yield_now();
        }
        lags.push(t.elapsed());
    }
    lags.sort();
    println!(
        "replication/convergence_lag p50 {:>9.1?}  p99 {:>9.1?}  (sync_interval {interval:?}, {trials} trials)",
        lags[lags.len() / 2],
        lags[lags.len() * 99 / 100]
    );
}
