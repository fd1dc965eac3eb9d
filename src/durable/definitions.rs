//! Runtime budget definitions on disk and in memory: one [`Record`] per budget series (its
//! field, `BudgetKey::definition_field`), in the sled tree `definitions`, and the rule that
//! decides between two records of one field.
//!
//! **Last writer wins by a Lamport version.** Each record carries a version and the node id
//! that wrote it. A node writes a change with version = the largest version it has seen + 1,
//! so a change made after seeing another always beats it; two changes made without seeing
//! each other (on two nodes, or during a Redis outage) are ordered by version, then by node
//! id (byte order, the greater wins). That order is total (one node never writes one version
//! twice), so every node and Redis pick the same winner whatever order the records arrive in.
//! A record with the same version and node as ours but another content (a data dir that was
//! wiped and wrote again) is taken from Redis: Redis keeps the first, so all end on it.
//!
//! **A delete is a tombstone**: a record with `deleted: true` and a version like any change,
//! so a late put with an older version loses to it instead of resurrecting the budget.
//! Tombstones are removed once older than [`tombstone_retention`] (by the clock of the node
//! that looks; module `replicate::definitions` removes them from Redis too): a node must see
//! a delete within that time, or it brings the deleted budget back when it returns.
//!
//! Values are a version byte then the record's JSON (the Redis value's text, see
//! `replicate::wire::definitions`). The budget is kept as raw JSON and read by the config
//! layer ([`Definition`]) only when applied, so a record of a later version still orders
//! correctly where its budget cannot be read. The table's largest version is stored too
//! (key `0xff max_version`), so a version never goes back after tombstones are removed.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::config::runtime::Definition;
use crate::durable::codec::MAX_VALUE_BYTES;
use crate::durable::error::StoreError;
use crate::durable::store::Store;

/// The shortest time a tombstone is kept.
const TOMBSTONE_FLOOR: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// How long a tombstone is kept: the storage retention, at least 30 days. Decision: a
/// tombstone is about 200 bytes, and a node that was cut off from Redis for longer than this
/// when it comes back pushes its live copy of a budget deleted meanwhile (nothing newer is
/// left to beat it); the storage retention alone (1 h by default) is shorter than ordinary
/// outages and maintenance windows.
pub(crate) fn tombstone_retention(storage_retention: std::time::Duration) -> std::time::Duration {
    storage_retention.max(TOMBSTONE_FLOOR)
}

/// Format byte of a `definitions` value (then the record's JSON).
const FORMAT: u8 = 0x81;

/// Key of the largest version seen (no field starts with `0xff`: fields are UTF-8).
const MAX_VERSION_KEY: &[u8] = b"\xffmax_version";

/// One runtime budget definition, or its tombstone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Lamport version: the writer's largest version seen + 1.
    pub version: u64,
    /// The node that wrote it: breaks ties between equal versions.
    pub node: String,
    /// A tombstone: the budget was deleted.
    pub deleted: bool,
    /// When it was written, Unix seconds, by the writer's clock (a tombstone's age).
    pub at: i64,
    /// The budget's [`Definition`] as JSON (kept in a tombstone too: it names what was
    /// deleted).
    pub budget: serde_json::Value,
}

impl Record {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// Whether `self` wins over `other`: a greater version, or an equal one from a greater
    /// node id (byte order).
    pub(crate) fn beats(&self, other: &Record) -> bool {
        (self.version, self.node.as_bytes()) > (other.version, other.node.as_bytes())
    }

    /// The definition, when this version can read it.
    pub(crate) fn definition(&self) -> Result<Definition, String> {
        serde_json::from_value(self.budget.clone()).map_err(|e| e.to_string())
    }

    /// The record's JSON (the Redis value).
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// A record from its JSON, bounded.
    pub(crate) fn from_json(text: &[u8]) -> Result<Record, String> {
        if text.len() > MAX_VALUE_BYTES {
            return Err(format!("{} bytes, at most {MAX_VALUE_BYTES}", text.len()));
        }
        serde_json::from_slice(text).map_err(|e| e.to_string())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        out.extend_from_slice(self.to_json().as_bytes());
        out
    }

