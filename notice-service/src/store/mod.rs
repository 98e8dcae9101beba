//! Where notices live: the [`NoticeStore`] trait and its three backends (memory, SQLite,
//! PostgreSQL).
//!
//! Every backend gives notices ids from one increasing sequence that is never reused (retention
//! deletes old rows, so a plain "max + 1" would hand out an id twice), stores a notice before the
//! caller acknowledges it, and moves a due scheduled notice into the notices in one atomic step,
//! so a scheduled notice is published exactly once even when the service restarts or several
//! instances share a database (tests/store_contract.rs runs one suite against all three).
//!
//! [`NoticeBackend`] picks a backend at run time from the `--store` flag, as an enum with native
//! async methods rather than a boxed trait object, the same shape as kv-service's store. The SQL
//! stores share the statements that differ only in their placeholders ([`sql`]): sqlx numbers
//! `$1`, `$2`... for SQLite as PostgreSQL does.

mod memory;
mod postgres;
mod sqlite;

use std::{future::Future, time::Duration};

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

/// Where the kept notices start and how far ids have gone: what decides whether a subscriber's
/// resume point can be continued from exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdBounds {
    /// The smallest id still stored; `None` when no notice is kept.
    pub oldest_kept: Option<i64>,
    /// The highest id ever published (0 when none), including ones retention deleted since.
    pub current: i64,
}

/// How a resume point (`after`) relates to what the store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumePoint {
    /// Every notice after it that was ever published is still stored (or none was deleted that
    /// the reader could have missed): replay continues exactly.
    Exact,
    /// Notices after it were deleted by retention: a replay would skip them.
    TooOld,
    /// Above every id ever published: the reader talked to another database.
    TooNew,
}

impl IdBounds {
    /// The oldest id a reader can still get: the oldest kept, or the next to be published when
    /// none is kept.
    pub fn oldest_id(&self) -> i64 {
        self.oldest_kept.unwrap_or(self.current + 1)
    }

