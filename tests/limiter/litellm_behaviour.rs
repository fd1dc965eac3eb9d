//! The reference behaviour of litellm's provider-budget filter that we keep, and its flaws
//! (DESIGN.md, "What the reference behaviour is (and what we fix)") that we must not have:
//!
//! * an exhausted provider's deployments are dropped while the others stay; with nothing left
//!   the error is litellm's "No deployments available - crossed budget" listing each provider
//!   as `Exceeded budget for provider X: spend >= limit`;
//! * deployments whose provider has no budget pass, unresolvable ones pass with
//!   `unknown_provider: allow` and are dropped with `deny` (flaw 4: silently dropped);
//! * money is exact: ten records of 0.1 reach a limit of 1 on the tenth, not after it (flaw 5),
//!   and a budget meant to admit 100 requests admits exactly 100 (flaw 6, one instance);
//! * a `1s` budget is enforced, and no window loses its spend before its end, in particular
//!   during its last second (flaw 7: `EXPIRE key 0`); the previous window stays readable;
//! * a record lands in its timestamp's window, also after the boundary has passed;
//! * a restart keeps every total (flaw 3: without Redis, a restart forgets all spend).
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{Config, FakeClock, Limiter, Money, Target};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(yaml: &str, dir: &tempfile::TempDir) -> Config {
    Config::from_yaml_str(yaml).unwrap().data_dir(dir.path())
}

fn open(yaml: &str, dir: &tempfile::TempDir, clock: &FakeClock) -> Limiter {
    support::open(config(yaml, dir), clock)
}

const DAILY: &str = "\
provider_budget_config:
  openai: {budget_limit: 1, time_period: 1d}
  azure: {budget_limit: 2, time_period: 1d}
";

#[test]
fn exhausted_provider_is_dropped_and_the_others_remain() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(DAILY, &dir, &clock);
    let deployments = ["gpt-4o", "azure/gpt-4o", "o1-mini", "claude-3-5-sonnet"];
    assert_eq!(l.filter(&deployments, NO_TAGS).unwrap().len(), 4);
    l.charge(Spend::provider("openai", usd("0.999999999")))
        .unwrap();
    assert_eq!(
        l.filter(&deployments, NO_TAGS).unwrap().len(),
        4,
        "below the limit by one nano"
    );
    l.charge(Spend::provider("openai", usd("0.000000001")))
        .unwrap();
    // spend >= limit drops every openai deployment (bare model names resolve to openai).
    assert_eq!(
        l.filter(&deployments, NO_TAGS).unwrap(),
        [&"azure/gpt-4o", &"claude-3-5-sonnet"]
    );
    // The router's explicit provider wins over the model name.
    let explicit = [
        Target::new("gpt-4o", "azure"),
        Target::new("gpt-4o", "openai"),
    ];
    let left = l.filter(&explicit, NO_TAGS).unwrap();
    assert_eq!(left, [&explicit[0]]);
}

#[test]
fn nothing_left_lists_each_provider_with_spend_and_limit_in_litellms_format() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(DAILY, &dir, &clock);
    l.charge(Spend::provider("openai", usd("1.5"))).unwrap();
    l.charge(Spend::provider("azure", usd("2.25"))).unwrap();
    let err = l
        .filter(
            &["gpt-4o", "azure/gpt-4o", "o1-mini", "azure/gpt-35"],
            NO_TAGS,
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "No deployments available - crossed budget: \
         Exceeded budget for provider openai: 1.5 >= 1, \
         Exceeded budget for provider azure: 2.25 >= 2"
    );
    let rows: Vec<(&str, u64, u64)> = err
        .exceeded
        .iter()
        .map(|e| (e.provider.as_str(), e.spend.as_nanos(), e.limit.as_nanos()))
        .collect();
    assert_eq!(
        rows,
        [
            ("openai", 1_500_000_000, 1_000_000_000),
            ("azure", 2_250_000_000, 2_000_000_000)
        ]
    );
    assert!(err.unknown.is_empty());
    // Only the providers among the candidates are listed.
    let err = l.filter(&["azure/gpt-4o"], NO_TAGS).unwrap_err();
    assert_eq!(
        err.to_string(),
        "No deployments available - crossed budget: Exceeded budget for provider azure: 2.25 >= 2"
    );
    // An empty candidate list is not an error: there was nothing to drop.
    assert!(l.filter::<&str, &str>(&[], NO_TAGS).unwrap().is_empty());
}

