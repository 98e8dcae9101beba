//! The in-memory store (`--store mem`): the fastest, and gone when the process ends.
//!
//! Everything lives in one [`State`] behind one std mutex: the entries, the expiry queue, the
//! change log and the revision. One lock makes a transaction atomic for every reader (a listing
//! never sees half of one) and keeps the change log in revision order, at the price of puts on
//! different keys waiting for each other; the lock is held only for the table operations
//! themselves, never across an `.await` (see mini-redis's db.rs), so that wait is short. Writes run
//! [`super::apply`]'s rules on the locked state: the memory [`Rows`] never wait, so their futures
//! complete on the first poll, under the lock.
//!
//! Memory is what this store spends, so a key costs one allocation: an [`Entry`] packs the key,
//! its version, revision, expiry and value into one boxed byte slice, and one ordered set of
//! entries is both the lookup table and the index `list` walks. A hash table beside it would make
//! a get faster by a fraction of a microsecond, which no caller on the other end of a socket can
//! see, for some 40 bytes more per key.
//!
//! A poisoned lock is used anyway (`unwrap_or_else(PoisonError::into_inner)`), the policy of every
//! std mutex in the workspace's services: a section holding one only calls collection methods,
//! each of which leaves its collection whole, and refusing the lock would turn one failed request
//! into failing them all.

use std::{
    borrow::Borrow,
    cmp::Ordering,
    collections::{BTreeSet, VecDeque},
    ops::Bound,
    sync::{Mutex, MutexGuard, PoisonError},
};

use futures::FutureExt;

use super::{
    apply::apply, Change, ChangePage, Head, Item, KeyFilter, KvStore, Listing, Rows, StoreError,
    Versioned, Write, WriteOutcome, CHANGE_PAGE, DEFAULT_HISTORY,
};

pub struct MemoryStore {
    state: Mutex<State>,
}

/// The most bytes of keys and values the change log holds, whatever `--history` says: values
/// may be 1 MiB each, and `--history` copies of one need not fit in memory. Beyond it the oldest
/// changes go, as beyond `--history`, and a watcher resuming from before them gets a `reset`.
pub const HISTORY_BYTES: usize = 64 * 1024 * 1024;

/// What a change costs the log: its key and value, and the bookkeeping beside them.
fn change_bytes(change: &Change) -> usize {
    change.key.len() + change.value.as_ref().map_or(0, String::len) + size_of::<Change>()
}

/// One key and its row in one allocation, laid out as
/// `header (u16 LE) | key | version (i64 LE) | revision (i64 LE) | [expires_at (i64 LE)] | value`,
/// where the header holds the key's length and, in its top bit, whether an expiry follows.
/// Entries order, compare and are found by their key alone ([`Borrow<[u8]>`]).
struct Entry(Box<[u8]>);

/// The header bit saying the entry has an expiry.
const EXPIRES: u16 = 0x8000;
const HEADER: usize = 2;
const FIELD: usize = 8;

impl Entry {
    fn new(key: &str, row: &Versioned) -> Entry {
        // Keys are at most MAX_KEY_BYTES (1 KiB), checked before any write reaches a store.
        let mut header = u16::try_from(key.len())
            .ok()
            .filter(|len| len & EXPIRES == 0)
            .expect("keys are far shorter than 32 KiB");
        let fields = if row.expires_at.is_some() { 3 } else { 2 };
        let mut bytes = Vec::with_capacity(HEADER + key.len() + fields * FIELD + row.value.len());
        if row.expires_at.is_some() {
            header |= EXPIRES;
        }
        bytes.extend_from_slice(&header.to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&row.version.to_le_bytes());
        bytes.extend_from_slice(&row.revision.to_le_bytes());
        if let Some(at) = row.expires_at {
            bytes.extend_from_slice(&at.to_le_bytes());
        }
        bytes.extend_from_slice(row.value.as_bytes());
        Entry(bytes.into_boxed_slice())
    }

    fn header(&self) -> u16 {
        u16::from_le_bytes([self.0[0], self.0[1]])
    }

    fn key_end(&self) -> usize {
        HEADER + usize::from(self.header() & !EXPIRES)
    }

    fn key_bytes(&self) -> &[u8] {
        &self.0[HEADER..self.key_end()]
    }

    /// The entry's bytes were written from `str`s, so reading them back as text cannot fail.
    fn text(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).expect("entries are built from str")
    }

    fn key(&self) -> &str {
        Self::text(self.key_bytes())
    }

    /// The `n`th number after the key.
    fn field(&self, n: usize) -> i64 {
        let at = self.key_end() + n * FIELD;
        let mut number = [0; FIELD];
        number.copy_from_slice(&self.0[at..at + FIELD]);
        i64::from_le_bytes(number)
    }

    fn version(&self) -> i64 {
        self.field(0)
    }

    fn revision(&self) -> i64 {
        self.field(1)
    }

    fn expires_at(&self) -> Option<i64> {
        (self.header() & EXPIRES != 0).then(|| self.field(2))
    }

    fn value(&self) -> &str {
        let fields = if self.header() & EXPIRES != 0 { 3 } else { 2 };
        Self::text(&self.0[self.key_end() + fields * FIELD..])
    }

    fn live(&self, now: i64) -> bool {
        self.expires_at().is_none_or(|at| at > now)
    }

    fn versioned(&self) -> Versioned {
        Versioned {
            value: self.value().to_owned(),
            version: self.version(),
            revision: self.revision(),
            expires_at: self.expires_at(),
        }
    }
}

impl Borrow<[u8]> for Entry {
    fn borrow(&self) -> &[u8] {
        self.key_bytes()
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.key_bytes() == other.key_bytes()
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Entry) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    fn cmp(&self, other: &Entry) -> Ordering {
        self.key_bytes().cmp(other.key_bytes())
    }
}

