//! Money in request bodies: a JSON number or a decimal string, parsed exactly from its text.
//!
//! The value is taken as a [`RawValue`], so the number's digits reach [`Money`]'s decimal
//! parser as written; nothing goes through `f64`. Exponent forms (`1.5e-05`, what Python's
//! `json.dumps` writes for small floats) are rewritten as plain decimals first.

use serde_json::value::RawValue;

use provider_budgets::{Money, MoneyError};

/// Exponents beyond this are refused (too large) or read as zero (too small): the rewrite
/// never allocates more than a few dozen digits.
const MAX_SHIFT: i64 = 64;

/// Parses a JSON number or a JSON string holding a decimal amount of USD.
pub(crate) fn money_from_json(raw: &RawValue) -> Result<Money, String> {
    let text = raw.get().trim();
    let owned;
    let decimal = if text.starts_with('"') {
        owned = serde_json::from_str::<String>(text).map_err(|e| format!("{e}"))?;
        owned.as_str()
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        text
    } else {
        return Err(format!(
            "expected a JSON number or a decimal string, got {}",
            clip(text)
        ));
    };
    parse_exact(decimal).map_err(|e| e.to_string())
}

/// [`Money`]'s parser, with exponent forms rewritten as plain decimals (exactly).
pub(crate) fn parse_exact(s: &str) -> Result<Money, MoneyError> {
    let t = s.trim();
    let Some(pos) = t.find(['e', 'E']) else {
        return t.parse();
    };
    let (mantissa, exp) = (&t[..pos], &t[pos + 1..]);
    let malformed = || MoneyError::Malformed(t.to_owned());
    let exp: i64 = exp
        .strip_prefix('+')
        .unwrap_or(exp)
        .parse()
        .map_err(|_| malformed())?;
    let (sign, digits_part) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa.strip_prefix('+').unwrap_or(mantissa)),
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
        return format!("{sign}0").parse(); // zero, whatever the exponent
    }
    if !sign.is_empty() {
        // A negative amount with a nonzero digit, however small or large its exponent.
        return Err(MoneyError::Negative(t.to_owned()));
    }
    // Leading zeros were trimmed: the point sits `point` digits into `digits`. Checked: an
    // exponent near i64::MAX or i64::MIN must not wrap around (to zero, or to a small amount).
    let trimmed = (int.len() + frac.len() - digits.len()) as i64;
    let point = (int.len() as i64 - trimmed).checked_add(exp);
    let point = match point {
        Some(p) if p > MAX_SHIFT => return Err(MoneyError::TooLarge(t.to_owned())),
        None if exp > 0 => return Err(MoneyError::TooLarge(t.to_owned())),
        // Far below a nano-dollar: rounds to zero.
        Some(p) if p < -MAX_SHIFT => return Ok(Money::ZERO),
        None => return Ok(Money::ZERO),
        Some(p) => p,
    };
    let plain = if point <= 0 {
        format!(
            "{sign}0.{}{digits}",
            "0".repeat(point.unsigned_abs() as usize)
        )
    } else if point as usize >= digits.len() {
        format!(
            "{sign}{digits}{}",
            "0".repeat(point as usize - digits.len())
        )
    } else {
        let (a, b) = digits.split_at(point as usize);
        format!("{sign}{a}.{b}")
    };
    plain.parse().map_err(|e| match e {
        MoneyError::Negative(_) => MoneyError::Negative(t.to_owned()),
        MoneyError::TooLarge(_) => MoneyError::TooLarge(t.to_owned()),
        _ => malformed(),
    })
}

/// At most 40 characters of a value, for error messages.
pub(crate) fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nanos(s: &str) -> u64 {
        parse_exact(s).unwrap().as_nanos()
    }

    #[test]
    fn exponents_are_exact() {
        assert_eq!(nanos("1.5e-05"), 15_000);
        assert_eq!(nanos("1.5E-5"), 15_000);
        assert_eq!(nanos("2e0"), 2_000_000_000);
        assert_eq!(nanos("0.0012e3"), 1_200_000_000);
        assert_eq!(nanos("123e-11"), 1); // 1.23 nanos rounds half-up at the tenth digit only
        assert_eq!(nanos("1e-9"), 1);
        assert_eq!(nanos("5e-10"), 1);
        assert_eq!(nanos("4e-10"), 0);
        assert_eq!(nanos("0e400"), 0);
        assert_eq!(nanos("1e-400"), 0);
        assert_eq!(nanos("0.1"), 100_000_000);
        assert_eq!(nanos("-0"), 0);
        // 0.1 + 0.2 as written by a float printer: exact, not 0.30000000000000004 rounded.
        assert_eq!(nanos("0.30000000000000004"), 300_000_000);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(matches!(parse_exact("-1e-3"), Err(MoneyError::Negative(_))));
        assert!(matches!(parse_exact("1e400"), Err(MoneyError::TooLarge(_))));
        assert!(matches!(parse_exact("1e"), Err(MoneyError::Malformed(_))));
        assert!(matches!(parse_exact("e5"), Err(MoneyError::Malformed(_))));
        assert!(matches!(
            parse_exact("1.2.3e1"),
            Err(MoneyError::Malformed(_))
        ));
        assert!(matches!(parse_exact("NaN"), Err(MoneyError::NotFinite(_))));
    }

    #[test]
    fn extreme_exponents_are_refused_not_wrapped_to_zero() {
        for huge in [
            "1e9223372036854775807",
            "1E+9223372036854775807",
            "0.05e9223372036854775807",
        ] {
            assert!(
                matches!(parse_exact(huge), Err(MoneyError::TooLarge(_))),
                "{huge}"
            );
        }
        for negative in [
            "-1e9223372036854775807",
            "-1e-9223372036854775808",
            "-1e-400",
            "-5e-10",
        ] {
            assert!(
                matches!(parse_exact(negative), Err(MoneyError::Negative(_))),
                "{negative}"
            );
        }
        // Tiny positive amounts round to zero, also at i64::MIN (no overflow on the way).
        assert_eq!(nanos("0.05e-9223372036854775808"), 0);
        assert_eq!(nanos("1e-9223372036854775808"), 0);
        assert_eq!(nanos("-0e9223372036854775807"), 0);
        // An exponent beyond i64 is malformed, not zero.
        assert!(matches!(
            parse_exact("1e99999999999999999999"),
            Err(MoneyError::Malformed(_))
        ));
    }

    #[test]
    fn json_forms() {
        let raw = |s: &str| serde_json::from_str::<Box<RawValue>>(s).unwrap();
        assert_eq!(
            money_from_json(&raw("0.1")).unwrap().as_nanos(),
            100_000_000
        );
        assert_eq!(
            money_from_json(&raw("\"0.1\"")).unwrap().as_nanos(),
            100_000_000
        );
        assert_eq!(
            money_from_json(&raw("\"1e-3\"")).unwrap().as_nanos(),
            1_000_000
        );
        assert!(money_from_json(&raw("true")).is_err());
        assert!(money_from_json(&raw("null")).is_err());
        assert!(money_from_json(&raw("{}")).is_err());
        assert!(money_from_json(&raw("-1"))
            .unwrap_err()
            .contains("negative"));
    }
}
