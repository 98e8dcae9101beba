//! Where the data lives: the [`KvStore`] trait and its three backends.
//!
//! The trait is the whole contract the core relies on, and every backend keeps it the same way
//! (tests/store_contract.rs runs one suite against all three):
//! - each key carries a version: 1 when it is created, plus one on every replace, and the
//!   `revision` of its last change;
//! - the store has one revision, strictly increasing: every change (a put, a delete, an expiry, a
//!   transaction as a whole) takes the next one and is recorded in the change log under it, so a
//!   watcher reading the log after revision N sees every later change once, in order;
//! - every write is one atomic step that also decides its revision: a locked state (memory), the
//!   single writer (SQLite), or a transaction that first locks the one revision row
//!   (PostgreSQL, so replicas sharing the database serialize their writes and commit in revision
//!   order, which a log reader relies on to never miss a revision committed late);
//! - a key past its `expires_at` is absent for every reader at once; the write that next meets it,
//!   or the background sweep, removes it with an `expire` change;
//! - keys are listed in byte order, which for UTF-8 is code point order;
//! - with SQLite and PostgreSQL, a write has been committed to disk when it returns.
//!
//! The rules of a write (conditions, transactions, expiry) are written once, in [`apply`], over
//! the small [`Rows`] trait each backend implements: the SQL stores with statements inside a
//! database transaction, the memory store on its locked state (its futures never wait, so it
//! polls them to completion under the lock).
//!
//! [`KvBackend`] picks a backend at run time from the `--store` flag, as an enum rather than a
//! boxed trait object, so the in-memory hot path costs no allocation or indirect call. The SQL
//! stores run the same statements ([`sql`]): sqlx numbers `$1`, `$2`... for SQLite as PostgreSQL
//! does.

#[macro_use]
mod apply;
mod memory;
mod postgres;
mod sqlite;

use std::{
    future::Future,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub use shared::postgres::StoreFailure;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use apply::Rows;
pub use memory::MemoryStore;
pub use postgres::{follow_revisions, PostgresStore};
pub use sqlite::SqliteStore;

/// Changes the change log keeps by default (`--history`).
pub const DEFAULT_HISTORY: u64 = 100_000;

/// The operations a transaction holds at most (compares, success and failure together).
pub const MAX_TXN_OPS: usize = 128;

/// Milliseconds since the Unix epoch: how expiry times are stored and compared.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
        })
}

/// The expiry time of a key written now with `ttl`.
pub fn expiry_after(ttl: Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX))
}

/// A stored value, its version, the revision of its last change, and when it expires (ms since
/// the epoch; `None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: String,
    pub version: i64,
    pub revision: i64,
    pub expires_at: Option<i64>,
}

impl Versioned {
    fn expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub key: String,
    pub value: String,
    pub version: i64,
    pub revision: i64,
    pub expires_at: Option<i64>,
}

/// A page of keys and the store's revision when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub items: Vec<Item>,
    pub revision: i64,
}

/// When a put may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Insert or replace.
    Always,
    /// Replace only if the key exists with this version.
    IfVersion(i64),
    /// Insert only if the key does not exist.
    IfAbsent,
}

/// What a put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The value was written and has this version now, at this revision.
    Written { version: i64, revision: i64 },
    /// The condition did not hold; `current` is the key's version (`None`: absent).
    Conflict { current: Option<i64> },
}

/// One write (see [`KvStore::write_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put {
        key: String,
        value: String,
        condition: Condition,
        /// When the key expires (ms since the epoch); `None` makes it permanent.
        expires_at: Option<i64>,
    },
    Delete {
        key: String,
    },
    Txn(Txn),
    /// Removes up to `limit` keys whose time has come, each with an `expire` change.
    ExpireDue {
        limit: usize,
    },
    /// Drops the change log's entries older than the newest `keep` revisions.
    Compact {
        keep: u64,
    },
}

