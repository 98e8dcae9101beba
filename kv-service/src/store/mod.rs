//! Where the data lives: the [`KvStore`] trait and its three backends.
//!
//! The trait is the whole contract the core relies on, and every backend keeps it the same way
//! (tests/store_contract.rs runs one suite against all three):
//! - each key carries a version: 1 when it is created, plus one on every replace. A put is one
//!   atomic step (a locked map, or a single `INSERT ... ON CONFLICT ... RETURNING` statement), so
//!   concurrent puts on one key never lose an increment;
//! - conditional puts ([`Condition`]) check and write in that same step;
//! - keys are listed in byte order, which for UTF-8 is code point order;
//! - with SQLite and PostgreSQL, a put has been committed to disk when it returns.
//!
//! [`KvBackend`] picks a backend at run time from the `--store` flag, as an enum rather than a
//! boxed trait object, so the in-memory hot path costs no allocation or indirect call. The SQL
//! stores run the same statements ([`sql`]): sqlx numbers `$1`, `$2`... for SQLite as PostgreSQL
//! does.

mod memory;
mod postgres;
mod sqlite;

use std::future::Future;

pub use shared::postgres::StoreFailure;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use memory::MemoryStore;
pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// A stored value and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: String,
    pub version: i64,
}

/// One entry of a listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Item {
    pub key: String,
    pub value: String,
    pub version: i64,
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
    /// The value was written and has this version now.
    Written { version: i64 },
    /// The condition did not hold; `current` is the key's version (`None`: absent).
    Conflict { current: Option<i64> },
}

/// One write of a batch (see [`KvStore::write_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put {
        key: String,
        value: String,
        condition: Condition,
    },
    Delete {
        key: String,
    },
}

/// What one write of a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Put(PutOutcome),
    /// Whether the key existed.
    Delete(bool),
}

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
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Versioned>, StoreError>> + Send;

    fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> impl Future<Output = Result<PutOutcome, StoreError>> + Send;

    /// Removes the key; false when it was absent.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Up to `limit` entries whose key starts with `prefix` and sorts after `after`, in key order.
    fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Item>, StoreError>> + Send;

    /// Applies writes as if one after the other, in order, with one result each. A store that
    /// queues its writes (SQLite) takes them all at once, so they share a commit.
    fn write_batch(
        &self,
        writes: Vec<Write>,
    ) -> impl Future<Output = Vec<Result<WriteOutcome, StoreError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(writes.len());
            for write in writes {
                results.push(match write {
                    Write::Put {
                        key,
                        value,
                        condition,
                    } => self
                        .put(&key, value, condition)
                        .await
                        .map(WriteOutcome::Put),
                    Write::Delete { key } => self.delete(&key).await.map(WriteOutcome::Delete),
                });
            }
            results
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

impl KvBackend {
    /// Opens (or creates) the store and applies its migrations.
    pub async fn open(spec: &StoreSpec, options: StoreOptions) -> Result<KvBackend, StoreError> {
        Ok(match spec {
            StoreSpec::Memory => KvBackend::Memory(MemoryStore::new()),
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
        match self {
            KvBackend::Memory(store) => store.get(key).await,
            KvBackend::Sqlite(store) => store.get(key).await,
            KvBackend::Postgres(store) => store.get(key).await,
        }
    }

    async fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> Result<PutOutcome, StoreError> {
        match self {
            KvBackend::Memory(store) => store.put(key, value, condition).await,
            KvBackend::Sqlite(store) => store.put(key, value, condition).await,
            KvBackend::Postgres(store) => store.put(key, value, condition).await,
        }
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            KvBackend::Memory(store) => store.delete(key).await,
            KvBackend::Sqlite(store) => store.delete(key).await,
            KvBackend::Postgres(store) => store.delete(key).await,
        }
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        match self {
            KvBackend::Memory(store) => store.list(prefix, after, limit).await,
            KvBackend::Sqlite(store) => store.list(prefix, after, limit).await,
            KvBackend::Postgres(store) => store.list(prefix, after, limit).await,
        }
    }

    async fn write_batch(&self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, StoreError>> {
        match self {
            KvBackend::Memory(store) => store.write_batch(writes).await,
            KvBackend::Sqlite(store) => store.write_batch(writes).await,
            KvBackend::Postgres(store) => store.write_batch(writes).await,
        }
    }
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
}

impl ValueRow {
    fn into_versioned(self) -> Result<Versioned, StoreError> {
        Ok(Versioned {
            value: utf8(self.value)?,
            version: self.version,
        })
    }
}

/// A listing entry as the SQL stores keep it.
#[derive(sqlx::FromRow)]
struct ItemRow {
    key: Vec<u8>,
    value: Vec<u8>,
    version: i64,
}

impl ItemRow {
    fn into_item(self) -> Result<Item, StoreError> {
        Ok(Item {
            key: utf8(self.key)?,
            value: utf8(self.value)?,
            version: self.version,
        })
    }
}

/// Listing rows of the SQL stores as [`Item`]s.
fn items(rows: Vec<ItemRow>) -> Result<Vec<Item>, StoreError> {
    rows.into_iter().map(ItemRow::into_item).collect()
}

/// The statements of the SQL stores, written once for both.
mod sql {
    use super::Condition;

    pub const GET: &str = "SELECT value, version FROM kv WHERE key = $1";

    pub const VERSION: &str = "SELECT version FROM kv WHERE key = $1";

    pub const DELETE: &str = "DELETE FROM kv WHERE key = $1";

    /// Binds the key, the value and (for [`Condition::IfVersion`]) the expected version; returns
    /// the new version, or no row when the condition does not hold.
    pub fn put(condition: Condition) -> &'static str {
        match condition {
            Condition::Always => {
                "INSERT INTO kv (key, value, version) VALUES ($1, $2, 1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value, version = kv.version + 1
                 RETURNING version"
            }
            Condition::IfVersion(_) => {
                "UPDATE kv SET value = $2, version = version + 1
                 WHERE key = $1 AND version = $3 RETURNING version"
            }
            Condition::IfAbsent => {
                "INSERT INTO kv (key, value, version) VALUES ($1, $2, 1)
                 ON CONFLICT (key) DO NOTHING RETURNING version"
            }
        }
    }

    /// Binds the lower bound (see [`super::lower_bound`]), the upper bound or NULL, and the
    /// limit.
    pub fn list(inclusive: bool) -> &'static str {
        if inclusive {
            "SELECT key, value, version FROM kv
             WHERE key >= $1 AND (key < $2 OR $2 IS NULL) ORDER BY key LIMIT $3"
        } else {
            "SELECT key, value, version FROM kv
             WHERE key > $1 AND (key < $2 OR $2 IS NULL) ORDER BY key LIMIT $3"
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
