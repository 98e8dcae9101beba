//! The PostgreSQL store (`--store postgres://...`): the one several instances can share.
//!
//! Publishing takes a transaction-level advisory lock before drawing an id, so notices commit in
//! id order across all instances. Each publishing transaction also sends a NOTIFY that commits
//! with it; since PostgreSQL delivers notifications in commit order, a listener that has seen id
//! N knows every smaller id is already visible, which is what makes cross-instance fan-out
//! gap-free (see `cluster`).
//!
//! At start, a server that does not answer yet is waited for (shared's `postgres::connect`).
//! Afterwards every step has the store timeout as its deadline: a publish that fails before its
//! COMMIT was sent was not applied; only a COMMIT that goes unanswered has an unknown outcome
//! (shared's `postgres::StoreFailure`).

use chrono::{DateTime, Utc};
use sqlx::{migrate::Migrator, Postgres, Transaction};

use super::{
    sql, IdBounds, NoticeQuery, NoticeRow, NoticeStore, Retention, ScheduledRow, Selector,
    StoreError,
};
use crate::notice::{NewNotice, Notice};

/// The store is shared's `Database` (the pool and the store timeout); this module gives it the
/// notice operations.
pub use shared::postgres::Database as PostgresStore;

/// NOTIFY channel announcing new notices; the payload is the highest new id.
pub const PUBLISHED_CHANNEL: &str = "notice_published";
/// Connections at most: publishes hold one each while they wait for the publish lock.
pub const MAX_CONNECTIONS: u32 = 8;
/// Advisory lock key serializing publishers ("notice" in ASCII).
const PUBLISH_LOCK: i64 = 0x6e6f_7469_6365;

/// The schema, brought up to date at open.
pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Starts a publishing transaction: it holds the publish lock until it commits.
async fn begin_publish(db: &PostgresStore) -> Result<Transaction<'static, Postgres>, StoreError> {
    let begin = async {
        let mut tx = db.pool().begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PUBLISH_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    };
    Ok(db.uncommitted(begin).await?)
}

async fn insert_in(
    tx: &mut Transaction<'static, Postgres>,
    notice: NewNotice,
    created_at: DateTime<Utc>,
) -> Result<Notice, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(sql::INSERT)
        .bind(&notice.message)
        .bind(&notice.topic)
        .bind(&notice.to)
        .bind(&notice.from)
        .bind(created_at.timestamp_millis())
        .fetch_one(&mut **tx)
        .await?;
    Ok(notice.stored(id, created_at))
}

async fn notify_published(
    tx: &mut Transaction<'static, Postgres>,
    last_id: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(PUBLISHED_CHANNEL)
        .bind(last_id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl NoticeStore for PostgresStore {
    async fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> Result<Notice, StoreError> {
        let mut tx = begin_publish(self).await?;
        let publish = async {
            let notice = insert_in(&mut tx, notice, created_at).await?;
            notify_published(&mut tx, notice.id).await?;
            Ok(notice)
        };
        let notice = self.uncommitted(publish).await?;
        self.committing(tx.commit()).await?;
        Ok(notice)
    }

    async fn schedule(&self, notice: NewNotice, at: DateTime<Utc>) -> Result<(), StoreError> {
        let query = sqlx::query(sql::SCHEDULE)
            .bind(&notice.message)
            .bind(&notice.topic)
            .bind(&notice.to)
            .bind(&notice.from)
            .bind(at.timestamp_millis());
        let mut connection = self.acquire().await?;
        self.committing(query.execute(&mut *connection)).await?;
        Ok(())
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let query = sqlx::query_scalar(sql::NEXT_DUE);
        let due: Option<i64> = self.uncommitted(query.fetch_one(self.pool())).await?;
        Ok(due.map(crate::notice::from_millis))
    }

    async fn claim_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Notice>, StoreError> {
        // Under the publish lock only one instance claims at a time, and the delete commits
        // together with the inserts: each scheduled notice is published exactly once.
        let mut tx = begin_publish(self).await?;
        let claim = async {
            let mut due: Vec<ScheduledRow> = sqlx::query_as(sql::CLAIM_DUE)
                .bind(now.timestamp_millis())
                .bind(i64::from(limit))
                .fetch_all(&mut *tx)
                .await?;
            due.sort_by_key(|row| (row.due_at, row.id));
            let mut claimed = Vec::with_capacity(due.len());
            for row in due {
                claimed.push(insert_in(&mut tx, row.into_new(), now).await?);
            }
            if let Some(last) = claimed.last() {
                notify_published(&mut tx, last.id).await?;
            }
            Ok(claimed)
        };
        let claimed = self.uncommitted(claim).await?;
        if claimed.is_empty() {
            return Ok(claimed);
        }
        self.committing(tx.commit()).await?;
        Ok(claimed)
    }

    async fn query(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError> {
        let (all_whispers, reader) = query.whispers.sql_binds();
        let sql = sql::query(&query.selector, "topic = ANY($5)");
        let mut select = sqlx::query_as::<_, NoticeRow>(&sql)
            .bind(all_whispers)
            .bind(reader)
            .bind(query.after)
            .bind(i64::from(query.limit));
        match &query.selector {
            Selector::All => {}
            Selector::Topic(topic) => select = select.bind(topic),
            Selector::Interest(interest) => {
                let topics: Vec<&str> = interest.topics.iter().map(String::as_str).collect();
                select = select.bind(topics).bind(&interest.name);
            }
        }
        let rows = self.uncommitted(select.fetch_all(self.pool())).await?;
        Ok(rows.into_iter().map(Notice::from).collect())
    }

    async fn last_id(&self) -> Result<i64, StoreError> {
        // MAX(id), not the sequence: an id drawn by a transaction that has not committed yet
        // is above every committed one, and the fan-out must still read it once it commits.
        let query = sqlx::query_scalar("SELECT MAX(id) FROM notices");
        let last: Option<i64> = self.uncommitted(query.fetch_one(self.pool())).await?;
        Ok(last.unwrap_or(0))
    }

    async fn id_bounds(&self) -> Result<IdBounds, StoreError> {
        // The identity sequence remembers the highest id drawn after retention deleted every
        // row; it may be a publish still committing (or one rolled back), which only makes
        // `current` a little higher than the committed notices.
        let sql = sql::id_bounds(
            "GREATEST((SELECT MAX(id) FROM notices),
                      pg_sequence_last_value(pg_get_serial_sequence('notices', 'id')))",
        );
        let query = sqlx::query_as(&sql);
        let (oldest_kept, current): (Option<i64>, Option<i64>) =
            self.uncommitted(query.fetch_one(self.pool())).await?;
        Ok(IdBounds {
            oldest_kept,
            current: current.unwrap_or(0),
        })
    }

    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut pruned = 0;
        if let Some(max) = retention.max_count {
            pruned += sqlx::query(sql::PRUNE_BEYOND_COUNT)
                .bind(i64::try_from(max).unwrap_or(i64::MAX))
                .execute(self.pool())
                .await?
                .rows_affected();
        }
        if let Some(cutoff) = retention.age_cutoff(now) {
            pruned += sqlx::query(sql::PRUNE_OLDER_THAN)
                .bind(cutoff.timestamp_millis())
                .execute(self.pool())
                .await?
                .rows_affected();
        }
        Ok(pruned)
    }
}
