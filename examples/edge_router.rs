//! The README's main job: a simulated LLM router under load, enforcing provider, deployment,
//! model and tag budgets.
//!
//! ```text
//! cargo run --release --example edge_router [-- --data-dir DIR] [-- --threads N]
//! ```
//!
//! Ten deployments over six providers; five providers have a daily budget, `groq` has none
//! (its deployment always passes, as a deployment without a budget must). On top: the
//! `gpt4o-east` deployment has its own daily budget, the model `gpt-4o` (on openai and azure)
//! one, and each request carries a tag, `team-a` (3 in 4) or `team-b`, each with a daily tag
//! budget (`team-b`'s runs out first: its requests are then denied whatever the deployment).
//! Worker threads loop: filter the deployment list for the request's tag (the hot path: a
//! list resolved once with [`Limiter::prepare`], filtered with
//! [`Prepared::filter_tagged_into`] into a reused vector), pick a survivor with a
//! deterministic PRNG, "call" it and charge its cost to every budget that applies (buffered
//! [`Limiter::charge`]). The simulation compresses a day of traffic into a second or two: it
//! stops when every budgeted provider is exhausted (only `groq` is left), or after 10 s /
//! 50 M requests. It prints the spend per budget, grouped by scope.
//!
//! Then it drops the limiter (which makes everything durable), reopens the same data dir, and
//! checks that every total survived exactly — exiting non-zero if not.
//!
//! The last stdout line is one JSON object with the figures measured in this run:
//! `{"filter_p50_ns":…, "filter_p99_ns":…, "deployments":…, "records_per_s":…, "reopen_ms":…}`.
//! Filter latencies are measured around each `filter_into` call with two `Instant::now()`
//! reads, so they include about one clock read (~20-30 ns) of overhead.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use provider_budgets::{BudgetConfig, Config, Limiter, Money, Period, Prepared, Scope, Target};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};

/// A deployment of the simulated router: id, model name, provider, cost of one call in USD.
struct Model {
    id: &'static str,
    name: &'static str,
    provider: &'static str,
    cost: &'static str,
}

/// Per-call costs are plausible for a ~2k-token request (input + output) in late 2024.
const MODELS: &[Model] = &[
    Model {
        id: "gpt4o-east",
        name: "gpt-4o",
        provider: "openai",
        cost: "0.0125",
    },
    Model {
        id: "gpt4o-mini-east",
        name: "gpt-4o-mini",
        provider: "openai",
        cost: "0.003",
    },
    Model {
        id: "azure-gpt4o",
        name: "azure/gpt-4o",
        provider: "azure",
        cost: "0.0125",
    },
    Model {
        id: "azure-gpt35",
        name: "azure/gpt-35-turbo",
        provider: "azure",
        cost: "0.002",
    },
    Model {
        id: "sonnet",
        name: "claude-3-5-sonnet",
        provider: "anthropic",
        cost: "0.018",
    },
    Model {
        id: "haiku",
        name: "claude-3-haiku",
        provider: "anthropic",
        cost: "0.0015",
    },
    Model {
        id: "gemini-pro",
        name: "gemini-1.5-pro",
        provider: "gemini",
        cost: "0.00875",
    },
    Model {
        id: "gemini-flash",
        name: "gemini-1.5-flash",
        provider: "gemini",
        cost: "0.0006",
    },
    Model {
        id: "mistral-large",
        name: "mistral-large-latest",
        provider: "mistral",
        cost: "0.012",
    },
    Model {
        id: "groq-llama",
        name: "groq/llama-3-70b",
        provider: "groq",
        cost: "0.0008",
    },
];

/// Daily budgets (USD) of a busy fleet. A day of its traffic is compressed into a second or two
/// of simulation.
const BUDGETS: &[(&str, &str)] = &[
    ("anthropic", "15000"),
    ("azure", "6000"),
    ("gemini", "3000"),
    ("mistral", "7000"),
    ("openai", "6000"),
];

/// Daily budgets of the other scopes: (scope, name, USD).
const SCOPED: &[(Scope, &str, &str)] = &[
    (Scope::Deployment, "gpt4o-east", "2500"),
    (Scope::Model, "gpt-4o", "9000"),
    (Scope::Tag, "team-a", "100000"),
    (Scope::Tag, "team-b", "6000"),
];

/// Request tags: `team-a` for 3 requests in 4, `team-b` for the others.
const TAGS: [&str; 2] = ["team-a", "team-b"];

