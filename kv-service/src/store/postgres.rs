//! The PostgreSQL store (`--store postgres://...`): the one several kv-service replicas can share.
//!
//! Every operation is a single statement, so the database does the locking: a put is an
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING version`, which takes the row lock and bumps
//! the version in one step, so concurrent puts on one key (from one replica or many) never lose
//! an increment. No replica caches anything, so a write through one is read through any other.
//! A put is answered after its commit, which PostgreSQL makes durable before returning.
//!
//! At start, a server that does not answer yet is waited for (shared's `postgres::connect`).

use std::time::Duration;

use sqlx::{postgres::PgPoolOptions, PgPool};

use super::{
    items, lower_bound, prefix_upper_bound, sql, Condition, Item, ItemRow, KvStore, PutOutcome,
    StoreError, ValueRow, Versioned,
};

const MAX_CONNECTIONS: u32 = 16;

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10));
        let pool = shared::postgres::connect(url, pool).await?;
        // Migrations take an advisory lock, so replicas starting together apply them once.
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl KvStore for PostgresStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let row: Option<ValueRow> = sqlx::query_as(sql::GET)
            .bind(key.as_bytes())
            .fetch_optional(&self.pool)
            .await?;
        row.map(ValueRow::into_versioned).transpose()
    }

    async fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> Result<PutOutcome, StoreError> {
        let mut query = sqlx::query_scalar(sql::put(condition))
            .bind(key.as_bytes())
            .bind(value.as_bytes());
        if let Condition::IfVersion(expected) = condition {
            query = query.bind(expected);
        }
        let written: Option<i64> = query.fetch_optional(&self.pool).await?;
        if let Some(version) = written {
            return Ok(PutOutcome::Written { version });
        }
        // The condition failed; report the version seen now (it may have moved on since, which
        // is fine: the caller only learns why its put was refused).
        let current: Option<i64> = sqlx::query_scalar(sql::VERSION)
            .bind(key.as_bytes())
            .fetch_optional(&self.pool)
            .await?;
        Ok(PutOutcome::Conflict { current })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let result = sqlx::query(sql::DELETE)
            .bind(key.as_bytes())
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Item>, StoreError> {
        let (lower, inclusive) = lower_bound(prefix, after);
        let upper = prefix_upper_bound(prefix.as_bytes());
        let rows: Vec<ItemRow> = sqlx::query_as(sql::list(inclusive))
            .bind(lower)
            .bind(upper)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        items(rows)
    }
}
