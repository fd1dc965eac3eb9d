//! `units`: what a unit budget adds to the request path (issue 21's target: ≤ 50 ns p50).
//! The same deployments under the same USD provider budgets (`usd`), with one more USD
//! budget per provider (`usd+usd`: what any extra budget costs) and with one more `tokens`
//! budget per provider instead (`usd+tokens`): the prepared filter
//! (`Prepared::filter_into`) of 1 and 10 deployments, and `charge` of one deployment with
//! its usage (buffered); and `charge/priced`: that charge with its usage priced by the
//! catalog instead of a given cost.
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

/// What each provider has besides its USD budget ($1 000 000/day).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Extra {
    /// Nothing.
    None,
    /// A second USD budget ($1 000 000/minute): what any extra budget costs, before units
    /// too.
    Usd,
    /// A `tokens` budget (1.8 × 10^10 tokens/minute, near the largest limit the config
    /// takes: never spent here).
    Tokens,
}

impl Extra {
    fn name(self) -> &'static str {
        match self {
            Extra::None => "usd",
            Extra::Usd => "usd+usd",
            Extra::Tokens => "usd+tokens",
        }
    }

    /// The budgets a charge of a deployment counts in.
    fn budgets(self) -> usize {
        1 + usize::from(self != Extra::None)
    }
}

fn yaml(extra: Extra) -> String {
    let mut y = String::from("provider_budgets:\n  budgets:\n");
    for p in common::PROVIDERS {
        y.push_str(&format!(
            "    - {{provider: {p}, limit: 1000000, period: 1d}}\n"
        ));
        match extra {
            Extra::None => {}
            Extra::Usd => y.push_str(&format!(
                "    - {{provider: {p}, limit: 1000000, period: 1m}}\n"
            )),
            Extra::Tokens => y.push_str(&format!(
                "    - {{provider: {p}, unit: tokens, limit: 18000000000, period: 1m}}\n"
            )),
        }
    }
    y
}

impl Fixture {
    /// An error when this version's config has no units (the code before them).
    fn new(extra: Extra) -> Result<Fixture, String> {
        let dir = common::tempdir();
        let config = Config::from_yaml_str(&yaml(extra))
            .map_err(|e| e.to_string())?
            .data_dir(dir.path());
        let limiter = Limiter::open(config).expect("open");
        Ok(Fixture { _dir: dir, limiter })
    }
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("units");
    for extra in [Extra::None, Extra::Usd, Extra::Tokens] {
        let v = extra.name();
        if let Err(e) = Fixture::new(extra) {
            eprintln!("units/*/{v}: skipped (this version's config has no unit?): {e}");
            continue;
        }
        for n in [1usize, 10] {
            let mut fx: Option<Fixture> = None;
            let mut sampled = false;
            g.bench_function(BenchmarkId::new(format!("filter/prepared/{v}"), n), |b| {
                let fx = fx.get_or_insert_with(|| Fixture::new(extra).expect("config"));
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
            let fx = fx.get_or_insert_with(|| Fixture::new(extra).expect("config"));
            let cost = common::cost();
            let charge = |l: &Limiter| {
                l.charge(Spend::deployment(black_box(CHARGED), black_box(cost)).usage(USAGE))
                    .map(|r| r.budgets())
            };
            assert_eq!(charge(&fx.limiter).expect("charge"), extra.budgets());
            common::once(&mut sampled, || {
                common::latency(&format!("units/charge/{v}"), 200_000, || {
                    charge(&fx.limiter)
                })
            });
            b.iter(|| charge(&fx.limiter));
            fx.limiter.flush().expect("flush");
        });
    }
    priced(&mut g);
    g.finish();
}

/// `charge/priced`: the `usd` charge with its usage priced by the catalog instead of a given
/// cost (issue 22's target: pricing adds ≤ 100 ns p50). Skipped where the code has no pricing.
fn priced(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let Ok(fx) = Fixture::new(Extra::None) else {
        return;
    };
    let charge = |l: &Limiter| {
        l.charge(Spend::deployment_usage(
            black_box(CHARGED),
            black_box(USAGE),
        ))
        .map(|r| r.budgets())
    };
    // The catalog loads on the first price (not measured).
    assert_eq!(charge(&fx.limiter).expect("charge"), 1);
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("charge/priced", 1), |b| {
        common::once(&mut sampled, || {
            common::latency("units/charge/priced", 200_000, || charge(&fx.limiter))
        });
        b.iter(|| charge(&fx.limiter));
    });
    fx.limiter.flush().expect("flush");
}
