//! The value codec of the data dir: every value starts with a version byte that names its
//! format, so one tree's bytes never decode as another's and a format can change without a
//! migration. Bincode values are `[VERSION, bincode(..)]`; `acked` and `grants` values are a
//! fixed 17-byte layout; `peers` values have their own version (v2).
//!
//! Decoding is bounded (a length limit, trailing bytes rejected) and returns an error, never
//! panics. `bincode` is used only here, so swapping it (e.g. for `postcard`) touches this
//! file alone.

use serde::{Deserialize, Serialize};

/// Format of every value written by this version.
pub(crate) const VERSION: u8 = 1;
/// No value we write comes near this; anything bigger is garbage.
pub(crate) const MAX_VALUE_BYTES: usize = 64 * 1024;

/// This node's own absolute total of one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OwnValue {
    /// Window end, Unix seconds: lets expiry work without the config that wrote it.
    pub end: i64,
    /// Nano-dollars.
    pub total: u64,
}

/// The other nodes' last known spend in one window: a cache of what the view needs, the sum of
/// the others' totals, so its size does not grow with the fleet (format version 2).
///
/// Version 1 stored every other node's total (`Vec<(node, total)>`); a window hash with a few
/// thousand node ids made that larger than the decoding bound and every open failed. A v1
/// value still decodes (its nodes summed, under a larger bound); a damaged entry is skipped
/// with a warning by [`Store::load_peers`]: the next sync round refreshes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PeersValue {
    /// Window end, Unix seconds.
    pub end: i64,
    /// Sum of the other nodes' totals, nano-dollars (saturating).
    pub others: u64,
}

/// What Redis acknowledged of this node's own total in one window (the `acked` tree).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckedValue {
    /// Window end, Unix seconds.
    pub end: i64,
    /// The own total Redis holds for this node, nano-dollars.
    pub total: u64,
}

/// Format of `acked` values: this byte, then end and total as big-endian 8 bytes each.
pub(crate) const ACKED_VERSION: u8 = 0x31;

/// The 17-byte layout shared by `acked` and `grants` values: a version byte, then a window end
/// (i64) and an amount (u64), big-endian 8 bytes each.
pub(crate) fn encode_end_amount(version: u8, end: i64, amount: u64) -> [u8; 17] {
    let mut out = [0u8; 17];
    out[0] = version;
    out[1..9].copy_from_slice(&end.to_be_bytes());
    out[9..].copy_from_slice(&amount.to_be_bytes());
    out
}

/// Inverse of [`encode_end_amount`]: `None` unless `raw` is 17 bytes starting with `version`.
pub(crate) fn decode_end_amount(version: u8, raw: &[u8]) -> Option<(i64, u64)> {
    if raw.len() != 17 || raw[0] != version {
        return None;
    }
    Some((
        i64::from_be_bytes(raw[1..9].try_into().ok()?),
        u64::from_be_bytes(raw[9..].try_into().ok()?),
    ))
}

impl AckedValue {
    pub(crate) fn encode(&self) -> [u8; 17] {
        encode_end_amount(ACKED_VERSION, self.end, self.total)
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<AckedValue> {
        let (end, total) = decode_end_amount(ACKED_VERSION, raw)?;
        Some(AckedValue { end, total })
    }
}

/// This node's grant of a strict budget in one window (the `grants` tree): durable before
/// the view lets it be spent, so a crash can never forget a grant this node may have spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrantValue {
    /// Window end, Unix seconds.
    pub end: i64,
    /// The grant, nano-dollars.
    pub grant: u64,
}

/// Format of `grants` values: this byte, then end and grant as big-endian 8 bytes each
/// (numbered apart from the other trees' formats).
pub(crate) const GRANT_VERSION: u8 = 0x51;

impl GrantValue {
    pub(crate) fn encode(&self) -> [u8; 17] {
        encode_end_amount(GRANT_VERSION, self.end, self.grant)
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<GrantValue> {
        let (end, grant) = decode_end_amount(GRANT_VERSION, raw)?;
        Some(GrantValue { end, grant })
    }
}

/// One `holders` entry: the node ids this node saw holding a grant field in a strict window
/// (what the fleet must see re-registered after Redis lost its data).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct HoldersValue {
    /// Window end, Unix seconds.
    pub end: i64,
    /// Node ids, sorted, without duplicates.
    pub ids: Vec<String>,
}

/// Format of `holders` values: this byte, the window end as big-endian 8 bytes, then the node
/// ids, UTF-8, each followed by `\n` (node ids are ASCII letters, digits, `.`, `_`, `-`).
pub(crate) const HOLDERS_VERSION: u8 = 0x61;
/// Bound on a `holders` value (a fleet of thousands of nodes fits).
pub(crate) const MAX_HOLDERS_BYTES: usize = 1024 * 1024;

