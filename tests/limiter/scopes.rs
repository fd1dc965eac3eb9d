//! Budget model v2: budgets per provider, deployment, model and tag, several per
//! scope name, per-budget time zones, shadow mode, soft limits; one resolution for `filter`
//! and `charge`; `Prepared` does not keep the limiter alive; data dirs of the previous
//! release open unchanged.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{
    BudgetConfig, Config, ConfigError, Exceeded, FakeClock, Limiter, Mode, Money, Scope, SoftLimit,
    SoftLimitCrossed, Target, NO_TAGS,
};
use provider_budgets::{Spend, StatusQuery};

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn open(yaml: &str, dir: &tempfile::TempDir, clock: &FakeClock) -> Limiter {
    support::open(support::yaml(yaml, dir.path()), clock)
}

/// The issue's example, every source combined.
const ISSUE_YAML: &str = "\
provider_budget_config:
  openai: {budget_limit: 100, time_period: 1d}
tag_budget_config:
  team-a: {max_budget: 50, budget_duration: 1d}
model_list:
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o, max_budget: 10, budget_duration: 1d, api_key: os.environ/SURELY_UNSET_KEY}
    model_info: {id: gpt4o-east}
  - model_name: gpt
    litellm_params: {model: azure/gpt-4o}
provider_budgets:
  time_zone: America/New_York
  budgets:
    - {provider: openai, limit: 2000, period: 1mo}
    - {model: gpt-4o, limit: 300, period: 1w}
    - {tag: team-a, limit: 5, period: 1h, soft_limits: [0.9, 0.5], mode: shadow, time_zone: Europe/Berlin}
";

#[test]
fn the_issues_config_reads_into_one_sorted_budget_list() {
    let c = Config::from_yaml_str(ISSUE_YAML).unwrap();
    let rows: Vec<(Scope, &str, String, Money)> = c
        .budgets
        .iter()
        .map(|b| (b.scope, b.name.as_str(), b.period.to_string(), b.limit))
        .collect();
    assert_eq!(
        rows,
        [
            (Scope::Provider, "openai", "1d".into(), usd("100")),
            (Scope::Provider, "openai", "1mo".into(), usd("2000")),
            (Scope::Deployment, "gpt4o-east", "1d".into(), usd("10")),
            (Scope::Model, "gpt-4o", "1w".into(), usd("300")),
            (Scope::Tag, "team-a", "1d".into(), usd("50")),
            (Scope::Tag, "team-a", "1h".into(), usd("5")),
        ]
    );
    let tag = &c.budgets[5];
    assert_eq!(tag.mode, Mode::Shadow);
    assert_eq!(tag.time_zone.as_deref(), Some("Europe/Berlin"));
    // Sorted and exact.
    assert_eq!(
        tag.soft_limits,
        [SoftLimit::new(0.5).unwrap(), SoftLimit::new(0.9).unwrap()]
    );
    // Keys: provider budgets keep the keys of earlier versions; the others carry the scope;
    // a fixed-length period does not depend on the zone.
    assert_eq!(c.budgets[0].key_parts(), ("openai".into(), "1d".into()));
    assert_eq!(
        c.budgets[2].key_parts(),
        ("deployment:gpt4o-east".into(), "1d".into())
    );
    assert_eq!(tag.key_parts(), ("tag:team-a".into(), "1h".into()));
    let berlin_day = BudgetConfig::new(Scope::Tag, "t", usd("1"), "1d".parse().unwrap())
        .in_time_zone("Europe/Berlin");
    assert_eq!(
        berlin_day.key_parts(),
        ("tag:t".into(), "1d@Europe/Berlin".into())
    );
    assert!(c.warning().is_none(), "{:?}", c.warning());
}

