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
//! each minus what the measurement's own `INFO` commands show (measured right after, with
//! nothing in between),
//!
//! for a **dirty** round (every node spent in every budget since its last round), a **clean**
//! one (nothing changed anywhere: Redis's client-side tracking tells the nodes so, no key is
//! read) and a **clean, others changed** one (nothing to write, but another node, the
//! *writer*, spent in every budget since the node's last round: every key was invalidated,
//! so every key is read), over N ∈ {1, 10, 100} × B ∈ {10, 100, 1 000}; then extrapolates
//! the Redis cores that 1 000 nodes × 1 000 budgets need at a 1 s interval from the
//! per-node-round CPU at N = 100, B = 1 000. The writer's own round (B script calls, each
//! write invalidating the key for the N readers) is measured apart and printed: it is where
//! Redis pays for sending the invalidations.
//!
//! `cargo run --release --example fleet_scale` (a few minutes); `-- --quick` runs
//! N ∈ {1, 10} × B ∈ {10, 100} (seconds: what `.ci/run` runs). Only the public API and
//! `INFO` are used, so the same file measures an earlier version of the wire too.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::redis_server;

use std::time::{Duration, Instant};

use provider_budgets::Spend;
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

/// What changed since a node's last round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The node spent in every budget.
    Dirty,
    /// Nothing, anywhere.
    Clean,
    /// The node nothing; the writer node in every budget.
    OthersChanged,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Dirty => "dirty",
            Kind::Clean => "clean",
            Kind::OthersChanged => "clean, others changed",
        }
    }
}

/// The deltas that one measurement (an `info` before and after nothing) shows by itself.
fn probe(server: &RedisServer) -> Sample {
    let before = info(server);
    let after = info(server);
    Sample {
        cpu: after.cpu - before.cpu,
        bytes_in: after.bytes_in - before.bytes_in,
        bytes_out: after.bytes_out - before.bytes_out,
    }
}

struct Row {
    n: usize,
    b: usize,
    kind: Kind,
    /// Per node round.
    cpu_us: f64,
    bytes_in: f64,
    bytes_out: f64,
    latency_ms: f64,
}

/// Records 1 nano-dollar in every budget of `node`.
fn spend_everywhere(node: &Limiter, b: usize) {
    for p in 0..b {
        node.charge(Spend::provider(&format!("p{p}"), Money::from_nanos(1)))
            .unwrap();
    }
    node.flush().unwrap();
}

