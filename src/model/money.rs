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

/// Exponents that move the point further than this are refused (too large) or read as zero
/// (too small) by [`Money::from_decimal_exponent`]: the rewrite never allocates more than a
/// few dozen digits. `u64::MAX` nanos has 20 digits, so nothing representable is cut off.
const MAX_SHIFT: i64 = 64;

impl Money {
    /// Parses a decimal amount of USD exactly, also in exponent form (`1.5e-05`, what
    /// Python's `json.dumps` writes for small floats; `2E+3`): the exponent form is rewritten
    /// as a plain decimal, so nothing goes through `f64`, and then read as [`Money`]'s
    /// [`FromStr`] reads a decimal (digits past the ninth decimal rounded half-up).
    ///
    /// Surrounding whitespace is ignored; a leading `+` is allowed. A negative zero
    /// (`-0`, `-0.0e5`) is zero. An exponent that does not fit in an `i64` is malformed.
    ///
    /// # Errors
    ///
    /// [`MoneyError::Negative`] for a negative amount (however small), [`MoneyError::TooLarge`]
    /// past `u64::MAX` nanos (however large the exponent: never saturated, never wrapped to
    /// zero), [`MoneyError::NotFinite`] for NaN and infinities, [`MoneyError::Malformed`] for
    /// anything that is not a decimal.
    pub fn from_decimal_exponent(s: &str) -> Result<Money, MoneyError> {
        let t = s.trim();
        let Some(pos) = t.find(['e', 'E']) else {
            return t.parse();
        };
        let (mantissa, exp) = (&t[..pos], &t[pos + 1..]);
        let malformed = || MoneyError::Malformed(t.to_owned());
        // `i64`'s parser takes one optional sign itself (`e+5`, `e-5`; not `e++5`).
        let exp: i64 = exp.parse().map_err(|_| malformed())?;
        let (negative, digits_part) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
        };
        let (int, frac) = digits_part.split_once('.').unwrap_or((digits_part, ""));
        if (int.is_empty() && frac.is_empty())
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(malformed());
        }
        let digits = format!("{int}{frac}");
        let digits = digits.trim_start_matches('0');
        if digits.is_empty() {
            return Ok(Money::ZERO); // zero, whatever the sign and the exponent
        }
        if negative {
            // A negative amount with a nonzero digit, however small or large its exponent.
            return Err(MoneyError::Negative(t.to_owned()));
        }
        // Leading zeros were trimmed: the point sits `point` digits into `digits`. Checked: an
        // exponent near i64::MAX or i64::MIN must not wrap around (to zero, or to a small amount).
        let trimmed = (int.len() + frac.len() - digits.len()) as i64;
        let point = match (int.len() as i64 - trimmed).checked_add(exp) {
            Some(p) if p > MAX_SHIFT => return Err(MoneyError::TooLarge(t.to_owned())),
            None if exp > 0 => return Err(MoneyError::TooLarge(t.to_owned())),
            // Far below a nano-dollar: rounds to zero.
            Some(p) if p < -MAX_SHIFT => return Ok(Money::ZERO),
            None => return Ok(Money::ZERO),
            Some(p) => p,
        };
        plain_decimal(digits, point).parse().map_err(|e| match e {
            MoneyError::TooLarge(_) => MoneyError::TooLarge(t.to_owned()),
            _ => malformed(),
        })
    }

    /// Parses the text of a JSON number exactly (RFC 8259's grammar:
    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, no whitespace), as
    /// [`Money::from_decimal_exponent`] does: `0.1` is exactly 100 000 000 nanos, `1.5e-05`
    /// exactly 15 000.
    ///
    /// # Errors
    ///
    /// [`MoneyError::Malformed`] for a text that is not a JSON number (`.5`, `+1`, `01`,
    /// `NaN`, `1.`); else as [`Money::from_decimal_exponent`].
    pub fn parse_json_number(text: &str) -> Result<Money, MoneyError> {
        if !is_json_number(text) {
            return Err(MoneyError::Malformed(text.to_owned()));
        }
        Money::from_decimal_exponent(text)
    }
}

/// `digits` (no leading zero, not empty) with the decimal point `point` digits in (before
/// them when `point <= 0`, after them with zeros appended when past their end).
fn plain_decimal(digits: &str, point: i64) -> String {
    if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}", "0".repeat(point as usize - digits.len()))
    } else {
        let (a, b) = digits.split_at(point as usize);
        format!("{a}.{b}")
    }
}