/// Bounds of the load phase when budgets do not run out (they should well before).
const MAX_LOAD: Duration = Duration::from_secs(10);
const MAX_REQUESTS_PER_THREAD: u64 = 12_500_000;
/// Filter latencies kept per thread (4 bytes each); later calls are not sampled.
const MAX_SAMPLES_PER_THREAD: usize = 4_000_000;
/// Requests between updates of the shared request counter.
const COUNT_EVERY: u64 = 256;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge_router: error: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    data_dir: Option<PathBuf>,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        data_dir: None,
        threads: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--data-dir" => {
                args.data_dir = Some(it.next().ok_or("--data-dir needs a directory")?.into());
            }
            "--threads" => {
                let n = it.next().ok_or("--threads needs a number")?;
                args.threads = n
                    .parse()
                    .ok()
                    .filter(|&n: &usize| (1..=256).contains(&n))
                    .ok_or_else(|| format!("--threads {n}: expected 1..=256"))?;
            }
            "-h" | "--help" => {
                println!("usage: edge_router [--data-dir DIR] [--threads N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (try --help)")),
        }
    }
    Ok(args)
}

/// What one worker thread saw.
#[derive(Default)]
struct WorkerReport {
    latencies_ns: Vec<u32>,
    requests: u64,
    records: u64,
    /// Requests denied outright (a spent tag budget).
    denied: u64,
    /// Charged spend per status row (exact: integer nanos).
    spent: Vec<Money>,
    /// Calls per deployment index.
    calls: Vec<u64>,
    /// Times each deployment was filtered out.
    dropped: Vec<u64>,
}

/// Shared between the workers.
struct Shared {
    stop: AtomicBool,
    requests: AtomicU64,
}

/// What the workers need to know about the budgets.
struct Plan {
    costs: Vec<Money>,
    targets: Vec<Target>,
    /// Status rows charged per (deployment, tag).
    rows: Vec<[Vec<usize>; 2]>,
    /// Deployments without any budget of their own (tags aside).
    unbudgeted: usize,
    rows_len: usize,
}

