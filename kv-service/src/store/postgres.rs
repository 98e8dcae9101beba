//! The PostgreSQL store (`--store postgres://...`): the one several kv-service replicas can share.
//!
//! Every operation is a single statement, so the database does the locking: a put is an
//! `INSERT ... ON CONFLICT DO UPDATE ... RETURNING version`, which takes the row lock and bumps
//! the version in one step, so concurrent puts on one key (from one replica or many) never lose
//! an increment. No replica caches anything, so a write through one is read through any other.
//! A put is answered after its commit, which PostgreSQL makes durable before returning.

use std::time::{Duration, Instant};

use sqlx::{
    postgres::{PgConnectOptions, PgPoolOptions},
    PgPool,
};

use super::{
    item_rows, lower_bound, prefix_upper_bound, versioned_row, Condition, Item, KvStore,
    PutOutcome, StoreError, Versioned,
};

const MAX_CONNECTIONS: u32 = 16;

/// How long start-up keeps retrying a database that does not answer yet (it may be starting
/// alongside the service, e.g. under docker-compose).
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn open(url: &str) -> Result<PostgresStore, StoreError> {
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(options);
        let started = Instant::now();
        loop {
            // Migrations take an advisory lock, so replicas starting together apply them once.
            match sqlx::migrate!("./migrations/postgres").run(&pool).await {
                Ok(()) => return Ok(PostgresStore { pool }),
                Err(err) if is_unreachable(&err) && started.elapsed() < CONNECT_PATIENCE => {
                    tracing::warn!(%err, "PostgreSQL not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Errors worth waiting out at start-up: the server is not up (yet). Wrong credentials or a
/// missing database fail at once.
fn is_unreachable(err: &sqlx::migrate::MigrateError) -> bool {
    matches!(
        err,
        sqlx::migrate::MigrateError::Execute(sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)
    )
}

impl KvStore for PostgresStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let row: Option<(Vec<u8>, i64)> =
            sqlx::query_as("SELECT value, version FROM kv WHERE key = $1")
                .bind(key.as_bytes())
                .fetch_optional(&self.pool)
                .await?;
        versioned_row(row)
    }

    async fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> Result<PutOutcome, StoreError> {
        let sql = match condition {
            Condition::Always => {
                "INSERT INTO kv (key, value, version) VALUES ($1, $2, 1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, version = kv.version + 1
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
        };
        let mut query = sqlx::query_scalar(sql)
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
        let current: Option<i64> = sqlx::query_scalar("SELECT version FROM kv WHERE key = $1")
            .bind(key.as_bytes())
            .fetch_optional(&self.pool)
            .await?;
        Ok(PutOutcome::Conflict { current })
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM kv WHERE key = $1")
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
        let sql = if inclusive {
            "SELECT key, value, version FROM kv
             WHERE key >= $1 AND ($2::bytea IS NULL OR key < $2) ORDER BY key LIMIT $3"
        } else {
            "SELECT key, value, version FROM kv
             WHERE key > $1 AND ($2::bytea IS NULL OR key < $2) ORDER BY key LIMIT $3"
        };
        let rows: Vec<(Vec<u8>, Vec<u8>, i64)> = sqlx::query_as(sql)
            .bind(lower)
            .bind(upper)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        item_rows(rows)
    }
}
