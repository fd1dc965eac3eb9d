//! Runtime budgets on one node: `Limiter::put_budget`, `delete_budget`, `runtime_budgets`.
//! Durable across a restart, refused for a series the config file defines, kept by a reload
//! (and shadowed while the file defines their series), a delete keeps the spend and a put
//! resumes it, a put beyond the process's series bound is refused, fields are validated as
//! the file's.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use std::path::Path;

use provider_budgets::{
    BudgetConfig, BudgetError, BudgetFields, Config, FakeClock, Limiter, Money, Period, Scope,
    Spend, StatusQuery, NO_TAGS, RELOAD_SLOTS,
};

const NOW: &str = "2024-06-01T12:00:00Z";
const FILE: &str = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn open(dir: &Path, yaml: &str) -> Limiter {
    support::open(
        support::yaml(yaml, dir),
        &FakeClock::new(NOW.parse().unwrap()),
    )
}

fn budget(scope: Scope, name: &str, limit: &str, period: &str) -> BudgetConfig {
    BudgetConfig::from_fields(scope, name, &BudgetFields::new(limit, period)).unwrap()
}

/// (limit, spend) in nanos of the budget `scope` `name` (its only period), if it applies.
fn row(l: &Limiter, scope: Scope, name: &str) -> Option<(u64, u64)> {
    let rows = l.status(StatusQuery::all().scope(scope).name(name));
    assert!(rows.len() <= 1, "{rows:?}");
    rows.first()
        .map(|s| (s.limit.as_nanos(), s.spend.as_nanos()))
}

const TEAM: &[&str] = &["team-a"];

fn charge_team(l: &Limiter, cost: &str) -> usize {
    l.charge(Spend::deployment("gpt-4o", usd(cost)).tags(TEAM))
        .unwrap()
        .wait()
        .unwrap()
}

#[test]
fn a_put_applies_at_once_a_get_lists_it_and_a_delete_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), FILE);
    assert_eq!(charge_team(&l, "1"), 1, "only openai's budget");

    let c = l
        .put_budget(budget(Scope::Tag, "team-a", "2", "1d"))
        .unwrap();
    assert_eq!(
        (
            c.scope,
            c.name.as_str(),
            c.period_key.as_str(),
            c.version,
            c.deleted
        ),
        (Scope::Tag, "team-a", "1d", 1, false)
    );
    assert_eq!(c.node, l.node_id());
    assert!(!c.replicated, "no Redis");
    assert_eq!(row(&l, Scope::Tag, "team-a"), Some((2_000_000_000, 0)));
    assert_eq!(charge_team(&l, "2"), 2, "openai's and team-a's");
    let err = l.filter(&["gpt-4o"], TEAM).unwrap_err();
    assert!(err.to_string().contains("tag team-a"), "{err}");
    assert_eq!(l.filter(&["gpt-4o"], NO_TAGS).unwrap().len(), 1);

    let listed = l.runtime_budgets();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].budget.name.as_str(),
            listed[0].version,
            listed[0].shadowed
        ),
        ("team-a", 1, false)
    );
    assert_eq!(l.config().budgets.len(), 2);
    assert_eq!(l.base_config().budgets.len(), 1);

    // The same put again changes nothing; a changed limit is a new version, same series.
    let again = l
        .put_budget(budget(Scope::Tag, "team-a", "2", "1d"))
        .unwrap();
    assert_eq!(again.version, 1);
    let raised = l
        .put_budget(budget(Scope::Tag, "team-a", "5", "1d"))
        .unwrap();
    assert_eq!(raised.version, 2);
    assert_eq!(
        row(&l, Scope::Tag, "team-a"),
        Some((5_000_000_000, 2_000_000_000))
    );
    assert_eq!(l.filter(&["gpt-4o"], TEAM).unwrap().len(), 1);

    let gone = l.delete_budget(Scope::Tag, "team-a", None).unwrap();
    assert_eq!((gone.version, gone.deleted), (3, true));
    assert_eq!(row(&l, Scope::Tag, "team-a"), None);
    assert!(l.runtime_budgets().is_empty());
    assert_eq!(charge_team(&l, "1"), 1);
    assert!(matches!(
        l.delete_budget(Scope::Tag, "team-a", None),
        Err(BudgetError::NotFound { .. })
    ));
}