/// xorshift64*: deterministic, fast, good enough to pick a deployment.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let tmp;
    let dir = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| format!("cannot create a temp dir: {e}"))?;
            tmp.path().to_owned()
        }
    };

    let day: Period = "1d".parse()?;
    let mut config = Config::new().data_dir(&dir);
    for (provider, limit) in BUDGETS {
        let limit: Money = limit
            .parse()
            .map_err(|e| format!("budget of {provider}: {e}"))?;
        config = config.budget(*provider, limit, day);
    }
    for (scope, name, limit) in SCOPED {
        let limit: Money = limit
            .parse()
            .map_err(|e| format!("budget of {name}: {e}"))?;
        config = config.with_budget(BudgetConfig::new(*scope, *name, limit, day));
    }
    let costs: Vec<Money> = MODELS
        .iter()
        .map(|m| {
            m.cost
                .parse::<Money>()
                .map_err(|e| format!("cost of {}: {e}", m.name))
        })
        .collect::<Result<_, _>>()?;
    let targets: Vec<Target> = MODELS
        .iter()
        .map(|m| {
            let mut t = Target::with_id(m.id, m.name);
            t.provider = Some(m.provider.to_owned()); // as litellm knows it
            t
        })
        .collect();

    println!(
        "edge_router: {} deployments, {} budgets ({} provider, {} deployment/model/tag), {} worker threads",
        targets.len(),
        BUDGETS.len() + SCOPED.len(),
        BUDGETS.len(),
        SCOPED.len(),
        args.threads
    );
    println!("data dir: {}", dir.display());

    let limiter =
        Limiter::open(config.clone()).map_err(|e| format!("cannot open the limiter: {e}"))?;
    let rows_before = limiter.status(StatusQuery::all());
    let spend_before: Vec<Money> = rows_before.iter().map(|s| s.spend).collect();
    if spend_before.iter().any(|&s| s > Money::ZERO) {
        println!("(the data dir already holds spend for today: it counts against the budgets)");
    }
    // The rows each charge lands on, from the limiter's own resolution.
    let row_of = |s: &provider_budgets::BudgetStatus| {
        rows_before
            .iter()
            .position(|r| r.scope == s.scope && r.name == s.name && r.period == s.period)
            .unwrap_or(usize::MAX)
    };
    let now = limiter.now();
    let rows: Vec<[Vec<usize>; 2]> = targets
        .iter()
        .map(|t| {
            TAGS.map(|tag| {
                limiter
                    .status(StatusQuery::deployment(t).tags(&[tag]).at(now))
                    .iter()
                    .map(row_of)
                    .collect()
            })
        })
        .collect();
    let unbudgeted = targets
        .iter()
        .filter(|t| {
            limiter
                .status(StatusQuery::deployment(*t).at(now))
                .is_empty()
        })
        .count();
    let plan = Plan {
        costs,
        targets,
        rows,
        unbudgeted,
        rows_len: rows_before.len(),
    };
    let prepared = limiter.prepare(&plan.targets);

    // ---- load phase ------------------------------------------------------------------------
    let shared = Shared {
        stop: AtomicBool::new(false),
        requests: AtomicU64::new(0),
    };
    let start = Instant::now();
    let reports: Vec<WorkerReport> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|t| {
                let (limiter, prepared, shared, plan) = (&limiter, &prepared, &shared, &plan);
                s.spawn(move || worker(t, limiter, prepared, shared, plan, start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| "a worker thread panicked".to_string())?
            })
            .collect::<Result<Vec<_>, String>>()
    })?;
    let load = start.elapsed();

    // ---- what happened ---------------------------------------------------------------------
    let requests: u64 = reports.iter().map(|r| r.requests).sum();
    let records: u64 = reports.iter().map(|r| r.records).sum();
    let mut latencies: Vec<u32> = reports
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies.is_empty() {
            return 0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i]
    };
    let (p50, p99, p999) = (pct(0.50), pct(0.99), pct(0.999));
    let records_per_s = records as f64 / load.as_secs_f64();
    let denied: u64 = reports.iter().map(|r| r.denied).sum();
    let status = limiter.status(StatusQuery::all());
    let providers_exhausted = status
        .iter()
        .filter(|s| s.scope == Scope::Provider)
        .all(|s| s.exhausted);
    let names: Vec<&str> = MODELS.iter().map(|m| m.name).collect();

    println!();
    println!(
        "load phase: {requests} requests, {records} charges in {:.1} ms ({:.0} charges/s, {:.0} requests/s); stopped because {}",
        load.as_secs_f64() * 1e3,
        records_per_s,
        requests as f64 / load.as_secs_f64(),
        if providers_exhausted { "every budgeted provider is exhausted" } else { "the time/request bound was reached" },
    );
    println!(
        "filter (prepared, {} deployments with deployment/model budgets, 1 request tag): p50 {p50} ns, p99 {p99} ns, p99.9 {p999} ns over {} calls",
        names.len(),
        latencies.len()
    );
    println!("requests denied outright by a spent tag budget: {denied}");

    println!();
    println!("spend per scope:");
    println!(
        "{:<11} {:<12} {:>12} {:>10} {:>9}  state",
        "scope", "name", "spend $", "limit $", "over %"
    );
    for scope in Scope::ALL {
        for s in status.iter().filter(|s| s.scope == scope) {
            let over = (s.spend.as_usd() / s.limit.as_usd() - 1.0) * 100.0;
            println!(
                "{:<11} {:<12} {:>12} {:>10} {:>8.3}%  {}",
                s.scope.to_string(),
                s.name,
                s.spend.to_string(),
                s.limit.to_string(),
                over.max(0.0),
                if s.exhausted { "exhausted" } else { "has room" }
            );
        }
    }
    println!(
        "{:<11} {:<12} {:>12} {:>10}",
        "provider", "groq", "(no budget)", "-"
    );
    println!("(spend past the limit is the in-flight overshoot of {} concurrent workers: a call admitted by filter is still charged)", args.threads);

    println!();
    println!(
        "{:<22} {:>10} {:>14}",
        "deployment", "calls", "filtered out"
    );
    let mut filtered_total = 0u64;
    for (i, name) in names.iter().enumerate() {
        let calls: u64 = reports.iter().map(|r| r.calls[i]).sum();
        let dropped: u64 = reports.iter().map(|r| r.dropped[i]).sum();
        filtered_total += dropped;
        println!("{name:<22} {calls:>10} {dropped:>14}");
    }
    println!("deployments filtered out in total: {filtered_total} (over {requests} filter calls)");

    // Exactness: what the workers charged, summed as integers per budget, is what the
    // limiter counted.
    for (i, s) in status.iter().enumerate() {
        let recorded = reports
            .iter()
            .fold(Money::ZERO, |a, r| a.saturating_add(r.spent[i]));
        let counted = s.spend.saturating_sub(spend_before[i]);
        if recorded != counted {
            return Err(format!(
                "{} {}: workers charged {recorded} but the limiter counted {counted}",
                s.scope, s.name
            )
            .into());
        }
    }

    // With only budgeted deployments, an exhausted fleet gives the reference's error.
    let budgeted: Vec<&Target> = plan
        .targets
        .iter()
        .filter(|t| {
            !limiter
                .status(StatusQuery::deployment(*t).at(now))
                .is_empty()
        })
        .collect();
    match limiter.filter(&budgeted, NO_TAGS) {
        Err(e) => println!("filter without groq: {e}"),
        Ok(left) => println!(
            "filter without groq: {} deployments still allowed",
            left.len()
        ),
    }

    // ---- durability: drop, reopen, compare -------------------------------------------------
    let at = limiter.now();
    let before = limiter.status(StatusQuery::all().at(at));
    drop(limiter); // flushes what is queued and releases the data dir (`prepared` holds no limiter)
    drop(prepared);
    let t = Instant::now();
    let reopened = Limiter::open(config).map_err(|e| format!("cannot reopen the limiter: {e}"))?;
    let reopen = t.elapsed();
    let after = reopened.status(StatusQuery::all().at(at));
    println!();
    println!(
        "reopened {} in {:.2} ms; totals after the restart:",
        dir.display(),
        reopen.as_secs_f64() * 1e3
    );
    let mut mismatch = false;
    for (b, a) in before.iter().zip(&after) {
        let ok = b.spend == a.spend && b.own_spend == a.own_spend && b.window == a.window;
        mismatch |= !ok;
        println!(
            "  {:<11} {:<12} spend {:>12} (before restart {:>12}) {}",
            a.scope.to_string(),
            a.name,
            a.spend.to_string(),
            b.spend.to_string(),
            if ok { "ok" } else { "MISMATCH" }
        );
    }
    if mismatch || before.len() != after.len() {
        return Err("totals differ after reopening the data dir".into());
    }
    drop(reopened);

    println!(
        "{{\"filter_p50_ns\":{p50},\"filter_p99_ns\":{p99},\"deployments\":{},\"records_per_s\":{:.0},\"reopen_ms\":{:.3}}}",
        names.len(),
        records_per_s,
        reopen.as_secs_f64() * 1e3
    );
    Ok(())
}

