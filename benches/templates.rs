//! Templates at scale (issue 20's targets): one node with `SERIES` live templated series
//! (keys; plus 1 000 users, 100 teams and 10 orgs, each scope from a template) and a provider
//! budget.
//!
//! * `templates/filter_4_identities`: `filter_for` of one deployment for a request naming a
//!   key, a user, a team and an org (every series made), p50/p99 over random keys;
//! * `templates/reserve_4_identities`: `reserve` + `release` of the same, p50/p99;
//! * the RSS growth per series while they are made (`/proc/self/statm`, printed: it counts
//!   the view, the slot keys and the template tables, and sled's page cache of the 100 000
//!   windows written, which a reopen does not have);
//! * `templates/reopen`: dropping the limiter and opening the data dir again (every live series
//!   restored), once, timed.
//!
//! `SERIES` is 100 000; with `--quick` (CI) 20 000.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion};
use provider_budgets::{Config, Identity, Limiter, Money, Spend};

use crate::common;

const YAML: &str = "\
provider_budget_config:
  openai: {budget_limit: 100000000, time_period: 1d}
provider_budgets:
  budgets:
    - {key: \"*\", limit: 1000, period: 1d, max_series: 1000000}
    - {user: \"*\", limit: 1000, period: 1d}
    - {team: \"*\", limit: 100000, period: 1d}
    - {org: \"*\", limit: 1000000, period: 1d}
";

const DEPLOYMENTS: [&str; 1] = ["openai/gpt-4o"];

struct Fixture {
    _dir: tempfile::TempDir,
    config: Config,
    limiter: Option<Limiter>,
    keys: Vec<String>,
}

/// The resident set size of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// The names of request `i`: its key, and a user, team and org it belongs to.
fn names(i: usize) -> (String, String, String) {
    (
        format!("user-{}", i % 1000),
        format!("team-{}", i % 100),
        format!("org-{}", i % 10),
    )
}

impl Fixture {
    fn new(series: usize) -> Fixture {
        let dir = common::tempdir();
        let config = Config::from_yaml_str(YAML)
            .expect("config")
            .data_dir(dir.path());
        let limiter = Limiter::open(config.clone()).expect("open");
        let keys: Vec<String> = (0..series).map(|i| format!("{i:016x}")).collect();
        let cost: Money = "0.0001".parse().expect("money");
        let before = rss();
        let start = Instant::now();
        for (i, key) in keys.iter().enumerate() {
            let (user, team, org) = names(i);
            let id = Identity::new().key(key).user(&user).team(&team).org(&org);
            limiter
                .charge(Spend::provider("openai", cost).identity(&id))
                .expect("charge");
        }
        limiter.flush().expect("flush");
        let made = start.elapsed();
        let grown = rss().saturating_sub(before);
        let live: u64 = limiter.templates().iter().map(|t| t.live_series).sum();
        eprintln!(
            "templates: {live} live series made in {:.2} s; RSS grew {:.1} MB, {} bytes per series",
            made.as_secs_f64(),
            grown as f64 / 1e6,
            grown / live.max(1)
        );
        Fixture {
            _dir: dir,
            config,
            limiter: Some(limiter),
            keys,
        }
    }

    fn limiter(&self) -> &Limiter {
        self.limiter.as_ref().expect("open")
    }

    /// Drops the limiter and opens the data dir again; returns the time to open.
    fn reopen(&mut self) -> std::time::Duration {
        drop(self.limiter.take());
        let start = Instant::now();
        let limiter = Limiter::open(self.config.clone()).expect("reopen");
        let took = start.elapsed();
        self.limiter = Some(limiter);
        took
    }
}

pub fn bench(c: &mut Criterion) {
    let quick = std::env::args().any(|a| a == "--quick");
    let series = if quick { 20_000 } else { 100_000 };
    let mut g = c.benchmark_group("templates");
    g.sample_size(10);
    let mut fx = Fixture::new(series);
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng as usize
    };
    let ids: Vec<(String, String, String)> = (0..series).map(names).collect();
    let mut pick = |fx: &Fixture| {
        let i = next() % series;
        (fx.keys[i].clone(), i)
    };
    let mut sampled = false;
    g.bench_function(BenchmarkId::new("filter_4_identities", series), |b| {
        common::once(&mut sampled, || {
            let picks: Vec<(String, usize)> = (0..200_000).map(|_| pick(&fx)).collect();
            let mut n = 0;
            common::latency(
                &format!(
                    "templates/filter_4_identities/{series} (key, user, team, org + provider)"
                ),
                picks.len(),
                || {
                    let (key, i) = &picks[n % picks.len()];
                    n += 1;
                    let (user, team, org) = &ids[*i];
                    let id = Identity::new().key(key).user(user).team(team).org(org);
                    fx.limiter()
                        .filter_for(black_box(&DEPLOYMENTS), provider_budgets::NO_TAGS, &id)
                        .is_ok()
                },
            );
        });
        let (key, i) = pick(&fx);
        let (user, team, org) = &ids[i];
        let id = Identity::new().key(&key).user(user).team(team).org(org);
        b.iter(|| {
            fx.limiter()
                .filter_for(black_box(&DEPLOYMENTS), provider_budgets::NO_TAGS, &id)
                .is_ok()
        });
    });
    let mut sampled = false;
    let estimate: Money = "0.001".parse().expect("money");
    g.bench_function(BenchmarkId::new("reserve_4_identities", series), |b| {
        common::once(&mut sampled, || {
            let picks: Vec<(String, usize)> = (0..50_000).map(|_| pick(&fx)).collect();
            let mut n = 0;
            common::latency(
                &format!("templates/reserve_4_identities/{series} (reserve + release)"),
                picks.len(),
                || {
                    let (key, i) = &picks[n % picks.len()];
                    n += 1;
                    let (user, team, org) = &ids[*i];
                    let id = Identity::new().key(key).user(user).team(team).org(org);
                    let r = fx
                        .limiter()
                        .reserve(black_box(&DEPLOYMENTS), estimate)
                        .identity(&id)
                        .wait()
                        .expect("reserve");
                    r.release().expect("release")
                },
            );
        });
        let (key, i) = pick(&fx);
        let (user, team, org) = &ids[i];
        let id = Identity::new().key(&key).user(user).team(team).org(org);
        b.iter(|| {
            let r = fx
                .limiter()
                .reserve(black_box(&DEPLOYMENTS), estimate)
                .identity(&id)
                .wait()
                .expect("reserve");
            r.release().expect("release")
        });
    });
    let took = fx.reopen();
    let live: u64 = fx.limiter().templates().iter().map(|t| t.live_series).sum();
    eprintln!(
        "templates/reopen/{series}: {:.0} ms ({live} live series restored)",
        took.as_secs_f64() * 1e3
    );
    g.finish();
}
