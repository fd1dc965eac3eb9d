//! `units`: what a unit budget adds to the request path (issue 21's target: ≤ 50 ns p50).
//! The same deployments under the same USD provider budgets (`usd`), and with one more
//! `tokens` budget per provider (`usd+tokens`): the prepared filter
//! (`Prepared::filter_into`) of 1 and 10 deployments, and `charge` of one deployment with
//! its usage (buffered).
//!
//! The configs are YAML and the calls exist before units too, so this file builds unchanged
//! against the code before them (`d20e0b8`: copy it into that tree's `benches/` and declare
//! it in its `main.rs`); there the `usd+tokens` cases are skipped (that config has no `unit`).
//! `docs/performance.md` ("Units on the request path") runs both binaries interleaved.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use provider_budgets::{Config, Limiter, Spend, Usage, NO_TAGS};

use crate::common;
use crate::filter::deployments;

/// A charge's usage: 300 prompt and 120 completion tokens.
const USAGE: Usage = Usage::new(300, 120);

/// The deployment charged (resolves to provider `openai`).
const CHARGED: &str = "gpt-4o";

struct Fixture {
    _dir: tempfile::TempDir,
    limiter: Limiter,
}

/// A USD budget per provider of [`common::PROVIDERS`] ($1 000 000/day) and, with `tokens`,
/// a `tokens` budget per provider (10^12 tokens/minute: never spent here).
fn yaml(tokens: bool) -> String {
    let mut y = String::from("provider_budgets:\n  budgets:\n");
    for p in common::PROVIDERS {
        y.push_str(&format!(
            "    - {{provider: {p}, limit: 1000000, period: 1d}}\n"
        ));
        if tokens {
            y.push_str(&format!(
                "    - {{provider: {p}, unit: tokens, limit: 1000000000000, period: 1m}}\n"
            ));
        }
    }
    y
}

impl Fixture {
    /// `None` when this version's config has no units (the code before them).
    fn new(tokens: bool) -> Option<Fixture> {
        let dir = common::tempdir();
        let config = Config::from_yaml_str(&yaml(tokens))
            .ok()?
            .data_dir(dir.path());
        let limiter = Limiter::open(config).expect("open");
        Some(Fixture { _dir: dir, limiter })
    }
}

fn variant(tokens: bool) -> &'static str {
    if tokens {
        "usd+tokens"
    } else {
        "usd"
    }
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("units");
    for tokens in [false, true] {
        let v = variant(tokens);
        if Fixture::new(tokens).is_none() {
            eprintln!("units/*/{v}: skipped (this version's config has no unit)");
            continue;
        }
        for n in [1usize, 10] {
            let mut fx: Option<Fixture> = None;
            let mut sampled = false;
            g.bench_function(BenchmarkId::new(format!("filter/prepared/{v}"), n), |b| {
                let fx = fx.get_or_insert_with(|| Fixture::new(tokens).expect("config"));
                let names = deployments(n);
                let prepared = fx.limiter.prepare(&names);
                let mut out = Vec::with_capacity(n);
                assert!(prepared.filter_into(NO_TAGS, &mut out).is_ok());
                common::once(&mut sampled, || {
                    common::latency(&format!("units/filter/prepared/{v}/{n}"), 200_000, || {
                        prepared.filter_into(NO_TAGS, black_box(&mut out)).is_ok()
                    })
                });
                b.iter(|| prepared.filter_into(NO_TAGS, black_box(&mut out)).is_ok());
            });
        }

        let mut fx: Option<Fixture> = None;
        let mut sampled = false;
        g.bench_function(BenchmarkId::new(format!("charge/{v}"), 1), |b| {
            let fx = fx.get_or_insert_with(|| Fixture::new(tokens).expect("config"));
            let cost = common::cost();
            let charge = |l: &Limiter| {
                l.charge(Spend::deployment(black_box(CHARGED), black_box(cost)).usage(USAGE))
                    .map(|r| r.budgets())
            };
            assert_eq!(
                charge(&fx.limiter).expect("charge"),
                1 + usize::from(tokens)
            );
            common::once(&mut sampled, || {
                common::latency(&format!("units/charge/{v}"), 200_000, || {
                    charge(&fx.limiter)
                })
            });
            b.iter(|| charge(&fx.limiter));
            fx.limiter.flush().expect("flush");
        });
    }
    g.finish();
}
