//! The PostgreSQL store (`--store postgres://...`): the one several kv-service replicas can share.
//!
//! Every write is one transaction that starts by locking the single revision row
//! (`SELECT ... FOR UPDATE`): writers from every replica take turns there, so each takes the
//! next revision and commits before the next writer reads it. Commits thus happen in revision
//! order, which is what lets a change log reader take "every change up to the revision I see"
//! without ever missing one committed late. No replica caches anything, so a write through one
//! is read through any other, and a write is answered after its commit, which PostgreSQL makes
//! durable before returning.
//!
//! Each write that changes something also sends `NOTIFY kv_revision` with its revision (never
//! the values: a payload must stay under 8,000 bytes); [`follow_revisions`] turns those into the
//! local head revision that watchers wait on, and they read the changes from the log.
//!
//! At start, a server that does not answer yet is waited for (shared's `postgres::connect`).
//! Afterwards every operation has the store timeout as its deadline, and a write is sent only on
//! a connection already taken from the pool, so a failure says whether the write may have been
//! applied (shared's `postgres::StoreFailure`).

use std::time::Duration;

use shared::postgres::{Database, StoreFailure};
use sqlx::{migrate::Migrator, postgres::PgListener, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{advance, apply::apply, KvStore, StoreError, Write, WriteOutcome};

/// Shared's `Database` (the pool and the store timeout), with the kv operations, and the turn
/// this replica's writes take.
pub struct PostgresStore {
    database: Database,
    /// Writes serialize on the database's revision row anyway; taking turns here first keeps
    /// the waiting in this process, instead of in pool connections that would then be missing
    /// for reads. The wait for a turn is bounded by the store timeout too: while the database
    /// is away every write takes that long, and an unbounded queue of them would outlast the
    /// gateway's request timeout instead of failing fast.
    writing: tokio::sync::Mutex<()>,
}

impl PostgresStore {
    /// Opens the pool ([`Database::open`]).
    pub async fn open(
        url: &str,
        max_connections: u32,
        options: shared::store_spec::StoreOptions,
    ) -> Result<PostgresStore, sqlx::Error> {
        Ok(PostgresStore {
            database: Database::open(url, max_connections, options).await?,
            writing: tokio::sync::Mutex::new(()),
        })
    }
}

/// The database's own methods (the pool, timeouts, readiness, migrations) on the store.
impl std::ops::Deref for PostgresStore {
    type Target = Database;

    fn deref(&self) -> &Database {
        &self.database
    }
}

/// Connections at most per replica.
pub const MAX_CONNECTIONS: u32 = 16;

/// The schema, brought up to date at open.
pub static MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel writes announce their revision on.
const CHANNEL: &str = "kv_revision";

/// How often the head is read even without a notification: covers notifications lost while the
/// listening connection was down.
const CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);

sql_rows!(PgConnection, lock: super::sql::LOCK_REVISION, set: super::sql::SET_REVISION_AND_NOTIFY);

impl KvStore for PostgresStore {
    sql_reads!(pool: |store| store.pool(), run: |step| store.uncommitted(step).await?);

    async fn write_batch(&self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, StoreError>> {
        let Ok(_turn) = tokio::time::timeout(self.timeout(), self.writing.lock()).await else {
            let busy = || {
                let waited = format!("no turn to write within {:?}", self.timeout());
                Err(StoreFailure::Unavailable(waited).into())
            };
            return writes.iter().map(|_| busy()).collect();
        };
        let mut results = Vec::with_capacity(writes.len());
        for write in &writes {
            results.push(apply_one(self, write).await);
        }
        results
    }
}

/// A write in a transaction of its own. A failure before the commit rolls it back (the
/// transaction is dropped) and nothing is applied; only the commit's own failure leaves the
/// outcome unknown.
async fn apply_one(store: &PostgresStore, write: &Write) -> Result<WriteOutcome, StoreError> {
    let now = super::now_ms();
    let mut connection = store.acquire().await?;
    let mut tx = store
        .uncommitted(sqlx::Connection::begin(&mut *connection))
        .await?;
    let statements = async {
        match apply(&mut *tx, write, now).await {
            Ok(outcome) => Ok(Ok(outcome)),
            Err(StoreError::Database(err)) => Err(err),
            // Refused by the write's own rules (a version that does not match, ...).
            Err(refused) => Ok(Err(refused)),
        }
    };
    let outcome = store.uncommitted(statements).await??;
    store.committing(tx.commit()).await?;
    Ok(outcome)
}

/// Keeps `head` at the store's revision as the replicas' writes announce it, until `shutdown`:
/// LISTEN for their notifications, and read the revision every second in case one was lost
/// while the listening connection was down.
pub async fn follow_revisions(
    store: &PostgresStore,
    head: watch::Sender<i64>,
    shutdown: CancellationToken,
) {
    let mut listener = None;
    let mut tick = tokio::time::interval(CATCH_UP_INTERVAL);
    loop {
        if listener.is_none() {
            listener = match PgListener::connect_with(store.pool()).await {
                Ok(mut connected) => match connected.listen(CHANNEL).await {
                    Ok(()) => Some(connected),
                    Err(err) => {
                        warn!(%err, "cannot listen for revisions; retrying");
                        None
                    }
                },
                Err(err) => {
                    warn!(%err, "cannot open the revision listener; retrying");
                    None
                }
            };
        }
        let notified = async {
            match listener.as_mut() {
                Some(listening) => listening.try_recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                match store.head().await {
                    Ok(current) => advance(&head, current.revision),
                    Err(err) => warn!(%err, "cannot read the revision; retrying"),
                }
            }
            notification = notified => match notification {
                Ok(Some(notification)) => {
                    if let Ok(revision) = notification.payload().parse() {
                        advance(&head, revision);
                    }
                }
                // The connection was lost; the next try_recv reconnects, and the tick reads what
                // was announced meanwhile.
                Ok(None) => warn!("revision listener connection lost; reconnecting"),
                Err(err) => {
                    warn!(%err, "revision listener failed; reopening it");
                    listener = None;
                }
            },
        }
    }
}
