//! Units: budgets counting tokens, input or output tokens, requests and concurrent requests
//! beside USD ones, on the same engine (exact integers, windows, reservations, restarts).
//! No Redis (the fleet side is in `tests/fleet/units.rs`).
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{
    Config, Estimate, FakeClock, Limiter, Money, ReserveError, Scope, Spend, StatusQuery, Target,
    Unit, Usage, NO_TAGS,
};

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn clock() -> FakeClock {
    FakeClock::new("2026-03-10T12:00:30Z".parse::<Timestamp>().unwrap())
}

fn open(yaml: &str, dir: &std::path::Path, clock: &FakeClock) -> Limiter {
    support::open(support::yaml(yaml, dir), clock)
}

const D: [&str; 1] = ["openai/gpt-4o"];

const UNITS: &str = "\
provider_budgets:
  budgets:
    - {model: gpt-4o, limit: 10, period: 1d}
    - {model: gpt-4o, unit: tokens, limit: 1000, period: 1m}
    - {model: gpt-4o, unit: input_tokens, limit: 700, period: 1m}
    - {model: gpt-4o, unit: output_tokens, limit: 400, period: 1m}
    - {model: gpt-4o, unit: requests, limit: 3, period: 1m}
";

/// (unit, period, spend, limit) of every model budget, spend and limit as raw integers.
fn rows(l: &Limiter) -> Vec<(Unit, String, u64, u64)> {
    let mut out: Vec<_> = l
        .status(StatusQuery::all().scope(Scope::Model))
        .into_iter()
        .map(|s| {
            (
                s.unit,
                s.period.to_string(),
                s.spend.as_nanos(),
                s.limit.as_nanos(),
            )
        })
        .collect();
    out.sort();
    out
}

fn spend_usage<'l>(
    l: &'l Limiter,
    cost: &str,
    input: u64,
    output: u64,
) -> provider_budgets::Receipt<'l> {
    let d = Target::parse(D[0]);
    l.charge(Spend::deployment(&d, usd(cost)).usage(Usage::new(input, output)))
        .unwrap()
}

#[test]
fn each_budget_counts_its_own_unit_of_one_spend() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(UNITS, dir.path(), &clock());
    let r = spend_usage(&l, "0.5", 300, 120);
    assert_eq!(r.budgets(), 5);
    assert!(r.uncounted().is_empty());
    r.wait().unwrap();
    assert_eq!(
        rows(&l),
        vec![
            (Unit::Usd, "1d".into(), 500_000_000, 10_000_000_000),
            (Unit::Tokens, "1m".into(), 420, 1000),
            (Unit::InputTokens, "1m".into(), 300, 700),
            (Unit::OutputTokens, "1m".into(), 120, 400),
            (Unit::Requests, "1m".into(), 1, 3),
        ]
    );
    // Tokens run out first: 840 + 240 output = 1080 >= 1000; the filter refuses.
    spend_usage(&l, "0.5", 300, 120).wait().unwrap();
    assert!(l.filter(&D, NO_TAGS).is_ok(), "840 tokens < 1000");
    spend_usage(&l, "0.1", 100, 80).wait().unwrap();
    let none = l.filter(&D, NO_TAGS).unwrap_err();
    let msg = none.to_string();
    assert!(msg.contains("1020 >= 1000 tokens"), "{msg}");
    assert!(
        msg.contains("3 >= 3 requests"),
        "the requests budget is spent too: {msg}"
    );
    let tokens = none
        .exceeded
        .iter()
        .find(|e| e.unit == Unit::Tokens)
        .unwrap();
    assert_eq!(tokens.period, "1m");
    assert_eq!(tokens.spend.as_nanos(), 1020);
}

#[test]
fn a_spend_without_usage_is_counted_where_it_can_be_and_reported_where_not() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(UNITS, dir.path(), &clock());
    let d = Target::parse(D[0]);
    let r = l.charge(Spend::deployment(&d, usd("2"))).unwrap();
    let uncounted: Vec<(Unit, String)> = r
        .uncounted()
        .into_iter()
        .map(|u| (u.unit, u.period))
        .collect();
    assert_eq!(uncounted.len(), 3, "{uncounted:?}");
    assert!(uncounted.contains(&(Unit::Tokens, "1m".into())));
    assert!(uncounted.contains(&(Unit::InputTokens, "1m".into())));
    r.wait().unwrap();
    let counted: Vec<_> = rows(&l).into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        counted,
        vec![
            (Unit::Usd, 2_000_000_000),
            (Unit::Tokens, 0),
            (Unit::InputTokens, 0),
            (Unit::OutputTokens, 0),
            (Unit::Requests, 1),
        ],
        "never guessed"
    );
}

