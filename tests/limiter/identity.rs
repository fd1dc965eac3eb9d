//! Identity budgets: the scopes `key`, `user`, `team`, `org` and `customer` in the config (and
//! their errors), and [`Identity`] on filter, charge, reservations and status: a request
//! passes only if every budget of every identity it names has room, together with its
//! deployment's and its tags'; its spend counts in every one. A proptest compares filter and
//! charge with identities to a plain model.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{
    BudgetConfig, Config, ConfigError, Enforcement, FakeClock, Identity, Limiter, Mode, Money,
    Offline, ReserveError, Scope, SoftLimit, Spend, StatusQuery, Target, NO_TAGS,
};

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn open(yaml: &str, dir: &tempfile::TempDir, clock: &FakeClock) -> Limiter {
    support::open(support::yaml(yaml, dir.path()), clock)
}

/// Every identity scope with every option a budget has.
const ALL_OPTIONS: &str = "\
provider_budgets:
  time_zone: America/New_York
  budgets:
    - {key: 9f86d081884c7d65, limit: 10, period: 1d}
    - {key: 9f86d081884c7d65, limit: 100, period: 1mo}
    - {user: alice@example.com, limit: 5, period: 1w, time_zone: Europe/Berlin}
    - {team: research, limit: 1000, period: 1mo, soft_limits: [0.9, 0.5]}
    - {org: acme, limit: 5000, period: 1mo, enforcement: strict, offline: local_share}
    - {customer: \"cust:42\", limit: 1, period: 1h, mode: shadow}
";

#[test]
fn identity_scopes_read_from_the_general_form_with_every_option() {
    let c = Config::from_yaml_str(ALL_OPTIONS).unwrap();
    let rows: Vec<(Scope, &str, String, Money)> = c
        .budgets
        .iter()
        .map(|b| (b.scope, b.name.as_str(), b.period.to_string(), b.limit))
        .collect();
    assert_eq!(
        rows,
        [
            (Scope::Key, "9f86d081884c7d65", "1d".into(), usd("10")),
            (Scope::Key, "9f86d081884c7d65", "1mo".into(), usd("100")),
            (Scope::User, "alice@example.com", "1w".into(), usd("5")),
            (Scope::Team, "research", "1mo".into(), usd("1000")),
            (Scope::Org, "acme", "1mo".into(), usd("5000")),
            (Scope::Customer, "cust:42", "1h".into(), usd("1")),
        ],
        "sorted by scope after the older scopes, then name and period"
    );
    let key_parts: Vec<(String, String)> = c.budgets.iter().map(|b| b.key_parts()).collect();
    assert_eq!(
        key_parts,
        [
            ("key:9f86d081884c7d65".into(), "1d".into()),
            ("key:9f86d081884c7d65".into(), "1mo".into()),
            ("user:alice@example.com".into(), "1w@Europe/Berlin".into()),
            ("team:research".into(), "1mo".into()),
            ("org:acme".into(), "1mo".into()),
            ("customer:cust:42".into(), "1h".into()),
        ]
    );
    let team = &c.budgets[3];
    assert_eq!(
        team.soft_limits,
        [SoftLimit::new(0.5).unwrap(), SoftLimit::new(0.9).unwrap()]
    );
    let org = &c.budgets[4];
    assert_eq!(
        (org.enforcement, org.offline),
        (Enforcement::Strict, Offline::LocalShare)
    );
    assert_eq!(c.budgets[5].mode, Mode::Shadow);
    assert_eq!(team.label(), "team \"research\" (1mo)");
    // TOML reads the same.
    let toml = Config::from_toml_str(
        "[[provider_budgets.budgets]]\nteam = \"research\"\nlimit = 1000\nperiod = \"1mo\"\n",
    )
    .unwrap();
    assert_eq!(toml.budgets[0].key_parts().0, "team:research");
}

#[test]
fn bad_identity_budgets_are_one_line_naming_the_culprit() {
    let err = |yaml: &str| Config::from_yaml_str(yaml).unwrap_err().to_string();
    let budget = |entry: &str| format!("provider_budgets:\n  budgets:\n    - {entry}\n");
    for scope in ["key", "user", "team", "org", "customer"] {
        let cases = [
            (
                format!("{{{scope}: a, limit: 10, period: 1mo, max_series: 5}}"),
                "provider_budgets.budgets[0]: max_series: only a template (name \"*\") has series to bound".into(),
            ),
            (
                format!("{{{scope}: \"*\", limit: 10, period: 1mo, max_series: 0}}"),
                "provider_budgets.budgets[0]: max_series: 0 is not in 1..=1048576".into(),
            ),
            (
                format!("{{{scope}: \"a{{b}}\", limit: 1, period: 1d}}"),
                "provider_budgets.budgets[0]: the name is not allowed: it contains '{'".into(),
            ),
            (
                format!("{{{scope}: \"\", limit: 1, period: 1d}}"),
                "provider_budgets.budgets[0]: the name is not allowed: it is empty".into(),
            ),
            (
                format!("{{{scope}: a, tag: b, limit: 1, period: 1d}}"),
                format!("provider_budgets.budgets[0]: scope: give one of provider, deployment, model, tag, key, user, team, org or customer, not both tag and {scope}"),
            ),
            (
                format!("{{{scope}: a, limit: -1, period: 1d}}"),
                "provider_budgets.budgets[0]: limit: \"-1\"".into(),
            ),
            (
                format!("{{{scope}: a, limit: 1, period: 1fortnight}}"),
                "provider_budgets.budgets[0]: period:".into(),
            ),
            (
                format!("{{{scope}: a, limit: 1, period: 1d, soft_limits: [2]}}"),
                "provider_budgets.budgets[0]: soft_limits: 2 is not a fraction in (0, 1]".into(),
            ),
            (
                format!("{{{scope}: a, limit: 1, period: 1d, time_zone: Mars/Olympus}}"),
                "provider_budgets.budgets[0]: time_zone: unknown time zone \"Mars/Olympus\"".into(),
            ),
            (
                format!("{{{scope}: a, limit: 1, period: 1d, mode: loud}}"),
                "mode".into(),
            ),
            (
                format!("{{{scope}: a, limit: 1, period: 1d}}\n    - {{{scope}: a, limit: 2, period: 1d}}"),
                format!("config: {scope} \"a\" (1d) is given twice"),
            ),
        ];
        for (entry, want) in cases {
            let yaml = budget(&entry);
            let e = err(&yaml);
            assert!(e.contains(&want), "{yaml}\n=> {e}\nwant {want}");
            assert!(!e.contains('\n'), "{e}");
        }
        // The same name in two identity scopes is two budgets.
        Config::from_yaml_str(&budget(&format!(
            "{{{scope}: a, limit: 1, period: 1d}}\n    - {{{}: a, limit: 1, period: 1d}}",
            if scope == "key" { "user" } else { "key" }
        )))
        .unwrap();
    }
    // A template from code validates as from the file; `*` stays a plain name in the older
    // scopes, where `max_series` is refused.
    let day = "1d".parse().unwrap();
    let code = Config::new().with_budget(BudgetConfig::new(Scope::Team, "*", usd("1"), day));
    code.validate().unwrap();
    let mut tag = BudgetConfig::new(Scope::Tag, "*", usd("1"), day);
    tag.max_series = Some(3);
    match Config::new().with_budget(tag).validate() {
        Err(e @ ConfigError::Budget { .. }) => {
            let e = e.to_string();
            assert!(
                e.contains("tag \"*\" (1d): max_series: only a template"),
                "{e}"
            );
        }
        other => panic!("{other:?}"),
    }
    Config::from_yaml_str(&budget("{tag: \"*\", limit: 1, period: 1d}")).unwrap();
}

const TEAMS: &str = "\
provider_budget_config:
  openai: {budget_limit: 100, time_period: 1d}
tag_budget_config:
  batch: {max_budget: 50, budget_duration: 1d}
provider_budgets:
  budgets:
    - {key: k1, limit: 2, period: 1d}
    - {team: research, limit: 5, period: 1d}
    - {org: acme, limit: 8, period: 1d}
    - {user: alice, limit: 100, period: 1d}
    - {customer: c1, limit: 1, period: 1d, mode: shadow}
";

#[test]
fn a_request_passes_only_if_every_budget_of_every_identity_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(TEAMS, &dir, &clock);
    let all = [Target::parse("gpt-4o"), Target::parse("claude-3-5-sonnet")];
    let k1 = Identity::new().key("k1").team("research").org("acme");
    let k2 = Identity::new().key("k2").team("research").org("acme");
    let k3 = Identity::new().key("k3").team("physics").org("acme");
    let charged = |d: &Target, cost: &str, id: &Identity<'_>| {
        l.charge(Spend::deployment(d, usd(cost)).identity(id))
            .unwrap()
            .budgets()
    };
    // k1: its key, its team, its org and openai; unknown names add nothing.
    assert_eq!(charged(&all[0], "2", &k1), 4);
    assert_eq!(charged(&all[1], "0", &Identity::new().user("bob")), 0);
    // k1's own budget is spent; k2 of the same team, and k1 without its key named, still pass.
    let e = l.filter_for(&all, NO_TAGS, &k1).unwrap_err();
    let exceeded: Vec<(Scope, &str, Money)> = e
        .exceeded
        .iter()
        .map(|e| (e.scope, e.name.as_str(), e.spend))
        .collect();
    assert_eq!(exceeded, [(Scope::Key, "k1", usd("2"))]);
    assert_eq!(e.exceeded[0].provider, "key:k1");
    assert!(
        e.to_string().contains("Exceeded budget for key k1: 2 >= 2"),
        "{e}"
    );
    assert_eq!(l.filter_for(&all, NO_TAGS, &k2).unwrap().len(), 2);
    assert_eq!(l.filter(&all, NO_TAGS).unwrap().len(), 2);
    // k2 spends the rest of the team's 5 through anthropic (no provider budget there).
    assert_eq!(charged(&all[1], "3", &k2), 2);
    // The team is spent: nothing for k2 (nor k1), k3 of another team passes, and so does a
    // request naming k2 but not its team.
    let e = l.filter_for(&all, NO_TAGS, &k2).unwrap_err();
    assert_eq!(
        e.exceeded
            .iter()
            .map(|e| (e.scope, e.name.as_str()))
            .collect::<Vec<_>>(),
        [(Scope::Team, "research")]
    );
    assert_eq!(e.exceeded[0].resets_at, ts("2024-06-02T00:00:00Z"));
    assert_eq!(l.filter_for(&all, NO_TAGS, &k3).unwrap().len(), 2);
    assert!(l
        .filter_for(&all, NO_TAGS, &Identity::new().key("k2"))
        .is_ok());
    // The org collects every team: 5 + 3 more reaches its 8.
    assert_eq!(charged(&all[1], "3", &k3), 1);
    let e = l.filter_for(&all, &["batch"], &k3).unwrap_err();
    assert_eq!(
        e.exceeded.iter().map(|e| e.scope).collect::<Vec<_>>(),
        [Scope::Org]
    );
    // filter_in_place_for and a prepared list decide the same.
    let mut v = all.to_vec();
    assert_eq!(l.filter_in_place_for(&mut v, NO_TAGS, &k3).unwrap_err(), e);
    assert_eq!(v.len(), 2, "unchanged on error");
    let mut v = all.to_vec();
    l.filter_in_place_for(&mut v, NO_TAGS, &Identity::new().key("k3"))
        .unwrap();
    assert_eq!(v.len(), 2);
    let p = l.prepare(&all);
    assert_eq!(p.filter_for(&["batch"], &k3).unwrap_err(), e);
    assert_eq!(
        p.filter_for(NO_TAGS, &Identity::new().team("physics"))
            .unwrap(),
        [0, 1]
    );
    let mut out = Vec::new();
    assert!(p.filter_into_for(NO_TAGS, &k1, &mut out).is_err());
    p.filter_into(NO_TAGS, &mut out).unwrap();
    assert_eq!(out, [0, 1]);
    // A shadow identity budget counts and reports, never filters.
    let c1 = Identity::new().customer("c1");
    assert_eq!(charged(&all[0], "5", &c1), 2);
    assert_eq!(l.filter_for(&all, NO_TAGS, &c1).unwrap().len(), 2);
    // Spend per budget, and status for one call's budgets.
    let spend: Vec<(Scope, String, Money)> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| (s.scope, s.name.clone(), s.spend))
        .collect();
    assert_eq!(
        spend,
        [
            (Scope::Provider, "openai".into(), usd("7")),
            (Scope::Tag, "batch".into(), usd("0")),
            (Scope::Key, "k1".into(), usd("2")),
            (Scope::User, "alice".into(), usd("0")),
            (Scope::Team, "research".into(), usd("5")),
            (Scope::Org, "acme".into(), usd("8")),
            (Scope::Customer, "c1".into(), usd("5")),
        ]
    );
    let customer = l.status(StatusQuery::all()).pop().unwrap();
    assert!(customer.would_deny >= 1, "{customer:?}");
    let rows: Vec<String> = l
        .status(StatusQuery::deployment(&all[0]).identity(&k1))
        .iter()
        .map(|s| s.provider.clone())
        .collect();
    assert_eq!(rows, ["openai", "key:k1", "team:research", "org:acme"]);
    // A new day: every budget has room again.
    clock.advance(SignedDuration::from_hours(12));
    assert_eq!(l.filter_for(&all, NO_TAGS, &k1).unwrap().len(), 2);
}

