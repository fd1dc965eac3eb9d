//! A fleet-wide `concurrent` limit: a strict concurrent budget (10 slots) over 4 real child
//! processes sharing a `redis-server`, with SIGKILLs. The test sums what every live process
//! reports holding after each change and checks, at every change, that the fleet never holds
//! more than 10; a SIGKILLed holder's slots are taken again by another node within the grant
//! lease plus a few sync intervals and the grant wait; a restarted holder starts with no grant
//! (it cannot re-register the grant the fleet reclaimed from it).

use provider_budgets_test_support::child::{sigkill, spawn_piped};
use provider_budgets_test_support::open as support;
use provider_budgets_test_support::redis_server;

use std::io::{BufRead, Write};
use std::process::{Child, ChildStdin, Command};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use provider_budgets::{FakeClock, Limiter, Money, RedisConfig, Reservation};
use redis_server::RedisServer;

const LIMIT: u64 = 10;
const NODES: usize = 4;
const INTERVAL: Duration = Duration::from_millis(200);
/// `connect_timeout` and `command_timeout` each.
const TIMEOUT: Duration = Duration::from_millis(300);
/// As the docs advise: three sync intervals plus the connect and command timeouts.
const LEASE: Duration = Duration::from_millis(3 * 200 + 2 * 300);
/// `redis.grant_wait` (its default).
const GRANT_WAIT: Duration = Duration::from_millis(250);

const YAML: &str = "\
provider_budgets:
  budgets:
    - {provider: openai, unit: concurrent, limit: 10, enforcement: strict}
";

const D: [&str; 1] = ["openai/gpt-4o"];

fn open(dir: &str, url: &str, node: &str) -> Limiter {
    let mut c = support::yaml(YAML, std::path::Path::new(dir));
    c.node_id = Some(node.to_owned());
    let mut r = RedisConfig::new(url);
    r.prefix = "slots".to_owned();
    r.sync_interval = INTERVAL;
    r.grant_lease = Some(LEASE);
    r.grant_wait = GRANT_WAIT;
    r.connect_timeout = TIMEOUT;
    r.command_timeout = TIMEOUT;
    c.redis = Some(r);
    support::open(c, &FakeClock::new(Timestamp::now()))
}

/// What a child holds: the count it reports, and the slots `hold` keeps.
#[derive(Default)]
struct Held {
    n: u64,
    kept: Vec<Reservation>,
}

impl Held {
    /// Reports the count (under the lock that changed it: reports are in order).
    fn report(&self) {
        let mut out = std::io::stdout().lock();
        writeln!(out, "h {}", self.n).unwrap();
        out.flush().unwrap();
    }
}

/// Churn: take a slot, hold it 10–50 ms, release it, until `ms` ran out.
fn churn(l: &Limiter, held: &Mutex<Held>, ms: u64, seed: u64) {
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut seed = seed;
    while Instant::now() < deadline {
        let Ok(r) = l.reserve(&D, Money::ZERO).wait() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        {
            let mut h = held.lock().unwrap();
            h.n += 1;
            h.report();
        }
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        std::thread::sleep(Duration::from_millis(10 + (seed >> 33) % 40));
        let mut h = held.lock().unwrap();
        r.release().unwrap().wait().unwrap();
        h.n -= 1;
        h.report();
    }
}

/// Hold: take slots until `n` are kept.
fn hold(l: &Limiter, held: &Mutex<Held>, n: usize) {
    while held.lock().unwrap().kept.len() < n {
        let Ok(r) = l.reserve(&D, Money::ZERO).wait() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let mut h = held.lock().unwrap();
        h.kept.push(r);
        h.n += 1;
        h.report();
    }
}

/// The child: a node of the fleet driven line by line (`churn MS`, `hold N`, `free`), each
/// change of what it holds reported as `h N`; killed by the test.
#[test]
fn fleet_slots_child() {
    let Ok(dir) = std::env::var("UNITS_SLOTS_DIR") else {
        return; // not the child
    };
    let url = std::env::var("UNITS_SLOTS_URL").unwrap();
    let node = std::env::var("UNITS_SLOTS_NODE").unwrap();
    let l = open(&dir, &url, &node);
    let held = Mutex::new(Held::default());
    // libtest may have printed `test … ` without a newline before.
    println!("\nready");
    std::thread::scope(|s| {
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap();
            let mut words = line.split_whitespace();
            let (cmd, arg) = (
                words.next(),
                words.next().map(|w| w.parse::<u64>().unwrap()),
            );
            let (l, held) = (&l, &held);
            match (cmd, arg) {
                (Some("churn"), Some(ms)) => {
                    s.spawn(move || {
                        std::thread::scope(|t| {
                            for i in 0..3 {
                                t.spawn(move || churn(l, held, ms, i + ms));
                            }
                        });
                        println!("done");
                    });
                }
                (Some("hold"), Some(n)) => {
                    s.spawn(move || hold(l, held, n as usize));
                }
                (Some("free"), None) => {
                    let mut h = held.lock().unwrap();
                    for r in std::mem::take(&mut h.kept) {
                        r.release().unwrap().wait().unwrap();
                        h.n -= 1;
                        h.report();
                    }
                }
                _ => panic!("unknown command {line:?}"),
            }
        }
    });
}

