//! Shared by every scenario: fixtures, a thread pool for throughput runs, and the percentile
//! pass (criterion reports means/medians of batches, `docs/performance.md` also gives per-call p99).
//!
//! The percentile pass of a scenario runs once, the first time criterion calls that
//! benchmark's closure (so criterion's name filter also selects it), times individual calls
//! with `Instant` (the median cost of an empty timed region is subtracted), and adds a line to
//! the table printed at the end by [`print_summary`].

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::Criterion;
use provider_budgets::{Config, Limiter, Money, Period};

/// Criterion settings for this suite (command-line flags such as `--quick` still apply).
pub fn criterion() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(800))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        // Fewer bootstrap resamples than the default 100 000: the analysis was a large part of
        // a `--quick` run on 2 cores, and the confidence intervals barely change.
        .nresamples(20_000)
}

/// Budgeted providers of the fixtures; deployments of `groq` have no budget.
pub const PROVIDERS: &[&str] = &["anthropic", "azure", "gemini", "mistral", "openai"];

/// A config with a budget of `limit` USD per `period` for every provider of [`PROVIDERS`].
pub fn config(dir: &Path, limit: &str, period: &str) -> Config {
    let limit: Money = limit.parse().expect("limit");
    let period: Period = period.parse().expect("period");
    PROVIDERS.iter().fold(Config::new().data_dir(dir), |c, p| {
        c.budget(*p, limit, period)
    })
}

/// A temp dir on the same disk as the build (fsync costs of a real file system).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("provider-budgets-bench-")
        .tempdir()
        .expect("create a temp dir")
}

/// Runs `f` the first time only (the percentile pass of a benchmark closure).
pub fn once(done: &mut bool, f: impl FnOnce()) {
    if !*done {
        *done = true;
        f();
    }
}

// ---- percentiles -------------------------------------------------------------------------------

struct Line {
    name: String,
    samples: usize,
    p50: u64,
    p99: u64,
    extra: String,
}

static LINES: Mutex<Vec<Line>> = Mutex::new(Vec::new());

/// Median cost of an empty `Instant::now()`-timed region, in ns.
pub fn timer_overhead() -> u64 {
    static OVERHEAD: OnceLock<u64> = OnceLock::new();
    *OVERHEAD.get_or_init(|| {
        let mut v: Vec<u64> = (0..20_000)
            .map(|_| {
                let t = Instant::now();
                std::hint::black_box(());
                t.elapsed().as_nanos() as u64
            })
            .collect();
        v.sort_unstable();
        v[v.len() / 2]
    })
}

/// Times `calls` single calls of `f` (after a short warm-up) and adds their p50/p99 and the
/// pass's rate (timer overhead included).
pub fn latency<R>(name: &str, calls: usize, mut f: impl FnMut() -> R) {
    for _ in 0..calls.min(10_000) / 10 {
        std::hint::black_box(f());
    }
    let mut samples = Vec::with_capacity(calls);
    let start = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        std::hint::black_box(f());
        samples.push(t.elapsed().as_nanos() as u64);
    }
    let rate = fmt_rate(calls as u64, start.elapsed());
    add(name, samples, rate);
}

/// Adds a line from per-call durations in ns (`extra`: e.g. the pass's throughput).
pub fn add(name: &str, mut samples: Vec<u64>, extra: String) {
    let overhead = timer_overhead();
    samples.sort_unstable();
    let pct = |p: f64| -> u64 {
        if samples.is_empty() {
            return 0;
        }
        let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].saturating_sub(overhead)
    };
    let line = Line {
        name: name.to_owned(),
        samples: samples.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        extra,
    };
    eprintln!(
        "percentiles {}: p50 {} p99 {} ({} calls) {}",
        line.name,
        fmt_ns(line.p50),
        fmt_ns(line.p99),
        line.samples,
        line.extra
    );
    LINES.lock().unwrap_or_else(|p| p.into_inner()).push(line);
}