#[test]
fn a_provider_spend_counts_in_the_identities_it_names_and_tags_and_identities_combine() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(TEAMS, &dir, &clock);
    let id = Identity::new().user("alice").team("research");
    let n = l
        .charge(Spend::provider("openai", usd("1")).identity(&id))
        .unwrap()
        .budgets();
    assert_eq!(n, 3, "openai, alice, research");
    let n = l
        .charge(
            Spend::deployment("gpt-4o", usd("4"))
                .tags(&["batch", "batch"])
                .identity(&id),
        )
        .unwrap()
        .budgets();
    assert_eq!(n, 4, "openai, batch once, alice, research");
    // Both the tag and the team must have room: the team (5 of 5) refuses.
    let e = l
        .filter_for(&["gpt-4o"], &["batch"], &Identity::new().team("research"))
        .unwrap_err();
    assert_eq!(
        e.exceeded
            .iter()
            .map(|e| (e.scope, e.name.as_str()))
            .collect::<Vec<_>>(),
        [(Scope::Team, "research")]
    );
    assert!(l
        .filter_for(&["gpt-4o"], &["batch"], &Identity::new().user("alice"))
        .is_ok());
}

#[test]
fn reservations_hold_and_commit_in_every_identity_budget() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let l = open(
        "provider_budgets:\n  budgets:\n    - {key: k1, limit: 10, period: 1d}\n    - {team: research, limit: 4, period: 1d, enforcement: strict}\n",
        &dir,
        &clock,
    );
    let k1 = Identity::new().key("k1").team("research");
    let k2 = Identity::new().key("k2").team("research");
    let candidates = ["gpt-4o", "claude-3-5-sonnet"];
    let r1 = l
        .reserve(&candidates, usd("3"))
        .tags(NO_TAGS)
        .identity(&k1)
        .wait()
        .unwrap();
    // The team holds 3 of 4: k2 cannot reserve 2 on any candidate (the team applies to all).
    match l.reserve(&candidates, usd("2")).identity(&k2).wait() {
        Err(ReserveError::Denied(none)) => {
            let e: Vec<(Scope, &str, Money, Money)> = none
                .exceeded
                .iter()
                .map(|e| (e.scope, e.name.as_str(), e.spend, e.limit))
                .collect();
            assert_eq!(e, [(Scope::Team, "research", usd("5"), usd("4"))]);
        }
        other => panic!("{other:?}"),
    }
    // Without naming the team, k2 has room.
    l.reserve(&candidates, usd("2"))
        .identity(&Identity::new().key("k2"))
        .wait()
        .unwrap()
        .release()
        .unwrap();
    // The commit counts in the key and the team it was admitted with.
    assert_eq!(r1.commit(usd("2.5")).unwrap().wait().unwrap(), 2);
    let spend: Vec<(String, Money, Money)> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| (s.provider.clone(), s.spend, s.reserved))
        .collect();
    assert_eq!(
        spend,
        [
            ("key:k1".into(), usd("2.5"), usd("0")),
            ("team:research".into(), usd("2.5"), usd("0")),
        ]
    );
    // From async code too: 1.5 still fits the team, 1.6 does not.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = l
            .reserve(&candidates, usd("1.5"))
            .identity(&k2)
            .await
            .unwrap();
        assert!(l
            .reserve(&candidates, usd("0.1"))
            .identity(&k1)
            .await
            .is_err());
        r.release().unwrap();
        assert!(l
            .reserve(&candidates, usd("1.6"))
            .identity(&k1)
            .await
            .is_err());
    });
}

