//! `window: sliding`: the previous window counts, weighted by how much of it still lies in the
//! trailing period. A burst at a boundary is refused (and admitted by a fixed window); a
//! reload switches the shape in place; `filter`, `reserve` and `status` agree with a naive
//! model over random spend, including clock steps backwards and forwards.

#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use std::path::Path;

use jiff::{SignedDuration, Timestamp};
use provider_budgets::{
    Config, FakeClock, Limiter, Money, Spend, StatusQuery, WindowShape, NO_TAGS,
};

/// A window boundary (10 s windows and 1 h windows both start here).
const START: &str = "2024-06-01T12:00:00Z";

fn usd(s: &str) -> Money {
    s.parse().unwrap()
}

fn config(dir: &Path, openai: &str) -> Config {
    Config::from_yaml_str(&format!("provider_budget_config:\n  openai: {openai}\n"))
        .unwrap()
        .data_dir(dir)
}

fn at(clock: &FakeClock, secs: i64) {
    clock.set(
        START
            .parse::<Timestamp>()
            .unwrap()
            .checked_add(SignedDuration::from_secs(secs))
            .unwrap(),
    );
}

fn admits(l: &Limiter, estimate: Money) -> bool {
    match l.reserve(&["gpt-4o"], estimate).wait() {
        Ok(r) => {
            r.release().unwrap();
            true
        }
        Err(_) => false,
    }
}

fn row(l: &Limiter) -> provider_budgets::BudgetStatus {
    l.status(StatusQuery::provider("openai")).pop().unwrap()
}

#[test]
fn a_burst_at_the_boundary_is_refused_by_a_sliding_window_and_admitted_by_a_fixed_one() {
    for (shape, admitted) in [("fixed", true), ("sliding", false)] {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::new(START.parse().unwrap());
        let l = support::open(
            config(
                dir.path(),
                &format!("{{budget_limit: 1, time_period: 1h, window: {shape}}}"),
            ),
            &clock,
        );
        at(&clock, 3599);
        l.charge(Spend::provider("openai", usd("0.99"))).unwrap();
        at(&clock, 3600);
        assert_eq!(admits(&l, usd("0.99")), admitted, "{shape}");
        assert!(l.filter(&["gpt-4o"], NO_TAGS).is_ok(), "{shape}: 0.99 < 1");
        let s = row(&l);
        assert_eq!(
            s.spend,
            Money::ZERO,
            "{shape}: the current window's own spend"
        );
        match shape {
            "fixed" => assert_eq!(
                (s.window_shape, s.sliding_spend),
                (WindowShape::Fixed, None)
            ),
            _ => assert_eq!(
                (s.window_shape, s.sliding_spend),
                (WindowShape::Sliding, Some(usd("0.99")))
            ),
        }
        // Half-way through the window, half of the previous one counts.
        at(&clock, 5400);
        assert!(admits(&l, usd("0.5")), "{shape}");
        assert_eq!(admits(&l, usd("0.51")), admitted, "{shape}");
        l.charge(Spend::provider("openai", usd("0.51"))).unwrap();
        let blocked = l.filter(&["gpt-4o"], NO_TAGS).is_err();
        assert_eq!(
            blocked, !admitted,
            "{shape}: 0.51 + 0.495 >= 1 only when sliding"
        );
        if !admitted {
            assert!(row(&l).exhausted);
            assert_eq!(row(&l).sliding_spend, Some(usd("1.005")));
            let e = l.filter(&["gpt-4o"], NO_TAGS).unwrap_err();
            assert_eq!(e.exceeded[0].spend, usd("1.005"), "{e}");
        }
    }
}

#[test]
fn a_reload_switches_fixed_sliding_fixed_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(START.parse().unwrap());
    let fixed = "{budget_limit: 1, time_period: 10s}";
    let sliding = "{budget_limit: 1, time_period: 10s, window: sliding}";
    let l = support::open(config(dir.path(), fixed), &clock);
    at(&clock, 5);
    l.charge(Spend::provider("openai", usd("0.8"))).unwrap();
    at(&clock, 11); // 0.9 of the previous window still counts: 0.72
    assert!(admits(&l, usd("0.5")));
    let r = l.reload(config(dir.path(), sliding)).unwrap();
    assert_eq!(r.changed, ["openai"], "{r:?}");
    assert!(r.added.is_empty() && r.removed.is_empty(), "{r:?}");
    assert!(!admits(&l, usd("0.5")), "0.72 + 0.5 > 1");
    assert!(admits(&l, usd("0.28")));
    let s = row(&l);
    assert_eq!(s.sliding_spend, Some(usd("0.72")));
    l.charge(Spend::provider("openai", usd("0.28"))).unwrap();
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err(), "1.0 >= 1");
    l.reload(config(dir.path(), fixed)).unwrap();
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_ok(), "0.28 < 1");
    let s = row(&l);
    assert_eq!((s.spend, s.sliding_spend), (usd("0.28"), None));
    // Back to sliding: the same series, the spend kept (also across a reopen).
    l.reload(config(dir.path(), sliding)).unwrap();
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err());
    l.flush().unwrap();
    drop(l);
    let l = support::open(config(dir.path(), sliding), &clock);
    assert_eq!(row(&l).sliding_spend, Some(usd("1")));
    assert!(l.filter(&["gpt-4o"], NO_TAGS).is_err());
}

