//! Budget model v2 on the request path: 10 (and 50, plain only) deployments, each
//! under a provider, a deployment (by id) and a model budget, and a request with 2 tags that
//! have tag budgets; plain `Limiter::filter_tagged` and prepared `Prepared::filter_tagged_into`,
//! p50/p99.
//! And `charge` hitting 4 budgets (provider, deployment, model, tag) per call, buffered.
//! And the prepared filter of a request naming an identity (key, team, org) whose three
//! budgets are checked besides the tags'.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use provider_budgets::Spend;
use provider_budgets::{BudgetConfig, Identity, Limiter, Money, Period, Scope, Target};

use crate::common;

const PROVIDERS: &[&str] = &["openai", "azure", "anthropic", "mistral", "gemini"];
const MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o",
    "claude-3-5-sonnet",
    "mistral-large",
    "gemini-1.5-pro",
];
const TAGS: [&str; 2] = ["team-a", "product:chat"];

struct Fixture {
    _dir: tempfile::TempDir,
    limiter: Limiter,
    deployments: Vec<Target>,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with(10)
    }

    /// `n` deployments (each with its own deployment budget).
    fn with(n: usize) -> Fixture {
        Fixture::with_identities(n, &[])
    }

    /// `n` deployments, plus a budget for each identity scope and name of `identities`.
    fn with_identities(n: usize, identities: &[(Scope, &str)]) -> Fixture {
        let dir = common::tempdir();
        let limit: Money = "1000000".parse().expect("limit");
        let period: Period = "1d".parse().expect("period");
        let mut config = provider_budgets::Config::new().data_dir(dir.path());
        let mut deployments = Vec::new();
        for i in 0..n {
            let p = i % PROVIDERS.len();
            let model = format!("{}/{}", PROVIDERS[p], MODELS[p]);
            let id = format!("dep-{i}");
            config = config.with_budget(BudgetConfig::new(Scope::Deployment, &id, limit, period));
            deployments.push(Target::with_id(id, model));
        }
        for p in PROVIDERS {
            config = config.budget(*p, limit, period);
        }
        for m in MODELS.iter().collect::<std::collections::BTreeSet<_>>() {
            config = config.with_budget(BudgetConfig::new(Scope::Model, *m, limit, period));
        }
        for t in TAGS {
            config = config.with_budget(BudgetConfig::new(Scope::Tag, t, limit, period));
        }
        for (scope, name) in identities {
            config = config.with_budget(BudgetConfig::new(*scope, *name, limit, period));
        }
        let limiter = Limiter::open(config).expect("open");
        Fixture {
            _dir: dir,
            limiter,
            deployments,
        }
    }
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("scoped");
    plain_50(&mut g);
    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("filter/plain", 10), |b| {
        let fx = fx.get_or_insert_with(Fixture::new);
        assert_eq!(
            fx.limiter
                .filter(&fx.deployments, &TAGS)
                .expect("filter")
                .len(),
            10
        );
        common::once(&mut sampled, || {
            common::latency(
                "scoped/filter/plain/10 (3 budgets each + 2 tags)",
                200_000,
                || {
                    fx.limiter
                        .filter(black_box(&fx.deployments), black_box(&TAGS))
                        .map(|v| v.len())
                },
            )
        });
        b.iter(|| {
            fx.limiter
                .filter(black_box(&fx.deployments), black_box(&TAGS))
                .map(|v| v.len())
        });
    });
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("filter/prepared", 10), |b| {
        let fx = fx.get_or_insert_with(Fixture::new);
        let prepared = fx.limiter.prepare(&fx.deployments);
        let mut out = Vec::with_capacity(10);
        prepared.filter_into(&TAGS, &mut out).expect("filter");
        assert_eq!(out.len(), 10);
        common::once(&mut sampled, || {
            common::latency(
                "scoped/filter/prepared/10 (3 budgets each + 2 tags)",
                200_000,
                || {
                    prepared
                        .filter_into(black_box(&TAGS), black_box(&mut out))
                        .is_ok()
                },
            )
        });
        b.iter(|| {
            prepared
                .filter_into(black_box(&TAGS), black_box(&mut out))
                .is_ok()
        });
    });
    prepared_identity(&mut g);
    g.throughput(Throughput::Elements(1));
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("charge/4_budgets", 1), |b| {
        let fx = fx.get_or_insert_with(Fixture::new);
        let d = fx.deployments[0].clone();
        let tag = ["team-a"];
        let cost = common::cost();
        assert_eq!(
            fx.limiter
                .charge(Spend::deployment(&d, cost).tags(&tag))
                .expect("charge")
                .budgets(),
            4
        );
        common::once(&mut sampled, || {
            common::latency("scoped/charge/4_budgets", 200_000, || {
                fx.limiter
                    .charge(Spend::deployment(black_box(&d), black_box(cost)).tags(black_box(&tag)))
                    .map(|r| r.budgets())
            });
            sustained(&fx.limiter, &fx.deployments, 1);
            sustained(&fx.limiter, &fx.deployments, 2);
        });
        b.iter(|| {
            fx.limiter
                .charge(Spend::deployment(black_box(&d), black_box(cost)).tags(black_box(&tag)))
                .map(|r| r.budgets())
        });
        fx.limiter.flush().expect("flush");
    });
    g.finish();
}

