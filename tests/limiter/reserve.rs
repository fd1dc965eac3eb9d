//! Reservations on one node: admission, commit, release, drop, expiry, crash.
//!
//! * concurrent reservations across several budgets at once (provider, model, tag) never
//!   admit more than any limit, and fill each budget up to the last estimate;
//! * a commit counts the actual cost (in full above the estimate), a release nothing, a drop
//!   and an expiry the estimate; a commit after expiry is `ReserveError::Expired`;
//! * a denial is the filter's `NoDeployments` (with `resets_at`), `reserve_any` takes the first
//!   candidate with room, held money blocks `filter` and shows as `reserved` in status;
//! * a commit lands in the window of admission, across a window boundary;
//! * a process SIGKILLed with reservations open: the next open counts each open estimate and
//!   each committed actual exactly once (a child process, this test binary re-run);
//! * a model-based proptest (reserve, commit above or below the estimate, release, drop,
//!   expiry): exact spend and reserved per budget after every step, and the bound
//!   `spend + reserved <= limit + overshoot of commits above their estimate`;
//! * on a full disk a reservation is refused (`ReserveError::Record`, nothing held) and a
//!   commit answers the storage fault but stays counted; once space is back it is durable.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::child;
use provider_budgets_test_support::open as support;
use provider_budgets_test_support::tmpfs;

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use child::{sigkill, spawn_piped};
use jiff::Timestamp;
use provider_budgets::StatusQuery;
use provider_budgets::{
    Config, FakeClock, Limiter, Money, RecordError, Reservation, ReserveError, Scope, NO_TAGS,
};

const YAML: &str = "\
provider_budget_config:
  openai: {budget_limit: 10, time_period: 1d}
  anthropic: {budget_limit: 100, time_period: 1d}
tag_budget_config:
  team-a: {max_budget: 7, budget_duration: 1d}
provider_budgets:
  budgets:
    - {model: gpt-4o, limit: 8, period: 1h}
    - {tag: shadowed, limit: 1, period: 1d, mode: shadow}
";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn clock() -> FakeClock {
    FakeClock::new("2024-06-01T12:00:00Z".parse().unwrap())
}

fn open(dir: &Path, clock: &FakeClock) -> Limiter {
    let config = Config::from_yaml_str(YAML)
        .unwrap()
        .data_dir(dir)
        .reservation_timeout(Duration::from_secs(60));
    support::open(config, clock)
}

/// (spend, reserved) of a budget now.
fn row(l: &Limiter, scope: Scope, name: &str) -> (Money, Money) {
    let s = l
        .status(StatusQuery::all())
        .into_iter()
        .find(|s| s.scope == scope && s.name == name)
        .unwrap();
    (s.spend, s.reserved)
}

#[test]
fn reservations_are_send_sync_and_ids_are_unique_and_url_safe() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Reservation>();
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), &clock());
    let a = l.reserve(&["claude-3-5-sonnet"], usd("1")).wait().unwrap();
    let b = l.reserve(&["claude-3-5-sonnet"], usd("1")).wait().unwrap();
    assert_ne!(a.id(), b.id());
    for id in [a.id(), b.id()] {
        assert!(
            !id.is_empty()
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'),
            "{id}"
        );
    }
    assert_eq!(a.estimate(), usd("1"));
    assert_eq!(
        a.expires_at(),
        "2024-06-01T12:01:01Z".parse::<Timestamp>().unwrap(),
        "60 s timeout, whole seconds, at least the timeout"
    );
    assert_eq!(l.health().open_reservations, 2);
    a.release().unwrap().wait().unwrap();
    b.release().unwrap().wait().unwrap();
    assert_eq!(l.health().open_reservations, 0);
}

