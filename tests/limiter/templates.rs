//! Templates: an identity budget named `"*"` gives each distinct name its own series, made on
//! first charge or reservation, counted, stored, reported and bounded (`max_series`) like any
//! budget; an explicit budget of a name wins for its period. No Redis (the fleet side is in
//! `tests/fleet/templates.rs`).
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{
    BudgetConfig, Config, FakeClock, Identity, Limiter, Money, Period, ReserveError, Scope, Spend,
    StatusQuery, NO_TAGS,
};

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn clock() -> FakeClock {
    FakeClock::new("2026-03-10T12:00:00Z".parse::<Timestamp>().unwrap())
}

fn open(yaml: &str, dir: &tempfile::TempDir, clock: &FakeClock) -> Limiter {
    support::open(support::yaml(yaml, dir.path()), clock)
}

const D: [&str; 1] = ["openai/gpt-4o"];

fn key(name: &str) -> Identity<'_> {
    Identity::new().key(name)
}

fn passes(l: &Limiter, id: &Identity<'_>) -> bool {
    l.filter_for(&D, NO_TAGS, id).is_ok()
}

fn charge(l: &Limiter, id: &Identity<'_>, cost: &str) {
    l.charge(Spend::provider("openai", usd(cost)).identity(id))
        .unwrap()
        .wait()
        .unwrap();
}

/// (name, period, spend, limit) of every row of `scope`.
fn rows(l: &Limiter, scope: Scope) -> Vec<(String, String, Money, Money)> {
    l.status(StatusQuery::all().scope(scope))
        .into_iter()
        .map(|s| (s.name, s.period_key, s.spend, s.limit))
        .collect()
}

const TEMPLATE: &str = "\
provider_budgets:
  budgets:
    - {provider: openai, limit: 1000, period: 1d}
    - {key: \"*\", limit: 1, period: 1d}
";

#[test]
fn each_name_gets_its_own_series_counted_and_reported() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(TEMPLATE, &dir, &clock);
    let (a, b) = (key("a"), key("b"));
    assert!(passes(&l, &a) && passes(&l, &b), "new names pass");
    charge(&l, &a, "0.6");
    charge(&l, &a, "0.4");
    assert!(!passes(&l, &a), "a spent its 1 USD");
    assert!(passes(&l, &b), "b has a series of its own");
    charge(&l, &b, "0.25");
    let err = l.filter_for(&D, NO_TAGS, &a).unwrap_err();
    assert_eq!(err.exceeded[0].name, "a");
    assert_eq!(err.exceeded[0].scope, Scope::Key);
    assert_eq!(
        rows(&l, Scope::Key),
        [
            ("*".into(), "1d".into(), Money::ZERO, usd("1")),
            ("a".into(), "1d".into(), usd("1"), usd("1")),
            ("b".into(), "1d".into(), usd("0.25"), usd("1")),
        ],
        "the template's own row counts nothing; each name's row counts its spend"
    );
    // Without the templates' series: the configured budgets only (the template's own row).
    let configured: Vec<String> = l
        .status(StatusQuery::all().without_templated())
        .into_iter()
        .map(|s| s.provider)
        .collect();
    assert_eq!(configured, ["openai", "key:*"]);
    assert!(l
        .status(StatusQuery::all().scope(Scope::Key))
        .iter()
        .all(|s| s.templated == (s.name != "*")));
    // The spend counts in the provider budget too, once per charge.
    assert_eq!(
        l.status(StatusQuery::provider("openai"))[0].spend,
        usd("1.25")
    );
    // Status by name pages through the template's series as through any budget.
    let b_rows = l.status(StatusQuery::all().scope(Scope::Key).name("b"));
    assert_eq!(b_rows.len(), 1);
    assert_eq!(b_rows[0].spend, usd("0.25"));
    // A request for "a" reports its key budget among those it counts against.
    let for_a = l.status(StatusQuery::deployment(&D[0]).identity(&a));
    assert!(for_a.iter().any(|s| s.scope == Scope::Key && s.name == "a"));
}

