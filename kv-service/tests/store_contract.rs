//! The store contract: one suite of cases, run against each backend (memory, SQLite, and a
//! throwaway PostgreSQL server per test). Whatever the core relies on is asserted here.

mod common;

use std::{collections::BTreeSet, sync::Arc};

use common::{kv_store, Backend, StoreFixture};
use kv_service::store::{
    now_ms, Change, ChangeKind, Compare, Condition, KeyFilter, KvBackend, KvStore, Op, OpResult,
    PutOutcome, StoreOptions, Test, Txn, Versioned, Write, WriteOutcome,
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

/// Every change takes the next revision; a refused write takes none.
async fn every_change_takes_the_next_revision(store: Arc<KvBackend>) {
    assert_eq!(store.head().await.unwrap().revision, 0);
    put(&store, "a", "1").await;
    put(&store, "b", "1").await;
    put(&store, "a", "2").await;
    let refused = store
        .put("a", "x".into(), Condition::IfVersion(9))
        .await
        .unwrap();
    assert_eq!(refused, PutOutcome::Conflict { current: Some(2) });
    assert_eq!(store.delete("missing").await.unwrap(), None);
    assert_eq!(store.delete("b").await.unwrap(), Some(4));
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!((a.version, a.revision, a.expires_at), (2, 3, None));
    let listing = store.list("", None, 10).await.unwrap();
    assert_eq!(listing.revision, 4);
    assert_eq!(listing.items.len(), 1);
    assert_eq!(store.head().await.unwrap().revision, 4);
}

fn change(revision: i64, kind: ChangeKind, key: &str, value: Option<&str>, version: i64) -> Change {
    Change {
        revision,
        kind,
        key: key.into(),
        value: value.map(str::to_owned),
        version,
    }
}

/// The change log holds every change in revision order, filtered by key or prefix.
async fn the_change_log_holds_every_change_in_order(store: Arc<KvBackend>) {
    put(&store, "p/1", "a").await;
    put(&store, "q", "b").await;
    put(&store, "p/1", "c").await;
    store.delete("p/1").await.unwrap();
    put(&store, "p/2", "d").await;
    let all = store
        .changes(0, &KeyFilter::Prefix(String::new()))
        .await
        .unwrap();
    assert_eq!(all.through, 5);
    assert_eq!(all.changes.len(), 5);
    let prefixed = store
        .changes(1, &KeyFilter::Prefix("p/".into()))
        .await
        .unwrap();
    assert_eq!(
        prefixed.changes,
        [
            change(3, ChangeKind::Put, "p/1", Some("c"), 2),
            change(4, ChangeKind::Delete, "p/1", None, 2),
            change(5, ChangeKind::Put, "p/2", Some("d"), 1),
        ]
    );
    let one = store.changes(0, &KeyFilter::Key("q".into())).await.unwrap();
    assert_eq!(one.changes, [change(2, ChangeKind::Put, "q", Some("b"), 1)]);
    // Nothing after the head.
    let none = store
        .changes(5, &KeyFilter::Prefix(String::new()))
        .await
        .unwrap();
    assert!(none.changes.is_empty());
}

/// A key past its expiry is gone for every reader at once; the sweep removes it with one
/// `expire` change, and a second sweep finds nothing.
async fn an_expired_key_is_gone_at_once_and_swept_once(store: Arc<KvBackend>) {
    let past = Some(now_ms() - 1);
    let future = Some(now_ms() + 3_600_000);
    store
        .put_expiring("gone", "v".into(), Condition::Always, past)
        .await
        .unwrap();
    store
        .put_expiring("kept", "v".into(), Condition::Always, future)
        .await
        .unwrap();
    assert_eq!(store.get("gone").await.unwrap(), None);
    assert_eq!(store.get("kept").await.unwrap().unwrap().expires_at, future);
    let listed = store.list("", None, 10).await.unwrap().items;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "kept");

    let swept = store.write(Write::ExpireDue { limit: 10 }).await.unwrap();
    assert_eq!(
        swept,
        WriteOutcome::Expired {
            count: 1,
            revision: 3
        }
    );
    let again = store.write(Write::ExpireDue { limit: 10 }).await.unwrap();
    assert_eq!(
        again,
        WriteOutcome::Expired {
            count: 0,
            revision: 3
        }
    );
    let log = store
        .changes(2, &KeyFilter::Prefix(String::new()))
        .await
        .unwrap();
    assert_eq!(
        log.changes,
        [change(3, ChangeKind::Expire, "gone", None, 1)]
    );
    // An expired key is absent to conditions too, and is created afresh.
    store
        .put_expiring("again", "v".into(), Condition::Always, past)
        .await
        .unwrap();
    assert_eq!(
        store
            .put("again", "w".into(), Condition::IfAbsent)
            .await
            .unwrap(),
        PutOutcome::Written {
            version: 1,
            revision: 6
        },
        "the expiry took revision 5, the put 6"
    );
}

