//! Local calendar windows in IANA time zones (`Schedule::in_zone`), compared with a model that
//! computes them another way: by walking civil dates with jiff's `ZonedDateTime` arithmetic
//! (`start_of_day`, `checked_add` of calendar days and months) from the anchor, instead of the
//! schedule's day/month index arithmetic. Zones: New York, Berlin, Sydney (southern DST),
//! Kathmandu (+05:45), Santiago (DST changes at midnight: some days start at 01:00) and Apia
//! (skipped 2011-12-30 entirely when it moved across the date line).
#![allow(clippy::unwrap_used)]

use provider_budgets_test_support::cli;

use jiff::tz::TimeZone;
use jiff::{Span, Timestamp, ZonedDateTime};
use proptest::prelude::*;
use provider_budgets::{Period, Schedule};

const ZONES: [&str; 6] = [
    "America/New_York",
    "Europe/Berlin",
    "Australia/Sydney",
    "Asia/Kathmandu",
    "America/Santiago",
    "Pacific/Apia",
];

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn tz(name: &str) -> TimeZone {
    TimeZone::get(name).unwrap()
}

/// The model: window starts are the anchor's local start of day, then every `n` calendar days
/// (or months on the anchor's day, clamped) at their local start of day.
fn model(
    period: &str,
    anchor: Timestamp,
    zone: &TimeZone,
    at: Timestamp,
) -> (Timestamp, Timestamp) {
    let anchor_day = anchor
        .to_zoned_datetime(zone.clone())
        .start_of_day()
        .unwrap();
    let (unit_days, months) = match (
        period.strip_suffix("mo"),
        period.strip_suffix('d'),
        period.strip_suffix('w'),
    ) {
        (Some(n), _, _) => (0, n.parse::<i64>().unwrap()),
        (_, Some(n), _) => (n.parse::<i64>().unwrap(), 0),
        (_, _, Some(n)) => (7 * n.parse::<i64>().unwrap(), 0),
        _ => unreachable!(),
    };
    let start_of = |k: i64| -> ZonedDateTime {
        if months == 0 {
            // Calendar days on the civil date, then the local start of that day.
            let date = anchor_day
                .date()
                .checked_add(Span::new().days(k * unit_days))
                .unwrap();
            date.to_zoned_datetime(zone.clone())
                .unwrap()
                .start_of_day()
                .unwrap()
        } else {
            let first = anchor_day.date().first_of_month();
            let month = first.checked_add(Span::new().months(k * months)).unwrap();
            let day = anchor_day.date().day().min(month.days_in_month());
            month
                .with()
                .day(day)
                .build()
                .unwrap()
                .to_zoned_datetime(zone.clone())
                .unwrap()
                .start_of_day()
                .unwrap()
        }
    };
    // Walk to the window containing `at` (bounded: anchors are near `at` below).
    let mut k = 0i64;
    while start_of(k).timestamp() > at {
        k -= 1;
    }
    while start_of(k + 1).timestamp() <= at {
        k += 1;
    }
    (start_of(k).timestamp(), start_of(k + 1).timestamp())
}

fn check(period: &str, anchor: Timestamp, zone_name: &str, at: Timestamp) {
    let zone = tz(zone_name);
    let schedule = Schedule::new(period.parse::<Period>().unwrap(), anchor).in_zone(zone.clone());
    let w = schedule.window_at(at);
    let (start, end) = model(period, anchor, &zone, at);
    assert_eq!(
        (w.start(), w.end()),
        (start, end),
        "{period} in {zone_name}, anchor {anchor}, at {at}"
    );
    assert!(w.start() <= at && at < w.end());
}

#[test]
fn days_start_at_local_midnight_across_dst() {
    let ny = tz("America/New_York");
    let s = Schedule::new("1d".parse().unwrap(), Timestamp::UNIX_EPOCH).in_zone(ny.clone());
    // 2024-03-10: spring forward, a 23 h day; 2024-11-03: fall back, a 25 h day.
    let w = s.window_at(ts("2024-03-10T12:00:00Z"));
    assert_eq!(w.start(), ts("2024-03-10T05:00:00Z")); // 00:00 EST
    assert_eq!(w.end(), ts("2024-03-11T04:00:00Z")); // 00:00 EDT
    assert_eq!(w.end_secs() - w.start_secs(), 23 * 3600);
    let w = s.window_at(ts("2024-11-03T12:00:00Z"));
    assert_eq!(w.end_secs() - w.start_secs(), 25 * 3600);
    // Hours stay fixed-length from the anchor, whatever the zone.
    let h = Schedule::new("1h".parse().unwrap(), Timestamp::UNIX_EPOCH).in_zone(ny);
    let w = h.window_at(ts("2024-03-10T07:30:00Z"));
    assert_eq!(w.start(), ts("2024-03-10T07:00:00Z"));
    // Kathmandu's +05:45: the local day starts at 18:15 UTC.
    let k =
        Schedule::new("1d".parse().unwrap(), Timestamp::UNIX_EPOCH).in_zone(tz("Asia/Kathmandu"));
    assert_eq!(
        k.window_at(ts("2024-06-01T20:00:00Z")).start(),
        ts("2024-06-01T18:15:00Z")
    );
}

