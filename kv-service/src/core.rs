//! The one core both doors (REST and the text protocol) call: get, put, delete, list and
//! transactions, with the rules that must not differ between them (key and value limits,
//! conflicts, paging), and what keeps the store's revision known to watchers
//! ([`Kv::run_background`]: expiry, compaction, and on PostgreSQL the other replicas' writes).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    store::{
        self, advance, Condition, Item, KeyFilter, KvBackend, KvStore, Op, PutOutcome, StoreError,
        Test, Txn, TxnOutcome, Versioned, Write, WriteOutcome, MAX_TXN_OPS,
    },
    watch::Watcher,
};

/// Keys are 1 to this many bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// Values are at most this many bytes of UTF-8.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Page size of a listing when the caller names none.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Largest page a listing returns.
pub const MAX_LIST_LIMIT: usize = 1000;

/// How often keys whose time has come are removed: an `expire` event reaches watchers well
/// within a second of the expiry (readers stop seeing the key at the expiry itself).
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Keys one sweep removes at most, in one write.
const SWEEP_BATCH: usize = 256;
/// How often the change log is trimmed to the history.
const COMPACT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8 (got {0} bytes)")]
    InvalidKey(usize),
    #[error("value must be at most {MAX_VALUE_BYTES} bytes of UTF-8 (got {0} bytes)")]
    ValueTooLong(usize),
    #[error("key already exists: {0}")]
    KeyExists(String),
    #[error("version mismatch for {key}: expected {expected}, {}", current_version(.current))]
    VersionMismatch {
        key: String,
        expected: i64,
        current: Option<i64>,
    },
    #[error("limit must be between 1 and {MAX_LIST_LIMIT} (got {0})")]
    InvalidLimit(usize),
    /// A transaction that cannot run; the message names the element at fault.
    #[error("{0}")]
    InvalidTxn(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn current_version(current: &Option<i64>) -> String {
    match current {
        Some(version) => format!("current version is {version}"),
        None => "the key does not exist".to_owned(),
    }
}

/// A page of a listing: `next` is the key to pass as `after` for the following page, or `None`
/// when this page is the last; `revision` is the store's when it was read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<Item>,
    pub next: Option<String>,
    pub revision: i64,
}

/// What a put wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    pub version: i64,
    pub revision: i64,
    pub expires_at: Option<i64>,
}

/// The key-value core: a cheap-to-clone handle on the store and on the newest revision known
/// here, which watchers wait on.
#[derive(Clone)]
pub struct Kv {
    store: Arc<KvBackend>,
    head: Arc<watch::Sender<i64>>,
}

impl Kv {
    pub fn new(store: KvBackend) -> Kv {
        Kv {
            store: Arc::new(store),
            head: Arc::new(watch::Sender::new(0)),
        }
    }

    pub(crate) fn store(&self) -> &KvBackend {
        &self.store
    }

    /// The newest revision known here, as it moves.
    pub(crate) fn follow_head(&self) -> watch::Receiver<i64> {
        self.head.subscribe()
    }

    /// Notes a revision read from the store, for watchers.
    pub(crate) fn note_revision(&self, revision: i64) {
        advance(&self.head, revision);
    }

    /// Notes the revisions writes took, for watchers.
    fn advance(&self, revision: Option<i64>) {
        if let Some(revision) = revision {
            advance(&self.head, revision);
        }
    }

