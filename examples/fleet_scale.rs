//! Fleet scale: what one sync round costs Redis as the fleet grows.
//!
//! Opens N nodes (real `Limiter`s, each with its own sled data dir) in this process against
//! one private `redis-server` (started here, persistence off), B budgets each, and measures
//! per node round:
//!
//! * Redis CPU: the `used_cpu_sys + used_cpu_user` delta of `INFO cpu`,
//! * bytes into and out of Redis: `total_net_input_bytes` / `total_net_output_bytes` deltas
//!   of `INFO stats`,
//! * round latency (wall time of `Limiter::sync`, sequential, so Redis serves one round at a
//!   time),
//!
//! for a **dirty** round (every node spent in every budget since its last round) and a
//! **clean** one (nothing changed), over N ∈ {1, 10, 100} × B ∈ {10, 100, 1 000}; then
//! extrapolates the Redis cores that 1 000 nodes × 1 000 budgets need at a 1 s interval from
//! the per-node-round CPU at N = 100, B = 1 000.
//!
//! `cargo run --release --example fleet_scale` (a few minutes); `-- --quick` runs
//! N ∈ {1, 10} × B ∈ {10, 100} (seconds: what `.ci/run` runs). Only the public API and
//! `INFO` are used, so the same file measures an earlier version of the wire too.

#![allow(clippy::unwrap_used)]

#[path = "../tests/support/redis_server.rs"]
mod redis_server;

use std::time::{Duration, Instant};

use provider_budgets::{Config, Limiter, Money, RedisConfig};
use redis_server::RedisServer;

/// Rounds measured per (N, B, mode); the figures are their average.
const ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    cpu: f64,
    bytes_in: f64,
    bytes_out: f64,
}

fn info(server: &RedisServer) -> Sample {
    let cpu = server.command(&["INFO", "cpu"]);
    let stats = server.command(&["INFO", "stats"]);
    let field = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    Sample {
        cpu: field(&cpu, "used_cpu_sys") + field(&cpu, "used_cpu_user"),
        bytes_in: field(&stats, "total_net_input_bytes"),
        bytes_out: field(&stats, "total_net_output_bytes"),
    }
}

struct Row {
    n: usize,
    b: usize,
    dirty: bool,
    /// Per node round.
    cpu_us: f64,
    bytes_in: f64,
    bytes_out: f64,
    latency_ms: f64,
}

