//! Overshoot: how far past its limit a fleet spends one budget, `shared` versus `strict`.
//!
//! N ∈ {2, 8} real `Limiter`s (each with its own sled data dir and node id) in this process
//! share one budget through one private `redis-server` (started here, persistence off). Every
//! node runs 4 worker threads making calls of a random cost (uniform in [$0.01, $0.10],
//! 5 ms of "provider latency" each) until every node is denied (a worker stops after 3
//! denials in a row):
//!
//! * `shared` (today's filter then charge): `filter` → call → `record(cost)`;
//! * `strict` (reserve then commit): `reserve(estimate = cost)` → call → `commit(cost)`.
//!
//! Three network conditions: Redis up (direct), 100 ms round-trip delay (a TCP proxy holding
//! every chunk 50 ms each way), and Redis stopped (killed) once the fleet has spent half the
//! limit. The result is the fleet's true final spend (Σ of every node's own spend, exact) as a
//! fraction of the limit, and the stranded headroom (limit − spend, when under) in % of the
//! limit. Targets for strict: spend ≤ limit (estimates are exact here, so no estimate error)
//! and stranded ≤ 5 % with Redis up. For reference, litellm's filter measured 2× (one
//! instance) to 3× (two instances) of its limit (`docs/design.md`, "The reference behaviour").
//!
//! `cargo run --release --example overshoot` (limit $100, sync every 200 ms); `-- --quick`
//! ($20, what `.ci/run` runs: seconds).

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::proxy;
use provider_budgets_test_support::redis_server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use provider_budgets::{Config, Identity, Limiter, Money, RedisConfig};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};
use proxy::Proxy;
use redis_server::RedisServer;

const WORKERS: usize = 4;
const LATENCY: Duration = Duration::from_millis(5);
const DENIALS_TO_STOP: u32 = 3;
const DEPLOYMENT: &str = "openai/gpt-4o";
const NANOS_PER_USD: u64 = 1_000_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Net {
    Up,
    Delay,
    StoppedHalfway,
}

impl Net {
    fn label(self) -> &'static str {
        match self {
            Net::Up => "redis up",
            Net::Delay => "100 ms RTT",
            Net::StoppedHalfway => "redis stopped at 50 %",
        }
    }
}

/// splitmix64: a small deterministic generator per worker.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A cost in [$0.01, $0.10], in nanos.
    fn cost(&mut self) -> Money {
        Money::from_nanos(10_000_000 + self.next() % 90_000_001)
    }
}

/// Redis, the proxy in front of it and the URL the nodes use (the proxy's when delayed).
fn start_redis(net: Net) -> (RedisServer, Proxy, String) {
    let server = RedisServer::start().expect("redis-server is needed for this benchmark");
    let proxy = Proxy::start(server.port()).unwrap();
    let url = if net == Net::Delay {
        proxy.set_delay(Duration::from_millis(50));
        proxy.url()
    } else {
        server.url()
    };
    (server, proxy, url)
}

/// `n` limiters on one Redis, each with its own data dir and node id (`n0`, `n1`, …); the
/// limiters are dropped (shut down) before their data dirs.
struct Fleet {
    nodes: Vec<Limiter>,
    _dirs: Vec<tempfile::TempDir>,
}

fn open_fleet(n: usize, yaml: &str, url: &str, run_id: usize) -> Fleet {
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut c = Config::from_yaml_str(yaml).unwrap().data_dir(d.path());
            c.node_id = Some(format!("n{i}"));
            let mut r = RedisConfig::new(url);
            r.prefix = format!("o{run_id}");
            r.sync_interval = Duration::from_millis(200);
            r.connect_timeout = Duration::from_millis(300);
            r.command_timeout = Duration::from_millis(1000);
            c.redis = Some(r);
            Limiter::open(c).unwrap()
        })
        .collect();
    Fleet { nodes, _dirs: dirs }
}

