//! What the fuzz targets check (the library of the `fuzz/` crate), shared with
//! `tests/model/fuzz_corpus.rs` (through this crate's module `fuzz_checks`), so that the
//! committed corpus is replayed by plain `cargo test` through exactly the code the fuzzers run. Only `std`, `jiff` and `provider_budgets` are used here:
//! the library's test build has no `arbitrary` or `libfuzzer-sys`.
//!
//! Every function panics when a property is violated; a panic is what libFuzzer reports as a
//! crash and what makes the corpus test fail.

use jiff::Timestamp;
use provider_budgets::{
    fuzz_decode_value, parse_duration, Config, Money, MoneyError, Period, Schedule,
};

/// Longest duration / period / money text the `duration` target looks at (bytes).
pub const MAX_TEXT: usize = 256;
/// Longest config text the `config` target looks at (bytes).
pub const MAX_CONFIG: usize = 4096;
/// Longest stored value the `value_decode` target looks at (bytes).
pub const MAX_VALUE: usize = 4096;
/// Longest request amount the `request_money` target looks at (bytes).
pub const MAX_AMOUNT: usize = 256;

/// Which of the `duration` target's parsers accepted a text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted {
    /// `parse_duration` (humantime).
    pub duration: bool,
    /// `str::parse::<Period>`.
    pub period: bool,
    /// `str::parse::<Money>`.
    pub money: bool,
}

/// The `duration` target: one text through the three small parsers. `None` when the input is
/// over [`MAX_TEXT`] and was skipped.
///
/// Beyond not panicking: a period and an amount print back to text that parses to the same
/// value, and every window of an accepted period contains the instant it was asked for, from
/// the earliest to the latest instant `jiff` represents, for several anchors.
pub fn durations(data: &[u8]) -> Option<Accepted> {
    if data.len() > MAX_TEXT {
        return None;
    }
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();

    let duration = match parse_duration(text) {
        Ok(d) => {
            // Formatting the result back must not panic either.
            let _ = format!("{d:?}");
            true
        }
        Err(e) => {
            assert!(!e.is_empty(), "empty duration error for {text:?}");
            false
        }
    };

    let period = match text.parse::<Period>() {
        Ok(p) => {
            let printed = p.to_string();
            let again: Period = printed
                .parse()
                .unwrap_or_else(|e| panic!("{text:?} -> {printed:?} does not parse back: {e}"));
            assert_eq!(again, p, "{text:?} -> {printed:?} parses to another period");
            check_windows(p);
            true
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    };

    let money = match text.parse::<Money>() {
        Ok(m) => {
            let printed = m.to_string();
            let again: Money = printed
                .parse()
                .unwrap_or_else(|e| panic!("{text:?} -> {printed:?} does not parse back: {e}"));
            assert_eq!(again, m, "{text:?} -> {printed:?} parses to another amount");
            let _ = m.as_usd();
            true
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    };

    Some(Accepted {
        duration,
        period,
        money,
    })
}

/// Every window of `period` contains the instant it was computed for and is not empty.
fn check_windows(period: Period) {
    let min = Timestamp::MIN.as_second();
    let max = Timestamp::MAX.as_second();
    // Unix epoch, a Monday, the 31st of a month late in the day, a leap day, the extremes.
    let anchors = [
        0,
        1_704_067_200,
        1_706_691_600,
        1_709_164_800,
        -86_401,
        min,
        max,
    ];
    let instants = [
        min,
        min + 1,
        -1,
        0,
        1,
        1_709_251_199,
        1_709_251_200,
        1_732_579_200,
        253_402_300_799, // 9999-12-31T23:59:59Z
        max - 1,
        max,
    ];
    for anchor in anchors {
        let Ok(anchor_ts) = Timestamp::from_second(anchor) else {
            continue;
        };
        let schedule = Schedule::new(period, anchor_ts);
        for at in instants {
            let Ok(at_ts) = Timestamp::from_second(at) else {
                continue;
            };
            let w = schedule.window_at(at_ts);
            assert!(
                w.start_secs() < w.end_secs(),
                "period {period}, anchor {anchor}, at {at}: empty window {w:?}"
            );
            assert!(
                w.contains_secs(at),
                "period {period}, anchor {anchor}, at {at}: window {w:?} does not contain it"
            );
            // The instants a status row prints must not panic either.
            let _ = (w.start(), w.end());
        }
    }
}

/// The `config` target's input, decoded from raw bytes the way `arbitrary` 1.x decodes
/// `#[derive(Arbitrary)] struct { toml: bool, text: String }` with `arbitrary_take_rest`
/// (which is what `fuzz_target!` uses): the first byte's low bit selects TOML, the rest is the
/// text, cut at its first invalid UTF-8 byte. The fuzz target asserts that both decodings
/// agree, so the corpus test replays the seeds exactly as the fuzzer sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigInput {
    /// TOML (`true`) or YAML (`false`).
    pub toml: bool,
    /// The document.
    pub text: String,
}

impl ConfigInput {
    /// Decodes a corpus file (see the type's doc for the layout).
    pub fn from_bytes(data: &[u8]) -> ConfigInput {
        let (toml, rest) = match data.split_first() {
            Some((&flag, rest)) => (flag & 1 == 1, rest),
            None => (false, &[][..]),
        };
        let text = match std::str::from_utf8(rest) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&rest[..e.valid_up_to()]).unwrap_or_default(),
        };
        ConfigInput {
            toml,
            text: text.to_owned(),
        }
    }

    /// Encodes an input as a corpus file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.toml)];
        out.extend_from_slice(self.text.as_bytes());
        out
    }
}