#[test]
fn weeks_start_on_the_anchors_weekday_and_months_on_its_day() {
    let berlin = tz("Europe/Berlin");
    // Anchor: Monday 2024-01-01 (local).
    let w = Schedule::new("1w".parse().unwrap(), ts("2024-01-01T00:00:00+01:00"))
        .in_zone(berlin.clone())
        .window_at(ts("2024-03-28T10:00:00Z")); // a Thursday, DST starts Sunday 03-31
    assert_eq!(w.start(), ts("2024-03-25T00:00:00+01:00"));
    assert_eq!(w.end(), ts("2024-04-01T00:00:00+02:00"));
    // Months on the 31st: February's window starts on its last day, local midnight.
    let m = Schedule::new("1mo".parse().unwrap(), ts("2024-01-31T12:00:00+01:00")).in_zone(berlin);
    let w = m.window_at(ts("2024-03-10T00:00:00Z"));
    assert_eq!(w.start(), ts("2024-02-29T00:00:00+01:00"));
    assert_eq!(w.end(), ts("2024-03-31T00:00:00+01:00"));
}

#[test]
fn a_skipped_day_and_a_midnight_gap() {
    // Apia skipped 2011-12-30: the window of 12-29 ends at the start of 12-31.
    let apia =
        Schedule::new("1d".parse().unwrap(), Timestamp::UNIX_EPOCH).in_zone(tz("Pacific/Apia"));
    let w = apia.window_at(ts("2011-12-30T05:00:00Z")); // 12-29 19:00 local (-10:00)
    assert_eq!(w.end(), ts("2011-12-30T10:00:00Z")); // 12-31 00:00 local (+14:00)
    check(
        "1d",
        ts("2011-12-20T00:00:00Z"),
        "Pacific/Apia",
        ts("2011-12-30T12:00:00Z"),
    );
    // Santiago 2024-09-08: clocks jump from 00:00 to 01:00, the day starts at 01:00.
    let santiago =
        Schedule::new("1d".parse().unwrap(), Timestamp::UNIX_EPOCH).in_zone(tz("America/Santiago"));
    let w = santiago.window_at(ts("2024-09-08T12:00:00Z"));
    assert_eq!(w.start(), ts("2024-09-08T01:00:00-03:00"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn zoned_windows_match_the_civil_model(
        zone in 0..ZONES.len(),
        period in prop::sample::select(vec!["1d", "2d", "7d", "1w", "2w", "1mo", "3mo"]),
        // 2010..2030, and an anchor within ~2 years before or after the instant.
        at in 1_262_304_000i64..1_893_456_000,
        anchor_offset in -70_000_000i64..70_000_000,
    ) {
        let at = Timestamp::from_second(at).unwrap();
        let anchor = Timestamp::from_second(at.as_second() + anchor_offset).unwrap();
        check(period, anchor, ZONES[zone], at);
    }

    #[test]
    fn local_windows_tile_time(
        zone in 0..ZONES.len(),
        period in prop::sample::select(vec!["1d", "3d", "1w", "1mo"]),
        at in 1_262_304_000i64..1_893_456_000,
    ) {
        let s = Schedule::new(period.parse().unwrap(), Timestamp::UNIX_EPOCH).in_zone(tz(ZONES[zone]));
        let w = s.window_at_secs(at);
        prop_assert!(w.contains_secs(at));
        prop_assert_eq!(s.window_at_secs(w.end_secs()).start_secs(), w.end_secs());
        prop_assert_eq!(s.window_at_secs(w.start_secs() - 1).end_secs(), w.start_secs());
        prop_assert_eq!(s.window_at_secs(w.end_secs() - 1), w);
    }
}

/// `provider_budgets.time_zone` from the CLI: a daily budget resets at New York midnight, status
/// shows the window in UTC and locally; a record just before local midnight lands in the old
/// day. An unknown zone is one error line naming the key and the value.
#[test]
fn cli_daily_budget_in_new_york() {
    let c = cli::Cli::new(
        "provider_budget_config:\n  openai: {budget_limit: 10, time_period: 1d}\nprovider_budgets:\n  time_zone: America/New_York\n",
    );
    // 23:30 EDT on 2024-06-01 is 03:30Z on 06-02: still New York's June 1st.
    c.run(&["--now", "2024-06-02T03:30:00Z", "record", "openai", "4"])
        .assert_ok();
    let doc = c.status_json("2024-06-02T03:59:59Z");
    let b = &doc["budgets"][0];
    assert_eq!(b["time_zone"], "America/New_York");
    assert_eq!(b["window_start"], "2024-06-01T04:00:00Z");
    assert_eq!(b["resets_at"], "2024-06-02T04:00:00Z");
    assert_eq!(
        b["window_start_local"],
        "2024-06-01T00:00:00-04:00[America/New_York]"
    );
    assert_eq!(b["spend_nanos"], 4_000_000_000u64);
    // Local midnight: a new window, nothing spent in it.
    let doc = c.status_json("2024-06-02T04:00:00Z");
    assert_eq!(doc["budgets"][0]["spend_nanos"], 0);

    let bad = cli::Cli::new(
        "provider_budget_config:\n  openai: {budget_limit: 10, time_period: 1d}\nprovider_budgets:\n  time_zone: Mars/Olympus_Mons\n",
    );
    bad.run(&["status"])
        .assert_error(1, &["provider_budgets.time_zone", "Mars/Olympus_Mons"]);
    // Without a zone, UTC as before.
    let utc =
        cli::Cli::new("provider_budget_config:\n  openai: {budget_limit: 10, time_period: 1d}\n");
    let doc = utc.status_json("2024-06-02T03:59:59Z");
    assert_eq!(doc["budgets"][0]["window_start"], "2024-06-02T00:00:00Z");
    assert_eq!(doc["budgets"][0]["time_zone"], "UTC");
}
