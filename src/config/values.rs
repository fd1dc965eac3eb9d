//! The value types every key of the file is read through: amounts, texts (with
//! `os.environ/` expansion), flags, parsed words, durations, maps without duplicate keys,
//! and the near-miss check of key names.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::model::money::{Money, MoneyError};

use super::env::expand_env;
use super::error::ConfigError;

/// The key of ours that `key` is probably a misspelling of: equal once case and `-`/`_`/space
/// are ignored, or at most two edits away.
pub(super) fn near_miss<'k>(key: &str, ours: &[&'k str]) -> Option<&'k str> {
    let norm = |s: &str| -> Vec<char> {
        s.chars()
            .map(|c| match c {
                '-' | ' ' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    };
    let k = norm(key);
    ours.iter()
        .copied()
        .find(|o| key != *o && edit_distance(&k, &norm(o)) <= 2)
}

/// Levenshtein distance (keys are short).
pub(super) fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

/// A map whose keys must be unique: YAML parsers keep the last of two equal keys, which would
/// silently drop a budget or a prefix. Sorted by key.
#[derive(Debug)]
pub(super) struct UniqueMap<V>(pub(super) BTreeMap<String, V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<UniqueMap<V>, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueMap<V>, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "key {key:?} is given more than once"
                        )));
                    }
                    let value = map.next_value::<V>()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A limit may be written as a number or a string (`"0.1"`); strings parse exactly.
#[derive(Debug)]
pub(super) enum RawAmount {
    Int(u64),
    Float(f64),
    Text(Text),
}

/// What a wrongly shaped value is, in YAML/TOML words, for "got ..." messages.
pub(super) fn shape(u: serde::de::Unexpected<'_>) -> String {
    use serde::de::Unexpected;
    match u {
        Unexpected::Unit | Unexpected::Option => "null".into(),
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a map".into(),
        other => other.to_string(),
    }
}

impl<'de> Deserialize<'de> for RawAmount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<RawAmount, D::Error> {
        use serde::de::{Error, Unexpected};
        struct Visit;
        impl Visit {
            fn refuse<E: Error>(u: Unexpected<'_>) -> E {
                E::custom(format!(
                    "must be a number or a decimal string, got {}",
                    shape(u)
                ))
            }
        }
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawAmount;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a decimal string")
            }
            fn visit_u64<E: Error>(self, v: u64) -> Result<RawAmount, E> {
                Ok(RawAmount::Int(v))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<RawAmount, E> {
                // Negative: kept as written, so that the limit's error quotes it.
                Ok(match u64::try_from(v) {
                    Ok(n) => RawAmount::Int(n),
                    Err(_) => RawAmount::Text(Text::plain(v.to_string())),
                })
            }
            // Beyond 64 bits: kept as written; the limit's error says "too large"/"negative".
            fn visit_u128<E: Error>(self, v: u128) -> Result<RawAmount, E> {
                Ok(RawAmount::Text(Text::plain(v.to_string())))
            }
            fn visit_i128<E: Error>(self, v: i128) -> Result<RawAmount, E> {
                Ok(RawAmount::Text(Text::plain(v.to_string())))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<RawAmount, E> {
                Ok(RawAmount::Float(v))
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<RawAmount, E> {
                Text::from_written(v).map(RawAmount::Text)
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<RawAmount, E> {
                Err(Visit::refuse(Unexpected::Bool(v)))
            }
            fn visit_unit<E: Error>(self) -> Result<RawAmount, E> {
                Err(Visit::refuse(Unexpected::Unit))
            }
            fn visit_none<E: Error>(self) -> Result<RawAmount, E> {
                Err(Visit::refuse(Unexpected::Unit))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<RawAmount, A::Error> {
                Err(Visit::refuse(Unexpected::Seq))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<RawAmount, A::Error> {
                Err(Visit::refuse(Unexpected::Map))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// A string value after `os.environ/NAME` expansion. `written` is what the file says, and what
/// errors quote (so a secret from the environment is never printed).
#[derive(Debug)]
pub(super) struct Text {
    pub(super) value: String,
    pub(super) written: String,
}

impl Text {
    pub(super) fn plain(value: String) -> Text {
        Text {
            written: value.clone(),
            value,
        }
    }

    pub(super) fn from_written<E: serde::de::Error>(written: &str) -> Result<Text, E> {
        match expand_env(written).map_err(E::custom)? {
            Some(value) => Ok(Text {
                value,
                written: written.to_owned(),
            }),
            None => Ok(Text::plain(written.to_owned())),
        }
    }

    /// How an error quotes the value: as written, or `from os.environ/NAME` when expanded.
    pub(super) fn quoted(&self) -> String {
        if self.value == self.written {
            format!("{:?}", self.value)
        } else {
            format!("from {}", self.written)
        }
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        use serde::de::{Error, Unexpected};
        struct Visit;
        fn refuse<E: Error>(u: Unexpected<'_>) -> E {
            E::custom(format!("must be a string, got {}", shape(u)))
        }
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: Error>(self, v: &str) -> Result<Text, E> {
                Text::from_written(v)
            }
            // TOML numbers, as YAML's plain scalars arrive as text anyway.
            fn visit_u64<E: Error>(self, v: u64) -> Result<Text, E> {
                Ok(Text::plain(v.to_string()))
            }
            fn visit_i64<E: Error>(self, v: i64) -> Result<Text, E> {
                Ok(Text::plain(v.to_string()))
            }
            fn visit_f64<E: Error>(self, v: f64) -> Result<Text, E> {
                Ok(Text::plain(v.to_string()))
            }
            fn visit_bool<E: Error>(self, v: bool) -> Result<Text, E> {
                Err(refuse(Unexpected::Bool(v)))
            }
            fn visit_unit<E: Error>(self) -> Result<Text, E> {
                Err(refuse(Unexpected::Unit))
            }
            fn visit_none<E: Error>(self) -> Result<Text, E> {
                Err(refuse(Unexpected::Unit))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<Text, A::Error> {
                Err(refuse(Unexpected::Seq))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<Text, A::Error> {
                Err(refuse(Unexpected::Map))
            }
        }
        d.deserialize_str(Visit)
    }
}

/// A written amount as money, or the value as written and why it is refused.
pub(super) fn parse_limit(amount: RawAmount) -> Result<Money, (String, MoneyError)> {
    let (value, parsed) = match amount {
        RawAmount::Int(n) => (n.to_string(), n.to_string().parse::<Money>()),
        // Display of f64 is the shortest exact round trip (`0.1`), parsed as a decimal.
        RawAmount::Float(f) => (f.to_string(), f.to_string().parse::<Money>()),
        RawAmount::Text(t) => {
            let p = t.value.trim().parse::<Money>();
            (t.written, p)
        }
    };
    match parsed {
        // A positive limit below one nano rounds up rather than becoming "no budget".
        Ok(m) if m == Money::ZERO && value.trim().parse::<f64>().is_ok_and(|f| f > 0.0) => {
            Ok(Money::from_nanos(1))
        }
        Ok(m) => Ok(m),
        Err(source) => Err((value, source)),
    }
}

/// A budget given outside `provider_budget_config`, refused: names where it was given.
pub(super) fn refuse_at(path: String, key: &str, message: impl std::fmt::Display) -> ConfigError {
    ConfigError::Budget {
        budget: path,
        message: format!("{key}: {message}"),
    }
}

/// A boolean: `true`/`false` as a boolean (TOML) or as text (YAML, `os.environ/NAME`).
#[derive(Debug)]
pub(super) struct Flag(pub(super) bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Flag, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Flag;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true or false")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Flag, E> {
                let text = Text::from_written::<E>(v)?;
                text.value.trim().parse().map(Flag).map_err(|_| {
                    E::custom(format!(
                        "invalid value {}: expected true or false",
                        text.quoted()
                    ))
                })
            }
        }
        d.deserialize_any(Visit)
    }
}

/// A string value parsed with `FromStr`; the error quotes the value as written.
#[derive(Debug)]
pub(super) struct Parsed<T>(pub(super) T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Parsed<T>, D::Error> {
        let text = Text::deserialize(d)?;
        text.value
            .trim()
            .parse::<T>()
            .map(Parsed)
            .map_err(|e| serde::de::Error::custom(format!("invalid value {}: {e}", text.quoted())))
    }
}

/// A humantime duration string (`2ms`, `1h 30m`).
#[derive(Debug)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<HumanDuration, D::Error> {
        let text = Text::deserialize(d)?;
        humantime::parse_duration(text.value.trim())
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!("invalid duration {}: {e}", text.quoted()))
            })
    }
}