#[test]
fn identity_budgets_fire_soft_limits_survive_a_restart_and_a_reload_adds_them() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
    let before = "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n";
    let l = open(before, &dir, &clock);
    let id = Identity::new().team("research").key("k1");
    let spend = Spend::deployment("gpt-4o", usd("3")).identity(&id);
    assert_eq!(l.charge(spend).unwrap().budgets(), 1, "no team budget yet");
    let r = l.reload(Config::from_yaml_str(TEAMS).unwrap()).unwrap();
    assert_eq!(
        r.added,
        [
            "tag:batch",
            "key:k1",
            "user:alice",
            "team:research",
            "org:acme",
            "customer:c1"
        ]
    );
    let fired: Arc<Mutex<Vec<(Scope, String)>>> = Arc::default();
    let sink = Arc::clone(&fired);
    l.on_soft_limit(move |e| sink.lock().unwrap().push((e.scope, e.name.clone())));
    assert_eq!(
        l.charge(spend).unwrap().budgets(),
        3,
        "openai, k1, research"
    );
    assert!(
        l.filter_for(&["gpt-4o"], NO_TAGS, &id).is_err(),
        "k1: 3 >= 2"
    );
    drop(l);
    let soft = TEAMS.replace(
        "{team: research, limit: 5, period: 1d}",
        "{team: research, limit: 5, period: 1d, soft_limits: [0.8]}",
    );
    let l = open(&soft, &dir, &clock);
    let sink = Arc::clone(&fired);
    l.on_soft_limit(move |e| sink.lock().unwrap().push((e.scope, e.name.clone())));
    let spend: Vec<Money> = l
        .status(StatusQuery::all())
        .iter()
        .map(|s| s.spend)
        .collect();
    assert_eq!(
        spend,
        [
            usd("6"),
            usd("0"),
            usd("3"),
            usd("0"),
            usd("3"),
            usd("0"),
            usd("0")
        ],
        "the spend before the reload counted in openai only"
    );
    l.charge(Spend::deployment("gpt-4o", usd("1")).identity(&Identity::new().team("research")))
        .unwrap();
    assert_eq!(
        *fired.lock().unwrap(),
        [(Scope::Team, "research".to_string())],
        "4 of 5 crosses 0.8 once"
    );
}

