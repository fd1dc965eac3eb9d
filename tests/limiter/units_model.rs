//! A model of concurrent slots and request counts: random reserves, commits, releases, drops,
//! clock steps (forward past the reservation timeout, and back) and restarts, compared after
//! every step with a plain model: the slots held never pass the limit, `filter` refuses
//! exactly when every slot is held, and the request budget counts every reservation that
//! ended other than by a release.
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::open as support;

use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;
use provider_budgets::{
    Clock, FakeClock, Limiter, Money, Reservation, Scope, StatusQuery, Unit, NO_TAGS,
};

const LIMIT: usize = 3;
const D: [&str; 1] = ["openai/gpt-4o"];

fn config() -> String {
    format!(
        "provider_budgets:
  reservation_timeout: 30s
  budgets:
    - {{model: gpt-4o, unit: concurrent, limit: {LIMIT}}}
    - {{model: gpt-4o, unit: requests, limit: 1000000, period: 1d}}
"
    )
}

#[derive(Debug, Clone)]
enum Op {
    Reserve,
    Commit(usize),
    Release(usize),
    Drop(usize),
    /// Seconds forward (past 30 s expires every open reservation).
    Wait(i64),
    /// Seconds back (a clock step).
    Back(i64),
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Reserve),
        2 => (0..4usize).prop_map(Op::Commit),
        2 => (0..4usize).prop_map(Op::Release),
        1 => (0..4usize).prop_map(Op::Drop),
        1 => (1..40i64).prop_map(Op::Wait),
        1 => (1..20i64).prop_map(Op::Back),
        1 => Just(Op::Restart),
    ]
}

/// (slots held, requests counted) as the limiter reports them.
fn observed(l: &Limiter) -> (u64, u64) {
    let rows = l.status(StatusQuery::all().scope(Scope::Model));
    let of = |unit| rows.iter().find(|s| s.unit == unit).unwrap();
    (
        of(Unit::Concurrent).reserved.as_nanos(),
        of(Unit::Requests).spend.as_nanos(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn slots_and_requests_match_the_model(ops in prop::collection::vec(op(), 1..50)) {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::new("2026-03-10T12:00:00Z".parse::<Timestamp>().unwrap());
        let open = || support::open(support::yaml(&config(), dir.path()), &clock);
        let mut l = open();
        // The model: open reservations with their expiry (Unix seconds), requests counted.
        let mut open_ones: Vec<(Reservation, i64)> = Vec::new();
        let mut requests = 0u64;
        for op in ops {
            let now = clock.now().as_second();
            match op {
                Op::Reserve => {
                    // Expired ones end at the reserve's own sweep, first.
                    let expired = open_ones.iter().filter(|(_, e)| now >= *e).count();
                    let live = open_ones.len() - expired;
                    match l.reserve(&D, Money::ZERO).wait() {
                        Ok(r) => {
                            prop_assert!(live < LIMIT, "admitted with {live} held");
                            let e = r.expires_at().as_second();
                            open_ones.push((r, e));
                        }
                        Err(e) => prop_assert!(live >= LIMIT, "refused with {live} held: {e}"),
                    }
                }
                Op::Commit(i) | Op::Release(i) | Op::Drop(i) if i < open_ones.len() => {
                    let (r, e) = open_ones.remove(i);
                    let expired = now >= e;
                    let counted = match op {
                        Op::Commit(_) => r.commit(Money::ZERO).map(|r| r.wait()).is_ok(),
                        Op::Release(_) => { let _ = r.release(); false }
                        _ => { drop(r); true }
                    };
                    if expired {
                        requests += 1; // the expiry counted it, whatever came after
                    } else if counted {
                        requests += 1;
                    }
                }
                Op::Wait(s) => clock.advance(SignedDuration::from_secs(s)),
                Op::Back(s) => clock.advance(SignedDuration::from_secs(-s)),
                Op::Restart => {
                    // A restart: the handles go with the process (each counts as a drop:
                    // the slot frees, the request counts; a SIGKILL is in `units.rs`).
                    requests += open_ones.len() as u64;
                    open_ones.clear();
                    drop(l);
                    l = open();
                }
                _ => {}
            }
            provider_budgets::testing::maintain(&l).unwrap();
            let now = clock.now().as_second();
            // The reaper's pass ended the expired ones: the model forgets them (counted).
            let before = open_ones.len();
            open_ones.retain(|(_, e)| now < *e);
            requests += (before - open_ones.len()) as u64;
            let (held, counted) = observed(&l);
            prop_assert_eq!(held, open_ones.len() as u64);
            prop_assert!(held <= LIMIT as u64);
            prop_assert_eq!(counted, requests);
            prop_assert_eq!(l.filter(&D, NO_TAGS).is_err(), open_ones.len() >= LIMIT);
        }
    }
}
