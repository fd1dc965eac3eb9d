//! Budget periods and the aligned windows they cut time into.
//!
//! The reference filter starts a window at the first spend and resets it when it looks expired,
//! which races between instances. Here window `k` of a period `p` covers
//! `[anchor + k·p, anchor + (k+1)·p)` in UTC — calendar months for `mo` periods — so every
//! instance derives the same window from its clock alone, online or not. A record carries its
//! own timestamp and lands in that timestamp's window.
//!
//! Instants are whole Unix seconds here (floored); periods and anchors are whole seconds, so a
//! sub-second part can never move an instant across a boundary.
//!
//! **Time zones**: a schedule may carry an IANA time zone ([`Schedule::in_zone`]). Then `d`,
//! `w` and `mo` windows start at local midnight in that zone, DST-correct (a local day lasts 23,
//! 24 or 25 hours; where midnight does not exist, the day starts at its first instant), days
//! and weeks counted from the anchor's local date (weeks start on the anchor's weekday) and
//! months on the anchor's day of month (clamped to short months). `s`, `m` and `h` windows stay
//! fixed-length from the anchor. A window is identified by its UTC start, whatever the zone.
//! Without a zone (the default), windows are exactly those of UTC arithmetic from the anchor,
//! so data written before zones existed keeps its windows.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, DateTime};
use jiff::tz::{Offset, TimeZone};
use jiff::{Span, Timestamp};

use crate::model::clock::floor_secs;

/// Longest period accepted, in seconds (100 years): keeps all window math far from overflow.
const MAX_PERIOD_SECS: u64 = 100 * 366 * 86_400;
/// Longest period accepted, in months (100 years).
const MAX_PERIOD_MONTHS: u32 = 1_200;

/// How long a budget window lasts: a fixed number of seconds or of calendar months.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Period {
    kind: PeriodKind,
    /// The count as written, with `unit`, so the canonical text (used in storage and Redis keys)
    /// is exactly what the operator wrote: `24h` stays `24h`, it is not rewritten as `1d`.
    count: u32,
    unit: Unit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum PeriodKind {
    Seconds(i64),
    Months(i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Second => "s",
            Unit::Minute => "m",
            Unit::Hour => "h",
            Unit::Day => "d",
            Unit::Week => "w",
            Unit::Month => "mo",
        }
    }
}

/// Why a period was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid period {text:?}: {reason} (expected a count and a unit: 30s, 15m, 1h, 1d, 1w, 1mo)"
)]
pub struct PeriodError {
    text: String,
    reason: &'static str,
}

impl FromStr for Period {
    type Err = PeriodError;

    fn from_str(s: &str) -> Result<Period, PeriodError> {
        let err = |reason| PeriodError {
            text: s.to_string(),
            reason,
        };
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        if digits.is_empty() {
            return Err(err("missing count"));
        }
        let count: u32 = digits.parse().map_err(|_| err("count too large"))?;
        if count == 0 {
            return Err(err("count must be at least 1"));
        }
        let (unit, secs) = match unit {
            "s" => (Unit::Second, 1),
            "m" => (Unit::Minute, 60),
            "h" => (Unit::Hour, 3_600),
            "d" => (Unit::Day, 86_400),
            "w" => (Unit::Week, 7 * 86_400),
            "mo" => (Unit::Month, 0),
            "" => return Err(err("missing unit")),
            _ => return Err(err("unknown unit")),
        };
        let kind = if unit == Unit::Month {
            if count > MAX_PERIOD_MONTHS {
                return Err(err("longer than 100 years"));
            }
            PeriodKind::Months(i64::from(count))
        } else {
            let total = u64::from(count) * secs;
            if total > MAX_PERIOD_SECS {
                return Err(err("longer than 100 years"));
            }
            PeriodKind::Seconds(total as i64)
        };
        Ok(Period { kind, count, unit })
    }
}

impl Period {
    /// The longest period (`1200mo`, 100 years): the one window of a budget that has no
    /// period (`unit: concurrent`).
    pub const LONGEST: Period = Period {
        kind: PeriodKind::Months(MAX_PERIOD_MONTHS as i64),
        count: MAX_PERIOD_MONTHS,
        unit: Unit::Month,
    };

