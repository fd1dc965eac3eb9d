//! Money as an integer: nano-dollars in a `u64`.
//!
//! The reference filter keeps spend in a float that is incremented millions of times; ten
//! records of `0.1` then sum to `0.9999999999999999`, below a limit of `1`. Here every amount
//! is converted once, at the edge, to an exact count of nano-dollars (1e-9 USD), and all sums
//! are integer and saturating. `u64::MAX` nanos is about 18.4 billion USD, far beyond any
//! budget, so saturation is a guard, not a behaviour anyone should meet.

use std::fmt;
use std::str::FromStr;

/// Nano-dollars per dollar.
const NANOS_PER_USD: u64 = 1_000_000_000;

/// An amount of money in nano-dollars (1e-9 USD).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(u64);

/// Why an amount was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MoneyError {
    /// NaN or an infinity.
    #[error("amount {0:?} is not a finite number")]
    NotFinite(String),
    /// Spend and limits cannot be negative.
    #[error("amount {0:?} is negative")]
    Negative(String),
    /// More than `u64::MAX` nano-dollars.
    #[error("amount {0:?} is too large (at most 18446744073.709551615 USD)")]
    TooLarge(String),
    /// Not a number at all.
    #[error("amount {0:?} is not a number")]
    Malformed(String),
}

impl Money {
    /// Zero dollars.
    pub const ZERO: Money = Money(0);
    /// The largest representable amount; sums saturate here.
    pub const MAX: Money = Money(u64::MAX);

    /// An amount of exactly `nanos` nano-dollars.
    pub const fn from_nanos(nanos: u64) -> Money {
        Money(nanos)
    }

    /// The amount in nano-dollars.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Converts a cost in US dollars, rounding to the nearest nano-dollar.
    ///
    /// Rejects NaN, infinities, negatives and amounts too large to represent. `-0.0` is zero.
    ///
    /// # Errors
    ///
    /// [`MoneyError`] for NaN, infinity, a negative value or one too large to represent.
    pub fn from_usd(usd: f64) -> Result<Money, MoneyError> {
        if !usd.is_finite() {
            return Err(MoneyError::NotFinite(usd.to_string()));
        }
        if usd < 0.0 {
            return Err(MoneyError::Negative(usd.to_string()));
        }
        let nanos = (usd * NANOS_PER_USD as f64).round();
        // `u64::MAX as f64` rounds up to 2^64, so `>=` is the exact bound.
        if nanos >= u64::MAX as f64 {
            return Err(MoneyError::TooLarge(usd.to_string()));
        }
        Ok(Money(nanos as u64))
    }

    /// Converts a budget limit in US dollars: like [`Money::from_usd`], except that a positive
    /// limit smaller than one nano-dollar becomes one nano-dollar instead of zero (a zero limit
    /// would mean "always exhausted", which a tiny positive limit does not).
    ///
    /// # Errors
    ///
    /// As [`Money::from_usd`].
    pub fn limit_from_usd(usd: f64) -> Result<Money, MoneyError> {
        let m = Money::from_usd(usd)?;
        if m.0 == 0 && usd > 0.0 {
            return Ok(Money(1));
        }
        Ok(m)
    }

    /// The amount in US dollars, for display and JSON (may lose precision past 2^53 nanos).
    pub fn as_usd(self) -> f64 {
        self.0 as f64 / NANOS_PER_USD as f64
    }

    /// Sum that stops at [`Money::MAX`] instead of wrapping.
    pub const fn saturating_add(self, other: Money) -> Money {
        Money(self.0.saturating_add(other.0))
    }

    /// Difference that stops at zero.
    pub const fn saturating_sub(self, other: Money) -> Money {
        Money(self.0.saturating_sub(other.0))
    }
}

impl FromStr for Money {
    type Err = MoneyError;

    /// Parses a decimal amount of US dollars exactly (`"0.1"` is exactly 100 000 000 nanos,
    /// digits past the ninth decimal are rounded half-up). Exponent forms (`"1e-3"`) go through
    /// `f64` and [`Money::from_usd`].
    fn from_str(s: &str) -> Result<Money, MoneyError> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        if lower.contains("nan") || lower.contains("inf") {
            return Err(MoneyError::NotFinite(t.to_string()));
        }
        if let Some(rest) = t.strip_prefix('-') {
            // "-0" and "-0.000" are zero, anything else negative is rejected.
            if rest.chars().all(|c| c == '0' || c == '.') && !rest.is_empty() {
                return Ok(Money::ZERO);
            }
            return Err(MoneyError::Negative(t.to_string()));
        }
        if lower.contains('e') {
            return match t.parse::<f64>() {
                // The error names the value as written (`1e30`), not the float's rendering;
                // NaN and infinities were refused above, so an infinite `v` overflowed (`1e400`).
                Ok(v) => Money::from_usd(v).map_err(|e| match e {
                    MoneyError::NotFinite(_) => MoneyError::TooLarge(t.to_string()),
                    MoneyError::Negative(_) => MoneyError::Negative(t.to_string()),
                    MoneyError::TooLarge(_) => MoneyError::TooLarge(t.to_string()),
                    MoneyError::Malformed(_) => MoneyError::Malformed(t.to_string()),
                }),
                Err(_) => Err(MoneyError::Malformed(t.to_string())),
            };
        }
        parse_decimal(t.strip_prefix('+').unwrap_or(t)).ok_or_else(|| {
            if !t.is_empty()
                && t.trim_start_matches('+')
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.')
                && t.matches('.').count() <= 1
                && t.chars().any(|c| c.is_ascii_digit())
            {
                MoneyError::TooLarge(t.to_string())
            } else {
                MoneyError::Malformed(t.to_string())
            }
        })
    }
}

