//! The on-disk layout: sled trees and keys (the values' encoding is in `codec`).
//!
//! One sled database per data dir, three trees, each with a single writer thread:
//!
//! | tree    | key                         | value (after a version byte)            | written by |
//! |---------|-----------------------------|-----------------------------------------|------------|
//! | `own`   | provider, period, window    | this node's absolute total, window end  | journal    |
//! | `peers` | provider, period, window    | sum of the others' last known totals, end (v2) | replicator |
//! | `meta`  | `node_id`                   | the node id, UTF-8                      | open       |
//! | `acked` | provider, period, window    | own total Redis acknowledged, window end | replicator |
//! | `own`   | `0xff res:` reservation id  | an open reservation: estimate, expiry, its windows (0x41) | journal |
//! | `grants` | provider, period, window   | this node's grant of a strict budget, window end (0x51) | replicator |
//! | `holders` | provider, period, window  | the node ids seen holding a grant in the window, window end (0x61) | replicator |
//! | `own`   | `0xff idem:` stamp, class, key | an idempotency record: fingerprint, or how a reservation ended (0x71) | journal |
//!
//! Open reservations and idempotency records live in the `own` tree (under `0xff`, which no
//! provider name starts with) so that the journal writes them in the same atomic batch as the
//! spend they belong to (sled's batches are atomic per tree): a reservation's end and its
//! spend, a keyed spend and its key (see `idempotency`).
//!
//! Keys are `provider 0x00 period 0x00 start`, the window start as a big-endian `i64` with its
//! sign bit flipped so keys sort by time. Totals are stored absolute, never as deltas: writing
//! one twice is harmless, which is what lets the journal retry and the replicator re-send.
//!
//! Values are versioned and decoded with bounds by `codec`; a value that does not decode is an
//! error naming the tree and key, never a panic.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::durable::codec::{decode, encode};
pub(crate) use crate::durable::codec::{
    AckedValue, GrantValue, HoldersValue, OwnValue, PeersValue, ReservationValue,
};
pub use crate::durable::error::StoreError;
use crate::durable::highwater::{self, Found, HighWater, Mark};
use crate::durable::idempotency::{self, IdempotencyRecord};
use crate::model::window::Window;

/// How long `Store::open` waits for a lock that a just-dropped database still holds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Identifies one window of one budget in storage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WindowKey {
    pub provider: String,
    pub period: String,
    pub start: i64,
}

impl WindowKey {
    /// The stored key of `budget`'s window starting at `start` (Unix seconds): its
    /// [`BudgetKey::store_parts`](crate::model::key::BudgetKey::store_parts) and the start.
    pub fn of(budget: &crate::model::key::BudgetKey, start: i64) -> WindowKey {
        let (provider, period) = budget.store_parts();
        WindowKey {
            provider,
            period,
            start,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.provider.len() + self.period.len() + 10);
        k.extend_from_slice(self.provider.as_bytes());
        k.push(0);
        k.extend_from_slice(self.period.as_bytes());
        k.push(0);
        k.extend_from_slice(&((self.start as u64) ^ (1 << 63)).to_be_bytes());
        k
    }

    fn decode(tree: &'static str, raw: &[u8]) -> Result<WindowKey, StoreError> {
        let corrupt = |reason: &str| StoreError::Corrupt {
            tree,
            key: String::from_utf8_lossy(raw).escape_debug().to_string(),
            reason: reason.to_string(),
        };
        let mut parts = raw.splitn(3, |&b| b == 0);
        let provider = parts.next().ok_or_else(|| corrupt("empty key"))?;
        let period = parts.next().ok_or_else(|| corrupt("no period in key"))?;
        let start = parts.next().ok_or_else(|| corrupt("no window in key"))?;
        let start: [u8; 8] = start
            .try_into()
            .map_err(|_| corrupt("window start is not 8 bytes"))?;
        Ok(WindowKey {
            provider: String::from_utf8(provider.to_vec())
                .map_err(|_| corrupt("provider is not UTF-8"))?,
            period: String::from_utf8(period.to_vec())
                .map_err(|_| corrupt("period is not UTF-8"))?,
            start: (u64::from_be_bytes(start) ^ (1 << 63)) as i64,
        })
    }
}

impl fmt::Display for WindowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.provider, self.period, self.start)
    }
}

/// The sled key prefix of every window of one series: `name 0x00 period 0x00`.
fn series_prefix(name: &str, period: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + period.len() + 2);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(period.as_bytes());
    k.push(0);
    k
}

