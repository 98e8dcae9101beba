//! The rules of a write, written once for every backend: conditions, transactions, expiry and
//! the revision each change takes. A backend only says how to read and change its rows
//! ([`Rows`]); [`apply`] runs inside whatever makes the write atomic there (the memory store's
//! lock, a SQL transaction).

use std::{collections::HashMap, future::Future};

use super::{
    Change, ChangeKind, Condition, Op, OpResult, PutOutcome, StoreError, Test, Txn, TxnOutcome,
    Versioned, Write, WriteOutcome,
};

/// What [`apply`] needs of a backend, inside the step that makes a write atomic. Rows are seen
/// whatever their expiry: deciding that a row has expired is [`apply`]'s job.
pub trait Rows: Send {
    /// The store's revision. The SQL stores also take the lock that serializes writes here.
    fn revision(&mut self) -> impl Future<Output = Result<i64, StoreError>> + Send;

    fn load(
        &mut self,
        key: &str,
    ) -> impl Future<Output = Result<Option<Versioned>, StoreError>> + Send;

    /// Inserts or replaces the row.
    fn store(
        &mut self,
        key: &str,
        row: Versioned,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    fn remove(&mut self, key: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Appends a change to the log; `seq` orders the changes of one revision.
    fn record(
        &mut self,
        seq: i64,
        change: Change,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Sets the store's revision, once the write's changes are recorded.
    fn set_revision(
        &mut self,
        revision: i64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Up to `limit` keys whose expiry is at or before `now`.
    fn due(
        &mut self,
        now: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<String>, StoreError>> + Send;

    /// Drops the log's changes up to revision `through`.
    fn compact(&mut self, through: i64) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// Applies one write at time `now` (ms since the epoch).
pub async fn apply<R: Rows>(
    rows: &mut R,
    write: &Write,
    now: i64,
) -> Result<WriteOutcome, StoreError> {
    let revision = rows.revision().await?;
    let mut writer = Writer {
        rows,
        revision,
        changed: false,
        now,
    };
    let outcome = match write {
        Write::Put {
            key,
            value,
            condition,
            expires_at,
        } => {
            let current = writer.live(key).await?;
            let allowed = match (condition, &current) {
                (Condition::Always, _) => true,
                (Condition::IfVersion(expected), Some(row)) => row.version == *expected,
                (Condition::IfVersion(_), None) => false,
                (Condition::IfAbsent, found) => found.is_none(),
            };
            if allowed {
                let revision = writer.next();
                let version = current.map_or(1, |row| row.version + 1);
                writer
                    .put(revision, 0, key, value, version, *expires_at)
                    .await?;
                WriteOutcome::Put(PutOutcome::Written { version, revision })
            } else {
                WriteOutcome::Put(PutOutcome::Conflict {
                    current: current.map(|row| row.version),
                })
            }
        }
        Write::Delete { key } => match writer.live(key).await? {
            Some(row) => {
                let revision = writer.next();
                writer
                    .remove(revision, 0, key, ChangeKind::Delete, row.version)
                    .await?;
                WriteOutcome::Delete(Some(revision))
            }
            None => WriteOutcome::Delete(None),
        },
        Write::Txn(txn) => WriteOutcome::Txn(writer.txn(txn).await?),
        Write::ExpireDue { limit } => {
            let mut count = 0;
            for key in writer.rows.due(now, *limit).await? {
                // `live` expires it, with a change of its own.
                if writer.live(&key).await?.is_none() {
                    count += 1;
                }
            }
            WriteOutcome::Expired {
                count,
                revision: writer.revision,
            }
        }
        Write::Compact { keep } => {
            let through = writer
                .revision
                .saturating_sub(i64::try_from(*keep).unwrap_or(i64::MAX));
            if through > 0 {
                writer.rows.compact(through).await?;
            }
            WriteOutcome::Compacted
        }
    };
    writer.finish().await?;
    Ok(outcome)
}

/// One write in progress: the revision it has reached and whether it changed anything.
struct Writer<'r, R> {
    rows: &'r mut R,
    revision: i64,
    changed: bool,
    now: i64,
}

impl<R: Rows> Writer<'_, R> {
    /// The next revision, for a change about to be made.
    fn next(&mut self) -> i64 {
        self.revision += 1;
        self.changed = true;
        self.revision
    }

    /// The key's row if it is live. A row past its expiry is removed here with an `expire`
    /// change of its own revision, so whatever the write then does comes after it.
    async fn live(&mut self, key: &str) -> Result<Option<Versioned>, StoreError> {
        match self.rows.load(key).await? {
            Some(row) if row.expired(self.now) => {
                let revision = self.next();
                self.remove(revision, 0, key, ChangeKind::Expire, row.version)
                    .await?;
                Ok(None)
            }
            found => Ok(found),
        }
    }

    async fn put(
        &mut self,
        revision: i64,
        seq: i64,
        key: &str,
        value: &str,
        version: i64,
        expires_at: Option<i64>,
    ) -> Result<(), StoreError> {
        let row = Versioned {
            value: value.to_owned(),
            version,
            revision,
            expires_at,
        };
        self.rows.store(key, row).await?;
        let change = Change {
            revision,
            kind: ChangeKind::Put,
            key: key.to_owned(),
            value: Some(value.to_owned()),
            version,
        };
        self.rows.record(seq, change).await
    }

    async fn remove(
        &mut self,
        revision: i64,
        seq: i64,
        key: &str,
        kind: ChangeKind,
        version: i64,
    ) -> Result<(), StoreError> {
        self.rows.remove(key).await?;
        let change = Change {
            revision,
            kind,
            key: key.to_owned(),
            value: None,
            version,
        };
        self.rows.record(seq, change).await
    }

    async fn txn(&mut self, txn: &Txn) -> Result<TxnOutcome, StoreError> {
        // Every key the transaction names is read (and expired if due) before anything else, so
        // the expiries take revisions before the transaction's own.
        let mut seen: HashMap<&str, Option<Versioned>> = HashMap::new();
        for key in txn.keys() {
            if !seen.contains_key(key) {
                let row = self.live(key).await?;
                seen.insert(key, row);
            }
        }
        let succeeded = txn
            .compare
            .iter()
            .all(|compare| holds(&compare.test, seen[compare.key.as_str()].as_ref()));
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        let mutates = ops.iter().any(|op| !matches!(op, Op::Get { .. }));
        let revision = if mutates { self.next() } else { self.revision };
        let mut seq = 0;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            let key = op.key();
            let slot = seen.get_mut(key).expect("every key was read");
            results.push(match op {
                Op::Put {
                    value, expires_at, ..
                } => {
                    let version = slot.as_ref().map_or(1, |row| row.version + 1);
                    *slot = Some(Versioned {
                        value: value.clone(),
                        version,
                        revision,
                        expires_at: *expires_at,
                    });
                    self.put(revision, seq, key, value, version, *expires_at)
                        .await?;
                    seq += 1;
                    OpResult::Put {
                        key: key.to_owned(),
                        version,
                        revision,
                        expires_at: *expires_at,
                    }
                }
                Op::Delete { .. } => {
                    let deleted = match slot.take() {
                        Some(row) => {
                            self.remove(revision, seq, key, ChangeKind::Delete, row.version)
                                .await?;
                            seq += 1;
                            true
                        }
                        None => false,
                    };
                    OpResult::Delete {
                        key: key.to_owned(),
                        deleted,
                    }
                }
                Op::Get { .. } => OpResult::Get {
                    key: key.to_owned(),
                    found: slot.clone(),
                },
            });
        }
        Ok(TxnOutcome {
            succeeded,
            revision: self.revision,
            results,
        })
    }

    async fn finish(self) -> Result<(), StoreError> {
        if self.changed {
            self.rows.set_revision(self.revision).await?;
        }
        Ok(())
    }
}

/// Whether a compare holds for the key's live row.
fn holds(test: &Test, row: Option<&Versioned>) -> bool {
    match (test, row) {
        (Test::Version(version), Some(row)) => row.version == *version,
        (Test::Exists(exists), row) => row.is_some() == *exists,
        (Test::Value(value), Some(row)) => row.value == *value,
        (Test::Version(_) | Test::Value(_), None) => false,
    }
}

/// Implements [`Rows`] for a SQL connection type with the shared statements ([`super::sql`]).
/// `$lock` reads the revision and locks it until the transaction ends; `$set` sets it (binding
/// the new revision), and on PostgreSQL also sends the NOTIFY, which commits with the
/// transaction, in the same round trip.
macro_rules! sql_rows {
    ($conn:ty, lock: $lock:expr, set: $set:expr) => {
        impl $crate::store::Rows for $conn {
            async fn revision(&mut self) -> Result<i64, $crate::store::StoreError> {
                Ok(sqlx::query_scalar($lock).fetch_one(&mut *self).await?)
            }

            async fn load(
                &mut self,
                key: &str,
            ) -> Result<Option<$crate::store::Versioned>, $crate::store::StoreError> {
                let row: Option<$crate::store::ValueRow> = sqlx::query_as($crate::store::sql::LOAD)
                    .bind(key.as_bytes())
                    .fetch_optional(&mut *self)
                    .await?;
                row.map($crate::store::ValueRow::into_versioned).transpose()
            }

            async fn store(
                &mut self,
                key: &str,
                row: $crate::store::Versioned,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::sql::STORE)
                    .bind(key.as_bytes())
                    .bind(row.value.as_bytes())
                    .bind(row.version)
                    .bind(row.revision)
                    .bind(row.expires_at)
                    .execute(&mut *self)
                    .await?;
                Ok(())
            }

            async fn remove(&mut self, key: &str) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::sql::REMOVE)
                    .bind(key.as_bytes())
                    .execute(&mut *self)
                    .await?;
                Ok(())
            }

            async fn record(
                &mut self,
                seq: i64,
                change: $crate::store::Change,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::sql::RECORD)
                    .bind(change.revision)
                    .bind(seq)
                    .bind(change.key.as_bytes())
                    .bind(change.kind.code())
                    .bind(change.value.as_ref().map(|value| value.as_bytes()))
                    .bind(change.version)
                    .execute(&mut *self)
                    .await?;
                Ok(())
            }

            async fn set_revision(
                &mut self,
                revision: i64,
            ) -> Result<(), $crate::store::StoreError> {
                sqlx::query($set).bind(revision).execute(&mut *self).await?;
                Ok(())
            }

            async fn due(
                &mut self,
                now: i64,
                limit: usize,
            ) -> Result<Vec<String>, $crate::store::StoreError> {
                let keys: Vec<Vec<u8>> = sqlx::query_scalar($crate::store::sql::DUE)
                    .bind(now)
                    .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                    .fetch_all(&mut *self)
                    .await?;
                keys.into_iter().map($crate::store::utf8).collect()
            }

            async fn compact(&mut self, through: i64) -> Result<(), $crate::store::StoreError> {
                sqlx::query($crate::store::sql::COMPACT_LOG)
                    .bind(through)
                    .execute(&mut *self)
                    .await?;
                sqlx::query($crate::store::sql::SET_COMPACTED)
                    .bind(through)
                    .execute(&mut *self)
                    .await?;
                Ok(())
            }
        }
    };
}

