//! The in-memory store (`--store mem`): the fastest, and gone when the process ends.
//!
//! Entries live in hash tables split into shards by key, each behind its own std mutex, so gets
//! and puts on different keys rarely wait for each other and cost one hash lookup rather than a
//! walk down an ordered tree. A key is hashed once: some bits of the hash pick the shard and the
//! whole hash finds the entry in it. A separate ordered index of the keys serves `list`; only
//! inserting a new key or deleting one touches it. Locks are held only for the table operation
//! itself, never across an `.await`, so plain mutexes are cheaper than async ones (see
//! mini-redis's db.rs).
//!
//! Lock order: a shard, then the index. `list` never holds both: it reads candidate keys from the
//! index, lets it go, then looks each key up in its shard.
//!
//! A poisoned lock is used anyway (`unwrap_or_else(PoisonError::into_inner)`), the policy of every
//! std mutex in the workspace's services: a section holding one only calls a map or set method,
//! each of which leaves its collection whole, so a panic elsewhere in the task cannot leave it
//! half-updated, and refusing the lock would turn one failed request into failing them all.

use std::{
    collections::BTreeSet,
    hash::BuildHasher,
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use hashbrown::{hash_table::Entry as Slot, DefaultHashBuilder, HashTable};

use super::{Condition, Item, KvStore, PutOutcome, StoreError, Versioned};

/// Enough shards that the connections of a 2 to 16 core machine seldom meet on one lock.
const SHARDS: usize = 16;

/// Bits 32 and up of a key's hash pick its shard: the table inside the shard uses the low bits
/// for the bucket and the top 7 for its tags, so the shard's bits leave both evenly spread.
const SHARD_SHIFT: u32 = 32;

struct Entry {
    key: Arc<str>,
    versioned: Versioned,
}

type Shard = HashTable<Entry>;

pub struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// Randomly seeded, so clients cannot aim their keys at one shard or one bucket.
    hasher: DefaultHashBuilder,
    /// Every key, in byte order (the order `list` promises).
    index: Mutex<BTreeSet<Arc<str>>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: DefaultHashBuilder::default(),
            index: Mutex::default(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// `key`'s hash and its locked shard.
    fn shard(&self, key: &str) -> (u64, MutexGuard<'_, Shard>) {
        let hash = self.hash(key);
        let shard = (hash >> SHARD_SHIFT) as usize % SHARDS;
        let shard = self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (hash, shard)
    }

    fn get_entry(&self, key: &str) -> Option<Versioned> {
        let (hash, shard) = self.shard(key);
        shard
            .find(hash, |entry| &*entry.key == key)
            .map(|entry| entry.versioned.clone())
    }

    /// Up to `limit` keys in the index after `start` that begin with `prefix`.
    fn candidates(&self, start: Bound<&str>, prefix: &str, limit: usize) -> Vec<Arc<str>> {
        self.index
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|key| key.starts_with(prefix))
            .take(limit)
            .cloned()
            .collect()
    }
}

impl KvStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.get_entry(key))
    }

    async fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> Result<PutOutcome, StoreError> {
        let (hash, mut shard) = self.shard(key);
        let found = shard
            .find_mut(hash, |entry| &*entry.key == key)
            .map(|entry| &mut entry.versioned);
        let (version, replaced) = match (found, condition) {
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
                let entry = Entry {
                    key: key.clone(),
                    versioned: Versioned { value, version: 1 },
                };
                shard.insert_unique(hash, entry, |entry| self.hash(&entry.key));
                self.index
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(key);
                return Ok(PutOutcome::Written { version: 1 });
            }
        };
        drop(shard);
        // The old value is freed after the lock is released.
        drop(replaced);
        Ok(PutOutcome::Written { version })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let (hash, mut shard) = self.shard(key);
        match shard.entry(
            hash,
            |entry| &*entry.key == key,
            |entry| self.hash(&entry.key),
        ) {
            Slot::Occupied(entry) => {
                entry.remove();
                self.index
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(key);
                Ok(true)
            }
            Slot::Vacant(_) => Ok(false),
        }
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
                if let Some(entry) = self.get_entry(key) {
                    items.push(Item {
                        key: key.to_string(),
                        value: entry.value,
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