/// One sled batch that writes `items` (encoded values by window key) and removes `removed`.
fn window_batch<'a, V: AsRef<[u8]>>(
    items: impl IntoIterator<Item = (&'a WindowKey, V)>,
    removed: impl IntoIterator<Item = &'a WindowKey>,
) -> sled::Batch {
    let mut batch = sled::Batch::default();
    for (k, v) in items {
        batch.insert(k.encode(), v.as_ref().to_vec());
    }
    for k in removed {
        batch.remove(k.encode());
    }
    batch
}

/// Decodes an `own` value; exposed (hidden) for the fuzz targets.
#[doc(hidden)]
pub fn fuzz_decode_value(raw: &[u8]) -> bool {
    decode::<OwnValue>(raw).is_ok()
        | PeersValue::decode(raw).is_ok()
        | WindowKey::decode("own", raw).is_ok()
        | matches!(highwater::decode_file(raw), Found::Mark(_))
        | ReservationValue::decode(raw).is_ok()
        | idempotency::decode_value(raw).is_ok()
}

/// Key prefix of open reservations in the `own` tree (`0xff` never starts a UTF-8 provider
/// name, and `load` skips `0xff` keys: no window key can take it).
pub(crate) const RESERVATION_PREFIX: &[u8] = b"\xffres:";

