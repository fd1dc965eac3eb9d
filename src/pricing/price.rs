//! Exact prices and the cost of one call.
//!
//! A price is held as an integer count of **yocto-dollars (1e-24 USD) per token** in a `u128`
//! ([`Rate`]). Why so fine: the catalog's prices are written by Python's `json.dumps` from
//! floats, and some carry float noise down to the 24th decimal (`2.0000000000000002e-07`,
//! `0.0000029999900000000002`); nano-dollars per million tokens (1e-15 USD per token) would
//! have to round those. At 1e-24 every price of the pinned catalog is exact, and a price of
//! 1 000 USD per token still fits with room for 10^14 tokens before a product saturates.
//!
//! Prices are parsed from their decimal text (the JSON number as written, or a config string),
//! never through `f64`. Digits past the 24th decimal round the price **up** (a budget never
//! under-counts); no price of the pinned catalog has any.
//!
//! The cost of a call is the exact sum of `tokens × rate` over the token kinds, in
//! yocto-dollars, rounded **up** to the nano-dollar once (not per token kind), and saturating
//! at [`Money::MAX`].

use std::fmt;

use crate::model::money::Money;
pub use crate::model::unit::Usage;

/// Decimal places of a [`Rate`] in USD per token.
pub(crate) const RATE_SCALE: u32 = 24;
/// Yocto-dollars per nano-dollar.
const YOCTO_PER_NANO: u128 = 1_000_000_000_000_000;
/// Decimal places of a price per million tokens in [`Rate`] units: 24 - 6.
const PER_MTOK_SCALE: u32 = RATE_SCALE - 6;

/// A price per token, exactly: yocto-dollars (1e-24 USD) per token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u128);

impl Rate {
    /// Free.
    pub const ZERO: Rate = Rate(0);

    /// A rate of exactly `yocto` yocto-dollars (1e-24 USD) per token.
    pub const fn from_yocto_per_token(yocto: u128) -> Rate {
        Rate(yocto)
    }

    /// The rate in yocto-dollars per token.
    pub const fn as_yocto_per_token(self) -> u128 {
        self.0
    }

    /// Parses a price in USD per token as the catalog writes it (`3.75e-08`, `0.000015`, `0`).
    ///
    /// # Errors
    ///
    /// [`RateError`] when the text is not a non-negative decimal number or is too large.
    pub fn parse_per_token(text: &str) -> Result<Rate, RateError> {
        parse_decimal(text, RATE_SCALE).map(Rate)
    }

    /// Parses a price in USD per million tokens (`"2.50"`, `10`, as config overrides give it).
    ///
    /// # Errors
    ///
    /// As [`Rate::parse_per_token`].
    pub fn parse_per_mtok(text: &str) -> Result<Rate, RateError> {
        parse_decimal(text, PER_MTOK_SCALE).map(Rate)
    }

    /// The price in USD per million tokens, exactly, as a plain decimal (`2.5`, `0.0375`).
    pub fn per_mtok(self) -> String {
        plain_decimal(self.0, PER_MTOK_SCALE)
    }

    /// Half the rate, rounded up (Fireworks' default cache-read price).
    pub(crate) const fn half(self) -> Rate {
        Rate(self.0.div_ceil(2))
    }

    /// `tokens × self` in yocto-dollars, `None` past `u128::MAX`.
    fn times(self, tokens: u64) -> Option<u128> {
        self.0.checked_mul(u128::from(tokens))
    }
}

impl fmt::Display for Rate {
    /// USD per million tokens, e.g. `2.5/Mtok`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/Mtok", self.per_mtok())
    }
}

/// Why a price text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateError {
    /// Not a decimal number (`abc`, `1..2`, `""`, `NaN`).
    #[error("{0:?} is not a decimal number")]
    Malformed(String),
    /// Prices are never negative.
    #[error("{0:?} is negative")]
    Negative(String),
    /// More than about 3.4e14 USD per token.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Exponents are clamped to ±this (10^15): only a mantissa of more digits than any text can
