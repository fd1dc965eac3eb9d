//! Idempotency records: what a service in front of the limiter (the sidecar) needs to answer a
//! retry after a restart exactly as the first attempt was answered.
//!
//! Two kinds, one namespace each:
//!
//! * a **keyed spend** (`Spend::idempotency_key`): the key and the fingerprint of its request;
//! * a **remembered reservation end** (`Reservation::remember_end`): the reservation id and
//!   how it ended (committed, with its cost, or released).
//!
//! Each record is written by the journal **in the sled batch of the spend it guards** (the
//! charge's totals, or the commit's spend and the removal of the reservation's record), so a
//! crash leaves both on disk or neither: a retry after the restart either finds the record
//! (the spend is counted: answer "duplicate") or finds neither (nothing is counted: run it).
//! That is why the records live in the `own` tree under a `0xff` prefix, like open
//! reservations, and not in a tree of their own: sled's batches are atomic per tree only.
//!
//! Layout: key `0xff "idem:"`, the journal's stamp (Unix seconds, big-endian with the sign bit
//! flipped, so keys sort oldest first), a class byte (`s` spend, `r` reservation end), the
//! key's UTF-8 bytes; value [`VERSION`], a kind byte, a `u64` (big-endian): the fingerprint,
//! the committed cost in nanos, or 0 for a release.
//!
//! Bounded two ways by the journal: a record is removed once older than [`IDEMPOTENCY_TTL`] by
//! the journal's sane clock (see `journal`: never within that much uptime), and beyond
//! [`IDEMPOTENCY_CAPACITY`] records a batch also removes the oldest. A read returns only the
//! records younger than [`IDEMPOTENCY_TTL`], one per key (the newest).

use std::time::Duration;

use jiff::Timestamp;

use crate::model::money::Money;

/// How long a record is kept, and the age beyond which a read no longer returns it.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Most records kept on disk; beyond it the oldest are removed first. Its disk cost is about
/// 30 bytes plus the key per record (a few MB when full of short keys).
pub const IDEMPOTENCY_CAPACITY: usize = 262_144;

/// What a remembered key stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Remembered {
    /// A spend counted with `Spend::idempotency_key`.
    Spend {
        /// The fingerprint of the request the key was first used with.
        fingerprint: u64,
    },
    /// A reservation committed with this cost.
    Committed {
        /// The cost counted.
        cost: Money,
    },
    /// A reservation released (nothing counted).
    Released,
}

/// One record read back from the data dir ([`crate::Limiter::idempotency_records`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyRecord {
    /// The spend's idempotency key, or the reservation's id.
    pub key: String,
    /// What it stands for.
    pub what: Remembered,
    /// When the journal wrote it (whole seconds, by its sane clock).
    pub at: Timestamp,
}

/// How a remembered reservation ended (what `Event::Finish` carries: one byte, the cost is
/// the event's amount).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    Committed,
    Released,
}

/// Key prefix of the records in the `own` tree (`0xff` never starts a UTF-8 provider name:
/// no window key can take it, and `store::load` skips it).
pub(crate) const PREFIX: &[u8] = b"\xffidem:";

/// Format of record values: numbered apart from the other formats, so that one kind of bytes
/// never decodes as another.
pub(crate) const VERSION: u8 = 0x71;

/// Bytes of a value: version, kind, `u64`.
const VALUE_LEN: usize = 10;

/// A record ready for the store: its sled key and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub key: Vec<u8>,
    pub value: [u8; VALUE_LEN],
}

/// The class byte of the key (spend keys and reservation ids are separate namespaces) and the
/// kind byte and number of the value.
fn parts(what: Remembered) -> (u8, u8, u64) {
    match what {
        Remembered::Spend { fingerprint } => (b's', 0, fingerprint),
        Remembered::Committed { cost } => (b'r', 1, cost.as_nanos()),
        Remembered::Released => (b'r', 2, 0),
    }
}