#[test]
fn unit_totals_survive_a_restart_and_reset_with_their_window() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    {
        let l = open(UNITS, dir.path(), &clock);
        spend_usage(&l, "1", 500, 250).wait().unwrap();
    }
    let l = open(UNITS, dir.path(), &clock);
    let counted: Vec<_> = rows(&l).into_iter().map(|r| r.2).collect();
    assert_eq!(counted, vec![1_000_000_000, 750, 500, 250, 1]);
    clock.advance(SignedDuration::from_secs(60));
    let counted: Vec<_> = rows(&l).into_iter().map(|r| r.2).collect();
    assert_eq!(
        counted,
        vec![1_000_000_000, 0, 0, 0, 0],
        "minute windows reset"
    );
}

#[test]
fn limits_of_counting_units_are_whole_and_concurrent_has_no_period() {
    let cases = [
        (
            "{model: m, unit: tokens, limit: 10.5, period: 1m}",
            "limit: \"10.5\": a tokens limit is a whole number of tokens",
        ),
        (
            "{model: m, unit: concurrent, limit: 4, period: 1m}",
            "a concurrent budget has no period",
        ),
        ("{model: m, unit: tokens, limit: 4}", "period: missing"),
        (
            "{model: m, unit: token, limit: 4, period: 1m}",
            "invalid value \"token\"",
        ),
    ];
    for (budget, culprit) in cases {
        let yaml = format!("provider_budgets:\n  budgets:\n    - {budget}\n");
        let msg = Config::from_yaml_str(&yaml).unwrap_err().to_string();
        assert!(msg.contains(culprit), "{budget}: {msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}

const SLOTS: &str = "\
provider_budgets:
  reservation_timeout: 30s
  budgets:
    - {model: gpt-4o, unit: concurrent, limit: 2}
    - {model: gpt-4o, unit: requests, limit: 100, period: 1h}
";

#[test]
fn concurrent_slots_are_held_until_commit_release_or_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(SLOTS, dir.path(), &clock);
    let a = l.reserve(&D, usd("0.01")).wait().unwrap();
    let b = l.reserve(&D, usd("0.01")).wait().unwrap();
    assert!(l.filter(&D, NO_TAGS).is_err(), "2 of 2 held");
    let refused = l.reserve(&D, usd("0.01")).wait().unwrap_err();
    let ReserveError::Denied(none) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(none.exceeded[0].unit, Unit::Concurrent);
    assert!(
        none.to_string().contains("3 >= 2 concurrent requests"),
        "{none}"
    );
    a.commit(usd("0.02")).unwrap().wait().unwrap();
    assert!(l.filter(&D, NO_TAGS).is_ok(), "a commit frees its slot");
    b.release().unwrap().wait().unwrap();
    let c = l.reserve(&D, usd("0.01")).wait().unwrap();
    let d = l.reserve(&D, usd("0.01")).wait().unwrap();
    assert!(l.filter(&D, NO_TAGS).is_err());
    clock.advance(SignedDuration::from_secs(32));
    provider_budgets::testing::maintain(&l).unwrap();
    assert!(l.filter(&D, NO_TAGS).is_ok(), "expiry frees the slots");
    assert!(matches!(
        c.commit(usd("0.01")),
        Err(ReserveError::Expired { .. })
    ));
    drop(d);
    let held: Vec<_> = l
        .status(StatusQuery::all().scope(Scope::Model))
        .into_iter()
        .map(|s| (s.unit, s.spend.as_nanos(), s.reserved.as_nanos()))
        .collect();
    // Requests: a's commit and c, d's expiry count 1 each; b's release nothing.
    assert!(held.contains(&(Unit::Concurrent, 0, 0)), "{held:?}");
    assert!(held.contains(&(Unit::Requests, 3, 0)), "{held:?}");
}

/// The child of the crash test: holds both slots, says `held`, and waits to be killed.
#[test]
fn slots_child() {
    let Ok(dir) = std::env::var("UNITS_SLOTS_CHILD_DIR") else {
        return; // not the child
    };
    let l = open(SLOTS, std::path::Path::new(&dir), &clock());
    let held = [
        l.reserve(&D, usd("0.01")).wait().unwrap(),
        l.reserve(&D, usd("0.01")).wait().unwrap(),
    ];
    println!("\nheld");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line); // killed before stdin closes
    drop(held);
}

#[test]
fn a_sigkilled_process_frees_its_slots_and_counts_its_requests() {
    use provider_budgets_test_support::child::{sigkill, spawn_piped};
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "units::slots_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("UNITS_SLOTS_CHILD_DIR", dir.path());
    let (mut child, _stdin, mut out) = spawn_piped(cmd);
    loop {
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "child died");
        if line.trim_end() == "held" {
            break;
        }
    }
    sigkill(&mut child);
    let l = open(SLOTS, dir.path(), &clock());
    assert!(
        l.filter(&D, NO_TAGS).is_ok(),
        "a dead process holds no slot"
    );
    let counted: Vec<_> = l
        .status(StatusQuery::all().scope(Scope::Model))
        .into_iter()
        .map(|s| (s.unit, s.spend.as_nanos(), s.reserved.as_nanos()))
        .collect();
    assert!(counted.contains(&(Unit::Requests, 2, 0)), "{counted:?}");
    assert!(counted.contains(&(Unit::Concurrent, 0, 0)), "{counted:?}");
    assert_eq!(l.health().open_reservations, 0);
}