#[test]
fn commit_counts_the_actual_release_nothing_drop_the_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), &clock());
    // gpt-4o: provider openai (10/d) and model gpt-4o (8/h).
    let r = l.reserve(&["gpt-4o"], usd("3")).wait().unwrap();
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("0"), usd("3")));
    assert_eq!(row(&l, Scope::Model, "gpt-4o"), (usd("0"), usd("3")));
    r.commit(usd("1.25")).unwrap().wait().unwrap();
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("1.25"), usd("0")));
    assert_eq!(row(&l, Scope::Model, "gpt-4o"), (usd("1.25"), usd("0")));

    // Above the estimate: counted in full (the only way past a limit on one node).
    let r = l.reserve(&["gpt-4o"], usd("1")).wait().unwrap();
    r.commit(usd("4.5")).unwrap().wait().unwrap();
    assert_eq!(row(&l, Scope::Provider, "openai").0, usd("5.75"));

    l.reserve(&["gpt-4o"], usd("2"))
        .wait()
        .unwrap()
        .release()
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("5.75"), usd("0")));

    {
        let _dropped = l.reserve(&["gpt-4o"], usd("0.5")).wait().unwrap();
    }
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("6.25"), usd("0")));
    assert_eq!(row(&l, Scope::Model, "gpt-4o"), (usd("6.25"), usd("0")));

    // All of it durable: a reopen finds the same spend and nothing open.
    drop(l);
    let l = open(dir.path(), &clock());
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("6.25"), usd("0")));
    assert_eq!(row(&l, Scope::Model, "gpt-4o"), (usd("6.25"), usd("0")));
}

#[test]
fn a_denial_is_the_filters_error_and_reserve_any_takes_the_first_with_room() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), &clock());
    let held = l.reserve(&["gpt-4o-mini"], usd("9")).wait().unwrap(); // openai: 9 of 10 held
                                                                      // Held money counts for filter (spend + reserved >= limit blocks at the limit).
    let err = l.reserve(&["gpt-4o-mini"], usd("1.5")).wait().unwrap_err();
    let ReserveError::Denied(none) = &err else {
        panic!("{err}")
    };
    assert_eq!(none.exceeded.len(), 1);
    let e = &none.exceeded[0];
    assert_eq!((e.scope, e.name.as_str()), (Scope::Provider, "openai"));
    assert_eq!(e.spend, usd("10.5"), "what admission would have reached");
    assert_eq!(e.limit, usd("10"));
    assert_eq!(e.grant, None, "the limit refused, not a grant");
    assert_eq!(
        e.resets_at,
        "2024-06-02T00:00:00Z".parse::<Timestamp>().unwrap()
    );
    assert!(
        err.to_string()
            .contains("Exceeded budget for provider openai: 10.5 >= 10"),
        "{err}"
    );
    // Nothing of the refused reservation stays held.
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("0"), usd("9")));
    // Exactly the last dollar still fits.
    let last = l.reserve(&["gpt-4o-mini"], usd("1")).wait().unwrap();
    assert!(
        l.filter(&["gpt-4o-mini"], NO_TAGS).is_err(),
        "held money blocks filter"
    );
    drop(last); // counts 1
                // Spent exactly: even a zero estimate is refused, as filter refuses.
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("1"), usd("9")));
    assert!(matches!(
        l.reserve(&["gpt-4o-mini"], Money::ZERO).wait(),
        Err(ReserveError::Denied(_))
    ));

    let r = l
        .reserve(&["gpt-4o-mini", "claude-3-5-sonnet"], usd("2"))
        .wait()
        .unwrap();
    assert_eq!(r.deployment_index(), 1);
    r.commit(usd("2")).unwrap().wait().unwrap();
    assert_eq!(row(&l, Scope::Provider, "anthropic").0, usd("2"));

    // A tag budget applies to every candidate.
    let err = l
        .reserve(&["claude-3-5-sonnet"], usd("8"))
        .tags(&["team-a"])
        .wait()
        .unwrap_err();
    let ReserveError::Denied(none) = err else {
        panic!()
    };
    assert_eq!(none.exceeded[0].scope, Scope::Tag);
    assert_eq!(row(&l, Scope::Provider, "anthropic"), (usd("2"), usd("0")));
    let empty: [&str; 0] = [];
    assert_eq!(
        l.reserve(&empty, usd("1")).wait().unwrap_err(),
        ReserveError::NoCandidates
    );
    // A shadow budget holds but never refuses.
    l.reserve(&["claude-3-5-sonnet"], usd("5"))
        .tags(&["shadowed"])
        .wait()
        .unwrap()
        .commit(usd("5"))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(row(&l, Scope::Tag, "shadowed").0, usd("5"));
    held.release().unwrap().wait().unwrap();
}