#[test]
fn runtime_budgets_survive_a_restart_with_their_spend() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), FILE);
    l.put_budget(budget(Scope::Model, "gpt-4o", "3", "1h"))
        .unwrap();
    l.put_budget(budget(Scope::Tag, "gone", "1", "1d")).unwrap();
    l.delete_budget(Scope::Tag, "gone", None).unwrap();
    assert_eq!(charge_team(&l, "1.5"), 2);
    drop(l);

    let l = open(dir.path(), FILE);
    assert_eq!(
        row(&l, Scope::Model, "gpt-4o"),
        Some((3_000_000_000, 1_500_000_000))
    );
    assert_eq!(row(&l, Scope::Tag, "gone"), None);
    assert_eq!(l.runtime_budgets().len(), 1);
    // Versions go on from the stored ones.
    let c = l.put_budget(budget(Scope::Tag, "new", "1", "1d")).unwrap();
    assert_eq!(c.version, 4);
}

#[test]
fn a_series_the_file_defines_is_refused_and_the_file_shadows_a_runtime_one() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), FILE);
    let e = l
        .put_budget(budget(Scope::Provider, "openai", "1", "1d"))
        .unwrap_err();
    assert!(matches!(e, BudgetError::DefinedByConfig { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("provider \"openai\" (1d) is defined by the config file"),
        "{e}"
    );
    let e = l
        .delete_budget(Scope::Provider, "openai", Some("1d"))
        .unwrap_err();
    assert!(matches!(e, BudgetError::DefinedByConfig { .. }), "{e}");
    assert_eq!(
        row(&l, Scope::Provider, "openai").map(|r| r.0),
        Some(100_000_000_000)
    );
    // Another period is another series: allowed.
    l.put_budget(budget(Scope::Provider, "openai", "1", "1h"))
        .unwrap();
    assert_eq!(l.status(StatusQuery::provider("openai")).len(), 2);

    // A reload keeps the runtime budgets; one whose series the file now defines is shadowed.
    l.put_budget(budget(Scope::Tag, "team-a", "7", "1d"))
        .unwrap();
    let with_tag =
        format!("{FILE}tag_budget_config:\n  team-a: {{max_budget: 9, budget_duration: 1d}}\n");
    l.reload(support::yaml(&with_tag, dir.path())).unwrap();
    assert_eq!(row(&l, Scope::Tag, "team-a"), Some((9_000_000_000, 0)));
    let shadowed: Vec<bool> = l.runtime_budgets().iter().map(|r| r.shadowed).collect();
    assert_eq!(shadowed, [false, true], "provider openai 1h, tag team-a");
    assert!(matches!(
        l.put_budget(budget(Scope::Tag, "team-a", "8", "1d")),
        Err(BudgetError::DefinedByConfig { .. })
    ));
    // The file drops it again: the runtime budget applies again, unchanged.
    l.reload(support::yaml(FILE, dir.path())).unwrap();
    assert_eq!(
        row(&l, Scope::Tag, "team-a").map(|r| r.0),
        Some(7_000_000_000)
    );
    assert_eq!(l.status(StatusQuery::all()).len(), 3);
}

#[test]
fn a_deleted_budget_keeps_its_spend_and_a_put_resumes_the_series() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), FILE);
    l.put_budget(budget(Scope::Tag, "team-a", "10", "1d"))
        .unwrap();
    charge_team(&l, "3");
    l.delete_budget(Scope::Tag, "team-a", Some("1d")).unwrap();
    assert_eq!(charge_team(&l, "4"), 1, "not counted while deleted");
    l.put_budget(budget(Scope::Tag, "team-a", "10", "1d"))
        .unwrap();
    assert_eq!(
        row(&l, Scope::Tag, "team-a"),
        Some((10_000_000_000, 3_000_000_000))
    );
    // The same after a restart while deleted.
    l.delete_budget(Scope::Tag, "team-a", None).unwrap();
    drop(l);
    let l = open(dir.path(), FILE);
    assert_eq!(row(&l, Scope::Tag, "team-a"), None);
    l.put_budget(budget(Scope::Tag, "team-a", "3", "1d"))
        .unwrap();
    assert_eq!(
        row(&l, Scope::Tag, "team-a"),
        Some((3_000_000_000, 3_000_000_000))
    );
    assert!(l.filter(&["gpt-4o"], TEAM).is_err(), "3 of 3 spent");
}