#[test]
fn both_litellm_spellings_and_unimplemented_keys_are_listed_once() {
    let c = Config::from_yaml_str(
        "\
provider_budget_config:
  openai: {max_budget: 1, budget_duration: 1d, soft_budget: 0.5}
router_settings:
  tag_budget_config:
    product:chat-bot: {budget_limit: 2, time_period: 1h, tpm_limit: 10}
",
    )
    .unwrap();
    assert_eq!(c.budgets.len(), 2);
    assert_eq!(c.budgets[1].name, "product:chat-bot");
    assert_eq!(
        c.warning().unwrap(),
        "config: litellm keys not implemented by provider-budgets (ignored): \
         provider_budget_config.openai.soft_budget, \
         router_settings.tag_budget_config.product:chat-bot.tpm_limit"
    );
    // litellm's proxy reads tag budgets from litellm_settings.
    let c = Config::from_yaml_str(
        "litellm_settings:\n  tag_budget_config:\n    t: {max_budget: 1, budget_duration: 1d}\n",
    )
    .unwrap();
    assert_eq!(c.budgets[0].scope, Scope::Tag);
}

#[test]
fn bad_budgets_are_one_line_naming_the_culprit() {
    let err = |yaml: &str| Config::from_yaml_str(yaml).unwrap_err().to_string();
    let cases = [
        (
            "model_list:\n  - litellm_params: {model: openai/gpt-4o, max_budget: 1, budget_duration: 1d}\n",
            "model_list[0]: model_info.id: missing",
        ),
        (
            "model_list:\n  - litellm_params: {model: x, max_budget: 1}\n    model_info: {id: a}\n",
            "model_list[0]: litellm_params.budget_duration: missing",
        ),
        (
            "provider_budgets:\n  budgets:\n    - {tag: a, model: b, limit: 1, period: 1d}\n",
            "provider_budgets.budgets[0]: scope: give one of provider, deployment, model, tag, key, user, team, org or customer, not both model and tag",
        ),
        (
            "provider_budgets:\n  budgets:\n    - {tag: a, limit: 1, period: 1d, soft_limits: [1.5]}\n",
            "provider_budgets.budgets[0]: soft_limits: 1.5 is not a fraction in (0, 1]",
        ),
        (
            "provider_budgets:\n  budgets:\n    - {tag: a, limit: 1, period: 1d, time_zone: Mars/Olympus}\n",
            "provider_budgets.budgets[0]: time_zone: unknown time zone \"Mars/Olympus\"",
        ),
        (
            "provider_budgets:\n  budgets:\n    - {tag: \"a{b}\", limit: 1, period: 1d}\n",
            "the name is not allowed",
        ),
        (
            "provider_budgets:\n  budgets:\n    - {provider: \"tag:x\", limit: 1, period: 1d}\n",
            "provider_budgets.budgets[0]: provider: \"tag:x\" is not allowed",
        ),
        (
            "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  budgets:\n    - {provider: openai, limit: 2, period: 1d}\n",
            "provider \"openai\" (1d) is given twice",
        ),
        (
            "tag_budget_config:\n  t: {max_budget: lots, budget_duration: 1d}\n",
            "tag_budget_config.t: max_budget: \"lots\"",
        ),
    ];
    for (yaml, want) in cases {
        let e = err(yaml);
        assert!(e.contains(want), "{yaml}\n=> {e}\nwant {want}");
        assert!(!e.contains('\n'), "{e}");
    }
    // A second budget of another period is fine.
    Config::from_yaml_str(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  budgets:\n    - {provider: openai, limit: 2, period: 1mo}\n",
    )
    .unwrap();
    assert!(matches!(
        Config::new()
            .with_budget(BudgetConfig::new(
                Scope::Deployment,
                "",
                usd("1"),
                "1d".parse().unwrap()
            ))
            .validate(),
        Err(ConfigError::Budget { .. })
    ));
}

const SCOPES: &str = "\
provider_budget_config:
  openai: {budget_limit: 10, time_period: 1d}
tag_budget_config:
  team-a: {max_budget: 1, budget_duration: 1d}
model_list:
  - model_name: gpt
    litellm_params: {model: openai/gpt-4o, max_budget: 2, budget_duration: 1d}
    model_info: {id: east}
