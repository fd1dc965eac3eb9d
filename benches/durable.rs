//! `record_durable`: returns after the fsync that covers the record (group commit: one sled
//! batch + flush serves every waiter queued at that moment). Concurrency 1 (one fsync per
//! record), 64 blocking threads, and 64 tokio tasks using `record_durable_async` on a 2-worker
//! runtime. Callers spread over the five budgeted providers. The data dir is on the build's
//! disk (ext4 here), not tmpfs, so fsync costs are real.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput};
use provider_budgets::Limiter;
use provider_budgets::Spend;

use crate::common::{self, Fixture, Pool, PROVIDERS};

const CONCURRENCY: usize = 64;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `total` durable records split over `CONCURRENCY` tasks.
async fn async_round(limiter: &Limiter, total: u64) {
    let n = CONCURRENCY as u64;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let share = total / n + u64::from(i < total % n);
        let limiter = limiter.clone();
        set.spawn(async move {
            let provider = PROVIDERS[i as usize % PROVIDERS.len()];
            for _ in 0..share {
                limiter
                    .charge(Spend::provider(provider, common::cost()))
                    .expect("charge")
                    .await
                    .expect("durable charge");
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("task");
    }
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("record_durable");
    g.throughput(Throughput::Elements(1));

    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("threads", 1), |b| {
        let fx = fx.get_or_insert_with(Fixture::new);
        let cost = common::cost();
        common::once(&mut sampled, || {
            common::latency("record_durable/threads/1", 300, || {
                fx.limiter
                    .charge(Spend::provider("openai", black_box(cost)))
                    .expect("durable")
                    .wait()
                    .expect("durable")
            })
        });
        b.iter(|| {
            fx.limiter
                .charge(Spend::provider(black_box("openai"), black_box(cost)))
                .and_then(|r| r.wait())
        });
    });

    let mut pool: Option<(Fixture, Pool)> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("threads", CONCURRENCY), |b| {
        let (fx, pool) = pool.get_or_insert_with(|| {
            let fx = Fixture::new();
            let limiter = fx.limiter.clone();
            let pool = Pool::new(CONCURRENCY, move |t, n| {
                let provider = PROVIDERS[t % PROVIDERS.len()];
                for _ in 0..n {
                    limiter
                        .charge(Spend::provider(provider, common::cost()))
                        .expect("record_durable")
                        .wait()
                        .expect("record_durable");
                }
            });
            (fx, pool)
        });
        common::once(&mut sampled, || percentiles_threads(&fx.limiter));
        b.iter_custom(|iters| pool.run(iters));
    });

    let mut fx: Option<(Fixture, tokio::runtime::Runtime)> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("async_tasks", CONCURRENCY), |b| {
        let (fx, rt) = fx.get_or_insert_with(|| (Fixture::new(), runtime()));
        common::once(&mut sampled, || percentiles_async(&fx.limiter, rt));
        b.iter_custom(|iters| {
            let start = Instant::now();
            rt.block_on(async_round(&fx.limiter, iters));
            start.elapsed()
        });
    });
    g.finish();
}

const PASS_PER_CALLER: usize = 25;

/// Per-call latency of 64 threads each doing 25 durable records at once.
fn percentiles_threads(limiter: &Limiter) {
    common::percentiles_threads(
        &format!("record_durable/threads/{CONCURRENCY}"),
        limiter,
        CONCURRENCY,
        PASS_PER_CALLER,
        |limiter, t| {
            limiter
                .charge(Spend::provider(
                    PROVIDERS[t % PROVIDERS.len()],
                    common::cost(),
                ))
                .expect("durable")
                .wait()
                .expect("durable");
        },
    );
}

/// Per-call latency of 64 tasks each doing 25 durable records at once.
fn percentiles_async(limiter: &Limiter, rt: &tokio::runtime::Runtime) {
    let start = Instant::now();
    let samples: Vec<u64> = rt.block_on(async {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..CONCURRENCY {
            let limiter = limiter.clone();
            set.spawn(async move {
                let provider = PROVIDERS[i % PROVIDERS.len()];
                let mut v = Vec::with_capacity(PASS_PER_CALLER);
                for _ in 0..PASS_PER_CALLER {
                    let t = Instant::now();
                    limiter
                        .charge(Spend::provider(provider, common::cost()))
                        .expect("charge")
                        .await
                        .expect("durable");
                    v.push(t.elapsed().as_nanos() as u64);
                }
                v
            });
        }
        let mut all = Vec::new();
        while let Some(r) = set.join_next().await {
            all.extend(r.expect("task"));
        }
        all
    });
    let rate = common::fmt_rate(samples.len() as u64, start.elapsed());
    common::add(
        &format!("record_durable/async_tasks/{CONCURRENCY}"),
        samples,
        rate,
    );
}