enum Event {
    Ready,
    Held(u64),
    Done,
    Gone,
}

/// One node process and its command pipe.
struct Node {
    child: Child,
    stdin: ChildStdin,
}

fn spawn(i: usize, dir: &std::path::Path, url: &str, events: &Sender<(usize, Event)>) -> Node {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "units_concurrent::fleet_slots_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("UNITS_SLOTS_DIR", dir)
    .env("UNITS_SLOTS_URL", url)
    .env("UNITS_SLOTS_NODE", ["a", "b", "c", "d"][i]);
    let (child, stdin, out) = spawn_piped(cmd);
    let events = events.clone();
    std::thread::spawn(move || {
        for line in out.lines() {
            let Ok(line) = line else { break };
            let ev = match line.trim() {
                "ready" => Event::Ready,
                "done" => Event::Done,
                l => match l.strip_prefix("h ") {
                    Some(n) => Event::Held(n.parse().unwrap()),
                    None => continue,
                },
            };
            if events.send((i, ev)).is_err() {
                return;
            }
        }
        let _ = events.send((i, Event::Gone));
    });
    Node { child, stdin }
}

fn send(node: &mut Node, line: &str) {
    writeln!(node.stdin, "{line}").unwrap();
    node.stdin.flush().unwrap();
}

/// What the test knows of the fleet: each process's last reported count.
struct Fleet {
    events: Receiver<(usize, Event)>,
    held: [u64; NODES],
    ready: [bool; NODES],
    done: [bool; NODES],
    /// The largest sum seen.
    peak: u64,
}

impl Fleet {
    /// Takes events until `until` holds (true) or `timeout` passed (false), checking the
    /// bound at every change.
    fn pump(&mut self, timeout: Duration, until: impl Fn(&Fleet) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !until(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((i, ev)) = self.events.recv_timeout(left) else {
                return false;
            };
            match ev {
                Event::Ready => self.ready[i] = true,
                Event::Done => self.done[i] = true,
                // A dead process holds nothing.
                Event::Gone => self.held[i] = 0,
                Event::Held(n) => self.held[i] = n,
            }
            let sum: u64 = self.held.iter().sum();
            self.peak = self.peak.max(sum);
            assert!(sum <= LIMIT, "the fleet holds {sum} slots: {:?}", self.held);
        }
        true
    }
}

/// Σ of the grant fields in Redis (whole slots), checked against the limit.
fn granted(server: &RedisServer) -> u64 {
    let keys = server.command(&["KEYS", "slots:{openai:*~concurrent}:*"]);
    let key = keys
        .trim_matches(['[', ']'])
        .split(", ")
        .find(|k| {
            k.rsplit(':')
                .next()
                .is_some_and(|s| s.parse::<i64>().is_ok())
        })
        .unwrap_or_else(|| panic!("no window key: {keys}"));
    let g = server.command(&["HGET", key, "~granted"]);
    let g: u64 = g.parse().unwrap_or(0);
    assert!(g <= LIMIT, "Σ grants {g}");
    g
}

/// The data dirs (they outlive the processes), the nodes, what the test knows of them, and
/// the sender their readers report on (for a restarted node).
type Started = (
    Vec<tempfile::TempDir>,
    Vec<Node>,
    Fleet,
    Sender<(usize, Event)>,
);

/// `n` node processes on data dirs of their own (returned: they outlive the processes),
/// started and ready, and the sender their readers report on (for a restarted one).
fn start(n: usize, server: &RedisServer) -> Started {
    let dirs: Vec<_> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
    let (tx, rx) = channel();
    let nodes: Vec<Node> = (0..n)
        .map(|i| spawn(i, dirs[i].path(), &server.url(), &tx))
        .collect();
    let mut fleet = Fleet {
        events: rx,
        held: [0; NODES],
        ready: [false; NODES],
        done: [false; NODES],
        peak: 0,
    };
    let long = Duration::from_secs(30);
    assert!(fleet.pump(long, |f| f.ready[..n].iter().all(|&r| r)));
    (dirs, nodes, fleet, tx)
}