provider_budgets:
  budgets:
    - {model: gpt-4o-mini, limit: 3, period: 1d}
";

#[test]
fn every_applicable_budget_must_have_room_and_charge_goes_where_filter_looked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(SCOPES, &dir, &clock);
    let east = Target::with_id("east", "openai/gpt-4o");
    let west = Target::with_id("west", "openai/gpt-4o");
    let mini = Target::with_id("m1", "gpt-4o-mini");
    let azure_mini = Target::with_id("m2", "azure/gpt-4o-mini");
    let all = [east.clone(), west.clone(), mini.clone(), azure_mini.clone()];
    assert_eq!(l.filter(&all, NO_TAGS).unwrap().len(), 4);

    // east: provider openai + deployment east; nothing else.
    assert_eq!(
        l.charge(Spend::deployment(&east, usd("2")))
            .map(|r| r.budgets())
            .unwrap(),
        2
    );
    assert_eq!(
        l.filter(&all, NO_TAGS).unwrap(),
        [&west, &mini, &azure_mini],
        "east's own budget is spent, its provider's is not"
    );
    // The model budget covers gpt-4o-mini on every provider.
    assert_eq!(
        l.charge(Spend::deployment(&azure_mini, usd("3")))
            .map(|r| r.budgets())
            .unwrap(),
        1
    );
    assert_eq!(l.filter(&all, NO_TAGS).unwrap(), [&west]);
    // A charge that matches no budget is not an error.
    assert_eq!(
        l.charge(Spend::deployment("claude-3-5-sonnet", usd("5")))
            .map(|r| r.budgets())
            .unwrap(),
        0
    );

    // Tags: a spent tag blocks the requests carrying it, whatever the deployment.
    assert_eq!(
        l.charge(Spend::deployment(&west, usd("1")).tags(&["team-a", "team-a"]))
            .map(|r| r.budgets())
            .unwrap(),
        2
    );
    assert_eq!(
        l.filter(&all, &["other"]).unwrap(),
        [&west],
        "untagged budgets unchanged"
    );
    let err = l.filter(&all, &["team-a"]).unwrap_err();
    let scopes: Vec<(Scope, &str, u64, u64)> = err
        .exceeded
        .iter()
        .map(|e| {
            (
                e.scope,
                e.name.as_str(),
                e.spend.as_nanos(),
                e.limit.as_nanos(),
            )
        })
        .collect();
    assert_eq!(
        scopes,
        [
            (Scope::Tag, "team-a", 1_000_000_000, 1_000_000_000),
            (Scope::Deployment, "east", 2_000_000_000, 2_000_000_000),
            (Scope::Model, "gpt-4o-mini", 3_000_000_000, 3_000_000_000),
        ],
        "every exceeded budget, once"
    );
    assert!(err
        .exceeded
        .iter()
        .all(|e: &Exceeded| e.resets_at == ts("2024-06-02T00:00:00Z")));
    assert!(err
        .to_string()
        .contains("Exceeded budget for tag team-a: 1 >= 1"));
    // The same decision from filter_in_place and from a prepared list.
    let mut v = all.to_vec();
    l.filter_in_place(&mut v, &["x"]).unwrap();
    assert_eq!(v, std::slice::from_ref(&west));
    let mut v = all.to_vec();
    assert!(l.filter_in_place(&mut v, &["team-a"]).is_err());
    assert_eq!(v.len(), 4, "unchanged on error");
    let p = l.prepare(&all);
    let mut out = Vec::new();
    p.filter_into(&["x"], &mut out).unwrap();
    assert_eq!(out, [1]);
    assert_eq!(p.filter_into(&["team-a"], &mut out).unwrap_err(), err);

    // Spend per budget, as status reports it.
    let status = l.status(StatusQuery::all());
    let spend: Vec<(Scope, &str, Money)> = status
        .iter()
        .map(|s| (s.scope, s.name.as_str(), s.spend))
        .collect();
    assert_eq!(
        spend,
        [
            (Scope::Provider, "openai", usd("3")),
            (Scope::Deployment, "east", usd("2")),
            (Scope::Model, "gpt-4o-mini", usd("3")),
            (Scope::Tag, "team-a", usd("1")),
        ]
    );
    // A new day: everything has room again.
    clock.advance(SignedDuration::from_hours(12));
    assert_eq!(l.filter(&all, &["team-a"]).unwrap().len(), 4);
}

