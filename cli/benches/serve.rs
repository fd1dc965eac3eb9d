//! Load benchmark of the HTTP sidecar: `POST /v1/filter` (10 deployments) and `POST /v1/spend`
//! against a real `provider-budgets serve` process (release build) on loopback.
//!
//! ```text
//! cargo bench -p provider-budgets-cli --bench serve              # 3 s per scenario
//! cargo bench -p provider-budgets-cli --bench serve -- --quick   # 1 s per scenario (what .ci/run runs)
//! ```
//!
//! The client is a minimal HTTP/1.1 keep-alive client over `std::net::TcpStream` (Nagle off),
//! one thread per connection, each sending its next request as soon as the previous answer is
//! read (closed loop), so the figures are the server's plus one loopback round trip, with as
//! little client overhead as possible. Every request is timed with `Instant`; p50/p99 are over
//! all requests of the scenario, req/s is the total over the wall time. Every answer's status
//! is checked (a bench that measured errors would be worthless). Client and server share the
//! machine's cores: the throughput rows are what 2 cores give to both.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const CONFIG: &str = "provider_budget_config:
  openai: {budget_limit: 1000000000, time_period: 1d}
  azure: {budget_limit: 1000000000, time_period: 1d}
  anthropic: {budget_limit: 1000000000, time_period: 1d}
  gemini: {budget_limit: 1000000000, time_period: 1d}
  mistral: {budget_limit: 1000000000, time_period: 1d}
";

/// The main job's deployment list (`examples/edge_router.rs`): 10 deployments over 6 providers (groq has no budget).
const DEPLOYMENTS: &str = r#"{"deployments":[{"model":"gpt-4o","id":"d1"},{"model":"gpt-4o-mini","id":"d2"},{"model":"azure/gpt-4o","id":"d3"},{"model":"azure/gpt-4o-mini","id":"d4"},{"model":"claude-3-5-sonnet","id":"d5"},{"model":"claude-3-haiku","id":"d6"},{"model":"gemini/gemini-1.5-pro","id":"d7"},{"model":"mistral/mistral-large","id":"d8"},{"model":"groq/llama-3-70b","id":"d9"},{"model":"gpt-4.1","id":"d10"}]}"#;

struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start() -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, CONFIG).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_provider-budgets"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn provider-budgets serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("ready line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("ready line {line:?}"))
        .to_owned();
    Server {
        child,
        addr,
        _dir: dir,
    }
}

/// One keep-alive connection.
struct Conn {
    stream: BufReader<TcpStream>,
    request: Vec<u8>,
    body: Vec<u8>,
}

impl Conn {
    fn new(addr: &str, path: &str, body: &str) -> Conn {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        Conn {
            stream: BufReader::new(stream),
            request,
            body: Vec::new(),
        }
    }

    /// Sends the request and reads the whole answer; its status.
    fn call(&mut self) -> u16 {
        self.stream
            .get_mut()
            .write_all(&self.request)
            .expect("write");
        let mut line = String::new();
        self.stream.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {line:?}"));
        let mut length = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).expect("header");
            let h = line.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().expect("content-length");
                }
            }
        }
        self.body.resize(length, 0);
        self.stream.read_exact(&mut self.body).expect("body");
        status
    }
}

struct Result {
    name: String,
    requests: usize,
    per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn run(addr: &str, name: &str, path: &str, body: &str, conns: usize, secs: f64) -> Result {
    let stop = Arc::new(AtomicBool::new(false));
    // Warm-up: the first requests open windows and fill the resolver cache.
    let mut warm = Conn::new(addr, path, body);
    for _ in 0..200 {
        assert_eq!(warm.call(), 200);
    }
    let started = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (addr, path, body, stop) = (
                addr.to_owned(),
                path.to_owned(),
                body.to_owned(),
                Arc::clone(&stop),
            );
            thread::spawn(move || {
                let mut c = Conn::new(&addr, &path, &body);
                let mut lat = Vec::with_capacity(1 << 20);
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let status = c.call();
                    lat.push(t.elapsed().as_nanos() as u64);
                    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&c.body));
                }
                lat
            })
        })
        .collect();
    thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<u64> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    let wall = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    Result {
        name: format!("{name}, {conns} conn"),
        requests: all.len(),
        per_s: all.len() as f64 / wall,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; a name filter is not supported (one run is short).
    let secs = if quick { 1.0 } else { 3.0 };
    let server = start();
    let addr = server.addr.clone();
    let spend = r#"{"provider":"openai","cost":0.000123}"#;
    let durable = r#"{"provider":"anthropic","cost":"0.000123","durable":true}"#;
    let filter = (
        "POST /v1/filter (10 deployments)",
        "/v1/filter",
        DEPLOYMENTS,
    );
    let buffered = ("POST /v1/spend", "/v1/spend", spend);
    let synced = ("POST /v1/spend durable", "/v1/spend", durable);
    let scenarios = [
        (filter, 1),
        (filter, 2),
        (filter, 4),
        (buffered, 1),
        (buffered, 4),
        (synced, 4),
    ];
    let results: Vec<Result> = scenarios
        .iter()
        .map(|&((name, path, body), conns)| run(&addr, name, path, body, conns, secs))
        .collect();
    println!(
        "\n{:<44} {:>10} {:>12} {:>10} {:>10}",
        "scenario", "requests", "req/s", "p50 µs", "p99 µs"
    );
    for r in &results {
        println!(
            "{:<44} {:>10} {:>12.0} {:>10.1} {:>10.1}",
            r.name, r.requests, r.per_s, r.p50_us, r.p99_us
        );
    }
    let json: Vec<String> = results
        .iter()
        .map(|r| {
            format!(
                "{{\"scenario\":{:?},\"req_per_s\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1}}}",
                r.name, r.per_s, r.p50_us, r.p99_us
            )
        })
        .collect();
    println!("[{}]", json.join(","));
}
