//! The PostgreSQL store (`--store postgres://...`): the one several kv-service replicas can share.
//!
//! Every operation is a single statement, so the database does the locking: a put is an
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING version`, which takes the row lock and bumps
//! the version in one step, so concurrent puts on one key (from one replica or many) never lose
//! an increment. No replica caches anything, so a write through one is read through any other.
//! A put is answered after its commit, which PostgreSQL makes durable before returning.
//!
//! At start, a server that does not answer yet is waited for (shared's `postgres::connect`).
//! Afterwards every operation has the store timeout as its deadline, and a write is sent only on
//! a connection already taken from the pool, so a failure says whether the write may have been
//! applied (shared's `postgres::StoreFailure`).

use sqlx::migrate::Migrator;

use super::{
    items, lower_bound, prefix_upper_bound, sql, Condition, Item, ItemRow, KvStore, PutOutcome,
    StoreError, ValueRow, Versioned,
};

/// The store is shared's `Database` (the pool and the store timeout); this module gives it the
/// kv operations.
pub use shared::postgres::Database as PostgresStore;

/// Connections at most per replica.
pub const MAX_CONNECTIONS: u32 = 16;

/// The schema, brought up to date at open.
pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

impl KvStore for PostgresStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let query = sqlx::query_as(sql::GET).bind(key.as_bytes());
        let row: Option<ValueRow> = self.uncommitted(query.fetch_optional(self.pool())).await?;
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
        let mut connection = self.acquire().await?;
        let written: Option<i64> = self
            .committing(query.fetch_optional(&mut *connection))
            .await?;
        if let Some(version) = written {
            return Ok(PutOutcome::Written { version });
        }
        // The condition failed; report the version seen now (it may have moved on since, which
        // is fine: the caller only learns why its put was refused).
        let query = sqlx::query_scalar(sql::VERSION).bind(key.as_bytes());
        let current: Option<i64> = self
            .uncommitted(query.fetch_optional(&mut *connection))
            .await?;
        Ok(PutOutcome::Conflict { current })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let query = sqlx::query(sql::DELETE).bind(key.as_bytes());
        let mut connection = self.acquire().await?;
        let result = self.committing(query.execute(&mut *connection)).await?;
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
        let query = sqlx::query_as(sql::list(inclusive))
            .bind(lower)
            .bind(upper)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let rows: Vec<ItemRow> = self.uncommitted(query.fetch_all(self.pool())).await?;
        items(rows)
    }
}
