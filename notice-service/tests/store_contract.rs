//! The store contract: one suite of cases, run against each backend (memory, SQLite, and a
//! throwaway PostgreSQL server per test), so the three cannot drift apart. Whatever the service
//! relies on is asserted here.

use std::{sync::Arc, time::Duration};

use chrono::Utc;
use notice_service::{
    notice::{Interest, NewNotice, Whispers},
    store::{
        NoticeBackend, NoticeQuery, NoticeStore, ResumePoint, Retention, Selector, StoreOptions,
    },
};
use shared::testing::{Backend, StoreFixture};

/// The bound on one case.
const WAIT: Duration = Duration::from_secs(60);

/// An opened store and what keeps its data alive.
struct Opened {
    store: Arc<NoticeBackend>,
    fixture: StoreFixture,
}

/// A fresh store; `None` only when PostgreSQL cannot be started outside CI (TestPostgres says
/// why).
async fn open(backend: Backend) -> Option<Opened> {
    let fixture = StoreFixture::new(backend, "notices").await?;
    let store = NoticeBackend::open(&fixture.spec, StoreOptions::default())
        .await
        .expect("the store opens");
    Some(Opened {
        store: Arc::new(store),
        fixture,
    })
}

fn new(message: &str, topic: Option<&str>, to: Option<&str>) -> NewNotice {
    NewNotice::new(
        Some(message.into()),
        topic.map(Into::into),
        to.map(Into::into),
    )
    .unwrap()
}

fn all_after(after: i64) -> NoticeQuery {
    NoticeQuery {
        after,
        limit: 1000,
        selector: Selector::All,
        whispers: Whispers::All,
    }
}

async fn ids_increase_and_queries_filter(store: Arc<NoticeBackend>) {
    assert_eq!(store.last_id().await.unwrap(), 0);
    let now = Utc::now();
    let a = store.insert(new("one", None, None), now).await.unwrap();
    let b = store
        .insert(new("two", Some("room"), None), now)
        .await
        .unwrap();
    let c = store
        .insert(new("three", Some("room"), Some("alice")), now)
        .await
        .unwrap();
    let d = store
        .insert(new("four", Some("other"), None), now)
        .await
        .unwrap();
    assert!(a.id < b.id && b.id < c.id && c.id < d.id, "ids increase");
    assert_eq!(b.topic.as_deref(), Some("room"));
    assert_eq!(c.to.as_deref(), Some("alice"));
    assert_eq!(store.last_id().await.unwrap(), d.id);
    // Timestamps round-trip at millisecond precision.
    assert_eq!(a.created_at.timestamp_millis(), now.timestamp_millis());

    let everything = store.query(&all_after(0)).await.unwrap();
    assert_eq!(everything, vec![a.clone(), b.clone(), c.clone(), d.clone()]);
    let after_b = store.query(&all_after(b.id)).await.unwrap();
    assert_eq!(after_b, vec![c.clone(), d.clone()]);
    let limited = store
        .query(&NoticeQuery {
            limit: 2,
            ..all_after(0)
        })
        .await
        .unwrap();
    assert_eq!(limited, vec![a.clone(), b.clone()]);

    let room = store
        .query(&NoticeQuery {
            selector: Selector::Topic("room".into()),
            ..all_after(0)
        })
        .await
        .unwrap();
    assert_eq!(room, vec![b.clone(), c.clone()]);

    let replay = |name: Option<&str>, topics: &[&str]| {
        let interest = Interest {
            name: name.map(Into::into),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        };
        NoticeQuery {
            whispers: interest.whispers(),
            selector: Selector::Interest(interest),
            ..all_after(0)
        }
    };
    let bob_in_room = store.query(&replay(Some("bob"), &["room"])).await.unwrap();
    assert_eq!(bob_in_room, vec![a.clone(), b.clone()]);
    let alice = store.query(&replay(Some("alice"), &[])).await.unwrap();
    assert_eq!(alice, vec![a.clone(), c.clone()]);
    let anonymous_two_topics = store
        .query(&replay(None, &["room", "other"]))
        .await
        .unwrap();
    assert_eq!(anonymous_two_topics, vec![a.clone(), b.clone(), d.clone()]);
}

