//! `Limiter::adjust`: corrections. A credit counts against spend (net, never below zero),
//! unblocks an exhausted budget, survives a restart and a reload, is audited, and is refused
//! with a clear error (nothing credited) when it names no budget, is ambiguous, is larger
//! than the window's spend, lacks a reason, or lands outside the accepted time range.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use std::path::Path;

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{
    AdjustError, Adjustment, Config, FakeClock, Limiter, Money, Period, RecordError, Spend,
    StatusQuery, NO_TAGS,
};

const NOW: &str = "2024-06-01T12:00:00Z";
const GPT: [&str; 2] = ["gpt-4o", "claude-3-5-sonnet"];

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(dir: &Path, budgets: &str) -> Config {
    let doc = format!("provider_budgets:\n  storage: {{retention: 7d}}\n  budgets:\n{budgets}");
    support::yaml(&doc, dir)
}

const BUDGETS: &str = "    - {provider: openai, limit: 1, period: 1d}\n    - {tag: team-a, limit: 5, period: 1d}\n    - {tag: team-a, limit: 50, period: 1mo}\n";

fn open(dir: &Path, clock: &FakeClock) -> Limiter {
    support::open(config(dir, BUDGETS), clock)
}

fn row(l: &Limiter, key: &str, period: &str) -> provider_budgets::BudgetStatus {
    l.status(StatusQuery::all())
        .into_iter()
        .find(|s| s.provider == key && s.period_key == period)
        .unwrap()
}

fn clock() -> FakeClock {
    FakeClock::new(NOW.parse().unwrap())
}

#[test]
fn a_credit_counts_net_unblocks_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    l.charge(Spend::provider("openai", usd("1.5")))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap(), [&"claude-3-5-sonnet"]);

    let c = l
        .adjust(Adjustment::credit("openai", usd("1"), "test run against production").by("ops"))
        .unwrap();
    assert_eq!(
        (c.amount, c.credited, c.spend),
        (usd("1"), usd("1"), usd("0.5"))
    );
    assert_eq!(c.period_key, "1d");
    // Net spend 0.5 of 1: the deployment is back.
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap().len(), 2);
    let s = row(&l, "openai", "1d");
    assert_eq!(
        (s.spend, s.credited, s.own_spend),
        (usd("0.5"), usd("1"), usd("1.5"))
    );
    assert!(!s.exhausted);
    // Spend after the credit counts again.
    l.charge(Spend::provider("openai", usd("0.5")))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(row(&l, "openai", "1d").spend, usd("1"));
    assert_eq!(l.filter(&GPT, NO_TAGS).unwrap(), [&"claude-3-5-sonnet"]);
    drop(l);

    let l = open(dir.path(), &clock);
    let s = row(&l, "openai", "1d");
    assert_eq!((s.spend, s.credited), (usd("1"), usd("1")));
    let audit = l.audit().unwrap();
    assert_eq!(audit.len(), 1);
    let a = &audit[0];
    assert_eq!(
        (
            a.budget.as_str(),
            a.period.as_str(),
            a.amount,
            a.by.as_str()
        ),
        ("openai", "1d", 1_000_000_000, "ops")
    );
    assert_eq!(a.reason, "test run against production");
    assert_eq!(a.node, l.node_id());
}

#[test]
fn a_credit_may_not_exceed_the_net_spend_and_refusals_credit_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    l.charge(Spend::provider("openai", usd("0.3"))).unwrap();
    let too_much = l.adjust(Adjustment::credit("openai", usd("0.31"), "refund"));
    assert!(
        matches!(&too_much, Err(AdjustError::Amount { why, .. }) if why.contains("0.3")),
        "{too_much:?}"
    );
    let zero = l.adjust(Adjustment::credit("openai", Money::ZERO, "refund"));
    assert!(matches!(zero, Err(AdjustError::Amount { .. })), "{zero:?}");
    // Exactly the spend: net zero; a second credit finds nothing left to credit.
    l.adjust(Adjustment::credit("openai", usd("0.3"), "refund"))
        .unwrap();
    let again = l.adjust(Adjustment::credit("openai", usd("0.01"), "refund"));
    assert!(
        matches!(again, Err(AdjustError::Amount { .. })),
        "{again:?}"
    );

    for (a, want) in [
        (
            Adjustment::credit("OpenAI", usd("0.1"), "x"),
            "no configured budget \"OpenAI\"",
        ),
        (
            Adjustment::credit("tag:team-a", usd("0.1"), "x"),
            "several periods (1d, 1mo)",
        ),
        (
            Adjustment::credit("openai", usd("0.1"), "  "),
            "a reason is required",
        ),
        (
            Adjustment::credit("openai", usd("0.1"), "two\nlines"),
            "control character",
        ),
        (
            Adjustment::credit("openai", usd("0.1"), "x".repeat(1025)),
            "1025 bytes",
        ),
        (
            Adjustment::credit("openai", usd("0.1"), "x").period("1h".parse::<Period>().unwrap()),
            "with period 1h",
        ),
    ] {
        let e = l.adjust(a).unwrap_err().to_string();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
        assert!(!e.contains('\n'), "{e:?}");
    }
    assert_eq!(row(&l, "openai", "1d").credited, usd("0.3"));
    assert_eq!(l.audit().unwrap().len(), 1, "refusals are not audited");
}

