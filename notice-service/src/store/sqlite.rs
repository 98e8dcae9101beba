//! The SQLite store (`--store sqlite:PATH`, the default): one file, survives restarts, for a
//! single instance. Several instances must share PostgreSQL instead, since only that store
//! tells the other instances about new notices.

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    SqlitePool,
};

use super::{NoticeQuery, NoticeRow, Retention, ScheduledRow, Selector, Store, StoreError};
use crate::notice::{NewNotice, Notice};

const COLUMNS: &str = "id, message, topic, recipient, sender, created_at";

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &std::path::Path) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(path)
            .create_if_missing(true)
            // WAL lets replays read while a publish writes. NORMAL syncs at checkpoints rather
            // than at every commit: a committed notice survives a crash of the process (it is in
            // the WAL file), only a power cut can lose the last ones. Syncing every commit made
            // each publish wait for the disk, and publishes are serialized.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> Result<Notice, StoreError> {
        let (id,): (i64,) = sqlx::query_as(
            "INSERT INTO notices (message, topic, recipient, sender, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
        )
        .bind(&notice.message)
        .bind(&notice.topic)
        .bind(&notice.to)
        .bind(&notice.from)
        .bind(created_at.timestamp_millis())
        .fetch_one(&self.pool)
        .await?;
        Ok(notice.stored(id, created_at))
    }

    async fn schedule(&self, notice: NewNotice, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO scheduled_notices (message, topic, recipient, sender, due_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
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
        // The delete and the inserts commit together: a crash leaves the notice either still
        // scheduled or published, never both and never neither.
        let mut tx = self.pool.begin().await?;
        let mut due: Vec<ScheduledRow> = sqlx::query_as(
            "DELETE FROM scheduled_notices WHERE id IN (
                 SELECT id FROM scheduled_notices WHERE due_at <= ?1
                 ORDER BY due_at, id LIMIT ?2)
             RETURNING id, message, topic, recipient, sender, due_at",
        )
        .bind(now.timestamp_millis())
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        due.sort_by_key(|row| (row.due_at, row.id));
        let mut claimed = Vec::with_capacity(due.len());
        for row in due {
            let notice = row.into_new();
            let (id,): (i64,) = sqlx::query_as(
                "INSERT INTO notices (message, topic, recipient, sender, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING id",
            )
            .bind(&notice.message)
            .bind(&notice.topic)
            .bind(&notice.to)
            .bind(&notice.from)
            .bind(now.timestamp_millis())
            .fetch_one(&mut *tx)
            .await?;
            claimed.push(notice.stored(id, now));
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn query(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError> {
        let after = query.after;
        let limit = i64::from(query.limit);
        // The whisper rule (`Whispers::admits`), the same in every query: ?1 is true when the
        // reader sees every whisper, ?2 the name whose whispers it sees.
        let (all_whispers, reader) = query.whispers.sql_binds();
        let visible = "(?1 OR recipient IS NULL OR recipient = ?2)";
        let rows: Vec<NoticeRow> = match &query.selector {
            Selector::All => {
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM notices WHERE id > ?3 AND {visible}
                     ORDER BY id LIMIT ?4"
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
                    "SELECT {COLUMNS} FROM notices WHERE topic = ?5 AND id > ?3 AND {visible}
                     ORDER BY id LIMIT ?4"
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
                let topics = serde_json::to_string(&interest.topics).expect("strings serialize");
                // The same rule as `Interest::wants`, in SQL.
                sqlx::query_as(&format!(
                    "SELECT {COLUMNS} FROM notices WHERE id > ?3 AND {visible} AND (
                         (recipient IS NULL AND topic IS NULL)
                         OR (recipient IS NULL AND topic IN (SELECT value FROM json_each(?5)))
                         OR recipient = ?6)
                     ORDER BY id LIMIT ?4"
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
        // sqlite_sequence remembers the highest id even after those rows were pruned.
        let seq: Option<(i64,)> =
            sqlx::query_as("SELECT seq FROM sqlite_sequence WHERE name = 'notices'")
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.map_or(0, |(seq,)| seq))
    }

    async fn prune(&self, retention: &Retention, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut pruned = 0;
        if let Some(max) = retention.max_count {
            pruned += sqlx::query(
                "DELETE FROM notices WHERE id <= (
                     SELECT id FROM notices ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            )
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .execute(&self.pool)
            .await?
            .rows_affected();
        }
        if let Some(cutoff) = retention.age_cutoff(now) {
            pruned += sqlx::query("DELETE FROM notices WHERE created_at < ?1")
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
    async fn sqlite_store_conformance() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notices.db");
        let store = SqliteStore::open(&path).await.unwrap();
        crate::store::conformance::run_all(&store).await;
    }

    #[tokio::test]
    async fn sqlite_keeps_notices_and_schedules_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notices.db");
        let now = Utc::now();
        let first = {
            let store = SqliteStore::open(&path).await.unwrap();
            let n = NewNotice::new(Some("kept".into()), None, None).unwrap();
            let first = store.insert(n.clone(), now).await.unwrap();
            store.schedule(n, now).await.unwrap();
            store.pool.close().await;
            first
        };
        let store = SqliteStore::open(&path).await.unwrap();
        let all = store
            .query(&NoticeQuery {
                after: 0,
                limit: 10,
                selector: Selector::All,
                whispers: crate::notice::Whispers::All,
            })
            .await
            .unwrap();
        assert_eq!(all, vec![first.clone()]);
        let claimed = store.claim_due(now, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert!(claimed[0].id > first.id);
    }
}
