//! The SQLite store (`--store sqlite:PATH`, the default): one file, survives restarts and
//! `kill -9`, for a single instance (replicas share PostgreSQL instead).
//!
//! Durability: WAL journal with `synchronous=FULL`, so a commit returns only once the WAL is
//! synced to disk, and a put is answered only after its commit. That survives a crash of the
//! process and of the machine.
//!
//! Writes go through one writer task with group commit: SQLite allows one writer at a time, and a
//! durable commit costs an fsync, so the writer takes every put and delete waiting in its queue,
//! applies them in one transaction and commits once, then answers them all. Many concurrent
//! writers thus share each fsync instead of queueing for one apiece, and no writer ever sees
//! `SQLITE_BUSY`. Reads use a separate pool of read-only connections, which WAL lets run
//! alongside the writer.
//!
//! A file that exists is checked before anything else touches it (`PRAGMA quick_check`, or
//! `integrity_check` with `--check-store full`, in shared's `sqlite` module): a damaged file
//! would otherwise open fine and fail only the requests that read the damaged page.

use std::{
    path::Path,
    sync::{Mutex, PoisonError},
    time::Duration,
};

use sqlx::{
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
    SqliteConnection, SqlitePool,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{apply::apply, KvStore, StoreError, StoreOptions, Write, WriteOutcome};

/// Writes applied in one transaction at most; bounds the latency a batch adds to its first write.
const MAX_BATCH: usize = 512;

/// Writes that may wait for the writer; further callers wait for room.
const QUEUE_CAPACITY: usize = 4096;

const READERS: u32 = 4;

pub struct SqliteStore {
    readers: SqlitePool,
    queue: mpsc::Sender<Queued>,
    stop_writer: CancellationToken,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// A write waiting for the writer task, with where to send its result.
struct Queued {
    write: Write,
    done: oneshot::Sender<Result<WriteOutcome, StoreError>>,
}

impl SqliteStore {
    pub async fn open(path: &Path, store_options: StoreOptions) -> Result<SqliteStore, StoreError> {
        // Before anything writes to it (migrations): a damaged file is refused, not served.
        shared::sqlite::check(path, store_options.check).await?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        let writer_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer_pool)
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options.read_only(true))
            .await?;

        let (queue, queued) = mpsc::channel(QUEUE_CAPACITY);
        let stop_writer = CancellationToken::new();
        let writer = tokio::spawn(write_loop(writer_pool, queued, stop_writer.clone()));
        Ok(SqliteStore {
            readers,
            queue,
            stop_writer,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Applies the writes already queued, then closes the database.
    pub async fn close(&self) {
        self.stop_writer.cancel();
        let writer = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
        self.readers.close().await;
    }

    /// Queues a write; the receiver gets its result once it is committed.
    async fn enqueue(
        &self,
        write: Write,
    ) -> Result<oneshot::Receiver<Result<WriteOutcome, StoreError>>, StoreError> {
        let (done, result) = oneshot::channel();
        self.queue
            .send(Queued { write, done })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(result)
    }
}

sql_rows!(SqliteConnection, lock: super::sql::HEAD_REVISION, set: super::sql::SET_REVISION);

impl KvStore for SqliteStore {
    sql_reads!(pool: |store| &store.readers, run: |step| step.await?);

    async fn write_batch(&self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, StoreError>> {
        // Queue them all first (in order, so they apply in order), then wait: the writer takes
        // them into one transaction.
        let mut pending = Vec::with_capacity(writes.len());
        for write in writes {
            pending.push(self.enqueue(write).await);
        }
        let mut results = Vec::with_capacity(pending.len());
        for queued in pending {
            results.push(match queued {
                Ok(result) => result.await.unwrap_or(Err(StoreError::Closed)),
                Err(err) => Err(err),
            });
        }
        results
    }
}

/// The writer task: see the module docs. Runs until `stop` is cancelled, then applies what is
/// still queued and closes the pool.
async fn write_loop(pool: SqlitePool, mut queue: mpsc::Receiver<Queued>, stop: CancellationToken) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            biased;
            received = queue.recv_many(&mut batch, MAX_BATCH) => received,
            _ = stop.cancelled() => {
                // Refuse new writes, but finish those already accepted.
                queue.close();
                queue.recv_many(&mut batch, MAX_BATCH).await
            }
        };
        if received == 0 {
            break;
        }
        apply_batch(&pool, &mut batch).await;
    }
    pool.close().await;
}

/// Applies a batch in one transaction and answers every write in it. If the transaction fails,
/// each write is retried in a transaction of its own, so one failing write cannot fail others.
async fn apply_batch(pool: &SqlitePool, batch: &mut Vec<Queued>) {
    let writes: Vec<&Write> = batch.iter().map(|queued| &queued.write).collect();
    match apply_in_transaction(pool, &writes).await {
        Ok(results) => {
            for (queued, result) in batch.drain(..).zip(results) {
                let _ = queued.done.send(Ok(result));
            }
        }
        Err(err) => {
            tracing::warn!(%err, writes = batch.len(), "batch failed; retrying its writes one by one");
            for queued in batch.drain(..) {
                let result = apply_in_transaction(pool, &[&queued.write])
                    .await
                    .map(|mut results| results.remove(0));
                let _ = queued.done.send(result);
            }
        }
    }
}

async fn apply_in_transaction(
    pool: &SqlitePool,
    writes: &[&Write],
) -> Result<Vec<WriteOutcome>, StoreError> {
    let now = super::now_ms();
    let mut tx = pool.begin().await?;
    let mut results = Vec::with_capacity(writes.len());
    for write in writes {
        results.push(apply(&mut *tx, write, now).await?);
    }
    tx.commit().await?;
    Ok(results)
}