mod model {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: u64 = 100;
    const LEN: i64 = 10;

    #[derive(Debug, Clone)]
    enum Op {
        /// Sets the clock (seconds after START): steps forwards and backwards.
        Step(i64),
        Charge(u64),
        /// Reserve, then commit the estimate (when admitted).
        Reserve(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (-12i64..=25).prop_map(Op::Step),
            (1u64..=40).prop_map(Op::Charge),
            (1u64..=60).prop_map(Op::Reserve),
        ]
    }

    /// Spend events (second, nanos), and the sliding spend of the naive definition.
    #[derive(Default)]
    struct Model(Vec<(i64, u64)>);

    impl Model {
        fn sliding(&self, t: i64) -> u64 {
            let k = t.div_euclid(LEN);
            let total = |w: i64| -> u64 {
                self.0
                    .iter()
                    .filter(|(s, _)| s.div_euclid(LEN) == w)
                    .map(|(_, n)| n)
                    .sum()
            };
            // Seconds of the previous window inside [t - LEN, t).
            let overlap = (k * LEN) - (t - LEN);
            let prev = total(k - 1);
            let weighted = (prev * overlap as u64).div_ceil(LEN as u64);
            total(k) + weighted
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn filter_reserve_and_status_follow_the_naive_sliding_model(
            ops in proptest::collection::vec(op(), 1..60)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let clock = FakeClock::new(START.parse().unwrap());
            let l = support::open(
                config(dir.path(), "{budget_limit: 0.0000001, time_period: 10s, window: sliding}"),
                &clock,
            );
            let mut model = Model::default();
            let mut t: i64 = 100;
            at(&clock, t);
            for op in ops {
                match op {
                    Op::Step(d) => {
                        t = (t + d).max(0);
                        at(&clock, t);
                    }
                    Op::Charge(n) => {
                        l.charge(Spend::provider("openai", Money::from_nanos(n))).unwrap();
                        model.0.push((t, n));
                    }
                    Op::Reserve(n) => {
                        let room = model.sliding(t) + n <= LIMIT;
                        let r = l.reserve(&["gpt-4o"], Money::from_nanos(n)).wait();
                        prop_assert_eq!(r.is_ok(), room, "reserve {} at {}", n, t);
                        if let Ok(r) = r {
                            r.commit(Money::from_nanos(n)).unwrap();
                            model.0.push((t, n));
                        }
                    }
                }
                let want = model.sliding(t);
                let s = row(&l);
                prop_assert_eq!(s.sliding_spend, Some(Money::from_nanos(want)), "at {}", t);
                prop_assert_eq!(
                    l.filter(&["gpt-4o"], NO_TAGS).is_ok(),
                    want < LIMIT,
                    "filter at {} (sliding spend {})", t, want
                );
            }
        }
    }
}

#[test]
fn retention_keeps_the_previous_window_of_a_sliding_budget_only() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(START.parse().unwrap());
    let yaml = "provider_budget_config:
  openai: {budget_limit: 1, time_period: 1h, window: sliding}
  anthropic: {budget_limit: 1, time_period: 1h}
provider_budgets:
  storage: {retention: 10m}
";
    let open = || {
        support::open(
            Config::from_yaml_str(yaml).unwrap().data_dir(dir.path()),
            &clock,
        )
    };
    at(&clock, 3540); // 12:59 (a step: before the open, whose time retention starts from)
    let l = open();
    for p in ["openai", "anthropic"] {
        l.charge(Spend::provider(p, usd("0.8"))).unwrap();
    }
    l.flush().unwrap(); // journaled (touched) before the time passes
                        // 13:30 by time that really passes (a clock step would not let retention delete).
    clock.pass(std::time::Duration::from_secs(31 * 60));
    provider_budgets::testing::maintain(&l).unwrap();
    assert!(l.windows("anthropic").is_empty(), "past its retention");
    assert_eq!(
        l.windows("openai").len(),
        1,
        "still counted by the sliding window"
    );
    assert_eq!(row(&l).sliding_spend, Some(usd("0.4")));
    drop(l);
    let l = open();
    assert_eq!(row(&l).sliding_spend, Some(usd("0.4")), "kept on disk too");
    // Once the next window starts, the old one is no longer needed.
    clock.pass(std::time::Duration::from_secs(3600));
    provider_budgets::testing::maintain(&l).unwrap();
    assert!(l.windows("openai").is_empty());
}