#[test]
fn concurrent_reservations_never_over_admit_any_budget() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), &clock());
    // gpt-4o with tag team-a: openai 10/d, gpt-4o 8/h, team-a 7/d; claude with team-a:
    // anthropic 100/d and team-a. team-a is shared by both, gpt-4o's tightest is team-a.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                let mut admitted = Money::ZERO;
                for i in 0..40u64 {
                    let est = Money::from_nanos(((t * 7 + i * 13) % 5 + 1) * 100_000_000);
                    let model = if (t + i) % 2 == 0 {
                        "gpt-4o"
                    } else {
                        "claude-3-5-sonnet"
                    };
                    match l.reserve(&[model], est).tags(&["team-a"]).wait() {
                        Ok(r) => {
                            admitted = admitted.saturating_add(est);
                            if i % 3 == 0 {
                                r.commit(est).unwrap().wait().unwrap();
                            } else {
                                drop(r); // counts the estimate
                            }
                        }
                        Err(ReserveError::Denied(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                admitted
            })
        })
        .collect();
    let admitted = threads
        .into_iter()
        .map(|t| t.join().unwrap())
        .fold(Money::ZERO, Money::saturating_add);
    let (team, held) = row(&l, Scope::Tag, "team-a");
    assert_eq!(held, Money::ZERO);
    assert_eq!(team, admitted, "every admitted estimate was counted once");
    assert!(team <= usd("7"), "team-a over its limit: {team}");
    // Filled to within the largest estimate (0.5): denials came from a full budget.
    assert!(team > usd("6.5"), "team-a not filled: {team}");
    let (openai, _) = row(&l, Scope::Provider, "openai");
    let (model, _) = row(&l, Scope::Model, "gpt-4o");
    assert!(openai <= usd("10") && model <= usd("8"));
    assert_eq!(openai, model, "gpt-4o charges both");
}

#[test]
fn expiry_counts_the_estimate_and_a_late_commit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    let late = l.reserve(&["gpt-4o-mini"], usd("2")).wait().unwrap();
    let reaped = l.reserve(&["gpt-4o-mini"], usd("3")).wait().unwrap();
    clock.pass(Duration::from_secs(30));
    provider_budgets::testing::maintain(&l).unwrap();
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("0"), usd("5")));
    clock.pass(Duration::from_secs(32)); // past 60 s (+ at most one)
    provider_budgets::testing::maintain(&l).unwrap(); // the reaper's pass: both expire
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("5"), usd("0")));
    assert_eq!(l.health().open_reservations, 0);
    let err = late
        .commit(usd("0.1"))
        .and_then(|r| Ok(r.wait().map(drop)?))
        .unwrap_err();
    assert!(
        matches!(&err, ReserveError::Expired { estimate, .. } if *estimate == usd("2")),
        "{err}"
    );
    assert!(err.to_string().contains("reservation_timeout"), "{err}");
    assert!(matches!(
        reaped
            .release()
            .and_then(|r| Ok(r.wait().map(drop)?))
            .unwrap_err(),
        ReserveError::Expired { .. }
    ));
    assert_eq!(
        row(&l, Scope::Provider, "openai").0,
        usd("5"),
        "nothing more"
    );

    // Without a reaper pass: the commit itself sees the expiry.
    let r = l.reserve(&["gpt-4o-mini"], usd("1")).wait().unwrap();
    clock.pass(Duration::from_secs(62));
    assert!(matches!(
        r.commit(usd("0.5"))
            .and_then(|r| Ok(r.wait().map(drop)?))
            .unwrap_err(),
        ReserveError::Expired { .. }
    ));
    assert_eq!(row(&l, Scope::Provider, "openai").0, usd("6"));
    // Durable: the expired estimates are spend after a reopen.
    drop(l);
    let l = open(dir.path(), &clock);
    assert_eq!(row(&l, Scope::Provider, "openai"), (usd("6"), usd("0")));
}

#[test]
fn a_commit_lands_in_the_window_of_admission() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    clock.set("2024-06-01T12:59:50Z".parse().unwrap());
    let l = open(dir.path(), &clock);
    let r = l.reserve(&["gpt-4o"], usd("7")).wait().unwrap(); // gpt-4o: 8 per hour
    clock.pass(Duration::from_secs(20)); // 13:00:10, the next hour
                                         // The new window does not see the money held in the previous one.
    let next = l.reserve(&["gpt-4o"], usd("1")).wait().unwrap();
    r.commit(usd("7.5")).unwrap().wait().unwrap();
    next.release().unwrap().wait().unwrap();
    let at = |s: &str| s.parse::<Timestamp>().unwrap();
    let model = |t| {
        l.status(StatusQuery::all().at(t))
            .into_iter()
            .find(|s| s.scope == Scope::Model)
            .unwrap()
            .spend
    };
    assert_eq!(model(at("2024-06-01T12:30:00Z")), usd("7.5"));
    assert_eq!(model(at("2024-06-01T13:30:00Z")), usd("0"));
}