/// What one write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Put(PutOutcome),
    /// The revision of the delete, or `None` when the key was absent.
    Delete(Option<i64>),
    Txn(TxnOutcome),
    /// How many keys expired, and the store's revision after them.
    Expired {
        count: usize,
        revision: i64,
    },
    Compacted,
}

impl WriteOutcome {
    /// The revision this write took, if it changed anything.
    pub fn revision(&self) -> Option<i64> {
        match self {
            WriteOutcome::Put(PutOutcome::Written { revision, .. }) => Some(*revision),
            WriteOutcome::Delete(revision) => *revision,
            WriteOutcome::Txn(outcome) => Some(outcome.revision),
            WriteOutcome::Expired { count, revision } => (*count > 0).then_some(*revision),
            WriteOutcome::Put(PutOutcome::Conflict { .. }) | WriteOutcome::Compacted => None,
        }
    }
}

/// A transaction: `success` applies when every compare holds, else `failure`, as one change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    /// Every key the transaction names.
    fn keys(&self) -> impl Iterator<Item = &str> {
        let compared = self.compare.iter().map(|compare| compare.key.as_str());
        let touched = self.success.iter().chain(&self.failure).map(Op::key);
        compared.chain(touched)
    }
}

/// One compare of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    pub key: String,
    pub test: Test,
}

/// What a compare checks of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// The key exists with this version.
    Version(i64),
    /// The key exists (true) or not (false).
    Exists(bool),
    /// The key exists with this value.
    Value(String),
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: String,
        expires_at: Option<i64>,
    },
    Delete {
        key: String,
    },
    Get {
        key: String,
    },
}

impl Op {
    pub fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key,
        }
    }
}

/// What one operation of a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Put {
        key: String,
        version: i64,
        revision: i64,
        expires_at: Option<i64>,
    },
    Delete {
        key: String,
        deleted: bool,
    },
    Get {
        key: String,
        found: Option<Versioned>,
    },
}

/// What a transaction did: which branch ran, the store's revision after it (the transaction's
/// own when it changed anything), and one result per operation of that branch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    pub succeeded: bool,
    pub revision: i64,
    pub results: Vec<OpResult>,
}

/// What a change did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Put,
    Delete,
    Expire,
}

impl ChangeKind {
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Put => "put",
            ChangeKind::Delete => "delete",
            ChangeKind::Expire => "expire",
        }
    }

    fn code(self) -> i64 {
        match self {
            ChangeKind::Put => 0,
            ChangeKind::Delete => 1,
            ChangeKind::Expire => 2,
        }
    }

    fn from_code(code: i64) -> Result<ChangeKind, StoreError> {
        match code {
            0 => Ok(ChangeKind::Put),
            1 => Ok(ChangeKind::Delete),
            2 => Ok(ChangeKind::Expire),
            _ => Err(StoreError::Corrupt),
        }
    }
}

/// One entry of the change log: a key's change at a revision. `value` is the new value of a put;
/// `version` is the key's version after a put, or the last it had before a delete or expiry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub revision: i64,
    pub kind: ChangeKind,
    pub key: String,
    pub value: Option<String>,
    pub version: i64,
}

/// Which keys a watcher follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFilter {
    Key(String),
    Prefix(String),
}

impl KeyFilter {
    pub fn matches(&self, key: &str) -> bool {
        match self {
            KeyFilter::Key(wanted) => key == wanted,
            KeyFilter::Prefix(prefix) => key.starts_with(prefix.as_str()),
        }
    }

    /// The key range `[lower, upper)` holding exactly the keys that match.
    fn range(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            KeyFilter::Key(key) => {
                let mut upper = key.as_bytes().to_vec();
                upper.push(0);
                (key.as_bytes().to_vec(), Some(upper))
            }
            KeyFilter::Prefix(prefix) => (
                prefix.as_bytes().to_vec(),
                prefix_upper_bound(prefix.as_bytes()),
            ),
        }
    }
}