/// hold could bring such a value back into range, and the shift arithmetic stays far from
/// `i64`'s bounds. (The scaling loop stops at the first overflow, within 39 steps.)
const EXPONENT_CLAMP: i64 = 1_000_000_000_000_000;

/// `text` (a decimal, optionally with an exponent: `1.5e-05`, `2E+3`, `+7`, `.5`) times
/// 10^`scale`, as an integer, rounded **up** when digits remain past the scale.
fn parse_decimal(text: &str, scale: u32) -> Result<u128, RateError> {
    let malformed = || RateError::Malformed(text.to_owned());
    let t = text.trim();
    let (negative, t) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], parse_exponent(&t[i + 1..]).ok_or_else(malformed)?),
        None => (t, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() && frac.is_empty() || !all_digits(int) || !all_digits(frac) {
        return Err(malformed());
    }
    // The value is DIGITS × 10^(exponent - frac.len()); shifted by `scale` it is
    // DIGITS × 10^shift, where a negative shift drops digits (and rounds up if any is not 0).
    let digits = int.bytes().chain(frac.bytes()).skip_while(|b| *b == b'0');
    let digits: Vec<u8> = digits.map(|b| b - b'0').collect();
    if digits.is_empty() {
        return Ok(0); // zero, also `-0` and `0e999`
    }
    if negative {
        return Err(RateError::Negative(text.to_owned()));
    }
    let frac_len = i64::try_from(frac.len()).map_err(|_| malformed())?;
    let shift = exponent + i64::from(scale) - frac_len;
    let too_large = || RateError::TooLarge(text.to_owned());
    let keep = i64::try_from(digits.len()).map_err(|_| malformed())? + shift.min(0);
    let mut value: u128 = 0;
    for d in digits
        .iter()
        .take(usize::try_from(keep.max(0)).unwrap_or(0))
    {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u128::from(*d)))
            .ok_or_else(too_large)?;
    }
    let dropped = digits
        .iter()
        .skip(usize::try_from(keep.max(0)).unwrap_or(0))
        .any(|d| *d != 0);
    for _ in 0..shift.max(0) {
        value = value.checked_mul(10).ok_or_else(too_large)?;
    }
    if dropped {
        // Round up: a price below the unit still costs something.
        value = value.checked_add(1).ok_or_else(too_large)?;
    }
    Ok(value)
}

/// An exponent's digits (`-08`, `+3`, `5`), clamped to ±[`EXPONENT_CLAMP`]; `None` when not
/// an integer.
fn parse_exponent(s: &str) -> Option<i64> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    let magnitude = if digits.len() > 15 {
        EXPONENT_CLAMP
    } else {
        digits.parse::<i64>().unwrap_or(0).min(EXPONENT_CLAMP)
    };
    Some(if neg { -magnitude } else { magnitude })
}

/// `value / 10^scale` as a plain decimal without trailing zeros (`2.5`, `0.0375`, `10`).
pub(crate) fn plain_decimal(value: u128, scale: u32) -> String {
    let unit = 10u128.pow(scale);
    let (int, frac) = (value / unit, value % unit);
    if frac == 0 {
        return int.to_string();
    }
    let width = usize::try_from(scale).unwrap_or(0);
    let frac = format!("{frac:0width$}");
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// The per-token rates one call is billed at (after the context tier is chosen).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Rates {
    /// Uncached prompt tokens.
    pub input: Rate,
    /// Completion tokens that are not reasoning.
    pub output: Rate,
    /// Prompt tokens read from the cache.
    pub cache_read: Rate,
    /// Prompt tokens written to the cache.
    pub cache_creation: Rate,
    /// Reasoning tokens.
    pub reasoning: Rate,
}

impl Rates {
    /// Every kind of token at `rate`.
    pub const fn flat(rate: Rate) -> Rates {
        Rates {
            input: rate,
            output: rate,
            cache_read: rate,
            cache_creation: rate,
            reasoning: rate,
        }
    }

