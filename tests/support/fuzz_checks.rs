//! What the fuzz targets check (the library of the `fuzz/` crate, built from this file), shared
//! with `tests/fuzz_corpus.rs` (as `provider_budgets_test_support::fuzz_checks`), so that the
//! committed corpus is replayed by plain `cargo test` through exactly the code the fuzzers run.
//! Only `std`, `jiff` and `provider_budgets` are used here: the library's test build has no
//! `arbitrary` or `libfuzzer-sys`.
//!
//! Every function panics when a property is violated; a panic is what libFuzzer reports as a
//! crash and what makes the corpus test fail.

use jiff::Timestamp;
use provider_budgets::{fuzz_decode_value, parse_duration, Config, Money, Period, Schedule};

/// Longest duration / period / money text the `duration` target looks at (bytes).
pub const MAX_TEXT: usize = 256;
/// Longest config text the `config` target looks at (bytes).
pub const MAX_CONFIG: usize = 4096;
/// Longest stored value the `value_decode` target looks at (bytes).
pub const MAX_VALUE: usize = 4096;

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