fn reservation_key(id: &str) -> Vec<u8> {
    let mut k = RESERVATION_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// Key of the journal's batch sequence in the `own` tree. A provider name is UTF-8, which never
/// starts with `0xff`, so no window key can take it.
const SEQ_KEY: &[u8] = b"\xffseq";

/// The sled handles, replaced as a whole when the database is reopened after an I/O fault.
#[derive(Debug)]
struct Handles {
    db: sled::Db,
    own: sled::Tree,
    peers: sled::Tree,
    meta: sled::Tree,
    acked: sled::Tree,
    grants: sled::Tree,
    holders: sled::Tree,
}

/// The data dir's database.
///
/// sled's first I/O error is sticky: once a flush failed (a full disk), every later flush of
/// that handle fails too, even after space returns. So the handles sit behind a lock and
/// [`Store::reopen`] replaces them; the journal then rewrites every total it holds.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    handles: RwLock<Option<Handles>>,
    /// The high-water record; only the journal writes it.
    high_water: HighWater,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            dir: dir.to_path_buf(),
            message: format!("cannot create the data dir: {e}"),
        })?;
        let handles = open_handles(dir)?;
        let high_water = HighWater::open(dir).map_err(|e| StoreError::Io {
            dir: dir.to_path_buf(),
            message: format!("cannot open {}: {e}", highwater::FILE_NAME),
        })?;
        Ok(Store {
            handles: RwLock::new(Some(handles)),
            dir: dir.to_path_buf(),
            high_water,
        })
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Drops the sled handles and opens the database again (after an I/O fault). On failure
    /// the store stays closed: every operation fails until a later reopen succeeds.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut guard = self.handles.write().unwrap_or_else(|p| p.into_inner());
        // Drop first: sled holds a file lock per open database.
        drop(guard.take());
        *guard = Some(open_handles(&self.dir)?);
        Ok(())
    }

    fn with<T>(&self, f: impl FnOnce(&Handles) -> Result<T, sled::Error>) -> Result<T, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref() {
            Some(h) => f(h).map_err(|e| self.io(e)),
            None => Err(StoreError::Io {
                dir: self.dir.clone(),
                message: "the database is closed after an I/O fault (reopening)".into(),
            }),
        }
    }

    fn io(&self, e: sled::Error) -> StoreError {
        io_error(&self.dir, e)
    }

    /// [`Store::io`] for sibling modules.
    pub(crate) fn io_error(&self, e: sled::Error) -> StoreError {
        self.io(e)
    }

    /// The `audit` tree (module `audit`; opened on first use: a data dir without
    /// corrections never has it).
    pub(crate) fn audit_tree(&self) -> Result<sled::Tree, StoreError> {
        self.with(|h| h.db.open_tree("audit"))
    }

    /// The `definitions` tree (runtime budgets, module `definitions`).
    pub(crate) fn definitions_tree(&self) -> Result<sled::Tree, StoreError> {
        self.with(|h| h.db.open_tree("definitions"))
    }

    /// The node id kept in the data dir; stores `configured` (or else `proposed`) when there
    /// is none yet. A data dir keeps its node id: a different configured id is an error
    /// ([`StoreError::NodeIdChanged`]), because running the dir's spend under a second id
    /// would count it twice in the fleet (the old id's field stays in Redis).
    pub fn node_id(&self, configured: Option<&str>, proposed: &str) -> Result<String, StoreError> {
        let stored = self.with(|h| h.meta.get(b"node_id"))?;
        let stored = match stored {
            Some(raw) => {
                Some(
                    String::from_utf8(raw.to_vec()).map_err(|_| StoreError::Corrupt {
                        tree: "meta",
                        key: "node_id".into(),
                        reason: "not UTF-8".into(),
                    })?,
                )
            }
            None => None,
        };
        let id = match (configured, stored) {
            (Some(c), Some(s)) if c == s => return Ok(s),
            (Some(c), Some(s)) => {
                return Err(StoreError::NodeIdChanged {
                    dir: self.dir.clone(),
                    stored: s,
                    configured: c.to_owned(),
                })
            }
            (None, Some(s)) => return Ok(s),
            (Some(c), None) => c.to_string(),
            (None, None) => proposed.to_string(),
        };
        self.with(|h| h.meta.insert(b"node_id", id.as_bytes()))?;
        self.flush()?;
        Ok(id)
    }

    /// This data dir's instance id: random, generated at the first call and kept in `meta`.
    /// Unlike the node id (configurable, so it can be copied by mistake), it tells two data
    /// dirs apart: replication uses it to detect two live data dirs under one node id.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn instance_id(&self) -> Result<String, StoreError> {
        if let Some(raw) = self.with(|h| h.meta.get(b"instance_id"))? {
            return String::from_utf8(raw.to_vec())
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()))
                .ok_or_else(|| StoreError::Corrupt {
                    tree: "meta",
                    key: "instance_id".into(),
                    reason: "not an alphanumeric id".into(),
                });
        }
        let id = random_id();
        self.with(|h| h.meta.insert(b"instance_id", id.as_bytes()))?;
        self.flush()?;
        Ok(id)
    }

    /// Every own total stored.
    pub fn load_own(&self) -> Result<Vec<(WindowKey, OwnValue)>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        load(&h.own, "own", |e| self.io(e))
    }

    /// The own totals stored for one series (key name, period part), by key prefix.
    pub fn load_own_series(
        &self,
        name: &str,
        period: &str,
    ) -> Result<Vec<(WindowKey, OwnValue)>, StoreError> {
        self.scan_series(("own", |h| &h.own), name, period, |key, raw| {
            decode::<OwnValue>(raw)
                .map(Some)
                .map_err(|reason| StoreError::Corrupt {
                    tree: "own",
                    key: key.to_string(),
                    reason,
                })
        })
    }

    /// The peers entries stored for one series (a damaged one is skipped: the next sync
    /// round refreshes it, as [`Store::load_peers`] does).
    pub fn load_peers_series(
        &self,
        name: &str,
        period: &str,
    ) -> Result<Vec<(WindowKey, PeersValue)>, StoreError> {
        self.scan_series(("peers", |h| &h.peers), name, period, |_, raw| {
            Ok(PeersValue::decode(raw).ok())
        })
    }

    /// Every window of one series in the tree `tree` (its name and how to pick it), decoded
    /// by `value` (`None`: skipped).
    fn scan_series<V>(
        &self,
        (tree_name, tree): (&'static str, impl Fn(&Handles) -> &sled::Tree),
        name: &str,
        period: &str,
        value: impl Fn(&WindowKey, &[u8]) -> Result<Option<V>, StoreError>,
    ) -> Result<Vec<(WindowKey, V)>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        let mut out = Vec::new();
        for entry in tree(h).scan_prefix(series_prefix(name, period)) {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            let key = WindowKey::decode(tree_name, &k)?;
            if let Some(v) = value(&key, &v)? {
                out.push((key, v));
            }
        }
        Ok(out)
    }

    /// Every peers entry stored. The tree is a cache of what Redis holds: an entry that does
    /// not decode is removed and skipped with one warning line (naming the first culprit and
    /// the count) and counted in `provider_budgets_peers_cache_damaged_total`, never an error.
    pub fn load_peers(&self) -> Result<Vec<(WindowKey, PeersValue)>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for entry in h.peers.iter() {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            let decoded = WindowKey::decode("peers", &k)
                .map_err(|e| e.to_string())
                .and_then(|key| {
                    PeersValue::decode(&v)
                        .map(|value| (key.clone(), value))
                        .map_err(|reason| format!("corrupt peers entry {key}: {reason}"))
                });
            match decoded {
                Ok(item) => out.push(item),
                Err(reason) => damaged.push((k, reason)),
            }
        }
        if let Some((_, first)) = damaged.first() {
            tracing::warn!(
                dir = %self.dir.display(),
                count = damaged.len(),
                first = %first,
                "skipped damaged entries of the peers cache (the others' last known spend); \
                 the next sync round refreshes them"
            );
            metrics::counter!("provider_budgets_peers_cache_damaged_total")
                .increment(damaged.len() as u64);
            let mut batch = sled::Batch::default();
            for (k, _) in &damaged {
                batch.remove(k.clone());
            }
            // Removal only spares the next open the same warning; failing it is harmless.
            let _ = h.peers.apply_batch(batch);
        }
        Ok(out)
    }

    fn closed(&self) -> StoreError {
        StoreError::Io {
            dir: self.dir.clone(),
            message: "the database is closed after an I/O fault (reopening)".into(),
        }
    }

    /// The journal batch sequence stored with the totals (0 for a new or pre-sequence dir).
    pub fn seq(&self) -> Result<u64, StoreError> {
        let raw = self.with(|h| h.own.get(SEQ_KEY))?;
        match raw {
            None => Ok(0),
            Some(raw) => {
                let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| StoreError::Corrupt {
                    tree: "own",
                    key: "(batch sequence)".into(),
                    reason: format!("{} bytes, expected 8", raw.len()),
                })?;
                Ok(u64::from_be_bytes(bytes))
            }
        }
    }

    /// Writes own totals and removes ended windows in one atomic batch stamped with `seq`
    /// (not yet flushed).
    pub fn write_own<'a>(
        &self,
        seq: u64,
        items: impl IntoIterator<Item = (&'a WindowKey, OwnValue)>,
        removed: impl IntoIterator<Item = &'a WindowKey>,
    ) -> Result<(), StoreError> {
        self.write_own_and_reservations(seq, items, removed, std::iter::empty())
    }

    /// [`Store::write_own`] that also opens (`Some(value)`) or ends (`None`) reservations, in
    /// the same atomic batch: a commit's spend and the end of its reservation are on disk
    /// together or not at all (a crash in between can neither count it twice nor lose it).
    pub fn write_own_and_reservations<'a>(
        &self,
        seq: u64,
        items: impl IntoIterator<Item = (&'a WindowKey, OwnValue)>,
        removed: impl IntoIterator<Item = &'a WindowKey>,
        reservations: impl IntoIterator<Item = (&'a str, Option<&'a ReservationValue>)>,
    ) -> Result<(), StoreError> {
        self.write_batch(seq, items, removed, reservations, &[], &[])
    }

    /// [`Store::write_own_and_reservations`] that also writes the idempotency records
    /// `remembered` and removes the records `forgotten` (sled keys), in the same atomic batch:
    /// a keyed spend and its record are on disk together or not at all. The removals go in
    /// first, so a record both written and removed (a retried batch) is kept.
    pub fn write_batch<'a>(
        &self,
        seq: u64,
        items: impl IntoIterator<Item = (&'a WindowKey, OwnValue)>,
        removed: impl IntoIterator<Item = &'a WindowKey>,
        reservations: impl IntoIterator<Item = (&'a str, Option<&'a ReservationValue>)>,
        remembered: &[idempotency::Entry],
        forgotten: &[sled::IVec],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in forgotten {
            batch.remove(k.clone());
        }
        for (k, v) in items {
            batch.insert(k.encode(), encode(&v));
        }
        for k in removed {
            batch.remove(k.encode());
        }
        for (id, value) in reservations {
            match value {
                Some(v) => batch.insert(reservation_key(id), v.encode()),
                None => batch.remove(reservation_key(id)),
            }
        }
        for e in remembered {
            batch.insert(e.key.as_slice(), &e.value[..]);
        }
        batch.insert(SEQ_KEY, &seq.to_be_bytes());
        self.with(|h| h.own.apply_batch(batch))
    }

    /// Every idempotency record stored, oldest first. A record that does not decode is
    /// skipped with one warning line (naming the first and the count): it guards one retry,
    /// and failing the start for it would stop every budget.
    pub fn load_remembered(&self) -> Result<Vec<IdempotencyRecord>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        let mut out = Vec::new();
        let mut damaged: Vec<String> = Vec::new();
        for entry in h.own.scan_prefix(idempotency::PREFIX) {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            match idempotency::decode(&k, &v) {
                Ok(record) => out.push(record),
                Err(reason) => damaged.push(format!(
                    "{}: {reason}",
                    String::from_utf8_lossy(&k).escape_debug()
                )),
            }
        }
        if let Some(first) = damaged.first() {
            tracing::warn!(
                dir = %self.dir.display(),
                count = damaged.len(),
                first = %first,
                "skipped damaged idempotency records (a retry of their requests may count again)"
            );
        }
        Ok(out)
    }

    /// Number of idempotency records stored.
    pub fn count_remembered(&self) -> Result<usize, StoreError> {
        self.with(|h| {
            let mut n = 0;
            for entry in h.own.scan_prefix(idempotency::PREFIX).keys() {
                entry?;
                n += 1;
            }
            Ok(n)
        })
    }

    /// The sled keys of the `n` oldest idempotency records.
    pub fn oldest_remembered(&self, n: usize) -> Result<Vec<sled::IVec>, StoreError> {
        self.with(|h| {
            h.own
                .scan_prefix(idempotency::PREFIX)
                .keys()
                .take(n)
                .collect()
        })
    }

    /// Removes the idempotency records stamped before `cutoff` (Unix seconds), and any key
    /// under their prefix that is not one, in one batch (not flushed: a removal lost in a
    /// crash is done again, and a read filters by age anyway). Returns how many.
    pub fn remove_remembered_before(&self, cutoff: i64) -> Result<usize, StoreError> {
        self.with(|h| {
            let mut batch = sled::Batch::default();
            let mut removed = 0;
            for k in h.own.scan_prefix(idempotency::PREFIX).keys() {
                let k = k?;
                if idempotency::stamp_of(&k).is_some_and(|s| s >= cutoff) {
                    break; // sorted by stamp: the rest are younger
                }
                batch.remove(k);
                removed += 1;
            }
            if removed > 0 {
                h.own.apply_batch(batch)?;
            }
            Ok(removed)
        })
    }

    /// Every open reservation stored (a crash left them): id and value.
    pub fn load_reservations(&self) -> Result<Vec<(String, ReservationValue)>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        let mut out = Vec::new();
        for entry in h.own.scan_prefix(RESERVATION_PREFIX) {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            let id = String::from_utf8_lossy(&k[RESERVATION_PREFIX.len()..]).into_owned();
            let value = ReservationValue::decode(&v).map_err(|reason| StoreError::Corrupt {
                tree: "own",
                key: format!("reservation {}", id.escape_debug()),
                reason,
            })?;
            out.push((id, value));
        }
        Ok(out)
    }

    /// Writes peers entries in one atomic batch (not yet flushed).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn write_peers<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a WindowKey, &'a PeersValue)>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in items {
            batch.insert(k.encode(), v.encode());
        }
        self.with(|h| h.peers.apply_batch(batch))
    }

    /// Removes peers entries that ended at or before `cutoff`. Peers are a cache: not counted
    /// in the high-water record.
    pub fn remove_peers_ended(&self, cutoff: i64) -> Result<usize, StoreError> {
        self.with(|h| {
            let mut batch = sled::Batch::default();
            let mut removed = 0;
            for entry in h.peers.iter() {
                let (k, v) = entry?;
                if matches!(PeersValue::decode(&v), Ok(p) if p.end <= cutoff) {
                    batch.remove(k);
                    removed += 1;
                }
            }
            h.peers.apply_batch(batch)?;
            Ok(removed)
        })
    }

    /// Every `acked` entry: per window, the own total Redis last acknowledged (the
    /// replicator's record of what it need not send again) and the window end. A cache: an
    /// entry that does not decode is skipped (that window is sent again).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn load_acked(&self) -> Result<Vec<(WindowKey, AckedValue)>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        let mut out = Vec::new();
        for entry in h.acked.iter() {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            if let (Ok(key), Some(value)) = (WindowKey::decode("acked", &k), AckedValue::decode(&v))
            {
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// Writes and removes `acked` entries in one atomic batch (not yet flushed).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn write_acked<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a WindowKey, AckedValue)>,
        removed: impl IntoIterator<Item = &'a WindowKey>,
    ) -> Result<(), StoreError> {
        let batch = window_batch(items.into_iter().map(|(k, v)| (k, v.encode())), removed);
        self.with(|h| h.acked.apply_batch(batch))
    }

    /// Every `grants` entry: this node's grant per strict budget window. An entry that does
    /// not decode is an error naming its key: a grant is a promise of the fleet that this node
    /// may have spent, it must not be silently dropped.
    pub fn load_grants(&self) -> Result<Vec<(WindowKey, GrantValue)>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        let mut out = Vec::new();
        for entry in h.grants.iter() {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            let key = WindowKey::decode("grants", &k)?;
            let value = GrantValue::decode(&v).ok_or_else(|| StoreError::Corrupt {
                tree: "grants",
                key: key.to_string(),
                reason: format!("a grant value of {} bytes that does not decode", v.len()),
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Writes grants and removes those of ended windows in one atomic batch, then flushes
    /// (fsync): when this returns `Ok`, the grants survive a crash.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn write_grants<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a WindowKey, GrantValue)>,
        removed: impl IntoIterator<Item = &'a WindowKey>,
    ) -> Result<(), StoreError> {
        let batch = window_batch(items.into_iter().map(|(k, v)| (k, v.encode())), removed);
        self.with(|h| h.grants.apply_batch(batch))?;
        self.flush()
    }

    /// Every `holders` entry. An entry that does not decode fails the open, naming
    /// its key: forgetting a holder could let its grant be given twice after a Redis loss.
    pub fn load_holders(&self) -> Result<Vec<(WindowKey, HoldersValue)>, StoreError> {
        let guard = self.handles.read().unwrap_or_else(|p| p.into_inner());
        let h = guard.as_ref().ok_or_else(|| self.closed())?;
        let mut out = Vec::new();
        for entry in h.holders.iter() {
            let (k, v) = entry.map_err(|e| self.io(e))?;
            let key = WindowKey::decode("holders", &k)?;
            let value = HoldersValue::decode(&v).ok_or_else(|| StoreError::Corrupt {
                tree: "holders",
                key: key.to_string(),
                reason: format!("a holders value of {} bytes that does not decode", v.len()),
            })?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Writes holder lists and removes those of ended windows in one atomic batch, then
    /// flushes (fsync).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn write_holders<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a WindowKey, &'a HoldersValue)>,
        removed: impl IntoIterator<Item = &'a WindowKey>,
    ) -> Result<(), StoreError> {
        let batch = window_batch(items.into_iter().map(|(k, v)| (k, v.encode())), removed);
        self.with(|h| h.holders.apply_batch(batch))?;
        self.flush()
    }

    /// Makes everything written so far durable (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.with(|h| h.db.flush().map(drop))
    }

    /// Records durably (fsync) what the journal made durable, after sled's flush.
    pub fn mark(&self, mark: &Mark) -> Result<(), StoreError> {
        self.high_water.write(mark).map_err(|e| StoreError::Io {
            dir: self.dir.clone(),
            message: format!("cannot write {}: {e}", self.high_water.path().display()),
        })
    }

    /// The high-water record as found at open (see [`crate::durable::highwater`]).
    pub fn read_mark(&self) -> Result<Found, StoreError> {
        HighWater::read(&self.dir).map_err(|e| StoreError::Io {
            dir: self.dir.clone(),
            message: format!("cannot read {}: {e}", highwater::FILE_NAME),
        })
    }

    /// Overwrites a raw value; only for tests that damage the store on purpose.
    #[cfg(test)]
    pub fn put_raw_own(&self, key: &WindowKey, raw: &[u8]) {
        let _ = self.with(|h| h.own.insert(key.encode(), raw));
    }

    /// Overwrites a raw `peers` value; only for tests.
    #[cfg(test)]
    pub fn put_raw_peers(&self, key: &WindowKey, raw: &[u8]) {
        let _ = self.with(|h| h.peers.insert(key.encode(), raw));
    }
}

/// What the `own` tree holds, summed: compared with the high-water record.
pub(crate) fn summarize(seq: u64, totals: impl IntoIterator<Item = u64>) -> Mark {
    let mut mark = Mark {
        seq,
        entries: 0,
        sum: 0,
    };
    for t in totals {
        mark.entries += 1;
        mark.sum += u128::from(t);
    }
    mark
}

fn open_handles(dir: &Path) -> Result<Handles, StoreError> {
    let io = |e: sled::Error| io_error(dir, e);
    // sled releases its file lock only once its background threads let go of the
    // database, a few milliseconds after the last handle is dropped (sled#1289): an open
    // right after a drop in this process (a restart, a reload) waits that out, boundedly.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let db = loop {
        let opened = sled::Config::new()
            .path(dir)
            // The journal flushes after every batch; sled's own timer would only add fsyncs.
            .flush_every_ms(None)
            .open()
            .map_err(io);
        match opened {
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            other => break other?,
        }
    };
    Ok(Handles {
        own: db.open_tree("own").map_err(io)?,
        peers: db.open_tree("peers").map_err(io)?,
        meta: db.open_tree("meta").map_err(io)?,
        acked: db.open_tree("acked").map_err(io)?,
        grants: db.open_tree("grants").map_err(io)?,
        holders: db.open_tree("holders").map_err(io)?,
        db,
    })
}

fn load<V: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    io: impl Fn(sled::Error) -> StoreError,
) -> Result<Vec<(WindowKey, V)>, StoreError> {
    let mut out = Vec::new();
    for entry in tree.iter() {
        let (k, v) = entry.map_err(&io)?;
        if k.first() == Some(&0xff) {
            continue; // reserved keys (the batch sequence)
        }
        let key = WindowKey::decode(name, &k)?;
        let value = decode(&v).map_err(|reason| StoreError::Corrupt {
            tree: name,
            key: key.to_string(),
            reason,
        })?;
        out.push((key, value));
    }
    Ok(out)
}

