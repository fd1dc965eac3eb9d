//! The slot table: budget series ([`BudgetKey`]) by slot index. A slot is an index into the
//! view, the journal's and the replicator's tables. Append-only while the limiter runs, so an
//! index held by a racing `record` or `filter` stays valid across a reload.

use std::hash::Hasher;
use std::sync::{PoisonError, RwLock};

use hashbrown::HashTable;
use rustc_hash::FxHasher;

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
    /// Slots by the hash of their (key name, period part), compared with `keys` on a hit:
    /// [`BudgetKey::store_parts`] is injective (see the module `key`), so this is also the
    /// index by key. Why slots, not the parts as keys: a template may have a hundred thousand
    /// series, and a copy of both strings per slot would cost each ~100 bytes more.
    index: HashTable<u32>,
}

/// The hash of a stored (key name, period part).
fn parts_hash(name: &str, period: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(name.as_bytes());
    h.write_u8(0);
    h.write(period.as_bytes());
    h.finish()
}

/// The hash of a key's stored parts.
fn key_hash(key: &BudgetKey) -> u64 {
    parts_hash(&key.key_name(), &key.period_part)
}

impl Keys {
    fn insert(&mut self, key: BudgetKey) {
        let slot = self.keys.len() as u32;
        let hash = key_hash(&key);
        self.keys.push(key);
        let keys = &self.keys;
        self.index
            .insert_unique(hash, slot, |&s| key_hash(&keys[s as usize]));
    }

    fn find(&self, name: &str, period: &str) -> Option<u32> {
        let hash = parts_hash(name, period);
        self.index
            .find(hash, |&s| {
                let k = &self.keys[s as usize];
                k.period_part == period && k.key_name() == name
            })
            .copied()
    }
}

impl SlotKeys {
    pub fn new(keys: Vec<BudgetKey>) -> SlotKeys {
        let mut table = Keys::default();
        for k in keys {
            table.insert(k);
        }
        SlotKeys {
            keys: RwLock::new(table),
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
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.index
            .find(key_hash(key), |&s| keys.keys[s as usize] == *key)
            .copied()
    }

    /// The slot of a stored (key name, period part), as read back from the data dir or Redis,
    /// if one of the slots has it.
    pub fn stored(&self, name: &str, period: &str) -> Option<u32> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .find(name, period)
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
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::budget::Scope;

    #[test]
    fn position_and_stored_find_every_key_and_nothing_else() {
        let table = SlotKeys::new(vec![BudgetKey::new(Scope::Provider, "openai", "1d")]);
        for i in 0..2000 {
            let k = BudgetKey::new(Scope::Key, format!("k{i}"), "1mo");
            table.push(k.credit());
            table.push(k);
        }
        let team = BudgetKey::new(Scope::Team, "research", "1d@Europe/Berlin");
        table.push(team.clone());
        assert_eq!(table.stored("openai", "1d"), Some(0));
        assert_eq!(table.position(&team), Some(4001));
        assert_eq!(
            table.stored("team:research", "1d@Europe/Berlin"),
            Some(4001)
        );
        for i in (0..2000).step_by(97) {
            let k = BudgetKey::new(Scope::Key, format!("k{i}"), "1mo");
            let slot = 2 + 2 * i as u32;
            assert_eq!(table.position(&k), Some(slot));
            assert_eq!(table.stored(&format!("key:k{i}"), "1mo"), Some(slot));
            assert_eq!(table.position(&k.credit()), Some(slot - 1));
            assert_eq!(table.get(slot), k);
        }
        // Near misses: another scope, another period, a provider named like a key name.
        assert_eq!(
            table.position(&BudgetKey::new(Scope::User, "k1", "1mo")),
            None
        );
        assert_eq!(table.stored("key:k1", "1d"), None);
        assert_eq!(table.stored("k1", "1mo"), None);
        assert_eq!(table.snapshot().len(), 4002);
    }
}
