//! The store contract: one suite of cases, run against each backend (memory, SQLite, and a
//! throwaway PostgreSQL server per test). Whatever the core relies on is asserted here.

mod common;

use std::{collections::BTreeSet, sync::Arc};

use common::{kv_store, Backend, StoreFixture};
use kv_service::store::{
    Condition, KvBackend, KvStore, PutOutcome, StoreOptions, Versioned, Write, WriteOutcome,
};

/// An opened store and what keeps its data alive.
struct Opened {
    store: Arc<KvBackend>,
    fixture: StoreFixture,
}

async fn open(backend: Backend) -> Option<Opened> {
    let fixture = kv_store(backend).await?;
    let store = KvBackend::open(&fixture.spec, StoreOptions::default())
        .await
        .expect("the store opens");
    Some(Opened {
        store: Arc::new(store),
        fixture,
    })
}

async fn put(store: &KvBackend, key: &str, value: &str) -> i64 {
    match store
        .put(key, value.to_owned(), Condition::Always)
        .await
        .unwrap()
    {
        PutOutcome::Written { version, .. } => version,
        conflict => panic!("an unconditional put conflicted: {conflict:?}"),
    }
}

/// A value and its version, as a get should find them.
fn versioned(value: &str, version: i64) -> Option<(String, i64)> {
    Some((value.to_owned(), version))
}

/// A get's value and version.
async fn got(store: &KvBackend, key: &str) -> Option<(String, i64)> {
    let found: Option<Versioned> = store.get(key).await.unwrap();
    found.map(|found| (found.value, found.version))
}

async fn get_of_a_missing_key_is_none(store: Arc<KvBackend>) {
    assert_eq!(store.get("missing").await.unwrap(), None);
}

async fn put_creates_at_version_1_and_each_replace_adds_one(store: Arc<KvBackend>) {
    assert_eq!(put(&store, "k", "a").await, 1);
    assert_eq!(put(&store, "k", "b").await, 2);
    assert_eq!(put(&store, "k", "c").await, 3);
    assert_eq!(got(&store, "k").await, versioned("c", 3));
    // Other keys have versions of their own.
    assert_eq!(put(&store, "other", "x").await, 1);
}

async fn any_utf8_round_trips(store: Arc<KvBackend>) {
    let cases = [
        ("plain", "value"),
        ("pilcrow¶key", "a¶b¶"),
        ("<angle,brackets>", "<v,a\\l>ue"),
        ("quotes\"'", "\"{\"json\": true}\""),
        ("new\nline\r\n", "line one\nline two\n"),
        ("nul\0byte", "before\0after"),
        ("émoji 🦀", "日本語 🎉"),
        ("empty value", ""),
        (" ", "   "),
    ];
    for (key, value) in cases {
        put(&store, key, value).await;
    }
    for (key, value) in cases {
        assert_eq!(got(&store, key).await, versioned(value, 1), "key {key:?}");
    }
    let large = "0123456789abcdef".repeat(64 * 1024);
    put(&store, "large", &large).await;
    assert_eq!(got(&store, "large").await, versioned(&large, 1));
    let long_key = "k".repeat(1024);
    put(&store, &long_key, "v").await;
    assert_eq!(got(&store, &long_key).await, versioned("v", 1));
}

async fn if_version_replaces_only_the_current_version(store: Arc<KvBackend>) {
    assert_eq!(
        store
            .put("k", "a".into(), Condition::IfVersion(1))
            .await
            .unwrap(),
        PutOutcome::Conflict { current: None },
        "an absent key has no version to match"
    );
    assert_eq!(store.get("k").await.unwrap(), None);
    put(&store, "k", "a").await;
    assert_eq!(
        store
            .put("k", "b".into(), Condition::IfVersion(1))
            .await
            .unwrap(),
        PutOutcome::Written {
            version: 2,
            revision: 2
        }
    );
    assert_eq!(
        store
            .put("k", "c".into(), Condition::IfVersion(1))
            .await
            .unwrap(),
        PutOutcome::Conflict { current: Some(2) }
    );
    assert_eq!(got(&store, "k").await, versioned("b", 2));
}