    /// One minute (`1m`): the period of litellm's `tpm` and `rpm`.
    pub const MINUTE: Period = Period {
        kind: PeriodKind::Seconds(60),
        count: 1,
        unit: Unit::Minute,
    };

    /// Whether windows follow the calendar (`d`, `w`, `mo`: local midnight in a time zone)
    /// rather than a fixed length (`s`, `m`, `h`).
    pub fn is_calendar(self) -> bool {
        matches!(self.unit, Unit::Day | Unit::Week | Unit::Month)
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.count, self.unit.suffix())
    }
}

impl serde::Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Period, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One window of a period: `[start, end)` in whole Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    start: i64,
    end: i64,
}

impl Window {
    pub(crate) const fn from_secs(start: i64, end: i64) -> Window {
        Window { start, end }
    }

    /// First second of the window (inclusive), Unix seconds.
    pub const fn start_secs(self) -> i64 {
        self.start
    }

    /// First second after the window (exclusive), Unix seconds.
    pub const fn end_secs(self) -> i64 {
        self.end
    }

    /// First instant of the window.
    pub fn start(self) -> Timestamp {
        Timestamp::from_second(self.start).unwrap_or(Timestamp::MAX)
    }

    /// First instant after the window: when the budget resets.
    pub fn end(self) -> Timestamp {
        Timestamp::from_second(self.end).unwrap_or(Timestamp::MAX)
    }

    /// Whether the instant (Unix seconds) falls in this window.
    #[inline]
    pub const fn contains_secs(self, secs: i64) -> bool {
        self.start <= secs && secs < self.end
    }
}

/// A period plus the anchor its windows are aligned to (and, optionally, a time zone).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    period: Period,
    /// Start of window 0, Unix seconds.
    anchor: i64,
    /// The anchor as a UTC civil date-time, precomputed for month arithmetic.
    anchor_civil: DateTime,
    /// Local calendar windows (`d`, `w`, `mo`) in this zone; `None`: UTC arithmetic.
    zone: Option<Zone>,
}

/// A time zone and the anchor's local date in it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Zone {
    tz: TimeZone,
    anchor_date: Date,
}

impl Schedule {
    /// Windows of `period` aligned to `anchor` (its sub-second part is dropped), in UTC.
    pub fn new(period: Period, anchor: Timestamp) -> Schedule {
        let anchor = floor_secs(anchor);
        let anchor_civil = civil_of(anchor);
        Schedule {
            period,
            anchor,
            anchor_civil,
            zone: None,
        }
    }

    /// The same schedule with `d`, `w` and `mo` windows at local midnight in `tz` (see the
    /// module doc).
    pub fn in_zone(mut self, tz: TimeZone) -> Schedule {
        let anchor_ts = Timestamp::from_second(self.anchor).unwrap_or(Timestamp::UNIX_EPOCH);
        let anchor_date = tz.to_datetime(anchor_ts).date();
        self.zone = Some(Zone { tz, anchor_date });
        self
    }

    /// The time zone of local windows, if any.
    pub fn time_zone(&self) -> Option<&TimeZone> {
        self.zone.as_ref().map(|z| &z.tz)
    }

    /// The period.
    pub fn period(&self) -> Period {
        self.period
    }

    /// The window containing the instant.
    pub fn window_at(&self, at: Timestamp) -> Window {
        self.window_at_secs(floor_secs(at))
    }

