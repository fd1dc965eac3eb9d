//! Money in request bodies: a JSON number or a decimal string, parsed exactly from its text.
//!
//! The value is taken as a [`RawValue`], so the number's digits reach the library's exact
//! parsers as written ([`Money::parse_json_number`], [`Money::from_decimal_exponent`]);
//! nothing goes through `f64`. Exponent forms (`1.5e-05`, what Python's `json.dumps` writes
//! for small floats) are read exactly too.

use serde_json::value::RawValue;

use provider_budgets::Money;

/// Parses a JSON number or a JSON string holding a decimal amount of USD.
pub(crate) fn money_from_json(raw: &RawValue) -> Result<Money, String> {
    let text = raw.get().trim();
    let parsed = if text.starts_with('"') {
        let decimal = serde_json::from_str::<String>(text).map_err(|e| format!("{e}"))?;
        Money::from_decimal_exponent(&decimal)
    } else if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        Money::parse_json_number(text)
    } else {
        return Err(format!(
            "expected a JSON number or a decimal string, got {}",
            clip(text)
        ));
    };
    parsed.map_err(|e| e.to_string())
}

/// A reservation's `estimate`: dollars (a number or a decimal string, as before), or an
/// object of the units it holds (`{"usd": 0.02, "tokens": 6000, "input_tokens": …,
/// "output_tokens": …}`; every key optional, others refused). Requests and concurrent slots
/// are held as 1 whatever it says.
pub(crate) fn estimate_from_json(raw: &RawValue) -> Result<provider_budgets::Estimate, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Parts<'a> {
        #[serde(borrow, default)]
        usd: Option<&'a RawValue>,
        tokens: Option<u64>,
        input_tokens: Option<u64>,
        output_tokens: Option<u64>,
    }
    if !raw.get().trim_start().starts_with('{') {
        return money_from_json(raw).map(provider_budgets::Estimate::from);
    }
    let parts: Parts<'_> = serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
    let usd = match parts.usd {
        Some(u) => money_from_json(u).map_err(|e| format!("usd: {e}"))?,
        None => Money::ZERO,
    };
    Ok(provider_budgets::Estimate::new(usd, parts.tokens)
        .split(parts.input_tokens, parts.output_tokens))
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

    fn raw(s: &str) -> Box<RawValue> {
        serde_json::from_str::<Box<RawValue>>(s).unwrap()
    }

    #[test]
    fn json_forms() {
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
        assert_eq!(money_from_json(&raw("1.5e-05")).unwrap().as_nanos(), 15_000);
        // A string is a decimal as the config writes one: `+` and `.5` are fine there.
        assert_eq!(
            money_from_json(&raw("\" +.5 \"")).unwrap().as_nanos(),
            500_000_000
        );
        assert!(money_from_json(&raw("true")).is_err());
        assert!(money_from_json(&raw("null")).is_err());
        assert!(money_from_json(&raw("{}")).is_err());
        assert!(money_from_json(&raw("-1"))
            .unwrap_err()
            .contains("negative"));
        for huge in ["1e9223372036854775807", "\"1e9223372036854775807\""] {
            assert!(
                money_from_json(&raw(huge))
                    .unwrap_err()
                    .contains("too large"),
                "{huge}"
            );
        }
        for negative in ["-1e9223372036854775807", "\"-1e9223372036854775807\""] {
            assert!(
                money_from_json(&raw(negative))
                    .unwrap_err()
                    .contains("negative"),
                "{negative}"
            );
        }
    }
}