/// A put without an expiry makes a key permanent again.
async fn a_put_without_ttl_makes_the_key_permanent(store: Arc<KvBackend>) {
    let future = Some(now_ms() + 3_600_000);
    store
        .put_expiring("k", "1".into(), Condition::Always, future)
        .await
        .unwrap();
    assert_eq!(store.get("k").await.unwrap().unwrap().expires_at, future);
    put(&store, "k", "2").await;
    assert_eq!(store.get("k").await.unwrap().unwrap().expires_at, None);
    // A compare-and-set can set one.
    store
        .put_expiring("k", "3".into(), Condition::IfVersion(2), future)
        .await
        .unwrap();
    let found = store.get("k").await.unwrap().unwrap();
    assert_eq!((found.version, found.expires_at), (3, future));
    assert_eq!(
        store.write(Write::ExpireDue { limit: 10 }).await.unwrap(),
        WriteOutcome::Expired {
            count: 0,
            revision: 3
        }
    );
}

fn txn_on_a(version: i64, value: &str) -> Txn {
    Txn {
        compare: vec![
            Compare {
                key: "a".into(),
                test: Test::Version(version),
            },
            Compare {
                key: "b".into(),
                test: Test::Exists(false),
            },
        ],
        success: vec![
            Op::Put {
                key: "a".into(),
                value: value.into(),
                expires_at: None,
            },
            Op::Put {
                key: "c".into(),
                value: value.into(),
                expires_at: None,
            },
            Op::Get { key: "a".into() },
        ],
        failure: vec![Op::Get { key: "a".into() }],
    }
}

/// A transaction applies its success branch as one revision when every compare holds, else
/// its failure branch.
async fn transactions_apply_one_branch_as_one_revision(store: Arc<KvBackend>) {
    put(&store, "a", "0").await;
    let outcome = store.txn(txn_on_a(1, "x")).await.unwrap();
    assert!(outcome.succeeded);
    assert_eq!(outcome.revision, 2);
    assert_eq!(
        outcome.results[..2],
        [
            OpResult::Put {
                key: "a".into(),
                version: 2,
                revision: 2,
                expires_at: None
            },
            OpResult::Put {
                key: "c".into(),
                version: 1,
                revision: 2,
                expires_at: None
            },
        ]
    );
    let OpResult::Get {
        found: Some(read), ..
    } = &outcome.results[2]
    else {
        panic!("{:?}", outcome.results[2]);
    };
    assert_eq!(
        (read.value.as_str(), read.version),
        ("x", 2),
        "reads see earlier ops"
    );
    // Both changes are in the log under the one revision.
    let log = store
        .changes(1, &KeyFilter::Prefix(String::new()))
        .await
        .unwrap();
    assert_eq!(log.changes.len(), 2);
    assert!(log.changes.iter().all(|change| change.revision == 2));

    // The version moved on: the failure branch runs, and changes nothing.
    let failed = store.txn(txn_on_a(1, "y")).await.unwrap();
    assert!(!failed.succeeded);
    assert_eq!(failed.revision, 2);
    assert!(
        matches!(&failed.results[..], [OpResult::Get { found: Some(found), .. }] if found.value == "x")
    );
    // A value compare, and a delete.
    let by_value = store
        .txn(Txn {
            compare: vec![Compare {
                key: "c".into(),
                test: Test::Value("x".into()),
            }],
            success: vec![
                Op::Delete { key: "c".into() },
                Op::Delete { key: "nope".into() },
            ],
            failure: vec![],
        })
        .await
        .unwrap();
    assert!(by_value.succeeded);
    assert_eq!(
        by_value.results,
        [
            OpResult::Delete {
                key: "c".into(),
                deleted: true
            },
            OpResult::Delete {
                key: "nope".into(),
                deleted: false
            },
        ]
    );
    assert_eq!(store.get("c").await.unwrap(), None);
}