    /// The window containing the instant given in Unix seconds. Instants outside jiff's range
    /// (years -9999..=9999) are clamped into it, which keeps the arithmetic from overflowing.
    pub fn window_at_secs(&self, secs: i64) -> Window {
        let secs = secs.clamp(Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
        if let Some(zone) = &self.zone {
            if let Some(w) = self.local_window(zone, secs) {
                return w;
            }
        }
        match self.period.kind {
            PeriodKind::Seconds(p) => {
                let k = (secs - self.anchor).div_euclid(p);
                let start = self.anchor + k * p;
                Window::from_secs(start, start + p)
            }
            PeriodKind::Months(n) => {
                let at = civil_of(secs);
                let months_since = month_index(at) - month_index(self.anchor_civil);
                let mut k = months_since.div_euclid(n);
                // The month index gets k right or one too far (when `secs` falls earlier in its
                // month than the anchor's day and time).
                if self.month_start(k) > secs {
                    k -= 1;
                }
                Window::from_secs(self.month_start(k), self.month_start(k + 1))
            }
        }
    }

    /// Start (Unix seconds) of month-window `k`: the anchor's day and time, `k·n` months later,
    /// the day clamped to the month's length (an anchor on the 31st starts February windows on
    /// its last day).
    fn month_start(&self, k: i64) -> i64 {
        let PeriodKind::Months(n) = self.period.kind else {
            return self.anchor;
        };
        let a = self.anchor_civil;
        let idx = month_index(a) + k * n;
        let year = idx.div_euclid(12);
        let month = (idx.rem_euclid(12) + 1) as i8;
        let Ok(year) = i16::try_from(year) else {
            return if k < 0 { i64::MIN / 2 } else { i64::MAX / 2 };
        };
        let last_day = Date::new(year, month, 1).map_or(28, |d| d.days_in_month());
        let day = a.day().min(last_day);
        DateTime::new(year, month, day, a.hour(), a.minute(), a.second(), 0)
            .ok()
            .and_then(|dt| Offset::UTC.to_timestamp(dt).ok())
            .map_or(if k < 0 { i64::MIN / 2 } else { i64::MAX / 2 }, |t| {
                t.as_second()
            })
    }
}

impl Schedule {
    /// The local calendar window containing `secs`, for `d`/`w`/`mo` periods in a zone; `None`
    /// for fixed-length units (or out of jiff's range, where UTC arithmetic takes over).
    fn local_window(&self, zone: &Zone, secs: i64) -> Option<Window> {
        let at = Timestamp::from_second(secs).ok()?;
        let local = zone.tz.to_datetime(at).date();
        match (self.period.unit, self.period.kind) {
            (Unit::Day | Unit::Week, PeriodKind::Seconds(p)) => {
                let n = p / 86_400;
                let days = i64::from(zone.anchor_date.until(local).ok()?.get_days());
                let k = days.div_euclid(n);
                let start = zone.anchor_date.checked_add(Span::new().days(k * n)).ok()?;
                let end = start.checked_add(Span::new().days(n)).ok()?;
                Some(Window::from_secs(
                    local_midnight(&zone.tz, start)?,
                    local_midnight(&zone.tz, end)?,
                ))
            }
            (Unit::Month, PeriodKind::Months(n)) => {
                let months = (i64::from(local.year()) * 12 + i64::from(local.month()))
                    - (i64::from(zone.anchor_date.year()) * 12
                        + i64::from(zone.anchor_date.month()));
                let mut k = months.div_euclid(n);
                if self.local_month_start(zone, k)? > secs {
                    k -= 1;
                }
                Some(Window::from_secs(
                    self.local_month_start(zone, k)?,
                    self.local_month_start(zone, k + 1)?,
                ))
            }
            _ => None,
        }
    }

