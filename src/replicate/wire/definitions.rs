//! The Redis side of runtime budget definitions: one hash per fleet, its key and counter
//! field, the script that writes it ([`DEFINITIONS_SCRIPT`], `definitions.lua`) and the
//! readers of its replies.
//!
//! Layout: `{prefix}:budgets`, a hash of field `scope:name:period part`
//! (`BudgetKey::definition_field`) → the record's JSON (`durable::definitions::Record`:
//! version, node, deleted, at, budget), and the field `~changes` (no definition field starts
//! with `~`), a counter the script raises with every change. The counter lives in the hash
//! rather than in a key of its own: one key is one Redis Cluster slot (the script touches it
//! alone), and a Redis that loses the hash loses the counter with it, which every node then
//! reads as a change. No expiry: definitions live until deleted (tombstones until they are
//! older than the storage retention).

use std::collections::BTreeMap;

use redis::Value;

use crate::durable::definitions::Record;

/// The script (`definitions.lua`); see its header for arguments and replies.
pub const DEFINITIONS_SCRIPT: &str = include_str!("definitions.lua");

/// The counter field of the definitions hash.
pub const CHANGES: &str = "~changes";

/// The definitions hash of a fleet: `{prefix}:budgets`.
pub fn definitions_key(prefix: &str) -> String {
    format!("{prefix}:budgets")
}

/// What a `put` call answered.
#[derive(Debug, PartialEq)]
pub(crate) enum Put {
    /// Written; the counter after the write.
    Written(i64),
    /// Refused: the field holds a record that wins (its exact text).
    Refused(String),
}

/// Reads a `put` call's reply.
pub(crate) fn put_reply(v: Value) -> Result<Put, String> {
    let Value::Array(items) = v else {
        return Err(format!("unexpected reply {v:?}"));
    };
    let mut items = items.into_iter();
    match (items.next(), items.next(), items.next()) {
        (Some(Value::Int(1)), Some(Value::Int(n)), None) => Ok(Put::Written(n)),
        (Some(Value::Int(0)), Some(held), None) => super::text(held)
            .map(Put::Refused)
            .map_err(|e| format!("unexpected winner {e}")),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

/// The hash as `HGETALL` returned it: the counter, the records by field (with their exact
/// text), and the fields that are not records (field, why), which are skipped.
#[derive(Debug, Default)]
pub(crate) struct Hash {
    pub changes: Option<i64>,
    pub records: BTreeMap<String, (Record, String)>,
    pub bad: Vec<(String, String)>,
}

/// Reads an `HGETALL` reply of the definitions hash.
pub(crate) fn hash_reply(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Hash {
    let mut out = Hash::default();
    for (field, value) in pairs {
        let field = String::from_utf8_lossy(&field).into_owned();
        if field == CHANGES {
            out.changes = std::str::from_utf8(&value)
                .ok()
                .and_then(|v| v.parse().ok());
            continue;
        }
        match Record::from_json(&value) {
            Ok(r) => {
                let text = String::from_utf8_lossy(&value).into_owned();
                out.records.insert(field, (r, text));
            }
            Err(why) => out.bad.push((field, why)),
        }
    }
    out
}
