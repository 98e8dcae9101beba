//! The PostgreSQL store (`--store postgres://...`): the one several instances can share.
//!
//! Publishing takes a transaction-level advisory lock before drawing an id, so notices commit in
//! id order across all instances. Each publishing transaction also sends a NOTIFY that commits
//! with it; since PostgreSQL delivers notifications in commit order, a listener that has seen id
//! N knows every smaller id is already visible, which is what makes cross-instance fan-out
//! gap-free (see `cluster`).
//!
//! At start, a server that does not answer yet is waited for (shared's `postgres::connect`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{postgres::PgPoolOptions, PgPool, Postgres, Transaction};

use super::{
    sql, NoticeQuery, NoticeRow, NoticeStore, Retention, ScheduledRow, Selector, StoreError,
};
use crate::notice::{NewNotice, Notice};

/// NOTIFY channel announcing new notices; the payload is the highest new id.
pub const PUBLISHED_CHANNEL: &str = "notice_published";
/// Advisory lock key serializing publishers ("notice" in ASCII).
const PUBLISH_LOCK: i64 = 0x6e6f_7469_6365;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5));
        let pool = shared::postgres::connect(url, pool).await?;
        // sqlx's migrator takes its own advisory lock, so instances starting together are safe.
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn begin_publish(&self) -> Result<Transaction<'static, Postgres>, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PUBLISH_LOCK)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

async fn insert_in(
    tx: &mut Transaction<'static, Postgres>,
    notice: NewNotice,
    created_at: DateTime<Utc>,
) -> Result<Notice, StoreError> {
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
) -> Result<(), StoreError> {
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
        let mut tx = self.begin_publish().await?;
        let notice = insert_in(&mut tx, notice, created_at).await?;
        notify_published(&mut tx, notice.id).await?;
        tx.commit().await?;
        Ok(notice)
    }

    async fn schedule(&self, notice: NewNotice, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(sql::SCHEDULE)
            .bind(&notice.message)
            .bind(&notice.topic)
            .bind(&notice.to)
            .bind(&notice.from)
            .bind(at.timestamp_millis())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn next_due(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let due: Option<i64> = sqlx::query_scalar(sql::NEXT_DUE)
            .fetch_one(&self.pool)
            .await?;
        Ok(due.map(crate::notice::from_millis))
    }

    async fn claim_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Notice>, StoreError> {
        // Under the publish lock only one instance claims at a time, and the delete commits
        // together with the inserts: each scheduled notice is published exactly once.
        let mut tx = self.begin_publish().await?;
        let mut due: Vec<ScheduledRow> = sqlx::query_as(sql::CLAIM_DUE)
            .bind(now.timestamp_millis())
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        due.sort_by_key(|row| (row.due_at, row.id));
        let mut claimed = Vec::with_capacity(due.len());
        for row in due {
            claimed.push(insert_in(&mut tx, row.into_new(), now).await?);
        }
        let last = claimed.last().expect("not empty").id;
        notify_published(&mut tx, last).await?;
        tx.commit().await?;
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
        let rows = select.fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(Notice::from).collect())
    }

    async fn last_id(&self) -> Result<i64, StoreError> {
        // MAX(id), not the sequence: an id drawn by a transaction that has not committed yet
        // is above every committed one, and the fan-out must still read it once it commits.
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(id) FROM notices")
            .fetch_one(&self.pool)
            .await?;
        Ok(last.unwrap_or(0))
    }

    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut pruned = 0;
        if let Some(max) = retention.max_count {
            pruned += sqlx::query(sql::PRUNE_BEYOND_COUNT)
                .bind(i64::try_from(max).unwrap_or(i64::MAX))
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        if let Some(cutoff) = retention.age_cutoff(now) {
            pruned += sqlx::query(sql::PRUNE_OLDER_THAN)
                .bind(cutoff.timestamp_millis())
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(pruned)
    }
}