    /// Start of local month-window `k`: the anchor's day (clamped) at local midnight.
    fn local_month_start(&self, zone: &Zone, k: i64) -> Option<i64> {
        let PeriodKind::Months(n) = self.period.kind else {
            return None;
        };
        let a = zone.anchor_date;
        let idx = i64::from(a.year()) * 12 + i64::from(a.month()) - 1 + k * n;
        let year = i16::try_from(idx.div_euclid(12)).ok()?;
        let month = (idx.rem_euclid(12) + 1) as i8;
        let last_day = Date::new(year, month, 1).ok()?.days_in_month();
        let date = Date::new(year, month, a.day().min(last_day)).ok()?;
        local_midnight(&zone.tz, date)
    }
}

/// The first instant of `date` in `tz` (midnight, or the end of a gap that swallows it).
fn local_midnight(tz: &TimeZone, date: Date) -> Option<i64> {
    let zdt = date.to_zoned_datetime(tz.clone()).ok()?;
    Some(zdt.timestamp().as_second())
}

fn civil_of(secs: i64) -> DateTime {
    let ts = Timestamp::from_second(secs).unwrap_or(if secs < 0 {
        Timestamp::MIN
    } else {
        Timestamp::MAX
    });
    Offset::UTC.to_datetime(ts)
}

fn month_index(dt: DateTime) -> i64 {
    i64::from(dt.year()) * 12 + i64::from(dt.month()) - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn parses_litellm_durations() {
        for (text, secs) in [
            ("30s", 30),
            ("15m", 900),
            ("1h", 3600),
            ("1d", 86_400),
            ("7d", 604_800),
            ("2w", 1_209_600),
        ] {
            let p: Period = text.parse().unwrap();
            assert_eq!(p.kind, PeriodKind::Seconds(secs));
            assert_eq!(p.to_string(), text);
        }
        assert_eq!("1mo".parse::<Period>().unwrap().kind, PeriodKind::Months(1));
        for bad in [
            "",
            "d",
            "0d",
            "1",
            "1y",
            "-1d",
            "1.5h",
            "99999999999d",
            "1 d",
            "5000mo",
        ] {
            assert!(bad.parse::<Period>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn fixed_windows_align_to_anchor() {
        let s = Schedule::new("1d".parse().unwrap(), Timestamp::UNIX_EPOCH);
        let w = s.window_at(ts("2024-03-05T13:00:00Z"));
        assert_eq!(w.start(), ts("2024-03-05T00:00:00Z"));
        assert_eq!(w.end(), ts("2024-03-06T00:00:00Z"));
        // The last instant of a window is still in it; the next second is not.
        assert_eq!(s.window_at(ts("2024-03-05T23:59:59.999Z")), w);
        assert_ne!(s.window_at(ts("2024-03-06T00:00:00Z")), w);
        // Before the anchor too.
        let w = s.window_at(ts("1969-12-31T23:59:59.5Z"));
        assert_eq!(w.start(), ts("1969-12-31T00:00:00Z"));
    }

    #[test]
    fn weekly_windows_can_start_on_monday() {
        let s = Schedule::new("1w".parse().unwrap(), ts("2024-01-01T00:00:00Z"));
        let w = s.window_at(ts("2024-11-28T10:00:00Z")); // a Thursday
        assert_eq!(w.start(), ts("2024-11-25T00:00:00Z"));
    }

    #[test]
    fn month_windows_follow_the_calendar() {
        let s = Schedule::new("1mo".parse().unwrap(), Timestamp::UNIX_EPOCH);
        let w = s.window_at(ts("2024-02-29T12:00:00Z"));
        assert_eq!(w.start(), ts("2024-02-01T00:00:00Z"));
        assert_eq!(w.end(), ts("2024-03-01T00:00:00Z"));
        let s = Schedule::new("1mo".parse().unwrap(), ts("2024-01-31T09:00:00Z"));
        let w = s.window_at(ts("2024-03-01T00:00:00Z"));
        assert_eq!(w.start(), ts("2024-02-29T09:00:00Z"));
        assert_eq!(w.end(), ts("2024-03-31T09:00:00Z"));
        let w = s.window_at(ts("2024-03-31T08:59:59Z"));
        assert_eq!(w.start(), ts("2024-02-29T09:00:00Z"));
        let s = Schedule::new("3mo".parse().unwrap(), Timestamp::UNIX_EPOCH);
        assert_eq!(
            s.window_at(ts("2024-05-10T00:00:00Z")).start(),
            ts("2024-04-01T00:00:00Z")
        );
    }

    #[test]
    fn extreme_instants_do_not_overflow() {
        for period in ["7s", "1mo", "5w"] {
            let s = Schedule::new(period.parse().unwrap(), ts("2024-01-31T09:00:00Z"));
            for secs in [
                i64::MIN,
                i64::MAX,
                Timestamp::MIN.as_second(),
                Timestamp::MAX.as_second(),
            ] {
                let w = s.window_at_secs(secs);
                let clamped = secs.clamp(Timestamp::MIN.as_second(), Timestamp::MAX.as_second());
                assert!(w.contains_secs(clamped), "{period} {secs}: {w:?}");
            }
        }
    }
}