/// Whether `t` is a JSON number as RFC 8259 writes it.
fn is_json_number(t: &str) -> bool {
    let b = t.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

impl FromStr for Money {
    type Err = MoneyError;

    /// Parses a decimal amount of US dollars exactly (`"0.1"` is exactly 100 000 000 nanos,
    /// digits past the ninth decimal are rounded half-up). Exponent forms (`"1e-3"`) go through
    /// `f64` and [`Money::from_usd`]; [`Money::from_decimal_exponent`] reads them exactly.
    fn from_str(s: &str) -> Result<Money, MoneyError> {
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        if lower.contains("nan") || lower.contains("inf") {
            return Err(MoneyError::NotFinite(t.to_string()));
        }
        if let Some(rest) = t.strip_prefix('-') {
            // "-0" and "-0.000" (a decimal of zeros) are zero; anything else is refused:
            // negative when a number follows the sign, malformed when none does ("-." and
            // "-0.0.0" are no number, never read as zero).
            if rest.bytes().all(|b| b == b'0' || b == b'.') && parse_decimal(rest).is_some() {
                return Ok(Money::ZERO);
            }
            let number = !rest.starts_with(['+', '-'])
                && matches!(rest.parse::<Money>(), Ok(_) | Err(MoneyError::TooLarge(_)));
            return Err(if number {
                MoneyError::Negative(t.to_string())
            } else {
                MoneyError::Malformed(t.to_string())
            });
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

    fn exact(s: &str) -> u64 {
        Money::from_decimal_exponent(s).unwrap().as_nanos()
    }

    #[test]
    fn exponents_are_exact() {
        assert_eq!(exact("1.5e-05"), 15_000);
        assert_eq!(exact("1.5E-5"), 15_000);
        assert_eq!(exact("2e0"), 2_000_000_000);
        assert_eq!(exact("2E+3"), 2_000_000_000_000);
        assert_eq!(exact("0.0012e3"), 1_200_000_000);
        assert_eq!(exact("123e-11"), 1); // 1.23 nanos rounds half-up at the tenth digit only
        assert_eq!(exact("1e-9"), 1);
        assert_eq!(exact("5e-10"), 1);
        assert_eq!(exact("4e-10"), 0);
        assert_eq!(exact("0e400"), 0);
        assert_eq!(exact("1e-400"), 0);
        assert_eq!(exact("0.1"), 100_000_000);
        assert_eq!(exact("-0"), 0);
        assert_eq!(exact("-0.0e5"), 0);
        // Past f64's 17 digits: exact, where `f64` would round.
        assert_eq!(exact("1234567890.123456789e0"), 1_234_567_890_123_456_789);
        // 0.1 + 0.2 as written by a float printer: exact, not 0.30000000000000004 rounded.
        assert_eq!(exact("0.30000000000000004"), 300_000_000);
    }

    #[test]
    fn bad_exponent_forms_are_refused() {
        let refused = |s: &str| Money::from_decimal_exponent(s).unwrap_err();
        assert!(matches!(refused("-1e-3"), MoneyError::Negative(_)));
        assert!(matches!(refused("1e400"), MoneyError::TooLarge(_)));
        assert!(matches!(refused("1e19"), MoneyError::TooLarge(_)));
        for malformed in [
            "1e", "e5", "1.2.3e1", "1e++5", "1e+-5", "1e5e5", ".e5", "1 e5", "+-1e1",
        ] {
            assert!(
                matches!(refused(malformed), MoneyError::Malformed(_)),
                "{malformed}"
            );
        }
        assert!(matches!(refused("NaN"), MoneyError::NotFinite(_)));
    }

    #[test]
    fn extreme_exponents_are_refused_not_wrapped_to_zero() {
        let refused = |s: &str| Money::from_decimal_exponent(s).unwrap_err();
        for huge in [
            "1e9223372036854775807",
            "1E+9223372036854775807",
            "0.05e9223372036854775807",
        ] {
            assert!(matches!(refused(huge), MoneyError::TooLarge(_)), "{huge}");
        }
        for negative in [
            "-1e9223372036854775807",
            "-1e-9223372036854775808",
            "-1e-400",
            "-5e-10",
        ] {
            assert!(
                matches!(refused(negative), MoneyError::Negative(_)),
                "{negative}"
            );
        }
        // Tiny positive amounts round to zero, also at i64::MIN (no overflow on the way).
        assert_eq!(exact("0.05e-9223372036854775808"), 0);
        assert_eq!(exact("1e-9223372036854775808"), 0);
        assert_eq!(exact("-0e9223372036854775807"), 0);
        // An exponent beyond i64 is malformed, not zero.
        assert!(matches!(
            refused("1e99999999999999999999"),
            MoneyError::Malformed(_)
        ));
    }

    #[test]
    fn json_numbers_follow_the_json_grammar() {
        let json = |s: &str| Money::parse_json_number(s).map(Money::as_nanos);
        assert_eq!(json("0.1"), Ok(100_000_000));
        assert_eq!(json("1.5e-05"), Ok(15_000));
        assert_eq!(json("-0"), Ok(0));
        assert_eq!(json("12E+1"), Ok(120_000_000_000));
        for not_json in [
            "", "-", ".5", "+1", "01", "1.", "1.e5", "1e", "NaN", " 1", "1 ", "0x1",
        ] {
            assert!(
                matches!(json(not_json), Err(MoneyError::Malformed(_))),
                "{not_json:?}"
            );
        }
        assert!(matches!(json("-1"), Err(MoneyError::Negative(_))));
        assert!(matches!(json("1e20"), Err(MoneyError::TooLarge(_))));
    }

    #[test]
    fn a_minus_sign_before_no_number_is_not_zero() {
        for bad in ["-", "-.", "-..", "-0.0.0", "-0e5x", "--1", "-+1", "-abc"] {
            assert!(
                matches!(bad.parse::<Money>(), Err(MoneyError::Malformed(_))),
                "{bad:?}"
            );
        }
        for negative in ["-1", "-0.5", "-1e-3", "-99999999999999999999"] {
            assert!(
                matches!(negative.parse::<Money>(), Err(MoneyError::Negative(_))),
                "{negative:?}"
            );
        }
        for zero in ["-0", "-0.", "-.0", "-000.000"] {
            assert_eq!(zero.parse::<Money>(), Ok(Money::ZERO), "{zero:?}");
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