/// The `config` target: YAML or TOML through [`Config`]. `None` when the input is over
/// [`MAX_CONFIG`] and was skipped, else whether the config was accepted.
///
/// Beyond not panicking: an accepted config passes [`Config::validate`] and its budgets'
/// periods print back to themselves; a refused one has a non-empty message.
pub fn config(input: &ConfigInput) -> Option<bool> {
    if input.text.len() > MAX_CONFIG {
        return None;
    }
    let parsed = if input.toml {
        Config::from_toml_str(&input.text)
    } else {
        Config::from_yaml_str(&input.text)
    };
    Some(match parsed {
        Ok(config) => {
            if let Err(e) = config.validate() {
                panic!("a parsed config fails validation: {e}\n{config:?}");
            }
            for b in &config.budgets {
                let printed = b.period.to_string();
                assert_eq!(
                    printed.parse::<Period>().ok(),
                    Some(b.period),
                    "{printed:?}"
                );
                let _ = b.limit.to_string();
            }
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty(), "empty config error");
            false
        }
    })
}

/// The `value_decode` target: bytes as a stored value (and key) of the sled store. `None` when
/// the input is over [`MAX_VALUE`] and was skipped, else whether any decoding accepted it.
/// It must never panic, whatever the bytes.
pub fn value_decode(data: &[u8]) -> Option<bool> {
    if data.len() > MAX_VALUE {
        return None;
    }
    Some(fuzz_decode_value(data))
}

/// What an amount text is worth, by [`reference_amount`] (an exact decimal reading written
/// apart from the library's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// A decimal (a negative zero included) worth this many nanos, rounded half-up.
    Nanos(u64),
    /// A well-formed amount below zero.
    Negative,
    /// A well-formed amount past `u64::MAX` nanos.
    TooLarge,
    /// No decimal, or an exponent beyond `i64` (the library refuses those as malformed).
    Malformed,
}

/// A decimal read apart from the library: `(negative, digits without leading zeros, power of
/// ten)`, worth `digits × 10^power` USD; `None` when the text is no decimal. The grammar is
/// what the sidecar takes: surrounding whitespace, one optional sign, digits with at most one
/// point (at least one digit), then optionally `e`/`E`, one optional sign and digits whose
/// value fits in an `i64`.
pub fn decimal_parts(text: &str) -> Option<(bool, String, i128)> {
    let t = text.trim();
    let (negative, body) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let parts: Vec<&str> = mantissa.split('.').collect();
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let (int, frac) = match parts.as_slice() {
        [int] => (*int, ""),
        [int, frac] => (*int, *frac),
        _ => return None,
    };
    if !all_digits(int) || !all_digits(frac) || int.len() + frac.len() == 0 {
        return None;
    }
    let power = match exponent {
        None => 0,
        Some(e) => exponent_value(e)?,
    };
    let digits = format!("{int}{frac}").trim_start_matches('0').to_owned();
    Some((negative, digits, power - frac.len() as i128))
}

