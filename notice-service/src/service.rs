//! The notice service's operations, independent of the wire: publish (now or scheduled),
//! list, subscribe with replay, presence and kick. The routes translate packets into these
//! calls; the background tasks (scheduler, retention, cluster) call them too.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio::sync::{Mutex, Notify};

use crate::{
    cluster::Cluster,
    feed::{Feed, Reset},
    hub::{Hub, Membership, NameClaim, SubscribeError, SubscriberInfo},
    notice::{Interest, NewNotice, Notice, OutgoingNotice},
    store::{NoticeBackend, NoticeQuery, NoticeStore, Retention, StoreError},
};

/// How many due scheduled notices one scheduler round publishes at most.
const CLAIM_BATCH: u32 = 200;

/// The outcome of a publish request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Stored(Notice),
    Scheduled(DateTime<Utc>),
}

/// Why a subscription or a rename was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Refused(#[from] SubscribeError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cheap-to-clone handle over the service's shared state.
#[derive(Clone)]
pub struct NoticeService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<NoticeBackend>,
    hub: Hub,
    /// Single instance: held while a notice is stored and handed to the hub, so ids reach the
    /// hub in increasing order (the replay logic relies on it). With a cluster the store's
    /// publish lock and NOTIFY order do that job instead.
    publish_lock: Mutex<()>,
    cluster: Option<Cluster>,
    schedule_changed: Notify,
    retention: Retention,
}

impl NoticeService {
    pub fn new(
        store: Arc<NoticeBackend>,
        hub: Hub,
        cluster: Option<Cluster>,
        retention: Retention,
    ) -> NoticeService {
        NoticeService {
            inner: Arc::new(Inner {
                store,
                hub,
                publish_lock: Mutex::new(()),
                cluster,
                schedule_changed: Notify::new(),
                retention,
            }),
        }
    }