    fn decode(raw: &[u8]) -> Result<Record, String> {
        match raw.split_first() {
            Some((&FORMAT, json)) => Record::from_json(json),
            Some((v, _)) => Err(format!("unknown format {v:#04x}")),
            None => Err("empty value".into()),
        }
    }
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
/// What [`Definitions::reconcile`] found.
#[derive(Debug, Default)]
pub(crate) struct Reconciled {
    /// A record of ours was replaced or added: the budgets must be applied again.
    pub changed: bool,
    /// Our records that Redis lacks or holds older: to send.
    pub push: Vec<(String, Record)>,
    /// Tombstones in Redis older than the cutoff (field, exact value): to remove there.
    pub forget: Vec<(String, String)>,
}

/// The runtime definitions of this data dir: the `definitions` tree and its copy in memory.
#[derive(Debug, Default)]
pub(crate) struct Definitions {
    /// One lock for the table and its tree: a write computes its version, stores and
    /// publishes in one step, so two writers never take one version and the tree never
    /// holds an older record than memory. Held across the tree's fsync: writes are operator
    /// actions and replication rounds, never the request path.
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    records: BTreeMap<String, Record>,
    max_version: u64,
}

impl Table {
    fn store(&mut self, store: &Store, field: &str, record: Record) -> Result<(), StoreError> {
        let tree = store.definitions_tree()?;
        let io = |e| store.io_error(e);
        let max = self.max_version.max(record.version);
        tree.insert(field.as_bytes(), record.encode()).map_err(io)?;
        tree.insert(MAX_VERSION_KEY, &max.to_be_bytes())
            .map_err(io)?;
        self.max_version = max;
        self.records.insert(field.to_owned(), record);
        Ok(())
    }
}

impl Table {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// Removes the record of `field` (memory and tree); returns it.
    fn remove(&mut self, store: &Store, field: &str) -> Result<Record, StoreError> {
        store
            .definitions_tree()?
            .remove(field.as_bytes())
            .map_err(|e| store.io_error(e))?;
        self.records
            .remove(field)
            .ok_or_else(|| corrupt(field, "no such record"))
    }
}

impl Definitions {
    /// Reads the `definitions` tree. A record that does not decode is an error naming it.
    pub(crate) fn load(store: &Store) -> Result<Definitions, StoreError> {
        let tree = store.definitions_tree()?;
        let mut table = Table::default();
        for item in tree.iter() {
            let (k, v) = item.map_err(|e| store.io_error(e))?;
            if k.as_ref() == MAX_VERSION_KEY {
                let bytes: [u8; 8] = v
                    .as_ref()
                    .try_into()
                    .map_err(|_| corrupt("max_version", "not 8 bytes"))?;
                table.max_version = table.max_version.max(u64::from_be_bytes(bytes));
                continue;
            }
            let field = String::from_utf8(k.to_vec())
                .map_err(|_| corrupt(&String::from_utf8_lossy(&k), "key is not UTF-8"))?;
            let record = Record::decode(&v).map_err(|reason| corrupt(&field, &reason))?;
            table.max_version = table.max_version.max(record.version);
            table.records.insert(field, record);
        }
        Ok(Definitions {
            table: Mutex::new(table),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every record (tombstones too), by field.
    pub(crate) fn records(&self) -> Vec<(String, Record)> {
        self.lock()
            .records
            .iter()
            .map(|(f, r)| (f.clone(), r.clone()))
            .collect()
    }

    /// The record of `field`.
    pub(crate) fn get(&self, field: &str) -> Option<Record> {
        self.lock().records.get(field).cloned()
    }

    /// Writes this node's change of `field`: `make` gets the version (the largest seen + 1)
    /// and returns the record; it is durable (fsync) before this returns.
    pub(crate) fn write(
        &self,
        store: &Store,
        field: &str,
        make: impl FnOnce(u64) -> Record,
    ) -> Result<Record, StoreError> {
        let mut table = self.lock();
        let record = make(table.max_version.saturating_add(1));
        table.store(store, field, record.clone())?;
        store.flush()?;
        Ok(record)
    }

    /// Whether a tombstone was written before `cutoff` (Unix seconds): past its retention.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn has_tombstones_before(&self, cutoff: i64) -> bool {
        self.lock()
            .records
            .values()
            .any(|r| r.deleted && r.at < cutoff)
    }

    /// Takes one record read from Redis (the winner that refused our write): `true` when it
    /// replaced ours.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn take(
        &self,
        store: &Store,
        field: &str,
        remote: Record,
    ) -> Result<bool, StoreError> {
        let mut table = self.lock();
        if !replaces(table.records.get(field), &remote) {
            return Ok(false);
        }
        table.store(store, field, remote)?;
        store.flush()?;
        Ok(true)
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    /// Compares the whole Redis hash (`remote`: field → record and its exact text) with ours:
    /// takes every remote record that wins over ours, lists ours that Redis lacks or holds
    /// older, and drops tombstones written before `cutoff` (Unix seconds) on both sides
    /// (ours here; Redis's are listed in `forget`).
    pub(crate) fn reconcile(
        &self,
        store: &Store,
        remote: &BTreeMap<String, (Record, String)>,
        cutoff: i64,
    ) -> Result<Reconciled, StoreError> {
        let mut out = Reconciled::default();
        let mut table = self.lock();
        let old: Vec<String> = table
            .records
            .iter()
            .filter(|(_, r)| r.deleted && r.at < cutoff)
            .map(|(f, _)| f.clone())
            .collect();
        let mut removed = !old.is_empty();
        for f in &old {
            table.remove(store, f)?;
        }
        for (field, (record, text)) in remote {
            table.max_version = table.max_version.max(record.version);
            let takes = replaces(table.records.get(field), record);
            if record.deleted && record.at < cutoff {
                // Gone everywhere once every node stops pushing it; a live record of ours
                // that it beats was deleted meanwhile: it goes too.
                out.forget.push((field.clone(), text.clone()));
                if takes && table.records.contains_key(field) {
                    out.changed |= !table.remove(store, field)?.deleted;
                    removed = true;
                }
            } else if takes {
                table.store(store, field, record.clone())?;
                out.changed = true;
            }
        }
        for (field, record) in &table.records {
            if remote.get(field).is_none_or(|(r, _)| record.beats(r)) {
                out.push.push((field.clone(), record.clone()));
            }
        }
        if out.changed || removed {
            store.flush()?;
        }
        Ok(out)
    }
}

#[cfg_attr(not(feature = "redis"), allow(dead_code))]
/// Whether `remote` takes the place of `local`: it wins, or it has the same version and node
/// with another content (Redis kept the first of the two; everyone ends on it).
fn replaces(local: Option<&Record>, remote: &Record) -> bool {
    match local {
        None => true,
        Some(l) => remote.beats(l) || (!l.beats(remote) && l != remote),
    }
}

fn corrupt(key: &str, reason: &str) -> StoreError {
    StoreError::Corrupt {
        tree: "definitions",
        key: key.escape_debug().to_string(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(version: u64, node: &str, deleted: bool, limit: u64) -> Record {
        Record {
            version,
            node: node.into(),
            deleted,
            at: 100,
            budget: serde_json::json!({ "limit": limit }),
        }
    }

    #[test]
    fn the_greater_version_then_the_greater_node_wins() {
        assert!(rec(2, "a", false, 1).beats(&rec(1, "z", false, 1)));
        assert!(rec(1, "b", false, 1).beats(&rec(1, "a", false, 1)));
        assert!(!rec(1, "a", false, 1).beats(&rec(1, "a", true, 1)));
        // Byte order: 'B' (0x42) sorts before 'a' (0x61), whatever the locale.
        assert!(rec(1, "a", false, 1).beats(&rec(1, "B", false, 1)));
        assert!(replaces(
            Some(&rec(1, "a", false, 1)),
            &rec(1, "a", false, 2)
        ));
        assert!(!replaces(
            Some(&rec(1, "a", false, 1)),
            &rec(1, "a", false, 1)
        ));
    }

    #[test]
    fn writes_survive_a_reopen_and_versions_never_go_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = Definitions::load(&store).unwrap();
        let r = d
            .write(&store, "tag:a:1d", |v| rec(v, "n1", false, 5))
            .unwrap();
        assert_eq!(r.version, 1);
        let mut remote = BTreeMap::new();
        let seen = rec(7, "n2", true, 5);
        remote.insert("tag:a:1d".to_owned(), (seen.clone(), seen.to_json()));
        let got = d.reconcile(&store, &remote, 0).unwrap();
        assert!(got.changed && got.push.is_empty() && got.forget.is_empty());
        // The tombstone goes once older than the cutoff; the version stays.
        let got = d.reconcile(&store, &remote, 101).unwrap();
        assert_eq!(got.forget.len(), 1);
        assert!(d.records().is_empty());
        drop(d);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let d = Definitions::load(&store).unwrap();
        let r = d
            .write(&store, "tag:b:1d", |v| rec(v, "n1", false, 5))
            .unwrap();
        assert_eq!(r.version, 8);
        assert_eq!(d.get("tag:b:1d"), Some(r));
    }
}
