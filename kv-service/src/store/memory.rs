//! The in-memory store (`--store mem`): the fastest, and gone when the process ends.
//!
//! Entries live in hash maps split into shards by key, each behind its own std mutex, so gets and
//! puts on different keys rarely wait for each other and cost one hash lookup rather than a walk
//! down an ordered tree. A separate ordered index of the keys serves `list`; only inserting a new
//! key or deleting one touches it. Locks are held only for the map operation itself, never across
//! an `.await`, so plain mutexes are cheaper than async ones (see mini-redis's db.rs).
//!
//! Lock order: a shard, then the index. `list` never holds both: it reads candidate keys from the
//! index, lets it go, then looks each key up in its shard.

use std::{
    collections::{BTreeSet, HashMap},
    hash::BuildHasher,
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
};

use super::{Condition, Item, KvStore, PutOutcome, StoreError, Versioned};

/// Enough shards that the connections of a 2 to 16 core machine seldom meet on one lock.
const SHARDS: usize = 16;

type Shard = HashMap<Arc<str>, Versioned>;

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a key's shard; randomly seeded, so clients cannot aim their keys at one shard.
    hasher: std::hash::RandomState,
    /// Every key, in byte order (the order `list` promises).
    index: Mutex<BTreeSet<Arc<str>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
            index: Mutex::default(),
        }
    }
}

/// A panic while holding a lock cannot leave a map half-updated (every update is a single map
/// call), so a poisoned lock is still safe to use.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, key: &str) -> MutexGuard<'_, Shard> {
        let shard = self.hasher.hash_one(key) as usize % SHARDS;
        lock(&self.shards[shard])
    }

    /// Up to `limit` keys in the index after `start` that begin with `prefix`.
    fn candidates(&self, start: Bound<&str>, prefix: &str, limit: usize) -> Vec<Arc<str>> {
        lock(&self.index)
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|key| key.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect()
    }
}

impl KvStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.shard(key).get(key).cloned())
    }

    async fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> Result<PutOutcome, StoreError> {
        let mut shard = self.shard(key);
        let (version, replaced) = match (shard.get_mut(key), condition) {
            (Some(entry), Condition::Always) => {
                entry.version += 1;
                (entry.version, std::mem::replace(&mut entry.value, value))
            }
            (Some(entry), Condition::IfVersion(expected)) if entry.version == expected => {
                entry.version += 1;
                (entry.version, std::mem::replace(&mut entry.value, value))
            }
            (Some(entry), _) => {
                return Ok(PutOutcome::Conflict {
                    current: Some(entry.version),
                })
            }
            (None, Condition::IfVersion(_)) => return Ok(PutOutcome::Conflict { current: None }),
            (None, Condition::Always | Condition::IfAbsent) => {
                let key: Arc<str> = key.into();
                shard.insert(key.clone(), Versioned { value, version: 1 });
                lock(&self.index).insert(key);
                return Ok(PutOutcome::Written { version: 1 });
            }
        };
        drop(shard);
        // The old value is freed after the lock is released.
        drop(replaced);
        Ok(PutOutcome::Written { version })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let mut shard = self.shard(key);
        if shard.remove(key).is_none() {
            return Ok(false);
        }
        lock(&self.index).remove(key);
        Ok(true)
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let mut start: Arc<str> = match after {
            Some(after) if after >= prefix => after.into(),
            _ => prefix.into(),
        };
        let mut exclusive = matches!(after, Some(after) if after >= prefix);
        let mut items = Vec::new();
        while items.len() < limit {
            let bound = if exclusive {
                Bound::Excluded(&*start)
            } else {
                Bound::Included(&*start)
            };
            let wanted = limit - items.len();
            let candidates = self.candidates(bound, prefix, wanted);
            let exhausted = candidates.len() < wanted;
            // A key deleted since the index was read is skipped; the next round fills its place.
            for key in &candidates {
                if let Some(entry) = self.shard(key).get(key) {
                    items.push(Item {
                        key: key.to_string(),
                        value: entry.value.clone(),
                        version: entry.version,
                    });
                }
            }
            match candidates.last() {
                Some(last) if !exhausted => {
                    start = last.clone();
                    exclusive = true;
                }
                _ => break,
            }
        }
        Ok(items)
    }
}