#[test]
fn several_windows_per_budget_each_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1h}\nprovider_budgets:\n  budgets:\n    - {provider: openai, limit: 2.5, period: 1d}\n",
        &dir,
        &clock,
    );
    for hour in 0..3 {
        assert_eq!(
            l.filter(&["gpt-4o"], NO_TAGS).unwrap().len(),
            1,
            "hour {hour}"
        );
        l.charge(Spend::provider("openai", usd("1"))).unwrap(); // both budgets
        assert!(
            l.filter(&["gpt-4o"], NO_TAGS).is_err(),
            "hourly spent, hour {hour}"
        );
        clock.advance(SignedDuration::from_hours(1));
    }
    // 3 >= 2.5 for the day, though the hour is fresh.
    let err = l.filter(&["gpt-4o"], NO_TAGS).unwrap_err();
    assert_eq!(err.exceeded.len(), 1);
    assert_eq!(err.exceeded[0].period, "1d");
    assert_eq!(err.exceeded[0].resets_at, ts("2024-06-02T00:00:00Z"));
}

#[test]
fn shadow_budgets_count_and_report_but_never_filter() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(
        "provider_budgets:\n  budgets:\n    - {tag: t, limit: 1, period: 1d, mode: shadow}\n    - {provider: openai, limit: 1, period: 1d, mode: shadow}\n",
        &dir,
        &clock,
    );
    l.charge(Spend::deployment("gpt-4o", usd("5")).tags(&["t"]))
        .unwrap();
    for _ in 0..3 {
        assert_eq!(l.filter(&["gpt-4o"], &["t"]).unwrap().len(), 1);
    }
    let s = l.status(StatusQuery::all());
    assert!(s.iter().all(|s| s.mode == Mode::Shadow && s.exhausted));
    assert_eq!(s.iter().map(|s| s.would_deny).collect::<Vec<_>>(), [3, 3]);
    // Reload to enforce: the same spend now filters.
    let enforce = Config::from_yaml_str(
        "provider_budgets:\n  budgets:\n    - {tag: t, limit: 1, period: 1d}\n    - {provider: openai, limit: 1, period: 1d}\n",
    )
    .unwrap();
    let summary = l.reload(enforce).unwrap();
    assert_eq!(summary.changed, ["openai", "tag:t"]);
    assert!(l.filter(&["gpt-4o"], &["t"]).is_err());
}