async fn whispers_are_listed_only_to_their_addressee(store: Arc<NoticeBackend>) {
    let start = store.last_id().await.unwrap();
    let now = Utc::now();
    let all = store.insert(new("all", None, None), now).await.unwrap();
    let room = store
        .insert(new("room", Some("room"), None), now)
        .await
        .unwrap();
    let to_alice = store
        .insert(new("psst", Some("room"), Some("alice")), now)
        .await
        .unwrap();
    let to_bob = store
        .insert(new("hey", None, Some("bob")), now)
        .await
        .unwrap();
    let list = |selector: Selector, whispers: Whispers| NoticeQuery {
        selector,
        whispers,
        ..all_after(start)
    };
    let alice = || Whispers::To(Some("alice".into()));
    for (query, expected) in [
        (
            list(Selector::All, Whispers::All),
            vec![&all, &room, &to_alice, &to_bob],
        ),
        (list(Selector::All, alice()), vec![&all, &room, &to_alice]),
        (
            list(Selector::All, Whispers::To(Some("bob".into()))),
            vec![&all, &room, &to_bob],
        ),
        (list(Selector::All, Whispers::To(None)), vec![&all, &room]),
        (
            list(Selector::Topic("room".into()), Whispers::All),
            vec![&room, &to_alice],
        ),
        (
            list(Selector::Topic("room".into()), alice()),
            vec![&room, &to_alice],
        ),
        (
            list(
                Selector::Topic("room".into()),
                Whispers::To(Some("carol".into())),
            ),
            vec![&room],
        ),
    ] {
        let expected: Vec<_> = expected.into_iter().cloned().collect();
        assert_eq!(store.query(&query).await.unwrap(), expected, "{query:?}");
        for notice in &expected {
            assert!(query.matches(notice), "the rule in Rust agrees: {query:?}");
        }
    }
}

async fn the_sender_is_kept_now_and_when_scheduled(store: Arc<NoticeBackend>) {
    let start = store.last_id().await.unwrap();
    let now = Utc::now();
    let signed = store
        .insert(new("signed", None, None).sent_by(Some("alice".into())), now)
        .await
        .unwrap();
    assert_eq!(signed.from.as_deref(), Some("alice"));
    let unsigned = store
        .insert(new("unsigned", None, None), now)
        .await
        .unwrap();
    assert_eq!(unsigned.from, None);
    store
        .schedule(new("later", None, None).sent_by(Some("bob".into())), now)
        .await
        .unwrap();
    let claimed = store.claim_due(now, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].from.as_deref(), Some("bob"));
    let stored = store.query(&all_after(start)).await.unwrap();
    assert_eq!(stored, vec![signed, unsigned, claimed[0].clone()]);
}

async fn schedules_are_claimed_once_in_due_order(store: Arc<NoticeBackend>) {
    let now = Utc::now();
    let last = store.last_id().await.unwrap();
    assert_eq!(store.next_due().await.unwrap(), None);
    let later = now + chrono::Duration::seconds(2);
    let much_later = now + chrono::Duration::hours(1);
    store
        .schedule(new("late", None, None), much_later)
        .await
        .unwrap();
    store
        .schedule(new("second", Some("t"), None), later)
        .await
        .unwrap();
    store
        .schedule(new("first", None, None), now + chrono::Duration::seconds(1))
        .await
        .unwrap();
    let due = store.next_due().await.unwrap().unwrap();
    assert_eq!(
        due.timestamp_millis(),
        (now + chrono::Duration::seconds(1)).timestamp_millis()
    );

    assert!(
        store.claim_due(now, 100).await.unwrap().is_empty(),
        "nothing due yet"
    );
    let claimed = store.claim_due(later, 100).await.unwrap();
    let messages: Vec<_> = claimed.iter().map(|n| n.message.as_str()).collect();
    assert_eq!(messages, ["first", "second"]);
    assert!(claimed[0].id > last && claimed[1].id > claimed[0].id);
    assert_eq!(claimed[1].topic.as_deref(), Some("t"));
    assert!(
        store.claim_due(later, 100).await.unwrap().is_empty(),
        "claimed once"
    );
    // Claimed notices are ordinary stored notices now.
    let stored = store.query(&all_after(last)).await.unwrap();
    assert_eq!(stored, claimed);

    let rest = store.claim_due(much_later, 100).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(store.next_due().await.unwrap(), None);
}

