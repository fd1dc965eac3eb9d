//! Reopening a data dir that holds 10 000 windows: a `1s` budget with records at 10 000
//! distinct seconds, a retention of 1000 days and a `FakeClock` just after the last one, so none
//! has expired. The data is written once; each iteration is `Limiter::open_with_clock` (sled
//! open, load and decode every window, fill the view, start the journal) plus the drop (journal
//! stop, sled close).

use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion};
use jiff::{SignedDuration, Timestamp};
use provider_budgets::Spend;
use provider_budgets::{Clock, Config, FakeClock, Limiter, Money};

use crate::common;

const WINDOWS: i64 = 10_000;

struct Fixture {
    _dir: tempfile::TempDir,
    config: Config,
    clock: Arc<dyn Clock>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = common::tempdir();
        let mut config = common::config(dir.path(), "1000", "1s");
        config.storage.retention = Duration::from_secs(1000 * 86_400);
        let first: Timestamp = "2025-01-01T00:00:00Z".parse().expect("timestamp");
        let clock = FakeClock::new(first + SignedDuration::from_secs(WINDOWS));
        let clock: Arc<dyn Clock> = Arc::new(clock);
        let limiter = Limiter::builder(config.clone())
            .clock(Arc::clone(&clock))
            .open()
            .expect("open");
        let cost: Money = "0.01".parse().expect("money");
        for i in 0..WINDOWS {
            limiter
                .charge(Spend::provider("openai", cost).at(first + SignedDuration::from_secs(i)))
                .expect("record");
        }
        limiter.flush().expect("flush");
        drop(limiter);
        let limiter = Limiter::builder(config.clone())
            .clock(Arc::clone(&clock))
            .open()
            .expect("reopen");
        assert_eq!(
            limiter.windows("openai").len(),
            WINDOWS as usize,
            "every window is loaded"
        );
        drop(limiter);
        Fixture {
            _dir: dir,
            config,
            clock,
        }
    }

    fn open_and_drop(&self) {
        let limiter = Limiter::builder(self.config.clone())
            .clock(Arc::clone(&self.clock))
            .open()
            .expect("reopen");
        drop(limiter);
    }
}

pub fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("reopen");
    g.sample_size(10);
    let mut fx: Option<Fixture> = None;
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("windows", WINDOWS), |b| {
        let fx = fx.get_or_insert_with(Fixture::new);
        common::once(&mut sampled, || {
            common::latency(&format!("reopen/windows/{WINDOWS}"), 15, || {
                fx.open_and_drop()
            })
        });
        b.iter(|| fx.open_and_drop());
    });
    g.finish();
}
