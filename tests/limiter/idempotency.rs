//! Idempotency records (hidden API, used by the sidecar): a keyed spend and a remembered
//! reservation end are on disk after a restart; a spend that counts nothing writes none; the
//! journal's maintenance removes records older than a day (by the sane clock: time really
//! passing), so the data dir stays bounded. The capacity bound is a unit test of the journal
//! (`src/durable/journal.rs`); the kill between fsync and answer is `cli/tests/faults/`.

use provider_budgets_test_support::open as support;

use std::time::Duration;

use jiff::Timestamp;
use provider_budgets::{
    testing, FakeClock, IdempotencyRecord, Limiter, Money, Remembered, Spend, StatusQuery,
};

const YAML: &str = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";
const HOUR: Duration = Duration::from_secs(3600);

fn start() -> Timestamp {
    "2024-05-01T00:00:00Z".parse().unwrap()
}

fn usd(text: &str) -> Money {
    text.parse().unwrap()
}

fn keys(records: &[IdempotencyRecord]) -> Vec<(&str, Remembered)> {
    records.iter().map(|r| (r.key.as_str(), r.what)).collect()
}

/// A durable spend of `cost` to openai with `key` and `fingerprint`.
fn keyed(limiter: &Limiter, key: &str, fingerprint: u64, cost: &str) {
    let spend = Spend::provider("openai", usd(cost)).idempotency_key(key, fingerprint);
    limiter.charge(spend).unwrap().wait().unwrap();
}

#[test]
fn keyed_spends_and_remembered_ends_are_on_disk_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(start());
    let limiter = support::open(support::yaml(YAML, dir.path()), &clock);
    keyed(&limiter, "k-1", 7, "0.5");
    limiter.charge(Spend::provider("openai", usd("1"))).unwrap();
    // Counting nothing writes nothing: no budget applies, or a cost of zero.
    let none = Spend::provider("anthropic", usd("1")).idempotency_key("k-none", 1);
    assert_eq!(limiter.charge(none).unwrap().wait().unwrap(), 0);
    keyed(&limiter, "k-zero", 2, "0");
    // Reservation ends: remembered only when asked.
    let r = limiter.reserve(&["gpt-4o"], usd("2")).wait().unwrap();
    let committed = r.id().to_owned();
    r.remember_end()
        .commit(usd("1.25"))
        .unwrap()
        .wait()
        .unwrap();
    let r = limiter.reserve(&["gpt-4o"], usd("2")).wait().unwrap();
    let released = r.id().to_owned();
    r.remember_end().release().unwrap().wait().unwrap();
    let r = limiter.reserve(&["gpt-4o"], usd("2")).wait().unwrap();
    r.commit(usd("0.25")).unwrap().wait().unwrap();
    limiter.shutdown().unwrap();
    drop(limiter);

    let limiter = support::open(support::yaml(YAML, dir.path()), &clock);
    let records = limiter.idempotency_records().unwrap();
    // Oldest first by the second; within one second in no particular order.
    let mut found = keys(&records);
    found.sort_by_key(|&(k, _)| k);
    let mut expected = [
        ("k-1", Remembered::Spend { fingerprint: 7 }),
        (
            committed.as_str(),
            Remembered::Committed { cost: usd("1.25") },
        ),
        (released.as_str(), Remembered::Released),
    ];
    expected.sort_by_key(|&(k, _)| k);
    assert_eq!(found, expected);
    assert!(records.iter().all(|r| r.at == start()), "{records:?}");
    // The records changed no total.
    let spend = limiter.status(StatusQuery::provider("openai"))[0].spend;
    assert_eq!(spend, usd("3"));
}

#[test]
fn records_older_than_a_day_are_removed_from_disk_by_maintenance() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(start());
    let limiter = support::open(support::yaml(YAML, dir.path()), &clock);
    keyed(&limiter, "old", 1, "1");
    clock.pass(23 * HOUR);
    keyed(&limiter, "young", 2, "1");
    testing::maintain(&limiter).unwrap();
    assert_eq!(limiter.idempotency_records().unwrap().len(), 2);
    // A wall clock that steps forward (not time passing) removes nothing.
    clock.advance(jiff::SignedDuration::from_hours(48));
    testing::maintain(&limiter).unwrap();
    clock.advance(jiff::SignedDuration::from_hours(-48));
    assert_eq!(limiter.idempotency_records().unwrap().len(), 2);
    // Two more hours really pass: "old" is 25 h old.
    clock.pass(2 * HOUR);
    testing::maintain(&limiter).unwrap();
    let records = limiter.idempotency_records().unwrap();
    assert_eq!(
        keys(&records),
        [("young", Remembered::Spend { fingerprint: 2 })]
    );
    limiter.shutdown().unwrap();
    drop(limiter);

    // Read at the first instant again: "old" would be young, so only its removal hides it.
    let limiter = support::open(support::yaml(YAML, dir.path()), &FakeClock::new(start()));
    let records = limiter.idempotency_records().unwrap();
    assert_eq!(
        keys(&records),
        [("young", Remembered::Spend { fingerprint: 2 })]
    );
}