/// Measures `ROUNDS` rounds of every node; for [`Kind::OthersChanged`] the writer's rounds
/// (one before each) are measured apart and returned too (Redis CPU µs per writer round).
fn measure(
    server: &RedisServer,
    nodes: &[Limiter],
    writer: &Limiter,
    b: usize,
    kind: Kind,
) -> (Row, Option<f64>) {
    let mut total = Sample::default();
    let mut wall = Duration::ZERO;
    let mut writer_cpu = 0.0;
    for _ in 0..ROUNDS {
        match kind {
            Kind::Dirty => nodes.iter().for_each(|node| spend_everywhere(node, b)),
            Kind::Clean => {}
            Kind::OthersChanged => {
                spend_everywhere(writer, b);
                let before = info(server);
                writer.sync().unwrap();
                writer_cpu += info(server).cpu - before.cpu - probe(server).cpu;
            }
        }
        let before = info(server);
        for node in nodes {
            let started = Instant::now();
            node.sync().unwrap();
            wall += started.elapsed();
        }
        let after = info(server);
        // What the measurement itself cost Redis (its `INFO` commands): measured right away
        // and taken off, so that a clean round's few µs are not drowned in it.
        let probe = probe(server);
        total.cpu += after.cpu - before.cpu - probe.cpu;
        total.bytes_in += after.bytes_in - before.bytes_in - probe.bytes_in;
        total.bytes_out += after.bytes_out - before.bytes_out - probe.bytes_out;
    }
    let rounds = (ROUNDS * nodes.len()) as f64;
    let row = Row {
        n: nodes.len(),
        b,
        kind,
        cpu_us: total.cpu / rounds * 1e6,
        bytes_in: total.bytes_in / rounds,
        bytes_out: total.bytes_out / rounds,
        latency_ms: wall.as_secs_f64() / rounds * 1e3,
    };
    let writer = (kind == Kind::OthersChanged).then(|| writer_cpu / ROUNDS as f64 * 1e6);
    (row, writer)
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
    let mut writers = Vec::new();
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
            let writer = {
                let dir = root.path().join(format!("{prefix}-writer"));
                let mut c = Config::new().data_dir(dir);
                for p in 0..b {
                    c = c.budget(
                        format!("p{p}"),
                        Money::from_nanos(u64::MAX / 4),
                        "1h".parse().unwrap(),
                    );
                }
                c.node_id = Some("writer".to_owned());
                let mut r = RedisConfig::new(server.url());
                r.prefix = prefix.clone();
                r.sync_interval = Duration::from_secs(3600);
                r.command_timeout = Duration::from_secs(30);
                c.redis = Some(r);
                Limiter::open(c).unwrap()
            };
            // Warm up: every node has a field in every budget, the script is loaded, and
            // every node has read every key once with a plain read (tracked from then on).
            for node in nodes.iter().chain([&writer]) {
                spend_everywhere(node, b);
                node.sync().unwrap();
            }
            for _ in 0..2 {
                for node in &nodes {
                    node.sync().unwrap();
                }
            }
            for kind in [Kind::Dirty, Kind::Clean, Kind::OthersChanged] {
                // Between kinds: a plain read round, so that each starts tracked.
                for node in &nodes {
                    node.sync().unwrap();
                }
                let (row, writer_us) = measure(&server, &nodes, &writer, b, kind);
                eprintln!(
                    "N={:>3} B={:>4} {:21}: {:>9.1} µs Redis CPU, {:>9.0} B in, {:>9.0} B out, {:>8.2} ms per node round",
                    row.n,
                    row.b,
                    kind.name(),
                    row.cpu_us,
                    row.bytes_in,
                    row.bytes_out,
                    row.latency_ms
                );
                if let Some(w) = writer_us {
                    eprintln!(
                        "N={n:>3} B={b:>4} writer round (B script calls, each key invalidated for N readers): {w:.1} µs Redis CPU"
                    );
                    writers.push((n, b, w));
                }
                rows.push(row);
            }
            drop(nodes);
            drop(writer);
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
            r.kind.name(),
            r.cpu_us,
            r.cpu_us / r.b as f64,
            r.bytes_in,
            r.bytes_out,
            r.latency_ms
        );
    }
    println!();
    println!("| N readers | B budgets | writer round: Redis CPU | per budget |");
    println!("|---:|---:|---:|---:|");
    for (n, b, w) in &writers {
        println!("| {n} | {b} | {w:.0} µs | {:.2} µs |", w / *b as f64);
    }
    // Extrapolation to 1 000 nodes × 1 000 budgets at a 1 s interval, from the largest N
    // measured at the largest B: Redis CPU per node round × 1 000 node rounds per second,
    // scaled linearly in B when B = 1 000 was not measured.
    let (n_max, b_max) = (*ns.last().unwrap(), *bs.last().unwrap());
    let at = |n: usize, kind: Kind| {
        rows.iter()
            .find(|r| r.n == n && r.b == b_max && r.kind == kind)
            .map(|r| (r.cpu_us, r.bytes_out))
    };
    for kind in [Kind::Dirty, Kind::Clean, Kind::OthersChanged] {
        if let Some((cpu_us, bytes_out)) = at(n_max, kind) {
            let scale = 1000.0 / b_max as f64;
            let cores = cpu_us / 1e6 * scale * 1000.0;
            let out = bytes_out * scale * 1000.0;
            println!(
                "extrapolated 1000 nodes x 1000 budgets at 1 s, every round {}: {:.2} Redis cores, {:.1} MB/s of replies",
                kind.name(),
                cores,
                out / 1e6
            );
        }
    }
    // The fleet-scale targets.
    if let (Some((c1, o1)), Some((cn, on))) = (at(1, Kind::Dirty), at(n_max, Kind::Dirty)) {
        println!(
            "N={n_max} vs N=1 (B={b_max}, dirty): Redis CPU x{:.2}, reply bytes x{:.2}",
            cn / c1,
            on / o1
        );
    }
    if let Some((dirty, _)) = at(n_max, Kind::Dirty) {
        for kind in [Kind::Clean, Kind::OthersChanged] {
            if let Some((cpu, _)) = at(n_max, kind) {
                println!(
                    "{} / dirty Redis CPU (N={n_max}, B={b_max}): {:.0} %",
                    kind.name(),
                    cpu / dirty * 100.0
                );
            }
        }
    }
}
