//! Reservations: `reserve` (admission in every budget + the record made durable)
//! followed by `commit` (the spend and the end of the record, durable), i.e. two group-committed
//! fsyncs per call. Concurrency 1 and 64 blocking threads, on the build's disk (not tmpfs).
//! Deployments are `gpt-4o` (openai budget) with the generous limits of the common fixture.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput};
use provider_budgets::Limiter;

use crate::common::{self, Fixture, Pool};

const CONCURRENCY: usize = 64;
const PASS_PER_CALLER: usize = 10;

fn reserve_commit(limiter: &Limiter) {
    let r = limiter
        .reserve(&["gpt-4o"], common::cost())
        .wait()
        .expect("reserve");
    r.commit(common::cost())
        .expect("commit")
        .wait()
        .expect("commit");
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("reserve_commit");
    g.throughput(Throughput::Elements(1));

    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("threads", 1), |b| {
        let fx = fx.get_or_insert_with(Fixture::new);
        common::once(&mut sampled, || {
            common::latency("reserve_commit/threads/1", 200, || {
                reserve_commit(&fx.limiter)
            })
        });
        b.iter(|| reserve_commit(black_box(&fx.limiter)));
    });

    let mut pool: Option<(Fixture, Pool)> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("threads", CONCURRENCY), |b| {
        let (fx, pool) = pool.get_or_insert_with(|| {
            let fx = Fixture::new();
            let limiter = fx.limiter.clone();
            let pool = Pool::new(CONCURRENCY, move |_, n| {
                for _ in 0..n {
                    reserve_commit(&limiter);
                }
            });
            (fx, pool)
        });
        common::once(&mut sampled, || percentiles_threads(&fx.limiter));
        b.iter_custom(|iters| pool.run(iters));
    });
    g.finish();
}

/// Per-call latency of 64 threads each doing 10 reserve + commit pairs at once.
fn percentiles_threads(limiter: &Limiter) {
    common::percentiles_threads(
        &format!("reserve_commit/threads/{CONCURRENCY}"),
        limiter,
        CONCURRENCY,
        PASS_PER_CALLER,
        |limiter, _| reserve_commit(limiter),
    );
}