/// `1234` → `1.23 µs`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=9_999 => format!("{ns} ns"),
        10_000..=9_999_999 => format!("{:.1} µs", ns as f64 / 1e3),
        _ => format!("{:.2} ms", ns as f64 / 1e6),
    }
}
/// The percentile pass of a blocking scenario: `threads` threads each time `per_caller` calls of
/// `call(limiter, thread index)` at once; adds the line `name` with the overall rate.
pub fn percentiles_threads(
    name: &str,
    limiter: &Limiter,
    threads: usize,
    per_caller: usize,
    call: impl Fn(&Limiter, usize) + Sync,
) {
    let start = Instant::now();
    let call = &call;
    let samples: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let limiter = limiter.clone();
                s.spawn(move || {
                    (0..per_caller)
                        .map(|_| {
                            let start = Instant::now();
                            call(&limiter, t);
                            start.elapsed().as_nanos() as u64
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect()
    });
    let rate = fmt_rate(samples.len() as u64, start.elapsed());
    add(name, samples, rate);
}

/// `records / elapsed` as a short rate.
pub fn fmt_rate(n: u64, elapsed: Duration) -> String {
    let r = n as f64 / elapsed.as_secs_f64();
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.1} k/s", r / 1e3)
    }
}

/// The last criterion "group": prints the per-call percentile table.
pub fn print_summary(_: &mut Criterion) {
    let lines = LINES.lock().unwrap_or_else(|p| p.into_inner());
    if lines.is_empty() {
        return;
    }
    println!();
    println!(
        "per-call percentiles (Instant around each call, {} ns timer overhead subtracted)",
        timer_overhead()
    );
    println!(
        "{:<40} {:>9} {:>10} {:>10}  pass throughput",
        "scenario", "calls", "p50", "p99"
    );
    for l in lines.iter() {
        println!(
            "{:<40} {:>9} {:>10} {:>10}  {}",
            l.name,
            l.samples,
            fmt_ns(l.p50),
            fmt_ns(l.p99),
            l.extra
        );
    }
}

// ---- a pool for multi-threaded throughput --------------------------------------------------

type Job = Arc<dyn Fn(usize, u64) + Send + Sync>;

/// `threads` long-lived workers; [`Pool::run`] splits a number of operations among them and
/// returns the wall time until the last one finished (no thread spawn inside the measurement).
pub struct Pool {
    jobs: Vec<mpsc::Sender<u64>>,
    done: mpsc::Receiver<()>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// `op(thread_index, count)` performs `count` operations on worker `thread_index`.
    pub fn new(threads: usize, op: impl Fn(usize, u64) + Send + Sync + 'static) -> Pool {
        let op: Job = Arc::new(op);
        let (done_tx, done) = mpsc::channel();
        let mut jobs = Vec::new();
        let mut handles = Vec::new();
        for t in 0..threads {
            let (tx, rx) = mpsc::channel::<u64>();
            let (op, done_tx) = (Arc::clone(&op), done_tx.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bench-{t}"))
                    .spawn(move || {
                        while let Ok(n) = rx.recv() {
                            op(t, n);
                            if done_tx.send(()).is_err() {
                                return;
                            }
                        }
                    })
                    .expect("spawn a bench worker"),
            );
            jobs.push(tx);
        }
        Pool {
            jobs,
            done,
            handles,
        }
    }

    /// Runs `total` operations split evenly; returns the elapsed wall time.
    pub fn run(&self, total: u64) -> Duration {
        let n = self.jobs.len() as u64;
        let start = Instant::now();
        for (i, tx) in self.jobs.iter().enumerate() {
            let share = total / n + u64::from((i as u64) < total % n);
            tx.send(share).expect("bench worker alive");
        }
        for _ in 0..n {
            self.done.recv().expect("bench worker alive");
        }
        start.elapsed()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A limiter on a fresh data dir with generous 1d budgets (the dir lives as long as it).
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub limiter: Limiter,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempdir();
        let limiter = Limiter::open(config(dir.path(), "1000000", "1d")).expect("open");
        Fixture { _dir: dir, limiter }
    }
}

/// The cost every record bench records.
pub fn cost() -> Money {
    "0.0125".parse().expect("money")
}
