//! Where notices live: the [`Store`] trait and its three backends (memory, SQLite, PostgreSQL).
//!
//! Every backend gives notices ids from one increasing sequence that is never reused (retention
//! deletes old rows, so a plain "max + 1" would hand out an id twice), stores a notice before the
//! caller acknowledges it, and moves a due scheduled notice into the notices in one atomic step,
//! so a scheduled notice is published exactly once even when the service restarts or several
//! instances share a database.

#[cfg(test)]
pub(crate) mod conformance;
mod memory;
mod postgres;
mod sqlite;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::notice::{Interest, NewNotice, Notice, Whispers};

pub use memory::MemoryStore;
pub use postgres::{PostgresStore, PUBLISHED_CHANNEL};
pub use sqlite::SqliteStore;

/// Which notices a query returns (always those with an id above `after`, in id order), before
/// the whisper rule of [`NoticeQuery::whispers`] removes what the reader may not see.
#[derive(Debug, Clone)]
pub enum Selector {
    All,
    /// Every notice carrying this topic (the listing route's filter).
    Topic(String),
    /// What one subscriber is entitled to (replay).
    Interest(Interest),
}

#[derive(Debug, Clone)]
pub struct NoticeQuery {
    pub after: i64,
    pub limit: u32,
    pub selector: Selector,
    /// Which whispers the reader may see. Not optional: every query says who reads, so none
    /// can show a whisper to someone it is not for.
    pub whispers: Whispers,
}

impl NoticeQuery {
    /// True when `notice` is in the query's answer (ids and limit aside): the rule the SQL
    /// stores write in SQL.
    pub fn matches(&self, notice: &Notice) -> bool {
        self.whispers.admits(notice)
            && match &self.selector {
                Selector::All => true,
                Selector::Topic(topic) => notice.topic.as_deref() == Some(topic.as_str()),
                Selector::Interest(interest) => interest.wants(notice),
            }
    }
}

/// The cap on stored notices. `None` means no cap of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub max_count: Option<u64>,
    pub max_age: Option<Duration>,
}

impl Retention {
    /// Notices created before this instant are past the age cap.
    pub fn age_cutoff(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let age = chrono::Duration::from_std(self.max_age?).ok()?;
        now.checked_sub_signed(age)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Full(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Stores a notice now and returns it with its id.
    async fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> Result<Notice, StoreError>;

    /// Keeps a notice to be published at `at` (see [`Store::claim_due`]).
    async fn schedule(&self, notice: NewNotice, at: DateTime<Utc>) -> Result<(), StoreError>;

    /// The earliest time a scheduled notice is due, if any is waiting.
    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Atomically turns up to `limit` scheduled notices due at `now` into stored notices (with
    /// fresh ids, in due order) and returns them. A notice is claimed by exactly one caller.
    async fn claim_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Notice>, StoreError>;

    async fn query(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError>;

    /// An id that every notice committed from now on will exceed: the largest committed id
    /// (0 when none). The cluster fan-out starts reading after it.
    async fn last_id(&self) -> Result<i64, StoreError>;

    /// Deletes notices beyond the retention cap and returns how many went.
    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError>;
}

pub use shared::store_spec::StoreSpec;

/// An opened store; PostgreSQL also hands out its pool, which the cluster layer uses for
/// LISTEN/NOTIFY and presence.
pub struct OpenedStore {
    pub store: Arc<dyn Store>,
    pub postgres: Option<sqlx::PgPool>,
}

/// Opens (and migrates) the store a spec names.
pub async fn open(spec: &StoreSpec) -> Result<OpenedStore, StoreError> {
    Ok(match spec {
        StoreSpec::Memory => OpenedStore {
            store: Arc::new(MemoryStore::default()),
            postgres: None,
        },
        StoreSpec::Sqlite(path) => OpenedStore {
            store: Arc::new(SqliteStore::open(path).await?),
            postgres: None,
        },
        StoreSpec::Postgres(url) => {
            let store = PostgresStore::open(url).await?;
            let pool = store.pool().clone();
            OpenedStore {
                store: Arc::new(store),
                postgres: Some(pool),
            }
        }
    })
}

/// Row shape shared by the SQL backends; `recipient` is the `to` field and `sender` the `from`
/// field (both SQL keywords).
#[derive(sqlx::FromRow)]
struct NoticeRow {
    id: i64,
    message: String,
    topic: Option<String>,
    recipient: Option<String>,
    sender: Option<String>,
    created_at: i64,
}

impl From<NoticeRow> for Notice {
    fn from(row: NoticeRow) -> Notice {
        Notice {
            id: row.id,
            message: row.message,
            topic: row.topic,
            to: row.recipient,
            from: row.sender,
            created_at: crate::notice::from_millis(row.created_at),
        }
    }
}

#[derive(sqlx::FromRow)]
struct ScheduledRow {
    id: i64,
    message: String,
    topic: Option<String>,
    recipient: Option<String>,
    sender: Option<String>,
    due_at: i64,
}

impl ScheduledRow {
    fn into_new(self) -> NewNotice {
        NewNotice {
            message: self.message,
            topic: self.topic,
            to: self.recipient,
            from: self.sender,
        }
    }
}