/// Parses a humantime duration (`250ms`, `1s`, `1h 30m`) with an error that quotes the input.
///
/// # Errors
///
/// A one-line message quoting the input when it is not a humantime duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// An amount of a budget counting `unit` (its limit, its `max_estimate`), as written: USD
/// parsed as money (see [`parse_limit`]); any other unit a whole count up to `u64::MAX`
/// (tokens, requests, slots), kept as `Money::from_nanos(count)` (every amount is a `u64`
/// in its budget's unit). The error is the value as written and why.
pub(super) fn parse_amount(
    amount: RawAmount,
    unit: crate::model::unit::Unit,
) -> Result<crate::model::money::Money, String> {
    use crate::model::money::Money;
    if !unit.is_count() {
        return parse_limit(amount).map_err(|(value, source)| format!("{value:?}: {source}"));
    }
    let whole = |written: String| {
        format!(
            "{written:?}: a {unit} limit is a whole number of {unit}, at most {}",
            u64::MAX
        )
    };
    match amount {
        RawAmount::Int(n) => Ok(Money::from_nanos(n)),
        // A float is whole only below 2^53 here, where it is exact.
        RawAmount::Float(f) if f >= 0.0 && f.fract() == 0.0 && f < 9_007_199_254_740_992.0 => {
            Ok(Money::from_nanos(f as u64))
        }
        RawAmount::Float(f) => Err(whole(f.to_string())),
        RawAmount::Text(t) => t
            .value
            .trim()
            .parse::<u64>()
            .map(Money::from_nanos)
            .map_err(|_| whole(t.written)),
    }
}

/// The period of a budget counting `unit`: required, except for `concurrent`, which has
/// none (and refuses one: it would read as a rate).
pub(super) fn unit_period(
    period: Option<&str>,
    unit: crate::model::unit::Unit,
) -> Result<crate::model::window::Period, String> {
    use crate::model::unit::Unit;
    match (period, unit) {
        (None, Unit::Concurrent) => Ok(crate::model::window::Period::LONGEST),
        (Some(p), Unit::Concurrent) => Err(format!(
            "{p:?}: a concurrent budget has no period (its slots are held until commit, release or expiry)"
        )),
        (None, _) => Err("missing (e.g. 1d, 1mo)".into()),
        (Some(p), _) => p.trim().parse().map_err(|e: crate::model::window::PeriodError| e.to_string()),
    }
}
