//! The fan-out hub: the live subscribers of this instance and the routing of each published
//! notice to the ones entitled to it.
//!
//! Publishing never waits for a subscriber. Each subscriber has a bounded buffer; when a notice
//! finds it full, that subscriber is removed at once and told it lagged (it resumes from its
//! last id with a new subscription), so one slow reader can neither hold up the others nor make
//! memory grow. The hub lock is a std mutex held only for map updates and `try_send`s, never
//! across an await.
//!
//! A poisoned lock is used anyway (`unwrap_or_else(PoisonError::into_inner)`), the policy of every
//! std mutex in the workspace's services: the sections holding one only update maps and offer to
//! channels, calls that leave each collection whole, so a panic elsewhere in a task cannot leave
//! them half-updated, and refusing the lock would turn one failed request into failing them all.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError},
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::notice::{format_time, Interest, OutgoingNotice};

/// Why a subscription ended from the service's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Its buffer overflowed: it missed notices and should resume from its last id.
    Lagged,
    /// `DELETE /notices/subscribers/{name}` asked for it.
    Kicked,
    /// The service is shutting down.
    Shutdown,
}

impl EndReason {
    /// The SSE event name of the final event a stream gets.
    pub fn event_name(self) -> &'static str {
        match self {
            EndReason::Lagged => "lagged",
            EndReason::Kicked => "kicked",
            EndReason::Shutdown => "shutdown",
        }
    }
}

/// One subscriber as presence shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriberInfo {
    pub name: Option<String>,
    pub topics: Vec<String>,
    #[serde(serialize_with = "serialize_time")]
    pub since: DateTime<Utc>,
}

fn serialize_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_time(t))
}

/// One subscriber of this instance, with the id its presence rows are kept under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSubscriber {
    pub id: u64,
    pub info: SubscriberInfo,
}