fn worker(
    t: usize,
    limiter: &Limiter,
    prepared: &Prepared,
    shared: &Shared,
    plan: &Plan,
    start: Instant,
) -> Result<WorkerReport, String> {
    let n = plan.targets.len();
    let mut r = WorkerReport {
        latencies_ns: Vec::with_capacity(MAX_SAMPLES_PER_THREAD.min(1 << 20)),
        spent: vec![Money::ZERO; plan.rows_len],
        calls: vec![0; n],
        dropped: vec![0; n],
        ..WorkerReport::default()
    };
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) << 32));
    let mut out = Vec::with_capacity(n);
    let mut seen = vec![false; n];
    let mut pending = 0u64;
    while r.requests < MAX_REQUESTS_PER_THREAD {
        let k = usize::from(rng.next().is_multiple_of(4)); // team-b for 1 request in 4
        let tags = [TAGS[k]];
        let t0 = Instant::now();
        let result = prepared.filter_into(&tags, &mut out);
        let t1 = Instant::now();
        if r.latencies_ns.len() < MAX_SAMPLES_PER_THREAD {
            r.latencies_ns
                .push(u32::try_from((t1 - t0).as_nanos()).unwrap_or(u32::MAX));
        }
        r.requests += 1;
        pending += 1;
        if pending == COUNT_EVERY {
            shared.requests.fetch_add(pending, Ordering::Relaxed);
            pending = 0;
            if shared.stop.load(Ordering::Relaxed) || t1 - start > MAX_LOAD {
                break;
            }
        }
        if result.is_err() {
            // Only a spent tag budget leaves nothing here (groq has no budget of its own).
            r.denied += 1;
            continue;
        }
        if out.len() < n {
            seen.iter_mut().for_each(|s| *s = false);
            for &i in &out {
                seen[i] = true;
            }
            for (i, &s) in seen.iter().enumerate() {
                if !s {
                    r.dropped[i] += 1;
                }
            }
            if out.len() <= plan.unbudgeted {
                // Only deployments without a budget are left: the simulation is over.
                shared.stop.store(true, Ordering::Relaxed);
                break;
            }
        }
        let pick = out[(rng.next() % out.len() as u64) as usize];
        r.calls[pick] += 1;
        // "Call" the deployment here; then charge its cost to every budget that applies.
        let cost = plan.costs[pick];
        let charged = limiter
            .charge(Spend::deployment(&plan.targets[pick], cost).tags(&tags))
            .map(|r| r.budgets())
            .map_err(|e| format!("charge {}: {e}", plan.targets[pick].model))?;
        let rows = &plan.rows[pick][k];
        if charged != rows.len() {
            return Err(format!(
                "charge {}: {charged} budgets charged, {} expected",
                plan.targets[pick].model,
                rows.len()
            ));
        }
        for &row in rows {
            r.spent[row] = r.spent[row].saturating_add(cost);
        }
        r.records += 1;
    }
    shared.requests.fetch_add(pending, Ordering::Relaxed);
    Ok(r)
}