    /// Keeps the store's revision known here and the store tidy, until `shutdown`: removes
    /// expired keys (each with an `expire` change), trims the change log to the newest
    /// `history` revisions, and on PostgreSQL follows the other replicas' writes.
    pub async fn run_background(&self, history: u64, shutdown: CancellationToken) {
        match self.store.head().await {
            Ok(head) => advance(&self.head, head.revision),
            Err(err) => warn!(%err, "cannot read the store's revision yet"),
        }
        let following = async {
            if let KvBackend::Postgres(store) = &*self.store {
                store::follow_revisions(store, (*self.head).clone(), shutdown.clone()).await;
            }
        };
        let sweeping = async {
            let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
            let mut compact = tokio::time::interval(COMPACT_INTERVAL);
            sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            compact.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let write = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = sweep.tick() => Write::ExpireDue { limit: SWEEP_BATCH },
                    _ = compact.tick() => Write::Compact { keep: history },
                };
                match self.store.write(write).await {
                    Ok(outcome) => self.advance(outcome.revision()),
                    Err(err) => warn!(%err, "background store upkeep failed; retrying"),
                }
            }
        };
        tokio::join!(following, sweeping);
    }

    pub async fn get(&self, key: &str) -> Result<Option<Versioned>, KvError> {
        check_key(key)?;
        Ok(self.timed("get", self.store.get(key)).await?)
    }

    /// Writes `value` under `key` if `condition` holds, expiring after `ttl` (never without),
    /// and returns what was written.
    pub async fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
        ttl: Option<Duration>,
    ) -> Result<Written, KvError> {
        check_key(key)?;
        check_value(&value)?;
        let expires_at = ttl.map(store::expiry_after);
        match self
            .timed(
                "put",
                self.store.put_expiring(key, value, condition, expires_at),
            )
            .await?
        {
            PutOutcome::Written { version, revision } => {
                self.advance(Some(revision));
                Ok(Written {
                    version,
                    revision,
                    expires_at,
                })
            }
            PutOutcome::Conflict { current } => Err(conflict(key, condition, current)),
        }
    }

    /// Whether [`Kv::write_batch`] beats writing one at a time (see [`KvBackend::queues_writes`]).
    pub fn queues_writes(&self) -> bool {
        self.store.queues_writes()
    }

    /// Applies plain puts and deletes as if one after the other, in order: for a put the new
    /// version, for a delete its revision (`None`: the key was absent). Pipelined writes from
    /// one client go through here, so on SQLite they share a commit.
    pub async fn write_batch(&self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, KvError>> {
        let mut results: Vec<Option<Result<WriteOutcome, KvError>>> = Vec::new();
        let mut valid = Vec::with_capacity(writes.len());
        let mut checks = Vec::with_capacity(writes.len());
        for write in writes {
            let checked = match &write {
                Write::Put { key, value, .. } => check_key(key).and_then(|()| check_value(value)),
                Write::Delete { key } => check_key(key),
                _ => Err(KvError::InvalidTxn(
                    "only puts and deletes are batched".into(),
                )),
            };
            match checked {
                Ok(()) => {
                    checks.push(match &write {
                        Write::Put { key, condition, .. } => ConflictCheck {
                            key: key.clone(),
                            condition: Some(*condition),
                        },
                        // A delete never conflicts.
                        _ => ConflictCheck {
                            key: String::new(),
                            condition: None,
                        },
                    });
                    valid.push(write);
                    results.push(None);
                }
                Err(err) => results.push(Some(Err(err))),
            }
        }
        let started = std::time::Instant::now();
        let applied = self.store.write_batch(valid).await;
        let failed = applied.iter().any(Result::is_err);
        let store = crate::metrics::store_label(&self.store);
        crate::metrics::record(store, "write_batch", !failed, started.elapsed());
        let newest = applied
            .iter()
            .filter_map(|outcome| outcome.as_ref().ok()?.revision())
            .max();
        self.advance(newest);
        let mut applied = applied.into_iter().zip(checks);
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    let (outcome, check) = applied.next().expect("one result per valid write");
                    match (outcome?, check.condition) {
                        (WriteOutcome::Put(PutOutcome::Conflict { current }), Some(condition)) => {
                            Err(conflict(&check.key, condition, current))
                        }
                        (outcome, _) => Ok(outcome),
                    }
                })
            })
            .collect()
    }

    /// Removes `key`; the delete's revision, or `None` when it did not exist.
    pub async fn delete(&self, key: &str) -> Result<Option<i64>, KvError> {
        check_key(key)?;
        let revision = self.timed("delete", self.store.delete(key)).await?;
        self.advance(revision);
        Ok(revision)
    }

    /// Keys starting with `prefix` that sort after `after`, in key order, `limit` at most.
    pub async fn list(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Page, KvError> {
        if !(1..=MAX_LIST_LIMIT).contains(&limit) {
            return Err(KvError::InvalidLimit(limit));
        }
        // One extra item tells whether another page follows.
        let listing = self
            .timed("list", self.store.list(prefix, after, limit + 1))
            .await?;
        let mut items = listing.items;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|item| item.key.clone())
        } else {
            None
        };
        Ok(Page {
            items,
            next,
            revision: listing.revision,
        })
    }

    /// Applies `success` if every compare holds, else `failure`, as one change.
    pub async fn txn(&self, txn: Txn) -> Result<TxnOutcome, KvError> {
        check_txn(&txn)?;
        let outcome = self.store.txn(txn).await?;
        self.advance(Some(outcome.revision));
        Ok(outcome)
    }

    /// A watcher of the keys `filter` matches, from the changes after `from` (live from now
    /// without).
    pub async fn watch(&self, filter: KeyFilter, from: Option<i64>) -> Result<Watcher, KvError> {
        match &filter {
            KeyFilter::Key(key) => check_key(key)?,
            // An empty prefix watches every key.
            KeyFilter::Prefix(prefix) if !prefix.is_empty() => check_key(prefix)?,
            KeyFilter::Prefix(_) => {}
        }
        Watcher::start(self.clone(), filter, from).await
    }

    /// Runs a store operation, counted in the metrics (`crate::metrics`).
    async fn timed<T, E>(
        &self,
        op: &'static str,
        operation: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        crate::metrics::timed(crate::metrics::store_label(&self.store), op, operation).await
    }

    /// Finishes pending writes and closes the store.
    pub async fn close(&self) {
        self.store.close().await;
    }
}