/// A page of the change log read after some revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangePage {
    /// The matching changes, in revision order.
    pub changes: Vec<Change>,
    /// Every change up to this revision has been looked at: the next read starts after it.
    pub through: i64,
    /// Changes up to this revision are gone from the log: a reader asking for changes after an
    /// older revision would miss some.
    pub compacted: i64,
}

/// The store's revision, and the highest revision the change log no longer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub revision: i64,
    pub compacted: i64,
}

/// Changes a page of the change log holds at most. Above [`MAX_TXN_OPS`], so that the changes of
/// one revision always fit in a page.
pub const CHANGE_PAGE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A PostgreSQL operation that failed, saying whether it may have been applied.
    #[error(transparent)]
    Failed(#[from] StoreFailure),
    /// The start-up check refused the SQLite file; the message names it and the damage.
    #[error(transparent)]
    Damaged(#[from] shared::sqlite::CheckError),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored data is not valid UTF-8")]
    Corrupt,
    #[error("the store is shutting down")]
    Closed,
}

/// The operations the core needs from a backend. See the module docs for the guarantees.
pub trait KvStore: Send + Sync {
    /// The key's value, unless it is absent or expired.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>, StoreError>> + Send;

    /// Up to `limit` live entries whose key starts with `prefix` and sorts after `after`, in key
    /// order, with the store's revision.
    fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    /// Applies writes as if one after the other, in order, with one result each. A store that
    /// queues its writes (SQLite) takes them all at once, so they share a commit.
    fn write_batch(
        &self,
        writes: Vec<Write>,
    ) -> impl Future<Output = Vec<Result<WriteOutcome, StoreError>>> + Send;

    /// The store's revision and how far the change log was compacted.
    fn head(&self) -> impl Future<Output = Result<Head, StoreError>> + Send;

    /// Up to [`CHANGE_PAGE`] changes after revision `after` to keys `filter` matches.
    fn changes(
        &self,
        after: i64,
        filter: &KeyFilter,
    ) -> impl Future<Output = Result<ChangePage, StoreError>> + Send;

    /// One write on its own.
    fn write(&self, write: Write) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send {
        async move {
            self.write_batch(vec![write])
                .await
                .pop()
                .unwrap_or(Err(StoreError::Closed))
        }
    }

    /// Writes `value` under `key` if `condition` holds; the key becomes permanent.
    fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> impl Future<Output = Result<PutOutcome, StoreError>> + Send {
        self.put_expiring(key, value, condition, None)
    }

    /// Writes `value` under `key` if `condition` holds, expiring at `expires_at`.
    fn put_expiring(
        &self,
        key: &str,
        value: String,
        condition: Condition,
        expires_at: Option<i64>,
    ) -> impl Future<Output = Result<PutOutcome, StoreError>> + Send {
        let write = Write::Put {
            key: key.to_owned(),
            value,
            condition,
            expires_at,
        };
        async move {
            match self.write(write).await? {
                WriteOutcome::Put(outcome) => Ok(outcome),
                other => unreachable!("a put is answered with a put outcome, not {other:?}"),
            }
        }
    }

    /// Removes the key; the delete's revision, or `None` when it was absent.
    fn delete(&self, key: &str) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send {
        let write = Write::Delete {
            key: key.to_owned(),
        };
        async move {
            match self.write(write).await? {
                WriteOutcome::Delete(revision) => Ok(revision),
                other => unreachable!("a delete is answered with a delete outcome, not {other:?}"),
            }
        }
    }

    /// Applies a transaction.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<TxnOutcome, StoreError>> + Send {
        async move {
            match self.write(Write::Txn(txn)).await? {
                WriteOutcome::Txn(outcome) => Ok(outcome),
                other => unreachable!("a transaction is answered with its outcome, not {other:?}"),
            }
        }
    }
}

pub use shared::store_spec::{StoreCheck, StoreOptions, StoreSpec};