#[test]
fn several_periods_need_the_period_to_delete_and_bad_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), FILE);
    l.put_budget(budget(Scope::Tag, "t", "1", "1d")).unwrap();
    let mut berlin = BudgetFields::new("1", "1d");
    berlin.time_zone = Some("Europe/Berlin".into());
    l.put_budget(BudgetConfig::from_fields(Scope::Tag, "t", &berlin).unwrap())
        .unwrap();
    let e = l.delete_budget(Scope::Tag, "t", None).unwrap_err();
    assert!(
        matches!(&e, BudgetError::Ambiguous { periods, .. } if periods == &["1d", "1d@Europe/Berlin"]),
        "{e}"
    );
    // "1d" is the period of both, and the whole period part of one: that one goes.
    l.delete_budget(Scope::Tag, "t", Some("1d")).unwrap();
    let left: Vec<String> = l
        .runtime_budgets()
        .into_iter()
        .map(|r| r.period_key)
        .collect();
    assert_eq!(left, ["1d@Europe/Berlin"]);
    l.delete_budget(Scope::Tag, "t", Some("1d")).unwrap();
    assert!(l.runtime_budgets().is_empty());

    // A budget built in code is checked as the file checks one.
    let bad = BudgetConfig::new(Scope::Tag, "a{b", usd("1"), "1d".parse::<Period>().unwrap());
    let e = l.put_budget(bad).unwrap_err();
    assert!(
        matches!(e, BudgetError::Invalid(_)) && e.to_string().contains("the name is not allowed"),
        "{e}"
    );
    assert!(l.runtime_budgets().is_empty());
}

#[test]
fn a_put_beyond_the_series_a_process_can_add_is_refused_naming_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), FILE);
    // A reload adds all but one of the series a process can add.
    let mut config: Config = support::yaml(FILE, dir.path());
    let day: Period = "1d".parse().unwrap();
    for i in 0..RELOAD_SLOTS - 1 {
        config.budgets.push(BudgetConfig::new(
            Scope::Tag,
            format!("t{i}"),
            usd("1"),
            day,
        ));
    }
    l.reload(config).unwrap();
    l.put_budget(budget(Scope::Tag, "last", "1", "1d")).unwrap();
    let e = l
        .put_budget(budget(Scope::Tag, "one-more", "1", "1d"))
        .unwrap_err();
    assert!(
        matches!(e, BudgetError::NoRoom { bound, .. } if bound == RELOAD_SLOTS),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("at most {RELOAD_SLOTS} budget series")),
        "{e}"
    );
    assert_eq!(row(&l, Scope::Tag, "one-more"), None);
    // A series that already has its slot still fits: a changed limit, a deleted one put back.
    l.put_budget(budget(Scope::Tag, "last", "2", "1d")).unwrap();
    l.delete_budget(Scope::Tag, "last", None).unwrap();
    l.put_budget(budget(Scope::Tag, "last", "3", "1d")).unwrap();
    assert_eq!(
        row(&l, Scope::Tag, "last").map(|r| r.0),
        Some(3_000_000_000)
    );
    // After a restart every series has its slot from the start: room again.
    drop(l);
    let l = open(dir.path(), FILE);
    l.put_budget(budget(Scope::Tag, "one-more", "1", "1d"))
        .unwrap();
}