#[test]
fn a_new_window_starts_each_series_at_zero() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(TEMPLATE, &dir, &clock);
    charge(&l, &key("a"), "1");
    assert!(!passes(&l, &key("a")));
    clock.advance(SignedDuration::from_hours(24));
    assert!(passes(&l, &key("a")), "the next day is a new window");
}

#[test]
fn an_explicit_budget_wins_for_its_name_and_period_only() {
    let yaml = "\
provider_budgets:
  budgets:
    - {key: \"*\", limit: 1, period: 1d}
    - {key: \"*\", limit: 3, period: 1mo}
    - {key: vip, limit: 5, period: 1d}
";
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(yaml, &dir, &clock);
    let vip = key("vip");
    charge(&l, &vip, "2");
    assert!(
        passes(&l, &vip),
        "vip's own daily 5 USD, not the template's 1"
    );
    charge(&l, &vip, "1.5");
    assert!(
        !passes(&l, &vip),
        "the template's monthly 3 USD still applies to vip"
    );
    let vip_rows: Vec<_> = rows(&l, Scope::Key)
        .into_iter()
        .filter(|r| r.0 == "vip")
        .collect();
    assert_eq!(
        vip_rows,
        [
            ("vip".into(), "1d".into(), usd("3.5"), usd("5")),
            ("vip".into(), "1mo".into(), usd("3.5"), usd("3")),
        ],
        "one series per period: the explicit daily one, the templated monthly one"
    );
}

#[test]
fn max_series_refuses_a_new_name_clearly_and_idle_names_leave() {
    let yaml = "\
provider_budgets:
  budgets:
    - {provider: openai, limit: 1000, period: 1d}
    - {key: \"*\", limit: 1, period: 1h, max_series: 2}
";
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(yaml, &dir, &clock);
    charge(&l, &key("a"), "0.1");
    charge(&l, &key("b"), "0.1");
    let c = key("c");
    let err = l.filter_for(&D, NO_TAGS, &c).unwrap_err();
    let why = err.template_refused.clone().unwrap();
    assert!(
        why.contains("key \"c\"") && why.contains("max_series"),
        "{why}"
    );
    assert!(err.to_string().contains("Refused by a template"), "{err}");
    match l.reserve(&D, usd("0.1")).identity(&c).wait() {
        Err(ReserveError::Denied(d)) => assert!(d.template_refused.is_some()),
        other => panic!("reserve of a new name past max_series: {other:?}"),
    }
    // A charge for it still counts in every other budget, and not in the template.
    charge(&l, &c, "0.5");
    assert_eq!(
        l.status(StatusQuery::provider("openai"))[0].spend,
        usd("0.7")
    );
    assert!(!rows(&l, Scope::Key).iter().any(|r| r.0 == "c"));
    // Known names keep working.
    assert!(passes(&l, &key("a")));
    // Once a and b are idle (their hour ended, nothing held), a new name takes their room.
    clock.advance(SignedDuration::from_hours(1));
    charge(&l, &c, "0.3");
    let names: Vec<String> = rows(&l, Scope::Key).into_iter().map(|r| r.0).collect();
    assert_eq!(names, ["*", "c"], "a and b left the table");
    // A name coming back finds its series again: the hour it spent in is still there.
    charge(&l, &key("a"), "0.2");
    let earlier = l.now() - SignedDuration::from_mins(30);
    let a_then = l.status(StatusQuery::all().scope(Scope::Key).name("a").at(earlier));
    assert_eq!(a_then[0].spend, usd("0.1"));
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("0.2"), "a's current hour");
}

#[test]
fn a_held_reservation_keeps_its_name_live() {
    let yaml = "\
provider_budgets:
  reservation_timeout: 2h
  budgets:
    - {key: \"*\", limit: 1, period: 1h, max_series: 1}
";
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(yaml, &dir, &clock);
    let held = l
        .reserve(&D, usd("0.5"))
        .identity(&key("a"))
        .wait()
        .unwrap();
    clock.advance(SignedDuration::from_hours(1));
    assert!(
        l.filter_for(&D, NO_TAGS, &key("b")).is_err(),
        "a's window ended but a reservation still holds money in it"
    );
    held.release().unwrap().wait().unwrap();
    clock.advance(SignedDuration::from_secs(2));
    assert!(l.reserve(&D, usd("0.5")).identity(&key("b")).wait().is_ok());
}

#[test]
fn a_restart_resumes_every_live_series() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    {
        let l = open(TEMPLATE, &dir, &clock);
        charge(&l, &key("a"), "1");
        charge(&l, &key("b"), "0.5");
    }
    let l = open(TEMPLATE, &dir, &clock);
    assert!(!passes(&l, &key("a")), "a is still spent after the restart");
    assert_eq!(
        rows(&l, Scope::Key)[1..],
        [
            ("a".into(), "1d".into(), usd("1"), usd("1")),
            ("b".into(), "1d".into(), usd("0.5"), usd("1")),
        ]
    );
    // A name whose window ended before the restart does not come back until used.
    drop(l);
    clock.advance(SignedDuration::from_hours(24));
    let l = open(TEMPLATE, &dir, &clock);
    assert_eq!(rows(&l, Scope::Key).len(), 1, "only the template's own row");
    charge(&l, &key("a"), "0.2");
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("0.2"));
}

#[test]
fn a_reload_changes_every_series_and_removing_the_template_frees_them() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(TEMPLATE, &dir, &clock);
    charge(&l, &key("a"), "1");
    assert!(!passes(&l, &key("a")));
    // A reload of anything (here a runtime budget of another scope) keeps the live series:
    // listed, counted toward max_series, and still spent.
    let tag = BudgetConfig::new(Scope::Tag, "t", usd("5"), "1d".parse::<Period>().unwrap());
    l.put_budget(tag).unwrap();
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("1"));
    assert_eq!(l.templates()[0].live_series, 1);
    assert!(!passes(&l, &key("a")), "still spent, before any new charge");
    let raised = TEMPLATE.replace("limit: 1, period: 1d", "limit: 3, period: 1d");
    l.reload(support::yaml(&raised, dir.path())).unwrap();
    assert!(passes(&l, &key("a")), "the new limit applies to a's series");
    assert_eq!(
        rows(&l, Scope::Key)[1].3,
        usd("3"),
        "at once, in status too"
    );
    charge(&l, &key("a"), "1.5");
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("2.5"), "the same series");
    let gone = "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 1000, period: 1d}\n";
    l.reload(support::yaml(gone, dir.path())).unwrap();
    charge(&l, &key("a"), "5");
    assert!(passes(&l, &key("a")), "no template, no key budget");
    assert!(rows(&l, Scope::Key).is_empty());
    // Back again: the series resumes with what it had (the charge without a template did
    // not count in it).
    l.reload(support::yaml(&raised, dir.path())).unwrap();
    charge(&l, &key("a"), "0.1");
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("2.6"));
}