/// 128 random bits as hex, from the std hasher's random keys, the time and the process.
pub(crate) fn random_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let part = |salt: u64| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.finish()
    };
    format!("{:016x}{:016x}", part(1), part(2))
}

/// The OS error code of an I/O error, also when sled wrapped it as text (sled sometimes
/// re-creates errors from their Debug form: `Os { code: 28, kind: StorageFull, .. }`).
fn os_code(io: &std::io::Error) -> Option<i32> {
    if let Some(code) = io.raw_os_error() {
        return Some(code);
    }
    let text = io.to_string();
    let rest = &text[text.find("code: ")? + "code: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// sled's errors as one readable line (its `Corruption` renders as Debug text with a
/// backtrace placeholder).
fn io_error(dir: &Path, e: sled::Error) -> StoreError {
    // sled reports a held lock as an I/O error whose text says so (checked first: the text
    // also carries an OS code, EWOULDBLOCK, that must not hide it).
    if e.to_string().contains("could not acquire lock") {
        return StoreError::Locked {
            dir: dir.to_path_buf(),
        };
    }
    let message = match &e {
        sled::Error::Io(io) => match os_code(io) {
            Some(28) => "no space left on device (ENOSPC)".to_string(),
            Some(code) => format!("I/O error: {}", std::io::Error::from_raw_os_error(code)),
            None if io.kind() == std::io::ErrorKind::StorageFull => {
                "no space left on device (ENOSPC)".to_string()
            }
            None => format!("I/O error: {io}"),
        },
        sled::Error::Corruption { at, .. } => match at {
            Some(at) => {
                format!("sled found corrupted data at {at:?} (run `provider-budgets repair`)")
            }
            None => "sled found corrupted data (run `provider-budgets repair`)".to_string(),
        },
        sled::Error::ReportableBug(m) => format!("sled internal error: {m}"),
        sled::Error::Unsupported(m) => format!("unsupported: {m}"),
        sled::Error::CollectionNotFound(_) => "missing tree".to_string(),
    };
    StoreError::Io {
        dir: dir.to_path_buf(),
        message: message.split_whitespace().collect::<Vec<_>>().join(" "),
    }
}

/// The window a key names, given the end stored with it.
pub(crate) fn window_of(key: &WindowKey, end: i64) -> Window {
    Window::from_secs(key.start, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durable::codec::{MAX_VALUE_BYTES, PEERS_VERSION};
    use serde::Serialize;

    fn key(start: i64) -> WindowKey {
        WindowKey {
            provider: "openai".into(),
            period: "1d".into(),
            start,
        }
    }

    #[test]
    fn round_trips_and_sorts_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (key(-86_400), key(86_400));
        store
            .write_own(
                1,
                [
                    (
                        &b,
                        OwnValue {
                            end: 172_800,
                            total: 5,
                        },
                    ),
                    (
                        &a,
                        OwnValue {
                            end: 0,
                            total: u64::MAX,
                        },
                    ),
                ],
                [],
            )
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let all = store.load_own().unwrap();
        assert_eq!(
            all[0],
            (
                a.clone(),
                OwnValue {
                    end: 0,
                    total: u64::MAX
                }
            )
        );
        assert_eq!(all[1].0, b);
        assert_eq!(store.seq().unwrap(), 1);
        store.write_own(2, [], [&a]).unwrap();
        assert_eq!(store.load_own().unwrap().len(), 1);
        assert_eq!(store.seq().unwrap(), 2);
    }

    #[test]
    fn reservations_share_the_batch_of_the_totals_and_damage_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let value = ReservationValue {
            estimate: 7,
            expires: 600,
            windows: vec![("openai".into(), "1d".into(), 0, 86_400)],
            counts: vec![7],
        };
        let k = key(0);
        store
            .write_own_and_reservations(
                1,
                [(
                    &k,
                    OwnValue {
                        end: 86_400,
                        total: 5,
                    },
                )],
                [],
                [("r-1", Some(&value)), ("r-2", Some(&value))],
            )
            .unwrap();
        // Window totals do not see them; the high-water sum stays the totals' sum.
        assert_eq!(store.load_own().unwrap().len(), 1);
        let open = store.load_reservations().unwrap();
        assert_eq!(
            open,
            [("r-1".into(), value.clone()), ("r-2".into(), value.clone())]
        );
        store
            .write_own_and_reservations(2, [], [], [("r-1", None)])
            .unwrap();
        assert_eq!(store.load_reservations().unwrap().len(), 1);
        for raw in [&b""[..], &[0x41], &[0x41, 0xff, 0xff], &[1, 7, 0]] {
            let _ = store.with(|h| h.own.insert(reservation_key("r-2"), raw));
            let err = store.load_reservations().unwrap_err();
            assert!(err.to_string().contains("reservation r-2"), "{err}");
        }
    }

    #[test]
    fn second_open_of_a_dir_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("in use"));
    }

    #[test]
    fn garbage_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for raw in [
            &b""[..],
            &[1],
            &[2, 0, 0],
            &[
                1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ] {
            store.put_raw_own(&key(0), raw);
            let err = store.load_own().unwrap_err();
            assert!(err.to_string().contains("openai/1d/0"), "{err}");
        }
    }

    #[test]
    fn node_id_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.node_id(None, "n-1").unwrap(), "n-1");
        assert_eq!(store.node_id(None, "n-2").unwrap(), "n-1");
        // A data dir keeps its id: another configured id is refused, naming both.
        let err = store.node_id(Some("edge"), "n-3").unwrap_err();
        assert!(matches!(err, StoreError::NodeIdChanged { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("\"n-1\"") && text.contains("\"edge\""),
            "{text}"
        );
        assert_eq!(store.node_id(Some("n-1"), "n-4").unwrap(), "n-1");
        let other = tempfile::tempdir().unwrap();
        let store = Store::open(other.path()).unwrap();
        assert_eq!(store.node_id(Some("edge"), "n-5").unwrap(), "edge");
        assert_eq!(store.node_id(None, "n-6").unwrap(), "edge");
    }

    #[test]
    fn peers_cache_is_a_bounded_sum_and_damage_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A legacy v1 value with thousands of nodes (beyond the 64 KiB bound) still loads,
        // summed.
        let nodes: Vec<(String, u64)> = (0..5000).map(|i| (format!("pod-{i:040}"), 2)).collect();
        #[derive(Serialize)]
        struct V1<'a> {
            end: i64,
            nodes: &'a [(String, u64)],
        }
        let mut legacy = vec![1u8];
        legacy.extend(
            bincode::serde::encode_to_vec(
                V1 {
                    end: 86_400,
                    nodes: &nodes,
                },
                bincode::config::standard(),
            )
            .unwrap(),
        );
        assert!(legacy.len() > MAX_VALUE_BYTES);
        store.put_raw_peers(&key(0), &legacy);
        // A damaged entry is skipped (and removed), not fatal.
        store.put_raw_peers(&key(86_400), &[PEERS_VERSION, 0xff, 0xff]);
        store
            .write_peers([(
                &key(172_800),
                &PeersValue {
                    end: 259_200,
                    others: u64::MAX,
                },
            )])
            .unwrap();
        let loaded = store.load_peers().unwrap();
        assert_eq!(
            loaded,
            [
                (
                    key(0),
                    PeersValue {
                        end: 86_400,
                        others: 10_000
                    }
                ),
                (
                    key(172_800),
                    PeersValue {
                        end: 259_200,
                        others: u64::MAX
                    }
                ),
            ]
        );
        assert_eq!(store.load_peers().unwrap().len(), 2);
        assert!(store
            .with(|h| h.peers.get(key(86_400).encode()))
            .unwrap()
            .is_none());
        // A v2 value stays small whatever the fleet size.
        assert!(
            PeersValue {
                end: 0,
                others: u64::MAX
            }
            .encode()
            .len()
                < 16
        );
    }

    #[test]
    fn instance_id_is_random_and_kept() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = Store::open(d1.path()).unwrap().instance_id().unwrap();
        let b = Store::open(d2.path()).unwrap().instance_id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert_eq!(Store::open(d1.path()).unwrap().instance_id().unwrap(), a);
    }

    #[test]
    fn io_errors_read_as_one_plain_line() {
        let dir = Path::new("/data");
        let wrapped = std::io::Error::other(format!("{:?}", std::io::Error::from_raw_os_error(28)));
        for e in [std::io::Error::from_raw_os_error(28), wrapped] {
            let text = io_error(dir, sled::Error::Io(e)).to_string();
            assert_eq!(
                text,
                "storage error in /data: no space left on device (ENOSPC)"
            );
        }
        let text = io_error(dir, sled::Error::Io(std::io::Error::from_raw_os_error(5))).to_string();
        assert!(
            !text.contains("Os {") && text.contains("I/O error"),
            "{text}"
        );
        let text = io_error(
            dir,
            sled::Error::Corruption {
                at: None,
                bt: Default::default(),
            },
        )
        .to_string();
        assert!(
            !text.contains("backtrace") && text.contains("repair"),
            "{text}"
        );
    }
}