mod model {
    //! Filter and charge with identities against a plain model: each budget's spend is the
    //! sum of the charges that named it; a candidate passes iff its provider's budget and
    //! every budget of every identity named have room.

    use super::*;
    use proptest::prelude::*;

    /// (scope, name, limit in cents) of each budget; every period is 1 d.
    const BUDGETS: [(Scope, &str, u64); 7] = [
        (Scope::Provider, "openai", 900),
        (Scope::Key, "k1", 150),
        (Scope::Key, "k2", 300),
        (Scope::User, "u1", 250),
        (Scope::Team, "t1", 400),
        (Scope::Org, "o1", 600),
        (Scope::Customer, "c1", 200),
    ];

    /// Names per identity scope: those with a budget and one without.
    const NAMES: [&[&str]; 5] = [
        &["k1", "k2", "k3"],
        &["u1", "u2"],
        &["t1", "t2"],
        &["o1", "o2"],
        &["c1", "c2"],
    ];

    /// An identity as indices into `NAMES` (`None`: not named).
    type Who = [Option<usize>; 5];

    fn who() -> impl Strategy<Value = Who> {
        let one = |n: usize| prop::option::of(0..n);
        (one(3), one(2), one(2), one(2), one(2)).prop_map(|(a, b, c, d, e)| [a, b, c, d, e])
    }