    /// Ids come from one increasing sequence, so a resume point just below the oldest kept
    /// notice missed nothing, and one further below missed what retention deleted. `after` 0
    /// asks for everything there is and is always exact. (PostgreSQL can skip an id when a
    /// publish fails; a skipped id just below the oldest kept one then reads as deleted, so
    /// the error is a needless reset, never a silent gap.)
    pub fn resume_point(&self, after: i64) -> ResumePoint {
        if after <= 0 {
            ResumePoint::Exact
        } else if after > self.current {
            ResumePoint::TooNew
        } else if after < self.oldest_id() - 1 {
            ResumePoint::TooOld
        } else {
            ResumePoint::Exact
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
    /// A PostgreSQL operation that failed, saying whether it may have been applied.
    #[error(transparent)]
    Failed(#[from] StoreFailure),
    /// The start-up check refused the SQLite file; the message names it and the damage.
    #[error(transparent)]
    Damaged(#[from] shared::sqlite::CheckError),
}

/// The operations the service needs from a backend. See the module docs for the guarantees.
pub trait NoticeStore: Send + Sync {
    /// Stores a notice now and returns it with its id.
    fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> impl Future<Output = Result<Notice, StoreError>> + Send;

    /// Keeps a notice to be published at `at` (see [`NoticeStore::claim_due`]).
    fn schedule(
        &self,
        notice: NewNotice,
        at: DateTime<Utc>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The earliest time a scheduled notice is due, if any is waiting.
    fn next_due(&self) -> impl Future<Output = Result<Option<DateTime<Utc>>, StoreError>> + Send;

    /// Atomically turns up to `limit` scheduled notices due at `now` into stored notices (with
    /// fresh ids, in due order) and returns them. A notice is claimed by exactly one caller.
    fn claim_due(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<Notice>, StoreError>> + Send;

    fn query(
        &self,
        query: &NoticeQuery,
    ) -> impl Future<Output = Result<Vec<Notice>, StoreError>> + Send;

    /// An id that every notice committed from now on will exceed: the largest committed id
    /// (0 when none). The cluster fan-out starts reading after it.
    fn last_id(&self) -> impl Future<Output = Result<i64, StoreError>> + Send;

    /// The oldest kept id and the highest id ever published, read together.
    fn id_bounds(&self) -> impl Future<Output = Result<IdBounds, StoreError>> + Send;

    /// Deletes notices beyond the retention cap and returns how many went.
    fn prune(
        &self,
        retention: &Retention,
        now: DateTime<Utc>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use shared::{
    postgres::StoreFailure,
    store_spec::{StoreCheck, StoreOptions, StoreSpec},
};

/// The backend chosen by `--store`.
pub enum NoticeBackend {
    Memory(MemoryStore),
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl NoticeBackend {
    /// Opens (or creates) the store and applies its migrations. A PostgreSQL server that does
    /// not answer yet is waited for a while (shared's `postgres::connect`).
    pub async fn open(
        spec: &StoreSpec,
        options: StoreOptions,
    ) -> Result<NoticeBackend, StoreError> {
        Ok(match spec {
            StoreSpec::Memory => NoticeBackend::Memory(MemoryStore::default()),
            StoreSpec::Sqlite(path) => {
                NoticeBackend::Sqlite(SqliteStore::open(path, options).await?)
            }
            StoreSpec::Postgres(url) => {
                let store = PostgresStore::open(url, postgres::MAX_CONNECTIONS, options).await?;
                store.migrate(&postgres::MIGRATIONS).await?;
                NoticeBackend::Postgres(store)
            }
        })
    }

    /// The PostgreSQL pool, which the cluster layer uses for LISTEN/NOTIFY and presence; `None`
    /// for the stores that serve one instance.
    pub fn postgres_pool(&self) -> Option<&sqlx::PgPool> {
        match self {
            NoticeBackend::Postgres(store) => Some(store.pool()),
            NoticeBackend::Memory(_) | NoticeBackend::Sqlite(_) => None,
        }
    }

    /// Whether the store answers, kept up to date, for the store that can be away (PostgreSQL);
    /// `None` for those that are always there.
    pub fn follow_readiness(&self, shutdown: CancellationToken) -> Option<watch::Receiver<bool>> {
        match self {
            NoticeBackend::Postgres(store) => Some(store.follow_readiness(shutdown)),
            NoticeBackend::Memory(_) | NoticeBackend::Sqlite(_) => None,
        }
    }

    /// Closes database connections.
    pub async fn close(&self) {
        match self {
            NoticeBackend::Memory(_) => {}
            NoticeBackend::Sqlite(store) => store.close().await,
            NoticeBackend::Postgres(store) => store.close().await,
        }
    }
}

impl NoticeStore for NoticeBackend {
    async fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> Result<Notice, StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.insert(notice, created_at).await,
            NoticeBackend::Sqlite(store) => store.insert(notice, created_at).await,
            NoticeBackend::Postgres(store) => store.insert(notice, created_at).await,
        }
    }

    async fn schedule(&self, notice: NewNotice, at: DateTime<Utc>) -> Result<(), StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.schedule(notice, at).await,
            NoticeBackend::Sqlite(store) => store.schedule(notice, at).await,
            NoticeBackend::Postgres(store) => store.schedule(notice, at).await,
        }
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.next_due().await,
            NoticeBackend::Sqlite(store) => store.next_due().await,
            NoticeBackend::Postgres(store) => store.next_due().await,
        }
    }

    async fn claim_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Notice>, StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.claim_due(now, limit).await,
            NoticeBackend::Sqlite(store) => store.claim_due(now, limit).await,
            NoticeBackend::Postgres(store) => store.claim_due(now, limit).await,
        }
    }

    async fn query(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.query(query).await,
            NoticeBackend::Sqlite(store) => store.query(query).await,
            NoticeBackend::Postgres(store) => store.query(query).await,
        }
    }

    async fn last_id(&self) -> Result<i64, StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.last_id().await,
            NoticeBackend::Sqlite(store) => store.last_id().await,
            NoticeBackend::Postgres(store) => store.last_id().await,
        }
    }

    async fn id_bounds(&self) -> Result<IdBounds, StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.id_bounds().await,
            NoticeBackend::Sqlite(store) => store.id_bounds().await,
            NoticeBackend::Postgres(store) => store.id_bounds().await,
        }
    }

    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError> {
        match self {
            NoticeBackend::Memory(store) => store.prune(retention, now).await,
            NoticeBackend::Sqlite(store) => store.prune(retention, now).await,
            NoticeBackend::Postgres(store) => store.prune(retention, now).await,
        }
    }
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