#[test]
fn a_runtime_template_applies_to_new_names() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(
        "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 1000, period: 1d}\n",
        &dir,
        &clock,
    );
    let mut t = BudgetConfig::new(Scope::Team, "*", usd("2"), "1d".parse::<Period>().unwrap());
    t.max_series = Some(10);
    l.put_budget(t).unwrap();
    let research = Identity::new().team("research");
    charge(&l, &research, "2");
    assert!(!passes(&l, &research));
    assert!(passes(&l, &Identity::new().team("sales")));
}

#[test]
fn names_a_template_cannot_count_are_refused_not_dropped() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(TEMPLATE, &dir, &clock);
    let long = "k".repeat(provider_budgets::MAX_TEMPLATED_NAME + 1);
    for name in [long.as_str(), "*", "a{b}"] {
        let err = l.filter_for(&D, NO_TAGS, &key(name)).unwrap_err();
        assert!(err.template_refused.is_some(), "{name}");
        assert!(l
            .reserve(&D, usd("0.1"))
            .identity(&key(name))
            .wait()
            .is_err());
    }
    let zero = "provider_budgets:\n  budgets:\n    - {key: \"*\", limit: 0, period: 1d}\n";
    let dir2 = tempfile::tempdir().unwrap();
    let l = open(zero, &dir2, &clock);
    assert!(
        !passes(&l, &key("new")),
        "a zero limit refuses before any spend"
    );
    let shadow =
        "provider_budgets:\n  budgets:\n    - {key: \"*\", limit: 0, period: 1d, mode: shadow}\n";
    let dir3 = tempfile::tempdir().unwrap();
    let l = open(shadow, &dir3, &clock);
    assert!(passes(&l, &key("new")), "a shadow template never blocks");
}

