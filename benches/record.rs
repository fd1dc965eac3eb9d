//! `record` (buffered): bump the in-memory total and queue the event for the journal thread,
//! which commits in the background (so the journal's share of the 2 cores is included).
//! Single-threaded, and 2 threads recording to the same provider (contended: one window cell,
//! one channel) measured with `iter_custom` over a pool of 2 long-lived threads.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput};
use provider_budgets::Limiter;
use provider_budgets::Spend;

use crate::common::{self, Fixture, Pool};

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));

    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("buffered/threads", 1), |b| {
        let fx = fx.get_or_insert_with(Fixture::new);
        let cost = common::cost();
        common::once(&mut sampled, || {
            common::latency("record/buffered/threads/1", 200_000, || {
                fx.limiter
                    .charge(Spend::provider("openai", black_box(cost)))
            });
        });
        b.iter(|| {
            fx.limiter
                .charge(Spend::provider(black_box("openai"), black_box(cost)))
        });
        fx.limiter.flush().expect("flush");
    });

    let mut pool: Option<(Fixture, Pool)> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("buffered/threads", 2), |b| {
        let (fx, pool) = pool.get_or_insert_with(|| {
            let fx = Fixture::new();
            let limiter = fx.limiter.clone();
            let cost = common::cost();
            let pool = Pool::new(2, move |_, n| {
                for _ in 0..n {
                    black_box(
                        limiter.charge(Spend::provider(black_box("openai"), black_box(cost))),
                    )
                    .expect("record");
                }
            });
            (fx, pool)
        });
        common::once(&mut sampled, || percentiles_2_threads(&fx.limiter));
        b.iter_custom(|iters| pool.run(iters));
        fx.limiter.flush().expect("flush");
    });
    g.finish();
}

/// Per-call latencies of 2 threads recording at once (100 000 records each).
fn percentiles_2_threads(limiter: &Limiter) {
    const PER_THREAD: usize = 100_000;
    let cost = common::cost();
    let start = Instant::now();
    let samples: Vec<u64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let limiter = limiter.clone();
                s.spawn(move || {
                    let mut v = Vec::with_capacity(PER_THREAD);
                    for _ in 0..PER_THREAD {
                        let t = Instant::now();
                        black_box(
                            limiter.charge(Spend::provider(black_box("openai"), black_box(cost))),
                        )
                        .expect("record");
                        v.push(t.elapsed().as_nanos() as u64);
                    }
                    v
                })
            })
            .collect();
        hs.into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect()
    });
    let elapsed = start.elapsed();
    let rate = common::fmt_rate(samples.len() as u64, elapsed);
    common::add("record/buffered/threads/2", samples, rate);
}