#[test]
fn soft_limits_fire_once_per_window_per_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let yaml = "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 10, period: 1d, soft_limits: [0.5, 0.9]}\n";
    let l = open(yaml, &dir, &clock);
    let fired: Arc<Mutex<Vec<(f64, Money, Timestamp)>>> = Arc::default();
    let sink = Arc::clone(&fired);
    l.on_soft_limit(move |e: &SoftLimitCrossed| {
        sink.lock()
            .unwrap()
            .push((e.soft_limit.fraction(), e.spend, e.window.start()));
    });
    let day1 = ts("2024-06-01T00:00:00Z");
    for _ in 0..4 {
        l.charge(Spend::provider("openai", usd("1"))).unwrap();
    }
    assert!(fired.lock().unwrap().is_empty());
    l.charge(Spend::provider("openai", usd("1"))).unwrap(); // 5: 0.5 crossed
    l.charge(Spend::provider("openai", usd("0.5"))).unwrap();
    assert_eq!(*fired.lock().unwrap(), [(0.5, usd("5"), day1)]);
    l.charge(Spend::provider("openai", usd("10"))).unwrap(); // 16.5: 0.9 crossed (once, though far past)
    l.charge(Spend::provider("openai", usd("1"))).unwrap();
    assert_eq!(fired.lock().unwrap().len(), 2);
    assert_eq!(fired.lock().unwrap()[1].0, 0.9);
    let s = l.status(StatusQuery::all());
    assert_eq!(
        s[0].thresholds_crossed,
        [SoftLimit::new(0.5).unwrap(), SoftLimit::new(0.9).unwrap()]
    );
    // A restart does not fire again for the same window.
    drop(l);
    let l = open(yaml, &dir, &clock);
    let sink = Arc::clone(&fired);
    l.on_soft_limit(move |e: &SoftLimitCrossed| {
        sink.lock()
            .unwrap()
            .push((e.soft_limit.fraction(), e.spend, e.window.start()));
    });
    l.charge(Spend::provider("openai", usd("1"))).unwrap();
    assert_eq!(fired.lock().unwrap().len(), 2);
    // The next window fires again.
    clock.advance(SignedDuration::from_hours(12));
    l.charge(Spend::provider("openai", usd("9"))).unwrap();
    let f = fired.lock().unwrap();
    assert_eq!(f.len(), 4);
    assert_eq!(f[2].2, ts("2024-06-02T00:00:00Z"));
    assert_eq!((f[2].0, f[3].0), (0.5, 0.9));
}

#[test]
fn concurrent_charges_fire_each_soft_limit_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(
        "provider_budgets:\n  budgets:\n    - {tag: t, limit: 1000, period: 1d, soft_limits: [0.1, 0.25, 0.5, 0.75, 0.9, 1]}\n",
        &dir,
        &clock,
    );
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = Arc::clone(&count);
    l.on_soft_limit(move |_| {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..300 {
                    l.charge(Spend::deployment("x", usd("1")).tags(&["t"]))
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(count.load(std::sync::atomic::Ordering::Relaxed), 6);
}

#[test]
fn per_budget_time_zones_reset_at_their_local_midnight() {
    let dir = tempfile::tempdir().unwrap();
    // 23:30 UTC = 01:30 in Berlin (summer, UTC+2) the next day, 19:30 in New York.
    let clock = FakeClock::new(ts("2024-06-01T23:30:00Z"));
    let l = open(
        "provider_budgets:\n  time_zone: America/New_York\n  budgets:\n    - {tag: ny, limit: 1, period: 1d}\n    - {tag: berlin, limit: 1, period: 1d, time_zone: Europe/Berlin}\n",
        &dir,
        &clock,
    );
    l.charge(Spend::deployment("x", usd("1")).tags(&["ny", "berlin"]))
        .unwrap();
    let s = l.status(StatusQuery::all());
    let by = |n: &str| s.iter().find(|s| s.name == n).unwrap().clone();
    assert_eq!(by("berlin").time_zone, "Europe/Berlin");
    assert_eq!(by("berlin").window.start(), ts("2024-06-01T22:00:00Z"));
    assert_eq!(by("berlin").window.end(), ts("2024-06-02T22:00:00Z"));
    assert_eq!(by("ny").time_zone, "America/New_York");
    assert_eq!(by("ny").window.end(), ts("2024-06-02T04:00:00Z"));
    clock.set(ts("2024-06-02T04:00:00Z"));
    assert!(l.filter(&["x"], &["ny"]).is_ok(), "New York's day is over");
    assert!(l.filter(&["x"], &["berlin"]).is_err(), "Berlin's is not");
    clock.set(ts("2024-06-02T22:00:00Z"));
    assert!(l.filter(&["x"], &["berlin"]).is_ok());
}

#[test]
fn a_prepared_list_does_not_keep_the_limiter_alive() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(SCOPES, &dir, &clock);
    l.charge(Spend::deployment(
        &Target::with_id("east", "openai/gpt-4o"),
        usd("2"),
    ))
    .unwrap();
    let p = l.prepare(&[Target::with_id("east", "openai/gpt-4o")]);
    assert!(p.limiter_alive());
    drop(l);
    assert!(
        !p.limiter_alive(),
        "the journal stopped with the last limiter"
    );
    // The data dir is released (sled's lock): it opens again while `p` lives.
    let l = open(SCOPES, &dir, &clock);
    assert_eq!(l.status(StatusQuery::all())[1].spend, usd("2"));
    // The stale list still answers from the old memory.
    assert!(p.filter(NO_TAGS).is_err());
}

#[test]
fn scoped_budgets_survive_a_restart_and_a_reload_adds_them_live() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(
        "provider_budget_config:\n  openai: {budget_limit: 10, time_period: 1d}\n",
        &dir,
        &clock,
    );
    let east = Target::with_id("east", "openai/gpt-4o");
    let p = l.prepare(std::slice::from_ref(&east));
    l.charge(Spend::deployment(&east, usd("2")).tags(&["team-a"]))
        .unwrap();
    let r = l.reload(Config::from_yaml_str(SCOPES).unwrap()).unwrap();
    assert_eq!(
        r.added,
        ["deployment:east", "model:gpt-4o-mini", "tag:team-a"]
    );
    l.charge(Spend::deployment(&east, usd("2")).tags(&["team-a"]))
        .unwrap();
    assert!(
        p.filter(NO_TAGS).is_err(),
        "the prepared list resolves again after a reload"
    );
    assert!(l.filter(std::slice::from_ref(&east), &["b"]).is_err());
    drop(l);
    let l = open(SCOPES, &dir, &clock);
    let spend: Vec<Money> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| s.spend)
        .collect();
    assert_eq!(spend, [usd("4"), usd("2"), usd("0"), usd("2")]);
}

