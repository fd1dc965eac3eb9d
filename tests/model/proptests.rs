//! Property tests pinning four things against independent models:
//!
//! * the [`Limiter`] as a state machine: random records (buffered and durable, now or at
//!   instants in earlier/later windows and right at boundaries, zero to saturating costs, to
//!   providers with and without budgets), clock moves, restarts and filters are replayed
//!   against a plain `HashMap<(budget, window start), nanos>` whose windows are computed
//!   here with our own arithmetic. After every step `status`, `budget_status`, `windows`,
//!   `filter`, `filter_in_place` and `Prepared::filter` must agree with the model exactly;
//! * window arithmetic of [`Schedule`]: every instant is in exactly one window, windows tile
//!   time, fixed periods align to the anchor (also before it and before 1970), month windows
//!   start on the anchor's day (clamped to the month's length) and time, in UTC;
//! * configuration: generated budgets rendered as YAML and TOML, at the top level and under
//!   `router_settings`, parse back to the same budgets; bad periods, negative limits and
//!   unknown keys in `provider_budgets` are rejected with errors naming provider/key and value;
//! * request amounts (the sidecar's exact parsers): any way of writing an amount reads as
//!   exactly that amount, past `u64::MAX` nanos is too large and any negative is negative
//!   however written, and near-miss texts keep the `request_money` fuzz target's properties.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use jiff::civil::DateTime;
use jiff::tz::Offset;
use jiff::{SignedDuration, Span, Timestamp};
use proptest::prelude::*;
use provider_budgets::{
    BudgetConfig, Config, ConfigError, FakeClock, Limiter, Money, MoneyError, Period, RecordError,
    Schedule, Scope, Target, UnknownProvider,
};
use provider_budgets::{Spend, StatusQuery, NO_TAGS};
use provider_budgets_test_support::fuzz_checks as checks;

// ---- independent window arithmetic ----------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Per {
    Secs(i64),
    Months(i64),
}

fn civil(secs: i64) -> DateTime {
    Offset::UTC.to_datetime(Timestamp::from_second(secs).unwrap())
}

/// Start of the month window that begins `months` months after the anchor: jiff's calendar
/// arithmetic (which clamps the day to the month's length), not the crate's.
fn month_start(anchor: i64, months: i64) -> i64 {
    let span = Span::new().try_months(months).unwrap();
    let dt = civil(anchor).checked_add(span).unwrap();
    Offset::UTC.to_timestamp(dt).unwrap().as_second()
}

/// `[start, end)` of the window containing `t` (whole Unix seconds).
fn model_window(per: Per, anchor: i64, t: i64) -> (i64, i64) {
    match per {
        Per::Secs(p) => {
            let k = (t - anchor).div_euclid(p);
            (anchor + k * p, anchor + (k + 1) * p)
        }
        Per::Months(n) => {
            let (a, c) = (civil(anchor), civil(t));
            let months = (i64::from(c.year()) * 12 + i64::from(c.month()))
                - (i64::from(a.year()) * 12 + i64::from(a.month()));
            let mut k = months.div_euclid(n);
            while month_start(anchor, k * n) > t {
                k -= 1;
            }
            while month_start(anchor, (k + 1) * n) <= t {
                k += 1;
            }
            (month_start(anchor, k * n), month_start(anchor, (k + 1) * n))
        }
    }
}

/// Whole seconds of an instant, rounded toward minus infinity.
fn secs_of(t: Timestamp) -> i64 {
    t.as_millisecond().div_euclid(1000)
}

fn ts_ms(ms: i64) -> Timestamp {
    Timestamp::from_millisecond(ms).unwrap()
}

// ---- (a) the limiter against a model ------------------------------------------------------------

struct ModelBudget {
    provider: &'static str,
    per: Per,
    period: &'static str,
    limit: u64,
}

/// Sorted by provider, as `Config::budgets` is.
const BUDGETS: [ModelBudget; 5] = [
    ModelBudget {
        provider: "anthropic",
        per: Per::Secs(60),
        period: "1m",
        limit: 5_000,
    },
    ModelBudget {
        provider: "azure",
        per: Per::Secs(3_600),
        period: "1h",
        limit: 1_000_000_000,
    },
    ModelBudget {
        provider: "cohere",
        per: Per::Secs(86_400),
        period: "1d",
        limit: 0,
    },
    ModelBudget {
        provider: "mistral",
        per: Per::Months(1),
        period: "1mo",
        limit: 3,
    },
    ModelBudget {
        provider: "openai",
        per: Per::Secs(7),
        period: "7s",
        limit: 1_000,
    },
];

/// Providers `record` is called with: the budgets, one known provider without a budget, one
/// name nobody knows.
const RECORD_PROVIDERS: [&str; 7] = [
    "anthropic",
    "azure",
    "cohere",
    "mistral",
    "openai",
    "gemini",
    "nonexistent",
];