/// The `--store` flag's values: those of [`StoreSpec`], plus the original design's word `rdb`
/// (= `sqlite:kv.db`).
pub fn parse_store_flag(flag: &str) -> Result<StoreSpec, String> {
    match flag {
        "rdb" => Ok(StoreSpec::Sqlite("kv.db".into())),
        other => other.parse(),
    }
}

/// The backend chosen by `--store`.
pub enum KvBackend {
    Memory(MemoryStore),
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// Calls the same method on whichever backend this is.
macro_rules! each_backend {
    ($backend:expr, $store:ident => $call:expr) => {
        match $backend {
            KvBackend::Memory($store) => $call,
            KvBackend::Sqlite($store) => $call,
            KvBackend::Postgres($store) => $call,
        }
    };
}

impl KvBackend {
    /// Opens (or creates) the store and applies its migrations, with the default history.
    pub async fn open(spec: &StoreSpec, options: StoreOptions) -> Result<KvBackend, StoreError> {
        Self::open_with_history(spec, options, DEFAULT_HISTORY).await
    }

    /// Opens the store; the memory store keeps the newest `history` changes (the SQL stores
    /// are compacted to it by [`Write::Compact`]).
    pub async fn open_with_history(
        spec: &StoreSpec,
        options: StoreOptions,
        history: u64,
    ) -> Result<KvBackend, StoreError> {
        Ok(match spec {
            StoreSpec::Memory => KvBackend::Memory(MemoryStore::with_history(history)),
            StoreSpec::Sqlite(path) => KvBackend::Sqlite(SqliteStore::open(path, options).await?),
            StoreSpec::Postgres(url) => {
                let store = PostgresStore::open(url, postgres::MAX_CONNECTIONS, options).await?;
                store.migrate(&postgres::MIGRATIONS).await?;
                KvBackend::Postgres(store)
            }
        })
    }

    /// Whether [`KvStore::write_batch`] is worth calling: the store queues writes, so a batch
    /// shares one commit instead of waiting for one commit per write.
    pub fn queues_writes(&self) -> bool {
        matches!(self, KvBackend::Sqlite(_))
    }

    /// Whether the store answers, kept up to date, for the stores that can be away (PostgreSQL);
    /// `None` for those that are always there.
    pub fn follow_readiness(&self, shutdown: CancellationToken) -> Option<watch::Receiver<bool>> {
        match self {
            KvBackend::Postgres(store) => Some(store.follow_readiness(shutdown)),
            KvBackend::Memory(_) | KvBackend::Sqlite(_) => None,
        }
    }

    /// Finishes pending writes and closes database connections.
    pub async fn close(&self) {
        match self {
            KvBackend::Memory(_) => {}
            KvBackend::Sqlite(store) => store.close().await,
            KvBackend::Postgres(store) => store.close().await,
        }
    }
}

impl KvStore for KvBackend {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        each_backend!(self, store => store.get(key).await)
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Listing, StoreError> {
        each_backend!(self, store => store.list(prefix, after, limit).await)
    }