#[test]
fn reservations_hold_each_unit_its_estimate_and_commits_count_usage() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(UNITS, dir.path(), &clock());
    let est = Estimate::new(usd("0.1"), Some(600));
    let a = l.reserve(&D, Money::ZERO).estimate(est).wait().unwrap();
    assert_eq!(a.estimates().tokens, Some(600));
    let refused = l.reserve(&D, Money::ZERO).estimate(est).wait().unwrap_err();
    assert!(
        refused.to_string().contains("1200 >= 1000 tokens"),
        "600 held + 600 asked: {refused}"
    );
    let r = a.commit_usage(usd("0.05"), Usage::new(200, 100)).unwrap();
    assert!(r.uncounted().is_empty());
    r.wait().unwrap();
    let counted: Vec<_> = rows(&l).into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        counted,
        vec![
            (Unit::Usd, 50_000_000),
            (Unit::Tokens, 300),
            (Unit::InputTokens, 200),
            (Unit::OutputTokens, 100),
            (Unit::Requests, 1),
        ]
    );
    // A commit without usage: token budgets count nothing, and say so.
    let b = l.reserve(&D, Money::ZERO).estimate(est).wait().unwrap();
    let r = b.commit(usd("0.05")).unwrap();
    assert_eq!(r.uncounted().len(), 3);
    r.wait().unwrap();
    assert_eq!(rows(&l)[1].2, 300, "tokens unchanged, the estimate freed");
    assert_eq!(rows(&l)[4].2, 2, "requests count the commit");
}

#[test]
fn litellm_tpm_rpm_and_max_parallel_requests_become_deployment_budgets() {
    let yaml = "\
model_list:
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o, tpm: 100000, rpm: 60, max_parallel_requests: 4}
    model_info: {id: gpt4o-east}
";
    let dir = tempfile::tempdir().unwrap();
    let l = open(yaml, dir.path(), &clock());
    let mut budgets: Vec<_> = l
        .status(StatusQuery::all())
        .into_iter()
        .map(|s| (s.scope, s.name, s.unit, s.limit.as_nanos()))
        .collect();
    budgets.sort();
    let id = "gpt4o-east".to_owned();
    assert_eq!(
        budgets,
        vec![
            (Scope::Deployment, id.clone(), Unit::Tokens, 100_000),
            (Scope::Deployment, id.clone(), Unit::Requests, 60),
            (Scope::Deployment, id.clone(), Unit::Concurrent, 4),
        ]
    );
    let d = Target::from_parts("openai/gpt-4o", None::<String>, Some(id));
    let held: Vec<_> = (0..4)
        .map(|_| {
            l.reserve(std::slice::from_ref(&d), usd("0"))
                .wait()
                .unwrap()
        })
        .collect();
    assert!(
        l.filter(std::slice::from_ref(&d), NO_TAGS).is_err(),
        "4 in flight"
    );
    drop(held);
    assert!(l
        .filter_for(
            std::slice::from_ref(&d),
            NO_TAGS,
            &provider_budgets::Identity::NONE
        )
        .is_ok());
    let msg = Config::from_yaml_str(
        "model_list:\n  - litellm_params: {model: openai/gpt-4o, rpm: 1.5}\n    model_info: {id: x}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        msg.contains("litellm_params.rpm") && msg.contains("whole number"),
        "{msg}"
    );
}

#[test]
fn the_largest_counts_saturate_and_never_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(UNITS, dir.path(), &clock());
    spend_usage(&l, "0", u64::MAX, u64::MAX).wait().unwrap();
    spend_usage(&l, "0", 1, 1).wait().unwrap();
    let counted: Vec<_> = rows(&l).into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        counted,
        vec![
            (Unit::Usd, 0),
            (Unit::Tokens, u64::MAX),
            (Unit::InputTokens, u64::MAX),
            (Unit::OutputTokens, u64::MAX),
            (Unit::Requests, 2),
        ]
    );
    assert!(l.filter(&D, NO_TAGS).is_err());
    let est = Estimate::new(Money::ZERO, Some(u64::MAX)).split(Some(u64::MAX), Some(u64::MAX));
    assert!(l.reserve(&D, Money::ZERO).estimate(est).wait().is_err());
}