/// The identity of `scoped/filter/prepared_identity/10`: a key, its team and its org, each
/// with a budget.
const IDENTITY: [(Scope, &str); 3] = [
    (
        Scope::Key,
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    ),
    (Scope::Team, "research"),
    (Scope::Org, "acme"),
];

/// `scoped/filter/prepared_identity/10`: `scoped/filter/prepared/10` for a request that names
/// a key, a team and an org (three more budgets, checked once per call).
fn prepared_identity(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("filter/prepared_identity", 10), |b| {
        let fx = fx.get_or_insert_with(|| Fixture::with_identities(10, &IDENTITY));
        let id = Identity::new()
            .key(IDENTITY[0].1)
            .team(IDENTITY[1].1)
            .org(IDENTITY[2].1);
        let prepared = fx.limiter.prepare(&fx.deployments);
        let mut out = Vec::with_capacity(10);
        prepared
            .filter_into_for(&TAGS, &id, &mut out)
            .expect("filter");
        assert_eq!(out.len(), 10);
        common::once(&mut sampled, || {
            common::latency(
                "scoped/filter/prepared_identity/10 (3 budgets each + 2 tags + 3 identities)",
                200_000,
                || {
                    prepared
                        .filter_into_for(black_box(&TAGS), black_box(&id), black_box(&mut out))
                        .is_ok()
                },
            )
        });
        b.iter(|| {
            prepared
                .filter_into_for(black_box(&TAGS), black_box(&id), black_box(&mut out))
                .is_ok()
        });
    });
}

/// `scoped/filter/plain/50`: the plain filter over 50 such deployments (61 budgets).
fn plain_50(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("filter/plain", 50), |b| {
        let fx = fx.get_or_insert_with(|| Fixture::with(50));
        let n = fx.limiter.filter(&fx.deployments, &TAGS).map(|v| v.len());
        assert_eq!(n.expect("filter"), 50);
        common::once(&mut sampled, || {
            common::latency(
                "scoped/filter/plain/50 (3 budgets each + 2 tags)",
                200_000,
                || {
                    fx.limiter
                        .filter(black_box(&fx.deployments), black_box(&TAGS))
                        .map(|v| v.len())
                },
            )
        });
        b.iter(|| {
            fx.limiter
                .filter(black_box(&fx.deployments), black_box(&TAGS))
                .map(|v| v.len())
        });
    });
}

/// Charges per second that the limiter sustains: `threads` threads each charge 4 budgets in a
/// tight loop (no timer per call), then `flush` waits until the journal thread has applied
/// every charge, so the rate counts the journal keeping up, not only the calling thread.
/// Thread `t` charges deployment `t` (its own deployment and provider budgets, a shared model
/// budget when two deployments share one, the same tag budget).
fn sustained(limiter: &Limiter, deployments: &[Target], threads: usize) {
    const CHARGES: u64 = 2_000_000;
    let cost = common::cost();
    let tag = ["team-a"];
    let per_thread = CHARGES / threads as u64;
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for d in deployments.iter().take(threads) {
            s.spawn(move || {
                for _ in 0..per_thread {
                    black_box(
                        limiter
                            .charge(
                                Spend::deployment(black_box(d), black_box(cost))
                                    .tags(black_box(&tag)),
                            )
                            .map(|r| r.budgets()),
                    )
                    .expect("charge");
                }
            });
        }
    });
    limiter.flush().expect("flush");
    let elapsed = start.elapsed();
    eprintln!(
        "sustained scoped/charge/4_budgets, {threads} thread(s): {} ({} charges in {:.0} ms, journal drained)",
        common::fmt_rate(per_thread * threads as u64, elapsed),
        per_thread * threads as u64,
        elapsed.as_secs_f64() * 1e3
    );
}