impl HoldersValue {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![HOLDERS_VERSION];
        out.extend_from_slice(&self.end.to_be_bytes());
        for id in &self.ids {
            out.extend_from_slice(id.as_bytes());
            out.push(b'\n');
        }
        out
    }

    pub(crate) fn decode(raw: &[u8]) -> Option<HoldersValue> {
        if raw.len() < 9 || raw.len() > MAX_HOLDERS_BYTES || raw[0] != HOLDERS_VERSION {
            return None;
        }
        let end = i64::from_be_bytes(raw[1..9].try_into().ok()?);
        let body = std::str::from_utf8(&raw[9..]).ok()?;
        if !(body.is_empty() || body.ends_with('\n')) {
            return None;
        }
        let ids = body.lines().map(str::to_owned).collect::<Vec<_>>();
        if ids.iter().any(|i| i.is_empty() || i.contains(',')) {
            return None;
        }
        Some(HoldersValue { end, ids })
    }
}

/// Format of `peers` values written by this version (their v2). Numbered apart from the
/// `own` formats (1, 2, ...) so that a bump of one never makes the other's bytes decode.
pub(crate) const PEERS_VERSION: u8 = 0x22;
/// Bound for legacy v1 `peers` values (a list of every other node): large enough for any
/// fleet that wrote one, small enough to bound memory.
pub(crate) const MAX_LEGACY_PEERS_BYTES: usize = 8 * 1024 * 1024;

impl PeersValue {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = vec![PEERS_VERSION];
        // Two integers into a Vec: cannot fail.
        if let Ok(body) = bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            out.extend_from_slice(&body);
        }
        out
    }

    pub(crate) fn decode(raw: &[u8]) -> Result<PeersValue, String> {
        #[derive(Deserialize)]
        struct V1 {
            end: i64,
            nodes: Vec<(String, u64)>,
        }
        match raw.first() {
            Some(&PEERS_VERSION) => {
                let mut v = vec![VERSION];
                v.extend_from_slice(&raw[1..]);
                decode::<PeersValue>(&v)
            }
            Some(&1) => {
                if raw.len() > MAX_LEGACY_PEERS_BYTES {
                    return Err(format!("legacy value of {} bytes is too large", raw.len()));
                }
                let config = bincode::config::standard().with_limit::<MAX_LEGACY_PEERS_BYTES>();
                let (v, used): (V1, usize) =
                    bincode::serde::decode_from_slice(&raw[1..], config)
                        .map_err(|e| format!("undecodable legacy value: {e}"))?;
                if used != raw.len() - 1 {
                    return Err(format!("{} trailing bytes", raw.len() - 1 - used));
                }
                let others = v.nodes.iter().fold(0u64, |s, (_, t)| s.saturating_add(*t));
                Ok(PeersValue { end: v.end, others })
            }
            Some(v) => Err(format!("unknown format version {v}")),
            None => Err("empty value".into()),
        }
    }
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Encoding plain structs of integers and strings into a Vec cannot fail.
    if let Ok(body) = bincode::serde::encode_to_vec(v, bincode::config::standard()) {
        out.extend_from_slice(&body);
    }
    out
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    let (&version, body) = raw.split_first().ok_or("empty value")?;
    if version != VERSION {
        return Err(format!("unknown format version {version}"));
    }
    if raw.len() > MAX_VALUE_BYTES {
        return Err(format!("value of {} bytes is too large", raw.len()));
    }
    let config = bincode::config::standard().with_limit::<MAX_VALUE_BYTES>();
    let (v, used) = bincode::serde::decode_from_slice(body, config)
        .map_err(|e| format!("undecodable value: {e}"))?;
    if used != body.len() {
        return Err(format!("{} trailing bytes", body.len() - used));
    }
    Ok(v)
}

/// An open reservation as journaled (in the `own` tree under `store::RESERVATION_PREFIX`, so that
/// its end goes in the same sled batch as the spend it turns into). What a restart counts
/// when the reservation was neither committed nor released: `counts[i]` in window `i`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReservationValue {
    /// Nano-dollars held in each USD window.
    pub estimate: u64,
    /// When it expires, Unix seconds (informational: a restart counts it whatever the time).
    pub expires: i64,
    /// Each budget window it holds money in: storage key parts (provider, period), the
    /// window's start and end (Unix seconds).
    pub windows: Vec<(String, String, i64, i64)>,
    /// What a restart counts in each of `windows`, in its budget's unit (the amount held;
    /// nothing for a concurrent slot). Format 0x41 has none: `estimate` in each.
    pub counts: Vec<u64>,
}

/// Format 0x41: a reservation of USD budgets only (what every release before units wrote).
#[derive(Serialize, Deserialize)]
struct ReservationV1 {
    estimate: u64,
    expires: i64,
    windows: Vec<(String, String, i64, i64)>,
}