fn measure(server: &RedisServer, nodes: &[Limiter], b: usize, dirty: bool) -> Row {
    let mut total = Sample::default();
    let mut wall = Duration::ZERO;
    for _ in 0..ROUNDS {
        if dirty {
            for node in nodes {
                for p in 0..b {
                    node.record(&format!("p{p}"), Money::from_nanos(1)).unwrap();
                }
                node.flush().unwrap();
            }
        }
        let before = info(server);
        for node in nodes {
            let started = Instant::now();
            node.sync().unwrap();
            wall += started.elapsed();
        }
        let after = info(server);
        total.cpu += after.cpu - before.cpu;
        total.bytes_in += after.bytes_in - before.bytes_in;
        total.bytes_out += after.bytes_out - before.bytes_out;
    }
    let rounds = (ROUNDS * nodes.len()) as f64;
    Row {
        n: nodes.len(),
        b,
        dirty,
        cpu_us: total.cpu / rounds * 1e6,
        bytes_in: total.bytes_in / rounds,
        bytes_out: total.bytes_out / rounds,
        latency_ms: wall.as_secs_f64() / rounds * 1e3,
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let Some(server) = RedisServer::start() else {
        eprintln!("fleet_scale needs redis-server");
        std::process::exit(1);
    };
    let ns: &[usize] = if quick { &[1, 10] } else { &[1, 10, 100] };
    let bs: &[usize] = if quick { &[10, 100] } else { &[10, 100, 1000] };
    let root = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for &b in bs {
        for &n in ns {
            let prefix = format!("fs{n}x{b}");
            let nodes: Vec<Limiter> = (0..n)
                .map(|i| {
                    let mut c = Config::new().data_dir(root.path().join(format!("{prefix}-{i}")));
                    for p in 0..b {
                        c = c.budget(
                            format!("p{p}"),
                            Money::from_nanos(u64::MAX / 4),
                            "1h".parse().unwrap(),
                        );
                    }
                    c.node_id = Some(format!("node-{i}"));
                    let mut r = RedisConfig::new(server.url());
                    r.prefix = prefix.clone();
                    r.sync_interval = Duration::from_secs(3600);
                    r.command_timeout = Duration::from_secs(30);
                    c.redis = Some(r);
                    Limiter::open(c).unwrap()
                })
                .collect();
            // Warm up: every node has a field in every budget and the script is loaded.
            for node in &nodes {
                for p in 0..b {
                    node.record(&format!("p{p}"), Money::from_nanos(1)).unwrap();
                }
                node.sync().unwrap();
            }
            for node in &nodes {
                node.sync().unwrap();
            }
            for dirty in [true, false] {
                let row = measure(&server, &nodes, b, dirty);
                eprintln!(
                    "N={:>3} B={:>4} {:5}: {:>9.1} µs Redis CPU, {:>9.0} B in, {:>9.0} B out, {:>8.2} ms per node round",
                    row.n,
                    row.b,
                    if dirty { "dirty" } else { "clean" },
                    row.cpu_us,
                    row.bytes_in,
                    row.bytes_out,
                    row.latency_ms
                );
                rows.push(row);
            }
            drop(nodes);
            server.flushall();
        }
    }

    println!("| N nodes | B budgets | round | Redis CPU / node round | per budget | bytes to Redis | bytes from Redis | latency |");
    println!("|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} µs | {:.2} µs | {:.0} | {:.0} | {:.2} ms |",
            r.n,
            r.b,
            if r.dirty { "dirty" } else { "clean" },
            r.cpu_us,
            r.cpu_us / r.b as f64,
            r.bytes_in,
            r.bytes_out,
            r.latency_ms
        );
    }
    // Extrapolation to 1 000 nodes × 1 000 budgets at a 1 s interval, from the largest N
    // measured at the largest B: Redis CPU per node round × 1 000 node rounds per second,
    // scaled linearly in B when B = 1 000 was not measured.
    let (n_max, b_max) = (*ns.last().unwrap(), *bs.last().unwrap());
    for dirty in [true, false] {
        if let Some(r) = rows
            .iter()
            .find(|r| r.n == n_max && r.b == b_max && r.dirty == dirty)
        {
            let per_round = r.cpu_us / 1e6 * (1000.0 / b_max as f64);
            let cores = per_round * 1000.0;
            let out = r.bytes_out * (1000.0 / b_max as f64) * 1000.0;
            println!(
                "extrapolated 1000 nodes x 1000 budgets at 1 s, every round {}: {:.2} Redis cores, {:.1} MB/s of replies",
                if dirty { "dirty" } else { "clean" },
                cores,
                out / 1e6
            );
        }
    }
    // The targets of issue 11.
    let at = |n: usize, dirty: bool| {
        rows.iter()
            .find(|r| r.n == n && r.b == b_max && r.dirty == dirty)
            .map(|r| (r.cpu_us, r.bytes_out))
    };
    if let (Some((c1, o1)), Some((cn, on))) = (at(1, true), at(n_max, true)) {
        println!(
            "N={n_max} vs N=1 (B={b_max}, dirty): Redis CPU x{:.2}, reply bytes x{:.2}",
            cn / c1,
            on / o1
        );
    }
    if let (Some((dirty, _)), Some((clean, _))) = (at(n_max, true), at(n_max, false)) {
        println!(
            "clean / dirty Redis CPU (N={n_max}, B={b_max}): {:.0} %",
            clean / dirty * 100.0
        );
    }
}