/// A data dir written by the previous release (provider budgets only, before scopes), made
/// with its CLI: `--config config.yaml --now 2024-06-01T12:00:00Z record openai 7.25
/// --durable`, then `record anthropic 5 --durable`. sled's `db` file is stored without its
/// trailing zeros (`db.head`; the rest of its 524 287 bytes are zero).
fn previous_release_dir() -> tempfile::TempDir {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/prev-release-datadir");
    let dir = tempfile::tempdir().unwrap();
    for f in ["conf", "provider-budgets.hw", "snap.000000000000020B"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(src.join("db.head"), dir.path().join("db")).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("db"))
        .unwrap()
        .set_len(524_287)
        .unwrap();
    dir
}

#[test]
fn a_data_dir_of_the_previous_release_opens_with_its_spend_and_gains_scoped_budgets() {
    let dir = previous_release_dir();
    let clock = FakeClock::new(ts("2024-06-01T12:30:00Z"));
    let old = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/prev-release-datadir/config.yaml"),
    )
    .unwrap();
    // The same config: everything as it was.
    let l = open(&old, &dir, &clock);
    assert_eq!(l.node_id(), "prev-release");
    let spend: Vec<(&str, Money)> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| {
            (
                if s.name == "openai" {
                    "openai"
                } else {
                    "anthropic"
                },
                s.spend,
            )
        })
        .collect();
    assert_eq!(spend, [("anthropic", usd("5")), ("openai", usd("7.25"))]);
    assert_eq!(
        l.filter(&["claude-3-5-sonnet", "gpt-4o"], NO_TAGS).unwrap(),
        [&"gpt-4o"]
    );
    drop(l);
    // The new model on top: provider budgets keep their series, new scopes start at zero.
    let new = format!(
        "{old}  budgets:\n    - {{provider: openai, limit: 100, period: 1mo}}\n    - {{model: gpt-4o, limit: 8, period: 1d}}\n    - {{tag: team-a, limit: 1, period: 1d}}\n"
    );
    let l = open(&new, &dir, &clock);
    let rows: Vec<(Scope, String, String, Money)> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| (s.scope, s.name.clone(), s.period.to_string(), s.spend))
        .collect();
    assert_eq!(
        rows,
        [
            (Scope::Provider, "anthropic".into(), "1h".into(), usd("5")),
            (Scope::Provider, "openai".into(), "1d".into(), usd("7.25")),
            (Scope::Provider, "openai".into(), "1mo".into(), usd("0")),
            (Scope::Model, "gpt-4o".into(), "1d".into(), usd("0")),
            (Scope::Tag, "team-a".into(), "1d".into(), usd("0")),
        ]
    );
    l.charge(Spend::deployment("openai/gpt-4o", usd("1")).tags(&["team-a"]))
        .unwrap();
    assert!(l.filter(&["gpt-4o"], &["team-a"]).is_err());
    assert_eq!(l.status(StatusQuery::all())[1].spend, usd("8.25"));
}