/// Retries `granted` (a tiny reservation, released) until it passes. A strict budget's first
/// use in Redis freezes raises for three sync intervals (Redis cannot tell it from a loss:
/// docs/strict-budgets.md); this waits it out before measuring.
fn wait_first_grant(mut granted: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !granted() {
        assert!(Instant::now() < deadline, "no first grant");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reserves 1 nano for `identity` and releases it: whether it was granted.
fn tiny_reservation(node: &Limiter, identity: &Identity<'_>) -> bool {
    node.reserve(&[DEPLOYMENT], Money::from_nanos(1))
        .identity(identity)
        .wait()
        .map(|r| r.release().unwrap().wait().unwrap())
        .is_ok()
}

/// Kills Redis once `spent()` (nanos) reaches `half`, or after 120 s; returns without killing
/// it when all `workers` finished first.
fn stop_redis_halfway(
    server: &mut RedisServer,
    finished: &AtomicU64,
    workers: u64,
    half: u64,
    spent: impl Fn() -> u64,
) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let spent = spent();
        if finished.load(Ordering::SeqCst) == workers {
            return;
        }
        if spent >= half || Instant::now() > deadline {
            server.kill();
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The fleet's true spend over every budget: Σ of every node's own spend (exact), nanos.
fn fleet_spend(nodes: &[Limiter]) -> u64 {
    nodes
        .iter()
        .flat_map(|l| l.status(StatusQuery::all()))
        .map(|row| row.own_spend.as_nanos())
        .sum()
}

// ---- One budget -------------------------------------------------------------------------

struct Outcome {
    spend: u64,
    calls: u64,
    seconds: f64,
}

/// One worker of the one-budget case: calls until 3 denials in a row.
fn one_budget_worker(node: &Limiter, strict: bool, seed: u64, calls: &AtomicU64) {
    let mut rng = Rng(seed);
    let mut denied = 0;
    let deployments = [DEPLOYMENT];
    while denied < DENIALS_TO_STOP {
        let cost = rng.cost();
        let admitted = if strict {
            match node.reserve(&deployments, cost).wait() {
                Ok(r) => {
                    std::thread::sleep(LATENCY);
                    r.commit(cost).unwrap().wait().unwrap();
                    true
                }
                Err(_) => false,
            }
        } else if node.filter(&deployments, NO_TAGS).is_ok() {
            std::thread::sleep(LATENCY);
            node.charge(Spend::provider("openai", cost)).unwrap();
            true
        } else {
            false
        };
        if admitted {
            denied = 0;
            calls.fetch_add(1, Ordering::Relaxed);
        } else {
            denied += 1;
            // Denied: the budget may free up (a give-back, a grant round).
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn run(n: usize, strict: bool, net: Net, limit_usd: u64, run_id: usize) -> Outcome {
    let (mut server, _proxy, url) = start_redis(net);
    let enforcement = if strict { "strict" } else { "shared" };
    let yaml = format!(
        "provider_budgets:\n  budgets:\n    - {{provider: openai, limit: {limit_usd}, period: 1d, enforcement: {enforcement}}}\n"
    );
    let fleet = open_fleet(n, &yaml, &url, run_id);
    if strict {
        for node in &fleet.nodes {
            wait_first_grant(|| tiny_reservation(node, &Identity::NONE));
        }
    }
    let calls = AtomicU64::new(0);
    let finished = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for (i, node) in fleet.nodes.iter().enumerate() {
            for w in 0..WORKERS {
                let seed = (run_id * 1000 + i * WORKERS + w) as u64 + 1;
                let (calls, finished) = (&calls, &finished);
                s.spawn(move || {
                    one_budget_worker(node, strict, seed, calls);
                    finished.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
        if net == Net::StoppedHalfway {
            let (server, finished, nodes) = (&mut server, &finished, &fleet.nodes);
            let half = limit_usd * NANOS_PER_USD / 2;
            let spent = move || fleet_spend(nodes);
            let workers = (n * WORKERS) as u64;
            s.spawn(move || stop_redis_halfway(server, finished, workers, half, spent));
        }
    });
    let seconds = started.elapsed().as_secs_f64();
    let spend = fleet_spend(&fleet.nodes);
    drop(fleet);
    Outcome {
        spend,
        calls: calls.load(Ordering::Relaxed),
        seconds,
    }
}

/// The one-budget table; whether a strict run ended above its limit.
fn one_budget_table(limit_usd: u64, run_id: &mut usize) -> bool {
    println!(
        "overshoot: one budget of ${limit_usd}/day, calls of $0.01-$0.10, {WORKERS} workers per node, sync every 200 ms"
    );
    println!(
        "| N | network | shared: spend / limit | strict: spend / limit | strict: stranded | calls (shared / strict) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut failed = false;
    for n in [2usize, 8] {
        for net in [Net::Up, Net::Delay, Net::StoppedHalfway] {
            *run_id += 1;
            let shared = run(n, false, net, limit_usd, *run_id);
            *run_id += 1;
            let strict = run(n, true, net, limit_usd, *run_id);
            let limit = (limit_usd * NANOS_PER_USD) as f64;
            let stranded = (limit - strict.spend as f64).max(0.0) / limit * 100.0;
            println!(
                "| {n} | {} | {:.3} | {:.3} | {stranded:.2} % | {} / {} ({:.1} s / {:.1} s) |",
                net.label(),
                shared.spend as f64 / limit,
                strict.spend as f64 / limit,
                shared.calls,
                strict.calls,
                shared.seconds,
                strict.seconds,
            );
            if strict.spend > limit_usd * NANOS_PER_USD {
                eprintln!(
                    "strict overshot its limit with exact estimates: {}",
                    strict.spend
                );
                failed = true;
            }
        }
    }
    failed
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let limit_usd = if quick { 20 } else { 100 };
    let mut run_id = 0;
    let failed = one_budget_table(limit_usd, &mut run_id);
    if failed {
        std::process::exit(1);
    }
}