/// Presence changes, for whoever mirrors this instance's presence elsewhere (the PostgreSQL
/// presence table).
#[derive(Debug, Clone)]
pub enum PresenceChange {
    Joined(LocalSubscriber),
    /// The id of a subscriber that left.
    Left(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("too many subscribers ({0}), try again later")]
    Full(usize),
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// How a subscription learns it was ended, even while it is busy writing to its client.
#[derive(Default)]
struct Ending {
    reason: OnceLock<EndReason>,
    token: CancellationToken,
}

impl Ending {
    fn end(&self, reason: EndReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

struct Entry {
    info: SubscriberInfo,
    sender: mpsc::Sender<Arc<OutgoingNotice>>,
    ending: Arc<Ending>,
}

#[derive(Default)]
struct HubState {
    next_id: u64,
    shut_down: bool,
    subscribers: HashMap<u64, Entry>,
    by_topic: HashMap<String, HashSet<u64>>,
    by_name: HashMap<String, HashSet<u64>>,
}

impl HubState {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let entry = self.subscribers.remove(&id)?;
        crate::metrics::count_subscribers(-1);
        for topic in &entry.info.topics {
            remove_from_index(&mut self.by_topic, topic, id);
        }
        if let Some(name) = &entry.info.name {
            remove_from_index(&mut self.by_name, name, id);
        }
        Some(entry)
    }
}

fn remove_from_index(index: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
    if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

struct HubShared {
    state: Mutex<HubState>,
    buffer: usize,
    max_subscribers: usize,
    observer: Option<mpsc::UnboundedSender<PresenceChange>>,
}

/// A cheap-to-clone handle to the hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<HubShared>,
}

/// What one publish did, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: usize,
    pub lagged: usize,
}

impl Hub {
    /// `buffer` is each subscriber's queue length; `observer` hears every join and leave.
    pub fn new(
        buffer: usize,
        max_subscribers: usize,
        observer: Option<mpsc::UnboundedSender<PresenceChange>>,
    ) -> Hub {
        Hub {
            shared: Arc::new(HubShared {
                state: Mutex::default(),
                buffer: buffer.max(1),
                max_subscribers,
                observer,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, HubState> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn observe(&self, change: PresenceChange) {
        if let Some(observer) = &self.shared.observer {
            let _ = observer.send(change);
        }
    }

    pub fn subscribe(&self, interest: Interest) -> Result<Subscription, SubscribeError> {
        let (sender, receiver) = mpsc::channel(self.shared.buffer);
        let ending = Arc::new(Ending::default());
        let info = SubscriberInfo {
            name: interest.name.clone(),
            topics: interest.topics.clone(),
            since: Utc::now(),
        };
        let id = {
            let mut state = self.state();
            if state.shut_down {
                return Err(SubscribeError::ShuttingDown);
            }
            if state.subscribers.len() >= self.shared.max_subscribers {
                return Err(SubscribeError::Full(self.shared.max_subscribers));
            }
            state.next_id += 1;
            let id = state.next_id;
            for topic in &info.topics {
                state.by_topic.entry(topic.clone()).or_default().insert(id);
            }
            if let Some(name) = &info.name {
                state.by_name.entry(name.clone()).or_default().insert(id);
            }
            let entry = Entry {
                info: info.clone(),
                sender,
                ending: ending.clone(),
            };
            state.subscribers.insert(id, entry);
            crate::metrics::count_subscribers(1);
            id
        };
        self.observe(PresenceChange::Joined(LocalSubscriber { id, info }));
        Ok(Subscription {
            id,
            hub: self.clone(),
            receiver,
            ending,
            interest,
        })
    }

    /// Hands a notice to every subscriber entitled to it, in the order notices are published.
    pub fn publish(&self, notice: Arc<OutgoingNotice>) -> Delivery {
        let mut delivery = Delivery::default();
        let mut lagged = Vec::new();
        {
            let mut state = self.state();
            let state = &mut *state;
            let mut offer = |id: &u64, entry: &Entry| match entry.sender.try_send(notice.clone()) {
                Ok(()) => delivery.delivered += 1,
                // Closed means the subscription is being dropped right now; its guard removes it.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(_)) => lagged.push(*id),
            };
            // The same audience rule as `Interest::wants`, through the indexes: a whisper goes
            // only to the subscriptions named after its addressee (the `Whispers` rule).
            match (&notice.to, &notice.topic) {
                (Some(to), _) => {
                    for id in state.by_name.get(to).into_iter().flatten() {
                        offer(id, &state.subscribers[id]);
                    }
                }
                (None, Some(topic)) => {
                    for id in state.by_topic.get(topic).into_iter().flatten() {
                        offer(id, &state.subscribers[id]);
                    }
                }
                (None, None) => {
                    for (id, entry) in &state.subscribers {
                        offer(id, entry);
                    }
                }
            }
            for id in &lagged {
                if let Some(entry) = state.remove(*id) {
                    entry.ending.end(EndReason::Lagged);
                }
            }
        }
        delivery.lagged = lagged.len();
        crate::metrics::count_fan_out(delivery.delivered, delivery.lagged);
        for id in lagged {
            self.observe(PresenceChange::Left(id));
        }
        delivery
    }

    /// Ends every subscription with this name; returns how many there were.
    pub fn kick(&self, name: &str) -> usize {
        let kicked: Vec<u64> = {
            let mut state = self.state();
            let ids: Vec<u64> = state
                .by_name
                .get(name)
                .map(|ids| ids.iter().copied().collect())
                .unwrap_or_default();
            for id in &ids {
                if let Some(entry) = state.remove(*id) {
                    entry.ending.end(EndReason::Kicked);
                }
            }
            ids
        };
        for id in &kicked {
            self.observe(PresenceChange::Left(*id));
        }
        kicked.len()
    }

    /// Ends every subscription and refuses new ones.
    pub fn shut_down(&self) {
        let ids: Vec<u64> = {
            let mut state = self.state();
            state.shut_down = true;
            let ids: Vec<u64> = state.subscribers.keys().copied().collect();
            for id in &ids {
                if let Some(entry) = state.remove(*id) {
                    entry.ending.end(EndReason::Shutdown);
                }
            }
            ids
        };
        for id in ids {
            self.observe(PresenceChange::Left(id));
        }
    }

    /// Who is subscribed here now, oldest first.
    pub fn presence(&self) -> Vec<LocalSubscriber> {
        let state = self.state();
        let mut all: Vec<LocalSubscriber> = state
            .subscribers
            .iter()
            .map(|(id, entry)| LocalSubscriber {
                id: *id,
                info: entry.info.clone(),
            })
            .collect();
        all.sort_by_key(|present| present.id);
        all
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.state().subscribers.len()
    }

    fn unsubscribe(&self, id: u64) {
        let removed = self.state().remove(id).is_some();
        if removed {
            self.observe(PresenceChange::Left(id));
        }
    }
}

/// One live subscription. Dropping it (the client went away, the stream handler's future was
/// dropped) removes it from the hub and from presence at once.
pub struct Subscription {
    id: u64,
    hub: Hub,
    receiver: mpsc::Receiver<Arc<OutgoingNotice>>,
    ending: Arc<Ending>,
    interest: Interest,
}

impl Subscription {
    pub fn interest(&self) -> &Interest {
        &self.interest
    }

    /// The reason this subscription was ended by the service, if it was.
    pub fn end_reason(&self) -> Option<EndReason> {
        self.ending.reason.get().copied()
    }

    /// Resolves once the service ended this subscription (lagged, kicked, shutdown).
    pub async fn ended(&self) -> EndReason {
        self.ending.token.cancelled().await;
        self.end_reason().unwrap_or(EndReason::Shutdown)
    }

    /// The next live notice. A kicked or shut-down subscription stops at once; a lagged one
    /// first hands out what its buffer still holds, so the client resumes from a later id.
    pub async fn recv(&mut self) -> Result<Arc<OutgoingNotice>, EndReason> {
        if let Some(reason @ (EndReason::Kicked | EndReason::Shutdown)) = self.end_reason() {
            return Err(reason);
        }
        match self.receiver.recv().await {
            Some(notice) => Ok(notice),
            None => Err(self.end_reason().unwrap_or(EndReason::Shutdown)),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.unsubscribe(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notice::NewNotice;

    fn notice(id: i64, topic: Option<&str>, to: Option<&str>) -> Arc<OutgoingNotice> {
        OutgoingNotice::new(
            NewNotice {
                message: format!("n{id}"),
                topic: topic.map(Into::into),
                to: to.map(Into::into),
                from: None,
            }
            .stored(id, Utc::now()),
        )
    }

    fn interest(name: Option<&str>, topics: &[&str]) -> Interest {
        Interest {
            name: name.map(Into::into),
            topics: topics.iter().map(|t| t.to_string()).collect(),
        }
    }

    /// Everything a subscription has buffered right now.
    fn drain(sub: &mut Subscription) -> Vec<i64> {
        let mut ids = Vec::new();
        while let Ok(n) = sub.receiver.try_recv() {
            ids.push(n.id);
        }
        ids
    }

    #[test]
    fn notices_reach_exactly_their_audience() {
        let hub = Hub::new(16, 100, None);
        let mut alice = hub.subscribe(interest(Some("alice"), &["room"])).unwrap();
        let mut bob = hub.subscribe(interest(Some("bob"), &["other"])).unwrap();
        let mut anon = hub.subscribe(interest(None, &[])).unwrap();
        hub.publish(notice(1, None, None));
        hub.publish(notice(2, Some("room"), None));
        hub.publish(notice(3, Some("other"), None));
        hub.publish(notice(4, None, Some("alice")));
        hub.publish(notice(5, Some("room"), Some("bob")));
        hub.publish(notice(6, Some("nobody"), None));
        assert_eq!(drain(&mut alice), [1, 2, 4]);
        assert_eq!(drain(&mut bob), [1, 3, 5]);
        assert_eq!(drain(&mut anon), [1]);
    }

    #[tokio::test]
    async fn a_full_buffer_ends_only_that_subscriber() {
        let (observer, mut changes) = mpsc::unbounded_channel();
        let hub = Hub::new(2, 100, Some(observer));
        let mut slow = hub.subscribe(interest(None, &[])).unwrap();
        let mut fast = hub.subscribe(interest(None, &[])).unwrap();
        for id in 1..=5 {
            let delivery = hub.publish(notice(id, None, None));
            assert_eq!(fast.recv().await.unwrap().id, id);
            if id == 3 {
                assert_eq!(delivery.lagged, 1);
            }
        }
        assert_eq!(hub.len(), 1, "the slow one is gone from presence");
        // The slow one still gets what it had buffered, then the lagged end.
        assert_eq!(slow.recv().await.unwrap().id, 1);
        assert_eq!(slow.recv().await.unwrap().id, 2);
        assert_eq!(slow.recv().await.unwrap_err(), EndReason::Lagged);
        let mut left = 0;
        while let Ok(change) = changes.try_recv() {
            if matches!(change, PresenceChange::Left(_)) {
                left += 1;
            }
        }
        assert_eq!(left, 1);
    }

    #[tokio::test]
    async fn kick_ends_every_subscription_of_a_name_at_once() {
        let hub = Hub::new(8, 100, None);
        let mut first = hub.subscribe(interest(Some("alice"), &[])).unwrap();
        let second = hub.subscribe(interest(Some("alice"), &["t"])).unwrap();
        let _bob = hub.subscribe(interest(Some("bob"), &[])).unwrap();
        hub.publish(notice(1, None, None));
        assert_eq!(hub.kick("alice"), 2);
        assert_eq!(hub.kick("alice"), 0);
        assert_eq!(hub.kick("nobody"), 0);
        // Kicked wins over what is still buffered.
        assert_eq!(first.recv().await.unwrap_err(), EndReason::Kicked);
        assert_eq!(second.ended().await, EndReason::Kicked);
        let names: Vec<_> = hub
            .presence()
            .into_iter()
            .map(|present| present.info.name)
            .collect();
        assert_eq!(names, [Some("bob".to_string())]);
    }

    #[test]
    fn dropping_a_subscription_frees_it() {
        let (observer, mut changes) = mpsc::unbounded_channel();
        let hub = Hub::new(8, 100, Some(observer));
        let sub = hub.subscribe(interest(Some("alice"), &["t"])).unwrap();
        assert_eq!(hub.len(), 1);
        drop(sub);
        assert_eq!(hub.len(), 0);
        let state = hub.state();
        assert!(state.by_topic.is_empty() && state.by_name.is_empty());
        drop(state);
        assert!(matches!(changes.try_recv(), Ok(PresenceChange::Joined(..))));
        assert!(matches!(changes.try_recv(), Ok(PresenceChange::Left(_))));
    }

    #[test]
    fn subscriber_cap_and_shutdown_refuse_new_subscriptions() {
        let hub = Hub::new(8, 1, None);
        let first = hub.subscribe(interest(None, &[])).unwrap();
        assert_eq!(
            hub.subscribe(interest(None, &[])).err(),
            Some(SubscribeError::Full(1))
        );
        hub.shut_down();
        assert_eq!(first.end_reason(), Some(EndReason::Shutdown));
        assert_eq!(
            hub.subscribe(interest(None, &[])).err(),
            Some(SubscribeError::ShuttingDown)
        );
    }
}
