//! The PostgreSQL store (`--store postgres://...`): the one several instances can share.
//!
//! Publishing takes a transaction-level advisory lock before drawing an id, so notices commit in
//! id order across all instances. Each publishing transaction also sends a NOTIFY that commits
//! with it; since PostgreSQL delivers notifications in commit order, a listener that has seen id
//! N knows every smaller id is already visible, which is what makes cross-instance fan-out
//! gap-free (see `cluster`).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{postgres::PgPoolOptions, PgPool, Postgres, Transaction};

use super::{NoticeQuery, NoticeRow, Retention, ScheduledRow, Selector, Store, StoreError};
use crate::notice::{NewNotice, Notice};

/// NOTIFY channel announcing new notices; the payload is the highest new id.
pub const PUBLISHED_CHANNEL: &str = "notice_published";
/// Advisory lock key serializing publishers ("notice" in ASCII).
const PUBLISH_LOCK: i64 = 0x6e6f_7469_6365;

const COLUMNS: &str = "id, message, topic, recipient, sender, created_at";

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        // sqlx's migrator takes its own advisory lock, so instances starting together are safe.
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
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
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO notices (message, topic, recipient, sender, created_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
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

#[async_trait]
impl Store for PostgresStore {
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
        sqlx::query(
            "INSERT INTO scheduled_notices (message, topic, recipient, sender, due_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
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
        let (due,): (Option<i64>,) = sqlx::query_as("SELECT MIN(due_at) FROM scheduled_notices")
            .fetch_one(&self.pool)
            .await?;
        Ok(due.map(crate::notice::from_millis))
    }

    async fn claim_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<Notice>, StoreError> {
        // Under the publish lock only one instance claims at a time, and the delete commits
        // together with the inserts: each scheduled notice is published exactly once.
        let mut tx = self.begin_publish().await?;
        let mut due: Vec<ScheduledRow> = sqlx::query_as(
            "DELETE FROM scheduled_notices WHERE id IN (
                 SELECT id FROM scheduled_notices WHERE due_at <= $1
                 ORDER BY due_at, id LIMIT $2)
             RETURNING id, message, topic, recipient, sender, due_at",
        )
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
        let after = query.after;
        let limit = i64::from(query.limit);
        // The whisper rule (`Whispers::admits`), the same in every query: $1 is true when the
        // reader sees every whisper, $2 the name whose whispers it sees.
        let (all_whispers, reader) = query.whispers.sql_binds();
        let visible = "($1 OR recipient IS NULL OR recipient = $2)";
        let rows: Vec<NoticeRow> = match &query.selector {
            Selector::All => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM notices WHERE id > $3 AND {visible}
                     ORDER BY id LIMIT $4"
                ))
                .bind(all_whispers)
                .bind(reader)
                .bind(after)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
            }
            Selector::Topic(topic) => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM notices WHERE topic = $5 AND id > $3 AND {visible}
                     ORDER BY id LIMIT $4"
                ))
                .bind(all_whispers)
                .bind(reader)
                .bind(after)
                .bind(limit)
                .bind(topic)
                .fetch_all(&self.pool)
                .await?
            }
            Selector::Interest(interest) => {
                let topics: Vec<&str> = interest.topics.iter().map(String::as_str).collect();
                // The same rule as `Interest::wants`, in SQL.
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM notices WHERE id > $3 AND {visible} AND (
                         (recipient IS NULL AND topic IS NULL)
                         OR (recipient IS NULL AND topic = ANY($5))
                         OR recipient = $6)
                     ORDER BY id LIMIT $4"
                ))
                .bind(all_whispers)
                .bind(reader)
                .bind(after)
                .bind(limit)
                .bind(topics)
                .bind(&interest.name)
                .fetch_all(&self.pool)
                .await?
            }
        };
        Ok(rows.into_iter().map(Notice::from).collect())
    }

    async fn last_id(&self) -> Result<i64, StoreError> {
        // MAX(id), not the sequence: an id drawn by a transaction that has not committed yet
        // is above every committed one, and the fan-out must still read it once it commits.
        let (last,): (Option<i64>,) = sqlx::query_as("SELECT MAX(id) FROM notices")
            .fetch_one(&self.pool)
            .await?;
        Ok(last.unwrap_or(0))
    }

    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut pruned = 0;
        if let Some(max) = retention.max_count {
            pruned += sqlx::query(
                "DELETE FROM notices WHERE id <= (
                     SELECT id FROM notices ORDER BY id DESC LIMIT 1 OFFSET $1)",
            )
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        if let Some(cutoff) = retention.age_cutoff(now) {
            pruned += sqlx::query("DELETE FROM notices WHERE created_at < $1")
                .bind(cutoff.timestamp_millis())
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(pruned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn postgres_store_conformance() {
        // Outside CI the helper skips (saying why) when no server can be started.
        let Some(pg) = shared::testing::TestPostgres::start().await else {
            return;
        };
        let url = pg.create_database("conformance").await;
        let store = PostgresStore::open(&url).await.unwrap();
        crate::store::conformance::run_all(&store).await;
    }
}