async fn if_absent_creates_only_once(store: Arc<KvBackend>) {
    assert_eq!(
        store
            .put("k", "first".into(), Condition::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Written {
            version: 1,
            revision: 1
        }
    );
    assert_eq!(
        store
            .put("k", "second".into(), Condition::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Conflict { current: Some(1) }
    );
    assert_eq!(got(&store, "k").await, versioned("first", 1));
}

async fn delete_removes_and_says_whether_it_did(store: Arc<KvBackend>) {
    assert_eq!(store.delete("k").await.unwrap(), None);
    put(&store, "k", "a").await;
    put(&store, "k", "b").await;
    assert_eq!(store.delete("k").await.unwrap(), Some(3));
    assert_eq!(store.get("k").await.unwrap(), None);
    assert_eq!(store.delete("k").await.unwrap(), None);
    // A key created again starts over.
    assert_eq!(put(&store, "k", "c").await, 1);
    assert_eq!(
        store
            .put("k", "d".into(), Condition::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Conflict { current: Some(1) }
    );
}

async fn list_is_in_byte_order_and_filters_by_prefix(store: Arc<KvBackend>) {
    let keys = [
        "b", "a", "ab", "a\u{0}", "aa", "a~", "aé", "a日", "a🦀", "B", "ba", "c", "é",
    ];
    for key in keys {
        put(&store, key, &format!("value of {key}")).await;
    }
    let mut sorted: Vec<&str> = keys.to_vec();
    sorted.sort_by(|x, y| x.as_bytes().cmp(y.as_bytes()));

    let all = store.list("", None, 100).await.unwrap().items;
    let listed: Vec<&str> = all.iter().map(|item| item.key.as_str()).collect();
    assert_eq!(listed, sorted);
    assert!(all
        .iter()
        .all(|item| item.value == format!("value of {}", item.key) && item.version == 1));

    let with_prefix = |prefix: &str| -> Vec<&str> {
        sorted
            .iter()
            .copied()
            .filter(|key| key.starts_with(prefix))
            .collect()
    };
    for prefix in ["a", "b", "a日", "é", "zz", "a\u{0}"] {
        let items = store.list(prefix, None, 100).await.unwrap().items;
        let listed: Vec<&str> = items.iter().map(|item| item.key.as_str()).collect();
        assert_eq!(listed, with_prefix(prefix), "prefix {prefix:?}");
    }

    // `after` is exclusive, and combines with the prefix whether it sorts below or inside it.
    let items = store.list("a", Some("aa"), 100).await.unwrap().items;
    let listed: Vec<&str> = items.iter().map(|item| item.key.as_str()).collect();
    assert_eq!(listed, ["ab", "a~", "aé", "a日", "a🦀"]);
    let items = store.list("b", Some("a"), 100).await.unwrap().items;
    let listed: Vec<&str> = items.iter().map(|item| item.key.as_str()).collect();
    assert_eq!(listed, ["b", "ba"]);
    assert!(store
        .list("a", Some("b"), 100)
        .await
        .unwrap()
        .items
        .is_empty());

    let page = store.list("a", None, 3).await.unwrap().items;
    let listed: Vec<&str> = page.iter().map(|item| item.key.as_str()).collect();
    assert_eq!(listed, ["a", "a\u{0}", "aa"]);
}

async fn concurrent_puts_on_one_key_never_lose_an_increment(store: Arc<KvBackend>) {
    const TASKS: usize = 16;
    const PUTS: usize = 25;
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for put_number in 0..PUTS {
                versions.push(put(&store, "hot", &format!("{task}/{put_number}")).await);
            }
            versions
        }));
    }
    let mut versions = BTreeSet::new();
    for task in tasks {
        for version in tokio::time::timeout(common::WAIT, task)
            .await
            .unwrap()
            .unwrap()
        {
            assert!(
                versions.insert(version),
                "version {version} was handed out twice"
            );
        }
    }
    let total = (TASKS * PUTS) as i64;
    assert_eq!(versions, (1..=total).collect::<BTreeSet<_>>());
    assert_eq!(store.get("hot").await.unwrap().unwrap().version, total);
}