#[test]
fn after_shutdown_reserve_is_refused_and_open_ones_count_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = clock();
    let l = open(dir.path(), &clock);
    let r = l.reserve(&["gpt-4o-mini"], usd("4")).wait().unwrap();
    l.shutdown().unwrap();
    assert_eq!(
        l.reserve(&["gpt-4o-mini"], usd("1")).wait().unwrap_err(),
        ReserveError::Record(RecordError::Closed)
    );
    assert!(matches!(
        r.commit(usd("1"))
            .and_then(|r| Ok(r.wait().map(drop)?))
            .unwrap_err(),
        ReserveError::Record(RecordError::Closed)
    ));
    drop(l);
    let l = open(dir.path(), &clock);
    assert_eq!(
        row(&l, Scope::Provider, "openai"),
        (usd("4"), usd("0")),
        "the journaled reservation counts its estimate"
    );
    drop(l);
    let l = open(dir.path(), &clock);
    assert_eq!(row(&l, Scope::Provider, "openai").0, usd("4"), "once");
}

/// The child of the crash test: reserves, commits and releases as told on stdin, printing
/// `ack` after each durable step, until killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var("RESERVE_CRASH_CHILD_DIR") else {
        return; // not the child: nothing to do
    };
    let l = open(Path::new(&dir), &clock());
    let mut open_ones = Vec::new();
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["reserve", model, est] => {
                open_ones.push(l.reserve(&[*model], usd(est)).wait().unwrap())
            }
            ["commit", actual] => {
                open_ones
                    .remove(0)
                    .commit(usd(actual))
                    .unwrap()
                    .wait()
                    .unwrap();
            }
            ["release"] => {
                open_ones.remove(0).release().unwrap().wait().unwrap();
            }
            _ => panic!("bad command {line}"),
        }
        // libtest may have printed `test crash_child ... ` without a newline before.
        writeln!(out, "ack").unwrap();
        out.flush().unwrap();
    }
    std::mem::forget(open_ones); // stdin closed: never reached when killed
}

#[test]
fn sigkill_with_reservations_open_counts_each_estimate_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut expected = Money::ZERO;
    for round in 0..2u64 {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "reserve::crash_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RESERVE_CRASH_CHILD_DIR", dir.path());
        let (mut child, mut stdin, mut acks) = spawn_piped(cmd);
        let mut step = |cmd: &str| {
            writeln!(stdin, "{cmd}").unwrap();
            stdin.flush().unwrap();
            loop {
                let mut line = String::new();
                assert!(
                    acks.read_line(&mut line).unwrap() > 0,
                    "child died at {cmd}"
                );
                if line.trim_end().ends_with("ack") {
                    return;
                }
            }
        };
        // Open A (1.5 claude), B (2 gpt-4o-mini), C (0.25 claude); commit A at 1.75;
        // release B; open D (3 claude); C and D stay open.
        step("reserve claude-3-5-sonnet 1.5");
        step("reserve gpt-4o-mini 2");
        step("reserve claude-3-5-sonnet 0.25");
        step("commit 1.75");
        step("release");
        step("reserve claude-3-5-sonnet 3");
        sigkill(&mut child); // SIGKILL
        expected = expected.saturating_add(usd("5")); // 1.75 + 0.25 + 3
        let l = open(dir.path(), &clock());
        assert_eq!(
            row(&l, Scope::Provider, "anthropic"),
            (expected, Money::ZERO),
            "round {round}"
        );
        assert_eq!(
            row(&l, Scope::Provider, "openai").0,
            Money::ZERO,
            "released"
        );
        assert_eq!(l.health().open_reservations, 0);
    }
}

#[test]
fn a_zero_timeout_is_refused_naming_the_key() {
    let err = Config::from_yaml_str(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  reservation_timeout: 0s\n",
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("provider_budgets.reservation_timeout"),
        "{err}"
    );
    let c = Config::from_yaml_str(
        "provider_budget_config:\n  openai: {budget_limit: 1, time_period: 1d}\nprovider_budgets:\n  reservation_timeout: 90s\n",
    )
    .unwrap();
    assert_eq!(c.reservation_timeout, Duration::from_secs(90));
    let c = Config::from_yaml_str_with_env(
        "provider_budgets:\n  reservation_timeout: os.environ/RES_TIMEOUT\n",
        |name| (name == "RES_TIMEOUT").then(|| "2m 30s".to_owned()),
    )
    .unwrap();
    assert_eq!(c.reservation_timeout, Duration::from_secs(150));
    assert_eq!(
        Config::new().reservation_timeout,
        Duration::from_secs(600),
        "default 10 min"
    );
}