    async fn write_batch(&self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, StoreError>> {
        each_backend!(self, store => store.write_batch(writes).await)
    }

    async fn head(&self) -> Result<Head, StoreError> {
        each_backend!(self, store => store.head().await)
    }

    async fn changes(&self, after: i64, filter: &KeyFilter) -> Result<ChangePage, StoreError> {
        each_backend!(self, store => store.changes(after, filter).await)
    }
}

/// Moves `head` forward to `revision`, never back (writes finishing on several tasks, and
/// notifications and reads of other replicas' writes, may report revisions out of order).
pub fn advance(head: &watch::Sender<i64>, revision: i64) {
    head.send_if_modified(|current| {
        let newer = revision > *current;
        if newer {
            *current = revision;
        }
        newer
    });
}

/// The smallest byte string greater than every string starting with `prefix`, or `None` when
/// there is none (empty prefix, or only 0xFF bytes, which UTF-8 never contains). SQL stores scan
/// the key range `[prefix, upper)`, which is exactly the keys with that prefix.
fn prefix_upper_bound(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut upper = prefix.to_vec();
    while let Some(last) = upper.pop() {
        if last < u8::MAX {
            upper.push(last + 1);
            return Some(upper);
        }
    }
    None
}

/// Turns a stored byte column back into a string.
fn utf8(bytes: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(bytes).map_err(|_| StoreError::Corrupt)
}

/// A value as the SQL stores keep it: bytes, so that keys sort by bytes in every store.
#[derive(sqlx::FromRow)]
struct ValueRow {
    value: Vec<u8>,
    version: i64,
    revision: i64,
    expires_at: Option<i64>,
}

impl ValueRow {
    fn into_versioned(self) -> Result<Versioned, StoreError> {
        Ok(Versioned {
            value: utf8(self.value)?,
            version: self.version,
            revision: self.revision,
            expires_at: self.expires_at,
        })
    }
}

/// A listing entry as the SQL stores keep it.
#[derive(sqlx::FromRow)]
struct ItemRow {
    key: Vec<u8>,
    value: Vec<u8>,
    version: i64,
    revision: i64,
    expires_at: Option<i64>,
}

impl ItemRow {
    fn into_item(self) -> Result<Item, StoreError> {
        Ok(Item {
            key: utf8(self.key)?,
            value: utf8(self.value)?,
            version: self.version,
            revision: self.revision,
            expires_at: self.expires_at,
        })
    }
}

/// Listing rows of the SQL stores as [`Item`]s.
fn items(rows: Vec<ItemRow>) -> Result<Vec<Item>, StoreError> {
    rows.into_iter().map(ItemRow::into_item).collect()
}

/// A change log row as the SQL stores keep it.
#[derive(sqlx::FromRow)]
struct ChangeRow {
    revision: i64,
    kind: i64,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    version: i64,
}

impl ChangeRow {
    fn into_change(self) -> Result<Change, StoreError> {
        Ok(Change {
            revision: self.revision,
            kind: ChangeKind::from_code(self.kind)?,
            key: utf8(self.key)?,
            value: self.value.map(utf8).transpose()?,
            version: self.version,
        })
    }
}

/// A page of change log rows read up to `head`: see [`ChangePage::through`]. A full page may end
/// inside a revision (a transaction's changes share one); that revision is then left for the
/// next page, so that a reader never resumes in the middle of one.
fn change_page(rows: Vec<ChangeRow>, head: Head) -> Result<ChangePage, StoreError> {
    let mut changes = rows
        .into_iter()
        .map(ChangeRow::into_change)
        .collect::<Result<Vec<_>, _>>()?;
    let through = trim_to_whole_revisions(&mut changes, head.revision);
    Ok(ChangePage {
        changes,
        through,
        compacted: head.compacted,
    })
}

/// Given up to [`CHANGE_PAGE`] changes read up to `head`, drops a trailing partial revision of
/// a full page and returns the revision the page covers through.
fn trim_to_whole_revisions(changes: &mut Vec<Change>, head: i64) -> i64 {
    if changes.len() < CHANGE_PAGE {
        return head;
    }
    let last = changes.last().map_or(head, |change| change.revision);
    let whole = changes.iter().take_while(|c| c.revision < last).count();
    if whole == 0 {
        // One revision fills the page (cannot happen: a revision has at most MAX_TXN_OPS
        // changes), so it is served whole.
        return last;
    }
    changes.truncate(whole);
    last - 1
}

/// The statements of the SQL stores, written once for both.
mod sql {
    pub const GET: &str = "SELECT value, version, revision, expires_at FROM kv
        WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)";

    /// A row whatever its expiry, for a write.
    pub const LOAD: &str = "SELECT value, version, revision, expires_at FROM kv WHERE key = $1";