#[test]
fn a_soft_limit_fires_on_the_sliding_spend() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(START.parse().unwrap());
    let l = support::open(
        Config::from_yaml_str(
            "provider_budgets:\n  budgets:\n    - {provider: openai, limit: 1, period: 1h, window: sliding, soft_limits: [0.5]}\n",
        )
        .unwrap()
        .data_dir(dir.path()),
        &clock,
    );
    let fired = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&fired);
    l.on_soft_limit(move |e: &provider_budgets::SoftLimitCrossed| {
        sink.lock().unwrap().push((e.window.start(), e.spend));
    });
    at(&clock, 3599);
    l.charge(Spend::provider("openai", usd("0.45"))).unwrap();
    at(&clock, 3600 + 1800); // half of the previous window counts: 0.225
    l.charge(Spend::provider("openai", usd("0.25"))).unwrap();
    assert!(fired.lock().unwrap().is_empty(), "0.475 < 0.5");
    l.charge(Spend::provider("openai", usd("0.03"))).unwrap();
    drop(l); // waits for the alert thread
    let fired = fired.lock().unwrap();
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert_eq!(fired[0].1, usd("0.505"), "0.28 + 0.225");
}

#[test]
fn a_templated_name_stays_while_its_previous_window_still_counts() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(START.parse().unwrap());
    let l = support::open(
        Config::from_yaml_str(
            "provider_budgets:\n  budgets:\n    - {key: \"*\", limit: 1, period: 1h, window: sliding, max_series: 1}\n",
        )
        .unwrap()
        .data_dir(dir.path()),
        &clock,
    );
    let (a, b) = (
        provider_budgets::Identity::new().key("a"),
        provider_budgets::Identity::new().key("b"),
    );
    let names = |l: &Limiter| -> Vec<String> {
        l.status(StatusQuery::all().scope(provider_budgets::Scope::Key))
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    at(&clock, 3599);
    l.charge(Spend::provider("openai", usd("1")).identity(&a))
        .unwrap();
    at(&clock, 3600);
    assert!(
        l.filter_for(&["gpt-4o"], NO_TAGS, &a).is_err(),
        "1 × 1 >= 1"
    );
    // a's hour ended but still counts: b finds no room, a keeps its series.
    assert!(l.filter_for(&["gpt-4o"], NO_TAGS, &b).is_err());
    l.charge(Spend::provider("openai", usd("0.1")).identity(&b))
        .unwrap();
    assert_eq!(names(&l), ["*", "a"]);
    // An hour later a's spend no longer counts: b takes the room.
    at(&clock, 7200);
    l.charge(Spend::provider("openai", usd("0.1")).identity(&b))
        .unwrap();
    assert_eq!(names(&l), ["*", "b"]);
}

#[test]
fn a_sliding_tokens_per_minute_budget_refuses_the_boundary_burst() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::new(START.parse().unwrap());
    let l = support::open(
        Config::from_yaml_str(
            "provider_budgets:\n  budgets:\n    - {model: gpt-4o, unit: tokens, limit: 1000, period: 1m, window: sliding}\n",
        )
        .unwrap()
        .data_dir(dir.path()),
        &clock,
    );
    let d = provider_budgets::Target::parse("openai/gpt-4o");
    at(&clock, 59);
    l.charge(Spend::deployment(&d, usd("0.01")).usage(provider_budgets::Usage::new(600, 300)))
        .unwrap();
    at(&clock, 60); // all 900 tokens of the last minute still count
    let row = l.status(StatusQuery::all()).pop().unwrap();
    assert_eq!(row.sliding_spend.map(Money::as_nanos), Some(900));
    l.charge(Spend::deployment(&d, usd("0.01")).usage(provider_budgets::Usage::new(60, 40)))
        .unwrap();
    assert!(
        l.filter(&["openai/gpt-4o"], NO_TAGS).is_err(),
        "900 + 100 >= 1000"
    );
    at(&clock, 90); // half: 450 + 100
    assert!(l.filter(&["openai/gpt-4o"], NO_TAGS).is_ok());
}