struct State {
    /// Every key, in byte order (the order `list` promises).
    entries: BTreeSet<Entry>,
    /// The keys that expire, by expiry time.
    expiries: BTreeSet<(i64, Box<str>)>,
    /// The newest changes, oldest first.
    log: VecDeque<Change>,
    /// Changes the log keeps at most.
    history: usize,
    /// Bytes of keys and values the log keeps at most.
    history_bytes: usize,
    /// Bytes of keys and values in the log now.
    log_bytes: usize,
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

    /// A store whose change log keeps the newest `history` changes, within [`HISTORY_BYTES`].
    pub fn with_history(history: u64) -> Self {
        Self::with_limits(history, HISTORY_BYTES)
    }

    fn with_limits(history: u64, history_bytes: usize) -> Self {
        MemoryStore {
            state: Mutex::new(State {
                entries: BTreeSet::new(),
                expiries: BTreeSet::new(),
                log: VecDeque::new(),
                history: usize::try_from(history).unwrap_or(usize::MAX),
                history_bytes,
                log_bytes: 0,
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
            .get(key.as_bytes())
            .filter(|entry| entry.live(now))
    }

    fn drop_oldest_change(&mut self) {
        if let Some(oldest) = self.log.pop_front() {
            self.log_bytes -= change_bytes(&oldest);
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
            Some(after) if after >= prefix => Bound::Excluded(after.as_bytes()),
            _ => Bound::Included(prefix.as_bytes()),
        };
        let state = self.lock();
        let items = state
            .entries
            .range::<[u8], _>((start, Bound::Unbounded))
            .take_while(|entry| entry.key_bytes().starts_with(prefix.as_bytes()))
            .filter(|entry| entry.live(now))
            .map(|entry| Item {
                key: entry.key().to_owned(),
                value: entry.value().to_owned(),
                version: entry.version(),
                revision: entry.revision(),
                expires_at: entry.expires_at(),
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
        Ok(self.entries.get(key.as_bytes()).map(Entry::versioned))
    }

    async fn store(&mut self, key: &str, row: Versioned) -> Result<(), StoreError> {
        let old_expiry = self
            .entries
            .replace(Entry::new(key, &row))
            .and_then(|old| old.expires_at());
        if old_expiry != row.expires_at {
            if let Some(at) = old_expiry {
                self.expiries.remove(&(at, key.into()));
            }
            if let Some(at) = row.expires_at {
                self.expiries.insert((at, key.into()));
            }
        }
        Ok(())
    }

    async fn remove(&mut self, key: &str) -> Result<(), StoreError> {
        let old_expiry = self
            .entries
            .take(key.as_bytes())
            .and_then(|old| old.expires_at());
        if let Some(at) = old_expiry {
            self.expiries.remove(&(at, key.into()));
        }
        Ok(())
    }

    async fn record(&mut self, _seq: i64, change: Change) -> Result<(), StoreError> {
        self.log_bytes += change_bytes(&change);
        self.log.push_back(change);
        while self.log.len() > self.history || self.log_bytes > self.history_bytes {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(value: &str, expires_at: Option<i64>) -> Versioned {
        Versioned {
            value: value.to_owned(),
            version: 7,
            revision: i64::MAX - 1,
            expires_at,
        }
    }

    #[test]
    fn an_entry_gives_back_what_it_was_built_from() {
        for (key, value, expires_at) in [
            ("k", "", None),
            ("clé/é", "välue, with ünïcode", Some(-5)),
            ("k", "v", Some(1_700_000_000_000)),
        ] {
            let entry = Entry::new(key, &row(value, expires_at));
            assert_eq!(entry.key(), key);
            assert_eq!(entry.versioned(), row(value, expires_at));
        }
        let longest = "k".repeat(crate::core::MAX_KEY_BYTES);
        assert_eq!(Entry::new(&longest, &row("v", Some(1))).key(), longest);
    }

    #[test]
    fn the_change_log_is_bounded_by_bytes_as_well_as_by_count() {
        let change_size = change_bytes(&change(1, 1_000));
        let store = MemoryStore::with_limits(1_000, 10 * change_size);
        let mut state = store.lock();
        for revision in 1..=100 {
            state
                .record(0, change(revision, 1_000))
                .now_or_never()
                .unwrap()
                .unwrap();
        }
        assert_eq!(state.log.len(), 10);
        assert_eq!(state.log_bytes, 10 * change_size);
        assert_eq!(state.compacted, 90);
        assert_eq!(state.log.front().map(|change| change.revision), Some(91));
    }

    fn change(revision: i64, value_bytes: usize) -> Change {
        Change {
            revision,
            kind: super::super::ChangeKind::Put,
            key: "k".into(),
            value: Some("v".repeat(value_bytes)),
            version: revision,
        }
    }

    #[test]
    fn entries_are_ordered_and_found_by_their_key_alone() {
        let mut entries = BTreeSet::new();
        entries.insert(Entry::new("b", &row("1", None)));
        entries.insert(Entry::new("a", &row("zzz", Some(3))));
        entries.insert(Entry::new("ab", &row("", None)));
        let replaced = entries.replace(Entry::new("a", &row("new", None)));
        assert_eq!(
            replaced.map(|old| old.value().to_owned()),
            Some("zzz".into())
        );
        let keys: Vec<&str> = entries.iter().map(Entry::key).collect();
        assert_eq!(keys, ["a", "ab", "b"]);
        assert_eq!(entries.get(b"a".as_slice()).map(Entry::value), Some("new"));
        assert!(!entries.contains(b"c".as_slice()));
    }
}
