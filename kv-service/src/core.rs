//! The one core both doors (REST and the text protocol) call: get, put, delete and list, with the
//! rules that must not differ between them (key and value limits, conflicts, paging).

use std::sync::Arc;

use serde::Serialize;

use crate::store::{
    Condition, Item, KvBackend, KvStore, PutOutcome, StoreError, Versioned, Write, WriteOutcome,
};

/// Keys are 1 to this many bytes of UTF-8.
pub const MAX_KEY_BYTES: usize = 1024;
/// Values are at most this many bytes of UTF-8.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Page size of a listing when the caller names none.
pub const DEFAULT_LIST_LIMIT: usize = 100;
/// Largest page a listing returns.
pub const MAX_LIST_LIMIT: usize = 1000;

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
/// when this page is the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Page {
    pub items: Vec<Item>,
    pub next: Option<String>,
}

/// The key-value core: a cheap-to-clone handle on the store.
#[derive(Clone)]
pub struct Kv {
    store: Arc<KvBackend>,
}

impl Kv {
    pub fn new(store: KvBackend) -> Kv {
        Kv {
            store: Arc::new(store),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Versioned>, KvError> {
        check_key(key)?;
        Ok(self.timed("get", self.store.get(key)).await?)
    }

    /// Writes `value` under `key` if `condition` holds and returns the new version.
    pub async fn put(
        &self,
        key: &str,
        value: String,
        condition: Condition,
    ) -> Result<i64, KvError> {
        check_key(key)?;
        check_value(&value)?;
        match self
            .timed("put", self.store.put(key, value, condition))
            .await?
        {
            PutOutcome::Written { version } => Ok(version),
            PutOutcome::Conflict { current } => Err(conflict(key, condition, current)),
        }
    }

    /// Whether [`Kv::write_batch`] beats writing one at a time (see [`KvBackend::queues_writes`]).
    pub fn queues_writes(&self) -> bool {
        self.store.queues_writes()
    }

    /// Applies writes as if one after the other, in order: for a put the new version, for a
    /// delete whether the key existed. Pipelined writes from one client go through here, so on
    /// SQLite they share a commit.
    pub async fn write_batch(&self, writes: Vec<Write>) -> Vec<Result<WriteOutcome, KvError>> {
        let mut results: Vec<Option<Result<WriteOutcome, KvError>>> = Vec::new();
        let mut valid = Vec::with_capacity(writes.len());
        let mut checks = Vec::with_capacity(writes.len());
        for write in writes {
            let checked = match &write {
                Write::Put { key, value, .. } => check_key(key).and_then(|()| check_value(value)),
                Write::Delete { key } => check_key(key),
            };
            match checked {
                Ok(()) => {
                    checks.push(match &write {
                        Write::Put { key, condition, .. } => ConflictCheck {
                            key: key.clone(),
                            condition: Some(*condition),
                        },
                        Write::Delete { key } => ConflictCheck {
                            key: key.clone(),
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

    /// Removes `key`; false when it did not exist.
    pub async fn delete(&self, key: &str) -> Result<bool, KvError> {
        check_key(key)?;
        Ok(self.timed("delete", self.store.delete(key)).await?)
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
        let mut items = self
            .timed("list", self.store.list(prefix, after, limit + 1))
            .await?;
        let next = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|item| item.key.clone())
        } else {
            None
        };
        Ok(Page { items, next })
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
            kv.put(&long_key, "v".into(), Condition::Always).await,
            Err(KvError::InvalidKey(1025))
        ));
        let longest_key = "é".repeat(MAX_KEY_BYTES / 2);
        assert_eq!(
            kv.put(&longest_key, "v".into(), Condition::Always)
                .await
                .unwrap(),
            1
        );
        let value = "v".repeat(MAX_VALUE_BYTES + 1);
        assert!(matches!(
            kv.put("k", value, Condition::Always).await,
            Err(KvError::ValueTooLong(_))
        ));
        let value = "v".repeat(MAX_VALUE_BYTES);
        assert_eq!(kv.put("k", value, Condition::Always).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn conflicts_name_the_key_and_versions() {
        let kv = kv();
        kv.put("a", "1".into(), Condition::Always).await.unwrap();
        let err = kv
            .put("a", "2".into(), Condition::IfVersion(5))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "version mismatch for a: expected 5, current version is 1"
        );
        let err = kv
            .put("a", "2".into(), Condition::IfAbsent)
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
                },
                Write::Delete { key: "a".into() },
            ])
            .await;
        assert_eq!(results.len(), 6);
        assert!(matches!(
            results[0],
            Ok(WriteOutcome::Put(PutOutcome::Written { version: 1 }))
        ));
        assert!(matches!(results[1], Err(KvError::InvalidKey(0))));
        assert!(matches!(
            results[2],
            Ok(WriteOutcome::Put(PutOutcome::Written { version: 2 }))
        ));
        assert!(matches!(results[3], Ok(WriteOutcome::Delete(false))));
        assert!(matches!(&results[4], Err(KvError::KeyExists(key)) if key == "a"));
        assert!(matches!(results[5], Ok(WriteOutcome::Delete(true))));
        assert_eq!(kv.get("a").await.unwrap(), None);
    }

    #[tokio::test]
    async fn pages_link_through_next() {
        let kv = kv();
        for key in ["a", "b", "c", "d", "e"] {
            kv.put(key, key.into(), Condition::Always).await.unwrap();
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