/// The statements of the SQL stores, written once for both where only their placeholders
/// would differ.
mod sql {
    use super::Selector;

    pub const INSERT: &str = "INSERT INTO notices (message, topic, recipient, sender, created_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id";

    pub const SCHEDULE: &str =
        "INSERT INTO scheduled_notices (message, topic, recipient, sender, due_at)
         VALUES ($1, $2, $3, $4, $5)";

    pub const NEXT_DUE: &str = "SELECT MIN(due_at) FROM scheduled_notices";

    /// Binds the time and the limit; returns the claimed rows in any order.
    pub const CLAIM_DUE: &str = "DELETE FROM scheduled_notices WHERE id IN (
             SELECT id FROM scheduled_notices WHERE due_at <= $1
             ORDER BY due_at, id LIMIT $2)
         RETURNING id, message, topic, recipient, sender, due_at";

    /// The oldest kept id and, as a second column, the largest id of the `current` expression
    /// each backend passes: both may be NULL.
    pub fn id_bounds(current: &str) -> String {
        format!("SELECT (SELECT MIN(id) FROM notices), {current}")
    }

    /// Binds the number of notices to keep.
    pub const PRUNE_BEYOND_COUNT: &str = "DELETE FROM notices WHERE id <= (
             SELECT id FROM notices ORDER BY id DESC LIMIT 1 OFFSET $1)";

    /// Binds the oldest creation time kept.
    pub const PRUNE_OLDER_THAN: &str = "DELETE FROM notices WHERE created_at < $1";

    /// The query for `selector`. Every query binds whether the reader sees every whisper ($1),
    /// the name whose whispers it sees ($2), the id to read after ($3) and the limit ($4); a
    /// topic binds it as $5; an interest binds its topics as $5, read by `topic_in_list` (how a
    /// backend writes "topic is one of the list $5"), and its name as $6.
    pub fn query(selector: &Selector, topic_in_list: &str) -> String {
        // The whisper rule (`Whispers::admits`), the same in every query.
        let visible = "($1 OR recipient IS NULL OR recipient = $2)";
        let selected = match selector {
            Selector::All => String::new(),
            Selector::Topic(_) => "AND topic = $5".to_owned(),
            // The same rule as `Interest::wants`, in SQL.
            Selector::Interest(_) => format!(
                "AND ((recipient IS NULL AND topic IS NULL)
                      OR (recipient IS NULL AND {topic_in_list})
                      OR recipient = $6)"
            ),
        };
        format!(
            "SELECT id, message, topic, recipient, sender, created_at FROM notices
             WHERE id > $3 AND {visible} {selected} ORDER BY id LIMIT $4"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_points_are_classified_against_the_kept_ids() {
        let kept = IdBounds {
            oldest_kept: Some(10),
            current: 20,
        };
        assert_eq!(kept.resume_point(0), ResumePoint::Exact, "from the start");
        assert_eq!(kept.resume_point(8), ResumePoint::TooOld, "9 was deleted");
        assert_eq!(kept.resume_point(9), ResumePoint::Exact);
        assert_eq!(kept.resume_point(15), ResumePoint::Exact);
        assert_eq!(kept.resume_point(20), ResumePoint::Exact, "up to date");
        assert_eq!(kept.resume_point(21), ResumePoint::TooNew);

        let never = IdBounds {
            oldest_kept: None,
            current: 0,
        };
        assert_eq!(never.resume_point(0), ResumePoint::Exact);
        assert_eq!(never.resume_point(1), ResumePoint::TooNew);
        assert_eq!(never.oldest_id(), 1);

        // Everything published was deleted since.
        let emptied = IdBounds {
            oldest_kept: None,
            current: 7,
        };
        assert_eq!(emptied.oldest_id(), 8);
        assert_eq!(emptied.resume_point(6), ResumePoint::TooOld);
        assert_eq!(emptied.resume_point(7), ResumePoint::Exact);
        assert_eq!(emptied.resume_point(8), ResumePoint::TooNew);
    }
}