#[test]
fn a_full_disk_refuses_reservations_holding_nothing_and_loses_no_commit() {
    let Some(fs) = tmpfs::Tmpfs::mount("8m") else {
        return;
    };
    let data = fs.path().join("data");
    let clock = clock();
    let l = open(&data, &clock);
    let open_before = l.reserve(&["claude-3-5-sonnet"], usd("2")).wait().unwrap();
    let filler = fs.fill();
    // Once sled has used the room it had, a reservation cannot be made durable: refused,
    // nothing held. Commits of reservations made before stay counted in memory.
    let mut committed = Money::ZERO;
    let mut refused = false;
    for _ in 0..100_000 {
        match l.reserve(&["claude-3-5-sonnet"], usd("0.001")).wait() {
            Ok(r) => match r.commit(usd("0.001")).and_then(|r| Ok(r.wait().map(drop)?)) {
                Ok(()) => committed = committed.saturating_add(usd("0.001")),
                Err(ReserveError::Record(RecordError::Storage(e))) => {
                    assert!(!e.to_string().contains('\n'), "{e}");
                    committed = committed.saturating_add(usd("0.001"));
                }
                Err(e) => panic!("{e}"),
            },
            Err(ReserveError::Record(RecordError::Storage(e))) => {
                assert!(!e.to_string().contains('\n'), "{e}");
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "no reservation was refused on a full disk");
    assert_eq!(
        row(&l, Scope::Provider, "anthropic"),
        (committed, usd("2")),
        "the refused reservation holds nothing"
    );
    let err = open_before
        .commit(usd("1.5"))
        .and_then(|r| Ok(r.wait().map(drop)?))
        .unwrap_err();
    assert!(
        matches!(err, ReserveError::Record(RecordError::Storage(_))),
        "{err}"
    );
    committed = committed.saturating_add(usd("1.5"));
    assert_eq!(
        row(&l, Scope::Provider, "anthropic"),
        (committed, Money::ZERO)
    );

    // Space returns: without a restart, the commits become durable, exactly once.
    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !l.health().storage_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "storage never recovered"
        );
        let _ = provider_budgets::testing::maintain(&l);
    }
    l.flush().unwrap();
    drop(l);
    let l = open(&data, &clock);
    assert_eq!(
        row(&l, Scope::Provider, "anthropic"),
        (committed, Money::ZERO)
    );
}

/// One step of the model test.
#[derive(Debug, Clone)]
enum Op {
    /// Reserve `estimate` cents for gpt-4o (openai 10/d + gpt-4o 8/h) or claude (anthropic).
    Reserve {
        claude: bool,
        cents: u64,
    },
    /// End the open reservation `i % open` by commit of `cents`, release, or drop.
    Commit {
        i: usize,
        cents: u64,
    },
    Release {
        i: usize,
    },
    Drop {
        i: usize,
    },
    /// Let `secs` pass, then the reaper's pass.
    Pass {
        secs: u64,
    },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (any::<bool>(), 0u64..300).prop_map(|(claude, cents)| Op::Reserve { claude, cents }),
        3 => (any::<usize>(), 0u64..400).prop_map(|(i, cents)| Op::Commit { i, cents }),
        1 => any::<usize>().prop_map(|i| Op::Release { i }),
        1 => any::<usize>().prop_map(|i| Op::Drop { i }),
        1 => (1u64..40).prop_map(|secs| Op::Pass { secs }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]