async fn concurrent_compare_and_set_counts_every_increment(store: Arc<KvBackend>) {
    const TASKS: usize = 8;
    const INCREMENTS: usize = 10;
    put(&store, "counter", "0").await;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..INCREMENTS {
                loop {
                    let current = store.get("counter").await.unwrap().unwrap();
                    let next = (current.value.parse::<u64>().unwrap() + 1).to_string();
                    let condition = Condition::IfVersion(current.version);
                    match store.put("counter", next, condition).await.unwrap() {
                        PutOutcome::Written { .. } => break,
                        PutOutcome::Conflict { .. } => continue,
                    }
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(common::WAIT, task)
            .await
            .unwrap()
            .unwrap();
    }
    let total = TASKS * INCREMENTS;
    assert_eq!(
        got(&store, "counter").await,
        versioned(&total.to_string(), total as i64 + 1)
    );
}

async fn concurrent_creates_of_one_key_have_one_winner(store: Arc<KvBackend>) {
    let mut tasks = Vec::new();
    for task in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let outcome = store
                .put("contended", task.to_string(), Condition::IfAbsent)
                .await
                .unwrap();
            (task, outcome)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        let (task, outcome) = tokio::time::timeout(common::WAIT, task)
            .await
            .unwrap()
            .unwrap();
        if outcome
            == (PutOutcome::Written {
                version: 1,
                revision: 1,
            })
        {
            winners.push(task);
        } else {
            assert_eq!(outcome, PutOutcome::Conflict { current: Some(1) });
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(
        got(&store, "contended").await,
        versioned(&winners[0].to_string(), 1)
    );
}

async fn write_batches_apply_in_order(store: Arc<KvBackend>) {
    let put = |key: &str, value: &str, condition| Write::Put {
        key: key.into(),
        value: value.into(),
        condition,
        expires_at: None,
    };
    let mut writes = Vec::new();
    for i in 0..50 {
        writes.push(put("batched", &i.to_string(), Condition::Always));
    }
    writes.push(Write::Delete {
        key: "batched".into(),
    });
    writes.push(Write::Delete {
        key: "batched".into(),
    });
    writes.push(put("batched", "again", Condition::IfAbsent));
    writes.push(put("batched", "no", Condition::IfAbsent));
    writes.push(put("batched", "cas", Condition::IfVersion(1)));
    let results: Vec<WriteOutcome> = store
        .write_batch(writes)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, result) in results[..50].iter().enumerate() {
        assert_eq!(
            *result,
            WriteOutcome::Put(PutOutcome::Written {
                version: i as i64 + 1,
                revision: i as i64 + 1,
            })
        );
    }
    assert_eq!(
        results[50..],
        [
            WriteOutcome::Delete(Some(51)),
            WriteOutcome::Delete(None),
            WriteOutcome::Put(PutOutcome::Written {
                version: 1,
                revision: 52
            }),
            WriteOutcome::Put(PutOutcome::Conflict { current: Some(1) }),
            WriteOutcome::Put(PutOutcome::Written {
                version: 2,
                revision: 53
            }),
        ]
    );
    assert_eq!(got(&store, "batched").await, versioned("cas", 2));
}

/// Data written before the store is closed is there when it is opened again (SQL stores only).
async fn data_survives_reopening(opened: Opened) {
    let Opened { store, fixture } = opened;
    put(&store, "kept", "a").await;
    put(&store, "kept", "b").await;
    put(&store, "gone", "x").await;
    store.delete("gone").await.unwrap();
    store.close().await;
    drop(store);

    let reopened = KvBackend::open(&fixture.spec, StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(got(&reopened, "kept").await, versioned("b", 2));
    assert_eq!(reopened.get("gone").await.unwrap(), None);
    // Migrations already applied are skipped, not re-run.
    assert_eq!(put(&reopened, "kept", "c").await, 3);
    reopened.close().await;
}

shared::store_contract! {
    within: common::WAIT * 4, workers: 4;
    get_of_a_missing_key_is_none,
    put_creates_at_version_1_and_each_replace_adds_one,
    any_utf8_round_trips,
    if_version_replaces_only_the_current_version,
    if_absent_creates_only_once,
    delete_removes_and_says_whether_it_did,
    list_is_in_byte_order_and_filters_by_prefix,
    concurrent_puts_on_one_key_never_lose_an_increment,
    concurrent_compare_and_set_counts_every_increment,
    concurrent_creates_of_one_key_have_one_winner,
    write_batches_apply_in_order;
    durable: data_survives_reopening,
}

#[tokio::test(flavor = "multi_thread")]
async fn sqlite_uses_wal_with_full_sync() {
    let opened = open(Backend::Sqlite).await.unwrap();
    put(&opened.store, "k", "v").await;
    let kv_service::config::StoreSpec::Sqlite(path) = &opened.fixture.spec else {
        unreachable!()
    };
    let wal = path.with_file_name("kv.db-wal");
    assert!(wal.exists(), "a WAL file exists next to the database");
    opened.store.close().await;
}