#[test]
fn templates_read_from_the_config_with_their_bound() {
    let c = Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {customer: \"*\", limit: 10, period: 1mo, max_series: 50000, enforcement: strict}\n",
    )
    .unwrap();
    assert!(c.budgets[0].is_template());
    assert_eq!(c.budgets[0].series_bound(), 50_000);
    let d = Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {user: \"*\", limit: 10, period: 1mo}\n",
    )
    .unwrap();
    assert_eq!(
        d.budgets[0].series_bound(),
        provider_budgets::DEFAULT_MAX_SERIES
    );
}

#[test]
fn concurrent_first_uses_make_one_series_per_name_and_count_exactly() {
    let yaml = "\
provider_budgets:
  budgets:
    - {key: \"*\", limit: 1000, period: 1d, max_series: 150}
";
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(yaml, &dir, &clock);
    // 4 threads charge the same 120 names, each name 0.01 per thread and pass.
    std::thread::scope(|s| {
        for t in 0..4 {
            let l = &l;
            s.spawn(move || {
                for pass in 0..3 {
                    for i in 0..120 {
                        let name = format!("k{}", (i * 7 + t * 13 + pass) % 120);
                        l.charge(Spend::provider("openai", usd("0.01")).identity(&key(&name)))
                            .unwrap();
                    }
                }
            });
        }
    });
    l.flush().unwrap();
    let rows = rows(&l, Scope::Key);
    assert_eq!(
        rows.len(),
        121,
        "the template's row and one per name, no duplicate"
    );
    let total: u64 = rows.iter().map(|r| r.2.as_nanos()).sum();
    assert_eq!(
        total,
        usd("0.01").as_nanos() * 4 * 3 * 120,
        "every charge counted once"
    );
    assert_eq!(l.templates()[0].live_series, 120);
}

#[test]
fn an_explicit_budget_added_or_removed_by_reload_takes_over_the_same_series() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(TEMPLATE, &dir, &clock);
    charge(&l, &key("a"), "0.5");
    let explicit = format!("{TEMPLATE}    - {{key: a, limit: 5, period: 1d}}\n");
    l.reload(support::yaml(&explicit, dir.path())).unwrap();
    charge(&l, &key("a"), "0.75");
    let a_rows: Vec<_> = rows(&l, Scope::Key)
        .into_iter()
        .filter(|r| r.0 == "a")
        .collect();
    assert_eq!(
        a_rows,
        [("a".into(), "1d".into(), usd("1.25"), usd("5"))],
        "one series, counted once, with the explicit limit"
    );
    assert!(passes(&l, &key("a")));
    l.reload(support::yaml(TEMPLATE, dir.path())).unwrap();
    assert!(
        !passes(&l, &key("a")),
        "the template's 1 USD applies at once to the same 1.25, before any new charge"
    );
    charge(&l, &key("a"), "0.01");
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("1.26"));
}

