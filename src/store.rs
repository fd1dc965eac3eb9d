//! The on-disk layout: sled trees and the versioned value encoding.
//!
//! One sled database per data dir, three trees, each with a single writer thread:
//!
//! | tree    | key                         | value (after a version byte)            | written by |
//! |---------|-----------------------------|-----------------------------------------|------------|
//! | `own`   | provider, period, window    | this node's absolute total, window end  | journal    |
//! | `peers` | provider, period, window    | sum of the others' last known totals, end (v2) | replicator |
//! | `meta`  | `node_id`                   | the node id, UTF-8                      | open       |
//!
//! Keys are `provider 0x00 period 0x00 start`, the window start as a big-endian `i64` with its
//! sign bit flipped so keys sort by time. Totals are stored absolute, never as deltas: writing
//! one twice is harmless, which is what lets the journal retry and the replicator re-send.
//!
//! Values are `[VERSION, bincode(..)]`. Decoding is bounded (a length limit, trailing bytes
//! rejected) and returns an error naming the tree and key, never panics. `bincode` is used only
//! here, so swapping it (e.g. for `postcard`) touches this file alone.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::window::Window;

/// Format of every value written by this version.
const VERSION: u8 = 1;
/// No value we write comes near this; anything bigger is garbage.
const MAX_VALUE_BYTES: usize = 64 * 1024;
/// How long `Store::open` waits for a lock that a just-dropped database still holds.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Storage failures: the data dir is unusable or its content damaged. Distinct from bad input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process (or another `Limiter` in this one) has the data dir open.
    #[error("data dir {dir} is in use by another process (its lock is held)")]
    Locked {
        /// The data dir.
        dir: PathBuf,
    },
    /// sled reported an I/O or internal error.
    #[error("storage error in {dir}: {message}")]
    Io {
        /// The data dir.
        dir: PathBuf,
        /// sled's description.
        message: String,
    },
    /// A stored key or value cannot be decoded.
    #[error("corrupt {tree} entry {key}: {reason}")]
    Corrupt {
        /// Which tree (`own`, `peers`, `meta`).
        tree: &'static str,
        /// The key, rendered readably.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Identifies one window of one budget in storage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct WindowKey {
    pub provider: String,
    pub period: String,
    pub start: i64,
}

impl WindowKey {
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

/// Format of `peers` values written by this version (their v2). Numbered apart from the
/// `own` formats (1, 2, ...) so that a bump of one never makes the other's bytes decode.
const PEERS_VERSION: u8 = 0x22;
/// Bound for legacy v1 `peers` values (a list of every other node): large enough for any
/// fleet that wrote one, small enough to bound memory.
const MAX_LEGACY_PEERS_BYTES: usize = 8 * 1024 * 1024;

impl PeersValue {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![PEERS_VERSION];
        // Two integers into a Vec: cannot fail.
        if let Ok(body) = bincode::serde::encode_to_vec(self, bincode::config::standard()) {
            out.extend_from_slice(&body);
        }
        out
    }