/// Format of reservation values: this byte, then bincode. Numbered apart from the other
/// formats so that one tree's bytes never decode as another's. A reservation that counts
/// `estimate` in every window is written in it (readable by the releases before units).
pub(crate) const RESERVATION_VERSION: u8 = 0x41;
/// Format of reservation values with their own count per window (units).
pub(crate) const RESERVATION_VERSION_COUNTS: u8 = 0x42;

impl ReservationValue {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let config = bincode::config::standard();
        // Integers and short strings into a Vec: cannot fail.
        let (version, body) = if self.counts.iter().all(|&c| c == self.estimate) {
            let v1 = ReservationV1 {
                estimate: self.estimate,
                expires: self.expires,
                windows: self.windows.clone(),
            };
            (
                RESERVATION_VERSION,
                bincode::serde::encode_to_vec(&v1, config),
            )
        } else {
            (
                RESERVATION_VERSION_COUNTS,
                bincode::serde::encode_to_vec(self, config),
            )
        };
        let mut out = vec![version];
        if let Ok(body) = body {
            out.extend_from_slice(&body);
        }
        out
    }

    pub(crate) fn decode(raw: &[u8]) -> Result<ReservationValue, String> {
        let body = || {
            let mut v = vec![VERSION];
            v.extend_from_slice(&raw[1..]);
            v
        };
        match raw.first() {
            Some(&RESERVATION_VERSION) => {
                let v1 = decode::<ReservationV1>(&body())?;
                Ok(ReservationValue {
                    counts: vec![v1.estimate; v1.windows.len()],
                    estimate: v1.estimate,
                    expires: v1.expires,
                    windows: v1.windows,
                })
            }
            Some(&RESERVATION_VERSION_COUNTS) => {
                let v = decode::<ReservationValue>(&body())?;
                if v.counts.len() != v.windows.len() {
                    return Err(format!(
                        "{} counts for {} windows",
                        v.counts.len(),
                        v.windows.len()
                    ));
                }
                Ok(v)
            }
            Some(v) => Err(format!("unknown format version {v}")),
            None => Err("empty value".into()),
        }
    }
}

#[cfg(test)]
mod reservation_tests {
    use super::*;

    #[test]
    fn reservations_keep_their_counts_and_usd_ones_keep_the_old_format() {
        let usd = ReservationValue {
            estimate: 7,
            expires: 600,
            windows: vec![("openai".into(), "1d".into(), 0, 86_400)],
            counts: vec![7],
        };
        let raw = usd.encode();
        assert_eq!(raw[0], RESERVATION_VERSION, "readable by older releases");
        assert_eq!(ReservationValue::decode(&raw), Ok(usd.clone()));
        let mixed = ReservationValue {
            windows: vec![
                ("openai".into(), "1d".into(), 0, 86_400),
                ("deployment:x".into(), "1200mo~concurrent".into(), 0, 1),
            ],
            counts: vec![7, 0],
            ..usd
        };
        let raw = mixed.encode();
        assert_eq!(raw[0], RESERVATION_VERSION_COUNTS);
        assert_eq!(ReservationValue::decode(&raw), Ok(mixed.clone()));
        let mut short = mixed;
        short.counts.pop();
        short.counts.push(1);
        short.counts.push(2);
        let e = ReservationValue::decode(&short.encode()).unwrap_err();
        assert!(e.contains("3 counts for 2 windows"), "{e}");
    }
}

#[cfg(test)]
mod holders_tests {
    use super::*;

    #[test]
    fn holders_values_round_trip_and_refuse_what_does_not_decode() {
        let v = HoldersValue {
            end: 1_732_579_200,
            ids: vec!["a".into(), "node-b.1".into()],
        };
        assert_eq!(HoldersValue::decode(&v.encode()), Some(v.clone()));
        let empty = HoldersValue {
            end: -5,
            ids: vec![],
        };
        assert_eq!(HoldersValue::decode(&empty.encode()), Some(empty));
        let mut raw = v.encode();
        raw.pop(); // no final newline: truncated
        assert_eq!(HoldersValue::decode(&raw), None);
        let mut raw = v.encode();
        raw[0] = GRANT_VERSION;
        assert_eq!(HoldersValue::decode(&raw), None);
        assert_eq!(HoldersValue::decode(&[HOLDERS_VERSION, 0, 0]), None);
        let mut raw = v.encode();
        raw.extend_from_slice(b"x,y\n");
        assert_eq!(HoldersValue::decode(&raw), None);
        let mut raw = v.encode();
        raw.extend_from_slice(b"\n");
        assert_eq!(HoldersValue::decode(&raw), None, "an empty id");
    }
}