    /// The exact cost of `usage` in yocto-dollars; `None` past `u128::MAX` (saturate).
    fn exact_cost(&self, usage: &Usage) -> Option<u128> {
        let plain_input = usage
            .input_tokens
            .saturating_sub(usage.cache_read_tokens)
            .saturating_sub(usage.cache_creation_tokens);
        let plain_output = usage.output_tokens.saturating_sub(usage.reasoning_tokens);
        let parts = [
            self.input.times(plain_input)?,
            self.cache_read.times(usage.cache_read_tokens)?,
            self.cache_creation.times(usage.cache_creation_tokens)?,
            self.output.times(plain_output)?,
            self.reasoning.times(usage.reasoning_tokens)?,
        ];
        parts.iter().try_fold(0u128, |sum, p| sum.checked_add(*p))
    }

    /// The cost of `usage`, rounded up to the nano-dollar once, saturating at [`Money::MAX`].
    pub fn cost(&self, usage: &Usage) -> Money {
        match self.exact_cost(usage) {
            Some(yocto) => {
                let nanos = yocto.div_ceil(YOCTO_PER_NANO);
                Money::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
            }
            None => Money::MAX,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn per_token(s: &str) -> u128 {
        Rate::parse_per_token(s).unwrap().as_yocto_per_token()
    }

    #[test]
    fn catalog_texts_parse_exactly() {
        assert_eq!(per_token("3.75e-08"), 37_500_000_000_000_000);
        assert_eq!(per_token("0.000015"), 15_000_000_000_000_000_000);
        assert_eq!(per_token("1.5E-05"), 15_000_000_000_000_000_000);
        assert_eq!(per_token("2.0000000000000002e-07"), 200_000_000_000_000_020);
        assert_eq!(
            per_token("0.0000029999900000000002"),
            2_999_990_000_000_000_200
        );
        assert_eq!(per_token("0"), 0);
        assert_eq!(per_token("0.0"), 0);
        assert_eq!(per_token("-0.0"), 0);
        assert_eq!(per_token("1e-24"), 1);
        assert_eq!(per_token("7"), 7 * 10u128.pow(24));
        assert_eq!(per_token(".5"), 5 * 10u128.pow(23));
        assert_eq!(per_token("+5."), 5 * 10u128.pow(24));
    }

    #[test]
    fn digits_below_the_unit_round_up() {
        assert_eq!(per_token("1e-25"), 1);
        assert_eq!(per_token("1.0000000000000000000000001"), 10u128.pow(24) + 1);
        assert_eq!(per_token("1e-999999999999"), 1);
        assert_eq!(per_token("1e-99999999999999999999999"), 1);
        // A long mantissa brings a far exponent back into range, exactly.
        let long = format!("1{}e-200", "0".repeat(200));
        assert_eq!(per_token(&long), 10u128.pow(24));
        assert_eq!(per_token("0e-999999999999"), 0);
        // Trailing zeros past the unit are not a remainder.
        assert_eq!(per_token("1.00000000000000000000000000000"), 10u128.pow(24));
    }

    #[test]
    fn bad_texts_are_refused() {
        for bad in [
            "", "e5", ".", "abc", "1.2.3", "1e", "1e+", "NaN", "inf", "1 2", "--1", "0x10",
        ] {
            assert!(
                matches!(Rate::parse_per_token(bad), Err(RateError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Rate::parse_per_token("-1e-6"),
            Err(RateError::Negative(_))
        ));
        assert!(matches!(
            Rate::parse_per_token("1e20"),
            Err(RateError::TooLarge(_))
        ));
        assert!(matches!(
            Rate::parse_per_token("1e99999"),
            Err(RateError::TooLarge(_))
        ));
    }

    #[test]
    fn per_mtok_round_trips() {
        let r = Rate::parse_per_mtok("2.50").unwrap();
        assert_eq!(r, Rate::parse_per_token("2.5e-06").unwrap());
        assert_eq!(r.per_mtok(), "2.5");
        assert_eq!(
            Rate::parse_per_token("3.75e-08").unwrap().per_mtok(),
            "0.0375"
        );
        assert_eq!(Rate::parse_per_mtok("10").unwrap().to_string(), "10/Mtok");
        assert_eq!(Rate::ZERO.per_mtok(), "0");
    }

    #[test]
    fn cost_rounds_up_once_per_call() {
        // 3 tokens at 3.75e-08: 1.125e-07 USD = 112.5 nanos, so 113.
        let rates = Rates::flat(Rate::parse_per_token("3.75e-08").unwrap());
        assert_eq!(rates.cost(&Usage::new(3, 0)).as_nanos(), 113);
        // 1 + 1 tokens at 0.4 nanos each: 0.8, one round-up (1), not two (2).
        let tiny = Rates::flat(Rate::parse_per_token("4e-10").unwrap());
        assert_eq!(tiny.cost(&Usage::new(1, 1)).as_nanos(), 1);
        assert_eq!(tiny.cost(&Usage::new(0, 0)).as_nanos(), 0);
    }

    #[test]
    fn parts_are_billed_at_their_rates() {
        let rates = Rates {
            input: Rate::parse_per_mtok("3").unwrap(),
            output: Rate::parse_per_mtok("15").unwrap(),
            cache_read: Rate::parse_per_mtok("0.3").unwrap(),
            cache_creation: Rate::parse_per_mtok("3.75").unwrap(),
            reasoning: Rate::parse_per_mtok("20").unwrap(),
        };
        let usage = Usage::new(1_000_000, 1_000_000)
            .cache_read(200_000)
            .cache_creation(100_000)
            .reasoning(400_000);
        // 0.7 × 3 + 0.2 × 0.3 + 0.1 × 3.75 + 0.6 × 15 + 0.4 × 20 = 19.535 USD
        assert_eq!(rates.cost(&usage), "19.535".parse::<Money>().unwrap());
        // Parts beyond their whole: nothing at the plain rate, the parts in full.
        let odd = Usage::new(10, 0).cache_read(1_000_000);
        assert_eq!(rates.cost(&odd), "0.3".parse::<Money>().unwrap());
    }

    #[test]
    fn huge_costs_saturate() {
        let rates = Rates::flat(Rate::parse_per_token("1000").unwrap());
        assert_eq!(rates.cost(&Usage::new(u64::MAX, u64::MAX)), Money::MAX);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    /// `digits` (no leading zeros) × 10^`exp` in scientific form with the point after `split`
    /// digits: `123e-5` → `1.23e-3` (split 1).
    fn scientific(digits: &str, exp: i64, split: usize) -> String {
        let split = split.min(digits.len());
        let (int, frac) = digits.split_at(split);
        let shift = exp + i64::try_from(frac.len()).unwrap();
        let int = if int.is_empty() { "0" } else { int };
        format!("{int}.{frac}e{shift}")
    }

    proptest! {
        /// Every yocto amount reads back exactly from its plain and its scientific forms, and
        /// one more non-zero digit past the unit rounds it up by exactly one.
        #[test]
        fn decimal_texts_round_trip(y in 0u128..10u128.pow(30), split in 0usize..32, tail in 1u8..10) {
            let plain = plain_decimal(y, RATE_SCALE);
            prop_assert_eq!(parse_decimal(&plain, RATE_SCALE), Ok(y));
            let digits = y.to_string();
            let sci = scientific(&digits, -i64::from(RATE_SCALE), split);
            prop_assert_eq!(parse_decimal(&sci, RATE_SCALE), Ok(y), "{}", sci);
            let finer = format!("{digits}{tail}e-{}", RATE_SCALE + 1);
            prop_assert_eq!(parse_decimal(&finer, RATE_SCALE), Ok(y + 1), "{}", finer);
        }
    }
}