/// Anchor on the 31st, off the minute: month windows start on the last day of short months.
const ANCHOR: &str = "2024-01-31T09:00:03Z";

/// What a deployment resolves to in the model.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Res {
    Budget(usize),
    NoBudget,
    Unknown,
}

fn deployments() -> Vec<(Target, Res)> {
    let bare = |m: &str| Target::parse(m);
    vec![
        (bare("gpt-4o"), Res::Budget(4)),
        (bare("claude-3-5-sonnet"), Res::Budget(0)),
        (bare("azure/gpt-4o"), Res::Budget(1)),
        (bare("mistral-large"), Res::Budget(3)),
        (bare("command-r"), Res::Budget(2)),
        (bare("gemini-1.5-pro"), Res::NoBudget),
        (bare("my-fine-tune"), Res::Unknown),
        (Target::new("gpt-4o", "azure"), Res::Budget(1)),
        (Target::new("llama-3", "groq"), Res::NoBudget),
        (bare("o1-mini"), Res::Budget(4)),
    ]
}

/// Bits of `deployments()` whose provider has a budget.
const BUDGETED: u16 = 0b10_1001_1111;

fn config_yaml(deny: bool) -> String {
    let mut s = String::from("provider_budget_config:\n");
    for b in &BUDGETS {
        let limit = Money::from_nanos(b.limit);
        s.push_str(&format!(
            "  {}: {{budget_limit: \"{limit}\", time_period: {}}}\n",
            b.provider, b.period
        ));
    }
    s.push_str(&format!(
        "provider_budgets:\n  window_anchor: \"{ANCHOR}\"\n  unknown_provider: {}\n  storage: {{retention: 1000days, max_delay: 1ms}}\n",
        if deny { "deny" } else { "allow" }
    ));
    s
}

#[derive(Clone, Debug)]
enum At {
    Now,
    /// Milliseconds from now.
    Offset(i64),
    /// Milliseconds from the start (`false`) or end (`true`) of a budget's current window.
    Edge(usize, bool, i64),
}

#[derive(Clone, Debug)]
enum Op {
    Record {
        provider: usize,
        cost: u64,
        at: At,
        durable: bool,
    },
    Advance {
        ms: i64,
    },
    /// Sets the clock to `ms` around the end of a budget's current window.
    ToEdge {
        budget: usize,
        ms: i64,
    },
    Reopen,
    Filter {
        mask: u16,
    },
}

fn cost() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => Just(0u64),
        6 => 1u64..=3_000,
        2 => 100_000_000u64..=700_000_000,
        1 => Just(u64::MAX - 1),
    ]
}

fn at() -> impl Strategy<Value = At> {
    prop_oneof![
        3 => Just(At::Now),
        3 => (-4_000_000i64..4_000_000).prop_map(At::Offset),
        3 => (0..BUDGETS.len(), any::<bool>(), -1_500i64..1_500)
            .prop_map(|(b, e, d)| At::Edge(b, e, d)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..RECORD_PROVIDERS.len(), cost(), at(), prop::bool::weighted(0.25))
            .prop_map(|(provider, cost, at, durable)| Op::Record { provider, cost, at, durable }),
        2 => prop_oneof![0i64..3_000, 0i64..200_000, 0i64..5_000_000].prop_map(|ms| Op::Advance { ms }),
        2 => (0..BUDGETS.len(), -1_500i64..1_500).prop_map(|(budget, ms)| Op::ToEdge { budget, ms }),
        1 => Just(Op::Reopen),
        // Any subset, only budgeted deployments, or one to three of those and the unknown one:
        // small sets of budgeted deployments are often all exhausted, when NoDeployments is due.
        3 => prop_oneof![
            any::<u16>(),
            any::<u16>().prop_map(|m| m & BUDGETED),
            (prop::sample::subsequence(vec![0u16, 1, 2, 3, 4, 6, 7, 9], 1..=3))
                .prop_map(|ix| ix.iter().fold(0, |m, i| m | 1 << i)),
        ]
        .prop_map(|mask| Op::Filter { mask }),
    ]
}

struct Harness {
    dir: tempfile::TempDir,
    config: Config,
    clock: FakeClock,
    limiter: Option<Limiter>,
    anchor: i64,
    deny: bool,
    /// (budget, window start) → (window end, nanos)
    model: HashMap<(usize, i64), (i64, u64)>,
}

impl Harness {
    fn limiter(&self) -> &Limiter {
        self.limiter.as_ref().unwrap()
    }

    fn now_ms(&self) -> i64 {
        self.limiter().now().as_millisecond()
    }

    fn window(&self, b: usize, t: i64) -> (i64, i64) {
        model_window(BUDGETS[b].per, self.anchor, t)
    }

    fn spend(&self, b: usize, t: i64) -> u64 {
        let (start, _) = self.window(b, t);
        self.model.get(&(b, start)).map_or(0, |e| e.1)
    }

