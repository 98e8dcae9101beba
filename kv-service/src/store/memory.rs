//! The in-memory store (`--store mem`): the fastest, and gone when the process ends.
//!
//! Everything lives in one [`State`] behind one std mutex: the entries (a hash table), the
//! ordered index `list` walks, the expiry queue, the change log and the revision. One lock makes
//! a transaction atomic for every reader (a listing never sees half of one) and keeps the change
//! log in revision order, at the price of puts on different keys waiting for each other; the lock
//! is held only for the table operations themselves, never across an `.await` (see mini-redis's
//! db.rs), so that wait is short. Writes run [`super::apply`]'s rules on the locked state: the
//! memory [`Rows`] never wait, so their futures complete on the first poll, under the lock.
//!
//! A key is stored once, as an `Arc<str>` the table, the index and the expiry queue share.
//!
//! A poisoned lock is used anyway (`unwrap_or_else(PoisonError::into_inner)`), the policy of every
//! std mutex in the workspace's services: a section holding one only calls collection methods,
//! each of which leaves its collection whole, and refusing the lock would turn one failed request
//! into failing them all.

use std::{
    collections::{BTreeSet, VecDeque},
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use futures::FutureExt;
use hashbrown::HashMap;

use super::{
    apply::apply, Change, ChangePage, Head, Item, KeyFilter, KvStore, Listing, Rows, StoreError,
    Versioned, Write, WriteOutcome, CHANGE_PAGE, DEFAULT_HISTORY,
};

pub struct MemoryStore {
    state: Mutex<State>,
}

struct Entry {
    value: Box<str>,
    version: i64,
    revision: i64,
    expires_at: Option<i64>,
}

impl Entry {
    fn versioned(&self) -> Versioned {
        Versioned {
            value: self.value.to_string(),
            version: self.version,
            revision: self.revision,
            expires_at: self.expires_at,
        }
    }
}

struct State {
    /// Randomly seeded (hashbrown's default), so clients cannot aim their keys at one bucket.
    entries: HashMap<Arc<str>, Entry>,
    /// Every key, in byte order (the order `list` promises).
    index: BTreeSet<Arc<str>>,
    /// The keys that expire, by expiry time.
    expiries: BTreeSet<(i64, Arc<str>)>,
    /// The newest changes, oldest first.
    log: VecDeque<Change>,
    /// Changes the log keeps at most.
    history: usize,
    revision: i64,
    /// The highest revision dropped from the log.
    compacted: i64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_history(DEFAULT_HISTORY)
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose change log keeps the newest `history` changes.
    pub fn with_history(history: u64) -> Self {
        MemoryStore {
            state: Mutex::new(State {
                entries: HashMap::new(),
                index: BTreeSet::new(),
                expiries: BTreeSet::new(),
                log: VecDeque::new(),
                history: usize::try_from(history).unwrap_or(usize::MAX),
                revision: 0,
                compacted: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn live(&self, key: &str, now: i64) -> Option<&Entry> {
        self.entries
            .get(key)
            .filter(|entry| entry.expires_at.is_none_or(|at| at > now))
    }

    fn drop_oldest_change(&mut self) {
        if let Some(oldest) = self.log.pop_front() {
            self.compacted = self.compacted.max(oldest.revision);
        }
    }
}

impl KvStore for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let now = super::now_ms();
        Ok(self.lock().live(key, now).map(Entry::versioned))
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        let now = super::now_ms();
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let state = self.lock();
        let items = state
            .index
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|key| key.starts_with(prefix))
            .filter_map(|key| {
                let entry = state.live(key, now)?;
                Some(Item {
                    key: key.to_string(),
                    value: entry.value.to_string(),
                    version: entry.version,
                    revision: entry.revision,
                    expires_at: entry.expires_at,
                })
            })
            .take(limit)
            .collect();
        Ok(Listing {
            items,
            revision: state.revision,
        })
    }

    async fn write_batch(&self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, StoreError>> {
        let now = super::now_ms();
        let mut state = self.lock();
        writes
            .iter()
            .map(|write| {
                apply(&mut *state, write, now)
                    .now_or_never()
                    .expect("the memory store's rows never wait")
            })
            .collect()
    }

    async fn head(&self) -> Result<Head, StoreError> {
        let state = self.lock();
        Ok(Head {
            revision: state.revision,
            compacted: state.compacted,
        })
    }

    async fn changes(&self, after: i64, filter: &KeyFilter) -> Result<ChangePage, StoreError> {
        let state = self.lock();
        // The log is in revision order: find the first change after `after` by bisection.
        let start = state.log.partition_point(|change| change.revision <= after);
        let mut changes = Vec::new();
        let mut through = state.revision;
        for change in state.log.range(start..) {
            if changes.len() == CHANGE_PAGE {
                // Served through the revision before this one, whole revisions only.
                through = change.revision - 1;
                while changes
                    .last()
                    .is_some_and(|last: &Change| last.revision == change.revision)
                {
                    changes.pop();
                }
                break;
            }
            if filter.matches(&change.key) {
                changes.push(change.clone());
            }
        }
        Ok(ChangePage {
            changes,
            through,
            compacted: state.compacted,
        })
    }
}

impl Rows for State {
    async fn revision(&mut self) -> Result<i64, StoreError> {
        Ok(self.revision)
    }

    async fn load(&mut self, key: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.entries.get(key).map(Entry::versioned))
    }

    async fn store(&mut self, key: &str, row: Versioned) -> Result<(), StoreError> {
        let entry = Entry {
            value: row.value.into_boxed_str(),
            version: row.version,
            revision: row.revision,
            expires_at: row.expires_at,
        };
        let replaced = match self.entries.get_key_value(key) {
            Some((shared, _)) => {
                let shared = shared.clone();
                self.entries
                    .insert(shared.clone(), entry)
                    .map(|old| (shared, old))
            }
            None => {
                let shared: Arc<str> = key.into();
                self.index.insert(shared.clone());
                if let Some(at) = entry.expires_at {
                    self.expiries.insert((at, shared.clone()));
                }
                self.entries.insert(shared, entry);
                None
            }
        };
        if let Some((shared, old)) = replaced {
            let new = self.entries[key].expires_at;
            if old.expires_at != new {
                if let Some(at) = old.expires_at {
                    self.expiries.remove(&(at, shared.clone()));
                }
                if let Some(at) = new {
                    self.expiries.insert((at, shared));
                }
            }
        }
        Ok(())
    }

    async fn remove(&mut self, key: &str) -> Result<(), StoreError> {
        if let Some((shared, entry)) = self.entries.remove_entry(key) {
            self.index.remove(key);
            if let Some(at) = entry.expires_at {
                self.expiries.remove(&(at, shared));
            }
        }
        Ok(())
    }

    async fn record(&mut self, _seq: i64, change: Change) -> Result<(), StoreError> {
        self.log.push_back(change);
        while self.log.len() > self.history {
            self.drop_oldest_change();
        }
        Ok(())
    }

    async fn set_revision(&mut self, revision: i64) -> Result<(), StoreError> {
        self.revision = revision;
        Ok(())
    }

    async fn due(&mut self, now: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self
            .expiries
            .iter()
            .take_while(|(at, _)| *at <= now)
            .take(limit)
            .map(|(_, key)| key.to_string())
            .collect())
    }

    async fn compact(&mut self, through: i64) -> Result<(), StoreError> {
        while self
            .log
            .front()
            .is_some_and(|change| change.revision <= through)
        {
            self.drop_oldest_change();
        }
        self.compacted = self.compacted.max(through);
        Ok(())
    }
}
