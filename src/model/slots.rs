//! The slot table: budget series ([`BudgetKey`]) by slot index. A slot is an index into the
//! view, the journal's and the replicator's tables. Append-only while the limiter runs, so an
//! index held by a racing `record` or `filter` stays valid across a reload.

use std::sync::{PoisonError, RwLock};

use rustc_hash::FxHashMap;

use crate::model::key::BudgetKey;

/// The [`BudgetKey`] per budget slot. Append-only.
#[derive(Debug, Default)]
pub(crate) struct SlotKeys {
    keys: RwLock<Keys>,
}

/// The slots' keys and their index by stored key text (no linear search: `status` looks
/// every budget up, and data read from disk or Redis is mapped back through it, never parsed).
#[derive(Debug, Default)]
struct Keys {
    keys: Vec<BudgetKey>,
    /// (key name, period part) -> slot: [`BudgetKey::store_parts`] is injective (see the
    /// module `key`), so this is also the index by key.
    index: FxHashMap<(String, String), u32>,
}

impl SlotKeys {
    pub fn new(keys: Vec<BudgetKey>) -> SlotKeys {
        let index = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.store_parts(), i as u32))
            .collect();
        SlotKeys {
            keys: RwLock::new(Keys { keys, index }),
        }
    }

    /// The key of a slot.
    pub fn get(&self, slot: u32) -> BudgetKey {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys[slot as usize]
            .clone()
    }

    /// The slot of `key`, if it has one.
    pub fn position(&self, key: &BudgetKey) -> Option<u32> {
        self.stored(&key.key_name(), &key.period_part)
    }

    /// The slot of a stored (key name, period part), as read back from the data dir or Redis,
    /// if one of the slots has it.
    pub fn stored(&self, name: &str, period: &str) -> Option<u32> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .index
            .get(&(name.to_owned(), period.to_owned()))
            .copied()
    }

    /// Every slot's key.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn snapshot(&self) -> Vec<BudgetKey> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .clone()
    }

    pub fn push(&self, key: BudgetKey) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let slot = keys.keys.len() as u32;
        keys.index.insert(key.store_parts(), slot);
        keys.keys.push(key);
    }
}
