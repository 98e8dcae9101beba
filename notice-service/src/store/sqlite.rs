//! The SQLite store (`--store sqlite:PATH`, the default): one file, survives restarts, for a
//! single instance. Several instances must share PostgreSQL instead, since only that store
//! tells the other instances about new notices.
//!
//! A file that exists is checked before anything else touches it (`PRAGMA quick_check`, or
//! `integrity_check` with `--check-store full`, in shared's `sqlite` module): a damaged file
//! would otherwise open fine and fail only the requests that read the damaged page.

use std::{path::Path, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    SqlitePool,
};

use super::{
    sql, IdBounds, NoticeQuery, NoticeRow, NoticeStore, Retention, ScheduledRow, Selector,
    StoreError, StoreOptions,
};
use crate::notice::{NewNotice, Notice};

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    pub async fn open(path: &Path, store_options: StoreOptions) -> Result<SqliteStore, StoreError> {
        // Before anything writes to it (migrations): a damaged file is refused, not served.
        shared::sqlite::check(path, store_options.check).await?;
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

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl NoticeStore for SqliteStore {
    async fn insert(
        &self,
        notice: NewNotice,
        created_at: DateTime<Utc>,
    ) -> Result<Notice, StoreError> {
        Ok(insert_in(&self.pool, notice, created_at).await?)
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
        // The delete and the inserts commit together: a crash leaves the notice either still
        // scheduled or published, never both and never neither.
        let mut tx = self.pool.begin().await?;
        let mut due: Vec<ScheduledRow> = sqlx::query_as(sql::CLAIM_DUE)
            .bind(now.timestamp_millis())
            .bind(i64::from(limit))
            .fetch_all(&mut *tx)
            .await?;
        due.sort_by_key(|row| (row.due_at, row.id));
        let mut claimed = Vec::with_capacity(due.len());
        for row in due {
            claimed.push(insert_in(&mut *tx, row.into_new(), now).await?);
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn query(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError> {
        let (all_whispers, reader) = query.whispers.sql_binds();
        let sql = sql::query(
            &query.selector,
            "topic IN (SELECT value FROM json_each($5))",
        );
        let mut select = sqlx::query_as::<_, NoticeRow>(&sql)
            .bind(all_whispers)
            .bind(reader)
            .bind(query.after)
            .bind(i64::from(query.limit));
        match &query.selector {
            Selector::All => {}
            Selector::Topic(topic) => select = select.bind(topic),
            Selector::Interest(interest) => {
                let topics = serde_json::to_string(&interest.topics).expect("strings serialize");
                select = select.bind(topics).bind(&interest.name);
            }
        }
        let rows = select.fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(Notice::from).collect())
    }

    async fn last_id(&self) -> Result<i64, StoreError> {
        // sqlite_sequence remembers the highest id even after those rows were pruned.
        let seq: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM sqlite_sequence WHERE name = 'notices'")
                .fetch_optional(&self.pool)
                .await?;
        Ok(seq.unwrap_or(0))
    }

    async fn id_bounds(&self) -> Result<IdBounds, StoreError> {
        // One statement, so both come from the same snapshot; sqlite_sequence keeps the highest
        // id after retention deleted its row.
        let sql = sql::id_bounds("(SELECT seq FROM sqlite_sequence WHERE name = 'notices')");
        let (oldest_kept, current): (Option<i64>, Option<i64>) =
            sqlx::query_as(&sql).fetch_one(&self.pool).await?;
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

/// Stores `notice` as published at `created_at`, on the pool or inside a claim's transaction.
async fn insert_in(
    executor: impl sqlx::SqliteExecutor<'_>,
    notice: NewNotice,
    created_at: DateTime<Utc>,
) -> Result<Notice, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(sql::INSERT)
        .bind(&notice.message)
        .bind(&notice.topic)
        .bind(&notice.to)
        .bind(&notice.from)
        .bind(created_at.timestamp_millis())
        .fetch_one(executor)
        .await?;
    Ok(notice.stored(id, created_at))
}