    fn identity(w: &Who) -> Identity<'static> {
        Scope::IDENTITY
            .into_iter()
            .zip(w)
            .fold(Identity::new(), |id, (scope, i)| {
                id.with(scope, i.map(|i| NAMES[scope_index(scope)][i]))
            })
    }

    fn scope_index(scope: Scope) -> usize {
        Scope::IDENTITY.iter().position(|s| *s == scope).unwrap()
    }

    /// Whether a charge by `w` (on openai when `openai`) counts in budget `b`.
    fn applies(b: usize, w: &Who, openai: bool) -> bool {
        let (scope, name, _) = BUDGETS[b];
        if scope == Scope::Provider {
            return openai;
        }
        let i = scope_index(scope);
        w[i].is_some_and(|n| NAMES[i][n] == name)
    }

    fn config() -> String {
        let mut s = String::from("provider_budgets:\n  budgets:\n");
        for (scope, name, cents) in BUDGETS {
            s.push_str(&format!(
                "    - {{{scope}: {name}, limit: \"{}.{:02}\", period: 1d}}\n",
                cents / 100,
                cents % 100
            ));
        }
        s
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn filter_and_charge_with_identities_match_the_model(
            ops in prop::collection::vec((who(), any::<bool>(), 0u64..200), 1..30),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let clock = FakeClock::new(ts("2024-06-01T12:00:00Z"));
            let l = open(&config(), &dir, &clock);
            let candidates = ["gpt-4o", "claude-3-5-sonnet"];
            let mut spent = [0u64; BUDGETS.len()];
            for (w, openai, cents) in ops {
                let id = identity(&w);
                // Filter first: each candidate passes iff all its budgets have room.
                let room = |b: usize, spent: &[u64]| spent[b] < BUDGETS[b].2;
                let request_ok = (1..BUDGETS.len())
                    .filter(|&b| applies(b, &w, true))
                    .all(|b| room(b, &spent));
                let mut want = Vec::new();
                if request_ok {
                    if room(0, &spent) {
                        want.push(candidates[0]);
                    }
                    want.push(candidates[1]);
                }
                match l.filter_for(&candidates, NO_TAGS, &id) {
                    Ok(v) => prop_assert_eq!(v.into_iter().copied().collect::<Vec<_>>(), want),
                    Err(e) => {
                        prop_assert!(want.is_empty(), "{e}");
                        let mut named: Vec<(Scope, String)> =
                            e.exceeded.iter().map(|e| (e.scope, e.name.clone())).collect();
                        named.sort();
                        let mut model: Vec<(Scope, String)> = (0..BUDGETS.len())
                            .filter(|&b| (b == 0 || applies(b, &w, true)) && !room(b, &spent))
                            .map(|b| (BUDGETS[b].0, BUDGETS[b].1.to_string()))
                            .collect();
                        model.sort();
                        prop_assert_eq!(named, model);
                    }
                }
                // Then charge, wherever the filter said.
                let d = if openai { candidates[0] } else { candidates[1] };
                let n = l
                    .charge(Spend::deployment(d, Money::from_nanos(cents * 10_000_000)).identity(&id))
                    .unwrap()
                    .budgets();
                let mut counted = 0;
                for (b, s) in spent.iter_mut().enumerate() {
                    if applies(b, &w, openai) {
                        *s += cents;
                        counted += 1;
                    }
                }
                prop_assert_eq!(n, counted);
                let have: Vec<u64> = l
                    .status(StatusQuery::all())
                    .iter()
                    .map(|s| s.spend.as_nanos() / 10_000_000)
                    .collect();
                prop_assert_eq!(&have[..], &spent[..]);
            }
        }
    }
}