#[test]
fn providers_without_budget_pass_unknown_ones_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(DAILY, &dir, &clock);
    l.charge(Spend::provider("openai", usd("5"))).unwrap();
    l.charge(Spend::provider("azure", usd("5"))).unwrap();
    // Every budgeted provider is exhausted; the others still pass (the reference drops them).
    let deployments = [
        "gpt-4o",
        "claude-3-5-sonnet",      // anthropic: no budget
        "bedrock/claude-3-haiku", // bedrock: no budget
        "my-private-fine-tune",   // resolves to nothing
        "azure/gpt-4o",
    ];
    assert_eq!(
        l.filter(&deployments, NO_TAGS).unwrap(),
        [
            &"claude-3-5-sonnet",
            &"bedrock/claude-3-haiku",
            &"my-private-fine-tune"
        ]
    );
    assert_eq!(
        l.filter(&["my-private-fine-tune"], NO_TAGS).unwrap(),
        [&"my-private-fine-tune"]
    );
    drop(l);

    let deny = format!("{DAILY}provider_budgets:\n  unknown_provider: deny\n");
    let l = open(&deny, &dir, &clock);
    assert_eq!(
        l.filter(&deployments, NO_TAGS).unwrap(),
        [&"claude-3-5-sonnet", &"bedrock/claude-3-haiku"]
    );
    let err = l
        .filter(&["my-private-fine-tune", "gpt-4o"], NO_TAGS)
        .unwrap_err();
    assert_eq!(err.unknown, ["my-private-fine-tune"]);
    assert_eq!(err.exceeded.len(), 1);
    let msg = err.to_string();
    assert!(
        msg.starts_with("No deployments available - crossed budget: Exceeded budget for provider openai: 5 >= 1, ")
            && msg.contains("my-private-fine-tune")
            && msg.contains("deny"),
        "{msg}"
    );
    // A provider without budget still passes under `deny`: it is known, just unlimited.
    assert_eq!(
        l.filter(&["mistral-large"], NO_TAGS).unwrap(),
        [&"mistral-large"]
    );
}

#[test]
fn ten_records_of_a_tenth_reach_a_limit_of_one_exactly_on_the_tenth() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(DAILY, &dir, &clock);
    // Half from text, half from a float cost as a router would get it from a pricing table.
    for i in 0..10 {
        assert_eq!(
            l.filter(&["gpt-4o"], NO_TAGS).unwrap().len(),
            1,
            "excluded after {i} records"
        );
        let cost = if i % 2 == 0 {
            usd("0.1")
        } else {
            Money::from_usd(0.1).unwrap()
        };
        l.charge(Spend::provider("openai", cost)).unwrap();
    }
    let s = l
        .status(StatusQuery::provider("openai"))
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(s.spend, Money::from_nanos(1_000_000_000));
    assert_eq!(s.remaining, Money::ZERO);
    assert!(s.exhausted);
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err());
}

#[test]
fn many_tiny_costs_sum_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(DAILY, &dir, &clock);
    // 100 000 × $0.00001 is exactly $1; a float accumulator drifts away from it.
    let tiny = usd("0.00001");
    for _ in 0..99_999 {
        l.charge(Spend::provider("openai", tiny)).unwrap();
    }
    assert_eq!(l.filter(&["gpt-4o"], NO_TAGS).unwrap().len(), 1);
    l.charge(Spend::provider("openai", tiny)).unwrap();
    assert_eq!(
        l.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .spend,
        Money::from_nanos(1_000_000_000)
    );
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err());
    l.flush().unwrap();
    drop(l);
    let l = open(DAILY, &dir, &clock);
    assert_eq!(
        l.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .spend,
        Money::from_nanos(1_000_000_000)
    );
}