#[test]
fn a_template_of_concurrent_slots_gives_each_key_its_own() {
    let yaml = "\
provider_budgets:
  budgets:
    - {key: \"*\", unit: concurrent, limit: 1}
    - {key: \"*\", unit: tokens, limit: 100, period: 1h}
";
    let dir = tempfile::tempdir().unwrap();
    let l = open(yaml, dir.path(), &clock());
    let a = provider_budgets::Identity::new().key("a");
    let b = provider_budgets::Identity::new().key("b");
    let held = l.reserve(&D, Money::ZERO).identity(&a).wait().unwrap();
    assert!(
        l.filter_for(&D, NO_TAGS, &a).is_err(),
        "a's one slot is held"
    );
    assert!(l.filter_for(&D, NO_TAGS, &b).is_ok(), "b has its own");
    let d = Target::parse(D[0]);
    let r = l
        .charge(
            Spend::deployment(&d, Money::ZERO)
                .usage(Usage::new(150, 0))
                .identity(&b),
        )
        .unwrap();
    assert!(r.uncounted().is_empty());
    r.wait().unwrap();
    assert!(
        l.filter_for(&D, NO_TAGS, &b).is_err(),
        "b's tokens are spent"
    );
    held.release().unwrap().wait().unwrap();
    assert!(l.filter_for(&D, NO_TAGS, &a).is_ok());
}

#[test]
fn a_reload_that_changes_a_unit_starts_a_new_series_and_keeps_the_old_one_apart() {
    let dir = tempfile::tempdir().unwrap();
    let config = |unit: &str| {
        let yaml = format!(
            "provider_budgets:\n  budgets:\n    - {{model: gpt-4o, unit: {unit}, limit: 100, period: 1h}}\n"
        );
        support::yaml(&yaml, dir.path())
    };
    let l = support::open(config("tokens"), &clock());
    spend_usage(&l, "1", 60, 0).wait().unwrap();
    l.reload(config("requests")).unwrap();
    spend_usage(&l, "1", 60, 0).wait().unwrap();
    let counted: Vec<_> = rows(&l).into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(counted, vec![(Unit::Requests, 1)], "a new series");
    l.reload(config("tokens")).unwrap();
    let counted: Vec<_> = rows(&l).into_iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        counted,
        vec![(Unit::Tokens, 60)],
        "the tokens series, as it was"
    );
}

#[test]
fn shadow_and_soft_limits_work_in_tokens() {
    let yaml = "\
provider_budgets:
  budgets:
    - {model: gpt-4o, unit: tokens, limit: 100, period: 1h, soft_limits: [0.5], mode: shadow}
";
    let dir = tempfile::tempdir().unwrap();
    let l = open(yaml, dir.path(), &clock());
    let crossed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&crossed);
    l.on_soft_limit(move |e| {
        seen.lock()
            .unwrap()
            .push((e.spend.as_nanos(), e.limit.as_nanos()))
    });
    spend_usage(&l, "0", 40, 0).wait().unwrap();
    assert!(crossed.lock().unwrap().is_empty());
    spend_usage(&l, "0", 30, 0).wait().unwrap();
    assert_eq!(
        *crossed.lock().unwrap(),
        vec![(70, 100)],
        "crossed at 50 tokens, once"
    );
    spend_usage(&l, "0", 60, 0).wait().unwrap();
    assert!(
        l.filter(&D, NO_TAGS).is_ok(),
        "a shadow budget never refuses"
    );
    let s = &l.status(StatusQuery::all())[0];
    assert_eq!((s.spend.as_nanos(), s.would_deny), (130, 1));
}

#[test]
fn a_count_limit_may_be_any_u64() {
    let yaml = "provider_budgets:\n  budgets:\n    - {model: gpt-4o, unit: tokens, limit: 18446744073709551615, period: 1d}\n    - {model: gpt-4o, unit: requests, limit: \"1000000000000\", period: 1d}\n";
    let dir = tempfile::tempdir().unwrap();
    let l = open(yaml, dir.path(), &clock());
    let mut limits: Vec<u64> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| s.limit.as_nanos())
        .collect();
    limits.sort_unstable();
    assert_eq!(limits, vec![1_000_000_000_000, u64::MAX]);
    let msg = Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {model: m, unit: tokens, limit: 18446744073709551616, period: 1d}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("limit"), "{msg}");
}
