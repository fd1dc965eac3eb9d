//! The slot table: budget series (key name, period part) by slot index. A slot is an index
//! into the view, the journal's and the replicator's tables. Append-only while the limiter
//! runs, so an index held by a racing `record` or `filter` stays valid across a reload.

use std::sync::{PoisonError, RwLock};

use rustc_hash::FxHashMap;

/// (key name, period part) per budget slot: the storage and Redis key parts (see the module
/// `budget`; provider budgets keep the provider name as key name). Append-only.
#[derive(Debug, Default)]
pub(crate) struct SlotKeys {
    keys: RwLock<Keys>,
}

/// The slots' key parts and their index (no linear search: `status` looks every budget up).
#[derive(Debug, Default)]
struct Keys {
    parts: Vec<(String, String)>,
    index: FxHashMap<(String, String), u32>,
}

impl SlotKeys {
    pub fn new(keys: Vec<(String, String)>) -> SlotKeys {
        let index = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.clone(), i as u32))
            .collect();
        SlotKeys {
            keys: RwLock::new(Keys { parts: keys, index }),
        }
    }

    /// The key parts of a slot.
    pub fn get(&self, slot: u32) -> (String, String) {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .parts[slot as usize]
            .clone()
    }

    /// The slot of (key name, period part), if it has one.
    pub fn position(&self, name: &str, period: &str) -> Option<u32> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .index
            .get(&(name.to_owned(), period.to_owned()))
            .copied()
    }

    /// Every slot's key parts.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub fn snapshot(&self) -> Vec<(String, String)> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .parts
            .clone()
    }

    pub fn push(&self, name: String, period: String) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        let slot = keys.parts.len() as u32;
        keys.index.insert((name.clone(), period.clone()), slot);
        keys.parts.push((name, period));
    }
}