/// Exact decimal parse of `digits[.digits]` into nanos; `None` on malformed input or overflow.
fn parse_decimal(t: &str) -> Option<Money> {
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, f),
        None => (t, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut nanos: u64 = 0;
    for b in int.bytes() {
        nanos = nanos.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    nanos = nanos.checked_mul(NANOS_PER_USD)?;
    let mut scale = NANOS_PER_USD / 10;
    let mut round_up = false;
    for (i, b) in frac.bytes().enumerate() {
        let d = u64::from(b - b'0');
        if i < 9 {
            nanos = nanos.checked_add(d * scale)?;
            scale /= 10;
        } else {
            round_up = i == 9 && d >= 5;
            if i >= 9 {
                break;
            }
        }
    }
    if round_up {
        nanos = nanos.checked_add(1)?;
    }
    Some(Money(nanos))
}

impl fmt::Display for Money {
    /// Dollars with up to nine decimals, trailing zeros trimmed: `12.5`, `0.000000001`, `3`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let int = self.0 / NANOS_PER_USD;
        let frac = self.0 % NANOS_PER_USD;
        if frac == 0 {
            return write!(f, "{int}");
        }
        let s = format!("{frac:09}");
        write!(f, "{int}.{}", s.trim_end_matches('0'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_tenths_make_exactly_one_dollar() {
        let tenth: Money = "0.1".parse().unwrap();
        let from_float = Money::from_usd(0.1).unwrap();
        assert_eq!(tenth, from_float);
        let sum = (0..10).fold(Money::ZERO, |acc, _| acc.saturating_add(tenth));
        assert_eq!(sum, Money::from_nanos(NANOS_PER_USD));
    }

    #[test]
    fn rejects_bad_amounts() {
        for bad in [
            "nan", "NaN", "inf", "-inf", "-1", "-0.5", "abc", "", ".", "1.2.3", "1e400",
        ] {
            assert!(bad.parse::<Money>().is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            "99999999999999".parse::<Money>(),
            Err(MoneyError::TooLarge(_))
        ));
        assert!(Money::from_usd(f64::NAN).is_err());
        assert!(Money::from_usd(f64::INFINITY).is_err());
        assert!(Money::from_usd(-0.01).is_err());
        assert!(Money::from_usd(1e11).is_err());
        assert_eq!(Money::from_usd(-0.0).unwrap(), Money::ZERO);
        assert_eq!("-0".parse::<Money>().unwrap(), Money::ZERO);
    }

    #[test]
    fn parses_exact_decimals_and_exponents() {
        assert_eq!("12.5".parse::<Money>().unwrap().as_nanos(), 12_500_000_000);
        assert_eq!("0.000000001".parse::<Money>().unwrap().as_nanos(), 1);
        assert_eq!("0.0000000015".parse::<Money>().unwrap().as_nanos(), 2);
        assert_eq!("0.0000000014".parse::<Money>().unwrap().as_nanos(), 1);
        assert_eq!("1e-3".parse::<Money>().unwrap().as_nanos(), 1_000_000);
        assert_eq!("+3".parse::<Money>().unwrap().as_nanos(), 3_000_000_000);
        assert_eq!(".5".parse::<Money>().unwrap().as_nanos(), 500_000_000);
        assert_eq!(
            "18446744073.709551615".parse::<Money>().unwrap(),
            Money::MAX
        );
    }

    #[test]
    fn tiny_positive_limit_rounds_up() {
        assert_eq!(Money::limit_from_usd(1e-12).unwrap().as_nanos(), 1);
        assert_eq!(Money::limit_from_usd(0.0).unwrap().as_nanos(), 0);
        assert_eq!(Money::from_usd(1e-12).unwrap().as_nanos(), 0);
    }

    #[test]
    fn display_round_trips() {
        for s in ["0", "12.5", "0.000000001", "3", "18446744073.709551615"] {
            assert_eq!(s.parse::<Money>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn errors_are_one_line_whatever_the_input() {
        for bad in ["-3\nx", "1\n2", "nan\n", "99999999999999999999\n9"] {
            let msg = bad.parse::<Money>().unwrap_err().to_string();
            assert!(!msg.contains('\n'), "{msg}");
        }
    }

    #[test]
    fn sums_saturate() {
        assert_eq!(Money::MAX.saturating_add(Money::from_nanos(1)), Money::MAX);
        assert_eq!(
            Money::ZERO.saturating_sub(Money::from_nanos(1)),
            Money::ZERO
        );
    }
}