async fn retention_caps_count_and_age_without_reusing_ids(store: Arc<NoticeBackend>) {
    let now = Utc::now();
    for i in 0..5 {
        store
            .insert(new(&format!("r{i}"), None, None), now)
            .await
            .unwrap();
    }
    let count_cap = Retention {
        max_count: Some(3),
        max_age: None,
    };
    store.prune(&count_cap, now).await.unwrap();
    let left = store.query(&all_after(0)).await.unwrap();
    let messages: Vec<_> = left.iter().map(|n| n.message.as_str()).collect();
    assert_eq!(messages, ["r2", "r3", "r4"]);

    let age_cap = Retention {
        max_count: None,
        max_age: Some(Duration::from_secs(60)),
    };
    assert_eq!(store.prune(&age_cap, now).await.unwrap(), 0, "all recent");
    let last = left.last().unwrap().id;
    let pruned = store
        .prune(&age_cap, now + chrono::Duration::seconds(61))
        .await
        .unwrap();
    assert_eq!(pruned, 3);
    assert!(store.query(&all_after(0)).await.unwrap().is_empty());

    let fresh = store
        .insert(new("after prune", None, None), now)
        .await
        .unwrap();
    assert!(fresh.id > last, "ids are never reused");
}

async fn id_bounds_know_the_oldest_kept_and_the_highest_published(store: Arc<NoticeBackend>) {
    let nothing = store.id_bounds().await.unwrap();
    assert_eq!(nothing.oldest_kept, None);
    assert_eq!(nothing.current, 0);
    assert_eq!(nothing.resume_point(0), ResumePoint::Exact);

    let now = Utc::now();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            store
                .insert(new(&format!("b{i}"), None, None), now)
                .await
                .unwrap()
                .id,
        );
    }
    let all_kept = store.id_bounds().await.unwrap();
    assert_eq!(all_kept.oldest_kept, Some(ids[0]));
    assert_eq!(all_kept.current, ids[4]);

    let count_cap = Retention {
        max_count: Some(2),
        max_age: None,
    };
    store.prune(&count_cap, now).await.unwrap();
    let pruned = store.id_bounds().await.unwrap();
    assert_eq!(pruned.oldest_kept, Some(ids[3]));
    assert_eq!(
        pruned.current, ids[4],
        "current is not lowered by retention"
    );
    assert_eq!(pruned.resume_point(ids[1]), ResumePoint::TooOld);
    assert_eq!(pruned.resume_point(ids[2]), ResumePoint::Exact);
    assert_eq!(pruned.resume_point(ids[4] + 1), ResumePoint::TooNew);

    // Every notice deleted: the highest id is still known.
    let age_cap = Retention {
        max_count: None,
        max_age: Some(Duration::from_secs(60)),
    };
    store
        .prune(&age_cap, now + chrono::Duration::seconds(61))
        .await
        .unwrap();
    let emptied = store.id_bounds().await.unwrap();
    assert_eq!(emptied.oldest_kept, None);
    assert_eq!(emptied.current, ids[4]);
    assert_eq!(emptied.oldest_id(), ids[4] + 1);
    assert_eq!(emptied.resume_point(ids[3]), ResumePoint::TooOld);
    assert_eq!(emptied.resume_point(ids[4]), ResumePoint::Exact);
}

/// Notices and schedules written before the store is closed are there when it is opened again,
/// and ids keep increasing (SQL stores only).
async fn data_survives_reopening(opened: Opened) {
    let Opened { store, fixture } = &opened;
    let spec = &fixture.spec;
    let now = Utc::now();
    let kept = store.insert(new("kept", None, None), now).await.unwrap();
    store.schedule(new("later", None, None), now).await.unwrap();
    store.close().await;

    let reopened = NoticeBackend::open(spec, StoreOptions::default())
        .await
        .unwrap();
    assert_eq!(
        reopened.query(&all_after(0)).await.unwrap(),
        vec![kept.clone()]
    );
    let claimed = reopened.claim_due(now, 10).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(claimed[0].id > kept.id);
    reopened.close().await;
}

shared::store_contract! {
    within: WAIT, workers: 2;
    ids_increase_and_queries_filter,
    whispers_are_listed_only_to_their_addressee,
    the_sender_is_kept_now_and_when_scheduled,
    schedules_are_claimed_once_in_due_order,
    retention_caps_count_and_age_without_reusing_ids,
    id_bounds_know_the_oldest_kept_and_the_highest_published;
    durable: data_survives_reopening,
}