mod model {
    //! Several windows per budget against a model: random charges and clock steps; after each
    //! step every budget's spend equals the sum of the charges whose instant falls in the
    //! budget's current window (computed from Unix seconds directly, not by the crate's window
    //! code), and `filter` passes exactly when every applicable budget is under its limit.
    use super::*;
    use proptest::prelude::*;

    /// (scope, name, period seconds, limit in cents).
    const BUDGETS: [(Scope, &str, i64, u64); 5] = [
        (Scope::Provider, "openai", 3_600, 300),
        (Scope::Provider, "openai", 86_400, 900),
        (Scope::Model, "gpt-4o", 7_200, 500),
        (Scope::Tag, "t", 3_600, 200),
        (Scope::Tag, "t", 604_800, 1_500),
    ];

    #[derive(Debug, Clone)]
    enum Op {
        Wait(i64),
        Charge {
            cents: u64,
            mini: bool,
            tagged: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0i64..10_000).prop_map(Op::Wait),
            (0u64..120, any::<bool>(), any::<bool>()).prop_map(|(cents, mini, tagged)| {
                Op::Charge {
                    cents,
                    mini,
                    tagged,
                }
            }),
        ]
    }

    fn config_yaml() -> String {
        let mut s = String::from("provider_budgets:\n  storage: {retention: 30d}\n  budgets:\n");
        for (scope, name, secs, cents) in BUDGETS {
            s.push_str(&format!(
                "    - {{{scope}: {name}, limit: \"{}.{:02}\", period: {}s}}\n",
                cents / 100,
                cents % 100,
                secs
            ));
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn every_window_of_every_budget_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
            let dir = tempfile::tempdir().unwrap();
            let start = ts("2024-03-09T20:00:00Z");
            let clock = FakeClock::new(start);
            let l = open(&config_yaml(), &dir, &clock);
            let mut events: Vec<(i64, u64, bool, bool)> = Vec::new(); // (secs, cents, gpt-4o, tagged)
            let mut now = start.as_second();
            for op in ops {
                match op {
                    Op::Wait(s) => {
                        now += s;
                        clock.set(Timestamp::from_second(now).unwrap());
                    }
                    Op::Charge { cents, mini, tagged } => {
                        let model = if mini { "openai/gpt-4o-mini" } else { "openai/gpt-4o" };
                        let tags: &[&str] = if tagged { &["t"] } else { &[] };
                        let cost = Money::from_nanos(cents * 10_000_000);
                        l.charge(Spend::deployment(model, cost).tags(tags)).unwrap();
                        events.push((now, cents, !mini, tagged));
                    }
                }
                // The model, per budget.
                let mut spent = Vec::new();
                for (scope, _, secs, _) in BUDGETS {
                    let from = now - now.rem_euclid(secs);
                    let sum: u64 = events
                        .iter()
                        .filter(|e| e.0 >= from && e.0 < from + secs)
                        .filter(|e| match scope {
                            Scope::Model => e.2,
                            Scope::Tag => e.3,
                            _ => true,
                        })
                        .map(|e| e.1)
                        .sum();
                    spent.push(sum);
                }
                let status = l.status(StatusQuery::all());
                let got: Vec<u64> = status.iter().map(|s| s.spend.as_nanos() / 10_000_000).collect();
                // Compared as sets keyed by (scope, name/period): the order of status rows is
                // the config's, not the model's.
                let mut want: Vec<(Scope, String, u64)> = BUDGETS
                    .iter()
                    .zip(&spent)
                    .map(|((sc, n, secs, _), s)| (*sc, format!("{n}/{secs}s"), *s))
                    .collect();
                want.sort();
                let mut have: Vec<(Scope, String, u64)> = status
                    .iter()
                    .zip(&got)
                    .map(|(s, g)| (s.scope, format!("{}/{}", s.name, s.period), *g))
                    .collect();
                have.sort();
                prop_assert_eq!(&have, &want);
                // Filter: each candidate passes iff all its budgets have room.
                let room = |i: usize| spent[i] < BUDGETS[i].3;
                let provider_ok = room(0) && room(1);
                let tag_ok = room(3) && room(4);
                for tagged in [false, true] {
                    let tags: &[&str] = if tagged { &["t"] } else { &[] };
                    let r = l.filter(&["openai/gpt-4o", "openai/gpt-4o-mini"], tags);
                    let mut want = Vec::new();
                    if provider_ok && (!tagged || tag_ok) {
                        if room(2) {
                            want.push("openai/gpt-4o");
                        }
                        want.push("openai/gpt-4o-mini");
                    }
                    match r {
                        Ok(v) => prop_assert_eq!(v.into_iter().copied().collect::<Vec<_>>(), want),
                        Err(e) => {
                            prop_assert!(want.is_empty(), "{e}");
                            prop_assert!(!e.exceeded.is_empty());
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn provider_budgets_under_litellm_settings_are_not_silently_dropped() {
    let c = Config::from_yaml_str(
        "litellm_settings:\n  provider_budget_config:\n    openai: {budget_limit: 1, time_period: 1d}\n",
    )
    .unwrap();
    assert!(c.budgets.is_empty());
    assert!(
        c.warning()
            .unwrap()
            .contains("litellm_settings.provider_budget_config"),
        "{:?}",
        c.warning()
    );
}

/// What parses but would enforce less than the file seems to say is warned about, one line
/// each: budgets in sections this crate does not read, no budget at all, and a provider budget
/// whose name matches a known provider only in another case.
#[test]
fn configs_that_enforce_less_than_they_seem_are_warned_about() {
    let c = Config::from_yaml_str(
        "provider_budget_config:\n  OpenAI: {budget_limit: 1, time_period: 1d}\n  openrouter: {budget_limit: 1, time_period: 1d}\nlitellm_settings:\n  max_budget: 100\n  budget_duration: 30d\n  success_callback: [langfuse]\ngeneral_settings:\n  master_key: sk-1\n  max_budget_per_key: 5\nrouter_settings:\n  routing_strategy: simple-shuffle\n",
    )
    .unwrap();
    let w = c.warnings();
    assert_eq!(w.len(), 2, "{w:#?}");
    assert_eq!(
        w[0],
        "config: litellm keys not implemented by provider-budgets (ignored): \
         general_settings.max_budget_per_key, litellm_settings.max_budget, \
         litellm_settings.budget_duration"
    );
    assert_eq!(
        w[1],
        "config: provider budget \"OpenAI\" matches no provider (names are case-sensitive); did you mean \"openai\"?"
    );

    let empty = Config::from_yaml_str("model_list: []\n").unwrap();
    assert_eq!(
        empty.warnings(),
        ["config: no budget is configured: every deployment is allowed and nothing is limited"]
    );
    // A provider the config maps models to is known in its own spelling.
    let own = Config::from_yaml_str(
        "provider_budget_config:\n  MyCorp: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  model_providers: {corp-: MyCorp}\n",
    )
    .unwrap();
    assert!(own.warnings().is_empty(), "{:?}", own.warnings());
}