/// The record of `key` standing for `what`, stamped `stamp` (Unix seconds).
pub(crate) fn entry(stamp: i64, key: &str, what: Remembered) -> Entry {
    let (class, kind, number) = parts(what);
    let mut k = Vec::with_capacity(PREFIX.len() + 9 + key.len());
    k.extend_from_slice(PREFIX);
    k.extend_from_slice(&((stamp as u64) ^ (1 << 63)).to_be_bytes());
    k.push(class);
    k.extend_from_slice(key.as_bytes());
    let mut value = [0u8; VALUE_LEN];
    value[0] = VERSION;
    value[1] = kind;
    value[2..].copy_from_slice(&number.to_be_bytes());
    Entry { key: k, value }
}

/// The stamp of a stored record's key (`None`: not one of ours).
pub(crate) fn stamp_of(key: &[u8]) -> Option<i64> {
    let rest = key.strip_prefix(PREFIX)?;
    let bytes: [u8; 8] = rest.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(bytes) ^ (1 << 63)) as i64)
}

/// Decodes a stored record; the error says what is wrong (the caller names the key).
pub(crate) fn decode(key: &[u8], value: &[u8]) -> Result<IdempotencyRecord, String> {
    let stamp = stamp_of(key).ok_or("key too short")?;
    let rest = &key[PREFIX.len() + 8..];
    let (&class, text) = rest.split_first().ok_or("no class byte")?;
    let text = std::str::from_utf8(text).map_err(|_| "key is not UTF-8")?;
    let what = decode_value(value)?;
    if parts(what).0 != class {
        return Err(format!(
            "class {:?} does not match the value",
            class as char
        ));
    }
    let at = Timestamp::from_second(stamp).map_err(|e| format!("stamp {stamp}: {e}"))?;
    Ok(IdempotencyRecord {
        key: text.to_owned(),
        what,
        at,
    })
}

/// Decodes a record's value.
pub(crate) fn decode_value(value: &[u8]) -> Result<Remembered, String> {
    let value: [u8; VALUE_LEN] = value
        .try_into()
        .map_err(|_| format!("{} bytes, expected {VALUE_LEN}", value.len()))?;
    if value[0] != VERSION {
        return Err(format!("unknown format version {}", value[0]));
    }
    let mut number = [0u8; 8];
    number.copy_from_slice(&value[2..]);
    let number = u64::from_be_bytes(number);
    match (value[1], number) {
        (0, fingerprint) => Ok(Remembered::Spend { fingerprint }),
        (1, nanos) => Ok(Remembered::Committed {
            cost: Money::from_nanos(nanos),
        }),
        (2, 0) => Ok(Remembered::Released),
        (kind, n) => Err(format!("unknown kind {kind} (number {n})")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_sort_by_stamp_and_refuse_garbage() {
        let whats = [
            Remembered::Spend {
                fingerprint: u64::MAX,
            },
            Remembered::Committed {
                cost: Money::from_nanos(250_000_000),
            },
            Remembered::Released,
        ];
        for (i, what) in whats.into_iter().enumerate() {
            let e = entry(1_714_564_800, &format!("key-{i}"), what);
            let r = decode(&e.key, &e.value).unwrap();
            assert_eq!(r.key, format!("key-{i}"));
            assert_eq!(r.what, what);
            assert_eq!(r.at.as_second(), 1_714_564_800);
        }
        let (old, new) = (entry(-5, "z", whats[2]), entry(7, "a", whats[2]));
        assert!(old.key < new.key, "oldest first");
        assert_eq!(stamp_of(&old.key), Some(-5));
        let good = entry(0, "k", whats[0]);
        assert!(decode(&good.key, &good.value[..9]).is_err());
        let mut bad = good.value;
        bad[0] = 0x41;
        assert!(decode(&good.key, &bad).is_err());
        bad = good.value;
        bad[1] = 9;
        assert!(decode(&good.key, &bad).is_err());
        let released_with_a_number = entry(0, "k", whats[1]);
        let mut v = released_with_a_number.value;
        v[1] = 2;
        assert!(decode(&released_with_a_number.key, &v).is_err());
        // A spend's value under a reservation's class.
        assert!(decode(&entry(0, "k", whats[2]).key, &good.value).is_err());
        assert!(decode(&PREFIX[..3], &good.value).is_err());
    }
}
