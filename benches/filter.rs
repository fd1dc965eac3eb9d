//! `filter`: the request path. 2, 10 and 50 deployments over five budgeted providers and one
//! without budget, plain `Limiter::filter(&[&str])` (resolves each model through the cache,
//! allocates the result) and prepared `Prepared::filter_into(&mut Vec<usize>)`. Budgets are not
//! exhausted (the common case), plus one variant where `openai` is exhausted.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use provider_budgets::{Limiter, Money};
use provider_budgets::{Spend, NO_TAGS};

use crate::common;

/// Model name patterns, cycled: five budgeted providers and `groq` without budget.
const PATTERNS: &[&str] = &[
    "gpt-4o",
    "azure/gpt-4o",
    "claude-3-5-sonnet",
    "gemini-1.5-pro",
    "mistral-large",
    "groq/llama-3-70b",
];

/// `n` distinct deployment names (a router's list: the same models in several regions).
pub fn deployments(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let base = PATTERNS[i % PATTERNS.len()];
            if i < PATTERNS.len() {
                base.to_owned()
            } else {
                format!("{base}-r{}", i / PATTERNS.len())
            }
        })
        .collect()
}

struct Fixture {
    _dir: tempfile::TempDir,
    limiter: Limiter,
    names: Vec<String>,
}

impl Fixture {
    fn new(n: usize, openai_exhausted: bool) -> Fixture {
        let dir = common::tempdir();
        let limiter = Limiter::open(common::config(dir.path(), "1000000", "1d")).expect("open");
        if openai_exhausted {
            limiter
                .charge(Spend::provider(
                    "openai",
                    "1000000".parse::<Money>().expect("money"),
                ))
                .expect("record");
        }
        let names = deployments(n);
        Fixture {
            _dir: dir,
            limiter,
            names,
        }
    }
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("filter");
    let cases = [(2, false), (10, false), (50, false), (10, true)];
    for (n, exhausted) in cases {
        let suffix = if exhausted { "/openai_exhausted" } else { "" };

        let mut fx: Option<Fixture> = None;
        let mut sampled = false;
        g.bench_function(BenchmarkId::new(format!("plain{suffix}"), n), |b| {
            let fx = fx.get_or_insert_with(|| Fixture::new(n, exhausted));
            let names: Vec<&str> = fx.names.iter().map(String::as_str).collect();
            assert_eq!(
                fx.limiter.filter(&names, NO_TAGS).expect("filter").len(),
                n - usize::from(exhausted) * n.div_ceil(common::PROVIDERS.len() + 1),
            );
            common::once(&mut sampled, || {
                common::latency(&format!("filter/plain{suffix}/{n}"), 200_000, || {
                    fx.limiter
                        .filter(black_box(&names), NO_TAGS)
                        .map(|v| v.len())
                })
            });
            b.iter(|| {
                fx.limiter
                    .filter(black_box(&names), NO_TAGS)
                    .map(|v| v.len())
            });
        });

        let mut fx: Option<Fixture> = None;
        let mut sampled = false;
        g.bench_function(BenchmarkId::new(format!("prepared{suffix}"), n), |b| {
            let fx = fx.get_or_insert_with(|| Fixture::new(n, exhausted));
            let prepared = fx.limiter.prepare(&fx.names);
            let mut out = Vec::with_capacity(n);
            common::once(&mut sampled, || {
                common::latency(&format!("filter/prepared{suffix}/{n}"), 200_000, || {
                    prepared.filter_into(NO_TAGS, black_box(&mut out)).is_ok()
                })
            });
            b.iter(|| prepared.filter_into(NO_TAGS, black_box(&mut out)).is_ok());
        });
    }
    miss_heavy(&mut g);
    g.finish();
}

/// Distinct models per call of `filter/plain/miss-heavy`.
const MISS_HEAVY: usize = 4000;

/// `filter/plain/miss-heavy`: calls of 4 000 distinct models each, cycling through five such
/// lists (20 000 names, five times the resolution cache's cap): nearly every deployment of a
/// call misses the cache. In 0.1 each miss copied the whole cache (0.4–0.8 s per call).
fn miss_heavy(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    let lists: Vec<Vec<String>> = (0..5)
        .map(|l| {
            (0..MISS_HEAVY)
                .map(|i| format!("{}-m{l}-{i}", PATTERNS[i % PATTERNS.len()]))
                .collect()
        })
        .collect();
    let mut next = 0usize;
    let mut call = move |limiter: &Limiter| {
        next = (next + 1) % lists.len();
        limiter
            .filter(black_box(&lists[next]), NO_TAGS)
            .map(|v| v.len())
    };
    g.sample_size(10);
    g.bench_function(BenchmarkId::new("plain/miss-heavy", MISS_HEAVY), |b| {
        let fx = fx.get_or_insert_with(|| Fixture::new(1, false));
        common::once(&mut sampled, || {
            common::latency(
                &format!("filter/plain/miss-heavy/{MISS_HEAVY}"),
                300,
                || call(&fx.limiter),
            );
        });
        b.iter(|| call(&fx.limiter));
    });
}