    /// Against a model: after every step, each budget's spend is exactly what was committed,
    /// dropped or expired, its reserved money exactly the open estimates, and spend plus
    /// reserved never passes the limit by more than the commits above their estimate.
    #[test]
    fn reservations_match_a_model_and_keep_the_bound(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let clock = clock(); // 12:00, the 1 h model budget's window lasts until 13:00
        let l = open(dir.path(), &clock);
        let cent = |c: u64| Money::from_nanos(c * 10_000_000);
        // (reservation, claude, estimate cents, opened at secs)
        let mut open_ones: Vec<(Reservation, bool, u64, u64)> = Vec::new();
        let (mut openai, mut anthropic, mut over) = (0u64, 0u64, 0u64); // cents
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Reserve { claude, cents } => {
                    let model = if claude { "claude-3-5-sonnet" } else { "gpt-4o" };
                    let held: u64 = open_ones.iter().filter(|o| o.1 == claude).map(|o| o.2).sum();
                    let (spent, limit) = if claude { (anthropic, 10_000) } else { (openai, 800) };
                    let fits = spent + held < limit && spent + held + cents <= limit;
                    match l.reserve(&[model], cent(cents)).wait() {
                        Ok(r) => {
                            proptest::prop_assert!(fits, "admitted over the limit");
                            open_ones.push((r, claude, cents, now));
                        }
                        Err(ReserveError::Denied(_)) => proptest::prop_assert!(!fits, "refused with room"),
                        Err(e) => panic!("{e}"),
                    }
                }
                Op::Commit { i, cents } if !open_ones.is_empty() => {
                    let (r, claude, est, _) = open_ones.remove(i % open_ones.len());
                    r.commit(cent(cents)).unwrap().wait().unwrap();
                    *(if claude { &mut anthropic } else { &mut openai }) += cents;
                    if !claude {
                        over += cents.saturating_sub(est);
                    }
                }
                Op::Release { i } if !open_ones.is_empty() => {
                    open_ones.remove(i % open_ones.len()).0.release().unwrap().wait().unwrap();
                }
                Op::Drop { i } if !open_ones.is_empty() => {
                    let (r, claude, est, _) = open_ones.remove(i % open_ones.len());
                    drop(r);
                    *(if claude { &mut anthropic } else { &mut openai }) += est;
                }
                Op::Pass { secs } => {
                    clock.pass(Duration::from_secs(secs));
                    now += secs;
                    provider_budgets::testing::maintain(&l).unwrap();
                    // 60 s timeout, whole seconds: expired once 61 s passed since admission.
                    let (gone, kept): (Vec<_>, Vec<_>) =
                        open_ones.into_iter().partition(|o| now >= o.3 + 61);
                    open_ones = kept;
                    for (r, claude, est, _) in gone {
                        *(if claude { &mut anthropic } else { &mut openai }) += est;
                        let expired = matches!(r.release().and_then(|r| Ok(r.wait().map(drop)?)), Err(ReserveError::Expired { .. }));
                        proptest::prop_assert!(expired, "not expired");
                    }
                }
                _ => {}
            }
            let held = |claude: bool| -> u64 {
                open_ones.iter().filter(|o| o.1 == claude).map(|o| o.2).sum()
            };
            proptest::prop_assert_eq!(row(&l, Scope::Provider, "openai"), (cent(openai), cent(held(false))));
            proptest::prop_assert_eq!(row(&l, Scope::Model, "gpt-4o"), (cent(openai), cent(held(false))));
            proptest::prop_assert_eq!(row(&l, Scope::Provider, "anthropic"), (cent(anthropic), cent(held(true))));
            proptest::prop_assert!(openai + held(false) <= 800 + over, "bound: {} + {} > 800 + {}", openai, held(false), over);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_forms_admit_commit_and_release_like_the_blocking_ones() {
    let dir = tempfile::tempdir().unwrap();
    let l = open(dir.path(), &clock());
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let l = l.clone();
            tokio::spawn(async move {
                let r = l
                    .reserve(&["gpt-4o-mini", "claude-3-5-sonnet"], usd("1"))
                    .await
                    .unwrap();
                let first = r.deployment_index() == 0;
                if i % 2 == 0 {
                    r.commit(usd("0.5")).unwrap().await.unwrap();
                } else {
                    r.release().unwrap().await.unwrap();
                }
                first
            })
        })
        .collect();
    let mut on_openai = 0;
    for t in tasks {
        on_openai += usize::from(t.await.unwrap());
    }
    // openai (10) has room for 10 held estimates of 1 at once: at least 10 go there.
    assert!(on_openai >= 10, "{on_openai}");
    let (openai, held_o) = row(&l, Scope::Provider, "openai");
    let (anthropic, held_a) = row(&l, Scope::Provider, "anthropic");
    assert_eq!((held_o, held_a), (Money::ZERO, Money::ZERO));
    assert_eq!(
        openai.saturating_add(anthropic),
        usd("4"),
        "8 commits of 0.5"
    );
    drop(l);
    let l = open(dir.path(), &clock());
    let (o, a) = (
        row(&l, Scope::Provider, "openai").0,
        row(&l, Scope::Provider, "anthropic").0,
    );
    assert_eq!((o, a), (openai, anthropic), "durable");
}