    pub const STORE: &str = "INSERT INTO kv (key, value, version, revision, expires_at)
        VALUES ($1, $2, $3, $4, $5)
        ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = excluded.version,
            revision = excluded.revision, expires_at = excluded.expires_at";

    pub const REMOVE: &str = "DELETE FROM kv WHERE key = $1";

    pub const RECORD: &str = "INSERT INTO kv_log (revision, seq, key, kind, value, version)
        VALUES ($1, $2, $3, $4, $5, $6)";

    pub const HEAD: &str = "SELECT revision, compacted FROM kv_meta WHERE id = 1";

    /// The revision, for a write (SQLite has one writer, which needs no lock).
    pub const HEAD_REVISION: &str = "SELECT revision FROM kv_meta WHERE id = 1";

    /// The revision, locked until the transaction ends: PostgreSQL writers, from any replica,
    /// take turns here, so they commit in revision order.
    pub const LOCK_REVISION: &str = "SELECT revision FROM kv_meta WHERE id = 1 FOR UPDATE";

    /// Sets the revision and announces it to the replicas listening (see
    /// `postgres::follow_revisions`): the channel carries revisions, never values.
    pub const SET_REVISION_AND_NOTIFY: &str = "WITH updated AS (
            UPDATE kv_meta SET revision = $1 WHERE id = 1 RETURNING revision
        )
        SELECT pg_notify('kv_revision', revision::text) FROM updated";

    pub const SET_REVISION: &str = "UPDATE kv_meta SET revision = $1 WHERE id = 1";

    pub const DUE: &str =
        "SELECT key FROM kv WHERE expires_at <= $1 ORDER BY expires_at, key LIMIT $2";

    pub const COMPACT_LOG: &str = "DELETE FROM kv_log WHERE revision <= $1";

    pub const SET_COMPACTED: &str =
        "UPDATE kv_meta SET compacted = $1 WHERE id = 1 AND compacted < $1";

    /// Binds the revision to read after, the head to read up to, the key range and the limit.
    pub const CHANGES: &str = "SELECT revision, kind, key, value, version FROM kv_log
        WHERE revision > $1 AND revision <= $2 AND key >= $3 AND (key < $4 OR $4 IS NULL)
        ORDER BY revision, seq LIMIT $5";

    /// Binds the lower bound (see [`super::lower_bound`]), the upper bound or NULL, the limit
    /// and the time now.
    pub fn list(inclusive: bool) -> &'static str {
        if inclusive {
            "SELECT key, value, version, revision, expires_at FROM kv
             WHERE key >= $1 AND (key < $2 OR $2 IS NULL)
                AND (expires_at IS NULL OR expires_at > $4)
             ORDER BY key LIMIT $3"
        } else {
            "SELECT key, value, version, revision, expires_at FROM kv
             WHERE key > $1 AND (key < $2 OR $2 IS NULL)
                AND (expires_at IS NULL OR expires_at > $4)
             ORDER BY key LIMIT $3"
        }
    }
}

/// The lowest key a listing may return: past `after`, and at or past the prefix.
fn lower_bound<'a>(prefix: &'a str, after: Option<&'a str>) -> (&'a [u8], bool) {
    match after {
        // Strictly after `after`, which also covers the prefix when `after` sorts above it.
        Some(after) if after >= prefix => (after.as_bytes(), false),
        _ => (prefix.as_bytes(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upper_bound_of_a_prefix() {
        assert_eq!(prefix_upper_bound(b""), None);
        assert_eq!(prefix_upper_bound(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_upper_bound(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_upper_bound(b"\xff\xff"), None);
    }

    #[test]
    fn store_flag_values() {
        assert_eq!(
            parse_store_flag("rdb"),
            Ok(StoreSpec::Sqlite("kv.db".into()))
        );
        assert_eq!(parse_store_flag("mem"), Ok(StoreSpec::Memory));
        assert!(parse_store_flag("redis://x").is_err());
    }
}