#[test]
fn a_budget_for_a_hundred_requests_admits_exactly_a_hundred() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1h}\n",
        &dir,
        &clock,
    );
    let deployments = ["gpt-4o"];
    let prepared = l.prepare(&deployments);
    let mut admitted = 0;
    for _ in 0..300 {
        if l.filter(&deployments, NO_TAGS).is_err() {
            assert!(prepared.filter(NO_TAGS).is_err());
            continue;
        }
        assert_eq!(prepared.filter(NO_TAGS).unwrap(), [0]);
        admitted += 1;
        l.charge(Spend::provider("openai", usd("0.01"))).unwrap();
    }
    assert_eq!(admitted, 100);
}

#[test]
fn a_one_second_budget_is_enforced_within_its_second() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1s}\n",
        &dir,
        &clock,
    );
    for second in 0..3 {
        assert!(
            l.filter(&["gpt-4o"], NO_TAGS).is_ok(),
            "second {second} starts fresh"
        );
        clock.advance(SignedDuration::from_millis(100));
        l.charge(Spend::provider("openai", usd("1"))).unwrap();
        // Exhausted for the rest of the second, including its very last instant.
        assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err());
        clock.advance(SignedDuration::from_millis(899));
        assert!(
            l.filter(&["gpt-4o"], NO_TAGS).is_err(),
            "still in second {second}"
        );
        let s = l
            .status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap();
        assert_eq!(s.spend, Money::from_nanos(1_000_000_000));
        assert_eq!(
            s.window.end_secs() - s.window.start_secs(),
            1,
            "a 1s window"
        );
        clock.advance(SignedDuration::from_millis(1));
        assert_eq!(
            l.status(StatusQuery::provider("openai"))
                .into_iter()
                .next()
                .unwrap()
                .spend,
            Money::ZERO
        );
    }
    // Every second's spend is still there, one window each.
    let windows = l.windows("openai");
    assert_eq!(windows.len(), 3);
    assert!(
        windows
            .iter()
            .all(|(w, m)| *m == Money::from_nanos(1_000_000_000)
                && w.end_secs() - w.start_secs() == 1)
    );
}

#[test]
fn the_last_second_of_a_window_keeps_its_spend() {
    let dir = tempfile::tempdir().unwrap();
    let end = ts("2024-06-01T12:01:00Z");
    let last_second = ts("2024-06-01T12:00:59Z");
    let clock = FakeClock::new(last_second);
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1m}\n";
    let l = open(yaml, &dir, &clock);
    l.charge(Spend::provider("openai", usd("0.6"))).unwrap();
    clock.set(ts("2024-06-01T12:00:59.5Z"));
    l.charge(Spend::provider("openai", usd("0.4"))).unwrap();
    // The reference sets a TTL of int(seconds left) = 0 here, which deletes the key.
    for at in [last_second, ts("2024-06-01T12:00:59.999Z")] {
        clock.set(at);
        let s = &l.status(StatusQuery::all().at(at))[0];
        assert_eq!(s.spend, Money::from_nanos(1_000_000_000), "at {at}");
        assert_eq!(s.window.end(), end);
        assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err(), "at {at}");
    }
    // At the boundary the new window starts empty...
    clock.set(end);
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_ok());
    assert_eq!(l.status(StatusQuery::all())[0].spend, Money::ZERO);
    assert_eq!(l.status(StatusQuery::all())[0].window.start(), end);
    // ...and the window that ended stays readable.
    assert_eq!(
        l.status(StatusQuery::all().at(last_second))[0].spend,
        Money::from_nanos(1_000_000_000)
    );
    let windows = l.windows("openai");
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].0.start(), ts("2024-06-01T12:00:00Z"));
    assert_eq!(windows[0].0.end(), end);
    assert_eq!(windows[0].1, Money::from_nanos(1_000_000_000));
    // A restart keeps it too.
    drop(l);
    let l = open(yaml, &dir, &clock);
    assert_eq!(
        l.status(StatusQuery::all().at(last_second))[0].spend,
        Money::from_nanos(1_000_000_000)
    );
    assert_eq!(l.status(StatusQuery::all())[0].spend, Money::ZERO);
}