    pub fn store(&self) -> &Arc<NoticeBackend> {
        &self.inner.store
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn retention(&self) -> &Retention {
        &self.inner.retention
    }

    /// Stores a notice and fans it out, or keeps it for later when `at` is in the future.
    /// Returns only once the notice (or the schedule) is stored.
    pub async fn publish(
        &self,
        notice: NewNotice,
        at: Option<DateTime<Utc>>,
    ) -> Result<Published, StoreError> {
        let now = Utc::now();
        if let Some(at) = at.filter(|at| *at > now) {
            self.inner.store.schedule(notice, at).await?;
            self.inner.schedule_changed.notify_one();
            crate::metrics::count_publish(true);
            return Ok(Published::Scheduled(at));
        }
        let store = &self.inner.store;
        let stored = self
            .fan_out_in_order(|| async { Ok(vec![store.insert(notice, now).await?]) })
            .await?;
        crate::metrics::count_publish(false);
        Ok(Published::Stored(stored.into_iter().next().expect("one")))
    }

    /// Publishes the scheduled notices that are due; returns how many.
    pub async fn publish_due(&self) -> Result<usize, StoreError> {
        let store = &self.inner.store;
        let claimed = self
            .fan_out_in_order(|| store.claim_due(Utc::now(), CLAIM_BATCH))
            .await?;
        Ok(claimed.len())
    }

    async fn fan_out_in_order<F, Fut>(&self, store_them: F) -> Result<Vec<Notice>, StoreError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Notice>, StoreError>>,
    {
        if self.inner.cluster.is_some() {
            // Every instance, this one included, fans out from the NOTIFY (see `cluster`).
            return store_them().await;
        }
        let _in_order = self.inner.publish_lock.lock().await;
        let notices = store_them().await?;
        for notice in &notices {
            self.inner.hub.publish(OutgoingNotice::new(notice.clone()));
        }
        Ok(notices)
    }

    /// Wakes the scheduler when a new schedule arrived.
    pub async fn schedule_changed(&self) {
        self.inner.schedule_changed.notified().await
    }

    pub async fn list(&self, query: &NoticeQuery) -> Result<Vec<Notice>, StoreError> {
        self.inner.store.query(query).await
    }

    /// Where a subscriber resuming after `after` starts, and the reset to tell it first
    /// (`feed::resume_start`); read before [`NoticeService::subscribe`], which takes the start.
    pub async fn resume_start(
        &self,
        after: Option<i64>,
    ) -> Result<(Option<i64>, Option<Reset>), StoreError> {
        crate::feed::resume_start(&self.inner.store, after).await
    }

    /// Subscribes to live notices first, then (with `after`) replays the stored ones. A name
    /// chosen without a token ([`NameClaim::Chosen`]) must be free on every instance.
    pub async fn subscribe(
        &self,
        interest: Interest,
        membership: Membership,
        after: Option<i64>,
    ) -> Result<Feed, JoinError> {
        if let (Some(name), Some(cluster), NameClaim::Chosen { .. }) =
            (&interest.name, &self.inner.cluster, &membership.claim)
        {
            if cluster.name_taken(name, &membership.claim).await? {
                return Err(SubscribeError::NameTaken(name.clone()).into());
            }
        }
        let subscription = self.inner.hub.subscribe_with(interest, membership)?;
        Ok(Feed::new(subscription, self.inner.store.clone(), after))
    }

    /// Everyone subscribed now, on this instance and (with a cluster) on the others; with
    /// `topic`, only the subscribers of that topic.
    pub async fn presence(&self, topic: Option<&str>) -> Result<Vec<SubscriberInfo>, StoreError> {
        let mut all: Vec<SubscriberInfo> = self
            .inner
            .hub
            .presence()
            .into_iter()
            .map(|present| present.info)
            .collect();
        if let Some(cluster) = &self.inner.cluster {
            all.extend(cluster.remote_presence().await?);
        }
        if let Some(topic) = topic {
            all.retain(|subscriber| subscriber.topics.iter().any(|t| t == topic));
        }
        all.sort_by(|a, b| a.since.cmp(&b.since).then_with(|| a.name.cmp(&b.name)));
        Ok(all)
    }

    /// Ends the subscriptions of `name` everywhere; returns how many there were.
    pub async fn kick(&self, name: &str) -> Result<usize, StoreError> {
        let remote = match &self.inner.cluster {
            Some(cluster) => cluster.kick_remote(name).await?,
            None => 0,
        };
        Ok(self.inner.hub.kick(name) + remote)
    }

    /// Gives the live subscriptions of `from` the name `to`, everywhere; returns how many
    /// there were. `to` must not be in use.
    pub async fn rename(&self, from: &str, to: &str) -> Result<usize, JoinError> {
        let taken_here = !self
            .inner
            .hub
            .name_free_for(to, &NameClaim::Chosen { client: None });
        let remote = match &self.inner.cluster {
            Some(cluster) => {
                if taken_here
                    || cluster
                        .name_taken(to, &NameClaim::Chosen { client: None })
                        .await?
                {
                    return Err(SubscribeError::NameTaken(to.to_string()).into());
                }
                cluster.rename_remote(from, to).await?
            }
            None if taken_here => return Err(SubscribeError::NameTaken(to.to_string()).into()),
            None => 0,
        };
        Ok(self.inner.hub.rename(from, to) + remote)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        feed::FeedEnd,
        hub::{EndReason, Live},
    };

    fn service(buffer: usize) -> NoticeService {
        NoticeService::new(
            Arc::new(NoticeBackend::Memory(Default::default())),
            Hub::new(buffer, 10_000, None),
            None,
            Retention::default(),
        )
    }

    fn new(message: &str, topic: Option<&str>, to: Option<&str>) -> NewNotice {
        NewNotice::new(
            Some(message.into()),
            topic.map(Into::into),
            to.map(Into::into),
        )
        .unwrap()
    }

    async fn next_notice(feed: &mut Feed) -> Arc<OutgoingNotice> {
        match feed.next().await.unwrap() {
            Live::Notice(notice) => notice,
            other => panic!("expected a notice, got {other:?}"),
        }
    }

    fn everyone() -> Interest {
        Interest::default()
    }

    async fn publish(service: &NoticeService, message: &str) -> Notice {
        match service
            .publish(new(message, None, None), None)
            .await
            .unwrap()
        {
            Published::Stored(notice) => notice,
            other => panic!("expected a stored notice, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replay_while_publishing_has_no_gap_and_no_duplicate() {
        const BEFORE: i64 = 1_200;
        const DURING: i64 = 1_500;
        let service = service(100_000);
        for i in 0..BEFORE {
            publish(&service, &format!("before {i}")).await;
        }
        let resume_from = 150;
        let publisher = {
            let service = service.clone();
            tokio::spawn(async move {
                for i in 0..DURING {
                    publish(&service, &format!("during {i}")).await;
                }
            })
        };
        // Subscribers join and replay at different moments while the publisher runs.
        let mut subscribers = Vec::new();
        for delay in 0..4 {
            let service = service.clone();
            subscribers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay * 2)).await;
                let mut feed = service
                    .subscribe(everyone(), Membership::default(), Some(resume_from))
                    .await
                    .unwrap();
                let mut received = Vec::new();
                while received.last() != Some(&(BEFORE + DURING)) {
                    let notice =
                        tokio::time::timeout(Duration::from_secs(10), next_notice(&mut feed))
                            .await
                            .expect("no notice may be missing");
                    received.push(notice.id);
                }
                received
            }));
        }
        tokio::time::timeout(Duration::from_secs(30), publisher)
            .await
            .unwrap()
            .unwrap();
        let expected: Vec<i64> = (resume_from + 1..=BEFORE + DURING).collect();
        for subscriber in subscribers {
            let received = tokio::time::timeout(Duration::from_secs(30), subscriber)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(received, expected, "in order, no gap, no duplicate");
        }
    }

    #[tokio::test]
    async fn replay_delivers_only_what_the_subscriber_is_entitled_to() {
        let service = service(64);
        let broadcast = publish(&service, "all").await;
        service
            .publish(new("room", Some("room"), None), None)
            .await
            .unwrap();
        service
            .publish(new("psst", None, Some("bob")), None)
            .await
            .unwrap();
        let to_alice = service
            .publish(new("hi", None, Some("alice")), None)
            .await
            .unwrap();
        let Published::Stored(to_alice) = to_alice else {
            panic!("stored")
        };
        let alice = Interest {
            name: Some("alice".into()),
            topics: Default::default(),
        };
        let mut feed = service
            .subscribe(alice, Membership::default(), Some(0))
            .await
            .unwrap();
        assert_eq!(next_notice(&mut feed).await.id, broadcast.id);
        assert_eq!(next_notice(&mut feed).await.id, to_alice.id);
        let live = publish(&service, "live").await;
        assert_eq!(next_notice(&mut feed).await.id, live.id);
    }

    #[tokio::test]
    async fn a_resume_point_from_another_database_misses_nothing_published_after_it() {
        let service = service(64);
        let old = publish(&service, "old").await;
        let (start, reset) = service.resume_start(Some(old.id + 100)).await.unwrap();
        assert_eq!(
            reset,
            Some(Reset {
                oldest_id: old.id,
                current_id: old.id
            })
        );
        assert_eq!(start, Some(old.id));
        // Published after the start was read and before the subscription exists: the replay
        // finds it.
        let between = publish(&service, "between").await;
        let mut feed = service
            .subscribe(everyone(), Membership::default(), start)
            .await
            .unwrap();
        assert_eq!(next_notice(&mut feed).await.id, between.id);
        let live = publish(&service, "live").await;
        assert_eq!(next_notice(&mut feed).await.id, live.id);
        // An ordinary resume point is left alone.
        assert_eq!(
            service.resume_start(Some(old.id)).await.unwrap(),
            (Some(old.id), None)
        );
        assert_eq!(service.resume_start(None).await.unwrap(), (None, None));
    }

    #[tokio::test]
    async fn a_subscriber_without_replay_gets_only_new_notices() {
        let service = service(64);
        publish(&service, "old").await;
        let mut feed = service
            .subscribe(everyone(), Membership::default(), None)
            .await
            .unwrap();
        let fresh = publish(&service, "new").await;
        assert_eq!(next_notice(&mut feed).await.id, fresh.id);
    }

    #[tokio::test]
    async fn a_lagging_feed_ends_after_its_buffer_and_resumes_exactly() {
        let service = service(4);
        let mut feed = service
            .subscribe(everyone(), Membership::default(), None)
            .await
            .unwrap();
        let mut published = Vec::new();
        for i in 0..10 {
            published.push(publish(&service, &format!("n{i}")).await.id);
        }
        let mut received = Vec::new();
        let reason = loop {
            match feed.next().await {
                Ok(Live::Notice(notice)) => received.push(notice.id),
                Ok(other) => panic!("expected a notice, got {other:?}"),
                Err(FeedEnd::Ended(reason)) => break reason,
                Err(other) => panic!("{other}"),
            }
        };
        assert_eq!(reason, EndReason::Lagged);
        assert_eq!(received, published[..4]);
        // Resuming from the last id received gets the rest.
        let mut resumed = service
            .subscribe(everyone(), Membership::default(), Some(feed.last_sent()))
            .await
            .unwrap();
        for id in &published[4..] {
            assert_eq!(next_notice(&mut resumed).await.id, *id);
        }
    }

    #[tokio::test]
    async fn scheduled_notices_wait_for_their_time() {
        let service = service(64);
        let mut feed = service
            .subscribe(everyone(), Membership::default(), None)
            .await
            .unwrap();
        let at = Utc::now() + chrono::Duration::milliseconds(300);
        let published = service
            .publish(new("later", None, None), Some(at))
            .await
            .unwrap();
        assert_eq!(published, Published::Scheduled(at));
        assert_eq!(service.publish_due().await.unwrap(), 0, "not due yet");
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(service.publish_due().await.unwrap(), 1);
        assert_eq!(next_notice(&mut feed).await.message, "later");
        assert_eq!(service.publish_due().await.unwrap(), 0, "published once");
    }
}