/// Checks a transaction's size and every key and value in it, naming the element at fault
/// (`compare[0].key`, `success[2].put.value`...).
fn check_txn(txn: &Txn) -> Result<(), KvError> {
    let count = txn.compare.len() + txn.success.len() + txn.failure.len();
    if count > MAX_TXN_OPS {
        return Err(KvError::InvalidTxn(format!(
            "a transaction holds at most {MAX_TXN_OPS} compares and operations (got {count})"
        )));
    }
    let at = |place: String| move |err: KvError| KvError::InvalidTxn(format!("{place}: {err}"));
    for (i, compare) in txn.compare.iter().enumerate() {
        check_key(&compare.key).map_err(at(format!("compare[{i}].key")))?;
        if let Test::Value(value) = &compare.test {
            check_value(value).map_err(at(format!("compare[{i}].value")))?;
        }
    }
    for (branch, ops) in [("success", &txn.success), ("failure", &txn.failure)] {
        for (i, op) in ops.iter().enumerate() {
            let name = match op {
                Op::Put { .. } => "put",
                Op::Delete { .. } => "delete",
                Op::Get { .. } => "get",
            };
            check_key(op.key()).map_err(at(format!("{branch}[{i}].{name}.key")))?;
            if let Op::Put { value, .. } = op {
                check_value(value).map_err(at(format!("{branch}[{i}].put.value")))?;
            }
        }
    }
    Ok(())
}

/// What turns a batched write's conflict into the error a single put would give: its key and
/// its condition (`None` for a delete, which never conflicts).
struct ConflictCheck {
    key: String,
    condition: Option<Condition>,
}

fn conflict(key: &str, condition: Condition, current: Option<i64>) -> KvError {
    match condition {
        Condition::IfVersion(expected) => KvError::VersionMismatch {
            key: key.to_owned(),
            expected,
            current,
        },
        Condition::IfAbsent | Condition::Always => KvError::KeyExists(key.to_owned()),
    }
}

