//! The resolution cache under misses: a call publishes at most one new map, and a
//! working set larger than the cache's cap (4 096) still filters exactly, call after call.

use std::sync::Arc;

use provider_budgets::{testing, BudgetConfig, Config, FakeClock, Limiter, Money, Scope};
use provider_budgets::{Spend, Target, NO_TAGS};

fn open(dir: &tempfile::TempDir) -> Limiter {
    let day = "1d".parse().unwrap();
    let config = Config::new()
        .budget("openai", Money::from_nanos(1 << 50), day)
        .with_budget(BudgetConfig::new(
            Scope::Deployment,
            "dep-13",
            Money::from_nanos(10),
            day,
        ))
        .data_dir(dir.path());
    let clock = FakeClock::new("2026-01-01T12:00:00Z".parse().unwrap());
    Limiter::builder(config)
        .clock(Arc::new(clock))
        .open()
        .unwrap()
}

#[test]
fn a_call_of_4000_new_models_publishes_the_cache_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(&dir);
    for round in 0..3 {
        let names: Vec<String> = (0..4000).map(|i| format!("gpt-4o-{round}-{i}")).collect();
        let (before, _) = testing::resolution_cache(&l);
        assert_eq!(l.filter(&names, NO_TAGS).unwrap().len(), 4000);
        let (after, len) = testing::resolution_cache(&l);
        assert!(
            after - before <= 1,
            "round {round}: {} publishes",
            after - before
        );
        assert!(len <= 4096, "bounded: {len}");
        let mut v = names.clone();
        l.filter_in_place(&mut v, NO_TAGS).unwrap();
        assert_eq!(v, names);
        assert!(testing::resolution_cache(&l).0 - after <= 1);
    }
    // New names over a full map wait for a batch (half the map's size in misses): a few
    // calls of them publish once at most.
    let names: Vec<String> = (0..100).map(|i| format!("claude-{i}")).collect();
    l.filter(&names, NO_TAGS).unwrap();
    let (published, _) = testing::resolution_cache(&l);
    for _ in 0..10 {
        l.filter(&names, NO_TAGS).unwrap();
    }
    let (again, _) = testing::resolution_cache(&l);
    assert!(again - published <= 1, "one batch at most");
}

#[test]
fn a_working_set_larger_than_the_cache_filters_exactly_across_calls() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(&dir);
    let spent = Target::with_id("dep-13", "gpt-4o");
    l.charge(Spend::deployment(&spent, Money::from_nanos(10)))
        .unwrap();
    let ids: Vec<Target> = (0..6000)
        .map(|i| Target::with_id(format!("dep-{i}"), "gpt-4o"))
        .collect();
    let expected: Vec<&Target> = ids.iter().filter(|t| **t != spent).collect();
    let mut publishes = Vec::new();
    for call in 0..6 {
        assert_eq!(l.filter(&ids, NO_TAGS).unwrap(), expected, "call {call}");
        // Small calls over the same working set: one deployment in 50 blocked.
        for chunk in ids.chunks(50).skip(call).step_by(7) {
            let got = l.filter(chunk, NO_TAGS).unwrap();
            let want: Vec<&Target> = chunk.iter().filter(|t| **t != spent).collect();
            assert_eq!(got, want);
        }
        let (n, len) = testing::resolution_cache(&l);
        assert!(len <= 4096, "bounded: {len}");
        publishes.push(n);
    }
    assert_eq!(
        l.filter(std::slice::from_ref(&spent), NO_TAGS)
            .unwrap_err()
            .exceeded
            .len(),
        1
    );
    // Publishes are rare (batches of at least half the map), not one per call or per miss.
    let total = *publishes.last().unwrap();
    assert!(total <= 40, "{publishes:?}");
}