    fn decode(raw: &[u8]) -> Result<PeersValue, String> {
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

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![VERSION];
    // Encoding plain structs of integers and strings into a Vec cannot fail.
    if let Ok(body) = bincode::serde::encode_to_vec(v, bincode::config::standard()) {
        out.extend_from_slice(&body);
    }
    out
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
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

/// Decodes an `own` value; exposed (hidden) for the fuzz targets.
#[doc(hidden)]
pub fn fuzz_decode_value(raw: &[u8]) -> bool {
    decode::<OwnValue>(raw).is_ok()
        | PeersValue::decode(raw).is_ok()
        | WindowKey::decode("own", raw).is_ok()
}

/// The data dir's database.
#[derive(Debug)]
pub(crate) struct Store {
    dir: PathBuf,
    db: sled::Db,
    own: sled::Tree,
    peers: sled::Tree,
    meta: sled::Tree,
}

impl Store {
    /// Opens (creating if needed) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let io = |e: sled::Error| io_error(dir, e);
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            dir: dir.to_path_buf(),
            message: format!("cannot create the data dir: {e}"),
        })?;
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
        Ok(Store {
            own: db.open_tree("own").map_err(io)?,
            peers: db.open_tree("peers").map_err(io)?,
            meta: db.open_tree("meta").map_err(io)?,
            dir: dir.to_path_buf(),
            db,
        })
    }

    fn io(&self, e: sled::Error) -> StoreError {
        io_error(&self.dir, e)
    }

    /// The node id kept in the data dir; stores `proposed` when there is none yet.
    /// A configured id that differs from the stored one replaces it: the operator said so.
    pub fn node_id(&self, configured: Option<&str>, proposed: &str) -> Result<String, StoreError> {
        let stored = self.meta.get(b"node_id").map_err(|e| self.io(e))?;
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
            (Some(c), _) => c.to_string(),
            (None, Some(s)) => return Ok(s),
            (None, None) => proposed.to_string(),
        };
        self.meta
            .insert(b"node_id", id.as_bytes())
            .map_err(|e| self.io(e))?;
        self.flush()?;
        Ok(id)
    }

    /// This data dir's instance id: random, generated at the first call and kept in `meta`.
    /// Unlike the node id (configurable, so it can be copied by mistake), it tells two data
    /// dirs apart: replication uses it to detect two live data dirs under one node id.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn instance_id(&self) -> Result<String, StoreError> {
        if let Some(raw) = self.meta.get(b"instance_id").map_err(|e| self.io(e))? {
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
        self.meta
            .insert(b"instance_id", id.as_bytes())
            .map_err(|e| self.io(e))?;
        self.flush()?;
        Ok(id)
    }

    /// Every own total stored.
    pub fn load_own(&self) -> Result<Vec<(WindowKey, OwnValue)>, StoreError> {
        load(&self.own, "own", |e| self.io(e))
    }

    /// Every peers entry stored. The tree is a cache of what Redis holds: an entry that does
    /// not decode is removed and skipped with one warning line (naming the first culprit and
    /// the count) and counted in `provider_budgets_peers_cache_damaged_total`, never an error.
    pub fn load_peers(&self) -> Result<Vec<(WindowKey, PeersValue)>, StoreError> {
        let mut out = Vec::new();
        let mut damaged = Vec::new();
        for entry in self.peers.iter() {
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
            let _ = self.peers.apply_batch(batch);
        }
        Ok(out)
    }

    /// Writes own totals in one atomic batch (not yet flushed).
    pub fn write_own<'a>(
        &self,
        items: impl IntoIterator<Item = (&'a WindowKey, OwnValue)>,
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (k, v) in items {
            batch.insert(k.encode(), encode(&v));
        }
        self.own.apply_batch(batch).map_err(|e| self.io(e))
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
        self.peers.apply_batch(batch).map_err(|e| self.io(e))
    }

    /// Removes the windows that ended at or before `cutoff` (Unix seconds) from both trees.
    pub fn remove_ended(&self, cutoff: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (tree, name) in [(&self.own, "own"), (&self.peers, "peers")] {
            let mut batch = sled::Batch::default();
            for entry in tree.iter() {
                let (k, v) = entry.map_err(|e| self.io(e))?;
                // `end` leads both value types; a value we cannot read is kept for the
                // operator to inspect rather than silently deleted.
                let end = match name {
                    "own" => decode::<OwnValue>(&v).map(|v| v.end),
                    _ => PeersValue::decode(&v).map(|v| v.end),
                };
                if matches!(end, Ok(end) if end <= cutoff) {
                    batch.remove(k);
                    removed += 1;
                }
            }
            tree.apply_batch(batch).map_err(|e| self.io(e))?;
        }
        Ok(removed)
    }

    /// Makes everything written so far durable (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(drop).map_err(|e| self.io(e))
    }

    /// Overwrites a raw value; only for tests that damage the store on purpose.
    #[cfg(test)]
    pub fn put_raw_own(&self, key: &WindowKey, raw: &[u8]) {
        let _ = self.own.insert(key.encode(), raw);
    }

    /// Overwrites a raw `peers` value; only for tests.
    #[cfg(test)]
    pub fn put_raw_peers(&self, key: &WindowKey, raw: &[u8]) {
        let _ = self.peers.insert(key.encode(), raw);
    }
}

fn load<V: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    io: impl Fn(sled::Error) -> StoreError,
) -> Result<Vec<(WindowKey, V)>, StoreError> {
    let mut out = Vec::new();
    for entry in tree.iter() {
        let (k, v) = entry.map_err(&io)?;
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

fn io_error(dir: &Path, e: sled::Error) -> StoreError {
    let message = e.to_string();
    if message.contains("could not acquire lock") {
        StoreError::Locked {
            dir: dir.to_path_buf(),
        }
    } else {
        StoreError::Io {
            dir: dir.to_path_buf(),
            message,
        }
    }
}

/// The window a key names, given the end stored with it.
pub(crate) fn window_of(key: &WindowKey, end: i64) -> Window {
    Window::from_secs(key.start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

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
            .write_own([
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
            ])
            .unwrap();
        store.flush().unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let all = store.load_own().unwrap();
        assert_eq!(
            all[0],
            (
                a,
                OwnValue {
                    end: 0,
                    total: u64::MAX
                }
            )
        );
        assert_eq!(all[1].0, b);
        assert_eq!(store.remove_ended(0).unwrap(), 1);
        assert_eq!(store.load_own().unwrap().len(), 1);
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
        assert_eq!(store.node_id(Some("edge"), "n-3").unwrap(), "edge");
        assert_eq!(store.node_id(None, "n-4").unwrap(), "edge");
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
        assert!(store.peers.get(key(86_400).encode()).unwrap().is_none());
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
}