/// Transactions racing on the same keys serialize: exactly one of them wins its compare.
async fn concurrent_conflicting_transactions_have_one_winner(store: Arc<KvBackend>) {
    put(&store, "a", "0").await;
    let mut tasks = Vec::new();
    for task in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.txn(txn_on_a(1, &task.to_string())).await.unwrap()
        }));
    }
    let mut winners = 0;
    for task in tasks {
        let outcome = tokio::time::timeout(common::WAIT, task)
            .await
            .unwrap()
            .unwrap();
        winners += usize::from(outcome.succeeded);
    }
    assert_eq!(winners, 1);
    let a = store.get("a").await.unwrap().unwrap();
    assert_eq!((a.version, a.revision), (2, 2));
    assert_eq!(store.head().await.unwrap().revision, 2);
}

/// Compaction drops the log's older changes and says how far it went.
async fn compaction_keeps_the_newest_changes(store: Arc<KvBackend>) {
    for i in 0..10 {
        put(&store, "k", &i.to_string()).await;
    }
    store.write(Write::Compact { keep: 4 }).await.unwrap();
    let head = store.head().await.unwrap();
    assert_eq!((head.revision, head.compacted), (10, 6));
    let page = store
        .changes(6, &KeyFilter::Prefix(String::new()))
        .await
        .unwrap();
    let revisions: Vec<i64> = page.changes.iter().map(|change| change.revision).collect();
    assert_eq!(revisions, [7, 8, 9, 10]);
    assert_eq!(page.compacted, 6);
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
    write_batches_apply_in_order,
    every_change_takes_the_next_revision,
    the_change_log_holds_every_change_in_order,
    an_expired_key_is_gone_at_once_and_swept_once,
    a_put_without_ttl_makes_the_key_permanent,
    transactions_apply_one_branch_as_one_revision,
    concurrent_conflicting_transactions_have_one_winner,
    compaction_keeps_the_newest_changes;
    durable: data_survives_reopening, expiry_and_revisions_survive_reopening,
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

/// Expiry times, revisions and the change log are there after a restart, and a key that expired
/// while the store was closed is gone when it opens (SQL stores only).
async fn expiry_and_revisions_survive_reopening(opened: Opened) {
    let Opened { store, fixture } = opened;
    let future = Some(now_ms() + 3_600_000);
    store
        .put_expiring("later", "v".into(), Condition::Always, future)
        .await
        .unwrap();
    store
        .put_expiring("due", "v".into(), Condition::Always, Some(now_ms() - 1))
        .await
        .unwrap();
    store.close().await;
    drop(store);

    let reopened = KvBackend::open(&fixture.spec, StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(
        reopened.get("later").await.unwrap().unwrap().expires_at,
        future
    );
    assert_eq!(reopened.get("due").await.unwrap(), None);
    assert_eq!(reopened.head().await.unwrap().revision, 2);
    assert_eq!(
        reopened
            .write(Write::ExpireDue { limit: 10 })
            .await
            .unwrap(),
        WriteOutcome::Expired {
            count: 1,
            revision: 3
        }
    );
    let log = reopened
        .changes(0, &KeyFilter::Prefix(String::new()))
        .await
        .unwrap();
    assert_eq!(log.changes.len(), 3);
    reopened.close().await;
}