/// The read methods of [`super::KvStore`] for a SQL store: `$pool` is the pool reads use (given
/// the store as `$store`), `$run` runs a step `$step` of it and yields its value (with the
/// store's timeout, for PostgreSQL).
macro_rules! sql_reads {
    (pool: |$store:ident| $pool:expr, run: |$step:ident| $run:expr) => {
        async fn get(
            &self,
            key: &str,
        ) -> Result<Option<$crate::store::Versioned>, $crate::store::StoreError> {
            let $store = self;
            let $step = sqlx::query_as($crate::store::sql::GET)
                .bind(key.as_bytes())
                .bind($crate::store::now_ms())
                .fetch_optional($pool);
            let row: Option<$crate::store::ValueRow> = $run;
            row.map($crate::store::ValueRow::into_versioned).transpose()
        }

        async fn list(
            &self,
            prefix: &str,
            after: Option<&str>,
            limit: usize,
        ) -> Result<$crate::store::Listing, $crate::store::StoreError> {
            let $store = self;
            let (lower, inclusive) = $crate::store::lower_bound(prefix, after);
            let upper = $crate::store::prefix_upper_bound(prefix.as_bytes());
            let $step = sqlx::query_as($crate::store::sql::list(inclusive))
                .bind(lower)
                .bind(upper)
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .bind($crate::store::now_ms())
                .fetch_all($pool);
            let rows: Vec<$crate::store::ItemRow> = $run;
            let head = self.head().await?;
            Ok($crate::store::Listing {
                items: $crate::store::items(rows)?,
                revision: head.revision,
            })
        }

        async fn head(&self) -> Result<$crate::store::Head, $crate::store::StoreError> {
            let $store = self;
            let $step = sqlx::query_as($crate::store::sql::HEAD).fetch_one($pool);
            let (revision, compacted): (i64, i64) = $run;
            Ok($crate::store::Head {
                revision,
                compacted,
            })
        }

        async fn changes(
            &self,
            after: i64,
            filter: &$crate::store::KeyFilter,
        ) -> Result<$crate::store::ChangePage, $crate::store::StoreError> {
            // The head first: every change up to it is committed (writes commit in revision
            // order), so reading up to it misses none.
            let head = self.head().await?;
            let $store = self;
            let (lower, upper) = filter.range();
            let $step = sqlx::query_as($crate::store::sql::CHANGES)
                .bind(after)
                .bind(head.revision)
                .bind(lower)
                .bind(upper)
                .bind(i64::try_from($crate::store::CHANGE_PAGE).unwrap_or(i64::MAX))
                .fetch_all($pool);
            let rows: Vec<$crate::store::ChangeRow> = $run;
            $crate::store::change_page(rows, head)
        }
    };
}