#[test]
fn a_credit_lands_in_the_window_of_at_within_the_accepted_range() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    let yesterday: Timestamp = "2024-05-31T10:00:00Z".parse().unwrap();
    l.charge(Spend::provider("tag-less", usd("1")).at(yesterday))
        .unwrap();
    l.charge(
        Spend::deployment("gpt-4o", usd("2"))
            .tags(&["team-a"])
            .at(yesterday),
    )
    .unwrap();
    let c = l
        .adjust(
            Adjustment::credit("tag:team-a", usd("2"), "refunded")
                .period("1d".parse().unwrap())
                .at(yesterday),
        )
        .unwrap();
    assert_eq!(c.window.start().to_string(), "2024-05-31T00:00:00Z");
    assert_eq!(c.spend, Money::ZERO);
    // Today's window is untouched.
    assert_eq!(row(&l, "tag:team-a", "1d").credited, Money::ZERO);
    // The monthly series of the same tag is its own budget: not credited.
    let may = l
        .status(StatusQuery::all().at(yesterday))
        .into_iter()
        .find(|s| s.provider == "tag:team-a" && s.period_key == "1mo")
        .unwrap();
    assert_eq!((may.spend, may.credited), (usd("2"), Money::ZERO));

    let ahead = l.now() + SignedDuration::from_hours(2);
    let e = l
        .adjust(Adjustment::credit("openai", usd("0.1"), "x").at(ahead))
        .unwrap_err();
    assert!(
        matches!(e, AdjustError::Record(RecordError::Future { .. })),
        "{e:?}"
    );
    let long_ago: Timestamp = "2023-01-01T00:00:00Z".parse().unwrap();
    let e = l
        .adjust(Adjustment::credit("openai", usd("0.1"), "x").at(long_ago))
        .unwrap_err();
    assert!(
        matches!(e, AdjustError::Record(RecordError::Expired { .. })),
        "{e:?}"
    );
}

#[test]
fn a_removed_budget_keeps_its_credits_when_a_reload_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    l.charge(Spend::provider("openai", usd("0.8"))).unwrap();
    l.adjust(Adjustment::credit("openai", usd("0.5"), "refund"))
        .unwrap();
    l.reload(config(
        dir.path(),
        "    - {tag: team-a, limit: 5, period: 1d}\n",
    ))
    .unwrap();
    let e = l
        .adjust(Adjustment::credit("openai", usd("0.1"), "x"))
        .unwrap_err();
    assert!(matches!(e, AdjustError::UnknownBudget { .. }), "{e:?}");
    l.reload(config(dir.path(), BUDGETS)).unwrap();
    let s = row(&l, "openai", "1d");
    assert_eq!((s.spend, s.credited), (usd("0.3"), usd("0.5")));
    drop(l);

    // Removed at the restart, then brought back by a reload: the stored credit series
    // resumes with the budget.
    let l = support::open(
        config(dir.path(), "    - {tag: team-a, limit: 5, period: 1d}\n"),
        &clock,
    );
    l.reload(config(dir.path(), BUDGETS)).unwrap();
    let s = row(&l, "openai", "1d");
    assert_eq!((s.spend, s.credited), (usd("0.3"), usd("0.5")));
}

#[test]
fn concurrent_credits_never_credit_more_than_was_spent() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    l.charge(Spend::provider("openai", usd("1"))).unwrap();
    let ok = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let l = &l;
                s.spawn(move || {
                    l.adjust(Adjustment::credit(
                        "openai",
                        usd("0.2"),
                        format!("refund {i}"),
                    ))
                    .is_ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&ok| ok)
            .count()
    });
    assert_eq!(ok, 5, "five credits of 0.2 fit in a spend of 1");
    let s = row(&l, "openai", "1d");
    assert_eq!((s.spend, s.credited), (Money::ZERO, usd("1")));
    assert_eq!(l.audit().unwrap().len(), 5);
}