#[test]
fn a_strict_concurrent_limit_holds_across_four_processes_and_sigkills() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    let (dirs, mut nodes, mut fleet, tx) = start(NODES, &server);
    let long = Duration::from_secs(30);

    // Churn: 12 threads over 4 nodes want slots, 10 exist.
    for n in &mut nodes {
        send(n, "churn 3000");
    }
    assert!(fleet.pump(long, |f| f.done.iter().all(|&d| d)));
    eprintln!("churn: at most {} slots held at once", fleet.peak);
    assert!(fleet.peak >= LIMIT / 2, "grants reached the nodes");
    granted(&server);

    // Node a takes every slot (the others, idle, give theirs back), then is SIGKILLed while b
    // waits for slots: b gets them once a's lease ran out.
    send(&mut nodes[0], "hold 10");
    assert!(fleet.pump(long, |f| f.held[0] == LIMIT), "{:?}", fleet.held);
    send(&mut nodes[1], "hold 10");
    sigkill(&mut nodes[0].child);
    let killed = Instant::now();
    fleet.held[0] = 0;
    assert!(fleet.pump(long, |f| f.held[1] == LIMIT), "{:?}", fleet.held);
    let recovery = killed.elapsed();
    eprintln!("a SIGKILLed holder's 10 slots taken by another node after {recovery:?}");
    // The target: 3 sync intervals plus the timeouts (the lease), one round and the wait of
    // the refused reservation, and some slack for two shared cores.
    let bound = LEASE + INTERVAL + GRANT_WAIT + Duration::from_secs(1);
    assert!(recovery <= bound, "{recovery:?} > {bound:?}");
    // The lease runs from a's last call, up to a (jittered) sync interval before the kill.
    assert!(
        recovery + INTERVAL * 2 >= LEASE,
        "{recovery:?}: reclaimed before the lease"
    );

    // a restarts on its data dir: no grant of its own comes back, so it gets nothing while b
    // holds all; once b frees them, a gets them.
    nodes[0] = spawn(0, dirs[0].path(), &server.url(), &tx);
    assert!(fleet.pump(long, |f| f.ready[0] && f.held[0] == 0));
    send(&mut nodes[0], "hold 10");
    assert!(
        !fleet.pump(LEASE * 2, |f| f.held[0] > 0),
        "the restarted node took a slot b holds"
    );
    assert_eq!(granted(&server), LIMIT);
    send(&mut nodes[1], "free");
    assert!(fleet.pump(long, |f| f.held[0] == LIMIT), "{:?}", fleet.held);
    granted(&server);

    // Everyone churns again and b is SIGKILLed while it holds slots: the bound holds, and once
    // the others stop, c alone gets all 10 back (b's by the lease, the others' as they idle).
    send(&mut nodes[0], "free");
    fleet.done = [false; NODES];
    for n in &mut nodes {
        send(n, "churn 2000");
    }
    assert!(fleet.pump(long, |f| f.held[1] > 0), "{:?}", fleet.held);
    sigkill(&mut nodes[1].child);
    fleet.held[1] = 0;
    assert!(fleet.pump(long, |f| [0, 2, 3].iter().all(|&i| f.done[i])));
    let started = Instant::now();
    send(&mut nodes[2], "hold 10");
    assert!(fleet.pump(long, |f| f.held[2] == LIMIT), "{:?}", fleet.held);
    eprintln!(
        "after a SIGKILL mid-churn, one node holds all 10 slots {:?} after the churn",
        started.elapsed()
    );
    granted(&server);
    for n in &mut nodes {
        sigkill(&mut n.child);
    }
}

/// Redis away (paused with its data, then killed and restarted empty) while two nodes hold
/// every slot and a third waits for one: the waiting node never takes the holders' slots (the
/// first node back does not take the others for dead: the lease restarts after a silence of
/// the whole fleet, and holders in backoff call again within a third of it); once the holders
/// free their slots, it gets all of them.
#[test]
fn a_strict_concurrent_limit_holds_through_redis_outages() {
    let Some(mut server) = RedisServer::start() else {
        return;
    };
    let (_dirs, mut nodes, mut fleet, _tx) = start(3, &server);
    let long = Duration::from_secs(30);
    send(&mut nodes[0], "hold 5");
    assert!(fleet.pump(long, |f| f.held[0] == 5));
    send(&mut nodes[1], "hold 5");
    assert!(fleet.pump(long, |f| f.held[1] == 5));
    send(&mut nodes[2], "hold 10");

    // Paused 3 s (2.5 leases) with its data: every `~seen` is old when it answers again.
    server.command(&["CLIENT", "PAUSE", "3000", "ALL"]);
    std::thread::sleep(Duration::from_millis(3000)); // the outage itself
    assert!(
        !fleet.pump(LEASE * 3, |f| f.held[2] > 0),
        "c took a live holder's slot after the pause: {:?}",
        fleet.held
    );
    assert_eq!(granted(&server), LIMIT);

    // Killed for 1.5 s and restarted empty: the holders re-register their grants.
    server.kill();
    std::thread::sleep(Duration::from_millis(1500)); // the outage itself
    server.restart();
    assert!(
        !fleet.pump(LEASE * 3, |f| f.held[2] > 0),
        "c took a live holder's slot after the loss: {:?}",
        fleet.held
    );
    assert_eq!(granted(&server), LIMIT);

    send(&mut nodes[0], "free");
    send(&mut nodes[1], "free");
    assert!(fleet.pump(long, |f| f.held[2] == LIMIT), "{:?}", fleet.held);
    granted(&server);
    for n in &mut nodes {
        sigkill(&mut n.child);
    }
}