/// An exponent's value when it is an optional sign and digits within `i64`.
fn exponent_value(e: &str) -> Option<i128> {
    let (sign, digits) = match e.as_bytes().first() {
        Some(b'-') => (-1, &e[1..]),
        Some(b'+') => (1, &e[1..]),
        _ => (1, e),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = digits.trim_start_matches('0');
    if significant.len() > 19 {
        return None;
    }
    let value = sign * significant.parse::<i128>().unwrap_or(0);
    (i128::from(i64::MIN)..=i128::from(i64::MAX))
        .contains(&value)
        .then_some(value)
}

/// The exact worth of an amount text in nanos (`digits × 10^(power + 9)`, rounded half-up),
/// computed on the digit string: no float, no rewrite.
pub fn reference_amount(text: &str) -> Amount {
    let Some((negative, digits, power)) = decimal_parts(text) else {
        return Amount::Malformed;
    };
    if digits.is_empty() {
        return Amount::Nanos(0);
    }
    if negative {
        return Amount::Negative;
    }
    let shift = power + 9;
    let (kept, round_up) = if shift >= 0 {
        // `u64::MAX` has 20 digits: more is too large, whatever they are.
        if digits.len() as i128 + shift > 20 {
            return Amount::TooLarge;
        }
        (format!("{digits}{}", "0".repeat(shift as usize)), false)
    } else {
        let dropped = shift.unsigned_abs();
        if dropped > digits.len() as u128 {
            return Amount::Nanos(0); // below half a nano: the first dropped digit is a 0
        }
        let cut = digits.len() - dropped as usize;
        (digits[..cut].to_owned(), digits.as_bytes()[cut] >= b'5')
    };
    if kept.len() > 20 {
        return Amount::TooLarge;
    }
    let nanos = kept.parse::<u128>().unwrap_or(0) + u128::from(round_up);
    u64::try_from(nanos).map_or(Amount::TooLarge, Amount::Nanos)
}

/// Whether `t` is a JSON number (RFC 8259), checked apart from the library's scanner.
pub fn is_json_number(t: &str) -> bool {
    let t = t.strip_prefix('-').unwrap_or(t);
    let (mantissa, exponent) = match t.find(['e', 'E']) {
        Some(i) => (&t[..i], Some(&t[i + 1..])),
        None => (t, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (mantissa, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    digits(int)
        && (int == "0" || !int.starts_with('0'))
        && frac.is_none_or(digits)
        && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)))
}

/// The `request_money` target: one text through the sidecar's exact amount parsers,
/// [`Money::from_decimal_exponent`] (JSON strings) and [`Money::parse_json_number`] (JSON
/// numbers). `None` when the input is over [`MAX_AMOUNT`] and was skipped, else what
/// [`reference_amount`] says the text is.
///
/// Beyond not panicking:
/// * the result is the exact decimal value ([`reference_amount`]): accepted exactly when the
///   reference reads a value, that very value; a negative is refused as negative and an
///   amount past `u64::MAX` nanos as too large (never saturated, never zero), however large
///   its exponent (`1e9223372036854775807`, and its negative);
/// * the same digits with the point moved into the exponent read the same;
/// * an accepted amount prints as a JSON number that reads back to it;
/// * a JSON number reads as the decimal does, anything else is malformed.
pub fn request_money(data: &[u8]) -> Option<Amount> {
    if data.len() > MAX_AMOUNT {
        return None;
    }
    let text = String::from_utf8_lossy(data);
    let text = text.as_ref();
    let parsed = Money::from_decimal_exponent(text);
    let expected = reference_amount(text);
    match (expected, &parsed) {
        (Amount::Nanos(n), Ok(m)) => assert_eq!(m.as_nanos(), n, "{text:?}"),
        (Amount::Negative, Err(MoneyError::Negative(_)))
        | (Amount::TooLarge, Err(MoneyError::TooLarge(_)))
        | (Amount::Malformed, Err(_)) => {}
        _ => panic!("{text:?}: the reference reads {expected:?}, the parser {parsed:?}"),
    }
    if let Err(e) = &parsed {
        assert!(!e.to_string().contains('\n'), "{text:?}: {e}");
    }
    if let (Ok(m), Some((false, digits, power))) = (&parsed, decimal_parts(text)) {
        for rewritten in rewrites(&digits, power) {
            assert_eq!(
                Money::from_decimal_exponent(&rewritten).as_ref(),
                Ok(m),
                "{text:?} -> {rewritten:?}"
            );
        }
        let printed = m.to_string();
        assert_eq!(
            Money::parse_json_number(&printed).as_ref(),
            Ok(m),
            "{printed:?}"
        );
    }
    let json = Money::parse_json_number(text);
    if is_json_number(text) {
        assert_eq!(json, parsed, "{text:?} as a JSON number");
    } else {
        assert!(
            matches!(json, Err(MoneyError::Malformed(_))),
            "{text:?} is no JSON number: {json:?}"
        );
    }
    Some(expected)
}

/// The same value written otherwise: an integer mantissa with the exponent, and that with a
/// trailing zero and the exponent one lower (when the exponents fit in an `i64`).
fn rewrites(digits: &str, power: i128) -> Vec<String> {
    let digits = if digits.is_empty() { "0" } else { digits };
    let mut out = Vec::new();
    if i64::try_from(power).is_ok() {
        out.push(format!("{digits}e{power}"));
    }
    if i64::try_from(power - 1).is_ok() {
        out.push(format!("{digits}0E{}", power - 1));
    }
    out
}