#[test]
fn a_restart_with_a_smaller_max_series_keeps_what_fits_and_loses_no_spend() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    {
        let l = open(TEMPLATE, &dir, &clock);
        for name in ["a", "b", "c"] {
            charge(&l, &key(name), "0.5");
        }
    }
    let smaller = TEMPLATE.replace(
        "limit: 1, period: 1d}",
        "limit: 1, period: 1d, max_series: 2}",
    );
    let l = open(&smaller, &dir, &clock);
    assert_eq!(l.templates()[0].live_series, 2);
    drop(l);
    // Back to the larger bound: all three resume with their spend.
    let l = open(TEMPLATE, &dir, &clock);
    let spends: Vec<Money> = rows(&l, Scope::Key)[1..].iter().map(|r| r.2).collect();
    assert_eq!(spends, [usd("0.5"); 3]);
}

#[test]
fn prepared_lists_and_filter_in_place_see_templated_series() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let l = open(TEMPLATE, &dir, &clock);
    let prepared = l.prepare(&D);
    let mut out = Vec::new();
    prepared
        .filter_into_for(NO_TAGS, &key("a"), &mut out)
        .unwrap();
    assert_eq!(out, [0]);
    charge(&l, &key("a"), "1");
    assert!(prepared.filter_for(NO_TAGS, &key("a")).is_err());
    assert!(prepared.filter_for(NO_TAGS, &key("b")).is_ok());
    let mut list = D.to_vec();
    assert!(l
        .filter_in_place_for(&mut list, NO_TAGS, &key("a"))
        .is_err());
    assert_eq!(list, D, "left unchanged on NoDeployments");
}

#[test]
fn a_credit_names_a_templated_series_by_its_key_name() {
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    {
        let l = open(TEMPLATE, &dir, &clock);
        charge(&l, &key("a"), "1");
    }
    // After a restart the series is live again; before any charge of the window a credit
    // for another key finds nothing to credit (no spend), and for `a` gives back spend.
    let l = open(TEMPLATE, &dir, &clock);
    assert!(!passes(&l, &key("a")));
    let credited = l
        .adjust(provider_budgets::Adjustment::credit(
            "key:a",
            usd("0.4"),
            "refund",
        ))
        .unwrap();
    assert_eq!(credited.budget, "key:a");
    assert!(passes(&l, &key("a")), "spend net of the credit: 0.6 of 1");
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("0.6"));
    assert!(l
        .adjust(provider_budgets::Adjustment::credit(
            "key:zz",
            usd("0.1"),
            "refund"
        ))
        .is_err());
    assert!(
        l.adjust(provider_budgets::Adjustment::credit(
            "user:a",
            usd("0.1"),
            "refund"
        ))
        .is_err(),
        "no user template"
    );
}

#[test]
fn a_name_back_after_a_restart_resumes_its_stored_windows() {
    let yaml = "\
provider_budgets:
  storage: {retention: 1d}
  budgets:
    - {key: \"*\", limit: 1, period: 1h}
";
    let (dir, clock) = (tempfile::tempdir().unwrap(), clock());
    let spent_at = {
        let l = open(yaml, &dir, &clock);
        charge(&l, &key("a"), "0.7");
        l.now()
    };
    clock.advance(SignedDuration::from_hours(2));
    let l = open(yaml, &dir, &clock);
    assert_eq!(
        rows(&l, Scope::Key).len(),
        1,
        "a's hour ended: not restored"
    );
    // Its first charge since reads what is stored for it (by key prefix): the earlier hour.
    charge(&l, &key("a"), "0.1");
    let then = l.status(StatusQuery::all().scope(Scope::Key).name("a").at(spent_at));
    assert_eq!(then[0].spend, usd("0.7"));
    assert_eq!(rows(&l, Scope::Key)[1].2, usd("0.1"));
}