    fn reopen(&mut self) {
        drop(self.limiter.take()); // drop flushes and releases the dir
        let clock: Arc<FakeClock> = Arc::new(self.clock.clone());
        self.limiter = Some(
            Limiter::builder(self.config.clone())
                .clock(clock)
                .open()
                .unwrap(),
        );
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Record {
                provider,
                cost,
                at,
                durable,
            } => {
                let name = RECORD_PROVIDERS[*provider];
                let now = self.now_ms();
                let at_ms = match at {
                    At::Now => now,
                    At::Offset(d) => now + d,
                    At::Edge(b, end, d) => {
                        let (s, e) = self.window(*b, now.div_euclid(1000));
                        (if *end { e } else { s }) * 1000 + d
                    }
                };
                let l = self.limiter();
                let cost_m = Money::from_nanos(*cost);
                let result = match (at, durable) {
                    (At::Now, false) => {
                        l.charge(Spend::provider(name, cost_m)).map(|r| r.budgets())
                    }
                    (At::Now, true) => l
                        .charge(Spend::provider(name, cost_m))
                        .and_then(|r| r.wait()),
                    (_, false) => l
                        .charge(Spend::provider(name, cost_m).at(ts_ms(at_ms)))
                        .map(|r| r.budgets()),
                    (_, true) => l
                        .charge(Spend::provider(name, cost_m).at(ts_ms(at_ms)))
                        .and_then(|r| r.wait()),
                };
                // Later than now plus the skew (to the second): refused, nothing counted.
                let future = !matches!(at, At::Now)
                    && at_ms.div_euclid(1000)
                        > self.now_ms().div_euclid(1000)
                            + i64::try_from(provider_budgets::MAX_FUTURE_SKEW.as_secs()).unwrap();
                match BUDGETS.iter().position(|b| b.provider == name) {
                    Some(_) if future => {
                        prop_assert!(
                            matches!(result, Err(RecordError::Future { .. })),
                            "{result:?}"
                        );
                    }
                    Some(b) => {
                        prop_assert!(matches!(result, Ok(n) if n > 0), "{result:?}");
                        if *cost > 0 {
                            let (start, end) = self.window(b, at_ms.div_euclid(1000));
                            let e = self.model.entry((b, start)).or_insert((end, 0));
                            e.1 = e.1.saturating_add(*cost);
                        }
                    }
                    None => prop_assert_eq!(result, Ok(0)),
                }
            }
            Op::Advance { ms } => self.clock.advance(SignedDuration::from_millis(*ms)),
            Op::ToEdge { budget, ms } => {
                let now = self.now_ms().div_euclid(1000);
                let (_, end) = self.window(*budget, now);
                self.clock.set(ts_ms(end * 1000 + ms));
            }
            Op::Reopen => self.reopen(),
            Op::Filter { mask } => {
                let all = deployments();
                let subset: Vec<(Target, Res)> = all
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| mask & (1 << i) != 0)
                    .map(|(_, d)| d)
                    .collect();
                self.check_filter(&subset)?;
            }
        }
        Ok(())
    }

    /// Status, budget_status and windows against the model; filter of every deployment.
    fn check(&self) -> Result<(), TestCaseError> {
        let l = self.limiter();
        let now = secs_of(l.now());
        let status = l.status(StatusQuery::all());
        prop_assert_eq!(status.len(), BUDGETS.len());
        for (b, (st, mb)) in status.iter().zip(&BUDGETS).enumerate() {
            let (start, end) = self.window(b, now);
            let spend = self.spend(b, now);
            prop_assert_eq!(&st.provider, mb.provider);
            prop_assert_eq!(st.period.to_string(), mb.period);
            prop_assert_eq!((st.window.start_secs(), st.window.end_secs()), (start, end));
            prop_assert_eq!(st.spend.as_nanos(), spend, "spend of {}", mb.provider);
            prop_assert_eq!(st.own_spend.as_nanos(), spend);
            prop_assert_eq!(st.limit.as_nanos(), mb.limit);
            prop_assert_eq!(st.remaining.as_nanos(), mb.limit.saturating_sub(spend));
            prop_assert_eq!(st.exhausted, spend >= mb.limit);
            prop_assert_eq!(
                l.status(StatusQuery::provider(mb.provider))
                    .into_iter()
                    .next(),
                Some(st.clone())
            );
            // Every window spent in is still readable, newest first, with its exact total.
            let mut expected: Vec<(i64, i64, u64)> = self
                .model
                .iter()
                .filter(|((bb, _), _)| *bb == b)
                .map(|(&(_, s), &(e, t))| (s, e, t))
                .collect();
            expected.sort_by_key(|w| std::cmp::Reverse(w.0));
            let got: Vec<(i64, i64, u64)> = l
                .windows(mb.provider)
                .into_iter()
                .map(|(w, m)| (w.start_secs(), w.end_secs(), m.as_nanos()))
                .collect();
            prop_assert_eq!(got, expected, "windows of {}", mb.provider);
        }
        prop_assert_eq!(
            l.status(StatusQuery::provider("gemini")).into_iter().next(),
            None
        );
        prop_assert!(l.windows("gemini").is_empty());
        self.check_filter(&deployments())
    }

    fn check_filter(&self, subset: &[(Target, Res)]) -> Result<(), TestCaseError> {
        let l = self.limiter();
        let now = secs_of(l.now());
        let passes = |r: Res| match r {
            Res::Budget(b) => self.spend(b, now) < BUDGETS[b].limit,
            Res::NoBudget => true,
            Res::Unknown => !self.deny,
        };
        let targets: Vec<Target> = subset.iter().map(|d| d.0.clone()).collect();
        let expected: Vec<usize> = (0..subset.len()).filter(|&i| passes(subset[i].1)).collect();
        let expected_targets: Vec<&Target> = expected.iter().map(|&i| &targets[i]).collect();

        let got = l.filter(&targets, NO_TAGS);
        let prepared = l.prepare(&targets).filter(NO_TAGS);
        let mut in_place = targets.clone();
        let in_place_result = l.filter_in_place(&mut in_place, NO_TAGS);

        if expected.is_empty() && !subset.is_empty() {
            let err = got.unwrap_err();
            // Each exhausted provider among the candidates, once, in order of appearance.
            let mut exceeded: Vec<(String, u64, u64)> = Vec::new();
            for (_, r) in subset {
                if let Res::Budget(b) = r {
                    let row = (
                        BUDGETS[*b].provider.to_owned(),
                        self.spend(*b, now),
                        BUDGETS[*b].limit,
                    );
                    if !exceeded.contains(&row) {
                        exceeded.push(row);
                    }
                }
            }
            let got_exceeded: Vec<(String, u64, u64)> = err
                .exceeded
                .iter()
                .map(|e| (e.provider.clone(), e.spend.as_nanos(), e.limit.as_nanos()))
                .collect();
            prop_assert_eq!(got_exceeded, exceeded);
            let unknown: Vec<String> = subset
                .iter()
                .filter(|d| d.1 == Res::Unknown)
                .map(|d| d.0.model.clone())
                .collect();
            prop_assert_eq!(&err.unknown, &unknown);
            let msg = err.to_string();
            prop_assert!(
                msg.starts_with("No deployments available - crossed budget:"),
                "{}",
                msg
            );
            for e in &err.exceeded {
                let line = format!(
                    "Exceeded budget for provider {}: {} >= {}",
                    e.provider, e.spend, e.limit
                );
                prop_assert!(msg.contains(&line), "{} lacks {}", msg, line);
            }
            prop_assert_eq!(prepared.unwrap_err(), err.clone());
            prop_assert_eq!(in_place_result.unwrap_err(), err);
            prop_assert_eq!(in_place, targets); // unchanged on error
        } else {
            prop_assert_eq!(got.unwrap(), expected_targets.clone());
            prop_assert_eq!(prepared.unwrap(), expected);
            prop_assert_eq!(in_place_result, Ok(()));
            let kept: Vec<Target> = expected_targets.into_iter().cloned().collect();
            prop_assert_eq!(in_place, kept);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn limiter_matches_model(
        start_offset_ms in -7_200_000i64..7_200_000,
        deny in any::<bool>(),
        ops in prop::collection::vec(op(), 1..40),
    ) {
        let anchor: Timestamp = ANCHOR.parse().unwrap();
        // Start near the end of the February window (which starts on the 29th, clamped).
        let feb_end: Timestamp = "2024-02-29T09:00:03Z".parse().unwrap();
        let clock = FakeClock::new(ts_ms(feb_end.as_millisecond() + start_offset_ms));
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_yaml_str(&config_yaml(deny)).unwrap().data_dir(dir.path());
        prop_assert_eq!(config.budgets.len(), BUDGETS.len());
        let limiter = Limiter::builder(config.clone()).clock(Arc::new(clock.clone())).open().unwrap();
        let mut h = Harness {
            dir,
            config,
            clock,
            limiter: Some(limiter),
            anchor: anchor.as_second(),
            deny,
            model: HashMap::new(),
        };
        h.check()?;
        for op in &ops {
            h.apply(op)?;
            h.check()?;
        }
        // A last restart: everything recorded survives it exactly.
        h.reopen();
        h.check()?;
        drop(h.limiter.take());
        drop(h.dir);
    }
}

// ---- (b) window arithmetic --------------------------------------------------------------------

/// Periods with their length: fixed seconds or months.
fn period() -> impl Strategy<Value = (String, Per)> {
    prop_oneof![
        (1i64..=120).prop_map(|n| (format!("{n}s"), Per::Secs(n))),
        (1i64..=90).prop_map(|n| (format!("{n}m"), Per::Secs(n * 60))),
        (1i64..=72).prop_map(|n| (format!("{n}h"), Per::Secs(n * 3_600))),
        (1i64..=40).prop_map(|n| (format!("{n}d"), Per::Secs(n * 86_400))),
        (1i64..=8).prop_map(|n| (format!("{n}w"), Per::Secs(n * 7 * 86_400))),
        (1i64..=30).prop_map(|n| (format!("{n}mo"), Per::Months(n))),
    ]
}

/// Instants from 1811 to 2128, whole seconds, plus anchors with day-of-month 28..31 often.
fn instant() -> impl Strategy<Value = i64> {
    -5_000_000_000i64..5_000_000_000
}

fn anchor() -> impl Strategy<Value = i64> {
    prop_oneof![
        instant(),
        // the 28th..31st of a month at some time of day
        (
            1900i16..2100,
            1i8..=12,
            28i8..=31,
            0i8..24,
            0i8..60,
            0i8..60
        )
            .prop_map(|(y, m, d, hh, mm, ss)| {
                let first = jiff::civil::date(y, m, 1);
                let d = d.min(first.days_in_month());
                let dt = jiff::civil::datetime(y, m, d, hh, mm, ss, 0);
                Offset::UTC.to_timestamp(dt).unwrap().as_second()
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_instant_is_in_exactly_one_window(
        (text, per) in period(),
        anchor in anchor(),
        t in instant(),
        dt in -100_000_000i64..100_000_000,
        sub_ms in 0i64..1000,
    ) {
        let p: Period = text.parse().unwrap();
        prop_assert_eq!(p.to_string(), text.clone());
        let s = Schedule::new(p, Timestamp::from_second(anchor).unwrap());
        let w = s.window_at_secs(t);
        prop_assert!(w.contains_secs(t));
        prop_assert!(w.start_secs() <= t && t < w.end_secs());
        // Sub-second parts never move an instant to another window.
        prop_assert_eq!(s.window_at(ts_ms(t * 1000 + sub_ms)), w);
        prop_assert_eq!(w.start().as_second(), w.start_secs());
        prop_assert_eq!(w.end().as_second(), w.end_secs());
        // Same window iff inside [start, end).
        let t2 = t + dt;
        prop_assert_eq!(s.window_at_secs(t2) == w, w.contains_secs(t2));
        // Windows tile time: the window at `end` starts there, the one before `start` ends there.
        let next = s.window_at_secs(w.end_secs());
        prop_assert_eq!(next.start_secs(), w.end_secs());
        let prev = s.window_at_secs(w.start_secs() - 1);
        prop_assert_eq!(prev.end_secs(), w.start_secs());
        prop_assert_eq!(s.window_at_secs(w.end_secs() - 1), w);
        prop_assert_eq!(s.window_at_secs(w.start_secs()), w);
        // The independent model agrees.
        prop_assert_eq!((w.start_secs(), w.end_secs()), model_window(per, anchor, t));
        match per {
            Per::Secs(len) => {
                prop_assert_eq!(w.end_secs() - w.start_secs(), len);
                prop_assert_eq!((w.start_secs() - anchor).rem_euclid(len), 0);
                // Before the anchor too: the anchor is a boundary, never inside a window.
                if t < anchor {
                    prop_assert!(w.end_secs() <= anchor);
                } else {
                    prop_assert!(w.start_secs() >= anchor);
                }
            }
            Per::Months(n) => {
                let a = civil(anchor);
                let (st, en) = (civil(w.start_secs()), civil(w.end_secs()));
                for c in [st, en] {
                    prop_assert_eq!(c.day(), a.day().min(c.date().days_in_month()), "{} anchor {}", c, a);
                    prop_assert_eq!((c.hour(), c.minute(), c.second()), (a.hour(), a.minute(), a.second()));
                }
                let months = |c: DateTime| i64::from(c.year()) * 12 + i64::from(c.month());
                prop_assert_eq!(months(en) - months(st), n);
                prop_assert_eq!((months(st) - months(a)).rem_euclid(n), 0);
                let days = (w.end_secs() - w.start_secs()) as f64 / 86_400.0;
                prop_assert!(days >= 28.0 * n as f64 && days <= 31.0 * n as f64, "{} days for {}mo", days, n);
            }
        }
    }
}

#[test]
fn month_windows_on_the_31st_clamp_and_come_back() {
    // Documented in src/window.rs: an anchor on the 31st starts February windows on its last
    // day, and March's on the 31st again (the clamp does not stick).
    let s = Schedule::new(
        "1mo".parse().unwrap(),
        "2023-01-31T23:30:00Z".parse().unwrap(),
    );
    let starts: Vec<String> = (0..5)
        .scan(
            "2023-01-31T23:30:00Z".parse::<Timestamp>().unwrap(),
            |t, _| {
                let w = s.window_at(*t);
                *t = w.end();
                Some(w.start().to_string())
            },
        )
        .collect();
    assert_eq!(
        starts,
        [
            "2023-01-31T23:30:00Z",
            "2023-02-28T23:30:00Z",
            "2023-03-31T23:30:00Z",
            "2023-04-30T23:30:00Z",
            "2023-05-31T23:30:00Z"
        ]
    );
    // The last second of the clamped February window is still in it.
    let w = s.window_at("2023-03-31T23:29:59Z".parse().unwrap());
    assert_eq!(w.start().to_string(), "2023-02-28T23:30:00Z");
}

// ---- (c) config round trips and rejections ------------------------------------------------------

#[derive(Clone, Debug)]
struct GenBudget {
    limit_text: String,
    /// `true`: written as a bare YAML/TOML number (≤ 15 significant digits, exact as f64 text).
    bare: bool,
    nanos: u64,
    period: String,
}

fn provider_name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9_.-]{0,11}"
}

fn gen_budget() -> impl Strategy<Value = GenBudget> {
    let limit = prop_oneof![
        // integers, bare or quoted
        (0u64..10_000_000_000, any::<bool>()).prop_map(|(n, bare)| (
            n.to_string(),
            bare,
            n * 1_000_000_000
        )),
        // exact decimals with up to nine places, no trailing zero
        (
            0u64..1_000_000,
            1u32..=9,
            1u64..1_000_000_000,
            any::<bool>()
        )
            .prop_map(|(int, places, frac, bare)| {
                let frac = frac % 10u64.pow(places);
                let frac = if frac % 10 == 0 { frac + 1 } else { frac };
                let text = format!("{int}.{frac:0width$}", width = places as usize);
                let nanos = int * 1_000_000_000 + frac * 10u64.pow(9 - places);
                (text, bare, nanos)
            }),
        // below one nano: rounds up to one, not down to "no budget"
        Just(("0.0000000001".to_owned(), false, 1)),
    ];
    let unit = prop_oneof![
        Just("s"),
        Just("m"),
        Just("h"),
        Just("d"),
        Just("w"),
        Just("mo")
    ];
    (limit, 1u32..=500, unit).prop_map(|((limit_text, bare, nanos), n, unit)| GenBudget {
        limit_text,
        bare,
        nanos,
        period: format!("{n}{unit}"),
    })
}

#[derive(Clone, Copy, Debug)]
enum Format {
    Yaml,
    Toml,
}

fn render(budgets: &BTreeMap<String, GenBudget>, format: Format, nested: bool) -> String {
    let mut s = String::new();
    match format {
        Format::Yaml => {
            s.push_str("model_list: []\ngeneral_settings: {master_key: sk-1234}\n");
            let indent = if nested {
                s.push_str("router_settings:\n  routing_strategy: simple-shuffle\n  provider_budget_config:\n");
                "    "
            } else {
                s.push_str("provider_budget_config:\n");
                "  "
            };
            for (p, b) in budgets {
                let limit = if b.bare {
                    b.limit_text.clone()
                } else {
                    format!("\"{}\"", b.limit_text)
                };
                s.push_str(&format!("{indent}\"{p}\":\n{indent}  budget_limit: {limit}\n{indent}  time_period: \"{}\"\n", b.period));
            }
        }
        Format::Toml => {
            s.push_str("model_list = []\n");
            if nested {
                s.push_str("[router_settings]\nrouting_strategy = \"simple-shuffle\"\n");
            }
            let table = if nested {
                "router_settings.provider_budget_config"
            } else {
                "provider_budget_config"
            };
            for (p, b) in budgets {
                let limit = if b.bare {
                    b.limit_text.clone()
                } else {
                    format!("\"{}\"", b.limit_text)
                };
                s.push_str(&format!(
                    "[{table}.\"{p}\"]\nbudget_limit = {limit}\ntime_period = \"{}\"\n",
                    b.period
                ));
            }
        }
    }
    s
}

fn parse(text: &str, format: Format) -> Result<Config, ConfigError> {
    match format {
        Format::Yaml => Config::from_yaml_str(text),
        Format::Toml => Config::from_toml_str(text),
    }
}

fn format_strategy() -> impl Strategy<Value = Format> {
    prop_oneof![Just(Format::Yaml), Just(Format::Toml)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_budgets_round_trip(
        budgets in prop::collection::btree_map(provider_name(), gen_budget(), 0..6),
        format in format_strategy(),
        nested in any::<bool>(),
    ) {
        let text = render(&budgets, format, nested);
        let config = parse(&text, format).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        let expected: Vec<BudgetConfig> = budgets
            .iter()
            .map(|(p, b)| {
                BudgetConfig::new(
                    Scope::Provider,
                    p.clone(),
                    Money::from_nanos(b.nanos),
                    b.period.parse().unwrap(),
                )
            })
            .collect();
        prop_assert_eq!(&config.budgets, &expected, "{}", text);
        for (got, b) in config.budgets.iter().zip(budgets.values()) {
            // The period keeps the operator's spelling (`24h` stays `24h`).
            prop_assert_eq!(got.period.to_string(), b.period.clone());
        }
    }

    #[test]
    fn bad_periods_are_rejected_naming_provider_and_value(
        provider in provider_name(),
        bad in prop_oneof![
            Just("0d".to_owned()), Just("1y".to_owned()), Just("1.5h".to_owned()),
            Just("-1d".to_owned()), Just("1 fortnight".to_owned()), Just("99999999999d".to_owned()),
            Just("5000mo".to_owned()), Just("40000w".to_owned()), Just("d".to_owned()),
            "[a-z]{3,8}", "[0-9]{1,4}[a-ln-z]x",
        ],
        format in format_strategy(),
        nested in any::<bool>(),
    ) {
        let mut budgets = BTreeMap::new();
        budgets.insert(provider.clone(), GenBudget { limit_text: "1".into(), bare: true, nanos: 0, period: bad.clone() });
        let text = render(&budgets, format, nested);
        let err = parse(&text, format).unwrap_err();
        let is_period = matches!(&err, ConfigError::Period { provider: p, .. } if *p == provider);
        prop_assert!(is_period, "{:?}", err);
        let msg = err.to_string();
        prop_assert!(msg.contains(&format!("{provider:?}")) && msg.contains(&bad), "{}", msg);
        prop_assert!(!msg.contains('\n'));
    }

    #[test]
    fn negative_limits_are_rejected_naming_provider_and_value(
        provider in provider_name(),
        int in 0u64..100_000,
        frac in prop::option::of(1u32..1000),
        bare in any::<bool>(),
        format in format_strategy(),
    ) {
        let frac = frac.filter(|f| f % 10 != 0);
        if int == 0 && frac.is_none() {
            return Ok(()); // "-0" is zero, a valid limit
        }
        let value = match frac {
            Some(f) => format!("-{int}.{f}"),
            None => format!("-{int}"),
        };
        let mut budgets = BTreeMap::new();
        budgets.insert(provider.clone(), GenBudget { limit_text: value.clone(), bare, nanos: 0, period: "1d".into() });
        let text = render(&budgets, format, false);
        let err = parse(&text, format).unwrap_err();
        let is_limit = matches!(&err, ConfigError::Limit { provider: p, .. } if *p == provider);
        prop_assert!(is_limit, "{:?}", err);
        let msg = err.to_string();
        prop_assert!(msg.contains(&format!("{provider:?}")) && msg.contains(&value), "{}", msg);
        prop_assert!(!msg.contains('\n'));
    }

    #[test]
    fn unknown_keys_in_our_section_are_rejected_with_their_path(
        key in "x[a-z_]{3,10}",
        section in prop_oneof![Just(None), Just(Some("storage")), Just(Some("redis"))],
        format in format_strategy(),
    ) {
        let text = match (format, section) {
            (Format::Yaml, None) => format!("provider_budgets:\n  node_id: edge-1\n  {key}: 1\n"),
            (Format::Yaml, Some("redis")) => {
                format!("provider_budgets:\n  redis:\n    url: redis://127.0.0.1/\n    {key}: 1\n")
            }
            (Format::Yaml, Some(s)) => format!("provider_budgets:\n  {s}:\n    {key}: 1\n"),
            (Format::Toml, None) => format!("[provider_budgets]\nnode_id = \"edge-1\"\n{key} = 1\n"),
            (Format::Toml, Some("redis")) => {
                format!("[provider_budgets.redis]\nurl = \"redis://127.0.0.1/\"\n{key} = 1\n")
            }
            (Format::Toml, Some(s)) => format!("[provider_budgets.{s}]\n{key} = 1\n"),
        };
        let err = parse(&text, format).unwrap_err();
        let ConfigError::Syntax { path, message } = &err else {
            return Err(TestCaseError::fail(format!("{err:?}")));
        };
        let want_path = match section {
            None => "provider_budgets".to_owned(),
            Some(s) => format!("provider_budgets.{s}"),
        };
        prop_assert!(path.starts_with(&want_path), "path {} for {}", path, text);
        let msg = err.to_string();
        prop_assert!(message.contains(&format!("`{key}`")), "{}", msg);
        prop_assert!(msg.contains(&want_path), "{}", msg);
        prop_assert!(!msg.contains('\n'));
    }
}

#[test]
fn unknown_provider_policy_parses() {
    for (text, want) in [
        ("allow", UnknownProvider::Allow),
        ("deny", UnknownProvider::Deny),
    ] {
        let c = Config::from_yaml_str(&format!("provider_budgets:\n  unknown_provider: {text}\n"))
            .unwrap();
        assert_eq!(c.unknown_provider, want);
    }
    let err = Config::from_yaml_str("provider_budgets:\n  unknown_provider: maybe\n").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("provider_budgets.unknown_provider") && msg.contains("maybe"),
        "{msg}"
    );
}

// ---- request amounts (the sidecar's exact parsers) -------------------------------------------

/// An amount of `digits × 10^-scale` USD written the way clients write it: leading and
/// trailing zeros, the point anywhere, an exponent in `e` or `E` with or without `+`, spaces
/// around.
#[derive(Debug, Clone)]
struct Written {
    /// The amount in units of `10^-scale` USD (may be past `u64::MAX` nanos).
    digits: String,
    /// 9: `digits` are nanos; 10: tenths of a nano (rounded half-up when read).
    scale: i64,
    leading_zeros: usize,
    trailing_zeros: usize,
    /// Where the point goes in the zero-padded digits (from the left); none: no point.
    point: Option<usize>,
    upper: bool,
    plus: bool,
    spaces: bool,
}

impl Written {
    /// The text, worth `digits × 10^-scale` USD, with `sign` in front.
    fn text(&self, sign: &str) -> String {
        let padded = format!(
            "{}{}{}",
            "0".repeat(self.leading_zeros),
            self.digits,
            "0".repeat(self.trailing_zeros)
        );
        let point = self.point.unwrap_or(padded.len()).min(padded.len());
        let (int, frac) = padded.split_at(point);
        // digits × 10^-scale = padded × 10^(-scale - trailing)
        //                   = int.frac × 10^(len(frac) - scale - trailing)
        let exp = frac.len() as i64 - self.scale - self.trailing_zeros as i64;
        let mantissa = match (int.is_empty(), self.point.is_some()) {
            (_, false) => padded.clone(),
            (true, true) => format!(".{frac}"),
            (false, true) => format!("{int}.{frac}"),
        };
        let e = if self.upper { "E" } else { "e" };
        let plus = if self.plus && exp >= 0 { "+" } else { "" };
        let body = format!("{sign}{mantissa}{e}{plus}{exp}");
        if self.spaces {
            format!(" {body}\n")
        } else {
            body
        }
    }
}

fn written(digits: impl Strategy<Value = String>) -> impl Strategy<Value = Written> {
    (
        digits,
        0usize..4,
        0usize..4,
        proptest::option::of(0usize..30),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(digits, leading_zeros, trailing_zeros, point, upper, plus, spaces)| Written {
                digits,
                scale: 9,
                leading_zeros,
                trailing_zeros,
                point,
                upper,
                plus,
                spaces,
            },
        )
}

/// Digits of an amount past `u64::MAX` nanos (21 to 40 digits, or `u64::MAX + 1` exactly).
fn too_large_digits() -> impl Strategy<Value = String> {
    prop_oneof![
        Just((u128::from(u64::MAX) + 1).to_string()),
        "[1-9][0-9]{20,39}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any way of writing an amount reads as exactly that amount (a tenth digit of a nano
    /// rounds half-up); the sidecar's JSON numbers too.
    #[test]
    fn written_amounts_read_exactly(
        nanos in any::<u64>(),
        tenth in proptest::option::of(0u8..10),
        w in written(Just(String::new())),
    ) {
        let (w, want) = match tenth {
            None => (Written { digits: nanos.to_string(), ..w }, Some(nanos)),
            Some(d) => (
                Written { digits: format!("{nanos}{d}"), scale: 10, ..w },
                nanos.checked_add(u64::from(d >= 5)),
            ),
        };
        let text = w.text("");
        let read = Money::from_decimal_exponent(&text);
        match want {
            Some(want) => prop_assert_eq!(read.map(Money::as_nanos), Ok(want), "{:?}", text),
            None => prop_assert!(matches!(read, Err(MoneyError::TooLarge(_))), "{:?}", text),
        }
        // Money prints a plain decimal that is a JSON number of the same value.
        let printed = Money::from_nanos(nanos).to_string();
        prop_assert_eq!(Money::parse_json_number(&printed).map(Money::as_nanos), Ok(nanos));
        prop_assert!(checks::request_money(text.as_bytes()).is_some());
    }

    /// Past `u64::MAX` nanos is too large, however it is written, never saturated or zero;
    /// any nonzero negative is negative.
    #[test]
    fn too_large_and_negative_amounts_are_refused(
        w in written(too_large_digits()),
        nanos in 1u64..,
        small in written(Just(String::new())),
    ) {
        let text = w.text("");
        prop_assert!(
            matches!(Money::from_decimal_exponent(&text), Err(MoneyError::TooLarge(_))),
            "{:?}",
            text
        );
        for negative in [w.text("-"), Written { digits: nanos.to_string(), ..small }.text("-")] {
            prop_assert!(
                matches!(Money::from_decimal_exponent(&negative), Err(MoneyError::Negative(_))),
                "{:?}",
                negative
            );
        }
    }

    /// Texts near the grammar (digits, points, exponents, signs, spaces, letters) keep every
    /// property of the `request_money` fuzz target.
    #[test]
    fn near_miss_texts_keep_the_fuzz_properties(text in "[0-9.eE+\\- nai]{0,40}") {
        prop_assert!(checks::request_money(text.as_bytes()).is_some());
    }
}