fn check_value(value: &str) -> Result<(), KvError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(KvError::ValueTooLong(value.len()));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), KvError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(KvError::InvalidKey(key.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn kv() -> Kv {
        Kv::new(KvBackend::Memory(MemoryStore::new()))
    }

    #[tokio::test]
    async fn rejects_keys_and_values_outside_the_limits() {
        let kv = kv();
        assert!(matches!(kv.get("").await, Err(KvError::InvalidKey(0))));
        let long_key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            kv.put(&long_key, "v".into(), Condition::Always, None).await,
            Err(KvError::InvalidKey(1025))
        ));
        let longest_key = "é".repeat(MAX_KEY_BYTES / 2);
        assert_eq!(
            kv.put(&longest_key, "v".into(), Condition::Always, None)
                .await
                .unwrap()
                .version,
            1
        );
        let value = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            kv.put("k", value, Condition::Always, None).await,
            Err(KvError::ValueTooLong(_))
        ));
        let value = "v".repeat(MAX_VALUE_BYTES);
        let written = kv.put("k", value, Condition::Always, None).await.unwrap();
        assert_eq!((written.version, written.revision), (1, 2));
    }

    #[tokio::test]
    async fn conflicts_name_the_key_and_versions() {
        let kv = kv();
        kv.put("a", "1".into(), Condition::Always, None)
            .await
            .unwrap();
        let err = kv
            .put("a", "2".into(), Condition::IfVersion(5), None)
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "version mismatch for a: expected 5, current version is 1"
        );
        let err = kv
            .put("a", "2".into(), Condition::IfAbsent, None)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "key already exists: a");
    }

    #[tokio::test]
    async fn write_batches_apply_in_order_with_one_result_each() {
        let kv = kv();
        let put = |key: &str, value: &str| Write::Put {
            key: key.into(),
            value: value.into(),
            condition: Condition::Always,
            expires_at: None,
        };
        let results = kv
            .write_batch(vec![
                put("a", "1"),
                put("", "empty key"),
                put("a", "2"),
                Write::Delete { key: "b".into() },
                Write::Put {
                    key: "a".into(),
                    value: "3".into(),
                    condition: Condition::IfAbsent,
                    expires_at: None,
                },
                Write::Delete { key: "a".into() },
            ])
            .await;
        assert_eq!(results.len(), 6);
        assert!(matches!(
            results[0],
            Ok(WriteOutcome::Put(PutOutcome::Written {
                version: 1,
                revision: 1
            }))
        ));
        assert!(matches!(results[1], Err(KvError::InvalidKey(0))));
        assert!(matches!(
            results[2],
            Ok(WriteOutcome::Put(PutOutcome::Written {
                version: 2,
                revision: 2
            }))
        ));
        assert!(matches!(results[3], Ok(WriteOutcome::Delete(None))));
        assert!(matches!(&results[4], Err(KvError::KeyExists(key)) if key == "a"));
        assert!(matches!(results[5], Ok(WriteOutcome::Delete(Some(3)))));
        assert_eq!(kv.get("a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn pages_link_through_next() {
        let kv = kv();
        for key in ["a", "b", "c", "d", "e"] {
            kv.put(key, key.into(), Condition::Always, None)
                .await
                .unwrap();
        }
        let first = kv.list("", None, 2).await.unwrap();
        assert_eq!(first.next.as_deref(), Some("b"));
        let second = kv.list("", first.next.as_deref(), 2).await.unwrap();
        assert_eq!(second.next.as_deref(), Some("d"));
        let last = kv.list("", second.next.as_deref(), 2).await.unwrap();
        assert_eq!(last.items.len(), 1);
        assert_eq!(last.next, None);
        let exact = kv.list("", None, 5).await.unwrap();
        assert_eq!((exact.items.len(), exact.next), (5, None));
        assert!(matches!(
            kv.list("", None, 0).await,
            Err(KvError::InvalidLimit(0))
        ));
        assert!(matches!(
            kv.list("", None, 1001).await,
            Err(KvError::InvalidLimit(1001))
        ));
    }
}