#[test]
fn a_record_lands_in_its_timestamps_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:01:00.250Z")); // just past a boundary
    let l = open(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1m}\n",
        &dir,
        &clock,
    );
    // The request started in the previous minute; its cost is known only now.
    l.charge(Spend::provider("openai", usd("1")).at(ts("2024-06-01T12:00:59.900Z")))
        .unwrap();
    l.charge(Spend::provider("openai", usd("0.5")).at(ts("2024-06-01T12:00:00Z")))
        .unwrap()
        .wait()
        .unwrap();
    let now = &l.status(StatusQuery::all())[0];
    assert_eq!(now.spend, Money::ZERO, "the current window is untouched");
    assert_eq!(now.window.start(), ts("2024-06-01T12:01:00Z"));
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_ok());
    let prev = &l.status(StatusQuery::all().at(ts("2024-06-01T12:00:30Z")))[0];
    assert_eq!(prev.spend, Money::from_nanos(1_500_000_000));
    assert!(prev.exhausted);
    // A record stamped in the future lands in its own window, not the current one.
    l.charge(Spend::provider("openai", usd("0.25")).at(ts("2024-06-01T12:02:00Z")))
        .unwrap();
    assert_eq!(l.status(StatusQuery::all())[0].spend, Money::ZERO);
    let windows: Vec<(String, u64)> = l
        .windows("openai")
        .into_iter()
        .map(|(w, m)| (w.start().to_string(), m.as_nanos()))
        .collect();
    assert_eq!(
        windows,
        [
            ("2024-06-01T12:02:00Z".to_owned(), 250_000_000),
            ("2024-06-01T12:00:00Z".to_owned(), 1_500_000_000),
        ]
    );
    clock.set(ts("2024-06-01T12:02:00Z"));
    assert_eq!(
        l.status(StatusQuery::all())[0].spend,
        Money::from_nanos(250_000_000)
    );
}

#[test]
fn a_restart_keeps_every_total() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let yaml = "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\n  azure: {budget_limit: 10, time_period: 1h}\n";
    let l = open(yaml, &dir, &clock);
    l.charge(Spend::provider("openai", usd("0.3"))).unwrap();
    l.charge(Spend::provider("azure", usd("4"))).unwrap();
    l.charge(Spend::provider("azure", usd("1")).at(ts("2024-06-01T11:30:00Z")))
        .unwrap();
    let before = l.status(StatusQuery::all());
    drop(l); // the drop commits what is queued
    let l = open(yaml, &dir, &clock);
    assert_eq!(l.status(StatusQuery::all()), before);
    assert_eq!(
        l.status(StatusQuery::all().at(ts("2024-06-01T11:30:00Z")))[0].spend,
        Money::from_nanos(1_000_000_000),
        "azure's previous hour"
    );
    // Durable records survive a restart too, and add up with what was there.
    l.charge(Spend::provider("openai", usd("0.7")))
        .unwrap()
        .wait()
        .unwrap();
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err());
    drop(l);
    let l = open(yaml, &dir, &clock);
    assert_eq!(
        l.status(StatusQuery::provider("openai"))
            .into_iter()
            .next()
            .unwrap()
            .spend,
        Money::from_nanos(1_000_000_000)
    );
    assert!(
        l.filter(&["gpt-4o"], NO_TAGS).is_err(),
        "still exhausted after restart"
    );
    assert_eq!(l.filter(&["azure/gpt-4o"], NO_TAGS).unwrap().len(), 1);
    // A shutdown instead of a drop keeps them as well.
    l.charge(Spend::provider("azure", usd("6"))).unwrap();
    l.shutdown().unwrap();
    drop(l);
    let l = open(yaml, &dir, &clock);
    assert_eq!(
        l.status(StatusQuery::provider("azure"))
            .into_iter()
            .next()
            .unwrap()
            .spend,
        Money::from_nanos(10_000_000_000)
    );
    assert!(l.filter(&["azure/gpt-4o"], NO_TAGS).is_err());
}
