//! The audit trail of corrections (`Limiter::adjust`): who credited what, when and why, in the
//! sled tree `audit`, one entry per credit, oldest first (the key is the wall time it was
//! recorded, big-endian, then a random suffix so that two entries of one nanosecond both stay).
//!
//! An entry is written (and flushed with the credit's own batch, the journal's next fsync)
//! **before** the credit is queued: a credit on disk always has its entry. A crash after the
//! entry but before the credit's fsync can leave an entry whose credit was never acknowledged;
//! the caller got no answer then and retries, so such an entry is followed by its retry's.
//! Entries older than the storage retention are removed when a new one is written, and at most
//! [`MAX_ENTRIES`] are kept: past that a new credit is refused (never an old entry dropped
//! early), so the tree is bounded whatever a caller sends.

use serde::{Deserialize, Serialize};

use crate::durable::codec::{decode, encode};
use crate::durable::error::StoreError;
use crate::durable::store::Store;

/// Most audit entries kept within one retention.
pub const MAX_ENTRIES: usize = 100_000;

/// One correction as audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct AuditEntry {
    /// When it was recorded (the limiter's clock), Unix nanoseconds.
    pub recorded_at_nanos: i64,
    /// Who asked (the CLI's user, the sidecar's caller as the request names it).
    pub by: String,
    /// The node that recorded it.
    pub node: String,
    /// The budget's key name (`openai`, `tag:team-a`).
    pub budget: String,
    /// The period part of its series (`1d`, `1d@Europe/Berlin`).
    pub period: String,
    /// Start of the window credited, Unix seconds.
    pub window_start: i64,
    /// The credit, nano-dollars.
    pub amount: u64,
    /// Why.
    pub reason: String,
}

impl Store {
    /// Removes the entries recorded before `cutoff_nanos`, then appends `entry` unless `max`
    /// (in use: [`MAX_ENTRIES`]) are kept (`Ok(false)`); not flushed here (the credit's
    /// journal batch flushes it).
    pub(crate) fn append_audit(
        &self,
        entry: &AuditEntry,
        cutoff_nanos: i64,
        max: usize,
    ) -> Result<bool, StoreError> {
        let tree = self.audit_tree()?;
        let io = |e: sled::Error| self.io_error(e);
        let old: Vec<sled::IVec> = tree
            .range(..sortable(cutoff_nanos).to_vec())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io)?;
        for k in old {
            tree.remove(k).map_err(io)?;
        }
        // `len` walks the tree: fine for a rare operator action on at most `max` entries.
        if tree.len() >= max {
            return Ok(false);
        }
        let mut key = sortable(entry.recorded_at_nanos).to_vec();
        key.extend_from_slice(&crate::durable::store::random_id().as_bytes()[..8]);
        tree.insert(key, encode(entry)).map_err(io)?;
        Ok(true)
    }

    /// Every audit entry, oldest first. An entry that does not decode is an error naming it.
    pub(crate) fn load_audit(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let tree = self.audit_tree()?;
        let mut out = Vec::new();
        for item in tree.iter() {
            let (k, v) = item.map_err(|e| self.io_error(e))?;
            let entry = decode(&v).map_err(|reason| StoreError::Corrupt {
                tree: "audit",
                key: format!("{k:02x?}"),
                reason,
            })?;
            out.push(entry);
        }
        Ok(out)
    }
}

/// An i64 as bytes that sort like the number (sign bit flipped, big-endian).
fn sortable(n: i64) -> [u8; 8] {
    ((n as u64) ^ (1 << 63)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(at: i64, reason: &str) -> AuditEntry {
        AuditEntry {
            recorded_at_nanos: at,
            by: "ops".into(),
            node: "n1".into(),
            budget: "openai".into(),
            period: "1d".into(),
            window_start: 0,
            amount: 5,
            reason: reason.into(),
        }
    }

    #[test]
    fn entries_read_back_in_order_and_old_ones_go() {
        const MAX: usize = MAX_ENTRIES;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store
            .append_audit(&entry(-5, "before the epoch"), i64::MIN, MAX)
            .unwrap());
        assert!(store.append_audit(&entry(30, "b"), i64::MIN, MAX).unwrap());
        assert!(store.append_audit(&entry(10, "a"), i64::MIN, MAX).unwrap());
        assert!(store
            .append_audit(&entry(10, "a twin"), i64::MIN, MAX)
            .unwrap());
        let reasons: Vec<String> = store
            .load_audit()
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons.len(), 4);
        assert_eq!(reasons[0], "before the epoch");
        assert_eq!(reasons[3], "b");
        // A new entry removes those recorded before the cutoff.
        assert!(store.append_audit(&entry(40, "c"), 20, MAX).unwrap());
        let left: Vec<String> = store
            .load_audit()
            .unwrap()
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(left, vec!["b".to_owned(), "c".to_owned()]);
    }

    #[test]
    fn a_full_trail_refuses_until_old_entries_age_out() {
        const MAX: usize = 1000;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tree = store.audit_tree().unwrap();
        let mut batch = sled::Batch::default();
        let value = encode(&entry(0, "old"));
        for i in 0..MAX as i64 {
            batch.insert(&sortable(i)[..], value.clone());
        }
        tree.apply_batch(batch).unwrap();
        assert!(!store
            .append_audit(&entry(MAX as i64, "new"), 0, MAX)
            .unwrap());
        assert_eq!(store.load_audit().unwrap().len(), MAX);
        // Half of them age out: the next one is taken.
        let half = MAX as i64 / 2;
        assert!(store
            .append_audit(&entry(MAX as i64, "new"), half, MAX)
            .unwrap());
        assert_eq!(store.load_audit().unwrap().len(), MAX / 2 + 1);
    }
}
